"""What the kernels share: Triton availability, argument checks, programmatic dependent launch."""
from __future__ import annotations

import os

import torch

try:  # Triton is optional (CPU installs use the references)
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover
    triton = None
    tl = None

#: kernels were decorated for Triton's interpreter (TRITON_INTERPRET=1 at import): they run on CPU tensors
INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Run the Triton kernels on tensors like ``t`` (CUDA, or CPU under the interpreter)?"""
    if triton is None:
        return False
    return t.device.type == "cpu" if INTERPRET else t.is_cuda


def check_tensor(name: str, t, dim: int, dtypes, device=None, inner_contiguous: bool = True,
                 contiguous: bool = False):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must be {names}, got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous()), got strides {t.stride()}")
    if inner_contiguous and t.numel() and t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension, got strides {t.stride()}")


_SMS: dict = {}


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SMS:
        _SMS[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SMS[i]


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


_CC: dict = {}


def pdl_launch(device: torch.device, on: bool) -> bool:
    """Launch a kernel of the decode chain with programmatic dependent launch (PDL)? ``on`` (the caller's
    config) and a CUDA device of compute capability >= 9; never under the interpreter. With PDL a kernel may be
    scheduled while the one before it still runs (once all of that one's programs asked for it): it does its
    independent set-up, then waits (griddepcontrol.wait) for the previous kernel to complete before it reads
    or writes anything the chain shares."""
    if not on or INTERPRET or device.type != "cuda":
        return False
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _CC:
        _CC[i] = torch.cuda.get_device_capability(i)[0] >= 9
    return _CC[i]


if triton is not None:
    @triton.jit
    def gdc_wait(PDL: tl.constexpr):
        """Wait until the previous kernel completed and its writes are visible (PDL launches only)."""
        if PDL:
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def gdc_trigger(PDL: tl.constexpr):
        """Let the next kernel be scheduled once every program of this one got here (or exited)."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
else:  # no Triton: the names exist (the kernel modules import them), the kernels that use them are not defined
    def _needs_triton(*args, **kwargs):
        raise RuntimeError("this needs Triton (pip install 'hashattention[kernels]'); without it the PyTorch "
                           "references run")

    gdc_wait = gdc_trigger = _needs_triton

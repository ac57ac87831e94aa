"""Weights files for the maps: ``NAME.safetensors`` (tensors) + ``NAME.json`` (config, provenance, sha256).

Loading never executes code (safetensors only), verifies the checksum, and checks every shape against the
config and the config against the model, naming what does not match.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path


from .core.calibration import FORMAT as CAL_FORMAT, Calibration
from .core.maps import HashMaps, MapsConfig

FORMAT = "hashattention-maps/1"


class WeightsError(ValueError):
    """A maps file that cannot be used: missing, corrupt, or for another model."""


def _paths(path) -> tuple[Path, Path]:
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_maps(maps: HashMaps, path) -> Path:
    """Write ``maps`` to ``path`` (.safetensors and .json). Returns the safetensors path.

    The file is written under a temporary name and renamed, so an interrupted save leaves the old file.
    """
    from safetensors.torch import save_file
    st, js = _paths(path)
    st.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in maps.state_dict().items()}
    tmp = st.with_suffix(".safetensors.tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT})
    meta = {"format": FORMAT, "config": maps.config.to_dict(), "sha256": _sha256(tmp),
            "dtype": str(next(iter(tensors.values())).dtype).replace("torch.", "")}
    tmpj = js.with_suffix(".json.tmp")
    tmpj.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, st)
    os.replace(tmpj, js)
    return st


def load_maps(path, model_config=None, allow_other_model: bool = False, device=None) -> HashMaps:
    """Read maps written by :func:`save_maps`; with ``model_config`` also check they fit that model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    st, js = _paths(path)
    for p in (st, js):
        if not p.is_file():
            raise WeightsError(f"maps file {p} does not exist (a maps file is a .safetensors with a .json beside it)")
    try:
        meta = json.loads(js.read_text())
        cfg = MapsConfig(**meta["config"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise WeightsError(f"{js} is not a valid maps config: {e}") from None
    if meta.get("format") != FORMAT:
        raise WeightsError(f"{js}: unknown format {meta.get('format')!r}, expected {FORMAT!r}")
    digest = _sha256(st)
    if meta.get("sha256") != digest:
        raise WeightsError(f"{st} is corrupt or truncated: sha256 {digest[:12]}… does not match the "
                           f"{str(meta.get('sha256'))[:12]}… recorded in {js.name}")
    try:
        tensors = load_file(str(st))
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{st} is not a readable safetensors file: {e}") from None
    maps = HashMaps(cfg, init=False)  # every tensor is loaded below; the global RNG stays untouched
    expected = maps.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise WeightsError(f"{st}: tensors missing {missing[:4]} / unexpected {unexpected[:4]} for its config")
    for k, v in expected.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise WeightsError(f"{st}: tensor {k} has shape {tuple(tensors[k].shape)}, "
                               f"the config implies {tuple(v.shape)}")
    maps.load_state_dict(tensors)
    maps = maps.to(dtype=next(iter(tensors.values())).dtype)
    if model_config is not None:
        check_maps_match_model(cfg, model_config, allow_other_model)
    maps = maps.to(device) if device is not None else maps
    cal = calibration_path(st)
    maps.calibrations = {}
    if cal.is_file():
        try:
            maps.calibrations = load_calibrations(cal, maps, digest)
        except StaleCalibration as e:  # maps retrained in place: they load, an adaptive budget says why it can't run
            maps.calibration_note = str(e)
            warnings.warn(str(e), stacklevel=2)
    return maps


class StaleCalibration(WeightsError):
    """A calibration file written for other maps (e.g. maps retrained under the same name)."""


def calibration_path(path) -> Path:
    """``NAME.calibration.json`` beside the maps ``NAME.safetensors``: the adaptive budget's tables."""
    st, _ = _paths(path)
    return st.with_suffix(".calibration.json")


def _cal_heads(cfg: MapsConfig, selection: str) -> tuple[int, int]:
    """(score heads, max score) of a selection's table for these maps."""
    g = cfg.num_q_heads // cfg.num_kv_heads
    if selection == "head":
        return cfg.num_q_heads, cfg.bits
    return cfg.num_kv_heads, cfg.bits * (g if selection == "sum" else 1)


def save_calibrations(cals: list, maps_path, out=None) -> Path:
    """Write ``cals`` (core.calibration.Calibration, one per selection) beside the maps file (or to ``out``),
    tied to the maps' sha256. Returns the path."""
    st, _ = _paths(maps_path)
    if not st.is_file():
        raise WeightsError(f"maps file {st} does not exist")
    out = Path(out) if out else calibration_path(st)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"format": CAL_FORMAT, "maps_sha256": _sha256(st),
                               "calibrations": [c.to_dict() for c in cals]}))
    os.replace(tmp, out)
    return out


def load_calibrations(path, maps: HashMaps, maps_sha256: str | None = None) -> dict:
    """{selection: Calibration} from ``path``, each checked against ``maps`` (layers, heads, score range) and,
    given ``maps_sha256``, the file's record of which maps it calibrates."""
    path = Path(path)
    try:
        meta = json.loads(path.read_text())
        if meta.get("format") != CAL_FORMAT:
            raise ValueError(f"unknown format {meta.get('format')!r}, expected {CAL_FORMAT!r}")
        cals = [Calibration.from_dict(d) for d in meta["calibrations"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise WeightsError(f"{path} is not a valid calibration file: {e}") from None
    if maps_sha256 is not None and meta.get("maps_sha256") != maps_sha256:
        raise StaleCalibration(f"{path} calibrates other maps (sha256 {str(meta.get('maps_sha256'))[:12]}…, these maps "
                           f"{maps_sha256[:12]}…): run `hashattention calibrate` again")
    c = maps.config
    out = {}
    for cal in cals:
        heads, max_score = _cal_heads(c, cal.selection)
        try:
            cal.check(c.num_layers, heads, max_score)
        except ValueError as e:
            raise WeightsError(f"{path}: {e}") from None
        out[cal.selection] = cal
    return out


def model_shape(model_config) -> dict:
    c = model_config
    hq = c.num_attention_heads
    return {"num_layers": c.num_hidden_layers, "num_q_heads": hq,
            "num_kv_heads": getattr(c, "num_key_value_heads", None) or hq,
            "head_dim": getattr(c, "head_dim", None) or c.hidden_size // hq}


def check_maps_match_model(cfg: MapsConfig, model_config, allow_other_model: bool = False):
    """Raise :class:`WeightsError` naming every mismatch between maps and model."""
    want = model_shape(model_config)
    bad = [f"{k}: maps {getattr(cfg, k)} vs model {v}" for k, v in want.items() if getattr(cfg, k) != v]
    if bad:
        raise WeightsError(f"these maps were made for another model ({cfg.model_id or 'unknown'}, "
                           f"{cfg.model_type or '?'}): " + "; ".join(bad))
    model_id = getattr(model_config, "_hashattention_model_id", "") or getattr(model_config, "_name_or_path", "")
    if (not allow_other_model and cfg.model_id and model_id and cfg.model_id != model_id
            and os.path.basename(cfg.model_id) != os.path.basename(str(model_id))):
        raise WeightsError(f"these maps were trained for {cfg.model_id!r}, the model is {model_id!r} "
                           "(same shapes; pass allow_other_model=True to use them anyway)")


def maps_config_for(model_config, **kwargs) -> MapsConfig:
    """A :class:`MapsConfig` with the model's shapes (layers, heads, head_dim) filled in."""
    model_id = getattr(model_config, "_hashattention_model_id", "") or getattr(model_config, "_name_or_path", "")
    return MapsConfig(**model_shape(model_config), model_id=str(model_id),
                      model_type=getattr(model_config, "model_type", ""), **kwargs)

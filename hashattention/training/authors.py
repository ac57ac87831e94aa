"""Import of the paper authors' published map files (the ``USA`` module of HashAttention-1.0).

Layout: a PyTorch state dict over layers; per layer and query head a Sequential of Linear layers (indices 0, 2, 4
with SiLU between), for queries and for (group-repeated) keys:

    <layer>.learning_to_hash_transformation_q.<head>.<0|2|4>.weight  [out, in]   (+ .bias [out])
    <layer>.learning_to_hash_transformation_k.<head>.<0|2|4>.weight

Shapes for depth 3: [128, head_dim], [128, 128], [bits, 128]. Our format stacks them as
``w[i]: [layers, heads, in, out]`` (transposed) with one key map per query head (``key_heads = num_q_heads``).
"""
from __future__ import annotations

import re
from collections import defaultdict

import torch

from ..core.maps import HashMaps, MapsConfig

_KEY = re.compile(r"^(?:.*?\.)?(\d+)\.learning_to_hash_transformation_([qk])\.(\d+)\.(\d+)\.(weight|bias)$")


def load_state_dict(path) -> dict:
    """Read a .pt/.pth (torch.load with weights_only=True: no code runs) or .safetensors state dict."""
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - unpickling refused or not a torch file
        raise ValueError(f"{path} is not a PyTorch state dict that loads with weights_only=True: {e}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path} holds a {type(sd).__name__}, not a state dict")
    return sd


def import_usa(state_dict: dict, num_kv_heads: int, model_id: str = "", model_type: str = "") -> HashMaps:
    """Convert an authors'-layout state dict into :class:`HashMaps` (fp32). Raises ValueError naming what is
    missing or inconsistent. ``num_kv_heads`` comes from the model (the file does not record it)."""
    found = defaultdict(dict)  # (side, linear index, kind) -> {(layer, head): tensor}
    for name, t in state_dict.items():
        m = _KEY.match(name)
        if m is None:
            continue
        layer, side, head, idx, kind = int(m[1]), m[2], int(m[3]), int(m[4]), m[5]
        found[(side, idx, kind)][(layer, head)] = t
    if not found:
        raise ValueError("no '<layer>.learning_to_hash_transformation_q.<head>.<i>.weight' tensors in this file: "
                         "not the authors' HashAttention map layout")
    idxs = sorted({i for (_, i, k) in found if k == "weight"})
    if idxs != list(range(0, 2 * len(idxs), 2)):
        raise ValueError(f"Linear indices {idxs} are not 0, 2, 4, ... (Linear/SiLU alternating)")
    depth = len(idxs)
    cells = found[("q", 0, "weight")]
    layers = max(l for l, _ in cells) + 1
    heads = max(h for _, h in cells) + 1
    head_dim = next(iter(cells.values())).shape[1]
    bits = found[("q", idxs[-1], "weight")][(0, 0)].shape[0] if (0, 0) in found[("q", idxs[-1], "weight")] else None
    hidden = found[("q", 0, "weight")][(0, 0)].shape[0] if depth > 1 else 128
    has_bias = any(k == "bias" for (_, _, k) in found)
    if bits is None:
        raise ValueError("layer 0 head 0 has no last Linear layer")
    if heads % num_kv_heads:
        raise ValueError(f"{heads} query heads in the file are not a multiple of the model's {num_kv_heads} KV heads")
    cfg = MapsConfig(num_layers=layers, num_q_heads=heads, num_kv_heads=num_kv_heads, head_dim=head_dim, bits=bits,
                     hidden=hidden, depth=depth, key_heads=heads, bias=has_bias, model_id=model_id,
                     model_type=model_type, extra={"kind": "imported", "source_layout": "HashAttention-1.0 USA"})
    maps = HashMaps(cfg, init=False)  # every tensor is loaded below; the global RNG stays untouched
    dims = cfg.dims(key=False)
    with torch.no_grad():
        for side, mlp in (("q", maps.q), ("k", maps.k)):
            for j, idx in enumerate(idxs):
                for kind, want in (("weight", (dims[j + 1], dims[j])), ("bias", (dims[j + 1],))):
                    if kind == "bias" and not has_bias:
                        continue
                    cell = found.get((side, idx, kind), {})
                    missing = [(l, h) for l in range(layers) for h in range(heads) if (l, h) not in cell]
                    if missing:
                        l, h = missing[0]
                        raise ValueError(f"missing {l}.learning_to_hash_transformation_{side}.{h}.{idx}.{kind} "
                                         f"({len(missing)} {kind} tensors missing for Linear {idx})")
                    extra = [k for k in cell if k[0] >= layers or k[1] >= heads]
                    if extra:
                        raise ValueError(f"unexpected {side} {kind} tensors for layer/head {extra[0]}")
                    bad = [(k, tuple(t.shape)) for k, t in cell.items() if tuple(t.shape) != want]
                    if bad:
                        (l, h), shape = bad[0]
                        raise ValueError(f"{l}.learning_to_hash_transformation_{side}.{h}.{idx}.{kind} has shape "
                                         f"{shape}, expected {want}")
                    stacked = torch.stack([torch.stack([cell[(l, h)].float() for h in range(heads)])
                                           for l in range(layers)])
                    if kind == "weight":
                        mlp.weights[j].copy_(stacked.transpose(-1, -2))  # Linear [out, in] -> ours [in, out]
                    else:
                        mlp.biases[j].copy_(stacked)
    return maps

"""Sparse attention over selected tokens (PyTorch reference; the Triton decode kernel must match it)."""
from __future__ import annotations

import torch


def _group(x: torch.Tensor, hkv: int) -> torch.Tensor:
    """[B, Hq, L, *] -> [B, Hkv, G, L, *] (query heads of one KV head side by side)."""
    b, h = x.shape[:2]
    return x.reshape(b, hkv, h // hkv, *x.shape[2:])


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [B, H, L, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape[:-1] + (k.shape[-1],) or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} disagree")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree in batch or head_dim")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads")
    if not (q.is_floating_point() and k.dtype == q.dtype and v.dtype == q.dtype):
        raise TypeError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                     scale: float | None = None, return_probs: bool = False, bias: torch.Tensor | None = None):
    """Attention of each query over the keys where ``keep`` is True.

    q: [B, Hq, Lq, D]; k, v: [B, Hkv, Lk, D]; keep: bool [B, Hq or Hkv or 1, Lq, Lk] (a KV-head mask is
    shared by the query heads of its group); bias: float like keep, added to the kept logits (the log weight
    of a sampled residual key). Softmax in fp32. Returns [B, Hq, Lq, D] in q's dtype (and the probabilities
    [B, Hq, Lq, Lk] when ``return_probs``). A row with no kept key returns zeros.
    """
    check_qkv(q, k, v)
    if keep.dtype != torch.bool or keep.dim() != 4:
        raise TypeError(f"keep must be a 4-D bool mask, got {keep.dtype} {tuple(keep.shape)}")
    b, hq, lq, d = q.shape
    hkv = k.shape[1]
    scale = d ** -0.5 if scale is None else scale
    qg = _group(q, hkv).float()  # [B, Hkv, G, Lq, D]
    s = torch.matmul(qg, k.float().unsqueeze(2).transpose(-1, -2)) * scale  # [B, Hkv, G, Lq, Lk]
    grouped = keep.shape[1] == hq and hq != hkv
    m = _group(keep, hkv) if grouped else keep.unsqueeze(2)  # [B, Hkv or 1, 1 or G, Lq, Lk]
    if bias is not None:
        s = s + (_group(bias, hkv) if grouped else bias.unsqueeze(2)).float()
    s = s.masked_fill(~m, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    out = torch.matmul(p, v.float().unsqueeze(2)).reshape(b, hq, lq, d).to(q.dtype)
    if return_probs:
        return out, p.reshape(b, hq, lq, -1)
    return out

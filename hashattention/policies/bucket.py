"""Bucket hash attention: the seed article's description of "hash attention", built to be measured.

Not the paper's method (that one scores every key by learned bit matches and reads the top-k). Here every
key and every query gets one bucket id out of 2**bits (see :mod:`.bucket_hashing`), and a query aggregates
the values of the keys in its own bucket:

    keep[b, h, i, j] = valid[b, i, j] & (bucket(q[b, h, i]) == bucket(k[b, h // G, j]))

Selection is per query head (Hs = Hq, ``per_group`` is ignored: a KV group's query heads have different
buckets). Options, all vectorized over heads:

  agg          "mean": mean of the bucket's values (the article's default); "softmax": softmax attention
               within the bucket; "proj": a learned per-head affine map of the bucket mean,
               out = [mean_v, 1] @ W[layer, head] (W [D+1, D], fit by :func:`fit_projection`).
  rounds       R independent hash functions; the outputs of the rounds whose bucket is non-empty are
               averaged (the article's "multi-round hashing ... averaging results"). Tokens read = union.
  hierarchical coarse to fine: the bucket at level l is the top l bits of the id; a query uses the
               coarsest level (from ``min_bits``) whose bucket holds at most ``max_bucket`` valid keys
               (default: the budget's heavy count, so reads are matched to the top-k policies). If that
               level is empty its parent is used instead, cut to its ``max_bucket`` most recent keys.
  bucket_fraction  mixed heads: the first floor(f * Hq) query heads use buckets, the others dense softmax
               (first heads, so whole KV groups turn to buckets first: only those can drop their keys).
  sink_window  False (pure, as the article) or True: the budget's sink and window tokens are always read too.
  empty        what a query whose bucket holds no valid key gets: "zeros" (the reference sparse attention's
               behaviour, output 0) or "sink_window" (it reads the budget's sink + window tokens instead).

Key bucket ids are computed once per new key in :meth:`update` (``state['kb']``: int64 [R, B, Hkv, Lk]).
"""
from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F

from ..core.attention import check_qkv, sparse_attention
from ..core.selection import _pick_last, forced_and_candidates
from .base import SelectionPolicy
from .bucket_hashing import BucketHasher, check_bits

AGGREGATIONS = ("mean", "softmax", "proj")
EMPTY_RULES = ("zeros", "sink_window")


def check_fraction(name: str, f) -> float:
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not (0.0 <= float(f) <= 1.0) or math.isnan(f):
        raise ValueError(f"{name} must be a fraction in [0, 1], got {f!r}")
    return float(f)


def bucket_head_mask(num_q_heads: int, fraction: float) -> torch.Tensor:
    """bool [Hq]: the first floor(fraction * Hq) heads use buckets."""
    n = int(math.floor(check_fraction("bucket_fraction", fraction) * num_q_heads + 1e-9))
    return torch.arange(num_q_heads) < n


def mean_pool(v: torch.Tensor, masks: torch.Tensor):
    """Mean of the kept values. v [B, Hkv, Lk, D]; masks bool [R, B, Hq, Lq, Lk].
    Returns (out fp32 [R, B, Hq, Lq, D] with zeros for empty rows, counts [R, B, Hq, Lq, 1])."""
    r, b, hq, lq, lk = masks.shape
    hkv = v.shape[1]
    w = masks.float()
    cnt = w.sum(-1, keepdim=True)
    w = w / cnt.clamp_min(1.0)
    wg = w.reshape(r, b, hkv, hq // hkv, lq, lk)  # query heads of one KV head side by side
    out = torch.matmul(wg, v.float().unsqueeze(0).unsqueeze(3))  # [R, B, Hkv, G, Lq, D]
    return out.reshape(r, b, hq, lq, -1), cnt


def average_rounds(outs: torch.Tensor, cnt: torch.Tensor) -> torch.Tensor:
    """Average over the rounds whose bucket is non-empty: outs [R, B, H, Lq, D], cnt [R, B, H, Lq, 1]."""
    ne = (cnt > 0).float()
    return (outs * ne).sum(0) / ne.sum(0).clamp_min(1.0)


def softmax_in_bucket(q, k, v, keep, scale) -> torch.Tensor:
    """Softmax attention within the kept keys through SDPA (fused, the model's dtype; same tokens as the fp32
    reference). keep [B, Hq, Lq, Lk]; an empty row returns zeros like the reference. -> fp32 [B, Hq, Lq, D]."""
    g = q.shape[1] // k.shape[1]
    if g > 1:
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    empty = ~keep.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep | empty, scale=scale)
    return out.float().masked_fill(empty, 0.0)


class BucketPolicy(SelectionPolicy):
    """Bucket hash attention (the seed article's description). See the module docstring for the options."""

    name = "bucket"
    defaults: dict = {}

    def __init__(self, budget=None, per_group: bool = False, hash: str = "lsh", bits: int = 16,
                 agg: str = "mean", rounds: int = 1, seed: int = 0, quant_step: float = 0.125,
                 coarse_bits: int | None = None, hierarchical: bool = False, min_bits: int = 1,
                 max_bucket: int | None = None, bucket_fraction: float = 1.0, sink_window: bool = False,
                 empty: str = "zeros", projection: dict | None = None):
        super().__init__(budget, per_group=False)
        check_bits(bits)
        self.hasher = BucketHasher(hash, bits, rounds, seed, quant_step, coarse_bits)
        if agg not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {agg!r}; available: {', '.join(AGGREGATIONS)}")
        if empty not in EMPTY_RULES:
            raise ValueError(f"unknown empty-bucket rule {empty!r}; available: {', '.join(EMPTY_RULES)}")
        if not isinstance(min_bits, int) or not (1 <= min_bits <= bits):
            raise ValueError(f"min_bits must be an integer in 1..bits ({bits}), got {min_bits!r}")
        if max_bucket is not None and (isinstance(max_bucket, bool) or not isinstance(max_bucket, int)
                                       or max_bucket < 1):
            raise ValueError(f"max_bucket must be a positive integer or None, got {max_bucket!r}")
        self.agg, self.empty = agg, empty
        self.hierarchical, self.min_bits, self.max_bucket = bool(hierarchical), min_bits, max_bucket
        self.bucket_fraction = check_fraction("bucket_fraction", bucket_fraction)
        self.sink_window = bool(sink_window)
        self.projection: dict[int, torch.Tensor] = dict(projection or {})  # layer -> [Hq, D+1, D]
        self._stash = None  # what select() computed for the attend() call that follows it
        self._fit = None  # projection statistics while fit_projection runs

    # -- description ---------------------------------------------------------------------------------
    def config(self) -> dict:
        h = self.hasher
        return {"hash": h.kind, "bits": h.bits, "rounds": h.rounds, "seed": h.seed, "quant_step": h.quant_step,
                "coarse_bits": h.coarse_bits, "hierarchical": self.hierarchical, "min_bits": self.min_bits,
                "max_bucket": self.max_bucket, "bucket_fraction": self.bucket_fraction,
                "sink_window": self.sink_window, "empty": self.empty, "agg": self.agg}

    def __repr__(self):
        extra = ",hier" if self.hierarchical else ""
        extra += f",heads={self.bucket_fraction:g}" if self.bucket_fraction < 1 else ""
        extra += f",{self.budget.describe()}" if self.sink_window or self.empty != "zeros" else ""
        return f"{type(self).__name__}({self.hasher.describe()},{self.agg}{extra},empty={self.empty})"

    def extra_bits_per_token(self, num_kv_heads: int, num_q_heads: int) -> int:
        """Key bucket ids: bits x rounds per KV head (the values, and keys for softmax, stay cached)."""
        return self.hasher.bits * self.hasher.rounds * num_kv_heads

    # -- state ---------------------------------------------------------------------------------------
    def update(self, layer, state, k, v, start):
        hkv = k.shape[1]
        kb = self.hasher(layer, k[:, :, start:], torch.arange(hkv), hkv)  # [R, B, Hkv, new]
        old = state.get("kb")
        state["kb"] = kb if old is None or start == 0 else torch.cat([old[..., :start], kb], dim=-1)

    # -- selection -----------------------------------------------------------------------------------
    def _hier(self, qb, kb, valid):
        """Coarse-to-fine bucket masks. qb [R, B, H, Lq], kb [R, B, H, Lk] -> bool [R, B, H, Lq, Lk]."""
        bits = self.hasher.bits
        vb = valid.unsqueeze(0)
        # at_least[..., l] = valid keys sharing the query's top-l bits; one vectorized compare per level
        at_least = torch.stack([(((qb >> (bits - lv)).unsqueeze(-1) == (kb >> (bits - lv)).unsqueeze(-2)) & vb)
                                .sum(-1) for lv in range(bits + 1)], -1)  # [R, B, H, Lq, bits+1]
        if self.max_bucket is not None:
            cap = torch.full_like(at_least[..., :1], self.max_bucket)
        else:  # matched to the top-k policies: the budget's heavy count for this row's context
            cap = self.budget.heavy_count(at_least[..., :1]).clamp_min(1)
        lv = torch.arange(bits + 1, device=qb.device)
        small = (at_least <= cap) & (lv >= self.min_bits)
        level = torch.where(small.any(-1, keepdim=True), small.to(torch.int8).argmax(-1, keepdim=True),
                            torch.full_like(cap, bits))
        cnt = at_least.gather(-1, level)
        parent = (cnt == 0) & (level > self.min_bits)
        level = torch.where(parent, level - 1, level)
        sh = (bits - level).squeeze(-1)  # [R, B, H, Lq]
        m = ((qb >> sh).unsqueeze(-1) == (kb.unsqueeze(-2) >> sh.unsqueeze(-1))) & vb
        return _pick_last(m, cap)  # a parent bucket above the cap keeps its cap most recent keys

    def select(self, layer, state, q, k, v, valid, scale):
        b, hq, lq, d = q.shape
        hkv = k.shape[1]
        g = hq // hkv
        if valid.shape[1] != 1:
            valid = valid[:, :1]
        heads = bucket_head_mask(hq, self.bucket_fraction).to(q.device)
        hb = torch.nonzero(heads).flatten()
        r = self.hasher.rounds
        masks = valid.unsqueeze(0).expand(r, b, hq, lq, valid.shape[-1]).clone()
        if hb.numel():
            kv_of = hb // g
            qb = self.hasher(layer, q[:, hb], kv_of.cpu(), hkv)  # [R, B, nb, Lq]
            kb = state["kb"][:, :, kv_of.to(state["kb"].device)].to(q.device)  # [R, B, nb, Lk]
            if self.hierarchical:
                match = self._hier(qb, kb, valid)
            else:
                match = (qb.unsqueeze(-1) == kb.unsqueeze(-2)) & valid.unsqueeze(0)
            if self.sink_window or self.empty == "sink_window":
                forced = forced_and_candidates(valid, self.budget)[0].unsqueeze(0)  # [1, B, 1, Lq, Lk]
                if self.sink_window:
                    match = match | forced
                else:
                    match = match | (forced & ~match.any(-1, keepdim=True))
            masks[:, :, hb] = match
        keep = masks.any(0)
        self._stash = {"keep": keep, "masks": masks, "layer": layer, "valid": valid, "heads": heads}
        return keep

    # -- aggregation ---------------------------------------------------------------------------------
    def _proj_weight(self, layer, hq, d, device):
        w = self.projection.get(layer)
        if w is None:  # identity: an unfit projection is the mean aggregation
            w = torch.cat([torch.eye(d), torch.zeros(1, d)]).expand(hq, d + 1, d).clone()
            self.projection[layer] = w
        if w.shape != (hq, d + 1, d):
            raise ValueError(f"projection for layer {layer} has shape {tuple(w.shape)}, expected {(hq, d + 1, d)}")
        return w.to(device=device, dtype=torch.float32)

    def attend(self, q, k, v, keep, scale, return_probs=False, bias=None):
        if bias is not None:
            raise ValueError("bucket policies aggregate buckets: a residual sample (Budget.residual) does not apply")
        check_qkv(q, k, v)
        st = self._stash if self._stash is not None and self._stash["keep"] is keep else None
        if st is None:  # a mask from elsewhere: one round, every head bucketed
            if keep.shape[1] != q.shape[1]:
                keep = keep.expand(keep.shape[0], q.shape[1], *keep.shape[2:])
            st = {"keep": keep, "masks": keep.unsqueeze(0), "layer": None, "valid": None,
                  "heads": torch.ones(q.shape[1], dtype=torch.bool, device=q.device)}
        masks, heads = st["masks"], st["heads"].view(1, -1, 1, 1)
        if self.agg == "softmax" and self._fit is None:
            outs = torch.stack([softmax_in_bucket(q, k, v, m, scale) for m in masks])  # rounds, not heads
            cnt = masks.sum(-1, keepdim=True)
            out = average_rounds(outs, cnt)
        else:
            means, cnt = mean_pool(v, masks)
            out = average_rounds(means, cnt)  # [B, Hq, Lq, D]
            if self._fit is not None:
                return self._accumulate(st, q, k, v, out, scale)
            if self.agg == "proj":
                if st["layer"] is None:
                    raise ValueError("the 'proj' aggregation needs the layer: call select() before attend()")
                w = self._proj_weight(st["layer"], q.shape[1], q.shape[-1], q.device)
                x = torch.cat([out, torch.ones_like(out[..., :1])], -1)
                out = torch.einsum("bhld,hde->bhle", x, w)
        if not bool(heads.all()):  # mixed heads: dense heads use softmax over every valid key
            dense = softmax_in_bucket(q, k, v, masks[0], scale)
            out = torch.where(heads, out, dense)
        out = out.to(q.dtype)
        if return_probs:  # the averaged aggregation weights (uniform within a bucket for mean/proj)
            w = masks.float() / masks.sum(-1, keepdim=True).clamp_min(1)
            return out, average_rounds(w, masks.sum(-1, keepdim=True))
        return out

    # -- fitting the learned projection --------------------------------------------------------------
    def _accumulate(self, st, q, k, v, mean_out, scale):
        """Teacher forcing for fit_projection: add [mean, 1] -> dense output statistics, return dense."""
        valid = st["valid"]
        if valid is None:
            raise ValueError("fit_projection needs select() before attend()")
        y = sparse_attention(q, k, v, valid, scale)  # dense target [B, Hq, Lq, D]
        x = torch.cat([mean_out, torch.ones_like(mean_out[..., :1])], -1).double()  # [B, Hq, Lq, D+1]
        yy = y.double()
        layer = st["layer"]
        xtx = torch.einsum("bhld,bhle->hde", x, x)
        xty = torch.einsum("bhld,bhle->hde", x, yy)
        y2 = (yy * yy).sum((0, 2, 3))  # [Hq]
        if layer in self._fit:
            for acc, new in zip(self._fit[layer], (xtx, xty, y2)):
                acc.add_(new.cpu())
        else:
            self._fit[layer] = [xtx.cpu(), xty.cpu(), y2.cpu()]
        return y

    def save_projection(self, path: str):
        from safetensors.torch import save_file
        tensors = {f"layer.{i}": w.contiguous().cpu() for i, w in sorted(self.projection.items())}
        save_file(tensors, path, metadata={"bucket_config": json.dumps(self.config())})

    def load_projection(self, path: str):
        """Load W per layer from ``path``; the bucket configuration it was fit with must match this one."""
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            meta = json.loads((f.metadata() or {}).get("bucket_config", "{}"))
            mine = {k: v for k, v in self.config().items() if k != "agg"}
            theirs = {k: v for k, v in meta.items() if k != "agg"}
            if mine != theirs:
                diff = {k: (theirs.get(k), mine.get(k)) for k in mine if theirs.get(k) != mine.get(k)}
                raise ValueError(f"projection {path} was fit for another bucket configuration "
                                 f"(file, policy): {diff}")
            self.projection = {int(n.split(".")[1]): f.get_tensor(n) for n in f.keys()}
        return self


@torch.no_grad()
def fit_projection(model, policy: BucketPolicy, input_ids, ridge: float = 1e-2, chunk: int = 128,
                   batch_size: int = 1, progress=None) -> dict:
    """Fit the ``proj`` aggregation of ``policy`` on ``model``'s own dense attention: closed-form ridge
    regression, per layer and query head, from [bucket mean of v, 1] to the dense attention output.

    The model runs densely (teacher forcing: every layer sees dense activations) with every query routed
    through the policy's buckets (``mode="everywhere"``); X^T X and X^T Y are summed over all queries, then
    W = (X^T X + ridge * n * I)^-1 X^T Y for every layer and head at once. input_ids: LongTensor [N, L] or a
    list of [1, L] tensors. Sets ``policy.projection``, and returns {"layers", "rows_per_head", "mse_proj",
    "mse_mean", "mse_zero"}: training-set mean squared errors (per output element, against the dense attention
    output) of the fit projection, of plain mean pooling and of a zero output.
    """
    if not isinstance(policy, BucketPolicy):
        raise TypeError(f"policy must be a BucketPolicy, got {type(policy).__name__}")
    if not (isinstance(ridge, (int, float)) and ridge >= 0):
        raise ValueError(f"ridge must be a number >= 0, got {ridge!r}")
    batches = [input_ids[i:i + batch_size] for i in range(0, len(input_ids), batch_size)] \
        if isinstance(input_ids, torch.Tensor) else list(input_ids)
    if not batches:
        raise ValueError("fit_projection needs at least one sequence of input ids")
    dev = next(model.parameters()).device
    policy._fit = {}
    try:
        with policy(model, mode="everywhere", chunk=chunk):  # hashattention.enable
            for ids in batches:
                model(input_ids=ids.to(dev), use_cache=True)
                if progress is not None:
                    progress.update(1)
        stats = policy._fit
    finally:
        policy._fit = None
    if not stats:
        raise RuntimeError("no attention call reached the policy: is the model supported?")
    layers = sorted(stats)
    xtx = torch.stack([stats[i][0] for i in layers])  # [L, H, D+1, D+1]
    xty = torch.stack([stats[i][1] for i in layers])  # [L, H, D+1, D]
    n = xtx[..., -1, -1].clamp_min(1.0)  # rows per head (the constant feature's square)
    eye = torch.eye(xtx.shape[-1], dtype=xtx.dtype)
    w = torch.linalg.solve(xtx + ridge * n[..., None, None] * eye, xty)  # [L, H, D+1, D]
    policy.projection = {li: w[i].float() for i, li in enumerate(layers)}

    # training-set errors from the sufficient statistics: sum||xW - y||^2 = tr(W'XtX W) - 2 tr(W'XtY) + sum||y||^2
    y2 = torch.stack([stats[i][2] for i in layers]).sum()
    d = xty.shape[-1]
    ident = torch.cat([torch.eye(d, dtype=xtx.dtype), torch.zeros(1, d, dtype=xtx.dtype)]).expand_as(w)

    def mse(wm):
        sq = torch.einsum("lhij,lhik,lhkj->", wm, xtx, wm) - 2 * torch.einsum("lhij,lhij->", wm, xty) + y2
        return float(sq) / float(n.sum()) / d

    return {"layers": len(layers), "rows_per_head": float(n.mean()), "mse_proj": mse(w),
            "mse_mean": mse(ident), "mse_zero": float(y2) / float(n.sum()) / d}


def _preset(cls_name: str, policy_name: str, doc: str, **preset):
    """A BucketPolicy subclass whose keyword defaults are ``preset`` (so make_policy(name, ...) builds it)."""
    def __init__(self, budget=None, per_group: bool = False, **kwargs):
        BucketPolicy.__init__(self, budget, per_group, **{**preset, **kwargs})
    return type(cls_name, (BucketPolicy,), {"__init__": __init__, "name": policy_name, "defaults": preset,
                                            "__doc__": doc, "__module__": __name__})


BucketSHA256Policy = _preset("BucketSHA256Policy", "bucket-sha256", "SHA-256 of the quantized vector.",
                             hash="sha256")
BucketBLAKE3Policy = _preset("BucketBLAKE3Policy", "bucket-blake3", "Keyed BLAKE3 of the quantized vector.",
                             hash="blake3")
BucketKeyedPolicy = _preset("BucketKeyedPolicy", "bucket-keyed",
                            "Keyed 64-bit integer hash of the quantized vector (vectorized, CPU = GPU).",
                            hash="keyed")
BucketLSHPolicy = _preset("BucketLSHPolicy", "bucket-lsh", "SimHash (random hyperplanes).", hash="lsh")
BucketHybridPolicy = _preset("BucketHybridPolicy", "bucket-hybrid",
                             "LSH coarse group (top bits) + SHA-256 final bucket.", hash="hybrid")
BucketMultiRoundPolicy = _preset("BucketMultiRoundPolicy", "bucket-multiround",
                                 "4 independent SimHash rounds, outputs averaged.", hash="lsh", rounds=4)
BucketHierPolicy = _preset("BucketHierPolicy", "bucket-hier",
                           "Hierarchical SimHash: coarse to fine until the bucket fits the heavy budget.",
                           hash="lsh", hierarchical=True)
BucketMixedPolicy = _preset("BucketMixedPolicy", "bucket-mixed",
                            "Half the query heads SimHash buckets, the rest dense.", hash="lsh",
                            bucket_fraction=0.5)

#: registry names -> classes (registered in policies/__init__.py)
BUCKET_POLICIES = {c.name: c for c in (BucketPolicy, BucketSHA256Policy, BucketBLAKE3Policy, BucketKeyedPolicy,
                                       BucketLSHPolicy, BucketHybridPolicy, BucketMultiRoundPolicy,
                                       BucketHierPolicy, BucketMixedPolicy)}


def parse_variant(name: str):
    """'bucket-lsh_b8_softmax_sw' -> (class, kwargs). Raises ValueError on an unknown part."""
    base, *parts = name.split("_")
    if base not in BUCKET_POLICIES:
        raise ValueError(f"unknown bucket policy {base!r}; available: {', '.join(BUCKET_POLICIES)}")
    kw = {}
    for p in parts:
        if p in AGGREGATIONS:
            kw["agg"] = p
        elif p == "sw":
            kw["sink_window"] = True
        elif p == "fb":
            kw["empty"] = "sink_window"
        elif p.startswith("cap") and p[3:].isdigit():
            kw["max_bucket"] = int(p[3:])
        elif p[:1] in "brcf" and p[1:].isdigit():
            key = {"b": "bits", "r": "rounds", "c": "coarse_bits", "f": "bucket_fraction"}[p[0]]
            kw[key] = int(p[1:]) / 100 if p[0] == "f" else int(p[1:])
        else:
            raise ValueError(f"unknown part {p!r} in bucket variant {name!r}")
    return BUCKET_POLICIES[base], kw

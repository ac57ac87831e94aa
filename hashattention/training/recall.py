"""Attention-level evaluation that needs no task: how well do the signatures find the truly heavy keys?

For queries at the end of a captured held-out sequence (decode-like: each sees the whole context), every
layer is scored at once (layers stacked in the batch dimension, no loop over heads):

  recall    = |hash top-k  ∩  oracle top-k| / |oracle top-k|   (heavy tokens only; sink and window are read
              by both), with the library's own selection rule (``core.selection.select``) and one selection per
              KV group (the default policy): the oracle sums the group's softmax weights, the hash policy the
              group's bit matches.
  rel_error = ||o_sparse - o_dense|| / ||o_dense|| of the attention output, per query head, averaged.
"""
from __future__ import annotations

import torch

from ..core.attention import sparse_attention
from ..core.budget import Budget
from ..core.maps import HashMaps, _StackedMLP
from ..core.selection import forced_and_candidates, select


def project_all(mlp: _StackedMLP, x: torch.Tensor, layers: slice = slice(None)) -> torch.Tensor:
    """Every layer at once: x [layers, H, N, d_in] -> [layers, H, N, d_out] (pre-sign projections);
    ``layers`` picks the maps' layers when x holds only some."""
    n = len(mlp.weights)
    for i, w in enumerate(mlp.weights):
        x = torch.matmul(x, w[layers].to(x.dtype))
        if mlp.biases is not None:
            x = x + mlp.biases[i][layers].to(x.dtype)[:, :, None, :]
        if i < n - 1:
            x = torch.nn.functional.silu(x)
    return x


def key_input(maps: HashMaps, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Keys as the key map reads them: repeated to query heads for per-query-head key maps, with log||v||
    appended for value-norm maps. k, v: [layers, Hkv, T, D]."""
    c = maps.config
    if c.key_heads != k.shape[1]:
        g = c.key_heads // k.shape[1]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    if c.value_norm:
        k = torch.cat([k, torch.log(v.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)).to(k.dtype)], -1)
    return k


def group_similarity(sq: torch.Tensor, sk: torch.Tensor, hkv: int) -> torch.Tensor:
    """sq [Ly, Hq, C, b], sk [Ly, Hkv or Hq, T, b] -> per-query-head similarity [Ly, Hkv, G, C, T]."""
    ly, hq, c, b = sq.shape
    g = hq // hkv
    sq = sq.view(ly, hkv, g, c, b)
    if sk.shape[1] == hkv:
        return torch.matmul(sq, sk.unsqueeze(2).transpose(-1, -2))
    return torch.matmul(sq, sk.view(ly, hkv, g, -1, b).transpose(-1, -2))


@torch.no_grad()
def hash_group_scores(maps: HashMaps, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      layers: slice = slice(None)) -> torch.Tensor:
    """Integer bit matches summed over each KV group: q [Ly, Hq, C, D], k/v [Ly, Hkv, T, D] -> int64
    [Ly, Hkv, C, T] in 0..bits*G (the hash policy's per-group score)."""
    dt = maps.q.weights[0].dtype
    sq = torch.sign(project_all(maps.q, q.to(dt), layers).float())
    sk = torch.sign(project_all(maps.k, key_input(maps, k, v).to(dt), layers).float())
    sq[sq == 0] = -1  # pack_signs reads 0 as bit 0, i.e. -1
    sk[sk == 0] = -1
    dot = group_similarity(sq, sk, k.shape[1])  # exact integers in fp32 (|dot| <= bits)
    return ((dot + maps.config.bits) / 2).sum(2).round().to(torch.int64)


@torch.no_grad()
def evaluate_layers(maps_by_name: dict, cap, budgets=(1 / 8, 1 / 16, 1 / 32), queries: int = 64,
                    sink: int = 128, window: int = 128, layer_block: int = 10) -> dict:
    """Recall and output error per layer for each named maps (plus the oracle's own output error).

    cap: a :class:`~hashattention.training.capture.Capture`. Returns
    {name: {budget_str: {"recall": [per layer], "rel_error": [per layer]}}}, budget_str like "1/16".
    """
    L = cap.length
    if queries >= L:
        raise ValueError(f"{queries} queries do not fit in a {L}-token sequence")
    dev = cap.k.device
    nl, hq, _, d = cap.q.shape
    hkv = cap.k.shape[1]
    names = list(maps_by_name) + ["oracle"]
    out = {n: {_bstr(b): {"recall": [], "rel_error": []} for b in budgets} for n in names}
    for sl, q, k, v, vmask, dense, probs in _layer_blocks(cap, L - queries, layer_block):
        ly = q.shape[0]
        oracle = probs.sum(2)
        del probs
        hashed = {n: hash_group_scores(m, q, k, v, sl) for n, m in maps_by_name.items()}
        for b in budgets:
            bud = Budget(heavy=b, sink=sink, window=window)
            forced, _, _ = forced_and_candidates(vmask, bud)
            keep_o = select(oracle, vmask, bud)
            heavy_o = keep_o & ~forced
            n_o = heavy_o.sum(-1).clamp_min(1).float()
            for n in names:
                if n == "oracle":
                    keep, rec = keep_o, torch.ones(ly, device=dev)
                else:
                    c = maps_by_name[n].config
                    keep = select(hashed[n], vmask, bud, max_score=c.bits * (hq // hkv))
                    rec = ((keep & heavy_o).sum(-1).float() / n_o).mean((1, 2))
                o = sparse_attention(q, k, v, keep, cap.scale)
                err = ((o - dense).norm(dim=-1) / dense.norm(dim=-1).clamp_min(1e-6)).mean((1, 2))
                out[n][_bstr(b)]["recall"] += rec.tolist()
                out[n][_bstr(b)]["rel_error"] += err.tolist()
    return out


def _layer_blocks(cap, qstart: int, layer_block: int):
    """Blocks of layers (they bound the memory; heads are never looped) of the captured attention for the
    queries at ``qstart..L-1``: yields (layers slice, q [Ly, Hq, C, D], k, v [Ly, Hkv, T, D] fp32, the causal
    mask [Ly, 1, C, T], the dense output [Ly, Hq, C, D] and the probabilities [Ly, Hkv, G, C, T])."""
    L, nl, hkv = cap.length, cap.q.shape[0], cap.k.shape[1]
    qpos = torch.arange(qstart, L, device=cap.k.device)
    valid = torch.arange(L, device=cap.k.device)[None, :] <= qpos[:, None]  # [C, T]
    for l0 in range(0, nl, layer_block):
        sl = slice(l0, min(nl, l0 + layer_block))
        q = cap.q[sl, :, qstart:].float()
        k, v = cap.k[sl].float(), cap.v[sl].float()
        vmask = valid.expand(q.shape[0], 1, L - qstart, L)
        logits = group_similarity(q, k, hkv) * cap.scale  # [Ly, Hkv, G, C, T]
        probs = torch.softmax(logits.masked_fill(~valid, float("-inf")), -1)
        yield sl, q, k, v, vmask, sparse_attention(q, k, v, vmask, cap.scale), probs


def _bstr(b) -> str:
    if isinstance(b, float) and b < 1 and abs(1 / b - round(1 / b)) < 1e-9:
        return f"1/{round(1 / b)}"
    return str(b)


def merge_runs(runs: list[dict]) -> dict:
    """Average per-layer numbers over several sequences (same structure as :func:`evaluate_layers`)."""
    out = {}
    for n, per_b in runs[0].items():
        out[n] = {}
        for b, m in per_b.items():
            out[n][b] = {key: [sum(r[n][b][key][i] for r in runs) / len(runs) for i in range(len(m[key]))]
                         for key in m}
    return out


def table(result: dict, groups: int = 3) -> str:
    """Markdown table: recall and relative error per layer group, every maps and budget."""
    names = list(result)
    budgets = list(result[names[0]])
    nl = len(result[names[0]][budgets[0]]["recall"])
    size = -(-nl // groups)
    spans = [(s, min(nl, s + size)) for s in range(0, nl, size)] + [(0, nl)]
    head = "| maps | budget | " + " | ".join("all layers" if (a, b) == (0, nl) else f"layer {a}" if b - a == 1
                                            else f"layers {a}-{b - 1}" for a, b in spans) + " |"
    lines = [head, "|" + "---|" * (2 + len(spans))]
    for key, label in (("recall", "recall"), ("rel_error", "rel. error")):
        for n in names:
            if key == "recall" and n == "oracle":
                continue
            for b in budgets:
                vals = result[n][b][key]
                cells = [f"{sum(vals[a:c]) / (c - a):.3f}" for a, c in spans]
                lines.append(f"| {n} ({label}) | {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


SOFT_LEVELS = 2  # query weights per bit quantized to -2..2 ("qsoft" selections)


@torch.no_grad()
def evaluate_selections(maps: HashMaps, cap, qstart: int, budgets=(1 / 32, 1 / 64),
                        selections=("sum", "max", "union", "head"), sink: int = 128, window: int = 128,
                        layer_block: int = 10, top_p=(), cap_heavy=1 / 16, min_share=()) -> dict:
    """How much of each query head's true attention the tokens read hold, per group selection.

    The queries are positions ``qstart..L-1`` of the captured sequence (a suite prompt's question: the
    context mode's sparse queries). For each budget and selection (HashAttentionPolicy.selection, with
    ``maps``; "oracle" = the group's summed softmax weights, "oracle-head" = each head's own weights) returns
    {"mass": mean over layers, heads and queries of the attention weight on the tokens read,
     "heavy_mass": the same over the heavy candidates only (sink and window are read by every selection),
     "top1": how often a query head's heaviest candidate key is read (what retrieval needs),
     "rel_error": mean relative error of the attention output, "read": mean rows read per KV head and query
     (union and head selections read more than the budget's count per KV head; see the module docstring)}.
    ``top_p`` (target masses): also the adaptive budget under a cap of ``cap_heavy`` (keys "sum-p0.9@1/16" for
    each selection of ``selections`` that ``maps.calibrations`` calibrates, and "oracle-p0.9@1/16", the same
    rule on the true weights); ``min_share``: the min-share rule likewise ("sum-s0.002@1/16", "oracle-s0.002@1/16").
    """
    L = cap.length
    if not 0 < qstart < L:
        raise ValueError(f"query start {qstart} is outside the sequence of {L} tokens")
    nl, hq, _, d = cap.q.shape
    hkv = cap.k.shape[1]
    g = hq // hkv
    nq = L - qstart
    names = list(selections) + ["oracle", "oracle-head"]
    adaptive = [s for s in selections if s in getattr(maps, "calibrations", {})] + ["oracle"]
    if (top_p or min_share) and adaptive == ["oracle"]:
        raise ValueError(f"no calibration of these maps for {', '.join(selections)}: run `hashattention calibrate`")
    rules = [("top_p", p) for p in top_p] + [("min_share", x) for x in min_share]
    runs = [(n, b, None) for n in names for b in budgets] + [(n, cap_heavy, r) for n in adaptive for r in rules]
    label = lambda n, b, r: (n, _bstr(b)) if r is None else (f"{n}-{'p' if r[0] == 'top_p' else 's'}{r[1]:g}", _bstr(b))  # noqa: E731
    acc = {label(*r): {"mass": 0.0, "heavy_mass": 0.0, "top1": 0.0, "rel_error": 0.0, "read": 0.0} for r in runs}
    bits = maps.config.bits
    for sl, q, k, v, vmask, dense, probs in _layer_blocks(cap, qstart, layer_block):
        ly = q.shape[0]
        dt = maps.q.weights[0].dtype
        pre = project_all(maps.q, q.to(dt), sl).float()
        sq = torch.sign(pre)
        pre_k = project_all(maps.k, key_input(maps, k, v).to(dt), sl).float()
        sk = torch.sign(pre_k)
        sq[sq == 0] = -1
        sk[sk == 0] = -1
        match = ((group_similarity(sq, sk, hkv) + bits) / 2).round().to(torch.int64)  # [Ly, Hkv, G, C, T]
        per_head = match.flatten(1, 2)  # [Ly, Hq, C, T]
        pq = torch.tanh(pre)  # the query side soft, the keys' bits
        soft = group_similarity(pq, sk, hkv)  # [Ly, Hkv, G, C, T]
        lv = SOFT_LEVELS
        quant = group_similarity(torch.round(pq * lv), sk, hkv).round()  # integer weights in -lv..lv per bit
        # both sides relaxed: the score the training loss ranks by (diagnostic)
        both = group_similarity(pq, torch.tanh(pre_k), hkv) if "tanh-sum" in selections else None
        _, cand, _ = forced_and_candidates(vmask, Budget(sink=sink, window=window))  # [Ly, 1, C, T]
        pc = probs * cand.unsqueeze(2)  # candidates' weights [Ly, Hkv, G, C, T] (the same for every budget)
        cand_mass = pc.sum(-1).clamp_min(1e-12)
        top1 = pc.argmax(-1, keepdim=True)
        for b, p in dict.fromkeys((b, p) for _, b, p in runs):
            bud = Budget(heavy=b, sink=sink, window=window, **dict([p] if p is not None else []))
            cal = lambda s: maps.calibrations[s].log_weight[sl].to(cap.k.device)  # noqa: E731  [Ly, Hs, S + 1]
            wts = lambda s: torch.exp(cal(s) - cal(s).amax(-1, keepdim=True))[:, :, None, :]  # noqa: E731
            keeps = {
                "sum": lambda: select(match.sum(2), vmask, bud, max_score=bits * g,
                                      weights=wts("sum") if p is not None else None),
                "max": lambda: select(match.amax(2), vmask, bud, max_score=bits,
                                      weights=wts("max") if p is not None else None),
                "union": lambda: select(per_head, vmask, bud, max_score=bits, union=g),
                "head": lambda: select(per_head, vmask, bud, max_score=bits,
                                       weights=wts("head") if p is not None else None),
                "soft-sum": lambda: select(soft.sum(2), vmask, bud),
                "soft-head": lambda: select(soft.flatten(1, 2), vmask, bud),
                "tanh-sum": lambda: select(both.sum(2), vmask, bud),
                "qsoft-sum": lambda: select((quant.sum(2) + bits * lv * g).to(torch.int64), vmask, bud,
                                            max_score=2 * bits * lv * g),
                "oracle": lambda: select(probs.sum(2), vmask, bud, scores_are_mass=True),
                "oracle-head": lambda: select(probs.flatten(1, 2), vmask, bud),
            }
            for n in [n for n, rb, rp in runs if (rb, rp) == (b, p)]:
                keep = keeps[n]()  # [Ly, Hkv or Hq, C, T]
                kh = keep.view(ly, hkv, g, nq, L) if keep.shape[1] == hq else keep.unsqueeze(2)
                mass = (probs * kh).sum(-1).mean()
                heavy_mass = ((pc * kh).sum(-1) / cand_mass).mean()
                hit = torch.gather(kh.expand_as(pc), -1, top1).float().mean()
                read = keep.view(ly, hkv, -1, nq, L).any(2).sum(-1).float().mean()  # rows per KV head
                o = sparse_attention(q, k, v, keep, cap.scale)
                err = ((o - dense).norm(dim=-1) / dense.norm(dim=-1).clamp_min(1e-6)).mean()
                a = acc[label(n, b, p)]
                a["mass"] += float(mass) * ly / nl
                a["heavy_mass"] += float(heavy_mass) * ly / nl
                a["top1"] += float(hit) * ly / nl
                a["rel_error"] += float(err) * ly / nl
                a["read"] += float(read) * ly / nl
    return {f"{n}@{b}": v for (n, b), v in acc.items()}

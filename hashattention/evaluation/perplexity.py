"""Perplexity of long held-out text with a policy active (sparse everywhere: every query reads only its
selected tokens, the prompt in chunks), so that quality loss shows where a task saturates.

Texts are windows of ``length`` tokens over the concatenated held-out pydoc pages
(:mod:`hashattention.evaluation.heldout`, never training text). The loss is counted on the positions from
``start`` on (default 1024): earlier queries read nearly everything under any budget. The rows, the
per-token loss and the perplexity are here; :func:`hashattention.evaluation.runner.perplexity` runs them.
"""
from __future__ import annotations

import math

import torch


def perplexity_rows(tok, n: int, length: int, seed: int = 0) -> list:
    """``n`` token rows of exactly ``length`` tokens, from evenly spaced offsets of the held-out text."""
    import random

    from .heldout import heldout_documents
    from .ruler import encode
    text = "\n\n".join(t for _, t in heldout_documents())
    ids = encode(tok, text)
    if len(ids) < length + n:
        raise ValueError(f"the held-out text has {len(ids)} tokens, too few for {n} rows of {length}")
    rng = random.Random(seed * 7919 + length)
    span = (len(ids) - length) // max(n, 1)  # rows start in disjoint spans (they overlap if the text is short)
    starts = [i * span + (rng.randrange(span - length + 1) if span >= length else 0) for i in range(n)]
    return [ids[s:s + length] for s in starts]


def token_nll(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> tuple:
    """Summed negative log-likelihood and token count. logits [N, L, V], targets [N, L] int64,
    weight [N, L] bool (which positions count). Returns (nll [N] fp64, count [N] int64)."""
    lp = torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    w = weight.to(lp.dtype)
    return (-(lp * w).sum(-1)).double(), weight.sum(-1)


def ppl(nll: float, count: int) -> float:
    return math.exp(nll / count) if count else float("nan")

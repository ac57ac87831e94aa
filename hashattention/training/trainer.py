"""Training the maps online while a frozen model reads long text (the paper's recipe, all layers at once).

For each training sequence the model runs once (chunked prefill, :mod:`.capture`); then query blocks of
``qchunk`` consecutive positions are trained in order, each against all keys before it, every layer and
head in one batched computation:

  target  = top-``topk`` keys among the candidates (not sink, not window) by the attention weight
            (``score="weight"``) or weight x ||v|| (``score="weight_vnorm"``, the paper's Lemma 4.2), either per
            query head (``target="head"``, the paper) or per KV group (``target="group"``: the group's summed
            weights, matching the default per-group selection);
  predict = sigmoid(<tanh(phi_q(q)), tanh(phi_k(k))> - threshold)  (for "group" the group's mean similarity);
  loss    = binary cross-entropy over the candidates, class-1 weight alpha + beta * context length;
            with ``query_weight="mass"`` each query counts by the attention weight its candidates hold (a query
            that reads only sink and window has no heavy keys to find, and its top-k labels are noise).
``relax="ste"``: the similarity is the hard signatures' (what the selection ranks by), with tanh's gradient.
``lr_decay="cosine"``: the learning rate falls to 0 over the run (its steps, or ``max_seconds`` when sooner).
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..core.maps import HashMaps, MapsConfig
from .capture import Capture, capture, check_capturable
from .recall import evaluate_layers, group_similarity, key_input, project_all

TARGETS = ("group", "head")
SCORES = ("weight", "weight_vnorm")
QUERY_WEIGHTS = ("uniform", "mass")
RELAXES = ("tanh", "ste")
LR_DECAYS = ("none", "cosine")


@dataclass
class TrainConfig:
    context: int = 8192
    qchunk: int = 256  # queries per step
    topk: int = 32  # positives per query (the paper's top-32)
    target: str = "group"
    score: str = "weight"
    alpha: float = 20.0
    beta: float = 0.0
    threshold: float = 0.0
    lr: float = 1e-3
    sink: int = 128
    window: int = 128
    prefill_chunk: int = 1024
    max_seconds: float | None = None
    eval_every: int = 50  # steps between held-out recall checks
    save_every: int = 10  # sequences between checkpoints
    seed: int = 0
    # mixed lengths: sequence i (of ``context`` tokens) is cut into pieces of lengths[i % len(lengths)] tokens,
    # each prefilled from position 0 (the maps learn short-context positions too); () = whole sequences
    lengths: tuple = ()
    query_weight: str = "uniform"  # "mass": a query's loss weighted by its candidates' attention weight
    lr_decay: str = "none"  # "cosine": to 0 over the run
    layers: tuple = ()  # train only these layers' maps (the others stay as they start: from ``init``); () = all
    relax: str = "tanh"  # the sign's relaxation: "tanh", or "ste" (the sign forward, tanh's gradient back)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
        if self.query_weight not in QUERY_WEIGHTS:
            raise ValueError(f"query_weight must be one of {QUERY_WEIGHTS}, got {self.query_weight!r}")
        if self.relax not in RELAXES:
            raise ValueError(f"relax must be one of {RELAXES}, got {self.relax!r}")
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"lr_decay must be one of {LR_DECAYS}, got {self.lr_decay!r}")
        for n in ("context", "qchunk", "topk", "prefill_chunk"):
            if getattr(self, n) <= 0:
                raise ValueError(f"{n} must be positive, got {getattr(self, n)}")
        if self.context < self.first_query + 1:
            raise ValueError(f"context {self.context} is too short: queries start after sink {self.sink} + window "
                             f"{self.window} + top-k {self.topk} tokens")
        self.layers = tuple(int(i) for i in self.layers)
        if len(set(self.layers)) != len(self.layers) or any(i < 0 for i in self.layers):
            raise ValueError(f"layers must be distinct layer indices, got {list(self.layers)}")
        self.lengths = tuple(int(n) for n in self.lengths)
        for n in self.lengths:
            if not self.first_query < n <= self.context:
                raise ValueError(f"training length {n} must be longer than sink {self.sink} + window {self.window} "
                                 f"+ top-k {self.topk} ({self.first_query} tokens) and at most the context "
                                 f"{self.context}")

    def pieces(self, i: int, seq: torch.Tensor) -> list:
        """Sequence number ``i`` [1, context] as the sequences trained on: whole, or cut into pieces of this
        sequence's length (``lengths`` taken in turn; a remainder shorter than it is left out)."""
        n = self.lengths[i % len(self.lengths)] if self.lengths else seq.shape[1]
        return [seq[:, j:j + n] for j in range(0, seq.shape[1] - n + 1, n)]

    @property
    def first_query(self) -> int:
        """First position with at least ``topk`` candidate keys."""
        return self.sink + self.window + self.topk - 1


@torch.no_grad()
def targets(cap: Capture, s: int, e: int, tc: TrainConfig):
    """Labels and candidate mask for queries s..e-1 against keys 0..e-1, all layers.

    Returns labels bool [Ly, Hkv, C, T] ("group") or [Ly, Hkv, G, C, T] ("head"), candidates bool [C, T] and
    the candidates' attention weight per query, the shape of labels without T (the group's mean for "group").
    """
    q = cap.q[:, :, s:e].float()
    k, v = cap.k[:, :, :e].float(), cap.v[:, :, :e].float()
    hkv = k.shape[1]
    dev = q.device
    qpos = torch.arange(s, e, device=dev)[:, None]
    kpos = torch.arange(e, device=dev)[None, :]
    causal = kpos <= qpos
    cand = (kpos >= tc.sink) & (kpos <= qpos - tc.window)
    logits = group_similarity(q, k, hkv) * cap.scale  # [Ly, Hkv, G, C, T]
    w = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)
    del logits
    mass = (w * cand).sum(-1)  # [Ly, Hkv, G, C]: each query head's weight on the candidates
    if tc.target == "group":
        mass = mass.mean(2)
    if tc.score == "weight_vnorm":
        w = w * v.norm(dim=-1)[:, :, None, None, :]
    if tc.target == "group":
        w = w.sum(2)
    w = w.masked_fill(~cand, -1.0)
    kk = min(tc.topk, int(cand.sum(-1).min()))
    idx = w.topk(kk, dim=-1).indices
    labels = torch.zeros_like(w, dtype=torch.bool).scatter_(-1, idx, True) & cand
    return labels, cand, mass


def chunk_loss(maps: HashMaps, cap: Capture, s: int, e: int, tc: TrainConfig):
    """Weighted BCE of queries s..e-1 (all layers, all heads). Returns (loss, labels, candidates)."""
    labels, cand, mass = targets(cap, s, e, tc)
    dt = maps.q.weights[0].dtype
    q = cap.q[:, :, s:e].to(dt)
    k = key_input(maps, cap.k[:, :, :e], cap.v[:, :, :e]).to(dt)
    sq = _relaxed_sign(project_all(maps.q, q), tc.relax)
    sk = _relaxed_sign(project_all(maps.k, k), tc.relax)
    sim = group_similarity(sq, sk, cap.k.shape[1]).float()  # [Ly, Hkv, G, C, T]
    if tc.target == "group":
        sim = sim.mean(2)
    pos_w = tc.alpha + tc.beta * torch.arange(s + 1, e + 1, device=sim.device, dtype=sim.dtype)[:, None]
    bce = F.binary_cross_entropy_with_logits(sim - tc.threshold, labels.to(sim.dtype), reduction="none")
    weight = torch.where(labels, pos_w, torch.ones_like(pos_w))
    per_query = (bce * weight).masked_fill(~cand, 0.0).sum(-1)  # [..., C]
    if tc.query_weight == "mass":
        qw = mass.float()
        loss = (per_query * qw).sum() / (qw * cand.sum(-1)).sum().clamp_min(1e-12)
    else:
        loss = per_query.sum() / (cand.sum() * (sim.numel() // cand.numel()))
    return loss, labels, cand


def _relaxed_sign(x: torch.Tensor, relax: str) -> torch.Tensor:
    """tanh(x); with "ste" the forward value is the sign the selection uses (0 read as -1, as pack_signs does)."""
    t = torch.tanh(x)
    if relax == "ste":
        return t + (torch.where(x > 0, 1.0, -1.0).to(t.dtype) - t).detach()
    return t


def _cosine(state: dict, total_steps: int, max_seconds: float | None, elapsed: float) -> float:
    """Learning-rate factor: cosine from 1 to 0 over the run's steps, or over max_seconds when that ends sooner."""
    done = state["step"] / max(total_steps, 1)
    if max_seconds:
        done = max(done, elapsed / max_seconds)
    return 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))


def _steps_of(length: int, tc: TrainConfig, start: int = 0) -> list[tuple[int, int]]:
    """Query blocks of a sequence of ``length`` tokens from ``start`` (never before the first trainable query)."""
    return [(s, min(s + tc.qchunk, length)) for s in range(max(start, tc.first_query), length, tc.qchunk)]


def train(model, seqs: torch.Tensor, maps_config: MapsConfig, tc: TrainConfig, heldout: torch.Tensor | None = None,
          checkpoint: str | None = None, resume: bool = False, progress: bool = True, log=print,
          init: HashMaps | None = None, questions: list | None = None) -> HashMaps:
    """Train maps on ``seqs`` [N, context] token ids with the frozen ``model``. Returns fp32 maps (on CPU),
    with the training facts in ``config.extra``.

    heldout: token ids [1, L] for the periodic held-out recall (at 1/16, per-group selection).
    checkpoint: file for resumable state (written every ``save_every`` sequences and at the end).
    init: maps of the same shape to start from (longer training of a shipped file: a fresh optimizer).
    ``tc.layers``: only those layers' maps train (and only their targets are computed); the others keep
    ``init``'s, which is then required.
    questions: retrieval prompts [(ids [1, L], qstart)] (:mod:`.questions`), spread evenly between the
    sequences; only their queries from ``qstart`` on (the question and the answer) are trained.
    """
    check_capturable(model, seqs.shape[1])
    dev = next(model.parameters()).device
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(tc.seed)
    maps = HashMaps(copy.deepcopy(maps_config)).to(dev)  # its facts are written into config.extra
    if init is not None:
        same = {k: v for k, v in init.config.to_dict().items() if k != "extra"}
        if same != {k: v for k, v in maps_config.to_dict().items() if k != "extra"}:
            raise ValueError("the maps to start from (--init) have another shape than the maps to train: "
                             f"{same} vs {maps_config.to_dict()}")
        maps.load_state_dict({k: v.float() for k, v in init.state_dict().items()})
    sub = list(tc.layers)
    if sub and init is None:
        raise ValueError("training only some layers keeps the others' maps as they start: give the maps to start "
                         "from (--init)")
    full, maps = maps, (maps.take_layers(sub) if sub else maps)  # ``maps``: what trains
    opt = torch.optim.Adam(maps.parameters(), lr=tc.lr)
    questions = list(questions or [])
    n_seq = seqs.shape[0]
    after = [questions[len(questions) * i // n_seq:len(questions) * (i + 1) // n_seq] for i in range(n_seq)]
    total_steps = sum(len(_steps_of(p.shape[1], tc)) for i in range(n_seq) for p in tc.pieces(i, seqs[i:i + 1])) \
        + sum(len(_steps_of(ids.shape[1], tc, qs)) for ids, qs in questions)
    state = {"seq": 0, "step": 0, "tokens": 0, "seconds": 0.0, "loss": float("nan"), "recall": float("nan")}
    if resume and checkpoint and os.path.isfile(checkpoint):
        ck = torch.load(checkpoint, map_location=dev, weights_only=True)
        if ck["maps_config"] != {k: v for k, v in maps_config.to_dict().items() if k != "extra"} \
                or ck.get("layers", []) != sub:
            raise ValueError(f"checkpoint {checkpoint} was written for other maps settings; remove it or drop --resume")
        maps.load_state_dict(ck["maps"])
        opt.load_state_dict(ck["opt"])
        state.update(ck["state"])
        log(f"resumed from {checkpoint}: sequence {state['seq']}, step {state['step']}")

    def save_ckpt():
        if checkpoint:
            os.makedirs(os.path.dirname(os.path.abspath(checkpoint)), exist_ok=True)
            tmp = checkpoint + ".tmp"
            torch.save({"maps": maps.state_dict(), "opt": opt.state_dict(), "state": dict(state), "layers": sub,
                        "maps_config": {k: v for k, v in maps_config.to_dict().items() if k != "extra"}}, tmp)
            os.replace(tmp, checkpoint)

    held_all = capture(model, heldout.to(dev), tc.prefill_chunk) if heldout is not None else None
    held = held_all.take_layers(sub) if held_all is not None and sub else held_all
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=seqs.shape[0] * seqs.shape[1], initial=state["tokens"], unit="tok", dynamic_ncols=True)
    t0 = time.perf_counter() - state["seconds"]
    stopped = False
    try:
        for i in range(state["seq"], seqs.shape[0]):
            work = [(p, _steps_of(p.shape[1], tc)) for p in tc.pieces(i, seqs[i:i + 1])] \
                + [(ids, _steps_of(ids.shape[1], tc, qs)) for ids, qs in after[i]]
            for piece, steps in work:
                cap = capture(model, piece.to(dev), tc.prefill_chunk)
                if sub:
                    cap = cap.take_layers(sub)
                for s, e in steps:
                    if tc.lr_decay == "cosine":
                        for grp in opt.param_groups:
                            grp["lr"] = tc.lr * _cosine(state, total_steps, tc.max_seconds, time.perf_counter() - t0)
                    loss, _, _ = chunk_loss(maps, cap, s, e, tc)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    state["step"] += 1
                    lv = float(loss.detach())
                    state["loss"] = 0.9 * state["loss"] + 0.1 * lv if math.isfinite(state["loss"]) else lv
                    if held is not None and state["step"] % tc.eval_every == 0:
                        state["recall"] = heldout_recall(maps, held, tc)
                    if bar is not None:
                        bar.set_postfix(loss=f"{state['loss']:.3f}", recall16=f"{state['recall']:.3f}",
                                        refresh=False)
                del cap
            state["seq"] = i + 1
            state["tokens"] += seqs.shape[1]
            state["seconds"] = time.perf_counter() - t0
            if bar is not None:
                bar.update(seqs.shape[1])
            if checkpoint and state["seq"] % tc.save_every == 0:
                save_ckpt()
            if tc.max_seconds is not None and state["seconds"] >= tc.max_seconds:
                stopped = True
                break
    except KeyboardInterrupt:  # Ctrl-C: keep what was learned; a resumed run redoes the interrupted sequence
        if bar is not None:
            bar.close()
        state["seconds"] = time.perf_counter() - t0
        save_ckpt()
        if checkpoint:
            log(f"interrupted: checkpoint {checkpoint} saved at sequence {state['seq']} (continue with --resume)")
        raise
    if bar is not None:
        bar.close()
    save_ckpt()
    if sub:
        full.put_layers(sub, maps)
        maps = full
    if held_all is not None:  # every layer's, also when only some trained
        state["recall"] = heldout_recall(maps, held_all, tc)
    maps = maps.cpu()
    maps.config.extra = {**maps.config.extra, **tc.extra, "kind": "learned", "target": tc.target,
                         "score": tc.score, "topk": tc.topk, "alpha": tc.alpha, "beta": tc.beta,
                         "threshold": tc.threshold, "lr": tc.lr, "optimizer": "Adam", "context": tc.context,
                         "qchunk": tc.qchunk, "sink": tc.sink, "window": tc.window,
                         **({"lengths": list(tc.lengths)} if tc.lengths else {}),
                         **({"query_weight": tc.query_weight} if tc.query_weight != "uniform" else {}),
                         **({"lr_decay": tc.lr_decay} if tc.lr_decay != "none" else {}),
                         **({"relax": tc.relax} if tc.relax != "tanh" else {}),
                         **({"trained_layers": sub} if sub else {}),
                         **({"question_prompts": len(questions)} if questions else {}),
                         "sequences": state["seq"], "tokens": state["tokens"], "steps": state["step"],
                         "seconds": round(state["seconds"], 1), "final_loss": round(state["loss"], 4),
                         "heldout_recall_1_16": round(state["recall"], 4), "stopped_by_time": stopped,
                         "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                         "torch": torch.__version__}
    return maps


@torch.no_grad()
def heldout_recall(maps: HashMaps, held: Capture, tc: TrainConfig, queries: int = 32) -> float:
    """Mean over layers of the per-group oracle top-k recall at a 1/16 heavy budget on the held-out capture."""
    r = evaluate_layers({"m": maps}, held, budgets=(1 / 16,), queries=min(queries, held.length - 1),
                        sink=tc.sink, window=tc.window)
    vals = r["m"]["1/16"]["recall"]
    return sum(vals) / len(vals)

"""Suite runner: every task x policy x budget x length, in both settings, resumable, with a table and a plot.

Settings (``modes``):
  - ``everywhere``: every query is sparse, the prompt is prefilled in chunks of ``chunk`` queries (one
    model call per chunk, so a chunk's queries only see the keys before them), then greedy decoding.
  - ``decode``: the prompt minus its last token is prefilled once with dense attention and shared by all
    policies (the cache is cropped back after each); the last prompt token is the first sparse query, so
    every answer token comes from sparse attention.
  - ``context``: the authors' sparse-attention-hub protocol. The context (the prompt before the question)
    is prefilled densely, once for all policies; the question and every answer token are sparse.

Work is batched: all tasks' prompts of one length and one round (``round_size`` samples per task) run as
one left-padded batch per policy; perplexity rows ride in the same batch. Results go to a JSON file after
every (policy, budget) unit, keyed ``mode|policy|budget|length|task|index``; a rerun skips what is there.
Aggregates use, for each (mode, length, task), only the sample indices every policy finished, so a run cut
short by ``time_limit`` is still compared on equal prompts.
"""
from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path

import torch

from ..core.budget import Budget, parse_adaptive, parse_label
from ..integration.compat import cache_kwarg, output_cache
from ..integration.hf import enable
from . import ruler
from .fastpath import accelerate as _accelerate
from .perplexity import perplexity_rows, ppl, token_nll
from .quality import markdown as quality_markdown, quality_rows

POLICY_ORDER = ["dense", "oracle", "hash", "simhash", "sink_window", "quest", "h2o", "random"]
DEFAULT_BUDGETS = ["1/4", "1/8", "1/16", "1/32"]
MODES = ("everywhere", "decode", "context")
DENSE_BUDGET = "full"
PREFILL_CHUNK = 2048  # queries per call of the shared dense prefill
MODE_TITLES = {"everywhere": "everywhere (chunked prefill + decode)", "decode": "decoding only (dense prefill)",
               "context": "question and answer (dense context prefill: the authors' sparse-attention-hub protocol)"}
PPL_TASK = "ppl"
#: fields of the settings that must match for a results file to be resumed
RESUME_KEYS = ("model", "seed", "sink", "window", "chunk", "page_size", "heldout_sha256", "max_new",
               "ppl_from", "ppl_length", "dtype", "selection")
#: settings added after results files were first written: their value when a file lacks them
RESUME_DEFAULTS = {"selection": "per KV group"}


# ---------------------------------------------------------------------------------------------- batches
def _left_pad(rows: list, pad: int, device):
    p = max(len(r) for r in rows)
    ids = torch.full((len(rows), p), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), p), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, p - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, p - len(r):] = 1
    return ids.to(device), mask.to(device)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp_min(0)


def _decode_loop(model, tok, cache, first: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                 max_new: list, answers: list | None, first_is_prompt: bool):
    """Greedy decoding. ``first`` [B, 1]: the next input (a prompt token when ``first_is_prompt``, else the
    first generated token). Returns the generated ids per row. A row stops at EOS, at its ``max_new``, or
    once every expected answer string is in its text (more tokens cannot change its score)."""
    b = first.shape[0]
    dev = first.device
    eos = {int(t) for t in ([tok.eos_token_id] if not isinstance(tok.eos_token_id, list) else tok.eos_token_id)
           if t is not None}
    out = [[] for _ in range(b)]
    done = [m <= 0 for m in max_new]
    cur, cur_pos = first, pos
    if not first_is_prompt:
        _append(out, done, cur, max_new, eos, tok, answers)
    while not all(done):
        mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=dev)], -1)
        res = model(input_ids=cur, attention_mask=mask, position_ids=cur_pos, **{cache_kwarg(model): cache},
                    use_cache=True, logits_to_keep=1)
        cur = res.logits[:, -1].argmax(-1, keepdim=True)
        cur_pos = cur_pos + 1
        _append(out, done, cur, max_new, eos, tok, answers)
    return out


def _append(out, done, cur, max_new, eos, tok, answers):
    toks = cur[:, 0].tolist()
    for i, t in enumerate(toks):
        if done[i]:
            continue
        if t in eos:
            done[i] = True
            continue
        out[i].append(t)
        if len(out[i]) >= max_new[i]:
            done[i] = True
        elif answers is not None and answers[i]:
            text = tok.decode(out[i], skip_special_tokens=True).lower()
            done[i] = all(a.lower() in text for a in answers[i])


@torch.no_grad()
def run_batch(model, policy, rows: list, max_new: list, mode: str = "everywhere", ppl: list | None = None,
              ppl_from: int = 1024, chunk: int = 128, tok=None, answers: list | None = None,
              accelerate: bool = True, shared: dict | None = None, context: list | None = None) -> dict:
    """Run one left-padded batch with ``policy`` (None = dense SDPA).

    rows: token id lists; max_new: answer tokens per row (0 for perplexity rows); ppl: bool per row, count
    its NLL (positions >= ppl_from, everywhere mode only); context (mode 'context'): tokens before the
    question per row. ``shared`` (decode and context modes): the dense prefill from :func:`dense_prefill`,
    reused by every policy. Returns {"tokens": generated ids per row, "nll", "count", "stats": tokens read
    per query (layer 0) or None}.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    dev = next(model.parameters()).device
    pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
    ppl = ppl or [False] * len(rows)
    if policy is not None and accelerate:
        policy = _accelerate(policy)
    nll = [0.0] * len(rows)
    count = [0] * len(rows)
    if mode == "decode":
        if any(ppl):
            raise ValueError("perplexity rows need mode='everywhere'")
        sh = shared if shared is not None else dense_prefill(model, rows, pad)
        cache, ids, mask = sh["cache"], sh["ids"], sh["mask"]
        pos = _positions(mask)
        handle = enable(model, policy, mode="decode") if policy is not None else None
        try:
            gen = _decode_loop(model, tok, cache, ids[:, -1:], mask[:, :-1], pos[:, -1:], max_new, answers,
                               first_is_prompt=True)
        finally:
            stats = handle.stats() if handle is not None else None
            if handle is not None:
                handle.disable()
            _crop(cache, ids.shape[1] - 1)
        return {"tokens": gen, "nll": nll, "count": count, "stats": stats}
    if mode == "context":
        if any(ppl):
            raise ValueError("perplexity rows need mode='everywhere'")
        sh = shared if shared is not None else dense_prefill(model, rows, pad, context)
        cache, ids, mask, upto = sh["cache"], sh["ids"], sh["mask"], sh["upto"]
        pos = _positions(mask)
        handle = enable(model, policy, mode="context", chunk=chunk, context_length=sh["context"]) \
            if policy is not None else None
        try:
            res = model(input_ids=ids[:, upto:], attention_mask=mask, position_ids=pos[:, upto:],
                        **{cache_kwarg(model): cache}, use_cache=True, logits_to_keep=1)
            first = res.logits[:, -1].argmax(-1, keepdim=True)
            del res
            gen = _decode_loop(model, tok, cache, first, mask, pos[:, -1:] + 1, max_new, answers,
                               first_is_prompt=False)
        finally:
            stats = handle.stats() if handle is not None else None
            if handle is not None:
                handle.disable()
            _crop(cache, upto)
        return {"tokens": gen, "nll": nll, "count": count, "stats": stats}

    ids, mask = _left_pad(rows, pad, dev)
    pos = _positions(mask)
    lens = mask.sum(-1)
    p = ids.shape[1]
    want_ppl = torch.tensor(ppl, device=dev)
    nll_t = torch.zeros(len(rows), dtype=torch.float64, device=dev)
    cnt_t = torch.zeros(len(rows), dtype=torch.int64, device=dev)
    handle = enable(model, policy, mode="everywhere", chunk=chunk) if policy is not None else None
    try:
        cache, last = None, None
        for s in range(0, p, chunk):
            e = min(p, s + chunk)
            res = model(input_ids=ids[:, s:e], attention_mask=mask[:, :e], position_ids=pos[:, s:e],
                        **{cache_kwarg(model): cache}, use_cache=True, logits_to_keep=0 if any(ppl) else 1)
            cache = output_cache(res)
            last = res.logits[:, -1]
            if any(ppl):
                sel = want_ppl.nonzero()[:, 0]
                hi = min(e, p - 1)  # targets are the next tokens
                if hi > s:
                    lg = res.logits[sel, : hi - s]
                    tgt = ids[sel, s + 1:hi + 1]
                    row_pos = pos[sel, s + 1:hi + 1]  # position of the predicted token in its row
                    w = mask[sel, s + 1:hi + 1].bool() & mask[sel, s:hi].bool() & (row_pos >= ppl_from)
                    a, c = token_nll(lg, tgt, w)
                    nll_t[sel] += a
                    cnt_t[sel] += c
            del res
        first = last.argmax(-1, keepdim=True)
        gen = _decode_loop(model, tok, cache, first, mask, pos[:, -1:] + 1, max_new, answers,
                           first_is_prompt=False) if any(m > 0 for m in max_new) else [[] for _ in rows]
        stats = handle.stats() if handle is not None else None
    finally:
        if handle is not None:
            handle.disable()
    del lens
    return {"tokens": gen, "nll": nll_t.tolist(), "count": cnt_t.tolist(), "stats": stats}


def _crop(cache, length: int):
    """Cut the cache back to ``length`` tokens (transformers changed crop's argument between versions)."""
    extra = cache.get_seq_length() - length
    if extra <= 0:
        return
    try:
        cache.crop(-extra)
    except (ValueError, TypeError):
        cache.crop(length)
    if cache.get_seq_length() != length:
        raise RuntimeError(f"could not crop the shared prefill cache to {length} tokens")


@torch.no_grad()
def dense_prefill(model, rows: list, pad: int, context: list | None = None) -> dict:
    """Dense prefill shared by the policies of a batch: every row but its last token (decode mode), or,
    given ``context`` (tokens before the question per row), the columns before the first question token of
    the left-padded batch (context mode; the rest of each row's context is dense by the handle's rule)."""
    from transformers import DynamicCache
    dev = next(model.parameters()).device
    ids, mask = _left_pad(rows, pad, dev)
    if context is None:
        upto = ids.shape[1] - 1
    else:
        if len(context) != len(rows) or any(not 0 < c < len(r) for c, r in zip(context, rows)):
            raise ValueError("each row's context must end inside its prompt (0 < context < prompt tokens)")
        upto = min(ids.shape[1] - len(r) + c for r, c in zip(rows, context))
    pos = _positions(mask)
    # a cache of full layers: a sliding-window layer's own cache (Gemma 3) drops keys and cannot be cropped back
    cache = DynamicCache()
    for s in range(0, upto, PREFILL_CHUNK):  # in chunks: the attention mask of one chunk is [B, 1, chunk, Lk]
        e = min(upto, s + PREFILL_CHUNK)
        cache = output_cache(model(input_ids=ids[:, s:e], attention_mask=mask[:, :e], position_ids=pos[:, s:e],
                                   **{cache_kwarg(model): cache}, use_cache=True, logits_to_keep=1))
    return {"cache": cache, "ids": ids, "mask": mask, "upto": upto, "context": context}


# ------------------------------------------------------------------------------------------- the suite
def budget_label(b) -> str:
    """'0.0625' -> '1/16'; '1/64+r1/64' (heavy 1/64 and a residual sample of 1/64) keeps its residual;
    'p0.90/0.0625' -> 'p0.9/1/16' (adaptive: top-p 0.9 under a cap of 1/16; 's0.002/1/16': min share)."""
    heavy, res = parse_label(b)
    rule, _ = parse_adaptive(b)
    short = lambda x: Budget(heavy=x).describe().split()[0].split("=")[1]  # noqa: E731
    pre = "".join(f"{'p' if k == 'top_p' else 's'}{v:g}/" for k, v in rule.items())
    return pre + short(heavy) + (f"+r{short(res)}" if res else "")


def budget_from_label(label: str, sink: int = 128, window: int = 128) -> Budget:
    heavy, res = parse_label(label)
    rule, _ = parse_adaptive(label)
    return Budget(heavy=heavy, sink=sink, window=window, residual=res, **rule)


def budget_fraction(label: str) -> float:
    """Heavy (+ residual) tokens as a fraction of the context; 1 for dense."""
    return 1.0 if label == DENSE_BUDGET else float(sum(parse_label(label)))


def check_policies(names, available=None) -> list:
    from ..policies import POLICIES
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    avail = list(available or POLICIES)
    if not names or names == ["all"]:
        return [p for p in POLICY_ORDER if p in avail]
    bad = [n for n in names if n not in avail]
    if bad:
        raise ValueError(f"unknown policy(ies) {', '.join(bad)}; available: {', '.join(avail)}")
    return list(dict.fromkeys(names))


def check_lengths(lengths, model) -> list:
    if isinstance(lengths, str):
        lengths = [parse_length(x) for x in lengths.split(",") if x.strip()]
    window = getattr(model.config, "max_position_embeddings", None)
    bad = [L for L in lengths if window is not None and L > window]
    if bad:
        raise ValueError(f"length(s) {', '.join(map(str, bad))} exceed the model's window of {window} tokens; "
                         f"available: lengths up to {window}")
    if not lengths or any(L < 256 for L in lengths):
        raise ValueError(f"lengths must be at least 256 tokens, got {lengths}")
    return sorted(dict.fromkeys(lengths))


def parse_length(x) -> int:
    x = str(x).strip().upper()
    try:
        return int(float(x[:-1]) * 1024) if x.endswith("K") else int(x)
    except ValueError:
        raise ValueError(f"cannot read a context length from {x!r}: use e.g. 2048 or 2K") from None


def device_name(model) -> str:
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _key(mode, policy, budget, length, task, index) -> str:
    return f"{mode}|{policy}|{budget}|{length}|{task}|{index}"


class Suite:
    """Runs the suite and keeps every number in ``self.data`` (written to ``out`` as JSON)."""

    def __init__(self, model, tok, *, tasks="all", lengths=(2048, 4096, 8192), policies="all",
                 budgets=DEFAULT_BUDGETS, samples=4, round_size=2, modes=("everywhere",),
                 decode_policies=None, decode_budgets=("1/16", "1/32"), decode_rounds=1, seed=0,
                 sink=128, window=128, chunk=128, page_size=16, maps=None, maps_path=None,
                 ppl_samples=2, ppl_from=1024, out=None, time_limit=None, progress=True, accelerate=True,
                 resources=None, log=print, per_group=True, context_budgets=None, selection=None,
                 layer_weights=None):
        from ..policies import POLICIES
        self.model, self.tok, self.log = model, tok, log
        self.tasks = ruler.check_tasks(tasks)
        self.lengths = check_lengths(lengths, model)
        self.policies = check_policies(policies, POLICIES)
        self.modes = [m for m in (modes.split(",") if isinstance(modes, str) else modes) if m]
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"unknown mode(s) {bad}; available: {', '.join(MODES)}")
        self.budgets = [budget_label(b) for b in budgets]
        self.decode_budgets = [budget_label(b) for b in decode_budgets]
        self.context_budgets = [budget_label(b) for b in (context_budgets or budgets)]
        for b in set(self.budgets + self.decode_budgets + self.context_budgets):  # before any long work
            budget_from_label(b, sink, window).check_fits(min(self.lengths))
        self.decode_policies = check_policies(decode_policies or self.policies, POLICIES)
        self.maps = maps
        needs = [p for p in self.policies + self.decode_policies if p == "hash" or p.startswith("hash-")]
        if needs and maps is None:
            log(f"policies {', '.join(dict.fromkeys(needs))} skipped: no maps (the shipped maps are not present; "
                "name a file with --maps)")
            self.policies = [p for p in self.policies if p not in needs]
            self.decode_policies = [p for p in self.decode_policies if p not in needs]
        self.samples, self.round_size, self.decode_rounds = samples, max(1, round_size), decode_rounds
        self.seed, self.sink, self.window, self.chunk, self.page_size = seed, sink, window, chunk, page_size
        self.per_group = per_group
        self.selection = "head" if not per_group and selection is None else selection
        # the heavy budget shared unevenly over the layers (core.budget.layer_budgets), checked before long work
        from ..core.budget import layer_budgets, parse_layer_weights
        self.layer_weights = parse_layer_weights(layer_weights) if layer_weights else {}
        if self.layer_weights:
            layer_budgets(Budget(), self.layer_weights, model.config.num_hidden_layers)
        for m in self.modes:  # an adaptive budget a policy cannot run (no calibration, no rule) fails now
            for p, b in self.configs(m):
                if p != "dense" and parse_adaptive(b)[0]:
                    self.make(p, b)
        self.ppl_samples, self.ppl_from = ppl_samples, ppl_from
        self.out = Path(out) if out else None
        self.time_limit, self.progress, self.accelerate = time_limit, progress, accelerate
        self.res = resources or ruler.Resources()
        self.t0 = time.perf_counter()
        from .heldout import text_digest
        import transformers
        dtype = str(next(model.parameters()).dtype).replace("torch.", "")
        self.settings = {
            "model": getattr(model.config, "_hashattention_model_id", "") or getattr(model.config, "_name_or_path", ""),
            "device": device_name(model), "dtype": dtype, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "tasks": self.tasks, "lengths": self.lengths, "policies": self.policies, "budgets": self.budgets,
            "modes": self.modes, "decode_policies": self.decode_policies, "decode_budgets": self.decode_budgets,
            "context_budgets": self.context_budgets,
            "decode_rounds": decode_rounds, "samples": samples, "round_size": self.round_size, "seed": seed,
            "sink": sink, "window": window, "chunk": chunk, "page_size": page_size,
            "ppl_samples": ppl_samples, "ppl_from": ppl_from, "ppl_length": "each length",
            "max_new": {t: ruler.TASKS[t].max_new for t in self.tasks},
            "maps": str(maps_path) if maps_path else None,
            "heldout_sha256": text_digest(), "accelerated_path": accelerate,
            "selection": {None: "per KV group", "sum": "per KV group", "head": "per query head"}.get(
                self.selection, f"per KV group ({self.selection})"),
            "scoring": "RULER string match: % of expected strings in the greedy answer",
        }
        if self.layer_weights:  # not a resume key: a pass seeds its file with the dense records of another
            self.settings["layer_weights"] = {str(k): v for k, v in self.layer_weights.items()}
        self.data = {"settings": self.settings, "records": {}, "stats": {}, "timing": {}}
        if self.out and self.out.is_file():
            self._resume()

    # -- persistence --------------------------------------------------------------------------------
    def _resume(self):
        old = json.loads(self.out.read_text())
        prev = old.get("settings", {})
        diff = [k for k in RESUME_KEYS if prev.get(k, RESUME_DEFAULTS.get(k)) != self.settings.get(k)]
        if diff:
            raise ValueError(f"{self.out} was written with other settings ({', '.join(diff)} differ): "
                             "use another --out or delete it")
        self.data["records"] = old.get("records", {})
        self.data["stats"] = old.get("stats", {})
        self.data["timing"] = old.get("timing", {})
        self.log(f"resuming {self.out}: {len(self.data['records'])} results already there")

    def save(self):
        if not self.out:
            return
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=False))
        os.replace(tmp, self.out)

    def _out_of_time(self) -> bool:
        return self.time_limit is not None and time.perf_counter() - self.t0 > self.time_limit

    # -- policies -----------------------------------------------------------------------------------
    def make(self, name: str, budget: str):
        from ..policies import make_policy
        if name == "dense":
            return None
        b = budget_from_label(budget, self.sink, self.window)
        kw = {"page_size": self.page_size} if name == "quest" else {}
        if name in ("hash", "simhash") and self.selection:
            kw["selection"] = self.selection
        pol = make_policy(name, b, maps=self.maps, model_config=self.model.config, per_group=self.per_group, **kw)
        return pol.set_layer_weights(self.layer_weights, self.model.config.num_hidden_layers)

    def configs(self, mode: str) -> list:
        pols = self.decode_policies if mode == "decode" else self.policies
        buds = {"everywhere": self.budgets, "decode": self.decode_budgets, "context": self.context_budgets}[mode]
        out = [("dense", DENSE_BUDGET)] if "dense" in pols else []
        return out + [(p, b) for b in buds for p in pols if p != "dense"]

    # -- running ------------------------------------------------------------------------------------
    def run(self):
        from tqdm.auto import tqdm
        rounds = math.ceil(self.samples / self.round_size)
        units = sum(len(self.lengths) * len(self.configs(m)) * (rounds if m != "decode"
                    else min(rounds, self.decode_rounds)) for m in self.modes)
        bar = tqdm(total=units, disable=not self.progress, desc="eval", unit="batch", dynamic_ncols=True)
        stopped = False
        for r in range(rounds):
            idx = list(range(r * self.round_size, min(self.samples, (r + 1) * self.round_size)))
            for L in self.lengths:
                samples = [ruler.make_sample(self.tok, t, L, i, self.seed, self.res) for t in self.tasks for i in idx]
                prows = perplexity_rows(self.tok, self.ppl_samples, L, self.seed) if r == 0 and self.ppl_samples else []
                for mode in self.modes:
                    if mode == "decode" and r >= self.decode_rounds:
                        continue
                    shared = None
                    for pol, bud in self.configs(mode):
                        bar.set_postfix_str(f"round {r} {L} {mode} {pol} {bud}")
                        if self._out_of_time():
                            stopped = True
                            break
                        todo = [s for s in samples if _key(mode, pol, bud, L, s.task, s.index) not in self.data["records"]]
                        pt = [i for i in range(len(prows)) if mode == "everywhere"
                              and _key(mode, pol, bud, L, PPL_TASK, i) not in self.data["records"]]
                        if todo or pt:
                            if mode != "everywhere" and shared is None:
                                shared = dense_prefill(self.model, [s.ids for s in samples], self._pad(),
                                                       [s.context_len for s in samples] if mode == "context"
                                                       else None)
                            self._unit(mode, pol, bud, L, todo if mode == "everywhere" else samples,
                                       [prows[i] for i in pt], pt, shared)
                        bar.update(1)
                    del shared
                    if stopped:
                        break
                if stopped:
                    break
            self.report()
            if stopped:
                self.log(f"time limit of {self.time_limit} s reached: stopping after {len(self.data['records'])} results")
                break
        bar.close()
        self.data["timing"]["total_s"] = self.data["timing"].get("total_s", 0) + time.perf_counter() - self.t0
        self.report()
        return self.data

    def _pad(self):
        return self.tok.pad_token_id if self.tok.pad_token_id is not None else 0

    def _unit(self, mode, pol, bud, L, samples, prows, pidx, shared):
        policy = self.make(pol, bud)
        rows = [s.ids for s in samples] + prows
        max_new = [s.max_new for s in samples] + [0] * len(prows)
        answers = [s.answers for s in samples] + [None] * len(prows)
        flags = [False] * len(samples) + [True] * len(prows)
        if self.model.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = run_batch(self.model, policy, rows, max_new, mode=mode, ppl=flags, ppl_from=self.ppl_from,
                        chunk=self.chunk, tok=self.tok, answers=answers, accelerate=self.accelerate,
                        shared=shared if mode != "everywhere" else None,
                        context=[s.context_len for s in samples] if mode == "context" else None)
        dt = time.perf_counter() - t
        rec = self.data["records"]
        for s, gen in zip(samples, out["tokens"]):
            pred = self.tok.decode(gen, skip_special_tokens=True)
            rec[_key(mode, pol, bud, L, s.task, s.index)] = {
                "score": ruler.score(pred, s.answers, s.metric), "pred": pred.strip()[:200],
                "answers": s.answers, "prompt_tokens": len(s.ids)}
        for i, j in enumerate(pidx):
            n, c = out["nll"][len(samples) + i], out["count"][len(samples) + i]
            rec[_key(mode, pol, bud, L, PPL_TASK, j)] = {"nll": n, "tokens": c}
        unit = f"{mode}/{pol}/{bud}/{L}"
        if out["stats"] is not None:
            self.data["stats"][unit] = out["stats"]
        self.data["timing"][unit] = self.data["timing"].get(unit, 0) + dt
        self.save()

    # -- aggregation --------------------------------------------------------------------------------
    def summary(self) -> dict:
        return summarize(self.data)

    def report(self):
        if not self.out:
            return
        summary = self.summary()
        self.data["summary"] = summary
        self.save()
        md = markdown_table(self.data, summary)
        rows = quality_rows(self.data)
        if rows:
            md += "\n" + quality_markdown(rows).split("\n", 2)[2]  # the paired table, under this file's title
        self.out.with_suffix(".md").write_text(md)
        try:
            plot(self.data, summary, self.out.with_suffix(".png"))
        except Exception as e:  # a plot failure must not lose the numbers
            self.log(f"plot failed: {e}")


def render(path, out=None, policies=None, budgets=None, lengths=None) -> str:
    """Table (.md) and plot (.png) of a results JSON, optionally for a subset of policies, budgets and lengths
    (e.g. the configurations a run cut short by its time limit finished everywhere). Returns the Markdown."""
    path = Path(path)
    data = json.loads(path.read_text())
    keep_pol = set(policies) if policies else None
    keep_bud = {budget_label(b) for b in budgets} | {DENSE_BUDGET} if budgets else None
    keep_len = {str(parse_length(L)) for L in lengths} if lengths else None
    recs = {}
    for k, v in data["records"].items():
        mode, pol, bud, L, task, idx = k.split("|")
        if (keep_pol is None or pol in keep_pol) and (keep_bud is None or bud in keep_bud) \
                and (keep_len is None or L in keep_len):
            recs[k] = v
    if not recs:
        raise ValueError(f"no results in {path} for policies={policies} budgets={budgets} lengths={lengths}")
    data = {**data, "records": recs}
    summary = summarize(data)
    md = markdown_table(data, summary)
    out = Path(out) if out else path
    out.with_suffix(".md").write_text(md)
    plot(data, summary, out.with_suffix(".png"))
    return md


def _len_label(L) -> str:
    L = int(L)
    return f"{L // 1024}K" if L % 1024 == 0 else str(L)


def summarize(data: dict) -> dict:
    """Scores averaged over the sample indices that every config of a (mode, length, task) finished."""
    recs = data["records"]
    by = {}  # (mode, length, task) -> {(policy, budget): {index: score}}
    ppl_by = {}
    for k, v in recs.items():
        mode, pol, bud, L, task, idx = k.split("|")
        if task == PPL_TASK:
            ppl_by.setdefault((mode, int(L)), {}).setdefault((pol, bud), {})[int(idx)] = v
        else:
            by.setdefault((mode, int(L), task), {}).setdefault((pol, bud), {})[int(idx)] = v["score"]
    out = {}
    for (mode, L, task), cfgs in by.items():
        common = set.intersection(*(set(d) for d in cfgs.values()))
        for cfg, d in cfgs.items():
            if common:
                e = out.setdefault(mode, {}).setdefault(f"{cfg[0]}@{cfg[1]}", {"tasks": {}, "ppl": {}})
                e["tasks"].setdefault(task, {})[str(L)] = sum(d[i] for i in common) / len(common)
                e.setdefault("n", {})[f"{task}/{L}"] = len(common)
    for (mode, L), cfgs in ppl_by.items():
        common = set.intersection(*(set(d) for d in cfgs.values()))
        for cfg, d in cfgs.items():
            if common:
                e = out.setdefault(mode, {}).setdefault(f"{cfg[0]}@{cfg[1]}", {"tasks": {}, "ppl": {}})
                e["ppl"][str(L)] = ppl(sum(d[i]["nll"] for i in common), sum(d[i]["tokens"] for i in common))
    for mode, cfgs in out.items():
        # averages only over the (task, length) cells every config of the mode has
        cells = set.intersection(*({(t, L) for t, ls in e["tasks"].items() for L in ls} for e in cfgs.values()))
        for e in cfgs.values():
            vals = [e["tasks"][t][L] for t, L in cells]
            e["average"] = sum(vals) / len(vals) if vals else None
            e["by_length"] = {}
            for L in sorted({L for _, L in cells}, key=int):
                lv = [e["tasks"][t][L] for t, LL in cells if LL == L]
                e["by_length"][L] = sum(lv) / len(lv)
            e["by_task"] = {t: sum(e["tasks"][t][L] for tt, L in cells if tt == t)
                            / max(1, sum(1 for tt, _ in cells if tt == t)) for t in sorted({t for t, _ in cells})}
    return out


def _sort_cfgs(cfgs):
    def key(c):
        pol, bud = c.split("@")
        frac = budget_fraction(bud)
        order = POLICY_ORDER.index(pol) if pol in POLICY_ORDER else len(POLICY_ORDER)
        return (-frac, order)
    return sorted(cfgs, key=key)


def markdown_table(data: dict, summary: dict) -> str:
    s = data["settings"]
    lines = [f"# Long-context evaluation: {s['model']}", "",
             f"Device: {s['device']} ({s['dtype']}); torch {s['torch']}, transformers {s['transformers']}. "
             f"Sink {s['sink']}, window {s['window']}, chunk {s['chunk']}, Quest page {s['page_size']}, "
             f"seed {s['seed']}. Scores: RULER string match (%), mean over the lengths every row finished. "
             f"PPL: held-out pydoc text, positions >= {s['ppl_from']}.", ""]
    for mode, cfgs in summary.items():
        tasks = sorted({t for e in cfgs.values() for t in e["by_task"]}, key=lambda t: s["tasks"].index(t) if t in s["tasks"] else 99)
        lengths = sorted({L for e in cfgs.values() for L in e["by_length"]}, key=int)
        plens = sorted({L for e in cfgs.values() for L in e["ppl"]}, key=int)
        n = sorted({v for e in cfgs.values() for v in e.get("n", {}).values()})
        lines += [f"## Sparse {MODE_TITLES.get(mode, mode)}",
                  "", f"Samples per task and length: {n[0] if len(n) == 1 else n}.", ""]
        head = ["policy", "budget"] + tasks + ["avg"] + [_len_label(L) for L in lengths] + [f"ppl {_len_label(L)}" for L in plens]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for c in _sort_cfgs(cfgs):
            e = cfgs[c]
            pol, bud = c.split("@")
            cells = [pol, bud] + [f"{e['by_task'].get(t, float('nan')):.1f}" for t in tasks]
            cells += [f"**{e['average']:.1f}**" if e["average"] is not None else "-"]
            cells += [f"{e['by_length'].get(L, float('nan')):.1f}" for L in lengths]
            cells += [f"{e['ppl'].get(L, float('nan')):.2f}" for L in plens]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(data: dict, summary: dict, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = data["settings"]
    modes = list(summary)
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 4.6), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        cfgs = summary[mode]
        pols = sorted({c.split("@")[0] for c in cfgs}, key=lambda p: POLICY_ORDER.index(p) if p in POLICY_ORDER else 99)
        for pol in pols:
            pts = sorted(((1 / budget_fraction(c.split("@")[1]), e["average"]) for c, e in cfgs.items()
                          if c.startswith(pol + "@") and c.split("@")[1] != DENSE_BUDGET and e["average"] is not None))
            if pol == "dense":
                d = cfgs.get(f"dense@{DENSE_BUDGET}")
                if d and d["average"] is not None:
                    ax.axhline(d["average"], color="black", ls="--", lw=1.2, label="dense")
                continue
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=pol)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sparsity (context / heavy tokens)")
        ax.set_ylabel("suite average (%)")
        ax.set_title(f"sparse {mode}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    lens = sorted({int(L) for m in summary.values() for e in m.values() for L in e.get("by_length", {})})
    fig.suptitle(f"{s['model']}: RULER-style suite, lengths {', '.join(_len_label(L) for L in lens)}\n"
                 f"{s['device']}, {s['dtype']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def perplexity(model, tok, policy=None, length: int = 4096, n: int = 2, start: int = 1024,
               chunk: int = 128, seed: int = 0, accelerate: bool = True) -> float:
    """Perplexity of ``n`` held-out rows of ``length`` tokens, positions >= ``start``, with ``policy``
    sparse everywhere (None = dense)."""
    rows = perplexity_rows(tok, n, length, seed)
    out = run_batch(model, policy, rows, [0] * n, mode="everywhere", ppl=[True] * n, ppl_from=start,
                    chunk=chunk, accelerate=accelerate)
    return ppl(sum(out["nll"]), sum(out["count"]))

"""Passkey retrieval (Mohtashami & Jaggi 2023): a 5-digit key hidden at a random depth in repeated noise.

Decode-mode runs share work across policies: the prompt minus its last token is prefilled once with dense
attention, then each policy decodes from a copy of that cache. The last prompt token is fed as the first
decode step, so *every* answer token comes from a sparse query. Context-mode runs prefill the context (the
prompt before the question) once, densely; the question and every answer token are sparse.
"""
from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, field

import torch

from ..integration.compat import cache_kwarg
from ..integration.hf import enable

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.")
NOISE = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = " What is the pass key? The pass key is"


def passkey_prompt(tok, n_tokens: int, seed: int) -> tuple[torch.Tensor, str]:
    """Token ids [1, ~n_tokens] of a prompt whose answer is the returned 5-digit string."""
    ids, key, _ = passkey_prompt_split(tok, n_tokens, seed)
    return ids, key


def passkey_prompt_split(tok, n_tokens: int, seed: int) -> tuple[torch.Tensor, str, int]:
    """:func:`passkey_prompt` and the number of its tokens before the question (the context)."""
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    fixed = len(tok(INTRO + QUESTION).input_ids) + 24
    reps = max(1, (n_tokens - fixed) // len(tok(NOISE, add_special_tokens=False).input_ids))
    parts = [NOISE] * reps
    parts.insert(rng.randint(0, reps), f" The pass key is {key}. Remember it. {key} is the pass key.")
    context = INTRO + "".join(parts)
    ids = tok(context + QUESTION, return_tensors="pt").input_ids
    head = tok(context).input_ids
    ctx = next((i for i, (a, b) in enumerate(zip(head, ids[0].tolist())) if a != b), min(len(head), ids.shape[1]))
    return ids, key, min(ctx, ids.shape[1] - 1)


@torch.no_grad()
def greedy(model, next_ids: torch.Tensor, cache, steps: int) -> list[int]:
    """Greedy decoding from ``cache``, feeding ``next_ids`` [B, 1] first. Returns the generated ids of row 0."""
    out = []
    for _ in range(steps):
        logits = model(input_ids=next_ids, **{cache_kwarg(model): cache}, use_cache=True).logits[:, -1]
        next_ids = logits.argmax(-1, keepdim=True)
        out.append(int(next_ids[0, 0]))
    return out


@dataclass
class PasskeyResult:
    policy: str
    length: int
    correct: int = 0
    samples: int = 0
    tokens_read: float = 0.0  # mean tokens read per query per head (decode steps)
    context: float = 0.0
    seconds: float = 0.0  # decode time, summed over samples
    answers: list = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.samples, 1)


def run_passkey(model, tok, policies: dict, lengths: list[int], samples: int, mode: str = "decode",
                new_tokens: int = 7, seed: int = 0, progress=None) -> list[PasskeyResult]:
    """Accuracy of each policy (name -> SelectionPolicy) at each prompt length, same prompts for all."""
    from transformers import DynamicCache
    dev = next(model.parameters()).device
    results = {(n, L): PasskeyResult(n, L) for L in lengths for n in policies}
    for L in lengths:
        for s in range(samples):
            ids, key, ctx = passkey_prompt_split(tok, L, seed * 100003 + L * 7 + s)
            ids = ids.to(dev)
            shared = None
            if mode in ("decode", "context"):  # one dense prefill for every policy
                shared = DynamicCache()
                with torch.no_grad():
                    model(input_ids=ids[:, :-1] if mode == "decode" else ids[:, :ctx],
                          **{cache_kwarg(model): shared}, use_cache=True)
            for name, policy in policies.items():
                t0 = time.perf_counter()
                with enable(model, policy, mode=mode, **({"context_length": ctx} if mode == "context" else {})) as h:
                    if mode == "decode":
                        gen = greedy(model, ids[:, -1:], copy.deepcopy(shared), new_tokens)
                    elif mode == "context":  # the question's tokens sparse, then every answer token
                        cache = copy.deepcopy(shared)
                        with torch.no_grad():
                            nxt = model(input_ids=ids[:, ctx:], **{cache_kwarg(model): cache},
                                        use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
                        gen = [int(nxt[0, 0])] + greedy(model, nxt, cache, new_tokens - 1)
                    else:
                        cache = DynamicCache()
                        with torch.no_grad():
                            model(input_ids=ids[:, :-1], **{cache_kwarg(model): cache}, use_cache=True)
                        h.reset_stats()  # report what decode steps read
                        gen = greedy(model, ids[:, -1:], cache, new_tokens)
                    st = h.stats()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                r = results[(name, L)]
                text = tok.decode(gen)
                r.samples += 1
                r.correct += int(key in text)
                r.tokens_read += st["tokens_read"] / samples
                r.context += st["context"] / samples
                r.seconds += time.perf_counter() - t0
                r.answers.append((key, text.strip()))
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix_str(f"{L} tokens, {name}")
    return list(results.values())

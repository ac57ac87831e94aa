"""Passkey retrieval (Mohtashami & Jaggi 2023): a 5-digit key hidden at a random depth in repeated noise.

Decode-mode runs share work across policies: the prompt minus its last token is prefilled once with dense
attention, then each policy decodes from a copy of that cache. The last prompt token is fed as the first
decode step, so *every* answer token comes from a sparse query.
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
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    fixed = len(tok(INTRO + QUESTION).input_ids) + 24
    reps = max(1, (n_tokens - fixed) // len(tok(NOISE, add_special_tokens=False).input_ids))
    parts = [NOISE] * reps
    parts.insert(rng.randint(0, reps), f" The pass key is {key}. Remember it. {key} is the pass key.")
    ids = tok(INTRO + "".join(parts) + QUESTION, return_tensors="pt").input_ids
    return ids, key


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
            ids, key = passkey_prompt(tok, L, seed * 100003 + L * 7 + s)
            ids = ids.to(dev)
            shared = None
            if mode == "decode":
                shared = DynamicCache()
                with torch.no_grad():
                    model(input_ids=ids[:, :-1], **{cache_kwarg(model): shared}, use_cache=True)
            for name, policy in policies.items():
                t0 = time.perf_counter()
                with enable(model, policy, mode=mode) as h:
                    if mode == "decode":
                        gen = greedy(model, ids[:, -1:], copy.deepcopy(shared), new_tokens)
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

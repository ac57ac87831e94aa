"""Retrieval questions over training text: prompts whose question reads a fact stated thousands of tokens back.

Generic text trains every query alike, and most queries of running text read near tokens. The queries that
decide a long-context answer are different: the question's and the answer's, which look far back for one
fact. Maps trained on them find that fact's keys where maps trained on text alone miss them (layers 7 and 20,
``docs/quality.md``). These prompts are built from the *training* documents, never from the suite's
haystacks, phrasing or seeds: facts of a few kinds are written into the text at random depths (with
distractors of the same kind), the question asks for one, and the answer is appended (teacher forcing). The
positions from the question to the last answer token are the queries trained on (``qstart`` onwards).
"""
from __future__ import annotations

import random
import re

import torch

from ..evaluation.ruler import encode, render, word_pairs

#: (fact, question, answer prefix) templates; {name} and {value} are filled per prompt
FACTS = (
    ("The {attr} of {name} is {value}.", "What is the {attr} of {name}?", "The {attr} of {name} is"),
    ("Setting: {name} = {value}", "Which value is {name} set to?", "{name} is set to"),
    ("Note that {name} was moved to shelf {value}.", "Which shelf was {name} moved to?", "{name} was moved to shelf"),
)
ATTRS = ("access code", "serial number", "order number", "ticket id", "locker number")
INTRO = "Read the following documentation carefully; a question about it follows."


def _value(rng: random.Random) -> str:
    if rng.random() < 0.7:
        return str(rng.randint(10 ** 3, 10 ** rng.randint(4, 8) - 1))
    return "".join(rng.choice("abcdef0123456789") for _ in range(6))


def _plan(lines: list, words: list, rng: random.Random) -> dict:
    """Every random choice of one prompt (the tokenizing that fits it to its length draws none)."""
    fact, question, prefix = rng.choice(FACTS)
    attr = rng.choice(ATTRS)
    names = word_pairs(rng, words, rng.randint(1, 4), sep="_")
    values = [_value(rng) for _ in names]
    ask = rng.randrange(len(names))
    return {"facts": [fact.format(attr=attr, name=n, value=v) for n, v in zip(names, values)],
            "q": question.format(attr=attr, name=names[ask]), "pre": prefix.format(attr=attr, name=names[ask]),
            "answer": f" {values[ask]}.", "start": rng.randrange(len(lines)),
            "depths": [rng.random() for _ in names]}


def _fit(tok, lines: list, plan: dict, length: int):
    """Fit one planned prompt to at most ``length`` tokens: a generator that yields each text to tokenize and is
    sent its ids (so many prompts share one batched tokenization, :func:`_tokenize_all`); returns
    (ids [1, L], qstart)."""
    q = plan["q"]

    def build(n: int) -> str:
        hay = [lines[(plan["start"] + i) % len(lines)] for i in range(n)]
        for d, f in sorted(zip(plan["depths"], plan["facts"]), reverse=True):
            hay.insert(round(d * n), f)
        return render(tok, INTRO + "\n\n" + "\n".join(hay) + "\n\n" + q, plan["pre"])

    n = max(1, length // 12)  # about 12 tokens a line to start; then scaled to fit
    text = build(n)
    ids = yield text + plan["answer"]
    for _ in range(6):
        if length * 0.97 <= len(ids) <= length:
            break
        n = max(1, int(n * length / len(ids) * 0.99))
        text = build(n)
        ids = yield text + plan["answer"]
    while len(ids) > length and n > 1:
        n = max(1, int(n * 0.97))
        text = build(n)
        ids = yield text + plan["answer"]
    if len(ids) > length:
        raise ValueError(f"a retrieval question does not fit in {length} tokens (it takes {len(ids)} with one line "
                         "of text): use longer training lengths")
    head = yield text[:text.rindex(q)]
    qstart = next((i for i, (a, b) in enumerate(zip(head, ids)) if a != b), len(head))
    if not 0 < qstart < len(ids):
        raise ValueError(f"cannot place the question inside the prompt ({qstart} of {len(ids)} tokens)")
    return torch.tensor([ids]), qstart


def _tokenize_all(tok, fits: list) -> list:
    """Run the :func:`_fit` generators side by side: each round tokenizes every pending text in one batch (a fast
    tokenizer spreads a batch over the cores; thousands of prompts took minutes one by one)."""
    out, pending = [None] * len(fits), {i: next(f) for i, f in enumerate(fits)}
    fast = getattr(tok, "is_fast", False)
    while pending:
        keys = list(pending)
        texts = [pending[k] for k in keys]
        ids = tok(texts, add_special_tokens=False)["input_ids"] if fast else [encode(tok, t) for t in texts]
        for k, x in zip(keys, ids):
            try:
                pending[k] = fits[k].send(list(x))
            except StopIteration as done:
                out[k] = done.value
                del pending[k]
    return out


def question_prompt(tok, lines: list, words: list, length: int, rng: random.Random) -> tuple[torch.Tensor, int]:
    """One prompt of at most ``length`` tokens: ids [1, L] (question and answer included) and ``qstart``, the
    index of the first question token. ``lines``: training text as lines; ``words``: names are made of them."""
    return _tokenize_all(tok, [_fit(tok, lines, _plan(lines, words, rng), length)])[0]


def question_prompts(tok, docs: list, n: int, lengths: tuple, seed: int = 0) -> list:
    """``n`` prompts over the documents ``docs`` (strings), lengths taken in turn from ``lengths``:
    [(ids [1, L], qstart)]."""
    if n <= 0:
        return []
    lines = [ln.strip() for d in docs for ln in d.splitlines() if len(ln.strip()) > 20]
    words = sorted({w.lower() for ln in lines[:20000] for w in re.findall(r"[A-Za-z]{4,10}", ln)})
    if len(lines) < 50 or len(words) < 40:
        raise ValueError(f"the training text is too small for retrieval questions ({len(lines)} lines, "
                         f"{len(words)} words; need 50 and 40)")
    rng = random.Random(10**6 + seed)
    plans = [_plan(lines, words, rng) for _ in range(n)]  # drawn in order: the same prompts as one at a time
    out = []
    for i in range(0, n, 512):  # batches of texts of at most 512 prompts
        out += _tokenize_all(tok, [_fit(tok, lines, p, lengths[j % len(lengths)])
                                   for j, p in enumerate(plans[i:i + 512], start=i)])
    return out

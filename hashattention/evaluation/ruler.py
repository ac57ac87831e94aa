"""An offline long-context suite in the style of RULER (Hsieh et al. 2024, arXiv 2404.06654).

Every prompt is generated here from a seed (no download): needle-in-a-haystack retrieval (single needle,
multiple keys, multiple values, multiple queries) over a noise haystack and over held-out natural text
(:mod:`hashattention.evaluation.heldout`), variable tracking, common-word extraction and frequent-word
extraction. Needles are numeric, as in RULER's default ("One of the special magic numbers for X is:
1234567."). Scoring is RULER's: the percentage of expected strings found in the generated text.

A prompt is fitted to its length: the largest haystack such that prompt + the task's answer tokens fit in
``length`` tokens. The same (task, length, index, seed) always gives the same prompt (for a given
tokenizer and held-out text). Answer generation is greedy with the task's ``max_new`` tokens.

Deviations from RULER, for a 135M model and a small GPU allowance: 2 values (multi-value) and 2 queries
(multi-query) instead of 4; common-word extraction asks for the top 5 of 5 common words instead of 10;
no question-answering task (RULER's QA reads SQuAD/HotpotQA, which cannot be built offline).
"""
from __future__ import annotations

import random
import string
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
              "I will quiz you about the numbers afterwards.")
NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."
NIAH_QUESTION = "What are all the special magic numbers for {query} mentioned in the provided text?"
NIAH_ANSWER = "The special magic numbers for {query} mentioned in the provided text are"


@dataclass
class Sample:
    """One prompt: token ids and the strings a correct answer contains."""
    task: str
    length: int
    index: int
    ids: list
    answers: list
    max_new: int
    metric: str = "all"  # "all": fraction of answers present; "part": any answer present
    meta: dict = field(default_factory=dict)
    #: tokens of ``ids`` before the question starts: the context that the ``context`` mode prefills densely
    context_len: int = 0


@dataclass(frozen=True)
class TaskSpec:
    name: str
    build: Callable  # (rng, resources) -> Draft
    max_new: int
    description: str


@dataclass
class Draft:
    """A task instance before fitting: ``make(n)`` -> (user text, answer prefix, answers, question) with a
    haystack of n units, where the user text ends with the question; ``n_max`` bounds n."""
    make: Callable
    n_max: int


def encode(tok, text: str) -> list:
    return list(tok.encode(text, add_special_tokens=False))


def render(tok, user: str, answer_prefix: str) -> str:
    """Chat-formatted prompt ending with the answer prefix (the assistant's turn already begun)."""
    if getattr(tok, "chat_template", None):
        head = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                       add_generation_prompt=True)
        return head + answer_prefix
    return user + "\n" + answer_prefix


def sample_seed(seed: int, task: str, length: int, index: int) -> int:
    return zlib.crc32(f"{seed}|{task}|{length}|{index}".encode())


# ------------------------------------------------------------------------------------------ resources
class Resources:
    """Word lists and haystack text, built once (from the held-out modules unless given)."""

    def __init__(self, sentences: list | None = None, words: list | None = None):
        if sentences is None or words is None:
            from .heldout import prose_sentences, vocabulary
            sentences = prose_sentences() if sentences is None else sentences
            words = vocabulary() if words is None else words
        if not sentences:
            raise ValueError("the natural-text haystack source is empty: give held-out sentences "
                             "(hashattention.evaluation.heldout.HELDOUT_MODULES lists the modules used)")
        if len(words) < 40:
            raise ValueError(f"the word list has {len(words)} words; the tasks need at least 40")
        self.sentences = list(sentences)
        self.words = list(words)


def _numbers(rng, k: int, digits: int = 7) -> list:
    out = []
    while len(out) < k:
        v = str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))
        if v not in out:
            out.append(v)
    return out


def word_pairs(rng, words, k: int, sep: str = "-") -> list:
    """k distinct names of two random words joined by ``sep``."""
    out = []
    while len(out) < k:
        key = f"{rng.choice(words)}{sep}{rng.choice(words)}"
        if key not in out:
            out.append(key)
    return out


def _haystack(kind: str, res: Resources, start: int):
    """n -> list of n haystack units (sentences)."""
    if kind == "noise":
        return lambda n: [NOISE] * n
    sents = res.sentences
    return lambda n: [sents[(start + i) % len(sents)] for i in range(n)]


def _insert(units: list, needles: list, depths: list) -> str:
    """Insert needles at fractional depths (sorted) between haystack units."""
    out = list(units)
    for d, nd in sorted(zip(depths, needles), key=lambda x: x[0], reverse=True):
        out.insert(round(d * len(units)), nd)
    return " ".join(out)


def _niah(haystack: str, n_keys: int, n_values: int, n_queries: int):
    def build(rng, res: Resources) -> Draft:
        keys = word_pairs(rng, res.words, n_keys)
        values = _numbers(rng, n_keys * n_values)
        needles = [NIAH_NEEDLE.format(key=keys[i // n_values], value=v) for i, v in enumerate(values)]
        depths = [rng.random() for _ in needles]
        asked = rng.sample(range(n_keys), n_queries)
        qkeys = [keys[i] for i in asked]
        query = qkeys[0] if n_queries == 1 else ", ".join(qkeys[:-1]) + ", and " + qkeys[-1]
        answers = [values[i * n_values + j] for i in asked for j in range(n_values)]
        hay = _haystack(haystack, res, rng.randrange(len(res.sentences)))

        def make(n):
            question = NIAH_QUESTION.format(query=query)
            user = "\n".join([NIAH_INTRO, _insert(hay(n), needles, depths), question])
            return user, " " + NIAH_ANSWER.format(query=query), answers, question
        return Draft(make, 10 ** 6)
    return build


def _vt(rng, res: Resources, hops: int = 4) -> Draft:
    names = set()
    while len(names) < hops + 1:
        names.add("".join(rng.choice(string.ascii_uppercase) for _ in range(5)))
    names = sorted(names, key=lambda _: rng.random())
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops + 1)]
    depths = sorted(rng.random() for _ in chain)

    def make(n):
        units = [NOISE] * n
        out = list(units)
        for d, stmt in sorted(zip(depths, chain), key=lambda x: x[0], reverse=True):
            out.insert(round(d * n), stmt)  # sorted depths keep the chain in order
        question = f"Question: Find all variables that are assigned the value {value} in the text above."
        user = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
                + " ".join(out) + "\n" + question)
        prefix = (f" Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} "
                  f"variables are assigned the value {value}, they are:")
        return user, prefix, list(names), question
    return Draft(make, 10 ** 6)


def _cwe(rng, res: Resources, n_common: int = 5, freq_common: int = 30, freq_rare: int = 3) -> Draft:
    words = list(res.words)
    rng.shuffle(words)
    common, rare_pool = words[:n_common], words[n_common:]
    order_seed = rng.randrange(2 ** 31)

    def make(n):
        items = common * freq_common + rare_pool[:n] * freq_rare
        random.Random(order_seed + n).shuffle(items)
        listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))
        question = f"Question: What are the {n_common} most common words in the above list?"
        user = ("Below is a numbered list of words. In these words, some appear more often than others. "
                "Memorize the ones that appear most often.\n" + listing + "\n" + question)
        prefix = f" Answer: The top {n_common} words that appear most often in the list are:"
        return user, prefix, list(common), question
    return Draft(make, len(rare_pool))


def _fwe(rng, res: Resources, vocab: int = 800, alpha: float = 2.0, top: int = 3) -> Draft:
    coded = set()
    while len(coded) < vocab:
        coded.add("".join(rng.choice(string.ascii_lowercase) for _ in range(5)))
    coded = sorted(coded)
    rng.shuffle(coded)
    weights = [1.0 / (r + 1) ** alpha for r in range(vocab)]
    stream = rng.choices(coded, weights=weights, k=20000)

    def make(n):
        text = stream[:n]
        counts = Counter(text).most_common(top + 1)
        answers = [w for w, _ in counts[:top]]
        question = ("Question: Do not provide any explanation. What are the three most frequently appeared "
                    "words in the above coded text?")
        user = ("Read the following coded text and track the frequency of each coded word. Find the three "
                "most frequently appeared coded words. " + " ".join(text) + "\n" + question)
        prefix = " Answer: According to the coded text above, the three most frequently appeared words are:"
        return user, prefix, answers, question
    return Draft(make, len(stream))


TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("niah_single_noise", _niah("noise", 1, 1, 1), 12, "one needle in repeated noise"),
    TaskSpec("niah_single_text", _niah("text", 1, 1, 1), 12, "one needle in held-out text"),
    TaskSpec("niah_multikey_noise", _niah("noise", 4, 1, 1), 12, "4 needles with different keys, noise"),
    TaskSpec("niah_multikey_text", _niah("text", 4, 1, 1), 12, "4 needles with different keys, text"),
    TaskSpec("niah_multivalue_noise", _niah("noise", 1, 2, 1), 24, "2 values under one key, noise"),
    TaskSpec("niah_multivalue_text", _niah("text", 1, 2, 1), 24, "2 values under one key, text"),
    TaskSpec("niah_multiquery_noise", _niah("noise", 4, 1, 2), 24, "2 of 4 keys asked at once, noise"),
    TaskSpec("niah_multiquery_text", _niah("text", 4, 1, 2), 24, "2 of 4 keys asked at once, text"),
    TaskSpec("vt", _vt, 30, "variable tracking: 1 chain of 4 hops in noise"),
    TaskSpec("cwe", _cwe, 24, "common-word extraction: top 5 of a numbered word list"),
    TaskSpec("fwe", _fwe, 16, "frequent-word extraction: top 3 coded words (Zipf 2.0)"),
]}


def check_tasks(names) -> list:
    """Validate task names (a list or a comma string); "all" means every task."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names or names == ["all"]:
        return list(TASKS)
    bad = [n for n in names if n not in TASKS]
    if bad:
        raise ValueError(f"unknown task(s) {', '.join(bad)}; available: {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


def fit(tok, draft: Draft, target: int):
    """Largest n with len(prompt(n)) <= target tokens. Returns (ids, answers, n)."""
    def toks(n):
        user, prefix, answers, _ = draft.make(n)
        return encode(tok, render(tok, user, prefix)), answers

    lo_ids, lo_ans = toks(0)
    if len(lo_ids) > target:
        raise ValueError(f"a length of {target + 0} tokens cannot hold even the task's template "
                         f"({len(lo_ids)} tokens): choose a longer context")
    one_ids, _ = toks(1)
    per = max(len(one_ids) - len(lo_ids), 1)
    # tokens grow ~linearly in n: bracket the edge from the estimate, then bisect to it exactly
    best = (lo_ids, lo_ans, 0)
    guess = min(draft.n_max, max(1, (target - len(lo_ids)) // per))
    lo, hi = 0, None  # n = lo fits; n = hi does not (None: not found yet)
    while hi is None:
        ids, ans = toks(guess)
        if len(ids) <= target:
            lo, best = guess, (ids, ans, guess)
            if guess >= draft.n_max:
                return best
            guess = min(draft.n_max, guess + max(1, guess // 4))
        else:
            hi = guess
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ids, ans = toks(mid)
        if len(ids) <= target:
            lo, best = mid, (ids, ans, mid)
        else:
            hi = mid
    return best


def context_length(tok, draft: Draft, n: int, ids: list) -> int:
    """Tokens of the prompt ``ids`` (haystack of n units) before its question: the longest common prefix of
    ``ids`` and the tokens of the rendered text up to the question (a token spanning the boundary counts as
    question)."""
    user, prefix, _, question = draft.make(n)
    text = render(tok, user, prefix)
    head = encode(tok, text[:text.rindex(question)])
    m = 0
    for a, b in zip(head, ids):
        if a != b:
            break
        m += 1
    if not 0 < m < len(ids):
        raise ValueError(f"cannot place the question inside the prompt ({m} of {len(ids)} tokens)")
    return m


def make_sample(tok, task: str, length: int, index: int, seed: int = 0, resources: Resources | None = None,
                max_new: int | None = None) -> Sample:
    """The prompt of (task, length, index): at most ``length`` tokens including the answer's tokens."""
    spec = TASKS[check_tasks([task])[0]]
    res = resources or Resources()
    rng = random.Random(sample_seed(seed, task, length, index))
    new = spec.max_new if max_new is None else max_new
    draft = spec.build(rng, res)
    ids, answers, n = fit(tok, draft, length - new)
    return Sample(task, length, index, ids, list(answers), new, meta={"haystack_units": n},
                  context_len=context_length(tok, draft, n, ids))


def score(prediction: str, answers: list, metric: str = "all") -> float:
    """RULER's string match, in percent: "all" = fraction of answers present, "part" = any present."""
    p = prediction.lower()
    hits = [a.lower() in p for a in answers]
    if not hits:
        raise ValueError("a sample needs at least one expected answer")
    return 100.0 * (sum(hits) / len(hits) if metric == "all" else float(any(hits)))

"""Held-out natural text for evaluation: the pydoc pages of a fixed list of standard-library modules.

These modules are reserved for evaluation (the natural-text haystack of the RULER-style suite and the
perplexity texts); the training corpus must not read them (``HELDOUT_MODULES`` is the list to exclude).
The text is what ``pydoc`` renders for the running Python, cleaned of page furniture (URLs, file paths,
the ``|`` margins of class pages); its sha256 is recorded with every evaluation result, since another
Python version renders slightly different text.
"""
from __future__ import annotations

import hashlib
import importlib
import pydoc
import re
from functools import lru_cache

#: standard-library modules whose documentation is held out from training (evaluation only)
HELDOUT_MODULES = (
    "difflib", "argparse", "configparser", "smtplib", "imaplib", "ftplib", "mailbox", "http.cookiejar",
    "email.message", "xmlrpc.client", "optparse", "doctest", "tarfile", "zipfile", "calendar",
    "statistics", "shelve", "socketserver",
)

_DROP = re.compile(r"(https?://|^FILE$|^MODULE REFERENCE$|/python3|\.py$|^Python Library Documentation)")


def _clean(text: str) -> str:
    lines = []
    for raw in text.splitlines():
        line = re.sub(r"^[\s|]*", "", raw).rstrip()  # pydoc's class margins and indentation
        if _DROP.search(line):
            continue
        lines.append(line)
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", "\n".join(lines))  # object addresses differ per process
    return re.sub(r"\n{3,}", "\n\n", text).strip()


@lru_cache(maxsize=None)
def module_text(name: str) -> str:
    """Cleaned pydoc page of one module."""
    try:
        mod = importlib.import_module(name)
    except ImportError as e:
        raise ValueError(f"held-out module {name!r} cannot be imported here: {e}") from None
    return _clean(pydoc.render_doc(mod, renderer=pydoc.plaintext))


def heldout_documents(modules=HELDOUT_MODULES) -> list[tuple[str, str]]:
    """[(module, cleaned pydoc text)] for every importable module of the list (in list order)."""
    docs = []
    for name in modules:
        try:
            t = module_text(name)
        except ValueError:
            continue  # a module missing from this Python (e.g. removed in a newer version)
        if t:
            docs.append((name, t))
    if not docs:
        raise ValueError(f"no held-out text: none of the modules {', '.join(modules)} could be rendered "
                         "by pydoc on this Python")
    return docs


def prose_sentences(modules=HELDOUT_MODULES) -> list[str]:
    """Sentences of the held-out prose (paragraphs that read as text, not code), in document order: the
    natural-text haystack."""
    out = []
    for _, text in heldout_documents(modules):
        for para in re.split(r"\n\s*\n", text):
            p = " ".join(para.split())
            letters = sum(c.isalpha() or c == " " for c in p)
            if (len(p) < 80 or letters < 0.85 * len(p) or ">>>" in p or "(" in p[:40]
                    or "automatically generated" in p):  # pydoc's boilerplate, the same on every page
                continue
            out.extend(s.strip() for s in re.split(r"(?<=[.!?])\s+", p) if len(s.strip()) > 20)
    if not out:
        raise ValueError("the held-out documents contain no prose paragraphs for a natural-text haystack")
    return out


def vocabulary(modules=HELDOUT_MODULES, min_len: int = 4, max_len: int = 10, min_count: int = 3) -> list[str]:
    """Sorted distinct lowercase alphabetic words seen at least ``min_count`` times in the held-out prose
    (word lists for tasks)."""
    from collections import Counter
    counts = Counter()
    for s in prose_sentences(modules):
        counts.update(w for w in re.findall(r"\b[a-z]+\b", s) if min_len <= len(w) <= max_len)
    return sorted(w for w, c in counts.items() if c >= min_count)


def text_digest(modules=HELDOUT_MODULES) -> str:
    h = hashlib.sha256()
    for name, t in heldout_documents(modules):
        h.update(name.encode() + b"\0" + t.encode() + b"\0")
    return h.hexdigest()

"""Training text: the pydoc pages of Python's standard library (offline default), local text/jsonl files,
or a Hugging Face dataset; documents are tokenized, concatenated and cut into sequences of the context length.

The pydoc corpus is split by module: ``evaluation.heldout.HELDOUT_MODULES`` are the held-out part (never
trained on), every other importable, public standard-library module is the training part.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import pydoc
import random
import sys
import warnings
from pathlib import Path

import torch

from ..evaluation.heldout import HELDOUT_MODULES, _clean

PYDOC = "pydoc"
#: modules that open windows, print on import, or are not documentation
_SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "ensurepip",
         "pydoc_data", "__future__", "__hello__", "__phello__", "xxsubtype", "xxlimited", "msilib", "winreg",
         "winsound", "msvcrt", "_winapi", "nt", "sre_compile", "sre_parse", "sre_constants", "venv"}


def _module_doc(name: str) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = importlib.import_module(name)
            return _clean(pydoc.render_doc(mod, renderer=pydoc.plaintext))  # _clean drops object addresses
    except Exception:  # noqa: BLE001 - a module that cannot be imported/rendered here is simply not in the corpus
        return ""


def pydoc_modules(split: str = "train") -> list[str]:
    """Module names of one split ("train" or "heldout"), sorted."""
    if split == "heldout":
        return list(HELDOUT_MODULES)
    if split != "train":
        raise ValueError(f"pydoc split must be 'train' or 'heldout', got {split!r}")
    held = {m.split(".")[0] for m in HELDOUT_MODULES} | set(HELDOUT_MODULES)
    return sorted(m for m in sys.stdlib_module_names
                  if not m.startswith("_") and m not in _SKIP and m not in held)


def pydoc_documents(split: str = "train", limit_chars: int | None = None) -> list[tuple[str, str]]:
    """[(module, cleaned pydoc text)] of one split, in module order, until ``limit_chars`` characters."""
    docs, total = [], 0
    for name in pydoc_modules(split):
        t = _module_doc(name)
        if len(t) < 200:
            continue
        docs.append((name, t))
        total += len(t)
        if limit_chars is not None and total >= limit_chars:
            break
    if not docs:
        raise ValueError(f"no pydoc text could be rendered for the {split!r} split on this Python")
    return docs


def _read_file(p: Path, field: str) -> list[str]:
    if p.suffix == ".jsonl":
        out = []
        with open(p, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}:{i} is not valid JSON ({e})") from None
                if not isinstance(row, dict) or not isinstance(row.get(field), str):
                    raise ValueError(f"{p}:{i} has no string field {field!r} (set --text-field)")
                out.append(row[field])
        return out
    return [p.read_text(encoding="utf-8", errors="replace")]


def load_documents(data: str, split: str = "train", text_field: str = "text",
                   limit_chars: int | None = None) -> tuple[list[str], str]:
    """Documents of ``data``: "pydoc" (this Python's standard-library docs; ``split`` train/heldout), a .txt /
    .jsonl file or a folder of them, or a Hugging Face dataset name (needs the ``datasets`` package).

    Returns (documents, description). Raises ValueError for missing or empty data.
    """
    if not data:
        raise ValueError("no training data given")
    if data in (PYDOC, f"{PYDOC}:train", f"{PYDOC}:heldout"):
        sp = data.split(":")[1] if ":" in data else split
        docs = pydoc_documents(sp, limit_chars)
        return [t for _, t in docs], f"pydoc:{sp} ({len(docs)} modules, Python {sys.version.split()[0]})"
    p = Path(data)
    looks_local = p.exists() or os.sep in data and not data.count("/") == 1 or p.suffix in (".txt", ".jsonl")
    if looks_local:
        if not p.exists():
            raise FileNotFoundError(f"training data {data} does not exist")
        files = sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".jsonl", ".md")) if p.is_dir() else [p]
        if not files:
            raise ValueError(f"training data folder {data} holds no .txt/.jsonl/.md files")
        docs = [d for f in files for d in _read_file(f, text_field) if d.strip()]
        if not docs:
            raise ValueError(f"training data {data} is empty")
        return docs, f"{data} ({len(files)} files)"
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{data!r} is not a local path; reading it as a Hugging Face dataset needs "
                         "`pip install datasets`") from None
    ds = datasets.load_dataset(data, split=split, streaming=True)
    docs, total = [], 0
    for row in ds:
        t = row.get(text_field)
        if not isinstance(t, str):
            raise ValueError(f"dataset {data} has no string field {text_field!r} (set --text-field)")
        docs.append(t)
        total += len(t)
        if limit_chars is not None and total >= limit_chars:
            break
    if not docs:
        raise ValueError(f"dataset {data} ({split}) is empty")
    return docs, f"hf:{data}:{split}"


def pack_sequences(tok, docs: list[str], length: int, max_sequences: int | None = None,
                   seed: int = 0) -> torch.Tensor:
    """Token ids [N, length]: documents (shuffled with ``seed``) joined by EOS and cut into full sequences.

    Raises ValueError when the text does not fill a single sequence.
    """
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    eos = tok.eos_token_id if tok.eos_token_id is not None else 0
    stream, need = [], None if max_sequences is None else max_sequences * length
    for i in order:
        stream.extend(tok(docs[i], add_special_tokens=False).input_ids)
        stream.append(eos)
        if need is not None and len(stream) >= need:
            break
    n = len(stream) // length
    if max_sequences is not None:
        n = min(n, max_sequences)
    if n == 0:
        raise ValueError(f"the data holds {len(stream)} tokens, fewer than one sequence of {length}")
    return torch.tensor(stream[:n * length], dtype=torch.long).view(n, length)


def text_sha(docs: list[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode("utf-8", "replace"))
    return h.hexdigest()[:16]

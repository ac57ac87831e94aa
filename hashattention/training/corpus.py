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


#: files of a training-data folder read by their extension; files without one (LICENSE, Apache-2.0,
#: GPL-3.0-only: a suffix that does not start with a letter is no extension) are read when they hold text
TEXT_SUFFIXES = (".txt", ".jsonl", ".md", ".rst")
_NO_TEXT = f"no text files ({', '.join(TEXT_SUFFIXES)} or plain text without an extension)"


def _has_extension(f: Path) -> bool:
    ext = f.suffix[1:]
    return bool(ext) and ext[0].isalpha() and ext.isalnum()


def _looks_like_text(f: Path) -> bool:
    """No NUL byte and valid UTF-8 in the first 8 KiB (a multi-byte character may be cut at the end)."""
    try:
        with open(f, "rb") as fh:
            head = fh.read(8192)
    except OSError:
        return False
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 3 and e.reason == "unexpected end of data"
    return True


def data_files(data: str) -> list[Path]:
    """The files a local training-data path is read from: the file itself, or a folder's text files (see
    :data:`TEXT_SUFFIXES`; hidden files and folders skipped), sorted. Raises FileNotFoundError / ValueError
    for a missing path or a folder without text, so that a CLI can check its data before loading a model."""
    p = Path(data)
    if not p.exists():
        raise FileNotFoundError(f"training data {data} does not exist")
    if not p.is_dir():
        return [p]
    files = []
    for f in sorted(p.rglob("*")):
        if any(part.startswith(".") for part in f.relative_to(p).parts) or not f.is_file():
            continue
        if f.suffix.lower() in TEXT_SUFFIXES or (not _has_extension(f) and _looks_like_text(f)):
            files.append(f)
    if not files:
        raise ValueError(f"training data folder {data} holds {_NO_TEXT}")
    return files


def looks_local(data: str) -> bool:
    """Is ``data`` a local path (rather than a Hugging Face dataset name)?"""
    p = Path(data)
    return p.exists() or os.sep in data and not data.count("/") == 1 or p.suffix in (".txt", ".jsonl")


def load_documents(data: str, split: str = "train", text_field: str = "text",
                   limit_chars: int | None = None) -> tuple[list[str], str]:
    """Documents of ``data``: "pydoc" (this Python's standard-library docs; ``split`` train/heldout), a .txt /
    .jsonl / plain-text file or a folder of them (:func:`data_files`), or a Hugging Face dataset name (needs the
    ``datasets`` package).

    Returns (documents, description). Raises ValueError for missing or empty data.
    """
    if not data:
        raise ValueError("no training data given")
    if data in (PYDOC, f"{PYDOC}:train", f"{PYDOC}:heldout"):
        sp = data.split(":")[1] if ":" in data else split
        docs = pydoc_documents(sp, limit_chars)
        return [t for _, t in docs], f"pydoc:{sp} ({len(docs)} modules, Python {sys.version.split()[0]})"
    if looks_local(data):
        files = data_files(data)
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

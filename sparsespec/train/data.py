"""Training text: documents from the KJV Bible, .txt files or PG-19 style .jsonl, split by document.

Held-out text must never be trained on, and windows of one document are correlated, so the split
is by document (a KJV book is a document), never by window.
"""

from __future__ import annotations

import json
import random
from itertools import zip_longest
from dataclasses import dataclass
from pathlib import Path

from sparsespec.errors import InvalidArgument


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def load_documents(spec: str) -> list[Document]:
    """'kjv' (offline, from its wheel), a .txt file (one document), a .jsonl file (one document
    per line, PG-19's {"text": ..., "short_book_title": ...}), or a directory of both."""
    if spec == "kjv":
        from sparsespec.data import kjv
        return [Document(name, body) for name, body in kjv.books()]
    path = Path(spec).expanduser()
    if not path.exists():
        raise InvalidArgument("data", f"{spec!r} is neither 'kjv' nor an existing file or directory")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".jsonl") and p.is_file())
        if not files:
            raise InvalidArgument("data", f"{path}: no .txt or .jsonl files in this directory")
        docs = [d for f in files for d in _read_file(f)]
    else:
        docs = _read_file(path)
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise InvalidArgument("data", f"{path}: holds no text")
    return docs


def _read_file(path: Path) -> list[Document]:
    if path.suffix not in (".txt", ".jsonl"):
        raise InvalidArgument("data", f"{path}: expected a .txt or .jsonl file")
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgument("data", f"{path}: cannot read: {e}") from None
    if path.suffix == ".txt":
        return [Document(path.stem, content)]
    docs = []
    for i, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidArgument("data", f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise InvalidArgument("data", f"{path}:{i}: expected an object with a string 'text' field")
        docs.append(Document(str(row.get("short_book_title") or row.get("id") or f"{path.stem}:{i}"),
                             row["text"]))
    return docs


@dataclass
class Corpus:
    """Tokenized documents, split by document into train and held-out."""

    train: list[tuple[str, list[int]]]      # (name, token ids)
    heldout: list[tuple[str, list[int]]]


def split_corpus(docs: list[Document], tokenizer, heldout_docs: int, min_tokens: int, seed: int) -> Corpus:
    """Tokenize, then hold out `heldout_docs` documents chosen (seeded) among those with at least
    min_tokens tokens (one window), so both sides can form windows."""
    tokenized = [(d.name, tokenizer.encode(d.text, add_special_tokens=False)) for d in docs]
    long_enough = [i for i, (_, ids) in enumerate(tokenized) if len(ids) >= min_tokens]
    if len(long_enough) < heldout_docs + 1:
        longest = max(len(ids) for _, ids in tokenized)
        raise InvalidArgument("prefix", f"prefix + continuation = {min_tokens} tokens, but only "
                                        f"{len(long_enough)} document(s) are that long (the longest has "
                                        f"{longest}); need {heldout_docs + 1} ({heldout_docs} held out + 1 "
                                        "to train on): shorten the window or add data")
    held = set(random.Random(seed).sample(long_enough, heldout_docs))
    return Corpus(train=[d for i, d in enumerate(tokenized) if i not in held],
                  heldout=[d for i, d in enumerate(tokenized) if i in held])


def make_windows(docs: list[tuple[str, list[int]]], length: int, count: int, seed: int) -> list[list[int]]:
    """Up to `count` non-overlapping windows of `length` tokens, drawn (seeded) from all documents."""
    spots = [(d, s) for d, (_, ids) in enumerate(docs) for s in range(0, len(ids) - length + 1, length)]
    random.Random(seed).shuffle(spots)
    return [docs[d][1][s:s + length] for d, s in sorted(spots[:count])]


def eval_prompts(docs: list[tuple[str, list[int]]], length: int, count: int) -> list[tuple[str, list[int]]]:
    """Up to `count` prompts of `length` tokens: consecutive non-overlapping slices of the held-out
    documents long enough, taken document by document in turn. (name@offset, ids)."""
    slices = [[(f"{name}@{s}", ids[s:s + length]) for s in range(0, len(ids) - length + 1, length)]
              for name, ids in docs]
    out = [p for group in zip_longest(*slices) for p in group if p is not None]
    if not out:
        longest = max((len(ids) for _, ids in docs), default=0)
        raise InvalidArgument("context", f"no held-out document has {length} tokens (longest: {longest})")
    return out[:count]

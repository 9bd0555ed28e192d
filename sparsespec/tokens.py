"""Prompt token ids as the model was trained to see them, and a tokenizer's identity.

Every caller encodes text with add_special_tokens=False (so a template, a continuation or a
chunked prompt never gets special tokens in the middle) and then puts the BOS in front itself
where the tokenizer says the model needs one: Gemma does (its GGUF sets add_bos_token; without
the BOS the 270M produces garbage), SmolLM2 does not.
"""

from __future__ import annotations

import hashlib

_PROBE = "a"


def needs_bos(tokenizer) -> bool:
    """Whether the tokenizer, asked for its special tokens, starts a text with its BOS."""
    cached = getattr(tokenizer, "_sparsespec_needs_bos", None)
    if cached is not None:
        return cached
    bos = getattr(tokenizer, "bos_token_id", None)
    needed = bos is not None and list(tokenizer.encode(_PROBE))[:1] == [bos] \
        and list(tokenizer.encode(_PROBE, add_special_tokens=False))[:1] != [bos]
    try:
        tokenizer._sparsespec_needs_bos = needed
    except AttributeError:
        pass
    return needed


def with_bos(tokenizer, ids: list[int]) -> list[int]:
    """ids with the tokenizer's BOS in front when the model needs one and it is not there yet."""
    ids = list(ids)
    if needs_bos(tokenizer) and ids[:1] != [tokenizer.bos_token_id]:
        return [tokenizer.bos_token_id] + ids
    return ids


def encode_prompt(tokenizer, text: str) -> list[int]:
    """The token ids of a prompt that starts a session."""
    return with_bos(tokenizer, tokenizer.encode(text, add_special_tokens=False))


def tokenizer_fingerprint(tokenizer) -> str:
    """What identifies a tokenizer: its size, BOS/EOS ids and a hash of every (token string, id)
    (Gemma's 262K entries hash in well under a second)."""
    h = hashlib.sha256(repr((len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)).encode())
    for piece, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        h.update(f"{i}\0{piece}\0".encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:16]

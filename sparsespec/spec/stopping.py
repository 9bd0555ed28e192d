"""When a generation ends: EOS, a stop string, max tokens, or the context limit.

Tokens are fed one at a time in commit order, so a round that commits past a stop is cut exactly
where decoding alone would have stopped.
"""

from __future__ import annotations


class StopChecker:
    def __init__(self, eos_ids, stop: list[str] | None, max_tokens: int, context_room: int,
                 tokenizer=None):
        self.eos_ids = set(eos_ids or ())
        self.stop = [s for s in (stop or []) if s]
        if self.stop and tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.context_room = context_room  # how many tokens fit before the context limit
        self.tokens: list[int] = []
        self.reason = ""

    def feed(self, token: int) -> bool:
        """Add one committed token; True when generation must end (the token is kept)."""
        self.tokens.append(token)
        if token in self.eos_ids:
            self.reason = "eos"
        elif self.stop and any(s in self.text_so_far() for s in self.stop):
            self.reason = "stop"
        elif len(self.tokens) >= self.max_tokens:
            self.reason = "max_tokens"
        elif len(self.tokens) >= self.context_room:
            self.reason = "context_limit"
        return bool(self.reason)

    def text_so_far(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def final_text(self) -> str:
        if self.tokenizer is None:
            return ""
        text = self.text_so_far()
        if self.reason == "stop":
            cut = min(text.find(s) for s in self.stop if s in text)
            text = text[:cut]
        return text

"""The verifier engine: the target model over a FullKVCache with one row per session.

A row's cache holds every committed token except the newest ("pending") one, so a round is one
forward over [pending, d1..dk] and plain autoregressive decoding is the same round with k = 0.
"""

from __future__ import annotations

import torch

from kvstore.full import FullKVCache


class Verifier:
    def __init__(self, model, capacity: int, batch: int = 1):
        self.model = model
        self.capacity = capacity
        self.cache = FullKVCache.for_model(model, capacity, batch)

    @torch.inference_mode()
    def prefill(self, row: int, tokens: list[int], chunk: int = 2048) -> None:
        """Fill `row` with `tokens` (everything committed but the pending token)."""
        self.cache.truncate(row, 0)
        self.cache.set_active([row])
        try:
            for i in range(0, len(tokens), chunk):
                ids = torch.tensor([tokens[i:i + chunk]], device=self.model.device)
                self.model(ids, self.cache, last_only=True)
        finally:
            self.cache.set_active(None)

    @torch.inference_mode()
    def extend(self, row: int, tokens: list[int]) -> None:
        """Append committed tokens to a row that already holds a prefix (multi-turn)."""
        self.cache.set_active([row])
        try:
            ids = torch.tensor([tokens], device=self.model.device)
            self.model(ids, self.cache, last_only=True)
        finally:
            self.cache.set_active(None)

    @torch.inference_mode()
    def verify(self, rows: list[int], inputs: list[list[int]]) -> list[torch.Tensor]:
        """One forward over several rows: inputs[i] = [pending, d1..dk_i].

        Returns logits [k_i + 1, V] per row. Rows are then `commit`ed to their new lengths.
        """
        width = max(len(x) for x in inputs)
        padded = [x + [x[-1]] * (width - len(x)) for x in inputs]  # pads are rolled back in commit
        self.cache.set_active(rows)
        try:
            ids = torch.tensor(padded, device=self.model.device)
            logits = self.model(ids, self.cache)                                # [R, T, V]
        finally:
            self.cache.set_active(None)
        return [logits[i, :len(x)] for i, x in enumerate(inputs)]

    def commit(self, row: int, length: int) -> None:
        """Keep `length` cached tokens in row (rolls back rejected drafts and pads)."""
        self.cache.truncate(row, length)

    def length(self, row: int) -> int:
        return int(self.cache.lengths[row])

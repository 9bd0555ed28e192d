"""The verifier engine: the target model over a FullKVCache with one row per session.

A row's cache holds every committed token except the newest ("pending"), so a round is one
forward over [pending, d1..dk] and plain autoregressive decoding is the same round with k = 0.
With summaries on, an ImportanceTracker watches the attention of tracked rows (kvstore/cache/summary.py);
with feeding on, a QueryRecorder keeps recorded rows' recent queries (what a feed's selection
scores with, kvstore/cache/feed.py) and `kv` / `kv_block` read the exact K/V a feed carries.
"""

from __future__ import annotations

import torch

from kvstore.cache.feed import QueryRecorder
from kvstore.cache.full import FullKVCache
from kvstore.cache.sparse import DEFAULT_OBS_WINDOW
from kvstore.cache.summary import ImportanceTracker, Summary, SummaryConfig
from sparsespec.spec.adaptive import MAX_K


class Verifier:
    def __init__(self, model, capacity: int, batch: int = 1, summary: SummaryConfig | None = None,
                 feed: bool = True):
        self.model = model
        self.capacity = capacity
        self.cache = FullKVCache.for_model(model, capacity, batch)
        self.tracker: ImportanceTracker | None = None
        self.tracked = [False] * batch          # rows whose importance is tracked (spec sessions)
        if summary is not None and summary.enabled:
            c = model.cfg
            self.tracker = ImportanceTracker(summary, c.num_layers, c.num_kv_heads, batch, capacity,
                                             windows=c.layer_windows)   # scores global layers only
            self.cache.observers.append(self.tracker.observe)
        self.recorder: QueryRecorder | None = None
        if feed:
            c = model.cfg
            self.recorder = QueryRecorder(c.num_layers, c.num_heads, c.head_dim, DEFAULT_OBS_WINDOW, MAX_K + 1,
                                          model.dtype, model.device)
            self.cache.observers.append(self.recorder.observe)

    def summary(self, row: int, want) -> "Summary | None":
        """The row's KV summary for a drafter that can hold `want` (None: nothing scored yet)."""
        if self.tracker is None:
            return None
        return self.tracker.summary(row, self.length(row), want)

    def track(self, row: int, on: bool) -> None:
        """Track the row's importance from its next forward on (its prefill, normally)."""
        self.tracked[row] = on and self.tracker is not None

    def record(self, row: int, on: bool) -> None:
        """Record the row's queries from its next forward on (a fed drafter's session)."""
        if self.recorder is not None:
            self.recorder.record(row, on)

    def kv(self, row: int, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(K, V, start): the row's exact K/V of positions [start, length) in `layer`, [Hkv,
        length - start, D] each, in position order. start is 0 on a global layer (views); on a
        local layer kept as a ring it is the lowest position still held (a copy of what is held,
        which covers the window [length - W, length) a selection keeps there)."""
        start = min(self.cache.held_from(row, layer), length)
        return (*self.cache.read(row, layer, start, length), start)

    def kv_block(self, row: int, layers: int, start: int, end: int) -> torch.Tensor:
        """[layers, 2, Hkv, end - start, D]: the row's K/V of positions [start, end), first
        `layers` layers (positions a local layer's ring no longer holds raise ValueError)."""
        return torch.stack([torch.stack(self.cache.read(row, i, start, end)) for i in range(layers)])

    def _forward(self, rows: list[int], ids: torch.Tensor, last_only: bool) -> torch.Tensor:
        """One forward over `rows` (ids [R, T]), bracketed for the tracker and the recorder."""
        tracker, recorder = self.tracker, self.recorder
        if tracker is not None:
            tracked = [self.tracked[r] for r in rows]
            lengths = self.cache.lengths[rows].tolist() if any(tracked) else [0] * len(rows)
            tracker.begin(rows, tracked, lengths)
        if recorder is not None:
            recorder.begin(rows, self.cache.lengths[rows].tolist(), ids.shape[1])
        self.cache.set_active(rows)
        try:
            return self.model(ids, self.cache, last_only=last_only)
        finally:
            self.cache.set_active(None)
            if tracker is not None:
                tracker.end()
            if recorder is not None:
                recorder.end()

    def prefill(self, row: int, tokens: list[int], chunk: int = 2048) -> None:
        """Fill `row` with `tokens` (everything committed but the pending token)."""
        self.prefill_many([row], [tokens], chunk)

    @torch.inference_mode()
    def prefill_many(self, rows: list[int], tokens: list[list[int]], chunk: int = 2048) -> None:
        """Fill rows[i] with tokens[i]. Prompts of one length are prefilled together, one forward
        [R, chunk] per chunk: sessions that arrive together read the weights once, as a round's
        verify does. Prompts of different lengths go in different forwards (no padding, so what a
        row's tracker and recorder see is its own prompt only)."""
        groups: dict[int, list[int]] = {}              # prompt length -> indices into rows
        for i, t in enumerate(tokens):
            groups.setdefault(len(t), []).append(i)
        for n, group in groups.items():
            group.sort(key=lambda i: rows[i])          # adjacent rows: a view of the cache, not a copy
            batch = [rows[i] for i in group]
            for row in batch:
                self.cache.truncate(row, 0)
            for i in range(0, n, chunk):
                ids = torch.tensor([tokens[j][i:i + chunk] for j in group], device=self.model.device)  # [R, T]
                self._forward(batch, ids, True)

    @torch.inference_mode()
    def extend(self, row: int, tokens: list[int]) -> None:
        """Append committed tokens to a row that already holds a prefix (multi-turn)."""
        self._forward([row], torch.tensor([tokens], device=self.model.device), True)

    @torch.inference_mode()
    def verify(self, rows: list[int], inputs: list[list[int]]) -> list[torch.Tensor]:
        """One forward over several rows: inputs[i] = [pending, d1..dk_i].

        Returns logits [k_i + 1, V] per row. Rows are then `commit`ed to their new lengths.
        """
        width = max(len(x) for x in inputs)
        padded = [x + [x[-1]] * (width - len(x)) for x in inputs]  # pads are rolled back in commit
        logits = self._forward(rows, torch.tensor(padded, device=self.model.device), False)  # [R, T, V]
        return [logits[i, :len(x)] for i, x in enumerate(inputs)]

    def commit(self, row: int, length: int) -> None:
        """Keep `length` cached tokens in row (rolls back rejected drafts and pads)."""
        self.cache.truncate(row, length)

    def can_commit(self, row: int, length: int) -> bool:
        """Whether the row can roll back to `length` exactly: a local layer's ring keeps only
        the last few hundred positions (FullKVCache.can_truncate); a longer rollback (a new turn
        that diverges early) needs a new prefill."""
        return self.cache.can_truncate(row, length)

    def length(self, row: int) -> int:
        return int(self.cache.lengths[row])

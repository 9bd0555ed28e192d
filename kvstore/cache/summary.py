"""KV summaries: the verifier tells the drafter which context positions its full attention reads.

The drafter's sparse cache drifts from what the full model attends to as the context grows; the
verifier attends over every entry anyway, so it can measure importance for free-ish and send
the top chunks. Three parts, all here so the wire format and its meaning live together:

- `SummaryConfig`: which layers are scored, the EMA, and when a summary is due.
- `ImportanceTracker`: an observer on the verifier's FullKVCache. For the observed layers it
  recomputes the softmax of (at most `query_window` of) a forward's queries over the row's keys,
  pools the mass over heads and queries, and folds it into a per-row EMA over positions.
- `Summary`: the top chunks in the middle range the drafter can use (after its sinks and window,
  up to its free slots), encoded compactly: varint delta-encoded chunk indices + fp16 scores.

A summary is advice. The drafter only changes which entries it keeps; a wrong or stale summary
can lower acceptance, never change a committed token.
"""

from __future__ import annotations

import math
import struct
import time
from dataclasses import dataclass

import torch

from sparsespec.errors import InvalidArgument

FORMAT_VERSION = 1


@dataclass(frozen=True)
class SummaryConfig:
    """Importance tracking on the verifier and what a summary holds. Errors name the field. When
    summaries are sent is the engine's (sparsespec.spec.summaries.ScheduleConfig)."""

    enabled: bool = True
    layers: tuple[int, ...] | None = None  # verifier layers scored; None = `auto_layers` evenly spaced
    auto_layers: int = 3
    decay: float = 0.8            # EMA per forward: score = decay * score + (1 - decay) * mass
    query_window: int = 16        # a forward's last queries that are scored (a prefill's last 16)
    chunk: int = 8                # granularity of the summary (positions per chunk)
    pool: str = "max"             # over heads and queries: "max" (what any head reads) or "mean"

    def __post_init__(self):
        for name in ("auto_layers", "query_window", "chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgument(f"summary.{name}", f"must be an integer >= 1, got {value!r}")
        if self.pool not in ("max", "mean"):
            raise InvalidArgument("summary.pool", f"must be 'max' or 'mean', got {self.pool!r}")
        if not 0.0 <= self.decay < 1.0:
            raise InvalidArgument("summary.decay", f"must be in [0, 1), got {self.decay}")
        if self.layers is not None:
            layers = tuple(self.layers)
            if not layers or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in layers):
                raise InvalidArgument("summary.layers", f"must be non-negative layer indices, got {self.layers!r}")
            object.__setattr__(self, "layers", tuple(sorted(set(layers))))

    def layers_for(self, num_layers: int) -> tuple[int, ...]:
        """The scored layers of a num_layers-deep verifier: the given ones, or `auto_layers`
        evenly spaced strictly inside (layer 0 and the last attend mostly locally)."""
        if self.layers is not None:
            bad = [x for x in self.layers if x >= num_layers]
            if bad:
                raise InvalidArgument("summary.layers", f"layer {bad[0]} does not exist (the verifier has "
                                                        f"{num_layers} layers)")
            return self.layers
        n = min(self.auto_layers, num_layers)
        return tuple(sorted({round((i + 1) * num_layers / (n + 1)) for i in range(n)} - {num_layers}))


@dataclass(frozen=True)
class SummaryWant:
    """What the drafter can use, reported in every draft reply: its free middle slots (budget -
    sink - window) and the sink and window it keeps anyway. slots 0 = send nothing."""

    slots: int
    sink: int
    window: int


# --- the verifier side ------------------------------------------------------------------------

class ImportanceTracker:
    """Per-row EMA of the attention mass the verifier's queries put on each position.

    Register with `cache.observers.append(tracker.observe)`; bracket each forward with
    `begin(rows, tracked, lengths)` / `end()`. Rows not tracked (AR sessions) cost nothing.
    """

    def __init__(self, config: SummaryConfig, num_layers: int, batch: int, capacity: int):
        self.config = config
        self.layers = frozenset(config.layers_for(num_layers))
        self.scores = torch.zeros(batch, capacity)        # [B, capacity] float32, host side
        self.forwards = torch.zeros(batch, dtype=torch.int64)  # scored forwards per row since reset
        self.seconds = 0.0                                 # time spent scoring (overhead metric)
        self._rows: list[int] = []
        self._tracked: list[bool] = []
        self._mass: torch.Tensor | None = None             # [R, S] summed over observed layers

    def begin(self, rows: list[int], tracked: list[bool], lengths: list[int]) -> None:
        """A forward over `rows` starts; lengths = their entries before it. Positions at or past
        a tracked row's length held rejected drafts or pads of earlier rounds (or a previous
        session): their history is dropped so a reused position starts clean."""
        self._rows, self._tracked, self._mass = list(rows), list(tracked), None
        for row, on, n in zip(rows, tracked, lengths):
            if on:
                self.forget_from(row, n)

    def observe(self, layer: int, q: torch.Tensor, keys: torch.Tensor, mask, lengths: torch.Tensor) -> None:
        """q: [R, H, T, D]; keys: [R, Hkv, S, D] (the new tokens' keys included); lengths: [R]
        each row's entries before this forward. Called by FullKVCache.attend for every layer."""
        if layer not in self.layers or not any(self._tracked):
            return
        t0 = time.perf_counter()
        idx = [i for i, on in enumerate(self._tracked) if on]
        w = min(q.shape[2], self.config.query_window)
        qs = q[idx, :, -w:].float()                                           # [r, H, w, D]
        ks = keys[idx].float()                                                # [r, Hkv, S, D]
        r, h, _, d = qs.shape
        hkv, s = ks.shape[1], ks.shape[2]
        logits = torch.einsum("rkgwd,rksd->rkgws", qs.view(r, hkv, h // hkv, w, d), ks) / math.sqrt(d)
        # Query t of row i sits at position lengths[i] + T - w + t and sees keys up to it.
        qpos = lengths[idx].view(-1, 1) + (q.shape[2] - w) + torch.arange(w).view(1, -1)  # [r, w]
        visible = torch.arange(s).view(1, 1, -1) <= qpos.unsqueeze(-1)        # [r, w, S]
        logits = logits.masked_fill(~visible.to(logits.device).view(r, 1, 1, w, s), float("-inf"))
        probs = logits.softmax(dim=-1).view(r, h * w, s)                      # [r, H*w, S]
        if self.config.pool == "max":
            mass = probs.amax(dim=1).cpu()                                    # [r, S]: what any head reads
        else:
            mass = probs.mean(dim=1).cpu()                                    # [r, S], sums to 1
        if self._mass is None:
            self._mass = torch.zeros(len(self._rows), s)
        self._mass[idx] += mass / len(self.layers)
        self.seconds += time.perf_counter() - t0

    def end(self) -> None:
        """Fold this forward's mass into the tracked rows' EMAs."""
        if self._mass is None:
            return
        decay, s = self.config.decay, self._mass.shape[1]
        for i, (row, on) in enumerate(zip(self._rows, self._tracked)):
            if on:
                self.scores[row, :s].mul_(decay).add_(self._mass[i], alpha=1.0 - decay)
                self.forwards[row] += 1
        self._mass = None

    def forget_from(self, row: int, length: int) -> None:
        """Drop the history of positions >= length (a row rolled back or reused from 0)."""
        self.scores[row, length:].zero_()
        if length == 0:
            self.forwards[row] = 0

    def summary(self, row: int, length: int, want: SummaryWant) -> "Summary | None":
        """The top chunks of row's middle range [want.sink, length - want.window), covering up to
        want.slots positions (None when there is nothing to say)."""
        c = self.config.chunk
        lo, hi = want.sink, length - want.window
        if want.slots < 1 or hi - lo < 1 or int(self.forwards[row]) == 0:
            return None
        first, last = lo // c, -(-hi // c)                                     # chunks touching [lo, hi)
        padded = torch.zeros((last - first) * c)
        a, b = first * c, min(last * c, length)
        padded[:b - a] = self.scores[row, a:b]
        mass = padded.view(-1, c).sum(dim=1)                                   # [chunks]
        take = min(mass.numel(), -(-want.slots // c))
        top = mass.topk(take)
        keep = top.values > 0
        chunks = (top.indices[keep] + first).tolist()
        if not chunks:
            return None
        scores = top.values[keep]
        scores = (scores / scores.max()).tolist()
        order = sorted(range(len(chunks)), key=chunks.__getitem__)
        return Summary(length=length, chunk=c, chunks=tuple(chunks[i] for i in order),
                       scores=tuple(_fp16(scores[i]) for i in order))


def _fp16(x: float) -> float:
    return struct.unpack("<e", struct.pack("<e", x))[0]


# --- the message --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Summary:
    """Chunks of `chunk` positions the verifier ranks highest, with their relative scores.

    chunks: increasing chunk indices (chunk j covers positions [j * chunk, (j + 1) * chunk));
    scores: in (0, 1], fp16-exact, one per chunk. `length` is the context it was computed over.
    """

    length: int
    chunk: int
    chunks: tuple[int, ...]
    scores: tuple[float, ...]

    def __post_init__(self):
        if len(self.chunks) != len(self.scores):
            raise InvalidArgument("summary", f"{len(self.chunks)} chunks with {len(self.scores)} scores")
        if self.chunk < 1 or self.length < 0:
            raise InvalidArgument("summary", f"chunk {self.chunk} / length {self.length} out of range")
        if any(b <= a for a, b in zip(self.chunks, self.chunks[1:])) or (self.chunks and self.chunks[0] < 0):
            raise InvalidArgument("summary", "chunk indices must be increasing and non-negative")
        if self.chunks and self.chunks[-1] * self.chunk >= self.length:
            raise InvalidArgument("summary", f"chunk {self.chunks[-1]} starts past the summarised "
                                             f"length {self.length}")

    def ranked_positions(self, lo: int, hi: int) -> list[int]:
        """Positions of the summary's chunks inside [lo, hi), best chunk first (ties: earlier)."""
        order = sorted(range(len(self.chunks)), key=lambda i: (-self.scores[i], self.chunks[i]))
        out = []
        for i in order:
            start = self.chunks[i] * self.chunk
            out.extend(range(max(start, lo), min(start + self.chunk, hi)))
        return out

    # Wire format, version 1 (all integers unsigned LEB128 varints):
    #   u8 version | length | chunk | count | count deltas (first absolute) | count x fp16 LE scores
    def encode(self) -> bytes:
        out = bytearray([FORMAT_VERSION])
        for v in (self.length, self.chunk, len(self.chunks)):
            _put_varint(out, v)
        prev = 0
        for c in self.chunks:
            _put_varint(out, c - prev)
            prev = c
        out += struct.pack(f"<{len(self.scores)}e", *self.scores)
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes) -> "Summary":
        """Bytes -> Summary; InvalidArgument("summary", ...) for anything malformed."""
        if not data:
            raise InvalidArgument("summary", "is empty")
        if data[0] != FORMAT_VERSION:
            raise InvalidArgument("summary", f"unknown format version {data[0]} (this build reads {FORMAT_VERSION})")
        at = 1
        length, at = _get_varint(data, at)
        chunk, at = _get_varint(data, at)
        count, at = _get_varint(data, at)
        if count > length:
            raise InvalidArgument("summary", f"{count} chunks for a length of {length}")
        chunks, prev = [], 0
        for i in range(count):
            delta, at = _get_varint(data, at)
            if i and delta == 0:
                raise InvalidArgument("summary", "chunk indices must be increasing")
            prev += delta
            chunks.append(prev)
        if len(data) - at != 2 * count:
            raise InvalidArgument("summary", f"expected {2 * count} bytes of scores, got {len(data) - at}")
        scores = struct.unpack(f"<{count}e", data[at:])
        if any(not 0.0 < s <= 1.0 for s in scores):   # also refuses NaN
            raise InvalidArgument("summary", "scores must be in (0, 1]")
        return cls(length, chunk, tuple(chunks), tuple(scores))


def _put_varint(out: bytearray, v: int) -> None:
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)


def _get_varint(data: bytes, at: int) -> tuple[int, int]:
    v = shift = 0
    while True:
        if at >= len(data):
            raise InvalidArgument("summary", "truncated")
        b = data[at]
        at += 1
        v |= (b & 0x7F) << shift
        if not b & 0x80:
            return v, at
        shift += 7
        if shift > 63:
            raise InvalidArgument("summary", "varint too long")

"""KV summaries: the verifier tells the drafter which context positions its full attention reads.

The drafter's sparse cache drifts from what the full model attends to as the context grows; the
verifier attends over every entry anyway, so it can measure importance for free-ish and send
the top chunks. The parts, all here so the wire format and its meaning live together:

- `SummaryConfig`: which layers are scored, how they are grouped, the EMA, the chunk.
- `ImportanceTracker`: an observer on the verifier's FullKVCache. For the observed layers it
  recomputes the softmax of (at most `query_window` of) a forward's queries over the row's keys,
  averages it over the queries of each KV head (its GQA group and the window), and folds it into
  a per-row EMA per (layer group, KV head, position).
- `Summary`: per (layer group, KV head), the top chunks of the middle range the drafter can use
  (after its sinks and window, up to its middle slots) with their share of that range's attention
  mass, encoded compactly: varint delta-encoded chunk indices + fp16 shares.
- `DrafterSummary`: a summary bound to one drafter's layers and KV heads (`Summary.for_drafter`):
  each drafter layer reads the group at the nearest relative depth, each KV head the verifier's
  head of the same index, or the group's mean over heads when the head counts differ. What
  verifier_guided reads (ctx.summary).

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

FORMAT_VERSION = 2
MAX_LISTS = 4096          # groups x heads one summary may carry (a decode bound, far above any model)
SHARE_SLACK = 2.0 ** -10  # a list's fp16 shares may sum to 1 + this (each rounds by <= 2^-11)


@dataclass(frozen=True)
class SummaryConfig:
    """Importance tracking on the verifier and what a summary holds. Errors name the field. When
    summaries are sent is the engine's (sparsespec.spec.summaries.ScheduleConfig)."""

    enabled: bool = True
    layers: tuple[int, ...] | None = None  # verifier layers scored; None = `auto_layers` evenly spaced
    auto_layers: int = 3
    groups: int | None = None     # layer groups a summary carries; None = one per scored layer
    decay: float = 0.8            # EMA per forward: score = decay * score + (1 - decay) * mass
    query_window: int = 16        # a forward's last queries that are scored (a prefill's last 16)
    chunk: int = 8                # granularity of the summary (positions per chunk)

    def __post_init__(self):
        for name in ("auto_layers", "query_window", "chunk"):
            _check_positive(f"summary.{name}", getattr(self, name))
        if self.groups is not None:
            _check_positive("summary.groups", self.groups)
        if not 0.0 <= self.decay < 1.0:
            raise InvalidArgument("summary.decay", f"must be in [0, 1), got {self.decay}")
        if self.layers is not None:
            layers = tuple(self.layers)
            if not layers or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in layers):
                raise InvalidArgument("summary.layers", f"must be non-negative layer indices, got {self.layers!r}")
            object.__setattr__(self, "layers", tuple(sorted(set(layers))))

    def layers_for(self, num_layers: int, windows: tuple[int | None, ...] | None = None) -> tuple[int, ...]:
        """The scored layers of a num_layers-deep verifier: the given ones, or `auto_layers`
        evenly spaced strictly inside (layer 0 and the last attend mostly locally).

        With local layers (`windows`, ModelConfig.layer_windows: Gemma 3) only global layers are
        scored: a local layer attends within its window, which the drafter keeps anyway (and the
        verifier keeps it as a ring, not by position). Auto: `auto_layers` of the global layers,
        evenly spaced from the first to the last; a local layer named in `layers` is refused."""
        local = {i for i, w in enumerate(windows or ()) if w is not None}
        if self.layers is not None:
            bad = [x for x in self.layers if x >= num_layers]
            if bad:
                raise InvalidArgument("summary.layers", f"layer {bad[0]} does not exist (the verifier has "
                                                        f"{num_layers} layers)")
            bad = [x for x in self.layers if x in local]
            if bad:
                raise InvalidArgument("summary.layers", f"layer {bad[0]} is a local (sliding-window) layer; "
                                                        f"only global layers are scored")
            return self.layers
        if local:
            glob = [i for i in range(num_layers) if i not in local]
            n = min(self.auto_layers, len(glob))
            if n <= 1:
                return tuple(glob[len(glob) // 2:][:n])
            return tuple(sorted({glob[round(i * (len(glob) - 1) / (n - 1))] for i in range(n)}))
        n = min(self.auto_layers, num_layers)
        return tuple(sorted({round((i + 1) * num_layers / (n + 1)) for i in range(n)} - {num_layers}))

    def groups_for(self, num_layers: int, windows: tuple[int | None, ...] | None = None
                   ) -> tuple[tuple[int, ...], ...]:
        """The scored layers split into `groups` runs of consecutive ones by depth (the i-th of n
        goes to group i * G // n): what one entry of a summary averages over."""
        layers = self.layers_for(num_layers, windows)
        g = len(layers) if self.groups is None else self.groups
        if g > len(layers):
            raise InvalidArgument("summary.groups", f"{g} groups of {len(layers)} scored layers: at most "
                                                    f"one group per scored layer")
        return tuple(tuple(x for i, x in enumerate(layers) if i * g // len(layers) == j) for j in range(g))


def _check_positive(field: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgument(field, f"must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class SummaryWant:
    """What the drafter can use, reported in every draft reply: its middle slots (budget - sink
    - window) and the sink and window it keeps anyway. slots 0 = send nothing."""

    slots: int
    sink: int
    window: int


# --- the verifier side ------------------------------------------------------------------------

class ImportanceTracker:
    """Per-row EMA of the attention mass each KV head's queries put on each position, per layer
    group: scores [batch, groups, Hkv, capacity] (host side, float32).

    Register with `cache.observers.append(tracker.observe)`; bracket each forward with
    `begin(rows, tracked, lengths)` / `end()`. Rows not tracked (AR sessions) cost nothing.
    """

    def __init__(self, config: SummaryConfig, num_layers: int, num_kv_heads: int, batch: int, capacity: int,
                 windows: tuple[int | None, ...] | None = None):
        self.config = config
        self.num_layers = num_layers
        groups = config.groups_for(num_layers, windows)   # global layers only (see layers_for)
        self.group_of = {layer: g for g, members in enumerate(groups) for layer in members}
        self._weight = [1.0 / len(members) for members in groups]      # a group averages its layers
        # The verifier layer each group stands for (the rounded mean depth; increasing).
        self.group_layers = tuple(round(sum(members) / len(members)) for members in groups)
        self.scores = torch.zeros(batch, len(groups), num_kv_heads, capacity)
        self.forwards = torch.zeros(batch, dtype=torch.int64)  # scored forwards per row since reset
        self.seconds = 0.0                                 # time spent scoring (overhead metric)
        self._rows: list[int] = []
        self._tracked: list[bool] = []
        self._mass: torch.Tensor | None = None             # [R, groups, Hkv, S] this forward's

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
        group = self.group_of.get(layer)
        if group is None or not any(self._tracked):
            return
        if keys is None:   # a local layer: FullKVCache shows its q only (layers_for scores none)
            raise RuntimeError(f"layer {layer} is local: the tracker scores global layers only")
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
        mass = logits.softmax(dim=-1).mean(dim=(2, 3)).cpu()                  # [r, Hkv, S], each sums to 1
        if self._mass is None:
            self._mass = torch.zeros(len(self._rows), *self.scores.shape[1:3], s)
        self._mass[idx, group] += mass * self._weight[group]
        self.seconds += time.perf_counter() - t0

    def end(self) -> None:
        """Fold this forward's mass into the tracked rows' EMAs."""
        if self._mass is None:
            return
        decay, s = self.config.decay, self._mass.shape[-1]
        for i, (row, on) in enumerate(zip(self._rows, self._tracked)):
            if on:
                self.scores[row, ..., :s].mul_(decay).add_(self._mass[i], alpha=1.0 - decay)
                self.forwards[row] += 1
        self._mass = None

    def forget_from(self, row: int, length: int) -> None:
        """Drop the history of positions >= length (a row rolled back or reused from 0)."""
        self.scores[row, ..., length:].zero_()
        if length == 0:
            self.forwards[row] = 0

    def summary(self, row: int, length: int, want: SummaryWant) -> "Summary | None":
        """Per (group, KV head), the top chunks of row's middle range [want.sink, length -
        want.window) covering up to want.slots positions, with their share of the range's mass
        (None when there is nothing to say)."""
        c = self.config.chunk
        lo, hi = want.sink, length - want.window
        if not self.group_layers or want.slots < 1 or hi - lo < 1 or int(self.forwards[row]) == 0:
            return None
        first, last = lo // c, -(-hi // c)                                     # chunks touching [lo, hi)
        groups, heads = self.scores.shape[1:3]
        padded = torch.zeros(groups, heads, (last - first) * c)
        padded[..., lo - first * c:hi - first * c] = self.scores[row, ..., lo:hi]   # only the middle counts
        mass = padded.view(groups, heads, -1, c).sum(dim=-1)                   # [G, Hkv, chunks]
        total = mass.sum(dim=-1, keepdim=True)
        top = mass.topk(min(mass.shape[-1], -(-want.slots // c)), dim=-1)
        shares = torch.where(total > 0, top.values / total.clamp_min(1e-30), 0.0).half().float()
        chunks, values = [], []
        for g in range(groups):
            for h in range(heads):
                keep = shares[g, h] > 0                                        # fp16 may round a share to 0
                order = top.indices[g, h][keep].argsort()
                chunks.append(tuple((top.indices[g, h][keep][order] + first).tolist()))
                values.append(tuple(shares[g, h][keep][order].tolist()))
        if not any(chunks):
            return None
        return Summary(length=length, chunk=c, layers=self.num_layers, group_layers=self.group_layers,
                       heads=heads, chunks=tuple(chunks), shares=tuple(values))


# --- the message --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Summary:
    """Per (layer group, KV head) of the verifier, the chunks of `chunk` positions it ranks
    highest with their share of the middle range's attention mass.

    layers: the verifier's layer count; group_layers: per group, the verifier layer it stands for
    (increasing, < layers: how a drafter maps its own layers to groups). chunks / shares: one
    entry per (group, head), group-major (entry g * heads + h): increasing chunk indices (chunk j
    covers positions [j * chunk, (j + 1) * chunk)) and their shares in (0, 1], fp16-exact,
    summing to at most 1. `length` is the context it was computed over. Invalid ones are refused
    with InvalidArgument naming the field (summary.chunks, summary.shares, ...).
    """

    length: int
    chunk: int
    layers: int
    group_layers: tuple[int, ...]
    heads: int
    chunks: tuple[tuple[int, ...], ...]
    shares: tuple[tuple[float, ...], ...]

    def __post_init__(self):
        if self.length < 0:
            raise InvalidArgument("summary.length", f"must be >= 0, got {self.length}")
        for name in ("chunk", "layers", "heads"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"summary.{name}", f"must be >= 1, got {getattr(self, name)}")
        g = self.group_layers
        if not 1 <= len(g) <= self.layers:
            raise InvalidArgument("summary.groups", f"{len(g)} groups for {self.layers} layers")
        if g[0] < 0 or g[-1] >= self.layers or any(b <= a for a, b in zip(g, g[1:])):
            raise InvalidArgument("summary.group_layers", f"must be increasing layers < {self.layers}, got {g}")
        lists = len(g) * self.heads
        if lists > MAX_LISTS:
            raise InvalidArgument("summary.heads", f"{len(g)} groups x {self.heads} heads exceed {MAX_LISTS}")
        if len(self.chunks) != lists or len(self.shares) != lists:
            raise InvalidArgument("summary.chunks", f"{len(self.chunks)} chunk lists and {len(self.shares)} share "
                                                    f"lists for {len(g)} groups x {self.heads} heads")
        for chunks, shares in zip(self.chunks, self.shares):
            if len(chunks) != len(shares):
                raise InvalidArgument("summary.shares", f"{len(chunks)} chunks with {len(shares)} shares")
            if any(b <= a for a, b in zip(chunks, chunks[1:])) or (chunks and chunks[0] < 0):
                raise InvalidArgument("summary.chunks", "chunk indices must be increasing and non-negative")
            if chunks and chunks[-1] * self.chunk >= self.length:
                raise InvalidArgument("summary.chunks", f"chunk {chunks[-1]} starts past the summarised "
                                                        f"length {self.length}")
            if any(not 0.0 < s <= 1.0 for s in shares):   # also refuses NaN
                raise InvalidArgument("summary.shares", "must be in (0, 1]")
            if sum(shares) > 1.0 + SHARE_SLACK:
                raise InvalidArgument("summary.shares", f"a list sums to {sum(shares):.4f} > 1")

    @property
    def groups(self) -> int:
        return len(self.group_layers)

    def entry(self, group: int, head: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """(chunks, shares) of one (group, KV head)."""
        i = group * self.heads + head
        return self.chunks[i], self.shares[i]

    def for_drafter(self, num_layers: int, num_kv_heads: int) -> "DrafterSummary":
        """This summary as a drafter of num_layers layers and num_kv_heads KV heads reads it:
        layer j takes the group whose relative depth, (layer + 0.5) / layers, is nearest its own
        (j + 0.5) / num_layers (ties: the shallower); heads map one to one when the counts agree,
        else every head reads the group's mean over the verifier's heads."""
        depths = [(x + 0.5) / self.layers for x in self.group_layers]
        groups = tuple(min(range(self.groups), key=lambda g: (abs(depths[g] - (j + 0.5) / num_layers), g))
                       for j in range(num_layers))
        return DrafterSummary(self, groups, num_kv_heads == self.heads)

    # Wire format, version 2 (all integers unsigned LEB128 varints):
    #   u8 version | length | chunk | layers | groups | heads
    #   | groups x group layer (the first absolute, then deltas >= 1)
    #   | groups x heads entries, group-major: count | count chunk deltas (first absolute) | count x fp16 LE shares
    def encode(self) -> bytes:
        out = bytearray([FORMAT_VERSION])
        for v in (self.length, self.chunk, self.layers, self.groups, self.heads):
            _put_varint(out, v)
        _put_deltas(out, self.group_layers)
        for chunks, shares in zip(self.chunks, self.shares):
            _put_varint(out, len(chunks))
            _put_deltas(out, chunks)
            out += struct.pack(f"<{len(shares)}e", *shares)
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes) -> "Summary":
        """Bytes -> Summary; InvalidArgument naming the field (summary.version, summary.chunks,
        ...; plain "summary" for empty, truncated or trailing bytes) for anything malformed."""
        if not data:
            raise InvalidArgument("summary", "is empty")
        if data[0] != FORMAT_VERSION:
            raise InvalidArgument("summary.version", f"unknown format version {data[0]} (this build reads "
                                                     f"{FORMAT_VERSION})")
        at = 1
        length, at = _get_varint(data, at)
        chunk, at = _get_varint(data, at)
        layers, at = _get_varint(data, at)
        groups, at = _get_varint(data, at)
        heads, at = _get_varint(data, at)
        for name, value in (("chunk", chunk), ("layers", layers)):
            if value < 1:
                raise InvalidArgument(f"summary.{name}", f"must be >= 1, got {value}")
        if not 1 <= groups <= layers:
            raise InvalidArgument("summary.groups", f"{groups} groups for {layers} layers")
        if heads < 1 or groups * heads > MAX_LISTS:
            raise InvalidArgument("summary.heads", f"{heads} heads x {groups} groups (at most {MAX_LISTS} entries)")
        group_layers, at = _get_deltas(data, at, groups, "summary.group_layers")
        if group_layers[-1] >= layers:
            raise InvalidArgument("summary.group_layers", f"layer {group_layers[-1]} of {layers}")
        chunks, shares = [], []
        for _ in range(groups * heads):
            count, at = _get_varint(data, at)
            if count > (len(data) - at) // 3 or count > -(-length // chunk):
                raise InvalidArgument("summary.count", f"{count} chunks do not fit the bytes or the length {length}")
            entry, at = _get_deltas(data, at, count, "summary.chunks")
            if len(data) - at < 2 * count:
                raise InvalidArgument("summary", "truncated")
            chunks.append(tuple(entry))
            shares.append(struct.unpack_from(f"<{count}e", data, at))
            at += 2 * count
        if at != len(data):
            raise InvalidArgument("summary", f"{len(data) - at} trailing bytes")
        return cls(length, chunk, layers, tuple(group_layers), heads, tuple(chunks), tuple(shares))


@dataclass(frozen=True)
class DrafterSummary:
    """A summary bound to one drafter (`Summary.for_drafter`): groups[j] is the summary group
    drafter layer j reads; per_head: KV head h reads the verifier's head h (else their mean)."""

    summary: Summary
    groups: tuple[int, ...]
    per_head: bool

    @property
    def length(self) -> int:
        return self.summary.length

    def shares(self, layer: int, lo: int, hi: int, num_kv_heads: int) -> torch.Tensor | None:
        """float32 [num_kv_heads, hi - lo]: each middle position's share of the verifier's
        attention mass for this layer and head (a chunk's share spread evenly over its positions;
        0 where the summary names nothing). None when it names nothing inside [lo, hi)."""
        s, c = self.summary, self.summary.chunk
        g = self.groups[layer]
        heads = [s.entry(g, h) for h in range(s.heads)]
        out = torch.zeros(len(heads), hi - lo)
        offsets = torch.arange(c)
        for h, (chunks, shares) in enumerate(heads):
            if not chunks:
                continue
            pos = (torch.tensor(chunks).view(-1, 1) * c + offsets).view(-1) - lo          # [count * c]
            val = (torch.tensor(shares, dtype=torch.float32) / c).repeat_interleave(c)
            inside = (pos >= 0) & (pos < hi - lo)
            out[h, pos[inside]] = val[inside]
        if not bool((out > 0).any()):
            return None
        if self.per_head:
            return out
        return out.mean(dim=0, keepdim=True).expand(num_kv_heads, -1).contiguous()


def _put_varint(out: bytearray, v: int) -> None:
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)


def _put_deltas(out: bytearray, values) -> None:
    prev = 0
    for v in values:
        _put_varint(out, v - prev)
        prev = v


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


def _get_deltas(data: bytes, at: int, count: int, field: str) -> tuple[list[int], int]:
    """count increasing values, the first absolute, the rest as deltas >= 1."""
    values, prev = [], 0
    for i in range(count):
        delta, at = _get_varint(data, at)
        if i and delta == 0:
            raise InvalidArgument(field, "must be increasing")
        prev += delta
        values.append(prev)
    return values, at

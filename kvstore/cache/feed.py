"""KV feeds: the verifier's exact K/V, sent to a drafter that shares its layers.

A drafter whose K/V are the verifier's (the same model, or a `layers:N` cut, whatever its
--drafter-weights) need not compute them: the verifier holds every committed entry exactly. Its
cache (SparseKVCache with policy "fed") then holds only what it is fed:

- a **selection** over [0, length): per layer and KV head the positions to keep (increasing), with
  the K/V of those the drafter does not hold already (`added`). The first feed of a session is
  one (the drafter does no prefill); later ones re-select as the context grows.
- a **block**: the exact K/V of the positions [start, length) committed since the last feed. They
  replace what the drafter computed there itself (its pending token and accepted drafts), so its
  cache never drifts from the verifier's.

Either way the drafter's entries at positions >= `start` are dropped first and, after the feed,
[0, length) is exact: the drafter forwards only the newest pending token (position `length`)
and its drafts. Which positions the drafter "holds" is computed the same way on both sides
(`held`), so `added` carries each missing entry once and nothing else.

Wire format v2 (little endian): the header below, then either the block
[layers, 2, kv_heads, length - start, head_dim] or a selection: its per-layer counts int32
[layers] (a local layer keeps its window, a global one the budget: they differ), each layer's
positions int32 [kv_heads, count], then `added` [2, A, head_dim] in (layer, head, position)
order; K/V in a 16-bit dtype (bf16 by default: half the bytes of fp32, and the drafter
only proposes, so its rounding never reaches an output).

The verifier's side (what it records to choose, when it feeds) is QueryRecorder below and
sparsespec/spec/feed.py.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch

from sparsespec.errors import InvalidArgument

MAGIC = b"SSFD"
FORMAT_VERSION = 2
_HEADER = struct.Struct("<4sBB2xqqiiiiq")   # magic, version, dtype, start, length, layers, kv_heads,
                                            # head_dim, selected (sum of the counts; -1: a block), added
WIRE_DTYPES = {1: torch.bfloat16, 2: torch.float16, 3: torch.float32}
_CODES = {v: k for k, v in WIRE_DTYPES.items()}
MAX_FEED_BYTES = 1 << 30                    # a selection of 1024 entries x 64 layers x 8 heads x 128 dims fits


@dataclass(frozen=True)
class FeedWant:
    """What a fed drafter needs the verifier to know, reported in its replies.

    kv_source: the identity of the weights its K/V come from (LlamaModel.kv_source): the verifier
    feeds only a drafter whose source is its own. The rest sizes and schedules the feed."""

    kv_source: str
    layers: int
    kv_heads: int
    head_dim: int
    budget: int
    sink: int
    window: int
    chunk: int
    tail_cap: int


@dataclass(frozen=True)
class Feed:
    start: int                           # the drafter's exact length this feed follows
    length: int                          # exact length after it
    block: torch.Tensor | None = None    # [L, 2, Hkv, length - start, D]: K/V of [start, length)
    positions: tuple[torch.Tensor, ...] | None = None  # L x [Hkv, m_l] int64: a re-selection over [0, length)
    added: torch.Tensor | None = None    # [2, A, D]: K/V of the selected positions not held

    def __post_init__(self):
        if self.positions is not None:   # a stacked [L, Hkv, m] tensor is taken too
            object.__setattr__(self, "positions", tuple(self.positions))

    @property
    def is_selection(self) -> bool:
        return self.positions is not None

    def encode(self, dtype: torch.dtype = torch.bfloat16) -> bytes:
        if dtype not in _CODES:
            raise InvalidArgument("feed.dtype", f"must be one of {list(_CODES)}, got {dtype}")
        if self.is_selection:
            layers, kv_heads = len(self.positions), self.positions[0].shape[0]
            counts = torch.tensor([p.shape[1] for p in self.positions], dtype=torch.int32)
            head_dim, count, m = self.added.shape[-1], self.added.shape[1], int(counts.sum())
            body = [_raw(counts), *(_raw(p.to(torch.int32)) for p in self.positions), _raw(self.added.to(dtype))]
        else:
            layers, _, kv_heads, _, head_dim = self.block.shape
            m, count = -1, 0
            body = [_raw(self.block.to(dtype))]
        header = _HEADER.pack(MAGIC, FORMAT_VERSION, _CODES[dtype], self.start, self.length, layers,
                              kv_heads, head_dim, m, count)
        return b"".join([header, *body])

    @classmethod
    def decode(cls, data: bytes, max_bytes: int = MAX_FEED_BYTES) -> "Feed":
        """Parse and check a feed on its own (what the drafter's state must match is checked by
        SparseKVCache.apply_feed); every refusal is InvalidArgument naming the field."""
        if len(data) > max_bytes:
            raise InvalidArgument("feed", f"{len(data)} bytes exceed the limit of {max_bytes}")
        if len(data) < _HEADER.size:
            raise InvalidArgument("feed", f"{len(data)} bytes are too short for a feed header")
        magic, version, code, start, length, layers, kv_heads, head_dim, m, count = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise InvalidArgument("feed", "is not a KV feed (bad magic)")
        if version != FORMAT_VERSION:
            raise InvalidArgument("feed.version", f"{version} is not supported (this drafter reads {FORMAT_VERSION})")
        if code not in WIRE_DTYPES:
            raise InvalidArgument("feed.dtype", f"unknown dtype code {code}")
        for name, value in (("layers", layers), ("kv_heads", kv_heads), ("head_dim", head_dim)):
            if value < 1:
                raise InvalidArgument(f"feed.{name}", f"must be >= 1, got {value}")
        if not 0 <= start <= length:
            raise InvalidArgument("feed.length", f"need 0 <= start <= length, got start {start}, length {length}")
        dtype = WIRE_DTYPES[code]
        item = dtype.itemsize
        if m < 0:
            n = length - start
            shape = (layers, 2, kv_heads, n, head_dim)
            _expect(data, _HEADER.size + math.prod(shape) * item)
            block = _tensor(data, _HEADER.size, dtype, shape)
            return cls(start, length, block=block)
        at = _HEADER.size + layers * 4
        if len(data) < at:
            raise InvalidArgument("feed", f"is {len(data)} bytes, too short for {layers} layer counts")
        counts = _tensor(data, _HEADER.size, torch.int32, (layers,)).tolist()
        if min(counts) < 0 or max(counts) > length or sum(counts) != m:
            raise InvalidArgument("feed.positions", f"per-layer counts {counts} must lie in [0, {length}] "
                                                    f"and sum to the header's {m}")
        ashape = (2, count, head_dim)
        _expect(data, at + kv_heads * m * 4 + math.prod(ashape) * item)
        positions = []
        for c in counts:
            p = _tensor(data, at, torch.int32, (kv_heads, c)).to(torch.int64)    # [Hkv, c]
            at += kv_heads * c * 4
            if c and (int(p.min()) < 0 or int(p.max()) >= length):
                raise InvalidArgument("feed.positions", f"positions must lie in [0, {length}), got "
                                                        f"[{int(p.min())}, {int(p.max())}]")
            if c > 1 and not bool((p.diff(dim=-1) > 0).all()):
                raise InvalidArgument("feed.positions", "must be strictly increasing per layer and head")
            positions.append(p)
        return cls(start, length, positions=tuple(positions), added=_tensor(data, at, dtype, ashape))


def held(positions: torch.Tensor, have: torch.Tensor) -> torch.Tensor:
    """bool [Hkv, m]: which of the wanted positions [Hkv, m] are among `have` [Hkv, c] (both
    increasing per head): the entries a selection feed need not carry. The drafter and the
    verifier compute it the same way, so `added` is in the same order on both sides."""
    if have.shape[1] == 0:
        return torch.zeros(positions.shape, dtype=torch.bool)
    have, positions = have.contiguous(), positions.contiguous()
    idx = torch.searchsorted(have, positions).clamp_(max=have.shape[1] - 1)     # [Hkv, m]
    return have.gather(1, idx) == positions


# --- the verifier side ------------------------------------------------------------------------

class QueryRecorder:
    """The last `window` queries of every layer, per recorded row of the verifier's cache: what a
    feed's selection scores with (the real queries, not the drafter's approximations).

    An observer of FullKVCache (`cache.observers.append(recorder.observe)`), bracketed by
    `begin(rows, lengths, num_new)` / `end()`. Slots are indexed by position (mod the ring), so
    a round's rejected drafts are simply overwritten by the next round's committed tokens; the
    ring is `slack` deeper than the window so that never happens to a position still inside it.
    """

    def __init__(self, num_layers: int, num_heads: int, head_dim: int, window: int, slack: int,
                 dtype=torch.float32, device="cpu"):
        self.num_layers, self.num_heads, self.head_dim = num_layers, num_heads, head_dim
        self.window, self.cap = window, window + slack
        self.dtype, self.device = dtype, device
        self._rings: dict[int, list[torch.Tensor]] = {}   # row -> [L] x [H, cap, D] (at most one per row)
        self._on: set[int] = set()                         # rows being recorded
        self._writes: list[tuple] = []        # this forward's (row index, ring, slots [keep], first query)

    def record(self, row: int, on: bool) -> None:
        """Record `row`'s queries from its next forward on (its prefill, normally), or stop. A
        row that stops keeps what it recorded: the same context decoded again (a bench's AR run,
        then its speculative one, over one prefill) finds its queries still there."""
        if on and row not in self._rings:
            self._rings[row] = [torch.zeros(self.num_heads, self.cap, self.head_dim, dtype=self.dtype,
                                            device=self.device) for _ in range(self.num_layers)]
        (self._on.add if on else self._on.discard)(row)

    def begin(self, rows: list[int], lengths: list[int], num_new: int) -> None:
        """A forward of num_new tokens over `rows` (lengths: their entries before it) starts:
        where each recorded row's last queries go, once for all layers."""
        keep = min(num_new, self.cap)
        self._writes = [(i, self._rings[row], torch.arange(n + num_new - keep, n + num_new, device=self.device)
                         % self.cap, num_new - keep)
                        for i, (row, n) in enumerate(zip(rows, lengths)) if row in self._on]

    def observe(self, layer: int, q: torch.Tensor, keys, mask, lengths) -> None:
        """q: [R, H, T, D] of the forward's rows (in begin's order)."""
        for i, ring, slots, first in self._writes:
            ring[layer][:, slots] = q[i, :, first:]

    def end(self) -> None:
        self._writes = []

    def queries(self, row: int, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(queries [H, w, D], positions [w]) of the last w <= window positions before `length`."""
        w = min(self.window, length)
        pos = torch.arange(length - w, length)
        return self._rings[row][layer][:, pos % self.cap], pos


def _raw(t: torch.Tensor) -> bytes:
    t = t.contiguous().cpu()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _expect(data: bytes, size: int) -> None:
    if len(data) != size:
        raise InvalidArgument("feed", f"is {len(data)} bytes; its header describes {size}")


def _tensor(data: bytes, offset: int, dtype: torch.dtype, shape) -> torch.Tensor:
    count = math.prod(shape)
    if count == 0:
        return torch.zeros(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data[offset:offset + count * dtype.itemsize]), dtype=dtype).view(shape)

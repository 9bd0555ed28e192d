"""Feeding a drafter: the verifier's side (kvstore/cache/feed.py has what a feed is).

A `Feeder` per session mirrors what its fed drafter holds (the selection it was sent, where that
selection was made, how far its K/V are exact) and makes each round's feed from the verifier's
own cache: a block of the K/V committed since the last feed, or a new selection chosen by the
"fed" policy over the verifier's exact keys and its real recent queries (QueryRecorder), carrying
only the entries the drafter lacks. A selection goes out when the drafter's tail would not hold
the round's block, pending token and drafts (the tail is exact, so a long one costs nothing but
its slots), and early when the acceptance of the last rounds drops (FeedConfig): a selection made
for low acceptance that did not lift it doubles the wait before the next such one, since at 4K
one costs a session ~70 ms (1.2 AR steps at S = 4) and a drafter can be weak on a text whatever
it holds (4 x 4K, 96 tokens: 6 such re-selections took 10-12% of the decode and tau was 2.80,
2.87 without them; docs/benchmarks.md, "Fed re-selection"). The mirror moves
only when the drafter took the feed; any drafter failure resets it, and the re-open is fed a
whole selection.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field

import torch

from kvstore.cache.feed import Feed, FeedWant, held
from kvstore.cache.policies import SelectionContext, get_policy
from kvstore.cache.policies.base import choose_view
from sparsespec.errors import InvalidArgument

WIRE_DTYPE = torch.bfloat16   # K/V on the wire (the drafter only proposes: its rounding never reaches an output)
KINDS = ("open", "refresh", "block")


def feedable(want: FeedWant, model) -> str | None:
    """Why `model` (the verifier) cannot feed a drafter that wants `want`; None if it can."""
    cfg = model.cfg
    if want.kv_source != model.kv_source:
        return (f"the drafter's K/V come from other weights (kv_source {want.kv_source}, the verifier's "
                f"{model.kv_source})")
    if want.layers > cfg.num_layers or want.kv_heads != cfg.num_kv_heads or want.head_dim != cfg.head_dim:
        return (f"the drafter's cache ({want.layers} layers x {want.kv_heads} KV heads x {want.head_dim}) "
                f"does not fit the verifier's ({cfg.num_layers} x {cfg.num_kv_heads} x {cfg.head_dim})")
    return None


@dataclass(frozen=True)
class FeedConfig:
    """When a feeder re-selects early. Validated here; errors name the field."""

    alpha_threshold: float = 0.5   # re-select when the alpha of the last alpha_window rounds drops below this
    alpha_window: int = 4          # rounds, counted since the last selection
    alpha_wait_max: int = 64       # rounds: the longest wait a low-acceptance re-selection backs off to

    def __post_init__(self):
        if not 0.0 <= self.alpha_threshold <= 1.0:
            raise InvalidArgument("feed.alpha_threshold", f"must be in [0, 1], got {self.alpha_threshold}")
        if isinstance(self.alpha_window, bool) or not isinstance(self.alpha_window, int) or self.alpha_window < 1:
            raise InvalidArgument("feed.alpha_window", f"must be an integer >= 1, got {self.alpha_window!r}")
        if isinstance(self.alpha_wait_max, bool) or not isinstance(self.alpha_wait_max, int) \
                or self.alpha_wait_max < self.alpha_window:
            raise InvalidArgument("feed.alpha_wait_max", f"must be an integer >= alpha_window ({self.alpha_window}), "
                                                         f"got {self.alpha_wait_max!r}")


@dataclass
class Feeder:
    want: FeedWant
    config: FeedConfig = field(default_factory=FeedConfig)
    selection: list[torch.Tensor] | None = None   # [layers] x [Hkv, m]: the drafter's selected positions
    selected_at: int = 0                          # the length that selection was made at
    fed: int = 0                                  # the drafter's exact length
    # Feeds delivered, by kind: "open" (the first selection, or one after a reset), "refresh" (a
    # later re-selection), "block" (a round's committed K/V): count, bytes; "seconds" making them.
    traffic: Counter = field(default_factory=Counter)
    _next: tuple | None = None                    # the mirror after the feed in flight, and its kind
    _recent: deque = field(default_factory=deque)  # (drafted, accepted) of the last rounds since the last selection
    _rounds: int = 0                              # rounds since the last selection
    _wait: int = 0                                # rounds before a low-acceptance re-selection may go
    _for_alpha: bool = False                      # the last selection was made because acceptance dropped
    _counted: Counter = field(default_factory=Counter)   # traffic at the last take_counts

    def __post_init__(self):
        self._wait = self.config.alpha_window

    @property
    def sent(self) -> int:
        return sum(self.traffic[k] for k in KINDS)

    @property
    def bytes_sent(self) -> int:
        return sum(self.traffic[f"{k}_bytes"] for k in KINDS)

    @property
    def selections(self) -> int:
        return self.traffic["open"] + self.traffic["refresh"]

    def reset(self) -> None:
        """The drafter lost the session (or never had it): the next feed is a whole selection."""
        self.selection, self.selected_at, self.fed, self._next = None, 0, 0, None

    def next(self, verifier, row: int, k: int) -> bytes:
        """This round's feed for a draft of k tokens: everything committed but the pending token."""
        t0 = time.perf_counter()
        length = verifier.length(row)
        tail = length - self.selected_at
        w = self.want
        full = self.selection is None or tail + k > w.tail_cap
        if full or self._dropping():
            kind = "open" if self.selection is None else "refresh"
            feed = self._select(verifier, row, length)
            self._next = (list(feed.positions), length, length, kind, not full)
        else:
            feed = Feed(self.fed, length, block=verifier.kv_block(row, w.layers, self.fed, length))
            self._next = (self.selection, self.selected_at, length, "block", False)
        data = feed.encode(WIRE_DTYPE)
        self.traffic["seconds"] += time.perf_counter() - t0
        return data

    def delivered(self, data: bytes) -> None:
        """The drafter took the feed in flight: the mirror moves to what it now holds."""
        if self._next is None:
            return
        self.selection, self.selected_at, self.fed, kind, for_alpha = self._next
        if kind != "block":
            self._recent.clear()
            self._rounds, self._for_alpha = 0, for_alpha
        self._next = None
        self.traffic[kind] += 1
        self.traffic[f"{kind}_bytes"] += len(data)

    def take_counts(self) -> Counter:
        """The traffic since the last call: a turn's share (the feeder lives across turns)."""
        counts = self.traffic - self._counted
        self._counted = Counter(self.traffic)
        return counts

    def observe(self, drafted: int, accepted: int) -> None:
        """A round with drafts finished."""
        c = self.config
        self._recent.append((drafted, accepted))
        while len(self._recent) > c.alpha_window:
            self._recent.popleft()
        self._rounds += 1
        if self._rounds == c.alpha_window and self._for_alpha:   # judge the low-acceptance selection
            self._wait = min(2 * self._wait, c.alpha_wait_max) if self._low() else c.alpha_window

    def _low(self) -> bool:
        """The alpha of the last alpha_window rounds is below the threshold."""
        if len(self._recent) < self.config.alpha_window:
            return False
        drafted = sum(d for d, _ in self._recent)
        return drafted > 0 and sum(a for _, a in self._recent) / drafted < self.config.alpha_threshold

    def _dropping(self) -> bool:
        """The selection no longer serves: alpha is low, and the wait since the last selection is over."""
        return self._rounds >= self._wait and self._low()

    def _select(self, verifier, row: int, length: int) -> Feed:
        w = self.want
        policy = get_policy("fed")()
        group = verifier.model.cfg.num_heads // w.kv_heads
        windows = verifier.model.cfg.layer_windows       # the drafter's layers are the verifier's first ones
        positions, added_k, added_v = [], [], []
        for layer in range(w.layers):
            keys, values, first = verifier.kv(row, layer, length)              # [Hkv, length - first, D] each

            def context(lo: int, hi: int, m: int, layer=layer, keys=keys) -> SelectionContext:
                # only for a middle to choose: a global layer, whose keys start at position 0
                q, qpos = verifier.recorder.queries(row, layer, length)        # [H, w, D], [w]
                return SelectionContext(layer=layer, length=length, keys=keys, queries=q,
                                        query_positions=qpos, group_size=group, chunk=w.chunk,
                                        lo=lo, hi=hi, m=m)

            local = windows[layer]     # a local layer keeps its window (kvstore/cache/sparse.py)
            pos = choose_view(policy, length, *((w.budget, w.sink, w.window) if local is None else (local, 0, local)),
                              w.kv_heads, context, device="cpu")                # [Hkv, m]
            missing = (~held(pos, self._holding(layer))).to(keys.device)   # positions stay on the CPU (the wire's)
            # A local layer's keys start at `first` (what its ring holds): its selection, the
            # window [length - W, length), lies inside, as Verifier.kv promises.
            idx = (pos - first).to(keys.device).unsqueeze(-1).expand(-1, -1, keys.shape[-1])   # [Hkv, m, D]
            added_k.append(keys.gather(1, idx)[missing])                       # [a, D]
            added_v.append(values.gather(1, idx)[missing])
            positions.append(pos)
        added = torch.stack([torch.cat(added_k), torch.cat(added_v)])          # [2, A, D]
        return Feed(self.fed, length, positions=tuple(positions), added=added)

    def _holding(self, layer: int) -> torch.Tensor:
        """[Hkv, c]: the positions the drafter holds below `fed` (its selection, then its exact tail)."""
        if self.selection is None:
            return torch.zeros(self.want.kv_heads, 0, dtype=torch.int64)
        tail = torch.arange(self.selected_at, self.fed).expand(self.want.kv_heads, -1)
        return torch.cat([self.selection[layer], tail], dim=1)

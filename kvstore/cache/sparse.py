"""SparseKVCache: the drafter's cache. A fixed device budget per layer, a host tier behind it.

Two tiers:

- host tier: every entry ever appended, per layer K/V [Hkv, capacity, D] in CPU RAM (pinned when
  the device is CUDA). A policy can bring any entry back without recomputing it.
- device view, per layer: K/V [Hkv, budget + tail_cap, D] and their original positions
  [Hkv, budget + tail_cap]. The view is the SELECTED entries (chosen at the last re-selection;
  each KV head may keep different positions; sinks and the recent window always) followed by the
  TAIL (every token appended since, in order, the same for all heads).

Keys are cached already rotated at their original positions, so moving an entry between tiers or
slots never re-rotates it. Before the first selection (the prefill) attention is exact over the
host tier; `upkeep()` makes the first selection and later ones every reselect_interval appended
tokens. Invariant 5 (docs/design.md): device entries <= budget + tail_cap at all times, and
<= budget right after a re-selection, where tail_cap = reselect_interval + max_draft + 1.

Policy "full" (budget None) keeps every entry on the device, with no host tier.

Local layers (a sliding window W, `layer_windows`; Gemma 3) are not budgeted: a query there
never sees more than its window, so such a layer's selection is simply the last W positions (its
view is W + tail_cap entries, exact) and its attention is masked to the window. The budget, and
the policy, apply to the global layers only.

Policy "fed" has no host tier either and never selects by itself: the verifier sends it the
selection and the exact K/V of every committed token (`apply_feed`, kvstore/cache/feed.py); what
it computes itself is only the current round's pending token and drafts, in the tail.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvstore.cache.base import KVCache
from kvstore.cache.feed import Feed, held
from kvstore.cache.full import FullKVCache
from kvstore.cache.policies import Policy, SelectionContext, get_policy
from kvstore.cache.policies.base import choose_view, estimates_shares
from sparsespec.errors import ContextOverflow, InvalidArgument
from sparsespec.kernels.attention import attend, attend_window, causal_block_mask

DEFAULT_SINK = 4
DEFAULT_WINDOW = 64
DEFAULT_OBS_WINDOW = 16


@dataclass(frozen=True)
class SparseConfig:
    """How the drafter keeps its KV. Validated at construction; errors name the field.

    sink / window default to 4 / min(64, budget // 4), clamped so tiny budgets stay valid
    (budget 16 -> sink 4, window 4); values given explicitly are never changed, and an explicit
    sink + window > budget is an error. After construction both are plain ints.
    """

    policy: str = "chunk_topk"
    budget: int | None = 256        # KV entries per layer on the device; None only for "full"
    sink: int | None = None         # first positions always kept (default 4)
    window: int | None = None       # most recent positions always kept (default min(64, budget // 4))
    chunk: int = 8                  # selection unit of chunked policies
    reselect_interval: int = 16     # R: re-select after this many appended tokens
    obs_window: int = DEFAULT_OBS_WINDOW  # recent queries per layer kept as the policies' query proxy
    max_draft: int = 64             # longest draft a round may append (sizes the tail)
    fallback: str = "chunk_topk"    # verifier_guided: its own policy (alone until the first summary)

    def __post_init__(self):
        cls = get_policy(self.policy)  # raises InvalidArgument("policy", ...) listing the known ones
        fallback = get_policy(self.fallback)
        if fallback.keeps_all or fallback.uses_summary or not estimates_shares(fallback):
            raise InvalidArgument("fallback", f"must be a budgeted policy that needs no summary and "
                                              f"estimates attention shares, got {self.fallback!r}")
        for name in ("chunk", "reselect_interval", "obs_window", "max_draft"):
            _check_int(name, getattr(self, name), 1)
        for name in ("sink", "window"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 0)
        budget = self.budget
        if cls.keeps_all:
            # The full policy has no budget; one given (a sweep passing the same --budget to every
            # policy) is dropped rather than refused.
            object.__setattr__(self, "budget", None)
            object.__setattr__(self, "sink", DEFAULT_SINK if self.sink is None else self.sink)
            object.__setattr__(self, "window", 0 if self.window is None else self.window)
            return
        if budget is None:
            raise InvalidArgument("budget", f"required for policy {self.policy!r} (None only for 'full')")
        _check_int("budget", budget, 1)
        sink, window = self.sink, self.window
        if sink is not None and window is not None:
            if sink + window > budget:
                raise InvalidArgument("window", f"sink + window ({sink} + {window}) must be <= budget ({budget})")
        elif sink is not None:
            if sink > budget:
                raise InvalidArgument("sink", f"sink ({sink}) must be <= budget ({budget})")
            window = min(DEFAULT_WINDOW, budget // 4, budget - sink)
        elif window is not None:
            if window > budget:
                raise InvalidArgument("window", f"window ({window}) must be <= budget ({budget})")
            sink = min(DEFAULT_SINK, budget - window)
        else:
            window = min(DEFAULT_WINDOW, budget // 4)
            sink = min(DEFAULT_SINK, budget // 4)
        object.__setattr__(self, "sink", sink)
        object.__setattr__(self, "window", window)

    @property
    def tail_cap(self) -> int:
        """Most entries the device view may hold beyond the selection."""
        return self.reselect_interval + self.max_draft + 1

    @property
    def keeps_all(self) -> bool:
        return self.budget is None


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(name, f"must be an integer, got {value!r}")
    if value < minimum:
        raise InvalidArgument(name, f"must be >= {minimum}")


def _check_windows(windows, num_layers: int) -> tuple[int | None, ...]:
    if windows is None:
        return (None,) * num_layers
    windows = tuple(windows)
    if len(windows) != num_layers or any(w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1)
                                         for w in windows):
        raise InvalidArgument("layer_windows", f"need {num_layers} entries, each None or an integer >= 1, "
                                               f"got {windows}")
    return windows


class SparseKVCache(KVCache):
    """The drafter's KV cache for one session (batch 1) under `config.budget` entries per layer."""

    def __init__(self, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 capacity: int, config: SparseConfig, dtype=torch.float32, device="cpu",
                 host_device="cpu", layer_windows: tuple[int | None, ...] | None = None):
        if not isinstance(config, SparseConfig):
            raise TypeError(f"config must be a SparseConfig, got {type(config).__name__}")
        _check_int("capacity", capacity, 1)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.config = config
        self.policy: Policy = get_policy(config.policy)(config)
        self.num_layers, self.num_heads, self.num_kv_heads, self.head_dim = num_layers, num_heads, num_kv_heads, head_dim
        self.group_size = num_heads // num_kv_heads
        self.capacity = capacity
        self.layer_windows = _check_windows(layer_windows, num_layers)
        self._global = [i for i, w in enumerate(self.layer_windows) if w is None]   # budgeted layers
        self.device = torch.device(device)
        self.host_device = torch.device(host_device)
        self.dtype = dtype
        self.summary = None          # the verifier's latest summary; policies see it as ctx.summary
        self.selections = 0          # re-selections made so far (a metric)
        self._t = 0                  # tokens in the forward in progress
        self._mask: torch.Tensor | None = None
        self._causal = False
        self.fed = self.policy.fed   # its entries come from the verifier: no host tier
        self._fed_len = 0

        if config.keeps_all:
            self._full: FullKVCache | None = FullKVCache(num_layers, num_kv_heads, head_dim, capacity,
                                                         1, dtype, device, windows=self.layer_windows)
            self.budget = None
            self.tail_cap = 0
            return
        self._full = None
        self.budget: int | None = config.budget
        self.tail_cap = config.tail_cap
        # Entries a selection keeps per layer: the budget, or a local layer's window.
        self.keeps = [self.budget if w is None else w for w in self.layer_windows]
        pin = self.device.type == "cuda" and self.host_device.type == "cpu"
        self._copy_async = pin

        def host():
            return torch.zeros(num_kv_heads, capacity, head_dim, dtype=dtype, device=host_device, pin_memory=pin)

        tier = 0 if self.fed else num_layers
        self.host_k = [host() for _ in range(tier)]                            # [Hkv, capacity, D]
        self.host_v = [host() for _ in range(tier)]
        self.dev_k = [torch.zeros(num_kv_heads, keep + self.tail_cap, head_dim, dtype=dtype, device=device)
                      for keep in self.keeps]                                   # [Hkv, keep + tail_cap, D]
        self.dev_v = [torch.zeros_like(t) for t in self.dev_k]
        self.dev_pos = [torch.zeros(num_kv_heads, keep + self.tail_cap, dtype=torch.int64, device=device)
                        for keep in self.keeps]                                 # [Hkv, keep + tail_cap]
        self._length = 0
        self._sel_length: int | None = None   # length at the last selection; None = never selected
        self._num_sel = [0] * num_layers      # selected entries per head, per layer
        # Recent queries per layer, a ring [H, obs_cap, D]: position p lives in slot p % obs_cap.
        # The recorded positions are always [length - obs_count, length) (every appended token
        # is recorded, a rollback drops a suffix), so no positions need storing. Kept
        # obs_window + tail_cap deep so a rollback of drafts still leaves obs_window real ones.
        self._obs_cap = config.obs_window + self.tail_cap
        self._obs_count = 0
        self._q = ([torch.zeros(num_heads, self._obs_cap, head_dim, dtype=dtype, device=device)
                    for _ in range(num_layers)] if self.policy.needs_queries else [])

    @classmethod
    def for_model(cls, model, capacity: int, config: SparseConfig) -> "SparseKVCache":
        c = model.cfg
        return cls(c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, capacity, config,
                   model.dtype, model.device, layer_windows=c.layer_windows)

    # --- state ----------------------------------------------------------------------------

    @property
    def batch(self) -> int:
        return 1

    @property
    def length(self) -> int:
        """Entries appended so far (committed + drafted)."""
        if self._full is not None:
            return int(self._full.lengths[0])
        return self._length

    @property
    def selected(self) -> bool:
        """Whether a selection is in force (False during the prefill phase and for "full")."""
        return self._full is None and self._sel_length is not None

    @property
    def selection_length(self) -> int | None:
        """The length at the last selection (None before the first one, and for "full")."""
        return self._sel_length if self.selected else None

    @property
    def tail_length(self) -> int:
        return self._length - self._sel_length if self.selected else 0

    def room(self) -> int:
        """Tokens that can be appended before `upkeep()` must run (and within capacity)."""
        free = self.capacity - self.length
        if self.selected:
            free = min(free, self.tail_cap - self.tail_length)
        return free

    def device_entries(self, layer: int | None = None) -> int:
        """Entries resident in `layer`'s device view (the same for every head, and for every
        layer but local ones); None: the most of any layer.

        0 before the first selection: the prefill attends over the host tier. "full": the length.
        """
        if self._full is not None:   # a local layer of "full" keeps its ring (FullKVCache)
            slots = self._full.slots
            return min(self.length, max(slots) if layer is None else slots[layer])
        if not self.selected:
            return 0
        return (max(self._num_sel) if layer is None else self._num_sel[layer]) + self.tail_length

    def selected_positions(self, layer: int) -> torch.Tensor:
        """[Hkv, n] int64: positions chosen at the last selection, per KV head, increasing.

        Before the first selection (and for "full") every position [0, length) is visible.
        """
        if not self.selected:
            return torch.arange(self.length).expand(self.num_kv_heads, self.length)
        return self.dev_pos[layer][:, :self._num_sel[layer]].cpu()

    def view_positions(self, layer: int) -> torch.Tensor:
        """[Hkv, n] int64: positions of every entry the next forward attends to (selected + tail)."""
        if not self.selected:
            return self.selected_positions(layer)
        return self.dev_pos[layer][:, :self.device_entries(layer)].cpu()

    def device_view(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(K [Hkv, n, D], V [Hkv, n, D], positions [Hkv, n]) of the device view (after a selection)."""
        if not self.selected:
            raise RuntimeError("no device view before the first selection (call upkeep())")
        n = self.device_entries(layer)
        return self.dev_k[layer][:, :n], self.dev_v[layer][:, :n], self.dev_pos[layer][:, :n]

    def device_bytes(self) -> int:
        """Exact bytes of the device KV tensors (K, V, positions) allocated."""
        if self._full is not None:
            return self._full.device_bytes()
        return sum(t.numel() * t.element_size() for t in self.dev_k + self.dev_v + self.dev_pos)

    def host_bytes(self) -> int:
        """Exact bytes of the host tier (K, V)."""
        if self._full is not None:
            return 0
        return sum(t.numel() * t.element_size() for t in self.host_k + self.host_v)

    def obs_bytes(self) -> int:
        """Exact device bytes of the recorded-query rings (policy working memory, not KV, so
        not counted in device_bytes; 0 for policies that do not read queries)."""
        if self._full is not None:
            return 0
        return sum(t.numel() * t.element_size() for t in self._q)

    # --- the forward (KVCache contract) ---------------------------------------------------

    def begin_forward(self, num_new: int) -> torch.Tensor:
        if self._full is not None:
            return self._full.begin_forward(num_new)
        if num_new < 1:
            raise ValueError(f"a forward appends at least one token, got {num_new}")
        n = self._length
        if n + num_new > self.capacity:
            raise ContextOverflow("length", f"KV cache capacity {self.capacity} exceeded ({n} + {num_new})")
        if self.selected and self.tail_length + num_new > self.tail_cap:
            raise RuntimeError(f"sparse KV tail full ({self.tail_length} + {num_new} > {self.tail_cap}): "
                               f"call upkeep() first (room() = {self.room()})")
        self._t = num_new
        # The causal mask of the budgeted (global) layers; local layers mask to their window.
        past = self._num_sel[self._global[0]] + self.tail_length if self.selected and self._global else n
        self._causal = n == 0 and num_new > 1                # prefill of an empty cache
        self._mask = None if num_new == 1 or self._causal else causal_block_mask(
            torch.tensor([past], device=self.device), num_new, past + num_new)
        return torch.arange(n, n + num_new, device=self.device).view(1, -1)

    def attend(self, layer, q, k, v):
        """q: [1, H, T, D], k/v: [1, Hkv, T, D] (rotated) -> [1, H, T, D]."""
        if self._full is not None:
            return self._full.attend(layer, q, k, v)
        keys, values = self.append(layer, q, k, v)
        window = self.layer_windows[layer]
        if window is not None:          # the view is consecutive positions, the last S - T of them past
            past = torch.tensor([keys.shape[1] - self._t])
            return attend_window(q, keys.unsqueeze(0), values.unsqueeze(0), past, window)
        return attend(q, keys.unsqueeze(0), values.unsqueeze(0), self._mask, self._causal)

    def decodes_from_view(self) -> bool:
        """Whether this forward is a one-token step whose attention is plain softmax over the
        keys `append` returns (no mask): what a batched decode kernel may take over."""
        return self._full is None and self._t == 1 and self._mask is None and not self._causal

    def append(self, layer, q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this forward's entries of `layer` (host tier, query ring, device view) and return
        the keys / values [Hkv, S, D] it attends over; `attend` is this plus the attention. A local
        layer's keys start at its first query's window, so a decode step over them is unmasked."""
        if q.shape[0] != 1:
            raise ValueError(f"SparseKVCache holds one session; got batch {q.shape[0]}")
        t, start = self._t, self._length
        end = start + t
        if self.fed:
            if not self.selected:
                raise RuntimeError("a fed cache is fed before its first forward")
        else:
            hk, hv = self.host_k[layer], self.host_v[layer]
            hk[:, start:end].copy_(k[0], non_blocking=self._copy_async)
            hv[:, start:end].copy_(v[0], non_blocking=self._copy_async)
        if self.policy.needs_queries:
            cap = self._obs_cap
            slots = torch.arange(max(start, end - cap), end, device=q.device) % cap   # [min(T, cap)]
            self._q[layer][:, slots] = q[0, :, -cap:].detach()
        if not self.selected:
            # Prefill phase: exact over the host tier.
            if self.device == self.host_device:
                keys, values = hk[:, :end], hv[:, :end]
            else:
                keys = torch.cat([hk[:, :start].to(self.device, non_blocking=True), k[0]], dim=1)
                values = torch.cat([hv[:, :start].to(self.device, non_blocking=True), v[0]], dim=1)
        else:
            at = self._num_sel[layer] + self.tail_length
            dk, dv = self.dev_k[layer], self.dev_v[layer]
            dk[:, at:at + t] = k[0]
            dv[:, at:at + t] = v[0]
            self.dev_pos[layer][:, at:at + t] = torch.arange(start, end, device=self.device)
            keys, values = dk[:, :at + t], dv[:, :at + t]                       # [Hkv, S, D]
        window = self.layer_windows[layer]
        if window is not None:                   # a local layer's view is consecutive positions
            skip = max(0, start - window + 1 - (end - keys.shape[1]))
            keys, values = keys[:, skip:], values[:, skip:]
        return keys, values

    def end_forward(self) -> None:
        if self._full is not None:
            return self._full.end_forward()
        self._length += self._t
        if self.policy.needs_queries:
            self._obs_count = min(self._obs_cap, self._obs_count + self._t)
        self._t = 0
        self._mask = None

    # --- rollback and selection -----------------------------------------------------------

    def adopt_prefix(self, keys: list[torch.Tensor], values: list[torch.Tensor], length: int | None = None) -> None:
        """Start from an exact prefix of `length` tokens computed elsewhere: per layer K/V
        [Hkv, m, D] of positions [length - m, length), rotated (e.g. the verifier's own cache
        rows, for a drafter that shares those layers: Verifier.kv). m = length on a global layer;
        a local layer may give only its last min(length, W) (all a verifier's ring holds: no
        query here reads further back, the selection keeps the window, and a rollback never goes
        below `length`). length defaults to keys[0].shape[1]. The cache is left in its prefill
        phase, exactly as if the tokens had been appended here, so a sweep over many policies and
        budgets pays for one prefill. Queries are not recorded: append the last obs_window tokens
        normally before the first selection."""
        if self.length:
            raise RuntimeError("adopt_prefix needs an empty cache")
        if len(keys) != self.num_layers or len(values) != self.num_layers:
            raise ValueError(f"need K/V for {self.num_layers} layers, got {len(keys)} / {len(values)}")
        n = keys[0].shape[1] if length is None else length
        if n > self.capacity:
            raise ContextOverflow("length", f"prefix of {n} exceeds capacity {self.capacity}")
        for layer, w in enumerate(self.layer_windows):
            m = keys[layer].shape[1]
            if not (n if w is None else min(n, w)) <= m <= n or values[layer].shape[1] != m:
                raise ValueError(f"layer {layer}: {m} entries for a prefix of {n}")
        if self._full is not None:
            self._full.load(0, keys, values, n)
            return
        for layer in range(self.num_layers):
            m = keys[layer].shape[1]
            self.host_k[layer][:, n - m:n] = keys[layer]                               # [Hkv, capacity, D]
            self.host_v[layer][:, n - m:n] = values[layer]
        self._length = n

    def set_summary(self, summary) -> bool:
        """Take the verifier's latest summary (a kvstore.cache.summary.DrafterSummary). A policy that reads it
        re-selects at once, so the advice applies to the very next draft; the device view stays
        within the budget (a re-selection empties the tail). Returns whether it re-selected."""
        self.summary = summary
        if self._full is not None or not self.policy.uses_summary or not self.selected:
            return False
        self._select()
        return True

    def truncate(self, n: int) -> None:
        """Roll back to `n` entries (drops rejected drafts).

        n at or after the last selection only shortens the tail; an earlier n re-selects over
        [0, n) from the host tier (the selection may hold positions that no longer exist).
        """
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {n}")
        if self._full is not None:
            self._full.truncate(0, n)
            return
        if self.fed and 0 < n < self._fed_len:
            raise ValueError(f"a fed cache cannot drop exact entries (fed to {self._fed_len}, asked {n})")
        self._obs_count = max(0, self._obs_count - (self._length - n))   # drop the suffix's queries
        self._length = n
        if n == 0:
            self._fed_len = 0
        if self.selected and n < self._sel_length:
            if n == 0:
                self._sel_length, self._num_sel = None, [0] * self.num_layers
            else:
                self._select()

    def upkeep(self, force: bool = False) -> bool:
        """Re-select if never selected (and not empty), if the tail reached reselect_interval, or
        if forced. Returns whether it re-selected; afterwards device_entries() <= budget."""
        if self._full is not None or self._length == 0 or self.fed:
            return False      # a fed cache is re-selected by its feeds
        if self.selected and not force and self.tail_length < self.config.reselect_interval:
            return False
        self._select()
        return True

    def _select(self) -> None:
        """Choose the device view over [0, length) for every layer and gather it from the host tier."""
        if self.fed:
            raise RuntimeError("a fed cache cannot select by itself: the verifier feeds it a selection")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)   # async device->host writes must land first
        n, cfg = self._length, self.config
        hd = self.host_device
        for layer, keep in enumerate(self.keeps):
            sink, window = (cfg.sink, cfg.window) if self.layer_windows[layer] is None else (0, keep)
            pos = choose_view(self.policy, n, keep, sink, window, self.num_kv_heads,
                              lambda lo, hi, m: self._context(layer, n, lo, hi, m), hd)   # [Hkv, count]
            count = pos.shape[1]
            idx = pos.unsqueeze(-1).expand(-1, -1, self.head_dim)               # [Hkv, count, D]
            self.dev_k[layer][:, :count] = self.host_k[layer][:, :n].gather(1, idx).to(self.device)
            self.dev_v[layer][:, :count] = self.host_v[layer][:, :n].gather(1, idx).to(self.device)
            self.dev_pos[layer][:, :count] = pos.to(self.device)
        self._num_sel = [min(n, keep) for keep in self.keeps]
        self._sel_length = n
        self.selections += 1

    def _context(self, layer: int, n: int, lo: int, hi: int, m: int) -> SelectionContext:
        w = min(self.config.obs_window, self._obs_count)
        if w:
            qpos = torch.arange(n - w, n, device=self.device)                   # [w]
            q = self._q[layer][:, qpos % self._obs_cap].to(self.host_device)    # [H, w, D]
            qpos = qpos.to(self.host_device)
        else:
            q = qpos = None
        return SelectionContext(layer=layer, length=n, keys=self.host_k[layer][:, :n], queries=q,
                                query_positions=qpos, group_size=self.group_size,
                                chunk=self.config.chunk, lo=lo, hi=hi, m=m, summary=self.summary)

    # --- feeds (policy "fed": kvstore/cache/feed.py) ----------------------------------------

    @property
    def fed_length(self) -> int:
        """Positions [0, fed_length) hold the verifier's exact K/V (a fed cache; 0 otherwise)."""
        return self._fed_len

    def apply_feed(self, feed: Feed) -> None:
        """Take a feed: drop the entries at positions >= feed.start (what this drafter computed
        itself), then hold [0, feed.length) exactly. Everything is checked before anything
        changes; a refusal is InvalidArgument naming the field (a start that does not match is
        the caller's: Drafter raises StateMismatch)."""
        if not self.fed:
            raise InvalidArgument("feed", f"policy {self.policy.name!r} keeps its own KV: send no feed")
        layers, heads, dim = ((len(feed.positions), feed.positions[0].shape[0], feed.added.shape[-1])
                              if feed.is_selection else
                              (feed.block.shape[0], feed.block.shape[2], feed.block.shape[-1]))
        for name, got, have in (("layers", layers, self.num_layers), ("kv_heads", heads, self.num_kv_heads),
                                ("head_dim", dim, self.head_dim)):
            if got != have:
                raise InvalidArgument(f"feed.{name}", f"{got}, but this drafter's cache has {have}")
        if feed.start != self._fed_len:
            raise ValueError(f"feed.start {feed.start} != the cache's fed length {self._fed_len}")
        if feed.length + 1 > self.capacity:
            raise ContextOverflow("feed.length", f"{feed.length} entries and a pending token exceed "
                                                 f"the drafter's capacity {self.capacity}")
        if feed.is_selection:
            self._take_selection(feed)
        else:
            self._take_block(feed)
        self._length = self._fed_len = feed.length

    def _kept(self, layer: int, start: int) -> int:
        """Entries of `layer`'s device view at positions < start (the view is increasing per head)."""
        return self._num_sel[layer] + (start - self._sel_length) if self.selected else 0

    def _take_selection(self, feed: Feed) -> None:
        for layer, (pos, keep) in enumerate(zip(feed.positions, self.keeps)):
            if pos.shape[1] > keep:
                what = "budget" if self.layer_windows[layer] is None else "local window"
                raise InvalidArgument("feed.positions", f"layer {layer}: {pos.shape[1]} entries per head "
                                                        f"exceed its {what} {keep}")
        kept = [self._kept(layer, feed.start) for layer in range(self.num_layers)]
        holds = [held(feed.positions[layer], self.dev_pos[layer][:, :kept[layer]].cpu())
                 for layer in range(self.num_layers)]                          # [L] x [Hkv, m_l]
        missing = sum(int((~h).sum()) for h in holds)
        if missing != feed.added.shape[1]:
            raise InvalidArgument("feed.added", f"carries {feed.added.shape[1]} entries; the drafter "
                                                f"lacks {missing} of the selection")
        at = 0
        for layer, have in enumerate(holds):
            pos = feed.positions[layer].to(self.device).contiguous()           # [Hkv, m]
            m, kept_l = pos.shape[1], kept[layer]
            have = have.to(self.device)
            n_new = int((~have).sum())
            idx = torch.searchsorted(self.dev_pos[layer][:, :kept_l].contiguous(), pos).clamp_(max=max(kept_l - 1, 0))
            idx = idx.unsqueeze(-1).expand(-1, -1, self.head_dim)               # [Hkv, m, D]
            for side, dst in enumerate((self.dev_k[layer], self.dev_v[layer])):
                rows = torch.empty(self.num_kv_heads, m, self.head_dim, dtype=self.dtype, device=self.device)
                if kept_l:
                    rows[have] = dst[:, :kept_l].gather(1, idx)[have]
                rows[~have] = feed.added[side, at:at + n_new].to(rows)
                dst[:, :m] = rows
            self.dev_pos[layer][:, :m] = pos
            self._num_sel[layer] = m
            at += n_new
        self._sel_length = feed.length
        self.selections += 1

    def _take_block(self, feed: Feed) -> None:
        if not self.selected:
            raise InvalidArgument("feed", "a session's first feed must be a selection, not a block")
        n = feed.length - feed.start
        if (feed.length - self._sel_length) + 1 > self.tail_cap:
            raise InvalidArgument("feed.length", f"a block to {feed.length} overflows the drafter's tail "
                                                 f"({self.tail_cap} entries after the selection at "
                                                 f"{self._sel_length}): send a selection")
        for layer in range(self.num_layers):
            at = self._kept(layer, feed.start)
            self.dev_k[layer][:, at:at + n] = feed.block[layer, 0]
            self.dev_v[layer][:, at:at + n] = feed.block[layer, 1]
            self.dev_pos[layer][:, at:at + n] = torch.arange(feed.start, feed.length, device=self.device)

    def __repr__(self) -> str:
        c = self.config
        return (f"SparseKVCache(policy={c.policy!r}, budget={c.budget}, sink={c.sink}, window={c.window}, "
                f"length={self.length}, device_entries={self.device_entries()})")

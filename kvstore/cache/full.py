"""FullKVCache: the verifier's cache. Preallocated, every entry kept, rows of different lengths."""

from __future__ import annotations

import torch

from kvstore.cache.base import KVCache
from sparsespec.kernels.attention import attend, attend_block, attend_window, block_supported, causal_block_mask
from sparsespec.models.config import ring_slots


class FullKVCache(KVCache):
    """K/V for `batch` rows (sessions) of up to `capacity` tokens each, for every layer.

    Rows may hold different lengths. A forward runs over the active rows (all by default, or those
    named by `set_active`) and appends the same number T of tokens to each: callers pad shorter
    drafts, then `truncate` each row to what it committed. `truncate` is the rollback of rejected
    drafts: it only moves a length, the tensors stay allocated.

    `windows` (ModelConfig.layer_windows: per layer a sliding window W, or None for a global
    layer) makes a local layer attend only over its window, and keep only what its window can
    still read: per row a **ring** of R = W - 1 + SB slots (`ring_slots`; position p in slot
    p % R; SB = `ring_block`, max(MAX_BLOCK, W) + 1), clamped to the capacity (a clamped layer keeps
    every position in its own slot and attends through attend_window). A forward of T > SB tokens
    goes through a ring in sub-blocks of SB: write a sub-block, attend its queries over the ring
    with a [B, 1, SB, R] mask from each slot's position, next. `top` (per row: 1 + the highest
    position written since the row was emptied) gives each slot's position; rows of different
    lengths and rollbacks of up to SB - 1 positions are exact, a deeper rollback is refused
    (`can_truncate`). Observers see a local layer's q only (keys and mask None): its keys may be a
    ring. `read` / `held_from` give a layer's K/V by position, whatever its storage.
    """

    block_verify = True   # verifies through attend_block; False: the masked reference (the bench compares)

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int,
                 batch: int = 1, dtype=torch.float32, device="cpu",
                 windows: tuple[int | None, ...] | None = None, ring_block: int | None = None):
        if ring_block is not None and (isinstance(ring_block, bool) or int(ring_block) < 1):
            raise ValueError(f"ring_block must be an integer >= 1, got {ring_block!r}")
        if windows is not None:
            windows = tuple(windows)
            if len(windows) != num_layers or any(w is not None and (isinstance(w, bool) or int(w) < 1)
                                                 for w in windows):
                raise ValueError(f"windows must give each of the {num_layers} layers a window >= 1 or None, "
                                 f"got {windows!r}")
            if all(w is None for w in windows):
                windows = None
        self.windows = windows
        # Entries per row of each layer: the capacity, or a local layer's ring (clamped to it).
        self.slots = [capacity if w is None else ring_slots(w, capacity, ring_block)
                      for w in (windows or (None,) * num_layers)]
        self.ring = [s < capacity for s in self.slots]          # layers stored as rings
        self._rings = any(self.ring)
        self.k = [torch.zeros(batch, num_kv_heads, s, head_dim, dtype=dtype, device=device) for s in self.slots]
        self.v = [torch.zeros(batch, num_kv_heads, s, head_dim, dtype=dtype, device=device) for s in self.slots]
        self.lengths = torch.zeros(batch, dtype=torch.int64)    # [B], host side
        self.top = torch.zeros(batch, dtype=torch.int64)        # [B]: 1 + highest position written (rings)
        self.capacity = capacity
        self.observers: list = []  # obs(layer, q, keys, mask, past_lengths) before attention (summaries)
        self._rows: list[int] | None = None  # active rows; None = all
        self._span: tuple[int, int] | None = None  # (first, end) when the active rows are adjacent
        self._t = 0
        self._mask: torch.Tensor | None = None
        self._causal = False
        self._block = False

    @classmethod
    def for_model(cls, model, capacity: int, batch: int = 1, rings: bool = True) -> "FullKVCache":
        """rings=False: local layers keep every position too (for readers of `k` / `v` by
        position, such as training's prefix views)."""
        c = model.cfg
        return cls(c.num_layers, c.num_kv_heads, c.head_dim, capacity, batch, model.dtype, model.device,
                   windows=c.layer_windows, ring_block=None if rings else capacity)

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    def set_active(self, rows: list[int] | None) -> None:
        """Restrict the next forwards to these rows (in this order); None = every row."""
        self._rows = None if rows is None or list(rows) == list(range(self.batch)) else list(rows)
        r = self._rows
        # Adjacent ascending rows are attended over a view of the cache; others need a gather (copy).
        self._span = (r[0], r[0] + len(r)) if r and r == list(range(r[0], r[0] + len(r))) else None

    def _active_lengths(self) -> torch.Tensor:
        return self.lengths if self._rows is None else self.lengths[self._rows]

    def begin_forward(self, num_new: int) -> torch.Tensor:
        lengths = self._active_lengths()
        if int(lengths.max()) + num_new > self.capacity:
            raise ValueError(f"KV cache capacity {self.capacity} exceeded "
                             f"(lengths {lengths.tolist()} + {num_new})")
        self._t = num_new
        device = self.k[0].device
        uniform = bool((lengths == lengths[0]).all())
        self._causal = uniform and num_new > 1 and int(lengths[0]) == 0   # prefill of empty rows
        # A verify (a few new tokens after a past) reads each row's past once (attend_block);
        # the [B, 1, T, S] mask is then only built for observers that read it.
        self._block = self.block_verify and not self._causal and block_supported(device, num_new)
        needs_mask = not (uniform and (num_new == 1 or self._causal)) and (not self._block or self.observers)
        self._mask = causal_block_mask(lengths.to(device), num_new, int(lengths.max()) + num_new) \
            if needs_mask else None
        return lengths.to(device).view(-1, 1) + torch.arange(num_new, device=device).view(1, -1)

    def attend(self, layer, q, k, v):
        if self.ring[layer]:
            return self._attend_ring(layer, q, k, v)
        t, lengths = self._t, self._active_lengths()
        rows = self._rows if self._rows is not None else range(self.batch)
        kc, vc = self.k[layer], self.v[layer]
        starts = lengths.tolist()
        if len(set(starts)) == 1 and self._rows is None:
            kc[:, :, starts[0]:starts[0] + t] = k
            vc[:, :, starts[0]:starts[0] + t] = v
        else:
            for i, (row, start) in enumerate(zip(rows, starts)):
                kc[row, :, start:start + t] = k[i]
                vc[row, :, start:start + t] = v[i]
        end = max(starts) + t
        if self._rows is None:
            keys, values = kc[:, :, :end], vc[:, :, :end]                       # [B, Hkv, S, D]
        elif self._span is not None:
            a, b = self._span                                                   # a view, no copy
            keys, values = kc[a:b, :, :end], vc[a:b, :, :end]
        else:
            index = torch.tensor(self._rows, device=kc.device)
            keys, values = kc[index, :, :end], vc[index, :, :end]               # gathered rows (a copy)
        window = self.windows[layer] if self.windows is not None else None
        if window is not None:
            for obs in self.observers:   # a local layer: q only (see the class doc)
                obs(layer, q, None, None, lengths)
            return attend_window(q, keys, values, lengths, window)
        for obs in self.observers:
            obs(layer, q, keys, self._mask, lengths)
        if self._block:
            return attend_block(q, keys, values, lengths)
        return attend(q, keys, values, self._mask, self._causal)

    def _attend_ring(self, layer, q, k, v):
        """A local layer stored as a ring of R slots (position p in slot p % R), W its window.

        The new tokens go in sub-blocks of SB = R - W + 1: each is written, then its queries
        attend over the whole ring with a mask that names slot s position
        held(s) = the largest p < a + tb with p = s (mod R). Why that is exact: the sub-block's
        queries, at positions [a, a + tb) with tb <= SB, read the keys (a - W, a + tb): fewer
        than W - 1 + SB = R positions, so no two share a slot and each is the largest of its slot
        below a + tb, i.e. held() names every one of them; every other slot's held() lies at or
        below a - W, outside every query's window, so whatever it holds (an older position, a
        rolled-back draft) is masked. The named ones hold what they are named: those >= a were
        just written; those in (a - W, a) were written before and not overwritten since, as
        writing position p overwrites p - R <= a + tb - 1 - R <= a - W, and `truncate` refuses a
        rollback below what the ring still holds (see there).
        """
        t, lengths, window = self._t, self._active_lengths(), self.windows[layer]
        for obs in self.observers:   # a local layer: q only (its keys are a ring)
            obs(layer, q, None, None, lengths)
        kc, vc = self.k[layer], self.v[layer]
        R, dev = kc.shape[2], kc.device
        sb = R - window + 1
        rows = list(range(self.batch)) if self._rows is None else self._rows
        row_index = torch.tensor(rows, device=dev).view(-1, 1)                   # [B, 1]
        past = lengths.to(dev).view(-1, 1)                                         # [B, 1]
        slot = torch.arange(R, device=dev).view(1, -1)                             # [1, R]
        out = []
        for t0 in range(0, t, sb):
            tb = min(sb, t - t0)
            pos = past + t0 + torch.arange(tb, device=dev).view(1, -1)            # [B, tb]
            kc[row_index, :, pos % R] = k[:, :, t0:t0 + tb].transpose(1, 2)        # [B, tb, Hkv, D]
            vc[row_index, :, pos % R] = v[:, :, t0:t0 + tb].transpose(1, 2)
            last = pos[:, -1:]                                                     # [B, 1]
            held = last - (last - slot) % R                                        # [B, R] position named per slot
            p, j = pos.unsqueeze(-1), held.unsqueeze(1)                            # [B, tb, 1], [B, 1, R]
            mask = ((j <= p) & (j > p - window) & (j >= 0)).unsqueeze(1)          # [B, 1, tb, R]
            if self._rows is None:
                keys, values = kc, vc
            elif self._span is not None:
                a, b = self._span
                keys, values = kc[a:b], vc[a:b]
            else:
                keys, values = kc[row_index.view(-1)], vc[row_index.view(-1)]     # gathered rows (a copy)
            out.append(attend(q[:, :, t0:t0 + tb], keys, values, mask))
        return out[0] if len(out) == 1 else torch.cat(out, dim=2)

    def end_forward(self) -> None:
        if self._rows is None:
            self.lengths += self._t
            if self._rings:
                torch.maximum(self.top, self.lengths, out=self.top)
        else:
            self.lengths[self._rows] += self._t
            if self._rings:
                self.top[self._rows] = torch.maximum(self.top[self._rows], self.lengths[self._rows])
        self._t = 0

    def held_from(self, row: int, layer: int) -> int:
        """The lowest position `layer` still holds for `row` (0 unless a ring went round): it holds
        every position in [held_from, length)."""
        if not self.ring[layer]:
            return 0
        return max(0, int(self.top[row]) - self.slots[layer])

    def read(self, row: int, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [Hkv, end - start, D] of the row's positions [start, end) in `layer`, in position
        order: views of a layer that keeps every position, a copy out of a ring. Positions the
        layer no longer holds (below held_from) or never held (at or past the length) raise."""
        lo = self.held_from(row, layer)
        if not lo <= start <= end <= int(self.lengths[row]):
            raise ValueError(f"layer {layer} of row {row} holds positions [{lo}, {int(self.lengths[row])}), "
                             f"not [{start}, {end}) (a local layer keeps a ring of {self.slots[layer]})")
        kc, vc = self.k[layer][row], self.v[layer][row]
        if not self.ring[layer]:
            return kc[:, start:end], vc[:, start:end]
        slots = torch.arange(start, end, device=kc.device) % self.slots[layer]
        return kc[:, slots], vc[:, slots]

    def load(self, row: int, keys: list[torch.Tensor], values: list[torch.Tensor], length: int) -> None:
        """Fill an empty row with an exact prefix of `length` tokens computed elsewhere: per layer
        K/V [Hkv, m, D] of positions [length - m, length) (m = length on a layer that keeps every
        position; at least min(length, W) on a local one, its window)."""
        if int(self.lengths[row]):
            raise RuntimeError("load needs an empty row")
        if length > self.capacity:
            raise ValueError(f"a prefix of {length} exceeds the capacity {self.capacity}")
        for layer, (key, value) in enumerate(zip(keys, values)):
            m = key.shape[1]
            window = self.windows[layer] if self.windows is not None else None
            need = length if window is None or not self.ring[layer] else min(length, window)
            if not need <= m <= length:
                raise ValueError(f"layer {layer}: {m} entries for a prefix of {length} (it needs {need})")
            m = min(m, self.slots[layer])
            slots = torch.arange(length - m, length, device=key.device) % self.slots[layer]
            self.k[layer][row][:, slots] = key[:, key.shape[1] - m:]
            self.v[layer][row][:, slots] = value[:, value.shape[1] - m:]
        self.lengths[row] = self.top[row] = length

    def can_truncate(self, row: int, length: int) -> bool:
        """Whether `truncate(row, length)` is exact (else it raises).

        A ring layer (R slots, window W) has lost every position below top - R: each slot holds
        the latest position written to it, and the positions of [top - R, top) are R distinct
        slots' latest. After the rollback the next query, at position `length`, reads
        [length - W + 1, length), and a reader by position (a feed's window, a prefix) reads
        [length - W, length). So the rollback is exact iff max(0, length - W) >= top - R, i.e.
        length >= top - (SB - 1) (SB = R - W + 1): any rollback of at most SB - 1 positions
        (ring_block: max(MAX_BLOCK, W), so a verify's to its start), never a deeper one. 0 (an
        empty row, a new prefill) always is."""
        return 0 <= length <= int(self.lengths[row]) and self._lost_layer(row, length) is None

    def _lost_layer(self, row: int, length: int) -> int | None:
        """The first ring layer that no longer holds what a rollback to `length` needs (None: none)."""
        if length == 0 or not self._rings:
            return None
        return next((layer for layer, ring in enumerate(self.ring)
                     if ring and max(0, length - self.windows[layer]) < self.held_from(row, layer)), None)

    def truncate(self, row: int, length: int) -> None:
        """Roll row back to `length` tokens (drops rejected drafts); 0 empties it (a new prefill).
        A rollback deeper than a local layer's ring still holds is refused (`can_truncate`): the
        row would attend wrongly."""
        n = int(self.lengths[row])
        if not 0 <= length <= n:
            raise ValueError(f"cannot truncate row {row} of length {n} to {length}")
        layer = self._lost_layer(row, length)
        if layer is not None:
            raise ValueError(f"cannot roll row {row} back to {length}: local layer {layer} keeps a ring of "
                             f"{self.slots[layer]} slots and no longer holds position "
                             f"{max(0, length - self.windows[layer])} (it holds [{self.held_from(row, layer)}, {n}))")
        if length == 0:
            self.top[row] = 0
        self.lengths[row] = length

    def device_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def row_bytes(self, length: int) -> int:
        """Bytes of the entries a row of `length` tokens holds: every one on a layer that keeps
        them all, at most its ring on a local layer (ModelConfig.kv_bytes)."""
        return sum(min(length, s) * k.shape[1] * k.shape[3] * k.element_size() * 2
                   for s, k in zip(self.slots, self.k))

    def used_bytes(self) -> int:
        """Bytes of the entries rows actually hold (what a paged cache would allocate)."""
        return sum(self.row_bytes(n) for n in self.lengths.tolist())

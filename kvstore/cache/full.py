"""FullKVCache: the verifier's cache. Preallocated, every entry kept, rows of different lengths."""

from __future__ import annotations

import torch

from kvstore.cache.base import KVCache
from sparsespec.kernels.attention import attend, attend_block, attend_window, block_supported, causal_block_mask


class FullKVCache(KVCache):
    """K/V for `batch` rows (sessions) of up to `capacity` tokens each, for every layer.

    Rows may hold different lengths. A forward runs over the active rows (all by default, or those
    named by `set_active`) and appends the same number T of tokens to each: callers pad shorter
    drafts, then `truncate` each row to what it committed. `truncate` is the rollback of rejected
    drafts: it only moves a length, the tensors stay allocated.

    `windows` (ModelConfig.layer_windows: per layer a sliding window W, or None for a global
    layer) makes a local layer attend only over its window (attend_window: query blocks over at
    most 2W - 1 keys, never a T x S mask). Storage stays full length on every layer for now.
    """

    block_verify = True   # verifies through attend_block; False: the masked reference (the bench compares)

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int,
                 batch: int = 1, dtype=torch.float32, device="cpu",
                 windows: tuple[int | None, ...] | None = None):
        if windows is not None:
            windows = tuple(windows)
            if len(windows) != num_layers or any(w is not None and (isinstance(w, bool) or int(w) < 1)
                                                 for w in windows):
                raise ValueError(f"windows must give each of the {num_layers} layers a window >= 1 or None, "
                                 f"got {windows!r}")
            if all(w is None for w in windows):
                windows = None
        self.windows = windows
        shape = (batch, num_kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = torch.zeros(batch, dtype=torch.int64)    # [B], host side
        self.capacity = capacity
        self.observers: list = []  # obs(layer, q, keys, mask, past_lengths) before attention (summaries)
        self._rows: list[int] | None = None  # active rows; None = all
        self._span: tuple[int, int] | None = None  # (first, end) when the active rows are adjacent
        self._t = 0
        self._mask: torch.Tensor | None = None
        self._causal = False
        self._block = False

    @classmethod
    def for_model(cls, model, capacity: int, batch: int = 1) -> "FullKVCache":
        c = model.cfg
        return cls(c.num_layers, c.num_kv_heads, c.head_dim, capacity, batch, model.dtype, model.device,
                   windows=c.layer_windows)

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
            if self.observers:  # they read the mask this layer attends with
                mask = causal_block_mask(lengths.to(q.device), t, end, window)
                for obs in self.observers:
                    obs(layer, q, keys, mask, lengths)
            return attend_window(q, keys, values, lengths, window)
        for obs in self.observers:
            obs(layer, q, keys, self._mask, lengths)
        if self._block:
            return attend_block(q, keys, values, lengths)
        return attend(q, keys, values, self._mask, self._causal)

    def end_forward(self) -> None:
        if self._rows is None:
            self.lengths += self._t
        else:
            self.lengths[self._rows] += self._t
        self._t = 0

    def truncate(self, row: int, length: int) -> None:
        """Roll row back to `length` tokens (drops rejected drafts)."""
        if not 0 <= length <= int(self.lengths[row]):
            raise ValueError(f"cannot truncate row {row} of length {int(self.lengths[row])} to {length}")
        self.lengths[row] = length

    def device_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def used_bytes(self) -> int:
        """Bytes of the entries rows actually hold (what a paged cache would allocate)."""
        per_token = sum(t.shape[1] * t.shape[3] * t.element_size() for t in self.k + self.v)
        return int(self.lengths.sum()) * per_token

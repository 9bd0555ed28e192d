"""What one session costs a drafter, computed before anything is allocated.

The drafter admits a session only if its cost fits the memory budget, so the numbers here must be
exactly what SparseKVCache allocates (a test checks them against a built cache). Every session of
one engine costs the same: the cache is preallocated for the engine's capacity, whatever the
prompt length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvstore.policies import get_policy
from kvstore.sparse import SparseConfig
from sparsespec.models.config import ModelConfig


@dataclass(frozen=True)
class SessionCost:
    device_bytes: int   # device KV (K, V, positions) + the policy's recorded-query rings
    host_bytes: int     # the host tier (CPU RAM)


def session_cost(cfg: ModelConfig, dtype: torch.dtype, capacity: int, sparse: SparseConfig) -> SessionCost:
    """Bytes a SparseKVCache for `cfg` with `capacity` tokens allocates (see kvstore/sparse.py)."""
    item = torch.empty((), dtype=dtype).element_size()
    L, H, Hkv, D = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if sparse.keeps_all:                                      # FullKVCache, batch 1, no host tier
        return SessionCost(device_bytes=2 * L * Hkv * capacity * D * item, host_bytes=0)
    rows = sparse.budget + sparse.tail_cap
    kv = 2 * L * Hkv * rows * D * item                        # dev_k, dev_v [Hkv, rows, D]
    pos = L * Hkv * rows * 8                                  # dev_pos [Hkv, rows] int64
    obs = 0
    if get_policy(sparse.policy)(sparse).needs_queries:              # query rings [H, obs_window + tail_cap, D]
        obs = L * H * (sparse.obs_window + sparse.tail_cap) * D * item
    host = 2 * L * Hkv * capacity * D * item                  # host_k, host_v [Hkv, capacity, D]
    return SessionCost(device_bytes=kv + pos + obs, host_bytes=host)

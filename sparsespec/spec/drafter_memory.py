"""What one session costs a drafter host, computed before anything is allocated.

The host (sparsespec.spec.drafter_host) admits a session only if its cost fits both memory
budgets, so the numbers here must be exactly what SparseKVCache allocates (a test checks them
against a built cache). Every session of one host costs the same: the cache is preallocated for
the host's capacity, whatever the prompt length. `available_host_bytes` is what the drafter
service's default host budget is a fraction of.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kvstore.cache.policies import get_policy
from kvstore.cache.sparse import SparseConfig
from sparsespec.models.config import ModelConfig


@dataclass(frozen=True)
class SessionCost:
    device_bytes: int   # device KV (K, V, positions) + the policy's recorded-query rings
    host_bytes: int     # the host tier (CPU RAM)

    def host_memory_bytes(self, device) -> int:
        """Host RAM the session takes: the host tier, plus the device KV when the device is the CPU."""
        return self.host_bytes + (self.device_bytes if torch.device(device).type == "cpu" else 0)


def session_cost(cfg: ModelConfig, dtype: torch.dtype, capacity: int, sparse: SparseConfig) -> SessionCost:
    """Bytes a SparseKVCache for `cfg` with `capacity` tokens allocates (see kvstore/cache/sparse.py)."""
    item = torch.empty((), dtype=dtype).element_size()
    L, H, Hkv, D = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if sparse.keeps_all:                                      # FullKVCache, batch 1, no host tier: local layers a ring
        return SessionCost(device_bytes=cfg.kv_bytes(capacity, item, capacity), host_bytes=0)
    # Per layer keep + tail_cap rows: keep is the budget, or a local layer's window.
    rows = sum((sparse.budget if w is None else w) + sparse.tail_cap for w in cfg.layer_windows)
    kv = 2 * Hkv * rows * D * item                            # dev_k, dev_v [Hkv, rows_l, D] per layer
    pos = Hkv * rows * 8                                      # dev_pos [Hkv, rows_l] int64 per layer
    obs = 0
    if get_policy(sparse.policy)(sparse).needs_queries:              # query rings [H, obs_window + tail_cap, D]
        obs = L * H * (sparse.obs_window + sparse.tail_cap) * D * item
    fed = get_policy(sparse.policy).fed                       # fed: its K/V come from the verifier
    host = 0 if fed else 2 * L * Hkv * capacity * D * item    # host_k, host_v [Hkv, capacity, D]
    return SessionCost(device_bytes=kv + pos + obs, host_bytes=host)


def available_host_bytes(root: Path = Path("/")) -> int | None:
    """RAM this process could still take: MemAvailable, lowered to what its cgroup's limit leaves
    (in a container /proc/meminfo shows the whole node). None where /proc/meminfo is missing."""
    try:
        meminfo = (root / "proc/meminfo").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in meminfo.splitlines() if ":" in line)
    if "MemAvailable" not in fields:
        return None
    available = int(fields["MemAvailable"].split()[0]) * 1024
    cg = root / "sys/fs/cgroup"
    for limit, usage, stat, inactive in (("memory.max", "memory.current", "memory.stat", "inactive_file"),
                                         ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes",
                                          "memory/memory.stat", "total_inactive_file")):
        try:
            cap, used = (cg / limit).read_text().strip(), int((cg / usage).read_text())
            stats = dict(line.split() for line in (cg / stat).read_text().splitlines() if line.count(" ") == 1)
        except (OSError, ValueError):
            continue
        if not cap.isdigit():      # "max": no limit
            break
        used -= int(stats.get(inactive, 0))   # page cache the kernel drops before it OOM-kills
        return max(0, min(available, int(cap) - used))
    return available

"""Everything about KV state: the caches the model attends over, the drafter's policies, summaries, sessions."""

from kvstore.base import KVCache
from kvstore.full import FullKVCache
from kvstore.sparse import SparseKVCache, SparseConfig

__all__ = ["KVCache", "FullKVCache", "SparseKVCache", "SparseConfig"]

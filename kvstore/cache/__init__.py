"""KV cache tensors: the contract (base.py), the verifier's FullKVCache, the drafter's SparseKVCache and
its policies, KV summaries. The model attends through these and never knows which one it has."""

from kvstore.cache.base import KVCache
from kvstore.cache.full import FullKVCache
from kvstore.cache.sparse import SparseKVCache, SparseConfig

__all__ = ["KVCache", "FullKVCache", "SparseKVCache", "SparseConfig"]

"""KV policies: how the drafter chooses which entries to keep under its budget.

One class per file; a new policy is a new file plus one line in _BUILTIN below (or a call to
`register` from outside the package). The registry itself is registry.py.
"""

from __future__ import annotations

from kvstore.cache.policies.base import Policy, SelectionContext
from kvstore.cache.policies.chunk_topk import ChunkTopKPolicy
from kvstore.cache.policies.fed import FedPolicy
from kvstore.cache.policies.full import FullPolicy
from kvstore.cache.policies.registry import get_policy, policy_names, register
from kvstore.cache.policies.snapkv import SnapKVPolicy
from kvstore.cache.policies.streaming import StreamingPolicy
from kvstore.cache.policies.verifier_guided import VerifierGuidedPolicy

_BUILTIN = (StreamingPolicy, ChunkTopKPolicy, SnapKVPolicy, VerifierGuidedPolicy, FedPolicy, FullPolicy)
for _cls in _BUILTIN:
    register(_cls)

POLICIES: tuple[str, ...] = tuple(cls.name for cls in _BUILTIN)

__all__ = ["Policy", "SelectionContext", "POLICIES", "get_policy", "policy_names", "register",
           "StreamingPolicy", "ChunkTopKPolicy", "SnapKVPolicy", "VerifierGuidedPolicy", "FedPolicy", "FullPolicy"]

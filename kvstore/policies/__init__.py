"""KV policies: how the drafter chooses which entries to keep under its budget.

One class per file; a new policy is a new file plus one line in _BUILTIN below (or a call to
`register` from outside the package).
"""

from __future__ import annotations

from kvstore.policies.base import Policy, SelectionContext
from kvstore.policies.chunk_topk import ChunkTopKPolicy
from kvstore.policies.full import FullPolicy
from kvstore.policies.snapkv import SnapKVPolicy
from kvstore.policies.streaming import StreamingPolicy
from kvstore.policies.verifier_guided import VerifierGuidedPolicy
from sparsespec.errors import InvalidArgument

_REGISTRY: dict[str, type[Policy]] = {}


def register(cls: type[Policy]) -> type[Policy]:
    """Add a policy class under its `name` (usable as a decorator)."""
    _REGISTRY[cls.name] = cls
    return cls


_BUILTIN = (StreamingPolicy, ChunkTopKPolicy, SnapKVPolicy, VerifierGuidedPolicy, FullPolicy)
for _cls in _BUILTIN:
    register(_cls)

POLICIES: tuple[str, ...] = tuple(cls.name for cls in _BUILTIN)


def policy_names() -> tuple[str, ...]:
    """Every registered policy name, built-in and registered later."""
    return tuple(_REGISTRY)


def get_policy(name: str) -> type[Policy]:
    """The policy class registered under `name`; InvalidArgument (field "policy") otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise InvalidArgument("policy", f"unknown policy {name!r}; known policies: "
                                        f"{', '.join(policy_names())}") from None


__all__ = ["Policy", "SelectionContext", "POLICIES", "get_policy", "policy_names", "register",
           "StreamingPolicy", "ChunkTopKPolicy", "SnapKVPolicy", "VerifierGuidedPolicy", "FullPolicy"]

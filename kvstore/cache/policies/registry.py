"""The policy registry: name -> class. Apart from the policies so that one policy may build
another by name (verifier_guided's fallback) without an import loop."""

from __future__ import annotations

from kvstore.cache.policies.base import Policy
from sparsespec.errors import InvalidArgument

_REGISTRY: dict[str, type[Policy]] = {}


def register(cls: type[Policy]) -> type[Policy]:
    """Add a policy class under its `name` (usable as a decorator)."""
    _REGISTRY[cls.name] = cls
    return cls


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

"""Failpoints: named places where a test makes a real process fail on purpose.

The chaos and liveness tests must see what a crash does to a real service (health, exit code,
supervisor restarts), so the code names the places where it may crash, and the environment
arms them: `SPARSESPEC_FAILPOINTS="scheduler.round=3"` raises `Failpoint` at the 3rd time
`hit("scheduler.round")` runs (and only then). Unset, `hit` is one dict lookup.
"""

from __future__ import annotations

import os


class Failpoint(RuntimeError):
    """Raised by an armed failpoint: a planted crash, never a user error."""


def _parse(spec: str) -> dict[str, int]:
    armed = {}
    for item in filter(None, (p.strip() for p in spec.split(","))):
        name, _, n = item.partition("=")
        armed[name] = int(n or 1)
    return armed


_armed = _parse(os.environ.get("SPARSESPEC_FAILPOINTS", ""))


def hit(name: str) -> None:
    left = _armed.get(name)
    if left is None:
        return
    _armed[name] = left - 1
    if left == 1:
        raise Failpoint(f"failpoint {name} fired")

"""Optional: keep this drafter in the Redis worker registry (only with --redis).

Imported lazily, so a drafter without Redis does not need kvstore.coord.registry at all. Verifiers
pick drafters from the registry, least loaded first; the heartbeat reports the session count.
The capacity is the sessions both memory budgets hold (DrafterHost.session_capacity, the min).
"""

from __future__ import annotations

import uuid
from typing import Callable

UNLIMITED = (1 << 31) - 1   # registry capacity when neither budget binds (--host-memory-bytes unlimited)


def register_worker(redis_url: str, server, model: str, worker_id: str | None = None) -> Callable[[], None]:
    """Start heartbeating `server` (a DrafterServer); returns the call that deregisters it."""
    from kvstore.coord.registry import Heartbeat, WorkerInfo, WorkerRegistry

    drafters = server.drafter_host
    capacity = drafters.session_capacity
    info = WorkerInfo(worker_id=worker_id or f"drafter-{uuid.uuid4().hex[:8]}", role="drafter",
                      address=server.address, model=str(model),
                      capacity=UNLIMITED if capacity is None else capacity, load=drafters.load())
    beat = Heartbeat(WorkerRegistry(redis_url), info, load=drafters.load).start()
    return beat.stop

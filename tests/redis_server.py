"""A real redis-server for tests (sparsespec.redis_server), skipped with a reason when absent.

    with redis_server() as srv:
        srv.url; srv.stop(); srv.start()
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from sparsespec.redis_server import RedisServer, find_redis_server


@contextmanager
def redis_server() -> Iterator[RedisServer]:
    """A started server, closed (and its temp dir removed) on exit; pytest.skip without redis-server."""
    exe = find_redis_server()
    if exe is None:
        import pytest
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    # Throwaway and without persistence: tests/test_sessions.py shows that a restarted Redis that
    # comes back empty is survived; tests/test_durability.py runs the persistent default.
    srv = RedisServer(exe, persistence="none")
    try:
        srv.start()
        yield srv
    finally:
        srv.close()

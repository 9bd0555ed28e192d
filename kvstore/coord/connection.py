"""Redis plumbing shared by the session store and the worker registry: one connection policy and
one translation of "cannot reach Redis" (RedisUnavailable, gRPC UNAVAILABLE, naming the address)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from sparsespec.errors import InvalidArgument, SparseSpecError, shown

# Replies of a Redis that is up but cannot take the command now (full, a replica, failing over):
# as good as unreachable for the caller. Nothing is half-written then either: Redis refuses a
# script only at its first write, never in the middle.
_CANNOT_SERVE = (redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError,
                 redis.exceptions.MasterDownError, redis.exceptions.ClusterDownError,
                 redis.exceptions.TryAgainError)



class RedisUnavailable(SparseSpecError):
    """Redis cannot be reached (gRPC: UNAVAILABLE). The message names the address."""


def connect(target: str | redis.Redis) -> redis.Redis:
    """A client for a URL, or the given client. Short timeouts and two quick retries: a blink
    (a restart, a dropped pooled connection) is absorbed, a dead Redis is reported within ~0.1 s
    (refused) or ~3 s (black hole) instead of hanging a request. Retrying is safe because every
    write here is idempotent (a repeated `acquire_lease` just skips an epoch)."""
    if isinstance(target, str):
        return redis.Redis.from_url(target, socket_connect_timeout=1.0, socket_timeout=2.0,
                                    retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2))
    if target.connection_pool.connection_kwargs.get("decode_responses"):
        raise InvalidArgument("redis", "the client must use decode_responses=False (token logs are binary)")
    return target


def address_of(client: redis.Redis) -> str:
    kw = client.connection_pool.connection_kwargs
    return kw["path"] if "path" in kw else f"{kw.get('host', 'localhost')}:{kw.get('port', 6379)}"


class RedisBacked:
    """A Redis client plus the one translation every caller needs: unreachable -> RedisUnavailable."""

    def __init__(self, target: str | redis.Redis, prefix: str):
        if not prefix or "{" in prefix or "}" in prefix:
            raise InvalidArgument("prefix", f"must be non-empty without braces, got {prefix!r}")
        self.redis = connect(target)
        self.prefix = prefix
        self.address = address_of(self.redis)

    @contextmanager
    def reachable(self) -> Iterator[None]:
        try:
            yield
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
            raise RedisUnavailable(f"redis: {self.address} is unreachable ({e})") from e
        except _CANNOT_SERVE as e:
            raise RedisUnavailable(f"redis: {self.address} cannot serve this now "
                                   f"({type(e).__name__}: {e})") from e

    def ping(self) -> None:
        """Raises RedisUnavailable unless Redis answers."""
        with self.reachable():
            self.redis.ping()


def check_id(field: str, value: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 256 or "{" in value or "}" in value:
        raise InvalidArgument(field, f"must be 1..256 characters without braces, got {shown(value)}")
    return value

"""The worker registry: which drafters and verifiers are alive, where, and how busy.

A worker registers once and then heartbeats; its record is a Redis hash with a TTL that each
heartbeat refreshes, so a worker that dies (or hangs) drops out of `live` by itself after
heartbeat_ttl_s, with nobody having to notice. A verifier picks a drafter from `live` (least
loaded first) when it opens a session or re-binds one after a drafter died.

Keys (all in the hash tag `{prefix:registry}`, one Cluster slot, so one script may touch them):

    {prefix:registry}:workers       set of worker ids (`live` prunes ids whose record expired;
                                    every heartbeat re-adds its own)
    {prefix:registry}:worker:{id}   hash: role, address, model, capacity, load, started_at
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import redis

from kvstore.coord.connection import RedisBacked, RedisUnavailable, check_id
from sparsespec.errors import InvalidArgument

log = logging.getLogger(__name__)

ROLES = ("drafter", "verifier")


@dataclass
class WorkerInfo:
    worker_id: str
    role: str                 # "drafter" | "verifier"
    address: str              # "host:port" its gRPC server listens on
    model: str                # the model it serves (a registry name or a path)
    capacity: int             # sessions it can hold
    load: int = 0             # sessions it holds now
    started_at: float = field(default_factory=time.time)

    def __post_init__(self):
        check_id("worker_id", self.worker_id)
        if self.role not in ROLES:
            raise InvalidArgument("role", f"must be one of {ROLES}, got {self.role!r}")
        host, _, port = self.address.rpartition(":")
        if not host or not port.isdigit():
            raise InvalidArgument("address", f"must be host:port, got {self.address!r}")
        if self.capacity < 0 or self.load < 0:
            raise InvalidArgument("capacity", f"capacity and load must be >= 0, got {self.capacity}, {self.load}")

    def to_hash(self) -> dict[str, str]:
        return {k: str(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_hash(cls, h: dict[bytes, bytes]) -> WorkerInfo:
        d = {k.decode(): v.decode() for k, v in h.items()}
        return cls(worker_id=d["worker_id"], role=d["role"], address=d["address"], model=d["model"],
                   capacity=int(d["capacity"]), load=int(d["load"]), started_at=float(d["started_at"]))


# KEYS record set; ARGV ttl_ms load ('' = unchanged) worker_id
_HEARTBEAT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'load', ARGV[2]) end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[3])
return 1
"""

class WorkerRegistry(RedisBacked):
    """Register, heartbeat, find. Every method raises RedisUnavailable when Redis cannot be reached."""

    def __init__(self, target: str | redis.Redis, prefix: str = "sparsespec", heartbeat_ttl_s: float = 5.0):
        super().__init__(target, prefix)
        if heartbeat_ttl_s <= 0:
            raise InvalidArgument("heartbeat_ttl_s", f"must be > 0, got {heartbeat_ttl_s}")
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self._ttl_ms = max(1, int(heartbeat_ttl_s * 1000))
        self._set = f"{{{prefix}:registry}}:workers"
        self._record_prefix = f"{{{prefix}:registry}}:worker:"
        self._heartbeat = self.redis.register_script(_HEARTBEAT)

    def _record(self, worker_id: str) -> str:
        return self._record_prefix + check_id("worker_id", worker_id)

    def register(self, info: WorkerInfo) -> None:
        """(Re)write the worker's record; it lives heartbeat_ttl_s unless heartbeats follow."""
        key = self._record(info.worker_id)
        with self.reachable():
            pipe = self.redis.pipeline(transaction=True)
            pipe.delete(key)
            pipe.hset(key, mapping=info.to_hash())
            pipe.pexpire(key, self._ttl_ms)
            pipe.sadd(self._set, info.worker_id)
            pipe.execute()

    def heartbeat(self, worker_id: str, load: int | None = None) -> bool:
        """Refresh the record's TTL (and its load). False if the record is gone (it expired, or
        Redis restarted empty): the worker must `register` again."""
        if load is not None and load < 0:
            raise InvalidArgument("load", f"must be >= 0, got {load}")
        with self.reachable():
            return bool(self._heartbeat(keys=[self._record(worker_id), self._set],
                                        args=[self._ttl_ms, "" if load is None else load, worker_id]))

    def deregister(self, worker_id: str) -> None:
        with self.reachable():
            pipe = self.redis.pipeline(transaction=True)
            pipe.delete(self._record(worker_id))
            pipe.srem(self._set, worker_id)
            pipe.execute()

    def live(self, role: str, model: str | None = None) -> list[WorkerInfo]:
        """Workers of `role` (serving `model`, if given) whose heartbeat has not expired,
        least loaded first."""
        if role not in ROLES:
            raise InvalidArgument("role", f"must be one of {ROLES}, got {role!r}")
        with self.reachable():
            ids = sorted(i.decode() for i in self.redis.smembers(self._set))
            pipe = self.redis.pipeline(transaction=False)
            for i in ids:
                pipe.hgetall(self._record(i))
            records = pipe.execute()
            gone = [i for i, h in zip(ids, records) if not h]
            if gone:  # expired records; a worker pruned by mistake is re-added by its next heartbeat
                self.redis.srem(self._set, *gone)
        workers = [WorkerInfo.from_hash(h) for h in records if h]
        workers = [w for w in workers if w.role == role and (model is None or w.model == model)]
        return sorted(workers, key=lambda w: (w.load, w.worker_id))


class Heartbeat:
    """A daemon thread that keeps one worker in the registry, every heartbeat_ttl_s / 3.

    It never dies of Redis: while Redis is unreachable it logs once and keeps trying; when the
    record is gone (Redis restarted empty, or the worker stalled past its TTL) it registers
    again. `load`, if given, is called each beat for the worker's current session count."""

    def __init__(self, registry: WorkerRegistry, info: WorkerInfo, load: Callable[[], int] | None = None,
                 interval_s: float | None = None):
        self.registry = registry
        self.info = dataclasses.replace(info)
        self.load = load
        self.interval_s = interval_s if interval_s is not None else registry.heartbeat_ttl_s / 3
        self.failures = 0       # consecutive failed beats
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{info.worker_id}", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self, deregister: bool = True, timeout: float = 5.0) -> None:
        """Stop beating; by default also remove the record, so nobody picks a leaving worker."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if deregister:
            try:
                self.registry.deregister(self.info.worker_id)
            except RedisUnavailable as e:
                log.warning("%s; worker %s left without deregistering (its record expires)", e,
                            self.info.worker_id)

    def __enter__(self) -> Heartbeat:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def beat(self) -> bool:
        """One heartbeat (registering if needed). True when Redis took it."""
        try:
            if self.load is not None:
                self.info.load = int(self.load())
            if not self.registry.heartbeat(self.info.worker_id, self.info.load):
                self.registry.register(self.info)
        except RedisUnavailable as e:
            if self.failures == 0:
                log.warning("%s; worker %s keeps serving and retries every %.2fs", e, self.info.worker_id,
                            self.interval_s)
            self.failures += 1
            return False
        except Exception:  # noqa: BLE001 - a worker must not die of its heartbeat
            log.exception("heartbeat of worker %s failed; retrying", self.info.worker_id)
            self.failures += 1
            return False
        if self.failures:
            log.info("heartbeat of worker %s restored after %d failed beats", self.info.worker_id, self.failures)
        self.failures = 0
        return True

    def _run(self) -> None:
        self.beat()
        while not self._stop.wait(self.interval_s):
            self.beat()

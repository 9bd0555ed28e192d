"""The detached Ray actor that owns a deployment's pools and keeps them at their size.

Every half second it reconciles: a replica whose actor or service died is replaced, a pool
below its replica count gets new replicas, one above it loses its least loaded ones (stopped
gracefully: a drafter deregisters, a verifier drains its running turns, a gateway stops
listening). Every `autoscale.interval_s` an autoscaled verifier or drafter pool's count follows
the load its workers report in Redis (gateways register none).

Losing a replica never loses a token: a session whose drafter goes away decodes alone and
re-binds to another drafter from the registry; a verifier that is drained finishes its turns,
and the SDK resumes any turn a dead verifier left on another one from the durable log.
Replica actors are owned by this actor, so killing it (`sparsespec ray down`) takes them along.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sparsespec.deploy.autoscale import PoolAutoscaler
from sparsespec.deploy.config import REGISTERED, DeployConfig, PoolConfig
from sparsespec.errors import SparseSpecError

log = logging.getLogger(__name__)

TICK_S = 0.5
POLL_EVERY_S = 1.0
DRAFTER_STOP_S = 10.0
STOP_MARGIN_S = 10.0        # beyond the verifier's drain time before it is killed


class DeployError(SparseSpecError):
    """A pool cannot reach its size, or a request to the controller is wrong. The message starts
    with the field; one plain string, so it crosses Ray's pickling intact."""


@dataclass
class Replica:
    name: str                 # the actor's name in the deployment's namespace
    worker_id: str            # its id in the Redis worker registry
    handle: Any
    start_ref: Any
    state: str = "starting"   # starting | ready | stopping
    address: str = ""
    since: float = field(default_factory=time.time)

    def view(self) -> dict:
        return {"name": self.name, "worker_id": self.worker_id, "state": self.state, "address": self.address,
                "since": self.since}


@dataclass
class Pool:
    cfg: PoolConfig
    desired: int
    autoscaler: PoolAutoscaler
    replicas: list[Replica] = field(default_factory=list)
    next_index: int = 0
    start_failures: int = 0          # consecutive
    replaced: int = 0                # replicas that died and were replaced
    last_error: str = ""
    retry_at: float = 0.0


class PoolController:
    def __init__(self, config: dict):
        import ray

        from kvstore.coord.registry import WorkerRegistry

        self.cfg = DeployConfig.from_dict(config)
        self.namespace = ray.get_runtime_context().namespace
        self.registry = WorkerRegistry(self.cfg.redis_url)
        a = self.cfg.autoscale
        self.pools = {role: Pool(p, p.replicas, PoolAutoscaler(p.min_replicas, p.max_replicas, p.target_load,
                                                                 a.downscale_delay_s))
                      for role, p in self.cfg.pools.items()}
        self.events: list[str] = []
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._last_poll = self._last_scale = 0.0
        self._thread = threading.Thread(target=self._run, name="reconcile", daemon=True)
        self._thread.start()

    # ---- calls from `sparsespec ray ...` and the Python API --------------------------------

    def status(self) -> dict:
        with self._lock:
            return {"name": self.cfg.name, "model": self.cfg.model, "events": list(self.events[-20:]),
                    "pools": {role: {"desired": p.desired, "min_replicas": p.cfg.min_replicas,
                                     "max_replicas": p.cfg.max_replicas, "resources": dict(p.cfg.resources),
                                     "replaced": p.replaced, "last_error": p.last_error,
                                     "replicas": [r.view() for r in p.replicas]}
                              for role, p in self.pools.items()}}

    def wait_ready(self, timeout_s: float) -> dict:
        """Until every pool runs its replica count; fails on the first replica that cannot start."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                for role, p in self.pools.items():
                    if p.start_failures:
                        raise DeployError(f"pools.{role}: a replica did not start: {p.last_error}")
                ready = {role: sum(r.state == "ready" for r in p.replicas) for role, p in self.pools.items()}
                if all(ready[role] >= p.desired for role, p in self.pools.items()):
                    return self.status()
            if time.monotonic() > deadline:
                short = [f"pools.{role}: {ready[role]}/{p.desired} ready (resources {dict(p.cfg.resources)})"
                         for role, p in self.pools.items() if ready[role] < p.desired]
                raise DeployError(f"not ready after {timeout_s:g}s: {'; '.join(short)}; does the cluster "
                                  f"have nodes with those resources? (ray status)")
            time.sleep(0.2)

    def scale(self, role: str, replicas: int) -> dict:
        with self._lock:
            if role not in self.pools:
                raise DeployError(f"pool: unknown pool {role!r}; this deployment has: "
                                  f"{', '.join(sorted(self.pools))}")
            p = self.pools[role]
            if isinstance(replicas, bool) or not isinstance(replicas, int) or not (
                    p.cfg.min_replicas <= replicas <= p.cfg.max_replicas):
                raise DeployError(f"replicas: pool {role} takes [{p.cfg.min_replicas}, {p.cfg.max_replicas}] "
                                  f"(min_replicas, max_replicas), got {replicas!r}")
            self._event(f"{role}: scaled {p.desired} -> {replicas} by request")
            p.desired = replicas
        return self.status()

    def shutdown(self) -> dict:
        """Stop reconciling, then stop every replica: gateways first (no new requests), then
        verifiers (they drain), then drafters."""
        self._stop.set()
        self._thread.join(30)
        for role in ("gateway", "verifier", "drafter"):
            with self._lock:
                p = self.pools.get(role)
                victims = [r for r in p.replicas if r.state != "stopping"] if p else []
                for r in victims:
                    r.state = "stopping"
            threads = [threading.Thread(target=self._stop_replica, args=(p, r)) for r in victims]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        return self.status()

    # ---- the reconcile loop ---------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                self._tick()
            except Exception:  # noqa: BLE001 - the controller must keep reconciling
                log.exception("reconcile failed; retrying")

    def _tick(self) -> None:
        now = time.monotonic()
        self._collect_starts()
        if now - self._last_poll >= POLL_EVERY_S:
            self._last_poll = now
            self._collect_deaths()
        if now - self._last_scale >= self.cfg.autoscale.interval_s:
            self._last_scale = now
            self._autoscale(now)
        with self._lock:
            for role, p in self.pools.items():
                active = [r for r in p.replicas if r.state != "stopping"]
                if len(active) < p.desired and now >= p.retry_at and not self._stop.is_set():
                    for _ in range(p.desired - len(active)):
                        self._start_replica(role, p)
                elif len(active) > p.desired:
                    for r in self._victims(role, active, len(active) - p.desired):
                        r.state = "stopping"
                        self._event(f"{role}: stopping {r.name} (pool shrinks to {p.desired})")
                        threading.Thread(target=self._stop_replica, args=(p, r), daemon=True).start()

    def _start_replica(self, role: str, p: Pool) -> None:
        import ray

        from sparsespec.deploy.replica import ServiceReplica

        index, p.next_index = p.next_index, p.next_index + 1
        name = f"{role}-{index}"
        worker_id, flags = self.cfg.replica_flags(role, index)
        actor = ray.remote(ServiceReplica).options(name=name, namespace=self.namespace, max_restarts=0,
                                                   max_concurrency=1, **p.cfg.ray_options())
        handle = actor.remote(role, flags, p.cfg.start_timeout_s)
        p.replicas.append(Replica(name, worker_id, handle, handle.start.remote()))
        self._event(f"{role}: starting {name}")

    def _collect_starts(self) -> None:
        import ray

        with self._lock:
            starting = [(role, p, r) for role, p in self.pools.items() for r in p.replicas if r.state == "starting"]
        for role, p, r in starting:
            done, _ = ray.wait([r.start_ref], timeout=0)
            if not done:
                continue
            try:
                address = ray.get(r.start_ref)
            except Exception as e:  # noqa: BLE001 - a failed start is reported, then retried later
                with self._lock:
                    p.start_failures += 1
                    p.last_error = f"{r.name}: {_reason(e)}"
                    p.retry_at = time.monotonic() + min(30.0, 2.0 ** p.start_failures)
                    self._drop(p, r, f"{role}: {r.name} failed to start")
                continue
            with self._lock:
                if r.state == "starting":
                    r.state, r.address = "ready", address
                    p.start_failures = 0
                    self._event(f"{role}: {r.name} ready at {address}")

    def _collect_deaths(self) -> None:
        """Poll every ready replica; one whose actor or service is gone is dropped (and replaced)."""
        import ray

        with self._lock:
            ready = [(role, p, r) for role, p in self.pools.items() for r in p.replicas if r.state == "ready"]
        if not ready:
            return
        refs = [r.handle.poll.remote() for _, _, r in ready]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=5.0)
        done = set(done)
        for (role, p, r), ref in zip(ready, refs):
            if ref not in done:
                continue        # busy or slow: look again next time
            try:
                info = ray.get(ref)
                reason = None if info["alive"] else f"service exited with {info['exit']}: {info['output'][-3:]}"
            except Exception as e:  # noqa: BLE001 - the actor is gone (ray.kill, node lost)
                reason = f"actor died ({type(e).__name__})"
            if reason is not None:
                with self._lock:
                    if r.state == "ready":
                        p.replaced += 1
                        self._drop(p, r, f"{role}: {r.name} lost: {reason}; replacing it")

    def _autoscale(self, now: float) -> None:
        # a gateway reports no load (it registers nothing): its min/max only bound `ray scale`
        auto = {role: p for role, p in self.pools.items() if p.cfg.autoscaled and role in REGISTERED}
        if not auto:
            return
        try:
            loads = {role: sum(w.load for w in self.registry.live(role)
                               if w.worker_id.startswith(self.cfg.worker_prefix(role))) for role in auto}
        except SparseSpecError as e:
            log.warning("autoscale skipped: %s", e)
            return
        with self._lock:
            for role, p in auto.items():
                want = p.autoscaler.decide(now, p.desired, loads[role])
                if want != p.desired:
                    self._event(f"{role}: autoscale {p.desired} -> {want} (load {loads[role]}, "
                                f"target {p.cfg.target_load} per replica)")
                    p.desired = want

    def _victims(self, role: str, active: list[Replica], n: int) -> list[Replica]:
        """Replicas still starting go first (newest first), then the least loaded ready ones."""
        try:
            load = {w.worker_id: w.load for w in self.registry.live(role)}
        except SparseSpecError:
            load = {}
        order = sorted(active, key=lambda r: (r.state == "ready", load.get(r.worker_id, 0), -r.since))
        return order[:n]

    def _stop_replica(self, p: Pool, r: Replica) -> None:
        import ray

        timeout = DRAFTER_STOP_S
        if p.cfg.role == "verifier":
            timeout = float(p.cfg.args.get("drain_s", p.cfg.args.get("drain-s", 30.0))) + STOP_MARGIN_S
        try:
            if r.address:       # it served: stop it gracefully; one still starting is just killed
                ray.get(r.handle.stop.remote(timeout), timeout=timeout + STOP_MARGIN_S)
        except Exception as e:  # noqa: BLE001 - killed below either way
            log.info("stopping %s: %s", r.name, _reason(e))
        with self._lock:
            self._drop(p, r, f"{p.cfg.role}: {r.name} stopped")

    def _drop(self, p: Pool, r: Replica, event: str) -> None:
        import ray

        try:
            ray.kill(r.handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        if r in p.replicas:
            p.replicas.remove(r)
        self._event(event)

    def _event(self, text: str) -> None:
        self.events.append(f"{time.strftime('%H:%M:%S')} {text}")
        del self.events[:-100]
        log.info("%s", text)


def _reason(e: BaseException) -> str:
    """The root cause's message, without Ray's traceback framing."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        e = cause
    return str(e).strip() or type(e).__name__

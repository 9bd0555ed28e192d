"""Which verifiers the gateway sends requests to, and whether they can serve.

Fixed addresses (`--verifier`, repeatable) or the Redis worker registry (`--redis`: live
verifiers of the gateway's --model, least loaded first, re-read every second). Health asks the verifiers themselves
(grpc.health.v1): a verifier reports NOT_SERVING when its round loop died or its Redis is
unreachable, so a SERVING verifier means the whole data path works.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sparsespec.client import AsyncSparseSpecClient
from sparsespec.tls import ClientTLS, channel

log = logging.getLogger(__name__)

SERVICE = "sparsespec.v1.Generation"
REFRESH_S = 1.0
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 16 << 20), ("grpc.max_send_message_length", 16 << 20)]


class VerifierPool:
    def __init__(self, addresses: tuple[str, ...] = (), redis_url: str | None = None, model: str | None = None,
                 reconnect_timeout_s: float = 10.0, health_timeout_s: float = 2.0, tls: ClientTLS | None = None):
        """tls: TLS to the verifiers (their CA, the name their certificate carries); None: plaintext."""
        self.tls = tls
        self.redis_url = redis_url
        self.model = model                         # Redis mode: only verifiers started with this --model
        self.reconnect_timeout_s = reconnect_timeout_s
        self.health_timeout_s = health_timeout_s
        self.addresses: list[str] = list(addresses)
        self.redis_error: str | None = None        # the last registry read failed: why
        self._registry = None
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._turn = itertools.count()
        self._task: asyncio.Task | None = None
        self._refreshed = 0.0

    # --- discovery ------------------------------------------------------------------------

    async def start(self) -> None:
        if self.redis_url:
            from kvstore.coord.registry import WorkerRegistry
            self._registry = WorkerRegistry(self.redis_url)
            await self.refresh()
            self._task = asyncio.create_task(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            await self.refresh()

    async def refresh(self) -> None:
        """Re-read the registry (Redis mode). Unreachable: keep the last known addresses (a
        verifier may still serve what it holds) and remember why, for /health."""
        if self._registry is None:
            return
        try:
            live = await asyncio.to_thread(self._registry.live, "verifier", self.model)
        except Exception as e:  # noqa: BLE001 - RedisUnavailable, or anything: report, keep going
            if self.redis_error is None:
                log.warning("verifier registry: %s", e)
            self.redis_error = str(e).splitlines()[0] if str(e) else type(e).__name__
            return
        self.redis_error = None
        self.addresses = [w.address for w in live]
        self._refreshed = time.monotonic()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()

    # --- requests --------------------------------------------------------------------------

    def client(self, api_key: str | None = None) -> AsyncSparseSpecClient | None:
        """An SDK client for one request, starting at the next verifier in turn (the list is
        least loaded first in Redis mode); it fails over to the others. None: no verifier known.
        `api_key`: the HTTP client's, passed on (the verifier binds the session to it)."""
        if not self.addresses:
            return None
        start = next(self._turn) % len(self.addresses)
        order = self.addresses[start:] + self.addresses[:start]
        tls = self.tls
        return AsyncSparseSpecClient(order, reconnect_timeout_s=self.reconnect_timeout_s, channels=self._channels,
                                     api_key=api_key, root_certificates=tls.ca if tls else None, tls=tls is not None,
                                     tls_server_name=tls.server_name if tls else None)

    def channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = channel(address, self.tls, CHANNEL_OPTIONS, aio=True)
        return self._channels[address]

    # --- health ------------------------------------------------------------------------------

    async def _status(self, address: str) -> str:
        stub = health_pb2_grpc.HealthStub(self.channel(address))
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE),
                                     timeout=self.health_timeout_s)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.aio.AioRpcError as e:
            return f"UNREACHABLE ({e.code().name})"

    async def health(self) -> tuple[bool, dict]:
        """(healthy, report): healthy when Redis (in Redis mode) answers and at least one
        verifier says SERVING."""
        await self.refresh()
        statuses = await asyncio.gather(*(self._status(a) for a in self.addresses))
        verifiers = [{"address": a, "status": s} for a, s in zip(self.addresses, statuses)]
        report: dict = {"verifiers": verifiers}
        if self._registry is not None:
            report["redis"] = "ok" if self.redis_error is None else f"unreachable: {self.redis_error}"
        ok = self.redis_error is None and any(v["status"] == "SERVING" for v in verifiers)
        if not self.addresses:
            report["reason"] = (f"no verifier of model {self.model!r} is registered" if self._registry is not None
                                else "no verifier")
        elif not ok:
            report["reason"] = ("redis is unreachable" if self.redis_error is not None
                                else "no verifier is serving")
        report["status"] = "ok" if ok else "unavailable"
        return ok, report

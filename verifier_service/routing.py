"""Which drafter serves which session, and what happens when one fails.

`RoutingDrafterClient` is a DrafterClient over many remote drafters. A session is bound to one
drafter at a time. When that drafter fails (dead, slow, full, lost the session) the call raises
DrafterUnavailable, the round loop decodes the session alone, and the next draft call arrives
with base_len 0 and the whole committed prefix: that draft is sent to a live drafter (at most
every `rebind_every_s`), which may be a replacement that registered since, and the drafter
re-opens the session itself (sparsespec.spec.drafter_host); here a session is only bound.

A round's drafts go out as one `draft_many` per drafter (a DraftBatch each, sent to different
drafters at once); re-opens go one by one, since each binds its session somewhere first.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor

from sparsespec import telemetry
from sparsespec.spec.drafter import StateMismatch
from sparsespec.spec.transport import DRAFTER_FAILURES, DraftCall, DraftReply, DrafterClient, DrafterUnavailable

log = logging.getLogger(__name__)


class DrafterDirectory(ABC):
    @abstractmethod
    def addresses(self) -> list[str]:
        """Live drafter addresses, preferred first."""


class StaticDirectory(DrafterDirectory):
    def __init__(self, addresses: list[str]):
        self._addresses = list(addresses)

    def addresses(self) -> list[str]:
        return list(self._addresses)


class RegistryDirectory(DrafterDirectory):
    """Drafters whose heartbeat is live in the Redis worker registry, least loaded first."""

    def __init__(self, registry, model: str | None = None):
        self.registry, self.model = registry, model

    def addresses(self) -> list[str]:
        try:
            return [w.address for w in self.registry.live("drafter", self.model)]
        except Exception as e:  # noqa: BLE001 - no registry means no drafter, not a failed round
            log.warning("drafter registry unreachable: %s", e)
            return []


class RoutingDrafterClient(DrafterClient):
    def __init__(self, directory: DrafterDirectory, client_factory, cooldown_s: float = 2.0,
                 rebind_every_s: float = 0.5):
        self.directory = directory
        self.client_factory = client_factory      # address -> DrafterClient (e.g. GrpcDrafterClient)
        self.cooldown_s = cooldown_s
        self.rebind_every_s = rebind_every_s
        self._clients: dict[str, DrafterClient] = {}
        self._bound: dict[str, str] = {}          # session -> address
        self._bad_until: dict[str, float] = {}    # address -> monotonic time it may be tried again
        self._next_try: dict[str, float] = {}     # session -> monotonic time of the next re-open
        self._fanout: ThreadPoolExecutor | None = None   # a round's DraftBatches to several drafters

    def bound(self, session: str) -> str | None:
        return self._bound.get(session)

    def open(self, session, tokens, params):
        return self._bind(session, lambda client: client.open(session, tokens, params))

    def draft(self, session, base_len, append, k, params, summary=None, feed=None) -> DraftReply:
        if base_len == 0 or session not in self._bound:
            # A re-open: bind a live drafter and send it the base_len-0 draft (it re-opens itself).
            self._unbind(session)              # the re-open throttle (_next_try) stays
            reply = self._bind(session, lambda client: client.draft(session, 0, append, k, params, summary, feed))
            telemetry.REBINDS.inc()
            return reply
        address = self._bound[session]
        try:
            return self._client(address).draft(session, base_len, append, k, params, summary, feed)
        except DrafterUnavailable as e:
            self._bound.pop(session, None)
            self._mark_bad(address, e)
            raise
        except StateMismatch:
            self._bound.pop(session, None)
            raise

    def draft_many(self, calls: list[DraftCall]) -> list:
        results: list = [None] * len(calls)
        groups: dict[str, list[int]] = {}          # address -> indices of its bound sessions
        for i, c in enumerate(calls):
            if c.base_len == 0 or c.session not in self._bound:
                try:
                    results[i] = self.draft(c.session, c.base_len, c.append, c.k, c.params, c.summary, c.feed)
                except DRAFTER_FAILURES as e:
                    results[i] = e
            else:
                groups.setdefault(self._bound[c.session], []).append(i)

        def send(address: str, idx: list[int]) -> list:
            return self._client(address).draft_many([calls[i] for i in idx])

        if len(groups) > 1:
            if self._fanout is None:
                self._fanout = ThreadPoolExecutor(max_workers=8, thread_name_prefix="draft-fanout")
            sent = {a: self._fanout.submit(send, a, idx) for a, idx in groups.items()}
            replies = {a: f.result() for a, f in sent.items()}
        else:
            replies = {a: send(a, idx) for a, idx in groups.items()}
        for address, idx in groups.items():
            for i, r in zip(idx, replies[address]):
                if isinstance(r, DrafterUnavailable):
                    self._bound.pop(calls[i].session, None)
                    self._mark_bad(address, r)
                elif isinstance(r, StateMismatch):
                    self._bound.pop(calls[i].session, None)
                results[i] = r
        return results

    def close(self, session):
        self._unbind(session)
        self._next_try.pop(session, None)

    def _unbind(self, session: str) -> None:
        """Forget the session's drafter, freeing its state there if it can be reached."""
        address = self._bound.pop(session, None)
        if address is not None:
            try:
                self._client(address).close(session)
            except DrafterUnavailable:
                pass

    def _bind(self, session: str, call):
        """Run `call(client)` (an open, or a base_len-0 draft) on the first live drafter that takes
        it, and bind the session there; a drafter that is unavailable is skipped for cooldown_s."""
        now = time.monotonic()
        if now < self._next_try.get(session, 0.0):
            raise DrafterUnavailable(f"session {session}: no drafter yet (retrying)")
        self._next_try[session] = now + self.rebind_every_s
        candidates = [a for a in self.directory.addresses() if self._bad_until.get(a, 0.0) <= now]
        for address in candidates:
            try:
                result = call(self._client(address))
            except DrafterUnavailable as e:
                self._mark_bad(address, e)
                continue
            self._bound[session] = address
            self._next_try.pop(session, None)
            return result
        raise DrafterUnavailable(f"session {session}: no live drafter among {len(candidates)} candidates")

    def _client(self, address: str) -> DrafterClient:
        client = self._clients.get(address)
        if client is None:
            client = self._clients[address] = self.client_factory(address)
        return client

    def _mark_bad(self, address: str, error: Exception) -> None:
        log.warning("drafter %s failed: %s", address, error)
        self._bad_until[address] = time.monotonic() + self.cooldown_s

"""The verifier's side of the session store: sessions, turns, leases and the commit log.

A verifier owns a session through a lease with an epoch; every append carries the epoch, so a
verifier that lost the session (it stalled, another one took over) cannot write to it again.
The turn's parameters are stored with the session, so any verifier can take a turn over from
the log alone. With API keys on, a session is bound to the hash of the key that created it:
for any other key it does not exist (SessionGone, NOT_FOUND, the same answer as for an unknown
id), so it can be neither resumed, read, extended nor aborted, and the refusal writes nothing.
"""

from __future__ import annotations

import uuid
import hmac
from dataclasses import asdict, dataclass, field
from typing import Callable

from kvstore.coord.sessions import SessionBusy, SessionExists, SessionNotFound, SessionStore
from sparsespec.errors import SparseSpecError
from sparsespec.spec.adaptive import MAX_K, AdaptiveConfig
from sparsespec.spec.loop import GenerationRequest, GenerationResult
from sparsespec.spec.metrics import RequestMetrics
from sparsespec.spec.sampling import SamplingParams
from verifier_service.scheduler import CommitLog


class SessionGone(SparseSpecError):
    """The session does not exist (never created, or expired after it finished)."""


@dataclass(frozen=True)
class TurnSpec:
    """What a turn asks for: everything needed to (re)start it from the log."""
    max_tokens: int
    k: int
    mode: str
    adaptive: bool
    stop: list[str] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=SamplingParams)

    def request(self, prompt: list[int], max_tokens: int | None = None) -> GenerationRequest:
        adaptive = AdaptiveConfig(enabled=self.adaptive, k_max=min(MAX_K, max(2 * self.k, 8)))
        return GenerationRequest(prompt, max_tokens or self.max_tokens, self.sampling, self.k, adaptive,
                                 tuple(self.stop), self.mode)

    def to_dict(self) -> dict:
        return {**asdict(self), "sampling": asdict(self.sampling)}

    @classmethod
    def from_dict(cls, d: dict) -> "TurnSpec":
        return cls(**{**d, "sampling": SamplingParams(**d["sampling"])})


@dataclass
class TakeOver:
    """A session as the log has it: the latest turn's prompt and what it generated so far."""
    epoch: int
    spec: TurnSpec
    context: list[int]          # everything before the turn's first generated token
    generated: list[int]        # the turn's durable generated tokens
    finished: bool

    def result(self) -> GenerationResult:
        m = RequestMetrics(prompt_tokens=len(self.context), generated=len(self.generated),
                           stop_reason="finished")
        return GenerationResult(list(self.generated), "", m)


class DurableSessions(CommitLog):
    def __init__(self, store: SessionStore, owner: str, lease_ms: int):
        self.store, self.owner, self.lease_ms = store, owner, lease_ms
        self._epochs: dict[str, int] = {}     # sessions this verifier owns -> epoch

    def new_session(self, prompt: list[int], spec: TurnSpec, session: str | None = None,
                    turn_id: str | None = None, key: str = "") -> tuple[str, list[int], int]:
        session = session or uuid.uuid4().hex
        rec = self.store.create(session, prompt, spec.to_dict(), owner=self.owner, lease_ttl_ms=self.lease_ms,
                                turn_id=turn_id, key=key)
        self._epochs[session] = rec.epoch
        return session, list(prompt), rec.epoch

    def record(self, session: str, key: str = ""):
        """The session's record if it exists for `key` (the caller's key hash), else SessionGone."""
        try:
            rec = self.store.get(session)
        except SessionNotFound:
            raise SessionGone(f"session_id: {session!r} not found") from None
        if not hmac.compare_digest(rec.key, key):
            raise SessionGone(f"session_id: {session!r} not found")
        return rec

    def new_turn(self, session: str, user_tokens: list[int], spec: TurnSpec,
                 check: Callable[[list[int]], None], turn_id: str, key: str = "",
                 opening: Callable[[list[int]], list[int]] | None = None) -> tuple[list[int], int]:
        """Continue a session with the user's tokens (creating it under this id, bound to `key`,
        if new; `opening` then makes the first prompt, e.g. with the BOS its model needs).
        Returns (the turn's full prompt context, epoch). `check(context)` sees the turn's whole
        prompt context before anything is written, so a turn it refuses leaves no trace."""
        try:
            rec = self.store.get(session)
        except SessionNotFound:
            rec = None
        if rec is not None and not hmac.compare_digest(rec.key, key):
            raise SessionGone(f"session_id: {session!r} not found")     # another key's: not there for this one
        if rec is None:
            if not user_tokens:
                raise SessionGone(f"session_id: {session!r} not found and the prompt is empty") from None
            if opening is not None:
                user_tokens = opening(list(user_tokens))
            check(list(user_tokens))
            try:
                _, context, epoch = self.new_session(user_tokens, spec, session, turn_id, key)
            except SessionExists:
                raise SessionBusy(f"session_id: {session!r} was just created by another request") from None
            return context, epoch
        if rec.state == "active":
            raise SessionBusy(f"session_id: {session!r} has a turn in progress; resume it "
                              "(resume=true) or wait until it finishes")
        stored = self.store.context(session)
        context = stored + list(user_tokens)
        check(context)
        epoch = self._own(session, rec.epoch)   # LeaseHeld (retryable): another verifier is on it right now
        self.store.begin_turn(session, epoch, len(stored), user_tokens, params=spec.to_dict(), turn_id=turn_id)
        return context, epoch

    def latest_turn(self, session: str, key: str = "") -> str | None:
        """The id of the session's latest turn; None if Redis has no such session for `key`."""
        try:
            return self.record(session, key).turn_id
        except SessionGone:
            return None

    def take_over(self, session: str, key: str = "") -> TakeOver:
        rec = self.record(session, key)
        finished = rec.state != "active"
        epoch = rec.epoch if finished else self._own(session, rec.epoch)
        ctx = self.store.context(session)
        start = rec.turns[-1].gen_start
        return TakeOver(epoch, TurnSpec.from_dict(rec.params), ctx[:start], ctx[start:], finished)

    def _own(self, session: str, current: int) -> int:
        """The epoch under which this verifier writes: its own if still current, else a new lease
        (refused with LeaseHeld while another verifier's lease is live)."""
        mine = self._epochs.get(session)
        if mine == current:
            self.store.renew_lease(session, self.owner, mine, self.lease_ms)
            return mine
        epoch = self._epochs[session] = self.store.acquire_lease(session, self.owner, self.lease_ms)
        return epoch

    # --- CommitLog (called by the scheduler thread) ------------------------------------

    def append(self, session, epoch, expected_len, tokens):
        return self.store.append(session, epoch, expected_len, tokens)

    def renew(self, session, epoch):
        self.store.renew_lease(session, self.owner, epoch, self.lease_ms)

    def put_summary(self, session, epoch, data):
        self.store.put_summary(session, epoch, data)

    def summary(self, session):
        return self.store.get_summary(session)

    def ping(self):
        self.store.ping()

    def finish_turn(self, session, epoch, result):
        state = "aborted" if result.metrics.stop_reason == "aborted" else "finished"
        self.store.finish(session, epoch, state)

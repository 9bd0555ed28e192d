"""The drafter host: many sessions' Drafters over one shared model, in process and behind gRPC.

`DrafterHost` is the one place that holds drafter sessions. In process the round loop reaches it
through `LocalDrafterClient` (a DrafterClient of a few lines, below); the drafter service puts the
same host behind its gRPC servicer, which only converts messages. So validation (with the wire's
field names), the re-open on base_len 0, the sampling salt and the moment a KV summary is decoded
(up front, so a malformed one is refused with `summary: ...` before any state changes) and applied
(after the sync, before drafting) are one piece of code for both.

A session is admitted only if the bytes its SparseKVCache will allocate fit what both budgets
have left (`DrafterFull` otherwise), and gives them back on close or when it has been idle longer
than the TTL; a close or eviction then hands the freed pages to the OS (runtime.release_memory),
so the process's RSS falls with its sessions. The host budget counts the host tier, plus the
device KV when the device is the CPU (it is host RAM then too). Drafter state is disposable
(docs/design.md, invariant 2), so eviction and refusal cost the verifier speed, never tokens: it
decodes alone and re-opens later.

Per-session state lives in one table (`_sessions`). A round's Draft for all the sessions a
verifier holds here is one `draft_many`: every session is validated alone, then all are synced
and drafted together, one model forward per draft position (spec.drafter.draft_round), and each
gets its own reply or error. How a session starts is the `start_session` strategy (a prefill by
default; the acceptance bench adopts a known exact prefix instead).

Concurrency: a table lock for the session map and the byte count, a lock per session to order
its calls, and one compute lock around model forwards: the shared model builds its rotary table
and packed weights lazily (not thread-safe) and one device runs one forward at a time anyway.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from kvstore.cache.feed import Feed, FeedWant
from kvstore.cache.policies import get_policy
from kvstore.cache.sparse import SparseConfig
from kvstore.cache.summary import Summary, SummaryWant
from sparsespec.errors import ContextOverflow, InvalidArgument, SparseSpecError
from sparsespec.rpc.errors import DrafterFull, DrafterRejected, SessionUnknown, StateMismatch
from sparsespec.runtime import release_memory
from sparsespec.spec.adaptive import MAX_K
from sparsespec.spec.drafter import Drafter, DraftJob, draft_round, start_many
from sparsespec.spec.drafter_memory import SessionCost, session_cost
from sparsespec.spec.sampling import SamplingParams
from sparsespec.spec.transport import DRAFTER_FAILURES, DraftCall, DraftReply, DrafterClient, OpenCall, OpenReply

DRAFT_SALT = 0x5EED          # salts every session's drafting stream (params.generator(salt=...))
MAX_SESSION_ID = 256         # characters

# How a session starts: bring a fresh Drafter to the committed tokens. Runs under the compute lock.
# None (the default): a prefill, batched over the sessions that open together (start_many).
StartFn = Callable[[Drafter, list[int]], None]


@dataclass(frozen=True)
class DrafterHostConfig:
    """How a drafter host holds sessions. Validated at construction; errors name the field."""

    sparse: SparseConfig
    max_context: int                          # longest committed prefix a session may hold
    memory_budget_bytes: int | None = None    # device bytes for every session's KV; None = no limit
    session_ttl_s: float = 600.0              # a session idle this long is evicted
    host_memory_budget_bytes: int | None = None   # host RAM for every session (see SessionCost); None = no limit

    def __post_init__(self):
        if not isinstance(self.sparse, SparseConfig):
            raise InvalidArgument("sparse", f"must be a SparseConfig, got {type(self.sparse).__name__}")
        if self.max_context < 1:
            raise InvalidArgument("max_context", f"must be >= 1, got {self.max_context}")
        for name in ("memory_budget_bytes", "host_memory_budget_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InvalidArgument(name, f"must be an integer >= 1 or None (no limit), got {value!r}")
        if not self.session_ttl_s > 0:
            raise InvalidArgument("session_ttl_s", f"must be > 0, got {self.session_ttl_s}")

    @property
    def capacity(self) -> int:
        """KV entries a session's cache holds: the context plus one round's drafts."""
        return self.max_context + MAX_K + 1


@dataclass(frozen=True)
class OpenInfo:
    device_bytes: int
    host_bytes: int
    prefill_s: float
    want: SummaryWant | None = None
    feed: FeedWant | None = None


@dataclass(frozen=True)
class _Budget:
    config_field: str   # the DrafterHostConfig field it comes from
    name: str           # "device memory budget" | "host memory budget"
    limit: int          # bytes
    per_session: int    # bytes every session takes from it
    what: str           # what those bytes are


@dataclass(eq=False)
class _Session:
    epoch: int
    last_used: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    drafter: Drafter | None = None        # None while the session starts
    gen: torch.Generator | None = None
    closed: bool = False


def _retire(entry: _Session) -> None:
    """Mark a session closed and drop its cache now, not when the entry's last reference goes."""
    entry.closed = True
    entry.drafter = entry.gen = None


class DrafterHost:
    def __init__(self, model, config: DrafterHostConfig, clock: Callable[[], float] = time.monotonic,
                 start_session: StartFn | None = None):
        """`start_session`: how a session starts (default: a prefill of its committed tokens)."""
        if config.max_context > model.max_context:
            raise InvalidArgument("max_context", f"{config.max_context} exceeds the model's {model.max_context}")
        self.model, self.config, self.clock, self.start_session = model, config, clock, start_session
        self.vocab_size = model.cfg.vocab_size
        self.cost: SessionCost = session_cost(model.cfg, model.dtype, config.capacity, config.sparse)
        host_what = "host tier + device KV (the device is the CPU)" if model.device.type == "cpu" else "host tier"
        budgets = (_Budget("memory_budget_bytes", "device memory budget", config.memory_budget_bytes,
                           self.cost.device_bytes, "device KV"),
                   _Budget("host_memory_budget_bytes", "host memory budget", config.host_memory_budget_bytes,
                           self.cost.host_memory_bytes(model.device), host_what))
        self._budgets = tuple(b for b in budgets if b.limit is not None and b.per_session > 0)
        for b in self._budgets:
            if b.limit < b.per_session:
                raise InvalidArgument(b.config_field, f"{b.limit} bytes cannot hold one session "
                                               f"({b.per_session} bytes of {b.what})")
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()      # _sessions
        self._compute = threading.Lock()   # model forwards

    # --- capacity --------------------------------------------------------------------------

    @property
    def session_capacity(self) -> int | None:
        """Sessions both budgets hold at once (every session costs the same); None = no limit."""
        return min((b.limit // b.per_session for b in self._budgets), default=None)

    def load(self) -> int:
        return len(self._sessions)

    def used_bytes(self) -> int:
        """Device bytes the open sessions hold."""
        return len(self._sessions) * self.cost.device_bytes

    def used_host_bytes(self) -> int:
        """Host RAM the open sessions hold (what the host budget counts)."""
        return len(self._sessions) * self.cost.host_memory_bytes(self.model.device)

    def evict_idle(self) -> list[str]:
        """Drop sessions idle past the TTL (never one a call is using). Returns their ids."""
        with self._lock:
            idle = self._evict_idle()
        if idle:
            release_memory()
        return idle

    def _evict_idle(self) -> list[str]:
        deadline = self.clock() - self.config.session_ttl_s
        idle = [sid for sid, s in self._sessions.items() if s.last_used < deadline and not s.lock.locked()]
        for sid in idle:
            _retire(self._sessions.pop(sid))
        return idle

    def _over_budget(self) -> _Budget | None:
        """The first budget one more session would exceed."""
        n = len(self._sessions) + 1
        return next((b for b in self._budgets if n * b.per_session > b.limit), None)

    def _admit(self, session_id: str) -> None:
        # No release_memory here: the new session's cache reuses what an eviction freed.
        if self._over_budget() is not None:
            self._evict_idle()
        b = self._over_budget()
        if b is not None:
            held = len(self._sessions) * b.per_session
            raise DrafterFull(f"session {session_id} needs {b.per_session} bytes of {b.what}; {held} of "
                              f"the {b.limit}-byte {b.name} ({b.config_field}) are held by "
                              f"{len(self._sessions)} sessions")

    # --- the three calls -------------------------------------------------------------------

    def open(self, session_id: str, tokens: list[int], params: SamplingParams, epoch: int = 0) -> OpenInfo:
        """(Re)build the session from its committed tokens; refuses with DrafterFull."""
        result = self.open_many([OpenCall(session_id, tokens, params)], [epoch])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def open_many(self, calls: list[OpenCall], epochs: list[int] | None = None) -> list[OpenInfo | Exception]:
        """(Re)build many sessions at once: each is validated and admitted alone, then their
        prefills run together (spec.drafter.start_many: one forward for the prompts of one
        length). One result per call, in order: its OpenInfo or its error; a prefill that fails
        fails every session of the call (none of them is left half-open)."""
        epochs = [0] * len(calls) if epochs is None else epochs
        results: list[OpenInfo | Exception | None] = [None] * len(calls)
        opening: list[tuple[int, OpenCall, _Session]] = []
        with contextlib.ExitStack() as held:
            for i, (call, epoch) in enumerate(zip(calls, epochs)):
                try:
                    if any(c.session == call.session for _, c, _ in opening):
                        raise InvalidArgument("session_id", f"{call.session!r} appears twice in one open")
                    opening.append((i, call, self._register(call, epoch, held)))
                except Exception as e:  # noqa: BLE001 - this session's error, reported as its result
                    results[i] = e
            if not opening:
                return results
            t0 = time.perf_counter()
            drafters = [Drafter(self.model, self.config.sparse, self.config.capacity) for _ in opening]
            try:
                with self._compute:
                    if self.start_session is None:
                        start_many(drafters, [list(c.tokens) for _, c, _ in opening])
                    else:
                        for d, (_, c, _) in zip(drafters, opening):
                            self.start_session(d, list(c.tokens))
            except BaseException as e:
                for i, call, entry in opening:
                    self._forget(call.session, entry)
                    results[i] = e
                if not isinstance(e, Exception):
                    raise
                return results
            prefill_s = time.perf_counter() - t0
            for (i, call, entry), drafter in zip(opening, drafters):
                entry.drafter = drafter
                entry.gen = None if call.params.greedy else call.params.generator(salt=DRAFT_SALT)
                entry.last_used = self.clock()
                results[i] = OpenInfo(drafter.cache.device_bytes(), drafter.cache.host_bytes(), prefill_s,
                                      drafter.want(), drafter.feed_want())
        return results

    def _register(self, call: OpenCall, epoch: int, held: contextlib.ExitStack) -> _Session:
        """Validate one open and put its (still empty) entry in the table, locked by `held` so
        that no draft reaches the session before its drafter is there."""
        _check_session(call.session)
        _check_epoch(epoch)
        self._check_tokens("tokens", call.tokens)
        if not call.tokens:
            raise InvalidArgument("tokens", "is empty: a session opens from its committed prefix")
        if len(call.tokens) > self.config.max_context:
            raise ContextOverflow("tokens", f"{len(call.tokens)} tokens exceed the drafter's context limit "
                                            f"of {self.config.max_context}")
        entry = _Session(epoch=epoch, last_used=self.clock())
        held.enter_context(entry.lock)
        with self._lock:
            old = self._sessions.get(call.session)
            if old is not None and epoch < old.epoch:
                raise StateMismatch(f"epoch: {epoch} is older than the session's {old.epoch}")
            if old is not None:
                _retire(self._sessions.pop(call.session))
            self._admit(call.session)
            self._sessions[call.session] = entry
        return entry

    def draft(self, session_id: str, base_len: int, append: list[int], k: int, params: SamplingParams,
              epoch: int = 0, summary: bytes | None = None, feed: bytes | None = None) -> DraftReply:
        """Sync to base_len + append (the committed prefix), take the verifier's KV summary if
        one came, then chain-draft k tokens: `draft_many` for one session, raising its error.

        base_len 0: `append` is the whole committed prefix and the session is (re)built first.
        """
        result = self.draft_many([DraftCall(session_id, base_len, append, k, params, summary, feed)], [epoch])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def draft_many(self, calls: list[DraftCall], epochs: list[int] | None = None) -> list[DraftReply | Exception]:
        """One round for many sessions: each is validated, re-opened if its base_len is 0 (a
        prefill, alone), then all are synced and drafted together (spec.drafter.draft_round: one
        forward per draft position). One result per call, in order: its reply or its error; a
        session that fails (bad field, StateMismatch, no room) fails alone."""
        t0 = time.perf_counter()
        epochs = [0] * len(calls) if epochs is None else epochs
        results: list[DraftReply | Exception | None] = [None] * len(calls)
        ready: list[tuple[int, DraftCall, int, tuple[int, list[int]], tuple[Summary | None, Feed | None]]] = []
        seen: set[str] = set()
        for i, (call, epoch) in enumerate(zip(calls, epochs)):
            try:
                decoded = self._check_draft(call, epoch)
                if call.session in seen:
                    raise InvalidArgument("session_id", f"{call.session!r} appears twice in one round")
                seen.add(call.session)
                sync = (call.base_len, list(call.append))
                if call.base_len == 0:
                    self.open(call.session, sync[1], call.params, epoch)
                    sync = (len(sync[1]), [])
                ready.append((i, call, epoch, sync, decoded))
            except Exception as e:  # noqa: BLE001 - this session's error, reported as its result
                results[i] = e
        with contextlib.ExitStack() as held:
            jobs: list[tuple[int, str, _Session, DraftJob]] = []
            for i, call, epoch, sync, decoded in sorted(ready, key=lambda r: r[1].session):  # one lock order
                try:
                    entry = self._entry(call.session)
                    held.enter_context(entry.lock)
                    if entry.closed or entry.drafter is None:
                        raise SessionUnknown(f"session_id: {call.session!r} was closed or evicted: "
                                             "re-open it with base_len 0")
                    if epoch != entry.epoch:
                        raise StateMismatch(f"epoch: {epoch} does not match the session's {entry.epoch}: "
                                            "re-open it")
                    if entry.gen is None and not call.params.greedy:
                        entry.gen = call.params.generator(salt=DRAFT_SALT)
                except Exception as e:  # noqa: BLE001
                    results[i] = e
                    continue
                # The job holds the Drafter and generator: a close meanwhile frees them when we return.
                jobs.append((i, call.session, entry,
                             DraftJob(entry.drafter, call.k, call.params, entry.gen, sync, *decoded)))
            if jobs:
                with self._compute:
                    draft_round([job for _, _, _, job in jobs])
            for i, session_id, entry, job in jobs:
                if job.error is not None:
                    results[i] = job.error
                    if not isinstance(job.error, StateMismatch):   # StateMismatch leaves the state untouched
                        self._forget(session_id, entry)              # half-synced state is worth nothing
                    continue
                entry.last_used = self.clock()
                d = job.drafter
                results[i] = DraftReply(job.result.tokens, job.result.qs, time.perf_counter() - t0,
                                        d.cache.device_bytes(), d.cache.host_bytes(), d.want(), d.feed_want())
        return results

    def _check_draft(self, call: DraftCall, epoch: int) -> tuple[Summary | None, Feed | None]:
        """Validate one call before anything changes; returns its decoded summary and feed (a
        malformed one is refused up front, `summary: ...` / `feed...: ...`)."""
        _check_session(call.session)
        _check_epoch(epoch)
        summary = Summary.decode(call.summary) if call.summary else None
        feed = Feed.decode(call.feed) if call.feed else None
        max_k = min(MAX_K, self.config.sparse.max_draft)
        if not 1 <= call.k <= max_k:
            raise InvalidArgument("k", f"must be in [1, {max_k}], got {call.k}")
        if call.base_len < 0:
            raise InvalidArgument("base_len", f"must be >= 0, got {call.base_len}")
        self._check_tokens("append", call.append)
        if call.base_len + len(call.append) > self.config.max_context:
            raise ContextOverflow("append", f"base_len + append = {call.base_len + len(call.append)} tokens "
                                            f"exceed the drafter's context limit of {self.config.max_context}")
        if call.base_len == 0 and not call.append:
            raise InvalidArgument("append", "is empty: base_len 0 re-opens the session from append, "
                                            "the whole committed prefix")
        if feed is not None and not get_policy(self.config.sparse.policy).fed:
            raise InvalidArgument("feed", f"this drafter's policy {self.config.sparse.policy!r} keeps its own "
                                          "KV: send no feed")
        return summary, feed

    def close(self, session_id: str) -> bool:
        """Free the session (idempotent). True if it was open."""
        _check_session(session_id)
        with self._lock:
            entry = self._sessions.pop(session_id, None)
        if entry is None:
            return False
        _retire(entry)
        release_memory()   # a call still drafting on it frees the cache when it returns instead
        return True

    def drafter(self, session_id: str) -> Drafter:
        """The session's Drafter, to inspect (tests, benchmarks); SessionUnknown if none."""
        drafter = self._entry(session_id).drafter
        if drafter is None:
            raise SessionUnknown(f"session_id: {session_id!r} is starting, closed or evicted")
        return drafter

    # --- helpers ---------------------------------------------------------------------------

    def _entry(self, session_id: str) -> _Session:
        entry = self._sessions.get(session_id)
        if entry is None:
            raise SessionUnknown(f"session_id: {session_id!r} is not open on this drafter "
                                 "(closed, evicted, or never opened): re-open it with base_len 0")
        return entry

    def _forget(self, session_id: str, entry: _Session) -> None:
        with self._lock:
            if self._sessions.get(session_id) is entry:
                del self._sessions[session_id]
        _retire(entry)

    def _check_tokens(self, name: str, tokens) -> None:
        bad = next((t for t in tokens if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidArgument(name, f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")


class LocalDrafterClient(DrafterClient):
    """The round loop's DrafterClient over a DrafterHost in this process."""

    def __init__(self, host: DrafterHost):
        self.host = host

    def open(self, session, tokens, params):
        result = self._open([OpenCall(session, tokens, params)])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def open_many(self, calls):
        """The host's batched open; its refusals become DrafterRejected as `draft_many`'s do."""
        return self._open(calls)

    def _open(self, calls):
        return [r if isinstance(r, BaseException) else OpenReply(r.want, r.feed)
                for r in _as_remote(self.host.open_many(calls))]

    def draft(self, session, base_len, append, k, params, summary=None, feed=None):
        return self.host.draft(session, base_len, append, k, params, summary=summary, feed=feed)

    def draft_many(self, calls):
        """The host's batched round. Its refusals (a bad field, a context past its limit) become
        DrafterRejected as they do over gRPC; anything else unexpected is a bug and raises."""
        return _as_remote(self.host.draft_many(calls))

    def close(self, session):
        self.host.close(session)


def _as_remote(results: list) -> list:
    """A host's per-call results as a remote drafter's would be: its refusals (a bad field, a
    context past its limit) become DrafterRejected, as over gRPC; anything else unexpected is a
    bug and raises."""
    for i, r in enumerate(results):
        if isinstance(r, DRAFTER_FAILURES):
            continue
        if isinstance(r, SparseSpecError):
            results[i] = DrafterRejected(str(r))
        elif isinstance(r, BaseException):
            raise r
    return results


def _check_session(session_id: str) -> None:
    if not isinstance(session_id, str) or not session_id:
        raise InvalidArgument("session_id", "is empty")
    if len(session_id) > MAX_SESSION_ID:
        raise InvalidArgument("session_id", f"is {len(session_id)} characters, more than {MAX_SESSION_ID}")


def _check_epoch(epoch: int) -> None:
    if epoch < 0:
        raise InvalidArgument("epoch", f"must be >= 0, got {epoch}")

"""The round scheduler: one thread drives every session's rounds through one SpecEngine.

Sessions join and leave between rounds, so the verifier batches the verification of all active
sessions in one forward. Tokens a round commits are appended to the session's log (Redis) with
the owner's epoch BEFORE anyone can stream them (invariant: committed means durable); streams
read the job's mirror of that log, which only grows after a successful append.

Between turns a session keeps ("parks") its cache row and its drafter state, so a next turn
reuses both; when rows run out the least recently used parked session gives its row up.

Nothing a request does may stop the loop: a failure is the failing job's, never the thread's.
When Redis cannot be reached the committed tokens wait in the job's backlog and its run pauses
(no round runs ahead of what is durable) until Redis answers again; only a lost lease (another
verifier took the session) ends a job. Should the loop die anyway, `crashed` says so and the
service stops serving (verifier_service/server.py).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from kvstore.coord.sessions import RedisUnavailable, SessionBusy
from sparsespec import failpoints, telemetry
from sparsespec.errors import SparseSpecError
from sparsespec.spec.loop import GenerationRequest, GenerationResult, Run, SpecEngine, Start
from sparsespec.spec.metrics import RequestMetrics

log = logging.getLogger(__name__)


class Overloaded(SparseSpecError):
    """Admission control: the verifier's queue is full. Retry later or elsewhere."""


class Stopped(SparseSpecError):
    """This verifier stopped running rounds (shut down, or its loop died): resume elsewhere."""


class LeaseLost(SparseSpecError):
    """Another verifier owns the session now; this one must stop writing to it."""


class CommitLog:
    """Where committed tokens become durable. The verifier service passes the Redis store;
    `append` must refuse a stale epoch. The default keeps nothing (in-process use, tests)."""

    def append(self, session: str, epoch: int, expected_len: int, tokens: list[int]) -> int:
        return expected_len + len(tokens)

    def renew(self, session: str, epoch: int) -> None:
        pass

    def finish_turn(self, session: str, epoch: int, result: GenerationResult) -> None:
        pass

    def ping(self) -> None:
        """Raises RedisUnavailable while the log cannot be written."""

    def put_summary(self, session: str, epoch: int, data: bytes) -> None:
        """Keep the session's latest KV summary, so a replacement drafter starts from it."""

    def summary(self, session: str) -> bytes | None:
        """The session's latest KV summary, if one was kept."""
        return None


@dataclass
class Job:
    """One turn of one session, from submission to its final result."""
    session: str
    epoch: int
    req: GenerationRequest
    log_len: int                            # committed context length in the log at the start
    turn_id: str = ""                       # the turn's id in the log (the client's, if it sent one)
    key: str = ""                           # hash of the API key its session is bound to ('' without keys)
    generated: list[int] = field(default_factory=list)   # durable tokens of this turn (mirror)
    result: GenerationResult | None = None
    error: BaseException | None = None
    cancelled: bool = False                 # ends at the next round with stop reason "aborted"
    backlog: list[int] = field(default_factory=list)      # committed, not yet durable (Redis down)
    run: Run | None = None                  # the engine's run, while the turn holds a row
    watchers: int = 0                       # streams following it (the servicer counts them)
    changed: threading.Condition = field(default_factory=threading.Condition)
    clock: telemetry.TokenClock | None = None   # TTFT and inter-token latency (/metrics)

    def __post_init__(self):
        self.clock = telemetry.TokenClock(fresh=not self.generated)

    @property
    def finished(self) -> bool:
        return self.result is not None or self.error is not None

    def wait_beyond(self, offset: int, timeout: float) -> None:
        """Block until more than `offset` tokens are durable, or the job ended."""
        with self.changed:
            self.changed.wait_for(lambda: len(self.generated) > offset or self.finished, timeout)

    def _update(self, tokens=(), result=None, error=None) -> None:
        if tokens:
            self.clock.tokens(len(tokens))
        with self.changed:
            self.generated.extend(tokens)
            if result is not None:
                self.result = result
            if error is not None and self.error is None:
                self.error = error
            self.changed.notify_all()


@dataclass
class _Parked:
    row: int
    context: list[int]          # what the row's session has committed (prompt + generated)
    drafter_base: int           # committed tokens the drafter holds


class Scheduler:
    def __init__(self, engine: SpecEngine, commit_log: CommitLog | None = None,
                 max_queue: int = 64, renew_every_s: float = 0.5, retry_log_s: float = 0.25):
        self.engine = engine
        self.log = commit_log or CommitLog()
        self.max_queue = max_queue
        self.renew_every_s = renew_every_s
        self.retry_log_s = retry_log_s
        self._pending: queue.Queue[Job] = queue.Queue()
        self._active: dict[str, Job] = {}           # session -> its running turn (job.run set)
        self._parked: OrderedDict[str, _Parked] = OrderedDict()
        self._free_rows = list(range(engine.max_batch))
        self._admitted: set[str] = set()      # sessions queued or running (guarded by _lock)
        self._reserved = 0                    # admission slots taken by turns not yet submitted
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="round-scheduler", daemon=True)
        self._last_renew = 0.0
        self._log_down_since: float | None = None   # monotonic time Redis stopped answering
        self._last_log_try = 0.0
        self.crashed: BaseException | None = None  # set when the loop itself died

    # --- called from RPC threads --------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def reserve(self) -> "Slot":
        """Take an admission slot before the turn writes anything: a full verifier refuses
        here (Overloaded), so a refused request leaves no trace in Redis."""
        with self._lock:
            if self._load() + self._reserved >= self.max_queue:
                raise Overloaded(f"verifier busy: {self.max_queue} sessions queued or running")
            self._reserved += 1
        return Slot(self)

    def submit(self, job: Job, slot: "Slot | None" = None) -> Job:
        """Queue a turn (into `slot` if reserved). A session has at most one turn here."""
        slot = slot or self.reserve()
        try:
            self.engine.check(job.req)
            with self._lock:
                if job.session in self._admitted:
                    raise SessionBusy(f"session_id: {job.session!r} has a turn running on this verifier")
                self._admitted.add(job.session)
                self._pending.put(job)
        finally:
            slot.release()
        self._wake.set()
        return job

    def cancel(self, job: Job) -> bool:
        """End a queued or running turn at the next round (stop reason "aborted").
        False if it has ended already."""
        if job.finished:
            return False
        job.cancelled = True
        self._wake.set()
        return True

    def load(self) -> int:
        """Turns queued or running."""
        with self._lock:
            return self._load()

    def _load(self) -> int:
        return len(self._admitted)

    def idle(self) -> bool:
        return self.load() == 0

    def rows(self) -> dict[str, int]:
        """Where the verifier's cache rows are: running, parked, free (they sum to max_batch)."""
        return {"active": len(self._active), "parked": len(self._parked), "free": len(self._free_rows)}

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the loop and fail whatever still runs (callers drain first)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.fail_all(Stopped("verifier: shutting down; resume on another verifier"))

    def fail_all(self, error: BaseException) -> None:
        """Fail every queued and running turn (the loop is gone): their streams end with the
        error and the SDK resumes them elsewhere."""
        for job in list(self._active.values()):
            self._drop(job, error)
        while True:
            try:
                job = self._pending.get_nowait()
            except queue.Empty:
                break
            self._forget(job)
            job._update(error=error)

    # --- the loop -----------------------------------------------------------------------

    def run(self, until) -> None:
        """Run rounds on the calling thread until `until()` is true (or `stop`).

        The verifier process calls this on its main thread: torch ops issued from a worker
        thread ran measurably slower here (see sparsespec/runtime.py). An exception that
        escapes is a bug: it is kept in `crashed`, every turn fails with Stopped (their clients
        resume elsewhere), and it is re-raised for the process to exit on."""
        try:
            while not self._stop.is_set() and not until():
                self._admit()
                if not self._active:
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                self._renew_leases()
                failpoints.hit("scheduler.round")
                self._round()
        except BaseException as e:
            self.crashed = e
            self.fail_all(Stopped("verifier: the round scheduler died; resume on another verifier"))
            raise

    def _loop(self) -> None:
        try:
            self.run(lambda: False)
        except BaseException:  # noqa: BLE001 - kept in self.crashed; health reports it
            log.exception("round scheduler died")

    def _admit(self) -> None:
        """Start the queued turns that fit, together (SpecEngine.start_many: turns that arrive
        together share their prefill forwards and their drafter open)."""
        batch: list[tuple[Job, Start]] = []
        while len(self._active) + len(batch) < self.engine.max_batch:
            try:
                job = self._pending.get_nowait()
            except queue.Empty:
                break
            if job.cancelled:
                self._forget(job)
                self._abandon(job)
                job._update(result=GenerationResult([], "", RequestMetrics(stop_reason="aborted")))
                continue
            parked = self._parked.pop(job.session, None)
            if parked is None and not self._free_rows:
                self._evict_lru()
            row = parked.row if parked else self._free_rows.pop()
            cached = _common_prefix(parked.context, job.req.prompt_ids) if parked else 0
            drafter_base = parked.drafter_base if parked and cached == len(parked.context) else 0
            try:
                summary = None if parked else self._stored_summary(job.session)
            except Exception as e:  # noqa: BLE001 - one bad session must not stop the others
                self._fail_start(job, row, e)
                continue
            batch.append((job, Start(job.req, row, job.session, cached, drafter_base, summary)))
        if not batch:
            return
        try:
            runs = self.engine.start_many([start for _, start in batch])
        except Exception as e:  # noqa: BLE001 - a bug in starting: these turns fail, the loop goes on
            runs = [e] * len(batch)
        for (job, start), run in zip(batch, runs):
            if isinstance(run, BaseException):
                self._fail_start(job, start.row, run)
                continue
            job.run = run
            self._active[job.session] = job

    def _fail_start(self, job: Job, row: int, error: BaseException) -> None:
        log.error("session %s failed to start", job.session, exc_info=error)
        self._free_rows.append(row)
        self._forget(job)
        self._abandon(job)
        job._update(error=error)

    def _stored_summary(self, session: str) -> bytes | None:
        try:
            return self.log.summary(session)
        except SparseSpecError as e:       # advice only: a session starts without it
            log.warning("session %s: no stored summary: %s", session, e)
            return None

    def _keep_summary(self, job: Job) -> None:
        data = self.engine.summary_to_keep(job.run)
        if data is None:
            return
        try:
            self.log.put_summary(job.session, job.epoch, data)
        except SparseSpecError as e:       # advice only: the tokens are what must be durable
            log.warning("session %s: summary not stored: %s", job.session, e)

    def _evict_lru(self) -> None:
        """Free a parked session's row. Rows are active + parked + free == max_batch and a job
        is admitted only while fewer than max_batch run, so a parked session exists here."""
        session, parked = self._parked.popitem(last=False)
        self._free_rows.append(parked.row)
        self.engine.close_drafter(session)

    def _renew_leases(self) -> None:
        now = time.monotonic()
        if now - self._last_renew < self.renew_every_s or not self._log_reachable():
            return
        self._last_renew = now
        for job in list(self._active.values()):
            try:
                self.log.renew(job.session, job.epoch)
            except RedisUnavailable as e:
                self._log_down(e)
                return
            except Exception as e:  # noqa: BLE001 - the lease moved on (or worse): this job ends
                self._drop(job, e)

    def _round(self) -> None:
        jobs = list(self._active.values())
        for job in jobs:
            if job.cancelled:
                self.engine.cancel(job.run)
        # In row order, so that adjacent rows are verified over a view of the cache, not a copy.
        # A run whose tokens are not durable yet waits: nothing runs ahead of the log.
        runnable = sorted((job.run for job in jobs if not job.run.done and not job.backlog),
                          key=lambda r: r.row)
        try:
            t0 = time.monotonic()
            committed = self.engine.step(runnable) if runnable else {}
            if runnable:
                telemetry.ROUND.observe(time.monotonic() - t0)
        except Exception as e:  # noqa: BLE001 - a failed forward fails these jobs, not the server
            log.exception("round failed")
            for job in jobs:
                self._drop(job, e)
            return
        for job in jobs:
            job.backlog += committed.get(job.session, [])
            self._sync(job)
        if not runnable and self._log_down_since is not None:
            self._wake.wait(self.retry_log_s)   # nothing to compute until Redis is back
            self._wake.clear()

    def _sync(self, job: Job) -> None:
        """Make the round's results durable, then stream them; finish a done run."""
        if not self._log_reachable():
            return
        try:
            if job.backlog:
                self.log.append(job.session, job.epoch, job.log_len + len(job.generated), job.backlog)
                tokens, job.backlog = job.backlog, []
                job._update(tokens)
            self._keep_summary(job)
            if job.run.done:
                self._complete(job)
        except RedisUnavailable as e:
            self._log_down(e)
        except SparseSpecError as e:            # the lease moved on, or the log disagrees
            self._drop(job, e)
        except Exception as e:  # noqa: BLE001 - one session's failure is not the loop's
            log.exception("session %s: commit failed", job.session)
            self._drop(job, e)

    def _log_reachable(self) -> bool:
        """False while Redis is down, probing it at most every retry_log_s."""
        if self._log_down_since is None:
            return True
        now = time.monotonic()
        if now - self._last_log_try < self.retry_log_s:
            return False
        self._last_log_try = now
        try:
            self.log.ping()
        except RedisUnavailable:
            return False
        log.warning("redis answers again after %.1f s; committing the backlog",
                    now - self._log_down_since)
        self._log_down_since = None
        return True

    def _log_down(self, error: BaseException) -> None:
        if self._log_down_since is None:
            log.warning("%s; sessions pause until it answers", error)
            self._log_down_since = self._last_log_try = time.monotonic()

    def _complete(self, job: Job) -> None:
        run = job.run
        result = self.engine.finish(run)
        self.log.finish_turn(job.session, job.epoch, result)   # RedisUnavailable: retried later
        del self._active[job.session]
        self._forget(job)
        self._parked[job.session] = _Parked(run.row, list(run.tokens), run.drafter_base)
        telemetry.turn_finished(result.metrics)
        job._update(result=result)

    def _drop(self, job: Job, error: BaseException) -> None:
        """The session leaves this verifier: free its row and drafter state, fail the job."""
        self._active.pop(job.session, None)
        self._forget(job)
        self.engine.release(job.run)
        self._free_rows.append(job.run.row)
        job._update(error=error)

    def _abandon(self, job: Job) -> None:
        """A turn that failed before committing anything is aborted in the log, so the
        session takes a next turn (it would wait for a resume otherwise)."""
        try:
            self.log.finish_turn(job.session, job.epoch, GenerationResult([], "", RequestMetrics(stop_reason="aborted")))
        except SparseSpecError as e:
            log.warning("session %s: not marked aborted: %s", job.session, e)

    def _forget(self, job: Job) -> None:
        with self._lock:
            self._admitted.discard(job.session)


class Slot:
    """An admission slot taken by `Scheduler.reserve`; released when the turn is submitted or
    refused (use as a context manager around the writes that start the turn)."""

    def __init__(self, scheduler: Scheduler):
        self._scheduler: Scheduler | None = scheduler

    def release(self) -> None:
        s, self._scheduler = self._scheduler, None
        if s is not None:
            with s._lock:
                s._reserved -= 1

    def __enter__(self) -> "Slot":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n

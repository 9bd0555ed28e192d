"""The round scheduler: one thread drives every session's rounds through one SpecEngine.

Sessions join and leave between rounds, so the verifier batches the verification of all active
sessions in one forward. Tokens a round commits are appended to the session's log (Redis) with
the owner's epoch BEFORE anyone can stream them (invariant: committed means durable); streams
read the job's mirror of that log, which only grows after a successful append.

Between turns a session keeps ("parks") its cache row and its drafter state, so a next turn
reuses both; when rows run out the least recently used parked session gives its row up.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from sparsespec.errors import SparseSpecError
from sparsespec.spec.loop import GenerationRequest, GenerationResult, Run, SpecEngine

log = logging.getLogger(__name__)


class Overloaded(SparseSpecError):
    """Admission control: the verifier's queue is full. Retry later or elsewhere."""


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
    generated: list[int] = field(default_factory=list)   # durable tokens of this turn (mirror)
    result: GenerationResult | None = None
    error: BaseException | None = None
    cancelled: bool = False
    changed: threading.Condition = field(default_factory=threading.Condition)

    @property
    def finished(self) -> bool:
        return self.result is not None or self.error is not None

    def wait_beyond(self, offset: int, timeout: float) -> None:
        """Block until more than `offset` tokens are durable, or the job ended."""
        with self.changed:
            self.changed.wait_for(lambda: len(self.generated) > offset or self.finished, timeout)

    def _update(self, tokens=(), result=None, error=None) -> None:
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
                 max_queue: int = 64, renew_every_s: float = 0.5):
        self.engine = engine
        self.log = commit_log or CommitLog()
        self.max_queue = max_queue
        self.renew_every_s = renew_every_s
        self._pending: queue.Queue[Job] = queue.Queue()
        self._active: dict[str, tuple[Job, Run]] = {}
        self._parked: OrderedDict[str, _Parked] = OrderedDict()
        self._free_rows = list(range(engine.max_batch))
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="round-scheduler", daemon=True)
        self._last_renew = 0.0

    # --- called from RPC threads --------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> Job:
        self.engine.check(job.req)
        if self._pending.qsize() + len(self._active) >= self.max_queue:
            raise Overloaded(f"verifier busy: {self.max_queue} sessions queued or running")
        self._pending.put(job)
        self._wake.set()
        return job

    def cancel(self, session: str) -> bool:
        entry = self._active.get(session)
        if entry is None:
            return False
        entry[0].cancelled = True
        return True

    def load(self) -> int:
        return self._pending.qsize() + len(self._active)

    def idle(self) -> bool:
        return self.load() == 0

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the loop and fail whatever still runs (callers drain first)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        for job, run in list(self._active.values()):
            self._drop(job, run, SparseSpecError("verifier shutting down"))

    # --- the loop -----------------------------------------------------------------------

    def run(self, until) -> None:
        """Run rounds on the calling thread until `until()` is true (or `stop`).

        The verifier process calls this on its main thread: torch ops issued from a worker
        thread ran measurably slower here (see sparsespec/runtime.py)."""
        while not self._stop.is_set() and not until():
            self._admit()
            if not self._active:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            self._renew_leases()
            self._round()

    def _loop(self) -> None:
        self.run(lambda: False)

    def _admit(self) -> None:
        while self._active.__len__() < self.engine.max_batch:
            try:
                job = self._pending.get_nowait()
            except queue.Empty:
                return
            parked = self._parked.pop(job.session, None)
            if parked is None and not self._free_rows:
                self._evict_lru()
            row = parked.row if parked else self._free_rows.pop()
            cached = _common_prefix(parked.context, job.req.prompt_ids) if parked else 0
            drafter_base = parked.drafter_base if parked and cached == len(parked.context) else 0
            try:
                summary = None if parked else self._stored_summary(job.session)
                run = self.engine.start(job.req, row, job.session, cached, drafter_base, summary)
            except Exception as e:  # noqa: BLE001 - one bad session must not stop the others
                log.exception("session %s failed to start", job.session)
                self._free_rows.append(row)
                job._update(error=e)
                continue
            self._active[job.session] = (job, run)

    def _stored_summary(self, session: str) -> bytes | None:
        try:
            return self.log.summary(session)
        except SparseSpecError as e:       # advice only: a session starts without it
            log.warning("session %s: no stored summary: %s", session, e)
            return None

    def _keep_summary(self, job: Job, run: Run) -> None:
        s = run.summary
        if s is None or not s.dirty:
            return
        s.dirty = False
        try:
            self.log.put_summary(job.session, job.epoch, s.latest)
        except SparseSpecError as e:       # advice only: the tokens are what must be durable
            log.warning("session %s: summary not stored: %s", job.session, e)

    def _evict_lru(self) -> None:
        session, parked = self._parked.popitem(last=False)
        self.engine.drafter and self.engine.drafter.close(session)
        self._free_rows.append(parked.row)

    def _renew_leases(self) -> None:
        now = time.monotonic()
        if now - self._last_renew < self.renew_every_s:
            return
        self._last_renew = now
        for job, run in list(self._active.values()):
            try:
                self.log.renew(job.session, job.epoch)
            except SparseSpecError as e:
                self._drop(job, run, e)

    def _round(self) -> None:
        entries = list(self._active.values())
        for job, run in entries:
            if job.cancelled:
                run.done, run.stopper.reason = True, "aborted"
        # In row order, so that adjacent rows are verified over a view of the cache, not a copy.
        runnable = sorted((run for job, run in entries if not run.done), key=lambda r: r.row)
        try:
            committed = self.engine.step(runnable) if runnable else {}
        except Exception as e:  # noqa: BLE001 - a failed forward fails these jobs, not the server
            log.exception("round failed")
            for job, run in entries:
                self._drop(job, run, e)
            return
        for job, run in entries:
            tokens = committed.get(job.session, [])
            if tokens:
                try:
                    self.log.append(job.session, job.epoch, job.log_len + len(job.generated), tokens)
                except SparseSpecError as e:
                    self._drop(job, run, e)
                    continue
                job._update(tokens)
            self._keep_summary(job, run)
            if run.done:
                self._complete(job, run)

    def _complete(self, job: Job, run: Run) -> None:
        del self._active[job.session]
        result = self.engine.finish(run)
        try:
            self.log.finish_turn(job.session, job.epoch, result)
        except SparseSpecError as e:
            self.engine.release(run)
            self._free_rows.append(run.row)
            job._update(error=e)
            return
        self._parked[job.session] = _Parked(run.row, list(run.tokens), run.drafter_base)
        job._update(result=result)

    def _drop(self, job: Job, run: Run, error: BaseException) -> None:
        """The session leaves this verifier: free its row and drafter state, fail the job."""
        self._active.pop(job.session, None)
        self.engine.release(run)
        self._free_rows.append(run.row)
        job._update(error=error)


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n

"""The public Generation API: validate, open or continue a session, stream durable tokens.

A stream never produces tokens itself: it follows the job's durable mirror (tokens already in
the session log), from any offset. That is what makes resume exact: a client that reconnects
with (session, offset), here or on another verifier, gets the tokens after offset, none lost,
none repeated.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from contextlib import contextmanager
from functools import partial

import grpc

from kvstore.coord.sessions import SessionBusy
from sparsespec import telemetry
from sparsespec.auth import ApiKeys, caller_hash
from sparsespec.errors import ContextOverflow, InvalidArgument, SparseSpecError, shown
from sparsespec.rpc.sparsespec.v1 import generation_pb2 as pb
from sparsespec.rpc.sparsespec.v1 import generation_pb2_grpc as pb_grpc
from sparsespec.spec.adaptive import MAX_K, AdaptiveConfig
from sparsespec.spec.loop import MODES
from sparsespec.tokens import with_bos
from verifier_service.durable import DurableSessions, SessionGone, TurnSpec
from verifier_service.scheduler import Job, LeaseLost, Overloaded, Scheduler, Stopped

log = logging.getLogger(__name__)

POLL_S = 0.5


def status_of(e: BaseException) -> grpc.StatusCode:
    from kvstore.coord.sessions import LeaseHeld, RedisUnavailable, SessionNotFound, StaleEpoch
    if isinstance(e, ContextOverflow):
        return grpc.StatusCode.OUT_OF_RANGE
    if isinstance(e, InvalidArgument):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(e, (SessionNotFound, SessionGone)):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(e, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(e, SessionBusy):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(e, (StaleEpoch, LeaseLost, LeaseHeld, ResumeRace)):  # retryable: the lease moves on
        return grpc.StatusCode.ABORTED
    if isinstance(e, (RedisUnavailable, Draining, Stopped)):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(e, SparseSpecError):
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INTERNAL


class Draining(SparseSpecError):
    """This verifier is shutting down and takes no new work."""


class ResumeRace(SparseSpecError):
    """Another request is taking this session over right now; a retry re-attaches to it."""


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, scheduler: Scheduler, sessions: DurableSessions, tokenizer, model_info: dict,
                 default_k: int = 4, api_keys: ApiKeys | None = None):
        """api_keys: every call carries one of them (ApiKeyInterceptor refuses the others) and a
        session belongs to the key that created it; None: no authentication."""
        self.api_keys = api_keys
        self.scheduler = scheduler
        self.sessions = sessions
        self.tokenizer = tokenizer
        self.model_info = model_info
        self.default_k = default_k
        self.jobs: dict[str, Job] = {}   # session -> its turn on this verifier, while it runs or is followed
        self.draining = False            # set on SIGTERM: new work goes elsewhere
        self._lock = threading.Lock()    # jobs, _claimed, Job.watchers
        self._claimed: set[str] = set()  # sessions whose turn is being registered right now

    # --- RPCs -------------------------------------------------------------------------

    def Generate(self, request, context):
        try:
            job, offset = self._open(request, caller_hash(self.api_keys, context))
        except Exception as e:  # noqa: BLE001 - every failure becomes a status with a message
            self._abort(context, e)
        yield from self._stream(job, offset, context)

    def Abort(self, request, context):
        """NOT_FOUND for a session Redis does not have for this caller's key (another key's
        session reads exactly as an unknown one); else whether a turn running here was cancelled."""
        try:
            if not request.session_id:
                raise InvalidArgument("session_id", "is empty")
            self.sessions.record(request.session_id, caller_hash(self.api_keys, context))
        except Exception as e:  # noqa: BLE001 - every failure becomes a status with a message
            self._abort(context, e)
        job = self.jobs.get(request.session_id)
        return pb.AbortReply(aborted=job is not None and self.scheduler.cancel(job))

    def GetModelInfo(self, request, context):
        return pb.ModelInfo(**self.model_info)

    # --- helpers ----------------------------------------------------------------------

    def _abort(self, context, e: BaseException):
        code = status_of(e)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("internal error")
            context.abort(code, f"internal error: {type(e).__name__}: {e}")
        context.abort(code, str(e))

    def _open(self, request, key: str) -> tuple[Job, int]:
        """Validate, then register the turn: nothing reaches Redis for a refused request.
        `key`: the caller's API key hash, which the session must be bound to."""
        if self.draining:
            raise Draining("verifier is draining; retry on another verifier")
        if request.resume:
            return self._resume(request, key)
        return self._new_turn(request, key), 0

    def _new_turn(self, request, key: str) -> Job:
        spec = self._turn_spec(request)
        prompt = self._prompt_ids(request)
        session = request.session_id or uuid.uuid4().hex
        turn_id = request.turn_id or uuid.uuid4().hex

        def check(context: list[int]) -> None:         # the whole prompt, before any write
            self.scheduler.engine.check(spec.request(context))

        with self._claim(session, SessionBusy, key), self.scheduler.reserve() as slot:
            # A text prompt that starts a session gets the BOS its model needs (Gemma; not SmolLM2).
            opening = partial(with_bos, self.tokenizer) if request.WhichOneof("prompt") == "text" else None
            context, epoch = self.sessions.new_turn(session, prompt, spec, check, turn_id, key, opening)
            job = Job(session, epoch, spec.request(context), log_len=len(context), turn_id=turn_id, key=key)
            return self._submit(job, slot)

    def _resume(self, request, key: str) -> tuple[Job, int]:
        """Re-attach to a turn: here if it runs here, else take the session over from the log.

        The log is the truth: a session Redis no longer has is not answered from memory. With
        the client's turn_id, a retry of a turn that never started (its first try failed before
        any verifier registered it) starts it now, and one whose session has since started
        another turn is told so, never handed that other turn's tokens."""
        session = request.session_id
        if not session:
            raise InvalidArgument("session_id", "resume needs a session_id")
        if request.resume_offset < 0:
            raise InvalidArgument("resume_offset", f"must be >= 0, got {request.resume_offset}")
        latest = self.sessions.latest_turn(session, key)
        if request.turn_id and latest != request.turn_id:
            if request.resume_offset == 0:
                return self._new_turn(request, key), 0
            raise SessionGone(f"turn_id: {shown(request.turn_id)} is no longer the latest turn of session "
                              f"{shown(session)}")
        job = self.jobs.get(session)
        if latest is None:
            if job is not None and job.key == key:      # not another key's running turn
                self._forget(job)
            raise SessionGone(f"session_id: {shown(session)} not found")
        if job is not None and job.error is None and job.turn_id == latest:
            return job, request.resume_offset
        with self._claim(session, ResumeRace, key), self.scheduler.reserve() as slot:
            state = self.sessions.take_over(session, key)
            # The turn's prompt is state.context; the tokens it already generated are durable and
            # are this job's first tokens; the rest is generated from context + generated.
            job = Job(session, state.epoch, state.spec.request(state.context),
                      log_len=len(state.context), generated=list(state.generated), turn_id=latest, key=key)
            remaining = state.spec.max_tokens - len(state.generated)
            if state.finished or remaining <= 0:
                job.result = state.result()
                return job, request.resume_offset
            job.req = state.spec.request(state.context + state.generated, max_tokens=remaining)
            telemetry.RESUMES.inc()
            return self._submit(job, slot), request.resume_offset

    @contextmanager
    def _claim(self, session: str, busy: type[SparseSpecError], key: str):
        """Check that no turn of `session` runs here and register one, as one step: of
        concurrent turns of a session exactly one gets through, the others get `busy` at once.
        Another key's session is not there for this caller (SessionGone), busy or not."""
        with self._lock:
            running = self.jobs.get(session)
            if running is not None and running.key != key:
                raise SessionGone(f"session_id: {shown(session)} not found")
            if session in self._claimed or (running is not None and not running.finished):
                raise busy(f"session_id: {shown(session)} has a turn running; resume it or wait "
                           "until it finishes")
            self._claimed.add(session)
        try:
            yield
        finally:
            with self._lock:
                self._claimed.discard(session)

    def _submit(self, job: Job, slot) -> Job:
        self.scheduler.submit(job, slot)
        with self._lock:
            self.jobs[job.session] = job
            self._prune()
        return job

    def _prune(self) -> None:
        """Forget finished turns nobody follows (a later resume reads them from the log)."""
        for session, job in list(self.jobs.items()):
            if job.finished and job.watchers == 0:
                del self.jobs[session]

    def _forget(self, job: Job) -> None:
        with self._lock:
            if self.jobs.get(job.session) is job:
                del self.jobs[job.session]

    def _follow(self, job: Job, context) -> None:
        """Count the streams that follow a turn; when the last one goes away before the turn
        ends, its client is gone: cancel it, so it frees its row at the next round."""
        with self._lock:
            job.watchers += 1

        def gone():
            with self._lock:
                job.watchers -= 1
                orphaned = job.watchers == 0 and not job.finished
                self._prune()
            if orphaned and self.scheduler.cancel(job):
                log.info("session %s: client went away; turn cancelled", job.session)

        context.add_callback(gone)

    def _stream(self, job: Job, offset: int, context):
        self._follow(job, context)
        sent_text = ""
        stream_text = not job.req.stop
        while True:
            job.wait_beyond(offset, POLL_S)
            if not context.is_active():
                return  # the client went away (`_follow` cancels the turn); what it committed stays durable
            tokens = job.generated[offset:]
            if tokens:
                msg = pb.GenerateResponse(session_id=job.session, token_ids=tokens, offset=offset)
                if stream_text:
                    text = self.tokenizer.decode(job.generated[:offset + len(tokens)],
                                                 skip_special_tokens=True) if self.tokenizer else ""
                    msg.text_delta, sent_text = text[len(sent_text):], text
                offset += len(tokens)
                yield msg
                continue
            if job.error is not None:
                self._abort(context, job.error)
            if job.result is not None:
                final = job.result.text if self.tokenizer else ""
                yield pb.GenerateResponse(
                    session_id=job.session, offset=offset, finished=True,
                    stop_reason=job.result.metrics.stop_reason,
                    text_delta=final[len(sent_text):] if final.startswith(sent_text) else "",
                    metrics_json=json.dumps(job.result.metrics.to_dict()))
                return

    def _prompt_ids(self, request) -> list[int]:
        which = request.WhichOneof("prompt")
        if which == "token_ids":
            ids = list(request.token_ids.ids)
        elif which == "text":
            if self.tokenizer is None:
                raise InvalidArgument("text", "this verifier has no tokenizer; send token_ids")
            ids = self.tokenizer.encode(request.text, add_special_tokens=False)
        else:
            ids = []
        if not ids and not request.session_id:
            raise InvalidArgument("prompt", "is empty")
        vocab = self.model_info["vocab_size"]
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InvalidArgument("token_ids", f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        return ids

    def _turn_spec(self, request) -> TurnSpec:
        if request.max_tokens <= 0:
            raise InvalidArgument("max_tokens", f"must be >= 1, got {request.max_tokens}")
        k = request.k or self.default_k
        if not 1 <= k <= MAX_K:
            raise InvalidArgument("k", f"must be in [1, {MAX_K}], got {request.k}")
        mode = request.mode or "spec"
        if mode not in MODES:
            raise InvalidArgument("mode", f"must be one of {MODES}, got {shown(mode)}")
        from sparsespec.rpc.convert import sampling_from_proto
        sampling = sampling_from_proto(request.sampling)
        AdaptiveConfig(enabled=request.adaptive, k_max=min(MAX_K, max(2 * k, 8)))  # validates
        return TurnSpec(max_tokens=request.max_tokens, k=k, mode=mode, adaptive=request.adaptive,
                        stop=list(request.stop), sampling=sampling)


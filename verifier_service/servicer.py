"""The public Generation API: validate, open or continue a session, stream durable tokens.

A stream never produces tokens itself: it follows the job's durable mirror (tokens already in
the session log), from any offset. That is what makes resume exact: a client that reconnects
with (session, offset), here or on another verifier, gets the tokens after offset, none lost,
none repeated.
"""

from __future__ import annotations

import json
import logging

import grpc

from sparsespec.errors import ContextOverflow, InvalidArgument, SparseSpecError
from sparsespec.rpc.sparsespec.v1 import generation_pb2 as pb
from sparsespec.rpc.sparsespec.v1 import generation_pb2_grpc as pb_grpc
from sparsespec.spec.adaptive import MAX_K, AdaptiveConfig
from sparsespec.spec.loop import MODES, GenerationRequest
from verifier_service.durable import DurableSessions, SessionBusy, SessionGone, TurnSpec
from verifier_service.scheduler import Job, LeaseLost, Overloaded, Scheduler

log = logging.getLogger(__name__)

POLL_S = 0.5


def status_of(e: BaseException) -> grpc.StatusCode:
    from kvstore.sessions import LeaseHeld, RedisUnavailable, SessionNotFound, StaleEpoch
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
    if isinstance(e, (StaleEpoch, LeaseLost, LeaseHeld)):  # retryable: the lease moves on
        return grpc.StatusCode.ABORTED
    if isinstance(e, (RedisUnavailable, Draining)):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(e, SparseSpecError):
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INTERNAL


class Draining(SparseSpecError):
    """This verifier is shutting down and takes no new work."""


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, scheduler: Scheduler, sessions: DurableSessions, tokenizer, model_info: dict,
                 default_k: int = 4):
        self.scheduler = scheduler
        self.sessions = sessions
        self.tokenizer = tokenizer
        self.model_info = model_info
        self.default_k = default_k
        self.jobs: dict[str, Job] = {}   # session -> its latest turn on this verifier
        self.draining = False            # set on SIGTERM: new work goes elsewhere

    # --- RPCs -------------------------------------------------------------------------

    def Generate(self, request, context):
        try:
            job, offset = self._open(request)
        except Exception as e:  # noqa: BLE001 - every failure becomes a status with a message
            self._abort(context, e)
        yield from self._stream(job, offset, context)

    def Abort(self, request, context):
        return pb.AbortReply(aborted=self.scheduler.cancel(request.session_id))

    def GetModelInfo(self, request, context):
        return pb.ModelInfo(**self.model_info)

    # --- helpers ----------------------------------------------------------------------

    def _abort(self, context, e: BaseException):
        code = status_of(e)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("internal error")
            context.abort(code, f"internal error: {type(e).__name__}: {e}")
        context.abort(code, str(e))

    def _open(self, request) -> tuple[Job, int]:
        if self.draining:
            raise Draining("verifier is draining; retry on another verifier")
        if request.resume:
            return self._resume(request)
        spec = self._turn_spec(request)
        prompt = self._prompt_ids(request)
        if request.session_id:
            session = request.session_id
            running = self.jobs.get(session)
            if running is not None and not running.finished:
                raise SessionBusy(f"session_id: {session!r} has a turn running; resume it instead")
            context, epoch = self.sessions.new_turn(session, prompt, spec)
        else:
            session, context, epoch = self.sessions.new_session(prompt, spec)
        return self._submit(Job(session, epoch, spec.request(context), log_len=len(context))), 0

    def _resume(self, request) -> tuple[Job, int]:
        """Re-attach to a turn: here if it runs here, else take the session over from the log."""
        if not request.session_id:
            raise InvalidArgument("session_id", "resume needs a session_id")
        if request.resume_offset < 0:
            raise InvalidArgument("resume_offset", f"must be >= 0, got {request.resume_offset}")
        job = self.jobs.get(request.session_id)
        if job is not None and job.error is None:
            return job, request.resume_offset
        state = self.sessions.take_over(request.session_id)
        # The turn's prompt is state.context; the tokens it already generated are durable and
        # are this job's first tokens; the rest is generated from context + generated.
        job = Job(request.session_id, state.epoch, state.spec.request(state.context),
                  log_len=len(state.context), generated=list(state.generated))
        remaining = state.spec.max_tokens - len(state.generated)
        if state.finished or remaining <= 0:
            job.result = state.result()
            return job, request.resume_offset
        job.req = state.spec.request(state.context + state.generated, max_tokens=remaining)
        return self._submit(job), request.resume_offset

    def _submit(self, job: Job) -> Job:
        self.scheduler.submit(job)
        self.jobs[job.session] = job
        return job

    def _stream(self, job: Job, offset: int, context):
        sent_text = ""
        stream_text = not job.req.stop
        while True:
            job.wait_beyond(offset, POLL_S)
            if not context.is_active():
                return  # the client went away; the turn goes on and stays durable
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
            raise InvalidArgument("mode", f"must be one of {MODES}, got {mode!r}")
        from sparsespec.rpc.convert import sampling_from_proto
        sampling = sampling_from_proto(request.sampling)
        AdaptiveConfig(enabled=request.adaptive, k_max=min(MAX_K, max(2 * k, 8)))  # validates
        return TurnSpec(max_tokens=request.max_tokens, k=k, mode=mode, adaptive=request.adaptive,
                        stop=list(request.stop), sampling=sampling)


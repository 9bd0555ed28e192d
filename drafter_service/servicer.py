"""The Drafter gRPC service: wire messages in, DrafterHost calls, wire messages out.

Validation lives in the host (sparsespec.spec.drafter_host: it knows the vocabulary and the
limits, and does the same in process); here every exception becomes a status with a one-line
message that starts with the field it concerns. Nothing escapes as UNKNOWN with a stack trace:
what we did not raise on purpose is INTERNAL, logged here.
"""

from __future__ import annotations

import functools
import logging

import grpc

from kvstore.cache.feed import MAX_FEED_BYTES
from sparsespec.errors import InvalidArgument
from sparsespec.rpc.convert import dist_to_proto, feed_spec_to_proto, sampling_from_proto, status_for
from sparsespec.rpc.sparsespec.v1 import drafter_pb2, drafter_pb2_grpc
from sparsespec.spec.drafter_host import DrafterHost
from sparsespec.spec.transport import DraftCall

log = logging.getLogger("drafter_service")

SERVICE = "sparsespec.v1.Drafter"
MAX_DETAILS = 2000  # characters of an error message sent back


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_DETAILS else text[:MAX_DETAILS - 3] + "..."


def rpc(handler):
    """Run a handler; turn any exception into a status (never UNKNOWN, never a traceback)."""

    @functools.wraps(handler)
    def wrapper(self, request, context):
        try:
            return handler(self, request, context)
        except Exception as e:  # noqa: BLE001 - the whole point: one status per failure
            code, details = _status(e, handler.__name__)
        context.abort(code, details)

    return wrapper


def _status(e: BaseException, where: str = "DraftBatch") -> tuple[grpc.StatusCode, str]:
    """An exception as (status, one-line message); what we did not raise on purpose is logged."""
    code = status_for(e)
    if code == grpc.StatusCode.INTERNAL:
        log.error("%s failed", where, exc_info=e)
        return code, _one_line(f"internal error: {type(e).__name__}: {e}")
    return code, _one_line(str(e))


class DrafterServicer(drafter_pb2_grpc.DrafterServicer):
    def __init__(self, host: DrafterHost):
        self.host = host

    @rpc
    def OpenSession(self, request, context):
        info = self.host.open(request.session_id, list(request.tokens),
                              sampling_from_proto(request.sampling), request.epoch)
        return drafter_pb2.OpenSessionReply(device_bytes=info.device_bytes, host_bytes=info.host_bytes,
                                            prefill_s=info.prefill_s, feed=feed_spec_to_proto(info.feed),
                                            **_want_fields(info.want))

    @rpc
    def Draft(self, request, context):
        reply = self.host.draft(request.session_id, request.base_len, list(request.append), request.k,
                                sampling_from_proto(request.sampling), request.epoch,
                                summary=request.summary or None)
        return _draft_reply(reply)

    @rpc
    def DraftBatch(self, requests, context):
        drafts, feeds = _read_batch(requests)
        calls, epochs, outcomes = [], [], [None] * len(drafts)
        for i, r in enumerate(drafts):
            try:
                params = sampling_from_proto(r.sampling)
                feed = feeds.get(i)
                if r.feed_size != len(feed or b""):
                    raise InvalidArgument("feed_size", f"{r.feed_size} bytes announced, {len(feed or b'')} arrived")
            except Exception as e:  # noqa: BLE001 - this session's outcome
                outcomes[i] = _failed(e)
                continue
            calls.append((i, DraftCall(r.session_id, r.base_len, list(r.append), r.k, params, r.summary or None,
                                       feed or None)))
            epochs.append(r.epoch)
        results = self.host.draft_many([c for _, c in calls], epochs)
        for (i, _), result in zip(calls, results):
            outcomes[i] = (_failed(result) if isinstance(result, BaseException)
                           else drafter_pb2.DraftOutcome(reply=_draft_reply(result)))
        return drafter_pb2.DraftBatchReply(outcomes=outcomes)

    @rpc
    def CloseSession(self, request, context):
        self.host.close(request.session_id)
        return drafter_pb2.CloseSessionReply()


def _read_batch(requests) -> tuple[list, dict[int, bytes]]:
    """A DraftBatch stream -> (its drafts, their feeds by draft index). A chunk must follow its
    draft and no feed may outgrow what its draft announced (the stream is refused whole)."""
    drafts, pieces, sizes = [], {}, {}
    for message in requests:
        drafts.extend(message.drafts)
        for chunk in message.feed:
            if not 0 <= chunk.draft < len(drafts):
                raise InvalidArgument("feed.draft", f"{chunk.draft} names no draft sent before it")
            sizes[chunk.draft] = sizes.get(chunk.draft, 0) + len(chunk.data)
            if sizes[chunk.draft] > min(drafts[chunk.draft].feed_size, MAX_FEED_BYTES):
                raise InvalidArgument("feed.data", f"drafts[{chunk.draft}]'s feed outgrows its feed_size "
                                                   f"({drafts[chunk.draft].feed_size}) or the limit ({MAX_FEED_BYTES})")
            pieces.setdefault(chunk.draft, []).append(chunk.data)
    return drafts, {i: b"".join(p) for i, p in pieces.items()}


def _draft_reply(reply) -> drafter_pb2.DraftReply:
    return drafter_pb2.DraftReply(tokens=reply.tokens, q=[dist_to_proto(q) for q in reply.qs] if reply.qs else [],
                                  draft_s=reply.draft_s, device_bytes=reply.device_bytes,
                                  host_bytes=reply.host_bytes, feed=feed_spec_to_proto(reply.feed),
                                  **_want_fields(reply.want))


def _failed(e: BaseException) -> drafter_pb2.DraftOutcome:
    """One session's failure inside a DraftBatch, as its status code and one-line message."""
    code, details = _status(e)
    return drafter_pb2.DraftOutcome(code=code.value[0], error=details)


def _want_fields(want) -> dict:
    """A SummaryWant as the summary_* fields of OpenSessionReply / DraftReply."""
    if want is None:
        return {}
    return {"summary_slots": want.slots, "summary_sink": want.sink, "summary_window": want.window}

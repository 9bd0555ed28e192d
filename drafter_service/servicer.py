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

from sparsespec.rpc.convert import dist_to_proto, sampling_from_proto, status_for
from sparsespec.rpc.sparsespec.v1 import drafter_pb2, drafter_pb2_grpc
from sparsespec.spec.drafter_host import DrafterHost

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
            code = status_for(e)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("%s failed", handler.__name__)
                details = f"internal error: {type(e).__name__}: {e}"
            else:
                details = str(e)
        context.abort(code, _one_line(details))

    return wrapper


class DrafterServicer(drafter_pb2_grpc.DrafterServicer):
    def __init__(self, host: DrafterHost):
        self.host = host

    @rpc
    def OpenSession(self, request, context):
        info = self.host.open(request.session_id, list(request.tokens),
                              sampling_from_proto(request.sampling), request.epoch)
        return drafter_pb2.OpenSessionReply(device_bytes=info.device_bytes, host_bytes=info.host_bytes,
                                            prefill_s=info.prefill_s, **_want_fields(info.want))

    @rpc
    def Draft(self, request, context):
        reply = self.host.draft(request.session_id, request.base_len, list(request.append), request.k,
                                sampling_from_proto(request.sampling), request.epoch,
                                summary=request.summary or None)
        return drafter_pb2.DraftReply(tokens=reply.tokens,
                                      q=[dist_to_proto(q) for q in reply.qs] if reply.qs else [],
                                      draft_s=reply.draft_s, device_bytes=reply.device_bytes,
                                      host_bytes=reply.host_bytes, **_want_fields(reply.want))

    @rpc
    def CloseSession(self, request, context):
        self.host.close(request.session_id)
        return drafter_pb2.CloseSessionReply()


def _want_fields(want) -> dict:
    """A SummaryWant as the summary_* fields of OpenSessionReply / DraftReply."""
    if want is None:
        return {}
    return {"summary_slots": want.slots, "summary_sink": want.sink, "summary_window": want.window}

"""A DrafterClient over gRPC: the round loop talks to a remote drafter as to a local one.

Every call has a deadline. Every failure becomes one of the round loop's DRAFTER_FAILURES
(sparsespec.rpc.errors), so a slow, dead, full or forgetful drafter costs a plain decoding step,
never a token: FAILED_PRECONDITION -> StateMismatch, NOT_FOUND -> SessionUnknown,
RESOURCE_EXHAUSTED -> DrafterFull, anything else -> DrafterUnavailable.
"""

from __future__ import annotations

import time

import grpc

from kvstore.cache.summary import SummaryWant
from sparsespec import telemetry
from sparsespec.errors import InvalidArgument, SparseSpecError
from sparsespec.rpc.convert import dist_from_proto, drafter_error, feed_spec_from_proto, sampling_to_proto
from sparsespec.rpc.sparsespec.v1 import drafter_pb2, drafter_pb2_grpc
from sparsespec.spec.sampling import SamplingParams
from sparsespec.spec.transport import DraftCall, DraftReply, DrafterClient, OpenReply
from sparsespec.tls import ClientTLS, channel

DEFAULT_MAX_MESSAGE_BYTES = 16 << 20
FEED_CHUNK_BYTES = 1 << 20       # a feed travels in pieces this size, far under any message limit


class GrpcDrafterClient(DrafterClient):
    def __init__(self, address: str, timeout_s: float = 5.0, open_timeout_s: float | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, epoch: int = 0,
                 tls: ClientTLS | None = None):
        """timeout_s bounds a round's Draft; open_timeout_s (default 10x) a prefill (OpenSession,
        or a Draft with base_len 0, which re-opens). tls: a TLS channel (and a client certificate
        for a drafter that requires one); None: plaintext."""
        if not timeout_s > 0:
            raise InvalidArgument("timeout_s", f"must be > 0, got {timeout_s}")
        if max_message_bytes < 1:
            raise InvalidArgument("max_message_bytes", f"must be >= 1, got {max_message_bytes}")
        self.address = address
        self.timeout_s = timeout_s
        self.open_timeout_s = open_timeout_s if open_timeout_s is not None else 10 * timeout_s
        self.epoch = epoch
        self.channel = channel(address, tls, [("grpc.max_receive_message_length", max_message_bytes),
                                              ("grpc.max_send_message_length", max_message_bytes)])
        self.stub = drafter_pb2_grpc.DrafterStub(self.channel)

    def _call(self, method, request, timeout: float):
        t0 = time.monotonic()
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
            details = (e.details() if hasattr(e, "details") else None) or str(e)
            raise drafter_error(code, f"drafter {self.address}: {details}") from None
        except ValueError as e:   # the channel was shut down
            raise drafter_error(grpc.StatusCode.UNAVAILABLE, f"drafter {self.address}: {e}") from None
        finally:
            if method in (self.stub.Draft, self.stub.DraftBatch):
                telemetry.DRAFT_RPC.observe(time.monotonic() - t0)

    def open(self, session: str, tokens: list[int], params: SamplingParams) -> OpenReply:
        reply = self._call(self.stub.OpenSession,
                           drafter_pb2.OpenSessionRequest(session_id=session, tokens=tokens,
                                                          sampling=sampling_to_proto(params), epoch=self.epoch),
                           self.open_timeout_s)
        return OpenReply(_want(reply), feed_spec_from_proto(reply))

    def draft(self, session: str, base_len: int, append: list[int], k: int,
              params: SamplingParams, summary: bytes | None = None, feed: bytes | None = None) -> DraftReply:
        """A DraftBatch of one (the stream carries a feed of any size)."""
        result = self.draft_many([DraftCall(session, base_len, append, k, params, summary, feed)])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def draft_many(self, calls: list[DraftCall]) -> list[DraftReply | SparseSpecError]:
        """One DraftBatch for the round: the drafts, then their feeds in chunks of at most
        FEED_CHUNK_BYTES (under any message limit). A call that fails as a whole fails every
        session in it."""
        if not calls:
            return []
        drafts = drafter_pb2.DraftBatchRequest(drafts=[
            drafter_pb2.DraftRequest(session_id=c.session, base_len=c.base_len, append=c.append, k=c.k,
                                     sampling=sampling_to_proto(c.params), epoch=self.epoch,
                                     summary=c.summary or b"", feed_size=len(c.feed or b"")) for c in calls])

        def stream():
            yield drafts
            for i, c in enumerate(calls):
                data = c.feed or b""
                for at in range(0, len(data), FEED_CHUNK_BYTES):
                    yield drafter_pb2.DraftBatchRequest(feed=[drafter_pb2.FeedChunk(
                        draft=i, data=data[at:at + FEED_CHUNK_BYTES])])

        # A re-open (a prefill) or a whole selection's feed may take longer than a round.
        slow = any(c.base_len == 0 or len(c.feed or b"") > FEED_CHUNK_BYTES for c in calls)
        try:
            batch = self._call(self.stub.DraftBatch, stream(), self.open_timeout_s if slow else self.timeout_s)
        except SparseSpecError as e:
            return [e] * len(calls)
        if len(batch.outcomes) != len(calls):
            return [self._bad_reply(f"{len(batch.outcomes)} outcomes for {len(calls)} drafts")] * len(calls)
        results: list[DraftReply | SparseSpecError] = []
        for c, outcome in zip(calls, batch.outcomes):
            try:
                if outcome.code != grpc.StatusCode.OK.value[0]:
                    code = next((s for s in grpc.StatusCode if s.value[0] == outcome.code), grpc.StatusCode.UNKNOWN)
                    raise drafter_error(code, f"drafter {self.address}: {outcome.error}")
                results.append(self._reply(outcome.reply, c.k, c.params))
            except SparseSpecError as e:
                results.append(e)
        return results

    def _reply(self, reply: drafter_pb2.DraftReply, k: int, params: SamplingParams) -> DraftReply:
        """A DraftReply message, checked against what was asked (k drafts, k distributions)."""
        if len(reply.tokens) != k:
            raise self._bad_reply(f"{len(reply.tokens)} drafts for k = {k}")
        qs = None
        if not params.greedy:
            if len(reply.q) != k:
                raise self._bad_reply(f"{k} drafts came with {len(reply.q)} distributions")
            try:
                qs = [dist_from_proto(q, f"q[{i}]") for i, q in enumerate(reply.q)]
            except InvalidArgument as e:
                raise self._bad_reply(str(e)) from None
        return DraftReply(list(reply.tokens), qs, reply.draft_s, reply.device_bytes, reply.host_bytes,
                          _want(reply), feed_spec_from_proto(reply))

    def _bad_reply(self, problem: str):
        return drafter_error(grpc.StatusCode.INTERNAL, f"drafter {self.address}: malformed reply: {problem}")

    def close(self, session: str) -> None:
        self._call(self.stub.CloseSession, drafter_pb2.CloseSessionRequest(session_id=session), self.timeout_s)

    def shutdown(self) -> None:
        """Close the channel (sessions stay on the drafter until closed or evicted)."""
        self.channel.close()

    def __enter__(self) -> "GrpcDrafterClient":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _want(reply) -> SummaryWant | None:
    """OpenSessionReply / DraftReply -> what a summary may hold (None: the drafter reads none)."""
    if reply.summary_slots <= 0:
        return None
    return SummaryWant(reply.summary_slots, reply.summary_sink, reply.summary_window)

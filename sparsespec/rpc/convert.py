"""Our types <-> wire messages, and our exceptions -> gRPC status codes.

Both services and the drafter client convert through here, so a field means the same thing on
every hop: top_p 0 on the wire reads as 1.0, q_support 0 as the default, and a draft
distribution q travels exactly (int32 ids, float32 probs: the dtype it was sampled in).
"""

from __future__ import annotations

import grpc
import numpy as np
import torch

from kvstore.cache.feed import FeedWant
from sparsespec.errors import ContextOverflow, InvalidArgument, ModelLoadError, SparseSpecError
from sparsespec.rpc.errors import DrafterFull, DrafterRejected, DrafterUnavailable, SessionUnknown
from sparsespec.rpc.sparsespec.v1 import common_pb2, drafter_pb2
from sparsespec.spec.drafter import StateMismatch
from sparsespec.spec.sampling import SamplingParams, SparseDist

INT64 = (-(1 << 63), (1 << 63) - 1)
DEFAULT_Q_SUPPORT = SamplingParams().q_support


# --- feed specs -------------------------------------------------------------------------------

_FEED_FIELDS = ("kv_source", "layers", "kv_heads", "head_dim", "budget", "sink", "window", "chunk",
                "tail_cap")


def feed_spec_to_proto(want: FeedWant | None) -> drafter_pb2.FeedSpec | None:
    if want is None:
        return None
    return drafter_pb2.FeedSpec(**{f: getattr(want, f) for f in _FEED_FIELDS})


def feed_spec_from_proto(reply) -> FeedWant | None:
    """The FeedSpec of an OpenSessionReply / DraftReply (None: the drafter is not fed)."""
    if not reply.HasField("feed"):
        return None
    return FeedWant(**{f: getattr(reply.feed, f) for f in _FEED_FIELDS})


# --- sampling parameters --------------------------------------------------------------------

def _from_float32(x: float) -> float:
    """The shortest decimal that reads back as this float32: 0.7 travels as 0.699999988 and
    reads back as 0.7, so SamplingParams round-trip equal (and so do the two sides' p and q)."""
    return float(str(np.float32(x)))


def sampling_to_proto(params: SamplingParams) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(temperature=params.temperature, top_p=params.top_p,
                                    top_k=params.top_k, q_support=params.q_support)
    if params.seed is not None:
        if not INT64[0] <= params.seed <= INT64[1]:
            raise InvalidArgument("sampling.seed", f"must fit in int64, got {params.seed}")
        msg.seed = params.seed
    return msg


def sampling_from_proto(msg: common_pb2.SamplingParams) -> SamplingParams:
    """Raises InvalidArgument naming the field (`sampling.top_p: ...`)."""
    try:
        return SamplingParams(temperature=_from_float32(msg.temperature),
                              top_p=_from_float32(msg.top_p) if msg.top_p != 0 else 1.0,
                              top_k=msg.top_k,
                              seed=msg.seed if msg.HasField("seed") else None,
                              q_support=msg.q_support or DEFAULT_Q_SUPPORT)
    except InvalidArgument as e:
        raise InvalidArgument(f"sampling.{e.field}", str(e).split(": ", 1)[-1]) from None


# --- draft distributions --------------------------------------------------------------------

def dist_to_proto(q: SparseDist) -> drafter_pb2.SparseQ:
    return drafter_pb2.SparseQ(ids=q.ids.tolist(), probs=q.probs.float().tolist())


def dist_from_proto(msg: drafter_pb2.SparseQ, field: str = "q") -> SparseDist:
    if len(msg.ids) != len(msg.probs) or not msg.ids:
        raise InvalidArgument(field, f"needs as many ids as probs (>= 1), got {len(msg.ids)} and "
                                     f"{len(msg.probs)}")
    return SparseDist(ids=torch.tensor(list(msg.ids), dtype=torch.int64),          # [S]
                      probs=torch.tensor(list(msg.probs), dtype=torch.float32))    # [S]


# --- statuses -------------------------------------------------------------------------------

# Looked up along the exception's MRO, so the most specific class wins (SessionUnknown is a
# StateMismatch, ContextOverflow an InvalidArgument). Services may `register_status` their own.
_STATUS: dict[type, grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    ContextOverflow: grpc.StatusCode.OUT_OF_RANGE,
    StateMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    SessionUnknown: grpc.StatusCode.NOT_FOUND,
    DrafterFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DrafterUnavailable: grpc.StatusCode.UNAVAILABLE,
    ModelLoadError: grpc.StatusCode.FAILED_PRECONDITION,
    SparseSpecError: grpc.StatusCode.INVALID_ARGUMENT,
}


def register_status(cls: type, code: grpc.StatusCode) -> None:
    _STATUS[cls] = code


def status_for(exc: BaseException) -> grpc.StatusCode:
    """Our exception -> its status; anything we did not raise on purpose is INTERNAL."""
    for cls in type(exc).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return grpc.StatusCode.INTERNAL


def drafter_error(code: grpc.StatusCode, details: str) -> SparseSpecError:
    """A drafter RPC's failure -> the exception the round loop understands (all of them are
    DRAFTER_FAILURES: the session decodes alone, re-opens later)."""
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return StateMismatch(details)
    if code == grpc.StatusCode.NOT_FOUND:
        return SessionUnknown(details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return DrafterFull(details)
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
        return DrafterRejected(f"{code.name}: {details}")
    return DrafterUnavailable(f"{code.name}: {details}")

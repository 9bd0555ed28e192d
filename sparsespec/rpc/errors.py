"""What can go wrong between a verifier and a remote drafter, as exception classes.

Each class is one gRPC status (sparsespec.rpc.convert.status_for maps them), so the server
raises the same class the client re-raises. Every one of them is a DRAFTER_FAILURE for the
round loop (sparsespec.spec.transport): a failing drafter costs speed, never a token.
"""

from __future__ import annotations

from sparsespec.spec.drafter import StateMismatch
from sparsespec.spec.transport import DrafterUnavailable

__all__ = ["DrafterUnavailable", "DrafterFull", "DrafterRejected", "SessionUnknown", "StateMismatch"]


class DrafterFull(DrafterUnavailable):
    """The drafter cannot fit another session under its device- or host-memory budget
    (RESOURCE_EXHAUSTED). Another drafter may; this one will once a session closes."""


class SessionUnknown(StateMismatch):
    """The drafter holds no state for this session (never opened, closed, evicted after its
    TTL, or the drafter restarted): NOT_FOUND. The verifier re-opens it with base_len 0."""


class DrafterRejected(DrafterUnavailable):
    """The drafter refused a request as invalid for it (INVALID_ARGUMENT / OUT_OF_RANGE): a
    token outside its vocabulary, a context past its limit. The verifier decodes alone; the
    message names the field."""

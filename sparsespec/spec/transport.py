"""How the verifier reaches a drafter: an interface, and the in-process implementation.

The gRPC client implements the same interface, so the round loop is one piece of code whether
the drafter is a function call away or on another machine.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from kvstore.sparse import SparseConfig
from kvstore.summary import SummaryWant
from sparsespec.errors import SparseSpecError
from sparsespec.spec.drafter import Drafter, StateMismatch
from sparsespec.spec.sampling import SamplingParams, SparseDist


class DrafterUnavailable(SparseSpecError):
    """The drafter cannot serve this session now (dead, slow, full). The verifier decodes the
    session alone and re-opens it later with base_len 0: drafter state is disposable."""


# What a round survives: the session falls back to plain decoding, never to a wrong token.
DRAFTER_FAILURES = (DrafterUnavailable, StateMismatch)


@dataclass
class DraftReply:
    tokens: list[int]                 # [k]
    qs: list[SparseDist] | None       # sampling only
    draft_s: float                    # drafter-side seconds (sync + drafting)
    device_bytes: int = 0
    host_bytes: int = 0
    want: SummaryWant | None = None   # what a KV summary may hold for this drafter; None = send none


class DrafterClient(ABC):
    @abstractmethod
    def open(self, session: str, tokens: list[int], params: SamplingParams) -> SummaryWant | None:
        """Create (or rebuild) the session's drafter state from the committed tokens. Returns
        what a KV summary may hold for it (None: its policy reads none), so the very first draft
        can carry one."""

    @abstractmethod
    def draft(self, session: str, base_len: int, append: list[int], k: int,
              params: SamplingParams, summary: bytes | None = None) -> DraftReply:
        """Sync to base_len + append (the committed prefix), take the KV summary if one is
        given (kvstore.summary wire bytes), then propose k drafts.

        base_len 0 means `append` is the whole committed prefix: (re)build the session first.
        """

    @abstractmethod
    def close(self, session: str) -> None:
        """Free the session's drafter state."""


class LocalDrafterClient(DrafterClient):
    """Drafters in this process, one per session, sharing one model."""

    def __init__(self, model, sparse: SparseConfig, capacity: int):
        self.model, self.sparse, self.capacity = model, sparse, capacity
        self.sessions: dict[str, tuple[Drafter, torch.Generator | None]] = {}

    def open(self, session, tokens, params):
        drafter = self._start(tokens)
        gen = None if params.greedy else params.generator(salt=0x5EED)
        self.sessions[session] = (drafter, gen)
        return drafter.want()

    def draft(self, session, base_len, append, k, params, summary=None):
        if base_len == 0:
            self.open(session, append, params)
            base_len, append = len(append), []
        drafter, gen = self.sessions[session]
        t0 = time.perf_counter()
        drafter.sync(base_len, append)
        drafter.apply_summary(summary)
        result = drafter.draft(k, params, gen)
        return DraftReply(result.tokens, result.qs, time.perf_counter() - t0,
                          drafter.cache.device_bytes(), drafter.cache.host_bytes(), drafter.want())

    def _start(self, tokens: list[int]) -> Drafter:
        """A drafter holding the committed tokens (a prefill; subclasses may start otherwise)."""
        drafter = Drafter(self.model, self.sparse, self.capacity)
        drafter.start(tokens)
        return drafter

    def close(self, session):
        self.sessions.pop(session, None)

    def drafter(self, session) -> Drafter:
        return self.sessions[session][0]

"""How the verifier reaches a drafter: the interface.

In process it is `LocalDrafterClient` over a DrafterHost (sparsespec.spec.drafter_host); remotely
`GrpcDrafterClient` to a drafter service hosting the same DrafterHost. So the round loop is one
piece of code whether the drafter is a function call away or on another machine.

A round asks for every session's drafts at once (`draft_many`): a drafter that batches drafts
them in one forward per position, and a remote one gets one request per round. Its results are
per session, so one session's failure is that session's alone.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from kvstore.cache.feed import FeedWant
from kvstore.cache.summary import SummaryWant
from sparsespec.errors import SparseSpecError
from sparsespec.spec.drafter import StateMismatch
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
    draft_s: float                    # drafter-side seconds (sync + drafting; a base_len-0 re-open's too)
    device_bytes: int = 0
    host_bytes: int = 0
    want: SummaryWant | None = None   # what a KV summary may hold for this drafter; None = send none
    feed: FeedWant | None = None      # what feeding this drafter takes; None = it keeps its own KV


@dataclass(frozen=True)
class DraftCall:
    """One session's part of a round's draft request (the arguments of `DrafterClient.draft`)."""
    session: str
    base_len: int
    append: list[int]
    k: int
    params: SamplingParams
    summary: bytes | None = None
    feed: bytes | None = None         # a fed drafter's K/V (kvstore/cache/feed.py wire bytes)


@dataclass(frozen=True)
class OpenCall:
    """One session's part of an open of several (the arguments of `DrafterClient.open`)."""
    session: str
    tokens: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class OpenReply:
    """What a drafter says when a session opens: what a KV summary may hold for it, and what
    feeding it takes (both None: it reads no summaries and keeps its own KV)."""
    want: SummaryWant | None = None
    feed: FeedWant | None = None


class DrafterClient(ABC):
    @abstractmethod
    def open(self, session: str, tokens: list[int], params: SamplingParams) -> OpenReply:
        """Create (or rebuild) the session's drafter state from the committed tokens (a fed
        drafter only notes them: its first draft's feed brings their K/V). Returns what its
        summaries and feeds take, so the very first draft can carry them."""

    def open_many(self, calls: list[OpenCall]) -> list["OpenReply | SparseSpecError"]:
        """`open` for sessions that start together, one result per call in order: its OpenReply
        or the DRAFTER_FAILURE that call alone met. A drafter that batches prefills overrides
        this; the default opens one session after another."""
        results: list[OpenReply | SparseSpecError] = []
        for c in calls:
            try:
                results.append(self.open(c.session, c.tokens, c.params))
            except DRAFTER_FAILURES as e:
                results.append(e)
        return results

    @abstractmethod
    def draft(self, session: str, base_len: int, append: list[int], k: int,
              params: SamplingParams, summary: bytes | None = None, feed: bytes | None = None) -> DraftReply:
        """Sync to base_len + append (the committed prefix), taking the feed if one is given (a
        fed drafter always gets one), take the KV summary if one is given (kvstore.cache.summary
        wire bytes), then propose k drafts.

        base_len 0 means `append` is the whole committed prefix: (re)build the session first.
        """

    @abstractmethod
    def close(self, session: str) -> None:
        """Free the session's drafter state."""

    def draft_many(self, calls: list[DraftCall]) -> list["DraftReply | SparseSpecError"]:
        """`draft` for many sessions, one result per call in order: its DraftReply, or the
        DRAFTER_FAILURE that call alone met. A drafter that batches overrides this; the default
        drafts one session after another."""
        results: list[DraftReply | SparseSpecError] = []
        for c in calls:
            try:
                results.append(self.draft(c.session, c.base_len, c.append, c.k, c.params, c.summary, c.feed))
            except DRAFTER_FAILURES as e:
                results.append(e)
        return results

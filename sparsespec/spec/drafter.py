"""The drafter engine: a model over a SparseKVCache, one per session; rounds over many at once.

A Drafter follows the committed prefix the verifier sends (base_len + append), rolls back its
own rejected drafts, keeps the cache within budget (policy upkeep), and chain-drafts k tokens.
Its state is disposable: `start` rebuilds it from the committed tokens alone.

`draft_round` runs one round for many sessions that share a model: their committed tokens and
then each draft position go through ONE forward over all of them (kvstore.cache.stacked), so the
weights are read once per position, not once per session (the MagicDec batching; a fixed budget
keeps every session's view the same size); `start_many` prefills sessions that open together
the same way. Failures stay per session: what can be checked
before a forward (base_len, room, a summary) is checked per session, and a session that fails
is dropped from the round while the others go on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvstore.cache.feed import Feed, FeedWant
from kvstore.cache.sparse import SparseConfig, SparseKVCache
from kvstore.cache.stacked import StackedKVCache
from kvstore.cache.summary import Summary, SummaryWant
from sparsespec.errors import ContextOverflow, InvalidArgument, SparseSpecError
from sparsespec.spec.sampling import SamplingParams, SparseDist, draft_distribution, sample


class StateMismatch(SparseSpecError):
    """A Draft's base_len does not match the drafter's committed length: the verifier must re-sync."""


@dataclass
class DraftResult:
    tokens: list[int]                 # [k]
    qs: list[SparseDist] | None       # [k] draft distributions (sampling only)


@dataclass(eq=False)
class DraftJob:
    """One session's part of a draft round; `draft_round` sets `result` or `error`."""
    drafter: "Drafter"
    k: int
    params: SamplingParams
    gen: torch.Generator | None = None
    sync: tuple[int, list[int]] | None = None   # (base_len, append) to sync to first; None = as is
    summary: Summary | None = None              # taken after the sync, before drafting
    feed: Feed | None = None                    # a fed drafter's K/V for the sync (kvstore/cache/feed.py)
    result: DraftResult | None = None
    error: BaseException | None = None


class Drafter:
    def __init__(self, model, sparse: SparseConfig, capacity: int):
        self.model = model
        self.cache = SparseKVCache.for_model(model, capacity, sparse)
        self.committed_len = 0
        self._last_logits: torch.Tensor | None = None  # [V], after the last committed token
        self._drafts: list[int] = []                    # last round's drafts; d1..d_{k-1} are cached
        self._draft_logits: list[torch.Tensor] = []     # logits after each cached draft
        self.summaries = 0                              # summaries applied (a metric)
        self.last_token: int | None = None              # the newest committed token (fed: forwarded each round)

    def start(self, tokens: list[int]) -> None:
        """Prefill the committed tokens (prompt + pending token), then select the budget. A fed
        drafter computes nothing: its first feed brings the prefix's K/V. (`start_many` for one.)"""
        start_many([self], [tokens])

    def _reset(self, tokens: list[int]) -> bool:
        """Empty the session for a start from `tokens`; True if they are still to be forwarded
        (False: a fed drafter only notes them)."""
        self.cache.truncate(0)
        self.committed_len = 0
        self._drafts, self._draft_logits = [], []
        if self.cache.fed:
            self.committed_len, self.last_token, self._last_logits = len(tokens), tokens[-1], None
            return False
        return True

    @torch.inference_mode()
    def start_from(self, keys: list[torch.Tensor], values: list[torch.Tensor], tokens: list[int],
                   length: int | None = None) -> None:
        """`start(tokens)` for a drafter whose first n = `length` tokens' K/V are already known
        exactly (SparseKVCache.adopt_prefix: a local layer may give only its window; n defaults
        to keys[0].shape[1]): only tokens[n:] are computed."""
        n = keys[0].shape[1] if length is None else length
        if not 0 < n < len(tokens):
            raise ValueError(f"a prefix of {n} entries needs more than {n} tokens, got {len(tokens)}")
        self.cache.truncate(0)
        self._drafts, self._draft_logits = [], []
        self.cache.adopt_prefix(keys, values, n)
        self.committed_len = n
        self._append(tokens[n:], upkeep_first=False)   # still the prefill phase: exact attention

    def _forward(self, tokens: list[int]) -> torch.Tensor:
        ids = torch.tensor([tokens], device=self.model.device)
        return self.model(ids, self.cache, last_only=True)[0, -1]              # [V]

    def _append(self, tokens: list[int], upkeep_first: bool = True) -> None:
        """Append committed tokens, in pieces that fit the cache's tail, then run policy upkeep."""
        if upkeep_first:
            self.cache.upkeep()
        i = 0
        while i < len(tokens):
            room = self.cache.room()
            if room < 1:
                self.cache.upkeep(force=True)
                room = self.cache.room()
                if room < 1:
                    raise ContextOverflow("length", f"drafter KV capacity {self.cache.capacity} reached")
            piece = tokens[i:i + room]
            self._last_logits = self._forward(piece)
            i += len(piece)
        self.committed_len += len(tokens)
        self.cache.upkeep()

    def _rollback(self, base_len: int, append: list[int]) -> list[int]:
        """The cache part of `sync`: keep the cached drafts the verifier accepted, roll back the
        rest, and return the committed tokens still to forward. StateMismatch changes nothing."""
        if base_len != self.committed_len:
            raise StateMismatch(f"base_len {base_len} does not match the drafter's committed length "
                                f"{self.committed_len}")
        if not append:   # nothing new: drop last round's cached drafts (logits stay valid)
            self.cache.truncate(base_len)
            self._drafts, self._draft_logits = [], []
            return []
        reuse = 0
        cached = len(self._draft_logits)
        while reuse < min(cached, len(append) - 1) and append[reuse] == self._drafts[reuse]:
            reuse += 1
        self.cache.truncate(base_len + reuse)
        self.committed_len += reuse
        self._drafts, self._draft_logits = [], []
        return append[reuse:]

    def _take_feed(self, base_len: int, append: list[int], feed: Feed) -> list[int]:
        """The cache part of a fed sync: take the verifier's K/V of everything committed but the
        newest token, and return that token, the only one to forward."""
        if base_len != self.committed_len:
            raise StateMismatch(f"base_len {base_len} does not match the drafter's committed length "
                                f"{self.committed_len}")
        committed = base_len + len(append)
        if feed.length != committed - 1:
            raise InvalidArgument("feed.length", f"{feed.length}, expected {committed - 1}: every committed "
                                                 "token but the pending one")
        if feed.start != self.cache.fed_length:
            raise StateMismatch(f"feed.start {feed.start} does not match the drafter's fed length "
                                f"{self.cache.fed_length}: re-open")
        self.cache.apply_feed(feed)
        self.committed_len = feed.length
        if append:
            self.last_token = append[-1]
        self._drafts, self._draft_logits = [], []
        return [self.last_token]

    @torch.inference_mode()
    def sync(self, base_len: int, append: list[int]) -> None:
        """Bring the cache to the committed prefix base_len + append.

        Cached drafts that the verifier accepted are kept (not recomputed); the rest is rolled back.
        """
        pending = self._rollback(base_len, append)
        if pending:
            self._append(pending)

    def draft(self, k: int, params: SamplingParams, gen: torch.Generator | None = None) -> DraftResult:
        """Chain-draft k tokens from the committed prefix. Drafts 1..k-1 stay cached for reuse."""
        job = DraftJob(self, k, params, gen)
        draft_round([job])
        if job.error is not None:
            raise job.error
        return job.result

    def _make_room(self, k: int) -> None:
        if self.cache.room() < k:
            self.cache.upkeep(force=True)
            if self.cache.room() < k - 1:   # the last draft is never forwarded
                raise ContextOverflow("k", f"no room in the drafter KV for {k} drafts "
                                           f"(capacity {self.cache.capacity})")

    def take_summary(self, summary: Summary) -> None:
        """Take a decoded KV summary from the verifier (the host decodes it before any state
        changes, even when the policy ignores it, so a malformed one is refused everywhere),
        bound to this drafter's layers and KV heads."""
        c = self.cache
        self.cache.set_summary(summary.for_drafter(c.num_layers, c.num_kv_heads))
        self.summaries += 1

    def want(self) -> SummaryWant | None:
        """What a summary may hold for this drafter; None when its policy reads none."""
        c, policy = self.cache.config, self.cache.policy
        if not policy.uses_summary:
            return None
        return SummaryWant(slots=c.budget - c.sink - c.window, sink=c.sink, window=c.window)

    def feed_want(self) -> FeedWant | None:
        """What the verifier needs to feed this drafter; None when its policy is not "fed"."""
        c = self.cache
        if not c.fed:
            return None
        cfg = c.config
        return FeedWant(self.model.kv_source, c.num_layers, c.num_kv_heads, c.head_dim, cfg.budget,
                        cfg.sink, cfg.window, cfg.chunk, c.tail_cap)

    def device_bytes(self) -> int:
        return self.cache.device_bytes()


def _each(jobs: list[DraftJob], fn) -> list[DraftJob]:
    """Run fn(job) for every job; a job that raises gets its error and leaves the round."""
    ok = []
    for job in jobs:
        try:
            fn(job)
        except Exception as e:  # noqa: BLE001 - one session's failure is that session's alone
            job.error = e
        else:
            ok.append(job)
    return ok


def _forward(jobs: list[DraftJob], tokens: list[list[int]]) -> list[torch.Tensor] | None:
    """One forward of tokens[i] (all of one length) for jobs[i]: each one's logits after its
    last token, [V]. A forward that fails fails every job in it (None)."""
    try:
        logits = _stacked_forward([j.drafter for j in jobs], tokens)                # [S, V]
    except Exception as e:  # noqa: BLE001
        for j in jobs:
            j.error = e
        return None
    return list(logits)


def _stacked_forward(drafters: list[Drafter], tokens: list[list[int]]) -> torch.Tensor:
    """One forward of tokens[i] (all of one length) over drafters[i]'s cache: [S, V], each row's
    logits after its last token."""
    ids = torch.tensor(tokens, device=drafters[0].model.device)                               # [S, T]
    return drafters[0].model(ids, StackedKVCache([d.cache for d in drafters]), last_only=True)[:, -1]


@torch.inference_mode()
def start_many(drafters: list[Drafter], tokens: list[list[int]]) -> None:
    """`Drafter.start` for sessions that open together on one model: the prompts of one length
    that fit a cache's tail go through ONE forward over all of them (as a round's drafts do); a
    longer prompt is prefilled alone, in pieces. A forward that fails raises for all of them."""
    groups: dict[int, list[tuple[Drafter, list[int]]]] = {}     # prompt length -> (drafter, prompt)
    for d, t in zip(drafters, tokens):
        if not d._reset(t):
            continue
        d.cache.upkeep()
        if d.cache.room() >= len(t):
            groups.setdefault(len(t), []).append((d, t))
        else:
            d._append(t, upkeep_first=False)
    for n, pairs in groups.items():
        group = [d for d, _ in pairs]
        logits = _stacked_forward(group, [t for _, t in pairs])                              # [S, V]
        for d, row in zip(group, logits):
            d._last_logits = row
            d.committed_len = n
            d.cache.upkeep()


@torch.inference_mode()
def draft_round(jobs: list[DraftJob]) -> None:
    """One round for sessions whose drafters share one model: sync, take summaries, chain-draft.

    Forwards: one for the committed tokens of all sessions whose sync appends the same number
    (normally 1, the recovered or bonus token), then one per draft position for every session
    still drafting; a sync longer than its tail has room for (a long turn) is forwarded alone.
    """
    pending: dict[DraftJob, list[int]] = {}
    groups: dict[int, list[DraftJob]] = {}        # committed tokens to forward -> jobs

    def rollback(j: DraftJob) -> None:
        if j.feed is not None:
            tokens = j.drafter._take_feed(*(j.sync or (j.drafter.committed_len, [])), j.feed)
        elif j.drafter.cache.fed:
            raise InvalidArgument("feed", "is missing: policy 'fed' takes its K/V from the verifier")
        else:
            tokens = j.drafter._rollback(*j.sync) if j.sync is not None else []
        if not tokens:
            return
        j.drafter.cache.upkeep()
        if j.drafter.cache.room() >= len(tokens):
            pending[j] = tokens
            groups.setdefault(len(tokens), []).append(j)
        else:
            j.drafter._append(tokens, upkeep_first=False)

    live = _each(jobs, rollback)
    for n, group in groups.items():
        rows = _forward(group, [pending[j] for j in group])
        for j, row in zip(group, rows or []):
            j.drafter._last_logits = row
            j.drafter.committed_len += n
        _each([j for j in group if j.error is None], lambda j: j.drafter.cache.upkeep())
    live = [j for j in live if j.error is None]
    live = _each(live, lambda j: j.drafter.take_summary(j.summary) if j.summary is not None else None)
    live = _each(live, lambda j: j.drafter._make_room(j.k))

    logits = {j: j.drafter._last_logits for j in live}                     # [V] each
    drafts: dict[DraftJob, list[int]] = {j: [] for j in live}
    qs: dict[DraftJob, list[SparseDist]] = {j: [] for j in live}
    for i in range(max((j.k for j in live), default=0)):
        stepping = []
        for j in live:
            if i >= j.k:
                continue
            if j.params.greedy:
                token = int(logits[j].argmax())
            else:
                q = draft_distribution(logits[j], j.params)
                token = int(q.ids[sample(q.probs, j.gen)])
                qs[j].append(q)
            drafts[j].append(token)
            if i < j.k - 1:
                stepping.append(j)
        if stepping:
            rows = _forward(stepping, [[drafts[j][-1]] for j in stepping])
            for j, row in zip(stepping, rows or []):
                logits[j] = row
                j.drafter._draft_logits.append(row)
            live = [j for j in live if j.error is None]
    for j in live:
        j.drafter._drafts = drafts[j]
        j.result = DraftResult(drafts[j], None if j.params.greedy else qs[j])

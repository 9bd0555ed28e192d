"""The round loop: draft, verify in one forward, accept, commit. Many sessions, one verifier batch.

Plain autoregressive decoding (mode "ar") is the same loop with k = 0, so the AR baseline and
speculation share every line that could change an output.
"""

from __future__ import annotations

import logging
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from kvstore.cache.feed import FeedWant
from kvstore.cache.summary import Summary, SummaryConfig
from sparsespec.errors import ContextOverflow, InvalidArgument
from sparsespec.spec.acceptance import choose
from sparsespec.spec.adaptive import MAX_K, AdaptiveConfig, KController, Prior, regime
from sparsespec.spec.metrics import RequestMetrics
from sparsespec.spec.sampling import SamplingParams
from sparsespec.spec.stopping import StopChecker
from sparsespec.spec.summaries import ScheduleConfig, SummarySchedule
from sparsespec.spec.feed import KINDS, FeedConfig, Feeder, feedable
from sparsespec.spec.transport import DRAFTER_FAILURES, DraftCall, DrafterClient, OpenCall, OpenReply
from sparsespec.spec.verifier import Verifier

MODES = ("spec", "ar")
COHORTS = (1, 2)
NO_DRAFT: tuple[list[int], None, float] = ([], None, 0.0)   # a run that takes a plain step this round

log = logging.getLogger("sparsespec.engine")


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    max_tokens: int = 128
    sampling: SamplingParams = field(default_factory=SamplingParams)
    k: int = 4
    adaptive: AdaptiveConfig = field(default_factory=lambda: AdaptiveConfig(enabled=False))
    stop: tuple[str, ...] = ()
    mode: str = "spec"

    def __post_init__(self):
        object.__setattr__(self, "prompt_ids", tuple(int(t) for t in self.prompt_ids))
        object.__setattr__(self, "stop", tuple(self.stop))
        if not self.prompt_ids:
            raise InvalidArgument("prompt", "is empty")
        if self.max_tokens < 1:
            raise InvalidArgument("max_tokens", f"must be >= 1, got {self.max_tokens}")
        if not 1 <= self.k <= MAX_K:
            raise InvalidArgument("k", f"must be in [1, {MAX_K}], got {self.k}")
        if self.mode not in MODES:
            raise InvalidArgument("mode", f"must be one of {MODES}, got {self.mode!r}")

    def check_fits(self, vocab_size: int, max_context: int) -> None:
        bad = [t for t in self.prompt_ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidArgument("prompt", f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
        if len(self.prompt_ids) >= max_context:
            raise ContextOverflow("prompt", f"{len(self.prompt_ids)} tokens leave no room in the "
                                            f"context limit of {max_context} tokens")


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    metrics: RequestMetrics


@dataclass(frozen=True)
class Start:
    """One session's start (the arguments of `SpecEngine.start`): `start_many` takes several."""
    req: GenerationRequest
    row: int                            # the verifier cache row it decodes in
    session: str | None = None          # None: a new id
    cached: int = 0                     # prompt tokens the row already holds (multi-turn)
    drafter_cached: int = 0             # committed tokens its drafter already holds
    summary: bytes | None = None        # its latest stored KV summary (a take-over)


@dataclass
class _InFlight:
    """One cohort's drafts being made on the drafting thread (cohorts 2)."""
    cohort: int
    runs: set[int]                 # id() of the runs asked for
    asked: list[tuple]             # what _ask made, for _take
    replies: Future                # of _send(calls)


@dataclass
class Run:
    """One session's turn inside the loop. The engine owns it; callers read it."""
    session: str
    row: int                                # the session's row in the verifier's cache
    req: GenerationRequest
    tokens: list[int]                       # committed context: prompt + generated; [-1] is pending
    stopper: StopChecker
    ctrl: KController
    metrics: RequestMetrics
    gen: torch.Generator | None
    drafter_base: int = 0                   # committed tokens the drafter holds; 0 = must (re)open
    summary: SummarySchedule | None = None  # KV summaries for this session's drafter (spec, summaries on)
    feeder: Feeder | None = None            # feeds for this session's drafter (a fed drafter)
    can_draft: bool = True                  # False: its drafter wants feeds this verifier cannot give
    cohort: int = 0                         # with cohorts 2: which of the two groups its rounds are in
    regime: tuple[int, int] | None = None   # adaptive k's regime (batch width, context), from its first round
    done: bool = False
    started_at: float = 0.0                 # perf_counter() after the prefill
    finished_at: float = 0.0                # perf_counter() when the run stopped

    @property
    def generated(self) -> list[int]:
        return self.stopper.tokens


class SpecEngine:
    """Verifier model + full cache, and a drafter reached through a DrafterClient.

    `generate_many` runs a fixed batch to completion. A server drives the same steps itself:
    `start` a run in a free row, `step` every active run by one round (sessions may join and
    leave between rounds), `finish` each run when it is done.
    """

    def __init__(self, verifier_model, drafter: DrafterClient | None = None, tokenizer=None,
                 max_context: int | None = None, max_batch: int = 8, eos_ids=None,
                 summary: SummaryConfig | None = SummaryConfig(), schedule: ScheduleConfig = ScheduleConfig(),
                 feed: bool = True, cohorts: int = 1, feed_config: FeedConfig | None = None):
        """feed: feed drafters that can be fed (the verifier's exact K/V, sparsespec/spec/feed.py);
        a drafter that is not fed keeps its own KV either way; feed_config: when feeders re-select
        early. cohorts 2: overlapped rounds (`step`)."""
        if cohorts not in COHORTS:
            raise InvalidArgument("cohorts", f"must be one of {COHORTS}, got {cohorts!r}")
        self.model = verifier_model
        self.drafter = drafter
        self.tokenizer = tokenizer
        self.max_context = max_context or verifier_model.max_context
        if self.max_context > verifier_model.max_context:
            raise InvalidArgument("max_context", f"{self.max_context} exceeds the model's "
                                                 f"{verifier_model.max_context}")
        self.max_batch = max_batch
        self.eos_ids = tuple(eos_ids if eos_ids is not None else verifier_model.cfg.eos_token_ids)
        # Room past the context limit for the drafts of a last round and batch padding.
        self.verifier = Verifier(verifier_model, self.max_context + MAX_K + 1, max_batch, summary, feed)
        self.feed = feed
        self.feed_config = feed_config or FeedConfig()
        self._feeders: dict[str, Feeder] = {}   # session -> its fed drafter's mirror (across turns)
        self._feed_want: FeedWant | None = None  # the last fed drafter's want: a re-open after a failed open
        self.cohorts = cohorts
        self._next_cohort = 0                    # cohorts are assigned in turn as runs start
        self._turn = 0                           # the cohort the next overlapped step verifies
        self._inflight: _InFlight | None = None  # the other cohort's drafts, being made
        self._pool: ThreadPoolExecutor | None = None
        self.summary = summary if summary is not None and summary.enabled else None
        self.schedule = schedule            # when each session's drafter gets a summary
        self._priors: dict[tuple[int, int], Prior] = {}   # regime -> what its last adaptive session learned

    def generate(self, req: GenerationRequest) -> GenerationResult:
        return self.generate_many([req])[0]

    def generate_many(self, reqs: list[GenerationRequest]) -> list[GenerationResult]:
        if len(reqs) > self.max_batch:
            raise InvalidArgument("requests", f"{len(reqs)} sessions exceed max_batch {self.max_batch}")
        for r in reqs:
            self.check(r)
        runs = []
        try:
            started = self.start_many([Start(r, row) for row, r in enumerate(reqs)])
            runs = [r for r in started if isinstance(r, Run)]
            failed = next((r for r in started if not isinstance(r, Run)), None)
            if failed is not None:
                raise failed
            while any(not r.done for r in runs):
                self.step([r for r in runs if not r.done])
        finally:
            for r in runs:
                self.release(r)
        return [self.finish(r) for r in runs]

    def check(self, req: GenerationRequest) -> None:
        """Validate a request against this engine (vocabulary, context limit, drafter)."""
        req.check_fits(self.model.cfg.vocab_size, self.max_context)
        if req.mode == "spec" and self.drafter is None:
            raise InvalidArgument("mode", "spec needs a drafter")

    def start(self, req: GenerationRequest, row: int, session: str | None = None,
              cached: int = 0, drafter_cached: int = 0, summary: bytes | None = None) -> Run:
        """Prefill `row` and open the drafter. Multi-turn: the row already holds the first
        `cached` prompt tokens and the drafter the first `drafter_cached`; only the rest is
        computed (metrics.reused_prefix_tokens). `summary`: the session's latest KV summary
        (restored from Redis on a take-over), sent to the drafter until a fresh one is made."""
        run = self.start_many([Start(req, row, session, cached, drafter_cached, summary)])[0]
        if isinstance(run, BaseException):
            raise run
        return run

    def start_many(self, starts: list[Start]) -> list[Run | Exception]:
        """`start` for sessions that arrive together: their prompts of one length are prefilled
        in one forward (Verifier.prefill_many) and their drafters opened in one call (open_many),
        as a round batches its verifies and drafts. One result per start, in order: its Run or
        the error it met (a batched prefill that fails fails every start in it). Each run's
        metrics.prefill_s is the whole call's: what every one of them waited."""
        t0 = time.perf_counter()
        results: list[Run | Exception | None] = [None] * len(starts)
        sessions = [s.session or uuid.uuid4().hex for s in starts]
        reused = [0] * len(starts)
        prefill: list[int] = []                       # starts whose rows are prefilled from empty
        rows: set[int] = set()
        for i, s in enumerate(starts):
            try:
                if s.row in rows:
                    raise InvalidArgument("row", f"{s.row} is taken by another start of this call")
                rows.add(s.row)
                reused[i] = self._reuse(s)
                if reused[i] == 0:
                    prefill.append(i)
            except Exception as e:  # noqa: BLE001 - this start's error, reported as its result
                results[i] = e
        try:
            self.verifier.prefill_many([starts[i].row for i in prefill],
                                       [list(starts[i].req.prompt_ids[:-1]) for i in prefill])
        except Exception as e:  # noqa: BLE001
            for i in prefill:
                results[i] = e
        opening = [i for i, s in enumerate(starts)
                   if results[i] is None and s.req.mode == "spec" and s.drafter_cached <= 0]
        opened = dict(zip(opening, self._open_drafters([OpenCall(sessions[i], list(starts[i].req.prompt_ids),
                                                                 starts[i].req.sampling) for i in opening])))
        for i, s in enumerate(starts):
            if results[i] is None:
                try:
                    results[i] = self._begin(s, sessions[i], reused[i], opened.get(i), time.perf_counter() - t0)
                except Exception as e:  # noqa: BLE001
                    results[i] = e
        return results

    def _reuse(self, s: Start) -> int:
        """Set up s's row for its prompt: the prompt tokens its cached prefix saves (0: the row
        is to be prefilled from empty; the rest of a longer prompt is extended here)."""
        prompt, row = s.req.prompt_ids, s.row
        self.verifier.track(row, s.req.mode == "spec" and self.summary is not None)
        self.verifier.record(row, s.req.mode == "spec" and self.feed)
        cached = min(s.cached, len(prompt) - 1, self.verifier.length(row))
        if cached > 0 and not self.verifier.can_commit(row, cached):
            cached = 0       # a local layer's ring no longer holds what the rollback needs: prefill
        if cached > 0:
            self.verifier.commit(row, cached)
            if cached < len(prompt) - 1:
                self.verifier.extend(row, list(prompt[cached:-1]))
        return cached

    def _open_drafters(self, calls: list[OpenCall]) -> list[OpenReply | None]:
        """The drafters' replies to the opens, in order; None for one that failed (its session
        decodes alone for now; the next draft call re-opens it with base_len 0)."""
        if not calls:
            return []
        try:
            replies = self.drafter.open_many(calls)
        except DRAFTER_FAILURES:
            return [None] * len(calls)
        return [None if isinstance(r, BaseException) else r for r in replies]

    def _begin(self, s: Start, session: str, reused: int, opened: OpenReply | None, prefill_s: float) -> Run:
        """The run of a start whose row holds its prompt; `opened`: its drafter's open reply
        (None: not opened now, either failed or already holding `s.drafter_cached` tokens)."""
        req, row, prompt = s.req, s.row, list(s.req.prompt_ids)
        metrics = RequestMetrics(prompt_tokens=len(prompt), reused_prefix_tokens=reused, prefill_s=prefill_s)
        spec_summaries = req.mode == "spec" and self.summary is not None
        drafter_base, want, feeder, can_draft = 0, None, self._feeders.get(session), True
        if req.mode == "spec" and s.drafter_cached > 0:
            drafter_base = s.drafter_cached
        elif req.mode == "spec" and opened is not None:
            drafter_base, want = len(prompt), opened.want
            if want is None:
                self.verifier.track(row, False)   # its drafter reads no summaries
            if opened.feed is not None:
                feeder, can_draft = self._feeder_for(session, opened.feed)
            else:
                feeder = self._feeders.pop(session, None)
        if feeder is None:
            self.verifier.record(row, False)
        stopper = StopChecker(self.eos_ids, list(req.stop), req.max_tokens,
                              self.max_context - len(prompt), self.tokenizer)
        gen = None if req.sampling.greedy else req.sampling.generator()
        schedule = SummarySchedule(self.schedule, want=want, latest=_readable(s.summary)) if spec_summaries else None
        cohort, self._next_cohort = self._next_cohort, (self._next_cohort + 1) % self.cohorts
        return Run(session, row, req, prompt, stopper, KController(req.k, req.adaptive), metrics,
                   gen, drafter_base=drafter_base, summary=schedule, feeder=feeder, can_draft=can_draft,
                   cohort=cohort, started_at=time.perf_counter())

    def _feeder_for(self, session: str, want: FeedWant) -> tuple[Feeder | None, bool]:
        """(the session's feeder, whether it may draft): a drafter this verifier cannot feed
        is not drafted with (it would refuse every draft without a feed)."""
        why = feedable(want, self.model) if self.feed else "feeding is off on this verifier"
        if why is not None:
            log.warning("session %s: its drafter wants feeds, but %s: decoding alone", session, why)
            self.close_drafter(session)
            return None, False
        self._feed_want = want
        feeder = self._feeders[session] = Feeder(want, self.feed_config)
        return feeder, True

    def release(self, run: Run) -> None:
        """Free the run's drafter state (the verifier row is the caller's to reuse)."""
        if run.req.mode == "spec":
            self.close_drafter(run.session)

    def close_drafter(self, session: str) -> None:
        """Free a session's drafter state, e.g. a parked session's whose row is taken back.
        Drafter state is disposable: a drafter that cannot be reached lets it expire."""
        self._feeders.pop(session, None)
        if self.drafter is not None:
            try:
                self.drafter.close(session)
            except DRAFTER_FAILURES:
                pass

    def cancel(self, run: Run) -> None:
        """End the run before its next round (stop reason "aborted"); its committed tokens stay."""
        if not run.done:
            run.done, run.stopper.reason = True, "aborted"
            run.finished_at = time.perf_counter()

    def summary_to_keep(self, run: Run) -> bytes | None:
        """The run's latest KV summary if it changed since the last call: what the caller
        persists after a step (so a replacement drafter starts from it)."""
        s = run.summary
        if s is None or not s.dirty:
            return None
        s.dirty = False
        return s.latest

    def finish(self, run: Run) -> GenerationResult:
        """Fill in the run's totals. The row keeps the committed context (all but the pending
        token) so a next turn can reuse it."""
        prior = run.ctrl.learned() if run.regime is not None else None
        if prior is not None:
            self._priors[run.regime] = prior
        m = run.metrics
        m.decode_s = (run.finished_at or time.perf_counter()) - run.started_at
        m.generated = len(run.generated)
        m.stop_reason = run.stopper.reason
        m.verifier_kv_bytes = self.verifier.cache.row_bytes(len(run.tokens))
        if run.summary is not None:
            m.summaries_sent, m.summary_bytes = run.summary.sent, run.summary.bytes_sent
        if run.feeder is not None:
            t = run.feeder.take_counts()
            m.feeds_sent, m.feed_bytes = sum(t[k] for k in KINDS), sum(t[f"{k}_bytes"] for k in KINDS)
            m.feed_open_bytes, m.feed_refreshes, m.feed_refresh_bytes = t["open_bytes"], t["refresh"], t["refresh_bytes"]
            m.feed_blocks, m.feed_block_bytes, m.feed_s = t["block"], t["block_bytes"], t["seconds"]
        self.verifier.commit(run.row, min(self.verifier.length(run.row), len(run.tokens) - 1))
        return GenerationResult(list(run.generated), run.stopper.final_text(), m)

    def _plan_k(self, r: Run, width: int = 0) -> int:
        """r's k this round (0: a plain step). width > 0: the batch's k, which an adaptive run
        drafts (KController.batch_k): the round's verify and draft forwards are as wide as its
        widest row whatever each row asks."""
        if r.req.mode != "spec" or not r.can_draft:
            return 0
        remaining = min(r.req.max_tokens - len(r.generated), self.max_context - len(r.tokens))
        k = r.ctrl.batch_k(width) if width else r.ctrl.next_k()
        return max(0, min(k, remaining - 1))

    def _draft(self, active: list[Run]) -> list[tuple[list[int], list | None, float]]:
        """This round's drafts for every run, in one request to the drafter (which drafts them
        together); a run whose drafting fails costs one plain step. Per run: (drafts, qs, s)."""
        asked, calls = self._ask(active)
        taken = self._take(asked, self._send(calls))
        return [taken.get(id(r), NO_DRAFT) for r in active]

    def _ask(self, active: list[Run]) -> tuple[list[tuple], list[DraftCall]]:
        """The round's draft calls (k, summaries, feeds), made on the loop's thread."""
        asked, calls = [], []
        ks = [self._plan_k(r) for r in active]
        wanted = sorted(k for k in ks if k)
        if wanted and any(r.ctrl.cfg.enabled for r in active):   # adaptive runs draft the batch's
            width = wanted[(len(wanted) - 1) // 2]                # k: the median of what runs ask
            ks = [self._plan_k(r, width) if r.ctrl.cfg.enabled else k for r, k in zip(active, ks)]
        for r, k in zip(active, ks):
            if k == 0:
                continue
            summary, fresh = self._summary_for(r)
            feed = self._feed_for(r, k)
            asked.append((r, summary, fresh, feed))
            calls.append(DraftCall(r.session, r.drafter_base, r.tokens[r.drafter_base:], k, r.req.sampling,
                                   summary, feed))
        return asked, calls

    def _send(self, calls: list[DraftCall]) -> dict[int, tuple[object, float]]:
        """The drafter's replies, call index -> (reply or failure, seconds). Touches only the
        drafter client, so it may run on another thread while the verifier verifies (cohorts).
        Re-opens (base_len 0: a prefill each) go in their own request, so the time the others'
        round took (what adaptive k weighs) does not include somebody else's prefill."""
        timed: dict[int, tuple[object, float]] = {}
        for reopen in (False, True):
            group = [j for j, c in enumerate(calls) if (c.base_len == 0) == reopen]
            if group:
                t0 = time.perf_counter()
                replies = self.drafter.draft_many([calls[j] for j in group])
                elapsed = time.perf_counter() - t0
                timed.update((j, (reply, elapsed)) for j, reply in zip(group, replies))
        return timed

    def _take(self, asked: list[tuple], timed: dict[int, tuple[object, float]]) -> dict[int, tuple]:
        """The replies into the runs' state, on the loop's thread: id(run) -> (drafts, qs, s)."""
        planned = {}
        for j, (r, summary, fresh, feed) in enumerate(asked):
            reply, elapsed = timed[j]
            m = r.metrics
            if isinstance(reply, BaseException):
                r.drafter_base = 0      # re-send the whole committed prefix when it comes back
                if r.feeder is not None:
                    r.feeder.reset()    # ... and feed the re-open a whole selection
                m.drafter_failures += 1
                planned[id(r)] = ([], None, elapsed)
                continue
            if feed is not None:
                r.feeder.delivered(feed)
            if r.summary is not None:
                if summary:
                    r.summary.delivered(summary, len(r.tokens), fresh)
                r.summary.want = reply.want
                if reply.want is None:           # this drafter reads no summaries: stop scoring its row
                    self.verifier.track(r.row, False)
            if r.drafter_base > 0:   # a re-open (base_len 0) is a prefill, not per-round overhead
                m.draft_overhead_s.append(max(0.0, elapsed - reply.draft_s))
            else:                    # ... nor a draft cost adaptive k should weigh
                r.ctrl.skip_draft_time()
            r.drafter_base = len(r.tokens)
            m.drafter_kv_device_bytes = max(m.drafter_kv_device_bytes, reply.device_bytes)
            m.drafter_kv_host_bytes = max(m.drafter_kv_host_bytes, reply.host_bytes)
            planned[id(r)] = (reply.tokens, reply.qs, elapsed)
        return planned

    def _feed_for(self, r: Run, k: int) -> bytes | None:
        """This round's feed for r's drafter (None: it is not fed). A re-open after an open that
        failed is fed if this verifier's drafters are."""
        if r.feeder is None and r.drafter_base == 0 and self._feed_want is not None:
            r.feeder, r.can_draft = self._feeder_for(r.session, self._feed_want)
            if r.feeder is not None:
                self.verifier.record(r.row, True)   # its queries from now on; the first selection uses the proxy
        if r.feeder is None:
            return None
        if r.drafter_base == 0:
            r.feeder.reset()
        return r.feeder.next(self.verifier, r.row, k)

    def _summary_for(self, r: Run) -> tuple[bytes | None, bool]:
        """This round's KV summary for r's drafter, if one is due: (wire bytes, made now?)."""
        s = r.summary
        reopen = r.drafter_base == 0
        if s is None or not s.due(len(r.tokens), reopen):
            return None, False
        made = self.verifier.summary(r.row, s.want) if s.want is not None else None
        if made is not None:
            return made.encode(), True
        return (s.latest, False) if reopen else (None, False)

    def step(self, active: list[Run]) -> dict[str, list[int]]:
        """One round for every active run: draft, one batched verify, accept, commit.

        Returns the tokens each session committed this round (session -> tokens, in order).
        With cohorts 2 it is one round of one cohort instead (`_overlapped_step`).
        """
        self._seed(active)
        if self.cohorts == 2 and self.drafter is not None:
            return self._overlapped_step(active)
        started = time.perf_counter()
        return self._round(active, self._draft(active), started)

    def _seed(self, active: list[Run]) -> None:
        """Give each adaptive run new to the loop its regime (the width of the batch it drafts in:
        its cohort's runs; its context) and the prior the last session there left (adaptive.py)."""
        for r in active:
            if r.regime is None and r.ctrl.cfg.enabled and r.req.mode == "spec":
                r.regime = regime(sum(o.cohort == r.cohort for o in active), len(r.tokens))
                if (prior := self._priors.get(r.regime)) is not None:
                    r.ctrl.seed(prior)
                    r.metrics.adaptive_seeded = 1

    def _overlapped_step(self, active: list[Run]) -> dict[str, list[int]]:
        """One round of one cohort, while the drafter drafts the other (on a thread waiting on it).

        A cohort is verified with the drafts made while the other one was verified, then its
        next drafts are asked for while the other one is verified: so a session's round is still
        draft -> verify -> commit, only different sessions' rounds overlap, and the drafter and
        the verifier (separate processes, on a fleet separate devices) both stay busy. Runs that
        joined since their cohort's drafts were asked for are drafted now; drafts for runs that
        left are dropped (the drafter state they advanced is the run's, released with it).
        """
        inflight, self._inflight = self._inflight, None
        c = inflight.cohort if inflight is not None else (
            self._turn if any(r.cohort == self._turn for r in active) else 1 - self._turn)
        now = [r for r in active if r.cohort == c]
        other = [r for r in active if r.cohort != c]
        ready = self._take(inflight.asked, inflight.replies.result()) if inflight is not None else {}
        late = [r for r in now if inflight is None or id(r) not in inflight.runs]
        ready.update(zip(map(id, late), self._draft(late)))
        if other:
            asked, calls = self._ask(other)
            self._inflight = _InFlight(1 - c, {id(r) for r in other}, asked, self._threads().submit(self._send, calls))
        self._turn = 1 - c
        if not now:
            return {}
        return self._round(now, [ready.get(id(r), NO_DRAFT) for r in now])

    def _threads(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cohort-draft")
        return self._pool

    def _round(self, active: list[Run], planned: list[tuple], started: float | None = None) -> dict[str, list[int]]:
        """Verify every run's drafts in one forward, accept, commit.

        started: when the round's drafting began. Adaptive k then prices a round by its wall time
        (a plain step by its whole step), so what surrounds the drafter call (the feed, the
        acceptance, the commit) is in the price: the drafter's time alone left out 17-27 ms of a
        ~300 ms round (S = 1, 4K, k = 4) and kept losing sessions on. Without it (cohorts: the drafting overlapped
        another cohort's verify) a round is priced by the drafter's time and the verify."""
        t0 = time.perf_counter()
        logits = self.verifier.verify([r.row for r in active],
                                      [[r.tokens[-1]] + d for r, (d, _, _) in zip(active, planned)])
        verify_s = time.perf_counter() - t0

        committed: dict[str, list[int]] = {}
        observed = []
        for r, (d, q, ds), lg in zip(active, planned, logits):
            outcome = choose(lg, d, q, r.req.sampling, r.gen)
            self.verifier.commit(r.row, len(r.tokens) + outcome.accepted)
            m = r.metrics
            m.draft_s += ds
            m.verify_s += verify_s
            if d:
                m.record_round(len(d), outcome.accepted)
            else:
                m.ar_steps += 1
            observed.append((r, len(d), outcome.accepted, ds))
            if r.summary is not None:
                r.summary.observe(len(d), outcome.accepted)
            if r.feeder is not None and d:
                r.feeder.observe(len(d), outcome.accepted)
            new = committed[r.session] = []
            for token in outcome.committed_tokens(d):
                r.tokens.append(token)
                new.append(token)
                if r.stopper.feed(token):
                    r.done = True
                    r.finished_at = time.perf_counter()
                    break
        wall = None if started is None else time.perf_counter() - started
        for r, k, accepted, ds in observed:
            if k:
                r.ctrl.observe_round(k, accepted, ds if wall is None else wall - verify_s, verify_s)
            else:   # an AR step (over-counted if other rows drafted: they ride in the same
                    # forward; it errs towards speculating)
                r.ctrl.observe_plain(verify_s if wall is None else wall)
        return committed


def _readable(summary: bytes | None) -> bytes | None:
    """A stored summary, or None when this build cannot read it (one stored by a verifier of an
    older format before a take-over): a drafter would refuse it on every re-open."""
    if summary is None:
        return None
    try:
        Summary.decode(summary)
    except InvalidArgument as e:
        log.warning("stored KV summary dropped: %s", e)
        return None
    return summary

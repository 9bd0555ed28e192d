"""KV summaries (kvstore/cache/summary.py, verifier_guided, the send schedule): the wire format, the
importance the verifier measures, the policy that reads it, and that none of it changes a token
or breaks the drafter's memory bound."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import random_model
from equality import assert_greedy_equal
from kvstore.cache.full import FullKVCache
from kvstore.cache.policies import SelectionContext, get_policy
from kvstore.cache.sparse import SparseConfig
from kvstore.cache.summary import ImportanceTracker, Summary, SummaryConfig, SummaryWant
from sparsespec.errors import InvalidArgument
from sparsespec.spec.drafter import Drafter
from sparsespec.spec.drafter_host import DrafterHost, DrafterHostConfig, LocalDrafterClient
from sparsespec.spec.loop import GenerationRequest, SpecEngine
from sparsespec.spec.summaries import ScheduleConfig, SummarySchedule
from sparsespec.spec.transport import DrafterUnavailable

# --- wire format ------------------------------------------------------------------------------


def test_summary_round_trips_compactly():
    s = Summary(length=70_000, chunk=8, chunks=(0, 3, 4, 900, 8000), scores=(1.0, 0.5, 0.25, 0.125, 0.0625))
    data = s.encode()
    assert Summary.decode(data) == s
    # version + 3 header varints (length needs 3 bytes) + 5 deltas (8000 - 900 needs 2) + 5 fp16
    assert len(data) == 1 + (3 + 1 + 1) + (1 + 1 + 1 + 2 + 2) + 2 * 5


@pytest.mark.parametrize("data,problem", [
    (b"", "empty"),
    (b"\x07\x10\x08\x00", "version"),
    (b"\x01\x10\x08", "truncated"),
    (b"\x01\x10\x08\x02\x00\x00" + b"\x00\x3c" * 2, "increasing"),          # delta 0 after the first
    (b"\x01\x10\x08\x01\x00\x00\x3c\x00", "bytes of scores"),                # trailing byte
    (b"\x01\x10\x08\x01\x05" + b"\x00\x3c", "past the summarised length"),  # chunk 5 * 8 >= 16
    (b"\x01\x10\x08\x01\x00" + b"\x00\x7e", "scores"),                       # NaN
    (b"\x01\x10\x08\x01\x00" + b"\x00\x00", "scores"),                       # 0
    (b"\x01" + b"\xff" * 10 + b"\x01", "varint"),
])
def test_malformed_summaries_are_refused_naming_the_field(data, problem):
    with pytest.raises(InvalidArgument, match=problem) as e:
        Summary.decode(data)
    assert e.value.field == "summary"


def test_summary_config_is_validated():
    for config, bad in ((SummaryConfig, dict(decay=1.0)), (ScheduleConfig, dict(every_rounds=0)),
                        (SummaryConfig, dict(layers=())), (SummaryConfig, dict(layers=(-1,))),
                        (ScheduleConfig, dict(alpha_threshold=1.5)), (SummaryConfig, dict(pool="sum")),
                        (SummaryConfig, dict(chunk=True)), (ScheduleConfig, dict(growth=True))):
        with pytest.raises(InvalidArgument) as e:
            config(**bad)
        assert e.value.field.startswith("summary.")
    assert SummaryConfig().layers_for(30) == (8, 15, 22)
    assert SummaryConfig(layers=(5, 1, 5)).layers_for(6) == (1, 5)
    with pytest.raises(InvalidArgument, match="layer 9 does not exist"):
        SummaryConfig(layers=(9,)).layers_for(4)
    with pytest.raises(InvalidArgument) as e:
        SparseConfig(policy="verifier_guided", budget=64, fallback="full")
    assert e.value.field == "fallback"
    with pytest.raises(InvalidArgument) as e:
        SparseConfig(policy="verifier_guided", budget=64, guided_share=0)
    assert e.value.field == "guided_share"


# --- the verifier's importance ----------------------------------------------------------------

def _planted_forward(tracker, hot: int, n: int = 200, rows=(0,), seed=0):
    """One observed forward where every query of every head points at key `hot`."""
    g = torch.Generator().manual_seed(seed)
    hkv, h, d, t = 2, 4, 16, 3
    keys = torch.randn(len(rows), hkv, n + t, d, generator=g) * 0.1
    keys[:, :, hot] = 4.0
    q = torch.ones(len(rows), h, t, d)
    tracker.begin(list(rows), [True] * len(rows), [n] * len(rows))
    tracker.observe(1, q, keys, None, torch.tensor([n] * len(rows)))
    tracker.end()


def test_tracker_finds_the_position_the_verifier_attends_to():
    tracker = ImportanceTracker(SummaryConfig(layers=(1,)), num_layers=2, batch=2, capacity=512)
    _planted_forward(tracker, hot=77)
    assert int(tracker.scores[0].argmax()) == 77 and float(tracker.scores[1].abs().sum()) == 0
    s = tracker.summary(0, 203, SummaryWant(slots=16, sink=4, window=16))
    assert s.chunks[s.scores.index(1.0)] == 77 // 8 and len(s.chunks) == 2
    assert 77 in s.ranked_positions(4, 203 - 16)[:8]
    # The EMA follows the verifier: a new hot spot overtakes the old one after a few forwards.
    for _ in range(4):
        _planted_forward(tracker, hot=150)
    assert int(tracker.scores[0].argmax()) == 150
    # Positions past a row's length (rolled-back drafts) lose their history on the next forward.
    tracker.begin([0], [True], [100])
    tracker.end()
    assert float(tracker.scores[0, 100:].abs().sum()) == 0
    # Untracked rows and layers cost nothing.
    before = tracker.seconds
    tracker.begin([0], [False], [100])
    tracker.observe(1, torch.ones(1, 4, 1, 16), torch.ones(1, 2, 101, 16), None, torch.tensor([100]))
    tracker.observe(0, torch.ones(1, 4, 1, 16), torch.ones(1, 2, 101, 16), None, torch.tensor([100]))
    tracker.end()
    assert tracker.seconds == before


def test_tracker_scores_match_the_attention_the_model_computes():
    """Against an independent computation: softmax(q K^T / sqrt(D)) of the model's own q/k."""
    model = random_model(seed=3, layers=2)
    prompt = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(4))
    cache = FullKVCache.for_model(model, 64)
    tracker = ImportanceTracker(SummaryConfig(layers=(1,), decay=0.0, query_window=40, pool="mean"), 2, 1, 64)
    seen = {}
    cache.observers.append(tracker.observe)
    cache.observers.append(lambda layer, q, k, mask, lengths: seen.setdefault(layer, (q.clone(), k.clone())))
    tracker.begin([0], [True], [0])
    with torch.inference_mode():
        model(prompt, cache)
    tracker.end()
    q, k = seen[1]                                                  # [1, 4, 40, 16], [1, 2, 40, 16]
    k = k.repeat_interleave(2, dim=1)
    att = (q @ k.transpose(-1, -2) / math.sqrt(16)).masked_fill(
        torch.triu(torch.ones(40, 40, dtype=torch.bool), 1), float("-inf")).softmax(-1)
    expected = att.mean(dim=(1, 2))[0]                              # [40]
    torch.testing.assert_close(tracker.scores[0, :40], expected, atol=1e-5, rtol=1e-4)


# --- the policy -------------------------------------------------------------------------------

def _ctx(summary, n=200, lo=4, hi=184, m=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, n, 16, generator=g)
    q = torch.randn(4, 5, 16, generator=g)
    return SelectionContext(layer=0, length=n, keys=keys, queries=q, query_positions=torch.arange(n - 5, n),
                            group_size=2, chunk=8, lo=lo, hi=hi, m=m, summary=summary)


def test_verifier_guided_keeps_the_summary_and_fills_with_its_own_policy():
    cfg = SparseConfig(policy="verifier_guided", budget=64, guided_share=0.5)
    guided, own = get_policy("verifier_guided")(cfg), get_policy("chunk_topk")(cfg)
    assert guided.choose(_ctx(None)).tolist() == own.choose(_ctx(None)).tolist()   # before any summary
    summary = Summary(length=200, chunk=8, chunks=(2, 10, 22, 23), scores=(0.5, 1.0, 0.25, 0.9))
    chosen = guided.choose(_ctx(summary))
    assert chosen.shape == (2, 40)
    wanted = list(range(80, 88)) + list(range(16, 24)) + list(range(176, 180))   # chunk 23 is past hi
    for head, mine in zip(chosen.tolist(), own.choose(_ctx(summary)).tolist()):
        assert head[:20] == wanted[:20]                      # the summary first, best chunk first
        assert len(set(head)) == 40 and all(4 <= p < 184 for p in head)
        rest = [p for p in mine if p not in head[:20]][:20]
        assert head[20:] == rest                              # then the policy's own choice
    # share 1.0: the summary may fill everything; what it cannot fill goes to its own policy.
    full_share = get_policy("verifier_guided")(SparseConfig(policy="verifier_guided", budget=64, guided_share=1.0))
    head = full_share.choose(_ctx(summary)).tolist()[0]
    assert head[:16] == list(range(80, 88)) + list(range(16, 24))


# --- the schedule -----------------------------------------------------------------------------

def test_schedule_sends_first_then_every_r_rounds_on_low_alpha_and_on_growth():
    want = SummaryWant(32, 4, 16)
    s = SummarySchedule(ScheduleConfig(every_rounds=5, alpha_threshold=0.5, alpha_window=2, growth=100,
                                      min_gap_rounds=2), want=want)
    assert s.due(1000, reopen=False)
    s.delivered(b"x", 1000, fresh=True)
    assert s.latest == b"x" and s.dirty
    for _ in range(4):
        s.observe(4, 4)                        # alpha 1: only the R rule fires
        assert not s.due(1004, False)
    s.observe(4, 4)
    assert s.due(1020, False)
    s.delivered(b"y", 1020, fresh=True)
    s.observe(4, 0)
    assert not s.due(1021, False)             # low alpha, but within the minimum gap
    s.observe(4, 1)
    assert s.due(1022, False)                 # windowed alpha 1/8 < 0.5
    s.delivered(b"z", 1022, fresh=True)
    s.observe(4, 4)
    s.observe(4, 4)
    assert s.due(1122, False) and not s.due(1100, False)   # growth G = 100
    assert s.due(0, reopen=True)
    assert not SummarySchedule(ScheduleConfig()).due(10, False)   # the drafter reads none


# --- end to end, in process --------------------------------------------------------------------

@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 128, (400,), generator=torch.Generator().manual_seed(5)).tolist()


EVERY_ROUND = ScheduleConfig(every_rounds=1, min_gap_rounds=1, growth=1)


class BoundCheckingClient(LocalDrafterClient):
    """Checks the memory bound (invariant 3) after every draft and every summary."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.max_entries = 0
        self.after_summary = []
        self.summaries_seen = []

    def draft_many(self, calls):
        self.summaries_seen += [c.summary for c in calls]
        replies = super().draft_many(calls)
        for c in calls:
            self.max_entries = max(self.max_entries, self.host.drafter(c.session).cache.device_entries())
        return replies


@pytest.mark.parametrize("budget,k", [(16, 4), (48, 8), (32, 1)])
def test_guided_equals_ar_and_keeps_the_bound(tiny_model, prompt, budget, k, monkeypatch):
    ar = SpecEngine(tiny_model, None).generate(GenerationRequest(prompt, 48, mode="ar")).token_ids
    sparse = SparseConfig(policy="verifier_guided", budget=budget, reselect_interval=8)
    client = BoundCheckingClient(DrafterHost(tiny_model, DrafterHostConfig(sparse, 512)))
    take = Drafter.take_summary

    def checked_take(self, summary):       # right after a summary the view is a fresh selection
        take(self, summary)
        client.after_summary.append(self.cache.device_entries())
    monkeypatch.setattr(Drafter, "take_summary", checked_take)
    out = SpecEngine(tiny_model, client, schedule=EVERY_ROUND).generate(GenerationRequest(prompt, 48, k=k))
    assert_greedy_equal(tiny_model, prompt, ar, out.token_ids, f"guided B={budget} k={k}")
    m = out.metrics
    assert m.summaries_sent >= m.rounds - 1 >= 5 and m.summary_bytes > 0
    assert client.summaries_seen[0]            # the first draft already carries the prefill's summary
    assert client.max_entries <= budget + sparse.tail_cap
    assert client.after_summary and max(client.after_summary) <= budget   # a summary re-selects
    full_kv = len(prompt) * tiny_model.cfg.kv_bytes_per_token(4)
    assert m.summary_bytes < 0.01 * full_kv, (m.summary_bytes, full_kv)


def test_summaries_off_or_unread_cost_nothing(tiny_model, prompt):
    chunk = LocalDrafterClient(DrafterHost(tiny_model, DrafterHostConfig(SparseConfig(policy="chunk_topk", budget=16),
                                                                         512)))
    engine = SpecEngine(tiny_model, chunk)
    out = engine.generate(GenerationRequest(prompt, 16, k=4))
    assert out.metrics.summaries_sent == 0 and engine.verifier.tracked == [False] * engine.max_batch
    off = SpecEngine(tiny_model, LocalDrafterClient(DrafterHost(tiny_model, DrafterHostConfig(
        SparseConfig("verifier_guided", 16), 512))), summary=None)
    assert off.verifier.tracker is None
    assert off.generate(GenerationRequest(prompt, 16, k=4)).metrics.summaries_sent == 0


class Flaky(LocalDrafterClient):
    """Fails the calls whose numbers are in `fail` (open and draft counted together); records
    what each draft call carried."""

    def __init__(self, *a, fail=(), **kw):
        super().__init__(*a, **kw)
        self.fail, self.n, self.calls = set(fail), 0, []

    def _maybe_fail(self):
        self.n += 1
        if self.n in self.fail:
            raise DrafterUnavailable("injected")

    def open(self, session, tokens, params):
        self._maybe_fail()
        return super().open(session, tokens, params)

    def draft_many(self, calls):
        replies = []
        for c in calls:
            self.calls.append((c.base_len, c.summary))
            try:
                self._maybe_fail()
            except DrafterUnavailable as e:
                replies.append(e)
                continue
            replies += super().draft_many([c])
        return replies


def test_a_reopened_drafter_gets_a_summary_at_once(tiny_model, prompt):
    ar = SpecEngine(tiny_model, None).generate(GenerationRequest(prompt, 40, mode="ar")).token_ids
    client = Flaky(DrafterHost(tiny_model, DrafterHostConfig(SparseConfig(policy="verifier_guided", budget=16), 512)),
                   fail={4})
    cfg = ScheduleConfig(every_rounds=50, alpha_threshold=0.0, growth=10_000)   # only the first one
    out = SpecEngine(tiny_model, client, schedule=cfg).generate(GenerationRequest(prompt, 40, k=4))
    assert_greedy_equal(tiny_model, prompt, ar, out.token_ids, "re-open")
    assert out.metrics.drafter_failures == 1
    first = client.calls[0][1]
    assert first and all(c[1] is None for c in client.calls[1:3])
    reopen = next(c for c in client.calls[3:] if c[0] == 0)
    assert Summary.decode(reopen[1]).length > Summary.decode(first).length     # made at the re-open


def test_a_stored_summary_reaches_a_drafter_the_verifier_knows_nothing_about(tiny_model, prompt):
    """After a take-over the new verifier passes the session's stored summary; if its drafter
    could not even be opened, the re-open still starts from it."""
    stored = Summary(length=300, chunk=8, chunks=(3, 9), scores=(1.0, 0.5)).encode()
    client = Flaky(DrafterHost(tiny_model, DrafterHostConfig(SparseConfig(policy="verifier_guided", budget=16), 512)),
                   fail={1})
    engine = SpecEngine(tiny_model, client)
    run = engine.start(GenerationRequest(prompt, 8, k=4), 0, summary=stored)
    assert run.drafter_base == 0 and run.summary.want is None
    engine.step([run])
    assert client.calls[0] == (0, stored)

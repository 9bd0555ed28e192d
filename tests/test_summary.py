"""KV summaries (kvstore/cache/summary.py, verifier_guided, the send schedule): the wire format, the
importance the verifier measures, the policy that reads it, and that none of it changes a token
or breaks the drafter's memory bound."""

from __future__ import annotations

import math
import re
import struct

import pytest
import torch

from conftest import random_model
from equality import assert_greedy_equal
from kvstore.cache.full import FullKVCache
from kvstore.cache.policies import SelectionContext, get_policy
from kvstore.cache.sparse import SparseConfig
from kvstore.cache.summary import SHARE_SLACK, ImportanceTracker, Summary, SummaryConfig, SummaryWant
from sparsespec.errors import InvalidArgument
from sparsespec.spec.drafter import Drafter
from sparsespec.spec.drafter_host import DrafterHost, DrafterHostConfig, LocalDrafterClient
from sparsespec.spec.loop import GenerationRequest, SpecEngine
from sparsespec.spec.summaries import ScheduleConfig, SummarySchedule
from sparsespec.spec.transport import DrafterClient, DrafterUnavailable

# --- wire format ------------------------------------------------------------------------------

def _summary(length=200, chunks=((2, 10, 22),), shares=((0.25, 0.5, 0.125),), heads=1, layers=1, group_layers=(0,)):
    return Summary(length=length, chunk=8, layers=layers, group_layers=group_layers, heads=heads,
                   chunks=chunks, shares=shares)


def test_summary_round_trips_compactly():
    s = _summary(length=70_000, layers=30, group_layers=(8, 15, 22), heads=1,
                 chunks=((0, 3, 4, 900, 8000), (), (5,)), shares=((0.5, 0.25, 0.125, 0.0625, 0.03125), (), (1.0,)))
    data = s.encode()
    assert Summary.decode(data) == s
    # version + 5 header varints (length needs 3 bytes) + 3 group layers
    # + (count + 5 deltas (8000 - 900 and 900 - 4 need 2) + 5 fp16) + (count) + (count + delta + fp16)
    assert len(data) == 1 + (3 + 1 + 1 + 1 + 1) + 3 + (1 + 7 + 10) + 1 + (1 + 1 + 2)


def _fp16(x):
    return struct.pack("<e", x)


ONE = _fp16(1.0)
HEAD = b"\x02\x10\x08\x02\x01\x01\x01"     # v2, length 16, chunk 8, 2 layers, 1 group, 1 head, group layer 1


@pytest.mark.parametrize("data,field,problem", [
    (b"", "summary", "empty"),
    (b"\x07\x10\x08\x00", "summary.version", "unknown format version 7"),
    (b"\x01\x10\x08\x01\x00\x00\x3c", "summary.version", "version 1"),           # the pooled v1 is gone
    (b"\x02\x10\x08", "summary", "truncated"),
    (HEAD, "summary", "truncated"),                                               # the list is missing
    (b"\x02\x10\x00\x02\x01\x01\x01\x00", "summary.chunk", ">= 1"),
    (b"\x02\x10\x08\x00\x01\x01\x00\x00", "summary.layers", ">= 1"),
    (b"\x02\x10\x08\x02\x03\x01\x00\x01\x01", "summary.groups", "3 groups for 2 layers"),
    (b"\x02\x10\x08\x02\x01\x00\x01", "summary.heads", "0 heads"),
    (b"\x02\x10\x08\x02\x01\x88\x27\x01", "summary.heads", "at most"),         # 5000 heads
    (b"\x02\x10\x08\x02\x01\x01\x02\x01\x00" + ONE, "summary.group_layers", "layer 2 of 2"),
    (b"\x02\x10\x08\x02\x02\x01\x00\x00\x00\x00", "summary.group_layers", "increasing"),
    (HEAD + b"\x05\x00" + ONE, "summary.count", "5 chunks"),
    (b"\x02\x20\x08\x02\x01\x01\x01\x02\x00\x00" + _fp16(0.5) * 2, "summary.chunks", "increasing"),
    (HEAD + b"\x01\x02" + ONE, "summary.chunks", "past the summarised length"),  # chunk 2 * 8 >= 16
    (HEAD + b"\x01\x00" + b"\x00\x7e", "summary.shares", "(0, 1]"),            # NaN
    (HEAD + b"\x01\x00" + b"\x00\x00", "summary.shares", "(0, 1]"),            # 0
    (b"\x02\x20\x08\x02\x01\x01\x01\x02\x00\x01" + _fp16(0.75) * 2, "summary.shares", "sums to 1.5"),
    (HEAD + b"\x01\x00" + ONE + b"\x00", "summary", "1 trailing bytes"),
    (b"\x02" + b"\xff" * 10 + b"\x01", "summary", "varint"),
])
def test_malformed_summaries_are_refused_naming_the_field(data, field, problem):
    assert Summary.decode(HEAD + b"\x01\x00" + ONE).chunks == ((0,),)      # the base the cases break
    with pytest.raises(InvalidArgument, match=re.escape(problem)) as e:
        Summary.decode(data)
    assert e.value.field == field


def test_summary_config_is_validated():
    for config, bad in ((SummaryConfig, dict(decay=1.0)), (ScheduleConfig, dict(every_rounds=0)),
                        (SummaryConfig, dict(layers=())), (SummaryConfig, dict(layers=(-1,))),
                        (ScheduleConfig, dict(alpha_threshold=1.5)), (SummaryConfig, dict(groups=0)),
                        (SummaryConfig, dict(chunk=True)), (ScheduleConfig, dict(growth=True))):
        with pytest.raises(InvalidArgument) as e:
            config(**bad)
        assert e.value.field.startswith("summary.")
    assert SummaryConfig().layers_for(30) == (8, 15, 22)
    assert SummaryConfig().groups_for(30) == ((8,), (15,), (22,))
    assert SummaryConfig(layers=(2, 5, 9, 11), groups=2).groups_for(12) == ((2, 5), (9, 11))
    assert SummaryConfig(layers=(5, 1, 5)).layers_for(6) == (1, 5)
    with pytest.raises(InvalidArgument, match="layer 9 does not exist"):
        SummaryConfig(layers=(9,)).layers_for(4)
    with pytest.raises(InvalidArgument, match="at most one group per scored layer") as e:
        SummaryConfig(groups=4).groups_for(30)
    assert e.value.field == "summary.groups"
    # with local layers (Gemma 3: every 6th global) only global layers are scored
    gemma = ((512,) * 5 + (None,)) * 3
    assert SummaryConfig().layers_for(18, gemma) == (5, 11, 17)
    assert SummaryConfig(auto_layers=2).layers_for(18, gemma) == (5, 17)
    assert SummaryConfig(auto_layers=1).layers_for(18, gemma) == (11,)
    assert SummaryConfig().layers_for(30, (None,) * 30) == (8, 15, 22)   # no local layer: as before
    with pytest.raises(InvalidArgument, match="layer 3 is a local") as e:
        SummaryConfig(layers=(3, 5)).layers_for(18, gemma)
    assert e.value.field == "summary.layers"
    for fallback in ("full", "streaming", "verifier_guided"):   # it must estimate shares and read no summary
        with pytest.raises(InvalidArgument) as e:
            SparseConfig(policy="verifier_guided", budget=64, fallback=fallback)
        assert e.value.field == "fallback"


def test_a_drafter_reads_the_group_at_its_depth_and_its_own_head():
    s = _summary(length=400, layers=30, group_layers=(8, 15, 22), heads=2,
                 chunks=((3,), (4,), (10,), (11,), (20,), (21,)), shares=((0.5,), (0.25,), (0.5,), (0.5,), (1.0,), (0.5,)))
    same = s.for_drafter(30, 2)
    assert same.per_head and same.groups == (0,) * 12 + (1,) * 7 + (2,) * 11
    assert s.for_drafter(4, 2).groups == (0, 0, 1, 2)            # a layers:4 drafter, by relative depth
    got = same.shares(0, 4, 300, 2)                               # [2, 296]: chunk 3 = positions 24..31
    assert got.shape == (2, 296) and got[0, 20:28].tolist() == [0.5 / 8] * 8 and float(got[0].sum()) == 0.5
    assert got[1, 28:36].tolist() == [0.25 / 8] * 8 and float(got[1].sum()) == 0.25
    assert same.shares(29, 4, 300, 2)[0, 156:164].sum() == 1.0
    assert same.shares(29, 4, 168, 2)[1].sum() == 0.0 and same.shares(29, 4, 160, 2) is None   # named past hi
    pooled = s.for_drafter(4, 3)                                  # other head counts: the heads' mean
    assert not pooled.per_head
    p = pooled.shares(3, 0, 400, 3)
    assert p.shape == (3, 400) and p[2, 160:168].tolist() == [0.5 / 8] * 8 and p[0, 168:176].tolist() == [0.25 / 8] * 8


# --- the verifier's importance ----------------------------------------------------------------

def _planted_forward(tracker, hot=(77, 150), n: int = 200, rows=(0,), seed=0):
    """One observed forward where every query of KV head h's group points at key hot[h]."""
    g = torch.Generator().manual_seed(seed)
    hkv, h, d, t = 2, 4, 16, 3
    keys = torch.randn(len(rows), hkv, n + t, d, generator=g) * 0.1
    for head, pos in enumerate(hot):
        keys[:, head, pos] = 4.0
    q = torch.ones(len(rows), h, t, d)
    tracker.begin(list(rows), [True] * len(rows), [n] * len(rows))
    tracker.observe(1, q, keys, None, torch.tensor([n] * len(rows)))
    tracker.end()


def test_tracker_finds_what_each_kv_head_attends_to():
    tracker = ImportanceTracker(SummaryConfig(layers=(1,)), num_layers=2, num_kv_heads=2, batch=2, capacity=512)
    _planted_forward(tracker, hot=(77, 150))
    assert tracker.scores.shape == (2, 1, 2, 512)
    assert int(tracker.scores[0, 0, 0].argmax()) == 77 and int(tracker.scores[0, 0, 1].argmax()) == 150
    assert float(tracker.scores[1].abs().sum()) == 0
    s = tracker.summary(0, 203, SummaryWant(slots=16, sink=4, window=16))
    assert (s.layers, s.group_layers, s.heads) == (2, (1,), 2)
    for head, hot in enumerate((77, 150)):
        chunks, shares = s.entry(0, head)
        assert len(chunks) == 2 and chunks[shares.index(max(shares))] == hot // 8
        assert max(shares) > 0.9 and sum(shares) <= 1.0 + SHARE_SLACK   # shares of the middle's mass (fp16)
    assert Summary.decode(s.encode()) == s
    # The EMA follows the verifier: a new hot spot overtakes the old one after a few forwards.
    for _ in range(4):
        _planted_forward(tracker, hot=(120, 150))
    assert int(tracker.scores[0, 0, 0].argmax()) == 120
    # Positions past a row's length (rolled-back drafts) lose their history on the next forward.
    tracker.begin([0], [True], [100])
    tracker.end()
    assert float(tracker.scores[0, ..., 100:].abs().sum()) == 0
    # Untracked rows and layers cost nothing.
    before = tracker.seconds
    tracker.begin([0], [False], [100])
    tracker.observe(1, torch.ones(1, 4, 1, 16), torch.ones(1, 2, 101, 16), None, torch.tensor([100]))
    tracker.observe(0, torch.ones(1, 4, 1, 16), torch.ones(1, 2, 101, 16), None, torch.tensor([100]))
    tracker.end()
    assert tracker.seconds == before


def test_tracker_groups_layers_by_depth():
    tracker = ImportanceTracker(SummaryConfig(layers=(0, 1, 2, 3), groups=2, decay=0.0), num_layers=4,
                                num_kv_heads=1, batch=1, capacity=64)
    assert tracker.group_layers == (0, 2)                 # mean depths 0.5 and 2.5, rounded half to even
    tracker.begin([0], [True], [40])
    for layer, hot in ((0, 10), (1, 30), (2, 20), (3, 20)):
        keys = torch.randn(1, 1, 41, 16, generator=torch.Generator().manual_seed(layer)) * 0.01
        keys[0, 0, hot] = 6.0
        tracker.observe(layer, torch.ones(1, 2, 1, 16), keys, None, torch.tensor([40]))
    tracker.end()
    first, second = tracker.scores[0, 0, 0], tracker.scores[0, 1, 0]   # a group averages its layers
    assert float(first[10]) == pytest.approx(0.5, abs=1e-4) and float(first[30]) == pytest.approx(0.5, abs=1e-4)
    assert float(second[20]) == pytest.approx(1.0, abs=1e-4) and float(second.sum()) == pytest.approx(1.0, abs=1e-5)


def test_tracker_scores_match_the_attention_the_model_computes():
    """Against an independent computation: softmax(q K^T / sqrt(D)) of the model's own q/k,
    averaged over each KV head's query heads and the queries."""
    model = random_model(seed=3, layers=2)
    prompt = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(4))
    cache = FullKVCache.for_model(model, 64)
    tracker = ImportanceTracker(SummaryConfig(layers=(1,), decay=0.0, query_window=40), 2, 2, 1, 64)
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
        torch.triu(torch.ones(40, 40, dtype=torch.bool), 1), float("-inf")).softmax(-1)   # [1, 4, 40, 40]
    expected = att[0].view(2, 2, 40, 40).mean(dim=(1, 2))           # [Hkv, 40]
    torch.testing.assert_close(tracker.scores[0, 0, :, :40], expected, atol=1e-5, rtol=1e-4)


# --- the policy -------------------------------------------------------------------------------

def _ctx(summary, n=200, lo=4, hi=184, m=40, seed=0, plant=()):
    """Random keys and queries; `plant` = (head, first, last) ranges whose keys are the head's
    query proxy scaled up, so the drafter's own policy ranks them first."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, n, 16, generator=g)
    q = torch.randn(4, 5, 16, generator=g)
    for head, first, last in plant:
        keys[head, first:last] = 8.0 * q.view(2, 2, 5, 16)[head].mean(dim=(0, 1))
    return SelectionContext(layer=0, length=n, keys=keys, queries=q, query_positions=torch.arange(n - 5, n),
                            group_size=2, chunk=8, lo=lo, hi=hi, m=m,
                            summary=None if summary is None else summary.for_drafter(1, 2))


def _guided(fallback="chunk_topk"):
    cfg = SparseConfig(policy="verifier_guided", budget=64, fallback=fallback)
    return get_policy("verifier_guided")(cfg), get_policy(fallback)(cfg)


def test_guided_keeps_its_own_policy_without_a_summary_or_with_one_naming_nothing_better():
    guided, own = _guided()
    assert guided.choose(_ctx(None)).tolist() == own.choose(_ctx(None)).tolist()   # before any summary
    ctx = _ctx(_summary(chunks=((23,), ()), shares=((1.0,), ()), heads=2))         # only past hi (184 >= 184)
    assert guided.choose(ctx).tolist() == own.choose(ctx).tolist()
    tiny = _summary(chunks=((2, 10), (5,)), shares=((1e-4, 1e-4), (1e-4,)), heads=2)  # named, but far below
    ctx = _ctx(tiny)
    assert [sorted(h) for h in guided.choose(ctx).tolist()] == [sorted(h) for h in own.choose(ctx).tolist()]


def test_guided_own_top_entries_survive_a_summary_that_names_other_chunks():
    guided, own = _guided()
    plant = ((0, 44, 60), (1, 100, 116))                    # own's best per head: two chunks each, far ahead
    summary = _summary(chunks=((15, 16), (2,)), shares=((0.1, 0.1), (0.1,)), heads=2)   # 120..135 / 16..23
    ctx = _ctx(summary, plant=plant)
    chosen, mine = guided.choose(ctx), own.choose(ctx)
    shares = own.shares(ctx)
    named = [set(range(120, 136)), set(range(16, 24))]
    for head, (_, first, last) in enumerate(plant):
        kept = set(chosen[head].tolist())
        assert set(range(first, last)) <= kept                                    # own's top entries survive
        assert float(shares[head, first - 4]) > 0.1 / 8 > float(shares[head, 120 - 4])  # (they score higher)
        assert named[head] <= kept                                                # the summary adds its chunks
        lost = [p for p in mine[head].tolist() if p not in kept]
        assert len(lost) == len(named[head] - set(mine[head].tolist()))           # one own entry per slot taken
        assert lost == mine[head].tolist()[-len(lost):]                           # ... own's weakest ones


def test_guided_adds_a_chunk_its_own_policy_missed():
    guided, own = _guided()
    ctx = _ctx(None)
    missed = next(j for j in range(1, 23) if not set(range(8 * j, 8 * j + 8)) & set(own.choose(ctx)[0].tolist()))
    ctx = _ctx(_summary(chunks=((missed,), ()), shares=((0.5,), ()), heads=2))
    chosen = guided.choose(ctx)
    assert set(range(8 * missed, 8 * missed + 8)) <= set(chosen[0].tolist())
    assert chosen[1].tolist() == own.choose(ctx)[1].tolist()                      # head 1 was told nothing


@pytest.mark.parametrize("fallback", ["chunk_topk", "snapkv"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_guided_never_drops_an_own_entry_for_a_lower_scored_one(fallback, seed):
    """The invariant behind "only adds", on random keys and summaries: an entry of the own
    policy's choice is dropped only for a summary position that the summary scores above what
    the own policy scored the dropped one."""
    guided, own = _guided(fallback)
    g = torch.Generator().manual_seed(seed)
    lists = [tuple(sorted(torch.randperm(23, generator=g)[:6].tolist())) for _ in range(2)]
    shares = [tuple(float(x) for x in (torch.rand(6, generator=g) * 0.1).half().float().clamp_min(1e-3)) for _ in range(2)]
    ctx = _ctx(_summary(chunks=tuple(lists), shares=tuple(shares), heads=2), seed=seed)
    chosen, mine, own_shares = guided.choose(ctx), own.choose(ctx), own.shares(ctx)
    advice = ctx.summary.shares(0, ctx.lo, ctx.hi, 2)
    for h in range(2):
        kept, base = set(chosen[h].tolist()), set(mine[h].tolist())
        assert len(kept) == ctx.m and all(ctx.lo <= p < ctx.hi for p in kept)
        added = kept - base
        lost = base - kept
        assert len(added) == len(lost)
        if lost:
            bar = max(float(own_shares[h, p - ctx.lo]) for p in lost)   # (>= : snapkv's pooled scores tie)
            assert all(max(float(advice[h, p - ctx.lo]), float(own_shares[h, p - ctx.lo])) >= bar for p in added)


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
        self.per_head = []

    def draft_many(self, calls):
        self.summaries_seen += [c.summary for c in calls]
        replies = super().draft_many(calls)
        for c in calls:
            self.max_entries = max(self.max_entries, self.host.drafter(c.session).cache.device_entries())
        return replies


@pytest.fixture(scope="module")
def other_drafter():
    """A different model: 3 layers against the verifier's 2, one KV head against its 2."""
    return random_model(seed=7, layers=3, num_kv_heads=1)


@pytest.mark.parametrize("budget,k,drafter,fallback", [(16, 4, "same", "chunk_topk"), (48, 8, "same", "snapkv"),
                                                       (32, 1, "same", "chunk_topk"), (24, 4, "other", "chunk_topk")])
def test_guided_equals_ar_and_keeps_the_bound(tiny_model, other_drafter, prompt, budget, k, drafter, fallback,
                                              monkeypatch):
    ar = SpecEngine(tiny_model, None).generate(GenerationRequest(prompt, 48, mode="ar")).token_ids
    sparse = SparseConfig(policy="verifier_guided", budget=budget, reselect_interval=8, fallback=fallback)
    model = tiny_model if drafter == "same" else other_drafter
    client = BoundCheckingClient(DrafterHost(model, DrafterHostConfig(sparse, 512)))
    take = Drafter.take_summary

    def checked_take(self, summary):       # right after a summary the view is a fresh selection
        take(self, summary)
        client.after_summary.append(self.cache.device_entries())
        client.per_head.append(self.cache.summary.per_head)
    monkeypatch.setattr(Drafter, "take_summary", checked_take)
    scored = SummaryConfig(layers=(0, 1))                   # two groups, per KV head
    out = SpecEngine(tiny_model, client, summary=scored, schedule=EVERY_ROUND).generate(
        GenerationRequest(prompt, 48, k=k))
    assert_greedy_equal(tiny_model, prompt, ar, out.token_ids, f"guided B={budget} k={k} {drafter}")
    m = out.metrics
    assert m.summaries_sent >= m.rounds - 1 >= 5 and m.summary_bytes > 0
    first = Summary.decode(client.summaries_seen[0])    # the first draft already carries the prefill's summary
    assert (first.group_layers, first.heads) == ((0, 1), 2) and all(first.chunks)
    assert set(client.per_head) == {drafter == "same"}      # other head counts read the heads' mean
    assert client.max_entries <= budget + sparse.tail_cap
    assert client.after_summary and max(client.after_summary) <= budget   # a summary re-selects
    full_kv = len(prompt) * tiny_model.cfg.kv_bytes_per_token(4)
    # Every round gets one here (the default schedule sends about every 8): each stays < 0.1%.
    assert m.summary_bytes / m.summaries_sent < 0.001 * full_kv, (m.summary_bytes, m.summaries_sent, full_kv)


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

    def open_many(self, calls):   # one open after another, each of them counted
        return DrafterClient.open_many(self, calls)

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
    stored = _summary(length=300, chunks=((3, 9),), shares=((0.5, 0.25),), layers=2, group_layers=(1,)).encode()
    client = Flaky(DrafterHost(tiny_model, DrafterHostConfig(SparseConfig(policy="verifier_guided", budget=16), 512)),
                   fail={1})
    engine = SpecEngine(tiny_model, client)
    run = engine.start(GenerationRequest(prompt, 8, k=4), 0, summary=stored)
    assert run.drafter_base == 0 and run.summary.want is None
    engine.step([run])
    assert client.calls[0] == (0, stored)


def test_a_stored_summary_this_build_cannot_read_is_dropped(tiny_model, prompt):
    """A v1 (pooled) summary stored before an upgrade would be refused on every re-open."""
    client = Flaky(DrafterHost(tiny_model, DrafterHostConfig(SparseConfig(policy="verifier_guided", budget=16), 512)),
                   fail={1})
    engine = SpecEngine(tiny_model, client)
    run = engine.start(GenerationRequest(prompt, 8, k=4), 0, summary=b"\x01\x10\x08\x01\x00\x00\x3c")
    assert run.summary.latest is None
    engine.step([run])
    m = engine.finish(run).metrics
    assert client.calls[0] == (0, None) and m.drafter_failures == 0 and m.drafted > 0   # the re-open drafts

"""Fed drafters (issue #14): the verifier's exact K/V instead of a drafter prefill and host tier.

Greedy equality with AR at every budget and k, in process and through the services; the feeder's
mirror equals what the drafter holds after every round; the fed cache is exact when its budget
covers the context; a malformed feed is refused naming the field, alone, and the session re-opens.
"""

from __future__ import annotations

import struct

import pytest
import torch

from conftest import random_model
from equality import assert_greedy_equal
from kvstore.cache.feed import Feed, FeedWant, held
from kvstore.cache.full import FullKVCache
from kvstore.cache.sparse import SparseConfig, SparseKVCache
from kvstore.cache.stacked import StackedKVCache
from sparsespec.errors import InvalidArgument
from sparsespec.models.quant import drafter_weights
from sparsespec.models.truncate import layer_truncated
from sparsespec.rpc.errors import SessionUnknown
from sparsespec.spec.feed import FeedConfig, Feeder
from sparsespec.spec.drafter_host import DrafterHost, DrafterHostConfig, LocalDrafterClient
from sparsespec.spec.loop import GenerationRequest, SpecEngine
from sparsespec.spec.sampling import SamplingParams
from sparsespec.spec.transport import DraftCall

MAX_TOKENS = 40
GREEDY = SamplingParams()


def fed_engine(verifier, drafter, budget, max_batch=2, **host):
    config = DrafterHostConfig(SparseConfig(policy="fed", budget=budget), verifier.max_context, **host)
    return SpecEngine(verifier, LocalDrafterClient(DrafterHost(drafter, config)), max_batch=max_batch)


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 128, (300,), generator=torch.Generator().manual_seed(1)).tolist()


@pytest.fixture(scope="module")
def ar_tokens(tiny_model, prompt):
    return SpecEngine(tiny_model, None).generate(GenerationRequest(prompt, MAX_TOKENS, mode="ar")).token_ids


# --- in process -------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 4, 8])
@pytest.mark.parametrize("budget", [16, 64, 512])
@pytest.mark.parametrize("drafter", ["same", "layers:1", "int8"])
def test_fed_drafter_equals_ar(tiny_model, prompt, ar_tokens, drafter, budget, k):
    d = {"same": tiny_model, "layers:1": layer_truncated(tiny_model, 1),
         "int8": drafter_weights(tiny_model, "int8")}[drafter]
    out = fed_engine(tiny_model, d, budget).generate(GenerationRequest(prompt, MAX_TOKENS, k=k))
    assert_greedy_equal(tiny_model, prompt, ar_tokens, out.token_ids, f"fed {drafter}/{budget}/k={k}")
    m = out.metrics
    assert m.rounds > 0 and m.feeds_sent == m.rounds and m.drafter_failures == 0
    assert m.drafter_kv_host_bytes == 0                 # no host tier
    # The traffic by kind adds up: one opening selection, then blocks and re-selections.
    assert m.feed_open_bytes > 0 and m.feed_blocks + m.feed_refreshes + 1 == m.feeds_sent
    assert m.feed_open_bytes + m.feed_refresh_bytes + m.feed_block_bytes == m.feed_bytes
    assert 0 < m.feed_s < m.decode_s
    if budget == 512 and drafter == "same":              # the whole context, exact: every draft is the verifier's
        assert m.alpha == 1.0


def test_fed_drafter_does_no_prefill(tiny_model, prompt, monkeypatch):
    """The drafter forwards only the pending token and its drafts: never the prompt."""
    widths = []
    forward = type(tiny_model).forward

    def spy(self, ids, cache, last_only=False):
        if isinstance(cache, (SparseKVCache, StackedKVCache)):
            widths.append(ids.shape[1])
        return forward(self, ids, cache, last_only)
    monkeypatch.setattr(type(tiny_model), "forward", spy)
    fed_engine(tiny_model, tiny_model, 64).generate(GenerationRequest(prompt, 12, k=4))
    assert widths and max(widths) == 1


def test_mirror_equals_what_the_drafter_holds(tiny_model):
    """After every round the feeder's mirror is exactly the drafter's view below its fed length,
    across selections (a long tail forces them) and batched sessions of different lengths."""
    engine = fed_engine(tiny_model, tiny_model, 24, max_batch=2)
    g = torch.Generator().manual_seed(4)
    reqs = [GenerationRequest(torch.randint(0, 128, (n,), generator=g).tolist(), 120, k=4) for n in (90, 230)]
    runs = [engine.start(r, row) for row, r in enumerate(reqs)]
    selections = 0
    while any(not r.done for r in runs):
        engine.step([r for r in runs if not r.done])
        for r in runs:
            if r.done:
                continue
            f, cache = r.feeder, engine.drafter.host.drafter(r.session).cache
            assert cache.fed_length == f.fed < engine.verifier.length(r.row)   # fed before this round's commit
            for layer in range(cache.num_layers):
                view = cache.view_positions(layer)[:, :cache._kept(layer, f.fed)]
                assert torch.equal(view, f._holding(layer)), f"layer {layer}"
            selections = max(selections, f.selections)
    assert selections >= 2


def test_fed_cache_is_exact_when_the_budget_covers_the_context(tiny_model):
    """Fed the verifier's K/V, the drafter's forward equals the verifier's own (same model)."""
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (1, 60))
    full = FullKVCache.for_model(tiny_model, 80)
    with torch.inference_mode():
        tiny_model(ids[:, :59], full)
        want = tiny_model(ids[:, 59:], full)[0, -1]
    fed = SparseKVCache.for_model(tiny_model, 80, SparseConfig(policy="fed", budget=64))
    keys = torch.stack([torch.stack([full.k[i][0, :, :59], full.v[i][0, :, :59]]) for i in range(2)])
    pos = torch.arange(59).expand(2, tiny_model.cfg.num_kv_heads, 59)
    fed.apply_feed(Feed(0, 59, positions=pos, added=keys.permute(1, 0, 2, 3, 4).reshape(2, -1, keys.shape[-1])))
    with torch.inference_mode():
        got = tiny_model(ids[:, 59:], fed)[0, -1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert fed.host_bytes() == 0


def test_held_marks_what_the_drafter_has():
    have = torch.tensor([[0, 3, 5, 9], [1, 2, 3, 4]])
    want = torch.tensor([[0, 4, 9], [0, 4, 7]])
    assert held(want, have).tolist() == [[True, False, True], [False, True, False]]
    assert not held(want, have[:, :0]).any()


def test_sampling_with_feeding_matches_exact():
    """The chi-square test of test_spec_sampling with a fed drafter (bf16 weights, budget 4)."""
    import test_spec_sampling as ss
    verifier = random_model(seed=11, vocab=ss.VOCAB, std=0.5)
    exact = ss.exact_distribution(verifier).flatten()
    host = DrafterHost(drafter_weights(verifier, "bf16"),
                       DrafterHostConfig(SparseConfig(policy="fed", budget=4), 16))
    engine = SpecEngine(verifier, LocalDrafterClient(host), max_batch=ss.BATCH)
    fed = []
    finish = engine.finish
    engine.finish = lambda run: fed.append(run.feeder.sent) or finish(run)
    counts = ss.sample_counts(engine, "spec", max_tokens=3, draws=ss.DRAWS // 2)   # half the Llama test's (CI time)
    assert min(fed) >= 1
    assert ss.chi_square_pvalue(counts, exact) > 1e-3


# --- bad feeds ---------------------------------------------------------------------------------

def _opened(model, budget=16):
    """A fed host with one session opened and fed once, and that feed's bytes."""
    host = DrafterHost(model, DrafterHostConfig(SparseConfig(policy="fed", budget=budget), 256))
    tokens = list(range(1, 41))
    host.open("s", tokens, GREEDY)
    engine = SpecEngine(model, None)
    engine.verifier.prefill(0, tokens[:-1])
    return host, tokens, engine.verifier


def _selection(verifier, budget=16):
    """A whole selection feed from the verifier's row 0, as a fed drafter of `budget` would get it."""
    c = verifier.model.cfg
    want = FeedWant(verifier.model.kv_source, c.num_layers, c.num_kv_heads, c.head_dim, budget, 4, 4, 8, 81)
    verifier.record(0, True)
    return Feeder(want).next(verifier, 0, 4)


BAD = {
    # name: (make bytes from a good selection feed, field)
    "bad-magic": (lambda good: b"XXXX" + good[4:], "feed"),
    "truncated": (lambda good: good[:-7], "feed"),
    "layers": (lambda good: _edit(good, layers=1), "feed.layers"),
    "position-outside-context": (lambda good: _edit(good, last_position=10_000), "feed.positions"),
    "not-increasing": (lambda good: _edit(good, first_position=39), "feed.positions"),
    "added-count": (lambda good: _edit(good, drop_added=1), "feed.added"),
    "counts-disagree": (lambda good: good[:48] + struct.pack("<i", 999) + good[52:], "feed.positions"),
    "over-budget": (lambda good: _edit(good, widen=1), "feed.positions"),
    "dtype": (lambda good: good[:5] + b"\x09" + good[6:], "feed.dtype"),
}


def _edit(good: bytes, layers=None, last_position=None, first_position=None, drop_added=0, widen=0) -> bytes:
    f = Feed.decode(good)
    pos, added = [p.clone() for p in f.positions], f.added
    if layers is not None:
        keep = len(pos) // 2 or 1
        missing_per_layer = added.shape[1] // len(pos)
        pos, added = pos[:keep], added[:, :missing_per_layer * keep]
    if last_position is not None:
        pos[0][0, -1] = last_position
    if first_position is not None:
        pos[0][0, 0] = first_position
    if drop_added:
        added = added[:, drop_added:]
    if widen:                       # layer 0 selects one position more than its budget holds
        pos[0] = torch.arange(pos[0].shape[1] + widen).expand(pos[0].shape[0], -1)
    return Feed(f.start, f.length, positions=pos, added=added).encode()


@pytest.mark.parametrize("case", list(BAD))
def test_bad_feed_is_refused_naming_the_field_and_alone(tiny_model, case):
    host, tokens, verifier = _opened(tiny_model)
    host.open("other", tokens, GREEDY)
    good = _selection(verifier)
    make, field = BAD[case]
    calls = [DraftCall("s", len(tokens), [], 4, GREEDY, feed=make(good)),
             DraftCall("other", len(tokens), [], 4, GREEDY, feed=good)]
    bad, ok = host.draft_many(calls)
    assert isinstance(bad, InvalidArgument) and str(bad).startswith(f"{field}: "), str(bad)
    assert len(ok.tokens) == 4                        # the other session drafted in the same round
    try:                                              # refused whole: untouched, or forgotten (re-opens)
        d = host.drafter("s")
    except SessionUnknown:
        return
    assert (d.committed_len, d.cache.fed_length, d.cache.length) == (len(tokens), 0, 0)


def test_feed_to_a_drafter_that_is_not_fed_is_refused(tiny_model):
    host = DrafterHost(tiny_model, DrafterHostConfig(SparseConfig(policy="chunk_topk", budget=16), 256))
    tokens = list(range(1, 41))
    host.open("s", tokens, GREEDY)
    [result] = host.draft_many([DraftCall("s", len(tokens), [], 2, GREEDY, feed=b"SSFD")])
    assert isinstance(result, InvalidArgument) and str(result).startswith("feed: "), str(result)


def test_oversized_feed_is_refused():
    with pytest.raises(InvalidArgument, match="^feed: .*exceed the limit"):
        Feed.decode(b"\0" * 100, max_bytes=64)


def test_engine_recovers_from_a_refused_feed(tiny_model, prompt, ar_tokens, monkeypatch):
    """A feed the drafter refuses costs one plain step: the session re-opens fed and stays equal."""
    from sparsespec.spec import feed as feed_mod
    engine = fed_engine(tiny_model, tiny_model, 64)
    real = feed_mod.Feeder.next
    n = {"calls": 0}

    def sometimes_bad(self, verifier, row, k):
        n["calls"] += 1
        data = real(self, verifier, row, k)
        return b"XXXX" + data[4:] if n["calls"] == 3 else data
    monkeypatch.setattr(feed_mod.Feeder, "next", sometimes_bad)
    out = engine.generate(GenerationRequest(prompt, MAX_TOKENS, k=4))
    assert_greedy_equal(tiny_model, prompt, ar_tokens, out.token_ids, "refused feed")
    assert out.metrics.drafter_failures == 1 and out.metrics.rounds > 3


def test_a_drafter_of_other_weights_is_not_fed(tiny_model, prompt, ar_tokens):
    """A fed drafter whose K/V are not the verifier's is not drafted with (it would be fed wrong
    K/V): the session decodes alone, equal to AR."""
    out = fed_engine(tiny_model, random_model(seed=7), 64).generate(GenerationRequest(prompt, MAX_TOKENS, k=4))
    assert out.token_ids == ar_tokens and out.metrics.rounds == 0


def _refresh_rounds(tiny_model, config, accepted_of, rounds=20):
    """The rounds whose feed was a re-selection, each round drafting 4 and accepting accepted_of(i),
    for a feeder of `config` whose tail never fills (only low acceptance re-selects)."""
    _, _, verifier = _opened(tiny_model)
    c = verifier.model.cfg
    want = FeedWant(verifier.model.kv_source, c.num_layers, c.num_kv_heads, c.head_dim, 16, 4, 4, 8, 1000)
    verifier.record(0, True)
    feeder, out = Feeder(want, config), []
    for i in range(rounds):
        before = feeder.traffic["refresh"]
        feeder.delivered(feeder.next(verifier, 0, 1))
        feeder.observe(4, accepted_of(i))
        if feeder.traffic["refresh"] != before:
            out.append(i)
    return out


@pytest.mark.parametrize("wait_max,expected", [(64, [2, 6, 14]), (4, [2, 6, 10, 14, 18])])
def test_a_reselection_that_does_not_lift_alpha_backs_off(tiny_model, wait_max, expected):
    """A drafter weak on a text whatever it holds: each low-acceptance re-selection (70 ms a session
    at 4K) that did not lift alpha doubles the wait before the next, up to alpha_wait_max rounds."""
    assert _refresh_rounds(tiny_model, FeedConfig(alpha_window=2, alpha_wait_max=wait_max), lambda i: 0) == expected


def test_a_reselection_that_lifts_alpha_keeps_the_short_wait(tiny_model):
    # low until round 14 (re-selected at 2, 6, 14: the wait grew to 8), lifted by the one at 14, low
    # again from 16: the wait is back to alpha_window, so it re-selects at 18, not 22
    assert _refresh_rounds(tiny_model, FeedConfig(alpha_window=2), lambda i: 4 if i in (14, 15) else 0) \
        == [2, 6, 14, 18]


def test_a_wait_max_below_the_window_is_refused_naming_it():
    with pytest.raises(InvalidArgument, match="feed.alpha_wait_max"):
        FeedConfig(alpha_window=8, alpha_wait_max=4)

"""SparseKVCache, SparseConfig and the KV policies.

Most tests drive the cache with deterministic random q/k/v (a `Stream`), which makes exact
comparisons possible: against FullKVCache, against attention computed by hand over the device
view's positions, and between a cache that saw rejected drafts and one that never did.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from kvstore.cache import FullKVCache, SparseConfig, SparseKVCache
from kvstore.cache.policies import POLICIES, SelectionContext, get_policy

SELF_SELECTING = tuple(p for p in POLICIES if not get_policy(p).fed)   # "fed" is tested in test_feed.py
from sparsespec.errors import ContextOverflow, InvalidArgument
from sparsespec.models.config import ModelConfig
from sparsespec.models.llama import LlamaModel

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

SPARSE = ("streaming", "chunk_topk", "snapkv", "verifier_guided")
L, H, HKV, D = 2, 4, 2, 16
G = H // HKV


class Stream:
    """q [L, H, N, D], k/v [L, Hkv, N, D]: what a model would hand the cache at each position."""

    def __init__(self, n: int, seed: int, scale: float = 1.0):
        g = torch.Generator().manual_seed(seed)
        self.q = torch.randn(L, H, n, D, generator=g) * scale
        self.k = torch.randn(L, HKV, n, D, generator=g) * scale
        self.v = torch.randn(L, HKV, n, D, generator=g)


def feed(cache, s: Stream, t: int) -> list[torch.Tensor]:
    """One forward of t tokens taken from stream s at the cache's current positions."""
    start = int(cache.lengths[0]) if isinstance(cache, FullKVCache) else cache.length
    pos = cache.begin_forward(t)
    assert pos.tolist() == [list(range(start, start + t))]
    sl = slice(start, start + t)
    outs = [cache.attend(l, s.q[l, :, sl][None], s.k[l, :, sl][None], s.v[l, :, sl][None]) for l in range(L)]
    cache.end_forward()
    return outs


def sparse(policy="chunk_topk", capacity=512, **kw) -> SparseKVCache:
    return SparseKVCache(L, H, HKV, D, capacity, SparseConfig(policy=policy, **kw))


def full(capacity=512) -> FullKVCache:
    return FullKVCache(L, HKV, D, capacity)


def reference(q, keys, values, pos, start):
    """Attention by hand over the entries at `pos` [Hkv, n] of dense keys/values [Hkv, N, D]
    plus the new tokens at [start, start + T). q: [1, H, T, D] -> [1, H, T, D]."""
    t = q.shape[2]
    out = torch.empty_like(q[0])
    n = pos.shape[1]
    for h in range(H):
        j = h // G
        kk = torch.cat([keys[j, pos[j]], keys[j, start:start + t]])             # [n + T, D]
        vv = torch.cat([values[j, pos[j]], values[j, start:start + t]])
        scores = q[0, h] @ kk.T / math.sqrt(D)                                 # [T, n + T]
        visible = torch.arange(n + t).view(1, -1) < (n + torch.arange(t) + 1).view(-1, 1)
        out[h] = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ vv
    return out[None]


def check_invariant(cache: SparseKVCache) -> None:
    assert cache.device_entries() <= cache.budget + cache.tail_cap


# --- SparseConfig -----------------------------------------------------------------------------

def test_config_errors():
    with pytest.raises(InvalidArgument, match="^budget: must be >= 1$") as e:
        SparseConfig(policy="streaming", budget=0)
    assert e.value.field == "budget"
    with pytest.raises(InvalidArgument) as e:
        SparseConfig(policy="h2o", budget=64)
    assert e.value.field == "policy" and all(p in str(e.value) for p in POLICIES)
    with pytest.raises(InvalidArgument, match="sink \\+ window") as e:
        SparseConfig(budget=16, sink=8, window=9)
    assert e.value.field == "window"
    with pytest.raises(InvalidArgument) as e:
        SparseConfig(budget=8, sink=9)
    assert e.value.field == "sink"
    with pytest.raises(InvalidArgument) as e:
        SparseConfig(policy="snapkv", budget=None)
    assert e.value.field == "budget"
    for field in ("chunk", "reselect_interval", "obs_window", "max_draft"):
        with pytest.raises(InvalidArgument) as e:
            SparseConfig(budget=64, **{field: 0})
        assert e.value.field == field
    with pytest.raises(InvalidArgument):
        SparseConfig(budget=64.0)


def test_config_defaults_and_clamps():
    c = SparseConfig(policy="streaming", budget=16)
    assert (c.sink, c.window) == (4, 4)
    c = SparseConfig(budget=1024)
    assert (c.sink, c.window, c.chunk, c.reselect_interval, c.obs_window, c.max_draft) == (4, 64, 8, 16, 16, 64)
    assert c.tail_cap == 16 + 64 + 1
    assert SparseConfig(budget=2).sink + SparseConfig(budget=2).window <= 2
    assert SparseConfig(budget=16, sink=10).window <= 6
    assert SparseConfig(budget=16, sink=8, window=8).window == 8           # explicit, exactly fits
    assert SparseConfig(policy="full", budget=None).budget is None
    assert SparseConfig(policy="full", budget=256).budget is None          # full has no budget
    assert set(POLICIES) == {"streaming", "chunk_topk", "snapkv", "verifier_guided", "fed", "full"}
    assert get_policy("snapkv").name == "snapkv"


# --- exactness --------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", SELF_SELECTING)
def test_matches_full_cache_when_budget_covers_everything(policy):
    s = Stream(128, seed=1)
    cfg = {"budget": None} if policy == "full" else {"budget": 128, "reselect_interval": 4, "max_draft": 4}
    a, b = sparse(policy, **cfg), full()
    for t in (20, 20):                                   # prefill in two pieces (host-tier reads)
        for x, y in zip(feed(a, s, t), feed(b, s, t)):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    steps = [1, 1, 3, 1, 5, 1, 1, 2] * 4
    for t in steps:
        a.upkeep()
        for x, y in zip(feed(a, s, t), feed(b, s, t)):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    assert a.length == int(b.lengths[0]) == 40 + sum(steps)
    if policy != "full":
        assert a.selections > 1


@pytest.mark.parametrize("policy", SPARSE)
def test_device_view_is_selected_plus_tail(policy):
    s = Stream(256, seed=2)
    a, dense = sparse(policy, budget=24, sink=4, window=4, reselect_interval=8, max_draft=8), full()
    for t in (60, 40):
        feed(a, s, t), feed(dense, s, t)
    assert a.device_entries() == 0 and a.upkeep() and a.device_entries() == 24
    rng = random.Random(0)
    for _ in range(40):
        a.upkeep()
        t = rng.choice((1, 1, 3, 4))
        start = a.length
        views = [a.view_positions(l) for l in range(L)]
        sel = [a.selected_positions(l) for l in range(L)]
        outs = feed(a, s, t)
        feed(dense, s, t)
        for l in range(L):
            kd, vd = dense.k[l][0], dense.v[l][0]
            pos = views[l]
            n = a.selection_length
            # the view: the selection (sinks, m chosen, the window at selection time), then the tail
            assert pos.shape == (HKV, 24 + start - n)
            assert torch.equal(pos[:, :24], sel[l])
            assert torch.equal(pos[:, 24:], torch.arange(n, start).expand(HKV, -1))
            assert torch.equal(sel[l][:, :4], torch.arange(4).expand(HKV, 4))
            assert torch.equal(sel[l][:, -4:], torch.arange(n - 4, n).expand(HKV, 4))
            assert sel[l].shape[1] == 24 and bool((sel[l].diff(dim=1) > 0).all())
            ref = reference(s.q[l, :, start:start + t][None], kd, vd, pos, start)
            torch.testing.assert_close(outs[l], ref, atol=1e-5, rtol=1e-5)
            # the device tensors hold exactly the host entries of those positions
            k, v, p = a.device_view(l)
            assert torch.equal(p, torch.cat([pos, torch.arange(start, start + t).expand(HKV, t)], 1))
            idx = p.unsqueeze(-1).expand(-1, -1, D)
            assert torch.equal(k, kd.gather(1, idx)) and torch.equal(v, vd.gather(1, idx))
        check_invariant(a)


# --- rollback ---------------------------------------------------------------------------------

def same_view(a: SparseKVCache, b: SparseKVCache) -> None:
    assert a.length == b.length and a.device_entries() == b.device_entries()
    for l in range(L):
        for x, y in zip(a.device_view(l), b.device_view(l)):
            assert torch.equal(x, y)


@pytest.mark.parametrize("policy", SPARSE)
def test_truncate_drops_rejected_drafts(policy):
    s, other = Stream(256, seed=3), Stream(256, seed=4)
    cfg = dict(budget=32, sink=4, window=4, reselect_interval=8, max_draft=8, obs_window=8)
    a, b = sparse(policy, **cfg), sparse(policy, **cfg)
    for c in (a, b):
        feed(c, s, 60)
        c.upkeep()
        feed(c, s, 3)
    feed(a, other, 5)                                    # drafts the verifier will reject
    a.truncate(63)
    same_view(a, b)
    for t in (2, 1, 1):
        for x, y in zip(feed(a, s, t), feed(b, s, t)):
            torch.testing.assert_close(x, y, atol=0, rtol=0)
    # the recorded queries of the rejected drafts are gone too: the next selection agrees
    assert a.upkeep(force=True) and b.upkeep(force=True)
    same_view(a, b)
    for x, y in zip(feed(a, s, 2), feed(b, s, 2)):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


@pytest.mark.parametrize("policy", SPARSE)
def test_truncate_before_the_selection_reselects(policy):
    s = Stream(256, seed=5)
    cfg = dict(budget=32, sink=4, window=4, reselect_interval=8, max_draft=8, obs_window=8)
    a, b = sparse(policy, **cfg), sparse(policy, **cfg)
    feed(a, s, 100)
    a.upkeep()
    feed(a, s, 5)
    a.truncate(90)
    feed(b, s, 90)
    b.upkeep()
    same_view(a, b)
    assert a.device_entries() == 32
    for x, y in zip(feed(a, s, 1), feed(b, s, 1)):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    a.truncate(0)
    assert a.length == 0 and a.device_entries() == 0 and not a.selected
    with pytest.raises(ValueError):
        b.truncate(b.length + 1)


def test_tail_overflow_and_capacity_errors():
    s = Stream(256, seed=6)
    a = sparse("streaming", capacity=100, budget=16, reselect_interval=4, max_draft=3)  # tail_cap 8
    feed(a, s, 40)
    assert a.room() == 60                                # prefill phase: only capacity bounds it
    a.upkeep()
    assert a.room() == 8
    feed(a, s, 8)
    assert a.room() == 0
    with pytest.raises(RuntimeError, match="upkeep"):
        feed(a, s, 1)
    assert a.length == 48 and a.upkeep() and a.room() == 8
    b = sparse("streaming", capacity=50, budget=16, reselect_interval=4, max_draft=3)
    feed(b, s, 45)
    b.upkeep()
    assert b.room() == 5
    with pytest.raises(ContextOverflow):
        feed(b, s, 6)
    assert b.length == 45


# --- what each policy keeps -------------------------------------------------------------------

def planted(n: int, seed: int):
    """A stream of small-noise keys and orthonormal directions u [4, D] to plant."""
    s = Stream(n, seed=seed, scale=0.1)
    u = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(seed)))[0].T[:4]
    return s, u


def test_streaming_keeps_sinks_and_last_window():
    s = Stream(256, seed=7)
    a = sparse("streaming", budget=32)
    feed(a, s, 100)
    a.upkeep()
    want = torch.cat([torch.arange(4), torch.arange(100 - 28, 100)])
    for l in range(L):
        assert torch.equal(a.selected_positions(l), want.expand(HKV, -1))


def test_chunk_topk_picks_the_planted_chunk_and_follows_the_queries():
    s, u = planted(256, seed=8)
    lo, c = 4, 8
    c0 = torch.arange(lo + 5 * c, lo + 6 * c)            # head 0's chunk: keys along u0
    c1 = torch.arange(lo + 9 * c, lo + 10 * c)           # head 1's chunk: keys along u1
    c2 = torch.arange(lo + 14 * c, lo + 15 * c)          # head 0's later chunk: keys along u2
    s.k[:, 0, c0] += 3 * u[0]
    s.k[:, 1, c1] += 3 * u[1]
    s.k[:, 0, c2] += 3 * u[2]
    s.q[:, :G, :150] += 2 * u[0]                         # group 0 queries look for u0 ...
    s.q[:, :G, 150:] += 2 * u[2]                         # ... then for u2
    s.q[:, G:] += 2 * u[1]
    a = sparse("chunk_topk", budget=16, sink=4, window=4, chunk=8, reselect_interval=16)  # m = one chunk
    feed(a, s, 150)
    a.upkeep()
    for l in range(L):
        sel = a.selected_positions(l)
        assert torch.equal(sel[0, 4:12], c0) and torch.equal(sel[1, 4:12], c1)
    for _ in range(16):
        feed(a, s, 1)
    assert a.upkeep()                                    # R tokens appended: re-selected, not once
    for l in range(L):
        sel = a.selected_positions(l)
        assert torch.equal(sel[0, 4:12], c2) and torch.equal(sel[1, 4:12], c1)


def test_chunk_topk_keeps_whole_chunks():
    s, u = planted(256, seed=9)
    s.k[:, 0, 44:52] += 3 * u[0]
    s.q[:, :G] += 2 * u[0]
    a = sparse("chunk_topk", budget=40, sink=4, window=4, chunk=8)  # m = 4 chunks
    feed(a, s, 200)
    a.upkeep()
    for l in range(L):
        sel = a.selected_positions(l)
        assert set(range(44, 52)) <= set(sel[0].tolist())
        for h in range(HKV):
            mid = sel[h, 4:-4]
            chunks = set(((mid - 4) // 8).tolist())
            assert len(chunks) == 4
            assert sorted(mid.tolist()) == sorted(4 + 8 * ch + o for ch in chunks for o in range(8))


def test_chunk_topk_without_queries_uses_the_last_key():
    g = torch.Generator().manual_seed(10)
    keys = torch.randn(HKV, 100, D, generator=g) * 0.1
    u = torch.linalg.qr(torch.randn(D, D, generator=g))[0].T
    keys[:, 20:28] += 3 * u[0]
    keys[:, 99] = u[0]
    ctx = SelectionContext(layer=0, length=100, keys=keys, queries=None, query_positions=None,
                           group_size=G, chunk=8, lo=4, hi=96, m=8)
    chosen = get_policy("chunk_topk")().choose(ctx)
    assert chosen.shape == (HKV, 8)
    assert [sorted(row) for row in chosen.tolist()] == [list(range(20, 28))] * HKV


@pytest.mark.parametrize("policy", SPARSE)
def test_policies_return_distinct_positions_in_the_middle(policy):
    g = torch.Generator().manual_seed(15)
    for n, lo, win, m, chunk in [(50, 4, 4, 12, 8), (61, 0, 0, 30, 8), (100, 3, 5, 1, 7), (40, 4, 4, 31, 8)]:
        keys = torch.randn(HKV, n, D, generator=g)
        q = torch.randn(H, 5, D, generator=g)
        ctx = SelectionContext(layer=0, length=n, keys=keys, queries=q, query_positions=torch.arange(n - 5, n),
                               group_size=G, chunk=chunk, lo=lo, hi=n - win, m=m)
        chosen = get_policy(policy)().choose(ctx)
        assert chosen.shape == (HKV, m) and chosen.dtype == torch.int64
        assert int(chosen.min()) >= lo and int(chosen.max()) < n - win
        assert all(len(set(row)) == m for row in chosen.tolist())


def test_snapkv_picks_planted_high_attention_positions():
    s, u = planted(256, seed=11)
    for p in (37, 90):
        s.k[:, 0, p] += 4 * u[0]
    s.k[:, 1, 61] += 4 * u[1]
    s.q[:, :G] += 2 * u[0]
    s.q[:, G:] += 2 * u[1]
    a = sparse("snapkv", budget=22, sink=4, window=4, obs_window=16)  # m = 14: two pooled peaks
    feed(a, s, 160)
    a.upkeep()
    for l in range(L):
        sel = a.selected_positions(l)
        assert {37, 90} | set(range(34, 41)) <= set(sel[0].tolist())
        assert set(range(58, 65)) <= set(sel[1].tolist())


# --- invariant 5 and memory -------------------------------------------------------------------

@pytest.mark.parametrize("policy", SPARSE)
def test_device_entries_stay_bounded_over_200_decode_steps(policy):
    s, drafts = Stream(600, seed=12), Stream(600, seed=13)
    k = 4
    a = sparse(policy, capacity=600, budget=32, reselect_interval=8, max_draft=k)
    feed(a, s, 50)
    rng = random.Random(1)
    steps = 0
    while steps < 200:
        if a.upkeep() or a.room() < k + 1:               # once per round, as the engine does
            assert a.device_entries() <= a.budget
        assert a.room() >= k + 1
        base = a.length
        for _ in range(k):                               # draft k tokens
            feed(a, drafts, 1)
            check_invariant(a)
            steps += 1
        a.truncate(base + rng.randint(0, k))             # verifier accepted some
        feed(a, s, 1)                                    # the recovered / bonus token
        check_invariant(a)
        steps += 1
    assert a.selections > 10


def test_device_and_host_bytes_are_exact():
    cap, budget, hkv, d = 2048, 64, 3, 64
    for dtype in (torch.float32, torch.bfloat16):
        elt = torch.empty((), dtype=dtype).element_size()
        cfg = SparseConfig(policy="chunk_topk", budget=budget)
        a = SparseKVCache(L, 9, hkv, d, cap, cfg, dtype=dtype)
        rows = budget + cfg.tail_cap
        assert a.device_bytes() == L * (2 * hkv * rows * d * elt + hkv * rows * 8)
        assert a.device_bytes() == sum(t.numel() * t.element_size() for t in a.dev_k + a.dev_v + a.dev_pos)
        assert a.host_bytes() == L * 2 * hkv * cap * d * elt
        assert a.obs_bytes() == L * 9 * (cfg.obs_window + cfg.tail_cap) * d * elt   # query rings
        assert SparseKVCache(L, 9, hkv, d, cap, SparseConfig("streaming", budget), dtype=dtype).obs_bytes() == 0
        f = SparseKVCache(L, 9, hkv, d, cap, SparseConfig(policy="full", budget=None), dtype=dtype)
        ref = FullKVCache(L, hkv, d, cap, dtype=dtype)
        assert f.device_bytes() == ref.device_bytes() == L * 2 * hkv * cap * d * elt
        assert f.host_bytes() == 0
        assert a.device_bytes() * 8 < f.device_bytes()


def test_full_policy_behaves_as_a_full_cache():
    s = Stream(128, seed=14)
    a = sparse("full", capacity=128, budget=None)
    feed(a, s, 30)
    assert a.budget is None and a.tail_cap == 0
    assert not a.upkeep() and a.device_entries() == 30 and a.room() == 98
    a.truncate(25)
    assert a.length == 25 and a.selected_positions(0).shape == (HKV, 25)


# --- with a model -----------------------------------------------------------------------------

def tiny_model() -> LlamaModel:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, max_position_embeddings=512)
    return LlamaModel(cfg).eval()


@pytest.mark.parametrize("policy", SELF_SELECTING)
@torch.no_grad()
def test_model_logits_match_full_cache_when_budget_covers(policy):
    model = tiny_model()
    cfg = SparseConfig(policy=policy, budget=None if policy == "full" else 64, reselect_interval=4, max_draft=4)
    a, b = SparseKVCache.for_model(model, 128, cfg), FullKVCache.for_model(model, 128)
    prompt = torch.randint(0, 64, (1, 30), generator=torch.Generator().manual_seed(0))
    la, lb = model(prompt, a), model(prompt, b)
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
    a.upkeep()
    for _ in range(25):
        tok = lb[:, -1:].argmax(-1)
        a.upkeep()
        la, lb = model(tok, a), model(tok, b)
        torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy", SPARSE)
@torch.no_grad()
def test_model_decodes_under_a_small_budget(policy):
    model = tiny_model()
    cfg = SparseConfig(policy=policy, budget=16, reselect_interval=8, max_draft=4)
    a = SparseKVCache.for_model(model, 256, cfg)
    logits = model(torch.randint(0, 64, (1, 100), generator=torch.Generator().manual_seed(1)), a)
    a.upkeep()
    for _ in range(40):
        if a.upkeep():
            assert a.device_entries() <= 16
        logits = model(logits[:, -1:].argmax(-1), a)
        check_invariant(a)
        assert torch.isfinite(logits).all()
    assert a.length == 140


# --- local (sliding window) layers --------------------------------------------------------------

def _windowed_reference(s: Stream, layer: int, start: int, t: int, window: int | None) -> torch.Tensor:
    """Dense attention of the queries at [start, start + t) over every earlier key, masked to
    the layer's sliding window (None: causal only)."""
    from sparsespec.kernels.attention import attend, causal_block_mask
    end = start + t
    mask = causal_block_mask(torch.tensor([start]), t, end, window)
    return attend(s.q[layer, :, start:end][None], s.k[layer, :, :end][None], s.v[layer, :, :end][None], mask)


@pytest.mark.parametrize("policy,budget", [("streaming", 12), ("chunk_topk", 24), ("full", None)])
def test_local_layers_keep_their_window_exactly_under_any_budget(policy, budget):
    """A local layer's view is its window, whatever the budget: its attention equals the dense
    windowed reference exactly through prefill, decode, multi-token forwards, re-selections and a
    rollback; the budget (and the policy) shape only the global layer."""
    windows = (5, None)
    cache = SparseKVCache(L, H, HKV, D, 256, SparseConfig(policy=policy, budget=budget,
                                                          reselect_interval=4, max_draft=8),
                          layer_windows=windows)
    s = Stream(200, seed=3)
    worst = [0.0, 0.0]
    n = 0
    for step, t in enumerate([30, 1, 1, 3, 1, 1, 1, 5, 1, 2, 1, 1, 4, 1, 1]):
        cache.upkeep()
        for layer, out in enumerate(feed(cache, s, t)):
            ref = _windowed_reference(s, layer, n, t, windows[layer])
            worst[layer] = max(worst[layer], (out - ref).abs().max().item())
        n += t
        if step == 4:                       # a rejected draft of 2
            cache.truncate(n - 2)
            n -= 2
    assert worst[0] < 1e-5, worst                     # the local layer: exact
    if policy == "full":
        assert worst[1] < 1e-5
    else:
        assert worst[1] > 1e-3                          # the global layer is budgeted (not exact)
        assert cache.device_entries(0) <= 5 + cache.tail_cap
        assert cache.device_entries(1) <= budget + cache.tail_cap


def test_layer_windows_are_validated():
    with pytest.raises(InvalidArgument, match="^layer_windows: "):
        SparseKVCache(L, H, HKV, D, 64, SparseConfig(policy="streaming", budget=16), layer_windows=(4,))
    with pytest.raises(InvalidArgument, match="^layer_windows: "):
        SparseKVCache(L, H, HKV, D, 64, SparseConfig(policy="streaming", budget=16), layer_windows=(0, None))

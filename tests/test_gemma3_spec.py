"""Speculation on Gemma 3 (local sliding-window layers + global layers): every path the Llama
tests cover, on a tiny random Gemma 3 (6 layers, every 3rd global, window 16).

The drafter's sparse cache keeps a local layer's window exactly and budgets only the global
layers (kvstore/cache/sparse.py), so: greedy output equals AR for every policy, budget and k; a
`same` drafter whose budget covers the context is the verifier itself (every draft accepted); the
sampling chi-square holds with feeding on; and the services (a fed drafter, a text prompt that
needs its BOS) give the verifier's own tokens.
"""

from __future__ import annotations

import pytest
import torch

from equality import assert_greedy_equal
from kvstore.cache.sparse import SparseConfig
from sparsespec.build import EngineConfig, build_engine
from sparsespec.models import load_model, load_tokenizer
from sparsespec.models.testing import random_model, save_random_model, tiny_gemma3_config
from sparsespec.spec.drafter_host import DrafterHost, DrafterHostConfig, LocalDrafterClient
from sparsespec.spec.loop import GenerationRequest, SpecEngine
from sparsespec.tokens import encode_prompt

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

POLICIES = ("streaming", "chunk_topk", "snapkv", "verifier_guided", "fed")
PROMPT_LEN, NEW = 60, 40          # > 3 windows of 16 before decoding starts


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    return save_random_model(tmp_path_factory.mktemp("gemma3spec") / "tiny", tiny_gemma3_config(), seed=3)


@pytest.fixture(scope="module")
def gemma(gemma_dir):
    return load_model(gemma_dir, max_context=256).eval()


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(3, 128, (PROMPT_LEN,), generator=torch.Generator().manual_seed(11)).tolist()


@pytest.fixture(scope="module")
def ar(gemma, prompt):
    return SpecEngine(gemma, None).generate(GenerationRequest(prompt, NEW, mode="ar")).token_ids


def spec(gemma_dir, gemma, prompt, policy, budget, k, **req):
    engine, _ = build_engine(EngineConfig(model=str(gemma_dir), drafter="same", policy=policy, budget=budget,
                                          max_context=256), verifier=gemma)
    return engine.generate(GenerationRequest(prompt, NEW, k=k, **req))


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("budget", [12, 40])
@pytest.mark.parametrize("policy", POLICIES)
def test_greedy_equals_ar_for_every_policy_budget_and_k(gemma_dir, gemma, prompt, ar, policy, budget, k):
    out = spec(gemma_dir, gemma, prompt, policy, budget, k)
    assert_greedy_equal(gemma, prompt, ar, out.token_ids, f"gemma3 {policy} B={budget} k={k}")
    assert out.metrics.drafted > 0 and out.metrics.drafter_failures == 0
    if policy == "fed":
        assert out.metrics.feeds_sent > 0


@pytest.mark.parametrize("policy", ["fed", "chunk_topk", "full"])
def test_a_same_drafter_covering_the_context_is_the_verifier(gemma_dir, gemma, prompt, ar, policy):
    """Budget >= context: the global layers keep everything and the local ones their window,
    exactly, so the drafter computes the verifier's own logits and every draft is accepted. (A
    cache that let local layers see past their window would be a different model: rejections.)"""
    out = spec(gemma_dir, gemma, prompt, policy, 256 if policy != "full" else None, 4)
    assert out.token_ids == ar
    m = out.metrics
    assert m.drafted > 0 and m.accepted == m.drafted, (m.accepted, m.drafted)


def test_fed_drafter_holds_windows_not_the_context(gemma_dir, gemma, prompt):
    """The fed drafter's device view: a local layer holds at most its window + tail, a global
    one at most the budget + tail; no host tier."""
    engine, _ = build_engine(EngineConfig(model=str(gemma_dir), drafter="same", policy="fed", budget=24,
                                          max_context=256), verifier=gemma)
    seen = []
    host = engine.drafter.host
    draft_many = host.draft_many

    def drafting(calls):
        replies = draft_many(calls)
        seen.extend(host.drafter(c.session).cache for c in calls)
        return replies

    host.draft_many = drafting
    engine.generate(GenerationRequest(prompt, NEW, k=4))
    cache = seen[-1]
    windows = gemma.cfg.layer_windows
    assert any(w is None for w in windows) and any(w is not None for w in windows)
    for layer, w in enumerate(windows):
        assert 0 < cache.device_entries(layer) <= (24 if w is None else w) + cache.tail_cap
        assert cache.dev_k[layer].shape[1] == (24 if w is None else w) + cache.tail_cap
    assert cache.host_bytes() == 0


def test_sampling_with_feeding_matches_exact_on_gemma3():
    """The chi-square test of test_spec_sampling on a Gemma 3 whose window (4) slides inside the
    7-token prompt, with a fed bf16 drafter of budget 4 (5,000 draws: ~80 per cell of the 64)."""
    import test_spec_sampling as ss
    from sparsespec.models.quant import drafter_weights
    verifier = random_model(tiny_gemma3_config(vocab_size=ss.VOCAB, sliding_window=4, num_layers=3), seed=11,
                            std=0.5).eval()
    exact = ss.exact_distribution(verifier).flatten()
    host = DrafterHost(drafter_weights(verifier, "bf16"), DrafterHostConfig(SparseConfig(policy="fed", budget=4), 16))
    engine = SpecEngine(verifier, LocalDrafterClient(host), max_batch=ss.BATCH)
    counts = ss.sample_counts(engine, "spec", max_tokens=3, draws=5_000)   # a quarter of the Llama test's (CI time)
    assert ss.chi_square_pvalue(counts, exact) > 1e-3


def test_gemma3_through_the_services_with_a_fed_drafter(gemma_dir, redis_srv):
    """`sparsespec up` on a Gemma 3: the fed drafter's output is the verifier's, and a text
    prompt gets the BOS the tokenizer asks for (the verifier once encoded it without)."""
    from sparsespec.client import SparseSpecClient
    from sparsespec.cluster import ClusterConfig, LocalCluster
    text = "In the beginning God created the heaven and the earth. And the earth was without form, and void."
    model, tok = load_model(gemma_dir).eval(), load_tokenizer(gemma_dir)
    ids = encode_prompt(tok, text)
    assert ids[0] == tok.bos_token_id
    want = SpecEngine(model, None).generate(GenerationRequest(ids, 32, mode="ar")).token_ids
    redis_srv.start()
    with LocalCluster(ClusterConfig(model=str(gemma_dir), budget="16", k=4), redis_url=redis_srv.url) as c:
        with SparseSpecClient(c.address) as client:
            out = client.generate(text, max_tokens=32)
    assert_greedy_equal(model, ids, want, out.token_ids, "gemma3 services")
    assert out.metrics["feeds_sent"] > 0 and out.metrics["drafter_failures"] == 0


@pytest.mark.parametrize("policy", ["fed", "chunk_topk"])
def test_greedy_equals_ar_through_the_verifiers_rings(gemma_dir, policy):
    """The verifier keeps a local layer as a ring of R = W - 1 + SB = 81 slots (W = 16, SB = 66):
    a prompt of more than 3R, prefilled in sub-blocks of SB that wrap the ring several times, then
    speculation (a fed drafter fed from the rings, an own-KV one) equal to AR."""
    model = load_model(gemma_dir, max_context=512).eval()
    prompt = torch.randint(3, 128, (260,), generator=torch.Generator().manual_seed(5)).tolist()
    ar_engine = SpecEngine(model, None, max_context=512)
    cache = ar_engine.verifier.cache
    R = 16 - 1 + 66
    assert [cache.slots[i] for i, w in enumerate(model.cfg.layer_windows) if w is not None] == [R] * 4
    assert cache.device_bytes() == cache.batch * model.cfg.kv_bytes(cache.capacity, 4, cache.capacity)
    ar = ar_engine.generate(GenerationRequest(prompt, NEW, mode="ar")).token_ids
    engine, _ = build_engine(EngineConfig(model=str(gemma_dir), drafter="same", policy=policy, budget=24,
                                          max_context=512), verifier=model)
    out = engine.generate(GenerationRequest(prompt, NEW, k=4))
    assert_greedy_equal(model, prompt, ar, out.token_ids, f"gemma3 rings {policy}")
    assert out.metrics.drafted > 0 and out.metrics.drafter_failures == 0
    if policy == "fed":
        assert out.metrics.feeds_sent > 0
    # a long rollback the ring cannot serve: a new turn that diverges early re-prefills, exactly
    v = engine.verifier
    assert not v.can_commit(0, 100)
    turn = prompt[:100] + [7, 8, 9] + prompt[103:200]
    want = SpecEngine(model, None, max_context=512).generate(GenerationRequest(turn, 8, mode="ar")).token_ids
    run = engine.start(GenerationRequest(turn, 8, mode="ar"), 0, cached=100)
    while not run.done:
        engine.step([run])
    engine.release(run)
    res = engine.finish(run)
    assert res.token_ids == want and res.metrics.reused_prefix_tokens == 0


@pytest.mark.parametrize("policy", ["chunk_topk", "full"])
def test_drafter_adopts_a_prefix_from_the_verifiers_rings(gemma, policy):
    """What the benches do: a drafter starts from the verifier's K/V of a prompt's first n
    tokens (a local layer gives only what its ring holds) and computes the rest; its logits are
    those of a drafter that prefilled everything itself."""
    from sparsespec.spec.drafter import Drafter
    from sparsespec.spec.verifier import Verifier
    prompt = torch.randint(3, 128, (250,), generator=torch.Generator().manual_seed(9)).tolist()
    verifier = Verifier(gemma, 256)
    verifier.prefill(0, prompt)
    n = len(prompt) - 64
    kv = [verifier.kv(0, layer, n) for layer in range(gemma.cfg.num_layers)]
    starts = [s for _, _, s in kv]
    assert max(starts) > 0 and min(starts) == 0        # the local layers' rings went round
    sparse = SparseConfig(policy=policy, budget=None if policy == "full" else 32)
    own, adopted = Drafter(gemma, sparse, 256), Drafter(gemma, sparse, 256)
    own.start(prompt)
    adopted.start_from([k for k, _, _ in kv], [v for _, v, _ in kv], prompt, n)
    assert torch.allclose(own._last_logits, adopted._last_logits, atol=1e-5)


LONG = 16_384


def test_greedy_equals_ar_at_16k_in_process_and_through_the_services(tmp_path, redis_srv):
    """Issue #17's range end to end on a tiny Gemma 3 that admits 16K positions: a 16,384-token
    prompt through the verifier's rings (window 16, so each local layer wraps its ring ~200 times)
    and the global layers' full rows; a fed drafter (budget 64) in process and through `sparsespec
    up` gives AR's tokens. (The packaged 270M at 16K: docs/gemma3, 78 greedy runs equal to AR.)"""
    from sparsespec.client import SparseSpecClient
    from sparsespec.cluster import ClusterConfig, LocalCluster
    cfg = tiny_gemma3_config(max_position_embeddings=32_768)
    model_dir = save_random_model(tmp_path / "gemma3-32k", cfg, seed=3)
    model = load_model(model_dir, max_context=LONG + 64).eval()
    prompt = torch.randint(3, 128, (LONG,), generator=torch.Generator().manual_seed(16)).tolist()
    ar = SpecEngine(model, None, max_context=LONG + 64).generate(GenerationRequest(prompt, 24, mode="ar")).token_ids
    engine, _ = build_engine(EngineConfig(model=str(model_dir), drafter="same", policy="fed", budget=64,
                                          max_context=LONG + 64), verifier=model)
    out = engine.generate(GenerationRequest(prompt, 24, k=4))
    assert_greedy_equal(model, prompt, ar, out.token_ids, "gemma3 16K in process")
    assert out.metrics.drafted > 0 and out.metrics.feeds_sent > 0
    redis_srv.start()
    with LocalCluster(ClusterConfig(model=str(model_dir), budget="64", k=4, max_context=LONG + 64, max_batch=2),
                      redis_url=redis_srv.url) as c:
        with SparseSpecClient(c.address) as client:
            served = client.generate(prompt, max_tokens=24)
    assert_greedy_equal(model, prompt, ar, served.token_ids, "gemma3 16K services")
    assert served.metrics["drafted"] > 0 and served.metrics["feeds_sent"] > 0 and served.metrics["drafter_failures"] == 0

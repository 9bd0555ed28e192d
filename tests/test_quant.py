"""Drafter weights (same / bf16 / int8 / int4): close logits, exact byte counts, lossless speculation.

Tolerances are on the tiny random model's logits against the fp32 model's, relative to the
reference logits' std (~2): mean |err| / std <= 0.05 (bf16), 0.1 (int8), 0.5 (int4: 16 levels per
group of random Gaussian weights); max |err| / std <= 0.5, 1.0, 4.0. Measured: 0.005-0.016,
0.008-0.029, 0.08-0.30 (mean) untied-tied. The int4 / int8 models are also checked against an fp32
model holding their own dequantized weights with the bf16 bounds: the kernels multiply by exactly
the weights they claim, and the loose int4 bound is quantization, not a wiring error.
"""

from __future__ import annotations

import copy

import pytest
import torch

from equality import assert_greedy_equal
from kvstore.cache.full import FullKVCache
from kvstore.cache.sparse import SparseConfig
from sparsespec.errors import InvalidArgument
from sparsespec.models.quant import (DRAFTER_WEIGHTS, INT4_GROUP, Int4Linear, Int8Linear, check_drafter_weights,
                                     drafter_weights, weight_bytes)
from sparsespec.models.testing import random_model, tiny_config
from sparsespec.models.truncate import layer_truncated
from sparsespec.spec.drafter_host import DrafterHost, DrafterHostConfig, LocalDrafterClient
from sparsespec.spec.loop import GenerationRequest, SpecEngine
from sparsespec.spec.sampling import SamplingParams

TOL = {"bf16": (0.05, 0.5), "int8": (0.1, 1.0), "int4": (0.5, 4.0)}  # (mean, max) |logit error| / std
QUANT = {"int8": (Int8Linear, torch.int8), "int4": (Int4Linear, torch.uint8)}


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def model(request):
    return tiny_model(tie_word_embeddings=request.param)


def tiny_model(**overrides):
    return random_model(tiny_config(max_position_embeddings=1024, eos_token_ids=(), **overrides), seed=0)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(0))   # [B, T]


@torch.inference_mode()
def logits(model, ids):
    return model(ids, FullKVCache.for_model(model, ids.shape[1], batch=ids.shape[0]))  # [B, T, V]


def assert_close(out, ref, mean, top, label):
    """mean and max |out - ref| within `mean` and `top` times ref's std."""
    err = (out - ref).abs() / ref.std()
    assert out.dtype == torch.float32, label
    assert err.mean() <= mean and err.max() <= top, f"{label}: mean {err.mean():.3g} max {err.max():.3g} (x std)"


def linears(model):
    """The quantized layers in the order a forward reads them."""
    for b in model.layers:
        yield from (b.self_attn._packed, b.self_attn.o_proj, b.mlp._packed, b.mlp.down_proj)
    yield model.lm_head


def dequantized_reference(verifier, quant):
    """An fp32 copy of `verifier` whose matmuls use `quant`'s dequantized weights."""
    ref = copy.deepcopy(verifier)
    if ref.cfg.tie_word_embeddings:  # the quantized head is its own copy: untie the reference
        ref.lm_head.weight = torch.nn.Parameter(ref.lm_head.weight.detach().clone(), requires_grad=False)
    with torch.no_grad():
        for rb, qb in zip(ref.layers, quant.layers):
            a, m = rb.self_attn, rb.mlp
            for layers, q in (((a.q_proj, a.k_proj, a.v_proj), qb.self_attn._packed), ((a.o_proj,), qb.self_attn.o_proj),
                              ((m.gate_proj, m.up_proj), qb.mlp._packed), ((m.down_proj,), qb.mlp.down_proj)):
                w = q.dequantized()
                for layer, part in zip(layers, w.split([l.weight.shape[0] for l in layers])):
                    layer.weight.copy_(part)
        ref.lm_head.weight.copy_(quant.lm_head.dequantized())
    return ref


@pytest.mark.parametrize("weights", ["bf16", "int8", "int4"])
def test_logits_close_to_fp32(model, ids, weights):
    ref = logits(model, ids)
    before = [p.clone() for p in model.parameters()]
    d = drafter_weights(model, weights)
    assert d is not model and d.dtype == torch.bfloat16
    dtypes = {t.dtype for t in (*d.parameters(), *d.buffers())}
    assert torch.float32 not in dtypes, f"{weights}: an fp32 tensor is left: {dtypes}"
    assert_close(logits(d, ids), ref, *TOL[weights], weights)
    if weights in QUANT:  # really quantized, not a silent fp32 / bf16 fallback
        cls, dtype = QUANT[weights]
        assert all(type(l) is cls and l.qweight.dtype == dtype for l in linears(d))
        assert_close(logits(d, ids), logits(dequantized_reference(model, d), ids), *TOL["bf16"], f"{weights} vs its weights")
    else:
        assert d.cfg.tie_word_embeddings == (d.lm_head.weight is d.embed_tokens.weight)
    # the verifier is untouched (same tensors, same values, same logits)
    assert all(torch.equal(a, b) and a.dtype == torch.float32 for a, b in zip(model.parameters(), before))
    assert torch.equal(logits(model, ids), ref)


def test_same_is_the_model_and_unknown_is_refused(model):
    assert drafter_weights(model, "same") is model
    with pytest.raises(InvalidArgument) as e:
        drafter_weights(model, "int3")
    assert e.value.field == "drafter_weights" and all(w in str(e.value) for w in DRAFTER_WEIGHTS)
    for w in DRAFTER_WEIGHTS:
        check_drafter_weights(w)
    with pytest.raises(InvalidArgument, match="drafter_weights"):
        check_drafter_weights("fp8")


def test_weight_bytes_exact_and_ordered(model):
    cfg = model.cfg
    c, v, layers = cfg.hidden_size, cfg.vocab_size, cfg.num_layers
    mats = [((cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, c), (c, cfg.num_heads * cfg.head_dim),
            (2 * cfg.intermediate_size, c), (c, cfg.intermediate_size)]           # [N, K] per block
    norms = (2 * layers + 1) * c
    dense = sum(n * k for n, k in mats) * layers + norms + v * c * (1 if cfg.tie_word_embeddings else 2)
    int8 = sum(n * k + 2 * n for n, k in mats) * layers + v * c + 2 * v
    int4 = sum(n * k // 2 + 4 * n * (k // INT4_GROUP) for n, k in mats) * layers + v * c // 2 + 4 * v * (c // INT4_GROUP)
    sizes = {w: weight_bytes(drafter_weights(model, w)) for w in DRAFTER_WEIGHTS}
    emb_norms = 2 * (v * c + norms)                                   # bf16 embedding and norms
    assert sizes == {"same": 4 * dense, "bf16": 2 * dense, "int8": int8 + emb_norms, "int4": int4 + emb_norms}
    assert sizes["same"] > sizes["bf16"] > sizes["int8"] > sizes["int4"]


def test_composes_with_layer_truncation(model, ids):
    cut = layer_truncated(model, 1)
    d = drafter_weights(cut, "int8")
    assert len(d.layers) == 1 and d.cfg.num_layers == 1
    assert weight_bytes(d) < weight_bytes(drafter_weights(layer_truncated(model, 2), "int8"))
    assert_close(logits(d, ids), logits(cut, ids), *TOL["int8"], "layers:1 int8")


def test_representable_weights_come_back_exactly():
    """Weights already on the format's grid (as a Q4_1 GGUF's are for int4: w = d * q + m per
    group of 32) are stored exactly; this pins the kernels' layouts (scale per row, (scale, zero)
    per group and row), which a check through the kernel alone would not."""
    g = torch.Generator().manual_seed(0)
    n, k = 48, 96
    q4 = torch.randint(0, 16, (n, k), generator=g)
    q4[:, 0::INT4_GROUP], q4[:, 1::INT4_GROUP] = 0, 15                  # every group spans the grid
    step = torch.randint(1, 9, (n, k // INT4_GROUP, 1), generator=g) / 64   # bf16-exact d, zero
    zero = torch.randint(-16, 17, (n, k // INT4_GROUP, 1), generator=g) / 16
    w4 = ((q4.view(n, -1, INT4_GROUP) - 8) * step + zero).view(n, k)
    assert torch.equal(Int4Linear(w4).dequantized(), w4)
    q8 = torch.randint(-127, 128, (n, k), generator=g)
    q8[:, 0] = 127
    w8 = q8 * (torch.randint(1, 9, (n, 1), generator=g) / 256)
    assert torch.equal(Int8Linear(w8).dequantized(), w8)


def test_int4_pads_rows_and_refuses_odd_inputs():
    w = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))     # 40 rows: the pack needs 16k
    layer, x = Int4Linear(w), torch.randn(3, 5, 64).bfloat16()
    out = layer(x)
    assert out.shape == (3, 5, 40) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), x.float() @ layer.dequantized().t(), rtol=2e-2, atol=5e-2)
    with pytest.raises(InvalidArgument, match="drafter_weights"):
        Int4Linear(torch.randn(16, 48))


# --- lossless speculation ----------------------------------------------------------------

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def verifier():
    return tiny_model()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in (150, 230)]


@pytest.fixture(scope="module")
def ar_tokens(verifier, prompts):
    return [SpecEngine(verifier, None).generate(GenerationRequest(p, MAX_TOKENS, mode="ar")).token_ids for p in prompts]


def spec_engine(verifier, weights):
    host = DrafterHost(drafter_weights(verifier, weights),
                       DrafterHostConfig(SparseConfig(policy="chunk_topk", budget=32), verifier.max_context))
    return SpecEngine(verifier, LocalDrafterClient(host), max_batch=2)


@pytest.mark.parametrize("weights", DRAFTER_WEIGHTS)
def test_greedy_equals_ar(verifier, prompts, ar_tokens, weights):
    eng, accepted = spec_engine(verifier, weights), 0
    for k in (2, 4):
        outs = eng.generate_many([GenerationRequest(p, MAX_TOKENS, k=k) for p in prompts])
        for p, ref, out in zip(prompts, ar_tokens, outs):
            assert_greedy_equal(verifier, p, ref, out.token_ids, f"{weights}/k={k}")
            accepted += out.metrics.accepted
    assert accepted > 0, f"{weights}: no draft was ever accepted"


def test_sampling_runs(verifier, prompts):
    eng = spec_engine(verifier, "int4")
    req = GenerationRequest(prompts[0], MAX_TOKENS, k=4, sampling=SamplingParams(temperature=1.0, seed=0))
    out = eng.generate(req)
    assert len(out.token_ids) == MAX_TOKENS and all(0 <= t < 128 for t in out.token_ids)
    assert out.metrics.drafted > 0

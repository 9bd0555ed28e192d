"""BudgetDraft training on tiny random models: it learns, its views are inference's, it resumes exactly,
and bad input fails before any compute."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from kvstore.cache.sparse import SparseKVCache
from sparsespec.models import load_model
from sparsespec.models.testing import save_random_model, tiny_config
from sparsespec.train.cache import ContinuationCache
from sparsespec.train.checkpoint import checkpoints
from sparsespec.train.config import TrainConfig
from sparsespec.train.losses import objective_loss
from sparsespec.train.prepare import plan
from sparsespec.train.teacher import Targets
from sparsespec.train.trainer import Trainer
from sparsespec.train.views import prefix_views, sparse_config

WORDS = ("the lord said unto moses and aaron go in to pharaoh king of egypt that he let the children "
         "of israel out of his land and the waters were turned to blood in all the river").split()


def write_docs(d, count=6, chars=1400, seed=0):
    """Plain-text documents from a word-level Markov-ish walk (ASCII: the char tokenizer's vocabulary)."""
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        words, w = [], rng.randrange(len(WORDS))
        while sum(len(x) + 1 for x in words) < chars:
            w = (w + rng.choice((1, 1, 2, 5))) % len(WORDS)
            words.append(WORDS[w])
        (d / f"doc{i}.txt").write_text(" ".join(words) + "\n")
    return d


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    verifier = save_random_model(root / "verifier", tiny_config(max_position_embeddings=512, eos_token_ids=()),
                                 seed=5)
    return root, verifier, write_docs(root / "docs")


def config(tiny, **kw) -> TrainConfig:
    _, verifier, docs = tiny
    base = dict(verifier=str(verifier), drafter="layers:1", data=str(docs), heldout_docs=2, prefix=200,
                continuation=32, windows=8, heldout_windows=4, steps=16, lr=3e-3, warmup=2,
                budgets={32: 0.5, 64: 0.5}, top_k=8, freeze_embeddings=False, save_every=100)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def trained(tiny):
    root = tiny[0]
    trainer = Trainer(plan(config(tiny)), root / "run", root / "teacher", progress=False)
    return trainer, trainer.run()


def test_training_lowers_loss_and_raises_heldout_acceptance(trained):
    _, summary = trained
    steps = [h for h in summary["history"] if "loss" in h]
    evals = [h for h in summary["history"] if "heldout" in h]
    assert len(steps) == 16 and evals[0]["step"] == 0 and evals[-1]["step"] == 16
    first = sum(h["loss"] for h in steps[:4]) / 4
    last = sum(h["loss"] for h in steps[-4:]) / 4
    assert last < 0.8 * first, (first, last)
    before, after = evals[0]["heldout"], evals[-1]["heldout"]
    for budget in ("128", "full"):                      # 128 < prefix 200: a real sparse view
        assert after[budget]["greedy"] > before[budget]["greedy"] + 0.05, (budget, before, after)


def test_soft_objective_raises_sampling_acceptance(tiny):
    """The hard target sharpens the drafter (greedy acceptance up, sampling acceptance down on a
    flat teacher); tv trains sum min(p, q) itself."""
    root = tiny[0]
    summary = Trainer(plan(config(tiny, objective="tv")), root / "tv", root / "teacher", progress=False).run()
    evals = [h["heldout"] for h in summary["history"] if "heldout" in h]
    for budget in ("128", "full"):
        assert evals[-1][budget]["sampling"] > evals[0][budget]["sampling"] + 0.05, (budget, evals[0], evals[-1])


def test_checkpoint_is_a_drafter_dir_holding_the_trained_weights(trained):
    trainer, summary = trained
    ckpt = checkpoints(trainer.out)[-1]
    assert ckpt.name == "checkpoint-16"
    for f in ("config.json", "model.safetensors", "tokenizer.json", "trainer_state.pt", "train_config.json"):
        assert (ckpt / f).is_file(), f
    loaded = load_model(ckpt)
    trained_state = trainer.model.state_dict()
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, trained_state[name]), name
    init = load_model(trainer.plan.verifier_dir, num_layers=1).state_dict()
    assert not torch.equal(init["layers.0.self_attn.q_proj.weight"], trained_state["layers.0.self_attn.q_proj.weight"])


def test_resume_equals_uninterrupted_training(tiny):
    root = tiny[0]
    cfg = config(tiny, steps=6, save_every=3, lam=0.5, views_per_step=2)
    whole = Trainer(plan(cfg), root / "whole", root / "teacher", progress=False)
    whole.run()
    part = Trainer(plan(cfg), root / "part", root / "teacher", progress=False)
    part.run(stop_after=3)
    assert [p.name for p in checkpoints(root / "part")] == ["checkpoint-3"]
    resumed = Trainer(plan(cfg), root / "part", root / "teacher", progress=False)
    summary = resumed.run(resume=True)
    assert summary["steps_done"] == 6
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = whole.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[i][key], sb[i][key]), (i, key)
    loss = lambda s: [h["loss"] for h in s["history"] if "loss" in h]
    assert loss(json.loads((root / "whole" / "summary.json").read_text())) == loss(summary)


def test_resume_refuses_a_different_config(tiny):
    root = tiny[0]
    Trainer(plan(config(tiny, steps=4, save_every=2)), root / "cfgrun", root / "teacher", progress=False).run(stop_after=2)
    other = Trainer(plan(config(tiny, steps=4, save_every=2, lr=1e-3)), root / "cfgrun", root / "teacher", progress=False)
    with pytest.raises(Exception, match="^lr: differs from the checkpoint"):
        other.run(resume=True)


def test_sparse_view_is_what_the_inference_cache_keeps(tiny):
    """The training view of a budget = the device view of a real SparseKVCache after the same
    prefill, and the continuation logits through it = the inference cache's."""
    model = load_model(tiny[1], num_layers=2).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (1, 230), generator=g)
    prefix, cont = ids[:, :200], ids[:, 200:]
    views = prefix_views(model, prefix, [None, 48], "chunk_topk")
    cache = SparseKVCache.for_model(model, 300, sparse_config("chunk_topk", 48))
    with torch.no_grad():
        model(prefix, cache)
        cache.upkeep()
        for layer in range(2):
            k, v, pos = cache.device_view(layer)
            assert pos.shape == (2, 48) and len(set(pos[0].tolist())) == 48
            assert torch.equal(views[48].keys[layer][0], k) and torch.equal(views[48].values[layer][0], v)
        want = model(cont, cache)[0]                                             # selected + tail, causal
        got = model(cont, ContinuationCache(views[48]))[0]
        assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
        assert views[None].entries == 200
        full = model(cont, ContinuationCache(views[None]))[0]
        assert not torch.allclose(full, want, atol=1e-3)                         # the views do differ


def test_soft_objectives_are_the_acceptance_rate_and_its_kl_bound():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(5, 16, generator=g).softmax(-1)
    probs, ids = p.topk(16, dim=-1)                                            # top-k = whole vocab: exact
    t = Targets(p.argmax(-1), ids, probs)
    logits = torch.randn(5, 16, generator=g)
    q = logits.softmax(-1)
    tv = objective_loss("tv", logits, t)
    assert torch.allclose(tv, 1 - torch.minimum(p, q).sum(-1).mean(), atol=1e-6)
    kl = objective_loss("kl", logits, t)
    assert torch.allclose(kl, (p * (p.log() - q.log())).sum(-1).mean(), atol=1e-5)
    assert objective_loss("kl", p.log(), t) < 1e-5 and objective_loss("tv", p.log(), t) < 1e-5
    assert torch.allclose(objective_loss("hard", logits, t), torch.nn.functional.cross_entropy(logits, p.argmax(-1)))


def sparsespec(*args, env_home):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "SPARSESPEC_HOME": str(env_home)}
    return subprocess.run([sys.executable, "-m", "sparsespec", "train", *map(str, args)], capture_output=True,
                          text=True, timeout=120, env=env)


def test_cli_bad_input_fails_before_compute(tiny, tmp_path):
    root, verifier, docs = tiny
    other_vocab = save_random_model(tmp_path / "v256", tiny_config(vocab_size=256), seed=1)
    base = ["--verifier", verifier, "--drafter", "layers:1", "--data", docs, "--out", tmp_path / "run",
            "--prefix", 200, "--continuation", 32, "--heldout-docs", 2, "--steps", 4, "--warmup", 1]
    short = write_docs(tmp_path / "short", chars=150)
    cases = [
        ("data", ["--data", tmp_path / "missing"]),
        ("prefix", ["--data", short]),                      # documents shorter than prefix + continuation
        ("prefix", ["--prefix", 5000]),                     # beyond the verifier's positions
        ("drafter", ["--drafter", other_vocab]),            # a different vocabulary
        ("budgets", ["--budgets", "256:x"]),
        ("warmup", ["--warmup", 9]),
    ]
    for field, extra in cases:
        proc = sparsespec(*base, *extra, env_home=tmp_path / "home")
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, (field, proc.stderr)
        assert lines[0].startswith(f"error: {field}: "), (field, lines)
    assert not (tmp_path / "home" / "teacher").exists() and not (tmp_path / "run").exists()


def test_spec_eval_checks_sd_equals_ar_on_heldout_prompts(trained):
    from sparsespec.train.evaluate import evaluate

    trainer, _ = trained
    ckpt = checkpoints(trainer.out)[-1]
    result = evaluate({"untrained": "layers:1", "trained": str(ckpt)}, context=240, num_prompts=2,
                      max_tokens=12, k=4, progress=False)
    assert result["heldout_documents"] == [n for n, _ in trainer.plan.corpus.heldout]
    assert [p["prompt"].split("@")[0] in result["heldout_documents"] for p in result["prompts"]] == [True, True]
    for variant in ("untrained", "trained"):
        for budget, c in result["cells"][variant].items():
            assert c["sd_equals_ar"] and c["runs"] == 2 and c["drafted"] > 0, (variant, budget, c)
            assert 0.0 <= c["alpha"] <= 1.0 and 1.0 <= c["tau"] <= 5.0
    full = result["cells"]
    assert full["trained"]["full"]["alpha"] > full["untrained"]["full"]["alpha"]


def test_report_renders_the_saved_numbers(trained, tmp_path):
    from sparsespec.train.report import render

    trainer, summary = trained
    path = tmp_path / "summary_paper.json"
    path.write_text(json.dumps(summary))
    text = render(None, [path])
    final = summary["history"][-1]["heldout"]
    assert f"| paper | {final['128']['greedy']:.3f} | {final['256']['greedy']:.3f} |" in text
    assert "| untrained |" in text

"""`sparsespec bench acceptance` end to end on a tiny model, in a real subprocess: every source,
policy, drafter and temperature runs through the real round loop, greedy outputs equal AR, and
the JSON, markdown and plots appear. Bad flags fail before anything loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sparsespec.models.testing import save_random_model, tiny_config

POLICIES = ["streaming", "chunk_topk", "snapkv", "verifier_guided", "full"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = tiny_config(max_position_embeddings=1024, eos_token_ids=(), num_layers=2)
    return save_random_model(tmp_path_factory.mktemp("acc") / "model", cfg, seed=8)


def bench(*args, timeout=600):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "sparsespec", "bench", "acceptance", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_acceptance_study_runs_every_path_and_writes_its_outputs(model_dir, tmp_path):
    proc = bench("--model", model_dir, "--contexts", "200,300", "--budgets", "16,32", "--policies",
                 ",".join(POLICIES), "--drafters", "same,layers:1", "--sources", "kjv,code,retrieval",
                 "--prompts", 1, "--heldout", 1, "--temperatures", "0,0.7", "--max-tokens", 12,
                 "--threads", 1, "--out", tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "bench" / "acceptance.json").read_text())
    runs = result["runs"]
    # 2 contexts x 3 sources x 2 temperatures x 2 drafters x (4 policies x 2 budgets + full)
    assert len(runs) == 2 * 3 * 2 * 2 * 9
    greedy = [r for r in runs if r["temperature"] == 0]
    assert greedy and all(r["equal_to_ar"] for r in greedy)
    assert set(result["k"]) == {"same", "layers:1"} and all(k in (2, 4, 8) for k in result["k"].values())
    guided = [r for r in runs if r["policy"] == "verifier_guided"]
    assert all(r["summaries_sent"] >= 1 for r in guided)
    assert result["traffic"]["traffic_vs_full_kv_max"] < 0.01
    assert {r["prompt_info"]["source"] for r in runs} == {"kjv", "code", "retrieval"}
    assert all("pass_key" in r["prompt_info"] for r in runs if r["source"] == "retrieval")
    assert result["gap_closure"] and all(g["budget"] in (16, 32) for g in result["gap_closure"])
    page = (tmp_path / "acceptance.md").read_text()
    assert "Gap closed by verifier_guided" in page and f"{len(greedy)} of {len(greedy)}" in page
    for name in ("tau_vs_context", "tau_vs_budget"):
        assert (tmp_path / "img" / f"{name}.png").stat().st_size > 10_000
    # A second part of the grid is merged into the same outputs.
    proc = bench("--model", model_dir, "--contexts", "250", "--budgets", "16", "--policies", "full,verifier_guided",
                 "--drafters", "same", "--sources", "kjv", "--prompts", 1, "--heldout", 0, "-k", 2,
                 "--temperatures", "0", "--max-tokens", 8, "--threads", 1, "--out", tmp_path, "--append")
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = json.loads((tmp_path / "bench" / "acceptance.json").read_text())
    assert len(merged["runs"]) == len(runs) + 2 and len(merged["commands"]) == 2


@pytest.mark.parametrize("flags,field", [
    (["--budgets", "8"], "budgets"),
    (["--sources", "poetry"], "sources"),
    (["--policies", "magic"], "policy"),
    (["--contexts", "50"], "contexts"),
    (["--prompts", "9"], "prompts"),
    (["-k", "0"], "k"),
    (["--heldout", "0"], "k"),
])
def test_bad_flags_fail_before_loading(model_dir, tmp_path, flags, field):
    proc = bench("--model", model_dir, "--out", tmp_path, *flags, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {field}:"), proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1

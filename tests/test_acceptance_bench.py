"""`sparsespec bench acceptance` end to end on tiny models, in a real subprocess: every source,
policy, drafter kind (fed `same` and `layers:1`, a separate model that gets KV summaries) and
temperature runs through the real round loop, greedy outputs equal AR, and the JSON, markdown,
plots and the summaries.md table appear. In process: a fed configuration's output is really
compared with AR (a wrong reference fails the study). Bad flags fail before anything loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sparsespec.models.testing import save_random_model, tiny_config

POLICIES = ["streaming", "chunk_topk", "snapkv", "fed", "verifier_guided", "full"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = tiny_config(max_position_embeddings=1024, eos_token_ids=(), num_layers=2)
    return save_random_model(tmp_path_factory.mktemp("acc") / "model", cfg, seed=8)


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    """A drafter with its own weights (so it cannot be fed): what verifier_guided is for."""
    cfg = tiny_config(max_position_embeddings=1024, eos_token_ids=(), num_layers=1)
    return save_random_model(tmp_path_factory.mktemp("acc") / "other", cfg, seed=9)


def bench(*args, timeout=600):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "sparsespec", "bench", "acceptance", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_acceptance_study_runs_every_path_and_writes_its_outputs(model_dir, other_dir, tmp_path):
    (tmp_path / "summaries.md").write_text("intro\n<!-- acceptance-table:begin -->\nstale\n"
                                           "<!-- acceptance-table:end -->\nanalysis\n")
    proc = bench("--model", model_dir, "--contexts", "200,300", "--budgets", "16,32", "--policies",
                 ",".join(POLICIES), "--drafters", f"same,layers:1,other={other_dir}", "--sources",
                 "kjv,code,retrieval", "--prompts", 1, "--heldout", 1, "--temperatures", "0,0.7",
                 "--max-tokens", 12, "--threads", 1, "--out", tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "bench" / "acceptance.json").read_text())
    runs = result["runs"]
    # 2 contexts x 3 sources x 2 temperatures x 3 drafters x (4 policies x 2 budgets + full): the
    # fed drafters run fed and not verifier_guided, the other one the reverse.
    assert len(runs) == 2 * 3 * 2 * 3 * 9
    by = lambda d, p: [r for r in runs if r["drafter"] == d and r["policy"] == p]   # noqa: E731
    for d in ("same", "layers:1"):
        assert not by(d, "verifier_guided")
        fed = by(d, "fed")
        assert len(fed) == 2 * 3 * 2 * 2
        # Fed as in serving: no drafter prefill, no host tier, fed every round; and its greedy
        # outputs were compared with AR (not skipped).
        assert all(r["feeds_sent"] >= 1 and r["drafter_kv_host_bytes"] == 0 and r["drafted"] > 0 for r in fed)
        assert all(r["equal_to_ar"] is True for r in fed if r["temperature"] == 0)
    assert not by("other", "fed") and all(r["summaries_sent"] >= 1 for r in by("other", "verifier_guided"))
    greedy = [r for r in runs if r["temperature"] == 0]
    assert greedy and all(r["equal_to_ar"] is True and not r["problem"] for r in greedy)
    assert set(result["k"]) == {"same", "layers:1", "other"} and all(k in (2, 4, 8) for k in result["k"].values())
    assert result["traffic"]["traffic_vs_full_kv_max"] < 0.01 and result["traffic"]["fed_host_bytes_max"] == 0
    assert {r["prompt_info"]["source"] for r in runs} == {"kjv", "code", "retrieval"}
    assert all("pass_key" in r["prompt_info"] for r in runs if r["source"] == "retrieval")
    gaps = result["gap_closure"]
    assert {(g["drafter"], g["informed"]) for g in gaps} == {("same", "fed"), ("layers:1", "fed"),
                                                             ("other", "verifier_guided")}
    assert all(g["budget"] in (16, 32) and g["n"] == 3 for g in gaps)
    assert {g["source"] for g in result["gap_closure_by_source"]} == {"kjv", "code", "retrieval"}
    assert {p["context"] for p in result["prompts"]} == {200, 300} and all(p["wall_s"] > 0 for p in result["prompts"])
    page = (tmp_path / "acceptance.md").read_text()
    assert "Gap closed by the informed policy" in page and f"**{len(greedy)} of {len(greedy)}**" in page
    assert " ± " in page and "## Cost" in page
    # Outputs name the separate drafter by its label: its path appears in the commands only.
    assert all(str(other_dir) not in line for line in page.splitlines() if not line.startswith("    sparsespec"))
    summaries = (tmp_path / "summaries.md").read_text()
    assert summaries.startswith("intro\n<!-- acceptance-table:begin -->\n") and summaries.endswith(
        "<!-- acceptance-table:end -->\nanalysis\n")
    assert "stale" not in summaries and "| 300 | fed |" in summaries and str(other_dir) not in summaries
    for name in ("tau_vs_context", "tau_vs_budget"):
        assert (tmp_path / "img" / f"{name}.png").stat().st_size > 10_000
    # A second part of the grid is merged into the same outputs.
    proc = bench("--model", model_dir, "--contexts", "250", "--budgets", "16", "--policies", "full,fed",
                 "--drafters", "same", "--sources", "kjv", "--prompts", 1, "--heldout", 0, "-k", 2,
                 "--temperatures", "0", "--max-tokens", 8, "--threads", 1, "--out", tmp_path, "--append")
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = json.loads((tmp_path / "bench" / "acceptance.json").read_text())
    assert len(merged["runs"]) == len(runs) + 2 and len(merged["commands"]) == 2


def test_a_fed_output_that_differs_from_ar_fails_the_study(model_dir):
    """The equality check runs on fed configurations: against a wrong AR reference a fed run is
    reported as different, and that fails the study (run_acceptance exits 1 on `failures`)."""
    from sparsespec.bench.acceptance import Study, StudyConfig, failures

    study = Study(StudyConfig(model=str(model_dir), contexts=(200,), budgets=(16,), policies=("fed",),
                              sources=("kjv",), prompts=1, heldout=0, k=4, max_tokens=10))
    state = study.prepare("kjv", 200, "Genesis")
    run = study.run_config(state, "same", "fed", 16, 4, 0.0)
    assert run["equal_to_ar"] is True and run["feeds_sent"] >= 1 and not run["problem"]
    run.update(context=200, source="kjv", prompt=0, drafter="same", policy="fed", budget=16, temperature=0.0)
    assert failures([run]) == []
    state.ar_tokens = state.ar_tokens[:3] + [(state.ar_tokens[3] + 1) % 128] + state.ar_tokens[4:]
    wrong = study.run_config(state, "same", "fed", 16, 4, 0.0)
    assert wrong["equal_to_ar"] is False and wrong["first_divergence"] == 3
    wrong.update(context=200, source="kjv", prompt=0, drafter="same", policy="fed", budget=16, temperature=0.0)
    assert failures([run, wrong]) and "differ from AR" in failures([wrong])[0]


@pytest.mark.parametrize("flags,field", [
    (["--budgets", "8"], "budgets"),
    (["--sources", "poetry"], "sources"),
    (["--policies", "magic"], "policy"),
    (["--contexts", "50"], "contexts"),
    (["--prompts", "9"], "prompts"),
    (["-k", "0"], "k"),
    (["--heldout", "0"], "k"),
    (["--drafters", "a=x,a=y"], "drafters"),
])
def test_bad_flags_fail_before_loading(model_dir, tmp_path, flags, field):
    proc = bench("--model", model_dir, "--out", tmp_path, *flags, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {field}:"), proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1

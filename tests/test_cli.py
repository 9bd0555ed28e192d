"""The CLI end to end, in real subprocesses: JSON output, AR == spec, and bad input as one line.

Every bad input must exit with code 2 and print exactly one line, `error: <field>: <problem>`,
naming the problem; never a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sparsespec.models.testing import save_random_model, tiny_config

PROMPT = "In the beginning God created the heaven and the earth. " * 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_random_model(tmp_path_factory.mktemp("tiny") / "model",
                             tiny_config(max_position_embeddings=256, eos_token_ids=()), seed=3)


def sparsespec(*args, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "sparsespec", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def generate(model_dir, *extra):
    return sparsespec("generate", "--model", model_dir, "--max-tokens", 24, *extra)


@pytest.mark.parametrize("weights", ["same", "int8"])
def test_generate_json_spec_equals_ar(model_dir, weights):
    outs = {}
    for mode in ("ar", "spec"):
        proc = generate(model_dir, "--prompt", PROMPT, "--mode", mode, "--policy", "streaming",
                        "--budget", 16, "-k", 4, "--drafter-weights", weights, "--json")
        assert proc.returncode == 0, proc.stderr
        outs[mode] = json.loads(proc.stdout)
    spec = outs["spec"]
    assert spec["token_ids"] == outs["ar"]["token_ids"] and len(spec["token_ids"]) == 24
    assert isinstance(spec["text"], str)
    m = spec["metrics"]
    for key in ("tau", "alpha", "k", "drafted", "accepted", "rounds", "tokens_per_s", "prefill_s",
                "drafter_kv_device_bytes", "verifier_kv_bytes"):
        assert key in m, key
    assert m["rounds"] > 0 and m["drafted"] >= m["accepted"] and m["tau"] >= 1
    assert 0 < m["drafter_kv_device_bytes"] and m["verifier_kv_bytes"] > 0


def write_corrupt_gguf(path):
    path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"\xff" * 64)
    return path


BAD_INPUTS = {
    "missing model path": (lambda d, t: ["--model", t / "no-such-model", "--prompt", "hi"], "model"),
    "corrupt gguf": (lambda d, t: ["--model", write_corrupt_gguf(t / "bad.gguf"), "--prompt", "hi"], "gguf"),
    "prompt over context": (lambda d, t: ["--model", d, "--prompt", "x" * 400], "context"),
    "empty prompt": (lambda d, t: ["--model", d, "--prompt", ""], "prompt"),
    "budget 0": (lambda d, t: ["--model", d, "--prompt", "hi", "--budget", 0], "budget"),
    "budget words": (lambda d, t: ["--model", d, "--prompt", "hi", "--budget", "lots"], "budget"),
    "k 0": (lambda d, t: ["--model", d, "--prompt", "hi", "-k", 0], "k"),
    "k 65": (lambda d, t: ["--model", d, "--prompt", "hi", "-k", 65], "k"),
    "top-p 0": (lambda d, t: ["--model", d, "--prompt", "hi", "--top-p", 0], "top_p"),
    "top-p 1.5": (lambda d, t: ["--model", d, "--prompt", "hi", "--top-p", 1.5], "top_p"),
    "unknown policy": (lambda d, t: ["--model", d, "--prompt", "hi", "--policy", "magic"], "policy"),
    "unknown drafter weights": (lambda d, t: ["--model", d, "--prompt", "hi", "--drafter-weights", "int3"],
                                "drafter_weights"),
    "missing prompt file": (lambda d, t: ["--model", d, "--prompt-file", t / "none.txt"], "prompt-file"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line(model_dir, tmp_path, case):
    make_args, needle = BAD_INPUTS[case]
    proc = sparsespec("generate", *make_args(model_dir, tmp_path))
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: ") and needle in lines[0].lower(), lines[0]
    assert proc.stdout == ""


def test_bench_verify_times_both_linear_kernels(model_dir, tmp_path):
    """`bench verify` on a tiny model: the verify paths agree and the weight matmuls are timed on
    each CPU linear kernel (MKL, oneDNN dense and blocked), written to verify.json."""
    proc = sparsespec("bench", "verify", "--model", model_dir, "--contexts", 64, "--sessions", "1,2",
                      "--reps", 1, "--out", tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((tmp_path / "bench" / "verify.json").read_text())
    assert [(r["context"], r["sessions"]) for r in record["rows"]] == [(64, 1), (64, 2)]
    assert all(r["max_abs_logit_diff"] < 1e-4 for r in record["rows"]), record["rows"]
    k = record["rows"][0]["k"]
    assert [m["rows"] for m in record["weight_matmuls"]] == sorted({1, 2, k + 1, 2 * (k + 1)})
    assert all(len(m["torch_ms"]) == len(m["dense_ms"]) == len(m["auto_ms"]) == 1 for m in record["weight_matmuls"])
    assert record["linear"] == "auto" and "oneDNN" in proc.stdout


def test_bench_linear_runs_both_kernels_and_checks_outputs(model_dir, tmp_path):
    """`bench linear` on a tiny model: AR and speculation on each kernel, every output equal to AR."""
    proc = sparsespec("bench", "linear", "--model", model_dir, "--contexts", 160, "--sessions", "1,2",
                      "--max-tokens", 8, "-k", 2, "--drafter-weights", "same", "--threads", 1, "--reps", 1,
                      "--out", tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = json.loads((tmp_path / "bench" / "linear.json").read_text())["records"]
    kernels = ["MKL", "oneDNN blocked", "oneDNN dense"]
    assert sorted((r["sessions"], r["kernel"]) for r in records) == [(s, k) for s in (1, 2) for k in kernels]
    assert all(r["outputs_equal_ar"] and len(r["ar_tok_s"]) == len(r["spec_tok_s"]) == 1 for r in records), records


@pytest.mark.parametrize("args,needle", [
    (["--service-cells", "4by4096"], "service_cells"),
    (["--service-cells", "3x4096"], "service_cells"),
    (["--sessions", "0"], "sessions"),
    (["--contexts", "4k"], "contexts"),
    (["--drafter-weights", "int3"], "drafter_weights"),
    (["--drafter", "/some/dir"], "drafter"),
    (["--ttft-contexts", "1234"], "ttft_contexts"),
    (["--ttft-prompts", "0"], "ttft_prompts"),
    (["--reps", "0"], "reps"),
])
def test_bench_capacity_bad_flags_are_one_line_before_any_model_loads(tmp_path, args, needle):
    proc = sparsespec("bench", "capacity", "--out", tmp_path, *args, timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert not any(tmp_path.iterdir())          # a refused run writes nothing


@pytest.mark.parametrize("args,needle", [
    (["up", "--model", "smollm2-135m", "--cohorts", "3"], "cohorts"),
    (["bench", "cohorts", "--sessions", "1"], "sessions"),
])
def test_bad_cohorts_flags_are_one_line_before_anything_starts(tmp_path, args, needle):
    proc = sparsespec(*args, "--out", tmp_path, timeout=120) if args[0] == "bench" else sparsespec(*args, timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"error: {needle}: "), lines[0]


def test_capacity_bench_without_services_imports_no_grpc(monkeypatch):
    """The GPU image carries its own grpcio (1.84 on the H200, older than the stubs): with no
    service cells and no TTFT contexts (gpu_check's capacity step) the bench must not import the
    client or the cluster, or it dies after its last decode cell."""
    from types import SimpleNamespace

    from sparsespec.bench.capacity import Bench
    monkeypatch.setitem(sys.modules, "sparsespec.client", None)     # importing it raises ImportError
    monkeypatch.setitem(sys.modules, "sparsespec.cluster", None)
    bench = SimpleNamespace(cfg=SimpleNamespace(ttft_contexts=(), service_cells=()))
    assert Bench.run_ttft(bench, print) == []
    assert Bench.run_services(bench, print) == []

"""scripts/gpu_check.sh cannot rot: its --cpu-dry-run (the same three steps on the CPU, the
kernels under Triton's interpreter, tiny sizes) passes in CI, and bad use is one line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def run(*args, timeout=300):
    env = {**os.environ, "SPARSESPEC_PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def test_cpu_dry_run_passes_and_writes_one_file(tmp_path):
    out = tmp_path / "check.txt"
    proc = run("--cpu-dry-run", "--out", out)
    text = out.read_text()
    assert proc.returncode == 0, text[-4000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("gpu_check: PASS (3/3 steps on cpu")
    assert text.strip().splitlines()[-1] == proc.stdout.strip().splitlines()[-1]
    for name in ("kernels", "lossless", "capacity"):
        assert f"-- {name}: rc=0" in text
    assert " failed" not in text and "3 passed in" in text       # lossless: tiny k=1, k=4, SmolLM2
    assert "capacity table" in text and "**no**" not in text     # every capacity cell equals AR
    assert "| 160 | 2 | adaptive |" in text                      # adaptive k ran, and equals AR too


def test_bad_use_is_one_line():
    proc = run("--frobnicate")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "--frobnicate" in proc.stderr
    if shutil.which("nvidia-smi") is None:
        proc = run()
        assert proc.returncode == 2 and "no NVIDIA GPU" in proc.stderr and proc.stderr.strip().count("\n") == 0
    else:
        pytest.skip("this machine has a GPU: the refusal without one is not reachable")

"""The committed gRPC stubs are exactly what scripts/gen_protos.sh makes from proto/ today."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "sparsespec" / "rpc" / "sparsespec"


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def test_committed_stubs_are_fresh(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gen_protos.sh"), str(tmp_path)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr
    fresh, committed = _files(tmp_path / "sparsespec"), _files(COMMITTED)
    assert fresh, "gen_protos.sh wrote nothing"
    assert sorted(fresh) == sorted(committed), "stub files differ: run scripts/gen_protos.sh"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale stubs {stale}: run scripts/gen_protos.sh and commit the result"

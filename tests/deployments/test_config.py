"""Configuration: the shipped YAML files validate, bad configs fail with a clear ConfigError."""

from pathlib import Path

import pytest
import yaml
from ray import serve

from deployments.app import build_app
from deployments.config import REPO_ROOT, ConfigError, ModelConfig, load_model_config, parse_app_config
from engine.types import EngineConfig

SMOLLM = "configs/smollm2-135m-instruct.yaml"


def serve_config_args() -> dict:
    config = yaml.safe_load((REPO_ROOT / "serve_config.yaml").read_text())
    (application,) = config["applications"]
    assert application["import_path"] == "deployments.app:build_app"
    assert application["route_prefix"] == "/"
    return application["args"]


def test_serve_config_builds_an_application():
    assert isinstance(build_app(serve_config_args()), serve.Application)


def test_default_model_config():
    config = load_model_config(SMOLLM)
    assert (config.name, config.model) == ("smollm2-135m-instruct", "smollm2-135m-instruct")
    engine = config.engine.to_engine_config(context_length=8192)
    assert (engine.dtype, engine.max_num_seqs, engine.max_model_len) == ("bfloat16", 64, 2048)
    assert config.stream_coalesce_ms == 500  # 32 streams keep the 250 ms spacing of a full batch of 32
    options = config.deployment.to_options()
    assert options["ray_actor_options"] == {"num_cpus": 0.9}
    assert options["max_ongoing_requests"] == 64
    assert "num_replicas" not in options and options["autoscaling_config"]["max_replicas"] == 2


def test_paths_resolve_from_the_repo_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_app_config({"models": [SMOLLM]}).models[0].name == "smollm2-135m-instruct"


def test_engine_defaults_mirror_engine_config():
    engine = ModelConfig(name="m", model="m").engine.to_engine_config(context_length=4096)
    assert engine == EngineConfig(max_model_len=4096)


def test_engine_code_paths_can_be_switched_off_per_model():
    settings = {"fast_forward": False, "native_attention": False}
    engine = ModelConfig(name="m", model="m", engine=settings).engine.to_engine_config()
    assert (engine.fast_forward, engine.native_attention) == (False, False)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"models": []}, "at least 1 item"),
        ({"models": ["configs/missing.yaml"]}, "not found"),
        ({"models": [{"name": "m"}]}, "model"),
        ({"models": [{"name": "m", "model": "x", "engine": {"max_num_seqs": 0}}]}, "max_num_seqs"),
        ({"models": [{"name": "m", "model": "x", "engine": {"typo": 1}}]}, "typo"),
        ({"models": [{"name": "m", "model": "x"}, {"name": "m", "model": "y"}]}, "repeated: m"),
        (
            {
                "models": [
                    {"name": "m", "model": "x", "deployment": {"num_replicas": 2, "autoscaling_config": {}}}
                ]
            },
            "not both",
        ),
    ],
)
def test_bad_configs(args, message):
    with pytest.raises(ConfigError, match=message):
        build_app(args)


def test_yaml_must_hold_a_mapping(tmp_path: Path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_model_config(path)

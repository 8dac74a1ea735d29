"""Every shipped config validates (ours and Serve's schema); autoscaling defaults follow the batch size;
the config snippets, inline fragments and keys that the README and the docs show parse too."""

import re
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray import serve
from ray.serve.schema import HTTPOptionsSchema, ServeDeploySchema

from deployments.app import build_app
from deployments.config import (
    REPO_ROOT,
    TARGET_BATCH_FRACTION,
    AppConfig,
    ConfigError,
    ModelConfig,
    load_model_config,
    parse_app_config,
)
from deployments.engines import VLLM_PYTHON_ENV, resolve_engine_kind
from deployments.engines.placement import num_devices, vllm_deployment_options
from model_zoo import CATALOGUE
from tests.deployments.docs_text import CHECKED, code_blocks, code_spans, rel

SERVE_CONFIGS = ["serve_config.yaml", "configs/gpu/serve_multi_gpu.yaml"]
MODEL_CONFIGS = sorted(
    str(p.relative_to(REPO_ROOT)) for d in ("configs", "configs/gpu") for p in (REPO_ROOT / d).glob("*.yaml")
)
MODEL_CONFIGS = [p for p in MODEL_CONFIGS if not p.endswith("serve_multi_gpu.yaml")]
GPU_EXAMPLES = ["llama-2-7b", "llama-3-8b-instruct", "mistral-7b-instruct", "mixtral-8x7b-instruct"]


def app_args(path: str) -> list[dict]:
    schema = ServeDeploySchema.model_validate(yaml.safe_load((REPO_ROOT / path).read_text()))
    return [app.args for app in schema.applications]


@pytest.mark.parametrize("path", MODEL_CONFIGS)
def test_model_config_is_valid(path: str) -> None:
    config = load_model_config(path)
    assert config.model in CATALOGUE
    options = config.deployment.to_options()
    serve.deployment(lambda: None).options(name=config.name, **options)  # Serve accepts the options
    target = (options.get("autoscaling_config") or {}).get("target_ongoing_requests")
    assert target is None or 1 <= target <= options["max_ongoing_requests"]


@pytest.fixture
def vllm_stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU configs run on vLLM, whose venv need not exist here: this python stands in for it (the
    options are built and validated, nothing starts)."""
    monkeypatch.setenv(VLLM_PYTHON_ENV, sys.executable)


@pytest.mark.parametrize("path", SERVE_CONFIGS)
def test_serve_config_is_valid(path: str, vllm_stand_in: None) -> None:
    for args in app_args(path):
        assert isinstance(build_app(args), serve.Application)


def test_gpu_examples_are_shipped_and_run_on_vllm(vllm_stand_in: None) -> None:
    for name in GPU_EXAMPLES:
        config = load_model_config(f"configs/gpu/{name}.yaml")
        assert config.name == name and resolve_engine_kind(config) == "vllm"
        devices = num_devices(config)
        assert config.deployment.ray_actor_options["num_gpus"] == devices  # GPUs of one model copy
        options = vllm_deployment_options(config, Path(sys.executable))
        assert [b.get("GPU") for b in options["placement_group_bundles"]] == [1.0] * devices
    assert num_devices(load_model_config("configs/gpu/mixtral-8x7b-instruct.yaml")) == 2  # tensor parallel
    (args,) = app_args("configs/gpu/serve_multi_gpu.yaml")
    assert len(parse_app_config(args).models) >= 3


def test_default_app_serves_two_architectures_and_fits_two_cpus() -> None:
    (args,) = app_args("serve_config.yaml")
    config = parse_app_config(args)
    assert [m.name for m in config.models] == ["smollm2-135m-instruct", "gemma-3-270m"]
    gemma = config.models[1]
    assert gemma.use_chat_template is False and CATALOGUE["gemma-3-270m"].use_chat_template is False
    assert "Gemma Terms of Use" in CATALOGUE["gemma-3-270m"].license_note
    num_cpus = sum(m.deployment.ray_actor_options["num_cpus"] for m in config.models)
    num_cpus += config.ingress.ray_actor_options["num_cpus"] * config.ingress.num_replicas
    assert num_cpus <= 2  # one replica of each model and the ingress start on a 2-CPU machine


def model(max_num_seqs: int = 16, **deployment) -> ModelConfig:
    return ModelConfig(name="m", model="m", engine={"max_num_seqs": max_num_seqs}, deployment=deployment)


def test_autoscaling_target_is_derived_from_the_batch() -> None:
    options = model(32, autoscaling_config={"min_replicas": 1, "max_replicas": 3}).deployment.to_options()
    assert options["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 3,
        "target_ongoing_requests": round(32 * TARGET_BATCH_FRACTION),
    }
    assert options["max_ongoing_requests"] == 64  # one batch running + one waiting
    assert model(1, autoscaling_config={}).deployment.autoscaling_config["target_ongoing_requests"] == 1


def test_stated_values_are_kept() -> None:
    config = model(32, max_ongoing_requests=40, autoscaling_config={"target_ongoing_requests": 5})
    assert config.deployment.max_ongoing_requests == 40
    assert config.deployment.autoscaling_config == {"target_ongoing_requests": 5}
    assert "autoscaling_config" not in model(8).deployment.to_options()  # no autoscaling asked: none added
    again = ModelConfig.model_validate(config.model_dump())
    assert again.deployment == config.deployment


def test_target_above_max_ongoing_is_refused() -> None:
    args = {"models": [{"name": "m", "model": "m", "deployment": {"max_ongoing_requests": 4}}]}
    args["models"][0]["deployment"]["autoscaling_config"] = {"target_ongoing_requests": 8}
    with pytest.raises(ConfigError, match="never scale up"):
        parse_app_config(args)


def test_scale_to_zero_example() -> None:
    config = load_model_config("configs/gpu/mistral-7b-instruct.yaml")
    assert config.replica_wait_timeout_s == 600
    assert config.deployment.autoscaling_config["min_replicas"] == 0


def test_derived_target_never_exceeds_max_ongoing() -> None:
    config = model(32, max_ongoing_requests=4, autoscaling_config={"max_replicas": 2})
    assert config.deployment.autoscaling_config["target_ongoing_requests"] == 4


# --- config snippets in the README and the docs ---------------------------------------------------------

SNIPPETS = [b for page in CHECKED for b in code_blocks(page) if b.lang == "yaml"]
SECTIONS = "engine|deployment|limits|auth|batch|endpoints|ingress|http_options"
_FRAGMENT = re.compile(rf"^({SECTIONS}): \{{.*\}}$")  # `engine: {fast_forward: false}`
_DOTTED = re.compile(rf"^({SECTIONS})\.(\w+)")  # `limits.max_body_bytes`
SPANS = sorted({(rel(page), span) for page in CHECKED for span in code_spans(page)})


def parse_snippet(text: str) -> None:
    """Validate a YAML snippet against the model it shows: a Serve config, an app's args or a model."""
    data = yaml.safe_load(text)
    if "applications" in data:
        schema = ServeDeploySchema.model_validate(data)
        for app in schema.applications:
            if app.import_path == "deployments.app:build_app":
                parse_app_config(app.args)
    elif "models" in data:
        parse_app_config(data)
    elif {"name", "model"} <= data.keys():
        ModelConfig.model_validate(data)
    else:
        raise AssertionError(f"a config snippet of no known kind: {text[:80]!r}")


def parse_fragment(text: str) -> None:
    """One section of a config written inline, e.g. `engine: {native_linear: false}`."""
    data = yaml.safe_load(text)
    (section,) = data
    if section in ("engine", "deployment"):
        ModelConfig.model_validate({"name": "m", "model": "m", **data})
    elif section == "http_options":
        assert data[section].keys() <= HTTPOptionsSchema.model_fields.keys(), text
    else:
        parse_app_config({"models": [{"name": "m", "model": "m"}], **data})


def section_fields(section: str) -> set[str]:
    if section == "http_options":
        return set(HTTPOptionsSchema.model_fields)
    owner = ModelConfig if section in ("engine", "deployment") else AppConfig
    return set(owner.model_fields[section].annotation.model_fields)


def test_the_docs_show_config_snippets():
    assert any(s.page == "README.md" for s in SNIPPETS)
    assert any(_FRAGMENT.match(span) for _, span in SPANS) and any(_DOTTED.match(span) for _, span in SPANS)


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[f"{s.page}:{i}" for i, s in enumerate(SNIPPETS)])
def test_config_snippets_parse(snippet) -> None:
    parse_snippet(snippet.body)


@pytest.mark.parametrize(("page", "span"), [s for s in SPANS if _FRAGMENT.match(s[1])])
def test_inline_config_fragments_parse(page: str, span: str) -> None:
    parse_fragment(span)


@pytest.mark.parametrize(("page", "span"), [s for s in SPANS if _DOTTED.match(s[1])])
def test_named_config_keys_exist(page: str, span: str) -> None:
    section, key = _DOTTED.match(span).groups()
    assert key in section_fields(section), f"{page}: `{span}` is no config key"


def test_a_wrong_snippet_is_seen() -> None:
    with pytest.raises(ConfigError, match="max_num_seq"):
        parse_snippet("models: [{name: m, model: m, engine: {max_num_seq: 8}}]")
    with pytest.raises(ValidationError):
        parse_fragment("engine: {fast_forwrd: false}")
    with pytest.raises(AssertionError):
        parse_snippet("proxy_location: HeadOnly")
    assert "max_body_bytes" in section_fields("limits") and "max_body_byte" not in section_fields("limits")

"""Model endpoints at runtime with the official `llmengine` client: Model.create / get / list / update /
delete against the real app on the tiny model (docs/endpoints.md)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import ray
from llmengine import Completion, Model
from llmengine.data_types import LLMInferenceFramework
from llmengine.errors import BadRequestError, NotFoundError, ServerError, UnauthorizedError
from ray import serve
from ray.serve.context import _get_global_client
from ray.serve.schema import ServeDeploySchema

from deployments import serve_status
from deployments.app import build_app_from_configs
from deployments.config import DRAIN_CHECK_PERIOD_S, DeploymentSettings, ModelConfig
from deployments.limits import AuthSettings
from tests.deployments.fake_engine import fake_factory
from tests.integration.tiny_app import TINY_MODEL
from tests.serve_fixtures import run_app

NAME = "tiny-runtime"
INGRESS_APP = "tiny"  # the app of the tiny_app_url fixture
READY_TIMEOUT_S = 180.0
DECLARATIVE_APP = serve.deployment(ray_actor_options={"num_cpus": 0.01})(lambda: "declared").bind()


@pytest.fixture(scope="module", autouse=True)
def base_path(tiny_app_url: str) -> Iterator[None]:
    """The client reads LLM_ENGINE_BASE_PATH at every call; leaves no runtime endpoint behind."""
    previous = os.environ.get("LLM_ENGINE_BASE_PATH")
    os.environ["LLM_ENGINE_BASE_PATH"] = tiny_app_url
    yield
    for endpoint in Model.list().model_endpoints:
        if endpoint.name != TINY_MODEL:
            Model.delete(endpoint.name)
    if previous is None:
        del os.environ["LLM_ENGINE_BASE_PATH"]
    else:
        os.environ["LLM_ENGINE_BASE_PATH"] = previous


def create(name: str, checkpoint_path: Path | str, **kwargs):
    return Model.create(
        name=name,
        model="tiny-llama",
        inference_framework_image_tag="latest",
        checkpoint_path=str(checkpoint_path),
        **kwargs,
    )


def settled(name: str, timeout_s: float = READY_TIMEOUT_S):
    """Model.get once the endpoint is no longer UPDATE_PENDING."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        endpoint = Model.get(name)
        if endpoint.status != "UPDATE_PENDING":
            return endpoint
        time.sleep(0.5)
    raise TimeoutError(f"{name} still UPDATE_PENDING after {timeout_s} s")


def serve_apps() -> dict[str, str]:
    return {name: app.status for name, app in serve_status.applications().items()}


def replica_ids(app: str, deployment: str) -> list[str]:
    details = _get_global_client().get_serve_details()
    replicas = details["applications"][app]["deployments"][deployment]["replicas"]
    return sorted(r["replica_id"] for r in replicas if str(r["state"]).endswith("RUNNING"))


def wait_until(predicate, timeout_s: float = 120.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what} not reached within {timeout_s} s")


@pytest.fixture(scope="module")
def endpoint(tiny_model_dir: Path):
    """One runtime endpoint (scale-to-zero, the client's default), READY; the tests below run in order."""
    start_s = time.monotonic()
    response = create(NAME, tiny_model_dir, max_model_len=256)
    assert response.endpoint_creation_task_id
    ready = settled(NAME)
    print(f"\ncreate -> READY: {time.monotonic() - start_s:.1f} s")
    assert ready.status == "READY", ready.spec.metadata if ready.spec else ready
    return ready


def test_created_endpoint_is_ready_and_listed(endpoint):
    assert endpoint.name == NAME and endpoint.model_name == "tiny-llama"
    assert endpoint.inference_framework == "vllm" and "llmserve" in endpoint.inference_framework_tag
    state = endpoint.spec.deployment_state
    assert (state.min_workers, state.max_workers, state.per_worker) == (0, 1, 2)  # the client's defaults
    assert float(endpoint.spec.resource_state.cpus) == pytest.approx(0.1)  # endpoints.default_num_cpus
    listed = {e.name: e.status for e in Model.list().model_endpoints}
    assert listed == {TINY_MODEL: "READY", NAME: "READY"}
    assert serve_apps()[f"{INGRESS_APP}.{NAME}"] == "RUNNING"
    # every replica of the app and of the endpoint checks its drain every 0.2 s (Serve's default: 2 s)
    apps = _get_global_client().get_serve_details()["applications"]
    periods = {
        (app, name): deployment["deployment_config"]["graceful_shutdown_wait_loop_s"]
        for app in (INGRESS_APP, f"{INGRESS_APP}.{NAME}")
        for name, deployment in apps[app]["deployments"].items()
    }
    assert (INGRESS_APP, "Ingress") in periods and len(periods) >= 3, periods
    assert set(periods.values()) == {DRAIN_CHECK_PERIOD_S}, periods


def test_completions_route_to_it_on_both_protocols(endpoint, tiny_app_url: str):
    response = Completion.create(model=NAME, prompt="Hello", max_new_tokens=4, temperature=0)
    assert 1 <= response.output.num_completion_tokens <= 4
    chunks = list(Completion.create(model=NAME, prompt="Hello", max_new_tokens=4, temperature=0, stream=True))
    assert "".join(c.output.text for c in chunks) == response.output.text
    models = httpx.get(tiny_app_url + "v1/models").json()["data"]
    assert NAME in [m["id"] for m in models]
    body = {"model": NAME, "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    openai = httpx.post(tiny_app_url + "v1/completions", json=body, timeout=60)
    assert openai.status_code == 200, openai.text  # the raw prompt here: no chat template, other text
    assert 1 <= openai.json()["usage"]["completion_tokens"] <= 4


def test_ingress_replica_restart_keeps_the_endpoint(endpoint, tiny_app_url: str):
    details = _get_global_client().get_serve_details()
    (replica,) = details["applications"][INGRESS_APP]["deployments"]["Ingress"]["replicas"]
    ray.kill(ray.get_actor(replica["actor_name"], namespace="serve"), no_restart=True)
    wait_until(
        lambda: replica_ids(INGRESS_APP, "Ingress") not in ([], [replica["replica_id"]]),
        what="a new ingress replica",
    )
    wait_until(lambda: _answers(tiny_app_url + "healthz"), what="the new ingress answering")
    assert Model.get(NAME).status == "READY"
    response = Completion.create(model=NAME, prompt="Hello", max_new_tokens=3, temperature=0)
    assert response.output.num_completion_tokens >= 1


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def test_serve_deploy_of_a_config_leaves_runtime_endpoints_running(endpoint):
    """A declarative deploy replaces the config-deployed apps only; runtime endpoints are imperative."""
    client = _get_global_client()
    config = {
        "name": "declared",
        "route_prefix": None,
        "import_path": "tests.integration.test_model_endpoints:DECLARATIVE_APP",
    }
    client.deploy_apps(ServeDeploySchema(applications=[config]))
    try:
        wait_until(lambda: serve_apps().get("declared") == "RUNNING", what="the declared app running")
        assert serve_apps()[f"{INGRESS_APP}.{NAME}"] == "RUNNING"
        response = Completion.create(model=NAME, prompt="Hi", max_new_tokens=2, temperature=0)
        assert response.output.num_completion_tokens >= 1
    finally:
        serve.delete("declared")


def test_update_scales_in_place(endpoint):
    app = f"{INGRESS_APP}.{NAME}"
    before = replica_ids(app, f"ModelServer:{NAME}")
    response = Model.update(NAME, min_workers=1, max_workers=2, per_worker=3)
    assert response.endpoint_creation_task_id
    updated = settled(NAME)
    assert updated.status == "READY"
    state = updated.spec.deployment_state
    assert (state.min_workers, state.max_workers, state.per_worker) == (1, 2, 3)
    if before:  # a scaling change restarts no replica (the same code version)
        assert set(before) <= set(replica_ids(app, f"ModelServer:{NAME}"))
    assert Completion.create(model=NAME, prompt="Hi", max_new_tokens=2, temperature=0).output.text is not None


def test_delete_drains_then_404(endpoint):
    stream = Completion.create(model=NAME, prompt="Hello", max_new_tokens=40, temperature=0, stream=True)
    first = next(stream)  # a request in flight when the endpoint is deleted
    assert Model.delete(NAME).deleted is True
    rest = list(stream)
    assert (rest or [first])[-1].output.finished, "the in-flight stream was cut instead of drained"
    with pytest.raises(NotFoundError):
        Model.get(NAME)
    with pytest.raises(NotFoundError):
        Completion.create(model=NAME, prompt="Hello", max_new_tokens=2)
    with pytest.raises(NotFoundError):
        Model.delete(NAME)
    wait_until(lambda: f"{INGRESS_APP}.{NAME}" not in serve_apps(), what="the Serve app removed")


def test_weights_that_cannot_load_are_update_failed(tiny_model_dir: Path, tmp_path: Path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    create("tiny-broken", broken, min_workers=1)
    failed = settled("tiny-broken")
    assert failed.status == "UPDATE_FAILED"
    reason = failed.spec.metadata["status_reason"]
    assert "DEPLOY_FAILED" in reason or "replica" in reason, reason
    # No half-created deployment left behind, and the name can be deleted and reused.
    wait_until(lambda: f"{INGRESS_APP}.tiny-broken" not in serve_apps(), what="the failed app removed")
    with pytest.raises(ServerError, match="UPDATE_FAILED"):  # 503 naming the status and the reason
        Completion.create(model="tiny-broken", prompt="Hi", max_new_tokens=2)
    assert Model.delete("tiny-broken").deleted


def test_resources_no_node_has_are_update_failed_at_once(tiny_model_dir: Path):
    create("tiny-gpu", tiny_model_dir, gpus=1, gpu_type="nvidia-ampere-a10")
    failed = Model.get("tiny-gpu")
    assert failed.status == "UPDATE_FAILED"
    assert "GPU=1" in failed.spec.metadata["status_reason"]
    assert f"{INGRESS_APP}.tiny-gpu" not in serve_apps()
    Model.delete("tiny-gpu")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": "x-unknown", "model": "gpt-9"}, "model_name"),
        ({"name": TINY_MODEL}, "already exists"),
        ({"name": "Bad Name!"}, "name"),
        # more than one device: refused on this project's engine (tensor parallelism is vLLM's)
        ({"name": "x-shards", "num_shards": 2, "inference_framework_image_tag": "llmserve"}, "num_shards"),
        ({"name": "x-cpus", "cpus": -1}, "cpus"),
        ({"name": "x-memory", "memory": "lots"}, "memory"),
        ({"name": "x-gpus", "gpus": 2, "inference_framework_image_tag": "llmserve"}, "gpus"),
        ({"name": "x-workers", "min_workers": 3, "max_workers": 1}, "max_workers"),
        ({"name": "x-tgi", "inference_framework": LLMInferenceFramework.TEXT_GENERATION_INFERENCE}, "vllm"),
        ({"name": "x-remote", "checkpoint_path": "s3://bucket/model"}, "checkpoint_path"),
        ({"name": "x-outside", "checkpoint_path": "/usr"}, "not under an allowed folder"),
        ({"name": "x-len", "max_model_len": 100_000}, "max_model_len: 100000 is over the context"),
    ],
)
def test_bad_create_is_400_naming_the_field(tiny_model_dir: Path, kwargs: dict, field: str):
    arguments = {
        "model": "tiny-llama",
        "checkpoint_path": str(tiny_model_dir),
        "inference_framework_image_tag": "latest",
        **kwargs,
    }
    if arguments["model"] == "gpt-9":
        del arguments["checkpoint_path"]
    with pytest.raises(BadRequestError, match=field):
        Model.create(**arguments)
    assert kwargs["name"] not in {e.name for e in Model.list().model_endpoints} - {TINY_MODEL}


def test_update_and_delete_of_unknown_or_configured_names():
    with pytest.raises(NotFoundError):
        Model.update("no-such-endpoint", min_workers=1)
    with pytest.raises(NotFoundError):
        Model.delete("no-such-endpoint")
    with pytest.raises(BadRequestError, match="config"):
        Model.update(TINY_MODEL, max_workers=2)
    with pytest.raises(BadRequestError, match="config"):
        Model.delete(TINY_MODEL)


def test_changes_need_an_api_key_when_keys_are_configured(serve_port: int, monkeypatch: pytest.MonkeyPatch):
    model = ModelConfig(
        name="fake", model="fake", deployment=DeploymentSettings(ray_actor_options={"num_cpus": 0.05})
    )
    app = build_app_from_configs([model], engine_factory=fake_factory, auth=AuthSettings(api_keys=["sesame"]))
    url = run_app(app, name="endpoints-auth", route_prefix="/endpoints-auth", port=serve_port)
    try:
        monkeypatch.setenv("LLM_ENGINE_BASE_PATH", url)
        monkeypatch.setenv("SCALE_API_KEY", "wrong")
        with pytest.raises(UnauthorizedError):
            create("x-auth", "/nowhere")
        with pytest.raises(UnauthorizedError):
            Model.update("fake", min_workers=1)
        with pytest.raises(UnauthorizedError):
            Model.delete("fake")
        monkeypatch.setenv("SCALE_API_KEY", "sesame")  # past the guard: the body is checked
        with pytest.raises(BadRequestError, match="checkpoint_path"):
            create("x-auth", "/nowhere")
    finally:
        serve.delete("endpoints-auth")

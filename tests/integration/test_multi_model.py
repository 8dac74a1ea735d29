"""Several models behind one ingress: independent autoscaling, scale from zero, base models.

Serve's handles push autoscaling metrics every second here (tests/serve_fixtures.py); every wait polls
Serve's status against a deadline.
"""

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from transformers import AutoTokenizer

from deployments.app import build_app_from_configs
from deployments.config import DeploymentSettings, EngineSettings, ModelConfig
from tests.serve_fixtures import delete_app, replica_states, run_app

APP, PREFIX = "multi-model", "/multi"
FAST_SCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 1,
    "upscale_delay_s": 0.5,
    "downscale_delay_s": 2,
    "look_back_period_s": 2,
}
COLD_WAIT_S = 4.0  # replica_wait_timeout_s of the model that can never start


def tiny(name: str, folder: Path, autoscaling: dict, **changes) -> ModelConfig:
    deployment = DeploymentSettings(
        ray_actor_options={"num_cpus": 0.2}, max_ongoing_requests=4, autoscaling_config=autoscaling
    )
    engine = EngineSettings(dtype="float32", max_model_len=256, kv_cache_bytes=8 * 2**20, num_threads=1)
    return ModelConfig(name=name, model=str(folder), engine=engine, deployment=deployment, **changes)


@pytest.fixture(scope="module")
def base_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model without its chat template: a base model."""
    folder = tmp_path_factory.mktemp("tiny_base") / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def client(serve_port: int, tiny_model_dir: Path, base_model_dir: Path) -> Iterator[httpx.Client]:
    models = [
        tiny("busy", tiny_model_dir, FAST_SCALING),
        tiny("idle", tiny_model_dir, FAST_SCALING),
        tiny("base", base_model_dir, {"min_replicas": 1, "max_replicas": 1}, use_chat_template=False),
        # scales up on its first request and stays up while the test looks (no downscale for a minute)
        tiny(
            "cold",
            tiny_model_dir,
            {**FAST_SCALING, "min_replicas": 0, "initial_replicas": 0, "downscale_delay_s": 60},
        ),
        tiny(  # asks for a resource no node has: its replica never starts
            "never",
            tiny_model_dir,
            {"min_replicas": 0, "max_replicas": 1, "initial_replicas": 0},
            replica_wait_timeout_s=COLD_WAIT_S,
        ),
    ]
    models[-1].deployment.ray_actor_options = {"num_cpus": 0.1, "resources": {"no-such-node": 1}}
    url = run_app(build_app_from_configs(models), name=APP, route_prefix=PREFIX, port=serve_port)
    with httpx.Client(base_url=url, timeout=120) as client:
        yield client
    delete_app(APP)


def replicas(model: str) -> dict[str, int]:
    return replica_states(APP, f"ModelServer:{model}")


def running(model: str) -> int:
    return replicas(model).get("RUNNING", 0)


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def complete(client: httpx.Client, model: str, prompt: str = "Hello", **changes) -> httpx.Response:
    body = {"prompt": prompt, "max_new_tokens": 8, "temperature": 0, **changes}
    return client.post("v1/llm/completions-sync", params={"model_endpoint_name": model}, json=body)


@pytest.mark.timeout(600)  # waits of up to 60 + 90 + 120 + 90 s for Serve to scale
def test_one_model_scales_up_and_down_while_the_other_stays(client: httpx.Client) -> None:
    wait_until(lambda: running("busy") == 1 and running("idle") == 1, 60, "one replica each")
    stop, errors = threading.Event(), []

    def load() -> None:
        while not stop.is_set():
            response = complete(client, "busy", max_new_tokens=200, stop_sequences=["never-seen"])
            if response.status_code != 200:
                errors.append(response.text)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    idle_counts = []
    try:

        def busy_scaled() -> bool:
            idle_counts.append(sum(replicas("idle").values()))
            return running("busy") == 2

        wait_until(busy_scaled, 90, "busy to reach 2 running replicas")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    assert not errors, errors[:3]
    assert set(idle_counts) == {1}  # the idle model never scaled while the busy one did
    wait_until(lambda: sum(replicas("busy").values()) == 1, 90, "busy to scale back down to 1")
    assert sum(replicas("idle").values()) == 1
    assert complete(client, "idle").status_code == 200


def test_cold_model_starts_on_the_first_request(client: httpx.Client) -> None:
    assert sum(replicas("cold").values()) == 0
    response = complete(client, "cold")
    assert response.status_code == 200, response.text
    assert response.json()["output"]["num_completion_tokens"] >= 1
    assert running("cold") == 1


def test_model_that_cannot_start_answers_503_after_its_wait(client: httpx.Client) -> None:
    started = time.monotonic()
    response = complete(client, "never")
    waited_s = time.monotonic() - started
    assert response.status_code == 503, response.text
    assert "no replica" in response.json()["detail"] and "never" in response.json()["detail"]
    assert COLD_WAIT_S <= waited_s < COLD_WAIT_S + 60  # after its wait, long before the client's 120 s
    chat = {"model": "never", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    streamed = client.post("v1/chat/completions", json=chat)
    assert streamed.status_code == 503 and "no replica" in streamed.json()["error"]["message"]


def test_base_model_gets_raw_prompts_and_refuses_chat(client: httpx.Client, base_model_dir: Path) -> None:
    prompt = "The capital of France is"
    response = complete(client, "base", prompt)
    assert response.status_code == 200, response.text
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    assert response.json()["output"]["num_prompt_tokens"] == len(tokenizer(prompt).input_ids)
    chat = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    refused = client.post("v1/chat/completions", json=chat)
    assert refused.status_code == 400
    assert "no chat template" in refused.json()["error"]["message"]
    completion = client.post("v1/completions", json={"model": "base", "prompt": prompt, "max_tokens": 4})
    assert completion.status_code == 200

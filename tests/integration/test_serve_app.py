"""The real app and engine on the tiny random-weight model, over HTTP."""

import asyncio
import json
import time

import httpx
import pytest
from ray import serve
from transformers import AutoTokenizer

from tests.integration.tiny_app import TINY_MAX_MODEL_LEN, TINY_MODEL


@pytest.fixture(scope="module")
def client(tiny_app_url: str):
    with httpx.Client(base_url=tiny_app_url, timeout=60) as client:
        yield client


def body(**changes) -> dict:
    return {"prompt": "Hello, my name is", "max_new_tokens": 8, "temperature": 0, **changes}


def post(client: httpx.Client, route: str, model: str = TINY_MODEL, **changes) -> httpx.Response:
    return client.post(
        f"v1/llm/completions-{route}", params={"model_endpoint_name": model}, json=body(**changes)
    )


def events_of(response: httpx.Response) -> list[dict]:
    frames = response.text.removesuffix("\n\n").split("\n\n")
    assert all(f.startswith("data: ") and "\n" not in f for f in frames), response.text
    return [json.loads(f.removeprefix("data: ")) for f in frames]


def test_sync_counts_the_chat_templated_prompt(client, tiny_model_dir):
    response = post(client, "sync")
    assert response.status_code == 200, response.text
    output = response.json()["output"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    templated = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello, my name is"}], add_generation_prompt=True, tokenize=True
    )
    assert output["num_prompt_tokens"] == len(templated["input_ids"])
    assert 1 <= output["num_completion_tokens"] <= 8
    assert isinstance(output["text"], str) and output["tokens"] is None


def test_greedy_stream_matches_sync(client):
    sync = post(client, "sync", max_new_tokens=12).json()["output"]
    response = post(client, "stream", max_new_tokens=12)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = events_of(response)
    assert "".join(e["output"]["text"] for e in events) == sync["text"]
    assert [e["output"]["finished"] for e in events] == [False] * (len(events) - 1) + [True]
    last = events[-1]["output"]
    assert (last["num_prompt_tokens"], last["num_completion_tokens"]) == (
        sync["num_prompt_tokens"],
        sync["num_completion_tokens"],
    )
    assert all(e["output"]["num_prompt_tokens"] is None for e in events[:-1])


def test_log_probs(client):
    output = post(client, "sync", return_token_log_probs=True).json()["output"]
    assert len(output["tokens"]) == output["num_completion_tokens"]
    assert all(t["log_prob"] <= 0 and isinstance(t["token"], str) for t in output["tokens"])
    events = events_of(post(client, "stream", return_token_log_probs=True))
    assert [e["output"]["token"]["token"] for e in events] == [t["token"] for t in output["tokens"]]


def test_seeded_sampling_is_reproducible(client):
    texts = {
        post(client, "sync", temperature=1.0, top_k=50, seed=1234).json()["output"]["text"] for _ in range(2)
    }
    assert len(texts) == 1


@pytest.mark.parametrize("route", ["sync", "stream"])
def test_errors(client, route):
    too_long = post(client, route, max_new_tokens=TINY_MAX_MODEL_LEN + 1)
    assert too_long.status_code == 400 and str(TINY_MAX_MODEL_LEN) in too_long.json()["detail"]
    unknown = post(client, route, model="nope")
    assert unknown.status_code == 404 and TINY_MODEL in unknown.json()["detail"]
    guided = post(client, route, guided_regex="(unclosed")
    assert guided.status_code == 400 and "guided_regex" in guided.json()["detail"]


async def test_concurrent_streams(tiny_app_url):
    async with httpx.AsyncClient(base_url=tiny_app_url, timeout=60) as client:

        async def stream(i: int) -> list[dict]:
            response = await client.post(
                "v1/llm/completions-stream",
                params={"model_endpoint_name": TINY_MODEL},
                json=body(prompt=f"Story number {i}:", max_new_tokens=16, temperature=0.8, seed=i),
            )
            assert response.status_code == 200
            return events_of(response)

        results = await asyncio.gather(*(stream(i) for i in range(6)))
    assert all(events[-1]["output"]["finished"] for events in results)


async def test_sixteen_concurrent_greedy_streams_equal_their_sync_twins(tiny_app_url):
    """16 streams in one batch; each one's text equals the same request answered alone, sync."""
    prompts = [f"Story number {i}: once upon a time" for i in range(16)]
    async with httpx.AsyncClient(base_url=tiny_app_url, timeout=120) as client:
        params = {"model_endpoint_name": TINY_MODEL}

        async def stream(prompt: str) -> str:
            request = body(prompt=prompt, max_new_tokens=24, temperature=0)
            response = await client.post("v1/llm/completions-stream", params=params, json=request)
            assert response.status_code == 200
            events = events_of(response)
            assert events[-1]["output"]["finished"] and events[-1]["output"]["num_completion_tokens"] >= 1
            return "".join(e["output"]["text"] for e in events)

        streamed = await asyncio.gather(*(stream(p) for p in prompts))
        for prompt, text in zip(prompts, streamed, strict=True):
            sync = await client.post(
                "v1/llm/completions-sync",
                params=params,
                json=body(prompt=prompt, max_new_tokens=24, temperature=0),
            )
            assert sync.json()["output"]["text"] == text, prompt


def test_disconnect_frees_the_engine(client):
    handle = serve.get_deployment_handle(f"ModelServer:{TINY_MODEL}", app_name="tiny")
    params = {"model_endpoint_name": TINY_MODEL}
    long_body = body(prompt="Go", max_new_tokens=200, temperature=1.0)
    with client.stream("POST", "v1/llm/completions-stream", params=params, json=long_body) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    deadline = time.monotonic() + 10
    while handle.stats.remote().result().num_running and time.monotonic() < deadline:
        time.sleep(0.1)
    stats = handle.stats.remote().result()
    assert stats.num_running == 0 and stats.num_waiting == 0


def test_model_endpoints(client):
    listing = client.get("v1/llm/model-endpoints").json()["model_endpoints"]
    assert [e["name"] for e in listing] == [TINY_MODEL]
    assert client.get("readyz").status_code == 200

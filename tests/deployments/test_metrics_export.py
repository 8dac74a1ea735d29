"""Requests move the llmserve metrics that Ray exports on the node's Prometheus port."""

import re
import time

import httpx
import pytest
import ray

from tests.deployments.fake_engine import FAKE_MODELS

MODEL = FAKE_MODELS[0]
EXPORT_DEADLINE_S = 60  # Ray's agents export every few seconds


def metrics_url() -> str:
    port = ray._private.worker.global_worker.node.metrics_export_port
    return f"http://127.0.0.1:{port}/metrics"


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (one sample per replica worker)."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"{re.escape(name)}\{{(.*)\}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            total += float(match.group(2))
    return total


def scrape() -> str:
    try:
        return httpx.get(metrics_url(), timeout=10).text
    except httpx.TransportError:
        return ""


def wait_for(name: str, minimum: float, **labels: str) -> float:
    deadline = time.monotonic() + EXPORT_DEADLINE_S
    while True:
        value = metric_value(scrape(), name, **labels)
        if value >= minimum or time.monotonic() > deadline:
            return value
        time.sleep(1)


@pytest.fixture(scope="module")
def client(fake_app_url: str):
    with httpx.Client(base_url=fake_app_url, timeout=60) as client:
        yield client


def test_requests_move_counters_histograms_and_error_counts(client):
    before = scrape()
    tokens = metric_value(before, "ray_llmserve_generation_tokens_total", model_name=MODEL)
    labels = {"model_name": MODEL, "finished_reason": "length"}  # the baseline counts the same samples
    finished = metric_value(before, "ray_llmserve_request_success_total", **labels)
    ttft = metric_value(before, "ray_llmserve_time_to_first_token_seconds_count", model_name=MODEL)
    not_found = metric_value(before, "ray_llmserve_http_errors_total", status_code="404")

    body = {"prompt": "hi", "max_new_tokens": 4, "temperature": 0}
    params = {"model_endpoint_name": MODEL}
    assert client.post("v1/llm/completions-sync", params=params, json=body).status_code == 200
    with client.stream("POST", "v1/llm/completions-stream", params=params, json=body) as response:
        assert response.status_code == 200
        response.read()
    missing = client.post("v1/llm/completions-sync", params={"model_endpoint_name": "nope"}, json=body)
    assert missing.status_code == 404

    assert wait_for("ray_llmserve_generation_tokens_total", tokens + 8, model_name=MODEL) >= tokens + 8
    assert wait_for("ray_llmserve_request_success_total", finished + 2, **labels) >= finished + 2
    ttft_count = wait_for("ray_llmserve_time_to_first_token_seconds_count", ttft + 2, model_name=MODEL)
    assert ttft_count >= ttft + 2
    assert wait_for("ray_llmserve_http_errors_total", not_found + 1, status_code="404") >= not_found + 1
    text = scrape()
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert f"ray_llmserve_{gauge}{{" in text, gauge

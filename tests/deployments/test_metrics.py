"""Metrics, readiness and log forwarding without Ray: metric objects are recorded by a fake backend."""

import logging
from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI, HTTPException

from deployments.config import ModelConfig
from deployments.health import LOADING, READY, UNAVAILABLE, model_state, readiness
from deployments.http_metrics import HttpErrorMetrics
from deployments.metrics import ModelMetrics
from deployments.model_server import ModelServer
from deployments.replica_logging import copy_library_logs_to_stderr, forward_library_logs
from deployments.wire import ModelRequest
from engine.errors import ContextLengthError
from engine.types import EngineStats, FinishReason, SamplingParams, TokenDelta
from tests.deployments.fake_engine import MAX_MODEL_LEN, fake_factory


class FakeMetric:
    def __init__(self, name, description="", boundaries=None, tag_keys=()):
        self.name, self.tag_keys, self.default_tags = name, tag_keys, {}
        self.calls: list[tuple[str, float, dict]] = []

    def set_default_tags(self, tags):
        self.default_tags = dict(tags)
        return self

    def _add(self, kind, value, tags):
        self.calls.append((kind, value, {**self.default_tags, **(tags or {})}))

    def inc(self, value=1.0, tags=None):
        self._add("inc", value, tags)

    def observe(self, value, tags=None):
        self._add("observe", value, tags)

    def set(self, value, tags=None):
        self._add("set", value, tags)


FAKE_BACKEND = SimpleNamespace(Counter=FakeMetric, Gauge=FakeMetric, Histogram=FakeMetric)


def values(metric: FakeMetric) -> list[float]:
    return [v for _, v, _ in metric.calls]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def delta(n: int, reason: FinishReason | None = None) -> TokenDelta:
    return TokenDelta("r", "x", 5, n, None, reason)


def test_request_timer_records_ttft_tpot_e2e_tokens_and_finish_reason():
    metrics, clock = ModelMetrics("m", backend=FAKE_BACKEND), Clock()
    timer = metrics.start_request(clock)
    clock.now = 0.5
    timer.on_delta(delta(1))
    clock.now = 1.5
    timer.on_delta(delta(5, FinishReason.LENGTH))
    timer.on_end()
    timer.on_end()  # recorded once
    assert values(metrics.ttft_s) == [0.5]
    assert values(metrics.tpot_s) == [0.25]  # (1.5 - 0.5) / (5 - 1)
    assert values(metrics.e2e_s) == [1.5]
    assert values(metrics.prompt_tokens) == [5] and values(metrics.generation_tokens) == [5]
    assert metrics.request_success.calls == [("inc", 1.0, {"model_name": "m", "finished_reason": "length"})]
    assert metrics.ttft_s.default_tags == {"model_name": "m"}


def test_request_closed_early_counts_as_abort_and_errors_by_status():
    metrics = ModelMetrics("m", backend=FAKE_BACKEND)
    timer = metrics.start_request()
    timer.on_end()
    assert metrics.request_success.calls[0][2]["finished_reason"] == "abort"
    assert metrics.prompt_tokens.calls == []  # no delta, nothing to count (Ray refuses inc(0))
    failed = metrics.start_request()
    failed.on_error(429)
    failed.on_end()
    assert metrics.request_errors.calls == [("inc", 1.0, {"model_name": "m", "status_code": "429"})]
    assert len(metrics.request_success.calls) == 1


def test_gauges_from_engine_stats():
    metrics = ModelMetrics("m", backend=FAKE_BACKEND)
    metrics.record_stats(EngineStats(num_running=3, num_waiting=2, kv_cache_usage=0.25, max_model_len=64))
    assert (values(metrics.num_running), values(metrics.num_waiting)) == ([3], [2])
    assert values(metrics.kv_cache_usage) == [0.25]


def test_engine_totals_become_counter_increments():
    metrics = ModelMetrics("m", backend=FAKE_BACKEND)
    for preemptions, queries, hits in [(0, 100, 0), (2, 300, 160), (2, 300, 160), (5, 400, 192)]:
        stats = EngineStats(0, 0, 0.0, 64, preemptions, prefix_cache_queries=queries, prefix_cache_hits=hits)
        metrics.record_stats(stats)
    totals = metrics.engine_totals
    assert values(totals["num_preemptions"]) == [2, 3]
    assert values(totals["prefix_cache_queries"]) == [100, 200, 100]
    assert values(totals["prefix_cache_hits"]) == [160, 32]
    assert totals["prefix_cache_hits"].name == "llmserve_prefix_cache_hits"


def test_engine_steps_and_holds_become_counters_by_kind():
    metrics = ModelMetrics("m", backend=FAKE_BACKEND)
    for decode, prefill, decode_s, prefill_s, hold_s in [(3, 1, 0.3, 0.2, 0.0), (5, 1, 0.5, 0.2, 0.05)]:
        stats = EngineStats(
            1, 0, 0.0, 64, num_decode_steps=decode, num_prefill_steps=prefill, decode_step_time_s=decode_s,
            prefill_step_time_s=prefill_s, refill_hold_time_s=hold_s,
        )  # fmt: skip
        metrics.record_stats(stats)
    steps, step_s = metrics.engine_totals["num_decode_steps"], metrics.engine_totals["decode_step_time_s"]
    assert steps.name == "llmserve_engine_steps" and step_s.name == "llmserve_engine_step_seconds"
    assert [(v, tags["kind"]) for _, v, tags in steps.calls] == [(3, "decode"), (1, "prefill"), (2, "decode")]
    assert [(round(v, 6), tags["kind"]) for _, v, tags in step_s.calls] == [
        (0.3, "decode"), (0.2, "prefill"), (0.2, "decode"),
    ]  # fmt: skip
    assert values(metrics.engine_totals["refill_hold_time_s"]) == [0.05]


@pytest.fixture
def server() -> ModelServer:
    server = ModelServer(ModelConfig(name="fake", model="fake"), engine_factory=fake_factory)
    server._metrics = ModelMetrics("fake", backend=FAKE_BACKEND)
    return server


async def test_model_server_records_streams_and_refusals(server):
    params = SamplingParams(max_new_tokens=3)
    [d async for d in server.generate_stream(ModelRequest("a", "hi", params))]
    await server.generate(ModelRequest("b", "hi", params))
    metrics = server._metrics
    assert len(metrics.ttft_s.calls) == 2 and len(metrics.e2e_s.calls) == 2
    assert values(metrics.generation_tokens) == [3, 3]
    assert {c[2]["finished_reason"] for c in metrics.request_success.calls} == {"length"}
    with pytest.raises(ContextLengthError):
        await server.generate(ModelRequest("c", "x" * MAX_MODEL_LEN, params))
    assert metrics.request_errors.calls[-1][2]["status_code"] == "400"
    assert values(metrics.num_running) != []  # the gauge task ran once on the first request
    metrics.stop()


async def test_model_server_counts_a_stream_left_early_as_abort(server):
    stream = server.generate_stream(ModelRequest("a", "hi", SamplingParams(max_new_tokens=5)))
    await anext(stream)
    await stream.aclose()
    assert [c[2]["finished_reason"] for c in server._metrics.request_success.calls] == ["abort"]
    server._metrics.stop()


async def test_http_error_middleware_counts_by_status_and_route_template():
    app = FastAPI()

    @app.get("/items/{name}")
    async def item(name: str) -> dict:
        if name == "bad":
            raise HTTPException(status_code=429)
        return {"name": name}

    middleware = HttpErrorMetrics(app, backend=FAKE_BACKEND)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(middleware), base_url="http://t") as client:
        assert (await client.get("/items/ok")).status_code == 200
        assert (await client.get("/items/bad")).status_code == 429
        assert (await client.get("/nowhere")).status_code == 404
    tags = [c[2] for c in middleware.errors.calls]
    assert tags == [
        {"status_code": "429", "route": "/items/{name}"},
        {"status_code": "404", "route": "unmatched"},
    ]


def test_readiness_names_each_model_state():
    assert model_state(True) == READY
    assert model_state(TimeoutError()) == LOADING
    assert model_state(RuntimeError("replica died")) == UNAVAILABLE
    assert readiness({"a": READY, "b": READY}) == (200, {"status": "ok", "models": {"a": READY, "b": READY}})
    status_code, body = readiness({"a": READY, "b": LOADING})
    assert status_code == 503 and body["status"] == "loading"
    assert body["models"] == {"a": "ready", "b": "loading"} and "b (loading)" in body["detail"]


def test_library_logs_reach_the_serve_logger():
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    serve_logger, keep = logging.getLogger("ray.serve"), Keep()
    serve_logger.addHandler(keep)
    try:
        forward_library_logs(("test_library",))
        forward_library_logs(("test_library",))  # idempotent: one copy of each record
        logging.getLogger("test_library").info("loading %s", "m")
    finally:
        serve_logger.removeHandler(keep)
    assert [r.getMessage() for r in records] == ["loading m"]


def test_library_logs_are_copied_to_stderr_once(capfd):
    """Serve's throughput mode keeps replica logs off stderr: the loading records are written there too."""
    name = "test_library_stderr"
    forward_library_logs((name,))
    copy_library_logs_to_stderr((name,))
    copy_library_logs_to_stderr((name,))  # idempotent: one copy of each record
    logging.getLogger(name).info("loaded %s in %.1f s", "m", 0.8)
    # (Serve's own stderr handler, which an earlier test may have set up, writes its copy under "serve".)
    ours = [line for line in capfd.readouterr().err.splitlines() if f" {name} -- " in line]
    assert len(ours) == 1 and ours[0].startswith("INFO ") and ours[0].endswith("loaded m in 0.8 s")

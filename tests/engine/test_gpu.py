"""The same engine on CUDA (run on a GPU machine; skipped elsewhere)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.core import EngineCore
from engine.types import EngineConfig
from tests.engine.conftest import request, run_to_completion

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_on_cuda_matches_transformers_greedy(tiny_model_dir, dtype):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype).cuda().eval()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype).cuda().eval()
    core = EngineCore(
        model, tokenizer, EngineConfig(max_model_len=256, max_num_batched_tokens=8), torch.device("cuda")
    )
    prompts = ["The quick brown fox", "Hello, world! How are you", "def add(a, b):"]
    for p in prompts:
        core.add_request(request(tokenizer, p, max_new_tokens=12, ignore_eos=True, return_log_probs=True))
    out = run_to_completion(core)
    for p in prompts:
        ids = torch.tensor([tokenizer(p).input_ids], device="cuda")
        with torch.inference_mode():
            ref = reference.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)[
                0, ids.shape[1] :
            ]
        got = [d.token.token_id for d in out[p]]
        if dtype == torch.float32:
            assert got == ref.tolist(), p
        else:  # bf16 kernels differ between a packed and a padded batch: the first token must agree
            assert got[0] == ref[0].item(), p

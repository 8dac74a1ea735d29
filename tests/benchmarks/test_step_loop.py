"""benchmarks/step_loop.py's closed loop on the tiny model: the concurrency it keeps, the staggered start,
and every completion token of the timed steps counted once."""

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # as run as a script

from benchmarks import step_loop
from engine.core import EngineCore
from engine.types import EngineConfig


class CountingCore:
    """An EngineCore that records, before each step, how many requests it holds and how many are new."""

    def __init__(self, core: EngineCore) -> None:
        self.core, self.scheduler, self.step_totals = core, core.scheduler, core.step_totals
        self.held: list[int] = []
        self.added: list[int] = []
        self._added = 0

    def add_request(self, request) -> None:
        self._added += 1
        self.core.add_request(request)

    def step(self):
        self.held.append(len(self.scheduler.running) + len(self.scheduler.waiting))
        self.added.append(self._added)
        self._added = 0
        return self.core.step()


def test_the_loop_keeps_its_concurrency_and_counts_each_generated_token_once(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = EngineConfig(max_num_seqs=8, max_model_len=256, kv_cache_bytes=8 * 2**20, num_threads=1)
    core = CountingCore(EngineCore(model, tokenizer, config, torch.device("cpu")))
    prompts = iter([tuple(tokenizer(f"prompt number {i} of the loop").input_ids) for i in range(200)])
    with torch.inference_mode():
        result = step_loop.closed_loop(core, prompts, 4, 6, warmup_steps=5, max_steps=31)

    assert core.added[:4] == [1, 1, 1, 1]  # admitted one a step, not all at once
    assert core.held[3:] == [4] * (len(core.held) - 3)  # then refilled to 4 before every step
    assert result.concurrency == 4 and result.num_steps == 31
    # every step makes one token for each request it holds (these prompts take one step, which also
    # makes the first token): the count is exact, the finished requests' last tokens included
    assert result.num_tokens == sum(core.held[-31:]) == 31 * 4
    assert 0 < result.num_prefill_steps <= result.num_steps
    assert result.tok_per_s > 0 and result.step_ms > 0

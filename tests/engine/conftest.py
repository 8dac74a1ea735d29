"""Engine fixtures: the tiny model loaded once, and a fresh EngineCore per test."""

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine import native_build
from engine.async_engine import AsyncEngine
from engine.core import EngineCore
from engine.types import EngineConfig, GenerationRequest, SamplingParams, TokenDelta
from tests.kernel_report import record_kernel
from tests.tiny_model import build_tiny_model

# Every instruction-set build of the native kernels this CPU can execute (engine/native_build.py).
ISA_VARIANTS = [pytest.param(v, id=v.name) for v in native_build.runnable_variants()]


def kernel_of(load, name: str, variant: native_build.IsaVariant):
    """The kernel `name` in its `variant` build, recorded for the run's summary; skips the test when
    that build has no path for this CPU (a build failure raises under LLMSERVE_NATIVE_REQUIRED=1)."""
    kernel = load(variant)
    record_kernel(name, variant.name, kernel.isa if kernel is not None else None)
    if kernel is None:
        pytest.skip(f"the {variant.name} build of {name} has no path for this CPU")
    return kernel


@pytest.fixture(scope="session")
def tiny(tiny_model_dir: Path):
    """The engine's copy: the engine switches its attention to the paged implementation."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_reference(tiny_model_dir: Path):
    """A second copy left as transformers loads it, for reference generations."""
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def gemma3_float32():
    """Gemma 3 270M in float32, loaded once per test process: the engine's copy and a deep copy of it left
    as transformers loads it, for reference generations (one tokenizer load: ~3 s for its 262k vocabulary)."""
    import copy

    from model_zoo import resolve
    from model_zoo.catalogue import GEMMA3_270M
    from model_zoo.loader import load_model

    engine_copy = load_model(resolve(GEMMA3_270M.name), dtype=torch.float32)
    return engine_copy, copy.deepcopy(engine_copy.model).eval()


@pytest.fixture(scope="session")
def tiny_eos(tmp_path_factory: pytest.TempPathFactory):
    """A tiny model whose EOS logit is boosted, so generations end early."""
    folder = build_tiny_model(tmp_path_factory.mktemp("tiny_eos"), eos_bias=5.0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def make_core(model_and_tokenizer, **config) -> EngineCore:
    model, tokenizer = model_and_tokenizer
    config = {"max_num_seqs": 16, "max_model_len": 256, "kv_cache_bytes": 8 * 2**20, **config}
    return EngineCore(model, tokenizer, EngineConfig(**config), torch.device("cpu"))


def make_async_engine(model_and_tokenizer, **config):
    """A small AsyncEngine on one torch thread; callers shut it down."""
    model, tokenizer = model_and_tokenizer
    config = {
        "max_num_seqs": 4,
        "max_model_len": 256,
        "kv_cache_bytes": 8 * 2**20,
        "num_threads": 1,
        **config,
    }
    return AsyncEngine(model, tokenizer, EngineConfig(**config))


@contextmanager
def gated_steps(engine: AsyncEngine) -> Iterator[threading.Semaphore]:
    """The engine thread takes a step only when the test releases the semaphore (once per step), so a
    test says how many steps happen between two of its checks instead of timing them; on leaving, the
    steps run freely again."""
    gate, real_step = threading.Semaphore(0), engine.core.step

    def gated_step():
        if not gate.acquire(timeout=30):
            raise TimeoutError("the test never let the engine step")
        return real_step()

    engine.core.step = gated_step
    try:
        yield gate
    finally:
        engine.core.step = real_step
        gate.release(1000)  # a step already waiting at the gate


def request(tokenizer, prompt: str, request_id: str | None = None, **params) -> GenerationRequest:
    ids = tuple(tokenizer(prompt).input_ids)
    params = {"max_new_tokens": 12, "temperature": 0.0, **params}
    return GenerationRequest(request_id or prompt, ids, SamplingParams(**params))


def run_to_completion(core: EngineCore, max_steps: int = 10_000) -> dict[str, list[TokenDelta]]:
    """Step until every request finished; deltas grouped by request id."""
    out: dict[str, list[TokenDelta]] = {}
    with torch.inference_mode():
        for _ in range(max_steps):
            if not core.has_unfinished:
                return out
            for delta in core.step():
                out.setdefault(delta.request_id, []).append(delta)
    raise AssertionError("engine did not finish")


def text_of(deltas: list[TokenDelta]) -> str:
    return "".join(d.text for d in deltas)

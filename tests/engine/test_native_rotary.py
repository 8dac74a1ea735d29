"""The C rotary + KV-cache write gives torch's bits (transformers' apply_rotary) and fills the right slots."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine import native_rotary
from engine.fast_forward import apply_rotary
from tests.engine.conftest import ISA_VARIANTS, kernel_of, make_core, request, run_to_completion, text_of


@pytest.fixture(scope="module", params=ISA_VARIANTS)
def kernel(request):
    return kernel_of(native_rotary.load, "rotary_kv", request.param)


# (q heads, kv heads, head_dim): SmolLM2-135M, grouped 128s, one kv head of 256, plain multi-head 32s
SHAPES = [(9, 3, 64), (8, 2, 128), (4, 1, 256), (2, 2, 32)]


@pytest.mark.parametrize(("q_heads", "kv_heads", "head_dim"), SHAPES)
def test_the_kernel_gives_torchs_bits_and_writes_the_slots(kernel, q_heads, kv_heads, head_dim):
    assert kernel.matches(apply_rotary, q_heads, kv_heads, head_dim)


def test_rows_of_a_wider_product_are_rotated_in_place(kernel):
    """The fused product may hold more columns than q, k and v (rows `stride` apart): only its q/k heads
    change, and the columns after v are left alone."""
    gen = torch.Generator().manual_seed(1)
    q_heads, kv_heads, hd, tokens = 3, 1, 64, 5
    width = (q_heads + 2 * kv_heads) * hd
    wide = torch.randn(tokens, width + 16, generator=gen).bfloat16()
    qkv = wide[:, :width]
    angles = torch.rand(tokens, hd, generator=gen) * 50
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    k_end = (q_heads + kv_heads) * hd
    expected = apply_rotary(qkv[:, :k_end].reshape(tokens, -1, hd), cos[:, None], sin[:, None])
    tail, values = wide[:, width:].clone(), qkv[:, k_end:].clone()
    k_cache = torch.zeros(8, kv_heads, hd, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([7, 0, 3, 5, 1])
    kernel(qkv, cos, sin, slots, k_cache, v_cache, q_heads)
    assert torch.equal(qkv[:, :k_end].reshape(tokens, -1, hd), expected)
    assert torch.equal(qkv[:, k_end:], values) and torch.equal(wide[:, width:], tail)
    assert torch.equal(v_cache[slots].view(tokens, -1), values)
    assert not k_cache[[2, 4, 6]].any()  # slots no token owns stay untouched


def test_a_kernel_that_differs_from_torch_is_refused(kernel):
    def off_by_a_bit(x, cos, sin):
        out = apply_rotary(x, cos, sin)
        out.view(-1)[0] = out.view(-1)[0] * 1.01 + 0.01
        return out

    assert not kernel.matches(off_by_a_bit, 9, 3, 64)


def test_bad_inputs_are_refused(kernel):
    qkv = torch.zeros(2, 5 * 64, dtype=torch.bfloat16)
    cos = sin = torch.zeros(2, 64, dtype=torch.bfloat16)
    cache = torch.zeros(4, 1, 64, dtype=torch.bfloat16)
    slots = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="bf16"):
        kernel(qkv.float(), cos, sin, slots, cache, cache, 3)
    with pytest.raises(ValueError, match="one row per token"):
        kernel(qkv, cos[:1], sin[:1], slots, cache, cache, 3)
    with pytest.raises(ValueError, match="q, k and v heads"):
        kernel(qkv, cos, sin, slots, cache, cache, 4)
    with pytest.raises(ValueError, match="even head dims"):
        odd, cos63 = torch.zeros(4, 1, 63, dtype=torch.bfloat16), torch.zeros(2, 63, dtype=torch.bfloat16)
        kernel(torch.zeros(2, 5 * 63, dtype=torch.bfloat16), cos63, cos63, slots, odd, odd, 3)


@pytest.mark.skipif(native_rotary.load() is None, reason="no C compiler: the engine keeps torch's rotary")
def test_a_bf16_llama_uses_it_and_generates_the_same_text(tiny_model_dir):
    """The tiny Llama in bf16: the fast forward rotates and writes the cache in C, and greedy text is the
    same as with torch's operations (the float32 model keeps torch's: the kernel is bf16 only)."""
    texts = []
    for on in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        core = make_core((model, tokenizer), native_rotary=on, max_num_batched_tokens=24)
        layers = core.runner.fast_forward.layers
        assert all((layer.rotary is not None) == on for layer in layers)
        for i, prompt in enumerate(["Hello there", "1 2 3 4 5 6 7 8 9 10 " * 4, "The capital of"]):
            core.add_request(request(tokenizer, prompt, f"r{i}", max_new_tokens=24, ignore_eos=True))
        texts.append({rid: text_of(deltas) for rid, deltas in run_to_completion(core).items()})
    assert texts[0] == texts[1]

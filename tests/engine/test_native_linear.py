"""The C bf16 product kernel against a float64 reference, its batch invariance, and where it is used."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine import fusion, native_build, native_linear
from engine.fusion import PackedLinear, _can_pack
from tests.engine.conftest import ISA_VARIANTS, kernel_of, make_core, request, run_to_completion, text_of

native_kernel = native_linear.load()  # the server's build
needs_native_kernel = pytest.mark.skipif(
    native_kernel is None, reason="no C compiler, or neither AVX512-BF16 nor AVX2 + FMA on this CPU"
)


@pytest.fixture(scope="module", params=ISA_VARIANTS)
def kernel(request):
    return kernel_of(native_linear.load, "linear_bf16", request.param)


# SmolLM2's fused q/k/v and down shapes, a tiny one, and sizes that leave a partial 16-column block
SHAPES = [(960, 576), (576, 1536), (64, 48), (100, 64), (17, 2), (1, 30)]


def case(out_features, in_features, num_rows, seed=0, bias=False):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen).bfloat16()
    x = torch.randn(num_rows, in_features, generator=gen).bfloat16()
    b = torch.randn(out_features, generator=gen) if bias else None
    return weight, x, b


@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_products_match_a_float64_reference(kernel, out_features, in_features, bias):
    weight, x, b = case(out_features, in_features, 37, bias=bias)
    packed = kernel.pack(weight)
    expected = x.double() @ weight.double().T + (b.double() if bias else 0)
    for num_rows in (*range(1, 10), 16, 37):  # every tile height (up to 8 rows), and several tiles
        got = kernel(x[:num_rows], packed, out_features, b)
        assert got.dtype == torch.bfloat16 and got.shape == (num_rows, out_features)
        # float32 sums, then one rounding to bf16 (8 bits of mantissa)
        want = expected[:num_rows]
        scale = x.double().abs()[:num_rows] @ weight.double().abs().T
        assert ((got.double() - want).abs() <= scale * 2e-6 + want.abs() / 128).all()


@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
def test_a_rows_bits_do_not_depend_on_the_batch(kernel, out_features, in_features):
    """Alone, first, last, amid 300 rows, read through a strided view: always the same bits."""
    weight, x, _ = case(out_features, in_features, 300, seed=1)
    packed = kernel.pack(weight)
    alone = torch.cat([kernel(x[i : i + 1], packed, out_features, None) for i in range(len(x))])
    for start, stop in ((0, 2), (0, 5), (3, 20), (1, 300), (0, 300)):
        assert torch.equal(kernel(x[start:stop], packed, out_features, None), alone[start:stop])
    wide = torch.zeros(300, in_features + 6, dtype=torch.bfloat16)
    wide[:, 2 : 2 + in_features] = x
    assert torch.equal(kernel(wide[:, 2 : 2 + in_features], packed, out_features, None), alone)
    repeated = x[7:8].expand(9, -1)  # row stride 0
    assert torch.equal(kernel(repeated, packed, out_features, None), alone[7:8].expand(9, -1))


def test_no_rows_and_bad_input_are_handled(kernel):
    weight, x, _ = case(32, 16, 4)
    packed = kernel.pack(weight)
    assert kernel(x[:0], packed, 32, None).shape == (0, 32)
    with pytest.raises(ValueError, match="bfloat16"):
        kernel(x.float(), packed, 32, None)


def test_only_cpu_bf16_weights_with_an_even_input_size_are_supported():
    assert native_linear.supports(torch.zeros(8, 4, dtype=torch.bfloat16))
    assert not native_linear.supports(torch.zeros(8, 5, dtype=torch.bfloat16))  # k is read in pairs
    assert not native_linear.supports(torch.zeros(8, 4, dtype=torch.float32))
    assert not native_linear.supports(torch.zeros(8, 4, dtype=torch.float16))


@pytest.mark.parametrize("native", [True, False])
def test_packed_linear_takes_the_kernel_where_it_runs_else_onednn(native):
    weight, x, b = case(100, 64, 5, bias=True)
    linear = PackedLinear(weight, b.bfloat16(), native=native)
    assert linear.is_native == (native and native_kernel is not None)
    assert linear.is_packed == (not linear.is_native and _can_pack(weight))
    with torch.inference_mode():
        got = linear(x.view(5, 1, 64))
    assert got.shape == (5, 1, 100)
    expected = torch.nn.functional.linear(x.float(), weight.float(), b.bfloat16().float())
    torch.testing.assert_close(got.view(5, 100).float(), expected, atol=0.1, rtol=0.02)
    fp32 = PackedLinear(weight.float(), None, native=native)
    assert not fp32.is_native  # float32 stays on oneDNN


@needs_native_kernel
def test_a_bf16_engine_on_the_kernel_gives_the_same_greedy_text_alone_and_batched(tiny_model_dir: Path):
    """The engine's batch invariance in bf16 with its products on the kernel."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    core = make_core((model, tokenizer), dtype="bfloat16", enable_prefix_caching=False)
    products = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert products and all(m.is_native for m in products)
    prompts = ["Hello there", "The capital of France is", "1 2 3 4 5 6 7 8"]
    alone = []
    for i, prompt in enumerate(prompts):
        core.add_request(request(tokenizer, prompt, f"a{i}", max_new_tokens=20, ignore_eos=True))
        alone.append(text_of(run_to_completion(core)[f"a{i}"]))
    for i, prompt in enumerate(prompts):
        core.add_request(request(tokenizer, prompt, f"b{i}", max_new_tokens=20, ignore_eos=True))
    out = run_to_completion(core)
    assert [text_of(out[f"b{i}"]) for i in range(len(prompts))] == alone


@needs_native_kernel
def test_every_bf16_linear_takes_the_kernel_where_onednn_has_no_bf16_path(monkeypatch, tiny_model_dir: Path):
    """On an AVX2-only CPU oneDNN packs no bf16 weight: the projections that are not fused (o_proj,
    down_proj, a tied lm_head) must still leave torch's slow bf16 product for the kernel."""
    monkeypatch.setattr(fusion, "_can_pack", lambda weight: weight.dtype == torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    fusion.optimize_model(model)
    plain = [name for name, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert plain == []
    products = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert products and all(m.is_native for m in products)
    unfused = PackedLinear(torch.zeros(8, 4, dtype=torch.bfloat16), None, native=False)
    assert not unfused.is_native and not unfused.is_packed  # native off: torch's own product there


@pytest.mark.parametrize("bias", [False, True])
def test_outputs_round_to_bf16_as_torch_does(kernel, bias):
    """With one nonzero term per output the float32 sum is exact (a product of two bf16 fits in float32),
    so every output must be torch's own rounding of it: nearest, ties to even; inf and NaN kept."""
    gen = torch.Generator().manual_seed(3)
    rows, cols = 64, 96
    x = torch.zeros(rows, 2, dtype=torch.bfloat16)
    w = torch.zeros(cols, 2, dtype=torch.bfloat16)
    x[:, 0] = torch.randn(rows, generator=gen).bfloat16()
    w[:, 0] = torch.randn(cols, generator=gen).bfloat16()
    x[0, 0], x[1, 0] = float("inf"), float("nan")
    b = torch.randn(cols, generator=gen) if bias else None
    got = kernel(x, kernel.pack(w), cols, b)
    exact = x[:, :1].float() * w[:, 0].float() + (b if bias else 0)  # float32, as the kernel sums
    want = exact.bfloat16()
    assert torch.equal(got[2:], want[2:])
    assert torch.equal(got[0].isinf(), want[0].isinf()) and torch.isnan(got[1]).all()


def test_the_avx512f_and_avx2_builds_give_the_same_bits():
    """Both paths sum each output over k in ascending order with two FMAs a pair: one build's bits are
    the other's (so a cluster of mixed CPUs without AVX512-BF16 decodes alike)."""
    variants = {v.name: v for v in native_build.runnable_variants()}
    if not {"avx512f", "avx2"} <= variants.keys():
        pytest.skip("this CPU runs no AVX-512F build")
    wide, narrow = (kernel_of(native_linear.load, "linear_bf16", variants[n]) for n in ("avx512f", "avx2"))
    for out_features, in_features in SHAPES:
        weight, x, b = case(out_features, in_features, 37, seed=5, bias=True)
        packed = wide.pack(weight)
        assert torch.equal(wide(x, packed, out_features, b), narrow(x, packed, out_features, b))


@pytest.mark.parametrize("num_rows", [1, 2, 9, 16, 33])
@pytest.mark.parametrize("bias", [False, True])
def test_silu_in_the_kernel_gives_the_bits_of_the_product_silu_and_multiply(kernel, num_rows, bias):
    """One call for a Llama MLP's [gate; up] product, SiLU and multiply: torch's bits, whatever the rows."""
    hidden, in_features = 96, 64
    weight, x, b = case(2 * hidden, in_features, num_rows, seed=num_rows, bias=bias)
    packed = kernel.pack(weight)
    gate, up = kernel(x, packed, 2 * hidden, b).split([hidden, hidden], dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    assert torch.equal(kernel.silu_mul(x, packed, hidden, b), expected)
    assert torch.equal(kernel.silu_mul(x[:1], packed, hidden, b), expected[:1])  # a row alone: its bits


def test_the_kernels_silu_gives_torchs_bits_on_every_bf16_value_and_tells_other_activations(kernel):
    assert kernel.silu_mul_matches(torch.nn.SiLU())
    assert kernel.silu_mul_matches(torch.nn.functional.silu)
    assert not kernel.silu_mul_matches(torch.nn.GELU())  # `matches` is what keeps another act on torch


def test_silu_in_the_kernel_refuses_halves_that_are_not_whole_blocks(kernel):
    weight, x, _ = case(2 * 40, 64, 3)  # 40 is not a multiple of 16
    with pytest.raises(ValueError, match="refused"):
        kernel.silu_mul(x, kernel.pack(weight), 40, None)


@pytest.mark.parametrize("num_rows", [1, 2, 9, 16, 33])
@pytest.mark.parametrize(("out_features", "in_features"), [(576, 576), (576, 1536), (100, 64)])
def test_the_residual_add_in_the_kernel_gives_the_bits_of_the_product_then_torchs_add(
    kernel, num_rows, out_features, in_features
):
    weight, x, b = case(out_features, in_features, num_rows, seed=num_rows, bias=out_features == 100)
    packed = kernel.pack(weight)
    residual = (torch.randn(num_rows, out_features) * 3).bfloat16()
    expected = residual + kernel(x, packed, out_features, b)
    into = residual.clone()
    assert kernel.add_into(x, packed, out_features, b, into) is into  # in place
    assert torch.equal(into, expected)
    alone = residual[:1].clone()
    assert torch.equal(kernel.add_into(x[:1], packed, out_features, b, alone), expected[:1])


def test_the_kernels_residual_add_gives_torchs_bits_on_bf16_values(kernel):
    assert kernel.add_matches()  # random bit patterns (NaNs, infinities, overflows) and normal values


def test_the_residual_add_refuses_a_residual_of_another_shape(kernel):
    weight, x, _ = case(64, 48, 3)
    with pytest.raises(ValueError, match="residual must be"):
        kernel.add_into(x, kernel.pack(weight), 64, None, torch.zeros(3, 32, dtype=torch.bfloat16))


def test_the_native_build_runs_on_amx_tiles_where_the_cpu_has_them():
    """On a CPU with AMX (and Linux granting its tile state) the server's build takes the tile path; a
    K that is not a multiple of 32 runs on AVX512-BF16 inside the same build (SHAPES covers both)."""
    flags = set(native_build._cpu_fingerprint().split())
    if not {"amx_tile", "amx_bf16"} <= flags:
        pytest.skip("this CPU has no AMX")
    assert kernel_of(native_linear.load, "linear_bf16", native_build.NATIVE).isa == "amx-bf16"

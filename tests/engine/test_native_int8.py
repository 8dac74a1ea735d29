"""The int8 product kernel (csrc/linear_int8.c): its exact formula in every instruction-set build, batch
invariance, edge rows, and where the engine uses it."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine import fusion, native_int8
from engine.fusion import PackedLinear
from tests.engine.conftest import ISA_VARIANTS, kernel_of, make_core, request, run_to_completion, text_of

needs_kernel = pytest.mark.skipif(native_int8.load() is None, reason="no C compiler")

# SmolLM2's q/k/v and down shapes, a tiny one, partial blocks, and input sizes not a multiple of 4
SHAPES = [(960, 576), (576, 1536), (64, 48), (100, 64), (17, 6), (5, 3), (33, 1)]


@pytest.fixture(scope="module", params=ISA_VARIANTS)
def kernel(request):
    return kernel_of(native_int8.load, "linear_int8", request.param)


def case(out_features, in_features, num_rows, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen).bfloat16()
    x = torch.randn(num_rows, in_features, generator=gen).bfloat16()
    return weight, x, torch.randn(out_features, generator=gen)


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The kernel's contract in torch: rows quantized in groups of GROUP inputs with 127 / max|x_g| (a
    true float32 division), each group's integer sum exact, the groups added in order by float32 fused
    multiply-adds of the sum and (row scale x weight scale), then the bias and one rounding to bf16."""
    q, sw = native_int8.quantize(weight)  # (N, Kp), (N, groups)
    group, (rows, k) = native_int8.GROUP, x.shape
    xf = torch.nn.functional.pad(x.float(), (0, q.shape[1] - k)).view(rows, -1, group)
    top = xf.abs().amax(dim=2)
    inv = torch.where(top > 0, torch.full_like(top, 127.0) / top, torch.zeros_like(top))
    xq = torch.round(xf * inv[..., None]).clamp(-127, 127)
    sums = torch.einsum("rgk,ngk->rng", xq.double(), q.double().view(len(q), -1, group)).float()  # exact
    acc = torch.zeros(rows, len(q), dtype=torch.float64)
    for g in range(sums.shape[2]):  # a float32 fma: the double product of two floats is exact
        scale = ((top[:, g, None] / 127) * sw[None, :, g]).double()
        acc = (sums[:, :, g].double() * scale + acc).float().double()
    y = acc.float()
    return (y + bias if bias is not None else y).bfloat16()


@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_products_follow_the_exact_formula(kernel, out_features, in_features, bias):
    weight, x, b = case(out_features, in_features, 37)
    b = b if bias else None
    packed, want = kernel.pack(weight), reference(x, weight, b)  # row by row: want[:n] is x[:n]'s
    for num_rows in (*range(1, 10), 16, 37):  # every tile height, and several tiles
        got = kernel(x[:num_rows], packed, b)
        assert got.dtype == torch.bfloat16 and got.shape == (num_rows, out_features)
        assert torch.equal(got, want[:num_rows])


def test_products_are_close_to_the_bf16_product(kernel):
    weight, x, _ = case(960, 576, 16, seed=2)
    got = kernel(x, kernel.pack(weight), None).float()
    exact = x.float() @ weight.float().T
    assert (got - exact).norm() / exact.norm() < 0.02


@pytest.mark.parametrize(("out_features", "in_features"), SHAPES[:4])
def test_a_rows_bits_do_not_depend_on_the_batch(kernel, out_features, in_features):
    weight, x, _ = case(out_features, in_features, 40, seed=1)
    packed = kernel.pack(weight)
    alone = torch.cat([kernel(x[i : i + 1], packed, None) for i in range(len(x))])
    for start, stop in ((0, 2), (3, 20), (1, 40)):
        assert torch.equal(kernel(x[start:stop], packed, None), alone[start:stop])
    wide = torch.zeros(40, in_features + 6, dtype=torch.bfloat16)
    wide[:, 2 : 2 + in_features] = x
    assert torch.equal(kernel(wide[:, 2 : 2 + in_features], packed, None), alone)


def test_zero_rows_zero_weights_and_non_finite_rows(kernel):
    weight, x, b = case(40, 64, 4, seed=3)
    weight[5] = 0
    x[1] = 0
    x[2, 7] = float("nan")
    x[3, 0] = float("inf")
    got = kernel(x, kernel.pack(weight), b)
    assert torch.equal(got[1], b.bfloat16())  # a zero row: the bias alone
    assert (got[0, 5] == b[5].bfloat16()).item()  # a zero weight row: the bias alone
    assert torch.isnan(got[2]).all() and torch.isnan(got[3]).all()
    assert kernel(x[:0], kernel.pack(weight), None).shape == (0, 40)
    with pytest.raises(ValueError, match="bfloat16"):
        kernel(x.float(), kernel.pack(weight), None)


def test_the_epilogues_give_the_product_then_torchs_operations(kernel):
    """silu_mul_at and add_into_at (SiLU and its multiply, the residual add, in the product's units) give the
    bits of the product followed by torch's operations, for every tile height and a bias."""
    weight, x, b = case(96, 64, 37, seed=4)  # [gate; up], halves of 48 (a multiple of 16)
    packed = kernel.pack(weight)
    for num_rows in (1, 5, 16, 37):
        both = kernel(x[:num_rows], packed, b)
        gate, up = both.split(48, dim=1)
        got = kernel.silu_mul_at(x[:num_rows], packed.address, 48, b)
        assert torch.equal(got, torch.nn.functional.silu(gate) * up)
        residual = torch.randn(num_rows, 96).bfloat16()
        want = residual + both
        assert kernel.add_into_at(x[:num_rows], packed.address, 96, b, residual) is residual
        assert torch.equal(residual, want)
    assert kernel.silu_mul_matches(torch.nn.SiLU()) and kernel.add_matches()
    with pytest.raises(ValueError, match="contiguous rows"):
        kernel.add_into_at(x[:4], packed.address, 96, b, torch.zeros(4, 95).bfloat16())


@needs_kernel
def test_packed_linear_takes_the_int8_kernel_only_for_bf16_weights():
    weight, x, b = case(100, 64, 5)
    linear = PackedLinear(weight, b.bfloat16(), int8=True)
    assert linear.is_int8 and not linear.is_native and not linear.is_packed
    with torch.inference_mode():
        got = linear(x.view(5, 1, 64))
    assert got.shape == (5, 1, 100)
    assert torch.equal(got.view(5, 100), reference(x, weight, b.bfloat16().float()))
    assert not PackedLinear(weight.float(), None, int8=True).is_int8  # float32 models keep their products
    assert not PackedLinear(weight, None, int8=False).is_int8


@pytest.mark.parametrize(("isa", "warns"), [("amx-bf16", True), ("avx512bf16", False), ("avx2", False)])
def test_int8_warns_where_the_bf16_kernel_runs_on_amx(isa, warns, caplog):
    kernel = SimpleNamespace(isa=isa)  # what optimize_model reads of the bf16 kernel
    with caplog.at_level("WARNING", logger="engine"):
        fusion._warn_if_int8_is_slower(kernel)
        fusion._warn_if_int8_is_slower(None)  # no bf16 kernel here: nothing to compare with
    assert ("int8 kernel is slower" in caplog.text) is warns


@needs_kernel
@pytest.mark.parametrize("lm_head", [False, True], ids=["lm-head-bf16", "lm-head-int8"])
def test_an_int8_engine_quantizes_all_but_the_lm_head_and_is_batch_invariant(tiny_model_dir: Path, lm_head):
    """`int8_weights`: every product but the lm head's in int8; `int8_lm_head`: that one too."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    core = make_core(
        (model, tokenizer),
        dtype="bfloat16",
        int8_weights=True,
        int8_lm_head=lm_head,
        enable_prefix_caching=False,
    )
    products = {name: m for name, m in model.named_modules() if isinstance(m, PackedLinear)}
    assert fusion.INT8_SKIP == ("lm_head",)
    assert products.pop("lm_head").is_int8 == lm_head and all(m.is_int8 for m in products.values())
    prompts = ["Hello there", "The capital of France is", "1 2 3 4 5 6 7 8"]
    alone = []
    for i, prompt in enumerate(prompts):
        core.add_request(request(tokenizer, prompt, f"a{i}", max_new_tokens=16, ignore_eos=True))
        alone.append(text_of(run_to_completion(core)[f"a{i}"]))
    for i, prompt in enumerate(prompts):
        core.add_request(request(tokenizer, prompt, f"b{i}", max_new_tokens=16, ignore_eos=True))
    out = run_to_completion(core)
    assert [text_of(out[f"b{i}"]) for i in range(len(prompts))] == alone

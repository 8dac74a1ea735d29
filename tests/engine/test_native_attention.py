"""The C decode-attention kernel against a float64 reference, its batch invariance, and the fallback."""

import math

import pytest
import torch

from engine import native_attention, native_build
from tests.engine.conftest import ISA_VARIANTS, kernel_of, make_core, request, run_to_completion, text_of

native_kernel = native_attention.load()  # the server's build


@pytest.fixture(scope="module", params=ISA_VARIANTS)
def kernel(request):
    return kernel_of(native_attention.load, "decode_attention", request.param)


def reference(query, k_cache, v_cache, tables, lens, block_size, scale, window, softcap):
    """Textbook attention in float64, one sequence at a time, over the cache slots it owns."""
    num_seqs, num_heads, head_dim = query.shape
    group = num_heads // k_cache.shape[1]
    out = torch.empty(num_seqs, num_heads, head_dim, dtype=torch.float64)
    for s in range(num_seqs):
        length = int(lens[s])
        first = max(0, length - window) if window else 0
        pos = torch.arange(first, length)
        slots = tables[s, pos // block_size] * block_size + pos % block_size
        k = k_cache[slots].double()  # (n, Hk, hd)
        v = v_cache[slots].double()
        for h in range(num_heads):
            scores = k[:, h // group] @ query[s, h].double() * scale
            if softcap:
                scores = torch.tanh(scores / softcap) * softcap
            out[s, h] = scores.softmax(0) @ v[:, h // group]
    return out


def make_case(dtype, num_heads, num_kv_heads, head_dim, block_size, lens, seed=0):
    gen = torch.Generator().manual_seed(seed)
    width = max(math.ceil(n / block_size) for n in lens)
    num_blocks = len(lens) * width + 8
    k_cache = torch.randn(num_blocks * block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks * block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    blocks = torch.randperm(num_blocks, generator=gen)[: len(lens) * width]
    tables = blocks.view(len(lens), width).contiguous()
    # Every slot that no sequence owns holds NaN: a kernel that reads whole pages must not let the rest
    # of a sequence's last page (or another sequence's) into its result.
    owned = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    for s, n in enumerate(lens):
        pos = torch.arange(n)
        owned[tables[s, pos // block_size] * block_size + pos % block_size] = True
    k_cache[~owned] = float("nan")
    v_cache[~owned] = float("nan")
    query = torch.randn(len(lens), num_heads, head_dim, generator=gen).to(dtype)
    return query, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int64)


@pytest.mark.parametrize(
    ("dtype", "heads", "kv_heads", "head_dim", "block_size", "window", "softcap"),
    [
        (torch.float32, 9, 3, 64, 16, None, None),  # SmolLM2's shape, grouped heads
        (torch.float32, 4, 4, 32, 4, None, None),  # plain multi-head, generic head_dim and block size
        (torch.float32, 8, 1, 128, 16, 5, None),  # one kv head, sliding window
        (torch.float32, 4, 2, 64, 16, None, 30.0),  # logit soft-capping
        (torch.bfloat16, 9, 3, 64, 16, None, None),
        (torch.bfloat16, 4, 2, 128, 16, 7, None),
        (torch.bfloat16, 4, 1, 256, 16, 20, None),  # Gemma 3 270M's shape, a window across pages
        (torch.bfloat16, 8, 2, 64, 16, None, 30.0),  # four query heads a kv head, soft-capping
        (torch.bfloat16, 6, 1, 128, 16, None, None),  # six: the bf16 path's heads in chunks
    ],
)
def test_kernel_matches_reference(kernel, dtype, heads, kv_heads, head_dim, block_size, window, softcap):
    lens = [1, 5, 16, 17, 40, 33, 200]
    query, k_cache, v_cache, tables, ctx = make_case(dtype, heads, kv_heads, head_dim, block_size, lens)
    scale = head_dim**-0.5
    out = torch.full_like(query, float("nan"))
    kernel(query, k_cache, v_cache, tables, ctx, block_size, scale, window, softcap, out)
    expected = reference(query, k_cache, v_cache, tables, ctx, block_size, scale, window, softcap)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output's own rounding
    torch.testing.assert_close(out.double(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("window", [None, 9])
def test_prefill_rows_attend_causally_over_their_own_sequence(kernel, window):
    """A prefill of n tokens is n rows of one sequence's block table with context lengths 1..n: row i
    is causal attention of token i over tokens 0..i (within the window), as the model runner sends it."""
    _, k_cache, v_cache, tables, _ = make_case(torch.bfloat16, 9, 3, 64, 16, [45], seed=3)
    rows = torch.randn(45, 9, 64, generator=torch.Generator().manual_seed(4)).bfloat16()
    row_tables = tables.expand(45, -1).contiguous()
    lens = torch.arange(1, 46)
    out = torch.empty_like(rows)
    kernel(rows, k_cache, v_cache, row_tables, lens, 16, 0.125, window, None, out)
    k = k_cache[tables[0, torch.arange(45) // 16] * 16 + torch.arange(45) % 16].double()  # (45, 3, 64)
    v = v_cache[tables[0, torch.arange(45) // 16] * 16 + torch.arange(45) % 16].double()
    pos = torch.arange(45)
    mask = pos[None, :] <= pos[:, None]
    if window:
        mask &= pos[None, :] > pos[:, None] - window
    for h in range(9):
        scores = (rows[:, h].double() @ k[:, h // 3].T * 0.125).masked_fill(~mask, float("-inf"))
        expected = scores.softmax(-1) @ v[:, h // 3]
        torch.testing.assert_close(out[:, h].double(), expected, atol=1e-2, rtol=1e-2)


def test_kernel_softmax_holds_over_a_wide_range_of_scores(kernel):
    """Scores spread over hundreds (a large scale): the kernel's own exp, clamped far below the max."""
    lens = [3, 40, 77, 128]
    query, k_cache, v_cache, tables, ctx = make_case(torch.float32, 9, 3, 64, 16, lens, seed=2)
    for scale in (4.0, 0.01):
        out = torch.empty_like(query)
        kernel(query, k_cache, v_cache, tables, ctx, 16, scale, None, None, out)
        expected = reference(query, k_cache, v_cache, tables, ctx, 16, scale, None, None)
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_rows_do_not_depend_on_the_batch(kernel, dtype):
    lens = [23, 64, 7, 50, 31]
    query, k_cache, v_cache, tables, ctx = make_case(dtype, 9, 3, 64, 16, lens, seed=1)
    together = torch.empty_like(query)
    kernel(query, k_cache, v_cache, tables, ctx, 16, 0.125, None, None, together)
    for s in range(len(lens)):
        alone = torch.empty_like(query[s : s + 1])
        table = tables[s : s + 1, : math.ceil(lens[s] / 16)].contiguous()
        kernel(query[s : s + 1], k_cache, v_cache, table, ctx[s : s + 1], 16, 0.125, None, None, alone)
        assert torch.equal(alone[0], together[s])  # bit for bit


def test_kernel_rejects_mismatched_inputs(kernel):
    query, k_cache, v_cache, tables, ctx = make_case(torch.float32, 4, 2, 64, 16, [3])
    out = torch.empty_like(query)
    with pytest.raises(ValueError, match="int64"):
        kernel(query, k_cache, v_cache, tables.int(), ctx, 16, 0.125, None, None, out)
    with pytest.raises(ValueError, match="contiguous"):
        kernel(query, k_cache, v_cache.bfloat16(), tables, ctx, 16, 0.125, None, None, out)


def test_torch_path_and_kernel_give_the_same_greedy_text(tiny):
    _, tokenizer = tiny
    texts = []
    for native in (False, True):
        core = make_core(tiny, native_attention=native)
        for i, prompt in enumerate(["Hello there", "The capital of France is", "1 2 3"]):
            core.add_request(request(tokenizer, prompt, f"r{i}", max_new_tokens=24, ignore_eos=True))
        out = run_to_completion(core)
        texts.append([text_of(out[f"r{i}"]) for i in range(3)])
        assert (core.runner.attention_kernel is not None) == (native and native_kernel is not None)
    assert texts[0] == texts[1]


def test_without_a_compiler_attention_stays_on_torch(monkeypatch, tmp_path):
    monkeypatch.delenv(native_build.REQUIRED_ENV, raising=False)  # a server's default
    monkeypatch.setattr(native_build.shutil, "which", lambda name: None)
    native_attention.load.cache_clear()
    try:
        assert native_attention.load() is None
    finally:
        native_attention.load.cache_clear()


def test_a_failed_build_falls_back(monkeypatch, tmp_path):
    monkeypatch.delenv(native_build.REQUIRED_ENV, raising=False)  # a server's default
    monkeypatch.setenv(native_build.KERNEL_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setattr(native_build.shutil, "which", lambda name: "/bin/false")
    native_attention.load.cache_clear()
    try:
        assert native_attention.load() is None
        assert not list(tmp_path.glob("*.so"))
    finally:
        native_attention.load.cache_clear()


@pytest.mark.parametrize("cause", ["no compiler", "failed build"])
def test_where_kernels_are_required_a_missing_one_fails_loudly(monkeypatch, tmp_path, cause):
    """.ci/run sets LLMSERVE_NATIVE_REQUIRED=1: CI cannot pass with the kernels silently off."""
    monkeypatch.setenv(native_build.REQUIRED_ENV, "1")
    monkeypatch.setenv(native_build.KERNEL_DIR_ENV, str(tmp_path))
    compiler = None if cause == "no compiler" else "/bin/false"
    monkeypatch.setattr(native_build.shutil, "which", lambda name: compiler)
    native_attention.load.cache_clear()
    try:
        with pytest.raises(native_build.NativeBuildError):
            native_attention.load()
    finally:
        native_attention.load.cache_clear()


def test_the_variants_this_cpu_runs_include_the_servers_build():
    variants = native_build.runnable_variants()
    assert variants[0] == native_build.NATIVE
    has_avx2 = {"avx2", "fma"} <= set(native_build._cpu_fingerprint().split())
    is_x86 = native_build.platform.machine() == "x86_64"
    assert any(v.name == "avx2" for v in variants) == (has_avx2 and is_x86)


def test_only_cpu_float32_and_bfloat16_are_supported():
    assert native_attention.supports(torch.device("cpu"), torch.bfloat16)
    assert native_attention.supports(torch.device("cpu"), torch.float32)
    assert not native_attention.supports(torch.device("cpu"), torch.float16)
    assert not native_attention.supports(torch.device("cuda"), torch.bfloat16)


def test_loading_the_kernel_leaves_subnormal_floats_alone():
    """No crtfastmath.o: loading the library must not switch on flush-to-zero for the loading thread."""
    if native_attention.load() is None:
        pytest.skip("no C compiler here")
    subnormal = torch.tensor([1e-40], dtype=torch.float32)
    assert (subnormal * 1.0).item() != 0.0
    assert math.ldexp(1.0, -1040) * 1.0 != 0.0  # a float64 subnormal in plain Python

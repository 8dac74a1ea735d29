"""The C argmax gives torch.argmax's index on float32 and bf16 rows: ties, NaNs of either sign, signed zeros,
infinities."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import native_argmax
from engine.core import EngineCore
from engine.types import EngineConfig, GenerationRequest, SamplingParams
from tests.engine.conftest import ISA_VARIANTS, kernel_of


@pytest.fixture(scope="module", params=ISA_VARIANTS)
def kernel(request):
    return kernel_of(native_argmax.load, "argmax", request.param)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "row",
    [
        [1.0],
        [2.0, 3.0, 3.0, 1.0],  # equal maxima: the first
        [1.0, NAN, 3.0, NAN],  # a NaN is the largest: the first NaN
        [-NAN, 5.0, NAN],  # a negative NaN too
        [-0.0, 0.0],  # -0 equals +0: the first
        [0.0, -0.0, -1.0],
        [-INF, -INF, -INF],
        [-INF, -3.0e38, -1e-40],  # a subnormal (bf16's too)
        [1e-45, 0.0, -1e-45],  # float32's smallest subnormals
        [INF, NAN],
        [-2.0, -1.0, -1.5],
    ],
)
@pytest.mark.parametrize("dtype", native_argmax.DTYPES)
def test_the_special_values_pick_torchs_index(kernel, row, dtype):
    x = torch.tensor([row]).to(dtype)
    assert kernel(x).tolist() == x.argmax(dim=-1).tolist()


@pytest.mark.parametrize("width", [1, 31, 32, 33, 100, 1000, 49152])
@pytest.mark.parametrize("dtype", native_argmax.DTYPES)
def test_random_rows_with_ties_and_nans_pick_torchs_index(kernel, width, dtype):
    gen = torch.Generator().manual_seed(width)
    for trial in range(6):
        rows = 1 + trial * 7
        if trial % 2:  # few distinct values: ties everywhere, the maximum many times in a row
            x = torch.randint(-4, 5, (rows, width), generator=gen).to(dtype)
        else:
            x = (torch.randn(rows, width, generator=gen) * 10).to(dtype)
        if trial % 3 == 2:
            x[torch.rand(rows, width, generator=gen) < 0.01] = NAN
            x[torch.rand(rows, width, generator=gen) < 0.01] = -NAN
            x[x == 0] = -0.0
        assert torch.equal(kernel(x), x.argmax(dim=-1)), (rows, width, trial)


@pytest.mark.parametrize("dtype", native_argmax.DTYPES)
def test_rows_of_a_wider_tensor_are_read_in_place(kernel, dtype):
    gen = torch.Generator().manual_seed(1)
    wide = torch.randn(9, 300, generator=gen).to(dtype)
    rows = wide[::2, 50:250]  # a row stride of 600 values, each row contiguous
    assert torch.equal(kernel(rows), rows.argmax(dim=-1))


def test_what_it_cannot_read_is_refused(kernel):
    with pytest.raises(ValueError, match="float32 or bf16 rows"):
        kernel(torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="float32 or bf16 rows"):
        kernel(torch.randn(8, 2).t())  # values not contiguous


def test_greedy_steps_use_the_kernel_and_match_torchs_picks(tiny_model_dir, tiny, monkeypatch):
    """The engine (bf16, as served on CPUs) picks with the kernel (counted), and its tokens equal the
    same engine's with `native_argmax` off (torch's argmax)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    tokenizer = tiny[1]
    calls = []
    original = native_argmax.ArgmaxKernel.__call__

    def counting(self, logits):
        calls.append(logits.shape)
        return original(self, logits)

    monkeypatch.setattr(native_argmax.ArgmaxKernel, "__call__", counting)
    prompts = [(1, 5, 9, 13), (2, 4, 6), (7, 8, 9, 10, 11, 12)]
    params = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True, return_log_probs=True)

    def generate(native: bool) -> list[list[int]]:
        config = EngineConfig(max_num_seqs=4, max_model_len=64, native_argmax=native)
        core = EngineCore(model, tokenizer, config, torch.device("cpu"))
        for i, ids in enumerate(prompts):
            core.add_request(GenerationRequest(f"r{i}", ids, params))
        out: dict[str, list[int]] = {}
        while core.has_unfinished:
            for delta in core.step():
                out.setdefault(delta.request_id, []).append(delta.token.token_id)
        return [out[f"r{i}"] for i in range(len(prompts))]

    with torch.inference_mode():
        with_kernel = generate(True)
        num_calls = len(calls)
        with_torch = generate(False)
    assert num_calls > 0 and len(calls) == num_calls  # used with the switch on, never with it off
    assert with_kernel == with_torch
    assert all(len(tokens) == 12 for tokens in with_kernel)

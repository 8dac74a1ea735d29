"""The C RMSNorm gives torch's bits (transformers' operations) at every width and row count."""

import pytest
import torch

from engine import native_norm
from engine.fast_forward import gemma_rms_norm, rms_norm
from tests.engine.conftest import ISA_VARIANTS, kernel_of


@pytest.fixture(scope="module", params=ISA_VARIANTS)
def kernel(request):
    return kernel_of(native_norm.load, "rms_norm", request.param)


# SmolLM2's and Gemma 3 270M's hidden sizes, Gemma's head size, a tiny one, odd ones, and sizes long
# enough to run the levels of torch's cascaded sum (far wider rows may be summed by several threads in
# torch, in another order: `matches` refuses the kernel there, checked at load for the model's widths)
WIDTHS = [576, 640, 256, 64, 100, 1000, 2048, 5000, 16384]


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("gemma", [False, True])
def test_the_kernel_gives_torchs_bits(kernel, width, gemma):
    reference = gemma_rms_norm if gemma else rms_norm
    assert kernel.matches(reference, gemma, width)


def test_views_and_3d_inputs_are_normed_row_by_row(kernel):
    gen = torch.Generator().manual_seed(0)
    fused = torch.randn(7, 3 * 256, generator=gen).bfloat16()
    q = fused[:, 256:].view(7, 2, 256)  # a strided view, as Gemma's q/k norms get
    scale = torch.rand(256, generator=gen) + 0.5
    assert torch.equal(kernel.gemma(q, scale, 1e-6), gemma_rms_norm(q, scale, 1e-6))
    weight = torch.randn(576, generator=gen).bfloat16()
    for num_rows in (9, 41):  # 21 rows: split over the threads (16 or more)
        hidden = torch.randn(num_rows, 576, generator=gen).bfloat16()[::2]  # every other row
        assert torch.equal(kernel.llama(hidden, weight, 1e-5), rms_norm(hidden, weight, 1e-5))


def test_a_kernel_that_differs_from_torch_is_refused(kernel):
    """`matches` is what keeps a torch with another sum order on torch's own norms."""

    def off_by_a_bit(x, weight, eps):
        out = rms_norm(x, weight, eps)
        out.view(-1)[0] = out.view(-1)[0] * 1.01
        return out

    assert not kernel.matches(off_by_a_bit, False, 576)

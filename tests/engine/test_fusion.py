"""Model surgery: fused and packed linears compute what nn.Linear computes, and a row's bits do not
depend on how many rows share the product (batch invariance)."""

import pytest
import torch
from torch import nn

from engine.fusion import FusedProjection, PackedLinear, optimize_model, padded_rows

SHAPES = [(960, 576), (576, 1536), (3072, 576), (64, 48)]  # SmolLM2's q/k/v, down, gate/up; a tiny one


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
def test_packed_linear_rows_are_the_same_at_every_batch_size(dtype, out_features, in_features):
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(out_features, in_features, generator=gen) * 0.05).to(dtype)
    linear = PackedLinear(weight, None)
    x = torch.randn(300, in_features, generator=gen).to(dtype)
    with torch.inference_mode():
        rows = torch.cat([linear(x[i : i + 1]) for i in range(len(x))])  # each row alone
        for num_rows in (2, 3, 16, 17, 44, 256, 300):
            assert torch.equal(linear(x[:num_rows]), rows[:num_rows]), num_rows
        expected = nn.functional.linear(x.float(), weight.float())
        tolerance = 1e-4 if dtype == torch.float32 else 5e-2
        torch.testing.assert_close(rows.float(), expected, atol=tolerance, rtol=tolerance)


def test_row_counts_are_padded_to_few_sizes_with_little_waste():
    """oneDNN compiles and keeps a kernel per row count: a step's token count must not make new ones."""
    sizes = [padded_rows(m) for m in range(1, 513)]
    assert all(m <= size <= max(2, m + m / 8) for m, size in zip(range(1, 513), sizes, strict=True))
    assert sizes[:16] == [2, *range(2, 17)]  # decode batches run exactly (a lone row as two)
    assert sizes == sorted(sizes)
    assert len(set(sizes)) <= 56  # instead of 512


def test_fused_projections_match_the_modules_they_replace():
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = nn.Linear(32, 32), nn.Linear(32, 16), nn.Linear(32, 16)

        def forward(self, x):
            return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)

    block = Block().eval()
    x = torch.randn(5, 32)
    with torch.inference_mode():
        expected = block(x)
        assert optimize_model(block) == 3
        assert isinstance(block.fused_q_k_v, FusedProjection)
        torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)
        # a sibling called on its own (another input) computes its own product
        torch.testing.assert_close(block.k_proj(x[:2]), expected[:2, 32:48], atol=1e-5, rtol=1e-5)

"""Sampling: the pure logit transforms on hand-built tensors, and `sample()` on mixed batches."""

from __future__ import annotations

import math

import pytest
import torch

from engine.sampler import (
    SamplingMetadata,
    apply_penalties,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    compute_log_probs,
    make_generator,
    sample,
    sample_from_probs,
    token_counts,
)
from engine.types import SamplingParams

NEG_INF = float("-inf")
GREEDY = SamplingParams(temperature=0.0)


def _kept(logits: torch.Tensor) -> list[list[int]]:
    return [sorted(torch.nonzero(row > NEG_INF).flatten().tolist()) for row in logits]


def _sample(logits, params, outputs=None, generators=None):
    outputs = outputs if outputs is not None else [[] for _ in params]
    generators = generators if generators is not None else [make_generator(p.seed, "cpu") for p in params]
    return sample(logits, SamplingMetadata.build(params, outputs, generators, "cpu"))


# --- pure functions -------------------------------------------------------------------------


def test_top_k_keeps_exactly_k_per_row():
    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0, 5.0], [4.0, 3.0, 2.0, 1.0, 0.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    out = apply_top_k(logits, torch.tensor([2, 1, -1]))
    assert _kept(out) == [[1, 4], [0], [0, 1, 2, 3, 4]]
    assert torch.equal(out[0, [1, 4]], logits[0, [1, 4]])  # survivors are unchanged


def test_top_k_keeps_ties_with_the_kth_and_ignores_k_beyond_vocab():
    logits = torch.tensor([[1.0, 2.0, 2.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    out = apply_top_k(logits, torch.tensor([1, 10]))
    assert _kept(out) == [[1, 2], [0, 1, 2, 3]]


def test_top_k_with_a_max_k_hint_matches_without():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    top_k = torch.tensor([3, 7, 0, 1])
    assert torch.equal(apply_top_k(logits, top_k), apply_top_k(logits, top_k, max_k=7))


def test_top_p_keeps_the_nucleus_in_vocabulary_order():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
    logits = probs.log().repeat(5, 1)
    out = apply_top_p(logits, torch.tensor([0.7, 0.5, 0.81, 1.0, 0.0]))
    assert _kept(out) == [[1, 3], [1], [1, 2, 3], [0, 1, 2, 3], [1]]


def _nucleus_reference(logits: torch.Tensor, top_p: float) -> list[int]:
    if top_p >= 1.0:
        return list(range(logits.shape[-1]))
    probs, order = logits.softmax(-1).sort(descending=True)
    num_keep = max(1, int(((probs.cumsum(-1) - probs) < top_p).sum()))
    return sorted(order[:num_keep].tolist())


@pytest.mark.parametrize("scale", [0.1, 1.0, 5.0, 20.0])  # flat (full-sort path) to peaked (top-k path)
def test_top_p_matches_a_full_sort_reference_on_a_large_vocabulary(scale):
    logits = torch.randn(4, 5000, generator=torch.Generator().manual_seed(int(scale * 10))) * scale
    top_p = [0.3, 0.9, 0.99, 1.0]
    out = apply_top_p(logits, torch.tensor(top_p))
    assert _kept(out) == [_nucleus_reference(row, p) for row, p in zip(logits, top_p, strict=True)]


def test_penalties_change_only_generated_tokens():
    logits = torch.zeros(2, 5)
    counts = token_counts(torch.tensor([1, 1, 3, 4]), torch.tensor([3, 1]), 5)  # rows [1, 1, 3] and [4]
    assert counts.tolist() == [[0, 2, 0, 1, 0], [0, 0, 0, 0, 1]]
    assert token_counts(torch.tensor([2]), torch.tensor([0, 1, 0]), 3).tolist() == [
        [0] * 3,
        [0, 0, 1],
        [0] * 3,
    ]
    out = apply_penalties(
        logits, counts, presence=torch.tensor([0.5, 1.0]), frequency=torch.tensor([0.25, 0])
    )
    assert out.tolist() == [[0, -1.0, 0, -0.75, 0], [0, 0, 0, 0, -1.0]]
    assert logits.eq(0).all()  # the input is left alone


def test_negative_penalties_encourage_repeats():
    counts = torch.tensor([[0.0, 3.0]])
    out = apply_penalties(torch.zeros(1, 2), counts, torch.tensor([-1.0]), torch.tensor([-0.5]))
    assert out.tolist() == [[0.0, 2.5]]


def test_temperature_scales_rows_and_leaves_greedy_rows():
    logits = torch.tensor([[2.0, 4.0], [2.0, 4.0], [2.0, 4.0]])
    out = apply_temperature(logits, torch.tensor([0.0, 2.0, 0.5]))
    assert out.tolist() == [[2.0, 4.0], [1.0, 2.0], [4.0, 8.0]]
    assert torch.isfinite(out).all()


def test_log_probs_are_raw_log_softmax_at_the_chosen_tokens():
    logits = torch.randn(3, 11, generator=torch.Generator().manual_seed(1))
    chosen = torch.tensor([0, 5, 10])
    out = compute_log_probs(logits, chosen)
    assert torch.allclose(out, logits.log_softmax(-1)[torch.arange(3), chosen])
    assert (out <= 0).all()


def test_sample_from_probs_follows_the_distribution():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3]]).repeat(20000, 1)
    draws = sample_from_probs(probs, [None] * 20000)
    freq = torch.bincount(draws, minlength=4).float() / 20000
    assert freq[1] == 0  # zero-probability tokens are never drawn
    assert torch.allclose(freq, probs[0], atol=0.02)


# --- sample() -------------------------------------------------------------------------------


def test_all_greedy_batch_is_argmax_and_builds_no_sampling_tensors():
    logits = torch.randn(4, 32, generator=torch.Generator().manual_seed(2))
    meta = SamplingMetadata.build([GREEDY] * 4, [[]] * 4, [None] * 4, "cpu")
    assert meta.is_all_greedy and meta.temperature is None and meta.top_p is None and meta.output_ids is None
    out = sample(logits, meta)
    assert out.token_ids == logits.argmax(-1).tolist() and out.log_probs is None


def test_greedy_rows_in_a_mixed_batch_take_the_argmax():
    logits = torch.randn(6, 64, generator=torch.Generator().manual_seed(3))
    hot = SamplingParams(temperature=5.0, top_k=50)
    params = [GREEDY, hot, GREEDY, SamplingParams(temperature=0.0, top_p=0.1), hot, GREEDY]
    for _ in range(20):
        out = _sample(logits, params)
        for row in (0, 2, 3, 5):
            assert out.token_ids[row] == int(logits[row].argmax())


def test_greedy_with_penalties_avoids_repeating():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    params = [SamplingParams(temperature=0.0, presence_penalty=0.5)]
    assert _sample(logits, params, outputs=[[0]]).token_ids == [1]
    assert _sample(logits, params, outputs=[[1]]).token_ids == [0]
    assert _sample(logits, [GREEDY], outputs=[[0]]).token_ids == [0]


def test_top_k_one_and_tiny_top_p_are_greedy_and_only_their_rows_are_filtered():
    logits = torch.zeros(3, 100)
    logits[:, 7] = 1.0
    params = [SamplingParams(top_k=1), SamplingParams(top_p=1e-6), SamplingParams(temperature=1.0)]
    seen_other = set()
    for _ in range(30):
        out = _sample(logits, params)
        assert out.token_ids[:2] == [7, 7]
        seen_other.add(out.token_ids[2])
    assert len(seen_other) > 5  # the unfiltered row still samples the whole vocabulary


def _seeded_run(seed_row: int, others: list[SamplingParams], noise_seed: int) -> list[int]:
    """Five steps of one seeded request placed at `seed_row` among unrelated requests."""
    vocab = 256
    target = torch.randn(vocab, generator=torch.Generator().manual_seed(42))
    noise = torch.Generator().manual_seed(noise_seed)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, top_k=100, seed=1234)
    params = list(others)
    params.insert(seed_row, seeded)
    generators = [make_generator(p.seed, "cpu") for p in params]
    tokens = []
    for _ in range(5):
        logits = torch.randn(len(params), vocab, generator=noise)
        logits[seed_row] = target
        tokens.append(_sample(logits, params, generators=generators).token_ids[seed_row])
    return tokens


def test_seeded_row_ignores_batch_contents_and_position():
    alone = _seeded_run(0, [], noise_seed=0)
    others = [GREEDY, SamplingParams(temperature=0.7), SamplingParams(top_k=3, seed=9), SamplingParams()]
    assert _seeded_run(0, others, noise_seed=1) == alone
    assert _seeded_run(2, others, noise_seed=2) == alone
    assert _seeded_run(4, others[:2] + others[2:][::-1], noise_seed=3) == alone
    assert len(set(alone)) > 1  # it really samples


def test_different_seeds_differ():
    logits = torch.zeros(1, 1000)
    draws = {tuple(_sample(logits, [SamplingParams(seed=s)]).token_ids) for s in range(10)}
    assert len(draws) > 5


def test_log_probs_come_from_the_raw_logits():
    logits = torch.randn(4, 40, generator=torch.Generator().manual_seed(5))
    params = [
        SamplingParams(temperature=0.0, return_log_probs=True),
        SamplingParams(temperature=0.3, top_k=5, frequency_penalty=1.0, return_log_probs=True),
        SamplingParams(temperature=0.0, presence_penalty=2.0),
        SamplingParams(),
    ]
    out = _sample(logits, params, outputs=[[1], [2, 2], [int(logits[2].argmax())], []])
    expected = logits.log_softmax(-1)[torch.arange(4), torch.tensor(out.token_ids)]
    assert out.log_probs == pytest.approx(expected.tolist(), abs=1e-5)
    assert all(lp <= 0 for lp in out.log_probs)
    assert out.log_probs[0] == pytest.approx(float(logits[0].log_softmax(-1).max()), abs=1e-6)


def test_bfloat16_logits_are_accepted():
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(6)).bfloat16()
    params = [GREEDY, SamplingParams(top_p=0.5, return_log_probs=True), SamplingParams(presence_penalty=1.0)]
    out = _sample(logits, params, outputs=[[1], [], [2, 3]])
    assert out.token_ids[0] == int(logits[0].argmax())
    assert all(math.isfinite(lp) and lp <= 0 for lp in out.log_probs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_seeded_sampling_on_cuda_matches_alone_and_in_a_batch():
    target = torch.randn(1, 512, device="cuda")
    params = [SamplingParams(seed=7, top_p=0.95)]
    alone = sample(target, SamplingMetadata.build(params, [[]], [make_generator(7, "cuda")], "cuda"))
    batch = torch.cat([torch.randn(2, 512, device="cuda"), target])
    batch_params = [SamplingParams(), GREEDY, *params]
    generators = [None, None, make_generator(7, "cuda")]
    together = sample(batch, SamplingMetadata.build(batch_params, [[]] * 3, generators, "cuda"))
    assert together.token_ids[2] == alone.token_ids[0]

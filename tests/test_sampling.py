"""The sampler on hand-made logits: which tokens top-k / top-p keep, the repetition penalty, seeding, bad values."""

import math

import pytest
import torch

from komt.errors import GenerationError
from komt.generate.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    sample,
    sample_batch,
    token_logprobs,
    top_k_filter,
    top_p_filter,
)

NEG_INF = float("-inf")


def _probs_logits(probs):
    return torch.tensor([[math.log(p) for p in probs]])


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, -2.0, 4.0]])
    assert top_k_filter(logits, 2).tolist() == [[NEG_INF, 5.0, NEG_INF, NEG_INF, 4.0]]
    assert top_k_filter(logits, 0).tolist() == logits.tolist()  # 0 = off
    assert top_k_filter(logits, 10).tolist() == logits.tolist()  # k >= V keeps all


def test_top_k_works_row_by_row():
    logits = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    kept = top_k_filter(logits, 1) > NEG_INF
    assert kept.tolist() == [[False, False, True], [True, False, False]]


@pytest.mark.parametrize(
    "p, kept",
    [
        (0.45, [True, False, False, False]),  # 0.5 alone reaches 0.45
        (0.79, [True, True, False, False]),  # 0.5 + 0.3 reaches 0.79
        (0.81, [True, True, True, False]),  # 0.8 does not reach 0.81: needs the third
        (0.96, [True, True, True, True]),
        (0.1, [True, False, False, False]),  # the most likely token always stays
    ],
)
def test_top_p_keeps_the_smallest_nucleus_reaching_p(p, kept):
    # vocabulary order shuffled so the filter must sort: probabilities 0.15, 0.5, 0.05, 0.3
    logits = _probs_logits([0.15, 0.5, 0.05, 0.3])
    got = (top_p_filter(logits, p) > NEG_INF)[0].tolist()
    order = [1, 3, 0, 2]  # token ids by descending probability
    assert [got[i] for i in order] == kept


def test_top_p_one_keeps_everything():
    logits = torch.randn(2, 50)
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 3.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    got = apply_repetition_penalty(logits, seen, 2.0)
    assert got.tolist() == [[1.0, -4.0, 3.0, -1.0]]  # unseen tokens unchanged
    assert apply_repetition_penalty(logits, seen, 1.0) is logits


def test_penalty_applies_before_greedy_choice():
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    seen = torch.tensor([[True, False, False]])
    assert sample(logits, SamplingParams(), seen=seen).tolist() == [0]  # penalty 1: argmax stays
    assert sample(logits, SamplingParams(repetition_penalty=2.0), seen=seen).tolist() == [1]  # 3/2 < 2


def test_temperature_zero_is_argmax():
    logits = torch.randn(4, 100)
    assert torch.equal(sample(logits, SamplingParams(temperature=0.0, top_k=5)), logits.argmax(-1))


def test_sampling_draws_only_from_the_filtered_set():
    logits = torch.zeros(1, 10)
    logits[0, [2, 7]] = 1.0  # top-2 = {2, 7}; the rest have real probability without the filter
    gen = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, SamplingParams(temperature=1.0, top_k=2), gen)) for _ in range(200)}
    assert draws == {2, 7}


def test_sampling_follows_the_distribution():
    logits = _probs_logits([0.7, 0.2, 0.1]).expand(20000, 3)
    gen = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample(logits, SamplingParams(temperature=1.0), gen), minlength=3).float() / 20000
    torch.testing.assert_close(counts, torch.tensor([0.7, 0.2, 0.1]), atol=0.02, rtol=0)


def test_same_seed_same_tokens_different_seed_differs():
    logits = torch.zeros(64, 1000)
    params = SamplingParams(temperature=0.8, top_k=100, top_p=0.8)

    def draw(seed):
        return sample(logits, params, torch.Generator().manual_seed(seed)).tolist()

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
    ],
)
def test_invalid_values_raise(kwargs, message):
    with pytest.raises(GenerationError, match=message):
        SamplingParams(**kwargs)


# 0.999 quantiles of the chi-square distribution, by degrees of freedom (from tables; scipy is not a dependency).
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic of `counts` against `probs`, categories expecting < 5 draws pooled; (stat, dof)."""
    n = counts.sum()
    expected = probs * n
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum().reshape(1)]).double()
    wanted = torch.cat([expected[big], expected[~big].sum().reshape(1)]).double()
    keep = wanted > 0
    observed, wanted = observed[keep], wanted[keep]
    return float(((observed - wanted) ** 2 / wanted).sum()), int(keep.sum()) - 1


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_divides_the_logits(temperature):
    """The empirical distribution of 20000 draws is softmax(logits / T) (the multiplying mutant gives
    softmax(logits * T): at T = 0.5 and 2.0 the two are far apart; T = 1 could not tell them apart)."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, 1.5])
    n = 20000
    draws = sample(logits.expand(n, -1), SamplingParams(temperature=temperature), torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=8).float()
    want = (logits / temperature).softmax(-1)
    stat, dof = chi_square(counts, want)
    assert stat < CHI2_999[dof], (stat, dof)
    assert 0.5 * (counts / n - want).abs().sum() < 0.02  # total variation


# ---- one batched call for rows with their own settings ----------------------------------------------------

ROW_PARAMS = [SamplingParams(temperature=0.7, top_k=5), SamplingParams(),  # greedy
              SamplingParams(temperature=1.3, top_p=0.8, repetition_penalty=1.2),
              SamplingParams(temperature=1.0, top_k=20, top_p=0.5)]


def test_a_batch_row_samples_exactly_as_the_same_request_alone():
    """Row b of `sample_batch` (its params, its generator) == `sample` on row b alone with the same seed."""
    torch.manual_seed(0)
    logits = torch.randn(4, 300)
    seen = torch.rand(4, 300) < 0.1
    for step in range(5):  # several draws: the generators advance the same way alone and batched
        generators = [torch.Generator().manual_seed(10 + b) for b in range(4)]
        alone = [torch.Generator().manual_seed(10 + b) for b in range(4)]
        for _ in range(step):
            sample_batch(logits, ROW_PARAMS, generators, seen)
            for b in range(4):
                sample(logits[b : b + 1], ROW_PARAMS[b], alone[b], seen[b : b + 1])
        batched = sample_batch(logits, ROW_PARAMS, generators, seen)
        solo = torch.cat([sample(logits[b : b + 1], ROW_PARAMS[b], alone[b], seen[b : b + 1]) for b in range(4)])
        assert torch.equal(batched, solo)


def test_per_row_filters_equal_the_shared_ones():
    torch.manual_seed(1)
    logits = torch.randn(3, 50)
    ks, ps = [3, 0, 60], [0.3, 1.0, 0.9]
    by_row = top_k_filter(logits, torch.tensor(ks))
    assert all(torch.equal(by_row[b], top_k_filter(logits[b : b + 1], k)[0]) for b, k in enumerate(ks))
    by_row = top_p_filter(logits, torch.tensor(ps))
    assert all(torch.equal(by_row[b], top_p_filter(logits[b : b + 1], p)[0]) for b, p in enumerate(ps))


def test_a_tiny_temperature_is_greedy_and_never_nan():
    logits = torch.randn(8, 100) * 30
    assert torch.equal(sample(logits, SamplingParams(temperature=1e-300)), logits.argmax(-1))


def test_logprobs_are_the_raw_log_softmax():
    logits = torch.randn(2, 30)
    chosen, values, ids = token_logprobs(logits, torch.tensor([4, 7]), top=3)
    reference = logits.log_softmax(-1)
    torch.testing.assert_close(chosen, reference[[0, 1], [4, 7]])
    torch.testing.assert_close(values, reference.topk(3).values)
    assert torch.equal(ids, reference.topk(3).indices)


@pytest.mark.parametrize("penalty", [1e-300, 0.001, 101.0])
def test_a_penalty_outside_its_range_is_refused(penalty):
    with pytest.raises(GenerationError, match=r"repetition_penalty must be > 0, in \[0.01, 100\]"):
        SamplingParams(repetition_penalty=penalty)

"""The DPO / IPO loss on hand-made log-probabilities (komt/train/dpo_loss.py): beta, the sign, the log-sigmoid,
label smoothing, IPO's per-token form, the rewards, and the sequence log-probs they are computed from."""

from __future__ import annotations

import math

import pytest
import torch

from komt.generate.prompt import IGNORE_INDEX
from komt.train.dpo_loss import dpo_loss, sequence_logps


def terms(policy_chosen, policy_rejected, ref_chosen, ref_rejected, **kwargs):
    t = lambda v: torch.tensor([v], dtype=torch.float64, requires_grad=True)  # noqa: E731
    inputs = [t(v) for v in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)]
    return inputs, dpo_loss(*inputs, **kwargs)


def test_sigmoid_loss_is_minus_log_sigmoid_of_beta_times_the_log_ratio_margin():
    # policy moved +1 on chosen and -1 on rejected against the reference: margin 2, scaled by beta 0.1
    (pc, pr, _, _), out = terms(-10.0, -12.0, -11.0, -11.0, beta=0.1)
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(-0.2)), abs=1e-12)  # -log sigmoid(0.2)
    assert out.chosen_rewards.item() == pytest.approx(0.1) and out.rejected_rewards.item() == pytest.approx(-0.1)
    out.losses.sum().backward()
    # d/d(chosen logp) of -log sigmoid(beta d) = -beta * sigmoid(-beta d): raising chosen lowers the loss
    assert pc.grad.item() == pytest.approx(-0.1 / (1 + math.exp(0.2)), abs=1e-12)
    assert pr.grad.item() == pytest.approx(0.1 / (1 + math.exp(0.2)), abs=1e-12)


def test_swapping_chosen_and_rejected_flips_the_sign_and_beta_scales_it():
    _, forward = terms(-10.0, -12.0, -11.0, -11.0, beta=0.1)
    _, swapped = terms(-12.0, -10.0, -11.0, -11.0, beta=0.1)
    _, strong = terms(-10.0, -12.0, -11.0, -11.0, beta=0.5)
    assert swapped.losses.item() == pytest.approx(math.log1p(math.exp(0.2)), abs=1e-12)
    assert strong.losses.item() == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-12)
    _, untrained = terms(-7.0, -9.0, -7.0, -9.0, beta=0.1)  # policy == reference
    assert untrained.losses.item() == pytest.approx(math.log(2), abs=1e-12)


def test_label_smoothing_mixes_in_the_flipped_label():
    _, out = terms(-10.0, -12.0, -11.0, -11.0, beta=0.1, label_smoothing=0.25)
    want = 0.75 * math.log1p(math.exp(-0.2)) + 0.25 * math.log1p(math.exp(0.2))
    assert out.losses.item() == pytest.approx(want, abs=1e-12)


def test_ipo_squares_the_per_token_margin_minus_half_over_beta():
    _, out = terms(-10.0, -12.0, -11.0, -11.0, beta=0.1, loss_type="ipo",
                   chosen_tokens=torch.tensor([4.0]), rejected_tokens=torch.tensor([2.0]))
    h = 1.0 / 4 - (-1.0) / 2  # log-ratios averaged over each response's tokens
    assert out.losses.item() == pytest.approx((h - 1 / (2 * 0.1)) ** 2, abs=1e-12)
    with pytest.raises(ValueError, match="response lengths"):
        terms(-1.0, -2.0, -1.0, -2.0, beta=0.1, loss_type="ipo")
    with pytest.raises(ValueError, match="unknown DPO loss type"):
        terms(-1.0, -2.0, -1.0, -2.0, beta=0.1, loss_type="hinge")


def test_sequence_logps_sum_log_softmax_over_the_label_positions_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 4, 7, 2, IGNORE_INDEX],
                           [IGNORE_INDEX, 3, 3, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    logp = torch.log_softmax(logits, dim=-1)
    want = [sum(logp[b, t - 1, labels[b, t]].item() for t in range(1, 6) if labels[b, t] != IGNORE_INDEX)
            for b in range(2)]  # position t - 1 predicts the label at t
    assert sequence_logps(logits, labels).tolist() == pytest.approx(want, abs=1e-5)

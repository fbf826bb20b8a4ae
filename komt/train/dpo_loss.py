"""The DPO objective on sequence log-probabilities (Rafailov et al. 2023), and its IPO variant.

    logps(y | x)      = sum over the response tokens of log p(token | everything before it)
    reward(y)         = beta * (logps_policy(y | x) - logps_ref(y | x))           (the implicit reward)
    sigmoid (DPO):      loss = -log sigmoid(reward(chosen) - reward(rejected))
      with label smoothing e (conservative DPO, Mitchell 2023: each label is wrong with probability e)
                        loss = -(1 - e) log sigmoid(d) - e log sigmoid(-d),   d = reward(chosen) - reward(rejected)
    ipo (Azar et al. 2023): h = (chosen log-ratio / its tokens) - (rejected log-ratio / its tokens)
                        loss = (h - 1 / (2 beta))^2

These are trl's DPOTrainer formulas: sigmoid and IPO as in trl 1.16 (IPO on per-token averages, which trl
confirmed with the IPO authors), label smoothing as trl's sigmoid loss applied it up to 0.x (trl 1.x
moved it to its "robust" and "aot" losses). The logged metrics are trl's too: `rewards/chosen`,
`rewards/rejected` (means of the rewards), `rewards/accuracies` (how often chosen's reward is strictly
higher), `rewards/margins` (mean difference), `logps/chosen`, `logps/rejected` (policy, summed per response).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from komt.generate.prompt import IGNORE_INDEX


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row sum of log p(label) over label positions: logits [B, T, V], labels [B, T] -> [B] (fp32).

    Labels are aligned with the inputs (`komt.train.loss`'s convention): position i's logits score the
    label at i + 1. Computed as -cross_entropy, whose backward never builds a second [B, T, V] tensor.
    """
    B, T, V = logits.shape
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T): the last position scores nothing
    nll = F.cross_entropy(logits.reshape(B * T, V).float(), shifted.reshape(-1), ignore_index=IGNORE_INDEX,
                          reduction="none")  # (B * T,), 0 where ignored
    return -nll.view(B, T).sum(dim=1)


@dataclass
class DPOTerms:
    """Per-pair values of one batch of P pairs."""

    losses: torch.Tensor  # [P], differentiable
    chosen_rewards: torch.Tensor  # [P], beta * log-ratio, detached
    rejected_rewards: torch.Tensor  # [P]


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None) -> DPOTerms:
    """The per-pair DPO (or IPO) losses and rewards from [P] sequence log-probs (see module docstring).

    `chosen_tokens` / `rejected_tokens` ([P], response lengths) are needed by IPO only.
    """
    chosen_logratios = policy_chosen - ref_chosen  # (P,)
    rejected_logratios = policy_rejected - ref_rejected
    if loss_type == "sigmoid":
        d = beta * (chosen_logratios - rejected_logratios)
        losses = -(1 - label_smoothing) * F.logsigmoid(d) - label_smoothing * F.logsigmoid(-d)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the IPO loss needs the response lengths (chosen_tokens, rejected_tokens)")
        h = chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / rejected_tokens.clamp(min=1)
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r} (sigmoid or ipo)")
    return DPOTerms(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())

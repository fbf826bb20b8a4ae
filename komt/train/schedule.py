"""Learning-rate schedule: linear warm-up, then cosine decay to zero (Loshchilov & Hutter 2017).

    step s < W:   lr = base * (s + 1) / W                 (the first step already trains)
    step s >= W:  lr = base * 0.5 * (1 + cos(pi * (s - W) / (N - W)))     N = total steps

Expressed as a multiplier for `torch.optim.lr_scheduler.LambdaLR`, whose state (the step count) the
checkpoint saves, so a resumed run continues the curve where it stopped.
"""

from __future__ import annotations

import math

import torch


def lr_multiplier(step: int, warmup_steps: int, total_steps: int) -> float:
    """The factor on the base learning rate at optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int,
                       total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup_steps = min(warmup_steps, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, warmup_steps, total_steps)
    )

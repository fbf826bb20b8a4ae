"""Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty.

The order is the one Hugging Face's `generate` applies (and so the model card's settings assume):
repetition penalty -> temperature -> top-k -> top-p -> sample. Temperature 0 means greedy argmax.
Sampling draws from a `torch.Generator` seeded once per generation, so the same seed gives the same text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from komt.errors import GenerationError


@dataclass(frozen=True)
class SamplingParams:
    """The sampler's settings, validated once (bad values are a `GenerationError` naming the flag)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise GenerationError(f"{name} must be a finite number, got {value}")
        if self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise GenerationError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019), as Hugging Face applies it: for every token already in the
    prompt or output, divide a positive logit by `penalty`, multiply a negative one.

    logits [B, V]; seen [B, V] bool.
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep the k largest logits of each row [B, V]; the rest become -inf (ties at the k-th all stay)."""
    if not k or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2019): keep the smallest set of most likely tokens whose
    probability sums to at least p; the most likely token always stays."""
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # Drop a token when the tokens before it already reach p.
    drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next token ids [B] from the last position's logits [B, V]."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    logits = top_p_filter(top_k_filter(logits, params.top_k), params.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

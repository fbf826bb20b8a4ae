"""Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty.

The order is the one Hugging Face's `generate` applies (and so the model card's settings assume):
repetition penalty -> temperature -> top-k -> top-p -> sample. Temperature 0 means greedy argmax.

`sample_batch` is the one sampler: every row of a batch has its own settings and its own seeded
`torch.Generator` (a server batch mixes requests), and the whole batch is filtered and drawn in one
pass of tensor ops. A draw is the exponential race (the Gumbel-max trick in another form, as vLLM
samples): with q_i ~ Exp(1), argmax_i p_i / q_i is token i with probability p_i. Only the noise is
drawn row by row, from each row's generator, so a row's tokens depend on its own seed alone: the same
request gives the same tokens alone (`generate`) or in any batch. `sample` is the same sampler with one
setting and one generator for all rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from komt.errors import GenerationError

# Temperatures below this sample greedily (vLLM's _SAMPLING_EPS): logits / 1e-300 overflow to inf and
# the probabilities become NaN, and at 1e-5 the distribution is already a point mass in fp32.
SAMPLING_EPS = 1e-5
# The repetition penalty is a divisor of logits: outside this range the logits overflow (1e-300 turns
# every seen logit into inf) and far inside it the penalty already removes or forces seen tokens.
PENALTY_RANGE = (0.01, 100.0)


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
        lo, hi = PENALTY_RANGE
        if not lo <= self.repetition_penalty <= hi:
            raise GenerationError(f"repetition_penalty must be > 0, in [{lo}, {hi:g}] (1 = off), "
                                  f"got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: float | torch.Tensor
) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019), as Hugging Face applies it: for every token already in the
    prompt or output, divide a positive logit by `penalty`, multiply a negative one.

    logits [B, V]; seen [B, V] bool; penalty a number or one per row [B, 1].
    """
    if isinstance(penalty, (int, float)) and penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int | torch.Tensor | None) -> torch.Tensor:
    """Keep the k largest logits of each row [B, V]; the rest become -inf (ties at the k-th all stay).

    `k` is one number for all rows or one per row [B] (0 or >= V: that row keeps everything).
    """
    V = logits.shape[-1]
    if isinstance(k, torch.Tensor):
        k = torch.where((k <= 0) | (k > V), V, k)  # (B,)
        kth = logits.sort(dim=-1, descending=True).values.gather(-1, (k - 1)[:, None])  # (B, 1)
        return logits.masked_fill(logits < kth, float("-inf"))
    if not k or k >= V:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float | torch.Tensor | None) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2019): keep the smallest set of most likely tokens whose
    probability sums to at least p; the most likely token always stays.

    `p` is one number for all rows or one per row [B] (>= 1: that row keeps everything).
    """
    if p is None or (not isinstance(p, torch.Tensor) and p >= 1.0):
        return logits
    if isinstance(p, torch.Tensor):
        p = torch.where(p >= 1.0, math.inf, p)[:, None]  # (B,) -> (B, 1); inf: nothing reaches it
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    sorted_probs = sorted_logits.softmax(dim=-1)
    # Drop a token when the tokens before it already reach p.
    drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def _exponential_noise(
    probs: torch.Tensor, generators: Sequence[torch.Generator | None] | torch.Generator | None, rows: list[int]
) -> torch.Tensor:
    """q ~ Exp(1) [B, V] for the sampled rows (1 elsewhere): one draw of V values per row from its generator.

    A row draws the same values whether it is alone ([1, V]) or one row of a batch (a [V] view).
    Clamped away from 0 so that p / q never divides 0 by 0 (NaN would win the argmax).
    """
    noise = torch.ones_like(probs)
    if generators is None or isinstance(generators, torch.Generator):
        noise[rows] = torch.empty(len(rows), probs.shape[1], device=probs.device).exponential_(generator=generators)
    else:
        for b in rows:
            noise[b].exponential_(generator=generators[b])
    return noise.clamp_min_(torch.finfo(noise.dtype).tiny)


def sample_batch(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None] | torch.Generator | None = None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next token ids [B] from logits [B, V], row b sampled with params[b] and generators[b].

    `seen` [B, V] (bool) marks the tokens each row's repetition penalty applies to; `generators` is
    one per row, or one shared by all rows (None: torch's default generator).
    """
    B = logits.shape[0]
    if len(params) != B:
        raise GenerationError(f"sample_batch got {len(params)} sampling settings for {B} rows of logits")
    device = logits.device
    logits = logits.float()
    if seen is not None and any(p.repetition_penalty != 1.0 for p in params):
        penalty = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]  # (B, 1)
        logits = apply_repetition_penalty(logits, seen, penalty)
    sampled_rows = [b for b, p in enumerate(params) if not p.greedy]
    if not sampled_rows:
        return logits.argmax(dim=-1)
    temperature = torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=device)[:, None]
    scaled = logits / temperature  # (B, V)
    if any(p.top_k for p in params):
        scaled = top_k_filter(scaled, torch.tensor([p.top_k or 0 for p in params], device=device))
    if any(p.top_p is not None and p.top_p < 1.0 for p in params):
        scaled = top_p_filter(scaled, torch.tensor([p.top_p or 1.0 for p in params], device=device))
    probs = scaled.softmax(dim=-1)
    tokens = (probs / _exponential_noise(probs, generators, sampled_rows)).argmax(dim=-1)
    if len(sampled_rows) < B:  # greedy rows take the argmax of the penalised logits
        greedy = torch.tensor([p.greedy for p in params], device=device)
        tokens = torch.where(greedy, logits.argmax(dim=-1), tokens)
    return tokens


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next token ids [B] from the last position's logits [B, V], every row with the same settings."""
    return sample_batch(logits, [params] * logits.shape[0], generator, seen)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int = 0) -> tuple[torch.Tensor, ...]:
    """The model's log-probabilities of `tokens` [B] under logits [B, V], and the `top` most likely per row.

    Raw model log-probabilities (before penalty, temperature and filters: what rescoring the text with a
    full forward gives). Returns (chosen [B], top values [B, top], top ids [B, top]).
    """
    logprobs = logits.float().log_softmax(dim=-1)  # (B, V)
    chosen = logprobs.gather(-1, tokens[:, None])[:, 0]
    values, ids = logprobs.topk(top, dim=-1) if top else (logprobs[:, :0], tokens[:, None][:, :0])
    return chosen, values, ids

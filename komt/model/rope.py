"""Rotary position embedding (RoPE, Su et al. 2021) in the Hugging Face "rotate-half" convention.

Each head vector x of size D is split into halves (x1, x2) = (x[:D/2], x[D/2:]); the pair
(x1[i], x2[i]) is rotated by the angle pos * theta^(-2i/D). Hugging Face checkpoints store q_proj/k_proj
permuted for this convention (Meta's original interleaves pairs instead), so using it lets the weights
load unchanged.

The angles depend only on positions, so the model computes (cos, signed sin) once per forward and every layer
reuses them.
"""

from __future__ import annotations

import torch


def rope_angles(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin for absolute `positions` [B, T], each [B, 1, T, head_dim] in `dtype`.

    The sin's first half is negated (see `apply_rope`). Computed in fp32 (bf16 angles would be off by
    whole radians at position 4096), then cast, as the Hugging Face reference does.
    """
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta ** exponents)  # (D/2,)
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (B, T, D/2)
    cos = torch.cat((angles, angles), dim=-1).cos()  # (B, T, D): both halves share the angle of pair i
    sin = angles.sin()
    signed_sin = torch.cat((-sin, sin), dim=-1)  # (B, T, D)
    return cos.to(dtype)[:, None], signed_sin.to(dtype)[:, None]  # (B, T, D) -> (B, 1, T, D): over heads


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, D] by the angles of its positions (cos, signed_sin from `rope_angles`).

    The reference is x * cos + rotate_half(x) * sin, with rotate_half(x1, x2) = (-x2, x1) (Hugging Face;
    tests/test_rope.py checks the two agree bit for bit). Swapping the halves is a `roll` by D/2, and the sign
    of rotate_half is folded into `signed_sin` once per forward: (-x2) * sin == x2 * (-sin) exactly, so
    this gives the reference's bits in 4 ops instead of 7 (per layer and per token when decoding).
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin

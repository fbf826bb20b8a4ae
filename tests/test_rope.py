"""RoPE: the 4-op form the model runs equals the Hugging Face rotate-half reference bit for bit."""

import pytest
import torch

from komt.model.rope import apply_rope, rope_angles


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """transformers' rotate_half: (x1, x2) -> (-x2, x1) on the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rolled_form_equals_rotate_half_reference_exactly(dtype):
    torch.manual_seed(0)
    positions = torch.tensor([[0, 1, 7, 4095], [5, 6, 7, 8]])  # (B, T)
    x = torch.randn(2, 3, 4, 64).to(dtype)  # (B, H, T, D)
    cos, signed_sin = rope_angles(positions, 64, 10000.0, dtype)
    # The reference (transformers' apply_rotary_pos_emb): plain sin, sign inside rotate_half.
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.int64).float() / 64))
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat((angles, angles), -1)
    ref_cos, ref_sin = angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]
    assert torch.equal(cos, ref_cos)
    assert torch.equal(apply_rope(x, cos, signed_sin), x * ref_cos + rotate_half(x) * ref_sin)


def test_rotation_keeps_each_pair_length():
    x = torch.randn(1, 2, 3, 8, dtype=torch.float64)
    cos, signed_sin = rope_angles(torch.tensor([[3, 10, 200]]), 8, 10000.0, torch.float64)
    y = apply_rope(x, cos, signed_sin)
    pair_norm = lambda t: t[..., :4] ** 2 + t[..., 4:] ** 2  # pair i is (t[i], t[i + D/2])
    torch.testing.assert_close(pair_norm(y), pair_norm(x))

"""The int8 / int4 formats (komt.model.quant): exact layout, error bounds, round trips."""

import pytest
import torch

from komt.model.quant import (
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)


def test_int4_packing_puts_even_columns_in_the_low_nibble():
    q = torch.tensor([[1, 2, 15, 0], [7, 8, 3, 12]], dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.tolist() == [[0x21, 0x0F], [0x87, 0xC3]]  # byte j = q[2j] | q[2j+1] << 4
    assert torch.equal(unpack_int4(packed), q)


def test_hand_computed_int8_and_int4_values():
    w = torch.tensor([[0.5, -1.0, 0.25, 0.0]])
    q, scales = quantize_int8(w)
    assert scales.dtype == torch.float16 and scales.item() == pytest.approx(1 / 127, rel=1e-3)
    assert q.tolist() == [[64, -127, 32, 0]]  # round(w / (1/127))
    packed, s4, o4 = quantize_int4(w, group_size=4)
    assert o4.item() == -1.0 and s4.item() == pytest.approx(1.5 / 15, rel=1e-3)  # offset = min, scale = range / 15
    # round((w - min) / scale) with the fp16 scale 0.09998 (just below 0.1): 1.25 / 0.09998 = 12.503 -> 13
    assert unpack_int4(packed).tolist() == [[15, 0, 13, 10]]


@pytest.mark.parametrize("group_size", [None, 32, 64])
def test_int8_error_is_at_most_half_a_step(group_size):
    torch.manual_seed(0)
    w = torch.randn(96, 128) * torch.rand(96, 1)  # rows of different ranges
    q, scales = quantize_int8(w, group_size)
    g = group_size or 128
    assert q.dtype == torch.int8 and scales.shape == (96, 128 // g) and q.abs().max() <= 127
    step = scales.float().repeat_interleave(g, dim=1)
    err = (dequantize_int8(q, scales) - w).abs()
    assert (err <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_error_is_at_most_half_a_step_and_the_minimum_is_kept(group_size):
    torch.manual_seed(0)
    w = torch.randn(64, 256) + 0.5  # skewed groups: where an offset pays
    packed, scales, offsets = quantize_int4(w, group_size)
    assert packed.shape == (64, 128) and scales.shape == offsets.shape == (64, 256 // group_size)
    back = dequantize_int4(packed, scales, offsets)
    step = scales.float().repeat_interleave(group_size, dim=1)
    assert ((back - w).abs() <= step / 2 + 2e-3).all()  # + the fp16 rounding of the offset
    group_min = w.view(64, -1, group_size).amin(-1)
    torch.testing.assert_close(back.view(64, -1, group_size).amin(-1), group_min, atol=2e-3, rtol=0)


def test_zero_groups_and_constant_int4_groups_are_exact():
    """A zero group has scale 0 (no division by zero); int4's offset holds a constant group exactly."""
    w = torch.zeros(4, 64)
    w[1] = 3.0
    q, scales = quantize_int8(w, 32)
    assert torch.equal(dequantize_int8(q, scales)[[0, 2, 3]], w[[0, 2, 3]])
    packed, s4, o4 = quantize_int4(w, 32)
    assert torch.equal(dequantize_int4(packed, s4, o4), w)


def test_chunked_quantization_equals_one_shot():
    """Rows are quantized in chunks (bounded memory); the chunk boundary must not change any value."""
    torch.manual_seed(0)
    w = torch.randn(2500, 64)
    q, s = quantize_int8(w, 32)
    q_ref, s_ref = quantize_int8(w[1500:], 32)
    assert torch.equal(q[1500:], q_ref) and torch.equal(s[1500:], s_ref)


def test_bad_group_sizes_are_refused():
    with pytest.raises(ValueError, match="does not divide"):
        quantize_int8(torch.randn(4, 48), 32)
    with pytest.raises(ValueError, match="positive"):
        quantize_int4(torch.randn(4, 64), 0)

"""kernels.reference: the plain-PyTorch statement of the kernels' math, checked from first principles.

These tests need no triton: they pin the mask rule against a loop over (query, key) pairs, the attention
against PyTorch's own scaled_dot_product_attention, RMSNorm against Hugging Face's formula, and the
int8 / int4 dequantization against QUANT_SPEC.md's formulas written out element by element.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kernels.reference import (
    attention_mask,
    attention_reference,
    dequantize_int4,
    dequantize_int8,
    int4_matmul_reference,
    int8_matmul_reference,
    rms_norm_reference,
    unpack_int4,
)

ROOT = Path(__file__).resolve().parents[1]


def _visible_by_loop(qpos, kpos, causal, window):
    rows = []
    for i in qpos:
        row = []
        for j in kpos:
            ok = j >= 0 and (not causal or j <= i) and (window is None or j > i - window)
            row.append(ok)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool)


@pytest.mark.parametrize("T,S", [(5, 5), (3, 9), (1, 12), (7, 4)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 1, 3, 20])
def test_mask_without_positions_puts_queries_at_the_last_T_positions(T, S, causal, window):
    mask = attention_mask(T, S, causal=causal, window=window)
    assert mask.shape == (1, 1, T, S)
    expected = _visible_by_loop(list(range(S - T, S)), list(range(S)), causal, window)
    assert torch.equal(mask[0, 0], expected)


def test_mask_with_positions_follows_each_rows_slots():
    q_pos = torch.tensor([[20, 21], [3, 4]])
    k_pos = torch.tensor([[16, 21, 17, 18, 19, 20, 14, 15], [0, 1, 2, 3, 4, -1, -1, -1]])
    mask = attention_mask(2, 8, window=4, q_pos=q_pos, k_pos=k_pos)
    assert mask.shape == (2, 1, 2, 8)
    for b in range(2):
        expected = _visible_by_loop(q_pos[b].tolist(), k_pos[b].tolist(), True, 4)
        assert torch.equal(mask[b, 0], expected)


@pytest.mark.parametrize("group", [1, 2, 4])
def test_reference_equals_sdpa_causal(group):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 11, 16)
    k = torch.randn(2, 4 // group, 11, 16)
    v = torch.randn_like(k)
    out = attention_reference(q, k, v, causal=True)
    rep = q.shape[1] // k.shape[1]
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True
    )
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_reference_window_equals_sdpa_with_the_same_boolean_mask():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 2, 6, 16), torch.randn(1, 2, 10, 16), torch.randn(1, 2, 10, 16)
    out = attention_reference(q, k, v, window=3, scale=0.3)
    mask = attention_mask(6, 10, window=3)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_reference_row_without_visible_keys_is_zero_with_zero_gradient():
    q = torch.randn(1, 2, 2, 16, requires_grad=True)
    k, v = torch.randn(1, 1, 3, 16), torch.randn(1, 1, 3, 16)
    q_pos = torch.tensor([[0, 5]])
    k_pos = torch.tensor([[3, 4, -1]])  # query at 0 sees nothing; query at 5 sees 3 and 4
    out = attention_reference(q, k, v, q_pos=q_pos, k_pos=k_pos)
    assert torch.equal(out[:, :, 0], torch.zeros(1, 2, 16))
    assert out[:, :, 1].abs().sum() > 0
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.equal(q.grad[:, :, 0], torch.zeros(1, 2, 16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_reference_is_hugging_face_llama_rms_norm(dtype):
    torch.manual_seed(2)
    x = torch.randn(3, 7, 32).to(dtype)
    weight = (1 + 0.1 * torch.randn(32)).to(dtype)
    # Hugging Face LlamaRMSNorm.forward, verbatim in spirit
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
    expected = weight * h.to(dtype)
    out = rms_norm_reference(x, weight, 1e-5)
    assert out.dtype == dtype
    assert torch.equal(out, expected)


def test_reference_rejects_bad_shapes_and_windows_with_the_values():
    q, k = torch.randn(1, 3, 4, 16), torch.randn(1, 2, 4, 16)
    with pytest.raises(ValueError, match=r"\(1, 3, 4, 16\)"):
        attention_reference(q, k, k)
    with pytest.raises(ValueError, match="window"):
        attention_mask(4, 4, window=0)
    with pytest.raises(ValueError, match="together"):
        attention_mask(4, 4, q_pos=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        attention_mask(4, 4, q_pos=torch.zeros(1, 4), k_pos=torch.zeros(1, 4))


def _int8_by_element(q, scales, g):
    """W[o, i] = q[o, i] * scales[o, i // g], one element at a time (QUANT_SPEC.md)."""
    O, I = q.shape
    return torch.tensor([[float(q[o, i]) * float(scales[o, i // g]) for i in range(I)] for o in range(O)])


def _int4_by_element(packed, scales, offsets, g):
    """Element i of row o is in byte i // 2: the low nibble for even i, the high one for odd i."""
    O, I = packed.shape[0], 2 * packed.shape[1]
    rows = []
    for o in range(O):
        row = []
        for i in range(I):
            byte = int(packed[o, i // 2])
            q = byte & 15 if i % 2 == 0 else byte >> 4
            row.append(q * float(scales[o, i // g]) + float(offsets[o, i // g]))
        rows.append(row)
    return torch.tensor(rows)


@pytest.mark.parametrize("g", [None, 2, 3])
def test_dequantize_int8_is_the_spec_formula_element_by_element(g):
    q = torch.tensor([[-128, 127, 0, 1, -1, 5], [3, -7, 127, -127, 64, 2]], dtype=torch.int8)
    scales = torch.tensor([[0.5, 0.25, 2.0], [1.5, 0.0, 3.0]]).half()[:, : 6 // (g or 6)]
    expected = _int8_by_element(q, scales, g or 6)
    assert torch.equal(dequantize_int8(q, scales, g), expected)
    x = torch.tensor([[1.0, -2.0, 0.5, 3.0, 0.0, 1.0]])
    torch.testing.assert_close(int8_matmul_reference(x, q, scales, g), x @ expected.T)


def test_unpack_int4_puts_even_elements_in_the_low_nibble():
    packed = torch.tensor([[0x21, 0xF0, 0x0F], [0x00, 0xFF, 0x9A]], dtype=torch.uint8)
    assert unpack_int4(packed).tolist() == [[1, 2, 0, 15, 15, 0], [0, 0, 15, 15, 10, 9]]


@pytest.mark.parametrize("g", [2, 4])
def test_dequantize_int4_is_the_spec_formula_element_by_element(g):
    packed = torch.tensor([[0x21, 0xF0, 0x0F, 0x73], [0x00, 0xFF, 0x9A, 0x5C]], dtype=torch.uint8)
    scales = torch.tensor([[0.5, 0.0, 2.0, 1.0], [0.25, 1.5, 0.125, 3.0]]).half()[:, : 8 // g]
    offsets = torch.tensor([[-4.0, 1.0, 0.5, -2.0], [0.0, -12.0, 3.0, 0.25]]).half()[:, : 8 // g]
    expected = _int4_by_element(packed, scales, offsets, g)
    assert torch.equal(dequantize_int4(packed, scales, offsets, g), expected)
    x = torch.arange(8.0)[None, :].to(torch.bfloat16)
    out = int4_matmul_reference(x, packed, scales, offsets, g)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, (x.float() @ expected.T).to(torch.bfloat16))


def test_gguf_q4_0_values_are_int4_with_offsets_minus_8_scales():
    """QUANT_SPEC.md: a Q4_0 block (value (nibble - 8) * d) is scales = d, offsets = -8 d, nibbles re-paired."""
    gen = torch.Generator().manual_seed(0)
    nibbles = torch.randint(0, 16, (3, 32), generator=gen)
    d = torch.rand(3, 1, generator=gen).half()
    want = (nibbles - 8).float() * d.float()  # what llama.cpp computes for the block
    packed = (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).to(torch.uint8)  # komt's (2j, 2j + 1) pairs
    assert torch.equal(dequantize_int4(packed, d, (-8 * d.float()).half(), 32), want)


def test_quantized_references_reject_bad_layouts_with_the_values():
    q, s = torch.zeros(4, 8, dtype=torch.int8), torch.ones(4, 2).half()
    with pytest.raises(ValueError, match=r"scales .*\[4, 1\].*\[4, 2\]"):
        dequantize_int8(q, s)  # per channel wants [O, 1]
    with pytest.raises(ValueError, match="dividing in_features 8, got 3"):
        dequantize_int8(q, s, 3)
    with pytest.raises(ValueError, match="bool|True"):
        dequantize_int8(q, torch.ones(4, 8).half(), True)
    with pytest.raises(ValueError, match="int8 .*float32"):
        dequantize_int8(q.float(), s, 4)
    with pytest.raises(ValueError, match="float16 .*bfloat16"):
        dequantize_int8(q, s.bfloat16(), 4)
    packed = torch.zeros(4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="offsets"):
        dequantize_int4(packed, s, torch.ones(4, 1).half(), 4)
    with pytest.raises(ValueError, match=r"I = 8.*\[2, 7\]"):
        int4_matmul_reference(torch.ones(2, 7), packed, s, s, 4)
    with pytest.raises(ValueError, match="uint8"):
        unpack_int4(packed.to(torch.int8))


def test_import_kernels_works_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, kernels\n"
        "assert kernels.triton_available() is False\n"
        "x = torch.randn(2, 8); w = torch.ones(8)\n"
        "print(kernels.reference.rms_norm_reference(x, w, 1e-6).shape)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "torch.Size([2, 8])" in result.stdout

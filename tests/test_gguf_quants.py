"""GGUF tensor types against gguf-py (`gguf.quants`, llama.cpp's own Python transcription of ggml-quants.c).

Dequantization of all 13 types komt reads must equal `gguf.quants.dequantize` bit for bit on random data:
quantized by `gguf.quants.quantize` where it supports the type, else random valid blocks built byte-wise.
Quantization of the four types komt writes must give `gguf.quants.quantize`'s bytes.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from komt.errors import CheckpointError
from komt.model.gguf import canonical, quants
from komt.model.gguf.constants import TENSOR_TYPES, TENSOR_TYPES_BY_NAME
from komt.model.gguf.quantize import quantize
from komt.model.gguf.quants import dequantize

GT = gguf.GGMLQuantizationType
QUANTIZABLE_BY_GGUF = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# Byte offsets of each K-quant block's fp16 fields (d, dmin): random bytes there could be inf/NaN.
K_FP16_FIELDS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def weights(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random float32 rows with per-row scales across six orders of magnitude, plus hard blocks:
    all zeros, all equal, a +/- tie for the largest magnitude, and values on a rounding boundary."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * rng.uniform(1e-4, 1e2, (rows, 1))).astype(np.float32)
    x[0, :32] = 0.0
    x[1, :32] = 0.75
    x[2, :32] = np.linspace(-1, 1, 32, dtype=np.float32)
    x[2, 3], x[2, 9] = -2.0, 2.0  # |max| tie: numpy's argmax takes the first
    x[3, :32] = (np.arange(32) - 16).astype(np.float32) * (127 / 16) + 0.5  # x * (1/d) lands on .5
    return x


def random_blocks(type_name: str, n_blocks: int, seed: int = 0) -> np.ndarray:
    """Random bytes for n_blocks blocks, with every fp16 scale field a finite random fp16."""
    t = TENSOR_TYPES_BY_NAME[type_name]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (n_blocks, t.type_size), dtype=np.uint8)
    for offset in K_FP16_FIELDS[type_name]:
        scale = (rng.standard_normal(n_blocks) * 0.01).astype(np.float16)
        blocks[:, offset:offset + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return blocks


def test_type_table_matches_gguf():
    for t in TENSOR_TYPES.values():
        if t.name not in GT.__members__:  # newer than the installed gguf-py (Q1_0, Q2_0)
            continue
        assert GT[t.name].value == t.id
        if t.name == "Q8_1":  # gguf-py 0.19 says 40 bytes; ggml-common.h static_asserts 2 fp16 + 32 = 36
            continue
        assert gguf.GGML_QUANT_SIZES[GT[t.name]] == (t.block_size, t.type_size), t.name


@pytest.mark.parametrize("type_name", QUANTIZABLE_BY_GGUF)
def test_dequantize_matches_gguf_on_gguf_quantized_data(type_name):
    x = weights(8, 256)
    raw = gguf.quants.quantize(x, GT[type_name]).view(np.uint8)  # [8, row_bytes]
    expected = gguf.quants.dequantize(raw, GT[type_name])
    got = dequantize(torch.from_numpy(raw.copy()), type_name).numpy()
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("type_name", K_QUANTS)
def test_dequantize_k_quants_matches_gguf_on_random_blocks(type_name):
    blocks = random_blocks(type_name, 24)
    raw = blocks.reshape(6, -1)  # 6 rows of 4 super-blocks (1024 elements)
    got = dequantize(torch.from_numpy(raw.copy()), type_name).numpy()
    np.testing.assert_array_equal(got, gguf.quants.dequantize(raw, GT[type_name]))


def test_dequantize_f32_and_target_dtype():
    x = weights(4, 64)
    got = dequantize(torch.from_numpy(x.view(np.uint8).copy()), "F32", torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, torch.from_numpy(x).to(torch.bfloat16))


def test_dequantize_in_chunks_equals_one_pass(monkeypatch):
    raw = torch.from_numpy(random_blocks("Q6_K", 40).reshape(10, -1).copy())
    whole = dequantize(raw, "Q6_K")
    monkeypatch.setattr(quants, "CHUNK_ELEMENTS", 3 * 256)  # 3 blocks a step: a ragged last chunk
    assert torch.equal(dequantize(raw, "Q6_K"), whole)


def test_dequantize_refuses_types_it_does_not_know():
    with pytest.raises(CheckpointError, match="IQ2_XXS"):
        dequantize(torch.zeros(1, 66, dtype=torch.uint8), "IQ2_XXS")


@pytest.mark.parametrize("type_name", ("F16", "BF16", "Q8_0", "Q4_0"))
def test_quantize_bytes_equal_gguf(type_name):
    x = weights(16, 128, seed=1)
    if type_name == "BF16":
        x[5, :4] = [np.nan, -np.nan, np.inf, -0.0]
    expected = gguf.quants.quantize(x, GT[type_name]).view(np.uint8)
    got = quantize(torch.from_numpy(x), type_name).numpy()
    np.testing.assert_array_equal(got, expected)


def test_quantize_rejects_partial_blocks():
    with pytest.raises(CheckpointError, match="blocks of 32"):
        quantize(torch.zeros(2, 48), "Q8_0")


@pytest.mark.parametrize("type_name", canonical.CANONICAL_TYPES)
def test_canonical_record_is_exact_and_round_trips(type_name):
    x = weights(6, 128, seed=2)
    raw = gguf.quants.quantize(x, GT[type_name]).view(np.uint8)
    record = canonical.from_gguf(torch.from_numpy(raw.copy()), type_name)
    kind, rows, cols = ("int8", 6, 128) if type_name == "Q8_0" else ("int4", 6, 64)
    assert record.kind == kind and record.group_size == 32 and record.weight.shape == (rows, cols)
    assert record.scales.dtype == torch.float16 and record.scales.shape == (6, 4)
    assert (record.offsets is None) == (type_name == "Q8_0")
    # QUANT_SPEC's formula reproduces gguf's values exactly (every product here is exact in fp32)
    np.testing.assert_array_equal(record.dequantize().numpy(), gguf.quants.dequantize(raw, GT[type_name]))
    back_type, back = canonical.to_gguf(record)
    assert back_type == type_name and np.array_equal(back.numpy(), raw)


def test_canonical_int4_packs_element_i_in_byte_i_over_2():
    """GGUF byte j of a block holds element j (low) and j + 16 (high); komt's byte k holds 2k and 2k + 1."""
    raw = gguf.quants.quantize(weights(4, 64, seed=3), GT.Q4_1).view(np.uint8)  # [4, 2 blocks x 20 bytes]
    qs = raw.reshape(4, 2, 20)[:, :, 4:]  # [4, 2, 16] after d and m
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(4, 64)  # element order
    w = canonical.from_gguf(torch.from_numpy(raw.copy()), "Q4_1").weight.numpy()
    np.testing.assert_array_equal(w & 0x0F, q[:, 0::2])
    np.testing.assert_array_equal(w >> 4, q[:, 1::2])


def test_canonical_refuses_other_types():
    with pytest.raises(CheckpointError, match="Q5_0"):
        canonical.from_gguf(torch.zeros(1, 22, dtype=torch.uint8), "Q5_0")

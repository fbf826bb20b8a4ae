"""Dequantize GGUF tensor types to float, vectorized in torch: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0,
Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

Each `_dequant_<type>(blocks [N, type_size] uint8) -> [N, block_size] float32` states one block format as
whole-tensor bit operations, following ggml's reference `dequantize_row_*` (ggml-quants.c) and gguf-py's
numpy transcription of it (the tests compare against `gguf.quants.dequantize` on random blocks). Nothing
loops per block: `dequantize` runs them over chunks of blocks, so a 7B matrix costs a few dozen big tensor
ops and its working memory stays at one chunk of float32 (a few tens of MB), beside the output.

Block formats (d, dmin, m: fp16; "qs": packed quants; K-quants use 256-element super-blocks of 16 or 8
sub-blocks with 4- or 6-bit sub-scales):

    Q8_0  d, qs[32] int8                           x = q * d
    Q4_0  d, qs[16] (byte j: elem j low, j+16 high) x = (q - 8) * d
    Q4_1  d, m, qs[16]                              x = q * d + m
    Q5_0  d, qh[4] (bit j: 5th bit of elem j), qs   x = (q - 16) * d
    Q5_1  d, m, qh[4], qs[16]                       x = q * d + m
    Q2_K  scales[16] (lo: scale, hi: min), qs[64], d, dmin    x = d*sc*q - dmin*mn   (q 2-bit)
    Q3_K  hmask[32], qs[64], scales[12] (6-bit, -32), d       x = d*sc*(q - 4 * !hbit)
    Q4_K  d, dmin, scales[12] (8 x 6-bit sc, 8 x 6-bit mn), qs[128]      x = d*sc*q - dmin*mn
    Q5_K  d, dmin, scales[12], qh[32], qs[128]                 x = d*sc*q - dmin*mn   (q 5-bit)
    Q6_K  ql[128], qh[64], scales[16] int8, d                  x = d*sc*(q - 32)     (q 6-bit)
"""

from __future__ import annotations

import torch

from komt.errors import CheckpointError
from komt.model.gguf.constants import TENSOR_TYPES_BY_NAME, TensorType

CHUNK_ELEMENTS = 1 << 22  # ~4M elements per step: 16 MB of float32 working memory per intermediate


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 stored at bytes [start, start + 2) of each block, as float32 [N, 1]."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _bits(x: torch.Tensor, shifts: list[int], mask: int) -> torch.Tensor:
    """(x >> s) & mask for each shift s: [N, ..., K] -> [N, ..., len(shifts), K] (shift axis second-last)."""
    s = torch.tensor(shifts, dtype=torch.uint8).view(len(shifts), 1)
    return (x.unsqueeze(-2) >> s) & mask


def _dequant_q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].view(torch.int8).float() * _f16(b, 0)


def _nibbles32(qs: torch.Tensor) -> torch.Tensor:
    """16 bytes -> 32 values: byte j holds element j (low nibble) and element j + 16 (high nibble)."""
    return _bits(qs, [0, 4], 0x0F).reshape(qs.shape[0], 32)  # [N, 2, 16] -> [N, 32]


def _high_bits32(qh: torch.Tensor) -> torch.Tensor:
    """4 bytes (a little-endian u32) -> 32 bits: bit j is element j's fifth bit."""
    return _bits(qh, list(range(8)), 1).transpose(1, 2).reshape(qh.shape[0], 32)  # [N, 8 bits, 4 bytes] -> [N, 4, 8] -> [N, 32]


def _dequant_q4_0(b: torch.Tensor) -> torch.Tensor:
    return (_nibbles32(b[:, 2:]).float() - 8.0) * _f16(b, 0)


def _dequant_q4_1(b: torch.Tensor) -> torch.Tensor:
    return _nibbles32(b[:, 4:]).float() * _f16(b, 0) + _f16(b, 2)


def _dequant_q5_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles32(b[:, 6:]) | (_high_bits32(b[:, 2:6]) << 4)
    return (q.float() - 16.0) * _f16(b, 0)


def _dequant_q5_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles32(b[:, 8:]) | (_high_bits32(b[:, 4:8]) << 4)
    return q.float() * _f16(b, 0) + _f16(b, 2)


def _dequant_q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b, 80).view(n, 1, 1), _f16(b, 82).view(n, 1, 1)
    scale = d * (scales & 0x0F).float().view(n, 16, 1)
    mins = dmin * (scales >> 4).float().view(n, 16, 1)
    # qs [N, 64] -> [N, 2 halves, 32]; each byte holds 4 values, the shift picks the 32-wide group
    q = _bits(qs.reshape(n, 2, 32), [0, 2, 4, 6], 3).reshape(n, 16, 16)  # [N, 2, 4, 32] -> 16 groups of 16
    return (scale * q.float() - mins).reshape(n, 256)


def _dequant_q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, packed = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = _f16(b, 108).view(n, 1, 1)
    # 16 six-bit scales: low 4 bits from bytes 0..7 (low nibbles, then high nibbles), high 2 bits from 8..11
    low = _bits(packed[:, :8], [0, 4], 0x0F).reshape(n, 16)  # [N, 2, 8] -> [N, 16]
    high = _bits(packed[:, 8:], [0, 2, 4, 6], 0x03).reshape(n, 16)  # [N, 4, 4] -> [N, 16]
    scale = ((low | (high << 4)).to(torch.int16) - 32).float().view(n, 16, 1)
    q_low = _bits(qs.reshape(n, 2, 32), [0, 2, 4, 6], 3).reshape(n, 16, 16)  # [N, 2, 4, 32]
    h = _bits(hmask.reshape(n, 1, 32), list(range(8)), 1).reshape(n, 16, 16)  # [N, 1, 8, 32]
    q = q_low.to(torch.int16) - ((h ^ 1).to(torch.int16) << 2)  # the high bit *clear* subtracts 4
    return (d * scale * q.float()).reshape(n, 256)


def _scale_min_k4(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins, as float32 [N, 8, 1] each.

    Bytes 0..3 hold scales 0..3 (low 6 bits), 4..7 mins 0..3; bytes 8..11 hold the low 4 bits of scales
    4..7 (low nibble) and mins 4..7 (high nibble), whose top 2 bits are the top bits of bytes 0..7.
    """
    n = packed.shape[0]
    sc_lo, mn_lo, mixed = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat([sc_lo & 0x3F, (mixed & 0x0F) | ((sc_lo >> 2) & 0x30)], dim=1)
    mins = torch.cat([mn_lo & 0x3F, (mixed >> 4) | ((mn_lo >> 2) & 0x30)], dim=1)
    return scales.float().view(n, 8, 1), mins.float().view(n, 8, 1)


def _dequant_q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b, 0).view(n, 1, 1), _f16(b, 2).view(n, 1, 1)
    scales, mins = _scale_min_k4(b[:, 4:16])
    q = _bits(b[:, 16:].reshape(n, 4, 32), [0, 4], 0x0F).reshape(n, 8, 32)  # [N, 4, 2, 32]
    return (d * scales * q.float() - dmin * mins).reshape(n, 256)


def _dequant_q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b, 0).view(n, 1, 1), _f16(b, 2).view(n, 1, 1)
    scales, mins = _scale_min_k4(b[:, 4:16])
    q_low = _bits(b[:, 48:].reshape(n, 4, 32), [0, 4], 0x0F).reshape(n, 8, 32)  # [N, 4, 2, 32]
    q_high = _bits(b[:, 16:48].reshape(n, 1, 32), list(range(8)), 1).reshape(n, 8, 32)  # [N, 1, 8, 32]
    q = q_low | (q_high << 4)
    return (d * scales * q.float() - dmin * mins).reshape(n, 256)


def _dequant_q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh, scales = b[:, :128], b[:, 128:192], b[:, 192:208].view(torch.int8)
    d = _f16(b, 208).view(n, 1, 1)
    q_low = _bits(ql.reshape(n, 2, 64), [0, 4], 0x0F).reshape(n, 8, 32)  # [N, 2, 2, 64]
    q_high = _bits(qh.reshape(n, 2, 32), [0, 2, 4, 6], 0x03).reshape(n, 8, 32)  # [N, 2, 4, 32]
    q = (q_low | (q_high << 4)).to(torch.int16) - 32
    return (d * scales.float().view(n, 16, 1) * q.float().view(n, 16, 16)).reshape(n, 256)


_BLOCK_DEQUANT = {
    "Q8_0": _dequant_q8_0, "Q4_0": _dequant_q4_0, "Q4_1": _dequant_q4_1, "Q5_0": _dequant_q5_0,
    "Q5_1": _dequant_q5_1, "Q2_K": _dequant_q2_k, "Q3_K": _dequant_q3_k, "Q4_K": _dequant_q4_k,
    "Q5_K": _dequant_q5_k, "Q6_K": _dequant_q6_k,
}
_FLOAT = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
DEQUANTIZABLE = (*_FLOAT, *_BLOCK_DEQUANT)


def dequantize(raw: torch.Tensor, ttype: TensorType | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """GGUF bytes uint8 [rows..., row_bytes] -> `dtype` [rows..., row_length], chunk by chunk.

    The result is a new tensor (never a view of `raw`); peak memory is the output plus one chunk.
    """
    ttype = TENSOR_TYPES_BY_NAME[ttype] if isinstance(ttype, str) else ttype
    if ttype.name not in DEQUANTIZABLE:
        raise CheckpointError(f"GGUF tensor type {ttype.name} cannot be dequantized by komt "
                              f"(supported: {', '.join(DEQUANTIZABLE)})")
    row_bytes = raw.shape[-1]
    if row_bytes % ttype.type_size:
        raise CheckpointError(f"{ttype.name} row of {row_bytes} bytes is not a whole number of blocks")
    row_length = row_bytes // ttype.type_size * ttype.block_size
    out = torch.empty((*raw.shape[:-1], row_length), dtype=dtype)
    if ttype.name in _FLOAT:
        return out.copy_(raw.view(_FLOAT[ttype.name]))
    blocks = raw.reshape(-1, ttype.type_size)  # [N blocks, type_size]; zero-copy for a mapped tensor
    flat = out.view(-1, ttype.block_size)  # [N blocks, block_size]
    step = max(1, CHUNK_ELEMENTS // ttype.block_size)
    for start in range(0, blocks.shape[0], step):
        flat[start:start + step] = _BLOCK_DEQUANT[ttype.name](blocks[start:start + step])
    return out

"""Encode float tensors as GGUF F32, F16, BF16, Q8_0 or Q4_0 bytes, bit for bit as llama.cpp does.

The rules are ggml's reference quantizers (`quantize_row_q8_0_ref`, `quantize_row_q4_0_ref`,
`ggml_compute_fp32_to_bf16`), in the float32 arithmetic gguf-py's `gguf.quants.quantize` uses to match
them byte for byte; the tests check komt's bytes equal gguf-py's. Every step is float32, so the order of
operations below is the reference's and must not be "simplified" (1 / d then a product is not x / d):

    Q8_0 (32 per block)  d = max|x| / 127            q = round_half_away(x * (1/d))   bytes: d fp16, q int8[32]
    Q4_0 (32 per block)  d = x[argmax |x|] / -8      q = min(trunc(x * (1/d) + 8.5), 15)
                         bytes: d fp16, then byte j = q[j] | q[j + 16] << 4
    BF16                 round to nearest even on the float32 bits; NaN kept quiet with its sign

Work is chunked by rows so memory stays at one chunk beside the output.
"""

from __future__ import annotations

import torch

from komt.errors import CheckpointError
from komt.model.gguf.constants import TENSOR_TYPES_BY_NAME

QUANTIZABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0")
_CHUNK_ELEMENTS = 1 << 22


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf, as gguf-py's np_roundf: floor(|x|) + floor(2 * frac(|x|)), with x's sign.

    Not floor(|x| + 0.5): that sum rounds in float32 just below 0.5 (0.49999997 + 0.5 -> 1.0)."""
    a = x.abs()
    floored = a.floor()
    return x.sign() * (floored + (2 * (a - floored)).floor())


def _reciprocal_or_zero(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def _fp16_bytes(d: torch.Tensor) -> torch.Tensor:
    """float32 [N, 1] -> its fp16 as uint8 [N, 2] (little-endian, as the file stores it)."""
    return d.to(torch.float16).view(torch.uint8)


def _q8_0_blocks(x: torch.Tensor) -> torch.Tensor:
    """float32 [N, 32] -> uint8 [N, 34]."""
    d = x.abs().amax(dim=1, keepdim=True) / 127
    q = _round_half_away(x * _reciprocal_or_zero(d))
    return torch.cat([_fp16_bytes(d), q.to(torch.int8).view(torch.uint8)], dim=1)


def _q4_0_blocks(x: torch.Tensor) -> torch.Tensor:
    """float32 [N, 32] -> uint8 [N, 18]."""
    signed_max = x.gather(1, x.abs().argmax(dim=1, keepdim=True))  # first index on ties, as numpy's argmax
    d = signed_max / -8
    q = torch.trunc(x * _reciprocal_or_zero(d) + 8.5).clamp(0, 15).to(torch.uint8)
    packed = q[:, :16] | (q[:, 16:] << 4)  # byte j: element j low, element j + 16 high
    return torch.cat([_fp16_bytes(d), packed], dim=1)


def _bf16_bits(x: torch.Tensor) -> torch.Tensor:
    """float32 [...] -> bf16 bit patterns as int16 [...], exactly ggml_compute_fp32_to_bf16."""
    n = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # the u32 bits
    is_nan = (n & 0x7FFFFFFF) > 0x7F800000
    rounded = (n + (0x7FFF + ((n >> 16) & 1))) >> 16
    quiet_nan = (n >> 16) | 64  # keep sign and top mantissa bits, force the quiet bit
    bits = torch.where(is_nan, quiet_nan, rounded) & 0xFFFF
    return torch.where(bits >= 0x8000, bits - 0x10000, bits).to(torch.int16)


def quantize(x: torch.Tensor, type_name: str) -> torch.Tensor:
    """float tensor [rows..., I] -> GGUF bytes uint8 [rows..., row_bytes] of `type_name`."""
    if type_name not in QUANTIZABLE:
        raise CheckpointError(f"komt writes GGUF types {', '.join(QUANTIZABLE)}, not {type_name}")
    ttype = TENSOR_TYPES_BY_NAME[type_name]
    row_length = x.shape[-1]
    if row_length % ttype.block_size:
        raise CheckpointError(f"cannot write a row of {row_length} as {type_name} (blocks of {ttype.block_size})")
    rows = x.detach().reshape(-1, row_length)  # [R, I]
    row_bytes = row_length // ttype.block_size * ttype.type_size
    out = torch.empty((rows.shape[0], row_bytes), dtype=torch.uint8)
    step = max(1, _CHUNK_ELEMENTS // max(row_length, 1))
    for start in range(0, rows.shape[0], step):
        chunk = rows[start:start + step].to(torch.float32)  # [r, I]
        if type_name == "F32":
            encoded = chunk.view(torch.uint8)
        elif type_name == "F16":
            encoded = chunk.to(torch.float16).view(torch.uint8)
        elif type_name == "BF16":
            encoded = _bf16_bits(chunk).view(torch.uint8)
        else:
            blocks = chunk.reshape(-1, 32)  # [r * I / 32, 32]
            encoded = (_q8_0_blocks if type_name == "Q8_0" else _q4_0_blocks)(blocks).view(chunk.shape[0], row_bytes)
        out[start:start + step] = encoded.reshape(chunk.shape[0], row_bytes)
    return out.view(*x.shape[:-1], row_bytes)

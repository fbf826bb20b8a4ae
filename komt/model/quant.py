"""Weight quantization: the math of komt's int8 and int4 formats, as plain PyTorch.

A linear layer's weight W [O, I] is stored as small integers and one or two float16 numbers per group of g
consecutive input columns (g = I: one per output row, "per channel"):

    int8 (symmetric)   W[o, i] = q[o, i] * scale[o, i // g]                     q in [-127, 127]
    int4 (asymmetric)  W[o, i] = q[o, i] * scale[o, i // g] + offset[o, i // g]   q in [0, 15]

int4 values are packed two per byte: element i of row o lives in byte i // 2, the low nibble for even i and
the high nibble for odd i. These canonical forms are what `python -m komt.quantize` writes, what GGUF's
Q8_0 (int8, g 32) and Q4_0 / Q4_1 (int4, g 32) map onto exactly, and what the Triton kernels read.

Choices. int8 is symmetric: scale = absmax / 127 (llama.cpp's Q8_0 rule), which loses nothing measurable
for weights, whose distributions are centred. int4 keeps an offset (the group's minimum, as Q4_1 does)
because sixteen levels spread over [min, max] instead of [-absmax, absmax] lose about half a bit less on
skewed groups; the CPU and Triton kernels apply it for free (a fused multiply-add). Scales are float16 like
GGUF's, and q is computed against the *rounded* scale, so dequantization reproduces what was measured.
Quantization works in row chunks: a 14336 x 4096 weight never exists twice in fp32. Dequantization is the
reference that states the formats' math for the kernels too: `kernels.reference.dequantize_int8` /
`dequantize_int4` / `unpack_int4` (plain PyTorch, importable without triton).
"""

from __future__ import annotations

import torch

from komt.jsonutil import is_int

INT4_GROUP_SIZES = (32, 64, 128)
_ROWS_PER_CHUNK = 1024  # 1024 x 14336 fp32 temporaries: ~60 MB


def check_group_size(group_size: int, in_features: int, what: str = "group_size") -> None:
    if not is_int(group_size) or group_size <= 0:
        raise ValueError(f"{what} must be a positive integer, got {group_size!r}")
    if in_features % group_size:
        raise ValueError(f"{what} {group_size} does not divide the {in_features} input features")


def quantize_int8(weight: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """W [O, I] -> (q int8 [O, I], scales float16 [O, I // g]); g None = per output channel."""
    n_out, n_in = weight.shape
    g = group_size or n_in
    check_group_size(g, n_in)
    q = torch.empty(n_out, n_in, dtype=torch.int8, device=weight.device)
    scales = torch.empty(n_out, n_in // g, dtype=torch.float16, device=weight.device)
    for lo in range(0, n_out, _ROWS_PER_CHUNK):
        w = weight[lo : lo + _ROWS_PER_CHUNK].float().view(-1, n_in // g, g)  # (rows, I) -> (rows, G, g)
        scale = (w.abs().amax(-1) / 127).to(torch.float16)  # (rows, G)
        safe = torch.where(scale == 0, 1.0, scale.float())[..., None]
        q[lo : lo + _ROWS_PER_CHUNK] = (w / safe).round().clamp(-127, 127).to(torch.int8).view(-1, n_in)
        scales[lo : lo + _ROWS_PER_CHUNK] = scale
    return q, scales


def quantize_int4(weight: torch.Tensor, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [O, I] -> (packed uint8 [O, I // 2], scales float16 [O, I // g], offsets float16 [O, I // g])."""
    n_out, n_in = weight.shape
    check_group_size(group_size, n_in)
    if n_in % 2:
        raise ValueError(f"int4 packs two values per byte: in_features must be even, got {n_in}")
    G = n_in // group_size
    packed = torch.empty(n_out, n_in // 2, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(n_out, G, dtype=torch.float16, device=weight.device)
    offsets = torch.empty(n_out, G, dtype=torch.float16, device=weight.device)
    for lo in range(0, n_out, _ROWS_PER_CHUNK):
        w = weight[lo : lo + _ROWS_PER_CHUNK].float().view(-1, G, group_size)  # (rows, G, g)
        low, high = w.amin(-1), w.amax(-1)
        offset = low.to(torch.float16)
        scale = ((high - offset.float()) / 15).to(torch.float16)
        safe = torch.where(scale == 0, 1.0, scale.float())[..., None]
        q = ((w - offset.float()[..., None]) / safe).round().clamp(0, 15).to(torch.uint8)
        packed[lo : lo + _ROWS_PER_CHUNK] = pack_int4(q.view(-1, n_in))
        scales[lo : lo + _ROWS_PER_CHUNK] = scale
        offsets[lo : lo + _ROWS_PER_CHUNK] = offset
    return packed, scales, offsets


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q [O, I] with values 0..15 -> uint8 [O, I // 2]: even columns in the low nibble, odd in the high."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)

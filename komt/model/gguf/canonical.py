"""GGUF Q8_0 / Q4_0 / Q4_1 tensors as komt's canonical quantized weights (QUANT_SPEC.md), exactly.

No requantization: the GGUF block's scale becomes the group's scale, its quants become the weight, only
re-laid out. With g = 32 (one GGUF block = one group), for a weight W [O, I]:

    Q8_0 -> int8  weight int8 [O, I] = qs        scales fp16 [O, I/32] = d
    Q4_0 -> int4  weight uint8 [O, I/2]          scales = d, offsets = -8 d   (exact: a power-of-two multiple)
    Q4_1 -> int4  weight uint8 [O, I/2]          scales = d, offsets = m

komt's int4 packs element i of a row in byte i // 2 (low nibble even i, high nibble odd i); GGUF packs
element j and j + 16 of a block in its byte j. `from_gguf` re-pairs the nibbles; `to_gguf` undoes it, so
Q4_0 -> int4 -> Q4_0 gives back the file's bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from komt.errors import CheckpointError

GGUF_GROUP = 32
_FP16_MAX_D_FOR_Q4_0 = 65504 / 8  # beyond it, -8 d is not a finite fp16


@dataclass(frozen=True)
class QuantizedTensor:
    """A linear weight [O, I] in komt's canonical quantized form (QUANT_SPEC.md).

    kind "int8": weight int8 [O, I], scales fp16 [O, I / g], offsets None; W = q * scale.
    kind "int4": weight uint8 [O, I / 2] (two values a byte), scales and offsets fp16 [O, I / g];
                 W = q * scale + offset.
    """

    kind: str
    group_size: int
    weight: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.weight.shape
        return (rows, cols * 2) if self.kind == "int4" else (rows, cols)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight [O, I] it stands for, by QUANT_SPEC's formula (in float32, then `dtype`)."""
        rows, cols = self.shape
        if self.kind == "int8":
            q = self.weight.float()
        else:
            q = torch.stack([self.weight & 0x0F, self.weight >> 4], dim=-1).reshape(rows, cols).float()  # [O, I/2, 2] -> [O, I]
        groups = q.view(rows, cols // self.group_size, self.group_size)  # [O, I/g, g]
        w = groups * self.scales.float().unsqueeze(-1)
        if self.offsets is not None:
            w = w + self.offsets.float().unsqueeze(-1)
        return w.view(rows, cols).to(dtype)


CANONICAL_TYPES = ("Q8_0", "Q4_0", "Q4_1")


def from_gguf(raw: torch.Tensor, type_name: str) -> QuantizedTensor:
    """GGUF bytes uint8 [O, row_bytes] of Q8_0 / Q4_0 / Q4_1 -> the canonical record (new tensors)."""
    rows = raw.shape[0]
    if type_name == "Q8_0":
        blocks = raw.view(rows, -1, 34)  # [O, I/32, 34]: d fp16, then 32 int8
        weight = blocks[..., 2:].contiguous().view(torch.int8).view(rows, -1)  # [O, I]
        return QuantizedTensor("int8", GGUF_GROUP, weight, _scales(blocks, 0))
    if type_name not in ("Q4_0", "Q4_1"):
        raise CheckpointError(f"GGUF {type_name} has no exact canonical form (only {', '.join(CANONICAL_TYPES)})")
    size = 18 if type_name == "Q4_0" else 20
    blocks = raw.view(rows, -1, size)  # [O, I/32, size]
    qs = blocks[..., size - 16:]  # [O, I/32, 16]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1)  # [O, I/32, 32] in element order
    weight = (q[..., 0::2] | (q[..., 1::2] << 4)).reshape(rows, -1)  # pairs (2k, 2k+1) -> [O, I/2]
    scales = _scales(blocks, 0)
    if type_name == "Q4_1":
        return QuantizedTensor("int4", GGUF_GROUP, weight, scales, _scales(blocks, 2))
    if scales.numel() and scales.abs().max() > _FP16_MAX_D_FOR_Q4_0:
        raise CheckpointError(f"Q4_0 block scale {scales.abs().max().item()} is too large for an fp16 offset")
    return QuantizedTensor("int4", GGUF_GROUP, weight, scales, scales * -8)


def to_gguf(record: QuantizedTensor) -> tuple[str, torch.Tensor]:
    """The inverse of `from_gguf` for g = 32: ("Q8_0" | "Q4_0" | "Q4_1", bytes uint8 [O, row_bytes]).

    int4 with offsets == -8 * scales is Q4_0 (what llama.cpp runs fastest), any other offsets Q4_1.
    """
    if record.group_size != GGUF_GROUP:
        raise CheckpointError(f"only group size {GGUF_GROUP} maps onto GGUF blocks, not {record.group_size}")
    rows = record.weight.shape[0]
    d = record.scales.to(torch.float16).unsqueeze(-1).view(torch.uint8)  # [O, I/32, 2]
    if record.kind == "int8":
        qs = record.weight.view(torch.int8).view(rows, -1, 32).view(torch.uint8)
        return "Q8_0", torch.cat([d, qs], dim=-1).reshape(rows, -1)
    q = torch.stack([record.weight & 0x0F, record.weight >> 4], dim=-1).reshape(rows, -1, 32)  # [O, I/32, 32]
    qs = q[..., :16] | (q[..., 16:] << 4)  # byte j: element j low, j + 16 high
    offsets = record.offsets.to(torch.float16)
    if torch.equal(offsets, record.scales.to(torch.float16) * -8):
        return "Q4_0", torch.cat([d, qs], dim=-1).reshape(rows, -1)
    m = offsets.unsqueeze(-1).view(torch.uint8)
    return "Q4_1", torch.cat([d, m, qs], dim=-1).reshape(rows, -1)


def _scales(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 at bytes [start, start + 2) of each block: [O, I/32, size] -> fp16 [O, I/32]."""
    return blocks[..., start:start + 2].contiguous().view(torch.float16).squeeze(-1)

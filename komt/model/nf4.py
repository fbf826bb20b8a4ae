"""NF4, QLoRA's 4-bit NormalFloat (Dettmers et al. 2023), with double-quantized scales, and `NF4Linear`.

A weight W [O, I] (I % 64 == 0) is cut into blocks of 64 consecutive values along I. Each block keeps its
absolute maximum m and, per value, the index of the nearest of the 16 NF4 levels to w / m:

    W[o, i] = NF4_LEVELS[q[o, i]] * m[o, i // 64]

The levels are quantiles of N(0, 1) scaled into [-1, 1] (equal probability mass per level, an exact zero
and one extra positive level), the values bitsandbytes ships (`get_4bit_type("nf4")`). Double
quantization stores the fp32 block maxima themselves in 8 bits: their mean c is subtracted, and the
centred values are quantized in blocks of 256 with the 8-bit dynamic (tree) code of Dettmers 2015, each
block keeping its own fp32 absmax s:

    m[b] = DYNAMIC_CODE[a[b]] * s[b // 256] + c

That is 4 + 8/64 + 32/(64 * 256) = 4.127 bits per weight instead of 4.5 with fp32 block maxima.

Layout (tensor names of `NF4Linear`; bitsandbytes' serialized names in brackets):
    weight            uint8   [O, I // 2]   two indices per byte, komt's int4 order (QUANT_SPEC.md): element
                                            i in byte i // 2, LOW nibble for even i   [weight, HIGH nibble first]
    absmax            uint8   [O * I / 64]  8-bit code of each block's maximum          [weight.absmax]
    nested_absmax     float32 [ceil(O * I / 64 / 256)]                                   [weight.nested_absmax]
    nested_offset     float32 []            the mean c                  [weight.quant_state...nested_offset]
    quant_map         float32 [16]          NF4_LEVELS                                   [weight.quant_map]
    nested_quant_map  float32 [256]         the dynamic code                             [weight.nested_quant_map]
Dequantization reads the two maps from the tensors, so a bitsandbytes file's own maps are honoured.
Rounding follows bitsandbytes (values scaled by 1 / m, then the nearest level), so komt and bitsandbytes
pick the same indices (tested against bitsandbytes 0.50 in tests/fixtures/nf4/).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from komt.errors import ConfigError
from komt.model.quantized_linear import QuantizedLinear

BLOCK = 64  # weights per NF4 block
NESTED_BLOCK = 256  # block maxima per second-level block
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)


def dynamic_code() -> torch.Tensor:
    """The signed 8-bit dynamic tree code (Dettmers 2015, "8-Bit Approximations for Parallelism"): [256] sorted.

    A value is sign x 10^-e x f: the exponent e = 6..0 is spent as a unary prefix, and the bits left over
    select a fraction f, the midpoint of one of 2^k equal steps of [0.1, 1]. Small magnitudes get few
    fraction bits and large ones many, so relative precision is nearly even over six decades; plus 0 and 1.
    """
    parts = [torch.tensor([0.0, 1.0])]
    for i in range(7):  # 10^(i - 6) times 2^i fractions, both signs: 2 x (1 + 2 + ... + 64) = 254 values
        edges = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2  # float32 throughout, as bitsandbytes computes it
        parts += [10 ** (i - 6) * mids, -(10 ** (i - 6)) * mids]
    return torch.cat(parts).sort().values  # (256,)


def _nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of the sorted `code` for every value: bucketize on the midpoints."""
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints)


@dataclass
class NF4Tensor:
    """The quantized form of one weight (see module docstring for the layout)."""

    weight: torch.Tensor  # uint8 [O, I // 2]
    absmax: torch.Tensor  # uint8 [n_blocks]
    nested_absmax: torch.Tensor  # float32 [n_nested]
    nested_offset: torch.Tensor  # float32 []
    quant_map: torch.Tensor  # float32 [16]
    nested_quant_map: torch.Tensor  # float32 [256]


def quantize_nf4(weight: torch.Tensor) -> NF4Tensor:
    """W [O, I] (any float dtype, I % 64 == 0) -> NF4 with double-quantized block maxima."""
    if weight.dim() != 2 or weight.shape[1] % BLOCK:
        raise ConfigError(f"NF4 needs a 2-D weight whose input size is a multiple of {BLOCK}, got {tuple(weight.shape)}")
    O, I = weight.shape
    device = weight.device
    blocks = weight.detach().float().reshape(-1, BLOCK)  # (O * I / 64, 64): consecutive along I
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1)
    levels = NF4_LEVELS.to(device)
    q = _nearest(scaled, levels).to(torch.uint8).reshape(O, I)  # (O, I) indices 0..15
    packed = q[:, 0::2] | (q[:, 1::2] << 4)  # (O, I // 2): even i low nibble, odd i high

    offset = absmax.mean()
    centred = absmax - offset
    pad = (-centred.numel()) % NESTED_BLOCK
    nested = F.pad(centred, (0, pad)).reshape(-1, NESTED_BLOCK)  # (n_nested, 256)
    nested_absmax = nested.abs().amax(dim=1)
    code = dynamic_code().to(device)
    a = _nearest((nested * (1.0 / nested_absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1), code)
    a = a.reshape(-1)[:centred.numel()].to(torch.uint8)
    return NF4Tensor(packed, a, nested_absmax, offset, levels, code)


def dequantize_nf4(t: NF4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense weight [O, I] the NF4 tensor stands for, computed in fp32 and rounded once to `dtype`."""
    O, half = t.weight.shape
    n_blocks = t.absmax.numel()
    nested = t.nested_quant_map[t.absmax.long()]  # (n_blocks,)
    scales = t.nested_absmax.repeat_interleave(NESTED_BLOCK)[:n_blocks]
    absmax = nested * scales + t.nested_offset  # (n_blocks,) the block maxima, fp32
    q = torch.stack([t.weight & 0xF, t.weight >> 4], dim=-1).reshape(O, 2 * half)  # (O, I//2, 2) -> (O, I)
    values = t.quant_map[q.long()].reshape(-1, BLOCK) * absmax[:, None]  # (n_blocks, 64)
    return values.reshape(O, 2 * half).to(dtype)


class NF4Linear(QuantizedLinear):
    """A bias-free linear layer whose frozen weight is held in NF4 (a layer variant, QUANT_SPEC.md).

    forward(x [..., I]) dequantizes the whole weight to x's dtype and calls F.linear, so it computes
    exactly `F.linear(x, self.dequantize(x.dtype))`: correct on any device, 4.13 bits a weight at rest, not
    fast (a fused NF4 kernel is a separate job). Like Int8Linear/Int4Linear its tensors are frozen
    parameters (QLoRA trains the LoRA layers on top), and under autograd the backward recomputes the
    dense weight (`QuantizedLinear`'s rule) instead of keeping one per layer alive until then.
    """

    bits = 4

    def __init__(self, t: NF4Tensor) -> None:
        super().__init__(2 * t.weight.shape[1], t.weight.shape[0], BLOCK)
        for name in ("weight", "absmax", "nested_absmax", "nested_offset", "quant_map", "nested_quant_map"):
            setattr(self, name, torch.nn.Parameter(getattr(t, name), requires_grad=False))

    @classmethod
    def from_weight(cls, weight: torch.Tensor) -> "NF4Linear":
        """Quantize a dense weight [O, I] (e.g. an nn.Linear's) into a new NF4Linear on its device."""
        return cls(quantize_nf4(weight))

    def tensors(self) -> NF4Tensor:
        return NF4Tensor(self.weight, self.absmax, self.nested_absmax, self.nested_offset, self.quant_map,
                         self.nested_quant_map)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight [O, I] this layer computes with."""
        return dequantize_nf4(self.tensors(), dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nf4 (double-quantized scales)"

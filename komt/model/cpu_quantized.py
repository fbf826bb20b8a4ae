"""Quantized linear layers laid out for PyTorch's CPU kernels (the CPU layout of Int8Linear / Int4Linear).

PyTorch ships two weight-only-quantized CPU matmuls, vectorized (AVX-512 / AVX2) and spread over the
cores: `torch._weight_int8pack_mm` (int8 weight [O, I], one scale per output row) and
`torch._weight_int4pack_mm_for_cpu` (int4 weight in its own packed layout, a bf16 scale and zero per group,
W = (q - 8) * scale + zero). Both are fast only with bf16 activations; with fp32 they take a scalar path
about ten times slower. Measured on this project's 2-core Xeon (AMX, AVX-512 bf16), one row, bf16 x:

    shape (O x I)     int8pack            int4pack (g 32)      bf16 F.linear    fp32 F.linear
    576 x 576         11 us (31 GB/s)     11 us                                 12 us
    14336 x 4096      1.47 ms (40 GB/s)   1.37 ms              -                6.0 ms
    DRAM-resident     24.6 GB/s (of 26.3 GB/s measured copy bandwidth)

So the quantized CPU variants convert x to bf16 around the kernel (one 576-element conversion costs ~1 us)
and keep the residual stream in the model's dtype. The two kernels reach the same element rate, so int4's
gain on the CPU is memory (half of int8's) and bandwidth once the weights no longer fit the caches.
For many rows (prefill) both plateau near 184 GFLOP/s against ~2 TFLOP/s for a bf16 GEMM on AMX.

The packed int4 layout is the kernel's, not komt's canonical one (measured, checked at run time by
`_packed_layout_is_known`): bytes [O / 64, I, 32], byte (b, i, j) holding W[64 b + j, i] in its low
nibble and W[64 b + j + 32, i] in its high nibble. `Int4CPULinear` keeps only that packed copy, so its
memory is the canonical one's; `dequantize()` unpacks it.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from kernels.reference import unpack_int4
from komt.model.linear import SharedInputGroup
from komt.model.quant import pack_int4
from komt.model.quantized_linear import Int4Linear, Int8Linear, QuantizedLinear, _frozen

_PACK_BLOCK_N = 64  # rows per block of the int4 kernel's layout (AVX-512 / AVX2 builds of PyTorch 2.x)


_ALIGN = 64  # bytes


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """`t`, copied if its data does not start on a 64-byte boundary.

    `torch._weight_int8pack_mm` (PyTorch 2.13, AVX-512 build) crashes with a segmentation fault for inputs
    of several rows when the weight is not 64-byte aligned (aligned vector loads): a weight viewed from a
    safetensors memory map at an 8-byte offset is enough. tests/test_quantized_linear.py pins the case.
    """
    return t if t.data_ptr() % _ALIGN == 0 else t.clone()


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # (..., I) -> (M, I), the kernels' input


class Int8CPULinear(QuantizedLinear):
    """Per-channel int8 (the canonical Int8Linear tensors) with bf16 scales for `_weight_int8pack_mm`."""

    bits = 8

    def __init__(self, layer: Int8Linear) -> None:
        super().__init__(layer.in_features, layer.out_features, layer.group_size)
        if layer.group_size != layer.in_features:
            raise ValueError("the CPU int8 kernel takes one scale per output row (per-channel int8)")
        self.weight = layer.weight if layer.weight.data_ptr() % _ALIGN == 0 else _frozen(_aligned(layer.weight.detach()))
        self.scales = layer.scales
        self._kernel_scales = layer.scales.detach().view(-1).to(torch.bfloat16)  # (O,)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return Int8Linear.dequantize(self, dtype)

    def exact_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows `rows` of the weight, dequantized exactly in fp32 (for `PreciseHead`): [len(rows), I]."""
        return self.weight[rows].float() * self.scales[rows].float()  # per channel: scales (O, 1)

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch._weight_int8pack_mm(_as_rows(x), self._parameters["weight"], self._kernel_scales)
        return out.to(x.dtype).view(x.shape[:-1] + (self.out_features,))


@functools.lru_cache(maxsize=None)
def _packed_layout_is_known() -> bool:
    """Does this PyTorch build pack int4 weights the way `_unpack_cpu_int4` reads them? (a probe)."""
    probe = torch.arange(128 * 64, dtype=torch.int32).view(128, 64) % 16
    try:
        packed = torch._convert_weight_to_int4pack_for_cpu(probe, 1)
    except (RuntimeError, AttributeError):
        return False
    return packed.shape == (128, 32) and torch.equal(_unpack_cpu_int4(packed, 128, 64), probe.to(torch.uint8))


def _unpack_cpu_int4(packed: torch.Tensor, n_out: int, n_in: int) -> torch.Tensor:
    """The kernel's packed bytes -> q uint8 [O, I] (layout in the module docstring)."""
    blocks = packed.view(n_out // _PACK_BLOCK_N, n_in, _PACK_BLOCK_N // 2)  # (O/64, I, 32)
    low, high = blocks & 0xF, blocks >> 4
    q = torch.cat((low, high), dim=2)  # (O/64, I, 64): rows 64b + j, j < 32 low, j >= 32 high
    return q.permute(0, 2, 1).reshape(n_out, n_in)  # (O/64, 64, I) -> (O, I)


def int4_cpu_supported(layer: QuantizedLinear) -> bool:
    return layer.out_features % _PACK_BLOCK_N == 0 and _packed_layout_is_known()


class Int4CPULinear(QuantizedLinear):
    """int4 weights in the layout of `_weight_int4pack_mm_for_cpu` (see module docstring).

    `weight` holds the kernel's packed bytes and `scales_and_zeros` its bf16 [I / g, O, 2] table; komt's
    offsets become the kernel's zeros: q * s + offset = (q - 8) * s + (offset + 8 s).
    """

    bits = 4

    def __init__(self, layer: Int4Linear, keep_exact: bool = False) -> None:
        super().__init__(layer.in_features, layer.out_features, layer.group_size)
        q = unpack_int4(layer.weight.detach()).to(torch.int32)  # (O, I) in 0..15
        self.weight = _frozen(torch._convert_weight_to_int4pack_for_cpu(q, 1))
        scales, offsets = layer.scales.detach().float(), layer.offsets.detach().float()
        table = torch.stack((scales, offsets + 8 * scales), dim=-1)  # (O, G, 2)
        self.scales_and_zeros = _frozen(table.transpose(0, 1).contiguous().to(torch.bfloat16))  # (G, O, 2)
        # For a head (`keep_exact`): the exact fp16 scales and offsets too, which `exact_rows` needs. Other
        # layers do without: they are a fifth of the packed weight's size (0.7 GB for the 7B shape).
        self.exact_scales = layer.scales.detach().clone() if keep_exact else None
        self.exact_offsets = layer.offsets.detach().clone() if keep_exact else None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = _unpack_cpu_int4(self.weight.detach(), self.out_features, self.in_features).float()  # (O, I)
        table = self.scales_and_zeros.float().transpose(0, 1)  # (G, O, 2) -> (O, G, 2)
        g = self.group_size
        w = (q.view(self.out_features, -1, g) - 8) * table[..., :1] + table[..., 1:]  # (O, G, g)
        return w.view(self.out_features, self.in_features).to(dtype)

    def exact_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows `rows` of the weight, dequantized exactly in fp32 from the packed bytes: [len(rows), I]."""
        if self.exact_scales is None:
            raise ValueError("exact_rows needs a layer built with keep_exact=True (a head)")
        blocks = self.weight.detach().view(-1, self.in_features, _PACK_BLOCK_N // 2)  # (O/64, I, 32)
        j = rows % _PACK_BLOCK_N
        picked = blocks[rows // _PACK_BLOCK_N, :, j % (_PACK_BLOCK_N // 2)]  # (n, I): the byte of each element
        q = torch.where((j < _PACK_BLOCK_N // 2)[:, None], picked & 0xF, picked >> 4).float()  # (n, I)
        g = self.group_size
        w = q.view(len(rows), -1, g) * self.exact_scales[rows].float()[..., None] + self.exact_offsets[rows].float()[..., None]
        return w.view(len(rows), self.in_features)

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch._weight_int4pack_mm_for_cpu(
            _as_rows(x), self._parameters["weight"], self.group_size, self._parameters["scales_and_zeros"]
        )
        return out.to(x.dtype).view(x.shape[:-1] + (self.out_features,))


class Int8GroupedCPULinear(QuantizedLinear):
    """Grouped int8 (GGUF Q8_0: a scale per 32 inputs) run exactly by the int4 kernel, as two halves.

    PyTorch's int8 CPU kernel takes one scale per row only. Each int8 q splits exactly into a high and a
    low nibble, q = 16 hi + lo (hi = q >> 4 in -8..7, lo = q & 15), so with scale s per group

        W = s q = (16 s) hi + s lo = [16 s | s]-scaled int4 matrix of twice the width, applied to [x | x],

    which is one `_weight_int4pack_mm_for_cpu` call over 2 I inputs with the same memory as int8 (two
    nibbles per value). The cost is the int4 kernel's on twice the inputs: about half the speed of the
    per-channel int8 kernel, and far faster than dequantizing a grouped weight at every call.
    """

    bits = 8

    def __init__(self, layer: Int8Linear, keep_exact: bool = False) -> None:
        super().__init__(layer.in_features, layer.out_features, layer.group_size)
        q = layer.weight.detach().to(torch.int16)  # (O, I)
        nibbles = torch.cat((torch.div(q, 16, rounding_mode="floor") + 8, q % 16), dim=1)  # (O, 2I): hi + 8 | lo
        s = layer.scales.detach().float()  # (O, G)
        scales = torch.cat((16 * s, s), dim=1)  # per group of the doubled row
        offsets = torch.cat((-128 * s, torch.zeros_like(s)), dim=1)  # hi: (n - 8) 16 s = n 16 s - 128 s
        self.inner = Int4CPULinear(Int4Linear(pack_int4(nibbles), scales.half(), offsets.half()), keep_exact)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        doubled = self.inner.dequantize(torch.float32)  # (O, 2I)
        return (doubled[:, : self.in_features] + doubled[:, self.in_features :]).to(dtype)

    def exact_rows(self, rows: torch.Tensor) -> torch.Tensor:
        doubled = self.inner.exact_rows(rows)  # (n, 2I): 16 s hi | s lo, exact (fp16 scales times 16)
        return doubled[:, : self.in_features] + doubled[:, self.in_features :]

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner._kernel_forward(torch.cat((x, x), dim=-1))


class PreciseHead(nn.Module):
    """The vocabulary projection on a quantized CPU kernel, with the candidate logits recomputed exactly.

    The CPU kernels return bf16, whose 8-bit mantissa resolves a logit of 25 only to 0.125: two tokens whose
    true logits differ by 0.08 come out equal, and greedy decoding picks by the tie (measured on
    SmolLM2-135M's Q4_1 file: the exact weights answer "The capital of France is Paris.", the bf16 logits tie
    "The" with "L'" and the answer becomes French nonsense; llama.cpp, whose 8-bit activations round even
    more, answers the same nonsense). So the `top` largest logits of each row, where every sampling decision
    is made (greedy, top-k, top-p, and all but a negligible share of the probability mass), are recomputed in
    fp32 from the exactly dequantized rows; the rest keep the kernel's value. Costs a top-k and
    top x I multiply-adds a row: ~1 % of a SmolLM2 decode step.
    """

    def __init__(self, layer: QuantizedLinear, top: int = 64) -> None:
        super().__init__()
        self.layer, self.top = layer, min(top, layer.out_features)
        self.in_features, self.out_features = layer.in_features, layer.out_features

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.layer.dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.layer(x)
        if x.requires_grad:
            return logits
        rows = x.reshape(-1, self.in_features).float()  # (M, I)
        flat = logits.reshape(-1, self.out_features)  # (M, V)
        candidates = flat.topk(self.top, dim=-1).indices  # (M, top)
        exact = self.layer.exact_rows(candidates.reshape(-1)).view(*candidates.shape, self.in_features)  # (M, top, I)
        flat = flat.float().scatter(1, candidates, torch.einsum("mi,mki->mk", rows, exact))
        return flat.to(logits.dtype).view(logits.shape)


def fuse_quantized(members: tuple[QuantizedLinear, ...]) -> SharedInputGroup:
    """Int8CPULinear or Int4CPULinear projections of one input, computed by one kernel call.

    The members' tensors are concatenated along O into one layer (both kernels' layouts stack rows: int8
    trivially, int4 by whole 64-row blocks, which `int4_cpu_supported` checks) whose forward is the group's
    product; each member then holds a view of its rows, so memory is not doubled. (The int4 table,
    [G, O, 2], would slice into a non-contiguous view: members keep their own small copy.)
    """
    first = members[0]
    fused = first.__class__.__new__(first.__class__)
    QuantizedLinear.__init__(fused, first.in_features, sum(m.out_features for m in members), first.group_size)
    with torch.no_grad():
        fused.weight = _frozen(torch.cat([m.weight for m in members]))  # (sum O, I) or (sum O, I / 2)
        if isinstance(first, Int8CPULinear):
            fused.scales = _frozen(torch.cat([m.scales for m in members]))
            fused._kernel_scales = torch.cat([m._kernel_scales for m in members])
        else:
            fused.scales_and_zeros = _frozen(torch.cat([m.scales_and_zeros for m in members], dim=1))
        lo = 0
        for m in members:
            hi = lo + m.out_features
            rows = fused.weight[lo:hi]
            if rows.data_ptr() % _ALIGN == 0:  # (an unaligned view would crash the int8 kernel: keep the copy)
                m.weight = _frozen(rows)
            if isinstance(m, Int8CPULinear):
                m.scales = _frozen(fused.scales[lo:hi])
                m._kernel_scales = fused._kernel_scales[lo:hi]
            lo = hi
    views = tuple(m._parameters["weight"] for m in members)

    def product(x: torch.Tensor) -> torch.Tensor | None:
        if x.requires_grad or any(m._parameters["weight"] is not v for m, v in zip(members, views)):
            return None  # autograd, or a member's weight replaced since: member by member
        return fused._kernel_forward(x)

    group = SharedInputGroup(members, product)
    group.fused = fused
    return group

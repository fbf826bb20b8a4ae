"""Int8Linear and Int4Linear: linear layers whose weight is held quantized (formats: komt.model.quant).

Each owns its tensors under the layer's Hugging Face name, so a quantized checkpoint reads like any other:

    Int8Linear   <name>.weight int8 [O, I]          <name>.scales float16 [O, I // g]
    Int4Linear   <name>.weight uint8 [O, I // 2]    <name>.scales, <name>.offsets float16 [O, I // g]

They are frozen (parameters with requires_grad False): QLoRA trains a LoRALinear on top of one, and the
gradient that flows *through* the frozen weight (to the layers below) is x's, computed against the
dequantized weight (`_DequantizedMatmul`), exactly what a dense frozen layer does.

How forward runs, by device (the canonical layout is portable; a faster CPU layout is a separate variant
that komt.model.cpu_layouts swaps in):
- CUDA with triton: komt's Triton dequantize-GEMV/GEMM kernels (`kernels.int8_matmul` / `int4_matmul`);
- anything else: dequantize to x's dtype and `F.linear` (the reference: correct everywhere, not fast).
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from komt.errors import ConfigError
from komt.jsonutil import is_int
from komt.model.linear import replace_module
from kernels.reference import dequantize_int4, dequantize_int8
from komt.model.quant import INT4_GROUP_SIZES, quantize_int4, quantize_int8

QUANTIZE_CHOICES = ("int8", "int4", "nf4")
DEFAULT_GROUP_SIZE = {"int8": None, "int4": 32, "nf4": 64}  # int8: per output channel; nf4: its fixed block


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def _triton_ready(x: torch.Tensor) -> bool:
    if x.device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class _DequantizedMatmul(torch.autograd.Function):
    """y = x W^T with W frozen and quantized: forward by `layer`'s kernel, backward dx = dy W (dense W)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        ctx.layer = layer
        return layer._kernel_forward(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        w = ctx.layer.dequantize(grad_out.dtype)  # (O, I)
        return grad_out @ w, None


class QuantizedLinear(nn.Module):
    """What Int8Linear and Int4Linear share: shapes, the autograd rule, the reference forward."""

    bits: int

    def __init__(self, in_features: int, out_features: int, group_size: int) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _DequantizedMatmul.apply(x, self)
        return self._kernel_forward(x)

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"


class Int8Linear(QuantizedLinear):
    """W = weight * scales (symmetric int8, per output channel or per group of g inputs)."""

    bits = 8

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor) -> None:
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, in_features // scales.shape[1])
        self.weight, self.scales = _frozen(weight), _frozen(scales)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, group_size: int | None = None) -> "Int8Linear":
        return cls(*quantize_int8(weight.detach(), group_size))

    @classmethod
    def empty(cls, out_features: int, in_features: int, group_size: int | None = None, device=None) -> "Int8Linear":
        """Uninitialised tensors of the right shapes (on the meta device: for loading a quantized checkpoint)."""
        g = group_size or in_features
        return cls(torch.empty(out_features, in_features, dtype=torch.int8, device=device),
                   torch.empty(out_features, in_features // g, dtype=torch.float16, device=device))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int8(self.weight, self.scales, self.group_size).to(dtype)

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        if _triton_ready(x):
            import kernels

            return kernels.int8_matmul(x, self.weight, self.scales, self.group_size)
        return super()._kernel_forward(x)


class Int4Linear(QuantizedLinear):
    """W = q * scales + offsets (int4 with a float offset per group of g inputs; two values per byte)."""

    bits = 4

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> None:
        out_features, half = weight.shape
        super().__init__(2 * half, out_features, 2 * half // scales.shape[1])
        self.weight, self.scales, self.offsets = _frozen(weight), _frozen(scales), _frozen(offsets)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, group_size: int = 32) -> "Int4Linear":
        return cls(*quantize_int4(weight.detach(), group_size))

    @classmethod
    def empty(cls, out_features: int, in_features: int, group_size: int = 32, device=None) -> "Int4Linear":
        G = in_features // group_size
        return cls(torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device),
                   torch.empty(out_features, G, dtype=torch.float16, device=device),
                   torch.empty(out_features, G, dtype=torch.float16, device=device))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int4(self.weight, self.scales, self.offsets, self.group_size).to(dtype)

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        if _triton_ready(x):
            import kernels

            return kernels.int4_matmul(x, self.weight, self.scales, self.offsets, self.group_size)
        return super()._kernel_forward(x)


def quantized_from_dense(weight: torch.Tensor, method: str, group_size: int | None = None) -> QuantizedLinear:
    """An Int8Linear / Int4Linear / NF4Linear holding `weight` quantized (group None = the default)."""
    if method == "int8":
        return Int8Linear.from_dense(weight, group_size)
    if method == "int4":
        return Int4Linear.from_dense(weight, group_size or DEFAULT_GROUP_SIZE["int4"])
    if method == "nf4":
        # Imported here: komt.model.nf4 builds NF4Linear on QuantizedLinear, defined above.
        from komt.model.nf4 import NF4Linear

        return NF4Linear.from_weight(weight.detach())
    raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {method!r}")


def empty_quantized(method: str, out_features: int, in_features: int, group_size: int | None,
                    device=None) -> QuantizedLinear:
    if method == "int8":
        return Int8Linear.empty(out_features, in_features, group_size, device)
    return Int4Linear.empty(out_features, in_features, group_size or DEFAULT_GROUP_SIZE["int4"], device)


@dataclass(frozen=True)
class QuantizeSpec:
    """How `load_model(quantize=...)` quantizes a checkpoint's linear layers while reading them.

    Every projection gets `method` with `group_size` (None: int8 per channel, int4 groups of 32; nf4 is
    QLoRA's NormalFloat in its fixed blocks of 64 with double-quantized maxima, komt.model.nf4). The
    vocabulary projection `lm_head` is always int8 per channel: it is 20 % of SmolLM2-135M's weights and
    the layer whose error reaches the logits undiluted, so it keeps 8 bits (llama.cpp likewise keeps its
    output tensor at Q6_K in a Q4_0 file). The embedding stays dense: a lookup reads one row per token.
    """

    method: str
    group_size: int | None = None

    def fallbacks(self, model: nn.Module) -> list[str]:
        """Layers that did not get `method` (int4/nf4 blocks that do not divide their inputs), lm_head aside."""
        if self.method == "int8":
            return []
        return [n for n, m in model.named_modules()
                if isinstance(m, QuantizedLinear) and m.bits == 8 and not n.endswith("lm_head")]

    def __post_init__(self) -> None:
        if self.method not in QUANTIZE_CHOICES:
            raise ConfigError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {self.method!r}")
        g = self.group_size
        if g is not None and (not is_int(g) or g <= 0):
            raise ConfigError(f"group_size must be a positive integer, got {g!r}")
        if self.method == "int4" and g is not None and g not in INT4_GROUP_SIZES:
            raise ConfigError(f"int4 group_size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, got {g}")
        if self.method == "nf4" and g is not None and g != DEFAULT_GROUP_SIZE["nf4"]:
            raise ConfigError(f"nf4 quantizes in fixed blocks of {DEFAULT_GROUP_SIZE['nf4']}; group_size {g} is not "
                              "available (leave it unset)")

    @property
    def block(self) -> int | None:
        """The input block one scale covers (None: a whole row, int8's default)."""
        return self.group_size or DEFAULT_GROUP_SIZE[self.method]

    def layer(self, name: str, weight: torch.Tensor) -> QuantizedLinear:
        """The quantized layer for the dense `weight` [O, I] of the layer called `name`.

        A layer whose input size the int4 group (or NF4's block of 64) does not divide (small test models)
        gets int8 per channel, as llama.cpp falls back to another type for such rows; `fallbacks` names them
        for the caller.
        """
        try:
            if name == "lm_head" or name.endswith(".lm_head"):
                return Int8Linear.from_dense(weight)
            if self.method != "int8" and weight.shape[1] % self.block:
                return Int8Linear.from_dense(weight)
            return quantized_from_dense(weight, self.method, self.group_size)
        except ValueError as err:
            raise ConfigError(f"cannot quantize {name} {tuple(weight.shape)}: {err}") from None


def quantize_linears(model: nn.Module, spec: QuantizeSpec,
                     weight_of: Callable[[str, nn.Linear], torch.Tensor] | None = None) -> int:
    """Replace every plain nn.Linear of `model` by its quantized layer; return how many.

    `weight_of(name, linear)` supplies each dense weight (default: the layer's own), so a caller can make
    weights one layer at a time (random_model) and never hold the dense model. A tied head is given its own
    quantized copy; the embedding keeps the dense tensor.
    """
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    for name in names:
        linear = model.get_submodule(name)
        weight = weight_of(name, linear) if weight_of is not None else linear.weight
        replace_module(model, name, spec.layer(name, weight.detach()))
    return len(names)


def dequantize_linears(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every quantized layer of `model` (int8, int4, NF4) by a plain nn.Linear of its dequantized
    weight in `dtype`; return how many. The model then computes, within `dtype`'s rounding, what it
    computed quantized: merging a QLoRA adapter writes such a model (komt.train.merge)."""
    names = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    for name in names:
        layer = model.get_submodule(name)
        linear = nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
        linear.weight = nn.Parameter(layer.dequantize(dtype), requires_grad=False)
        replace_module(model, name, linear)
    return len(names)

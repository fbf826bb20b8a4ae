"""How a linear layer runs: one mechanism, modules swapped in by name.

The model is written with plain `nn.Linear` projections under their Hugging Face names
(`model.layers.0.self_attn.q_proj`, ...). Every other way of running one is a *variant*: an nn.Module with
`in_features`, `out_features`, `forward(x [..., I]) -> [..., O]` in x's dtype, and `dequantize()` (the dense
weight [O, I] it computes with), which owns its tensors under the layer's own name (`weight`, plus
`scales`/`offsets` when quantized). Variants are put in place by `replace_module`, by name, after the
model is built (torchtune's and PEFT's way with LoRA):

    komt.model.quantized_linear   Int8Linear, Int4Linear        int8 / int4 weights (canonical formats)
    komt.model.cpu_layouts        SplitGEMVLinear, Int4CPULinear, fused groups   CPU decoding layouts
    komt.model.lora               LoRALinear(base_layer)         a low-rank update on top of any variant

`Attention` and `MLP` never know which variant they hold. The one thing they say is which projections read
the same input (`project(x, q_proj, k_proj, v_proj)`), a fact about attention, not about a variant: a
layout that stores those projections as one matrix (gpt-fast's wqkv / w13) computes them in one product;
every other combination runs each layer on its own. Nothing is registered anywhere: a model's variants are
exactly its modules.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule called `name` is (e.g. "model.layers.0.mlp.up_proj").

    The new module takes the old one's training mode: a variant swapped into a model in eval mode must not
    switch dropout (LoRA's) back on.
    """
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    new.train(getattr(parent, attr).training)
    setattr(parent, attr, new)


def is_linear(module: nn.Module) -> bool:
    """A linear layer of any variant: nn.Linear, or a module offering `dequantize` and the two sizes."""
    return isinstance(module, nn.Linear) or (
        callable(getattr(module, "dequantize", None)) and hasattr(module, "in_features") and hasattr(module, "out_features")
    )


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The [O, I] weight a linear layer (of any variant) computes with."""
    if isinstance(layer, nn.Linear):
        return layer.weight
    return layer.dequantize()


class SharedInputGroup:
    """Projections of one input computed as one product, e.g. q/k/v or gate/up.

    `product(x)` returns the members' outputs concatenated on the last axis, or None when this input does
    not suit the fused layout (several rows, autograd, another dtype): then each member runs on its own,
    which is always correct. A group is a plain attribute of its members (`shared_input_group`), never a
    submodule, so the state dict stays the model's own.
    """

    def __init__(self, members: tuple[nn.Module, ...], product: Callable[[torch.Tensor], torch.Tensor | None]) -> None:
        self.members = tuple(members)
        self.widths = [m.out_features for m in members]
        self._product = product
        for member in members:
            member.shared_input_group = self

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self._product(x)
        if out is None:
            return tuple(member(x) for member in self.members)
        return out.split(self.widths, dim=-1)


def project(x: torch.Tensor, *layers: nn.Module) -> tuple[torch.Tensor, ...]:
    """The outputs of `layers`, which all read `x`: one fused product when they form a group, else each."""
    group = getattr(layers[0], "shared_input_group", None)
    if group is not None and len(group.members) == len(layers) and all(
        a is b for a, b in zip(group.members, layers)
    ):
        return group(x)
    return tuple(layer(x) for layer in layers)

"""The CPU layouts pass: give every linear layer of a CPU model its fastest CPU variant, by name.

`komt.load_model` applies it to every model it loads onto the CPU (`layout="plain"` skips it), so the
Python API, the CLI, the server, eval and the benches all decode the same way. Per layer:

    plain fp32 nn.Linear         -> SplitGEMVLinear: one-row products as row blocks, one per core
                                    (lm_head stored transposed first: column blocks, 31 GB/s against 22)
    Int8Linear, per channel      -> Int8CPULinear: torch._weight_int8pack_mm on bf16 activations
    Int8Linear, grouped (Q8_0)   -> Int8GroupedCPULinear: exactly, as two int4 halves in the int4 kernel
    Int4Linear, O % 64 == 0      -> Int4CPULinear: torch._weight_int4pack_mm_for_cpu's packed layout
    LoRALinear                   -> left as it is; its `base_layer` gets the variant above
    a quantized lm_head          -> its CPU variant inside PreciseHead (the candidate logits exact in fp32)

and projections that read the same input (q/k/v, gate/up: gpt-fast's wqkv and w13) are fused into one
product when they are all the same plain kind: one kernel call and its dispatch instead of three.
Anything these variants do not cover (bf16 dense weights, output sizes not a multiple of 64) keeps
the layer it had, which is always correct. Measured figures are in the variants' modules
(komt.model.cpu_gemv, komt.model.cpu_quantized) and docs/benchmarks.md.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import nn

from komt.model.cpu_gemv import SplitGEMVLinear, fuse_fp32, n_blocks_for
from komt.model.cpu_quantized import (Int4CPULinear, Int8CPULinear, Int8GroupedCPULinear, PreciseHead,
                                      fuse_quantized, int4_cpu_supported)
from komt.model.linear import replace_module
from komt.model.lora import LoRALinear
from komt.model.quantized_linear import Int4Linear, Int8Linear, QuantizedLinear

# Sibling projections that read the same input, by their Hugging Face names.
SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _is_fp32_cpu_linear(module: nn.Module) -> bool:
    if type(module) not in (nn.Linear, SplitGEMVLinear) or module.bias is not None:
        return False
    return module.weight.device.type == "cpu" and module.weight.dtype == torch.float32


def _cpu_variant(module: nn.Module, threads: int, head: bool = False) -> nn.Module | None:
    """The CPU layout of one layer, or None where it has none (or already has it). A quantized `head`
    keeps what `PreciseHead` needs to recompute its rows exactly."""
    if type(module) is Int8Linear and module.weight.device.type == "cpu":
        if module.group_size == module.in_features:
            return Int8CPULinear(module)
        if int4_cpu_supported(module):
            return Int8GroupedCPULinear(module, keep_exact=head)
    if type(module) is Int4Linear and module.weight.device.type == "cpu" and int4_cpu_supported(module):
        return Int4CPULinear(module, keep_exact=head)
    if type(module) is nn.Linear and _is_fp32_cpu_linear(module):
        n_blocks = n_blocks_for(module.out_features, threads)
        return SplitGEMVLinear(module, n_blocks) if n_blocks >= 2 else None
    return None


def _projection_names(model: nn.Module) -> list[str]:
    """The name of every projection the pass may swap: not LoRA's own small A/B matrices.

    Names, not modules: a list holding the old layers would keep each one alive until the whole pass
    ends, so converting a 7B int4 model would hold its canonical and its packed weights at once (twice
    the memory at the peak). The caller fetches each layer when it reaches it and drops it once swapped.
    """
    found = []
    for name, _ in model.named_modules():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if name else None
        if isinstance(parent, LoRALinear) and attr != "base_layer":
            continue
        found.append(name)
    return found


def use_cpu_layouts(model: nn.Module, threads: int | None = None) -> int:
    """Apply the CPU layouts of the module docstring in place; return how many layers use one."""
    threads = threads or torch.get_num_threads()
    if threads >= 2:
        _fuse_fp32_groups(model, threads)
        _store_fp32_head_transposed(model)
    for name in _projection_names(model):  # each old layer is freed once swapped (see _projection_names)
        module = model.get_submodule(name)
        if not _grouped(module):
            new = _cpu_variant(module, threads, head=name == "lm_head")
            if new is not None:
                replace_module(model, name, new)
                if isinstance(new, QuantizedLinear):
                    del module, new
                    return_freed_memory()  # the conversion's transients, before the next layer's
    head = getattr(model, "lm_head", None)
    if isinstance(head, (Int8CPULinear, Int8GroupedCPULinear, Int4CPULinear)):
        model.lm_head = PreciseHead(head)  # bf16 kernel logits, candidates recomputed exactly
    for members in _shared_input_groups(model):  # quantized groups: fused once their members are swapped
        kind = type(members[0])
        if kind in (Int8CPULinear, Int4CPULinear) and all(type(m) is kind and not _grouped(m) for m in members):
            fuse_quantized(members)
    return sum(isinstance(m, (SplitGEMVLinear, Int8CPULinear, Int8GroupedCPULinear, Int4CPULinear)) or _grouped(m)
               for m in model.modules())


def return_freed_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc's `malloc_trim`; a no-op elsewhere).

    Repacking a layer allocates and frees tens of MB; glibc keeps freed heap memory for reuse, so over the
    224 layers of the 7B shape the process grew to 8.0 GB of RSS holding 4.4 GB of tensors (5.3 GB after a
    trim, measured). Trimming after each layer keeps the peak near the live size.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    """glibc's `malloc_trim`, or None where there is none (another C library, another OS)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _fuse_fp32_groups(model: nn.Module, threads: int) -> None:
    """fp32 sibling groups are fused before splitting (fused members keep their column-major views).

    (A function of its own, like the head's step below, so that no loop variable keeps an old layer
    alive through the swapping pass.)"""
    for members in _shared_input_groups(model):
        if all(_is_fp32_cpu_linear(m) and not _grouped(m) for m in members):
            fuse_fp32(members, threads)


def _store_fp32_head_transposed(model: nn.Module) -> None:
    lm_head = getattr(model, "lm_head", None)
    if lm_head is not None and _is_fp32_cpu_linear(lm_head) and lm_head.weight.is_contiguous():
        with torch.no_grad():  # (V, C) row-major -> the same (V, C) stored column-major; .data keeps ties
            lm_head.weight.data = lm_head.weight.data.t().contiguous().t()


def _grouped(module: nn.Module) -> bool:
    return "shared_input_group" in module.__dict__


def _shared_input_groups(model: nn.Module) -> list[tuple[nn.Module, ...]]:
    """Every (q, k, v) and (gate, up) tuple of sibling layers in the model."""
    found = []
    for owner in model.modules():
        for names in SHARED_INPUTS:
            members = tuple(owner._modules.get(n) for n in names)
            if all(m is not None for m in members):
                found.append(members)
    return found

"""`load_model`: the one call that turns a name into a ready model (the stable public API)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from kernels._launch import interpreting
from komt.errors import CheckpointError, ConfigError
from komt.model.attention import KERNEL_BACKENDS
from komt.model.checkpoint import ProgressFn, load_checkpoint
from komt.model.config import ModelConfig
from komt.model.device import parse_device
from komt.model.dtypes import parse_dtype
from komt.model.gguf_model import is_gguf, load_gguf_model
from komt.model.hub import resolve_model_path
from komt.model.quantized_linear import QuantizeSpec
from komt.model.transformer import Transformer


def triton_supports(head_dim: int) -> bool:
    """The Triton attention kernels tile the head dim in one block: a power of two from 16 to 256."""
    return 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0


def choose_kernels(device: torch.device, requested: str | None = None, head_dim: int = 128) -> str:
    """The attention/RMSNorm backend: `requested`, else $KOMT_KERNELS, else Triton on CUDA and torch elsewhere.

    Read here, at the edge, so nothing deep in the model looks at the environment.
    """
    choice = requested or os.environ.get("KOMT_KERNELS") or None
    if choice is None:
        if device.type != "cuda":
            return "torch"
        if not triton_supports(head_dim):
            print(f"komt: head_dim {head_dim} is not a power of two in 16..256; using the torch path", file=sys.stderr)
            return "torch"
        try:
            import triton  # noqa: F401
        except ImportError:
            print("komt: triton is not installed; using the torch attention path on CUDA", file=sys.stderr)
            return "torch"
        return "triton"
    if choice not in KERNEL_BACKENDS:
        raise ConfigError(f"KOMT_KERNELS / kernels must be one of {', '.join(KERNEL_BACKENDS)}, got {choice!r}")
    if choice == "triton" and device.type != "cuda" and not interpreting():  # TRITON_INTERPRET=1: CPU tensors
        raise ConfigError(f"kernels triton (from --kernels or KOMT_KERNELS) needs a CUDA device, not {device}; "
                          "use torch kernels on the CPU")
    if choice == "triton" and not triton_supports(head_dim):
        raise ConfigError(f"the Triton kernels need a head_dim that is a power of two in 16..256, this model has {head_dim}")
    return choice


LAYOUTS = ("auto", "plain")


def read_checkpoint_config(path: Path) -> ModelConfig:
    """The config of a checkpoint folder (its config.json) or of a GGUF file (its metadata), no weights read."""
    if is_gguf(path):
        from komt.model.gguf import GGUFFile
        from komt.model.gguf.weights import read_gguf_config

        return read_gguf_config(GGUFFile(path))
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder")
    return ModelConfig.from_file(path / "config.json")


def load_model(
    name_or_path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    adapter: str | os.PathLike | None = None,
    kernels: str | None = None,
    progress: ProgressFn | None = None,
    quantize: str | None = None,
    group_size: int | None = None,
    layout: str = "auto",
) -> Transformer:
    """Load a Mistral/Llama checkpoint in eval mode: a Hugging Face folder or hub id, or a GGUF file.

    `dtype` None keeps the dtype of the checkpoint's tensors (a file that mixes dtypes gets its config's
    `torch_dtype`, else float32); `adapter` applies a PEFT LoRA adapter folder; `kernels` picks "torch"
    or "triton" (default: Triton on CUDA). `quantize` "int8" / "int4" / "nf4" quantizes the linear layers
    while loading (`group_size`: int8 per channel by default, int4 32; nf4 QLoRA's NormalFloat in blocks of
    64 with double-quantized maxima); a checkpoint written by
    `python -m komt.quantize` or a GGUF file's Q8_0/Q4_0/Q4_1 tensors load quantized as stored. `layout`
    "auto" gives a CPU model the fast CPU decoding layouts (komt.model.cpu_layouts); "plain" keeps the
    layers as loaded. `model(input_ids)` -> logits [B, T, V]. The device, the kernels and the checkpoint's
    config and headers are all checked before any weight is read.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    spec = None
    if quantize is not None:
        spec = QuantizeSpec(quantize, group_size)
    elif group_size is not None:
        raise ConfigError("group_size needs quantize='int8' or 'int4'")
    device = parse_device(device)
    folder = Path(resolve_model_path(name_or_path))
    config = read_checkpoint_config(folder)
    backend = choose_kernels(device, kernels, config.head_dim)
    if is_gguf(folder):
        model = load_gguf_model(folder, device, parse_dtype(dtype), spec, progress)
    else:
        model = load_checkpoint(folder, device=device, dtype=dtype, progress=progress, config=config, quantize=spec)
    model.source_path = folder
    fallbacks = spec.fallbacks(model) if spec is not None else []
    if fallbacks:
        print(f"komt: {len(fallbacks)} layers have an input size that {spec.method} blocks of {spec.block} do not "
              f"divide (e.g. {fallbacks[0]}); they use int8 per channel", file=sys.stderr)
    if adapter is not None:
        from komt.model.lora import load_adapter

        load_adapter(model, adapter)
    if layout == "auto" and device.type == "cpu":
        from komt.model.cpu_layouts import use_cpu_layouts

        use_cpu_layouts(model)
    model.set_kernels(backend)
    return model

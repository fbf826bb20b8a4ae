"""`load_model`: the one call that turns a name into a ready model (the stable public API)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from komt.errors import CheckpointError, ConfigError
from komt.model.attention import KERNEL_BACKENDS
from komt.model.checkpoint import ProgressFn, load_checkpoint
from komt.model.config import ModelConfig
from komt.model.hub import resolve_model_path
from komt.model.transformer import Transformer


def parse_device(device: str | torch.device | None) -> torch.device:
    """`"cuda:1"` -> torch.device, checked against this machine; None is the CPU.

    A misspelt device (`gpu0`) or CUDA on a machine without it is a ConfigError here, at the edge,
    instead of a torch RuntimeError/AssertionError from the first allocation.
    """
    if device is None:
        return torch.device("cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"unknown device {str(device)!r:.40}; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device}: CUDA is not available on this machine; use cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device}: MPS is not available on this machine; use cpu")
    return parsed


def _triton_interpreting() -> bool:
    """TRITON_INTERPRET=1 runs the Triton kernels on CPU tensors (the tests do); read as kernels._launch does."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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
    if choice == "triton" and device.type != "cuda" and not _triton_interpreting():
        raise ConfigError(f"kernels triton (from --kernels or KOMT_KERNELS) needs a CUDA device, not {device}; "
                          "use torch kernels on the CPU")
    if choice == "triton" and not triton_supports(head_dim):
        raise ConfigError(f"the Triton kernels need a head_dim that is a power of two in 16..256, this model has {head_dim}")
    return choice


def load_model(
    name_or_path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    adapter: str | os.PathLike | None = None,
    kernels: str | None = None,
    progress: ProgressFn | None = None,
) -> Transformer:
    """Load a Hugging Face-format Mistral/Llama checkpoint (folder or hub id) in eval mode.

    `dtype` None keeps the dtype of the checkpoint's tensors (a file that mixes dtypes gets its config's
    `torch_dtype`, else float32); `adapter` applies a PEFT LoRA adapter folder; `kernels` picks "torch"
    or "triton" (default: Triton on CUDA). `model(input_ids)` -> logits. The device, the kernels and the
    checkpoint's config and headers are all checked before any weight is read.
    """
    device = parse_device(device)
    folder = Path(resolve_model_path(name_or_path))
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    config = ModelConfig.from_file(folder / "config.json")
    backend = choose_kernels(device, kernels, config.head_dim)
    model = load_checkpoint(folder, device=device, dtype=dtype, progress=progress, config=config)
    model.source_path = folder
    if adapter is not None:
        from komt.model.lora import load_adapter

        load_adapter(model, adapter)
    model.set_kernels(backend)
    return model

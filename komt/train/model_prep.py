"""What every way of training does to a model before its first step: dtypes, autocast, checkpointing.

Shared by the LoRA trainer (`komt.train.lora_weights`), full fine-tuning (`komt.train.full`) and the
benchmark (`komt.train.bench`), so the three cannot drift apart.
"""

from __future__ import annotations

import sys

import functools
from contextlib import nullcontext

import torch

from komt.errors import ConfigError
from komt.generate.vocab import check_tokenizer_fits
from komt.model.dtypes import resolve_dtype


def training_dtype(choice: str, device: torch.device) -> torch.dtype:
    """The base weights' dtype for a --dtype choice, read as every command reads it (komt.model.dtypes:
    auto is bf16 on CUDA, trained under bf16 autocast); where auto forces none (the CPU, with no autocast
    here) training computes in fp32."""
    return resolve_dtype(choice, device) or torch.float32


def uses_autocast(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cuda" and dtype == torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16 autocast on CUDA for a bf16 compute dtype (matmuls in bf16; master weights and the loss in fp32)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if uses_autocast(device, dtype) else nullcontext()


def check_vocabulary(tokenizer_vocab: int, model_vocab: int) -> None:
    """A tokenizer larger than the embedding would index past it: refuse before training on nonsense
    (komt.generate.vocab's one rule for every command; a smaller one is only reported)."""
    check_tokenizer_fits(tokenizer_vocab, model_vocab, "the tokenizer", sys.stderr)


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations during backward instead of keeping them (Chen et al. 2016).

    Memory per layer drops to its input, for about one more forward of compute. Each layer's `forward` is
    wrapped in place, so parameter names (and the adapter's key names) stay what they were. Non-reentrant
    checkpointing, which FSDP2 supports: a sharded layer's weights are gathered again for the recompute.
    """
    from torch.utils.checkpoint import checkpoint

    for layer in model.model.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)

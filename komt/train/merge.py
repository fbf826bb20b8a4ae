"""Fold a LoRA adapter into its base model and write a plain Hugging Face checkpoint.

    base folder + adapter folder -> load_model(adapter=...) -> W += (alpha / r) B A for every LoRA layer
    -> output/config.json, model.safetensors (or model-0000k-of-0000n.safetensors + index), tokenizer files

The result loads with `komt.load_model` (and transformers) like any checkpoint, with no adapter needed.
The merge is computed in fp32 and rounded once to the checkpoint's dtype. The output folder is assembled
under a temporary name and renamed into place, so it is complete or absent, never half-written.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TextIO

import torch

from komt.model.checkpoint_writer import MAX_SHARD_BYTES, check_new_output, write_checkpoint, write_folder_atomically
from komt.model.hub import resolve_model_path
from komt.model.load import load_model
from komt.model.lora import merge_lora


def merge_adapter(model: str | os.PathLike, adapter: str | os.PathLike, output: str | os.PathLike,
                  dtype: str | torch.dtype | None = None, max_shard_bytes: int = MAX_SHARD_BYTES,
                  log: TextIO | None = sys.stderr) -> Path:
    """Write base + adapter, merged, as a checkpoint folder at `output` (which must not exist or be empty)."""
    output = Path(output)
    check_new_output(output)
    base = resolve_model_path(model)
    merged = merge_lora(load_model(base, device="cpu", dtype=dtype, adapter=adapter, layout="plain"))
    write_folder_atomically(output, lambda tmp: write_checkpoint(merged, tmp, max_shard_bytes), copy_from=base)
    if log is not None:
        print(f"komt.train: merged {adapter} into {base} -> {output}", file=log)
    return output

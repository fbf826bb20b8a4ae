"""Fold a LoRA adapter into its base model and write a plain Hugging Face checkpoint.

    base folder + adapter folder -> load_model(adapter=...) -> W += (alpha / r) B A for every LoRA layer
    -> output/config.json, model.safetensors (or model-0000k-of-0000n.safetensors + index), tokenizer files

The result loads with `komt.load_model` (and transformers) like any checkpoint, with no adapter needed.
The merge is computed in fp32 and rounded once to the checkpoint's dtype. The output folder is assembled
under a temporary name and renamed into place, so it is complete or absent, never half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TextIO

import torch

from komt.errors import CheckpointError
from komt.model.hub import resolve_model_path
from komt.model.load import load_model
from komt.atomic import current_umask, write_text_atomic
from komt.model.config import ModelConfig
from komt.model.lora import merge_lora
from komt.model.safetensors_file import write_safetensors

MAX_SHARD_BYTES = 5 * 1024**3  # Hugging Face's default shard size
# Files copied from the base folder when present: the merged model reads text exactly as the base did.
COPIED_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "generation_config.json")


def merge_adapter(model: str | os.PathLike, adapter: str | os.PathLike, output: str | os.PathLike,
                  dtype: str | torch.dtype | None = None, max_shard_bytes: int = MAX_SHARD_BYTES,
                  log: TextIO | None = sys.stderr) -> Path:
    """Write base + adapter, merged, as a checkpoint folder at `output` (which must not exist or be empty)."""
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise CheckpointError(f"--output {output} already exists and is not an empty folder; choose a new one")
    base = resolve_model_path(model)
    merged = merge_lora(load_model(base, device="cpu", dtype=dtype, adapter=adapter))
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp"))
    try:
        write_checkpoint(merged, tmp, max_shard_bytes)
        for name in COPIED_FILES:
            if (base / name).is_file():
                shutil.copyfile(base / name, tmp / name)
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700
        if output.exists():
            output.rmdir()  # empty (checked above)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if log is not None:
        print(f"komt.train: merged {adapter} into {base} -> {output}", file=log)
    return output


def write_checkpoint(model: torch.nn.Module, folder: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """config.json + weights in Hugging Face's layout: one model.safetensors, or shards + an index."""
    write_weights(model.config, model.state_dict(), folder, max_shard_bytes)


def write_weights(config: ModelConfig, state: dict[str, torch.Tensor], folder: Path,
                  max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write `state` as a checkpoint of `config` in `folder`: weights first, config.json last.

    Every file is written atomically, and config.json, what `load_model` opens first, comes last, so a
    folder killed mid-write never loads as a checkpoint. Full fine-tuning exports into its run folder this way.
    """
    tensors = [(name, t) for name, t in state.items() if not (config.tie_word_embeddings and name == "lm_head.weight")]
    dtype = tensors[0][1].dtype
    config = replace(config, torch_dtype=str(dtype).removeprefix("torch."))
    shards = split_into_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        write_safetensors(folder / "model.safetensors", shards[0], metadata={"format": "pt"})
    else:
        weight_map = {}
        for k, shard in enumerate(shards, start=1):
            filename = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(folder / filename, shard, metadata={"format": "pt"})
            weight_map.update({name: filename for name, _ in shard})
        total = sum(t.numel() * t.element_size() for _, t in tensors)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_text_atomic(folder / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
    write_text_atomic(folder / "config.json", json.dumps(config.to_hf_dict(), indent=2) + "\n")


def split_into_shards(tensors: list[tuple[str, torch.Tensor]], max_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of at most `max_bytes` each (a single larger tensor gets a shard of its own)."""
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += nbytes
    return shards

"""Fold a LoRA adapter into its base model and write a plain Hugging Face checkpoint.

    base folder + adapter folder -> load_model(adapter=..., quantize=the base quantization it trained on)
    -> W += (alpha / r) B A for every LoRA layer (a quantized W: dequantize(W) + (alpha / r) B A)
    -> every other quantized layer dequantized -> output/config.json, model.safetensors (or shards + index),
       tokenizer files

The result loads with `komt.load_model` (and transformers) like any checkpoint, with no adapter needed.
The merge is computed in fp32 and rounded once to the checkpoint's dtype. The output folder is assembled
under a temporary name and renamed into place, so it is complete or absent, never half-written.

An adapter trained on a quantized base (`--base-quantize`, QLoRA) learned to correct *that* base's
quantization error, so komt merges it into the same dequantized weights it was trained against, and writes
every other layer dequantized too: the merged checkpoint's logits equal those of the quantized base +
adapter (tested), not of the original weights + adapter (what merging into the unquantized base, as PEFT
users often do, would give). The base quantization is read from the run's train_config.json (in the adapter
folder, or in the run folder above a checkpoint-N/); `base_quantize=` (`--base-quantize`) overrides it,
e.g. "int8" for a PEFT adapter trained on a bitsandbytes base elsewhere, or None to merge into the original
weights on purpose. The checkpoint is dense: a model whose head the loader gave its own int8 copy (a tied
embedding) is written untied, since its head is then no longer the embedding.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import TextIO

import torch

from komt.errors import ConfigError
from komt.model.dtypes import parse_dtype
from komt.model.checkpoint_writer import MAX_SHARD_BYTES, check_new_output, write_checkpoint, write_folder_atomically
from komt.model.hub import resolve_model_path
from komt.model.load import load_model
from komt.model.lora import merge_lora
from komt.model.quantized_linear import dequantize_linears
from komt.train.config import BASE_QUANTIZE_CHOICES, RUN_MARKER
from komt.train.run_folder import TRAIN_CONFIG, read_train_config

RECORDED = "auto"  # base_quantize=: what the adapter's run recorded (none when it recorded nothing)


def recorded_base_quantize(adapter: str | os.PathLike) -> tuple[str | None, Path | None]:
    """(base quantization, the train_config.json that says so) of the run that wrote `adapter`.

    A run's adapter is its output folder (train_config.json beside it); a checkpoint-N/ adapter belongs to the
    run folder above. (None, None) for an adapter no komt run wrote (e.g. PEFT's).
    """
    folder = Path(adapter)
    candidates = [folder / TRAIN_CONFIG]
    if re.fullmatch(r"checkpoint-\d+", folder.name):
        candidates.append(folder.parent / TRAIN_CONFIG)
    for path in candidates:
        raw = read_train_config(path)
        if raw is None or raw.get("written_by") != RUN_MARKER:
            continue
        value = raw.get("base_quantize")
        if value is not None and value not in BASE_QUANTIZE_CHOICES:
            raise ConfigError(f"{path}: base_quantize {value!r} is not one of {', '.join(BASE_QUANTIZE_CHOICES)}")
        return value, path
    return None, None


def merge_adapter(model: str | os.PathLike, adapter: str | os.PathLike, output: str | os.PathLike,
                  dtype: str | torch.dtype | None = None, max_shard_bytes: int = MAX_SHARD_BYTES,
                  log: TextIO | None = sys.stderr, base_quantize: str | None = RECORDED) -> Path:
    """Write base + adapter, merged, as a checkpoint folder at `output` (which must not exist or be empty).

    `base_quantize`: "auto" (the base quantization the adapter's run recorded), None (the base as stored),
    or "int8" / "int4" / "nf4" (the base quantized so while loading, then merged into its dequantized form).
    """
    output = Path(output)
    check_new_output(output)
    recorded, source = recorded_base_quantize(adapter)
    quantize = recorded if base_quantize == RECORDED else base_quantize
    if quantize is not None and quantize not in BASE_QUANTIZE_CHOICES:
        raise ConfigError(f"--base-quantize must be one of auto, none, {', '.join(BASE_QUANTIZE_CHOICES)}, "
                          f"got {quantize!r}")
    if log is not None and source is not None and quantize != recorded:
        print(f"komt.train: note: {adapter} was trained on a base held {recorded or 'unquantized'} ({source}); "
              f"merging into the base {'held ' + quantize if quantize else 'as stored'} instead", file=log)
    base = resolve_model_path(model)
    loaded = load_model(base, device="cpu", dtype=dtype, adapter=adapter, layout="plain", quantize=quantize)
    out_dtype = parse_dtype(dtype) or loaded.model.embed_tokens.weight.dtype
    merged = merge_lora(loaded, out_dtype)
    if dequantize_linears(merged, out_dtype) and merged.lm_head.weight is not merged.model.embed_tokens.weight:
        merged.config = replace(merged.config, tie_word_embeddings=False)  # the head is its own (dequantized) matrix
    write_folder_atomically(output, lambda tmp: write_checkpoint(merged, tmp, max_shard_bytes), copy_from=base)
    if log is not None:
        held = f" (base held {quantize}, as trained)" if quantize and quantize == recorded else (
            f" (base held {quantize})" if quantize else "")
        print(f"komt.train: merged {adapter} into {base}{held} -> {output}", file=log)
    return output

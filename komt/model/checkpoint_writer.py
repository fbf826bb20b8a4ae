"""Write a model as a Hugging Face checkpoint folder, whole or not at all (merge, quantize, full training).

    output/config.json, model.safetensors (or model-0000k-of-0000n.safetensors + index), tokenizer files

The folder is assembled under a temporary name beside `output` and renamed into place, so it is complete
or absent, never half-written; each file inside is itself written atomically. Quantized layers are written
in komt's canonical form (`<name>.weight` int8/uint8, `<name>.scales`, `<name>.offsets`; see
komt.model.quant) with a `quantization_config` in config.json, and `komt.load_model` reads them back as
stored. A head that was quantized separately from a tied embedding is stored as its own tensor.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from komt.atomic import new_temp_folder, publish_folder, write_json_atomic
from komt.errors import CheckpointError
from komt.model.nf4 import NF4Linear
from komt.model.quantized_linear import QuantizedLinear
from komt.model.safetensors_file import write_safetensors

MAX_SHARD_BYTES = 5 * 1024**3  # Hugging Face's default shard size
# Files copied from the source folder when present: the new checkpoint reads text exactly as the source did.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")


def write_checkpoint(model: nn.Module, folder: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """config.json + weights of `model` into the existing `folder`, in Hugging Face's layout."""
    config = model.config
    nf4 = next((n for n, m in model.named_modules() if isinstance(m, NF4Linear)), None)
    if nf4 is not None:  # the loader reads canonical int8/int4 only (QUANT_SPEC.md); NF4 is quantized at load
        raise CheckpointError(f"{nf4} is an NF4 layer, which komt checkpoints cannot store; write the dense model "
                              "and load it with quantize='nf4'")
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    tensors = [(name, t) for name, t in model.state_dict().items() if not (tied and name == "lm_head.weight")]
    dtype = model.model.embed_tokens.weight.dtype
    raw = replace(config, torch_dtype=str(dtype).removeprefix("torch.")).to_hf_dict()
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    if quantized:
        raw["quantization_config"] = {
            "quant_method": "komt",
            "bits": sorted({m.bits for m in quantized}),
            "group_sizes": sorted({m.group_size for m in quantized}),
            "format": "komt canonical int8/int4 (komt.model.quant); load with komt.load_model",
        }
    write_json_atomic(folder / "config.json", raw)
    shards = split_into_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        write_safetensors(folder / "model.safetensors", shards[0], metadata={"format": "pt"})
        return
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
        filename = shard_file_name(k, len(shards))
        write_safetensors(folder / filename, shard, metadata={"format": "pt"})
        weight_map.update({name: filename for name, _ in shard})
    total = sum(t.numel() * t.element_size() for _, t in tensors)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_json_atomic(folder / "model.safetensors.index.json", index)


def split_into_shards(tensors: list[tuple[str, torch.Tensor]], max_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of at most `max_bytes` each (a single larger tensor gets a shard of its own).

    Only shapes and dtypes are read, so meta tensors plan the shards of a checkpoint not yet made."""
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


def shard_file_name(k: int, n: int, stem: str = "model", suffix: str = "safetensors") -> str:
    """Hugging Face's name for shard k of n (from 1): `model-00001-of-00003.safetensors`."""
    return f"{stem}-{k:05d}-of-{n:05d}.{suffix}"


def check_new_output(output: Path, flag: str = "--output") -> None:
    """Refuse to write over anything: the output must not exist, or be an empty folder."""
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise CheckpointError(f"{flag} {output} already exists and is not an empty folder; choose a new one")


def copy_tokenizer_files(source: Path, folder: Path) -> None:
    """The source checkpoint's tokenizer files (those it has) into `folder`: the new one reads text as it did."""
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)


def write_folder_atomically(output: Path, fill: Callable[[Path], None], copy_from: Path | None = None) -> Path:
    """Build a folder with `fill(tmp)` (plus the tokenizer files of `copy_from`) and rename it to `output`."""
    check_new_output(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_temp_folder(output)
    try:
        fill(tmp)
        if copy_from is not None:
            copy_tokenizer_files(copy_from, tmp)
        if output.exists():
            output.rmdir()  # empty (checked above)
        return publish_folder(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

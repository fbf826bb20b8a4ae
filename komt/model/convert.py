"""Convert a checkpoint's PyTorch `.bin` shards to safetensors shards, beside them.

komt-mistral-7b-v1 ships `pytorch_model-0000k-of-00002.bin` + `pytorch_model.bin.index.json` (the
transformers default in 2023). komt reads those directly, but safetensors files load faster (a memory
map, no unpickling) and safely everywhere. The conversion keeps the shard layout: shard k becomes
`model-0000k-of-0000n.safetensors`, and `model.safetensors.index.json` maps every tensor to its file.
Each file is written atomically, one tensor at a time from a memory map; the `.bin` files are untouched.
A conversion killed mid-write leaves a `.<shard>.komt-tmp-*` file; the next run removes it (komt.atomic).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from komt.atomic import remove_stale_temp_files, write_json_atomic
from komt.errors import CheckpointError
from komt.model.checkpoint import ShardReader, find_weight_shards
from komt.model.checkpoint_writer import shard_file_name
from komt.model.safetensors_file import write_safetensors


def convert_to_safetensors(folder: str | os.PathLike, log: Callable[[str], None] = print) -> list[Path]:
    """Write safetensors shards + index for the `.bin` checkpoint in `folder`; return the files written."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    shards = find_weight_shards(folder)
    if shards[0].suffix == ".safetensors":
        raise CheckpointError(f"{folder}: already has safetensors weights; nothing to convert")
    n = len(shards)
    targets = [folder / ("model.safetensors" if n == 1 else shard_file_name(k, n))
               for k in range(1, n + 1)]
    for target in [*targets, folder / "model.safetensors.index.json"]:
        for stale in remove_stale_temp_files(target):  # a run killed mid-write (SIGKILL) could not
            log(f"removed {stale.name}, left by an interrupted conversion")
    written: list[Path] = []
    weight_map: dict[str, str] = {}
    total_size = 0
    for shard, target in zip(shards, targets):
        reader = ShardReader(shard)
        tensors = [(name, reader.tensor(name)) for name in reader.names()]
        write_safetensors(target, tensors, metadata={"format": "pt"})
        for name, t in tensors:
            weight_map[name] = target.name
            total_size += t.numel() * t.element_size()
        written.append(target)
        log(f"{shard.name} -> {target.name} ({len(tensors)} tensors)")
        del reader, tensors
    if n > 1:
        index = folder / "model.safetensors.index.json"
        write_json_atomic(index, {"metadata": {"total_size": total_size}, "weight_map": weight_map})
        written.append(index)
    return written

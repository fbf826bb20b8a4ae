"""Training checkpoints: everything a killed run needs to continue as if it had never stopped.

    output/checkpoint-<step>/
        adapter_config.json, adapter_model.safetensors   the LoRA weights (a loadable PEFT adapter)
        trainer_state.pt                                  optimizer, scheduler, RNG of every process,
                                                          step and data position, the run's settings

A checkpoint folder is built under a temporary name and renamed into place, so `checkpoint-<step>` either
exists complete or not at all, whenever the process is killed. The data position is the step itself (the
batches are a pure function of seed, epoch and step; see `komt.train.batching`), recorded explicitly as
(epoch, batch) for people reading the state. `trainer_state.pt` holds only tensors and plain Python
values, so it is read back with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from komt.atomic import new_temp_folder, publish_folder
from komt.errors import CheckpointError
from komt.model.lora import PEFT_PREFIX, LoRAConfig, lora_state_dict, read_adapter_weights, save_adapter

TRAINER_STATE = "trainer_state.pt"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random state: Python's, the CPU generator and the CUDA generator of `device`."""
    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(output: Path, step: int, model: torch.nn.Module, lora_config: LoRAConfig,
                    base_model: str, trainer_state: dict[str, Any]) -> Path:
    """Write `output/checkpoint-<step>` atomically (temp folder + rename) and return its path."""
    tmp = new_checkpoint_folder(output, step)
    try:
        save_adapter(model, tmp, lora_config, base_model)
        return publish_checkpoint(tmp, output, step, trainer_state)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def new_checkpoint_folder(output: Path, step: int | str) -> Path:
    """A fresh hidden temp folder in `output` to build checkpoint-<step> in (`.checkpoint-<step>.*.tmp`)."""
    return new_temp_folder(output / f"checkpoint-{step}")


def publish_checkpoint(tmp: Path, output: Path, step: int, trainer_state: dict[str, Any]) -> Path:
    """Add trainer_state.pt to the finished temp folder and rename it to checkpoint-<step> (the commit point)."""
    final = output / f"checkpoint-{step}"
    with open(tmp / TRAINER_STATE, "wb") as f:
        torch.save(trainer_state, f)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # left by a run that got past this step before it was killed
        shutil.rmtree(final)
    return publish_folder(tmp, final)


def prune_checkpoints(output: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints (0 keeps all); returns the deleted folders.

    Each is first renamed to a hidden temp name, so a kill mid-delete leaves a folder that
    `remove_partial_checkpoints` clears, never a half-deleted `checkpoint-N` that looks resumable.
    """
    if keep <= 0:
        return []
    doomed = [path for _, path in list_checkpoints(output)[:-keep]]
    for path in doomed:
        trash = output / f".{path.name}.deleting.tmp"
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


def remove_partial_checkpoints(output: Path) -> None:
    """Delete temp folders of checkpoints whose writer was killed mid-save."""
    for path in output.glob(".checkpoint-*.tmp"):
        shutil.rmtree(path, ignore_errors=True)


def list_checkpoints(output: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `output`, as (step, folder), oldest first."""
    found = []
    if output.is_dir():
        for path in output.iterdir():
            match = _NAME.match(path.name)
            if match and (path / TRAINER_STATE).is_file():
                found.append((int(match[1]), path))
    return sorted(found)


def load_trainer_state(folder: Path) -> dict[str, Any]:
    path = folder / TRAINER_STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, unpickling refusal, ...: all one message
        raise CheckpointError(f"{path}: unreadable trainer state ({type(err).__name__}); "
                              "delete this checkpoint folder to resume from the one before") from None


def restore_lora(model: torch.nn.Module, folder: Path) -> None:
    """Copy a checkpoint's LoRA weights into the model's (already injected) LoRA layers; names must match."""
    path, tensors = read_adapter_weights(folder)
    state = lora_state_dict(model)
    saved = {key.removeprefix(PEFT_PREFIX): tensor for key, tensor in tensors.items()}
    if set(saved) != set(state):
        differ = sorted(set(saved) ^ set(state))[0]
        raise CheckpointError(f"{path}: LoRA tensors differ from this run's model (first: {differ!r}); "
                              "resume with the same --lora-r/--lora-targets")
    with torch.no_grad():
        for name, param in state.items():
            if saved[name].shape != param.shape:
                raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(saved[name].shape)}, "
                                      f"expected {tuple(param.shape)}")
            param.copy_(saved[name])


"""LoRA fine-tuning: data, the training loop (single process or torchrun DDP), checkpoints, merging.

    python -m komt.train --model M --data data.jsonl --output runs/a     -> a PEFT LoRA adapter in runs/a
    python -m komt.train merge --model M --adapter runs/a --output merged  -> a full merged checkpoint

The LoRA layer itself lives in `komt.model.lora` (inference loads adapters without this package).
"""

from komt.train.config import DPOConfig, TrainConfig
from komt.train.data import Example, load_dataset
from komt.train.merge import merge_adapter
from komt.train.trainer import train

__all__ = ["TrainConfig", "DPOConfig", "train", "merge_adapter", "load_dataset", "Example"]

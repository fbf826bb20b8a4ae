"""Fine-tuning: SFT and DPO, as LoRA (DDP under torchrun) or of every weight (FSDP2), checkpoints, merging.

    python -m komt.train --model M --data data.jsonl --output runs/a     -> a PEFT LoRA adapter in runs/a
    python -m komt.train dpo --model M --data prefs.jsonl --output runs/d  -> a DPO-trained adapter
    python -m komt.train ... --base-quantize nf4                            -> LoRA over a frozen NF4 base (QLoRA)
    torchrun ... -m komt.train --full ...                                   -> a checkpoint folder, FSDP2-sharded training
    python -m komt.train merge --model M --adapter runs/a --output merged  -> a full merged checkpoint

`train(TrainConfig(...))` or `train(DPOConfig(...))` is the same run from Python; one loop
(`komt.train.trainer`) serves every objective and both ways of holding the weights.

The LoRA layer itself lives in `komt.model.lora` (inference loads adapters without this package).
"""

from komt.lazy_exports import lazy_exports

# Imported on first use (komt.lazy_exports): `python -m komt.train` reaches its Ctrl-C handler before torch.
__getattr__, __dir__ = lazy_exports(__name__, {
    "TrainConfig": "komt.train.config",
    "DPOConfig": "komt.train.config",
    "Example": "komt.train.data",
    "load_dataset": "komt.train.data",
    "merge_adapter": "komt.train.merge",
    "train": "komt.train.trainer",
})

__all__ = ["TrainConfig", "DPOConfig", "train", "merge_adapter", "load_dataset", "Example"]

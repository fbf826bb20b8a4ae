"""A training run's settings: one frozen dataclass, validated once, and the CLI's flags map onto it 1:1.

The defaults are the komt recipe (LoRA r 8, alpha 32, dropout 0.05 on all seven projections) with the
usual QLoRA-era optimiser settings (AdamW, lr 2e-4, cosine decay, gradient clipping at 1.0).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from komt.errors import ConfigError
from komt.generate.prompt import PROMPT_FORMATS
from komt.model.lora import DEFAULT_TARGETS, LoRAConfig

DTYPE_CHOICES = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class TrainConfig:
    model: str
    data: str
    output: str
    tokenizer: str | None = None  # default: the model folder's tokenizer (tokenizer.model or tokenizer.json)
    prompt_format: str = "auto"  # komt.generate.prompt: auto, card, template or raw
    max_steps: int | None = None  # exactly one of max_steps / epochs; neither means 1 epoch
    epochs: float | None = None
    batch_size: int = 4  # examples per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 turns clipping off
    lora_r: int = 8
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    max_seq_len: int = 2048
    seed: int = 42
    save_every: int = 200
    eval_split: float = 0.0  # fraction of examples held out for the eval loss
    eval_every: int | None = None  # default: every save_every steps (and at the end)
    grad_checkpointing: bool = False
    resume: bool = False
    device: str | None = None  # default: cuda if available, else cpu
    dtype: str = "auto"  # base weights: bf16 (with bf16 autocast) on CUDA, fp32 on the CPU

    def __post_init__(self) -> None:
        positive = ("batch_size", "grad_accum", "lora_r", "max_seq_len", "save_every")
        for name in positive:
            _check(name, getattr(self, name), lambda v: isinstance(v, int) and v > 0, "a positive integer")
        _check("max_steps", self.max_steps, lambda v: v is None or (isinstance(v, int) and v > 0), "a positive integer")
        _check("epochs", self.epochs, lambda v: v is None or v > 0, "a positive number")
        if self.max_steps is not None and self.epochs is not None:
            raise ConfigError("give --max-steps or --epochs, not both")
        _check("eval_every", self.eval_every, lambda v: v is None or (isinstance(v, int) and v > 0), "a positive integer")
        _check("lr", self.lr, lambda v: v > 0 and math.isfinite(v), "a positive number")
        _check("warmup_steps", self.warmup_steps, lambda v: isinstance(v, int) and v >= 0, "a non-negative integer")
        _check("weight_decay", self.weight_decay, lambda v: v >= 0, "a non-negative number")
        _check("max_grad_norm", self.max_grad_norm, lambda v: v >= 0, "a non-negative number (0: no clipping)")
        _check("eval_split", self.eval_split, lambda v: 0 <= v < 1, "a fraction in [0, 1)")
        _check("dtype", self.dtype, lambda v: v in DTYPE_CHOICES, f"one of {', '.join(DTYPE_CHOICES)}")
        _check("prompt_format", self.prompt_format, lambda v: v in PROMPT_FORMATS, f"one of {', '.join(PROMPT_FORMATS)}")
        self.lora  # validates r / alpha / dropout / targets

    @property
    def lora(self) -> LoRAConfig:
        return LoRAConfig(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout,
                          targets=tuple(self.lora_targets))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d

    def run_fingerprint(self, world_size: int, total_steps: int) -> dict[str, Any]:
        """The settings a resumed run must share with the run it continues (the trainer adds the data itself).

        Paths are left out on purpose: a run may be resumed after its files moved to another machine."""
        keep = ("batch_size", "grad_accum", "lr", "warmup_steps", "weight_decay", "max_grad_norm", "lora_r",
                "lora_alpha", "lora_dropout", "max_seq_len", "seed", "eval_split")
        d = {name: getattr(self, name) for name in keep}
        d.update(lora_targets=list(self.lora_targets), world_size=world_size, total_steps=total_steps)
        return d


def _check(name: str, value: Any, ok, what: str) -> None:
    flag = "--" + name.replace("_", "-")
    try:
        good = ok(value)
    except TypeError:
        good = False
    if not good:
        raise ConfigError(f"{flag} must be {what}, got {value!r}")

"""A training run's settings: one frozen dataclass per objective, validated once, the CLI's flags 1:1.

`TrainConfig` (supervised fine-tuning): the komt recipe (LoRA r 8, alpha 32, dropout 0.05 on all seven
projections) with the usual QLoRA-era optimiser settings (AdamW, lr 2e-4, cosine decay, clipping at 1.0).
`DPOConfig` adds the preference-optimisation settings and takes komt-mistral-7b-v1-dpo's recipe as its
defaults (the settings of trl's stack_llama_2 DPO script it was trained with: LoRA r 8, alpha 16, dropout
0.05 on q/k/v, lr 5e-4, cosine with 100 warm-up steps, weight decay 0.05, batch 8 x accumulation 4).
`full=True` trains every weight instead of a LoRA adapter (sharded with FSDP2 under torchrun).
`base_quantize` "int8" / "int4" / "nf4" holds the frozen base quantized under the LoRA layers (QLoRA,
Dettmers et al. 2023): komt's published recipe trains on an 8-bit base, and its `--bits 4` means NF4.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from komt.errors import ConfigError
from komt.generate.prompt import PROMPT_FORMATS
from komt.model.dtypes import DTYPE_CHOICES
from komt.model.lora import DEFAULT_TARGETS, LoRAConfig
from komt.model.quantized_linear import QUANTIZE_CHOICES

DPO_LOSSES = ("sigmoid", "ipo")
BASE_QUANTIZE_CHOICES = QUANTIZE_CHOICES  # int8 per channel, int4 groups of 32, nf4 (komt.load_model's quantize=)
RUN_MARKER = "komt.train"  # train_config.json's "written_by": how a folder is recognised as a run of ours


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
    full: bool = False  # train every weight (FSDP2 across torchrun processes) instead of a LoRA adapter
    save_total_limit: int = 3  # keep the newest N checkpoints (0: keep all)
    base_quantize: str | None = None  # hold the frozen base as int8 / int4 / nf4 under the LoRA layers (QLoRA)

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
        check_train_dtype(self.dtype)
        _check("prompt_format", self.prompt_format, lambda v: v in PROMPT_FORMATS, f"one of {', '.join(PROMPT_FORMATS)}")
        _check("save_total_limit", self.save_total_limit, lambda v: isinstance(v, int) and v >= 0,
               "a non-negative integer (0: keep every checkpoint)")
        _check("base_quantize", self.base_quantize, lambda v: v is None or v in BASE_QUANTIZE_CHOICES,
               f"one of {', '.join(BASE_QUANTIZE_CHOICES)} (or unset: the base as loaded)")
        if self.full and self.base_quantize is not None:
            raise ConfigError(f"--full trains every weight, which cannot be held quantized; --base-quantize "
                              f"{self.base_quantize} is for LoRA on a frozen base: drop one of the two")
        self.lora  # validates r / alpha / dropout / targets

    @property
    def lora(self) -> LoRAConfig:
        return LoRAConfig(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout,
                          targets=tuple(self.lora_targets))

    @property
    def objective(self) -> str:
        return "sft"

    def to_dict(self) -> dict[str, Any]:
        """train_config.json: every setting, plus the marker that says komt wrote this folder."""
        d = {"written_by": RUN_MARKER, "objective": self.objective, **asdict(self)}
        d["lora_targets"] = list(self.lora_targets)
        return d

    def run_fingerprint(self, world_size: int, total_steps: int) -> dict[str, Any]:
        """The settings a resumed run must share with the run it continues (the trainer adds the data itself).

        Paths are left out on purpose: a run may be resumed after its files moved to another machine."""
        keep = ("batch_size", "grad_accum", "lr", "warmup_steps", "weight_decay", "max_grad_norm", "lora_r",
                "lora_alpha", "lora_dropout", "max_seq_len", "seed", "eval_split", "base_quantize")
        d = {name: getattr(self, name) for name in keep}
        d.update(lora_targets=list(self.lora_targets), world_size=world_size, total_steps=total_steps)
        if self.full:
            # No dropout and sharded state that DCP re-shards: any process count with the same global
            # batch continues the run, so the global batch is what must match, not its split.
            for name in ("batch_size", "grad_accum", "world_size", "lora_r", "lora_alpha", "lora_dropout"):
                d.pop(name)
            d.pop("lora_targets")
            d.update(full=True, global_batch=self.batch_size * self.grad_accum * world_size)
        return d


@dataclass(frozen=True)
class DPOConfig(TrainConfig):
    """Direct preference optimisation (Rafailov et al. 2023) on {"prompt", "chosen", "rejected"} pairs."""

    batch_size: int = 8
    grad_accum: int = 4
    lr: float = 5e-4
    warmup_steps: int = 100
    weight_decay: float = 0.05
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    beta: float = 0.1  # the KL strength: rewards are beta * log(pi / pi_ref)
    loss_type: str = "sigmoid"  # "sigmoid" (DPO) or "ipo" (Azar et al. 2023)
    label_smoothing: float = 0.0  # conservative DPO (Mitchell 2023): the chance a label is flipped
    max_prompt_length: int = 512  # tokens; trl's truncation rule (see komt.train.preference_data)
    max_length: int = 1024  # tokens of prompt + response
    ref_model: str | None = None  # default: the policy's own base (LoRA disabled, or the initial weights)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check("beta", self.beta, lambda v: v > 0 and math.isfinite(v), "a positive number")
        _check("loss_type", self.loss_type, lambda v: v in DPO_LOSSES, f"one of {', '.join(DPO_LOSSES)}")
        _check("label_smoothing", self.label_smoothing, lambda v: 0 <= v < 0.5, "a number in [0, 0.5)")
        if self.loss_type == "ipo" and self.label_smoothing:
            raise ConfigError("--label-smoothing applies to the sigmoid loss only, not to --loss-type ipo")
        for name in ("max_prompt_length", "max_length"):
            _check(name, getattr(self, name), lambda v: isinstance(v, int) and v > 0, "a positive integer")
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(f"--max-prompt-length ({self.max_prompt_length}) must be less than --max-length "
                              f"({self.max_length}): the responses need room")

    @property
    def objective(self) -> str:
        return "dpo"

    def run_fingerprint(self, world_size: int, total_steps: int) -> dict[str, Any]:
        d = super().run_fingerprint(world_size, total_steps)
        d.pop("max_seq_len")
        d.update({name: getattr(self, name) for name in ("beta", "loss_type", "label_smoothing",
                                                          "max_prompt_length", "max_length")})
        d.update(objective="dpo", own_reference=self.ref_model is None)
        return d


def check_train_dtype(dtype: str) -> None:
    """One of every command's --dtype choices (komt.model.dtypes) that training can run: not fp16, which
    would need loss scaling."""
    if dtype == "fp16":
        raise ConfigError("--dtype fp16 cannot train: fp16 needs loss scaling, which komt does not do; use --dtype bf16")
    _check("dtype", dtype, lambda v: v in DTYPE_CHOICES, f"one of {', '.join(DTYPE_CHOICES)}")


def _check(name: str, value: Any, ok, what: str) -> None:
    flag = "--" + name.replace("_", "-")
    try:
        good = ok(value)
    except TypeError:
        good = False
    if not good:
        raise ConfigError(f"{flag} must be {what}, got {value!r}")

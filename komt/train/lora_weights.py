"""LoRA training's weights: a frozen base, fp32 LoRA layers, DDP across processes, PEFT adapters on disk.

    load:        base checkpoint (bf16 on CUDA, fp32 on the CPU; with --base-quantize its linear layers held
                 int8 / int4 / nf4 as read, QLoRA) -> inject LoRA (fp32, seeded) -> freeze the rest
    wrap:        DistributedDataParallel over the LoRA parameters under torchrun (gradients all-reduced once
                 per optimizer step, in the last micro-batch's backward)
    checkpoint:  checkpoint-N/ = the adapter + trainer_state.pt (optimizer, scheduler, RNG, step) from rank 0
    reference:   the same model with its LoRA layers switched off (DPO's reference, no second copy)
    final:       output/adapter_config.json + adapter_model.safetensors (a PEFT LoRA adapter)

QLoRA is the same code: `LoRALinear` wraps whatever layer variant the loader made (komt.model.linear), a
quantized layer's backward gives the input's gradient against its dequantized weight without keeping a
dense copy (komt.model.quantized_linear), and only the LoRA matrices ever reach the adapter files.

The trainer (`komt.train.trainer`) calls the same methods on `komt.train.full.FullWeights`.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, TextIO

import torch

from komt.model.load import load_model
from komt.model.lora import count_parameters, inject_lora, lora_disabled, save_adapter
from komt.train import distributed
from komt.train.checkpoint import restore_lora, save_checkpoint
from komt.train.config import TrainConfig
from komt.train.model_prep import (autocast, check_vocabulary, enable_activation_checkpointing, training_dtype,
                                  uses_autocast)
from komt.train.progress import say


class LoRAWeights:
    """How a LoRA run loads, wraps, checkpoints and saves its model (see module docstring)."""

    kind = "LoRA"

    def __init__(self, config: TrainConfig, ctx: distributed.DistContext, log: TextIO | None) -> None:
        self.config, self.ctx, self.log = config, ctx, log
        self.dtype = training_dtype(config.dtype, ctx.device)  # base weights, and autocast's dtype on CUDA

    @property
    def precision(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        base = f", base {self.config.base_quantize}" if self.config.base_quantize else ""
        return f"{dtype}{' + bf16 autocast' if uses_autocast(self.ctx.device, self.dtype) else ''}{base}"

    def load(self, model_path: Path, vocab_size: int) -> torch.nn.Module:
        """The frozen base model (quantized as it is read with --base-quantize) with fp32 LoRA layers injected,
        in training mode."""
        # PyTorch's SDPA on every device: its fused backward is measured on the H100; the Triton kernels'
        # backward is tested but not yet timed there, so the Triton kernels stay the inference path.
        model = load_model(model_path, device=self.ctx.device, dtype=self.dtype, kernels="torch", layout="plain",
                           quantize=self.config.base_quantize)
        check_vocabulary(vocab_size, model.config.vocab_size)
        torch.manual_seed(self.config.seed)  # the LoRA init: identical in every process
        inject_lora(model, self.config.lora, lora_dtype=torch.float32)
        trainable, total = count_parameters(model)
        c = self.config
        say(self.log, f"trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.4f}%), "
                       f"LoRA r {c.lora_r} alpha {c.lora_alpha:g} on {', '.join(c.lora_targets)}")
        if c.grad_checkpointing:
            enable_activation_checkpointing(model)
        return model.train()

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return distributed.wrap(model, self.ctx)

    def param_groups(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def forward_fn(self, step_model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """input_ids [B, T] (on the device) -> fp32 logits [B, T, V], under bf16 autocast on CUDA."""
        def forward(input_ids: torch.Tensor) -> torch.Tensor:
            with autocast(self.ctx.device, self.dtype):
                return step_model(input_ids)
        return forward

    def micro_batch_sync(self, step_model: torch.nn.Module, last: bool):
        """DDP all-reduces the gradients once, in the last micro-batch's backward."""
        return step_model.no_sync() if hasattr(step_model, "no_sync") and not last else nullcontext()

    def reference(self, model: torch.nn.Module):
        """A context in which `model` computes as its frozen base (DPO's default reference)."""
        return lora_disabled(model)

    def load_reference(self, path: Path) -> torch.nn.Module:
        """An explicit reference model (`--ref-model`), frozen, in the base's dtype and quantization (so a
        reference that is the policy's own checkpoint scores exactly as the policy starts)."""
        return load_model(path, device=self.ctx.device, dtype=self.dtype, kernels="torch", layout="plain",
                          quantize=self.config.base_quantize).requires_grad_(False)

    def save_checkpoint(self, output: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        trainer_state: dict[str, Any]) -> Path | None:
        """Rank 0 writes checkpoint-<step> (adapter + optimizer in trainer_state.pt); others return None."""
        if not self.ctx.is_main:
            return None
        state = {**trainer_state, "optimizer": optimizer.state_dict()}
        return save_checkpoint(output, step, model, self.config.lora, self.config.model, state)

    def restore(self, folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                state: dict[str, Any]) -> None:
        restore_lora(model, folder)
        optimizer.load_state_dict(state["optimizer"])

    def save_final(self, output: Path, model: torch.nn.Module) -> None:
        if self.ctx.is_main:
            save_adapter(model, output, self.config.lora, self.config.model)

    def describe_output(self, output: Path) -> str:
        return f"adapter saved to {output}"

"""Full fine-tuning's weights: every parameter trains, sharded across processes with FSDP2, saved with DCP.

    one process   the checkpoint as loaded, in fp32 master weights (bf16 autocast on CUDA); no sharding
    torchrun      the model is built on the meta device, `fully_shard` wraps each decoder layer and then the
                  whole model (so embeddings, final norm and lm_head form the root group), each process
                  allocates only its 1/N of every parameter, and rank 0 reads the checkpoint and broadcasts it
                  tensor by tensor (no process ever holds two copies, and only rank 0 one whole copy, on the
                  CPU). In training a layer's weights are all-gathered just before its forward (and again for
                  its backward) and freed after; gradients are reduce-scattered, so parameters, gradients and
                  AdamW's two moments all stay sharded. On CUDA, `MixedPrecisionPolicy` computes in bf16 over
                  fp32 shards and reduces gradients in fp32; on the CPU everything is fp32.
                  Gradients are reduce-scattered after every micro-batch, not once per step: skipping the
                  sync would accumulate *unsharded* gradients, a whole model's worth per process.
    checkpoint-N/ the model and optimizer state through torch.distributed.checkpoint (DCP: each process writes
                  its own shards, rank 0 the metadata) + trainer_state.pt. DCP re-shards on load, so a run
                  continues on another process count, provided the global batch stays the same.
    output/       config.json + model.safetensors (or shards + index) + the base's tokenizer files, in the
                  dtype of --dtype: a checkpoint folder `komt.load_model(output)` reads. config.json is
                  written last, so the folder loads only once it is whole.

The trainer (`komt.train.trainer`) calls the same methods on `komt.train.lora_weights.LoRAWeights`.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, TextIO

import torch

from komt.model.checkpoint import build_empty_model
from komt.model.checkpoint_writer import copy_tokenizer_files, write_checkpoint
from komt.model.config import ModelConfig
from komt.model.load import load_model
from komt.model.lora import count_parameters
from komt.train import distributed
from komt.train.checkpoint import new_checkpoint_folder, publish_checkpoint
from komt.train.config import TrainConfig
from komt.train.model_prep import (autocast, check_vocabulary, enable_activation_checkpointing, training_dtype,
                                   uses_autocast)
from komt.train.progress import say

MASTER_DTYPE = torch.float32  # AdamW's updates on bf16 weights would mostly round away


class FullWeights:
    """How a full fine-tuning run loads, shards, checkpoints and saves its model (see module docstring)."""

    kind = "full"

    def __init__(self, config: TrainConfig, ctx: distributed.DistContext, log: TextIO | None) -> None:
        self.config, self.ctx, self.log = config, ctx, log
        self.dtype = training_dtype(config.dtype, ctx.device)  # compute and saved dtype
        self.sharded = ctx.enabled
        self.model_path: Path | None = None

    @property
    def precision(self) -> str:
        if self.dtype == MASTER_DTYPE or self.ctx.device.type != "cuda":
            return "fp32"
        how = "FSDP2 mixed precision" if self.sharded else "autocast"
        return f"fp32 master weights + bf16 compute ({how})"

    # --- the model ---------------------------------------------------------------------------------------

    def load(self, model_path: Path, vocab_size: int) -> torch.nn.Module:
        """Every weight trainable (fp32), sharded across processes under torchrun, in training mode."""
        self.model_path = model_path
        config = ModelConfig.from_file(model_path / "config.json")
        check_vocabulary(vocab_size, config.vocab_size)
        model = self._load(model_path, config, trainable=True)
        trainable, total = count_parameters(model)
        say(self.log, f"trainable params: {trainable:,} of {total:,} (full fine-tuning"
                      f"{f', sharded over {self.ctx.world_size} processes with FSDP2' if self.sharded else ''})")
        return model.train()

    def _load(self, path: Path, config: ModelConfig, trainable: bool) -> torch.nn.Module:
        if not self.sharded:
            model = load_model(path, device=self.ctx.device, dtype=MASTER_DTYPE if trainable else self.dtype,
                               kernels="torch", layout="plain")
            if trainable and self.config.grad_checkpointing:
                enable_activation_checkpointing(model)
            return model.requires_grad_(trainable)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        model = build_empty_model(config)  # meta: shapes only
        if trainable and self.config.grad_checkpointing:
            enable_activation_checkpointing(model)  # before sharding: FSDP2 then re-gathers for the recompute
        shard(model, self.mixed_precision())
        model.to_empty(device=self.ctx.device)  # each process: its own shards, uninitialised
        full = load_model(path, device="cpu", dtype=MASTER_DTYPE, layout="plain").state_dict() if self.ctx.is_main else {}
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        del full
        return model.requires_grad_(trainable)

    def mixed_precision(self):
        """bf16 compute over fp32 shards, gradients reduced in fp32 (CUDA with a bf16 --dtype); else None."""
        if self.ctx.device.type != "cuda" or self.dtype == MASTER_DTYPE:
            return None
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model  # sharded in place by `load`

    def param_groups(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        """Weight decay on the matrices only, not on the norms' 1-D gains (the Hugging Face Trainer's rule)."""
        params = list(model.parameters())
        return [{"params": [p for p in params if p.ndim >= 2]},
                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]

    def forward_fn(self, step_model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """input_ids [B, T] -> fp32 logits [B, T, V]; FSDP's policy casts when sharded, autocast otherwise."""
        dtype = self.dtype if not self.sharded else MASTER_DTYPE  # MASTER_DTYPE: no autocast

        def forward(input_ids: torch.Tensor) -> torch.Tensor:
            with autocast(self.ctx.device, dtype):
                return step_model(input_ids)
        return forward

    def micro_batch_sync(self, step_model: torch.nn.Module, last: bool):
        return nullcontext()  # reduce-scatter every micro-batch: gradients stay sharded (module docstring)

    def reference(self, model: torch.nn.Module):
        return nullcontext()  # before the first step the weights are the reference

    def load_reference(self, path: Path) -> torch.nn.Module:
        """`--ref-model`, frozen, sharded like the policy under torchrun (it is freed after scoring)."""
        return self._load(path, ModelConfig.from_file(path / "config.json"), trainable=False).eval()

    # --- checkpoints and the result ---------------------------------------------------------------------

    def save_checkpoint(self, output: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        trainer_state: dict[str, Any]) -> Path | None:
        """checkpoint-<step>: every process writes its shards into one temp folder, rank 0 commits it."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        tmp = distributed.broadcast_object(str(new_checkpoint_folder(output, step)) if self.ctx.is_main else None,
                                           self.ctx)
        try:
            model_state, optimizer_state = get_state_dict(model, optimizer)
            with _single_process_dcp(self.ctx):
                dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp,
                         no_dist=not self.ctx.enabled)
            distributed.barrier(self.ctx)
            return publish_checkpoint(Path(tmp), output, step, trainer_state) if self.ctx.is_main else None
        except BaseException:
            if self.ctx.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise

    def restore(self, folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                state: dict[str, Any]) -> None:
        """Load checkpoint-N's shards into this run's sharding (DCP re-shards across process counts)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optimizer_state = get_state_dict(model, optimizer)
        loaded = {"model": model_state, "optimizer": optimizer_state}
        with _single_process_dcp(self.ctx):
            dcp.load(loaded, checkpoint_id=str(folder), no_dist=not self.ctx.enabled)
        set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])

    def save_final(self, output: Path, model: torch.nn.Module) -> None:
        """The trained model as a checkpoint folder in `output`, in the --dtype (gathered onto rank 0)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options) if self.sharded else model.state_dict()
        if self.ctx.is_main:
            for name in list(state):  # one tensor at a time: never the model twice in memory
                state[name] = state[name].detach().to("cpu", self.dtype)
            export_checkpoint(model.config, state, output, self.model_path)
        distributed.barrier(self.ctx)

    def describe_output(self, output: Path) -> str:
        return f"model saved to {output} (a checkpoint folder: komt.load_model({str(output)!r}))"


@contextmanager
def _single_process_dcp(ctx: distributed.DistContext) -> Iterator[None]:
    """DCP warns that it "assumes a single process" even when told so (no_dist): in one process it is right."""
    with warnings.catch_warnings():
        if not ctx.enabled:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def export_checkpoint(config: ModelConfig, state: dict[str, torch.Tensor], output: Path, source: Path) -> None:
    """Write `state` as a checkpoint folder's files into the run folder `output`, config.json last.

    The run folder already holds checkpoints and metrics, so the files cannot arrive as one renamed
    folder: they are written by komt's checkpoint writer into a hidden temp folder (cleared by the next
    run's start if this one is killed), then moved in one by one, config.json, what makes the folder a
    loadable checkpoint, last.
    """
    model = build_empty_model(config)
    model.load_state_dict(state, assign=True)  # the tensors themselves: no copy
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    tmp = new_checkpoint_folder(output, "final")
    try:
        write_checkpoint(model, tmp)
        copy_tokenizer_files(source, tmp)  # the base's tokenizer, so the folder is complete on its own
        for name in sorted(os.listdir(tmp), key=lambda n: n == "config.json"):
            os.replace(tmp / name, output / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def shard(model: torch.nn.Module, mp_policy=None) -> None:
    """FSDP2: each decoder layer its own group, then the root (embeddings, final norm, lm_head, tied or not)."""
    from torch.distributed.fsdp import fully_shard

    kwargs = {"mp_policy": mp_policy} if mp_policy is not None else {}
    for layer in model.model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)

"""The LoRA training loop: frozen base model, trainable LoRA, AdamW with warm-up + cosine, resumable.

    load tokenizer, data, base model (frozen) -> inject LoRA (fp32) -> [DDP]
    for each optimizer step s:
        global batch of step s -> this process's micro-batches -> forward/backward each (loss summed over
        label tokens / all label tokens of the global batch) -> all-reduce grads -> clip -> AdamW -> lr
        metrics.jsonl, progress bar; every --save-every steps an atomic checkpoint; eval loss if asked
    -> output/adapter_config.json + adapter_model.safetensors (a PEFT LoRA adapter) + loss_curve.png

Reproducibility: the LoRA init comes from `seed`, the batches from (seed, epoch, step), dropout from a
per-process generator whose state goes into every checkpoint. So a run killed and resumed ends with the
adapter an uninterrupted run produces, and N processes with the same global batch train like one.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

import torch

from komt.errors import ConfigError, DataError, KomtError
from komt.generate.prompt import prompt_format
from komt.generate.tokenizer import Tokenizer, load_tokenizer
from komt.generate.vocab import check_tokenizer_fits
from komt.model.hub import resolve_model_path
from komt.model.load import load_model
from komt.atomic import write_text_atomic
from komt.model.lora import ADAPTER_WEIGHTS, count_parameters, inject_lora, save_adapter
from komt.train import distributed
from komt.train.batching import collate, count_targets, epoch_batches, micro_batches, split_eval, steps_per_epoch
from komt.train.checkpoint import (list_checkpoints, load_trainer_state, remove_partial_checkpoints, restore_lora,
                                   rng_state, save_checkpoint, set_rng_state)
from komt.train.config import TrainConfig
from komt.train.data import Dataset, Example, load_dataset
from komt.train.loss import token_loss_sum
from komt.train.progress import LOSS_CURVE_FILE, METRICS_FILE, MetricsLog, ProgressBar, plot_loss_curve
from komt.train.schedule import cosine_with_warmup


@dataclass
class StepResult:
    loss: float  # mean next-token loss over the global batch's label tokens
    grad_norm: float  # before clipping
    lr: float  # the rate this step used
    tokens: int  # non-padding input tokens of the global batch


def train(config: TrainConfig, log: TextIO | None = sys.stderr) -> Path:
    """Run (or resume) a training run; returns the output folder holding the final adapter."""
    ctx = distributed.setup(config.device)
    try:
        return _run(config, ctx, log if ctx.is_main else None)
    finally:
        distributed.teardown(ctx)


def _run(config: TrainConfig, ctx: distributed.DistContext, log: TextIO | None) -> Path:
    output = Path(config.output)
    resume_from = _on_main(ctx, lambda: prepare_output(output, config.resume))
    model_path = resolve_model_path(config.model)
    tokenizer = load_tokenizer(config.tokenizer or model_path)
    dataset, train_set, eval_set = prepare_data(config, tokenizer, log)
    base_dtype = resolve_dtype(config.dtype, ctx.device)
    model = prepare_model(config, model_path, tokenizer.vocab_size, ctx, base_dtype, log)
    step_model = distributed.wrap(model, ctx)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)

    global_batch = config.batch_size * config.grad_accum * ctx.world_size
    per_epoch = steps_per_epoch(len(train_set), global_batch)
    total_steps = config.max_steps or math.ceil((config.epochs or 1.0) * per_epoch)
    scheduler = cosine_with_warmup(optimizer, config.warmup_steps, total_steps)
    run = config.run_fingerprint(ctx.world_size, total_steps)
    run["examples"] = [len(e.ids) for e in dataset.examples]  # the data as tokenized, compactly
    _say(log, f"{total_steps} steps ({total_steps / per_epoch:.2f} epochs), global batch {global_batch} = "
              f"{config.batch_size} x {config.grad_accum} accumulation x {ctx.world_size} process(es), "
              f"{ctx.device} {str(base_dtype).removeprefix('torch.')}"
              f"{' + bf16 autocast' if uses_autocast(ctx.device, base_dtype) else ''}, attention: torch SDPA")

    start, tokens_seen = 0, 0
    if resume_from is not None:
        state = load_trainer_state(resume_from)
        check_same_run(state["run"], run, resume_from)
        restore_lora(model, resume_from)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"][ctx.rank], ctx.device)
        start, tokens_seen = state["step"], state["tokens_seen"]
        _say(log, f"resuming from {resume_from} (step {start})")
    else:
        torch.manual_seed(config.seed + 1 + ctx.rank)  # dropout masks: a different stream per process

    metrics = None
    if ctx.is_main:  # the first write: every input has been read and checked by now
        output.mkdir(parents=True, exist_ok=True)
        remove_partial_checkpoints(output)
        write_text_atomic(output / "train_config.json", json.dumps(config.to_dict(), indent=2) + "\n")
        metrics = MetricsLog(output / METRICS_FILE, resume_step=start if resume_from else None)
    bar = ProgressBar(total_steps, start, log)
    eval_every = config.eval_every or config.save_every
    lengths = [len(e.ids) for e in train_set]
    batches: dict[int, list[list[int]]] = {}
    for step in range(start, total_steps):
        epoch, index = divmod(step, per_epoch)
        if epoch not in batches:
            batches = {epoch: epoch_batches(lengths, global_batch, config.seed, epoch)}
        batch = [train_set[i] for i in batches[epoch][index]]
        t0 = time.perf_counter()
        result = train_step(step_model, params, batch, optimizer, scheduler, config, ctx, tokenizer.eos_id)
        elapsed = time.perf_counter() - t0
        done = step + 1
        tokens_seen += result.tokens
        record: dict[str, Any] = {"step": done, "epoch": round(done / per_epoch, 4), "loss": result.loss,
                                  "lr": result.lr, "grad_norm": result.grad_norm,
                                  "tokens_per_s": result.tokens / elapsed, "tokens": tokens_seen}
        if eval_set and (done % eval_every == 0 or done == total_steps):
            record["eval_loss"] = evaluate(model, eval_set, config.batch_size, tokenizer.eos_id, ctx, base_dtype)
            bar.message(f"step {done}: eval loss {record['eval_loss']:.4f}")
        if metrics is not None:
            metrics.write(record)
        bar.update(done, result.loss, result.lr, record["tokens_per_s"])
        if done % config.save_every == 0 and done < total_steps:
            rngs = distributed.gather_objects(rng_state(ctx.device), ctx)
            if ctx.is_main:
                trainer_state = {"step": done, "data_position": {"epoch": done // per_epoch,
                                                                 "batch": done % per_epoch},
                                 "tokens_seen": tokens_seen, "optimizer": optimizer.state_dict(),
                                 "scheduler": scheduler.state_dict(), "rng": rngs, "run": run}
                path = save_checkpoint(output, done, model, config.lora, config.model, trainer_state)
                bar.message(f"saved {path}")
            distributed.barrier(ctx)
    bar.close()
    if ctx.is_main:
        save_adapter(model, output, config.lora, config.model)
        metrics.close()
        plot_loss_curve(output / METRICS_FILE, output / LOSS_CURVE_FILE, log)
        _say(log, f"adapter saved to {output}")
    distributed.barrier(ctx)
    return output


def prepare_data(config: TrainConfig, tokenizer: Tokenizer, log: TextIO | None) -> tuple[Dataset, list[Example], list[Example]]:
    """The tokenized dataset and its (train, held-out eval) split."""
    fmt = prompt_format(tokenizer, config.prompt_format)
    _say(log, f"prompt format: {fmt.label}")
    dataset = load_dataset(config.data, fmt, config.max_seq_len)
    try:
        train_idx, eval_idx = split_eval(len(dataset.examples), config.eval_split, config.seed)
    except ValueError as err:
        raise DataError(f"{config.data}: {err}") from None
    train_set = [dataset.examples[i] for i in train_idx]
    eval_set = [dataset.examples[i] for i in eval_idx]
    dropped = f"; {dataset.n_dropped} dropped: no target within --max-seq-len" if dataset.n_dropped else ""
    _say(log, f"data: {dataset.n_records} records in {config.data} -> {len(train_set)} train, "
              f"{len(eval_set)} eval examples{dropped}")
    return dataset, train_set, eval_set


def prepare_model(config: TrainConfig, model_path: Path, vocab_size: int, ctx: distributed.DistContext,
                  base_dtype: torch.dtype, log: TextIO | None) -> torch.nn.Module:
    """The frozen base model with fp32 LoRA layers injected, in training mode."""
    # PyTorch's SDPA on every device: its fused backward is measured on the H100; the Triton kernels'
    # backward is tested but not yet timed there, so the Triton kernels stay the inference path.
    model = load_model(model_path, device=ctx.device, dtype=base_dtype, kernels="torch")
    check_tokenizer_fits(vocab_size, model.config.vocab_size, stderr=log)
    torch.manual_seed(config.seed)  # the LoRA init: identical in every process
    inject_lora(model, config.lora, lora_dtype=torch.float32)
    trainable, total = count_parameters(model)
    _say(log, f"trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.4f}%), "
              f"LoRA r {config.lora_r} alpha {config.lora_alpha:g} on {', '.join(config.lora_targets)}")
    if config.grad_checkpointing:
        enable_activation_checkpointing(model)
    return model.train()


def train_step(step_model: torch.nn.Module, params: list[torch.nn.Parameter], batch: list[Example],
               optimizer: torch.optim.Optimizer, scheduler, config: TrainConfig, ctx: distributed.DistContext,
               pad_id: int) -> StepResult:
    """One optimizer step on one global batch (this process does its share; DDP averages the gradients).

    Each micro-batch's summed loss is scaled by world_size / (label tokens in the global batch): DDP
    divides the summed gradients by world_size, so the update is that of the global token-mean loss.
    """
    n_targets = count_targets(batch)
    scale = ctx.world_size / n_targets
    dtype = resolve_dtype(config.dtype, ctx.device)
    local_loss = torch.zeros((), device=ctx.device)
    mine = micro_batches(list(range(len(batch))), config.batch_size, config.grad_accum, ctx.rank, ctx.world_size)
    for a, indices in enumerate(mine):
        input_ids, labels = collate([batch[i] for i in indices], pad_id)
        input_ids, labels = input_ids.to(ctx.device), labels.to(ctx.device)
        last = a == len(mine) - 1
        no_sync = step_model.no_sync() if hasattr(step_model, "no_sync") and not last else nullcontext()
        with no_sync:  # gradients are all-reduced once, in the last micro-batch's backward
            with autocast(ctx.device, dtype):
                logits = step_model(input_ids)  # (B, T, V) fp32
            loss = token_loss_sum(logits, labels)
            (loss * scale).backward()
        local_loss += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or float("inf"))
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    loss = distributed.all_reduce_sum(local_loss, ctx).item() / n_targets
    return StepResult(loss, float(grad_norm), lr, sum(len(e.ids) for e in batch))


@torch.no_grad()
def evaluate(model: torch.nn.Module, examples: list[Example], batch_size: int, pad_id: int,
             ctx: distributed.DistContext, dtype: torch.dtype) -> float:
    """Mean next-token loss over the label tokens of `examples` (each process scores every world_size-th)."""
    model.eval()
    mine = sorted(examples[ctx.rank::ctx.world_size], key=lambda e: len(e.ids))
    totals = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # (loss sum, label tokens)
    for i in range(0, len(mine), batch_size):
        chunk = mine[i:i + batch_size]
        input_ids, labels = collate(chunk, pad_id)
        with autocast(ctx.device, dtype):
            logits = model(input_ids.to(ctx.device))
        totals[0] += token_loss_sum(logits, labels.to(ctx.device)).double()
        totals[1] += count_targets(chunk)
    distributed.all_reduce_sum(totals, ctx)
    model.train()
    return (totals[0] / totals[1]).item()


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations during backward instead of keeping them (Chen et al. 2016).

    Memory per layer drops to its input, for about one more forward of compute. Each layer's `forward` is
    wrapped in place, so parameter names (and the adapter's key names) stay what they were.
    """
    from torch.utils.checkpoint import checkpoint

    for layer in model.model.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Base-weight dtype: "auto" is bf16 on CUDA (trained under bf16 autocast) and fp32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def uses_autocast(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cuda" and dtype == torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16 autocast on CUDA for a bf16 base (matmuls in bf16, LoRA master weights and the loss in fp32)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if uses_autocast(device, dtype) else nullcontext()


def prepare_output(output: Path, resume: bool) -> Path | None:
    """Check the output folder against --resume; returns the checkpoint to resume from, or None."""
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output} is a file, not a folder")
    checkpoints = list_checkpoints(output)
    if resume:
        if not checkpoints:
            raise ConfigError(f"--resume: no checkpoint in {output} (one is written every --save-every steps)")
        return checkpoints[-1][1]
    if checkpoints or (output / METRICS_FILE).exists() or (output / ADAPTER_WEIGHTS).exists():
        raise ConfigError(f"--output {output} already holds a training run; pass --resume to continue it "
                          "or choose a new folder")
    return None


def check_same_run(saved: dict[str, Any], now: dict[str, Any], checkpoint: Path) -> None:
    """A resumed run must have the settings (and data) of the run it continues, or it would not be one run."""
    for key in sorted(set(saved) | set(now)):
        if saved.get(key) != now.get(key):
            what = "the data (tokenized lengths)" if key == "examples" else f"{key} {saved.get(key)!r}"
            raise ConfigError(f"--resume: {checkpoint} was trained with {what}, this run has "
                              f"{'different data' if key == 'examples' else repr(now.get(key))}; "
                              "resume with the same settings")


def _on_main(ctx: distributed.DistContext, fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 only and hand its result, or its error, to every process."""
    result: tuple = ("ok", None)
    if ctx.is_main:
        try:
            result = ("ok", fn())
        except KomtError as err:
            result = ("error", type(err), str(err))
    result = distributed.broadcast_object(result, ctx)
    if result[0] == "error":
        raise result[1](result[2])
    return result[1]


def _say(log: TextIO | None, text: str) -> None:
    if log is not None:
        print(f"komt.train: {text}", file=log, flush=True)

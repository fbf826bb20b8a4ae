"""The training loop shared by SFT and DPO, LoRA and full fine-tuning: one loop, two choices plugged in.

    objective  what is learned: the data, one micro-batch's loss, the metrics
               komt.train.sft.SFTObjective (next-token loss) | komt.train.dpo.DPOObjective (preferences)
    weights    what trains and how it is stored and spread over processes
               komt.train.lora_weights.LoRAWeights (frozen base + LoRA, DDP, PEFT adapters)
               komt.train.full.FullWeights (every weight, FSDP2, DCP checkpoints, an HF checkpoint folder)

    check --output -> tokenizer, data (objective) -> model (weights) -> AdamW, warm-up + cosine -> [resume]
    -> objective.prepare (DPO: the reference log-probs, once)
    for each optimizer step s:
        global batch of step s -> this process's micro-batches -> each one's loss sum / the global batch's
        denominator (label tokens, or pairs) -> backward -> gradients averaged across processes -> clip
        -> AdamW -> lr; metrics.jsonl, progress bar; every --save-every steps an atomic checkpoint (the
        newest --save-total-limit kept); an eval every --eval-every steps if asked
    -> the final weights in --output

Reproducibility: the LoRA init comes from `seed`, the batches from (seed, epoch, step), dropout from a
per-process generator whose state goes into every checkpoint. So a run killed and resumed ends with the
weights an uninterrupted run produces, and N processes with the same global batch train like one.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

import torch

from komt.atomic import write_json_atomic
from komt.errors import ConfigError, KomtError
from komt.generate.tokenizer import load_tokenizer
from komt.model.hub import resolve_model_path
from komt.train import distributed
from komt.train.batching import epoch_batches, length_chunks, micro_batches, shard_chunks, steps_per_epoch
from komt.train.checkpoint import (load_trainer_state, prune_checkpoints, remove_partial_checkpoints, rng_state,
                                   set_rng_state)
from komt.train.config import DPOConfig, TrainConfig
from komt.train.progress import LOSS_CURVE_FILE, METRICS_FILE, MetricsLog, ProgressBar, plot_loss_curve, say
from komt.train.run_folder import TRAIN_CONFIG, inspect_output
from komt.train.schedule import cosine_with_warmup

# The re-exports keep `from komt.train.trainer import autocast, ...` working for older callers.
from komt.train.model_prep import autocast, enable_activation_checkpointing  # noqa: F401


@dataclass
class StepResult:
    metrics: dict[str, float]  # the objective's means over the global batch ("loss" first)
    grad_norm: float  # before clipping
    lr: float  # the rate this step used
    tokens: int  # non-padding input tokens of the global batch

    @property
    def loss(self) -> float:
        return self.metrics["loss"]


def train(config: TrainConfig, log: TextIO | None = sys.stderr) -> Path:
    """Run (or resume) a training run; returns the output folder holding the final weights.

    The objective follows the config's type (`TrainConfig`: SFT, `DPOConfig`: DPO) and `config.full`
    picks full fine-tuning over LoRA. `--resume` of a finished run says so and returns at once.
    """
    ctx = distributed.setup(config.device)
    finished = False
    try:
        output = _run(config, ctx, log if ctx.is_main else None)
        finished = True
        return output
    finally:
        distributed.teardown(ctx, finished)


def make_objective(config: TrainConfig, tokenizer, log: TextIO | None):
    if isinstance(config, DPOConfig):
        from komt.train.dpo import DPOObjective

        return DPOObjective(config, tokenizer, log)
    from komt.train.sft import SFTObjective

    return SFTObjective.from_config(config, tokenizer, log)


def make_weights(config: TrainConfig, ctx: distributed.DistContext, log: TextIO | None):
    if config.full:
        from komt.train.full import FullWeights

        return FullWeights(config, ctx, log)
    from komt.train.lora_weights import LoRAWeights

    return LoRAWeights(config, ctx, log)


def _run(config: TrainConfig, ctx: distributed.DistContext, log: TextIO | None) -> Path:
    output = Path(config.output)
    folder = _on_main(ctx, lambda: inspect_output(output, config.resume, config.to_dict()))
    if folder.finished_steps is not None:
        say(log, f"{output} is a finished run ({folder.finished_steps} steps, final weights saved); nothing to do")
        return output
    if folder.taken_over:
        say(log, f"{output} holds a run stopped before its first checkpoint (nothing was saved): starting it over")
    model_path = resolve_model_path(config.model)
    tokenizer = load_tokenizer(config.tokenizer or model_path)
    objective = make_objective(config, tokenizer, log)
    weights = make_weights(config, ctx, log)
    model = weights.load(model_path, tokenizer.vocab_size)  # in training mode; sharded under FSDP
    step_model = weights.wrap(model)
    optimizer = torch.optim.AdamW(weights.param_groups(model), lr=config.lr, weight_decay=config.weight_decay)

    global_batch = config.batch_size * config.grad_accum * ctx.world_size
    per_epoch = steps_per_epoch(len(objective.train_set), global_batch)
    total_steps = config.max_steps or math.ceil((config.epochs or 1.0) * per_epoch)
    scheduler = cosine_with_warmup(optimizer, config.warmup_steps, total_steps)
    run = config.run_fingerprint(ctx.world_size, total_steps)
    run["examples"] = objective.fingerprint
    say(log, f"{objective.name.upper()}, {weights.kind}: {total_steps} steps ({total_steps / per_epoch:.2f} epochs), "
             f"global batch {global_batch} = {config.batch_size} x {config.grad_accum} accumulation x "
             f"{ctx.world_size} process(es), {ctx.device} {weights.precision}, attention: torch SDPA")

    start, tokens_seen = 0, 0
    if folder.resume_from is not None:
        state = load_trainer_state(folder.resume_from)
        check_same_run(state["run"], run, folder.resume_from)
        weights.restore(folder.resume_from, model, optimizer, state)
        scheduler.load_state_dict(state["scheduler"])
        rngs = state["rng"]  # one per process; a full run (no dropout) may resume on more processes
        set_rng_state(rngs[ctx.rank] if ctx.rank < len(rngs) else rngs[0], ctx.device)
        start, tokens_seen = state["step"], state["tokens_seen"]
        say(log, f"resuming from {folder.resume_from} (step {start})")
    else:
        torch.manual_seed(config.seed + 1 + ctx.rank)  # dropout masks: a different stream per process

    metrics = None
    if ctx.is_main:  # the first write: every input has been read and checked by now
        output.mkdir(parents=True, exist_ok=True)
        remove_partial_checkpoints(output)
        write_json_atomic(output / TRAIN_CONFIG, config.to_dict())
        metrics = MetricsLog(output / METRICS_FILE, resume_step=start if folder.resume_from else None)
    distributed.barrier(ctx)
    forward = weights.forward_fn(step_model)
    eval_forward = weights.forward_fn(model)  # no DDP bookkeeping for no-grad passes
    objective.prepare(model=model, forward=eval_forward, weights=weights, ctx=ctx, output=output,
                      resuming=folder.resume_from is not None)

    bar = ProgressBar(total_steps, start, log)
    eval_every = config.eval_every or config.save_every
    train_set = objective.train_set
    lengths = [objective.length(e) for e in train_set]
    batches: dict[int, list[list[int]]] = {}
    for step in range(start, total_steps):
        epoch, index = divmod(step, per_epoch)
        if epoch not in batches:
            batches = {epoch: epoch_batches(lengths, global_batch, config.seed, epoch)}
        batch = [train_set[i] for i in batches[epoch][index]]
        t0 = time.perf_counter()
        result = train_step(step_model, forward, objective, weights, batch, optimizer, scheduler, config, ctx)
        elapsed = time.perf_counter() - t0
        done = step + 1
        tokens_seen += result.tokens
        record: dict[str, Any] = {"step": done, "epoch": round(done / per_epoch, 4), **result.metrics,
                                  "lr": result.lr, "grad_norm": result.grad_norm,
                                  "tokens_per_s": result.tokens / elapsed, "tokens": tokens_seen}
        if objective.eval_set and (done % eval_every == 0 or done == total_steps):
            record.update(held_out_metrics(model, eval_forward, objective, objective.eval_set, config.batch_size, ctx))
            bar.message(f"step {done}: eval loss {record['eval_loss']:.4f}")
        if metrics is not None:
            metrics.write(record)
        bar.update(done, result.loss, result.lr, record["tokens_per_s"])
        if done % config.save_every == 0 and done < total_steps:
            rngs = distributed.gather_objects(rng_state(ctx.device), ctx)
            trainer_state = {"step": done, "data_position": {"epoch": done // per_epoch, "batch": done % per_epoch},
                             "tokens_seen": tokens_seen, "scheduler": scheduler.state_dict(), "rng": rngs, "run": run}
            path = weights.save_checkpoint(output, done, model, optimizer, trainer_state)
            if ctx.is_main:
                bar.message(f"saved {path}")
                for old in prune_checkpoints(output, config.save_total_limit):
                    bar.message(f"removed {old} (--save-total-limit {config.save_total_limit})")
            distributed.barrier(ctx)
    bar.close()
    weights.save_final(output, model)
    if ctx.is_main:
        metrics.close()
        plot_loss_curve(output / METRICS_FILE, output / LOSS_CURVE_FILE, log)
        say(log, weights.describe_output(output))
    distributed.barrier(ctx)
    return output


def train_step(step_model: torch.nn.Module, forward: Callable, objective, weights, batch: list,
               optimizer: torch.optim.Optimizer, scheduler, config: TrainConfig,
               ctx: distributed.DistContext) -> StepResult:
    """One optimizer step on one global batch (this process does its share; DDP/FSDP average the gradients).

    Each micro-batch's summed loss is scaled by world_size / (the global batch's denominator): the
    gradient reduction divides by world_size, so the update is that of the global mean loss.
    """
    denominator = objective.denominator(batch)
    scale = ctx.world_size / denominator
    stats = None
    mine = micro_batches(list(range(len(batch))), config.batch_size, config.grad_accum, ctx.rank, ctx.world_size)
    for a, indices in enumerate(mine):
        with weights.micro_batch_sync(step_model, last=a == len(mine) - 1):
            loss, micro_stats = objective.micro_loss(forward, [batch[i] for i in indices], ctx.device)
            (loss * scale).backward()
        stats = micro_stats if stats is None else stats + micro_stats
    grad_norm = torch.nn.utils.clip_grad_norm_(_trainable(optimizer), config.max_grad_norm or float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # a DTensor under FSDP
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    totals = distributed.all_reduce_sum(stats.double(), ctx)
    return StepResult(objective.summarize(totals, denominator), float(grad_norm), lr, objective.tokens(batch))


@torch.no_grad()
def held_out_metrics(model: torch.nn.Module, forward: Callable, objective, examples: list, batch_size: int,
                     ctx: distributed.DistContext) -> dict[str, float]:
    """The objective's metrics over held-out `examples`, as `eval_<name>` (each process scores its share).

    Every process runs the same number of forwards (see `shard_chunks`): a sharded model needs that.
    """
    model.eval()
    chunks = length_chunks([objective.length(e) for e in examples], batch_size)
    totals, denominator = None, 0
    for k in shard_chunks(len(chunks), ctx.rank, ctx.world_size):
        chunk = [examples[i] for i in chunks[k if k is not None else 0]]
        _, stats = objective.micro_loss(forward, chunk, ctx.device)
        stats = stats.double() * (k is not None)  # a repeated chunk counts for nothing
        totals = stats if totals is None else totals + stats
        denominator += objective.denominator(chunk) if k is not None else 0
    summed = torch.cat([totals, torch.tensor([float(denominator)], dtype=torch.float64, device=totals.device)])
    distributed.all_reduce_sum(summed, ctx)
    model.train()
    return {f"eval_{name}": value for name, value in objective.summarize(summed[:-1], summed[-1].item()).items()}


def check_same_run(saved: dict[str, Any], now: dict[str, Any], checkpoint: Path) -> None:
    """A resumed run must have the settings (and data) of the run it continues, or it would not be one run."""
    for key in sorted(set(saved) | set(now)):
        if saved.get(key) != now.get(key):
            what = "the data (tokenized lengths)" if key == "examples" else f"{key} {saved.get(key)!r}"
            raise ConfigError(f"--resume: {checkpoint} was trained with {what}, this run has "
                              f"{'different data' if key == 'examples' else repr(now.get(key))}; "
                              "resume with the same settings")


def _trainable(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


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

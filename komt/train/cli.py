"""`python -m komt.train`: fine-tune (SFT), `... dpo` to preference-tune, `... merge` to fold an adapter in.

Both training commands train a LoRA adapter, or every weight with `--full` (FSDP2 under torchrun).

Each flag maps onto one `TrainConfig` field; values are checked as they are parsed, so a bad one is a
one-line `error: ...` and exit status 2 before anything is loaded.
"""

from __future__ import annotations

import argparse
import sys

import torch

from komt.argtypes import non_negative_int, number, positive_int
from komt.entry_point import run_entry_point
from komt.errors import KomtError
from komt.interrupts import raise_on_interrupt
from komt.model.lora import DEFAULT_TARGETS
from komt.generate.prompt import PROMPT_FORMATS
from komt.model.checkpoint_writer import MAX_SHARD_BYTES
from komt.model.dtypes import DTYPE_CHOICES, resolve_dtype
from komt.train.config import BASE_QUANTIZE_CHOICES, DPO_LOSSES, DPOConfig, TrainConfig

EPILOG = """\
examples:
  python -m komt.train --model davidkim205/komt-mistral-7b-v1 --data data.jsonl --output runs/a --epochs 1
  torchrun --nproc-per-node 4 -m komt.train --model M --data data.jsonl --output runs/a --max-steps 1000
  python -m komt.train --model M --data data.jsonl --output runs/a --max-steps 1000 --resume
  python -m komt.train --model M --data data.jsonl --output runs/q --base-quantize int8     # QLoRA
  torchrun --nproc-per-node 8 -m komt.train --full --model M --data data.jsonl --output runs/f
  python -m komt.train dpo --model M --data prefs.jsonl --output runs/d
  python -m komt.train merge --model M --adapter runs/a --output merged/

data: a JSON list or JSON lines of {"instruction", "output"[, "input"]} or {"messages": [{"role", "content"}]}.
output: adapter_config.json + adapter_model.safetensors (a PEFT LoRA adapter; with --full: config.json +
model.safetensors, a checkpoint folder), metrics.jsonl, checkpoint-<step>/ every --save-every steps (the
newest --save-total-limit kept), loss_curve.png (with matplotlib). --resume of a finished run exits 0."""

DPO_EPILOG = """\
examples:
  python -m komt.train dpo --model davidkim205/komt-mistral-7b-v1 --data prefs.jsonl --output runs/d
  torchrun --nproc-per-node 8 -m komt.train dpo --full --model M --data prefs.jsonl --output runs/df

data: JSON (a list) or JSON lines of {"prompt", "chosen", "rejected"}: strings, or message lists
({"role", "content"}; chosen/rejected: the assistant's reply, optionally after the prompt's messages, as
in UltraFeedback). The defaults are komt-mistral-7b-v1-dpo's recipe.
metrics.jsonl logs trl's names: loss, rewards/chosen, rewards/rejected, rewards/accuracies,
rewards/margins, logps/chosen, logps/rejected."""


class _Parser(argparse.ArgumentParser):
    """argparse, except that a usage error is raised (and printed by `main` as one line) instead of exiting."""

    def error(self, message: str):
        raise UsageError(message)


class UsageError(KomtError):
    """A bad command line: printed as one `error: ...` line like every other bad input."""


def build_train_parser() -> argparse.ArgumentParser:
    d = TrainConfig(model="", data="", output="")  # the defaults, shown in --help
    p = _Parser(prog="python -m komt.train", description="Fine-tune a Mistral/Llama model with LoRA (or --full).",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="base checkpoint folder or Hugging Face hub id")
    p.add_argument("--data", required=True, help="training data: .json (a list) or .jsonl")
    _add_common_flags(p, d)
    p.add_argument("--max-seq-len", type=positive_int, default=d.max_seq_len,
                   help=f"truncate examples to this many tokens (default: {d.max_seq_len})")
    return p


def build_dpo_parser() -> argparse.ArgumentParser:
    d = DPOConfig(model="", data="", output="")
    p = _Parser(prog="python -m komt.train dpo", epilog=DPO_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                description="Preference-tune a Mistral/Llama model with DPO (LoRA, or --full).")
    p.add_argument("--model", required=True, help="the model to tune (and, by default, its own reference)")
    p.add_argument("--data", required=True, help="preference pairs: .json (a list) or .jsonl")
    _add_common_flags(p, d)
    p.add_argument("--beta", type=number(0, low_open=True), default=d.beta,
                   help=f"KL strength; rewards are beta * log(policy / reference) (default: {d.beta:g})")
    p.add_argument("--loss-type", choices=DPO_LOSSES, default=d.loss_type,
                   help="sigmoid = DPO, ipo = IPO on per-token log-ratios (default: sigmoid)")
    p.add_argument("--label-smoothing", type=number(0, 0.5, high_open=True), default=d.label_smoothing,
                   help="conservative DPO: the probability a preference label is wrong (default: 0)")
    p.add_argument("--max-prompt-length", type=positive_int, default=d.max_prompt_length,
                   help=f"tokens an over-long pair's prompt keeps, from its end (default: {d.max_prompt_length})")
    p.add_argument("--max-length", type=positive_int, default=d.max_length,
                   help=f"tokens of prompt + response at most (default: {d.max_length})")
    p.add_argument("--ref-model", help="reference checkpoint (default: the model itself: LoRA switched off, "
                                       "or with --full the weights before training)")
    return p


def _add_common_flags(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    """The flags SFT and DPO share; `d` holds the defaults of the command (its recipe)."""
    p.add_argument("--output", required=True, help="folder for the adapter, checkpoints and metrics")
    p.add_argument("--tokenizer", help="tokenizer.model / tokenizer.json file or folder (default: the model folder's)")
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, default=d.prompt_format,
                   help="how examples are framed: card (komt's [INST] format), template (the checkpoint's chat "
                        "template; labels on assistant turns), raw; auto (default): template if the checkpoint "
                        "ships one, else card")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--max-steps", type=positive_int, help="optimizer steps to run")
    length.add_argument("--epochs", type=number(0, low_open=True), help="passes over the data (default: 1)")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                   help=f"examples per micro-batch per process (default: {d.batch_size})")
    p.add_argument("--grad-accum", type=positive_int, default=d.grad_accum,
                   help="micro-batches per optimizer step; global batch = batch-size x grad-accum x processes "
                        f"(default: {d.grad_accum})")
    p.add_argument("--lr", type=number(0, low_open=True), default=d.lr, help=f"peak learning rate (default: {d.lr:g})")
    p.add_argument("--warmup-steps", type=non_negative_int, default=d.warmup_steps,
                   help=f"linear warm-up steps before the cosine decay (default: {d.warmup_steps})")
    p.add_argument("--weight-decay", type=number(0), default=d.weight_decay,
                   help=f"AdamW weight decay (default: {d.weight_decay:g})")
    p.add_argument("--max-grad-norm", type=number(0), default=d.max_grad_norm,
                   help=f"gradient clipping norm, 0 = off (default: {d.max_grad_norm:g})")
    p.add_argument("--lora-r", type=positive_int, default=d.lora_r, help=f"LoRA rank (default: {d.lora_r})")
    p.add_argument("--lora-alpha", type=number(0, low_open=True), default=d.lora_alpha,
                   help=f"LoRA alpha; the update is scaled by alpha / r (default: {d.lora_alpha:g})")
    p.add_argument("--lora-dropout", type=number(0, 1, high_open=True), default=d.lora_dropout,
                   help=f"dropout on the LoRA path (default: {d.lora_dropout:g})")
    p.add_argument("--lora-targets", nargs="+", default=list(d.lora_targets), metavar="NAME",
                   help=f"linear layers to adapt, by name suffix (default: {' '.join(d.lora_targets)})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed for LoRA init, data order, dropout (default: {d.seed})")
    p.add_argument("--save-every", type=positive_int, default=d.save_every,
                   help=f"write a resumable checkpoint every K steps (default: {d.save_every})")
    p.add_argument("--save-total-limit", type=non_negative_int, default=d.save_total_limit, metavar="N",
                   help=f"keep the newest N checkpoints, 0 = all (default: {d.save_total_limit})")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --output (a finished run: nothing to do, exit 0)")
    p.add_argument("--eval-split", type=number(0, 1, high_open=True), default=d.eval_split,
                   help="fraction of the examples held out to report an eval loss (default: 0, none)")
    p.add_argument("--eval-every", type=positive_int,
                   help="eval loss every K steps and at the end (default: --save-every)")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute activations in backward: less memory, ~30%% more compute")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available; torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=d.dtype,
                   help="base weights: auto = bf16 with bf16 autocast on CUDA, fp32 on the CPU; with --full the "
                        "compute and saved dtype over fp32 master weights (default: auto)")
    p.add_argument("--full", action="store_true",
                   help="train every weight instead of a LoRA adapter; under torchrun sharded with FSDP2")
    p.add_argument("--base-quantize", choices=("none", *BASE_QUANTIZE_CHOICES), default="none",
                   help="QLoRA: hold the frozen base quantized under fp32 LoRA layers: int8 per channel, int4 "
                        "groups of 32, or nf4 (QLoRA's NormalFloat, blocks of 64); lm_head int8, embeddings "
                        "dense. komt's own recipe script trains on an 8-bit base (int8) and its --bits 4 "
                        "means nf4 (default: none, the base as --dtype loads it)")


def build_merge_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m komt.train merge",
                description="Merge a LoRA adapter into its base model and write a full checkpoint folder.")
    p.add_argument("--model", required=True, help="base checkpoint folder or Hugging Face hub id")
    p.add_argument("--adapter", required=True, help="PEFT LoRA adapter folder (komt's or PEFT's)")
    p.add_argument("--output", required=True, help="new folder for the merged checkpoint (must not exist)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="dtype of the merged weights; auto (default): the base's (the merge runs on the CPU)")
    p.add_argument("--max-shard-size", type=positive_int, default=MAX_SHARD_BYTES, metavar="BYTES",
                   help="split weights into safetensors shards of at most this size (default: 5 GiB)")
    p.add_argument("--base-quantize", choices=("auto", "none", *BASE_QUANTIZE_CHOICES), default="auto",
                   help="the base quantization the adapter was trained on (QLoRA): the adapter is folded into "
                        "those dequantized weights and the whole checkpoint is written dense. auto = what the "
                        "adapter's run recorded in its train_config.json, else none (default: auto)")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    common = dict(
        model=args.model, data=args.data, output=args.output, tokenizer=args.tokenizer,
        prompt_format=args.prompt_format,
        max_steps=args.max_steps, epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
        lr=args.lr, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, lora_targets=tuple(args.lora_targets), seed=args.seed,
        save_every=args.save_every, save_total_limit=args.save_total_limit, eval_split=args.eval_split,
        eval_every=args.eval_every, grad_checkpointing=args.grad_checkpointing, resume=args.resume,
        device=args.device, dtype=args.dtype, full=args.full,
        base_quantize=None if args.base_quantize == "none" else args.base_quantize,
    )
    if hasattr(args, "beta"):
        return DPOConfig(**common, beta=args.beta, loss_type=args.loss_type, label_smoothing=args.label_smoothing,
                         max_prompt_length=args.max_prompt_length, max_length=args.max_length,
                         ref_model=args.ref_model)
    return TrainConfig(**common, max_seq_len=args.max_seq_len)


def merge(argv: list[str]) -> int:
    from komt.train.merge import merge_adapter

    args = build_merge_parser().parse_args(argv)
    raise_on_interrupt()  # imported: a Ctrl-C must reach the folder writer's cleanup
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))  # merge_adapter loads on the CPU
    merge_adapter(args.model, args.adapter, args.output, dtype=dtype, max_shard_bytes=args.max_shard_size,
                  base_quantize=None if args.base_quantize == "none" else args.base_quantize, log=sys.stderr)
    return 0


def train_command(argv: list[str]) -> int:
    from komt.train.trainer import train

    dpo = argv[:1] == ["dpo"]
    parser = build_dpo_parser() if dpo else build_train_parser()
    config = config_from_args(parser.parse_args(argv[1:] if dpo else argv))
    raise_on_interrupt()  # imported: from here Ctrl-C stops the run the ordinary way (checkpoints are atomic)
    train(config, log=sys.stderr)  # this stderr (a default would be the one of the trainer's first import)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["merge"]:
        return run_entry_point(lambda: merge(argv[1:]))
    return run_entry_point(lambda: train_command(argv),
                           interrupted="error: interrupted (resume with --resume from the last checkpoint)")

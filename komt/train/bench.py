"""`python -m komt.train.bench`: LoRA training throughput and peak memory for a named model shape.

    python -m komt.train.bench --preset smollm2-135m --seq-len 512                       (CPU)
    python -m komt.train.bench --preset komt-mistral-7b --dtype bf16 --seq-len 1024 --device cuda
    python -m komt.train.bench --preset komt-mistral-7b --seq-len 1024 --base-quantize all   (QLoRA vs LoRA)

The model has random weights (no checkpoint needed); each step is the trainer's own `train_step` (collate,
forward under autocast, summed token loss, backward, clipping, AdamW, lr schedule) on random tokens with
every position a target. Prints one table row: median step time, training tokens/s, peak memory of a
step, and achieved TFLOP/s by the usual estimate for a frozen base: forward 2N + backward through the
activations 2N (+ 2N more with activation checkpointing) FLOPs per token, plus causal attention.

`--base-quantize int8|int4|nf4` holds the frozen base quantized as `python -m komt.train --base-quantize`
does (lm_head int8, embeddings dense); `all` runs none, int8, int4 and nf4 on the same shape, each in a
fresh process so that each row's peak memory is its own, and prints one row per setting. The "weights"
column is the bytes the model's tensors occupy (exact, not measured); peak memory is the CUDA
allocator's maximum, or on the CPU the process's peak resident set (which includes the Python runtime).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

from komt.argtypes import non_negative_int, positive_int
from komt.entry_point import run_entry_point
from komt.errors import KomtError
from komt.model import PRESETS, Transformer, preset
from komt.model.checkpoint import random_model
from komt.model.dtypes import DTYPE_CHOICES
from komt.model.lora import LoRAConfig, count_parameters, inject_lora
from komt.model.peak_memory import peak_memory_bytes, reset_peak_memory
from komt.model.quantized_linear import QuantizedLinear, QuantizeSpec
from komt.train.config import BASE_QUANTIZE_CHOICES, TrainConfig
from komt.train.data import Example
from komt.train.distributed import DistContext, choose_device
from komt.train.schedule import cosine_with_warmup
from komt.train.lora_weights import LoRAWeights
from komt.train.model_prep import enable_activation_checkpointing, training_dtype
from komt.train.sft import SFTObjective
from komt.train.trainer import train_step


def training_flops_per_token(model: Transformer, seq_len: int, grad_checkpointing: bool) -> float:
    """Matmul FLOPs per trained token: (2 forward + 2 backward [+ 2 recompute]) x weights + causal attention.

    The weights are counted per linear layer (out x in), whatever it stores (a quantized layer's packed
    tensors are not its size) and whether or not its weight is tied to the embedding."""
    c = model.config
    matmul_params = sum(m.in_features * m.out_features for m in model.modules()
                        if isinstance(m, (torch.nn.Linear, QuantizedLinear)))
    attention = 2 * 2 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq_len / 2  # QK^T + PV, causal
    passes = 3 if grad_checkpointing else 2  # forward, backward-through-activations, [recompute]
    return passes * (2 * matmul_params + attention)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the model's tensors (tied ones once): the frozen base, quantized or not, plus LoRA."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


@dataclass
class BenchRow:
    """One setting's figures: what `--base-quantize all` collects from each child process."""

    device: str
    preset: str
    dtype: str
    base: str
    batch: str
    lora_r: int
    trainable: int
    total: int
    checkpointing: bool
    ms_per_step: float
    tokens_per_s: float
    peak_bytes: int
    weight_bytes: int
    tflops: float


HEADER = (f"{'preset':<22}{'dtype':<10}{'base':<6}{'B x T':<11}{'r':<4}{'trainable':>12}{'ckpt':>6}{'ms/step':>10}"
          f"{'tokens/s':>11}{'weights':>13}{'peak mem':>11}{'TFLOP/s':>9}")


def format_row(r: BenchRow) -> str:
    return (f"{r.preset:<22}{r.dtype:<10}{r.base:<6}{r.batch:<11}{r.lora_r:<4}{r.trainable:>12,}"
            f"{'yes' if r.checkpointing else 'no':>6}{r.ms_per_step:>10.1f}{r.tokens_per_s:>11,.0f}"
            f"{r.weight_bytes / 2**20:>11,.2f}MB{r.peak_bytes / 2**30:>9.2f}GB{r.tflops:>9.2f}")


def measure(args: argparse.Namespace, base_quantize: str | None) -> BenchRow:
    """Build the model of `args` (its base held `base_quantize`) and time `args.steps` training steps."""
    device = choose_device(args.device)
    dtype = training_dtype(args.dtype, device)
    config = TrainConfig(model="<random>", data="<random>", output="<none>", batch_size=args.batch_size,
                         lora_r=args.lora_r, lora_dropout=0.05, dtype=args.dtype, max_seq_len=args.seq_len,
                         warmup_steps=0, base_quantize=base_quantize)
    torch.manual_seed(0)
    shape = preset(args.preset, **({"num_hidden_layers": args.layers} if args.layers else {}))
    spec = QuantizeSpec(base_quantize) if base_quantize else None
    model = random_model(shape, device, dtype, quantize=spec)  # quantized one layer at a time
    inject_lora(model, LoRAConfig(r=args.lora_r), lora_dtype=torch.float32)
    if args.grad_checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    trainable, total = count_parameters(model)
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scheduler = cosine_with_warmup(optimizer, 0, args.warmup + args.steps)
    ctx = DistContext(0, 1, device)
    weights, objective = LoRAWeights(config, ctx, None), SFTObjective([], [], pad_id=0)
    forward = weights.forward_fn(model)
    V, T, B = model.config.vocab_size, args.seq_len, args.batch_size

    times, peaks = [], []
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, V, (B, T)).tolist()
        batch = [Example(row, row, "random") for row in ids]
        reset_peak_memory(device)
        t0 = time.perf_counter()
        train_step(model, forward, objective, weights, batch, optimizer, scheduler, config, ctx)  # syncs
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            peaks.append(peak_memory_bytes(device))
    step_s = statistics.median(times)
    tokens_per_s = B * T / step_s
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return BenchRow(
        device=name, preset=args.preset + (f"[{args.layers}L]" if args.layers else ""),
        dtype=str(dtype).removeprefix("torch."), base=base_quantize or "none", batch=f"{B} x {T}",
        lora_r=args.lora_r, trainable=trainable, total=total, checkpointing=args.grad_checkpointing,
        ms_per_step=step_s * 1e3, tokens_per_s=tokens_per_s, peak_bytes=max(peaks), weight_bytes=weight_bytes(model),
        tflops=training_flops_per_token(model, T, args.grad_checkpointing) * tokens_per_s / 1e12)


def measure_in_fresh_process(argv: list[str], base: str) -> BenchRow:
    """One setting in a child process (`--json`), so its peak memory owes nothing to the settings before it."""
    cmd = [sys.executable, "-m", "komt.train.bench", *argv, "--base-quantize", base, "--json"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise KomtError(f"--base-quantize {base}: the benchmark process failed: {last}")
    return BenchRow(**json.loads(result.stdout.strip().splitlines()[-1]))


def _without_base_quantize(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--base-quantize":
            skip = True
        elif not arg.startswith("--base-quantize="):
            out.append(arg)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m komt.train.bench", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="smollm2-135m", choices=sorted(PRESETS), help="model shape (default: smollm2-135m)")
    p.add_argument("--layers", type=positive_int, help="override the number of layers (to fit a small machine)")
    p.add_argument("--seq-len", type=positive_int, default=512, help="tokens per example (default: 512)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="examples per step (default: 1)")
    p.add_argument("--lora-r", type=positive_int, default=8, help="LoRA rank, on all seven projections (default: 8)")
    p.add_argument("--steps", type=positive_int, default=5, help="timed steps (default: 5)")
    p.add_argument("--warmup", type=non_negative_int, default=2, help="untimed steps first (default: 2)")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="base weights; bf16 trains under bf16 autocast on CUDA (default: bf16 on CUDA, else fp32)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--base-quantize", choices=("none", *BASE_QUANTIZE_CHOICES, "all"), default="none",
                   help="hold the frozen base int8 / int4 / nf4 (QLoRA); all: one row each, none included, each "
                        "in a fresh process (default: none)")
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # one JSON row: what `all` reads
    return p


def bench(args: argparse.Namespace, argv: list[str]) -> int:
    """Measure (every base quantization in its own process with `all`) and print the table."""
    if args.base_quantize == "all":
        rest = _without_base_quantize(argv)
        rows = [measure_in_fresh_process(rest, base) for base in ("none", *BASE_QUANTIZE_CHOICES)]
    else:
        rows = [measure(args, None if args.base_quantize == "none" else args.base_quantize)]
    if args.json:
        print(json.dumps(asdict(rows[0])))
        return 0
    print(f"komt.train.bench on {rows[0].device}, torch {torch.__version__}; {args.steps} timed steps after "
          f"{args.warmup} warm-up")
    print(HEADER)
    for row in rows:
        print(format_row(row))
    r = rows[0]
    print(f"(trainable {100 * r.trainable / r.total:.3f}% of {r.total:,} parameters; weights = bytes of the model's "
          f"tensors; peak mem = {'CUDA allocator max' if 'cpu' not in r.device else 'process peak RSS'} over a step"
          f"{', each setting in its own process' if len(rows) > 1 else ''})")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    return run_entry_point(lambda: bench(args, argv))


if __name__ == "__main__":
    sys.exit(main())

"""`python -m komt.train.bench`: LoRA training throughput and peak memory for a named model shape.

    python -m komt.train.bench --preset smollm2-135m --seq-len 512                       (CPU)
    python -m komt.train.bench --preset komt-mistral-7b --dtype bf16 --seq-len 1024 --device cuda

The model has random weights (no checkpoint needed); each step is the trainer's own `train_step` (collate,
forward under autocast, summed token loss, backward, clipping, AdamW, lr schedule) on random tokens with
every position a target. Prints one table row: median step time, training tokens/s, peak memory of a
step, and achieved TFLOP/s by the usual estimate for a frozen base: forward 2N + backward through the
activations 2N (+ 2N more with activation checkpointing) FLOPs per token, plus causal attention.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from komt.errors import KomtError
from komt.model import PRESETS, Transformer, preset
from komt.model.checkpoint import random_model
from komt.model.lora import LoRAConfig, count_parameters, inject_lora
from komt.train.config import TrainConfig
from komt.train.data import Example
from komt.train.distributed import DistContext, choose_device
from komt.train.schedule import cosine_with_warmup
from komt.train.lora_weights import LoRAWeights
from komt.train.model_prep import enable_activation_checkpointing, resolve_dtype
from komt.train.sft import SFTObjective
from komt.train.trainer import train_step


def peak_memory_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # "5" resets the kernel's peak-RSS counter (VmHWM) for this process (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_memory_bytes(device: torch.device) -> int:
    """Peak since the last reset: CUDA allocator bytes, or the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def training_flops_per_token(model: Transformer, seq_len: int, grad_checkpointing: bool) -> float:
    """Matmul FLOPs per trained token: (2 forward + 2 backward [+ 2 recompute]) x weights + causal attention."""
    c = model.config
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if n != "model.embed_tokens.weight"
                        and not n.endswith("norm.weight"))
    attention = 2 * 2 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq_len / 2  # QK^T + PV, causal
    passes = 3 if grad_checkpointing else 2  # forward, backward-through-activations, [recompute]
    return passes * (2 * matmul_params + attention)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m komt.train.bench", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="smollm2-135m", choices=sorted(PRESETS), help="model shape (default: smollm2-135m)")
    p.add_argument("--layers", type=int, help="override the number of layers (to fit a small machine)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per example (default: 512)")
    p.add_argument("--batch-size", type=int, default=1, help="examples per step (default: 1)")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank, on all seven projections (default: 8)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (default: 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: 2)")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="base weights; bf16 trains under bf16 autocast on CUDA (default: bf16 on CUDA, else fp32)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    args = p.parse_args(argv)
    try:
        device = choose_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        config = TrainConfig(model="<random>", data="<random>", output="<none>", batch_size=args.batch_size,
                             lora_r=args.lora_r, lora_dropout=0.05, dtype=args.dtype, max_seq_len=args.seq_len,
                             warmup_steps=0)
    except KomtError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    model = random_model(preset(args.preset, **({"num_hidden_layers": args.layers} if args.layers else {})),
                         device, dtype)
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
        peak_memory_reset(device)
        t0 = time.perf_counter()
        train_step(model, forward, objective, weights, batch, optimizer, scheduler, config, ctx)  # syncs
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            peaks.append(peak_memory_bytes(device))
    step_s = statistics.median(times)
    tokens_per_s = B * T / step_s
    tflops = training_flops_per_token(model, T, args.grad_checkpointing) * tokens_per_s / 1e12
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"komt.train.bench on {name}, torch {torch.__version__}; {args.steps} timed steps after {args.warmup} warm-up")
    print(f"{'preset':<18}{'dtype':<10}{'B x T':<11}{'r':<4}{'trainable':>12}{'ckpt':>6}{'ms/step':>10}"
          f"{'tokens/s':>11}{'peak mem':>11}{'TFLOP/s':>9}")
    layers = f"{args.preset}" + (f"[{args.layers}L]" if args.layers else "")
    print(f"{layers:<18}{str(dtype).removeprefix('torch.'):<10}{f'{B} x {T}':<11}{args.lora_r:<4}"
          f"{trainable:>12,}{'yes' if args.grad_checkpointing else 'no':>6}{step_s * 1e3:>10.1f}"
          f"{tokens_per_s:>11,.0f}{max(peaks) / 2**30:>9.2f}GB{tflops:>9.2f}")
    print(f"(trainable {100 * trainable / total:.3f}% of {total:,} parameters; peak mem = "
          f"{'CUDA allocator max' if device.type == 'cuda' else 'process peak RSS'} over a step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

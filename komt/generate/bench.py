"""`python -m komt.generate.bench`: prefill and decode speed, time to first token and peak memory.

    python -m komt.generate.bench --preset smollm2-135m                     # CPU yardstick, fp32
    python -m komt.generate.bench --preset smollm2-135m --layout plain      # without the CPU layouts
    python -m komt.generate.bench --preset smollm2-135m --quantize int8     # int8 weights (int4: groups of 32)
    python -m komt.generate.bench --preset komt-mistral-7b --quantize int4 --prompt-len 128 --new-tokens 64
    python -m komt.generate.bench --preset tiny-mistral-32k --window 64 --new-tokens 512   # flat past W
    python -m komt.generate.bench --preset komt-mistral-7b --device cuda --dtype bf16 --cuda-graphs
    python -m komt.generate.bench --model path/to/checkpoint --prompt-len 512

A preset gets random weights built directly on the target device in the target dtype (the module is
made on the meta device, then `to_empty`, then initialised), so the 7B shape never exists twice. Decoding
is greedy with no EOS, so every run makes exactly --new-tokens tokens. Each run prints one row; "early"
and "late" are the median milliseconds per token over the first and last tenth of the decode, which stay
level when the rolling cache works (try --window smaller than --new-tokens).

Peak memory is the process's peak RSS on the CPU and `torch.cuda.max_memory_allocated` on CUDA.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Sequence

import torch

from komt.argtypes import positive_int
from komt.entry_point import run_entry_point
from komt.model.attention import KERNEL_BACKENDS
from komt.model.dtypes import DTYPE_CHOICES
from komt.model.quantized_linear import QUANTIZE_CHOICES
from komt.model.checkpoint import random_model
from komt.model.linear import is_linear
from komt.model.peak_memory import peak_memory_bytes


def _peak_memory(device: torch.device) -> str:
    return f"{peak_memory_bytes(device) / 2**20:.0f} MB ({'CUDA allocated' if device.type == 'cuda' else 'RSS'})"


def _median_ms(intervals: list[float]) -> str:
    return f"{1e3 * statistics.median(intervals):.2f}" if intervals else "-"  # "-": batches time no single token


def run_once(model, prompts: list[list[int]], new_tokens: int, compile_mode: str | None) -> dict:
    """One timed generation; returns its figures (batch 1 also times every token)."""
    from komt.generate.generation import GenerationStats, generate_batch, stream_generate

    stats = GenerationStats()
    if len(prompts) == 1:
        stamps = []
        for _ in stream_generate(model, prompts[0], max_new_tokens=new_tokens, stats=stats, compile_mode=compile_mode):
            stamps.append(time.perf_counter())
        intervals = [b - a for a, b in zip(stamps, stamps[1:])]
    else:
        generate_batch(model, prompts, max_new_tokens=new_tokens, stats=stats, compile_mode=compile_mode)
        intervals = []
    tenth = max(1, len(intervals) // 10)
    decode_tokens = stats.new_tokens - len(prompts)  # the first token of each row comes from prefill
    decode_time = (stats.end or stats.start) - (stats.first_token_at or stats.start)
    return {
        "prefill": stats.prefill_tokens_per_s,
        "ttft": stats.time_to_first_token,
        "decode": decode_tokens / max(decode_time, 1e-9),
        "early": _median_ms(intervals[:tenth]),
        "late": _median_ms(intervals[-tenth:]),
    }


def _check_against_plain(model, plain, prompt: list[int], new_tokens: int, compile_mode: str | None) -> str:
    """Greedy tokens of the benchmarked model vs the same weights with plain layers, eager, uncompiled.

    In bf16 (and for the quantized CPU kernels, which compute in bf16) a fused kernel may round differently
    and flip a near-tie, so a late mismatch on random weights is not necessarily a bug; an early one is.
    """
    from komt.generate.generation import generate

    fast = generate(model, prompt, max_new_tokens=new_tokens, compile_mode=compile_mode)
    eager = generate(plain, prompt, max_new_tokens=new_tokens)
    if fast == eager:
        return f"check: all {len(fast)} greedy tokens equal eager decoding without the split GEMV"
    first = next(i for i, (a, b) in enumerate(zip(fast, eager)) if a != b)
    return f"check: greedy tokens differ from eager decoding without the split GEMV from token {first} of {len(fast)}"


def _build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype | None, layout: str):
    """(model, description) of the benchmarked weights: a checkpoint, or a preset with random weights;
    `dtype` None keeps the checkpoint's (a preset's: its config's)."""
    from komt.model.config import preset
    from komt.model.cpu_layouts import use_cpu_layouts
    from komt.model.dtypes import parse_dtype
    from komt.model.load import choose_kernels, load_model
    from komt.model.quantized_linear import QuantizeSpec

    if args.model:
        model = load_model(args.model, device=device, dtype=dtype, kernels=args.kernels, layout=layout,
                           quantize=args.quantize, group_size=args.group_size)
        return model, f"{args.model}"
    name = args.preset or "smollm2-135m"
    overrides = {} if args.window is None else {"sliding_window": args.window}
    spec = QuantizeSpec(args.quantize, args.group_size) if args.quantize else None
    config = preset(name, **overrides)
    model = random_model(config, device, dtype or parse_dtype(config.torch_dtype), args.seed, quantize=spec)
    if layout == "auto" and device.type == "cpu":
        use_cpu_layouts(model)
    model.set_kernels(choose_kernels(device, args.kernels))
    return model, f"{name} (random weights)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m komt.generate.bench", description=__doc__.split("\n")[0])
    source = p.add_mutually_exclusive_group()
    source.add_argument("--preset", default=None, help="random weights of a named shape (default smollm2-135m)")
    source.add_argument("--model", help="a checkpoint folder or hub id instead of a preset")
    p.add_argument("--prompt-len", type=positive_int, default=32)
    p.add_argument("--new-tokens", type=positive_int, default=128)
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="auto (default): bf16 on CUDA, the checkpoint's (a preset's) dtype on the CPU")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--window", type=positive_int, help="override the preset's sliding window")
    p.add_argument("--threads", type=positive_int, help="torch.set_num_threads (default: torch's, = cores)")
    p.add_argument("--layout", choices=("auto", "plain"), default="auto",
                   help="auto: the CPU decoding layouts (komt.model.cpu_layouts); plain: the layers as loaded")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, help="quantize the linear layers (see komt.load_model)")
    p.add_argument("--group-size", type=positive_int,
                   help="quantization group size (int8 default: per channel; int4: 32)")
    p.add_argument("--kernels", choices=KERNEL_BACKENDS, help="attention/RMSNorm kernels (default: triton on CUDA)")
    compile_group = p.add_mutually_exclusive_group()
    compile_group.add_argument("--compile", action="store_true", help="torch.compile the decode step (static cache)")
    compile_group.add_argument("--cuda-graphs", action="store_true",
                               help="torch.compile mode=reduce-overhead (CUDA graphs)")
    p.add_argument("--repeat", type=positive_int, default=3, help="timed runs (after one warm-up)")
    p.add_argument("--check", action="store_true",
                   help="also generate with the same weights in plain layers, eager, and report whether the tokens agree")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_entry_point(lambda: _bench(args))


def _bench(args: argparse.Namespace) -> int:
    from komt.errors import GenerationError
    from komt.model.dtypes import resolve_dtype
    from komt.model.device import requested_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = requested_device(args.device)
    if args.cuda_graphs and device.type != "cuda":
        raise GenerationError(f"--cuda-graphs needs a CUDA device, not {device}; use --compile on the CPU")
    model, source = _build(args, device, resolve_dtype(args.dtype, device), args.layout)
    dtype = model.model.embed_tokens.weight.dtype  # what auto chose, for the header and for --check
    config = model.config
    layers = sorted({type(m).__name__ for m in model.modules() if is_linear(m)})
    compile_mode = "reduce-overhead" if args.cuda_graphs else "default" if args.compile else None
    n_params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"komt.generate.bench: {source}, {n_params / 1e6:.1f}M params ({weight_bytes / 1e6:.0f} MB), "
          f"{device} {dtype}, {torch.get_num_threads()} threads, kernels {model.kernels}"
          + f", {args.layout} layout ({', '.join(layers)})"
          + (f", compile {compile_mode}" if compile_mode else ""))
    print(f"batch {args.batch_size}, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, "
          f"window {config.sliding_window}")

    generator = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(3, config.vocab_size, (args.prompt_len,), generator=generator).tolist()
               for _ in range(args.batch_size)]
    warmup_start = time.perf_counter()
    run_once(model, prompts, min(args.new_tokens, 8), compile_mode)  # first-call costs (and compiling)
    print(f"warm-up {time.perf_counter() - warmup_start:.1f} s")
    print(f"{'run':>4} {'prefill tok/s':>14} {'first token':>12} {'decode tok/s':>13} "
          f"{'ms/tok early':>13} {'ms/tok late':>12}")
    runs = []
    for i in range(args.repeat):
        r = run_once(model, prompts, args.new_tokens, compile_mode)
        runs.append(r)
        print(f"{i + 1:>4} {r['prefill']:>14.1f} {r['ttft']:>10.3f} s {r['decode']:>13.1f} "
              f"{r['early']:>13} {r['late']:>12}")
    if args.check and args.batch_size == 1:
        plain, _ = _build(args, device, dtype, "plain")
        print(_check_against_plain(model, plain, prompts[0], args.new_tokens, compile_mode))
    decode = sorted(r["decode"] for r in runs)
    gbps = weight_bytes * decode[-1] * (1 if args.batch_size == 1 else 1 / args.batch_size) / 1e9
    print(f"decode tok/s: best {decode[-1]:.1f}, median {statistics.median(decode):.1f} "
          f"(best streams weights at {gbps:.1f} GB/s); peak memory {_peak_memory(device)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

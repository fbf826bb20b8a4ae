"""komt's decode speed and peak memory on the komt-mistral-7b shape, bf16 against int8 and int4, on the CPU.

komt only (no baseline library), so any python with komt's dependencies runs it, from the repository root:

    PYTHONPATH=. python baselines/decode_7b_quantized.py [--configs bf16,int8,int4] [--threads 2]

Random weights of the preset (what `python -m komt.generate.bench --preset komt-mistral-7b` builds): bf16 (the
baseline: dense bf16 layers), int8 (per channel) and int4 (groups of 32; int4-g64 / int4-g128: of 64 / 128),
the quantized ones with bf16 embeddings; each built straight in its final form (a layer at a time) and given the CPU layouts, as
`komt.load_model` would. Each configuration runs in a fresh process, which reports
- decode tok/s = (N2 - N1) / (t(N2) - t(N1)) over two greedy runs of N1 and N2 new tokens (no EOS) after the
  same random prompt, per round (the prefill and first token cancel);
- its peak RSS (komt.model.peak_memory's VmHWM: building, quantizing, the layout pass and decoding
  included), and the RSS once built.
A configuration is skipped when the machine has less memory available than it needs (bf16: ~15 GB).

Targets (issue 13): int4 >= 4 tok/s at peak RSS <= 5 GB; int8 >= 2.2 tok/s (bf16 measured 1.2 tok/s, 14.2 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# the weights, the layout pass's transients, a margin; int4-gN: int4 in groups of N (64, 128) instead of 32
NEEDS_GB = {"bf16": 15.5, "int8": 8.5, "int4": 6.0, "int4-g64": 5.5, "int4-g128": 5.5}
_INT4_TARGET = "decode >= 4 tok/s at peak RSS <= 5 GB"
TARGETS = {"int4": _INT4_TARGET, "int4-g64": _INT4_TARGET, "int4-g128": _INT4_TARGET, "int8": "decode >= 2.2 tok/s",
           "bf16": "the baseline"}


def _peak_rss_gb() -> float:
    import torch

    from komt.model.peak_memory import peak_memory_bytes

    return peak_memory_bytes(torch.device("cpu")) / 2**30  # (GiB, as the recorded figures)


def worker(args) -> None:
    """One configuration in this (fresh) process; prints one JSON line."""
    import torch

    from komt.generate.generation import generate
    from komt.model.checkpoint import random_model
    from komt.model.config import preset
    from komt.model.cpu_layouts import use_cpu_layouts
    from komt.model.linear import is_linear
    from komt.model.quantized_linear import QuantizeSpec

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    method, _, group = args.worker.partition("-g")
    spec = None if method == "bf16" else QuantizeSpec(method, int(group) if group else None)
    model = random_model(preset("komt-mistral-7b"), torch.device("cpu"), torch.bfloat16, 0, quantize=spec)
    use_cpu_layouts(model)
    model.set_kernels("torch")
    build_s, built_gb = time.perf_counter() - start, _peak_rss_gb()
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, model.config.vocab_size, (args.prompt_len,), generator=generator).tolist()

    def timed(n: int) -> float:
        t = time.perf_counter()
        generate(model, prompt, max_new_tokens=n, eos_id=None)
        return time.perf_counter() - t

    timed(2)  # first-call costs
    rates = []
    for _ in range(args.rounds):
        t1, t2 = timed(args.n1), timed(args.n2)
        rates.append((args.n2 - args.n1) / (t2 - t1) if t2 > t1 else float("nan"))
    layers = sorted({type(m).__name__ for m in model.modules() if is_linear(m)})
    print(json.dumps({"config": args.worker, "rates": rates, "build_s": build_s, "built_gb": built_gb,
                      "peak_gb": _peak_rss_gb(), "layers": layers, "load_average": os.getloadavg()[0]}))


def _available_gb() -> float:
    import torch

    from komt.serve.budget import available_bytes

    return available_bytes(torch.device("cpu")) / 2**30


def _median(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="bf16,int8,int4", help="comma-separated: bf16, int8, int4, int4-g64, int4-g128")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--n1", type=int, default=8)
    p.add_argument("--n2", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--worker", choices=sorted(NEEDS_GB), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    if args.n2 <= args.n1:
        raise SystemExit("error: --n2 must be larger than --n1")
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in NEEDS_GB]
    if unknown:
        raise SystemExit(f"error: --configs: unknown configuration {unknown[0]!r}; use {', '.join(NEEDS_GB)}")
    print(f"komt-mistral-7b shape, random weights, CPU ({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}), {args.threads} threads, prompt {args.prompt_len} random ids, "
          f"N1 {args.n1}, N2 {args.n2}, {args.rounds} rounds; one fresh process per configuration")
    medians = {}
    for config in configs:
        if _available_gb() < NEEDS_GB[config]:
            print(f"  {config}: skipped, {_available_gb():.1f} GB available, needs ~{NEEDS_GB[config]} GB")
            continue
        cmd = [sys.executable, __file__, "--worker", config] + [
            f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("threads", "prompt_len", "n1", "n2", "rounds")]
        done = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            print(f"  {config}: the worker failed (exit {done.returncode}): {done.stderr.strip()[-400:]}")
            continue
        r = json.loads(lines[-1])
        medians[config] = _median(r["rates"])
        print(f"  {config:9} decode {medians[config]:.2f} tok/s (rounds {', '.join(f'{x:.2f}' for x in r['rates'])}); "
              f"peak RSS {r['peak_gb']:.2f} GB (built: {r['built_gb']:.2f} GB in {r['build_s']:.0f} s); "
              f"layers {', '.join(r['layers'])}; load average {r['load_average']:.2f}; target: {TARGETS[config]}",
              flush=True)
    for config in medians:
        if config != "bf16" and "bf16" in medians:
            print(f"  {config} / bf16 decode: {medians[config] / medians['bf16']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

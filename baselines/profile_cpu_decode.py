"""Where a komt decode step spends its time on the CPU: a torch.profiler table of SmolLM2-135M decode steps.

komt only, from the repository root (any python with komt's dependencies):

    PYTHONPATH=. python baselines/profile_cpu_decode.py [--quantize int8|int4|none] [--model DIR_OR_GGUF] [--steps 16]

Loads the real SmolLM2-135M (the HF folder, or --model: e.g. a Q8_0 GGUF) as komt.load_model does (CPU
layouts on), prefills the same 128-token prompt as baselines/decode_vs_llamacpp.py, runs a few warm-up decode
steps, then profiles --steps eager decode steps (komt.generate.generation.decode_step, greedy) and prints the
ops by self CPU time: the products (aten::_weight_int8pack_mm, _weight_int4pack_mm_for_cpu, komt's GEMV
blocks) against everything else (norms, RoPE, attention, casts, the cache write). Times are totals over
the steps; divide by --steps for one step.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="/work/dl/smollm2-hf", help="HF folder or GGUF file")
    p.add_argument("--tokenizer", default="/work/dl/smollm2-hf", help="for the prompt")
    p.add_argument("--quantize", choices=("int8", "int4", "none"), default="int8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--rows", type=int, default=25, help="rows of the table")
    args = p.parse_args()
    sys.path.insert(0, str(HERE))

    import torch
    from torch.profiler import ProfilerActivity, profile

    import komt
    from heldout import apache_license
    from komt.generate.generation import decode_step, new_cache, prefill
    from komt.model.linear import is_linear

    torch.set_num_threads(args.threads)
    model = komt.load_model(args.model, quantize=None if args.quantize == "none" else args.quantize)
    tokenizer = komt.load_tokenizer(args.tokenizer)
    prompt = tokenizer.encode(apache_license().read_text(encoding="utf-8"), bos=False)[: args.prompt_len]
    cache = new_cache(model, 1, len(prompt), 2 * args.steps + 8)  # warm-up, timed and profiled steps
    token = prefill(model, cache, torch.tensor([prompt])).argmax(-1)  # (1,)
    position = len(prompt)

    def step():
        nonlocal token, position
        token = decode_step(model, cache, token, torch.tensor([position])).argmax(-1)
        position += 1

    for _ in range(4):  # warm-up
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    unprofiled = (time.perf_counter() - start) / args.steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    layers = ", ".join(sorted({type(m).__name__ for m in model.modules() if is_linear(m)}))
    print(f"{args.model} quantize={args.quantize} (layers {layers}), {args.steps} decode steps after a "
          f"{len(prompt)}-token prompt, {args.threads} threads, load average {os.getloadavg()[0]:.2f}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}; {1e3 * unprofiled:.2f} ms a step without the profiler")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Decode speed of komt against llama.cpp, side by side in one process, on the real SmolLM2-135M weights.

Baseline only (imports llama-cpp-python, never a komt dependency). Run in a venv with komt's dependencies
and llama-cpp-python (baselines/README.md), from the repository root:

    PYTHONPATH=. /work/venv-both/bin/python baselines/decode_vs_llamacpp.py [--compile] [--rounds 5]
    PYTHONPATH=. /work/venv-both/bin/python baselines/decode_vs_llamacpp.py --only "komt int8,llama.cpp Q8_0"

Every system decodes the same 128-token prompt (the start of the Apache License 2.0 text, tokenized by
komt), greedy, batch 1, no EOS stop, --threads (2) threads each:
  komt fp32 (the HF folder), komt int8 / int4 (quantize= while loading), komt on the Q8_0 / Q4_0 GGUF files
  (kept quantized as stored), and with --compile the same under torch.compile (compile_mode "default");
  llama.cpp on the F32 / Q8_0 / Q4_0 GGUF files (baselines/smollm2_ggufs.py: the same weights; komt's Q8_0 /
  Q4_0 bytes equal llama-quantize's), with the fastest kernels that run on this VM (llamacpp_inproc.py).
Decode tok/s = (N2 - N1) / (t(N2) - t(N1)) for two runs of N1 and N2 new tokens: the prompt's prefill, the
first token and any per-run set-up cancel. One round times every system once, in an order rotated each
round, so that machine noise hits all alike; the table gives the median over rounds, and each ratio is the
median of the per-round ratios (a slow moment hits both sides of a ratio taken in the same round). Greedy
tokens are compared where the weights are the same (komt vs llama.cpp on one file) and against komt fp32;
at the first difference the script shows how close komt's two candidates were (0.000: an exact tie).

--omp-wait-policy sets OMP_WAIT_POLICY for both (one OpenMP runtime, torch's libgomp, serves torch and
llama.cpp in this process): unset (the default, the runtime's spin-then-sleep) is right on a quiet machine;
on a busy one spinning workers starve the other processes' threads and their own (llama.cpp at 2 threads
fell to ~4 tok/s on the loaded 2-core VM; `passive` gave it ~40).

The komt-mistral-7b shape (komt alone, random weights): baselines/decode_7b_quantized.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
DEFAULT_HF = "/work/dl/smollm2-hf"
DEFAULT_GGUF_DIR = "/tmp/komt-smollm2-gguf"

# (numerator, denominator, target ratio or None): the targets, and the ratios that explain them.
RATIOS = [
    ("komt int8", "llama.cpp Q8_0", 0.8),
    ("komt int4", "llama.cpp Q4_0", 0.8),
    ("komt int8", "komt fp32", 3.0),
    ("komt Q8_0 GGUF", "llama.cpp Q8_0", None),
    ("komt Q4_0 GGUF", "llama.cpp Q4_0", None),
    ("komt fp32", "llama.cpp F32", None),
    ("komt int4", "komt fp32", None),
]
# Greedy-token comparisons: (a, b, why they should agree).
AGREEMENT = [
    ("komt fp32", "llama.cpp F32", "same fp32 weights"),
    ("komt Q8_0 GGUF", "llama.cpp Q8_0", "same Q8_0 bytes; llama.cpp rounds activations to 8 bits, komt to bf16"),
    ("komt Q4_0 GGUF", "llama.cpp Q4_0", "same Q4_0 bytes; activations as above"),
    ("komt int8", "komt fp32", "komt's int8 quantizer (per channel)"),
    ("komt int4", "komt fp32", "komt's int4 quantizer (groups of 32, scale + offset)"),
]


@dataclass
class System:
    """One thing that decodes: `run(prompt, n)` returns n greedy ids."""

    label: str
    run: Callable[[list[int], int], list[int]]
    description: str
    rates: list[float] = field(default_factory=list)  # decode tok/s per round
    ids: list[int] = field(default_factory=list)  # the N2 run's ids (last round)
    last_logits: Callable[[list[int]], list[float]] | None = None  # komt: next-token logits of a sequence


def decode_rate(system: System, prompt: list[int], n1: int, n2: int) -> float:
    """(n2 - n1) / (t(n2) - t(n1)): decode tok/s with the prefill and per-run costs cancelled."""
    start = time.perf_counter()
    system.run(prompt, n1)
    t1 = time.perf_counter() - start
    start = time.perf_counter()
    system.ids = system.run(prompt, n2)
    t2 = time.perf_counter() - start
    return (n2 - n1) / (t2 - t1) if t2 > t1 else float("nan")


def _layer_kinds(model) -> str:
    from komt.model.linear import is_linear

    return ", ".join(sorted({type(m).__name__ for m in model.modules() if is_linear(m)}))


def komt_systems(args, ggufs: dict) -> list[System]:
    import torch

    import komt
    from komt.generate.generation import generate

    loaders = [
        ("komt fp32", lambda: komt.load_model(args.hf)),
        ("komt int8", lambda: komt.load_model(args.hf, quantize="int8")),
        ("komt int4", lambda: komt.load_model(args.hf, quantize="int4")),
        ("komt Q8_0 GGUF", lambda: komt.load_model(ggufs["q8_0"])),
        ("komt Q4_0 GGUF", lambda: komt.load_model(ggufs["q4_0"])),
    ]
    systems = []
    for label, load in loaders:
        if not _wanted(label, args):
            continue
        model = load()
        kinds = _layer_kinds(model)
        modes = [None] + (["default"] if args.compile else [])
        for mode in modes:
            def run(prompt, n, model=model, mode=mode):
                return generate(model, prompt, max_new_tokens=n, eos_id=None, compile_mode=mode)

            @torch.inference_mode()
            def last_logits(ids, model=model):
                return model(torch.tensor([ids]))[0, -1].float().tolist()

            name = label + (" compiled" if mode else "")
            systems.append(System(name, run, f"{kinds}; {torch.get_num_threads()} threads"
                                  + (", torch.compile default" if mode else ", eager"), last_logits=last_logits))
    return systems


def llama_systems(args, ggufs: dict) -> list[System]:
    import llamacpp_inproc

    files = [("llama.cpp F32", "f32", "auto"), ("llama.cpp Q8_0", "q8_0", "auto"), ("llama.cpp Q4_0", "q4_0", "auto")]
    if args.llama_plain_q4:
        files.append(("llama.cpp Q4_0 plain", "q4_0", "plain"))
    systems = []
    for label, t, kernels in files:
        if not _wanted(label, args):
            continue
        model = llamacpp_inproc.load(str(ggufs[t]), threads=args.threads, n_ctx=args.prompt_len + args.n2 + 8,
                                     kernels=kernels, kv_type=args.kv_type, flash_attn=args.flash_attn)
        systems.append(System(label, model.greedy, model.description))
    return systems


def _wanted(label: str, args) -> bool:
    return not args.only or any(label == s.strip() for s in args.only.split(","))


def _interleave(komt_side: list[System], llama_side: list[System]) -> list[System]:
    """komt, llama.cpp, komt, ...: neighbours in time are the systems compared."""
    order, rest = [], list(llama_side)
    for s in komt_side:
        order.append(s)
        if rest and not s.label.endswith("compiled"):
            order.append(rest.pop(0))
    return order + rest


def prompt_ids(args) -> tuple[list[int], str]:
    import komt
    from heldout import apache_license

    source = apache_license()
    tokenizer = komt.load_tokenizer(args.hf)
    ids = tokenizer.encode(source.read_text(encoding="utf-8"), bos=False)[: args.prompt_len]
    if len(ids) < args.prompt_len:
        raise SystemExit(f"error: {source} gives only {len(ids)} tokens; use --prompt-len {len(ids)} or less")
    return ids, f"the first {len(ids)} tokens of {source} (komt's tokenizer of {args.hf})"


def _median(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def _agreement(a: System, b: System, prompt: list[int]) -> str:
    """How far two systems' greedy ids agree; at the first difference, how close a tie it was for `a`."""
    n = min(len(a.ids), len(b.ids))
    first = next((i for i in range(n) if a.ids[i] != b.ids[i]), n)
    if first == n:
        return f"all {n} tokens equal"
    note = ""
    if a.last_logits is not None:  # a's logits after the common prefix (one full forward): its choice vs b's
        logits = a.last_logits(prompt + a.ids[:first])
        note = (f"; there {a.label}'s logit for its token exceeds that for {b.label}'s by "
                f"{logits[a.ids[first]] - logits[b.ids[first]]:.3f} (full forward)")
    return f"first {first} of {n} tokens equal{note}"


def run_smollm2(args) -> None:
    import torch

    from smollm2_ggufs import make_ggufs

    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64  # one compiled step per model object (and cache bucket)
    ggufs = make_ggufs(args.hf, args.gguf_dir, log=lambda m: print(f"  {m}"))
    prompt, prompt_source = prompt_ids(args)
    systems = _interleave(komt_systems(args, ggufs), llama_systems(args, ggufs))
    print(f"SmolLM2-135M-Instruct, real weights; prompt: {prompt_source}; N1 {args.n1}, N2 {args.n2} new tokens, "
          f"greedy, batch 1, {args.rounds} rounds")
    for s in systems:
        print(f"  {s.label:24} {s.description}")
    start = time.perf_counter()
    for s in systems:  # warm-up: first-call costs, torch.compile, llama.cpp's first graph
        s.run(prompt, args.n1)
    print(f"warm-up {time.perf_counter() - start:.1f} s; load average {os.getloadavg()[0]:.2f}")
    for r in range(args.rounds):
        k = r % len(systems)
        for s in systems[k:] + systems[:k]:
            s.rates.append(decode_rate(s, prompt, args.n1, args.n2))
        print(f"round {r + 1}: " + ", ".join(f"{s.label} {s.rates[-1]:.1f}" for s in systems)
              + f" tok/s (load average {os.getloadavg()[0]:.2f})", flush=True)
    by_label = {s.label: s for s in systems}
    print(f"\n{'system':26} {'decode tok/s median':>20} {'(min-max)':>16} {'ms/token':>9}")
    for s in systems:
        med, ok = _median(s.rates), [x for x in s.rates if x == x] or [float("nan")]
        print(f"{s.label:26} {med:>20.1f} {f'({min(ok):.1f}-{max(ok):.1f})':>16} {1e3 / med:>9.2f}")
    print("\nratios (median of per-round ratios; target where the issue sets one)")
    compiled = [(f"{a} compiled", f"{b} compiled" if b.startswith("komt") else b, t) for a, b, t in RATIOS]
    pairs = list(RATIOS) + compiled
    for a, b, target in pairs:
        if a in by_label and b in by_label:
            ratio = _median([x / y for x, y in zip(by_label[a].rates, by_label[b].rates)])
            verdict = "" if target is None else f"  target >= {target}: {'met' if ratio >= target else 'MISSED'}"
            print(f"  {a} / {b}: {ratio:.2f}{verdict}")
    print(f"\ngreedy tokens ({args.n2} new tokens after the prompt)")
    checks = list(AGREEMENT) + [(f"{s.label}", s.label[: -len(' compiled')], "compiled vs eager")
                                for s in systems if s.label.endswith("compiled")]
    for a, b, why in checks:
        if a in by_label and b in by_label:
            print(f"  {a} vs {b} ({why}): {_agreement(by_label[a], by_label[b], prompt)}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", default=DEFAULT_HF, help="the real SmolLM2-135M-Instruct HF folder (fp32)")
    p.add_argument("--gguf-dir", default=DEFAULT_GGUF_DIR, help="where the F32/Q8_0/Q4_0 GGUF files are (made if missing)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--n1", type=int, default=32, help="new tokens of the short run")
    p.add_argument("--n2", type=int, default=128, help="new tokens of the long run (prompt + N2 <= 256: one static-cache size)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also komt with compile_mode='default'")
    p.add_argument("--only", help="comma-separated system labels to run (default: all)")
    p.add_argument("--kv-type", choices=("f16", "f32"), default="f16", help="llama.cpp's KV cache (its default: f16)")
    p.add_argument("--flash-attn", action="store_true", help="llama.cpp flash attention (llama-cpp-python's default: off)")
    p.add_argument("--llama-plain-q4", action="store_true", help="also llama.cpp Q4_0 without the repacked kernels")
    p.add_argument("--omp-wait-policy", choices=("unset", "passive", "active"), default="unset",
                   help="OMP_WAIT_POLICY for torch and llama.cpp (module docstring)")
    return p


def main() -> int:
    args = build_parser().parse_args()
    if args.n2 <= args.n1:
        raise SystemExit("error: --n2 must be larger than --n1")
    if args.omp_wait_policy != "unset":
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy  # before torch / llama.cpp load OpenMP
    sys.path.insert(0, str(HERE))  # llamacpp_inproc, smollm2_ggufs, heldout
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; OMP_WAIT_POLICY "
          f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}; {time.strftime('%Y-%m-%d %H:%M')}")
    run_smollm2(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

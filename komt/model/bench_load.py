"""Benchmark: load a synthetic checkpoint of a named shape; print load time and peak RSS.

    python -m komt.model.bench_load --preset komt-mistral-7b --dir /tmp/komt-7b [--format safetensors|bin]

Writes (once; reused if present) a random checkpoint of the preset's shape in Hugging Face layout,
sharded at --shard-gb like transformers does, then loads it with `komt.load_model` in a fresh child
process and reports the child's wall time and peak resident memory (VmHWM). The point: a 14.5 GB bf16
checkpoint loads on a 24 GiB machine with peak RSS close to 14.5 GB, because weights go from a memory
map into the model without a second copy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from komt.argtypes import number
from komt.atomic import write_json_atomic
from komt.model.checkpoint import build_empty_model
from komt.model.checkpoint_writer import shard_file_name, split_into_shards
from komt.model.config import PRESETS, preset
from komt.model.dtypes import DTYPE_CHOICES, DTYPE_FLAGS, parse_dtype, resolve_dtype
from komt.model.peak_memory import peak_memory_bytes
from komt.model.safetensors_file import write_safetensors


def write_synthetic_checkpoint(folder: Path, preset_name: str, dtype: torch.dtype, shard_gb: float, fmt: str) -> None:
    """Random weights of the preset's shape, written shard by shard so memory stays at one shard."""
    config = preset(preset_name, torch_dtype=str(dtype).replace("torch.", ""))
    folder.mkdir(parents=True, exist_ok=True)
    meta = list(build_empty_model(config).to(dtype).named_parameters())  # shapes and dtypes, no memory
    groups = split_into_shards(meta, int(shard_gb * 1e9))
    stem, suffix = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    weight_map = {}
    for k, group in enumerate(groups, start=1):
        filename = shard_file_name(k, len(groups), stem, suffix)
        tensors = [(name, torch.empty(p.shape, dtype=dtype).normal_(std=0.02)) for name, p in group]
        if fmt == "safetensors":
            write_safetensors(folder / filename, tensors)
        else:
            torch.save(dict(tensors), folder / filename)
        weight_map.update({name: filename for name, _ in group})
        print(f"  wrote {filename}", file=sys.stderr)
        del tensors
    write_json_atomic(folder / f"{stem}.{suffix}.index.json", {"metadata": {}, "weight_map": weight_map})
    write_json_atomic(folder / "config.json", config.to_hf_dict())


def _load_in_this_process(folder: str, dtype: str, touch: bool) -> None:
    """Child side: load (and with `touch` read every weight once, as a first forward pass would),
    then print JSON with the wall time and VmHWM (peak RSS)."""
    import komt

    start = time.perf_counter()
    model = komt.load_model(folder, dtype=resolve_dtype(dtype, torch.device("cpu")))
    if touch:  # zero-copy weights are paged in from the map only when read
        for p in model.parameters():
            p.float().sum() if p.numel() < 2**27 else sum(chunk.float().sum() for chunk in p.split(4096))
    seconds = time.perf_counter() - start
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = peak_memory_bytes(torch.device("cpu"))
    print(json.dumps({"seconds": seconds, "peak_rss_gb": peak / 1e9, "weights_gb": params / 1e9}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m komt.model.bench_load", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="komt-mistral-7b", choices=sorted(PRESETS))
    parser.add_argument("--dir", required=True, help="where the synthetic checkpoint is written (reused)")
    parser.add_argument("--dtype", choices=DTYPE_FLAGS, default="bf16", help="the checkpoint's dtype (default bf16)")
    parser.add_argument("--load-dtype", choices=DTYPE_CHOICES, default="auto",
                        help="dtype to load as; auto (default): the checkpoint's (loading is on the CPU)")
    parser.add_argument("--format", default="safetensors", choices=["safetensors", "bin"])
    parser.add_argument("--shard-gb", type=number(0, low_open=True), default=5.0)
    parser.add_argument("--touch", action="store_true",
                        help="read every weight after loading (pages a memory-mapped checkpoint in)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _load_in_this_process(args.dir, args.load_dtype, args.touch)
        return 0
    folder = Path(args.dir)
    if not (folder / "config.json").exists():
        print(f"writing a synthetic {args.preset} checkpoint to {folder} ...", file=sys.stderr)
        write_synthetic_checkpoint(folder, args.preset, parse_dtype(args.dtype), args.shard_gb, args.format)
    size_gb = sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")) / 1e9
    cmd = [sys.executable, "-m", "komt.model.bench_load", "--dir", str(folder), "--child"]
    cmd += ["--load-dtype", args.load_dtype]
    if args.touch:
        cmd.append("--touch")
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        print(run.stderr.strip().splitlines()[-1] if run.stderr.strip() else "load failed", file=sys.stderr)
        return 1
    result = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"checkpoint      {folder} ({args.format}, {size_gb:.2f} GB on disk)")
    print(f"weights loaded  {result['weights_gb']:.2f} GB")
    print(f"load time       {result['seconds']:.2f} s" + (" (including reading every weight)" if args.touch else ""))
    print(f"peak RSS        {result['peak_rss_gb']:.2f} GB ({result['peak_rss_gb'] / result['weights_gb']:.2f}x the weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

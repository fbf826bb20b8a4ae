"""`python -m komt.export gguf SRC OUT.gguf --type f16|bf16|q8_0|q4_0|f32 [--adapter DIR]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from komt.entry_point import run_entry_point
from komt.errors import KomtError
from komt.export.gguf_adapter import ADAPTER_TYPES, export_adapter_gguf
from komt.export.gguf_model import EXPORT_TYPES, export_gguf
from komt.interrupts import raise_on_interrupt

DESCRIPTION = """\
Write a checkpoint as a GGUF file that llama.cpp (llama-cli, llama-server, llama-cpp-python) loads.

SRC is a Hugging Face-format Llama/Mistral folder (config.json + safetensors or .bin weights, and its
sentencepiece tokenizer.model unless --tokenizer names one). Norms stay F32; every other weight takes
--type, as llama.cpp's convert_hf_to_gguf.py does (q4_0 as llama-quantize does, with output.weight in
Q8_0); rows that do not split into 32-element blocks fall back to F16.

With --adapter DIR, OUT is instead the LoRA adapter in DIR (komt's or PEFT's) in llama.cpp's LoRA GGUF
format, for `llama-server -m base.gguf --lora OUT.gguf`; SRC is then the adapter's base checkpoint
(only its config.json is read) and --type is f32 (default), f16, bf16 or q8_0.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m komt.export", description="Export komt checkpoints.")
    formats = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    gguf = formats.add_parser("gguf", help="llama.cpp's GGUF (a model, or a LoRA adapter with --adapter)",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    gguf.add_argument("src", metavar="SRC", help="checkpoint folder (with --adapter: the base model's folder)")
    gguf.add_argument("out", metavar="OUT.gguf", help="file to write (atomically: all of it or nothing)")
    gguf.add_argument("--type", choices=sorted(EXPORT_TYPES), default=None,
                      help="tensor type: f16 (default for models), f32 (default for adapters), bf16, q8_0, q4_0")
    gguf.add_argument("--adapter", metavar="DIR", help="export this LoRA adapter folder instead of the model")
    gguf.add_argument("--tokenizer", metavar="FILE", help="sentencepiece tokenizer.model (default: SRC's)")
    gguf.add_argument("--name", help="general.name to record (default: the folder's name)")
    return parser


def export(args: argparse.Namespace) -> int:
    """Write the GGUF file `args` asks for and say what it holds."""
    out = Path(args.out)
    if out.is_dir() or not out.parent.is_dir():
        raise KomtError(f"{out}: the output must be a file in an existing folder")
    if args.adapter is not None:
        export_type = args.type or "f32"
        if export_type not in ADAPTER_TYPES:
            raise KomtError(f"--type {export_type} is not available for adapters; use {', '.join(ADAPTER_TYPES)}")
        written = export_adapter_gguf(args.src, args.adapter, out, export_type, name=args.name)
    else:
        written = export_gguf(args.src, out, args.type or "f16", tokenizer=args.tokenizer, name=args.name)
    counts: dict[str, int] = {}
    for _, type_name in written:
        counts[type_name] = counts.get(type_name, 0) + 1
    summary = ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))
    print(f"wrote {out} ({len(written)} tensors: {summary})", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    raise_on_interrupt()  # imported: a Ctrl-C must reach the atomic writer's cleanup
    return run_entry_point(lambda: export(args))

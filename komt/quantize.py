"""`python -m komt.quantize SRC DST --bits 8|4`: write a quantized copy of a checkpoint that loads directly.

    python -m komt.quantize ./komt-mistral-7b-v1 ./komt-mistral-7b-v1-int4 --bits 4
    python -m komt.quantize ./model ./model-int8 --bits 8 --group-size 128

The linear layers are quantized while the source is read (tensor by tensor from the memory map, so memory
stays near the quantized size), then written as safetensors in komt's canonical int8/int4 form with a
`quantization_config` in config.json; the tokenizer files are copied. `komt.load_model(DST)` (and every
komt command's `--model DST`) loads it quantized, with no `--quantize` flag. DST is written atomically:
complete or absent. Bad input is one `error: ...` line and exit status 2; Ctrl-C is 130 (while torch is
imported, at once: komt.interrupts).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from komt.argtypes import positive_int
from komt.entry_point import run_entry_point
from komt.interrupts import exit_on_interrupt, raise_on_interrupt


def quantize_checkpoint(source: str | os.PathLike, output: str | os.PathLike, bits: int,
                        group_size: int | None = None, max_shard_bytes: int | None = None) -> Path:
    """Write `source` with its linear layers quantized to `bits` (8 or 4) as a checkpoint folder `output`
    (in safetensors shards of at most `max_shard_bytes`, by default Hugging Face's 5 GiB)."""
    # Imported here, not at the top: `python -m komt.quantize` catches a Ctrl-C during torch's import.
    from komt.model.checkpoint_writer import (MAX_SHARD_BYTES, check_new_output, write_checkpoint,
                                              write_folder_atomically)
    from komt.model.hub import resolve_model_path
    from komt.model.load import load_model

    max_shard_bytes = MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes
    output = Path(output)
    check_new_output(output, "DST")
    folder = Path(resolve_model_path(source))
    method = {8: "int8", 4: "int4"}[bits]
    model = load_model(folder, device="cpu", quantize=method, group_size=group_size, layout="plain")
    return write_folder_atomically(output, lambda tmp: write_checkpoint(model, tmp, max_shard_bytes), copy_from=folder)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m komt.quantize", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", metavar="SRC", help="checkpoint folder or Hugging Face id")
    parser.add_argument("output", metavar="DST", help="new folder for the quantized checkpoint (must not exist)")
    parser.add_argument("--bits", type=int, choices=(8, 4), required=True,
                        help="8: int8 (per channel by default); 4: int4 with a scale and offset per group")
    parser.add_argument("--group-size", type=positive_int, metavar="G",
                        help="int8: groups of G inputs instead of per channel; int4: 32 (default), 64 or 128")
    parser.add_argument("--max-shard-size", type=positive_int, metavar="BYTES",
                        help="split weights into safetensors shards of at most this size (default 5 GiB)")
    return parser


def quantize(args: argparse.Namespace) -> int:
    out = quantize_checkpoint(args.source, args.output, args.bits, args.group_size, args.max_shard_size)
    print(f"komt.quantize: wrote {out} ({args.bits}-bit)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import komt.model.load  # noqa: F401  (torch: the slow import, still under exit_on_interrupt as a script)

    raise_on_interrupt()  # from here a Ctrl-C must reach the folder writer's cleanup
    return run_entry_point(lambda: quantize(args))


if __name__ == "__main__":
    exit_on_interrupt()  # before main's imports (komt.interrupts)
    sys.exit(main())

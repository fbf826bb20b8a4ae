"""`python -m komt.convert DIR`: write safetensors shards beside a checkpoint's PyTorch `.bin` shards."""

from __future__ import annotations

import argparse
import sys

from komt.entry_point import run_entry_point
from komt.interrupts import exit_on_interrupt, raise_on_interrupt


def main(argv: list[str] | None = None) -> int:
    """Errors are one `error: ...` line and exit status 2, like the other entry points; Ctrl-C is 130."""
    parser = argparse.ArgumentParser(
        prog="python -m komt.convert",
        description="Convert a Hugging Face checkpoint's pytorch_model*.bin shards to safetensors "
        "(model-0000k-of-0000n.safetensors + index) in the same folder. The .bin files are left untouched; "
        "temp files left by a conversion that was killed are removed.",
    )
    parser.add_argument("folder", help="checkpoint folder holding pytorch_model.bin or its shards + index")
    exit_on_interrupt()  # until torch is imported (komt.interrupts)
    args = parser.parse_args(argv)
    from komt.model.convert import convert_to_safetensors

    def convert() -> int:
        convert_to_safetensors(args.folder, log=lambda line: print(line, file=sys.stderr))
        return 0

    raise_on_interrupt()  # writing: a Ctrl-C must reach atomic_file's cleanup
    return run_entry_point(convert)


if __name__ == "__main__":
    sys.exit(main())

"""`python -m komt.convert DIR`: write safetensors shards beside a checkpoint's PyTorch `.bin` shards."""

from __future__ import annotations

import argparse
import sys

from komt.errors import KomtError
from komt.model.convert import convert_to_safetensors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m komt.convert",
        description="Convert a Hugging Face checkpoint's pytorch_model*.bin shards to safetensors "
        "(model-0000k-of-0000n.safetensors + index) in the same folder. The .bin files are left untouched.",
    )
    parser.add_argument("folder", help="checkpoint folder holding pytorch_model.bin or its shards + index")
    args = parser.parse_args(argv)
    try:
        convert_to_safetensors(args.folder, log=lambda line: print(line, file=sys.stderr))
    except KomtError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

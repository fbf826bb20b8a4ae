# Baseline only (never a dependency of komt): run in the llama-cpp-python venv, e.g.
#   /work/venv-llama/bin/python baselines/llamacpp_quantize.py model-f32.gguf model-q4_0.gguf --type q4_0
# What `llama-quantize IN OUT Q4_0` does, through llama-cpp-python's binding of llama_model_quantize:
# the reference for the bytes komt's exporter writes.
import argparse
import ctypes
import sys

import llama_cpp

FTYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "bf16": 32}  # llama_ftype


def main() -> int:
    parser = argparse.ArgumentParser(description="llama.cpp's llama_model_quantize on a GGUF file")
    parser.add_argument("src")
    parser.add_argument("out")
    parser.add_argument("--type", choices=sorted(FTYPES), required=True)
    args = parser.parse_args()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[args.type]
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(args.src.encode(), args.out.encode(), ctypes.byref(params))
    print(f"{args.src} -> {args.out} ({args.type}): return code {rc}", file=sys.stderr)
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

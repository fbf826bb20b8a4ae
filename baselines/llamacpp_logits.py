# Baseline only (never a dependency of komt): run in the llama-cpp-python venv, e.g.
#   /work/venv-llama/bin/python baselines/llamacpp_logits.py model.gguf --ids 1,2,3 --out logits.npy [--lora a.gguf]
# Loads a GGUF with llama.cpp (via llama-cpp-python), evaluates the given token ids in one batch (no BOS
# added: the ids are used as given) and saves the logits of every position, float32 [T, vocab], as .npy.
import argparse
import sys

import llama_cpp.llama as llama_module
import numpy as np
from llama_cpp import Llama

GGML_TYPE_F32 = 0  # an fp32 KV cache (llama.cpp's default is fp16), so only the weights' precision differs


def _without_extra_buffer_types() -> None:
    """llama_decode segfaults on this VM when llama.cpp repacks weights into its extra CPU buffer types
    (AMX / REPACK; the CPU reports AMX), so load weights as the file has them (use_extra_bufts = false):
    llama.cpp then runs its plain ggml CPU kernels for each type (slower, same block formats)."""
    default = llama_module.llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    llama_module.llama_cpp.llama_model_default_params = params


def main() -> int:
    parser = argparse.ArgumentParser(description="llama.cpp logits of given token ids, saved as .npy")
    parser.add_argument("gguf")
    parser.add_argument("--ids", required=True, help="comma-separated token ids")
    parser.add_argument("--out", required=True, help="output .npy file, float32 [T, vocab]")
    parser.add_argument("--lora", help="a LoRA adapter GGUF applied at scale 1")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    _without_extra_buffer_types()
    ids = [int(x) for x in args.ids.split(",") if x.strip()]
    llm = Llama(model_path=args.gguf, n_ctx=max(64, len(ids)), n_batch=max(64, len(ids)), logits_all=True,
                n_threads=args.threads, n_threads_batch=args.threads, lora_path=args.lora, use_mmap=False,
                verbose=False, seed=0, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, flash_attn=False)
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    np.save(args.out, logits)
    print(f"{args.gguf}: {len(ids)} ids -> logits {logits.shape} saved to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

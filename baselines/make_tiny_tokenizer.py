"""Train the 1000-piece (at most) sentencepiece model in tests/fixtures/tiny-tokenizer/ (run once; the file is committed).

tests/fixtures/tiny-mistral has a 1024-token vocabulary, too small for Mistral's 32000-piece tokenizer, so
the DPO reference test (baselines/dpo_reference_trl.py) needs a tokenizer of its own that fits. This one
follows Llama/Mistral's training settings (BPE, byte fallback, identity normalization, dummy prefix, no
whitespace squashing; unk 0, BOS 1, EOS 2), so komt's tokenizer and prompt formats treat it like the real
one. Trained on komt's Korean eval questions, the DPO fixture's text and a few English sentences.

    python baselines/make_tiny_tokenizer.py        (needs only sentencepiece)
"""

import io
import json
from pathlib import Path

import sentencepiece as spm

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "tiny-tokenizer" / "tokenizer.model"
ENGLISH = ["What colour is the sky on a clear day? Blue.", "The quick brown fox jumps over the lazy dog.",
           "Green, like grass.", "Answer the question in one short sentence.", "[INST] [/INST] </s> <s>"]


def corpus() -> list[str]:
    lines = list(ENGLISH)
    data = ROOT / "komt" / "eval" / "data"
    lines += [json.loads(line)["instruction"] for line in (data / "komt_eval_questions.jsonl").open(encoding="utf-8")]
    lines += (data / "komt_testset.txt").read_text(encoding="utf-8").splitlines()
    for line in (ROOT / "tests" / "fixtures" / "dpo" / "prefs.jsonl").open(encoding="utf-8"):
        record = json.loads(line)
        for key in ("prompt", "chosen", "rejected"):
            value = record[key]
            lines += [value] if isinstance(value, str) else [m["content"] for m in value]
    return [line.strip() for line in lines if line.strip()]


def main() -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=model, model_type="bpe", vocab_size=1000,
        hard_vocab_limit=False, byte_fallback=True, character_coverage=0.98, split_digits=True,
        normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
        minloglevel=2,
    )
    OUT.write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    print(f"wrote {OUT} ({len(model.getvalue())} bytes, {sp.vocab_size()} pieces)")


if __name__ == "__main__":
    main()

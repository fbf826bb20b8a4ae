"""Greedy decoding with a repetition penalty: transformers' `generate` vs komt's, on the tiny fixtures.

Run in a throwaway venv that has transformers and sees komt (never imported by komt itself):

    PYTHONPATH=. /work/venv-base/bin/python baselines/repetition_penalty_vs_transformers.py

For a few prompts on tests/fixtures/tiny-mistral and tiny-llama it prints transformers' new ids (greedy,
repetition_penalty 1.3, CTRL's formula over prompt and output), komt's, whether they are equal, and
whether the penalty changed the ids at all (on the fixtures' own greedy prompt it does not: their
logits are too flat for 1.3 to move an argmax, so these short prompts are the ones that show it).
tests/test_generation_reference.py pins transformers' ids.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import komt  # noqa: E402
from komt.generate import generate  # noqa: E402

PENALTY = 1.3
NEW_TOKENS = 24  # past tiny-mistral's window of 8: the rolling cache must keep the seen-token set whole
PROMPTS = {"tiny-mistral": [[1, 5], [1, 7], [1, 44, 55, 66]], "tiny-llama": [[1, 5], [1, 2, 3, 4, 5]]}


def main() -> int:
    all_equal = True
    for name, prompts in PROMPTS.items():
        folder = ROOT / "tests" / "fixtures" / name
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        model = komt.load_model(folder)
        for prompt in prompts:
            with torch.no_grad():
                out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                  do_sample=False, repetition_penalty=PENALTY, eos_token_id=None, pad_token_id=0)
            theirs = out[0, len(prompt):].tolist()
            ours = generate(model, prompt, max_new_tokens=NEW_TOKENS, repetition_penalty=PENALTY)
            plain = generate(model, prompt, max_new_tokens=NEW_TOKENS)
            all_equal &= theirs == ours
            print(f"{name} {prompt}: transformers {theirs}")
            print(f"{name} {prompt}: komt         {ours}")
            print(f"{name} {prompt}: equal {theirs == ours}; the penalty changes the ids: {plain != theirs}")
    return 0 if all_equal else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Reference figures for komt's DPO: trl's DPOTrainer on tiny-mistral, pinned in tests/fixtures/dpo/expected.json.

Run in the throwaway venv that has transformers, peft, trl and datasets (never a dependency of komt):

    /work/venv-base/bin/python baselines/dpo_reference_trl.py

Setup, mirrored by tests/test_train_dpo.py:
  - data: tests/fixtures/dpo/prefs.jsonl (strings and message lists), tokenizer tests/fixtures/tiny-tokenizer;
  - ids: this script's own implementation of komt's prompt format with sentencepiece (model card form
    `<s>[INST]{prompt} [/INST]` for a string prompt, Mistral's v1 chat format for messages, each response
    encoded on its own + EOS), then the truncation rule of trl 0.x's `DPOTrainer.tokenize_row`
    (max_prompt_length 16, max_length 32, truncation_mode keep_end), written out here since trl 1.x dropped
    max_prompt_length; trl 1.16's own tokenization is bypassed (`_prepare_dataset` returns the ids as given);
  - policy: tests/fixtures/tiny-mistral; reference: tiny-mistral + tiny-mistral-lora merged by PEFT
    (non-zero B), so the step-1 loss is not trivially log 2;
  - trl 1.16's DPOTrainer, one step over all 6 pairs in one batch, beta 0.1, for loss_type sigmoid and ipo:
    its logged step-1 metrics (computed in the forward before the update).
Also printed: per-pair response log-probs of policy and reference from a plain transformers forward, as
a cross-check of trl's means.
"""

from __future__ import annotations

import json
import sys
import tempfile
import unicodedata
from pathlib import Path

import datasets
import peft
import sentencepiece as spm
import torch
import transformers
import trl
from trl import DPOConfig, DPOTrainer

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures"
MAX_PROMPT_LENGTH, MAX_LENGTH, BETA = 16, 32, 0.1


def encode(sp, text: str) -> list[int]:
    return sp.encode(unicodedata.normalize("NFC", text))


def prompt_ids(sp, prompt) -> list[int]:
    if isinstance(prompt, str):
        return [sp.bos_id()] + encode(sp, f"[INST]{prompt} [/INST]")
    system = "\n\n".join(m["content"] for m in prompt if m["role"] == "system")
    turns = [m for m in prompt if m["role"] != "system"]
    ids = [sp.bos_id()]
    for i, m in enumerate(turns):
        if m["role"] == "user":
            content = f"{system}\n\n{m['content']}" if i == 0 and system else m["content"]
            ids += encode(sp, f"[INST] {content} [/INST]")
        else:
            ids += encode(sp, m["content"]) + [sp.eos_id()]
    return ids


def response_text(value) -> str:
    return value if isinstance(value, str) else value[-1]["content"]  # the assistant's reply is the last message


def trl0_truncate(prompt: list[int], chosen: list[int], rejected: list[int]):
    """trl 0.x DPOTrainer.tokenize_row, truncation_mode "keep_end"."""
    longer = max(len(chosen), len(rejected))
    if len(prompt) + longer > MAX_LENGTH:
        prompt = prompt[-MAX_PROMPT_LENGTH:]
    if len(prompt) + longer > MAX_LENGTH:
        chosen, rejected = chosen[:MAX_LENGTH - MAX_PROMPT_LENGTH], rejected[:MAX_LENGTH - MAX_PROMPT_LENGTH]
    return prompt, chosen, rejected


def tokenized_pairs() -> list[dict]:
    sp = spm.SentencePieceProcessor(model_file=str(FIX / "tiny-tokenizer" / "tokenizer.model"))
    rows = []
    for line in (FIX / "dpo" / "prefs.jsonl").open(encoding="utf-8"):
        record = json.loads(line)
        p = prompt_ids(sp, record["prompt"])
        c = encode(sp, response_text(record["chosen"])) + [sp.eos_id()]
        r = encode(sp, response_text(record["rejected"])) + [sp.eos_id()]
        p, c, r = trl0_truncate(p, c, r)
        rows.append({"prompt_ids": p, "chosen_ids": c, "rejected_ids": r})
    return rows


def load_models():
    policy = transformers.MistralForCausalLM.from_pretrained(FIX / "tiny-mistral", dtype=torch.float32)
    base = transformers.MistralForCausalLM.from_pretrained(FIX / "tiny-mistral", dtype=torch.float32)
    reference = peft.PeftModel.from_pretrained(base, FIX / "tiny-mistral-lora").merge_and_unload()
    return policy.eval(), reference.eval()


@torch.no_grad()
def plain_logps(model, rows) -> list[tuple[float, float]]:
    out = []
    for row in rows:
        pair = []
        for key in ("chosen_ids", "rejected_ids"):
            ids = torch.tensor([row["prompt_ids"] + row[key]])
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)  # (T - 1, V)
            targets = ids[0, 1:]
            start = len(row["prompt_ids"]) - 1  # the position predicting the first response token
            pair.append(logprobs[start:].gather(1, targets[start:, None]).sum().item())
        out.append(tuple(pair))
    return out


def trl_step_one(rows, loss_type: str) -> dict:
    policy, reference = load_models()
    DPOTrainer._prepare_dataset = lambda self, dataset, *args, **kwargs: dataset  # the ids are ours
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(output_dir=tmp, per_device_train_batch_size=len(rows), max_steps=1, logging_steps=1,
                         learning_rate=1e-6, beta=BETA, loss_type=loss_type, max_length=None, report_to=[],
                         use_cpu=True, bf16=False, save_strategy="no", seed=0, dataloader_drop_last=False)
        trainer = DPOTrainer(model=policy, ref_model=reference, args=args,
                             train_dataset=datasets.Dataset.from_list(rows), processing_class=_pad_only_tokenizer())
        trainer.train()
    first = trainer.state.log_history[0]
    names = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
             "logps/chosen", "logps/rejected")
    return {name: first[name] for name in names}


def _pad_only_tokenizer():
    """DPOTrainer wants a processing_class for its pad id; the data is already ids, so only that is used."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, "<unk>")),
                                  bos_token="<s>", eos_token="</s>", pad_token="</s>", unk_token="<unk>")
    return tok


def main() -> None:
    rows = tokenized_pairs()
    policy, reference = load_models()
    per_pair = {"policy": plain_logps(policy, rows), "reference": plain_logps(reference, rows)}
    result = {
        "source": f"baselines/dpo_reference_trl.py: trl {trl.__version__}, transformers {transformers.__version__}, "
                  f"peft {peft.__version__}, torch {torch.__version__}",
        "settings": {"max_prompt_length": MAX_PROMPT_LENGTH, "max_length": MAX_LENGTH, "beta": BETA},
        "ids": rows,
        "per_pair_logps": per_pair,
        "trl_step1": {loss_type: trl_step_one(rows, loss_type) for loss_type in ("sigmoid", "ipo")},
    }
    # trl's logged means must be the means of the plain per-pair figures
    for side, i in (("chosen", 0), ("rejected", 1)):
        plain = sum(p[i] for p in per_pair["policy"]) / len(rows)
        assert abs(plain - result["trl_step1"]["sigmoid"][f"logps/{side}"]) < 1e-4, (side, plain)
    path = FIX / "dpo" / "expected.json"
    if "--write" in sys.argv:
        path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {path}")
    print(json.dumps({k: result[k] for k in ("source", "trl_step1", "per_pair_logps")}, indent=1))


if __name__ == "__main__":
    main()

"""Tests of komt/eval/perplexity.py: exp(mean NLL) against sums done by hand on reference logits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, write_checkpoint
from safetensors.torch import load_file

import komt
from komt.errors import DataError
from komt.eval.cli import main
from komt.eval.perplexity import instruction_examples, perplexity, text_examples
from komt.generate.prompt import format_training_example
from komt.model import ModelConfig, Transformer


def tiny_korean_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A random 1-layer Mistral with the real 32000-token vocabulary and tokenizer.model, so Korean prompts
    encode as the real model would see them (head_dim 16, the smallest the Triton attention kernel takes)."""
    torch.manual_seed(seed)
    config = ModelConfig(model_type="mistral", vocab_size=32000, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         max_position_embeddings=2048, sliding_window=64)
    return write_checkpoint(Transformer(config), folder, tokenizer=True)


def nll_by_hand(logits: torch.Tensor, labels: list[int]) -> tuple[float, int]:
    """Sum of -log softmax(logits[t])[labels[t+1]] over labelled t + 1, in float64, one token at a time."""
    total, count = 0.0, 0
    for t in range(len(labels) - 1):
        if labels[t + 1] == -100:
            continue
        row = logits[t].double()
        total += float(torch.logsumexp(row, 0) - row[labels[t + 1]])
        count += 1
    return total, count


@pytest.mark.parametrize("model_dir, adapter", [
    ("tiny-mistral", None), ("tiny-llama", None), ("tiny-mistral", "tiny-mistral-lora"),
])
def test_perplexity_equals_exp_mean_nll_of_the_reference_logits(model_dir, adapter):
    expected = load_file(FIXTURES / (adapter or model_dir) / "expected.safetensors")
    model = komt.load_model(FIXTURES / model_dir, adapter=FIXTURES / adapter if adapter else None)
    ids = expected["input_ids"].tolist()
    labels = [[-100] * 9 + ids[0][9:], list(ids[1])]  # the first sequence: a 9-token "prompt" not scored
    result = perplexity(model, zip(ids, labels))
    total, count = 0.0, 0
    for b in range(2):
        nll, n = nll_by_hand(expected["logits"][b], labels[b])  # the Hugging Face reference's logits
        total, count = total + nll, count + n
    assert (result.tokens, result.sequences) == (count, 2) == (15 + 23, 2)  # 24 - 9 answer tokens + 23
    assert result.nll_sum == pytest.approx(total, rel=1e-5)
    assert result.value == pytest.approx(math.exp(total / count), rel=1e-5)


def test_long_sequences_are_cut_to_max_len(fixtures):
    model = komt.load_model(fixtures / "tiny-mistral")
    ids = load_file(fixtures / "tiny-mistral" / "expected.safetensors")["input_ids"][0].tolist()
    cut = perplexity(model, [(ids, ids)], max_len=10)
    assert (cut.tokens, cut.truncated) == (9, 1)
    assert cut.nll_sum == pytest.approx(perplexity(model, [(ids[:10], ids[:10])]).nll_sum, rel=1e-6)


def test_nothing_to_score_is_an_error(fixtures):
    model = komt.load_model(fixtures / "tiny-mistral")
    with pytest.raises(DataError, match="no tokens to score"):
        perplexity(model, [([1, 2, 3], [-100, -100, -100])])


def test_instruction_examples_score_only_the_answer_and_its_eos(tmp_path, fixtures):
    tokenizer = komt.load_tokenizer(fixtures / "tokenizer" / "tokenizer.model")
    path = tmp_path / "data.jsonl"
    rows = [{"instruction": "고양이는 왜 물을 싫어하나요?", "output": "털이 젖으면 무거워지기 때문입니다."},
            {"instruction": "Say hi", "output": "Hi!"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    examples = list(instruction_examples(tokenizer, path))
    for (ids, labels), row in zip(examples, rows):
        scored = [label for label in labels if label != -100]
        assert scored == tokenizer.encode(row["output"], bos=False) + [tokenizer.eos_id]
        assert ids[: len(ids) - len(scored)] == tokenizer.encode(f"[INST]{row['instruction']} [/INST]", bos=True)
    path.write_text('{"instruction": "q"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"data\.jsonl:1"):
        list(instruction_examples(tokenizer, path))


def test_text_windows_cover_the_stream_once(tmp_path, fixtures):
    tokenizer = komt.load_tokenizer(fixtures / "tokenizer" / "tokenizer.model")
    path = tmp_path / "text.txt"
    path.write_text("누전차단기가 내려가는 이유는 무엇입니까?\n자동차 공기압 관리가 왜 중요하나요?\n", encoding="utf-8")
    stream = tokenizer.encode(path.read_text(encoding="utf-8"), bos=True)
    windows = list(text_examples(tokenizer, path, max_len=7))
    assert [i for ids, _ in windows for i in ids] == stream
    assert all(ids == labels and len(ids) <= 7 for ids, labels in windows)


def test_cli_perplexity_on_instruction_data_matches_a_sum_by_hand(tmp_path, fixtures, capsys):
    ckpt = tiny_korean_checkpoint(tmp_path / "ckpt")
    rows = [{"instruction": "아프리카에서 가장 큰 호수는?", "output": "빅토리아 호수입니다."},
            {"instruction": "넥타이는 언제 처음 등장했나요?", "output": "17세기 크로아티아 용병에서 유래했습니다."}]
    data = tmp_path / "heldout.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert main(["--model", str(ckpt), "--perplexity", str(data), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    model, tokenizer = komt.load_model(ckpt), komt.load_tokenizer(ckpt)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids, labels = format_training_example(tokenizer, row["instruction"], row["output"])
            nll, n = nll_by_hand(model(torch.tensor([ids]))[0], labels)
            total, count = total + nll, count + n
    assert f"over {count} tokens, 2 sequences" in printed
    assert float(printed.split()[1]) == pytest.approx(math.exp(total / count), rel=1e-4)

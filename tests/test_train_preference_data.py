"""Preference records -> ids (komt/train/preference_data.py): every accepted shape gives the SFT formatting's ids,
truncation follows trl's rule in tokens, and each malformed record is a one-line DataError naming file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from komt.errors import DataError
from komt.generate.prompt import format_chat, format_prompt
from komt.generate.tokenizer import load_tokenizer
from komt.train.preference_data import encode_pair, load_preferences, truncate_pair

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def tiny_tok():
    return load_tokenizer(FIXTURES / "tiny-tokenizer")


def write(tmp_path: Path, records: list) -> Path:
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_string_prompt_is_the_model_card_prompt_and_responses_end_in_eos(tiny_tok):
    prompt, chosen, rejected = encode_pair({"prompt": "한국의 수도는?", "chosen": "서울", "rejected": "부산"}, tiny_tok)
    assert prompt == format_prompt(tiny_tok, "한국의 수도는?")
    assert chosen == tiny_tok.encode("서울", bos=False, eos=True) and rejected == tiny_tok.encode("부산", bos=False, eos=True)


def test_message_lists_and_ultrafeedback_conversations_give_the_same_ids(tiny_tok):
    messages = [{"role": "system", "content": "짧게"}, {"role": "user", "content": "안녕"},
                {"role": "assistant", "content": "네"}, {"role": "user", "content": "고마워"}]
    as_lists = encode_pair({"prompt": messages, "chosen": [{"role": "assistant", "content": "천만에요"}],
                            "rejected": [{"role": "assistant", "content": "싫어요"}]}, tiny_tok)
    assert as_lists[0] == format_chat(tiny_tok, messages)  # exactly what generation will be given
    assert as_lists[1] == tiny_tok.encode("천만에요", bos=False, eos=True)
    mixed = encode_pair({"prompt": messages, "chosen": "천만에요", "rejected": "싫어요"}, tiny_tok)
    whole = encode_pair({"prompt": messages, "chosen": messages + [{"role": "assistant", "content": "천만에요"}],
                         "rejected": messages + [{"role": "assistant", "content": "싫어요", "id": 7}]}, tiny_tok)
    assert as_lists == mixed == whole
    ultra = encode_pair({"prompt": "안녕", "chosen": [{"role": "user", "content": "안녕"}, {"role": "assistant", "content": "네"}],
                         "rejected": [{"role": "user", "content": "안녕"}, {"role": "assistant", "content": "응"}]}, tiny_tok)
    assert ultra == encode_pair({"prompt": "안녕", "chosen": "네", "rejected": "응"}, tiny_tok)


def test_truncation_follows_trl_keep_end_prompt_then_responses():
    p, c, r = list(range(100, 110)), [1, 2, 3, 4], [5, 6]
    assert truncate_pair(p, c, r, max_prompt_length=6, max_length=14) == (p, c, r)  # 10 + 4 fits
    assert truncate_pair(p, c, r, max_prompt_length=6, max_length=12) == (p[-6:], c, r)  # the prompt keeps its end
    # still too long after the prompt cut: responses keep their start, max_length - max_prompt_length tokens
    assert truncate_pair(p, c, r, max_prompt_length=8, max_length=11) == (p[-8:], [1, 2, 3], [5, 6])
    # a prompt shorter than max_prompt_length is kept whole, and (trl's rule) the responses are still cut to
    # max_length - max_prompt_length
    assert truncate_pair([0, 1], c, r, max_prompt_length=3, max_length=4) == ([0, 1], [1], [5])


def test_dataset_counts_truncations_and_drops_pairs_cut_to_identical(tmp_path, tiny_tok):
    path = write(tmp_path, [
        {"prompt": "질문 " * 30, "chosen": "답", "rejected": "아니"},
        {"prompt": "질문", "chosen": "같은 시작 그리고 좋은 끝", "rejected": "같은 시작 그리고 나쁜 끝"},
        {"prompt": "질문", "chosen": "좋아", "rejected": "싫어"},
    ])
    # prompts of 158, 12 and 12 tokens; the second pair's responses share their first 10 tokens
    data = load_preferences(path, tiny_tok, max_prompt_length=12, max_length=22)
    assert (data.n_records, data.n_prompt_truncated, data.n_response_truncated, data.n_dropped) == (3, 1, 1, 1)
    assert [p.where for p in data.pairs] == [f"{path}:1", f"{path}:3"]
    assert all(p.length <= 22 for p in data.pairs) and len(data.pairs[0].prompt) == 12


@pytest.mark.parametrize("record, message", [
    ([1, 2], "expected a JSON object, got list"),
    ({"prompt": "q", "chosen": "a"}, "needs 'prompt', 'chosen' and 'rejected'; missing ['rejected']"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "field 'prompt' must be a string or a list of messages, got int"),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "field 'chosen' is empty"),
    ({"prompt": "q", "chosen": "a", "rejected": ""}, "field 'rejected' is empty"),
    ({"prompt": "q", "chosen": "같다", "rejected": "같다"}, "'chosen' and 'rejected' are the same response"),
    ({"prompt": "q", "chosen": {"text": "a"}, "rejected": "b"}, "field 'chosen' must be a string or a list of messages"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
     "field 'chosen' must be a string or a list holding one assistant message"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "empty instruction"),
    ({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"}, "roles must alternate"),
])
def test_bad_records_are_one_line_errors_naming_file_and_line(tmp_path, tiny_tok, record, message):
    path = write(tmp_path, [{"prompt": "q", "chosen": "a", "rejected": "b"}, record])
    with pytest.raises(DataError) as err:
        load_preferences(path, tiny_tok, 512, 1024)
    text = str(err.value)
    assert text.startswith(f"{path}:2: ") and message in text and "\n" not in text, text

"""Prompt formats: model-card and Mistral v1 chat ids from the fixture, training ids/labels checked by hand."""

import json
import unicodedata
from pathlib import Path

import pytest

from komt.errors import DataError, GenerationError
from komt.generate.prompt import (
    IGNORE_INDEX,
    format_chat,
    format_chat_training_example,
    format_prompt,
    format_training_example,
    pad_training_example,
)

FIXTURES = Path(__file__).parent / "fixtures" / "tokenizer"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text(encoding="utf-8"))

from conftest import AN, BOS, END_INST, EOS, INST, NE, NYEONG, SPACE  # hand-checked ids; `tok` fixture there


def test_single_prompt_matches_model_card_ids(tok):
    case = EXPECTED["model_card_prompt"]
    assert format_prompt(tok, case["prompt"]) == case["ids"]


def test_nfd_prompt_gives_the_model_card_ids(tok):
    case = EXPECTED["model_card_prompt"]
    assert format_prompt(tok, unicodedata.normalize("NFD", case["prompt"])) == case["ids"]


def test_multi_turn_chat_matches_mistral_common_v1_ids(tok):
    case = EXPECTED["chat_multi_turn"]
    assert format_chat(tok, case["messages"]) == case["ids"]


def test_chat_hand_checked_single_turn(tok):
    # BOS + "[INST] 안녕 [/INST]": the space after [INST] is a lone "▁" because "▁안" is not a piece.
    assert format_chat(tok, [{"role": "user", "content": "안녕"}]) == [BOS, *INST, SPACE, AN, *NYEONG, *END_INST]


def test_system_message_is_prepended_to_first_user_turn_only(tok):
    messages = [
        {"role": "system", "content": "짧게 답하세요."},
        {"role": "user", "content": "안녕"},
        {"role": "assistant", "content": "네"},
        {"role": "user", "content": "고마워"},
    ]
    merged = [
        {"role": "user", "content": "짧게 답하세요.\n\n안녕"},
        {"role": "assistant", "content": "네"},
        {"role": "user", "content": "고마워"},
    ]
    assert format_chat(tok, messages) == format_chat(tok, merged)
    assert format_chat(tok, messages) != format_chat(tok, messages[1:])


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"role": "assistant", "content": "네"}],
        [{"role": "user", "content": "안녕"}, {"role": "assistant", "content": "네"}],
        [{"role": "user", "content": "안녕"}, {"role": "user", "content": "또"}],
        [{"role": "user", "content": "안녕"}, {"role": "system", "content": "s"}, {"role": "user", "content": "x"}],
        [{"role": "user", "content": ""}],
        [{"role": "user", "content": "안녕"}, {"role": "assistant", "content": " "}, {"role": "user", "content": "x"}],
        [{"role": "bot", "content": "안녕"}],
        [{"role": "user"}],
        "안녕",
    ],
    ids=["empty", "starts-assistant", "ends-assistant", "user-user", "late-system", "empty-user",
         "blank-assistant", "bad-role", "no-content", "not-a-list"],
)
def test_invalid_conversations_raise_generation_error(tok, messages):
    with pytest.raises(GenerationError):
        format_chat(tok, messages)


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_empty_prompt_raises_generation_error(tok, prompt):
    with pytest.raises(GenerationError, match="prompt"):
        format_prompt(tok, prompt)


def test_training_example_hand_checked(tok):
    ids, labels = format_training_example(tok, "안녕", "네")
    prompt = [BOS, *INST, AN, *NYEONG, *END_INST]  # "[INST]안녕 [/INST]": no space after [INST]
    assert ids == prompt + [SPACE, NE, EOS]
    assert labels == [IGNORE_INDEX] * len(prompt) + [SPACE, NE, EOS]


def test_training_prompt_part_is_the_inference_prompt(tok):
    instruction, output = EXPECTED["model_card_prompt"]["prompt"], "제주도 2일 코스입니다."
    ids, labels = format_training_example(tok, instruction, output)
    prompt = format_prompt(tok, instruction)
    assert ids[: len(prompt)] == prompt
    assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert ids[len(prompt):] == labels[len(prompt):] == tok.encode(output, bos=False, eos=True)
    assert tok.decode(ids[len(prompt):]) == output


def test_padding_with_eos_keeps_the_real_eos_label(tok):
    ids, labels = format_training_example(tok, "안녕", "네")
    padded_ids, padded_labels = pad_training_example(ids, labels, length=len(ids) + 4, pad_id=tok.eos_id)
    assert padded_ids == ids + [EOS] * 4
    assert padded_labels == [IGNORE_INDEX] * 12 + [SPACE, NE, EOS] + [IGNORE_INDEX] * 4
    with pytest.raises(DataError, match="does not fit"):
        pad_training_example(ids, labels, length=len(ids) - 1, pad_id=tok.eos_id)


def test_chat_training_labels_cover_assistant_turns_and_their_eos(tok):
    messages = [
        {"role": "user", "content": "안녕"},
        {"role": "assistant", "content": "네"},
        {"role": "user", "content": "안녕"},
        {"role": "assistant", "content": "네, 안녕하세요!"},
    ]
    ids, labels = format_chat_training_example(tok, messages)
    user = [*INST, SPACE, AN, *NYEONG, *END_INST]
    first_answer = [SPACE, NE, EOS]
    second_answer = tok.encode("네, 안녕하세요!", bos=False, eos=True)
    assert ids == [BOS, *user, *first_answer, *user, *second_answer]
    ignored = [IGNORE_INDEX] * (1 + len(user))
    assert labels == ignored + first_answer + [IGNORE_INDEX] * len(user) + second_answer


def test_chat_training_prefixes_equal_the_inference_prompts(tok):
    case = EXPECTED["chat_multi_turn"]
    messages = case["messages"] + [{"role": "assistant", "content": "1일차: 성산일출봉"}]
    ids, labels = format_chat_training_example(tok, messages)
    for k in (1, 3):  # each user turn the model answers
        prompt = format_chat(tok, messages[:k])
        assert ids[: len(prompt)] == prompt
        assert labels[len(prompt) - 1] == IGNORE_INDEX and labels[len(prompt)] != IGNORE_INDEX
    assert ids[: len(case["ids"])] == case["ids"]


@pytest.mark.parametrize(
    "call",
    [
        lambda tok: format_training_example(tok, "", "네"),
        lambda tok: format_training_example(tok, "안녕", ""),
        lambda tok: format_chat_training_example(tok, [{"role": "user", "content": "안녕"}]),
    ],
    ids=["empty-instruction", "empty-output", "chat-ends-with-user"],
)
def test_malformed_training_examples_raise_data_error(tok, call):
    with pytest.raises(DataError):
        call(tok)

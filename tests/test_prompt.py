"""Prompt formats: model-card and Mistral v1 chat ids from the fixture, training ids/labels checked by hand;
the PromptFormat API (auto/card/template/raw) against transformers' chat-template ids."""

import json
import shutil
import unicodedata
from pathlib import Path

import pytest

from komt.errors import DataError, GenerationError, TokenizerError
from komt.generate.chat_template import TemplateFormat
from komt.generate.prompt import (
    IGNORE_INDEX,
    CardFormat,
    RawFormat,
    format_chat,
    format_chat_training_example,
    format_prompt,
    format_training_example,
    pad_training_example,
    prompt_format,
)
from komt.generate.tokenizer import load_tokenizer

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


# ---- the PromptFormat API: card, template, raw, auto ------------------------------------------------------

ALL_FIXTURES = Path(__file__).parent / "fixtures"
REFS = json.loads((ALL_FIXTURES / "tokenizer_refs.json").read_text(encoding="utf-8"))
CONVERSATIONS = REFS["conversations"]
TEMPLATES = ALL_FIXTURES / "chat_templates"


@pytest.fixture(scope="module")
def smol():
    return load_tokenizer(ALL_FIXTURES / "smollm2-tokenizer")


@pytest.fixture(scope="module")
def mistral_json():
    return load_tokenizer(ALL_FIXTURES / "mistral-tokenizer-json")


def with_template(tmp_path, name, source_folder=FIXTURES):
    """A copy of a tokenizer folder whose tokenizer_config.json carries the fixture chat template `name`."""
    for file in source_folder.iterdir():
        if file.name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
            shutil.copy(file, tmp_path)  # chat_template.jinja wins over the config's template
    (tmp_path / "chat_template.jinja").write_text((TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8"))
    return load_tokenizer(tmp_path)


def test_auto_is_card_for_komts_tokenizer_without_a_template(tok):
    fmt = prompt_format(tok)
    assert isinstance(fmt, CardFormat) and fmt.name == fmt.label == "card"
    assert fmt.prompt(EXPECTED["model_card_prompt"]["prompt"]) == EXPECTED["model_card_prompt"]["ids"]
    assert fmt.chat(EXPECTED["chat_multi_turn"]["messages"]) == EXPECTED["chat_multi_turn"]["ids"]


@pytest.mark.parametrize("name", ["mistral-7b-instruct-v0.1", "mistral-instruct-v1-system", "llama-2-chat"])
def test_auto_keeps_card_for_sentencepiece_checkpoints_with_an_inst_template(tmp_path, name):
    tokenizer = with_template(tmp_path, name)
    assert prompt_format(tokenizer).name == "card"
    assert prompt_format(tokenizer, "template").name == "template"  # still there when asked for


def test_auto_is_template_when_the_checkpoint_ships_one(smol, mistral_json, tmp_path):
    assert isinstance(prompt_format(smol), TemplateFormat) and prompt_format(mistral_json).name == "template"
    assert prompt_format(with_template(tmp_path, "chatml")).name == "template"  # sentencepiece + ChatML
    assert prompt_format(smol).label.startswith("template (") and "chat_template.jinja" in prompt_format(smol).label


def test_template_format_without_a_template_and_unknown_formats_are_errors(tok):
    with pytest.raises(TokenizerError, match="ships no chat template"):
        prompt_format(tok, "template")
    with pytest.raises(GenerationError, match="unknown prompt format 'inst'"):
        prompt_format(tok, "inst")


def test_card_format_is_the_functions_above(tok):
    fmt = prompt_format(tok, "card")
    messages = CONVERSATIONS["training"]
    assert fmt.training_example("안녕", "네") == format_training_example(tok, "안녕", "네")
    assert fmt.chat_training_example(messages) == format_chat_training_example(tok, messages)


@pytest.mark.parametrize("key, folder, label", [
    ("smollm2/korean", "smollm2-tokenizer", "smollm2-tokenizer"),
    ("smollm2/system", "smollm2-tokenizer", "smollm2-tokenizer"),
    ("smollm2/single", "smollm2-tokenizer", "smollm2-tokenizer"),
    ("mistral-7b-instruct-v0.1/korean", "mistral-tokenizer-json", "mistral-tokenizer-json"),
    ("mistral-7b-instruct-v0.1/single", "mistral-tokenizer-json", "mistral-tokenizer-json"),
    ("mistral-7b-instruct-v0.1/korean", "tokenizer", "tokenizer-legacy"),
    ("mistral-instruct-v1-system/system", "tokenizer", "tokenizer-legacy"),
    ("llama-2-chat/korean", "tokenizer", "tokenizer-legacy"),
    ("llama-2-chat/system", "tokenizer", "tokenizer-legacy"),
])
def test_template_chat_ids_equal_transformers_apply_chat_template(tmp_path, key, folder, label):
    case = REFS["templates"][key]
    tokenizer = with_template(tmp_path, case["template"], ALL_FIXTURES / folder)
    assert prompt_format(tokenizer, "template").chat(CONVERSATIONS[case["conversation"]]) == case["ids"][label]


def test_rendered_bos_is_not_doubled(smol, mistral_json):
    ids = prompt_format(mistral_json, "template").prompt("What is the capital of France?")
    assert ids == REFS["templates"]["mistral-7b-instruct-v0.1/single"]["ids"]["mistral-tokenizer-json"]
    assert ids[:2] == [1, 733] and mistral_json.add_bos  # the template's <s>, and no second one
    assert prompt_format(smol).prompt("What is the capital of France?") == \
        REFS["templates"]["smollm2/single"]["ids"]["smollm2-tokenizer"]


def test_mistral_v1_template_on_sentencepiece_gives_mistral_common_ids(tmp_path, tok):
    fmt = prompt_format(with_template(tmp_path, "mistral-instruct-v1-system"), "template")
    assert fmt.chat(EXPECTED["chat_multi_turn"]["messages"]) == EXPECTED["chat_multi_turn"]["ids"]
    messages = CONVERSATIONS["training"]
    assert fmt.chat_training_example(messages) == format_chat_training_example(tok, messages)


def test_template_training_labels_are_assistant_content_and_end_of_turn(smol):
    fmt = prompt_format(smol, "template")
    messages = CONVERSATIONS["training"]
    ids, labels = fmt.chat_training_example(messages)
    assert ids == REFS["templates"]["smollm2/training"]["ids"]["smollm2-tokenizer"]
    learned = [t for t in labels if t != IGNORE_INDEX]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert learned == [*smol.encode(answers[0], bos=False), 2, *smol.encode(answers[1], bos=False), 2]  # 2 = <|im_end|>
    for k in (1, 3):  # the prompt up to each answer is what the model gets at inference
        prompt = fmt.chat(messages[:k])
        assert ids[: len(prompt)] == prompt and labels[len(prompt) - 1] == IGNORE_INDEX
        assert labels[len(prompt)] == ids[len(prompt)]
    single_ids, single_labels = fmt.training_example("안녕하세요", "네, 안녕하세요!")
    assert [t for t in single_labels if t != IGNORE_INDEX] == [*smol.encode("네, 안녕하세요!", bos=False), 2]
    assert single_ids[-1] == 198 and single_labels[-1] == IGNORE_INDEX  # ChatML's "\n" after <|im_end|>: not learned


def test_template_that_does_not_render_prefix_by_prefix_is_a_data_error(tmp_path):
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}{% endfor %}")
    shutil.copy(ALL_FIXTURES / "smollm2-tokenizer" / "tokenizer.json", tmp_path)
    fmt = prompt_format(load_tokenizer(tmp_path), "template")
    with pytest.raises(DataError, match="does not render this conversation prefix by prefix"):
        fmt.chat_training_example(CONVERSATIONS["training"])


@pytest.mark.parametrize("call, error, message", [
    (lambda f: f.chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}]),
     GenerationError, "must end with the message to answer"),
    (lambda f: f.chat([]), GenerationError, "non-empty list"),
    (lambda f: f.chat([{"role": "user"}]), GenerationError, "message 0 must be"),
    (lambda f: f.prompt("  "), GenerationError, "prompt must be non-empty"),
    (lambda f: f.chat_training_example([{"role": "user", "content": "hi"}]), DataError, "end with an assistant"),
    (lambda f: f.chat_training_example([{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]),
     DataError, "empty content"),
    (lambda f: f.training_example("", "x"), DataError, "empty instruction"),
])
def test_template_format_input_errors(smol, call, error, message):
    with pytest.raises(error, match=message):
        call(prompt_format(smol, "template"))


def test_a_conversation_the_template_rejects_names_the_template(tmp_path):
    fmt = prompt_format(with_template(tmp_path, "mistral-7b-instruct-v0.1"), "template")
    with pytest.raises(GenerationError, match=r"chat template .*chat_template.jinja cannot render this conversation"):
        fmt.chat(CONVERSATIONS["system"])


def test_raw_format_is_the_text_with_the_configs_bos(tok, smol):
    assert prompt_format(tok, "raw").prompt("안녕") == tok.encode("안녕") == [BOS, SPACE, AN, *NYEONG]
    assert isinstance(prompt_format(smol, "raw"), RawFormat)
    assert prompt_format(smol, "raw").prompt("Hello") == smol.encode("Hello", bos=False)  # SmolLM2: no BOS
    ids, labels = prompt_format(tok, "raw").training_example("안녕", "네")
    assert ids == [BOS, SPACE, AN, *NYEONG, SPACE, NE, EOS] and labels == [IGNORE_INDEX] * 6 + [SPACE, NE, EOS]
    with pytest.raises(GenerationError, match="raw prompt format has no conversations"):
        prompt_format(tok, "raw").chat([{"role": "user", "content": "hi"}])
    with pytest.raises(DataError, match="raw prompt format has no conversations"):
        prompt_format(tok, "raw").chat_training_example(CONVERSATIONS["training"])

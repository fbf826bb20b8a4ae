"""Chat templates: renderings equal transformers' apply_chat_template for real templates; sandbox and errors."""

import json
from datetime import datetime
from pathlib import Path

import pytest

from komt.errors import DataError, GenerationError, TokenizerError
from komt.generate.chat_template import ChatTemplate, chat_template_of
from komt.generate.tokenizer import load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
TEMPLATES = FIXTURES / "chat_templates"
REFS = json.loads((FIXTURES / "tokenizer_refs.json").read_text(encoding="utf-8"))
CASES = REFS["templates"]

# transformers' output for four of the cases, checked by hand against each model's documented format.
HAND_CHECKED = {
    "mistral-7b-instruct-v0.1/korean":
        "<s>[INST] 안녕하세요 [/INST]네, 안녕하세요!</s> [INST] 제주도 여행 코스를 만들어줘 [/INST]",
    "mistral-instruct-v1-system/system":
        "<s> [INST] You are a helpful assistant\n\nHello [/INST] Hi there</s> [INST] Who are you [/INST]",
    "llama-2-chat/system":
        "<s>[INST] <<SYS>>\nYou are a helpful assistant\n<</SYS>>\n\nHello [/INST] Hi there </s><s>[INST] Who are you [/INST]",
    "chatml/single": "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "smollm2/single":
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "llama-3-instruct/single":
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "llama-3.2-instruct/single":
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
        "What is the capital of France?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
}


def template(name: str) -> ChatTemplate:
    return ChatTemplate((TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8"), f"{name}.jinja")


def render(key: str, **extra) -> str:
    case = CASES[key]
    return template(case["template"]).render(
        REFS["conversations"][case["conversation"]], add_generation_prompt=case["add_generation_prompt"],
        special_tokens=REFS["specials"][case["template"]], **{**REFS["extra"], **extra})


@pytest.mark.parametrize("key", sorted(CASES))
def test_rendering_equals_transformers_apply_chat_template(key):
    assert render(key) == CASES[key]["text"]


@pytest.mark.parametrize("key", sorted(HAND_CHECKED))
def test_hand_checked_renderings(key):
    assert render(key) == CASES[key]["text"] == HAND_CHECKED[key]


def test_templates_cover_the_families_komt_serves():
    families = {case["template"] for case in CASES.values()}
    assert families == {"mistral-7b-instruct-v0.1", "mistral-instruct-v1-system", "llama-2-chat", "chatml",
                        "smollm2", "llama-3-instruct", "llama-3.2-instruct"}
    assert len(CASES) == 27


def test_strftime_now_gives_todays_date_when_the_template_asks():
    messages = [{"role": "user", "content": "hi"}]
    before = datetime.now().strftime("%d %b %Y")
    text = template("llama-3.2-instruct").render(messages, add_generation_prompt=True,
                                                 special_tokens=REFS["specials"]["llama-3.2-instruct"])
    assert f"Today Date: {before}\n" in text or f"Today Date: {datetime.now().strftime('%d %b %Y')}\n" in text


def test_tools_are_rendered_with_tojson_keeping_non_ascii():
    tools = [{"type": "function", "function": {"name": "날씨", "parameters": {"city": "서울 <&>"}}}]
    text = template("llama-3.2-instruct").render([{"role": "user", "content": "서울 날씨?"}], add_generation_prompt=True,
                                                 special_tokens={"bos_token": "<|begin_of_text|>"}, tools=tools,
                                                 date_string="26 Jul 2024")
    system, user = text.split("<|eot_id|>")[:2]
    assert "Environment: ipython\n" in system
    assert json.dumps(tools[0], ensure_ascii=False, indent=4) in user  # Jinja's own tojson would escape <&>


def test_raise_exception_is_one_line_error_naming_the_template():
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]
    with pytest.raises(GenerationError) as err:
        template("mistral-7b-instruct-v0.1").render(messages, add_generation_prompt=True, special_tokens={})
    assert str(err.value) == ("chat template mistral-7b-instruct-v0.1.jinja cannot render this conversation: "
                              "Conversation roles must alternate user/assistant/user/assistant/...")
    with pytest.raises(DataError, match="mistral-7b-instruct-v0.1.jinja"):
        template("mistral-7b-instruct-v0.1").render(messages, add_generation_prompt=False, special_tokens={},
                                                    error=DataError)


def test_template_errors_other_than_raise_exception_are_caught_too():
    broken = ChatTemplate("{{ messages[0]['content'] + 1 }}", "broken.jinja")
    with pytest.raises(GenerationError, match="chat template broken.jinja cannot render"):
        broken.render([{"role": "user", "content": "x"}], add_generation_prompt=True, special_tokens={})


def test_invalid_jinja_is_a_tokenizer_error_naming_it():
    with pytest.raises(TokenizerError, match=r"chat template bad.jinja is not valid Jinja \(line 1"):
        ChatTemplate("{% for m in messages %}{{ m }", "bad.jinja")


def test_the_sandbox_refuses_python_internals():
    escape = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}", "evil.jinja")
    with pytest.raises(GenerationError, match="evil.jinja"):
        escape.render([{"role": "user", "content": "x"}], add_generation_prompt=True, special_tokens={})
    mutate = ChatTemplate("{% set _ = messages.append(1) %}", "mutate.jinja")
    with pytest.raises(GenerationError, match="mutate.jinja"):
        mutate.render([{"role": "user", "content": "x"}], add_generation_prompt=True, special_tokens={})


def test_trim_blocks_loop_controls_generation_blocks_and_none_fields():
    source = ("{% for m in messages %}\n  {% if loop.index > 2 %}{% break %}{% endif %}\n"
              "{% generation %}[{{ m['content'] }}]{% endgeneration %}\n"
              "{% if 'tool_calls' in m %}tools{% endif %}{% endfor %}")
    messages = [{"role": "user", "content": "a", "tool_calls": None}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}]
    assert ChatTemplate(source, "t").render(messages, add_generation_prompt=False, special_tokens={}) == "[a][b]"


def test_named_templates_are_chosen_like_transformers(tmp_path):
    tok = load_tokenizer(FIXTURES / "tokenizer")
    tok.chat_templates = {"default": "D", "tool_use": "U"}
    assert chat_template_of(tok).source == "D" and chat_template_of(tok, "tool_use").source == "U"
    tok.chat_templates = {"tool_use": "U", "rag": "R"}
    with pytest.raises(TokenizerError, match="no default"):
        chat_template_of(tok)
    with pytest.raises(TokenizerError, match="no chat template 'x'"):
        chat_template_of(tok, "x")
    tok.chat_templates = {}
    assert chat_template_of(tok) is None

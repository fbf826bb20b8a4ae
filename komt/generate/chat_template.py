"""Chat templates: a checkpoint's Jinja `chat_template`, rendered as transformers' `apply_chat_template` does.

Templates come from the Hub and are untrusted code, so they run in Jinja's ImmutableSandboxedEnvironment
with transformers' settings (utils/chat_template_utils.py): `trim_blocks` and `lstrip_blocks`, the
`loopcontrols` extension (`{% break %}`), `raise_exception(message)`, `strftime_now(format)`, and a `tojson`
filter that keeps non-ASCII text and takes `indent`. A `{% generation %}...{% endgeneration %}` block (what
transformers uses for assistant masks) renders its body; komt finds assistant tokens by rendering
prefixes instead (komt.generate.prompt). The variables are transformers': `messages`, `tools` and
`documents` (None unless given), `add_generation_prompt`, the tokenizer's special tokens (`bos_token`,
`eos_token`, `unk_token`, `pad_token`, ...), then any extra keyword (`tools`, `date_string`, ...).

`TemplateFormat` is the `template` prompt format (komt.generate.prompt) built on it. For training it finds
the tokens to learn by the prefix-difference method: the ids of the conversation up to an assistant turn
rendered with the generation prompt must be a prefix of the ids up to and including that turn, which must
be a prefix of the whole conversation's; the tokens in between are that turn's content and its end-of-turn
tokens, cut after the first stop id (ChatML's "\n" after <|im_end|> is never generated, so never learned).
A template that does not render prefix by prefix is a DataError naming it, never a silent mis-mask.

Compiled templates are cached by their source, so a server rendering one per request compiles it once.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from komt.errors import DataError, GenerationError, KomtError, TokenizerError
from komt.generate.prompt import IGNORE_INDEX
from komt.generate.tokenizer import Tokenizer
from komt.generate.tokenizer_files import DEFAULT_TEMPLATE


class ChatTemplate:
    """One compiled chat template; `name` says where it came from (file and template name) in errors."""

    def __init__(self, source: str, name: str) -> None:
        self.source = source
        self.name = name
        self._template = _compile(source, name)

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool,
               special_tokens: Mapping[str, Any], error: type[KomtError] = GenerationError, **extra: Any) -> str:
        """The template's text for `messages`; any failure inside the template is `error` naming the template."""
        # transformers drops keys whose value is None: templates test `'key' in message`, not for None.
        chat = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
        variables = {"tools": None, "documents": None, **special_tokens, **extra}  # transformers' order
        try:
            return self._template.render(messages=chat, add_generation_prompt=add_generation_prompt, **variables)
        except Exception as err:  # raise_exception, undefined names, type errors: all the template's doing
            reason = " ".join(str(err).split()) or type(err).__name__
            raise error(f"chat template {self.name} cannot render this conversation: {reason}") from None


class TemplateFormat:
    """The `template` prompt format: the checkpoint's chat template, encoded with its special tokens parsed."""

    name = "template"

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate) -> None:
        self.tokenizer, self.template = tokenizer, template
        self.label = f"template ({template.name})"

    def prompt(self, text: str) -> list[int]:
        if not isinstance(text, str) or not text.strip():
            raise GenerationError(f"prompt must be non-empty text, got {text!r}")
        return self.chat([{"role": "user", "content": text}])

    def chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        _check_messages(messages, ends_with_assistant=False, error=GenerationError)
        return self._ids(messages, True, GenerationError)

    def training_example(self, instruction: str, output: str) -> tuple[list[int], list[int]]:
        for what, text in (("instruction", instruction), ("output", output)):
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"training example has an empty {what}: {text!r}")
        return self.chat_training_example([{"role": "user", "content": instruction},
                                           {"role": "assistant", "content": output}])

    def chat_training_example(self, messages: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[int]]:
        """(ids, labels): labels on each assistant turn's tokens, found by rendering prefixes (module docstring)."""
        _check_messages(messages, ends_with_assistant=True, error=DataError)
        ids = self._ids(messages, False, DataError)
        labels = [IGNORE_INDEX] * len(ids)
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._ids(messages[:k], True, DataError)
            turn = self._ids(messages[: k + 1], False, DataError)
            if ids[: len(turn)] != turn or turn[: len(prompt)] != prompt or len(turn) == len(prompt):
                raise DataError(f"chat template {self.template.name} does not render this conversation prefix by "
                                f"prefix (assistant message {k}); komt cannot tell which tokens to train on")
            target = turn[len(prompt):]
            end = next((j for j, t in enumerate(target) if t in self.tokenizer.stop_ids), len(target) - 1)
            labels[len(prompt): len(prompt) + end + 1] = target[: end + 1]
        return ids, labels

    def _ids(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool, error: type[KomtError]) -> list[int]:
        text = self.template.render(messages, add_generation_prompt=add_generation_prompt,
                                    special_tokens=self.tokenizer.special_tokens_map, error=error)
        return self.tokenizer.encode_with_specials(text)


def _check_messages(messages: Any, ends_with_assistant: bool, error: type[KomtError]) -> None:
    """A non-empty list of {role: str, content: str}; the template itself judges the roles and their order."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise error(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r}")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise error(f"message {i} must be {{'role': str, 'content': str}}, got {message!r}")
    roles = [m["role"] for m in messages]
    if ends_with_assistant and (roles[-1] != "assistant" or roles[0] == "assistant"):
        raise error(f"a training conversation must start with a non-assistant message and end with an assistant "
                    f"one, got roles {roles}")
    if ends_with_assistant:
        blank = [i for i, m in enumerate(messages) if m["role"] == "assistant" and not m["content"].strip()]
        if blank:
            raise error(f"message {blank[0]} (assistant) has empty content: nothing to train on")
    if not ends_with_assistant and roles[-1] == "assistant":
        raise error(f"messages must end with the message to answer, not an assistant one; got roles {roles}")


def chat_template_of(tokenizer: Tokenizer, name: str | None = None) -> ChatTemplate | None:
    """The tokenizer's chat template `name` (default: its unnamed one), or None if it ships none.

    With named templates and no default, `name` is required (transformers refuses to guess as well).
    """
    templates = tokenizer.chat_templates
    where = tokenizer.chat_template_file or tokenizer.source
    if not templates:
        if name is not None:
            raise TokenizerError(f"{where} has no chat templates; it cannot provide {name!r}")
        return None
    if name is None:
        if DEFAULT_TEMPLATE not in templates and len(templates) > 1:
            raise TokenizerError(f"{where} has named chat templates {sorted(templates)} and no default; name one")
        name = DEFAULT_TEMPLATE if DEFAULT_TEMPLATE in templates else next(iter(templates))
    if name not in templates:
        raise TokenizerError(f"{where} has no chat template {name!r}; it has {sorted(templates)}")
    label = where if name == DEFAULT_TEMPLATE else f"{where} [{name}]"
    return ChatTemplate(templates[name], label)


@functools.lru_cache(maxsize=32)
def _compile(source: str, name: str):
    import jinja2

    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise TokenizerError(f"chat template {name} is not valid Jinja (line {err.lineno}: {err.message})") from None


@functools.lru_cache(maxsize=1)
def _environment():
    """The sandboxed Jinja environment transformers renders chat templates in (module docstring)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """`{% generation %}body{% endgeneration %}` renders body (transformers tracks it for assistant masks)."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters (<, >, &), which would change what the model reads.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env

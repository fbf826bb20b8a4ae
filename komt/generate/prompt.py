"""Prompt formats: the exact ids a checkpoint was trained to see, for generation and for training.

komt calls one small API: `prompt_format(tokenizer, name)` returns a PromptFormat with `.prompt(text)`,
`.chat(messages)`, `.training_example(instruction, output)`, `.chat_training_example(messages)` and `.name`.
The CLI, the server, the trainer and eval all go through it. Three formats:

- `card`: komt-mistral-7b-v1's own, pinned by tests/fixtures/tokenizer/expected.json. A single prompt is
  what the model card's usage code feeds the model: the string `[INST]{prompt} [/INST]` encoded as one piece
  of text (no space after `[INST]`), after BOS. A conversation follows Mistral's v1 instruct format
  (mistral-common's `InstructTokenizerV1`): BOS, then each user turn as the text `[INST] {content} [/INST]`,
  each assistant turn as its own encoding followed by EOS. Every segment is encoded separately, so each
  starts with sentencepiece's dummy-prefix "▁". A system message is prepended to the first user turn as
  `{system}\\n\\n{content}`, as mistral-common does. `[INST]` is ordinary text ("▁[", "INST", "]") here.
- `template`: the checkpoint's chat template (komt.generate.chat_template), rendered with the generation
  prompt and encoded with its special tokens parsed, never with an extra BOS (transformers' rule: the
  template writes the BOS it wants).
- `raw`: the text as is, with BOS if the tokenizer config adds one; no conversations.

`auto` is `template` when the checkpoint ships a chat template, except for sentencepiece (tokenizer.model)
checkpoints whose template is an `[INST]` one: those are komt's own models and the Mistral/Llama-2 family,
for which `card` gives the ids komt-mistral-7b-v1 was trained on (its card) and mistral-common's chat ids.
Without a template, `auto` is `card`, komt's behaviour before templates existed.

The training forms reuse the same encodings, so a model trained on them sees at inference exactly the
prompt ids it was trained on; labels are -100 (ignored by cross-entropy) on prompt tokens and the target ids
plus their EOS (or end-of-turn token) elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from komt.errors import DataError, GenerationError, KomtError, TokenizerError
from komt.generate.tokenizer import Tokenizer

IGNORE_INDEX = -100  # label of a position the loss skips (torch.nn.functional.cross_entropy's default)
ROLES = ("system", "user", "assistant")
PROMPT_FORMATS = ("auto", "card", "template", "raw")


class PromptFormat(Protocol):
    """What komt asks of a prompt format (CardFormat, TemplateFormat, RawFormat)."""

    name: str  # "card", "template" or "raw"
    label: str  # for humans: the name, and for a template the file it came from

    def prompt(self, text: str) -> list[int]:
        """Ids of one prompt, ready for generation."""

    def chat(self, messages: Sequence[dict]) -> list[int]:
        """Ids of a conversation ending with the turn to answer, ready for generation."""

    def training_example(self, instruction: str, output: str) -> tuple[list[int], list[int]]:
        """(ids, labels) of one instruction and its answer; labels only on the answer and its end token."""

    def chat_training_example(self, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
        """(ids, labels) of a conversation ending with an assistant turn; labels only on assistant turns."""


def prompt_format(tokenizer: Tokenizer, name: str = "auto", template: str | None = None) -> PromptFormat:
    """The prompt format `name` (one of PROMPT_FORMATS) for `tokenizer`; `template` picks a named chat template."""
    from komt.generate.chat_template import TemplateFormat, chat_template_of

    if name not in PROMPT_FORMATS:
        raise GenerationError(f"unknown prompt format {name!r}; use one of {', '.join(PROMPT_FORMATS)}")
    chat_template = chat_template_of(tokenizer, template) if name in ("auto", "template") else None
    if name == "auto":
        name = auto_format_name(tokenizer, chat_template.source if chat_template else None)
    if name == "card":
        return CardFormat(tokenizer)
    if name == "raw":
        return RawFormat(tokenizer)
    if chat_template is None:
        raise TokenizerError(f"{tokenizer.source}: the checkpoint ships no chat template (chat_template in "
                             f"tokenizer_config.json or chat_template.jinja); use --prompt-format card or raw")
    return TemplateFormat(tokenizer, chat_template)


def auto_format_name(tokenizer: Tokenizer, template_source: str | None) -> str:
    """`auto`'s choice (module docstring): template, unless none ships or it is a sentencepiece [INST] one."""
    if template_source is None:
        return "card"
    if tokenizer.stream_kind == "sentencepiece" and "[INST]" in template_source:
        return "card"
    return "template"


class CardFormat:
    """komt's model-card format and Mistral's v1 chat format (module docstring), over the functions below."""

    name = label = "card"

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def prompt(self, text: str) -> list[int]:
        return format_prompt(self.tokenizer, text)

    def chat(self, messages: Sequence[dict]) -> list[int]:
        return format_chat(self.tokenizer, messages)

    def training_example(self, instruction: str, output: str) -> tuple[list[int], list[int]]:
        return format_training_example(self.tokenizer, instruction, output)

    def chat_training_example(self, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
        return format_chat_training_example(self.tokenizer, messages)


class RawFormat:
    """The text as is: BOS per the tokenizer config, no chat markup; for base models and hand-made prompts."""

    name = label = "raw"

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def prompt(self, text: str) -> list[int]:
        if not isinstance(text, str) or not text.strip():
            raise GenerationError(f"prompt must be non-empty text, got {text!r}")
        return self.tokenizer.encode(text)

    def chat(self, messages: Sequence[dict]) -> list[int]:
        raise GenerationError("the raw prompt format has no conversations; use --prompt-format template or card")

    def training_example(self, instruction: str, output: str) -> tuple[list[int], list[int]]:
        """The instruction's ids, then the output's (encoded on its own) and EOS; labels on output + EOS."""
        _check_example(instruction, output)
        prompt = self.tokenizer.encode(instruction)
        target = self.tokenizer.encode(output, bos=False, eos=True)
        return prompt + target, [IGNORE_INDEX] * len(prompt) + target

    def chat_training_example(self, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
        raise DataError("the raw prompt format has no conversations; train 'messages' records with "
                        "--prompt-format template or card")


def format_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Ids of a single prompt in the model card's form: BOS + `[INST]{prompt} [/INST]`."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise GenerationError(f"prompt must be non-empty text, got {prompt!r}")
    return tokenizer.encode(f"[INST]{prompt} [/INST]", bos=True)


def format_chat(tokenizer: Tokenizer, messages: Sequence[dict]) -> list[int]:
    """Ids of a conversation in Mistral's v1 instruct format, ending with the user turn to answer."""
    system, turns = _parse_messages(messages, last_role="user", error=GenerationError)
    ids = [_bos_id(tokenizer)]
    for segment, _ in _encode_turns(tokenizer, system, turns):
        ids += segment
    return ids


def format_training_example(tokenizer: Tokenizer, instruction: str, output: str) -> tuple[list[int], list[int]]:
    """(ids, labels) of one instruction-tuning example: `format_prompt(instruction)` + output + EOS.

    The output is encoded on its own (with the dummy-prefix "▁"), as mistral-common encodes an assistant
    turn; labels are IGNORE_INDEX over the prompt and equal to the ids over the output and its EOS.
    """
    _check_example(instruction, output)
    prompt = format_prompt(tokenizer, instruction)
    target = tokenizer.encode(output, bos=False, eos=True)
    return prompt + target, [IGNORE_INDEX] * len(prompt) + target


def format_chat_training_example(tokenizer: Tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
    """(ids, labels) of a conversation ending with an assistant turn; labels only on assistant turns + their EOS.

    The ids up to any assistant turn equal `format_chat` of the messages before it, so the model learns to
    answer exactly the prompts it will be given.
    """
    system, turns = _parse_messages(messages, last_role="assistant", error=DataError)
    ids, labels = [_bos_id(tokenizer)], [IGNORE_INDEX]
    for segment, role in _encode_turns(tokenizer, system, turns):
        ids += segment
        labels += segment if role == "assistant" else [IGNORE_INDEX] * len(segment)
    return ids, labels


def _bos_id(tokenizer: Tokenizer) -> int:
    if tokenizer.bos_id is None:
        raise TokenizerError(f"{tokenizer.source} has no BOS token, which the card format starts with; "
                             f"use --prompt-format template or raw")
    return tokenizer.bos_id


def _check_example(instruction: str, output: str) -> None:
    if not isinstance(instruction, str) or not instruction.strip():
        raise DataError(f"training example has an empty instruction: {instruction!r}")
    if not isinstance(output, str) or not output.strip():
        raise DataError(f"training example has an empty output: {output!r}")


def pad_training_example(ids: list[int], labels: list[int], length: int, pad_id: int) -> tuple[list[int], list[int]]:
    """Right-pad (ids, labels) to `length`; padded labels are IGNORE_INDEX.

    Padding is marked by position, never by comparing ids with `pad_id`: Llama/Mistral checkpoints have no
    pad token and are usually padded with EOS, and a mask built from `ids == pad_id` would also erase the
    real EOS label, and the model would never learn to stop.
    """
    if len(ids) != len(labels):
        raise DataError(f"ids and labels differ in length: {len(ids)} != {len(labels)}")
    if len(ids) > length:
        raise DataError(f"example of {len(ids)} tokens does not fit the padded length {length}; truncate or raise the length")
    fill = length - len(ids)
    return ids + [pad_id] * fill, labels + [IGNORE_INDEX] * fill


def _parse_messages(
    messages: Sequence[dict], last_role: str, error: type[KomtError]
) -> tuple[str, list[tuple[str, str]]]:
    """Check a message list and split it into (system prompt, [(role, content), ...] alternating from user).

    Leading system messages are joined with a blank line; after them roles must alternate user/assistant,
    starting with user and ending with `last_role`.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise error(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r}")
    system_parts, turns = [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise error(f"message {i} must be {{'role': one of {ROLES}, 'content': str}}, got {message!r}")
        role, content = message["role"], message["content"]
        if role == "system":
            if turns:
                raise error(f"message {i}: a system message must come before the first user message")
            system_parts.append(content)
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise error(f"message {i} has role {role!r} but {expected!r} was expected: roles must alternate user/assistant")
        if not content.strip():
            raise error(f"message {i} ({role}) has empty content")
        turns.append((role, content))
    if not turns or turns[-1][0] != last_role:
        raise error(f"messages must end with a {last_role} message, got roles {[m.get('role') for m in messages]}")
    return "\n\n".join(p for p in system_parts if p), turns


def _encode_turns(tokenizer: Tokenizer, system: str, turns: list[tuple[str, str]]) -> list[tuple[list[int], str]]:
    """Encode each turn as mistral-common's v1 instruct tokenizer does; returns [(ids, role), ...]."""
    segments = []
    for i, (role, content) in enumerate(turns):
        if role == "user":
            if i == 0 and system:
                content = f"{system}\n\n{content}"
            segments.append((tokenizer.encode(f"[INST] {content} [/INST]", bos=False), role))
        else:
            segments.append((tokenizer.encode(content, bos=False, eos=True), role))
    return segments

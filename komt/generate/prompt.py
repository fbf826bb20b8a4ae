"""Prompt formats: the exact ids komt-mistral-7b-v1 was trained to see, for generation and for training.

Two formats, both pinned by tests/fixtures/tokenizer/expected.json:

- A single prompt is what the model card's usage code feeds the model: the string
  `[INST]{prompt} [/INST]` encoded as one piece of text (no space after `[INST]`), after BOS.
- A conversation follows Mistral's v1 instruct format (mistral-common's `InstructTokenizerV1`): BOS, then
  each user turn as the text `[INST] {content} [/INST]`, each assistant turn as its own encoding followed by
  EOS. Every segment is encoded separately, so each starts with sentencepiece's dummy-prefix "▁". A system
  message is prepended to the first user turn as `{system}\\n\\n{content}`, as mistral-common does.

Neither format has special tokens for `[INST]`: it is ordinary text ("▁[", "INST", "]") in this vocabulary.

The training forms reuse the same encodings, so a model trained on them sees at inference exactly the
prompt ids it was trained on; labels are -100 (ignored by cross-entropy) on prompt tokens and the target ids
plus their EOS elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence

from komt.errors import DataError, GenerationError, KomtError
from komt.generate.tokenizer import Tokenizer

IGNORE_INDEX = -100  # label of a position the loss skips (torch.nn.functional.cross_entropy's default)
ROLES = ("system", "user", "assistant")


def format_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Ids of a single prompt in the model card's form: BOS + `[INST]{prompt} [/INST]`."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise GenerationError(f"prompt must be non-empty text, got {prompt!r}")
    return tokenizer.encode(f"[INST]{prompt} [/INST]", bos=True)


def format_chat(tokenizer: Tokenizer, messages: Sequence[dict]) -> list[int]:
    """Ids of a conversation in Mistral's v1 instruct format, ending with the user turn to answer."""
    system, turns = _parse_messages(messages, last_role="user", error=GenerationError)
    ids = [tokenizer.bos_id]
    for segment, _ in _encode_turns(tokenizer, system, turns):
        ids += segment
    return ids


def format_training_example(tokenizer: Tokenizer, instruction: str, output: str) -> tuple[list[int], list[int]]:
    """(ids, labels) of one instruction-tuning example: `format_prompt(instruction)` + output + EOS.

    The output is encoded on its own (with the dummy-prefix "▁"), as mistral-common encodes an assistant
    turn; labels are IGNORE_INDEX over the prompt and equal to the ids over the output and its EOS.
    """
    if not isinstance(instruction, str) or not instruction.strip():
        raise DataError(f"training example has an empty instruction: {instruction!r}")
    if not isinstance(output, str) or not output.strip():
        raise DataError(f"training example has an empty output: {output!r}")
    prompt = format_prompt(tokenizer, instruction)
    target = tokenizer.encode(output, bos=False, eos=True)
    return prompt + target, [IGNORE_INDEX] * len(prompt) + target


def format_chat_training_example(tokenizer: Tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
    """(ids, labels) of a conversation ending with an assistant turn; labels only on assistant turns + their EOS.

    The ids up to any assistant turn equal `format_chat` of the messages before it, so the model learns to
    answer exactly the prompts it will be given.
    """
    system, turns = _parse_messages(messages, last_role="assistant", error=DataError)
    ids, labels = [tokenizer.bos_id], [IGNORE_INDEX]
    for segment, role in _encode_turns(tokenizer, system, turns):
        ids += segment
        labels += segment if role == "assistant" else [IGNORE_INDEX] * len(segment)
    return ids, labels


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

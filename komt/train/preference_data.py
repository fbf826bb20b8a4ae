"""Preference data for DPO: {"prompt", "chosen", "rejected"} records -> token ids, truncated as trl does.

Each field is a string, or a list of {"role", "content"} messages (trl's conversational form, and
ko_Ultrafeedback_binarized's / UltraFeedback's):

    {"prompt": "질문", "chosen": "좋은 답", "rejected": "나쁜 답"}
    {"prompt": [{"role": "user", "content": "질문"}],
     "chosen": [{"role": "assistant", "content": "좋은 답"}], "rejected": [{"role": "assistant", ...}]}
    {"prompt": "질문", "chosen": [{"role": "user", "content": "질문"}, {"role": "assistant", "content": "좋은 답"}], ...}

A response list is the assistant's continuation: one assistant message, optionally after a repeat of the
prompt's own messages (the UltraFeedback layout, whose chosen/rejected hold the whole conversation). The
prompt and each response go through the model's prompt format in one place, `encode_turn`, exactly as a
training example would (`komt.generate.prompt`): the prompt is BOS + `[INST]...[/INST]`, a response its
own encoding + EOS, so the model is preferred-trained on exactly the prompts it is later given.

Truncation, in tokens, is the rule of trl's DPOTrainer (0.x, the version with `max_prompt_length` that
komt-mistral-7b-v1-dpo was trained with; truncation_mode "keep_end"):

    longer = max(len(chosen), len(rejected))
    if len(prompt) + longer > max_length: prompt = prompt[-max_prompt_length:]     (keep its end)
    if len(prompt) + longer > max_length: each response = response[:max_length - max_prompt_length]

so a sequence never exceeds max_length. As in trl, a prompt cut this way loses its start (BOS and
`[INST]` included); such pairs are counted and reported. A pair whose responses are cut to identical ids
carries no preference any more and is dropped (and counted). A malformed record (wrong types, a missing
field, an empty response, chosen identical to rejected) is a `DataError` naming the file and line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from komt.errors import DataError
from komt.generate.prompt import IGNORE_INDEX, PromptFormat
from komt.generate.tokenizer import Tokenizer
from komt.train.data import Example, as_prompt_format, read_records

FIELDS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PreferencePair:
    """One tokenized pair: the shared prompt and the two responses (each ending in EOS), after truncation.

    `ref_chosen` / `ref_rejected` are the reference model's log-probabilities of the two responses, filled
    in once before training (see `komt.train.dpo`).
    """

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    where: str  # "file:line"
    ref_chosen: float | None = None
    ref_rejected: float | None = None

    @property
    def length(self) -> int:
        """Tokens of the longer of the two sequences (what batching sorts by)."""
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))

    def sequences(self) -> tuple[Example, Example]:
        """(prompt + chosen, prompt + rejected) as training examples whose labels are the response tokens."""
        prompt_labels = [IGNORE_INDEX] * len(self.prompt)
        return (Example(self.prompt + self.chosen, prompt_labels + self.chosen, self.where),
                Example(self.prompt + self.rejected, prompt_labels + self.rejected, self.where))


@dataclass
class PreferenceDataset:
    pairs: list[PreferencePair]
    n_records: int
    n_prompt_truncated: int  # pairs whose prompt lost its start to --max-prompt-length
    n_response_truncated: int  # pairs whose responses were cut to --max-length - --max-prompt-length
    n_dropped: int  # pairs whose responses became identical when cut


def encode_turn(fmt: PromptFormat, prompt: str | list[dict], response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids + end of turn) in the prompt format `fmt`: the one place DPO formats text.

    It asks the SFT formatting for the whole example and splits it where the final labelled run (the
    response) starts, so DPO's ids are SFT's ids, in the card format or the checkpoint's chat template.
    """
    if isinstance(prompt, str):
        ids, labels = fmt.training_example(prompt, response)
    else:
        ids, labels = fmt.chat_training_example([*prompt, {"role": "assistant", "content": response}])
    start = len(ids)
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return ids[:start], ids[start:]


def response_text(record: dict, field: str) -> str:
    """The text of `chosen` / `rejected`: a string, or the assistant message that continues the prompt."""
    value = record[field]
    if isinstance(value, list):
        prompt = record["prompt"]
        prompt_messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if len(value) > 1 and _same_messages(value[:-1], prompt_messages):
            value = value[-1:]  # UltraFeedback's layout: the whole conversation, prompt included
        last = value[0] if len(value) == 1 else None
        if not (isinstance(last, dict) and last.get("role") == "assistant" and isinstance(last.get("content"), str)):
            raise DataError(f"field {field!r} must be a string or a list holding one assistant message (after the "
                            f"prompt's own messages), got {_short(value)}")
        value = last["content"]
    if not isinstance(value, str):
        raise DataError(f"field {field!r} must be a string or a list of messages, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"field {field!r} is empty: a preference needs two real responses")
    return value


def encode_pair(record: Any, fmt: PromptFormat | Tokenizer) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) ids of one record, before truncation; DataError if it is malformed.
    `fmt`: a prompt format, or a tokenizer (its `auto` format)."""
    fmt = as_prompt_format(fmt)
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    missing = [key for key in FIELDS if key not in record]
    if missing:
        raise DataError(f"a preference record needs 'prompt', 'chosen' and 'rejected'; missing {missing}, "
                        f"has {sorted(record)}")
    prompt = record["prompt"]
    if not isinstance(prompt, (str, list)):
        raise DataError(f"field 'prompt' must be a string or a list of messages, got {type(prompt).__name__}")
    chosen_text, rejected_text = response_text(record, "chosen"), response_text(record, "rejected")
    prompt_c, chosen = encode_turn(fmt, prompt, chosen_text)
    prompt_r, rejected = encode_turn(fmt, prompt, rejected_text)
    if prompt_c != prompt_r:  # a format whose tokens merge across the boundary: keep the shared prefix (as trl)
        shared = _common_prefix(prompt_c + chosen, prompt_r + rejected)
        chosen, rejected = (prompt_c + chosen)[shared:], (prompt_r + rejected)[shared:]
        prompt_c = prompt_c[:shared]
    if chosen == rejected:
        raise DataError("'chosen' and 'rejected' are the same response: the pair expresses no preference")
    return prompt_c, chosen, rejected


def truncate_pair(prompt: list[int], chosen: list[int], rejected: list[int], max_prompt_length: int,
                  max_length: int) -> tuple[list[int], list[int], list[int]]:
    """trl's DPOTrainer rule (see module docstring): the prompt keeps its end, then the responses their start."""
    longer = max(len(chosen), len(rejected))
    if len(prompt) + longer > max_length:
        prompt = prompt[-max_prompt_length:]
    if len(prompt) + longer > max_length:
        chosen, rejected = chosen[:max_length - max_prompt_length], rejected[:max_length - max_prompt_length]
    return prompt, chosen, rejected


def load_preferences(path: str | Path, fmt: PromptFormat | Tokenizer, max_prompt_length: int,
                     max_length: int) -> PreferenceDataset:
    """Every record of `path` (JSON list or JSONL), tokenized in the prompt format `fmt` (a tokenizer: its
    `auto` format) and truncated; DataError on the first bad one."""
    fmt = as_prompt_format(fmt)
    if not 0 < max_prompt_length < max_length:
        raise DataError(f"max_prompt_length ({max_prompt_length}) must be positive and below max_length ({max_length})")
    records = read_records(path)
    pairs, prompt_cut, response_cut, dropped = [], 0, 0, 0
    for line_no, record in records:
        where = f"{path}:{line_no}"
        try:
            prompt, chosen, rejected = encode_pair(record, fmt)
        except DataError as err:
            raise DataError(f"{where}: {err}") from None
        cut = truncate_pair(prompt, chosen, rejected, max_prompt_length, max_length)
        prompt_cut += len(cut[0]) < len(prompt)
        response_cut += len(cut[1]) < len(chosen) or len(cut[2]) < len(rejected)
        if cut[1] == cut[2]:
            dropped += 1
            continue
        pairs.append(PreferencePair(*cut, where=where))
    if not pairs:
        raise DataError(f"{path}: every one of the {len(records)} pairs has identical responses within "
                        f"--max-length {max_length}; raise --max-length")
    return PreferenceDataset(pairs, len(records), prompt_cut, response_cut, dropped)


def _same_messages(a: list, b: list) -> bool:
    """Equal as conversations: same roles and contents (other keys, e.g. ids, are ignored)."""
    return len(a) == len(b) and all(isinstance(x, dict) and isinstance(y, dict) and x.get("role") == y.get("role")
                                    and x.get("content") == y.get("content") for x, y in zip(a, b))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."

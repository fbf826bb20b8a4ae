"""Training data: a JSON or JSONL file of records -> (ids, labels) examples in the model's prompt format.

Two record shapes, mixed freely in one file:

    {"instruction": "...", "output": "...", "input": "..."}   input optional, appended Alpaca-style
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}, ...]}

Records are encoded by a prompt format (komt.generate.prompt; given a tokenizer, its `auto` format). In the
`card` format (komt's own models) an instruction record becomes BOS + `[INST]{instruction} [/INST]` +
output + EOS, a conversation Mistral's v1 chat format with labels on every assistant turn; in the
`template` format both go through the checkpoint's chat template, labels on the assistant turns and their
end-of-turn token. Labels are -100 on the prompt and include the EOS, so the model learns to stop.
Examples are truncated to `max_seq_len` tokens; one whose target falls entirely past the cut teaches
nothing and is dropped (and counted). Any malformed record is a `DataError` naming the file and line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from komt.errors import DataError
from komt.generate.prompt import IGNORE_INDEX, PromptFormat, prompt_format
from komt.generate.tokenizer import Tokenizer
from komt.jsonutil import parse_json_list
from komt.train.jsonl import jsonl_records


@dataclass(frozen=True)
class Example:
    """One tokenized training example; `labels[i]` is the target of position i (or IGNORE_INDEX)."""

    ids: list[int]
    labels: list[int]
    where: str  # "file:line", for messages about this example

    @property
    def n_targets(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class Dataset:
    examples: list[Example]
    n_records: int
    n_dropped: int  # examples whose whole target lay past max_seq_len


def read_records(path: str | Path) -> list[tuple[int, Any]]:
    """[(line number, parsed record)] from a JSON list or a JSONL file (told apart by the first character)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: files saved by Windows editors start with a BOM
    except FileNotFoundError:
        raise DataError(f"{path}: no such data file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, expected a .json or .jsonl data file") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror or err}") from None
    if text.lstrip().startswith("["):
        records = parse_json_list(text, str(path), DataError)
    else:
        records = list(jsonl_records(text.splitlines(), path))
    if not records:
        raise DataError(f"{path}: no records (expected a JSON list or JSON lines of training examples)")
    return records


def instruction_text(record: dict) -> str:
    """The instruction, with a non-empty `input` appended after a blank line (the Alpaca convention)."""
    extra = record.get("input")
    if extra is not None and not isinstance(extra, str):
        raise DataError(f"field 'input' must be a string, got {type(extra).__name__}")
    return f"{record['instruction']}\n\n{extra}" if extra and extra.strip() else record["instruction"]


def encode_record(record: Any, fmt: PromptFormat | Tokenizer) -> tuple[list[int], list[int]]:
    """(ids, labels) of one record of either shape (see module docstring), in `fmt` (or a tokenizer's auto format)."""
    fmt = as_prompt_format(fmt)
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return fmt.chat_training_example(record["messages"])
    missing = [key for key in ("instruction", "output") if key not in record]
    if missing:
        raise DataError(f"record needs 'instruction' and 'output' (or 'messages'); missing {missing}, "
                        f"has {sorted(record)}")
    for key in ("instruction", "output"):
        if not isinstance(record[key], str):
            raise DataError(f"field {key!r} must be a string, got {type(record[key]).__name__}")
    return fmt.training_example(instruction_text(record), record["output"])


def as_prompt_format(fmt: PromptFormat | Tokenizer) -> PromptFormat:
    """`fmt` itself, or the `auto` prompt format of a tokenizer."""
    return fmt if hasattr(fmt, "chat_training_example") else prompt_format(fmt)


def load_dataset(path: str | Path, fmt: PromptFormat | Tokenizer, max_seq_len: int) -> Dataset:
    """Every record of `path`, tokenized in `fmt` and truncated to `max_seq_len`; DataError on the first bad one."""
    if max_seq_len < 2:
        raise DataError(f"max_seq_len must be at least 2, got {max_seq_len}")
    fmt = as_prompt_format(fmt)
    examples, dropped = [], 0
    records = read_records(path)
    for line_no, record in records:
        where = f"{path}:{line_no}"
        try:
            ids, labels = encode_record(record, fmt)
        except DataError as err:
            raise DataError(f"{where}: {err}") from None
        example = Example(ids[:max_seq_len], labels[:max_seq_len], where)
        if example.n_targets == 0:
            dropped += 1
            continue
        examples.append(example)
    if not examples:
        raise DataError(f"{path}: none of the {len(records)} examples has a target within max_seq_len "
                        f"{max_seq_len} tokens; raise --max-seq-len")
    return Dataset(examples, len(records), dropped)

"""Streaming JSON Lines: one object per line, read lazily, every bad line a DataError naming file and line.

Shared by the training data (komt.train.data), the multi-task data builder (whose inputs can be larger than
memory) and the evaluation. Each line is parsed as strictly as a config (komt.jsonutil.parse_json).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from komt.errors import DataError
from komt.jsonutil import parse_json


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a bad line is a DataError naming file and line."""
    path = Path(path)
    try:
        f = open(path, encoding="utf-8-sig")  # -sig: files saved by Windows editors start with a BOM
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        yield from jsonl_records(f, path)


def jsonl_records(lines: Iterable[str], source: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of `lines`, the lines of the file `source`."""
    line_no = 0
    try:
        for line_no, line in enumerate(lines, 1):
            if not line.strip():
                continue
            record = parse_json(line.rstrip("\r\n"), str(source), DataError, line=line_no)  # "at column" of this line
            if not isinstance(record, dict):
                raise DataError(f"{source}:{line_no}: expected a JSON object, got {type(record).__name__}")
            yield line_no, record
    except UnicodeDecodeError:  # reading the next line of a file
        raise DataError(f"{source}:{line_no + 1}: not UTF-8 text") from None

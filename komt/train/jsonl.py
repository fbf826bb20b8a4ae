"""Streaming JSON Lines: one object per line, read lazily, every bad line a DataError naming file and line.

Shared by the multi-task data builder (whose inputs can be larger than memory) and the evaluation.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from komt.errors import DataError


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a bad line is a DataError naming file and line."""
    path = Path(path)
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        line_no = 0
        try:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
                yield line_no, record
        except UnicodeDecodeError:
            raise DataError(f"{path}:{line_no + 1}: not UTF-8 text") from None

"""Reading the files a user hands komt: regular files only, then strict JSON, every failure one line.

Two ways a plain `json.loads(path.read_text())` goes wrong on hostile or broken input:

- `open` on a FIFO (or a character device) blocks until a writer appears, so a FIFO named
  `config.json` or `model.safetensors` hangs the program. `require_regular_file` looks at the file type
  (`os.stat`, following symlinks: the Hugging Face cache's snapshot files are symlinks into `blobs/`)
  before anything is opened.
- The standard parser raises RecursionError on deeply nested input (`[[[[...`), accepts `NaN`,
  `Infinity` and `1e400` (= inf) although JSON has no such numbers, and keeps the last of two equal
  keys silently. `parse_json` turns each into the caller's one-line `KomtError`.

Used by komt/model (config.json, safetensors headers, shard indexes, adapter configs), the training and
evaluation readers of JSON/JSONL records (with `DataError`, naming `file:line`), and the server's request
bodies.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

from komt.errors import ConfigError, KomtError

_FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def require_regular_file(path: str | os.PathLike, error: type[KomtError] = ConfigError) -> None:
    """Raise `error` unless `path` is a regular file (or a symlink to one); FileNotFoundError passes through.

    Call it before `open`: opening a FIFO for reading waits for a writer forever.
    """
    mode = os.stat(path).st_mode
    if stat.S_ISREG(mode):
        return
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
    raise error(f"{path}: is {kind}, not a regular file; pass the real file")


def is_int(value: Any) -> bool:
    """An integer and not a boolean: JSON `true` parses to Python's bool, which is an int (`True == 1`)."""
    return isinstance(value, int) and not isinstance(value, bool)


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(f"the key {key!r:.80} appears twice in one object")
        result[key] = value
    return result


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text:.40} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


_STRICT = dict(parse_float=_finite_float, parse_constant=_no_constant, object_pairs_hook=_unique_keys)


def _invalid(err: Exception, source: str, error: type[KomtError], line: int | None) -> KomtError:
    """The one-line error for a parse failure; with `line` (where the data starts in `source`) it names
    `source:line` of the fault, as the readers of data files do."""
    at = getattr(err, "lineno", 1)  # only a syntax error knows its line; the others are placed at the start
    where = source if line is None else f"{source}:{line + at - 1}"
    if isinstance(err, RecursionError):
        why = "nested too deeply"
    elif isinstance(err, UnicodeDecodeError):
        why = "not UTF-8 text"
    elif isinstance(err, json.JSONDecodeError):
        why = f"{err.msg} at {'' if line is not None else f'line {err.lineno} '}column {err.colno}"
    else:  # the hooks above, and integers past Python's 4300-digit limit
        why = str(err).splitlines()[0][:120]
    return error(f"{where}: not valid JSON: {why}")


def parse_json(data: str | bytes, source: str, error: type[KomtError] = ConfigError, line: int | None = None) -> Any:
    """`data` parsed as strict JSON (no NaN/Infinity, no out-of-range floats, no duplicate keys).

    Every failure is `error(f"{source}: not valid JSON: ...")`, one line, never a traceback; given `line`,
    the line of `source` that `data` starts on (a JSON Lines record, a whole data file: 1), it is
    `error(f"{source}:{line of the fault}: not valid JSON: ...")`.
    """
    try:
        return json.loads(data, **_STRICT)
    except (RecursionError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _invalid(err, source, error, line) from None


def parse_json_list(text: str, source: str, error: type[KomtError] = ConfigError) -> list[tuple[int, Any]]:
    """[(line, element)] of the JSON list `text` (`[a, b, ...]`), each element parsed as strictly as
    `parse_json` and one at a time, so that each keeps the line of `source` it starts on."""
    decoder = json.JSONDecoder(**_STRICT)
    items, pos = [], _skip_space(text, text.index("[") + 1)
    while pos < len(text) and text[pos] != "]":
        line = text.count("\n", 0, pos) + 1
        try:
            item, pos = decoder.raw_decode(text, pos)
        except (RecursionError, ValueError) as err:  # a syntax error knows its own line in `text`
            raise _invalid(err, source, error, 1 if isinstance(err, json.JSONDecodeError) else line) from None
        items.append((line, item))
        pos = _skip_space(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_space(text, pos + 1)
        elif pos < len(text) and text[pos] != "]":
            raise error(f"{source}:{text.count(chr(10), 0, pos) + 1}: not valid JSON: expected ',' or ']'")
    if pos >= len(text) or text[pos + 1:].strip():
        raise error(f"{source}:{text.count(chr(10), 0, pos) + 1}: not valid JSON: the list is not closed properly")
    return items


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def read_json(path: str | os.PathLike, error: type[KomtError] = ConfigError, line: int | None = None) -> Any:
    """The strict JSON content of the regular file `path`; FileNotFoundError passes through (callers say
    what the missing file means), anything else unreadable is `error`. `line=1` names the fault's line
    as `path:line` (see `parse_json`)."""
    path = Path(path)
    require_regular_file(path, error)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as err:
        raise error(f"{path}: cannot read: {err.strerror or err}") from None
    return parse_json(data, str(path), error, line)


def read_json_object(path: str | os.PathLike, error: type[KomtError] = ConfigError) -> dict[str, Any]:
    """The JSON object in an optional file such as tokenizer_config.json: {} when `path` is not there, else
    `read_json`'s content, which must be an object."""
    path = Path(path)
    if not path.exists():
        return {}
    data = read_json(path, error)
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data

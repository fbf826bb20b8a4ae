"""Reading the files a user hands komt: regular files only, then strict JSON, every failure one line.

Two ways a plain `json.loads(path.read_text())` goes wrong on hostile or broken input:

- `open` on a FIFO (or a character device) blocks until a writer appears, so a FIFO named
  `config.json` or `model.safetensors` hangs the program. `require_regular_file` looks at the file type
  (`os.stat`, following symlinks: the Hugging Face cache's snapshot files are symlinks into `blobs/`)
  before anything is opened.
- The standard parser raises RecursionError on deeply nested input (`[[[[...`), accepts `NaN`,
  `Infinity` and `1e400` (= inf) although JSON has no such numbers, and keeps the last of two equal
  keys silently. `parse_json` turns each into the caller's one-line `KomtError`.

Used by komt/model (config.json, safetensors headers, shard indexes, adapter configs); the training and
evaluation readers of JSON/JSONL records can call `parse_json` the same way (with `DataError`).
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


def parse_json(data: str | bytes, source: str, error: type[KomtError] = ConfigError) -> Any:
    """`data` parsed as strict JSON (no NaN/Infinity, no out-of-range floats, no duplicate keys).

    Every failure is `error(f"{source}: ...")`, one line, never a traceback.
    """
    try:
        return json.loads(data, parse_float=_finite_float, parse_constant=_no_constant,
                          object_pairs_hook=_unique_keys)
    except RecursionError:
        raise error(f"{source}: not valid JSON: nested too deeply") from None
    except UnicodeDecodeError:
        raise error(f"{source}: not valid JSON: not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise error(f"{source}: not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except ValueError as err:  # the hooks above, and integers past Python's 4300-digit limit
        raise error(f"{source}: not valid JSON: {str(err).splitlines()[0][:120]}") from None


def read_json(path: str | os.PathLike, error: type[KomtError] = ConfigError) -> Any:
    """The strict JSON content of the regular file `path`; FileNotFoundError passes through (callers say
    what the missing file means), anything else unreadable is `error`."""
    path = Path(path)
    require_regular_file(path, error)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as err:
        raise error(f"{path}: cannot read: {err.strerror or err}") from None
    return parse_json(data, str(path), error)

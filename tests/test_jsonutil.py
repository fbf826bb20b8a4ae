"""komt.jsonutil: strict JSON and regular files only, every failure the caller's one-line KomtError."""

from __future__ import annotations

import os
import signal

import pytest

from komt.errors import ConfigError, DataError
from komt.jsonutil import parse_json, read_json, require_regular_file


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"a": ' * 50_000 + "1" + "}" * 50_000, "nested too deeply"),
        ('{"x": NaN}', "NaN is not a JSON number"),
        ('{"x": -Infinity}', "-Infinity is not a JSON number"),
        ('{"x": 1e400}', "the number 1e400 is out of range"),
        ('{"x": ' + "9" * 5000 + "}", "Exceeds the limit (4300 digits)"),
        ('{"a": 1, "a": 2}', "the key 'a' appears twice in one object"),
        ('{"a": 1,}', "not valid JSON: Expecting property name enclosed in double quotes at line 1 column 9"),
        (b'{"a": "\xff"}', "not UTF-8 text"),
    ],
    ids=["deep-array", "deep-object", "nan", "minus-infinity", "float-overflow", "huge-int", "duplicate-key",
         "trailing-comma", "not-utf8"],
)
def test_bad_json_is_the_callers_one_line_error(text, fragment):
    """A training record is parsed the same way as a config, only with DataError (komt/train can call this)."""
    with pytest.raises(DataError) as info:
        parse_json(text, "data.jsonl:3", DataError)
    message = str(info.value)
    assert message.startswith("data.jsonl:3: not valid JSON") and fragment in message and "\n" not in message


def test_good_json_parses_as_the_standard_library_does():
    assert parse_json('{"a": [1, 2.5, "x", null, true], "b": {"c": -3e-5}}', "x") == {
        "a": [1, 2.5, "x", None, True], "b": {"c": -3e-5}}


def test_read_json_refuses_a_fifo_without_opening_it(tmp_path):
    os.mkfifo(tmp_path / "config.json")
    signal.alarm(20)  # opening it would block forever
    try:
        with pytest.raises(ConfigError, match="config.json: is a FIFO, not a regular file"):
            read_json(tmp_path / "config.json")
    finally:
        signal.alarm(0)


def test_missing_file_passes_through_for_the_caller_to_explain(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path / "absent.json")


def test_a_symlink_to_a_regular_file_is_a_regular_file(tmp_path):
    (tmp_path / "blob").write_text('{"ok": 1}')
    (tmp_path / "config.json").symlink_to(tmp_path / "blob")
    require_regular_file(tmp_path / "config.json")
    assert read_json(tmp_path / "config.json") == {"ok": 1}
    with pytest.raises(ConfigError, match="is a folder"):
        require_regular_file(tmp_path)

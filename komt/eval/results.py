"""Judged answers on disk, in komt's published format: one JSON object per line with
`id, instruction, answer, chatgpt, score` (`chatgpt` is the judge's raw reply, `score` an integer 0-5).

The output file is a log, not a document: each record is appended, flushed and fsynced as soon as it is
judged, so a crash or Ctrl-C loses at most the answer in flight, and a rerun skips the ids already there.
A crash in the middle of a write can leave a torn last line (no newline, not JSON); `read_results` cuts it
off, since that answer was never recorded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO

from komt.errors import DataError
from komt.jsonutil import is_int, parse_json
from komt.eval.questions import Question
from komt.train.jsonl import read_jsonl

FIELDS = ("id", "instruction", "answer", "chatgpt", "score")


def make_record(question: Question, answer: str, reply: str, score: int) -> dict:
    return {"id": question.id, "instruction": question.instruction, "answer": answer, "chatgpt": reply,
            "score": score}


def check_record(path: Path, line_no: int, record: dict) -> dict:
    """`record` if it has the published fields with sane types; otherwise a DataError naming the line."""
    missing = [name for name in FIELDS if name not in record]
    if missing:
        raise DataError(f"{path}:{line_no}: missing field {missing[0]!r} (a results line has {', '.join(FIELDS)})")
    score = record["score"]
    if not is_int(score) or not 0 <= score <= 5:
        raise DataError(f"{path}:{line_no}: \"score\" must be an integer 0-5, got {score!r}")
    if not is_int(record["id"]):
        raise DataError(f"{path}:{line_no}: \"id\" must be an integer, got {record['id']!r}")
    return record


def read_results(path: str | Path, questions: list[Question] | None = None) -> dict[int, dict]:
    """Records of a results file by id (empty if it does not exist), checked against `questions`.

    A torn last line is cut off the file; an id that is not a question, or whose instruction differs,
    means the file belongs to another question set: a DataError rather than a silently mixed report.
    """
    path = Path(path)
    if not path.exists():
        return {}
    cut_torn_tail(path)
    by_id = {q.id: q for q in questions} if questions is not None else None
    records: dict[int, dict] = {}
    for line_no, record in read_jsonl(path):
        check_record(path, line_no, record)
        qid = record["id"]
        if by_id is not None:
            if qid not in by_id:
                raise DataError(f"{path}:{line_no}: id {qid} is not one of the questions; is this the right file?")
            if record["instruction"].strip() != by_id[qid].instruction.strip():
                raise DataError(f"{path}:{line_no}: the instruction of id {qid} differs from the question's")
        if qid in records:
            raise DataError(f"{path}:{line_no}: id {qid} is recorded twice")
        records[qid] = record
    return records


def cut_torn_tail(path: Path) -> None:
    """Drop a last line that has no newline and is not JSON: the remains of a write cut short."""
    with open(path, "rb") as f:
        data = f.read()
    if not data or data.endswith(b"\n"):
        return
    start = data.rfind(b"\n") + 1
    try:
        parse_json(data[start:], str(path), DataError)  # as strictly as read_jsonl will read it
        with open(path, "ab") as f:  # a complete record that only lacks its newline: keep it
            f.write(b"\n")
    except DataError:
        os.truncate(path, start)


class ResultsWriter:
    """Appends records to a results file, each flushed and fsynced before `write` returns."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

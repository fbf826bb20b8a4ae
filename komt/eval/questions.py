"""The evaluation's questions: komt's 37 Korean instructions, or a file of your own.

The 37 come packaged in komt/eval/data/ (from davidkim205/komt, Apache-2.0; see data/README.md). komt's
ChatGPT-judged table is computed over exactly these, so only this set is comparable with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from komt.errors import DataError
from komt.jsonutil import is_int
from komt.train.jsonl import read_jsonl

DATA_DIR = Path(__file__).parent / "data"
QUESTIONS_FILE = DATA_DIR / "komt_eval_questions.jsonl"
RESULTS_DIR = DATA_DIR / "komt_eval_results"


@dataclass(frozen=True)
class Question:
    id: int
    instruction: str


def load_questions(path: str | Path | None = None) -> list[Question]:
    """komt's 37 questions, or those of `path`: JSONL with id and instruction, or text with one per line.

    A text file's questions get ids 0, 1, 2, ... in file order.
    """
    path = Path(path) if path is not None else QUESTIONS_FILE
    if path.suffix == ".txt":
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: cannot read as UTF-8 text ({e})") from None
        questions = [Question(i, line.strip()) for i, line in enumerate(line for line in lines if line.strip())]
    else:
        questions = []
        for line_no, record in read_jsonl(path):
            qid, instruction = record.get("id"), record.get("instruction")
            if not is_int(qid):
                raise DataError(f"{path}:{line_no}: \"id\" must be an integer, got {qid!r}")
            if not isinstance(instruction, str) or not instruction.strip():
                raise DataError(f"{path}:{line_no}: \"instruction\" must be non-empty text")
            questions.append(Question(qid, instruction))
    ids = [q.id for q in questions]
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: question ids repeat (id {next(i for i in ids if ids.count(i) > 1)})")
    if not questions:
        raise DataError(f"{path}: no questions")
    return questions

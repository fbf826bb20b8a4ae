"""The evaluation loop: for each question not yet scored, answer it, judge the answer, append the record.

Resumable by construction: the output file is read first and every id already in it is skipped, and each
record is on disk (flushed and fsynced) before the next question starts.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import IO

from komt.eval.answers import Answerer
from komt.eval.judge import Judge, grade
from komt.eval.questions import Question
from komt.eval.results import ResultsWriter, make_record, read_results
from komt.progress import StatusLine, bar


class Progress:
    """A one-line progress bar on stderr (one line per update when stderr is not a terminal)."""

    def __init__(self, total: int, done: int, stream: IO[str] | None = None, width: int = 24) -> None:
        self.total, self.done, self.width = total, done, width
        self.line = StatusLine(stream if stream is not None else sys.stderr)
        self.start = time.monotonic()
        self.fresh = 0  # updates in this run (the ones the rate is measured on)

    def update(self, question: Question, score: int) -> None:
        self.done += 1
        self.fresh += 1
        elapsed = time.monotonic() - self.start
        eta = elapsed / self.fresh * (self.total - self.done)
        self.line.draw(f"{bar(self.done, self.total, self.width)} {self.done}/{self.total}  id {question.id}: "
                       f"score {score}  {elapsed:.0f} s, ~{eta:.0f} s left")
        if self.done == self.total:
            self.line.close()


def evaluate(
    questions: list[Question],
    output: str | Path,
    answer: Answerer,
    judge: Judge | None,
    *,
    attempts: int = 3,
    progress_stream: IO[str] | None = None,
) -> tuple[list[dict], int]:
    """Answer and judge every question missing from `output`; return (all records in question order,
    how many of this run's judge replies held no score).

    `judge` may be None when nothing is left to judge (a finished run, reread for its report).
    """
    done = read_results(output, questions)
    todo = [q for q in questions if q.id not in done]
    unparsed = 0
    if todo:
        if judge is None:
            raise ValueError(f"{len(todo)} questions are not judged yet and no judge was given")
        progress = Progress(len(questions), len(questions) - len(todo), progress_stream)
        with ResultsWriter(output) as writer:
            for question in todo:
                text = answer(question)
                result = grade(judge, question.instruction, text, attempts)
                unparsed += not result.parsed
                record = make_record(question, text, result.reply, result.score)
                writer.write(record)
                done[question.id] = record
                progress.update(question, result.score)
    return [done[q.id] for q in questions], unparsed

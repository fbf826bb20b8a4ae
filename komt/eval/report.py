"""The report: a run's score, average and percentage, and the table that puts it among komt's published rows.

komt's README table gives, per system, score = the sum of the 37 judge scores, average = score / 37 and
percentage = score / (5 x 37). Its two-decimal figures are cut, not rounded (clova X: 136 / 37 = 3.6756 is
printed 3.67; gpt-3.5-turbo: 147 / 185 = 79.459 % is printed 79.45 %), so `cut2` cuts too, in integer
arithmetic, and the recomputed rows print the published digits. The published rows are recomputed from
the published files, not copied from the table: two table rows disagree with their own files
(`published_discrepancies` finds them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from komt.eval.questions import DATA_DIR, RESULTS_DIR, load_questions
from komt.eval.results import read_results

PUBLISHED_TABLE = DATA_DIR / "published_table.json"


def cut2(numerator: int, denominator: int) -> str:
    """numerator / denominator cut to two decimals, exactly: cut2(136, 37) == "3.67"."""
    hundredths = numerator * 100 // denominator
    return f"{hundredths // 100}.{hundredths % 100:02d}"


@dataclass(frozen=True)
class Row:
    model: str
    score: int  # sum of the per-question scores
    n: int  # number of questions

    @property
    def average(self) -> str:
        return cut2(self.score, self.n)

    @property
    def percentage(self) -> str:
        return cut2(self.score * 100, 5 * self.n)


def row_from_records(model: str, records: list[dict]) -> Row:
    return Row(model, sum(r["score"] for r in records), len(records))


def published_rows() -> list[Row]:
    """komt's 14 published systems, in the README's order, recomputed from their result files."""
    questions = load_questions()
    rows = []
    for entry in json.loads(PUBLISHED_TABLE.read_text(encoding="utf-8"))["rows"]:
        records = read_results(RESULTS_DIR / entry["file"], questions)
        rows.append(row_from_records(entry["model"], list(records.values())))
    return rows


def published_discrepancies() -> list[str]:
    """One line per figure where komt's README table differs from the sum of its own result files."""
    lines = []
    published = json.loads(PUBLISHED_TABLE.read_text(encoding="utf-8"))["rows"]
    for entry, row in zip(published, published_rows()):
        for name, recomputed in (("score", row.score), ("average", row.average), ("percentage", row.percentage)):
            if str(entry[name]) != str(recomputed):
                lines.append(f"{row.model}: the table says {name} {entry[name]}, its file gives {recomputed}")
    return lines


def markdown_table(rows: list[Row], highlight: Row | None = None) -> str:
    """The rows as komt's README table, best score first; `highlight` (the new run) in bold."""
    lines = ["| model | score | average (0~5) | percentage |", "|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: -r.score):
        cells = [row.model, str(row.score), row.average, f"{row.percentage}%"]
        if row is highlight:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(row: Row, unparsed: int = 0, compare: bool = True) -> str:
    """The run's summary line and, for komt's 37 questions, the table among the published rows."""
    text = f"{row.model}: score {row.score}, average {row.average} (0~5), percentage {row.percentage}% " \
           f"over {row.n} questions"
    if unparsed:
        text += f"\n{unparsed} judge replies held no score and count as 0 (as in komt's published files)"
    if compare:
        text += "\n\n" + markdown_table(published_rows() + [row], highlight=row)
        text += "\n\nThe published rows are recomputed from komt's result files; komt's README table differs on:\n"
        text += "\n".join(f"- {line}" for line in published_discrepancies())
    return text

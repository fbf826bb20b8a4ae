"""Tests of komt/eval/report.py (and the packaged data): the published table, recomputed from komt's files."""

from __future__ import annotations

import json

import pytest

from komt.eval.questions import QUESTIONS_FILE, RESULTS_DIR, load_questions
from komt.eval.report import PUBLISHED_TABLE, Row, cut2, markdown_table, published_discrepancies, published_rows
from komt.eval.results import read_results


@pytest.mark.parametrize("numerator, denominator, text", [
    (131, 37, "3.54"), (136, 37, "3.67"), (142, 37, "3.83"),  # 3.6756 and 3.8378: cut, not rounded
    (14700, 185, "79.45"), (0, 37, "0.00"), (18500, 185, "100.00"), (1, 3, "0.33"), (2, 3, "0.66"),
])
def test_cut2_cuts_to_two_decimals(numerator, denominator, text):
    assert cut2(numerator, denominator) == text


def test_packaged_questions_are_the_37_of_every_published_file():
    questions = load_questions()
    assert [q.id for q in questions] == list(range(37))
    files = sorted(RESULTS_DIR.glob("score_result_*.jsonl"))
    assert len(files) == 14
    for path in files:
        assert sorted(read_results(path, questions)) == list(range(37))  # raises if an instruction differs
    assert QUESTIONS_FILE.exists() and (QUESTIONS_FILE.parent / "README.md").exists()


def test_komt_mistral_7b_v1_row_reproduces_131_354_7081():
    records = read_results(RESULTS_DIR / "score_result_komt-mistral-7b-v1.jsonl", load_questions()).values()
    row = Row("komt-mistral-7b-v1", sum(r["score"] for r in records), len(records))
    assert (row.score, row.average, row.percentage) == (131, "3.54", "70.81")


def test_recomputed_rows_match_the_published_table_except_two_scores():
    published = json.loads(PUBLISHED_TABLE.read_text(encoding="utf-8"))["rows"]
    rows = published_rows()
    assert [r.model for r in rows] == [p["model"] for p in published]
    for row, entry in zip(rows, published):
        assert (row.average, row.percentage) == (entry["average"], entry["percentage"])
        if row.model not in ("Llama-2-13b-chat-hf", "komt-llama-30b-v1"):
            assert row.score == entry["score"]
    assert published_discrepancies() == [
        "Llama-2-13b-chat-hf: the table says score 73, its file gives 71",
        "komt-llama-30b-v1: the table says score 129, its file gives 117",
    ]


def test_markdown_table_puts_the_new_row_at_its_rank_in_bold():
    new = Row("my-model", 135, 37)
    lines = markdown_table(published_rows() + [new], highlight=new).splitlines()
    assert lines[:2] == ["| model | score | average (0~5) | percentage |", "|---|---|---|---|"]
    names = [line.split(" | ")[0].lstrip("| ") for line in lines[2:]]
    i = names.index("**my-model**")
    assert names[i - 1] == "clova X" and names[i + 1] == "komt-mistral-7b-v1"  # 136 > 135 > 131
    assert lines[2 + i] == "| **my-model** | **135** | **3.64** | **72.97%** |"
    assert len(lines) == 2 + 15

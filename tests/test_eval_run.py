"""End-to-end tests of `python -m komt.eval` (komt/eval/cli.py, run.py, answers.py, results.py): a tiny model
answers the 37 questions, a scripted judge on 127.0.0.1 grades them, runs resume where they stopped."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from test_eval_judge import DROP, ScriptedJudge, reply, status
from test_eval_perplexity import tiny_korean_checkpoint

import komt
from komt.errors import DataError
from komt.eval.answers import cached_answerer
from komt.eval.cli import main
from komt.eval.judge import Judge, JudgeError
from komt.eval.questions import RESULTS_DIR, Question, load_questions
from komt.eval.results import FIELDS, read_results
from komt.eval.run import evaluate
from komt.generate import generate
from komt.generate.prompt import format_prompt

QUESTIONS = load_questions()

# Reply forms a judge produces, each with the score it must count as.
REPLIES = [("점수: 4", 4), ("Score: 5", 5), ("4/5", 4), ("**3**", 3), ('{"score": 2}', 2),
           ("답변이 질문과 무관합니다.\n점수: 1", 1), ("0", 0), ("5점 만점에 3점", 3)]


def question_of(body: dict) -> Question:
    """Which question a grading request is about (its instruction is in the prompt)."""
    prompt = body["messages"][1]["content"]
    (question,) = [q for q in QUESTIONS if q.instruction.strip() in prompt]
    return question


class PerQuestionScript:
    """Scripted replies by question: reply forms in turn, plus the trouble cases of the test."""

    def __init__(self, trouble: dict[int, list[tuple]] | None = None) -> None:
        self.trouble = trouble or {}
        self.calls: dict[int, int] = {}

    def __call__(self, body: dict) -> tuple:
        qid = question_of(body).id
        n = self.calls[qid] = self.calls.get(qid, 0) + 1
        actions = self.trouble.get(qid, [])
        if n <= len(actions):
            return actions[n - 1]
        return reply(REPLIES[qid % len(REPLIES)][0])


def expected_score(qid: int) -> int:
    return REPLIES[qid % len(REPLIES)][1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_korean_checkpoint(tmp_path_factory.mktemp("ckpt"))


def test_end_to_end_tiny_model_and_scripted_judge(tmp_path, checkpoint, monkeypatch, capsys):
    trouble = {
        0: [status(500, "overloaded")],  # transient: retried after back-off
        1: [DROP],  # connection dropped: retried
        2: [reply("I'm sorry, but I don't know.")],  # no score: asked again
        3: [reply("The lake is big.")] * 3,  # never a score: 0, raw reply kept
    }
    script = PerQuestionScript(trouble)
    monkeypatch.setenv("KOMT_TEST_JUDGE_KEY", "secret-1")
    output = tmp_path / "run.jsonl"
    with ScriptedJudge(script) as server:
        code = main(["--model", str(checkpoint), "--output", str(output), "--max-new-tokens", "6", "--seed", "5",
                     "--device", "cpu", "--judge-url", server.url, "--judge-model", "grader",
                     "--api-key-env", "KOMT_TEST_JUDGE_KEY", "--name", "tiny"])
    assert code == 0
    lines = output.read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["id"] for r in records] == list(range(37))
    assert all(tuple(r) == FIELDS for r in records)  # komt's published field order
    assert [r["instruction"] for r in records] == [q.instruction for q in QUESTIONS]

    want = {q.id: expected_score(q.id) for q in QUESTIONS}
    want[3] = 0
    assert {r["id"]: r["score"] for r in records} == want
    assert records[3]["chatgpt"] == "The lake is big."
    assert records[2]["chatgpt"] == REPLIES[2][0]

    # Answers are the generator's with the model card's sampling and seed + id, decoded.
    model, tokenizer = komt.load_model(checkpoint), komt.load_tokenizer(checkpoint)
    for q in (QUESTIONS[0], QUESTIONS[17]):
        new = generate(model, format_prompt(tokenizer, q.instruction), max_new_tokens=6, temperature=0.8,
                       top_k=100, top_p=0.8, seed=5 + q.id, eos_id=tokenizer.eos_id)
        assert records[q.id]["answer"] == tokenizer.decode(new)
    assert len({r["answer"] for r in records}) > 30  # sampled per question, not one answer repeated

    # The judge saw the key, the model name and each answer; retries and re-asks went where scripted.
    assert all(h["Authorization"] == "Bearer secret-1" and b["model"] == "grader" for _, h, b in server.requests)
    assert script.calls[0] == 2 and script.calls[1] == 2 and script.calls[2] == 2 and script.calls[3] == 3
    assert len(server.requests) == 37 + 1 + 1 + 1 + 2
    assert all(records[question_of(b).id]["answer"].strip() in b["messages"][1]["content"]
               for _, _, b in server.requests)

    total = sum(want.values())
    out = capsys.readouterr()
    assert f"tiny: score {total}, average {total * 100 // 37 // 100}." in out.out
    assert "| **tiny** |" in out.out and "| komt-mistral-7b-v1 | 131 | 3.54 | 70.81% |" in out.out
    assert "1 judge replies held no score" in out.out
    assert "Traceback" not in out.err and "37/37" in out.err  # the progress bar
    side = [json.loads(line) for line in output.with_suffix(".answers.jsonl").read_text().splitlines()]
    assert {r["id"]: r["answer"] for r in side} == {r["id"]: r["answer"] for r in records}


class CountingAnswerer:
    def __init__(self, stop_at: int | None = None) -> None:
        self.asked: list[int] = []
        self.stop_at = stop_at

    def __call__(self, question: Question) -> str:
        if question.id == self.stop_at:
            raise KeyboardInterrupt
        self.asked.append(question.id)
        return f"답변 {question.id}"


def test_resume_skips_scored_ids_and_reuses_saved_answers(tmp_path):
    output = tmp_path / "run.jsonl"
    cache = output.with_suffix(".answers.jsonl")
    first = CountingAnswerer()
    with ScriptedJudge(PerQuestionScript({5: [status(401, "bad key")]})) as server:
        judge = Judge(server.url, "m", sleep=lambda s: None)
        with pytest.raises(JudgeError, match="HTTP 401"):
            evaluate(QUESTIONS, output, cached_answerer(first, cache, QUESTIONS), judge)
        before = output.read_bytes()
        assert sorted(read_results(output, QUESTIONS)) == [0, 1, 2, 3, 4]
        assert first.asked == [0, 1, 2, 3, 4, 5]  # answer 5 was made, then its judging failed

        second = CountingAnswerer()
        n_before = len(server.requests)
        records, _ = evaluate(QUESTIONS, output, cached_answerer(second, cache, QUESTIONS), judge)
    assert second.asked == list(range(6, 37))  # 5 comes from the saved answers
    judged = [question_of(b).id for _, _, b in server.requests[n_before:]]
    assert judged == list(range(5, 37))
    assert output.read_bytes().startswith(before)  # earlier records untouched
    assert [r["id"] for r in records] == list(range(37))
    assert records[5]["answer"] == "답변 5" and records[5]["score"] == expected_score(5)


def test_an_interrupted_run_keeps_every_finished_record(tmp_path):
    output = tmp_path / "run.jsonl"
    with ScriptedJudge(PerQuestionScript()) as server:
        with pytest.raises(KeyboardInterrupt):
            evaluate(QUESTIONS, output, CountingAnswerer(stop_at=7), Judge(server.url, "m"))
    records = read_results(output, QUESTIONS)
    assert sorted(records) == list(range(7))
    assert all(records[i]["score"] == expected_score(i) for i in range(7))


def test_a_torn_last_line_is_cut_and_that_id_judged_again(tmp_path):
    output = tmp_path / "run.jsonl"
    shutil.copy(RESULTS_DIR / "score_result_komt-mistral-7b-v1.jsonl", output)
    lines = output.read_text(encoding="utf-8").splitlines(keepends=True)
    output.write_text("".join(lines[:36]) + lines[36][:50], encoding="utf-8")  # crash mid-write of id 36
    with ScriptedJudge(PerQuestionScript()) as server:
        records, _ = evaluate(QUESTIONS, output, CountingAnswerer(), Judge(server.url, "m"))
    assert [question_of(b).id for _, _, b in server.requests] == [36]
    assert records[36]["answer"] == "답변 36" and len(output.read_text().splitlines()) == 37


def test_results_of_another_question_set_are_refused(tmp_path):
    output = tmp_path / "run.jsonl"
    output.write_text(json.dumps({"id": 99, "instruction": "x", "answer": "y", "chatgpt": "1", "score": 1}) + "\n")
    with pytest.raises(DataError, match=r"run\.jsonl:1: id 99 is not one of the questions"):
        evaluate(QUESTIONS, output, CountingAnswerer(), None)


def test_published_answers_are_judged_from_a_file(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    answers = RESULTS_DIR / "score_result_komt-mistral-7b-v1.jsonl"
    output = tmp_path / "rejudged.jsonl"
    with ScriptedJudge(PerQuestionScript()) as server:
        assert main(["--answers", str(answers), "--output", str(output), "--judge-url", server.url,
                     "--judge-model", "m"]) == 0
    assert all("Authorization" not in h for _, h, _ in server.requests)
    published = read_results(answers, QUESTIONS)
    records = read_results(output, QUESTIONS)
    assert all(records[i]["answer"] == published[i]["answer"] for i in range(37))
    assert "rejudged: score" in capsys.readouterr().out


def test_report_only_for_a_finished_file_reproduces_the_published_row(tmp_path, capsys):
    output = tmp_path / "komt-mistral-7b-v1.jsonl"
    shutil.copy(RESULTS_DIR / "score_result_komt-mistral-7b-v1.jsonl", output)
    assert main(["--output", str(output)]) == 0  # nothing left to judge: no judge flags needed
    out = capsys.readouterr().out
    assert out.startswith("komt-mistral-7b-v1: score 131, average 3.54 (0~5), percentage 70.81% over 37 questions")
    assert "Llama-2-13b-chat-hf: the table says score 73, its file gives 71" in out


@pytest.mark.parametrize("args, needle", [
    (["--answers", "{partial}"], r"partial\.jsonl: no answer for question id\(s\) 2, 3$"),
    (["--answers", "{answers}", "--api-key-env", "KOMT_UNSET_VAR"], r"variable KOMT_UNSET_VAR is not set$"),
    (["--answers", "{bad}"], r"bad\.jsonl:1: not valid JSON"),
])
def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys, args, needle):
    monkeypatch.delenv("KOMT_UNSET_VAR", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    partial = tmp_path / "partial.jsonl"
    partial.write_text("".join(json.dumps({"id": i, "answer": "a"}) + "\n" for i in range(37) if i not in (2, 3)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{nope\n")
    args = [a.format(partial=partial, bad=bad, answers=RESULTS_DIR / "score_result_clova.jsonl") for a in args]
    code = main(args + ["--output", str(tmp_path / "o.jsonl"), "--judge-url", "http://127.0.0.1:9/v1",
                        "--judge-model", "m"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert re.search(needle, err.strip())
    assert not (tmp_path / "o.jsonl").exists()


def test_flag_errors_are_argparse_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--answers", "a.jsonl", "--model", "m", "--output", str(tmp_path / "o.jsonl")])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith("error: 37 questions are not scored yet: give --model or --answers (one of them)")
    assert not (tmp_path / "o.jsonl").exists()

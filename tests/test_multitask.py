"""Tests of komt/train/multitask.py: the FLAN-style Korean multi-task instruction builder."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import pytest

from komt.errors import DataError
from komt.train import templates as tpl
from komt.train.multitask import build, main, parse_task_spec


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def write_jsonl(path: Path, records: list[dict]) -> str:
    return write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_out(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def run(tmp_path: Path, *specs: str, seed: int = 0, **kwargs) -> tuple[list[dict], list]:
    out = tmp_path / "out.jsonl"
    stats = build([parse_task_spec(s) for s in specs], out, seed=seed, **kwargs)
    return read_out(out), stats


def rendered(kind: str, **fields) -> set[str]:
    """Every instruction the built-in templates of `kind` can make of `fields`."""
    return {t.format(**fields) for t in tpl.TEMPLATES[kind]}


SQUAD = {
    "version": "KorQuAD_v1.0",
    "data": [
        {"title": "서울", "paragraphs": [
            {"context": "서울은 대한민국의 수도이며 한강이 도시를 가로지른다.",
             "qas": [
                 {"id": "q1", "question": "대한민국의 수도는?", "answers": [{"text": "서울", "answer_start": 0}]},
                 {"id": "q2", "question": "서울을 가로지르는 강은?",
                  "answers": [{"text": "한강", "answer_start": 14}, {"text": "한강이", "answer_start": 14}]},
             ]},
        ]},
        {"title": "빈 질문", "paragraphs": [
            {"context": "이 문단에는 답이 없다.",
             "qas": [{"id": "q3", "question": "답은?", "answers": [], "is_impossible": True}]},
        ]},
    ],
}


def reviews(n: int) -> list[dict]:
    return [{"text": f"리뷰 {i}번: {'좋아요' if i % 2 else '별로예요'}", "label": i % 2} for i in range(n)]


@pytest.fixture
def labels(tmp_path: Path) -> str:
    return write(tmp_path / "labels.json", json.dumps({"0": "부정", "1": "긍정"}, ensure_ascii=False))


def test_squad_qa_gives_first_answer_and_skips_unanswerable(tmp_path):
    path = write(tmp_path / "korquad.json", json.dumps(SQUAD, ensure_ascii=False))
    out, (stats,) = run(tmp_path, f"qa:{path}")
    context = SQUAD["data"][0]["paragraphs"][0]["context"]
    by_output = {r["output"]: r["instruction"] for r in out}
    assert set(by_output) == {"서울", "한강"}
    assert by_output["서울"] in rendered("qa", context=context, question="대한민국의 수도는?")
    assert by_output["한강"] in rendered("qa", context=context, question="서울을 가로지르는 강은?")
    assert (stats.read, stats.skipped, stats.written) == (3, 1, 2)


def test_jsonl_qa_reads_hugging_face_answers(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [
        {"context": "고양이는 물을 싫어한다.", "question": "고양이가 싫어하는 것은?",
         "answers": {"text": ["물"], "answer_start": [5]}},
    ])
    out, _ = run(tmp_path, f"qa:{path}:answer=answers")
    assert out == [{"instruction": out[0]["instruction"], "output": "물"}]
    assert out[0]["instruction"] in rendered("qa", context="고양이는 물을 싫어한다.", question="고양이가 싫어하는 것은?")


def test_classification_csv_maps_labels_to_names(tmp_path, labels):
    path = write(tmp_path / "reviews.csv", 'id,review,polarity\n1,"최고, 또 볼래요",1\n2,지루했다,0\n')
    out, _ = run(tmp_path, f"cls:{path}:text=review,label=polarity,labels={labels}")
    got = {r["output"]: r["instruction"] for r in out}
    assert got["긍정"] in rendered("cls", text="최고, 또 볼래요", options="부정, 긍정")
    assert got["부정"] in rendered("cls", text="지루했다", options="부정, 긍정")


def test_tsv_keeps_bare_quotes_in_text(tmp_path, labels):
    # NSMC-style TSV: quotes inside a review are text, not CSV quoting.
    path = write(tmp_path / "nsmc.txt", 'id\tdocument\tlabel\n1\t"명작" 이라는 말이 아깝다\t0\n')
    out, _ = run(tmp_path, f"cls:{path}:format=tsv,text=document,labels={labels}")
    assert out[0]["output"] == "부정"
    assert out[0]["instruction"] in rendered("cls", text='"명작" 이라는 말이 아깝다', options="부정, 긍정")


def test_nli_default_label_names(tmp_path):
    path = write_jsonl(tmp_path / "kornli.jsonl", [
        {"premise": "남자가 기타를 친다.", "hypothesis": "남자가 악기를 연주한다.", "label": "entailment"},
        {"premise": "남자가 기타를 친다.", "hypothesis": "남자가 잠을 잔다.", "label": 2},
        {"premise": "남자가 기타를 친다.", "hypothesis": "남자는 가수다.", "label": "neutral"},
    ])
    out, _ = run(tmp_path, f"nli:{path}")
    got = {r["output"]: r["instruction"] for r in out}
    assert set(got) == {"참", "거짓", "중립"}
    assert got["거짓"] in rendered("nli", premise="남자가 기타를 친다.", hypothesis="남자가 잠을 잔다.",
                                  options="참, 중립, 거짓")


def test_null_label_name_skips_the_example(tmp_path):
    label_map = write(tmp_path / "snli.json", json.dumps({"entailment": "참", "contradiction": "거짓", "-": None}))
    path = write_jsonl(tmp_path / "snli.jsonl", [
        {"premise": "a", "hypothesis": "b", "label": "-"},
        {"premise": "a", "hypothesis": "c", "label": "contradiction"},
    ])
    out, (stats,) = run(tmp_path, f"nli:{path}:labels={label_map}")
    assert [r["output"] for r in out] == ["거짓"]
    assert "참, 거짓" in out[0]["instruction"]  # the options leave out the skipped label
    assert stats.skipped == 1


def test_summarization_and_translation(tmp_path):
    docs = write_jsonl(tmp_path / "news.jsonl", [{"article": "긴 기사 본문.", "summary": "짧은 요약."}])
    pairs = write_jsonl(tmp_path / "ko_en.jsonl", [{"source": "안녕하세요", "target": "Hello"}])
    out, _ = run(tmp_path, f"sum:{docs}:document=article", f"mt:{pairs}:src=ko,tgt=en")
    got = {r["output"]: r["instruction"] for r in out}
    assert got["짧은 요약."] in rendered("sum", document="긴 기사 본문.")
    assert got["Hello"] in rendered("mt", source="안녕하세요", src_lang="한국어", tgt_lang="영어", tgt_lang_ro="영어로")


def test_particle_after_language_name():
    assert tpl.with_ro("영어") == "영어로"
    assert tpl.with_ro("영문") == "영문으로"
    assert tpl.with_ro("일본말") == "일본말로"  # ㄹ final takes 로


def test_templates_vary_and_custom_templates_are_used(tmp_path, labels):
    rows = reviews(60)
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    out, _ = run(tmp_path, f"cls:{path}:labels={labels}")
    instructions = {r["instruction"] for r in out}
    used = {i for i, t in enumerate(tpl.CLASSIFICATION)
            for row in rows if t.format(text=row["text"], options="부정, 긍정") in instructions}
    assert used == set(range(len(tpl.CLASSIFICATION)))  # every template is picked over 60 examples
    assert all(any(i in rendered("cls", text=row["text"], options="부정, 긍정") for row in rows) for i in instructions)
    own = write(tmp_path / "mine.json", json.dumps(["분류: {text} ({options})"], ensure_ascii=False))
    out, _ = run(tmp_path, f"cls:{path}:labels={labels},templates={own}")
    assert {r["instruction"] for r in out} == {f"분류: {row['text']} (부정, 긍정)" for row in rows}


def test_template_with_unknown_placeholder_is_rejected(tmp_path, labels):
    path = write_jsonl(tmp_path / "r.jsonl", reviews(2))
    own = write(tmp_path / "bad.json", json.dumps(["{document}"]))
    with pytest.raises(DataError, match=r"bad\.json.*\{document\}"):
        parse_task_spec(f"cls:{path}:labels={labels},templates={own}")


def test_same_seed_same_bytes_other_seed_other_order(tmp_path, labels):
    path = write_jsonl(tmp_path / "r.jsonl", reviews(50))
    spec = [parse_task_spec(f"cls:{path}:labels={labels}")]
    a, b, c = (tmp_path / n for n in ("a.jsonl", "b.jsonl", "c.jsonl"))
    build(spec, a, seed=1)
    build(spec, b, seed=1)
    build(spec, c, seed=2)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_adding_a_task_leaves_other_tasks_examples_unchanged(tmp_path, labels):
    cls = write_jsonl(tmp_path / "r.jsonl", reviews(30))
    docs = write_jsonl(tmp_path / "d.jsonl", [{"document": f"문서 {i}", "summary": f"요약 {i}"} for i in range(30)])
    alone, _ = run(tmp_path, f"cls:{cls}:labels={labels}")
    mixed, _ = run(tmp_path, f"sum:{docs}", f"cls:{cls}:labels={labels}")
    as_set = lambda rows: {json.dumps(r, ensure_ascii=False) for r in rows}
    assert as_set(alone) <= as_set(mixed)
    assert len(mixed) == 60


def test_weights_scale_each_task(tmp_path, labels):
    path = write_jsonl(tmp_path / "r.jsonl", reviews(400))
    twice, (stats,) = run(tmp_path, f"cls:{path}:labels={labels},weight=2")
    assert stats.written == 800 and len(twice) == 800
    instructions = Counter(r["instruction"] for r in twice)
    assert max(instructions.values()) == 1  # the two copies of an example use two different templates
    half, (stats,) = run(tmp_path, f"cls:{path}:labels={labels},weight=0.5")
    assert 150 <= len(half) <= 250 and stats.dropped == 400 - len(half)  # Binomial(400, 0.5): sd 10
    none, (stats,) = run(tmp_path, f"cls:{path}:labels={labels},weight=0")
    assert none == [] and stats.dropped == 400


def test_mixing_follows_weights(tmp_path, labels):
    cls = write_jsonl(tmp_path / "r.jsonl", reviews(300))
    docs = write_jsonl(tmp_path / "d.jsonl", [{"document": f"문서 {i}", "summary": f"요약 {i}"} for i in range(300)])
    out, stats = run(tmp_path, f"cls:{cls}:labels={labels},weight=1.5", f"sum:{docs}:weight=0.25")
    n_cls = sum(r["output"] in ("부정", "긍정") for r in out)
    assert n_cls == stats[0].written and 390 <= n_cls <= 510  # expected 450
    assert len(out) - n_cls == stats[1].written and 45 <= len(out) - n_cls <= 105  # expected 75


def test_exact_duplicates_are_removed_within_and_across_tasks(tmp_path, labels):
    rows = reviews(10)
    path = write_jsonl(tmp_path / "r.jsonl", rows + rows[:4])
    out, stats = run(tmp_path, f"cls:{path}:labels={labels}", f"cls:{path}:labels={labels},weight=2")
    assert len(out) == 10
    assert (stats[0].duplicates, stats[1].duplicates, stats[1].written) == (4, 14, 0)


def test_shuffle_is_a_permutation_also_when_buckets_spill(tmp_path, labels):
    cls = write_jsonl(tmp_path / "r.jsonl", reviews(200))
    docs = write_jsonl(tmp_path / "d.jsonl", [{"document": f"문서 {i}", "summary": f"요약 {i}"} for i in range(200)])
    specs = (f"cls:{cls}:labels={labels}", f"sum:{docs}")
    roomy, _ = run(tmp_path, *specs)
    tight, _ = run(tmp_path, *specs, shuffle_bytes=500)  # every ~2 kB bucket is split again
    key = lambda r: json.dumps(r, ensure_ascii=False)
    assert sorted(map(key, roomy)) == sorted(map(key, tight))
    assert [key(r) for r in roomy] != [key(r) for r in tight]
    first_half_tasks = Counter(r["output"] in ("부정", "긍정") for r in roomy[:200])
    assert 70 <= first_half_tasks[True] <= 130  # tasks interleaved, not concatenated


def test_shuffle_leaves_no_trace_of_input_order(tmp_path):
    # Uniform order: an adjacent pair is in input order half the time (a bucket left unshuffled: ~92 %).
    docs = write_jsonl(tmp_path / "d.jsonl", [{"document": f"문서 {i}", "summary": str(i)} for i in range(400)])
    for shuffle_bytes in (1 << 20, 500):
        out, _ = run(tmp_path, f"sum:{docs}", seed=7, shuffle_bytes=shuffle_bytes)
        order = [int(r["output"]) for r in out]
        ascending = sum(a < b for a, b in itertools.pairwise(order)) / (len(order) - 1)
        assert 0.4 <= ascending <= 0.6


@pytest.mark.parametrize("content, needle", [
    ('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n{"text": "c", "label": \n', r"r\.jsonl:3: not valid JSON"),
    ('{"text": "a", "label": 0}\n{"txt": "b", "label": 1}\n', r"r\.jsonl:2: missing column 'text'"),
    ('{"text": "a", "label": 0}\n\n{"text": "b", "label": 7}\n', r"r\.jsonl:3: label '7' is not in .*labels\.json"),
    ('{"text": "", "label": 0}\n', r"r\.jsonl:1: column 'text' must be non-empty text"),
    ('["text", "label"]\n', r"r\.jsonl:1: expected a JSON object"),
])
def test_malformed_jsonl_names_file_and_line_and_leaves_no_output(tmp_path, labels, content, needle):
    path = write(tmp_path / "r.jsonl", content)
    out = tmp_path / "out.jsonl"
    with pytest.raises(DataError, match=needle):
        build([parse_task_spec(f"cls:{path}:labels={labels}")], out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.json", "r.jsonl"]


def test_malformed_csv_and_squad_name_the_line(tmp_path, labels):
    csv_path = write(tmp_path / "r.csv", "text,label\n좋다,1\n짧은 행\n")
    with pytest.raises(DataError, match=r"r\.csv:3: missing column 'label'"):
        build([parse_task_spec(f"cls:{csv_path}:labels={labels}")], tmp_path / "out.jsonl")
    squad = write(tmp_path / "s.json", '{"data": [\n{"paragraphs": [\n{"context": "x", "qas": [}\n]}]}')
    with pytest.raises(DataError, match=r"s\.json:3: not valid JSON"):
        build([parse_task_spec(f"qa:{squad}")], tmp_path / "out.jsonl")
    squad = write(tmp_path / "s.json", json.dumps({"data": [{"paragraphs": [
        {"context": "x", "qas": [{"id": "k9", "question": "q?"}]}]}]}))
    with pytest.raises(DataError, match=r"s\.json: data\[0\]\.paragraphs\[0\]\.qas\[0\] \(id k9\): missing \"answers\""):
        build([parse_task_spec(f"qa:{squad}")], tmp_path / "out.jsonl")


def test_failed_build_keeps_the_previous_output(tmp_path, labels):
    good = write_jsonl(tmp_path / "good.jsonl", reviews(5))
    bad = write(tmp_path / "bad.jsonl", '{"text": "a", "label": 0}\nnot json\n')
    out = tmp_path / "out.jsonl"
    build([parse_task_spec(f"cls:{good}:labels={labels}")], out)
    before = out.read_bytes()
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        build([parse_task_spec(f"cls:{good}:labels={labels}"), parse_task_spec(f"cls:{bad}:labels={labels}")], out)
    assert out.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("spec, needle", [
    ("xx:a.jsonl", "KIND one of"),
    ("cls:{r}", "classification needs labels="),
    ("cls:{r}:labels={labels},weight=-1", "weight must be a number >= 0"),
    ("sum:{r}:bogus=1", "unknown option"),
    ("sum:{tmp}/missing.jsonl", "no such file"),
    ("sum:{r}:format=xml", "cannot tell the format"),
])
def test_bad_task_specs(tmp_path, labels, spec, needle):
    r = write_jsonl(tmp_path / "r.jsonl", reviews(1))
    with pytest.raises(DataError, match=needle):
        parse_task_spec(spec.format(r=r, labels=labels, tmp=tmp_path))


def test_cli_prints_stats_and_reports_errors_in_one_line(tmp_path, labels, capsys):
    path = write_jsonl(tmp_path / "r.jsonl", reviews(6) + reviews(2))
    out = tmp_path / "out.jsonl"
    assert main(["--task", f"cls:{path}:labels={labels}", "--output", str(out), "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if line.startswith("cls:"))
    assert row.split()[1:6] == ["8", "0", "2", "0", "6"]  # read, skipped, dupes, dropped, written
    assert len(read_out(out)) == 6
    bad = write(tmp_path / "bad.jsonl", "{oops\n")
    assert main(["--task", f"cls:{bad}:labels={labels}", "--output", str(tmp_path / "o2.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.jsonl:1" in err and "Traceback" not in err
    assert not (tmp_path / "o2.jsonl").exists()

"""The multi-task builder's inputs: parsing a --task spec and reading its records as instruction fields.

`parse_task_spec("cls:reviews.csv:labels=sentiment.json,weight=0.5")` validates the spec once (kind,
format, columns, label map, templates); `read_task_records(spec)` streams the input's records (JSONL, CSV/TSV,
or a SQuAD / KorQuAD JSON document) each with its "file:line" for messages; `convert` turns one record into
the template fields of its task, or None for a record to skip. Every malformed input is a DataError naming
the file and record. The builder itself (sampling, dedup, shuffle, output) is komt/train/multitask.py.
"""

from __future__ import annotations

import csv
import json
import math
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from komt.errors import DataError
from komt.jsonutil import read_json
from komt.train import templates as tpl
from komt.train.jsonl import read_jsonl

# Kind -> the columns it reads, by role; an option ROLE=NAME renames one.
COLUMNS = {
    "qa": ("context", "question", "answer"),
    "cls": ("text", "label"),
    "nli": ("premise", "hypothesis", "label"),
    "sum": ("document", "summary"),
    "mt": ("source", "target"),
}
FORMATS = {".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv", ".json": "squad"}


@dataclass(frozen=True)
class TaskSpec:
    """One --task: what to read, how to name its labels, and how often to sample it."""

    text: str  # the spec as given, for messages and the task's random seed
    kind: str
    path: Path
    format: str
    columns: dict[str, str]
    weight: float = 1.0
    labels: dict[str, str | None] | None = None
    labels_source: str = ""
    templates: tuple[str, ...] = ()
    src_lang: str = "한국어"
    tgt_lang: str = "영어"

    @property
    def options(self) -> str:
        """The label names offered as choices, in the label map's order: "부정, 긍정"."""
        names = [n for n in (self.labels or {}).values() if n is not None]
        return ", ".join(dict.fromkeys(names))


def parse_task_spec(text: str) -> TaskSpec:
    """Parse KIND:PATH[:key=value,...] and load its label map and templates (validated here, once)."""
    kind, _, rest = text.partition(":")
    if kind not in COLUMNS or not rest:
        raise DataError(f"--task {text!r}: expected KIND:PATH[:OPTIONS] with KIND one of {', '.join(COLUMNS)}")
    path_text, options = rest, {}
    head, sep, tail = rest.rpartition(":")
    if sep and "=" in tail:  # a path may itself contain ':'; options always contain '='
        path_text = head
        for item in tail.split(","):
            key, eq, value = item.partition("=")
            if not eq or not key or not value:
                raise DataError(f"--task {text!r}: option {item!r} is not key=value")
            options[key.strip()] = value.strip()
    path = Path(path_text)
    if not path.is_file():
        raise DataError(f"--task {text!r}: no such file {path}")

    columns = {role: options.pop(role, role) for role in COLUMNS[kind]}
    fmt = options.pop("format", FORMATS.get(path.suffix.lower()))
    if fmt not in ("jsonl", "csv", "tsv", "squad") or (fmt == "squad" and kind != "qa"):
        raise DataError(f"--task {text!r}: cannot tell the format of {path}; add format=jsonl, csv or tsv")
    try:
        weight = float(options.pop("weight", "1"))
    except ValueError:
        weight = -1.0
    if not (weight >= 0 and math.isfinite(weight)):
        raise DataError(f"--task {text!r}: weight must be a number >= 0")

    labels, labels_source = None, ""
    if "labels" in options:
        labels_source = options.pop("labels")
        labels = _load_label_map(labels_source)
    elif kind == "nli":
        labels, labels_source = dict(tpl.NLI_LABELS), "the default NLI label names"
    elif kind == "cls":
        raise DataError(f"--task {text!r}: classification needs labels=FILE.json mapping labels to names")
    if kind in ("qa", "sum", "mt") and labels is not None:
        raise DataError(f"--task {text!r}: labels= applies to cls and nli only")

    templates = tuple(tpl.TEMPLATES[kind])
    if "templates" in options:
        templates = _load_templates(options.pop("templates"), kind)
    src = tpl.language_name(options.pop("src", "ko"))
    tgt = tpl.language_name(options.pop("tgt", "en"))
    if options:
        raise DataError(f"--task {text!r}: unknown option(s) {', '.join(options)} for {kind}")
    return TaskSpec(text, kind, path, fmt, columns, weight, labels, labels_source, templates, src, tgt)


def _load_json_file(path_text: str, what: str):
    """The strict JSON content of a label map or templates file (komt.jsonutil); errors open with `what`."""
    try:
        return read_json(path_text, DataError, line=1)
    except OSError as e:  # not found (read_json says the rest)
        raise DataError(f"{what} {path_text}: cannot read ({e.strerror})") from None
    except DataError as e:
        raise DataError(f"{what} {e}") from None


def _load_label_map(path_text: str) -> dict[str, str | None]:
    raw = _load_json_file(path_text, "label map")
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"label map {path_text}: expected a JSON object such as {{\"0\": \"부정\", \"1\": \"긍정\"}}")
    for key, name in raw.items():
        if name is not None and not (isinstance(name, str) and name.strip()):
            raise DataError(f"label map {path_text}: the name of label {key!r} must be text or null")
    return dict(raw)


def _load_templates(path_text: str, kind: str) -> tuple[str, ...]:
    raw = _load_json_file(path_text, "templates")
    if not isinstance(raw, list) or not raw or not all(isinstance(t, str) for t in raw):
        raise DataError(f"templates {path_text}: expected a non-empty JSON list of strings")
    for i, template in enumerate(raw):
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        except ValueError as e:
            raise DataError(f"templates {path_text}: template {i} is not a format string ({e})") from None
        unknown = names - tpl.FIELDS[kind]
        if unknown:
            raise DataError(
                f"templates {path_text}: template {i} uses {{{min(unknown)}}}; "
                f"{kind} templates may use {', '.join('{' + n + '}' for n in sorted(tpl.FIELDS[kind]))}"
            )
    return tuple(raw)


# ---- reading: (where, record) pairs, `where` being "file:line" for messages ----


def read_task_records(spec: TaskSpec) -> Iterator[tuple[str, dict]]:
    """Stream the records of one input file."""
    if spec.format == "squad":
        return _read_squad(spec.path)
    if spec.format == "jsonl":
        return _read_jsonl(spec.path)
    return _read_csv(spec.path, "\t" if spec.format == "tsv" else ",")


def _read_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    for line_no, record in read_jsonl(path):
        yield f"{path}:{line_no}", record


def _read_csv(path: Path, delimiter: str) -> Iterator[tuple[str, dict]]:
    # TSV dumps (NSMC, KorNLI) carry bare quotes inside the text, so TSV is read with no quoting.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = None
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: CSVs saved by Excel start with a BOM
            reader = csv.DictReader(f, delimiter=delimiter, quoting=quoting)
            if reader.fieldnames is None:
                raise DataError(f"{path}:1: empty file, expected a header row naming the columns")
            for row in reader:
                yield f"{path}:{reader.line_num}", row
    except UnicodeDecodeError:
        raise DataError(f"{path}:{(reader.line_num if reader else 0) + 1}: not UTF-8 text") from None
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num if reader else 1}: malformed CSV ({e})") from None


def _read_squad(path: Path) -> Iterator[tuple[str, dict]]:
    """SQuAD / KorQuAD 1.0: {"data": [{"paragraphs": [{"context", "qas": [{"question", "answers"}]}]}]}."""
    document = read_json(path, DataError, line=1)  # one JSON document: loaded whole (see the module docstring)
    articles = document.get("data") if isinstance(document, dict) else None
    if not isinstance(articles, list):
        raise DataError(f"{path}: not SQuAD JSON (expected a top-level \"data\" list)")
    for i, article in enumerate(articles):
        for j, paragraph in enumerate(_squad_list(article, "paragraphs", f"{path}: data[{i}]")):
            where = f"{path}: data[{i}].paragraphs[{j}]"
            context = paragraph.get("context")
            for k, qa in enumerate(_squad_list(paragraph, "qas", where)):
                qa_where = f"{where}.qas[{k}]" + (f" (id {qa['id']})" if isinstance(qa, dict) and "id" in qa else "")
                if not isinstance(qa, dict):
                    raise DataError(f"{qa_where}: expected an object")
                answers = qa.get("answers")
                if qa.get("is_impossible"):  # SQuAD 2.0: no answer in the context; skipped
                    answers = []
                elif not isinstance(answers, list) or not answers:
                    raise DataError(f"{qa_where}: missing \"answers\"")
                yield qa_where, {"context": context, "question": qa.get("question"), "answer": answers}


def _squad_list(parent, key: str, where: str) -> list:
    value = parent.get(key) if isinstance(parent, dict) else None
    if not isinstance(value, list):
        raise DataError(f"{where}: missing \"{key}\" list")
    return value


# ---- converting: record -> (template fields, output), or None to skip ----


def convert(spec: TaskSpec, where: str, record: dict) -> tuple[dict[str, str], str] | None:
    """The template fields and the answer of one record; None for an example to skip."""
    text = lambda role: _text(spec, where, record, role)
    if spec.kind == "qa":
        answer = _answer(where, _column(spec, where, record, "answer"))
        if answer is None:
            return None
        return {"context": text("context"), "question": text("question")}, answer
    if spec.kind in ("cls", "nli"):
        name = _label_name(spec, where, _column(spec, where, record, "label"))
        if name is None:
            return None
        if spec.kind == "cls":
            return {"text": text("text"), "options": spec.options}, name
        return {"premise": text("premise"), "hypothesis": text("hypothesis"), "options": spec.options}, name
    if spec.kind == "sum":
        return {"document": text("document")}, text("summary")
    fields = {"source": text("source"), "src_lang": spec.src_lang, "tgt_lang": spec.tgt_lang}
    fields["tgt_lang_ro"] = tpl.with_ro(spec.tgt_lang)
    return fields, text("target")


def _column(spec: TaskSpec, where: str, record: dict, role: str):
    column = spec.columns[role]
    value = record.get(column)
    if value is None:  # absent key, JSON null, or a CSV row with too few fields
        raise DataError(f"{where}: missing column {column!r} (the record has: {', '.join(map(str, record))})")
    return value


def _text(spec: TaskSpec, where: str, record: dict, role: str) -> str:
    value = _column(spec, where, record, role)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: column {spec.columns[role]!r} must be non-empty text, got {value!r:.40}")
    return value.strip()


def _answer(where: str, value) -> str | None:
    """First answer text of a string, [str], [{"text"}] (SQuAD) or {"text": [...]} (Hugging Face)."""
    if isinstance(value, dict):
        value = value.get("text")
    if isinstance(value, list):
        if not value:
            return None  # Hugging Face squad_v2: unanswerable
        value = value[0].get("text") if isinstance(value[0], dict) else value[0]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: the answer must be non-empty text, got {value!r:.40}")
    return value.strip()


def _label_name(spec: TaskSpec, where: str, value) -> str | None:
    key = json.dumps(value) if isinstance(value, bool) else str(value).strip()
    assert spec.labels is not None  # parse_task_spec gives cls and nli a label map
    if key not in spec.labels:
        known = ", ".join(map(repr, list(spec.labels)[:10]))
        raise DataError(f"{where}: label {key!r} is not in {spec.labels_source} (known: {known})")
    return spec.labels[key]

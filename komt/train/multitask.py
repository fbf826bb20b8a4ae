"""Build Korean multi-task instruction data (FLAN style) from supervised datasets.

komt's paper makes its Korean instruction data from supervised datasets of many tasks instead of
translating English instructions; this module turns such datasets into the trainer's JSONL,
one {"instruction": ..., "output": ...} object per line, each example phrased with one of several
Korean templates (komt/train/templates.py) chosen at random under the seed.

    python -m komt.train.multitask \\
        --task qa:KorQuAD_v1.0_train.json \\
        --task cls:ratings_train.txt:format=tsv,text=document,labels=sentiment.json,weight=0.5 \\
        --task nli:kornli.jsonl \\
        --task sum:news.jsonl:document=article,weight=2 \\
        --task mt:ko_en.jsonl:src=ko,tgt=en \\
        --output mixed.jsonl --seed 0

Each --task is KIND:PATH[:OPTIONS], OPTIONS a comma-separated list of key=value.
  qa   SQuAD / KorQuAD 1.0 JSON: context + question -> the first answer's text (SQuAD 2.0
       unanswerable questions are skipped). Also JSONL with context, question and answer columns;
       the answer may be a string or Hugging Face style {"text": [...]} (answer=answers).
  cls  CSV, TSV or JSONL with text and label columns; labels=FILE.json maps every label to a Korean
       name ({"0": "부정", "1": "긍정"}) and is required; the names are the choices in the instruction.
  nli  premise, hypothesis, label -> 참 / 중립 / 거짓 (entailment / neutral / contradiction, or 0 / 1 / 2);
       labels=FILE.json overrides the names.
  sum  document -> summary.
  mt   source -> target, with src= and tgt= language codes (ko, en, ja, zh, ...) or Korean names.
Options, any kind:
  COLUMN=NAME   the input's name for a column this kind reads (text=document, label=polarity, ...).
  weight=W      each source example is emitted floor(W) times plus once more with probability
                W - floor(W): 0.5 keeps a random half, 2 emits every example twice (different templates).
  labels=FILE   JSON object label -> name; a null name skips examples with that label (SNLI's "-").
  templates=FILE  JSON list of your own templates for this task ({text}, {options}, ... as in templates.py).
  format=F      jsonl, csv, tsv or squad when the extension (.jsonl .csv .tsv .json) does not say.

Design choices:
- Streaming. JSONL, CSV and TSV are read one record at a time. A SQuAD file is a single JSON document,
  so it is loaded whole (KorQuAD 1.0 train is 38 MB); split bigger ones or convert them to JSONL.
- Sampling by rate, not by reservoir. A weight is a per-example rate: it needs no count of the input in
  advance and holds nothing in memory, and the expected mix is weight x dataset size per task (the
  "mixing rates" of FLAN / T5). A reservoir would hold its whole sample in memory.
- Exact duplicates (same kind, fields and answer, in any task) are dropped before sampling. The seen-set
  keeps a 64-bit hash per unique example (~60 bytes each, ~600 MB per 10 M examples); the chance of a
  false duplicate among 10 M examples is about 3e-6.
- External shuffle in bounded memory: every output line goes to one of 16 bucket files chosen at random;
  each bucket is then shuffled in memory and appended to the output, and a bucket bigger than
  --shuffle-mb is split again the same way. Random buckets plus a uniform shuffle inside each bucket give
  a uniform permutation, and memory holds one bucket at a time.
- Deterministic: each task draws from its own random stream seeded by --seed and the task's spec, the
  shuffle from another, so adding a task leaves the other tasks' templates and samples unchanged.
- Atomic: all files are written under a temporary folder beside the output and moved into place with
  os.replace; a malformed record (komt.errors.DataError naming the file and line) leaves nothing behind.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from komt.argtypes import positive_int
from komt.errors import KomtError
from komt.train.task_inputs import TaskSpec, convert, parse_task_spec, read_task_records

SHUFFLE_FANOUT = 16


@dataclass
class Lengths:
    """Running min / mean / max of lengths in characters (streaming: no list kept)."""

    n: int = 0
    total: int = 0
    min: int = 0
    max: int = 0

    def add(self, length: int) -> None:
        self.min = length if self.n == 0 else min(self.min, length)
        self.max = max(self.max, length)
        self.n += 1
        self.total += length

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else 0.0


@dataclass
class TaskStats:
    task: str
    read: int = 0  # source records
    skipped: int = 0  # unanswerable / null label
    duplicates: int = 0
    dropped: int = 0  # sampled out by a weight < 1
    written: int = 0  # output examples, copies included
    instruction: Lengths = field(default_factory=Lengths)
    output: Lengths = field(default_factory=Lengths)


def emit_task(spec: TaskSpec, rng: random.Random, seen: set[int], write) -> TaskStats:
    """Convert, deduplicate, sample and render one task; `write(line)` receives each output line."""
    stats = TaskStats(spec.text)
    whole, fraction = int(spec.weight), spec.weight - int(spec.weight)
    for where, record in read_task_records(spec):
        stats.read += 1
        example = convert(spec, where, record)
        if example is None:
            stats.skipped += 1
            continue
        fields, answer = example
        key = json.dumps([spec.kind, fields, answer], ensure_ascii=False, sort_keys=True)
        digest = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
        if digest in seen:
            stats.duplicates += 1
            continue
        seen.add(digest)
        copies = whole + (rng.random() < fraction)
        if copies == 0:
            stats.dropped += 1
            continue
        # Copies of one example get distinct templates while there are enough of them.
        n = len(spec.templates)
        choices = rng.sample(range(n), min(copies, n)) + [rng.randrange(n) for _ in range(copies - n)]
        for choice in choices:
            instruction = spec.templates[choice].format(**fields)
            write(json.dumps({"instruction": instruction, "output": answer}, ensure_ascii=False) + "\n")
            stats.written += 1
            stats.instruction.add(len(instruction))
            stats.output.add(len(answer))
    return stats


def build(specs: list[TaskSpec], output: str | Path, seed: int = 0, shuffle_bytes: int = 256 << 20) -> list[TaskStats]:
    """Mix `specs` into one shuffled JSONL at `output`, written atomically; returns per-task statistics."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    shuffle_rng = random.Random(f"{seed}/shuffle")
    seen: set[int] = set()
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.") as tmp:
        buckets = [Path(tmp) / f"bucket{i}" for i in range(SHUFFLE_FANOUT)]
        files = [open(p, "w", encoding="utf-8") for p in buckets]
        try:
            write = lambda line: files[shuffle_rng.randrange(SHUFFLE_FANOUT)].write(line)
            stats = [emit_task(spec, random.Random(f"{seed}/{spec.text}"), seen, write) for spec in specs]
        finally:
            for f in files:
                f.close()
        partial = Path(tmp) / "output.jsonl"
        with open(partial, "w", encoding="utf-8") as out:
            for bucket in buckets:
                _shuffle_bucket(bucket, out, shuffle_rng, shuffle_bytes, depth=0)
        os.replace(partial, output)
    return stats


def _shuffle_bucket(bucket: Path, out: IO[str], rng: random.Random, budget: int, depth: int) -> None:
    """Append `bucket`'s lines to `out` in uniformly random order, holding at most ~`budget` bytes."""
    if bucket.stat().st_size <= budget or depth >= 4:  # depth 4: 16^5 buckets, i.e. a few huge lines
        with open(bucket, encoding="utf-8") as f:
            lines = f.readlines()
        rng.shuffle(lines)
        out.writelines(lines)
        bucket.unlink()
        return
    parts = [bucket.with_name(f"{bucket.name}.{i}") for i in range(SHUFFLE_FANOUT)]
    files = [open(p, "w", encoding="utf-8") for p in parts]
    with open(bucket, encoding="utf-8") as f:
        for line in f:
            files[rng.randrange(SHUFFLE_FANOUT)].write(line)
    for part_file in files:
        part_file.close()
    bucket.unlink()
    for part in parts:
        _shuffle_bucket(part, out, rng, budget, depth + 1)


def format_stats(stats: list[TaskStats]) -> str:
    """Per-task counts and lengths (characters) as an aligned text table, with a total row."""
    total = TaskStats("total")
    for s in stats:
        for name in ("read", "skipped", "duplicates", "dropped", "written"):
            setattr(total, name, getattr(total, name) + getattr(s, name))
        for mine, theirs in ((total.instruction, s.instruction), (total.output, s.output)):
            mine.n, mine.total, mine.max = mine.n + theirs.n, mine.total + theirs.total, max(mine.max, theirs.max)
    rows = [("task", "read", "skipped", "dupes", "dropped", "written", "instr mean/max", "output mean/max")]
    for s in stats + [total]:
        counts = (s.read, s.skipped, s.duplicates, s.dropped, s.written)
        lengths = (f"{s.instruction.mean:.0f}/{s.instruction.max}", f"{s.output.mean:.0f}/{s.output.max}")
        rows.append((s.task, *map(str, counts), *lengths))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))) for row in rows
    )


def main(argv: list[str] | None = None) -> int:
    doc_head, _, doc_rest = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(
        prog="python -m komt.train.multitask",
        description=doc_head,
        epilog=doc_rest.split("\nDesign choices:")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--task", action="append", required=True, metavar="KIND:PATH[:OPTIONS]",
                        help="an input dataset (repeatable); see below")
    parser.add_argument("--output", required=True, help="the mixed JSONL to write (atomically)")
    parser.add_argument("--seed", type=int, default=0, help="seed of templates, sampling and shuffle (default 0)")
    parser.add_argument("--shuffle-mb", type=positive_int, default=256,
                        help="memory for the external shuffle, in MB (default 256)")
    args = parser.parse_args(argv)
    try:
        specs = [parse_task_spec(text) for text in args.task]
        stats = build(specs, args.output, seed=args.seed, shuffle_bytes=args.shuffle_mb << 20)
    except KomtError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unreadable input, full disk, unwritable output folder
        print(f"error: {e.filename or args.output}: {e.strerror}", file=sys.stderr)
        return 2
    print(format_stats(stats))
    print(f"wrote {sum(s.written for s in stats)} examples to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

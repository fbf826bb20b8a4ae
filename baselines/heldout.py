"""The held-out texts the side-by-side scripts use, built from files already on the machine.

- Korean: the answers of one system (gpt-3.5-turbo by default) to komt's 37 evaluation instructions, from
  the komt project's published evaluation results (davidkim205/komt, Apache-2.0; /work/shared/data holds a
  copy with its attribution), written as {"instruction", "output"} JSONL: the trainer's format, which
  `python -m komt.eval --model M --perplexity FILE` scores on the answer tokens (and each answer's EOS).
- English: the text of the Apache License 2.0 as a Python package ships it in its dist-info (`packaging`'s
  LICENSE.APACHE by default; the licence text itself may be copied verbatim). SmolLM2 has read many copies
  of it, so its perplexity there is low and steady: a good probe of quantization error, not of knowledge.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path

from komt.atomic import atomic_file

KOMT_RESULTS = Path("/work/shared/data/komt_eval_results")
KOMT_ATTRIBUTION = "komt evaluation answers: davidkim205/komt (Apache-2.0), eval_results/"


def _is_apache_license(text: str) -> bool:
    return "Apache License" in text and "Version 2.0" in text and "END OF TERMS AND CONDITIONS" in text


def apache_license(preferred: str = "packaging") -> Path:
    """A file holding the Apache License 2.0 text from an installed distribution (`preferred` first)."""
    names = [preferred] + sorted({d.metadata["Name"] for d in importlib.metadata.distributions() if d.metadata["Name"]})
    for name in names:
        try:
            files = importlib.metadata.distribution(name).files or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for f in sorted(files, key=str):
            if "LICEN" in f.name.upper():
                path = Path(f.locate())
                if path.is_file() and _is_apache_license(path.read_text(encoding="utf-8", errors="replace")):
                    return path
    raise SystemExit("error: no installed distribution ships the Apache License 2.0 text; pass --english FILE")


def write_korean_jsonl(out: Path, system: str = "gpt-3.5-turbo", results: Path = KOMT_RESULTS) -> Path:
    """`out` := the system's 37 answers as {"instruction", "output"} records; returns `out`."""
    source = results / f"score_result_{system}.jsonl"
    if not source.exists():
        raise SystemExit(f"error: {source} not found (systems: {sorted(p.stem[13:] for p in results.glob('*.jsonl'))})")
    records = []
    for line in source.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            records.append({"instruction": row["instruction"].strip(), "output": row["answer"].strip()})
    with atomic_file(out) as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return out


def copy_text(src: Path, out: Path) -> Path:
    """`out` := the text of `src` (so that the file scored is beside the other inputs); returns `out`."""
    with atomic_file(out) as f:
        f.write(src.read_text(encoding="utf-8"))
    return out


def fingerprint(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]

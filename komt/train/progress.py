"""What a training run reports: a progress bar on stderr, `metrics.jsonl`, and a loss-curve PNG.

`metrics.jsonl` holds one JSON object per optimizer step (`step`, `loss`, `lr`, `tokens_per_s`, ...), flushed
as it is written, so it can be tailed or plotted while the run goes on. A resumed run first drops the
lines of steps after its checkpoint (a killed run may have logged a few), so the file ends up exactly as
an uninterrupted run would have written it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from komt.atomic import write_text_atomic
from komt.progress import StatusLine, bar

METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"


def say(log: TextIO | None, text: str) -> None:
    """One `komt.train: ...` line on the run's log (rank 0's stderr; None elsewhere)."""
    if log is not None:
        print(f"komt.train: {text}", file=log, flush=True)


class ProgressBar:
    """`step 12/100 [###.......] loss 1.234 lr 2.0e-04 1,234 tok/s eta 0:01:10` on one stderr line.

    On a terminal the line is redrawn in place; in a log file (not a tty) a line is printed every ~5% of
    the run, so logs stay short (komt.progress).
    """

    def __init__(self, total: int, start: int = 0, stream: TextIO | None = None, width: int = 20) -> None:
        self.total, self.start, self.width = total, start, width
        self.line = StatusLine(stream)
        self.every = max(1, total // 20)
        self.t0 = time.perf_counter()

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        if not self.line.tty and step % self.every and step != self.total:
            return
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(1, step - self.start) * (self.total - step)
        self.line.draw(f"step {step}/{self.total} {bar(step, self.total, self.width)} loss {loss:.4f} "
                       f"lr {lr:.2e} {tokens_per_s:,.0f} tok/s eta {_clock(eta)}")

    def message(self, text: str) -> None:
        """A line of its own (an eval loss, a saved checkpoint) without breaking the bar."""
        self.line.message(text)

    def close(self) -> None:
        self.line.close()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricsLog:
    """Appends one JSON line per step to `metrics.jsonl`; resuming keeps only steps <= `resume_step`."""

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = path
        kept = read_metrics(path, up_to_step=resume_step) if resume_step is not None else []
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path, up_to_step: int | None = None) -> list[dict[str, Any]]:
    """The complete records of a metrics file (a line cut short by a kill is skipped).

    Plain `json.loads`, not komt.jsonutil's strict parser: the file is komt's own, and a diverged run's
    loss is written (by `json.dumps`) as `NaN`, which that parser refuses."""
    records = []
    if not path.exists():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if up_to_step is None or record.get("step", 0) <= up_to_step:
            records.append(record)
    return records


def plot_loss_curve(metrics_path: Path, png_path: Path, log: TextIO | None = sys.stderr) -> bool:
    """Train (and eval) loss against step as a PNG, if matplotlib (the `plot` extra) is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        if log is not None:
            print("komt: matplotlib is not installed; skipping the loss curve (pip install 'komt[plot]')", file=log)
        return False
    records = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train loss")
    evals = [r for r in records if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    tmp = png_path.with_name(f".{png_path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(png_path)
    return True

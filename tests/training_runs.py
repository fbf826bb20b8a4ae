"""Shared by the training tests that run `python -m komt.train` (or torchrun) as a child process: its
environment, the run's metrics.jsonl, and a SIGKILL once the run has logged a given number of steps.
Not a test module: test files import what they use.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def environment() -> dict[str, str]:
    """This environment importing komt from this checkout, one thread per process (a tiny model: more
    threads only add synchronisation, and on a busy machine stalls)."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS="1")


def metrics(output: Path) -> list[dict]:
    """The complete records of a run's metrics.jsonl (a line still being written is left out)."""
    path = output / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.endswith("}")]


def sigkill_after(command: list[str], output: Path, steps: int, timeout: float = 240) -> None:
    """Run `command` and SIGKILL it once `output`'s metrics hold `steps` steps; fail if it ended first."""
    proc = subprocess.Popen(command, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline and len(metrics(output)) < steps:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"

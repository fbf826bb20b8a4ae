"""The installed package is the one Python imports, wherever the user runs komt from.

Run from the folder that holds the clone, Python puts that folder first on sys.path, and the clone (a
folder named like the package, without an `__init__.py`) looks like a namespace package `komt` with
nothing in it. pyproject's `package-dir` makes the editable install a plain .pth entry for the project
root, and a regular package found anywhere on sys.path wins over a namespace portion.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_komt_runs_from_the_folder_that_holds_a_clone_named_komt(tmp_path):
    (tmp_path / "komt").symlink_to(ROOT, target_is_directory=True)  # the clone, as `git clone ... komt` names it
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = "import komt, kernels; print(komt.__file__); print(callable(komt.load_model))"
    run = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    init, loads = run.stdout.split()
    assert Path(init).name == "__init__.py" and loads == "True", run.stdout
    cli = subprocess.run([sys.executable, "-m", "komt.generate", "--help"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0 and "usage: python -m komt.generate" in cli.stdout, cli.stderr

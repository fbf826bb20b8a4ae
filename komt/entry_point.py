"""How every `python -m komt.…` command ends: its status, one `error: ...` line for bad input (a KomtError)
and exit 2, or exit 130 for Ctrl-C; never a traceback.

    def main(argv=None) -> int:
        args = build_parser().parse_args(argv)        # a bad flag: argparse's usage line, exit 2
        return run_entry_point(lambda: run(args))

Ctrl-C during start-up (imports, loading) is komt.interrupts' job: it exits 130 before Python could raise.
"""

from __future__ import annotations

import sys
from typing import Callable

from komt.errors import KomtError


def run_entry_point(body: Callable[[], int], interrupted: str = "") -> int:
    """`body()`'s exit status; a KomtError prints `error: <message>` (status 2), a KeyboardInterrupt prints
    `interrupted` (what to do next, or nothing but the newline after the terminal's ^C) (status 130)."""
    try:
        return body()
    except KomtError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130

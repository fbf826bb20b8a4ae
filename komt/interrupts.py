"""Ctrl-C while an entry point starts: exit at once with status 130, never a traceback or a crash.

Python turns SIGINT into a KeyboardInterrupt raised at whatever bytecode runs next. During start-up that
is often inside an import of torch or triton, some of it called back from C++: the exception then
surfaces as a traceback, is swallowed by a callback ("Exception ignored in ..."), or aborts the process
(SIGABRT) when it crosses C++ that cannot unwind it; probes saw all three. Until the program has
something to clean up, there is nothing to unwind, so `exit_on_interrupt` installs a handler that just
exits 130. `raise_on_interrupt` puts Python's own handler back once the model is loaded, so that Ctrl-C
stops a generation (or a file write) the ordinary way and its cleanup runs.

No torch here: `komt/generate/__main__.py` installs the handler before the first heavy import.
"""

from __future__ import annotations

import os
import signal
import threading


def _exit_130(signum, frame) -> None:
    os.write(2, b"\n")
    os._exit(130)


def exit_on_interrupt() -> None:
    """From now on Ctrl-C exits 130 at once (main thread only: signal handlers can be set only there)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _exit_130)


def raise_on_interrupt() -> None:
    """Ctrl-C raises KeyboardInterrupt again, if `exit_on_interrupt` had changed that."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is _exit_130:
        signal.signal(signal.SIGINT, signal.default_int_handler)

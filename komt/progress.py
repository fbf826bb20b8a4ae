"""One status line on stderr: weights loading, training steps, evaluation questions.

On a terminal the line is redrawn in place (`\\r`, then the text, then "erase to the end of the line");
anywhere else (a log file, a pipe) each drawn line is a line of its own, so the callers draw less often
there (every 25% of a load, every 5% of a run) to keep logs short. `message` puts a line of its own
between two draws without breaking the bar.
"""

from __future__ import annotations

from typing import TextIO


def bar(done: int, total: int, width: int) -> str:
    """`[######........]`: `done` of `total` as `width` characters."""
    filled = min(width, width * done // max(total, 1))
    return "[" + "#" * filled + "." * (width - filled) + "]"


class StatusLine:
    """The line on `stream` (None: draw nothing, e.g. on every rank but the first)."""

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream
        self.tty = stream is not None and hasattr(stream, "isatty") and stream.isatty()
        self._open = False  # a drawn line waits on the terminal for its newline

    def draw(self, line: str) -> None:
        if self.stream is None:
            return
        self.stream.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        self._open = self.tty
        self.stream.flush()

    def message(self, text: str) -> None:
        """`text` on a line of its own; on a terminal the bar is erased first and redrawn by the next draw."""
        if self.stream is None:
            return
        self.stream.write(("\r\x1b[K" if self._open else "") + text + "\n")
        self._open = False
        self.stream.flush()

    def close(self) -> None:
        """End the drawn line (a terminal's cursor still sits on it)."""
        if self.stream is not None and self._open:
            self.stream.write("\n")
            self.stream.flush()
        self._open = False

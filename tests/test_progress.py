"""komt.progress: the one status line the load, training and evaluation bars draw on."""

from __future__ import annotations

import io

from komt.progress import StatusLine, bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_fills_in_proportion_and_never_overflows():
    assert bar(0, 10, 10) == "[..........]"
    assert bar(3, 10, 10) == "[###.......]"
    assert bar(10, 10, 10) == "[##########]"
    assert bar(12, 10, 10) == "[##########]"  # a last update past the total
    assert bar(0, 0, 4) == "[....]"  # nothing to do: no division by zero


def test_a_log_file_gets_one_line_per_draw_and_messages_between():
    log = io.StringIO()
    line = StatusLine(log)
    line.draw("a")
    line.message("saved")
    line.draw("b")
    line.close()
    assert log.getvalue() == "a\nsaved\nb\n"


def test_a_terminal_redraws_in_place_and_a_message_erases_the_bar_first():
    term = Terminal()
    line = StatusLine(term)
    line.draw("step 1")
    line.draw("step 2")
    line.message("saved")
    line.draw("step 3")
    line.close()
    line.close()  # closing twice ends the line once
    assert term.getvalue() == "\rstep 1\x1b[K\rstep 2\x1b[K\r\x1b[Ksaved\n\rstep 3\x1b[K\n"


def test_no_stream_draws_nothing():
    line = StatusLine(None)
    line.draw("x")
    line.message("y")
    line.close()
    assert not line.tty

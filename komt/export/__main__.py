"""`python -m komt.export`: see komt/export/cli.py.

Ctrl-C exits 130 at once while the imports below run (komt.interrupts); a write in progress is stopped
the ordinary way, so the atomic writer removes its temp file.
"""

from komt.interrupts import exit_on_interrupt

exit_on_interrupt()

from komt.export.cli import main  # noqa: E402

raise SystemExit(main())

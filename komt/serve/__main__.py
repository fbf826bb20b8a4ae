"""`python -m komt.serve`: see komt/serve/cli.py.

Ctrl-C exits 130 at once until the server runs (komt.interrupts); the import below takes seconds.
"""

from komt.interrupts import exit_on_interrupt

exit_on_interrupt()

from komt.serve.cli import main  # noqa: E402

raise SystemExit(main())

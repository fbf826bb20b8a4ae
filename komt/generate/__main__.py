"""`python -m komt.generate`: see komt/generate/cli.py.

Ctrl-C exits 130 at once until the model is loaded (komt.interrupts); the import below takes seconds.
"""

from komt.interrupts import exit_on_interrupt

exit_on_interrupt()

from komt.generate.cli import main  # noqa: E402

raise SystemExit(main())

"""`python -m komt.eval`: see komt/eval/cli.py.

Ctrl-C exits 130 at once while the imports below run (komt.interrupts); an evaluation stops on Ctrl-C
the ordinary way and says how to resume.
"""

from komt.interrupts import exit_on_interrupt

exit_on_interrupt()

from komt.eval.cli import main  # noqa: E402

raise SystemExit(main())

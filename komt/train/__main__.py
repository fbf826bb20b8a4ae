"""`python -m komt.train` (and `torchrun ... -m komt.train`): see komt/train/cli.py.

Ctrl-C exits 130 at once while the imports below run (komt.interrupts); training itself stops on Ctrl-C
the ordinary way and says how to resume.
"""

from komt.interrupts import exit_on_interrupt

if __name__ == "__main__":
    exit_on_interrupt()

    from komt.train.cli import main

    raise SystemExit(main())

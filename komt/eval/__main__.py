"""`python -m komt.eval`: see komt/eval/cli.py."""

import sys

from komt.eval.cli import main

sys.exit(main())

"""`python -m komt.generate`: see komt/generate/cli.py."""

from komt.generate.cli import main

raise SystemExit(main())

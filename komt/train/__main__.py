"""`python -m komt.train` (and `torchrun ... -m komt.train`): see komt/train/cli.py."""

import sys

from komt.train.cli import main

if __name__ == "__main__":
    sys.exit(main())

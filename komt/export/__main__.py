import sys

from komt.export.cli import main

sys.exit(main())

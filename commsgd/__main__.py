"""`python -m commsgd ...` (and `torchrun -m commsgd train ...`) run the CLI."""

import sys

from commsgd.cli import main

sys.exit(main())

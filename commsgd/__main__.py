"""`python -m commsgd ...` (and `torchrun -m commsgd train ...`) run the CLI."""

from commsgd.cli import run

run()

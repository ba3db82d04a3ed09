"""`python -m cvt_cli ...` is the `cvt` command."""

from .app import run

run()

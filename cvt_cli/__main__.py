"""`python -m cvt_cli ...` is the `cvt` command."""

import sys

from .app import main

sys.exit(main())

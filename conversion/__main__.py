"""`python -m conversion ...` is the `cvt` command."""

import sys

from .cli import main

sys.exit(main())

"""`python -m vitlens ...` is the `vitlens` command."""

import sys

from vitlens.cli import main

sys.exit(main())

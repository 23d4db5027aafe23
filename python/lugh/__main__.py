"""`python -m lugh`: the command line."""

import sys

from lugh.cli import main

sys.exit(main())

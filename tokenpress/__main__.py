"""``python -m tokenpress``: the command line, as the ``tokenpress`` script runs it."""

import sys

from tokenpress.tools.cli import main

sys.exit(main())

"""``python -m diffprior``: the ``diffprior`` command."""

import sys

from diffprior.cli import main

sys.exit(main())

"""``python -m tdvmcall``: the same as the ``tdvmcall`` command."""

import sys

from .cli import main

sys.exit(main())

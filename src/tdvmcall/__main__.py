"""``python -m tdvmcall``: the same as the ``tdvmcall`` command."""

from .cli import main

main()

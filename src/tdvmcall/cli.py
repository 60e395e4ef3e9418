"""The app: gathers each wing's commands, nothing else."""

from __future__ import annotations

import typer

from .check.cli import register as register_check
from .export_c.cli import register as register_export_c
from .fuzz.cli import register as register_fuzz
from .scan.cli import register as register_scan
from .show.cli import register as register_show
from .sweep.cli import register as register_sweep
from .trace.cli import register as register_trace

app = typer.Typer(
    name="tdvmcall",
    help="Executable model of the TDX TDVMCALL register path: guest, TDX module and KVM, "
    "today's KVM ('legacy') and the hardened one side by side.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# one line per wing, in the order of `tdvmcall --help`
register_show(app)
register_check(app)
register_scan(app)
register_trace(app)
register_fuzz(app)
register_sweep(app)
register_export_c(app)


def main() -> None:
    app()

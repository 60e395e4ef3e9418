"""The app: gathers each wing's commands (one ``register`` line each) and the ``--version`` option;
``main()`` hands it to :func:`console.run_app`, where the process's edges are handled for every
command (usage errors, closed pipes and standard input, help text)."""

from __future__ import annotations

import sys
from typing import NoReturn

import typer

from . import __version__
from .check.cli import register as register_check
from .console import run_app
from .export_c.cli import register as register_export_c
from .fuzz.cli import register as register_fuzz
from .scan.cli import register as register_scan
from .show.cli import register as register_show
from .sweep.cli import register as register_sweep
from .trace.cli import register as register_trace

app = typer.Typer(
    name="tdvmcall",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},  # inherited by every command
)


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"tdvmcall {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Executable model of the TDX TDVMCALL register path: guest, TDX module and KVM, today's KVM ('legacy') and the hardened one side by side.

    Exit status: 0 success; 1 a check that fails (check, scan, sweep, vectors verify, fuzz, export-c --check); 2 bad input, said in one line on stderr; 130 interrupted (Ctrl-C; 143 SIGTERM), said in one line too. Output into a closed pipe is not an error."""


# one line per wing, in the order of `tdvmcall --help`
register_show(app)
register_check(app)
register_scan(app)
register_trace(app)
register_fuzz(app)
register_sweep(app)
register_export_c(app)


def main(argv: list[str] | None = None) -> NoReturn:
    """The ``tdvmcall`` command: run one command and exit with its status."""
    sys.exit(run_app(app, argv))

"""The command line: composes the model's rooms, never reaches into them."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="tdvmcall",
    help="Executable model of the TDX TDVMCALL register path: guest, TDX module and KVM, "
         "today's KVM ('legacy') and the hardened one side by side.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# --- feature commands: each lives in its own cli_<feature>.py with a register(app) function ----
# (keep one line per feature here)
# --- end of feature commands ------------------------------------------------------------------


def main() -> None:
    app()

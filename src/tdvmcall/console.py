"""What every command prints: the console, JSON on standard output, and the one-line error for bad
input.  The wings import this module; it imports nothing of the model or the tools."""

from __future__ import annotations

import json
import sys

import typer
from rich.console import Console

out = Console(width=max(Console().width, 120))  # 16-digit hex columns must not be cut


def fail(message: str, code: int = 2) -> None:
    """One clear line on stderr and a non-zero exit: the boundary for bad user input."""
    sys.stderr.write(f"tdvmcall: error: {message}\n")  # plain: never wrapped, one line
    raise typer.Exit(code)


def emit_json(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")

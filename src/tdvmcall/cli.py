"""The app: gathers each wing's commands, and ``main()``, the one place where the process's edges are
handled for every command (usage errors, ``--version``, a closed output pipe, help text)."""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
from typing import NoReturn

import typer

# typer vendors click from 0.26 on; its exceptions are the ones the app raises (typer is pinned to
# 0.26.x in pyproject.toml: 0.27 and later render a flag as `--json <bool>` in --help)
from typer._click.exceptions import Abort, ClickException, NoArgsIsHelpError, NoSuchOption, UsageError

from . import __version__
from .check.cli import register as register_check
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

    Exit status: 0 success; 1 a check that fails (check, sweep, vectors verify, fuzz); 2 bad input, said in one line on stderr. Output into a closed pipe is not an error."""


# one line per wing, in the order of `tdvmcall --help`
register_show(app)
register_check(app)
register_scan(app)
register_trace(app)
register_fuzz(app)
register_sweep(app)
register_export_c(app)


def _paragraphs(text: str) -> str:
    """Help text as paragraphs: the line breaks of a docstring are not the reader's line breaks."""
    return "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(text).split("\n\n"))


def _reflow_help(typer_app: typer.Typer) -> None:
    for info in typer_app.registered_commands:
        text = info.help or (inspect.getdoc(info.callback) if info.callback else None)
        if text:
            info.help = _paragraphs(text)
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _reflow_help(group.typer_instance)


_reflow_help(app)
_COMMAND = typer.main.get_command(app)


def _command_path(command: typer.core.TyperGroup, args: list[str]) -> str:
    """``tdvmcall vectors verify``: the commands named at the start of the arguments."""
    path = ["tdvmcall"]
    for word in args:
        sub = getattr(command, "commands", {}).get(word)
        if sub is None:
            break
        path.append(word)
        command = sub
    return " ".join(path)


def _usage_line(e: UsageError, args: list[str]) -> str:
    """A usage error as one line: what is wrong, then where help is."""
    ctx = e.ctx
    where = ctx.command_path if ctx is not None and ctx.parent is not None else _command_path(_COMMAND, args)
    message = "missing command (the help above lists them)" if isinstance(e, NoArgsIsHelpError) else e.format_message()
    if isinstance(e, NoSuchOption) and e.option_name.lstrip("-").replace(".", "", 1).isdigit():
        message += " (a negative number is not an option; put it after --, e.g. 'tdvmcall decode -- -1')"
    return f"{message.rstrip('.')} (see '{where} --help')"


def main(argv: list[str] | None = None) -> NoReturn:
    """The ``tdvmcall`` command: run one command (see :func:`run`) and exit with its status."""
    sys.exit(run(argv))


def run(argv: list[str] | None = None) -> int:
    """Run one command and return its exit status.

    - usage errors (unknown option, missing argument, bad option value): one line
      ``tdvmcall: error: ...`` on stderr, exit 2, as every command's own bad-input errors;
    - standard input closed (``<&-``): any read of it is one line, exit 2 (``console.ClosedStdin``);
    - standard output closed or its pipe closed by the reader: the rest of the output is discarded
      and the command runs on to its own exit status (``check | head -1`` still says 1 when a call
      fails the policy), never 1 for the pipe alone and never a traceback;
    - Ctrl-C: exit 130.
    """
    from .console import ClosedStdin, PipeGuard

    if sys.stdin is None:  # started with standard input closed (<&-): a read is one line, exit 2
        sys.stdin = ClosedStdin()
    if sys.stderr is None:  # started with 2>&-: errors go nowhere, but the exit status still says 2
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    if sys.stdout is None:  # started with standard output closed (>&-): nowhere to print
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    sys.stdout = PipeGuard(sys.stdout)  # type: ignore[assignment]
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        status = _COMMAND.main(args=args, prog_name="tdvmcall", standalone_mode=False)
    except UsageError as e:
        sys.stderr.write(f"tdvmcall: error: {' '.join(_usage_line(e, args).split())}\n")
        status = 2
    except ClickException as e:  # a bad parameter value click itself checks (files, choices)
        sys.stderr.write(f"tdvmcall: error: {' '.join(e.format_message().split())}\n")
        status = 2
    except (Abort, KeyboardInterrupt):
        sys.stderr.write("tdvmcall: interrupted\n")
        status = 130
    status = status if isinstance(status, int) else 0
    with contextlib.suppress(OSError):
        sys.stdout.flush()
    return status

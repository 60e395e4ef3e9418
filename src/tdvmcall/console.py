"""What every command prints and reads: the console, JSON on standard output, the one-line error for
bad input, and the shared readers and option checks that keep every command's edges alike.  The
wings import this module; it imports nothing of the model or the tools.

The shared helpers, for every wing:

- :func:`fail` — one line ``tdvmcall: error: ...`` on stderr, exit 2;
- :func:`read_text_input` (and :func:`read_bytes_input`) — a file or ``-`` (stdin) as text: missing,
  directory, closed stdin, over 64 MiB, not UTF-8 (a BOM is dropped), each one line;
- :func:`stdin_binary` — standard input as bytes, or one line if it is closed;
- :func:`parse_json_text` — JSON text to a value: bad JSON, nesting too deep, huge numbers;
- :func:`require_count` and :func:`require_finite_positive` — option values that must be counts
  (``>= minimum``) or finite positive numbers (``nan`` and ``inf`` are not);
- :func:`writable_file` — a path an output file can be written to (not a directory, its folder
  exists, not one of the command's inputs: :func:`not_an_input`), checked before the work starts
  so nothing is lost at the end and no input is overwritten;
- :func:`output_file` — an output written under a temporary name and renamed when complete, so the
  final name never holds a partial file (an interrupt removes the temporary one);
- :func:`output_files` — several that belong together, all renamed once all are complete
  (``export-c``);
- :func:`output_dir` — the same for a directory of outputs (``vectors export``);
- :func:`worker_pool` — worker processes that end with the command: Ctrl-C, SIGTERM or the parent's
  death (``PR_SET_PDEATHSIG``) never leaves one behind; :func:`worker_count` caps their number;
- :func:`check_interrupt` — for long loops: raise the pending interrupt, if an earlier one was
  swallowed where Python ignores exceptions (a garbage-collector callback, a ``__del__``);
- :func:`run_app` — the process's edges for every command: usage errors, closed pipes, a standard
  output that cannot be written (:class:`StdoutError`), Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import inspect
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import typer
from rich.cells import cell_len
from rich.console import Console, Group
from rich.measure import Measurement
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

# typer vendors click from 0.26 on; its exceptions are the ones the app raises (typer is pinned to
# 0.26.x in pyproject.toml: 0.27 and later render a flag as `--json <bool>` in --help)
from typer._click.exceptions import Abort, ClickException, NoArgsIsHelpError, NoSuchOption, UsageError
from typer._click.types import FloatParamType, IntParamType, ParamType

#: how every tool draws a verdict of ``judge.VERDICTS`` (the words themselves: this module imports
#: nothing of the model; tests/test_architecture.py checks the keys): (rich style, HTML background, HTML text colour, what it means);
#: check and scan both read it, so a verdict looks the same in each report
VERDICT_STYLE: dict[str, tuple[str, str, str, str]] = {
    "ok": ("green", "#cdebd0", "#1b5e20", "every case completes; nothing read as zero or dropped"),
    "not-kvm": ("dim", "#e4e4e4", "#444444", "not a KVM call (Hyper-V, MigTD): only the module's check applies"),
    "legacy-silent": ("yellow", "#ffe38a", "#6d4c00", "today's KVM reads an unexposed input as 0 or drops an output"),
    "hardened-refuses": ("dark_orange", "#ffb380", "#7a2e00", "hardened KVM refuses the call (INVALID_OPERAND)"),
    "module-rejects": (
        "bold red",
        "#d83b3b",
        "#ffffff",
        "the TDX module fails the call back to the guest; KVM never sees it",
    ),
}


def wrap_values(text: str, width: int) -> list[str]:
    """``text`` folded into lines of at most ``width`` columns, between values only: a group in
    parentheses or brackets (``(exit 2)``, ``[r12=0x1 r13=0x0]``) is kept on one line unless it is
    longer than a line itself; a word is never cut.  Its own lines stay lines."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        body = paragraph.lstrip(" ")
        indent = " " * (len(paragraph) - len(body))  # kept, on every line the paragraph folds into
        width_left = max(width - len(indent), 1)
        units: list[str] = []
        depth = 0
        for word in body.split(" "):
            if depth > 0 and units:
                units[-1] += " " + word
            else:
                units.append(word)
            depth = max(0, depth + word.count("(") + word.count("[") - word.count(")") - word.count("]"))
        pieces = [p for u in units for p in ([u] if cell_len(u) <= width_left else u.split(" "))]
        line: str | None = None
        for piece in pieces:
            if line is not None and cell_len(line) + 1 + cell_len(piece) > width_left:
                lines.append(indent + line)
                line = piece
            else:
                line = piece if line is None else f"{line} {piece}"
        lines.append(indent + (line or ""))
    return lines


def _words_whole(table: Table) -> None:
    """No column of ``table`` narrower than the longest word of its cells: a table narrows by
    folding its cells between words, never inside one (a name, a path, a value)."""
    for column in table.columns:
        if column.no_wrap:
            continue
        longest = 0
        for cell in column.cells:
            plain = cell.plain if isinstance(cell, Text) else cell if isinstance(cell, str) else ""
            longest = max(longest, *(cell_len(word) for word in plain.split()), 0)
        if longest > (column.min_width or 0):
            column.min_width = longest


#: the blanks before a line's end (the padding of a table's last column, a rule's fill)
_TRAILING_BLANKS = re.compile(r"[ \t]+\n")


class _WideConsole(Console):
    """A console that never cuts a value: a table folds its cells between words only, and one
    wider than the console is printed at its own natural width (a terminal then wraps the long
    lines; a file or a pipe gets them whole).  Into a file or a pipe, lines of text are not
    wrapped at all: a log gets each line whole, never ``(exit`` on one line and ``2)`` on the next."""

    def print(self, *objects: Any, **kwargs: Any) -> None:  # type: ignore[override]
        if not self.is_terminal and "soft_wrap" not in kwargs and any(isinstance(o, Group) for o in objects):
            for o in objects:  # one by one: each text line whole, each table at its own width
                for part in o.renderables if isinstance(o, Group) else [o]:
                    self.print(part, **kwargs)
            return
        if not self.is_terminal and "soft_wrap" not in kwargs and all(isinstance(o, (str, Text)) for o in objects):
            for o in objects:  # folded between values, never inside one: '(exit 2)' stays whole
                text = o if isinstance(o, Text) else self.render_str(o, markup=kwargs.get("markup"))
                for line in wrap_values(text.plain, self.width):
                    super().print(line, soft_wrap=True, markup=False, highlight=False, style=text.style)
            return
        for o in objects:
            self._keep_words(o)
        need = max((self._natural_width(o) for o in objects), default=0)
        if need <= self.width:
            super().print(*objects, **kwargs)
            return
        saved = self._width
        self._width = need
        try:
            super().print(*objects, **kwargs)
        finally:
            self._width = saved

    def _render_buffer(self, buffer: Iterable[Segment]) -> str:
        """The text rich writes, with the blanks that end each line dropped when it goes to a file or
        a pipe: a table pads every row to its full width (120 columns there), which a log, ``diff``
        or ``grep`` only carries along.  A terminal gets rich's rendering unchanged."""
        text = super()._render_buffer(buffer)
        return text if self.is_terminal else _TRAILING_BLANKS.sub("\n", text)

    def fits(self, renderable: Any) -> bool:
        """Whether ``renderable`` can be printed at this console's width without a word cut."""
        self._keep_words(renderable)
        return self._natural_width(renderable) <= self.width

    def _keep_words(self, renderable: Any) -> None:
        if isinstance(renderable, Group):
            for r in renderable.renderables:
                self._keep_words(r)
        elif isinstance(renderable, Table):
            _words_whole(renderable)

    def _natural_width(self, renderable: Any) -> int:
        if isinstance(renderable, Group):
            return max((self._natural_width(r) for r in renderable.renderables), default=0)
        if isinstance(renderable, Table):
            return Measurement.get(self, self.options.update_width(1 << 16), renderable).minimum
        return 0


def _width() -> int:
    """A terminal's own width (tables narrow to it, folding between words); 120 columns for a
    file or a pipe (16-digit hex columns fit), or ``COLUMNS`` if wider.  A table wider than
    either is printed at its own width."""
    console = Console()
    return console.width if console.is_terminal else max(console.width, 120)


out = _WideConsole(width=_width())


def fail(message: str, code: int = 2) -> NoReturn:
    """One clear line on stderr and a non-zero exit: the boundary for bad user input."""
    line = " ".join(str(message).split())  # one line, whatever the message holds
    sys.stderr.write(f"tdvmcall: error: {line}\n")  # plain: never wrapped
    sys.stderr.flush()
    raise typer.Exit(code)


def emit_json(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


# --- reading input --------------------------------------------------------------------------------
CLOSED_STDIN = "standard input is closed; give a file or pipe something in"


class ClosedStdin(io.TextIOBase):
    """What ``main()`` puts in ``sys.stdin`` when the process started with it closed (``<&-``,
    where Python leaves ``None``): any read is one line and exit 2, in every command, instead of an
    ``AttributeError`` on ``None``."""

    def _closed(self) -> NoReturn:
        fail(CLOSED_STDIN)

    @property
    def buffer(self) -> NoReturn:
        self._closed()

    def read(self, size: int | None = -1) -> str:
        self._closed()

    def readline(self, size: int | None = -1) -> str:  # type: ignore[override]
        self._closed()

    def fileno(self) -> int:
        self._closed()

    def isatty(self) -> bool:
        return False


def stdin_binary(what: str) -> io.BufferedIOBase:
    """Standard input as a binary stream; one line and exit 2 when it is closed (``<&-``)."""
    stream = sys.stdin
    if stream is None or isinstance(stream, ClosedStdin) or getattr(stream, "buffer", None) is None:
        fail(f"{what}: {CLOSED_STDIN}")
    try:
        fd = stream.fileno()
    except (OSError, ValueError):  # not an OS stream (a test harness's): nothing to check
        return stream.buffer
    try:
        os.fstat(fd)
    except OSError:
        fail(f"{what}: standard input is closed; give a file or pipe something in")
    return stream.buffer


#: the most a small input (a scenario, a catalog) may hold: /dev/zero or a stray log is refused
#: instead of filling memory
SMALL_INPUT = 64 << 20


def read_bytes_input(path: str | Path, what: str, limit: int = SMALL_INPUT) -> bytes:
    """The bytes of a file, or of standard input for ``-``, at most ``limit`` of them; every failure
    is one line and exit 2."""
    name = str(path)
    shown = "standard input" if name == "-" else name
    try:
        if name == "-":
            data = stdin_binary(what).read(limit + 1)
        else:
            p = Path(name)
            if p.is_dir():
                fail(f"{what}: {name} is a directory, not a file")
            with p.open("rb") as f:
                data = f.read(limit + 1)
    except OSError as e:
        fail(f"{what}: cannot read {shown} ({e.strerror or e})")
    if len(data) > limit:
        fail(f"{what}: {shown} holds more than {limit >> 20} MiB; not a {what}")
    return data


def read_text_input(path: str | Path, what: str, limit: int = SMALL_INPUT) -> str:
    """The UTF-8 text of a file, or of standard input for ``-`` (a leading BOM is dropped).  A
    missing file, a directory, a closed stdin, more than ``limit`` bytes or bytes that are not
    UTF-8: one line, exit 2."""
    data = read_bytes_input(path, what, limit)
    name = "standard input" if str(path) == "-" else str(path)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        fail(f"{what}: {name} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})")


def parse_json_text(text: str, what: str) -> Any:
    """JSON text to a value; invalid JSON, nesting too deep for the parser, or a number with too
    many digits: one line, exit 2."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        fail(f"{what}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})")
    except RecursionError:
        fail(f"{what}: JSON nested too deeply")
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        fail(f"{what}: not valid JSON ({e})")


# --- option values --------------------------------------------------------------------------------
def pick(value: str, accepted: Iterable[str], option: str, what: str, prefix: bool = False) -> str:
    """The accepted word ``value`` names, matched without regard to case (the rule of every command,
    docs/cli.md), and with ``prefix`` by a prefix that names one word only (``--guest kvm-selftests``
    for ``kvm-selftests (intel/tdx downstream)``).  No word, or more than one: one line, exit 2."""
    words = list(dict.fromkeys(accepted))
    if value in words:
        return value
    folded = value.strip().casefold()
    same = [w for w in words if w.casefold() == folded]
    if len(same) == 1:
        return same[0]
    starting = [w for w in words if w.casefold().startswith(folded)] if prefix and folded else []
    if len(starting) == 1:
        return starting[0]
    if len(starting) > 1:
        fail(f"{option}: {value!r} names more than one {what}: {'; '.join(starting)}; give more of the name")
    fail(f"{option}: {value!r} is not a {what}; accepted: {', '.join(words)}")


def require_count(value: int | None, option: str, minimum: int = 0, meaning: str = "") -> None:
    """An integer option that counts something must be at least ``minimum``."""
    if value is not None and value < minimum:
        extra = f" ({meaning})" if meaning else ""
        fail(f"{option}: {value} is below {minimum}; give a whole number of {minimum} or more{extra}")


def require_finite_positive(value: float | None, option: str) -> None:
    """A number option (seconds, rates) must be finite and positive: ``nan``, ``inf`` and ``0`` are not."""
    if value is not None and not (math.isfinite(value) and value > 0):
        fail(f"{option}: {value} is not a finite positive number")


def cannot_write(path: str | Path, e: OSError) -> str:
    """Why ``path`` could not be written, in one line for :func:`fail`: a symbolic link loop and a
    link to nothing are named as such (``mkdir`` on either says only "File exists")."""
    p = Path(e.filename or path)
    if p.is_symlink():
        try:
            os.stat(p)
        except OSError as why:
            if why.errno == errno.ELOOP:
                return f"{p}: cannot write: a symbolic link loop (too many levels of symbolic links)"
            return f"{p}: cannot write: a symbolic link to nothing ({os.readlink(p)})"
    if e.errno == errno.ELOOP:
        return f"{p}: cannot write: a symbolic link loop on the way (too many levels of symbolic links)"
    return f"{p}: cannot write ({e.strerror or e})"


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same inode (through symbolic or hard links), or, for a
    path that does not exist yet, the same place once every link is resolved."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        pass
    try:
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError):  # a symlink loop: not a file anything is read from
        return False


def not_an_input(path: str | Path, option: str, inputs: Iterable[str | Path | None]) -> None:
    """Refuse an output path that is one of the command's input files (the same file, also through
    a symbolic or hard link): ``check --catalog mine.csv --html mine.csv`` or ``scan FW.fd
    --to-catalog FW.fd`` would replace the input with the report.  One line, exit 2, before any
    work.  ``-`` (standard input) and ``None`` among ``inputs`` are skipped; a directory among
    them only matches itself (a command that reads the files of a directory passes those files)."""
    out_path = Path(path)
    for given in inputs:
        if given is None or str(given) == "-":
            continue
        if _same_file(out_path, Path(given)):
            same = "" if str(given) == str(path) else f" (the same file as the input {given})"
            fail(
                f"{option}: {path} is an input of this command{same}; writing it would replace that input; "
                "give another file name"
            )


def writable_file(path: str | Path, option: str, inputs: Iterable[str | Path | None] = ()) -> Path:
    """A path an output file can be created at: not a directory, in a folder that exists and can be
    written, and none of the command's ``inputs`` (:func:`not_an_input`).  Checked before the work
    starts, so that a result is never lost for want of a place and no input is overwritten."""
    if str(path) == "-":  # elsewhere '-' is a standard stream: never silently a file named '-'
        fail(f"{option}: '-' would write a file named '-', not standard output; give a file name (./- if meant)")
    p = Path(path)
    if p.is_dir():
        fail(f"{option}: {p} is a directory; give a file name")
    parent = p.parent
    if not parent.is_dir():
        fail(f"{option}: cannot write {p} (folder {parent} does not exist)")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        fail(f"{option}: cannot write {p} (permission denied)")
    not_an_input(p, option, inputs)
    return p


# --- the process: closed pipes and failing writes ----------------------------------------------------
class StdoutError(Exception):
    """Standard output could not be written for a reason other than its reader leaving (a full disk,
    ``> /dev/full``, an I/O error): :func:`run_app` makes it one line and exit 2.  Not an
    :class:`OSError`, so that a command's own ``except OSError`` around a file it writes never takes
    it for a failure of that file."""

    def __init__(self, error: OSError) -> None:
        super().__init__(f"cannot write standard output ({error.strerror or error})")


class WorkerDied(Exception):
    """A worker process of :func:`worker_pool` ended on its own (the out-of-memory killer's
    SIGKILL, a crash) and the run is incomplete: :func:`run_app` makes it one line and exit 2, as
    any command that could not do its work, never a traceback and never the 1 of a finding."""


class PipeGuard(io.TextIOBase):
    """Standard output that survives its reader leaving (``tdvmcall check | head -1``): on a closed
    pipe the rest of the output goes to /dev/null and the command runs on to its own exit status,
    so a closed pipe never looks like a failed check.  Any other write error (``> /dev/full``) is
    a :class:`StdoutError`: one line and exit 2 (:func:`run_app`), never a traceback and never
    the exit 1 of a failed check."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.closed_pipe = False
        self.failed: StdoutError | None = None

    def _discard(self) -> None:
        """From now on the output goes to /dev/null (what is still buffered too, so that the
        interpreter's own flush at exit has nothing left to fail on)."""
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        finally:
            os.close(devnull)

    def _failed(self, error: OSError) -> NoReturn:
        self.failed = StdoutError(error)
        with contextlib.suppress(OSError, ValueError):
            self._discard()
        raise self.failed

    def write(self, s: str) -> int:
        if self.failed is not None:  # already reported once: the rest is discarded
            return len(s)
        try:
            return self._stream.write(s)
        except BrokenPipeError:
            self.closed_pipe = True
            self._discard()
            return len(s)
        except OSError as e:
            self._failed(e)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self.closed_pipe = True
            self._discard()
            self._stream.flush()
        except OSError as e:
            if self.failed is None:
                self._failed(e)
            with contextlib.suppress(OSError):
                self._stream.flush()

    def fileno(self) -> int:
        return self._stream.fileno()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._stream.encoding

    @property
    def buffer(self) -> Any:
        return self._stream.buffer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


__all__ = [
    "ClosedStdin",
    "PipeGuard",
    "StdoutError",
    "WorkerDied",
    "cannot_write",
    "emit_json",
    "fail",
    "not_an_input",
    "out",
    "parse_json_text",
    "pick",
    "read_bytes_input",
    "read_text_input",
    "require_count",
    "require_finite_positive",
    "stdin_binary",
    "writable_file",
]


# --- the process's edges, for every command (cli.main) ---------------------------------------


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


def _usage_line(e: UsageError, command: typer.core.TyperGroup, args: list[str]) -> str:
    """A usage error as one line: what is wrong, then where help is."""
    ctx = e.ctx
    where = ctx.command_path if ctx is not None and ctx.parent is not None else _command_path(command, args)
    message = "missing command (the help above lists them)" if isinstance(e, NoArgsIsHelpError) else e.format_message()
    if isinstance(e, NoSuchOption) and e.option_name.lstrip("-").replace(".", "", 1).isdigit():
        message += " (a negative number is not an option; put it after --, e.g. 'tdvmcall decode -- -1')"
    return f"{message.rstrip('.')} (see '{where} --help')"


# --- numbers on the command line: one grammar for every command (docs/cli.md) -------------------------
#: a whole number as a person writes it: decimal digits, or 0x and hex digits (a sign for the
#: range checks to refuse in their own words); no '+', '_', exponent or digits of other scripts
_WHOLE = re.compile(r"\s*-?(?:0[xX][0-9a-fA-F]+|[0-9]+)\s*", re.ASCII)
#: a decimal number: digits with an optional fraction; the words nan and inf are left for
#: :func:`require_finite_positive` to refuse in its own words
_DECIMAL = re.compile(r"\s*-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+|nan|inf|infinity)\s*", re.ASCII | re.IGNORECASE)


def whole_number(text: str) -> int | None:
    """A whole number as a person writes it (docs/cli.md): decimal digits, or 0x and hex digits,
    with a sign for the caller's range check to refuse in its own words, blanks around ignored;
    None for anything else (``+5``, ``1_0``, ``0x``, ``1e3``, ``٣``).  The grammar of every ``int``
    option (:class:`_PersonsNumber`) and of the numbers of a list option such as ``trace --td``."""
    if not _WHOLE.fullmatch(text):
        return None
    text = text.strip()
    digits = text.lstrip("-")
    number = int(digits, 16) if digits[:2].lower() == "0x" else int(digits)
    return -number if text.startswith("-") else number


class _PersonsNumber(ParamType):
    """An ``int`` or ``float`` option's type, held to the number grammar of docs/cli.md before
    the type it wraps (with its range, if any) converts it: Python's ``int()`` and ``float()``
    also take ``1_0``, ``٣`` and ``３``, which no other place of the tool accepts."""

    def __init__(self, inner: ParamType) -> None:
        self.inner = inner
        self.name = inner.name
        self.whole = isinstance(inner, IntParamType)

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if isinstance(value, str):
            number = whole_number(value) if self.whole else None
            if (number is None) if self.whole else not _DECIMAL.fullmatch(value):
                kind = "decimal digits or 0x and hex digits" if self.whole else "decimal digits (and a fraction)"
                self.fail(f"{value!r} is not a number as written here; give {kind} (docs/cli.md)", param, ctx)
            if self.whole:
                value = number
        return self.inner.convert(value, param, ctx)

    def get_metavar(self, *args: Any, **kwargs: Any) -> str | None:
        return self.inner.get_metavar(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _one_grammar(command: Any) -> None:
    """Every ``int`` and ``float`` option and argument of every command held to one grammar, and
    every choice matched without regard to case (as :func:`pick` matches words)."""
    for param in getattr(command, "params", []):
        if isinstance(param.type, (IntParamType, FloatParamType)):
            param.type = _PersonsNumber(param.type)
        elif hasattr(param.type, "choices") and hasattr(param.type, "case_sensitive"):  # typer's Choice
            param.type.case_sensitive = False
    for sub in getattr(command, "commands", {}).values():
        _one_grammar(sub)


def run_app(app: typer.Typer, argv: list[str] | None = None) -> int:
    """Run one command of ``app`` and return its exit status (help reflowed as paragraphs first).

    - usage errors (unknown option, missing argument, bad option value): one line
      ``tdvmcall: error: ...`` on stderr, exit 2, as every command's own bad-input errors;
    - standard input closed (``<&-``): any read of it is one line, exit 2 (``console.ClosedStdin``);
    - standard output closed or its pipe closed by the reader: the rest of the output is discarded
      and the command runs on to its own exit status (``check | head -1`` still says 1 when a call
      fails the policy), never 1 for the pipe alone and never a traceback;
    - any other failure to write standard output (``> /dev/full``, an I/O error): one line
      ``tdvmcall: error: cannot write standard output (...)``, exit 2, in every command
      (:class:`StdoutError`);
    - Ctrl-C, SIGTERM, SIGHUP (:data:`ENDING_SIGNALS`): one line ``tdvmcall: interrupted`` (or
      ``terminated``, ``hung up``) and exit 128 + the signal's number (Ctrl-C: 130), no traceback,
      also when the interrupt surfaces as another exception (a library's own error on the way out);
      the command's worker processes end with it (:func:`worker_pool`) and its partial files are
      removed (:func:`output_file`); a command still running :data:`GRACE_SECONDS` after the signal
      is ended by force, with the same line, status and clean-up.
    - numbers: every ``int`` and ``float`` option takes the grammar of docs/cli.md only
      (``_PersonsNumber``: no ``1_0``, ``٣``, ``３``); choices are matched without regard to case;
    - Ctrl-C: exit 130.
    """
    _reflow_help(app)
    command = typer.main.get_command(app)
    _one_grammar(command)
    if sys.stdin is None:  # started with standard input closed (<&-): a read is one line, exit 2
        sys.stdin = ClosedStdin()
    if sys.stderr is None:  # started with 2>&-: errors go nowhere, but the exit status still says 2
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    if sys.stdout is None:  # started with standard output closed (>&-): nowhere to print
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    sys.stdout = PipeGuard(sys.stdout)  # type: ignore[assignment]
    args = sys.argv[1:] if argv is None else list(argv)
    with _ending_signals():
        try:
            status = command.main(args=args, prog_name="tdvmcall", standalone_mode=False)
        except UsageError as e:
            sys.stderr.write(f"tdvmcall: error: {' '.join(_usage_line(e, command, args).split())}\n")
            status = 2
        except ClickException as e:  # a bad parameter value click itself checks (files, choices)
            sys.stderr.write(f"tdvmcall: error: {' '.join(e.format_message().split())}\n")
            status = 2
        except StdoutError as e:  # a full disk under standard output: one line, never 1 (a failed check)
            sys.stderr.write(f"tdvmcall: error: {e}\n")
            status = 2
        except WorkerDied as e:  # a worker killed (the OOM killer) or crashed: no verdict, never 1
            if _ending.signum is None:  # else the workers died of the signal: the command was ended
                sys.stderr.write(f"tdvmcall: error: {' '.join(str(e).split())}\n")
            status = 2
        except (Abort, KeyboardInterrupt):  # click turns Ctrl-C into Exit(130), seen below
            status = 130
        except Exception:
            if _ending.signum is None:
                raise
            # the interrupt surfaced as another error: a library's own check failing on the way out
            # (hypothesis's engine interrupted before it was set up), or compiled code returning
            # with the exception set (SystemError): an interrupted command, not a traceback
            status = 130
        status = status if isinstance(status, int) else 0
        if status == 130 or _ending.signum is not None:  # typer returns Ctrl-C as status 130
            if _ending.signum is None:
                _ending.signum = signal.SIGINT
            _remove_partial()
            _say_ending()
            status = 128 + _ending.signum
    try:  # the last of the output may only fail now, when the buffer is flushed
        sys.stdout.flush()
    except StdoutError as e:
        if _ending.signum is None:  # an interrupted command keeps its status and its one line
            sys.stderr.write(f"tdvmcall: error: {e}\n")
            status = 2
    except OSError:
        pass
    return status


# --- the process: interrupts, termination, worker processes, partial files ------------------------
#: the signals that end a command, and what it then says; the exit status is 128 + the signal's
#: number, as a shell reports a process the signal ended (Ctrl-C 130, SIGTERM 143, SIGHUP 129)
ENDING_SIGNALS: dict[int, str] = {
    signal.SIGINT: "interrupted",
    signal.SIGTERM: "terminated",
    signal.SIGHUP: "hung up",
}
#: seconds between the first ending signal and a forced exit, for a command stuck where the
#: interrupt cannot reach it (compiled code, a lock, an exception the interpreter swallowed): its
#: workers are killed, its partial files removed, the line said, and the process exits
GRACE_SECONDS = 2.0
#: prctl(2) option: the signal a process gets when the thread that forked it ends (Linux)
PR_SET_PDEATHSIG = 1


class Interrupted(KeyboardInterrupt):
    """An ending signal (:data:`ENDING_SIGNALS`), raised in the main thread by :func:`run_app`'s
    handler.  A :class:`KeyboardInterrupt`, so that whatever already lets Ctrl-C through (click,
    hypothesis, ``except Exception``) lets SIGTERM through too."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _Ending:
    """The process's state for :func:`run_app`: the first ending signal, the watchdog, the partial
    files and the worker pools to clean up."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.said = False
        self.signalled = threading.Event()  # set by the handler: the watchdog's cue
        self.finished = threading.Event()  # set when a command ends with no signal: the watchdog leaves
        self.partial: set[str] = set()
        self.pools: list[ProcessPoolExecutor] = []


_ending = _Ending()


def check_interrupt() -> None:
    """Raise the pending ending signal again.  For long loops: Python swallows an exception raised
    in a garbage-collector callback or a ``__del__`` ("Exception ignored in: ..."), so a Ctrl-C that
    lands there would otherwise be lost (hypothesis's ``gc_callback``, issue 18.4)."""
    if _ending.signum is not None:
        raise Interrupted(_ending.signum)


def _say_ending() -> None:
    if _ending.signum is None or _ending.said:
        return
    _ending.said = True
    with contextlib.suppress(OSError, ValueError):  # a hung-up terminal: nowhere to say it
        sys.stderr.write(f"tdvmcall: {ENDING_SIGNALS[_ending.signum]}\n")
        sys.stderr.flush()


def _kill_workers(pool: ProcessPoolExecutor) -> None:
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        popen = getattr(proc, "_popen", None)
        if popen is not None and popen.returncode is not None:  # reaped: its pid may be another's now
            continue
        with contextlib.suppress(OSError):
            os.kill(proc.pid, signal.SIGKILL)


def _remove_partial() -> None:
    for name in list(_ending.partial):
        with contextlib.suppress(OSError):
            if os.path.isdir(name) and not os.path.islink(name):
                shutil.rmtree(name)
            else:
                os.unlink(name)
        _ending.partial.discard(name)


def _watchdog(signalled: threading.Event, finished: threading.Event) -> None:
    """A thread started with the command, idle until the first ending signal: then, unless the
    process has exited within :data:`GRACE_SECONDS`, :func:`_forced_exit`.  Started beforehand, so
    that the signal handler only sets an event (starting a thread there could wait forever on a
    lock the interrupted code holds)."""
    signalled.wait()
    if finished.is_set():
        return
    threading.Event().wait(GRACE_SECONDS)
    _forced_exit()


def _forced_exit() -> None:
    """The command did not end within :data:`GRACE_SECONDS` of the signal."""
    for pool in list(_ending.pools):
        _kill_workers(pool)
    _remove_partial()
    _say_ending()
    os._exit(128 + (_ending.signum or signal.SIGINT))


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if _ending.signum is not None:  # the first one is being handled: let its clean-up run
        return
    _ending.signum = signum
    _ending.signalled.set()
    raise Interrupted(signum)


def _unraisable(hook: Callable[[Any], object]) -> Callable[[Any], object]:
    def quiet(unraisable: Any) -> object:
        if isinstance(unraisable.exc_value, Interrupted):  # swallowed; check_interrupt raises it again
            return None
        return hook(unraisable)

    return quiet


@contextlib.contextmanager
def _ending_signals() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP raise :class:`Interrupted` in the main thread for the length of a
    command.  A signal the process started with ignored (``nohup``, ``cmd &`` in a script) stays
    ignored.  Only from the main thread (a test harness may run the app in another)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _ending.__init__()  # type: ignore[misc]  # a fresh state for this command
    saved = {s: signal.getsignal(s) for s in ENDING_SIGNALS}
    hook = sys.unraisablehook
    threading.Thread(
        target=_watchdog, args=(_ending.signalled, _ending.finished), name="tdvmcall-watchdog", daemon=True
    ).start()
    for s, handler in saved.items():
        if handler is not signal.SIG_IGN:
            signal.signal(s, _on_signal)
    sys.unraisablehook = _unraisable(hook)
    try:
        yield
    finally:
        if _ending.signum is None:  # else: keep ignoring repeats until the process has exited
            for s, handler in saved.items():
                signal.signal(s, handler)
            sys.unraisablehook = hook
            _ending.finished.set()
            _ending.signalled.set()  # the watchdog wakes, sees the command finished, and leaves


# workers ------------------------------------------------------------------------------------------
def available_cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def worker_count(value: int | None, option: str, default: int, work: int | None = None) -> int:
    """How many worker processes ``option`` starts: ``value`` (``None`` or 0: ``default``), a whole
    number of 0 or more, lowered to one per CPU available and to ``work`` (the units of work there
    are, when known).  A value lowered is said on stderr (one line); ``--workers 2**64`` or
    ``--jobs 100000`` never fork more processes than can run at once."""
    require_count(value, option, 0, "0: the default")
    cap = min(available_cpus(), work if work is not None else available_cpus())
    n = max(1, min(value or default, cap))
    if value and value > n:
        why = "one per CPU available" + (", and no more than there is work for" if work is not None else "")
        sys.stderr.write(f"tdvmcall: {option} {value} lowered to {n} (at most {why})\n")
    return n


def _die_with_parent(parent: int) -> None:
    """In a worker: end when the parent ends, even by SIGKILL (which it cannot catch).  Linux:
    ``prctl(PR_SET_PDEATHSIG, SIGKILL)``; elsewhere a thread that checks the parent every second."""
    armed = False
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    if os.getppid() != parent:  # the parent ended before the worker got here
        os._exit(1)
    if not armed:

        def watch() -> None:
            while os.getppid() == parent:
                threading.Event().wait(1.0)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()


def _worker_start(parent: int) -> None:
    """Each worker's first act.  Ctrl-C is the parent's to handle (the terminal sends it to the
    whole process group; the parent then ends its workers); SIGTERM and SIGHUP end a worker at once;
    a worker dies with its parent.  The signals were held since the fork; any that came is
    delivered on release, under these rules."""
    _ending.__init__()  # type: ignore[misc]  # nothing of the parent's state
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    _die_with_parent(parent)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, set(ENDING_SIGNALS))


def _worker_death(pool: ProcessPoolExecutor, broken: BrokenProcessPool, option: str) -> str:
    """What :class:`WorkerDied` says of a broken pool: how the worker that ended first ended.  The
    pool's own thread, once it has seen a worker die, ends the others with SIGTERM and reaps them
    all; the first is the one that did not end by SIGTERM (or, if all did, SIGTERM itself)."""
    if broken.__cause__ is not None:  # no worker died: a result the pool could not read back
        last = str(broken.__cause__).strip().strip("'").strip().splitlines() or ["unknown"]
        return f"a worker process failed ({last[-1].strip()}); the run is incomplete, so there is no verdict"
    thread = getattr(pool, "_executor_manager_thread", None)
    if thread is not None:
        thread.join(GRACE_SECONDS)
    ended = [p.exitcode for p in list((getattr(pool, "_processes", None) or {}).values()) if p.exitcode is not None]
    code = next((c for c in ended if c != -signal.SIGTERM), ended[0] if ended else None)
    if code is None:
        how = ""
    elif code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else "?"
        oom = ", which the out-of-memory killer sends" if -code == signal.SIGKILL else ""
        how = f" (signal {-code}, {name}{oom})"
    else:
        how = f" (exit status {code})"
    return (
        f"a worker process died{how}; the run is incomplete, so there is no verdict: run it again "
        f"(with fewer {option} if memory was short)"
    )


@contextlib.contextmanager
def worker_pool(workers: int, option: str = "--workers") -> Iterator[ProcessPoolExecutor]:
    """A pool of ``workers`` forked processes that end with the command.  Every worker is forked at
    once, with the ending signals held, so that none runs the parent's handlers.  When the block
    ends by an exception (an interrupt, SIGTERM, an error) the workers are killed rather than
    awaited: a worker blocked on a pipe or a lock can never hang the parent.  Workers die with the
    parent even when it is killed (:func:`_die_with_parent`).  A worker that dies on its own (the
    out-of-memory killer, a crash) ends the block with :class:`WorkerDied`, its signal or exit
    status said, and the other workers ended too (``option``: the command's option that sets how
    many there are)."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, set(ENDING_SIGNALS))
    try:
        pool = ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("fork"),
            initializer=_worker_start,
            initargs=(os.getpid(),),
        )
        _ending.pools.append(pool)
        pool.submit(int).result()  # forks every worker now (the fork start method starts them all)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
    try:
        yield pool
    except BrokenProcessPool as e:
        try:
            died = _worker_death(pool, e, option)
        finally:
            _kill_workers(pool)
            pool.shutdown(wait=True, cancel_futures=True)
        raise WorkerDied(died) from e
    except BaseException:
        _kill_workers(pool)
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    else:
        pool.shutdown(wait=True)
    finally:
        with contextlib.suppress(ValueError):
            _ending.pools.remove(pool)


# partial files ------------------------------------------------------------------------------------
@contextlib.contextmanager
def output_file(path: str | Path) -> Iterator[Path]:
    """Write an output under a temporary name beside ``path`` (unique: two runs never share it) and
    give it the final name by one rename when the block completes; on an error or an interrupt the
    temporary file is removed (by the forced exit too).  So ``path`` only ever holds a complete
    file, and nothing partial stays."""
    final = Path(path)
    held = signal.pthread_sigmask(signal.SIG_BLOCK, set(ENDING_SIGNALS))
    try:  # no signal between creating the temporary file and recording it
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
        _ending.partial.add(name)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # the mode a plain open() gives, not mkstemp's 0600
        os.close(fd)
        yield Path(name)
        os.replace(name, final)
    except OSError as e:  # a write or the rename failed: the error names the file asked for
        if e.filename == name:
            e.filename, e.filename2 = str(final), None
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):  # renamed: nothing left
            os.unlink(name)
        _ending.partial.discard(name)


@contextlib.contextmanager
def output_files(paths: Iterable[str | Path]) -> Iterator[list[Path]]:
    """Outputs that belong together (``export-c``'s header and C file, a patch series), as
    :func:`output_file` writes one: each under a temporary name, and every one renamed into place
    only once all are complete, the ending signals held from the first rename to the last.  An
    interrupt leaves the old files or the new ones, never a mix of the two nor a partial one."""
    with contextlib.ExitStack() as stack:
        temporaries = [stack.enter_context(output_file(p)) for p in paths]
        yield temporaries
        held = signal.pthread_sigmask(signal.SIG_BLOCK, set(ENDING_SIGNALS))
        try:
            stack.close()  # the renames
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)


@contextlib.contextmanager
def output_dir(path: str | Path) -> Iterator[Path]:
    """A directory of outputs, as :func:`output_file` writes one file: the block fills a temporary
    directory beside ``path``, which takes the name ``path`` when the block completes.  A ``path``
    that exists (empty, or holding what the caller has checked may be replaced) is moved aside by
    one rename first and removed after; on an error or an interrupt the temporary directory is
    removed and ``path`` is as it was.  (Between the two renames ``path`` is briefly absent: a kill
    just then leaves the old directory as ``.NAME.XXXXXX.old``, never a partial one under
    ``path``.)"""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    held = signal.pthread_sigmask(signal.SIG_BLOCK, set(ENDING_SIGNALS))
    try:
        name = tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
        _ending.partial.add(name)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
    aside: list[str] = []
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(name, 0o777 & ~umask)  # the mode a plain mkdir gives, not mkdtemp's 0700
        yield Path(name)
        if final.exists():
            # not recorded for the forced exit: the old directory is never removed before the new
            # one has its name
            aside.append(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
            os.replace(final, aside[0])  # onto the empty directory just made: one rename
            try:
                os.replace(name, final)
            except BaseException:
                os.replace(aside[0], final)  # the old one back under its name
                raise
        else:
            os.replace(name, final)
    finally:
        for left in (name, *aside):
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(left)
            _ending.partial.discard(left)

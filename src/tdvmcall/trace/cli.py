"""``tdvmcall trace``: audit kvm_exit traces for the TD exits hardened KVM would refuse.

The command only composes: reading is ``io.py`` and ``audit.py`` (fast path ``scan.py`` and ``_scan.c``,
reference parser ``reference.py``), verdicts ``verdict.py``, the report ``report.py``, Parquet
``parquet.py``, the plot ``plot.py`` (facts: docs/abi.md §3, §4, §7).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import textwrap
import time
from enum import Enum
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from ..console import fail, output_file, pick, whole_number
from ..kvm.trees import tree_help
from .io import TraceInputError

#: inputs at least this large (on disk) get a progress display when stderr is a terminal
PROGRESS_THRESHOLD = 64 << 20


class Format(str, Enum):
    auto = "auto"
    ftrace = "ftrace"
    trace_cmd = "trace-cmd"
    perf = "perf"


def _parse_td(text: str | None) -> set[int] | None:
    """The process ids of ``--td``: comma-separated numbers from 1 up, each decimal or 0x hex as
    every number of the command line (``console.whole_number``, docs/cli.md), nothing else."""
    if text is None:
        return None
    items = [p.strip() for p in text.split(",")]
    if not any(items):
        fail("--td: give at least one process id, e.g. --td 4100")
    ids = set()
    for p in items:
        if not p:
            fail(f"--td {text!r}: an empty item between commas; give process ids, e.g. --td 4100,4300")
        n = whole_number(p)
        if n is None or n < 1:
            fail(
                f"--td {text!r}: {p!r} is not a process id (a number from 1 up, decimal or 0x hex); e.g. --td 4100,4300"
            )
        ids.add(n)
    return ids


def _check_td(audit, given: set[int] | None) -> None:
    """Every id of ``--td`` should name a task of the inputs: none at all is an error (the report
    would have no TD), some not a warning on stderr."""
    if given is None:
        return
    tasks = audit.tasks.tasks
    missing = sorted(p for p in given if not any(t.pid == p or t.tgid == p for t in tasks))
    if not missing:
        return
    ids = ", ".join(map(str, missing))
    if len(missing) == len(given):
        shown = ", ".join(sorted({t.label for t in tasks})[:6]) or "none"
        fail(f"--td {ids}: no task in the input has this pid or tgid (tasks: {shown})")
    sys.stderr.write(f"tdvmcall: warning: --td {ids}: no task in the input has this pid or tgid\n")


def _check_outputs(inputs: list[str], plot: str | None, parquet: str | None) -> str:
    """Refuse, before any work, an output that cannot be written or would overwrite an input; the
    plot's format (from its extension; none: PNG)."""
    fmt = "png"
    named = [(opt, path) for opt, path in (("--plot", plot), ("--to-parquet", parquet)) if path is not None]
    for opt, path in named:
        if not path:
            fail(f"{opt}: empty file name")
        if path == "-":  # '-' is standard input among the inputs: never silently a file named '-'
            fail(f"{opt}: '-' would write a file named '-', not standard output; give a file name (./- if meant)")
        if os.path.isdir(path):
            fail(f"{opt} {path}: is a directory; name a file, e.g. {os.path.join(path, 'exits')}")
        parent = os.path.dirname(path) or "."
        if not os.path.isdir(parent):
            fail(f"{opt} {path}: no such directory {parent}")
        if not os.access(parent, os.W_OK):
            fail(f"{opt} {path}: cannot write in directory {parent}")
        for i in inputs:
            if i != "-" and os.path.exists(i) and os.path.exists(path) and os.path.samefile(i, path):
                fail(f"{opt} {path}: is an input file; it would be overwritten (name another file)")
    if plot:
        from .plot import PLOT_FORMATS  # numpy and the audit: only for --plot

        ext = os.path.splitext(plot)[1][1:].lower()
        if ext and ext not in PLOT_FORMATS:
            fail(f"--plot {plot}: cannot write .{ext} files; use {', '.join(PLOT_FORMATS)} (no extension: PNG)")
        fmt = ext or "png"
    if plot and parquet and os.path.abspath(plot) == os.path.abspath(parquet):
        fail(f"--plot and --to-parquet name the same file {plot}")
    return fmt


def _load() -> tuple:
    """The audit and the report (numpy and the compiled scanner); one line and exit 2 when the
    scanner was not built (a source tree used without ``pip install``)."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's BLAS threads: unused here, 0.05 s to start
    try:
        from . import audit as trace
        from . import report as trace_report
    except ImportError as e:
        if "_scan" not in str(e):
            raise
        fail(f"trace: the compiled scanner (tdvmcall.trace._scan) is not built ({e}); install with pip install -e .")
    return trace, trace_report


def register(app: typer.Typer) -> None:
    @app.command("trace")
    def trace_cmd(
        files: Annotated[list[str], typer.Argument(help="trace files (plain, .gz or .zst; '-' for standard input)")],
        format: Annotated[Format, typer.Option("--format", help="input format; auto-detected per file")] = Format.auto,
        td: Annotated[
            str | None,
            typer.Option(
                "--td", help="comma-separated pids/tgids of the TDs (default: infer: a task with a TDCALL exit is a TD)"
            ),
        ] = None,
        tree: Annotated[
            str | None,
            typer.Option(
                "--tree",
                help=tree_help("KVM tree the trace came from, whose rules judge it")
                + "; a re-labelled reason with the bus-lock flag (CPUID 0x4000000) is "
                "normal on v7.3 only. See docs/trace.md",
            ),
        ] = None,
        as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
        plot_file: Annotated[
            str | None,
            typer.Option(
                "--plot", help="write a plot of exits over time by verdict (PNG; .svg, .pdf, ... by extension)"
            ),
        ] = None,
        parquet_file: Annotated[
            str | None,
            typer.Option("--to-parquet", help="write one row per exit to a Parquet file (schema: docs/trace.md)"),
        ] = None,
        top: Annotated[int, typer.Option("--top", help="how many offending (reason, mask) pairs to list")] = 10,
        progress: Annotated[
            bool | None,
            typer.Option(
                "--progress/--no-progress", help="progress on stderr (default: for large inputs on a terminal)"
            ),
        ] = None,
    ) -> None:
        """Which TD exits of real hosts' kvm_exit traces would hardened KVM refuse?

        Reads ftrace, trace-cmd report or perf script text; for every TDVMCALL exit of a TD, the
        mask (info1) and the reason say whether the TDX module could have sent it and whether
        hardened KVM completes it, refuses it, or it depends on inputs or on the leaf.

        Exit status: 0 when the report is printed (exits hardened KVM would refuse are findings of
        the report, not a failure of the command), 2 for bad input (one line on stderr).

        Examples: 'tdvmcall trace exits.trace.zst', 'trace-cmd report | tdvmcall trace -',
        'tdvmcall trace exits.txt --json --plot exits.png'. See docs/trace.md."""
        if top < 0:
            fail(f"--top {top}: a count cannot be negative")
        td_pids = _parse_td(td)
        from ..kvm.trees import DEFAULT_TREE, TREES

        tree_name = DEFAULT_TREE if tree is None else pick(tree, TREES, "--tree", "KVM tree")  # any case
        if files.count("-") > 1:  # the second reading would find it empty: say so instead
            fail(f"'-' (standard input) is given {files.count('-')} times; it can be read only once")
        plot_format = _check_outputs(files, plot_file, parquet_file)
        if parquet_file:  # pyarrow's default allocator (mimalloc) keeps what Parquet batches free:
            os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")  # 265 MB peak instead of 323
        err = Console(stderr=True)
        trace, trace_report = _load()
        gc.freeze()  # what the imports created is not walked by the collector again (nor at exit)
        audit = trace.Audit(
            td_pids=td_pids, parquet=parquet_file, times=bool(plot_file), tree=tree_name, tree_given=tree is not None
        )
        try:
            for path in files:
                with _progress(err, path, progress) as report:
                    trace.audit_input(audit, path, fmt=format.value, progress=report)
        except TraceInputError as e:
            if audit.parquet is not None:
                audit.parquet.discard()
            fail(str(e))
        _check_td(audit, td_pids)
        td_tasks = trace_report.td_tasks(audit)
        try:
            result = trace_report.finish(audit, td_tasks, top=top)
        except OSError as e:
            fail(f"--to-parquet {parquet_file}: cannot write: {e.strerror or e}")
        if plot_file:
            from .plot import plot  # matplotlib: only for the plot

            try:
                with output_file(plot_file) as partial:  # the final name only ever holds a whole plot
                    plot(audit, td_tasks, str(partial), plot_format)
            except OSError as e:
                fail(f"--plot {plot_file}: cannot write: {e.strerror or e}")
        if as_json:
            sys.stdout.write(json.dumps(result, indent=2) + "\n")
        else:
            show(result, report_console())
        for what, path in (("plot", plot_file), ("parquet", parquet_file)):
            if path:
                err.print(f"wrote {what} {path}", markup=False, highlight=False, soft_wrap=True)


def report_console() -> Console:
    """Where the table report goes: the terminal at its width (a table too wide: one entry per row), or, when
    standard output is a file or a pipe, wide enough that no row is wrapped or cut."""
    console = Console()
    return console if console.is_terminal else Console(width=1 << 16)


class _progress:
    """A rich progress bar of bytes read and lines per second, for large inputs on a terminal."""

    def __init__(self, console: Console, path: str, wanted: bool | None):
        size = os.path.getsize(path) if path != "-" and os.path.isfile(path) else None
        if wanted is None:
            wanted = console.is_terminal and (size is None or size >= PROGRESS_THRESHOLD)
        self.enabled = wanted
        self.console, self.path, self.size = console, path, size

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self.bar.start()
        self.task = self.bar.add_task(os.path.basename(self.path) or self.path, total=self.size, rate="")
        self.t0 = time.perf_counter()

        def report(position: int, lines: int) -> None:
            dt = max(time.perf_counter() - self.t0, 1e-9)
            self.bar.update(self.task, completed=position, rate=f"{lines / dt / 1e6:.2f} M lines/s")

        return report

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.bar.stop()


def _reason(pair: dict) -> str:
    """A pair's reason as ``kvm_exit`` printed it: the name, then its flags (``CPUID 0x4000000``)."""
    return f"{pair['reason']} {pair['reason_flags']}" if pair["reason_flags"] else pair["reason"]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def show(r: dict, console: Console) -> None:
    """The report as rich tables."""
    rule = r["tree_rule"]
    console.print(
        f"KVM tree: [bold]{escape(r['tree'])}[/] ({escape(rule['release'])}; "
        + ("given with --tree" if rule["assumed"] == "given" else "the default; --tree to name another")
        + f"): exit reasons re-labelled on the {'basic reason' if rule['relabel'] == 'basic' else 'whole reason'}"
        + ("; a bus-lock flag is kept" if rule["relabel"] == "basic" else "; only TDCALL carries a bus-lock flag")
    )
    for i in r["inputs"]:
        console.print(
            f"[bold]{escape(i['name'])}[/]: {i['format']}, {i['compression']}, {i['lines']:,} lines: "
            f"{i['parsed']:,} kvm_exit parsed, {i['unparsed']:,} kvm_exit-looking lines unparsed, "
            f"{i['other_events']:,} other events skipped, {i['comments']:,} header/blank"
            + (", [yellow]last line truncated[/]" if i["truncated_last_line"] else "")
        )
    for b in r["unparsed_examples"]:
        console.print(f"  [yellow]unparsed[/] {b['input']}:{b['line']}: ", end="")
        console.print(b["text"], markup=False, highlight=False)
    td = r["td"]
    console.print(
        f"TDs ({td['mode']}: {td['rule']}): {len(td['tasks'])} tasks; non-TD tasks: {len(td['non_td_tasks'])}"
    )
    t = r["totals"]
    console.print(
        f"exits: {t['exits']:,}; TDVMCALL exits of TDs: {t['tdvmcall_exits']:,}; other TD exits: "
        f"{t['td-other_exits']:,}; non-TD exits: {t['non-td_exits']:,}"
    )
    v = t["verdicts"]
    console.print(
        "hardened KVM: "
        + ", ".join(f"{k} {n:,}" for k, n in v.items())
        + f"; refused share {_pct(t['refused_share'])}, depends share {_pct(t['depends_share'])}"
    )
    if v["inconsistent"]:
        console.print(f"[red]{v['inconsistent']:,} exits are inconsistent with the TDX module or KVM:[/]")
        for p in r["pairs"]:
            if p["verdict"] == "inconsistent":
                console.print(
                    f"  {_reason(p)} {p['mask']} ({p['exits']:,} exits): {p['detail']}", markup=False, highlight=False
                )
        flagged = any(
            p["verdict"] == "inconsistent" and p["reason_flags"] and p["reason"] != "TDCALL" for p in r["pairs"]
        )
        if flagged:  # a re-labelled reason with a flag: normal on the trees that re-label on bits 15:0
            from ..kvm.trees import RELABEL_BASIC, TREES

            keep = [t.name for t in TREES.values() if t.relabel == RELABEL_BASIC and t.name != r["tree"]]
            if keep:
                console.print(
                    f"  (on {' and '.join(keep)} a re-labelled reason keeps its flag and is judged by its leaf: "
                    f"if the trace came from such a host, give --tree {keep[0]})",
                    markup=False,
                    highlight=False,
                )

    verdict_cols = (
        ("tdvmcall", "TDVMCALL"),
        ("completes", "completes"),
        ("depends", "depends"),
        ("refused", "refused"),
        ("internal-error", "int.err"),
        ("inconsistent", "incons."),
    )

    def counts_table(title: str, rows: list[dict], keys: list[tuple[str, str]]) -> None:
        if not rows:
            return
        heads = [(head, False) for _, head in keys]
        heads += [(head, True) for head in ("exits", *(h for _, h in verdict_cols), "refused %")]
        cells = [
            [("yes" if row[k] else "no") if k == "td" else str(row[k]) for k, _ in keys]
            + [f"{row['exits']:,}", *[f"{row[c]:,}" for c, _ in verdict_cols], _pct(row["refused_share"])]
            for row in rows
        ]
        table_or_records(console, title, heads, cells)

    counts_table("per process", r["per_process"], [("process", "process"), ("comm", "comm"), ("td", "TD")])
    counts_table("per vCPU", r["per_vcpu"], [("task_label", "task"), ("vcpu", "vCPU"), ("td", "TD")])
    counts_table("TDVMCALL exits of TDs, per reason", r["per_reason"], [("reason_name", "reason")])
    counts_table("TDVMCALL exits of TDs, per mask", r["per_mask"], [("mask", "mask"), ("registers", "registers")])
    if r["top_offending"]:
        table_or_records(
            console,
            "top offending (reason, mask)",
            [("reason", False), ("mask", False), ("exits", True), ("verdict", False), ("detail", False)],
            [[_reason(p), p["mask"], f"{p['exits']:,}", p["verdict"], p["detail"]] for p in r["top_offending"]],
            wrap=("detail",),
        )


def table_or_records(
    console: Console, title: str, heads: list[tuple[str, bool]], rows: list[list[str]], wrap: tuple[str, ...] = ()
) -> None:
    """A table whose values are never cut: every cell but those of the ``wrap`` columns (long
    text, folded at its spaces) keeps its whole value on one line.  When such a table is wider than
    the console (a narrow terminal), each row is printed as ``head value`` items instead, as many
    to a line as fit, a line broken only between items (or at the spaces of a long text)."""
    tab = Table(title=title, title_justify="left")
    for head, right in heads:
        folds = head in wrap
        tab.add_column(head, justify="right" if right else "left", no_wrap=not folds, overflow="fold")
    for cells in rows:
        tab.add_row(*(Text(c) for c in cells))  # Text: a "[...]" in a value is not markup
    if Measurement.get(console, console.options.update_width(1 << 16), tab).minimum <= console.width:
        console.print(tab)
        return
    console.print(Text(title, style="italic"))
    width = max(console.width - 4, 20)
    for cells in rows:
        lines: list[str] = []
        for (head, _), value in zip(heads, cells):
            item = f"{head} {value}"
            if len(item) > width:  # a long text: folded at its spaces, never inside a word
                lines += textwrap.wrap(item, width, break_long_words=False, break_on_hyphens=False)
            elif lines and len(lines[-1]) + 2 + len(item) <= width:
                lines[-1] += f"; {item}"
            else:
                lines.append(item)
        for k, text in enumerate(lines):
            console.print(("- " if k == 0 else "  ") + text, markup=False, highlight=False, soft_wrap=True)

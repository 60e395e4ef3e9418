"""``tdvmcall trace``: audit kvm_exit traces for the TD exits hardened KVM would refuse.

The command only composes: reading is ``trace.py``, verdicts ``trace_verdict.py``, the report
``trace_report.py``, Parquet ``trace_parquet.py``, the plot ``trace_plot.py`` (facts: ABI.md §3, §4, §7).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from enum import Enum
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .io import TraceInputError

#: inputs at least this large (on disk) get a progress display when stderr is a terminal
PROGRESS_THRESHOLD = 64 << 20


class Format(str, Enum):
    auto = "auto"
    ftrace = "ftrace"
    trace_cmd = "trace-cmd"
    perf = "perf"


def _parse_td(text: str | None) -> set[int] | None:
    if text is None:
        return None
    try:
        pids = {int(p) for p in text.replace(" ", "").split(",") if p}
    except ValueError:
        raise TraceInputError(f"--td: {text!r} is not a list of process ids; use e.g. --td 4100,4300") from None
    if not pids:
        raise TraceInputError("--td: give at least one process id, e.g. --td 4100")
    return pids


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
        as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
        plot_file: Annotated[str | None, typer.Option("--plot", help="write a PNG: exits over time by verdict")] = None,
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
        hardened KVM completes it, refuses it, or it depends on inputs or on the leaf."""
        if parquet_file:  # pyarrow's default allocator (mimalloc) keeps what Parquet batches free:
            os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")  # 265 MB peak instead of 323
        gc.disable()  # the imports and numba's start-up create about a million objects: see below
        try:
            from . import audit as trace
            from . import report as trace_report
            from . import scan as trace_scan

            trace_scan.warm_up()
            # those objects would be walked by the cyclic garbage collector again and again, and
            # once more at exit (0.4 s): exempt them
            gc.freeze()
        finally:
            gc.enable()
        err = Console(stderr=True)
        try:
            audit = trace.Audit(td_pids=_parse_td(td), parquet=parquet_file)
            for path in files:
                with _progress(err, path, progress) as report:
                    trace.audit_input(audit, path, fmt=format.value, progress=report)
            td_tasks = trace_report.td_tasks(audit)
            result = trace_report.finish(audit, td_tasks, top=top)
            if plot_file:
                from .plot import plot  # matplotlib: only for the plot

                plot(audit, td_tasks, plot_file)
        except TraceInputError as e:
            err.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except OSError as e:  # writing the plot or the Parquet file
            err.print(f"error: {e.filename or ''}: {e.strerror or e}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        if as_json:
            sys.stdout.write(json.dumps(result, indent=2) + "\n")
        else:
            show(result, Console())
        for what, path in (("plot", plot_file), ("parquet", parquet_file)):
            if path:
                err.print(f"wrote {what} {path}", markup=False, highlight=False)
        gc.freeze()  # and what the run created: not walked again at exit


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


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def show(r: dict, console: Console) -> None:
    """The report as rich tables."""
    for i in r["inputs"]:
        console.print(
            f"[bold]{i['name']}[/]: {i['format']}, {i['compression']}, {i['lines']:,} lines: "
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
                    f"  {p['reason']} {p['mask']} ({p['exits']:,} exits): {p['detail']}", markup=False, highlight=False
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
        tab = Table(title=title, title_justify="left")
        for _, head in keys:
            tab.add_column(head, overflow="fold")
        for head in ("exits", *(h for _, h in verdict_cols), "refused %"):
            tab.add_column(head, justify="right")
        for row in rows:
            cells = [("yes" if row[k] else "no") if k == "td" else str(row[k]) for k, _ in keys]
            tab.add_row(
                *cells, f"{row['exits']:,}", *[f"{row[c]:,}" for c, _ in verdict_cols], _pct(row["refused_share"])
            )
        console.print(tab)

    counts_table("per process", r["per_process"], [("process", "process"), ("comm", "comm"), ("td", "TD")])
    counts_table("per vCPU", r["per_vcpu"], [("task_label", "task"), ("vcpu", "vCPU"), ("td", "TD")])
    counts_table("TDVMCALL exits of TDs, per reason", r["per_reason"], [("reason_name", "reason")])
    counts_table("TDVMCALL exits of TDs, per mask", r["per_mask"], [("mask", "mask"), ("registers", "registers")])
    if r["top_offending"]:
        tab = Table(title="top offending (reason, mask)", title_justify="left")
        for col in ("reason", "mask", "exits", "verdict", "detail"):
            tab.add_column(col, justify="right" if col == "exits" else "left")
        for p in r["top_offending"]:
            tab.add_row(p["reason"], p["mask"], f"{p['exits']:,}", p["verdict"], p["detail"])
        console.print(tab)

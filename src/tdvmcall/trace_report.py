"""The report of ``tdvmcall trace``, from the audit's aggregates: tables (polars), JSON, Parquet,
the plot.  ``trace.py`` reads and counts (numpy); this module names, classifies and presents
(facts: ABI.md §4, verdicts from ``trace.verdict_for`` and the leaf table)."""

from __future__ import annotations

import numpy as np
import polars as pl

from .codes import EXIT_REASON_TDCALL, VMX_EXIT_REASON_NAMES
from .regs import GPR_MASK, names_in
from .trace import (BUCKET_BASE, FAILING, KINDS, VERDICTS, Audit, Columns, ReasonTable, TaskTable,
                    verdict_if_td)

# ---------------------------------------------------------------------------------------------
# frames: the aggregates with their reasons and tasks named
# ---------------------------------------------------------------------------------------------


def reason_frame(reasons: ReasonTable) -> pl.DataFrame:
    """Every reason id with its text, name, flags and whether it is a TDVMCALL reason."""
    rs = reasons.reasons
    return pl.DataFrame({"rid": range(len(rs)), "reason": [r.text for r in rs], "reason_name": [r.name for r in rs],
                         "reason_flags": [r.flags for r in rs],
                         "tdvmcall_reason": reasons.tdvmcall(np.arange(len(rs)))},
                        schema={"rid": pl.UInt32, "reason": pl.String, "reason_name": pl.String,
                                "reason_flags": pl.String, "tdvmcall_reason": pl.Boolean})


def frame(cols: Columns, reasons: ReasonTable) -> pl.DataFrame:
    """Aggregates or rows as a frame: the reason named (``reason`` its text, ``reason_name``,
    ``reason_flags``, ``tdvmcall_reason``) and ``mask`` null unless it is a TDVMCALL reason."""
    f = pl.DataFrame(cols).join(reason_frame(reasons), on="rid", how="left")
    if "mask" not in f.columns:  # rows: info1 is the mask of a TDVMCALL reason
        f = f.with_columns(mask=pl.col("info1"))
    return f.with_columns(mask=pl.when("tdvmcall_reason").then("mask"))


def task_frame(tasks: TaskTable, td: set[int]) -> pl.DataFrame:
    return pl.DataFrame(
        [(i, t.source, t.comm, t.pid, t.tgid, t.process, t.label, i in td) for i, t in enumerate(tasks.tasks)],
        schema={"task": pl.UInt32, "source": pl.String, "comm": pl.String, "pid": pl.Int64, "tgid": pl.Int64,
                "process": pl.Int64, "task_label": pl.String, "td": pl.Boolean}, orient="row")


def td_tasks(audit: Audit) -> set[int]:
    """Task ids of TDs: given (``--td``: a pid or tgid) or inferred (a task with a TDCALL exit
    is a TD, and so is every task of the same process when the trace shows tgids)."""
    tasks = audit.tasks.tasks
    if audit.td_pids is not None:
        return {i for i, t in enumerate(tasks) if t.pid in audit.td_pids or t.tgid in audit.td_pids}
    by_key = frame(audit.key_columns(), audit.reasons)
    tdcall = by_key.filter(pl.col("reason_name") == VMX_EXIT_REASON_NAMES[EXIT_REASON_TDCALL],
                           pl.col("tdvmcall_reason"))["task"].unique().to_list()
    procs = {(tasks[i].source, tasks[i].tgid) for i in tdcall if tasks[i].tgid is not None}
    return set(tdcall) | {i for i, t in enumerate(tasks) if t.tgid is not None and (t.source, t.tgid) in procs}


def classify(frame: pl.DataFrame, td: set[int], reasons: ReasonTable) -> pl.DataFrame:
    """Add ``td``, ``kind``, ``verdict`` (null unless kind = tdvmcall) and its ``detail``,
    ``missing`` and ``refused_for`` to a frame with task, rid and mask columns."""
    f = frame.with_columns(td=pl.col("task").is_in(sorted(td)))
    rows = []
    for rid, mask in f.filter("td").select("rid", "mask").unique().rows():  # verdicts for TDs only
        v = verdict_if_td(reasons.reasons[rid], mask)
        rows.append((rid, mask, v.verdict if v else None, v.detail if v else None,
                     " ".join(v.missing) if v else None, ", ".join(v.refused_for) if v else None))
    verdicts = pl.DataFrame(rows, schema={"rid": pl.UInt32, "mask": pl.UInt64, "verdict_if_td": pl.String,
                                          "detail": pl.String, "missing": pl.String, "refused_for": pl.String},
                            orient="row")
    f = f.join(verdicts, on=["rid", "mask"], how="left", nulls_equal=True)
    kind = (pl.when(~pl.col("td")).then(pl.lit("non-td"))
            .when(pl.col("verdict_if_td").is_null()).then(pl.lit("td-other"))
            .otherwise(pl.lit("tdvmcall")))
    return f.with_columns(kind=kind, verdict=pl.when(pl.col("td")).then("verdict_if_td"))


def by_time(audit: Audit, td: set[int]) -> tuple[pl.DataFrame, float]:
    """Exit counts per (time bucket, kind/verdict); the bucket width in seconds."""
    t = classify(frame(audit.time_columns(), audit.reasons), td, audit.reasons)
    t = t.with_columns(series=pl.coalesce("verdict", "kind"))
    width = BUCKET_BASE * (1 << audit.shift)
    return t.group_by("bucket", "series").agg(n=pl.col("n").sum()).sort("bucket"), width


def finish(audit: Audit, top: int = 10) -> dict:
    """The report (writing the Parquet file first, if asked)."""
    td = td_tasks(audit)
    if audit.parquet is not None:
        audit.parquet.close(td)
    return build_report(audit, td, top)


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------


def _verdict_columns() -> list[pl.Expr]:
    cols = [pl.col("n").filter(pl.col("kind") == "tdvmcall").sum().alias("tdvmcall")]
    cols += [pl.col("n").filter(pl.col("verdict") == v).sum().alias(v) for v in VERDICTS]
    return cols


def _with_shares(df: pl.DataFrame) -> pl.DataFrame:
    denom = pl.when(pl.col("tdvmcall") > 0).then(pl.col("tdvmcall"))
    return df.with_columns(
        refused_share=(pl.sum_horizontal(*FAILING) / denom).fill_null(0.0).round(6),
        depends_share=(pl.col("depends") / denom).fill_null(0.0).round(6),
    )


def build_report(audit: Audit, td: set[int], top: int = 10) -> dict:
    """The whole report as plain data (what ``--json`` prints)."""
    tasks = task_frame(audit.tasks, td)
    k = classify(frame(audit.key_columns(), audit.reasons), td, audit.reasons).join(tasks.drop("td"), on="task",
                                                                                    how="left")
    total = k["n"].sum() if len(k) else 0

    td_rows = k.filter(pl.col("kind") == "tdvmcall")

    def table(frame: pl.DataFrame, keys: list[str]) -> list[dict]:
        if frame.is_empty():
            return []
        df = frame.group_by(keys).agg(pl.col("n").sum().alias("exits"), *_verdict_columns())
        return _with_shares(df).sort(keys).to_dicts()

    per_process = table(k, ["source", "process", "comm", "td"])
    per_vcpu = table(k, ["source", "process", "task_label", "vcpu", "td"])
    per_reason = table(td_rows, ["reason_name"])
    per_mask = [dict(r, mask=f"{r['mask']:#06x}", registers=" ".join(names_in(r["mask"] & GPR_MASK, 16)))
                for r in table(td_rows, ["mask"])]
    pairs = []
    if not td_rows.is_empty():
        rank = {"refused": 0, "internal-error": 0, "depends": 1, "inconsistent": 2, "completes": 3}
        pairs_df = (td_rows.group_by("reason_name", "mask", "verdict", "detail", "missing", "refused_for")
                    .agg(exits=pl.col("n").sum()))
        pairs = sorted(pairs_df.to_dicts(), key=lambda r: (rank[r["verdict"]], -r["exits"], r["reason_name"], r["mask"]))
        for r in pairs:
            r["reason"] = r.pop("reason_name")
            r["mask"] = f"{r['mask']:#06x}"
    by_kind = {kd: int(k.filter(pl.col("kind") == kd)["n"].sum()) for kd in KINDS}
    by_verdict = {v: int(td_rows.filter(pl.col("verdict") == v)["n"].sum()) for v in VERDICTS}
    n_td = by_kind["tdvmcall"]
    inferred = audit.td_pids is None
    td_tasks = tasks.filter("td")
    return {
        "inputs": [{"name": i.name, "format": i.format, "compression": i.compression, "bytes": i.bytes,
                    "lines": i.counts.lines, "kvm_exit_lines": i.counts.kvm_exit_lines, "parsed": i.counts.parsed,
                    "unparsed": i.counts.unparsed, "other_events": i.counts.other_events,
                    "comments": i.counts.comments, "truncated_last_line": i.counts.truncated_last_line}
                   for i in audit.inputs],
        "unparsed_examples": [{"input": i.name, "line": n, "text": t[:300]} for i in audit.inputs for n, t in i.counts.bad],
        "td": {
            "mode": "inferred" if inferred else "given",
            "rule": ("a task with a TDCALL exit is a TD (and every task of its process when tgids are shown)"
                     if inferred else "tasks whose pid or tgid was given with --td"),
            "given": sorted(audit.td_pids) if audit.td_pids is not None else None,
            "tasks": [f"{r['source']}:{r['task_label']}" for r in td_tasks.to_dicts()],
            "non_td_tasks": [f"{r['source']}:{r['task_label']}" for r in tasks.filter(~pl.col("td")).to_dicts()],
        },
        "totals": {
            "exits": int(total), **{f"{kd}_exits": v for kd, v in by_kind.items()},
            "verdicts": by_verdict,
            "refused_share": round((by_verdict["refused"] + by_verdict["internal-error"]) / n_td, 6) if n_td else 0.0,
            "depends_share": round(by_verdict["depends"] / n_td, 6) if n_td else 0.0,
        },
        "per_process": per_process,
        "per_vcpu": per_vcpu,
        "per_reason": per_reason,
        "per_mask": per_mask,
        "pairs": pairs,
        "top_offending": [p for p in pairs if p["verdict"] in FAILING + ("depends",)][:top],
    }


# ---------------------------------------------------------------------------------------------
# Parquet: one row per parsed exit
# ---------------------------------------------------------------------------------------------

#: the Parquet columns (documented in docs/trace.md)
PARQUET_COLUMNS = (
    ("source", "string"), ("line", "uint64"), ("ts", "float64"), ("cpu", "uint32"), ("comm", "string"),
    ("pid", "int64"), ("tgid", "int64"), ("vcpu", "uint32"), ("reason", "string"), ("reason_flags", "string"),
    ("info1", "uint64"), ("mask", "uint64"), ("td", "bool"), ("kind", "string"), ("verdict", "string"),
    ("missing", "string"),
)


def parquet_schema():
    import pyarrow as pa  # only when writing Parquet: it is slow to import

    return pa.schema([(name, pa.type_for_alias(t)) for name, t in PARQUET_COLUMNS])


class ParquetSink:
    """Writes parsed exits to ``path``.  Whether a task is a TD is known only at the end (when it
    is inferred), so rows go to a temporary file first and are rewritten, row group by row group,
    with the reasons named and the ``td``, ``kind``, ``verdict`` and ``missing`` columns added."""

    def __init__(self, path: str, audit: Audit):
        import pyarrow.parquet as pq

        self.path = path
        self.tmp = path + ".partial"
        self.audit = audit
        self._pq = pq
        self._writer = None

    def write(self, rows: Columns, source: str) -> None:
        import pyarrow as pa

        t = pa.table({**rows, "source": pa.array([source] * len(rows["line"]), pa.string())})
        if self._writer is None:
            self._writer = self._pq.ParquetWriter(self.tmp, t.schema, compression="zstd")
        self._writer.write_table(t)

    def close(self, td: set[int]) -> None:
        import os

        audit = self.audit
        tasks = task_frame(audit.tasks, td).drop("td", "source")
        schema = parquet_schema()
        out = self._pq.ParquetWriter(self.path, schema, compression="zstd")
        try:
            if self._writer is not None:
                self._writer.close()
                for batch in self._pq.ParquetFile(self.tmp).iter_batches(batch_size=1 << 20):
                    f = classify(frame(pl.from_arrow(batch), audit.reasons), td, audit.reasons)  # type: ignore[arg-type]
                    f = f.join(tasks, on="task", how="left")
                    f = f.select("source", "line", "ts", "cpu", "comm", "pid", "tgid", "vcpu",
                                 pl.col("reason_name").alias("reason"), "reason_flags", "info1", "mask", "td", "kind",
                                 "verdict", pl.when(pl.col("td")).then("missing").alias("missing"))
                    out.write_table(f.to_arrow().cast(schema))
        finally:
            out.close()
            if os.path.exists(self.tmp):
                os.remove(self.tmp)


# ---------------------------------------------------------------------------------------------
# the plot
# ---------------------------------------------------------------------------------------------

PLOT_COLOURS = {"completes": "#4c9a2a", "depends": "#e0a526", "refused": "#c0392b", "internal-error": "#7d3c98",
                "inconsistent": "#7f8c8d"}


def plot(audit: Audit, td: set[int], path: str) -> None:
    """TDVMCALL exits of TDs over time, stacked by verdict (exits per second)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, width = by_time(audit, td)
    t = t.filter(pl.col("series").is_in(VERDICTS))
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=100)
    if t.is_empty():
        ax.text(0.5, 0.5, "no TDVMCALL exits of a TD in the trace", ha="center", va="center", transform=ax.transAxes)
    else:
        lo, hi = int(t["bucket"].min()), int(t["bucket"].max())
        grid = pl.DataFrame({"bucket": range(lo, hi + 1)}, schema={"bucket": pl.Int64})
        wide = t.pivot(on="series", index="bucket", values="n", aggregate_function="sum")
        wide = grid.join(wide, on="bucket", how="left").fill_null(0)
        x = [(b - lo) * width for b in wide["bucket"].to_list()]
        series = [v for v in VERDICTS if v in wide.columns]
        ax.stackplot(x, *[[n / width for n in wide[v].to_list()] for v in series], labels=series,
                     colors=[PLOT_COLOURS[v] for v in series], step="post")
        ax.legend(loc="upper right", fontsize="small")
        ax.set_xlim(0, max(x[-1], width))
    ax.set_xlabel(f"seconds since the first exit (bins of {width:g} s)")
    ax.set_ylabel("TDVMCALL exits per second")
    ax.set_title("TDVMCALL exits of TDs by hardened-KVM verdict")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


__all__ = ["ParquetSink", "build_report", "by_time", "classify", "finish", "frame", "plot", "td_tasks"]

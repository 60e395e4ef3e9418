"""``tdvmcall trace --plot``: the audit's time buckets as polars frames and the plot (exits over
time, stacked by verdict).  Classification comes from ``trace_verdict.classify_exit``, as in the
report (``trace_report``) and the Parquet file (``trace_parquet``)."""

from __future__ import annotations

import numpy as np
import polars as pl

from .trace import Audit, Columns, ReasonTable, bucket_width
from .trace_verdict import VERDICTS, classify_exit

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


def classify(frame: pl.DataFrame, td: set[int], reasons: ReasonTable) -> pl.DataFrame:
    """Add ``td``, ``kind``, ``verdict`` (null unless kind = tdvmcall) and its ``detail``,
    ``missing`` and ``refused_for`` to a frame with task, rid and mask columns."""
    f = frame.with_columns(td=pl.col("task").is_in(sorted(td)))
    rows = [(is_td, rid, mask, *vars(classify_exit(reasons.reasons[rid], mask, is_td)).values())
            for is_td, rid, mask in f.select("td", "rid", "mask").unique().rows()]
    classes = pl.DataFrame(rows, schema={"td": pl.Boolean, "rid": pl.UInt32, "mask": pl.UInt64, "kind": pl.String,
                                         "verdict": pl.String, "detail": pl.String, "missing": pl.String,
                                         "refused_for": pl.String}, orient="row")
    return f.join(classes, on=["td", "rid", "mask"], how="left", nulls_equal=True)


def by_time(audit: Audit, td: set[int]) -> tuple[pl.DataFrame, float]:
    """Exit counts per (time bucket, kind/verdict); the bucket width in seconds."""
    t = classify(frame(audit.time_columns(), audit.reasons), td, audit.reasons)
    t = t.with_columns(series=pl.coalesce("verdict", "kind"))
    width = bucket_width(audit.shift)
    return t.group_by("bucket", "series").agg(n=pl.col("n").sum()).sort("bucket"), width


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


__all__ = ["by_time", "classify", "frame", "plot"]

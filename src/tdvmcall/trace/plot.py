"""``tdvmcall trace --plot``: TDVMCALL exits of TDs over time, stacked by verdict, from the audit's
time buckets (numpy and matplotlib; classification from ``trace_verdict``, as in the report and
the Parquet file)."""

from __future__ import annotations

import numpy as np

from .audit import Audit
from .rows import bucket_width, is_tdvmcall_reason
from .verdict import VERDICTS, classify_rows

PLOT_COLOURS = {
    "completes": "#4c9a2a",
    "depends": "#e0a526",
    "refused": "#c0392b",
    "internal-error": "#7d3c98",
    "inconsistent": "#7f8c8d",
}


def by_time(audit: Audit, td: set[int]) -> tuple[np.ndarray, np.ndarray, float]:
    """TDVMCALL exits of TDs per time bucket and verdict: the bucket numbers (every one from the
    first to the last), counts (buckets x :data:`VERDICTS`), and the bucket width in seconds."""
    t = audit.time_columns()
    reasons = audit.reasons.reasons
    has = np.array([is_tdvmcall_reason(r) for r in reasons], bool)[t["rid"]]
    classes, of_row = classify_rows(reasons, np.isin(t["task"], list(td)), t["rid"], np.where(has, t["mask"], 0))
    series = np.array([VERDICTS.index(c.verdict) if c.kind == "tdvmcall" else -1 for c in classes], int)[of_row]
    keep = series >= 0
    width = bucket_width(audit.shift)
    if not keep.any():
        return np.zeros(0, np.int64), np.zeros((0, len(VERDICTS)), np.int64), width
    bucket = t["bucket"][keep]
    lo, hi = int(bucket.min()), int(bucket.max())
    counts = np.zeros((hi - lo + 1, len(VERDICTS)), np.int64)
    np.add.at(counts, (bucket - lo, series[keep]), t["n"][keep])
    return np.arange(lo, hi + 1), counts, width


def plot(audit: Audit, td: set[int], path: str) -> None:
    """TDVMCALL exits of TDs over time, stacked by verdict (exits per second)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buckets, counts, width = by_time(audit, td)
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=100)
    if not len(buckets):
        ax.text(0.5, 0.5, "no TDVMCALL exits of a TD in the trace", ha="center", va="center", transform=ax.transAxes)
    else:
        x = (buckets - buckets[0]) * width
        series = [i for i, _ in enumerate(VERDICTS) if counts[:, i].any()]
        ax.stackplot(
            x,
            *[counts[:, i] / width for i in series],
            labels=[VERDICTS[i] for i in series],
            colors=[PLOT_COLOURS[VERDICTS[i]] for i in series],
            step="post",
        )
        ax.legend(loc="upper right", fontsize="small")
        ax.set_xlim(0, max(x[-1], width))
    ax.set_xlabel(f"seconds since the first exit (bins of {width:g} s)")
    ax.set_ylabel("TDVMCALL exits per second")
    ax.set_title("TDVMCALL exits of TDs by hardened-KVM verdict")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


__all__ = ["PLOT_COLOURS", "by_time", "plot"]

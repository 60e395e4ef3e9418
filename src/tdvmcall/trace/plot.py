"""``tdvmcall trace --plot``: TDVMCALL exits of TDs over time, stacked by verdict, from the audit's
time buckets (numpy and matplotlib; classification from ``verdict``, as in the report and
the Parquet file).

The audit keeps up to 512 time buckets (``rows.MAX_BUCKETS``) of 2**s / 1024 s; a person reads
tens of bars, not hundreds, so :func:`bins` merges adjacent buckets in powers of two until at most
:data:`MAX_BINS` bins cover the trace.  Each bin is one bar from its start to its end (every bin
drawn, the first and last included), in exits per second, with the bin width on the x axis.
"""

from __future__ import annotations

from dataclasses import dataclass

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
#: the most bars the plot draws (buckets merge in powers of two until the trace fits)
MAX_BINS = 64
#: what ``--plot`` can write, by file extension: matplotlib's formats but ``pgf`` (it needs LaTeX);
#: a name without extension is written as PNG
PLOT_FORMATS = (
    "png",
    "svg",
    "svgz",
    "pdf",
    "eps",
    "ps",
    "jpg",
    "jpeg",
    "tif",
    "tiff",
    "webp",
    "gif",
    "avif",
    "raw",
    "rgba",
)


def by_time(audit: Audit, td: set[int]) -> tuple[np.ndarray, np.ndarray, float]:
    """TDVMCALL exits of TDs per time bucket and verdict: the bucket numbers (every one from the
    first to the last), counts (buckets x :data:`VERDICTS`), and the bucket width in seconds."""
    t = audit.time_columns()
    reasons = audit.reasons.reasons
    has = np.array([is_tdvmcall_reason(r) for r in reasons], bool)[t["rid"]]
    td_rows = np.isin(t["task"], list(td))
    classes, of_row = classify_rows(reasons, td_rows, t["rid"], np.where(has, t["mask"], 0), audit.tree)
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


@dataclass
class Bins:
    """The plot's bins: the first starts at ``start`` (trace time, seconds), each ``width``
    seconds wide; ``counts`` is bins x :data:`VERDICTS`."""

    start: float
    width: float
    counts: np.ndarray


def bins(audit: Audit, td: set[int], max_bins: int = MAX_BINS) -> Bins:
    """The audit's buckets merged ``2**k`` at a time (aligned on multiples of ``2**k``), the least
    ``k`` that leaves at most ``max_bins`` bins from the first exit's to the last exit's."""
    buckets, counts, width = by_time(audit, td)
    if not len(buckets):
        return Bins(0.0, width, counts)
    merge = 1
    while buckets[-1] // merge - buckets[0] // merge + 1 > max_bins:
        merge *= 2
    first = int(buckets[0] // merge)
    out = np.zeros((int(buckets[-1] // merge) - first + 1, len(VERDICTS)), np.int64)
    np.add.at(out, buckets // merge - first, counts)
    return Bins(first * merge * width, merge * width, out)


def _duration(seconds: float) -> str:
    return f"{seconds:g} s" if seconds >= 1 else f"{seconds * 1000:.3g} ms"


def figure(b: Bins):
    """The plot of these bins as a matplotlib figure (no pyplot: no global state)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    n = b.counts.shape[0]
    if not n:
        ax.text(0.5, 0.5, "no TDVMCALL exits of a TD in the trace", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("seconds")
    else:
        left = np.arange(n) * b.width
        bottom = np.zeros(n)
        for i, verdict in enumerate(VERDICTS):
            if not b.counts[:, i].any():
                continue
            rate = b.counts[:, i] / b.width
            ax.bar(
                left,
                rate,
                width=b.width,
                bottom=bottom,
                align="edge",
                color=PLOT_COLOURS[verdict],
                label=verdict,
                linewidth=0,
            )
            bottom += rate
        span = n * b.width
        ax.set_xlim(-0.01 * span, 1.01 * span)  # the first bar clear of the axis, the last drawn whole
        ax.set_xlabel(f"seconds from t = {b.start:.6g} s (trace clock); bins of {_duration(b.width)}")
        fig.legend(loc="outside right upper", fontsize="small", title="hardened KVM")
    ax.set_ylabel("TDVMCALL exits per second")
    ax.set_title("TDVMCALL exits of TDs by hardened-KVM verdict")
    return fig


def plot(audit: Audit, td: set[int], path: str, fmt: str = "png") -> None:
    """Write the plot of the audit's TDVMCALL exits of TDs to ``path`` in format ``fmt``."""
    figure(bins(audit, td)).savefig(path, format=fmt)


__all__ = ["MAX_BINS", "PLOT_COLOURS", "PLOT_FORMATS", "Bins", "bins", "by_time", "figure", "plot"]

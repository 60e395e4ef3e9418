"""The reference parser of ``tdvmcall trace``, in plain Python: any line, every quirk (docs/abi.md §7).

``audit.parse_chunk`` (the compiled fast path) hands it the lines it is not sure about, and the
tests check that the two agree on every line both can read.  Same contract as ``parse_chunk``: it
returns a :class:`~tdvmcall.trace.rows.ChunkResult` of numpy columns keyed by task and reason ids.

It is written for clarity first (it is the oracle the fast path is tested against): one loop over
the lines in plain Python, one anchored regex per ``kvm_exit`` line, then numpy for the fields and
a sort-based grouping for the two aggregates (not the fast path's compiled ``group``: the oracle
shares no code with what it checks but the regexes of docs/abi.md §7).  It replaced a polars version
of the same contract (measured: docs/trace.md, "The reference parser").
"""

from __future__ import annotations

import math
import re

import numpy as np

from .io import Chunk
from .rows import (
    LOOKS_LIKE_EXIT,
    MARKER,
    PAYLOAD_RX,
    ChunkResult,
    Columns,
    Counts,
    ReasonTable,
    TaskTable,
    bucket_width,
    span_shift,
    union_span,
)


def _captured(rx: str) -> re.Pattern[str]:
    """:data:`~tdvmcall.trace.rows.PAYLOAD_RX` with its vCPU, reason text and info1 captured: the
    same pattern (groups only mark where the fields are)."""
    for field, group in (
        ("vcpu [0-9]{1,9} ", "vcpu ([0-9]{1,9}) "),
        (
            " reason [!-~]+(?: (?:FAILED_VMENTRY|0x[0-9a-f]+))* ",
            " reason ([!-~]+(?: (?:FAILED_VMENTRY|0x[0-9a-f]+))*) ",
        ),
        (" info1 0x[0-9a-f]{16} ", " info1 0x([0-9a-f]{16}) "),
    ):
        if rx.count(field) != 1:
            raise ValueError(f"PAYLOAD_RX changed: {field!r} is not in it once")
        rx = rx.replace(field, group)
    return re.compile(rx)


#: the payload, validated and its fields captured: vCPU, reason text, info1
_PAYLOAD = _captured(PAYLOAD_RX)
#: a timestamp: seconds with an optional fraction, or a counter clock's integer
_TS = re.compile(r"[0-9]+(?:\.[0-9]+)?")
#: header lines (and blank ones) that are not kvm_exit lines
_HEADERS = ("#", "cpus=", "version = ")


def lines_of(data: bytes | bytearray) -> list[str]:
    """The lines of a chunk: split at ``\\n``, one trailing ``\\r`` dropped (CRLF), invalid UTF-8
    replaced (U+FFFD per maximal invalid sequence), a NUL byte read as U+FFFD too; a final
    newline ends the last line, it does not start an empty one."""
    text = bytes(data).decode("utf-8", "replace")
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    lines = text.split("\n")
    if text.endswith("\n") or not text:
        lines.pop()
    return [s[:-1] if s.endswith("\r") else s for s in lines]


def parse_chunk_reference(
    chunk: Chunk,
    fmt: str,
    source: str,
    tasks: TaskTable,
    reasons: ReasonTable,
    shift: int = 0,
    span: tuple[float, float] | None = None,
    keep_bad: int = 5,
    rows: bool = False,
) -> ChunkResult:
    """The reference parser: same contract as ``audit.parse_chunk``, on any line.

    1. Each line is a header/blank line, another event, or looks like ``kvm_exit`` (contains
       ``kvm_exit:``).  A kvm_exit line parses when it splits at the format's marker into a prefix
       ending in ``<secs>[.<frac>]:`` (a finite float) and a payload matching
       :data:`~tdvmcall.trace.rows.PAYLOAD_RX` (spaces around the marker ignored).
    2. Each distinct prefix is looked up once (task and CPU; a prefix of the wrong shape makes its
       lines unparsed), each distinct reason text once (id, TDVMCALL reason or not).
    3. The time span of every line that parsed widens the buckets (``span_shift``); then the
       aggregates by (task, vCPU, reason, mask) and (task, reason, mask, time bucket), the mask
       being info1 for a TDVMCALL reason and 0 otherwise."""
    marker = MARKER[fmt]
    counts = Counts(truncated_last_line=chunk.truncated)
    bad: list[tuple[int, str]] = []
    # 1. the lines; per parsed line: its number, timestamp, vCPU, info1, prefix and reason texts
    parsed: list[tuple[int, float, str, str, str, str]] = []
    lines = lines_of(chunk.data)
    counts.lines = len(lines)
    match, stamp_ok, isfinite = _PAYLOAD.match, _TS.fullmatch, math.isfinite
    for n, line in enumerate(lines, 1):
        if LOOKS_LIKE_EXIT not in line:
            if not line or line.startswith(_HEADERS):
                counts.comments += 1
            continue
        counts.kvm_exit_lines += 1
        head, found, payload = line.partition(marker)
        head = head.rstrip(" ")
        m = match(payload.lstrip(" ")) if found and head.endswith(":") else None
        if m is not None:
            prefix = head[:-1].rstrip("0123456789.")
            stamp = head[len(prefix) : -1]
            if stamp_ok(stamp) and isfinite(ts := float(stamp)):  # 309+ digits: not a time
                parsed.append((n, ts, prefix, *m.groups()))
                continue
        if len(bad) < keep_bad:
            bad.append((n, line))
    counts.other_events = counts.lines - counts.kvm_exit_lines - counts.comments

    # 2. the distinct prefixes -> (task, CPU) and reasons -> (id, TDVMCALL reason or not)
    nums, stamps, prefixes, vcpus, reason_texts, info1s = zip(*parsed) if parsed else ((),) * 6
    prefix_of, prefix_id = _intern(prefixes)
    reason_of, reason_id = _intern(reason_texts)
    looked = [tasks.lookup(source, fmt, p) for p in prefix_of]
    rids = reasons.ids(reason_of)
    line = np.array(nums, np.uint64)
    ts = np.array(stamps, np.float64)
    if len(ts):
        shift = span_shift(union_span(span, (float(ts.min()), float(ts.max()))), shift)
    task_of = np.array([t[0] if t else -1 for t in looked], np.int64)[prefix_id]
    good = task_of >= 0
    counts.parsed = int(good.sum())
    bad_prefix = [(int(n), lines[int(n) - 1]) for n in line[~good][:keep_bad]]
    counts.bad = sorted(bad + bad_prefix)[:keep_bad]

    # 3. fields of the lines that parsed with a good prefix; the two aggregates; the rows
    task = task_of[good].astype(np.uint32)
    cpu = np.array([t[1] if t else 0 for t in looked], np.uint32)[prefix_id][good]
    vcpu = np.array([int(x) for x in vcpus], np.uint32)[good]
    info1 = np.array([int(x, 16) for x in info1s], np.uint64)[good]
    rid = rids[reason_id][good]
    mask = np.where(reasons.tdvmcall(rids)[reason_id][good], info1, np.uint64(0))
    ts, line = ts[good], line[good]
    bucket = np.floor(ts / bucket_width(shift)).astype(np.int64)  # as rows.bucket_of
    by_key = _group({"task": task, "vcpu": vcpu, "rid": rid, "mask": mask}, ts)
    by_time = _group({"task": task, "rid": rid, "mask": mask, "bucket": bucket})
    result = ChunkResult(counts, by_key, by_time, shift)
    if rows:
        result.rows = {"line": line, "ts": ts, "task": task, "cpu": cpu, "vcpu": vcpu, "rid": rid, "info1": info1}
    return result


def _intern(values: tuple[str, ...]) -> tuple[list[str], np.ndarray]:
    """The distinct values in the order first met, and the index of each value among them."""
    ids: dict[str, int] = {}
    index = [ids.setdefault(v, len(ids)) for v in values]
    return list(ids), np.array(index, np.int64)


def _group(keys: Columns, ts: np.ndarray | None = None) -> Columns:
    """The rows grouped by equal ``keys`` (numpy: a stable sort on the keys, runs of equal keys):
    the keys, ``n`` the rows of each group and, given ``ts``, ``first`` and ``last`` its least and
    greatest."""
    cols = list(keys.values())
    order = np.lexsort(cols[::-1])
    start = np.ones(len(order), bool)
    for c in cols:
        s = c[order]
        start[1:] &= s[1:] == s[:-1]
    start = ~start
    start[:1] = True
    at = np.flatnonzero(start)
    out = {name: c[order][at] for name, c in keys.items()}
    out["n"] = np.diff(np.append(at, len(order))).astype(np.int64)
    if ts is not None:
        t = ts[order]
        out["first"] = np.minimum.reduceat(t, at) if len(at) else np.zeros(0)
        out["last"] = np.maximum.reduceat(t, at) if len(at) else np.zeros(0)
    return out


__all__ = ["lines_of", "parse_chunk_reference"]

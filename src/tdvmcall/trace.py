"""Audit real hosts' ``kvm:kvm_exit`` traces: which TD exits would hardened KVM refuse.

Facts used (ABI.md §4, §7): the ``kvm_exit`` tracepoint prints ``vcpu %u reason %s%s%s rip 0x%lx
info1 0x%016llx info2 0x%016llx intr_info 0x%08x error_code 0x%08x``; parsers tolerate trailing
text (a 2023 patch appending `` requests 0x%016llx`` was not merged, some trees carry it).  The
reason is the name from VMX_EXIT_REASONS followed by `` FAILED_VMENTRY`` or a raw hex flag when
flag bits are set; for a TD it is the reason KVM synthesises for the TDVMCALL (what that says,
and the verdicts: ``trace_verdict.py``).

The line formats (§7): ftrace ``<comm>-<pid> [<cpu>] <flags> <secs.usecs>: kvm_exit: <payload>``
(optionally ``(<tgid>)`` after the pid), ``trace-cmd report`` the same with the flags column
optional and the event name padded, ``perf script`` ``<comm> <pid>[/<tid>] [<cpu>] <secs.usecs>:
kvm:kvm_exit: <payload>``.

Technique (chosen by measurement, see ``docs/trace.md``): each newline-aligned chunk is scanned
once by a compiled kernel (``trace_kernels.py``, numba, without the GIL: two chunks at a time) that
parses the kvm_exit lines of the usual shape into arrays and interns their task prefixes and
reason texts, which are then parsed once each in Python; a second kernel aggregates, into numpy
columns keyed by task and reason ids.  The lines the kernel is not sure about go to the reference
parser (``trace_polars.parse_chunk_polars``: polars splits the lines, one anchored regex without
captures validates the payload, fields by ``find`` and slicing).  Only aggregates are kept;
``trace_report`` turns them into the report (plain Python: they are few rows); ``trace_parquet``
writes the rows (pyarrow) and ``trace_plot`` the plot (matplotlib).  This module does not import
polars: a run whose lines all take the fast path never loads it.
"""

from __future__ import annotations

import itertools
import re
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache

import numpy as np

from .codes import VMX_EXIT_REASON_NAMES
from . import trace_scan
from .traceio import Chunk, Source, TraceInputError, chunks

FORMATS = ("ftrace", "trace-cmd", "perf")

# ---------------------------------------------------------------------------------------------
# line formats
# ---------------------------------------------------------------------------------------------

#: the event name before the payload, per format (after the timestamp's colon and one or more
#: spaces: perf right-aligns event names when several events were recorded)
MARKER = {"ftrace": " kvm_exit:", "trace-cmd": " kvm_exit:", "perf": " kvm:kvm_exit:"}
#: a line "looks like kvm_exit" when it contains this
LOOKS_LIKE_EXIT = "kvm_exit:"

#: the payload, anchored, without captures (validation only; fields are then sliced out); ASCII
#: classes, not \S and \d, keep the regex engine's automaton small (measured 25% faster)
#: (a vCPU index of 10 digits or more is not a vCPU: unparsed, and it would not fit UInt32)
PAYLOAD_RX = (r"^vcpu [0-9]{1,9} reason [!-~]+(?: (?:FAILED_VMENTRY|0x[0-9a-f]+))* rip 0x[0-9a-f]+ "
              r"info1 0x[0-9a-f]{16} info2 0x[0-9a-f]{16} intr_info 0x[0-9a-f]{8} error_code 0x[0-9a-f]{8}")

#: the line start up to the timestamp (the "prefix"); ftrace and trace-cmd share one shape
_DASH_PREFIX = re.compile(r"^\s*(?P<comm>.*?)-(?P<pid>\d+)\s+(?:\(\s*(?P<tgid>\d+|-+)\)\s+)?"
                          r"\[(?P<cpu>\d+)\]\s+(?:[^\s\[\]]{1,8}\s+)?$")
_PERF_PREFIX = re.compile(r"^\s*(?P<comm>.*?)\s+(?:(?P<tgid>\d+)/)?(?P<pid>\d+)\s+\[(?P<cpu>\d+)\]\s+$")
PREFIX_RX = {"ftrace": _DASH_PREFIX, "trace-cmd": _DASH_PREFIX, "perf": _PERF_PREFIX}

# detection: one event line of each shape (any event, not only kvm_exit)
_PERF_EVENT = re.compile(r"^\s*\S.*?\s+(?:\d+/)?\d+\s+\[\d+\]\s+\d+(?:\.\d+)?:\s+[\w-]+:[\w-]+:")
_DASH_EVENT_FLAGS = re.compile(r"^\s*.*?-\d+\s+(?:\([\s\d-]+\)\s+)?\[\d+\]\s+[^\s\[\]]{1,8}\s+\d+(?:\.\d+)?:\s+\w+:")
_DASH_EVENT = re.compile(r"^\s*.*?-\d+\s+(?:\([\s\d-]+\)\s+)?\[\d+\]\s+\d+(?:\.\d+)?:\s+\w+:")


def detect_format(sample: str) -> str | None:
    """The format of a trace from its first lines: ftrace's ``# tracer:`` header or an event line
    with a flags column; trace-cmd's ``cpus=``/``version =`` header or an event line without
    flags; perf's ``system:event:`` name.  ``None`` if no line has any of these shapes."""
    for line in sample.splitlines()[:2000]:
        s = line.strip()
        if s.startswith("# tracer:"):
            return "ftrace"
        if s.startswith(("cpus=", "version =")):
            return "trace-cmd"
        if _PERF_EVENT.match(line):
            return "perf"
        if _DASH_EVENT_FLAGS.match(line):
            return "ftrace"
        if _DASH_EVENT.match(line):
            return "trace-cmd"
    return None


@dataclass(frozen=True)
class Task:
    """A traced task: ``pid`` is the id the trace prints (a thread id in ftrace and perf's default
    output), ``tgid`` the process id when the trace shows it (ftrace ``record-tgid``, perf
    ``pid/tid``).  ``source`` is the input it was read from: ids of different inputs never merge."""

    source: str
    comm: str
    pid: int
    tgid: int | None

    @property
    def process(self) -> int:
        return self.tgid if self.tgid is not None else self.pid

    @property
    def label(self) -> str:
        return f"{self.comm}-{self.pid}"


def parse_prefix(fmt: str, prefix: str) -> tuple[str, int, int | None, int] | None:
    """``(comm, pid, tgid, cpu)`` of a line prefix, or ``None`` if it has the wrong shape."""
    m = PREFIX_RX[fmt].match(prefix)
    if m is None:
        return None
    tgid = m["tgid"]
    return m["comm"], int(m["pid"]), int(tgid) if tgid and tgid[0] != "-" else None, int(m["cpu"])


@dataclass(frozen=True)
class Reason:
    """The reason text of a kvm_exit line: name, VMX number when known, and flags."""

    text: str
    name: str
    number: int | None
    flags: str
    failed_vmentry: bool


_REASON_NUMBERS = {name: nr for nr, name in VMX_EXIT_REASON_NAMES.items()}


@cache
def parse_reason(text: str) -> Reason:
    name, _, flags = text.partition(" ")
    if name.startswith("0x"):  # a reason the kernel has no name for is printed in hex
        try:
            number: int | None = int(name, 16)
        except ValueError:  # not hex after all: an unknown name
            number = None
        name = VMX_EXIT_REASON_NAMES.get(number, name)  # type: ignore[arg-type]
    else:
        number = _REASON_NUMBERS.get(name)
    return Reason(text, name, number, flags, "FAILED_VMENTRY" in flags.split())


def is_tdvmcall_reason(r: Reason) -> bool:
    """A TD exit with this reason is a TDVMCALL (ABI §4: the reasons KVM synthesises)."""
    return r.number in VMX_EXIT_REASON_NAMES and not r.failed_vmentry


# ---------------------------------------------------------------------------------------------
# line counts and the id tables
# ---------------------------------------------------------------------------------------------


@dataclass
class Counts:
    """Line counts of one input (``bad`` holds the first few unparseable kvm_exit lines)."""

    lines: int = 0
    comments: int = 0  # blank and header lines: ftrace's ``#`` comments, trace-cmd's ``cpus=``, ``version = ``
    other_events: int = 0  # every other line that is not kvm_exit
    kvm_exit_lines: int = 0  # lines that look like kvm_exit
    parsed: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)
    truncated_last_line: bool = False

    @property
    def unparsed(self) -> int:
        return self.kvm_exit_lines - self.parsed

    def add(self, other: Counts, keep_bad: int) -> None:
        self.lines += other.lines
        self.comments += other.comments
        self.other_events += other.other_events
        self.kvm_exit_lines += other.kvm_exit_lines
        self.parsed += other.parsed
        self.bad.extend(other.bad[: max(0, keep_bad - len(self.bad))])
        self.truncated_last_line |= other.truncated_last_line


class TaskTable:
    """Task ids, shared by the parsing threads: prefixes and tasks are registered once."""

    def __init__(self) -> None:
        self.tasks: list[Task] = []
        self._ids: dict[Task, int] = {}
        self._prefix: dict[tuple[str, str, str], tuple[int, int] | None] = {}
        self._lock = threading.Lock()

    def lookup(self, source: str, fmt: str, prefix: str) -> tuple[int, int] | None:
        """``(task id, cpu)`` of a line prefix, or ``None`` if it does not parse."""
        key = (source, fmt, prefix)
        hit = self._prefix.get(key, False)
        if hit is not False:
            return hit  # type: ignore[return-value]
        parsed = parse_prefix(fmt, prefix)
        with self._lock:
            if parsed is None:
                out = None
            else:
                comm, pid, tgid, cpu = parsed
                task = Task(source, comm, pid, tgid)
                if task not in self._ids:
                    self._ids[task] = len(self.tasks)
                    self.tasks.append(task)
                out = (self._ids[task], cpu)
            self._prefix[key] = out
        return out


class ReasonTable:
    """Reason texts seen so far, parsed once each, by id (shared by the parsing threads): the
    aggregates carry the id, the report its text."""

    def __init__(self) -> None:
        self.reasons: list[Reason] = []
        self._ids: dict[str, int] = {}
        self._lock = threading.Lock()

    def ids(self, texts: Iterable[str]) -> np.ndarray:
        """The ids of these reason texts (uint32), registering the new ones."""
        out = []
        for t in texts:
            rid = self._ids.get(t)
            if rid is None:
                with self._lock:
                    rid = self._ids.get(t)
                    if rid is None:  # the reason first, then its id: a reader never sees an id too soon
                        self.reasons.append(parse_reason(t))
                        rid = self._ids[t] = len(self.reasons) - 1
            out.append(rid)
        return np.array(out, np.uint32)

    def tdvmcall(self, ids: np.ndarray) -> np.ndarray:
        """Per id: is it a reason KVM synthesises for a TDVMCALL (the exit's info1 is a mask)?"""
        return np.array([is_tdvmcall_reason(self.reasons[i]) for i in ids.tolist()], bool)


# ---------------------------------------------------------------------------------------------
# aggregates: columns of numpy arrays
# ---------------------------------------------------------------------------------------------

#: the key of :attr:`ChunkResult.by_key` and of :attr:`ChunkResult.by_time`; ``rid`` is a
#: :class:`ReasonTable` id, ``mask`` is info1 for a TDVMCALL reason, else 0 (null in the report)
KEY = ("task", "vcpu", "rid", "mask")
TIME_KEY = ("task", "rid", "mask", "bucket")
#: the columns of :attr:`ChunkResult.rows` (one per parsed exit, for Parquet)
ROW_COLUMNS = ("line", "ts", "task", "cpu", "vcpu", "rid", "info1")
Columns = dict[str, np.ndarray]


def aggregate(cols: Columns, key: tuple[str, ...]) -> Columns:
    """Merge the rows of ``cols`` with equal ``key``: ``n`` summed, ``first`` the least and
    ``last`` the greatest (when present); one compiled pass (``trace_kernels.group``)."""
    lo = cols.get("first", np.zeros(len(cols["n"])))
    hi = cols.get("last", lo)
    keys = np.column_stack([cols[c].astype(np.int64) for c in key])
    row, n, least, greatest, _ = trace_scan.kernels().group(keys, cols["n"], lo, hi)
    out = {c: cols[c][row] for c in key}
    out["n"] = n
    if "first" in cols:
        out["first"], out["last"] = least, greatest
    return out


def concat(parts: list[Columns]) -> Columns:
    return {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}


def empty_key() -> Columns:
    return {"task": np.zeros(0, np.uint32), "vcpu": np.zeros(0, np.uint32), "rid": np.zeros(0, np.uint32),
            "mask": np.zeros(0, np.uint64), "n": np.zeros(0, np.int64), "first": np.zeros(0), "last": np.zeros(0)}


def empty_time() -> Columns:
    return {"task": np.zeros(0, np.uint32), "rid": np.zeros(0, np.uint32), "mask": np.zeros(0, np.uint64),
            "bucket": np.zeros(0, np.int64), "n": np.zeros(0, np.int64)}


@dataclass
class ChunkResult:
    """What one chunk contributes: its line counts and its parsed exits, aggregated by :data:`KEY`
    (with ``n``, ``first``, ``last``: count and time range) and by :data:`TIME_KEY` (time bucket at
    ``shift``, with ``n``); the rows themselves (:data:`ROW_COLUMNS`) only when asked."""

    counts: Counts
    by_key: Columns
    by_time: Columns
    shift: int
    rows: Columns | None = None

    def renumber(self, before: int) -> None:
        """Make line numbers absolute, given the number of lines before the chunk."""
        self.counts.bad = [(n + before, t) for n, t in self.counts.bad]
        if self.rows is not None:
            self.rows["line"] = self.rows["line"] + before


#: width of the finest time bucket (seconds), and the most buckets kept (then they double)
BUCKET_BASE = 1 / 1024
MAX_BUCKETS = 512


def bucket_width(shift: int) -> float:
    """The width of a time bucket at this shift, in the trace's seconds."""
    return BUCKET_BASE * (1 << shift)


def bucket_of(ts: np.ndarray, shift: int) -> np.ndarray:
    """The time bucket of each timestamp at this shift."""
    return np.floor(ts / bucket_width(shift)).astype(np.int64)


def coarser(bucket: np.ndarray, by: int) -> np.ndarray:
    """Bucket numbers ``by`` shifts coarser (buckets are non-negative: a right shift is the floor
    of the division; numbers are below 2**52, so 63 and more give 0, and never overflow)."""
    return bucket >> min(by, 63)


def span_shift(span: tuple[float, float], shift: int = 0) -> int:
    """The smallest shift (at least ``shift``) at which ``span`` fits :data:`MAX_BUCKETS` buckets
    and every bucket number is below 2**52 (exact in float64 and int64: a counter clock's
    timestamps, ``x86-tsc`` say, reach 10**16 and more)."""
    while ((span[1] - span[0]) / bucket_width(shift) >= MAX_BUCKETS - 1
           or max(abs(span[0]), abs(span[1])) / bucket_width(shift) >= 1 << 52):
        shift += 1
    return shift


def union_span(a: tuple[float, float] | None, b: tuple[float, float]) -> tuple[float, float]:
    """The smallest time span holding both (``a`` may be None: nothing yet)."""
    return b if a is None else (min(a[0], b[0]), max(a[1], b[1]))


# ---------------------------------------------------------------------------------------------
# parsing one chunk
# ---------------------------------------------------------------------------------------------


def parse_chunk(chunk: Chunk, fmt: str, source: str, tasks: TaskTable, reasons: ReasonTable, shift: int = 0,
                span: tuple[float, float] | None = None, keep_bad: int = 5, rows: bool = False) -> ChunkResult:
    """Count the lines of a chunk and parse and aggregate its kvm_exit lines.  Line numbers count
    from 1 at the chunk's first line (:meth:`ChunkResult.renumber` makes them absolute).

    :mod:`.trace_scan` scans the bytes once (compiled, without the GIL) and parses the kvm_exit
    lines of the usual shape into arrays; the lines it is not sure about go to the reference
    parser (``trace_polars.parse_chunk_polars``), and the two results are merged.  The task
    prefixes and reason texts are parsed once per distinct value, here as there; a prefix that
    does not parse makes its lines unparsed.  Time buckets are at least as wide as ``shift`` says,
    and wide enough for the time ``span`` seen so far, with this chunk's, to fit :data:`MAX_BUCKETS`."""
    sc = trace_scan.Scanned(chunk.data, fmt == "perf")

    # the distinct prefixes -> (task, cpu); the distinct reasons -> ids, TDVMCALL or not
    looked = [tasks.lookup(source, fmt, p.decode("ascii")) for p in sc.prefixes]
    ptask = np.array([t[0] if t else -1 for t in looked], np.int64)[sc.task]
    rids = reasons.ids(r.decode("ascii") for r in sc.reasons)
    good = ptask >= 0
    task, vcpu, ts, info1 = ptask[good].astype(np.uint32), sc.vcpu[good], sc.ts[good], sc.info1[good]
    rid = rids[sc.reason[good]]
    mask = np.where(reasons.tdvmcall(rids)[sc.reason[good]], info1, np.uint64(0))
    bad_lines = [(int(n), _line_text(chunk.data, int(s))) for n, s in
                 zip(sc.line_of[~good][:keep_bad], sc.start_of[~good][:keep_bad])]
    if len(sc.ts):  # the span of every well-formed line, as the reference parser does
        span = union_span(span, (float(sc.ts.min()), float(sc.ts.max())))
        shift = span_shift(span, shift)

    # the slow lines, through the reference parser (its line numbers mapped back)
    slow = None
    if len(sc.slow):
        from .trace_polars import parse_chunk_polars  # polars: only when a line needs it

        data = b"\n".join(chunk.data[s:e] for _, s, e in sc.slow.tolist()) + b"\n"
        slow = parse_chunk_polars(Chunk(data), fmt, source, tasks, reasons, shift, span, keep_bad, rows)
        shift = slow.shift
        line_map = sc.slow[:, 0].astype(np.uint64)
        bad_lines += [(int(line_map[n - 1]), t) for n, t in slow.counts.bad]

    # one pass over the exits, by key and time bucket; both aggregates from its (few) groups
    fine = aggregate({"task": task, "vcpu": vcpu, "rid": rid, "mask": mask, "bucket": bucket_of(ts, shift),
                      "n": np.ones(len(ts), np.int64), "first": ts, "last": ts}, KEY + ("bucket",))
    by_key = aggregate({c: v for c, v in fine.items() if c != "bucket"}, KEY)
    by_time = aggregate({c: fine[c] for c in TIME_KEY + ("n",)}, TIME_KEY)
    row_cols = None
    if rows:
        row_cols = {"line": sc.line_of[good].astype(np.uint64), "ts": ts, "task": task,
                    "cpu": np.array([t[1] if t else 0 for t in looked], np.uint32)[sc.task][good], "vcpu": vcpu,
                    "rid": rid, "info1": info1}

    counts = Counts(lines=sc.lines, comments=sc.headers, other_events=sc.others, kvm_exit_lines=len(sc.ts),
                    parsed=len(ts), truncated_last_line=chunk.truncated)
    if slow is not None:
        counts.comments += slow.counts.comments
        counts.other_events += slow.counts.other_events
        counts.kvm_exit_lines += slow.counts.kvm_exit_lines
        counts.parsed += slow.counts.parsed
        by_key = aggregate(concat([by_key, slow.by_key]), KEY)
        by_time = aggregate(concat([by_time, slow.by_time]), TIME_KEY)
        if rows:
            assert slow.rows is not None and row_cols is not None
            both = concat([row_cols, dict(slow.rows, line=line_map[slow.rows["line"].astype(np.int64) - 1])])
            order = np.argsort(both["line"], kind="stable")
            row_cols = {c: v[order] for c, v in both.items()}
    counts.bad = sorted(bad_lines)[:keep_bad]
    return ChunkResult(counts, by_key, by_time, shift, row_cols)


def _line_text(data: bytes, start: int) -> str:
    """The line of ``data`` that starts at ``start``, as the reference parser shows it."""
    end = data.find(b"\n", start)
    text = bytes(data[start:end if end >= 0 else len(data)])
    return text[:-1].decode("utf-8", "replace") if text.endswith(b"\r") else text.decode("utf-8", "replace")


# ---------------------------------------------------------------------------------------------
# the audit: aggregates over every input
# ---------------------------------------------------------------------------------------------

@dataclass
class InputReport:
    name: str
    format: str
    compression: str
    bytes: int
    counts: Counts


class Audit:
    """Aggregates of every parsed exit, by (task, vCPU, reason, mask) and by time bucket, as
    columns of numpy arrays (``trace_report`` turns them into the report)."""

    def __init__(self, td_pids: set[int] | None = None, parquet: str | None = None, keep_bad: int = 5):
        self.td_pids = td_pids
        self.tasks = TaskTable()
        self.reasons = ReasonTable()
        self.inputs: list[InputReport] = []
        self.keep_bad = keep_bad
        self._by_key: list[Columns] = []
        self._by_time: list[Columns] = []
        self._shift = 0  # bucket width = BUCKET_BASE * 2**shift; only grows
        self._span: tuple[float, float] | None = None
        self.parquet = None
        if parquet:
            from .trace_parquet import ParquetSink  # pyarrow: only when writing Parquet

            self.parquet = ParquetSink(parquet, self)

    # -- feeding --------------------------------------------------------------------------
    def add(self, result: ChunkResult, source: str) -> None:
        """Fold one chunk's aggregates in."""
        key = result.by_key
        if not len(key["n"]):
            return
        self._by_key.append(key)
        self._widen(float(key["first"].min()), float(key["last"].max()), result.shift)
        self._by_time.append(dict(result.by_time, bucket=coarser(result.by_time["bucket"], self._shift - result.shift)))
        if self.parquet is not None and result.rows is not None:
            self.parquet.write(result.rows, source)
        if len(self._by_key) >= 32:
            self._compact()

    def _widen(self, lo: float, hi: float, at_least: int) -> None:
        """Widen the time buckets (doubling) so that the span seen fits :data:`MAX_BUCKETS` and is
        at least as wide as a chunk's."""
        self._span = union_span(self._span, (lo, hi))
        shift = span_shift(self._span, max(self._shift, at_least))
        if shift != self._shift:
            self._by_time = [dict(t, bucket=coarser(t["bucket"], shift - self._shift)) for t in self._by_time]
            self._shift = shift

    def _compact(self) -> None:
        self._by_key = [aggregate(concat(self._by_key), KEY)]
        self._by_time = [aggregate(concat(self._by_time), TIME_KEY)]

    @property
    def shift(self) -> int:
        return self._shift

    @property
    def span(self) -> tuple[float, float] | None:
        return self._span

    def key_columns(self) -> Columns:
        """Every parsed exit so far, aggregated by :data:`KEY`."""
        if not self._by_key:
            return empty_key()
        self._compact()
        return self._by_key[0]

    def time_columns(self) -> Columns:
        """Every parsed exit so far, aggregated by :data:`TIME_KEY` at :attr:`shift`."""
        if not self._by_time:
            return empty_time()
        self._compact()
        return self._by_time[0]


# ---------------------------------------------------------------------------------------------
# reading inputs
# ---------------------------------------------------------------------------------------------

Progress = Callable[[int, int], None]  # (bytes of the input read so far, lines so far)


def audit_input(audit: Audit, path: str, fmt: str = "auto", progress: Progress | None = None,
                threads: int = 2) -> InputReport:
    """Read one input into the audit; raises :class:`TraceInputError` for bad input."""
    with Source(path) as src:
        it = chunks(src)
        first = next(it)
        if fmt == "auto":
            sample = first.data[:1 << 20].decode("utf-8", "replace")
            found = detect_format(sample)
            if found is None:
                if any(s.strip() and not s.lstrip().startswith("#") for s in sample.splitlines()):
                    raise TraceInputError(f"{src.name}: not trace text: no line has the shape of an ftrace, "
                                          "trace-cmd report or perf script event (use --format to force one)")
                found = "ftrace"  # only a header: an empty ftrace capture
            fmt = found
            del sample
        report = InputReport(src.name, fmt, src.compression, 0, Counts())
        pending: deque[Future] = deque()

        def drain(limit: int) -> None:
            while len(pending) > limit:
                result = pending.popleft().result()
                result.renumber(report.counts.lines)
                report.counts.add(result.counts, audit.keep_bad)
                audit.add(result, src.name)
                if progress:
                    progress(src.position(), report.counts.lines)

        with ThreadPoolExecutor(max_workers=threads) as pool:
            stream = itertools.chain([first], it)
            del first  # the chain alone holds it, until it is parsed
            for chunk in stream:
                report.bytes += len(chunk.data)
                pending.append(pool.submit(parse_chunk, chunk, fmt, src.name, audit.tasks, audit.reasons, audit.shift,
                                           audit.span, audit.keep_bad, audit.parquet is not None))
                drain(threads)
            drain(0)
    audit.inputs.append(report)
    return report


__all__ = ["Audit", "ChunkResult", "Counts", "Reason", "ReasonTable", "TaskTable", "TraceInputError", "aggregate",
           "audit_input", "detect_format", "is_tdvmcall_reason", "parse_chunk", "parse_reason", "FORMATS"]

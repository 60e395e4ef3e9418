"""The bottom of the trace wing: the line formats, the task and reason tables, the line counts and the
aggregate columns that the parsers fill and the report, Parquet and the plot read.

Facts used (docs/abi.md §4, §7): the ``kvm_exit`` tracepoint prints ``vcpu %u reason %s%s%s rip 0x%lx
info1 0x%016llx info2 0x%016llx intr_info 0x%08x error_code 0x%08x``; parsers tolerate trailing
text.  The reason is the name from VMX_EXIT_REASONS followed by `` FAILED_VMENTRY`` or a raw hex
flag when flag bits are set.  The line formats: ftrace ``<comm>-<pid> [<cpu>] <flags>
<secs.usecs>: kvm_exit: <payload>`` (optionally ``(<tgid>)`` after the pid), ``trace-cmd report``
the same with the flags column optional and the event name padded, ``perf script`` ``<comm>
<pid>[/<tid>] [<cpu>] <secs.usecs>: kvm:kvm_exit: <payload>``.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache

import numpy as np

from ..abi.codes import EXIT_REASON_BUS_LOCK_DETECTED, VMX_EXIT_REASON_NAMES
from . import scan as trace_scan

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
PAYLOAD_RX = (
    r"^vcpu [0-9]{1,9} reason [!-~]+(?: (?:FAILED_VMENTRY|0x[0-9a-f]+))* rip 0x[0-9a-f]+ "
    r"info1 0x[0-9a-f]{16} info2 0x[0-9a-f]{16} intr_info 0x[0-9a-f]{8} error_code 0x[0-9a-f]{8}"
)

#: the line start up to the timestamp (the "prefix"); ftrace and trace-cmd share one shape
_DASH_PREFIX = re.compile(
    r"^\s*(?P<comm>.*?)-(?P<pid>\d+)\s+(?:\(\s*(?P<tgid>\d+|-+)\)\s+)?"
    r"\[(?P<cpu>\d+)\]\s+(?:[^\s\[\]]{1,8}\s+)?$"
)
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
    bus_lock: bool = False  # bit 26 among the flags: the module detected a bus lock (TDCALL 0x4000000)


_REASON_NUMBERS = {name: nr for nr, name in VMX_EXIT_REASON_NAMES.items()}


def _flag_bits(flags: str) -> int:
    """The raw flag bits of a reason's flags: ``kvm_print_exit_reason`` prints the bits above 15 that
    ``VMX_EXIT_REASON_FLAGS`` does not name (all but FAILED_VMENTRY) as one hex number."""
    bits = 0
    for token in flags.split():
        if re.fullmatch(r"0x[0-9a-fA-F]+", token):
            bits |= int(token, 16)
    return bits


@cache
def parse_reason(text: str) -> Reason:
    """A kvm_exit reason: its name (or hex number), its VMX number, its flags: ``FAILED_VMENTRY``, and
    bit 26 (``0x4000000``: a bus lock detected, which the TDX module sets on the exit after one;
    printed ``TDCALL 0x4000000`` where KVM does not re-label a flagged TDVMCALL, ``CPUID 0x4000000``
    where it does: ``kvm/trees.py``)."""
    name, _, flags = text.partition(" ")
    if name.startswith("0x"):  # a reason the kernel has no name for is printed in hex
        try:
            number: int | None = int(name, 16)
        except ValueError:  # not hex after all: an unknown name
            number = None
        name = VMX_EXIT_REASON_NAMES.get(number, name)  # type: ignore[arg-type]
    else:
        number = _REASON_NUMBERS.get(name)
    bus_lock = bool(_flag_bits(flags) & EXIT_REASON_BUS_LOCK_DETECTED)
    return Reason(text, name, number, flags, "FAILED_VMENTRY" in flags.split(), bus_lock)


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
    ``last`` the greatest (when present); one compiled pass (``scan.group``)."""
    lo = cols.get("first", np.zeros(len(cols["n"])))
    hi = cols.get("last", lo)
    keys = np.column_stack([cols[c].astype(np.int64) for c in key])
    row, n, least, greatest, _ = trace_scan.group(keys, cols["n"], lo, hi)
    out = {c: cols[c][row] for c in key}
    out["n"] = n
    if "first" in cols:
        out["first"], out["last"] = least, greatest
    return out


def concat(parts: list[Columns]) -> Columns:
    return {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}


def empty_key() -> Columns:
    return {
        "task": np.zeros(0, np.uint32),
        "vcpu": np.zeros(0, np.uint32),
        "rid": np.zeros(0, np.uint32),
        "mask": np.zeros(0, np.uint64),
        "n": np.zeros(0, np.int64),
        "first": np.zeros(0),
        "last": np.zeros(0),
    }


def empty_time() -> Columns:
    return {
        "task": np.zeros(0, np.uint32),
        "rid": np.zeros(0, np.uint32),
        "mask": np.zeros(0, np.uint64),
        "bucket": np.zeros(0, np.int64),
        "n": np.zeros(0, np.int64),
    }


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
    while (span[1] - span[0]) / bucket_width(shift) >= MAX_BUCKETS - 1 or max(
        abs(span[0]), abs(span[1])
    ) / bucket_width(shift) >= 1 << 52:
        shift += 1
    return shift


def union_span(a: tuple[float, float] | None, b: tuple[float, float]) -> tuple[float, float]:
    """The smallest time span holding both (``a`` may be None: nothing yet)."""
    return b if a is None else (min(a[0], b[0]), max(a[1], b[1]))

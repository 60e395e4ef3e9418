"""Audit real hosts' ``kvm:kvm_exit`` traces: which TD exits would hardened KVM refuse.

Facts used (ABI.md §3, §4, §7):

- The ``kvm_exit`` tracepoint prints ``vcpu %u reason %s%s%s rip 0x%lx info1 0x%016llx info2
  0x%016llx intr_info 0x%08x error_code 0x%08x``; parsers tolerate trailing text (a 2023 patch
  appending `` requests 0x%016llx`` was not merged, some trees carry it).  The reason is the name
  from VMX_EXIT_REASONS followed by `` FAILED_VMENTRY`` or a raw hex flag when flag bits are set.
- For a TD, ``reason`` is the VMX reason KVM synthesises for a TDVMCALL (CPUID 10, HLT 12,
  IO_INSTRUCTION 30, MSR_READ 31, MSR_WRITE 32, EPT_MISCONFIG 49 for MMIO, VMCALL 18 when R10 != 0,
  TDCALL 77 for every other leaf) and ``info1`` is the exit qualification: the guest's GPR/XMM
  mask (bits 15:0 GPRs, 31:16 XMMs, 33:32 VM index).
- KVM derives that reason from the R10 and R11 values it received, and a register the guest did
  not expose arrives as 0 (§3): so VMCALL implies R10 was exposed, and an instruction reason implies
  R11 was.  The module accepted the mask, so RAX, RCX, RSP and (NO_RBP_MOD, which Linux KVM always
  sets) RBP are never in it and bits 63:34 are 0 (``control.py``).
- Hardened KVM completes a call iff gpr_select covers the leaf's minimal mask for the actual inputs
  (``kvm/leaves.py``: the single source of truth); without R10 no status can reach the guest, and it
  reports an internal error to userspace instead.

The line formats (§7): ftrace ``<comm>-<pid> [<cpu>] <flags> <secs.usecs>: kvm_exit: <payload>``
(optionally ``(<tgid>)`` after the pid), ``trace-cmd report`` the same with the flags column
optional and the event name padded, ``perf script`` ``<comm> <pid>[/<tid>] [<cpu>] <secs.usecs>:
kvm:kvm_exit: <payload>``.

Technique (chosen by measurement, see ``docs/trace.md``): each newline-aligned chunk is scanned
once by a compiled kernel (``trace_kernels.py``, numba, without the GIL: two chunks at a time) that
parses the kvm_exit lines of the usual shape into arrays and interns their task prefixes and
reason texts, which are then parsed once each in Python; a second kernel aggregates.  The lines the
kernel is not sure about go to the reference parser, :func:`parse_chunk_polars` (polars splits the
lines, one anchored regex without captures validates the payload, fields by ``find`` and slicing).
Only aggregates are kept.
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
import polars as pl

from .codes import EXIT_REASON_TDCALL, VMX_EXIT_REASON_NAMES
from .control import Control, ExitQualification
from .kvm.leaves import Leaf, missing_by_case, reason_leaves
from .regs import GPR_MASK, R10, R11, names_in
from . import trace_scan
from .traceio import Chunk, Source, TraceInputError, chunks

FORMATS = ("ftrace", "trace-cmd", "perf")
VERDICTS = ("completes", "depends", "refused", "internal-error", "inconsistent")
#: verdicts under which a call does not complete whatever its inputs
FAILING = ("refused", "internal-error")
KINDS = ("tdvmcall", "td-other", "non-td")

# ---------------------------------------------------------------------------------------------
# line formats
# ---------------------------------------------------------------------------------------------

#: the event name before the payload, per format (after the timestamp's colon and one or more
#: spaces: perf right-aligns event names when several events were recorded)
MARKER = {"ftrace": " kvm_exit:", "trace-cmd": " kvm_exit:", "perf": " kvm:kvm_exit:"}
#: a line "looks like kvm_exit" when it contains this
LOOKS_LIKE_EXIT = "kvm_exit:"
#: header lines, not events: ftrace's ``#`` comments, trace-cmd's ``cpus=N`` and ``version = N``
HEADER_RX = r"^(?:#|cpus=|version = )"

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
# verdicts: what hardened KVM would do with one (reason, mask) of a TD
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """``verdict`` is one of :data:`VERDICTS`; ``missing`` the GPRs the refused cases lack;
    ``refused_for`` the leaves (or ``leaf[case]``) the mask is refused for."""

    verdict: str
    detail: str
    missing: tuple[str, ...] = ()
    refused_for: tuple[str, ...] = ()


def implied_exposed(reason: int) -> int:
    """Registers the reason proves were exposed: KVM labels an exit VMCALL only when it read
    R10 != 0, and an instruction reason only when it read R11 = that leaf (non-zero); an unexposed
    register reads as 0 (ABI §3, §4).  Derived from the leaf table."""
    if reason == EXIT_REASON_TDCALL:
        return 0
    leaves = reason_leaves(reason)
    if leaves and all(leaf.family == "kvm-hypercall" for leaf in leaves):
        return 1 << R10
    if leaves and all(leaf.family == "ghci" and leaf.r11 for leaf in leaves):
        return 1 << R11
    return 0


def module_problems(mask: int) -> list[str]:
    """Why the TDX module could not have sent this exit qualification (empty if it could):
    the GPR checks of the control value (Linux KVM TDs always have NO_RBP_MOD) and bits 63:34."""
    eq = ExitQualification(mask)
    out = Control(mask & 0xFFFFFFFF).problems("1.5", no_rbp_mod=True)
    if eq.other_bits:
        out.append(f"bits 63:34 are {eq.other_bits >> 34:#x}, must be 0")
    return out


def _case_outcomes(leaf: Leaf, gprs: int) -> list[tuple[str, int]]:
    """(case name, missing GPRs) for every named input condition of the leaf."""
    return list(missing_by_case(leaf, gprs).items())


@cache
def verdict_for(reason: int, mask: int) -> Verdict:
    """The verdict for a TDVMCALL exit of a TD with this synthesised reason and exit qualification."""
    # module consistency
    problems = module_problems(mask)
    if problems:
        return Verdict("inconsistent", "the TDX module refuses this mask: " + "; ".join(problems))
    gprs = mask & GPR_MASK
    # KVM consistency: the reason implies which selectors it read as non-zero
    unseen = implied_exposed(reason) & ~gprs
    if unseen:
        return Verdict("inconsistent", f"reason {VMX_EXIT_REASON_NAMES[reason]} implies "
                       f"{' '.join(names_in(unseen, 16))} exposed, the mask does not expose it",
                       missing=tuple(names_in(unseen, 16)))
    # no R10: no status can reach the guest
    if not gprs >> R10 & 1:
        return Verdict("internal-error", "R10 not exposed: hardened KVM reports an internal error "
                       "to userspace", missing=("r10",))
    # the leaf table: every leaf this reason may stand for, every named input condition
    leaves = reason_leaves(reason)
    outcomes = [(leaf, _case_outcomes(leaf, gprs)) for leaf in leaves]
    cases = [miss for _, oc in outcomes for _, miss in oc]
    missing_mask = 0
    for miss in cases:
        missing_mask |= miss
    missing = tuple(names_in(missing_mask, 16))
    if not missing_mask:
        return Verdict("completes", "completes for " + _what(leaves))
    if all(cases):
        return Verdict("refused", f"refused for {_what(leaves)}: missing {' '.join(missing)}",
                       missing, tuple(leaf.name for leaf in leaves))
    if len(leaves) == 1:
        leaf, oc = outcomes[0]
        parts = [f"{case}: " + ("completes" if not miss else f"refused (missing {' '.join(names_in(miss, 16))})")
                 for case, miss in oc]
        return Verdict("depends", f"{leaf.name} depends on inputs: " + ", ".join(parts), missing,
                       tuple(f"{leaf.name}[{case}]" for case, miss in oc if miss))
    refused_for = tuple(_refused_name(leaf, oc) for leaf, oc in outcomes if any(m for _, m in oc))
    return Verdict("depends", "depends on the leaf: refused for " + ", ".join(refused_for)
                   + f" (missing {' '.join(missing)})", missing, refused_for)


def _what(leaves: list[Leaf]) -> str:
    return leaves[0].name if len(leaves) == 1 else f"every one of the {len(leaves)} leaves it may be"


def _refused_name(leaf: Leaf, outcomes: list[tuple[str, int]]) -> str:
    refused = [case for case, miss in outcomes if miss]
    return leaf.name if len(refused) == len(outcomes) else f"{leaf.name}[{','.join(refused)}]"


def verdict_if_td(reason: Reason, mask: int | None) -> Verdict | None:
    """The verdict of an exit if its task is a TD, or ``None`` if it is not a TDVMCALL exit."""
    if not is_tdvmcall_reason(reason) or mask is None:
        return None
    return verdict_for(reason.number, mask)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# parsing one chunk
# ---------------------------------------------------------------------------------------------


@dataclass
class Counts:
    """Line counts of one input (``bad`` holds the first few unparseable kvm_exit lines)."""

    lines: int = 0
    comments: int = 0  # blank and header lines (:data:`HEADER_RX`)
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


def _lines(data: bytes) -> pl.DataFrame:
    """The lines of a chunk as column ``l`` (blank lines are null; a trailing CR is dropped,
    invalid UTF-8 replaced).  Polars' CSV reader with a separator that text lines do not contain
    (NUL) is the fastest line splitter measured; a NUL byte past the binary probe is read as
    U+FFFD, as invalid UTF-8 is."""
    if b"\x00" in data:
        data = data.replace(b"\x00", "\ufffd".encode())
    return pl.read_csv(data, has_header=False, separator="\x00", quote_char=None, new_columns=["l"],
                       truncate_ragged_lines=True, infer_schema=False, encoding="utf8-lossy")


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
    """Reason texts seen so far, parsed once each, and their verdicts, as small join tables
    (shared by the parsing threads)."""

    def __init__(self) -> None:
        self._reasons: dict[str, Reason] = {}

    def reasons(self, texts: Iterable[str]) -> pl.DataFrame:
        rows = []
        for t in texts:
            r = self._reasons.setdefault(t, parse_reason(t))
            rows.append((t, r.name, r.flags, is_tdvmcall_reason(r)))
        return pl.DataFrame(rows, schema={"reason": pl.String, "reason_name": pl.String,
                                          "reason_flags": pl.String, "tdvmcall_reason": pl.Boolean},
                            orient="row")

    def verdicts(self, pairs: Iterable[tuple[str, int | None]]) -> pl.DataFrame:
        rows = []
        for text, mask in pairs:
            v = verdict_if_td(self._reasons.setdefault(text, parse_reason(text)), mask)
            rows.append((text, mask, v.verdict if v else None, v.detail if v else None,
                         " ".join(v.missing) if v else None, ", ".join(v.refused_for) if v else None))
        return pl.DataFrame(rows, schema={"reason": pl.String, "mask": pl.UInt64, "verdict_if_td": pl.String,
                                          "detail": pl.String, "missing": pl.String, "refused_for": pl.String},
                            orient="row")


@dataclass
class ChunkResult:
    """What one chunk contributes: its line counts and its parsed exits, aggregated by
    (task, vCPU, reason, mask) and by (task, reason, mask, time bucket at ``shift``); the rows
    themselves only when asked (for Parquet: line, ts, task, cpu, vcpu, reason, reason_name,
    reason_flags, info1, tdvmcall_reason, mask).  ``mask`` is info1 for a TDVMCALL reason, else null."""

    counts: Counts
    by_key: pl.DataFrame  # task, vcpu, reason, mask, n, first, last
    by_time: pl.DataFrame  # task, reason, mask, bucket, n
    shift: int
    rows: pl.DataFrame | None = None

    def renumber(self, before: int) -> None:
        """Make line numbers absolute, given the number of lines before the chunk."""
        self.counts.bad = [(n + before, t) for n, t in self.counts.bad]
        if self.rows is not None:
            self.rows = self.rows.with_columns(pl.col("line") + before)


#: width of the finest time bucket (seconds), and the most buckets kept (then they double)
BUCKET_BASE = 1 / 1024
MAX_BUCKETS = 512


def bucket_of(ts: pl.Expr, shift: int) -> pl.Expr:
    return (ts / (BUCKET_BASE * (1 << shift))).floor().cast(pl.Int64)


def span_shift(span: tuple[float, float], shift: int = 0) -> int:
    """The smallest shift (at least ``shift``) at which ``span`` fits :data:`MAX_BUCKETS` buckets."""
    while (span[1] - span[0]) / (BUCKET_BASE * (1 << shift)) >= MAX_BUCKETS - 1:
        shift += 1
    return shift


def _union(a: tuple[float, float] | None, b: tuple[float, float]) -> tuple[float, float]:
    return b if a is None else (min(a[0], b[0]), max(a[1], b[1]))


def parse_chunk(chunk: Chunk, fmt: str, source: str, tasks: TaskTable, reasons: ReasonTable, shift: int = 0,
                span: tuple[float, float] | None = None, keep_bad: int = 5, rows: bool = False) -> ChunkResult:
    """Count the lines of a chunk and parse and aggregate its kvm_exit lines.  Line numbers count
    from 1 at the chunk's first line (:meth:`ChunkResult.renumber` makes them absolute).

    The fast path: :mod:`.trace_scan` scans the bytes once (compiled, without the GIL) and parses
    the kvm_exit lines of the usual shape into arrays; the lines it is not sure about go to
    :func:`parse_chunk_polars` (the reference parser), and the two results are merged.  The task
    prefixes and reason texts are parsed once per distinct value, here as there; a prefix that does
    not parse makes its lines unparsed."""
    sc = trace_scan.Scanned(chunk.data, fmt == "perf")

    # the distinct prefixes -> (task, cpu); the distinct reasons -> name, flags, TDVMCALL or not
    looked = [tasks.lookup(source, fmt, p.decode("ascii")) for p in sc.prefixes]
    ptask = np.array([t[0] if t else -1 for t in looked], np.int64)[sc.task]
    pcpu = np.array([t[1] if t else 0 for t in looked], np.int64)[sc.task]
    rtab = reasons.reasons([r.decode("ascii") for r in sc.reasons]).with_row_index("rid")
    good = ptask >= 0
    task, vcpu, rid, info1, ts = ptask[good], sc.vcpu[good], sc.reason[good], sc.info1[good], sc.ts[good]
    bad_lines = [(int(n), _line_text(chunk.data, int(s))) for n, s in
                 zip(sc.line_of[~good][:keep_bad], sc.start_of[~good][:keep_bad])]
    if len(sc.ts):  # the span of every well-formed line, as the reference parser does
        span = _union(span, (float(sc.ts.min()), float(sc.ts.max())))
        shift = span_shift(span, shift)

    # the slow lines, through the reference parser (its line numbers mapped back)
    slow = None
    if len(sc.slow):
        data = b"\n".join(chunk.data[s:e] for _, s, e in sc.slow.tolist()) + b"\n"
        slow = parse_chunk_polars(Chunk(data), fmt, source, tasks, reasons, shift, span, keep_bad, rows)
        shift = slow.shift
        line_map = sc.slow[:, 0]
        bad_lines += [(int(line_map[n - 1]), t) for n, t in slow.counts.bad]

    # the aggregates, grouped by the compiled ``group`` kernel; mask = info1 for a
    # TDVMCALL reason, else null (``has``)
    has = rtab["tdvmcall_reason"].to_numpy()[rid]
    mask = np.where(has, info1, 0).view(np.int64)
    rkey = rid.astype(np.int64) * 2 + has
    bucket = np.floor(ts / (BUCKET_BASE * (1 << shift))).astype(np.int64)  # as :func:`bucket_of`

    def grouped(keys: list[np.ndarray]) -> pl.DataFrame:
        first, n, lo, hi = trace_scan.kernels().group(np.column_stack(keys), ts)
        f = pl.DataFrame({"task": task[first].astype(np.uint32), "vcpu": vcpu[first], "rid": rid[first],
                          "has": has[first], "mask": info1[first], "bucket": bucket[first],
                          "n": n.astype(np.uint32), "first": lo, "last": hi})
        return f.join(rtab.select("rid", "reason"), on="rid", how="left").with_columns(
            mask=pl.when("has").then("mask"))

    by_key = grouped([task, vcpu, rkey, mask]).select("task", "vcpu", "reason", "mask", "n", "first", "last")
    by_time = grouped([task, rkey, mask, bucket]).select("task", "reason", "mask", "bucket", "n")
    row_frames = []
    if rows:
        row_frames = [pl.DataFrame({"line": sc.line_of[good], "ts": ts, "task": task.astype(np.uint32),
                                    "cpu": pcpu[good].astype(np.uint32), "vcpu": vcpu, "rid": rid, "info1": info1})
                      .join(rtab, on="rid", how="left").with_columns(mask=pl.when("tdvmcall_reason").then("info1"))
                      .select(*ROW_COLUMNS)]

    counts = Counts(lines=sc.lines, comments=sc.headers, other_events=sc.others, kvm_exit_lines=len(sc.ts),
                    parsed=len(ts), truncated_last_line=chunk.truncated)
    if slow is not None:
        counts.comments += slow.counts.comments
        counts.other_events += slow.counts.other_events
        counts.kvm_exit_lines += slow.counts.kvm_exit_lines
        counts.parsed += slow.counts.parsed
        by_key = pl.concat([by_key, slow.by_key], how="vertical_relaxed").group_by(
            "task", "vcpu", "reason", "mask").agg(n=pl.col("n").sum(), first=pl.col("first").min(),
                                                  last=pl.col("last").max())
        by_time = pl.concat([by_time, slow.by_time], how="vertical_relaxed").group_by(
            "task", "reason", "mask", "bucket").agg(n=pl.col("n").sum())
        if rows:
            slow_rows = slow.rows.with_columns(line=pl.Series(line_map[slow.rows["line"].to_numpy() - 1]))
            row_frames = [pl.concat([row_frames[0], slow_rows], how="vertical_relaxed").sort("line")]
    counts.bad = sorted(bad_lines)[:keep_bad]
    result = ChunkResult(counts, by_key, by_time, shift)
    if rows:
        result.rows = row_frames[0].with_columns(pl.col("line").cast(pl.UInt64))
    return result


#: the columns of :attr:`ChunkResult.rows`
ROW_COLUMNS = ("line", "ts", "task", "cpu", "vcpu", "reason", "reason_name", "reason_flags", "info1",
               "tdvmcall_reason", "mask")


def _line_text(data: bytes, start: int) -> str:
    """The line of ``data`` that starts at ``start``, as the reference parser shows it."""
    end = data.find(b"\n", start)
    text = data[start:end if end >= 0 else len(data)]
    return text[:-1].decode("utf-8", "replace") if text.endswith(b"\r") else text.decode("utf-8", "replace")


def parse_chunk_polars(chunk: Chunk, fmt: str, source: str, tasks: TaskTable, reasons: ReasonTable,
                       shift: int = 0, span: tuple[float, float] | None = None, keep_bad: int = 5,
                       rows: bool = False) -> ChunkResult:
    """The reference parser (the fast path's fallback): same contract as :func:`parse_chunk`, on
    any line, in polars.

    Few, large polars queries (each polars call costs about a millisecond whatever its size; they
    run without the GIL, so two chunks are parsed in parallel):
    1. split each kvm_exit line at the format's marker, validate the payload with
       :data:`PAYLOAD_RX` and cut the timestamp off the line prefix;
    2. the distinct line prefixes and reason texts (few) and the time range;
    3. in Python: prefix -> (task, cpu), reason -> name and whether it is a TDVMCALL reason;
    4. fields by position, mask = info1 for TDVMCALL reasons, and the two aggregates.
    Time buckets are at least as wide as ``shift`` says, and wide enough for the time ``span``
    seen so far, with this chunk's, to fit :data:`MAX_BUCKETS`."""
    # 1. lines: kvm_exit-looking, header/blank, other; the kvm_exit lines split and validated
    lines = _lines(chunk.data).lazy().with_row_index("line", offset=1).with_columns(
        is_exit=pl.col("l").str.contains(LOOKS_LIKE_EXIT, literal=True).fill_null(False))
    header = (pl.col("l").is_null() | pl.col("l").str.starts_with("#") | pl.col("l").str.starts_with("cpus=")
              | pl.col("l").str.starts_with("version = "))
    stats_q = lines.select(lines=pl.len(), exits=pl.col("is_exit").sum(), comments=(~pl.col("is_exit") & header).sum())
    parts = pl.col("l").str.splitn(MARKER[fmt], 2)
    head, p = pl.col("head"), pl.col("pay")
    r = p.str.find(" reason ", literal=True)
    rip = p.str.find(" rip 0x", literal=True)
    parsed_q = (lines.filter("is_exit")
                .select("line", "l", head=parts.struct.field("field_0").str.strip_chars_end(" "),
                        pay=parts.struct.field("field_1").str.strip_chars_start(" "))
                .with_columns(colon=head.str.ends_with(":"), head=head.str.strip_suffix(":"))
                .with_columns(prefix=head.str.strip_chars_end("0123456789."))
                .with_columns(ts=head.str.slice(pl.col("prefix").str.len_chars()))
                .with_columns(ok=(p.str.contains(PAYLOAD_RX) & pl.col("colon")
                                  & pl.col("ts").str.contains(r"^[0-9]+(?:\.[0-9]+)?$")).fill_null(False))
                .with_columns(reason=pl.when("ok").then(p.str.slice(r + 8, rip - r - 8)),
                              ts=pl.when("ok").then(pl.col("ts").cast(pl.Float64)))
                .drop("head", "colon"))
    stats, parsed = pl.collect_all([stats_q, parsed_q])
    counts = Counts(lines=int(stats["lines"][0]), kvm_exit_lines=int(stats["exits"][0]),
                    comments=int(stats["comments"][0]), truncated_last_line=chunk.truncated)
    counts.other_events = counts.lines - counts.kvm_exit_lines - counts.comments
    ok = parsed.lazy().filter("ok")

    # 2. the few distinct prefixes and reasons, the time range, the first unparseable lines
    prefixes, reason_texts, ts_range, bad = pl.collect_all([
        ok.select(pl.col("prefix").unique()), ok.select(pl.col("reason").unique()),
        ok.select(lo=pl.col("ts").min(), hi=pl.col("ts").max()),
        parsed.lazy().filter(~pl.col("ok")).select("line", "l").head(keep_bad)])

    # 3. prefix -> (task, cpu); a prefix of the wrong shape makes its lines unparsed
    uniq = prefixes["prefix"].to_list()
    looked = [tasks.lookup(source, fmt, x) for x in uniq]
    ptab = pl.DataFrame({"prefix": uniq, "task": [t[0] if t else None for t in looked],
                         "cpu": [t[1] if t else None for t in looked]},
                        schema={"prefix": pl.String, "task": pl.UInt32, "cpu": pl.UInt32})
    rtab = reasons.reasons(reason_texts["reason"].to_list())
    if ts_range["lo"][0] is not None:
        shift = span_shift(_union(span, (ts_range["lo"][0], ts_range["hi"][0])), shift)

    # 4. fields by position (the regex fixed the layout), mask, aggregates
    i1 = p.str.find(" info1 0x", literal=True)
    exits = (ok.join(ptab.lazy(), on="prefix", how="left")
             .join(rtab.lazy(), on="reason", how="left")
             .select("line", "ts", "task", "cpu",
                     vcpu=p.str.slice(5, r - 5).cast(pl.UInt32),
                     reason="reason", reason_name="reason_name", reason_flags="reason_flags",
                     info1=p.str.slice(i1 + 9, 16).str.to_integer(base=16, dtype=pl.UInt64),
                     tdvmcall_reason="tdvmcall_reason")
             .with_columns(mask=pl.when("tdvmcall_reason").then("info1")))
    good = exits.filter(pl.col("task").is_not_null())
    queries = [
        good.group_by("task", "vcpu", "reason", "mask").agg(n=pl.len(), first=pl.col("ts").min(),
                                                            last=pl.col("ts").max()),
        good.group_by("task", "reason", "mask", bucket=bucket_of(pl.col("ts"), shift)).agg(n=pl.len()),
        exits.filter(pl.col("task").is_null()).select("line").head(keep_bad),
    ] + ([good.sort("line")] if rows else [])
    by_key, by_time, bad_prefix, *row_frames = pl.collect_all(queries)

    counts.parsed = int(by_key["n"].sum())
    bad_lines = [(int(n), t) for n, t in bad.iter_rows()]
    if not bad_prefix.is_empty():
        text = parsed.filter(pl.col("line").is_in(bad_prefix["line"].implode())).select("line", "l")
        bad_lines += [(int(n), t) for n, t in text.iter_rows()]
    counts.bad = sorted(bad_lines)[:keep_bad]
    result = ChunkResult(counts, by_key, by_time, shift)
    if rows:
        result.rows = row_frames[0].with_columns(pl.col("line").cast(pl.UInt64))
    return result


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
    """Aggregates of every parsed exit, by (task, vCPU, reason, mask) and by time bucket."""

    def __init__(self, td_pids: set[int] | None = None, parquet: str | None = None, keep_bad: int = 5):
        self.td_pids = td_pids
        self.tasks = TaskTable()
        self.reasons = ReasonTable()
        self.inputs: list[InputReport] = []
        self.keep_bad = keep_bad
        self._by_key: list[pl.DataFrame] = []
        self._by_time: list[pl.DataFrame] = []
        self._shift = 0  # bucket width = BUCKET_BASE * 2**shift; only grows
        self._span: tuple[float, float] | None = None
        self.parquet = ParquetSink(parquet) if parquet else None

    # -- feeding --------------------------------------------------------------------------
    def add(self, result: ChunkResult, source: str) -> None:
        """Fold one chunk's aggregates in."""
        if result.by_key.is_empty():
            return
        key = result.by_key
        self._by_key.append(key)
        self._widen(float(key["first"].min()), float(key["last"].max()), result.shift)  # type: ignore[arg-type]
        factor = 1 << (self._shift - result.shift)
        self._by_time.append(result.by_time.with_columns(pl.col("bucket") // factor))
        if self.parquet is not None and result.rows is not None:
            self.parquet.write(result.rows, source)
        if len(self._by_key) >= 32:
            self._compact()

    def _widen(self, lo: float, hi: float, at_least: int) -> None:
        """Widen the time buckets (doubling) so that the span seen fits :data:`MAX_BUCKETS` and is
        at least as wide as a chunk's."""
        self._span = _union(self._span, (lo, hi))
        shift = span_shift(self._span, max(self._shift, at_least))
        if shift != self._shift:
            factor = 1 << (shift - self._shift)
            self._by_time = [t.with_columns(pl.col("bucket") // factor) for t in self._by_time]
            self._shift = shift

    def _compact(self) -> None:
        self._by_key = [pl.concat(self._by_key).group_by("task", "vcpu", "reason", "mask").agg(
            n=pl.col("n").sum(), first=pl.col("first").min(), last=pl.col("last").max())]
        self._by_time = [pl.concat(self._by_time).group_by("task", "reason", "mask", "bucket").agg(n=pl.col("n").sum())]

    @property
    def shift(self) -> int:
        return self._shift

    @property
    def span(self) -> tuple[float, float] | None:
        return self._span

    # -- results ----------------------------------------------------------------------------
    def td_tasks(self) -> set[int]:
        """Task ids of TDs: given (``--td``: a pid or tgid) or inferred (a task with a TDCALL exit
        is a TD, and so is every task of the same process when the trace shows tgids)."""
        if self.td_pids is not None:
            return {i for i, t in enumerate(self.tasks.tasks) if t.pid in self.td_pids or t.tgid in self.td_pids}
        by_key = self.by_key()
        tdcall = by_key.filter(pl.col("reason_name") == VMX_EXIT_REASON_NAMES[EXIT_REASON_TDCALL],
                               pl.col("tdvmcall_reason"))["task"].unique().to_list()
        tasks = self.tasks.tasks
        procs = {(tasks[i].source, tasks[i].tgid) for i in tdcall if tasks[i].tgid is not None}
        return set(tdcall) | {i for i, t in enumerate(tasks) if t.tgid is not None and (t.source, t.tgid) in procs}

    def by_key(self) -> pl.DataFrame:
        if self._by_key:
            self._compact()
            k = self._by_key[0]
        else:
            k = pl.DataFrame(schema={"task": pl.UInt32, "vcpu": pl.UInt32, "reason": pl.String,
                                     "mask": pl.UInt64, "n": pl.UInt32, "first": pl.Float64, "last": pl.Float64})
        return k.join(self.reasons.reasons(k["reason"].unique().to_list()), on="reason", how="left")

    def task_frame(self, td: set[int]) -> pl.DataFrame:
        return pl.DataFrame(
            [(i, t.source, t.comm, t.pid, t.tgid, t.process, t.label, i in td) for i, t in enumerate(self.tasks.tasks)],
            schema={"task": pl.UInt32, "source": pl.String, "comm": pl.String, "pid": pl.Int64, "tgid": pl.Int64,
                    "process": pl.Int64, "task_label": pl.String, "td": pl.Boolean}, orient="row")

    def classify(self, frame: pl.DataFrame, td: set[int]) -> pl.DataFrame:
        """Add ``td``, ``kind`` and ``verdict`` (null unless kind = tdvmcall) to rows with task,
        reason and mask columns."""
        f = frame.with_columns(td=pl.col("task").is_in(sorted(td)))
        pairs = f.filter("td").select("reason", "mask").unique().rows()  # verdicts for TDs only
        f = f.join(self.reasons.verdicts(pairs), on=["reason", "mask"], how="left", nulls_equal=True)
        kind = (pl.when(~pl.col("td")).then(pl.lit("non-td"))
                .when(pl.col("verdict_if_td").is_null()).then(pl.lit("td-other"))
                .otherwise(pl.lit("tdvmcall")))
        return f.with_columns(kind=kind, verdict=pl.when(pl.col("td")).then("verdict_if_td"))

    def by_time(self, td: set[int]) -> tuple[pl.DataFrame, float]:
        """Exit counts per (time bucket, kind/verdict); the bucket width in seconds."""
        if self._by_time:
            self._compact()
            t = self._by_time[0]
        else:
            t = pl.DataFrame(schema={"task": pl.UInt32, "reason": pl.String, "mask": pl.UInt64,
                                     "bucket": pl.Int64, "n": pl.UInt32})
        t = self.classify(t, td).with_columns(series=pl.coalesce("verdict", "kind"))
        width = BUCKET_BASE * (1 << self._shift)
        return t.group_by("bucket", "series").agg(n=pl.col("n").sum()).sort("bucket"), width

    def finish(self, top: int = 10) -> dict:
        """The report (writing the Parquet file first, if asked)."""
        td = self.td_tasks()
        if self.parquet is not None:
            self.parquet.close(self.task_frame(td), td, self)
        return build_report(self, td, top)


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
    tasks = audit.task_frame(td)
    k = audit.classify(audit.by_key(), td).join(tasks.drop("td"), on="task", how="left")
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
    with the ``td``, ``kind``, ``verdict`` and ``missing`` columns added."""

    def __init__(self, path: str):
        import pyarrow.parquet as pq

        self.path = path
        self.tmp = path + ".partial"
        self._pq = pq
        self._writer = None

    def write(self, e: pl.DataFrame, source: str) -> None:
        t = e.select("task", "line", "ts", "cpu", "vcpu", "reason", "reason_name", "reason_flags", "info1", "mask",
                     source=pl.lit(source)).to_arrow()
        if self._writer is None:
            self._writer = self._pq.ParquetWriter(self.tmp, t.schema, compression="zstd")
        self._writer.write_table(t.cast(self._writer.schema))

    def close(self, tasks: pl.DataFrame, td: set[int], audit: Audit) -> None:
        import os

        schema = parquet_schema()
        out = self._pq.ParquetWriter(self.path, schema, compression="zstd")
        try:
            if self._writer is not None:
                self._writer.close()
                for batch in self._pq.ParquetFile(self.tmp).iter_batches(batch_size=1 << 20):
                    f = audit.classify(pl.from_arrow(batch), td).join(tasks.drop("td", "source"), on="task", how="left")
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

    t, width = audit.by_time(td)
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


__all__ = ["Audit", "TraceInputError", "Verdict", "audit_input", "build_report", "detect_format",
           "parse_chunk", "plot", "verdict_for", "FORMATS", "VERDICTS"]

"""Audit real hosts' ``kvm:kvm_exit`` traces: which TD exits would hardened KVM refuse.

Facts used (docs/abi.md §4, §7): the ``kvm_exit`` tracepoint prints ``vcpu %u reason %s%s%s rip 0x%lx
info1 0x%016llx info2 0x%016llx intr_info 0x%08x error_code 0x%08x``; parsers tolerate trailing
text (a 2023 patch appending `` requests 0x%016llx`` was not merged, some trees carry it).  The
reason is the name from VMX_EXIT_REASONS followed by `` FAILED_VMENTRY`` or a raw hex flag when
flag bits are set; for a TD it is the reason KVM synthesises for the TDVMCALL (what that says,
and the verdicts: ``verdict.py``).

The line formats (§7): ftrace ``<comm>-<pid> [<cpu>] <flags> <secs.usecs>: kvm_exit: <payload>``
(optionally ``(<tgid>)`` after the pid), ``trace-cmd report`` the same with the flags column
optional and the event name padded, ``perf script`` ``<comm> <pid>[/<tid>] [<cpu>] <secs.usecs>:
kvm:kvm_exit: <payload>``.

Technique (chosen by measurement, see ``docs/trace.md``): each newline-aligned chunk is scanned
once by compiled code (``_scan.c``, a C extension, without the GIL: two chunks at a time) that
parses the kvm_exit lines of the usual shape into records and interns their task prefixes and
reason texts, which are then parsed once each in Python; a second compiled pass aggregates the
records into numpy columns keyed by task and reason ids.  The lines the scanner is not sure about go to the reference
parser (``reference.parse_chunk_reference``: plain Python, one anchored regex per line).  Only aggregates are kept;
``report`` turns them into the report (plain Python: they are few rows); ``parquet``
writes the rows (pyarrow) and ``plot`` the plot (matplotlib).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..kvm.trees import DEFAULT_TREE, tree_rule
from . import scan as trace_scan
from .io import Chunk, Source, TraceInputError, chunks
from .rows import (
    FORMATS,
    KEY,
    TIME_KEY,
    ChunkResult,
    Columns,
    Counts,
    Reason,
    ReasonTable,
    TaskTable,
    aggregate,
    bucket_width,
    coarser,
    concat,
    detect_format,
    empty_key,
    empty_time,
    is_tdvmcall_reason,
    parse_prefix,
    parse_reason,
    span_shift,
    union_span,
)

# ---------------------------------------------------------------------------------------------
# parsing one chunk
# ---------------------------------------------------------------------------------------------


def parse_chunk(
    chunk: Chunk,
    fmt: str,
    source: str,
    tasks: TaskTable,
    reasons: ReasonTable,
    shift: int = 0,
    span: tuple[float, float] | None = None,
    keep_bad: int = 5,
    rows: bool = False,
    times: bool = True,
) -> ChunkResult:
    """Count the lines of a chunk and parse and aggregate its kvm_exit lines.  Line numbers count
    from 1 at the chunk's first line (:meth:`ChunkResult.renumber` makes them absolute).  Without
    ``times`` the aggregate by time bucket is left empty (only the plot reads it).

    :mod:`.scan` scans the bytes once (compiled, without the GIL) and parses the kvm_exit
    lines of the usual shape into arrays; the lines it is not sure about go to the reference
    parser (``reference.parse_chunk_reference``), and the two results are merged.  The task
    prefixes and reason texts are parsed once per distinct value, here as there; a prefix that
    does not parse makes its lines unparsed.  Time buckets are at least as wide as ``shift`` says,
    and wide enough for the time ``span`` seen so far, with this chunk's, to fit :data:`MAX_BUCKETS`."""
    sc = trace_scan.Scanned(chunk.data, fmt == "perf")

    # the distinct prefixes -> (task, cpu); the distinct reasons -> ids, TDVMCALL or not
    looked = [tasks.lookup(source, fmt, p.decode("ascii")) for p in sc.prefixes]
    task_of = np.array([t[0] if t else -1 for t in looked], np.int64)
    rids = reasons.ids(r.decode("ascii") for r in sc.reasons)
    tdvmcall = reasons.tdvmcall(rids)
    if sc.span is not None:  # the span of every well-formed line, as the reference parser does
        span = union_span(span, sc.span)
        shift = span_shift(span, shift)

    # the slow lines, through the reference parser (its line numbers mapped back)
    slow = None
    bad_lines: list[tuple[int, str]] = []
    if len(sc.slow):
        from .reference import parse_chunk_reference

        data = b"\n".join(chunk.data[s:e] for _, s, e in sc.slow.tolist()) + b"\n"
        slow = parse_chunk_reference(Chunk(data), fmt, source, tasks, reasons, shift, span, keep_bad, rows)
        shift = slow.shift
        line_map = sc.slow[:, 0].astype(np.uint64)
        bad_lines += [(int(line_map[n - 1]), t) for n, t in slow.counts.bad]

    # one compiled pass over the exits, by key and by time bucket (a prefix that does not parse
    # makes its lines unparsed)
    keyed, timed, unparsed, bad_at = sc.fold(task_of, rids, tdvmcall, bucket_width(shift), keep_bad, times)
    bad_lines += [(line, _line_text(chunk.data, start)) for line, start in bad_at]
    by_key = {
        "task": keyed["task"].astype(np.uint32),
        "vcpu": keyed["vcpu"].astype(np.uint32),
        "rid": keyed["rid"].astype(np.uint32),
        "mask": keyed["mask"].copy(),
        "n": keyed["n"].copy(),
        "first": keyed["first"].copy(),
        "last": keyed["last"].copy(),
    }
    by_time = {
        "task": timed["task"].astype(np.uint32),
        "rid": timed["rid"].astype(np.uint32),
        "mask": timed["mask"].copy(),
        "bucket": timed["bucket"].copy(),
        "n": timed["n"].copy(),
    }
    row_cols = None
    if rows:
        ptask = task_of[sc.task]
        good = ptask >= 0
        row_cols = {
            "line": sc.line_of[good].astype(np.uint64),
            "ts": sc.ts[good],
            "task": ptask[good].astype(np.uint32),
            "cpu": np.array([t[1] if t else 0 for t in looked], np.uint32)[sc.task][good],
            "vcpu": sc.vcpu[good],
            "rid": rids[sc.reason[good]],
            "info1": sc.info1[good],
        }

    counts = Counts(
        lines=sc.lines,
        comments=sc.headers,
        other_events=sc.others,
        kvm_exit_lines=len(sc.ts),
        parsed=len(sc.ts) - unparsed,
        truncated_last_line=chunk.truncated,
    )
    if slow is not None:
        counts.comments += slow.counts.comments
        counts.other_events += slow.counts.other_events
        counts.kvm_exit_lines += slow.counts.kvm_exit_lines
        counts.parsed += slow.counts.parsed
        by_key = aggregate(concat([by_key, slow.by_key]), KEY)
        if times:
            by_time = aggregate(concat([by_time, slow.by_time]), TIME_KEY)
        if rows:
            assert slow.rows is not None and row_cols is not None
            both = concat([row_cols, dict(slow.rows, line=line_map[slow.rows["line"].astype(np.int64) - 1])])
            order = np.argsort(both["line"], kind="stable")
            row_cols = {c: v[order] for c, v in both.items()}
    counts.bad = sorted(bad_lines)[:keep_bad]
    return ChunkResult(counts, by_key, by_time, shift, row_cols)


def _line_text(data: bytes | bytearray | memoryview, start: int) -> str:
    """The line of ``data`` that starts at ``start``, as the reference parser shows it."""
    view = memoryview(data)
    end = start
    while end < len(view):  # a view has no find(): look for the newline a block at a time
        block = bytes(view[end : end + 4096])
        at = block.find(b"\n")
        if at >= 0:
            end += at
            break
        end += len(block)
    text = bytes(view[start:end])
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
    columns of numpy arrays (``report`` turns them into the report)."""

    def __init__(
        self,
        td_pids: set[int] | None = None,
        parquet: str | None = None,
        keep_bad: int = 5,
        times: bool = True,
        tree: str = DEFAULT_TREE,
        tree_given: bool = False,
    ):
        self.td_pids = td_pids
        #: the KVM tree the trace came from (``kvm/trees.py``): its rule judges a flagged reason;
        #: ``tree_given``: named by the user (``--tree``), not the default
        self.tree = tree_rule(tree).name
        self.tree_given = tree_given
        self.tasks = TaskTable()
        self.reasons = ReasonTable()
        self.inputs: list[InputReport] = []
        self.keep_bad = keep_bad
        #: whether exits are also aggregated by time bucket (for the plot; the report does not read them)
        self.times = times
        self._by_key: list[Columns] = []
        # each chunk's time aggregate at its own bucket shift, coarsened when compacted (not each
        # time the shift grows); compacted when the rows added since outgrow the compacted ones
        self._by_time: list[tuple[Columns, int]] = []
        self._time_rows = self._compacted_rows = 0
        self._shift = 0  # bucket width = BUCKET_BASE * 2**shift; only grows
        self._span: tuple[float, float] | None = None
        self.parquet = None
        if parquet:
            from .parquet import (
                ParquetSink,  # pyarrow: only when writing Parquet
            )

            self.parquet = ParquetSink(parquet, self.tasks, self.reasons, self.tree)

    # -- feeding --------------------------------------------------------------------------
    def add(self, result: ChunkResult, source: str) -> None:
        """Fold one chunk's aggregates in."""
        key = result.by_key
        if not len(key["n"]):
            return
        self._by_key.append(key)
        self._widen(float(key["first"].min()), float(key["last"].max()), result.shift)
        if self.times:
            self._by_time.append((result.by_time, result.shift))
            self._time_rows += len(result.by_time["n"])
        if self.parquet is not None and result.rows is not None:
            self.parquet.write(result.rows, source)
        if len(self._by_key) >= 32 or self._time_rows > max(1 << 16, 2 * self._compacted_rows):
            self._compact()

    def _widen(self, lo: float, hi: float, at_least: int) -> None:
        """Widen the time buckets (doubling) so that the span seen fits :data:`MAX_BUCKETS` and is
        at least as wide as a chunk's."""
        self._span = union_span(self._span, (lo, hi))
        self._shift = span_shift(self._span, max(self._shift, at_least))

    def expect(self, span: tuple[float, float] | None) -> None:
        """Start the time buckets as wide as this span needs: timestamps of lines that will be
        parsed (their prefix parses), so the buckets would widen this far anyway.  The aggregates do
        not change (a bucket number at a wider shift is the narrower one shifted right: widths are
        powers of two), only the work: narrow buckets first, then merged, cost more."""
        if span is not None:
            self._shift = span_shift(span, self._shift)

    def _compact(self) -> None:
        self._by_key = [aggregate(concat(self._by_key), KEY)]
        if not self._by_time:
            return
        at = [dict(t, bucket=coarser(t["bucket"], self._shift - shift)) for t, shift in self._by_time]
        time = aggregate(concat(at), TIME_KEY)
        self._by_time = [(time, self._shift)]
        self._time_rows = self._compacted_rows = len(time["n"])

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
        if not self.times:
            raise ValueError("this audit keeps no time buckets (Audit(times=False))")
        if not self._by_time:
            return empty_time()
        self._compact()
        return self._by_time[0][0]


# ---------------------------------------------------------------------------------------------
# reading inputs
# ---------------------------------------------------------------------------------------------

#: how much of each end of a mapped file :func:`_ends_span` reads
ENDS = 64 << 10


def _ends_span(mm, fmt: str) -> tuple[float, float] | None:
    """The time span of the well-formed kvm_exit lines (prefix included) in the first and the last
    :data:`ENDS` bytes of a mapped file: a part of the span the audit will see, known before the
    first chunk is parsed (so the time buckets start about as wide as they will end)."""
    n = len(mm)
    stamps: list[float] = []
    for a, b in ((0, min(n, ENDS)), (max(0, n - ENDS), n)):
        if a > 0:
            a = mm.find(b"\n", a, b) + 1
            if a == 0:
                continue
        b = mm.rfind(b"\n", a, b) + 1 if b < n else b
        sc = trace_scan.Scanned(mm[a:b], fmt == "perf")
        good = [parse_prefix(fmt, p.decode("ascii")) is not None for p in sc.prefixes]
        stamps += [t for t, p in zip(sc.ts.tolist(), sc.task.tolist()) if good[p]]
    return (min(stamps), max(stamps)) if stamps else None


Progress = Callable[[int, int], None]  # (bytes of the input read so far, lines so far)


def audit_input(
    audit: Audit, path: str, fmt: str = "auto", progress: Progress | None = None, threads: int = 2
) -> InputReport:
    """Read one input into the audit; raises :class:`TraceInputError` for bad input."""
    with Source(path) as src:
        it = chunks(src)
        first = next(it)
        if fmt == "auto":
            sample = bytes(first.data[: 1 << 20]).decode("utf-8", "replace")
            found = detect_format(sample)
            if found is None:
                if any(s.strip() and not s.lstrip().startswith("#") for s in sample.splitlines()):
                    raise TraceInputError(
                        f"{src.name}: not trace text: no line has the shape of an ftrace, "
                        "trace-cmd report or perf script event (use --format to force one)"
                    )
                found = "ftrace"  # only a header: an empty ftrace capture
            fmt = found
            del sample
        report = InputReport(src.name, fmt, src.compression, 0, Counts())
        if src.mapped is not None and audit.times:
            audit.expect(_ends_span(src.mapped, fmt))
        pending: deque[tuple[Future, int]] = deque()

        def drain(limit: int) -> None:
            while len(pending) > limit:
                future, end = pending.popleft()
                result = future.result()
                src.release(0, end)  # a mapped file's parsed bytes leave this process's memory
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
                pending.append(
                    (
                        pool.submit(
                            parse_chunk,
                            chunk,
                            fmt,
                            src.name,
                            audit.tasks,
                            audit.reasons,
                            audit.shift,
                            audit.span,
                            audit.keep_bad,
                            audit.parquet is not None,
                            audit.times,
                        ),
                        chunk.end,
                    )
                )
                drain(threads)
            drain(0)
    audit.inputs.append(report)
    return report


__all__ = [
    "FORMATS",
    "Audit",
    "ChunkResult",
    "Counts",
    "Reason",
    "ReasonTable",
    "TaskTable",
    "TraceInputError",
    "aggregate",
    "audit_input",
    "detect_format",
    "is_tdvmcall_reason",
    "parse_chunk",
    "parse_reason",
]

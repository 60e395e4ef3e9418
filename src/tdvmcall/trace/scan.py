"""The fast path of ``tdvmcall trace``: a compiled pass over each chunk's bytes (``_scan.c``, a C
extension built by setuptools at ``pip install``), and the numpy views of what it finds.

``_scan.scan`` walks a newline-aligned chunk once and sorts every line into header/blank, other
event, ``kvm_exit`` parsed there, or "slow": a line it is not sure about, which the caller hands to
the reference parser (``reference.py``), so every quirk that parser knows stays handled and nothing
is dropped.  The shapes it parses are exactly those of docs/abi.md §7, as the reference parser
reads them:

- the line ends at ``\\n``; one trailing ``\\r`` is not part of it (CRLF); a line that is empty or
  starts with ``#``, ``cpus=`` or ``version = `` is a header/blank line unless it is a kvm_exit;
- a line "looks like kvm_exit" when it contains ``kvm_exit:``; it is parsed when that first
  occurrence is the format's event name (`` kvm_exit:``, perf `` kvm:kvm_exit:``), preceded by
  ``<secs>[.<frac>]:`` and spaces (perf right-aligns event names), followed by spaces and the
  payload ``vcpu %u reason %s%s%s rip 0x%lx info1 0x%016llx info2 0x%016llx intr_info 0x%08x
  error_code 0x%08x`` (``%s%s%s``: the reason name, then `` FAILED_VMENTRY`` or raw hex flags),
  then anything (some trees append `` requests 0x%016llx``);
- everything else that looks like kvm_exit goes to the slow path: a NUL byte or a non-ASCII task
  prefix, a timestamp of more than 15 digits (float64 would not hold it exactly), a vCPU of more
  than 9 digits (the slow path counts it unparsed too), more than 32,768 distinct prefixes or
  reasons in a chunk, or any payload that does not have that shape (the slow path counts it
  unparsed).

The task prefix (``<comm>-<pid> [<cpu>] <flags>``) and the reason text take few distinct values:
the scanner interns them (an open-addressing table keyed by a hash, entries compared byte for byte,
so no two strings are ever confused) and the caller parses each distinct one once, with
``rows.py``'s regexes (``parse_prefix``, ``parse_reason``).  Timestamps are parsed exactly: the
digits as an integer (< 2**53) divided by a power of ten (<= 10**15), both exact, so one IEEE
rounding, as ``float()`` does.  ``_scan.fold`` then groups a chunk's exits by (task, vCPU, reason,
mask, time bucket) and ``_scan.group`` merges aggregates; all three release the GIL, so two threads
work on two chunks at once.
"""

from __future__ import annotations

import numpy as np

from . import _scan

#: the slow-line rows first allocated per chunk: one per SLOW_GUESS bytes, and SLOW_MIN more (the
#: C code grows them as needed)
SLOW_GUESS, SLOW_MIN = 48, 64

#: one parsed kvm_exit line, as ``_scan.scan`` writes it
EXIT_RECORD = np.dtype(
    [
        ("ts", "<f8"),
        ("info1", "<u8"),
        ("start", "<i8"),
        ("line", "<u4"),
        ("vcpu", "<u4"),
        ("prefix", "<u4"),
        ("reason", "<u4"),
    ]
)
#: one group of ``_scan.fold``
GROUP_RECORD = np.dtype(
    [
        ("task", "<i8"),
        ("vcpu", "<i8"),
        ("rid", "<i8"),
        ("mask", "<u8"),
        ("bucket", "<i8"),
        ("n", "<i8"),
        ("first", "<f8"),
        ("last", "<f8"),
    ]
)
assert EXIT_RECORD.itemsize == _scan.EXIT_RECORD and GROUP_RECORD.itemsize == _scan.GROUP_RECORD


class Scanned:
    """What the scanner found in one chunk: counts, the parsed exits (``exits``: the raw records;
    ``line_of``, ``start_of``, ``ts``, ``vcpu``, ``info1``, ``task``, ``reason``: numpy views of
    them), the slow lines (``slow``: rows of (line number, start, end)), and the distinct task
    ``prefixes`` and ``reasons`` (byte strings) that ``task`` and ``reason`` index; ``span`` is the
    least and greatest timestamp of the parsed exits (None when there is none)."""

    def __init__(self, data: bytes | bytearray, perf: bool):
        lines, headers, others, exits, slow, prefixes, reasons, tmin, tmax = _scan.scan(
            data, perf, len(data) // SLOW_GUESS + SLOW_MIN
        )
        self.lines, self.headers, self.others = lines, headers, others
        self.exits = exits
        self.slow = np.frombuffer(slow, np.int64).reshape(-1, 3)
        self.prefixes: list[bytes] = prefixes
        self.reasons: list[bytes] = reasons
        self.span = (tmin, tmax) if exits else None

    def _field(self, name: str) -> np.ndarray:
        return np.frombuffer(self.exits, EXIT_RECORD)[name]

    @property
    def line_of(self) -> np.ndarray:
        return self._field("line")

    @property
    def start_of(self) -> np.ndarray:
        return self._field("start")

    @property
    def ts(self) -> np.ndarray:
        return self._field("ts")

    @property
    def vcpu(self) -> np.ndarray:
        return self._field("vcpu")

    @property
    def info1(self) -> np.ndarray:
        return self._field("info1")

    @property
    def task(self) -> np.ndarray:
        return self._field("prefix")

    @property
    def reason(self) -> np.ndarray:
        return self._field("reason")

    def fold(
        self,
        task_of: np.ndarray,
        rid_of: np.ndarray,
        tdvmcall: np.ndarray,
        width: float,
        keep_bad: int,
        times: bool = True,
    ) -> tuple[np.ndarray, np.ndarray, int, list[tuple[int, int]]]:
        """The exits aggregated by (task, vCPU, reason id, mask) and by (task, reason id, mask, time
        bucket) (:data:`GROUP_RECORD` each): ``task_of`` per prefix (-1: it does not parse: those lines
        are unparsed), ``rid_of`` per reason, ``tdvmcall`` per reason (info1 is the mask, else 0),
        buckets of ``width`` seconds; the number of unparsed lines and the first ``keep_bad`` of them
        as (line, start).  Without ``times`` the time aggregate is left empty (only the plot reads it)."""
        by_key, by_time, bad, bad_lines = _scan.fold(
            self.exits,
            np.ascontiguousarray(task_of, np.int64),
            np.ascontiguousarray(rid_of, np.uint32),
            np.ascontiguousarray(tdvmcall, np.uint8),
            width,
            keep_bad,
            times,
        )
        return np.frombuffer(by_key, GROUP_RECORD), np.frombuffer(by_time, GROUP_RECORD), bad, bad_lines


def group(
    keys: np.ndarray, n: np.ndarray, lo: np.ndarray, hi: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Merge the rows of ``keys`` (int64, rows x columns) that are equal: per group, the row that
    opened it, the sum of ``n`` over its rows, the least ``lo`` and the greatest ``hi``; per row,
    its group."""
    keys = np.ascontiguousarray(keys, np.int64)
    if keys.ndim != 2 or keys.shape[1] == 0:
        raise ValueError("group: keys must be rows x columns")
    first, total, least, greatest, of_row = _scan.group(
        keys,
        keys.shape[1],
        np.ascontiguousarray(n, np.int64),
        np.ascontiguousarray(lo, np.float64),
        np.ascontiguousarray(hi, np.float64),
    )
    return (
        np.frombuffer(first, np.int64),
        np.frombuffer(total, np.int64),
        np.frombuffer(least, np.float64),
        np.frombuffer(greatest, np.float64),
        np.frombuffer(of_row, np.int64),
    )

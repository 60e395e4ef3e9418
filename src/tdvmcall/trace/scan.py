"""Running the fast path's kernels (``kernels.py``, numba) on one chunk.

The kernels run under numba's JIT, compiled once and cached on disk (``cache=True``), and release
the GIL, so that two threads scan two chunks at once.  (Compiling them ahead of time with numba's
``pycc`` was measured too: it saves numba's import and start-up, 0.7-0.9 s, but its exported
functions hold the GIL, and losing the second core cost as much; see docs/trace.md.)
"""

from __future__ import annotations

import os
from functools import cache

import numpy as np

#: slots of the intern tables: at most half as many distinct prefixes (or reasons) per chunk are
#: interned, the lines of further ones go to the slow path (a 4 MiB chunk has about 28,000 lines)
INTERN = 1 << 16
#: the slow-line rows first allocated per chunk: one per SLOW_GUESS bytes, and SLOW_MIN more
SLOW_GUESS, SLOW_MIN = 48, 64


@cache
def kernels():
    """The compiled kernels (numba is imported on first use: it takes about half a second)."""
    from . import kernels as trace_kernels

    return trace_kernels


def compiled_on_disk() -> bool:
    """Whether numba's cache holds the kernels that :func:`warm_up` runs (``False`` on the first
    run ever: it then compiles them, seconds).  Read from the index file numba keeps per function
    (the kernels they call are compiled into them; a private
    layout: if it changes, assume they are cached and say nothing)."""
    try:
        k = kernels()
        return all(os.path.exists(f._cache._cache_file._index_path) for f in (k.scan, k.group))
    except AttributeError:
        return True


def warm_up() -> None:
    """Load the kernels and run each once (numba's start-up: about 0.3 s once cached, the
    compilation itself on first use ever)."""
    Scanned(b"\n", False)
    kernels().group(np.zeros((1, 4), np.int64), np.ones(1, np.int64), np.zeros(1), np.zeros(1))


class Scanned:
    """What :func:`scan` found in one chunk, as arrays trimmed to size; ``prefixes`` and
    ``reasons`` are the distinct byte strings, ``task`` and ``reason`` index them."""

    def __init__(self, data: bytes | bytearray, perf: bool):
        buf = np.frombuffer(data, np.uint8)
        buf.setflags(write=False)  # bytes and bytearray chunks: one compiled signature
        k = kernels()
        nul = b"\x00" in data
        # rows: a parsed line is over 100 bytes; slow lines are rare (counted when the guess is short)
        parsed_rows, slow_rows = len(data) // 100 + 16, len(data) // SLOW_GUESS + SLOW_MIN
        while True:
            line_of, start_of = np.empty(parsed_rows, np.uint32), np.empty(parsed_rows, np.int64)
            ts, vcpu, info1 = (
                np.empty(parsed_rows, np.float64),
                np.empty(parsed_rows, np.uint32),
                np.empty(parsed_rows, np.uint64),
            )
            task, reason = np.empty(parsed_rows, np.uint32), np.empty(parsed_rows, np.uint32)
            slow = np.empty((slow_rows, 3), np.int64)
            preps, rreps = np.empty((INTERN // 2, 2), np.int64), np.empty((INTERN // 2, 2), np.int64)
            counts = np.zeros(7, np.int64)
            k.scan(
                buf,
                perf,
                nul,
                line_of,
                start_of,
                ts,
                vcpu,
                info1,
                task,
                reason,
                slow,
                np.full(INTERN, -1, np.int32),
                preps,
                np.full(INTERN, -1, np.int32),
                rreps,
                counts,
            )
            if counts[0] >= 0:
                break
            lines = max(k.count_lines(buf), 1)
            parsed_rows, slow_rows = (parsed_rows, lines) if counts[0] == -1 else (lines, slow_rows)
        self.lines, self.headers, self.others, nx, ns, np_, nr = (int(x) for x in counts)
        self.start_of = start_of[:nx]
        self.line_of, self.ts, self.vcpu, self.info1 = line_of[:nx], ts[:nx], vcpu[:nx], info1[:nx]
        self.task, self.reason, self.slow = task[:nx], reason[:nx], slow[:ns]
        self.prefixes = [data[s:e] for s, e in preps[:np_].tolist()]
        self.reasons = [data[s:e] for s, e in rreps[:nr].tolist()]

"""The fast path of ``tdvmcall trace``: one compiled pass over a chunk's bytes.

:func:`scan` walks a newline-aligned chunk (a ``np.frombuffer`` uint8 array) once, byte by byte,
and sorts every line into header/blank, other event, ``kvm_exit`` parsed here, or "slow": a line
this scanner is not sure about, which the caller hands to the reference parser in ``trace.py``
(so every quirk that parser knows stays handled, and nothing is dropped).  The shapes it accepts
are exactly those of ABI.md §7, as ``trace.py`` reads them:

- the line ends at ``\\n``; one trailing ``\\r`` is not part of it (CRLF); a line that is empty or
  starts with ``#``, ``cpus=`` or ``version = `` is a header/blank line unless it is a kvm_exit;
- a line "looks like kvm_exit" when it contains ``kvm_exit:``; it is parsed here when that first
  occurrence is the format's event name (`` kvm_exit:``, perf `` kvm:kvm_exit:``), preceded by
  ``<secs>[.<frac>]:`` and spaces (perf right-aligns event names), followed by spaces and the
  payload ``vcpu %u reason %s%s%s rip 0x%lx info1 0x%016llx info2 0x%016llx intr_info 0x%08x
  error_code 0x%08x`` (``%s%s%s``: the reason name, then `` FAILED_VMENTRY`` or raw hex flags),
  then anything (some trees append `` requests 0x%016llx``);
- everything else that looks like kvm_exit goes to the slow path: a NUL byte or non-ASCII task
  prefix, a timestamp of more than 15 digits (float64 would not hold it exactly), a vCPU of more
  than 9 digits, or any payload that does not have that shape (the slow path counts it unparsed).

The task prefix (``<comm>-<pid> [<cpu>] <flags>``) and the reason text take few distinct values:
the scanner reports each line's prefix and reason as (FNV-1a hash, start, end); the caller parses
each distinct one once (with ``trace.py``'s regexes) and :func:`same_bytes` checks that no two
different byte strings share a hash.  Timestamps are parsed exactly: the digits as an integer
(< 2**53) divided by a power of ten (<= 10**22), both exact, so one IEEE rounding, as ``float()``.

Compiled with ``cache=True`` (into ``__pycache__`` next to this file, or ``NUMBA_CACHE_DIR``: set
below to a user cache directory when the package directory is not writable) and ``nogil=True`` so
that two threads scan two chunks at once.
"""

from __future__ import annotations

import os


def _cache_dir() -> None:
    """Point numba's cache at a user directory when it cannot write next to this file."""
    if "NUMBA_CACHE_DIR" in os.environ or os.access(os.path.dirname(os.path.abspath(__file__)), os.W_OK):
        return
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    os.environ["NUMBA_CACHE_DIR"] = os.path.join(base, "tdvmcall", "numba")


_cache_dir()

import numpy as np  # noqa: E402
from numba import njit  # noqa: E402

#: line kinds
HEADER, OTHER, EXIT, SLOW = 0, 1, 2, 3

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
#: exact powers of ten (a timestamp has at most 15 digits)
_POW10 = np.array([10.0 ** k for k in range(16)])


@njit(cache=True, nogil=True, inline="always")
def _is_hex(c):
    return (48 <= c <= 57) or (97 <= c <= 102)


@njit(cache=True, nogil=True, inline="always")
def _hex_val(c):
    return c - 48 if c <= 57 else c - 87


@njit(cache=True, nogil=True, inline="always")
def _lit(buf, i, e, word):
    """``buf[i:i+len(word)] == word`` within the line end ``e``."""
    n = len(word)
    if i + n > e:
        return False
    for k in range(n):
        if buf[i + k] != word[k]:
            return False
    return True


@njit(cache=True, nogil=True, inline="always")
def _hash(buf, s, e):
    h = _FNV_OFFSET
    for k in range(s, e):
        h = (h ^ np.uint64(buf[k])) * _FNV_PRIME
    return h


@njit(cache=True, nogil=True)
def _payload(buf, p, e, out_i, out_u):
    """Parse the payload at ``p`` (line end ``e``): returns False if it does not have the shape.
    Writes vcpu to ``out_i[0]``, reason start/end to ``out_i[1:3]``, info1 to ``out_u[0]``."""
    # "vcpu " digits{1,9}
    if not _lit(buf, p, e, b"vcpu "):
        return False
    p += 5
    v = 0
    nd = 0
    while p < e and 48 <= buf[p] <= 57:
        v = v * 10 + (buf[p] - 48)
        p += 1
        nd += 1
    if nd == 0 or nd > 9:
        return False
    if not _lit(buf, p, e, b" reason "):
        return False
    p += 8
    rs = p
    # the name: [!-~]+
    while p < e and 33 <= buf[p] <= 126:
        p += 1
    if p == rs:
        return False
    # flags: (" FAILED_VMENTRY" | " 0x" hex+)*, then " rip 0x" hex+
    while True:
        if _lit(buf, p, e, b" rip 0x"):
            break
        if _lit(buf, p, e, b" FAILED_VMENTRY"):
            p += 15
            continue
        if _lit(buf, p, e, b" 0x") and p + 3 < e and _is_hex(buf[p + 3]):
            p += 3
            while p < e and _is_hex(buf[p]):
                p += 1
            continue
        return False
    re_ = p
    p += 7
    q = p
    while p < e and _is_hex(buf[p]):
        p += 1
    if p == q:
        return False
    # " info1 0x" hex{16} " info2 0x" hex{16} " intr_info 0x" hex{8} " error_code 0x" hex{8}
    if not _lit(buf, p, e, b" info1 0x") or p + 9 + 16 > e:
        return False
    p += 9
    info1 = np.uint64(0)
    for k in range(16):
        c = buf[p + k]
        if not _is_hex(c):
            return False
        info1 = (info1 << np.uint64(4)) | np.uint64(_hex_val(c))
    p += 16
    for word, width in ((b" info2 0x", 16), (b" intr_info 0x", 8), (b" error_code 0x", 8)):
        if not _lit(buf, p, e, word) or p + len(word) + width > e:
            return False
        p += len(word)
        for k in range(width):
            if not _is_hex(buf[p + k]):
                return False
        p += width
    out_i[0] = v
    out_i[1] = rs
    out_i[2] = re_
    out_u[0] = info1
    return True


@njit(cache=True, nogil=True)
def scan(buf, perf, line_of, ts, vcpu, info1, prefix, reason, slow):
    """Scan a chunk.  ``perf``: the event name is ``kvm:kvm_exit:`` (else ``kvm_exit:``).

    Per parsed kvm_exit line ``j`` (in order): ``line_of[j]`` (1-based line number in the chunk),
    ``ts``, ``vcpu``, ``info1``, ``prefix[j] = (hash, start, end)``, ``reason[j] = (hash, start,
    end)``.  Per slow line ``k``: ``slow[k] = (line number, start, end)`` (end excludes the
    newline).  The arrays need one row per line.  Returns (lines, header/blank, other events,
    parsed, slow)."""
    n = len(buf)
    i = 0
    lines = 0
    headers = 0
    others = 0
    nx = 0
    ns = 0
    tmp_i = np.zeros(3, np.int64)
    tmp_u = np.zeros(1, np.uint64)
    while i < n:
        start = i
        q = -1
        nul = False
        j = i
        while j < n:
            c = buf[j]
            if c == 10:
                break
            if c == 0:
                nul = True
            elif c == 107 and q < 0 and j + 9 <= n and buf[j + 1] == 118 and buf[j + 2] == 109 \
                    and buf[j + 3] == 95 and buf[j + 4] == 101 and buf[j + 5] == 120 and buf[j + 6] == 105 \
                    and buf[j + 7] == 116 and buf[j + 8] == 58:  # "kvm_exit:"
                q = j
            j += 1
        end = j
        i = j + 1
        lines += 1
        e = end
        if e > start and buf[e - 1] == 13:
            e -= 1
        if nul:
            slow[ns, 0] = lines
            slow[ns, 1] = start
            slow[ns, 2] = end
            ns += 1
            continue
        if q < 0:
            if e == start or buf[start] == 35 or _lit(buf, start, e, b"cpus=") or _lit(buf, start, e, b"version = "):
                headers += 1
            else:
                others += 1
            continue
        ok = False
        # the event name, then back over spaces, ':', the timestamp
        if perf:
            ms = q - 5
            named = ms >= start and _lit(buf, ms, e, b" kvm:")
        else:
            ms = q - 1
            named = ms >= start and buf[ms] == 32
        if named:
            h = ms
            while h > start and buf[h - 1] == 32:
                h -= 1
            if h > start and buf[h - 1] == 58:
                h -= 1
                t = h
                while t > start and (48 <= buf[t - 1] <= 57 or buf[t - 1] == 46):
                    t -= 1
                # <digits>[.<digits>], at most 15 digits in all
                mant = 0
                nd = 0
                frac = -1
                good = t < h
                for k in range(t, h):
                    c = buf[k]
                    if c == 46:
                        if frac >= 0 or nd == 0:
                            good = False
                        frac = 0
                    else:
                        mant = mant * 10 + (c - 48)
                        nd += 1
                        if frac >= 0:
                            frac += 1
                if frac == 0 or nd > 15:
                    good = False
                ascii_prefix = True
                for k in range(start, t):
                    if buf[k] >= 128:
                        ascii_prefix = False
                if good and ascii_prefix:
                    p = q + 9
                    while p < e and buf[p] == 32:
                        p += 1
                    if _payload(buf, p, e, tmp_i, tmp_u):
                        ok = True
                        line_of[nx] = lines
                        ts[nx] = float(mant) / _POW10[max(frac, 0)]
                        vcpu[nx] = tmp_i[0]
                        info1[nx] = tmp_u[0]
                        prefix[nx, 0] = _hash(buf, start, t)
                        prefix[nx, 1] = start
                        prefix[nx, 2] = t
                        reason[nx, 0] = _hash(buf, tmp_i[1], tmp_i[2])
                        reason[nx, 1] = tmp_i[1]
                        reason[nx, 2] = tmp_i[2]
                        nx += 1
        if not ok:
            slow[ns, 0] = lines
            slow[ns, 1] = start
            slow[ns, 2] = end
            ns += 1
    return lines, headers, others, nx, ns


@njit(cache=True, nogil=True)
def same_bytes(buf, spans, rep):
    """Whether every span ``spans[j] = (hash, start, end)`` holds the same bytes as the
    representative span ``rep[j]`` of its hash (i.e. no two byte strings share a hash)."""
    for j in range(len(spans)):
        s, e = spans[j, 1], spans[j, 2]
        rs, re_ = rep[j, 1], rep[j, 2]
        if e - s != re_ - rs:
            return False
        for k in range(e - s):
            if buf[s + k] != buf[rs + k]:
                return False
    return True


class Scanned:
    """The arrays :func:`scan` fills for one chunk, trimmed to what it found."""

    def __init__(self, data: bytes, perf: bool):
        self.buf = np.frombuffer(data, np.uint8)
        rows = data.count(b"\n") + 1
        line_of = np.empty(rows, np.uint32)
        ts = np.empty(rows, np.float64)
        vcpu = np.empty(rows, np.uint32)
        info1 = np.empty(rows, np.uint64)
        prefix = np.empty((rows, 3), np.uint64)
        reason = np.empty((rows, 3), np.uint64)
        slow = np.empty((rows, 3), np.int64)
        (self.lines, self.headers, self.others, nx, ns) = scan(self.buf, perf, line_of, ts, vcpu, info1,
                                                               prefix, reason, slow)
        self.line_of, self.ts, self.vcpu, self.info1 = line_of[:nx], ts[:nx], vcpu[:nx], info1[:nx]
        self.prefix, self.reason, self.slow = prefix[:nx], reason[:nx], slow[:ns]

    def distinct(self, spans: np.ndarray) -> tuple[list[bytes], np.ndarray] | None:
        """The distinct byte strings of ``spans`` and each span's index among them, or ``None``
        if two different strings share a hash (then the caller takes the slow path)."""
        hashes, first, index = np.unique(spans[:, 0], return_index=True, return_inverse=True)
        rep = spans[first]
        if not same_bytes(self.buf, spans, rep[index]):
            return None
        return [bytes(self.buf[int(s):int(e)]) for _, s, e in rep], index

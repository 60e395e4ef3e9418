"""The fast path of ``tdvmcall trace``: the compiled kernels (numba), one pass over a chunk's bytes.

:func:`scan` walks a newline-aligned chunk (a ``np.frombuffer`` uint8 array) once (eight bytes at a
time where a word holds no newline and no ``k``, else byte by byte), and sorts every line into
header/blank, other event, ``kvm_exit`` parsed here, or "slow": a line this scanner is not sure
about, which the caller hands to the reference parser (``reference.py``)
(so every quirk that parser knows stays handled, and nothing is dropped).  The shapes it accepts
are exactly those of docs/abi.md §7, as the reference parser (``reference.py``) reads them:

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
  than 9 digits (the slow path counts it unparsed too), or any payload that does not have that
  shape (the slow path counts it unparsed).

The task prefix (``<comm>-<pid> [<cpu>] <flags>``) and the reason text take few distinct values:
the scanner interns them (an open-addressing table keyed by FNV-1a hash, entries compared byte
for byte, so no two strings are ever confused) and the caller parses each distinct one once, with
``rows.py``'s regexes (``parse_prefix``, ``parse_reason``).  Timestamps are parsed exactly: the digits as an integer (< 2**53) divided
by a power of ten (<= 10**15), both exact, so one IEEE rounding, as ``float()`` does.

``scan.py`` runs them.  Compiled with ``cache=True`` (into ``__pycache__`` next to this
file, or ``NUMBA_CACHE_DIR``, set below to a user cache directory when the package directory is
not writable) and ``nogil=True``: two threads scan two chunks at once.
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

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_MIX = np.uint64(0xFF51AFD7ED558CCD)
#: SWAR constants: a byte repeated over a word
_ONES, _HIGH = np.uint64(0x0101010101010101), np.uint64(0x8080808080808080)
_NEWLINES, _KS = np.uint64(0x0A0A0A0A0A0A0A0A), np.uint64(0x6B6B6B6B6B6B6B6B)
#: exact powers of ten (a timestamp has at most 15 digits)
_POW10 = np.array([10.0**k for k in range(16)])


def _word(text: str) -> np.ndarray:
    """A literal as a uint8 array (a global array is a constant to numba; a bytes literal would
    be allocated at every call)."""
    return np.frombuffer(text.encode(), np.uint8).copy()


_KVM_EXIT = _word("kvm_exit:")
_PERF_SYSTEM = _word(" kvm:")
_CPUS, _VERSION = _word("cpus="), _word("version = ")
_VCPU, _REASON, _RIP = _word("vcpu "), _word(" reason "), _word(" rip 0x")
_FAILED, _HEX = _word(" FAILED_VMENTRY"), _word(" 0x")
_INFO1, _INFO2, _INTR, _ERROR = _word(" info1 0x"), _word(" info2 0x"), _word(" intr_info 0x"), _word(" error_code 0x")


@njit(cache=True, nogil=True, inline="always")
def _is_hex(c):
    return (48 <= c <= 57) or (97 <= c <= 102)


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
def _hex_field(buf, p, e, word, width):
    """``word`` then exactly ``width`` hex digits at ``p``: the position after them, or -1."""
    if not _lit(buf, p, e, word) or p + len(word) + width > e:
        return -1
    p += len(word)
    for k in range(width):
        if not _is_hex(buf[p + k]):
            return -1
    return p + width


@njit(cache=True, nogil=True, inline="always")
def _load8(buf, a):
    """The 8 bytes at ``a`` as one little-endian word (an unaligned load)."""
    return (
        np.uint64(buf[a])
        | (np.uint64(buf[a + 1]) << np.uint64(8))
        | (np.uint64(buf[a + 2]) << np.uint64(16))
        | (np.uint64(buf[a + 3]) << np.uint64(24))
        | (np.uint64(buf[a + 4]) << np.uint64(32))
        | (np.uint64(buf[a + 5]) << np.uint64(40))
        | (np.uint64(buf[a + 6]) << np.uint64(48))
        | (np.uint64(buf[a + 7]) << np.uint64(56))
    )


@njit(cache=True, nogil=True, inline="always")
def _has_byte(x, pattern):
    """Non-zero if a byte of the word ``x`` may equal the byte repeated in ``pattern`` (never
    zero when one does; a non-zero answer is then checked byte by byte)."""
    v = x ^ pattern
    return (v - _ONES) & ~v & _HIGH


@njit(cache=True, nogil=True)
def _intern(buf, s, e, slots, reps, count):
    """The id of the byte string ``buf[s:e]`` among those seen (``reps[id] = (start, end)`` of
    its first occurrence; ``slots`` an open-addressing table of ids by an FNV-1a hash taken a
    word at a time, then mixed (MurmurHash3's finaliser) so that every byte reaches the slot);
    -1 when the table is full or a new string is not ASCII (checked once per distinct string,
    not once per line)."""
    h = _FNV_OFFSET ^ np.uint64(e - s)
    k = s
    while k + 8 <= e:
        h = (h ^ _load8(buf, k)) * _FNV_PRIME
        k += 8
    while k < e:
        h = (h ^ np.uint64(buf[k])) * _FNV_PRIME
        k += 1
    h ^= h >> np.uint64(33)
    h *= _MIX
    h ^= h >> np.uint64(33)
    mask = len(slots) - 1
    i = np.int64(h & np.uint64(mask))
    while True:
        rid = slots[i]
        if rid < 0:
            rid = count[0]
            if 2 * rid >= len(slots):
                return -1  # full: the caller takes the slow path for this line
            for k in range(s, e):
                if buf[k] >= 128:
                    return -1  # not ASCII: the slow path (checked once per distinct string)
            count[0] += 1
            slots[i] = rid
            reps[rid, 0] = s
            reps[rid, 1] = e
            return rid
        rs, re_ = reps[rid, 0], reps[rid, 1]
        if re_ - rs == e - s:
            same = True
            k = 0
            while k + 8 <= e - s:
                if _load8(buf, rs + k) != _load8(buf, s + k):
                    same = False
                    break
                k += 8
            while same and k < e - s:
                if buf[rs + k] != buf[s + k]:
                    same = False
                k += 1
            if same:
                return rid
        i = (i + 1) & mask


@njit(cache=True, nogil=True)
def count_lines(buf):
    """The number of lines (newlines, plus one for a last line without one)."""
    n = 0
    for c in buf:
        if c == 10:
            n += 1
    return n + (len(buf) > 0 and buf[-1] != 10)


@njit(cache=True, nogil=True)
def _payload(buf, p, e, out):
    """Parse the payload at ``p`` (line end ``e``); False if it does not have the shape.
    ``out`` receives vcpu, reason start, reason end, and info1 (as int64 bits)."""
    if not _lit(buf, p, e, _VCPU):
        return False
    p += 5
    v = 0
    nd = 0
    while p < e and 48 <= buf[p] <= 57:
        v = v * 10 + (buf[p] - 48)
        p += 1
        nd += 1
    if nd == 0 or nd > 9 or not _lit(buf, p, e, _REASON):
        return False
    p += 8
    rs = p
    while p < e and 33 <= buf[p] <= 126:  # the name: [!-~]+
        p += 1
    if p == rs:
        return False
    while not _lit(buf, p, e, _RIP):  # flags: (" FAILED_VMENTRY" | " 0x" hex+)*
        if _lit(buf, p, e, _FAILED):
            p += 15
        elif _lit(buf, p, e, _HEX) and p + 3 < e and _is_hex(buf[p + 3]):
            p += 3
            while p < e and _is_hex(buf[p]):
                p += 1
        else:
            return False
    re_ = p
    p += 7
    q = p
    while p < e and _is_hex(buf[p]):
        p += 1
    if p == q:
        return False
    i1 = p + 9
    p = _hex_field(buf, p, e, _INFO1, 16)
    if p < 0:
        return False
    p = _hex_field(buf, p, e, _INFO2, 16)
    if p < 0:
        return False
    p = _hex_field(buf, p, e, _INTR, 8)
    if p < 0 or _hex_field(buf, p, e, _ERROR, 8) < 0:
        return False
    info1 = np.uint64(0)
    for k in range(i1, i1 + 16):
        c = buf[k]
        info1 = (info1 << np.uint64(4)) | np.uint64(c - 48 if c <= 57 else c - 87)
    out[0] = v
    out[1] = rs
    out[2] = re_
    out[3] = np.int64(info1)
    return True


@njit(cache=True, nogil=True)
def _timestamp(buf, t, h):
    """``buf[t:h]`` as ``<digits>[.<digits>]`` of at most 15 digits: its value, or -1."""
    mant = 0
    nd = 0
    frac = -1
    for k in range(t, h):
        c = buf[k]
        if c == 46:
            if frac >= 0 or nd == 0:
                return -1.0
            frac = 0
        else:
            mant = mant * 10 + (c - 48)
            nd += 1
            if frac >= 0:
                frac += 1
    if nd == 0 or frac == 0 or nd > 15:
        return -1.0
    return float(mant) / _POW10[max(frac, 0)]


@njit(cache=True, nogil=True)
def scan(buf, perf, nul, line_of, start_of, ts, vcpu, info1, task, reason, slow, pslots, preps, rslots, rreps, counts):
    """Scan a chunk.  ``perf``: the event name is ``kvm:kvm_exit:`` (else ``kvm_exit:``); ``nul``:
    the chunk holds a NUL byte somewhere (then lines are checked for it).

    Per parsed kvm_exit line ``j`` (in order): ``line_of[j]`` (1-based line number in the chunk),
    ``start_of[j]`` (its offset), ``ts``, ``vcpu``, ``info1``, ``task[j]`` the id of its prefix
    (``preps[id]`` = its (start, end)),
    ``reason[j]`` the id of its reason text (``rreps``).  Per slow line ``k``: ``slow[k] = (line
    number, start, end)`` (end excludes the newline).  ``counts`` receives: lines, header/blank,
    other events, parsed, slow, distinct prefixes, distinct reasons; lines = -1 (-2) when the chunk
    holds more slow (parsed) lines than ``slow`` (``line_of`` ...) has rows: nothing else is then
    meaningful."""
    n = len(buf)
    i = 0
    lines = headers = others = nx = ns = 0
    out = np.zeros(4, np.int64)
    pcount = np.zeros(1, np.int64)
    rcount = np.zeros(1, np.int64)
    words = buf[: n - n % 8].view(np.uint64)
    while i < n:
        start = i
        q = -1
        j = i
        while j < n:
            # a word at a time while it holds no newline and (until kvm_exit: is found) no "k"
            if j & 7 == 0 and j + 8 <= n:
                x = words[j >> 3]
                if _has_byte(x, _NEWLINES) == 0 and (q >= 0 or _has_byte(x, _KS) == 0):
                    j += 8
                    continue
            c = buf[j]
            if c == 10:
                break
            if c == 107 and q < 0 and _lit(buf, j, n, _KVM_EXIT):
                q = j
            j += 1
        end = j
        i = j + 1
        lines += 1
        e = end - 1 if end > start and buf[end - 1] == 13 else end
        if nul:
            has_nul = False
            for k in range(start, end):
                if buf[k] == 0:
                    has_nul = True
            if has_nul:
                q = -2  # the reference parser reads NUL as U+FFFD
        if q == -1:
            if e == start or buf[start] == 35 or _lit(buf, start, e, _CPUS) or _lit(buf, start, e, _VERSION):
                headers += 1
            else:
                others += 1
            continue
        ok = False
        if q >= 0:
            # the event name, then back over spaces, ':' and the timestamp
            ms = q - 5 if perf else q - 1
            if ms >= start and (_lit(buf, ms, e, _PERF_SYSTEM) if perf else buf[ms] == 32):
                h = ms
                while h > start and buf[h - 1] == 32:
                    h -= 1
                if h > start and buf[h - 1] == 58:
                    h -= 1
                    t = h
                    while t > start and (48 <= buf[t - 1] <= 57 or buf[t - 1] == 46):
                        t -= 1
                    stamp = _timestamp(buf, t, h)
                    p = q + 9
                    while p < e and buf[p] == 32:
                        p += 1
                    if stamp >= 0 and _payload(buf, p, e, out):
                        tid = _intern(buf, start, t, pslots, preps, pcount)
                        rid = _intern(buf, out[1], out[2], rslots, rreps, rcount)
                        if tid >= 0 and rid >= 0:
                            if nx == len(line_of):  # fewer rows than parsed lines: called again
                                counts[0] = -2
                                return
                            ok = True
                            line_of[nx] = lines
                            start_of[nx] = start
                            ts[nx] = stamp
                            vcpu[nx] = out[0]
                            info1[nx] = np.uint64(out[3])
                            task[nx] = tid
                            reason[nx] = rid
                            nx += 1
        if not ok:
            if ns == len(slow):  # fewer rows than slow lines: the caller counts lines, calls again
                counts[0] = -1
                return
            slow[ns, 0] = lines
            slow[ns, 1] = start
            slow[ns, 2] = end
            ns += 1
    counts[0] = lines
    counts[1] = headers
    counts[2] = others
    counts[3] = nx
    counts[4] = ns
    counts[5] = pcount[0]
    counts[6] = rcount[0]


@njit(cache=True, nogil=True)
def group(keys, n, lo, hi):
    """Merge the rows of ``keys`` (int64, rows x columns) that are equal: for each group, the row
    that opened it, the sum of ``n`` over its rows, the least ``lo`` and the greatest ``hi``; and
    for each row, its group."""
    rows, width = keys.shape
    cap = 1 << 4
    while cap < 2 * rows:
        cap <<= 1
    slots = np.full(cap, -1, np.int64)
    first = np.empty(rows, np.int64)
    total = np.zeros(rows, np.int64)
    least = np.empty(rows, np.float64)
    greatest = np.empty(rows, np.float64)
    of_row = np.empty(rows, np.int64)
    groups = 0
    for r in range(rows):
        h = _FNV_OFFSET
        for c in range(width):
            h = (h ^ np.uint64(keys[r, c])) * _FNV_PRIME
        h ^= h >> np.uint64(33)  # every bit of every key reaches the slot (masks' low bytes are 0)
        h *= _MIX
        h ^= h >> np.uint64(33)
        i = np.int64(h & np.uint64(cap - 1))
        while True:
            g = slots[i]
            if g < 0:
                g = groups
                groups += 1
                slots[i] = g
                first[g] = r
                least[g] = lo[r]
                greatest[g] = hi[r]
                break
            same = True
            for c in range(width):
                if keys[first[g], c] != keys[r, c]:
                    same = False
                    break
            if same:
                break
            i = (i + 1) & (cap - 1)
        of_row[r] = g
        total[g] += n[r]
        least[g] = min(least[g], lo[r])
        greatest[g] = max(greatest[g], hi[r])
    return first[:groups], total[:groups], least[:groups], greatest[:groups], of_row

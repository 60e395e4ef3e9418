"""The deep engine: micro-execution (unicorn) of what the fast path (flow.py) leaves unresolved.

For a TDCALL whose deciding registers the straight-line data flow could not recover, the code that
makes the call is *run*: unicorn (the QEMU-based CPU emulator) executes the image from a function's
entry with a fresh stack, up to the TDCALL, and the registers are read there.  Nothing about the
machine is assumed: every register, every byte of writable data (``.data``, ``.bss``), every page
outside the image and the fresh stack are filled with random bytes, and each start is run twice with
two different fillings.  **A value is trusted only when it is the same in both runs**: a value that
depends on anything the image does not fix (a parameter, a global's runtime contents, memory behind
a pointer the caller passed) differs between the fillings and stays unresolved.  What the code
computes from its own constants (a struct filled on the stack and passed by pointer, a register
copied, a callee's return value such as a bitflags ``union``, a ``memcpy`` of a constant block, a
call through the PLT/GOT) is the same in both runs and is what the real guest puts in the register.

Each start is run with the TDVMCALL's status (R10 on return) 0 and then 1 (TDG.VP.VMCALL_RETRY), so
that the retry and error paths are reached too; TDG.VP.INFO answers a GPAW of 48 in one filling and
52 in the other (a value derived from it is not trusted either).  The TDCALL itself (``66 0F 01 CC``)
is not an instruction unicorn decodes: the run stops on it, the registers are recorded with the call
stack (a shadow stack kept from basic-block entries: which ``call`` instructions led here), the
outputs the ABI lets the host write are filled at random and the run resumes after it.  A call to an
address outside the image (an undefined symbol of a ``.o``, a shared object's import, a function
pointer read from unknown memory) returns at once with the volatile registers filled at random;
``memcpy``, ``memmove`` and ``memset`` imports are carried out.  Runs are bounded (instructions,
TDCALLs per run, wall time).

Where the runs start: the function holding the TDCALL, then its callers, then theirs, up to
:data:`MAX_DEPTH` levels: direct ``call``/``jmp`` targets over the whole relocated image (across
sections, and through a shared object's PLT), function starts from symbols (``STT_FUNC`` and global
assembly labels), else from the fast path's start finding.  A caller level is only climbed while a
deciding register is still unresolved.

The loader is this module's own (``struct``), as the rest of scan's readers: ELF executables and
shared objects are mapped by section at their addresses (``R_X86_64_RELATIVE``/``GLOB_DAT``/
``JUMP_SLOT``/``64`` applied, imports bound to return stubs), relocatable objects are laid out
section after section with their ``.rela`` sections applied (``PC32``, ``PLT32``, ``32``, ``32S``,
``64``, ``PC64``, and ``GOTPCREL``/``GOTPCRELX``/``REX_GOTPCRELX`` through a GOT it builds), PE/TE
images are mapped by RVA.  (cle, angr's loader, was measured for this and not taken: on Python 3.11
its pyvex dependency does not import without pinning ``bitstring<5``; docs/scan.md.)

Formats: the System V x86-64 psABI (relocation types, §4.4), the ELF gABI; Intel's GHCI 1.5 (§2.4:
TDG.VP.VMCALL's register use and R10's return codes) and the TDX module ABI (TDG.VP.INFO's outputs).
"""

from __future__ import annotations

import bisect
import random
import struct
import time
from dataclasses import dataclass, field

import iced_x86 as ix
import numpy as np

from .containers import TDCALL, Code
from .flow import Region, le_i32, reg_name

try:  # optional: without unicorn the fast path's answer stands (said once per image)
    import unicorn as uc
    from unicorn import x86_const as X
except ImportError:  # pragma: no cover - unicorn is a dependency; this keeps scan usable without it
    uc = None  # type: ignore[assignment]
    X = None  # type: ignore[assignment]

U64 = (1 << 64) - 1
PAGE = 0x1000
#: unicorn runs without paging: a memory access goes to the address cut to 52 bits (the physical
#: width), so pages are mapped there and named back by sign-extending bit 51 (kernel addresses)
PHYS = (1 << 52) - 1


def phys(a: int) -> int:
    return a & PHYS


def virt(p: int) -> int:
    return p | (U64 & ~PHYS) if p >> 51 & 1 else p


#: caller levels the runs may start from (0: the function holding the TDCALL itself)
MAX_DEPTH = 4
#: instructions one run may execute (per resume after a TDCALL), TDCALLs it may hit, seconds it may take
MAX_INSNS = 20_000
#: basic blocks one run may enter, over all its resumes (about as many instructions again ×5)
MAX_BLOCKS = 6_000
MAX_HITS = 24
#: pages one run may map (the image's, the stack's, random ones): past it the run ends, so a string
#: instruction whose count came from random bytes stops at the same point whatever the machine's load
MAX_PAGES = 256
RUN_SECONDS = 0.5
#: runs one image may make in all (each start is run 4 times: two fillings, two statuses)
MAX_STARTS = 400
#: the fresh stack, the return address of the start, and the stubs standing for code outside the image
STACK_TOP = 0x7FFF_FF00_0000
SENTINEL = 0x7D00_0000_0000
REGS = ("rax", "rcx", "r10", "r11", "r12", "r13")
#: runs per start and status, each with its own random filling; a call path must be reached by two
#: of them at least, with the same value in every run that reached it
FILLS = 4
#: conditional jumps per call path that are forced each way (more: the path is not run whole)
MAX_FORKS = 6
#: conditions elsewhere on the runs (callees) forced each way too, when there are no more than these
MAX_EXTRA = 8
#: the fillings: bytes at random (seeded), and two that make comparisons with 0 and -1 go the other
#: way (``test edi, edi; jz``, a sign test) so a value that holds on one path only differs
PATTERNS = (None, 0x00, 0xFF, None)
#: registers a call may change (the union of the System V and Microsoft x64 volatile registers)
VOLATILE = ("rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11")
#: imports carried out rather than stubbed
MEMCPY = frozenset({"memcpy", "memmove", "__memcpy_chk", "__memmove_chk", "bcopy"})
MEMSET = frozenset({"memset", "__memset_chk"})
#: sections whose writable contents are fixed once the image is loaded (relocated pointers)
FIXED_WRITABLE = (".got", ".got.plt", ".data.rel.ro", ".init_array", ".fini_array", ".dynamic", ".idata")

SHF_WRITE, SHF_ALLOC, SHF_EXECINSTR = 0x1, 0x2, 0x4
ENDBR64 = b"\xf3\x0f\x1e\xfa"
SHT_PROGBITS, SHT_SYMTAB, SHT_RELA, SHT_NOBITS, SHT_DYNSYM = 1, 2, 4, 8, 11
STT_NOTYPE, STT_FUNC, STT_SECTION = 0, 2, 3
SHN_UNDEF, SHN_ABS, SHN_COMMON = 0, 0xFFF1, 0xFFF2


class Unsupported(Exception):
    """An image the engine cannot load (said once, the fast path's answer stands)."""


# --- the loaded image --------------------------------------------------------------------------------
@dataclass
class Section:
    name: str
    addr: int
    data: bytes  # relocated bytes (b"" for NOBITS)
    size: int
    fixed: bool  # contents known at load time (code, read-only data, relocated pointers)
    exec: bool
    file_index: int = -1


@dataclass
class Loaded:
    """An image as the engine runs it: sections at their run addresses, function names and starts,
    import stubs, and the map from each analysed code region's addresses to the run addresses."""

    sections: list[Section]
    functions: dict[int, str] = field(default_factory=dict)
    sizes: dict[int, int] = field(default_factory=dict)
    stubs: dict[int, str] = field(default_factory=dict)  # stub address -> import name
    fixed_slots: dict[int, bytes] = field(default_factory=dict)  # relocated slots in writable data
    aliases: dict[int, int] = field(default_factory=dict)  # PLT entry -> the function it reaches
    notes: list[str] = field(default_factory=list)
    _starts: list[int] = field(default_factory=list)
    _regions: list[tuple[int, int, Region]] = field(default_factory=list)
    _calls: tuple[np.ndarray, np.ndarray] | None = None

    def section_at(self, addr: int) -> Section | None:
        for s in self.sections:
            if s.addr <= addr < s.addr + s.size:
                return s
        return None

    def page(self, base: int, rng: random.Random) -> bytes:
        """The 4 KiB at ``base``: the image's fixed bytes where it has some, else random bytes."""
        buf = bytearray(rng.randbytes(PAGE))
        for s in self.sections:
            lo, hi = max(s.addr, base), min(s.addr + s.size, base + PAGE)
            if lo >= hi or not s.fixed:
                continue
            chunk = s.data[lo - s.addr : hi - s.addr]
            buf[lo - base : lo - base + len(chunk)] = chunk
        if self.fixed_slots:
            for a, b in self.fixed_slots.items():
                if base <= a < base + PAGE:
                    n = min(len(b), base + PAGE - a)
                    buf[a - base : a - base + n] = b[:n]
        return bytes(buf)

    def page_fixed(self, base: int) -> bool:
        """Whether every byte of the page at ``base`` is in a fixed section (and no relocated slot
        of writable data is in it): the same in every run."""
        covered = 0
        for s in self.sections:
            lo, hi = max(s.addr, base), min(s.addr + s.size, base + PAGE)
            if lo < hi:
                if not s.fixed:
                    return False
                covered += hi - lo
        return covered >= PAGE

    def page_code(self, base: int) -> bool:
        """Whether the page at ``base`` holds some of the image's code."""
        return any(s.exec and s.addr < base + PAGE and base < s.addr + s.size for s in self.sections)

    def in_image(self, addr: int) -> bool:
        return self.section_at(addr) is not None

    # -- code structure, in run addresses --
    def regions(self) -> list[tuple[int, int, Region]]:
        if not self._regions:
            for s in self.sections:
                if s.exec and s.data:
                    fn = {a: n for a, n in self.functions.items() if s.addr <= a < s.addr + s.size}
                    code = Code([s.name], s.data, s.addr, 64, fn, {a: self.sizes[a] for a in fn if a in self.sizes})
                    self._regions.append((s.addr, s.addr + s.size, Region.of(code)))
        return self._regions

    def region(self, addr: int) -> Region | None:
        for lo, hi, r in self.regions():
            if lo <= addr < hi:
                return r
        return None

    def callers(self, target: int) -> list[int]:
        """Addresses of direct ``call``/``jmp rel32`` instructions to ``target`` (or to a PLT entry
        that reaches it), anywhere in the image's code."""
        execs = [s for s in self.sections if s.exec and s.data]
        base = min((s.addr for s in execs), default=0)  # offsets from it: kernel addresses pass int64
        if self._calls is None:
            tg, src = [], []
            for s in execs:
                if not (s.exec and s.data):
                    continue
                arr = np.frombuffer(s.data, dtype=np.uint8)
                n = len(arr)
                for opcode in (0xE8, 0xE9):
                    pos = np.flatnonzero(arr[: max(n - 4, 0)] == opcode)
                    rel = le_i32(arr, pos + 1)
                    tg.append(pos + 5 + rel + (s.addr - base))
                    src.append(pos + (s.addr - base))
                # call/jmp qword [rip+disp] through a GOT slot the loader filled (Rust's -Z plt=no,
                # gcc's -fno-plt, a static PIE's relocated GOT)
                slots = self.got_slots()
                if slots and not s.name.startswith(".plt"):  # a PLT entry's jump is an alias, not a caller
                    pos = np.flatnonzero((arr[: max(n - 5, 0)] == 0xFF) & np.isin(arr[1 : max(n - 4, 1)], (0x15, 0x25)))
                    disp = le_i32(arr, pos + 2)
                    for p_, sl in zip(pos.tolist(), (pos + 6 + disp + s.addr).tolist()):
                        if (tgt := slots.get(sl)) is not None:
                            tg.append(np.array([tgt - base], np.int64))
                            src.append(np.array([p_ + s.addr - base], np.int64))
                    # mov reg, [rip+slot] then call reg (the compiler hoisted the GOT load out of a loop)
                    keys = np.array(sorted(slots), dtype=np.uint64)
                    pos = np.flatnonzero(
                        np.isin(arr[: max(n - 6, 0)], (0x48, 0x4C))
                        & (arr[1 : max(n - 5, 1)] == 0x8B)
                        & ((arr[2 : max(n - 4, 2)] & 0xC7) == 0x05)
                    )
                    disp = le_i32(arr, pos + 3)
                    sl = (pos + 7 + disp + s.addr).astype(np.uint64)
                    hit = np.isin(sl, keys)
                    for p_, slot in zip(pos[hit].tolist(), sl[hit].tolist()):
                        for c in self._register_calls(s, p_):
                            tg.append(np.array([slots[int(slot)] - base], np.int64))
                            src.append(np.array([c - base], np.int64))
            t = np.concatenate(tg) if tg else np.zeros(0, np.int64)
            s_ = np.concatenate(src) if src else np.zeros(0, np.int64)
            order = np.argsort(t, kind="stable")
            self._calls = (t[order], s_[order])
        t, s_ = self._calls
        out: list[int] = []
        for want in [target, *[p for p, f in self.aliases.items() if f == target]]:
            lo = int(np.searchsorted(t, want - base, "left"))
            hi = int(np.searchsorted(t, want - base, "right"))
            out += [int(x) + base for x in s_[lo:hi]]
        return out

    def _register_calls(self, s: Section, at: int) -> list[int]:
        """The ``call reg`` instructions that follow the ``mov reg, [rip+slot]`` at offset ``at`` of
        section ``s`` (up to 512 bytes on, in address order, until the register is written again or
        a ``ret``).  A wrong guess costs runs, never a value: a run's call path must go through it."""
        out: list[int] = []
        dec = ix.Decoder(64, s.data[at : at + 512], ip=s.addr + at)
        first = next(iter(dec), None)
        if first is None:
            return out
        reg = reg_name(first.op0_register)
        for ins in dec:
            if ins.flow_control == ix.FlowControl.INDIRECT_CALL and ins.op0_kind == ix.OpKind.REGISTER:
                if reg_name(ins.op0_register) == reg:
                    out.append(ins.ip)
                continue
            if ins.flow_control in (ix.FlowControl.RETURN, ix.FlowControl.INTERRUPT, ix.FlowControl.EXCEPTION):
                break
            w = _written(ins) if ins.flow_control == ix.FlowControl.NEXT else set()
            if w is not None and reg in w:
                break
        return out

    def got_slots(self) -> dict[int, int]:
        """Relocated 8-byte slots (a GOT) that hold an address in the image's code."""
        out = {}
        for a, b in self.fixed_slots.items():
            if len(b) == 8:
                v = int.from_bytes(b, "little")
                sec = self.section_at(v)
                if sec is not None and sec.exec:
                    out[a] = v
        return out

    def function_of(self, addr: int) -> tuple[int, str, bool] | None:
        """The start and name of the function holding the instruction at ``addr`` (decoded from that
        start), and whether it is a function's start (else the first instruction after the last
        ``ret``/``jmp`` before ``addr``: a run may start there, no caller is looked for)."""
        r = self.region(addr)
        if r is None:
            return None
        if self.functions:
            # a symbol before it, with no other between, from which the decoding lands on it: its
            # function (an assembly label with no size may hold a jmp before the site)
            if not self._starts:
                self._starts = sorted(self.functions)
            i = bisect.bisect_right(self._starts, addr) - 1
            if i >= 0:
                s = self._starts[i]
                size = self.sizes.get(s)
                if addr - s < 1 << 16 and (not size or addr < s + size) and r.decode(s, addr) is not None:
                    return s, self.functions[s], True
        fn = r.function(addr)
        if fn is None:
            return None
        return fn.start, fn.name, fn.exact

    def block_start(self, addr: int) -> int | None:
        """Where the straight-line code that ends at ``addr`` begins: after the last branch before it
        in its function, or at the last jump target between (a run from there is on every path to
        ``addr`` that enters the block, so the values it pins are the call's whatever the path)."""
        r = self.region(addr)
        f = self.function_of(addr)
        if r is None or f is None:
            return None
        insns = r.decode(f[0], addr)
        if not insns:
            return None
        start = insns[0].ip
        for ins in insns[:-1]:
            if ins.flow_control in _BRANCHES:
                start = ins.next_ip
        for ins in insns[:-1]:
            t = ins.near_branch_target if ins.flow_control in _BRANCHES else 0
            if start < t <= addr:
                start = t
        return start

    def merges(self, start: int, addr: int) -> frozenset[str] | None:
        """The registers two paths from ``start`` may leave different where they meet before
        ``addr``: those written by the instructions a forward jump goes past (up to ``addr``); None
        when it cannot be told (memory written or a call on a skipped path, an indirect jump).  A run
        sees one path: a value of such a register may hold on that path only, whatever the runs saw.
        (A jump over an ``sti`` or a ``nop`` changes nothing.)"""
        r = self.region(addr)
        insns = r.decode(start, addr) if r is not None else None
        if not insns:
            return None
        out: set[str] = set()
        for ins in insns[:-1]:
            if ins.flow_control == ix.FlowControl.INDIRECT_BRANCH:
                return None
            if _conditional_value(ins):
                w = _written(ins)
                if w is None:
                    return None
                out |= w
            if ins.flow_control in _BRANCHES and ins.next_ip < ins.near_branch_target <= addr:
                for i in insns:
                    if ins.next_ip <= i.ip < ins.near_branch_target:
                        w = _written(i)
                        if w is None:
                            return None
                        out |= w
        return frozenset(out)

    def forks(self, start: int, addr: int) -> tuple[int, ...] | None:
        """The conditions from ``start`` to ``addr`` a value may depend on: conditional jumps whose
        two ways may meet again before ``addr`` (a forward jump landing at or before it), and
        ``cmovcc``/``setcc``; None past :data:`MAX_FORKS` or when the code cannot be decoded.  The
        runs are made again with each forced each way."""
        r = self.region(addr)
        insns = r.decode(start, addr) if r is not None else None
        if not insns:
            return None
        out = [
            i.ip
            for i in insns[:-1]
            if (i.flow_control == ix.FlowControl.CONDITIONAL_BRANCH and i.next_ip < i.near_branch_target <= addr)
            or _conditional_value(i)
        ]
        if any(i.flow_control == ix.FlowControl.INDIRECT_BRANCH for i in insns[:-1]) or len(out) > MAX_FORKS:
            return None
        return tuple(out)

    def is_call(self, addr: int) -> bool:
        """Whether the branch at ``addr`` is a ``call`` (not a tail-call ``jmp``: no return address)."""
        s = self.section_at(addr)
        if s is None:
            return False
        ins = next(iter(ix.Decoder(64, s.data[addr - s.addr : addr - s.addr + 15], ip=addr)), None)
        return ins is not None and ins.flow_control in _CALLS


def _cstr(b: bytes, i: int) -> str:
    end = b.find(b"\0", i)
    return b[i : end if end >= 0 else len(b)].decode(errors="replace")


def load_elf(data: bytes) -> Loaded:
    if data[4] != 2 or data[5] != 1:
        raise Unsupported("only 64-bit little-endian ELF is run")
    (etype,) = struct.unpack_from("<H", data, 16)
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    hdrs = []
    for i in range(shnum):
        hdrs.append(struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize))
    if not hdrs:
        raise Unsupported("no section headers")
    shstr = data[hdrs[shstrndx][4] : hdrs[shstrndx][4] + hdrs[shstrndx][5]] if shstrndx < len(hdrs) else b""
    names = [_cstr(shstr, h[0]) for h in hdrs]
    rel = etype == 1
    # run addresses: the sections' own for executables and shared objects; laid out for a .o
    addrs: dict[int, int] = {}
    at = 0x40_0000
    for i, h in enumerate(hdrs):
        _n, typ, flags, addr, _off, size, _l, _info, align, _e = h
        if not flags & SHF_ALLOC or not size:
            continue
        if rel:
            a = max(align, 16)
            at = (at + a - 1) // a * a
            addrs[i] = at
            at += size
        else:
            addrs[i] = addr
    images: dict[int, bytearray] = {}
    for i in addrs:
        _n, typ, _f, _a, off, size, *_ = hdrs[i]
        images[i] = bytearray(b"" if typ == SHT_NOBITS else data[off : off + size])
    out = Loaded([])
    stubs: dict[str, int] = {}
    # import stubs, a .o's GOT and COMMON symbols: just past the image (a rel32 must reach them)
    end = max((addrs[i] + hdrs[i][5] for i in addrs), default=0x40_0000)
    STUBS = (end + 0x20_0000) & ~0xF_FFFF
    SYNTH = STUBS + 0x10_0000

    def stub(name: str) -> int:
        if name not in stubs:
            stubs[name] = STUBS + 16 * len(stubs)
            out.stubs[stubs[name]] = name
        return stubs[name]

    def symtab(k: int) -> list[tuple[str, int, int, int, int]]:
        h = hdrs[k]
        strs = data[hdrs[h[6]][4] : hdrs[h[6]][4] + hdrs[h[6]][5]]
        tab = data[h[4] : h[4] + h[5]]
        rows = []
        for nm, info, _o, shndx, value, size in struct.iter_unpack("<IBBHQQ", tab[: len(tab) // 24 * 24]):
            rows.append((_cstr(strs, nm), info, shndx, value, size))
        return rows

    syms: dict[int, list[tuple[str, int, int, int, int]]] = {}
    for k, h in enumerate(hdrs):
        if h[1] in (SHT_SYMTAB, SHT_DYNSYM):
            syms[k] = symtab(k)
    common = SYNTH + 0x100_0000

    def sym_value(k: int, idx: int) -> tuple[int, str]:
        nonlocal common
        name, _info, shndx, value, size = syms[k][idx]
        if shndx == SHN_UNDEF:
            return stub(name or f"#{idx}"), name
        if shndx == SHN_ABS:
            return value, name
        if shndx == SHN_COMMON:
            common += max(size, 8) + 15 & ~15
            return common, name
        if rel:
            if shndx not in addrs:
                return stub(name or f"#{idx}"), name
            return addrs[shndx] + value, name
        return value, name

    # function names and starts (symtab, else dynsym)
    for want in (SHT_SYMTAB, SHT_DYNSYM):
        for k, rows in syms.items():
            if hdrs[k][1] != want:
                continue
            for name, info, shndx, value, size in rows:
                kind, bind = info & 0xF, info >> 4
                if shndx in (SHN_UNDEF, SHN_ABS, SHN_COMMON) or shndx >= len(hdrs) or not name:
                    continue
                if not hdrs[shndx][2] & SHF_EXECINSTR:
                    continue
                if kind == STT_FUNC or (kind == STT_NOTYPE and bind != 0 and not name.startswith(".")):
                    a = (addrs.get(shndx, 0) + value) if rel else value
                    out.functions.setdefault(a, name)
                    if size:
                        out.sizes.setdefault(a, size)
        if out.functions:
            break
    # relocations
    got: dict[int, int] = {}
    got_bytes = bytearray()
    skipped: dict[int, int] = {}
    for h in hdrs:
        if h[1] != SHT_RELA or h[6] not in syms:
            continue
        target = h[7]
        tab = data[h[4] : h[4] + h[5]]
        for off, info, addend in struct.iter_unpack("<QQq", tab[: len(tab) // 24 * 24]):
            typ, si = info & 0xFFFFFFFF, info >> 32
            if rel:
                if target not in images:
                    continue
                img, base = images[target], addrs[target]
                pos = off
            else:
                sec = next((j for j in images if addrs[j] <= off < addrs[j] + hdrs[j][5]), None)
                if sec is None:
                    continue
                img, base = images[sec], addrs[sec]
                pos = off - base
            p = base + pos
            s = sym_value(h[6], si)[0] if si else 0
            if typ == 8:  # RELATIVE (loaded at 0)
                val, n = addend, 8
            elif typ in (6, 7):  # GLOB_DAT, JUMP_SLOT
                val, n = s, 8
            elif typ == 1:  # 64
                val, n = s + addend, 8
            elif typ in (2, 4):  # PC32, PLT32
                val, n = s + addend - p, 4
            elif typ == 24:  # PC64
                val, n = s + addend - p, 8
            elif typ in (10, 11):  # 32, 32S
                val, n = s + addend, 4
            elif typ in (9, 41, 42):  # GOTPCREL, GOTPCRELX, REX_GOTPCRELX: a GOT slot holding S
                if s not in got:
                    got[s] = SYNTH + len(got_bytes)
                    got_bytes += struct.pack("<Q", s & U64)
                    out.fixed_slots[got[s]] = struct.pack("<Q", s & U64)
                val, n = got[s] + addend - p, 4
            else:
                skipped[typ] = skipped.get(typ, 0) + 1
                continue
            if pos + n > len(img):
                continue
            img[pos : pos + n] = (val & ((1 << (8 * n)) - 1)).to_bytes(n, "little")
            if not hdrs[target if rel else sec][2] & SHF_EXECINSTR:
                out.fixed_slots[p] = bytes(img[pos : pos + n])
    if skipped:
        out.notes.append("relocation types not applied: " + ", ".join(f"{t} ×{n}" for t, n in sorted(skipped.items())))
    for i, a in sorted(addrs.items(), key=lambda x: x[1]):
        _n, typ, flags, _a, _o, size, *_ = hdrs[i]
        nm = names[i]
        fixed = not flags & SHF_WRITE or any(nm == f or nm.startswith(f + ".") for f in FIXED_WRITABLE)
        out.sections.append(Section(nm, a, bytes(images[i]), size, fixed, bool(flags & SHF_EXECINSTR), i))
    if got_bytes:
        out.sections.append(Section(".got (built)", SYNTH, bytes(got_bytes), len(got_bytes), True, False))
    # PLT entries: jmp [rip+slot] whose slot holds a function of this image
    slots = {}
    for s in out.sections:
        if not s.exec:
            for a, b in out.fixed_slots.items():
                if s.addr <= a < s.addr + s.size and len(b) == 8:
                    slots[a] = int.from_bytes(b, "little")
    for s in out.sections:
        if s.exec and s.name.startswith(".plt"):
            for ins in ix.Decoder(64, s.data, ip=s.addr):
                if ins.mnemonic == ix.Mnemonic.JMP and ins.is_ip_rel_memory_operand:
                    tgt = slots.get(ins.ip_rel_memory_address)
                    if tgt is not None and tgt not in out.stubs:
                        # the entry starts at the jump, or at the endbr64 just before it (.plt.sec)
                        at = ins.ip - 4 if s.data[ins.ip - s.addr - 4 : ins.ip - s.addr] == ENDBR64 else ins.ip
                        out.aliases[at] = tgt
    return out


def load_pe(data: bytes, te: bool) -> Loaded:
    if te:
        _sig, _m, nsec, _sub, stripped, _entry = struct.unpack_from("<HHBBHI", data, 0)
        table, adjust = 40, 40 - stripped
    else:
        (pe_at,) = struct.unpack_from("<I", data, 0x3C)
        (nsec,) = struct.unpack_from("<H", data, pe_at + 6)
        (opt,) = struct.unpack_from("<H", data, pe_at + 20)
        table, adjust = pe_at + 24 + opt, 0
    out = Loaded([])
    for k in range(nsec):
        o = table + 40 * k
        name, vsize, va, rsize, rptr = struct.unpack_from("<8sIIII", data, o)
        (chars,) = struct.unpack_from("<I", data, o + 36)
        size = max(vsize, rsize) if vsize else rsize
        raw = data[rptr + adjust : rptr + adjust + min(rsize, size)] if rsize else b""
        label = name.rstrip(b"\0").decode(errors="replace")
        writable = bool(chars & 0x80000000)
        out.sections.append(
            Section(label, va, raw + bytes(size - len(raw)), size, not writable, bool(chars & 0x20000020))
        )
    return out


def load(code: Code) -> Loaded:
    """The image a code region is a section of, as the engine runs it."""
    img = code.image
    if img is None or code.image_kind == "raw":
        out = Loaded([Section(code.chain[-1], code.va, code.data, len(code.data), True, True)])
        out.functions = dict(code.functions)
        out.sizes = dict(code.sizes)
        return out
    if code.image_kind == "elf":
        return load_elf(img)
    if code.image_kind in ("pe", "te"):
        out = load_pe(img, code.image_kind == "te")
        out.functions = dict(code.functions)
        return out
    raise Unsupported(f"{code.image_kind} images are not run")


def load_delta(image: Loaded, code: Code) -> int:
    """The offset from a code region's addresses to its run addresses (its section, by name and size)."""
    for s in image.sections:
        if s.name == code.chain[-1] and s.exec and (s.size == len(code.data) or s.addr == code.va):
            return s.addr - code.va
    raise Unsupported("the code region is not a section of its image")


_INFO = ix.InstructionInfoFactory()
_WRITES = frozenset({ix.OpAccess.WRITE, ix.OpAccess.READ_WRITE, ix.OpAccess.COND_WRITE, ix.OpAccess.READ_COND_WRITE})


_CC = ix.ConditionCode
#: RFLAGS bits: CF, PF, ZF, SF, OF
_CF, _PF, _ZF, _SF, _OF = 1, 1 << 2, 1 << 6, 1 << 7, 1 << 11
#: per condition, the flags (set, cleared) that make it hold (Intel SDM vol. 1, B.1 "condition codes")
_HOLDS = {
    _CC.O: (_OF, 0),
    _CC.NO: (0, _OF),
    _CC.B: (_CF, 0),
    _CC.AE: (0, _CF),
    _CC.E: (_ZF, 0),
    _CC.NE: (0, _ZF),
    _CC.BE: (_CF, 0),
    _CC.A: (0, _CF | _ZF),
    _CC.S: (_SF, 0),
    _CC.NS: (0, _SF),
    _CC.P: (_PF, 0),
    _CC.NP: (0, _PF),
    _CC.L: (_SF, _OF),
    _CC.GE: (0, _SF | _OF),
    _CC.LE: (_ZF, 0),
    _CC.G: (0, _ZF | _SF | _OF),
}
_NOT = {
    a: b
    for a, b in [
        (_CC.O, _CC.NO),
        (_CC.B, _CC.AE),
        (_CC.E, _CC.NE),
        (_CC.BE, _CC.A),
        (_CC.S, _CC.NS),
        (_CC.P, _CC.NP),
        (_CC.L, _CC.GE),
        (_CC.LE, _CC.G),
    ]
}
_NOT |= {b: a for a, b in _NOT.items()}


def _conditional_value(ins: ix.Instruction) -> bool:
    """A ``cmovcc`` or ``setcc``: a value chosen by a condition, without a jump."""
    return ins.condition_code != _CC.NONE and ins.flow_control == ix.FlowControl.NEXT


def _written(ins: ix.Instruction) -> set[str] | None:
    """The general registers an instruction writes; None when it writes memory or leaves the straight
    line (a call, a TDCALL, a branch)."""
    if ins.flow_control not in (ix.FlowControl.NEXT, ix.FlowControl.UNCONDITIONAL_BRANCH):
        return None
    if ins.mnemonic == ix.Mnemonic.TDCALL:
        return None
    info = _INFO.info(ins)
    if any(m.access in _WRITES for m in info.used_memory()):
        return None
    out = set()
    for u in info.used_registers():
        if u.access in _WRITES and (name := reg_name(u.register)) is not None and name != "rsp":
            out.add(name)
    return out


# --- running ------------------------------------------------------------------------------------------
class _Const(random.Random):
    """A "random" source that gives one byte over and over (the 0x00 and 0xFF fillings)."""

    def __init__(self, byte: int) -> None:
        super().__init__(0)
        self.byte = byte

    def randbytes(self, n: int) -> bytes:
        return bytes([self.byte]) * n


@dataclass
class Hit:
    """A TDCALL reached in a run: where, through which calls (innermost first), the registers."""

    site: int
    chain: tuple[int, ...]
    regs: dict[str, int]
    #: the conditions (forward jumps, cmovcc, setcc) the run went through before it, in order
    conds: tuple[int, ...] = ()


_REG = {}
if uc is not None:
    _REG = {
        n: getattr(X, f"UC_X86_REG_{n.upper()}")
        for n in ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", *(f"r{i}" for i in range(8, 16)), "rip")
    }
_GPRS = ("rax", "rcx", "rdx", "rbx", "rbp", "rsi", "rdi", *(f"r{i}" for i in range(8, 16)))
#: GHCI: R11..R15 etc. the host may write on TDG.VP.VMCALL's return, by RCX's bits
_BY_BIT = {2: "rdx", 3: "rbx", 5: "rbp", 6: "rsi", 7: "rdi", **{i: f"r{i}" for i in range(8, 16)}}
_CALLS = frozenset({ix.FlowControl.CALL, ix.FlowControl.INDIRECT_CALL})
_BRANCHES = frozenset(
    {
        ix.FlowControl.CONDITIONAL_BRANCH,
        ix.FlowControl.UNCONDITIONAL_BRANCH,
        ix.FlowControl.INDIRECT_BRANCH,
        ix.FlowControl.RETURN,
        ix.FlowControl.INTERRUPT,
        ix.FlowControl.EXCEPTION,
    }
)


class _RunState:
    """What one run keeps while it goes: its filling, pages, shadow stack and budget."""

    def __init__(self) -> None:
        self.reset(0, None)

    def reset(self, seed: int, pattern: int | None) -> None:
        self.seed, self.pattern = seed, pattern
        self.pages = 0
        self.fetched = -1  # the address of code outside the image the run went to (not unicorn's RIP)
        self.mapped: list[int] = []
        self.shadow: list[tuple[int, int, int]] = []  # (call address, return address, rsp before it)
        self.pending: list[tuple[int, int]] = []  # (call address, return address) of the last block
        self.count = 0
        self.stopped = False
        self.conds: list[int] = []
        self.cond_set: set[int] = set()

    def filler(self, b: int) -> random.Random:
        return random.Random(self.seed ^ b) if self.pattern is None else _Const(self.pattern)


class Runner:
    """Runs of one image from function entries."""

    def __init__(self, image: Loaded) -> None:
        self.image = image
        #: per basic block seen: the call it ends with (address, return address), and its conditions
        self.blocks: dict[int, tuple[tuple[int, int] | None, tuple[int, ...]]] = {}
        self.runs = 0
        self.seconds = 0.0
        self.ended = ""  # why the last run ended (for --verbose and debugging)
        self._m: uc.Uc | None = None
        self._kept: set[int] = set()
        self._st = _RunState()

    def _machine(self) -> uc.Uc:
        """The emulator, made once per image and kept between runs: the code it has translated is
        kept too (translating is most of a run's cost).  Pages wholly inside the image's fixed
        sections stay mapped, read-only; every other page is unmapped after each run."""
        if self._m is not None:
            return self._m
        m = uc.Uc(uc.UC_ARCH_X86, uc.UC_MODE_64)
        image = self.image
        st = self._st

        def mapped(mu: uc.Uc, access: int, address: int, size: int, value: int, data: object) -> bool:
            address = phys(address)
            base = address & ~(PAGE - 1)
            if access == uc.UC_MEM_FETCH_UNMAPPED and not image.page_code(virt(base)):
                st.fetched = virt(address)
                return False  # code outside the image: handled by the caller of emu_start
            st.pages += 1
            if st.pages > MAX_PAGES:
                return False  # a loop over memory without end (a count read from random bytes)
            try:
                for b in range(base, (address + max(size, 1) + PAGE - 1) & ~(PAGE - 1), PAGE):
                    if b in self._kept:
                        continue
                    code = image.page_code(virt(b))
                    if image.page_fixed(virt(b)):
                        # the image's fixed pages stay mapped, read-only, in runs of up to 16 (fewer
                        # regions: unicorn maps and looks regions up by a list)
                        n = 1
                        while n < 16 and (b + n * PAGE) not in self._kept and image.page_fixed(virt(b + n * PAGE)):
                            n += 1
                        mu.mem_map(b, n * PAGE, uc.UC_PROT_READ | (uc.UC_PROT_EXEC if code else 0))
                        for k in range(n):
                            mu.mem_write(b + k * PAGE, image.page(virt(b + k * PAGE), _Const(0)))
                            self._kept.add(b + k * PAGE)
                        continue
                    # anything else is data: executing it is a call outside the image
                    mu.mem_map(b, PAGE, uc.UC_PROT_READ | uc.UC_PROT_WRITE | (uc.UC_PROT_EXEC if code else 0))
                    mu.mem_write(b, image.page(virt(b), st.filler(b)))
                    st.mapped.append(b)
            except uc.UcError:
                return False
            return True

        def block(mu: uc.Uc, address: int, size: int, data: object) -> None:
            st.count += 1
            if st.count > MAX_BLOCKS:
                mu.emu_stop()  # the run's budget, over all its resumes after TDCALLs
                st.stopped = True
                return
            shadow, pending = st.shadow, st.pending
            # (RSP is read only after a call: reading a register costs more than the block)
            if pending:
                call_ip, ret = pending.pop()
                rsp = mu.reg_read(X.UC_X86_REG_RSP)
                while shadow and rsp >= shadow[-1][2]:
                    shadow.pop()  # frames left without returning (a longjmp): not on the path
                try:
                    if int.from_bytes(mu.mem_read(phys(rsp), 8), "little") == ret:
                        shadow.append((call_ip, ret, rsp + 8))
                except uc.UcError:
                    pass
            elif shadow and address == shadow[-1][1]:
                shadow.pop()  # returned to the instruction after the call
            info = self.blocks.get(address)
            if info is None:
                call: tuple[int, int] | None = None
                conds: list[int] = []
                try:
                    code = bytes(mu.mem_read(phys(address), size))
                    last = None
                    for ins in ix.Decoder(64, code, ip=address):
                        last = ins
                        if _conditional_value(ins) or (
                            ins.flow_control == ix.FlowControl.CONDITIONAL_BRANCH and ins.near_branch_target > ins.ip
                        ):
                            conds.append(ins.ip)
                    if last is not None and last.flow_control in _CALLS:
                        call = (last.ip, last.next_ip)
                except uc.UcError:
                    pass
                info = (call, tuple(conds))
                self.blocks[address] = info
            if info[0] is not None:
                pending.append(info[0])
            for c in info[1]:
                if c not in st.cond_set:
                    st.cond_set.add(c)
                    st.conds.append(c)

        m.hook_add(uc.UC_HOOK_MEM_UNMAPPED, mapped)
        m.hook_add(uc.UC_HOOK_BLOCK, block)
        m.mem_map(SENTINEL, PAGE, uc.UC_PROT_READ | uc.UC_PROT_EXEC)  # fetching from it ends the run
        m.mem_write(SENTINEL, b"\xf4" * PAGE)
        self._m = m
        return m

    def run(self, start: int, fill: int, status: int, force: tuple[int, bool] | None = None) -> list[Hit]:
        """One run from ``start``: the TDCALLs reached, in order.  ``force``: a condition (of a
        jump, a ``cmovcc`` or a ``setcc``) made to hold (True) or not each time it is reached."""
        assert uc is not None
        t0 = time.process_time()
        self.runs += 1
        image = self.image
        seed = fill * 0x9E3779B97F4A7C15
        pattern = PATTERNS[(fill - 1) % len(PATTERNS)]
        st = self._st
        for b in st.mapped:  # the last run's pages (its stack, its data, its random ones)
            self._m.mem_unmap(b, PAGE)  # type: ignore[union-attr]
        st.reset(seed, pattern)
        m = self._machine()
        fhook = None
        if force is not None:
            at, taken = force
            r = image.region(at)
            fi = next(iter(r.decode(at, at) or [])) if r is not None else None
            if fi is not None and fi.condition_code in _HOLDS:
                # the flags the condition reads are set so that it holds (or its opposite does):
                # a jump goes that way, a cmov moves or not, a setcc gives 1 or 0
                setf, clear = _HOLDS[fi.condition_code if taken else _NOT[fi.condition_code]]

                def forced(mu: uc.Uc, address: int, size: int, data: object) -> None:
                    f = mu.reg_read(X.UC_X86_REG_EFLAGS)
                    mu.reg_write(X.UC_X86_REG_EFLAGS, (f | setf) & ~clear)

                fhook = m.hook_add(uc.UC_HOOK_CODE, forced, begin=at, end=at)
        try:
            return self._go(m, start, fill, status, seed, pattern)
        finally:
            if fhook is not None:
                m.hook_del(fhook)
            self.seconds += time.process_time() - t0

    def _go(self, m: uc.Uc, start: int, fill: int, status: int, seed: int, pattern: int | None) -> list[Hit]:
        image = self.image
        st = self._st
        rng = random.Random(seed ^ start)
        for r in _GPRS:
            m.reg_write(
                _REG[r], rng.getrandbits(64) if pattern is None else int.from_bytes(bytes([pattern]) * 8, "little")
            )
        m.reg_write(X.UC_X86_REG_RFLAGS, 0x2)
        for k in range(16):
            m.reg_write(getattr(X, f"UC_X86_REG_XMM{k}"), 0)
        rsp = STACK_TOP - 0x1000 - 8 * rng.randrange(16)
        m.reg_write(_REG["rsp"], rsp)
        top = rsp & ~(PAGE - 1)
        m.mem_map(top, PAGE)
        m.mem_write(top, st.filler(top).randbytes(PAGE))
        st.mapped.append(top)
        m.mem_write(rsp, SENTINEL.to_bytes(8, "little"))
        hits: list[Hit] = []
        pc = start
        deadline = time.monotonic() + RUN_SECONDS
        for _ in range(4 * MAX_HITS):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                m.emu_start(pc, SENTINEL, timeout=int(left * 1e6), count=MAX_INSNS)
                self.ended = "the run's budget spent" if st.stopped else "returned, or the instruction limit"
                break
            except uc.UcError as e:
                pc = m.reg_read(_REG["rip"])
                if e.errno == uc.UC_ERR_FETCH_UNMAPPED and st.fetched >= 0:
                    pc, st.fetched = st.fetched, -1
                elif e.errno == uc.UC_ERR_FETCH_PROT:
                    pc = virt(pc)  # code run from data: as a call outside the image
                self.ended = f"{e} at {pc:#x}"
            if pc >= SENTINEL and pc < SENTINEL + PAGE:
                break
            try:
                here = bytes(m.mem_read(phys(pc), 4))
            except uc.UcError:
                here = b""
            if here == TDCALL:
                regs = {r: m.reg_read(_REG[r]) for r in REGS}
                hits.append(Hit(pc, tuple(c for c, _r, _s in reversed(st.shadow)), regs, tuple(st.conds)))
                if len(hits) >= MAX_HITS:
                    break
                self._tdcall(m, regs, fill, status, rng)
                pc += 4
                continue
            if here[:2] == b"\x0f\x0b":  # ud2: a kernel WARN goes on after it
                pc += 2
                continue
            if not image.in_image(pc):
                nxt = self._outside(m, pc, rng)
                if nxt is None:
                    break
                pc = nxt
                continue
            break  # an instruction the emulator does not run (privileged, or not decodable)
        else:
            self.ended = "too many restarts"
        return hits

    def _tdcall(self, m: uc.Uc, regs: dict[str, int], fill: int, status: int, rng: random.Random) -> None:
        """The TDCALL's outputs: what the TDX module and the host may write, at random (per filling)."""
        leaf = regs["rax"]
        m.reg_write(_REG["rax"], 0)
        if leaf == 0:  # TDG.VP.VMCALL: R10 the status, R11 an output, the exposed GPRs the host's
            mask = regs["rcx"]
            for bit, r in _BY_BIT.items():
                if mask >> bit & 1:
                    m.reg_write(_REG[r], rng.getrandbits(64))
            m.reg_write(_REG["r10"], status)
            m.reg_write(_REG["r11"], rng.getrandbits(64))
        elif leaf & 0xFFFF == 1:  # TDG.VP.INFO: GPAW 48 or 52 (per filling), the rest at random
            m.reg_write(_REG["rcx"], 48 if fill == 1 else 52)
            for r in ("rdx", "r8", "r9", "r10", "r11"):
                m.reg_write(_REG[r], rng.getrandbits(64))
        else:
            for r in ("rcx", "rdx", "r8", "r9", "r10", "r11"):
                m.reg_write(_REG[r], rng.getrandbits(64))

    def _outside(self, m: uc.Uc, pc: int, rng: random.Random) -> int | None:
        """A call to code outside the image: an import carried out (memcpy, memset) or a return with
        the volatile registers filled at random; None when it was not a call (the run ends)."""
        rsp = m.reg_read(_REG["rsp"])
        try:
            ret = int.from_bytes(m.mem_read(phys(rsp), 8), "little")
        except uc.UcError:
            return None
        if not self.image.in_image(ret):
            return None
        name = self.image.stubs.get(pc, "")
        rdi, rsi, rdx = (m.reg_read(_REG[r]) for r in ("rdi", "rsi", "rdx"))
        try:
            if name in MEMCPY and rdx <= 1 << 20:
                m.mem_write(phys(rdi), bytes(m.mem_read(phys(rsi), rdx)))
            elif name in MEMSET and rdx <= 1 << 20:
                m.mem_write(phys(rdi), bytes([rsi & 0xFF]) * rdx)
        except uc.UcError:
            return None
        for r in VOLATILE:
            m.reg_write(_REG[r], rng.getrandbits(64))
        if name in MEMCPY | MEMSET:
            m.reg_write(_REG["rax"], rdi)
        m.reg_write(_REG["rsp"], rsp + 8)
        return ret


# --- the engine ---------------------------------------------------------------------------------------
@dataclass
class Call:
    """What the runs say of one call path to a site: the trusted registers (equal in both fillings)."""

    chain: tuple[int, ...]  # call instructions, innermost first (run addresses)
    regs: dict[str, int]
    start: int


class Engine:
    """Micro-execution of one image, shared by the sites of its code regions."""

    def __init__(self, code: Code) -> None:
        self.image = load(code)
        self.delta = load_delta(self.image, code)
        self.runner = Runner(self.image)
        self.cache: dict[
            tuple[int, tuple[int, ...]], list[tuple[tuple[int, tuple[int, ...], int], dict[str, int]]]
        ] = {}
        self.starts = 0
        self.capped = False

    def trusted(
        self, start: int, forks: tuple[int, ...] = ()
    ) -> list[tuple[tuple[int, tuple[int, ...], int], dict[str, int]]]:
        """From one start: per (site, chain, occurrence), the registers equal in every run that got
        there (two at least: the fillings), for both statuses; and with ``forks``, equal too when
        each of those jumps is forced either way (a value that holds on one path only differs)."""
        key = (start, forks)
        if key in self.cache:
            return self.cache[key]
        if self.starts >= MAX_STARTS:
            self.capped = True
            return []
        self.starts += 1
        out: list[tuple[tuple[int, tuple[int, ...], int], dict[str, int]]] = []
        for status in (0, 1):
            reached: dict[tuple[int, tuple[int, ...], int], list[dict[str, int]]] = {}
            seen: set[int] = set()
            for fill in range(1, FILLS + 1):
                hits = self.runner.run(start, fill, status)
                for h in hits:
                    seen.update(h.conds)
                for k, regs in self._keyed(hits):
                    reached.setdefault(k, []).append(regs)
            # the conditions the runs went through elsewhere (in callees that returned): forced each
            # way too when they are few
            extra = tuple(sorted(seen - set(forks)))
            other: dict[tuple[int, tuple[int, ...], int], list[dict[str, int]]] = {}
            for at in forks + (extra if len(extra) <= MAX_EXTRA else ()):
                for taken in (True, False):
                    for k, regs in self._keyed(self.runner.run(start, 1, status, (at, taken))):
                        other.setdefault(k, []).append(regs)
            for k, regs in reached.items():
                if len(regs) < 2:
                    continue
                runs = regs + other.get(k, [])
                first = runs[0]
                out.append((k, {r: v for r, v in first.items() if all(o.get(r) == v for o in runs[1:])}))
        self.cache[key] = out
        return out

    @staticmethod
    def _keyed(hits: list[Hit]) -> list[tuple[tuple[int, tuple[int, ...], int], dict[str, int]]]:
        seen: dict[tuple[int, tuple[int, ...]], int] = {}
        out = []
        for h in hits:
            n = seen.get((h.site, h.chain), 0)
            seen[(h.site, h.chain)] = n + 1
            out.append(((h.site, h.chain, n), h.regs))
        return out

    def calls(
        self,
        site: int,
        fn_start: int,
        chain: tuple[int, ...],
        need: set[str],
        depth: int,
        fn_exact: bool = True,
        tainted: frozenset[str] = frozenset(),
        forks: tuple[int, ...] = (),
    ) -> list[Call]:
        """The call paths to ``site`` (run addresses) that extend ``chain`` (call instructions from
        the site's function outwards), each with the registers pinned, starting the runs at the
        outermost function of the chain and climbing callers while a register of ``need`` is not
        pinned."""
        outer, exact = fn_start, fn_exact
        if not chain and (own := self.image.function_of(site)) is not None and own[2]:
            outer, exact = own[0], True  # the image's own symbols (a .o's, assembly labels) say better
        if chain:
            f = self.image.function_of(chain[-1])
            if f is None:
                return []
            outer, _name, exact = f
        point = chain[-1] if chain else site
        mine = self.image.forks(outer, point)
        if mine is not None and len(forks) + len(mine) <= MAX_FORKS:
            forks = forks + mine  # where paths meet before the call, the runs go both ways
        else:
            merged = self.image.merges(outer, point)
            if merged is None:
                # paths meet before the call and what differs is not known: run only the
                # straight-line code that makes it, and climb no further
                block = self.image.block_start(point)
                if block is None:
                    return []
                outer, exact = block, False
            else:
                tainted = tainted | merged  # registers that may hold a one-path value: never taken
        calls = tuple(c for c in chain if self.image.is_call(c))
        got: list[dict[str, int]] = []
        for (s, ch, _n), regs in self.trusted(outer, forks):
            if s == site and ch == calls:
                got.append(regs)
        if not got and chain and exact and (block := self.image.block_start(chain[-1])) not in (None, outer):
            # the runs from the function's entry did not get to this call (a path through code that
            # random data does not pass): run the straight-line code that makes it
            for (s, ch, _n), regs in self.trusted(block, forks):
                if s == site and ch == calls:
                    got.append(regs)
        found: list[Call] = []
        if got:
            tuples = {tuple(sorted(r.items())) for r in got}
            # the same path with different values in different runs (a retry that changes them): keep
            # only what every run agrees on
            common = dict(tuples.pop())
            for t in tuples:
                d = dict(t)
                common = {r: v for r, v in common.items() if d.get(r) == v}
            common = {r: v for r, v in common.items() if r not in tainted}
            found.append(Call(chain, common, outer))
            if need <= common.keys():
                return found
        if depth >= MAX_DEPTH or not exact:
            return found
        base = found[0].regs if found else {}
        deeper: list[Call] = []
        for c in self.image.callers(outer):
            if c in chain:
                continue
            got_c = self.calls(site, fn_start, (*chain, c), need, depth + 1, fn_exact, tainted, forks)
            # what this level pinned holds on every path through it: the deeper paths add to it; a
            # caller whose runs did not reach the site is still a call path, with what is known
            deeper += [Call(d.chain, {**base, **d.regs}, d.start) for d in got_c] or [Call((*chain, c), base, outer)]
        if not deeper or not any(need & d.regs.keys() - base.keys() for d in deeper):
            return found  # the callers pin nothing more: one call path, as before
        return deeper


def available() -> bool:
    return uc is not None


__all__ = ["MAX_DEPTH", "Call", "Engine", "Loaded", "Unsupported", "available", "load"]

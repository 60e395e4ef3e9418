"""Finding TDCALLs in a code region and recovering the registers they are made with.

A site is a TDCALL (bytes 66 0F 01 CC) that a real x86 decoder (iced-x86) decodes as the ``tdcall``
instruction when it decodes the function around it from the function's start.  Bytes that do not
decode so (inside an immediate, in data) are counted, not reported.

Values are recovered by data flow inside the function, walking back from the use along the
straight-line code from the function's start (branches are not followed; a write that a direct jump
from before it goes past is "set on one path only", unknown): immediates, register copies, zeroing
idioms (``xor ecx, ecx``), 32-bit writes (which zero the upper half), 8/16-bit writes (merged with
the older value), ``or``/``and``/``add``/``sub`` with an immediate, ``lea`` of a constant, and
loads from a stack slot or struct field (``[reg+disp]``) that the same function stored a value to
earlier with the base register unchanged and the bytes not written again in between (cut to the
load's width). A value that reaches the function's start is the caller's (``param``), and a load
through a register still holding the caller's value is the caller's memory (``mem``): the callers
are followed (``analyze.expand``) and :func:`resolve` (registers) or :func:`memory_at_call` (a
forward pass over the caller's stores) gives the value there. Anything else is said, never guessed:
``loaded from memory``, ``set by the call at ...``, ``from caller, unresolved``.

iced reports no implicit registers for TDCALL: its reads and writes are modelled here (it reads RAX,
and RCX and the exposed GPRs for TDG.VP.VMCALL; it writes RAX, RCX, R10, R11 and the exposed GPRs).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

import iced_x86 as ix
import numpy as np

from .containers import TDCALL, Code

U64 = (1 << 64) - 1
MAX_FUNCTION = 1 << 16  # bytes decoded back from a site when the function's start is not known

GPRS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", *(f"r{i}" for i in range(8, 16)))
_REG = {getattr(ix.Register, n.upper()): n for n in GPRS}
_REG.update({getattr(ix.Register, n.upper()): n for n in ("rip",)})
#: registers a call may change (the union of the SysV and Microsoft x64 conventions' volatile ones)
VOLATILE = frozenset({"rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11"})
WRITES = frozenset({ix.OpAccess.WRITE, ix.OpAccess.READ_WRITE, ix.OpAccess.COND_WRITE, ix.OpAccess.READ_COND_WRITE})
IMMEDIATES = frozenset(
    {
        ix.OpKind.IMMEDIATE8,
        ix.OpKind.IMMEDIATE16,
        ix.OpKind.IMMEDIATE32,
        ix.OpKind.IMMEDIATE64,
        ix.OpKind.IMMEDIATE8TO16,
        ix.OpKind.IMMEDIATE8TO32,
        ix.OpKind.IMMEDIATE8TO64,
        ix.OpKind.IMMEDIATE32TO64,
    }
)
_INFO = ix.InstructionInfoFactory()
_JUMPS = frozenset({ix.FlowControl.CONDITIONAL_BRANCH, ix.FlowControl.UNCONDITIONAL_BRANCH})
_NEAR = frozenset({ix.OpKind.NEAR_BRANCH16, ix.OpKind.NEAR_BRANCH32, ix.OpKind.NEAR_BRANCH64})
#: instructions after which straight-line code does not continue
BOUNDARIES = frozenset(
    {
        ix.FlowControl.RETURN,
        ix.FlowControl.UNCONDITIONAL_BRANCH,
        ix.FlowControl.INDIRECT_BRANCH,
        ix.FlowControl.INTERRUPT,
        ix.FlowControl.EXCEPTION,
    }
)


#: bytes that begin a function: endbr64 (CET builds), push rbp; mov rbp, rsp, and sub rsp, imm8/imm32
PROLOGUES = (b"\xf3\x0f\x1e\xfa", b"\x55\x48\x89\xe5", b"\x48\x83\xec", b"\x48\x81\xec")


def reg_name(reg: int) -> str | None:
    """The 64-bit GPR name of an iced register (``ecx`` -> ``rcx``), None for others."""
    return _REG.get(ix.RegisterExt.full_register(reg))


@dataclass(frozen=True)
class Value:
    """A recovered register value (None: not known) and how it was found.  ``param`` names the
    register whose value at the function's entry this is (the caller's); ``mem`` says it was loaded
    from ``[reg+disp]`` where ``reg`` still held its value from the function's entry (a pointer the
    caller passed: the caller's stores there are looked up)."""

    value: int | None
    how: str
    param: str | None = None
    mem: tuple[str, int] | None = None

    @property
    def from_caller(self) -> bool:
        return self.param is not None or self.mem is not None

    @property
    def known(self) -> bool:
        return self.value is not None


def unknown(how: str) -> Value:
    return Value(None, how)


@dataclass
class Function:
    """A function's decoded instructions from its start (or from a window before the site)."""

    start: int
    name: str
    insns: list[ix.Instruction]
    exact: bool  # the start is a function start (symbol or call target), not a window
    _jumps: list[tuple[int, int]] | None = field(default=None, repr=False)
    #: a relocatable object's relocations (address -> what fills the byte at link time), ``Code.relocs``
    relocs: dict[int, str] = field(default_factory=dict, repr=False)

    def relocated(self, ins: ix.Instruction) -> str | None:
        """What a relocation fills in ``ins``'s bytes (``type 4 to memcpy``), None when nothing:
        in a ``.o`` those bytes are zeros or an addend until the link, so a call's target, an
        immediate or a ``rip``-relative address read from them would be wrong."""
        if not self.relocs:
            return None
        for a in range(ins.ip, ins.ip + ins.len):
            if a in self.relocs:
                return self.relocs[a]
        return None

    def jumps(self) -> list[tuple[int, int]]:
        """(source, target) of the direct jumps (conditional or not) among the instructions."""
        if self._jumps is None:
            self._jumps = [
                (i.ip, i.near_branch_target) for i in self.insns if i.flow_control in _JUMPS and i.op0_kind in _NEAR
            ]
        return self._jumps

    def skipped(self, j: int, idx: int) -> int | None:
        """The address of a jump before ``insns[j]`` whose target lies after it, up to ``insns[idx]``:
        a path that reaches ``insns[idx]`` without running ``insns[j]``; None when there is none."""
        lo, hi = self.insns[j].ip, self.insns[idx].ip
        for src, tgt in self.jumps():
            if src < lo < tgt <= hi:
                return src
        return None


@dataclass
class Branches:
    """Direct branches of one kind in a region, sorted by target (numpy arrays of offsets: a
    dict of lists would make hundreds of thousands of small objects for a kernel)."""

    targets: np.ndarray
    sources: np.ndarray
    va: int

    @classmethod
    def empty(cls) -> Branches:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), 0)

    @classmethod
    def of(cls, targets: np.ndarray, sources: np.ndarray, va: int) -> Branches:
        order = np.argsort(targets, kind="stable")
        return cls(targets[order], sources[order], va)

    def get(self, target: int) -> list[int]:
        """Addresses of the branches to ``target``."""
        t = target - self.va
        lo = int(np.searchsorted(self.targets, t, "left"))
        hi = int(np.searchsorted(self.targets, t, "right"))
        return [int(x) + self.va for x in self.sources[lo:hi]]

    def __contains__(self, target: int) -> bool:
        return bool(self.get(target))


def le_i32(arr: np.ndarray, at: np.ndarray) -> np.ndarray:
    """The signed little-endian 32-bit values at byte offsets ``at`` of ``arr`` (a rel32 or a
    disp32), as int64: the one reader of an instruction's 32-bit displacement, for the fast path's
    index and the deep engine's callers alike."""
    value = (
        arr[at].astype(np.int64)
        | arr[at + 1].astype(np.int64) << 8
        | arr[at + 2].astype(np.int64) << 16
        | arr[at + 3].astype(np.int64) << 24
    )
    return np.where(value >= 1 << 31, value - (1 << 32), value)


@dataclass
class Region:
    """One code region prepared for analysis: function starts and direct calls."""

    code: Code
    starts: list[int] = field(default_factory=list)
    calls: Branches = field(default_factory=lambda: Branches.empty())  # direct calls, by target
    jumps: Branches = field(default_factory=lambda: Branches.empty())  # jmp rel32 (tail calls), by target

    @classmethod
    def of(cls, code: Code) -> Region:
        r = cls(code)
        r._index()
        return r

    def _index(self) -> None:
        data, va = self.code.data, self.code.va
        arr = np.frombuffer(data, dtype=np.uint8)
        n = len(arr)
        # direct calls: E8 rel32 whose target is inside the region
        for opcode in (0xE8, 0xE9):
            pos = np.flatnonzero(arr[: max(n - 4, 0)] == opcode)
            rel = le_i32(arr, pos + 1)
            tgt = pos + 5 + rel
            ok = (tgt >= 0) & (tgt < n)
            if self.code.relocs:  # a .o's unrelocated call or jump: its target is not known before the link
                ok &= np.array([int(p) + va + 1 not in self.code.relocs for p in pos], dtype=bool)
            branches = Branches.of(tgt[ok], pos[ok], va)
            if opcode == 0xE8:
                self.calls = branches
            else:
                self.jumps = branches
        starts = set(self.code.functions)
        # endbr64 marks function starts in CET-enabled builds (the Linux kernel)
        if n >= 4:
            endbr = np.flatnonzero((arr[:-3] == 0xF3) & (arr[1:-2] == 0x0F) & (arr[2:-1] == 0x1E) & (arr[3:] == 0xFA))
            starts.update(t + va for t in endbr.tolist())
        # call targets: with two callers, or after a ret, int3, nop or padding
        targets, counts = np.unique(self.calls.targets, return_counts=True)
        before = arr[np.maximum(targets - 1, 0)]
        likely = (counts >= 2) | np.isin(before, (0xC3, 0xCC, 0x90, 0x00)) | (targets == 0)
        starts.update(t + va for t in targets[likely].tolist())
        starts.add(va)
        if self.code.sizes:
            # a symbol with a size says where its function ends: a byte pattern inside it that looks
            # like a call target (an immediate's bytes) is not a function start
            spans = sorted((a, a + n) for a, n in self.code.sizes.items() if n)
            los = [a for a, _ in spans]

            def inside(t: int) -> bool:
                i = bisect.bisect_right(los, t) - 1
                return i >= 0 and spans[i][0] < t < spans[i][1]

            starts = {t for t in starts if t in self.code.functions or not inside(t)}
        self.starts = sorted(starts)

    def justified(self, start: int) -> bool:
        """Whether ``start`` is a function start the scanner can show, not just one it assumes: a
        symbol, the target of two or more direct calls, or bytes that begin a function (``endbr64``,
        ``push rbp; mov rbp, rsp``, ``sub rsp, imm``).  Raw blobs report only sites decoded from
        such a start (random bytes decode as x86 too)."""
        if start in self.code.functions:
            return True
        off = start - self.code.va
        head = self.code.data[off : off + 4]
        return any(head.startswith(p) for p in PROLOGUES) or len(self.calls.get(start)) >= 2

    def name(self, start: int) -> str:
        return self.code.functions.get(start) or f"sub_{start:x}"

    def decode(self, start: int, upto: int) -> list[ix.Instruction] | None:
        """Instructions from ``start`` up to and including the one at ``upto``; None if the decoding
        does not land on ``upto`` (not code, or the start is not an instruction boundary)."""
        va, data = self.code.va, self.code.data
        lo = start - va
        hi = min(upto - va + 16, len(data))
        out: list[ix.Instruction] = []
        for ins in ix.Decoder(self.code.bitness, data[lo:hi], ip=start):
            if ins.ip > upto:
                return None
            out.append(ins)
            if ins.ip == upto:
                return out
        return None

    def function(self, at: int) -> Function | None:
        """The function containing the instruction at ``at``: the nearest start before it from
        which the decoding lands on ``at`` (a few are tried), else a window; None if no decoding
        lands on ``at``."""
        fn = self._function(at)
        if fn is not None:
            fn.relocs = self.code.relocs
        return fn

    def _function(self, at: int) -> Function | None:
        i = bisect.bisect_right(self.starts, at)
        tried = 0
        while i > 0 and tried < 4:
            i -= 1
            start = self.starts[i]
            if at - start > MAX_FUNCTION:
                break
            size = self.code.sizes.get(start)
            if size and not start <= at < start + size:
                continue
            tried += 1
            insns = self.decode(start, at)
            if insns is not None:
                return self._cut(start, insns)
        if tried:
            return None  # decoding from the function's start does not land here: not code
        # no start within reach: decode a short window (the site only; no caller is followed)
        for back in range(min(64, at - self.code.va), -1, -1):
            insns = self.decode(at - back, at)
            if insns is not None:
                return Function(at - back, f"at {at:#x}", insns, False)
        return None

    def _cut(self, start: int, insns: list[ix.Instruction]) -> Function:
        """Without a symbol saying where the function ends, a ``ret``, ``jmp`` or ``int3`` before the
        site ends the straight-line path: the function (as far as the data flow goes) starts after the
        last one, and is a known start only if something calls it there."""
        if start in self.code.sizes:
            return Function(start, self.name(start), insns, True)
        for k in range(len(insns) - 2, -1, -1):
            if insns[k].flow_control in BOUNDARIES:
                nxt = insns[k + 1].ip
                rest = insns[k + 1 :]
                return Function(nxt, self.name(nxt), rest, nxt in self.calls or nxt in self.code.functions)
        return Function(start, self.name(start), insns, True)

    def hits(self) -> list[int]:
        """Addresses of the TDCALL byte matches (code or not)."""
        data, va = self.code.data, self.code.va
        out = []
        i = 0
        while (i := data.find(TDCALL, i)) >= 0:
            out.append(i + va)
            i += 1
        return out


# --- backward data flow ------------------------------------------------------------------------------
def _imm(ins: ix.Instruction, n: int) -> int:
    return ins.immediate(n) & U64


def _mem_key(ins: ix.Instruction) -> tuple[int, int] | None:
    """(base register, displacement) of a simple ``[reg+disp]`` operand, else None."""
    if ins.memory_index != ix.Register.NONE or ins.is_ip_rel_memory_operand or ins.memory_base == ix.Register.NONE:
        return None
    return ins.memory_base, ins.memory_displacement & U64


def _writes(ins: ix.Instruction, reg: str) -> bool:
    if ins.mnemonic == ix.Mnemonic.TDCALL:
        return True
    return any(u.access in WRITES and reg_name(u.register) == reg for u in _INFO.info(ins).used_registers())


def _writes_over(ins: ix.Instruction, key: tuple[int, int], width: int) -> bool:
    """Whether ``ins`` writes memory that overlaps the ``width`` bytes at ``[base+disp]`` (``key``):
    the same base register and overlapping bytes, or a write through the same base whose address
    is not a plain displacement (indexed: it may land anywhere)."""
    for m in _INFO.info(ins).used_memory():
        if m.access not in WRITES or m.base != key[0]:
            continue
        if m.index != ix.Register.NONE:
            return True
        lo = m.displacement & U64
        size = max(ix.MemorySizeExt.size(m.memory_size), 1)
        a = (lo - key[1]) & U64
        b = (key[1] - lo) & U64
        if a < width or b < size:  # the two byte ranges overlap (modulo 2**64)
            return True
    return False


def _merge(width: int, low: int, older: Value, how: str) -> Value:
    if width >= 4:
        return Value(low & ((1 << (8 * width)) - 1), how)
    if not older.known:
        return unknown(f"{8 * width}-bit write over an unknown value ({older.how})")
    m = (1 << (8 * width)) - 1
    return Value((older.value or 0) & ~m | (low & m), f"{how} over {older.how}")


def resolve(fn: Function, idx: int, reg: str, base: int) -> Value:
    """The value of ``reg`` just before instruction ``fn.insns[idx]``.  ``base`` is the address
    offsets are shown from (the region's start)."""
    insns = fn.insns
    for j in range(idx - 1, -1, -1):
        ins = insns[j]
        at = f"{ins.ip - base:#x}"
        fc = ins.flow_control
        if ins.mnemonic == ix.Mnemonic.TDCALL:
            return unknown(f"output of the TDCALL at {at}")
        if fc in (ix.FlowControl.CALL, ix.FlowControl.INDIRECT_CALL) and reg in VOLATILE:
            target = f" (relocated: {r})" if (r := fn.relocated(ins)) else ""
            return unknown(f"set by the call at {at}{target}")
        if not _writes(ins, reg):
            continue
        if (src := fn.skipped(j, idx)) is not None:
            return unknown(f"set on one path only: the jump at {src - base:#x} goes past the write at {at}")
        if (r := fn.relocated(ins)) is not None:
            return unknown(f"filled in at link time by {_fmt(ins)} at {at} (relocation {r})")
        m = ins.mnemonic
        op0 = ins.op0_register if ins.op0_kind == ix.OpKind.REGISTER else ix.Register.NONE
        width = ix.RegisterExt.size(op0) if op0 != ix.Register.NONE else 0
        if m == ix.Mnemonic.MOV and reg_name(op0) == reg:
            k1 = ins.op1_kind
            if k1 in IMMEDIATES:
                older = resolve(fn, j, reg, base) if width < 4 else Value(0, "")
                return _merge(width, _imm(ins, 1), older, "immediate")
            if k1 == ix.OpKind.REGISTER:
                src = reg_name(ins.op1_register)
                if src is None:
                    return unknown(f"copied from {ins.op1_register} at {at}")
                v = resolve(fn, j, src, base)
                how = f"copy of {src}" + (f" ({v.how})" if v.how and v.how != "immediate" else "")
                if v.from_caller:
                    return Value(None, how, v.param, v.mem) if width == 8 else unknown(f"{how}, truncated")
                if width < 4:
                    return _merge(width, v.value or 0, resolve(fn, j, reg, base), how) if v.known else unknown(how)
                return Value(None if v.value is None else v.value & ((1 << (8 * width)) - 1), how)
            if k1 == ix.OpKind.MEMORY:
                return _load(fn, j, reg, width, base)
        if (
            m in (ix.Mnemonic.XOR, ix.Mnemonic.SUB)
            and ins.op_count == 2
            and ins.op1_kind == ix.OpKind.REGISTER
            and ins.op0_register == ins.op1_register
            and reg_name(op0) == reg
        ):
            older = resolve(fn, j, reg, base) if width < 4 else Value(0, "")
            return _merge(width, 0, older, "zeroing idiom")
        if (
            m in (ix.Mnemonic.OR, ix.Mnemonic.AND, ix.Mnemonic.ADD, ix.Mnemonic.SUB)
            and reg_name(op0) == reg
            and ins.op1_kind in IMMEDIATES
            and width >= 4
        ):
            older = resolve(fn, j, reg, base)
            imm = _imm(ins, 1)
            name = {ix.Mnemonic.OR: "or", ix.Mnemonic.AND: "and", ix.Mnemonic.ADD: "add", ix.Mnemonic.SUB: "sub"}[m]
            if not older.known:
                return unknown(f"{name} {imm:#x} over {older.how}")
            a = older.value or 0
            r = {"or": a | imm, "and": a & imm, "add": a + imm, "sub": a - imm}[name]
            return Value(r & ((1 << (8 * width)) - 1), f"{older.how}, {name} {imm:#x}")
        if m == ix.Mnemonic.LEA and reg_name(op0) == reg and width >= 4:
            cut = (1 << (8 * width)) - 1  # lea ecx, [...] keeps the low 32 bits (and zeroes the rest)
            if ins.is_ip_rel_memory_operand:
                return Value(ins.ip_rel_memory_address & cut, "lea of an address")
            b = reg_name(ins.memory_base) if ins.memory_base != ix.Register.NONE else None
            if ins.memory_index == ix.Register.NONE:
                disp = ins.memory_displacement & U64
                if b is None:
                    return Value(disp & cut, "lea of a constant")
                v = resolve(fn, j, b, base)
                if v.known:
                    return Value(((v.value or 0) + disp) & cut, f"{b} + {disp:#x} ({v.how})")
        return unknown(f"computed by {_fmt(ins)} at {at}")
    if fn.exact:
        return Value(None, "from caller", reg)
    return unknown("function start unknown")


def _load(fn: Function, j: int, reg: str, width: int, base: int) -> Value:
    """``reg`` loaded from ``[base+disp]`` at ``fn.insns[j]``: the value an earlier store in the same
    function put there, with the base register unchanged in between."""
    ins = fn.insns[j]
    at = f"{ins.ip - base:#x}"
    key = _mem_key(ins)
    if key is None:
        what = "rip-relative" if ins.is_ip_rel_memory_operand else "indexed"
        return unknown(f"loaded from memory ({what}) at {at}")
    base_reg = reg_name(key[0])
    disp = key[1] - (1 << 64) if key[1] >> 63 else key[1]
    slot = f"[{base_reg}{'-' if disp < 0 else '+'}{abs(disp):#x}]"
    for k in range(j - 1, -1, -1):
        st = fn.insns[k]
        if (
            st.op_count >= 1
            and st.op0_kind == ix.OpKind.MEMORY
            and _mem_key(st) == key
            and st.mnemonic == ix.Mnemonic.MOV
        ):
            size = ix.MemorySizeExt.size(st.memory_size)
            if (src_ip := fn.skipped(k, j)) is not None:
                return unknown(
                    f"loaded from {slot}, set on one path only: the jump at {src_ip - base:#x} goes past the store"
                )
            if (r := fn.relocated(st)) is not None:
                return unknown(f"loaded from {slot}, stored at {st.ip - base:#x} with a relocation ({r})")
            if st.op1_kind in IMMEDIATES:
                v = _imm(st, 1) & ((1 << (8 * size)) - 1) if size < 8 else _imm(st, 1)
                if size < width:
                    return unknown(f"loaded from {slot}, stored only in part at {st.ip - base:#x}")
                return Value(v & ((1 << (8 * width)) - 1), f"loaded from {slot}, stored as an immediate")
            if st.op1_kind == ix.OpKind.REGISTER:
                src = reg_name(st.op1_register)
                if src is None:
                    break
                v = resolve(fn, k, src, base)
                how = f"loaded from {slot}, stored from {src} ({v.how})"
                if size < width:
                    return unknown(f"loaded from {slot}, stored only in part at {st.ip - base:#x}")
                if v.from_caller:
                    return Value(None, how, v.param, v.mem) if size == 8 and width == 8 else unknown(how)
                # the load reads the low ``width`` bytes of what was stored
                return Value((v.value or 0) & ((1 << (8 * width)) - 1), how) if v.known else unknown(how)
            break
        if _writes_over(st, key, width):
            return unknown(f"loaded from memory {slot} at {at}, changed after the store by {_fmt(st)}")
        if base_reg and _writes(st, base_reg):
            return unknown(f"loaded from memory {slot} at {at} ({base_reg} changes before)")
        calls = st.mnemonic == ix.Mnemonic.TDCALL or st.flow_control in (
            ix.FlowControl.CALL,
            ix.FlowControl.INDIRECT_CALL,
        )
        if calls and base_reg not in ("rsp", "rbp"):
            return unknown(f"loaded from memory {slot} at {at}")
    if fn.exact and base_reg and base_reg not in ("rsp", "rbp"):
        return Value(None, f"loaded from {slot} at {at}, {base_reg} as the caller passed it", mem=(base_reg, key[1]))
    return unknown(f"loaded from memory {slot} at {at}")


_FMT = ix.Formatter(ix.FormatterSyntax.INTEL)


def _fmt(ins: ix.Instruction) -> str:
    return _FMT.format(ins)


# --- forward: what a caller stored where, at its call ---------------------------------------------
# A symbolic value: ("const", n) | ("entry", reg, offset) = the caller's own entry value of reg plus
# offset (a pointer it was passed, its stack pointer) | None = not known.
Sym = tuple[Any, ...] | None


def _sym_add(v: Sym, d: int) -> Sym:
    if v is None:
        return None
    if v[0] == "const":
        return ("const", (v[1] + d) & U64)
    return ("entry", v[1], v[2] + d)


@dataclass
class State:
    """Registers and memory of a caller at its call, as far as its straight-line code says.  Memory
    is the list of writes in order: (root, start, end, value, address of the store); ``value`` is a
    symbol for a whole store, ``ZERO`` for a range known to be zero (``rep stos``, a zeroed vector
    register), None for bytes written with something not known."""

    regs: dict[str, Sym]
    mem: list[tuple[Any, int, int, Any, int]]
    zero_xmm: set[int] = field(default_factory=set)

    def load(self, base: Sym, disp: int, size: int) -> tuple[Sym, int] | None:
        """(value, address of the store) of the bytes ``[base+disp, +size)``, or None if nothing
        this function stored covers them."""
        if base is None or base[0] != "entry":
            return None
        root, lo = (base[0], base[1]), base[2] + disp
        for r, start, end, value, at in reversed(self.mem):
            if r != root or end <= lo or start >= lo + size:
                continue
            if value is ZERO and start <= lo and lo + size <= end:
                return ("const", 0), at
            if value is not ZERO and start == lo and end - start >= size:
                if value is not None and value[0] == "const" and end - start > size:
                    return ("const", value[1] & ((1 << (8 * size)) - 1)), at
                return value, at
            return (None, at)
        return None

    def store(self, base: Sym, disp: int, size: int, value: Any, at: int) -> None:
        if base is None or base[0] != "entry":
            self.mem.clear()  # an address not known may be any of them
            return
        self.mem.append(((base[0], base[1]), base[2] + disp, base[2] + disp + size, value, at))


ZERO = object()
_VECTOR_MOVES = frozenset(
    {
        ix.Mnemonic.MOVUPS,
        ix.Mnemonic.MOVAPS,
        ix.Mnemonic.MOVDQU,
        ix.Mnemonic.MOVDQA,
        ix.Mnemonic.VMOVUPS,
        ix.Mnemonic.VMOVAPS,
        ix.Mnemonic.VMOVDQU,
        ix.Mnemonic.VMOVDQA,
        ix.Mnemonic.MOVQ,
    }
)
_VECTOR_ZEROING = frozenset({ix.Mnemonic.PXOR, ix.Mnemonic.XORPS, ix.Mnemonic.VPXOR, ix.Mnemonic.VXORPS})


def _disp(ins: ix.Instruction) -> int:
    d = ins.memory_displacement & U64
    return d - (1 << 64) if d >> 63 else d


def forward(fn: Function, upto: int) -> State:
    """Interpret ``fn.insns[:upto]`` symbolically: constants, copies, ``lea``, stack-pointer moves,
    pushes and pops, stores and loads of ``[reg+disp]``, ``rep stos`` and zeroed vector stores.
    Anything else forgets the registers it writes; a store to an address not known, or a call,
    forgets memory."""
    st = State({r: ("entry", r, 0) for r in GPRS}, [])
    for ins in fn.insns[:upto]:
        m = ins.mnemonic
        op0 = ins.op0_register if ins.op_count and ins.op0_kind == ix.OpKind.REGISTER else ix.Register.NONE
        r0 = reg_name(op0) if op0 != ix.Register.NONE else None
        w0 = ix.RegisterExt.size(op0) if op0 != ix.Register.NONE else 0
        k1 = ins.op1_kind if ins.op_count > 1 else None
        simple = ins.memory_index == ix.Register.NONE and not ins.is_ip_rel_memory_operand
        mbase = st.regs.get(reg_name(ins.memory_base) or "") if ins.memory_base != ix.Register.NONE else None
        if m == ix.Mnemonic.PUSH:
            st.regs["rsp"] = _sym_add(st.regs["rsp"], -8)
            val = st.regs.get(r0) if r0 else (("const", _imm(ins, 0)) if ins.op0_kind in IMMEDIATES else None)
            if fn.relocated(ins) is not None:  # push offset sym in a .o: the value comes at link time
                val = None
            st.store(st.regs["rsp"], 0, 8, val, ins.ip)
            continue
        if m == ix.Mnemonic.POP and r0:
            got = st.load(st.regs["rsp"], 0, 8)
            st.regs[r0] = got[0] if got else None
            st.regs["rsp"] = _sym_add(st.regs["rsp"], 8)
            continue
        if ins.flow_control in (ix.FlowControl.CALL, ix.FlowControl.INDIRECT_CALL) or m == ix.Mnemonic.TDCALL:
            for r in VOLATILE:
                st.regs[r] = None
            st.mem.clear()
            st.zero_xmm.clear()
            continue
        if fn.relocated(ins) is not None:
            m = ix.Mnemonic.INVALID  # filled in at link time: only what it writes is known, forgotten below
        if m == ix.Mnemonic.STOSQ and ins.has_rep_prefix:
            count, fill = st.regs.get("rcx"), st.regs.get("rax")
            if count and count[0] == "const" and fill == ("const", 0):
                st.store(st.regs.get("rdi"), 0, 8 * count[1], ZERO, ins.ip)
            else:
                st.mem.clear()
            st.regs["rdi"] = _sym_add(st.regs.get("rdi"), 8 * count[1]) if count and count[0] == "const" else None
            st.regs["rcx"] = ("const", 0)
            continue
        if m in _VECTOR_ZEROING and ins.op_count >= 2 and ins.op0_kind == ix.OpKind.REGISTER:
            same = all(ins.op_register(i) == ins.op0_register for i in range(1, ins.op_count))
            (st.zero_xmm.add if same else st.zero_xmm.discard)(ix.RegisterExt.number(ins.op0_register))
            continue
        if m in _VECTOR_MOVES and ins.op0_kind == ix.OpKind.MEMORY and k1 == ix.OpKind.REGISTER and simple:
            size = ix.MemorySizeExt.size(ins.memory_size)
            zero = ix.RegisterExt.number(ins.op1_register) in st.zero_xmm and ix.RegisterExt.is_vector_register(
                ins.op1_register
            )
            st.store(mbase, _disp(ins), size, ZERO if zero else None, ins.ip)
            continue
        if m == ix.Mnemonic.MOV and r0 and w0 >= 4:
            if k1 in IMMEDIATES:
                st.regs[r0] = ("const", _imm(ins, 1) & ((1 << (8 * w0)) - 1))
                continue
            if k1 == ix.OpKind.REGISTER:
                src = st.regs.get(reg_name(ins.op1_register) or "")
                st.regs[r0] = (
                    src if w0 == 8 else (("const", src[1] & 0xFFFFFFFF) if src and src[0] == "const" else None)
                )
                continue
            if k1 == ix.OpKind.MEMORY:
                got = st.load(mbase, _disp(ins), w0) if simple else None
                st.regs[r0] = got[0] if got else None
                continue
        if m == ix.Mnemonic.MOV and ins.op0_kind == ix.OpKind.MEMORY:
            size = ix.MemorySizeExt.size(ins.memory_size)
            if not simple:
                st.mem.clear()
                continue
            if k1 in IMMEDIATES:
                val: Any = ("const", _imm(ins, 1) & ((1 << (8 * size)) - 1))
            elif k1 == ix.OpKind.REGISTER:
                src = st.regs.get(reg_name(ins.op1_register) or "")
                val = (
                    src
                    if size == 8
                    else (("const", src[1] & ((1 << (8 * size)) - 1)) if src and src[0] == "const" else None)
                )
            else:
                val = None
            st.store(mbase, _disp(ins), size, val, ins.ip)
            continue
        if m in (ix.Mnemonic.XOR, ix.Mnemonic.SUB) and r0 and k1 == ix.OpKind.REGISTER and op0 == ins.op1_register:
            st.regs[r0] = ("const", 0) if w0 >= 4 else None
            continue
        if m == ix.Mnemonic.LEA and r0 and w0 == 8 and ins.memory_index == ix.Register.NONE:
            if ins.is_ip_rel_memory_operand:
                st.regs[r0] = ("const", ins.ip_rel_memory_address & U64)
            else:
                st.regs[r0] = _sym_add(mbase, _disp(ins))
            continue
        if m in (ix.Mnemonic.ADD, ix.Mnemonic.SUB) and r0 and w0 == 8 and k1 in IMMEDIATES:
            imm = _imm(ins, 1)
            imm = imm - (1 << 64) if imm >> 63 else imm
            st.regs[r0] = _sym_add(st.regs.get(r0), imm if m == ix.Mnemonic.ADD else -imm)
            continue
        # anything else: forget what it writes
        info = _INFO.info(ins)
        for u in info.used_registers():
            if u.access in WRITES:
                if r := reg_name(u.register):
                    st.regs[r] = None
                elif ix.RegisterExt.is_vector_register(u.register):
                    st.zero_xmm.discard(ix.RegisterExt.number(u.register))
        for um in info.used_memory():
            if um.access in WRITES:
                base = st.regs.get(reg_name(um.base) or "") if um.index == ix.Register.NONE else None
                disp = um.displacement & U64
                st.store(
                    base,
                    disp - (1 << 64) if disp >> 63 else disp,
                    ix.MemorySizeExt.size(um.memory_size) or 8,
                    None,
                    ins.ip,
                )
    return st


def memory_at_call(caller: Function, ptr: str, disp: int) -> Value:
    """The value the caller stored at ``[ptr+disp]`` (8 bytes) before its call (the last
    instruction of ``caller``), where ``ptr`` is the register the callee loaded through."""
    st = forward(caller, len(caller.insns) - 1)
    d = disp - (1 << 64) if disp >> 63 else disp
    slot = f"[{ptr}{'-' if d < 0 else '+'}{abs(d):#x}]"
    base = st.regs.get(ptr)
    if base is None or base[0] != "entry":
        return unknown(f"{slot}: the pointer in {ptr} is not known")
    got = st.load(base, d, 8)
    if got is None:
        if base[1] != "rsp" and caller.exact:
            return Value(
                None, f"{slot} not stored here; {base[1]} as its caller passed it", mem=(base[1], (base[2] + d) & U64)
            )
        return unknown(f"{slot} not stored before the call")
    val, at = got
    if val is not None and val[0] == "const":
        return Value(val[1], f"stored to {slot} at {at:#x}" + (" (zeroed)" if val[1] == 0 else ""))
    if val is not None and val[0] == "entry" and val[2] == 0 and caller.exact:
        return Value(None, f"stored to {slot} at {at:#x} from {val[1]} as its caller passed it", val[1])
    return unknown(f"{slot}: stored at {at:#x}, value not known")

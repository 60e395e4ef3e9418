"""Finding TDCALLs in a code region and recovering the registers they are made with.

A site is a TDCALL (bytes 66 0F 01 CC) that a real x86 decoder (iced-x86) decodes as the ``tdcall``
instruction when it decodes the function around it from the function's start.  Bytes that do not
decode so (inside an immediate, in data) are counted, not reported.

Values are recovered by data flow inside the function, walking back from the use along the
straight-line code from the function's start (branches are not followed; a value set on one path
only would be taken as set): immediates, register copies, zeroing idioms (``xor ecx, ecx``), 32-bit
writes (which zero the upper half), 8/16-bit writes (merged with the older value), ``or``/``and``/
``add``/``sub`` with an immediate, ``lea`` of a constant, and loads from a stack slot or struct
field (``[reg+disp]``) that the same function stored a value to earlier with the base register
unchanged.  A value that reaches the function's start is the caller's: every direct ``call`` to the
function is followed and the register is recovered there the same way (one level, and one more when
every caller's caller agrees).  Anything else is said, never guessed: ``loaded from memory``,
``set by the call at ...``, ``from caller, unresolved``.

iced reports no implicit registers for TDCALL: its reads and writes are modelled here (it reads RAX,
and RCX and the exposed GPRs for TDG.VP.VMCALL; it writes RAX, RCX, R10, R11 and the exposed GPRs).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

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


def reg_name(reg: int) -> str | None:
    """The 64-bit GPR name of an iced register (``ecx`` -> ``rcx``), None for others."""
    return _REG.get(ix.RegisterExt.full_register(reg))


@dataclass(frozen=True)
class Value:
    """A recovered register value (None: not known) and how it was found.  ``param`` names the
    register whose value at the function's entry this is (the caller's)."""

    value: int | None
    how: str
    param: str | None = None

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


@dataclass
class Region:
    """One code region prepared for analysis: function starts and direct calls."""

    code: Code
    starts: list[int] = field(default_factory=list)
    calls: dict[int, list[int]] = field(default_factory=dict)  # target -> addresses of call insns

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
        pos = np.flatnonzero(arr[: max(n - 4, 0)] == 0xE8)
        if len(pos):
            rel = (
                arr[pos + 1].astype(np.int64)
                | arr[pos + 2].astype(np.int64) << 8
                | arr[pos + 3].astype(np.int64) << 16
                | arr[pos + 4].astype(np.int64) << 24
            )
            rel = np.where(rel >= 1 << 31, rel - (1 << 32), rel)
            tgt = pos + 5 + rel
            ok = (tgt >= 0) & (tgt < n)
            for p, t in zip(pos[ok].tolist(), tgt[ok].tolist()):
                self.calls.setdefault(t + va, []).append(p + va)
        starts = set(self.code.functions)
        # endbr64 marks function starts in CET-enabled builds (the Linux kernel)
        i = 0
        while (i := data.find(b"\xf3\x0f\x1e\xfa", i)) >= 0:
            starts.add(i + va)
            i += 4
        for t, callers in self.calls.items():
            before = data[t - va - 1] if t > va else 0xC3
            if len(callers) >= 2 or before in (0xC3, 0xCC, 0x90, 0x00):
                starts.add(t)
        starts.add(va)
        self.starts = sorted(starts)

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
            return unknown(f"set by the call at {at}")
        if not _writes(ins, reg):
            continue
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
                if v.param:
                    return Value(None, how, v.param)
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
            if ins.is_ip_rel_memory_operand:
                return Value(ins.ip_rel_memory_address & U64, "lea of an address")
            b = reg_name(ins.memory_base) if ins.memory_base != ix.Register.NONE else None
            if ins.memory_index == ix.Register.NONE:
                disp = ins.memory_displacement & U64
                if b is None:
                    return Value(disp, "lea of a constant")
                v = resolve(fn, j, b, base)
                if v.known:
                    return Value(((v.value or 0) + disp) & U64, f"{b} + {disp:#x} ({v.how})")
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
                if v.param:
                    return Value(None, how, v.param)
                return Value(v.value, how) if v.known else unknown(how)
            break
        if base_reg and _writes(st, base_reg):
            return unknown(f"loaded from memory {slot} at {at} ({base_reg} changes before)")
        calls = st.mnemonic == ix.Mnemonic.TDCALL or st.flow_control in (
            ix.FlowControl.CALL,
            ix.FlowControl.INDIRECT_CALL,
        )
        if calls and base_reg not in ("rsp", "rbp"):
            return unknown(f"loaded from memory {slot} at {at}")
    return unknown(f"loaded from memory {slot} at {at}")


_FMT = ix.Formatter(ix.FormatterSyntax.INTEL)


def _fmt(ins: ix.Instruction) -> str:
    return _FMT.format(ins)

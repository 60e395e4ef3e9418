"""Register ids, names and 64-bit mask values.

Numbering follows KVM's ``enum kvm_reg`` (Linux ``arch/x86/include/asm/kvm_host.h``): the 16 GPRs
in architectural encoding order, which is also the bit position of each GPR in the TDX GPR-select
mask, then the registers KVM caches lazily (RIP, PDPTR, CR0, CR3, CR4, RFLAGS, SEGMENTS,
EXIT_INFO_1, EXIT_INFO_2): 25 in all.  Masks are plain Python integers that always fit 64 bits.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

U64 = (1 << 64) - 1
U32 = (1 << 32) - 1
U128 = (1 << 128) - 1  # an XMM register

GPR_NAMES: tuple[str, ...] = (
    "rax",
    "rcx",
    "rdx",
    "rbx",
    "rsp",
    "rbp",
    "rsi",
    "rdi",
    "r8",
    "r9",
    "r10",
    "r11",
    "r12",
    "r13",
    "r14",
    "r15",
)
EXTRA_NAMES: tuple[str, ...] = (
    "rip",
    "pdptr",
    "cr0",
    "cr3",
    "cr4",
    "rflags",
    "segments",
    "exit_info_1",
    "exit_info_2",
)
REG_NAMES: tuple[str, ...] = GPR_NAMES + EXTRA_NAMES
NR_GPRS = 16
NR_REGS = len(REG_NAMES)  # 25

RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI = range(8)
R8, R9, R10, R11, R12, R13, R14, R15 = range(8, 16)
RIP, PDPTR, CR0, CR3, CR4, RFLAGS, SEGMENTS, EXIT_INFO_1, EXIT_INFO_2 = range(16, 25)

_INDEX = {name: i for i, name in enumerate(REG_NAMES)}

ALL_REGS_MASK = (1 << NR_REGS) - 1  # bits 0..24
GPR_MASK = (1 << NR_GPRS) - 1


class ValueWidthError(ValueError):
    """A value does not fit the fixed width of the field it was given for."""


def bit(reg: int) -> int:
    """The mask bit of register id ``reg``."""
    if not 0 <= reg < NR_REGS:
        raise IndexError(f"register id {reg} out of range 0..{NR_REGS - 1}")
    return 1 << reg


def reg_index(name: str) -> int:
    """Register id of ``name`` (case-insensitive, e.g. ``"R12"`` -> 12)."""
    try:
        return _INDEX[name.strip().lower()]
    except KeyError:
        raise KeyError(f"unknown register {name!r}; accepted: {', '.join(REG_NAMES)}") from None


def reg_name(reg: int) -> str:
    return REG_NAMES[reg]


def mask_of(regs: Iterable[int | str]) -> int:
    """The mask with a bit set for every register (id or name) in ``regs``."""
    m = 0
    for r in regs:
        m |= bit(reg_index(r) if isinstance(r, str) else r)
    return m


def regs_in(mask: int, limit: int = NR_REGS) -> list[int]:
    """Register ids whose bit is set in ``mask`` (ids below ``limit`` only)."""
    return [i for i in range(limit) if mask >> i & 1]


def names_in(mask: int, limit: int = NR_REGS) -> list[str]:
    return [REG_NAMES[i] for i in regs_in(mask, limit)]


def u64(value: int, field: str = "value") -> int:
    """Check that ``value`` fits 64 bits unsigned; a value that does not is an error, never truncated."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueWidthError(f"{field}: expected an integer, got {type(value).__name__}")
    if not 0 <= value <= U64:
        if value >= 0:
            raise ValueWidthError(f"{field}: {value:#x} does not fit 64 bits unsigned")
        hint = f": {value & U64:#x}" if value >= -(1 << 63) else ""  # the value to write, when there is one
        raise ValueWidthError(f"{field}: negative value {value} (write it as 64-bit two's complement{hint})")
    return value


def hex64(value: int) -> str:
    """Lower-case ``0x`` hex with 16 digits: the one format of a register value."""
    return f"0x{value & U64:016x}"


def fmt_mask(mask: int, limit: int = NR_REGS) -> str:
    """A mask in hex with the names of its registers beside it."""
    names = " ".join(names_in(mask, limit))
    return f"{mask:#010x} ({names or 'none'})"


#: what a person writes for an integer: ASCII decimal digits (a leading minus only to be told it is
#: negative) or 0x and hex digits; no sign +, no underscores, no other script's digits
INT_TEXT = re.compile(r"-?[0-9]+|0[xX][0-9a-fA-F]+", re.ASCII)


def parse_int(text: str | int, field: str = "value") -> int:
    """Parse a user-given integer (``int``, decimal string or ``0x`` hex string) that must fit 64
    bits.  Surrounding blanks are ignored; anything else that is not plain decimal or hex (``+5``,
    ``1_000``, ``0x_FF``, Arabic-Indic ``٣``, ``1e3``) is refused."""
    if isinstance(text, bool):
        raise ValueWidthError(f"{field}: expected an integer or hex string, got a boolean")
    if isinstance(text, int):
        return u64(text, field)
    if not isinstance(text, str):
        raise ValueWidthError(f'{field}: expected an integer or a hex string like "0xFFCC"')
    s = text.strip(" \t\r\n")
    if not INT_TEXT.fullmatch(s):
        raise ValueWidthError(f'{field}: {text!r} is not an integer; use decimal or hex like "0xFFCC"')
    if len(s.lstrip("-0xX")) > 40:  # more digits than 128 bits need (and than int() converts quickly)
        raise ValueWidthError(f"{field}: {s[:24]}... does not fit 64 bits unsigned")
    value = int(s, 16) if s[:2].lower() == "0x" else int(s, 10)
    return u64(value, field)

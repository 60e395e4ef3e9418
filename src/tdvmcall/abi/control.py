"""The TDG.VP.VMCALL control value (guest RCX) and the exit qualification the VMM receives.

Source: Intel tdx-module, ``src/td_dispatcher/vm_exits/tdg_vp_vmcall.c`` (control check) and
``src/td_transitions/td_exit.c`` (exit qualification); summarised in docs/abi.md §3.

RCX bits 15:0 select GPRs (bit i = GPR i), 31:16 select XMM0..15, 63:32 are reserved and must be 0.
GPR bits 0 (RAX), 1 (RCX) and 4 (RSP) must be 0, and bit 5 (RBP) must be 0 when the TD has the
NO_RBP_MOD attribute and the module checks it (1.5.01 and later).
"""

from __future__ import annotations

from dataclasses import dataclass

from .codes import TDX_OPERAND_INVALID_RCX
from .regs import RAX, RBP, RCX, RSP, U64, names_in

GPR_SELECT_MASK = 0xFFFF
XMM_SELECT_SHIFT = 16
RESERVED_MASK = 0xFFFFFFFF00000000

#: GPR bits the module always refuses: RAX (status), RCX (the control itself), RSP.
ALWAYS_FORBIDDEN = 1 << RAX | 1 << RCX | 1 << RSP  # 0x0013
NO_RBP_MOD_FORBIDDEN = 1 << RBP  # 0x0020

#: Module behaviours, by the version families the sources distinguish.
MODULE_VERSIONS = ("1.0", "1.5")


def module_family(version: str) -> str:
    """Normalise a module version ("1.0", "1.0.3", "1.5", "1.5.01", "1.5.05") to its family."""
    v = str(version).strip()
    for fam in MODULE_VERSIONS:
        if v == fam or v.startswith(fam + "."):
            return fam
    raise ValueError(f"unknown TDX module version {version!r}; accepted: 1.0, 1.5 (or 1.0.3, 1.5.01, 1.5.05)")


def checks_rbp(module: str, no_rbp_mod: bool) -> bool:
    """Whether the module refuses RBP in gpr_select: only a 1.5 module (1.5.01 and later) checks
    bit 5, and only for a TD with NO_RBP_MOD."""
    return no_rbp_mod and module_family(module) == "1.5"


def forbidden_gprs(module: str = "1.5", no_rbp_mod: bool = True) -> int:
    """The gpr_select bits the module refuses for this TD."""
    return ALWAYS_FORBIDDEN | (NO_RBP_MOD_FORBIDDEN if checks_rbp(module, no_rbp_mod) else 0)


@dataclass(frozen=True)
class _Selects:
    """A 64-bit value whose bits 15:0 select GPRs and 31:16 XMMs (the control and the exit
    qualification share this layout)."""

    raw: int

    @property
    def gpr_select(self) -> int:
        return self.raw & GPR_SELECT_MASK

    @property
    def xmm_select(self) -> int:
        return self.raw >> XMM_SELECT_SHIFT & 0xFFFF

    @property
    def gpr_names(self) -> frozenset[str]:
        """The names of the GPRs ``gpr_select`` selects."""
        return frozenset(names_in(self.gpr_select, 16))


@dataclass(frozen=True)
class Control(_Selects):
    """A parsed control value (guest RCX)."""

    @property
    def reserved(self) -> int:
        return self.raw & RESERVED_MASK

    def problems(self, module: str = "1.5", no_rbp_mod: bool = True) -> list[str]:
        """Why the module would refuse this control (empty: it accepts it)."""
        out = []
        bad = self.gpr_select & forbidden_gprs(module, no_rbp_mod)
        if bad:
            out.append(
                f"gpr_select exposes {' '.join(names_in(bad, 16))}, which the module refuses"
                + (" (RBP: NO_RBP_MOD)" if bad & NO_RBP_MOD_FORBIDDEN else "")
            )
        if self.reserved:
            out.append(f"reserved bits 63:32 are {self.reserved >> 32:#x}, must be 0")
        return out


def check_control(rcx: int, module: str = "1.5", no_rbp_mod: bool = True) -> int | None:
    """The module's control check: ``None`` if accepted, else the status the guest gets in RAX
    (``TDX_OPERAND_INVALID`` with operand id RCX = 0xC000010000000001)."""
    return TDX_OPERAND_INVALID_RCX if Control(rcx & U64).problems(module, no_rbp_mod) else None


def build_control(gprs: int, xmms: int = 0) -> int:
    """A control value from a GPR mask and an XMM mask."""
    if gprs & ~GPR_SELECT_MASK or xmms & ~0xFFFF:
        raise ValueError("gpr and xmm selects are 16-bit masks")
    return gprs | xmms << XMM_SELECT_SHIFT


def build_exit_qualification(rcx: int, module: str = "1.5", vm: int = 0) -> int:
    """The exit qualification the VMM receives in RCX: gpr_select | xmm_select << 16 | vm << 32
    (vm = 0 for an L1 TD).  Module 1.0 passes the raw guest RCX, which equals the 1.5 value for an
    L1 TD whenever the control was accepted (its reserved bits are then 0)."""
    if module_family(module) == "1.0":
        return rcx
    c = Control(rcx)
    return c.gpr_select | c.xmm_select << XMM_SELECT_SHIFT | (vm & 0x3) << 32


@dataclass(frozen=True)
class ExitQualification(_Selects):
    """The exit qualification the VMM receives in RCX: the selects plus the VM index (33:32)."""

    @property
    def vm(self) -> int:
        return self.raw >> 32 & 0x3

    @property
    def other_bits(self) -> int:
        return self.raw & ~0x3FFFFFFFF & U64

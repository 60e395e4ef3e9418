"""TDX module status codes, operand ids, TDVMCALL statuses, VMX exit reasons and KVM hypercall codes.

The TDX module tables (name -> value, per module version) are the shipped
``data/tdx-module-status-codes.csv`` (MIT, Intel; see ``data/NOTICE.md``), extracted from
``include/auto_gen/tdx_error_codes_defs.h`` of Intel's tdx-module.  The layout of a status
(``api_error_code_t``) is in the same module source; see :func:`status_fields`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import cache
from typing import Any

from .. import data_file
from .regs import U64

# --- TDX module statuses used by the model (module 1.5 values; also 1.0's for these names) -------
TDX_SUCCESS = 0x0000000000000000
TDX_OPERAND_INVALID = 0xC000010000000000
OPERAND_ID_RAX = 0
OPERAND_ID_RCX = 1
TDX_OPERAND_INVALID_RCX = TDX_OPERAND_INVALID | OPERAND_ID_RCX  # 0xC000010000000001

MODULE_TABLE_VERSIONS = ("1.0.3", "1.5.01", "1.5.05")

# --- TDCALL leaves (guest RAX) ---------------------------------------------------------------------
# RAX of a TDCALL (tdx-module 1.5.01 ``include/tdx_api_defs.h``, ``tdx_leaf_and_version_t``): bits 15:0
# the leaf, 23:16 the version, 63:24 reserved.  Leaf numbers: ``tdcall_leaf_opcode_t`` (same file);
# the dispatcher's checks: ``src/td_dispatcher/tdx_td_dispatcher.c``, ``td_call()``.
TDCALL_LEAVES: dict[int, str] = {
    0: "TDG.VP.VMCALL",
    1: "TDG.VP.INFO",
    2: "TDG.MR.RTMR.EXTEND",
    3: "TDG.VP.VEINFO.GET",
    4: "TDG.MR.REPORT",
    5: "TDG.VP.CPUIDVE.SET",
    6: "TDG.MEM.PAGE.ACCEPT",
    7: "TDG.VM.RD",
    8: "TDG.VM.WR",
    9: "TDG.VP.RD",
    10: "TDG.VP.WR",
    11: "TDG.SYS.RD",
    12: "TDG.SYS.RDALL",
    18: "TDG.SERVTD.RD",
    20: "TDG.SERVTD.WR",
    22: "TDG.MR.VERIFYREPORT",
    23: "TDG.MEM.PAGE.ATTR.RD",
    24: "TDG.MEM.PAGE.ATTR.WR",
    25: "TDG.VP.ENTER",
    26: "TDG.VP.INVEPT",
    27: "TDG.VP.INVVPID",
}
TDCALL_VP_VMCALL = 0
TDCALL_VM_RD = 7
#: the highest version the dispatcher lets through, per leaf (1.5.01: only TDG.VM.RD goes past 0)
TDCALL_DISPATCHER_MAX_VERSION: dict[int, int] = {TDCALL_VM_RD: 255}
#: the highest version the leaf itself accepts (TDG.VM.RD: 1, checked in ``tdg_vm_rd_wr.c``)
TDCALL_LEAF_MAX_VERSION: dict[int, int] = {TDCALL_VM_RD: 1}
TDCALL_RESERVED_MASK = 0xFFFFFFFFFF000000


@dataclass(frozen=True)
class TdcallRax:
    """A TDCALL's RAX split into its fields."""

    raw: int

    @property
    def leaf(self) -> int:
        return self.raw & 0xFFFF

    @property
    def version(self) -> int:
        return self.raw >> 16 & 0xFF

    @property
    def reserved(self) -> int:
        return self.raw & TDCALL_RESERVED_MASK

    @property
    def name(self) -> str | None:
        return TDCALL_LEAVES.get(self.leaf)


def tdcall_rax_problems(rax: int) -> list[str]:
    """Why the TDX module (1.5.01) fails a TDCALL with this RAX back to the guest with
    ``TDX_OPERAND_INVALID`` (operand RAX); empty: the module accepts it and runs the leaf.
    In the dispatcher's order (``td_call()``): reserved bits 63:24, a version the dispatcher does not
    let through (anything but 0, except TDG.VM.RD), an unknown leaf; then TDG.VM.RD's own check of
    its version (``tdg_vm_rd_wr.c``: versions 0 and 1)."""
    r = TdcallRax(rax)
    if r.reserved:
        return [f"reserved bits 63:24 are {r.reserved >> 24:#x}, must be 0"]
    if r.version > TDCALL_DISPATCHER_MAX_VERSION.get(r.leaf, 0):
        return [f"version {r.version} is not accepted for leaf {r.leaf} ({r.name or 'unknown leaf'}): only 0"]
    if r.name is None:
        return [f"leaf {r.leaf} is not a TDCALL leaf of module 1.5.01"]
    if r.version > TDCALL_LEAF_MAX_VERSION.get(r.leaf, 0):
        return [f"version {r.version} is refused by {r.name} itself (versions 0..{TDCALL_LEAF_MAX_VERSION[r.leaf]})"]
    return []


def check_tdcall_rax(rax: int) -> int | None:
    """The module's RAX check: ``None`` if it accepts this TDCALL RAX, else the status the guest gets
    in RAX (``TDX_OPERAND_INVALID`` with operand id RAX = 0xC000010000000000)."""
    return TDX_OPERAND_INVALID | OPERAND_ID_RAX if tdcall_rax_problems(rax) else None


def tdcall_rax_accepted(rax: int) -> bool:
    """Whether the TDX module (1.5.01) accepts a TDCALL with this RAX (leaf, version, reserved bits)."""
    return not tdcall_rax_problems(rax)


def tdcall_leaf_text(rax: int) -> str:
    """The TDCALL leaf of a RAX as a phrase: ``"TDCALL leaf 1, TDG.VP.INFO"``."""
    r = TdcallRax(rax)
    version = f" version {r.version}" if r.version else ""
    return f"TDCALL leaf {r.leaf}{version}, {r.name or 'unknown leaf'}"


DEFAULT_TABLE_VERSION = "1.5.05"

# --- VMX basic exit reasons KVM reports for TD exits (Linux arch/x86/include/uapi/asm/vmx.h) -------
EXIT_REASON_CPUID = 10
EXIT_REASON_HLT = 12
EXIT_REASON_VMCALL = 18
EXIT_REASON_IO_INSTRUCTION = 30
EXIT_REASON_MSR_READ = 31
EXIT_REASON_MSR_WRITE = 32
EXIT_REASON_EPT_MISCONFIG = 49
EXIT_REASON_TDCALL = 77
#: bit 26 of the exit reason: a bus lock was detected (tdx-module ``vmcs_defs.h`` bus_lock_preempted;
#: Linux ``union vmx_exit_reason`` bus_lock_detected)
EXIT_REASON_BUS_LOCK_DETECTED = 1 << 26

VMX_EXIT_REASON_NAMES = {
    EXIT_REASON_CPUID: "CPUID",
    EXIT_REASON_HLT: "HLT",
    EXIT_REASON_VMCALL: "VMCALL",
    EXIT_REASON_IO_INSTRUCTION: "IO_INSTRUCTION",
    EXIT_REASON_MSR_READ: "MSR_READ",
    EXIT_REASON_MSR_WRITE: "MSR_WRITE",
    EXIT_REASON_EPT_MISCONFIG: "EPT_MISCONFIG",
    EXIT_REASON_TDCALL: "TDCALL",
}


def kvm_exit_reason_text(reason: int) -> str:
    """The ``reason`` field of a ``kvm_exit`` trace line (Linux ``arch/x86/kvm/trace.h``,
    ``kvm_print_exit_reason``): the name of the basic reason (bits 15:0), then, when any bit above 15
    is set, a space and those bits as flags: ``FAILED_VMENTRY`` for bit 31 (the only flag
    ``VMX_EXIT_REASON_FLAGS`` names), the others as one hex number (``TDCALL 0x4000000``)."""
    basic = reason & 0xFFFF
    name = VMX_EXIT_REASON_NAMES.get(basic, f"0x{basic:x}")
    flags = reason & ~0xFFFF & 0xFFFFFFFF
    if not flags:
        return name
    parts = []
    if flags & 1 << 31:
        parts.append("FAILED_VMENTRY")
        flags &= ~(1 << 31)
    if flags:
        parts.append(f"0x{flags:x}")
    return f"{name} {' '.join(parts)}"


# --- TDVMCALL statuses returned in R10 (GHCI; Linux arch/x86/include/asm/shared/tdx.h) ------------
TDVMCALL_SUCCESS = 0x0000000000000000
TDVMCALL_RETRY = 0x0000000000000001
TDVMCALL_INVALID_OPERAND = 0x8000000000000000
TDVMCALL_GPA_INUSE = 0x8000000000000001
TDVMCALL_ALIGN_ERROR = 0x8000000000000002
TDVMCALL_SUBFUNC_UNSUPPORTED = 0x8000000000000003

TDVMCALL_STATUS_NAMES = {
    TDVMCALL_SUCCESS: "SUCCESS",
    TDVMCALL_RETRY: "RETRY",
    TDVMCALL_INVALID_OPERAND: "INVALID_OPERAND",
    TDVMCALL_GPA_INUSE: "GPA_INUSE",
    TDVMCALL_ALIGN_ERROR: "ALIGN_ERROR",
    TDVMCALL_SUBFUNC_UNSUPPORTED: "SUBFUNC_UNSUPPORTED",
}

# --- KVM hypercalls (include/uapi/linux/kvm_para.h) and their errors ----------------------------
KVM_ENOSYS = 1000
KVM_EFAULT = 14
KVM_EINVAL = 22
KVM_E2BIG = 7
KVM_EPERM = 1
KVM_EOPNOTSUPP = 95


def neg(errno: int) -> int:
    """``-errno`` as a 64-bit two's-complement register value."""
    return (-errno) & U64


# --- userspace (errno values a VMM returns through kvm_run) -------------------------------------
EAGAIN = 11
EINVAL = 22


@dataclass(frozen=True)
class StatusTable:
    version: str
    status_by_value: dict[int, str]
    operand_by_value: dict[int, str]
    status_by_name: dict[str, int]


@cache
def status_table(version: str = DEFAULT_TABLE_VERSION) -> StatusTable:
    """The module status/operand-id table of one module version (from the shipped CSV)."""
    if version not in MODULE_TABLE_VERSIONS:
        raise KeyError(f"unknown module version {version!r}; accepted: {', '.join(MODULE_TABLE_VERSIONS)}")
    status: dict[int, str] = {}
    operand: dict[int, str] = {}
    by_name: dict[str, int] = {}
    with data_file("tdx-module-status-codes.csv").open() as f:
        for row in csv.DictReader(f):
            if row["module_version"] != version:
                continue
            value = int(row["value_hex"], 16)
            if row["kind"] == "status":
                status.setdefault(value, row["name"])
                by_name[row["name"]] = value
            else:
                operand.setdefault(value, row["name"])
    return StatusTable(version, status, operand, by_name)


def status_fields(value: int) -> dict[str, int | bool]:
    """Split a TDX status into the fields of ``api_error_code_t`` (tdx-module ``include/tdx_api_defs.h``
    and the ABI notes): bits 31:0 operand id / details L2, 39:32 details L1, 47:40 class,
    60 host-recoverability hint, 61 fatal, 62 non-recoverable, 63 error."""
    return {
        "details_l2": value & 0xFFFFFFFF,
        "details_l1": value >> 32 & 0xFF,
        "class": value >> 40 & 0xFF,
        "host_recoverability_hint": bool(value >> 60 & 1),
        "fatal": bool(value >> 61 & 1),
        "non_recoverable": bool(value >> 62 & 1),
        "error": bool(value >> 63 & 1),
    }


def status_name(value: int, version: str = DEFAULT_TABLE_VERSION) -> str | None:
    """Name of a TDX status: an exact match, or the name of its status part (bits 63:32)
    with the low 32 bits read as an operand id."""
    t = status_table(version)
    if value in t.status_by_value:
        return t.status_by_value[value]
    return t.status_by_value.get(value & 0xFFFFFFFF00000000)


def decode_status(value: int, version: str = DEFAULT_TABLE_VERSION) -> dict[str, Any]:
    """Explain a TDX module status: its name (an exact match, or the status part, bits 63:32), its
    fields and, for an operand error (``TDX_OPERAND_*``), the operand id in bits 31:0 and its name."""
    t = status_table(version)
    base = value & 0xFFFFFFFF00000000
    name = t.status_by_value.get(value) or t.status_by_value.get(base)
    out: dict[str, Any] = {
        "kind": "tdx-status",
        "module": version,
        "value": value,
        "name": name,
        "known": name is not None,
    }
    out.update(status_fields(value))
    base_name = t.status_by_value.get(base)
    if base_name is not None and base_name.startswith("TDX_OPERAND"):
        op = value & 0xFFFFFFFF
        out["operand_id"] = op
        out["operand_name"] = t.operand_by_value.get(op)
    out["in_other_versions"] = {
        v: n for v in MODULE_TABLE_VERSIONS if v != version and (n := status_name(value, v)) is not None and n != name
    }
    return out


def decode_tdvmcall_status(value: int) -> dict[str, Any]:
    return {
        "kind": "tdvmcall-status",
        "value": value,
        "name": TDVMCALL_STATUS_NAMES.get(value),
        "known": value in TDVMCALL_STATUS_NAMES,
        "error": bool(value >> 63 & 1),
    }

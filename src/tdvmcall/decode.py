"""Explain a 64-bit value from a log: a TDX module status, a TDVMCALL status, a control value, an
exit qualification or a TDCALL's RAX.  Pure data in, plain dict out (the CLI renders it)."""

from __future__ import annotations

from .abi.codes import (
    DEFAULT_TABLE_VERSION,
    MODULE_TABLE_VERSIONS,
    TDVMCALL_STATUS_NAMES,
    TdcallRax,
    check_tdcall_rax,
    decode_status,
    decode_tdvmcall_status,
    status_name,
    tdcall_rax_problems,
)
from .abi.control import Control, ExitQualification, check_control
from .abi.regs import names_in
from .kvm import leaves as L

KINDS = ("status", "tdvmcall-status", "control", "exitqual", "tdcall-rax")


def _gpr_list(mask: int) -> list[str]:
    return names_in(mask & 0xFFFF, 16)


def _calls_satisfied(gpr_select: int) -> list[str]:
    """Calls hardened KVM would complete with this mask under every case of the leaf table."""
    return [leaf.name for leaf in L.LEAVES if not any(L.missing_by_case(leaf, gpr_select).values())]


def decode_control(value: int) -> dict:
    c = Control(value)
    acceptance = {
        "module 1.5, NO_RBP_MOD (KVM's TDs)": c.problems("1.5", True),
        "module 1.5, no NO_RBP_MOD": c.problems("1.5", False),
        "module 1.0": c.problems("1.0", False),
    }
    return {
        "kind": "control",
        "value": value,
        "gpr_select": c.gpr_select,
        "gprs": _gpr_list(c.gpr_select),
        "xmm_select": c.xmm_select,
        "xmms": [f"xmm{i}" for i in range(16) if c.xmm_select >> i & 1],
        "reserved": c.reserved,
        "accepted": {k: not v for k, v in acceptance.items()},
        "problems": {k: v for k, v in acceptance.items() if v},
        "module_status_if_rejected": check_control(value, "1.5", True),
        "hardened_completes": _calls_satisfied(c.gpr_select) if not c.problems("1.5", True) else [],
        "known": True,
    }


def decode_exitqual(value: int) -> dict:
    q = ExitQualification(value)
    return {
        "kind": "exitqual",
        "value": value,
        "gpr_select": q.gpr_select,
        "gprs": _gpr_list(q.gpr_select),
        "xmm_select": q.xmm_select,
        "xmms": [f"xmm{i}" for i in range(16) if q.xmm_select >> i & 1],
        "vm": q.vm,
        "other_bits": q.other_bits,
        "known": q.other_bits == 0,
    }


def decode_tdcall_rax(value: int) -> dict:
    """A TDCALL's RAX: the leaf (named from the TDX module 1.5.01 table), the version, the reserved
    bits, and whether the module accepts it (``abi.codes.tdcall_rax_problems``)."""
    r = TdcallRax(value)
    problems = tdcall_rax_problems(value)
    return {
        "kind": "tdcall-rax",
        "value": value,
        "leaf": r.leaf,
        "name": r.name,
        "version": r.version,
        "reserved": r.reserved,
        "accepted": not problems,
        "problems": problems,
        "status": check_tdcall_rax(value),
        "tdvmcall": r.raw == 0,
        "known": r.name is not None,
    }


def guess_kind(value: int, version: str = DEFAULT_TABLE_VERSION) -> tuple[str, str]:
    """Pick a reading for a value with no ``--as``, and say why."""
    if value >> 63 and value in TDVMCALL_STATUS_NAMES:
        return "tdvmcall-status", "bit 63 set and equal to a GHCI TDVMCALL status"
    if value >> 32:
        for v in (version, *MODULE_TABLE_VERSIONS):
            if status_name(value, v) is not None:
                return "status", f"bits 63:32 match a TDX module {v} status"
    if value <= 0xFFFFFFFF:
        return "control", "fits 32 bits: read as a TDG.VP.VMCALL control (RCX)"
    if value <= 0x3FFFFFFFF:
        return "exitqual", "bits 33:32 set, nothing above: read as an exit qualification (VM index)"
    return "status", "no better reading: shown as a TDX status with its bit fields"


def decode(value: int, kind: str | None = None, version: str = DEFAULT_TABLE_VERSION) -> dict:
    """Explain ``value``; ``kind`` one of :data:`KINDS` or None to guess (the answer says which)."""
    why = "as requested"
    if kind is None:
        kind, why = guess_kind(value, version)
    if kind == "status":
        out = decode_status(value, version)
    elif kind == "tdvmcall-status":
        out = decode_tdvmcall_status(value)
    elif kind == "control":
        out = decode_control(value)
    elif kind == "exitqual":
        out = decode_exitqual(value)
    elif kind == "tdcall-rax":
        out = decode_tdcall_rax(value)
    else:
        raise ValueError(f"unknown reading {kind!r}; accepted: {', '.join(KINDS)}")
    out["reading"] = kind
    out["why"] = why
    return out

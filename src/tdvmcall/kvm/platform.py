"""The host side a TDVMCALL handler talks to: KVM's in-kernel state (CPUID table, emulated MSRs,
vCPUs) and userspace (the VMM, e.g. QEMU) reached through ``kvm_run`` exits.

Everything is deterministic so that every leaf does something visible.  Userspace exits are recorded
as events with the fields KVM fills in ``struct kvm_run`` (Linux ``include/uapi/linux/kvm.h``);
userspace's answer comes from :class:`Userspace`, configurable per scenario, and completes the call.
Facts: ABI.md §4; default userspace behaviour follows QEMU ``target/i386/kvm/tdx.c`` where the ABI
notes say so, and is otherwise a plain deterministic fake (said where it is).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from ..abi.codes import (
    TDVMCALL_ALIGN_ERROR,
    TDVMCALL_INVALID_OPERAND,
    TDVMCALL_SUCCESS,
)
from ..abi.regs import U64

KVM_EXIT_HYPERCALL = "KVM_EXIT_HYPERCALL"
KVM_EXIT_TDX = "KVM_EXIT_TDX"
KVM_EXIT_IO = "KVM_EXIT_IO"
KVM_EXIT_MMIO = "KVM_EXIT_MMIO"
KVM_EXIT_SYSTEM_EVENT = "KVM_EXIT_SYSTEM_EVENT"
KVM_EXIT_X86_RDMSR = "KVM_EXIT_X86_RDMSR"
KVM_EXIT_X86_WRMSR = "KVM_EXIT_X86_WRMSR"
KVM_EXIT_INTERNAL_ERROR = "KVM_EXIT_INTERNAL_ERROR"

KVM_SYSTEM_EVENT_TDX_FATAL = 7
KVM_EXIT_HYPERCALL_LONG_MODE = 1
KVM_MAP_GPA_RANGE_ENCRYPTED = 0x10
KVM_MAP_GPA_RANGE_DECRYPTED = 0
PAGE_SIZE = 0x1000
#: CPUID leaves whose sub-leaf (ECX) selects the entry
INDEXED_CPUID_LEAVES = frozenset({0x4, 0x7, 0xB, 0xD, 0xF, 0x10, 0x12, 0x14, 0x17, 0x18, 0x1D, 0x1F, 0x24})


def _vendor_cpuid() -> dict[tuple[int, int], tuple[int, int, int, int]]:
    """A small Intel-like CPUID table ("GenuineIntel", max basic leaf 0xD, a KVM signature)."""
    return {
        (0x0, 0): (0xD, 0x756E6547, 0x6C65746E, 0x49656E69),  # max leaf, "Genu" "ntel" "ineI"
        (0x1, 0): (0x000806F8, 0x00010800, 0xF7FA3203, 0x1F8BFBFF),
        (0x7, 0): (0x2, 0xF1BF2FFB, 0x1B415F6E, 0xBC184410),
        (0xB, 0): (0x1, 0x1, 0x100, 0x0),
        (0xD, 0): (0x2E7, 0x0, 0x2E7, 0x0),
        (0x40000000, 0): (0x40000001, 0x4B4D564B, 0x564B4D56, 0x4D),  # "KVMKVMKVM"
        (0x40000001, 0): (0x01007AFB, 0x0, 0x0, 0x0),
        (0x80000000, 0): (0x80000008, 0x0, 0x0, 0x0),
        (0x80000008, 0): (0x3034, 0x0, 0x0, 0x0),
    }


def _emulated_msrs() -> dict[int, int]:
    """MSRs KVM emulates for a TD in this fake (x2APIC registers and a few others)."""
    return {
        0x01B: 0xFEE00D00,  # IA32_APIC_BASE: x2APIC enabled, BSP
        0x6E0: 0x0,  # IA32_TSC_DEADLINE
        0x802: 0x0,  # x2APIC ID
        0x803: 0x50014,  # x2APIC version
        0x808: 0x0,  # TPR
        0x80F: 0x1FF,  # SVR
    }


WRITABLE_MSRS = frozenset({0x6E0, 0x808, 0x80B, 0x80F, 0x830})


@dataclass
class Userspace:
    """Userspace's answers, looked up when KVM exits to it.  Lists are consumed one per exit."""

    hypercall_ret: list[int] = field(default_factory=list)  # KVM_EXIT_HYPERCALL ret per exit (default 0)
    tdx_ret: int | None = None  # KVM_EXIT_TDX ret; None: QEMU's own answer
    tdvmcall_info: tuple[int, int, int, int] = (0x2, 0, 0, 0)  # GetTdVmCallInfo leaf 1 R11..R14 (QEMU: bit 1)
    ports: dict[int, int] = field(default_factory=lambda: {0x3FD: 0x60})  # IN answers (UART LSR)
    mmio: dict[int, int] = field(default_factory=lambda: {0xFEB00000: 0x12345678})  # read answers
    rdmsr: dict[int, int] = field(default_factory=dict)  # answers when MSR exits are enabled
    msr_error: bool = False

    def next_hypercall_ret(self) -> int:
        return self.hypercall_ret.pop(0) if self.hypercall_ret else 0


@dataclass
class Platform:
    """KVM's in-kernel state and the userspace it exits to."""

    cpuid: dict[tuple[int, int], tuple[int, int, int, int]] = field(default_factory=_vendor_cpuid)
    msrs: dict[int, int] = field(default_factory=_emulated_msrs)
    writable_msrs: frozenset[int] = WRITABLE_MSRS
    msr_exits: bool = False  # userspace asked for KVM_EXIT_X86_RDMSR/WRMSR on unhandled MSRs
    exit_hypercall_map_gpa: bool = True  # KVM_CAP_EXIT_HYPERCALL bit 12 (QEMU enables it)
    gpaw: int = 52  # the TD's guest physical address width: shared bit = bit gpaw - 1
    maxphyaddr: int = 52
    pending_event: bool = False  # an interrupt is pending between MapGPA chunks
    apic_ids: tuple[int, ...] = (0, 1, 2, 3)
    host_clock_suitable: bool = True  # CLOCK_PAIRING needs a TSC-based host clock
    tree: str = "kvm-x86"  # "kvm-x86" (2026) or "v6.16"
    userspace: Userspace = field(default_factory=Userspace)
    # recorded side effects
    exits: list[dict[str, Any]] = field(default_factory=list)
    effects: list[str] = field(default_factory=list)
    memory: dict[int, int] = field(default_factory=dict)  # 8-byte words userspace devices hold (MMIO writes)

    # --- address helpers ----------------------------------------------------------------------
    @property
    def shared_bit(self) -> int:
        return 1 << (self.gpaw - 1)

    def is_shared(self, gpa: int) -> bool:
        return bool(gpa & self.shared_bit)

    def is_legal_gpa(self, gpa: int) -> bool:
        return gpa >> self.maxphyaddr == 0

    def snapshot(self) -> dict[str, Any]:
        """Everything a call could change (for the no-side-effect property)."""
        return {
            "msrs": dict(self.msrs),
            "exits": copy.deepcopy(self.exits),
            "effects": list(self.effects),
            "memory": dict(self.memory),
            "userspace": copy.deepcopy(self.userspace),
        }

    # --- in kernel ----------------------------------------------------------------------------
    def kvm_cpuid(self, leaf: int, subleaf: int) -> tuple[int, int, int, int]:
        """arch/x86/kvm/cpuid.c kvm_cpuid(): the table entry (the sub-leaf matters only for indexed
        leaves); for a leaf above the maximum of its class, on an Intel guest, the entry of the max
        basic leaf; zeros otherwise."""
        key = (leaf, subleaf if leaf in INDEXED_CPUID_LEAVES else 0)
        if key in self.cpuid:
            return self.cpuid[key]
        class_base = leaf & 0xC0000000 if leaf & 0x80000000 else leaf & 0xF0000000
        top = self.cpuid.get((class_base, 0))
        if top is not None and leaf > top[0]:
            basic_max = self.cpuid[(0, 0)][0]
            key = (basic_max, subleaf if basic_max in INDEXED_CPUID_LEAVES else 0)
            return self.cpuid.get(key, (0, 0, 0, 0))
        return (0, 0, 0, 0)

    def halt(self, interrupts_blocked: bool) -> None:
        self.effects.append("vCPU halted" + (" with interrupts blocked" if interrupts_blocked else ""))

    def msr_read(self, index: int) -> tuple[bool, int]:
        if index in self.msrs:
            return True, self.msrs[index]
        if self.msr_exits:
            self.exits.append({"reason": KVM_EXIT_X86_RDMSR, "index": index})
            ok = not self.userspace.msr_error and index in self.userspace.rdmsr
            return ok, self.userspace.rdmsr.get(index, 0)
        return False, 0

    def msr_write(self, index: int, value: int) -> bool:
        if index in self.writable_msrs:
            self.msrs[index] = value
            self.effects.append(f"MSR {index:#x} <- {value:#x}")
            return True
        if self.msr_exits:
            self.exits.append({"reason": KVM_EXIT_X86_WRMSR, "index": index, "data": value})
            return not self.userspace.msr_error
        return False

    # --- userspace exits ----------------------------------------------------------------------
    def io(self, port: int, size: int, write: bool, data: int) -> int:
        """KVM_EXIT_IO (count 1); returns the data an IN reads (unknown ports read all ones)."""
        self.exits.append(
            {
                "reason": KVM_EXIT_IO,
                "direction": "out" if write else "in",
                "size": size,
                "port": port,
                "count": 1,
                "data": data if write else None,
            }
        )
        if write:
            return 0
        return self.userspace.ports.get(port, U64) & ((1 << 8 * size) - 1)

    def mmio(self, gpa: int, size: int, write: bool, data: int) -> int:
        """KVM_EXIT_MMIO with the shared bit cleared; unknown addresses read all ones."""
        self.exits.append(
            {"reason": KVM_EXIT_MMIO, "phys_addr": gpa, "len": size, "is_write": write, "data": data if write else None}
        )
        if write:
            self.memory[gpa] = data
            return 0
        return self.memory.get(gpa, self.userspace.mmio.get(gpa, U64)) & ((1 << 8 * size) - 1)

    def hypercall_exit(self, nr: int, args: tuple[int, int, int]) -> int:
        """KVM_EXIT_HYPERCALL; returns userspace's ``ret``."""
        ret = self.userspace.next_hypercall_ret()
        self.exits.append(
            {
                "reason": KVM_EXIT_HYPERCALL,
                "nr": nr,
                "args": list(args),
                "flags": KVM_EXIT_HYPERCALL_LONG_MODE,
                "ret": ret,
            }
        )
        return ret

    def tdx_exit(self, nr: int, fields: dict[str, int], qemu_answer: int) -> int:
        """KVM_EXIT_TDX for one sub-function; returns the ret userspace writes (``tdx_ret`` if set,
        else QEMU's answer)."""
        ret = self.userspace.tdx_ret if self.userspace.tdx_ret is not None else qemu_answer
        self.exits.append({"reason": KVM_EXIT_TDX, "nr": nr, **fields, "ret": ret})
        return ret

    def system_event(self, event_type: int, data: list[int], **fields: Any) -> None:
        self.exits.append(
            {"reason": KVM_EXIT_SYSTEM_EVENT, "type": event_type, "ndata": len(data), "data": list(data), **fields}
        )

    def internal_error(self, why: str) -> None:
        self.exits.append({"reason": KVM_EXIT_INTERNAL_ERROR, "why": why})

    # --- QEMU's answers (target/i386/kvm/tdx.c, second-hand through the ABI notes) ------------
    @staticmethod
    def qemu_get_quote(gpa: int, size: int) -> int:
        if size == 0:
            return TDVMCALL_INVALID_OPERAND
        if gpa % PAGE_SIZE or size % PAGE_SIZE:
            return TDVMCALL_ALIGN_ERROR
        return TDVMCALL_SUCCESS


__all__ = ["Platform", "Userspace"]

"""The host side a TDVMCALL handler talks to: KVM's in-kernel state (CPUID table, emulated MSRs,
vCPUs) and userspace (the VMM, e.g. QEMU) reached through ``kvm_run`` exits.

Everything is deterministic so that every leaf does something visible.  Userspace exits are recorded
as events with the fields KVM fills in ``struct kvm_run`` (Linux ``include/uapi/linux/kvm.h``);
userspace's answer comes from :class:`Userspace`, configurable per scenario, and completes the call.
Facts: docs/abi.md §4; default userspace behaviour follows QEMU ``target/i386/kvm/tdx.c`` where the ABI
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
from .trees import DEFAULT_TREE, KVM_EXIT_X86_BUS_LOCK, KVM_RUN_X86_BUS_LOCK, X2APIC_DENY_LIST, TreeRule, tree_rule

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
#: QEMU 05caf269 ``target/i386/kvm/tdx-quote-generator.h``: the largest GetQuote buffer QEMU takes (128 KiB)
TDX_GET_QUOTE_MAX_BUF_LEN = 128 * 1024
#: CPUID leaves whose sub-leaf (ECX) selects the entry
INDEXED_CPUID_LEAVES = frozenset({0x4, 0x7, 0xB, 0xD, 0xF, 0x10, 0x12, 0x14, 0x17, 0x18, 0x1D, 0x1F, 0x24})


def _vendor(name: bytes) -> tuple[int, int, int]:
    """A 12-byte CPUID vendor string as leaf 0's (EBX, EDX, ECX)."""
    return tuple(int.from_bytes(name[i : i + 4], "little") for i in (0, 4, 8))  # type: ignore[return-value]


#: vendors for which KVM answers an out-of-range leaf with zeros (AMD semantics): every other vendor,
#: an unknown or empty one included, gets the max basic leaf (cpuid.c get_out_of_range_cpuid_entry())
AMD_VENDORS = frozenset({_vendor(b"AuthenticAMD"), _vendor(b"HygonGenuine")})


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


# --- MSRs a TD may read or write through TDVMCALL --------------------------------------------------
MSR_IA32_APICBASE = 0x1B
MSR_IA32_FEAT_CTL = 0x3A
MSR_EFER = 0xC0000080
MSR_IA32_MCG_CAP = 0x179
MSR_IA32_MCG_EXT_CTL = 0x4D0
MSR_IA32_TSC_DEADLINE = 0x6E0
X2APIC_BASE = 0x800
FEAT_CTL_LOCKED = 1 << 0
FEAT_CTL_LMCE_ENABLED = 1 << 20
MCG_LMCE_P = 1 << 27
MCG_EXT_CTL_LMCE_EN = 1 << 0

#: the MSRs outside the x2APIC range that KVM emulates for a TD: single indices and inclusive ranges
#: (kvm-x86 ``arch/x86/kvm/vmx/tdx.c``, ``tdx_has_emulated_msr()``)
TDX_EMULATED_MSRS: tuple[tuple[int, int, str], ...] = (
    (0x8B, 0x8B, "IA32_UCODE_REV"),
    (0x10A, 0x10A, "IA32_ARCH_CAPABILITIES"),
    (0x1FC, 0x1FC, "IA32_POWER_CTL"),
    (0x277, 0x277, "IA32_CR_PAT"),
    (0xFE, 0xFE, "MTRRcap"),
    (0x200, 0x26F, "MTRRphysBase0 .. MTRRfix4K_F8000"),
    (0x2FF, 0x2FF, "MTRRdefType"),
    (0x6E0, 0x6E0, "IA32_TSC_DEADLINE"),
    (0x1A0, 0x1A0, "IA32_MISC_ENABLE"),
    (0xCE, 0xCE, "PLATFORM_INFO"),
    (0x140, 0x140, "MISC_FEATURES_ENABLES"),
    (0x1B, 0x1B, "IA32_APICBASE (read-only)"),
    (0xC0000080, 0xC0000080, "EFER (read-only)"),
    (0x3A, 0x3A, "IA32_FEAT_CTL (read-only, synthesised)"),
    (0x179, 0x17B, "MCG_CAP, MCG_STATUS, MCG_CTL"),
    (0x4D0, 0x4D0, "MCG_EXT_CTL"),
    (0x400, 0x47F, "MC0_CTL .. MC31_MISC (32 banks)"),
    (0x280, 0x29F, "MC0_CTL2 .. MC31_CTL2"),
    (0x4B564D05, 0x4B564D05, "MSR_KVM_POLL_CONTROL"),
)
#: the x2APIC MSRs (0x800 + xAPIC offset / 16) KVM emulates for a TD; every other index in
#: 0x800..0x8FF, TPR 0x808, PPR 0x80A, EOI 0x80B, ISR/TMR/IRR 0x810..0x827 and SELF_IPI 0x83F
#: included, is virtualised by the TDX module and fails (kvm-x86 ``tdx_has_emulated_msr()``, the
#: allow-list of commit 1f3e69af5f93, 2026)
TDX_EMULATED_X2APIC: dict[int, str] = {
    0x802: "ID",
    0x803: "LVR",
    0x80D: "LDR",
    0x80F: "SPIV",
    0x828: "ESR",
    0x82F: "LVTCMCI",
    0x830: "ICR",
    0x832: "LVTT",
    0x833: "LVTTHMR",
    0x834: "LVTPC",
    0x835: "LVT0",
    0x836: "LVT1",
    0x837: "LVTERR",
    0x838: "TMICT",
    0x839: "TMCCT",
    0x83E: "TDCR",
}
#: v6.16's deny-list in the x2APIC range: meant to exclude TPR, PPR, EOI and the ISR, TMR and IRR
#: banks, it excluded only these six (a range bug: KT0511/linux-6.16.1 ``tdx_has_emulated_msr()``)
V6_16_X2APIC_DENIED = frozenset({0x808, 0x80A, 0x80B, 0x810, 0x818, 0x820})
#: MSR_CORE_THREAD_COUNT: QEMU filters guest reads of it and answers them itself
MSR_CORE_THREAD_COUNT = 0x35
#: the reasons userspace may enable with KVM_CAP_X86_USER_SPACE_MSR (Linux
#: ``include/uapi/linux/kvm.h`` ``KVM_MSR_EXIT_REASON_*``), by the names the scenario uses
MSR_EXIT_REASONS = {"inval": 1 << 0, "unknown": 1 << 1, "filter": 1 << 2}
MSR_EXIT_INVAL, MSR_EXIT_UNKNOWN, MSR_EXIT_FILTER = 1 << 0, 1 << 1, 1 << 2
#: read-only for a TD (``tdx_is_read_only_msr()``): a guest write fails
TDX_READ_ONLY_MSRS = frozenset({MSR_IA32_APICBASE, MSR_EFER, MSR_IA32_FEAT_CTL})

# --- KVM's x2APIC emulation, which an x2APIC MSR that passed the TDX filter reaches ----------------
# (x86.c kvm_get/set_msr_common() -> lapic.c kvm_x2apic_msr_read/write() -> kvm_lapic_msr_read/write()
# -> kvm_lapic_reg_read/write(); read at KT0511/linux-6.16.1 @30b97c8, the same rules as kvm-x86
# lapic.c @f729851)
MCG_CMCI_P = 1 << 10  # MCG_CAP bit 10: without it KVM's APIC has no LVTCMCI (kvm_apic_calc_nr_lvt_entries())
APICBASE_X2APIC_MODE = 0xC00  # APICBASE bits 11 (enable) and 10 (x2APIC): apic_x2apic_mode()
X2APIC_ICR = 0x830
X2APIC_ESR = 0x828
X2APIC_SELF_IPI = 0x83F
X2APIC_LVTCMCI = 0x82F
#: ICR bits KVM refuses to see set in x2APIC mode: 31:20, 17:16 and 13 (``X2APIC_ICR_RESERVED_BITS``,
#: ``kvm_x2apic_icr_write()``)
X2APIC_ICR_RESERVED = 0xFFF0_0000 | 0x3_0000 | 1 << 13
#: x2APIC MSRs a guest may read in x2APIC mode (``kvm_lapic_readable_reg_mask()``): ID, LVR, TPR, PPR,
#: LDR, SPIV, ISR/TMR/IRR 0..7, ESR, ICR, LVTT, LVTTHMR, LVTPC, LVT0, LVT1, LVTERR, TMICT, TMCCT, TDCR,
#: and LVTCMCI when MCG_CAP has CMCI_P; ARBPRI, DFR and ICR2 are not readable in x2APIC mode, EOI and
#: SELF_IPI are write-only, anything past offset 0x3F0 (MSR 0x83F) does not exist
X2APIC_READABLE = frozenset(
    {0x802, 0x803, 0x808, 0x80A, 0x80D, 0x80F, *range(0x810, 0x828), 0x828, 0x830}
    | {0x832, 0x833, 0x834, 0x835, 0x836, 0x837, 0x838, 0x839, 0x83E}
)
#: x2APIC MSRs ``kvm_lapic_reg_write()`` accepts in x2APIC mode (ESR, SELF_IPI, ICR and LVTCMCI with
#: conditions, see :func:`x2apic_write_ok`); every other index, ID, LVR, LDR, DFR, ICR2, PPR, ARBPRI,
#: ISR/TMR/IRR and TMCCT included, takes ``default: ret = 1``
X2APIC_WRITABLE = frozenset({0x808, 0x80B, 0x80F, 0x832, 0x833, 0x834, 0x835, 0x836, 0x837, 0x838, 0x83E})


def x2apic_read_ok(index: int, mcg_cap: int) -> bool:
    """Whether KVM's lapic emulation lets a guest read this x2APIC MSR (lapic.c ``kvm_lapic_msr_read()``:
    ICR always, any other register if ``kvm_lapic_readable_reg_mask()`` has it)."""
    if index == X2APIC_LVTCMCI:
        return bool(mcg_cap & MCG_CMCI_P)
    return index in X2APIC_READABLE


def x2apic_write_ok(index: int, value: int, mcg_cap: int) -> bool:
    """Whether KVM's lapic emulation accepts this guest write to an x2APIC MSR (lapic.c
    ``kvm_lapic_msr_write()``, ``kvm_x2apic_icr_write()``, ``kvm_lapic_reg_write()`` in x2APIC mode):
    ICR takes 64 bits but no reserved bit; every other register refuses bits 63:32; ESR takes only 0,
    SELF_IPI only a vector (bits 7:0), LVTCMCI needs MCG_CAP.CMCI_P; the registers in
    :data:`X2APIC_WRITABLE` take any 32-bit value; everything else fails."""
    if index == X2APIC_ICR:
        return not value & X2APIC_ICR_RESERVED
    if value >> 32:
        return False
    if index == X2APIC_ESR:
        return value == 0
    if index == X2APIC_SELF_IPI:
        return not value & ~0xFF
    if index == X2APIC_LVTCMCI:
        return bool(mcg_cap & MCG_CMCI_P)
    return index in X2APIC_WRITABLE


def tdx_has_emulated_msr(index: int, tree: str = DEFAULT_TREE) -> bool:
    """Whether KVM emulates this MSR for a TD (``tdx_has_emulated_msr()``), by the tree's rule
    (``TreeRule.x2apic_msrs``): the allow-list (kvm-x86, v7.3), or the same non-APIC list plus every
    x2APIC index but the six the v6.16 deny-list caught.  Passing this filter is necessary, not
    sufficient: an x2APIC MSR then meets KVM's lapic rules (:func:`x2apic_read_ok`,
    :func:`x2apic_write_ok`)."""
    if X2APIC_BASE <= index <= X2APIC_BASE + 0xFF:
        if tree_rule(tree).x2apic_msrs == X2APIC_DENY_LIST:
            return index not in V6_16_X2APIC_DENIED
        return index in TDX_EMULATED_X2APIC
    return any(lo <= index <= hi for lo, hi, _ in TDX_EMULATED_MSRS)


def _emulated_msrs() -> dict[int, int]:
    """The values KVM's common MSR code holds for this fake TD (``kvm_get_msr_common()``); an MSR
    on the emulated list without an entry here reads as 0.  Whether a TD may access an MSR at all is
    :func:`tdx_has_emulated_msr`, not this table."""
    return {
        MSR_IA32_APICBASE: 0xFEE00D00,  # x2APIC enabled, BSP
        MSR_EFER: 0xD01,  # LMA LME SCE NXE
        MSR_IA32_TSC_DEADLINE: 0x0,
        MSR_IA32_MCG_CAP: 0x0,  # no LMCE_P: FEAT_CTL reads LOCKED only, MCG_EXT_CTL fails
        0x277: 0x0007040600070406,  # IA32_CR_PAT (the reset value)
        0x802: 0x0,  # x2APIC ID
        0x803: 0x50014,  # x2APIC version
        0x80F: 0x1FF,  # SPIV
    }


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
    #: KVM_CAP_X86_USER_SPACE_MSR: the failure reasons userspace asked to exit for (QEMU's
    #: ``kvm_vm_enable_userspace_msr()``: KVM_MSR_EXIT_REASON_FILTER only)
    msr_exit_reasons: int = MSR_EXIT_FILTER
    #: KVM_X86_SET_MSR_FILTER, default allow: the MSRs whose reads / writes userspace denies (QEMU:
    #: reads of MSR_CORE_THREAD_COUNT, ``kvm_filter_msr()`` with a read handler only)
    msr_filter_read: frozenset[int] = frozenset({MSR_CORE_THREAD_COUNT})
    msr_filter_write: frozenset[int] = frozenset()
    cores_per_package: int = 4  # the guest's topology as QEMU knows it (-smp 4: one package of 4 cores)
    threads_per_core: int = 1
    exit_hypercall_map_gpa: bool = True  # KVM_CAP_EXIT_HYPERCALL bit 12 (QEMU enables it)
    gpaw: int = 52  # the TD's guest physical address width: shared bit = bit gpaw - 1
    maxphyaddr: int = 52
    pending_event: bool = False  # an interrupt is pending between MapGPA chunks
    apic_ids: tuple[int, ...] = (0, 1, 2, 3)
    host_clock_suitable: bool = True  # CLOCK_PAIRING needs a TSC-based host clock
    tree: str = DEFAULT_TREE  # a name of trees.TREES: "kvm-x86" (2026), "v6.16" (v6.16.1), "v7.3" (7.3.4)
    userspace: Userspace = field(default_factory=Userspace)
    # recorded side effects
    exits: list[dict[str, Any]] = field(default_factory=list)
    effects: list[str] = field(default_factory=list)
    memory: dict[int, int] = field(default_factory=dict)  # 8-byte words userspace devices hold (MMIO writes)

    @property
    def rule(self) -> TreeRule:
        """The tree's rule (``trees.TREES``): how its KVM re-labels, dispatches and completes."""
        return tree_rule(self.tree)

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
    def _cpuid_entry(self, leaf: int, subleaf: int) -> tuple[int, int, int, int] | None:
        """``kvm_find_cpuid_entry_index()``: the sub-leaf matters only for indexed leaves."""
        return self.cpuid.get((leaf, subleaf if leaf in INDEXED_CPUID_LEAVES else 0))

    def _cpuid_any_index(self, leaf: int) -> tuple[int, int, int, int] | None:
        """``kvm_find_cpuid_entry()``: the first entry of the leaf, whatever its index."""
        hits = sorted(k for k in self.cpuid if k[0] == leaf)
        return self.cpuid[hits[0]] if hits else None

    def out_of_range_cpuid_leaf(self, leaf: int) -> int | None:
        """kvm-x86 ``arch/x86/kvm/cpuid.c``, ``get_out_of_range_cpuid_entry()``: the leaf KVM answers
        instead of a ``leaf`` it has no entry for, or None (zeros).  No leaf 0, or an AMD or Hygon
        vendor string: None.  The class of ``leaf``: each 0x100-wide hypervisor range
        0x4000_0000..0x4FFF_FFFF is its own (base ``leaf & ~0xFF``); 0xC000_0000 and above is one;
        otherwise bit 31 decides (basic 0.., which includes 0x5000_0000..0x7FFF_FFFF, or extended
        0x8000_0000..).  A leaf within its class's maximum (the base entry's EAX) gets zeros; above
        it, or with no base entry, the max basic leaf (leaf 0's EAX)."""
        top = self._cpuid_any_index(0)
        if top is None or (top[1], top[3], top[2]) in AMD_VENDORS:
            return None
        if 0x40000000 <= leaf <= 0x4FFFFFFF:
            base = leaf & 0xFFFFFF00
        elif leaf >= 0xC0000000:
            base = 0xC0000000
        else:
            base = leaf & 0x80000000
        basic = self._cpuid_any_index(base)
        if basic is not None and leaf <= basic[0]:
            return None
        return top[0]

    def kvm_cpuid(self, leaf: int, subleaf: int) -> tuple[int, int, int, int]:
        """cpuid.c ``kvm_cpuid()`` with ``exact_only = false``, as ``tdx_emulate_cpuid()`` calls it:
        the entry; else the out-of-range redirect (:meth:`out_of_range_cpuid_leaf`), looked up with
        the original sub-leaf; else zeros.  With no entry and an (effective) leaf 0xB or 0x1F that
        has sub-leaf 1: ECX = the sub-leaf's low byte, EDX = sub-leaf 1's EDX (the x2APIC ID)."""
        entry = self._cpuid_entry(leaf, subleaf)
        if entry is None:
            redirect = self.out_of_range_cpuid_leaf(leaf)
            if redirect is not None:
                leaf = redirect
                entry = self._cpuid_entry(leaf, subleaf)
        if entry is not None:
            return entry
        if leaf in (0xB, 0x1F) and (leaf, 1) in self.cpuid:
            return (0, 0, subleaf & 0xFF, self.cpuid[(leaf, 1)][3])
        return (0, 0, 0, 0)

    def halt(self, interrupts_blocked: bool) -> None:
        self.effects.append("vCPU halted" + (" with interrupts blocked" if interrupts_blocked else ""))

    def tdx_get_msr(self, index: int) -> tuple[bool, int]:
        """The vendor read hook for a TD (kvm-x86 tdx.c ``tdx_get_msr()``): IA32_FEAT_CTL is
        synthesised (LOCKED, plus LMCE_ENABLED when MCG_CAP has LMCE_P); MCG_EXT_CTL needs LMCE_P;
        any other MSR must be on :func:`tdx_has_emulated_msr`'s list, and an x2APIC one must then be
        readable for KVM's lapic emulation (:func:`x2apic_read_ok`); then the common code's value."""
        mcg_cap = self.msrs.get(MSR_IA32_MCG_CAP, 0)
        if index == MSR_IA32_FEAT_CTL:
            return True, FEAT_CTL_LOCKED | (FEAT_CTL_LMCE_ENABLED if mcg_cap & MCG_LMCE_P else 0)
        if index == MSR_IA32_MCG_EXT_CTL and not mcg_cap & MCG_LMCE_P:
            return False, 0
        if not tdx_has_emulated_msr(index, self.tree):
            return False, 0
        if X2APIC_BASE <= index <= X2APIC_BASE + 0xFF and not (self._x2apic_mode() and x2apic_read_ok(index, mcg_cap)):
            return False, 0  # lapic.c kvm_x2apic_msr_read()
        return True, self.msrs.get(index, 0)

    def _x2apic_mode(self) -> bool:
        """lapic.c ``apic_x2apic_mode()``: APICBASE has both the enable and the x2APIC bit."""
        return self.msrs.get(MSR_IA32_APICBASE, 0) & APICBASE_X2APIC_MODE == APICBASE_X2APIC_MODE

    def tdx_set_msr(self, index: int, value: int) -> bool:
        """The vendor write hook for a TD (``tdx_set_msr()``): MCG_EXT_CTL needs LMCE_P and only
        bit 0; APICBASE, EFER and FEAT_CTL are read-only; any other MSR must be on the list, and an
        x2APIC one must then pass KVM's lapic rules (:func:`x2apic_write_ok`)."""
        mcg_cap = self.msrs.get(MSR_IA32_MCG_CAP, 0)
        if index == MSR_IA32_MCG_EXT_CTL:
            if not mcg_cap & MCG_LMCE_P or value & ~MCG_EXT_CTL_LMCE_EN:
                return False
        elif index in TDX_READ_ONLY_MSRS or not tdx_has_emulated_msr(index, self.tree):
            return False
        elif X2APIC_BASE <= index <= X2APIC_BASE + 0xFF and not (
            self._x2apic_mode() and x2apic_write_ok(index, value, mcg_cap)
        ):
            return False  # lapic.c kvm_x2apic_msr_write()
        self.msrs[index] = value
        self.effects.append(f"MSR {index:#x} <- {value:#x}")
        return True

    def msr_allowed(self, index: int, write: bool) -> bool:
        """``kvm_msr_allowed()`` (msrs.c in 7.3.4, x86.c in v6.16.1 and kvm-x86): x2APIC MSRs
        (0x800..0x8FF) cannot be filtered; any other MSR is denied when userspace's filter
        (KVM_X86_SET_MSR_FILTER) lists it for this access; the filter's default is allow."""
        if X2APIC_BASE <= index <= X2APIC_BASE + 0xFF:
            return True
        return index not in (self.msr_filter_write if write else self.msr_filter_read)

    def _msr_exit(self, index: int, filtered: bool) -> str | None:
        """``kvm_msr_user_space()``: the reason of the failure (``kvm_msr_reason()``: FILTER for a
        filtered access; INVAL for the vendor hook's plain failure, the only one ``tdx_get_msr()``
        and ``tdx_set_msr()`` return) if userspace enabled it, else None (no exit)."""
        reason = MSR_EXIT_FILTER if filtered else MSR_EXIT_INVAL
        if not self.msr_exit_reasons & reason:
            return None
        return "FILTER" if filtered else "INVAL"

    def msr_read(self, index: int) -> tuple[bool, int]:
        """``kvm_emulate_rdmsr()`` for a TD, in KVM's order (``kvm_emulate_msr_read()`` /
        ``kvm_get_msr_with_filter()``): the MSR filter first (:meth:`msr_allowed`), then the vendor
        hook (:meth:`tdx_get_msr`).  On failure, a KVM_EXIT_X86_RDMSR when userspace enabled that
        failure's reason (its answer completes the read, :meth:`userspace_rdmsr`), else the
        failure."""
        filtered = not self.msr_allowed(index, False)
        if not filtered:
            ok, value = self.tdx_get_msr(index)
            if ok:
                return True, value
        reason = self._msr_exit(index, filtered)
        if reason is None:
            return False, 0
        ok, value = self.userspace_rdmsr(index)
        self.exits.append({"reason": KVM_EXIT_X86_RDMSR, "msr_reason": reason, "index": index, "error": not ok})
        return ok, value

    def userspace_rdmsr(self, index: int) -> tuple[bool, int]:
        """Userspace's answer to a KVM_EXIT_X86_RDMSR: the scenario's ``rdmsr`` value if it has one
        (unless ``msr_error``); else QEMU's (``kvm_handle_rdmsr()``): MSR_CORE_THREAD_COUNT gets
        ``kvm_rdmsr_core_thread_count()`` (``cpu_x86_get_msr_core_thread_count()``: threads per
        package in bits 15:0, cores per package in 31:16), anything else an error.  (QEMU's kvm.c and
        cpu-system.c second-hand, through the qemu-devel patches that made these functions.)"""
        if self.userspace.msr_error:
            return False, 0
        if index in self.userspace.rdmsr:
            return True, self.userspace.rdmsr[index]
        if index == MSR_CORE_THREAD_COUNT:
            cores = self.cores_per_package
            return True, (cores * self.threads_per_core & 0xFFFF) | (cores & 0xFFFF) << 16
        return False, 0

    def msr_write(self, index: int, value: int) -> bool:
        """``kvm_emulate_wrmsr()`` for a TD, likewise: the filter, then :meth:`tdx_set_msr`, then
        KVM_EXIT_X86_WRMSR if userspace enabled the failure's reason."""
        filtered = not self.msr_allowed(index, True)
        if not filtered and self.tdx_set_msr(index, value):
            return True
        reason = self._msr_exit(index, filtered)
        if reason is None:
            return False
        ok = not self.userspace.msr_error
        self.exits.append(
            {"reason": KVM_EXIT_X86_WRMSR, "msr_reason": reason, "index": index, "data": value, "error": not ok}
        )
        return ok

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

    def returned_to_userspace(self, since: int) -> bool:
        """Whether KVM_RUN went back to userspace since exit number ``since`` (any exit recorded:
        the call's userspace exit, a system event, an internal error).  For a TD that changes the
        guest's XMM registers: KVM never saves or restores a TD's FPU state (``tdx_vcpu_create()``
        calls ``fpstate_set_confidential()``, and ``fpu_swap_kvm_fpstate()`` in
        ``arch/x86/kernel/fpu/core.c`` neither saves nor loads a confidential fpstate), so on the
        way out the VMM thread's own FPU state is loaded into the CPU, and on the way back in
        nothing replaces it: the TDX module copies the VMM thread's XMMs into the guest's exposed
        ones at the next TDH.VP.ENTER (tdx-module ``tdh_vp_enter.c``)."""
        return len(self.exits) > since

    def bus_lock_exit(self) -> None:
        """7.3's ``tdx_handle_exit()`` after a bus lock when the call finished in the kernel:
        KVM_RUN returns to userspace with KVM_EXIT_X86_BUS_LOCK and KVM_RUN_X86_BUS_LOCK in
        ``run->flags``; userspace runs the vCPU again (nothing to complete)."""
        self.exits.append({"reason": KVM_EXIT_X86_BUS_LOCK, "run_flags": [KVM_RUN_X86_BUS_LOCK]})

    def internal_error(self, why: str) -> None:
        self.exits.append({"reason": KVM_EXIT_INTERNAL_ERROR, "why": why})

    # --- QEMU's answers (QEMU 05caf269 target/i386/kvm/tdx.c) --------------------------------
    @staticmethod
    def qemu_get_quote(gpa: int, size: int) -> int:
        """QEMU's ``tdx_handle_get_quote()``, in its order: size 0 is INVALID_OPERAND; a GPA or size
        not 4 KiB aligned ALIGN_ERROR; (a header it cannot read or of another version
        INVALID_OPERAND: the fake's buffer always holds a good one); a buffer larger than
        ``TDX_GET_QUOTE_MAX_BUF_LEN`` (128 KiB) INVALID_OPERAND; else SUCCESS (the quote, or
        QGS_UNAVAILABLE in the buffer's header, comes later)."""
        if size == 0:
            return TDVMCALL_INVALID_OPERAND
        if gpa % PAGE_SIZE or size % PAGE_SIZE:
            return TDVMCALL_ALIGN_ERROR
        if size > TDX_GET_QUOTE_MAX_BUF_LEN:
            return TDVMCALL_INVALID_OPERAND
        return TDVMCALL_SUCCESS


__all__ = ["Platform", "Userspace"]

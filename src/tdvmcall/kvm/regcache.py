"""KVM's register cache: ``regs``, ``rip`` and the ``regs_avail`` / ``regs_dirty`` masks.

Source: Linux ``arch/x86/kvm/kvm_cache_regs.h`` (renamed ``regs.h`` in 2026) for the accessors,
``arch/x86/kvm/vmx/vmx.c`` (``vmx_vcpu_run``, ``vmx_cache_reg``), ``arch/x86/kvm/svm/svm.c``
(``svm_vcpu_run``) and ``arch/x86/kvm/vmx/tdx.c`` (``tdx_vcpu_run``, ``tdx_cache_reg``) for the
per-vendor transitions; summarised in docs/abi.md §2.

Meaning of the pair of bits per register:

    avail dirty
      0     0   the value lives in hardware state (VMCS/VMCB); the cached copy is stale
      0     1   invalid
      1     0   the cached copy is valid and matches hardware
      1     1   the cached copy is valid and must be written back before the next entry

Both masks are unsigned 64-bit values (C ``unsigned long``) set to all ones over the 25 registers
at vCPU creation.  The model records a kernel ``WARN`` in :attr:`RegCache.warnings`; a cache built
``strict`` (the hardened TDX policy) raises :class:`ModelBug` instead.
"""

from __future__ import annotations

from ..abi.regs import (
    ALL_REGS_MASK,
    CR0,
    CR3,
    CR4,
    EXIT_INFO_1,
    EXIT_INFO_2,
    NR_GPRS,
    NR_REGS,
    PDPTR,
    R8,
    R9,
    R10,
    R11,
    R12,
    R13,
    R14,
    R15,
    RAX,
    RBP,
    RBX,
    RCX,
    RDI,
    RDX,
    RFLAGS,
    RIP,
    RSI,
    RSP,
    SEGMENTS,
    U32,
    U64,
    mask_of,
    reg_name,
    u64,
)


class ModelBug(AssertionError):
    """An invariant of the model broke: this is a bug in the model (or a planted one), never input."""


#: registers VMX loads lazily from the VMCS (vmx.h VMX_REGS_LAZY_LOAD_SET)
VMX_LAZY_SET = mask_of((RSP, RIP, RFLAGS, PDPTR, SEGMENTS, CR0, CR3, CR4, EXIT_INFO_1, EXIT_INFO_2))
#: registers SVM loads lazily (svm.c: only the PDPTRs)
SVM_LAZY_SET = mask_of((PDPTR,))
#: registers tdx.c keeps "available" after every TD exit (TDX_REGS_AVAIL_SET) = 0x0180FFEF
TDX_REGS_AVAIL_SET = mask_of(
    (RAX, RBX, RCX, RDX, RBP, RSI, RDI, R8, R9, R10, R11, R12, R13, R14, R15, EXIT_INFO_1, EXIT_INFO_2)
)


class RegCache:
    """The register cache of one vCPU.  ``vendor`` is ``vmx``, ``svm`` or ``tdx``; ``hw`` holds the
    hardware copy (VMCS/VMCB fields) that ``cache_reg`` reads on VMX."""

    def __init__(self, vendor: str = "tdx", strict: bool = False):
        if vendor not in ("vmx", "svm", "tdx"):
            raise ValueError(f"unknown vendor {vendor!r}")
        self.vendor = vendor
        self.strict = strict
        self.regs = [0] * NR_GPRS
        self.rip = 0
        self.avail = ALL_REGS_MASK  # kvm_arch_vcpu_create(): every register valid at creation
        self.dirty = ALL_REGS_MASK
        self.hw: dict[int, int] = {}
        self.warnings: list[str] = []
        self.reads: list[int] = []  # GPRs read through read_raw (the hardened access trace)

    # --- one-meaning helpers ---------------------------------------------------------------
    def is_available(self, reg: int) -> bool:
        return bool(self.avail >> reg & 1)

    def is_dirty(self, reg: int) -> bool:
        return bool(self.dirty >> reg & 1)

    def mark_available(self, reg: int) -> None:
        self.avail |= 1 << reg

    def mark_dirty(self, reg: int) -> None:
        """Set both bits: a dirty register is by definition available."""
        self.avail |= 1 << reg
        self.dirty |= 1 << reg

    def mark_for_reload(self, reg: int) -> None:
        """Clear both bits: the next read goes to hardware."""
        self.avail &= ~(1 << reg) & U64
        self.dirty &= ~(1 << reg) & U64

    def test_and_mark_available(self, reg: int) -> bool:
        old = self.is_available(reg)
        self.mark_available(reg)
        return old

    def clear_available(self, mask: int) -> None:
        """``avail &= ~mask``.  Clearing a register that is still dirty would create the invalid
        pair: KVM only does it after ``reset_dirty()`` (VMX, SVM), so here it is a bug."""
        if self.dirty & mask:
            self._warn(f"clear_available of dirty registers {mask & self.dirty:#x}")
            return
        self.avail &= ~mask & U64

    def reset_dirty(self) -> None:
        self.dirty = 0

    def invalid_pairs(self) -> int:
        """Registers in the invalid state (avail 0, dirty 1)."""
        return self.dirty & ~self.avail & ALL_REGS_MASK

    # --- accessors ---------------------------------------------------------------------------
    def _warn(self, what: str) -> None:
        if self.strict:
            raise ModelBug(what)
        self.warnings.append(what)

    def cache_reg(self, reg: int) -> None:
        """The vendor's ``cache_reg`` callback: load ``reg`` from hardware state."""
        if self.vendor == "tdx":
            # tdx_cache_reg(): the TD's state is protected, there is nothing to read
            self._warn(f"cache_reg({reg_name(reg)}) on a TD")
            return
        if reg == RIP:
            self.rip = self.hw.get(RIP, 0)
        elif reg < NR_GPRS:
            self.regs[reg] = self.hw.get(reg, 0)
        self.mark_available(reg)

    def read_raw(self, reg: int) -> int:
        if reg >= NR_GPRS:
            self._warn(f"read_raw of non-GPR {reg_name(reg) if reg < NR_REGS else reg}")
            return 0
        if not self.is_available(reg):
            self.cache_reg(reg)
        self.reads.append(reg)
        return self.regs[reg]

    def write_raw(self, reg: int, value: int) -> None:
        if reg >= NR_GPRS:
            self._warn(f"write_raw of non-GPR {reg_name(reg) if reg < NR_REGS else reg}")
            return
        self.regs[reg] = u64(value, reg_name(reg))
        self.mark_dirty(reg)

    def read(self, reg: int, long_mode: bool = True) -> int:
        """Mode-masked read: only the low 32 bits outside 64-bit mode."""
        v = self.read_raw(reg)
        return v if long_mode else v & U32

    def write(self, reg: int, value: int, long_mode: bool = True) -> None:
        self.write_raw(reg, value if long_mode else value & U32)

    def rip_read(self) -> int:
        if not self.is_available(RIP):
            self.cache_reg(RIP)
        return self.rip

    def rip_write(self, value: int) -> None:
        self.rip = u64(value, "rip")
        self.mark_dirty(RIP)

    # --- per-vendor transitions ---------------------------------------------------------------
    def vmx_before_entry(self) -> None:
        """vmx_vcpu_run(): write dirty RSP and RIP to the VMCS, then forget dirtiness."""
        if self.is_dirty(RSP):
            self.hw[RSP] = self.regs[RSP]
        if self.is_dirty(RIP):
            self.hw[RIP] = self.rip
        self.reset_dirty()

    def vmx_after_exit(self, gprs: dict[int, int]) -> None:
        """After VM-exit the asm stores every GPR but RSP into ``regs``; the lazy set goes stale."""
        for reg, value in gprs.items():
            if reg == RSP:
                self.hw[RSP] = value
            else:
                self.regs[reg] = u64(value, reg_name(reg))
        self.clear_available(VMX_LAZY_SET)

    def svm_before_entry(self) -> None:
        """svm_vcpu_run(): RAX, RSP and RIP go to the VMCB (the others are loaded by the asm)."""
        self.hw[RAX] = self.regs[RAX]
        self.hw[RSP] = self.regs[RSP]
        self.hw[RIP] = self.rip

    def svm_after_exit(self, gprs: dict[int, int], sev_es: bool = False) -> None:
        """After #VMEXIT RAX/RSP/RIP come back from the VMCB (not for SEV-ES, whose GPRs come from
        the GHCB); then dirty is reset and the PDPTRs go stale."""
        if not sev_es:
            for reg, value in gprs.items():
                self.regs[reg] = u64(value, reg_name(reg))
            self.rip = self.hw.get(RIP, self.rip)
        self.reset_dirty()
        self.clear_available(SVM_LAZY_SET)

    def tdx_after_exit_legacy(self) -> None:
        """tdx_vcpu_run(): ``regs_avail &= TDX_REGS_AVAIL_SET`` after every TD exit.  Nothing fills
        ``regs`` from the guest and dirty is never reset, so registers outside the set that were
        dirty (all of them, from creation) end up in the invalid pair (avail 0, dirty 1): a fact of
        today's KVM that the model reproduces, bypassing :meth:`clear_available` as tdx.c does
        (v6.16.1: a bare ``&=``; kvm-x86 and 7.3.4: ``kvm_clear_available_registers()``, the same
        ``&=`` with no check of dirtiness)."""
        self.avail &= TDX_REGS_AVAIL_SET

    def tdx_after_exit_hardened(self, exposed: dict[int, int]) -> None:
        """The hardened TDVMCALL exit: dirty cleared, the exposed GPRs (and RCX, whose value is
        always passed) loaded and available, EXIT_INFO_1/2 available, nothing else."""
        self.reset_dirty()
        for reg, value in exposed.items():
            self.regs[reg] = u64(value, reg_name(reg))
        self.avail = mask_of(exposed) | mask_of((EXIT_INFO_1, EXIT_INFO_2))
        self.reads = []

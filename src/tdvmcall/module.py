"""The Intel TDX module: TDG.VP.VMCALL (the guest's TDCALL leaf 0) and the resume on TDH.VP.ENTER.

Sources: Intel tdx-module (MIT) ``src/td_dispatcher/vm_exits/tdg_vp_vmcall.c`` (control checks and
the exit), ``src/td_transitions/td_exit.c`` (what the VMM's registers hold on a TD exit) and
``src/vmm_dispatcher/api_calls/tdh_vp_enter.c`` (the selective copy-back); ABI.md §3.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .abi.codes import EXIT_REASON_TDCALL, TDX_OPERAND_INVALID, TDX_SUCCESS
from .abi.control import (
    Control,
    build_exit_qualification,
    check_control,
    module_family,
)
from .abi.regs import NR_GPRS, RAX, RCX, U64, U128, u64

TDCALL_INSN_LEN = 4  # 66 0F 01 CC
TDG_VP_VMCALL_LEAF = 0


@dataclass(frozen=True)
class TdConfig:
    """The TD's attributes that matter here: the module version family and NO_RBP_MOD
    (on by default: Linux KVM creates every TD with it and refuses a module without it)."""

    module: str = "1.5"
    no_rbp_mod: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "module", module_family(self.module))


@dataclass
class VcpuState:
    """A guest vCPU's architectural state as the module sees it."""

    gprs: list[int] = field(default_factory=lambda: [0] * NR_GPRS)
    xmm: list[int] = field(default_factory=lambda: [0] * 16)
    rip: int = 0x1000
    long_mode: bool = True

    def copy(self) -> VcpuState:
        return VcpuState(list(self.gprs), list(self.xmm), self.rip, self.long_mode)


class GuestFault(Exception):
    """The TDCALL raised an exception in the guest (#GP(0) outside 64-bit mode): no status at all."""


@dataclass
class VmcallExit:
    """What TDH.VP.ENTER returns to the VMM when the guest's TDG.VP.VMCALL is accepted, plus the
    module's own record of the call (the control and the guest state it must restore)."""

    control: int
    vmm: list[int]  # the 16 GPRs the VMM receives
    vmm_xmm: list[int]
    saved: VcpuState  # guest state after RIP advanced, before any copy-back


@dataclass
class VmcallResult:
    """Outcome of the TDCALL: either the call failed back to the guest (``exit`` is None, ``status``
    is the guest's RAX) or it exited to the VMM (``status`` is the exit reason in the VMM's RAX)."""

    status: int
    exit: VmcallExit | None
    guest: VcpuState  # the guest's state now (on failure: final)

    @property
    def exited(self) -> bool:
        return self.exit is not None


def tdg_vp_vmcall(td: TdConfig, vcpu: VcpuState) -> VmcallResult:
    """The module's TDG.VP.VMCALL: validate RAX and the control in RCX, then either fail back to
    the guest or build the VMM's view of the exit.  The exit is trap-like: RIP is advanced first."""
    # the mode check: a TD outside 64-bit mode gets #GP(0), no status, RIP not advanced
    if not vcpu.long_mode:
        raise GuestFault("#GP(0): TDCALL outside 64-bit mode")
    after = vcpu.copy()
    after.rip = (vcpu.rip + TDCALL_INSN_LEN) & U64
    rax, rcx = vcpu.gprs[RAX], vcpu.gprs[RCX]

    # validate the leaf: RAX bits 63:24 reserved, version (23:16) 0, leaf 0
    if rax != TDG_VP_VMCALL_LEAF:
        after.gprs[RAX] = TDX_OPERAND_INVALID  # operand id RAX = 0
        return VmcallResult(after.gprs[RAX], None, after)

    # validate control: forbidden GPR bits and reserved bits 63:32; xmm_select is not checked
    status = check_control(rcx, td.module, td.no_rbp_mod)
    if status is not None:
        after.gprs[RAX] = status
        return VmcallResult(status, None, after)

    # build exit qualification and the exit reason
    ctl = Control(rcx)
    vmm = [0] * NR_GPRS
    vmm[RAX] = EXIT_REASON_TDCALL  # basic reason 77, TDX_SUCCESS status
    vmm[RCX] = build_exit_qualification(rcx, td.module)

    # copy selected GPRs; everything not selected reads as 0 (RBP under NO_RBP_MOD: the VMM keeps
    # its own RBP, which holds no guest data: modelled as 0)
    for i in range(2, NR_GPRS):
        if ctl.gpr_select >> i & 1:
            vmm[i] = vcpu.gprs[i]

    # copy selected XMMs (128-bit part)
    vmm_xmm = [vcpu.xmm[i] & U128 if ctl.xmm_select >> i & 1 else 0 for i in range(16)]
    return VmcallResult(vmm[RAX], VmcallExit(rcx, vmm, vmm_xmm, after), after)


def tdh_vp_enter(td: TdConfig, exit: VmcallExit, vmm: list[int], vmm_xmm: list[int] | None = None) -> VcpuState:
    """The resume on the next TDH.VP.ENTER: for each selected GPR i in 2..15 the guest gets the
    VMM's value; unselected GPRs keep their values; guest RAX = TDX_SUCCESS and RCX = the control;
    selected XMMs are copied back likewise."""
    ctl = Control(exit.control)
    guest = exit.saved.copy()
    # copy selected GPRs back
    for i in range(2, NR_GPRS):
        if ctl.gpr_select >> i & 1:
            guest.gprs[i] = u64(vmm[i], f"vmm r{i}")
    # the call's own status and control
    guest.gprs[RAX] = TDX_SUCCESS
    guest.gprs[RCX] = exit.control
    # copy selected XMMs back
    if vmm_xmm is not None:
        for i in range(16):
            if ctl.xmm_select >> i & 1:
                guest.xmm[i] = vmm_xmm[i] & U128
    return guest


__all__ = ["GuestFault", "TdConfig", "VcpuState", "VmcallExit", "VmcallResult", "tdg_vp_vmcall", "tdh_vp_enter"]

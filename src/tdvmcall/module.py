"""The Intel TDX module: the TDCALL dispatcher, TDG.VP.VMCALL (the guest's TDCALL leaf 0) and the
resume on TDH.VP.ENTER.

Sources: Intel tdx-module (MIT) ``src/td_dispatcher/tdx_td_dispatcher.c`` (``td_call()``: the RAX
checks), ``src/td_dispatcher/vm_exits/tdg_vp_vmcall.c`` (control checks and the exit),
``src/td_transitions/td_exit.c`` (what the VMM's registers hold on a TD exit) and
``src/td_transitions/tdh_vp_enter.c`` (the selective copy-back, ``save_regs_after_tdvmcall()``);
docs/abi.md §3.  TDCALL leaves other than TDG.VP.VMCALL are named, checked as the dispatcher checks RAX,
and otherwise not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .abi.codes import (
    EXIT_REASON_BUS_LOCK_DETECTED,
    EXIT_REASON_TDCALL,
    TDCALL_VM_RD,
    TDCALL_VP_VMCALL,
    TDX_SUCCESS,
    TdcallRax,
    check_tdcall_rax,
    tdcall_leaf_text,
)
from .abi.control import (
    Control,
    build_exit_qualification,
    check_control,
    module_family,
)
from .abi.regs import NR_GPRS, R8, RAX, RCX, RDX, U64, U128, u64

TDCALL_INSN_LEN = 4  # 66 0F 01 CC
#: TDG.VM.RD with a version its handler refuses: what it has already written (``tdg_vm_rd_wr.c``:
#: RDX = MD_FIELD_ID_NA for a version above 0, R8 = 0) before it fails
MD_FIELD_ID_NA = U64


@dataclass(frozen=True)
class TdConfig:
    """The TD's attributes that matter here: the module version family and NO_RBP_MOD
    (on by default: Linux KVM creates every TD with it and refuses a module without it), and
    ``bus_lock``: a bus lock was detected in the TD since its last exit, so the module sets bit 26
    (bus_lock_preempted) of this exit's reason (``tdg_vp_vmcall.c``, the per-LP sticky flag)."""

    module: str = "1.5"
    no_rbp_mod: bool = True
    bus_lock: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "module", module_family(self.module))


@dataclass
class VcpuState:
    """A guest vCPU's architectural state as the module sees it."""

    gprs: list[int] = field(default_factory=lambda: [0] * NR_GPRS)
    xmm: list[int] = field(default_factory=lambda: [0] * 16)
    rip: int = 0x1000
    long_mode: bool = True
    #: GPRs whose value is a host value the model cannot know (the value held is a placeholder, 0)
    host: set[int] = field(default_factory=set)
    #: XMMs whose value is a host value the model cannot know (likewise)
    xmm_host: set[int] = field(default_factory=set)

    def copy(self) -> VcpuState:
        return VcpuState(list(self.gprs), list(self.xmm), self.rip, self.long_mode, set(self.host), set(self.xmm_host))


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
    is the guest's RAX), or it exited to the VMM (``status`` is the exit reason in the VMM's RAX), or
    it is a TDCALL leaf other than TDG.VP.VMCALL that the module accepts, which this model does not
    run (``not_modelled`` says which; ``status`` is None and ``guest`` the state before the call)."""

    status: int | None
    exit: VmcallExit | None
    guest: VcpuState  # the guest's state now (on failure: final)
    not_modelled: str | None = None

    @property
    def exited(self) -> bool:
        return self.exit is not None


def td_call(td: TdConfig, vcpu: VcpuState) -> VmcallResult:
    """The module's TDCALL dispatcher (``tdx_td_dispatcher.c``, ``td_call()``): the mode check, the
    RAX checks (reserved bits 63:24, a version the leaf does not take, an unknown leaf: all
    ``TDX_OPERAND_INVALID`` with operand id RAX), then the leaf.  Leaf 0 is TDG.VP.VMCALL; any other
    leaf the module accepts is not a TDVMCALL and is not modelled (said, not invented)."""
    # the mode check: a TD outside 64-bit mode gets #GP(0), no status, RIP not advanced
    if not vcpu.long_mode:
        raise GuestFault("#GP(0): TDCALL outside 64-bit mode")
    after = vcpu.copy()
    after.rip = (vcpu.rip + TDCALL_INSN_LEN) & U64
    rax = TdcallRax(vcpu.gprs[RAX])

    # validate RAX: reserved bits, version, leaf
    status = check_tdcall_rax(rax.raw)
    if status is not None:
        if rax.leaf == TDCALL_VM_RD and not rax.reserved:
            # TDG.VM.RD lets versions 1..255 through the dispatcher and refuses 2..255 itself, after
            # it has written RDX (MD_FIELD_ID_NA, version > 0) and R8 (0)  (tdg_vm_rd_wr.c)
            after.gprs[RDX] = MD_FIELD_ID_NA
            after.gprs[R8] = 0
        after.gprs[RAX] = status
        return VmcallResult(status, None, after)
    if rax.leaf != TDCALL_VP_VMCALL:
        return VmcallResult(
            None, None, vcpu.copy(), not_modelled=f"{tdcall_leaf_text(rax.raw)}: not a TDVMCALL, not modelled"
        )
    return _tdg_vp_vmcall(td, vcpu, after)


def tdg_vp_vmcall(td: TdConfig, vcpu: VcpuState) -> VmcallResult:
    """A guest's TDCALL meant as TDG.VP.VMCALL: the dispatcher's checks of RAX (:func:`td_call`),
    then the leaf.  (The same as :func:`td_call`, under the leaf's name, for the fuzz wing's
    properties and the tests that issue TDVMCALLs.)"""
    return td_call(td, vcpu)


def _tdg_vp_vmcall(td: TdConfig, vcpu: VcpuState, after: VcpuState) -> VmcallResult:
    """The module's TDG.VP.VMCALL (``tdg_vp_vmcall.c``): validate the control in RCX, then either
    fail back to the guest or build the VMM's view of the exit.  The exit is trap-like: RIP is
    advanced first."""
    rcx = vcpu.gprs[RCX]

    # validate control: forbidden GPR bits and reserved bits 63:32; xmm_select is not checked
    status = check_control(rcx, td.module, td.no_rbp_mod)
    if status is not None:
        after.gprs[RAX] = status
        return VmcallResult(status, None, after)

    # build exit qualification and the exit reason
    ctl = Control(rcx)
    vmm = [0] * NR_GPRS
    # basic reason 77 with TDX_SUCCESS status; bit 26 when a bus lock was detected since the last exit
    vmm[RAX] = EXIT_REASON_TDCALL | (EXIT_REASON_BUS_LOCK_DETECTED if td.bus_lock else 0)
    vmm[RCX] = build_exit_qualification(rcx, td.module)

    # copy selected GPRs; everything not selected reads as 0 (RBP under NO_RBP_MOD: the VMM keeps
    # its own RBP, which holds no guest data: modelled as 0)
    gpr_select, xmm_select = ctl.gpr_select, ctl.xmm_select
    for i in range(2, NR_GPRS):
        if gpr_select >> i & 1:
            vmm[i] = vcpu.gprs[i]

    # copy selected XMMs (128-bit part)
    vmm_xmm = [vcpu.xmm[i] & U128 if xmm_select >> i & 1 else 0 for i in range(16)]
    return VmcallResult(vmm[RAX], VmcallExit(rcx, vmm, vmm_xmm, after), after)


def tdh_vp_enter(
    td: TdConfig,
    exit: VmcallExit,
    vmm: list[int],
    vmm_xmm: list[int] | None = None,
    vmm_host: frozenset[int] | set[int] = frozenset(),
    vmm_xmm_host: frozenset[int] | set[int] = frozenset(),
) -> VcpuState:
    """The resume on the next TDH.VP.ENTER (``save_regs_after_tdvmcall()``): for each selected GPR i
    in 2..15 the guest gets the VMM's value; unselected GPRs keep their values; guest RAX =
    TDX_SUCCESS and RCX = the control saved at the call (the VMM's RCX, which holds the TDVPR address
    on entry, is never copied); selected XMMs are copied back likewise.  ``vmm_host``: VMM GPRs that
    hold a host value the model cannot know (KVM passes no RBP); a selected one makes the guest's
    register such a value too.  ``vmm_xmm_host`` likewise for XMMs: the module copies whatever the
    CPU's XMM registers hold at TDH.VP.ENTER (``tdh_vp_enter.c``, ``save_xmms_by_mask()``), which is
    a host value when the host has used them since the exit."""
    ctl = Control(exit.control)
    gpr_select, xmm_select = ctl.gpr_select, ctl.xmm_select
    guest = exit.saved.copy()
    # copy selected GPRs back
    for i in range(2, NR_GPRS):
        if gpr_select >> i & 1:
            guest.gprs[i] = u64(vmm[i], f"vmm r{i}")
            if i in vmm_host:
                guest.host.add(i)
            else:
                guest.host.discard(i)
    # the call's own status and control
    guest.gprs[RAX] = TDX_SUCCESS
    guest.gprs[RCX] = exit.control
    # copy selected XMMs back
    if vmm_xmm is not None:
        for i in range(16):
            if xmm_select >> i & 1:
                guest.xmm[i] = vmm_xmm[i] & U128
                if i in vmm_xmm_host:
                    guest.xmm_host.add(i)
                else:
                    guest.xmm_host.discard(i)
    return guest


__all__ = [
    "GuestFault",
    "TdConfig",
    "VcpuState",
    "VmcallExit",
    "VmcallResult",
    "td_call",
    "tdg_vp_vmcall",
    "tdh_vp_enter",
]

"""A guest vCPU issuing one TDVMCALL: guest -> TDX module -> KVM -> TDX module -> guest.

Data flows one way: the module's exit goes to KVM, KVM's registers go back to the module, the
module's resume goes to the guest.  Nothing here decides anything: each actor lives in its room.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .abi.regs import RBP
from .kvm.platform import Platform
from .kvm.tdx import KvmResult, KvmVcpu, handle_tdvmcall
from .module import (
    GuestFault,
    TdConfig,
    VcpuState,
    VmcallResult,
    td_call,
    tdh_vp_enter,
)

#: said whenever the guest's RBP comes back as a host value, after the cause (:func:`rbp_host_warning`)
RBP_HOST_CONSEQUENCE = (
    "KVM passes no RBP to TDH.VP.ENTER, so the module copies a host value the model cannot know into the "
    "guest's RBP. Upstream KVM never runs such a TD: Linux refuses a TDX module without NO_RBP_MOD "
    "(check_features()) and KVM sets NO_RBP_MOD for every TD (setup_tdparams())"
)


#: said whenever exposed XMMs come back as host values (:func:`xmm_host_warning`)
XMM_HOST_CONSEQUENCE = (
    "the TDX module copies the CPU's XMM registers into the exposed ones at TDH.VP.ENTER, and after a return to "
    "userspace they hold the VMM thread's XMM state: KVM never saves or restores a TD's FPU state "
    "(tdx_vcpu_create() marks it confidential, fpu_swap_kvm_fpstate() skips it). The guest gets a host value "
    "the model cannot know, and the host leaks its own XMM contents into the TD"
)


def xmm_host_warning(xmms: set[int], exit_reason: str) -> str:
    """The warning for exposed XMMs that came back as host values after a return to userspace."""
    names = " ".join(f"xmm{i}" for i in sorted(xmms))
    return f"the guest exposed {names} and KVM_RUN returned to userspace ({exit_reason}): {XMM_HOST_CONSEQUENCE}"


def rbp_host_warning(td: TdConfig) -> str:
    """The warning for a guest RBP that came back as a host value, worded by its cause: module 1.0
    does not check RBP in the control whatever the TD's NO_RBP_MOD says (``checks_rbp()``), a 1.5
    module lets RBP through on a TD without NO_RBP_MOD."""
    if td.module == "1.0":
        cause = "the guest exposed RBP on TDX module 1.0, which does not check RBP in the control"
        if td.no_rbp_mod:
            cause += " (the TD's NO_RBP_MOD has no effect there)"
    else:
        cause = "the guest exposed RBP on a TD without NO_RBP_MOD"
    return f"{cause}: {RBP_HOST_CONSEQUENCE}"


@dataclass
class RoundTrip:
    td: TdConfig
    before: VcpuState
    module: VmcallResult | None  # None: the TDCALL faulted (#GP) in the guest
    kvm: KvmResult | None  # None: the call never reached KVM
    after: VcpuState
    fault: str | None = None
    warnings: list[str] = field(default_factory=list)  # what the model cannot show exactly


def tdvmcall(td: TdConfig, state: VcpuState, kvm: KvmVcpu, platform: Platform) -> RoundTrip:
    """Issue TDG.VP.VMCALL from ``state`` (RAX = 0, RCX = control, the rest as the guest set them)
    and run it to the guest's next instruction.  If KVM reports the call to userspace without
    completing it (a fatal error, an internal error), ``after`` is the state the guest resumes in if
    userspace runs the vCPU again; so is it when KVM_RUN failed (``kvm.resumed`` is False).  After
    any return to userspace the guest's exposed XMMs hold the VMM thread's XMM state (``xmm_host``).  A TDCALL
    leaf other than TDG.VP.VMCALL is not modelled: ``after`` is then the state before the call."""
    before = state.copy()
    try:
        res = td_call(td, state)
    except GuestFault as fault:
        return RoundTrip(td, before, None, None, before.copy(), fault=str(fault))
    if res.exit is None:
        return RoundTrip(td, before, res, None, res.guest)
    k = handle_tdvmcall(kvm, res.exit, platform)
    # the XMMs KVM re-enters with: still the ones the module loaded at the exit, or, after a return to
    # userspace, the VMM thread's (host values the model cannot know: placeholders 0)
    vmm_xmm, xmm_host = res.exit.vmm_xmm, frozenset[int]()
    if k.vmm_after_xmm_host:
        vmm_xmm, xmm_host = [0] * 16, frozenset(range(16))
    after = tdh_vp_enter(td, res.exit, k.vmm_after, vmm_xmm, k.vmm_after_host, xmm_host)
    warnings = [rbp_host_warning(td)] if RBP in after.host else []
    if after.xmm_host:
        warnings.append(xmm_host_warning(after.xmm_host, str(k.userspace_exits[0]["reason"])))
    return RoundTrip(td, before, res, k, after, warnings=warnings)

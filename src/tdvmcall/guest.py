"""A guest vCPU issuing one TDVMCALL: guest -> TDX module -> KVM -> TDX module -> guest.

Data flows one way: the module's exit goes to KVM, KVM's registers go back to the module, the
module's resume goes to the guest.  Nothing here decides anything: each actor lives in its room.
"""

from __future__ import annotations

from dataclasses import dataclass

from .kvm.platform import Platform
from .kvm.tdx import KvmResult, KvmVcpu, handle_tdvmcall
from .module import (
    GuestFault,
    TdConfig,
    VcpuState,
    VmcallResult,
    tdg_vp_vmcall,
    tdh_vp_enter,
)


@dataclass
class RoundTrip:
    td: TdConfig
    before: VcpuState
    module: VmcallResult | None  # None: the TDCALL faulted (#GP) in the guest
    kvm: KvmResult | None  # None: the call never reached KVM
    after: VcpuState
    fault: str | None = None


def tdvmcall(td: TdConfig, state: VcpuState, kvm: KvmVcpu, platform: Platform) -> RoundTrip:
    """Issue TDG.VP.VMCALL from ``state`` (RAX = 0, RCX = control, the rest as the guest set them)
    and run it to the guest's next instruction.  If KVM reports the call to userspace without
    completing it (a fatal error, an internal error), ``after`` is the state the guest resumes in if
    userspace runs the vCPU again."""
    before = state.copy()
    try:
        res = tdg_vp_vmcall(td, state)
    except GuestFault as fault:
        return RoundTrip(td, before, None, None, before.copy(), fault=str(fault))
    if res.exit is None:
        return RoundTrip(td, before, res, None, res.guest)
    k = handle_tdvmcall(kvm, res.exit, platform)
    after = tdh_vp_enter(td, res.exit, k.vmm_after, res.exit.vmm_xmm)
    return RoundTrip(td, before, res, k, after)

"""KVM's TDVMCALL exit handling: dispatch, the validation policy and the write-back.

Two policies over the same handlers (``handlers.py``) and the same leaf table (``leaves.py``):

``legacy``  today's KVM (Linux ``arch/x86/kvm/vmx/tdx.c``, ``tdx_vcpu_run()`` and
            ``handle_tdvmcall()``): ``regs_avail &= TDX_REGS_AVAIL_SET`` whatever the mask, the
            handlers read and write ``vp_enter_args`` directly, nothing checks the mask.  An
            unexposed input reads as the module's 0; a write to an unexposed register is dropped
            by the module on resume.

``hardened`` the validation KVM's maintainer described on the KVM list in April 2026 ("KVM can
            (and should!) validate the registers coming from the guest"), in the manner of SEV-ES's
            ``sev_es_validate_vmgexit()`` (``arch/x86/kvm/svm/sev.c``), built here first:
            (a) on the exit the available GPRs are exactly the exposed ones plus RCX, EXIT_INFO_1/2
            are available, dirty is cleared and the exposed values are loaded into the cache;
            (b) before dispatch, R10 (and R11 for a GHCI call), every required input under its
            conditions and every output the call may write must be exposed, else the call is
            refused with R10 = INVALID_OPERAND and nothing runs; with R10 itself unexposed no
            status can reach the guest, so the call is reported to userspace as an internal error;
            (c) handlers read through the cache (reading an unavailable register is a model bug)
            and writes mark registers dirty; (d) before resume the dirty GPRs are written back to
            the module's VMM registers; a dirty unexposed register or an expected output left
            clean is a model bug.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..abi.codes import (
    EXIT_REASON_BUS_LOCK_DETECTED,
    EXIT_REASON_TDCALL,
    TDVMCALL_INVALID_OPERAND,
    kvm_exit_reason_text,
)
from ..abi.control import ExitQualification
from ..abi.regs import GPR_NAMES, NR_GPRS, RAX, RBP, RCX, RSP, reg_index, u64
from ..module import VmcallExit
from . import leaves as L
from .handlers import RunFailed, handler_for
from .platform import Platform
from .regcache import ModelBug, RegCache
from .trees import DEFAULT_TREE, KVM_RUN_X86_BUS_LOCK, RELABEL_BASIC

POLICIES = ("legacy", "hardened")

VERDICT_COMPLETED = "completed"
VERDICT_REFUSED = "refused"
VERDICT_USERSPACE = "userspace"
VERDICT_INTERNAL_ERROR = "internal_error"
VERDICT_RUN_FAILED = "run_failed"

#: SEAMCALL leaf number of TDH.VP.ENTER: the RAX KVM enters the module with (Linux ``TDH_VP_ENTER``)
TDH_VP_ENTER = 0
#: what the VMM's registers hold at TDH.VP.ENTER where KVM passes nothing of the TD's (Linux
#: ``struct tdx_module_args`` has no RAX, RBP or RSP; ``tdh_vp_enter()`` in
#: ``arch/x86/virt/vmx/tdx/tdx.c`` overwrites RCX with the vCPU's TDVPR physical address)
VMM_AFTER_NOTES = {
    "rax": "TDH.VP.ENTER (SEAMCALL leaf 0)",
    "rcx": "the vCPU's TDVPR physical address (a host value): tdh_vp_enter() overwrites RCX before every "
    "entry, so the exit qualification is not passed back; the module restores the guest's RCX from the "
    "control it saved",
    "rsp": "the host's stack pointer (a host value; never copied to a TD)",
    "rbp": "the host's RBP (a host value): struct tdx_module_args has no RBP, so KVM passes none",
}
#: VMM GPRs KVM re-enters with that hold host values the model cannot know
VMM_AFTER_HOST = frozenset({RCX, RSP, RBP})


@dataclass
class KvmResult:
    """What KVM did with one TDVMCALL exit."""

    policy: str
    leaf: L.Leaf
    verdict: str
    status: int | None  # the R10 KVM wrote, or None
    vmm_after: list[int]  # the VMM registers KVM re-enters with
    wrote: dict[str, int] = field(default_factory=dict)  # registers KVM wrote, in order
    missing: list[str] = field(default_factory=list)  # required inputs not exposed (table view)
    unexposed_outputs: list[str] = field(default_factory=list)  # outputs the call may write, not exposed
    zero_reads: list[str] = field(default_factory=list)  # consumed inputs the guest did not expose
    dropped_writes: list[str] = field(default_factory=list)  # writes the module will not copy back
    regs_avail: int = 0
    regs_dirty: int = 0
    userspace_exits: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    exit_reason: int = EXIT_REASON_TDCALL  # the VMX exit reason KVM reports (kvm_exit, exit handlers)
    bus_lock: bool = False  # the exit reason had bit 26 set (kvm-x86, v6.16: not re-labelled, R11 alone)
    run_error: int | None = None  # KVM_RUN's error (negative errno) when it failed; no resume
    notes: list[str] = field(default_factory=list)  # what the model wants a reader to know
    vmm_after_host: frozenset[int] = VMM_AFTER_HOST  # VMM GPRs at re-entry that hold host values
    #: the CPU's XMMs at re-entry are the VMM thread's, not the guest's (KVM_RUN went to userspace
    #: in between: Platform.returned_to_userspace); False: they still hold what the module loaded
    vmm_after_xmm_host: bool = False
    tree: str = DEFAULT_TREE  # the kernel tree whose rules KVM followed (trees.TREES)

    @property
    def trace_reason(self) -> str:
        """The ``reason`` field of this exit's ``kvm_exit`` trace line."""
        return kvm_exit_reason_text(self.exit_reason)

    @property
    def resumed(self) -> bool:
        """Whether this KVM_RUN re-enters the guest (False: KVM_RUN failed)."""
        return self.run_error is None


class LegacyAccess:
    """Today's KVM: handlers use ``vp_enter_args`` as the module filled it (0 where unexposed).
    ``vp_enter_ret`` is the exit value TDH.VP.ENTER returned (``tdx->vp_enter_ret``)."""

    def __init__(self, args: list[int], qualification: int, vp_enter_ret: int):
        self.args = args
        self.exit_qualification = qualification
        self.vp_enter_ret = vp_enter_ret
        self.reads: list[str] = []
        self.wrote: dict[str, int] = {}

    def read(self, reg: str) -> int:
        self.reads.append(reg)
        return self.args[reg_index(reg)]

    def read_optional(self, reg: str) -> int:
        return self.args[reg_index(reg)]

    def write(self, reg: str, value: int) -> None:
        self.args[reg_index(reg)] = u64(value, reg)
        self.wrote[reg] = value


class HardenedAccess:
    """Hardened KVM: handlers go through the register cache, which holds only exposed registers."""

    def __init__(self, cache: RegCache, qualification: int, vp_enter_ret: int):
        self.cache = cache
        self.exit_qualification = qualification
        self.vp_enter_ret = vp_enter_ret
        self.reads: list[str] = []
        self.wrote: dict[str, int] = {}

    def read(self, reg: str) -> int:
        self.reads.append(reg)
        return self.cache.read_raw(reg_index(reg))  # strict cache: unavailable -> ModelBug

    def read_optional(self, reg: str) -> int:
        i = reg_index(reg)
        return self.cache.read_raw(i) if self.cache.is_available(i) else 0

    def write(self, reg: str, value: int) -> None:
        self.cache.write_raw(reg_index(reg), value)
        self.wrote[reg] = value


class KvmVcpu:
    """KVM's per-vCPU state for a TD: the register cache, kept across calls (dirty is never reset
    under ``legacy``)."""

    def __init__(self, policy: str = "hardened"):
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; accepted: {', '.join(POLICIES)}")
        self.policy = policy
        self.cache = RegCache("tdx", strict=policy == "hardened")


def _check_against_table(leaf: L.Leaf, reads: list[str], wrote: dict[str, int], vals: dict[str, int]) -> None:
    """The handler did what its row says: it read only declared inputs, wrote only declared
    outputs, and wrote every output its row expects for the outcome.  Otherwise: a model bug."""
    declared_in = set(leaf.selectors) | {op.reg for op in leaf.inputs}
    declared_out = set(L.possible_outputs(leaf, vals))
    if undeclared := [r for r in reads if r not in declared_in]:
        raise ModelBug(f"{leaf.name}: handler read undeclared {undeclared}")
    if undeclared := [r for r in wrote if r not in declared_out]:
        raise ModelBug(f"{leaf.name}: handler wrote undeclared {undeclared}")
    failed = wrote.get("r10", 0) != 0
    if clean := [r for r in L.expected_outputs(leaf, vals, failed) if r not in wrote]:
        raise ModelBug(f"{leaf.name}: expected outputs left clean: {clean}")


def _run_handler(
    leaf: L.Leaf, io: LegacyAccess | HardenedAccess, platform: Platform, vals: dict[str, int], result: KvmResult
) -> None:
    """Run the leaf's handler and hold it to its row; a failed KVM_RUN (:class:`RunFailed`) ends the
    call with nothing written: no status reaches the guest and this KVM_RUN does not re-enter it."""
    try:
        handler_for(leaf)(io, platform)
    except RunFailed as e:
        result.verdict = VERDICT_RUN_FAILED
        result.run_error = -e.errno
        result.notes.append(
            f"{e.why}: KVM_RUN returns -EINVAL and the guest is not resumed; if userspace runs the vCPU "
            "again, the guest continues with its registers as the exit left them (R10 = its own value)"
        )
        if io.wrote:
            raise ModelBug(f"{leaf.name}: wrote {sorted(io.wrote)} before KVM_RUN failed") from e
        return
    _check_against_table(leaf, io.reads, io.wrote, vals)


def handle_tdvmcall(vcpu: KvmVcpu, exit: VmcallExit, platform: Platform) -> KvmResult:
    """KVM's handling of one TDG.VP.VMCALL exit (tdx.c ``tdx_handle_exit()`` -> ``handle_tdvmcall()``),
    under the vCPU's policy.  Returns what KVM did and the VMM registers it re-enters with."""
    vmm = list(exit.vmm)
    qual = ExitQualification(vmm[RCX])
    exposed = qual.gpr_names
    vals = {GPR_NAMES[i]: vmm[i] for i in range(NR_GPRS)}

    # re-label, by the tree's rule (trees.TreeRule): tdx_to_vmx_exit_reason() in kvm-x86 and v6.16
    # compares the whole reason (low 32 bits) with TDCALL, so a reason whose basic part (15:0) is
    # TDCALL but that carries a flag bit stays TDCALL and goes to handle_tdvmcall() by its basic
    # reason, which dispatches on R11 alone; 7.3's switches on exit_reason.basic and re-labels it by
    # its leaf like any other, flag kept.  The module's only such flag is bit 26, bus lock detected
    # (0x0400004D); the rule is KVM's for any flag bit, as the generated C applies it to any RAX
    rule = platform.rule
    reason = vmm[RAX] & 0xFFFFFFFF
    not_relabelled = rule.dispatches_on_r11_alone(reason)
    bus_lock = bool(reason & EXIT_REASON_BUS_LOCK_DETECTED)

    # dispatch: R10 != 0 is a KVM hypercall number, else R11 is the GHCI leaf
    leaf = L.lookup(vmm[reg_index("r10")], vmm[reg_index("r11")], not_relabelled)
    missing = [r for r in L.required_inputs(leaf, vals) if r not in exposed]
    unexposed_outputs = [r for r in L.possible_outputs(leaf, vals) if r not in exposed]
    exits_before = len(platform.exits)
    result = KvmResult(
        vcpu.policy, leaf, VERDICT_COMPLETED, None, vmm, missing=missing, unexposed_outputs=unexposed_outputs
    )
    result.exit_reason = rule.vmx_exit_reason(reason, leaf.reason)
    result.tree = rule.name
    result.bus_lock = bus_lock
    if not_relabelled:
        if reason == EXIT_REASON_TDCALL | EXIT_REASON_BUS_LOCK_DETECTED:
            why = f"bus lock detected (exit reason {reason:#010x}, bit 26)"
        else:
            why = f"exit reason {reason:#010x}: TDCALL with flag bits {reason & ~0xFFFF:#x}"
        result.notes.append(
            f"{why}: KVM ({rule.name}) does not re-label the exit and dispatches on R11 alone ({leaf.name}); "
            "instruction leaves and KVM hypercalls get SUBFUNC_UNSUPPORTED unless R11 is 0x10000..0x10004"
        )
    elif bus_lock and rule.relabel == RELABEL_BASIC:
        result.notes.append(
            f"bus lock detected (exit reason {reason:#010x}, bit 26): KVM ({rule.name}) re-labels the exit by its "
            f"leaf all the same ({leaf.name}, reason {result.exit_reason:#010x}: tdx_to_vmx_exit_reason() switches "
            "on exit_reason.basic)"
        )

    if vcpu.policy == "legacy":
        # mark registers: the fixed set, whatever the mask
        vcpu.cache.tdx_after_exit_legacy()
        io: LegacyAccess | HardenedAccess = LegacyAccess(vmm, qual.raw, exit.vmm[RAX])
        _run_handler(leaf, io, platform, vals, result)
        # dispatch itself consumed R10 (and R11 for a GHCI call)
        consumed = dict.fromkeys([*leaf.selectors, *io.reads])
        result.zero_reads = [r for r in consumed if r not in exposed]
        result.dropped_writes = [r for r in io.wrote if r not in exposed]
    else:
        # (a) load exactly the exposed GPRs, plus RCX, into the cache
        cache = vcpu.cache
        cache.tdx_after_exit_hardened({i: vmm[i] for i in range(NR_GPRS) if qual.gpr_select >> i & 1 or i == RCX})
        io = HardenedAccess(cache, qual.raw, exit.vmm[RAX])
        # (b) validate before dispatch
        if "r10" not in exposed:
            platform.internal_error(
                f"TDVMCALL without R10 exposed (mask {qual.gpr_select:#06x}): no status can reach the guest"
            )
            result.verdict = VERDICT_INTERNAL_ERROR
        elif missing or unexposed_outputs:
            io.write("r10", TDVMCALL_INVALID_OPERAND)
            result.verdict = VERDICT_REFUSED
        else:
            # (c) run the handler through the cache
            _run_handler(leaf, io, platform, vals, result)
        # (d) write dirty GPRs back to the module's VMM registers
        for i in range(NR_GPRS):
            if cache.is_dirty(i):
                if GPR_NAMES[i] not in exposed:
                    raise ModelBug(f"{GPR_NAMES[i]} is dirty but not exposed")
                vmm[i] = cache.regs[i]

    # re-entry: TDH.VP.ENTER in RAX, the TDVPR address in RCX; RSP and RBP are the host's
    vmm[RAX] = TDH_VP_ENTER
    for i in VMM_AFTER_HOST:
        vmm[i] = 0  # a placeholder: listed in vmm_after_host

    result.wrote = dict(io.wrote)
    result.status = io.wrote.get("r10")
    # 7.3's tdx_handle_exit() after a bus lock: a call handled in the kernel (ret > 0) becomes a
    # KVM_EXIT_X86_BUS_LOCK exit to userspace; an exit already on its way gets KVM_RUN_X86_BUS_LOCK
    if rule.bus_lock_exits_to_userspace(reason):
        if len(platform.exits) == exits_before:
            platform.bus_lock_exit()
        else:
            first = platform.exits[exits_before]
            first["run_flags"] = [*first.get("run_flags", []), KVM_RUN_X86_BUS_LOCK]
        result.notes.append(
            f"bus lock detected: tdx_handle_exit() ({rule.name}) returns to userspace "
            f"({platform.exits[exits_before]['reason']}, KVM_RUN_X86_BUS_LOCK in run->flags); the guest resumes "
            "when userspace runs the vCPU again"
        )
    result.userspace_exits = platform.exits[exits_before:]
    result.vmm_after_xmm_host = platform.returned_to_userspace(exits_before)
    if result.verdict == VERDICT_COMPLETED and result.userspace_exits:
        result.verdict = VERDICT_USERSPACE
    result.regs_avail, result.regs_dirty = vcpu.cache.avail, vcpu.cache.dirty
    result.warnings = list(vcpu.cache.warnings)
    return result

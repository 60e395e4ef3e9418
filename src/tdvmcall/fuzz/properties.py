"""The properties every fuzzed execution must satisfy, and the checks that enforce them.

Properties (docs/abi.md §2-§5; each is a restatement of a documented fact, never a call into the code it
checks):

``gate``            an invalid RAX or control never reaches KVM and yields exactly the documented
                    status (RAX 0xC000010000000000 / control 0xC000010000000001), RIP advanced, every
                    other register (but RDX and R8 for TDG.VM.RD version 2..255), the platform and the
                    cache unchanged; a TDCALL leaf other than 0 that the module accepts is not modelled
                    and changes nothing; outside 64-bit mode, #GP and nothing changes (ABI §3, §8,
                    tdx-module ``tdx_td_dispatcher.c``, ``tdg_vm_rd_wr.c``, ``tdg_vp_vmcall.c``).
``confidentiality`` the VMM's view of an unexposed GPR or XMM is 0, and nothing the host sees
                    (VMM registers, KVM's writes and verdict, userspace exits, side effects) changes
                    when the unexposed registers hold other values (ABI §3, ``td_exit.c``).
``integrity``       after resume every unexposed register holds its old value whatever the host wrote
                    (checked with KVM's own writes and with arbitrary VMM registers handed to
                    ``tdh_vp_enter``); an exposed register KVM did not write comes back unchanged,
                    except RBP, which KVM never passes (``struct tdx_module_args``): exposed (no
                    NO_RBP_MOD), it comes back as a host value; RAX = 0, RCX = the control, RIP
                    advanced (ABI §3, ``tdh_vp_enter.c``).
``cache``           hardened: no register in the invalid pair (avail 0, dirty 1) and no handler read of
                    a register the guest did not expose (the strict cache also raises ``ModelBug``);
                    legacy: no register of ``TDX_REGS_AVAIL_SET`` in the invalid pair.  The other
                    registers (RSP, RIP, PDPTR, CR0, CR3, CR4, RFLAGS, SEGMENTS) *are* in the invalid
                    pair after a legacy exit: today's tdx.c clears their avail bits and never resets
                    dirty, which is set for all of them at vCPU creation (ABI §2).  That is a fact of
                    today's KVM the model reproduces, not a violation.
``refusal``         hardened: refused exactly when R10 is exposed and the leaf table's required inputs
                    or possible outputs are not; a refusal has no side effect (platform snapshot
                    unchanged, no userspace exit) and only R10 = INVALID_OPERAND reaches the guest;
                    with R10 unexposed, an internal error and no register change (ABI §4-§5).
``completeness``    a call KVM handled writes exactly the registers ABI §4 says it writes for its
                    inputs and outcome (``ABI_WRITES``, restated here from the ABI notes, not read
                    from the leaf table), with the few values the ABI fixes; hardened: every write is
                    exposed and reaches the guest (ABI §2, §4).
``differential``    whenever hardened completes a call, legacy on the same platform gives the same
                    guest registers and the same side effects.
``model-bug``       the model raised ``ModelBug`` (a broken internal invariant).
``crash``           the model raised anything else.
"""

from __future__ import annotations

import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..abi.codes import (
    TDVMCALL_INVALID_OPERAND,
    TDVMCALL_SUBFUNC_UNSUPPORTED,
    TDVMCALL_SUCCESS,
    TDX_OPERAND_INVALID,
    TDX_OPERAND_INVALID_RCX,
)
from ..abi.regs import (
    GPR_NAMES,
    NR_GPRS,
    R8,
    R10,
    R11,
    R12,
    R13,
    RAX,
    RBP,
    RCX,
    RDX,
    RSP,
    U32,
    U64,
    U128,
    hex64,
    names_in,
)
from ..guest import RoundTrip, tdvmcall
from ..kvm import leaves as L
from ..kvm.platform import KVM_EXIT_INTERNAL_ERROR, Platform
from ..kvm.regcache import TDX_REGS_AVAIL_SET, ModelBug
from ..kvm.tdx import (
    VERDICT_COMPLETED,
    VERDICT_INTERNAL_ERROR,
    VERDICT_REFUSED,
    VERDICT_RUN_FAILED,
    VERDICT_USERSPACE,
    KvmResult,
    KvmVcpu,
)
from ..kvm.trees import DEFAULT_TREE, KVM_EXIT_X86_BUS_LOCK, RELABEL_WHOLE_REASON, TREES
from ..module import TdConfig, VcpuState, tdg_vp_vmcall, tdh_vp_enter

PROPERTIES = (
    "gate",
    "confidentiality",
    "integrity",
    "cache",
    "refusal",
    "completeness",
    "differential",
    "model-bug",
    "crash",
)
T = TypeVar("T")
#: pseudo-verdicts for calls that never reach KVM (coverage)
GATE, FAULT = "module-gate", "guest-fault"


# === violations ==================================================================================
class Violation(AssertionError):
    """A property failed.  ``call`` and ``policy`` say where; ``platform`` is the scenario ``platform``
    object of the host as it was just before that call."""

    prop = "violation"

    def __init__(self, detail: str):
        super().__init__(f"{self.prop}: {detail}")
        self.detail = detail
        self.call: int | None = None
        self.policy: str | None = None
        self.platform: dict | None = None
        self.expressible: list[str] = []  # what the scenario file cannot carry


#: one exception class per property, so that hypothesis tells the failures apart while shrinking
VIOLATION: dict[str, type[Violation]] = {
    p: type(f"{p.title().replace('-', '')}Violation", (Violation,), {"prop": p}) for p in PROPERTIES
}


def require(ok: bool, prop: str, detail: str | Callable[[], str]) -> None:
    if not ok:
        raise VIOLATION[prop](detail() if callable(detail) else detail)


# === the oracle for the module gate ================================================================
#: the TDCALL leaves of module 1.5.01 (``tdcall_leaf_opcode_t``): 0..12, 18, 20, 22..27
_KNOWN_TDCALL_LEAVES = frozenset((*range(13), 18, 20, *range(22, 28)))
NOT_MODELLED = "not-modelled"
VM_RD_REFUSED = "vm-rd-refused"


def documented_gate(td: TdConfig, rax: int, rcx: int, long_mode: bool) -> str | int | None:
    """What docs/abi.md §3 and §8 say the module does with this TDCALL: ``"fault"`` (#GP outside 64-bit
    mode), the status the guest gets for a bad RAX or control, ``"vm-rd-refused"`` (TDG.VM.RD with a
    version above 1), ``"not-modelled"`` (another leaf the module accepts), or ``None`` (the call
    exits to the VMM).  Restated from the ABI notes on purpose, not taken from ``control.py`` or
    ``codes.py``: an oracle must not share code with what it checks."""
    if not long_mode:
        return "fault"
    leaf, version = rax & 0xFFFF, rax >> 16 & 0xFF
    if rax >> 24 or (version and leaf != 7) or leaf not in _KNOWN_TDCALL_LEAVES:
        return TDX_OPERAND_INVALID  # operand id RAX = 0
    if leaf == 7 and version > 1:
        return VM_RD_REFUSED
    if leaf != 0:
        return NOT_MODELLED
    forbidden = 1 << RAX | 1 << RCX | 1 << RSP
    if td.no_rbp_mod and td.module == "1.5":
        forbidden |= 1 << RBP
    if rcx & forbidden or rcx >> 32:
        return TDX_OPERAND_INVALID_RCX
    return None


# === running and checking one call ===============================================================
#: the most KVM_EXIT_HYPERCALLs one fuzzed call may make.  MapGPA makes one per 2 MiB chunk, as KVM
#: does, until userspace fails one or an event is pending: a valid private range of 2**51 bytes
#: (a size the strategies draw among their boundary values) is 2**30 exits, more than any campaign
#: can run.  4096 exits (8 GiB) keeps every size up to 2**33.
MAX_EXITS_PER_CALL = 4096


class TooManyExits(Exception):
    """A call asked for more than ``MAX_EXITS_PER_CALL`` userspace exits: its example is skipped
    (counted in ``Stats.skipped``), not checked and not a violation."""


class BoundedPlatform(Platform):
    """The model's host, unchanged but for a bound on the KVM_EXIT_HYPERCALLs a call may make: past
    ``exit_limit`` exits in all, ``hypercall_exit`` raises :class:`TooManyExits` (``run_example``
    sets the limit before each call; the copies made for the re-runs keep it)."""

    exit_limit = 1 << 62

    def hypercall_exit(self, nr: int, args: tuple[int, int, int]) -> int:
        if len(self.exits) >= self.exit_limit:
            raise TooManyExits(f"more than {MAX_EXITS_PER_CALL} KVM_EXIT_HYPERCALLs in one call")
        return super().hypercall_exit(nr, args)


def bounded(platform: Platform) -> BoundedPlatform:
    """The same host (the same object, its class changed) with the bound."""
    platform.__class__ = BoundedPlatform
    return platform  # type: ignore[return-value]


@dataclass
class Lane:
    """One policy's KVM vCPU and host, kept across the calls of an example."""

    policy: str
    vcpu: KvmVcpu
    platform: Platform


@dataclass
class Stats:
    executions: int = 0
    coverage: Counter = field(default_factory=Counter)  # (policy, leaf, verdict) -> executions
    skipped: int = 0  # examples stopped by a call of more than MAX_EXITS_PER_CALL exits

    def record(self, policy: str, leaf: str, verdict: str) -> None:
        self.executions += 1
        self.coverage[(policy, leaf, verdict)] += 1

    def merge(self, other: Stats) -> None:
        self.executions += other.executions
        self.coverage.update(other.coverage)
        self.skipped += other.skipped


def leaf_label(leaf: L.Leaf) -> str:
    """Coverage name of a leaf: its table name, one name for every unknown GHCI leaf."""
    return leaf.name if leaf.name in L.BY_NAME or leaf is L.UNKNOWN_HYPERCALL else "unknown GHCI leaf"


def _gprs_diff(a: list[int], b: list[int], regs: list[int]) -> str:
    return ", ".join(f"{GPR_NAMES[i]} {hex64(a[i])} -> {hex64(b[i])}" for i in regs if a[i] != b[i])


def _exposed(rcx: int) -> tuple[int, int]:
    return rcx & 0xFFFF, rcx >> 16 & 0xFFFF


def clone(obj: T) -> T:
    """A copy of a host (``Platform``) or a KVM vCPU (``KvmVcpu``) whose later changes do not touch
    the original: the object and every object, list, dict and set it holds are copied, one level of
    containers deep.  The items of those containers are shared: they are numbers, strings, tuples, or
    records the model appends and never changes afterwards (the userspace exits in
    ``Platform.exits``).  ``tests/test_fuzz.py::test_clone_is_independent`` checks this against
    ``copy.deepcopy``; ``deepcopy`` itself was most of the campaign's cost."""
    return _clone(obj)


def _clone(obj: T) -> T:
    new = object.__new__(type(obj))
    d = new.__dict__
    for k, v in obj.__dict__.items():
        t = type(v)
        if t in _ATOMIC:
            pass
        elif t is list or t is dict or t is set:
            v = v.copy()
        else:  # another object: copied the same way
            v = _clone(v)
        d[k] = v
    return new


_ATOMIC = frozenset((int, bool, str, bytes, float, tuple, frozenset, type(None)))


#: the names of what ``Platform.snapshot()`` records: everything a call could change
SNAPSHOT_KEYS = tuple(Platform().snapshot())


def state(platform: Platform) -> dict:
    """``Platform.snapshot()`` without its copies: for comparing two hosts as they are *now*.  (A
    snapshot copies so as to outlive later changes; the campaign keeps a whole ``clone`` for that.)"""
    return {k: getattr(platform, k) for k in SNAPSHOT_KEYS}


def run_call(td: TdConfig, before: VcpuState, vcpu: KvmVcpu, platform: Platform) -> RoundTrip:
    """One round trip; a model exception becomes a ``model-bug`` or ``crash`` violation."""
    try:
        return tdvmcall(td, before.copy(), vcpu, platform)
    except TooManyExits:
        raise
    except ModelBug as e:
        # the strict (hardened) register cache raises on a read of an unavailable register or an
        # invalid pair: that is the cache property; any other ModelBug is the model's own assertion
        in_cache = any(f.filename.endswith("regcache.py") for f in traceback.extract_tb(e.__traceback__))
        raise VIOLATION["cache" if in_cache else "model-bug"](f"ModelBug: {e}") from e
    except Exception as e:
        raise VIOLATION["crash"](f"{type(e).__name__}: {e}") from e


def check_gate(
    td: TdConfig,
    before: VcpuState,
    rt: RoundTrip,
    pre: Platform,
    platform: Platform,
    cache_before: tuple[int, int],
    vcpu: KvmVcpu,
) -> bool:
    """The module gate; returns whether the call reached KVM."""
    expected = documented_gate(td, before.gprs[RAX], before.gprs[RCX], before.long_mode)
    if expected is None:
        require(
            rt.module is not None and rt.module.exited and rt.kvm is not None,
            "gate",
            f"a valid call (RCX {hex64(before.gprs[RCX])}) did not reach KVM",
        )
        return True
    require(rt.kvm is None and not (rt.module and rt.module.exited), "gate", "an invalid call reached KVM")
    require(state(platform) == state(pre), "gate", "an invalid call changed the platform")
    require((vcpu.cache.avail, vcpu.cache.dirty) == cache_before, "gate", "an invalid call changed KVM's cache")
    if expected == "fault":
        require(rt.fault is not None and rt.module is None, "gate", "TDCALL outside 64-bit mode did not fault")
        want, want_rip = before.gprs, before.rip
    elif expected == NOT_MODELLED:
        require(
            rt.module is not None and rt.module.not_modelled is not None,
            "gate",
            f"TDCALL leaf {before.gprs[RAX] & 0xFFFF} was not reported as not modelled",
        )
        want, want_rip = before.gprs, before.rip
    elif expected == VM_RD_REFUSED:
        require(
            rt.module is not None and rt.module.status == TDX_OPERAND_INVALID,
            "gate",
            "TDG.VM.RD with a version above 1 did not fail with operand RAX",
        )
        want = [TDX_OPERAND_INVALID] + before.gprs[1:]
        want[RDX], want[R8] = U64, 0  # written by TDG.VM.RD before it checks the version
        want_rip = (before.rip + 4) & U64
    else:
        require(
            rt.module is not None and rt.module.status == expected,
            "gate",
            lambda: f"status {hex64(rt.module.status) if rt.module else None}, documented {hex64(expected)}",
        )
        want, want_rip = [expected] + before.gprs[1:], (before.rip + 4) & U64
    require(
        rt.after.gprs == want, "gate", lambda: "registers changed: " + _gprs_diff(want, rt.after.gprs, list(range(16)))
    )
    require(rt.after.rip == want_rip, "gate", lambda: f"RIP {hex64(rt.after.rip)}, expected {hex64(want_rip)}")
    require(rt.after.xmm == before.xmm, "gate", "XMM registers changed")
    require(not rt.after.host, "gate", "a call that never reached KVM left host values in the guest")
    return False


def check_confidentiality_view(before: VcpuState, vmm: list[int], vmm_xmm: list[int]) -> None:
    """The VMM's registers: exposed GPRs/XMMs hold the guest's values, unexposed ones 0."""
    gpr, xmm = _exposed(before.gprs[RCX])
    g, x = before.gprs, before.xmm
    if vmm[2:] == [g[i] if gpr >> i & 1 else 0 for i in range(2, NR_GPRS)] and vmm_xmm == [
        x[i] if xmm >> i & 1 else 0 for i in range(16)
    ]:
        return  # the common case at once; otherwise find the first difference and say it
    for i in range(2, NR_GPRS):
        want = before.gprs[i] if gpr >> i & 1 else 0
        require(
            vmm[i] == want,
            "confidentiality",
            lambda: (
                f"VMM sees {GPR_NAMES[i]} = {hex64(vmm[i])}, expected {hex64(want)}"
                + ("" if gpr >> i & 1 else " (not exposed)")
            ),
        )
    for i in range(16):
        want = before.xmm[i] if xmm >> i & 1 else 0
        require(vmm_xmm[i] == want, "confidentiality", lambda: f"VMM sees xmm{i} = {vmm_xmm[i]:#x}, expected {want:#x}")


def host_view(rt: RoundTrip, platform: Platform) -> dict:
    """Everything the host side observes of one call."""
    k = rt.kvm
    view: dict[str, Any] = {
        "vmm": rt.module.exit.vmm if rt.module and rt.module.exit else None,
        "vmm_xmm": rt.module.exit.vmm_xmm if rt.module and rt.module.exit else None,
        "platform": state(platform),
    }
    if k is not None:
        view |= {
            "leaf": k.leaf.name,
            "verdict": k.verdict,
            "status": k.status,
            "wrote": k.wrote,
            "vmm_after": k.vmm_after,
        }
    return view


def check_noninterference(
    td: TdConfig, before: VcpuState, rt: RoundTrip, lane: Lane, pre_vcpu: KvmVcpu, pre_platform: Platform
) -> None:
    """Re-run the call with every unexposed GPR and XMM holding other values: the host must see
    exactly the same things.  ``pre_vcpu`` is a copy of the vCPU as it was before the call, used up
    here."""
    gpr, xmm = _exposed(before.gprs[RCX])
    other = before.copy()
    for i in range(2, NR_GPRS):
        if not gpr >> i & 1:
            other.gprs[i] ^= U64
    for i in range(16):
        if not xmm >> i & 1:
            other.xmm[i] ^= U128
    platform = clone(pre_platform)
    rt2 = run_call(td, other, pre_vcpu, platform)
    a, b = host_view(rt, lane.platform), host_view(rt2, platform)
    diff = [k for k in a if a[k] != b.get(k)]

    def where(k: str) -> str:
        if k in ("vmm", "vmm_after"):
            return f"{k} {' '.join(GPR_NAMES[i] for i in range(NR_GPRS) if a[k][i] != b[k][i])}"
        return k

    require(
        not diff,
        "confidentiality",
        lambda: (
            f"the host's {', '.join(map(where, diff))} changed when only unexposed registers "
            f"({' '.join(names_in(~gpr & 0xFFEC, 16))}) did"
        ),
    )


def check_cache(rt: RoundTrip, vcpu: KvmVcpu) -> None:
    cache = vcpu.cache
    if vcpu.policy == "hardened":
        require(
            cache.invalid_pairs() == 0,
            "cache",
            lambda: f"invalid pair (avail 0, dirty 1) in {cache.invalid_pairs():#x}",
        )
        gpr, _ = _exposed(rt.module.exit.control)  # type: ignore[union-attr]
        unavailable = [GPR_NAMES[r] for r in cache.reads if not (gpr | 1 << RCX) >> r & 1]
        require(not unavailable, "cache", f"a handler read {unavailable}, which the guest did not expose")
    else:
        bad = cache.invalid_pairs() & TDX_REGS_AVAIL_SET
        require(not bad, "cache", f"invalid pair for registers KVM keeps available: {bad:#x}")


def check_integrity(
    before: VcpuState,
    after: VcpuState,
    control: int,
    host: list[int],
    host_xmm: list[int],
    written: set[int] | None,
    kvm_rbp: bool = False,
    xmm_from_host: bool = False,
) -> None:
    """After resume: unexposed registers unchanged; exposed ones hold what the host wrote (all of
    them when ``written`` is None, the arbitrary-VMM case; else only those KVM wrote, the others
    unchanged); RAX 0, RCX the control, RIP advanced.  Exposed and written mismatches are reported as
    ``completeness``.  ``kvm_rbp``: the VMM was KVM, which passes no RBP, so an exposed RBP comes back
    as a host value (and is the only one).  ``xmm_from_host``: KVM_RUN went to userspace in between,
    so every exposed XMM comes back as a host value, the VMM thread's (KVM never saves or restores a
    TD's FPU state: docs/model.md, "Second review"); unexposed XMMs are unchanged either way."""
    gpr, xmm = _exposed(control)
    want_xmm_host = {i for i in range(16) if xmm >> i & 1} if xmm_from_host else set()
    require(
        after.xmm_host == want_xmm_host,
        "integrity",
        lambda: f"host values in xmm {sorted(after.xmm_host)}, expected {sorted(want_xmm_host)}",
    )
    want_host = {RBP} if kvm_rbp and gpr >> RBP & 1 else set()
    require(
        after.host == want_host,
        "integrity",
        lambda: f"host values in {sorted(GPR_NAMES[i] for i in after.host)}, expected {sorted(want_host)}",
    )
    g, a = before.gprs, after.gprs
    regs = [i for i in range(2, NR_GPRS) if i not in want_host]
    if (
        [a[i] for i in regs] == [host[i] if gpr >> i & 1 and (written is None or i in written) else g[i] for i in regs]
        and a[RAX] == 0
        and a[RCX] == control
        and after.rip == (before.rip + 4) & U64
        and not want_xmm_host
        and after.xmm == [host_xmm[i] if xmm >> i & 1 else before.xmm[i] for i in range(16)]
    ):
        return  # the common case at once; otherwise find the first difference and say it
    for i in range(2, NR_GPRS):
        if i in want_host:
            continue
        exposed = gpr >> i & 1
        wrote = exposed and (written is None or i in written)
        want = host[i] if wrote else before.gprs[i]
        prop = "completeness" if wrote and written is not None else "integrity"
        require(
            after.gprs[i] == want,
            prop,
            lambda: (
                f"{GPR_NAMES[i]} came back {hex64(after.gprs[i])}, expected {hex64(want)} "
                f"({'exposed' if exposed else 'not exposed'}, host wrote {hex64(host[i])})"
            ),
        )
    require(
        after.gprs[RAX] == 0 and after.gprs[RCX] == control,
        "integrity",
        lambda: f"RAX {hex64(after.gprs[RAX])} RCX {hex64(after.gprs[RCX])} after resume",
    )
    require(after.rip == (before.rip + 4) & U64, "integrity", "RIP not advanced past TDCALL")
    for i in range(16):
        if i in want_xmm_host:
            continue
        want = host_xmm[i] if xmm >> i & 1 else before.xmm[i]
        require(after.xmm[i] == want, "integrity", lambda: f"xmm{i} came back {after.xmm[i]:#x}, expected {want:#x}")


def check_host_writes(td: TdConfig, before: VcpuState, host: dict | None) -> None:
    """The module alone: whatever VMM registers the host resumes with, only exposed ones reach the guest."""
    if host is None or documented_gate(td, before.gprs[RAX], before.gprs[RCX], before.long_mode) is not None:
        return
    try:
        res = tdg_vp_vmcall(td, before.copy())
        after = tdh_vp_enter(td, res.exit, list(host["vmm"]), list(host["xmm"]))  # type: ignore[arg-type]
    except Exception as e:
        raise VIOLATION["crash"](f"module: {type(e).__name__}: {e}") from e
    check_confidentiality_view(before, res.exit.vmm, res.exit.vmm_xmm)  # type: ignore[union-attr]
    check_integrity(before, after, before.gprs[RCX], host["vmm"], [x & U128 for x in host["xmm"]], None)


# === what KVM writes: the ABI's own account, for the completeness property =========================
def _info_leaf_known(vmm: list[int]) -> bool:
    return vmm[R12] in (0, 1)  # GetTdVmCallInfo leaf 0 (in kernel) or 1 (userspace)


def _io_in(vmm: list[int]) -> bool:
    return vmm[R13] == 0  # direction, compared on 64 bits


def _mmio_read(vmm: list[int]) -> bool:
    return vmm[R13] & U32 == 0  # direction, low 32 bits


Writes = tuple[tuple[str, str, Callable[[list[int]], bool] | None], ...]

#: docs/abi.md §4, the "KVM writes" column and its details, restated for this property alone (never read
#: from ``kvm/leaves.py``, the table the model runs on): R11 of a GHCI call (R10 = 0) -> (name,
#: writes).  Each write is (outcome, registers, condition on the VMM's input registers or None); the
#: outcome is ``any``, ``failure`` (KVM wrote a non-zero status to R10, RETRY included) or
#: ``success``.  A register not listed for the call's outcome is never written: "untouched" in §4.
ABI_WRITES: dict[int, tuple[str, Writes]] = {
    # leaf 0: R10 = 0 and R11..R14 = 0; leaf 1: R10 and R11..R14 from userspace (whatever its ret);
    # another leaf: R10 = INVALID_OPERAND, R11..R14 untouched
    0x10000: ("GetTdVmCallInfo", (("any", "r10", None), ("any", "r11 r12 r13 r14", _info_leaf_known))),
    # on success neither R10 nor R11 (the guest gets its own back); on an error or RETRY both, R11 =
    # where to resume
    0x10001: ("MapGPA", (("failure", "r10 r11", None),)),
    0x10002: ("GetQuote", (("any", "r10", None),)),  # INVALID_OPERAND, or userspace's ret
    0x10003: ("ReportFatalError", ()),  # no status, no completion
    0x10004: ("SetupEventNotifyInterrupt", (("any", "r10", None),)),  # v6.16: SUBFUNC_UNSUPPORTED
    # EAX EBX ECX EDX into R12..R15, zero-extended; kvm_cpuid()'s result ignored: R10 never written
    10: ("Instruction.CPUID", (("any", "r12 r13 r14 r15", None),)),
    12: ("Instruction.HLT", ()),
    # R10 on error only; an IN's data into R11 (zero-extended), R11 untouched on OUT
    30: ("Instruction.IO", (("failure", "r10", None), ("success", "r11", _io_in))),
    # a failure is INVALID_OPERAND with R11 untouched; EDX:EAX into R11 on success only
    31: ("Instruction.RDMSR", (("failure", "r10", None), ("success", "r11", None))),
    32: ("Instruction.WRMSR", (("failure", "r10", None),)),
    48: ("#VE.RequestMMIO", (("failure", "r10", None), ("success", "r11", _mmio_read))),
}
#: any other GHCI leaf (Service 0x10005, WBINVD 54, ...): R10 = SUBFUNC_UNSUPPORTED
ABI_OTHER_GHCI: tuple[str, Writes] = ("an unhandled GHCI leaf", (("any", "r10", None),))
#: a KVM hypercall (R10 != 0, known or not): the result in R10, nothing else
ABI_HYPERCALL: tuple[str, Writes] = ("a KVM hypercall", (("any", "r10", None),))


#: the GHCI leaves handle_tdvmcall() itself switches on (the others are re-labelled before it)
_HANDLE_TDVMCALL_R11 = range(0x10000, 0x10005)


def ghci_leaf(vmm: list[int], tree: str = DEFAULT_TREE) -> int | None:
    """The R11 KVM's GHCI switch acts on for these VMM registers, or None for a KVM hypercall.
    R10 != 0 is a hypercall (ABI §4), except on a bus-lock exit (exit reason bit 26, ABI §3) in a
    tree that compares the whole reason (kvm-x86, v6.16: ``TreeRule.relabel``): KVM does not
    re-label that reason and ``handle_tdvmcall()`` switches on R11 alone, so only its own leaves
    0x10000..0x10004 run and anything else is an unhandled GHCI leaf (kvm-x86 ``tdx.c``
    ``tdx_to_vmx_exit_reason()``, ``handle_tdvmcall()``; docs/model.md, "Bus-lock exits").  7.3
    switches on the basic reason and dispatches a bus-lock exit like any other."""
    if vmm[RAX] >> 26 & 1 and TREES[tree].relabel == RELABEL_WHOLE_REASON:
        return vmm[R11] if vmm[R11] in _HANDLE_TDVMCALL_R11 else -1
    return None if vmm[R10] != 0 else vmm[R11]


def abi_writes(vmm: list[int], failed: bool, tree: str = DEFAULT_TREE) -> tuple[str, list[str]]:
    """What ABI §4 says a call with these VMM registers writes, given whether it failed."""
    r11 = ghci_leaf(vmm, tree)
    name, rows = ABI_HYPERCALL if r11 is None else ABI_WRITES.get(r11, ABI_OTHER_GHCI)
    want = ("any", "failure" if failed else "success")
    out: list[str] = []
    for outcome, regs, cond in rows:
        if outcome in want and (cond is None or cond(vmm)):
            out += regs.split()
    return name, out


def abi_values(vmm: list[int], wrote: dict[str, int], tree: str = DEFAULT_TREE) -> list[str]:
    """The values ABI §4 fixes, as (register, wrote, expected) lines for those that differ."""
    r11 = ghci_leaf(vmm, tree)
    want: dict[str, int] = {}
    if r11 == 0x10000:
        if vmm[R12] == 0:
            want = dict.fromkeys(("r10", "r11", "r12", "r13", "r14"), TDVMCALL_SUCCESS)
        elif vmm[R12] != 1:
            want = {"r10": TDVMCALL_INVALID_OPERAND}
    elif r11 is not None and r11 not in ABI_WRITES:
        want = {"r10": TDVMCALL_SUBFUNC_UNSUPPORTED}
    bad = [f"{r} = {hex64(wrote[r])}, expected {hex64(v)}" for r, v in want.items() if r in wrote and wrote[r] != v]
    if r11 == 10:  # CPUID: 32-bit results, zero-extended
        bad += [
            f"{r} = {hex64(wrote[r])}, not zero-extended" for r in ("r12", "r13", "r14", "r15") if wrote.get(r, 0) > U32
        ]
    return bad


def check_outputs(vmm: list[int], k: KvmResult) -> None:
    """Completeness, under either policy, for a call whose handler ran: KVM wrote exactly the
    registers ``ABI_WRITES`` lists for the call's inputs and outcome, with the values the ABI fixes."""
    failed = k.wrote.get("r10", 0) != 0
    name, want = abi_writes(vmm, failed, k.tree)
    outcome = "failure" if failed else "success"
    missing = [r for r in want if r not in k.wrote]
    require(not missing, "completeness", lambda: f"{name} ({outcome}) did not write {missing} (ABI §4)")
    extra = [r for r in k.wrote if r not in want]
    require(not extra, "completeness", lambda: f"{name} ({outcome}) wrote {extra}, which ABI §4 leaves untouched")
    bad = abi_values(vmm, k.wrote, k.tree)
    require(not bad, "completeness", lambda: f"{name}: {'; '.join(bad)} (ABI §4)")


def table_need(leaf: L.Leaf, vmm: list[int]) -> list[str]:
    """The registers the leaf table says a call needs exposed, for the values the VMM sees."""
    vals = {GPR_NAMES[i]: vmm[i] for i in range(NR_GPRS)}
    return L.required_inputs(leaf, vals) + L.possible_outputs(leaf, vals)


def check_hardened(before: VcpuState, rt: RoundTrip, pre: Platform, platform: Platform) -> None:
    """Refusal and completeness under the hardened policy."""
    k, ex = rt.kvm, rt.module.exit  # type: ignore[union-attr]
    assert k is not None and ex is not None
    gpr, _ = _exposed(ex.control)
    exposed = set(names_in(gpr, 16))
    unmet = [r for r in table_need(k.leaf, ex.vmm) if r not in exposed]
    # a tree whose tdx_handle_exit() exits to userspace after a bus lock (7.3: TreeRule.bus_lock_user_exit)
    # does so for a refused call too: that exit is the bus lock's, not the call's
    bus_lock_exit = TREES[k.tree].bus_lock_user_exit and bool(ex.vmm[RAX] >> 26 & 1)
    # R10 unexposed: no status can reach the guest, an internal error and nothing else
    if "r10" not in exposed:
        require(k.verdict == VERDICT_INTERNAL_ERROR, "refusal", f"R10 not exposed but verdict {k.verdict}")
        require(not k.wrote, "refusal", f"R10 not exposed but KVM wrote {sorted(k.wrote)}")
        new = platform.exits[len(pre.exits) :]
        require(
            len(new) == 1 and new[0]["reason"] == KVM_EXIT_INTERNAL_ERROR,
            "refusal",
            f"R10 not exposed: expected one internal-error exit, got {[e['reason'] for e in new]}",
        )
        return
    if k.verdict == VERDICT_REFUSED:
        require(bool(unmet), "refusal", f"{k.leaf.name} refused although every register it needs is exposed")
        now = state(platform)
        if bus_lock_exit:
            old, new = platform.exits[: len(pre.exits)], platform.exits[len(pre.exits) :]
            now["exits"] = old + [e for e in new if e["reason"] != KVM_EXIT_X86_BUS_LOCK]
        require(now == state(pre), "refusal", "a refused call changed the platform")
        calls_exits = [e for e in k.userspace_exits if not (bus_lock_exit and e["reason"] == KVM_EXIT_X86_BUS_LOCK)]
        require(not calls_exits, "refusal", "a refused call exited to userspace")
        require(
            k.wrote == {"r10": TDVMCALL_INVALID_OPERAND},
            "refusal",
            f"a refused call wrote {k.wrote}, expected only R10 = INVALID_OPERAND",
        )
        require(
            rt.after.gprs[R10] == TDVMCALL_INVALID_OPERAND, "refusal", "the guest did not get INVALID_OPERAND in R10"
        )
        return
    # completeness: every write exposed (what it writes: check_outputs, under both policies)
    dropped = [r for r in k.wrote if r not in exposed]
    require(not dropped, "completeness", f"{k.leaf.name} wrote {dropped}, which cannot reach the guest")
    require(not unmet, "refusal", f"{k.leaf.name} needs {unmet} exposed, verdict {k.verdict}")
    require(
        k.verdict in (VERDICT_COMPLETED, VERDICT_USERSPACE, VERDICT_RUN_FAILED),
        "refusal",
        f"unexpected verdict {k.verdict}",
    )


def guest_view(rt: RoundTrip) -> tuple:
    return rt.after.gprs, rt.after.rip, rt.after.xmm


def _side_effects(platform: Platform, pre: Platform) -> dict:
    """What a call did to the host: the exits and effects it added, the state it left."""
    now = state(platform)
    now["exits"] = now["exits"][len(pre.exits) :]
    now["effects"] = now["effects"][len(pre.effects) :]
    return now


def check_differential(
    td: TdConfig, before: VcpuState, hardened: RoundTrip, h_platform: Platform, pre_platform: Platform
) -> None:
    """Whenever hardened completes, legacy on the same host state gives the same guest and effects."""
    if hardened.kvm is None or hardened.kvm.verdict not in (VERDICT_COMPLETED, VERDICT_USERSPACE):
        return
    platform = clone(pre_platform)
    legacy = run_call(td, before, KvmVcpu("legacy"), platform)
    for name, a, b in zip(("GPRs", "RIP", "XMMs"), guest_view(hardened), guest_view(legacy)):
        require(
            a == b,
            "differential",
            lambda: f"legacy guest {name} differ: " + (_gprs_diff(a, b, list(range(16))) if name == "GPRs" else ""),
        )
    ha, la = _side_effects(h_platform, pre_platform), _side_effects(platform, pre_platform)
    diff = [k for k in ha if ha[k] != la[k]]
    require(not diff, "differential", f"legacy side effects differ in {diff}")


def check_call(td: TdConfig, before: VcpuState, lane: Lane, pre_platform: Platform, stats: Stats | None) -> RoundTrip:
    """Run one call in a lane (whose host was ``pre_platform``, a clone, just before) and check every
    property."""
    pre_vcpu = clone(lane.vcpu)
    cache_before = (lane.vcpu.cache.avail, lane.vcpu.cache.dirty)
    rt = run_call(td, before, lane.vcpu, lane.platform)
    reached = check_gate(td, before, rt, pre_platform, lane.platform, cache_before, lane.vcpu)
    if stats is not None:
        label = leaf_label(rt.kvm.leaf if rt.kvm else L.lookup(before.gprs[R10], before.gprs[11]))
        stats.record(lane.policy, label, rt.kvm.verdict if rt.kvm else (FAULT if rt.fault else GATE))
    if not reached:
        return rt
    k, ex = rt.kvm, rt.module.exit  # type: ignore[union-attr]
    assert k is not None and ex is not None
    check_confidentiality_view(before, ex.vmm, ex.vmm_xmm)
    check_noninterference(td, before, rt, lane, pre_vcpu, pre_platform)
    check_cache(rt, lane.vcpu)
    # what KVM wrote, by its own account: exposed ones must reach the guest, the rest is unchanged
    host = list(ex.vmm)
    for reg, value in k.wrote.items():
        host[GPR_NAMES.index(reg)] = value
    written = {GPR_NAMES.index(r) for r in k.wrote}
    # a return to userspace (any exit KVM reports) hands the guest the VMM thread's XMMs
    from_host = bool(k.userspace_exits)
    check_integrity(before, rt.after, ex.control, host, ex.vmm_xmm, written, kvm_rbp=True, xmm_from_host=from_host)
    if k.verdict in (VERDICT_COMPLETED, VERDICT_USERSPACE):  # the handler ran
        check_outputs(ex.vmm, k)
    elif k.verdict == VERDICT_RUN_FAILED:  # MapGPA: KVM_RUN fails before anything is written
        require(not k.wrote, "completeness", lambda: f"KVM_RUN failed, yet KVM wrote {sorted(k.wrote)}")
    if lane.policy == "hardened":
        check_hardened(before, rt, pre_platform, lane.platform)
    return rt

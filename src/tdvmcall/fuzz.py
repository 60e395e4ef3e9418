"""Fuzzing the model's promises: hypothesis strategies over the whole input space, the properties
every execution must satisfy, and the campaign behind ``tdvmcall fuzz``.

An *example* is a TD (module 1.0/1.5, NO_RBP_MOD on/off), a kernel tree, an initial platform (the
``platform`` object of a scenario, so that every fuzzed host is expressible in the scenario contract)
and a sequence of one to three TDVMCALLs.  Each policy runs the whole sequence on one ``KvmVcpu`` and
one ``Platform`` (state carries over: MSRs written, MMIO memory, userspace answers consumed, the
register cache), and every call is checked against the properties below.  Hypothesis draws and shrinks
the examples; nothing here shrinks by hand.

Properties (ABI.md §2-§5; each is a restatement of a documented fact, never a call into the code it
checks):

``gate``            an invalid RAX or control never reaches KVM and yields exactly the documented
                    status (RAX 0xC000010000000000 / control 0xC000010000000001), RIP advanced, every
                    other register, the platform and the cache unchanged; outside 64-bit mode, #GP and
                    nothing changes (ABI §3, tdx-module ``tdg_vp_vmcall.c``).
``confidentiality`` the VMM's view of an unexposed GPR or XMM is 0, and nothing the host sees
                    (VMM registers, KVM's writes and verdict, userspace exits, side effects) changes
                    when the unexposed registers hold other values (ABI §3, ``td_exit.c``).
``integrity``       after resume every unexposed register holds its old value whatever the host wrote
                    (checked with KVM's own writes and with arbitrary VMM registers handed to
                    ``tdh_vp_enter``); an exposed register KVM did not write comes back unchanged;
                    RAX = 0, RCX = the control, RIP advanced (ABI §3, ``tdh_vp_enter.c``).
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
``completeness``    hardened: every output a completed call writes is exposed and reaches the guest,
                    and every output the table expects for the outcome is written (ABI §2, §4).
``differential``    whenever hardened completes a call, legacy on the same platform gives the same
                    guest registers and the same side effects.
``model-bug``       the model raised ``ModelBug`` (a broken internal invariant).
``crash``           the model raised anything else.
"""

from __future__ import annotations

import copy
import time
from collections import Counter
import random
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from . import scenario as S
from .codes import EAGAIN, EINVAL, TDVMCALL_STATUS_NAMES, TDX_OPERAND_INVALID, TDX_OPERAND_INVALID_RCX
from .codes import TDVMCALL_INVALID_OPERAND
from .guest import RoundTrip, tdvmcall
from .kvm import leaves as L
from .kvm.platform import KVM_EXIT_INTERNAL_ERROR, Platform
from .kvm.regcache import TDX_REGS_AVAIL_SET, ModelBug
from .kvm.tdx import VERDICT_COMPLETED, VERDICT_INTERNAL_ERROR, VERDICT_REFUSED, VERDICT_USERSPACE, KvmVcpu
from .module import TdConfig, VcpuState, tdg_vp_vmcall, tdh_vp_enter
from .regs import GPR_NAMES, NR_GPRS, R10, RAX, RBP, RCX, RSP, U32, U64, hex64, mask_of, names_in

U128 = (1 << 128) - 1
POLICY_CHOICES = ("legacy", "hardened", "both")
PROPERTIES = ("gate", "confidentiality", "integrity", "cache", "refusal", "completeness", "differential",
              "model-bug", "crash")
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


# === strategies ==================================================================================
INTERESTING_U64 = (0, 1, 2, 3, 4, 8, 0x10, 0x20, 0xFF, 0x1000, 0xFFFF, 0x20_0000, U32, 1 << 32,
                   1 << 51, (1 << 51) | 0x1000, 1 << 63, U64 - 0xFFF, U64)
#: MSR indices worth poking: the emulated x2APIC ones, TSC deadline, APIC base, and an unknown one
INTERESTING_MSRS = (0x10, 0x1B, 0x6E0, 0x802, 0x803, 0x808, 0x80B, 0x80F, 0x830, 0xC0000080)


@cache
def u64s() -> st.SearchStrategy[int]:
    """Any 64-bit value, biased toward boundaries.  (Strategies are built once: hypothesis validates
    each new strategy object, which would cost more than the model.)"""
    return st.one_of(st.sampled_from(INTERESTING_U64), st.integers(0, U64), st.integers(0, 0xFFFF))


_ANY_U64 = st.integers(0, U64)


@cache
def u128s() -> st.SearchStrategy[int]:
    return st.one_of(st.just(0), st.integers(0, U128), st.sampled_from((1, U64, U128)))


def pick(choices: tuple) -> st.SearchStrategy[Any]:
    """One of ``choices``, near uniformly (shrinking goes to the first).  A 64-bit draw taken modulo
    the count: ``sampled_from`` and small ``integers`` ranges favour their first value so strongly
    inside these composite strategies that the rarer branches were hardly ever taken."""
    return st.integers(0, U64).map(lambda v: choices[v % len(choices)])


def choose(draw: Callable, seq: Sequence[Any]) -> Any:
    """``pick`` for a sequence known only while drawing."""
    return seq[draw(_ANY_U64) % len(seq)]


@cache
def weighted(default: Any, *others: Any, odds: int = 8) -> st.SearchStrategy[Any]:
    """``default`` ``odds`` times in ``odds + len(others)`` (and what shrinking goes back to), each of
    ``others`` once."""
    return pick((default,) * odds + others)


#: every call KVM distinguishes: the table's leaves and hypercalls, an unknown hypercall, an unknown
#: GHCI leaf (its selectors are drawn at random)
TARGETS: tuple[L.Leaf | None, ...] = L.LEAVES + (L.UNKNOWN_HYPERCALL, None)
_TARGET = pick(TARGETS)


@st.composite
def guest_registers(draw, target: L.Leaf | None) -> dict[str, int]:
    """GPRs 2..15 for a call to ``target``: background values at random, the leaf's selectors
    (``selector_values``, sometimes replaced by random ones), and its inputs from one of its
    ``cases`` or at random."""
    regs = {name: draw(_ANY_U64) for name in GPR_NAMES[2:]}
    if target is None:  # an unknown GHCI leaf
        regs["r10"] = 0
        regs["r11"] = draw(_UNKNOWN_R11)
        return regs
    case = choose(draw, target.cases)
    for reg, value in {**target.selector_values(), **case.regs}.items():
        regs[reg] = value
    for op in target.inputs:
        # the case's value, or anything (each input independently)
        if draw(weighted(True, False, odds=2)) and op.reg in case.regs:
            continue
        regs[op.reg] = draw(u64s())
    if draw(weighted(False, True, odds=12)):  # random selectors: whatever leaf they pick
        regs["r10"] = draw(weighted(0, 1, 5, 9, 10, 11, 12, 0x77, U64))
        regs["r11"] = draw(u64s())
    return regs


_KNOWN_R11 = {leaf.r11 for leaf in L.LEAVES if leaf.family == "ghci"}
_UNKNOWN_R11 = st.one_of(st.integers(0, 0x10010), u64s()).filter(lambda v: v not in _KNOWN_R11)
_VALID_GPRS = [i for i in range(2, NR_GPRS) if i != RSP]


@st.composite
def controls(draw, regs: dict[str, int], module: str, no_rbp_mod: bool) -> int:
    """An RCX: mostly around the minimal mask of the call the registers select (exact, one register
    short, one too many, widest legal), sometimes with forbidden or reserved bits, sometimes anything."""
    leaf = L.lookup(regs["r10"], regs["r11"])
    need = L.minimal_mask(leaf, regs)
    kind = draw(_MASK_KINDS)
    gpr = need
    if kind == "minus" and need:
        # one register short: half the time an output the call does not also read, the boundary a
        # check that looked only at inputs would miss
        outputs_only = need & ~mask_of(L.required_inputs(leaf, regs))
        pool = outputs_only if outputs_only and draw(st.booleans()) else need
        gpr = need & ~(1 << choose(draw, names_to_ids(pool)))
    elif kind == "plus":
        gpr = need | 1 << choose(draw, _VALID_GPRS)
    elif kind == "widest":
        gpr = 0xFFCC if no_rbp_mod and module == "1.5" else 0xFFEC
    elif kind == "random":
        gpr = draw(st.integers(0, 0xFFFF)) & ~0x13
    if draw(weighted(False, True, odds=30)):  # a forbidden bit: RAX, RCX, RSP or RBP
        gpr |= 1 << choose(draw, (RAX, RCX, RSP, RBP))
    xmm = draw(weighted(0, None, odds=3))
    if xmm is None:
        xmm = draw(st.integers(1, 0xFFFF))
    reserved = 0
    if draw(weighted(False, True, odds=40)):
        reserved = draw(st.integers(1, U32)) << 32
    rcx = gpr | xmm << 16 | reserved
    return draw(st.integers(0, U64)) if kind == "any" else rcx


#: how an RCX is built: one register short is the boundary that matters most, so it is as likely
#: as the exact minimal mask (hypothesis favours the first entry, which is also where it shrinks to)
_MASK_KINDS = pick(("minimal",) * 6 + ("minus",) * 6 + ("plus", "widest", "random") * 2 + ("any",))


def names_to_ids(mask: int) -> list[int]:
    return [i for i in range(NR_GPRS) if mask >> i & 1]


@st.composite
def calls(draw, module: str, no_rbp_mod: bool) -> dict:
    """One TDVMCALL: the scenario ``guest`` object plus the arbitrary VMM registers a host could hand
    to TDH.VP.ENTER (``host``: checked against the module alone)."""
    target = draw(_TARGET)
    regs = draw(guest_registers(target))
    regs["rcx"] = draw(controls(regs, module, no_rbp_mod))
    regs["rax"] = draw(weighted(0, None, 1 << 24, 1 << 16, 1, odds=60))  # RAX = TDG.VP.VMCALL, or not
    if regs["rax"] is None:
        regs["rax"] = draw(st.integers(1, U64))
    guest: dict[str, Any] = {name: regs[name] for name in GPR_NAMES}
    guest["rip"] = draw(weighted(0x1000, None, U64 - 1, odds=6))
    if guest["rip"] is None:
        guest["rip"] = draw(st.integers(0, U64))
    guest["long_mode"] = draw(weighted(True, False, odds=40))
    xmm = draw(st.dictionaries(st.integers(0, 15), u128s(), max_size=3))
    guest["xmm"] = {f"xmm{i}": v for i, v in xmm.items()}
    return {"guest": guest, "host": host_writes(draw(st.integers(0, U64)))}


def host_writes(seed: int) -> dict[str, list[int]]:
    """Arbitrary VMM registers (16 GPRs, 16 XMMs) for TDH.VP.ENTER, expanded from one drawn seed:
    32 separate draws would cost more than the model, and their shrinking tells nothing."""
    rnd = random.Random(seed)
    return {"vmm": [rnd.getrandbits(64) for _ in range(NR_GPRS)], "xmm": [rnd.getrandbits(128) for _ in range(16)]}


def _maps(keys: st.SearchStrategy[int], values: st.SearchStrategy[int]) -> st.SearchStrategy[dict]:
    """Empty or one or two entries."""
    return st.one_of(st.just({}), st.dictionaries(keys, values, min_size=1, max_size=2))


_MSR_INDEX = st.one_of(st.sampled_from(INTERESTING_MSRS), st.integers(0, U32))
_CPUID_ENTRY = st.fixed_dictionaries({
    "leaf": st.one_of(st.sampled_from((0, 1, 7, 0xD, 0x40000000, 0x80000000)), st.integers(0, U32)),
    "subleaf": st.integers(0, 3), "eax": st.integers(0, U32), "ebx": st.integers(0, U32),
    "ecx": st.integers(0, U32), "edx": st.integers(0, U32)})
_PLATFORM_PARTS = {
    "msr_exits": weighted(False, True, odds=2),
    "exit_hypercall_map_gpa": weighted(True, False, odds=4),
    "pending_event": weighted(False, True, odds=4),
    "host_clock_suitable": weighted(True, False, odds=4),
    "gpaw": weighted(52, 48, odds=4),
    "maxphyaddr": weighted(52, 48, 46, 39, odds=4),
    "apic_ids": st.one_of(st.just([0, 1, 2, 3]), st.lists(st.integers(0, 300), max_size=4)),
    "msrs": _maps(_MSR_INDEX, u64s()),
    "cpuid": st.one_of(st.just([]), st.lists(_CPUID_ENTRY, min_size=1, max_size=2)),
}
_TDX_RET = st.one_of(st.none(), st.sampled_from(tuple(TDVMCALL_STATUS_NAMES)), u64s())
_USERSPACE_PARTS = {
    "hypercall_ret": st.lists(st.one_of(st.sampled_from((0, EAGAIN, EINVAL)), u64s()), max_size=3),
    "tdvmcall_info": st.one_of(st.just([2, 0, 0, 0]), st.lists(u64s(), min_size=4, max_size=4)),
    "ports": _maps(st.one_of(st.sampled_from((0x3F8, 0x3FD, 0xCF8)), st.integers(0, 0xFFFF)), u64s()),
    "mmio": _maps(st.one_of(st.just(0xFEB0_0000), st.integers(0, (1 << 52) - 1)), u64s()),
    "rdmsr": _maps(_MSR_INDEX, u64s()),
    "msr_error": weighted(False, True, odds=4),
}


@st.composite
def platforms(draw) -> dict:
    """A scenario ``platform`` object: KVM's capabilities and state (MSRs, CPUID entries, address
    widths, vCPUs) and userspace's answers (hypercall and KVM_EXIT_TDX returns, GetTdVmCallInfo words,
    port, MMIO and MSR answers)."""
    p = draw(st.fixed_dictionaries(_PLATFORM_PARTS))
    u = draw(st.fixed_dictionaries(_USERSPACE_PARTS))
    tdx_ret = draw(_TDX_RET)
    if tdx_ret is not None:
        u["tdx_ret"] = tdx_ret
    p["userspace"] = u
    return p


@st.composite
def examples(draw, max_calls: int = 3) -> dict:
    """A whole example: TD, kernel tree, initial platform and a sequence of calls."""
    module = draw(st.sampled_from(("1.5", "1.0")))
    no_rbp_mod = draw(weighted(True, False, odds=2))
    return {
        "td": {"module": module, "no_rbp_mod": no_rbp_mod},
        "tree": draw(weighted("kvm-x86", "v6.16", odds=4)),
        "platform": draw(platforms()),
        "calls": draw(st.lists(calls(module, no_rbp_mod), min_size=1, max_size=max_calls)),
    }


# === the oracle for the module gate ================================================================
def documented_gate(td: TdConfig, rax: int, rcx: int, long_mode: bool) -> str | int | None:
    """What ABI.md §3 says the module does with this TDCALL: ``"fault"`` (#GP outside 64-bit mode),
    the status the guest gets for a bad RAX or control, or ``None`` (the call exits to the VMM).
    Restated from the ABI notes on purpose, not taken from ``control.py``: an oracle must not share
    code with what it checks."""
    if not long_mode:
        return "fault"
    if rax != 0:  # reserved bits 63:24, version 23:16 or a leaf other than 0
        return TDX_OPERAND_INVALID  # operand id RAX = 0
    forbidden = 1 << RAX | 1 << RCX | 1 << RSP
    if td.no_rbp_mod and td.module == "1.5":
        forbidden |= 1 << RBP
    if rcx & forbidden or rcx >> 32:
        return TDX_OPERAND_INVALID_RCX
    return None


# === running and checking one call ===============================================================
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

    def record(self, policy: str, leaf: str, verdict: str) -> None:
        self.executions += 1
        self.coverage[(policy, leaf, verdict)] += 1


def leaf_label(leaf: L.Leaf) -> str:
    """Coverage name of a leaf: its table name, one name for every unknown GHCI leaf."""
    return leaf.name if leaf.name in L.BY_NAME or leaf is L.UNKNOWN_HYPERCALL else "unknown GHCI leaf"


def _gprs_diff(a: list[int], b: list[int], regs: list[int]) -> str:
    return ", ".join(f"{GPR_NAMES[i]} {hex64(a[i])} -> {hex64(b[i])}" for i in regs if a[i] != b[i])


def _exposed(rcx: int) -> tuple[int, int]:
    return rcx & 0xFFFF, rcx >> 16 & 0xFFFF


def clone(platform: Platform) -> Platform:
    """A copy of a host whose later changes do not touch the original.  The CPUID table is shared:
    no handler writes it (``Platform.kvm_cpuid`` only reads), and copying it is most of the cost."""
    return copy.deepcopy(platform, {id(platform.cpuid): platform.cpuid})


def run_call(td: TdConfig, before: VcpuState, vcpu: KvmVcpu, platform: Platform) -> RoundTrip:
    """One round trip; a model exception becomes a ``model-bug`` or ``crash`` violation."""
    try:
        return tdvmcall(td, before.copy(), vcpu, platform)
    except ModelBug as e:
        # the strict (hardened) register cache raises on a read of an unavailable register or an
        # invalid pair: that is the cache property; any other ModelBug is the model's own assertion
        in_cache = any(f.filename.endswith("regcache.py") for f in traceback.extract_tb(e.__traceback__))
        raise VIOLATION["cache" if in_cache else "model-bug"](f"ModelBug: {e}") from e
    except Exception as e:  # noqa: BLE001  anything else the model raises is a crash
        raise VIOLATION["crash"](f"{type(e).__name__}: {e}") from e


def check_gate(td: TdConfig, before: VcpuState, rt: RoundTrip, snap: dict, platform: Platform,
               cache_before: tuple[int, int], vcpu: KvmVcpu) -> bool:
    """The module gate; returns whether the call reached KVM."""
    expected = documented_gate(td, before.gprs[RAX], before.gprs[RCX], before.long_mode)
    if expected is None:
        require(rt.module is not None and rt.module.exited and rt.kvm is not None, "gate",
                f"a valid call (RCX {hex64(before.gprs[RCX])}) did not reach KVM")
        return True
    require(rt.kvm is None and not (rt.module and rt.module.exited), "gate", "an invalid call reached KVM")
    require(platform.snapshot() == snap, "gate", "an invalid call changed the platform")
    require((vcpu.cache.avail, vcpu.cache.dirty) == cache_before, "gate", "an invalid call changed KVM's cache")
    if expected == "fault":
        require(rt.fault is not None and rt.module is None, "gate", "TDCALL outside 64-bit mode did not fault")
        want, want_rip = before.gprs, before.rip
    else:
        require(rt.module is not None and rt.module.status == expected, "gate",
                lambda: f"status {hex64(rt.module.status) if rt.module else None}, documented {hex64(expected)}")
        want, want_rip = [expected] + before.gprs[1:], (before.rip + 4) & U64
    require(rt.after.gprs == want, "gate",
            lambda: "registers changed: " + _gprs_diff(want, rt.after.gprs, list(range(16))))
    require(rt.after.rip == want_rip, "gate", lambda: f"RIP {hex64(rt.after.rip)}, expected {hex64(want_rip)}")
    require(rt.after.xmm == before.xmm, "gate", "XMM registers changed")
    return False


def check_confidentiality_view(before: VcpuState, vmm: list[int], vmm_xmm: list[int]) -> None:
    """The VMM's registers: exposed GPRs/XMMs hold the guest's values, unexposed ones 0."""
    gpr, xmm = _exposed(before.gprs[RCX])
    for i in range(2, NR_GPRS):
        want = before.gprs[i] if gpr >> i & 1 else 0
        require(vmm[i] == want, "confidentiality",
                lambda: f"VMM sees {GPR_NAMES[i]} = {hex64(vmm[i])}, expected {hex64(want)}"
                        + ("" if gpr >> i & 1 else " (not exposed)"))
    for i in range(16):
        want = before.xmm[i] if xmm >> i & 1 else 0
        require(vmm_xmm[i] == want, "confidentiality", lambda: f"VMM sees xmm{i} = {vmm_xmm[i]:#x}, expected {want:#x}")


def host_view(rt: RoundTrip, platform: Platform) -> dict:
    """Everything the host side observes of one call."""
    k = rt.kvm
    view: dict[str, Any] = {"vmm": rt.module.exit.vmm if rt.module and rt.module.exit else None,
                            "vmm_xmm": rt.module.exit.vmm_xmm if rt.module and rt.module.exit else None,
                            "platform": platform.snapshot()}
    if k is not None:
        view |= {"leaf": k.leaf.name, "verdict": k.verdict, "status": k.status, "wrote": k.wrote,
                 "vmm_after": k.vmm_after}
    return view


def check_noninterference(td: TdConfig, before: VcpuState, rt: RoundTrip, lane: Lane, pre_vcpu: KvmVcpu,
                          pre_platform: Platform) -> None:
    """Re-run the call with every unexposed GPR and XMM holding other values: the host must see
    exactly the same things."""
    gpr, xmm = _exposed(before.gprs[RCX])
    other = before.copy()
    for i in range(2, NR_GPRS):
        if not gpr >> i & 1:
            other.gprs[i] ^= U64
    for i in range(16):
        if not xmm >> i & 1:
            other.xmm[i] ^= U128
    platform = clone(pre_platform)
    rt2 = run_call(td, other, copy.deepcopy(pre_vcpu), platform)
    a, b = host_view(rt, lane.platform), host_view(rt2, platform)
    diff = [k for k in a if a[k] != b.get(k)]

    def where(k: str) -> str:
        if k in ("vmm", "vmm_after"):
            return f"{k} {' '.join(GPR_NAMES[i] for i in range(NR_GPRS) if a[k][i] != b[k][i])}"
        return k

    require(not diff, "confidentiality",
            lambda: f"the host's {', '.join(map(where, diff))} changed when only unexposed registers "
                    f"({' '.join(names_in(~gpr & 0xFFEC, 16))}) did")


def check_cache(rt: RoundTrip, vcpu: KvmVcpu) -> None:
    cache = vcpu.cache
    if vcpu.policy == "hardened":
        require(cache.invalid_pairs() == 0, "cache",
                lambda: f"invalid pair (avail 0, dirty 1) in {cache.invalid_pairs():#x}")
        gpr, _ = _exposed(rt.module.exit.control)  # type: ignore[union-attr]
        unavailable = [GPR_NAMES[r] for r in cache.reads if not (gpr | 1 << RCX) >> r & 1]
        require(not unavailable, "cache", f"a handler read {unavailable}, which the guest did not expose")
    else:
        bad = cache.invalid_pairs() & TDX_REGS_AVAIL_SET
        require(not bad, "cache", f"invalid pair for registers KVM keeps available: {bad:#x}")


def check_integrity(before: VcpuState, after: VcpuState, control: int, host: list[int], host_xmm: list[int],
                    written: set[int] | None) -> None:
    """After resume: unexposed registers unchanged; exposed ones hold what the host wrote (all of
    them when ``written`` is None, the arbitrary-VMM case; else only those KVM wrote, the others
    unchanged); RAX 0, RCX the control, RIP advanced.  Exposed and written mismatches are reported as
    ``completeness``."""
    gpr, xmm = _exposed(control)
    for i in range(2, NR_GPRS):
        exposed = gpr >> i & 1
        wrote = exposed and (written is None or i in written)
        want = host[i] if wrote else before.gprs[i]
        prop = "completeness" if wrote and written is not None else "integrity"
        require(after.gprs[i] == want, prop,
                lambda: f"{GPR_NAMES[i]} came back {hex64(after.gprs[i])}, expected {hex64(want)} "
                        f"({'exposed' if exposed else 'not exposed'}, host wrote {hex64(host[i])})")
    require(after.gprs[RAX] == 0 and after.gprs[RCX] == control, "integrity",
            lambda: f"RAX {hex64(after.gprs[RAX])} RCX {hex64(after.gprs[RCX])} after resume")
    require(after.rip == (before.rip + 4) & U64, "integrity", "RIP not advanced past TDCALL")
    for i in range(16):
        want = host_xmm[i] if xmm >> i & 1 else before.xmm[i]
        require(after.xmm[i] == want, "integrity", lambda: f"xmm{i} came back {after.xmm[i]:#x}, expected {want:#x}")


def check_host_writes(td: TdConfig, before: VcpuState, host: dict | None) -> None:
    """The module alone: whatever VMM registers the host resumes with, only exposed ones reach the guest."""
    if host is None or documented_gate(td, before.gprs[RAX], before.gprs[RCX], before.long_mode) is not None:
        return
    try:
        res = tdg_vp_vmcall(td, before.copy())
        after = tdh_vp_enter(td, res.exit, list(host["vmm"]), list(host["xmm"]))  # type: ignore[arg-type]
    except Exception as e:  # noqa: BLE001
        raise VIOLATION["crash"](f"module: {type(e).__name__}: {e}") from e
    check_confidentiality_view(before, res.exit.vmm, res.exit.vmm_xmm)  # type: ignore[union-attr]
    check_integrity(before, after, before.gprs[RCX], host["vmm"], [x & U128 for x in host["xmm"]], None)


def table_need(leaf: L.Leaf, vmm: list[int]) -> list[str]:
    """The registers the leaf table says a call needs exposed, for the values the VMM sees."""
    vals = {GPR_NAMES[i]: vmm[i] for i in range(NR_GPRS)}
    return L.required_inputs(leaf, vals) + L.possible_outputs(leaf, vals)


def check_hardened(before: VcpuState, rt: RoundTrip, snap: dict, platform: Platform) -> None:
    """Refusal and completeness under the hardened policy."""
    k, ex = rt.kvm, rt.module.exit  # type: ignore[union-attr]
    assert k is not None and ex is not None
    gpr, _ = _exposed(ex.control)
    exposed = set(names_in(gpr, 16))
    unmet = [r for r in table_need(k.leaf, ex.vmm) if r not in exposed]
    # R10 unexposed: no status can reach the guest, an internal error and nothing else
    if "r10" not in exposed:
        require(k.verdict == VERDICT_INTERNAL_ERROR, "refusal", f"R10 not exposed but verdict {k.verdict}")
        require(not k.wrote, "refusal", f"R10 not exposed but KVM wrote {sorted(k.wrote)}")
        new = platform.exits[len(snap["exits"]):]
        require(len(new) == 1 and new[0]["reason"] == KVM_EXIT_INTERNAL_ERROR, "refusal",
                f"R10 not exposed: expected one internal-error exit, got {[e['reason'] for e in new]}")
        return
    if k.verdict == VERDICT_REFUSED:
        require(bool(unmet), "refusal", f"{k.leaf.name} refused although every register it needs is exposed")
        require(platform.snapshot() == snap, "refusal", "a refused call changed the platform")
        require(not k.userspace_exits, "refusal", "a refused call exited to userspace")
        require(k.wrote == {"r10": TDVMCALL_INVALID_OPERAND}, "refusal",
                f"a refused call wrote {k.wrote}, expected only R10 = INVALID_OPERAND")
        require(rt.after.gprs[R10] == TDVMCALL_INVALID_OPERAND, "refusal",
                "the guest did not get INVALID_OPERAND in R10")
        return
    # completeness: every write exposed, every expected output written
    dropped = [r for r in k.wrote if r not in exposed]
    require(not dropped, "completeness", f"{k.leaf.name} wrote {dropped}, which cannot reach the guest")
    vals = {GPR_NAMES[i]: ex.vmm[i] for i in range(NR_GPRS)}
    clean = [r for r in L.expected_outputs(k.leaf, vals, k.wrote.get("r10", 0) != 0) if r not in k.wrote]
    require(not clean, "completeness", f"{k.leaf.name} did not write its outputs {clean}")
    require(not unmet, "refusal", f"{k.leaf.name} needs {unmet} exposed, verdict {k.verdict}")
    require(k.verdict in (VERDICT_COMPLETED, VERDICT_USERSPACE), "refusal", f"unexpected verdict {k.verdict}")


def guest_view(rt: RoundTrip) -> tuple:
    return rt.after.gprs, rt.after.rip, rt.after.xmm


def _side_effects(platform: Platform, snap: dict) -> dict:
    now = platform.snapshot()
    return {"exits": now["exits"][len(snap["exits"]):], "effects": now["effects"][len(snap["effects"]):],
            "msrs": now["msrs"], "memory": now["memory"], "userspace": now["userspace"]}


def check_differential(td: TdConfig, before: VcpuState, hardened: RoundTrip, h_platform: Platform,
                       pre_platform: Platform) -> None:
    """Whenever hardened completes, legacy on the same host state gives the same guest and effects."""
    if hardened.kvm is None or hardened.kvm.verdict not in (VERDICT_COMPLETED, VERDICT_USERSPACE):
        return
    platform = clone(pre_platform)
    snap = platform.snapshot()
    legacy = run_call(td, before, KvmVcpu("legacy"), platform)
    for name, a, b in zip(("GPRs", "RIP", "XMMs"), guest_view(hardened), guest_view(legacy)):
        require(a == b, "differential",
                lambda: f"legacy guest {name} differ: " + (_gprs_diff(a, b, list(range(16))) if name == "GPRs" else ""))
    ha, la = _side_effects(h_platform, snap), _side_effects(platform, snap)
    diff = [k for k in ha if ha[k] != la[k]]
    require(not diff, "differential", f"legacy side effects differ in {diff}")


def check_call(td: TdConfig, before: VcpuState, lane: Lane, pre_platform: Platform,
               stats: Stats | None) -> RoundTrip:
    """Run one call in a lane (whose host was ``pre_platform`` just before) and check every property."""
    pre_vcpu = copy.deepcopy(lane.vcpu)
    snap = lane.platform.snapshot()
    cache_before = (lane.vcpu.cache.avail, lane.vcpu.cache.dirty)
    rt = run_call(td, before, lane.vcpu, lane.platform)
    reached = check_gate(td, before, rt, snap, lane.platform, cache_before, lane.vcpu)
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
    check_integrity(before, rt.after, ex.control, host, ex.vmm_xmm, written)
    if lane.policy == "hardened":
        check_hardened(before, rt, snap, lane.platform)
    return rt


def _scenario(ex: dict, guest: dict, policy: str | None = None, platform: dict | None = None) -> dict:
    kvm = {"tree": ex["tree"]} | ({"policy": policy} if policy else {})
    return {"td": ex["td"], "kvm": kvm, "guest": guest, "platform": ex["platform"] if platform is None else platform}


def policies_of(policy: str) -> tuple[str, ...]:
    if policy not in POLICY_CHOICES:
        raise ValueError(f"unknown policy {policy!r}; accepted: {', '.join(POLICY_CHOICES)}")
    return ("legacy", "hardened") if policy == "both" else (policy,)


def run_example(ex: dict, policies: tuple[str, ...] = ("legacy", "hardened"), stats: Stats | None = None) -> None:
    """Run an example's calls under each policy (one vCPU and one host per policy, kept across the
    calls) and check every property; raise the first :class:`Violation`, located: the call, the
    policy (None: the module alone) and the host as it was just before the call."""
    lanes = [Lane(p, KvmVcpu(p), S.parse(_scenario(ex, {})).platform) for p in policies]
    for n, call in enumerate(ex["calls"]):
        sc = S.parse(_scenario(ex, call["guest"]))
        td, before = sc.td, sc.guest
        lane: Lane | None = None
        pre = lanes[0].platform
        try:
            check_host_writes(td, before, call.get("host"))
            rts: dict[str, RoundTrip] = {}
            for lane in lanes:
                pre = clone(lane.platform)
                rts[lane.policy] = check_call(td, before, lane, pre, stats)
                if lane.policy == "hardened" and "legacy" in rts:
                    check_differential(td, before, rts["hardened"], lane.platform, pre)
        except Violation as v:
            v.call, v.policy = n, lane.policy if lane else None
            v.platform = ex["platform"] if n == 0 else platform_json(pre, ex["platform"])
            if n > 0:
                v.expressible.append(f"the {n} earlier call(s) on the same KVM vCPU (the whole example "
                                     "is written beside this file as *.sequence.json)")
            raise


def platform_json(p: Platform, base: dict) -> dict:
    """The scenario ``platform`` object of a host whose state earlier calls changed: MSRs as they are
    now, the userspace answers not yet consumed, MMIO memory written folded into the MMIO answers
    (a read returns the written word first, then the answer: the same reads)."""
    out = copy.deepcopy(base)
    out["msrs"] = {f"{k:#x}": hex64(v) for k, v in p.msrs.items()}
    u = out.setdefault("userspace", {})
    u["hypercall_ret"] = [hex64(v) for v in p.userspace.hypercall_ret]
    u["mmio"] = {f"{k:#x}": hex64(v) for k, v in {**p.userspace.mmio, **p.memory}.items()}
    return out


# === counterexamples ===============================================================================
def hexed(value: Any) -> Any:
    """Values above 32 bits as the contract's hex strings (JSON-safe for any reader); smaller ones,
    booleans and strings kept."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, dict):
            return {k: hexed(v) for k, v in value.items()}
        if isinstance(value, list):
            return [hexed(v) for v in value]
        return value
    return value if value <= U32 else hex64(value) if value <= U64 else f"{value:#x}"


def guest_json(guest: dict) -> dict:
    """A scenario ``guest`` object in the contract's register format (16 hex digits)."""
    out = {k: (hex64(v) if k in GPR_NAMES or k == "rip" else v) for k, v in guest.items()}
    out["xmm"] = {k: f"0x{v:032x}" for k, v in guest.get("xmm", {}).items()}
    return out


def _meaning(sc: dict) -> tuple:
    parsed = S.parse(sc)
    return parsed.td, parsed.policy, parsed.guest, parsed.platform


def without_defaults(sc: dict) -> dict:
    """The same scenario, minus every field that holds the contract's default: a field is dropped
    when the scenario parses to the same TD, policy, guest and platform without it.  (Presentation
    only: the meaning is unchanged, so this is not shrinking.)"""
    meaning = _meaning(sc)
    sc = copy.deepcopy(sc)
    for path in [("guest", k) for k in sc["guest"]] + [("platform", "userspace", k) for k in
                                                       sc["platform"].get("userspace", {})] + \
            [("platform", k) for k in sc["platform"]]:
        *parents, key = path
        trial = copy.deepcopy(sc)
        holder = trial
        for p in parents:
            holder = holder.get(p, {})
        if key not in holder:
            continue
        del holder[key]
        if _meaning(trial) == meaning:
            sc = trial
    return sc


def counterexample(ex: dict, v: Violation) -> dict:
    """The scenario that replays the failing call (``tdvmcall run`` reads it), with what it cannot
    carry said in ``comment``."""
    n = v.call or 0
    call = ex["calls"][n]
    policy = "hardened" if v.prop == "differential" else (v.policy or "hardened")
    sc = without_defaults(_scenario(ex, guest_json(call["guest"]), policy,
                                    hexed(v.platform if v.platform is not None else ex["platform"])))
    notes = [f"fuzz counterexample: {v.prop}: {v.detail}"]
    if v.prop == "differential":
        notes.append("replay it with --policy legacy as well and compare guest and userspace exits")
    if v.policy is None:
        notes.append("found with arbitrary VMM registers given to TDH.VP.ENTER, which a scenario cannot carry: "
                     f"vmm = {hexed(call['host']['vmm'])}, xmm = {hexed(call['host']['xmm'])}")
    if v.expressible:
        notes.append("not carried by this file: " + "; ".join(v.expressible))
    sc["name"] = f"fuzz-{v.prop}"
    sc["comment"] = " | ".join(notes)
    return sc


def replays(sc: dict, prop: str) -> bool:
    """Whether the scenario alone (fresh vCPU, no host writes) shows the same property failing."""
    ex = {"td": sc["td"], "tree": sc["kvm"]["tree"], "platform": sc["platform"],
          "calls": [{"guest": sc["guest"]}]}
    try:
        run_example(ex, ("legacy", "hardened") if prop == "differential" else (sc["kvm"]["policy"],))
    except Violation as v:
        return v.prop == prop
    return False


# === the campaign ==================================================================================
@dataclass
class Failure:
    example: dict
    violation: Violation


@dataclass
class CampaignResult:
    seed: int
    policies: tuple[str, ...]
    examples: int
    seconds: float
    stats: Stats
    failure: Failure | None = None

    @property
    def executions_per_second(self) -> float:
        return self.stats.executions / self.seconds if self.seconds > 0 else 0.0

    def coverage(self) -> dict[str, dict[str, dict[str, int]]]:
        """policy -> leaf -> verdict -> executions."""
        out: dict[str, dict[str, dict[str, int]]] = {p: {} for p in self.policies}
        for (pol, leaf, verdict), n in sorted(self.stats.coverage.items()):
            out.setdefault(pol, {}).setdefault(leaf, {})[verdict] = n
        return out


def target_labels() -> list[str]:
    """Every call the campaign aims at, by coverage name."""
    return [leaf_label(t) if t is not None else "unknown GHCI leaf" for t in TARGETS]


def _batch(seed: int, n: int, policies: tuple[str, ...], stats: Stats, failures: list[Failure],
           max_calls: int) -> int:
    """Run ``n`` hypothesis examples from ``seed``; returns how many ran.  A violation is recorded
    (hypothesis replays the shrunk example last, so the last record is the minimal one) and the
    batch stops."""
    ran = 0

    @hypothesis_seed(seed)
    @settings(max_examples=n, database=None, deadline=None, derandomize=False, report_multiple_bugs=False,
              suppress_health_check=list(HealthCheck), phases=(Phase.generate, Phase.shrink),
              verbosity=Verbosity.quiet, print_blob=False)
    @given(examples(max_calls))
    def campaign_property(ex: dict) -> None:
        nonlocal ran
        ran += 1
        try:
            run_example(ex, policies, stats)
        except Violation as v:
            failures.append(Failure(copy.deepcopy(ex), v))
            raise

    try:
        campaign_property()
    except Violation:
        pass
    return ran


def campaign(*, examples: int | None = None, seconds: float | None = None, seed: int = 0,
             policy: str = "both", batch: int = 100, max_calls: int = 3,
             progress: Callable[[CampaignResult], None] | None = None) -> CampaignResult:
    """Run the campaign for ``examples`` examples or ``seconds`` seconds (whichever is given; the
    default is 1000 examples), in batches of ``batch`` examples, each with a hypothesis seed drawn
    from ``seed``, so that a run with ``--examples`` and ``--seed`` is deterministic.  ``examples``
    in the result counts every run of the property, the shrinker's included.  Stops at the first
    violation (after hypothesis has shrunk it)."""
    policies = policies_of(policy)
    if examples is None and seconds is None:
        examples = 1000
    stats, failures = Stats(), []
    result = CampaignResult(seed, policies, 0, 0.0, stats)
    start = time.perf_counter()
    batch_seeds = random.Random(seed)  # one hypothesis seed per batch, derived from the campaign's
    while not failures:
        if examples is not None and result.examples >= examples:
            break
        if seconds is not None and time.perf_counter() - start >= seconds:
            break
        n = batch if examples is None else min(batch, examples - result.examples)
        result.examples += _batch(batch_seeds.getrandbits(64), n, policies, stats, failures, max_calls)
        result.seconds = time.perf_counter() - start
        if progress is not None:
            progress(result)
    result.seconds = time.perf_counter() - start
    result.failure = failures[-1] if failures else None
    return result


__all__ = ["examples", "calls", "platforms", "controls", "guest_registers", "run_example", "campaign",
           "CampaignResult", "Violation", "VIOLATION", "PROPERTIES", "counterexample", "replays",
           "documented_gate", "policies_of"]

"""Hypothesis strategies over the whole input space of a TDVMCALL: TDs, guest registers and
controls, platforms and userspace answers, sequences of calls."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

from hypothesis import strategies as st

from ..abi.codes import (
    EAGAIN,
    EINVAL,
    TDVMCALL_STATUS_NAMES,
)
from ..abi.regs import (
    GPR_NAMES,
    NR_GPRS,
    RAX,
    RBP,
    RCX,
    RSP,
    U32,
    U64,
    U128,
    mask_of,
)
from ..kvm import leaves as L

# === strategies ==================================================================================
INTERESTING_U64 = (
    0,
    1,
    2,
    3,
    4,
    8,
    0x10,
    0x20,
    0xFF,
    0x1000,
    0xFFFF,
    0x20_0000,
    U32,
    1 << 32,
    1 << 51,
    (1 << 51) | 0x1000,
    1 << 63,
    U64 - 0xFFF,
    U64,
)
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
_CPUID_ENTRY = st.fixed_dictionaries(
    {
        "leaf": st.one_of(st.sampled_from((0, 1, 7, 0xD, 0x40000000, 0x80000000)), st.integers(0, U32)),
        "subleaf": st.integers(0, 3),
        "eax": st.integers(0, U32),
        "ebx": st.integers(0, U32),
        "ecx": st.integers(0, U32),
        "edx": st.integers(0, U32),
    }
)
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

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
from ..kvm.trees import DEFAULT_TREE, TREE_NAMES

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


#: every kernel tree of the model (kvm/trees.py) but the default, each drawn once for the default's four
_OTHER_TREES = tuple(t for t in TREE_NAMES if t != DEFAULT_TREE)


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
MASK_KIND_CHOICES = ("minimal",) * 6 + ("minus",) * 6 + ("plus", "widest", "random") * 2 + ("any",)
_MASK_KINDS = pick(MASK_KIND_CHOICES)


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
_STATUSES = tuple(TDVMCALL_STATUS_NAMES)
_TDX_RET = st.one_of(st.none(), st.sampled_from(_STATUSES), u64s())
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
    ex = {
        "td": {"module": module, "no_rbp_mod": no_rbp_mod},
        "tree": draw(weighted(DEFAULT_TREE, *_OTHER_TREES, odds=4)),
        "platform": draw(platforms()),
        "calls": draw(st.lists(calls(module, no_rbp_mod), min_size=1, max_size=max_calls)),
    }
    # a bus lock since the TD's last exit (bit 26 of the exit reason): drawn last, rarely
    ex["td"]["bus_lock"] = draw(weighted(False, True, odds=8))
    return ex


# === the fast mode: the same examples, drawn directly with random.Random =========================
class Draw:
    """Examples drawn directly from a ``random.Random``, without hypothesis: the same structure and
    the same choices, with the same odds, as the strategies above (each method names the strategy
    it mirrors), at a small fraction of the cost.  Nothing is recorded for shrinking."""

    def __init__(self, rnd: random.Random):
        self.rnd = rnd
        self.bits = rnd.getrandbits
        self._random = rnd.random
        self._masks: dict[tuple, tuple[int, int]] = {}

    def below(self, n: int) -> int:
        """Uniform in 0..n-1 (n <= 2**32; ``randrange`` costs five times as much)."""
        return int(self._random() * n)

    def masks(self, leaf: L.Leaf, regs: dict[str, int]) -> tuple[int, int]:
        """The leaf table's ``minimal_mask`` and required-input mask for these registers, cached per
        leaf and per outcome of its input conditions (all the table looks at)."""
        conds = _CONDITIONS.get(leaf.name) if leaf.name in L.BY_NAME or leaf is L.UNKNOWN_HYPERCALL else None
        if conds is None:
            return L.minimal_mask(leaf, regs), mask_of(L.required_inputs(leaf, regs))
        key = (leaf.name, tuple(c.holds(regs.get(c.reg, 0)) for c in conds))
        got = self._masks.get(key)
        if got is None:
            got = self._masks[key] = L.minimal_mask(leaf, regs), mask_of(L.required_inputs(leaf, regs))
        return got

    def u64(self) -> int:
        """``u64s()``: an interesting value, any 64-bit value or a small one, one in three each."""
        k = self.below(3)
        if k == 0:
            return INTERESTING_U64[self.below(len(INTERESTING_U64))]
        return self.bits(64) if k == 1 else self.below(0x10000)

    def u128(self) -> int:
        """``u128s()``."""
        k = self.below(3)
        return 0 if k == 0 else self.bits(128) if k == 1 else (1, U64, U128)[self.below(3)]

    def pick(self, choices: Sequence[Any]) -> Any:
        """``pick``/``choose``: uniform."""
        return choices[self.below(len(choices))]

    def weighted(self, default: Any, *others: Any, odds: int = 8) -> Any:
        """``weighted``: ``default`` ``odds`` times in ``odds + len(others)``."""
        k = self.below(odds + len(others))
        return default if k < odds else others[k - odds]

    def maps(self, key: Callable[[], int], value: Callable[[], int]) -> dict[int, int]:
        """``_maps``: empty, or one or two entries."""
        if self.below(2) == 0:
            return {}
        return {key(): value() for _ in range(1 + self.below(2))}

    def unknown_r11(self) -> int:
        """``_UNKNOWN_R11``."""
        while True:
            v = self.below(0x10011) if self.below(2) == 0 else self.u64()
            if v not in _KNOWN_R11:
                return v

    def guest_registers(self, target: L.Leaf | None) -> dict[str, int]:
        """``guest_registers``."""
        bits = self.bits
        regs = {name: bits(64) for name in _BACKGROUND}
        if target is None:
            regs["r10"] = 0
            regs["r11"] = self.unknown_r11()
            return regs
        case = self.pick(target.cases)
        regs.update(target.selector_values())
        regs.update(case.regs)
        for op in target.inputs:
            if self.below(3) != 2 and op.reg in case.regs:  # weighted(True, False, odds=2)
                continue
            regs[op.reg] = self.u64()
        if self.below(13) == 12:  # weighted(False, True, odds=12)
            regs["r10"] = self.weighted(0, 1, 5, 9, 10, 11, 12, 0x77, U64)
            regs["r11"] = self.u64()
        return regs

    def control(self, regs: dict[str, int], module: str, no_rbp_mod: bool) -> int:
        """``controls``."""
        need, inputs = self.masks(L.lookup(regs["r10"], regs["r11"]), regs)
        kind = self.pick(MASK_KIND_CHOICES)
        gpr = need
        if kind == "minus" and need:
            outputs_only = need & ~inputs
            pool = outputs_only if outputs_only and self.below(2) else need
            gpr = need & ~(1 << self.pick(names_to_ids(pool)))
        elif kind == "plus":
            gpr = need | 1 << self.pick(_VALID_GPRS)
        elif kind == "widest":
            gpr = 0xFFCC if no_rbp_mod and module == "1.5" else 0xFFEC
        elif kind == "random":
            gpr = self.below(0x10000) & ~0x13
        if self.below(31) == 30:
            gpr |= 1 << self.pick((RAX, RCX, RSP, RBP))
        xmm = 0 if self.below(4) < 3 else 1 + self.below(0xFFFF)
        reserved = (1 + self.below(U32)) << 32 if self.below(41) == 40 else 0
        return self.bits(64) if kind == "any" else gpr | xmm << 16 | reserved

    def call(self, module: str, no_rbp_mod: bool) -> dict:
        """``calls``."""
        regs = self.guest_registers(self.pick(TARGETS))
        regs["rcx"] = self.control(regs, module, no_rbp_mod)
        rax = self.weighted(0, None, 1 << 24, 1 << 16, 1, odds=60)
        regs["rax"] = (self.bits(64) or 1) if rax is None else rax
        guest: dict[str, Any] = {name: regs[name] for name in GPR_NAMES}
        rip = self.weighted(0x1000, None, U64 - 1, odds=6)
        guest["rip"] = self.bits(64) if rip is None else rip
        guest["long_mode"] = self.below(41) < 40
        guest["xmm"] = {f"xmm{self.below(16)}": self.u128() for _ in range(self.below(4))}
        bits = self.bits  # host_writes, from this generator directly
        return {
            "guest": guest,
            "host": {"vmm": [bits(64) for _ in range(NR_GPRS)], "xmm": [bits(128) for _ in range(16)]},
        }

    def msr_index(self) -> int:
        return self.pick(INTERESTING_MSRS) if self.below(2) == 0 else self.bits(32)

    def cpuid_entry(self) -> dict[str, int]:
        leaf = self.pick((0, 1, 7, 0xD, 0x40000000, 0x80000000)) if self.below(2) == 0 else self.bits(32)
        entry = {"leaf": leaf, "subleaf": self.below(4)}
        entry |= {r: self.bits(32) for r in ("eax", "ebx", "ecx", "edx")}
        return entry

    def platform(self) -> dict:
        """``platforms``."""
        w, below, u64 = self.weighted, self.below, self.u64
        p: dict[str, Any] = {
            "msr_exits": w(False, True, odds=2),
            "exit_hypercall_map_gpa": w(True, False, odds=4),
            "pending_event": w(False, True, odds=4),
            "host_clock_suitable": w(True, False, odds=4),
            "gpaw": w(52, 48, odds=4),
            "maxphyaddr": w(52, 48, 46, 39, odds=4),
            "apic_ids": [0, 1, 2, 3] if below(2) == 0 else [below(301) for _ in range(below(5))],
            "msrs": self.maps(self.msr_index, u64),
            "cpuid": [] if below(2) == 0 else [self.cpuid_entry() for _ in range(1 + below(2))],
        }
        u: dict[str, Any] = {
            "hypercall_ret": [self.pick((0, EAGAIN, EINVAL)) if below(2) == 0 else u64() for _ in range(below(4))],
            "tdvmcall_info": [2, 0, 0, 0] if below(2) == 0 else [u64() for _ in range(4)],
            "ports": self.maps(lambda: self.pick((0x3F8, 0x3FD, 0xCF8)) if below(2) == 0 else below(0x10000), u64),
            "mmio": self.maps(lambda: 0xFEB0_0000 if below(2) == 0 else self.bits(52), u64),
            "rdmsr": self.maps(self.msr_index, u64),
            "msr_error": w(False, True, odds=4),
        }
        k = below(3)  # _TDX_RET: none, a status, or any value
        if k:
            u["tdx_ret"] = self.pick(_STATUSES) if k == 1 else u64()
        p["userspace"] = u
        return p

    def example(self, max_calls: int = 3) -> dict:
        """``examples``."""
        module = self.pick(("1.5", "1.0"))
        no_rbp_mod = self.below(3) < 2
        ex = {
            "td": {"module": module, "no_rbp_mod": no_rbp_mod},
            "tree": self.weighted(DEFAULT_TREE, *_OTHER_TREES, odds=4),
            "platform": self.platform(),
            "calls": [self.call(module, no_rbp_mod) for _ in range(1 + self.below(max_calls))],
        }
        ex["td"]["bus_lock"] = self.weighted(False, True, odds=8)  # as ``examples``: drawn last
        return ex


_BACKGROUND = GPR_NAMES[2:]
#: the input conditions of each leaf of the table (what its masks depend on)
_CONDITIONS = {
    leaf.name: tuple(dict.fromkeys(op.when for op in leaf.inputs + leaf.outputs if op.when is not None))
    for leaf in L.LEAVES + (L.UNKNOWN_HYPERCALL,)
}

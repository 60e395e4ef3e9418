"""The mask sweep: which GPR masks does each call accept, exhaustively, by two independent routes.

For every call of the leaf table (``kvm/leaves.py``: every leaf, every KVM hypercall and the unknown
hypercall) under each of its cases (named input values, ``Leaf.cases``), over all 65,536 GPR masks
(``gpr_select``, RCX bits 15:0; xmm_select and the reserved bits 0), for a TD with and without
NO_RBP_MOD (module 1.5, which checks RBP; docs/abi.md §3):

``simulation``  runs the model.  The module layer is the real ``control.check_control`` over every
                mask.  The KVM layer runs the real round trip (``guest.tdvmcall``: module, KVM's
                ``handle_tdvmcall`` and its handlers, resume) under ``legacy`` and ``hardened``.
                To take seconds rather than minutes it does not run the ~8,000 masks that reach KVM
                one by one: it runs the model on a few masks, *observes* which registers each run
                consulted (its footprint: the dispatch registers R10/R11 of docs/abi.md §4, and every
                register the run read, wrote or reported as missing, unexposed, zero-read or
                dropped) and grows that set to a fixed point; every mask then behaves as the mask
                restricted to the footprint.  The claim is checked on every class by running both
                its smallest member (the footprint part only) and its largest (every other register
                the module lets through exposed as well): when any pair disagrees, that call falls
                back to running every mask (route ``exhaustive``), and ``--exhaustive`` forces that
                route everywhere.  Nothing on this route reads the leaf table to decide anything
                (the model's hardened validation reads it inside KVM: that is the policy modelled).
``table``       derives the answer from the leaf table alone: ``minimal_mask``, ``condition_masks``
                and ``control.forbidden_gprs``; hardened KVM must accept exactly the masks the module
                accepts that contain the minimal mask.

Per call, case and TD setting the sweep reports what each layer accepts: the module; legacy KVM
"silent-ok" (KVM dispatched the call the guest made, read no unexposed register and wrote none:
nothing was silently zeroed or dropped); hardened KVM "completes" (verdict completed or userspace).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache

from .. import scenario
from ..abi.control import check_control, forbidden_gprs
from ..abi.regs import GPR_NAMES, NR_GPRS, RAX, RCX, mask_of, names_in
from ..console import worker_pool
from ..guest import RoundTrip, tdvmcall
from ..kvm import leaves as L
from ..kvm.tdx import POLICIES, VERDICT_COMPLETED, VERDICT_USERSPACE, KvmVcpu
from ..kvm.trees import DEFAULT_TREE
from ..module import TdConfig, VcpuState

NR_MASKS = 1 << NR_GPRS  # 65,536 GPR masks
#: the TD settings swept: module 1.5 (which checks RBP) with and without NO_RBP_MOD
TD_SETTINGS: tuple[TdConfig, ...] = (TdConfig("1.5", True), TdConfig("1.5", False))
#: KVM dispatches on R10 (hypercall number, or 0) and R11 (GHCI leaf): docs/abi.md §4, tdx.c handle_tdvmcall()
DISPATCH_MASK = mask_of(("r10", "r11"))
#: a guest register the case leaves unset holds this (| its index): a value the VMM must never see
FILLER = 0x5A5A5A5A00000000


# --- what is swept ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """One call under one of its cases, with the guest's registers (all but RAX and RCX)."""

    leaf: L.Leaf
    case: L.Case

    @property
    def call(self) -> str:
        return self.leaf.name

    def regs(self) -> dict[str, int]:
        """The guest's GPRs: the selector values, then the case's inputs, every other GPR (but RAX
        = 0, the TDCALL leaf, and RCX, the control) a filler value the host must never see."""
        regs = {name: FILLER | i for i, name in enumerate(GPR_NAMES) if i not in (RAX, RCX)}
        return regs | self.leaf.selector_values() | dict(self.case.regs)


def targets() -> list[Target]:
    """Every call of the leaf table (every leaf and hypercall, and the unknown hypercall) under each
    of its cases, in table order."""
    return [Target(leaf, case) for leaf in L.LEAVES + (L.UNKNOWN_HYPERCALL,) for case in leaf.cases]


def td_label(td: TdConfig) -> str:
    return f"{td.module}/{'no_rbp_mod' if td.no_rbp_mod else 'rbp_mod'}"


def hex16(mask: int) -> str:
    return f"0x{mask:04x}"


# --- the module layer: the real control check over every mask ----------------------------------
@cache
def module_accepts(module: str, no_rbp_mod: bool) -> tuple[int, ...]:
    """Every gpr_select the module's real control check accepts (RCX = the mask alone)."""
    return tuple(m for m in range(NR_MASKS) if check_control(m, module, no_rbp_mod) is None)


def passable(td: TdConfig) -> int:
    """The GPRs the module can let through to KVM: the union of every mask it accepts."""
    out = 0
    for m in module_accepts(td.module, td.no_rbp_mod):
        out |= m
    return out


# --- the KVM layer: one real round trip, reduced to what the sweep needs ---------------------------
@dataclass(frozen=True)
class Outcome:
    """One round trip, reduced: what each policy's verdict needs, and the footprint."""

    exited: bool
    silent_ok: bool  # legacy meaning: right call, nothing read unexposed, nothing written unexposed
    completes: bool  # hardened meaning: verdict completed or userspace
    footprint: int  # registers the run was observed to consult (a GPR mask)
    record: tuple  # what two masks of one class must agree on


def round_trip(td: TdConfig, policy: str, t: Target, mask: int, tree: str = DEFAULT_TREE) -> tuple[RoundTrip, KvmVcpu]:
    """The real model: the guest issues TDG.VP.VMCALL with RCX = ``mask``, through a fresh KVM vCPU
    and a fresh platform (the case's); the vCPU is returned too, for its cache's read log."""
    regs = t.regs()
    state = VcpuState()
    state.gprs = [regs.get(name, 0) for name in GPR_NAMES]
    state.gprs[RAX], state.gprs[RCX] = 0, mask
    vcpu = KvmVcpu(policy)
    host = scenario.parse({"guest": {}, "kvm": {"tree": tree}, "platform": t.case.platform}).platform
    return tdvmcall(td, state, vcpu, host), vcpu


def observe(td: TdConfig, policy: str, t: Target, mask: int, tree: str = DEFAULT_TREE) -> Outcome:
    """Run the model on one mask and reduce the round trip.  The footprint is what the run shows it
    consulted: the dispatch registers, every register KVM wrote, every register it reported as
    missing, as an unexposed output, as zero-read or as a dropped write, and (hardened) every
    register the handler read through the register cache."""
    rt, vcpu = round_trip(td, policy, t, mask, tree)
    k = rt.kvm
    if k is None:
        return Outcome(False, False, False, 0, ("module-refused",))
    named = set(k.wrote) | set(k.missing) | set(k.unexposed_outputs) | set(k.zero_reads) | set(k.dropped_writes)
    footprint = DISPATCH_MASK | mask_of(named)
    if k.policy == "hardened":
        footprint |= mask_of(i for i in vcpu.cache.reads if i < NR_GPRS)
    record = (
        k.leaf.name,
        k.verdict,
        k.status,
        tuple(k.zero_reads),
        tuple(k.dropped_writes),
        tuple(k.missing),
        tuple(k.unexposed_outputs),
        tuple(sorted(k.wrote)),
    )
    silent_ok = k.leaf.name == t.call and not k.zero_reads and not k.dropped_writes
    return Outcome(True, silent_ok, k.verdict in (VERDICT_COMPLETED, VERDICT_USERSPACE), footprint, record)


def submasks(mask: int) -> Iterator[int]:
    """Every subset of ``mask``, largest first, ending with 0."""
    s = mask
    while True:
        yield s
        if s == 0:
            return
        s = (s - 1) & mask


@dataclass
class Simulated:
    """What the model did for one (call, case, TD, policy): the verdict of every accepted mask."""

    route: str  # "footprint" or "exhaustive"
    footprint: int
    runs: int
    accepted: list[int]  # masks the module accepts and this policy's KVM accepts
    disagreements: list[int] = field(default_factory=list)  # classes whose two ends disagreed


def _policy_ok(policy: str, o: Outcome) -> bool:
    return o.exited and (o.silent_ok if policy == "legacy" else o.completes)


def simulate(t: Target, td: TdConfig, policy: str, exhaustive: bool = False, tree: str = DEFAULT_TREE) -> Simulated:
    """The simulation route for one (call, case, TD, policy); see the module docstring."""
    gate = module_accepts(td.module, td.no_rbp_mod)
    if exhaustive:
        return _exhaustive(t, td, policy, gate, 0, [], tree)
    visible = passable(td)
    runs: dict[int, Outcome] = {}

    def run(mask: int) -> Outcome:
        if mask not in runs:
            runs[mask] = observe(td, policy, t, mask, tree)
        return runs[mask]

    # grow the footprint to a fixed point, running each class at both ends
    fp = DISPATCH_MASK & visible
    while True:
        seen = fp
        for low in submasks(fp):
            seen |= run(low).footprint | run(low | (visible & ~fp)).footprint
        seen &= visible
        if seen == fp:
            break
        fp = seen
    # check: both ends of every class agree, or fall back to every mask
    disagree = [low for low in submasks(fp) if run(low).record != run(low | (visible & ~fp)).record]
    if disagree:
        return _exhaustive(t, td, policy, gate, fp, disagree, tree)
    ok = {low for low in submasks(fp) if _policy_ok(policy, run(low))}
    return Simulated("footprint", fp, len(runs), [m for m in gate if (m & fp) in ok])


def _exhaustive(
    t: Target, td: TdConfig, policy: str, gate: tuple[int, ...], fp: int, disagree: list[int], tree: str = DEFAULT_TREE
) -> Simulated:
    accepted = [m for m in gate if _policy_ok(policy, observe(td, policy, t, m, tree))]
    return Simulated("exhaustive", fp, len(gate), accepted, disagree)


# --- summarising a set of accepted masks --------------------------------------------------------
def least(accepted: list[int]) -> int | None:
    """The intersection of the accepted masks, if it is itself accepted (the set's least element)."""
    if not accepted:
        return None
    m = accepted[0]
    for a in accepted:
        m &= a
    return m if m in set(accepted) else None


def is_upset(accepted: list[int], gate: tuple[int, ...]) -> bool:
    """Whether ``accepted`` is exactly the module-accepted masks that contain its least element."""
    lo = least(accepted)
    return lo is not None and len(accepted) == sum(1 for m in gate if m & lo == lo)


# --- the table route ------------------------------------------------------------------------------
def table_answer(t: Target, td: TdConfig) -> dict:
    """What the leaf table alone predicts for hardened KVM: the minimal mask, and that the accepted
    masks are exactly those the module accepts (no forbidden bit) containing it, so
    2^(16 - |forbidden ∪ minimal|) of them (none if the minimal mask holds a forbidden bit)."""
    minimal = L.minimal_mask(t.leaf, t.regs())
    by_case = L.condition_masks(t.leaf)[t.case.name]
    forbidden = forbidden_gprs(td.module, td.no_rbp_mod)
    module_count = 1 << (NR_GPRS - bin(forbidden).count("1"))
    count = 0 if minimal & forbidden else 1 << (NR_GPRS - bin(forbidden | minimal).count("1"))
    return {
        "minimal": minimal,
        "condition_mask": by_case,
        "forbidden": forbidden,
        "module_accepts": module_count,
        "hardened_accepts": count,
    }


# --- one row of the sweep -----------------------------------------------------------------------
def sweep_target(t: Target, exhaustive: bool = False, tree: str = DEFAULT_TREE) -> dict:
    """Both routes for one (call, case), every TD setting and policy, and whether they agree."""
    row: dict = {"call": t.call, "case": t.case.name, "td": {}, "problems": []}
    for td in TD_SETTINGS:
        label = td_label(td)
        gate = module_accepts(td.module, td.no_rbp_mod)
        table = table_answer(t, td)
        sim = {p: simulate(t, td, p, exhaustive, tree) for p in POLICIES}
        hard, leg = sim["hardened"].accepted, sim["legacy"].accepted
        entry = {
            "module_accepts": len(gate),
            "legacy_silent_ok": {"count": len(leg), "least": _hex_or_none(least(leg)), "upset": is_upset(leg, gate)},
            "hardened_completes": {
                "count": len(hard),
                "minimal": _hex_or_none(least(hard)),
                "upset": is_upset(hard, gate),
            },
            "table": {
                "minimal": hex16(table["minimal"]),
                "condition_mask": hex16(table["condition_mask"]),
                "forbidden": hex16(table["forbidden"]),
                "module_accepts": table["module_accepts"],
                "hardened_accepts": table["hardened_accepts"],
            },
            "routes": {
                p: {
                    "route": s.route,
                    "footprint": names_in(s.footprint, NR_GPRS),
                    "runs": s.runs,
                    "disagreeing_classes": [hex16(m) for m in s.disagreements],
                }
                for p, s in sim.items()
            },
        }
        problems = _compare(table, hard, leg, gate)
        entry["agree"] = not problems
        row["problems"] += [f"{label}: {p}" for p in problems]
        row["td"][label] = entry
    row["agree"] = not row["problems"]
    return row


def _hex_or_none(mask: int | None) -> str | None:
    return None if mask is None else hex16(mask)


def _compare(table: dict, hard: list[int], leg: list[int], gate: tuple[int, ...]) -> list[str]:
    """Where the simulation and the table disagree (empty: they agree)."""
    out = []
    if table["minimal"] != table["condition_mask"]:
        out.append(f"table: minimal_mask {hex16(table['minimal'])} != condition_masks {hex16(table['condition_mask'])}")
    if table["module_accepts"] != len(gate):
        out.append(f"module accepts {len(gate)} masks, table predicts {table['module_accepts']}")
    lo = least(hard)
    if lo != table["minimal"]:
        out.append(f"hardened minimal mask {_hex_or_none(lo)} (simulated) != {hex16(table['minimal'])} (table)")
    if not is_upset(hard, gate):
        out.append("hardened accepted set is NOT exactly the masks that contain its minimal mask")
    if len(hard) != table["hardened_accepts"]:
        out.append(f"hardened accepts {len(hard)} masks (simulated), table predicts {table['hardened_accepts']}")
    if not set(hard) <= set(leg):
        out.append("a mask hardened KVM completes is not silent-ok under legacy KVM")
    return out


def run_sweep(
    exhaustive: bool = False, calls: list[str] | None = None, jobs: int = 1, tree: str = DEFAULT_TREE
) -> dict:
    """The whole sweep: one row per (call, case), with totals and the time it took."""
    chosen = [t for t in targets() if calls is None or t.call in calls]
    start = time.perf_counter()
    jobs = min(jobs, len(chosen))  # never more workers than rows (--jobs 100000 would fork them all)
    if jobs > 1:
        for td in TD_SETTINGS:  # compute the gate once, before forking
            module_accepts(td.module, td.no_rbp_mod)
        # workers that end with the command: Ctrl-C, SIGTERM or the parent killed leave none behind
        with worker_pool(jobs, "--jobs") as pool:
            rows = list(pool.map(sweep_target, chosen, [exhaustive] * len(chosen), [tree] * len(chosen)))
    else:
        rows = [sweep_target(t, exhaustive, tree) for t in chosen]
    seconds = time.perf_counter() - start
    runs = sum(r["td"][td]["routes"][p]["runs"] for r in rows for td in r["td"] for p in POLICIES)
    return {
        "masks": NR_MASKS,
        "tree": tree,
        "td_settings": [td_label(td) for td in TD_SETTINGS],
        "policies": list(POLICIES),
        "rows": rows,
        "agree": all(r["agree"] for r in rows),
        "round_trips": runs,
        "seconds": round(seconds, 3),
        "route": "exhaustive" if exhaustive else "footprint",
    }

"""Verdicts of ``tdvmcall trace``: what hardened KVM would do with one TDVMCALL exit of a TD, from
its re-labelled reason and its mask (``info1``), and how the report classifies every exit.

Facts used (docs/abi.md §3, §4):

- For a TD, ``reason`` is the VMX reason KVM synthesises for a TDVMCALL (CPUID 10, HLT 12,
  IO_INSTRUCTION 30, MSR_READ 31, MSR_WRITE 32, EPT_MISCONFIG 49 for MMIO, VMCALL 18 when R10 != 0,
  TDCALL 77 for every other leaf) and ``info1`` is the exit qualification: the guest's GPR/XMM
  mask (bits 15:0 GPRs, 31:16 XMMs, 33:32 VM index).
- KVM derives that reason from the R10 and R11 values it received, and a register the guest did
  not expose arrives as 0 (§3): so VMCALL implies R10 was exposed, and an instruction reason implies
  R11 was.  The module accepted the mask, so RAX, RCX, RSP and (NO_RBP_MOD, which Linux KVM always
  sets) RBP are never in it and bits 63:34 are 0 (``control.py``).
- Hardened KVM completes a call iff gpr_select covers the leaf's minimal mask for the actual inputs
  (``kvm/leaves.py``: the single source of truth); without R10 no status can reach the guest, and it
  reports an internal error to userspace instead.
- A reason with bit 26 (bus lock detected, printed as the name then ``0x4000000``) is judged by the
  rule of the KVM tree the trace came from (``kvm/trees.py``, ``TreeRule.reported_dispatch``), never
  by a branch here.  kvm-x86 and v6.16 re-label only a reason equal to TDCALL: ``TDCALL 0x4000000``
  went to ``handle_tdvmcall()`` unchanged and was dispatched on R11 alone (it may be any TDVMCALL, and
  ran one of the five GHCI calls KVM handles there or got SUBFUNC_UNSUPPORTED), and a re-labelled
  reason with the bit (``CPUID 0x4000000``) cannot happen: inconsistent.  v7.3 re-labels on bits
  15:0 and keeps the flag: ``CPUID 0x4000000`` is a CPUID judged as one, ``TDCALL 0x4000000`` one of
  the leaves that stay TDCALL; then KVM exits to userspace for the bus lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

from ..abi.codes import EXIT_REASON_BUS_LOCK_DETECTED, EXIT_REASON_TDCALL, VMX_EXIT_REASON_NAMES
from ..abi.control import Control, ExitQualification
from ..abi.regs import GPR_MASK, R10, R11, names_in
from ..kvm.leaves import Leaf, bus_lock_leaves, missing_by_case, reason_leaves
from ..kvm.trees import DEFAULT_TREE, TreeRule, tree_rule
from . import scan as trace_scan
from .rows import Reason, is_tdvmcall_reason

VERDICTS = ("completes", "depends", "refused", "internal-error", "inconsistent")
#: verdicts under which a call does not complete whatever its inputs
FAILING = ("refused", "internal-error")
#: what an exit is to the report: a TDVMCALL exit of a TD, another exit of a TD, an exit of another VM
KINDS = ("tdvmcall", "td-other", "non-td")


@dataclass(frozen=True)
class Verdict:
    """``verdict`` is one of :data:`VERDICTS`; ``missing`` the GPRs the refused cases lack;
    ``refused_for`` the leaves (or ``leaf[case]``) the mask is refused for."""

    verdict: str
    detail: str
    missing: tuple[str, ...] = ()
    refused_for: tuple[str, ...] = ()


def implied_exposed(reason: int) -> int:
    """Registers the reason proves were exposed: KVM labels an exit VMCALL only when it read
    R10 != 0, and an instruction reason only when it read R11 = that leaf (non-zero); an unexposed
    register reads as 0 (ABI §3, §4).  Derived from the leaf table."""
    if reason == EXIT_REASON_TDCALL:
        return 0
    leaves = reason_leaves(reason)
    if leaves and all(leaf.family == "kvm-hypercall" for leaf in leaves):
        return 1 << R10
    if leaves and all(leaf.family == "ghci" and leaf.r11 for leaf in leaves):
        return 1 << R11
    return 0


def module_problems(mask: int) -> list[str]:
    """Why the TDX module could not have sent this exit qualification (empty if it could):
    the GPR checks of the control value (Linux KVM TDs always have NO_RBP_MOD) and bits 63:34."""
    eq = ExitQualification(mask)
    out = Control(mask & 0xFFFFFFFF).problems("1.5", no_rbp_mod=True)
    if eq.other_bits:
        out.append(f"bits 63:34 are {eq.other_bits >> 34:#x}, must be 0")
    return out


def _case_outcomes(leaf: Leaf, gprs: int) -> list[tuple[str, int]]:
    """(case name, missing GPRs) for every named input condition of the leaf."""
    return list(missing_by_case(leaf, gprs).items())


#: the detail's prefix for a bus-lock exit dispatched on R11 alone (kvm-x86, v6.16: ``TDCALL 0x4000000``)
BUS_LOCK_NOTE = "bus lock (reason bit 26): KVM dispatched on R11 alone, every other call got SUBFUNC_UNSUPPORTED"
#: the detail's prefix for a bus-lock exit re-labelled by its leaf (v7.3), judged as the same exit without the bit
BUS_LOCK_RELABELLED_NOTE = "bus lock (reason bit 26): re-labelled by the leaf, flag kept; judged as without it"
#: appended when the tree then exits to userspace for the bus lock (v7.3's ``tdx_handle_exit()``)
BUS_LOCK_USER_EXIT_NOTE = "then KVM exits to userspace for the bus lock (KVM_EXIT_X86_BUS_LOCK)"


@cache
def verdict_for(reason: int, mask: int, bus_lock: bool = False, tree: str = DEFAULT_TREE) -> Verdict:
    """The verdict for a TDVMCALL exit of a TD with this reported reason (bits 15:0, as the
    ``kvm_exit`` trace names it) and exit qualification, ``bus_lock`` telling whether the reason
    carried bit 26 (printed ``<name> 0x4000000``), on the KVM tree ``tree`` (``kvm/trees.py``: how
    that tree re-labels a flagged exit decides what it may have been)."""
    rule = tree_rule(tree)
    reported = reason | (EXIT_REASON_BUS_LOCK_DETECTED if bus_lock else 0)
    v = _verdict_for(reason, mask, reported, rule)
    if bus_lock and v.verdict != "inconsistent":
        dispatch = rule.reported_dispatch(reported)
        note = BUS_LOCK_NOTE if dispatch is not None and dispatch[1] else BUS_LOCK_RELABELLED_NOTE
        if rule.bus_lock_exits_to_userspace(reported):
            note = f"{note}, {BUS_LOCK_USER_EXIT_NOTE}"
        return Verdict(v.verdict, f"{note}; {v.detail}", v.missing, v.refused_for)
    return v


def _verdict_for(reason: int, mask: int, reported: int, rule: TreeRule) -> Verdict:
    # module consistency
    problems = module_problems(mask)
    if problems:
        return Verdict("inconsistent", "the TDX module refuses this mask: " + "; ".join(problems))
    # the tree's rule: could KVM report a TDVMCALL exit with this reason, and how was it dispatched
    dispatch = rule.reported_dispatch(reported)
    if dispatch is None:
        return Verdict(
            "inconsistent",
            f"reason {VMX_EXIT_REASON_NAMES[reason]} with the bus-lock bit: on {rule.name} KVM re-labels only a "
            "reason equal to TDCALL (tdx_to_vmx_exit_reason() compares the whole reason), and a re-labelled "
            "reason carries no flag",
        )
    basic, on_r11_alone = dispatch
    gprs = mask & GPR_MASK
    # KVM consistency: the reason implies which selectors it read as non-zero
    unseen = implied_exposed(basic) & ~gprs
    if unseen:
        return Verdict(
            "inconsistent",
            f"reason {VMX_EXIT_REASON_NAMES[reason]} implies "
            f"{' '.join(names_in(unseen, 16))} exposed, the mask does not expose it",
            missing=tuple(names_in(unseen, 16)),
        )
    # no R10: no status can reach the guest
    if not gprs >> R10 & 1:
        return Verdict(
            "internal-error", "R10 not exposed: hardened KVM reports an internal error to userspace", missing=("r10",)
        )
    # the leaf table: every leaf this reason may stand for, every named input condition
    leaves = bus_lock_leaves() if on_r11_alone else reason_leaves(basic)
    outcomes = [(leaf, _case_outcomes(leaf, gprs)) for leaf in leaves]
    cases = [miss for _, oc in outcomes for _, miss in oc]
    missing_mask = 0
    for miss in cases:
        missing_mask |= miss
    missing = tuple(names_in(missing_mask, 16))
    if not missing_mask:
        return Verdict("completes", "completes for " + _what(leaves))
    if all(cases):
        return Verdict(
            "refused",
            f"refused for {_what(leaves)}: missing {' '.join(missing)}",
            missing,
            tuple(leaf.name for leaf in leaves),
        )
    if len(leaves) == 1:
        leaf, oc = outcomes[0]
        parts = [
            f"{case}: " + ("completes" if not miss else f"refused (missing {' '.join(names_in(miss, 16))})")
            for case, miss in oc
        ]
        return Verdict(
            "depends",
            f"{leaf.name} depends on inputs: " + ", ".join(parts),
            missing,
            tuple(f"{leaf.name}[{case}]" for case, miss in oc if miss),
        )
    refused_for = tuple(_refused_name(leaf, oc) for leaf, oc in outcomes if any(m for _, m in oc))
    return Verdict(
        "depends",
        "depends on the leaf: refused for " + ", ".join(refused_for) + f" (missing {' '.join(missing)})",
        missing,
        refused_for,
    )


def _what(leaves: list[Leaf]) -> str:
    return leaves[0].name if len(leaves) == 1 else f"every one of the {len(leaves)} leaves it may be"


def _refused_name(leaf: Leaf, outcomes: list[tuple[str, int]]) -> str:
    refused = [case for case, miss in outcomes if miss]
    return leaf.name if len(refused) == len(outcomes) else f"{leaf.name}[{','.join(refused)}]"


def verdict_if_td(reason: Reason, mask: int | None, tree: str = DEFAULT_TREE) -> Verdict | None:
    """The verdict of an exit if its task is a TD, or ``None`` if it is not a TDVMCALL exit."""
    if not is_tdvmcall_reason(reason) or mask is None:
        return None
    return verdict_for(reason.number, mask, reason.bus_lock, tree)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Classified:
    """What the report says of an exit: ``kind`` one of :data:`KINDS`; for a TDVMCALL exit of a
    TD its verdict, detail, missing registers (space-separated) and ``refused_for`` (comma-separated)."""

    kind: str
    verdict: str | None = None
    detail: str | None = None
    missing: str | None = None
    refused_for: str | None = None


def classify_exit(reason: Reason, mask: int | None, td: bool, tree: str = DEFAULT_TREE) -> Classified:
    """Classify an exit of a TD (``td``) or not, with this reason and mask (info1 when the reason
    is a TDVMCALL reason; otherwise it is not read), on the KVM tree ``tree``."""
    v = verdict_if_td(reason, mask, tree) if td else None
    if v is None:
        return Classified("td-other" if td else "non-td")
    return Classified("tdvmcall", v.verdict, v.detail, " ".join(v.missing), ", ".join(v.refused_for))


def classify_rows(
    reasons: list[Reason], td: np.ndarray, rid: np.ndarray, mask: np.ndarray, tree: str = DEFAULT_TREE
) -> tuple[list[Classified], np.ndarray]:
    """Classify many exits at once (columns: is the task a TD, reason id, mask, 0 where the reason
    is not a TDVMCALL reason) on the KVM tree ``tree``: each distinct (TD, reason, mask) is classified once.  Returns the
    distinct classifications and, per row, the index of its own."""
    keys = np.column_stack([td, rid, mask]).astype(np.int64)
    first, *_, of_row = trace_scan.group(keys, np.ones(len(keys), np.int64), np.zeros(len(keys)), np.zeros(len(keys)))
    classes = [
        classify_exit(reasons[r], m, bool(d), tree)
        for d, r, m in zip(td[first].tolist(), rid[first].tolist(), mask[first].tolist())
    ]
    return classes, of_row


__all__ = [
    "FAILING",
    "KINDS",
    "VERDICTS",
    "Classified",
    "Verdict",
    "classify_exit",
    "classify_rows",
    "implied_exposed",
    "module_problems",
    "verdict_for",
    "verdict_if_td",
]

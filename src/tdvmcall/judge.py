"""Judge one TDVMCALL as a host would: the TDX module's control check, then KVM under both policies.

This is the floor the tools share when they hold a concrete call (a control value in RCX, the call
R10/R11 select, perhaps some input values): ``check`` judges every call of a catalog row with it,
``scan`` the call sites it finds in binaries, and any tool that knows a mask and a leaf can.  It runs the model (``module.py``, ``kvm/``)
through the scenario API and reads the leaf table for what the call needs; it decides nothing of
its own.

Verdicts per KVM policy, from best to worst (the same words as ``tdvmcall check``):

- ``ok``: every case of the call completes and nothing is read as 0 or dropped;
- ``not-kvm``: a call KVM does not implement as a leaf (Hyper-V, MigTD: judged by the module only);
- ``legacy-silent`` (legacy): some case reads an unexposed input as 0 or writes an unexposed output;
- ``hardened-refuses`` (hardened): some case is refused for a register the guest did not expose;
- ``module-rejects``: the TDX module fails the control value; the VMM never sees the call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .abi.codes import DEFAULT_TABLE_VERSION, MODULE_TABLE_VERSIONS, decode_status
from .abi.control import Control, module_family
from .abi.regs import GPR_NAMES, RCX
from .kvm import leaves as L
from .kvm.regcache import ModelBug
from .kvm.tdx import POLICIES, VERDICT_INTERNAL_ERROR, VERDICT_REFUSED
from .kvm.trees import UnknownTreeError, check_tree
from .module import TdConfig, VcpuState, tdg_vp_vmcall
from .scenario import parse as parse_scenario

OK = "ok"
NOT_KVM = "not-kvm"
LEGACY_SILENT = "legacy-silent"
HARDENED_REFUSES = "hardened-refuses"
MODULE_REJECTS = "module-rejects"
#: from best to worst
VERDICTS = (OK, NOT_KVM, LEGACY_SILENT, HARDENED_REFUSES, MODULE_REJECTS)
PASSING = frozenset({OK, NOT_KVM})

#: Every call KVM implements (GHCI leaves and KVM hypercalls): what an unresolved call may be.
KVM_CALLS: tuple[L.Leaf, ...] = L.GHCI_LEAVES + L.KVM_HYPERCALLS


#: the prefixes of the leaf table's call names that a compact label leaves out
_CALL_PREFIXES = ("Instruction.", "KVMHypercall.", "#VE.Request")


def short_name(call: str) -> str:
    """A compact label of a call of the leaf table (the catalog's word for it, docs/check.md):
    ``Instruction.RDMSR`` -> ``RDMSR``, ``#VE.RequestMMIO`` -> ``MMIO``, ``KVMHypercall.SEND_IPI`` ->
    ``SEND_IPI``; any other name unchanged."""
    for prefix in _CALL_PREFIXES:
        if call.startswith(prefix):
            return call[len(prefix) :]
    return call


# --- the catalog's words for calls (docs/check.md), shared by whoever reads or writes a catalog ----
#: The catalog's word for a GHCI call: its leaf-table name without the ``Instruction.`` or
#: ``#VE.Request`` prefix (``RDMSR`` -> ``Instruction.RDMSR``, ``MMIO`` -> ``#VE.RequestMMIO``);
#: every other call goes by its leaf-table name.
CALL_WORDS: dict[str, str] = {
    short_name(lf.name): lf.name for lf in L.LEAVES if lf.family == "ghci" and short_name(lf.name) != lf.name
}
_WORD_OF = {name: word for word, name in CALL_WORDS.items()}


def catalog_word(call: str) -> str:
    """The word a catalog writes for a leaf-table call: ``Instruction.IO`` -> ``IO``, ``MapGPA`` -> ``MapGPA``."""
    return _WORD_OF.get(call, call)


#: Qualifiers that pin a call's input values: ``CPUID leaf 0xB`` checks CPUID with R12 = 0xB only,
#: ``ReportFatalError code 0x10000`` checks only a report without a GPA (R12 bit 63 clear),
#: ``RDMSR msr 0x802`` only that MSR index.
INPUT_QUALIFIERS: dict[str, dict[str, str]] = {
    "Instruction.CPUID": {"leaf": "r12", "subleaf": "r13"},
    "ReportFatalError": {"code": "r12"},  # a code without bit 63: a site that never passes a GPA
    "Instruction.RDMSR": {"msr": "r12"},
    "Instruction.WRMSR": {"msr": "r12"},
}

#: A number right after these names pins that input: ``RDMSR 0x802`` is RDMSR with R12 (the MSR
#: index, docs/abi.md §4) = 0x802, the x2APIC ID register.
POSITIONAL_INPUTS: dict[str, str] = {
    "Instruction.RDMSR": "r12",
    "Instruction.WRMSR": "r12",
}

#: Direction words: ``IO in`` runs only the leaf-table case ``in`` of ``Instruction.IO`` (R13 = 0),
#: ``MMIO write`` only ``write`` (R13 = 1): a site that only reads never needs R15 (docs/abi.md §4).
CASE_WORDS: dict[str, dict[str, str]] = {
    "Instruction.IO": {"in": "in", "out": "out"},
    "#VE.RequestMMIO": {"read": "read", "write": "write"},
}


@dataclass(frozen=True)
class Host:
    """The host a call is judged against: the TD's attributes and KVM's tree."""

    module: str = "1.5"
    no_rbp_mod: bool = True
    tree: str = "kvm-x86"

    @property
    def td(self) -> TdConfig:
        return TdConfig(self.module, self.no_rbp_mod)

    @property
    def has_no_rbp_mod(self) -> bool:
        """Whether the TD has the NO_RBP_MOD attribute as its module knows it: the attribute came
        with module 1.5 (docs/abi.md §3: 1.0 checks gpr_select bits 0, 1 and 4 only), so a 1.0 module's TD
        never has it, whatever ``--no-rbp-mod`` says.  What ``--json`` reports as ``no_rbp_mod``."""
        return self.no_rbp_mod and module_family(self.module) != "1.0"

    def json(self) -> dict[str, Any]:
        """The ``host`` object of ``check --json`` and ``scan --json``."""
        return {"module": self.module, "no_rbp_mod": self.has_no_rbp_mod, "tree": self.tree}

    @property
    def status_table(self) -> str:
        """The status table to decode with: the exact version if shipped, else the family's newest."""
        if self.module in MODULE_TABLE_VERSIONS:
            return self.module
        return "1.0.3" if module_family(self.module) == "1.0" else DEFAULT_TABLE_VERSION


class HostError(ValueError):
    """A host option a tool was given is not one the model knows; ``option`` names it."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


def host_for(module: str, no_rbp_mod: bool, tree: str, policy: str) -> Host:
    """The host of a tool's options (check and scan take the same four), each one checked."""
    if policy not in POLICIES:
        raise HostError("policy", f"{policy!r} is not a policy; accepted: {', '.join(POLICIES)}")
    try:
        check_tree(tree)
    except UnknownTreeError as e:
        raise HostError("tree", str(e)) from None
    host = Host(module, no_rbp_mod, tree)
    try:
        _ = host.td  # normalises the module version: raises for an unknown one
    except ValueError as e:
        raise HostError("module", str(e)) from None
    return host


@dataclass
class ModuleOutcome:
    """The TDX module's answer to a control value (the same for every call made with it)."""

    accepted: bool
    status: int | None = None
    decoded: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)


def module_outcome(mask: int, host: Host) -> ModuleOutcome:
    """Run the control value through the module's TDG.VP.VMCALL (RAX = 0, RCX = ``mask``)."""
    vcpu = VcpuState()
    vcpu.gprs[RCX] = mask
    res = tdg_vp_vmcall(host.td, vcpu)
    if res.exited:
        return ModuleOutcome(True)
    assert res.status is not None
    return ModuleOutcome(
        False,
        res.status,
        decode_status(res.status, host.status_table),
        Control(mask).problems(host.td.module, host.td.no_rbp_mod),
    )


@dataclass
class CaseRun:
    """One case of one call under one KVM policy."""

    case: str
    inputs: dict[str, int]  # the input values the guest set (selectors included)
    policy: str
    kvm_verdict: str  # the model's: completed | refused | userspace | internal_error
    dispatched: str  # the leaf KVM dispatched to
    status: int | None
    missing_inputs: list[str] = field(default_factory=list)
    missing_outputs: list[str] = field(default_factory=list)
    zero_reads: list[str] = field(default_factory=list)
    dropped_writes: list[str] = field(default_factory=list)

    @property
    def refused(self) -> bool:
        return self.kvm_verdict in (VERDICT_REFUSED, VERDICT_INTERNAL_ERROR)

    @property
    def silent(self) -> bool:
        return bool(self.zero_reads or self.dropped_writes)


@dataclass
class Judgement:
    """One call made with one control value: the module's outcome, the verdict per policy, every
    case run, and notes: first on the exposure (GPRs exposed for nothing, XMMs), then on the call
    itself (``call_notes``: optional inputs left out, a leaf KVM does not implement).  ``leaf`` is
    None for a call that is not KVM's (Hyper-V, MigTD)."""

    mask: int
    leaf: L.Leaf | None
    module: ModuleOutcome
    verdict: dict[str, str]
    runs: list[CaseRun] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)  # exposed GPRs the call neither reads nor writes
    notes: list[str] = field(default_factory=list)  # the exposure notes, then call_notes
    call_notes: list[str] = field(default_factory=list)  # the notes about the call, not the exposure

    def passes(self, policy: str) -> bool:
        return self.verdict[policy] in PASSING

    def refusals(self) -> list[CaseRun]:
        return [r for r in self.runs if r.policy == "hardened" and r.refused]

    def silences(self) -> list[CaseRun]:
        return [r for r in self.runs if r.policy == "legacy" and r.silent]

    def reasons(self) -> list[str]:
        """Why the verdicts are what they are, in words, one line per distinct finding with the
        cases it holds for: the module's refusal, the hardened refusals, the legacy silences."""
        if not self.module.accepted:
            name = (self.module.decoded or {}).get("name") or f"{self.module.status:#x}"
            return [f"module fails the control with {name}: " + "; ".join(self.module.problems)]
        found: dict[tuple[str, str], list[str]] = {}
        for r in self.refusals():
            regs = [f"inputs {' '.join(r.missing_inputs)}"] if r.missing_inputs else []
            regs += [f"outputs {' '.join(r.missing_outputs)}"] if r.missing_outputs else []
            found.setdefault(("hardened refuses", " and ".join(regs) + " not exposed"), []).append(r.case)
        for r in self.silences():
            parts = [f"reads {' '.join(r.zero_reads)} as 0"] if r.zero_reads else []
            parts += [f"drops {' '.join(r.dropped_writes)}"] if r.dropped_writes else []
            found.setdefault(("legacy", ", ".join(parts)), []).append(r.case)
        return [
            f"{who} (case{'s' if len(cases) > 1 else ''} {', '.join(cases)}): {what}"
            for (who, what), cases in found.items()
        ]

    def details(self) -> list[str]:
        """The reasons, then the notes, one line each (what ``scan`` prints under a site; ``check``'s
        reports word the same findings in their own lines)."""
        return self.reasons() + self.notes


def exposed(mask: int) -> set[str]:
    """The GPR names a control value exposes."""
    return set(Control(mask).gpr_names)


def exposed_xmms(mask: int) -> list[str]:
    """The XMM registers a control value exposes (``xmm0`` ...), in order."""
    ctl = Control(mask)
    return [f"xmm{i}" for i in range(16) if ctl.xmm_select >> i & 1]


def cases_for(leaf: L.Leaf, pinned: dict[str, int] | None = None) -> list[L.Case]:
    """The leaf's cases (one per condition).  With input values pinned (an IO site known to read,
    a CPUID site with a known leaf): the cases that agree with every pinned value they name, or else
    one case of the pinned values over the first case's defaults."""
    if not pinned:
        return list(leaf.cases)
    agree = [
        c for c in leaf.cases if all(c.regs.get(r, v) == v for r, v in pinned.items()) and set(pinned) <= set(c.regs)
    ]
    if agree:
        return agree
    name = " ".join(f"{r}={v:#x}" for r, v in pinned.items())
    return [L.Case(name, {**leaf.cases[0].regs, **pinned}, leaf.cases[0].platform)]


def run_case(mask: int, leaf: L.Leaf, case: L.Case, policy: str, host: Host) -> CaseRun:
    """One round trip through the model (scenario API), then what it means for this leaf: under
    ``hardened`` the registers KVM found missing, under ``legacy`` what it read as zero or dropped.
    Missing registers are read from the leaf table over KVM's view of the inputs (0 where the guest
    did not expose them), so a call KVM dispatched elsewhere (R10/R11 not exposed) is still
    explained in terms of the call the guest meant."""
    inputs = {**leaf.selector_values(), **case.regs}
    scenario = {
        "td": {"module": host.module, "no_rbp_mod": host.no_rbp_mod},
        "kvm": {"policy": policy, "tree": host.tree},
        "guest": {"rcx": mask, **inputs},
        "platform": case.platform,
    }
    rt = parse_scenario(scenario).run()
    k = rt.kvm
    if k is None:
        raise ModelBug(f"{leaf.name}: the module accepted {mask:#x} but the call never reached KVM")
    shown = exposed(mask)
    seen = {r: (v if r in shown else 0) for r, v in inputs.items()}
    run = CaseRun(
        case.name,
        inputs,
        policy,
        k.verdict,
        k.leaf.name,
        k.status,
        [r for r in L.required_inputs(leaf, seen) if r not in shown],
        [r for r in L.possible_outputs(leaf, seen) if r not in shown],
    )
    if policy == "legacy":
        run.zero_reads = list(k.zero_reads)
        run.dropped_writes = list(k.dropped_writes)
    elif run.refused != bool(run.missing_inputs or run.missing_outputs):
        raise ModelBug(
            f"{leaf.name} {case.name}: hardened KVM {k.verdict} but the table says "
            f"missing inputs {run.missing_inputs}, outputs {run.missing_outputs}"
        )
    return run


def used_registers(leaf: L.Leaf) -> set[str]:
    """Every register the leaf may read or write, under any condition."""
    return set(leaf.selectors) | {op.reg for op in leaf.inputs + leaf.outputs}


def _exposure_notes(mask: int, unused: list[str]) -> list[str]:
    """Registers the call is exposed for nothing: unused GPRs, and XMMs (no KVM call uses them)."""
    notes = []
    if unused:
        notes.append(f"exposed but unused: {' '.join(unused)} (the host can read and overwrite them)")
    if xmms := exposed_xmms(mask):
        notes.append(f"XMMs exposed: {' '.join(xmms)} (no KVM call uses them; the host can read and overwrite them)")
    return notes


def _call_notes(mask: int, leaf: L.Leaf | None) -> list[str]:
    """Notes about the call itself: optional inputs the mask leaves out, a leaf KVM does not implement."""
    notes: list[str] = []
    if leaf is None:
        return notes
    skipped = [r for r in L.optional_inputs(leaf) if r not in exposed(mask)]
    if skipped:
        notes.append(f"optional inputs not exposed: {' '.join(skipped)} (read as 0)")
    if leaf.name in L.UNSUPPORTED_GHCI or leaf.name.startswith("unknown("):
        notes.append(f"KVM does not implement {leaf.name}: it answers SUBFUNC_UNSUPPORTED")
    return notes


def judge(
    mask: int,
    leaf: L.Leaf | None,
    host: Host,
    pinned: dict[str, int] | None = None,
    module: ModuleOutcome | None = None,
    cases: Sequence[L.Case] | None = None,
) -> Judgement:
    """Judge the call ``leaf`` made with control value ``mask``: the module's control check, then
    each case of the leaf under both KVM policies.  The cases are ``cases`` when given (a caller
    that chose them, as ``check`` does from a catalog row's direction words and pins), else
    :func:`cases_for` the input values ``pinned``.  ``module``: the module's outcome if already
    known (it depends on the mask only).

    Verdict per policy: ``module-rejects`` if the module refuses the control (the VMM never sees
    the call), ``not-kvm`` for a call that is not KVM's (``leaf`` None: only the module's check
    applies), else under ``hardened`` ``hardened-refuses`` if any case is refused, under ``legacy``
    ``legacy-silent`` if any case reads an unexposed input as 0 or writes an unexposed output;
    otherwise ``ok``."""
    module = module or module_outcome(mask, host)
    shown = exposed(mask)
    # a call that is not KVM's may use any register (KVM's table does not describe it): none unused
    unused = [r for r in GPR_NAMES if r in shown and leaf is not None and r not in used_registers(leaf)]
    call_notes = _call_notes(mask, leaf)
    out = Judgement(
        mask, leaf, module, {}, unused=unused, notes=_exposure_notes(mask, unused) + call_notes, call_notes=call_notes
    )
    if not module.accepted:
        out.verdict = {p: MODULE_REJECTS for p in POLICIES}
        return out
    if leaf is None:
        out.verdict = {p: NOT_KVM for p in POLICIES}
        return out
    for case in cases_for(leaf, pinned) if cases is None else cases:
        for policy in POLICIES:
            out.runs.append(run_case(mask, leaf, case, policy, host))
    out.verdict = {
        "legacy": LEGACY_SILENT if out.silences() else OK,
        "hardened": HARDENED_REFUSES if out.refusals() else OK,
    }
    return out


def serves(mask: int) -> tuple[list[str], list[str]]:
    """For a control value whose call is not known: the KVM calls it serves under the hardened
    policy (every case's minimal mask is exposed) and those it fails (some case's is not), from the
    leaf table's minimal masks.  RCX itself is never in the minimal masks."""
    gpr_select = Control(mask).gpr_select
    good: list[str] = []
    bad: list[str] = []
    for leaf in KVM_CALLS:
        missing = L.missing_by_case(leaf, gpr_select)
        (bad if any(missing.values()) else good).append(leaf.name)
    return good, bad

"""Renderers of ``tdvmcall check`` results: JSON objects, detail lines, a rich table, Markdown and a
self-contained HTML page.  They only present :class:`~tdvmcall.check.catalog.CallCheck` values;
every judgement was made in ``judge.py``.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from .. import html_matrix as M
from ..abi.control import Control, module_family
from ..abi.regs import hex64, names_in
from ..console import VERDICT_STYLE
from ..judge import (
    OK,
    VERDICTS,
    CaseRun,
    Host,
    exposed_xmms,
    short_name,
)
from ..kvm import leaves as L
from ..kvm.leaves import LEAVES
from ..kvm.tdx import POLICIES
from .catalog import (
    ALL_KVM_CALLS,
    FOREIGN_CALLS,
    CallCheck,
    Site,
    site_unused,
    summary,
)

JSON_SCHEMA = 1

#: one style per verdict: rich style, HTML background, HTML text colour, what it means (the judge's,
#: shared with scan)
STYLE = VERDICT_STYLE


# --- plain data ---------------------------------------------------------------------------------
def case_text(run: CaseRun, leaf: L.Leaf) -> str:
    """``in [r12=0x1 r13=0x0 r14=0x3fd]``: the case name and its input values, without the
    selectors of the leaf the guest meant (``Leaf.selectors``: R10, and R11 for a GHCI call)."""
    vals = " ".join(f"{r}={v:#x}" for r, v in run.inputs.items() if r not in leaf.selectors)
    return f"{run.case} [{vals}]" if vals else run.case


def module_text(check: CallCheck) -> str:
    m = check.module
    d = m.decoded or {}
    operand = f", operand {d['operand_name'] or d['operand_id']}" if "operand_id" in d else ""
    return f"{hex64(m.status or 0)} {d.get('name') or 'unknown status'}{operand}: {'; '.join(m.problems)}"


def _refusal(run: CaseRun) -> str:
    if "r10" in run.missing_inputs:
        return "r10 not exposed: no status can reach the guest, KVM exits to userspace (internal error)"
    parts = []
    if run.missing_inputs:
        parts.append(f"inputs {' '.join(run.missing_inputs)} not exposed")
    if run.missing_outputs:
        parts.append(f"outputs {' '.join(run.missing_outputs)} not exposed")
    return "; ".join(parts)


def _silence(run: CaseRun, call: str) -> str:
    parts = []
    if run.zero_reads:
        parts.append(f"reads {' '.join(run.zero_reads)} as 0")
    if run.dropped_writes:
        parts.append(f"drops its writes to {' '.join(run.dropped_writes)}")
    if run.dispatched != call:
        parts.append(f"runs {run.dispatched} instead")
    return "; ".join(parts)


def _by_finding(prefix: str, runs: list[CaseRun], explain, leaf: L.Leaf | None, values: bool = True) -> list[str]:
    """One line per distinct finding, naming the cases it holds for (with their inputs when it holds
    for only some of the cases, unless ``values`` is False)."""
    found: dict[str, list[CaseRun]] = {}
    for run in runs:
        found.setdefault(explain(run), []).append(run)
    lines = []
    for text, rs in found.items():
        if len(rs) == 1 and leaf is not None and values:
            where = case_text(rs[0], leaf)
        else:
            where = ", ".join(r.case for r in rs)
        lines.append(f"{prefix} (case {where}): {text}")
    return lines


def _module_brief(check: CallCheck) -> str:
    """``gpr_select exposes rbp, ... (RBP: NO_RBP_MOD): TDX_OPERAND_INVALID, operand RCX``."""
    d = check.module.decoded or {}
    name = d.get("name") or hex64(check.module.status or 0)
    operand = f", operand {str(d.get('operand_name') or d.get('operand_id')).removeprefix('OPERAND_ID_')}"
    return f"{'; '.join(check.module.problems)}: {name}{operand if 'operand_id' in d else ''}"


def _reasons(check: CallCheck, brief: bool = False, values: bool = True) -> list[str]:
    """Why the verdicts are what they are: the module's refusal, the not-KVM reason, the hardened
    refusals and the legacy silences, one line per distinct finding (``values=False``: shorter, for
    the findings: the module's reason without the status value, the cases without their inputs)."""
    lines: list[str] = []
    if not check.module.accepted:
        lines.append(f"module rejects: {module_text(check)}" if values else _module_brief(check))
    elif check.call.foreign:
        reason = check.call.foreign.split(":")[0] if brief else check.call.foreign
        lines.append(f"not a KVM call: {reason}")
    leaf = check.call.leaf
    lines += _by_finding("hardened refuses", check.refusals(), _refusal, leaf, values)
    lines += _by_finding("legacy", check.silences(), lambda r: _silence(r, check.call.name), leaf, values)
    return lines


def detail_lines(check: CallCheck, brief: bool = False, exposure: bool = True) -> list[str]:
    """Why the verdicts are what they are, then the notes, one line each (``brief``: a not-KVM
    call's reason only up to its first colon, for the terminal table; ``exposure=False``: without
    the over-exposure notes, which the terminal and Markdown reports give once per site)."""
    lines = _reasons(check, brief)
    lines += check.notes if exposure else check.call_notes
    if check.call.annotation:
        lines.append(f"catalog: {check.call.written}({check.call.annotation})")
    return lines


def call_label(check: CallCheck) -> str:
    """A compact name of the call with its pins: ``RDMSR 0x802``, ``IO in``, ``CPUID leaf 0xB``."""
    name = short_name(check.call.name)
    return f"{name} {check.call.qualifier}" if check.call.qualifier else name


def calls_text(checks: list[CallCheck]) -> str:
    """The calls of a group, compact: ``every KVM call (17)`` for a bare ``all``, the six KVM
    hypercalls as ``KVM-hypercall×6``, else their labels."""
    calls = CallsSeen()
    for c in checks:
        calls.add(c)
    return calls.text()


class CallsSeen:
    """What :func:`calls_text` needs of many calls, in memory bounded by the distinct ones: how many
    of each name, whether any is qualified, and each distinct (name, label) in order."""

    def __init__(self) -> None:
        self.count: dict[str, int] = {}
        self.labels: dict[tuple[str, str], None] = {}
        self.plain = True

    def add(self, check: CallCheck) -> None:
        name = check.call.name
        self.count[name] = self.count.get(name, 0) + 1
        self.labels.setdefault((name, call_label(check)), None)
        self.plain = self.plain and not check.call.qualifier

    def text(self) -> str:
        total = sum(self.count.values())
        if self.plain and total > 1 and self.count.keys() == set(ALL_KVM_CALLS) and total == len(ALL_KVM_CALLS):
            return f"every KVM call ({total})"
        hypercalls = {leaf.name for leaf in L.KVM_HYPERCALLS}
        collapse = self.plain and hypercalls <= self.count.keys()
        labels: list[str] = []
        for name, label in self.labels:
            label = f"KVM-hypercall×{len(hypercalls)}" if collapse and name in hypercalls else label
            if label not in labels:
                labels.append(label)
        return " ".join(labels)


def verdict_label(verdict: dict[str, str]) -> str:
    """Both policies' verdicts in a few words: ``module-rejects``, ``hardened-refuses, legacy-silent``
    (``ok`` only when both are; the verdict names say which policy they belong to)."""
    words = list(dict.fromkeys(verdict[p] for p in ("hardened", "legacy")))
    if len(words) > 1 and OK in words:
        words.remove(OK)
    return ", ".join(words)


def _rank(verdict: dict[str, str]) -> int:
    return max(VERDICTS.index(v) for v in verdict.values())


def short_snapshot(site: Site) -> str:
    """The snapshot a site was read at, without its parenthesised detail (``mainline v6.3+``)."""
    return site.snapshot.split(" (")[0].strip()


#: the snapshot ``tdvmcall scan --to-catalog`` writes: its rows name the image in ``guest``, the
#: module (an EDK2 driver, a container inside the input) in ``file``, the function in ``function``
SCAN_SNAPSHOT = "scan"


def _module(site: Site) -> str:
    """The module a scanned site is in (its ``file``), for a row ``scan --to-catalog`` wrote; else ''."""
    return site.file if site.snapshot == SCAN_SNAPSHOT and site.file != site.guest else ""


def site_where(site: Site) -> str:
    """Where, in one line: ``td-shim AP mailbox loop 0xffec @ before e3a692b1``; a row that scan
    wrote names its module instead of the snapshot: ``OVMF.fd AtaBusDxe TdVmCall 0xffcc``."""
    if site.row == 0:  # a what-if: its function is the mask
        return site.label
    if site.snapshot == SCAN_SNAPSHOT:
        return " ".join(p for p in (site.guest, _module(site), site.function, f"{site.mask:#06x}") if p)
    snap = f" @ {short_snapshot(site)}" if site.snapshot else ""
    return f"{site.guest} {site.function} {site.mask:#06x}{snap}"


#: how many sites a finding of several names before "and N more"
NAMED_SITES = 3


@dataclass
class Finding:
    """Calls that fail under some policy for the same reason, at sites of one guest and snapshot
    with one mask: one site, or many (the same stub in many modules, as ``scan`` groups them)."""

    site: Site  # the first
    checks: list[CallCheck]
    verdict: dict[str, str]
    why: str  # one line, case names without their values
    details: list[str]  # the same, one line per reason, with the cases' input values
    sites: list[Site] = field(default_factory=list)  # every site, in catalog order

    @property
    def where(self) -> str:
        """:func:`site_where` of the one site; for several, what they share, then the first few."""
        if len(self.sites) <= 1:
            return site_where(self.site)
        modules = len({_module(x) for x in self.sites})
        named = (_place(x, modules > 1) for x in self.sites)
        places = list(dict.fromkeys(named))
        return group_where(self.site, modules, places[:NAMED_SITES], len(places))

    @property
    def calls(self) -> str:
        return calls_text(self.checks)


def _place(site: Site, module: bool) -> str:
    """A site among others of a finding: its function, after its module when they differ."""
    return " ".join(p for p in (_module(site) if module else "", site.function) if p)


def group_where(first: Site, modules: int, shown: list[str], places: int) -> str:
    """Where a finding of several sites is: what they share (guest, the module when one, mask,
    snapshot), the number of modules or functions, the first :data:`NAMED_SITES` of them."""
    s = first
    if places == 1:  # one function making several calls, each its own row
        return site_where(s)
    more = f" and {places - NAMED_SITES} more" if places > NAMED_SITES else ""
    head = " ".join(p for p in (s.guest, _module(s) if modules == 1 else "", f"{s.mask:#06x}") if p)
    snap = f" @ {short_snapshot(s)}" if s.snapshot and s.snapshot != SCAN_SNAPSHOT else ""
    count = _count(modules, "module") if modules > 1 else _count(places, "function")
    return f"{head}{snap} in {count}: {', '.join(shown)}{more}"


def findings(results: list[CallCheck]) -> list[Finding]:
    """Every (site, call) that does not pass under some policy, grouped by verdicts and reason over
    the sites of one guest and snapshot with the same mask (as ``scan`` groups the same code in
    many modules into one finding), worst first (``module-rejects``, ``hardened-refuses``,
    ``legacy-silent``), then in catalog order."""
    groups: dict[tuple, Finding] = {}
    for c in results:
        if all(c.passes(p) for p in POLICIES):
            continue
        why = "; ".join(_reasons(c, brief=True, values=False))
        site = c.site
        key = (site.guest, site.snapshot, site.mask, c.verdict["legacy"], c.verdict["hardened"], why)
        if site.row == 0:  # a what-if: its own
            key += (id(site),)
        found = groups.get(key)
        if found is None:
            found = groups[key] = Finding(site, [], dict(c.verdict), why, _reasons(c))
        found.checks.append(c)
        if not found.sites or found.sites[-1] is not site:
            found.sites.append(site)
    return sorted(groups.values(), key=lambda f: -_rank(f.verdict))  # stable: catalog order within a verdict


def site_exposure(checks: list[CallCheck]) -> list[str]:
    """What a site exposes for nothing, once per site: GPRs none of its calls uses, then XMMs."""
    return site_unused(checks) + exposed_xmms(checks[0].site.mask)


# --- a catalog gone over twice, in memory bounded by the distinct judgements -------------------
#: how a report goes over the checks: a function giving, each time it is called, every site in
#: order with the checks of its calls (a catalog re-read and re-checked, or a list of checks)
Sites = Callable[[], Iterable[tuple[Site, list[CallCheck]]]]


def sites_of(results: list[CallCheck]) -> Sites:
    """:data:`Sites` over checks already made."""
    return lambda: by_site(results)


class GroupedFinding:
    """A :class:`Finding` counted as the checks go by: its first site and call, the counts that its
    ``where`` and ``calls`` need, and its rows, calls and results in a temporary database on disk
    (``Checked``), so that a finding of 100,000 sites costs no more memory than one of a single site."""

    def __init__(self, number: int, first: CallCheck, why: str) -> None:
        self.number = number
        self.site = first.site
        self.verdict = dict(first.verdict)
        self.why = why
        self.details = _reasons(first)
        self.seen = CallsSeen()
        self.sites = 0
        self.last = -1  # the number of the site last added
        self.where = ""
        self.calls = ""


class Checked:
    """The checks of every site, gone over once (:meth:`__init__`) for what a report leads with --
    the counts, the verdicts, the findings -- and again, as often as a report needs, for the rest
    (``sites``, re-checked: each distinct judgement is made once and shared).  Memory stays bounded
    by the distinct judgements and findings, not the number of rows: the rows, calls and results of
    the findings go to a temporary SQLite database (a file deleted when closed)."""

    def __init__(self, sites: Sites, errors: int = 0) -> None:
        self.sites = sites
        self.errors = errors
        self.count = {"sites": 0, "calls": 0}
        self.verdicts = {p: dict.fromkeys(VERDICTS, 0) for p in POLICIES}
        self.bad = {p: [0, 0] for p in POLICIES}  # sites, calls that fail the policy
        self.present: set[str] = set()
        self.mask_widths: list[int] = []  # per run of sites of one guest
        self.db = sqlite3.connect("")  # "": a private temporary database on disk
        self.db.execute("CREATE TABLE calls (grp INTEGER, seq INTEGER, name TEXT)")
        self.db.execute("CREATE TABLE sites (grp INTEGER, seq INTEGER, row INTEGER, module TEXT, function TEXT)")
        groups: dict[tuple, GroupedFinding] = {}
        reasons: dict[tuple, str] = {}
        calls: list[tuple] = []
        rows: list[tuple] = []
        index = 0
        guest: str | None = None
        for n, (site, checks) in enumerate(sites()):
            if site.guest != guest or not self.mask_widths:
                guest = site.guest
                self.mask_widths.append(4)
            self.mask_widths[-1] = max(self.mask_widths[-1], len(f"{site.mask:#06x}"))
            self.count["sites"] += 1
            bad = set()
            for c in checks:
                self.count["calls"] += 1
                self.present.add(c.call.name)
                for p in POLICIES:
                    self.verdicts[p][c.verdict[p]] += 1
                    if not c.passes(p):
                        self.bad[p][1] += 1
                        bad.add(p)
                if not all(c.passes(p) for p in POLICIES):
                    rkey = (id(c.judgement), c.call)
                    why = reasons.get(rkey)
                    if why is None:
                        why = reasons[rkey] = "; ".join(_reasons(c, brief=True, values=False))
                    key = (site.guest, site.snapshot, site.mask, c.verdict["legacy"], c.verdict["hardened"], why)
                    if site.row == 0:  # a what-if: its own
                        key += (n,)
                    found = groups.get(key)
                    if found is None:
                        found = groups[key] = GroupedFinding(len(groups), c, why)
                    found.seen.add(c)
                    calls.append((found.number, index, c.call.name))
                    if found.last != n:
                        found.last = n
                        found.sites += 1
                        rows.append((found.number, n, site.row, _module(site), site.function))
                index += 1
            for p in bad:
                self.bad[p][0] += 1
            if len(calls) > 10_000 or len(rows) > 10_000:
                self._store(calls, rows)
        self._store(calls, rows)
        self.db.execute("CREATE INDEX calls_grp ON calls (grp, seq)")
        self.db.execute("CREATE INDEX sites_grp ON sites (grp, seq)")
        self.findings = sorted(groups.values(), key=lambda f: -_rank(f.verdict))  # stable: catalog order
        for f in self.findings:
            f.calls = f.seen.text()
            f.where = site_where(f.site) if f.sites <= 1 else self._where(f)

    def _store(self, calls: list[tuple], rows: list[tuple]) -> None:
        self.db.executemany("INSERT INTO calls VALUES (?, ?, ?)", calls)
        self.db.executemany("INSERT INTO sites VALUES (?, ?, ?, ?, ?)", rows)
        calls.clear()
        rows.clear()

    def _where(self, f: GroupedFinding) -> str:
        """:attr:`Finding.where` of a finding of several sites, from its sites on disk."""
        ((modules,),) = self.db.execute("SELECT COUNT(DISTINCT module) FROM sites WHERE grp = ?", (f.number,))
        place = "(CASE WHEN module != '' AND function != '' THEN module || ' ' || function ELSE module || function END)"
        place = place if modules > 1 else "function"
        firsts = f"SELECT {place} AS place, MIN(seq) AS first FROM sites WHERE grp = ? GROUP BY place"
        ((places,),) = self.db.execute(f"SELECT COUNT(*) FROM ({firsts})", (f.number,))
        shown = [
            p
            for (p,) in self.db.execute(f"SELECT place FROM ({firsts}) ORDER BY first LIMIT ?", (f.number, NAMED_SITES))
        ]
        return group_where(f.site, modules, shown, places)

    def rows(self, f: GroupedFinding) -> Iterator[int]:
        """The catalog rows of a finding's sites, in catalog order."""
        for (row,) in self.db.execute("SELECT row FROM sites WHERE grp = ? ORDER BY seq", (f.number,)):
            yield row

    def calls(self, f: GroupedFinding) -> Iterator[tuple[str, int]]:
        """The calls of a finding: the call's name and the index of its result, in catalog order."""
        yield from self.db.execute("SELECT name, seq FROM calls WHERE grp = ? ORDER BY seq", (f.number,))

    def summary(self) -> dict:
        """:func:`~tdvmcall.check.catalog.summary`'s counts."""
        return {**self.count, **{p: dict(v) for p, v in self.verdicts.items()}}

    def passes(self, policy: str) -> bool:
        return not self.bad[policy][1]

    def by_guest(self) -> Iterator[tuple[str, int, Iterator[tuple[Site, list[CallCheck]]]]]:
        """The sites again, one run of one guest at a time: the guest, its mask column's width, its sites."""
        runs = groupby(self.sites(), key=lambda sc: sc[0].guest)
        for width, (guest, sites) in zip(self.mask_widths, runs):
            yield guest, width, sites

    def close(self) -> None:
        self.db.close()


def _finding_json(f: Finding, index: dict[int, int]) -> dict:
    s = f.site
    return {
        "guest": s.guest,
        "function": s.function,
        "snapshot": s.snapshot,
        "row": s.row,
        "rows": [x.row for x in f.sites],
        "where": f.where,
        "mask": f"{s.mask:#06x}",
        "calls": [c.call.name for c in f.checks],
        "results": [index[id(c)] for c in f.checks],
        "verdict": f.verdict,
        "why": f.why,
        "details": f.details,
    }


def _site_json(site: Site, checks: list[CallCheck], index: dict[int, int]) -> dict:
    return {
        "guest": site.guest,
        "function": site.function,
        "snapshot": site.snapshot,
        "file": site.file,
        "row": site.row,
        "mask": f"{site.mask:#06x}",
        "exposed_for_nothing": site_unused(checks),
        "xmms": exposed_xmms(site.mask),
        "results": [index[id(c)] for c in checks],
    }


def result_json(check: CallCheck, memo: dict | None = None) -> dict:
    """One (site, call) object of ``tdvmcall check --json``.  ``memo``: a dict kept across calls,
    so that the part of the object that depends on the judgement and the call only (everything
    but where the site is) is built once per distinct judgement and call."""
    s = check.site
    key = (id(check.judgement), check.call)
    common: tuple[dict, list[str]] | None = memo.get(key) if memo is not None else None
    if common is None:
        common = _judged_json(check)
        if memo is not None:
            memo[key] = common
    return {
        "guest": s.guest,
        "snapshot": s.snapshot,
        "file": s.file,
        "function": s.function,
        "row": s.row,
        **common[0],
        "remarks": list(s.remarks) + ([check.call.annotation] if check.call.annotation else []),
        "details": common[1],
    }


def _judged_json(check: CallCheck) -> tuple[dict, list[str]]:
    """The fields of a result that depend on the mask, the call and its judgement only (``details``
    apart: it comes after the site's remarks)."""
    s, m = check.site, check.module
    ctl = Control(s.mask)
    return {
        "mask": f"{s.mask:#06x}",
        "gprs": names_in(ctl.gpr_select, 16),
        "xmms": [f"xmm{i}" for i in range(16) if ctl.xmm_select >> i & 1],
        "call": check.call.name,
        "written": check.call.written,
        "qualifier": check.call.qualifier,
        "kvm_call": check.call.foreign is None,
        "not_kvm_reason": check.call.foreign,
        "verdict": dict(check.verdict),
        "module": {
            "accepted": m.accepted,
            "status": hex64(m.status) if m.status is not None else None,
            "status_name": (m.decoded or {}).get("name"),
            "operand": (m.decoded or {}).get("operand_name"),
            "problems": m.problems,
        },
        "hardened_refusals": [
            {
                "case": r.case,
                "inputs": {k: f"{v:#x}" for k, v in r.inputs.items()},
                "missing_inputs": r.missing_inputs,
                "missing_outputs": r.missing_outputs,
                "kvm_verdict": r.kvm_verdict,
            }
            for r in check.refusals()
        ],
        "legacy_silences": [
            {
                "case": r.case,
                "inputs": {k: f"{v:#x}" for k, v in r.inputs.items()},
                "zero_reads": r.zero_reads,
                "dropped_writes": r.dropped_writes,
                "dispatched": r.dispatched,
            }
            for r in check.silences()
        ],
        "cases": list(dict.fromkeys(r.case for r in check.runs)),
        "unused": check.unused,
        "notes": check.notes,
    }, detail_lines(check)


def report_json(results: list[CallCheck], host: Host, policy: str, catalog: str, errors: list[str]) -> dict:
    """The whole ``--json`` document."""
    return {
        key: list(value) if isinstance(value, Iterator) else value
        for key, value in _report_json_parts(results, host, policy, catalog, errors)
    }


def _report_json_parts(
    results: list[CallCheck], host: Host, policy: str, catalog: str, errors: list[str]
) -> Iterator[tuple[str, Any]]:
    """The ``--json`` document's keys and values in order; ``results``, ``findings`` and ``sites``
    as generators, so that :func:`write_report_json` holds one object of them at a time."""
    index = {id(c): i for i, c in enumerate(results)}
    memo: dict = {}
    yield "schema", JSON_SCHEMA
    yield "host", host.json()
    yield "policy", policy
    yield "catalog", catalog
    yield "summary", summary(results)
    yield "errors", errors
    yield "passed", all(r.passes(policy) for r in results) and not errors
    yield "results", (result_json(r, memo) for r in results)
    yield "findings", (_finding_json(f, index) for f in findings(results))
    yield "sites", (_site_json(site, checks, index) for site, checks in by_site(results))


def _indented(value: Any) -> str:
    """``json.dumps(value, indent=2)``; quicker for an object whose members are scalars or lists of
    scalars (json's indenting encoder is pure Python)."""
    if isinstance(value, dict) and value:
        return "{\n" + _fields(value) + "\n}"
    return json.dumps(value, indent=2)


def _member(key: str, value: Any) -> str:
    if isinstance(value, list) and value and not any(isinstance(v, (list, dict)) for v in value):
        return f"  {json.dumps(key)}: [\n    " + ",\n    ".join(map(json.dumps, value)) + "\n  ]"
    if isinstance(value, (list, dict)) and value:
        return f"  {json.dumps(key)}: " + json.dumps(value, indent=2).replace("\n", "\n  ")
    return f"  {json.dumps(key)}: {json.dumps(value)}"


def _fields(obj: dict) -> str:
    """The members of a JSON object as ``json.dumps(obj, indent=2)`` writes them, without the braces."""
    return ",\n".join(_member(k, v) for k, v in obj.items())


def _result_text(check: CallCheck, memo: dict) -> str:
    """``json.dumps(result_json(check), indent=2)``, the same text, with the members that depend on
    the judgement and the call only encoded once per distinct one (``memo``)."""
    s = check.site
    key = ("text", id(check.judgement), check.call)
    common = memo.get(key)
    if common is None:
        fields, details = _judged_json(check)
        common = memo[key] = (_fields(fields), _fields({"details": details}))
    where = {"guest": s.guest, "snapshot": s.snapshot, "file": s.file, "function": s.function, "row": s.row}
    remarks = list(s.remarks) + ([check.call.annotation] if check.call.annotation else [])
    return "{\n" + ",\n".join((_fields(where), common[0], _fields({"remarks": remarks}), common[1])) + "\n}"


def write_report_json(
    write: Callable[[str], Any],
    results: list[CallCheck] | Checked,
    host: Host,
    policy: str,
    catalog: str,
    errors: list[str],
) -> None:
    """The ``--json`` document, written piece by piece: the same text as ``json.dumps(report_json(...),
    indent=2)``, without ever holding the whole document, its text or a list as long as the catalog
    (:class:`Checked`: a catalog of 100,000 rows)."""
    checked = results if isinstance(results, Checked) else Checked(sites_of(results), len(errors))
    head = {
        "schema": JSON_SCHEMA,
        "host": host.json(),
        "policy": policy,
        "catalog": catalog,
        "summary": checked.summary(),
        "errors": errors,
        "passed": checked.passes(policy) and not errors,
    }
    write("{")
    for n, (key, value) in enumerate(head.items()):
        write(("," if n else "") + f"\n  {json.dumps(key)}: " + json.dumps(value, indent=2).replace("\n", "\n  "))
    memo: dict = {}
    write(',\n  "results": ')
    _write_items(write, ((_result_text(c, memo),) for _, checks in checked.sites() for c in checks))
    write(',\n  "findings": ')
    _write_items(write, (_finding_text(checked, f) for f in checked.findings))
    write(',\n  "sites": ')
    _write_items(write, ((_indented(site),) for site in _sites_json(checked)))
    write("\n}\n")


def _write_items(write: Callable[[str], Any], items: Iterable[Iterable[str]]) -> None:
    """A JSON array as ``json.dumps(indent=2)`` writes it one level down, each item given as the
    pieces of its text at the top level (JSON strings hold no raw line break: every one is the indent's)."""
    empty = True
    for pieces in items:
        write(("[" if empty else ",") + "\n    ")
        for text in pieces:
            write(text.replace("\n", "\n    "))
        empty = False
    write("[]" if empty else "\n  ]")


def _list_member(key: str, values: Iterable[Any]) -> Iterator[str]:
    """``_member(key, list(values))`` for a list of scalars, a thousand values at a time."""
    empty = True
    batch: list[str] = []
    for v in values:
        batch.append(json.dumps(v))
        if len(batch) == 1000:
            yield (f"  {json.dumps(key)}: [\n    " if empty else ",\n    ") + ",\n    ".join(batch)
            empty, batch = False, []
    if batch:
        yield (f"  {json.dumps(key)}: [\n    " if empty else ",\n    ") + ",\n    ".join(batch)
        empty = False
    yield f"  {json.dumps(key)}: []" if empty else "\n  ]"


def _finding_text(checked: Checked, f: GroupedFinding) -> Iterator[str]:
    """The text of ``_indented(_finding_json(...))``, its lists as long as the finding read from disk."""
    s = f.site
    yield "{\n" + _fields({"guest": s.guest, "function": s.function, "snapshot": s.snapshot, "row": s.row}) + ",\n"
    yield from _list_member("rows", checked.rows(f))
    yield ",\n" + _fields({"where": f.where, "mask": f"{s.mask:#06x}"}) + ",\n"
    yield from _list_member("calls", (name for name, _ in checked.calls(f)))
    yield ",\n"
    yield from _list_member("results", (i for _, i in checked.calls(f)))
    yield ",\n" + _fields({"verdict": f.verdict, "why": f.why, "details": f.details}) + "\n}"


def _sites_json(checked: Checked) -> Iterator[dict]:
    index = 0
    for site, checks in checked.sites():
        yield _site_json(site, checks, {id(c): index + i for i, c in enumerate(checks)})
        index += len(checks)


def summary_line(results: list[CallCheck]) -> str:
    """``<n> sites, <n> calls. hardened: <n> ok, <n> not-kvm, ... legacy: ...`` (the counts of today's
    catalog are in README.md and docs/check.md)."""
    return _summary_text(summary(results))


def _summary_text(s: dict) -> str:
    per = []
    for p in ("hardened", "legacy"):
        counts = ", ".join(f"{n} {v}" for v, n in s[p].items() if n)
        per.append(f"{p}: {counts or 'nothing checked'}")
    return f"{_count(s['sites'], 'site')}, {_count(s['calls'], 'call')}. " + ". ".join(per) + "."


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def host_line(host: Host, policy: str, catalog: str) -> str:
    if module_family(host.module) == "1.0":  # the attribute came with 1.5: a 1.0 module never checks RBP
        rbp = "which has no NO_RBP_MOD and does not check RBP"
    else:
        rbp = "with NO_RBP_MOD" if host.no_rbp_mod else "without NO_RBP_MOD"
    return f"{catalog} against TDX module {host.module} ({rbp}), KVM {host.tree}; exit status follows --policy {policy}"


def by_site(results: Iterable[CallCheck]) -> list[tuple[Site, list[CallCheck]]]:
    return [(site, list(group)) for site, group in groupby(results, key=lambda r: r.site)]


def by_place(results: Iterable[CallCheck]) -> list[tuple[Site, list[CallCheck]]]:
    """:func:`by_site`, consecutive rows of one place (guest, snapshot, file, function and mask) as
    one: ``scan --to-catalog`` writes a row per call a function makes, the terminal shows the
    function once with all its calls."""

    return [(group[0].site, group) for _, g in groupby(results, key=_place_key) for group in [list(g)]]


def _place_key(r: CallCheck) -> tuple:
    s = r.site
    return (s.guest, s.snapshot, s.file, s.function, s.mask) if s.row else (id(s),)


def by_guest(results: Iterable[CallCheck]) -> list[tuple[str, list[CallCheck]]]:
    return [(g, list(group)) for g, group in groupby(results, key=lambda r: r.site.guest)]


# --- the terminal --------------------------------------------------------------------------------
def _verdict_text(v: str) -> Text:
    return Text(v, style=STYLE[v][0])


def verdict_line(results: list[CallCheck] | Checked, policy: str, errors: int = 0) -> str:
    """The answer: ``FAIL under --policy hardened: 4 of 41 sites, 20 of 148 calls do not pass (exit 1)``;
    with bad catalog rows, ``ERROR: ...`` first (exit 2)."""
    checked = _checked(results)
    sites, calls = checked.count["sites"], checked.count["calls"]
    bad_sites, bad = checked.bad[policy]
    if bad:
        line = f"FAIL under --policy {policy}: {bad_sites} of {sites} sites, {bad} of {calls} calls do not pass"
    else:
        line = f"PASS under --policy {policy}: every call of {_count(sites, 'site')} passes"
    if errors:
        rows = _count(errors, "bad catalog row")
        return f"ERROR: {rows} not checked (named on stderr); the others: {line} (exit 2)"
    return f"{line} (exit {1 if bad else 0})"


def _checked(results: list[CallCheck] | Checked) -> Checked:
    return results if isinstance(results, Checked) else Checked(sites_of(results))


def policy_lines(results: list[CallCheck] | Checked) -> list[Text]:
    """The counts per policy, one line each, every verdict in its colour."""
    s = _checked(results).summary()
    lines = []
    for p in ("hardened", "legacy"):
        line = Text(f"{p + ':':<10}")
        counts = [(v, n) for v, n in s[p].items() if n]
        for i, (v, n) in enumerate(counts):
            line.append(", " if i else "")
            line.append(f"{n} {v}", style=STYLE[v][0])
        lines.append(line if counts else Text(f"{p}: nothing checked"))
    return lines


def findings_table(found: list[Finding] | list[GroupedFinding]) -> Table:
    """One row per finding: the verdicts, where (guest, site, snapshot, mask), the calls, why."""
    t = Table(box=None, show_header=True, header_style="bold", pad_edge=False, expand=True)
    t.add_column("verdict", no_wrap=True)
    t.add_column("where", ratio=4)
    t.add_column("calls", width=16, overflow="fold")
    t.add_column("why", ratio=7)
    for f in found:
        verdict = Text()
        for i, v in enumerate(verdict_label(f.verdict).split(", ")):
            verdict.append(("\n" if i else "") + v, style=STYLE[v][0])
        t.add_row(verdict, f.where, f.calls, f.why)
    return t


def _site_cell(site: Site, verbose: bool, exposure: list[str]) -> Text:
    where = Text(f"{_module(site)} " if _module(site) else "", style="dim")  # a scanned module
    where.append(site.function, style="bold")
    if site.snapshot == SCAN_SNAPSHOT:
        return where
    if verbose:
        where.append(f"\n{site.file}" + (f" @ {site.snapshot}" if site.snapshot else ""), style="dim")
        if exposure:
            where.append(f"\nexposed for nothing: {' '.join(exposure)}", style="yellow")
    elif site.snapshot:
        where.append(f" @ {short_snapshot(site)}", style="dim")
    return where


def _verdict_groups(checks: list[CallCheck]) -> Text:
    """A site's calls grouped by their verdicts: ``ok: HLT RDMSR ...`` then ``not-kvm: HyperV-hypercall``."""
    groups: dict[str, list[CallCheck]] = {}
    for c in checks:
        groups.setdefault(verdict_label(c.verdict), []).append(c)
    out = Text()
    for i, (label, group) in enumerate(groups.items()):
        worst = max(group[0].verdict.values(), key=VERDICTS.index)
        if i:
            out.append("\n")
        out.append(label, style=STYLE[worst][0])
        out.append(f": {calls_text(group)}")
    return out


#: the sites of one printed table: a guest with more is printed as several tables of the same
#: columns, one after the other, so that a large catalog is never rendered all at once
TABLE_CHUNK = 200


def guest_tables(guest: str, checks: list[CallCheck], verbose: bool = False) -> Iterator[Table]:
    """:func:`guest_table` of at most :data:`TABLE_CHUNK` sites at a time, the columns of the same
    widths (the title and the header on the first only)."""
    mask_width = max((len(f"{c.site.mask:#06x}") for c in checks), default=4)
    return _guest_tables(guest, by_site(checks), verbose, mask_width)


def _guest_tables(
    guest: str, sites: Iterable[tuple[Site, list[CallCheck]]], verbose: bool, mask_width: int
) -> Iterator[Table]:
    """:func:`guest_tables` over the sites as they come, :data:`TABLE_CHUNK` places at a time."""
    chunk: list[CallCheck] = []
    places, first = 0, True
    for _, group in groupby((c for _, checks in sites for c in checks), key=_place_key):
        if places == TABLE_CHUNK:
            yield guest_table(guest, chunk, verbose, first=first, mask_width=mask_width)
            chunk, places, first = [], 0, False
        chunk += group
        places += 1
    if chunk:
        yield guest_table(guest, chunk, verbose, first=first, mask_width=mask_width)


def guest_table(
    guest: str, checks: list[CallCheck], verbose: bool = False, first: bool = True, mask_width: int | None = None
) -> Table:
    """One guest: one row per site (mask, its calls grouped by verdict, what it exposes for
    nothing), or with ``verbose`` one row per call with the details of every case (``first``
    False: a continuation, without the title and the header)."""
    t = Table(
        title=guest if first else None,
        title_justify="left",
        title_style="bold",
        header_style="bold",
        show_header=first,
        expand=True,
        box=box.HEAVY_HEAD if verbose else box.SIMPLE_HEAD,
        show_edge=verbose,
    )
    t.add_column("site", ratio=4 if not verbose else 3, overflow="fold")
    t.add_column("mask", no_wrap=True, min_width=mask_width)
    if verbose:
        t.show_lines = True
        t.add_column("call", no_wrap=True)
        t.add_column("legacy", no_wrap=True)
        t.add_column("hardened", no_wrap=True)
        t.add_column("details", ratio=7)
    else:
        t.add_column("calls, by verdict", ratio=4)
        t.add_column("exposed for nothing", width=25)
    for site, site_checks in by_place(checks):
        exposure = site_exposure(site_checks)
        where = _site_cell(site, verbose, exposure)
        if not verbose:
            t.add_row(where, f"{site.mask:#06x}", _verdict_groups(site_checks), " ".join(exposure))
            continue
        for i, c in enumerate(site_checks):
            t.add_row(
                where if i == 0 else "",
                f"{site.mask:#06x}" if i == 0 else "",
                call_label(c),
                _verdict_text(c.verdict["legacy"]),
                _verdict_text(c.verdict["hardened"]),
                Text("\n".join(detail_lines(c, brief=True, exposure=False))),
            )
    return t


def rich_report(
    results: list[CallCheck], host: Host, policy: str, catalog: str, verbose: bool = False, errors: int = 0
) -> Group:
    """The default output, the answer first: the host, the verdict and the summary, the findings
    (one line each: what fails, where, why), then one compact table per guest (one row per site);
    ``verbose``: one row per call with every case's details instead."""
    return Group(*rich_report_parts(results, host, policy, catalog, verbose, errors))


def rich_report_parts(
    results: list[CallCheck] | Checked,
    host: Host,
    policy: str,
    catalog: str,
    verbose: bool = False,
    errors: int = 0,
) -> Iterator[Any]:
    """:func:`rich_report` one part at a time, for a console to print each as it comes (a large
    catalog's tables are never rendered all at once: :func:`guest_tables`; :class:`Checked`: nor
    are its checks held)."""
    checked = _checked(results)
    parts: list = [
        Text(host_line(host, policy, catalog), style="dim"),
        Text(
            verdict_line(checked, policy, errors),
            style="bold red" if not checked.passes(policy) or errors else "bold green",
        ),
        *policy_lines(checked),
    ]
    found = checked.findings
    if found:
        parts += [Text(f"\nFindings ({len(found)}): calls that do not pass under some policy", style="bold")]
        parts.append(findings_table(found))
    else:
        parts.append(Text("\nNo findings: every call passes under both policies.", style="bold"))
    if not verbose:
        parts.append(Text("Details of every call and case: --verbose, --json, --markdown or --html FILE.", style="dim"))
    parts.append(Text(""))
    yield Group(*parts)
    for i, (guest, width, sites) in enumerate(checked.by_guest()):
        if i:
            yield Text("")
        yield from _guest_tables(guest, sites, verbose, width)


# --- markdown -----------------------------------------------------------------------------------
def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def markdown_report(results: list[CallCheck], host: Host, policy: str, catalog: str, errors: int = 0) -> str:
    """The summary and the findings first, then one table per guest with every call and its details
    (what the terminal shows with ``--verbose``), over-exposure once per site."""
    return "".join(markdown_parts(results, host, policy, catalog, errors))


def markdown_parts(
    results: list[CallCheck] | Checked, host: Host, policy: str, catalog: str, errors: int = 0
) -> Iterator[str]:
    """:func:`markdown_report` a few lines at a time (a large catalog's report is never held whole;
    :class:`Checked`: nor are its checks)."""
    checked = _checked(results)
    out = [
        "# tdvmcall check",
        "",
        host_line(host, policy, catalog) + ".",
        "",
        f"**{verdict_line(checked, policy, errors)}.** {_summary_text(checked.summary())}",
        "",
        "## Findings",
        "",
    ]
    found = checked.findings
    for f in found:
        out.append(f"- **{verdict_label(f.verdict)}**: {_md(f.where)}, {_md(f.calls)}: {_md(f.why)}")
    if not found:
        out.append("Every call passes under both policies.")
    out.append("")
    for guest, _, sites in checked.by_guest():
        out += [f"## {guest}", "", "| site | mask | call | legacy | hardened | details |", "|---|---|---|---|---|---|"]
        for site, site_checks in sites:
            yield "".join(line + "\n" for line in out)
            out = []
            where = f"`{site.function}`" + (
                f" ({site.file}{' @ ' + site.snapshot if site.snapshot else ''})" if site.file else ""
            )
            if exposure := site_exposure(site_checks):
                where += f"<br>exposed for nothing: {' '.join(exposure)}"
            for i, c in enumerate(site_checks):
                first = i == 0
                name = f"{c.call.name} {c.call.qualifier}" if c.call.qualifier else c.call.name
                out.append(
                    f"| {_md(where) if first else ''} | {f'`{site.mask:#06x}`' if first else ''} | "
                    f"{_md(name)} | {c.verdict['legacy']} | {c.verdict['hardened']} | "
                    f"{_md('; '.join(detail_lines(c, exposure=False)))} |"
                )
        out.append("")
    yield "".join(line + "\n" for line in out)


# --- HTML ---------------------------------------------------------------------------------------
def _columns(results: list[CallCheck]) -> list[tuple[str, list[tuple[str, str]]]]:
    """Column groups in leaf-table order: GHCI calls, KVM hypercalls, calls that are not KVM's."""
    present = {c.call.name for c in results}
    ghci = [lf.name for lf in LEAVES if lf.family == "ghci" and lf.name in present]
    hc = [lf.name for lf in LEAVES if lf.family == "kvm-hypercall" and lf.name in present]
    foreign = [n for n in FOREIGN_CALLS if n in present]
    return [
        (label, [(c, short_name(c)) for c in cols])
        for label, cols in (("GHCI calls", ghci), ("KVM hypercalls", hc), ("not KVM", foreign))
        if cols
    ]


def _cell(i: int, c: CallCheck) -> M.Cell:
    tip = f"{c.site.label} · {c.call.name}\nlegacy: {c.verdict['legacy']}\nhardened: {c.verdict['hardened']}\n"
    tip += "\n".join(detail_lines(c))
    return M.Cell(i, dict(c.verdict), tip, result_json(c), c.site.row)


def html_matrix(results: list[CallCheck], host: Host, policy: str, catalog: str, errors: list[str]) -> M.Matrix:
    """The matrix page's content: one group per guest, one row per site, one cell per (site, call)
    (its id = the result's index in ``--json``), the findings (:func:`findings`) below."""
    index = {id(c): i for i, c in enumerate(results)}
    groups = []
    for guest, checks in by_guest(results):
        rows = []
        for site, site_checks in by_site(checks):
            where = site.file + (f" @ {site.snapshot}" if site.snapshot else "")
            cells = {c.call.name: _cell(index[id(c)], c) for c in site_checks}
            rows.append(M.Row(site.function, f"{site.mask:#06x}", where, site.row, cells))
        groups.append(M.Group(guest, rows))
    found = [
        M.Finding(
            f.site.row,
            f.site.label if len(f.sites) <= 1 else f.where,
            f"{f.site.mask:#06x}",
            f.calls,
            f.verdict,
            f.details,
        )
        for f in findings(results)
    ]
    return M.Matrix(
        title="tdvmcall check",
        heading="tdvmcall check: guests' TDVMCALL masks against a host",
        host=host_line(host, policy, catalog),
        summary=summary_line(results),
        styles=STYLE,
        columns=_columns(results),
        groups=groups,
        findings=found,
        errors=errors,
    )


def html_report(results: list[CallCheck], host: Host, policy: str, catalog: str, errors: list[str]) -> str:
    """One self-contained page (``html_matrix.py``): the matrix of call sites x calls, each cell
    split into the legacy and the hardened verdict; hover a cell for its details, click it to pin
    them in the side panel (or open ``page.html#show=<N>``, N = the result's index in ``--json``)."""
    return M.render(html_matrix(results, host, policy, catalog, errors))


__all__ = [
    "STYLE",
    "Finding",
    "detail_lines",
    "findings",
    "guest_table",
    "html_report",
    "markdown_report",
    "report_json",
    "result_json",
    "rich_report",
    "short_name",
    "summary_line",
    "write_report_json",
]

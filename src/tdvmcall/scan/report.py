"""Renderers of ``tdvmcall scan`` results: JSON (a public format, docs/scan.md), a rich table per
image grouped by module with the findings first, catalog CSV rows, and the matrix page of
``html_matrix.py`` (sites x calls, as ``check --html`` draws it).
They only present :class:`~.analyze.Site` values; every judgement was made in ``judge.py``."""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from .. import html_matrix as M
from ..abi.regs import fmt_mask, names_in
from ..console import VERDICT_STYLE
from ..judge import (
    CASE_WORDS,
    HARDENED_REFUSES,
    INPUT_QUALIFIERS,
    LEGACY_SILENT,
    MODULE_REJECTS,
    NOT_KVM,
    OK,
    POSITIONAL_INPUTS,
    Host,
    catalog_word,
    exposed_xmms,
    short_name,
)
from ..kvm import leaves as L
from .analyze import Image, Site
from .flow import Value

#: 2: ``passes`` is false when a call was not judged (unless --allow-unresolved); ``allow_unresolved``,
#: ``exit_status`` and ``not_judged`` added (docs/scan.md)
JSON_SCHEMA = 2
UNRESOLVED = "unresolved"
NOT_TDVMCALL = "not-tdvmcall"

#: worst first: the order findings are listed in
ORDER = (MODULE_REJECTS, HARDENED_REFUSES, LEGACY_SILENT, UNRESOLVED, NOT_KVM, OK, NOT_TDVMCALL)
#: the judge's verdict styles (as check draws them), and scan's two states that are not verdicts
STYLE = {
    **VERDICT_STYLE,
    UNRESOLVED: ("magenta", "#e6d5f5", "#4a148c", "a value the call is made with could not be recovered"),
    NOT_TDVMCALL: ("cyan", "#d7eef5", "#004d5a", "a TDCALL leaf other than TDG.VP.VMCALL: not judged"),
}
#: the order verdict counts are listed in: best to worst, then what was not judged
COUNT_ORDER = (OK, NOT_KVM, LEGACY_SILENT, HARDENED_REFUSES, MODULE_REJECTS, UNRESOLVED, NOT_TDVMCALL)
SHOWN = ("rax", "rcx", "r10", "r11", "r12", "r13")


def hx(v: int | None) -> str | None:
    return None if v is None else f"{v:#x}"


#: chain parts that are FFS sections wrapping a file's image, not the file (containers.py)
_SECTION_WRAPPERS = ("lzma", "tiano", "efi-compressed")


def module_of(site: Site) -> str:
    """The module a site is in: the FFS file's name for firmware (the part before ``pe32``/``te``),
    else the container chain inside the input."""
    inner = site.container[1:]
    for i, part in enumerate(inner):
        if part in ("pe32", "te"):
            # the file's name comes before its compression sections (``SitesDxe > lzma > pe32``)
            names = [p for p in inner[:i] if p not in _SECTION_WRAPPERS]
            if names:
                return names[-1]
    parts = [p for p in inner[:-1] if p != "raw"]  # the last part is the section (or "raw")
    return " > ".join(parts) or site.container[0].rsplit("/", 1)[-1]


def severity(site: Site, policy: str) -> int:
    worst = min(ORDER.index(site.verdict("hardened")), ORDER.index(site.verdict("legacy")))
    return worst if policy == "hardened" else ORDER.index(site.verdict(policy))


# --- JSON --------------------------------------------------------------------------------------------
def site_json(site: Site) -> dict:
    m = site.module
    j = site.judgement
    return {
        "input": site.input,
        "container": site.container,
        "offset": hx(site.address),
        "symbol": site.symbol,
        "symbol_readable": site.label,
        "via": site.via,
        "via_readable": site.via_label,
        "tdcall_leaf": site.tdcall_leaf,
        "rax": hx(site.rax),
        "mask": hx(site.mask),
        "mask_gprs": fmt_mask(site.mask, 16) if site.mask is not None else None,
        "r10": hx(site.regs["r10"].value) if site.is_vmcall else None,
        "r11": hx(site.regs["r11"].value) if site.is_vmcall else None,
        "inputs": {r: hx(v) for r, v in site.pinned().items()},
        "call": site.call_name,
        "how": {r: site.regs[r].how for r in SHOWN},
        "module": None if m is None else {"accepted": m.accepted, "status": hx(m.status)},
        "verdict": {"legacy": site.verdict("legacy"), "hardened": site.verdict("hardened")},
        "serves": site.serves if j is None and m is not None and m.accepted else None,
        "fails": site.fails if j is None and m is not None and m.accepted else None,
        "details": site.details(),
    }


def totals(images: list[Image]) -> dict[str, int]:
    out: Counter[str] = Counter()
    for img in images:
        out.update(img.summary())
    out["inputs"] = len(images)
    out["inputs_with_errors"] = sum(1 for i in images if i.problems)
    return dict(out)


def report_json(images: list[Image], host: Host, policy: str, allow_unresolved: bool = False) -> dict:
    o = outcome(images, policy, allow_unresolved)
    return {
        "schema": JSON_SCHEMA,
        "host": host.json(),
        "policy": policy,
        "allow_unresolved": allow_unresolved,
        "passes": o.passes,
        "exit_status": o.exit_status,
        "not_judged": len(o.unresolved),
        "inputs": [
            {
                "path": img.path,
                "containers": img.kinds,
                "code_bytes": img.bytes_code,
                "errors": img.problems,
                "skipped": img.skipped,
                "summary": img.summary(),
            }
            for img in images
        ],
        "sites": [site_json(s) for img in images for s in img.sites],
        "summary": totals(images),
    }


# --- rich ----------------------------------------------------------------------------------------------
def _val(v: Value | None) -> str:
    if v is None or v.value is None:
        return "?"
    return f"{v.value:#x}"


def _call_text(s: Site) -> str:
    if not s.is_vmcall:
        return s.tdcall_leaf if s.rax is not None else "TDCALL leaf unresolved"
    return catalog_call(s) or s.call_name


def short_how(v: Value) -> str:
    """The first step of how a value was found, without addresses: ``immediate``, ``copy of rcx``,
    ``loaded from memory [rsi+0x0]``."""
    how = v.how.split(";")[0]
    how = how.split(" at 0x")[0].split(" (")[0]
    if "caller at" in v.how:
        how = (how + " ← caller") if not how.startswith("caller at") else "caller"
    return how


def _worst(sites: list[Site], policy: str) -> str:
    return min((s.verdict(policy) for s in sites), key=ORDER.index)


def _site_groups(img: Image, policy: str) -> list[list[Site]]:
    """One group per TDCALL instruction (its resolved calls together), the worst first."""
    groups: dict[tuple, list[Site]] = {}
    for s in img.sites:
        groups.setdefault((tuple(s.container), s.address), []).append(s)
    out = list(groups.values())
    out.sort(key=lambda g: (min(severity(s, policy) for s in g), module_of(g[0]), g[0].address))
    return out


def _masks(sites: list[Site]) -> list[str]:
    return sorted({_val(s.regs["rcx"]) if s.is_vmcall else "-" for s in sites})


def _count(n: int, what: str, plural: str | None = None) -> str:
    return f"{n} {what if n == 1 else plural or what + 's'}"


def calls_text(sites: list[Site], limit: int = 0, total: bool = False) -> str:
    """The calls made through some sites, with how many callers make each, the most frequent first
    (a call's directions together): ``HLT ×248, IO in ×120, IO out ×91, MMIO read ×70``; past
    ``limit`` (if any) the rest as ``… (3 more)``; ``total``: how many calls first (``626: HLT ×248, …``)."""
    counts = Counter(_call_text(s) for s in sites).most_common()
    family: Counter[str] = Counter()
    for c, n in counts:
        family[c.split()[0]] += n
    counts.sort(key=lambda cn: -family[cn[0].split()[0]])  # stable: a family's calls together, most first
    words = [f"{c} ×{n}" if n > 1 else c for c, n in counts]
    if limit and len(words) > limit:
        words = [*words[:limit], f"… ({len(words) - limit} more)"]
    return (f"{len(sites)}: " if total and len(counts) > 1 else "") + ", ".join(words)


@dataclass
class Row:
    """TDCALL instructions of one image that are the same code (byte for byte from the function's
    start to the TDCALL, :attr:`Site.code`) with the same masks and worst verdicts: the same stub
    linked into many modules is one row.  ``sites`` are every resolved call (one per caller)."""

    sites: list[Site]

    @property
    def locations(self) -> list[Site]:
        """One site per TDCALL instruction in the row."""
        seen: dict[tuple, Site] = {}
        for s in self.sites:
            seen.setdefault((tuple(s.container), s.address), s)
        return list(seen.values())

    @property
    def modules(self) -> list[str]:
        return list(dict.fromkeys(module_of(s) for s in self.sites))

    def verdict(self, policy: str) -> str:
        return _worst(self.sites, policy)

    def where(self, module: bool = True) -> str:
        """``AtaBusDxe sub_3bf0+0x40``, or for identical code in several places ``36 modules (37 copies
        of the same code, TDCALL at +0x40)`` (``module=False``: an image of one module, not named)."""
        locs = self.locations
        s0 = locs[0]
        if len(locs) == 1:
            return f"{module_of(s0)} {s0.label}" if module else s0.label
        offset = f"TDCALL at +{s0.address - s0.function_start:#x}"
        names = {s.function for s in locs}
        what = s0.label if len(names) == 1 else offset
        if len(self.modules) == 1:
            return f"{self.modules[0] + ' ' if module else ''}{what} ×{len(locs)}"
        copies = f"{len(locs)} copies of the same code" if len(locs) > len(self.modules) else "the same code"
        return f"{_count(len(self.modules), 'module')} ({copies}, {what})"

    def module_cell(self) -> str:
        mods = self.modules
        return mods[0] if len(mods) == 1 else _count(len(mods), "module")

    def site_cell(self) -> str:
        locs = self.locations
        s0 = locs[0]
        if len(locs) == 1:
            return s0.label
        if len({s.function for s in locs}) == 1:
            return f"{s0.label} ×{len(locs)}"
        return f"{len(locs)} copies, +{s0.address - s0.function_start:#x}"

    def exposed_for_nothing(self) -> list[str]:
        """The GPRs every judged call of the row is exposed for and none uses, then the XMMs."""
        judged = [s.judgement for s in self.sites if s.judgement is not None]
        if not judged:
            return []
        common = set.intersection(*(set(j.unused) for j in judged))
        xmms = set.intersection(*(set(exposed_xmms(j.mask)) for j in judged))
        order = [*judged[0].unused, *exposed_xmms(judged[0].mask)]
        return [r for r in order if r in common or r in xmms]


def regs_text(names: list[str]) -> str:
    """Register names, runs of numbered ones shortened: ``rdx rbx r8 r9 r13-r15 xmm0-15``."""
    out: list[str] = []
    run: list[tuple[str, int]] = []

    def flush() -> None:
        if len(run) > 2:
            out.append(f"{run[0][0]}{run[0][1]}-{run[-1][1] if run[0][0] == 'xmm' else run[-1][0] + str(run[-1][1])}")
        else:
            out.extend(f"{p}{n}" for p, n in run)
        run.clear()

    for name in names:
        prefix, num = name.rstrip("0123456789"), name[len(name.rstrip("0123456789")) :]
        if num and run and run[-1][0] == prefix and run[-1][1] + 1 == int(num):
            run.append((prefix, int(num)))
            continue
        flush()
        if num:
            run.append((prefix, int(num)))
        else:
            out.append(name)
    flush()
    return " ".join(out)


def rows(img: Image, policy: str) -> list[Row]:
    """The compact table's rows: TDCALL instructions collapsed when their code, masks and worst
    verdicts are the same; the worst first, then the most widespread."""
    groups: dict[tuple, list[Site]] = {}
    for g in _site_groups(img, policy):
        s0 = g[0]
        code = s0.code if s0.code is not None else (tuple(s0.container), s0.address)
        key = (code, s0.address - s0.function_start, tuple(_masks(g)), _worst(g, "legacy"), _worst(g, "hardened"))
        groups.setdefault(key, []).extend(g)
    out = [Row(sites) for sites in groups.values()]
    out.sort(key=lambda r: (min(severity(s, policy) for s in r.sites), -len(r.locations), r.where()))
    return out


def _judged(s: Site) -> bool:
    return not s.passes("hardened") or not s.passes("legacy") or s.verdict("hardened") == UNRESOLVED


@dataclass
class Finding:
    """Calls of one row that fail under some policy, or could not be judged, for the same reason."""

    row: Row
    sites: list[Site]
    verdict: dict[str, str]
    why: list[str]


def unresolved_why(s: Site) -> str:
    """Why a call was not judged, in one line: the registers not recovered (the first step of how
    each was looked for), and what is known without them."""
    regs = ("rcx", "r10", "r11") if s.is_vmcall else ("rax",)
    hows = "; ".join(f"{r}: {short_how(s.regs[r])}" for r in regs if not s.regs[r].known)
    if not s.is_vmcall:
        return f"TDCALL leaf not recovered ({hows})"
    if s.foreign is not None:
        return f"mask not recovered ({hows}); {s.foreign[0]}: not KVM's, only the module's check applies"
    if s.mask is None and s.leaf is not None:
        need = L.minimal_mask(s.leaf, s.pinned())
        return (
            f"mask not recovered ({hows}); {_call_text(s)} needs at least {need:#06x} ({regs_text(names_in(need, 16))})"
        )
    if s.mask is not None:
        if not s.fails:
            return f"call not recovered ({hows}); whichever KVM call it is, the mask passes under hardened"
        of = f"{len(s.fails)} of KVM's {len(s.serves) + len(s.fails)} calls"
        return f"call not recovered ({hows}); under hardened the mask fails {of}: {' '.join(s.fails)}"
    return f"mask and call not recovered ({hows})"


def findings(table: list[Row]) -> list[Finding]:
    """Every call that does not pass under some policy, or whose mask or call was not recovered,
    grouped per row by verdicts and reason, the worst first."""
    out: list[Finding] = []
    for row in table:
        groups: dict[tuple, Finding] = {}
        for s in row.sites:
            if not _judged(s):
                continue
            why = [unresolved_why(s)] if s.verdict("hardened") == UNRESOLVED else list(dict.fromkeys(s.reasons()))
            key = (s.verdict("legacy"), s.verdict("hardened"), tuple(why))
            if key not in groups:
                groups[key] = Finding(row, [], {p: s.verdict(p) for p in ("legacy", "hardened")}, why)
            groups[key].sites.append(s)
        out += groups.values()
    return sorted(out, key=lambda f: min(ORDER.index(v) for v in f.verdict.values()))


def _verdicts(verdict: dict[str, str]) -> Text:
    """Both policies' verdicts, the hardened first; one word when they agree, ``ok`` left out."""
    words = list(dict.fromkeys(verdict[p] for p in ("hardened", "legacy")))
    if len(words) > 1 and OK in words:
        words.remove(OK)
    out = Text()
    for i, v in enumerate(words):
        out.append(("\n" if i else "") + v, style=STYLE[v][0])
    return out


@dataclass
class Outcome:
    """The answer of a scan under ``policy``, from which the exit status, the verdict line, JSON's
    ``passes`` and the HTML summary are all drawn: a call whose mask or call was not recovered is
    not a pass (exit 1, as a failure) unless ``allow_unresolved``; a broken input, or one holding no
    code, is exit 2."""

    policy: str
    allow_unresolved: bool
    inputs: int
    broken: int  # inputs with a problem line (unreadable, broken, or no code)
    calls: list[Site]  # TDVMCALLs, one per caller, and TDCALLs whose leaf was not recovered
    bad: list[Site]  # judged and not passing under ``policy``
    unresolved: list[Site]  # not judged: the mask, the call or the TDCALL leaf not recovered

    @property
    def exit_status(self) -> int:
        if self.broken:
            return 2
        return 1 if self.bad or (self.unresolved and not self.allow_unresolved) else 0

    @property
    def passes(self) -> bool:
        return self.exit_status == 0


def outcome(images: list[Image], policy: str, allow_unresolved: bool = False) -> Outcome:
    calls = [s for img in images for s in img.sites if s.counted]
    unresolved = [s for s in calls if s.verdict(policy) == UNRESOLVED]
    bad = [s for s in calls if not s.passes(policy) and s.verdict(policy) != UNRESOLVED]
    broken = sum(1 for img in images if img.problems)
    return Outcome(policy, allow_unresolved, len(images), broken, calls, bad, unresolved)


def _answer(o: Outcome) -> str:
    """The calls' part of the verdict: ``3 of 12 calls do not pass, 1 not judged``."""
    n, bad, unres = len(o.calls), len(o.bad), len(o.unresolved)
    good = n - bad - unres
    if not n:
        return "no TDVMCALL found"
    parts = []
    if bad:
        parts.append(f"{bad} of {_count(n, 'call')} do not pass")
    if unres:
        parts.append(f"{unres}{'' if bad else ' of ' + _count(n, 'call')} not judged (a value not recovered)")
    if not parts:
        return f"{'the' if n == 1 else 'all'} {_count(n, 'call')} pass"
    if good:
        parts.append(f"{good} pass")
    return ", ".join(parts)


def verdict_line(images: list[Image], policy: str, allow_unresolved: bool = False) -> Text:
    """The answer: ``FAIL under --policy hardened: 634 of 634 calls do not pass (exit 1)``; a call
    not judged is not a pass (``FAIL …: 4 of 14 calls not judged …``) unless --allow-unresolved; with
    a broken input, ``ERROR: ...`` first (exit 2), never a PASS for the others."""
    o = outcome(images, policy, allow_unresolved)
    answer = _answer(o)
    if o.broken:
        if o.broken == o.inputs:
            what = "the input is" if o.inputs == 1 else f"all {o.inputs} inputs are"
            return Text(
                f"ERROR: {what} broken, unreadable or without code (named on stderr): nothing judged (exit 2)",
                style="bold red",
            )
        others = o.inputs - o.broken
        return Text(
            f"ERROR: {o.broken} of {o.inputs} inputs broken, unreadable or without code (named on stderr); "
            f"in the {_count(others, 'other')}: {answer} (exit 2)",
            style="bold red",
        )
    if o.exit_status:
        return Text(f"FAIL under --policy {policy}: {answer} (exit 1)", style="bold red")
    allowed = " (allowed by --allow-unresolved)" if o.unresolved else ""
    return Text(f"PASS under --policy {policy}: {answer}{allowed} (exit 0)", style="bold green")


def _image_summary(img: Image) -> list[Text]:
    """What the image holds: TDCALL sites (in how many modules), the TDVMCALLs, their calls and
    masks, the other TDCALLs; then the verdict counts over calls, per policy."""
    vm = [s for s in img.sites if s.is_vmcall]
    other = [s for s in img.sites if not s.is_vmcall]
    locs = {(tuple(s.container), s.address) for s in img.sites}
    vm_locs = {(tuple(s.container), s.address) for s in vm}
    modules = list(dict.fromkeys(module_of(s) for s in img.sites))
    where = f" in {len(modules)} modules" if len(modules) > 1 else ""
    if len(modules) == 1 and modules[0] != img.path.rsplit("/", 1)[-1]:
        where = f" in {modules[0]}"
    n_other = len(locs) - len(vm_locs)
    line = f"{_count(len(locs), 'TDCALL site')}{where}: {len(vm_locs)} TDVMCALL"
    line += f" ({_count(len(vm), 'call')}, one per caller)" if vm else ""
    lines = [Text(f"  {'sites:':<10}{line}{f', {n_other} other' if n_other else ''}")]
    if vm:
        masks = sorted({s.mask for s in vm if s.mask is not None})
        lines.append(Text(f"  {'masks:':<10}{' '.join(f'{m:#x}' for m in masks) or 'none recovered'}"))
    if other:
        lines.append(Text(f"  {'other:':<10}{calls_text(other, limit=5)}"))
    for p in ("hardened", "legacy"):  # the calls the answer counts: TDVMCALLs and TDCALLs of unknown leaf
        counts = Counter(s.verdict(p) for s in img.sites if s.counted)
        if not counts:
            continue
        text = Text(f"  {p + ':':<10}")
        for k, v in enumerate(sorted(counts, key=COUNT_ORDER.index)):
            text.append(", " if k else "")
            text.append(f"{counts[v]} {v}", style=STYLE[v][0])
        lines.append(text)
    return lines


def findings_table(found: list[Finding], module: bool = True) -> Table:
    """One row per finding: the verdicts, where (module, site, or how many modules carry the same
    code), the mask, the calls (how many callers make each), why."""
    t = Table(box=None, header_style="bold", pad_edge=False, expand=True)
    t.add_column("verdict", no_wrap=True)
    t.add_column("where", ratio=4)
    t.add_column("mask", no_wrap=True)
    t.add_column("calls", ratio=4)
    t.add_column("why", ratio=7)
    for f in found:
        t.add_row(
            _verdicts(f.verdict),
            Text(f.row.where(module)),
            Text(" ".join(_masks(f.sites))),
            Text(calls_text(f.sites, 4, total=True)),
            Text("\n".join(f.why)),
        )
    return t


def compact_table(table: list[Row], module: bool = True) -> Table:
    """One row per site, identical sites collapsed (how many modules carry it): mask, calls, the
    worst verdicts (hardened first; one word when both policies agree, ``ok`` only when both are),
    and what the mask exposes for nothing (``module=False``: an image of one module)."""
    exposure = any(r.exposed_for_nothing() for r in table)
    t = Table(box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False, expand=True, show_edge=False)
    if module:
        t.add_column("module", max_width=28, overflow="fold")
    t.add_column("site", max_width=40, overflow="fold")
    t.add_column("mask", no_wrap=True)
    t.add_column("calls (× callers)", ratio=1, min_width=17, overflow="fold")
    t.add_column("verdicts", no_wrap=True)
    if exposure:
        t.add_column("exposed for nothing", max_width=30)
    for r in table:
        cells = [Text(r.module_cell())] if module else []
        cells += [
            Text(r.site_cell()),
            Text(" ".join(_masks(r.sites))),
            Text(calls_text(r.sites)),
            _verdicts({p: r.verdict(p) for p in ("legacy", "hardened")}),
        ]
        if exposure:
            cells.append(Text(regs_text(r.exposed_for_nothing()), style="yellow"))
        t.add_row(*cells)
    return t


def site_table(img: Image, policy: str, module: bool = True) -> Table:
    """``--verbose``: one row per TDCALL instruction: its calls, masks and worst verdicts, how each
    register was found, and the reasons and notes of its calls (each once), with the registers every
    call there is exposed for and none uses."""
    t = Table(box=box.HEAVY_HEAD, header_style="bold", show_lines=True, expand=True)
    if module:
        t.add_column("module", max_width=24, overflow="fold")
    t.add_column("site", max_width=40, overflow="fold")
    t.add_column("calls (× callers)", ratio=3, overflow="fold")
    t.add_column("mask", no_wrap=True)
    t.add_column("verdicts", no_wrap=True)
    t.add_column("how found / findings", ratio=7)
    for g in _site_groups(img, policy):
        s0 = g[0]
        how = []
        for r in ("rax", "rcx", "r10", "r11") if s0.is_vmcall else ("rax",):
            hows = sorted({short_how(s.regs[r]) for s in g})
            how.append(f"{r}: {' | '.join(hows)}")
        lines: list[str] = []
        for s in g:
            notes = s.judgement.call_notes if s.judgement is not None else []
            for d in s.reasons() + (s.unresolved() if s.verdict("hardened") == UNRESOLVED else []) + notes:
                if d not in lines:
                    lines.append(d)
        if nothing := Row(g).exposed_for_nothing():
            lines.append(f"exposed for nothing: {regs_text(nothing)}")
        cells = [Text(module_of(s0))] if module else []
        t.add_row(
            *cells,
            Text(s0.label),
            Text(calls_text(g)),
            Text(" ".join(_masks(g))),
            _verdicts({p: _worst(g, p) for p in ("legacy", "hardened")}),
            Text("; ".join(how) + ("\n" + "\n".join(lines) if lines else "")),
        )
    return t


def image_renderable(img: Image, policy: str, verbose: bool = False) -> Group:
    """One image: its summary, its findings, then the compact table (``verbose``: one row per
    TDCALL instruction with how its registers were found instead)."""
    parts: list = [Text("\n" + img.path, style="bold")]
    for line in img.problems:
        parts.append(Text(f"  error: {line}", style="bold red"))
    for line in img.skipped:
        parts.append(Text(f"  skipped: {line}", style="dim"))
    if img.not_code:
        parts.append(
            Text(
                f"  {img.not_code} TDCALL byte match(es) not decoded as code (in a raw blob: from no function start "
                "it can show): not reported",
                style="dim",
            )
        )
    if not img.sites:
        parts.append(Text("  no TDCALL found" + (" in what could be read" if img.problems else ""), style="dim"))
        return Group(*parts)
    parts += _image_summary(img)
    table = rows(img, policy)
    found = findings(table)
    module = len({module_of(s) for s in img.sites}) > 1
    if found:
        n = len(found)
        parts.append(Text(f"Findings ({n}): calls that do not pass under some policy, or not judged", style="bold"))
        parts.append(findings_table(found, module))
    else:
        parts.append(Text("No findings: every call passes under both policies.", style="bold"))
    parts.append(site_table(img, policy, module) if verbose else compact_table(table, module))
    return Group(*parts)


def not_judged_line(unresolved: list[Site], allow_unresolved: bool) -> Text:
    """How many calls were not judged, where (up to four places: the outermost caller followed,
    else the site, and
    the registers not recovered there) and what that means for the exit status."""
    places: dict[str, set[str]] = {}
    for s in unresolved:
        regs = ("rcx", "r10", "r11") if s.is_vmcall else ("rax",)
        place = s.via_label.split(" ← ")[-1] if s.via_label else s.label  # the outermost caller followed
        places.setdefault(place, set()).update(r for r in regs if not s.regs[r].known)
    where = [f"{p} ({' '.join(sorted(r, key=SHOWN.index))})" for p, r in list(places.items())[:4]]
    if len(places) > 4:
        where.append(f"… ({len(places) - 4} more)")
    n = len(unresolved)
    then = "passed by --allow-unresolved" if allow_unresolved else "not a pass (exit 1) unless --allow-unresolved"
    return Text(
        f"Not judged: {_count(n, 'call')}, {then}; a register not recovered in {', '.join(where)} "
        "(why: the 'unresolved' findings).",
        style="magenta",
    )


def _rbp_text(host: Host) -> str:
    """The TD's RBP attribute on the host line; a 1.0 module has no NO_RBP_MOD (``Host.has_no_rbp_mod``)."""
    if host.has_no_rbp_mod:
        return "NO_RBP_MOD"
    return "RBP_MOD allowed" if not host.no_rbp_mod else "which has no NO_RBP_MOD and does not check RBP"


def rich_report(
    images: list[Image], host: Host, policy: str, verbose: bool = False, allow_unresolved: bool = False
) -> Group:
    """The default output, the answer first: the host, the verdict, then per image its summary,
    its findings (one line each: what fails, where, why) and a compact table (identical sites
    collapsed); ``verbose``: one row per TDCALL instruction with how each value was found."""
    rbp = _rbp_text(host)
    head = Text(
        f"tdvmcall scan: {_count(len(images), 'input')} against TDX module {host.module} ({rbp}), "
        f"KVM {host.tree}; exit status follows --policy {policy}",
        style="dim",
    )
    parts: list = [head, verdict_line(images, policy, allow_unresolved)]
    if unresolved := outcome(images, policy).unresolved:
        parts.append(not_judged_line(unresolved, allow_unresolved))
    if not verbose and any(img.sites for img in images):
        parts.append(
            Text("How each register was found, per site: --verbose; every call: --json or --html FILE.", style="dim")
        )
    # files of a directory that hold no code (documentation, data): one line, not a block each
    codeless = [i for i in images if not i.bytes_code and not i.sites and not i.problems]
    if codeless and len(codeless) < len(images):
        names = [i.path.rsplit("/", 1)[-1] for i in codeless]
        listed = ", ".join(names[:5]) + (f", … ({len(names) - 5} more)" if len(names) > 5 else "")
        parts.append(
            Text(
                f"{_count(len(codeless), 'file')} of the directories scanned "
                f"{'holds' if len(codeless) == 1 else 'hold'} no code scan recognises, "
                f"not scanned: {listed} (each said in --json's inputs[].skipped).",
                style="dim",
            )
        )
    else:
        codeless = []
    hidden = {id(i) for i in codeless}
    shown = [i for i in images if id(i) not in hidden]
    return Group(*parts, *(image_renderable(i, policy, verbose) for i in shown))


# --- catalog CSV ---------------------------------------------------------------------------------------
CATALOG_COLUMNS = ("guest", "snapshot", "file", "function", "mask_hex", "tdvmcalls", "note")


def catalog_call(site: Site) -> str | None:
    """The site's call in the catalog grammar (docs/check.md; its words are the model's,
    ``judge.CALL_WORDS``, ``CASE_WORDS``, ``POSITIONAL_INPUTS``, ``INPUT_QUALIFIERS``), with the
    direction or input pinned when the scan knows it: ``IO in``, ``MMIO write``, ``RDMSR 0x1b``,
    ``CPUID leaf 0xb``.  None for a call the catalog cannot name (unknown GHCI leaf or hypercall number)."""
    leaf = site.leaf
    if leaf is None or leaf.name.startswith("unknown(") or leaf.name == "KVMHypercall":
        return None
    name = catalog_word(leaf.name)
    pins = site.pinned()
    if leaf.name in CASE_WORDS and "r13" in pins:  # the direction: R13 = 0 the first case, 1 the second
        direction = pins["r13"] & 0xFFFFFFFF if leaf.name == "#VE.RequestMMIO" else pins["r13"]
        words = list(CASE_WORDS[leaf.name])
        if direction in (0, 1):
            return f"{name} {words[direction]}"
    if (reg := POSITIONAL_INPUTS.get(leaf.name)) in pins:
        return f"{name} {pins[reg]:#x}"
    for word, reg in INPUT_QUALIFIERS.get(leaf.name, {}).items():
        if reg == "r12" and reg in pins:
            if leaf.name == "ReportFatalError" and pins[reg] >> 63 & 1:
                break  # a report with a GPA: the qualifier means one without
            return f"{name} {word} {pins[reg]:#x}"
    return name


def catalog_csv(images: Iterable[Image]) -> tuple[str, Counter[str]]:
    """Catalog rows for every site whose mask and call are both known: identical sites (same image,
    module, function, mask and call) collapse into one row, the count in the note.  Returns the CSV
    text and the TDVMCALLs that could not be written, counted by why: ``unresolved`` (mask or call
    not recovered), else the call the catalog grammar has no word for (``VMware-hypercall``,
    ``KVMHypercall``: an unknown hypercall number, ``unknown(0x…)``)."""
    rows: dict[tuple[str, str, str, int, str], list[Site]] = {}
    left_out: Counter[str] = Counter()
    for img in images:
        for s in img.sites:
            if not s.is_vmcall:
                continue
            call = catalog_call(s)
            if s.mask is None or (call is None and s.leaf is None and s.foreign is None):
                left_out[UNRESOLVED] += 1
                continue
            if call is None:
                left_out[s.call_name] += 1
                continue
            key = (img.path, module_of(s), s.label, s.mask, call)
            rows.setdefault(key, []).append(s)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CATALOG_COLUMNS)
    for (path, module, function, mask, call), sites in rows.items():
        n = len(sites)
        vias = sorted({v for s in sites if (v := s.via_label)})
        note = f"found by tdvmcall scan: {n} call site{'s' if n != 1 else ''}"
        if vias:
            note += f" (callers {', '.join(vias[:6])}{', ...' if len(vias) > 6 else ''})"
        w.writerow((path.rsplit("/", 1)[-1], "scan", module, function, f"0x{mask:X}", call, note))
    return buf.getvalue(), left_out


def left_out_text(left_out: Counter[str]) -> str:
    """``5 calls left out: 4 with an unresolved mask or call, 1 the catalog has no word for
    (VMware-hypercall)``; empty when none."""
    if not left_out:
        return ""
    parts = []
    if n := left_out.get(UNRESOLVED, 0):
        parts.append(f"{n} with an unresolved mask or call")
    named = {k: v for k, v in left_out.items() if k != UNRESOLVED}
    if named:
        parts.append(f"{sum(named.values())} the catalog has no word for ({', '.join(sorted(named))})")
    return f"{_count(sum(left_out.values()), 'call')} left out: {', '.join(parts)}"


# --- HTML ------------------------------------------------------------------------------------------------
UNRESOLVED_CALL = "call unresolved"
UNRESOLVED_LEAF = "TDCALL leaf unresolved"


def column_of(s: Site) -> str:
    """The matrix column a site's call falls in: its leaf's name (``Instruction.IO``), ``call
    unresolved``, or the TDCALL leaf of a site that is not a TDVMCALL."""
    if not s.is_vmcall:
        return s.tdcall_leaf if s.rax is not None else UNRESOLVED_LEAF
    if s.foreign is not None:
        return s.foreign[0]
    return s.leaf.name if s.leaf is not None else UNRESOLVED_CALL


def _columns(sites: list[Site]) -> list[tuple[str, list[tuple[str, str]]]]:
    """Column groups: GHCI calls and KVM hypercalls in leaf-table order, then the TDVMCALLs whose
    call is unknown or unresolved, then the other TDCALL leaves (not judged)."""
    present = list(dict.fromkeys(column_of(s) for s in sites))
    ghci = [lf.name for lf in L.LEAVES if lf.family == "ghci" and lf.name in present]
    hc = [lf.name for lf in L.LEAVES if lf.family == "kvm-hypercall" and lf.name in present]
    vm = {column_of(s) for s in sites if s.is_vmcall}
    foreign = sorted({s.foreign[0] for s in sites if s.foreign is not None})
    other = sorted(c for c in present if c in vm and c not in ghci and c not in hc and c not in foreign)
    tdcall = sorted(c for c in present if c not in vm)
    groups = (
        ("GHCI calls", ghci),
        ("KVM hypercalls", hc),
        ("not KVM's", foreign),
        ("unknown call", other),
        ("other TDCALL", tdcall),
    )
    return [(label, [(c, short_name(c)) for c in cols]) for label, cols in groups if cols]


def _why(s: Site) -> list[str]:
    """A call's details, with why it was not judged when it was not."""
    return [unresolved_why(s)] if s.verdict("hardened") == UNRESOLVED else s.details()


def _cell(sites: list[Site], key: str, row: Row, where: str, ident: int, number: int, image: str) -> M.Cell:
    verdict = {p: _worst(sites, p) for p in ("legacy", "hardened")}
    details = list(dict.fromkeys(d for s in sites for d in _why(s)))
    written = calls_text(sites)
    tip = f"{where} · {written}\nlegacy: {verdict['legacy']}\nhardened: {verdict['hardened']}\n" + "\n".join(details)
    masks = {s.mask for s in sites}
    mask = masks.pop() if len(masks) == 1 else None
    loc = row.locations[0]
    more = len(row.locations) - 1
    judged = [s.judgement for s in sites if s.judgement is not None]
    panel = {
        "guest": image,
        "function": where,
        "mask": " ".join(_masks(sites)),
        "gprs": names_in(mask, 16) if mask is not None else [],
        "xmms": exposed_xmms(mask) if mask is not None else [],
        "file": " > ".join(loc.container) + (f" (and {_count(more, 'other copy', 'other copies')})" if more else ""),
        "snapshot": "",
        "call": key,
        "written": written,
        "verdict": verdict,
        "details": details,
        "cases": list(dict.fromkeys(r.case for j in judged for r in j.runs)),
    }
    return M.Cell(ident, verdict, tip, panel, number)


def summary_facts(images: list[Image], policy: str, allow_unresolved: bool = False) -> list[str]:
    """The HTML summary in words, one line each: what was found, the verdicts per policy, what
    was not judged, and what was not read."""
    o = outcome(images, policy, allow_unresolved)
    sites = [s for img in images for s in img.sites]
    locs = {(tuple(s.container), s.address) for s in sites}
    vm = {(tuple(s.container), s.address) for s in sites if s.is_vmcall}
    line = f"{_count(len(locs), 'TDCALL site')} in {_count(len(images), 'input')}"
    if locs:
        line += f": {_count(len(vm), 'TDVMCALL site')}"
        if vm:
            line += f" ({_count(sum(1 for s in sites if s.is_vmcall), 'call')}, one per caller)"
        if len(locs) > len(vm):
            line += f", {_count(len(locs) - len(vm), 'other TDCALL')}"
    out = [line + "."]
    masks = sorted({s.mask for s in sites if s.mask is not None})
    if vm:
        out.append(f"Masks: {' '.join(f'{m:#x}' for m in masks) or 'none recovered'}.")
    for p in ("hardened", "legacy"):
        counts = Counter(s.verdict(p) for s in sites if s.counted)
        if counts:
            words = ", ".join(f"{counts[v]} {v}" for v in sorted(counts, key=COUNT_ORDER.index))
            out.append(f"Under the {p} policy: {words}.")
    if o.unresolved:
        then = "passed by --allow-unresolved" if allow_unresolved else "not a pass"
        out.append(f"Not judged: {_count(len(o.unresolved), 'call')} (a register not recovered): {then}.")
    if nc := sum(img.not_code for img in images):
        out.append(f"{nc} TDCALL byte match{'' if nc == 1 else 'es'} not decoded as code: not reported.")
    if o.broken:
        out.append(f"{o.broken} of {_count(o.inputs, 'input')} broken, unreadable or without code (below).")
    return out


def html_matrix(images: list[Image], host: Host, policy: str, allow_unresolved: bool = False) -> M.Matrix:
    """The matrix page's content: one group per input, one row per row of the compact table
    (:func:`rows`: the same code in many places is one row), one column per call, a cell's verdicts
    the worst of its calls (one per caller), its id the index in ``--json``'s ``sites`` of its first
    call; the findings (:func:`findings`) below."""
    index = {id(s): i for i, s in enumerate(s for img in images for s in img.sites)}
    groups: list[M.Group] = []
    found: list[M.Finding] = []
    number = 0
    for img in images:
        module = len({module_of(s) for s in img.sites}) > 1
        table = rows(img, policy)
        numbers: dict[int, int] = {}
        matrix_rows = []
        for r in table:
            number += 1
            numbers[id(r)] = number
            where = r.where(module)
            by_call: dict[str, list[Site]] = {}
            for s in r.sites:
                by_call.setdefault(column_of(s), []).append(s)
            cells = {k: _cell(ss, k, r, where, index[id(ss[0])], number, img.path) for k, ss in by_call.items()}
            loc = r.locations[0]
            title = " > ".join(loc.container) + (
                f" and {_count(len(r.locations) - 1, 'other copy', 'other copies')}" if len(r.locations) > 1 else ""
            )
            matrix_rows.append(M.Row(where, " ".join(_masks(r.sites)), title, number, cells))
        note = "no TDCALL found" + (" in what could be read" if img.problems else "")
        groups.append(M.Group(img.path, matrix_rows, note))
        for f in findings(table):
            label = f"{img.path.rsplit('/', 1)[-1]}: {f.row.where(module)}"
            found.append(
                M.Finding(numbers[id(f.row)], label, " ".join(_masks(f.sites)), calls_text(f.sites), f.verdict, f.why)
            )
    found.sort(key=lambda f: min(ORDER.index(v) for v in f.verdict.values()))  # stable: input order within
    rbp = _rbp_text(host)
    o = outcome(images, policy, allow_unresolved)
    if not o.calls:
        no_findings = "No TDVMCALL found: nothing to judge."
    elif o.unresolved:
        no_findings = "Every judged call passes under both policies."
    else:
        no_findings = "Every call passes under both policies, and every call was judged."
    return M.Matrix(
        title="tdvmcall scan",
        heading="tdvmcall scan: the TDCALLs of binaries against a host",
        host=f"{_count(len(images), 'input')} against TDX module {host.module} ({rbp}), KVM {host.tree}; "
        f"exit status follows --policy {policy}",
        summary=verdict_line(images, policy, allow_unresolved).plain,
        facts=summary_facts(images, policy, allow_unresolved),
        styles=STYLE,
        columns=_columns([s for img in images for s in img.sites]),
        groups=groups,
        findings=found,
        errors=[line for img in images for line in img.problems],
        no_findings=no_findings,
    )


def html_report(images: list[Image], host: Host, policy: str, allow_unresolved: bool = False) -> str:
    """One self-contained page (``html_matrix.py``, the page ``check --html`` writes): the matrix of
    sites x calls, each cell split into the legacy and the hardened verdict; hover a cell for its
    details, click it to pin them in the side panel (or open ``page.html#show=<N>``, N = the index
    of the cell's first call in ``--json``'s ``sites``)."""
    return M.render(html_matrix(images, host, policy, allow_unresolved))

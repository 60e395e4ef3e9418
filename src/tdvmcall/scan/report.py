"""Renderers of ``tdvmcall scan`` results: JSON (a public format, docs/scan.md), a rich table per
image grouped by module with the findings first, catalog CSV rows, and a self-contained HTML page.
They only present :class:`~.analyze.Site` values; every judgement was made in ``judge.py``."""

from __future__ import annotations

import csv
import html
import io
from collections import Counter
from collections.abc import Iterable

from rich.console import Group
from rich.table import Table
from rich.text import Text

from ..abi.regs import fmt_mask
from ..judge import HARDENED_REFUSES, LEGACY_SILENT, MODULE_REJECTS, NOT_KVM, OK, Host
from .analyze import Image, Site
from .flow import Value

JSON_SCHEMA = 1
UNRESOLVED = "unresolved"
NOT_TDVMCALL = "not-tdvmcall"

#: worst first: the order findings are listed in
ORDER = (MODULE_REJECTS, HARDENED_REFUSES, LEGACY_SILENT, UNRESOLVED, NOT_KVM, OK, NOT_TDVMCALL)
STYLE = {
    OK: ("green", "#cdebd0"),
    NOT_KVM: ("dim", "#e4e4e4"),
    LEGACY_SILENT: ("yellow", "#ffe38a"),
    HARDENED_REFUSES: ("dark_orange", "#ffb380"),
    MODULE_REJECTS: ("bold red", "#f08080"),
    UNRESOLVED: ("magenta", "#e6d5f5"),
    NOT_TDVMCALL: ("cyan", "#d7eef5"),
}
SHOWN = ("rax", "rcx", "r10", "r11", "r12", "r13")


def hx(v: int | None) -> str | None:
    return None if v is None else f"{v:#x}"


def module_of(site: Site) -> str:
    """The module a site is in: the FFS file's name for firmware (the part before ``pe32``/``te``),
    else the container chain inside the input."""
    inner = site.container[1:]
    for i, part in enumerate(inner):
        if part in ("pe32", "te") and i > 0:
            return inner[i - 1]
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
        "via": site.via,
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


def report_json(images: list[Image], host: Host, policy: str, failing: bool) -> dict:
    return {
        "schema": JSON_SCHEMA,
        "host": {"module": host.module, "no_rbp_mod": host.no_rbp_mod, "tree": host.tree},
        "policy": policy,
        "passes": not failing,
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


def _rows(img: Image, policy: str) -> list[tuple[Site, int, list[str]]]:
    """Sites collapsed: identical (module, function, values, verdicts) shown once, with the count
    and the callers (the HTML page's rows)."""
    groups: dict[tuple, tuple[Site, list[str]]] = {}
    for s in img.sites:
        key = (
            module_of(s),
            s.symbol,
            s.call_name,
            s.rax,
            s.mask,
            tuple(sorted(s.pinned().items())),
            s.verdict("legacy"),
            s.verdict("hardened"),
            tuple(s.details()),
        )
        if key in groups:
            groups[key][1].append(s.via or "")
        else:
            groups[key] = (s, [s.via or ""])
    rows = [(s, len(v), v) for s, v in groups.values()]
    rows.sort(key=lambda r: (severity(r[0], policy), module_of(r[0]), r[0].address))
    return rows


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


def image_renderable(img: Image, policy: str) -> Group:
    sm = img.summary()
    head = Text.assemble(
        ("\n" + img.path, "bold"),
        f"  {sm['tdcall_sites']} TDCALL sites, {sm['tdvmcall_sites']} TDVMCALL sites, "
        f"{sm['distinct_masks']} distinct masks; of their {sm['resolved_calls']} calls (one per caller): "
        f"module-rejects {sm['module_rejects']}, hardened-refuses {sm['hardened_refuses']}, "
        f"legacy-silent {sm['legacy_silent']}, unresolved {sm['unresolved']}",
    )
    parts: list = [head]
    for line in img.problems:
        parts.append(Text(f"  error: {line}", style="bold red"))
    for line in img.skipped:
        parts.append(Text(f"  skipped: {line}", style="dim"))
    if sm["not_code"]:
        parts.append(Text(f"  {sm['not_code']} TDCALL byte match(es) not decoded as code: not reported", style="dim"))
    if not img.sites:
        return Group(*parts)
    t = Table(show_lines=False, pad_edge=False, expand=False)
    for col in ("module", "site", "calls (× callers)", "mask", "legacy", "hardened", "how found / findings"):
        t.add_column(col, overflow="fold")
    for g in _site_groups(img, policy):
        s0 = g[0]
        counts = Counter(_call_text(s) for s in g)
        calls = ", ".join(f"{c} ×{n}" if n > 1 else c for c, n in counts.items())
        masks = sorted({_val(s.regs["rcx"]) for s in g}) if s0.is_vmcall else ["-"]
        how = []
        for r in ("rax", "rcx", "r10", "r11") if s0.is_vmcall else ("rax",):
            hows = sorted({short_how(s.regs[r]) for s in g})
            how.append(f"{r}: {' | '.join(hows)}")
        findings: list[str] = []
        for s in g:
            if s.passes("hardened") and s.passes("legacy") and s.verdict("hardened") != "unresolved":
                continue
            for d in s.details():
                if not d.startswith("exposed but unused") and d not in findings:
                    findings.append(d)
        if s0.is_vmcall and any(s.verdict("hardened") == "unresolved" for s in g):
            for s in g:
                for r in ("rcx", "r10", "r11"):
                    if not s.regs[r].known:
                        line = f"{r} unresolved: {s.regs[r].how}"
                        if line not in findings:
                            findings.append(line)
        leg, hard = _worst(g, "legacy"), _worst(g, "hardened")
        t.add_row(
            Text(module_of(s0)),
            Text(s0.symbol),
            Text(calls),
            Text(" ".join(masks)),
            Text(leg, style=STYLE[leg][0]),
            Text(hard, style=STYLE[hard][0]),
            Text("; ".join(how) + ("\n" + "\n".join(findings[:6]) if findings else "")),
        )
    parts.append(t)
    return Group(*parts)


def rich_report(images: list[Image], host: Host, policy: str) -> Group:
    tot = totals(images)
    rbp = "NO_RBP_MOD" if host.no_rbp_mod else "RBP_MOD allowed"
    head = Text(
        f"tdvmcall scan: TDX module {host.module} ({rbp}), KVM {host.tree}; exit status follows --policy {policy}. "
        f"{tot.get('inputs', 0)} input(s), {tot.get('tdcall_sites', 0)} TDCALL sites, "
        f"{tot.get('tdvmcall_sites', 0)} TDVMCALL sites.",
        style="bold",
    )
    return Group(head, *(image_renderable(i, policy) for i in images))


# --- catalog CSV ---------------------------------------------------------------------------------------
CATALOG_COLUMNS = ("guest", "snapshot", "file", "function", "mask_hex", "tdvmcalls", "note")
_SHORT = {
    "Instruction.CPUID": "CPUID",
    "Instruction.HLT": "HLT",
    "Instruction.IO": "IO",
    "Instruction.RDMSR": "RDMSR",
    "Instruction.WRMSR": "WRMSR",
    "#VE.RequestMMIO": "MMIO",
    "Instruction.WBINVD": "WBINVD",
    "Instruction.PCONFIG": "PCONFIG",
}


def catalog_call(site: Site) -> str | None:
    """The site's call in the catalog grammar (docs/check.md), with the direction or input pinned
    when the scan knows it: ``IO in``, ``MMIO write``, ``RDMSR 0x1b``, ``CPUID leaf 0xb``.  None for a call the
    catalog cannot name (unknown GHCI leaf or hypercall number)."""
    leaf = site.leaf
    if leaf is None or leaf.name.startswith("unknown(") or leaf.name == "KVMHypercall":
        return None
    name = _SHORT.get(leaf.name, leaf.name)
    pins = site.pinned()
    if leaf.name == "Instruction.IO" and pins.get("r13") in (0, 1):
        return f"IO {'in' if pins['r13'] == 0 else 'out'}"
    if leaf.name == "#VE.RequestMMIO" and "r13" in pins and pins["r13"] & 0xFFFFFFFF in (0, 1):
        return f"MMIO {'read' if pins['r13'] & 0xFFFFFFFF == 0 else 'write'}"
    if leaf.name in ("Instruction.RDMSR", "Instruction.WRMSR") and "r12" in pins:
        return f"{name} {pins['r12']:#x}"
    if leaf.name == "Instruction.CPUID" and "r12" in pins:
        return f"CPUID leaf {pins['r12']:#x}"
    if leaf.name == "ReportFatalError" and "r12" in pins and not pins["r12"] >> 63 & 1:
        return f"ReportFatalError code {pins['r12']:#x}"
    return name


def catalog_csv(images: Iterable[Image]) -> tuple[str, int]:
    """Catalog rows for every site whose mask and call are both known: identical sites (same image,
    module, function, mask and call) collapse into one row, the count in the note.  Returns the CSV
    text and how many resolved TDVMCALLs could not be written (mask or call unknown)."""
    rows: dict[tuple[str, str, str, int, str], list[Site]] = {}
    left_out = 0
    for img in images:
        for s in img.sites:
            if not s.is_vmcall:
                continue
            call = catalog_call(s)
            if s.mask is None or call is None:
                left_out += 1
                continue
            key = (img.path, module_of(s), s.symbol, s.mask, call)
            rows.setdefault(key, []).append(s)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CATALOG_COLUMNS)
    for (path, module, function, mask, call), sites in rows.items():
        n = len(sites)
        vias = sorted({s.via for s in sites if s.via})
        note = f"found by tdvmcall scan: {n} call site{'s' if n != 1 else ''}"
        if vias:
            note += f" (callers {', '.join(vias[:6])}{', ...' if len(vias) > 6 else ''})"
        w.writerow((path.rsplit("/", 1)[-1], "scan", module, function, f"0x{mask:X}", call, note))
    return buf.getvalue(), left_out


# --- HTML ------------------------------------------------------------------------------------------------
def html_report(images: list[Image], host: Host, policy: str) -> str:
    """A self-contained page: per image, a matrix of sites (rows) by policy (columns), coloured by
    verdict, with the values and how they were found."""
    e = html.escape
    out = [
        "<!doctype html><html><head><meta charset='utf-8'><title>tdvmcall scan</title><style>",
        "body{font-family:sans-serif;font-size:13px;margin:1.5em}table{border-collapse:collapse;margin:.5em 0 2em}",
        "td,th{border:1px solid #bbb;padding:2px 6px;vertical-align:top}th{background:#f0f0f0}",
        "td.v{font-weight:bold;text-align:center}small{color:#555}",
        "</style></head><body>",
        f"<h1>tdvmcall scan</h1><p>TDX module {e(host.module)}, NO_RBP_MOD {'on' if host.no_rbp_mod else 'off'}, "
        f"KVM {e(host.tree)}; exit status follows <b>{e(policy)}</b>.</p>",
        "<p>"
        + " ".join(f"<span style='background:{c[1]};padding:1px 6px'>{e(v)}</span>" for v, c in STYLE.items())
        + "</p>",
    ]
    for img in images:
        sm = img.summary()
        out.append(f"<h2>{e(img.path)}</h2><p>" + ", ".join(f"{e(k)} {v}" for k, v in sm.items()) + "</p>")
        for line in img.problems:
            out.append(f"<p style='color:#b00'>error: {e(line)}</p>")
        if not img.sites:
            continue
        out.append("<table><tr><th>module</th><th>site</th><th>n</th><th>call</th><th>mask</th>")
        out.append("<th>legacy</th><th>hardened</th><th>how / details</th></tr>")
        for s, n, _vias in _rows(img, policy):
            cells = []
            for p in ("legacy", "hardened"):
                v = s.verdict(p)
                cells.append(f"<td class='v' style='background:{STYLE[v][1]}'>{e(v)}</td>")
            how = "<br>".join(e(f"{r}: {s.regs[r].how}") for r in ("rax", "rcx", "r11"))
            det = "<br>".join(e(d) for d in s.details())
            mask = _val(s.regs["rcx"]) if s.is_vmcall else "-"
            out.append(
                f"<tr><td>{e(module_of(s))}</td><td>{e(s.symbol)}</td><td>{n}</td><td>{e(_call_text(s))}</td>"
                f"<td>{e(mask)}</td>{''.join(cells)}<td><small>{how}</small>{'<br>' + det if det else ''}</td></tr>"
            )
        out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out)

"""Renderers of ``tdvmcall check`` results: JSON objects, detail lines, a rich table, Markdown and a
self-contained HTML page.  They only present :class:`~tdvmcall.catalog.CallCheck` values; every
judgement was made in ``catalog.py``.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable
from itertools import groupby

from rich.console import Group
from rich.table import Table
from rich.text import Text

from ..abi.control import Control
from ..abi.regs import hex64, names_in
from ..kvm import leaves as L
from ..kvm.leaves import LEAVES
from ..kvm.tdx import POLICIES
from .catalog import (
    FOREIGN_CALLS,
    HARDENED_REFUSES,
    LEGACY_SILENT,
    MODULE_REJECTS,
    NOT_KVM,
    OK,
    CallCheck,
    CaseRun,
    Host,
    Site,
    summary,
)

JSON_SCHEMA = 1

#: one style per verdict: rich style, HTML background, HTML text colour, what it means
STYLE = {
    OK: ("green", "#cdebd0", "#1b5e20", "every case completes; nothing read as zero or dropped"),
    NOT_KVM: ("dim", "#e4e4e4", "#444444", "not a KVM call (Hyper-V, MigTD): only the module's check applies"),
    LEGACY_SILENT: ("yellow", "#ffe38a", "#6d4c00", "today's KVM reads an unexposed input as 0 or drops an output"),
    HARDENED_REFUSES: ("dark_orange", "#ffb380", "#7a2e00", "hardened KVM refuses the call (INVALID_OPERAND)"),
    MODULE_REJECTS: (
        "bold red",
        "#d83b3b",
        "#ffffff",
        "the TDX module fails the call back to the guest; KVM never sees it",
    ),
}


# --- plain data ---------------------------------------------------------------------------------
def short_name(call: str) -> str:
    """A compact column label: ``Instruction.RDMSR`` -> ``RDMSR``, ``#VE.RequestMMIO`` -> ``MMIO``."""
    for prefix in ("Instruction.", "KVMHypercall.", "#VE.Request"):
        if call.startswith(prefix):
            return call[len(prefix) :]
    return call


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


def _by_finding(prefix: str, runs: list[CaseRun], explain, leaf: L.Leaf | None) -> list[str]:
    """One line per distinct finding, naming the cases it holds for (with their inputs when it holds
    for only some of the cases)."""
    found: dict[str, list[CaseRun]] = {}
    for run in runs:
        found.setdefault(explain(run), []).append(run)
    lines = []
    for text, rs in found.items():
        where = ", ".join(case_text(r, leaf) for r in rs) if len(rs) == 1 and leaf else ", ".join(r.case for r in rs)
        lines.append(f"{prefix} (case {where}): {text}")
    return lines


def detail_lines(check: CallCheck, brief: bool = False) -> list[str]:
    """Why the verdicts are what they are, then the notes, one line each (``brief``: a not-KVM
    call's reason only up to its first colon, for the terminal table)."""
    lines: list[str] = []
    if not check.module.accepted:
        lines.append(f"module rejects: {module_text(check)}")
    elif check.call.foreign:
        reason = check.call.foreign.split(":")[0] if brief else check.call.foreign
        lines.append(f"not a KVM call: {reason}")
    leaf = check.call.leaf
    lines += _by_finding("hardened refuses", check.refusals(), _refusal, leaf)
    lines += _by_finding("legacy", check.silences(), lambda r: _silence(r, check.call.name), leaf)
    lines += check.notes
    if check.call.annotation:
        lines.append(f"catalog: {check.call.written}({check.call.annotation})")
    return lines


def result_json(check: CallCheck) -> dict:
    """One (site, call) object of ``tdvmcall check --json``."""
    s, m = check.site, check.module
    ctl = Control(s.mask)
    return {
        "guest": s.guest,
        "snapshot": s.snapshot,
        "file": s.file,
        "function": s.function,
        "row": s.row,
        "mask": f"{s.mask:#06x}",
        "gprs": names_in(ctl.gpr_select, 16),
        "xmms": [f"xmm{i}" for i in range(16) if ctl.xmm_select >> i & 1],
        "call": check.call.name,
        "written": check.call.written,
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
        "remarks": list(s.remarks) + ([check.call.annotation] if check.call.annotation else []),
        "details": detail_lines(check),
    }


def report_json(results: list[CallCheck], host: Host, policy: str, catalog: str, errors: list[str]) -> dict:
    """The whole ``--json`` document."""
    return {
        "schema": JSON_SCHEMA,
        "host": {"module": host.module, "no_rbp_mod": host.no_rbp_mod, "tree": host.tree},
        "policy": policy,
        "catalog": catalog,
        "summary": summary(results),
        "errors": errors,
        "passed": all(r.passes(policy) for r in results) and not errors,
        "results": [result_json(r) for r in results],
    }


def summary_line(results: list[CallCheck]) -> str:
    """``37 sites, 129 calls. hardened: 103 ok, 7 not-kvm, ... legacy: ...``"""
    s = summary(results)
    per = []
    for p in ("hardened", "legacy"):
        counts = ", ".join(f"{n} {v}" for v, n in s[p].items() if n)
        per.append(f"{p}: {counts or 'nothing checked'}")
    return f"{_count(s['sites'], 'site')}, {_count(s['calls'], 'call')}. " + ". ".join(per) + "."


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def host_line(host: Host, policy: str, catalog: str) -> str:
    rbp = "with NO_RBP_MOD" if host.no_rbp_mod else "without NO_RBP_MOD"
    return f"{catalog} against TDX module {host.module} ({rbp}), KVM {host.tree}; exit status follows --policy {policy}"


def by_site(results: Iterable[CallCheck]) -> list[tuple[Site, list[CallCheck]]]:
    return [(site, list(group)) for site, group in groupby(results, key=lambda r: r.site)]


def by_guest(results: Iterable[CallCheck]) -> list[tuple[str, list[CallCheck]]]:
    return [(g, list(group)) for g, group in groupby(results, key=lambda r: r.site.guest)]


# --- rich table ---------------------------------------------------------------------------------
def _verdict_text(v: str) -> Text:
    return Text(v, style=STYLE[v][0])


def rich_report(results: list[CallCheck], host: Host, policy: str, catalog: str) -> Group:
    """The default output: one table per guest, then the summary line."""
    parts: list = [Text(host_line(host, policy, catalog), style="dim")]
    for guest, checks in by_guest(results):
        t = Table(
            title=guest, title_justify="left", title_style="bold", show_lines=True, header_style="bold", expand=True
        )
        t.add_column("site", ratio=3, overflow="fold")
        t.add_column("mask", no_wrap=True)
        t.add_column("call", no_wrap=True)
        t.add_column("legacy", no_wrap=True)
        t.add_column("hardened", no_wrap=True)
        t.add_column("details", ratio=7)
        for site, site_checks in by_site(checks):
            where = Text(site.function, style="bold")
            where.append(f"\n{site.file}" + (f" @ {site.snapshot}" if site.snapshot else ""), style="dim")
            for i, c in enumerate(site_checks):
                t.add_row(
                    where if i == 0 else "",
                    f"{site.mask:#06x}" if i == 0 else "",
                    short_name(c.call.name),
                    _verdict_text(c.verdict["legacy"]),
                    _verdict_text(c.verdict["hardened"]),
                    Text("\n".join(detail_lines(c, brief=True))),
                )
        parts.append(t)
    parts.append(Text(summary_line(results), style="bold"))
    return Group(*parts)


# --- markdown -----------------------------------------------------------------------------------
def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def markdown_report(results: list[CallCheck], host: Host, policy: str, catalog: str) -> str:
    out = ["# tdvmcall check", "", host_line(host, policy, catalog) + ".", ""]
    for guest, checks in by_guest(results):
        out += [f"## {guest}", "", "| site | mask | call | legacy | hardened | details |", "|---|---|---|---|---|---|"]
        for site, site_checks in by_site(checks):
            where = f"`{site.function}`" + (
                f" ({site.file}{' @ ' + site.snapshot if site.snapshot else ''})" if site.file else ""
            )
            for i, c in enumerate(site_checks):
                first = i == 0
                out.append(
                    f"| {_md(where) if first else ''} | {f'`{site.mask:#06x}`' if first else ''} | "
                    f"{_md(c.call.name)} | {c.verdict['legacy']} | {c.verdict['hardened']} | "
                    f"{_md('; '.join(detail_lines(c)))} |"
                )
        out.append("")
    out.append(f"**{summary_line(results)}**")
    return "\n".join(out) + "\n"


# --- HTML ---------------------------------------------------------------------------------------
_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:16px 20px;color:#222}
h1{font-size:20px;margin:0 0 4px}
.host{color:#555;margin-bottom:8px}
.summary{font-weight:600;margin:8px 0 12px}
.legend span{display:inline-block;padding:2px 8px;margin:0 6px 4px 0;border-radius:3px}
.wrap{display:flex;gap:16px;align-items:flex-start}
table.matrix{border-collapse:collapse}
.matrix th,.matrix td{border:1px solid #d0d0d0;padding:0}
.matrix thead th{vertical-align:bottom;background:#fafafa;font-weight:600}
.matrix thead th.call div{writing-mode:vertical-rl;transform:rotate(180deg);padding:6px 2px;white-space:nowrap;font-size:12px}
.matrix thead th.group{font-size:12px;padding:3px 6px;text-align:center}
.matrix tr.guest th{background:#eef2f7;text-align:left;padding:4px 8px;font-size:13px}
.matrix th.site{text-align:left;font-weight:normal;padding:3px 8px;white-space:nowrap;background:#fff}
.matrix th.site code{font-size:12px}
.matrix th.site .mask{color:#555;font-family:ui-monospace,monospace;font-size:12px;margin-left:6px}
.matrix td.none{background:#fbfbfb}
.matrix td.cell{cursor:pointer;width:34px;height:24px}
.matrix td.cell:hover,.matrix td.cell.sel{outline:2px solid #222;outline-offset:-2px}
.pair{display:flex;height:24px}
.pair span{flex:1;display:flex;align-items:center;justify-content:center;font:600 11px ui-monospace,monospace}
#panel{position:sticky;top:12px;min-width:340px;max-width:460px;border:1px solid #ccc;border-radius:4px;padding:10px 12px;background:#fff}
#panel h2{font-size:15px;margin:0 0 6px}
#panel ul{padding-left:18px;margin:6px 0}
.errors{color:#b00020}
h2.findings{font-size:16px;margin:18px 0 6px}
ul.findings{padding-left:18px;max-width:1200px}
ul.findings li{margin-bottom:6px}
.v{display:inline-block;padding:1px 6px;border-radius:3px;margin-left:4px;font-size:12px}
"""

_JS = """
(function(){
  var data = JSON.parse(document.getElementById('check-data').textContent);
  var panel = document.getElementById('panel');
  var styles = data.styles;
  function esc(s){var d=document.createElement('div');d.textContent=s;return d.innerHTML;}
  function badge(policy, v){var st=styles[v];return '<span class="v" style="background:'+st[0]+';color:'+st[1]+'">'+policy+': '+v+'</span>';}
  function show(id){
    var r = data.results[id]; if(!r) return;
    document.querySelectorAll('td.cell.sel').forEach(function(c){c.classList.remove('sel');});
    var cell = document.getElementById('c'+id); if(cell) cell.classList.add('sel');
    var h = '<h2>'+esc(r.guest+' '+r.function)+'</h2>';
    h += '<div><code>'+esc(r.mask)+'</code> '+esc(r.gprs.join(' '))+(r.xmms.length?' + '+esc(r.xmms.join(' ')):'')+'</div>';
    h += '<div>'+esc(r.file)+(r.snapshot?' @ '+esc(r.snapshot):'')+'</div>';
    h += '<p><b>'+esc(r.call)+'</b> (catalog: '+esc(r.written)+')<br>'+badge('legacy', r.verdict.legacy)+badge('hardened', r.verdict.hardened)+'</p>';
    h += '<ul>'+r.details.map(function(d){return '<li>'+esc(d)+'</li>';}).join('')+'</ul>';
    if(r.cases.length) h += '<div>cases checked: '+esc(r.cases.join(', '))+'</div>';
    panel.innerHTML = h; panel.dataset.shown = id;
  }
  document.querySelectorAll('td.cell').forEach(function(c){
    c.addEventListener('click', function(){ show(c.dataset.id); history.replaceState(null,'','#show='+c.dataset.id); });
  });
  var m = location.hash.match(/^#show=(\\d+)$/); if(m) show(m[1]);
})();
"""


def _cell(i: int, c: CallCheck) -> str:
    halves = []
    for p in POLICIES:
        v = c.verdict[p]
        _, bg, fg, _ = STYLE[v]
        halves.append(f'<span class="{p} {v}" style="background:{bg};color:{fg}">{p[0].upper()}</span>')
    tip = f"{c.site.label} · {c.call.name}\nlegacy: {c.verdict['legacy']}\nhardened: {c.verdict['hardened']}\n"
    tip += "\n".join(detail_lines(c))
    return (
        f'<td class="cell" id="c{i}" data-id="{i}" data-row="{c.site.row}" data-call="{html.escape(c.call.name)}"'
        f' data-legacy="{c.verdict["legacy"]}" data-hardened="{c.verdict["hardened"]}"'
        f' title="{html.escape(tip)}"><div class="pair">{"".join(halves)}</div></td>'
    )


def _columns(results: list[CallCheck]) -> list[tuple[str, list[str]]]:
    """Column groups in leaf-table order: GHCI calls, KVM hypercalls, calls that are not KVM's."""
    present = {c.call.name for c in results}
    ghci = [lf.name for lf in LEAVES if lf.family == "ghci" and lf.name in present]
    hc = [lf.name for lf in LEAVES if lf.family == "kvm-hypercall" and lf.name in present]
    foreign = [n for n in FOREIGN_CALLS if n in present]
    return [
        (label, cols) for label, cols in (("GHCI calls", ghci), ("KVM hypercalls", hc), ("not KVM", foreign)) if cols
    ]


def _findings_html(results: list[CallCheck]) -> str:
    """Below the matrix, the sites with a call that does not pass under some policy, one line per
    distinct finding with the calls it concerns: readable without hovering."""
    e = html.escape
    items = []
    for site, checks in by_site(results):
        groups: dict[tuple, list[str]] = {}
        for c in checks:
            if all(c.passes(p) for p in POLICIES):
                continue
            why = tuple(line for line in detail_lines(c) if line not in c.notes)
            groups.setdefault((c.verdict["legacy"], c.verdict["hardened"], why), []).append(short_name(c.call.name))
        for (legacy, hardened, why), calls in groups.items():
            badges = "".join(
                f'<span class="v" style="background:{STYLE[v][1]};color:{STYLE[v][2]}">{p}: {v}</span>'
                for p, v in (("legacy", legacy), ("hardened", hardened))
            )
            items.append(
                f'<li data-row="{site.row}"><b>{e(site.label)}</b> <code>{site.mask:#06x}</code> '
                f"{e(', '.join(calls))} {badges}<br>{'<br>'.join(e(w) for w in why)}</li>"
            )
    if not items:
        return '<h2 class="findings">Findings</h2><p>Every call passes under both policies.</p>'
    return f'<h2 class="findings">Findings</h2><ul class="findings" id="findings">{"".join(items)}</ul>'


def html_report(results: list[CallCheck], host: Host, policy: str, catalog: str, errors: list[str]) -> str:
    """One self-contained page (no external resources): the matrix of call sites x calls, each cell
    split into the legacy and the hardened verdict; hover a cell for its details, click it to pin
    them in the side panel (or open ``page.html#show=<N>``, N = the result's index in ``--json``)."""
    e = html.escape
    groups = _columns(results)
    cols = [c for _, cs in groups for c in cs]
    head1 = (
        '<tr><th rowspan="2"></th>'
        + "".join(f'<th class="group" colspan="{len(cs)}">{e(label)}</th>' for label, cs in groups)
        + "</tr>"
    )
    head2 = (
        "<tr>" + "".join(f'<th class="call" title="{e(c)}"><div>{e(short_name(c))}</div></th>' for c in cols) + "</tr>"
    )
    index = {id(c): i for i, c in enumerate(results)}
    body = []
    for guest, checks in by_guest(results):
        body.append(f'<tr class="guest"><th colspan="{len(cols) + 1}">{e(guest)}</th></tr>')
        for site, site_checks in by_site(checks):
            by_call = {c.call.name: c for c in site_checks}
            label = (
                f'<th class="site" title="{e(site.file)}{" @ " + e(site.snapshot) if site.snapshot else ""}">'
                f'<code>{e(site.function)}</code><span class="mask">{site.mask:#06x}</span></th>'
            )
            cells = [
                _cell(index[id(by_call[c])], by_call[c]) if c in by_call else '<td class="none"></td>' for c in cols
            ]
            body.append(f'<tr data-row="{site.row}">{label}{"".join(cells)}</tr>')
    findings = _findings_html(results)
    legend = "".join(
        f'<span style="background:{bg};color:{fg}" title="{e(meaning)}">{v}</span>'
        for v, (_, bg, fg, meaning) in STYLE.items()
    )
    data = {
        "styles": {v: [bg, fg] for v, (_, bg, fg, _m) in STYLE.items()},
        "results": {str(i): result_json(c) for i, c in enumerate(results)},
    }
    payload = json.dumps(data).replace("</", "<\\/")
    errs = "".join(f"<li>{e(x)}</li>" for x in errors)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>tdvmcall check</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{_CSS}</style></head><body>
<h1>tdvmcall check: guests' TDVMCALL masks against a host</h1>
<div class="host">{e(host_line(host, policy, catalog))}</div>
<div class="summary" id="summary">{e(summary_line(results))}</div>
<div class="legend">each cell: <b>L</b> = today's KVM (legacy), <b>H</b> = hardened KVM, coloured by verdict: {legend}</div>
{f'<ul class="errors" id="errors">{errs}</ul>' if errors else ""}
<div class="wrap">
<table class="matrix" id="matrix"><thead>{head1}{head2}</thead><tbody>
{chr(10).join(body)}
</tbody></table>
<div id="panel"><h2>Details</h2><p>Hover a cell for its details; click it to pin them here.</p></div>
</div>
{findings}
<script type="application/json" id="check-data">{payload}</script>
<script>{_JS}</script>
</body></html>
"""


__all__ = [
    "STYLE",
    "detail_lines",
    "html_report",
    "markdown_report",
    "report_json",
    "result_json",
    "rich_report",
    "short_name",
    "summary_line",
]

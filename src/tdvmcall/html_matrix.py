"""The matrix page both ``check --html`` and ``scan --html`` write: one self-contained HTML file (no
external resources, readable offline) with a matrix of call sites (rows, grouped by guest or image)
by calls (columns), each cell split into the legacy and the hardened verdict, coloured as
``console.VERDICT_STYLE`` draws them; hover a cell for its details, click it to pin them in the side panel;
below the matrix the findings, readable without hovering.

It renders from a neutral structure (:class:`Matrix`) that each wing fills from its own results, so
it knows nothing of catalogs or binaries: the printing floor beside ``console.py``
(docs/architecture.md).
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from typing import Any

POLICIES = ("legacy", "hardened")  # the order of a cell's halves: L then H


@dataclass
class Cell:
    """One (site, call): its verdict per policy, the hover text, and what the side panel shows
    (``panel``: the keys the page's script reads: guest, function, mask, gprs, xmms, file, snapshot,
    call, written, verdict, details, cases)."""

    id: int  # unique on the page: ``page.html#show=<id>`` pins this cell
    verdict: dict[str, str]
    tip: str
    panel: dict[str, Any]
    row: int  # the ``data-row`` of the cell (the row's number in the tool's own terms)


@dataclass
class Row:
    """One call site: its label (shown as code), its mask, a hover text, and its cells by column key."""

    label: str
    mask: str
    title: str
    row: int
    cells: dict[str, Cell]


@dataclass
class Group:
    """Rows under one heading (a guest, an image); ``note`` is shown when there is no row."""

    title: str
    rows: list[Row]
    note: str = ""


@dataclass
class Finding:
    """One line below the matrix: where, which calls, both verdicts, and why (one line each)."""

    row: int
    label: str
    mask: str
    calls: str
    verdict: dict[str, str]
    details: list[str]


@dataclass
class Matrix:
    """Everything on the page.  ``columns``: column groups, each (heading, [(column key, short
    label)]); ``styles``: verdict -> (rich style, background, text colour, meaning), the legend and
    the colours (``console.VERDICT_STYLE``, plus any state a tool adds); ``facts``: short lines in
    words under the summary (what was found, the verdict counts), one item each."""

    title: str
    heading: str
    host: str
    summary: str
    styles: dict[str, tuple[str, str, str, str]]
    columns: list[tuple[str, list[tuple[str, str]]]]
    groups: list[Group]
    findings: list[Finding]
    errors: list[str] = field(default_factory=list)
    no_findings: str = "Every call passes under both policies."
    facts: list[str] = field(default_factory=list)


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:16px 20px;color:#222}
h1{font-size:20px;margin:0 0 4px}
.host{color:#555;margin-bottom:8px}
.summary{font-weight:600;margin:8px 0 12px}
ul.facts{margin:-6px 0 12px;padding-left:20px;color:#333}
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
  var m = location.hash.match(/^#show=(\\d+)$/);
  if(m){ show(m[1]); var sel = document.querySelector('td.cell[data-id="'+m[1]+'"]');
    if(sel) sel.scrollIntoView({block: 'center', inline: 'center'}); }  // a cell below the fold: bring it in view
})();
"""


def _cell(c: Cell, key: str, styles: dict[str, tuple[str, str, str, str]]) -> str:
    halves = []
    for p in POLICIES:
        v = c.verdict[p]
        _, bg, fg, _ = styles[v]
        halves.append(f'<span class="{p} {v}" style="background:{bg};color:{fg}">{p[0].upper()}</span>')
    return (
        f'<td class="cell" id="c{c.id}" data-id="{c.id}" data-row="{c.row}" data-call="{html.escape(key)}"'
        f' data-legacy="{c.verdict["legacy"]}" data-hardened="{c.verdict["hardened"]}"'
        f' title="{html.escape(c.tip)}"><div class="pair">{"".join(halves)}</div></td>'
    )


def _findings_html(m: Matrix) -> str:
    e = html.escape
    items = []
    for f in m.findings:
        badges = "".join(
            f'<span class="v" style="background:{m.styles[v][1]};color:{m.styles[v][2]}">{p}: {v}</span>'
            for p, v in (("legacy", f.verdict["legacy"]), ("hardened", f.verdict["hardened"]))
        )
        items.append(
            f'<li data-row="{f.row}"><b>{e(f.label)}</b> <code>{e(f.mask)}</code> '
            f"{e(f.calls)} {badges}<br>{'<br>'.join(e(w) for w in f.details)}</li>"
        )
    if not items:
        return f'<h2 class="findings">Findings</h2><p>{e(m.no_findings)}</p>'
    return f'<h2 class="findings">Findings</h2><ul class="findings" id="findings">{"".join(items)}</ul>'


def render(m: Matrix) -> str:
    """The page (see the module's docstring)."""
    e = html.escape
    cols = [key for _, cs in m.columns for key, _ in cs]
    head1 = (
        '<tr><th rowspan="2"></th>'
        + "".join(f'<th class="group" colspan="{len(cs)}">{e(label)}</th>' for label, cs in m.columns)
        + "</tr>"
    )
    head2 = (
        "<tr>"
        + "".join(
            f'<th class="call" title="{e(k)}"><div>{e(short)}</div></th>' for _, cs in m.columns for k, short in cs
        )
        + "</tr>"
    )
    body = []
    panels: dict[int, dict[str, Any]] = {}
    for g in m.groups:
        body.append(f'<tr class="guest"><th colspan="{len(cols) + 1}">{e(g.title)}</th></tr>')
        if not g.rows and g.note:
            body.append(f'<tr class="note"><td colspan="{len(cols) + 1}">{e(g.note)}</td></tr>')
        for r in g.rows:
            label = (
                f'<th class="site" title="{e(r.title)}">'
                f'<code>{e(r.label)}</code><span class="mask">{e(r.mask)}</span></th>'
            )
            cells = [_cell(r.cells[k], k, m.styles) if k in r.cells else '<td class="none"></td>' for k in cols]
            body.append(f'<tr data-row="{r.row}">{label}{"".join(cells)}</tr>')
            panels.update((c.id, c.panel) for c in r.cells.values())
    legend = "".join(
        f'<span style="background:{bg};color:{fg}" title="{e(meaning)}">{v}</span>'
        for v, (_, bg, fg, meaning) in m.styles.items()
    )
    data = {
        "styles": {v: [bg, fg] for v, (_, bg, fg, _m) in m.styles.items()},
        "results": {str(i): panels[i] for i in sorted(panels)},
    }
    payload = json.dumps(data).replace("</", "<\\/")
    errs = "".join(f"<li>{e(x)}</li>" for x in m.errors)
    facts = "".join(f"<li>{e(x)}</li>" for x in m.facts)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(m.title, quote=False)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{_CSS}</style></head><body>
<h1>{e(m.heading, quote=False)}</h1>
<div class="host">{e(m.host)}</div>
<div class="summary" id="summary">{e(m.summary)}</div>
{f'<ul class="facts" id="facts">{facts}</ul>' if m.facts else ""}
<div class="legend">each cell: <b>L</b> = today's KVM (legacy), <b>H</b> = hardened KVM, coloured by verdict: {legend}</div>
{f'<ul class="errors" id="errors">{errs}</ul>' if m.errors else ""}
<div class="wrap">
<table class="matrix" id="matrix"><thead>{head1}{head2}</thead><tbody>
{chr(10).join(body)}
</tbody></table>
<div id="panel"><h2>Details</h2><p>Hover a cell for its details; click it to pin them here.</p></div>
</div>
{_findings_html(m)}
<script type="application/json" id="check-data">{payload}</script>
<script>{_JS}</script>
</body></html>
"""


__all__ = ["Cell", "Finding", "Group", "Matrix", "Row", "render"]

"""The model's own commands: ``run`` (one round trip, every register at every step), ``decode`` (a
value from a log, explained) and ``leaves`` (the leaf table)."""

from __future__ import annotations

import json

import typer

from ..console import emit_json, fail, out, parse_json_text, pick, read_text_input
from ..kvm.trees import tree_help

# The model is imported inside the commands that use it, so that building the app (the start of
# every command, ``tdvmcall trace`` included) stays cheap.


# --- run -----------------------------------------------------------------------------------------
def run(
    file: str = typer.Argument(..., help="Scenario JSON file, or - for standard input."),
    as_json: bool = typer.Option(False, "--json", help="Print the result object (the documented JSON contract)."),
    policy: str | None = typer.Option(None, "--policy", help="Override kvm.policy: legacy or hardened."),
    tree: str | None = typer.Option(None, "--tree", help=tree_help("Override kvm.tree") + "; docs/model.md."),
) -> None:
    """Run one TDVMCALL round trip (guest -> TDX module -> KVM -> module -> guest) from a JSON scenario
    and show every register at every step.

    Scenario: {"td": {"module": "1.5", "no_rbp_mod": true}, "kvm": {"policy": "hardened"},
    "guest": {"rcx": "0xFFCC", "r11": "0xA", "r12": "0x1"}, "platform": {}}. See docs/scenario.md.
    """
    from ..kvm.tdx import POLICIES
    from ..kvm.trees import TREES
    from ..scenario import ScenarioError, parse, result_json

    if policy is not None:  # named as given, before the scenario is read; any case, as every command
        policy = pick(policy, POLICIES, "--policy", "policy")
    if tree is not None:
        tree = pick(tree, TREES, "--tree", "KVM tree")
    data = parse_json_text(read_text_input(file, "scenario"), "scenario")
    for key, value in (("policy", policy), ("tree", tree)):
        if value is not None:
            if not isinstance(data, dict):
                fail("scenario: expected a JSON object")
            data.setdefault("kvm", {})
            if isinstance(data["kvm"], dict):
                data["kvm"][key] = value
    try:
        sc = parse(data)
    except ScenarioError as e:
        fail(str(e))
    except RecursionError:  # a value nested deeper than the parser walks
        fail("scenario: nested too deeply")
    result = result_json(sc.run())
    if as_json:
        emit_json(result)
    else:
        render_run(result)


def render_run(r: dict) -> None:
    from rich.table import Table

    from ..abi.regs import GPR_NAMES, fmt_mask

    m, k = r["module"], r["kvm"]
    gsel = set(m["gpr_select"])
    out.print(
        f"[bold]TDX module {r['td']['module']}[/], NO_RBP_MOD {'on' if r['td']['no_rbp_mod'] else 'off'}"
        + (", [yellow]bus lock detected[/]" if r["td"].get("bus_lock") else "")
        + f"; control {m['control']} exposes {' '.join(m['gpr_select']) or 'nothing'}"
        + (f", {' '.join(m['xmm_select'])}" if m["xmm_select"] else "")
    )
    if m["fault"]:
        out.print(f"[red]guest fault:[/] {m['fault']} (no status, RIP not advanced)")
    elif m.get("not_modelled"):
        out.print(f"[yellow]{m['not_modelled']}[/]: the TDX module accepts it; the guest is shown unchanged.")
    elif not m["exited"]:
        out.print(
            f"[red]module refused the call:[/] guest RAX = {m['status']} ({m['status_name']}); "
            f"{'; '.join(m['problems'])}. KVM never saw it.",
            highlight=False,
        )
    if k:
        status = k["status"] or "not written"
        name = f" {k['status_name']}" if k["status_name"] else ""
        out.print(
            f"[bold]KVM ({k['policy']})[/]: {k['leaf']} -> [bold]{k['verdict']}[/], R10 {status}{name}"
            f"; kvm_exit reason {k['trace_reason']}",
            highlight=False,
        )
        if not k["resumed"]:
            out.print(
                f"  [red]KVM_RUN fails with {k['run_error']}: no status reaches the guest, it is not resumed[/]"
                " (the guest column: if userspace runs the vCPU again)"
            )
        for note in k["notes"]:
            out.print(f"  note: {note}", highlight=False)
        for key in ("missing", "unexposed_outputs", "zero_reads", "dropped_writes"):
            if k[key]:
                out.print(f"  {key.replace('_', ' ')}: {' '.join(k[key])}")
        for e in k["userspace_exits"]:
            out.print(f"  userspace exit: {json.dumps(e)}", markup=False, highlight=False)
        out.print(f"  regs_avail {fmt_mask(int(k['regs_avail'], 16))}", highlight=False)
        out.print(f"  regs_dirty {fmt_mask(int(k['regs_dirty'], 16))}", highlight=False)
    for w in r.get("warnings", []):
        out.print(f"[red]warning:[/] {w}", highlight=False)
    t = Table(show_lines=False, header_style="bold")
    for col in ("reg", "exposed", "guest before", "VMM view", "KVM wrote", "KVM re-enters with", "guest after"):
        t.add_column(col)
    unknown = set(r.get("guest_unknown", []))
    vmm_unknown = set(r.get("vmm_after_unknown", []))
    for reg in GPR_NAMES:
        before, after = r["guest_before"][reg], r["guest"][reg]
        vmm = r["vmm"][reg] if r["vmm"] else ""
        wrote = k["wrote"].get(reg, "") if k else ""
        again = r["vmm_after"][reg] if k else ""
        mark = "yes" if reg in gsel else ""
        style = "bold" if before != after else ""
        if k and reg in k["zero_reads"]:
            vmm = f"[yellow]{vmm} (zero read)[/]"
        if k and reg in k["dropped_writes"]:
            wrote = f"[red]{wrote} (dropped)[/]"
        if k and reg in vmm_unknown:
            again = "[dim]TDVPR address (host)[/]" if reg == "rcx" else "[dim]host value[/]"
        shown = f"[{style}]{after}[/]" if style else after
        if reg in unknown:
            shown = "[red]host value (unknown)[/]"
        t.add_row(reg, mark, before, vmm, wrote, again, shown)
    t.add_row("rip", "", r["guest_before"]["rip"], "", "", "", r["guest"]["rip"])
    out.print(t)


# --- decode --------------------------------------------------------------------------------------
def decode(
    value: str = typer.Argument(..., help="The value: hex (0x...) or decimal digits, 64 bits unsigned."),
    as_: str | None = typer.Option(
        None,
        "--as",
        help="Reading: status | tdvmcall-status | control | exitqual | tdcall-rax. "
        "Without it, one is picked and the output says which.",
    ),
    module: str = typer.Option(
        "1.5.05",
        "--module",
        help="Module version of the status table: 1.0.3 | 1.5.01 | 1.5.05 (1.0 and 1.5, as the other commands "
        "take them, read 1.0.3 and 1.5.05).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the explanation as JSON."),
) -> None:
    """Explain a value from a log: a TDX status, a TDVMCALL status, a control value, an exit
    qualification or a TDCALL's RAX (its leaf, by name, and whether the TDX module accepts it)."""
    from .. import decode as D
    from ..abi.codes import MODULE_TABLE_VERSIONS
    from ..abi.regs import parse_int

    if value.startswith("--"):
        fail(f"no such option: {value} (see 'tdvmcall decode --help')")
    try:
        v = parse_int(value, "VALUE")
    except ValueError as e:
        fail(str(e))
    if as_ is not None:
        as_ = pick(as_, D.KINDS, "--as", "reading")
    module = {"1.0": "1.0.3", "1.5": "1.5.05"}.get(module, module)  # a line's newest table, as check's 1.0/1.5
    if module not in MODULE_TABLE_VERSIONS:
        fail(f"--module: {module!r} is not a module version; accepted: {', '.join(MODULE_TABLE_VERSIONS)}")
    info = D.decode(v, as_, module)
    if as_json:
        emit_json({k: (f"0x{x:016x}" if k == "value" else x) for k, x in info.items()})
        return
    render_decode(info)


def render_decode(d: dict) -> None:
    from ..abi.codes import TDVMCALL_STATUS_NAMES

    value = d["value"]
    out.print(f"[bold]0x{value:016x}[/] read as [bold]{d['reading']}[/] ({d['why']})", highlight=False)
    kind = d["kind"]
    if kind == "tdx-status":
        name = d["name"] or "unknown status"
        out.print(f"  name: {name}  (module {d['module']})", highlight=False)
        if "operand_id" in d:
            out.print(f"  operand id: {d['operand_id']} ({d['operand_name'] or 'unknown operand'})", highlight=False)
        out.print(
            f"  class {d['class']:#04x}, details L1 {d['details_l1']:#04x}, details L2 {d['details_l2']:#010x}",
            highlight=False,
        )
        for other, other_name in d["in_other_versions"].items():
            out.print(f"  in module {other}: {other_name}", highlight=False)
        flags = [f for f in ("error", "non_recoverable", "fatal", "host_recoverability_hint") if d[f]]
        out.print(f"  bits: {', '.join(flags) or 'none of error/non-recoverable/fatal/hint'}")
    elif kind == "tdvmcall-status":
        out.print(
            f"  {d['name'] or 'unknown TDVMCALL status'}; error bit {'set' if d['error'] else 'clear'}"
            f"  (known: {', '.join(f'{n}={v:#x}' for v, n in TDVMCALL_STATUS_NAMES.items())})",
            highlight=False,
        )
    elif kind in ("control", "exitqual"):
        out.print(f"  GPRs: {' '.join(d['gprs']) or 'none'}   (gpr_select {d['gpr_select']:#06x})", highlight=False)
        out.print(f"  XMMs: {' '.join(d['xmms']) or 'none'}", highlight=False)
        if kind == "control":
            if d["reserved"]:
                out.print(f"  reserved bits 63:32: {d['reserved'] >> 32:#x}", highlight=False)
            for what, ok in d["accepted"].items():
                why = "" if ok else ": " + "; ".join(d["problems"][what])
                out.print(f"  {what}: {'accepted' if ok else '[red]rejected[/]'}{why}", highlight=False)
            if d["hardened_completes"]:
                out.print(f"  hardened KVM completes: {', '.join(d['hardened_completes'])}", highlight=False)
        else:
            out.print(f"  VM index: {d['vm']}" + (f"; unexpected bits {d['other_bits']:#x}" if d["other_bits"] else ""))
    elif kind == "tdcall-rax":
        out.print(
            f"  leaf {d['leaf']} ({d['name'] or 'unknown leaf'}), version {d['version']}"
            + (f", reserved bits 63:24 {d['reserved'] >> 24:#x}" if d["reserved"] else ""),
            highlight=False,
        )
        if d["accepted"]:
            what = "a TDVMCALL" if d["leaf"] == 0 else "not a TDVMCALL (not modelled)"
            out.print(f"  the TDX module accepts it: {what}", highlight=False)
        else:
            out.print(
                f"  [red]rejected[/]: {'; '.join(d['problems'])}; the guest gets RAX = {d['status']:#018x}",
                highlight=False,
            )
    if not d.get("known", True):
        out.print("  [yellow]not a known value of this kind[/]")


# --- leaves --------------------------------------------------------------------------------------
def leaves(
    name: str | None = typer.Argument(
        None, help="Show one call only (e.g. Instruction.IO, or the catalog's short word: IO, RDMSR, MMIO)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the table as JSON."),
) -> None:
    """Print the leaf table: what each TDVMCALL reads and writes, under which conditions, the minimal
    GPR mask hardened KVM needs, and where each fact was read."""
    from rich.table import Table

    from ..judge import CALL_WORDS
    from ..kvm import leaves as L

    rows = L.LEAVES
    if name is not None:
        try:
            # RDMSR as check --call and catalogs write it; without regard to case, as they read it
            words = {w.casefold(): leaf for w, leaf in CALL_WORDS.items()}
            words |= {n.casefold(): n for n in L.BY_NAME}
            rows = (L.by_name(words.get(name.strip().casefold(), name)),)
        except KeyError as e:
            fail(str(e.args[0]))
    if as_json:
        emit_json([L.as_dict(leaf) for leaf in rows])
        return
    columns = ("call", "select", "reads", "writes", "minimal mask", "source")
    t = Table(header_style="bold", show_lines=True)
    for col in columns:
        t.add_column(col, no_wrap=col in ("call", "select"))
    cells = []
    for leaf in rows:
        d = L.as_dict(leaf)
        sel = f"R11={leaf.r11:#x}" if leaf.family == "ghci" else f"R10={leaf.nr}"
        reads = "\n".join(_operand_text(o) for o in d["inputs"]) or "-"
        writes = "\n".join(_operand_text(o) for o in d["outputs"]) or "-"
        masks = "\n".join(f"{k}: {v}" for k, v in d["minimal_masks"].items())
        cells.append((leaf.name, sel, reads, writes, masks, leaf.source))
        t.add_row(*cells[-1])
    if out.fits(t):
        out.print(t)
        return
    # narrower than the table's words (an 80-column terminal): one block per call, a line per column
    for i, (name, sel, *rest) in enumerate(cells):
        block = Table.grid(padding=(0, 1))
        block.add_column(style="bold", no_wrap=True)
        block.add_column()
        for col, value in zip(columns[2:], rest):
            block.add_row(col, value)
        out.print(("\n" if i else "") + f"[bold]{name}[/] ({sel})", highlight=False)
        out.print(block)


def _operand_text(o: dict) -> str:
    s = o["reg"]
    if o.get("required") is False:
        s += " (optional)"
    if o.get("on", "any") != "any":
        s += f" on {o['on']}"
    if "when" in o:
        s += f" if {o['when']}"
    return s


def register(app: typer.Typer) -> None:
    app.command()(run)
    # a value that starts with '-' is the value (and is told it is negative), not an unknown option
    app.command(context_settings={"ignore_unknown_options": True})(decode)
    app.command()(leaves)

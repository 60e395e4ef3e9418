"""``tdvmcall sweep`` and ``tdvmcall vectors export|verify``.  Composition only: the sweep lives in
``sweep.py``, the corpus in ``vectors.py``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..kvm.trees import tree_help

SWEEP_HELP = "\n\n".join(
    " ".join(paragraph.split())
    for paragraph in (
        """Answer exhaustively which GPR masks each call accepts. For every call of the leaf table under
    each of its cases (IO in and out, MMIO read and write, MapGPA RETRY, ...), all 65,536 masks go
    through the TDX module (1.5, with and without NO_RBP_MOD) and KVM (legacy and hardened).""",
        """It prints the verdict first (do the two routes agree?), then per call and case: the minimal
    mask hardened KVM needs; how many masks each layer accepts (module; legacy 'silent-ok': today's
    KVM handles the mask silently correctly, it ran the call the guest made and read no unexposed
    register and wrote none; hardened: completes); 'up-set': yes when the hardened set is exactly
    the module-accepted masks that contain the minimal one; and whether the simulation agrees with
    the leaf table ('agree'). The same words are explained under the table.""",
        """Two routes, marked in the output. Simulation (sim): the module's real control check over every
    mask, and the real round trip (module, KVM handlers, resume) on one mask per class of masks that
    the model was observed to treat alike (registers it read, wrote or reported; checked at both ends
    of every class, else every mask is run); --exhaustive runs every mask instead (minutes). Table
    (table): minimal_mask, condition_masks and forbidden_gprs of the leaf table, nothing run.""",
        """Exit status: 0 when the two routes agree for every call, 1 when they do not (said loudly),
    2 for bad input. See docs/sweep.md.""",
    )
)


def sweep(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document: one row per call and case."),
    exhaustive: bool = typer.Option(
        False,
        "--exhaustive",
        help="Run the model on every mask the module accepts instead of one per "
        "observed class (the ground truth of the fast route; takes minutes).",
    ),
    call: list[str] | None = typer.Option(
        None, "--call", help="Only this call (repeatable; e.g. Instruction.IO, or the catalog's short word: IO)."
    ),
    jobs: int = typer.Option(
        0,
        "--jobs",
        help="Worker processes (0: one per CPU, at most 4); a larger number is lowered to one per CPU "
        "available and per row.",
    ),
    tree: str = typer.Option(
        "kvm-x86",
        "--tree",
        help=tree_help("KVM tree whose rules the model follows") + ". See docs/model.md, Fidelity.",
    ),
) -> None:
    from ..console import available_cpus, emit_json, out, pick, worker_count
    from ..judge import CALL_WORDS
    from ..kvm import leaves as L
    from ..kvm.trees import TREES
    from .sweep import run_sweep

    tree = pick(tree, TREES, "--tree", "KVM tree")  # any case, as every command

    known = [leaf.name for leaf in L.LEAVES + (L.UNKNOWN_HYPERCALL,)]
    if call:  # RDMSR as check --call and catalogs write it; any case, as every command
        words = {w.casefold(): leaf for w, leaf in CALL_WORDS.items()}
        call = [pick(words.get(c.strip().casefold(), c), known, "--call", "call of the leaf table") for c in call]
    rows = sum(1 for leaf in L.LEAVES + (L.UNKNOWN_HYPERCALL,) if not call or leaf.name in call for _ in leaf.cases)
    # as fuzz --workers: 0 is the default (one per CPU, at most 4), never more than CPUs or rows
    jobs = worker_count(jobs, "--jobs", min(available_cpus(), 4), rows)
    result = run_sweep(exhaustive, call, jobs, tree)
    if as_json:
        emit_json(result)
    else:
        _render_sweep(result, out)
    raise typer.Exit(0 if result["agree"] else 1)


#: what the table's shorter headers mean, printed under it (and in --help)
SWEEP_LEGEND = (
    "module (sim): masks the TDX module accepts (its real control check on each of the 65,536)",
    "legacy silent-ok: masks today's KVM handles silently correctly: it runs the call the guest made, "
    "reads no register the guest did not expose and writes none",
    "hardened (sim): masks hardened KVM completes; (table): what the leaf table predicts",
    "up-set (sim): yes when the masks hardened KVM completes are exactly the module-accepted masks "
    "that contain the minimal one (it must be yes)",
)


def _render_sweep(result: dict, out) -> None:
    from rich import box
    from rich.table import Table

    from .sweep import NR_MASKS

    # the answer first, as check and scan do: the verdict, then each disagreement, then the table
    verdict = (
        "[bold green]simulation and leaf table agree for every call and case[/]"
        if result["agree"]
        else "[bold red]SIMULATION AND LEAF TABLE DISAGREE (listed below)[/]"
    )
    n, trips = len(result["rows"]), result["round_trips"]
    out.print(
        f"{verdict}: {n} {'call x case' if n == 1 else 'calls x cases'}, "
        f"{trips:,} model round trip{'' if trips == 1 else 's'} "
        f"({result['route']} route), {result['seconds']:.2f} s",
        highlight=False,
        soft_wrap=True,
    )
    for r in result["rows"]:
        for p in r["problems"]:
            out.print(f"[bold red]DISAGREEMENT[/] {r['call']} / {r['case']}: {p}", highlight=False, soft_wrap=True)
    fallbacks = sorted(
        {
            f"{r['call']} / {r['case']}"
            for r in result["rows"]
            for e in r["td"].values()
            for p in e["routes"].values()
            if p["disagreeing_classes"]
        }
    )
    if fallbacks:
        out.print(f"[yellow]footprint check failed, every mask run instead:[/] {', '.join(fallbacks)}", soft_wrap=True)
    t = Table(
        header_style="bold",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
        caption=f"module 1.5; masks accepted out of {NR_MASKS:,}; (sim) = simulation, {result['route']} route; "
        "(table) = leaf table",
    )
    for col in (
        "call",
        "case",
        "NO_RBP\n_MOD",
        "minimal\n(table)",
        "minimal\n(sim)",
        "module\n(sim)",
        "legacy\nsilent-ok",
        "hardened\n(sim)",
        "hardened\n(table)",
        "up-set\n(sim)",
        "agree",
    ):
        t.add_column(col, no_wrap=True, justify="left" if col in ("call", "case") else "right")
    for r in result["rows"]:
        for i, (td, e) in enumerate(r["td"].items()):
            hard = e["hardened_completes"]
            t.add_row(
                r["call"] if i == 0 else "",
                r["case"] if i == 0 else "",
                "on" if td.endswith("/no_rbp_mod") else "off",
                e["table"]["minimal"],
                hard["minimal"] or "none",
                str(e["module_accepts"]),
                str(e["legacy_silent_ok"]["count"]),
                str(hard["count"]),
                str(e["table"]["hardened_accepts"]),
                "yes" if hard["upset"] else "[bold red]NO[/]",
                "yes" if e["agree"] else "[bold red]NO[/]",
                end_section=i == len(r["td"]) - 1,
            )
    out.print(t)
    for line in SWEEP_LEGEND:
        out.print(line, highlight=False, soft_wrap=True)


# --- vectors -------------------------------------------------------------------------------------
vectors_app = typer.Typer(
    help="Conformance vectors: a deterministic corpus of TDVMCALL round trips (input scenario and "
    "expected module, VMM, KVM and guest results) that another implementation can be checked "
    "against. See docs/vectors.md.",
    no_args_is_help=True,
)


@vectors_app.command("export")
def export(
    directory: Path = typer.Argument(
        ..., metavar="DIR", help="Directory to write (created; must be empty unless --force)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace the corpus already in DIR."),
    as_json: bool = typer.Option(False, "--json", help="Print what was written as JSON."),
    tree: str = typer.Option(
        "kvm-x86",
        "--tree",
        help=tree_help("KVM tree whose rules the model follows") + ". See docs/model.md, Fidelity.",
    ),
) -> None:
    """Write the corpus: for every call and case of the leaf table, the boundary masks (exact minimal,
    each one register short, Linux's 0xFFCC, RBP, RSP and a reserved bit) under both KVM policies,
    module 1.0 and 1.5, with and without NO_RBP_MOD; plus index.json and vector.schema.json.
    The same model writes the same bytes."""
    from ..console import emit_json, fail, out, pick
    from ..kvm.trees import TREES
    from .vectors import CorpusError
    from .vectors import export as do_export

    tree = pick(tree, TREES, "--tree", "KVM tree")  # any case, as every command
    try:
        summary = do_export(directory, force, tree)
    except CorpusError as e:
        fail(str(e))
    except OSError as e:
        fail(f"{directory}: cannot write ({e.strerror})")
    if as_json:
        emit_json(summary)
    else:
        out.print(
            f"wrote {summary['vectors']} vectors ({summary['vector_bytes']:,} bytes) and index.json, "
            f"vector.schema.json to {directory} ({summary['files']} files, {summary['bytes']:,} bytes)",
            highlight=False,
        )


@vectors_app.command("verify")
def verify(
    directory: Path = typer.Argument(
        ..., metavar="DIR", help="A corpus: index.json, vector.schema.json, vectors/*.json."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (every difference)."),
    limit: int = typer.Option(50, "--limit", help="Print at most this many differences (0: all); --json prints all."),
) -> None:
    """Replay every vector of a corpus through the model and report every difference, field by field
    (file, path, expected, got). Exit status: 0 when every vector matches, 1 on any difference,
    2 for a malformed corpus (no index, bad JSON, a file that fails the schema, a bad scenario)."""
    from ..console import emit_json, fail, out, require_count
    from .vectors import CorpusError
    from .vectors import verify as do_verify

    require_count(limit, "--limit", 0, "0 prints every difference")
    try:
        report = do_verify(directory)
    except CorpusError as e:
        fail(str(e))
    if as_json:
        emit_json(report)
    else:
        diffs = report["differences"]
        shown = diffs if limit <= 0 else diffs[:limit]
        for d in shown:
            out.print(
                f"{d['file']}: {d['path']}: expected {_show(d['expected'])}, got {_show(d['got'])}",
                highlight=False,
                markup=False,
            )
        if len(shown) < len(diffs):
            out.print(f"... and {len(diffs) - len(shown)} more differences (--limit 0 or --json for all)")
        if report["ok"]:
            out.print(f"[green]all {report['vectors']} vectors match the model[/]")
        else:
            unlisted = f", {report['unlisted']} of them not listed in index.json" if report["unlisted"] else ""
            out.print(
                f"[bold red]{report['failing']} of {report['vectors']} vector files differ from the model "
                f"({len(diffs)} differences{unlisted})[/]"
            )
    raise typer.Exit(0 if report["ok"] else 1)


def _show(value: object) -> str:
    """A JSON value as JSON; an absent key as <absent>."""
    from .vectors import ABSENT

    return ABSENT if value == ABSENT else json.dumps(value)


def register(app: typer.Typer) -> None:
    app.command("sweep", help=SWEEP_HELP)(sweep)
    app.add_typer(vectors_app, name="vectors")


__all__ = ["register"]

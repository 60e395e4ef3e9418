"""``tdvmcall check``: real guests' TDVMCALL masks against a host (the TDX module, today's KVM and
the hardened one).  Composition only: the catalog and the check live in ``catalog.py``, the
renderers in ``report.py``."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import typer

from ..kvm.trees import tree_help

CHECK_HELP = "\n\n".join(
    " ".join(paragraph.split())
    for paragraph in (
        """Check every TDVMCALL of real guests' call sites against a host: the TDX module with the TD's
    attributes, then KVM as it is today ('legacy') and with the hardened register validation.""",
        """Each call is run through the model once per condition (IO in and out, MMIO read and write,
    MapGPA success and RETRY, ReportFatalError with and without a GPA, ...). Verdicts per KVM policy:
    module-rejects (the module fails the call back to the guest; KVM never sees it), hardened-refuses
    (registers missing, inputs or outputs), legacy-silent (today's KVM reads an unexposed input as 0
    or drops an output), ok; not-kvm for calls that are not KVM's (Hyper-V hypercalls, MigTD).""",
        """The report leads with the answer: the verdict under --policy, the counts, and one line per
    finding (what fails, at which guest and site, and why); then one row per site with its calls
    grouped by verdict and the registers it exposes for nothing. --verbose shows every call and case
    with its details, as --json, --markdown and --html always do.""",
        """Without --catalog the shipped catalog (Linux, td-shim, EDK2, OpenVMM, COCONUT-SVSM, tdx-guest,
    Gramine-TDX, KVM's TDX selftests) is checked. Exit status: 0 when every call passes --policy, 1 when some do not, 2 for
    bad input (a bad catalog row is named on stderr; the other rows are still checked).""",
        """Words on the screen: a call's registers are 'exposed' when the mask (RCX, its bits 15:0
    'gpr_select') shares them with the host; 'exposed for nothing' are registers shared that none
    of the site's calls reads or writes (the host can read and overwrite them); 'legacy' is KVM as
    it is today, 'hardened' KVM validating the mask; NO_RBP_MOD is the TD attribute under which a
    1.5 module refuses a mask sharing RBP (a 1.0 module has no such attribute and lets RBP through);
    a 'case' is one condition a call is run under (IO in, MapGPA RETRY, ...).""",
        """Examples: 'tdvmcall check', 'tdvmcall check --mask 0x1C00 --call Instruction.RDMSR',
    'tdvmcall check --catalog mine.csv --html report.html', 'tdvmcall check --rbp-mod --json'.
    See docs/check.md.""",
    )
)


def check(
    catalog: Path | None = typer.Option(
        None,
        "--catalog",
        metavar="FILE.csv",
        help="Your own call sites: CSV with columns guest, snapshot, file, function, mask_hex, tdvmcalls, note "
        "(tdvmcalls: names like 'RDMSR WRMSR', 'IO MMIO', 'all', 'CPUID leaf 0xB'; see docs/check.md); "
        "'-' reads it from standard input.",
    ),
    mask: str | None = typer.Option(
        None, "--mask", help="What-if: check this RCX control value (e.g. 0x1C00) instead of a catalog."
    ),
    call: list[str] | None = typer.Option(
        None,
        "--call",
        help="What-if: the call(s) made with --mask (repeatable; e.g. Instruction.RDMSR, RDMSR, "
        "MapGPA, KVM-hypercall). Default: every call KVM implements.",
    ),
    policy: str = typer.Option(
        "hardened", "--policy", help="The KVM policy the exit status follows: hardened or legacy."
    ),
    module: str = typer.Option("1.5", "--module", help="TDX module version: 1.0, 1.5 (or 1.0.3, 1.5.01, 1.5.05)."),
    no_rbp_mod: bool = typer.Option(
        True, "--no-rbp-mod/--rbp-mod", help="The TD's NO_RBP_MOD attribute (on: as Linux KVM creates every TD)."
    ),
    tree: str = typer.Option("kvm-x86", "--tree", help=tree_help() + "; docs/model.md, Fidelity."),
    guest: list[str] | None = typer.Option(
        None,
        "--guest",
        help="Only these guests of the catalog (repeatable): a name, or its start when that names one guest "
        "only (kvm-selftests, tdx-guest); case does not matter.",
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON document: summary, errors and one object per site and call."
    ),
    markdown: bool = typer.Option(
        False, "--markdown", help="Print Markdown: the summary, the findings, one table per guest with every call."
    ),
    verbose: bool = typer.Option(
        False,
        "--verbose",
        "-v",
        help="In the terminal, one row per call with the details of every case (which case fails, its "
        "input values, the registers missing), instead of one row per site.",
    ),
    html_file: Path | None = typer.Option(
        None, "--html", metavar="FILE", help="Also write a self-contained HTML report (matrix of sites x calls)."
    ),
) -> None:
    from ..console import fail, out, output_file, pick, read_text_input, writable_file
    from ..judge import HostError, host_for
    from ..kvm.trees import TREE_NAMES
    from .catalog import Catalog, CatalogError, Checker, Site, what_if
    from .report import (
        Checked,
        html_report,
        markdown_parts,
        rich_report_parts,
        write_report_json,
    )

    # validate options (words without regard to case, as in every command)
    policy, tree = policy.strip().lower(), pick(tree, TREE_NAMES, "--tree", "KVM tree")
    try:
        host = host_for(module, no_rbp_mod, tree, policy)
    except HostError as e:
        fail(f"--{e.option}: {e}")
    if as_json and markdown:
        fail("--json and --markdown: choose one output format")
    if call and (blank := [c for c in call if not c.strip()]):
        fail(f"--call: {blank[0]!r} names no call; give one like Instruction.RDMSR (no --call: every call)")
    if guest and (blank := [g for g in guest if not g.strip()]):
        fail(f"--guest: {blank[0]!r} names no guest")
    if html_file is not None:  # before the check: a bad path must not cost the report printed first
        writable_file(html_file, "--html", inputs=[catalog])

    # the sites: a what-if or a catalog, read row by row each time a report goes over them
    errors: list[str] = []
    rows: Callable[[], Iterable[Site | str]]
    try:
        if mask is not None:
            if catalog is not None:
                fail("--mask and --catalog: a what-if checks one mask; drop one of them")
            whatif = [what_if(mask, call)]
            rows = lambda: whatif  # noqa: E731
            source = f"what-if --mask {mask}"
        else:
            if call:
                fail("--call needs --mask (the control value the call is made with)")
            if catalog is not None and str(catalog) == "-":
                cat = Catalog.read(None, read_text_input("-", "--catalog"))
                source = "standard input"
            else:
                cat = Catalog.read(catalog)
                source = str(catalog) if catalog else "the shipped catalog"
            _, errors = cat.header()
            rows = cat.rows
        chosen: set[str] | None = None
        if guest:  # a guest's name, or a prefix naming one only, without regard to case
            known = sorted({s.guest for s in rows() if isinstance(s, Site)})
            chosen = {pick(g, known, "--guest", "guest of the catalog", prefix=True) for g in guest}
        checker = Checker(host)
        seen = [0, 0]  # passes made; sites in the catalog (before --guest), counted on the first pass

        def sites() -> Iterator[tuple[Site, list]]:
            first = not seen[0]
            seen[0] += 1
            for row in rows():
                if not isinstance(row, Site):
                    if first:
                        errors.append(row)
                    continue
                if first:
                    seen[1] += 1
                if chosen is None or row.guest in chosen:
                    yield row, checker.check(row)

        checked = Checked(sites, len(errors))  # the first pass: counts, verdicts, findings
    except CatalogError as e:
        fail(f"--mask/--call: {e}" if mask is not None else str(e))
    if not seen[1] and not errors:
        fail(f"{source}: no call sites to check (an empty catalog passes nothing)")

    # report
    for line in errors:
        sys.stderr.write(f"tdvmcall: error: {line}\n")  # one line per bad row, as fail() writes
    if as_json:
        write_report_json(sys.stdout.write, checked, host, policy, source, errors)
    elif markdown:
        for text in markdown_parts(checked, host, policy, source, len(errors)):
            sys.stdout.write(text)
    else:
        for part in rich_report_parts(checked, host, policy, source, verbose, len(errors)):
            out.print(part)
    if html_file is not None:  # the page is built whole (html_matrix.py), from every check
        page = html_report([c for _, cs in checked.sites() for c in cs], host, policy, source, errors)
        try:  # renamed into place when complete: an interrupt never leaves part of a page
            with output_file(html_file) as partial:
                partial.write_text(page)
        except OSError as e:
            fail(f"--html: cannot write {html_file} ({e.strerror})")
        if not as_json and not markdown:
            out.print(f"wrote {html_file}", highlight=False)
    passed = checked.passes(policy)
    checked.close()
    if errors:
        raise typer.Exit(2)
    raise typer.Exit(0 if passed else 1)


def register(app: typer.Typer) -> None:
    app.command("check", help=CHECK_HELP)(check)


__all__ = ["register"]

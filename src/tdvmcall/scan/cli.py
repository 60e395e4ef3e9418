"""``tdvmcall scan``: every TDCALL in firmware images, kernels and binaries, judged as ``check``
judges a catalog row.  Composition only: containers in ``containers.py``, decoding and data flow in
``flow.py``, sites and judgements in ``analyze.py``, renderers in ``report.py``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from ..kvm.trees import tree_help

if TYPE_CHECKING:
    from ..judge import Host
    from .analyze import Image

SCAN_HELP = "\n\n".join(
    " ".join(paragraph.split())
    for paragraph in (
        """Find every TDCALL (66 0F 01 CC, decoded as an instruction by iced-x86) in firmware images,
    kernels and binaries, recover the registers it is made with, and judge each TDVMCALL against the
    TDX module and both KVM policies, as 'tdvmcall check' judges a catalog row.""",
        """Containers, recursively (each site named by its chain, outer to inner): directories; gzip, xz,
    zstd, lz4, bzip2; bzImage (its setup code, its decompressor and the kernel inside); unified kernel
    images (the stub's code and the bzImage in .linux); ELF, relocatable objects too (sites named by
    function or label when a symbol table exists); PE/COFF and TE (EFI drivers and applications); UEFI flash images and volumes (.fd, .fv):
    volumes, FFS files named by their UI section, sections, EDK2's LZMA section, nested volumes;
    anything else as raw x86-64 code. Decompression is capped at 1 GiB per input.""",
        """Values (RAX = the TDCALL leaf, RCX = the mask, R10/R11 = the call, the inputs that decide its
    case) come from data flow in the function: immediates, copies, zeroing idioms, partial writes,
    stack slots; a value from a parameter, or from a struct the caller filled, is followed to every
    direct caller (two levels; one row per caller).
    What cannot be known is said ('loaded from memory', 'from caller, unresolved'), never guessed.""",
        """The report leads with the answer: the verdict under --policy, then per input its summary,
    one line per finding (what fails or could not be judged, where, why), and a compact table in which
    the same code linked into many modules is one row (how many modules, the calls through it, the
    verdicts). --verbose shows one row per TDCALL with how each register was found; --json and --html
    always give every call.""",
        """Exit status: 0 when every call was judged and passes --policy; 1 when some do not pass, or
    could not be judged (a mask, call or TDCALL leaf not recovered: never a pass, unless
    --allow-unresolved); 2 when an input could not be read, is broken or holds no code (one line each
    on stderr; the other inputs are still scanned). A file reached twice through links is scanned once.""",
        """Examples: 'tdvmcall scan OVMF.fd', 'tdvmcall scan /boot/vmlinuz --json',
    'tdvmcall scan fw/ --to-catalog mine.csv && tdvmcall check --catalog mine.csv'. See docs/scan.md.""",
    )
)


def scan(
    paths: list[Path] = typer.Argument(..., metavar="PATH...", help="Files or directories to scan (one or more)."),
    module: str = typer.Option("1.5", "--module", help="TDX module version: 1.0, 1.5 (or 1.0.3, 1.5.01, 1.5.05)."),
    no_rbp_mod: bool = typer.Option(
        True, "--no-rbp-mod/--rbp-mod", help="The TD's NO_RBP_MOD attribute (on: as Linux KVM creates every TD)."
    ),
    policy: str = typer.Option(
        "hardened", "--policy", help="The KVM policy the exit status follows: hardened or legacy."
    ),
    tree: str = typer.Option("kvm-x86", "--tree", help=tree_help() + "; docs/model.md, Fidelity."),
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON document: inputs, sites, summary (schema in docs/scan.md)."
    ),
    verbose: bool = typer.Option(
        False,
        "--verbose",
        "-v",
        help="One row per TDCALL instruction, with how each register was found and every finding and note.",
    ),
    html_file: Path | None = typer.Option(
        None,
        "--html",
        metavar="FILE",
        help="Also write a self-contained HTML page: the matrix check --html draws, sites x calls.",
    ),
    allow_unresolved: bool = typer.Option(
        False,
        "--allow-unresolved",
        help="Exit 0 even when some calls could not be judged (their mask, call or TDCALL leaf not recovered); "
        "without it such a call is not a pass (exit 1). They are still listed as 'unresolved'.",
    ),
    catalog_file: Path | None = typer.Option(
        None,
        "--to-catalog",
        metavar="FILE.csv",
        help="Also write the resolved sites as catalog rows that 'tdvmcall check --catalog' reads; '-' writes "
        "them to standard output instead of the report ('... --to-catalog - | tdvmcall check --catalog -').",
    ),
) -> None:
    from ..console import emit_json, fail, out, output_file, pick, writable_file
    from ..judge import HostError, host_for
    from ..kvm.trees import TREE_NAMES
    from .report import catalog_csv, html_report, left_out_text, outcome, report_json, rich_report

    # validate options (words without regard to case, as in every command)
    tree = pick(tree, TREE_NAMES, "--tree", "KVM tree")
    policy = policy.strip().lower()
    try:
        host = host_for(module, no_rbp_mod, tree, policy)
    except HostError as e:
        fail(f"--{e.option}: {e}")
    to_stdout = catalog_file is not None and str(catalog_file) == "-"
    if to_stdout and as_json:
        fail("--json and --to-catalog -: both would go to standard output; name a file for one of them")
    outputs = (("--html", html_file), ("--to-catalog", None if to_stdout else catalog_file))
    if any(target is not None for _, target in outputs):
        from .containers import input_files

        # the files read (a directory's too): an output over one of them would replace it
        inputs = [f for p in paths if p.exists() for f in input_files(p)]
        for option, target in outputs:
            if target is not None:  # before the scan: a bad path must not cost the report printed first
                writable_file(target, option, inputs)
        both = html_file is not None and catalog_file is not None and not to_stdout
        if both and html_file.resolve() == catalog_file.resolve():  # type: ignore[union-attr]  # one would be lost
            fail(f"--html and --to-catalog both name {catalog_file}; give each its own file")

    # scan every input; a bad one is said and the others go on
    images = scan_inputs(paths, host)

    if not images:  # e.g. an empty directory: a CI job must not pass on nothing scanned
        fail(f"{', '.join(map(str, paths))}: no file to scan")
    result = outcome(images, policy, allow_unresolved)
    for img in images:
        for line in img.problems:
            sys.stderr.write(f"tdvmcall: error: {line}\n")  # one line per broken input, as fail() writes
    if as_json:
        emit_json(report_json(images, host, policy, allow_unresolved))
    elif not to_stdout:  # with --to-catalog -, standard output holds the catalog alone
        out.print(rich_report(images, host, policy, verbose, allow_unresolved))
    if html_file is not None:
        page = html_report(images, host, policy, allow_unresolved)
        try:  # renamed into place when complete: an interrupt never leaves part of a page
            with output_file(html_file) as partial:
                partial.write_text(page)
        except OSError as e:
            fail(f"--html: cannot write {html_file} ({e.strerror})")
        if not as_json and not to_stdout:
            out.print(f"wrote {html_file}", highlight=False)
    if catalog_file is not None:
        text, left_out = catalog_csv(images)
        extra = f" ({left_out_text(left_out)})" if left_out else ""
        if to_stdout:
            sys.stdout.write(text)
            if extra:
                sys.stderr.write(f"tdvmcall: warning: catalog on standard output{extra}\n")
        else:
            try:
                with output_file(catalog_file) as partial:
                    partial.write_text(text)
            except OSError as e:
                fail(f"--to-catalog: cannot write {catalog_file} ({e.strerror})")
            if not as_json:
                out.print(f"wrote {catalog_file}{extra}", highlight=False)
    raise typer.Exit(result.exit_status)


def scan_inputs(paths: list[Path], host: Host) -> list[Image]:
    """Every file of every input, analysed once: a file reached again (the same file through a
    symbolic or hard link, in a directory or on the command line) is not scanned twice, said on the
    first one's image.  A path that cannot be read is its own image with one problem line; so is a
    file holding no code (empty, or nothing scan recognises), and a directory none of whose files
    holds code: nothing to judge is never a pass."""
    from .analyze import Image, analyze
    from .containers import input_files, no_code, open_file, unreadable

    images: list[Image] = []
    cache: dict = {}
    seen: dict[tuple[int, int], Image] = {}
    for path in paths:
        try:
            path.stat()
        except OSError as e:
            images.append(Image(str(path), [], [unreadable(path, e)], [], {}, 0, 0))
            continue
        mine: list[Image] = []
        for p in input_files(path):
            try:
                st = p.stat()
                key: tuple[int, int] | None = (st.st_dev, st.st_ino)
            except OSError:
                key = None
            if key is not None and key in seen:
                first = seen[key]
                how = "named again" if str(p) == first.path else f"the same file as {first.path} (a link)"
                first.skipped.append(f"{p}: {how}; scanned once")
                continue
            found = open_file(p)
            img = analyze(str(p), found, host, cache)
            if key is not None:
                seen[key] = img
            if not found.codes and not found.problems and not path.is_dir():
                img.problems.append(no_code(str(p), found))
            elif not found.codes and not found.problems:
                img.skipped.append(no_code(str(p), found))
            mine.append(img)
        if path.is_dir() and mine and not any(img.bytes_code or img.problems for img in mine):
            mine[0].problems.append(f"{path}: no code found in any of its {len(mine)} files")
        images += mine
    return images


def register(app: typer.Typer) -> None:
    app.command("scan", help=SCAN_HELP)(scan)


__all__ = ["register"]

"""``tdvmcall export-c DIR``: write the hardened validation as C (``generate.py``), or check that a
copy is still what the model writes."""

from __future__ import annotations

import difflib
import hashlib
import sys
from pathlib import Path

import typer

from ..kvm.trees import DEFAULT_TREE, TREES

EXPORT_C_HELP = "\n\n".join(
    " ".join(paragraph.split())
    for paragraph in (
        """Write the hardened validation as C for KVM: DIR/tdvmcall_regs.h (the contract) and
    DIR/tdvmcall_regs.c (a static const table generated from the leaf table, and
    tdvmcall_check_regs()), in kernel style, ready to sit next to arch/x86/kvm/vmx/tdx.c. They build
    in the kernel and in userspace (cc -std=gnu11 -Wall -Wextra -Werror). The same model writes the
    same bytes.""",
        """tdvmcall_check_regs(regs, &missing, &unexposed) returns 0 (dispatch), 1 (refuse: R10 =
    INVALID_OPERAND) or 2 (R10 not exposed: no status can reach the guest), exactly as the model's
    hardened policy decides; the tests prove it on every GPR mask and every case.""",
        """DIR is created if needed; the two files are overwritten. --check writes nothing and exits 1
    when DIR's copies differ from what the model writes (for a kernel tree's CI): it says which file
    is missing and shows a unified diff (yours, then the model's) of one that differs. Exit status 2 for
    a bad DIR; 1 if the leaf table holds a condition the generator cannot express (never dropped
    silently). See docs/kvm.md.""",
    )
)


def export_c(
    dir_arg: str | None = typer.Argument(
        None, metavar="[DIR]", help="Directory to write tdvmcall_regs.h and tdvmcall_regs.c into."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print what was written (or checked) as JSON."),
    check: bool = typer.Option(
        False, "--check", help="Write nothing; exit 1 if DIR's files differ from what the model writes."
    ),
    tree: str = typer.Option(
        None,
        "--tree",
        metavar="TREE",
        help="The model's kernel tree the C is for (how KVM there dispatches a bus-lock exit): "
        f"{', '.join(TREES)}; default {DEFAULT_TREE}. Required with --series.",
    ),
    series: str | None = typer.Option(
        None,
        "--series",
        metavar="SERIES_DIR",
        help="Instead of DIR: write a git format-patch series for the kernel tree --kernel "
        "(the files, the call in KVM's TDVMCALL exit path, a KUnit suite); see docs/kvm.md.",
    ),
    kernel: str = typer.Option(
        ".", "--kernel", metavar="SRC", help="With --series: the pristine kernel tree the series is for (default .)."
    ),
    vectors: str | None = typer.Option(
        None,
        "--vectors",
        metavar="CORPUS",
        help="With --series: a conformance corpus (tdvmcall vectors export CORPUS); its hardened "
        "vectors become the KUnit cases.",
    ),
    author: str | None = typer.Option(
        None,
        "--author",
        metavar="'NAME <EMAIL>'",
        help="With --series: From: and Signed-off-by: of the patches (default: git config user.name/email).",
    ),
) -> None:
    from .. import __version__
    from ..console import cannot_write, emit_json, fail, out, output_files, pick
    from ..kvm.trees import TREE_NAMES
    from .generate import DEFAULT_TREE, GeneratorError, build_table, generate, table_fingerprint

    if tree is not None:  # any case, as every command
        tree = pick(tree, TREE_NAMES, "--tree", "KVM tree")

    if series is not None:
        if dir_arg is not None or check:
            fail("--series writes a patch series: give no DIR and no --check with it")
        _export_series(series, tree, kernel, vectors, author, as_json)
        return
    for opt, val in (("--vectors", vectors), ("--author", author)):
        if val is not None:
            fail(f"{opt} goes with --series")
    if dir_arg is None:
        fail("DIR: missing; give the directory to write into (. for this one), or --series SERIES_DIR")
    if not dir_arg.strip():  # Path("") is ".": an empty argument must not write here
        fail("DIR: empty; give the directory to write into (. for this one)")
    directory = Path(dir_arg)
    tree = DEFAULT_TREE if tree is None else tree
    try:
        files = generate(tree=tree)
    except GeneratorError as e:
        fail(f"the leaf table cannot be exported as C: {e}", code=1)
    if directory.exists() and not directory.is_dir():
        fail(f"{directory}: exists and is not a directory")

    report = []
    differ = []
    diffs: dict[str, str] = {}
    for name, text in files.items():
        path = directory / name
        data = text.encode()
        entry: dict[str, object] = {"file": str(path), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        if check:
            state, diff = _compare(path, data)
            entry["up_to_date"] = state == "up to date"
            entry["state"] = state
            if diff is not None:
                entry["diff"] = diffs[str(path)] = diff
            if state != "up to date":
                differ.append(str(path))
        report.append(entry)

    if not check:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with output_files(directory / name for name in files) as partial:  # both renamed when both are whole
                for tmp, text in zip(partial, files.values(), strict=True):
                    tmp.write_bytes(text.encode())
        except OSError as e:
            fail(cannot_write(directory, e))  # a link loop named as such

    table = build_table(tree=tree)
    summary = {
        "generator": f"tdvmcall {__version__}",
        "tree": tree,
        "table": table_fingerprint(table),
        "rows": len(table.rows),
        "conditions": sum(len(r.conds) for r in table.rows),
        "mode": "check" if check else "write",
        "files": report,
    }
    if check:
        summary["up_to_date"] = not differ
    if as_json:
        emit_json(summary)
    else:
        verb = "checked" if check else "wrote"
        for e in report:
            if not check:
                out.print(f"{verb} {e['file']} ({e['bytes']:,} bytes)", highlight=False, soft_wrap=True)
                continue
            state = {
                "up to date": "up to date",
                "missing": f"MISSING (the model writes {e['bytes']:,} bytes)",
                "differs": "DIFFERS from the model (diff below: your copy, then the model's)",
                "not a file": "is not a regular file",
            }[str(e["state"])]
            out.print(f"{verb} {e['file']}: {state}", highlight=False, soft_wrap=True)
            if e["file"] in diffs:
                _print_diff(diffs[str(e["file"])])
        out.print(
            f"table {summary['table']}: {summary['rows']} rows, {summary['conditions']} conditions "
            f"(tdvmcall {__version__})",
            highlight=False,
        )
    if differ:
        raise typer.Exit(1)


def _git_author() -> str | None:
    import subprocess

    try:
        name, email = (
            subprocess.run(["git", "config", key], capture_output=True, text=True, check=False).stdout.strip()
            for key in ("user.name", "user.email")
        )
    except OSError:
        return None
    return f"{name} <{email}>" if name and email else None


def _export_series(
    series: str, tree: str | None, kernel: str, vectors: str | None, author: str | None, as_json: bool
) -> None:
    from ..console import cannot_write, emit_json, fail, out
    from .generate import GeneratorError
    from .series import SeriesError, write_series

    if not series.strip():
        fail("--series: empty; give the directory to write the patches into")
    if tree is None:
        fail("--tree: required with --series (the model's tree the kernel source is, e.g. v7.3)")
    if vectors is None:
        fail("--vectors: required with --series (write a corpus first: tdvmcall vectors export CORPUS)")
    author = author or _git_author()
    if author is None:
        fail("--author: not given and git config has no user.name/user.email; give --author 'Name <email>'")
    directory = Path(series)
    if directory.exists() and not directory.is_dir():
        fail(f"{directory}: exists and is not a directory")
    try:
        info = write_series(directory, Path(kernel), tree, Path(vectors), author)
    except (SeriesError, GeneratorError) as e:
        fail(str(e))
    except OSError as e:
        fail(cannot_write(directory, e))  # a link loop named as such
    if as_json:
        emit_json(info)
        return
    for old in info["removed"]:
        out.print(f"removed {old} (a patch of an earlier series)", highlight=False, soft_wrap=True)
    for p in info["patches"]:
        out.print(f"wrote {p['file']}", highlight=False, soft_wrap=True)
    k = info["kunit_cases"]
    out.print(
        f"{len(info['patches'])} patches for Linux {info['release']} (model tree {tree}; the check is called in "
        f"{info['dispatcher']}()); KUnit: {k['vectors']} vector cases, {k['bus_lock']} bus-lock cases. "
        f"Apply with: git -C {kernel} am {directory}/*.patch",
        highlight=False,
        soft_wrap=True,
    )


#: a diff longer than this is cut on screen, saying how many lines were left out (--json has it all)
DIFF_LINES_SHOWN = 200


def _compare(path: Path, data: bytes) -> tuple[str, str | None]:
    """``up to date``, ``missing``, ``not a file`` or ``differs`` (with a unified diff from DIR's copy
    to the model's)."""
    from ..console import fail

    if not path.exists() and not path.is_symlink():
        return "missing", None
    if not path.is_file():
        return "not a file", None
    try:
        have = path.read_bytes()
    except OSError as e:
        fail(f"{path}: cannot read ({e.strerror})")
    if have == data:
        return "up to date", None
    mine = have.decode("utf-8", errors="replace").splitlines(keepends=True)
    model = data.decode().splitlines(keepends=True)
    diff = "".join(
        line if line.endswith("\n") else line + "\n\\ No newline at end of file\n"
        for line in difflib.unified_diff(mine, model, f"{path} (yours)", f"{path.name} (the model)")
    )
    return "differs", diff


def _print_diff(diff: str) -> None:
    """A diff as plain text (no markup read from it), cut at DIFF_LINES_SHOWN with a count."""
    lines = diff.splitlines(keepends=True)
    sys.stdout.write("".join(lines[:DIFF_LINES_SHOWN]))
    if len(lines) > DIFF_LINES_SHOWN:
        sys.stdout.write(f"... {len(lines) - DIFF_LINES_SHOWN:,} more diff lines not shown (--json has them all)\n")
    sys.stdout.flush()


def register(app: typer.Typer) -> None:
    app.command("export-c", help=EXPORT_C_HELP)(export_c)


__all__ = ["register"]

"""``tdvmcall export-c DIR``: write the hardened validation as C (``generate.py``), or check that a
copy is still what the model writes."""

from __future__ import annotations

import difflib
import hashlib
import sys
from pathlib import Path

import typer

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
    dir_arg: str = typer.Argument(
        ..., metavar="DIR", help="Directory to write tdvmcall_regs.h and tdvmcall_regs.c into."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print what was written (or checked) as JSON."),
    check: bool = typer.Option(
        False, "--check", help="Write nothing; exit 1 if DIR's files differ from what the model writes."
    ),
) -> None:
    from .. import __version__
    from ..console import emit_json, fail, out
    from .generate import GeneratorError, build_table, generate, table_fingerprint

    if not dir_arg.strip():  # Path("") is ".": an empty argument must not write here
        fail("DIR: empty; give the directory to write into (. for this one)")
    directory = Path(dir_arg)
    try:
        files = generate()
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
            for name, text in files.items():
                (directory / name).write_bytes(text.encode())
        except OSError as e:
            fail(f"{e.filename or directory}: cannot write ({e.strerror})")

    table = build_table()
    summary = {
        "generator": f"tdvmcall {__version__}",
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

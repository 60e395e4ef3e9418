"""Every command at its edges, as a real process: bad input of every kind (not UTF-8, empty, a
directory, binary, closed standard input, deeply nested JSON, negative and non-finite numbers) gives
exit 2 and one line ``tdvmcall: error: ...`` on stderr, never a traceback; output into a closed
pipe is not a failure; ``--version``; help that reads as a user reads it.

The processes run a few at a time (one per case), so that the sweep stays a few seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import tdvmcall

NESTED = "[" * 3000 + "]" * 3000
HEADER = "guest,snapshot,file,function,mask_hex,tdvmcalls,note\n"
ENV = {**os.environ, "COLUMNS": "80", "PYTHONIOENCODING": "utf-8", "NO_COLOR": "1"}


def tdvmcall_cmd(*args: str | bytes) -> list[str | bytes]:
    return [sys.executable, "-m", "tdvmcall", *args]


def run_case(args, stdin: bytes | None = None, closed_stdin: bool = False, cwd: Path | None = None):
    cmd = tdvmcall_cmd(*args)
    if closed_stdin:  # the shell closes fd 0 for real, as `tdvmcall run - <&-` does
        cmd = ["sh", "-c", 'exec "$@" <&-', "sh", *cmd]
    return subprocess.run(
        cmd,
        input=stdin if not closed_stdin else None,
        stdin=subprocess.DEVNULL if stdin is None and not closed_stdin else None,
        capture_output=True,
        env=ENV,
        cwd=cwd,
        timeout=120,
    )


FILE_NAMES = (
    "nonutf8.json", "empty", "binary", "nested.json", "neg.json", "nan.json", "inf.json", "huge.json",
    "maxphyaddr.json", "header-only.csv", "nonutf8.csv", "index-nested/index.json", "index-nonutf8/index.json",
    "adir", "emptydir",
)  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("edges")
    made = {
        "nonutf8.json": b'{"guest":{"rcx":"\xff"}}',
        "empty": b"",
        "binary": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe",
        "nested.json": NESTED.encode(),
        "neg.json": b'{"guest":{"rcx":-1}}',
        "nan.json": b'{"guest":{"rcx":NaN}}',
        "inf.json": b'{"guest":{"rcx":1e999}}',
        "huge.json": b'{"guest":{"rcx":' + b"9" * 5000 + b"}}",
        "maxphyaddr.json": b'{"guest":{"rcx":"0xFFCC"},"platform":{"maxphyaddr":-5}}',
        "header-only.csv": HEADER.encode(),
        "nonutf8.csv": HEADER.encode() + b"linux,x,f,g,0xFFCC,RDMSR,\xff\n",
        "index-nested/index.json": NESTED.encode(),
        "index-nonutf8/index.json": b'{"\xff": 1}',
    }
    assert set(made) | {"adir", "emptydir"} == set(FILE_NAMES)
    for name, data in made.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)
    (d / "adir").mkdir()
    (d / "emptydir").mkdir()
    return {name: d / name for name in FILE_NAMES} | {"root": d}


def cases(f: dict[str, Path]) -> dict[str, tuple]:
    """name -> (args, stdin bytes or None, closed stdin, a word the error line must hold)."""
    p = {k: str(f[k]) for k in FILE_NAMES}
    c: dict[str, tuple] = {
        # run: every kind of bad file, and standard input
        "run-not-utf8": (["run", p["nonutf8.json"]], None, False, "not UTF-8"),
        "run-not-utf8-stdin": (["run", "-"], b'{"guest":{"rcx":"\xff"}}', False, "not UTF-8"),
        "run-empty": (["run", p["empty"]], None, False, "not valid JSON"),
        "run-empty-stdin": (["run", "-"], b"", False, "not valid JSON"),
        "run-directory": (["run", p["adir"]], None, False, "directory"),
        "run-binary": (["run", p["binary"]], None, False, "not UTF-8"),
        "run-closed-stdin": (["run", "-"], None, True, "standard input is closed"),
        "run-nested": (["run", p["nested.json"]], None, False, "nested too deeply"),
        "run-nested-stdin": (["run", "-"], NESTED.encode(), False, "nested too deeply"),
        "run-negative": (["run", p["neg.json"]], None, False, "guest.rcx"),
        "run-nan": (["run", p["nan.json"]], None, False, "guest.rcx"),
        "run-inf": (["run", p["inf.json"]], None, False, "guest.rcx"),
        "run-huge-integer": (["run", p["huge.json"]], None, False, "JSON"),
        "run-dev-zero": (["run", "/dev/zero"], None, False, "more than 64 MiB"),
        "run-missing": (["run", str(f["root"] / "nope.json")], None, False, "cannot read"),
        "run-bad-policy": (["run", "-", "--policy", ""], b'{"guest":{}}', False, "--policy: '' is not a policy"),
        "run-no-argument": (["run"], None, False, "Missing argument"),
        # decode: what a person writes in hex or decimal, nothing else
        "decode-negative": (["decode", "-1"], None, False, "negative"),
        "decode-nan": (["decode", "nan"], None, False, "not an integer"),
        "decode-inf": (["decode", "inf"], None, False, "not an integer"),
        "decode-empty": (["decode", ""], None, False, "not an integer"),
        "decode-arabic-indic-digit": (["decode", "٣"], None, False, "not an integer"),
        "decode-underscore": (["decode", "1_000"], None, False, "not an integer"),
        "decode-hex-underscore": (["decode", "0x_FF"], None, False, "not an integer"),
        "decode-plus": (["decode", "+5"], None, False, "not an integer"),
        "decode-not-utf8-argv": (["decode", b"0x\xff"], None, False, "not an integer"),
        "decode-too-wide": (["decode", "0x1" + "0" * 16], None, False, "64 bits"),
        "decode-bad-as": (["decode", "1", "--as", "nope"], None, False, "--as"),
        # leaves
        "leaves-unknown": (["leaves", "Instruction.NOPE"], None, False, "NOPE"),
        "leaves-empty-name": (["leaves", ""], None, False, ""),
        # check: catalogs and options
        "check-catalog-not-utf8": (["check", "--catalog", p["nonutf8.csv"]], None, False, "not UTF-8"),
        "check-catalog-empty-file": (["check", "--catalog", p["empty"]], None, False, "missing column"),
        "check-catalog-no-sites": (["check", "--catalog", p["header-only.csv"]], None, False, "no call sites"),
        "check-catalog-directory": (["check", "--catalog", p["adir"]], None, False, "directory"),
        "check-catalog-binary": (["check", "--catalog", p["binary"]], None, False, "not UTF-8"),
        "check-catalog-dev-zero": (["check", "--catalog", "/dev/zero"], None, False, "more than 64 MiB"),
        "check-catalog-missing": (["check", "--catalog", str(f["root"] / "no.csv")], None, False, "cannot read"),
        "check-mask-negative": (["check", "--mask", "-1"], None, False, "negative"),
        "check-mask-nan": (["check", "--mask", "nan"], None, False, "not an integer"),
        "check-call-empty": (["check", "--mask", "0x1C00", "--call", ""], None, False, "--call"),
        "check-html-directory": (["check", "--mask", "0x1C00", "--html", p["adir"]], None, False, "--html"),
        "check-html-no-folder": (["check", "--mask", "0x1C00", "--html", "/nonexistent/r.html"], None, False, "--html"),
        # sweep and vectors
        "sweep-jobs-negative": (["sweep", "--jobs", "-1"], None, False, "--jobs"),
        "sweep-call-empty": (["sweep", "--call", ""], None, False, "--call"),
        "verify-missing": (["vectors", "verify", str(f["root"] / "nope")], None, False, "nope"),
        "verify-a-file": (["vectors", "verify", p["empty"]], None, False, "not a directory"),
        "verify-empty-dir": (["vectors", "verify", p["emptydir"]], None, False, "index.json"),
        "verify-nested-index": (["vectors", "verify", str(f["index-nested/index.json"].parent)], None, False, "nested"),
        "verify-index-not-utf8": (
            ["vectors", "verify", str(f["index-nonutf8/index.json"].parent)],
            None,
            False,
            "JSON",
        ),
        "verify-limit-negative": (["vectors", "verify", p["emptydir"], "--limit", "-1"], None, False, "--limit"),
        "export-onto-a-file": (["vectors", "export", p["empty"]], None, False, ""),
        # fuzz: option values (all refused before the campaign starts)
        "fuzz-seconds-nan": (["fuzz", "--seconds", "nan"], None, False, "--seconds"),
        "fuzz-seconds-inf": (["fuzz", "--seconds", "inf"], None, False, "--seconds"),
        "fuzz-seconds-negative": (["fuzz", "--seconds", "-1"], None, False, "--seconds"),
        "fuzz-examples-negative": (["fuzz", "--examples", "-5"], None, False, "--examples"),
        "fuzz-out-directory": (["fuzz", "--examples", "1", "--out", p["adir"]], None, False, "--out"),
        "fuzz-out-no-folder": (["fuzz", "--examples", "1", "--out", "/nonexistent/c.json"], None, False, "--out"),
        # trace: only what fails before its scanner starts (the trace wing tests the rest)
        "trace-no-file": (["trace"], None, False, "Missing argument"),
        "trace-bad-format": (["trace", "-", "--format", "nope"], None, False, "--format"),
        "trace-bad-top": (["trace", "-", "--top", "x"], None, False, "--top"),
        # one number grammar for every option (issue 18 item 19): what int() and float() take besides
        "fuzz-examples-underscore": (["fuzz", "--examples", "1_0"], None, False, "--examples"),
        "sweep-jobs-arabic-indic-digit": (["sweep", "--jobs", "٣"], None, False, "--jobs"),
        "trace-top-fullwidth-digit": (["trace", "-", "--top", "３"], None, False, "--top"),
        "verify-limit-plus": (["vectors", "verify", p["emptydir"], "--limit", "+5"], None, False, "--limit"),
        "fuzz-seconds-underscore": (["fuzz", "--seconds", "1_0"], None, False, "--seconds"),
        "fuzz-seconds-exponent": (["fuzz", "--seconds", "1e3"], None, False, "--seconds"),
        "check-guest-ambiguous-prefix": (["check", "--guest", "t"], None, False, "more than one guest"),
        # scan: nothing to scan, and output paths checked before the scan
        "scan-empty-dir": (["scan", p["emptydir"]], None, False, "no file to scan"),
        "scan-missing": (["scan", str(f["root"] / "nope.bin")], None, False, "no such file"),
        "scan-html-directory": (["scan", p["binary"], "--html", p["adir"]], None, False, "--html"),
        "scan-catalog-no-folder": (["scan", p["binary"], "--to-catalog", "/nonexistent/c.csv"], None, False, "--to"),
        # the app itself
        "unknown-command": (["nope"], None, False, "No such command"),
        "unknown-option": (["check", "--nope"], None, False, "--nope"),
        "no-command": ([], None, False, "missing command"),
    }
    return c


@pytest.fixture(scope="module")
def results(files):
    todo = cases(files)
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {
            name: pool.submit(run_case, args, stdin, closed, files["root"])
            for name, (args, stdin, closed, _) in todo.items()
        }
        return {name: fut.result() for name, fut in futures.items()}


CASE_NAMES = list(cases(defaultdict(lambda: Path("/x"))))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_is_one_line_and_exit_2(name, files, results):
    r = results[name]
    needle = cases(files)[name][3]
    err = r.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert r.returncode == 2, (r.returncode, err)
    assert len(lines) == 1, err
    assert lines[0].startswith("tdvmcall: error: "), err
    assert needle in lines[0], err


def test_negative_maxphyaddr_is_out_of_range_not_twos_complement(files):
    r = run_case(["run", str(files["maxphyaddr.json"])])
    err = r.stderr.decode()
    assert r.returncode == 2 and "platform.maxphyaddr: -5 out of range; accepted: 32..52" in err
    assert "two's complement" not in err


# --- closed pipes -------------------------------------------------------------------------------
def run_into_closed_pipe(*args: str) -> subprocess.CompletedProcess:
    """Standard output is a pipe whose reader has already gone: the first write fails with EPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            tdvmcall_cmd(*args),
            stdout=write_end,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=ENV,
            timeout=120,
        )
    finally:
        os.close(write_end)


@pytest.mark.parametrize(
    "args,status",
    [
        (("decode", "0xFFEC"), 0),
        (("decode", "0xFFEC", "--json"), 0),
        (("leaves",), 0),
        (("run", "examples/cpuid-r12-unexposed.json"), 0),
        # the what-if's own verdicts: 0x1C00 carries RDMSR's registers; 0xFFEC exposes RBP, which the
        # module rejects under NO_RBP_MOD, so check says 1 (fails the policy) through the pipe too
        (("check", "--mask", "0x1C00", "--call", "Instruction.RDMSR"), 0),
        (("check", "--mask", "0xFFEC", "--call", "Instruction.RDMSR"), 1),
    ],
)
def test_a_closed_pipe_keeps_the_commands_own_status(args, status):
    repo = Path(__file__).resolve().parents[1]
    args = tuple(str(repo / a) if a.startswith("examples/") else a for a in args)
    r = run_into_closed_pipe(*args)
    assert r.returncode == status, r.stderr.decode()
    assert r.stderr == b"", r.stderr.decode()


# --- the app ------------------------------------------------------------------------------------
def test_version():
    r = run_case(["--version"])
    assert r.returncode == 0 and r.stdout.decode().strip() == f"tdvmcall {tdvmcall.__version__}"


HELP_PAGES = [[], ["run"], ["decode"], ["leaves"], ["check"], ["scan"], ["trace"], ["fuzz"], ["sweep"], ["export-c"]]
HELP_PAGES += [["vectors"], ["vectors", "export"], ["vectors", "verify"]]


def test_help_shows_flags_without_a_type_cuts_nothing_and_reflows_paragraphs():
    with ThreadPoolExecutor(max_workers=4) as pool:
        pages = list(pool.map(lambda args: run_case([*args, "--help"]), HELP_PAGES))
    for args, r in zip(HELP_PAGES, pages):
        text = r.stdout.decode()
        assert r.returncode == 0 and r.stderr == b"", (args, r.stderr)
        assert "<bool>" not in text and "<str>" not in text, (args, text)  # typer 0.27+ renders flags so
        assert "…" not in text, (args, text)  # nothing cut at 80 columns
    top = run_case(["--help"]).stdout.decode()
    # the run line reads as one paragraph: the docstring's line break after "scenario" is not kept
    assert "from a JSON scenario and show every" in " ".join(top.replace("│", " ").split())
    assert "--version" in top


def test_usage_error_is_one_line_naming_the_command():
    r = run_case(["decode", "1", "--as"])
    err = r.stderr.decode()
    assert r.returncode == 2 and err.count("\n") == 1 and "--as" in err and "tdvmcall decode --help" in err


def test_check_html_to_a_bad_path_prints_nothing_first(files):
    r = run_case(["check", "--mask", "0x1C00", "--html", str(files["root"] / "missing" / "r.html")])
    assert r.returncode == 2 and r.stdout == b""


# --- catalogs (item 11): nothing ignored or dropped without a word ----------------------------------
def _catalog(tmp_path: Path, body: bytes) -> Path:
    p = tmp_path / "c.csv"
    p.write_bytes(body)
    return p


def test_catalog_with_a_bom_reads_its_first_column(tmp_path):
    from tdvmcall.check.catalog import load_catalog

    sites, errors = load_catalog(_catalog(tmp_path, b"\xef\xbb\xbf" + HEADER.encode() + b"linux,s,f,g,0x1C00,RDMSR,\n"))
    assert errors == [] and [(s.guest, s.mask) for s in sites] == [("linux", 0x1C00)]


def test_catalog_extra_fields_empty_rows_and_unknown_columns_are_counted(tmp_path):
    from tdvmcall.check.catalog import load_catalog

    body = (
        "guest,snapshot,file,function,mask_hex,tdvmcalls,note,owner\n"  # an unknown column
        "linux,s,f,g,0x1C00,RDMSR,,me\n"  # fine (its owner is the unknown column's)
        ",,,,,,,\n"  # row 3: every field empty
        "linux,s,f,g,0x1C00,RDMSR,a note, with a comma,x\n"  # row 4: one field too many
    )
    sites, errors = load_catalog(_catalog(tmp_path, body.encode()))
    assert [s.row for s in sites] == [2]
    assert len(errors) == 3
    assert "unknown column(s) 'owner'" in errors[0]
    assert "row 3: every field is empty" in errors[1]
    assert "row 4: 1 field(s) more than the header's 8" in errors[2]


def test_check_cli_bom_catalog_passes_and_extra_field_is_exit_2(tmp_path):
    from typer.testing import CliRunner

    from tdvmcall.cli import app

    good = _catalog(tmp_path, b"\xef\xbb\xbf" + HEADER.encode() + b"linux,s,f,g,0x1C00,RDMSR,\n")
    r = CliRunner().invoke(app, ["check", "--catalog", str(good), "--json"])
    assert r.exit_code == 0, r.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text(HEADER + "linux,s,f,g,0x1C00,RDMSR,n,extra\n" + "linux,s,f,g,0x1C00,RDMSR,\n")
    r = CliRunner().invoke(app, ["check", "--catalog", str(bad), "--json"])
    assert r.exit_code == 2 and "row 2: 1 field(s) more" in r.stderr
    assert len(json.loads(r.stdout)["results"]) >= 1  # the good row was still checked


# --- decode's grammar (item 12) ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,value",
    [("0xFFEC", 0xFFEC), ("0Xffec", 0xFFEC), ("65516", 65516), (" 0x10\n", 16), ("007", 7), (0x10, 16)],
)
def test_parse_int_accepts_plain_decimal_and_hex(text, value):
    from tdvmcall.abi.regs import parse_int

    assert parse_int(text) == value


@pytest.mark.parametrize("text", ["٣", "1_000", "0x_FF", "+5", "1e3", "0x", "", "0b101", "0o7", "ff", "1 2", "--1"])
def test_parse_int_refuses_what_a_person_does_not_write(text):
    from tdvmcall.abi.regs import parse_int

    with pytest.raises(ValueError, match="not an integer"):
        parse_int(text)


# --- output never cut (item 10, the non-trace part) --------------------------------------------------
def test_sweep_table_headers_are_whole_at_80_and_120_columns():
    from io import StringIO

    from tdvmcall.console import _WideConsole
    from tdvmcall.sweep.cli import _render_sweep
    from tdvmcall.sweep.sweep import run_sweep

    result = run_sweep(False, ["KVMHypercall.MAP_GPA_RANGE"], 1)
    for width in (80, 120):
        buf = StringIO()
        _render_sweep(result, _WideConsole(width=width, file=buf, color_system=None))
        text = buf.getvalue()
        assert "…" not in text
        for word in ("silent-ok", "hardened", "up-set", "agree", "KVMHypercall.MAP_GPA_RANGE"):
            assert word in text, (width, word)


def test_the_console_never_cuts_a_table_value():
    from io import StringIO

    from rich.table import Table

    from tdvmcall.console import _WideConsole

    t = Table()
    for i in range(8):
        t.add_column(f"column {i}", no_wrap=True)
    t.add_row(*[f"0x{i:016x}" for i in range(8)])
    buf = StringIO()
    _WideConsole(width=80, file=buf, color_system=None).print(t)
    assert "…" not in buf.getvalue() and "0x0000000000000007" in buf.getvalue()


def test_piped_output_ends_no_line_in_blanks_and_a_terminal_gets_riches_rendering():
    """Into a pipe or a file a line carries no padding after its last word (a table's rows are padded
    to their width by rich); a terminal gets exactly what rich renders, padding and all."""
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    from tdvmcall.console import _WideConsole

    t = Table()
    t.add_column("verdict")
    t.add_column("why")
    t.add_row("ok", "every case completes")
    t.add_row("module-rejects", "x")  # the last cell far shorter than its column: padded by rich
    rich_text = StringIO()
    Console(width=80, file=rich_text, color_system=None, force_terminal=True).print(t, "a line  ")
    assert any(line.endswith(" ") for line in rich_text.getvalue().splitlines())  # rich pads

    piped = StringIO()
    _WideConsole(width=80, file=piped, color_system=None).print(t, "a line  ", soft_wrap=False)
    lines = [line.rstrip(" ") for line in rich_text.getvalue().split("\n")]
    assert piped.getvalue() == "\n".join(lines)
    assert "│ module-rejects │ x" in piped.getvalue() and "a line\n" in piped.getvalue()

    terminal = StringIO()
    _WideConsole(width=80, file=terminal, color_system=None, force_terminal=True).print(t, "a line  ")
    assert terminal.getvalue() == rich_text.getvalue()


def test_piped_check_report_has_no_trailing_blanks():
    r = subprocess.run([sys.executable, "-m", "tdvmcall", "check"], capture_output=True, text=True, check=False)
    assert r.returncode == 1 and r.stderr == ""  # the built-in corpus has findings (docs/check.md)
    lines = r.stdout.splitlines()
    assert sum("module-rejects" in line for line in lines) > 1  # the table is there
    assert [line for line in lines if line != line.rstrip()] == []


# --- smaller (item 14) ------------------------------------------------------------------------------
def test_run_with_an_unknown_rax_gives_the_reason():
    from typer.testing import CliRunner

    from tdvmcall.cli import app

    # RAX bit 24 is reserved: the module refuses operand RAX, and says why (the reason was empty)
    r = CliRunner().invoke(app, ["run", "-"], input='{"guest": {"rax": "0x1000000", "rcx": "0xFFCC"}}')
    text = " ".join(r.stdout.split())
    assert r.exit_code == 0
    assert "; ." not in text
    assert "TDX_OPERAND_INVALID); reserved bits 63:24" in text and "KVM never saw it" in text


def test_html_report_scrolls_to_the_cell_named_in_the_address():
    from tdvmcall.check.catalog import Host, check_sites, what_if
    from tdvmcall.check.report import html_report

    page = html_report(check_sites([what_if("0x1C00", None)], Host()), Host(), "hardened", "what-if", [])
    script = page[page.index("#show=") :]
    assert "scrollIntoView" in script[: script.index("</script>")]


# --- the reference facts ship with the repository (item 15) -----------------------------------------
def test_every_abi_citation_names_a_section_of_docs_abi_md():
    import re

    repo = Path(__file__).resolve().parents[1]
    abi = repo / "docs" / "abi.md"
    assert abi.is_file()
    sections = {int(n) for n in re.findall(r"^## (\d+)\. ", abi.read_text(), re.M)}
    assert sections == set(range(1, 9))
    cited: set[int] = set()
    files = [*repo.glob("README.md"), *repo.glob("docs/*.md"), *repo.glob("src/**/*.py"), *repo.glob("tests/*.py")]
    files += [*repo.glob("bench/*.py")]
    for path in files:
        text = path.read_text()
        # the shared workspace's copy is not in the repository: nothing may point there
        assert "shared/reference" not in text or path.name == "test_edges.py", path
        for m in re.finditer(r"(\S*)ABI\.md", text):
            assert path.name == "test_edges.py", (path, m.group(0))  # only the new name: docs/abi.md
        for m in re.finditer(r"abi\.md(?:\]\(abi\.md\))? (§[\d§, -]+)", text):
            cited |= {int(n) for n in re.findall(r"\d+", m.group(1))}
    assert cited and cited <= sections, cited - sections


def test_sweep_never_starts_more_workers_than_rows():
    # --jobs 100000 forked 100,000 processes up front (the fork start method starts them all) for a
    # sweep of one call; it now uses at most one worker per row
    r = subprocess.run(
        tdvmcall_cmd("sweep", "--call", "Instruction.HLT", "--jobs", "100000", "--json"),
        capture_output=True,
        env=ENV,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr.decode()
    assert [row["call"] for row in json.loads(r.stdout)["rows"]] == ["Instruction.HLT"]


def test_a_closed_stdin_read_anywhere_is_one_line(monkeypatch, capsys):
    # main() puts this in sys.stdin when fd 0 is closed: a wing reading sys.stdin.buffer itself
    # (as trace does) gets the one line and exit 2, not AttributeError on None
    import typer

    from tdvmcall.console import ClosedStdin

    monkeypatch.setattr(sys, "stdin", ClosedStdin())
    for read in (lambda: sys.stdin.buffer, lambda: sys.stdin.read(), lambda: sys.stdin.readline()):
        with pytest.raises(typer.Exit) as e:
            read()
        assert e.value.exit_code == 2
        assert (
            capsys.readouterr().err == "tdvmcall: error: standard input is closed; give a file or pipe something in\n"
        )


@pytest.mark.parametrize("closed,status", [(">&-", 0), ("2>&-", 2)])
def test_closed_stdout_or_stderr_keeps_the_status(closed, status):
    # decode 0xFFEC succeeds (0); decode nan is bad input (2) even when nobody can read the line
    value = "0xFFEC" if status == 0 else "nan"
    cmd = ["sh", "-c", f'exec "$@" {closed}', "sh", *tdvmcall_cmd("decode", value)]
    r = subprocess.run(cmd, capture_output=True, env=ENV, timeout=60)
    assert r.returncode == status, r.stderr.decode()


# --- a standard output that cannot be written (issue 18 item 7) -----------------------------------
FTRACE_EXIT = (
    "CPU 0/KVM-1001 [000] d..2. 100.000000: kvm_exit: vcpu 0 reason TDCALL rip 0x0 "
    "info1 0x000000000000ffcc info2 0x0000000000000000 intr_info 0x00000000 error_code 0x00000000\n"
)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a device every write to fails ENOSPC)")
@pytest.mark.parametrize(
    "args,stdin",
    [
        (("decode", "0xFFEC"), None),
        (("decode", "0xFFEC", "--json"), None),
        (("leaves",), None),
        (("run", "examples/cpuid-r12-unexposed.json"), None),
        (("check",), None),  # exit 1 on its own (the shipped catalog fails hardened): the write error wins
        (("check", "--mask", "0x1C00", "--json"), None),
        (("check", "--mask", "0x1C00", "--markdown"), None),
        # an ELF with code (the interpreter running the tests): an assembly text holds no code, an error
        (("scan", str(Path(sys.executable).resolve())), None),
        (("trace", "-"), FTRACE_EXIT.encode()),
        (("--version",), None),
    ],
)
def test_a_full_standard_output_is_one_line_and_exit_2(args, stdin):
    # /dev/full: every write fails with ENOSPC, as on a full disk; that is not a closed pipe (which
    # is no error) and not a failed check (exit 1): one line, exit 2, no traceback
    repo = Path(__file__).resolve().parents[1]
    args = tuple(str(repo / a) if a.startswith(("examples/", "tests/")) else a for a in args)
    with open("/dev/full", "wb") as full:
        r = subprocess.run(
            tdvmcall_cmd(*args),
            stdout=full,
            stderr=subprocess.PIPE,
            input=stdin,
            stdin=subprocess.DEVNULL if stdin is None else None,
            env=ENV,
            timeout=120,
        )
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert "Traceback" not in err, err
    # (trace may say first that it compiles its kernels, once per machine: a line of its own)
    assert [line for line in err.splitlines() if "error" in line] == [
        "tdvmcall: error: cannot write standard output (No space left on device)"
    ], err


# --- an output over an input (issue 18 item 11) ------------------------------------------------------
@pytest.mark.parametrize("link", ["same", "symlink", "hardlink", "dotted"])
def test_check_html_over_its_own_catalog_is_refused_and_the_catalog_kept(tmp_path, link):
    catalog = tmp_path / "mine.csv"
    body = HEADER + "myfw,v1,f.S,io,0xFC00,IO,\n"
    catalog.write_text(body)
    html = {
        "same": catalog,
        "symlink": tmp_path / "link.html",
        "hardlink": tmp_path / "hard.html",
        "dotted": tmp_path / "." / "sub" / ".." / "mine.csv",
    }[link]
    if link == "symlink":
        html.symlink_to(catalog)
    elif link == "hardlink":
        os.link(catalog, html)
    elif link == "dotted":
        (tmp_path / "sub").mkdir()
    r = run_case(["check", "--catalog", str(catalog), "--html", str(html)])
    err = r.stderr.decode()
    assert r.returncode == 2 and r.stdout == b"", err
    assert err.count("\n") == 1 and err.startswith("tdvmcall: error: --html: ") and "input" in err, err
    assert catalog.read_text() == body  # the catalog is still the catalog


def test_not_an_input_tells_a_new_file_and_other_files_from_an_input(tmp_path, capsys):
    import typer

    from tdvmcall.console import not_an_input

    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("x")
    b.write_text("x")  # the same bytes, another file: not the input
    not_an_input(b, "--html", [a, "-", None])
    not_an_input(tmp_path / "new.html", "--html", [a])  # does not exist yet
    (tmp_path / "loop").symlink_to(tmp_path / "loop")  # a link loop is no input of anything
    not_an_input(tmp_path / "loop", "--html", [a])
    with pytest.raises(typer.Exit) as e:
        not_an_input(tmp_path / "a.csv", "--to-catalog", [b, a])
    assert e.value.exit_code == 2
    assert "--to-catalog" in capsys.readouterr().err


# --- catalogs that lose rows (issue 18 items 12, 16) ---------------------------------------------------
def test_an_unterminated_quote_is_an_error_naming_its_line_not_a_long_note(tmp_path):
    from tdvmcall.check.catalog import load_catalog

    body = (
        HEADER
        + "fw,1,a.c,first,0x1C00,RDMSR,fine\n"  # line 2
        + 'fw,1,a.c,second,0x1C00,RDMSR,"a note whose quote is never closed\n'  # line 3
        + "fw,1,a.c,third,0xFC00,IO,\n"  # line 4: swallowed into line 3's note by a CSV reader
        + "fw,1,a.c,fourth,0xFC00,IO,\n"  # line 5
    )
    sites, errors = load_catalog(_catalog(tmp_path, body.encode()))
    assert [s.function for s in sites] == ["first"]
    assert len(errors) == 1 and "row 3" in errors[0] and "line 5" in errors[0] and "quote" in errors[0], errors
    r = run_case(["check", "--catalog", str(tmp_path / "c.csv")])
    assert r.returncode == 2 and "row 3" in r.stderr.decode()


def test_a_quoted_field_on_one_line_is_fine(tmp_path):
    from tdvmcall.check.catalog import load_catalog

    body = HEADER + 'fw,1,a.c,f,0x1C00,RDMSR,"a note, with a comma and ""quotes"""\n'
    sites, errors = load_catalog(_catalog(tmp_path, body.encode()))
    assert errors == [] and sites[0].note == 'a note, with a comma and "quotes"'


def test_a_header_naming_a_column_twice_is_an_error_naming_line_1(tmp_path):
    body = HEADER.strip() + "," + HEADER  # every column twice
    body += "fw,1,a.c,f,0xFFEC,RDMSR,,fw,1,a.c,f,0x1C00,RDMSR,\n"  # the first mask is the failing one
    path = _catalog(tmp_path, body.encode())
    r = run_case(["check", "--catalog", str(path)])
    err = r.stderr.decode()
    assert r.returncode == 2 and err.count("\n") == 1, err
    assert "line 1" in err and "'guest'" in err and "more than once" in err, err


def test_a_row_with_too_few_fields_names_the_missing_ones_and_its_line(tmp_path):
    from tdvmcall.check.catalog import load_catalog

    body = HEADER + "fw,1,a.c,f\n" + "fw,1,a.c,g,0x1C00,RDMSR\n"  # line 2: 4 fields; line 3: no note, fine
    sites, errors = load_catalog(_catalog(tmp_path, body.encode()))
    assert [s.function for s in sites] == ["g"]
    assert len(errors) == 1 and "row 2" in errors[0] and "mask_hex, tdvmcalls" in errors[0], errors
    assert "not an integer" not in errors[0]


# --- a large catalog (issue 18 item 10): one judgement per distinct call, output streamed ----------------
def test_a_catalog_judges_each_distinct_mask_and_call_once(tmp_path, monkeypatch):
    from tdvmcall.check import catalog as C

    judged = []
    real = C.judge
    monkeypatch.setattr(
        C, "judge", lambda mask, leaf, *a, **k: judged.append((mask, leaf)) or real(mask, leaf, *a, **k)
    )
    rows = [
        f"fw,1,a.c,f{i},{mask},{calls},\n"
        for i in range(40)
        for mask, calls in (("0x1C00", "RDMSR"), ("0xFC00", "IO in"))
    ]
    rows += ["fw,1,a.c,g,0xFC00,IO out,\n", "fw,1,a.c,h,0xFC00,IO,\n"]  # other conditions: judged apart
    sites, errors = C.load_catalog(_catalog(tmp_path, (HEADER + "".join(rows)).encode()))
    results = C.check_sites(sites, C.Host())
    assert errors == [] and len(results) == 82
    assert len(judged) == 4  # RDMSR at 0x1C00, IO in, IO out and IO (both cases) at 0xFC00
    rdmsr = [r for r in results if r.call.name == "Instruction.RDMSR"]
    assert all(r.judgement is rdmsr[0].judgement for r in rdmsr)
    assert [r.site.function for r in rdmsr] == [f"f{i}" for i in range(40)]  # each site still its own


def test_the_streamed_json_is_the_document_json_dumps_writes(tmp_path):
    import io

    from tdvmcall.check import catalog as C
    from tdvmcall.check.report import report_json, write_report_json

    text = C.shipped_catalog_text() + "fw,1,a.c,f,0xFFFF0FFCC,RDMSR 0x802 (x2APIC) and more,a note\n"
    sites, _ = C.load_catalog("mine.csv", text)
    results = C.check_sites(sites, C.Host())
    for res, errors in ((results, ["mine.csv row 3: bad"]), ([], [])):
        buf = io.StringIO()
        write_report_json(buf.write, res, C.Host(), "hardened", "mine.csv", errors)
        assert buf.getvalue() == json.dumps(report_json(res, C.Host(), "hardened", "mine.csv", errors), indent=2) + "\n"


def _many_sites(n: int) -> str:
    """The shipped catalog's rows repeated to ``n`` rows, each a site of its own (a function name of
    its own), in blocks of one guest: the shape bench/check.py measures (issue 18 item 10)."""
    import csv
    import io

    from tdvmcall.check import catalog as C

    header, *body = list(csv.reader(io.StringIO(C.shipped_catalog_text())))
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(header)
    for i in range(n):
        row = list(body[i * len(body) // n])
        row[header.index("function")] += f"_{i}"
        w.writerow(row)
    return out.getvalue()


def test_a_large_catalog_streamed_from_disk_gives_the_documents_of_the_checks_held_whole(tmp_path):
    """Item 10: the reports go over the catalog twice and keep a finding's rows, calls and results
    on disk; the text must be what the list-based document (report_json, findings()) gives: findings
    of hundreds of sites ("in 244 functions: ... and 241 more"), lists longer than a write's batch."""
    import io

    from tdvmcall.check import catalog as C
    from tdvmcall.check.report import Checked, markdown_parts, report_json, write_report_json

    text = _many_sites(4000) + "fw,1,a.c,f,0xFFEC,HLT,\n"
    path = tmp_path / "many.csv"
    path.write_text(text)
    sites, errors = C.load_catalog(path)
    results = C.check_sites(sites, C.Host())
    doc = report_json(results, C.Host(), "hardened", "many.csv", errors)
    assert max(len(f["results"]) for f in doc["findings"]) > 1000 and any("more" in f["where"] for f in doc["findings"])
    cat = C.Catalog.read(path)
    assert cat.path == path and cat.text == ""  # read from disk on each pass, not held

    def checked_sites():
        checker = C.Checker(C.Host())
        return ((s, checker.check(s)) for s in cat.rows() if isinstance(s, C.Site))

    buf = io.StringIO()
    write_report_json(buf.write, Checked(checked_sites), C.Host(), "hardened", "many.csv", errors)
    assert buf.getvalue() == json.dumps(doc, indent=2) + "\n"
    assert "".join(markdown_parts(Checked(checked_sites), C.Host(), "hardened", "many.csv")) == "".join(
        markdown_parts(results, C.Host(), "hardened", "many.csv")
    )
    # the command, from the file and from standard input (read whole), prints the same document
    r = run_case(["check", "--catalog", str(path), "--json"])
    assert r.returncode == 1 and json.loads(r.stdout) == json.loads(
        json.dumps(report_json(results, C.Host(), "hardened", str(path), errors))
    )
    r2 = run_case(["check", "--catalog", "-", "--json"], stdin=text.encode())
    assert r2.stdout.replace(b'"standard input"', json.dumps(str(path)).encode()) == r.stdout


# --- words and numbers alike in every command (issue 18 item 19) ----------------------------------------
def test_a_guest_is_named_by_a_unique_prefix_and_words_by_any_case():
    r = run_case(["check", "--guest", "kvm-selftests", "--guest", "TDX-GUEST", "--json"])
    assert r.returncode == 0, r.stderr.decode()
    assert {s["guest"].split()[0] for s in json.loads(r.stdout)["sites"]} == {"kvm-selftests", "tdx-guest"}
    r = run_case(["check", "--mask", "0x1C00", "--call", "RDMSR", "--policy", "Hardened", "--tree", "KVM-X86"])
    assert r.returncode == 0, r.stderr.decode()
    r = run_case(["decode", "0x1C00", "--as", "CONTROL", "--json"])
    assert r.returncode == 0 and json.loads(r.stdout)["kind"] == "control", r.stderr.decode()
    r = run_case(["leaves", "instruction.rdmsr", "--json"])
    assert r.returncode == 0 and json.loads(r.stdout)[0]["name"] == "Instruction.RDMSR", r.stderr.decode()
    r = run_case(["trace", "-", "--format", "FTRACE"], stdin=FTRACE_EXIT.encode())
    assert r.returncode == 0, r.stderr.decode()
    r = run_case(["sweep", "--call", "instruction.hlt", "--json"])
    assert r.returncode == 0 and {row["call"] for row in json.loads(r.stdout)["rows"]} == {"Instruction.HLT"}
    r = run_case(["fuzz", "--policy", "HARDENED", "--mode", "Fast", "--examples", "1"])
    assert r.returncode == 0, r.stderr.decode()
    # the interpreter holds no TDCALL: nothing fails, nothing is left unjudged
    r = run_case(["scan", sys.executable, "--policy", "Legacy", "--tree", "KVM-X86", "--json"])
    assert r.returncode == 0 and json.loads(r.stdout)["policy"] == "legacy", r.stderr.decode()


def test_a_count_is_taken_in_hex_as_every_number_a_person_writes():
    r = run_case(["sweep", "--call", "Instruction.HLT", "--jobs", "0x1", "--json"])
    assert r.returncode == 0, r.stderr.decode()


# --- check's words (issue 18 item 20) --------------------------------------------------------------------
def test_check_module_1_0_does_not_claim_no_rbp_mod():
    r = run_case(["check", "--module", "1.0", "--guest", "linux"])
    first = r.stdout.decode().splitlines()[0]
    assert "module 1.0" in first and "with NO_RBP_MOD" not in first and "no NO_RBP_MOD" in first, first
    help_text = " ".join(run_case(["check", "--help"]).stdout.decode().replace("│", " ").split())
    for word in ("exposed for nothing", "gpr_select", "NO_RBP_MOD is the TD attribute"):
        assert word in help_text


# --- 80 columns and logs (issue 18 item 17) --------------------------------------------------------------
def test_piped_output_folds_text_between_values_only():
    # the host line is longer than 120 columns: folded, but "--policy hardened" and "(with
    # NO_RBP_MOD)" each stay on one line, as does the verdict line's "(exit 1)"
    r = run_case(["check", "--mask", "0xFFEC", "--call", "RDMSR", "--call", "WRMSR", "--call", "CPUID"])
    lines = r.stdout.decode().splitlines()
    assert all(len(line) <= 120 for line in lines if "─" not in line), lines
    assert any(line.startswith("FAIL under --policy hardened") and line.endswith("(exit 1)") for line in lines), lines
    assert any("(with NO_RBP_MOD)" in line for line in lines) and any("--policy hardened" in line for line in lines)


def test_wrap_values_keeps_groups_and_words_whole():
    from tdvmcall.console import wrap_values

    text = "FAIL under --policy hardened: 4 of 41 sites, 20 of 148 calls do not pass (exit 2)"
    for width in range(20, 90):
        lines = wrap_values(text, width)
        assert " ".join(lines) == text and all(len(line) <= width for line in lines), (width, lines)
        assert any("(exit 2)" in line for line in lines), (width, lines)
    assert wrap_values("a (b c) " + "x" * 30, 10) == ["a (b c)", "x" * 30]  # a word longer than a line: whole
    assert wrap_values("  key: one two three", 12) == ["  key: one", "  two three"]  # the indent kept
    assert wrap_values("", 10) == [""] and wrap_values("a\n\nb", 10) == ["a", "", "b"]


def test_leaves_keeps_every_name_whole_at_80_columns_and_in_a_pipe(monkeypatch):
    from typer.testing import CliRunner

    from tdvmcall.cli import app
    from tdvmcall.console import out
    from tdvmcall.kvm import leaves as L

    words = {w for leaf in L.LEAVES for w in (leaf.name, *leaf.source.split())}
    for width in (80, 120):
        monkeypatch.setattr(out, "_width", width)
        text = CliRunner().invoke(app, ["leaves"]).stdout
        found = {w for line in text.splitlines() for w in line.replace("│", " ").split()}
        assert words - found == set(), (width, sorted(words - found)[:5])
        if width == 80:
            assert max(len(line.rstrip()) for line in text.splitlines()) <= 80


# --- scan --to-catalog | check --catalog - (issue 18 item 18) ---------------------------------------------
def test_check_groups_a_scanned_catalog_as_scan_does_and_names_the_modules(tmp_path):
    # what scan --to-catalog writes for one stub linked into five modules (one row per call, the
    # module in 'file', snapshot 'scan'), and one other module's call
    rows = [f"OVMF.fd,scan,Mod{i}Dxe,sub_{i}0+0x40,0xFFEC,{c},found" for i in range(5) for c in ("HLT", "IO")]
    rows.append("OVMF.fd,scan,PeiCore,report,0x1C00,ReportFatalError,found")
    path = _catalog(tmp_path, (HEADER + "\n".join(rows) + "\n").encode())
    r = run_case(["check", "--catalog", str(path), "--json"])
    found = json.loads(r.stdout)["findings"]
    assert r.returncode == 1 and len(found) == 2, [f["where"] for f in found]
    stub, fatal = found
    assert stub["rows"] == list(range(2, 12)) and "5 modules" in stub["where"] and "Mod0Dxe" in stub["where"]
    assert fatal["where"] == "OVMF.fd PeiCore report 0x1c00"  # the module, not "@ scan"
    text = run_case(["check", "--catalog", str(path)]).stdout.decode()
    assert "Findings (2)" in text and "Mod1Dxe sub_10+0x40" in text and "@ scan" not in text
    assert text.count("module-rejects: HLT IO") == 5  # one table row per function, its calls together


# --- a symbolic link loop where a folder is to be written (issue 18 item 16) --------------------------------
def test_export_c_into_a_symbolic_link_loop_says_so(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    r = run_case(["export-c", str(tmp_path / "loop")])
    err = r.stderr.decode()
    assert r.returncode == 2 and err.count("\n") == 1 and "symbolic link loop" in err, err
    assert "File exists" not in err

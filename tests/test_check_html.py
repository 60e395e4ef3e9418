"""The HTML report of `tdvmcall check`, rendered by a real headless browser (Debian's chromium).

The page is written by the CLI, loaded from a file:// URL, and the DOM chromium builds (after the
page's own script ran) is checked for the matrix cells the facts imply (docs/abi.md §3, §4, §6):
the historical 0xFFEC rows rejected by the module, Linux's 0xFFCC passing, COCONUT-SVSM's
ReportFatalError without R13 refused in its GPA case, Hyper-V hypercalls not KVM's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from interrupted_write import interrupted
from tdvmcall.cli import app

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


BROWSER = find_browser()
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no chromium found (the CI script installs Debian's chromium)")


def chromium(tmp_path: Path, url: str, *extra: str) -> subprocess.CompletedProcess:
    """Run headless chromium offline, in a throwaway profile (the timeout only guards a hang)."""
    cmd = [
        BROWSER,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
        *extra,
        url,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=True)


class Cells(HTMLParser):
    """Collects the matrix cells (td.cell) and the text of the details panel."""

    def __init__(self):
        super().__init__()
        self.cells: list[dict] = []
        self.panel_depth = 0
        self.panel_text: list[str] = []
        self.matrix = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and a.get("id") == "matrix":
            self.matrix = True
        if tag == "td" and "cell" in (a.get("class") or "").split():
            self.cells.append(a)
        if a.get("id") == "panel":
            self.panel_depth = 1
        elif self.panel_depth and tag not in ("br",):
            self.panel_depth += 1

    def handle_endtag(self, tag):
        if self.panel_depth and tag not in ("br",):
            self.panel_depth -= 1

    def handle_data(self, data):
        if self.panel_depth:
            self.panel_text.append(data)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The shipped catalog's HTML report and the JSON of the same run (for result indexes)."""
    tmp = tmp_path_factory.mktemp("html")
    page = tmp / "check.html"
    runner = CliRunner()
    r = runner.invoke(app, ["check", "--html", str(page), "--json"])
    assert r.exit_code == 1, r.stderr  # the shipped catalog has failing calls (see test_check.py)
    return tmp, page, json.loads(r.stdout)["results"]


def index_of(results, function, mask, call):
    (i,) = [i for i, x in enumerate(results) if x["function"] == function and x["mask"] == mask and x["call"] == call]
    return i


def test_matrix_renders_with_the_expected_cells(report):
    tmp, page, results = report
    fatal = index_of(results, "tdvmcall_report_fatal_error", "0x1c00", "ReportFatalError")
    dom = chromium(tmp, f"{page.as_uri()}#show={fatal}", "--dump-dom").stdout
    p = Cells()
    p.feed(dom)
    assert p.matrix
    assert len(p.cells) == len(results)  # one cell per (site, call)

    def cell(row_function, mask, call):
        i = index_of(results, row_function, mask, call)
        (c,) = [c for c in p.cells if c["data-id"] == str(i)]
        return c["data-legacy"], c["data-hardened"]

    # 0xFFEC includes RBP: TDX_OPERAND_INVALID(RCX) under NO_RBP_MOD, whatever KVM does (docs/abi.md §3)
    assert cell("AP mailbox loop", "0xffec", "Instruction.CPUID") == ("module-rejects", "module-rejects")
    assert cell("TdVmCall", "0xffec", "Instruction.HLT") == ("module-rejects", "module-rejects")
    # 0xFFCC exposes every register any KVM leaf uses
    assert cell("__tdx_hypercall", "0xffcc", "Instruction.HLT") == ("ok", "ok")
    assert cell("__tdx_hypercall", "0xffcc", "KVMHypercall.SEND_IPI") == ("ok", "ok")
    # R10 R11 R12 only: R13 (the GPA, when R12 bit 63 is set) is missing
    assert cell("tdvmcall_report_fatal_error", "0x1c00", "ReportFatalError") == ("legacy-silent", "hardened-refuses")
    # a Hyper-V hypercall is not KVM's
    assert cell("tdcall_hypercall", "0x0d04", "HyperV-hypercall") == ("not-kvm", "not-kvm")

    # the page's script ran in the browser: the #show= link filled the details panel
    panel = " ".join(" ".join(p.panel_text).split())
    assert "tdvmcall_report_fatal_error" in panel and "r13" in panel and "hardened: hardened-refuses" in panel


def test_screenshot(report):
    tmp, page, _ = report
    shot = tmp / "check.png"
    chromium(tmp, page.as_uri(), "--window-size=1500,1900", f"--screenshot={shot}")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_an_interrupted_html_write_leaves_the_old_page_and_nothing_partial(tmp_path):
    """Ctrl-C in the middle of writing --html: the old page stays whole under its name and no
    temporary file stays (issue 18: no partial output under a final name).  Half of the new page
    was left under the name."""
    page = tmp_path / "check.html"
    page.write_text("the old page\n")
    interrupted(1, "check", "--html", str(page))
    assert page.read_text() == "the old page\n"
    assert [p.name for p in tmp_path.iterdir()] == ["check.html"]

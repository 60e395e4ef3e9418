"""scripts/debian-apt.sh: the mirror comes from apt's own sources (deb822 first, then the one-line
format), never a -security suite, and no host name is written in the repository."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "debian-apt.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not on PATH")


def mirror(etc: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SCRIPT), "--mirror"], env={"APT_ETC": str(etc), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True
    )


def test_the_mirror_is_read_from_deb822_sources_skipping_security(tmp_path):
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.invalid/debian-security\nSuites: bookworm-security\nComponents: main\n\n"
        "Types: deb\n# a comment\nURIs: http://mirror.invalid/debian/\nSuites: bookworm bookworm-updates\n"
        "Components: main\n"
    )
    r = mirror(tmp_path)
    assert r.returncode == 0 and r.stdout == "http://mirror.invalid/debian\n"  # trailing slash dropped


def test_the_one_line_format_and_options(tmp_path):
    (tmp_path / "sources.list").write_text(
        "# deb http://commented.invalid/debian bookworm main\n"
        "deb http://mirror.invalid/debian-security bookworm-security main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://mirror.invalid/debian bookworm main\n"
    )
    r = mirror(tmp_path)
    assert r.returncode == 0 and r.stdout == "http://mirror.invalid/debian\n"


def test_no_mirror_is_one_clear_line(tmp_path):
    r = mirror(tmp_path)
    assert r.returncode == 1 and r.stdout == ""
    assert (
        r.stderr
        == f"debian-apt: no Debian mirror found in {tmp_path}/sources.list.d/*.sources or {tmp_path}/sources.list\n"
    )


def test_no_registry_host_anywhere_in_the_repository():
    """The contract: apt's configured mirror at run time, never a registry host written down: not in
    the scripts and CI, nor in the docs, tests, examples, benches, the package or its build files."""
    hosts = re.compile(r"(deb|security|snapshot|ftp)\.debian\.org|archive\.ubuntu\.com|pypi\.org|crates\.io")
    paths = [ROOT / ".ci" / "run", ROOT / "README.md", ROOT / "pyproject.toml", ROOT / "setup.py"]
    for folder in ("scripts", "docs", "tests", "examples", "bench", "src"):
        paths += sorted(p for p in (ROOT / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert len(paths) > 50
    for path in paths:
        data = path.read_bytes()
        if b"\0" not in data:  # text; the committed test binaries hold no URL
            assert not hosts.search(data.decode("utf-8", "replace")), path

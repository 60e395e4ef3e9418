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


def test_no_registry_host_in_the_scripts_ci_and_kernel_docs():
    """The contract: apt's configured mirror at run time, never a registry host written down."""
    hosts = re.compile(r"(deb|security|snapshot|ftp)\.debian\.org|archive\.ubuntu\.com|pypi\.org|crates\.io")
    for path in [*sorted((ROOT / "scripts").iterdir()), ROOT / ".ci" / "run", ROOT / "docs" / "kvm.md"]:
        assert not hosts.search(path.read_text()), path

#!/usr/bin/env python3
"""Prove the `tdvmcall export-c --series` patches in a real kernel tree (issue 17, docs/kvm.md).

    python scripts/kernel_proof.py [--tree v7.3] [--cache DIR] [--json FILE]

Steps, each timed (wall and CPU time of its child processes):

1. get Debian's ``linux-source-<M.m>`` (the version pinned in SOURCES) through apt, with the mirror
   this machine is configured for (scripts/debian-apt.sh: a private source list and private lists,
   the system's apt untouched), unpack it once and keep it as a git tree tagged ``pristine``;
2. sparse: the system's if the tree's own ``scripts/checker-valid.sh`` accepts it, else built from
   Debian sid's source package (0.6.5~rc1 or later);
3. write the series (``tdvmcall vectors export`` then ``tdvmcall export-c --series``) and apply it
   with ``git am`` to the pristine tree;
4. ``checkpatch.pl --strict`` on each patch: no finding but the MAINTAINERS reminder;
5. configure ``x86_64_defconfig`` + KVM_INTEL_TDX (and what it depends on) + the KUnit option,
   build ``arch/x86/kvm/`` with ``W=1 C=2`` out of tree: no warning in a file the series touches;
6. run the KUnit suite under UML with ``tools/testing/kunit/kunit.py``: every case passes.

Downloads, the tree and both builds are kept in the cache (default /var/cache/tdvmcall-kernel, or
$TDVMCALL_KERNEL_CACHE), so a second run rebuilds only what the series touches.  Builds run under
``nice`` with ``make -j2`` (the machine is shared).

Exit status: 0 every check passed; 1 a check failed (the JSON says which and why); 77 the proof
could not be run here (a download, a tool or a package missing), with the reason on stderr and in
the JSON's ``skipped``: a checker never passes what it could not judge.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
APT = HERE / "debian-apt.sh"

#: the kernel each model tree is proven on: Debian package, version, the suites that carry it
SOURCES = {
    "v7.3": ("linux-source-7.3", "7.3.4-1~bpo13+1", "trixie-backports", "7.3.4"),
}
SPARSE_SUITE = "sid"
#: what the proof may install on a machine that lacks it (.ci/run does, as root)
NEEDS = {"flex": "flex", "bison": "bison", "bc": "bc", "perl": "perl", "git": "git", "make": "make", "gcc": "gcc"}
#: the only checkpatch finding a new file brings that the series cannot answer
ALLOWED_CHECKPATCH = ("added, moved or deleted file(s), does MAINTAINERS need updating?",)
AUTHOR = "tdvmcall export-c <tdvmcall@localhost>"


class Skip(Exception):
    """The proof cannot run on this machine; the message says exactly why."""


class Step:
    """Wall and child CPU time of a block."""

    def __init__(self, report: dict, name: str) -> None:
        self.report, self.name = report, name

    def __enter__(self) -> Step:
        self.t0 = time.monotonic()
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.c0 = ru.ru_utime + ru.ru_stime
        print(f"kernel-proof: {self.name} ...", file=sys.stderr, flush=True)
        return self

    def __exit__(self, *exc: object) -> None:
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall = time.monotonic() - self.t0
        cpu = ru.ru_utime + ru.ru_stime - self.c0
        self.report["steps"][self.name] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}
        print(f"kernel-proof: {self.name}: {wall:.1f} s wall, {cpu:.1f} s CPU", file=sys.stderr, flush=True)


def run(
    cmd: list[str], cwd: Path | None = None, env: dict | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{tail}")
    return proc


def system_env(extra_path: list[Path] = ()) -> dict:
    """The environment for kernel tools: the system's python3 first (checkpatch's spdxcheck needs
    python3-ply, which a virtualenv does not see), the built sparse before the system's."""
    env = dict(os.environ)
    env.pop("VIRTUAL_ENV", None)
    path = [str(p) for p in extra_path] + [
        "/usr/local/bin",
        "/usr/bin",
        "/bin",
        "/usr/local/sbin",
        "/usr/sbin",
        "/sbin",
    ]
    env["PATH"] = ":".join(path)
    env["LC_ALL"] = "C"
    return env


def cache_dir(arg: str | None) -> Path:
    for c in (arg, os.environ.get("TDVMCALL_KERNEL_CACHE"), "/var/cache/tdvmcall-kernel"):
        if not c:
            continue
        p = Path(c)
        try:
            p.mkdir(parents=True, exist_ok=True)
            probe = p / ".write-probe"
            probe.write_text("")
            probe.unlink()
            return p
        except OSError:
            if c == arg:
                raise Skip(f"--cache {c}: not writable") from None
    p = Path(tempfile.gettempdir()) / "tdvmcall-kernel"
    p.mkdir(parents=True, exist_ok=True)
    return p


def need_tools() -> None:
    missing = [pkg for tool, pkg in NEEDS.items() if shutil.which(tool, path=system_env()["PATH"]) is None]
    if not Path("/usr/include/libelf.h").exists() and not Path("/usr/include/gelf.h").exists():
        missing.append("libelf-dev")
    if not Path("/usr/include/openssl/ssl.h").exists():
        missing.append("libssl-dev")
    if missing:
        raise Skip(f"the kernel build needs {', '.join(missing)} (apt-get install {' '.join(missing)}; .ci/run does)")
    py = run(["python3", "-c", "import ply, git"], env=system_env(), check=False)
    if py.returncode != 0:
        raise Skip(
            "checkpatch's scripts/spdxcheck.py needs the system python3 with ply and git "
            "(apt-get install python3-ply python3-git; .ci/run does): " + py.stderr.strip().splitlines()[-1]
        )
    if shutil.which("dpkg-deb") is None or shutil.which("apt-get") is None:
        raise Skip("no dpkg-deb/apt-get: the kernel source comes as a Debian package")


def get_deb(cache: Path, package: str, version: str, suites: str) -> Path:
    debs = cache / "debs"
    debs.mkdir(exist_ok=True)
    found = sorted(debs.glob(f"{package}_{version.replace(':', '%3a')}_*.deb"))
    if found:
        return found[0]
    proc = run([str(APT), str(cache / "apt"), suites, "-qq", "download", f"{package}={version}"], cwd=debs, check=False)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if proc.returncode != 0 or not found:
        why = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no .deb written"]
        raise Skip(f"apt-get download {package}={version} from {suites} failed: {why[0]}")
    return found[0]


def pristine_tree(cache: Path, deb: Path, release: str) -> Path:
    """The unpacked source as a git tree at tag ``pristine`` (made once, then reset each run)."""
    tree = cache / "src" / f"linux-{release}"
    env = system_env()
    git = ["git", "-c", "user.name=tdvmcall", "-c", "user.email=tdvmcall@localhost"]
    if (tree / ".git").is_dir() and run(
        ["git", "rev-parse", "-q", "--verify", "pristine"], tree, env, check=False
    ).returncode == 0:
        run(["git", "am", "--abort"], tree, env, check=False)
        run(["git", "checkout", "-q", "-f", "-B", "tdvmcall", "pristine"], tree, env)
        run(["git", "clean", "-q", "-f", "-d", "-x"], tree, env)
        return tree
    shutil.rmtree(tree, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix="unpack-"))
    try:
        run(["dpkg-deb", "-x", str(deb), str(tmp)])
        tars = sorted(tmp.glob("usr/src/linux-source-*.tar.*"))
        if not tars:
            raise Skip(f"{deb.name} holds no usr/src/linux-source-*.tar.*")
        run(["nice", "-n", "10", "tar", "-xf", str(tars[0]), "-C", str(tmp)])
        top = next(p for p in tmp.iterdir() if p.is_dir() and p.name.startswith("linux-source"))
        tree.parent.mkdir(parents=True, exist_ok=True)
        top.rename(tree)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    run(["git", "init", "-q"], tree, env)
    # Debian's source tarball ignores everything at the top level (.gitignore): add by force
    run(["nice", "-n", "10", "git", "add", "-A", "-f"], tree, env)
    run([*git, "commit", "-q", "-m", f"Linux {release} ({deb.name})"], tree, env)
    run(["git", "tag", "pristine"], tree, env)
    run(["git", "checkout", "-q", "-B", "tdvmcall"], tree, env)
    return tree


def sparse(cache: Path, tree: Path) -> tuple[Path, str]:
    """A sparse the tree accepts (its own checker-valid.sh), and where it came from."""
    valid = tree / "scripts" / "checker-valid.sh"
    env = system_env()
    system = shutil.which("sparse", path=env["PATH"])
    if system and run(["sh", str(valid), system], env=env, check=False).stdout.strip() == "1":
        return Path(system), "system"
    built = cache / "sparse" / "sparse"
    if built.exists() and run(["sh", str(valid), str(built)], env=env, check=False).stdout.strip() == "1":
        return built, "built from Debian sid's source package (cached)"
    src = cache / "sparse-src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    proc = run(
        [str(APT), str(cache / "apt"), SPARSE_SUITE, "-qq", "source", "--download-only", "sparse"], src, check=False
    )
    orig = sorted(src.glob("sparse_*.orig.tar.*"))
    if proc.returncode != 0 or not orig:
        why = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no source written"]
        raise Skip(
            f"sparse: the system's is missing or too old for this tree, and apt-get source sparse from {SPARSE_SUITE} failed: {why[0]}"
        )
    build = src / "build"
    build.mkdir()
    run(["tar", "-xf", str(orig[0]), "-C", str(build), "--strip-components=1"])
    flags = ["HAVE_LIBXML=no", "HAVE_GTK=no", "HAVE_LLVM=no", "HAVE_SQLITE=no"]
    run(["nice", "-n", "10", "make", "-j2", *flags, "sparse"], build, env)
    built.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(build / "sparse", built)
    if run(["sh", str(valid), str(built)], env=env, check=False).stdout.strip() != "1":
        raise Skip(f"sparse from {orig[0].name}: the tree's checker-valid.sh refuses it")
    return built, f"built from Debian {SPARSE_SUITE}'s {orig[0].name}"


def tdvmcall() -> list[str]:
    exe = shutil.which("tdvmcall")
    return [exe] if exe else [sys.executable, "-m", "tdvmcall"]


def write_series(work: Path, tree: Path, model_tree: str) -> tuple[list[Path], dict]:
    vec, ser = work / "vectors", work / "series"
    run([*tdvmcall(), "vectors", "export", str(vec)])
    proc = run(
        [
            *tdvmcall(),
            "export-c",
            "--series",
            str(ser),
            "--tree",
            model_tree,
            "--kernel",
            str(tree),
            "--vectors",
            str(vec),
            "--author",
            AUTHOR,
            "--json",
        ]
    )
    info = json.loads(proc.stdout)
    return sorted(ser.glob("*.patch")), info


def checkpatch(tree: Path, patches: list[Path]) -> dict:
    out = {}
    env = system_env()
    for p in patches:
        proc = run(
            ["perl", "scripts/checkpatch.pl", "--strict", "--no-color", "--showfile", str(p)], tree, env, check=False
        )
        # with --showfile a finding reads "path:line: WARNING: text"
        findings = [ln for ln in proc.stdout.splitlines() if re.match(r"^(?:\S+:\d+: )?(ERROR|WARNING|CHECK):", ln)]
        problems = []
        if "Traceback" in proc.stderr or "not found" in proc.stderr:
            problems.append(f"checkpatch could not run all its checks: {proc.stderr.strip().splitlines()[-1]}")
        total = re.search(r"^total: (\d+) errors, (\d+) warnings, (\d+) checks", proc.stdout, re.M)
        if total is None:
            problems.append("checkpatch printed no total line")
        out[p.name] = {
            "findings": findings,
            "unexpected": [f for f in findings if not f.endswith(ALLOWED_CHECKPATCH)] + problems,
        }
    return out


KCONFIG = [
    "VIRTUALIZATION",
    "KVM",
    "KVM_INTEL",
    "CMA",
    "X86_X2APIC",
    "X86_MCE",
    "INTEL_TDX_HOST",
    "KVM_INTEL_TDX",
    "KUNIT",
    "KVM_TDVMCALL_REGS_KUNIT_TEST",
]


def build_x86(tree: Path, build: Path, sparse_bin: Path, touched: list[str]) -> dict:
    env = system_env([sparse_bin.parent])
    build.mkdir(parents=True, exist_ok=True)
    nice = ["nice", "-n", "10"]
    if not (build / ".config").exists():
        run([*nice, "make", "-s", f"O={build}", "x86_64_defconfig"], tree, env)
    cfg = ["./scripts/config", "--file", str(build / ".config")]
    for sym in KCONFIG:
        cfg += ["-e", sym]
    run(cfg, tree, env)
    run([*nice, "make", "-s", f"O={build}", "olddefconfig"], tree, env)
    config = (build / ".config").read_text()
    off = [s for s in KCONFIG if f"\nCONFIG_{s}=y" not in config]
    if off:
        return {"error": f"x86_64_defconfig + {', '.join(KCONFIG)}: still off after olddefconfig: {', '.join(off)}"}
    # the series' files (and tdx.c) are rebuilt every run: git checkout gives them a new mtime
    proc = run(
        [*nice, "make", f"O={build}", "-j2", "W=1", "C=2", f"CHECK={sparse_bin}", "arch/x86/kvm/"],
        tree,
        env,
        check=False,
    )
    log = proc.stdout + proc.stderr
    warnings = [ln for ln in log.splitlines() if re.search(r"\b(warning|error):", ln)]
    mine = [ln for ln in warnings if any(t in ln for t in touched)]
    checked = sorted({m.group(1) for m in re.finditer(r"^\s+CHECK\s+(\S+)", log, re.M)})
    compiled = sorted({m.group(1) for m in re.finditer(r"^\s+CC\s+(\S+)", log, re.M)})
    return {
        "returncode": proc.returncode,
        "warnings_in_series_files": mine,
        "warnings_elsewhere": len(warnings) - len(mine),
        "sparse_checked": [c for c in checked if any(t in c for t in touched)],
        "compiled": [c for c in compiled if any(t.rsplit(".", 1)[0] + ".o" in c for t in touched)],
        "log_tail": log.strip().splitlines()[-10:] if proc.returncode else [],
    }


def kunit(tree: Path, build: Path) -> dict:
    env = system_env()
    cmd = [
        "nice",
        "-n",
        "10",
        "python3",
        "tools/testing/kunit/kunit.py",
        "run",
        "--kunitconfig=arch/x86/kvm/vmx",
        f"--build_dir={build}",
        "--jobs=2",
    ]
    proc = run(cmd, tree, env, check=False)
    log = proc.stdout + proc.stderr
    m = re.search(r"Testing complete\. Ran (\d+) tests: (.*)", log)
    counts = {"ran": int(m.group(1))} if m else {}
    if m:
        for k, v in re.findall(r"(\w+): (\d+)", m.group(2)):
            counts[k] = int(v)
    return {"returncode": proc.returncode, "counts": counts, "log_tail": log.strip().splitlines()[-12:]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", default="v7.3", choices=sorted(SOURCES), help="the model's tree to prove (default v7.3)")
    ap.add_argument("--model-tree", help="the model tree to generate the series for (default: --tree)")
    ap.add_argument("--cache", help="where downloads and builds are kept (default /var/cache/tdvmcall-kernel)")
    ap.add_argument("--json", help="also write the report to this file")
    args = ap.parse_args()
    package, version, suites, release = SOURCES[args.tree]
    report: dict = {"tree": args.tree, "package": f"{package} {version}", "steps": {}, "ok": False}
    t0 = time.monotonic()
    try:
        model_tree = args.model_tree or args.tree
        try:
            from tdvmcall.kvm.trees import TREE_NAMES
        except ImportError:
            raise Skip("tdvmcall is not importable here: install it (pip install -e .) first") from None
        if model_tree not in TREE_NAMES:
            raise Skip(f"the model has no tree {model_tree!r} (it knows {', '.join(TREE_NAMES)})")
        need_tools()
        cache = cache_dir(args.cache)
        report["cache"] = str(cache)
        # one proof at a time per cache: the tree and the build directories are shared (several
        # agents may run .ci/run at once on this machine); a second run waits here
        lock = open(cache / ".lock", "w")  # noqa: SIM115 -- held until the process ends
        t_lock = time.monotonic()
        fcntl.flock(lock, fcntl.LOCK_EX)
        report["waited_for_lock_s"] = round(time.monotonic() - t_lock, 1)
        with Step(report, "source"):
            deb = get_deb(cache, package, version, suites)
            tree = pristine_tree(cache, deb, release)
        with Step(report, "sparse"):
            sparse_bin, origin = sparse(cache, tree)
            report["sparse"] = {
                "path": str(sparse_bin),
                "origin": origin,
                "version": run([str(sparse_bin), "--version"], check=False).stdout.strip(),
            }
        with tempfile.TemporaryDirectory(prefix="tdvmcall-kernel-") as work, Step(report, "series"):
            patches, info = write_series(Path(work), tree, model_tree)
            env = system_env()
            run(
                [
                    "git",
                    "-c",
                    "user.name=tdvmcall",
                    "-c",
                    "user.email=tdvmcall@localhost",
                    "am",
                    "-q",
                    *map(str, patches),
                ],
                tree,
                env,
            )
            report["series"] = info
            report["checkpatch"] = checkpatch(tree, patches)
        touched = sorted({f for p in info["patches"] for f in p["files"] if f.endswith((".c", ".h"))})
        with Step(report, "build x86 W=1 C=2"):
            report["x86"] = build_x86(tree, cache / f"build-x86-{release}", sparse_bin, touched)
        with Step(report, "kunit (UML)"):
            report["kunit"] = kunit(tree, cache / f"build-um-{release}")
    except Skip as e:
        report["skipped"] = str(e)
        print(f"kernel-proof: cannot run here: {e}", file=sys.stderr)
        return finish(report, args, 77, t0)
    failures = []
    for name, c in report.get("checkpatch", {}).items():
        failures += [f"checkpatch {name}: {f}" for f in c["unexpected"]]
    x86 = report.get("x86", {})
    if "error" in x86:
        failures.append(x86["error"])
    else:
        if x86["returncode"]:
            failures.append(f"the x86 build failed: {' | '.join(x86['log_tail'][-3:])}")
        failures += [f"x86 W=1 C=2: {w}" for w in x86["warnings_in_series_files"]]
        if not x86["sparse_checked"]:
            failures.append("sparse checked none of the series' files")
    k = report.get("kunit", {})
    counts = k.get("counts", {})
    cases = report.get("series", {}).get("kunit_cases", {})
    want = sum(cases.values())
    if k.get("returncode") or not counts or counts.get("passed") != counts.get("ran") or counts.get("ran", 0) < want:
        failures.append(
            f"kunit: {counts or 'no summary'} (the suite has {want} cases): {' | '.join(k.get('log_tail', [])[-4:])}"
        )
    report["failures"] = failures
    report["ok"] = not failures
    return finish(report, args, 0 if not failures else 1, t0)


def finish(report: dict, args: argparse.Namespace, code: int, t0: float) -> int:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    report["total"] = {"wall_s": round(time.monotonic() - t0, 1), "cpu_s": round(ru.ru_utime + ru.ru_stime, 1)}
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return code


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as e:
        print(f"kernel-proof: {e}", file=sys.stderr)
        sys.exit(1)

"""``tdvmcall export-c --series``: the KVM patch series (export_c/series.py).

The series is checked here on a small tree shaped like KVM's (the lines the series anchors on, in
the places the kernel has them; not the kernel's code), applied with ``git am``; its KUnit cases are
checked against the conformance corpus they come from (docs/vectors.md) and run through the
generated C compiled in userspace.  The proof in a real tree (Debian's linux-source, built with
W=1 C=2, checkpatch, KUnit under UML) is tests/test_kernel_proof.py.
"""

from __future__ import annotations

import ctypes
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from interrupted_write import interrupted
from tdvmcall.abi.regs import mask_of
from tdvmcall.cli import app
from tdvmcall.export_c import generate as G
from tdvmcall.export_c import series as S
from tdvmcall.kvm.trees import TREE_NAMES

AUTHOR = "Ada Lovelace <ada@example.org>"
TREE = "v6.16"  # a tree of the model with a release number, so the version check is exercised

# A tree shaped like KVM's where the series touches it: an include block ending in "tdx.h", the exit
# handler that switches on the re-labelled reason and sends TDCALL to handle_tdvmcall(), the
# Makefile line of tdx.o, the Kconfig entry of KVM_INTEL_TDX, and UML's x86 Makefile and Kconfig.
FAKE = {
    "Makefile": "VERSION = 6\nPATCHLEVEL = 16\nSUBLEVEL = 1\nEXTRAVERSION =\n",
    S.TDX_C: """// SPDX-License-Identifier: GPL-2.0
#include <linux/cpu.h>
#include "x86_ops.h"
#include "tdx.h"
#include "vmx.h"

static int handle_tdvmcall(struct kvm_vcpu *vcpu)
{
	return 1;
}

int tdx_handle_exit(struct kvm_vcpu *vcpu, fastpath_t fastpath)
{
	union vmx_exit_reason exit_reason = vmx_get_exit_reason(vcpu);

	if (fastpath != EXIT_FASTPATH_NONE)
		return 1;

	switch (exit_reason.basic) {
	case EXIT_REASON_HLT:
		return 1;
	case EXIT_REASON_TDCALL:
		return handle_tdvmcall(vcpu);
	default:
		break;
	}
	return 0;
}
""",
    S.KVM_MAKEFILE: "kvm-intel-y\t\t+= vmx/vmx.o\nkvm-intel-$(CONFIG_KVM_INTEL_TDX)\t+= vmx/tdx.o\n\nobj-y += kvm.o\n",
    S.KVM_KCONFIG: 'config KVM_INTEL_TDX\n\tbool "TDX"\n\thelp\n\t  TDX.\n\n\t  If unsure, say N.\n\n'
    'config KVM_AMD\n\ttristate "AMD"\n',
    S.UM_MAKEFILE: "obj-y = bugs.o\n\nUSER_OBJS := bugs.o\n",
    S.UM_KCONFIG: "config UML_X86\n\tdef_bool y\n",
}


def git(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    r = CliRunner().invoke(app, ["vectors", "export", str(d / "v")])
    assert r.exit_code == 0, r.output
    return d / "v"


def fake_tree(root: Path, files: dict[str, str] = FAKE) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.fixture(scope="module")
def written(tmp_path_factory, corpus) -> tuple[Path, Path, dict]:
    root = fake_tree(tmp_path_factory.mktemp("linux"))
    out = root.parent / "series"
    info = S.write_series(out, root, TREE, corpus, AUTHOR, date=0)
    return root, out, info


def hardened_entries(corpus: Path) -> list[dict]:
    """The corpus's hardened vectors that reach KVM, read from its index (docs/vectors.md)."""
    index = json.loads((corpus / "index.json").read_text())
    return [e for e in index["files"] if e["policy"] == "hardened" and e["verdict"] != "module-refused"]


# --- the series ------------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("git") is None, reason="git is not on PATH: git am cannot be tried")
def test_git_am_applies_the_series_and_the_glue_lands_where_it_must(written, tmp_path):
    _, out, info = written
    tree = fake_tree(tmp_path / "linux")
    assert git(tree, "init", "-q").returncode == 0
    git(tree, "add", "-A")
    assert git(tree, "commit", "-qm", "pristine").returncode == 0
    patches = sorted(out.glob("*.patch"))
    assert [p.name[:5] for p in patches] == ["0001-", "0002-", "0003-"]
    r = git(tree, "am", *map(str, patches))
    assert r.returncode == 0, r.stderr
    log = git(tree, "log", "--format=%s%n%an <%ae>", "-3").stdout.splitlines()
    assert log[::2] == [p["subject"] for p in reversed(info["patches"])]
    assert set(log[1::2]) == {AUTHOR}
    vmx = tree / S.VMX_DIR
    assert (vmx / G.HEADER).read_text() == G.generate(tree=TREE)[G.HEADER]
    assert (vmx / G.SOURCE).read_text() == G.generate(tree=TREE)[G.SOURCE]
    tdx = (tree / S.TDX_C).read_text().splitlines()
    # the header after tdx.h; the helper before the dispatcher; its call before the switch
    assert tdx[tdx.index('#include "tdx.h"') + 1] == f'#include "{G.HEADER}"'
    helper = tdx.index("static int tdx_check_tdvmcall_regs(struct kvm_vcpu *vcpu)")
    handler = tdx.index("int tdx_handle_exit(struct kvm_vcpu *vcpu, fastpath_t fastpath)")
    call = tdx.index("\tswitch (tdx_check_tdvmcall_regs(vcpu)) {")
    switch = tdx.index("\tswitch (exit_reason.basic) {")
    assert helper < handler < tdx.index("\tif (fastpath != EXIT_FASTPATH_NONE)") < call < switch
    # the glue gathers every GPR vp_enter_args has, RAX from vp_enter_ret, and acts on both verdicts
    body = "\n".join(tdx[helper:handler])
    for reg in ("rcx", "rdx", "rbx", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"):
        assert f"[TDVMCALL_{reg.upper()}] = tdx->vp_enter_args.{reg}," in body
    assert "[TDVMCALL_RAX] = tdx->vp_enter_ret," in body
    assert "tdvmcall_set_return_code(vcpu, TDVMCALL_STATUS_INVALID_OPERAND);" in body
    assert "vcpu->run->exit_reason = KVM_EXIT_INTERNAL_ERROR;" in body
    assert "data[2] = missing;" in body and "data[3] = unexposed;" in body
    assert info["dispatcher"] == "tdx_handle_exit"
    mk = (tree / S.KVM_MAKEFILE).read_text()
    assert "kvm-intel-$(CONFIG_KVM_INTEL_TDX)\t+= vmx/tdvmcall_regs.o\n" in mk
    assert f"kvm-intel-$(CONFIG_{S.KCONFIG_SYMBOL}) += vmx/tdvmcall_regs_test.o" in mk
    kconfig = (tree / S.KVM_KCONFIG).read_text()
    assert (
        kconfig.index("If unsure, say N.")
        < kconfig.index(f"config {S.KCONFIG_SYMBOL}")
        < kconfig.index("config KVM_AMD")
    )
    assert f"config {S.KCONFIG_SYMBOL}" in (tree / S.UM_KCONFIG).read_text()
    assert "../kvm/vmx/tdvmcall_regs_test.o" in (tree / S.UM_MAKEFILE).read_text()
    assert (tree / S.KUNITCONFIG).read_text() == f"CONFIG_KUNIT=y\nCONFIG_{S.KCONFIG_SYMBOL}=y\n"


def test_commit_messages_are_in_kvm_style(written):
    _, out, _ = written
    for p in sorted(out.glob("*.patch")):
        text = p.read_text()
        head, _, rest = text.partition("\n\n")
        subject = re.search(r"^Subject: \[PATCH \d/3\] (.*)$", head, re.M)
        assert subject and subject.group(1).startswith("KVM: TDX: ")
        body = rest.split("\n---\n")[0]
        assert body.rstrip().endswith(f"Signed-off-by: {AUTHOR}")
        assert all(len(line) <= 75 for line in body.splitlines()), p.name
        assert len(body.split("\n\n")) >= 3  # the why, in paragraphs, not a one-liner
    bodies = " ".join(p.read_text() for p in out.glob("*.patch"))
    assert "GHCI" in bodies and "TDH.VP.ENTER" in bodies  # the ABI cited


def test_the_kunit_cases_are_the_corpus_hardened_vectors(corpus):
    """Every hardened vector KVM sees is a case, expecting what the vector records (the model's
    answer), and there are at least 240 of them."""
    entries = hardened_entries(corpus)
    cases = S.vector_cases(corpus, TREE)
    assert len(cases) == len(entries) >= 240
    codes = {"refused": G.RET_REFUSE, "internal_error": G.RET_NO_STATUS}
    for entry, case in zip(entries, cases, strict=True):
        v = json.loads((corpus / entry["file"]).read_text())
        k = v["expected"]["kvm"]
        assert case.name == entry["id"].replace(".hardened.", ".")
        assert case.ret == codes.get(k["verdict"], G.RET_OK)
        assert (case.missing, case.unexposed) == (mask_of(k["missing"]), mask_of(k["unexposed_outputs"]))
        assert case.regs == tuple(int(x, 16) for x in v["expected"]["vmm"].values())


@pytest.mark.parametrize("tree", TREE_NAMES)
def test_every_kunit_case_holds_for_the_generated_c(tmp_path, corpus, tree):
    """What KUnit runs in the kernel, run here: the generated C for the tree, compiled in userspace,
    on every case of the suite (the vectors and the tree's bus-lock cases), for every tree."""
    cc = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if cc is None:
        pytest.skip("no C compiler (cc, gcc or clang) on PATH")
    for name, text in G.generate(tree=tree).items():
        (tmp_path / name).write_text(text)
    so = tmp_path / "lib.so"
    cmd = [cc, "-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared", "-o", str(so), G.SOURCE]
    assert subprocess.run(cmd, cwd=tmp_path, capture_output=True).returncode == 0
    lib = ctypes.CDLL(str(so))
    cases = S.vector_cases(corpus, tree) + S.bus_lock_cases(tree)
    bus = [c for c in cases if c.name.startswith("bus_lock.")]
    assert len(bus) >= 2 * len(G.build_table(tree=tree).ghci)  # every call, two masks (some refused by the module)
    for c in cases:
        regs = (ctypes.c_uint64 * 16)(*c.regs)
        missing, unexposed = ctypes.c_uint64(), ctypes.c_uint64()
        ret = lib.tdvmcall_check_regs(regs, ctypes.byref(missing), ctypes.byref(unexposed))
        assert (ret, missing.value, unexposed.value) == (c.ret, c.missing, c.unexposed), c.name


def test_bus_lock_cases_follow_the_model_for_the_tree():
    """Hand-derived from docs/abi.md §3 and v6.16.1's tdx_to_vmx_exit_reason() (it switches on the
    whole exit reason): a TDCALL exit (77) whose reason carries bit 26 (bus lock detected) is
    0x0400004D in RAX, is not re-labelled, and is dispatched on R11 alone: CPUID's R11 of 10 is no
    TDVMCALL sub-function there, so with R10 and R11 exposed it is SUBFUNC_UNSUPPORTED (OK: the check
    needs nothing more).  The case's registers are what KVM sees (KVM's GPR order, RAX first): RAX,
    RCX = the mask, R11 = 10; every register the mask does not expose reads 0 (TDG.VP.VMCALL), R12's
    CPUID leaf 1 included."""
    cases = {c.name: c for c in S.bus_lock_cases(TREE)}
    cpuid = cases["bus_lock.instruction-cpuid.leaf1.r10-r11"]
    assert cpuid.regs == (0x0400004D, 0xC00) + (0,) * 9 + (10,) + (0,) * 4
    assert (cpuid.ret, cpuid.missing, cpuid.unexposed) == (G.RET_OK, 0, 0)


def test_on_v7_3_a_bus_lock_cpuid_exposing_r10_r11_alone_is_refused():
    """The issue's finding, from 7.3.4's tdx_to_vmx_exit_reason() (it switches on exit_reason.basic):
    a bus-lock CPUID exit is re-labelled by its leaf, so KVM reads R12 and R13 (tdx_emulate_cpuid():
    EAX and ECX) and writes R12..R15; exposing R10 and R11 alone must be refused, R12 and R13 missing
    and R12..R15 unexposed. In the trees that compare the whole reason the same exit is
    SUBFUNC_UNSUPPORTED and needs nothing more."""
    r12_r15 = mask_of(("r12", "r13", "r14", "r15"))
    v73 = {c.name: c for c in S.bus_lock_cases("v7.3")}["bus_lock.instruction-cpuid.leaf1.r10-r11"]
    assert (v73.ret, v73.missing, v73.unexposed) == (G.RET_REFUSE, mask_of(("r12", "r13")), r12_r15)
    v616 = {c.name: c for c in S.bus_lock_cases("v6.16")}["bus_lock.instruction-cpuid.leaf1.r10-r11"]
    assert (v616.ret, v616.missing, v616.unexposed) == (G.RET_OK, 0, 0)


# --- refusals ------------------------------------------------------------------------------------------
def test_the_series_refuses_what_it_cannot_do_right(tmp_path, corpus):
    root = fake_tree(tmp_path / "a")
    with pytest.raises(S.SeriesError, match=r"--tree: 'v7\.9' is not a KVM tree; accepted: kvm-x86, v6\.16, v7\.3"):
        S.write_series(tmp_path / "o", root, "v7.9", corpus, AUTHOR)
    (root / "Makefile").write_text("VERSION = 7\nPATCHLEVEL = 3\nSUBLEVEL = 4\n")
    with pytest.raises(S.SeriesError, match=r"is Linux 7\.3\.4, but --tree v6\.16 is the model of 6\.16"):
        S.write_series(tmp_path / "o", root, TREE, corpus, AUTHOR)
    b = fake_tree(tmp_path / "b", FAKE | {S.TDX_C: FAKE[S.TDX_C].replace("return handle_tdvmcall(vcpu);", "break;")})
    with pytest.raises(S.SeriesError, match="cannot place the check"):
        S.write_series(tmp_path / "o", b, TREE, corpus, AUTHOR)
    e = fake_tree(
        tmp_path / "e", FAKE | {S.TDX_C: FAKE[S.TDX_C].replace("int tdx_handle_exit(", "int __tdx_handle_exit(")}
    )
    with pytest.raises(
        S.SeriesError, match=r"dispatches TDCALL exits in __tdx_handle_exit\(\), but in the model's tree"
    ):
        S.write_series(tmp_path / "o", e, TREE, corpus, AUTHOR)
    c = fake_tree(tmp_path / "c")
    (c / S.VMX_DIR / G.SOURCE).write_text("")
    with pytest.raises(S.SeriesError, match="already there; the series is for a pristine tree"):
        S.write_series(tmp_path / "o", c, TREE, corpus, AUTHOR)
    with pytest.raises(S.SeriesError, match="not a kernel source tree"):
        S.write_series(tmp_path / "o", tmp_path / "nothing", TREE, corpus, AUTHOR)
    with pytest.raises(S.SeriesError, match="is not 'Name <email>'"):
        S.write_series(tmp_path / "o", fake_tree(tmp_path / "d"), TREE, corpus, "nobody")
    assert not (tmp_path / "o").exists()


def test_a_stale_corpus_is_refused(tmp_path, corpus):
    stale = tmp_path / "stale"
    shutil.copytree(corpus, stale)
    entry = hardened_entries(stale)[0]
    v = json.loads((stale / entry["file"]).read_text())
    v["expected"]["kvm"]["verdict"] = "refused" if v["expected"]["kvm"]["verdict"] != "refused" else "completed"
    (stale / entry["file"]).write_text(json.dumps(v))
    with pytest.raises(S.SeriesError, match="its answer is not the model's; export the corpus again"):
        S.vector_cases(stale, TREE)
    with pytest.raises(S.SeriesError, match=r"is not a tdvmcall-vectors index|cannot read"):
        S.vector_cases(tmp_path, TREE)


def test_the_command(tmp_path, corpus):
    runner = CliRunner()
    root = fake_tree(tmp_path / "linux")
    out = tmp_path / "series"
    args = ["export-c", "--series", str(out), "--kernel", str(root), "--vectors", str(corpus)]
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "--tree: required with --series" in r.output
    out.mkdir()
    (out / "0004-KVM-an-older-series.patch").write_text("stale")
    (out / "notes.txt").write_text("mine")
    r = runner.invoke(app, [*args, "--tree", TREE, "--author", AUTHOR, "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    # a patch of an earlier series would be applied with this one: removed and named; the rest kept
    assert info["removed"] == [str(out / "0004-KVM-an-older-series.patch")]
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".patch")) == ["notes.txt"]
    assert len(list(out.glob("*.patch"))) == 3
    assert info["dispatcher"] == "tdx_handle_exit" and len(info["patches"]) == 3
    assert info["kunit_cases"]["vectors"] == len(hardened_entries(corpus))
    r = runner.invoke(app, ["export-c", str(tmp_path / "x"), "--series", str(out), "--tree", TREE])
    assert r.exit_code == 2 and "give no DIR and no --check with it" in r.output
    r = runner.invoke(app, ["export-c", str(tmp_path / "x"), "--vectors", str(corpus)])
    assert r.exit_code == 2 and "--vectors goes with --series" in r.output
    r = runner.invoke(app, ["export-c", str(tmp_path / "x"), "--tree", "v0.1"])
    assert r.exit_code == 2 and "--tree: 'v0.1' is not a KVM tree; accepted: kvm-x86, v6.16, v7.3" in r.output


@pytest.mark.parametrize("cut", [1, 2], ids=["first-patch", "second-patch"])
def test_an_interrupted_series_leaves_the_old_one_and_nothing_partial(tmp_path, corpus, cut):
    """Ctrl-C in the middle of writing a patch: SERIES_DIR holds the earlier series, whole (its
    stale patch too), never part of a patch nor new patches beside old ones that `git am
    SERIES_DIR/*.patch` would apply together (issue 18: no partial output under a final name).  The
    write was cut in half under the patch's name, and the stale patch was already deleted."""
    root = fake_tree(tmp_path / "linux")
    out = tmp_path / "series"
    args = ["export-c", "--series", str(out), "--kernel", str(root), "--vectors", str(corpus), "--tree", TREE]
    assert CliRunner().invoke(app, [*args, "--author", AUTHOR]).exit_code == 0
    (out / "0004-KVM-an-older-series.patch").write_text("stale")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    interrupted(cut, *args, "--author", "Grace Hopper <grace@example.org>")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_the_kernel_proof_proves_the_release_the_model_s_tree_is():
    """scripts/kernel_proof.py names, per tree, the Debian package it downloads; that package is
    the release the model's rule describes (kvm.trees.TreeRule.version and .source), or the proof
    would build one kernel and vouch for another."""
    import runpy

    from tdvmcall.kvm.trees import TREES

    sources = runpy.run_path(str(Path(__file__).resolve().parent.parent / "scripts" / "kernel_proof.py"))["SOURCES"]
    assert sources
    for tree, (package, version, _suites, release) in sources.items():
        rule = TREES[tree]
        assert rule.version == tuple(int(x) for x in release.split(".")[:2]), tree
        assert package in rule.source and version in rule.source, (tree, rule.source)

"""The deep engine (scan/deep.py) on guests this project builds from its own sources.

tests/data/deep/guest.c is a small guest in the style of Linux's and td-shim's: an out-of-line stub
loads R10..R13 from a struct passed by pointer, filled one, two or three levels up (a memset, a
memcpy of a template, a wrapper that passes its own constants on).  It is built here with gcc at -O0
and -O2, as an executable, a relocatable object (-ffunction-sections: every call is a relocation),
a shared object (calls through the PLT, or with -fno-plt through GOT slots) and a kernel-style image
linked at 0xffffffff81000000.  The expected call, leaf and inputs of each caller are the
constants written in guest.c (GHCI 1.5 leaf numbers), never the scanner's output.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tdvmcall.cli import app
from tdvmcall.judge import Host
from tdvmcall.scan import deep
from tdvmcall.scan.analyze import analyze
from tdvmcall.scan.containers import open_input

DATA = Path(__file__).parent / "data" / "deep"

#: per calling function in guest.c: the call (leaf-table name), R11, and the inputs the source fixes
EXPECTED = {
    "guest_halt": ("Instruction.HLT", 12, {}),
    "guest_outb": ("Instruction.IO", 30, {"r13": 1}),  # guest_hypercall(30, 1, 1): a write
    "guest_rdmsr": ("Instruction.RDMSR", 31, {"r12": 0x1B}),
    "guest_mapgpa_inner": ("MapGPA", 0x10001, {}),
    "guest_fatal": ("ReportFatalError", 0x10003, {"r12": 0}),
    "guest_map_retry": ("MapGPA", 0x10001, {}),
}
#: hoisted.s (linked into the shared objects): guest_hypercall(32, 0x1b, 0) through a register loaded
#: from the GOT before a loop
HOISTED = ("Instruction.WRMSR", 32, {"r12": 0x1B})
MASK = 0xFC00

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed: the guests cannot be built")
needs_unicorn = pytest.mark.skipif(not deep.available(), reason="the unicorn package is not installed")


def build(tmp: Path, kind: str, opt: str) -> Path:
    flags = [f"-{opt}", "-fno-optimize-sibling-calls"]
    src = [str(DATA / "guest.c")]
    if kind == "exe":
        out, extra = tmp / f"guest-{opt}", [*src, str(DATA / "main.c")]
    elif kind == "kernel":  # linked at the kernel's addresses, no libc (unicorn cuts them to 52 bits)
        out = tmp / f"guest-kernel-{opt}"
        extra = ["-mcmodel=kernel", "-fno-pic", "-fno-pie", "-ffreestanding", "-fno-builtin", "-nostdlib", "-static"]
        extra += ["-Wl,-Ttext=0xffffffff81000000", "-Wl,-e,guest_halt", *src, str(DATA / "kernel_support.c")]
    elif kind == "obj":
        out, extra = tmp / f"guest-{opt}.o", ["-c", "-ffunction-sections", *src]
    else:  # a shared object: calls through the PLT, or (-fno-plt) through GOT slots
        noplt = ["-fno-plt"] if kind == "so-noplt" else []
        out, extra = tmp / f"guest-{kind}-{opt}.so", ["-fPIC", "-shared", *noplt, *src, str(DATA / "hoisted.s")]
    subprocess.run(["gcc", *flags, "-o", str(out), *extra], check=True, capture_output=True)
    return out


def scan(path: Path, use_deep: bool = True) -> list:
    (_name, found), *_ = list(open_input(path))
    image = analyze(str(path), found, Host(), {}, deep=use_deep)
    return [s for s in image.sites if s.is_vmcall]


def caller(site) -> str:
    """The outermost calling function of a resolved call (its ``via`` chain's last link)."""
    return site.via.split(" ← ")[-1].rsplit("+", 1)[0] if site.via else site.function


@needs_gcc
@needs_unicorn
@pytest.mark.parametrize("kind", ["exe", "obj", "so", "so-noplt", "kernel"])
@pytest.mark.parametrize("opt", ["O0", "O2"])
def test_every_call_of_the_guest_is_resolved_as_its_source_says(tmp_path: Path, kind: str, opt: str) -> None:
    sites = scan(build(tmp_path, kind, opt))
    got = {caller(s): s for s in sites}
    expected = {**EXPECTED, "guest_hoisted": HOISTED} if kind.startswith("so") else EXPECTED
    unpinned = {"guest_unknown", "guest_one_path", "guest_callee_pick"}
    assert set(got) <= {*expected, *unpinned}, "a call path the source does not have"
    for fn, (call, r11, inputs) in expected.items():
        assert fn in got, f"{fn}'s call not found ({sorted(got)})"
        s = got[fn]
        assert s.mask == MASK, fn
        assert s.regs["r10"].value == 0, fn
        assert s.regs["r11"].value == r11, (fn, s.regs["r11"].how)
        assert s.leaf is not None and s.leaf.name == call, fn
        for r, v in inputs.items():
            assert s.regs[r].value == v, (fn, r, s.regs[r].how)


@needs_gcc
@needs_unicorn
@pytest.mark.parametrize("kind", ["exe", "obj", "so", "so-noplt", "kernel"])
@pytest.mark.parametrize("opt", ["O0", "O2"])
def test_a_leaf_known_only_at_run_time_stays_unresolved(tmp_path: Path, kind: str, opt: str) -> None:
    """guest_unknown passes a global's run-time value as the leaf, guest_one_path picks 12 or 30 by
    comparing a global with 5 (a branch at -O0, a cmov at -O2; every filling sees "not 5"), and
    guest_callee_pick has a callee make that choice and return it: no run may pin any (precision)."""
    sites = scan(build(tmp_path, kind, opt))
    for fn in ("guest_unknown", "guest_one_path", "guest_callee_pick"):
        (s,) = [s for s in sites if caller(s) == fn]
        assert s.regs["r11"].value is None, (fn, s.regs["r11"].how)
        assert s.leaf is None and s.verdict("hardened") == "unresolved"


@needs_gcc
@needs_unicorn
def test_at_O0_the_calls_need_the_deep_engine(tmp_path: Path) -> None:
    """At -O0 the struct goes through stack slots the fast path cannot follow to the callers: without
    the engine no call of the executable is resolved; with it, all but guest_unknown's."""
    exe = build(tmp_path, "exe", "O0")
    fast = [s for s in scan(exe, use_deep=False) if s.leaf is not None]
    full = [s for s in scan(exe) if s.leaf is not None]
    assert fast == []
    assert {caller(s) for s in full} == set(EXPECTED)


@needs_gcc
@needs_unicorn
def test_relocatable_object_calls_are_found_through_relocations(tmp_path: Path) -> None:
    """In a .o every call is ``e8 00 00 00 00`` plus a relocation: the engine's loader applies them
    (R_X86_64_PLT32 to the other sections, and to memset, which it carries out)."""
    obj = build(tmp_path, "obj", "O0")
    image = deep.load_elf(obj.read_bytes())
    names = set(image.functions.values())
    assert {"guest_vmcall", "guest_hypercall", "guest_halt"} <= names
    start = next(a for a, n in image.functions.items() if n == "guest_hypercall")
    callers = image.callers(start)
    assert {image.function_of(c)[1] for c in callers} >= {"guest_halt", "guest_outb", "guest_rdmsr"}
    assert "memset" in set(image.stubs.values())


@needs_gcc
@needs_unicorn
def test_callers_through_got_slots_and_a_register_loaded_from_one(tmp_path: Path) -> None:
    """With -fno-plt every call to guest_hypercall is ``call [rip+slot]`` (its GOT slot, filled by a
    GLOB_DAT relocation); hoisted.s loads the slot into RBX once and calls RBX in a loop: both are
    callers, and the PLT entries of the PLT build are aliases of their targets, not callers."""
    image = deep.load_elf(build(tmp_path, "so-noplt", "O2").read_bytes())
    start = next(a for a, n in image.functions.items() if n == "guest_hypercall")
    names = {image.function_of(c)[1] for c in image.callers(start)}
    assert {"guest_halt", "guest_outb", "guest_hoisted", "guest_map_retry"} <= names
    plt = deep.load_elf(build(tmp_path, "so", "O2").read_bytes())
    start = next(a for a, n in plt.functions.items() if n == "guest_hypercall")
    assert {plt.function_of(c)[1] for c in plt.callers(start)} == {
        "guest_halt",
        "guest_outb",
        "guest_rdmsr",
        "guest_unknown",
        "guest_mapgpa_inner",
        "guest_map_retry",
        "guest_hoisted",
        "guest_one_path",
        "guest_callee_pick",
    }


# --- a Rust guest: registers by pointer to an assembly stub, bitflags-style masks, a retry loop -------
#: the crate name the guest is built with (rustc --crate-name): the first component of its paths
CRATE = "guest"
#: per function of guest.rs: the call, R11 and the mask its ``Regs::…union(…)`` chain builds (or its
#: ``asm!`` operands); a function without ``#[no_mangle]`` is named by its path (crate, module, name)
RUST_EXPECTED = {
    "rs_halt": ("Instruction.HLT", 12, 0x1C00),
    "rs_io_write": ("Instruction.IO", 30, 0x3C00),
    "rs_wrmsr": ("Instruction.WRMSR", 32, 0x1C00),
    "rs_map_gpa": ("MapGPA", 0x10001, 0x3C00),
    f"{CRATE}::tdx::tdvmcall_halt": ("Instruction.HLT", 12, 0x1C00),
    f"{CRATE}::tdx::tdvmcall_cpuid": ("Instruction.CPUID", 10, 0xFC00),
}
#: the functions of guest.rs whose TDCALL is inline (``asm!``): the site is in the function itself
RUST_INLINE = {f"{CRATE}::tdx::tdvmcall_cpuid"}
#: the assembly stub every other call goes through: the one symbol guest.rs's global_asm! declares
#: global (``.global rs_vmcall``); the site of a call made through it is in the stub
(RUST_STUB,) = re.findall(r'"\.global (\w+)"', (DATA / "guest.rs").read_text())
needs_rustc = pytest.mark.skipif(
    shutil.which("rustc") is None, reason="rustc is not installed: the Rust guest cannot be built"
)


def build_rust(tmp: Path, opt: str, mangling: str) -> Path:
    """guest.rs built at ``opt``; ``mangling`` ``legacy`` is rustc's default (``_ZN…17h<hash>E``), ``v0``
    the ``_R`` scheme (RFC 2603)."""
    exe = tmp / f"guest-rs-O{opt}-{mangling}"
    v0 = ["-C", "symbol-mangling-version=v0"] if mangling == "v0" else []
    cmd = ["rustc", "--crate-name", CRATE, "-C", f"opt-level={opt}", *v0, "-o", str(exe), str(DATA / "guest.rs")]
    subprocess.run(cmd, check=True, capture_output=True)
    return exe


def readable_caller(site) -> str:
    """The outermost calling function of a resolved call, by its readable (demangled) name."""
    return site.via_label.split(" ← ")[-1].rsplit("+", 1)[0] if site.via else site.name


def mangled_path(path: str) -> str:
    """The length-prefixed components both schemes write for a path (``guest::tdx::f`` ->
    ``5guest3tdx1f``): Itanium's <source-name> in legacy, <identifier> in v0."""
    return "".join(f"{len(p)}{p}" for p in path.split("::"))


@needs_rustc
@needs_unicorn
@pytest.mark.parametrize("mangling", ["legacy", "v0"])
@pytest.mark.parametrize("opt", ["0", "3"])
def test_rust_guest_calls_and_masks_are_its_source(tmp_path: Path, opt: str, mangling: str) -> None:
    """At opt-level 0 the mask is the return value of real ``union`` calls and the struct goes through
    stack slots (the deep engine runs them); at 3 the retry loop is unrolled into several call sites,
    each the same call.  WRMSR's mask leaves R13 (the value) out, as Oak's msr_write does: the
    hardened policy refuses it.  The functions of ``mod tdx`` (no ``#[no_mangle]``) are named by their
    source paths, demangled, whichever the mangling; the raw symbols are kept."""
    sites = scan(build_rust(tmp_path, opt, mangling))
    seen = set()
    prefix = "_ZN" if mangling == "legacy" else "_R"
    for s in sites:
        fn = readable_caller(s)
        assert fn in RUST_EXPECTED, fn
        call, r11, mask = RUST_EXPECTED[fn]
        assert (s.leaf.name if s.leaf else None, s.regs["r11"].value, s.mask) == (call, r11, mask), fn
        seen.add(fn)
        if "::" in fn:  # a mangled symbol: raw in the site, its path's components in it
            raw = s.function if fn in RUST_INLINE else s.via.split(" ← ")[-1].rsplit("+", 1)[0]
            assert raw.startswith(prefix) and mangled_path(fn) in raw, raw
            if mangling == "legacy":  # the hash: 'h' and 16 hex digits, the last component (dropped)
                assert re.fullmatch(r".*17h[0-9a-f]{16}E", raw), raw
        assert s.name == (fn if fn in RUST_INLINE else RUST_STUB), (s.name, fn)
    assert seen == set(RUST_EXPECTED)
    (wrmsr,) = {s.verdict("hardened") for s in sites if readable_caller(s) == "rs_wrmsr"}
    assert wrmsr == "hardened-refuses"


@needs_rustc
@needs_unicorn
def test_rust_guest_names_are_readable_in_every_output(tmp_path: Path) -> None:
    """The report, ``--verbose``, the HTML page and ``--to-catalog`` show the source paths of the
    mangled functions and no mangled symbol; ``--json`` keeps the raw ``symbol``/``via`` and adds
    ``symbol_readable``/``via_readable``."""
    exe = build_rust(tmp_path, "0", "legacy")
    halt, cpuid = (f"{CRATE}::tdx::tdvmcall_halt", f"{CRATE}::tdx::tdvmcall_cpuid")
    runner = CliRunner()
    for extra in ([], ["--verbose"]):
        res = runner.invoke(app, ["scan", str(exe), *extra], env={"COLUMNS": "400"})
        assert cpuid in res.stdout and "_ZN" not in res.stdout, res.stdout
    page = tmp_path / "scan.html"
    runner.invoke(app, ["scan", str(exe), "--html", str(page)])
    text = page.read_text()
    assert cpuid in text and "_ZN5guest" not in text  # the page names sites, not their callers
    catalog = tmp_path / "scan.csv"
    runner.invoke(app, ["scan", str(exe), "--to-catalog", str(catalog)])
    rows = list(csv.DictReader(catalog.open()))
    assert {r["function"].rsplit("+", 1)[0] for r in rows} >= {cpuid, "rs_vmcall"}
    assert any(halt in r["note"] for r in rows) and not any("_ZN" in v for r in rows for v in r.values())
    doc = json.loads(runner.invoke(app, ["scan", str(exe), "--json"]).stdout)
    [site] = [s for s in doc["sites"] if s["symbol_readable"].startswith(cpuid + "+")]
    assert site["symbol"].startswith("_ZN" + mangled_path(cpuid) + "17h")
    assert site["symbol"].rsplit("+", 1)[1] == site["symbol_readable"].rsplit("+", 1)[1]
    assert site["via"] is None and site["via_readable"] is None
    [site] = [s for s in doc["sites"] if s["via_readable"] and s["via_readable"].startswith(halt + "+")]
    assert site["via"].startswith("_ZN" + mangled_path(halt) + "17h") and site["symbol"] == site["symbol_readable"]

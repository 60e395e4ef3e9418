"""``tdvmcall export-c``: the generated C decides exactly what the model's hardened policy decides.

The C is built with the system compiler (the issue's flags) and loaded through ctypes; a small
harness, compiled with it, runs ``tdvmcall_check_regs()`` on all 65,536 GPR masks of one register
vector in a C loop.  The model's answer comes from the model: ``leaves.lookup()``,
``leaves.required_inputs()`` and ``leaves.possible_outputs()``, the three calls
``kvm/tdx.py`` ``handle_tdvmcall()`` makes for the hardened check (see ``model_masks`` for why
computing them once per class of masks is the policy), cross-checked on a sample of masks through
the full round trip (``guest.tdvmcall``) and on hypothesis-drawn values through ``handle_tdvmcall``.
Planted bugs (each condition row dropped in turn) are caught.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from interrupted_write import interrupted
from tdvmcall import __version__, scenario
from tdvmcall.abi.codes import EXIT_REASON_TDCALL
from tdvmcall.abi.control import check_control
from tdvmcall.abi.regs import GPR_NAMES, NR_GPRS, RAX, RCX, mask_of
from tdvmcall.cli import app
from tdvmcall.export_c import generate as G
from tdvmcall.guest import tdvmcall
from tdvmcall.kvm import leaves as L
from tdvmcall.kvm.platform import Platform
from tdvmcall.kvm.tdx import VERDICT_INTERNAL_ERROR, VERDICT_REFUSED, KvmVcpu, handle_tdvmcall
from tdvmcall.kvm.trees import TREE_NAMES
from tdvmcall.module import TdConfig, VcpuState, VmcallExit

NR_MASKS = 1 << NR_GPRS
R10_BIT = 1 << 10
FILLER = 0x5A5A5A5A00000000  # a guest register no case sets: FILLER | its index
#: the exit reason of a TDVMCALL exit after a bus lock was detected (bit 26; docs/abi.md §3)
BUS_LOCK_RAX = EXIT_REASON_TDCALL | 1 << 26
# the flags; the userspace build of the generated files must pass them unchanged
CFLAGS = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared"]

HARNESS = r"""
#include "tdvmcall_regs.h"

/* every GPR mask over one guest register vector, as the TDX module hands the registers to the
 * VMM: RAX the exit reason, RCX the exit qualification, an exposed GPR its value, the rest 0 */
void check_all_masks(const u64 base[16], int *ret, u64 *missing, u64 *unexposed)
{
	u64 regs[16];
	unsigned int m, i;

	for (m = 0; m < 65536; m++) {
		regs[0] = base[0];
		regs[1] = (base[1] & ~0xffffULL) | m;
		for (i = 2; i < 16; i++)
			regs[i] = (m >> i) & 1 ? base[i] : 0;
		ret[m] = tdvmcall_check_regs(regs, &missing[m], &unexposed[m]);
	}
}
"""


# --- building the C ---------------------------------------------------------------------------------
def compiler() -> str:
    """The C compiler: ``$CC`` if set, else the first of cc, gcc, clang on PATH; skip, saying which
    was looked for, when there is none."""
    cc = os.environ.get("CC")
    if cc:
        if shutil.which(cc.split()[0]) is None:
            pytest.skip(f"no C compiler: $CC is {cc!r}, which is not on PATH")
        return cc
    found = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if found is None:
        pytest.skip("no C compiler: $CC is unset and none of cc, gcc, clang is on PATH")
    return found


def test_a_missing_compiler_skips_and_says_why(monkeypatch):
    monkeypatch.setenv("CC", "no-such-cc-1234")
    with pytest.raises(pytest.skip.Exception, match=r"\$CC is 'no-such-cc-1234', which is not on PATH"):
        compiler()
    monkeypatch.delenv("CC")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(pytest.skip.Exception, match="none of cc, gcc, clang is on PATH"):
        compiler()


def build(directory: Path, files: dict[str, str], name: str = "lib.so") -> ctypes.CDLL:
    """Write the generated files and the harness, compile them with the issue's flags, load them."""
    directory.mkdir(parents=True, exist_ok=True)
    for fname, text in files.items():
        (directory / fname).write_text(text)
    (directory / "harness.c").write_text(HARNESS)
    so = directory / name
    cmd = [*compiler().split(), *CFLAGS, "-o", str(so), G.SOURCE, "harness.c"]
    proc = subprocess.run(cmd, cwd=directory, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr}"
    lib = ctypes.CDLL(str(so))
    u64p = np.ctypeslib.ndpointer(np.uint64, flags="C_CONTIGUOUS")
    i32p = np.ctypeslib.ndpointer(np.int32, flags="C_CONTIGUOUS")
    lib.check_all_masks.argtypes = [u64p, i32p, u64p, u64p]
    lib.check_all_masks.restype = None
    lib.tdvmcall_check_regs.argtypes = [u64p, ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint64)]
    lib.tdvmcall_check_regs.restype = ctypes.c_int
    return lib


@pytest.fixture(scope="module")
def files() -> dict[str, str]:
    return G.generate()


@pytest.fixture(scope="module")
def lib(tmp_path_factory, files) -> ctypes.CDLL:
    return build(tmp_path_factory.mktemp("export_c"), files)


def c_all_masks(lib: ctypes.CDLL, base: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ret = np.empty(NR_MASKS, np.int32)
    missing = np.empty(NR_MASKS, np.uint64)
    unexposed = np.empty(NR_MASKS, np.uint64)
    lib.check_all_masks(np.array(base, np.uint64), ret, missing, unexposed)
    return ret, missing, unexposed


def c_check(lib: ctypes.CDLL, vmm: list[int]) -> tuple[int, int, int]:
    missing, unexposed = ctypes.c_uint64(), ctypes.c_uint64()
    ret = lib.tdvmcall_check_regs(np.array(vmm, np.uint64), ctypes.byref(missing), ctypes.byref(unexposed))
    return ret, missing.value, unexposed.value


# --- what is compared: every call and case of the leaf table ----------------------------------------
def fallback_ghci() -> int:
    """An R11 no GHCI leaf takes (the model answers SUBFUNC_UNSUPPORTED for it)."""
    taken = {leaf.r11 for leaf in L.LEAVES if leaf.family == "ghci"}
    return next(n for n in (0x7777, 0x12345, 0xFFFF_FFFF) if n not in taken)


def targets() -> list[tuple[str, dict[str, int], dict]]:
    """(name, guest GPRs, platform) for every call and case of the leaf table, the unknown
    hypercall's case and an unknown GHCI leaf; every GPR no case sets holds a filler value.  A case
    whose call tests a register on fewer than 64 bits comes twice more: once with the bits above
    the width set, once with the tested value's bit flipped, so that truncation counts."""
    out = []
    for leaf in L.LEAVES + (L.UNKNOWN_HYPERCALL,):
        for case in leaf.cases:
            regs = {name: FILLER | i for i, name in enumerate(GPR_NAMES) if i not in (RAX, RCX)}
            regs |= leaf.selector_values() | dict(case.regs)
            out.append((f"{leaf.name}/{case.name}", regs, case.platform))
            narrow = {op.when.reg: op.when.width for op in leaf.inputs + leaf.outputs if op.when and op.when.width < 64}
            for reg, width in sorted(narrow.items()):
                high = ((1 << 64) - 1) ^ ((1 << width) - 1)
                out.append((f"{leaf.name}/{case.name}/{reg}-high", regs | {reg: regs[reg] | high}, case.platform))
                out.append((f"{leaf.name}/{case.name}/{reg}-flip", regs | {reg: regs[reg] ^ 1}, case.platform))
    regs = {name: FILLER | i for i, name in enumerate(GPR_NAMES) if i not in (RAX, RCX)}
    out.append(("unknown-ghci", regs | {"r10": 0, "r11": fallback_ghci()}, {}))
    # every vector again, as the exit of a TD in which a bus lock was detected
    out += [(f"{name}/bus-lock", regs | {"rax": BUS_LOCK_RAX}, platform) for name, regs, platform in out]
    return out


TARGETS = targets()


def base_vector(regs: dict[str, int], qualification_high: int = 0) -> list[int]:
    """The guest vector as the harness takes it: RAX = the exit reason the module reports (``rax``
    in ``regs`` if given, else TDCALL), RCX's bits above 15:0 (the mask is filled in per mask), the
    guest's GPRs."""
    base = [regs.get(name, 0) for name in GPR_NAMES]
    base[RAX], base[RCX] = regs.get("rax", EXIT_REASON_TDCALL), qualification_high
    return base


def vmm_for(base: list[int], mask: int) -> list[int]:
    """What the VMM receives for this mask (the harness's rule, checked against the module below)."""
    vmm = [base[i] if mask >> i & 1 else 0 for i in range(NR_GPRS)]
    vmm[RAX], vmm[RCX] = base[RAX], (base[RCX] & ~0xFFFF) | mask
    return vmm


def value_registers() -> list[int]:
    """The GPRs whose values the hardened check reads: R10 and R11 (``lookup``) and every register
    a condition of the leaf table tests."""
    regs = {10, 11}
    for leaf in L.LEAVES + (L.UNKNOWN_HYPERCALL,):
        for op in leaf.inputs + leaf.outputs:
            if op.when is not None:
                regs.add(GPR_NAMES.index(op.when.reg))
    return sorted(regs)


VALUE_REGS = value_registers()


def model_masks(base: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The model's hardened answer for every mask of one guest vector: (return code, missing,
    unexposed), as arrays over the 65,536 masks.

    Why computing per class equals the policy: in ``kvm/tdx.py`` ``handle_tdvmcall()`` the hardened
    check is ``leaf = lookup(vmm R10, vmm R11)`` (and the exit reason in RAX, constant here), ``missing = required_inputs(leaf, vals) - exposed``,
    ``unexposed = possible_outputs(leaf, vals) - exposed``, then internal_error if R10 is not
    exposed, else refused if either is non-empty, else the handler runs.  ``vals`` is the VMM's
    vector: a GPR's value if exposed, else 0.  ``lookup`` reads only R10 and R11 and the two lists
    depend on ``vals`` only through the registers conditions test (``_applies`` ->
    ``Cond.holds(regs[cond.reg])``), so two masks that expose the same registers among those
    (``VALUE_REGS``) get the same leaf and the same two lists; what remains per mask is the
    subtraction of the exposed set, done here on every mask.  The sample below runs the real round
    trip on masks of every target to check this argument against the model itself."""
    masks = np.arange(NR_MASKS, dtype=np.uint64)
    key = np.zeros(NR_MASKS, dtype=np.int64)
    for j, r in enumerate(VALUE_REGS):
        key |= ((masks >> np.uint64(r)) & np.uint64(1)).astype(np.int64) << j
    need_in = np.zeros(1 << len(VALUE_REGS), np.uint64)
    need_out = np.zeros(1 << len(VALUE_REGS), np.uint64)
    for k in range(1 << len(VALUE_REGS)):
        rep = sum(1 << r for j, r in enumerate(VALUE_REGS) if k >> j & 1)  # the class's representative
        vmm = vmm_for(base, rep)
        vals = {GPR_NAMES[i]: vmm[i] for i in range(NR_GPRS)}
        kvm = hardened(vmm)  # the model's own dispatch (R10, R11, and RAX where the model reads it)
        req, out = mask_of(L.required_inputs(kvm.leaf, vals)), mask_of(L.possible_outputs(kvm.leaf, vals))
        assert (mask_of(kvm.missing), mask_of(kvm.unexposed_outputs)) == (req & ~rep, out & ~rep)
        need_in[k], need_out[k] = req, out
    missing = need_in[key] & ~masks
    unexposed = need_out[key] & ~masks
    ret = np.where(
        masks & np.uint64(R10_BIT) == 0,
        G.RET_NO_STATUS,
        np.where((missing | unexposed) != 0, G.RET_REFUSE, G.RET_OK),
    ).astype(np.int32)
    return ret, missing, unexposed


def hardened(vmm: list[int], platform: Platform | None = None):
    """The model's hardened KVM on one TDVMCALL exit whose VMM registers are ``vmm``."""
    exit = VmcallExit(vmm[RCX] & 0xFFFF, list(vmm), [0] * 16, VcpuState())
    return handle_tdvmcall(KvmVcpu("hardened"), exit, platform or Platform())


def verdict_code(verdict: str) -> int:
    """The issue's mapping: refused -> REFUSE, internal_error -> NO_STATUS, otherwise OK."""
    return {VERDICT_REFUSED: G.RET_REFUSE, VERDICT_INTERNAL_ERROR: G.RET_NO_STATUS}.get(verdict, G.RET_OK)


def differences(lib: ctypes.CDLL) -> list[str]:
    """Every (target, mask) where the C and the model disagree, over all masks of all targets."""
    out = []
    for name, regs, _ in TARGETS:
        base = base_vector(regs)
        got = c_all_masks(lib, base)
        want = model_masks(base)
        bad = np.flatnonzero((got[0] != want[0]) | (got[1] != want[1]) | (got[2] != want[2]))
        out += [
            f"{name} mask {m:#06x}: C ({got[0][m]}, {int(got[1][m]):#x}, {int(got[2][m]):#x}) "
            f"model ({want[0][m]}, {int(want[1][m]):#x}, {int(want[2][m]):#x})"
            for m in bad[:3]
        ]
    return out


# --- the proof: every mask, every call and case -----------------------------------------------------
def test_the_targets_cover_every_call_and_case():
    names = {n for n, _, _ in TARGETS}
    cases = {f"{leaf.name}/{case.name}" for leaf in L.LEAVES + (L.UNKNOWN_HYPERCALL,) for case in leaf.cases}
    assert cases < names
    assert {"Instruction.IO/in", "Instruction.IO/out", "ReportFatalError/with-gpa", "unknown-ghci"} <= names
    # MMIO reads its direction on 32 bits (docs/abi.md §4): 1 | 1 << 32 must count as a write
    assert "#VE.RequestMMIO/write/r13-high" in names
    # R10, R11, and the registers the conditions test (R12: fatal-error flag and info leaf; R13: IO
    # and MMIO direction), by hand from the leaf table's rows
    assert {10, 11, 12, 13} <= set(VALUE_REGS)


def test_c_equals_the_model_on_every_mask_of_every_case(lib):
    assert differences(lib) == []


def test_the_model_side_is_the_model(lib):
    """The class argument of ``model_masks`` and the harness's register rule, checked against the
    model itself: for a sample of masks of every target, the full round trip (guest -> module ->
    hardened KVM) gives the same verdict, missing and unexposed lists, and the VMM registers the
    module hands KVM are the harness's; masks the module refuses go to ``handle_tdvmcall`` directly."""
    rng = random.Random(12)
    checked = 0
    for name, regs, platform in TARGETS:
        base = base_vector(regs)
        td = TdConfig("1.5", no_rbp_mod=False, bus_lock=base[RAX] != EXIT_REASON_TDCALL)
        want = model_masks(base)
        got = c_all_masks(lib, base)
        minimal = int(want[1][0] | want[2][0])  # everything the call needs at mask 0's values
        masks = {minimal, minimal | 0xFFEC, 0xFFEC, 0xFFCC} | {rng.randrange(NR_MASKS) for _ in range(24)}
        for mask in sorted(masks):
            host = scenario.parse({"guest": {}, "platform": platform}).platform
            vcpu = KvmVcpu("hardened")
            if check_control(mask, td.module, td.no_rbp_mod) is None:
                state = VcpuState()
                state.gprs = [regs.get(n, 0) for n in GPR_NAMES]
                state.gprs[RAX], state.gprs[RCX] = 0, mask
                rt = tdvmcall(td, state, vcpu, host)
                assert rt.module is not None and rt.module.exit is not None and rt.kvm is not None
                assert rt.module.exit.vmm == vmm_for(base, mask), (name, hex(mask))
                k = rt.kvm
            else:  # the module would refuse it; the C and the policy still answer
                k = hardened(vmm_for(base, mask), host)
            model = (verdict_code(k.verdict), mask_of(k.missing), mask_of(k.unexposed_outputs))
            assert model == (int(want[0][mask]), int(want[1][mask]), int(want[2][mask])), (name, hex(mask))
            assert model == (int(got[0][mask]), int(got[1][mask]), int(got[2][mask])), (name, hex(mask))
            checked += 1
    assert checked > 28 * len(TARGETS) // 2


# --- hypothesis: register values the cases do not hold -----------------------------------------------
def interesting_values() -> list[int]:
    """Values near every condition of the table: each compared value, each tested bit, each with a
    bit above the condition's width set, and one off."""
    out = {0, 1, 2, (1 << 64) - 1}
    for leaf in L.LEAVES:
        for op in leaf.inputs + leaf.outputs:
            c = op.when
            if c is None:
                continue
            vals = list(c.value) if isinstance(c.value, tuple) else [c.value]
            for v in [1 << v for v in vals] if c.op == "bit" else vals:
                out |= {v, v ^ 1, v | 1 << 63}
                if c.width < 64:
                    out |= {v | 1 << c.width, v | 0xFFFF_FFFF << c.width & ((1 << 64) - 1)}
    return sorted(out)


U64S = st.integers(0, (1 << 64) - 1)
CALLS = L.LEAVES + (L.UNKNOWN_HYPERCALL,)


@st.composite
def guest_vectors(draw, leaf: L.Leaf) -> dict[str, int]:
    """A call of the table (its selectors, rarely any R10/R11), values near its conditions or any
    value in the registers it tests, any value elsewhere."""
    regs = {name: draw(U64S) for name in GPR_NAMES}
    if draw(st.integers(0, 9)):
        regs |= leaf.selector_values()
        if leaf is L.UNKNOWN_HYPERCALL:
            regs["r10"] = draw(st.integers(1, (1 << 64) - 1))
    elif draw(st.booleans()):
        regs["r10"] = 0
    near = interesting_values()
    for op in leaf.inputs + leaf.outputs:
        if op.when is not None and draw(st.integers(0, 3)):
            regs[op.when.reg] = draw(st.sampled_from(near))
    return regs


@pytest.mark.parametrize("leaf", CALLS, ids=[leaf.name for leaf in CALLS])
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.data(),
    mask=st.integers(0, NR_MASKS - 1),
    high=st.one_of(st.just(0), U64S),
    rax=st.one_of(st.sampled_from([EXIT_REASON_TDCALL, BUS_LOCK_RAX]), U64S.map(lambda v: v & ~0xFFFF | 77), U64S),
)
def test_c_equals_the_model_on_drawn_values(lib, leaf, data, mask, high, rax):
    """Drawn register values, every mask: the C against the model's answer per mask, and on the
    drawn mask against ``handle_tdvmcall`` itself (the hardened policy, handler included)."""
    regs = data.draw(guest_vectors(leaf)) | {"rax": rax}
    base = base_vector(regs, high & ~0xFFFF)
    got = c_all_masks(lib, base)
    want = model_masks(base)
    bad = np.flatnonzero((got[0] != want[0]) | (got[1] != want[1]) | (got[2] != want[2]))
    assert bad.size == 0, (
        f"mask {int(bad[0]):#06x}: C {[int(a[bad[0]]) for a in got]} model {[int(a[bad[0]]) for a in want]}"
    )
    vmm = vmm_for(base, mask)
    k = hardened(vmm)
    model = (verdict_code(k.verdict), mask_of(k.missing), mask_of(k.unexposed_outputs))
    assert c_check(lib, vmm) == model


# --- the conformance vectors, replayed against the C as docs/vectors.md says ----------------------------
def test_the_hardened_vectors_replay_against_the_c(lib):
    """Every hardened vector that reaches KVM: ``expected.vmm`` as ``regs``; the answer must be the
    vector's verdict, ``missing`` and ``unexposed_outputs`` (the recipe of docs/vectors.md)."""
    from tdvmcall.sweep.vectors import specs, vector_of

    replayed = 0
    for spec in specs():
        if spec.policy != "hardened":
            continue
        v = vector_of(spec)
        if v["verdict"] == "module-refused":
            continue
        k = v["expected"]["kvm"]
        regs = [int(v["expected"]["vmm"][name], 16) for name in GPR_NAMES]
        want = (verdict_code(k["verdict"]), mask_of(k["missing"]), mask_of(k["unexposed_outputs"]))
        assert c_check(lib, regs) == want, v["id"]
        replayed += 1
    assert replayed > 200


# --- hand-derived answers (docs/abi.md §4 register roles; contract values from the issue) -----------------
def vec(mask: int, **regs: int) -> list[int]:
    v = [0] * NR_GPRS
    v[RAX], v[RCX] = EXIT_REASON_TDCALL, mask
    for name, val in regs.items():
        v[GPR_NAMES.index(name)] = val
    return v


def test_hand_derived_answers(lib):
    r10, r11, r12, r13, r14, r15 = (1 << i for i in range(10, 16))
    # CPUID leaf 1: R12..R15 written (EAX..EDX), so R15 unexposed refuses, with R15 as the output
    assert c_check(lib, vec(0x7C00, r11=10, r12=1)) == (1, 0, r15)
    assert c_check(lib, vec(0xFC00, r11=10, r12=1)) == (0, 0, 0)
    # IO: out needs R15 (data); in writes R11 (data read); minimal 0x7C00 for IN
    assert c_check(lib, vec(0x7C00, r11=30, r12=1, r13=1, r14=0x3F8)) == (1, r15, 0)
    assert c_check(lib, vec(0x7C00, r11=30, r12=1, r13=0, r14=0x3FD)) == (0, 0, 0)
    # R11 unexposed: it is the GHCI selector (missing) and the IN data (unexposed output)
    assert c_check(lib, vec(0x7400, r11=30, r12=1, r13=0, r14=0x3FD)) == (1, r11, r11)
    # MMIO direction is read on its low 32 bits: 1 << 32 | 1 is a write (needs R15)
    assert c_check(lib, vec(0x7C00, r11=48, r12=4, r13=1 << 32 | 1, r14=1 << 51)) == (1, r15, 0)
    # ReportFatalError: R13 only with bit 63 of R12; no output
    assert c_check(lib, vec(0x1C00, r11=0x10003, r12=0x10000)) == (0, 0, 0)
    assert c_check(lib, vec(0x1C00, r11=0x10003, r12=1 << 63)) == (1, r13, 0)
    # GetTdVmCallInfo: leaves 0 and 1 write R11..R14; another leaf only R10
    assert c_check(lib, vec(0x1C00, r11=0x10000, r12=1)) == (1, 0, r13 | r14)
    assert c_check(lib, vec(0x1C00, r11=0x10000, r12=2)) == (0, 0, 0)
    # R10 unexposed: no status can reach the guest; the masks still say what is missing (R10, the
    # selector) and unexposed (R10, where SUBFUNC_UNSUPPORTED would go)
    assert c_check(lib, vec(0x0800, r11=0x10005)) == (2, r10, r10)
    # a hypercall needs only R10 (and its arguments); an unknown one R10 alone
    assert c_check(lib, vec(0x0400, r10=0x77)) == (0, 0, 0)
    assert c_check(lib, vec(0x0400, r10=5)) == (1, r12, 0)
    # unknown GHCI leaf: R10 and R11 (SUBFUNC_UNSUPPORTED into R10)
    assert c_check(lib, vec(0x0400, r11=0x7777)) == (1, r11, 0)
    # only bits 15:0 of the qualification select: XMM selects and the VM index do not expose GPRs
    assert c_check(lib, vec(0xFFFF_0000 | 0x0C00, r11=0x10005)) == (0, 0, 0)
    assert c_check(lib, vec(0x3_0000_0000 | 0x0800, r11=0x10005)) == (2, r10, r10)


def test_hand_derived_bus_lock_answers(lib):
    """Bit 26 of the exit reason (a bus lock was detected, docs/abi.md §3) keeps KVM from re-labelling the
    exit, and handle_tdvmcall() dispatches it on R11 alone (only the GHCI calls 0x10000..0x10004)."""
    r12, r13 = 1 << 12, 1 << 13
    # CPUID's leaf is not one handle_tdvmcall() knows: SUBFUNC_UNSUPPORTED, R10 and R11 suffice
    assert c_check(lib, vec(0x0C00, rax=BUS_LOCK_RAX, r11=10, r12=1)) == (0, 0, 0)
    assert c_check(lib, vec(0x0C00, r11=10, r12=1)) == (1, r12 | r13, r12 | r13 | 1 << 14 | 1 << 15)
    # R10 = 5 (KICK_CPU) is not looked at: R11 = MapGPA runs MapGPA (R12, R13 in; R10, R11 out)
    assert c_check(lib, vec(0x0C00, rax=BUS_LOCK_RAX, r10=5, r11=0x10001)) == (1, r12 | r13, 0)
    assert c_check(lib, vec(0x0400, r10=5, r11=0x10001)) == (1, r12, 0)


# --- planted bugs ---------------------------------------------------------------------------------
COND_ROW = re.compile(r"\t\{\t/\* (?P<what>[^\n]*) \*/\n(?:\t\t[^\n]*\n)*?\t\},\n")


def cond_rows(source: str) -> list[re.Match]:
    """The condition rows of the generated tables (the ``tdvmcall_conds_*`` arrays)."""
    rows = []
    for table in re.finditer(r"static const struct tdvmcall_cond \w+\[\] = \{\n(.*?)\n\};", source, re.S):
        rows += [m for m in COND_ROW.finditer(source, table.start(1), table.end(1) + 1)]
    return rows


def equivalent(table: G.Table, what: str) -> bool:
    """A condition row whose only register is R11 of a GHCI call cannot change the answer: with R11
    exposed the bit is never missing nor unexposed, and with R11 unexposed the VMM reads R11 = 0,
    which selects another call (no GHCI leaf is 0), so the row is never evaluated.  Dropping it
    plants no bug (an equivalent mutant)."""
    for row in table.ghci:
        for c in row.conds:
            if what == f"{row.name}: {c.text}" and c.inputs | c.outputs == 1 << 11:
                return True
    return False


def test_every_dropped_condition_is_caught(tmp_path, files):
    table = G.build_table()
    rows = cond_rows(files[G.SOURCE])
    # the table's conditions, by hand: GetTdVmCallInfo's leaf, ReportFatalError's GPA flag, IO and
    # MMIO direction (in and out each)
    assert len(rows) == sum(len(r.conds) for r in table.rows) >= 6
    assert any("ReportFatalError: R12 bit 63" in m["what"] for m in rows)
    # IO IN and MMIO read only add R11 (the data read), which is R11 the selector too
    assert equivalent(table, "Instruction.IO: direction = 0 (in)")
    assert not equivalent(table, "Instruction.IO: direction = 1 (out)")
    caught = []
    for i, m in enumerate(rows):
        src = files[G.SOURCE]
        planted = {**files, G.SOURCE: src[: m.start()] + src[m.end() :]}
        bad = build(tmp_path / f"mutant{i}", planted)
        if equivalent(table, m["what"]):
            assert differences(bad) == [], f"dropping {m['what']!r} should change nothing"
        else:
            assert differences(bad), f"dropping {m['what']!r} went unnoticed"
            caught.append(m["what"])
    assert "ReportFatalError: R12 bit 63 set (GPA in R13 valid)" in caught and len(caught) >= 4


# --- the generator refuses what it cannot express ----------------------------------------------------
FATAL = L.by_name("ReportFatalError")


def with_cond(cond: L.Cond) -> L.Leaf:
    r13 = dataclasses.replace(FATAL.inputs[1], when=cond)
    return dataclasses.replace(FATAL, inputs=(FATAL.inputs[0], r13))


@dataclasses.dataclass(frozen=True)
class NegatedCond(L.Cond):
    negate: bool = False


@pytest.mark.parametrize(
    ("cond", "message"),
    [
        (L.Cond("r12", "lt", 5, "R12 < 5"), "condition op 'lt'"),
        (L.Cond("r12", "eq", 1, "w0", width=0), "width 0"),
        (L.Cond("r12", "eq", 1, "w65", width=65), "width 65"),
        (L.Cond("r12", "bit", 32, "bit 32 of 32", width=32), "bit 32 is outside"),
        (L.Cond("r12", "eq", 1 << 32, "too wide", width=32), "does not fit"),
        (L.Cond("r12", "in", 3, "in needs a tuple"), "non-empty tuple"),
        (L.Cond("r12", "in", (), "empty"), "non-empty tuple"),
        (L.Cond("rip", "eq", 0, "not a GPR"), "not a GPR"),
        (NegatedCond("r12", "eq", 0, "negated", negate=True), "NegatedCond.negate"),
    ],
)
def test_the_generator_raises_for_what_it_cannot_express(cond, message):
    with pytest.raises(G.GeneratorError, match=re.escape(message)):
        G.leaf_row(with_cond(cond), 0x10003)


def test_the_generator_raises_for_an_unknown_family_and_a_row_lookup_does_not_select():
    with pytest.raises(G.GeneratorError, match="family 'hyperv'"):
        G.leaf_row(dataclasses.replace(FATAL, family="hyperv"), 1)
    stray = dataclasses.replace(FATAL, name="Stray", r11=0x999)
    with pytest.raises(G.GeneratorError, match="lookup\\(\\) does not select"):
        G.build_table((*L.LEAVES, stray))
    # a new field with its default is fine: the generator reads its meaning as absent
    G.leaf_row(with_cond(NegatedCond("r12", "bit", 63, "flag")), 0x10003)


# --- the files: contract, style, determinism, both builds ---------------------------------------------
def test_the_files_are_deterministic_and_say_what_made_them(files):
    assert G.generate() == files
    h, c = files[G.HEADER], files[G.SOURCE]
    assert h.startswith("/* SPDX-License-Identifier: GPL-2.0-only OR MIT */\n")
    assert c.startswith("// SPDX-License-Identifier: GPL-2.0-only OR MIT\n")
    for text in (h, c):
        assert f"tdvmcall {__version__}" in text and "tdvmcall export-c" in text
    # the contract of the issue, verbatim where it is code
    assert "int tdvmcall_check_regs(const u64 regs[16], u64 *missing, u64 *unexposed);" in h
    for name, value in (("OK", 0), ("REFUSE", 1), ("NO_STATUS", 2)):
        assert re.search(rf"^#define TDVMCALL_REGS_{name}\t{value} ", h, re.M)


def test_the_files_say_how_to_make_them_again():
    """Both files name the tree they were generated for and the command that writes them again, so
    a copy in a kernel tree can be regenerated or --check'ed with the same tree."""
    for tree in TREE_NAMES:
        for text in G.generate(tree=tree).values():
            assert f"`tdvmcall export-c DIR --tree {tree}` again" in text
            assert f"For the model's KVM tree {tree}." in text


def test_kernel_style(files):
    for text in files.values():
        body = [line for line in text.splitlines() if line and not line.startswith(("#", "/*", " *", "//"))]
        # indentation by tabs, lines within 100 columns (tabs count 8)
        assert not [line for line in body if line.startswith(" ")]
        assert not [line for line in text.splitlines() if len(line.expandtabs(8)) > 100]
        assert not re.search(r"\b(float|double|malloc|kmalloc|printf|memset|memcpy)\b", text)
    c = files[G.SOURCE]
    includes = re.findall(r"#include [<\"]([^>\"]+)", c)
    # no libc in the code; the kernel's ARRAY_SIZE (with its __must_be_array check) in the kernel
    assert includes == ["linux/array_size.h", "linux/bits.h", G.HEADER]
    assert re.findall(r"#include <([^>]+)>", files[G.HEADER]) == ["linux/types.h"]
    # checkpatch --strict prefers the kernel's types: no uint*_t, even in the userspace branch
    assert not re.search(r"\bu?int\d+_t\b", files[G.HEADER] + c)
    tables = re.findall(r"^(.*)\[\] = \{$", c, re.M)
    assert tables and all(t.startswith("static const struct") for t in tables)
    assert "/**\n * tdvmcall_check_regs() - " in files[G.HEADER]  # kernel-doc


def test_the_kernel_branch_compiles(tmp_path, files):
    """With __KERNEL__ the files take u16/u32/u64 from <linux/types.h>, BIT_ULL/GENMASK_ULL from
    <linux/bits.h> and ARRAY_SIZE from <linux/array_size.h> (stand-ins here, shaped like the
    kernel's; the generated files define none of them in this branch, or the stand-in's marker
    macro would clash)."""
    cc = compiler()
    inc = tmp_path / "include" / "linux"
    inc.mkdir(parents=True)
    (inc / "types.h").write_text(
        "typedef unsigned short u16;\ntypedef unsigned int u32;\ntypedef unsigned long long u64;\n"
    )
    (inc / "bits.h").write_text(
        "#define BIT_ULL(nr) (1ULL << (nr))\n#define GENMASK_ULL(h, l) ((~0ULL >> (63 - (h))) & (~0ULL << (l)))\n"
    )
    (inc / "array_size.h").write_text("#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]) + KERNEL_ARRAY_SIZE)\n")
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    cmd = [*cc.split(), "-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-Wmissing-prototypes"]
    cmd += ["-Wstrict-prototypes", "-Wdeclaration-after-statement", "-ffreestanding", "-nostdinc"]
    cmd += ["-Wpadded", "-Wswitch-default", "-DKERNEL_ARRAY_SIZE=0"]  # W=3's two that once fired
    cmd += ["-D__KERNEL__", "-I", str(tmp_path / "include"), "-c", "-o", "k.o", G.SOURCE]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# --- the command -----------------------------------------------------------------------------------
def test_the_command_writes_checks_and_refuses_a_bad_directory(tmp_path, files, monkeypatch):
    runner = CliRunner()
    out = tmp_path / "kvm"
    r = runner.invoke(app, ["export-c", str(out)])
    assert r.exit_code == 0, r.output
    assert {p.name: p.read_text() for p in out.iterdir()} == files
    r = runner.invoke(app, ["export-c", str(out), "--check", "--json"])
    assert r.exit_code == 0 and '"up_to_date": true' in r.output
    (out / G.SOURCE).write_text(files[G.SOURCE].replace("0x7c00", "0x3c00", 1))
    r = runner.invoke(app, ["export-c", str(out), "--check"])
    assert r.exit_code == 1 and "DIFFERS" in r.output
    r = runner.invoke(app, ["export-c", str(out / G.HEADER)])
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1] == f"tdvmcall: error: {out / G.HEADER}: exists and is not a directory"
    # an empty DIR is refused, not taken as the current directory (Path("") is ".")
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    r = runner.invoke(app, ["export-c", ""])
    assert r.exit_code == 2 and r.output.strip().splitlines() == [
        "tdvmcall: error: DIR: empty; give the directory to write into (. for this one)"
    ]
    assert list(Path.cwd().iterdir()) == []


@pytest.mark.parametrize("cut", [1, 2], ids=["header", "source"])
def test_an_interrupted_export_leaves_the_old_pair_and_nothing_partial(tmp_path, files, cut):
    """Ctrl-C in the middle of writing the header (the first write) or the C file (the second): DIR
    holds the old pair, whole, never a new header beside an old C file nor half of one (issue 18: no
    partial output under a final name); a neighbour file is untouched and no temporary file stays.
    The write was cut in half under the final name."""
    out = tmp_path / "vmx"
    out.mkdir()
    old = {name: f"/* the old {name} */\n" for name in files}
    for name, text in old.items():
        (out / name).write_text(text)
    (out / "tdx.c").write_text("/* KVM's own */\n")
    interrupted(cut, "export-c", str(out))
    assert {p.name: p.read_text() for p in out.iterdir()} == {**old, "tdx.c": "/* KVM's own */\n"}


def test_check_says_which_file_is_missing_and_shows_the_diff(tmp_path, files):
    """Issue 18 item 14: --check on a missing or empty DIR names each missing file (not "DIFFERS"),
    and a copy that differs is shown as a unified diff, yours then the model's."""
    runner = CliRunner()
    for d in (tmp_path / "absent", tmp_path / "empty"):
        if d.name == "empty":
            d.mkdir()
        r = runner.invoke(app, ["export-c", str(d), "--check"])
        assert r.exit_code == 1
        for name, text in files.items():
            assert f"checked {d / name}: MISSING (the model writes {len(text.encode()):,} bytes)" in r.output
        assert "DIFFERS" not in r.output
    out = tmp_path / "kvm"
    assert runner.invoke(app, ["export-c", str(out)]).exit_code == 0
    (out / G.HEADER).unlink()
    changed = files[G.SOURCE].replace("0x7c00", "0x3c00", 1)
    (out / G.SOURCE).write_text(changed)
    r = runner.invoke(app, ["export-c", str(out), "--check"])
    assert r.exit_code == 1
    assert f"checked {out / G.HEADER}: MISSING" in r.output
    assert f"checked {out / G.SOURCE}: DIFFERS from the model" in r.output
    removed = [ln for ln in r.output.splitlines() if ln.startswith("-") and not ln.startswith("---")]
    added = [ln for ln in r.output.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    model_line = next(ln for ln in files[G.SOURCE].splitlines() if "0x7c00" in ln)
    old_line = model_line.replace("0x7c00", "0x3c00", 1)
    assert removed == ["-" + old_line] and added == ["+" + model_line]
    r = runner.invoke(app, ["export-c", str(out), "--check", "--json"])
    entries = {Path(e["file"]).name: e for e in json.loads(r.output)["files"]}
    assert entries[G.HEADER]["state"] == "missing" and "diff" not in entries[G.HEADER]
    assert entries[G.SOURCE]["state"] == "differs" and "+" + model_line in entries[G.SOURCE]["diff"]

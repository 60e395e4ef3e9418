"""The fuzz campaign: its power is measured on planted bugs, its invariants are stated as hypothesis
properties, and a short clean campaign runs on every change (CI).

Expected values are derived by hand from docs/abi.md (the derivation is in the comments), never read
back from the program.
"""

from __future__ import annotations

import importlib
import itertools
import json
import shutil
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import tdvmcall
from tdvmcall.fuzz import campaign as F
from tdvmcall.guest import tdvmcall as round_trip
from tdvmcall.kvm.tdx import KvmVcpu
from tdvmcall.module import TdConfig, tdg_vp_vmcall, tdh_vp_enter
from tdvmcall.scenario import parse

U64 = (1 << 64) - 1
FAST = settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))

# docs/abi.md §3: the module refuses a bad RAX with TDX_OPERAND_INVALID (0xC000010000000000, operand id
# RAX = 0) and a bad control with the same status plus operand id RCX = 1.
BAD_RAX = 0xC000010000000000
BAD_RCX = 0xC000010000000001
# docs/abi.md §2: after a TD exit today's KVM keeps avail only for 0x0180FFEF; all 25 registers (bits
# 0..24 = 0x1FFFFFF) are dirty from vCPU creation and dirty is never reset, so the invalid pair
# (avail 0, dirty 1) is 0x1FFFFFF & ~0x0180FFEF = RSP (bit 4) + RIP..SEGMENTS (bits 16..22).
LEGACY_INVALID_PAIRS = 1 << 4 | 0b1111111 << 16  # 0x007F0010


# --- planted bugs: copies of the model with one known bug each -------------------------------------
_copies = itertools.count()


def planted_copy(root: Path, mutations: list[tuple[str, str, str]]):
    """Copy the tdvmcall package under a new name, apply textual mutations (each must match exactly
    once, so a change in the model fails loudly here instead of planting nothing) and import it."""
    name = f"tdvmcall_planted_{next(_copies)}"
    dst = root / name
    shutil.copytree(Path(tdvmcall.__file__).parent, dst, ignore=shutil.ignore_patterns("__pycache__"))
    for rel, old, new in mutations:
        f = dst / rel
        text = f.read_text()
        assert text.count(old) == 1, f"{rel}: the text to mutate is gone or ambiguous: {old!r}"
        f.write_text(text.replace(old, new))
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module(f"{name}.fuzz.campaign")
    finally:
        sys.path.remove(str(root))


# Each bug: the mutations, the budget (examples, seed 0) and the properties allowed to catch it.
# The copies also lose the model's own self-check that would catch the bug first (the handler/table
# check, the dirty-unexposed check), so that what finds the bug is the campaign's properties.
PLANTED = {
    # HLT (leaf table: inputs R12 only) also reads R13; the strict hardened cache meets an
    # unavailable register whenever R13 is not exposed (its minimal mask R10 R11 R12 does not)
    "handler reads an undeclared register": (
        [
            ("kvm/handlers.py", 'p.halt(io.read("r12") != 0)', 'p.halt((io.read("r12") | io.read("r13")) != 0)'),
            ("kvm/tdx.py", "if undeclared := [r for r in reads if r not in declared_in]:", "if undeclared := []:"),
        ],
        600,
        {"cache"},
    ),
    # the module hands the VMM the guest's RBX even when RBX is not selected
    "module does not zero an unselected register": (
        [
            (
                "module.py",
                "        if ctl.gpr_select >> i & 1:\n            vmm[i] = vcpu.gprs[i]",
                "        if ctl.gpr_select >> i & 1 or i == 3:\n            vmm[i] = vcpu.gprs[i]",
            )
        ],
        50,
        {"confidentiality"},
    ),
    # the resume copies the VMM's R9 into the guest even when R9 is not selected
    "resume copies back an unselected register": (
        [
            (
                "module.py",
                "        if ctl.gpr_select >> i & 1:\n            guest.gprs[i] = u64(vmm[i]",
                "        if ctl.gpr_select >> i & 1 or i == 9:\n            guest.gprs[i] = u64(vmm[i]",
            )
        ],
        50,
        {"integrity"},
    ),
    # the hardened check forgets the last output of each leaf (e.g. CPUID's R15, GetTdVmCallInfo's R14)
    "hardened check forgets an output": (
        [
            (
                "kvm/tdx.py",
                "unexposed_outputs = [r for r in L.possible_outputs(leaf, vals) if r not in exposed]",
                "unexposed_outputs = [r for r in L.possible_outputs(leaf, vals)[:-1] if r not in exposed]",
            ),
            (
                "kvm/tdx.py",
                "                if GPR_NAMES[i] not in exposed:\n                    raise ModelBug",
                "                if False:\n                    raise ModelBug",
            ),
        ],
        1200,  # hypothesis draws constants from the source, so a change anywhere moves this (seed 0: ~1000)
        {"completeness"},
    ),
}


@pytest.mark.parametrize("bug", list(PLANTED))
def test_campaign_finds_planted_bug_within_budget(bug, tmp_path):
    mutations, budget, props = PLANTED[bug]
    fz = planted_copy(tmp_path, mutations)
    result = fz.campaign(examples=budget, seed=0, policy="both")
    assert result.failure is not None, f"{bug}: not found in {budget} examples"
    v = result.failure.violation
    assert v.prop in props, f"{bug}: found as {v.prop}: {v.detail}"
    # the counterexample is a scenario the real contract accepts, and it shows the bug on the copy
    sc = fz.counterexample(result.failure.example, v)
    parse(json.loads(json.dumps(sc)))
    if v.policy is not None:  # arbitrary VMM writes (policy None) are not part of a scenario
        assert fz.replays(sc, v.prop)


def test_cli_writes_a_replayable_counterexample(tmp_path):
    fz = planted_copy(tmp_path, PLANTED["module does not zero an unselected register"][0])
    cli = importlib.import_module(fz.__name__.replace(".fuzz.campaign", ".cli"))
    out = tmp_path / "ce.json"
    r = CliRunner().invoke(cli.app, ["fuzz", "--examples", "50", "--seed", "0", "--json", "--out", str(out)])
    assert r.exit_code == 1, r.output
    report = json.loads(r.stdout)
    assert report["clean"] is False and report["violation"]["property"] == "confidentiality"
    assert report["violation"]["scenario_replays"] is True
    sc = parse(json.loads(out.read_text()))  # the real `tdvmcall run` reads it
    assert sc.td.module in ("1.0", "1.5")


# --- the CI campaign: short, deterministic, clean ------------------------------------------------------
def test_short_campaign_is_clean_on_both_policies():
    result = F.campaign(examples=150, seed=0, policy="both")
    assert result.failure is None, result.failure and result.failure.violation
    assert result.stats.executions >= 150
    policies = {p for p, _, _ in result.stats.coverage}
    assert policies == {"legacy", "hardened"}


def test_cli_json_figures(tmp_path):
    from tdvmcall.cli import app

    r = CliRunner().invoke(
        app,
        [
            "fuzz",
            "--examples",
            "30",
            "--seed",
            "1",
            "--policy",
            "hardened",
            "--json",
            "--out",
            str(tmp_path / "x.json"),
        ],
    )
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["clean"] and report["policies"] == ["hardened"] and report["seed"] == 1
    assert report["executions"] > 0 and report["executions_per_second"] > 0
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize(
    "args", [["--seconds", "1", "--examples", "5"], ["--policy", "paranoid"], ["--examples", "0"], ["--seconds", "-1"]]
)
def test_cli_bad_input_exits_2(args):
    from tdvmcall.cli import app

    r = CliRunner().invoke(app, ["fuzz", *args])
    assert r.exit_code == 2


# --- the invariants as hypothesis properties (sharing the campaign's strategies) -------------------------
@st.composite
def td_and_call(draw):
    module = draw(st.sampled_from(("1.0", "1.5")))
    no_rbp_mod = draw(st.booleans())
    call = draw(F.calls(module, no_rbp_mod))
    sc = parse({"td": {"module": module, "no_rbp_mod": no_rbp_mod}, "guest": call["guest"]})
    return sc.td, sc.guest, call["host"]


def selected(rcx: int, i: int) -> bool:
    return bool(rcx >> i & 1)


@FAST
@given(td_and_call())
def test_module_gate(case):
    """ABI §3, §8 (tdx-module 1.5.01 td_call()): RAX with bits 63:24 set, a version on a leaf other
    than TDG.VM.RD (7), or a leaf outside 0..12, 18, 20, 22..27 -> 0xC000010000000000; TDG.VM.RD
    version 2..255 -> the same, with RDX = all ones and R8 = 0 (tdg_vm_rd_wr.c); another known leaf
    is not modelled (the guest unchanged); for leaf 0, RCX with bit 0, 1 or 4 (or 5 on a 1.5 TD with
    NO_RBP_MOD) or any of bits 63:32 -> 0xC000010000000001; RIP + 4, nothing else changes."""
    td, before, _ = case
    if not before.long_mode:
        return
    rax, rcx = before.gprs[0], before.gprs[1]
    leaf, version = rax & 0xFFFF, rax >> 16 & 0xFF
    known = leaf in {*range(13), 18, 20, *range(22, 28)}
    forbidden = 0x13 | (0x20 if td.module == "1.5" and td.no_rbp_mod else 0)
    res = tdg_vp_vmcall(td, before.copy())
    if rax >> 24 or (version and leaf != 7) or not known or (leaf == 7 and version > 1):
        want = [BAD_RAX] + before.gprs[1:]
        if leaf == 7 and not rax >> 24:
            want[2], want[8] = U64, 0
        assert not res.exited and res.status == BAD_RAX
        assert res.guest.gprs == want and res.guest.rip == (before.rip + 4) & U64
        return
    if leaf != 0:
        assert not res.exited and res.status is None and res.not_modelled.startswith(f"TDCALL leaf {leaf}")
        assert res.guest.gprs == before.gprs and res.guest.rip == before.rip
        return
    want = BAD_RCX if rcx & forbidden or rcx >> 32 else None
    if want is None:
        assert res.exited
        return
    assert not res.exited and res.status == want
    assert res.guest.gprs == [want] + before.gprs[1:] and res.guest.rip == (before.rip + 4) & U64


@FAST
@given(td_and_call())
def test_vmm_sees_zero_for_unexposed_and_resume_keeps_them(case):
    """ABI §3: the VMM gets guest GPR i (2..15) iff bit i is selected, else 0; on resume the guest
    gets the VMM's value iff selected, else keeps its own, whatever the VMM wrote."""
    td, before, host = case
    if F.documented_gate(td, before.gprs[0], before.gprs[1], before.long_mode) is not None:
        return
    rcx = before.gprs[1]
    res = tdg_vp_vmcall(td, before.copy())
    for i in range(2, 16):
        assert res.exit.vmm[i] == (before.gprs[i] if selected(rcx, i) else 0)
    after = tdh_vp_enter(td, res.exit, host["vmm"], host["xmm"])
    for i in range(2, 16):
        assert after.gprs[i] == (host["vmm"][i] if selected(rcx, i) else before.gprs[i])
    assert after.gprs[0] == 0 and after.gprs[1] == rcx
    for i in range(16):
        assert after.xmm[i] == (host["xmm"][i] if selected(rcx, 16 + i) else before.xmm[i])


@FAST
@given(td_and_call(), F.platforms())
def test_cache_pairs(case, platform):
    """ABI §2: hardened never leaves a register avail 0 / dirty 1; legacy leaves exactly RSP and
    RIP..SEGMENTS there after a TD exit (a fact of today's tdx.c, see LEGACY_INVALID_PAIRS)."""
    td, before, _ = case
    for policy in ("legacy", "hardened"):
        vcpu = KvmVcpu(policy)
        rt = round_trip(td, before.copy(), vcpu, parse({"guest": {}, "platform": platform}).platform)
        if rt.kvm is None:
            continue
        want = 0 if policy == "hardened" else LEGACY_INVALID_PAIRS
        assert vcpu.cache.dirty & ~vcpu.cache.avail & 0x1FFFFFF == want


@FAST
@given(td_and_call(), F.platforms())
def test_hardened_refusal_has_no_side_effect(case, platform):
    """A refused call (R10 exposed, a needed register not) changes nothing on the host and only
    R10 = INVALID_OPERAND (0x8000000000000000, GHCI) reaches the guest, except an exposed RBP (a TD
    without NO_RBP_MOD): KVM passes no RBP, so it comes back as a host value."""
    td, before, _ = case
    p = parse({"guest": {}, "platform": platform}).platform
    snap = p.snapshot()
    rt = round_trip(td, before.copy(), KvmVcpu("hardened"), p)
    if rt.kvm is None or rt.kvm.verdict != "refused":
        return
    assert p.snapshot() == snap
    want = list(before.gprs)
    want[0], want[10] = 0, 0x8000000000000000
    rbp_exposed = selected(before.gprs[1], 5)
    assert rt.after.host == ({5} if rbp_exposed else set())
    assert [v for i, v in enumerate(rt.after.gprs) if i != 5 or not rbp_exposed] == [
        v for i, v in enumerate(want) if i != 5 or not rbp_exposed
    ]


@FAST
@given(td_and_call(), F.platforms())
def test_hardened_completion_matches_legacy(case, platform):
    """Differential: whenever hardened completes, legacy on the same host gives the same guest."""
    td, before, _ = case
    h = round_trip(td, before.copy(), KvmVcpu("hardened"), parse({"guest": {}, "platform": platform}).platform)
    if h.kvm is None or h.kvm.verdict not in ("completed", "userspace"):
        return
    lg = round_trip(td, before.copy(), KvmVcpu("legacy"), parse({"guest": {}, "platform": platform}).platform)
    assert (h.after.gprs, h.after.xmm, h.after.rip) == (lg.after.gprs, lg.after.xmm, lg.after.rip)


def test_documented_gate_by_hand():
    td15, td10 = TdConfig("1.5", True), TdConfig("1.0", True)
    assert F.documented_gate(td15, 0, 0xFFCC, True) is None  # widest legal mask under NO_RBP_MOD
    assert F.documented_gate(td15, 0, 0xFFEC, True) == BAD_RCX  # RBP (bit 5) under NO_RBP_MOD on 1.5
    assert F.documented_gate(td10, 0, 0xFFEC, True) is None  # 1.0 checks only bits 0, 1, 4
    assert F.documented_gate(td15, 0, 1 << 32, True) == BAD_RCX  # reserved bit 32
    assert F.documented_gate(td15, 1, 0xFFCC, True) == "not-modelled"  # TDG.VP.INFO: accepted, not a TDVMCALL
    assert F.documented_gate(td15, 13, 0xFFCC, True) == BAD_RAX  # no leaf 13 in module 1.5.01
    assert F.documented_gate(td15, 1 << 16, 0xFFCC, True) == BAD_RAX  # version 1 of TDG.VP.VMCALL
    assert F.documented_gate(td15, 1 << 16 | 7, 0xFFCC, True) == "not-modelled"  # TDG.VM.RD version 1
    assert F.documented_gate(td15, 2 << 16 | 7, 0xFFCC, True) == "vm-rd-refused"  # refused by TDG.VM.RD itself
    assert F.documented_gate(td15, 1 << 24, 0xFFCC, True) == BAD_RAX  # a reserved bit
    assert F.documented_gate(td15, 0, 0xFFCC, False) == "fault"  # #GP outside 64-bit mode

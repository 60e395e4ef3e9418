"""The mask sweep: simulation and leaf table agree for every call and case; figures derived by hand
from docs/abi.md; the fast (footprint) route equals running every mask; the loud paths work."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from tdvmcall.cli import app
from tdvmcall.module import TdConfig
from tdvmcall.sweep import sweep as S

LINUX_TD = TdConfig("1.5", True)  # what KVM creates (docs/abi.md §3)
RBP_TD = TdConfig("1.5", False)
ON, OFF = "1.5/no_rbp_mod", "1.5/rbp_mod"


def _mask(*names: str) -> int:
    idx = {
        "rdx": 2,
        "rbx": 3,
        "rbp": 5,
        "rsi": 6,
        "rdi": 7,
        "r10": 10,
        "r11": 11,
        "r12": 12,
        "r13": 13,
        "r14": 14,
        "r15": 15,
    }
    return sum(1 << idx[n] for n in names)


@pytest.fixture(scope="module")
def swept() -> dict:
    result = S.run_sweep(jobs=1)
    return {(r["call"], r["case"]): r for r in result["rows"]} | {"__all__": result}


def _target(call: str, case: str) -> S.Target:
    return next(t for t in S.targets() if t.call == call and t.case.name == case)


# --- the two routes agree, for every call and case ---------------------------------------------
@pytest.mark.parametrize("target", S.targets(), ids=lambda t: f"{t.call}/{t.case.name}")
def test_simulation_agrees_with_table(swept, target):
    row = swept[(target.call, target.case.name)]
    assert row["agree"], row["problems"]
    for td, entry in row["td"].items():
        hard = entry["hardened_completes"]
        assert hard["upset"], (td, "hardened set is not the up-set of its minimal mask")
        assert hard["minimal"] == entry["table"]["minimal"]
        assert hard["count"] == entry["table"]["hardened_accepts"]


def test_sweep_covers_every_call_and_case(swept):
    result = swept["__all__"]
    # 20 rows of the leaf table + the unknown hypercall, each with its cases
    assert len(result["rows"]) == sum(len(leaf.cases) for leaf in S.L.LEAVES + (S.L.UNKNOWN_HYPERCALL,))
    assert {r["call"] for r in result["rows"]} >= {"Instruction.IO", "MapGPA", "KVMHypercall"}
    assert result["agree"]


# --- figures derived by hand from docs/abi.md ----------------------------------------------------------
def test_module_gate_counts():
    # docs/abi.md §3: bits 0 (RAX), 1 (RCX), 4 (RSP) always refused, bit 5 (RBP) too on 1.5 with NO_RBP_MOD.
    # 16 - 4 = 12 free bits -> 2^12 = 4096 masks; without NO_RBP_MOD 13 free bits -> 8192.
    assert len(S.module_accepts("1.5", True)) == 4096
    assert len(S.module_accepts("1.5", False)) == 8192
    # module 1.0 never checks RBP (docs/abi.md §3)
    assert len(S.module_accepts("1.0", True)) == 8192
    assert S.passable(LINUX_TD) == 0xFFCC  # the widest legal mask under NO_RBP_MOD


def test_io_figures(swept):
    # docs/abi.md §4 Instruction.IO: selectors R10 R11; inputs R12 size, R13 direction, R14 port, R15 data
    # only for OUT; outputs R10 (error), R11 (data, IN only). IN: R10..R14 = 0x7C00; OUT: + R15 = 0xFC00.
    io_in, io_out = swept[("Instruction.IO", "in")]["td"], swept[("Instruction.IO", "out")]["td"]
    assert io_in[ON]["hardened_completes"]["minimal"] == f"{_mask('r10', 'r11', 'r12', 'r13', 'r14'):#06x}"
    assert io_out[ON]["hardened_completes"]["minimal"] == "0xfc00"
    # masks containing the 5 (IN) or 6 (OUT) registers among the 12 the module lets through: 2^7, 2^6
    assert io_in[ON]["hardened_completes"]["count"] == 128
    assert io_out[ON]["hardened_completes"]["count"] == 64
    assert io_out[OFF]["hardened_completes"]["count"] == 128  # RBP free as well: 2^7


def test_legacy_silent_ok_needs_what_kvm_consumed_and_wrote(swept):
    # Today's KVM is silent-ok when nothing it consumed or wrote was unexposed.  It consumes R10 and
    # R11 to dispatch (docs/abi.md §4: "with R10/R11 unexposed KVM sees leaf 0"), then the handler's reads.
    # CPUID: reads R12 R13, writes R12..R15 (never R10): R10..R15 = 0xFC00.
    assert swept[("Instruction.CPUID", "leaf1")]["td"][ON]["legacy_silent_ok"]["least"] == "0xfc00"
    # MapGPA that succeeds: reads R12 R13 and writes nothing (docs/abi.md §4: R10/R11 only on error or
    # RETRY): R10 R11 R12 R13 = 0x3C00.
    mapgpa = swept[("MapGPA", "to-shared")]["td"][ON]["legacy_silent_ok"]
    assert mapgpa["least"] == f"{_mask('r10', 'r11', 'r12', 'r13'):#06x}"
    # 12 registers pass the module under NO_RBP_MOD; 4 are needed: 2^8 masks
    assert mapgpa["count"] == 256 and mapgpa["upset"]
    # HLT: reads R12 only: 0x1C00
    assert swept[("Instruction.HLT", "sti-hlt")]["td"][ON]["legacy_silent_ok"]["least"] == "0x1c00"


def test_unknown_hypercall_needs_only_r10(swept):
    # docs/abi.md §4: any R10 != 0 is a hypercall number; an unknown one returns -KVM_ENOSYS in R10 and
    # reads nothing: minimal mask R10 = 0x0400, so 2^(12 - 1) = 2048 masks under NO_RBP_MOD.
    row = swept[("KVMHypercall", "unknown-nr")]["td"][ON]
    assert row["hardened_completes"]["minimal"] == "0x0400"
    assert row["hardened_completes"]["count"] == 2048


# --- the fast route is the exhaustive route ---------------------------------------------------------
@pytest.mark.parametrize("call,case", [("Instruction.IO", "out"), ("MapGPA", "retry"), ("GetTdVmCallInfo", "bad-leaf")])
def test_footprint_route_equals_every_mask(call, case):
    t = _target(call, case)
    for policy in ("legacy", "hardened"):
        fast = S.simulate(t, LINUX_TD, policy)
        slow = S.simulate(t, LINUX_TD, policy, exhaustive=True)
        assert fast.route == "footprint" and slow.route == "exhaustive"
        assert fast.accepted == slow.accepted
        assert fast.runs < slow.runs == 4096


def test_footprint_check_falls_back_when_a_class_disagrees(monkeypatch):
    # plant a dependence the footprint cannot see: exposing RDI changes the record of every run
    real = S.observe

    def planted(td, policy, t, mask, tree="kvm-x86"):
        o = real(td, policy, t, mask, tree)
        return dataclasses.replace(o, record=o.record + (bool(mask & _mask("rdi")),)) if o.exited else o

    monkeypatch.setattr(S, "observe", planted)
    sim = S.simulate(_target("KVMHypercall", "unknown-nr"), LINUX_TD, "hardened")
    assert sim.route == "exhaustive" and sim.disagreements
    assert len(sim.accepted) == 2048  # still the right answer, from every mask


def test_disagreement_is_loud(monkeypatch):
    real = S.table_answer

    def wrong(t, td):
        out = real(t, td)
        return out | {"minimal": out["minimal"] | _mask("rsi"), "condition_mask": out["minimal"] | _mask("rsi")}

    monkeypatch.setattr(S, "table_answer", wrong)
    res = CliRunner().invoke(app, ["sweep", "--call", "Instruction.HLT", "--jobs", "1"])
    assert res.exit_code == 1
    assert "DISAGREEMENT" in res.output and "SIMULATION AND LEAF TABLE DISAGREE" in res.output


# --- helpers ---------------------------------------------------------------------------------------
@given(st.integers(0, 0xFF))
def test_submasks_are_every_subset(mask):
    subs = list(S.submasks(mask))
    assert len(subs) == len(set(subs)) == 2 ** bin(mask).count("1")
    assert all(s & ~mask == 0 for s in subs)


def test_least_and_upset():
    gate = tuple(range(16))
    assert S.least([0b0110, 0b0111, 0b1110, 0b1111]) == 0b0110
    assert S.is_upset([0b0110, 0b0111, 0b1110, 0b1111], gate)
    assert not S.is_upset([0b0110, 0b1111], gate)  # 0b0111 and 0b1110 missing
    assert S.least([0b01, 0b10]) is None and S.least([]) is None


def test_cli_json_and_bad_input():
    res = CliRunner().invoke(app, ["sweep", "--call", "Instruction.RDMSR", "--json", "--jobs", "1"])
    assert res.exit_code == 0
    assert '"agree": true' in res.output
    # the catalog's word for a call, as check --call takes it: IO is Instruction.IO (docs/check.md)
    short = CliRunner().invoke(app, ["sweep", "--call", "IO", "--json", "--jobs", "1"])
    assert short.exit_code == 0 and {r["call"] for r in json.loads(short.stdout)["rows"]} == {"Instruction.IO"}
    bad = CliRunner().invoke(app, ["sweep", "--call", "Instruction.NOPE"])
    assert bad.exit_code == 2


@pytest.mark.parametrize(("call", "words"), [("Instruction.HLT", "call x case"), ("IO", "calls x cases")])
def test_the_first_line_counts_in_the_singular_only_for_one(call, words):
    got = json.loads(CliRunner().invoke(app, ["sweep", "--call", call, "--json", "--jobs", "1"]).stdout)
    n, trips = len(got["rows"]), got["round_trips"]
    assert (n == 1) == (words == "call x case") and trips > 1  # HLT is one call and case, IO two cases
    first = CliRunner().invoke(app, ["sweep", "--call", call, "--jobs", "1"]).output.splitlines()[0]
    assert first.startswith(
        f"simulation and leaf table agree for every call and case: {n} {words}, {trips:,} model round trips ("
    )

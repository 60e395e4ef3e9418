"""The leaf table against docs/abi.md §4, and its consistency."""

from __future__ import annotations

from tdvmcall.abi.regs import GPR_NAMES
from tdvmcall.kvm import leaves as L
from tdvmcall.kvm.handlers import HANDLERS


def test_every_operand_is_a_gpr_the_module_can_pass():
    for leaf in L.LEAVES:
        for op in leaf.inputs + leaf.outputs:
            assert op.reg in GPR_NAMES and op.reg not in ("rax", "rcx", "rsp", "rbp"), (leaf.name, op.reg)


def test_every_implemented_leaf_has_a_handler_and_a_source():
    for leaf in L.LEAVES:
        assert leaf.source
        if leaf.name not in L.UNSUPPORTED_GHCI:
            assert leaf.name in HANDLERS, leaf.name


def test_dispatch_follows_r10_then_r11():
    assert L.lookup(0, 10).name == "Instruction.CPUID"
    assert L.lookup(0, 0x10001).name == "MapGPA"
    assert L.lookup(11, 10).name == "KVMHypercall.SCHED_YIELD"  # R10 != 0: R11 is a0, not a leaf
    assert L.lookup(0x1234, 0).name == "KVMHypercall"
    assert L.lookup(0, 0x77).name.startswith("unknown")


def test_ghci_numbers_and_vmx_reasons():
    # ABI §4: leaf numbers and the VMX reasons KVM re-labels instruction leaves with
    expect = {
        "GetTdVmCallInfo": (0x10000, 77),
        "MapGPA": (0x10001, 77),
        "GetQuote": (0x10002, 77),
        "ReportFatalError": (0x10003, 77),
        "SetupEventNotifyInterrupt": (0x10004, 77),
        "Instruction.CPUID": (10, 10),
        "Instruction.HLT": (12, 12),
        "Instruction.IO": (30, 30),
        "Instruction.RDMSR": (31, 31),
        "Instruction.WRMSR": (32, 32),
        "#VE.RequestMMIO": (48, 49),
    }
    for name, (r11, reason) in expect.items():
        leaf = L.by_name(name)
        assert (leaf.r11, leaf.reason) == (r11, reason), name
    assert {leaf.nr for leaf in L.KVM_HYPERCALLS} == {1, 5, 9, 10, 11, 12}
    assert all(leaf.reason == 18 for leaf in L.KVM_HYPERCALLS)


def test_conditional_operands():
    io = L.by_name("Instruction.IO")
    assert "r15" in L.required_inputs(io, {"r13": 1}) and "r15" not in L.required_inputs(io, {"r13": 0})
    assert "r11" in L.possible_outputs(io, {"r13": 0}) and "r11" not in L.possible_outputs(io, {"r13": 1})
    mmio = L.by_name("#VE.RequestMMIO")
    assert "r15" in L.required_inputs(mmio, {"r13": 1 << 32 | 1})  # direction compared on 32 bits
    fatal = L.by_name("ReportFatalError")
    assert "r13" in L.required_inputs(fatal, {"r12": 1 << 63}) and "r13" not in L.required_inputs(fatal, {"r12": 1})
    assert set(L.optional_inputs(fatal)) == {"r14", "r15", "rbx", "rdi", "rsi", "r8", "r9", "rdx"}
    mapgpa = L.by_name("MapGPA")
    assert L.expected_outputs(mapgpa, {}, failed=False) == []  # success: nothing written
    assert L.expected_outputs(mapgpa, {}, failed=True) == ["r10", "r11"]


def test_minimal_masks_match_the_guests_that_pass_today():
    # shared/data/guest-masks.csv: COCONUT-SVSM's masks (0x1C00 RDMSR/HLT, 0x3C00 WRMSR/MapGPA) are
    # exactly R10 R11 plus the leaf's inputs (ABI §4), so they are the minimal masks
    assert L.minimal_mask(L.by_name("Instruction.RDMSR")) == 0x1C00
    assert L.minimal_mask(L.by_name("Instruction.HLT")) == 0x1C00
    assert L.minimal_mask(L.by_name("Instruction.WRMSR")) == 0x3C00
    assert L.minimal_mask(L.by_name("MapGPA")) == 0x3C00
    assert L.minimal_mask(L.by_name("Instruction.CPUID")) == 0xFC00  # inputs R12 R13, outputs R12..R15


def test_cases_are_immutable_and_hashable():
    """The table's rows do not change: a Case hashes, its registers and platform refuse every
    change (nested values too), and they still read, unpack, pickle and export like dicts."""
    import dataclasses
    import json
    import pickle

    import pytest

    retry = {c.name: c for c in L.BY_NAME["MapGPA"].cases}["retry"]
    # rows and their cases can be set members and dict keys (equal values, equal hashes)
    pairs = {(leaf, case) for leaf in L.LEAVES for case in leaf.cases}
    assert len(pairs) == sum(len(leaf.cases) for leaf in L.LEAVES)
    assert hash(retry) == hash(L.Case("retry", dict(retry.regs), json.loads(json.dumps(retry.platform))))
    with pytest.raises(dataclasses.FrozenInstanceError):
        retry.regs = {}  # type: ignore[misc]
    for mutate in (
        lambda: retry.regs.__setitem__("r12", 0),
        lambda: retry.regs.update(r13=0),
        lambda: retry.regs.pop("r12"),
        lambda: retry.platform["userspace"].clear(),
        lambda: retry.platform["userspace"]["hypercall_ret"].append(0),
        lambda: retry.platform["userspace"]["hypercall_ret"].__setitem__(0, 11),
    ):
        with pytest.raises(TypeError, match="immutable"):
            mutate()
    # reads as before: indexing, unpacking, JSON, pickling (sweep's worker processes)
    assert retry.regs["r13"] == 0x40_0000 and {**retry.regs, "r10": 0}["r10"] == 0
    assert json.loads(json.dumps({"platform": retry.platform})) == {
        "platform": {"userspace": {"hypercall_ret": [0, 11]}}
    }
    assert pickle.loads(pickle.dumps(retry)) == retry
    # a plain dict given to Case is copied, not shared
    regs = {"r12": 1}
    case = L.Case("x", regs)
    regs["r12"] = 2
    assert case.regs == {"r12": 1}

"""``tdvmcall trace --tree``: a TDVMCALL exit whose reason carries the bus-lock flag (bit 26), judged
by the rule of the KVM tree the trace came from (``kvm/trees.py``), on trace lines built from the
``kvm_exit`` tracepoint of the 7.3 and 6.16 sources.

How the lines are built (every value below is worked out by hand from the sources, not from the
program):

- The TDX module sets bit 26 of the exit reason (bus lock detected) on a TDCALL exit: TDH.VP.ENTER's
  RAX = 0x0400004D.  ``tdx_to_vmx_exit_reason()`` (``arch/x86/kvm/vmx/tdx.c``):
  Debian ``linux-source-7.3`` 7.3.4 switches on ``exit_reason.basic`` (tdx.c:955) and rewrites only
  the basic field, so a bus-lock CPUID is reported as ``0x0400000A``; KT0511/linux-6.16.1 @30b97c8
  switches on the whole ``exit_reason`` (tdx.c:918), so 0x0400004D matches no case and stays
  TDCALL: a re-labelled reason (CPUID 10, HLT 12, VMCALL 18, MSR_READ 31) never carries the bit.
- ``tdx_get_exit_info()`` reports ``vt.exit_reason.full`` (7.3 tdx.c:2186), and the ``kvm_exit``
  event prints it with ``kvm_print_exit_reason()`` (7.3 ``arch/x86/kvm/trace.h``:383): the name of
  bits 15:0, then, when bits 31:16 are not 0, a space and ``__print_flags_u64()`` of them with only
  FAILED_VMENTRY (bit 31) named: bit 26 alone prints as the raw hex ``0x4000000``.  0x0400000A is
  ``CPUID 0x4000000``; 0x0400004D ``TDCALL 0x4000000``.
- 7.3's event ends in `` requests 0x%016llx`` (trace.h:421-423); the 6.16 lines are built with the
  format of docs/abi.md §7, which ends at ``error_code`` (the stored 6.16.1 copy has no trace.h to
  read; the parser ignores trailing text, so the verdicts do not depend on it).

Verdicts (docs/abi.md §3, §4; the masks are GPR bits, R10 = bit 10 ... R15 = bit 15):

==========================  ======  ==========================  =====================================
line                        mask    v7.3                        kvm-x86, v6.16
==========================  ======  ==========================  =====================================
TDCALL                      0xFFCC  completes (makes it a TD)   completes
CPUID 0x4000000             0xFFCC  completes (R10-R15: CPUID)  inconsistent (re-labelled + bit 26)
CPUID 0x4000000             0x7C00  refused, missing r15 (EDX)  inconsistent
HLT 0x4000000               0x1C00  completes (HLT reads R12)   inconsistent
VMCALL 0x4000000            0x0D04  depends (as VMCALL 0x0D04)  inconsistent
MSR_READ 0x4000000          0x0400  inconsistent (R11 implied)  inconsistent
TDCALL 0x4000000            0x1C00  depends (TDCALL leaves)     depends (on R11 alone)
==========================  ======  ==========================  =====================================

On v7.3 every flagged line gets the verdict of the same line without the flag.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from tdvmcall.abi import codes
from tdvmcall.cli import app
from tdvmcall.kvm import leaves as L
from tdvmcall.kvm.trees import DEFAULT_TREE, TREES
from tdvmcall.trace.audit import parse_chunk
from tdvmcall.trace.io import Chunk
from tdvmcall.trace.parquet import parquet_schema
from tdvmcall.trace.reference import parse_chunk_reference
from tdvmcall.trace.rows import ReasonTable, TaskTable
from tdvmcall.trace.scan import Scanned
from tdvmcall.trace.verdict import verdict_for

runner = CliRunner()

#: 7.3 trace.h: the event's format ends in " requests 0x%016llx"; 6.16: docs/abi.md §7
SUFFIX = {"v7.3": " requests 0x0000000000000000", "v6.16": ""}

#: (reason text as kvm_exit prints it, mask, verdict on v7.3, verdict on kvm-x86 and v6.16)
LINES = [
    ("TDCALL", 0xFFCC, "completes", "completes"),
    ("CPUID 0x4000000", 0xFFCC, "completes", "inconsistent"),
    ("CPUID 0x4000000", 0x7C00, "refused", "inconsistent"),
    ("HLT 0x4000000", 0x1C00, "completes", "inconsistent"),
    ("VMCALL 0x4000000", 0x0D04, "depends", "inconsistent"),
    ("MSR_READ 0x4000000", 0x0400, "inconsistent", "inconsistent"),
    ("TDCALL 0x4000000", 0x1C00, "depends", "depends"),
]


def payload(reason: str, mask: int, suffix: str) -> str:
    """The kvm_exit payload: ``vcpu %u reason %s%s%s rip 0x%lx info1 0x%016llx info2 0x%016llx
    intr_info 0x%08x error_code 0x%08x`` (+ 7.3's requests)."""
    return (
        f"vcpu 1 reason {reason} rip 0x0 info1 0x{mask:016x} info2 0x{0:016x} "
        f"intr_info 0x00000000 error_code 0x00000000{suffix}"
    )


def trace(fmt: str, suffix: str, lines=LINES) -> str:
    """One TD (pid 1001) in the line shape of each format (docs/abi.md §7)."""
    out = {"ftrace": ["# tracer: nop", "#"], "trace-cmd": ["version = 6", "cpus=2"], "perf": []}[fmt]
    for i, (reason, mask, *_) in enumerate(lines):
        body, ts = payload(reason, mask, suffix), f"{200 + i / 1000:.6f}"
        if fmt == "perf":
            out.append(f"       CPU 1/KVM 1001 [003] {ts}: kvm:kvm_exit: {body}")
        elif fmt == "trace-cmd":
            out.append(f"       CPU 1/KVM-1001  [003] {ts}: kvm_exit:             {body}")
        else:
            out.append(f"       CPU 1/KVM-1001  [003] d..2. {ts}: kvm_exit: {body}")
    return "\n".join(out) + "\n"


def audit(path: str, *args: str) -> dict:
    r = runner.invoke(app, ["trace", path, "--json", *args])
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture
def write(tmp_path):
    def w(name: str, text: str) -> str:
        path = tmp_path / name
        path.write_text(text)
        return str(path)

    return w


# --- the tracepoint's text for the reasons the trees report --------------------------------------
def test_the_reason_text_is_the_tracepoint_s():
    # kvm_print_exit_reason(): name of bits 15:0, then bits 31:16 with FAILED_VMENTRY named, others raw hex
    assert codes.kvm_exit_reason_text(0x0400000A) == "CPUID 0x4000000"
    assert codes.kvm_exit_reason_text(0x0400004D) == "TDCALL 0x4000000"
    # what each tree reports for a bus-lock CPUID exit (RAX 0x0400004D, leaf CPUID reported as 10)
    assert TREES["v7.3"].vmx_exit_reason(0x0400004D, 10) == 0x0400000A
    assert TREES["v6.16"].vmx_exit_reason(0x0400004D, 10) == 0x0400004D
    assert TREES["kvm-x86"].vmx_exit_reason(0x0400004D, 10) == 0x0400004D


# --- the parsers keep the flag: the C fast path and the plain-Python reference agree ---------------
@pytest.mark.parametrize("tree", ["v7.3", "v6.16"])
@pytest.mark.parametrize("fmt", ["ftrace", "trace-cmd", "perf"])
def test_both_parsers_keep_the_flag(tree, fmt):
    data = trace(fmt, SUFFIX[tree]).encode()
    texts = []
    for parse in (parse_chunk, parse_chunk_reference):
        tasks, reasons = TaskTable(), ReasonTable()
        r = parse(Chunk(data, truncated=False), fmt, "src", tasks, reasons, keep_bad=10, rows=True)
        assert r.counts.parsed == len(LINES) and r.counts.unparsed == 0
        assert r.rows is not None
        got = [
            (reasons.reasons[rid].text, reasons.reasons[rid].bus_lock, info1)
            for rid, info1 in zip(r.rows["rid"].tolist(), r.rows["info1"].tolist())
        ]
        texts.append(got)
    assert texts[0] == texts[1]
    assert texts[0] == [(reason, "0x4000000" in reason, mask) for reason, mask, *_ in LINES]
    # and these lines are the fast path's own (none sent to the reference parser)
    if fmt != "perf":
        s = Scanned(data, perf=False)
        assert len(s.slow) == 0 and [s.reasons[i].decode() for i in s.reason] == [x[0] for x in LINES]


# --- the verdicts, per tree --------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["ftrace", "trace-cmd", "perf"])
def test_v73_judges_a_flagged_relabelled_reason_by_its_leaf(write, fmt):
    rep = audit(write("t", trace(fmt, SUFFIX["v7.3"])), "--tree", "v7.3")
    assert rep["tree"] == "v7.3" and rep["tree_rule"]["relabel"] == "basic"
    assert rep["tree_rule"]["assumed"] == "given" and rep["tree_rule"]["bus_lock_user_exit"] is True
    v = rep["totals"]["verdicts"]
    assert (v["completes"], v["refused"], v["depends"], v["inconsistent"]) == (3, 1, 2, 1)
    refused = [p for p in rep["pairs"] if p["verdict"] == "refused"]
    assert [(p["reason"], p["reason_flags"], p["mask"], p["missing"]) for p in refused] == [
        ("CPUID", "0x4000000", "0x7c00", "r15")
    ]
    assert "re-labelled by the leaf" in refused[0]["detail"] and "KVM_EXIT_X86_BUS_LOCK" in refused[0]["detail"]


@pytest.mark.parametrize("tree", ["v6.16", "kvm-x86"])
def test_whole_reason_trees_keep_a_flagged_relabelled_reason_inconsistent(write, tree):
    rep = audit(write("t", trace("ftrace", SUFFIX["v6.16"])), "--tree", tree)
    assert rep["tree"] == tree and rep["tree_rule"]["relabel"] == "whole-reason"
    v = rep["totals"]["verdicts"]
    assert (v["completes"], v["depends"], v["inconsistent"], v["refused"]) == (1, 1, 5, 0)
    bad = {(p["reason"], p["reason_flags"]) for p in rep["pairs"] if p["verdict"] == "inconsistent"}
    assert bad == {(r, "0x4000000") for r in ("CPUID", "HLT", "VMCALL", "MSR_READ")}
    bus = [p for p in rep["pairs"] if p["reason"] == "TDCALL" and p["mask"] == "0x1c00"]
    assert bus[0]["verdict"] == "depends" and "R11 alone" in bus[0]["detail"]


def test_the_default_tree_is_the_other_commands_default(write):
    path = write("t", trace("ftrace", ""))
    rep = audit(path)
    assert rep["tree"] == DEFAULT_TREE == "kvm-x86" and rep["tree_rule"]["assumed"] == "default"
    assert rep["totals"]["verdicts"]["inconsistent"] == 5
    assert audit(path, "--tree", "V7.3")["tree"] == "v7.3"  # any case, as every command


@pytest.mark.parametrize("tree", ["v7.3", "v6.16", "kvm-x86"])
def test_flagged_lines_against_the_same_lines_without_the_flag(write, tree):
    """v7.3: a flagged re-labelled exit is the same exit; the whole-reason trees: it cannot be."""
    flagged = audit(write("f", trace("ftrace", SUFFIX.get(tree, ""))), "--tree", tree)
    plain_lines = [(r.replace(" 0x4000000", ""), m, a, b) for r, m, a, b in LINES]
    plain = audit(write("p", trace("ftrace", SUFFIX.get(tree, ""), plain_lines)), "--tree", tree)

    def verdicts(report: dict, reason: str, mask: int) -> set[str]:
        return {p["verdict"] for p in report["pairs"] if p["reason"] == reason and int(p["mask"], 16) == mask}

    for reason, mask, on_v73, on_whole in LINES:
        want = on_v73 if tree == "v7.3" else on_whole  # the table above, read from each tree's tdx.c
        assert verdicts(flagged, reason.split()[0], mask) == {want}, (reason, mask)
        if tree == "v7.3":  # the same verdict as the audit gave the line without the flag
            assert verdicts(plain, reason.split()[0], mask) == {want}, (reason, mask)
    assert plain["totals"]["verdicts"]["inconsistent"] == 1  # MSR_READ with R10 only, flag or not


def test_header_and_parquet_follow_the_tree(write, tmp_path):
    path = write("t", trace("ftrace", SUFFIX["v7.3"]))
    r = runner.invoke(app, ["trace", path, "--tree", "v7.3"])
    assert r.exit_code == 0, r.stderr
    first = r.stdout.splitlines()[0]
    assert first.startswith("KVM tree: v7.3 (Linux 7.3.4") and "given with --tree" in first
    r = runner.invoke(app, ["trace", path])
    assert r.stdout.splitlines()[0].startswith("KVM tree: kvm-x86") and "the default" in r.stdout.splitlines()[0]
    # the inconsistent pairs are named as kvm_exit printed them, and the tree that would take them is named
    assert "  CPUID 0x4000000 0x7c00 (1 exits): reason CPUID with the bus-lock bit" in r.stdout
    assert "give --tree v7.3)" in r.stdout
    assert "give --tree" not in runner.invoke(app, ["trace", path, "--tree", "v7.3"]).stdout
    out = {}
    for tree in ("v7.3", "v6.16"):
        pq_path = str(tmp_path / f"{tree}.parquet")
        r = runner.invoke(app, ["trace", path, "--tree", tree, "--to-parquet", pq_path])
        assert r.exit_code == 0, r.stderr
        table = pq.read_table(pq_path)
        assert table.schema.metadata[b"tdvmcall.tree"] == tree.encode()  # the file says whose verdicts
        assert table.schema.equals(parquet_schema())  # the columns are as before
        rows = table.to_pylist()
        out[tree] = [(row["reason"], row["reason_flags"], row["verdict"]) for row in rows]
    assert out["v7.3"][1] == ("CPUID", "0x4000000", "completes")
    assert out["v6.16"][1] == ("CPUID", "0x4000000", "inconsistent")
    assert [v for *_, v in out["v7.3"]] == [x[2] for x in LINES]
    assert [v for *_, v in out["v6.16"]] == [x[3] for x in LINES]


def test_a_bad_tree_is_one_line_and_exit_2(write):
    r = runner.invoke(app, ["trace", write("t", trace("ftrace", "")), "--tree", "v6.1"])
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines() == [
        "tdvmcall: error: --tree: 'v6.1' is not a KVM tree; accepted: kvm-x86, v6.16, v7.3"
    ]


# --- the model: what a tree reports is what the rule says it dispatched ------------------------------
CALLS = [(0, leaf.r11) for leaf in L.LEAVES if leaf.family == "ghci" and leaf.r11 is not None] + [
    (leaf.nr, 0) for leaf in L.LEAVES if leaf.family == "kvm-hypercall"
]


@given(
    tree=st.sampled_from(sorted(TREES)),
    call=st.sampled_from(CALLS)
    | st.tuples(st.just(0), st.integers(0, 2**64 - 1))
    | st.tuples(st.integers(1, 2**64 - 1), st.integers(0, 2**64 - 1)),
    bus_lock=st.booleans(),
)
def test_a_reported_reason_is_dispatched_as_the_tree_ran_it(tree, call, bus_lock):
    """For every call, on every tree, with and without the bus-lock bit: the reason KVM reports
    (``vmx_exit_reason``) is one the rule accepts (``reported_dispatch`` not None), and the call the
    tree ran (``lookup``) is among those the reported reason may stand for."""
    rule = TREES[tree]
    r10, r11 = call
    raw = codes.EXIT_REASON_TDCALL | (codes.EXIT_REASON_BUS_LOCK_DETECTED if bus_lock else 0)
    ran = rule.lookup(r10, r11, bus_lock)
    unflagged = L.lookup(r10, r11)
    reported = rule.vmx_exit_reason(raw, unflagged.reason)
    dispatch = rule.reported_dispatch(reported)
    assert dispatch is not None
    basic, on_r11_alone = dispatch
    assert basic == reported & 0xFFFF
    assert ran.reason == basic  # the reported reason is the one of the call the tree ran
    may_be = L.bus_lock_leaves() if on_r11_alone else L.reason_leaves(basic)
    if ran.name in L.BY_NAME:  # a call of the leaf table: among those the reason may stand for
        assert ran.name in {leaf.name for leaf in may_be}
    elif on_r11_alone:  # any other R11 on R11 alone: the table's SUBFUNC_UNSUPPORTED entry
        assert ran.r11 not in L.HANDLE_TDVMCALL_R11 and may_be[-1].r11 not in L.HANDLE_TDVMCALL_R11


@pytest.mark.parametrize("reason", [10, 12, 18, 30, 31, 32, 49])
def test_a_flagged_relabelled_reason_per_rule(reason):
    flagged = reason | codes.EXIT_REASON_BUS_LOCK_DETECTED
    assert TREES["v7.3"].reported_dispatch(flagged) == (reason, False)
    assert TREES["v6.16"].reported_dispatch(flagged) is None
    assert TREES["kvm-x86"].reported_dispatch(flagged) is None
    # unflagged: the same on every tree
    assert {t.reported_dispatch(reason) for t in TREES.values()} == {(reason, False)}
    # the verdict of a flagged line on v7.3 is the unflagged line's verdict
    for mask in (0xFFCC, 0x7C00, 0x1C00, 0x0C00, 0x0400):
        assert verdict_for(reason, mask, True, "v7.3").verdict == verdict_for(reason, mask, False, "v7.3").verdict

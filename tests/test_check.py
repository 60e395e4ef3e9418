"""`tdvmcall check`: real guests' masks against the TDX module, today's KVM and the hardened one.

Every expected verdict below is derived by hand from docs/abi.md (§3 the module's control check, §4 the
leaf table, §6 the guests) and written beside the assertion; none is copied from the program.
Register names by mask bit (docs/abi.md §1): 2 rdx, 3 rbx, 5 rbp, 6 rsi, 7 rdi, 8..15 r8..r15.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tdvmcall.check.catalog import (
    ALL_KVM_CALLS,
    CatalogError,
    Host,
    check_call,
    check_sites,
    load_catalog,
    parse_calls,
    shipped_catalog_text,
    summary,
    what_if,
)
from tdvmcall.cli import app
from tdvmcall.kvm import leaves as L

runner = CliRunner()
TDX_OPERAND_INVALID_RCX = 0xC000010000000001  # docs/abi.md §3: TDX_OPERAND_INVALID | operand id RCX (1)
KVM = Host()  # module 1.5, NO_RBP_MOD on: what Linux KVM creates


def invoke(*args):
    return runner.invoke(app, ["check", *args])


@pytest.fixture(scope="module")
def shipped():
    sites, errors = load_catalog()
    assert errors == []
    return sites


def site(sites, guest, function, mask):
    (s,) = [s for s in sites if s.guest == guest and s.function == function and s.mask == mask]
    return s


def verdicts(checks):
    return {c.call.name: (c.verdict["legacy"], c.verdict["hardened"]) for c in checks}


def one(mask: str, call: str, host: Host = KVM):
    s = what_if(mask, [call])
    (c,) = check_sites([s], host)
    return c


# --- the catalog's call names ----------------------------------------------------------------------
def test_call_names_map_to_leaves():
    calls, remarks = parse_calls("all: HLT RDMSR MMIO KVM-hypercall(R10!=0) HyperV-hypercall")
    names = [c.name for c in calls]
    # catalog names -> leaf names; KVM-hypercall -> the six KVM hypercalls of docs/abi.md §4
    assert names[:3] == ["Instruction.HLT", "Instruction.RDMSR", "#VE.RequestMMIO"]
    assert names[3:9] == [
        f"KVMHypercall.{n}"
        for n in ("VAPIC_POLL_IRQ", "KICK_CPU", "CLOCK_PAIRING", "SEND_IPI", "SCHED_YIELD", "MAP_GPA_RANGE")
    ]
    assert calls[3].annotation == "R10!=0"
    assert names[9] == "HyperV-hypercall" and calls[9].foreign and calls[9].leaf is None
    assert remarks  # "all:" is kept as a remark


def test_family_words_qualifiers_and_remarks():
    calls, remarks = parse_calls("MigTD ReportStatus Send Receive (use RBX RDI)")
    assert [c.name for c in calls] == ["MigTD.ReportStatus", "MigTD.Send", "MigTD.Receive"]
    assert all(c.foreign for c in calls) and remarks == ["use RBX RDI"]
    # names are matched case-insensitively (CALL_NAMES' docstring), family words too
    calls, _ = parse_calls("migtd Send MIGTD receive")
    assert [c.name for c in calls] == ["MigTD.Send", "MigTD.Receive"]
    (cpuid,), _ = parse_calls("CPUID leaf 0xB")
    assert cpuid.name == "Instruction.CPUID" and cpuid.inputs == (("r12", 0xB),)
    calls, remarks = parse_calls("IO MMIO and other C callers")
    assert [c.name for c in calls] == ["Instruction.IO", "#VE.RequestMMIO"] and remarks == ["and other C callers"]
    # "all" alone: every call KVM implements, i.e. the GHCI leaves and the KVM hypercalls of the table
    calls, remarks = parse_calls("all (emulation build uses VMCALL)")
    assert [c.name for c in calls] == list(ALL_KVM_CALLS) and remarks == ["emulation build uses VMCALL"]
    assert set(ALL_KVM_CALLS) == {leaf.name for leaf in L.GHCI_LEAVES + L.KVM_HYPERCALLS}


def test_msr_index_pins_and_comments():
    # `RDMSR 0x802 (x2APIC ID)` (OpenVMM's AP trampoline): RDMSR with R12, the MSR index (docs/abi.md §4),
    # pinned to 0x802; the parenthesis is a comment, kept as a remark and changing no call
    (rdmsr,), remarks = parse_calls("RDMSR 0x802 (x2APIC ID)")
    assert rdmsr.name == "Instruction.RDMSR" and rdmsr.inputs == (("r12", 0x802),) and remarks == ["x2APIC ID"]
    assert rdmsr.label == "RDMSR 0x802"
    (wrmsr,), _ = parse_calls("WRMSR msr 0x808")
    assert wrmsr.name == "Instruction.WRMSR" and wrmsr.inputs == (("r12", 0x808),)
    # the pinned index is the only case run: one case, R12 = 0x802, under both policies
    c = one("0x1C00", "RDMSR 0x802")
    assert {(r.inputs["r12"], r.policy) for r in c.runs} == {(0x802, "legacy"), (0x802, "hardened")}


def test_all_followed_by_words_is_every_call():
    # `all selftest calls`: "selftest" names no call, so this is `all` (every call KVM implements)
    calls, remarks = parse_calls("all selftest calls")
    assert [c.name for c in calls] == list(ALL_KVM_CALLS) and remarks == ["all selftest calls"]
    # `all` followed by call names still means those calls (as `all:`)
    calls, _ = parse_calls("all IO HLT")
    assert [c.name for c in calls] == ["Instruction.IO", "Instruction.HLT"]


def test_direction_words_select_one_case():
    # docs/abi.md §4: IO and MMIO direction is R13 (0 in/read, 1 out/write); R15 (the data) is read only
    # for out/write, R11 (the data read) written only for in/read.
    for text, leaf, case, r13 in (
        ("IO in", "Instruction.IO", "in", 0),
        ("IO out", "Instruction.IO", "out", 1),
        ("MMIO read", "#VE.RequestMMIO", "read", 0),
        ("MMIO write", "#VE.RequestMMIO", "write", 1),
    ):
        (call,), _ = parse_calls(text)
        assert call.name == leaf and call.cases == (case,) and call.label == text
        (run_case,) = [c for c in L.BY_NAME[leaf].cases if c.name == case]
        assert run_case.regs["r13"] == r13
    # 0x7C00 = r10 r11 r12 r13 r14: a read needs r10 r11 (selectors) r12 r13 r14 (inputs) and writes
    # r10 r11: everything is exposed.  A write also reads r15: refused (hardened), read as 0 (legacy).
    for call in ("IO in", "MMIO read"):
        c = one("0x7C00", call)
        assert c.verdict == {"legacy": "ok", "hardened": "ok"} and {r.case for r in c.runs} == {call.split()[1]}
    for call in ("IO out", "MMIO write", "IO", "MMIO"):
        c = one("0x7C00", call)
        assert c.verdict == {"legacy": "legacy-silent", "hardened": "hardened-refuses"}, call
        assert [(r.case, r.missing_inputs, r.missing_outputs) for r in c.refusals()] == [
            ("out" if call.startswith("IO") else "write", ["r15"], [])
        ]
        assert [r.zero_reads for r in c.silences()] == [["r15"]]


@pytest.mark.parametrize(
    "text", ["RDMSRX", "HLT (unbalanced", "", "CPUID leaf 0xZZ", "RDMSR 0xZZ", "RDMSR 0x802 0x803", "all IO ports"]
)
def test_bad_call_field(text):
    with pytest.raises(CatalogError):
        parse_calls(text)


# --- the shipped catalog: expectations from docs/abi.md ----------------------------------------------------
def test_historical_rbp_rows_are_rejected_by_the_module(shipped):
    # 0xFFEC has bit 5 (RBP); a 1.5 module refuses it for a NO_RBP_MOD TD with TDX_OPERAND_INVALID
    # + operand RCX = 0xC000010000000001, and the VMM never sees the call (docs/abi.md §3).
    for s in (site(shipped, "td-shim", "AP mailbox loop", 0xFFEC), site(shipped, "edk2", "TdVmCall", 0xFFEC)):
        checks = check_sites([s], KVM)
        assert checks and all(v == ("module-rejects", "module-rejects") for v in verdicts(checks).values())
        assert all(c.module.status == TDX_OPERAND_INVALID_RCX and c.runs == [] for c in checks)
        assert checks[0].module.decoded["name"] == "TDX_OPERAND_INVALID"
        assert checks[0].module.decoded["operand_id"] == 1


@pytest.mark.parametrize("host", [Host(no_rbp_mod=False), Host(module="1.0", no_rbp_mod=True)])
def test_historical_rbp_rows_pass_without_the_rbp_check(shipped, host):
    # Without NO_RBP_MOD (or on a 1.0 module, which checks only bits 0, 1, 4) 0xFFEC is accepted, and
    # it exposes rdx rbx rbp rsi rdi r8..r15: a superset of every register any KVM leaf reads or
    # writes (r10..r15, and the ReportFatalError message registers rbx rdi rsi r8 r9 rdx).
    for s in (site(shipped, "td-shim", "AP mailbox loop", 0xFFEC), site(shipped, "edk2", "TdVmCall", 0xFFEC)):
        checks = check_sites([s], host)
        assert all(v == ("ok", "ok") for v in verdicts(checks).values())


def test_linux_0xffcc_passes_every_call_with_over_exposure_notes(shipped):
    # 0xFFCC = rdx rbx rsi rdi r8..r15 (docs/abi.md §3: the widest legal mask under NO_RBP_MOD).
    s = site(shipped, "linux", "__tdx_hypercall", 0xFFCC)
    checks = {c.call.name: c for c in check_sites([s], KVM)}
    for name, c in checks.items():
        expected = ("not-kvm", "not-kvm") if name == "HyperV-hypercall" else ("ok", "ok")
        assert (c.verdict["legacy"], c.verdict["hardened"]) == expected, name
    # HLT uses r10 r11 (selectors) and r12: the other nine exposed registers are unused
    assert checks["Instruction.HLT"].unused == ["rdx", "rbx", "rsi", "rdi", "r8", "r9", "r13", "r14", "r15"]
    # CPUID uses r10..r15
    assert checks["Instruction.CPUID"].unused == ["rdx", "rbx", "rsi", "rdi", "r8", "r9"]
    # ReportFatalError's message fills r14 r15 rbx rdi rsi r8 r9 rdx: nothing unused
    assert checks["ReportFatalError"].unused == []
    assert any("exposed but unused" in n for n in checks["Instruction.HLT"].notes)
    # every condition was run, e.g. IO in and out, MapGPA success and RETRY, under both policies
    assert {(r.case, r.policy) for r in checks["Instruction.IO"].runs} == {
        (c, p) for c in ("in", "out") for p in ("legacy", "hardened")
    }
    assert {"to-shared", "retry"} <= {r.case for r in checks["MapGPA"].runs}


def test_single_purpose_sites(shipped):
    # coconut-svsm RDMSR 0x1C00 = r10 r11 r12: selectors r10 r11, input r12, outputs r10 r11
    (c,) = check_sites([site(shipped, "coconut-svsm", "tdvmcall_rdmsr", 0x1C00)], KVM)
    assert (c.verdict["legacy"], c.verdict["hardened"]) == ("ok", "ok") and c.unused == []
    # OpenVMM IO 0xFF00 = r8..r15: IO needs r10 r11 r12 r13 r14 (r15 for OUT), outputs r10 r11;
    # r8 r9 are exposed for nothing
    (c,) = check_sites([site(shipped, "openvmm", "tdcall_io_in / tdcall_io_out", 0xFF00)], KVM)
    assert (c.verdict["legacy"], c.verdict["hardened"]) == ("ok", "ok") and c.unused == ["r8", "r9"]
    # Gramine GetTdVmCallInfo 0x7C00 = r10..r14: input r12, outputs r10..r14
    (c,) = check_sites([site(shipped, "gramine-tdx", "tdx_vmcall_gettdvmcallinfo", 0x7C00)], KVM)
    assert (c.verdict["legacy"], c.verdict["hardened"]) == ("ok", "ok")
    # Hyper-V hypercalls (0x0D04 = rdx r8 r10 r11, legal for the module) are not KVM calls
    (c,) = check_sites([site(shipped, "openvmm", "tdcall_hypercall", 0x0D04)], KVM)
    assert (c.verdict["legacy"], c.verdict["hardened"]) == ("not-kvm", "not-kvm") and "Hyper-V" in c.call.foreign


def test_report_fatal_error_without_r13_fails_only_with_a_gpa(shipped):
    # coconut-svsm 0x1C00 = r10 r11 r12; ReportFatalError reads R13 only when R12 bit 63 is set
    # (docs/abi.md §4): the with-gpa case is refused (hardened) and reads r13 as 0 (legacy); code-only is fine.
    (c,) = check_sites([site(shipped, "coconut-svsm", "tdvmcall_report_fatal_error", 0x1C00)], KVM)
    assert (c.verdict["legacy"], c.verdict["hardened"]) == ("legacy-silent", "hardened-refuses")
    assert [(r.case, r.missing_inputs, r.missing_outputs) for r in c.refusals()] == [("with-gpa", ["r13"], [])]
    assert [(r.case, r.zero_reads) for r in c.silences()] == [("with-gpa", ["r13"])]
    # pinned to a code without bit 63 it passes
    assert one("0x1C00", "ReportFatalError code 0x10000").verdict == {"legacy": "ok", "hardened": "ok"}


def test_unimplemented_and_migtd_calls(shipped):
    s = site(shipped, "td-shim", "asm_td_vmcall", 0xFC00)
    checks = {c.call.name: c for c in check_sites([s], KVM)}
    # MigTD is not KVM's; Service is a GHCI leaf KVM answers SUBFUNC_UNSUPPORTED (R10 out, R10 R11 in)
    assert checks["MigTD.WaitForRequest"].verdict == {"legacy": "not-kvm", "hardened": "not-kvm"}
    assert checks["Service"].verdict == {"legacy": "ok", "hardened": "ok"}
    assert any("SUBFUNC_UNSUPPORTED" in n for n in checks["Service"].notes)


def test_rows_added_by_the_2026_11_29_catalog(shipped):
    """The rows the corrected catalog added or changed, each derived from its CSV row and docs/abi.md."""
    # OpenVMM's AP trampoline, `RDMSR 0x802 (x2APIC ID)` at 0x1C00 = r10 r11 r12: RDMSR reads r12 and
    # writes r10 (failure) or r11 (success): all exposed, nothing unused
    (c,) = check_sites([site(shipped, "openvmm", "AP reset-vector trampoline (raw bytes)", 0x1C00)], KVM)
    assert c.call.inputs == (("r12", 0x802),) and c.verdict == {"legacy": "ok", "hardened": "ok"} and c.unused == []
    # EDK2's ApRunLoop between 35f6a2780e and c1eb477e06, 0xFFCC: CPUID leaf 0xB passes; CPUID uses
    # r10..r15, so rdx rbx rsi rdi r8 r9 are exposed for nothing (RBX: the mailbox address)
    (c,) = check_sites([site(shipped, "edk2", "AsmRelocateApMailBoxLoop", 0xFFCC)], KVM)
    assert c.verdict == {"legacy": "ok", "hardened": "ok"} and c.unused == ["rdx", "rbx", "rsi", "rdi", "r8", "r9"]
    # ... and before 35f6a2780e, 0xFFEC: RBP, so TDX_OPERAND_INVALID(RCX) under NO_RBP_MOD (docs/abi.md §3)
    (c,) = check_sites([site(shipped, "edk2", "AsmRelocateApMailBoxLoop", 0xFFEC)], KVM)
    assert c.verdict == {"legacy": "module-rejects", "hardened": "module-rejects"}
    assert c.module.status == TDX_OPERAND_INVALID_RCX
    # KVM's selftests, `all selftest calls` at 0xFC00 = r10..r15: every KVM call, and r10..r15 hold
    # every register any of them needs (the message registers of ReportFatalError are optional)
    s = site(shipped, "kvm-selftests (intel/tdx downstream)", "__tdx_hypercall (selftest guest)", 0xFC00)
    checks = check_sites([s], KVM)
    assert [c.call.name for c in checks] == list(ALL_KVM_CALLS)
    assert all(c.verdict == {"legacy": "ok", "hardened": "ok"} for c in checks)
    # Linux 0xFFCC no longer lists SetupEventNotifyInterrupt: 9 GHCI calls, 6 KVM hypercalls, Hyper-V
    linux = site(shipped, "linux", "__tdx_hypercall", 0xFFCC)
    assert len(linux.calls) == 16 and "SetupEventNotifyInterrupt" not in {c.name for c in linux.calls}


def test_shipped_catalog_summary(shipped):
    """The figures README.md and docs/check.md quote, counted by hand from guest-masks.csv:
    sites = rows = linux 2, td-shim 6, edk2 6, openvmm 6, coconut-svsm 8, tdx-guest 1, gramine 11,
    kvm-selftests 1 = 41.  Calls per row (`all` = the 17 calls KVM implements, 11 GHCI + 6 hypercalls):
    linux 16 + 17; td-shim 12 + 3 + 17 + 1 + 1 + 1; edk2 5 + 1 + 1 + 1 + 1 + 17; openvmm 6; coconut 8;
    tdx-guest 12; gramine 11; selftests 17 = 148.  not-kvm: the three Hyper-V rows' calls, td-shim's
    MigTD.WaitForRequest and its three MigTD calls = 7.  module-rejects: the 0xFFEC rows (RBP), td-shim
    AP loop 1 + EDK2 ApRunLoop 1 + EDK2 TdVmCall `all` 17 = 19.  Refused / silent: COCONUT-SVSM's
    ReportFatalError at 0x1C00 (the with-gpa case lacks r13) = 1.  Everything else is ok: 121."""
    s = summary(check_sites(shipped, KVM))
    assert (s["sites"], s["calls"]) == (41, 148)
    zero = {"legacy-silent": 0, "hardened-refuses": 0}
    assert s["hardened"] == {**zero, "ok": 121, "not-kvm": 7, "hardened-refuses": 1, "module-rejects": 19}
    assert s["legacy"] == {**zero, "ok": 121, "not-kvm": 7, "legacy-silent": 1, "module-rejects": 19}


def test_package_data_equals_the_shared_reference_data():
    """The shipped tables are copies of the project's reference data (``<repo>/../shared/data``):
    every CSV there is shipped, byte for byte."""
    from pathlib import Path

    from tdvmcall import data_file

    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not shared.is_dir():
        pytest.skip(
            f"{shared} does not exist: this checkout has no shared workspace beside it (../shared/data), "
            "so there is no reference copy to compare the package's data files with"
        )
    csvs = sorted(p.name for p in shared.glob("*.csv"))
    assert {"guest-masks.csv", "tdx-module-status-codes.csv"} <= set(csvs)
    for name in csvs:
        assert data_file(name).read_bytes() == (shared / name).read_bytes(), (
            f"src/tdvmcall/data/{name} != {shared / name}"
        )


# --- what-ifs -------------------------------------------------------------------------------------------
def test_cpuid_with_only_the_selectors():
    # 0x0C00 = r10 r11. CPUID reads r12 r13 and writes r12..r15 (docs/abi.md §4): hardened refuses every
    # case for all six; today's KVM reads r12 r13 as 0 and its four writes are dropped.
    c = one("0x0C00", "Instruction.CPUID")
    assert c.verdict == {"legacy": "legacy-silent", "hardened": "hardened-refuses"}
    assert c.refusals() and all(
        r.missing_inputs == ["r12", "r13"] and r.missing_outputs == ["r12", "r13", "r14", "r15"] for r in c.refusals()
    )
    assert c.silences() and all(
        r.zero_reads == ["r12", "r13"] and r.dropped_writes == ["r12", "r13", "r14", "r15"] for r in c.silences()
    )


def test_unexposed_r11_runs_another_leaf_today():
    # 0x1400 = r10 r12: with R11 unexposed KVM reads leaf 0, which it does not know (SUBFUNC_UNSUPPORTED);
    # hardened refuses because R11 (a selector) is missing.
    c = one("0x1400", "RDMSR")
    assert c.verdict == {"legacy": "legacy-silent", "hardened": "hardened-refuses"}
    assert all("r11" in r.missing_inputs for r in c.refusals())
    assert all(r.zero_reads[:1] == ["r11"] and r.dispatched != "Instruction.RDMSR" for r in c.silences())


def test_unexposed_r10_is_refused_as_an_internal_error():
    # 0x1800 = r11 r12: no R10, no status can reach the guest (tdx.py policy (b))
    c = one("0x1800", "RDMSR")
    assert c.verdict["hardened"] == "hardened-refuses"
    assert all(r.kvm_verdict == "internal_error" for r in c.refusals())


@pytest.mark.parametrize("mask", ["0x1C01", "0x1C02", "0x1C10", "0x100001C00"])
def test_forbidden_bits_are_rejected_whatever_the_attributes(mask):
    # RAX, RCX, RSP bits and reserved bits 63:32 are refused by every module (docs/abi.md §3)
    for host in (KVM, Host(no_rbp_mod=False), Host(module="1.0")):
        c = one(mask, "RDMSR", host)
        assert c.verdict == {"legacy": "module-rejects", "hardened": "module-rejects"}
        assert c.module.status == TDX_OPERAND_INVALID_RCX


def test_xmm_exposure_is_noted():
    # bit 16 = xmm0 (docs/abi.md §3); no leaf uses XMMs
    c = one("0x11C00", "RDMSR")
    assert c.verdict == {"legacy": "ok", "hardened": "ok"}
    assert any("xmm0" in n for n in c.notes)


@settings(max_examples=60, deadline=None)
@given(mask=st.integers(0, 0xFFFF), leaf=st.sampled_from(ALL_KVM_CALLS))
def test_hardened_ok_exactly_when_the_minimal_masks_are_covered(mask, leaf):
    """The model's verdict agrees with the leaf table: hardened passes iff the module accepts the mask
    (no RAX RCX RSP RBP bits under NO_RBP_MOD: 0x0033) and the mask covers the minimal mask of every
    case; and whenever hardened passes, today's KVM reads nothing as zero and drops nothing."""
    c = one(hex(mask), leaf)
    covered = all(L.minimal_mask(c.call.leaf, case.regs) & ~mask == 0 for case in c.call.leaf.cases)
    accepted = mask & 0x0033 == 0
    assert (c.verdict["hardened"] == "ok") == (accepted and covered)
    if c.verdict["hardened"] == "ok":
        assert c.verdict["legacy"] == "ok"


# --- the command ------------------------------------------------------------------------------------------
def test_default_run_exit_status_and_summary():
    # the shipped catalog has failing calls under hardened (the 0xFFEC rows, coconut's fatal-error GPA
    # case): exit 1, and the table ends with the summary line
    r = invoke()
    assert r.exit_code == 1
    assert "sites" in r.stdout and "hardened:" in r.stdout and "legacy:" in r.stdout
    assert "module-rejects" in r.stdout and "linux" in r.stdout


def test_what_if_exit_statuses():
    assert invoke("--mask", "0x1C00", "--call", "Instruction.RDMSR").exit_code == 0
    assert invoke("--mask", "0x0C00", "--call", "Instruction.CPUID").exit_code == 1
    assert invoke("--mask", "0x0C00", "--call", "Instruction.CPUID", "--policy", "legacy").exit_code == 1
    assert invoke("--mask", "0xFFEC", "--call", "CPUID").exit_code == 1
    assert invoke("--mask", "0xFFEC", "--call", "CPUID", "--rbp-mod").exit_code == 0


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--mask", "0xZZ"], "mask"),
        (["--mask", "0x1C00", "--call", "RDMSRX"], "RDMSRX"),
        (["--call", "RDMSR"], "--call"),
        (["--policy", "strict"], "--policy"),
        (["--module", "2.0"], "--module"),
        (["--catalog", "/nonexistent.csv"], "/nonexistent.csv"),
        (["--guest", "windows"], "--guest"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, needle):
    r = invoke(*args)
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0]


def test_bad_catalog_rows_are_named_and_the_rest_is_checked(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text(
        "guest,snapshot,file,function,mask_hex,tdvmcalls,note\n"
        "fw,1,a.c,good_rdmsr,0x1C00,RDMSR,\n"
        "fw,1,a.c,bad_mask,0xZZ,RDMSR,\n"
        "fw,1,a.c,bad_call,0x1C00,RDMSR FROB,\n"
    )
    r = invoke("--catalog", str(path), "--json")
    assert r.exit_code == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 2
    assert "row 3, field mask_hex" in err[0] and "row 4, field tdvmcalls" in err[1] and "FROB" in err[1]
    doc = json.loads(r.stdout)
    assert [x["function"] for x in doc["results"]] == ["good_rdmsr"]
    assert doc["results"][0]["verdict"] == {"legacy": "ok", "hardened": "ok"} and len(doc["errors"]) == 2
    # the terminal's first lines say so before anything else
    r = invoke("--catalog", str(path))
    assert r.exit_code == 2
    head = r.stdout[: r.stdout.index("No findings")]  # before the findings and the tables
    assert "ERROR: 2 bad catalog rows not checked" in head


def test_catalog_missing_columns(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("guest,mask\nx,0x1C00\n")
    r = invoke("--catalog", str(path))
    assert r.exit_code == 2 and "missing column" in r.stderr


def test_json_and_markdown_outputs():
    doc = json.loads(invoke("--mask", "0x0C00", "--call", "CPUID", "--json").stdout)
    (res,) = doc["results"]
    assert doc["schema"] == 1 and doc["passed"] is False and doc["policy"] == "hardened"
    assert res["call"] == "Instruction.CPUID" and res["verdict"]["hardened"] == "hardened-refuses"
    assert res["hardened_refusals"][0]["missing_inputs"] == ["r12", "r13"]
    assert doc["summary"]["hardened"]["hardened-refuses"] == 1 and doc["summary"]["sites"] == 1
    md = invoke("--mask", "0x1C00", "--call", "RDMSR", "--markdown").stdout
    assert md.startswith("# tdvmcall check") and "| Instruction.RDMSR | ok | ok |" in md


def test_module_status_in_json_is_decoded():
    doc = json.loads(invoke("--mask", "0xFFEC", "--call", "HLT", "--json").stdout)
    m = doc["results"][0]["module"]
    assert m["status"] == "0xc000010000000001" and m["status_name"] == "TDX_OPERAND_INVALID"
    assert m["operand"] == "OPERAND_ID_RCX" and not m["accepted"]


def test_html_file_is_self_contained(tmp_path):
    out = tmp_path / "r.html"
    r = invoke("--guest", "openvmm", "--html", str(out))
    assert r.exit_code == 0  # openvmm's calls all pass or are not KVM's
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and 'id="matrix"' in page
    assert "http://" not in page and "https://" not in page and "<link" not in page


def test_every_shipped_row_is_checked(shipped):
    # one result per (site, call), and every catalog row became a site
    results = check_sites(shipped, KVM)
    assert len(results) == sum(len(s.calls) for s in shipped)
    rows = [line for line in shipped_catalog_text().splitlines()[1:] if line.strip()]
    assert len(shipped) == len(rows)


def test_check_call_matches_check_sites():
    s = what_if("0xFC00", ["IO"])
    assert check_call(s, s.calls[0], KVM).verdict == check_sites([s], KVM)[0].verdict


# --- the first screen ---------------------------------------------------------------------------------
def test_the_answer_comes_first():
    """The verdict, the counts and the findings come before the per-guest tables, so that the first
    40 lines answer: the findings of the shipped catalog are the three 0xFFEC rows the module
    rejects (RBP under NO_RBP_MOD, docs/abi.md §3) and COCONUT-SVSM's ReportFatalError without R13."""
    r = invoke()
    lines = r.stdout.splitlines()
    assert lines[1].startswith("FAIL under --policy hardened: 4 of 41 sites, 20 of 148 calls do not pass (exit 1)")
    assert " ".join(lines[2].split()) == "hardened: 121 ok, 7 not-kvm, 1 hardened-refuses, 19 module-rejects"
    assert " ".join(lines[3].split()) == "legacy: 121 ok, 7 not-kvm, 1 legacy-silent, 19 module-rejects"
    findings_at = next(i for i, line in enumerate(lines) if line.startswith("Findings (4)"))
    first_table = next(i for i, line in enumerate(lines) if line.split()[:2] == ["site", "mask"])
    assert findings_at < first_table
    findings = "\n".join(lines[findings_at:first_table])
    # every failing site, with its verdict and why, in order (worst first)
    order = [findings.index(s) for s in ("td-shim AP mailbox", "edk2 AsmRelocateApMailBoxLoop", "edk2 TdVmCall")]
    assert order == sorted(order) and findings.count("module-rejects") == 3 and findings.count("rbp") == 3
    assert findings.index("edk2 TdVmCall") < findings.index("coconut-svsm")
    coconut = findings[findings.index("hardened-refuses") :]  # the last finding (rich wraps long cells)
    assert "coconut-svsm" in coconut and "r13" in coconut and "with-gpa" in coconut and "legacy-silent" in coconut
    head = "\n".join(lines[:40])
    assert all(s in head for s in ("coconut-svsm", "tdvmcall_report_fatal_error", "every KVM call (17)"))
    # one row per site: the Linux row's hypercalls are collapsed, no per-call row
    assert "KVM-hypercall×6" in r.stdout and "KICK_CPU" not in r.stdout


def test_per_call_details_only_with_verbose():
    # COCONUT-SVSM's ReportFatalError: the case's input values (R12 with bit 63 set, docs/abi.md §4) and
    # the catalog's remarks are per-call details
    gpa_case = "r12=0x8000000000010000"
    plain = invoke("--guest", "coconut-svsm").stdout
    verbose = invoke("--guest", "coconut-svsm", "--verbose").stdout
    assert gpa_case not in plain and gpa_case in verbose
    # the Linux row makes six KVM hypercalls: one per line with --verbose only
    plain = invoke("--guest", "linux").stdout
    verbose = invoke("--guest", "linux", "-v").stdout
    assert "KICK_CPU" not in plain and "SEND_IPI" not in plain
    assert "KICK_CPU" in verbose and "SEND_IPI" in verbose and "catalog: KVM-hypercall(R10!=0)" in verbose
    # JSON and Markdown always carry them
    doc = json.loads(invoke("--guest", "coconut-svsm", "--json").stdout)
    (fatal,) = [x for x in doc["results"] if x["call"] == "ReportFatalError"]
    assert any(gpa_case in d for d in fatal["details"])
    assert gpa_case in invoke("--guest", "coconut-svsm", "--markdown").stdout


def test_over_exposure_is_noted_once_per_site(tmp_path):
    # 0xFF00 = r8..r15.  HLT and RDMSR use r10 r11 r12, CPUID r10..r15: r8 r9 are used by none of
    # the three, so the site exposes r8 r9 for nothing (r13..r15 are CPUID's)
    path = tmp_path / "fw.csv"
    path.write_text("guest,snapshot,file,function,mask_hex,tdvmcalls,note\nfw,1,a.c,vmcall,0xFF00,HLT RDMSR CPUID,\n")
    for args in ((), ("--verbose",), ("--markdown",)):
        out = invoke("--catalog", str(path), *args).stdout
        assert out.count("r8 r9") == 1, args
        assert "exposed but unused" not in out, args  # the per-call notes are not repeated
    assert "exposed for" in invoke("--catalog", str(path), "--verbose").stdout
    # the JSON keeps each call's own notes and adds the site's
    doc = json.loads(invoke("--catalog", str(path), "--json").stdout)
    assert [x["unused"] for x in doc["results"]] == [["r8", "r9", "r13", "r14", "r15"]] * 2 + [["r8", "r9"]]
    (site_doc,) = doc["sites"]
    assert site_doc["exposed_for_nothing"] == ["r8", "r9"] and site_doc["results"] == [0, 1, 2]


def test_json_findings():
    doc = json.loads(invoke("--json").stdout)
    found = doc["findings"]
    # the three 0xFFEC rows (module) then COCONUT-SVSM's ReportFatalError (hardened, legacy)
    assert [(f["guest"], f["mask"], f["verdict"]["hardened"]) for f in found] == [
        ("td-shim", "0xffec", "module-rejects"),
        ("edk2", "0xffec", "module-rejects"),
        ("edk2", "0xffec", "module-rejects"),
        ("coconut-svsm", "0x1c00", "hardened-refuses"),
    ]
    assert len(found[2]["calls"]) == len(ALL_KVM_CALLS) and found[3]["calls"] == ["ReportFatalError"]
    assert found[3]["verdict"]["legacy"] == "legacy-silent" and "r13" in found[3]["why"]
    for f in found:
        assert all(doc["results"][i]["function"] == f["function"] for i in f["results"])
    assert len(doc["sites"]) == 41 and sum(len(s["results"]) for s in doc["sites"]) == 148


def test_catalog_from_standard_input():
    # '-' reads the catalog from stdin: the same CSV columns, the same verdicts as from a file.
    # RDMSR with 0x1C00 (r10 r11 r12) is ok under both (abi.md §4: RDMSR reads R12, writes R11);
    # 0x0C00 (r10 r11) lacks R12, the index: hardened refuses, legacy reads it as 0.
    csv_text = (
        "guest,snapshot,file,function,mask_hex,tdvmcalls,note\n"
        "fw,1,a.c,good,0x1C00,RDMSR,\n"
        "fw,1,a.c,short,0x0C00,RDMSR,\n"
    )
    r = runner.invoke(app, ["check", "--catalog", "-", "--json"], input=csv_text)
    assert r.exit_code == 1, r.output
    doc = json.loads(r.stdout)
    assert doc["catalog"] == "standard input"
    verdicts = {x["function"]: x["verdict"] for x in doc["results"]}
    assert verdicts == {
        "good": {"legacy": "ok", "hardened": "ok"},
        "short": {"legacy": "legacy-silent", "hardened": "hardened-refuses"},
    }
    # a bad row is named after standard input; empty or non-UTF-8 stdin is one line, exit 2
    r = runner.invoke(app, ["check", "--catalog", "-"], input=csv_text + "fw,1,a.c,bad,0xZZ,RDMSR,\n")
    assert r.exit_code == 2 and "standard input row 4, field mask_hex" in r.stderr
    for data, needle in ((b"", "missing column"), (b"\xff", "not UTF-8")):
        r = runner.invoke(app, ["check", "--catalog", "-"], input=data)
        assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr


@pytest.mark.parametrize(
    ("args", "attribute"),
    [
        # docs/abi.md §3: gpr_select bit 5 (RBP) is refused only by a 1.5 module for a TD with NO_RBP_MOD;
        # the attribute does not exist on 1.0, whatever --no-rbp-mod says.
        (["--module", "1.0"], False),
        (["--module", "1.0.3", "--no-rbp-mod"], False),
        (["--module", "1.0", "--rbp-mod"], False),
        (["--module", "1.5"], True),
        (["--module", "1.5.05", "--rbp-mod"], False),
    ],
)
def test_json_host_claims_no_rbp_mod_only_where_the_module_has_it(args, attribute):
    r = invoke("--mask", "0xffec", "--call", "HLT", "--json", *args)
    doc = json.loads(r.stdout)
    assert doc["host"]["no_rbp_mod"] is attribute
    # what the screen says and what the module did agree with the JSON: RBP (0xffec has bit 5) is
    # refused exactly when the attribute is claimed
    [res] = doc["results"]
    assert res["module"]["accepted"] is (not attribute)
    screen = invoke("--mask", "0xffec", "--call", "HLT", *args).stdout
    assert ("with NO_RBP_MOD" in screen) is attribute

"""`tdvmcall check`: real guests' masks against the TDX module, today's KVM and the hardened one.

Every expected verdict below is derived by hand from ABI.md (§3 the module's control check, §4 the
leaf table, §6 the guests) and written beside the assertion; none is copied from the program.
Register names by mask bit (ABI.md §1): 2 rdx, 3 rbx, 5 rbp, 6 rsi, 7 rdi, 8..15 r8..r15.
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
    what_if,
)
from tdvmcall.cli import app
from tdvmcall.kvm import leaves as L

runner = CliRunner()
TDX_OPERAND_INVALID_RCX = 0xC000010000000001  # ABI.md §3: TDX_OPERAND_INVALID | operand id RCX (1)
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
    # catalog names -> leaf names; KVM-hypercall -> the six KVM hypercalls of ABI.md §4
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
    (cpuid,), _ = parse_calls("CPUID leaf 0xB")
    assert cpuid.name == "Instruction.CPUID" and cpuid.inputs == (("r12", 0xB),)
    calls, remarks = parse_calls("IO MMIO and other C callers")
    assert [c.name for c in calls] == ["Instruction.IO", "#VE.RequestMMIO"] and remarks == ["and other C callers"]
    # "all" alone: every call KVM implements, i.e. the GHCI leaves and the KVM hypercalls of the table
    calls, remarks = parse_calls("all (emulation build uses VMCALL)")
    assert [c.name for c in calls] == list(ALL_KVM_CALLS) and remarks == ["emulation build uses VMCALL"]
    assert set(ALL_KVM_CALLS) == {leaf.name for leaf in L.GHCI_LEAVES + L.KVM_HYPERCALLS}


@pytest.mark.parametrize("text", ["RDMSRX", "HLT (unbalanced", "", "CPUID leaf 0xZZ"])
def test_bad_call_field(text):
    with pytest.raises(CatalogError):
        parse_calls(text)


# --- the shipped catalog: expectations from ABI.md ----------------------------------------------------
def test_historical_rbp_rows_are_rejected_by_the_module(shipped):
    # 0xFFEC has bit 5 (RBP); a 1.5 module refuses it for a NO_RBP_MOD TD with TDX_OPERAND_INVALID
    # + operand RCX = 0xC000010000000001, and the VMM never sees the call (ABI.md §3).
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
    # 0xFFCC = rdx rbx rsi rdi r8..r15 (ABI.md §3: the widest legal mask under NO_RBP_MOD).
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
    # (ABI.md §4): the with-gpa case is refused (hardened) and reads r13 as 0 (legacy); code-only is fine.
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


# --- what-ifs -------------------------------------------------------------------------------------------
def test_cpuid_with_only_the_selectors():
    # 0x0C00 = r10 r11. CPUID reads r12 r13 and writes r12..r15 (ABI.md §4): hardened refuses every
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
    # RAX, RCX, RSP bits and reserved bits 63:32 are refused by every module (ABI.md §3)
    for host in (KVM, Host(no_rbp_mod=False), Host(module="1.0")):
        c = one(mask, "RDMSR", host)
        assert c.verdict == {"legacy": "module-rejects", "hardened": "module-rejects"}
        assert c.module.status == TDX_OPERAND_INVALID_RCX


def test_xmm_exposure_is_noted():
    # bit 16 = xmm0 (ABI.md §3); no leaf uses XMMs
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

"""Issue 10, fidelity: the model against upstream KVM and the TDX module, one block per finding.

Every expected value is read off the upstream source named in the block (re-expressed, with the
function), or off the platform values the test supplies itself; none is read back from the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tdvmcall.abi import codes
from tdvmcall.cli import app
from tdvmcall.kvm import leaves as L
from tdvmcall.scenario import run_json
from tdvmcall.trace.rows import is_tdvmcall_reason, parse_reason
from tdvmcall.trace.verdict import verdict_for

H = lambda v: f"0x{v:016x}"  # noqa: E731  the contract's register format
INVALID_OPERAND = 0x8000000000000000
SUBFUNC_UNSUPPORTED = 0x8000000000000003
OPERAND_INVALID_RAX = 0xC000010000000000
LINUX = "0xFFCC"
runner = CliRunner()


def run(guest, policy="hardened", td=None, platform=None, tree="kvm-x86"):
    return run_json(
        {"td": td or {}, "kvm": {"policy": policy, "tree": tree}, "guest": guest, "platform": platform or {}}
    )


# --- 1. MSRs KVM emulates for a TD (kvm-x86 tdx.c tdx_has_emulated_msr(), tdx_get_msr(), tdx_set_msr(),
#        tdx_complete_emulated_msr()) --------------------------------------------------------------
#: x2APIC MSRs the TDX module virtualises, which KVM's allow-list leaves out: TPR, PPR, EOI, ISR0,
#: ISR7, TMR0, IRR7, SELF_IPI, and unused indices 0x800, 0x801, 0x840, 0x8FF
NOT_EMULATED = [0x808, 0x80A, 0x80B, 0x810, 0x817, 0x818, 0x827, 0x83F, 0x800, 0x801, 0x840, 0x8FF]


@pytest.mark.parametrize("policy", ["legacy", "hardened"])
@pytest.mark.parametrize("index", NOT_EMULATED)
def test_rdmsr_of_an_apic_msr_the_module_virtualises_is_invalid_operand(policy, index):
    # a value in KVM's table does not make the MSR accessible: the allow-list decides
    r = run({"rcx": LINUX, "r11": 31, "r12": index}, policy, platform={"msrs": {hex(index): "0x55"}})
    assert r["kvm"]["status"] == H(INVALID_OPERAND)
    assert r["guest"]["r11"] == H(31)  # R11 untouched on failure


@pytest.mark.parametrize("index", [0x808, 0x80B])
def test_wrmsr_tpr_and_eoi_fail(index):
    r = run({"rcx": LINUX, "r11": 32, "r12": index, "r13": 0x10})
    assert r["kvm"]["status"] == H(INVALID_OPERAND)
    assert r["kvm"]["userspace_exits"] == []


@pytest.mark.parametrize(
    "index",
    [0x802, 0x803, 0x80D, 0x80F, 0x828, 0x830, 0x832, 0x837, 0x838, 0x839, 0x83E, 0x6E0, 0x8B, 0x4B564D05],
)
def test_rdmsr_of_an_emulated_msr_returns_its_value(index):
    r = run({"rcx": LINUX, "r11": 31, "r12": index}, platform={"msrs": {hex(index): "0x1234"}})
    assert r["kvm"]["status"] is None and r["guest"]["r10"] == H(0)
    assert r["guest"]["r11"] == H(0x1234)


def test_wrmsr_of_an_emulated_msr_succeeds_and_read_only_ones_fail():
    ok = run({"rcx": LINUX, "r11": 32, "r12": 0x6E0, "r13": 0x99})  # IA32_TSC_DEADLINE
    assert ok["kvm"]["status"] is None and ok["guest"]["r10"] == H(0)
    for index in (0x1B, 0xC0000080, 0x3A):  # APICBASE, EFER, FEAT_CTL: tdx_is_read_only_msr()
        r = run({"rcx": LINUX, "r11": 32, "r12": index, "r13": 0})
        assert r["kvm"]["status"] == H(INVALID_OPERAND), hex(index)


def test_feat_ctl_is_synthesised_from_mcg_cap():
    # LOCKED (bit 0); LMCE_ENABLED (bit 20) when MCG_CAP has LMCE_P (bit 27)
    assert run({"rcx": LINUX, "r11": 31, "r12": 0x3A})["guest"]["r11"] == H(0x1)
    lmce = {"msrs": {"0x179": hex(1 << 27)}}
    assert run({"rcx": LINUX, "r11": 31, "r12": 0x3A}, platform=lmce)["guest"]["r11"] == H(0x100001)


def test_mcg_ext_ctl_needs_lmce_and_takes_only_bit_0():
    lmce = {"msrs": {"0x179": hex(1 << 27), "0x4d0": "0x1"}}
    assert run({"rcx": LINUX, "r11": 31, "r12": 0x4D0})["kvm"]["status"] == H(INVALID_OPERAND)
    assert run({"rcx": LINUX, "r11": 31, "r12": 0x4D0}, platform=lmce)["guest"]["r11"] == H(1)
    assert run({"rcx": LINUX, "r11": 32, "r12": 0x4D0, "r13": 2}, platform=lmce)["kvm"]["status"] == H(INVALID_OPERAND)
    assert run({"rcx": LINUX, "r11": 32, "r12": 0x4D0, "r13": 1}, platform=lmce)["kvm"]["status"] is None


def test_v6_16_deny_list_caught_only_the_first_msr_of_each_bank():
    # KT0511/linux-6.16.1 tdx_has_emulated_msr(): X2APIC_MSR(APIC_ISR + APIC_ISR_NR) is X2APIC_MSR(APIC_ISR)
    for index, ok in ((0x810, False), (0x811, True), (0x808, False), (0x819, True)):
        r = run({"rcx": LINUX, "r11": 31, "r12": index}, tree="v6.16")
        assert (r["kvm"]["status"] is None) == ok, hex(index)


# --- 1b. KVM's lapic emulation behind the TDX filter (KT0511/linux-6.16.1 @30b97c8 arch/x86/kvm/lapic.c:
#         kvm_x2apic_msr_read/write(), kvm_lapic_msr_read/write(), kvm_lapic_readable_reg_mask(),
#         kvm_lapic_reg_write(), kvm_x2apic_icr_write(); x86.c kvm_get/set_msr_common() hand 0x800..0x8FF
#         to them) -------------------------------------------------------------------------------------
def wrmsr(index, value, tree="kvm-x86", platform=None):
    return run({"rcx": LINUX, "r11": 32, "r12": index, "r13": hex(value)}, tree=tree, platform=platform)["kvm"]


def rdmsr(index, tree="kvm-x86", platform=None):
    return run({"rcx": LINUX, "r11": 31, "r12": index}, tree=tree, platform=platform)["kvm"]


@pytest.mark.parametrize(
    "index,value",
    [
        (0x839, 1),  # TMCCT: not in kvm_lapic_reg_write()'s switch, default: ret = 1
        (0x828, 1),  # ESR: x2APIC mode and val != 0
        (0x830, 1 << 20),  # ICR: X2APIC_ICR_RESERVED_BITS = 31:20, 17:16, 13
        (0x830, 1 << 16),
        (0x830, 1 << 13),
        (0x838, 1 << 32),  # TMICT: kvm_lapic_msr_write(), bits 63:32 reserved in every register but ICR
        (0x802, 0),  # ID, LDR: x2APIC mode, ret = 1; LVR: default
        (0x80D, 0),
        (0x803, 0),
    ],
    ids=hex,
)
def test_wrmsr_kvms_lapic_refuses_is_invalid_operand(index, value):
    k = wrmsr(index, value)
    assert k["status"] == H(INVALID_OPERAND), hex(index)


@pytest.mark.parametrize(
    "index,value",
    [(0x828, 0), (0x830, 1 << 32 | 0x30), (0x830, 1 << 12 | 0x30), (0x838, 0xFFFF_FFFF), (0x83E, 0xB), (0x80F, 0x1FF)],
    ids=hex,
)
def test_wrmsr_kvms_lapic_accepts_succeeds(index, value):
    # ESR 0, an ICR with a destination in 63:32 (and BUSY, bit 12, which KVM clears), TMICT, TDCR, SPIV
    k = wrmsr(index, value)
    assert k["status"] is None and k["wrote"] == {}, hex(index)


def test_lvtcmci_exists_only_with_mcg_cap_cmci_p():
    # kvm_apic_calc_nr_lvt_entries(): one LVT fewer without MCG_CAP.CMCI_P (bit 10), and LVTCMCI is then
    # neither in kvm_lapic_readable_reg_mask() nor kvm_lapic_lvt_supported() for kvm_lapic_reg_write()
    assert rdmsr(0x82F)["status"] == H(INVALID_OPERAND)
    assert wrmsr(0x82F, 0x10000)["status"] == H(INVALID_OPERAND)
    cmci = {"msrs": {"0x179": hex(1 << 10), "0x82f": "0x10000"}}
    assert rdmsr(0x82F, platform=cmci)["status"] is None
    assert wrmsr(0x82F, 0x10000, platform=cmci)["status"] is None


def test_x2apic_msrs_fail_outside_x2apic_mode():
    # kvm_x2apic_msr_read(): !apic_x2apic_mode() -> 1; APICBASE 0xFEE00900: enabled, x2APIC bit 10 clear
    assert rdmsr(0x802, platform={"msrs": {"0x1b": "0xFEE00900"}})["status"] == H(INVALID_OPERAND)
    assert rdmsr(0x802)["status"] is None


@pytest.mark.parametrize(
    "index",
    [0x83F, 0x840, 0x8FF, 0x800, 0x801, 0x804, 0x809, 0x80C, 0x80E, 0x829, 0x82E, 0x831, 0x83A, 0x83D],
    ids=hex,
)
def test_v6_16_reads_of_what_lapic_cannot_read_fail(index):
    # past the v6.16 deny-list, kvm_lapic_reg_read(): offset > 0x3F0 or not in kvm_lapic_readable_reg_mask()
    # (reserved, SELF_IPI write-only, ARBPRI/DFR/ICR2 not valid in x2APIC mode)
    assert rdmsr(index, tree="v6.16")["status"] == H(INVALID_OPERAND), hex(index)


def test_v6_16_isr_reads_but_does_not_write_and_self_ipi_takes_a_vector():
    assert rdmsr(0x811, tree="v6.16")["status"] is None  # ISR1: readable
    for index in (0x811, 0x819, 0x821, 0x839):  # ISR, TMR, IRR, TMCCT: default, ret = 1
        assert wrmsr(index, 0, tree="v6.16")["status"] == H(INVALID_OPERAND), hex(index)
    assert wrmsr(0x83F, 0x30, tree="v6.16")["status"] is None  # SELF_IPI: bits 7:0, the vector
    assert wrmsr(0x83F, 0x130, tree="v6.16")["status"] == H(INVALID_OPERAND)
    assert wrmsr(0x83F, 0x30)["status"] == H(INVALID_OPERAND)  # kvm-x86: not on the allow-list


def test_the_leaf_tables_msr_cases_use_msrs_kvm_emulates():
    emulated = {0x802, 0x803, 0x80D, 0x80F, 0x828, 0x82F, 0x830, 0x832, 0x833, 0x834, 0x835, 0x836, 0x837, 0x838}
    emulated |= {0x839, 0x83E, 0x6E0, 0x8B, 0x10A, 0x1FC, 0x277, 0x1A0, 0xCE, 0x140}
    for name in ("Instruction.RDMSR", "Instruction.WRMSR"):
        for case in L.by_name(name).cases:
            if not case.name.startswith("unknown"):
                assert case.regs["r12"] in emulated, (name, case.name)
    assert [c.name for c in L.by_name("Instruction.WRMSR").cases] == ["tsc-deadline", "unknown-msr"]


# --- 2. CPUID out of range (kvm-x86 cpuid.c get_out_of_range_cpuid_entry(), kvm_cpuid(); tdx.c
#        tdx_emulate_cpuid() passes exact_only = false) ---------------------------------------------
def _entry(leaf, eax, ebx=0, ecx=0, edx=0, subleaf=0):
    return {"leaf": leaf, "subleaf": subleaf, "eax": eax, "ebx": ebx, "ecx": ecx, "edx": edx}


INTEL = (0x756E6547, 0x6C65746E, 0x49656E69)  # "Genu" (EBX) "ntel" (ECX) "ineI" (EDX)
AMD = (0x68747541, 0x444D4163, 0x69746E65)  # "Auth" (EBX) "cAMD" (ECX) "enti" (EDX)


def cpuid_table(vendor=INTEL, max_basic=0xD):
    """Entries added to (and replacing) the default table, which also has 0x1, 0x7, 0xB, 0x40000001,
    0x80000008 (scenario.md); the leaves tested below have no entry in either."""
    ebx, ecx, edx = vendor
    return [
        {"leaf": 0, "subleaf": 0, "eax": max_basic, "ebx": ebx, "ecx": ecx, "edx": edx},
        _entry(0xD, 0xD0, 0xD1, 0xD2, 0xD3),
        _entry(0xD, 0xE0, 0xE1, 0xE2, 0xE3, subleaf=1),
        _entry(0x40000000, 0x40000003, 0x4B4D564B),
        _entry(0x80000000, 0x80000008),
    ]


def cpuid(leaf, subleaf=0, table=None):
    r = run({"rcx": LINUX, "r11": 10, "r12": leaf, "r13": subleaf}, platform={"cpuid": table or cpuid_table()})
    g = r["guest"]
    assert r["kvm"]["status"] is None  # tdx_emulate_cpuid() never writes R10
    return tuple(int(g[x], 16) for x in ("r12", "r13", "r14", "r15"))


MAX_BASIC_0 = (0xD0, 0xD1, 0xD2, 0xD3)  # leaf 0xD sub-leaf 0 of the table above
MAX_BASIC_1 = (0xE0, 0xE1, 0xE2, 0xE3)  # leaf 0xD sub-leaf 1


@pytest.mark.parametrize(
    "leaf,subleaf,want",
    [
        (0xE, 0, MAX_BASIC_0),  # above the max basic leaf: the max basic leaf
        (0xE, 1, MAX_BASIC_1),  # ... looked up with the original sub-leaf
        (0x8, 0, (0, 0, 0, 0)),  # within range, no entry: zeros
        (0x50000000, 0, MAX_BASIC_0),  # 0x5000_0000.. belongs to the basic class
        (0x7FFFFFFF, 1, MAX_BASIC_1),
        (0x80000009, 0, MAX_BASIC_0),  # above the extended maximum 0x80000008
        (0x80000007, 0, (0, 0, 0, 0)),  # within range, no entry: zeros
        (0x40000002, 0, (0, 0, 0, 0)),  # within the range 0x40000000..0x40000003, no entry: zeros
        (0x40000004, 0, MAX_BASIC_0),  # above it
        (0x40000100, 0, MAX_BASIC_0),  # its own class (base 0x40000100), which has no entry
        (0xC0000001, 0, MAX_BASIC_0),  # Centaur class with no 0xC0000000 entry
        (0xFFFFFFFF, 0, MAX_BASIC_0),
    ],
)
def test_out_of_range_leaf_gets_the_max_basic_leaf(leaf, subleaf, want):
    assert cpuid(leaf, subleaf) == want


def test_a_hypervisor_sub_range_with_its_own_entry_is_its_own_class():
    table = cpuid_table() + [_entry(0x40000100, 0x40000105)]
    assert cpuid(0x40000103, table=table) == (0, 0, 0, 0)
    assert cpuid(0x40000106, table=table) == MAX_BASIC_0


def test_amd_and_hygon_get_zeros_and_an_unknown_vendor_gets_the_redirect():
    assert cpuid(0xE, table=cpuid_table(AMD)) == (0, 0, 0, 0)
    hygon = (0x6F677948, 0x656E6975, 0x6E65476E)  # "Hygo" (EBX) "uine" (ECX) "nGen" (EDX)
    assert cpuid(0x50000000, table=cpuid_table(hygon)) == (0, 0, 0, 0)
    assert cpuid(0xE, table=cpuid_table((0, 0, 0))) == MAX_BASIC_0


def test_max_basic_leaf_0xb_passes_the_sub_leaf_and_the_x2apic_id():
    # kvm_cpuid(): no entry for leaf 0xB/0x1F (after the redirect) but sub-leaf 1 exists:
    # ECX = index & 0xFF, EDX = sub-leaf 1's EDX
    table = [
        {"leaf": 0, "subleaf": 0, "eax": 0xB, "ebx": INTEL[0], "ecx": INTEL[1], "edx": INTEL[2]},
        _entry(0xB, 1, 2, 0x100, 7),
        _entry(0xB, 4, 8, 0x201, 7, subleaf=1),
    ]
    assert cpuid(0x50000000, 0x105, table) == (0, 0, 0x05, 7)
    assert cpuid(0xB, 1, table) == (4, 8, 0x201, 7)  # an existing sub-leaf: itself


# --- 3. MapGPA completion (kvm-x86 tdx.c tdx_complete_vmcall_map_gpa(); x86.h
#        kvm_is_valid_map_gpa_range_ret()) ----------------------------------------------------------
SHARED_4K = {"rcx": LINUX, "r11": "0x10001", "r12": hex(1 << 51 | 0x80000000), "r13": "0x1000", "r10": 0}


@pytest.mark.parametrize("policy", ["legacy", "hardened"])
@pytest.mark.parametrize("ret", [5, (-22) & (1 << 64) - 1, 1])
def test_map_gpa_with_an_unexpected_userspace_ret_fails_kvm_run(policy, ret):
    r = run(SHARED_4K, policy, platform={"userspace": {"hypercall_ret": [ret]}})
    k = r["kvm"]
    assert k["verdict"] == "run_failed" and k["resumed"] is False and k["run_error"] == "-EINVAL"
    assert k["status"] is None and k["wrote"] == {}  # no status reaches the guest
    assert len(k["userspace_exits"]) == 1
    # if userspace runs the vCPU again: the registers as the exit left them (R10 = its own 0)
    assert r["guest"]["r10"] == H(0) and r["guest"]["r11"] == H(0x10001)


def test_map_gpa_eagain_and_einval_still_reach_the_guest():
    start = 1 << 51 | 0x80000000
    again = run(SHARED_4K, platform={"userspace": {"hypercall_ret": [11]}})
    assert again["guest"]["r10"] == H(1) and again["guest"]["r11"] == H(start)  # RETRY, the refused chunk
    inval = run(SHARED_4K, platform={"userspace": {"hypercall_ret": [22]}})
    assert inval["guest"]["r10"] == H(INVALID_OPERAND) and inval["guest"]["r11"] == H(start)
    old = run(SHARED_4K, tree="v6.16", platform={"userspace": {"hypercall_ret": [5]}})
    assert old["kvm"]["verdict"] == "userspace" and old["guest"]["r10"] == H(INVALID_OPERAND)


def test_run_table_says_kvm_run_failed(tmp_path):
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"guest": SHARED_4K, "platform": {"userspace": {"hypercall_ret": [5]}}}))
    r = runner.invoke(app, ["run", str(f)], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    assert "run_failed" in r.stdout and "KVM_RUN fails with -EINVAL" in r.stdout


# --- 4. TDCALL leaves other than TDG.VP.VMCALL (tdx-module 1.5.01 tdx_td_dispatcher.c td_call(),
#        include/tdx_api_defs.h tdcall_leaf_opcode_t, tdg_vm_rd_wr.c) ---------------------------------
def test_tdcall_leaf_names():
    assert codes.TDCALL_LEAVES[0] == "TDG.VP.VMCALL" and codes.TDCALL_LEAVES[1] == "TDG.VP.INFO"
    assert codes.TDCALL_LEAVES[6] == "TDG.MEM.PAGE.ACCEPT" and codes.TDCALL_LEAVES[7] == "TDG.VM.RD"
    assert codes.TDCALL_LEAVES[22] == "TDG.MR.VERIFYREPORT" and codes.TDCALL_LEAVES[27] == "TDG.VP.INVVPID"
    assert sorted(codes.TDCALL_LEAVES) == [*range(13), 18, 20, *range(22, 28)]


@pytest.mark.parametrize(
    "rax,accepted",
    [
        (0, True),
        (1, True),
        (27, True),
        (13, False),  # unused leaf number
        (19, False),
        (28, False),
        (1 << 16, False),  # version 1 of TDG.VP.VMCALL
        (1 << 16 | 8, False),  # version 1 of TDG.VM.WR: the dispatcher lets only TDG.VM.RD past version 0
        (1 << 16 | 7, True),  # TDG.VM.RD version 1
        (2 << 16 | 7, False),  # refused by TDG.VM.RD itself
        (1 << 24, False),  # reserved bits 63:24
        (1 << 63 | 1, False),
    ],
)
def test_which_rax_the_module_accepts(rax, accepted):
    assert codes.tdcall_rax_accepted(rax) is accepted
    assert codes.check_tdcall_rax(rax) == (None if accepted else OPERAND_INVALID_RAX)


def test_tdg_vp_info_is_named_and_not_modelled():
    r = run({"rax": 1, "rcx": "0x1234", "rdx": 5})
    m = r["module"]
    assert m["not_modelled"] == "TDCALL leaf 1, TDG.VP.INFO: not a TDVMCALL, not modelled"
    assert m["status"] is None and m["exited"] is False and m["problems"] == []
    assert m["tdcall_leaf"] == {"leaf": 1, "version": 0, "name": "TDG.VP.INFO"}
    assert r["kvm"] is None and r["guest"] == r["guest_before"]


def test_tdcall_errors_the_module_really_returns():
    unknown = run({"rax": 13, "rcx": LINUX})
    assert unknown["module"]["status"] == H(OPERAND_INVALID_RAX) and unknown["guest"]["rip"] == H(0x1004)
    # TDG.VM.RD version 2: RDX = MD_FIELD_ID_NA (all ones), R8 = 0 before the version check fails
    vm_rd = run({"rax": hex(2 << 16 | 7), "rcx": LINUX, "rdx": 5, "r8": 6, "r9": 7})
    g = vm_rd["guest"]
    assert vm_rd["module"]["status"] == H(OPERAND_INVALID_RAX)
    assert (g["rax"], g["rdx"], g["r8"], g["r9"]) == (H(OPERAND_INVALID_RAX), H((1 << 64) - 1), H(0), H(7))


def test_decode_names_the_tdcall_leaf():
    d = json.loads(runner.invoke(app, ["decode", "1", "--as", "tdcall-rax", "--json"]).stdout)
    assert (d["leaf"], d["name"], d["accepted"], d["tdvmcall"]) == (1, "TDG.VP.INFO", True, False)
    d = json.loads(runner.invoke(app, ["decode", "0x1000D", "--as", "tdcall-rax", "--json"]).stdout)
    assert d["name"] is None and d["accepted"] is False and d["status"] == OPERAND_INVALID_RAX


# --- 5. RBP without NO_RBP_MOD (tdx-module tdh_vp_enter.c save_regs_after_tdvmcall(); Linux
#        struct tdx_module_args has no RBP; tdx.c check_features(), setup_tdparams()) ----------------
@pytest.mark.parametrize(
    "td,cause",
    [
        ({"module": "1.5", "no_rbp_mod": False}, "the guest exposed RBP on a TD without NO_RBP_MOD: "),
        ({"module": "1.0", "no_rbp_mod": False}, "the guest exposed RBP on TDX module 1.0, which does not check RBP"),
        # module 1.0 lets RBP through whatever the TD's NO_RBP_MOD says (checks_rbp()): the warning
        # must not claim the TD lacks it
        ({"module": "1.0"}, "the guest exposed RBP on TDX module 1.0, which does not check RBP"),
    ],
)
def test_exposed_rbp_comes_back_as_a_host_value_with_a_warning_naming_the_cause(td, cause):
    r = run({"rcx": "0xFFEC", "r11": 10, "r12": 1, "rbp": "0x77"}, td=td)
    assert r["module"]["exited"] is True
    assert r["guest_unknown"] == ["rbp"] and r["guest"]["rbp"] == H(0)  # the placeholder, not 0x77
    assert len(r["warnings"]) == 1 and r["warnings"][0].startswith(cause)
    assert "Upstream KVM never runs such a TD" in r["warnings"][0]


def test_module_1_5_with_no_rbp_mod_refuses_rbp_in_the_control():
    # tdg_vp_vmcall(): with NO_RBP_MOD the GPR mask must not select bit 5, else TDX_OPERAND_INVALID with
    # operand id RCX (1): RAX = 0xC000010000000001; nothing reaches KVM, RBP is left alone
    r = run({"rcx": "0xFFEC", "r11": 10, "r12": 1, "rbp": "0x77"}, td={"module": "1.5", "no_rbp_mod": True})
    assert r["module"]["status"] == H(0xC000010000000001) and r["kvm"] is None
    assert r["guest"]["rax"] == H(0xC000010000000001) and r["guest"]["rbp"] == H(0x77)
    assert r["guest_unknown"] == [] and r["warnings"] == []


def test_no_rbp_mod_with_rbp_unexposed_gives_the_guest_its_own_rbp():
    # the same RBP comes back: save_regs_after_tdvmcall() copies only selected GPRs
    r = run({"rcx": LINUX, "r11": 10, "r12": 1, "rbp": "0x77"}, td={"module": "1.5", "no_rbp_mod": True})
    assert r["kvm"]["status"] is None
    assert r["guest"]["rbp"] == H(0x77) and r["guest_unknown"] == [] and r["warnings"] == []


def test_unexposed_rbp_keeps_its_value_without_no_rbp_mod():
    r = run({"rcx": LINUX, "r11": 10, "r12": 1, "rbp": "0x77"}, td={"no_rbp_mod": False})
    assert r["guest"]["rbp"] == H(0x77) and r["guest_unknown"] == [] and r["warnings"] == []


# --- bus-lock exits (tdx-module tdg_vp_vmcall.c: bit 26 of the exit reason; kvm-x86 tdx.c
#     tdx_to_vmx_exit_reason() compares the whole reason, handle_tdvmcall() switches on R11;
#     trace.h kvm_print_exit_reason) ------------------------------------------------------------------
BUS = {"bus_lock": True}


@pytest.mark.parametrize("policy", ["legacy", "hardened"])
def test_bus_lock_cpuid_gets_subfunc_unsupported_and_is_traced_as_tdcall(policy):
    r = run({"rcx": LINUX, "r11": 10, "r12": 1, "r13": 0}, policy, td=BUS)
    assert r["module"]["status"] == H(0x0400004D)
    k = r["kvm"]
    assert k["bus_lock"] is True and k["exit_reason"] == H(0x0400004D) and k["trace_reason"] == "TDCALL 0x4000000"
    assert k["status"] == H(SUBFUNC_UNSUPPORTED) and r["guest"]["r12"] == H(1)  # R12 not the CPUID answer


def test_without_bus_lock_the_same_cpuid_is_relabelled():
    k = run({"rcx": LINUX, "r11": 10, "r12": 1})["kvm"]
    assert (k["bus_lock"], k["trace_reason"], k["exit_reason"]) == (False, "CPUID", H(10))


def test_bus_lock_keeps_the_vendor_leaves_and_misdispatches_hypercalls():
    # GetTdVmCallInfo leaf 0 still answered: R10 = 0, R11..R14 = 0
    info = run({"rcx": LINUX, "r11": "0x10000", "r12": 0, "r13": 9}, td=BUS)
    assert info["kvm"]["leaf"] == "GetTdVmCallInfo" and info["guest"]["r13"] == H(0)
    # SCHED_YIELD (R10 = 11, a0 = R11 = 1): R11 is not a vendor leaf -> SUBFUNC_UNSUPPORTED in R10
    yld = run({"rcx": LINUX, "r10": 11, "r11": 1}, td=BUS)
    assert yld["guest"]["r10"] == H(SUBFUNC_UNSUPPORTED) and yld["kvm"]["userspace_exits"] == []
    # a hypercall whose a0 is 0x10000: taken for GetTdVmCallInfo, R10 = 0 and R11..R14 = 0
    mis = run({"rcx": LINUX, "r10": 5, "r11": "0x10000", "r12": 0, "r13": 3}, td=BUS)
    assert mis["kvm"]["leaf"] == "GetTdVmCallInfo"
    assert (mis["guest"]["r10"], mis["guest"]["r11"], mis["guest"]["r13"]) == (H(0), H(0), H(0))


def test_only_bit_26_is_a_bus_lock_but_any_flag_bit_stops_the_relabelling():
    # tdx_to_vmx_exit_reason() compares all 32 bits with TDCALL, tdx_handle_exit() switches on bits
    # 15:0: a reason TDCALL | bit 27 (which the module never sets) is not re-labelled either, and goes
    # to handle_tdvmcall() on R11 alone; but it is no bus lock (bit 26, vmcs_defs.h bus_lock_preempted)
    from tdvmcall.kvm.platform import Platform
    from tdvmcall.kvm.tdx import KvmVcpu, handle_tdvmcall
    from tdvmcall.module import VcpuState, VmcallExit

    vmm = [0] * 16
    vmm[0], vmm[1], vmm[10], vmm[11], vmm[12] = 77 | 1 << 27, 0xFFCC, 0, 10, 1
    k = handle_tdvmcall(KvmVcpu("hardened"), VmcallExit(0xFFCC, vmm, [0] * 16, VcpuState()), Platform())
    assert k.status == SUBFUNC_UNSUPPORTED and k.exit_reason == 0x0800004D
    assert k.bus_lock is False and not any("bit 26" in n for n in k.notes)


def test_bus_lock_hlt_does_not_halt():
    r = run({"rcx": LINUX, "r11": 12, "r12": 0}, "legacy", td=BUS)
    assert r["kvm"]["status"] == H(SUBFUNC_UNSUPPORTED)


def test_kvm_exit_reason_text():
    assert codes.kvm_exit_reason_text(0x0400004D) == "TDCALL 0x4000000"
    assert codes.kvm_exit_reason_text(0x8000004D) == "TDCALL FAILED_VMENTRY"
    assert codes.kvm_exit_reason_text(31) == "MSR_READ"


def test_trace_reads_the_bus_lock_flag():
    r = parse_reason("TDCALL 0x4000000")
    assert (r.name, r.number, r.bus_lock, r.failed_vmentry) == ("TDCALL", 77, True, False)
    assert is_tdvmcall_reason(r)
    assert not parse_reason("TDCALL").bus_lock
    # Linux's 0xFFCC covers every call KVM may run there (the widest: GetTdVmCallInfo, R10-R14)
    v = verdict_for(77, 0xFFCC, True)
    assert v.verdict == "completes" and "bus lock" in v.detail
    # R10 R11 R12 only: MapGPA (reads R13) is refused, the unsupported answer completes
    assert verdict_for(77, 0x1C00, True).verdict == "depends"
    # KVM never re-labels a reason that carries the bit
    assert verdict_for(10, 0xFFCC, True).verdict == "inconsistent"


# --- RCX at re-entry (Linux arch/x86/virt/vmx/tdx/tdx.c tdh_vp_enter(): RCX = the TDVPR address;
#     tdh_vp_enter.c: the guest's RCX is the saved control) ----------------------------------------------
def test_vmm_after_says_rcx_is_the_tdvpr_address_not_the_exit_qualification():
    r = run({"rcx": LINUX, "r11": 10, "r12": 1})
    assert "TDVPR" in r["vmm_after_notes"]["rcx"]
    assert r["vmm_after"]["rax"] == H(0)  # TDH.VP.ENTER is SEAMCALL leaf 0
    # the exit qualification is not passed back (the placeholder 0 stands for the TDVPR address), yet
    # the guest gets its control back in RCX
    assert r["vmm"]["rcx"] == H(0xFFCC) and r["vmm_after"]["rcx"] == H(0)
    assert r["guest"]["rcx"] == H(0xFFCC)


# --- the four new examples: `tdvmcall run` shows each behaviour, its JSON fits the published schema ----
@pytest.mark.parametrize(
    "name,check",
    [
        ("bus-lock-cpuid", lambda r: r["kvm"]["trace_reason"] == "TDCALL 0x4000000"),
        ("map-gpa-run-failed", lambda r: r["kvm"]["verdict"] == "run_failed" and not r["kvm"]["resumed"]),
        ("tdg-vp-info", lambda r: r["module"]["not_modelled"].startswith("TDCALL leaf 1, TDG.VP.INFO")),
        ("rbp-without-no-rbp-mod", lambda r: r["guest_unknown"] == ["rbp"] and r["warnings"]),
        (
            "bus-lock-cpuid-v7.3",
            lambda r: r["kvm"]["verdict"] == "refused" and r["kvm"]["trace_reason"] == "CPUID 0x4000000",
        ),
    ],
)
def test_examples_show_the_behaviours_and_fit_the_schema(name, check):
    from importlib import resources
    from pathlib import Path

    import jsonschema

    path = Path(__file__).parent.parent / "examples" / f"{name}.json"
    r = runner.invoke(app, ["run", str(path), "--json"])
    assert r.exit_code == 0
    result = json.loads(r.stdout)
    assert check(result)
    schema = json.loads(resources.files("tdvmcall").joinpath("data/vector.schema.json").read_text())
    jsonschema.validate(result, {"$ref": "#/$defs/result", "$defs": schema["$defs"]})
    table = runner.invoke(app, ["run", str(path)], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and table.stdout.strip()


# =====================================================================================================
# Issue 16, the second review.  Sources read: kvm-x86 @09c6f74e and Debian's linux-source-7.3 7.3.4
# (arch/x86/kvm/vmx/tdx.c, x86.c, msrs.c, regs.h), KT0511/linux-6.16.1 @30b97c8, QEMU @05caf269
# (target/i386/kvm/tdx.c, tdx-quote-generator.h, kvm.c), tdx-module 1.5.01 (td_exit.c, tdh_vp_enter.c).
# =====================================================================================================
KVM_EFAULT = 14
FATAL = 0x10003
SHARED_BIT = 1 << 51  # gpaw 52, the platform's default


def _fatal_exit(r):
    (ev,) = [e for e in r["kvm"]["userspace_exits"] if e["reason"] == "KVM_EXIT_SYSTEM_EVENT"]
    return ev


# --- 2. ReportFatalError data[0] (tdx_report_fatal_error(): regs[VCPU_REGS_RAX] = tdx->vp_enter_ret) -
@pytest.mark.parametrize("bus_lock,want", [(False, 0x4D), (True, 0x0400004D)])
def test_report_fatal_error_data0_is_the_whole_exit_value(bus_lock, want):
    r = run({"rcx": LINUX, "r11": FATAL, "r12": 0x10000}, td={"bus_lock": bus_lock})
    assert _fatal_exit(r)["data"][0] == H(want)
    assert _fatal_exit(r)["data"][1] == H(0xFFCC)  # the RCX slot: the exit qualification


# --- 3. ReportFatalError's message as QEMU builds it (tdx_handle_report_fatal_error(), COPY_REG:
#        R14 R15 RBX RDI RSI R8 R9 RDX, only the registers the mask (data[1]) has, packed) ------------
def _le(text):
    return H(int.from_bytes(text.encode(), "little"))


def test_report_fatal_error_message_packs_only_exposed_registers_in_qemus_order():
    # R15 (bit 15) and RDI (bit 7) not exposed: QEMU copies R14, RBX, RSI, R8 one after the other
    mask = 0xFFCC & ~(1 << 15) & ~(1 << 7)  # Linux's mask without R15 and RDI
    guest = {"rcx": hex(mask), "r11": FATAL, "r12": 0x10000, "r14": _le("R14-abcd"), "r15": _le("R15-efgh")}
    guest |= {"rbx": _le("RBX-ijkl"), "rdi": _le("RDI-mnop"), "rsi": _le("RSI-qrst"), "r8": _le("R8--uvwx")}
    r = run(guest, "legacy")
    assert _fatal_exit(r)["message"] == "R14-abcdRBX-ijklRSI-qrstR8--uvwx"


def test_report_fatal_error_message_ends_at_the_first_nul():
    guest = {"rcx": LINUX, "r11": FATAL, "r12": 0x10000, "r14": _le("ab"), "r15": _le("cdefghij")}
    # R14's upper six bytes are NUL: QEMU's buffer is a C string, R15 is never read
    assert _fatal_exit(run(guest))["message"] == "ab"


# --- 4. GetQuote: QEMU refuses a buffer larger than TDX_GET_QUOTE_MAX_BUF_LEN (128 * 1024) -----------
@pytest.mark.parametrize("size,want", [(128 * 1024, 0), (128 * 1024 + 0x1000, INVALID_OPERAND), (0x2000, 0)])
def test_get_quote_larger_than_128_kib_is_invalid_operand(size, want):
    r = run({"rcx": LINUX, "r11": 0x10002, "r12": hex(SHARED_BIT | 0x9000), "r13": hex(size)})
    assert r["kvm"]["status"] == H(want)
    assert r["kvm"]["userspace_exit"]["reason"] == "KVM_EXIT_TDX"  # KVM itself checks only the shared bit


# --- 6. CLOCK_PAIRING to a shared-bit GPA (kvm_pv_clock_pairing(): kvm_write_guest() finds no memslot
#        for it, ret = -KVM_EFAULT) ----------------------------------------------------------------------
@pytest.mark.parametrize("gpa,want", [(0x9000, 0), (SHARED_BIT | 0x9000, -KVM_EFAULT & (2**64 - 1))])
def test_clock_pairing_to_a_shared_gpa_is_efault(gpa, want):
    r = run({"rcx": LINUX, "r10": 9, "r11": hex(gpa), "r12": 0})
    assert r["kvm"]["status"] == H(want) and r["guest"]["r10"] == H(want)


# --- 5. MSR filters and the order of checks (msrs.c kvm_emulate_msr_read()/_write(): kvm_msr_allowed()
#        before the vendor hook; kvm_msr_user_space(): exit only for a reason userspace enabled;
#        kvm_msr_reason(): FILTER for a filtered access, INVAL for tdx_get_msr()'s plain failure.
#        QEMU kvm.c kvm_vm_enable_userspace_msr(): KVM_MSR_EXIT_REASON_FILTER only, and a read filter
#        on MSR_CORE_THREAD_COUNT 0x35 answered by kvm_rdmsr_core_thread_count(): threads per package
#        in 15:0, cores per package in 31:16) ------------------------------------------------------------
def _msr_exits(r):
    return [e for e in r["kvm"]["userspace_exits"] if e["reason"].startswith("KVM_EXIT_X86_")]


@pytest.mark.parametrize("policy", ["legacy", "hardened"])
def test_rdmsr_core_thread_count_exits_to_qemu_which_answers_it(policy):
    r = run({"rcx": LINUX, "r11": 31, "r12": 0x35}, policy)
    (ev,) = _msr_exits(r)
    assert (ev["reason"], ev["msr_reason"], ev["index"]) == ("KVM_EXIT_X86_RDMSR", "FILTER", H(0x35))
    assert r["kvm"]["status"] is None and r["guest"]["r10"] == H(0)  # SUCCESS: KVM writes no status
    assert r["guest"]["r11"] == H(4 | 4 << 16)  # -smp 4: one package, 4 cores, 1 thread each
    two_by_two = run(
        {"rcx": LINUX, "r11": 31, "r12": 0x35}, policy, platform={"topology": {"cores": 2, "threads_per_core": 2}}
    )
    assert two_by_two["guest"]["r11"] == H(4 | 2 << 16)


def test_unfiltered_unknown_msr_is_invalid_operand_without_an_exit():
    for guest in ({"r11": 31, "r12": 0x10}, {"r11": 32, "r12": 0x10, "r13": 1}, {"r11": 32, "r12": 0x35, "r13": 1}):
        r = run({"rcx": LINUX, **guest})  # QEMU enables FILTER only; WRMSR 0x35 is not filtered
        assert r["kvm"]["status"] == H(INVALID_OPERAND) and _msr_exits(r) == [], guest


def test_the_filter_comes_before_the_tdx_allow_list():
    # IA32_TSC_DEADLINE is emulated for a TD, yet a filter on it wins: exit, or fail without an exit
    tsc = {"rcx": LINUX, "r11": 31, "r12": 0x6E0}
    r = run(tsc, platform={"msr_filter": {"read": [0x6E0]}, "userspace": {"rdmsr": {"0x6e0": "0x77"}}})
    assert [e["msr_reason"] for e in _msr_exits(r)] == ["FILTER"] and r["guest"]["r11"] == H(0x77)
    r = run(tsc, platform={"msr_filter": {"read": [0x6E0]}, "msr_exit_reasons": []})
    assert r["kvm"]["status"] == H(INVALID_OPERAND) and _msr_exits(r) == []
    # x2APIC MSRs cannot be filtered
    r = run({"rcx": LINUX, "r11": 31, "r12": 0x803}, platform={"msr_filter": {"read": [0x803]}})
    assert r["kvm"]["status"] is None and _msr_exits(r) == []


def test_the_inval_reason_exits_for_an_msr_kvm_does_not_emulate():
    r = run(
        {"rcx": LINUX, "r11": 31, "r12": 0x10},
        platform={"msr_exit_reasons": ["inval"], "userspace": {"rdmsr": {"0x10": "0x5"}}},
    )
    assert [e["msr_reason"] for e in _msr_exits(r)] == ["INVAL"] and r["guest"]["r11"] == H(5)
    # the older msr_exits: true enables every reason
    r = run({"rcx": LINUX, "r11": 32, "r12": 0x10, "r13": 1}, platform={"msr_exits": True})
    assert [e["reason"] for e in _msr_exits(r)] == ["KVM_EXIT_X86_WRMSR"] and r["kvm"]["status"] is None


# --- 1. Exposed XMMs after a userspace round trip (tdx-module td_exit.c loads the exposed XMMs into the
#        CPU at the exit, tdh_vp_enter.c save_xmms_by_mask() copies the CPU's XMMs back at re-entry;
#        Linux tdx_vcpu_create() fpstate_set_confidential(), arch/x86/kernel/fpu/core.c
#        fpu_swap_kvm_fpstate() neither saves nor loads a confidential fpstate: after a return to
#        userspace the CPU holds the VMM thread's XMMs) ------------------------------------------------
XMM0 = 0x0123456789ABCDEF_FEDCBA9876543210
XMM1 = 0x1111111111111111_2222222222222222
XMM0_EXPOSED = hex(0xFFCC | 1 << 16)


def _xmm_guest(**regs):
    return {"rcx": XMM0_EXPOSED, "xmm": {"xmm0": hex(XMM0), "xmm1": hex(XMM1)}, **regs}


@pytest.mark.parametrize("policy", ["legacy", "hardened"])
@pytest.mark.parametrize(
    "regs,exit_reason",
    [
        ({"r11": 30, "r12": 1, "r13": 0, "r14": 0x3FD}, "KVM_EXIT_IO"),  # IO IN, answered by userspace
        ({"r11": 0x10002, "r12": hex(SHARED_BIT | 0x9000), "r13": 0x1000}, "KVM_EXIT_TDX"),  # GetQuote
        ({"r11": 0x10003, "r12": 0x10000}, "KVM_EXIT_SYSTEM_EVENT"),  # ReportFatalError
    ],
)
def test_exposed_xmms_come_back_as_the_vmm_threads_after_a_userspace_exit(policy, regs, exit_reason):
    r = run(_xmm_guest(**regs), policy)
    assert r["kvm"]["userspace_exit"]["reason"] == exit_reason
    assert r["guest_xmm_unknown"] == ["xmm0"]
    assert r["guest_xmm"]["xmm1"] == f"0x{XMM1:032x}"  # not exposed: the module keeps the guest's
    assert any("xmm0" in w and "userspace" in w for w in r["warnings"])


@pytest.mark.parametrize("regs", [{"r11": 10, "r12": 1, "r13": 0}, {"r10": 1}])  # CPUID, a KVM hypercall
def test_exposed_xmms_keep_the_guests_value_when_kvm_finishes_the_call(regs):
    r = run(_xmm_guest(**regs))
    assert r["kvm"]["userspace_exits"] == []
    assert r["guest_xmm_unknown"] == [] and r["guest_xmm"]["xmm0"] == f"0x{XMM0:032x}"
    assert r["warnings"] == []


def test_a_hardened_internal_error_goes_to_userspace_too():
    # R10 not exposed: hardened KVM reports KVM_EXIT_INTERNAL_ERROR; if userspace runs the vCPU again,
    # the exposed XMM holds the VMM thread's value
    r = run({"rcx": hex(0xFBCC | 1 << 16), "r11": 10, "xmm": {"xmm0": hex(XMM0)}})
    assert r["kvm"]["verdict"] == "internal_error" and r["guest_xmm_unknown"] == ["xmm0"]


# =====================================================================================================
# Issue 17 item 1: trees.  kvm/trees.py holds one rule per tree; every expected value below was read in
# that tree's arch/x86/kvm/vmx/tdx.c: v6.16.1 (KT0511/linux-6.16.1 @30b97c8) tdx_to_vmx_exit_reason()
# line 900, `switch (exit_reason)` on the u32 at 918, tdx_handle_exit() 2041; 7.3.4 (Debian
# linux-source-7.3 7.3.4-1~bpo13+1) tdx_to_vmx_exit_reason() 938, `switch (exit_reason.basic)` at 955,
# __tdx_handle_exit() 2053, tdx_handle_exit() 2165 (bus_lock_detected -> KVM_EXIT_X86_BUS_LOCK when the
# handler returned > 0, KVM_RUN_X86_BUS_LOCK in run->flags always).
# =====================================================================================================
from tdvmcall.kvm.trees import TREES  # noqa: E402

R10_R11 = "0xC00"


@pytest.mark.parametrize("tree", ["kvm-x86", "v6.16"])
def test_bus_lock_cpuid_with_r10_r11_only_is_subfunc_unsupported_where_the_whole_reason_is_compared(tree):
    r = run({"rcx": R10_R11, "r11": 10, "r12": 1}, "hardened", td={"bus_lock": True}, tree=tree)
    assert r["kvm"]["verdict"] == "completed" and r["kvm"]["status"] == H(SUBFUNC_UNSUPPORTED)
    assert r["kvm"]["exit_reason"] == H(0x0400004D) and r["kvm"]["userspace_exits"] == []


def test_v7_3_relabels_a_bus_lock_cpuid_so_hardened_refuses_r10_r11_only():
    # 7.3 dispatches it as CPUID, which writes R12-R15: the hardened check must refuse the mask
    r = run({"rcx": R10_R11, "r11": 10, "r12": 1}, "hardened", td={"bus_lock": True}, tree="v7.3")
    assert r["kvm"]["leaf"] == "Instruction.CPUID" and r["kvm"]["verdict"] == "refused"
    assert r["kvm"]["status"] == H(INVALID_OPERAND)
    assert r["kvm"]["unexposed_outputs"] == ["r12", "r13", "r14", "r15"]
    assert r["kvm"]["exit_reason"] == H(0x0400000A) and r["kvm"]["trace_reason"] == "CPUID 0x4000000"
    # legacy KVM writes R12-R15 the guest did not expose: dropped by the module
    legacy = run({"rcx": R10_R11, "r11": 10, "r12": 1}, "legacy", td={"bus_lock": True}, tree="v7.3")
    assert legacy["kvm"]["dropped_writes"] == ["r12", "r13", "r14", "r15"]


def test_v7_3_a_bus_lock_call_finished_in_the_kernel_exits_with_kvm_exit_x86_bus_lock():
    r = run({"rcx": LINUX, "r11": 10, "r12": 0}, td={"bus_lock": True}, tree="v7.3")
    assert r["kvm"]["userspace_exits"] == [{"reason": "KVM_EXIT_X86_BUS_LOCK", "run_flags": ["KVM_RUN_X86_BUS_LOCK"]}]
    assert r["kvm"]["verdict"] == "userspace" and r["guest"]["r13"] == H(0x756E6547)  # CPUID 0 ran: "Genu"
    without = run({"rcx": LINUX, "r11": 10, "r12": 0}, tree="v7.3")
    assert without["kvm"]["userspace_exits"] == [] and without["kvm"]["exit_reason"] == H(10)


def test_v7_3_a_bus_lock_call_that_exits_anyway_carries_the_flag():
    r = run({"rcx": LINUX, "r11": 30, "r12": 1, "r13": 0, "r14": 0x3FD}, td={"bus_lock": True}, tree="v7.3")
    (ev,) = r["kvm"]["userspace_exits"]
    assert ev["reason"] == "KVM_EXIT_IO" and ev["run_flags"] == ["KVM_RUN_X86_BUS_LOCK"]
    assert r["kvm"]["exit_reason"] == H(0x0400001E)  # IO_INSTRUCTION (30) with bit 26


def test_v7_3_bus_lock_report_fatal_error_keeps_vp_enter_ret_and_flags_the_system_event():
    r = run({"rcx": LINUX, "r11": FATAL, "r12": 0x10000}, td={"bus_lock": True}, tree="v7.3")
    ev = _fatal_exit(r)
    assert ev["data"][0] == H(0x0400004D) and ev["run_flags"] == ["KVM_RUN_X86_BUS_LOCK"]


def test_v7_3_bus_lock_exit_to_userspace_hands_exposed_xmms_the_vmm_threads():
    r = run(_xmm_guest(r11=10, r12=1), td={"bus_lock": True}, tree="v7.3")
    assert r["guest_xmm_unknown"] == ["xmm0"]
    assert run(_xmm_guest(r11=10, r12=1), td={"bus_lock": True})["guest_xmm_unknown"] == []  # kvm-x86


def test_v7_3_shares_kvm_x86s_map_gpa_completion_and_msr_allow_list():
    gpa = {"rcx": LINUX, "r11": 0x10001, "r12": hex(SHARED_BIT), "r13": 0x1000}
    eagain = {"userspace": {"hypercall_ret": [11]}}
    assert run(gpa, platform=eagain, tree="v7.3")["kvm"]["status"] == H(0x0000000000000001)  # RETRY
    assert run(gpa, platform=eagain, tree="v6.16")["kvm"]["status"] == H(INVALID_OPERAND)
    # ISR1 (0x811): not on the 7.3 allow-list; the v6.16 deny-list let it through
    assert rdmsr(0x811, tree="v7.3")["status"] == H(INVALID_OPERAND)
    assert rdmsr(0x811, tree="v6.16")["status"] is None


def test_the_tree_rules_name_each_trees_functions():
    assert [TREES[t].exit_dispatcher for t in ("kvm-x86", "v6.16", "v7.3")] == [
        "tdx_handle_exit",
        "tdx_handle_exit",
        "__tdx_handle_exit",
    ]
    assert [TREES[t].relabel for t in ("kvm-x86", "v6.16", "v7.3")] == ["whole-reason", "whole-reason", "basic"]
    # the top Makefiles: VERSION = 6, PATCHLEVEL = 16 (v6.16.1); VERSION = 7, PATCHLEVEL = 3 (7.3.4)
    assert [TREES[t].version for t in ("kvm-x86", "v6.16", "v7.3")] == [None, (6, 16), (7, 3)]


def _pristine_v7_3_tdx_c() -> str | None:
    """7.3.4's ``arch/x86/kvm/vmx/tdx.c`` as Debian ships it: the pristine tree scripts/kernel_proof.py
    unpacks into its cache ($TDVMCALL_KERNEL_CACHE, default /var/cache/tdvmcall-kernel; .ci/run
    sets it), read at its ``pristine`` tag (the working copy may hold the series)."""
    import os
    import subprocess

    for cache in (os.environ.get("TDVMCALL_KERNEL_CACHE"), "/var/cache/tdvmcall-kernel"):
        tree = Path(cache or "") / "src" / "linux-7.3.4"
        if cache and (tree / ".git").is_dir():
            show = ["git", "-C", str(tree), "show", "pristine:arch/x86/kvm/vmx/tdx.c"]
            r = subprocess.run(show, capture_output=True, text=True)
            if r.returncode == 0:
                return r.stdout
    return None


def test_the_v7_3_rule_cites_the_lines_of_its_source():
    text = _pristine_v7_3_tdx_c()
    if text is None:
        pytest.skip(
            "needs Debian's linux-source-7.3 7.3.4-1~bpo13+1 unpacked by scripts/kernel_proof.py (its cache: "
            "$TDVMCALL_KERNEL_CACHE or /var/cache/tdvmcall-kernel); the lines of the v7.3 rule are checked against it"
        )
    lines = text.splitlines()
    for function, line in TREES["v7.3"].lines.items():
        assert function + "(" in lines[line - 1], (function, line, lines[line - 1])
    assert "switch (exit_reason.basic)" in lines[955 - 1]


def test_the_published_schema_lists_every_tree():
    from importlib import resources

    schema = json.loads(resources.files("tdvmcall").joinpath("data/vector.schema.json").read_text())
    assert schema["$defs"]["scenario"]["properties"]["kvm"]["properties"]["tree"]["enum"] == list(TREES)


def test_run_sweep_and_vectors_take_the_tree(tmp_path):
    scenario = tmp_path / "s.json"
    scenario.write_text(json.dumps({"td": {"bus_lock": True}, "guest": {"rcx": R10_R11, "r11": 10, "r12": 1}}))
    r = runner.invoke(app, ["run", str(scenario), "--json", "--tree", "v7.3"])
    assert r.exit_code == 0 and json.loads(r.stdout)["kvm"]["verdict"] == "refused"
    r = runner.invoke(app, ["run", str(scenario), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["kvm"]["verdict"] == "completed"  # kvm-x86
    for args in (
        ["run", str(scenario), "--tree", "v9"],
        ["sweep", "--tree", "v9"],
        ["vectors", "export", str(tmp_path / "v"), "--tree", "v9"],
    ):
        bad = runner.invoke(app, args)
        assert bad.exit_code == 2 and "--tree" in bad.output, args
    r = runner.invoke(app, ["sweep", "--tree", "v7.3", "--call", "CPUID", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["tree"] == "v7.3"
    r = runner.invoke(app, ["vectors", "export", str(tmp_path / "c"), "--tree", "v7.3"])
    assert r.exit_code == 0
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    assert index["tree"] == "v7.3"
    first = json.loads((tmp_path / "c" / index["files"][0]["file"]).read_text())
    assert first["scenario"]["kvm"]["tree"] == "v7.3"


def test_the_c_generated_for_v7_3_follows_its_rule_on_bus_lock_exits(tmp_path):
    """The C generator asks the tree's rule (kvm.trees.TreeRule.lookup): for v7.3 a bus-lock exit is
    the same call as without the flag, so the generated check refuses a bus-lock CPUID that exposes
    only R10 and R11 (7.3.4 would write R12-R15); for kvm-x86 it passes (SUBFUNC_UNSUPPORTED).  And on
    every mask of a bus-lock CPUID and MapGPA, the v7.3 C and the v7.3 model agree."""
    import test_export_c as X
    from tdvmcall.export_c import generate as G
    from tdvmcall.kvm.platform import Platform

    lib73 = X.build(tmp_path / "v73", G.generate(tree="v7.3"))
    r12_15 = 0xF << 12
    assert X.c_check(lib73, X.vec(0x0C00, rax=X.BUS_LOCK_RAX, r11=10, r12=1)) == (1, 0x3 << 12, r12_15)
    libx86 = X.build(tmp_path / "x86", G.generate(tree="kvm-x86"))
    assert X.c_check(libx86, X.vec(0x0C00, rax=X.BUS_LOCK_RAX, r11=10, r12=1)) == (0, 0, 0)
    for regs in ({"r11": 10, "r12": 1}, {"r11": 0x10001, "r12": SHARED_BIT, "r13": 0x1000}, {"r10": 5, "r12": 1}):
        base = X.base_vector(regs)
        base[0] = X.BUS_LOCK_RAX
        got, _, _ = X.c_all_masks(lib73, base)
        for mask in range(0, 1 << 16, 97):  # a spread of masks; the model runs one at a time
            vmm = X.vmm_for(base, mask)
            k = X.hardened(vmm, Platform(tree="v7.3"))
            assert got[mask] == X.verdict_code(k.verdict), (regs, hex(mask), k.verdict)

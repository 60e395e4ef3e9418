"""The round trip against facts from docs/abi.md (each test names the section it encodes).

Expected values are written from the ABI facts and from the platform values the test itself
supplies in its scenario, never read back from the model.
"""

from __future__ import annotations

import pytest

from tdvmcall.scenario import ScenarioError, parse, run_json

H = lambda v: f"0x{v:016x}"  # noqa: E731  the contract's register format

# A CPUID table the tests define themselves (so expected results come from here, not the model)
CPUID = [
    {"leaf": 0, "subleaf": 0, "eax": 0xD, "ebx": 0x756E6547, "ecx": 0x6C65746E, "edx": 0x49656E69},
    {"leaf": 1, "subleaf": 0, "eax": 0x11, "ebx": 0x22, "ecx": 0x33, "edx": 0x44},
]


def scenario(rcx, policy="hardened", no_rbp_mod=True, module="1.5", platform=None, **regs):
    guest = {"rcx": rcx, **regs}
    return {
        "td": {"module": module, "no_rbp_mod": no_rbp_mod},
        "kvm": {"policy": policy},
        "guest": guest,
        "platform": platform or {},
    }


def fill(**over):
    """A guest whose every GPR holds a recognisable value (0x1100 + index), RAX 0 and the given ones."""
    names = [
        "rax",
        "rcx",
        "rdx",
        "rbx",
        "rsp",
        "rbp",
        "rsi",
        "rdi",
        "r8",
        "r9",
        "r10",
        "r11",
        "r12",
        "r13",
        "r14",
        "r15",
    ]
    regs = {n: 0x1100 + i for i, n in enumerate(names)}
    regs["rax"] = 0
    regs.update(over)
    return regs


# --- §3 the module gate --------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["legacy", "hardened"])
def test_rbp_exposed_under_no_rbp_mod_fails_in_the_module(policy):
    regs = fill(rcx=0xFFEC, r10=0, r11=10, r12=1)
    r = run_json({"kvm": {"policy": policy}, "guest": regs})
    assert r["module"]["exited"] is False
    assert r["module"]["status"] == "0xc000010000000001"  # TDX_OPERAND_INVALID | OPERAND_ID_RCX
    assert r["kvm"] is None and r["vmm"] is None  # the VMM never sees the call
    assert r["guest"]["rip"] == H(0x1000 + 4)  # RIP advanced past TDCALL
    assert r["guest"]["rax"] == "0xc000010000000001"
    for name, value in regs.items():
        if name != "rax":
            assert r["guest"][name] == H(value), name  # everything else unchanged


def test_rbp_exposed_without_no_rbp_mod_reaches_kvm_with_rbp():
    r = run_json(
        scenario("0xFFEC", no_rbp_mod=False, **{k: v for k, v in fill(r10=0, r11=10, r12=1).items() if k != "rcx"})
    )
    assert r["module"]["exited"] and r["vmm"]["rbp"] == H(0x1105)


def test_module_1_0_does_not_check_rbp():
    r = run_json(
        scenario("0xFFEC", module="1.0", **{k: v for k, v in fill(r10=0, r11=10, r12=1).items() if k != "rcx"})
    )
    assert r["module"]["exited"]


@pytest.mark.parametrize("rcx", [0xFFCD, 0xFFCE, 0xFFDC, 0x1_0000_FFCC])  # RAX, RCX, RSP bits; reserved
def test_forbidden_control_bits(rcx):
    r = run_json(scenario(rcx, r11=10))
    assert not r["module"]["exited"] and r["module"]["status"] == "0xc000010000000001"


def test_xmm_select_is_not_checked_and_selected_xmms_are_passed():
    r = run_json({"guest": {"rcx": 0x0003FFCC, "r11": 10, "r12": 1, "xmm": {"xmm0": "0xAB", "xmm1": 7, "xmm2": 9}}})
    assert r["module"]["exited"] and r["module"]["xmm_select"] == ["xmm0", "xmm1"]
    assert r["guest_xmm"]["xmm2"] == f"0x{9:032x}"


def test_invalid_rax_fails_with_operand_rax():
    r = run_json(scenario("0xFFCC", rax=1 << 24, r11=10))
    assert r["module"]["status"] == "0xc000010000000000" and not r["module"]["exited"]


def test_tdcall_outside_long_mode_faults_without_status():
    r = run_json({"guest": {"rcx": "0xFFCC", "long_mode": False}})
    assert r["module"]["fault"].startswith("#GP") and r["module"]["status"] is None
    assert r["guest"]["rip"] == H(0x1000)


def test_gpr_names_of_a_control_and_an_exit_qualification():
    # docs/abi.md §3: bit i of RCX 15:0 selects GPR i; 0xFFCC = RDX RBX RSI RDI R8..R15, XMM bits ignored
    from tdvmcall.abi.control import Control, ExitQualification

    want = {"rdx", "rbx", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"}
    assert Control(0x1_0000_FFCC).gpr_names == want
    assert ExitQualification(0x3_FFCC).gpr_names == want
    assert Control(0x0400).gpr_names == {"r10"} and Control(0).gpr_names == frozenset()


# --- §3 the exit and the resume: Linux's 0xFFCC CPUID --------------------------------------------
@pytest.mark.parametrize("policy", ["legacy", "hardened"])
def test_linux_cpuid_round_trip(policy):
    regs = fill(rcx=0xFFCC, r10=0, r11=10, r12=1, r13=0)
    r = run_json({"kvm": {"policy": policy}, "guest": regs, "platform": {"cpuid": CPUID}})
    vmm = r["vmm"]
    assert vmm["rax"] == H(0x4D) and vmm["rcx"] == H(0xFFCC)  # exit reason 77, exit qualification
    assert vmm["rsp"] == H(0) and vmm["rbp"] == H(0)  # never passed under NO_RBP_MOD
    assert vmm["rdx"] == H(0x1102) and vmm["r9"] == H(0x1109)  # selected values
    k = r["kvm"]
    assert (k["leaf"], k["verdict"], k["status"]) == ("Instruction.CPUID", "completed", None)
    g = r["guest"]
    assert [g["r12"], g["r13"], g["r14"], g["r15"]] == [H(0x11), H(0x22), H(0x33), H(0x44)]
    assert g["rax"] == H(0) and g["rcx"] == H(0xFFCC)  # TDX_SUCCESS and the control
    assert g["r10"] == H(0)  # CPUID never writes R10: the guest's own 0
    assert g["rdx"] == H(0x1102) and g["rsp"] == H(0x1104) and g["rbp"] == H(0x1105)
    assert g["rip"] == H(0x1004)


def test_hardened_cache_masks_after_linux_cpuid():
    r = run_json(scenario("0xFFCC", r11=10, r12=1))
    # available: the exposed GPRs + RCX, plus EXIT_INFO_1/2 (bits 23, 24); dirty: what CPUID wrote
    assert r["kvm"]["regs_avail"] == H(0xFFCC | 0x2 | 1 << 23 | 1 << 24)
    assert r["kvm"]["regs_dirty"] == H(0xF000)


def test_legacy_cache_masks_are_the_fixed_set():
    r = run_json(scenario("0x1C00", policy="legacy", r11=12))
    assert r["kvm"]["regs_avail"] == H(0x0180FFEF)  # TDX_REGS_AVAIL_SET, whatever the mask
    assert r["kvm"]["regs_dirty"] == H((1 << 25) - 1)  # all ones from creation, never reset


# --- §4 consequences today, and the hardened refusal -------------------------------------------------
def test_cpuid_with_r12_unexposed_legacy_emulates_leaf_0():
    regs = fill(rcx=0xEC00, r10=0, r11=10, r12=1, r13=0)
    r = run_json({"kvm": {"policy": "legacy"}, "guest": regs, "platform": {"cpuid": CPUID}})
    k = r["kvm"]
    assert k["zero_reads"] == ["r12"] and k["dropped_writes"] == ["r12"] and k["verdict"] == "completed"
    g = r["guest"]
    assert g["r12"] == H(1)  # its own R12: the EAX result is lost
    assert [g["r13"], g["r14"], g["r15"]] == [H(0x756E6547), H(0x6C65746E), H(0x49656E69)]  # leaf 0


def test_cpuid_with_r12_unexposed_hardened_refuses_and_executes_nothing():
    regs = fill(rcx=0xEC00, r10=0, r11=10, r12=1, r13=0)
    r = run_json({"kvm": {"policy": "hardened"}, "guest": regs, "platform": {"cpuid": CPUID}})
    k = r["kvm"]
    assert k["verdict"] == "refused" and k["missing"] == ["r12"] and k["unexposed_outputs"] == ["r12"]
    assert k["status"] == "0x8000000000000000" and k["wrote"] == {"r10": "0x8000000000000000"}
    assert r["guest"]["r10"] == "0x8000000000000000"
    for reg in ("r12", "r13", "r14", "r15"):
        assert r["guest"][reg] == H(regs[reg])  # nothing executed


def test_rdmsr_with_r11_unexposed():
    # R11 unexposed: KVM reads leaf 0 -> SUBFUNC_UNSUPPORTED (legacy); hardened: R11 missing -> refused
    regs = fill(rcx=0x1400, r10=0, r11=31, r12=0x803)
    legacy = run_json({"kvm": {"policy": "legacy"}, "guest": regs})
    assert legacy["kvm"]["status"] == "0x8000000000000003" and legacy["guest"]["r10"] == "0x8000000000000003"
    assert legacy["guest"]["r11"] == H(31)
    hardened = run_json({"kvm": {"policy": "hardened"}, "guest": regs})
    assert hardened["kvm"]["verdict"] == "refused" and "r11" in hardened["kvm"]["missing"]
    assert hardened["guest"]["r10"] == "0x8000000000000000"


def test_rdmsr_success_writes_r11_and_a_silent_drop_when_only_r11_output_is_unexposed():
    r = run_json(scenario("0x1C00", r11=31, r12=0x803, platform={"msrs": {"0x803": "0x50014"}}))
    assert r["kvm"]["verdict"] == "completed" and r["guest"]["r11"] == H(0x50014) and r["guest"]["r10"] == H(0)


def test_unknown_msr_fails_with_r11_untouched():
    r = run_json(scenario("0x1C00", r11=31, r12=0x10))
    assert r["kvm"]["status"] == "0x8000000000000000" and r["guest"]["r11"] == H(31)


def test_r10_unexposed_hardened_is_an_internal_error():
    r = run_json(scenario("0x1800", r11=10, r12=1))  # r11, r12 only
    k = r["kvm"]
    assert k["verdict"] == "internal_error" and k["status"] is None
    assert k["userspace_exit"]["reason"] == "KVM_EXIT_INTERNAL_ERROR"
    assert r["guest"]["r10"] == H(0)  # if resumed, the guest would read its own 0 = SUCCESS


def test_r10_unexposed_legacy_answers_leaf_0_and_loses_the_answer():
    r = run_json(scenario("0x1800", policy="legacy", r10=0, r11=10, r12=1))
    assert r["kvm"]["leaf"] == "Instruction.CPUID" and r["kvm"]["dropped_writes"] == ["r13", "r14", "r15"]


# --- §4 ReportFatalError ----------------------------------------------------------------------------
def test_report_fatal_error_with_some_message_registers():
    msg = int.from_bytes(b"PANIC!!!", "little")
    regs = fill(rcx=0x7C00, r10=0, r11=0x10003, r12=1 << 63, r13=0x5000, r14=msg, r15=0xFF)
    r = run_json({"guest": regs})
    k = r["kvm"]
    assert k["verdict"] == "userspace" and k["status"] is None and k["wrote"] == {}
    e = k["userspace_exits"][0]
    assert e["reason"] == "KVM_EXIT_SYSTEM_EVENT" and e["type"] == H(7) and e["ndata"] == H(16)
    data = [int(x, 16) for x in e["data"]]
    assert data[0] == 0x4D and data[1] == 0x7C00 and data[4] == 0 and data[5] == 0
    assert data[12] == 1 << 63 and data[13] == 0x5000 and data[14] == msg
    assert data[15] == 0 and data[3] == 0 and data[2] == 0  # unexposed: 0, not the guest's value
    assert e["message"] == "PANIC!!!" and e["gpa"] == H(0x5000)
    assert r["guest"]["r15"] == H(0xFF)  # guest resumes with its registers as they were


def test_report_fatal_error_gpa_needs_r13_only_with_bit_63():
    without = run_json(scenario("0x1C00", r11=0x10003, r12=0x10000))
    assert without["kvm"]["verdict"] == "userspace"
    withgpa = run_json(scenario("0x1C00", r11=0x10003, r12=1 << 63))
    assert withgpa["kvm"]["verdict"] == "refused" and withgpa["kvm"]["missing"] == ["r13"]


# --- §4 IO, MMIO, MapGPA -------------------------------------------------------------------------------
def test_io_in_zero_extends_userspace_data_into_r11():
    r = run_json(
        scenario("0x7C00", r11=30, r12=2, r13=0, r14=0x1_0070, platform={"userspace": {"ports": {"0x70": "0xBEEF"}}})
    )
    e = r["kvm"]["userspace_exit"]
    assert e["reason"] == "KVM_EXIT_IO" and e["port"] == H(0x70) and e["direction"] == "in"  # port truncated
    assert r["guest"]["r11"] == H(0xBEEF)


def test_io_out_needs_r15_under_hardened_and_sends_low_bytes():
    refused = run_json(scenario("0x7C00", r11=30, r12=1, r13=1, r14=0x3F8, r15=0x4142))
    assert refused["kvm"]["missing"] == ["r15"]
    ok = run_json(scenario("0xFC00", r11=30, r12=1, r13=1, r14=0x3F8, r15=0x4142))
    assert ok["kvm"]["userspace_exit"]["data"] == H(0x42) and ok["guest"]["r11"] == H(30)


@pytest.mark.parametrize("size,direction", [(3, 0), (1, 2), (8, 0), (1 << 32 | 1, 0)])
def test_io_bad_size_or_direction_is_invalid_operand(size, direction):
    r = run_json(scenario("0xFC00", r11=30, r12=size, r13=direction, r14=0x3F8))
    assert r["kvm"]["status"] == "0x8000000000000000" and r["kvm"]["userspace_exits"] == []


def test_mmio_read_clears_the_shared_bit_and_truncates_size_and_direction():
    gpa = 1 << 51 | 0xFEB00000
    r = run_json(scenario("0x7C00", r11=48, r12=1 << 32 | 4, r13=1 << 32, r14=gpa))
    e = r["kvm"]["userspace_exit"]
    assert e["reason"] == "KVM_EXIT_MMIO" and e["phys_addr"] == H(0xFEB00000) and e["is_write"] is False


def test_mmio_private_gpa_is_invalid_operand():
    r = run_json(scenario("0xFC00", r11=48, r12=4, r13=0, r14=0xFEB00000))
    assert r["kvm"]["status"] == "0x8000000000000000"


def test_map_gpa_private_4mib_in_two_chunks():
    r = run_json(scenario("0x3C00", r11=0x10001, r12=0x8000_0000, r13=0x40_0000))
    exits = r["kvm"]["userspace_exits"]
    assert [e["reason"] for e in exits] == ["KVM_EXIT_HYPERCALL"] * 2
    assert [e["args"] for e in exits] == [[H(0x8000_0000), H(512), H(0x10)], [H(0x8020_0000), H(512), H(0x10)]]
    assert r["kvm"]["status"] is None and r["guest"]["r11"] == H(0x10001)  # success: R11 its own


def test_map_gpa_retry_resumes_at_the_next_chunk():
    shared = 1 << 51 | 0x8000_0000
    r = run_json(
        scenario("0x3C00", r11=0x10001, r12=shared, r13=0x40_0000, platform={"userspace": {"hypercall_ret": [0, 11]}})
    )  # second chunk: EAGAIN
    assert r["kvm"]["status"] == H(1)  # RETRY
    assert r["guest"]["r11"] == H(shared + 0x20_0000)
    assert r["kvm"]["userspace_exits"][0]["args"][0] == H(0x8000_0000)  # shared bit cleared
    assert r["kvm"]["userspace_exits"][0]["args"][2] == H(0)  # DECRYPTED


@pytest.mark.parametrize(
    "gpa,size,status",
    [
        (0x1000, 0, 0x8000000000000000),
        (0x1010, 0x1000, 0x8000000000000002),
        ((1 << 51) - 0x1000, 0x2000, 0x8000000000000000),
    ],
)
def test_map_gpa_early_errors_return_the_gpa_in_r11(gpa, size, status):
    r = run_json(scenario("0x3C00", r11=0x10001, r12=gpa, r13=size))
    assert r["kvm"]["status"] == H(status) and r["guest"]["r11"] == H(gpa) and not r["kvm"]["userspace_exits"]


def test_map_gpa_without_the_exit_capability_is_unsupported():
    r = run_json(scenario("0x3C00", r11=0x10001, r12=0x1000, r13=0x1000, platform={"exit_hypercall_map_gpa": False}))
    assert r["kvm"]["status"] == "0x8000000000000003"


# --- §4 the other GHCI leaves ------------------------------------------------------------------------
def test_get_quote_private_gpa_is_invalid_operand_and_shared_goes_to_userspace():
    private = run_json(scenario("0x3C00", r11=0x10002, r12=0x8000_0000, r13=0x2000))
    assert private["kvm"]["status"] == "0x8000000000000000"
    shared = run_json(scenario("0x3C00", r11=0x10002, r12=1 << 51 | 0x8000_0000, r13=0x2000))
    e = shared["kvm"]["userspace_exit"]
    assert e["reason"] == "KVM_EXIT_TDX" and e["gpa"] == H(0x8000_0000) and shared["kvm"]["status"] == H(0)


@pytest.mark.parametrize("vector,ok", [(31, False), (32, True), (255, True), (256, False)])
def test_setup_event_notify_vector_range(vector, ok):
    r = run_json(scenario("0x1C00", r11=0x10004, r12=vector))
    assert (r["kvm"]["status"] == H(0)) is ok


@pytest.mark.parametrize("vector,status", [(64, 0), (16, 0x8000000000000000)])
def test_setup_event_notify_is_handled_in_v6_16_too(vector, status):
    # KT0511/linux-6.16.1 @30b97c8 handle_tdvmcall() dispatches TDVMCALL_SETUP_EVENT_NOTIFY_INTERRUPT:
    # tdx_setup_event_notify_interrupt() refuses a vector outside 32..255 with INVALID_OPERAND, else exits
    # to userspace (KVM_EXIT_TDX) and tdx_complete_simple() writes userspace's ret (QEMU: success) to R10
    r = run_json({"kvm": {"tree": "v6.16"}, "guest": {"rcx": "0x1C00", "r11": "0x10004", "r12": vector}})
    assert r["kvm"]["status"] == H(status)
    assert [e["reason"] for e in r["kvm"]["userspace_exits"]] == (["KVM_EXIT_TDX"] if status == 0 else [])


def test_get_td_vm_call_info_leaf0_and_bad_leaf():
    leaf0 = run_json(scenario("0x7C00", r11=0x10000, r12=0, r13=5, r14=6))
    assert [leaf0["guest"][r] for r in ("r10", "r11", "r12", "r13", "r14")] == [H(0)] * 5
    bad = run_json(scenario("0x1C00", r11=0x10000, r12=7))
    assert bad["kvm"]["status"] == "0x8000000000000000" and bad["guest"]["r11"] == H(0x10000)


def test_unknown_and_unimplemented_leaves_are_subfunc_unsupported():
    for leaf in (0x10005, 54, 0x99):
        assert run_json(scenario("0x0C00", r11=leaf))["kvm"]["status"] == "0x8000000000000003"


# --- §4 KVM hypercalls ---------------------------------------------------------------------------------
def test_sched_yield_needs_only_r10_and_r11():
    r = run_json(scenario("0x0C00", r10=11, r11=1))
    assert r["kvm"]["leaf"] == "KVMHypercall.SCHED_YIELD" and r["kvm"]["verdict"] == "completed"
    assert r["guest"]["r10"] == H(0)


def test_kick_cpu_without_r12_is_refused_under_hardened_and_kicks_apic_0_under_legacy():
    assert run_json(scenario("0x0C00", r10=5, r12=1))["kvm"]["missing"] == ["r12"]
    legacy = run_json(scenario("0x0C00", policy="legacy", r10=5, r12=1))
    assert legacy["kvm"]["zero_reads"] == ["r12"]


def test_unknown_hypercall_is_enosys():
    r = run_json(scenario("0x0400", r10=0x77))
    assert r["guest"]["r10"] == "0xfffffffffffffc18"  # -KVM_ENOSYS (1000)


def test_send_ipi_counts_present_targets():
    r = run_json(scenario("0x7C00", r10=10, r11=0b1011, r12=0, r13=1, r14=0xFD))  # APIC ids 1, 2, 4
    assert r["guest"]["r10"] == H(2)  # only 1 and 2 exist among the default vCPUs 0..3


def test_map_gpa_range_hypercall_passes_arguments_verbatim():
    gpa = 1 << 51 | 0x8000_0000
    r = run_json(scenario("0x3C00", r10=12, r11=gpa, r12=2, r13=0))
    e = r["kvm"]["userspace_exit"]
    assert e["nr"] == H(12) and e["args"] == [H(gpa), H(2), H(0)]


# --- the scenario contract's errors ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad,field",
    [
        ({"guest": {"rcx": "0xZZ"}}, "guest.rcx"),
        ({"guest": {"r16": 1}}, "guest.r16"),
        ({"guest": {"rcx": 1 << 64}}, "guest.rcx"),
        ({"guest": {}, "kvm": {"policy": "strict"}}, "kvm.policy"),
        ({"guest": {}, "td": {"module": "2.0"}}, "td.module"),
        ({"kvm": {}}, "guest"),
        ({"guest": {}, "platform": {"userspace": {"ports": {"x": 1}}}}, "platform.userspace.ports"),
    ],
)
def test_malformed_scenarios_name_the_field(bad, field):
    with pytest.raises(ScenarioError) as e:
        parse(bad)
    assert str(e.value).startswith(field)


def test_legacy_dispatch_reads_of_unexposed_selectors_are_zero_reads():
    # R11 unexposed: KVM's dispatch itself read R11 as 0 (ABI §4 "Consequences today")
    r = run_json(scenario("0x1400", policy="legacy", r11=31, r12=0x803))
    assert r["kvm"]["zero_reads"] == ["r11"] and r["kvm"]["leaf"] == "unknown(0x0)"


def test_map_gpa_range_overflow_is_judged_in_frame_numbers():
    # x86.c: gpa_to_gfn(gpa) + npages must not wrap; 2^52 pages from GPA 0 do not wrap as gfns
    ok = run_json(scenario("0x3C00", r10=12, r11=0, r12=1 << 52, r13=0))
    assert ok["kvm"]["userspace_exit"]["reason"] == "KVM_EXIT_HYPERCALL"
    wraps = run_json(scenario("0x3C00", r10=12, r11=0x1000, r12=(1 << 64) - 1, r13=0))
    assert wraps["guest"]["r10"] == "0xffffffffffffffea" and wraps["kvm"]["userspace_exits"] == []  # -KVM_EINVAL


def test_send_ipi_lowest_apic_id_is_32_bits():
    r = run_json(scenario("0x7C00", r10=10, r11=0b1, r12=0, r13=1 << 32 | 2, r14=0xFD))  # min = 2
    assert r["guest"]["r10"] == H(1)


def test_xmm_values_accept_decimal_strings():
    r = run_json({"guest": {"rcx": "0x1FFCC", "r11": 10, "r12": 1, "xmm": {"xmm0": "5"}}})
    assert r["guest_xmm"]["xmm0"] == f"0x{5:032x}"

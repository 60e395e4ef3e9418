"""Hypothesis properties of the round trip (docs/abi.md §3, the hardened policy of issue 2)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tdvmcall.abi.regs import reg_index
from tdvmcall.guest import tdvmcall
from tdvmcall.kvm import leaves as L
from tdvmcall.kvm.platform import Platform, Userspace
from tdvmcall.kvm.tdx import KvmVcpu
from tdvmcall.module import TdConfig, VcpuState, tdg_vp_vmcall, tdh_vp_enter

U64 = st.integers(0, (1 << 64) - 1)
TD = st.builds(TdConfig, module=st.sampled_from(["1.0", "1.5"]), no_rbp_mod=st.booleans())
FORBIDDEN_ALWAYS = 0x13  # RAX, RCX, RSP


@st.composite
def guest_call(draw, valid=True):
    """A guest that selects some leaf (by the table's selectors and cases) with some mask."""
    td = draw(TD)
    gprs = draw(st.lists(U64, min_size=16, max_size=16))
    leaf = draw(st.sampled_from(L.LEAVES))
    case = draw(st.sampled_from(leaf.cases))
    for name, value in {**leaf.selector_values(), **case.regs}.items():
        gprs[reg_index(name)] = value
    gpr_select = draw(st.integers(0, 0xFFFF))
    if valid:
        # ABI §3: RAX, RCX, RSP always refused; RBP too on a 1.5 module for a NO_RBP_MOD TD
        gpr_select &= ~(FORBIDDEN_ALWAYS | (0x20 if td.module == "1.5" and td.no_rbp_mod else 0))
        rcx = gpr_select | draw(st.integers(0, 0xFFFF)) << 16
    else:
        bad = draw(st.sampled_from([1 << 0, 1 << 1, 1 << 4, 1 << 32, 1 << 63]))
        rcx = gpr_select | bad
    gprs[0], gprs[1] = 0, rcx
    xmm = draw(st.lists(st.integers(0, (1 << 128) - 1), min_size=16, max_size=16))
    return td, VcpuState(gprs, xmm), case


def platform_for(case, answers):
    p = Platform(userspace=Userspace(hypercall_ret=list(answers)))
    if "userspace" in case.platform:
        p.userspace.hypercall_ret = list(case.platform["userspace"]["hypercall_ret"])
    return p


@settings(max_examples=400, deadline=None)
@given(guest_call(), st.sampled_from(["legacy", "hardened"]), st.lists(st.sampled_from([0, 11, 22]), max_size=3))
def test_vmm_never_sees_an_unexposed_register_and_the_guest_keeps_them(call, policy, answers):
    td, state, case = call
    before = state.copy()
    rt = tdvmcall(td, state, KvmVcpu(policy), platform_for(case, answers))
    sel = before.gprs[1] & 0xFFFF
    assert rt.module.exited
    vmm = rt.module.exit.vmm
    for i in range(2, 16):
        if not sel >> i & 1:
            assert vmm[i] == 0, f"VMM saw unexposed r{i}"
            assert rt.after.gprs[i] == before.gprs[i], f"guest lost unexposed r{i}"
    for i in range(16):
        if not before.gprs[1] >> (16 + i) & 1:
            assert rt.module.exit.vmm_xmm[i] == 0 and rt.after.xmm[i] == before.xmm[i]


@settings(max_examples=300, deadline=None)
@given(
    guest_call(),
    st.lists(U64, min_size=16, max_size=16),
    st.lists(st.integers(0, (1 << 128) - 1), min_size=16, max_size=16),
)
def test_unexposed_registers_survive_any_host_behaviour(call, host_gprs, host_xmm):
    td, state, _ = call
    before = state.copy()
    res = tdg_vp_vmcall(td, state)
    after = tdh_vp_enter(td, res.exit, host_gprs, host_xmm)  # the host writes anything at all
    sel = before.gprs[1] & 0xFFFF
    for i in range(2, 16):
        assert after.gprs[i] == (host_gprs[i] if sel >> i & 1 else before.gprs[i])
    assert after.gprs[0] == 0 and after.gprs[1] == before.gprs[1] and after.gprs[4] == before.gprs[4]


@settings(max_examples=300, deadline=None)
@given(guest_call(valid=False), st.sampled_from(["legacy", "hardened"]))
def test_invalid_controls_never_reach_kvm(call, policy):
    td, state, case = call
    before = state.copy()
    p = platform_for(case, [])
    rt = tdvmcall(td, state, KvmVcpu(policy), p)
    assert not rt.module.exited and rt.kvm is None and p.exits == [] and p.effects == []
    assert rt.after.gprs[0] == 0xC000010000000001
    assert rt.after.gprs[1:] == before.gprs[1:] and rt.after.rip == before.rip + 4


@settings(max_examples=400, deadline=None)
@given(guest_call(), st.lists(st.sampled_from([0, 11, 22]), max_size=3))
def test_hardened_refusal_has_no_side_effect_and_cache_stays_valid(call, answers):
    td, state, case = call
    p = platform_for(case, answers)
    snap = p.snapshot()
    kvm = KvmVcpu("hardened")
    rt = tdvmcall(td, state, kvm, p)
    assert kvm.cache.invalid_pairs() == 0
    if rt.kvm.verdict in ("refused", "internal_error"):
        assert p.snapshot()["effects"] == snap["effects"] and p.snapshot()["msrs"] == snap["msrs"]
        assert p.memory == {} and all(e["reason"] == "KVM_EXIT_INTERNAL_ERROR" for e in p.exits)
    if rt.kvm.verdict == "refused":
        assert rt.after.gprs[10] == 0x8000000000000000


# --- the fuzz wing's properties on every tree, bus locks included (issue 17 item 1: the campaign's
#     strategies draw every tree now; here each tree is forced, bus lock or not) ---------------
@settings(max_examples=150, deadline=None)
@given(st.data(), st.sampled_from(["kvm-x86", "v6.16", "v7.3"]), st.booleans())
def test_fuzz_properties_hold_on_every_tree(data, tree, bus_lock):
    from tdvmcall.fuzz import strategies as S
    from tdvmcall.fuzz.campaign import run_example

    ex = data.draw(S.examples())
    ex["tree"] = tree
    ex["td"]["bus_lock"] = bus_lock
    run_example(ex)  # raises a property violation if one fails


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.sampled_from(list(L.LEAVES)))
def test_v7_3_dispatches_a_bus_lock_exit_as_the_call_without_it(gpr_select, xmm_select, leaf):
    """7.3 switches on exit_reason.basic: with or without bit 26 KVM picks the same leaf and, hardened,
    the same verdict (refused or not) for any mask; only the exit to userspace is added."""
    from tdvmcall.scenario import run_json

    mask = gpr_select & ~(FORBIDDEN_ALWAYS | 0x20) | xmm_select << 16
    guest = {"rcx": hex(mask), **{k: hex(v) for k, v in {**leaf.selector_values(), **leaf.cases[0].regs}.items()}}
    runs = [
        run_json(
            {"td": {"bus_lock": b}, "kvm": {"tree": "v7.3"}, "guest": guest, "platform": dict(leaf.cases[0].platform)}
        )
        for b in (False, True)
    ]
    plain, locked = (r["kvm"] for r in runs)
    assert plain["leaf"] == locked["leaf"] and plain["status"] == locked["status"]
    assert (plain["verdict"] == "refused") == (locked["verdict"] == "refused")
    assert int(locked["exit_reason"], 16) == int(plain["exit_reason"], 16) | 1 << 26
    assert locked["userspace_exits"], "a bus lock always ends in userspace on 7.3"

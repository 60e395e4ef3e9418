"""KVM's register cache (docs/abi.md §2): accessors, per-vendor transitions, and the invalid pair."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tdvmcall.abi.regs import CR3, EXIT_INFO_1, EXIT_INFO_2, PDPTR, R12, RAX, RBX, RIP, RSP
from tdvmcall.kvm.regcache import ModelBug, RegCache

ALL25 = (1 << 25) - 1


def test_creation_marks_all_25_registers_available_and_dirty():
    c = RegCache("vmx")
    assert c.avail == ALL25 and c.dirty == ALL25


def test_mark_dirty_sets_both_bits_and_mark_for_reload_clears_both():
    c = RegCache("vmx")
    c.reset_dirty()
    c.clear_available(1 << RBX)
    c.mark_dirty(RBX)
    assert c.is_available(RBX) and c.is_dirty(RBX)
    c.mark_for_reload(RBX)
    assert not c.is_available(RBX) and not c.is_dirty(RBX)


def test_test_and_mark_available_returns_the_old_bit():
    c = RegCache("vmx")
    c.reset_dirty()
    c.clear_available(1 << CR3)
    assert c.test_and_mark_available(CR3) is False
    assert c.test_and_mark_available(CR3) is True


def test_read_raw_of_a_non_gpr_warns_and_returns_0():
    c = RegCache("vmx")
    assert c.read_raw(RIP) == 0 and c.warnings


def test_write_raw_refuses_a_value_wider_than_64_bits():
    with pytest.raises(ValueError):
        RegCache("vmx").write_raw(RAX, 1 << 64)


def test_vmx_round_trip_writes_dirty_rsp_and_reloads_it_lazily():
    c = RegCache("vmx")
    c.regs[RSP] = 0x7000
    c.vmx_before_entry()  # RSP dirty since creation -> goes to the VMCS, dirty reset
    assert c.hw[RSP] == 0x7000 and c.dirty == 0
    c.vmx_after_exit({RAX: 5, RSP: 0x6FF0})  # the asm saves every GPR but RSP into regs
    assert c.regs[RAX] == 5 and not c.is_available(RSP) and not c.is_available(EXIT_INFO_1)
    assert c.read_raw(RSP) == 0x6FF0 and c.is_available(RSP)  # cache_reg read it from the VMCS


def test_svm_exit_copies_rax_and_resets_dirty_but_sev_es_does_not_copy():
    c = RegCache("svm")
    c.svm_after_exit({RAX: 9})
    assert c.regs[RAX] == 9 and c.dirty == 0 and not c.is_available(PDPTR)
    e = RegCache("svm")
    e.svm_after_exit({RAX: 9}, sev_es=True)
    assert e.regs[RAX] == 0


def test_tdx_legacy_exit_keeps_the_fixed_set_and_reaches_the_invalid_pair():
    c = RegCache("tdx")
    c.tdx_after_exit_legacy()
    assert c.avail == 0x0180FFEF
    # dirty is never reset for a TD: RSP, RIP, PDPTR, CR0, CR3, CR4, RFLAGS, SEGMENTS are now
    # avail 0 / dirty 1, the combination kvm_cache_regs.h calls invalid (bits 4 and 16..22)
    assert c.invalid_pairs() == 1 << 4 | 0x7F << 16


def test_tdx_cache_reg_warns_and_leaves_the_stale_value():
    c = RegCache("tdx")
    c.regs[R12] = 0xAA
    c.tdx_after_exit_hardened({})
    assert c.read_raw(R12) == 0xAA and any("cache_reg" in w for w in c.warnings)


def test_strict_cache_raises_on_an_unavailable_read():
    c = RegCache("tdx", strict=True)
    c.tdx_after_exit_hardened({R12: 1})
    assert c.read_raw(R12) == 1
    with pytest.raises(ModelBug):
        c.read_raw(RBX)


def test_hardened_exit_marks_exactly_the_exposed_registers_and_exit_info():
    c = RegCache("tdx", strict=True)
    c.tdx_after_exit_hardened({1: 0xFFCC, R12: 7})
    assert c.avail == 1 << 1 | 1 << R12 | 1 << EXIT_INFO_1 | 1 << EXIT_INFO_2 and c.dirty == 0


# --- property: the invalid pair is unreachable through the accessors and the VMX/SVM transitions ---
reg = st.integers(0, 24)
gpr = st.integers(0, 15)
ops = st.one_of(
    st.tuples(st.just("mark_available"), reg),
    st.tuples(st.just("mark_dirty"), reg),
    st.tuples(st.just("mark_for_reload"), reg),
    st.tuples(st.just("test_and_mark_available"), reg),
    st.tuples(st.just("clear_available"), st.integers(0, ALL25)),
    st.tuples(st.just("reset_dirty")),
    st.tuples(st.just("read_raw"), reg),
    st.tuples(st.just("write_raw"), gpr, st.integers(0, (1 << 64) - 1)),
    st.tuples(st.just("vmx_before_entry")),
    st.tuples(st.just("vmx_after_exit"), st.dictionaries(gpr, st.integers(0, (1 << 64) - 1), max_size=4)),
    st.tuples(st.just("svm_before_entry")),
    st.tuples(st.just("svm_after_exit"), st.dictionaries(gpr, st.integers(0, (1 << 64) - 1), max_size=4)),
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["vmx", "svm"]), st.lists(ops, max_size=40))
def test_invalid_pair_is_unreachable(vendor, seq):
    c = RegCache(vendor)
    for op, *args in seq:
        getattr(c, op)(*args)
        assert c.invalid_pairs() == 0, (op, args)
        assert c.avail <= ALL25 and c.dirty <= ALL25

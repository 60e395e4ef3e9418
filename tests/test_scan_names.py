"""Readable names (scan/names.py): mangled Rust and C++ symbols demangled, everything else kept.

The expected names are derived by hand from the mangling rules, not from the demangler:
- Rust legacy: Itanium's nested name ``_ZN <length><identifier>… E`` whose last component is the hash
  ``h`` + 16 hex digits (written ``17h…``), dropped when shown; ``$LT$``/``$GT$`` stand for ``<``/``>``
  and ``..`` for ``::`` inside a component (rustc ``compiler/rustc_symbol_mangling/src/legacy.rs``).
- Rust v0 (RFC 2603, ``rustc_symbol_mangling/src/v0.rs``): ``_R`` then a path: ``C`` a crate root
  (``s<base-62>_`` its disambiguator, not shown), ``Nt`` a module (type namespace), ``Nv`` a
  function (value namespace), ``M`` an inherent impl shown ``<Type>``, ``I … E`` generic arguments
  shown ``::<…>``.
- C++ (Itanium C++ ABI, "Mangling"): ``_ZN…E`` a nested name, then the parameter types (``v`` no
  parameters, ``m`` unsigned long, ``P`` a pointer).
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tdvmcall.scan.names import readable, readable_label, readable_via


def test_legacy_rust_path_shown_without_its_hash() -> None:
    # 10 "tdx_tdcall", 3 "tdx", 13 "tdvmcall_halt", 17 "h0123456789abcdef"
    assert readable("_ZN10tdx_tdcall3tdx13tdvmcall_halt17h0123456789abcdefE") == "tdx_tdcall::tdx::tdvmcall_halt"
    # td-shim's td_call stub's caller, Oak's msr write: the same rules
    assert readable("_ZN13oak_tdx_guest6vmcall9msr_write17hfedcba9876543210E") == "oak_tdx_guest::vmcall::msr_write"


def test_legacy_rust_escapes() -> None:
    # 35 = len("drop_in_place$LT$std..env..Args$GT$"): 13 + 4 + 14 + 4
    assert readable("_ZN4core3ptr35drop_in_place$LT$std..env..Args$GT$17h8e66be1680e45ed7E") == (
        "core::ptr::drop_in_place<std::env::Args>"
    )


def test_v0_rust_paths() -> None:
    assert readable("_RNvNtCs1234_10tdx_tdcall3tdx13tdvmcall_halt") == "tdx_tdcall::tdx::tdvmcall_halt"
    assert readable("_RNvCs1_5guest4main") == "guest::main"
    # an inherent impl's method: M, the impl's own path (the crate), then its self type
    assert readable("_RNvMCs1_5guestNtCs1_5guest4Regs5union") == "<guest::Regs>::union"
    # a generic function: I <path> <argument> E
    assert (
        readable("_RINvNtCs1_4core3ptr13drop_in_placeNtCs2_5guest4ArgsE") == "core::ptr::drop_in_place::<guest::Args>"
    )


def test_cpp_itanium_names() -> None:
    assert readable("_ZN3foo3barEv") == "foo::bar()"
    assert readable("_ZN9tdx_guest8tdvmcallEmPm") == "tdx_guest::tdvmcall(unsigned long, unsigned long*)"


def test_names_that_are_not_mangled_are_kept() -> None:
    for name in ("sub_3bf0", "entry point", "rs_vmcall", "__tdx_hypercall", "_start", "main", "", "_Z", "_R", "_RNv"):
        assert readable(name) == name


def test_labels_and_via_chains() -> None:
    assert readable_label("_ZN3foo3barE+0x1d") == "foo::bar+0x1d"
    assert readable_label("sub_3bf0+0x40") == "sub_3bf0+0x40"
    assert readable_label("0x1234") == "0x1234"  # a caller the deep engine found outside any function
    via = "_ZN10tdx_tdcall3tdx9td_vmcall17h0123456789abcdefE+0xd ← _RNvCs1_5guest4main+0x1d ← sub_10+0x4"
    assert readable_via(via) == "tdx_tdcall::tdx::td_vmcall+0xd ← guest::main+0x1d ← sub_10+0x4"
    assert readable_via(None) is None


IDENT = st.from_regex(r"[a-z][a-z0-9_]{0,11}", fullmatch=True)
PATHS = st.lists(IDENT, min_size=2, max_size=5)


def _len_prefixed(parts: list[str]) -> str:
    return "".join(f"{len(p)}{p}" for p in parts)


@given(PATHS, st.from_regex(r"[0-9a-f]{16}", fullmatch=True))
def test_any_legacy_rust_path(parts: list[str], digest: str) -> None:
    """``_ZN`` + each component length-prefixed + ``17h<16 hex>`` + ``E`` reads back as the path."""
    assert readable(f"_ZN{_len_prefixed(parts)}17h{digest}E") == "::".join(parts)


@given(PATHS, st.from_regex(r"[0-9a-zA-Z]{0,8}", fullmatch=True))
def test_any_v0_rust_path(parts: list[str], disambiguator: str) -> None:
    """``C`` the crate, ``Nt`` each module, ``Nv`` the function, nested outward-in, reads back as the path."""
    crate, *mods, fn = parts
    path = f"Cs{disambiguator}_{len(crate)}{crate}"
    for m in mods:
        path = f"Nt{path}{len(m)}{m}"
    assert readable(f"_RNv{path}{len(fn)}{fn}") == "::".join(parts)

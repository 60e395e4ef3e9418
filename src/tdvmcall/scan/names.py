"""Readable function names: Rust (legacy and v0) and C++ (Itanium) symbols demangled.

A Rust guest (td-shim's ``tdx-tdcall``, Oak's ``oak_tdx_guest``) names its functions with mangled
symbols: the legacy scheme wraps the path in Itanium's nested-name form and ends it with a hash
(``_ZN10tdx_tdcall3tdx13tdvmcall_halt17h0123456789abcdefE``: ``tdx_tdcall::tdx::tdvmcall_halt``),
the v0 scheme (``-C symbol-mangling-version=v0``) starts with ``_R`` (``_RNvNtCs…_10tdx_tdcall3tdx
13tdvmcall_halt``); C++ compilers use the Itanium scheme (``_ZN3foo3barEv``: ``foo::bar()``).

The demangling is pydemumble's (the angr project's binding of demumble, which runs LLVM's
demanglers: ``llvm/lib/Demangle`` ``ItaniumDemangle.cpp`` for ``_Z``, ``RustDemangle.cpp`` for
``_R``; a legacy Rust symbol is an Itanium name whose last component is the ``h`` + 16 hex digits
hash, which LLVM drops).  A name that is not mangled, or that the demangler does not accept, is
kept as it is: ``sub_3bf0``, ``entry point``, a C function, an assembly label.

The raw symbols stay in the sites (:attr:`analyze.Site.function`, ``scan --json``'s ``symbol`` and
``via``); the report, ``--verbose``, the HTML page, ``--to-catalog`` and the words of ``how`` show
these readable ones (docs/scan.md).
"""

from __future__ import annotations

from functools import lru_cache

from pydemumble import demangle as _demangle

#: prefixes of mangled names (Itanium ``_Z``, Rust v0 ``_R``; Mach-O adds one more underscore)
MANGLED = ("_Z", "_R", "__Z", "__R")
#: links of a ``via`` chain (analyze.py joins the callers with it)
VIA_SEP = " ← "


@lru_cache(maxsize=1 << 16)
def readable(name: str) -> str:
    """The demangled name of a mangled symbol, else the name as it is."""
    if not name.startswith(MANGLED):
        return name
    try:
        out = _demangle(name)
    except Exception:  # a name the binding cannot take (it answers "" for one it does not parse)
        return name
    return out or name


def readable_label(label: str) -> str:
    """``name+0x1d`` with the name demangled (a mangled name never holds a ``+``)."""
    name, plus, offset = label.rpartition("+")
    if not plus or not offset.startswith("0x"):
        return readable(label)
    return f"{readable(name)}+{offset}"


def readable_via(via: str | None) -> str | None:
    """A ``via`` chain (``hypercall+0xd ← do_halt+0x1d``) with each caller's name demangled."""
    if via is None:
        return None
    return VIA_SEP.join(readable_label(p) for p in via.split(VIA_SEP))

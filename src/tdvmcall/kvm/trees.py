"""The kernel trees the model knows, and the rules by which each one handles a TDVMCALL exit.

Where trees differ (how an exit is re-labelled, which function dispatches it, what a bus lock does,
which MSRs KVM emulates, how MapGPA reads userspace's answer) the difference is a named rule here,
one :class:`TreeRule` per tree in :data:`TREES`, read by the model (``tdx.py``, ``handlers.py``,
``platform.py``) and by the C generator; no tool branches on a tree's name.  Each rule cites the
function and the line of that tree's ``arch/x86/kvm/vmx/tdx.c`` it was read at.

Trees, and where they were read:

``kvm-x86``  the kvm-x86 tree of 2026 (kvm-x86/linux @09c6f74e; the model's default)
``v6.16``    the v6.16.1 release (KT0511/linux-6.16.1 @30b97c8, a copy of the release whose local
             changes add printk lines and touch none of the functions cited here)
``v7.3``     Debian's ``linux-source-7.3`` 7.3.4-1~bpo13+1 (trixie-backports), the 7.x rule
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..abi.codes import EXIT_REASON_BUS_LOCK_DETECTED, EXIT_REASON_TDCALL
from . import leaves as L

#: ``tdx_to_vmx_exit_reason()`` switches on the whole 32-bit exit reason: a TDCALL exit that carries a
#: flag bit (bit 26, bus lock detected) matches no case, is not re-labelled by its leaf, reaches
#: ``handle_tdvmcall()`` by its basic reason and is dispatched there on R11 alone
RELABEL_WHOLE_REASON = "whole-reason"
#: ``tdx_to_vmx_exit_reason()`` switches on ``exit_reason.basic`` (bits 15:0): a flagged TDCALL exit is
#: re-labelled by its leaf like any other, and keeps its flag bits
RELABEL_BASIC = "basic"

#: MapGPA's completion: EAGAIN is RETRY, EINVAL INVALID_OPERAND, any other non-zero ret fails KVM_RUN
MAP_GPA_EAGAIN_EINVAL = "eagain-einval"
#: MapGPA's completion: any non-zero ret is INVALID_OPERAND
MAP_GPA_ANY_INVALID = "any-invalid-operand"

#: ``tdx_has_emulated_msr()``: an allow-list of 16 x2APIC registers
X2APIC_ALLOW_LIST = "allow-list"
#: ``tdx_has_emulated_msr()``: every x2APIC index but a deny-list, which through a range bug caught
#: only 0x808, 0x80A, 0x80B, 0x810, 0x818 and 0x820
X2APIC_DENY_LIST = "deny-list"

#: ``run->exit_reason`` and the ``run->flags`` bit 7.3's ``tdx_handle_exit()`` uses after a bus lock
#: (Linux ``include/uapi/linux/kvm.h`` KVM_EXIT_X86_BUS_LOCK 33, ``asm/kvm.h`` KVM_RUN_X86_BUS_LOCK)
KVM_EXIT_X86_BUS_LOCK = "KVM_EXIT_X86_BUS_LOCK"
KVM_RUN_X86_BUS_LOCK = "KVM_RUN_X86_BUS_LOCK"

_BASIC = 0xFFFF


@dataclass(frozen=True)
class TreeRule:
    """How one kernel tree handles a TDVMCALL exit.

    ``relabel``: :data:`RELABEL_WHOLE_REASON` or :data:`RELABEL_BASIC` (``tdx_to_vmx_exit_reason()``).
    ``exit_dispatcher``: the ``tdx.c`` function that switches on the (re-labelled) exit reason and
    calls ``handle_tdvmcall()``, ``tdx_emulate_cpuid()`` ..., where a check of the exposed registers
    belongs; ``exit_handler``: the vendor op KVM calls (``vt_handle_exit()`` -> it).
    ``bus_lock_user_exit``: after a bus-lock exit, ``tdx_handle_exit()`` turns a call finished in the
    kernel into a KVM_EXIT_X86_BUS_LOCK exit to userspace and sets KVM_RUN_X86_BUS_LOCK in
    ``run->flags`` in any case.  ``map_gpa_userspace_errors``, ``x2apic_msrs``: see the constants.
    ``lines``: the function -> line of this tree's ``tdx.c`` the rule was read at (None where the
    tree was read through a file viewer without line numbers).  ``version``: the kernel release
    (major, minor) the tree is, as its top Makefile says; None for kvm-x86, which names none."""

    name: str
    release: str
    source: str
    relabel: str
    exit_dispatcher: str
    exit_handler: str
    bus_lock_user_exit: bool
    map_gpa_userspace_errors: str
    x2apic_msrs: str
    lines: Mapping[str, int | None] = field(default_factory=dict)
    version: tuple[int, int] | None = None  # the release's (major, minor); None for a development tree

    # --- the exit reason ---------------------------------------------------------------------
    def dispatches_on_r11_alone(self, reason: int) -> bool:
        """Whether an exit with this reason (TDH.VP.ENTER's RAX, low 32 bits) reaches
        ``handle_tdvmcall()`` without being re-labelled, to be dispatched on R11 alone: a TDCALL exit
        whose reason carries a flag bit, under :data:`RELABEL_WHOLE_REASON`; never under
        :data:`RELABEL_BASIC`."""
        reason &= 0xFFFFFFFF
        if self.relabel == RELABEL_BASIC:
            return False
        return reason != EXIT_REASON_TDCALL and reason & _BASIC == EXIT_REASON_TDCALL

    def lookup(self, r10: int, r11: int, bus_lock: bool) -> L.Leaf:
        """The call KVM runs for a TDVMCALL exit with these R10 and R11, ``bus_lock`` telling whether
        the exit reason carries bit 26: under :data:`RELABEL_WHOLE_REASON` a bus-lock exit is
        dispatched on R11 alone (``leaves.lookup(..., bus_lock=True)``), under :data:`RELABEL_BASIC`
        as the same call without the flag.  (For any other flag bit ask
        :meth:`dispatches_on_r11_alone` with the whole reason.)  The C generator's dispatch."""
        return L.lookup(r10, r11, bus_lock and self.relabel == RELABEL_WHOLE_REASON)

    def vmx_exit_reason(self, reason: int, leaf_reason: int) -> int:
        """The VMX exit reason KVM reports (``vt->exit_reason.full``, the ``kvm_exit`` trace) for a
        TDCALL exit with this reason whose call the leaf table says is reported as ``leaf_reason``:
        under :data:`RELABEL_WHOLE_REASON` the leaf's reason, or the reason untouched when it
        carries a flag; under :data:`RELABEL_BASIC` the leaf's basic reason with the exit's flag
        bits kept (0x0400000A for a bus-lock CPUID)."""
        reason &= 0xFFFFFFFF
        if self.relabel == RELABEL_BASIC:
            return reason & ~_BASIC | leaf_reason & _BASIC
        return reason if self.dispatches_on_r11_alone(reason) else leaf_reason

    def reported_dispatch(self, reported: int) -> tuple[int, bool] | None:
        """How a TDVMCALL exit that KVM reports with this reason (``vt->exit_reason.full``, what the
        ``kvm_exit`` trace prints: :meth:`vmx_exit_reason`'s result, flag bits included) was
        dispatched: ``(basic, on_r11_alone)``, ``basic`` the reason (bits 15:0) whose leaves it may
        be (``leaves.reason_leaves``), ``on_r11_alone`` whether it was instead dispatched on R11
        alone (``leaves.bus_lock_leaves``, the call :meth:`lookup` gives with ``bus_lock``).
        ``None`` when this tree never reports a TDVMCALL exit with this reason: under
        :data:`RELABEL_WHOLE_REASON` a re-labelled reason (CPUID, VMCALL, ...) carries no flag bit,
        because only a reason equal to TDCALL is re-labelled; under :data:`RELABEL_BASIC` any flag
        bit is kept by the re-labelled reason, and the call is the same as without it."""
        reported &= 0xFFFFFFFF
        basic = reported & _BASIC
        if reported == basic or self.relabel == RELABEL_BASIC:
            return basic, False
        if basic == EXIT_REASON_TDCALL:
            return basic, self.dispatches_on_r11_alone(reported)
        return None

    def bus_lock_exits_to_userspace(self, reason: int) -> bool:
        """Whether ``tdx_handle_exit()`` sends this exit to userspace because of a bus lock (bit 26),
        once the call is handled (KVM_EXIT_X86_BUS_LOCK if it finished in the kernel, else the
        call's own exit with KVM_RUN_X86_BUS_LOCK in ``run->flags``)."""
        return self.bus_lock_user_exit and bool(reason & EXIT_REASON_BUS_LOCK_DETECTED)

    def as_dict(self) -> dict[str, Any]:
        """The rule as plain data (for the C generator and ``--json`` readers)."""
        return {
            "name": self.name,
            "release": self.release,
            "source": self.source,
            "relabel": self.relabel,
            "exit_dispatcher": self.exit_dispatcher,
            "exit_handler": self.exit_handler,
            "bus_lock_user_exit": self.bus_lock_user_exit,
            "map_gpa_userspace_errors": self.map_gpa_userspace_errors,
            "x2apic_msrs": self.x2apic_msrs,
            "lines": dict(self.lines),
            "version": list(self.version) if self.version else None,
        }


#: every tree the model knows, by the name scenarios and ``--tree`` use; the first is the default
TREES: dict[str, TreeRule] = {
    "kvm-x86": TreeRule(
        "kvm-x86",
        "the kvm-x86 tree of 2026",
        "kvm-x86/linux @09c6f74e arch/x86/kvm/vmx/tdx.c",
        relabel=RELABEL_WHOLE_REASON,
        exit_dispatcher="tdx_handle_exit",
        exit_handler="tdx_handle_exit",
        bus_lock_user_exit=False,
        map_gpa_userspace_errors=MAP_GPA_EAGAIN_EINVAL,
        x2apic_msrs=X2APIC_ALLOW_LIST,
        lines={
            "tdx_to_vmx_exit_reason": None,
            "handle_tdvmcall": None,
            "tdx_handle_exit": None,
            "tdx_complete_vmcall_map_gpa": None,
            "tdx_has_emulated_msr": None,
        },
    ),
    "v6.16": TreeRule(
        "v6.16",
        "Linux v6.16.1",
        "KT0511/linux-6.16.1 @30b97c8 arch/x86/kvm/vmx/tdx.c",
        relabel=RELABEL_WHOLE_REASON,
        exit_dispatcher="tdx_handle_exit",
        exit_handler="tdx_handle_exit",
        bus_lock_user_exit=False,
        map_gpa_userspace_errors=MAP_GPA_ANY_INVALID,
        x2apic_msrs=X2APIC_DENY_LIST,
        lines={
            "tdx_to_vmx_exit_reason": 900,  # switch (exit_reason) at 918
            "tdx_complete_vmcall_map_gpa": 1156,
            "handle_tdvmcall": 1561,
            "tdx_handle_exit": 2041,
            "tdx_has_emulated_msr": 2171,
        },
        version=(6, 16),
    ),
    "v7.3": TreeRule(
        "v7.3",
        "Linux 7.3.4 (Debian linux-source-7.3 7.3.4-1~bpo13+1)",
        "linux-source-7.3 7.3.4-1~bpo13+1 arch/x86/kvm/vmx/tdx.c",
        relabel=RELABEL_BASIC,
        exit_dispatcher="__tdx_handle_exit",
        exit_handler="tdx_handle_exit",
        bus_lock_user_exit=True,
        map_gpa_userspace_errors=MAP_GPA_EAGAIN_EINVAL,
        x2apic_msrs=X2APIC_ALLOW_LIST,
        lines={
            "tdx_to_vmx_exit_reason": 938,  # switch (exit_reason.basic) at 955
            "tdx_complete_vmcall_map_gpa": 1198,
            "handle_tdvmcall": 1611,
            "__tdx_handle_exit": 2053,
            "tdx_handle_exit": 2165,  # the bus-lock exit to userspace at 2170
            "tdx_has_emulated_msr": 2200,
        },
        version=(7, 3),
    ),
}
DEFAULT_TREE = "kvm-x86"
TREE_NAMES: tuple[str, ...] = tuple(TREES)


class UnknownTreeError(KeyError, ValueError):
    """A name that is no tree of the model; the message names the accepted ones.  A ``KeyError``
    (what :func:`tree_rule` has always raised) and a ``ValueError`` (a bad value of an option or a
    field), printed without the quotes ``KeyError`` adds."""

    def __str__(self) -> str:
        return str(self.args[0])


def check_tree(name: object) -> str:
    """``name`` if it names a tree of the model (:data:`TREE_NAMES`, exactly), else
    :class:`UnknownTreeError` ``'<name>' is not a KVM tree; accepted: kvm-x86, ...``.  The one
    check every tool and the scenario parser make; each prefixes the option or field it read."""
    if not isinstance(name, str) or name not in TREES:
        raise UnknownTreeError(f"{name!r} is not a KVM tree; accepted: {', '.join(TREE_NAMES)}")
    return name


def tree_help(lead: str = "KVM tree") -> str:
    """The help text of a ``--tree`` option, built from :data:`TREE_NAMES` so that it lists every
    tree: ``<lead>: kvm-x86 (the default), v6.16 or v7.3`` (each tree's release: docs/model.md)."""
    words = [f"{n} (the default)" if n == DEFAULT_TREE else n for n in TREE_NAMES]
    listed = words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"
    return f"{lead}: {listed}"


def tree_rule(name: str) -> TreeRule:
    """The rule of a tree by name; :class:`UnknownTreeError` (a ``KeyError``) naming the accepted
    ones otherwise."""
    return TREES[check_tree(name)]


__all__ = [
    "DEFAULT_TREE",
    "KVM_EXIT_X86_BUS_LOCK",
    "KVM_RUN_X86_BUS_LOCK",
    "MAP_GPA_ANY_INVALID",
    "MAP_GPA_EAGAIN_EINVAL",
    "RELABEL_BASIC",
    "RELABEL_WHOLE_REASON",
    "TREES",
    "TREE_NAMES",
    "X2APIC_ALLOW_LIST",
    "X2APIC_DENY_LIST",
    "TreeRule",
    "UnknownTreeError",
    "check_tree",
    "tree_help",
    "tree_rule",
]

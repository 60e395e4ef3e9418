"""The leaf table: for every TDVMCALL KVM knows, the registers it reads and writes.

This table is the single source of truth.  The handlers (``handlers.py``) declare nothing of their
own: the hardened validation (``tdx.py``), the expected-output check, the catalog check, the mask
sweep, the trace audit and ``tdvmcall leaves`` all read it.

Register roles follow Linux ``arch/x86/kvm/vmx/tdx.c`` (kvm-x86 tree, 2026; ``handle_tdvmcall()``
and one function per leaf, named in each row's ``source``) and x86.c ``____kvm_emulate_hypercall()``
for the KVM hypercalls, as curated in docs/abi.md §4.  A fact known only second-hand says so.

Conventions:
- Every call needs R10 exposed (the selector, and where the status goes); a GHCI call (R10 = 0)
  also needs R11 (its leaf number).  These are ``Leaf.selectors``, not repeated in ``inputs``.
- An input with ``required=False`` is read "if valid" (0 when not exposed) and never refuses a call.
- An output's ``on`` says for which outcome it is written: ``any``, ``success`` (no error status) or
  ``failure`` (a non-zero status in R10, RETRY included).  Conditions (``when``) depend on inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

from ..abi.codes import (
    EXIT_REASON_CPUID,
    EXIT_REASON_EPT_MISCONFIG,
    EXIT_REASON_HLT,
    EXIT_REASON_IO_INSTRUCTION,
    EXIT_REASON_MSR_READ,
    EXIT_REASON_MSR_WRITE,
    EXIT_REASON_TDCALL,
    EXIT_REASON_VMCALL,
)
from ..abi.regs import mask_of

TDX_C = "linux arch/x86/kvm/vmx/tdx.c"
X86_C = "linux arch/x86/kvm/x86.c ____kvm_emulate_hypercall()"


@dataclass(frozen=True)
class Cond:
    """A condition on one input register: ``op`` is ``eq``, ``in`` or ``bit`` (bit number set);
    the register is first truncated to its low ``width`` bits, as KVM does."""

    reg: str
    op: str
    value: int | tuple[int, ...]
    text: str
    width: int = 64

    def holds(self, value: int) -> bool:
        v = value & ((1 << self.width) - 1)
        if self.op == "eq":
            return v == self.value
        if self.op == "in":
            return v in self.value  # type: ignore[operator]
        if self.op == "bit":
            return bool(v >> self.value & 1)  # type: ignore[operator]
        raise ValueError(f"unknown condition op {self.op!r}")


@dataclass(frozen=True)
class Operand:
    reg: str
    role: str
    when: Cond | None = None
    required: bool = True
    on: str = "any"  # outputs only: any | success | failure


K = TypeVar("K")
V = TypeVar("V")


def _immutable(obj: object) -> NoReturn:
    raise TypeError(f"{type(obj).__name__} is immutable: the leaf table's rows do not change")


class FrozenDict(dict[K, V]):
    """A dict that cannot change and hashes (over its items): the values of a leaf-table row.  A
    ``dict`` subclass, so ``d["r12"]``, ``{**d}``, ``dict(d)``, ``d | other`` and ``json.dumps(d)``
    work as for a dict; every mutating method raises ``TypeError``."""

    __slots__ = ()

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))

    def __reduce__(self) -> tuple[Any, ...]:  # pickle (sweep's worker processes) and copy
        return (type(self), (dict(self),))

    def __setitem__(self, key: K, value: V) -> NoReturn:
        _immutable(self)

    def __delitem__(self, key: K) -> NoReturn:
        _immutable(self)

    def __ior__(self, other: Any) -> NoReturn:  # type: ignore[misc]
        _immutable(self)

    def clear(self) -> NoReturn:
        _immutable(self)

    def pop(self, *args: Any) -> NoReturn:
        _immutable(self)

    def popitem(self) -> NoReturn:
        _immutable(self)

    def setdefault(self, *args: Any) -> NoReturn:
        _immutable(self)

    def update(self, *args: Any, **kwargs: Any) -> NoReturn:
        _immutable(self)


class FrozenList(list[V]):
    """A list that cannot change and hashes (over its items): a list inside a row's ``platform``
    (a ``list`` subclass, so the scenario parser and JSON take it as a list)."""

    __slots__ = ()

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(self))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (list(self),))

    def __setitem__(self, *args: Any) -> NoReturn:
        _immutable(self)

    def __delitem__(self, *args: Any) -> NoReturn:
        _immutable(self)

    def __iadd__(self, other: Any) -> NoReturn:  # type: ignore[misc]
        _immutable(self)

    def __imul__(self, other: Any) -> NoReturn:  # type: ignore[misc]
        _immutable(self)

    def append(self, *args: Any) -> NoReturn:
        _immutable(self)

    def extend(self, *args: Any) -> NoReturn:
        _immutable(self)

    def insert(self, *args: Any) -> NoReturn:
        _immutable(self)

    def pop(self, *args: Any) -> NoReturn:
        _immutable(self)

    def remove(self, *args: Any) -> NoReturn:
        _immutable(self)

    def clear(self) -> NoReturn:
        _immutable(self)

    def sort(self, *args: Any, **kwargs: Any) -> NoReturn:
        _immutable(self)

    def reverse(self) -> NoReturn:
        _immutable(self)


def frozen(value: Any) -> Any:
    """``value`` with every dict and list in it, at any depth, made a :class:`FrozenDict` or a
    :class:`FrozenList` (tuples keep their type, their items frozen)."""
    if isinstance(value, dict):
        return FrozenDict({k: frozen(v) for k, v in value.items()})
    if isinstance(value, list):
        return FrozenList(frozen(v) for v in value)
    if isinstance(value, tuple):
        return tuple(frozen(v) for v in value)
    return value


@dataclass(frozen=True)
class Case:
    """Input values that exercise one condition of a leaf (used by check, sweep and vectors).
    ``platform`` overrides the default platform, e.g. a userspace answer that asks for RETRY.

    Immutable and hashable, like the rest of the table: ``regs`` and ``platform`` are given as
    plain dicts and stored as :class:`FrozenDict` (nested dicts and lists frozen too), which still
    read, unpack (``{**case.regs}``) and export to JSON as dicts."""

    name: str
    regs: Mapping[str, int]
    platform: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "regs", frozen(self.regs))
        object.__setattr__(self, "platform", frozen(self.platform))


@dataclass(frozen=True)
class Leaf:
    name: str
    family: str  # "ghci" | "kvm-hypercall"
    r11: int | None  # GHCI sub-function (leaf) number
    nr: int | None  # KVM hypercall number
    reason: int  # VMX exit reason KVM reports (kvm_exit trace, exit handlers)
    inputs: tuple[Operand, ...]
    outputs: tuple[Operand, ...]
    handling: str
    source: str
    userspace: str | None = None  # the KVM_EXIT_* it may cause
    cases: tuple[Case, ...] = (Case("default", {}),)
    note: str = ""

    @property
    def selectors(self) -> tuple[str, ...]:
        return ("r10",) if self.family == "kvm-hypercall" else ("r10", "r11")

    @property
    def selector_mask(self) -> int:
        return mask_of(self.selectors)

    def selector_values(self) -> dict[str, int]:
        """R10/R11 values that select this leaf."""
        if self.family == "kvm-hypercall":
            return {"r10": self.nr or 0}
        return {"r10": 0, "r11": self.r11 or 0}


def _in(reg: str, role: str, **kw: Any) -> Operand:
    return Operand(reg, role, **kw)


def _out(reg: str, role: str, on: str = "any", **kw: Any) -> Operand:
    return Operand(reg, role, on=on, **kw)


STATUS_ON_ERROR = _out("r10", "TDVMCALL status (written only on error)", on="failure")
STATUS_ALWAYS = _out("r10", "TDVMCALL status")
HC_RESULT = _out("r10", "hypercall result (0, a count, or -KVM_E*)")

IO_READ = Cond("r13", "eq", 0, "direction = 0 (in)")
IO_WRITE = Cond("r13", "eq", 1, "direction = 1 (out)")
MMIO_READ = Cond("r13", "eq", 0, "direction (low 32 bits) = 0 (read)", width=32)
MMIO_WRITE = Cond("r13", "eq", 1, "direction (low 32 bits) = 1 (write)", width=32)
FATAL_GPA = Cond("r12", "bit", 63, "R12 bit 63 set (GPA in R13 valid)")
INFO_KNOWN = Cond("r12", "in", (0, 1), "R12 (leaf) is 0 or 1")

#: the 64-byte ReportFatalError message, in the order the GHCI and KVM lay it out
FATAL_MESSAGE_REGS = ("r14", "r15", "rbx", "rdi", "rsi", "r8", "r9", "rdx")

# Default guest-physical addresses used by the cases (shared bit 51 for a 52-bit GPAW TD)
SHARED_BIT = 1 << 51
_SHARED_PAGE = SHARED_BIT | 0x8000_0000
_PRIVATE_PAGE = 0x8000_0000

GHCI_LEAVES: tuple[Leaf, ...] = (
    Leaf(
        "GetTdVmCallInfo",
        "ghci",
        0x10000,
        None,
        EXIT_REASON_TDCALL,
        inputs=(_in("r12", "leaf (0: GHCI basics, 1: supported sub-functions)"),),
        outputs=(
            STATUS_ALWAYS,
            _out("r11", "info word 0", when=INFO_KNOWN),
            _out("r12", "info word 1", when=INFO_KNOWN),
            _out("r13", "info word 2", when=INFO_KNOWN),
            _out("r14", "info word 3", when=INFO_KNOWN),
        ),
        handling="leaf 0 in kernel (R11..R14 = 0); leaf 1 exits to userspace, which fills R10, R11..R14; "
        "other leaves INVALID_OPERAND with R11..R14 untouched",
        source=f"{TDX_C} tdx_get_td_vm_call_info()",
        userspace="KVM_EXIT_TDX",
        cases=(Case("leaf0", {"r12": 0}), Case("leaf1", {"r12": 1}), Case("bad-leaf", {"r12": 2})),
    ),
    Leaf(
        "MapGPA",
        "ghci",
        0x10001,
        None,
        EXIT_REASON_TDCALL,
        inputs=(_in("r12", "start GPA (shared bit: convert to shared)"), _in("r13", "size in bytes")),
        outputs=(STATUS_ON_ERROR, _out("r11", "GPA to resume from (error or RETRY)", on="failure")),
        handling="checks (exit-hypercall cap, range, alignment), then one KVM_EXIT_HYPERCALL "
        "(MAP_GPA_RANGE) per chunk of at most 2 MiB; EAGAIN or a pending event -> RETRY, EINVAL -> "
        "INVALID_OPERAND, any other userspace ret -> KVM_RUN fails with -EINVAL (no status, no resume)",
        source=f"{TDX_C} tdx_map_gpa(), tdx_complete_vmcall_map_gpa()",
        userspace="KVM_EXIT_HYPERCALL",
        cases=(
            Case("to-shared", {"r12": _SHARED_PAGE, "r13": 0x1000}),
            Case("to-private-4MiB", {"r12": _PRIVATE_PAGE, "r13": 0x40_0000}),
            Case("retry", {"r12": _SHARED_PAGE, "r13": 0x40_0000}, {"userspace": {"hypercall_ret": [0, 11]}}),
            Case("unaligned", {"r12": _SHARED_PAGE | 0x10, "r13": 0x1000}),
        ),
        note="R11 is written only on error or RETRY: on success the guest gets its own R11 back",
    ),
    Leaf(
        "GetQuote",
        "ghci",
        0x10002,
        None,
        EXIT_REASON_TDCALL,
        inputs=(_in("r12", "shared GPA of the quote buffer"), _in("r13", "buffer size")),
        outputs=(STATUS_ALWAYS,),
        handling="INVALID_OPERAND if the GPA is private; else KVM_EXIT_TDX and R10 = userspace's ret",
        source=f"{TDX_C} tdx_get_quote()",
        userspace="KVM_EXIT_TDX",
        cases=(
            Case("shared", {"r12": _SHARED_PAGE, "r13": 0x2000}),
            Case("private", {"r12": _PRIVATE_PAGE, "r13": 0x2000}),
        ),
    ),
    Leaf(
        "ReportFatalError",
        "ghci",
        0x10003,
        None,
        EXIT_REASON_TDCALL,
        inputs=(
            _in("r12", "error code (bit 63: R13 holds a GPA)"),
            _in("r13", "GPA of extra information", when=FATAL_GPA),
        )
        + tuple(
            _in(r, f"message bytes {8 * i}..{8 * i + 7}", required=False) for i, r in enumerate(FATAL_MESSAGE_REGS)
        ),
        outputs=(),
        handling="KVM_EXIT_SYSTEM_EVENT (TDX_FATAL) with every GPR slot in data[]; no status, no completion",
        source=f"{TDX_C} tdx_report_fatal_error()",
        userspace="KVM_EXIT_SYSTEM_EVENT",
        cases=(
            Case("code-only", {"r12": 0x0001_0000}),
            Case("with-gpa", {"r12": 1 << 63 | 0x0001_0000, "r13": _SHARED_PAGE}),
        ),
        note="message registers are optional: an unexposed one reads as 0 (QEMU packs the exposed ones)",
    ),
    Leaf(
        "SetupEventNotifyInterrupt",
        "ghci",
        0x10004,
        None,
        EXIT_REASON_TDCALL,
        inputs=(_in("r12", "interrupt vector (32..255)"),),
        outputs=(STATUS_ALWAYS,),
        handling="INVALID_OPERAND unless 32 <= vector <= 255; else KVM_EXIT_TDX, R10 = userspace's ret",
        source=f"{TDX_C} tdx_setup_event_notify_interrupt()",
        userspace="KVM_EXIT_TDX",
        cases=(Case("vector-0x40", {"r12": 0x40}), Case("bad-vector", {"r12": 0x10})),
    ),
    Leaf(
        "Instruction.CPUID",
        "ghci",
        10,
        None,
        EXIT_REASON_CPUID,
        inputs=(_in("r12", "leaf (EAX, low 32 bits)"), _in("r13", "sub-leaf (ECX, low 32 bits)")),
        outputs=(_out("r12", "EAX"), _out("r13", "EBX"), _out("r14", "ECX"), _out("r15", "EDX")),
        handling="in kernel; the result of kvm_cpuid() is ignored, so it never fails and never writes R10",
        source=f"{TDX_C} tdx_emulate_cpuid()",
        cases=(Case("leaf1", {"r12": 1, "r13": 0}), Case("leaf0", {"r12": 0, "r13": 0})),
    ),
    Leaf(
        "Instruction.HLT",
        "ghci",
        12,
        None,
        EXIT_REASON_HLT,
        inputs=(_in("r12", "interrupts blocked (non-zero: blocked)"),),
        outputs=(),
        handling="in kernel (kvm_emulate_halt_noskip); R12 decides whether a pending interrupt wakes it",
        source=f"{TDX_C} tdx_handle_exit() EXIT_REASON_HLT, tdx_protected_apic_has_interrupt()",
        cases=(Case("sti-hlt", {"r12": 0}),),
    ),
    Leaf(
        "Instruction.IO",
        "ghci",
        30,
        None,
        EXIT_REASON_IO_INSTRUCTION,
        inputs=(
            _in("r12", "size (1, 2 or 4)"),
            _in("r13", "direction (0 in, 1 out)"),
            _in("r14", "port (low 16 bits)"),
            _in("r15", "data to write", when=IO_WRITE),
        ),
        outputs=(STATUS_ON_ERROR, _out("r11", "data read (zero-extended)", on="success", when=IO_READ)),
        handling="size must be 1, 2 or 4 and direction 0 or 1, else INVALID_OPERAND; "
        "in kernel or KVM_EXIT_IO (count 1); IN completes on the next run",
        source=f"{TDX_C} tdx_emulate_io(), tdx_complete_pio_in()",
        userspace="KVM_EXIT_IO",
        cases=(
            Case("in", {"r12": 1, "r13": 0, "r14": 0x3FD}),
            Case("out", {"r12": 1, "r13": 1, "r14": 0x3F8, "r15": 0x41}),
        ),
    ),
    Leaf(
        "Instruction.RDMSR",
        "ghci",
        31,
        None,
        EXIT_REASON_MSR_READ,
        inputs=(_in("r12", "MSR index (low 32 bits)"),),
        outputs=(STATUS_ON_ERROR, _out("r11", "EDX:EAX", on="success")),
        handling="only MSRs KVM emulates for a TD succeed (tdx_has_emulated_msr()); else INVALID_OPERAND "
        "(or KVM_EXIT_X86_RDMSR)",
        source=f"{TDX_C} tdx_handle_exit() EXIT_REASON_MSR_READ, tdx_has_emulated_msr(), tdx_get_msr(), "
        "tdx_complete_emulated_msr(); x86.c kvm_emulate_rdmsr()",
        userspace="KVM_EXIT_X86_RDMSR",
        cases=(Case("apic-version", {"r12": 0x803}), Case("unknown-msr", {"r12": 0x10})),
    ),
    Leaf(
        "Instruction.WRMSR",
        "ghci",
        32,
        None,
        EXIT_REASON_MSR_WRITE,
        inputs=(_in("r12", "MSR index (low 32 bits)"), _in("r13", "value (64 bits)")),
        outputs=(STATUS_ON_ERROR,),
        handling="only MSRs KVM emulates for a TD and does not treat as read-only succeed (tdx_has_emulated_msr(), "
        "tdx_set_msr()); else INVALID_OPERAND (or KVM_EXIT_X86_WRMSR)",
        source=f"{TDX_C} tdx_handle_exit() EXIT_REASON_MSR_WRITE, tdx_has_emulated_msr(), tdx_set_msr(); "
        "x86.c kvm_emulate_wrmsr()",
        userspace="KVM_EXIT_X86_WRMSR",
        cases=(
            Case("tsc-deadline", {"r12": 0x6E0, "r13": 0x10}),
            Case("unknown-msr", {"r12": 0x10, "r13": 1}),
        ),
        note="only MSRs on tdx_has_emulated_msr()'s list: TPR, PPR, EOI, ISR, TMR, IRR and the other x2APIC "
        "registers the TDX module virtualises fail (INVALID_OPERAND)",
    ),
    Leaf(
        "#VE.RequestMMIO",
        "ghci",
        48,
        None,
        EXIT_REASON_EPT_MISCONFIG,
        inputs=(
            _in("r12", "size (1, 2, 4 or 8; low 32 bits)"),
            _in("r13", "direction (0 read, 1 write; low 32 bits)"),
            _in("r14", "shared GPA"),
            _in("r15", "data to write", when=MMIO_WRITE),
        ),
        outputs=(STATUS_ON_ERROR, _out("r11", "data read (zero-extended)", on="success", when=MMIO_READ)),
        handling="size and direction checked on their low 32 bits; first and last byte must be shared; "
        "in kernel or KVM_EXIT_MMIO with the shared bit cleared",
        source=f"{TDX_C} tdx_emulate_mmio(), tdx_complete_mmio_read()",
        userspace="KVM_EXIT_MMIO",
        cases=(
            Case("read", {"r12": 4, "r13": 0, "r14": SHARED_BIT | 0xFEB0_0000}),
            Case("write", {"r12": 4, "r13": 1, "r14": SHARED_BIT | 0xFEB0_0000, "r15": 0x1234}),
        ),
    ),
)

#: GHCI sub-functions KVM knows by name but does not implement: SUBFUNC_UNSUPPORTED.
UNSUPPORTED_GHCI = {"Service": 0x10005, "Instruction.WBINVD": 54, "Instruction.PCONFIG": 65}


def _unsupported(name: str, r11: int) -> Leaf:
    return Leaf(
        name,
        "ghci",
        r11,
        None,
        EXIT_REASON_TDCALL,
        inputs=(),
        outputs=(STATUS_ALWAYS,),
        handling="not handled by KVM: SUBFUNC_UNSUPPORTED",
        source=f"{TDX_C} handle_tdvmcall() default",
    )


def _hc(
    name: str,
    nr: int,
    args: tuple[tuple[str, str], ...],
    handling: str,
    cases: tuple[Case, ...] = (Case("default", {}),),
    userspace: str | None = None,
) -> Leaf:
    return Leaf(
        f"KVMHypercall.{name}",
        "kvm-hypercall",
        None,
        nr,
        EXIT_REASON_VMCALL,
        inputs=tuple(_in(r, role) for r, role in args),
        outputs=(HC_RESULT,),
        handling=handling,
        source=f"{TDX_C} tdx_emulate_vmcall(); {X86_C}",
        userspace=userspace,
        cases=cases,
    )


KVM_HYPERCALLS: tuple[Leaf, ...] = (
    _hc("VAPIC_POLL_IRQ", 1, (), "returns 0"),
    _hc(
        "KICK_CPU",
        5,
        (("r12", "a1: APIC id to wake"),),
        "wakes the vCPU with that APIC id; returns 0 (a0 in R11 is ignored)",
        (Case("apic1", {"r12": 1}),),
    ),
    _hc(
        "CLOCK_PAIRING",
        9,
        (("r11", "a0: GPA of the result"), ("r12", "a1: clock type (0 = wall)")),
        "0, -KVM_EOPNOTSUPP (clock type != 0 or unsuitable host clock) or -KVM_EFAULT",
        (Case("wall", {"r11": 0x9000, "r12": 0}), Case("bad-clock", {"r11": 0x9000, "r12": 1})),
    ),
    _hc(
        "SEND_IPI",
        10,
        (
            ("r11", "a0: APIC-id bitmap, low"),
            ("r12", "a1: APIC-id bitmap, high"),
            ("r13", "a2: lowest APIC id"),
            ("r14", "a3: ICR"),
        ),
        "count of IPIs sent, or -KVM_EINVAL",
        (Case("two-cpus", {"r11": 0b11, "r12": 0, "r13": 0, "r14": 0xFD}),),
    ),
    _hc(
        "SCHED_YIELD",
        11,
        (("r11", "a0: APIC id of the preempted vCPU"),),
        "yields to that vCPU; returns 0",
        (Case("apic1", {"r11": 1}),),
    ),
    _hc(
        "MAP_GPA_RANGE",
        12,
        (("r11", "a0: GPA"), ("r12", "a1: pages"), ("r13", "a2: attributes")),
        "-KVM_ENOSYS unless userspace enabled it; -KVM_EINVAL for bad arguments; else KVM_EXIT_HYPERCALL "
        "with the arguments verbatim and R10 = userspace's ret",
        (Case("one-page", {"r11": 0x8000_0000, "r12": 1, "r13": 0x10}),),
        userspace="KVM_EXIT_HYPERCALL",
    ),
)

UNKNOWN_HYPERCALL = Leaf(
    "KVMHypercall",
    "kvm-hypercall",
    None,
    None,
    EXIT_REASON_VMCALL,
    inputs=(),
    outputs=(HC_RESULT,),
    handling="unknown hypercall number: -KVM_ENOSYS",
    source=f"{TDX_C} tdx_emulate_vmcall(); {X86_C}",
    cases=(Case("unknown-nr", {"r10": 0x77}),),
)

#: Hypercall numbers (R10) of other hypervisors' TDX guest interfaces: name, and what it is.  KVM
#: takes any R10 != 0 as a KVM hypercall number (``tdx_emulate_vmcall()``), so on KVM each is
#: :data:`UNKNOWN_HYPERCALL`, answered -KVM_ENOSYS (``____kvm_emulate_hypercall()``'s default); a
#: guest makes them only on that vendor's host, so a scanner names them and judges them as a call
#: that is not KVM's (the module's check only), as ``check`` does Hyper-V's.
VENDOR_HYPERCALLS: dict[int, tuple[str, str]] = {
    0x1_AF7E_4909: (
        "VMware-hypercall",
        "VMware's hypercall (linux arch/x86/include/asm/vmware.h VMWARE_TDX_VENDOR_LEAF; made by "
        "arch/x86/kernel/cpu/vmware.c vmware_tdx_hypercall() only on a VMware host, with R11 = "
        "VMWARE_TDX_HCALL_FUNC 1, R12 = VMWARE_HYPERVISOR_MAGIC, R13 = the command): not a KVM call; "
        "KVM would take R10 as an unknown hypercall number and answer -KVM_ENOSYS",
    ),
}

LEAVES: tuple[Leaf, ...] = GHCI_LEAVES + tuple(_unsupported(n, v) for n, v in UNSUPPORTED_GHCI.items()) + KVM_HYPERCALLS
BY_NAME: dict[str, Leaf] = {leaf.name: leaf for leaf in LEAVES}
_GHCI_BY_R11 = {leaf.r11: leaf for leaf in LEAVES if leaf.family == "ghci"}
_HC_BY_NR = {leaf.nr: leaf for leaf in KVM_HYPERCALLS}


#: the GHCI leaves ``handle_tdvmcall()`` itself dispatches on R11 (the vendor-specific ones); the
#: instruction leaves reach KVM re-labelled as VMX exits instead (``tdx_to_vmx_exit_reason()``)
HANDLE_TDVMCALL_R11 = (0x10000, 0x10001, 0x10002, 0x10003, 0x10004)


def lookup(r10: int, r11: int, bus_lock: bool = False) -> Leaf:
    """The leaf a TDVMCALL selects: R10 != 0 is a KVM hypercall number, else R11 is the GHCI leaf.

    ``bus_lock``: the exit reason has bit 26 set.  ``tdx_to_vmx_exit_reason()`` compares the whole
    reason with TDCALL (0x4D), so 0x0400004D is not re-labelled: ``tdx_handle_exit()`` sends it, by
    its basic reason, to ``handle_tdvmcall()``, which switches on R11 alone.  R11 = 0x10000..0x10004
    runs that GHCI call, whatever R10 says (a KVM hypercall whose a0 is such a value is taken for
    it); every other R11 (CPUID, HLT, IO, MSR, MMIO, a hypercall's a0) is SUBFUNC_UNSUPPORTED."""
    if bus_lock:
        if r11 in HANDLE_TDVMCALL_R11:
            return _GHCI_BY_R11[r11]
        return _unsupported(f"bus-lock(0x{r11:x})", r11)
    if r10 != 0:
        return _HC_BY_NR.get(r10, UNKNOWN_HYPERCALL)
    leaf = _GHCI_BY_R11.get(r11)
    return leaf if leaf is not None else _unsupported(f"unknown(0x{r11:x})", r11)


def bus_lock_leaves() -> list[Leaf]:
    """What a TDVMCALL exit with the bus-lock bit may have run: the five GHCI calls
    ``handle_tdvmcall()`` knows, or SUBFUNC_UNSUPPORTED for any other R11 (see :func:`lookup`)."""
    return [_GHCI_BY_R11[r11] for r11 in HANDLE_TDVMCALL_R11] + [_unsupported("bus-lock(other R11)", 0)]


def by_name(name: str) -> Leaf:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown call {name!r}; accepted: {', '.join(BY_NAME)}") from None


def _applies(op: Operand, regs: Mapping[str, int]) -> bool:
    return op.when is None or op.when.holds(regs.get(op.when.reg, 0))


def required_inputs(leaf: Leaf, regs: Mapping[str, int]) -> list[str]:
    """Registers the call must have exposed as inputs for these input values (selectors first)."""
    out = list(leaf.selectors)
    out += [op.reg for op in leaf.inputs if op.required and _applies(op, regs) and op.reg not in out]
    return out


def optional_inputs(leaf: Leaf) -> list[str]:
    return [op.reg for op in leaf.inputs if not op.required]


def possible_outputs(leaf: Leaf, regs: Mapping[str, int]) -> list[str]:
    """Registers the call may write, whatever its outcome, for these input values."""
    out: list[str] = []
    for op in leaf.outputs:
        if _applies(op, regs) and op.reg not in out:
            out.append(op.reg)
    return out


def expected_outputs(leaf: Leaf, regs: Mapping[str, int], failed: bool) -> list[str]:
    """Registers the call must have written, given its inputs and whether it failed
    (a non-zero status in R10, RETRY included)."""
    want = {"any", "failure" if failed else "success"}
    out: list[str] = []
    for op in leaf.outputs:
        if op.on in want and _applies(op, regs) and op.reg not in out:
            out.append(op.reg)
    return out


def minimal_mask(leaf: Leaf, regs: Mapping[str, int] | None = None) -> int:
    """The smallest gpr_select hardened KVM accepts for this call with these input values:
    selectors, required inputs and possible outputs (RAX and RCX are never in gpr_select)."""
    regs = {**leaf.selector_values(), **(regs or {})}
    need = required_inputs(leaf, regs) + possible_outputs(leaf, regs)
    return mask_of(need) & ~mask_of(("rax", "rcx"))


def condition_masks(leaf: Leaf) -> dict[str, int]:
    """The minimal mask of every case of the leaf (its named input conditions)."""
    return {case.name: minimal_mask(leaf, case.regs) for case in leaf.cases}


def missing_by_case(leaf: Leaf, gpr_select: int) -> dict[str, int]:
    """For every case of the leaf, the GPRs of its minimal mask that ``gpr_select`` lacks
    (0: hardened KVM completes that case with this mask)."""
    return {case: need & ~gpr_select for case, need in condition_masks(leaf).items()}


def reason_leaves(reason: int) -> list[Leaf]:
    """The leaves KVM reports under this VMX exit reason (TDCALL covers every other GHCI leaf)."""
    return [leaf for leaf in LEAVES if leaf.reason == reason]


def as_dict(leaf: Leaf) -> dict[str, Any]:
    """The leaf row as plain data (``tdvmcall leaves --json``)."""

    def op(o: Operand) -> dict[str, Any]:
        d = {"reg": o.reg, "role": o.role, "required": o.required}
        if o.when is not None:
            d["when"] = o.when.text
        if o in leaf.outputs:
            d["on"] = o.on
            del d["required"]
        return d

    return {
        "name": leaf.name,
        "family": leaf.family,
        "r11": leaf.r11,
        "nr": leaf.nr,
        "vmx_exit_reason": leaf.reason,
        "selectors": list(leaf.selectors),
        "inputs": [op(o) for o in leaf.inputs],
        "outputs": [op(o) for o in leaf.outputs],
        "userspace_exit": leaf.userspace,
        "handling": leaf.handling,
        "source": leaf.source,
        "note": leaf.note,
        "minimal_masks": {k: f"0x{v:04x}" for k, v in condition_masks(leaf).items()},
        "cases": [{"name": c.name, "regs": {k: f"{v:#x}" for k, v in c.regs.items()}} for c in leaf.cases],
    }

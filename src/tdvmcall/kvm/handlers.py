"""What each TDVMCALL does, over a :class:`~tdvmcall.kvm.platform.Platform`.

One function per leaf, named after it, re-expressing Linux ``arch/x86/kvm/vmx/tdx.c`` (kvm-x86
tree, 2026; "v6.16", the v6.16.1 release as read at KT0511/linux-6.16.1 @30b97c8, where it
differs) and x86.c ``____kvm_emulate_hypercall()``, as curated in docs/abi.md §4.  Handlers never
touch registers directly: they go through an :class:`Access`
that the policy (``tdx.py``) provides, so the same code runs under today's KVM and the hardened one.
Which registers a handler may read and write is declared in ``leaves.py``, not here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from ..abi.codes import (
    EAGAIN,
    EINVAL,
    KVM_EFAULT,
    KVM_EINVAL,
    KVM_ENOSYS,
    KVM_EOPNOTSUPP,
    TDVMCALL_ALIGN_ERROR,
    TDVMCALL_INVALID_OPERAND,
    TDVMCALL_RETRY,
    TDVMCALL_SUBFUNC_UNSUPPORTED,
    TDVMCALL_SUCCESS,
    neg,
)
from ..abi.regs import GPR_NAMES, U32, U64
from .leaves import FATAL_GPA, FATAL_MESSAGE_REGS, Leaf
from .platform import (
    KVM_MAP_GPA_RANGE_DECRYPTED,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    KVM_SYSTEM_EVENT_TDX_FATAL,
    PAGE_SIZE,
    Platform,
)
from .trees import MAP_GPA_ANY_INVALID

MAP_GPA_MAX_LEN = 2 * 1024 * 1024  # TDX_MAP_GPA_MAX_LEN: one userspace exit per 2 MiB


class RunFailed(Exception):
    """KVM_RUN fails: the completion of a userspace exit returned an error (``errno``, positive), so
    the guest is not re-entered by this KVM_RUN and no status reaches it."""

    def __init__(self, errno: int, why: str):
        super().__init__(why)
        self.errno = errno
        self.why = why


class Access(Protocol):
    """A handler's view of the guest's registers (names as in ``regs.GPR_NAMES``)."""

    def read(self, reg: str) -> int: ...

    def read_optional(self, reg: str) -> int: ...

    def write(self, reg: str, value: int) -> None: ...

    @property
    def exit_qualification(self) -> int: ...

    @property
    def vp_enter_ret(self) -> int: ...


def set_status(io: Access, status: int) -> None:
    """tdvmcall_set_return_code(): the TDVMCALL status goes to R10."""
    io.write("r10", status)


def _aligned(value: int) -> bool:
    return value % PAGE_SIZE == 0


# --- GHCI leaves ---------------------------------------------------------------------------------
def get_td_vm_call_info(io: Access, p: Platform) -> None:
    """tdx_get_td_vm_call_info(): leaf 0 answers in kernel, leaf 1 asks userspace, others fail."""
    leaf = io.read("r12")
    if leaf == 0:
        set_status(io, TDVMCALL_SUCCESS)
        for reg in ("r11", "r12", "r13", "r14"):
            io.write(reg, 0)
    elif leaf == 1:
        words = p.userspace.tdvmcall_info
        ret = p.tdx_exit(
            0x10000, {"leaf": 1, "r11": words[0], "r12": words[1], "r13": words[2], "r14": words[3]}, TDVMCALL_SUCCESS
        )
        set_status(io, ret)
        for reg, value in zip(("r11", "r12", "r13", "r14"), words):
            io.write(reg, value)
    else:
        set_status(io, TDVMCALL_INVALID_OPERAND)


def map_gpa(io: Access, p: Platform) -> None:
    """tdx_map_gpa() and its completion tdx_complete_vmcall_map_gpa(): check the range, then one
    KVM_EXIT_HYPERCALL (MAP_GPA_RANGE) per chunk of at most 2 MiB.  Userspace's ret: 0 goes on,
    EAGAIN is RETRY, EINVAL INVALID_OPERAND (R11 = the refused chunk); any other value makes KVM_RUN
    fail with -EINVAL (:class:`RunFailed`; the tree's rule ``map_gpa_userspace_errors``: v6.16 answers
    INVALID_OPERAND for every non-zero ret)."""
    gpa, size = io.read("r12"), io.read("r13")
    end = (gpa + size) & U64

    def fail(status: int, resume_at: int) -> None:
        set_status(io, status)
        io.write("r11", resume_at)

    # early checks, in KVM's order; R11 = the original GPA
    if not p.exit_hypercall_map_gpa:
        return fail(TDVMCALL_SUBFUNC_UNSUPPORTED, gpa)
    if end <= gpa or not p.is_legal_gpa(gpa) or not p.is_legal_gpa(end - 1) or p.is_shared(gpa) != p.is_shared(end - 1):
        return fail(TDVMCALL_INVALID_OPERAND, gpa)
    if not _aligned(gpa) or not _aligned(size):
        return fail(TDVMCALL_ALIGN_ERROR, gpa)

    # one userspace exit per chunk
    attrs = KVM_MAP_GPA_RANGE_DECRYPTED if p.is_shared(gpa) else KVM_MAP_GPA_RANGE_ENCRYPTED
    nxt = gpa
    while True:
        chunk = min(MAP_GPA_MAX_LEN, end - nxt)
        ret = p.hypercall_exit(12, (nxt & ~p.shared_bit, chunk // PAGE_SIZE, attrs))
        if ret != 0 and p.rule.map_gpa_userspace_errors == MAP_GPA_ANY_INVALID:
            # v6.16: any non-zero ret is INVALID_OPERAND
            return fail(TDVMCALL_INVALID_OPERAND, nxt)
        if ret == EAGAIN:
            return fail(TDVMCALL_RETRY, nxt)
        if ret == EINVAL:
            return fail(TDVMCALL_INVALID_OPERAND, nxt)
        if ret != 0:
            # kvm-x86 tdx_complete_vmcall_map_gpa(): any other ret fails KVM_RUN with -EINVAL before
            # anything is written (its WARN_ON_ONCE tests kvm_is_valid_map_gpa_range_ret(), which is
            # false for every ret that gets here, so it never fires)
            raise RunFailed(EINVAL, f"MapGPA: userspace answered KVM_HC_MAP_GPA_RANGE with ret {ret:#x}")
        nxt += chunk
        if nxt >= end:
            return None  # success: neither R10 nor R11 written
        if p.pending_event:
            return fail(TDVMCALL_RETRY, nxt)


def get_quote(io: Access, p: Platform) -> None:
    """tdx_get_quote(): only the shared bit of the GPA is checked; userspace does the rest."""
    gpa, size = io.read("r12"), io.read("r13")
    if not p.is_shared(gpa):
        return set_status(io, TDVMCALL_INVALID_OPERAND)
    # the size is not checked here: QEMU's answer (Platform.qemu_get_quote) refuses a buffer larger than 128 KiB
    plain = gpa & ~p.shared_bit
    ret = p.tdx_exit(0x10002, {"gpa": plain, "size": size}, p.qemu_get_quote(plain, size))
    set_status(io, ret)


def report_fatal_error(io: Access, p: Platform) -> None:
    """tdx_report_fatal_error() (kvm-x86 @09c6f74e, v6.16.1 and 7.3.4 ``arch/x86/kvm/vmx/tdx.c``): a
    KVM_EXIT_SYSTEM_EVENT (TDX_FATAL) whose 16 ``data[]`` words are the GPR slots in ascending order:
    slot 0 (RAX) is ``tdx->vp_enter_ret``, the whole exit value the module returned (0x4D, or
    0x0400004D with the bus-lock bit 26), slot 1 (RCX) the exit qualification, RSP and RBP 0, the
    others ``vp_enter_args`` (0 where the guest exposed nothing).  KVM writes no status and sets no
    completion.  The message is QEMU's (:func:`qemu_fatal_message`)."""
    code = io.read("r12")
    gpa = io.read("r13") if FATAL_GPA.holds(code) else None
    data = [0] * 16
    data[0] = io.vp_enter_ret & U64  # the RAX slot carries the exit value, flag bits included
    data[1] = io.exit_qualification  # the RCX slot carries the mask
    for i, reg in enumerate(GPR_NAMES):
        if i in (0, 1, 4, 5):  # RAX, RCX (above), RSP and RBP (never passed): 0
            continue
        if reg == "r12":
            data[i] = code
        elif reg == "r13" and gpa is not None:
            data[i] = gpa
        else:
            data[i] = io.read_optional(reg)
    p.system_event(
        KVM_SYSTEM_EVENT_TDX_FATAL,
        data,
        error_code=code,
        gpa=gpa,
        message=qemu_fatal_message(data),
        qemu_accepts=code & 0xFFFF == 0,
    )


def qemu_fatal_message(data: list[int]) -> str:
    """The message QEMU builds from the system event (QEMU 05caf269 ``target/i386/kvm/tdx.c``,
    ``tdx_handle_report_fatal_error()``, ``COPY_REG``): the mask is ``data[1]`` (the RCX slot); for
    each message register in QEMU's order (R14, R15, RBX, RDI, RSI, R8, R9, RDX) whose bit the mask
    has, its 8 bytes are appended, one after the other, so an unexposed register moves the later
    bytes up; the buffer is then read as a C string (it ends at the first NUL).  ``""`` when no
    message register is exposed."""
    mask = data[1]
    raw = b"".join(
        data[GPR_NAMES.index(r)].to_bytes(8, "little") for r in FATAL_MESSAGE_REGS if mask >> GPR_NAMES.index(r) & 1
    )
    return raw.split(b"\0", 1)[0].decode("latin-1")


def setup_event_notify_interrupt(io: Access, p: Platform) -> None:
    """tdx_setup_event_notify_interrupt(): a vector in 32..255 goes to userspace (QEMU records it
    with the calling vCPU's APIC id).  Both trees: v6.16.1 dispatches it too (KT0511/linux-6.16.1
    @30b97c8 ``handle_tdvmcall()``)."""
    vector = io.read("r12")
    if not 32 <= vector <= 255:
        return set_status(io, TDVMCALL_INVALID_OPERAND)
    set_status(io, p.tdx_exit(0x10004, {"vector": vector}, TDVMCALL_SUCCESS))


def instruction_cpuid(io: Access, p: Platform) -> None:
    """tdx_emulate_cpuid(): inputs truncated to 32 bits; kvm_cpuid()'s result is ignored, so R10 is
    never written and an unknown leaf returns what kvm_cpuid() gives (zeros, or the max basic leaf)."""
    eax, ebx, ecx, edx = p.kvm_cpuid(io.read("r12") & U32, io.read("r13") & U32)
    io.write("r12", eax)
    io.write("r13", ebx)
    io.write("r14", ecx)
    io.write("r15", edx)


def instruction_hlt(io: Access, p: Platform) -> None:
    """HLT: kvm_emulate_halt_noskip(); R12 (interrupts blocked) decides whether a pending
    interrupt wakes the vCPU (tdx_protected_apic_has_interrupt())."""
    p.halt(io.read("r12") != 0)


def instruction_io(io: Access, p: Platform) -> None:
    """tdx_emulate_io(): size 1, 2 or 4 and direction 0 or 1 (64-bit compares); the port is only
    truncated to 16 bits; OUT sends the low ``size`` bytes of R15, IN zero-extends into R11."""
    size, write, port = io.read("r12"), io.read("r13"), io.read("r14") & 0xFFFF
    if size not in (1, 2, 4) or write not in (0, 1):
        return set_status(io, TDVMCALL_INVALID_OPERAND)
    if write:
        p.io(port, size, True, io.read("r15") & ((1 << 8 * size) - 1))
    else:
        io.write("r11", p.io(port, size, False, 0))


def instruction_rdmsr(io: Access, p: Platform) -> None:
    """RDMSR: kvm_emulate_rdmsr() through tdx_get_msr() (only MSRs on tdx_has_emulated_msr()'s list);
    tdx_complete_emulated_msr(): EDX:EAX into R11 on success, else INVALID_OPERAND (no #GP)."""
    ok, value = p.msr_read(io.read("r12") & U32)
    if not ok:
        return set_status(io, TDVMCALL_INVALID_OPERAND)
    io.write("r11", value)


def instruction_wrmsr(io: Access, p: Platform) -> None:
    """WRMSR: kvm_emulate_wrmsr() through tdx_set_msr(); the value is all 64 bits of R13 (EDX:EAX)."""
    if not p.msr_write(io.read("r12") & U32, io.read("r13")):
        set_status(io, TDVMCALL_INVALID_OPERAND)


def request_mmio(io: Access, p: Platform) -> None:
    """tdx_emulate_mmio(): size and direction checked on their low 32 bits; first and last byte must
    be shared; no alignment or page-crossing check; the shared bit is cleared for userspace."""
    size, write, gpa = io.read("r12") & U32, io.read("r13") & U32, io.read("r14")
    if size not in (1, 2, 4, 8) or write not in (0, 1):
        return set_status(io, TDVMCALL_INVALID_OPERAND)
    if not p.is_shared(gpa) or not p.is_shared((gpa + size - 1) & U64):
        return set_status(io, TDVMCALL_INVALID_OPERAND)
    plain = gpa & ~p.shared_bit
    if write:
        p.mmio(plain, size, True, io.read("r15") & ((1 << 8 * size) - 1))
    else:
        io.write("r11", p.mmio(plain, size, False, 0))


def subfunc_unsupported(io: Access, p: Platform) -> None:
    set_status(io, TDVMCALL_SUBFUNC_UNSUPPORTED)


# --- KVM hypercalls (R10 = nr, a0..a3 = R11..R14, result in R10) ------------------------------------
APIC_DEST_MASK = 0x800
APIC_SHORT_MASK = 0xC0000


def hc_result(io: Access, value: int) -> None:
    io.write("r10", value & U64)


def hc_vapic_poll_irq(io: Access, p: Platform) -> None:
    hc_result(io, 0)


def hc_kick_cpu(io: Access, p: Platform) -> None:
    """kvm_pv_kick_cpu_op(): wakes the vCPU with APIC id a1 (a0, the flags, is ignored)."""
    apic = io.read("r12")
    p.effects.append(f"kick APIC id {apic:#x}" + ("" if apic in p.apic_ids else " (no such vCPU)"))
    hc_result(io, 0)


def hc_clock_pairing(io: Access, p: Platform) -> None:
    """kvm_pv_clock_pairing() (x86.c, kvm-x86 and 7.3.4 alike): clock type a1 must be 0 (wall clock)
    and the host clock TSC-based, else -KVM_EOPNOTSUPP; the result is written at GPA a0 with
    ``kvm_write_guest()``, which fails (-KVM_EFAULT) when no memslot holds the address: a GPA above
    MAXPHYADDR, and for a TD any GPA with the shared bit, since KVM's memslots are at the GPAs
    without it (the shared alias is the bit, not a slot).  Otherwise 0."""
    gpa, clock = io.read("r11"), io.read("r12")
    if clock != 0 or not p.host_clock_suitable:
        return hc_result(io, neg(KVM_EOPNOTSUPP))
    if not p.is_legal_gpa(gpa) or p.is_shared(gpa):
        return hc_result(io, neg(KVM_EFAULT))
    p.effects.append(f"clock pairing written at {gpa:#x}")
    hc_result(io, 0)


def hc_send_ipi(io: Access, p: Platform) -> None:
    """kvm_pv_send_ipi(): IPIs to APIC ids min + i for each bit i of the 128-bit bitmap a0:a1 (min
    is a u32);
    an ICR with a destination shorthand or mode bits is -KVM_EINVAL; returns the count sent."""
    low, high, lowest, icr = io.read("r11"), io.read("r12"), io.read("r13") & U32, io.read("r14")
    if icr & (APIC_DEST_MASK | APIC_SHORT_MASK):
        return hc_result(io, neg(KVM_EINVAL))
    bitmap = low | high << 64
    targets = [lowest + i for i in range(128) if bitmap >> i & 1 and lowest + i in p.apic_ids]
    if targets:
        p.effects.append(f"IPI vector {icr & 0xFF:#x} to APIC ids {targets}")
    hc_result(io, len(targets))


def hc_sched_yield(io: Access, p: Platform) -> None:
    apic = io.read("r11")
    p.effects.append(f"yield to APIC id {apic:#x}")
    hc_result(io, 0)


def hc_map_gpa_range(io: Access, p: Platform) -> None:
    """KVM_HC_MAP_GPA_RANGE: -KVM_ENOSYS unless userspace enabled it; -KVM_EINVAL for an unaligned
    GPA, zero pages or a range of frame numbers that wraps 64 bits; else KVM_EXIT_HYPERCALL with the arguments verbatim
    (the shared bit is not stripped) and R10 = userspace's ret."""
    gpa, pages, attrs = io.read("r11"), io.read("r12"), io.read("r13")
    if not p.exit_hypercall_map_gpa:
        return hc_result(io, neg(KVM_ENOSYS))
    if not _aligned(gpa) or pages == 0 or (gpa >> 12) + pages > U64:  # the gfn range wraps
        return hc_result(io, neg(KVM_EINVAL))
    hc_result(io, p.hypercall_exit(12, (gpa, pages, attrs)))


def hc_unknown(io: Access, p: Platform) -> None:
    hc_result(io, neg(KVM_ENOSYS))


HANDLERS: dict[str, Callable[[Access, Platform], None]] = {
    "GetTdVmCallInfo": get_td_vm_call_info,
    "MapGPA": map_gpa,
    "GetQuote": get_quote,
    "ReportFatalError": report_fatal_error,
    "SetupEventNotifyInterrupt": setup_event_notify_interrupt,
    "Instruction.CPUID": instruction_cpuid,
    "Instruction.HLT": instruction_hlt,
    "Instruction.IO": instruction_io,
    "Instruction.RDMSR": instruction_rdmsr,
    "Instruction.WRMSR": instruction_wrmsr,
    "#VE.RequestMMIO": request_mmio,
    "KVMHypercall.VAPIC_POLL_IRQ": hc_vapic_poll_irq,
    "KVMHypercall.KICK_CPU": hc_kick_cpu,
    "KVMHypercall.CLOCK_PAIRING": hc_clock_pairing,
    "KVMHypercall.SEND_IPI": hc_send_ipi,
    "KVMHypercall.SCHED_YIELD": hc_sched_yield,
    "KVMHypercall.MAP_GPA_RANGE": hc_map_gpa_range,
    "KVMHypercall": hc_unknown,
}


def handler_for(leaf: Leaf) -> Callable[[Access, Platform], None]:
    """The handler of a leaf; GHCI leaves KVM does not implement answer SUBFUNC_UNSUPPORTED."""
    return HANDLERS.get(leaf.name, subfunc_unsupported)

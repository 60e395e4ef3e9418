// A small TDX guest in the style of td-shim's tdx-tdcall and Oak's oak_tdx_guest: a struct of
// registers passed by pointer to an assembly stub, the mask built with bitflags-style `union`
// calls (real calls at opt-level 0), and a retry loop around the call.  Built and scanned by
// tests/test_scan_deep.py with rustc at opt-level 0 and 3; the expected leaves and masks are the
// constants written here (GHCI 1.5 leaf numbers: HLT 12, IO 30, WRMSR 32, MapGPA 0x10001).
#![allow(dead_code)]
use std::arch::global_asm;
use std::hint::black_box;

#[repr(C)]
#[derive(Default)]
pub struct Args {
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
}

// the stub: RCX = the mask given in RSI, R10..R13 from the struct RDI points to
global_asm!(
    ".global rs_vmcall",
    ".type rs_vmcall, @function",
    "rs_vmcall:",
    "push r12",
    "push r13",
    "mov rcx, rsi",
    "mov r10, [rdi]",
    "mov r11, [rdi + 8]",
    "mov r12, [rdi + 16]",
    "mov r13, [rdi + 24]",
    "xor eax, eax",
    ".byte 0x66, 0x0f, 0x01, 0xcc",
    "mov [rdi], r10",
    "mov [rdi + 8], r11",
    "pop r13",
    "pop r12",
    "ret",
);

extern "C" {
    fn rs_vmcall(args: *mut Args, mask: u64) -> u64;
}

/// A bitflags-style register set (GHCI's RCX bits).
#[derive(Clone, Copy)]
pub struct Regs(u64);
impl Regs {
    pub const R10: Regs = Regs(1 << 10);
    pub const R11: Regs = Regs(1 << 11);
    pub const R12: Regs = Regs(1 << 12);
    pub const R13: Regs = Regs(1 << 13);
    pub const fn union(self, other: Regs) -> Regs {
        Regs(self.0 | other.0)
    }
    pub const fn bits(self) -> u64 {
        self.0
    }
}

const RETRY: u64 = 1;

#[inline(never)]
#[no_mangle]
pub fn rs_halt() {
    let mask = Regs::R10.union(Regs::R11).union(Regs::R12); // 0x1c00
    let mut a = Args { r11: 12, ..Default::default() };
    unsafe { rs_vmcall(&mut a, mask.bits()) };
}

#[inline(never)]
#[no_mangle]
pub fn rs_io_write(port: u16, value: u8) {
    let mask = Regs::R10.union(Regs::R11).union(Regs::R12).union(Regs::R13); // 0x3c00
    let mut a = Args { r11: 30, r12: 1, r13: 1, ..Default::default() };
    let _ = (port, value);
    unsafe { rs_vmcall(&mut a, mask.bits()) };
}

/// WRMSR with the value's register left out of the mask, as Oak's msr_write (a bug the scan finds)
#[inline(never)]
#[no_mangle]
pub fn rs_wrmsr(msr: u32, value: u64) {
    let mask = Regs::R10.union(Regs::R11).union(Regs::R12); // 0x1c00: R13 (the value) not exposed
    let mut a = Args { r11: 32, r12: msr as u64, r13: value, ..Default::default() };
    unsafe { rs_vmcall(&mut a, mask.bits()) };
}

/// MapGPA in a retry loop: the host may answer RETRY (1) and the call is made again
#[inline(never)]
#[no_mangle]
pub fn rs_map_gpa(gpa: u64, size: u64) -> bool {
    let mask = Regs::R10.union(Regs::R11).union(Regs::R12).union(Regs::R13); // 0x3c00
    let mut tries = 0;
    while tries < 3 {
        let mut a = Args { r11: 0x10001, r12: gpa, r13: size, ..Default::default() };
        let status = unsafe { rs_vmcall(&mut a, mask.bits()) };
        if status == 0 && a.r10 != RETRY {
            return true;
        }
        tries += 1;
    }
    false
}

/// Functions named by their path, as td-shim's and Oak's are: no `#[no_mangle]`, so their symbols are
/// mangled (`_ZN5guest3tdx13tdvmcall_halt17h…E`, or `_RNvNtCs…_5guest3tdx13tdvmcall_halt` with
/// `-C symbol-mangling-version=v0`) and the scan shows them as `guest::tdx::tdvmcall_halt`.
pub mod tdx {
    use super::{rs_vmcall, Args, Regs};

    /// HLT through the stub (td-shim's style): the site is the stub's, this function its caller
    #[inline(never)]
    pub fn tdvmcall_halt() {
        let mask = Regs::R10.union(Regs::R11).union(Regs::R12); // 0x1c00
        let mut a = Args { r11: 12, ..Default::default() };
        unsafe { rs_vmcall(&mut a, mask.bits()) };
    }

    /// CPUID leaf 0xb, sub-leaf 0 with the TDCALL inline (Oak's style): the site is in this function;
    /// R10..R15 exposed (GHCI leaf 10 returns EAX..EDX in R12..R15)
    #[inline(never)]
    pub fn tdvmcall_cpuid() -> u64 {
        let eax: u64;
        unsafe {
            core::arch::asm!(
                ".byte 0x66, 0x0f, 0x01, 0xcc",
                inout("rax") 0u64 => _,
                in("rcx") 0xfc00u64,
                inout("r10") 0u64 => _,
                inout("r11") 10u64 => _,
                inout("r12") 0xbu64 => eax,
                inout("r13") 0u64 => _,
                out("r14") _,
                out("r15") _,
            );
        }
        eax
    }
}

fn main() {
    let n = std::env::args().count();
    if n == black_box(2) {
        rs_halt();
        rs_io_write(black_box(0x3f8), black_box(1));
        rs_wrmsr(black_box(0x1b), black_box(5));
        black_box(rs_map_gpa(black_box(0x1000), black_box(0x1000)));
        tdx::tdvmcall_halt();
        black_box(tdx::tdvmcall_cpuid());
    }
}

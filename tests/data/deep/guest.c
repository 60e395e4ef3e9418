/* A small TDX guest in the style of Linux's and td-shim's: the TDCALL is in an out-of-line stub that
 * loads R10..R13 from a struct passed by pointer; the struct is filled one and two levels up.
 * Built and scanned by tests/test_scan_deep.py (executable, relocatable object, shared object, at
 * -O0 and -O2); the expected leaves, masks and inputs are the constants written below.
 * GHCI 1.5: R10 = 0 (a GHCI call), R11 = the leaf (HLT 12, IO 30, RDMSR 31, WRMSR 32, MapGPA
 * 0x10001, ReportFatalError 0x10003), R12/R13 its inputs (IO: R12 size, R13 direction, 1 = write). */
#include <stdint.h>
#include <string.h>

struct tdvmcall_args { uint64_t r10, r11, r12, r13, r14, r15; };

#define MASK 0xFC00UL /* R10 R11 R12 R13 R14 R15 */

/* level 0: the stub (its registers come from the struct) */
__attribute__((noinline)) uint64_t guest_vmcall(struct tdvmcall_args *a)
{
    register uint64_t r10 asm("r10") = a->r10;
    register uint64_t r11 asm("r11") = a->r11;
    register uint64_t r12 asm("r12") = a->r12;
    register uint64_t r13 asm("r13") = a->r13;
    uint64_t rax = 0;
    asm volatile(".byte 0x66,0x0f,0x01,0xcc"
                 : "+a"(rax), "+r"(r10), "+r"(r11), "+r"(r12), "+r"(r13)
                 : "c"(MASK)
                 : "memory");
    return r10;
}

/* level 1: fills the struct from its parameters */
__attribute__((noinline)) uint64_t guest_hypercall(uint64_t fn, uint64_t r12, uint64_t r13)
{
    struct tdvmcall_args a;
    memset(&a, 0, sizeof a);
    a.r11 = fn;
    a.r12 = r12;
    a.r13 = r13;
    return guest_vmcall(&a);
}

/* level 2: the calls, with constants */
__attribute__((noinline)) void guest_halt(void) { guest_hypercall(12, 0, 0); }
__attribute__((noinline)) uint64_t guest_outb(uint64_t port) { return guest_hypercall(30, 1, 1) + port; }
__attribute__((noinline)) uint64_t guest_rdmsr(void) { return guest_hypercall(31, 0x1b, 0); }

/* a struct template copied (memcpy) and then completed */
static const struct tdvmcall_args fatal_template = { 0, 0x10003, 0, 0, 0, 0 };
__attribute__((noinline)) void guest_fatal(void)
{
    struct tdvmcall_args a;
    memcpy(&a, &fatal_template, sizeof a);
    a.r12 = 0;
    guest_vmcall(&a);
}

/* a leaf the guest only knows at run time: it must stay unresolved, never be guessed */
uint64_t guest_leaf_from_outside;
__attribute__((noinline)) void guest_unknown(void) { guest_hypercall(guest_leaf_from_outside, 0, 0); }

/* level 3: through one more wrapper */
__attribute__((noinline)) uint64_t guest_mapgpa_inner(uint64_t gpa) { return guest_hypercall(0x10001, gpa, 0x1000); }
__attribute__((noinline)) uint64_t guest_mapgpa(void) { return guest_mapgpa_inner(0x8000); }

/* a retry loop: with -fno-plt at -O2 the address of guest_hypercall is loaded from the GOT once,
 * before the loop, and called through a register */
__attribute__((noinline)) int guest_map_retry(uint64_t gpa)
{
    for (int i = 0; i < 3; i++)
        if (guest_hypercall(0x10001, gpa, 0x2000) == 0)
            return 1;
    return 0;
}

/* a leaf chosen by comparing run-time data with a constant (a cmov at -O2, a branch at -O0): random,
 * zero and all-ones fillings all see "not 5", so only forcing the condition each way shows that the
 * leaf is 12 on one path and 30 on the other: it must stay unresolved */
uint64_t guest_selector;
__attribute__((noinline)) void guest_one_path(void)
{
    uint64_t fn = 12;
    if (guest_selector == 5)
        fn = 30;
    guest_hypercall(fn, 0, 0);
}

/* the same choice made inside a callee that has returned before the call */
__attribute__((noinline)) uint64_t guest_pick(uint64_t x) { return x == 5 ? 30 : 12; }
__attribute__((noinline)) void guest_callee_pick(void) { guest_hypercall(guest_pick(guest_selector), 0, 0); }

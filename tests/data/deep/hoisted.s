# A caller that loads its callee's address from the GOT once, before a retry loop, and calls it
# through a register (as rustc does for td-shim's tdvmcall_mapgpa): guest_hypercall(32, 0x1b, 0),
# a WRMSR of MSR 0x1B, twice.  Linked with guest.c into a shared object by tests/test_scan_deep.py.
        .intel_syntax noprefix
        .text
        .globl guest_hoisted
        .type guest_hoisted, @function
guest_hoisted:
        push rbx
        push r12
        mov rbx, qword ptr [rip + guest_hypercall@GOTPCREL]
        mov r12d, 2
1:      mov edi, 32
        mov esi, 0x1b
        xor edx, edx
        call rbx
        sub r12d, 1
        jnz 1b
        pop r12
        pop rbx
        ret
        .size guest_hoisted, . - guest_hoisted
        .section .note.GNU-stack, "", @progbits

# Call sites for the tests of `tdvmcall scan` (tests/test_scan.py).  Each function makes one
# TDCALL (bytes 66 0F 01 CC, written as bytes so that any assembler takes them) with registers
# loaded in one of the ways the scanner must follow.  The expected values are written beside
# each site and asserted by the tests.
.intel_syntax noprefix
.text

# 1. immediate mask: RDMSR (R11 = 0x1F) with R10 R11 R12 exposed (0x1C00), MSR 0x1B
.globl imm_mask
.type imm_mask, @function
imm_mask:
    xor eax, eax                  # RAX = 0: TDG.VP.VMCALL
    mov ecx, 0x1C00               # mask: immediate
    xor r10d, r10d                # R10 = 0: zeroing idiom
    mov r11d, 0x1F                # Instruction.RDMSR
    mov r12d, 0x1B                # MSR index
    .byte 0x66, 0x0f, 0x01, 0xcc
    ret
.size imm_mask, .-imm_mask

# 2. mask through a register copy: 0xFFEC exposes RBP (rejected under NO_RBP_MOD); HLT
.globl copy_mask
.type copy_mask, @function
copy_mask:
    mov r8d, 0xFFEC
    mov rcx, r8                   # mask: copy of r8
    xor eax, eax
    xor r10d, r10d
    mov r11d, 0x0C                # Instruction.HLT
    .byte 0x66, 0x0f, 0x01, 0xcc
    ret
.size copy_mask, .-copy_mask

# 3. xor ecx, ecx: mask 0 (nothing exposed); CPUID
.globl zero_mask
.type zero_mask, @function
zero_mask:
    xor eax, eax
    xor ecx, ecx                  # mask: zeroing idiom -> 0
    xor r10d, r10d
    mov r11d, 0x0A                # Instruction.CPUID
    .byte 0x66, 0x0f, 0x01, 0xcc
    ret
.size zero_mask, .-zero_mask

# 4a. a 32-bit write zeroes the upper half: 0xFFFFFFFF0000FFCC then mov ecx -> 0xFC00
.globl mov32
.type mov32, @function
mov32:
    movabs rcx, 0xFFFFFFFF0000FFCC
    mov ecx, 0xFC00               # 32-bit write: RCX = 0xFC00
    xor eax, eax
    xor r10d, r10d
    mov r11d, 0x1F                # RDMSR
    .byte 0x66, 0x0f, 0x01, 0xcc
    ret
.size mov32, .-mov32

# 4b. a 64-bit move of a sign-extended immediate: RCX = 0xFFFFFFFFFFFFFC00 (reserved bits set)
.globl mov64
.type mov64, @function
mov64:
    mov rcx, -0x400               # 64-bit: RCX = 0xFFFFFFFFFFFFFC00
    xor eax, eax
    xor r10d, r10d
    mov r11d, 0x1F
    .byte 0x66, 0x0f, 0x01, 0xcc
    ret
.size mov64, .-mov64

# 4c. an 8-bit write merges: ecx = 0xFF00, then cl = 0xCC -> 0xFFCC
.globl mov8
.type mov8, @function
mov8:
    mov ecx, 0xFF00
    mov cl, 0xCC                  # partial write: RCX = 0xFFCC
    xor eax, eax
    xor r10d, r10d
    mov r11d, 0x0C                # HLT
    .byte 0x66, 0x0f, 0x01, 0xcc
    ret
.size mov8, .-mov8

# 5. a wrapper whose leaf (R11) comes from its callers (System V: first argument in RDI), and R13
#    (the IO direction) is left as the caller set it
.globl wrapper
.type wrapper, @function
wrapper:
    mov r11, rdi                  # R11 = the caller's RDI
    xor eax, eax
    mov ecx, 0xFC00               # R10..R15 exposed
    xor r10d, r10d
    .byte 0x66, 0x0f, 0x01, 0xcc
    ret
.size wrapper, .-wrapper

.globl caller_io
.type caller_io, @function
caller_io:
    mov edi, 0x1E                 # Instruction.IO
    mov r12d, 1                   # size
    xor r13d, r13d                # direction 0: in
    mov r14d, 0x3FD               # port
    call wrapper
    ret
.size caller_io, .-caller_io

.globl caller_hlt
.type caller_hlt, @function
caller_hlt:
    mov edi, 0x0C                 # Instruction.HLT
    call wrapper
    ret
.size caller_hlt, .-caller_hlt

# 6. an unresolvable mask: loaded from memory (a global)
.globl mem_mask
.type mem_mask, @function
mem_mask:
    mov rcx, qword ptr [rip + mask_var]
    xor eax, eax
    xor r10d, r10d
    mov r11d, 0x1F                # RDMSR: needs at least R10 R11 R12 = 0x1C00
    .byte 0x66, 0x0f, 0x01, 0xcc
    ret
.size mem_mask, .-mem_mask

# 7. module calls that are not TDVMCALLs: TDG.VP.INFO (1) and TDG.MEM.PAGE.ACCEPT (6)
.globl vp_info
.type vp_info, @function
vp_info:
    mov eax, 1
    .byte 0x66, 0x0f, 0x01, 0xcc
    ret
.size vp_info, .-vp_info

.globl page_accept
.type page_accept, @function
page_accept:
    mov eax, 6
    mov rcx, rdi
    .byte 0x66, 0x0f, 0x01, 0xcc
    ret
.size page_accept, .-page_accept

# 8. TDCALL bytes that are not a TDCALL: inside an immediate operand
.globl not_code
.type not_code, @function
not_code:
    mov eax, 0xCC010F66           # encodes as B8 66 0F 01 CC
    ret
.size not_code, .-not_code

# 9. a stack slot: the mask stored to [rsp-16] and loaded back; MMIO with the direction 1 (write)
.globl stack_mask
.type stack_mask, @function
stack_mask:
    mov qword ptr [rsp - 16], 0xFC00
    mov rcx, qword ptr [rsp - 16] # mask: loaded from the stack slot
    xor eax, eax
    xor r10d, r10d
    mov r11d, 0x30                # #VE.RequestMMIO
    mov r13d, 1                   # direction 1: write
    .byte 0x66, 0x0f, 0x01, 0xcc
    ret
.size stack_mask, .-stack_mask

# 10. Linux style: a stub loads RAX from its first argument and RCX, R10, R11, R13 from a struct
#     it is given a pointer to (RSI); its caller stores the mask there and passes its own pointer
#     on; that caller's callers fill the struct on their stack (zeroed by rep stos, or by a zeroed
#     vector register) with the leaf and the IO direction.
.globl tdcall_stub
.type tdcall_stub, @function
tdcall_stub:
    mov rax, rdi                  # the TDCALL leaf: the caller's RDI
    mov rcx, qword ptr [rsi]      # args->rcx
    mov r10, qword ptr [rsi + 0x20]
    mov r11, qword ptr [rsi + 0x28]
    mov r13, qword ptr [rsi + 0x38]
    .byte 0x66, 0x0f, 0x01, 0xcc
    ret
.size tdcall_stub, .-tdcall_stub

.globl hypercall
.type hypercall, @function
hypercall:
    push rbx
    mov rsi, rdi
    mov qword ptr [rdi], 0xFFCC   # args->rcx = the mask
    xor edi, edi                  # leaf 0: TDG.VP.VMCALL
    call tdcall_stub
    pop rbx
    ret
.size hypercall, .-hypercall

.globl do_halt
.type do_halt, @function
do_halt:
    sub rsp, 0x68
    xor eax, eax
    mov ecx, 13
    mov rdi, rsp
    rep stosq                     # the struct zeroed: R10 = 0
    mov qword ptr [rsp + 0x28], 0x0C   # R11: Instruction.HLT
    mov rdi, rsp
    call hypercall
    add rsp, 0x68
    ret
.size do_halt, .-do_halt

.globl do_io_out
.type do_io_out, @function
do_io_out:
    sub rsp, 0x68
    pxor xmm0, xmm0
    movups xmmword ptr [rsp + 0x20], xmm0   # R10 = R11 = 0
    movups xmmword ptr [rsp + 0x30], xmm0
    mov qword ptr [rsp + 0x28], 0x1E   # R11: Instruction.IO
    mov qword ptr [rsp + 0x38], 1      # R13: direction 1, out
    mov rdi, rsp
    call hypercall
    add rsp, 0x68
    ret
.size do_io_out, .-do_io_out

.globl _start
.type _start, @function
_start:
    call caller_io
    call caller_hlt
    call do_halt
    call do_io_out
    ret
.size _start, .-_start

.data
mask_var:
    .quad 0xFFCC
# TDCALL bytes in data: never decoded
    .byte 0x66, 0x0f, 0x01, 0xcc

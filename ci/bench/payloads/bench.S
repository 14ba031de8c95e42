/*
 * Benchmark guest: a PVH ELF that prints one line on COM1, makes PORT_WRITES `out`s to the POST port 0x80,
 * then stops the VMM: first through QEMU's isa-debug-exit port 0xf4 (ends QEMU when the bench adds
 * `-device isa-debug-exit,iobase=0xf4,iosize=4`; Kestrel and bare-vmm ignore/stop on it), then ACPI S5
 * (0x2000 to PM1a_CNT 0x604; ends Kestrel).
 *
 * It stays in 32-bit protected mode (the PVH entry state): no page tables, no stack, nothing to set up, so the
 * time to the first serial byte is the VMM's own start-up cost. The UART is written without polling LSR, so
 * every VMM sees exactly one exit per byte.
 */
#ifndef PORT_WRITES
#define PORT_WRITES 0
#endif

        .section .note.GNU-stack, "", @progbits

        .text
        .code32
        .globl pvh_entry
pvh_entry:
        cli
        movl    $message, %esi
        movw    $0x3f8, %dx
1:      lodsb
        testb   %al, %al
        jz      2f
        outb    %al, %dx
        jmp     1b
2:      movl    $PORT_WRITES, %ecx
        testl   %ecx, %ecx
        jz      4f
3:      outb    %al, $0x80
        decl    %ecx
        jnz     3b
4:      xorl    %eax, %eax
        outl    %eax, $0xf4                     /* QEMU exits with status (0 << 1) | 1 = 1 */
        movw    $0x604, %dx
        movw    $0x2000, %ax
        outw    %ax, %dx
5:      hlt
        jmp     5b

        .section .rodata
message:
        .asciz  "bench: hello\r\n"

        .section .note.Xen, "a", @note
        .balign 4
        .long   4                               /* namesz */
        .long   4                               /* descsz */
        .long   18                              /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz  "Xen"
        .long   pvh_entry

/*
 * kestrel-probe: a tiny x86_64 guest used by Kestrel's integration tests.
 *
 * One body, three entry shapes, selected at assembly time (gcc -E preprocesses this file):
 *   SHAPE_BZIMAGE  probe.bzImage   Linux boot protocol 2.15 image: real-mode setup sectors with a setup header,
 *                                  then the protected-mode part loaded at 0x100000:
 *                                    0x100000  32-bit entry (code32_start, ESI = boot_params)
 *                                    0x100200  64-bit entry (RSI = boot_params, VMM-built identity paging)
 *                                  The setup sectors also hold a small real-mode stub at offset 0x200 so that
 *                                  QEMU (which boots bzImages through its 16-bit option ROM) can run it too.
 *   SHAPE_ELF      probe.elf       vmlinux-like ELF64, e_entry = 64-bit entry (RSI = boot_params), no PVH note.
 *   SHAPE_PVH      probe.pvh.elf   ELF64 with a Xen PVH note (XEN_ELFNOTE_PHYS32_ENTRY): 32-bit protected-mode
 *                                  entry, paging off, EBX = hvm_start_info. e_entry is the 64-bit entry, as in a
 *                                  real vmlinux: a VMM that ignores the note boots it as "elf" and the banner says so.
 *
 * The 32-bit entries (bzImage's code32_start, PVH) build their own identity page tables for the first 4 GiB
 * (2 MiB pages, in .bss) and switch to long mode with the same routine the SMP application processors use.
 * Everything after that is the shared 64-bit body: banner, then the command named by the first word of the
 * kernel command line. See README.md for the exact console strings.
 *
 * Nothing here relies on .bss being zero at entry (a VMM may re-enter the image after a reset without
 * reloading it): every variable is initialised explicitly.
 *
 * Verified on QEMU (Debian 12, qemu-system-x86_64 7.2, -M pc, SeaBIOS) by try-on-qemu.sh; see that script's
 * header for the list of runs that passed.
 */

#define SEL_CODE64      0x08
#define SEL_DATA        0x10
#define SEL_CODE32      0x18

#define COM1            0x3f8
#define COM1_IER        (COM1 + 1)
#define COM1_FCR        (COM1 + 2)
#define COM1_MCR        (COM1 + 4)
#define COM1_LSR        (COM1 + 5)
#define LSR_DR          0x01
#define LSR_THRE        0x20

#define PIC1_DATA       0x21
#define PIC2_DATA       0xa1
#define I8042_CMD       0x64
#define CMOS_INDEX      0x70
#define CMOS_DATA       0x71
#define PM1A_CNT        0x604
#define S5_VALUE        0x2000          /* SLP_TYP 0 << 10 | SLP_EN (1 << 13) */
#define RESET_PORT      0xcf9
#define RESET_VALUE     0x06

#define IOAPIC_BASE     0xfec00000
#define LAPIC_BASE      0xfee00000
#define LAPIC_TPR       0x080
#define LAPIC_EOI       0x0b0
#define LAPIC_SVR       0x0f0
#define LAPIC_ICR_LO    0x300
#define LAPIC_ICR_HI    0x310
#define ICR_INIT_ALL_BUT_SELF  0x000c4500   /* shorthand 11, level assert, delivery INIT */
#define ICR_SIPI_ALL_BUT_SELF  0x000c4600   /* shorthand 11, level assert, delivery STARTUP | vector */
#define ICR_BUSY        (1 << 12)

#define MMIO_PROBE_ADDR 0xd0000000      /* Kestrel's platform MMIO window: nothing mapped there */

/*
 * Real-mode trampoline page for the APs. Kestrel's layout (arch/src/x86_64/layout.rs) uses 0x500 (GDT),
 * 0x520 (IDT), 0x6000 (PVH info), 0x7000 (zero page), 0x8000 page (boot stack), 0x9000-0xefff (page tables),
 * 0x20000 (cmdline): 0x3000 is free there, and free on QEMU/SeaBIOS too (QEMU puts the bzImage's real-mode
 * part at 0x10000, so 0x10000 would not be).
 */
#define TRAMPOLINE_BASE 0x3000

#define ECHO_VECTOR     0x30
#define PIT_VECTOR      0x31
#define ACPI_VECTOR     0x32
#define ACPI_PM1_STS    0x600
#define ACPI_PM1_EN     0x602
#define ACPI_PWRBTN     0x0100
#define SPURIOUS_VECTOR 0xff

/* CMOS NVRAM bytes used by the reset command: a boot counter and a check byte (counter ^ 0xa5). */
#define CMOS_BOOT_COUNT 0x40
#define CMOS_BOOT_CHECK 0x41
#define BOOT_CHECK_XOR  0xa5

/* Time-outs in TSC cycles (the TSC runs at >= 1 GHz on anything we care about, so these are upper bounds). */
#define SMP_WAIT_CYCLES     10000000000 /* BSP waits for the APs: ~3 s at 3 GHz; many vCPUs on a few busy host cores are slow */
#define INIT_DELAY_CYCLES   20000000    /* >= 10 ms between INIT and the first SIPI at <= 2 GHz */
#define SIPI_DELAY_CYCLES   1000000     /* >= 200 us between the SIPIs */
#define CF9_FAULT_MARK      0x5f        /* cf9fault: CMOS_BOOT_COUNT after its first boot */
#define GRACE_CYCLES        2000000000  /* after poweroff/reset: how long to wait before complaining */
#define PIT_WAIT_CYCLES     3000000000  /* 10 ticks at 100 Hz take 0.1 s; give up after ~1-3 s */

#if defined(SHAPE_BZIMAGE)
#define ENTRY_KIND_64 kind_bzimage
#elif defined(SHAPE_ELF) || defined(SHAPE_PVH)
#define ENTRY_KIND_64 kind_elf
#else
#error "define one of SHAPE_BZIMAGE, SHAPE_ELF, SHAPE_PVH"
#endif

        .section .note.GNU-stack, "", @progbits

/* ------------------------------------------------------------------------------------------------------------
 * bzImage setup sectors (file offset 0, two sectors: setup_sects = 1). Linked at address 0 so that label values
 * are file offsets; QEMU's option ROM enters the real-mode code at offset 0x200 with CS = segment of offset
 * 0x200 and DS = segment of the zero page (the start of this sector).
 * ------------------------------------------------------------------------------------------------------------ */
#ifdef SHAPE_BZIMAGE
#define SETUP_SECTS 1
        .section .setup, "ax"
        .code16
        .org 0x1f1
hdr_setup_sects:        .byte SETUP_SECTS
hdr_root_flags:         .word 0
hdr_syssize:            .long _syssize          /* protected-mode part in 16-byte units, from the link */
hdr_ram_size:           .word 0
hdr_vid_mode:           .word 0xffff            /* "normal" */
hdr_root_dev:           .word 0
hdr_boot_flag:          .word 0xaa55
        .org 0x200
hdr_jump:               jmp start_of_setup      /* two-byte short jump over the header */
        .org 0x202
hdr_header:             .ascii "HdrS"
hdr_version:            .word 0x020f
hdr_realmode_swtch:     .long 0
hdr_start_sys_seg:      .word 0
hdr_kernel_version:     .word 0
hdr_type_of_loader:     .byte 0
hdr_loadflags:          .byte 0x01              /* LOADED_HIGH */
hdr_setup_move_size:    .word 0
hdr_code32_start:       .long 0x100000
hdr_ramdisk_image:      .long 0
hdr_ramdisk_size:       .long 0
hdr_bootsect_kludge:    .long 0
hdr_heap_end_ptr:       .word 0
hdr_ext_loader_ver:     .byte 0
hdr_ext_loader_type:    .byte 0
        .org 0x228
hdr_cmd_line_ptr:       .long 0
hdr_initrd_addr_max:    .long 0x7fffffff
hdr_kernel_alignment:   .long 0x100000
hdr_relocatable_kernel: .byte 0
hdr_min_alignment:      .byte 12
hdr_xloadflags:         .word 0x0001            /* XLF_KERNEL_64: 64-bit entry at code32_start + 0x200 */
hdr_cmdline_size:       .long 2047
hdr_hardware_subarch:   .long 0
hdr_hardware_subarch_data: .quad 0
hdr_payload_offset:     .long 0
hdr_payload_length:     .long 0
hdr_setup_data:         .quad 0
hdr_pref_address:       .quad 0x100000
hdr_init_size:          .long _init_size        /* image + .bss, from the link */
hdr_handover_offset:    .long 0
        .org 0x268
hdr_kernel_info_offset: .long 0

/* Real-mode setup code, only used by bootloaders that take the 16-bit path (QEMU's linuxboot option ROM).
 * Switch to flat protected mode and jump to code32_start with ESI = linear address of the zero page. */
start_of_setup:
        cli
        xorl    %esi, %esi
        movw    %ds, %si
        shll    $4, %esi
        lgdtl   %cs:(setup_gdtr - 0x200)        /* CS base is this sector's offset 0x200 */
        movl    %cr0, %eax
        orl     $1, %eax
        movl    %eax, %cr0
        movw    $SEL_DATA, %ax                  /* the 32-bit protocol wants flat data segments: */
        movw    %ax, %ds                        /* load them now, in 16-bit protected mode */
        movw    %ax, %es
        movw    %ax, %ss
        movw    %ax, %fs
        movw    %ax, %gs
        ljmpl   $SEL_CODE32, $bz_entry32
        .balign 8
setup_gdtr:
        .word   boot_gdt_end - boot_gdt - 1
        .long   boot_gdt
        .org    (SETUP_SECTS + 1) * 512 - 1
        .byte   0
#endif

/* ------------------------------------------------------------------------------------------------------------
 * Entry points (.text.head is linked first, at the load address).
 * ------------------------------------------------------------------------------------------------------------ */
        .section .text.head, "ax"
#ifdef SHAPE_BZIMAGE
        .code32
        .globl bz_entry32
bz_entry32:                                     /* 0x100000, 32-bit boot protocol: ESI = boot_params */
        movl    $bz_entry64_from32, %ebp
        jmp     enter_long_mode
        .code64
bz_entry64_from32:
        movl    %esi, %esi                      /* upper halves are undefined after the mode switch */
        jmp     entry64
        .org    0x200
#endif
        .code64
        .globl entry64
entry64:                                        /* 64-bit boot protocol: RSI = boot_params */
        cli
        leaq    ENTRY_KIND_64(%rip), %rdi
        movl    0x228(%rsi), %esi               /* boot_params.hdr.cmd_line_ptr */
        jmp     body

#ifdef SHAPE_PVH
        .code32
        .globl pvh_entry32
pvh_entry32:                                    /* PVH: 32-bit, paging off, EBX = hvm_start_info */
        movl    $pvh_entry64, %ebp
        jmp     enter_long_mode
        .code64
pvh_entry64:
        movl    %ebx, %ebx
        leaq    kind_pvh(%rip), %rdi
        xorl    %esi, %esi
        cmpl    $0x336ec578, (%rbx)             /* hvm_start_info.magic */
        jne     body                            /* no start_info: run with an empty command line */
        movq    24(%rbx), %rsi                  /* cmdline_paddr */
        jmp     body

        .section .note.Xen, "a", @note
        .balign 4
        .long   4                               /* namesz: "Xen\0" */
        .long   4                               /* descsz */
        .long   18                              /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz  "Xen"
        .long   pvh_entry32
#endif

/* ------------------------------------------------------------------------------------------------------------
 * 32-bit protected mode -> long mode. Used by the 32-bit entries and by the APs.
 * ------------------------------------------------------------------------------------------------------------ */
        .text
        .code32
/* enter_long_mode: EBP = 64-bit target (below 4 GiB). Preserves EBX and ESI (the boot info pointers).
 * Needs no stack: the boot protocols do not promise one. */
enter_long_mode:
        cli
        cld
        lgdtl   %cs:boot_gdtr                   /* CS is flat in every protocol; DS may not be yet */
        ljmpl   $SEL_CODE32, $1f                /* reload CS from our own GDT */
1:      movl    $SEL_DATA, %eax
        movl    %eax, %ds
        movl    %eax, %es
        movl    %eax, %ss
        movl    %eax, %fs
        movl    %eax, %gs
        /* PML4 -> one PDPT -> four page directories of 2 MiB pages: identity map of 0..4 GiB. */
        movl    $pt_pml4, %edi
        movl    $(6 * 4096 / 4), %ecx
        xorl    %eax, %eax
        rep stosl
        movl    $(pt_pdpt + 0x003), pt_pml4     /* present | writable */
        movl    $(pt_pd + 0x0003), pt_pdpt
        movl    $(pt_pd + 0x1003), pt_pdpt + 8
        movl    $(pt_pd + 0x2003), pt_pdpt + 16
        movl    $(pt_pd + 0x3003), pt_pdpt + 24
        movl    $pt_pd, %edi
        movl    $0x83, %eax                     /* present | writable | 2 MiB page */
        xorl    %ecx, %ecx
2:      movl    %eax, (%edi, %ecx, 8)
        addl    $0x200000, %eax
        incl    %ecx
        cmpl    $2048, %ecx
        jne     2b
        movl    $pt_pml4, %eax
        /* fall through */
/* lm_switch: EAX = CR3, EBP = 64-bit target; flat segments already loaded from boot_gdt. */
lm_switch:
        movl    %eax, %cr3
        movl    %cr4, %eax
        orl     $0x20, %eax                     /* PAE */
        movl    %eax, %cr4
        movl    $0xc0000080, %ecx               /* EFER */
        rdmsr
        orl     $0x100, %eax                    /* LME */
        wrmsr
        movl    %cr0, %eax
        orl     $0x80000001, %eax               /* PG | PE */
        movl    %eax, %cr0
        ljmpl   $SEL_CODE64, $lm_entry64
        .code64
lm_entry64:
        movl    %ebp, %ebp
        jmp     *%rbp

/* AP path, part 2: the real-mode trampoline jumps here in flat 32-bit mode. Reuse the BSP's page tables. */
        .code32
ap_entry32:
        movl    $SEL_DATA, %eax
        movl    %eax, %ds
        movl    %eax, %es
        movl    %eax, %ss
        movl    %eax, %fs
        movl    %eax, %gs
        movl    ap_cr3, %eax
        movl    $ap_entry64, %ebp
        jmp     lm_switch

/* AP path, part 1: copied to TRAMPOLINE_BASE; the SIPI starts it at CS = TRAMPOLINE_BASE >> 4, IP = 0. */
        .code16
        .balign 16
tramp_start:
        cli
        lgdtl   %cs:(tramp_gdtr - tramp_start)
        movl    %cr0, %eax
        orl     $1, %eax
        movl    %eax, %cr0
        ljmpl   $SEL_CODE32, $ap_entry32
        .balign 8
tramp_gdtr:
        .word   boot_gdt_end - boot_gdt - 1
        .long   boot_gdt
tramp_end:

/* AP path, part 3: long mode. There is one shared AP stack: take the print lock first (inline, no stack needed),
 * then borrow the stack until the lock is released; after that the AP never touches memory again. */
        .code64
ap_entry64:
1:      lock btsl $0, print_lock(%rip)
        jnc     2f
        pause
        jmp     1b
2:      leaq    ap_stack_top(%rip), %rsp
        call    print_cpu_up
        lock incl ap_count(%rip)
        movl    $0, print_lock(%rip)
3:      cli
        hlt
        jmp     3b

/* ------------------------------------------------------------------------------------------------------------
 * The shared 64-bit body. RDI = entry kind string, RSI = physical address of the command line (0: none).
 * ------------------------------------------------------------------------------------------------------------ */
body:
        cli
        cld
        leaq    stack_top(%rip), %rsp
        /* Our own GDT, so that selectors are known whatever the VMM or loader set up. */
        lgdt    boot_gdtr(%rip)
        pushq   $SEL_CODE64
        leaq    1f(%rip), %rax
        pushq   %rax
        lretq
1:      movl    $SEL_DATA, %eax
        movl    %eax, %ds
        movl    %eax, %es
        movl    %eax, %ss
        movl    %eax, %fs
        movl    %eax, %gs
        movl    $0, print_lock(%rip)
        movl    $0, ap_count(%rip)
        movb    $0, echo_quit(%rip)
        testq   %rsi, %rsi
        jnz     2f
        leaq    empty_string(%rip), %rsi
2:      movq    %rsi, %r12                      /* r12 = command line (callee-saved by our routines) */
        movq    %rdi, %r13

        /* kestrel-probe: entry=<kind> cmdline="<cmdline>" */
        leaq    msg_banner(%rip), %rsi
        call    puts
        movq    %r13, %rsi
        call    puts
        leaq    msg_cmdline(%rip), %rsi
        call    puts
        movq    %r12, %rsi
        movl    $2048, %ecx
        call    putsn
        leaq    msg_quote_crlf(%rip), %rsi
        call    puts

        /* First word of the command line: skip blanks, then look it up. */
        movq    %r12, %rsi
3:      movb    (%rsi), %al
        cmpb    $' ', %al
        je      4f
        cmpb    $'\t', %al
        jne     5f
4:      incq    %rsi
        jmp     3b
5:      movq    %rsi, %r12                      /* r12 = first word */
        leaq    cmd_table(%rip), %rbx
6:      movq    (%rbx), %rdi
        testq   %rdi, %rdi
        jz      cmd_unknown
        movq    %r12, %rsi
        call    word_eq
        jz      7f
        addq    $16, %rbx
        jmp     6b
7:      jmp     *8(%rbx)

/* word_eq: ZF=1 if the word at RSI (ended by NUL/blank/newline) equals the NUL-terminated string at RDI. */
word_eq:
        pushq   %rax
1:      movb    (%rdi), %al
        testb   %al, %al
        jz      2f
        cmpb    (%rsi), %al
        jne     9f
        incq    %rsi
        incq    %rdi
        jmp     1b
2:      movb    (%rsi), %al                     /* candidate ended: the word must end here too */
        testb   %al, %al
        jz      9f
        cmpb    $' ', %al
        je      9f
        cmpb    $'\t', %al
        je      9f
        cmpb    $'\n', %al
        je      9f
        cmpb    $'\r', %al
9:      popq    %rax
        ret

/* ---- commands ---------------------------------------------------------------------------------------------- */

cmd_poweroff:
        leaq    msg_poweroff(%rip), %rsi
        call    puts
        jmp     poweroff

cmd_unknown:
        leaq    msg_unknown(%rip), %rsi
        call    puts
        jmp     poweroff

cmd_spin:
1:      cli
        hlt
        jmp     1b

cmd_flood:                                      /* "probe: flood N" for N = 0, 1, 2, ... forever */
        xorl    %eax, %eax
1:      leaq    msg_flood(%rip), %rsi
        call    puts
        call    putdec
        call    putcrlf
        incq    %rax
        jmp     1b

cmd_cpuid:                                      /* "probe: cpuid 1.ecx=X 1.edx=X 7.ebx=X 80000001.ecx=X", poweroff */
        leaq    msg_cpuid(%rip), %rsi
        call    puts
        movl    $1, %eax
        cpuid
        movl    %edx, %r8d
        movl    %ecx, %eax
        call    puthex32
        leaq    msg_cpuid_1edx(%rip), %rsi
        call    puts
        movl    %r8d, %eax
        call    puthex32
        leaq    msg_cpuid_7ebx(%rip), %rsi
        call    puts
        movl    $7, %eax
        xorl    %ecx, %ecx
        cpuid
        movl    %ebx, %eax
        call    puthex32
        leaq    msg_cpuid_ext(%rip), %rsi
        call    puts
        movl    $0x80000001, %eax
        cpuid
        movl    %ecx, %eax
        call    puthex32
        call    putcrlf
        jmp     poweroff

cmd_triplefault:
        lidt    zero_idtr(%rip)
        int3                                    /* #BP -> #GP (limit 0) -> #DF -> shutdown */
        leaq    msg_alive(%rip), %rsi
        call    puts
        jmp     halt_forever

cmd_mmio:
        movl    $MMIO_PROBE_ADDR, %ebx          /* movl: a 32-bit immediate must not be sign-extended */
        movl    (%rbx), %eax
        call    print_mmio
        movl    $0x12345678, (%rbx)
        movl    (%rbx), %eax
        call    print_mmio
        jmp     poweroff
print_mmio:                                     /* "probe: mmio read 0x%08x" */
        leaq    msg_mmio(%rip), %rsi
        call    puts
        call    puthex32
        jmp     putcrlf

/* reset: CMOS NVRAM keeps a boot counter across resets. The counter is trusted only when its check byte
 * matches and it is 1 or 2 (a sequence in progress); anything else (fresh CMOS, leftovers, garbage) starts a
 * new sequence, so the console always shows boots 1, 2, 3. */
cmd_reset:
        movb    $CMOS_BOOT_COUNT, %al
        call    cmos_read
        movb    %al, %bl
        movb    $CMOS_BOOT_CHECK, %al
        call    cmos_read
        xorb    $BOOT_CHECK_XOR, %al
        cmpb    %al, %bl
        jne     1f
        cmpb    $1, %bl
        jb      1f
        cmpb    $2, %bl
        jbe     2f
1:      xorl    %ebx, %ebx
2:      incb    %bl                             /* this boot's number */
        movb    $CMOS_BOOT_COUNT, %al
        movb    %bl, %ah
        call    cmos_write
        movb    $CMOS_BOOT_CHECK, %al
        movb    %bl, %ah
        xorb    $BOOT_CHECK_XOR, %ah
        call    cmos_write
        leaq    msg_boot(%rip), %rsi
        call    puts
        movzbl  %bl, %eax
        call    putdec
        call    putcrlf
        cmpb    $3, %bl
        jb      3f
        movb    $CMOS_BOOT_COUNT, %al           /* done: leave the counter cleared for the next run */
        xorb    %ah, %ah
        call    cmos_write
        movb    $CMOS_BOOT_CHECK, %al
        xorb    %ah, %ah
        call    cmos_write
        leaq    msg_reset_done(%rip), %rsi
        call    puts
        jmp     poweroff
3:      testb   $1, %bl
        jz      4f
        movb    $0xfe, %al                      /* odd boot: i8042 "pulse reset line" */
        outb    %al, $I8042_CMD
        jmp     5f
4:      movb    $RESET_VALUE, %al               /* even boot: ACPI reset register */
        movw    $RESET_PORT, %dx
        outb    %al, %dx
5:      movq    $GRACE_CYCLES, %rcx
        call    delay_cycles
        leaq    msg_reset_failed(%rip), %rsi
        call    puts
        jmp     halt_forever

/* cf9fault: the first boot writes the ACPI reset register and triple-faults at once, as Linux does when a reset
 * does not take effect immediately (its last fallback); the VMM must carry out the reset, not report the fault.
 * The boot after it (a mark in CMOS NVRAM) says so and powers off. */
cmd_cf9fault:
        movb    $CMOS_BOOT_COUNT, %al
        call    cmos_read
        cmpb    $CF9_FAULT_MARK, %al
        je      1f
        movb    $CMOS_BOOT_COUNT, %al
        movb    $CF9_FAULT_MARK, %ah
        call    cmos_write
        movb    $RESET_VALUE, %al
        movw    $RESET_PORT, %dx
        outb    %al, %dx
        jmp     cmd_triplefault
1:      movb    $CMOS_BOOT_COUNT, %al
        xorb    %ah, %ah
        call    cmos_write
        leaq    msg_reset_done(%rip), %rsi
        call    puts
        jmp     poweroff

/* rtc: "probe: rtc 20YY-MM-DD HH:MM:SS" from the CMOS clock. */
cmd_rtc:
        movl    $10, %r15d                      /* attempts to get two identical readings */
1:      leaq    rtc_a(%rip), %rdi
        call    rtc_read_all
        leaq    rtc_b(%rip), %rdi
        call    rtc_read_all
        leaq    rtc_a(%rip), %rsi
        leaq    rtc_b(%rip), %rdi
        movl    $6, %ecx
        repe cmpsb
        je      2f
        decl    %r15d
        jnz     1b                              /* the clock ticked in between: read again */
2:      movzbq  rtc_b + 0(%rip), %r8            /* raw sec min hour day month year */
        movzbq  rtc_b + 1(%rip), %r9
        movzbq  rtc_b + 2(%rip), %r10
        movzbq  rtc_b + 3(%rip), %r11
        movzbq  rtc_b + 4(%rip), %r12
        movzbq  rtc_b + 5(%rip), %r13
        movb    $0x0b, %al
        call    cmos_read
        movb    %al, %bl                        /* bl = register B */
        movq    %r10, %rax
        andb    $0x80, %al
        movb    %al, %bh                        /* bh = PM flag (12-hour mode only) */
        andq    $0x7f, %r10
        testb   $0x04, %bl                      /* DM: 1 = binary, 0 = BCD */
        jnz     7f
        movq    %r8, %rax
        call    bcd2bin
        movq    %rax, %r8
        movq    %r9, %rax
        call    bcd2bin
        movq    %rax, %r9
        movq    %r10, %rax
        call    bcd2bin
        movq    %rax, %r10
        movq    %r11, %rax
        call    bcd2bin
        movq    %rax, %r11
        movq    %r12, %rax
        call    bcd2bin
        movq    %rax, %r12
        movq    %r13, %rax
        call    bcd2bin
        movq    %rax, %r13
7:      testb   $0x02, %bl                      /* 24/12: 1 = 24-hour */
        jnz     8f
        cmpq    $12, %r10                       /* 12-hour: 12 AM is 0, PM adds 12 */
        jne     9f
        xorl    %r10d, %r10d
9:      testb   %bh, %bh
        jz      8f
        addq    $12, %r10
8:      leaq    msg_rtc(%rip), %rsi
        call    puts
        movq    %r13, %rax
        call    put2d
        movb    $'-', %al
        call    putc
        movq    %r12, %rax
        call    put2d
        movb    $'-', %al
        call    putc
        movq    %r11, %rax
        call    put2d
        movb    $' ', %al
        call    putc
        movq    %r10, %rax
        call    put2d
        movb    $':', %al
        call    putc
        movq    %r9, %rax
        call    put2d
        movb    $':', %al
        call    putc
        movq    %r8, %rax
        call    put2d
        call    putcrlf
        jmp     poweroff

/* rtc_read_all: wait until no update is in progress (register A bit 7), then store the six time registers
 * (sec, min, hour, day, month, year) at RDI. */
rtc_read_all:
        movl    $1000000, %ecx
1:      movb    $0x0a, %al
        call    cmos_read
        testb   $0x80, %al
        jz      2f
        pause
        loop    1b
2:      leaq    rtc_regs(%rip), %rsi
        movl    $6, %ecx
3:      movb    (%rsi), %al
        call    cmos_read
        movb    %al, (%rdi)
        incq    %rsi
        incq    %rdi
        loop    3b
        ret

/* bcd2bin: RAX = BCD byte -> RAX = binary. */
bcd2bin:
        pushq   %rcx
        movq    %rax, %rcx
        shrq    $4, %rax
        andq    $0x0f, %rax
        imulq   $10, %rax, %rax
        andq    $0x0f, %rcx
        addq    %rcx, %rax
        popq    %rcx
        ret

/* smp: count enabled LAPICs in the MADT, start the APs with INIT-SIPI-SIPI, wait for them. */
cmd_smp:
        call    acpi_count_cpus                 /* eax = expected CPUs, 0 without ACPI/MADT */
        movl    %eax, %r14d
        testl   %eax, %eax
        jnz     1f
        leaq    msg_no_madt(%rip), %rsi
        call    puts
        movl    $1, %r14d
1:      movq    %cr3, %rax                      /* the APs reuse our page tables (they are below 4 GiB) */
        movl    %eax, ap_cr3(%rip)
        call    spin_lock                       /* the BSP reports itself like the APs do */
        call    print_cpu_up
        call    spin_unlock
        cmpl    $1, %r14d
        jbe     5f
        leaq    tramp_start(%rip), %rsi
        movl    $TRAMPOLINE_BASE, %edi
        movl    $(tramp_end - tramp_start), %ecx
        rep movsb
        movl    $LAPIC_BASE, %ebx
        orl     $0x100, LAPIC_SVR(%rbx)         /* software-enable the local APIC */
        movl    $ICR_INIT_ALL_BUT_SELF, %eax
        call    lapic_send_ipi
        movq    $INIT_DELAY_CYCLES, %rcx
        call    delay_cycles
        movl    $(ICR_SIPI_ALL_BUT_SELF | (TRAMPOLINE_BASE >> 12)), %eax
        call    lapic_send_ipi
        movq    $SIPI_DELAY_CYCLES, %rcx
        call    delay_cycles
        movl    $(ICR_SIPI_ALL_BUT_SELF | (TRAMPOLINE_BASE >> 12)), %eax
        call    lapic_send_ipi                  /* a second SIPI is ignored by APs that already run */
        rdtsc
        shlq    $32, %rdx
        orq     %rax, %rdx
        movq    $SMP_WAIT_CYCLES, %rax
        leaq    (%rdx, %rax), %r15              /* r15 = deadline */
2:      movl    ap_count(%rip), %eax
        incl    %eax
        cmpl    %r14d, %eax
        jae     5f
        pause
        rdtsc
        shlq    $32, %rdx
        orq     %rax, %rdx
        cmpq    %r15, %rdx
        jb      2b
        call    spin_lock
        leaq    msg_smp_timeout(%rip), %rsi
        call    puts
        call    spin_unlock
5:      call    spin_lock                       /* "probe: smp <up>/<expected> cpus" */
        leaq    msg_smp(%rip), %rsi
        call    puts
        movl    ap_count(%rip), %eax
        incl    %eax
        call    putdec
        movb    $'/', %al
        call    putc
        movl    %r14d, %eax
        call    putdec
        leaq    msg_cpus(%rip), %rsi
        call    puts
        call    spin_unlock
        jmp     poweroff

/* lapic_send_ipi: EAX = ICR low (destination shorthand used, so ICR high is 0). */
lapic_send_ipi:
        pushq   %rbx
        movl    $LAPIC_BASE, %ebx
        movl    $0, LAPIC_ICR_HI(%rbx)
        movl    %eax, LAPIC_ICR_LO(%rbx)
        movl    $1000000, %ecx
1:      testl   $ICR_BUSY, LAPIC_ICR_LO(%rbx)
        jz      2f
        pause
        loop    1b
2:      popq    %rbx
        ret

/* print_cpu_up: "probe: cpu <initial APIC id> up" (caller holds the print lock). */
print_cpu_up:
        pushq   %rbx
        leaq    msg_cpu(%rip), %rsi
        call    puts
        movl    $1, %eax
        cpuid
        shrl    $24, %ebx
        movl    %ebx, %eax
        call    putdec
        leaq    msg_up(%rip), %rsi
        call    puts
        popq    %rbx
        ret

/* acpi_count_cpus: EAX = enabled Processor Local APIC entries in the MADT, 0 if no RSDP/MADT found. */
acpi_count_cpus:
        pushq   %rbx
        movl    $0xe0000, %esi
        movabsq $0x2052545020445352, %rbx       /* "RSD PTR " */
1:      cmpq    %rbx, (%rsi)
        jne     3f
        xorl    %eax, %eax                      /* checksum of the ACPI 1.0 part (20 bytes) must be 0 */
        xorl    %ecx, %ecx
2:      addb    (%rsi, %rcx), %al
        incl    %ecx
        cmpl    $20, %ecx
        jb      2b
        testb   %al, %al
        jz      4f
3:      addl    $16, %esi
        cmpl    $0x100000, %esi
        jb      1b
        jmp     9f                              /* no RSDP */
4:      movl    $4, %r8d                        /* entry size: RSDT 4, XSDT 8 */
        movl    16(%rsi), %edx                  /* RsdtAddress */
        cmpb    $2, 15(%rsi)                    /* revision >= 2: prefer the XSDT */
        jb      5f
        movq    24(%rsi), %rax
        testq   %rax, %rax
        jz      5f
        movq    %rax, %rdx
        movl    $8, %r8d
5:      testq   %rdx, %rdx
        jz      9f
        movl    4(%rdx), %r9d                   /* table length */
        addq    %rdx, %r9                       /* r9 = end of the RSDT/XSDT */
        leaq    36(%rdx), %rsi                  /* first entry after the SDT header */
6:      leaq    (%rsi, %r8), %rax
        cmpq    %r9, %rax
        ja      9f                              /* no MADT */
        movl    (%rsi), %eax
        cmpl    $8, %r8d
        jne     7f
        movq    (%rsi), %rax
7:      addq    %r8, %rsi
        testq   %rax, %rax
        jz      6b
        cmpl    $0x43495041, (%rax)             /* "APIC" */
        jne     6b
        movl    4(%rax), %r9d
        addq    %rax, %r9                       /* r9 = end of the MADT */
        leaq    44(%rax), %rsi                  /* interrupt controller structures */
        xorl    %eax, %eax
8:      leaq    2(%rsi), %rcx
        cmpq    %r9, %rcx
        ja      10f
        movzbl  1(%rsi), %ecx                   /* length */
        testl   %ecx, %ecx
        jz      10f
        cmpb    $0, (%rsi)                      /* type 0: Processor Local APIC */
        jne     11f
        testl   $1, 4(%rsi)                     /* flags bit 0: enabled */
        jz      11f
        incl    %eax
11:     addq    %rcx, %rsi
        jmp     8b
9:      xorl    %eax, %eax
10:     popq    %rbx
        ret

/* echo: interrupt-driven serial input through the IOAPIC. */
cmd_echo:
        movl    $4, %r8d                        /* COM1's IRQ 4: edge-triggered, active high */
        movl    $ECHO_VECTOR, %r9d
        call    ioapic_route
        movw    $COM1_FCR, %dx                  /* FIFO on, both cleared, trigger level 1 byte */
        movb    $0x07, %al
        outb    %al, %dx
        movw    $COM1_MCR, %dx                  /* DTR | RTS | OUT2 (OUT2 gates the IRQ line on a PC) */
        movb    $0x0b, %al
        outb    %al, %dx
        movw    $COM1_IER, %dx                  /* interrupt on received data */
        movb    $0x01, %al
        outb    %al, %dx
1:      movw    $COM1_LSR, %dx                  /* drop stale input, so only input sent after "ready" counts */
        inb     %dx, %al
        testb   $LSR_DR, %al
        jz      2f
        movw    $COM1, %dx
        inb     %dx, %al
        jmp     1b
2:      leaq    msg_echo_ready(%rip), %rsi
        call    puts
3:      sti
        hlt
        jmp     3b

/* pit: the 8254's IRQ0 must arrive through the IOAPIC pin the MADT's interrupt source override names (pin 2 on a
 * PC): "probe: pit ticks N" once 10 ticks at 100 Hz arrived, or however many came before the time-out. */
cmd_pit:
        movl    $2, %r8d                        /* IRQ0 arrives on pin 2, per the MADT's override: edge */
        movl    $PIT_VECTOR, %r9d
        call    ioapic_route
        movb    $0x34, %al                      /* channel 0, lobyte/hibyte, mode 2 (rate generator) */
        outb    %al, $0x43
        movw    $11932, %ax                     /* 1193182 Hz / 11932 = 100 Hz */
        outb    %al, $0x40
        movb    %ah, %al
        outb    %al, $0x40
        rdtsc
        shlq    $32, %rdx
        orq     %rax, %rdx
        movq    $PIT_WAIT_CYCLES, %rax
        leaq    (%rdx, %rax), %r15              /* r15 = deadline */
        sti
1:      cmpl    $10, pit_ticks(%rip)
        jae     2f
        pause
        rdtsc
        shlq    $32, %rdx
        orq     %rax, %rdx
        cmpq    %r15, %rdx
        jb      1b
2:      cli
        leaq    msg_pit(%rip), %rsi
        call    puts
        movl    pit_ticks(%rip), %eax
        call    putdec
        leaq    msg_crlf(%rip), %rsi
        call    puts
        jmp     poweroff

/* acpi: wait for the ACPI fixed-feature power button: enable PWRBTN_EN, take the SCI (IRQ 9, level-triggered,
 * active high as the MADT's override says) through the IOAPIC, and power off once PM1_STS shows the button. */
cmd_acpi:
        movl    $9, %r8d                        /* the SCI: level-triggered, active high (the MADT's override) */
        movl    $(0x8000 | ACPI_VECTOR), %r9d
        call    ioapic_route
        movw    $ACPI_PM1_EN, %dx               /* PWRBTN_EN */
        movw    $ACPI_PWRBTN, %ax
        outw    %ax, %dx
        leaq    msg_acpi_ready(%rip), %rsi
        call    puts
1:      sti
        hlt
        cli
        cmpb    $0, acpi_button(%rip)
        je      1b
        leaq    msg_acpi_button(%rip), %rsi
        call    puts
        jmp     poweroff

/* acpi_sci: called from the interrupt handler: acknowledge the power button in PM1_STS (write 1 to clear) before
 * the EOI, so the level-triggered SCI is not raised again. */
acpi_sci:
        movw    $ACPI_PM1_STS, %dx
        inw     %dx, %ax
        testw   $ACPI_PWRBTN, %ax
        jz      1f
        movw    $ACPI_PWRBTN, %ax
        outw    %ax, %dx
        movb    $1, acpi_button(%rip)
1:      ret

/* serial_rx: called from the interrupt handler: echo every received byte; 'q' ends the test. */
serial_rx:
1:      movw    $COM1_LSR, %dx
        inb     %dx, %al
        testb   $LSR_DR, %al
        jz      2f
        movw    $COM1, %dx
        inb     %dx, %al
        call    putc
        cmpb    $'q', %al
        jne     1b
        movb    $1, echo_quit(%rip)
        jmp     1b
2:      cmpb    $0, echo_quit(%rip)
        je      3f
        leaq    msg_echo_done(%rip), %rsi
        call    puts
        jmp     poweroff
3:      ret

/* ioapic_route: interrupts by IOAPIC pin R8D reach the BSP (APIC id 0) with the low redirection dword R9D
 * (vector, and bit 15 for level-triggered); the IDT is set up, the legacy 8259s masked so the pin is the only path,
 * and the local APIC enabled. */
ioapic_route:
        call    setup_idt
        movb    $0xff, %al
        outb    %al, $PIC1_DATA
        outb    %al, $PIC2_DATA
        movl    $LAPIC_BASE, %eax
        movl    $0, LAPIC_TPR(%rax)
        movl    $(0x100 | SPURIOUS_VECTOR), LAPIC_SVR(%rax)
        movl    $IOAPIC_BASE, %eax
        leal    0x11(, %r8, 2), %ecx            /* IOREDTBL high dword: 0x10 + 2 * pin + 1 */
        movl    %ecx, (%rax)
        movl    $0, 0x10(%rax)                  /* destination: APIC 0 */
        decl    %ecx
        movl    %ecx, (%rax)
        movl    %r9d, 0x10(%rax)                /* fixed delivery, physical, unmasked */
        ret

/* setup_idt: 256 interrupt gates, one 16-byte stub per vector. */
setup_idt:
        leaq    idt(%rip), %rdi
        leaq    isr_stubs(%rip), %rax
        movl    $256, %ecx
1:      movq    %rax, %rdx
        movw    %dx, (%rdi)                     /* offset 15:0 */
        movw    $SEL_CODE64, 2(%rdi)
        movw    $0x8e00, 4(%rdi)                /* present, DPL 0, 64-bit interrupt gate, IST 0 */
        shrq    $16, %rdx
        movw    %dx, 6(%rdi)                    /* offset 31:16 */
        shrq    $16, %rdx
        movl    %edx, 8(%rdi)                   /* offset 63:32 */
        movl    $0, 12(%rdi)
        addq    $16, %rax
        addq    $16, %rdi
        loop    1b
        lidt    idtr(%rip)
        ret

        .balign 16
isr_stubs:
        vector = 0
        .rept 256
        .balign 16
        pushq   $vector
        jmp     isr_common
        vector = vector + 1
        .endr

isr_common:
        pushq   %rax
        pushq   %rcx
        pushq   %rdx
        pushq   %rsi
        pushq   %rdi
        pushq   %r8
        movq    48(%rsp), %rax                  /* vector */
        cmpq    $32, %rax
        jb      3f
        cmpq    $SPURIOUS_VECTOR, %rax
        je      2f                              /* spurious: no EOI */
        cmpq    $PIT_VECTOR, %rax
        jne     4f
        incl    pit_ticks(%rip)
        jmp     1f
4:      cmpq    $ACPI_VECTOR, %rax
        jne     5f
        call    acpi_sci
        jmp     1f
5:      cmpq    $ECHO_VECTOR, %rax
        jne     1f
        call    serial_rx
1:      movl    $(LAPIC_BASE + LAPIC_EOI), %eax
        movl    $0, (%rax)
2:      popq    %r8
        popq    %rdi
        popq    %rsi
        popq    %rdx
        popq    %rcx
        popq    %rax
        addq    $8, %rsp
        iretq
3:      leaq    msg_exception(%rip), %rsi       /* exceptions are bugs here: say which and stop */
        call    puts
        call    putdec
        call    putcrlf
        jmp     halt_forever

/* ---- virtio: hostile virtqueues on one virtio-mmio device, a well-behaved one beside it --------------------------
 *
 * Polling only (no interrupts: the IOAPIC pins 16+ stay masked). Slot i is the virtio-mmio v2 transport at
 * VIRTIO_MMIO_BASE + i * 0x1000. Both slots 0 and 1 must be virtio-blk: slot 0 ("A", writable) takes the hostile
 * chains, slot 1 ("B") is only used well. Every hostile case starts from a freshly reset and re-initialised A, so
 * one case's damage (NEEDS_RESET, a broken queue) cannot decide the next one's outcome. See README.md for the
 * console lines.
 *
 * Memory: each slot gets 8 KiB of the payload's own .bss (vq_mem + slot * 0x2000): the first page holds the rings
 * of queue 0 (size VIO_QSIZE), the second the request header, status byte and a 512-byte data buffer. .bss is part
 * of the image's footprint (bzImage init_size, the ELF's p_memsz), so the loader keeps everything else (zero page,
 * command line, boot page tables, initrd) out of it, and it lies far below the 64 MiB minimum of guest memory.
 * Addresses are identity-mapped (first 4 GiB), so virtual = guest-physical.
 */
#define VIRTIO_MMIO_BASE 0xd0000000
#define VIO_SLOT_SIZE   0x1000
#define VIO_MAGIC       0x000
#define VIO_VERSION     0x004
#define VIO_DEVICE_ID   0x008
#define VIO_DEV_FEAT    0x010
#define VIO_DEV_FEAT_SEL 0x014
#define VIO_DRV_FEAT    0x020
#define VIO_DRV_FEAT_SEL 0x024
#define VIO_QUEUE_SEL   0x030
#define VIO_QUEUE_MAX   0x034
#define VIO_QUEUE_NUM   0x038
#define VIO_QUEUE_READY 0x044
#define VIO_QUEUE_NOTIFY 0x050
#define VIO_STATUS      0x070
#define VIO_QUEUE_DESC  0x080           /* low; high at +4 */
#define VIO_QUEUE_AVAIL 0x090
#define VIO_QUEUE_USED  0x0a0
#define VIO_MAGIC_VALUE 0x74726976      /* "virt" */
#define VIO_S_ACK       0x01
#define VIO_S_DRIVER    0x02
#define VIO_S_DRIVER_OK 0x04
#define VIO_S_FEATURES_OK 0x08
#define VIO_S_NEEDS_RESET 0x40
#define VIO_QSIZE       8
#define VIO_WAIT_CYCLES 2000000000      /* per request: ~0.7-2 s; a served request takes microseconds */
/* Offsets in a slot's 8 KiB. Split-ring layout (virtio 1.2, 2.7): descriptors 16 bytes each, 16-byte aligned;
 * available ring flags u16, idx u16, ring[size] u16 (used_event u16), 2-byte aligned; used ring flags u16,
 * idx u16, ring[size] {id u32, len u32} (avail_event u16), 4-byte aligned. */
#define VQ_DESC         0x000           /* 8 * 16 = 128 bytes */
#define VQ_AVAIL        0x100           /* 4 + 8 * 2 + 2 = 22 bytes */
#define VQ_USED         0x200           /* 4 + 8 * 8 + 2 = 70 bytes */
#define VB_HDR          0x1000          /* virtio_blk_req header: type u32, reserved u32, sector u64 */
#define VB_STATUS       0x1010
#define VB_DATA         0x1200          /* 512 bytes */
#define VB_FILL         0x5a            /* the data buffer's contents before every request */
#define VD_NEXT         1
#define VD_WRITE        2
#define VBLK_T_IN       0
#define VBLK_T_OUT      1
#define FAR_ADDR        0x700000000000  /* far outside guest memory (anything >= 4 GiB is taken as absolute) */

cmd_virtio:
        /* (1) what is in slots 0 and 1 */
        xorl    %ebx, %ebx
1:      call    vio_probe_slot
        leaq    vio_ids(%rip), %rdi
        movl    %eax, (%rdi, %rbx, 4)
        incl    %ebx
        cmpl    $2, %ebx
        jb      1b
        cmpl    $2, vio_ids(%rip)
        jne     2f
        cmpl    $2, vio_ids + 4(%rip)
        je      3f
2:      leaq    msg_vio_need(%rip), %rsi
        call    puts
        jmp     vio_done
        /* (2) bring both up as a modern driver */
3:      xorl    %ebx, %ebx
4:      call    vio_select
        call    vio_init
        movl    %eax, %r13d
        leaq    msg_vio_slot(%rip), %rsi
        call    puts
        movl    %ebx, %eax
        call    putdec
        movl    %r13d, %ecx
        call    vio_init_result
        incl    %ebx
        cmpl    $2, %ebx
        jb      4b
        /* (3) the hostile cases, on slot 0 */
        xorl    %ebx, %ebx
        call    vio_select
        leaq    vio_hostile_cases(%rip), %r12
5:      movq    (%r12), %rbx
        testq   %rbx, %rbx
        jz      6f
        movq    %rbx, %rsi
        call    vio_run_case
        leaq    msg_vio_hostile(%rip), %rdi
        call    vio_report
        addq    $8, %r12
        jmp     5b
        /* Last hostile case, at the transport: a descriptor table outside guest memory must be refused at
         * QueueReady. A stays as this leaves it (NEEDS_RESET after head-outside and this) while B works. */
6:      movabsq $FAR_ADDR, %rax
        movq    %rax, vio_ring_override(%rip)
        call    vio_init
        movq    $0, vio_ring_override(%rip)
        movl    %eax, %r13d
        leaq    msg_vio_rings_outside(%rip), %rsi
        call    puts
        cmpl    $6, %r13d                       /* step 6: QueueReady did not stick */
        jne     7f
        leaq    msg_vio_refused(%rip), %rsi
        call    puts
        movl    VIO_STATUS(%r14), %eax
        testl   $VIO_S_NEEDS_RESET, %eax
        jz      8f
        leaq    msg_vio_sp_needs_reset(%rip), %rsi
        call    puts
        jmp     8f
7:      leaq    msg_vio_accepted(%rip), %rsi
        call    puts
        movl    %r13d, %eax
        call    putdec
8:      call    putcrlf
        /* (4) B serves a read; A, reset once more, serves a write and a read */
        movl    $1, %ebx
        call    vio_select
        leaq    vcase_good_read(%rip), %rbx
        movl    $513, %r13d
        call    vio_good
        jnz     vio_done
        movq    VB_DATA(%r15), %rax
        movq    %rax, vio_b_bytes(%rip)
        xorl    %ebx, %ebx
        call    vio_select
        leaq    vcase_good_write(%rip), %rbx
        movl    $1, %r13d
        call    vio_good
        jnz     vio_done
        leaq    vcase_good_read(%rip), %rbx
        movl    $513, %r13d
        call    vio_good
        jnz     vio_done
        leaq    msg_vio_ok(%rip), %rsi          /* probe: virtio ok b=<8 bytes hex> a=<8 bytes hex> */
        call    puts
        leaq    vio_b_bytes(%rip), %rsi
        call    vio_puthex8
        leaq    msg_vio_ok_a(%rip), %rsi
        call    puts
        leaq    VB_DATA(%r15), %rsi
        call    vio_puthex8
        call    putcrlf
vio_done:
        leaq    msg_vio_done(%rip), %rsi
        call    puts
        jmp     poweroff

/* vio_init_result: after "probe: virtio slot N", ECX = vio_init's result: " ready" or " init failed at step K". */
vio_init_result:
        testl   %ecx, %ecx
        jnz     1f
        leaq    msg_vio_ready(%rip), %rsi
        jmp     puts
1:      leaq    msg_vio_init_failed(%rip), %rsi
        call    puts
        movl    %ecx, %eax
        call    putdec
        jmp     putcrlf

/* vio_good: RBX = case, R13D = expected used length, R14/R15 = slot. Runs it; ZF=1 if it completed with status 0
 * and that length, else prints "probe: virtio failed <name>: <outcome>" and returns ZF=0. */
vio_good:
        movq    %rbx, %rsi
        call    vio_run_case
        testl   %eax, %eax
        jnz     1f
        cmpb    $0, VB_STATUS(%r15)
        jne     1f
        cmpl    %r13d, vio_used_len(%rip)
        jne     1f
        ret                                     /* ZF=1 from the compare */
1:      leaq    msg_vio_failed(%rip), %rdi
        call    vio_report
        orl     $1, %eax                        /* ZF=0 */
        ret

/* vio_select: EBX = slot -> R14 = its registers, R15 = its 8 KiB of memory. */
vio_select:
        movl    %ebx, %r14d
        shll    $12, %r14d
        addl    $VIRTIO_MMIO_BASE, %r14d        /* 32-bit: zero-extends into R14 */
        movl    %ebx, %r15d
        shll    $13, %r15d
        leaq    vq_mem(%rip), %rax
        addq    %rax, %r15
        ret

/* vio_probe_slot: EBX = slot. Prints "probe: virtio slot N: <blk|rng|device> (id D)" or "... none (magic 0x...)"
 * / "... version V"; returns EAX = device id, 0 if there is no usable modern transport. */
vio_probe_slot:
        call    vio_select
        leaq    msg_vio_slot(%rip), %rsi
        call    puts
        movl    %ebx, %eax
        call    putdec
        movl    VIO_MAGIC(%r14), %eax
        cmpl    $VIO_MAGIC_VALUE, %eax
        je      1f
        leaq    msg_vio_none(%rip), %rsi
        call    puts
        call    puthex32
        leaq    msg_vio_paren(%rip), %rsi
        call    puts
        xorl    %eax, %eax
        ret
1:      movl    VIO_VERSION(%r14), %eax
        cmpl    $2, %eax
        je      2f
        leaq    msg_vio_version(%rip), %rsi
        call    puts
        call    putdec
        call    putcrlf
        xorl    %eax, %eax
        ret
2:      movl    VIO_DEVICE_ID(%r14), %eax
        leaq    msg_vio_blk(%rip), %rsi
        cmpl    $2, %eax
        je      3f
        leaq    msg_vio_rng(%rip), %rsi
        cmpl    $4, %eax
        je      3f
        leaq    msg_vio_other(%rip), %rsi
3:      call    puts
        call    putdec
        leaq    msg_vio_paren(%rip), %rsi
        call    puts
        ret

/* vio_init: R14/R15 = slot. Reset, then the modern driver sequence (virtio 1.2, 3.1.1) with queue 0 of VIO_QSIZE
 * entries on zeroed rings. Returns EAX = 0, or the number of the step that failed. Clobbers RCX, RDX, RDI. */
vio_init:
        movl    $0, VIO_STATUS(%r14)            /* reset */
        movl    VIO_STATUS(%r14), %eax
        movl    $1, %edx
        testl   %eax, %eax
        jnz     9f
        movl    $VIO_S_ACK, VIO_STATUS(%r14)
        movl    $(VIO_S_ACK | VIO_S_DRIVER), VIO_STATUS(%r14)
        movl    $1, VIO_DEV_FEAT_SEL(%r14)      /* feature bits 63:32 */
        movl    VIO_DEV_FEAT(%r14), %eax
        movl    $2, %edx
        testl   $1, %eax                        /* VIRTIO_F_VERSION_1 (bit 32) offered? */
        jz      9f
        movl    $0, VIO_DRV_FEAT_SEL(%r14)      /* accept VERSION_1 and nothing else */
        movl    $0, VIO_DRV_FEAT(%r14)
        movl    $1, VIO_DRV_FEAT_SEL(%r14)
        movl    $1, VIO_DRV_FEAT(%r14)
        movl    $(VIO_S_ACK | VIO_S_DRIVER | VIO_S_FEATURES_OK), VIO_STATUS(%r14)
        movl    VIO_STATUS(%r14), %eax
        movl    $3, %edx
        testl   $VIO_S_FEATURES_OK, %eax        /* the device kept FEATURES_OK: it accepts our features */
        jz      9f
        movl    $0, VIO_QUEUE_SEL(%r14)
        movl    VIO_QUEUE_READY(%r14), %eax
        movl    $4, %edx
        testl   %eax, %eax
        jnz     9f
        movl    VIO_QUEUE_MAX(%r14), %eax
        movl    $5, %edx
        cmpl    $VIO_QSIZE, %eax
        jb      9f
        movl    $VIO_QSIZE, VIO_QUEUE_NUM(%r14)
        movq    %r15, %rdi                      /* zero the rings' page: flags, indices, entries */
        xorl    %eax, %eax
        movl    $512, %ecx
        rep stosq
        leaq    VQ_DESC(%r15), %rax
        movq    vio_ring_override(%rip), %rdx   /* the rings-outside case moves the table out of memory */
        testq   %rdx, %rdx
        cmovnzq %rdx, %rax
        movl    %eax, VIO_QUEUE_DESC(%r14)
        shrq    $32, %rax
        movl    %eax, VIO_QUEUE_DESC + 4(%r14)
        leaq    VQ_AVAIL(%r15), %rax
        movl    %eax, VIO_QUEUE_AVAIL(%r14)
        shrq    $32, %rax
        movl    %eax, VIO_QUEUE_AVAIL + 4(%r14)
        leaq    VQ_USED(%r15), %rax
        movl    %eax, VIO_QUEUE_USED(%r14)
        shrq    $32, %rax
        movl    %eax, VIO_QUEUE_USED + 4(%r14)
        movl    $1, VIO_QUEUE_READY(%r14)
        movl    VIO_QUEUE_READY(%r14), %eax
        movl    $6, %edx
        testl   %eax, %eax                      /* refused (rings checked against guest memory)? */
        jz      9f
        movl    $(VIO_S_ACK | VIO_S_DRIVER | VIO_S_FEATURES_OK | VIO_S_DRIVER_OK), VIO_STATUS(%r14)
        movl    VIO_STATUS(%r14), %eax
        movl    $7, %edx
        andl    $(VIO_S_DRIVER_OK | VIO_S_NEEDS_RESET), %eax
        cmpl    $VIO_S_DRIVER_OK, %eax
        jne     9f
        xorl    %edx, %edx
9:      movl    %edx, %eax
        ret

/* vio_run_case: RSI = case (see vio_hostile_cases), R14/R15 = slot. Re-initialises the device, builds the
 * request, publishes it and polls. Returns EAX = 0 used (vio_used_id/len set), 1 NEEDS_RESET without a used
 * entry, 2 no completion before the time-out, 3 initialisation failed (step in vio_used_len). */
vio_run_case:
        pushq   %rbx
        movq    %rsi, %rbx
        call    vio_init
        testl   %eax, %eax
        jz      1f
        movl    %eax, vio_used_len(%rip)
        movl    $3, %eax
        popq    %rbx
        ret
1:      movl    8(%rbx), %eax                   /* header: type, reserved, sector */
        movl    %eax, VB_HDR(%r15)
        movl    $0, VB_HDR + 4(%r15)
        movl    12(%rbx), %eax
        movq    %rax, VB_HDR + 8(%r15)
        movb    $0xff, VB_STATUS(%r15)          /* 255 = never written */
        leaq    VB_DATA(%r15), %rdi
        movb    $VB_FILL, %al
        movl    $512, %ecx
        rep stosb
        movzwl  16(%rbx), %ecx                  /* descriptors, addresses below 4 GiB relative to the slot */
        leaq    24(%rbx), %rsi
        leaq    VQ_DESC(%r15), %rdi
2:      movq    (%rsi), %rax
        movq    %rax, %rdx
        shrq    $32, %rdx
        jnz     3f
        addq    %r15, %rax
3:      movq    %rax, (%rdi)
        movq    8(%rsi), %rax                   /* len, flags, next as they are */
        movq    %rax, 8(%rdi)
        addq    $16, %rsi
        addq    $16, %rdi
        loop    2b
        movzwl  18(%rbx), %eax                  /* avail.ring[0] = head */
        movw    %ax, VQ_AVAIL + 4(%r15)
        /* virtio_wmb: the descriptors and the ring entry must be visible before the index that publishes them.
         * x86 does not reorder stores with stores (Linux's virt_wmb is a compiler barrier here) and this single
         * vCPU is the only writer, so the fence documents the ordering a real driver needs rather than adds it. */
        mfence
        movzwl  20(%rbx), %eax                  /* avail.idx */
        movw    %ax, VQ_AVAIL + 2(%r15)
        /* virtio_mb: the index before the notification (a real driver also reads used->flags / avail_event
         * here; we negotiated neither EVENT_IDX nor care, and always notify). */
        mfence
        movl    $0, VIO_QUEUE_NOTIFY(%r14)      /* queue 0 */
        rdtsc
        shlq    $32, %rdx
        orq     %rax, %rdx
        movq    $VIO_WAIT_CYCLES, %rcx
        addq    %rdx, %rcx                      /* RCX = deadline */
4:      movzwl  VQ_USED + 2(%r15), %eax         /* used.idx: 0 after the reset, 1 once served */
        testl   %eax, %eax
        jnz     5f
        movl    VIO_STATUS(%r14), %eax
        testl   $VIO_S_NEEDS_RESET, %eax
        jnz     6f
        pause
        rdtsc
        shlq    $32, %rdx
        orq     %rax, %rdx
        cmpq    %rcx, %rdx
        jb      4b
        movl    $2, %eax
        popq    %rbx
        ret
5:      lfence                                  /* virtio_rmb: the used element only after its index */
        movl    VQ_USED + 4(%r15), %eax
        movl    %eax, vio_used_id(%rip)
        movl    VQ_USED + 8(%r15), %eax
        movl    %eax, vio_used_len(%rip)
        xorl    %eax, %eax
        popq    %rbx
        ret
6:      movl    $1, %eax
        popq    %rbx
        ret

/* vio_report: RDI = prefix, RBX = case, EAX = vio_run_case's result, R14/R15 = slot. Prints
 * "<prefix><name>: <outcome> data=<intact|changed>", outcome one of "used id=I len=L status=S[ needs-reset]",
 * "needs-reset", "no completion", "init failed at step K". data= says whether the 512-byte buffer still holds
 * what the driver put there (a device must not write a buffer it was only given to read, nor a failed one). */
vio_report:
        pushq   %rax
        movq    %rdi, %rsi
        call    puts
        movq    (%rbx), %rsi
        call    puts
        leaq    msg_vio_colon(%rip), %rsi
        call    puts
        popq    %rax
        cmpl    $1, %eax
        je      2f
        cmpl    $2, %eax
        je      3f
        cmpl    $3, %eax
        je      4f
        leaq    msg_vio_used_id(%rip), %rsi
        call    puts
        movl    vio_used_id(%rip), %eax
        call    putdec
        leaq    msg_vio_len(%rip), %rsi
        call    puts
        movl    vio_used_len(%rip), %eax
        call    putdec
        leaq    msg_vio_status(%rip), %rsi
        call    puts
        movzbl  VB_STATUS(%r15), %eax
        call    putdec
        movl    VIO_STATUS(%r14), %eax
        testl   $VIO_S_NEEDS_RESET, %eax
        jz      5f
        leaq    msg_vio_sp_needs_reset(%rip), %rsi
        jmp     1f
2:      leaq    msg_vio_needs_reset(%rip), %rsi
        jmp     1f
3:      leaq    msg_vio_no_completion(%rip), %rsi
        jmp     1f
4:      leaq    msg_vio_init_failed_at(%rip), %rsi
        call    puts
        movl    vio_used_len(%rip), %eax
        call    putdec
        jmp     5f
1:      call    puts
5:      leaq    VB_DATA(%r15), %rdi
        movb    $VB_FILL, %al
        movl    $512, %ecx
        repe scasb
        leaq    msg_vio_intact(%rip), %rsi
        je      6f
        leaq    msg_vio_changed(%rip), %rsi
6:      call    puts
        ret

/* vio_puthex8: the 8 bytes at RSI as 16 lower-case hex digits, in memory order. */
vio_puthex8:
        pushq   %rax
        pushq   %rcx
        pushq   %rdx
        movl    $8, %ecx
1:      movzbl  (%rsi), %edx
        movl    %edx, %eax
        shrl    $4, %eax
        call    vio_puthexdigit
        movl    %edx, %eax
        andl    $0x0f, %eax
        call    vio_puthexdigit
        incq    %rsi
        loop    1b
        popq    %rdx
        popq    %rcx
        popq    %rax
        ret
vio_puthexdigit:                                /* AL = 0..15 */
        cmpb    $10, %al
        jb      1f
        addb    $('a' - '0' - 10), %al
1:      addb    $'0', %al
        jmp     putc

/* ---- platform helpers ---------------------------------------------------------------------------------------- */

/* poweroff: ACPI S5 through PM1a_CNT; complain if we are still running a while later. */
poweroff:
        movw    $PM1A_CNT, %dx
        movw    $S5_VALUE, %ax
        outw    %ax, %dx
        movq    $GRACE_CYCLES, %rcx
        call    delay_cycles
        leaq    msg_poweroff_failed(%rip), %rsi
        call    puts
halt_forever:
1:      cli
        hlt
        jmp     1b

/* cmos_read: AL = index -> AL = value. cmos_write: AL = index, AH = value. NMIs stay enabled (bit 7 = 0). */
cmos_read:
        outb    %al, $CMOS_INDEX
        inb     $CMOS_DATA, %al
        ret
cmos_write:
        outb    %al, $CMOS_INDEX
        movb    %ah, %al
        outb    %al, $CMOS_DATA
        ret

/* delay_cycles: busy-wait RCX TSC cycles. */
delay_cycles:
        pushq   %rax
        pushq   %rdx
        pushq   %rsi
        rdtsc
        shlq    $32, %rdx
        orq     %rax, %rdx
        leaq    (%rdx, %rcx), %rsi
1:      pause
        rdtsc
        shlq    $32, %rdx
        orq     %rax, %rdx
        cmpq    %rsi, %rdx
        jb      1b
        popq    %rsi
        popq    %rdx
        popq    %rax
        ret

spin_lock:
1:      lock btsl $0, print_lock(%rip)
        jnc     2f
        pause
        jmp     1b
2:      ret
spin_unlock:
        movl    $0, print_lock(%rip)
        ret

/* ---- console output (COM1, polled). All routines preserve every register except RSI where noted. --------- */

/* putc: AL = byte. Waits (bounded) for the transmit holding register to be empty. */
putc:
        pushq   %rax
        pushq   %rcx
        pushq   %rdx
        movb    %al, %ah
        movw    $COM1_LSR, %dx
        movl    $100000, %ecx
1:      inb     %dx, %al
        testb   $LSR_THRE, %al
        jnz     2f
        pause
        loop    1b
2:      movb    %ah, %al
        movw    $COM1, %dx
        outb    %al, %dx
        popq    %rdx
        popq    %rcx
        popq    %rax
        ret

/* puts: NUL-terminated string at RSI (RSI is advanced). */
puts:
        pushq   %rax
1:      lodsb
        testb   %al, %al
        jz      2f
        call    putc
        jmp     1b
2:      popq    %rax
        ret

/* putsn: like puts, at most RCX bytes (RSI and RCX are clobbered). */
putsn:
        pushq   %rax
        jrcxz   2f
1:      lodsb
        testb   %al, %al
        jz      2f
        call    putc
        loop    1b
2:      popq    %rax
        ret

putcrlf:
        pushq   %rsi
        leaq    msg_crlf(%rip), %rsi
        call    puts
        popq    %rsi
        ret

/* putdec: RAX as unsigned decimal. */
putdec:
        pushq   %rax
        pushq   %rcx
        pushq   %rdx
        pushq   %rsi
        subq    $32, %rsp
        leaq    31(%rsp), %rsi
        movb    $0, (%rsi)
        movl    $10, %ecx
1:      xorl    %edx, %edx
        divq    %rcx
        addb    $'0', %dl
        decq    %rsi
        movb    %dl, (%rsi)
        testq   %rax, %rax
        jnz     1b
        call    puts
        addq    $32, %rsp
        popq    %rsi
        popq    %rdx
        popq    %rcx
        popq    %rax
        ret

/* put2d: RAX (0..99) as two decimal digits. */
put2d:
        pushq   %rax
        pushq   %rcx
        pushq   %rdx
        xorl    %edx, %edx
        movl    $10, %ecx
        divq    %rcx
        addb    $'0', %al
        call    putc
        movb    %dl, %al
        addb    $'0', %al
        call    putc
        popq    %rdx
        popq    %rcx
        popq    %rax
        ret

/* puthex32: EAX as eight lower-case hex digits. */
puthex32:
        pushq   %rax
        pushq   %rcx
        pushq   %rdx
        movl    %eax, %edx
        movl    $8, %ecx
1:      roll    $4, %edx
        movl    %edx, %eax
        andl    $0x0f, %eax
        cmpb    $10, %al
        jb      2f
        addb    $('a' - '0' - 10), %al
2:      addb    $'0', %al
        call    putc
        loop    1b
        popq    %rdx
        popq    %rcx
        popq    %rax
        ret

/* ------------------------------------------------------------------------------------------------------------ */
        .section .rodata
kind_bzimage:           .asciz "bzimage"
kind_elf:               .asciz "elf"
#ifdef SHAPE_PVH
kind_pvh:               .asciz "pvh"
#endif
empty_string:           .asciz ""
msg_banner:             .asciz "kestrel-probe: entry="
msg_cmdline:            .asciz " cmdline=\""
msg_quote_crlf:         .asciz "\"\r\n"
msg_crlf:               .asciz "\r\n"
msg_poweroff:           .asciz "probe: poweroff\r\n"
msg_poweroff_failed:    .asciz "probe: poweroff failed\r\n"
msg_unknown:            .asciz "probe: unknown command\r\n"
msg_alive:              .asciz "probe: triple fault did not happen\r\n"
msg_mmio:               .asciz "probe: mmio read 0x"
msg_boot:               .asciz "probe: boot "
msg_reset_done:         .asciz "probe: reset done\r\n"
msg_reset_failed:       .asciz "probe: reset failed\r\n"
msg_rtc:                .asciz "probe: rtc 20"
msg_pit:                .asciz "probe: pit ticks "
msg_acpi_ready:         .asciz "probe: acpi ready\r\n"
msg_acpi_button:        .asciz "probe: power button\r\n"
msg_no_madt:            .asciz "probe: smp no madt\r\n"
msg_cpu:                .asciz "probe: cpu "
msg_up:                 .asciz " up\r\n"
msg_smp_timeout:        .asciz "probe: smp timeout\r\n"
msg_smp:                .asciz "probe: smp "
msg_cpus:               .asciz " cpus\r\n"
msg_echo_ready:         .asciz "probe: echo ready\r\n"
msg_echo_done:          .asciz "\r\nprobe: echo done\r\n"
msg_exception:          .asciz "probe: exception "
msg_flood:              .asciz "probe: flood "
msg_cpuid:              .asciz "probe: cpuid 1.ecx="
msg_cpuid_1edx:         .asciz " 1.edx="
msg_cpuid_7ebx:         .asciz " 7.ebx="
msg_cpuid_ext:          .asciz " 80000001.ecx="

rtc_regs:               .byte 0x00, 0x02, 0x04, 0x07, 0x08, 0x09

str_poweroff:           .asciz "poweroff"
str_reset:              .asciz "reset"
str_smp:                .asciz "smp"
str_rtc:                .asciz "rtc"
str_pit:                .asciz "pit"
str_acpi:               .asciz "acpi"
str_echo:               .asciz "echo"
str_mmio:               .asciz "mmio"
str_triplefault:        .asciz "triplefault"
str_spin:               .asciz "spin"
str_virtio:             .asciz "virtio"
str_cf9fault:           .asciz "cf9fault"
str_flood:              .asciz "flood"
str_cpuid:              .asciz "cpuid"

        .balign 8
cmd_table:                                      /* (name, handler) pairs, NULL-terminated */
        .quad str_poweroff, cmd_poweroff
        .quad str_reset, cmd_reset
        .quad str_smp, cmd_smp
        .quad str_rtc, cmd_rtc
        .quad str_pit, cmd_pit
        .quad str_acpi, cmd_acpi
        .quad str_echo, cmd_echo
        .quad str_mmio, cmd_mmio
        .quad str_triplefault, cmd_triplefault
        .quad str_spin, cmd_spin
        .quad str_virtio, cmd_virtio
        .quad str_cf9fault, cmd_cf9fault
        .quad str_flood, cmd_flood
        .quad str_cpuid, cmd_cpuid
        .quad 0, 0

/* virtio command: request shapes. Each: name, header type and sector, descriptor count, avail.ring[0] (the head),
 * avail.idx to publish, then the descriptors in virtio's own 16-byte layout (addr u64, len u32, flags u16,
 * next u16), loaded at descriptor 0 onwards. Addresses below 4 GiB are offsets into the slot's 8 KiB. */
        .macro  vcase name, type, sector, ndesc, head, avail
        .balign 8
        .quad   \name
        .long   \type, \sector
        .word   \ndesc, \head, \avail, 0
        .endm
        .macro  vdesc addr, len, flags, next
        .quad   \addr
        .long   \len
        .word   \flags, \next
        .endm
        .macro  vhdr next=1
        vdesc   VB_HDR, 16, VD_NEXT, \next
        .endm
        .macro  vstatus
        vdesc   VB_STATUS, 1, VD_WRITE, 0
        .endm

vcase_good_read:        vcase str_vc_good_read, VBLK_T_IN, 0, 3, 0, 1
        vhdr
        vdesc   VB_DATA, 512, VD_NEXT | VD_WRITE, 2
        vstatus
vcase_good_write:       vcase str_vc_good_write, VBLK_T_OUT, 2, 3, 0, 1
        vhdr
        vdesc   VB_DATA, 512, VD_NEXT, 2
        vstatus
vcase_desc_outside:     vcase str_vc_desc_outside, VBLK_T_IN, 0, 3, 0, 1
        vhdr
        vdesc   FAR_ADDR, 512, VD_NEXT | VD_WRITE, 2
        vstatus
vcase_status_outside:   vcase str_vc_status_outside, VBLK_T_IN, 0, 3, 0, 1
        vhdr
        vdesc   VB_DATA, 512, VD_NEXT | VD_WRITE, 2
        vdesc   FAR_ADDR, 1, VD_WRITE, 0
vcase_len_max:          vcase str_vc_len_max, VBLK_T_IN, 0, 3, 0, 1
        vhdr
        vdesc   VB_DATA, 0xffffffff, VD_NEXT | VD_WRITE, 2
        vstatus
vcase_loop:             vcase str_vc_loop, VBLK_T_IN, 0, 2, 0, 1
        vhdr
        vdesc   VB_DATA, 512, VD_NEXT | VD_WRITE, 1   /* points at itself */
vcase_too_long:         vcase str_vc_too_long, VBLK_T_IN, 0, 8, 0, 1
        vhdr                                            /* 0 -> 1 -> ... -> 7 -> 1 -> ...: longer than the queue */
        vdesc   VB_DATA, 64, VD_NEXT | VD_WRITE, 2
        vdesc   VB_DATA, 64, VD_NEXT | VD_WRITE, 3
        vdesc   VB_DATA, 64, VD_NEXT | VD_WRITE, 4
        vdesc   VB_DATA, 64, VD_NEXT | VD_WRITE, 5
        vdesc   VB_DATA, 64, VD_NEXT | VD_WRITE, 6
        vdesc   VB_DATA, 64, VD_NEXT | VD_WRITE, 7
        vdesc   VB_DATA, 64, VD_NEXT | VD_WRITE, 1
vcase_next_outside:     vcase str_vc_next_outside, VBLK_T_IN, 0, 2, 0, 1
        vhdr
        vdesc   VB_DATA, 512, VD_NEXT | VD_WRITE, 200 /* beyond the 8-entry table */
vcase_zero_header:      vcase str_vc_zero_header, VBLK_T_IN, 0, 3, 0, 1
        vdesc   VB_HDR, 0, VD_NEXT, 1
        vdesc   VB_DATA, 512, VD_NEXT | VD_WRITE, 2
        vstatus
vcase_zero_data:        vcase str_vc_zero_data, VBLK_T_IN, 0, 3, 0, 1
        vhdr
        vdesc   VB_DATA, 0, VD_NEXT | VD_WRITE, 2
        vstatus
vcase_status_ro:        vcase str_vc_status_ro, VBLK_T_OUT, 1, 3, 0, 1
        vhdr                                            /* a write of sector 1 whose status is device-read-only */
        vdesc   VB_DATA, 512, VD_NEXT, 2
        vdesc   VB_STATUS, 1, 0, 0
vcase_header_wr:        vcase str_vc_header_wr, VBLK_T_IN, 0, 3, 0, 1
        vdesc   VB_HDR, 16, VD_NEXT | VD_WRITE, 1
        vdesc   VB_DATA, 512, VD_NEXT | VD_WRITE, 2
        vstatus
vcase_read_into_ro:     vcase str_vc_read_into_ro, VBLK_T_IN, 0, 3, 0, 1
        vhdr                                            /* a read whose data buffer is device-read-only */
        vdesc   VB_DATA, 512, VD_NEXT, 2
        vstatus
vcase_avail_jump:       vcase str_vc_avail_jump, VBLK_T_IN, 0, 3, 0, 0x8000
        vhdr
        vdesc   VB_DATA, 512, VD_NEXT | VD_WRITE, 2
        vstatus
vcase_head_outside:     vcase str_vc_head_outside, VBLK_T_IN, 0, 3, 200, 1
        vhdr
        vdesc   VB_DATA, 512, VD_NEXT | VD_WRITE, 2
        vstatus

        .balign 8
vio_hostile_cases:
        .quad   vcase_desc_outside, vcase_status_outside, vcase_len_max, vcase_loop, vcase_too_long
        .quad   vcase_next_outside, vcase_zero_header, vcase_zero_data, vcase_status_ro, vcase_header_wr
        .quad   vcase_read_into_ro, vcase_avail_jump, vcase_head_outside, 0

str_vc_good_read:       .asciz "good-read"
str_vc_good_write:      .asciz "good-write"
str_vc_desc_outside:    .asciz "desc-outside"
str_vc_status_outside:  .asciz "status-outside"
str_vc_len_max:         .asciz "len-ffffffff"
str_vc_loop:            .asciz "loop"
str_vc_too_long:        .asciz "too-long"
str_vc_next_outside:    .asciz "next-outside"
str_vc_zero_header:     .asciz "zero-len-header"
str_vc_zero_data:       .asciz "zero-len-data"
str_vc_status_ro:       .asciz "status-readonly"
str_vc_header_wr:       .asciz "header-writable"
str_vc_read_into_ro:    .asciz "read-into-readonly"
str_vc_avail_jump:      .asciz "avail-jump"
str_vc_head_outside:    .asciz "head-outside"
msg_vio_slot:           .asciz "probe: virtio slot "
msg_vio_none:           .asciz ": none (magic 0x"
msg_vio_version:        .asciz ": unsupported version "
msg_vio_blk:            .asciz ": blk (id "
msg_vio_rng:            .asciz ": rng (id "
msg_vio_other:          .asciz ": device (id "
msg_vio_paren:          .asciz ")\r\n"
msg_vio_need:           .asciz "probe: virtio needs virtio-blk in slots 0 and 1\r\n"
msg_vio_ready:          .asciz " ready\r\n"
msg_vio_init_failed:    .asciz " init failed at step "
msg_vio_hostile:        .asciz "probe: virtio hostile "
msg_vio_failed:         .asciz "probe: virtio failed "
msg_vio_colon:          .asciz ": "
msg_vio_used_id:        .asciz "used id="
msg_vio_len:            .asciz " len="
msg_vio_status:         .asciz " status="
msg_vio_sp_needs_reset: .asciz " needs-reset"
msg_vio_needs_reset:    .asciz "needs-reset"
msg_vio_no_completion:  .asciz "no completion"
msg_vio_init_failed_at: .asciz "init failed at step "
msg_vio_intact:         .asciz " data=intact\r\n"
msg_vio_changed:        .asciz " data=changed\r\n"
msg_vio_ok:             .asciz "probe: virtio ok b="
msg_vio_ok_a:           .asciz " a="
msg_vio_done:           .asciz "probe: virtio done\r\n"
msg_vio_rings_outside:  .asciz "probe: virtio hostile rings-outside: "
msg_vio_refused:        .asciz "queue refused"
msg_vio_accepted:       .asciz "queue accepted, init result "

        .section .data
        .balign 16
/* Flat GDT shared by every mode switch (accessed bits preset so the CPU never writes it). */
boot_gdt:
        .quad 0
        .quad 0x00af9b000000ffff                /* 0x08: 64-bit code */
        .quad 0x00cf93000000ffff                /* 0x10: data, 4 GiB */
        .quad 0x00cf9b000000ffff                /* 0x18: 32-bit code, 4 GiB */
boot_gdt_end:
        .balign 8
boot_gdtr:
        .word boot_gdt_end - boot_gdt - 1
        .quad boot_gdt
        .balign 8
idtr:
        .word 256 * 16 - 1
        .quad idt
        .balign 8
zero_idtr:
        .word 0
        .quad 0

        .section .bss
        .balign 4096
pt_pml4:        .skip 4096                      /* pt_pml4, pt_pdpt, pt_pd[4] must stay contiguous */
pt_pdpt:        .skip 4096
pt_pd:          .skip 4 * 4096
idt:            .skip 256 * 16
                .skip 16384
stack_top:
                .skip 4096
ap_stack_top:
print_lock:     .long 0
ap_count:       .long 0
ap_cr3:         .long 0
echo_quit:      .byte 0
        .balign 4
pit_ticks:      .long 0
acpi_button:    .byte 0
rtc_a:          .skip 6
rtc_b:          .skip 6
vio_ids:        .skip 8                         /* virtio: device id per slot */
vio_used_id:    .long 0
vio_used_len:   .long 0
vio_b_bytes:    .quad 0
vio_ring_override: .quad 0                      /* virtio: non-zero = descriptor table address for vio_init */
        .balign 4096
vq_mem:         .skip 2 * 0x2000                /* virtio: rings + request buffers of slots 0 and 1 */

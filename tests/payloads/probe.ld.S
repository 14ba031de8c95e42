/*
 * Linker script for kestrel-probe, preprocessed with gcc -E -P per shape:
 *   -DSHAPE_BZIMAGE -DLOAD_ADDR=0x100000   setup sectors (.setup, linked at 0, placed just below LOAD_ADDR in
 *                                          the load image so `objcopy -O binary` yields setup + kernel part)
 *   -DSHAPE_ELF / -DSHAPE_PVH -DLOAD_ADDR=0x1000000
 */
OUTPUT_FORMAT("elf64-x86-64")
OUTPUT_ARCH(i386:x86-64)
#if defined(SHAPE_PVH) || defined(SHAPE_ELF)
ENTRY(entry64)
#else
ENTRY(bz_entry32)
#endif

PHDRS
{
#ifdef SHAPE_BZIMAGE
    setup PT_LOAD FLAGS(5);
#endif
    image PT_LOAD FLAGS(7);
#ifdef SHAPE_PVH
    note PT_NOTE FLAGS(4);
#endif
}

SECTIONS
{
#ifdef SHAPE_BZIMAGE
    . = 0;
    .setup : AT(LOAD_ADDR - 0x400) { KEEP(*(.setup)) } :setup
    ASSERT(SIZEOF(.setup) == 0x400, "setup sectors must be exactly setup_sects + 1 = 2 sectors")
#endif
    . = LOAD_ADDR;
    _image_start = .;
    /* .text.head first: the entries sit at fixed offsets (bzImage: 32-bit at +0, 64-bit at +0x200). */
    .text : AT(LOAD_ADDR) { KEEP(*(.text.head)) *(.text .text.*) } :image
    .rodata : { *(.rodata .rodata.*) } :image
#ifdef SHAPE_PVH
    .note.Xen : { KEEP(*(.note.Xen)) } :image :note
#endif
    .data : { *(.data .data.*) } :image
    _image_file_end = .;
    .bss (NOLOAD) : { *(.bss .bss.*) *(COMMON) } :image
    . = ALIGN(4096);
    _image_end = .;
    /DISCARD/ : { *(.note.GNU-stack) *(.note.gnu.property) *(.comment) *(.eh_frame) }
}

/* Setup-header fields computed from the layout. */
_syssize = (_image_file_end - _image_start + 15) / 16;
_init_size = _image_end - _image_start;

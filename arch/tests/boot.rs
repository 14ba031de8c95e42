//! setup_guest against real guest memory, with kernels built here: a fake bzImage (setup header only, the
//! "protected-mode kernel" is a marker payload), a minimal ELF64 vmlinux and a PVH ELF.
#![cfg(target_arch = "x86_64")]

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

use arch::x86_64::boot::{e820_map, setup_guest, EntryProtocol, GuestConfig, E820_RAM};
use arch::x86_64::gdt::{self, SegmentMode};
use arch::x86_64::layout::*;
use arch::x86_64::{BootSetup, Error};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap<()>;

const MIB: u64 = 1 << 20;

fn memory(size: u64) -> Mem {
    let ranges: Vec<(GuestAddress, usize)> =
        ram_regions(size).into_iter().map(|(start, len)| (GuestAddress(start), len as usize)).collect();
    Mem::from_ranges(&ranges).unwrap()
}

/// A file with `bytes`, already unlinked so nothing is left behind.
fn file_with(bytes: &[u8]) -> File {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let path = std::env::temp_dir().join(format!(
        "kestrel-arch-boot-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let mut f = File::options().read(true).write(true).create_new(true).open(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    f.write_all(bytes).unwrap();
    f
}

fn put(buf: &mut [u8], offset: usize, bytes: &[u8]) {
    buf[offset..offset + bytes.len()].copy_from_slice(bytes);
}

struct BzImageSpec {
    setup_sects: u8,
    version: u16,
    cmdline_size: u32,
    initrd_addr_max: u32,
    pref_address: u64,
    init_size: u32,
    payload_len: usize,
}

impl Default for BzImageSpec {
    fn default() -> Self {
        BzImageSpec {
            setup_sects: 4,
            version: 0x020f,
            cmdline_size: 2047,
            initrd_addr_max: 0x7fff_ffff,
            pref_address: 0x100_0000,
            init_size: 0x80_0000,
            payload_len: 0x3000,
        }
    }
}

const PAYLOAD_MARKER: &[u8] = b"protected-mode kernel";

/// The fields of the boot protocol's setup header (Documentation/arch/x86/boot.rst) at their file offsets.
fn bzimage(spec: &BzImageSpec) -> Vec<u8> {
    let setup_len = (usize::from(spec.setup_sects) + 1) * 512;
    let mut img = vec![0u8; setup_len + spec.payload_len];
    img[0x1f1] = spec.setup_sects;
    put(&mut img, 0x1fe, &0xaa55u16.to_le_bytes());
    put(&mut img, 0x202, b"HdrS");
    put(&mut img, 0x206, &spec.version.to_le_bytes());
    img[0x211] = 0x1; // LOADED_HIGH
    put(&mut img, 0x214, &0x10_0000u32.to_le_bytes()); // code32_start
    put(&mut img, 0x22c, &spec.initrd_addr_max.to_le_bytes());
    put(&mut img, 0x230, &0x20_0000u32.to_le_bytes()); // kernel_alignment
    img[0x234] = 1; // relocatable_kernel
    put(&mut img, 0x236, &1u16.to_le_bytes()); // XLF_KERNEL_64
    put(&mut img, 0x238, &spec.cmdline_size.to_le_bytes());
    put(&mut img, 0x258, &spec.pref_address.to_le_bytes());
    put(&mut img, 0x260, &spec.init_size.to_le_bytes());
    put(&mut img, setup_len, PAYLOAD_MARKER);
    img
}

const ELF_CODE: &[u8] = b"\xf4ELF kernel text";

/// A static x86_64 executable with one PT_LOAD segment at `paddr`, and a Xen PVH note when `pvh_entry` is set.
fn elf(entry: u64, paddr: u64, memsz: u64, pvh_entry: Option<u32>, class: u8) -> Vec<u8> {
    let phnum: u16 = if pvh_entry.is_some() { 2 } else { 1 };
    let note_off = 64 + 56 * usize::from(phnum);
    let note_len = if pvh_entry.is_some() { 12 + 4 + 4 } else { 0 };
    let code_off = (note_off + note_len).next_multiple_of(16);
    let mut img = vec![0u8; code_off + ELF_CODE.len()];
    put(&mut img, 0, b"\x7fELF");
    img[4] = class;
    img[5] = 1; // little endian
    img[6] = 1; // EV_CURRENT
    put(&mut img, 16, &2u16.to_le_bytes()); // ET_EXEC
    put(&mut img, 18, &62u16.to_le_bytes()); // EM_X86_64
    put(&mut img, 20, &1u32.to_le_bytes());
    put(&mut img, 24, &entry.to_le_bytes());
    put(&mut img, 32, &64u64.to_le_bytes()); // e_phoff
    put(&mut img, 52, &64u16.to_le_bytes()); // e_ehsize
    put(&mut img, 54, &56u16.to_le_bytes()); // e_phentsize
    put(&mut img, 56, &phnum.to_le_bytes());
    let load = 64;
    put(&mut img, load, &1u32.to_le_bytes()); // PT_LOAD
    put(&mut img, load + 4, &5u32.to_le_bytes()); // R+X
    put(&mut img, load + 8, &(code_off as u64).to_le_bytes());
    put(&mut img, load + 16, &(0xffff_ffff_8000_0000 + paddr).to_le_bytes()); // vaddr, as in a vmlinux
    put(&mut img, load + 24, &paddr.to_le_bytes());
    put(&mut img, load + 32, &(ELF_CODE.len() as u64).to_le_bytes());
    put(&mut img, load + 40, &memsz.to_le_bytes());
    put(&mut img, load + 48, &0x20_0000u64.to_le_bytes());
    if let Some(pvh) = pvh_entry {
        let note = 64 + 56;
        put(&mut img, note, &4u32.to_le_bytes()); // PT_NOTE
        put(&mut img, note + 8, &(note_off as u64).to_le_bytes());
        put(&mut img, note + 32, &(note_len as u64).to_le_bytes());
        put(&mut img, note + 40, &(note_len as u64).to_le_bytes());
        put(&mut img, note + 48, &4u64.to_le_bytes());
        put(&mut img, note_off, &4u32.to_le_bytes()); // namesz
        put(&mut img, note_off + 4, &4u32.to_le_bytes()); // descsz
        put(&mut img, note_off + 8, &18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
        put(&mut img, note_off + 12, b"Xen\0");
        put(&mut img, note_off + 16, &pvh.to_le_bytes());
    }
    put(&mut img, code_off, ELF_CODE);
    img
}

fn boot(mem: &Mem, kernel: &[u8], initrd: Option<&[u8]>, cmdline: &str, vcpus: u8) -> Result<BootSetup, Error> {
    let mut kernel = file_with(kernel);
    let mut initrd = initrd.map(file_with);
    let mut config = GuestConfig { kernel: &mut kernel, initrd: initrd.as_mut(), cmdline, vcpu_count: vcpus };
    setup_guest(mem, &mut config)
}

fn zero_page(mem: &Mem) -> boot_params {
    mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap()
}

fn read_bytes(mem: &Mem, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

fn initrd_bytes(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 3) as u8).collect()
}

/// What every boot, whatever the protocol, leaves in low memory.
fn check_common_tables(mem: &Mem, cmdline: &str) {
    assert_eq!(read_bytes(mem, CMDLINE_START, cmdline.len() + 1), [cmdline.as_bytes(), &[0]].concat());
    assert_eq!(read_bytes(mem, RSDP_START, 8), b"RSD PTR ");
    assert_eq!(read_bytes(mem, MPTABLE_START, 4), b"_MP_");
}

#[test]
fn bzimage_boots_through_the_64bit_protocol() {
    let mem = memory(64 * MIB);
    let initrd = initrd_bytes(5000);
    let cmdline = "console=ttyS0 panic=-1";
    let setup = boot(&mem, &bzimage(&BzImageSpec::default()), Some(&initrd), cmdline, 2).unwrap();

    assert_eq!(setup.protocol, EntryProtocol::BzImage);
    let cpu = &setup.boot_cpu;
    assert_eq!(cpu.regs.rip, HIMEM_START + 0x200);
    assert_eq!(cpu.regs.rsi, ZERO_PAGE_START);
    assert_eq!((cpu.regs.rsp, cpu.regs.rbp), (BOOT_STACK_POINTER, BOOT_STACK_POINTER));
    assert_eq!(cpu.regs.rflags, 0x2);
    assert_eq!(cpu.sregs.cr3, PML4_START);
    assert_eq!(cpu.sregs.efer & 0x500, 0x500);
    assert_eq!(cpu.sregs.cs.selector, 0x10);
    assert_eq!(cpu.sregs.ds.selector, 0x18);
    assert_eq!(cpu.sregs.tr.selector, 0x20);
    assert_eq!(cpu.sregs.gdt.base, BOOT_GDT_START);
    assert_eq!(cpu.sregs.idt.base, BOOT_IDT_START);

    // The protected-mode part lands at code32_start; the setup sectors do not.
    assert_eq!(read_bytes(&mem, HIMEM_START, PAYLOAD_MARKER.len()), PAYLOAD_MARKER);

    let zp = zero_page(&mem);
    let hdr = zp.hdr;
    assert_eq!({ hdr.header }, 0x5372_6448);
    assert_eq!({ hdr.version }, 0x020f);
    assert_eq!({ hdr.type_of_loader }, 0xff);
    assert_eq!({ hdr.cmd_line_ptr } as u64, CMDLINE_START);
    assert_eq!({ hdr.cmdline_size } as usize, cmdline.len());
    assert_eq!({ zp.acpi_rsdp_addr }, RSDP_START);

    let (rd_addr, rd_size) = (u64::from(hdr.ramdisk_image), u64::from(hdr.ramdisk_size));
    assert_eq!(rd_size, initrd.len() as u64);
    assert_eq!(rd_addr % 0x1000, 0);
    assert!(rd_addr + rd_size <= 64 * MIB);
    assert!(64 * MIB - (rd_addr + rd_size) < 0x1000, "initrd is placed at the top of RAM");
    // Above what the kernel decompresses into: pref_address + init_size.
    assert!(rd_addr >= 0x100_0000 + 0x80_0000);
    assert_eq!(read_bytes(&mem, rd_addr, initrd.len()), initrd);

    let n = zp.e820_entries as usize;
    let e820: Vec<(u64, u64, u32)> = zp.e820_table[..n].iter().map(|e| (e.addr, e.size, e.r#type)).collect();
    let expected: Vec<(u64, u64, u32)> = e820_map(64 * MIB).iter().map(|e| (e.addr, e.size, e.type_)).collect();
    assert_eq!(e820, expected);
    assert!(e820.contains(&(HIMEM_START, 63 * MIB, E820_RAM)));

    let gdt_bytes = read_bytes(&mem, BOOT_GDT_START, 48);
    let entries: Vec<u64> = gdt_bytes.chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(entries, gdt::boot_gdt(SegmentMode::Long));
    assert_eq!(gdt::decode(entries[2], 0x10), cpu.sregs.cs);
    assert_eq!(gdt::decode(entries[3], 0x18), cpu.sregs.ds);

    let pml4e: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
    assert_eq!(pml4e & !0xfff, PDPTE_START);
    check_common_tables(&mem, cmdline);
}

#[test]
fn bzimage_initrd_respects_initrd_addr_max() {
    let mem = memory(64 * MIB);
    let spec = BzImageSpec { initrd_addr_max: 0x1ff_ffff, ..Default::default() };
    boot(&mem, &bzimage(&spec), Some(&initrd_bytes(0x1234)), "", 1).unwrap();
    let hdr = zero_page(&mem).hdr;
    assert_eq!(u64::from(hdr.ramdisk_image), (0x200_0000 - 0x1234) & !0xfff);
    assert!(u64::from(hdr.ramdisk_image) + u64::from(hdr.ramdisk_size) <= 0x200_0000);
}

#[test]
fn elf_without_pvh_note_uses_the_64bit_protocol() {
    let mem = memory(64 * MIB);
    let kernel = elf(0x100_0000, 0x100_0000, 0x20_0000, None, 2);
    let setup = boot(&mem, &kernel, Some(&initrd_bytes(100)), "root=/dev/vda", 1).unwrap();
    assert_eq!(setup.protocol, EntryProtocol::Elf64);
    assert_eq!(setup.boot_cpu.regs.rip, 0x100_0000);
    assert_eq!(setup.boot_cpu.regs.rsi, ZERO_PAGE_START);
    assert!(setup.boot_cpu.sregs.cs.l);
    assert_eq!(read_bytes(&mem, 0x100_0000, ELF_CODE.len()), ELF_CODE);

    let zp = zero_page(&mem);
    let hdr = zp.hdr;
    assert_eq!({ hdr.boot_flag }, 0xaa55);
    assert_eq!({ hdr.header }, 0x5372_6448);
    assert_eq!({ hdr.type_of_loader }, 0xff);
    assert_eq!({ hdr.kernel_alignment }, 0x100_0000);
    assert_eq!({ hdr.loadflags } & 1, 1);
    assert_eq!({ hdr.cmd_line_ptr } as u64, CMDLINE_START);
    assert_eq!({ zp.acpi_rsdp_addr }, RSDP_START);
    // ELF kernels get the default initrd_addr_max (below 896 MiB); 64 MiB is under it.
    assert_eq!(u64::from(hdr.ramdisk_image), 64 * MIB - 0x1000);
    assert!(u64::from(hdr.ramdisk_image) >= 0x100_0000 + 0x20_0000);
    assert_eq!(zp.e820_entries, 4, "low RAM, BIOS area, RAM above 1 MiB, PCI ECAM");
    check_common_tables(&mem, "root=/dev/vda");
}

#[test]
fn pvh_elf_uses_the_pvh_entry() {
    let mem = memory(64 * MIB);
    let kernel = elf(0x100_0000, 0x100_0000, 0x1000, Some(0x100_0010), 2);
    let initrd = initrd_bytes(3000);
    let setup = boot(&mem, &kernel, Some(&initrd), "console=hvc0", 4).unwrap();
    assert_eq!(setup.protocol, EntryProtocol::Pvh);
    let cpu = &setup.boot_cpu;
    assert_eq!(cpu.regs.rip, 0x100_0010);
    assert_eq!(cpu.regs.rbx, PVH_INFO_START);
    assert_eq!(cpu.regs.rflags, 0x2);
    assert_eq!(cpu.sregs.cr0 & 0x8000_0001, 0x1, "protected mode, paging off");
    assert_eq!(cpu.sregs.efer, 0);
    assert!(cpu.sregs.cs.db && !cpu.sregs.cs.l);
    assert_eq!(cpu.sregs.cs.limit, 0xffff_ffff);
    assert_eq!(cpu.sregs.ss.limit, 0xffff_ffff);
    let gdt_code: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 0x10)).unwrap();
    assert_eq!(gdt::decode(gdt_code, 0x10), cpu.sregs.cs);

    let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
    assert_eq!(info.magic, 0x336e_c578);
    assert_eq!(info.version, 1);
    assert_eq!(info.cmdline_paddr, CMDLINE_START);
    assert_eq!(info.rsdp_paddr, RSDP_START);
    assert_eq!(info.nr_modules, 1);
    let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
    assert_eq!(module.size, initrd.len() as u64);
    assert_eq!(read_bytes(&mem, module.paddr, initrd.len()), initrd);

    let expected = e820_map(64 * MIB);
    assert_eq!(info.memmap_entries as usize, expected.len());
    for (i, e) in expected.iter().enumerate() {
        let addr = info.memmap_paddr + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        let got: hvm_memmap_table_entry = mem.read_obj(GuestAddress(addr)).unwrap();
        assert_eq!((got.addr, got.size, got.type_), (e.addr, e.size, e.type_));
    }
    assert!(info.memmap_paddr + (expected.len() * 24) as u64 <= ZERO_PAGE_START);
    check_common_tables(&mem, "console=hvc0");
}

#[test]
fn pvh_without_initrd_has_no_modules() {
    let mem = memory(32 * MIB);
    let kernel = elf(0x100_0000, 0x100_0000, 0x1000, Some(0x100_0000), 2);
    boot(&mem, &kernel, None, "", 1).unwrap();
    let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
    assert_eq!((info.nr_modules, info.modlist_paddr), (0, 0));
}

#[test]
fn ram_above_4gib_is_in_the_e820_map() {
    let size = (4 << 30) + 512 * MIB;
    let mem = memory(size);
    boot(&mem, &bzimage(&BzImageSpec::default()), None, "", 1).unwrap();
    let zp = zero_page(&mem);
    assert_eq!(zp.e820_entries, 5);
    let high = zp.e820_table[4];
    assert_eq!((high.addr, high.size, high.r#type), (1 << 32, size - MMIO_GAP_START, E820_RAM));
    let low = zp.e820_table[2];
    assert_eq!({ low.addr } + { low.size }, MMIO_GAP_START);
}

fn kernel_error(result: Result<BootSetup, Error>) -> String {
    match result {
        Err(e @ Error::Kernel(_)) => e.to_string(),
        other => panic!("expected a kernel error, got {other:?}"),
    }
}

#[test]
fn random_file_is_not_a_kernel() {
    let mem = memory(32 * MIB);
    let mut state = 0x1234_5678u32;
    let noise: Vec<u8> = (0..8192)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        })
        .collect();
    let msg = kernel_error(boot(&mem, &noise, None, "", 1));
    assert!(msg.contains("not a bzImage or ELF kernel"), "{msg}");
    assert!(kernel_error(boot(&mem, &[], None, "", 1)).contains("not a bzImage or ELF"));
}

#[test]
fn truncated_bzimage_is_rejected() {
    let mem = memory(32 * MIB);
    let image = bzimage(&BzImageSpec::default());
    let msg = kernel_error(boot(&mem, &image[..0x400], None, "", 1));
    assert!(msg.contains("truncated"), "{msg}");
}

#[test]
fn memory_too_small_for_the_kernel() {
    // pref_address + init_size = 24 MiB, more than the guest has.
    let mem = memory(16 * MIB);
    let msg = kernel_error(boot(&mem, &bzimage(&BzImageSpec::default()), None, "", 1));
    assert!(msg.contains("does not fit in guest memory"), "{msg}");

    let kernel = elf(0x100_0000, 0x100_0000, 0x200_0000, None, 2);
    let msg = kernel_error(boot(&mem, &kernel, None, "", 1));
    assert!(msg.contains("does not fit in guest memory"), "{msg}");

    let tiny = memory(MIB);
    assert!(matches!(boot(&tiny, &kernel, None, "", 1), Err(Error::Memory(_))));
}

#[test]
fn bad_elf_kernels_are_rejected() {
    let mem = memory(32 * MIB);
    let msg = kernel_error(boot(&mem, &elf(0x100_0000, 0x100_0000, 0x1000, None, 1), None, "", 1));
    assert!(msg.contains("64-bit"), "{msg}");
    let msg = kernel_error(boot(&mem, &elf(0x10_0000, 0x8000, 0x1000, None, 2), None, "", 1));
    assert!(msg.contains("below 1 MiB"), "{msg}");
    let image = elf(0x100_0000, 0x100_0000, 0x1000, None, 2);
    let msg = kernel_error(boot(&mem, &image[..image.len() - 4], None, "", 1));
    assert!(msg.contains("beyond"), "{msg}");
}

#[test]
fn too_long_cmdline_is_rejected() {
    let mem = memory(64 * MIB);
    let long = "x".repeat(CMDLINE_MAX_SIZE);
    let kernel = elf(0x100_0000, 0x100_0000, 0x1000, None, 2);
    assert!(matches!(boot(&mem, &kernel, None, &long, 1), Err(Error::Cmdline(_))));
    let fits = "x".repeat(CMDLINE_MAX_SIZE - 1);
    boot(&mem, &kernel, None, &fits, 1).unwrap();

    // The bzImage's own limit (protocol >= 2.06) applies too.
    let spec = BzImageSpec { cmdline_size: 255, ..Default::default() };
    let err = boot(&mem, &bzimage(&spec), None, &"y".repeat(256), 1).unwrap_err();
    assert!(matches!(err, Error::Cmdline(_)), "{err}");
    boot(&mem, &bzimage(&spec), None, &"y".repeat(255), 1).unwrap();

    assert!(matches!(boot(&mem, &kernel, None, "a\0b", 1), Err(Error::Cmdline(_))));
}

#[test]
fn initrd_bigger_than_ram_is_rejected() {
    let mem = memory(32 * MIB);
    let mut kernel = file_with(&bzimage(&BzImageSpec::default()));
    let mut initrd = file_with(&[]);
    initrd.set_len(64 * MIB).unwrap(); // sparse
    let mut config = GuestConfig { kernel: &mut kernel, initrd: Some(&mut initrd), cmdline: "", vcpu_count: 1 };
    let err = setup_guest(&mem, &mut config).unwrap_err();
    assert!(matches!(err, Error::Initrd(_)), "{err}");

    // Fits in RAM, but not between the kernel's init_size and the top.
    let big = initrd_bytes((8 * MIB + 1) as usize);
    let err = boot(&mem, &bzimage(&BzImageSpec::default()), Some(&big), "", 1).unwrap_err();
    assert!(matches!(err, Error::Initrd(_)), "{err}");
}

#[test]
fn zero_vcpus_is_an_error() {
    let mem = memory(32 * MIB);
    let kernel = elf(0x100_0000, 0x100_0000, 0x1000, None, 2);
    assert!(matches!(boot(&mem, &kernel, None, "", 0), Err(Error::Tables(_))));
}

#[test]
fn more_vcpus_than_the_mp_table_holds_are_described_by_acpi_alone() {
    let mem = memory(32 * MIB);
    let kernel = elf(0x100_0000, 0x100_0000, 0x1000, None, 2);
    boot(&mem, &kernel, None, "", 200).unwrap();
    let mut signature = [0u8; 4];
    mem.read_slice(&mut signature, GuestAddress(arch::x86_64::layout::MPTABLE_START)).unwrap();
    assert_ne!(&signature, b"_MP_", "no MP table for 200 vCPUs");
    boot(&mem, &kernel, None, "", 4).unwrap();
    mem.read_slice(&mut signature, GuestAddress(arch::x86_64::layout::MPTABLE_START)).unwrap();
    assert_eq!(&signature, b"_MP_", "an MP table for 4 vCPUs");
}

//! Loading a kernel into guest memory by one of the Linux x86 boot protocols.
//!
//! The kernel file decides the protocol: an ELF with a Xen PVH note is entered through PVH (32-bit protected
//! mode, `hvm_start_info`), any other 64-bit ELF (vmlinux) and every bzImage through the 64-bit boot protocol
//! (long mode, zero page). Everything the file says about itself (segment addresses, sizes, setup header fields)
//! is checked against guest RAM before anything is copied.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{self as ll, BzImage, KernelLoader, KernelLoaderResult};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::acpi::{self, AcpiConfig};
use super::cpu_state::{GeneralRegisters, SpecialRegisters};
use super::gdt::{self, SegmentMode};
use super::layout::{
    ram_regions, CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, MPTABLE_START, PCI_ECAM_SIZE, PCI_ECAM_START,
    PVH_INFO_START, ZERO_PAGE_START,
};
use super::{layout, mptable, paging, CpuState, Error, Result};

/// What the VMM knows about the guest it is asked to boot.
pub struct GuestConfig<'a> {
    pub kernel: &'a mut File,
    pub initrd: Option<&'a mut File>,
    pub cmdline: &'a str,
    pub vcpu_count: u8,
}

/// How the kernel is entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryProtocol {
    /// bzImage, 64-bit boot protocol: long mode, RIP = load address + 0x200, RSI = zero page.
    BzImage,
    /// ELF vmlinux without a PVH note, 64-bit boot protocol: long mode, RIP = e_entry, RSI = zero page.
    Elf64,
    /// ELF with XEN_ELFNOTE_PHYS32_ENTRY: 32-bit protected mode, paging off, EBX = hvm_start_info.
    Pvh,
}

/// The result of setting up guest memory: how the kernel is entered and the boot vCPU's state.
#[derive(Clone, Debug)]
pub struct BootSetup {
    pub protocol: EntryProtocol,
    pub boot_cpu: CpuState,
}

/// "HdrS": the setup header is present.
pub const SETUP_HEADER_MAGIC: u32 = 0x5372_6448;
pub const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// Where the setup header sits in a bzImage (and in the zero page).
const SETUP_HEADER_OFFSET: u64 = 0x1f1;
/// `type_of_loader` for a boot loader without an assigned ID.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// The bzImage's 64-bit entry point, relative to where the protected-mode kernel is loaded.
pub const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Highest initrd address for kernels whose header does not say (protocol < 2.03, and every ELF kernel).
pub const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
/// The protocol version the zero page built for an ELF kernel claims: every field written is defined there.
const ELF_BOOT_PROTOCOL_VERSION: u16 = 0x020f;
/// Linux's default physical alignment (CONFIG_PHYSICAL_ALIGN).
const ELF_KERNEL_ALIGNMENT: u32 = 0x100_0000;
const XEN_HVM_START_INFO_VERSION: u32 = 1;

const PAGE_SIZE: u64 = 0x1000;

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1 is reserved and always set; interrupts stay off.
const RFLAGS_RESERVED: u64 = 1 << 1;

const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const ELF64_EHDR_LEN: usize = 64;
const ELF64_PHDR_LEN: usize = 56;

/// e820 memory types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// One entry of the guest's physical memory map (e820 for the zero page, the PVH memmap uses the same types).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub type_: u32,
}

/// The memory map for `ram_size` bytes of RAM laid out by [`layout::ram_regions`]:
/// RAM below the MP table, reserved from the MP table to 1 MiB (MP table, VGA hole, BIOS area with the ACPI
/// tables), RAM from 1 MiB to the end of low RAM, and RAM above 4 GiB if any.
///
/// The ACPI tables are in a reserved range, not an "ACPI reclaimable" one, because they share the BIOS area with
/// nothing the guest may reuse, and Linux maps reserved ranges under 1 MiB anyway (it reserves all of it early).
pub fn e820_map(ram_size: u64) -> Vec<E820Entry> {
    let regions = ram_regions(ram_size);
    let low_end = regions[0].1;
    let mut map = vec![
        E820Entry { addr: 0, size: MPTABLE_START, type_: E820_RAM },
        E820Entry { addr: MPTABLE_START, size: HIMEM_START - MPTABLE_START, type_: E820_RESERVED },
    ];
    if low_end > HIMEM_START {
        map.push(E820Entry { addr: HIMEM_START, size: low_end - HIMEM_START, type_: E820_RAM });
    }
    map.push(E820Entry { addr: PCI_ECAM_START, size: PCI_ECAM_SIZE, type_: E820_RESERVED });
    if let Some(&(start, size)) = regions.get(1) {
        map.push(E820Entry { addr: start, size, type_: E820_RAM });
    }
    map
}

/// Guest RAM as `layout::ram_regions` describes it, checked against the memory actually provided.
struct GuestRam {
    size: u64,
    low_end: u64,
}

fn guest_ram<M: GuestMemoryBackend>(mem: &M) -> Result<GuestRam> {
    let size: u64 = mem.iter().map(|r| r.len()).sum();
    let regions = ram_regions(size);
    for &(start, len) in &regions {
        let covered = usize::try_from(len).is_ok_and(|len| mem.check_range(GuestAddress(start), len));
        if !covered {
            return Err(Error::Memory(format!(
                "guest memory does not follow the x86_64 layout: {len:#x} bytes at {start:#x} expected for {size:#x} bytes of RAM"
            )));
        }
    }
    let low_end = regions[0].1;
    if low_end <= HIMEM_START {
        return Err(Error::Memory(format!("{} KiB of RAM is too little: kernels are loaded at 1 MiB", size >> 10)));
    }
    Ok(GuestRam { size, low_end })
}

/// Loads kernel, initrd and command line into `mem`, writes the zero page or PVH start info with the e820 map,
/// the boot GDT and page tables, the MP table and the ACPI tables, and returns the boot vCPU's initial state.
pub fn setup_guest<M: GuestMemoryBackend>(mem: &M, config: &mut GuestConfig) -> Result<BootSetup> {
    setup_guest_with_acpi(mem, config, Vec::new(), false)
}

/// [`setup_guest`], with extra AML objects (devices) appended to the DSDT's `\_SB_` scope and, with
/// `pci_host_bridge`, the PCI host bridge (`PCI0` and the MCFG table).
pub fn setup_guest_with_acpi<M: GuestMemoryBackend>(
    mem: &M,
    config: &mut GuestConfig,
    extra_dsdt_aml: Vec<Vec<u8>>,
    pci_host_bridge: bool,
) -> Result<BootSetup> {
    let ram = guest_ram(mem)?;
    let kernel = load_kernel(mem, config.kernel, &ram)?;

    let max_cmdline = match &kernel.setup_header {
        Some(hdr) if hdr.version >= 0x0206 => (CMDLINE_MAX_SIZE - 1).min(hdr.cmdline_size as usize),
        _ => CMDLINE_MAX_SIZE - 1,
    };
    let cmdline_len = write_cmdline(mem, config.cmdline, max_cmdline)?;

    let initrd_addr_max = match &kernel.setup_header {
        Some(hdr) if hdr.version >= 0x0203 => u64::from(hdr.initrd_addr_max),
        _ => DEFAULT_INITRD_ADDR_MAX,
    };
    let initrd = match config.initrd.as_deref_mut() {
        Some(file) => Some(load_initrd(mem, file, kernel.end, initrd_addr_max, ram.low_end)?),
        None => None,
    };

    // The MP table only serves kernels without ACPI; above what fits in the EBDA, the MADT alone describes the
    // CPUs, as Linux prefers anyway.
    if usize::from(config.vcpu_count) <= mptable::MAX_VCPUS {
        mptable::setup_mptable(mem, config.vcpu_count)?;
    }
    let acpi_config = AcpiConfig { vcpu_count: config.vcpu_count, extra_dsdt_aml, pci_host_bridge };
    let rsdp = acpi::create_acpi_tables(mem, &acpi_config)?.rsdp;
    let e820 = e820_map(ram.size);

    let boot_cpu = match kernel.protocol {
        EntryProtocol::Pvh => {
            write_pvh_start_info(mem, initrd, rsdp, &e820)?;
            gdt::write_boot_tables(mem, SegmentMode::Protected32)?;
            pvh_cpu_state(kernel.entry)
        }
        EntryProtocol::BzImage | EntryProtocol::Elf64 => {
            let hdr = kernel.setup_header.unwrap_or_else(elf_setup_header);
            write_zero_page(mem, hdr, cmdline_len, initrd, rsdp, &e820)?;
            gdt::write_boot_tables(mem, SegmentMode::Long)?;
            let cr3 = paging::setup_identity_page_tables(mem)?;
            long_mode_cpu_state(kernel.entry, cr3)
        }
    };
    Ok(BootSetup { protocol: kernel.protocol, boot_cpu })
}

/// Where the kernel went and how to enter it.
struct LoadedKernel {
    protocol: EntryProtocol,
    entry: u64,
    /// First byte past everything the kernel needs before it reads the memory map (init_size for a bzImage).
    end: u64,
    /// The bzImage's own setup header (code32_start updated by the loader); `None` for ELF kernels.
    setup_header: Option<setup_header>,
}

fn read_at(file: &mut File, offset: u64, buf: &mut [u8]) -> Result<()> {
    file.seek(SeekFrom::Start(offset))
        .and_then(|_| file.read_exact(buf))
        .map_err(|e| Error::Kernel(format!("cannot read {} bytes at offset {offset:#x}: {e}", buf.len())))
}

fn load_kernel<M: GuestMemoryBackend>(mem: &M, kernel: &mut File, ram: &GuestRam) -> Result<LoadedKernel> {
    let size =
        kernel.seek(SeekFrom::End(0)).map_err(|e| Error::Kernel(format!("cannot determine the image size: {e}")))?;
    let mut magic = [0u8; 4];
    if size >= 4 {
        read_at(kernel, 0, &mut magic)?;
    }
    if magic == ELF_MAGIC {
        return load_elf(mem, kernel, size, ram);
    }
    let mut hdr = setup_header::default();
    if size >= SETUP_HEADER_OFFSET + std::mem::size_of::<setup_header>() as u64 {
        read_at(kernel, SETUP_HEADER_OFFSET, hdr.as_mut_slice())?;
    }
    if hdr.header == SETUP_HEADER_MAGIC {
        return load_bzimage(mem, kernel, size, hdr, ram);
    }
    Err(Error::Kernel(format!(
        "not a bzImage or ELF kernel ({size} bytes, neither an ELF magic nor a \"HdrS\" setup header)"
    )))
}

/// The subset of ELF headers checked before the loader copies anything.
fn check_elf(kernel: &mut File, size: u64, ram: &GuestRam) -> Result<()> {
    let mut ehdr = [0u8; ELF64_EHDR_LEN];
    if size < ELF64_EHDR_LEN as u64 {
        return Err(Error::Kernel(format!("ELF image of {size} bytes is truncated")));
    }
    read_at(kernel, 0, &mut ehdr)?;
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default());
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
    if ehdr[4] != ELFCLASS64 || ehdr[5] != ELFDATA2LSB || u16_at(&ehdr, 18) != EM_X86_64 {
        return Err(Error::Kernel("ELF image is not a little-endian 64-bit x86_64 executable".into()));
    }
    let phoff = u64_at(&ehdr, 32);
    let phentsize = usize::from(u16_at(&ehdr, 54));
    let phnum = usize::from(u16_at(&ehdr, 56));
    if phentsize != ELF64_PHDR_LEN {
        return Err(Error::Kernel(format!("ELF program header size {phentsize} is not {ELF64_PHDR_LEN}")));
    }
    let table_len = (phnum * ELF64_PHDR_LEN) as u64;
    if phoff.checked_add(table_len).is_none_or(|end| end > size) {
        return Err(Error::Kernel(format!("ELF program headers at {phoff:#x} lie beyond the {size}-byte image")));
    }
    let mut phdrs = vec![0u8; table_len as usize];
    read_at(kernel, phoff, &mut phdrs)?;
    for ph in phdrs.chunks_exact(ELF64_PHDR_LEN) {
        let (p_type, offset, paddr) = (u32_at(ph, 0), u64_at(ph, 8), u64_at(ph, 24));
        let (filesz, memsz) = (u64_at(ph, 32), u64_at(ph, 40));
        // The loader skips PT_LOAD segments without file contents; so do the checks.
        if p_type != PT_LOAD || filesz == 0 {
            continue;
        }
        if offset.checked_add(filesz).is_none_or(|end| end > size) {
            return Err(Error::Kernel(format!(
                "ELF segment at file offset {offset:#x} ({filesz} bytes) lies beyond the {size}-byte image"
            )));
        }
        if paddr < HIMEM_START {
            return Err(Error::Kernel(format!("ELF segment at {paddr:#x} is below 1 MiB, where the boot tables live")));
        }
        let end = paddr.checked_add(filesz.max(memsz));
        if end.is_none_or(|end| end > ram.low_end) {
            return Err(Error::Kernel(format!(
                "kernel does not fit in guest memory: segment at {paddr:#x} of {} bytes, RAM below the MMIO gap ends at {:#x}",
                filesz.max(memsz),
                ram.low_end
            )));
        }
    }
    Ok(())
}

fn load_elf<M: GuestMemoryBackend>(mem: &M, kernel: &mut File, size: u64, ram: &GuestRam) -> Result<LoadedKernel> {
    check_elf(kernel, size, ram)?;
    let result = Elf::load(mem, None, kernel, Some(GuestAddress(HIMEM_START))).map_err(loader_error)?;
    let (protocol, entry) = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => (EntryProtocol::Pvh, addr.0),
        _ => (EntryProtocol::Elf64, result.kernel_load.0),
    };
    if !(HIMEM_START..ram.low_end).contains(&entry) {
        return Err(Error::Kernel(format!(
            "entry point {entry:#x} is outside guest RAM {HIMEM_START:#x}..{:#x}",
            ram.low_end
        )));
    }
    Ok(LoadedKernel { protocol, entry, end: result.kernel_end, setup_header: None })
}

fn load_bzimage<M: GuestMemoryBackend>(
    mem: &M,
    kernel: &mut File,
    size: u64,
    hdr: setup_header,
    ram: &GuestRam,
) -> Result<LoadedKernel> {
    let version = hdr.version;
    if version < 0x0200 || hdr.loadflags & ll::bootparam::LOADED_HIGH == 0 {
        return Err(Error::Kernel(format!(
            "bzImage boot protocol {}.{:02} without LOADED_HIGH is not supported (zImage or too old)",
            version >> 8,
            version & 0xff
        )));
    }
    if version >= 0x020c && hdr.xloadflags & ll::bootparam::XLF_KERNEL_64 == 0 {
        return Err(Error::Kernel("bzImage has no 64-bit entry point (XLF_KERNEL_64 is clear)".into()));
    }
    let setup_sects = if hdr.setup_sects == 0 { 4 } else { u64::from(hdr.setup_sects) };
    let setup_size = (setup_sects + 1) * 512;
    if size <= setup_size {
        return Err(Error::Kernel(format!(
            "bzImage is truncated: {size} bytes, but its real-mode setup alone takes {setup_size}"
        )));
    }
    let payload = size - setup_size;
    let load = u64::from(hdr.code32_start);
    if load < HIMEM_START {
        return Err(Error::Kernel(format!("bzImage wants to be loaded at {load:#x}, below 1 MiB")));
    }
    let mut end = load + payload;
    if version >= 0x020a {
        // A relocatable kernel decompresses itself to pref_address (when above where it was loaded) and needs
        // init_size bytes from there before it looks at the memory map.
        let runtime_start = load.max(hdr.pref_address);
        end = end.max(runtime_start.saturating_add(u64::from(hdr.init_size)));
    }
    if end > ram.low_end {
        return Err(Error::Kernel(format!(
            "kernel does not fit in guest memory: it needs memory up to {end:#x}, RAM below the MMIO gap ends at {:#x}",
            ram.low_end
        )));
    }
    let result: KernelLoaderResult =
        BzImage::load(mem, None, kernel, Some(GuestAddress(HIMEM_START))).map_err(loader_error)?;
    Ok(LoadedKernel {
        protocol: EntryProtocol::BzImage,
        entry: result.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
        end: end.max(result.kernel_end),
        setup_header: Some(result.setup_header.unwrap_or(hdr)),
    })
}

fn loader_error(e: ll::Error) -> Error {
    let detail = match &e {
        ll::Error::Elf(ll::elf::Error::ReadKernelImage)
        | ll::Error::Bzimage(ll::bzimage::Error::ReadBzImageCompressedKernel) => {
            "cannot copy the kernel into guest memory (truncated image?)".to_string()
        }
        _ => e.to_string().replace("Kernel Loader: ", ""),
    };
    Error::Kernel(detail)
}

/// Writes the command line and its NUL at `CMDLINE_START`; returns its length without the NUL.
fn write_cmdline<M: GuestMemoryBackend>(mem: &M, cmdline: &str, max_len: usize) -> Result<usize> {
    let bytes = cmdline.as_bytes();
    if bytes.contains(&0) {
        return Err(Error::Cmdline("contains a NUL byte".into()));
    }
    if bytes.len() > max_len {
        return Err(Error::Cmdline(format!(
            "{} bytes is longer than the {max_len} bytes the kernel accepts",
            bytes.len()
        )));
    }
    let mut with_nul = bytes.to_vec();
    with_nul.push(0);
    mem.write_slice(&with_nul, GuestAddress(CMDLINE_START))
        .map_err(|e| Error::Memory(format!("cannot write the command line at {CMDLINE_START:#x}: {e}")))?;
    Ok(bytes.len())
}

/// Reads the whole initrd to the highest page-aligned address below both `addr_max` and the end of low RAM, above
/// the kernel. Returns (address, size).
fn load_initrd<M: GuestMemoryBackend>(
    mem: &M,
    file: &mut File,
    kernel_end: u64,
    addr_max: u64,
    low_end: u64,
) -> Result<(u64, u64)> {
    let size = file.seek(SeekFrom::End(0)).map_err(|e| Error::Initrd(format!("cannot determine its size: {e}")))?;
    if size == 0 {
        return Err(Error::Initrd("the file is empty".into()));
    }
    let top = addr_max.saturating_add(1).min(low_end);
    let bottom = kernel_end.next_multiple_of(PAGE_SIZE);
    let addr = top.checked_sub(size).map(|a| a & !(PAGE_SIZE - 1));
    let addr = match addr {
        Some(addr) if addr >= bottom => addr,
        _ => {
            return Err(Error::Initrd(format!(
                "{size} bytes do not fit in guest RAM between the kernel's end {bottom:#x} and {top:#x}"
            )))
        }
    };
    file.rewind().map_err(|e| Error::Initrd(format!("cannot read it: {e}")))?;
    mem.read_exact_volatile_from(GuestAddress(addr), file, size as usize)
        .map_err(|e| Error::Initrd(format!("cannot read it into guest memory: {e}")))?;
    Ok((addr, size))
}

/// The setup header a bzImage would carry, for ELF kernels entered through the 64-bit boot protocol.
fn elf_setup_header() -> setup_header {
    setup_header {
        boot_flag: BOOT_FLAG_MAGIC,
        header: SETUP_HEADER_MAGIC,
        version: ELF_BOOT_PROTOCOL_VERSION,
        // Only LOADED_HIGH: KEEP_SEGMENTS is obsolete and meant for the 32-bit entry, and CAN_USE_HEAP concerns
        // the real-mode setup code, which a vmlinux does not run.
        loadflags: ll::bootparam::LOADED_HIGH,
        kernel_alignment: ELF_KERNEL_ALIGNMENT,
        initrd_addr_max: DEFAULT_INITRD_ADDR_MAX as u32,
        ..Default::default()
    }
}

fn write_zero_page<M: GuestMemoryBackend>(
    mem: &M,
    hdr: setup_header,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    rsdp: u64,
    e820: &[E820Entry],
) -> Result<()> {
    let mut params = boot_params { hdr, ..Default::default() };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        // Both fit in 32 bits: the initrd lies below min(initrd_addr_max, MMIO gap).
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = rsdp;
    if e820.len() > params.e820_table.len() {
        return Err(Error::Memory(format!("{} e820 entries do not fit in the zero page", e820.len())));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry { addr: e.addr, size: e.size, r#type: e.type_ };
    }
    params.e820_entries = e820.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(|e| Error::Memory(format!("cannot write the zero page at {ZERO_PAGE_START:#x}: {e}")))
}

/// Writes `hvm_start_info` at `PVH_INFO_START`, then the module list (the initrd) and the memory map after it.
fn write_pvh_start_info<M: GuestMemoryBackend>(
    mem: &M,
    initrd: Option<(u64, u64)>,
    rsdp: u64,
    e820: &[E820Entry],
) -> Result<()> {
    let modlist_addr = PVH_INFO_START + std::mem::size_of::<hvm_start_info>() as u64;
    let modules: Vec<hvm_modlist_entry> =
        initrd.iter().map(|&(paddr, size)| hvm_modlist_entry { paddr, size, ..Default::default() }).collect();
    let memmap_addr = modlist_addr + (modules.len() * std::mem::size_of::<hvm_modlist_entry>()) as u64;
    let memmap_end = memmap_addr + (e820.len() * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
    if memmap_end > ZERO_PAGE_START {
        return Err(Error::Memory(format!("PVH start info overflows into the zero page ({memmap_end:#x})")));
    }
    let info = hvm_start_info {
        magic: ll::elf::start_info::XEN_HVM_START_MAGIC_VALUE,
        version: XEN_HVM_START_INFO_VERSION,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() { 0 } else { modlist_addr },
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp,
        memmap_paddr: memmap_addr,
        memmap_entries: e820.len() as u32,
        ..Default::default()
    };
    let err = |e: vm_memory::GuestMemoryError| {
        Error::Memory(format!("cannot write the PVH start info at {PVH_INFO_START:#x}: {e}"))
    };
    mem.write_obj(info, GuestAddress(PVH_INFO_START)).map_err(err)?;
    for (i, m) in modules.iter().enumerate() {
        let addr = modlist_addr + (i * std::mem::size_of::<hvm_modlist_entry>()) as u64;
        mem.write_obj(*m, GuestAddress(addr)).map_err(err)?;
    }
    for (i, e) in e820.iter().enumerate() {
        let entry = hvm_memmap_table_entry { addr: e.addr, size: e.size, type_: e.type_, reserved: 0 };
        let addr = memmap_addr + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(entry, GuestAddress(addr)).map_err(err)?;
    }
    Ok(())
}

fn segments(mode: SegmentMode) -> SpecialRegisters {
    let data = gdt::data_segment();
    SpecialRegisters {
        cs: gdt::code_segment(mode),
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: gdt::tss_segment(),
        gdt: gdt::boot_gdtr(),
        idt: gdt::boot_idtr(),
        ..Default::default()
    }
}

/// The 64-bit boot protocol: long mode with the identity map, flat `__BOOT_CS`/`__BOOT_DS`, RSI = zero page.
fn long_mode_cpu_state(entry: u64, cr3: u64) -> CpuState {
    CpuState {
        regs: GeneralRegisters {
            rip: entry,
            rsi: ZERO_PAGE_START,
            rsp: layout::BOOT_STACK_POINTER,
            rbp: layout::BOOT_STACK_POINTER,
            rflags: RFLAGS_RESERVED,
            ..Default::default()
        },
        sregs: long_mode_special_registers(cr3),
        fpu: Default::default(),
    }
}

/// Long mode (64-bit, paging on with the PML4 at `cr3`) on the boot GDT's flat segments: what the 64-bit boot
/// protocol starts a kernel in, and any other guest code that wants to start in 64-bit mode.
pub fn long_mode_special_registers(cr3: u64) -> SpecialRegisters {
    SpecialRegisters {
        cr0: CR0_PE | CR0_ET | CR0_PG,
        cr3,
        cr4: CR4_PAE,
        efer: EFER_LME | EFER_LMA,
        ..segments(SegmentMode::Long)
    }
}

/// The PVH entry: 32-bit protected mode, paging off, flat 4 GiB segments, EBX = `hvm_start_info`.
fn pvh_cpu_state(entry: u64) -> CpuState {
    CpuState {
        regs: GeneralRegisters { rip: entry, rbx: PVH_INFO_START, rflags: RFLAGS_RESERVED, ..Default::default() },
        sregs: SpecialRegisters { cr0: CR0_PE | CR0_ET, ..segments(SegmentMode::Protected32) },
        fpu: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_small_guest() {
        let map = e820_map(128 << 20);
        assert_eq!(
            map,
            vec![
                E820Entry { addr: 0, size: MPTABLE_START, type_: E820_RAM },
                E820Entry { addr: MPTABLE_START, size: HIMEM_START - MPTABLE_START, type_: E820_RESERVED },
                E820Entry { addr: HIMEM_START, size: (128 << 20) - HIMEM_START, type_: E820_RAM },
                E820Entry { addr: PCI_ECAM_START, size: 1 << 20, type_: E820_RESERVED },
            ]
        );
    }

    #[test]
    fn e820_large_guest_has_high_ram() {
        let map = e820_map(6 << 30);
        assert_eq!(map.len(), 5);
        assert_eq!(map[2].addr + map[2].size, layout::MMIO_GAP_START);
        assert_eq!(map[3], E820Entry { addr: PCI_ECAM_START, size: PCI_ECAM_SIZE, type_: E820_RESERVED });
        assert_eq!(map[4], E820Entry { addr: 1 << 32, size: (6 << 30) - layout::MMIO_GAP_START, type_: E820_RAM });
        let ram: u64 = map.iter().filter(|e| e.type_ == E820_RAM).map(|e| e.size).sum();
        assert_eq!(ram, (6 << 30) - (HIMEM_START - MPTABLE_START));
    }

    #[test]
    fn long_mode_state() {
        let s = long_mode_cpu_state(0x100_0200, layout::PML4_START);
        assert_eq!(s.sregs.cs.selector, gdt::BOOT_CS_SELECTOR);
        assert!(s.sregs.cs.l);
        assert_eq!(s.sregs.ss.selector, gdt::BOOT_DS_SELECTOR);
        assert_eq!(s.sregs.efer, 0x500);
        assert_eq!(s.sregs.cr0 & 0x8000_0001, 0x8000_0001);
        assert_eq!(s.regs.rsi, ZERO_PAGE_START);
    }

    #[test]
    fn pvh_state() {
        let s = pvh_cpu_state(0x100_0000);
        assert_eq!(s.sregs.cr0, CR0_PE | CR0_ET);
        assert!(s.sregs.cs.db && !s.sregs.cs.l);
        assert_eq!(s.regs.rbx, PVH_INFO_START);
        assert_eq!(s.sregs.efer, 0);
    }
}

//! Loading a kernel into guest memory by one of the Linux x86 boot protocols.

use std::fs::File;

use vm_memory::GuestMemory;

use super::{CpuState, Result};

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

/// Loads kernel, initrd and command line into `mem`, writes the zero page or PVH start info with the e820 map,
/// the boot GDT and page tables, the MP table and the ACPI tables, and returns the boot vCPU's initial state.
pub fn setup_guest<M: GuestMemory>(_mem: &M, _config: &mut GuestConfig) -> Result<BootSetup> {
    todo!("arch helper")
}

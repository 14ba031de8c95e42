//! x86_64 guests: the PC-like platform Kestrel presents, and the Linux boot protocols it implements
//! (64-bit boot protocol for bzImage and ELF vmlinux, and the PVH entry for ELF kernels carrying the Xen PVH note).

pub mod acpi;
pub mod boot;
pub mod cpu_state;
pub mod cpuid;
pub mod firmware;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod msrs;
pub mod paging;

pub use boot::{setup_guest, BootSetup, EntryProtocol, GuestConfig};
pub use cpu_state::{CpuState, CpuidEntry, MsrEntry};

pub use crate::{Error, Result};

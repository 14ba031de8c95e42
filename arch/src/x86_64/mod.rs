//! x86_64 guests: the PC-like platform Kestrel presents, and the Linux boot protocols it implements
//! (64-bit boot protocol for bzImage and ELF vmlinux, and the PVH entry for ELF kernels carrying the Xen PVH note).

pub mod acpi;
pub mod boot;
pub mod cpu_state;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod msrs;
pub mod paging;

pub use boot::{setup_guest, BootSetup, EntryProtocol, GuestConfig};
pub use cpu_state::{CpuState, CpuidEntry, MsrEntry};

/// Why a guest could not be set up. Every variant is the caller's input being wrong or not fitting: none of them
/// is a bug, and each message stands on its own as one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kernel image: {0}")]
    Kernel(String),
    #[error("initrd: {0}")]
    Initrd(String),
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("firmware tables: {0}")]
    Tables(String),
}

pub type Result<T> = std::result::Result<T, Error>;

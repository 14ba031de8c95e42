//! Architecture knowledge as data: what a guest of each architecture expects to find in memory and in its
//! registers when it starts. Nothing here knows about KVM, file descriptors or threads, so all of it is
//! testable natively and under qemu-user.

// Compiled on every target: it is data and pure functions, so its tests run natively and under qemu-user alike.
pub mod aarch64;
pub mod table_loader;

cfg_if::cfg_if! {
    if #[cfg(target_arch = "x86_64")] {
        pub mod x86_64;
    }
}

/// One MiB, for sizes written the way people think about guest memory.
pub const MIB: u64 = 1 << 20;
/// One GiB.
pub const GIB: u64 = 1 << 30;

/// Why a guest could not be set up, on any architecture. Every variant is the caller's input being wrong or not
/// fitting: none of them is a bug, and each message stands on its own as one line for the user.
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
    #[error("vCPUs: {0}")]
    Cpus(String),
    #[error("firmware tables: {0}")]
    Tables(String),
    #[error("device tree: {0}")]
    Fdt(String),
}

pub type Result<T> = std::result::Result<T, Error>;

//! Kestrel's VMM: the command line, the console backends and the machine runner behind the `kestrel` binary.

use std::path::PathBuf;

pub mod cli;
pub mod config;
pub mod console;
pub mod cpu_model;
pub mod inherited;
pub mod listen;

cfg_if::cfg_if! {
    if #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))] {
        mod daemon;
        mod firmware;
        mod machine;
        mod pci;
        mod platform;
        mod populated;
        mod qmp_server;
        pub mod seccomp;
        mod signals;
        mod snapshot;
        mod syscall_names;
        mod vcpu;
        mod virtio;
        pub use machine::{host_cpu_identity, run as run_vm};
    } else {
        /// Kestrel builds here so its generic parts are tested on every target, but it cannot run guests yet.
        pub fn run_vm(_config: &config::VmConfig) -> Result<Outcome, Error> {
            Err(Error::UnsupportedHostArchitecture(std::env::consts::ARCH))
        }

        /// No seccomp filters where no guest can run: the console's threads (unit tests here) run unconfined.
        pub mod seccomp {
            #[derive(Clone, Copy, Debug)]
            pub enum ThreadKind {
                ConsoleOutput,
                ConsoleInput,
            }

            pub fn confined<T>(_kind: ThreadKind, body: impl FnOnce() -> T) -> impl FnOnce() -> T {
                body
            }
        }
    }
}

cfg_if::cfg_if! {
    if #[cfg(target_arch = "x86_64")] {
        mod x86_64;
        use x86_64 as arch_platform;
        /// The machine this host's guests run on.
        type HostPlatform = x86_64::Pc;
    } else if #[cfg(target_arch = "aarch64")] {
        mod aarch64;
        use aarch64 as arch_platform;
        /// The machine this host's guests run on.
        type HostPlatform = aarch64::Virt;
    }
}

/// How a run ended without an error.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The guest powered off.
    Poweroff,
    /// The guest rebooted and `--no-reboot` was given.
    Rebooted,
    /// Kestrel was told to stop by a signal.
    Signal(i32),
    /// A QMP client asked Kestrel to quit.
    Quit,
}

/// Everything that can stop Kestrel, each with a message that stands on its own as one line (plus, for a vCPU
/// failure, the register dump that explains it).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unsupported host architecture: {0} (Kestrel runs guests on x86_64 and aarch64 hosts so far)")]
    UnsupportedHostArchitecture(&'static str),
    #[error("cannot open {what} '{}': {source}", path.display())]
    Open { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Hypervisor(#[from] hypervisor::Error),
    #[error("cannot boot the kernel: {0}")]
    Boot(String),
    /// A firmware image (`-bios`) that cannot be booted, and why.
    #[error("firmware '{}': {reason}", path.display())]
    Firmware { path: PathBuf, reason: String },
    #[error("guest memory: {0}")]
    GuestMemory(String),
    #[error("memory size of {requested} bytes is too small: at least {} MiB are needed", min >> 20)]
    MemoryTooSmall { requested: u64, min: u64 },
    #[error("memory size of {} MiB is more than this host's {} MiB of RAM", requested >> 20, host >> 20)]
    MemoryTooLarge { requested: u64, host: u64 },
    #[error("{requested} vCPUs requested but the hypervisor allows at most {max}")]
    TooManyCpus { requested: u8, max: u32 },
    #[error("console: {0}")]
    Console(std::io::Error),
    #[error("{0}")]
    Device(String),
    /// Something this host's platform does not offer (a machine type, a transport).
    #[error("{0}")]
    Unsupported(String),
    #[error("device layout: {0}")]
    Bus(#[from] devices::bus::Error),
    #[error("{0}: {1}")]
    Host(&'static str, std::io::Error),
    #[error("seccomp: {0}")]
    Seccomp(String),
    /// A snapshot that cannot be restored: what is wrong with it, on one line.
    #[error("{0}")]
    Snapshot(String),
    #[error("vCPU {id} stopped: {reason}\n{state}")]
    VcpuFailed { id: u32, reason: String, state: String },
}

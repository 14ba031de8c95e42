//! `kestrel`: boots a virtual machine on KVM from a command line.

use std::path::PathBuf;
use std::process::ExitCode;

mod cli;
mod config;
mod console;
mod machine;
mod signals;

cfg_if::cfg_if! {
    if #[cfg(target_arch = "x86_64")] {
        mod x86_64;
        use x86_64 as arch_platform;
    }
}

/// Everything that can stop Kestrel, each with a message that stands on its own as one line (plus, for a vCPU
/// failure, the register dump that explains it).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open {what} '{}': {source}", path.display())]
    Open { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Hypervisor(#[from] hypervisor::Error),
    #[error("cannot boot the kernel: {0}")]
    Boot(String),
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
    #[error("device layout: {0}")]
    Bus(#[from] devices::bus::Error),
    #[error("{0}: {1}")]
    Host(&'static str, std::io::Error),
    #[error("vCPU {id} stopped: {reason}\n{state}")]
    VcpuFailed { id: u32, reason: String, state: String },
}

fn main() -> ExitCode {
    let code = match cli::parse(std::env::args().skip(1)) {
        Ok(cli::Command::Help) => {
            print!("{}", cli::USAGE);
            ExitCode::SUCCESS
        }
        Ok(cli::Command::Version) => {
            println!("kestrel {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Ok(cli::Command::Run(config)) => match machine::run(&config) {
            Ok(machine::Outcome::Signal(signal)) => {
                console::restore_terminal();
                eprintln!("kestrel: terminating on signal {signal}");
                ExitCode::SUCCESS
            }
            Ok(machine::Outcome::Poweroff | machine::Outcome::Rebooted) => ExitCode::SUCCESS,
            Err(e) => {
                console::restore_terminal();
                eprintln!("kestrel: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("kestrel: {e}");
            ExitCode::from(2)
        }
    };
    console::restore_terminal();
    code
}

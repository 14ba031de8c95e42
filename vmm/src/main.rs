//! `kestrel`: boots a virtual machine on KVM from a command line.

use std::process::ExitCode;

use vmm::{cli, console, run_vm, Outcome};

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
        Ok(cli::Command::Run(config)) => match run_vm(&config) {
            Ok(Outcome::Signal(signal)) => {
                console::restore_terminal();
                eprintln!("kestrel: terminating on signal {signal}");
                ExitCode::SUCCESS
            }
            Ok(Outcome::Poweroff | Outcome::Rebooted | Outcome::Quit) => ExitCode::SUCCESS,
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

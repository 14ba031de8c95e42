//! `kestrel`: boots a virtual machine on KVM from a command line.

use std::process::ExitCode;
use std::time::Duration;

use vmm::{cli, console, run_vm, Outcome};

/// How long the guest's last console output may take to reach the host before Kestrel exits anyway (a terminal
/// nobody reads must not keep it alive).
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    let code = match cli::parse(std::env::args_os().skip(1)) {
        Ok(cli::Command::Help) => {
            print!("{}", cli::USAGE);
            ExitCode::SUCCESS
        }
        Ok(cli::Command::Version) => {
            println!("kestrel {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Ok(cli::Command::Run(config)) => match run_vm(&config).inspect(|_| console::finish_output(OUTPUT_GRACE)) {
            Ok(Outcome::Signal(signal)) => {
                console::restore_terminal();
                eprintln!("kestrel: terminating on signal {signal}");
                ExitCode::SUCCESS
            }
            Ok(Outcome::Poweroff | Outcome::Rebooted | Outcome::Quit) => ExitCode::SUCCESS,
            Err(e) => {
                console::finish_output(OUTPUT_GRACE);
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
    console::remove_socket_files();
    code
}

//! Kestrel's native command line.

use std::path::PathBuf;

use crate::config::{parse_memory_size, SerialConfig, VmConfig, DEFAULT_CMDLINE, DEFAULT_MEMORY_BYTES};

pub const USAGE: &str = "\
Usage: kestrel --kernel PATH [options]

Boots a virtual machine on KVM.

Options:
  --kernel PATH         guest kernel: bzImage, ELF vmlinux, or ELF with a PVH entry (required)
  --initrd PATH         initial ramdisk
  --cmdline STR         kernel command line (default: \"console=ttyS0\")
  --memory SIZE         guest RAM; a plain number is MiB, or use K/M/G/T (default: 512M)
  --cpus N              number of vCPUs (default: 1)
  --serial MODE         first serial port: stdio (default), pty, file:PATH, none
  --no-reboot           exit when the guest reboots instead of resetting it
  -h, --help            print this help
  -V, --version         print the version
";

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Run(VmConfig),
    Help,
    Version,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CliError {
    #[error("unknown option '{0}' (see --help)")]
    UnknownOption(String),
    #[error("option '{0}' needs a value")]
    MissingValue(String),
    #[error("option '{0}' takes no value")]
    UnexpectedValue(String),
    #[error("option '{0}' given twice")]
    Repeated(String),
    #[error("invalid memory size '{0}': use a number of MiB or a size like 512M or 4G")]
    MemorySize(String),
    #[error("invalid number of CPUs '{0}': use a whole number from 1 to 255")]
    Cpus(String),
    #[error("invalid serial mode '{0}': use stdio, pty, file:PATH or none")]
    Serial(String),
    #[error("no kernel given: use --kernel PATH (see --help)")]
    NoKernel,
}

#[derive(Default)]
struct Seen {
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    cmdline: Option<String>,
    memory: Option<u64>,
    cpus: Option<u8>,
    serial: Option<SerialConfig>,
    no_reboot: bool,
}

fn set_once<T>(slot: &mut Option<T>, name: &str, value: T) -> Result<(), CliError> {
    if slot.is_some() {
        return Err(CliError::Repeated(name.to_string()));
    }
    *slot = Some(value);
    Ok(())
}

fn parse_serial(value: &str) -> Result<SerialConfig, CliError> {
    match value {
        "stdio" => Ok(SerialConfig::Stdio),
        "pty" => Ok(SerialConfig::Pty),
        "none" => Ok(SerialConfig::None),
        _ => match value.strip_prefix("file:") {
            Some(path) if !path.is_empty() => Ok(SerialConfig::File(PathBuf::from(path))),
            _ => Err(CliError::Serial(value.to_string())),
        },
    }
}

pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Command, CliError> {
    let mut seen = Seen::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (name, inline_value) = match arg.split_once('=') {
            Some((name, value)) if name.starts_with("--") => (name.to_string(), Some(value.to_string())),
            _ => (arg.clone(), None),
        };
        let takes_value =
            matches!(name.as_str(), "--kernel" | "--initrd" | "--cmdline" | "--memory" | "--cpus" | "--serial");
        let value = if takes_value {
            match inline_value {
                Some(v) => v,
                None => args.next().ok_or_else(|| CliError::MissingValue(name.clone()))?,
            }
        } else {
            if inline_value.is_some() {
                return Err(CliError::UnexpectedValue(name));
            }
            String::new()
        };
        match name.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "--kernel" => set_once(&mut seen.kernel, &name, PathBuf::from(value))?,
            "--initrd" => set_once(&mut seen.initrd, &name, PathBuf::from(value))?,
            "--cmdline" => set_once(&mut seen.cmdline, &name, value)?,
            "--memory" => {
                let bytes = parse_memory_size(&value).ok_or(CliError::MemorySize(value))?;
                set_once(&mut seen.memory, &name, bytes)?
            }
            "--cpus" => {
                let cpus = value.parse::<u8>().ok().filter(|&n| n > 0).ok_or(CliError::Cpus(value))?;
                set_once(&mut seen.cpus, &name, cpus)?
            }
            "--serial" => set_once(&mut seen.serial, &name, parse_serial(&value)?)?,
            "--no-reboot" => seen.no_reboot = true,
            _ => return Err(CliError::UnknownOption(name)),
        }
    }
    Ok(Command::Run(VmConfig {
        kernel: seen.kernel.ok_or(CliError::NoKernel)?,
        initrd: seen.initrd,
        cmdline: seen.cmdline.unwrap_or_else(|| DEFAULT_CMDLINE.to_string()),
        memory_bytes: seen.memory.unwrap_or(DEFAULT_MEMORY_BYTES),
        vcpus: seen.cpus.unwrap_or(1),
        serial: seen.serial.unwrap_or(SerialConfig::Stdio),
        no_reboot: seen.no_reboot,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(args: &str) -> Result<Command, CliError> {
        parse(args.split_whitespace().map(String::from))
    }

    #[test]
    fn full_command_line() {
        let Command::Run(config) =
            parse_str("--kernel vmlinux --initrd initrd.img --memory 2G --cpus 4 --serial file:/tmp/out --no-reboot")
                .unwrap()
        else {
            panic!("expected a run command")
        };
        assert_eq!(config.kernel, PathBuf::from("vmlinux"));
        assert_eq!(config.initrd, Some(PathBuf::from("initrd.img")));
        assert_eq!(config.memory_bytes, 2 << 30);
        assert_eq!(config.vcpus, 4);
        assert_eq!(config.serial, SerialConfig::File(PathBuf::from("/tmp/out")));
        assert!(config.no_reboot);
        assert_eq!(config.cmdline, DEFAULT_CMDLINE);
    }

    #[test]
    fn inline_values_and_spaces_in_the_command_line() {
        let args = ["--kernel=k", "--cmdline", "console=ttyS0 quiet", "--serial=none"].map(String::from);
        let Command::Run(config) = parse(args).unwrap() else { panic!("expected a run command") };
        assert_eq!(config.cmdline, "console=ttyS0 quiet");
        assert_eq!(config.serial, SerialConfig::None);
        assert_eq!(config.memory_bytes, DEFAULT_MEMORY_BYTES);
        assert_eq!(config.vcpus, 1);
    }

    #[test]
    fn help_and_version() {
        assert_eq!(parse_str("--help"), Ok(Command::Help));
        assert_eq!(parse_str("--kernel k -V"), Ok(Command::Version));
    }

    #[test]
    fn bad_input_is_named_in_the_error() {
        let cases = [
            ("", CliError::NoKernel),
            ("--kernel", CliError::MissingValue("--kernel".into())),
            ("--kernel k --frobnicate", CliError::UnknownOption("--frobnicate".into())),
            ("--kernel k --memory lots", CliError::MemorySize("lots".into())),
            ("--kernel k --cpus 0", CliError::Cpus("0".into())),
            ("--kernel k --cpus 256", CliError::Cpus("256".into())),
            ("--kernel k --cpus -1", CliError::Cpus("-1".into())),
            ("--kernel k --serial tcp:1", CliError::Serial("tcp:1".into())),
            ("--kernel k --serial file:", CliError::Serial("file:".into())),
            ("--kernel k --kernel j", CliError::Repeated("--kernel".into())),
            ("--kernel k --no-reboot=yes", CliError::UnexpectedValue("--no-reboot".into())),
        ];
        for (args, expected) in cases {
            assert_eq!(parse_str(args), Err(expected), "{args:?}");
        }
    }
}

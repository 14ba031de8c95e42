//! What the user asked for, independent of how they spelled it on the command line.

use std::path::PathBuf;

/// Where the guest's first serial port goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialConfig {
    /// The terminal Kestrel runs in: output to stdout, input from stdin.
    Stdio,
    /// A new pseudo-terminal whose path is printed at startup.
    Pty,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// Not connected: output is dropped.
    None,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub memory_bytes: u64,
    pub vcpus: u8,
    pub serial: SerialConfig,
    /// Exit instead of resetting when the guest reboots.
    pub no_reboot: bool,
}

pub const DEFAULT_MEMORY_BYTES: u64 = 512 << 20;
pub const DEFAULT_CMDLINE: &str = "console=ttyS0";
/// Below this the boot structures, a kernel and a stack cannot all fit.
pub const MIN_MEMORY_BYTES: u64 = 4 << 20;

/// Parses a memory size the way QEMU's `-m` does: a plain number is MiB; suffixes K, M, G, T (optionally followed
/// by "iB" or "B") are binary multiples. Returns None for anything else, including overflow and zero.
pub fn parse_memory_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let digits_end = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, suffix) = text.split_at(digits_end);
    let number: u64 = number.parse().ok()?;
    let unit = suffix.strip_suffix("iB").or_else(|| suffix.strip_suffix('B')).unwrap_or(suffix);
    if unit.is_empty() && !suffix.is_empty() {
        return None;
    }
    let shift = match unit {
        "" | "M" | "m" => 20,
        "K" | "k" => 10,
        "G" | "g" => 30,
        "T" | "t" => 40,
        _ => return None,
    };
    let bytes = number.checked_mul(1u64 << shift)?;
    (bytes > 0).then_some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_qemu() {
        assert_eq!(parse_memory_size("512"), Some(512 << 20));
        assert_eq!(parse_memory_size("512M"), Some(512 << 20));
        assert_eq!(parse_memory_size("6G"), Some(6 << 30));
        assert_eq!(parse_memory_size("6GiB"), Some(6 << 30));
        assert_eq!(parse_memory_size("65536K"), Some(64 << 20));
        assert_eq!(parse_memory_size("1T"), Some(1 << 40));
    }

    #[test]
    fn malformed_sizes_are_refused() {
        for bad in ["", "M", "12B", "12iB", "-1", "1.5G", "12X", "0", "0G", "99999999999999999999", "16777216T", "1 G"]
        {
            assert_eq!(parse_memory_size(bad), None, "{bad:?}");
        }
    }
}

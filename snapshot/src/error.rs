//! What can be wrong with a snapshot, each case its own variant and its own one-line message.

use std::io;

/// A snapshot that cannot be written or read, or that does not fit the machine that reads it.
///
/// Every message is one line; names and strings that come from the file are quoted with `{:?}`, so a hostile file
/// cannot put control characters on the terminal.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("snapshot I/O error at byte {offset}: {source}")]
    Io {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("not a Kestrel snapshot (no magic number at its start)")]
    BadMagic,
    /// `file_len` is where the input ended: a file's length, or what a stream delivered before it ended.
    #[error("snapshot is truncated: it ends at byte {file_len}, inside {what}")]
    Truncated { what: String, file_len: u64 },
    #[error("snapshot format version {found} is newer than this Kestrel reads (versions {oldest} to {newest})")]
    FormatTooNew { found: u32, oldest: u32, newest: u32 },
    #[error("snapshot format version {found} is older than this Kestrel reads (versions {oldest} to {newest})")]
    FormatTooOld { found: u32, oldest: u32, newest: u32 },
    #[error("snapshot is corrupted: {what} at byte {offset} does not match its checksum")]
    Corrupted { what: String, offset: u64 },
    #[error("snapshot is malformed at byte {offset}: {problem}")]
    Malformed { offset: u64, problem: String },
    #[error("snapshot was saved on a {snapshot:?} host; this one is {host:?}")]
    ForeignArchitecture { snapshot: String, host: String },
    #[error("snapshot is of machine type {snapshot:?}; this command line builds {expected:?}")]
    WrongMachine { snapshot: String, expected: String },
    #[error("snapshot was saved on a {snapshot:?} CPU; this host's is {host:?}")]
    CpuVendor { snapshot: String, host: String },
    #[error("the snapshot's guest saw CPU features this host lacks: {}", quoted_list(missing))]
    CpuFeaturesMissing { missing: Vec<String> },
    #[error(
        "snapshot section {name:?} claims {length} bytes from byte {offset}, past the end of the file ({file_len} bytes)"
    )]
    SectionBeyondFile { name: String, offset: u64, length: u64, file_len: u64 },
    #[error("snapshot section {name:?} claims {length} bytes, more than the {max} bytes a section may hold")]
    SectionTooLarge { name: String, length: u64, max: u64 },
    #[error("snapshot section {name:?} has no counterpart on this command line")]
    UnknownSection { name: String },
    #[error("snapshot section {name:?} appears twice")]
    DuplicateSection { name: String },
    #[error("snapshot has no section {name:?}, which this command line needs")]
    MissingSection { name: String },
    #[error("snapshot section {name:?} is version {found}; this Kestrel reads versions {oldest} to {newest}")]
    SectionVersion { name: String, found: u32, oldest: u32, newest: u32 },
    #[error("snapshot holds {} of guest memory; this machine has {}", size(*snapshot), size(*expected))]
    MemorySize { snapshot: u64, expected: u64 },
    #[error("snapshot's guest memory is laid out as {snapshot}; this machine's as {expected}")]
    MemoryLayout { snapshot: String, expected: String },
    #[error("snapshot section {name:?} (version {version}) does not hold the state this Kestrel expects: {problem}")]
    BadState { name: String, version: u32, problem: String },
    #[error("snapshot has {count} bytes after its end record")]
    TrailingData { count: u64 },
    #[error("invalid snapshot section name {name:?}: {problem}")]
    InvalidName { name: String, problem: &'static str },
    #[error("cannot write the snapshot's header: {0}")]
    InvalidHeader(String),
    #[error("cannot save guest memory: {0}")]
    InvalidMemory(String),
}

pub type Result<T> = std::result::Result<T, Error>;

fn quoted_list(items: &[String]) -> String {
    items.iter().map(|item| format!("{item:?}")).collect::<Vec<_>>().join(", ")
}

/// Text from a decoder (serde's messages quote field names and values as they are in the file) with its control
/// characters escaped, so that an error stays one line and cannot drive the terminal.
pub(crate) fn escape_controls(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

/// A byte count as people write it: "256 MiB" when it is a whole number of MiB or KiB, else bytes.
pub(crate) fn size(bytes: u64) -> String {
    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;
    match bytes {
        0 => "0 bytes".into(),
        b if b % MIB == 0 => format!("{} MiB", b / MIB),
        b if b % KIB == 0 => format!("{} KiB", b / KIB),
        b => format!("{b} bytes"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_in_decoder_messages_are_escaped() {
        assert_eq!(escape_controls("unknown field `a\x7fb\nc`, é"), "unknown field `a\\u{7f}b\\nc`, é");
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(size(256 << 20), "256 MiB");
        assert_eq!(size(12 << 10), "12 KiB");
        assert_eq!(size(4097), "4097 bytes");
        assert_eq!(size(0), "0 bytes");
    }

    #[test]
    fn strings_from_the_file_are_quoted_so_they_stay_on_one_line() {
        let error = Error::CpuFeaturesMissing { missing: vec!["avx2".into(), "evil\nline".into()] };
        let message = error.to_string();
        assert_eq!(message, r#"the snapshot's guest saw CPU features this host lacks: "avx2", "evil\nline""#);
        let error = Error::WrongMachine { snapshot: "pc\r\x1b[2J".into(), expected: "microvm".into() };
        assert!(!error.to_string().chars().any(char::is_control), "{error}");
    }
}

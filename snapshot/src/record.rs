//! The file's binary framing: the preamble, section records and the end record, byte for byte. Every integer is
//! little-endian, whatever the host's byte order.

use crate::error::{Error, Result};

/// The first eight bytes of every snapshot.
pub(crate) const MAGIC: [u8; 8] = *b"KSTRLSNP";
/// Magic, format version, header length.
pub(crate) const PREAMBLE_LEN: usize = 16;
/// The header is a few hundred bytes of JSON; this bounds what a length field can make the reader allocate.
pub(crate) const MAX_HEADER_LEN: u32 = 64 << 10;

pub(crate) const SECTION_TAG: [u8; 4] = *b"SECT";
pub(crate) const END_TAG: [u8; 4] = *b"END\0";
/// Tag, name length, three zero bytes, version, padding, payload length.
pub(crate) const RECORD_FIXED_LEN: usize = 24;
/// Tag, section count, checksum.
pub(crate) const END_RECORD_LEN: usize = 12;
pub(crate) const CHECKSUM_LEN: u64 = 4;

/// The longest section name.
pub const MAX_NAME_LEN: usize = 128;
/// Zero bytes between a record's header and its payload, which align the payload: at most the largest page size.
pub(crate) const MAX_PADDING: u32 = 64 << 10;

pub(crate) fn checksum(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

pub(crate) fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

pub(crate) fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

/// The preamble: what a reader checks before it trusts anything else in the file.
pub(crate) fn encode_preamble(format_version: u32, header_len: u32) -> [u8; PREAMBLE_LEN] {
    let mut bytes = [0; PREAMBLE_LEN];
    bytes[..8].copy_from_slice(&MAGIC);
    bytes[8..12].copy_from_slice(&format_version.to_le_bytes());
    bytes[12..16].copy_from_slice(&header_len.to_le_bytes());
    bytes
}

/// A section name: 1 to [`MAX_NAME_LEN`] characters of `a-z A-Z 0-9 . _ : -`, so that names print cleanly in
/// errors and tools and never need escaping.
pub fn check_name(name: &str) -> Result<()> {
    let problem = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_NAME_LEN {
        Some("it is longer than 128 bytes")
    } else if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b".-_:".contains(&b)) {
        Some("only letters, digits and . _ : - may be used")
    } else {
        None
    };
    match problem {
        Some(problem) => Err(Error::InvalidName { name: name.into(), problem }),
        None => Ok(()),
    }
}

/// What a section record's header says about the payload that follows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RecordHeader {
    pub name: String,
    pub version: u32,
    /// Zero bytes between this header and the payload.
    pub padding: u32,
    pub payload_len: u64,
}

impl RecordHeader {
    /// The header's bytes: the fixed part, the name, and the checksum of both.
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(RECORD_FIXED_LEN + self.name.len() + 4);
        bytes.extend_from_slice(&SECTION_TAG);
        bytes.push(self.name.len() as u8);
        bytes.extend_from_slice(&[0; 3]);
        bytes.extend_from_slice(&self.version.to_le_bytes());
        bytes.extend_from_slice(&self.padding.to_le_bytes());
        bytes.extend_from_slice(&self.payload_len.to_le_bytes());
        bytes.extend_from_slice(self.name.as_bytes());
        let sum = checksum(&bytes);
        bytes.extend_from_slice(&sum.to_le_bytes());
        bytes
    }

    /// The name's length from the fixed part (which starts with [`SECTION_TAG`]).
    pub fn name_len(fixed: &[u8; RECORD_FIXED_LEN]) -> usize {
        fixed[4] as usize
    }

    /// Parses a header whose checksum has been verified: `fixed` is the fixed part, `name` the name's bytes.
    /// `Err` is the problem with it.
    pub fn decode(fixed: &[u8; RECORD_FIXED_LEN], name: &[u8]) -> std::result::Result<Self, String> {
        if fixed[5..8] != [0; 3] {
            return Err(format!("reserved bytes of a section record are {:02x?}, not zero", &fixed[5..8]));
        }
        let name = match std::str::from_utf8(name) {
            Ok(name) if check_name(name).is_ok() => name.to_owned(),
            _ => return Err(format!("invalid section name {:?}", String::from_utf8_lossy(name))),
        };
        let padding = le_u32(fixed, 12);
        if padding > MAX_PADDING {
            return Err(format!("section {name:?} has {padding} bytes of padding, more than {MAX_PADDING}"));
        }
        Ok(RecordHeader { name, version: le_u32(fixed, 8), padding, payload_len: le_u64(fixed, 16) })
    }
}

/// The end record: the number of sections before it, so that a file missing a whole record is not taken as
/// complete.
pub(crate) fn encode_end(sections: u32) -> [u8; END_RECORD_LEN] {
    let mut bytes = [0; END_RECORD_LEN];
    bytes[..4].copy_from_slice(&END_TAG);
    bytes[4..8].copy_from_slice(&sections.to_le_bytes());
    let sum = checksum(&bytes[..8]);
    bytes[8..].copy_from_slice(&sum.to_le_bytes());
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed_and_name(bytes: &[u8]) -> ([u8; RECORD_FIXED_LEN], &[u8]) {
        let mut fixed = [0; RECORD_FIXED_LEN];
        fixed.copy_from_slice(&bytes[..RECORD_FIXED_LEN]);
        let name_len = RecordHeader::name_len(&fixed);
        (fixed, &bytes[RECORD_FIXED_LEN..RECORD_FIXED_LEN + name_len])
    }

    #[test]
    fn a_record_header_decodes_to_what_was_encoded() {
        let header = RecordHeader { name: "vcpu.3".into(), version: 7, padding: 4000, payload_len: 1 << 40 };
        let bytes = header.encode();
        assert_eq!(bytes.len(), RECORD_FIXED_LEN + 6 + 4);
        let (fixed, name) = fixed_and_name(&bytes);
        assert_eq!(RecordHeader::decode(&fixed, name).unwrap(), header);
        let body = &bytes[..bytes.len() - 4];
        assert_eq!(le_u32(&bytes, body.len()), checksum(body));
    }

    #[test]
    fn integers_are_little_endian_on_every_host() {
        let bytes = RecordHeader { name: "a".into(), version: 0x0102_0304, padding: 0, payload_len: 0x0506 }.encode();
        assert_eq!(&bytes[8..12], &[4, 3, 2, 1]);
        assert_eq!(&bytes[16..24], &[6, 5, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&encode_preamble(1, 0x100)[8..], &[1, 0, 0, 0, 0, 1, 0, 0]);
    }

    #[test]
    fn a_record_header_with_bad_fields_is_refused() {
        let good = RecordHeader { name: "serial".into(), version: 1, padding: 0, payload_len: 3 }.encode();
        let (fixed, name) = fixed_and_name(&good);

        let mut reserved = fixed;
        reserved[6] = 1;
        assert!(RecordHeader::decode(&reserved, name).unwrap_err().contains("reserved"));

        let mut padded = fixed;
        padded[12..16].copy_from_slice(&(MAX_PADDING + 1).to_le_bytes());
        assert!(RecordHeader::decode(&padded, name).unwrap_err().contains("padding"));

        assert!(RecordHeader::decode(&fixed, b"seri al").unwrap_err().contains("invalid section name"));
        assert!(RecordHeader::decode(&fixed, &[0xff, 0xfe]).unwrap_err().contains("invalid section name"));
    }

    #[test]
    fn names_are_short_and_plain() {
        for good in ["cmos", "vcpu.0", "virtio-blk:disk0", "pci_0.3", &"x".repeat(MAX_NAME_LEN)] {
            check_name(good).unwrap();
        }
        for bad in ["", "a b", "tab\there", "é", "new\nline", "a/b", &"x".repeat(MAX_NAME_LEN + 1)] {
            assert!(matches!(check_name(bad), Err(Error::InvalidName { .. })), "{bad:?}");
        }
    }

    #[test]
    fn the_end_record_checksums_its_count() {
        let end = encode_end(5);
        assert_eq!(&end[..4], &END_TAG);
        assert_eq!(le_u32(&end, 4), 5);
        assert_eq!(le_u32(&end, 8), checksum(&end[..8]));
    }
}

//! Writing a snapshot: a stream, front to back, so that any `Write` will do (a file, a pipe, a passed fd).

use std::collections::BTreeSet;
use std::io::Write;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::header::Header;
use crate::memory::{GuestRegion, MemoryStats, PageMap};
use crate::record::{self, checksum, RecordHeader, MAX_HEADER_LEN};
use crate::{FORMAT_VERSION, MEMORY_MAP_SECTION, MEMORY_PAGES_SECTION, MEMORY_SECTION_VERSION};

/// Writes a snapshot to `W`: the header first ([`Writer::new`]), then one section per component
/// ([`Writer::state`]) and guest memory ([`Writer::memory`]) in any order, then [`Writer::finish`].
///
/// Writes go straight to `W`; give it a `BufWriter` when `W` is a file. The snapshot's page-aligned offsets
/// count from the first byte written, so a file that is to be mapped at restore must be written from its start.
/// After an error the output is not a snapshot: discard it.
pub struct Writer<W: Write> {
    out: W,
    written: u64,
    names: BTreeSet<String>,
    sections: u32,
}

impl<W: Write> Writer<W> {
    /// Starts a snapshot: writes the preamble and `header`.
    pub fn new(out: W, header: &Header) -> Result<Self> {
        let json = serde_json::to_vec(header).map_err(|e| Error::InvalidHeader(e.to_string()))?;
        let header_len = u32::try_from(json.len())
            .ok()
            .filter(|&len| len <= MAX_HEADER_LEN)
            .ok_or_else(|| Error::InvalidHeader(format!("{} bytes of JSON, more than {MAX_HEADER_LEN}", json.len())))?;
        let mut bytes = record::encode_preamble(FORMAT_VERSION, header_len).to_vec();
        bytes.extend_from_slice(&json);
        let sum = checksum(&bytes);
        bytes.extend_from_slice(&sum.to_le_bytes());
        let mut writer = Writer { out, written: 0, names: BTreeSet::new(), sections: 0 };
        writer.write(&bytes)?;
        Ok(writer)
    }

    /// Writes one component's state as the section `name` at `version` (the version of that state's shape, which
    /// the reader checks against the versions it knows).
    pub fn state<T: Serialize + ?Sized>(&mut self, name: &str, version: u32, state: &T) -> Result<()> {
        if name == MEMORY_MAP_SECTION || name == MEMORY_PAGES_SECTION {
            return Err(Error::InvalidName { name: name.into(), problem: "the format reserves it for guest memory" });
        }
        let payload = serde_json::to_vec(state).map_err(|e| Error::BadState {
            name: name.into(),
            version,
            problem: format!("cannot be serialised: {e}"),
        })?;
        self.section(name, version, 1, &payload)
    }

    /// Writes guest memory: the page map, then every page that is not all zero, starting at a file offset that is
    /// a multiple of `page_size`. `regions` in ascending address order, each a whole number of pages.
    pub fn memory(&mut self, page_size: u32, regions: &[GuestRegion<'_>]) -> Result<MemoryStats> {
        let map = PageMap::scan(page_size, regions)?;
        self.section(MEMORY_MAP_SECTION, MEMORY_SECTION_VERSION, 1, &map.encode())?;

        let page = page_size as usize;
        let stored_pages = map.stored_pages();
        self.begin_section(
            MEMORY_PAGES_SECTION,
            MEMORY_SECTION_VERSION,
            u64::from(page_size),
            stored_pages * page as u64,
        )?;
        let mut sum = crc32fast::Hasher::new();
        for run in map.runs() {
            let start = run.first_page as usize * page;
            let bytes = &regions[run.region].bytes[start..start + run.pages as usize * page];
            sum.update(bytes);
            self.write(bytes)?;
        }
        self.write(&sum.finalize().to_le_bytes())?;
        Ok(MemoryStats { pages: map.pages(), stored_pages })
    }

    /// Ends the snapshot with its end record and flushes `W`, which it gives back. A snapshot without guest
    /// memory is refused: no reader would take it.
    pub fn finish(mut self) -> Result<W> {
        if !self.names.contains(MEMORY_PAGES_SECTION) {
            return Err(Error::MissingSection { name: MEMORY_PAGES_SECTION.into() });
        }
        let end = record::encode_end(self.sections);
        self.write(&end)?;
        let offset = self.written;
        self.out.flush().map_err(|source| Error::Io { offset, source })?;
        Ok(self.out)
    }

    fn section(&mut self, name: &str, version: u32, align: u64, payload: &[u8]) -> Result<()> {
        self.begin_section(name, version, align, payload.len() as u64)?;
        self.write(payload)?;
        self.write(&checksum(payload).to_le_bytes())
    }

    /// Writes a section record's header and the padding that puts its payload at a multiple of `align`.
    fn begin_section(&mut self, name: &str, version: u32, align: u64, payload_len: u64) -> Result<()> {
        record::check_name(name)?;
        if self.names.contains(name) {
            return Err(Error::DuplicateSection { name: name.into() });
        }
        let unpadded = self.written + record::RECORD_FIXED_LEN as u64 + name.len() as u64 + record::CHECKSUM_LEN;
        let padding = unpadded.next_multiple_of(align) - unpadded;
        let header = RecordHeader { name: name.into(), version, padding: padding as u32, payload_len };
        self.write(&header.encode())?;
        self.write(&vec![0; padding as usize])?;
        self.names.insert(name.into());
        self.sections += 1;
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let offset = self.written;
        self.out.write_all(bytes).map_err(|source| Error::Io { offset, source })?;
        self.written += bytes.len() as u64;
        Ok(())
    }
}

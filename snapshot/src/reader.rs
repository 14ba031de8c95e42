//! Reading a snapshot: everything in the file is checked against its checksums and against the machine that is to
//! run it before any of it is handed out.

use std::collections::BTreeMap;
use std::io::{self, Read, Seek, SeekFrom};
use std::ops::RangeInclusive;

use serde::de::DeserializeOwned;

use crate::error::{escape_controls, Error, Result};
use crate::header::{CpuIdentity, Header};
use crate::memory::{check_layout_matches, GuestRegion, GuestRegionMut, MemoryImage, PageMap, RegionLayout};
use crate::record::{
    checksum, le_u32, RecordHeader, CHECKSUM_LEN, END_RECORD_LEN, END_TAG, MAGIC, MAX_HEADER_LEN, PREAMBLE_LEN,
    RECORD_FIXED_LEN, SECTION_TAG,
};
use crate::{
    FORMAT_VERSION, MAX_SECTION_LEN, MEMORY_MAP_SECTION, MEMORY_PAGES_SECTION, MEMORY_SECTION_VERSION,
    OLDEST_FORMAT_VERSION,
};

/// A section the restoring machine has a component for, and the versions of its state that it reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SectionSpec {
    pub name: String,
    pub versions: RangeInclusive<u32>,
    /// A required section missing from the file refuses the snapshot; an optional one is the component's
    /// business (it keeps its state from construction).
    pub required: bool,
}

impl SectionSpec {
    pub fn required(name: impl Into<String>, versions: RangeInclusive<u32>) -> Self {
        SectionSpec { name: name.into(), versions, required: true }
    }

    pub fn optional(name: impl Into<String>, versions: RangeInclusive<u32>) -> Self {
        SectionSpec { name: name.into(), versions, required: false }
    }
}

/// What the restoring machine is: a snapshot that does not fit it is refused before anything is built from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected {
    /// This host's architecture (`std::env::consts::ARCH`).
    pub arch: String,
    /// The machine type on the command line.
    pub machine: String,
    /// What this host's CPU offers a guest.
    pub cpu: CpuIdentity,
    /// Guest memory as the command line lays it out.
    pub memory: Vec<RegionLayout>,
    /// One entry per component that has state; a section for anything else is refused.
    pub sections: Vec<SectionSpec>,
}

/// A snapshot whose framing, checksums, header and sections have been checked: the states are in memory, the
/// guest's pages are still in the file (see [`Snapshot::read_memory_into`] and [`MemoryImage::extents`]).
pub struct Snapshot<R> {
    source: R,
    file_len: u64,
    header: Header,
    sections: BTreeMap<String, StoredSection>,
    memory: MemoryImage,
    verify_checksums: bool,
}

struct StoredSection {
    version: u32,
    payload: Vec<u8>,
}

/// One component's section.
#[derive(Clone, Copy, Debug)]
pub struct Section<'a> {
    name: &'a str,
    version: u32,
    payload: &'a [u8],
}

impl Section<'_> {
    /// The version of the state's shape that the writer used; one of those the [`SectionSpec`] allowed.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The state, decoded as `T`: the shape this Kestrel has for [`version`](Section::version).
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(self.payload).map_err(|e| Error::BadState {
            name: self.name.into(),
            version: self.version,
            problem: escape_controls(&e.to_string()),
        })
    }
}

/// Where a snapshot comes from: a file, whose length is known and whose pages can be skipped (and read again
/// later), or a stream (a pipe), read once front to back.
trait Source: Read {
    /// Moves from `pos` to `pos + len`, past bytes that are not needed now.
    fn advance(&mut self, pos: u64, len: u64) -> io::Result<()>;
}

impl<R: Read + Seek> Source for R {
    fn advance(&mut self, pos: u64, len: u64) -> io::Result<()> {
        self.seek(SeekFrom::Start(pos + len)).map(drop)
    }
}

/// A source that can only be read front to back, once.
struct Stream<R>(R);

impl<R: Read> Read for Stream<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl<R: Read> Source for Stream<R> {
    fn advance(&mut self, _: u64, len: u64) -> io::Result<()> {
        let skipped = io::copy(&mut (&mut self.0).take(len), &mut io::sink())?;
        match skipped == len {
            true => Ok(()),
            false => Err(io::ErrorKind::UnexpectedEof.into()),
        }
    }
}

/// The reader's position in the input, with every read checked against the input's length first when it has one.
/// A stream's length is what arrives: a read past its end is [`Error::Truncated`] at the byte where it ended,
/// and no read allocates more than has arrived.
struct Input<'a, R> {
    source: &'a mut R,
    pos: u64,
    /// `None` for a stream.
    file_len: Option<u64>,
}

impl<R: Source> Input<'_, R> {
    /// What is left of a file; a stream's remainder is unknown, taken as unbounded.
    fn remaining(&self) -> u64 {
        self.file_len.map_or(u64::MAX - self.pos, |len| len - self.pos)
    }

    fn truncated(&self, what: String, ends_at: u64) -> Error {
        Error::Truncated { what, file_len: self.file_len.unwrap_or(ends_at) }
    }

    fn io(&self, source: io::Error) -> Error {
        if source.kind() == io::ErrorKind::UnexpectedEof {
            // The file shrank under us (what the length check allowed is not there), or the stream ended.
            self.truncated("the file as it was opened".into(), self.pos)
        } else {
            Error::Io { offset: self.pos, source }
        }
    }

    fn read(&mut self, len: u64, what: impl FnOnce() -> String) -> Result<Vec<u8>> {
        if len > self.remaining() {
            return Err(self.truncated(what(), self.pos));
        }
        // Grown as bytes arrive rather than allocated up front: a stream's length fields are not checked against
        // anything yet.
        let mut bytes = Vec::new();
        (&mut *self.source).take(len).read_to_end(&mut bytes).map_err(|e| self.io(e))?;
        if (bytes.len() as u64) < len {
            return Err(self.truncated(what(), self.pos + bytes.len() as u64));
        }
        self.pos += len;
        Ok(bytes)
    }

    /// Up to `len` bytes: fewer only where the input ends.
    fn read_up_to(&mut self, len: u64) -> Result<Vec<u8>> {
        let mut bytes = Vec::new();
        (&mut *self.source).take(len).read_to_end(&mut bytes).map_err(|e| self.io(e))?;
        self.pos += bytes.len() as u64;
        Ok(bytes)
    }

    /// Fills `buf` whole: a stream that ends first is [`Error::Truncated`] at the byte where it ended.
    fn read_exact(&mut self, buf: &mut [u8], what: impl FnOnce() -> String) -> Result<()> {
        let mut filled = 0;
        while filled < buf.len() {
            match self.source.read(&mut buf[filled..]) {
                Ok(0) => return Err(self.truncated(what(), self.pos + filled as u64)),
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::Io { offset: self.pos + filled as u64, source: e }),
            }
        }
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn skip(&mut self, len: u64) -> Result<()> {
        self.source.advance(self.pos, len).map_err(|e| self.io(e))?;
        self.pos += len;
        Ok(())
    }
}

/// Copies the stored pages, `input` at their first byte, into `regions` as `map` places them; returns their
/// checksum.
fn load_pages<R: Source>(input: &mut Input<'_, R>, map: &PageMap, regions: &mut [GuestRegionMut<'_>]) -> Result<u32> {
    let page = map.page_size as usize;
    let mut sum = crc32fast::Hasher::new();
    for run in map.runs() {
        let start = run.first_page as usize * page;
        let pages = &mut regions[run.region].bytes[start..start + run.pages as usize * page];
        input.read_exact(pages, || "the guest memory pages".into())?;
        sum.update(pages);
    }
    Ok(sum.finalize())
}

/// A snapshot read from a stream in one pass ([`read_stream`]): its guest memory is already loaded, its states
/// are checked and held here.
pub struct StreamedSnapshot {
    header: Header,
    sections: BTreeMap<String, StoredSection>,
}

impl StreamedSnapshot {
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The section `name`: [`Error::MissingSection`] if the stream had none (only possible for an optional one).
    pub fn section(&self, name: &str) -> Result<Section<'_>> {
        find_section(&self.sections, name)
    }

    /// The state in section `name`, decoded as `T`.
    pub fn state<T: DeserializeOwned>(&self, name: &str) -> Result<T> {
        self.section(name)?.decode()
    }

    /// The names of the component sections the stream held, in name order.
    pub fn section_names(&self) -> impl Iterator<Item = &str> {
        self.sections.keys().map(String::as_str)
    }
}

/// Reads a snapshot from `source` front to back, once, without seeking (a pipe, a socket, a file from where it
/// stands): the framing, checksums, header and sections are checked as for [`Snapshot::open`], and the stored
/// pages are copied into `regions` as they arrive. Besides guest memory it holds only the states (each at most
/// [`MAX_SECTION_LEN`]) and the page map. `regions` must hold zeros and match `expected.memory`.
///
/// Reading stops at the end record: what may follow it in the stream is not read. On `Err` the regions may hold
/// part of the pages: the guest must not run on them.
pub fn read_stream<R: Read>(
    source: R,
    expected: &Expected,
    regions: &mut [GuestRegionMut<'_>],
) -> Result<StreamedSnapshot> {
    let layout: Vec<RegionLayout> =
        regions.iter().map(|r| RegionLayout { guest_addr: r.guest_addr, size: r.bytes.len() as u64 }).collect();
    check_layout_matches(&expected.memory, &layout)?;
    let mut source = Stream(source);
    let mut pass = Pass {
        input: Input { source: &mut source, pos: 0, file_len: None },
        expected,
        verify_checksums: true,
        sections: BTreeMap::new(),
        map: None,
        memory: None,
        load_into: Some(regions),
        count: 0,
    };
    let header = pass.header()?;
    while pass.record()? {}
    let (sections, _) = pass.finish()?;
    Ok(StreamedSnapshot { header, sections })
}

fn find_section<'a>(sections: &'a BTreeMap<String, StoredSection>, name: &str) -> Result<Section<'a>> {
    match sections.get_key_value(name) {
        Some((name, stored)) => Ok(Section { name, version: stored.version, payload: &stored.payload }),
        None => Err(Error::MissingSection { name: name.into() }),
    }
}

impl<R: Read + Seek> Snapshot<R> {
    /// Reads and checks everything in `source` but the guest's pages (their length and place are checked; their
    /// checksum is checked as they are read). Refuses a snapshot that does not fit `expected`.
    pub fn open(source: R, expected: &Expected) -> Result<Self> {
        Self::open_with(source, expected, true)
    }

    /// `open`, with the checksums checked or not: the fuzz target reads both ways, so that mutated files get past
    /// the checksums into the parsing behind them. Nothing else may skip them.
    pub(crate) fn open_with(mut source: R, expected: &Expected, verify_checksums: bool) -> Result<Self> {
        let file_len = source.seek(SeekFrom::End(0)).map_err(|source| Error::Io { offset: 0, source })?;
        source.seek(SeekFrom::Start(0)).map_err(|source| Error::Io { offset: 0, source })?;
        let mut pass = Pass {
            input: Input { source: &mut source, pos: 0, file_len: Some(file_len) },
            expected,
            verify_checksums,
            sections: BTreeMap::new(),
            map: None,
            memory: None,
            load_into: None,
            count: 0,
        };
        let header = pass.header()?;
        while pass.record()? {}
        let (sections, memory) = pass.finish()?;
        Ok(Snapshot { source, file_len, header, sections, memory, verify_checksums })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The section `name`: [`Error::MissingSection`] if the file has none (only possible for an optional one).
    pub fn section(&self, name: &str) -> Result<Section<'_>> {
        find_section(&self.sections, name)
    }

    /// The state in section `name`, decoded as `T` whatever its version (see [`Section::version`] when a
    /// component reads more than one).
    pub fn state<T: DeserializeOwned>(&self, name: &str) -> Result<T> {
        self.section(name)?.decode()
    }

    /// The names of the component sections the file holds, in name order.
    pub fn section_names(&self) -> impl Iterator<Item = &str> {
        self.sections.keys().map(String::as_str)
    }

    /// Where guest memory is in the file, to map it from there.
    pub fn memory(&self) -> &MemoryImage {
        &self.memory
    }

    /// Copies the stored pages into `regions` (which must hold zeros: other pages are not written) and checks
    /// their checksum. On `Err` the regions hold part of the pages: the guest must not run on them.
    ///
    /// Runs of pages are read one `read_exact` each: over a file, give [`Snapshot::open`] a `BufReader` with a
    /// large buffer (1 MiB copied scattered pages twice as fast as the default 8 KiB).
    pub fn read_memory_into(&mut self, regions: &mut [GuestRegionMut<'_>]) -> Result<()> {
        let layout: Vec<RegionLayout> =
            regions.iter().map(|r| RegionLayout { guest_addr: r.guest_addr, size: r.bytes.len() as u64 }).collect();
        check_layout_matches(&self.memory.map.regions, &layout)?;
        let Snapshot { source, file_len, memory, .. } = self;
        let mut input = Input { source, pos: 0, file_len: Some(*file_len) };
        input.skip(memory.data_offset)?;
        let sum = load_pages(&mut input, &memory.map, regions)?;
        self.check_memory_checksum(sum)
    }

    /// Reads the stored pages through and checks their checksum, copying nothing: for a restore that maps guest
    /// memory from the file and wants the pages checked first.
    pub fn verify_memory(&mut self) -> Result<()> {
        let Snapshot { source, file_len, memory, .. } = self;
        let mut input = Input { source, pos: 0, file_len: Some(*file_len) };
        input.skip(memory.data_offset)?;
        let mut left = memory.stored_pages * u64::from(memory.map.page_size);
        let mut sum = crc32fast::Hasher::new();
        let mut chunk = vec![0; (1 << 20).min(left) as usize];
        while left > 0 {
            let bytes = &mut chunk[..left.min(1 << 20) as usize];
            input.read_exact(bytes, || "the guest memory pages".into())?;
            sum.update(bytes);
            left -= bytes.len() as u64;
        }
        self.check_memory_checksum(sum.finalize())
    }

    /// Checks the stored pages' checksum against guest memory as it now is, for a restore that mapped the pages
    /// from the file (or copied them itself) along [`MemoryImage::extents`]: reading through such a mapping takes
    /// the pages from the file, so a corrupted page is refused here before the guest runs. It cannot say anything
    /// about the file's later changes: see the caller.
    pub fn check_memory(&self, regions: &[GuestRegion<'_>]) -> Result<()> {
        let layout: Vec<RegionLayout> =
            regions.iter().map(|r| RegionLayout { guest_addr: r.guest_addr, size: r.bytes.len() as u64 }).collect();
        check_layout_matches(&self.memory.map.regions, &layout)?;
        let mut sum = crc32fast::Hasher::new();
        for extent in self.memory.extents() {
            let region = regions
                .iter()
                .find(|r| (r.guest_addr..r.guest_addr + r.bytes.len() as u64).contains(&extent.guest_addr))
                .expect("extents lie in the layout checked above");
            let start = (extent.guest_addr - region.guest_addr) as usize;
            sum.update(&region.bytes[start..start + extent.len as usize]);
        }
        self.check_memory_checksum(sum.finalize())
    }

    /// The source, to map guest memory from it.
    pub fn get_ref(&self) -> &R {
        &self.source
    }

    fn check_memory_checksum(&self, sum: u32) -> Result<()> {
        if sum != self.memory.data_checksum && self.verify_checksums {
            return Err(Error::Corrupted { what: "the guest memory pages".into(), offset: self.memory.data_offset });
        }
        Ok(())
    }

    /// The source, for a restore that maps guest memory from it.
    pub fn into_inner(self) -> R {
        self.source
    }
}

/// One reading of a file or stream, front to back: where it is and what it has found.
struct Pass<'a, 'r, 'm, R> {
    input: Input<'a, R>,
    expected: &'a Expected,
    verify_checksums: bool,
    sections: BTreeMap<String, StoredSection>,
    /// The page map and its offset, once its section is read.
    map: Option<(PageMap, u64)>,
    memory: Option<MemoryImage>,
    /// Where a stream's pages go as they arrive; `None`: the pages are skipped, to be read or mapped later.
    load_into: Option<&'r mut [GuestRegionMut<'m>]>,
    count: u32,
}

impl<R: Source> Pass<'_, '_, '_, R> {
    fn check_sum(&self, sum_ok: bool, what: &str, offset: u64) -> Result<()> {
        match sum_ok || !self.verify_checksums {
            true => Ok(()),
            false => Err(Error::Corrupted { what: what.into(), offset }),
        }
    }

    /// The preamble and the header: magic and format version are checked before anything else is believed, the
    /// header against the machine before any section is read.
    fn header(&mut self) -> Result<Header> {
        let header = read_preamble_and_header(&mut self.input, self.verify_checksums)?;
        check_header(&header, self.expected)?;
        Ok(header)
    }

    /// Reads one record: `Ok(false)` after the end record.
    fn record(&mut self) -> Result<bool> {
        let record_at = self.input.pos;
        let tag = self.input.read_up_to(4)?;
        if tag.len() < 4 {
            return Err(self.input.truncated("the snapshot (it has no end record)".into(), self.input.pos));
        }
        if tag == END_TAG {
            self.end_record(record_at)?;
            return Ok(false);
        }
        if tag != SECTION_TAG {
            return Err(Error::Malformed {
                offset: record_at,
                problem: format!("expected a section or the end record, found the bytes {tag:02x?}"),
            });
        }
        let record = self.record_header(record_at)?;
        self.count = self.count.saturating_add(1);
        self.check_record(&record)?;

        let name = record.name.as_str();
        let padding = self.input.read(u64::from(record.padding), || format!("the padding of section {name:?}"))?;
        if padding.iter().any(|&b| b != 0) {
            return Err(Error::Malformed {
                offset: self.input.pos - padding.len() as u64,
                problem: format!("the padding before section {name:?} is not zero"),
            });
        }
        let payload_at = self.input.pos;
        if name != MEMORY_PAGES_SECTION && record.payload_len > MAX_SECTION_LEN {
            return Err(Error::SectionTooLarge { name: name.into(), length: record.payload_len, max: MAX_SECTION_LEN });
        }
        if let Some(file_len) = self.input.file_len {
            if record.payload_len.saturating_add(CHECKSUM_LEN) > self.input.remaining() {
                return Err(Error::SectionBeyondFile {
                    name: name.into(),
                    offset: payload_at,
                    length: record.payload_len,
                    file_len,
                });
            }
        }
        match name {
            MEMORY_PAGES_SECTION => self.pages(&record, record_at)?,
            _ => self.payload(record, payload_at)?,
        }
        Ok(true)
    }

    /// The end record: its count of sections must be the file's, and nothing may follow it.
    fn end_record(&mut self, record_at: u64) -> Result<()> {
        let end = self.input.read(END_RECORD_LEN as u64 - 4, || "the end record".into())?;
        let mut summed = END_TAG.to_vec();
        summed.extend_from_slice(&end[..4]);
        self.check_sum(checksum(&summed) == le_u32(&end, 4), "the end record", record_at)?;
        let counted = le_u32(&end, 0);
        if counted != self.count {
            return Err(Error::Malformed {
                offset: record_at,
                problem: format!("the end record counts {counted} sections; the file holds {}", self.count),
            });
        }
        // A stream ends at its end record; a file must end there too.
        if self.input.file_len.is_some() && self.input.remaining() > 0 {
            return Err(Error::TrailingData { count: self.input.remaining() });
        }
        Ok(())
    }

    /// A section record's header, its tag already read.
    fn record_header(&mut self, record_at: u64) -> Result<RecordHeader> {
        let what = || format!("the section record at byte {record_at}");
        let mut fixed = [0; RECORD_FIXED_LEN];
        fixed[..4].copy_from_slice(&SECTION_TAG);
        fixed[4..].copy_from_slice(&self.input.read(RECORD_FIXED_LEN as u64 - 4, what)?);
        let name_and_sum = self.input.read(RecordHeader::name_len(&fixed) as u64 + CHECKSUM_LEN, what)?;
        let (name, sum) = name_and_sum.split_at(name_and_sum.len() - CHECKSUM_LEN as usize);
        let mut summed = fixed.to_vec();
        summed.extend_from_slice(name);
        self.check_sum(checksum(&summed) == le_u32(sum, 0), &what(), record_at)?;
        RecordHeader::decode(&fixed, name).map_err(|problem| Error::Malformed { offset: record_at, problem })
    }

    /// What the record is, before its payload is read: a duplicate, a section nobody asked for, a version this
    /// Kestrel does not read.
    fn check_record(&self, record: &RecordHeader) -> Result<()> {
        let name = record.name.as_str();
        let seen = self.sections.contains_key(name)
            || (name == MEMORY_MAP_SECTION && self.map.is_some())
            || (name == MEMORY_PAGES_SECTION && self.memory.is_some());
        if seen {
            return Err(Error::DuplicateSection { name: name.into() });
        }
        let versions = match name {
            MEMORY_MAP_SECTION | MEMORY_PAGES_SECTION => MEMORY_SECTION_VERSION..=MEMORY_SECTION_VERSION,
            _ => match self.expected.sections.iter().find(|spec| spec.name == name) {
                Some(spec) => spec.versions.clone(),
                None => return Err(Error::UnknownSection { name: name.into() }),
            },
        };
        if !versions.contains(&record.version) {
            return Err(Error::SectionVersion {
                name: name.into(),
                found: record.version,
                oldest: *versions.start(),
                newest: *versions.end(),
            });
        }
        Ok(())
    }

    /// The guest's pages: their length and place are checked against the map, and they are skipped, not read.
    fn pages(&mut self, record: &RecordHeader, record_at: u64) -> Result<()> {
        let payload_at = self.input.pos;
        let Some((map, map_at)) = self.map.as_ref() else {
            return Err(Error::Malformed {
                offset: record_at,
                problem: format!("guest memory pages come before their map (section {MEMORY_MAP_SECTION:?})"),
            });
        };
        let page = u64::from(map.page_size);
        let stored_pages = map.stored_pages();
        if record.payload_len != stored_pages * page {
            return Err(Error::Malformed {
                offset: record_at,
                problem: format!(
                    "{} bytes of guest memory pages where the map (at byte {map_at}) marks {stored_pages} pages of \
                     {page} bytes",
                    record.payload_len
                ),
            });
        }
        if !payload_at.is_multiple_of(page) {
            return Err(Error::Malformed {
                offset: payload_at,
                problem: format!("guest memory pages start at byte {payload_at}, not on a {page}-byte page"),
            });
        }
        let map = map.clone();
        let loaded_sum = match self.load_into.as_deref_mut() {
            Some(regions) => Some(load_pages(&mut self.input, &map, regions)?),
            None => {
                self.input.skip(record.payload_len)?;
                None
            }
        };
        let sum = le_u32(&self.input.read(CHECKSUM_LEN, || "the guest memory pages' checksum".into())?, 0);
        if let Some(loaded_sum) = loaded_sum {
            self.check_sum(loaded_sum == sum, "the guest memory pages", payload_at)?;
        }
        self.memory = Some(MemoryImage { map, stored_pages, data_offset: payload_at, data_checksum: sum });
        Ok(())
    }

    /// A payload read whole and checked against its checksum: the page map, or a component's state.
    fn payload(&mut self, record: RecordHeader, payload_at: u64) -> Result<()> {
        let name = record.name;
        let mut payload = self.input.read(record.payload_len + CHECKSUM_LEN, || format!("section {name:?}"))?;
        let sum = le_u32(&payload, record.payload_len as usize);
        payload.truncate(record.payload_len as usize);
        self.check_sum(checksum(&payload) == sum, &format!("section {name:?}"), payload_at)?;
        if name == MEMORY_MAP_SECTION {
            self.map = Some((PageMap::decode(&payload, payload_at, &self.expected.memory)?, payload_at));
        } else {
            self.sections.insert(name, StoredSection { version: record.version, payload });
        }
        Ok(())
    }

    /// What the file held, once the end record is read: guest memory and every required section must be there.
    fn finish(self) -> Result<(BTreeMap<String, StoredSection>, MemoryImage)> {
        let Some(memory) = self.memory else {
            let name = if self.map.is_none() { MEMORY_MAP_SECTION } else { MEMORY_PAGES_SECTION };
            return Err(Error::MissingSection { name: name.into() });
        };
        let sections = self.sections;
        if let Some(spec) = self.expected.sections.iter().find(|s| s.required && !sections.contains_key(&s.name)) {
            return Err(Error::MissingSection { name: spec.name.clone() });
        }
        Ok((sections, memory))
    }
}

/// The preamble and the header, `input` at the file's first byte: magic and format version are checked before
/// anything else is believed, then the header's checksum (unless `verify_checksums` is off, for the fuzz target).
fn read_preamble_and_header<R: Source>(input: &mut Input<'_, R>, verify_checksums: bool) -> Result<Header> {
    let start = input.read_up_to(PREAMBLE_LEN as u64)?;
    let magic_len = start.len().min(MAGIC.len());
    if start[..magic_len] != MAGIC[..magic_len] {
        return Err(Error::BadMagic);
    }
    if start.len() < PREAMBLE_LEN {
        return Err(input.truncated("the preamble".into(), input.pos));
    }
    let (found, oldest, newest) = (le_u32(&start, 8), OLDEST_FORMAT_VERSION, FORMAT_VERSION);
    if found > newest {
        return Err(Error::FormatTooNew { found, oldest, newest });
    }
    if found < oldest {
        return Err(Error::FormatTooOld { found, oldest, newest });
    }
    let header_len = le_u32(&start, 12);
    if header_len > MAX_HEADER_LEN {
        return Err(Error::Malformed {
            offset: 12,
            problem: format!("a {header_len}-byte header is longer than {MAX_HEADER_LEN} bytes"),
        });
    }
    let mut header_bytes = input.read(u64::from(header_len) + CHECKSUM_LEN, || "the header".into())?;
    let sum = le_u32(&header_bytes, header_len as usize);
    header_bytes.truncate(header_len as usize);
    let mut summed = start;
    summed.extend_from_slice(&header_bytes);
    if checksum(&summed) != sum && verify_checksums {
        return Err(Error::Corrupted { what: "the header".into(), offset: 0 });
    }
    serde_json::from_slice(&header_bytes).map_err(|e| Error::Malformed {
        offset: PREAMBLE_LEN as u64,
        problem: format!("header: {}", escape_controls(&e.to_string())),
    })
}

/// What a snapshot says it is: its header, with the magic, format version and the header's checksum checked, and
/// nothing checked against a machine or read past the header. For tools and tests that look at a file before (or
/// instead of) restoring it; a restore checks the header again in [`Snapshot::open`] or [`read_stream`].
pub fn read_header<R: Read>(source: R) -> Result<Header> {
    let mut source = Stream(source);
    read_preamble_and_header(&mut Input { source: &mut source, pos: 0, file_len: None }, true)
}

/// Refuses a snapshot made for another host or machine: architecture, machine type, then the CPU.
fn check_header(header: &Header, expected: &Expected) -> Result<()> {
    if header.arch != expected.arch {
        return Err(Error::ForeignArchitecture { snapshot: header.arch.clone(), host: expected.arch.clone() });
    }
    if header.machine != expected.machine {
        return Err(Error::WrongMachine { snapshot: header.machine.clone(), expected: expected.machine.clone() });
    }
    expected.cpu.check_can_run(&header.cpu)
}

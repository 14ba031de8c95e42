//! The writer and the reader together: round trips, and each way a snapshot can be bad, refused as itself.

use std::io::{self, Cursor, Read, Write};

use serde::{Deserialize, Serialize};

use crate::record::{self, checksum, le_u32, RecordHeader, PREAMBLE_LEN, RECORD_FIXED_LEN, SECTION_TAG};
use crate::*;

const PAGE: usize = 4096;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Uart {
    lcr: u8,
    fifo: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Vcpu {
    regs: [u64; 4],
    xsave: Option<Vec<u8>>,
}

fn header() -> Header {
    Header {
        kestrel_version: "9.9.9".into(),
        arch: "x86_64".into(),
        machine: "pc".into(),
        cpu: CpuIdentity::new("GenuineIntel", ["sse2", "avx"]),
    }
}

fn uart() -> Uart {
    Uart { lcr: 3, fifo: b"hello".to_vec() }
}

fn vcpu(i: u64) -> Vcpu {
    Vcpu { regs: [i, 0x1000 + i, u64::MAX, 0], xsave: Some(vec![i as u8; 64]) }
}

/// 64 KiB of memory at 0 with two non-zero pages.
fn small_memory() -> Vec<u8> {
    let mut memory = vec![0u8; 16 * PAGE];
    memory[2 * PAGE + 10] = 0xaa;
    memory[9 * PAGE..10 * PAGE].fill(0x55);
    memory
}

fn expected(memory: &[(u64, usize)]) -> Expected {
    Expected {
        arch: "x86_64".into(),
        machine: "pc".into(),
        cpu: CpuIdentity::new("GenuineIntel", ["sse2", "avx", "avx2"]),
        memory: memory.iter().map(|&(guest_addr, size)| RegionLayout { guest_addr, size: size as u64 }).collect(),
        sections: vec![
            SectionSpec::required("uart", 1..=1),
            SectionSpec::required("vcpu.0", 1..=2),
            SectionSpec::optional("rng", 1..=1),
        ],
    }
}

/// A snapshot of `header()` with a uart, one vCPU and `small_memory()`.
fn small_snapshot() -> Vec<u8> {
    let memory = small_memory();
    let mut writer = Writer::new(Vec::new(), &header()).unwrap();
    writer.state("uart", 1, &uart()).unwrap();
    writer.state("vcpu.0", 2, &vcpu(0)).unwrap();
    writer.memory(PAGE as u32, &[GuestRegion { guest_addr: 0, bytes: &memory, populated: None }]).unwrap();
    writer.finish().unwrap()
}

fn small_expected() -> Expected {
    expected(&[(0, 16 * PAGE)])
}

fn open<'a>(bytes: &'a [u8], expected: &Expected) -> Result<Snapshot<Cursor<&'a [u8]>>> {
    Snapshot::open(Cursor::new(bytes), expected)
}

/// The error `bytes` is refused with; its message must be one line.
fn refusal(bytes: &[u8], expected: &Expected) -> Error {
    match open(bytes, expected) {
        Ok(_) => panic!("a bad snapshot was read"),
        Err(error) => {
            let message = error.to_string();
            assert!(!message.chars().any(char::is_control), "{message:?}");
            error
        }
    }
}

fn read_memory(snapshot: &mut Snapshot<Cursor<&[u8]>>, layout: &[(u64, usize)]) -> Result<Vec<Vec<u8>>> {
    let mut buffers: Vec<Vec<u8>> = layout.iter().map(|&(_, size)| vec![0u8; size]).collect();
    let mut regions: Vec<GuestRegionMut> =
        layout.iter().zip(&mut buffers).map(|(&(guest_addr, _), bytes)| GuestRegionMut { guest_addr, bytes }).collect();
    snapshot.read_memory_into(&mut regions)?;
    Ok(buffers)
}

/// A record of a well-formed snapshot: where it starts, its header, and its header's length in bytes.
struct Record {
    at: usize,
    header: RecordHeader,
    header_len: usize,
}

impl Record {
    fn len(&self) -> usize {
        self.header_len + self.header.padding as usize + self.header.payload_len as usize + 4
    }

    fn payload_at(&self) -> usize {
        self.at + self.header_len + self.header.padding as usize
    }
}

fn records(bytes: &[u8]) -> Vec<Record> {
    let mut at = PREAMBLE_LEN + le_u32(bytes, 12) as usize + 4;
    let mut found = Vec::new();
    while bytes[at..at + 4] == SECTION_TAG {
        let mut fixed = [0; RECORD_FIXED_LEN];
        fixed.copy_from_slice(&bytes[at..at + RECORD_FIXED_LEN]);
        let name_len = RecordHeader::name_len(&fixed);
        let header = RecordHeader::decode(&fixed, &bytes[at + RECORD_FIXED_LEN..][..name_len]).unwrap();
        let record = Record { at, header, header_len: RECORD_FIXED_LEN + name_len + 4 };
        at += record.len();
        found.push(record);
    }
    found
}

fn record(bytes: &[u8], name: &str) -> Record {
    records(bytes).into_iter().find(|r| r.header.name == name).unwrap()
}

/// Changes the header of section `name`'s record, with a checksum that matches the change.
fn rewrite_record(bytes: &mut Vec<u8>, name: &str, change: impl FnOnce(&mut RecordHeader)) {
    let record = record(bytes, name);
    let mut header = record.header.clone();
    change(&mut header);
    bytes.splice(record.at..record.at + record.header_len, header.encode());
}

/// Sets the end record's section count, with a matching checksum.
fn set_end_count(bytes: &mut [u8], count: u32) {
    let end = bytes.len() - 12;
    bytes[end + 4..end + 8].copy_from_slice(&count.to_le_bytes());
    let sum = checksum(&bytes[end..end + 8]);
    bytes[end + 8..].copy_from_slice(&sum.to_le_bytes());
}

/// Removes section `name`'s record and keeps the end record's count true.
fn remove_record(bytes: &mut Vec<u8>, name: &str) {
    let record = record(bytes, name);
    bytes.drain(record.at..record.at + record.len());
    let count = records(bytes).len() as u32;
    set_end_count(bytes, count);
}

/// Sets the preamble's format version, with a header checksum that matches it.
fn set_format_version(bytes: &mut [u8], version: u32) {
    bytes[8..12].copy_from_slice(&version.to_le_bytes());
    let header_end = PREAMBLE_LEN + le_u32(bytes, 12) as usize;
    let sum = checksum(&bytes[..header_end]);
    bytes[header_end..header_end + 4].copy_from_slice(&sum.to_le_bytes());
}

#[test]
fn states_and_memory_come_back_as_they_were_saved() {
    let bytes = small_snapshot();
    let mut snapshot = open(&bytes, &small_expected()).unwrap();
    assert_eq!(snapshot.header(), &header());
    assert_eq!(snapshot.section_names().collect::<Vec<_>>(), ["uart", "vcpu.0"]);
    assert_eq!(snapshot.state::<Uart>("uart").unwrap(), uart());
    let section = snapshot.section("vcpu.0").unwrap();
    assert_eq!(section.version(), 2);
    assert_eq!(section.decode::<Vcpu>().unwrap(), vcpu(0));
    assert_eq!(read_memory(&mut snapshot, &[(0, 16 * PAGE)]).unwrap(), [small_memory()]);
    snapshot.verify_memory().unwrap();
}

#[test]
fn zero_pages_are_not_stored() {
    let bytes = small_snapshot();
    let snapshot = open(&bytes, &small_expected()).unwrap();
    assert_eq!(snapshot.memory().stats(), MemoryStats { pages: 16, stored_pages: 2 });
    // Two pages of data, and less than a page of everything else plus the padding that aligns the data.
    assert!(bytes.len() < 4 * PAGE, "{} bytes", bytes.len());
    let extents: Vec<Extent> = snapshot.memory().extents().collect();
    let data = snapshot.memory().data_offset();
    assert_eq!(
        extents,
        [
            Extent { guest_addr: 2 * PAGE as u64, file_offset: data, len: PAGE as u64 },
            Extent { guest_addr: 9 * PAGE as u64, file_offset: data + PAGE as u64, len: PAGE as u64 },
        ]
    );
}

/// Sparse memory over several regions, one above 4 GiB and one all zero: what a restore that maps the file sees
/// at each extent is the guest's memory there, and the data starts on a page.
#[test]
fn sparse_memory_over_several_regions_maps_from_the_file() {
    let mut low = vec![0u8; 64 * PAGE];
    low[..PAGE].fill(1);
    for page in [5, 6, 7, 40, 63] {
        low[page * PAGE + page] = page as u8;
    }
    let empty = vec![0u8; 8 * PAGE];
    let mut high = vec![0u8; 32 * PAGE];
    high[31 * PAGE..].fill(0xee);
    let layout = [(0, low.len()), (0x1000_0000, empty.len()), (0x1_0000_0000, high.len())];
    let mut writer = Writer::new(Vec::new(), &header()).unwrap();
    writer.state("uart", 1, &uart()).unwrap();
    writer.state("vcpu.0", 1, &vcpu(7)).unwrap();
    let stats = writer
        .memory(
            PAGE as u32,
            &[
                GuestRegion { guest_addr: 0, bytes: &low, populated: None },
                GuestRegion { guest_addr: 0x1000_0000, bytes: &empty, populated: None },
                GuestRegion { guest_addr: 0x1_0000_0000, bytes: &high, populated: None },
            ],
        )
        .unwrap();
    assert_eq!(stats, MemoryStats { pages: 104, stored_pages: 7 });
    let bytes = writer.finish().unwrap();

    let mut snapshot = open(&bytes, &expected(&layout)).unwrap();
    assert_eq!(snapshot.memory().stats(), stats);
    assert_eq!(snapshot.memory().data_offset() % PAGE as u64, 0);
    let mut mapped = vec![low.clone(), empty.clone(), high.clone()];
    mapped.iter_mut().for_each(|region| region.fill(0));
    let mut extents = 0;
    for extent in snapshot.memory().extents() {
        assert_eq!(extent.file_offset % PAGE as u64, 0);
        let (region, &(base, _)) = layout.iter().enumerate().rfind(|(_, r)| r.0 <= extent.guest_addr).unwrap();
        let start = (extent.guest_addr - base) as usize;
        let file = &bytes[extent.file_offset as usize..][..extent.len as usize];
        mapped[region][start..start + file.len()].copy_from_slice(file);
        extents += 1;
    }
    assert_eq!(extents, 5, "runs: page 0, pages 5-7, 40, 63, and the high region's last page");
    assert_eq!(mapped, [low.clone(), empty.clone(), high.clone()]);
    assert_eq!(read_memory(&mut snapshot, &layout).unwrap(), [low, empty, high]);
}

#[test]
fn all_zero_and_all_full_memory() {
    for (fill, stored) in [(0u8, 0), (0x11, 8)] {
        let memory = vec![fill; 8 * PAGE];
        let mut writer = Writer::new(Vec::new(), &header()).unwrap();
        writer.state("uart", 1, &uart()).unwrap();
        writer.state("vcpu.0", 1, &vcpu(1)).unwrap();
        writer.memory(PAGE as u32, &[GuestRegion { guest_addr: 0, bytes: &memory, populated: None }]).unwrap();
        let bytes = writer.finish().unwrap();
        let mut snapshot = open(&bytes, &expected(&[(0, memory.len())])).unwrap();
        assert_eq!(snapshot.memory().stats(), MemoryStats { pages: 8, stored_pages: stored });
        assert_eq!(snapshot.memory().extents().count(), usize::from(stored > 0));
        assert_eq!(read_memory(&mut snapshot, &[(0, memory.len())]).unwrap(), [memory]);
    }
}

#[test]
fn large_pages_align_the_data_to_the_large_page() {
    let mut memory = vec![0u8; 4 << 16];
    memory[(2 << 16) + 3] = 3;
    let mut writer = Writer::new(Vec::new(), &header()).unwrap();
    writer.state("uart", 1, &uart()).unwrap();
    writer.state("vcpu.0", 1, &vcpu(2)).unwrap();
    writer.memory(64 << 10, &[GuestRegion { guest_addr: 0, bytes: &memory, populated: None }]).unwrap();
    let bytes = writer.finish().unwrap();
    let mut snapshot = open(&bytes, &expected(&[(0, memory.len())])).unwrap();
    assert_eq!(snapshot.memory().page_size(), 64 << 10);
    assert_eq!(snapshot.memory().data_offset(), 64 << 10);
    assert_eq!(read_memory(&mut snapshot, &[(0, memory.len())]).unwrap(), [memory]);
}

/// The writer needs nothing but `Write`: a snapshot streamed through a pipe reads back whole.
#[test]
fn the_writer_streams_through_a_pipe() {
    let (mut reader, writer) = io::pipe().unwrap();
    let saver = std::thread::spawn(move || {
        let memory = small_memory();
        let mut writer = Writer::new(writer, &header()).unwrap();
        writer.state("uart", 1, &uart()).unwrap();
        writer.state("vcpu.0", 2, &vcpu(0)).unwrap();
        writer.memory(PAGE as u32, &[GuestRegion { guest_addr: 0, bytes: &memory, populated: None }]).unwrap();
        writer.finish().unwrap();
    });
    let mut bytes = Vec::new();
    reader.read_to_end(&mut bytes).unwrap();
    saver.join().unwrap();
    assert_eq!(bytes, small_snapshot());
}

#[test]
fn an_optional_section_may_be_absent_and_a_required_one_may_not() {
    let bytes = small_snapshot();
    let snapshot = open(&bytes, &small_expected()).unwrap();
    assert!(matches!(snapshot.section("rng"), Err(Error::MissingSection { name }) if name == "rng"));

    let mut needs_rng = small_expected();
    needs_rng.sections[2].required = true;
    assert!(matches!(refusal(&bytes, &needs_rng), Error::MissingSection { name } if name == "rng"));
}

#[test]
fn a_file_that_is_not_a_snapshot_is_refused_as_such() {
    for bytes in [&b"\x7fELF\x02\x01\x01\0 and so on"[..], b"KSTRLSNQ........", b"x"] {
        assert!(matches!(refusal(bytes, &small_expected()), Error::BadMagic), "{bytes:?}");
    }
}

#[test]
fn a_truncated_file_says_where_it_ends() {
    let bytes = small_snapshot();
    let uart = record(&bytes, "uart");
    let cases = [
        (0, "the preamble"),
        (5, "the preamble"),
        (PREAMBLE_LEN + 3, "the header"),
        (uart.at, "the snapshot (it has no end record)"),
        (uart.at + 10, "the section record at byte"),
        (bytes.len() - 12, "the snapshot (it has no end record)"),
        (bytes.len() - 1, "the end record"),
    ];
    for (len, inside) in cases {
        match refusal(&bytes[..len], &small_expected()) {
            Error::Truncated { what, file_len } => {
                assert!(what.starts_with(inside), "cut at {len}: {what}");
                assert_eq!(file_len, len as u64);
            }
            other => panic!("cut at {len}: {other}"),
        }
    }
    // Cut inside a payload, the record's length runs past the end.
    let cut = uart.payload_at() + 2;
    assert!(
        matches!(refusal(&bytes[..cut], &small_expected()), Error::SectionBeyondFile { name, .. } if name == "uart")
    );
}

#[test]
fn newer_and_older_format_versions_are_refused_with_the_versions_read() {
    let mut bytes = small_snapshot();
    set_format_version(&mut bytes, FORMAT_VERSION + 1);
    match refusal(&bytes, &small_expected()) {
        Error::FormatTooNew { found, oldest, newest } => {
            assert_eq!((found, oldest, newest), (FORMAT_VERSION + 1, OLDEST_FORMAT_VERSION, FORMAT_VERSION))
        }
        other => panic!("{other}"),
    }
    // A future format may lay its header out differently: the version is checked before the header's checksum.
    bytes[PREAMBLE_LEN] ^= 0xff;
    assert!(matches!(refusal(&bytes, &small_expected()), Error::FormatTooNew { .. }));

    let mut bytes = small_snapshot();
    set_format_version(&mut bytes, OLDEST_FORMAT_VERSION - 1);
    assert!(matches!(refusal(&bytes, &small_expected()), Error::FormatTooOld { found: 0, .. }));
}

#[test]
fn a_snapshot_from_another_host_or_machine_is_refused_before_its_sections() {
    let with_header = |header: Header| {
        let mut writer = Writer::new(Vec::new(), &header).unwrap();
        writer.memory(PAGE as u32, &[GuestRegion { guest_addr: 0, bytes: &small_memory(), populated: None }]).unwrap();
        writer.finish().unwrap()
    };
    // None of these has the uart or vCPU sections: the header is refused first.
    let arm = with_header(Header { arch: "aarch64".into(), ..header() });
    match refusal(&arm, &small_expected()) {
        Error::ForeignArchitecture { snapshot, host } => assert_eq!((&*snapshot, &*host), ("aarch64", "x86_64")),
        other => panic!("{other}"),
    }
    let microvm = with_header(Header { machine: "microvm".into(), ..header() });
    match refusal(&microvm, &small_expected()) {
        Error::WrongMachine { snapshot, expected } => assert_eq!((&*snapshot, &*expected), ("microvm", "pc")),
        other => panic!("{other}"),
    }
    let amd = with_header(Header { cpu: CpuIdentity::new("AuthenticAMD", ["sse2"]), ..header() });
    assert!(matches!(refusal(&amd, &small_expected()), Error::CpuVendor { .. }));
    let avx512 = with_header(Header { cpu: CpuIdentity::new("GenuineIntel", ["sse2", "avx512f"]), ..header() });
    match refusal(&avx512, &small_expected()) {
        Error::CpuFeaturesMissing { missing } => assert_eq!(missing, ["avx512f"]),
        other => panic!("{other}"),
    }
    assert!(
        matches!(refusal(&with_header(header()), &small_expected()), Error::MissingSection { name } if name == "uart")
    );
}

#[test]
fn the_header_alone_reads_without_a_machine_and_is_checked_as_in_a_restore() {
    let bytes = small_snapshot();
    // Only the preamble and the header are read: a file cut right after them still says what it is.
    let header_end = PREAMBLE_LEN + le_u32(&bytes, 12) as usize + 4;
    assert_eq!(read_header(&bytes[..header_end]).unwrap(), header());
    assert_eq!(read_header(Cursor::new(&bytes)).unwrap(), header());

    let mut damaged = bytes.clone();
    damaged[PREAMBLE_LEN + 4] ^= 0x20;
    assert!(matches!(read_header(&damaged[..]), Err(Error::Corrupted { what, offset: 0 }) if what == "the header"));
    let mut future = bytes.clone();
    set_format_version(&mut future, FORMAT_VERSION + 1);
    assert!(matches!(read_header(&future[..]), Err(Error::FormatTooNew { .. })));
    assert!(matches!(read_header(&b"not a snapshot"[..]), Err(Error::BadMagic)));
    assert!(matches!(read_header(&bytes[..header_end - 1]), Err(Error::Truncated { .. })));
}

#[test]
fn damage_is_refused_as_corruption_and_names_what_is_damaged() {
    let bytes = small_snapshot();
    let damaged = |at: usize| {
        let mut bytes = bytes.clone();
        bytes[at] ^= 0x20;
        refusal(&bytes, &small_expected())
    };
    let uart = record(&bytes, "uart");
    let cases = [
        (PREAMBLE_LEN + 4, "the header".to_string(), 0),
        (uart.at + RECORD_FIXED_LEN + 1, format!("the section record at byte {}", uart.at), uart.at),
        (uart.payload_at() + 1, "section \"uart\"".to_string(), uart.payload_at()),
        (bytes.len() - 7, "the end record".to_string(), bytes.len() - 12),
    ];
    for (at, expected_what, expected_offset) in cases {
        match damaged(at) {
            Error::Corrupted { what, offset } => {
                assert_eq!((what, offset), (expected_what, expected_offset as u64), "byte {at}")
            }
            other => panic!("byte {at}: {other}"),
        }
    }
}

#[test]
fn damaged_guest_pages_are_found_when_they_are_read() {
    let mut bytes = small_snapshot();
    let pages = record(&bytes, MEMORY_PAGES_SECTION);
    bytes[pages.payload_at() + PAGE + 100] ^= 1;
    let mut snapshot = open(&bytes, &small_expected()).unwrap();
    let corrupted = |result: Result<()>| match result {
        Err(Error::Corrupted { what, offset }) => {
            assert_eq!((what.as_str(), offset), ("the guest memory pages", pages.payload_at() as u64))
        }
        other => panic!("{other:?}"),
    };
    corrupted(read_memory(&mut snapshot, &[(0, 16 * PAGE)]).map(drop));
    corrupted(snapshot.verify_memory());
}

#[test]
fn unknown_duplicate_and_missing_sections_are_each_named() {
    let memory = small_memory();
    let mut writer = Writer::new(Vec::new(), &header()).unwrap();
    writer.state("uart", 1, &uart()).unwrap();
    writer.state("vcpu.0", 1, &vcpu(0)).unwrap();
    writer.state("virtio-gpu", 1, &[1, 2, 3]).unwrap();
    writer.memory(PAGE as u32, &[GuestRegion { guest_addr: 0, bytes: &memory, populated: None }]).unwrap();
    let bytes = writer.finish().unwrap();
    assert!(matches!(refusal(&bytes, &small_expected()), Error::UnknownSection { name } if name == "virtio-gpu"));

    let mut bytes = small_snapshot();
    let first = record(&bytes, "uart");
    let copy = bytes[first.at..first.at + first.len()].to_vec();
    bytes.splice(first.at..first.at, copy);
    let count = records(&bytes).len() as u32;
    set_end_count(&mut bytes, count);
    assert!(matches!(refusal(&bytes, &small_expected()), Error::DuplicateSection { name } if name == "uart"));

    // (Written without it: removing a record from a file would move the pages off their alignment.)
    let mut writer = Writer::new(Vec::new(), &header()).unwrap();
    writer.state("uart", 1, &uart()).unwrap();
    writer.memory(PAGE as u32, &[GuestRegion { guest_addr: 0, bytes: &memory, populated: None }]).unwrap();
    let bytes = writer.finish().unwrap();
    assert!(matches!(refusal(&bytes, &small_expected()), Error::MissingSection { name } if name == "vcpu.0"));
}

#[test]
fn guest_memory_must_be_there_and_its_map_first() {
    let mut no_pages = small_snapshot();
    remove_record(&mut no_pages, MEMORY_PAGES_SECTION);
    assert!(matches!(refusal(&no_pages, &small_expected()), Error::MissingSection { name } if name == "memory.pages"));

    let mut no_memory = no_pages.clone();
    remove_record(&mut no_memory, MEMORY_MAP_SECTION);
    assert!(matches!(refusal(&no_memory, &small_expected()), Error::MissingSection { name } if name == "memory"));

    let mut no_map = small_snapshot();
    remove_record(&mut no_map, MEMORY_MAP_SECTION);
    match refusal(&no_map, &small_expected()) {
        Error::Malformed { problem, .. } => assert!(problem.contains("before their map"), "{problem}"),
        other => panic!("{other}"),
    }
}

#[test]
fn section_versions_outside_what_is_read_are_refused() {
    for version in [0, 3] {
        let mut bytes = small_snapshot();
        rewrite_record(&mut bytes, "vcpu.0", |record| record.version = version);
        match refusal(&bytes, &small_expected()) {
            Error::SectionVersion { name, found, oldest, newest } => {
                assert_eq!((name.as_str(), found, oldest, newest), ("vcpu.0", version, 1, 2))
            }
            other => panic!("{other}"),
        }
    }
    let mut bytes = small_snapshot();
    rewrite_record(&mut bytes, MEMORY_MAP_SECTION, |record| record.version = MEMORY_SECTION_VERSION + 1);
    assert!(matches!(refusal(&bytes, &small_expected()), Error::SectionVersion { name, .. } if name == "memory"));
}

#[test]
fn lengths_past_the_file_or_the_limit_are_refused_before_anything_is_allocated() {
    let mut bytes = small_snapshot();
    rewrite_record(&mut bytes, "uart", |record| record.payload_len = 1 << 20);
    match refusal(&bytes, &small_expected()) {
        Error::SectionBeyondFile { name, length, file_len, .. } => {
            assert_eq!((name.as_str(), length, file_len), ("uart", 1 << 20, bytes.len() as u64))
        }
        other => panic!("{other}"),
    }
    let mut bytes = small_snapshot();
    rewrite_record(&mut bytes, "uart", |record| record.payload_len = MAX_SECTION_LEN + 1);
    assert!(
        matches!(refusal(&bytes, &small_expected()), Error::SectionTooLarge { length, .. } if length == MAX_SECTION_LEN + 1)
    );
    let mut bytes = small_snapshot();
    rewrite_record(&mut bytes, MEMORY_PAGES_SECTION, |record| record.payload_len = u64::MAX);
    assert!(matches!(refusal(&bytes, &small_expected()), Error::SectionBeyondFile { length: u64::MAX, .. }));

    let mut bytes = small_snapshot();
    bytes[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    match refusal(&bytes, &small_expected()) {
        Error::Malformed { offset: 12, problem } => assert!(problem.contains("header is longer"), "{problem}"),
        other => panic!("{other}"),
    }
}

#[test]
fn pages_that_disagree_with_their_map_are_refused() {
    let mut bytes = small_snapshot();
    rewrite_record(&mut bytes, MEMORY_PAGES_SECTION, |record| record.payload_len -= PAGE as u64);
    bytes.drain(bytes.len() - 16 - PAGE..bytes.len() - 16);
    match refusal(&bytes, &small_expected()) {
        Error::Malformed { problem, .. } => assert!(problem.contains("marks 2 pages"), "{problem}"),
        other => panic!("{other}"),
    }

    // Pages moved off their alignment by a byte of padding less.
    let mut bytes = small_snapshot();
    let pages = record(&bytes, MEMORY_PAGES_SECTION);
    rewrite_record(&mut bytes, MEMORY_PAGES_SECTION, |record| record.padding -= 1);
    bytes.remove(pages.payload_at() - 1);
    match refusal(&bytes, &small_expected()) {
        Error::Malformed { problem, .. } => assert!(problem.contains("not on a 4096-byte page"), "{problem}"),
        other => panic!("{other}"),
    }

    let mut bytes = small_snapshot();
    let pages = record(&bytes, MEMORY_PAGES_SECTION);
    bytes[pages.payload_at() - 1] = 1;
    match refusal(&bytes, &small_expected()) {
        Error::Malformed { problem, offset } => {
            assert!(problem.contains("padding"), "{problem}");
            assert_eq!(offset, pages.at as u64 + pages.header_len as u64);
        }
        other => panic!("{other}"),
    }
}

#[test]
fn memory_that_disagrees_with_the_machine_is_refused() {
    let bytes = small_snapshot();
    match refusal(&bytes, &expected(&[(0, 32 * PAGE)])) {
        Error::MemorySize { snapshot, expected } => assert_eq!((snapshot, expected), (64 << 10, 128 << 10)),
        other => panic!("{other}"),
    }
    assert!(matches!(refusal(&bytes, &expected(&[(0x10_0000, 16 * PAGE)])), Error::MemoryLayout { .. }));
    let two = expected(&[(0, 8 * PAGE), (1 << 32, 8 * PAGE)]);
    match refusal(&bytes, &two) {
        Error::MemoryLayout { snapshot, expected } => {
            assert_eq!(snapshot, "64 KiB at 0x0");
            assert_eq!(expected, "32 KiB at 0x0, 32 KiB at 0x100000000");
        }
        other => panic!("{other}"),
    }

    let mut snapshot = open(&bytes, &small_expected()).unwrap();
    assert!(matches!(read_memory(&mut snapshot, &[(0, 8 * PAGE)]), Err(Error::MemorySize { .. })));
}

#[test]
fn a_state_of_the_wrong_shape_is_refused_by_name_and_version() {
    let bytes = small_snapshot();
    let snapshot = open(&bytes, &small_expected()).unwrap();
    match snapshot.state::<Vcpu>("uart") {
        Err(Error::BadState { name, version, problem }) => {
            assert_eq!((name.as_str(), version), ("uart", 1));
            assert!(problem.contains("unknown field"), "{problem}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn bytes_after_the_end_and_a_count_that_disagrees_are_refused() {
    let mut bytes = small_snapshot();
    bytes.extend_from_slice(b"junk");
    assert!(matches!(refusal(&bytes, &small_expected()), Error::TrailingData { count: 4 }));

    let mut bytes = small_snapshot();
    let count = records(&bytes).len() as u32;
    set_end_count(&mut bytes, count + 1);
    match refusal(&bytes, &small_expected()) {
        Error::Malformed { problem, .. } => assert!(problem.contains("counts 5 sections; the file holds 4")),
        other => panic!("{other}"),
    }

    let mut bytes = small_snapshot();
    let end = bytes.len() - 12;
    bytes[end..end + 4].copy_from_slice(b"SECX");
    assert!(matches!(refusal(&bytes, &small_expected()), Error::Malformed { offset, .. } if offset == end as u64));
}

#[test]
fn a_header_that_is_not_json_is_refused() {
    let mut bytes = small_snapshot();
    let header_end = PREAMBLE_LEN + le_u32(&bytes, 12) as usize;
    bytes[PREAMBLE_LEN] = b'[';
    let sum = checksum(&bytes[..header_end]);
    bytes[header_end..header_end + 4].copy_from_slice(&sum.to_le_bytes());
    match refusal(&bytes, &small_expected()) {
        Error::Malformed { offset, problem } => {
            assert_eq!(offset, PREAMBLE_LEN as u64);
            assert!(problem.starts_with("header:"), "{problem}");
        }
        other => panic!("{other}"),
    }
}

#[test]
fn the_writer_refuses_what_no_reader_would_take() {
    let memory = small_memory();
    let regions = [GuestRegion { guest_addr: 0, bytes: &memory, populated: None }];
    let mut writer = Writer::new(Vec::new(), &header()).unwrap();
    for name in ["", "has space", MEMORY_MAP_SECTION, MEMORY_PAGES_SECTION] {
        assert!(matches!(writer.state(name, 1, &uart()), Err(Error::InvalidName { .. })), "{name:?}");
    }
    writer.state("uart", 1, &uart()).unwrap();
    assert!(matches!(writer.state("uart", 1, &uart()), Err(Error::DuplicateSection { .. })));
    for bad in [
        &[GuestRegion { guest_addr: 0x800, bytes: &memory, populated: None }][..],
        &[GuestRegion { guest_addr: 0, bytes: &memory[..100], populated: None }],
        &[
            GuestRegion { guest_addr: 0, bytes: &memory, populated: None },
            GuestRegion { guest_addr: PAGE as u64, bytes: &memory, populated: None },
        ],
        &[],
    ] {
        assert!(matches!(writer.memory(PAGE as u32, bad), Err(Error::InvalidMemory(_))));
    }
    assert!(matches!(writer.memory(1000, &regions), Err(Error::InvalidMemory(_))));
    let writer = Writer::new(Vec::new(), &header()).unwrap();
    assert!(matches!(writer.finish(), Err(Error::MissingSection { .. })));

    let mut writer = Writer::new(Vec::new(), &header()).unwrap();
    writer.memory(PAGE as u32, &regions).unwrap();
    assert!(matches!(writer.memory(PAGE as u32, &regions), Err(Error::DuplicateSection { .. })));

    // A header the reader would refuse as too long (64 KiB of JSON at most).
    let bloated =
        Header { cpu: CpuIdentity::new("GenuineIntel", (0..5000).map(|i| format!("feature{i}"))), ..header() };
    match Writer::new(Vec::new(), &bloated) {
        Err(Error::InvalidHeader(problem)) => assert!(problem.contains("more than 65536"), "{problem}"),
        other => panic!("{:?}", other.map(drop)),
    }
}

/// A sink that takes `left` bytes and then fails, as a full disk or a closed pipe does.
struct Failing {
    left: usize,
}

impl Write for Failing {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Err(io::Error::from(io::ErrorKind::StorageFull));
        }
        let taken = bytes.len().min(self.left);
        self.left -= taken;
        Ok(taken)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_write_error_is_reported_with_where_it_happened() {
    let memory = small_memory();
    let full_len = small_snapshot().len();
    for left in [0, 10, 300, full_len - 20] {
        let result = (|| {
            let mut writer = Writer::new(Failing { left }, &header())?;
            writer.state("uart", 1, &uart())?;
            writer.state("vcpu.0", 2, &vcpu(0))?;
            writer.memory(PAGE as u32, &[GuestRegion { guest_addr: 0, bytes: &memory, populated: None }])?;
            writer.finish().map(drop)
        })();
        match result {
            Err(Error::Io { offset, source }) => {
                assert!(offset <= left as u64, "failed at {offset} with {left} bytes of room");
                assert_eq!(source.kind(), io::ErrorKind::StorageFull);
            }
            other => panic!("{left} bytes of room: {other:?}"),
        }
    }
}

/// serde quotes unknown field names as the file spells them (found by the fuzz target): they are escaped.
#[test]
fn control_characters_from_the_file_stay_out_of_messages() {
    let json = br#"{"kestrel\u007fversion":"0.1.0"}"#;
    let json = String::from_utf8_lossy(json).replace("\\u007f", "\x7f");
    let mut bytes = record::encode_preamble(FORMAT_VERSION, json.len() as u32).to_vec();
    bytes.extend_from_slice(json.as_bytes());
    let sum = checksum(&bytes);
    bytes.extend_from_slice(&sum.to_le_bytes());
    match refusal(&bytes, &small_expected()) {
        Error::Malformed { problem, .. } => assert!(problem.contains(r"kestrel\u{7f}version"), "{problem}"),
        other => panic!("{other}"),
    }

    let mut writer = Writer::new(Vec::new(), &header()).unwrap();
    writer.state("uart", 1, &serde_json::json!({"lcr": 3, "fifo": [], "evil\u{1b}[2J": 1})).unwrap();
    writer.state("vcpu.0", 1, &vcpu(0)).unwrap();
    writer.memory(PAGE as u32, &[GuestRegion { guest_addr: 0, bytes: &small_memory(), populated: None }]).unwrap();
    let bytes = writer.finish().unwrap();
    let snapshot = open(&bytes, &small_expected()).unwrap();
    match snapshot.state::<Uart>("uart") {
        Err(error @ Error::BadState { .. }) => {
            let message = error.to_string();
            assert!(message.contains(r"evil\u{1b}[2J") && !message.chars().any(char::is_control), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

/// A reader that hands out at most `chunk` bytes per read, as a pipe does, and counts what was taken.
struct Trickle<'a> {
    bytes: &'a [u8],
    chunk: usize,
    taken: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.chunk).min(self.bytes.len() - self.taken);
        buf[..n].copy_from_slice(&self.bytes[self.taken..self.taken + n]);
        self.taken += n;
        Ok(n)
    }
}

/// `bytes` read as a stream into fresh regions laid out as `layout`: the snapshot and the regions' contents.
fn stream(bytes: &[u8], expected: &Expected, layout: &[(u64, usize)]) -> Result<(StreamedSnapshot, Vec<Vec<u8>>)> {
    let mut buffers: Vec<Vec<u8>> = layout.iter().map(|&(_, size)| vec![0u8; size]).collect();
    let mut regions: Vec<GuestRegionMut> =
        layout.iter().zip(&mut buffers).map(|(&(guest_addr, _), bytes)| GuestRegionMut { guest_addr, bytes }).collect();
    let snapshot = read_stream(Trickle { bytes, chunk: 1000, taken: 0 }, expected, &mut regions)?;
    Ok((snapshot, buffers))
}

/// A stream (a pipe, no seeking) gives back what a file does: the states, and the pages copied as they arrive,
/// whether the pages come last or states follow them (the fixture's `rtc`).
#[test]
fn a_stream_reads_back_what_a_file_does() {
    let bytes = small_snapshot();
    let (snapshot, memory) = stream(&bytes, &small_expected(), &[(0, 16 * PAGE)]).unwrap();
    assert_eq!(snapshot.header(), &header());
    assert_eq!(snapshot.section_names().collect::<Vec<_>>(), ["uart", "vcpu.0"]);
    assert_eq!(snapshot.state::<Uart>("uart").unwrap(), uart());
    assert_eq!(snapshot.section("vcpu.0").unwrap().version(), 2);
    assert_eq!(memory, [small_memory()]);

    let fixture = testing::fixture_v1().unwrap();
    let expected = testing::fixture_expected();
    let layout: Vec<(u64, usize)> = expected.memory.iter().map(|r| (r.guest_addr, r.size as usize)).collect();
    let (snapshot, memory) = stream(&fixture, &expected, &layout).unwrap();
    assert_eq!(snapshot.state::<testing::FixtureRtc>("rtc").unwrap(), testing::fixture_rtc());
    let (low, high) = testing::fixture_memory();
    assert_eq!(memory, [low, high]);
}

/// Through a real pipe, written by another thread as a save writes it.
#[test]
fn a_stream_reads_from_a_pipe() {
    let (reader, writer) = io::pipe().unwrap();
    let saver = std::thread::spawn(move || {
        let memory = small_memory();
        let mut writer = Writer::new(writer, &header()).unwrap();
        writer.memory(PAGE as u32, &[GuestRegion { guest_addr: 0, bytes: &memory, populated: None }]).unwrap();
        writer.state("uart", 1, &uart()).unwrap();
        writer.state("vcpu.0", 2, &vcpu(0)).unwrap();
        writer.finish().unwrap();
    });
    let mut memory = vec![0u8; 16 * PAGE];
    let mut regions = [GuestRegionMut { guest_addr: 0, bytes: &mut memory }];
    let snapshot = read_stream(reader, &small_expected(), &mut regions).unwrap();
    saver.join().unwrap();
    assert_eq!(snapshot.state::<Vcpu>("vcpu.0").unwrap(), vcpu(0));
    assert_eq!(memory, small_memory());
}

/// A stream cut anywhere is refused as truncated at the byte where it ended, whatever its length fields claimed.
#[test]
fn a_truncated_stream_says_where_it_ends() {
    let bytes = small_snapshot();
    for len in 0..bytes.len() {
        match stream(&bytes[..len], &small_expected(), &[(0, 16 * PAGE)]) {
            Err(Error::Truncated { file_len, what }) => {
                assert_eq!(file_len, len as u64, "cut at {len}: inside {what}");
                assert!(!what.is_empty(), "cut at {len}");
            }
            Err(Error::BadMagic) if len == 0 => {}
            Err(other) => panic!("cut at {len}: {other}"),
            Ok(_) => panic!("the snapshot cut at {len} bytes was read"),
        }
    }
}

/// A stream's lengths cannot be checked against a file's size: a section that claims more than arrives is
/// refused where the stream ends, having allocated no more than arrived; one that claims more than any section
/// may hold is refused before it is read.
#[test]
fn a_streamed_length_past_the_data_is_refused_where_the_data_ends() {
    let mut bytes = small_snapshot();
    rewrite_record(&mut bytes, "uart", |header| header.payload_len = 60 << 20);
    match stream(&bytes, &small_expected(), &[(0, 16 * PAGE)]) {
        Err(Error::Truncated { what, file_len }) => {
            assert_eq!(file_len, bytes.len() as u64);
            assert!(what.contains("uart"), "{what}");
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    let mut bytes = small_snapshot();
    rewrite_record(&mut bytes, "uart", |header| header.payload_len = MAX_SECTION_LEN + 1);
    assert!(matches!(
        stream(&bytes, &small_expected(), &[(0, 16 * PAGE)]),
        Err(Error::SectionTooLarge { name, .. }) if name == "uart"
    ));
}

/// Damage anywhere in a stream is refused, the guest's pages by their checksum once they are in; bytes after the
/// end record are left unread (they belong to whoever sent the stream).
#[test]
fn a_damaged_stream_is_refused_and_reading_stops_at_the_end_record() {
    let bytes = small_snapshot();
    let pages = record(&bytes, "memory.pages");
    for at in (0..bytes.len()).step_by(7) {
        let mut damaged = bytes.clone();
        damaged[at] ^= 0x10;
        assert!(stream(&damaged, &small_expected(), &[(0, 16 * PAGE)]).is_err(), "byte {at} damaged was read");
    }
    let mut damaged = bytes.clone();
    damaged[pages.payload_at() + 5] ^= 1;
    assert!(matches!(
        stream(&damaged, &small_expected(), &[(0, 16 * PAGE)]),
        Err(Error::Corrupted { what, .. }) if what == "the guest memory pages"
    ));

    let mut followed = bytes.clone();
    followed.extend_from_slice(b"more");
    let mut memory = vec![0u8; 16 * PAGE];
    let mut regions = [GuestRegionMut { guest_addr: 0, bytes: &mut memory }];
    let mut source = Trickle { bytes: &followed, chunk: 1 << 20, taken: 0 };
    read_stream(&mut source, &small_expected(), &mut regions).unwrap();
    assert_eq!(source.taken, bytes.len());
}

/// Regions that do not match the machine the snapshot is checked against are refused before anything is read.
#[test]
fn a_stream_into_regions_other_than_the_machines_is_refused() {
    let bytes = small_snapshot();
    let error = stream(&bytes, &small_expected(), &[(0, 8 * PAGE)]).err().unwrap();
    assert!(matches!(error, Error::MemorySize { .. } | Error::MemoryLayout { .. }), "{error}");
}

/// Guest memory put together as a mapping restore does: each extent's bytes taken from the file where it says.
fn memory_from_extents(bytes: &[u8], snapshot: &Snapshot<Cursor<&[u8]>>) -> Vec<u8> {
    let mut memory = vec![0u8; 16 * PAGE];
    for extent in snapshot.memory().extents() {
        let (at, from, len) = (extent.guest_addr as usize, extent.file_offset as usize, extent.len as usize);
        memory[at..at + len].copy_from_slice(&bytes[from..from + len]);
    }
    memory
}

#[test]
fn memory_mapped_along_the_extents_is_checked_against_the_pages_checksum() {
    let bytes = small_snapshot();
    let snapshot = open(&bytes, &small_expected()).unwrap();
    let memory = memory_from_extents(&bytes, &snapshot);
    assert_eq!(memory, small_memory());
    snapshot.check_memory(&[GuestRegion { guest_addr: 0, bytes: &memory, populated: None }]).unwrap();

    // A page damaged in the file reaches memory through the mapping, and is refused there.
    let mut damaged = small_snapshot();
    let pages_at = record(&damaged, MEMORY_PAGES_SECTION).payload_at();
    damaged[pages_at + PAGE + 7] ^= 0x10;
    let snapshot = open(&damaged, &small_expected()).unwrap();
    let memory = memory_from_extents(&damaged, &snapshot);
    match snapshot.check_memory(&[GuestRegion { guest_addr: 0, bytes: &memory, populated: None }]) {
        Err(Error::Corrupted { what, .. }) => assert_eq!(what, "the guest memory pages"),
        other => panic!("expected the damaged page to be found, got {other:?}"),
    }
    // Memory that is not the snapshot's layout is refused before anything is summed.
    let short = &memory[..8 * PAGE];
    assert!(matches!(
        snapshot.check_memory(&[GuestRegion { guest_addr: 0, bytes: short, populated: None }]),
        Err(Error::MemorySize { .. })
    ));
}

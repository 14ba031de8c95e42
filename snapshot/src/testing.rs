//! The format-version-1 fixture's contents, and the fuzz body that reads arbitrary bytes as a snapshot of the
//! fixture's machine. Shared by the fixture test (`snapshot/tests/format_v1_fixture.rs`), the fuzz target
//! (`fuzz/fuzz_targets/snapshot_reader.rs`, which the fixture file seeds) and the smoke corpus below.

use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::{
    CpuIdentity, Error, Expected, GuestRegion, GuestRegionMut, Header, RegionLayout, Result, SectionSpec, Snapshot,
    Writer,
};

/// The fixture, from the workspace's root.
pub const FIXTURE_V1: &str = "tests/fixtures/snapshot-format-v1.ksnap";

/// A vCPU-like state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixtureCpu {
    pub rip: u64,
    pub rsp: u64,
    pub rflags: u64,
    pub cr3: u64,
    pub msrs: Vec<(u32, u64)>,
}

/// A UART-like state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixtureSerial {
    pub ier: u8,
    pub lcr: u8,
    pub scratch: u8,
    pub rx_fifo: Vec<u8>,
}

/// An RTC-like state at section version 2: a section's version need not be the format's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixtureRtc {
    pub nvram: Vec<u8>,
    pub offset_ns: i64,
}

const PAGE: usize = 4096;
const LOW: RegionLayout = RegionLayout { guest_addr: 0, size: 128 << 10 };
const HIGH: RegionLayout = RegionLayout { guest_addr: 1 << 32, size: 16 << 10 };

pub fn fixture_header() -> Header {
    Header {
        kestrel_version: "0.1.0".into(),
        arch: "x86_64".into(),
        machine: "microvm".into(),
        cpu: CpuIdentity::new("GenuineIntel", ["fpu", "sse2", "x2apic", "hypervisor"]),
    }
}

pub fn fixture_cpu() -> FixtureCpu {
    FixtureCpu {
        rip: 0x10_0abc,
        rsp: 0x8_ff80,
        rflags: 0x246,
        cr3: 0x9000,
        msrs: vec![(0x10, 0x1234_5678_9abc), (0xc000_0080, 0xd01)],
    }
}

pub fn fixture_serial() -> FixtureSerial {
    FixtureSerial { ier: 0x01, lcr: 0x03, scratch: 0x5a, rx_fifo: b"q\n".to_vec() }
}

pub fn fixture_rtc() -> FixtureRtc {
    FixtureRtc { nvram: (0..114u8).collect(), offset_ns: -3_600_000_000_000 }
}

/// The guest's memory: two regions (one above 4 GiB), all zero but two pages, 144 KiB in all.
pub fn fixture_memory() -> (Vec<u8>, Vec<u8>) {
    let mut low = vec![0u8; LOW.size as usize];
    let marker = b"kestrel snapshot fixture, format version 1: counter at 0x1100\n";
    low[PAGE..PAGE + marker.len()].copy_from_slice(marker);
    low[PAGE + 0x100..PAGE + 0x108].copy_from_slice(&41u64.to_le_bytes());
    let mut high = vec![0u8; HIGH.size as usize];
    for (i, byte) in high[3 * PAGE..4 * PAGE].iter_mut().enumerate() {
        *byte = (i * 7 % 251) as u8;
    }
    (low, high)
}

/// What a machine that restores the fixture is.
pub fn fixture_expected() -> Expected {
    Expected {
        arch: "x86_64".into(),
        machine: "microvm".into(),
        cpu: CpuIdentity::new("GenuineIntel", ["fpu", "sse2", "x2apic", "hypervisor", "avx", "avx2"]),
        memory: vec![LOW, HIGH],
        sections: vec![
            SectionSpec::required("cpu.0", 1..=1),
            SectionSpec::required("serial", 1..=1),
            SectionSpec::required("rtc", 1..=2),
            SectionSpec::optional("console", 1..=1),
        ],
    }
}

/// The fixture as this Kestrel writes it.
pub fn fixture_v1() -> Result<Vec<u8>> {
    let (low, high) = fixture_memory();
    let mut writer = Writer::new(Vec::new(), &fixture_header())?;
    writer.state("cpu.0", 1, &fixture_cpu())?;
    writer.state("serial", 1, &fixture_serial())?;
    writer.memory(
        PAGE as u32,
        &[
            GuestRegion { guest_addr: LOW.guest_addr, bytes: &low, populated: None },
            GuestRegion { guest_addr: HIGH.guest_addr, bytes: &high, populated: None },
        ],
    )?;
    writer.state("rtc", 2, &fixture_rtc())?;
    writer.finish()
}

fn check_message(error: &Error) {
    let message = error.to_string();
    assert!(!message.is_empty() && !message.chars().any(char::is_control), "bad error message: {message:?}");
}

/// The fuzz body: `data` read as a snapshot of the fixture's machine, with the checksums checked and again
/// without (so mutations reach the parsing behind them). Reading must end in a snapshot or an error with a
/// one-line message; a snapshot's memory extents must lie within the file and the guest's regions, and its
/// states and pages must read or be refused cleanly.
pub fn fuzz_read(data: &[u8]) {
    let expected = fixture_expected();
    {
        // The same bytes as a stream (a pipe at restore): read once, pages straight into the guest's regions.
        let (mut low, mut high) = (vec![0u8; LOW.size as usize], vec![0u8; HIGH.size as usize]);
        let mut regions = [
            GuestRegionMut { guest_addr: LOW.guest_addr, bytes: &mut low },
            GuestRegionMut { guest_addr: HIGH.guest_addr, bytes: &mut high },
        ];
        match crate::read_stream(data, &expected, &mut regions) {
            Ok(snapshot) => {
                for name in snapshot.section_names() {
                    if let Err(error) = snapshot.state::<serde_json::Value>(name) {
                        check_message(&error);
                    }
                }
            }
            Err(error) => check_message(&error),
        }
    }
    for verify_checksums in [true, false] {
        let mut snapshot = match Snapshot::open_with(Cursor::new(data), &expected, verify_checksums) {
            Ok(snapshot) => snapshot,
            Err(error) => {
                check_message(&error);
                continue;
            }
        };
        let names: Vec<String> = snapshot.section_names().map(String::from).collect();
        for name in names {
            if let Err(error) = snapshot.state::<serde_json::Value>(&name) {
                check_message(&error);
            }
        }
        let image = snapshot.memory();
        let page = u64::from(image.page_size());
        for extent in image.extents() {
            assert!(extent.file_offset % page == 0 && extent.len % page == 0 && extent.len > 0, "{extent:?}");
            assert!(extent.file_offset + extent.len <= data.len() as u64, "{extent:?} past the file");
            assert!(
                image
                    .regions()
                    .iter()
                    .any(|r| extent.guest_addr >= r.guest_addr
                        && extent.guest_addr + extent.len <= r.guest_addr + r.size),
                "{extent:?} outside guest memory"
            );
        }
        let (mut low, mut high) = (vec![0u8; LOW.size as usize], vec![0u8; HIGH.size as usize]);
        let mut regions = [
            GuestRegionMut { guest_addr: LOW.guest_addr, bytes: &mut low },
            GuestRegionMut { guest_addr: HIGH.guest_addr, bytes: &mut high },
        ];
        for result in [snapshot.read_memory_into(&mut regions), snapshot.verify_memory()] {
            if let Err(error) = result {
                check_message(&error);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `data` is refused somewhere between opening it and reading its memory, as a file; as a stream it
    /// must be refused too.
    fn refused(data: &[u8]) -> bool {
        let (mut low, mut high) = (vec![0u8; LOW.size as usize], vec![0u8; HIGH.size as usize]);
        let mut regions = [
            GuestRegionMut { guest_addr: LOW.guest_addr, bytes: &mut low },
            GuestRegionMut { guest_addr: HIGH.guest_addr, bytes: &mut high },
        ];
        let streamed = crate::read_stream(data, &fixture_expected(), &mut regions).is_ok();
        let Ok(mut snapshot) = Snapshot::open(Cursor::new(data), &fixture_expected()) else {
            assert!(!streamed, "refused as a file, read as a stream");
            return true;
        };
        let (mut low, mut high) = (vec![0u8; LOW.size as usize], vec![0u8; HIGH.size as usize]);
        let mut regions = [
            GuestRegionMut { guest_addr: LOW.guest_addr, bytes: &mut low },
            GuestRegionMut { guest_addr: HIGH.guest_addr, bytes: &mut high },
        ];
        let refused = snapshot.read_memory_into(&mut regions).is_err();
        assert_eq!(refused, !streamed, "a file and a stream of the same bytes disagree");
        refused
    }

    /// The fuzz body over the fixture cut short at every length and with bits flipped throughout; every one of
    /// those damaged files must also be refused when read with the checksums checked.
    #[test]
    fn fuzz_body_survives_a_smoke_corpus_and_every_damaged_file_is_refused() {
        let fixture = fixture_v1().unwrap();
        fuzz_read(&fixture);
        assert!(!refused(&fixture));
        // Every byte of the framing and states, and a spread of the two pages of data (each place like the next).
        let pages_record_end = fixture.windows(12).position(|w| w == b"memory.pages").unwrap() + 12 + 4;
        let data_start = pages_record_end.next_multiple_of(PAGE);
        let data = data_start..data_start + 2 * PAGE;
        let places = || (0..data.start).chain(data.clone().step_by(61)).chain(data.end..fixture.len());
        for len in places() {
            fuzz_read(&fixture[..len]);
            assert!(refused(&fixture[..len]), "the fixture cut to {len} bytes was read");
        }
        // One low and one high bit flipped at each place.
        for at in places() {
            for bit in [0x01, 0x80] {
                let mut damaged = fixture.clone();
                damaged[at] ^= bit;
                fuzz_read(&damaged);
                assert!(refused(&damaged), "the fixture with byte {at} ^ {bit:#x} was read");
            }
        }
        for noise in [&[][..], b"KSTRLSNP", b"KSTRLSNP\x01\0\0\0\xff\xff\xff\xff", &[0xff; 64]] {
            fuzz_read(noise);
            assert!(refused(noise));
        }
    }
}

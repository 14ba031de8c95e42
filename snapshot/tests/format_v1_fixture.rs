//! The format-version-1 fixture (`tests/fixtures/snapshot-format-v1.ksnap`, written by
//! `snapshot::testing::fixture_v1`): the version policy says a release restores snapshots of the previous format
//! version, so this file must keep reading until format version 3 ships.
//!
//! Regenerate it (only while `FORMAT_VERSION` is 1, and only for a change that is meant to leave the format as it
//! was) with `KESTREL_WRITE_SNAPSHOT_FIXTURE=1 cargo test -p snapshot --test format_v1_fixture`.

use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;

use snapshot::testing::{self, FixtureCpu, FixtureRtc, FixtureSerial};
use snapshot::{GuestRegionMut, MemoryStats, Snapshot, FORMAT_VERSION};

fn fixture_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(testing::FIXTURE_V1)
}

/// The fixture's path, after writing it anew if asked to (through a rename, as both tests may do it at once).
fn committed_fixture() -> PathBuf {
    let path = fixture_path();
    if std::env::var_os("KESTREL_WRITE_SNAPSHOT_FIXTURE").is_some() {
        let fresh = path.with_extension(format!("{:?}.new", std::thread::current().id()));
        std::fs::write(&fresh, testing::fixture_v1().unwrap()).unwrap();
        std::fs::rename(&fresh, &path).unwrap();
    }
    path
}

#[test]
fn the_format_v1_fixture_still_reads() {
    let file = File::open(committed_fixture()).expect("the committed fixture");
    let mut snapshot = Snapshot::open(BufReader::new(file), &testing::fixture_expected()).unwrap();
    assert_eq!(snapshot.header(), &testing::fixture_header());
    assert_eq!(snapshot.state::<FixtureCpu>("cpu.0").unwrap(), testing::fixture_cpu());
    assert_eq!(snapshot.state::<FixtureSerial>("serial").unwrap(), testing::fixture_serial());
    let rtc = snapshot.section("rtc").unwrap();
    assert_eq!(rtc.version(), 2);
    assert_eq!(rtc.decode::<FixtureRtc>().unwrap(), testing::fixture_rtc());

    // 144 KiB of guest memory, of which the file holds the two pages that are not zero.
    assert_eq!(snapshot.memory().stats(), MemoryStats { pages: 36, stored_pages: 2 });
    let (low, high) = testing::fixture_memory();
    let (mut read_low, mut read_high) = (vec![0; low.len()], vec![0; high.len()]);
    let regions = snapshot.memory().regions().to_vec();
    snapshot
        .read_memory_into(&mut [
            GuestRegionMut { guest_addr: regions[0].guest_addr, bytes: &mut read_low },
            GuestRegionMut { guest_addr: regions[1].guest_addr, bytes: &mut read_high },
        ])
        .unwrap();
    assert!(read_low == low && read_high == high, "guest memory differs from what was saved");
}

#[test]
fn this_kestrel_still_writes_format_v1_as_the_fixture_has_it() {
    let committed = std::fs::read(committed_fixture()).expect("the committed fixture");
    let written = testing::fixture_v1().unwrap();
    assert_eq!(
        FORMAT_VERSION, 1,
        "a new format version: keep this fixture and its read test, add a fixture for the new version, and point \
         this test at it"
    );
    // A few KiB: the fixture stays small enough to keep in the repository.
    assert!(committed.len() <= 16 << 10, "{} bytes", committed.len());
    assert!(committed == written, "the writer's format-version-1 output changed: bump FORMAT_VERSION instead");
}

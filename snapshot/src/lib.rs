//! Kestrel's snapshot file: what a save writes (QMP `migrate` to `file:` or `fd:`) and a restore reads
//! (`-incoming file:`), independent of any machine (issue 16).
//!
//! A snapshot is a header that says what it was taken on, then one section per stateful component, each with
//! its own version, then guest memory without its zero pages. [`Writer`] streams one out to any `Write`;
//! [`Snapshot::open`] reads one back from a file and checks all of it against what the restoring machine is
//! ([`Expected`]) before handing out any state, and [`read_stream`] does the same in one pass over a stream that
//! cannot seek (a pipe, as libvirt restores through), copying the pages into guest memory as they arrive: a truncated, corrupted, foreign or mismatched file is one [`Error`] variant
//! with a one-line message, never a panic, and no length in the file makes the reader allocate more than the file
//! holds (nor more than [`MAX_SECTION_LEN`] for a section's state).
//!
//! # Layout
//!
//! Every integer is little-endian, on every host.
//!
//! ```text
//! preamble   "KSTRLSNP" | format version: u32 | header length: u32
//! header     JSON (Header): Kestrel version, architecture, machine type, CPU vendor and features
//!            | CRC-32 of preamble and header: u32
//! section    "SECT" | name length: u8 | 0: [u8; 3] | version: u32 | padding: u32 | payload length: u64 | name
//!  ...       | CRC-32 of this record header: u32 | padding zero bytes | payload | CRC-32 of the payload: u32
//! end        "END\0" | number of sections: u32 | CRC-32 of those 8 bytes: u32
//! ```
//!
//! A component's section holds its state as JSON (serde). Two sections are the format's own: `memory`, the page
//! map (page size, regions, one bit per page, see [`memory`]), and `memory.pages`, the stored pages, whose
//! padding puts them at a file offset that is a multiple of the page size so that a restore can map them from
//! the file ([`MemoryImage::extents`]) rather than copy them. Each record's header has a checksum of its own, so a
//! corrupted length or name is caught before it is used; each payload has one after it, so the writer can stream
//! pages it has not checksummed yet. The end record's count catches a file that lost a whole section.
//!
//! # Versions
//!
//! Two kinds, each checked before what it governs is read:
//! * the **format version** ([`FORMAT_VERSION`]) covers the framing above and the header. It changes only when
//!   they do. **A Kestrel release restores snapshots of its own format version and of the previous one**
//!   ([`OLDEST_FORMAT_VERSION`] is `FORMAT_VERSION - 1` from format version 2 on), and refuses newer ones (it
//!   cannot know what they mean) and older ones, each with the versions it reads. When the format moves on, the
//!   previous version's reader stays beside the new one for a release, and `tests/fixtures/snapshot-format-v<N>`
//!   keeps a file of each readable version under test (and `tests/fixtures/snapshot-v<N>-probe-flood`, a payload
//!   VM that version saved, `tests/snapshot_fixture.rs`);
//! * a **section version** is the version of one component's state shape. A component that changes its state
//!   bumps its section version, and keeps reading the previous one for as long as the format version it shipped
//!   in is readable: its [`SectionSpec`] lists the versions it reads, [`Section::version`] says which one a file
//!   holds. An added field with a serde default often needs no code beyond the version bump.
//!
//! Firecracker and Cloud Hypervisor restore only snapshots of their own version; QEMU restores older ones by
//! machine type. This policy is the smallest that lets a host be upgraded under a saved guest.
//!
//! # Why JSON for the states, and a crate of its own
//!
//! The states already are serde structs with `deny_unknown_fields` (`devices::persist`): a self-describing
//! encoding keeps that rule meaningful (a newer state's extra field is refused by name, not misread by position)
//! and lets a component read its previous section version through serde defaults. A compact binary encoding
//! (postcard) was measured on an x86 vCPU-sized state (4 KiB XSAVE, 1 KiB LAPIC, 40 MSRs): 6.4 KB and 5.5 us to
//! decode against JSON's 20.8 KB and 78 us. For the payload VMs' 1 to 4 vCPUs that is 0.3 ms of a 10 ms restore
//! budget, and the states are a few KB beside megabytes of memory, so JSON's checks and tooling win for now;
//! changing the encoding later is a format version change confined to [`Section::decode`] and
//! [`Writer::state`].
//!
//! The format is a crate (not a `vmm` module) because it needs no machine: it depends on serde and a CRC only,
//! so its fuzz target and its tests build without KVM, threads or devices, and run on every target (the
//! little-endian framing is tested on s390x under qemu-user).

mod error;
pub mod header;
pub mod memory;
mod reader;
mod record;
#[doc(hidden)]
pub mod testing;
#[cfg(test)]
mod tests;
mod writer;

pub use error::{Error, Result};
pub use header::{CpuIdentity, Header};
pub use memory::{Extent, GuestRegion, GuestRegionMut, MemoryImage, MemoryStats, RegionLayout};
pub use reader::{read_header, read_stream, Expected, Section, SectionSpec, Snapshot, StreamedSnapshot};
pub use record::{check_name, MAX_NAME_LEN};
pub use writer::Writer;

/// The format version this Kestrel writes.
pub const FORMAT_VERSION: u32 = 1;
/// The oldest format version this Kestrel reads (see the version policy above).
pub const OLDEST_FORMAT_VERSION: u32 = 1;

/// The section that holds the page map, and the one that holds the stored pages; no component may use these names.
pub const MEMORY_MAP_SECTION: &str = "memory";
pub const MEMORY_PAGES_SECTION: &str = "memory.pages";
/// The version of the memory sections' layout.
pub const MEMORY_SECTION_VERSION: u32 = 1;

/// The most a section other than the guest's pages may hold: far more than any component's state (a vCPU's is
/// about 20 KiB), and what bounds the reader's allocation for one section whatever its length field says.
pub const MAX_SECTION_LEN: u64 = 64 << 20;

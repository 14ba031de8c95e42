//! Saving a machine to a snapshot file and building one from it (issue 16): the order of the steps, which every
//! architecture shares. What each architecture saves (its devices, irqchip, vCPUs) is its platform's business
//! (`platform::Snapshots`: `components`, `save_vm`, `restore`); the file format is the `snapshot` crate's.
//!
//! Save, with every vCPU held outside the guest: the vCPUs' states (each read by its own thread, after one more
//! entry that completes a half-done I/O instruction), the VM's, then the virtio devices are quiesced (no chain
//! taken, no guest memory written from then on), every device's state, then guest memory, then the devices resume.
//! Restore: the machine is built from the command line as for a cold boot, the file is checked against it before
//! anything runs (header, sections, memory layout), guest memory is loaded, then the VM, vCPUs and devices; the
//! vCPUs start only once everything loaded, so a refused file never runs a half-restored guest.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::{Arc, Mutex};

use devices::persist::Persist;
use serde_json::Value;
use snapshot::{
    CpuIdentity, Expected, Extent, GuestRegion, GuestRegionMut, Header, MemoryImage, RegionLayout, SectionSpec,
    Snapshot, StreamedSnapshot,
};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::populated;
use crate::Error;

/// The version of every component section Kestrel writes so far; a component whose state changes shape bumps its
/// own.
pub const SECTION_VERSION: u32 = 1;

/// The section holding the VM-wide state (irqchip, clock), and each vCPU's.
pub const VM_SECTION: &str = "vm";

pub fn vcpu_section(index: usize) -> String {
    format!("vcpu.{index}")
}

/// A device whose state goes into a snapshot, seen through JSON so that one list holds every kind.
pub trait Saveable: Send + Sync {
    fn save_value(&self) -> Result<Value, String>;
    /// Loads a state decoded from `section`; on `Err` the device is as it was.
    fn restore_value(&self, section: snapshot::Section<'_>) -> Result<(), String>;
}

impl<T: Persist + Send> Saveable for Mutex<T> {
    fn save_value(&self) -> Result<Value, String> {
        let state = self.lock().unwrap_or_else(|p| p.into_inner()).save();
        serde_json::to_value(state).map_err(|e| e.to_string())
    }

    fn restore_value(&self, section: snapshot::Section<'_>) -> Result<(), String> {
        let state: T::State = section.decode().map_err(|e| e.to_string())?;
        self.lock().unwrap_or_else(|p| p.into_inner()).restore(&state).map_err(|e| e.to_string())
    }
}

/// One stateful device of the machine and the section its state goes in.
pub struct Component {
    pub name: String,
    pub device: Arc<dyn Saveable>,
}

impl Component {
    pub fn new(name: impl Into<String>, device: Arc<dyn Saveable>) -> Self {
        Component { name: name.into(), device }
    }
}

/// Everything a save collected before guest memory is written.
pub struct SavedMachine<M, V> {
    pub header: Header,
    pub vm: M,
    pub vcpus: Vec<V>,
    pub devices: Vec<(String, Value)>,
}

/// What a save wrote.
#[derive(Clone, Copy, Debug)]
pub struct SaveStats {
    pub bytes: u64,
    pub pages: u64,
    pub stored_pages: u64,
    pub page_size: u64,
}

/// The host's page size: the unit in which guest memory is stored (and can be mapped back).
pub fn page_size() -> u32 {
    // SAFETY: sysconf only reads system configuration.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(size).unwrap_or(4096)
}

/// Where a save goes.
pub enum SaveTarget<'a> {
    /// Created or truncated, and synced to disk before the save reports success.
    Path(&'a Path),
    /// A descriptor passed by a client or inherited: a pipe or socket is written front to back (no seeking) and
    /// closed after; a regular file is written from where it stands, synced, and closed.
    Fd(OwnedFd),
}

impl SaveTarget<'_> {
    /// What the target is called in an error line.
    pub fn describe(&self) -> String {
        match self {
            SaveTarget::Path(path) => format!("'{}'", path.display()),
            SaveTarget::Fd(_) => "the passed descriptor".into(),
        }
    }
}

/// Counts what goes through, for `query-migrate` (a pipe has no length to ask afterwards).
struct Counted<W> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes `machine` and guest memory to `target`; a file is synced to disk before this returns.
pub fn write<M: serde::Serialize, V: serde::Serialize>(
    target: SaveTarget<'_>,
    machine: &SavedMachine<M, V>,
    memory: &GuestMemoryMmap,
) -> Result<SaveStats, String> {
    let what = target.describe();
    let file = match target {
        SaveTarget::Path(path) => File::create(path).map_err(|e| format!("cannot create {what}: {e}"))?,
        SaveTarget::Fd(fd) => File::from(fd),
    };
    // Only a regular file can (and must) be synced; a pipe refuses fsync.
    let regular_file = file.metadata().map(|m| m.file_type().is_file()).unwrap_or(false);
    let failed = |e: snapshot::Error| format!("writing {what}: {e}");
    let out = Counted { inner: BufWriter::with_capacity(1 << 20, file), bytes: 0 };
    let mut writer = snapshot::Writer::new(out, &machine.header).map_err(failed)?;
    writer.state(VM_SECTION, SECTION_VERSION, &machine.vm).map_err(failed)?;
    for (index, vcpu) in machine.vcpus.iter().enumerate() {
        writer.state(&vcpu_section(index), SECTION_VERSION, vcpu).map_err(failed)?;
    }
    for (name, state) in &machine.devices {
        writer.state(name, SECTION_VERSION, state).map_err(failed)?;
    }
    let page_size = page_size();
    let guest_bytes: Vec<(u64, &[u8])> = memory
        .iter()
        .map(|region| {
            // SAFETY: the region is the VMM's own mapping of `len` bytes, alive while `memory` is borrowed; the
            // vCPUs are held outside the guest and the devices quiesced, so nothing writes it while it is read.
            let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr(), region.len() as usize) };
            (region.start_addr().0, bytes)
        })
        .collect();
    // Only the pages the host ever populated are read (`None`, where it cannot tell: all of them).
    let populated: Vec<Option<Vec<u8>>> =
        guest_bytes.iter().map(|(_, bytes)| populated::populated_pages(bytes, page_size)).collect();
    let regions: Vec<GuestRegion<'_>> = guest_bytes
        .iter()
        .zip(&populated)
        .map(|(&(guest_addr, bytes), populated)| GuestRegion { guest_addr, bytes, populated: populated.as_deref() })
        .collect();
    let stats = writer.memory(page_size, &regions).map_err(failed)?;
    let out = writer.finish().map_err(failed)?;
    let bytes = out.bytes;
    let file = out.inner.into_inner().map_err(|e| format!("writing {what}: {}", e.error()))?;
    if regular_file {
        file.sync_all().map_err(|e| format!("writing {what}: {e}"))?;
    }
    Ok(SaveStats { bytes, pages: stats.pages, stored_pages: stats.stored_pages, page_size: u64::from(page_size) })
}

/// What the command line builds, for checking a snapshot against it.
pub struct Machine<'a> {
    pub machine_type: &'a str,
    pub cpu: CpuIdentity,
    pub ram_regions: Vec<(u64, u64)>,
    pub vcpus: usize,
    pub components: &'a [Component],
}

/// A snapshot checked against the machine the command line builds: a file whose pages are still to be loaded, or
/// a stream already read whole, its pages in guest memory.
pub enum Incoming {
    File(Snapshot<BufReader<File>>),
    Streamed(StreamedSnapshot),
}

impl Incoming {
    fn section(&self, name: &str) -> snapshot::Result<snapshot::Section<'_>> {
        match self {
            Incoming::File(snapshot) => snapshot.section(name),
            Incoming::Streamed(snapshot) => snapshot.section(name),
        }
    }
}

/// What a snapshot for `machine` must be.
fn expected(machine: &Machine<'_>) -> Expected {
    let mut sections = vec![SectionSpec::required(VM_SECTION, SECTION_VERSION..=SECTION_VERSION)];
    sections
        .extend((0..machine.vcpus).map(|i| SectionSpec::required(vcpu_section(i), SECTION_VERSION..=SECTION_VERSION)));
    sections
        .extend(machine.components.iter().map(|c| SectionSpec::required(&c.name, SECTION_VERSION..=SECTION_VERSION)));
    Expected {
        arch: std::env::consts::ARCH.into(),
        machine: machine.machine_type.into(),
        cpu: machine.cpu.clone(),
        memory: machine.ram_regions.iter().map(|&(guest_addr, size)| RegionLayout { guest_addr, size }).collect(),
        sections,
    }
}

/// Opens `path` and checks everything in it but the pages' contents against `machine`: one error line if it does
/// not fit.
pub fn open(path: &Path, machine: &Machine<'_>) -> Result<Incoming, Error> {
    let refused = |e: snapshot::Error| Error::Snapshot(format!("cannot restore '{}': {e}", path.display()));
    let file = File::open(path).map_err(|source| Error::Open { what: "snapshot", path: path.to_path_buf(), source })?;
    let snapshot = Snapshot::open(BufReader::with_capacity(1 << 20, file), &expected(machine)).map_err(refused)?;
    Ok(Incoming::File(snapshot))
}

/// Reads a snapshot streamed on `fd` (a pipe), front to back, checking it against `machine` and copying its pages
/// into guest memory, which must be fresh (all zero) and used by no vCPU or device yet. On `Err` guest memory holds
/// part of the pages: the guest must not run.
pub fn read_stream(fd: OwnedFd, machine: &Machine<'_>, memory: &GuestMemoryMmap) -> Result<Incoming, Error> {
    let refused = |e: snapshot::Error| Error::Snapshot(format!("cannot restore from the stream: {e}"));
    let source = BufReader::with_capacity(1 << 20, File::from(fd));
    let snapshot = snapshot::read_stream(source, &expected(machine), &mut guest_regions(memory)).map_err(refused)?;
    Ok(Incoming::Streamed(snapshot))
}

/// Guest memory as the snapshot crate reads it after a restore.
fn guest_regions_to_read(memory: &GuestMemoryMmap) -> Vec<GuestRegion<'_>> {
    memory
        .iter()
        .map(|region| {
            // SAFETY: the region is the VMM's own mapping of `len` bytes, alive while `memory` is borrowed; no vCPU
            // runs and no device works yet (a restore only), so nothing writes it meanwhile.
            let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr(), region.len() as usize) };
            GuestRegion { guest_addr: region.start_addr().0, bytes, populated: None }
        })
        .collect()
}

/// Guest memory as the snapshot crate writes into it.
fn guest_regions(memory: &GuestMemoryMmap) -> Vec<GuestRegionMut<'_>> {
    memory
        .iter()
        .map(|region| {
            // SAFETY: the region is the VMM's own mapping of `len` bytes, alive while `memory` is borrowed; no vCPU
            // runs and no device works yet (a restore only), so this is the only access to it.
            let bytes = unsafe { std::slice::from_raw_parts_mut(region.as_ptr(), region.len() as usize) };
            GuestRegionMut { guest_addr: region.start_addr().0, bytes }
        })
        .collect()
}

/// A file guest memory is mapped from, by identity (device and inode): it must not be written while Kestrel
/// runs, so a save to it is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MappedFile {
    device: u64,
    inode: u64,
}

impl MappedFile {
    fn of(metadata: &std::fs::Metadata) -> Self {
        MappedFile { device: metadata.dev(), inode: metadata.ino() }
    }

    /// The file `fd` is open on, if it can be asked (without a `dup`, which the main thread may not make).
    fn of_fd(fd: &OwnedFd) -> Option<Self> {
        let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: fstat writes a `stat` into the buffer given, and `fd` is open while borrowed.
        if unsafe { libc::fstat(fd.as_raw_fd(), stat.as_mut_ptr()) } != 0 {
            return None;
        }
        // SAFETY: fstat succeeded, so it filled the buffer.
        let stat = unsafe { stat.assume_init() };
        Some(MappedFile { device: stat.st_dev, inode: stat.st_ino })
    }
}

/// At most this many runs of pages are mapped from the file. Each mapping splits guest memory's anonymous mapping
/// (up to two more areas in the kernel's list, which `vm.max_map_count`, 65530 by default, bounds for the whole
/// process); past this, the smallest runs are copied instead, which costs about what mapping them would.
const MAX_MAPPED_EXTENTS: usize = 4096;

/// Loads a file snapshot's pages into guest memory, which must be fresh (all zero, as `create_guest_memory`
/// leaves it) and not yet registered with any VM; a streamed one's are there already. Returns the file the
/// memory is now mapped from, if it is.
///
/// A regular file's pages are mapped from it, `MAP_PRIVATE | MAP_FIXED` over guest memory run by run (copy on
/// write: the guest's writes never reach the file), so a restore costs neither a copy nor a fault per page
/// before the guest runs; the guest's first access to each page faults it in from the page cache. The stored
/// pages' checksum is then checked by reading them through the mapping (which also brings them into the page
/// cache, as the guest would), so a corrupted page is still refused before the guest runs; the header's and
/// sections' checksums were checked when the file was opened. What no check can cover: a page not yet written
/// by the guest is the file's page, so a change to the file afterwards reaches the guest, and a file truncated
/// under it makes the access fail (the vCPU's with an error, a device's with SIGBUS). The file must stay as it is
/// while the guest runs: Kestrel refuses to save over it (`check_not_mapped`); nothing else can be stopped.
///
/// Anything else (a device node, or pages not aligned to this host's page size) is copied, as a stream is.
pub fn load_memory(incoming: &mut Incoming, memory: &GuestMemoryMmap) -> Result<Option<MappedFile>, Error> {
    let failed = |e: String| Error::Snapshot(format!("cannot restore guest memory: {e}"));
    let Incoming::File(snapshot) = incoming else {
        return Ok(None);
    };
    let file = snapshot.get_ref().get_ref();
    let metadata = file.metadata().map_err(|e| failed(e.to_string()))?;
    let host_page = page_size();
    if !metadata.file_type().is_file() || !snapshot.memory().page_size().is_multiple_of(host_page) {
        snapshot.read_memory_into(&mut guest_regions(memory)).map_err(|e| failed(e.to_string()))?;
        return Ok(None);
    }
    map_extents(file, snapshot.memory(), memory, MAX_MAPPED_EXTENTS).map_err(failed)?;
    snapshot.check_memory(&guest_regions_to_read(memory)).map_err(|e| failed(e.to_string()))?;
    Ok(Some(MappedFile::of(&metadata)))
}

/// Maps `image`'s runs of pages from `file` over guest memory, the `max_mapped` largest ones; copies the others.
fn map_extents(file: &File, image: &MemoryImage, memory: &GuestMemoryMmap, max_mapped: usize) -> Result<(), String> {
    let extents: Vec<Extent> = image.extents().collect();
    let mut mapped = vec![true; extents.len()];
    if extents.len() > max_mapped {
        let mut by_size: Vec<usize> = (0..extents.len()).collect();
        by_size.sort_by_key(|&i| std::cmp::Reverse(extents[i].len));
        for &i in &by_size[max_mapped..] {
            mapped[i] = false;
        }
    }
    for (extent, map) in extents.iter().zip(mapped) {
        let outside = || format!("{} bytes at {:#x} lie outside guest memory", extent.len, extent.guest_addr);
        let region = memory.find_region(GuestAddress(extent.guest_addr)).ok_or_else(outside)?;
        let offset = extent.guest_addr - region.start_addr().0;
        if offset.checked_add(extent.len).is_none_or(|end| end > region.len()) {
            return Err(outside());
        }
        // SAFETY: inside the region, checked above.
        let host = unsafe { region.as_ptr().add(offset as usize) };
        if map {
            let file_offset = libc::off_t::try_from(extent.file_offset)
                .map_err(|_| format!("pages at byte {} of the file", extent.file_offset))?;
            // SAFETY: replaces `len` bytes of the VMM's own guest memory mapping (checked to hold them above) with
            // a private mapping of the file: the range stays mapped, readable and writable, as the region that owns
            // it expects, and no VM, vCPU or device uses guest memory yet (a restore's first boot, before the VM).
            // The offsets are multiples of the host's page size (the caller checked the snapshot's page size).
            let at = unsafe {
                libc::mmap(
                    host.cast(),
                    extent.len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_FIXED,
                    file.as_raw_fd(),
                    file_offset,
                )
            };
            if at == libc::MAP_FAILED {
                let error = std::io::Error::last_os_error();
                return Err(format!("mapping {} bytes at {:#x} from the file: {error}", extent.len, extent.guest_addr));
            }
        } else {
            // SAFETY: `len` bytes inside the region (checked above), the VMM's own mapping, which nothing else
            // uses yet (see above).
            let bytes = unsafe { std::slice::from_raw_parts_mut(host, extent.len as usize) };
            file.read_exact_at(bytes, extent.file_offset)
                .map_err(|e| format!("reading the pages at byte {} of the file: {e}", extent.file_offset))?;
        }
    }
    Ok(())
}

/// Refuses to save to `target` when it is the file guest memory is mapped from: truncating it would take the
/// guest's pages away (the save would read them) and overwrite what the guest has not copied yet.
pub fn check_not_mapped(target: &SaveTarget<'_>, mapped: Option<MappedFile>) -> Result<(), String> {
    let Some(mapped) = mapped else {
        return Ok(());
    };
    let target_file = match target {
        SaveTarget::Path(path) => std::fs::metadata(path).ok().map(|m| MappedFile::of(&m)),
        SaveTarget::Fd(fd) => MappedFile::of_fd(fd),
    };
    match target_file == Some(mapped) {
        true => Err(format!(
            "cannot save to {}: the guest's memory is mapped from it (restored from that file); save to another file",
            target.describe()
        )),
        false => Ok(()),
    }
}

/// Loads every component's state from `incoming`; the first refusal is the error.
pub fn restore_components(incoming: &Incoming, components: &[Component]) -> Result<(), Error> {
    for component in components {
        let section = incoming.section(&component.name).map_err(|e| Error::Snapshot(e.to_string()))?;
        component
            .device
            .restore_value(section)
            .map_err(|e| Error::Snapshot(format!("cannot restore {}: {e}", component.name)))?;
    }
    Ok(())
}

/// The state in section `name`, decoded.
pub fn state<T: serde::de::DeserializeOwned>(incoming: &Incoming, name: &str) -> Result<T, Error> {
    incoming.section(name).and_then(|section| section.decode()).map_err(|e| Error::Snapshot(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Snapshot-shaped guest memory: runs of 1, 3, 2 and 5 pages with data, zero pages between.
    fn memory_with_runs(page: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; 32 * page];
        for (first, pages) in [(1, 1), (4, 3), (10, 2), (20, 5)] {
            for p in first..first + pages {
                bytes[p * page..(p + 1) * page].fill(p as u8 + 1);
            }
        }
        bytes
    }

    #[test]
    fn the_largest_runs_are_mapped_the_rest_copied_and_all_restored() {
        let page = page_size() as usize;
        let saved = memory_with_runs(page);
        let path = std::env::temp_dir().join(format!("kestrel-map-extents-{}.ksnap", std::process::id()));
        let header = Header::new("pc", CpuIdentity::default());
        let mut writer = snapshot::Writer::new(File::create(&path).unwrap(), &header).unwrap();
        writer.memory(page as u32, &[GuestRegion { guest_addr: 0, bytes: &saved, populated: None }]).unwrap();
        writer.finish().unwrap();
        let expected = Expected {
            arch: std::env::consts::ARCH.into(),
            machine: "pc".into(),
            cpu: CpuIdentity::default(),
            memory: vec![RegionLayout { guest_addr: 0, size: saved.len() as u64 }],
            sections: Vec::new(),
        };
        let snapshot = Snapshot::open(BufReader::new(File::open(&path).unwrap()), &expected).unwrap();
        std::fs::remove_file(&path).unwrap();

        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), saved.len())]).unwrap();
        map_extents(snapshot.get_ref().get_ref(), snapshot.memory(), &memory, 2).unwrap();
        let region = memory.iter().next().unwrap();
        // SAFETY: the test's own guest memory, `len` bytes, used by nothing else.
        let restored = unsafe { std::slice::from_raw_parts(region.as_ptr(), region.len() as usize) };
        assert!(restored == saved.as_slice(), "guest memory differs from what was saved");
        snapshot.check_memory(&guest_regions_to_read(&memory)).unwrap();

        // The two largest runs (5 and 3 pages) are mappings of the (now unlinked) file; the others were copied.
        let start = region.as_ptr() as usize;
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let mut mapped: Vec<(usize, usize)> = maps
            .lines()
            .filter(|line| line.contains("kestrel-map-extents"))
            .map(|line| {
                let (low, high) = line.split_whitespace().next().unwrap().split_once('-').unwrap();
                let (low, high) = (usize::from_str_radix(low, 16).unwrap(), usize::from_str_radix(high, 16).unwrap());
                ((low - start) / page, (high - low) / page)
            })
            .collect();
        mapped.sort();
        assert_eq!(mapped, [(4, 3), (20, 5)]);
    }
}

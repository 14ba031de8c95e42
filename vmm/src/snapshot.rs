//! Saving a machine to a snapshot file and building one from it (issue 16): the order of the steps, which every
//! architecture shares. What each architecture saves (its devices, irqchip, vCPUs) is its platform's business
//! (`Platform::components`, `Platform::save_vm`, `Platform::restore`); the file format is the `snapshot` crate's.
//!
//! Save, with every vCPU held outside the guest: the vCPUs' states (each read by its own thread, after one more
//! entry that completes a half-done I/O instruction), the VM's, then the virtio devices are quiesced (no chain
//! taken, no guest memory written from then on), every device's state, then guest memory, then the devices resume.
//! Restore: the machine is built from the command line as for a cold boot, the file is checked against it before
//! anything runs (header, sections, memory layout), guest memory is loaded, then the VM, vCPUs and devices; the
//! vCPUs start only once everything loaded, so a refused file never runs a half-restored guest.

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::Path;
use std::sync::{Arc, Mutex};

use devices::persist::Persist;
use serde_json::Value;
use snapshot::{CpuIdentity, Expected, GuestRegion, GuestRegionMut, Header, RegionLayout, SectionSpec, Snapshot};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

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

/// Writes `machine` and guest memory to `path` (created or truncated), synced to disk before it returns.
pub fn write<M: serde::Serialize, V: serde::Serialize>(
    path: &Path,
    machine: &SavedMachine<M, V>,
    memory: &GuestMemoryMmap,
) -> Result<SaveStats, String> {
    let file = File::create(path).map_err(|e| format!("cannot create '{}': {e}", path.display()))?;
    let failed = |e: snapshot::Error| format!("writing '{}': {e}", path.display());
    let mut writer = snapshot::Writer::new(BufWriter::with_capacity(1 << 20, file), &machine.header).map_err(failed)?;
    writer.state(VM_SECTION, SECTION_VERSION, &machine.vm).map_err(failed)?;
    for (index, vcpu) in machine.vcpus.iter().enumerate() {
        writer.state(&vcpu_section(index), SECTION_VERSION, vcpu).map_err(failed)?;
    }
    for (name, state) in &machine.devices {
        writer.state(name, SECTION_VERSION, state).map_err(failed)?;
    }
    let regions: Vec<GuestRegion<'_>> = memory
        .iter()
        .map(|region| {
            // SAFETY: the region is the VMM's own mapping of `len` bytes, alive while `memory` is borrowed; the
            // vCPUs are held outside the guest and the devices quiesced, so nothing writes it while it is read.
            let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr(), region.len() as usize) };
            GuestRegion { guest_addr: region.start_addr().0, bytes }
        })
        .collect();
    let page_size = page_size();
    let stats = writer.memory(page_size, &regions).map_err(failed)?;
    let file = writer.finish().map_err(failed)?;
    let file = file.into_inner().map_err(|e| format!("writing '{}': {}", path.display(), e.error()))?;
    file.sync_all().map_err(|e| format!("writing '{}': {e}", path.display()))?;
    let bytes = file.metadata().map(|m| m.len()).unwrap_or_default();
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

/// A snapshot checked against the machine the command line builds.
pub type Incoming = Snapshot<BufReader<File>>;

/// Opens `path` and checks everything in it but the pages' contents against `machine`: one error line if it does
/// not fit.
pub fn open(path: &Path, machine: &Machine<'_>) -> Result<Incoming, Error> {
    let refused = |e: snapshot::Error| Error::Snapshot(format!("cannot restore '{}': {e}", path.display()));
    let file = File::open(path).map_err(|source| Error::Open { what: "snapshot", path: path.to_path_buf(), source })?;
    let mut sections = vec![SectionSpec::required(VM_SECTION, SECTION_VERSION..=SECTION_VERSION)];
    sections
        .extend((0..machine.vcpus).map(|i| SectionSpec::required(vcpu_section(i), SECTION_VERSION..=SECTION_VERSION)));
    sections
        .extend(machine.components.iter().map(|c| SectionSpec::required(&c.name, SECTION_VERSION..=SECTION_VERSION)));
    let expected = Expected {
        arch: std::env::consts::ARCH.into(),
        machine: machine.machine_type.into(),
        cpu: machine.cpu.clone(),
        memory: machine.ram_regions.iter().map(|&(guest_addr, size)| RegionLayout { guest_addr, size }).collect(),
        sections,
    };
    Snapshot::open(BufReader::with_capacity(1 << 20, file), &expected).map_err(refused)
}

/// Copies the snapshot's pages into guest memory, which must be fresh (all zero), and checks their checksum.
pub fn load_memory(incoming: &mut Incoming, memory: &GuestMemoryMmap) -> Result<(), Error> {
    let mut regions: Vec<GuestRegionMut<'_>> = memory
        .iter()
        .map(|region| {
            // SAFETY: the region is the VMM's own mapping of `len` bytes, alive while `memory` is borrowed; no vCPU
            // runs and no device works yet, so this is the only access to it.
            let bytes = unsafe { std::slice::from_raw_parts_mut(region.as_ptr(), region.len() as usize) };
            GuestRegionMut { guest_addr: region.start_addr().0, bytes }
        })
        .collect();
    incoming.read_memory_into(&mut regions).map_err(|e| Error::Snapshot(format!("cannot restore guest memory: {e}")))
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
    incoming.state(name).map_err(|e| Error::Snapshot(e.to_string()))
}

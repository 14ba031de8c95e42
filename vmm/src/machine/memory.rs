//! Guest memory: its size checked against the host, allocated in the platform's regions, mapped into each VM.

use hypervisor::Vm;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::config::MIN_MEMORY_BYTES;
use crate::Error;

pub(super) fn host_memory_bytes() -> u64 {
    // SAFETY: sysconf only reads system configuration.
    let (pages, page_size) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    (pages.max(0) as u64).saturating_mul(page_size.max(0) as u64)
}

pub(super) fn check_memory_size(bytes: u64) -> Result<(), Error> {
    if bytes < MIN_MEMORY_BYTES {
        return Err(Error::MemoryTooSmall { requested: bytes, min: MIN_MEMORY_BYTES });
    }
    let host = host_memory_bytes();
    if bytes > host {
        return Err(Error::MemoryTooLarge { requested: bytes, host });
    }
    Ok(())
}

/// Guest RAM in the platform's `regions` (start, length).
pub(super) fn create_guest_memory(regions: Vec<(u64, u64)>) -> Result<GuestMemoryMmap, Error> {
    let ranges: Vec<(GuestAddress, usize)> =
        regions.into_iter().map(|(start, len)| (GuestAddress(start), len as usize)).collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| Error::GuestMemory(e.to_string()))
}

/// Leaves guest memory out of Kestrel's core dumps (`-machine dump-guest-core=off`): a dump of a crashed Kestrel
/// then holds no guest data and stays small. Called at every boot, after a restore may have mapped a snapshot
/// file over parts of it (a new mapping does not keep the old one's advice).
pub(super) fn exclude_from_core_dumps(memory: &GuestMemoryMmap) -> Result<(), Error> {
    for region in memory.iter() {
        // SAFETY: advice on the VMM's own guest memory mapping, whole regions; MADV_DONTDUMP changes only what a
        // core dump holds, never the memory's contents.
        let done = unsafe { libc::madvise(region.as_ptr().cast(), region.len() as usize, libc::MADV_DONTDUMP) };
        if done != 0 {
            return Err(Error::Host("leaving guest memory out of core dumps", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

pub(super) fn map_guest_memory<V: Vm>(vm: &V, memory: &GuestMemoryMmap) -> Result<(), Error> {
    for (slot, region) in memory.iter().enumerate() {
        let host_addr = region.as_ptr() as u64;
        // SAFETY: the mapping belongs to the VMM's guest memory, which outlives every VM (each boot's VM is
        // dropped before the VMM), and is used for nothing but this guest's RAM.
        unsafe { vm.map_memory(slot as u32, region.start_addr().0, region.len(), host_addr) }?;
    }
    Ok(())
}

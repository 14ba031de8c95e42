//! Which pages of guest memory the host ever populated, so that a save reads only those (issue 16).
//!
//! A 256 MiB guest that touched a few hundred KiB would otherwise have all of its memory read to find the non-zero
//! pages, and every page never touched faulted in (zero-filled) just to be found zero: most of a save's time.
//! The kernel knows better. In a private anonymous mapping a page is in one of three states, which
//! `/proc/self/pagemap` reports (Documentation/admin-guide/mm/pagemap.rst): present (bit 63), swapped out
//! (bit 62), or neither, which means it was never written (or was discarded) and reads as zero. A page that is
//! present or swapped may hold data and is read; the rest are skipped.
//!
//! Not `mincore`: it reports residency, and a swapped-out anonymous page is not resident yet holds data.
//!
//! The rule holds for private anonymous mappings only. A file mapping's page that is not in the page tables may
//! still hold the file's data: after a restore that mapped pages from the snapshot file, those ranges are
//! private *file* mappings, and so is anything mapped some other way. `/proc/self/maps` says which kind each
//! range is; every page outside a private anonymous mapping is treated as populated.
//!
//! Anything that cannot be read (no procfs, a kernel that refuses) gives `None`: the caller then reads every
//! page, as before, slower but exact.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::ops::Range;

/// Pagemap entries read per `read`: 64K entries (512 KiB) cover 256 MiB of 4 KiB pages.
const PAGEMAP_CHUNK_ENTRIES: usize = 64 << 10;
const PAGE_PRESENT: u64 = 1 << 63;
const PAGE_SWAPPED: u64 = 1 << 62;

/// A bitmap, one bit per `page_size` page of `bytes` (page `8 * j + i` is bit `i` of byte `j`, as the snapshot's
/// page map), set where the page may hold data; `None` if the host cannot tell. `bytes` must be page-aligned.
/// The memory must not be remapped meanwhile (a save runs with the guest stopped).
pub fn populated_pages(bytes: &[u8], page_size: u32) -> Option<Vec<u8>> {
    let host_page = crate::snapshot::page_size() as usize;
    let page = page_size as usize;
    let start = bytes.as_ptr() as usize;
    if page < host_page || !page.is_multiple_of(host_page) || !start.is_multiple_of(page) {
        return None;
    }
    let pages = bytes.len() / page;
    let mut bits = vec![0xffu8; pages.div_ceil(8)];
    if !pages.is_multiple_of(8) {
        *bits.last_mut().expect("pages % 8 != 0, so at least one byte") = (1 << (pages % 8)) - 1;
    }
    let mut pagemap = File::open("/proc/self/pagemap").ok()?;
    let host_pages_per_page = page / host_page;
    for anonymous in private_anonymous_ranges(start..start + bytes.len())? {
        // Whole pages only: a page partly in another kind of mapping stays populated.
        let first = anonymous.start.next_multiple_of(page);
        let end = anonymous.end / page * page;
        if first >= end {
            continue;
        }
        let first_page = (first - start) / page;
        let mut unpopulated_host_pages = 0;
        let mut page_index = first_page;
        let mut entries = vec![0u8; 8 * PAGEMAP_CHUNK_ENTRIES];
        let mut host_addr = first;
        while host_addr < end {
            let count = ((end - host_addr) / host_page).min(PAGEMAP_CHUNK_ENTRIES);
            let chunk = &mut entries[..8 * count];
            pagemap.seek(SeekFrom::Start((host_addr / host_page * 8) as u64)).ok()?;
            pagemap.read_exact(chunk).ok()?;
            for entry in chunk.chunks_exact(8) {
                let entry = u64::from_le_bytes(entry.try_into().expect("chunks of 8"));
                if entry & (PAGE_PRESENT | PAGE_SWAPPED) == 0 {
                    unpopulated_host_pages += 1;
                }
                // Chunks hold whole host pages, and pages are whole host pages: count per page as entries pass.
                host_addr += host_page;
                if (host_addr - first).is_multiple_of(page) {
                    if unpopulated_host_pages == host_pages_per_page {
                        bits[page_index / 8] &= !(1 << (page_index % 8));
                    }
                    unpopulated_host_pages = 0;
                    page_index += 1;
                }
            }
        }
    }
    Some(bits)
}

/// The parts of `range` that lie in private anonymous mappings, from `/proc/self/maps`: private (`p`) and backed by
/// no file (inode 0).
fn private_anonymous_ranges(range: Range<usize>) -> Option<Vec<Range<usize>>> {
    let maps = BufReader::new(File::open("/proc/self/maps").ok()?);
    let mut found = Vec::new();
    for line in maps.lines() {
        let line = line.ok()?;
        let mut fields = line.split_whitespace();
        let (Some(addresses), Some(perms), Some(_offset), Some(_device), Some(inode)) =
            (fields.next(), fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return None;
        };
        let (low, high) = addresses.split_once('-')?;
        let mapping = usize::from_str_radix(low, 16).ok()?..usize::from_str_radix(high, 16).ok()?;
        let overlap = mapping.start.max(range.start)..mapping.end.min(range.end);
        if overlap.start < overlap.end && perms.as_bytes().get(3) == Some(&b'p') && inode == "0" {
            found.push(overlap);
        }
    }
    Some(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A private anonymous mapping of `pages` host pages, without transparent huge pages (one write would
    /// populate 512 pages), unmapped on drop.
    struct Anonymous {
        addr: *mut u8,
        len: usize,
    }

    impl Anonymous {
        fn new(pages: usize) -> Self {
            let len = pages * crate::snapshot::page_size() as usize;
            // SAFETY: a new private anonymous mapping, owned by this value.
            let addr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            assert_ne!(addr, libc::MAP_FAILED);
            // SAFETY: advice on the mapping just made; failure only leaves huge pages possible.
            unsafe { libc::madvise(addr, len, libc::MADV_NOHUGEPAGE) };
            Anonymous { addr: addr.cast(), len }
        }

        fn bytes(&mut self) -> &mut [u8] {
            // SAFETY: the mapping is `len` bytes, alive and only reached through `self`.
            unsafe { std::slice::from_raw_parts_mut(self.addr, self.len) }
        }
    }

    impl Drop for Anonymous {
        fn drop(&mut self) {
            // SAFETY: the mapping this value made.
            unsafe { libc::munmap(self.addr.cast(), self.len) };
        }
    }

    fn set_bits(bits: &[u8]) -> Vec<usize> {
        (0..bits.len() * 8).filter(|&i| bits[i / 8] & (1 << (i % 8)) != 0).collect()
    }

    #[test]
    fn only_pages_written_or_read_are_populated() {
        let page = crate::snapshot::page_size() as usize;
        let mut memory = Anonymous::new(37);
        let bytes = memory.bytes();
        bytes[3 * page + 5] = 1;
        bytes[20 * page] = 2;
        bytes[21 * page] = 3;
        bytes[21 * page] = 0; // written, holds zeros again: still populated, the scan finds it zero
                              // A read maps the shared zero page: present, so populated too.
        assert_eq!(std::hint::black_box(bytes[36 * page + 1]), 0);
        let bits = populated_pages(bytes, page as u32).expect("this host has /proc/self/pagemap");
        assert_eq!(set_bits(&bits), [3, 20, 21, 36]);
    }

    #[test]
    fn the_save_stores_what_a_full_scan_stores() {
        let page = crate::snapshot::page_size() as usize;
        let mut memory = Anonymous::new(300);
        let bytes = memory.bytes();
        for (i, value) in [(0, 9u8), (7, 1), (8, 0), (64, 4), (65, 5), (299, 6)] {
            bytes[i * page + i] = value;
        }
        let populated = populated_pages(bytes, page as u32).expect("this host has /proc/self/pagemap");
        let mut full = Vec::new();
        let mut skipping = Vec::new();
        for (out, populated) in [(&mut full, None), (&mut skipping, Some(&populated[..]))] {
            let header = snapshot::Header::new("test", snapshot::CpuIdentity::default());
            let mut writer = snapshot::Writer::new(&mut *out, &header).unwrap();
            let region = snapshot::GuestRegion { guest_addr: 0, bytes, populated };
            let stats = writer.memory(page as u32, &[region]).unwrap();
            assert_eq!(stats.stored_pages, 5);
            writer.finish().unwrap();
        }
        assert_eq!(skipping, full);
    }

    #[test]
    fn pages_in_a_file_mapping_count_as_populated() {
        let page = crate::snapshot::page_size() as usize;
        let mut memory = Anonymous::new(16);
        let file = tempfile_with(&vec![7u8; 4 * page]);
        // SAFETY: replaces pages 4 to 7 of the test's own mapping with the file's, never touched here.
        let mapped = unsafe {
            libc::mmap(
                memory.addr.add(4 * page).cast(),
                4 * page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
            )
        };
        assert_ne!(mapped, libc::MAP_FAILED);
        let bits = populated_pages(memory.bytes(), page as u32).expect("this host has /proc/self/pagemap");
        assert_eq!(set_bits(&bits), [4, 5, 6, 7]);
    }

    fn tempfile_with(bytes: &[u8]) -> File {
        let path = std::env::temp_dir().join(format!("kestrel-populated-{}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        let file = File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }
}

//! Guest memory in a snapshot: a page map (one bit per page) and the pages that are not all zero.
//!
//! Zero pages are not stored: a fresh guest's memory is mostly zero, and a restore gets zero pages for free from a
//! fresh anonymous mapping. The stored pages follow the map in address order, contiguously, starting at a file
//! offset that is a multiple of the page size, so a restore can map each run of stored pages from the file
//! (`MAP_PRIVATE | MAP_FIXED` over the guest's anonymous memory) instead of copying them: see
//! [`MemoryImage::extents`].
//!
//! The map is a bitmap, not a list of runs, because its size then follows from the memory layout alone: a reader
//! compares the layout with the machine's before it reads the map, so what it holds is bounded by the memory the
//! caller expects, never by a count in the file. (256 MiB of 4 KiB pages is an 8 KiB map.)

use crate::error::{size, Error, Result};
use crate::record::le_u32;
use crate::record::le_u64;

/// The smallest and largest page sizes a snapshot may use: x86's 4 KiB up to arm64's 64 KiB.
pub const MIN_PAGE_SIZE: u32 = 4 << 10;
pub const MAX_PAGE_SIZE: u32 = 64 << 10;
/// More regions than any machine lays out; bounds the map's header.
pub const MAX_REGIONS: usize = 1024;

/// Where a region of guest memory sits and how large it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionLayout {
    pub guest_addr: u64,
    pub size: u64,
}

/// A region of guest memory to save, as the VMM maps it. The guest must not run while the writer reads it.
#[derive(Clone, Copy, Debug)]
pub struct GuestRegion<'a> {
    pub guest_addr: u64,
    pub bytes: &'a [u8],
    /// Which pages may hold data, one bit per page in the page map's order (page `8 * j + i` is bit `i` of byte
    /// `j`): a page whose bit is clear is known to read as zero (the host never populated it) and is not read at
    /// all, which saves faulting in memory the guest never touched. `None`: every page is read and checked.
    pub populated: Option<&'a [u8]>,
}

/// A region of guest memory to restore into. It must hold zeros (a fresh anonymous mapping): only the stored
/// pages are written, so that zero pages are never touched and cost no memory.
#[derive(Debug)]
pub struct GuestRegionMut<'a> {
    pub guest_addr: u64,
    pub bytes: &'a mut [u8],
}

/// What the writer stored of guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryStats {
    pub pages: u64,
    pub stored_pages: u64,
}

/// Checks a memory layout: a supported page size, 1 to [`MAX_REGIONS`] regions, each non-empty and page-aligned,
/// in ascending address order without overlap. `Err` is the problem.
pub(crate) fn check_layout(page_size: u32, regions: &[RegionLayout]) -> std::result::Result<(), String> {
    if !page_size.is_power_of_two() || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size) {
        return Err(format!("page size {page_size} is not a power of two from {MIN_PAGE_SIZE} to {MAX_PAGE_SIZE}"));
    }
    if regions.is_empty() || regions.len() > MAX_REGIONS {
        return Err(format!("{} memory regions (1 to {MAX_REGIONS} allowed)", regions.len()));
    }
    let page = u64::from(page_size);
    let mut next_free = 0;
    for (i, region) in regions.iter().enumerate() {
        let Some(end) = region.guest_addr.checked_add(region.size) else {
            return Err(format!(
                "region {i} ({:#x} + {:#x}) wraps past the address space",
                region.guest_addr, region.size
            ));
        };
        if region.size == 0 || !region.guest_addr.is_multiple_of(page) || !region.size.is_multiple_of(page) {
            return Err(format!(
                "region {i} ({} at {:#x}) is empty or not aligned to the {page}-byte page",
                size(region.size),
                region.guest_addr
            ));
        }
        if i > 0 && region.guest_addr < next_free {
            return Err(format!("region {i} at {:#x} overlaps or precedes the one before it", region.guest_addr));
        }
        next_free = end;
    }
    Ok(())
}

/// A layout as an error message shows it: "1 MiB at 0x0, 64 KiB at 0x100000000".
fn describe(regions: &[RegionLayout]) -> String {
    regions.iter().map(|r| format!("{} at {:#x}", size(r.size), r.guest_addr)).collect::<Vec<_>>().join(", ")
}

/// Refuses a snapshot whose memory layout is not the machine's: a different total size first (the usual mistake,
/// a different `-m`), else different regions.
pub(crate) fn check_layout_matches(snapshot: &[RegionLayout], expected: &[RegionLayout]) -> Result<()> {
    if snapshot == expected {
        return Ok(());
    }
    let total = |regions: &[RegionLayout]| regions.iter().fold(0u64, |sum, r| sum.saturating_add(r.size));
    let (snapshot_total, expected_total) = (total(snapshot), total(expected));
    if snapshot_total != expected_total {
        return Err(Error::MemorySize { snapshot: snapshot_total, expected: expected_total });
    }
    Err(Error::MemoryLayout { snapshot: describe(snapshot), expected: describe(expected) })
}

/// A run of consecutive stored pages in one region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Run {
    pub region: usize,
    pub first_page: u64,
    pub pages: u64,
}

/// Which pages of each region are stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PageMap {
    pub page_size: u32,
    pub regions: Vec<RegionLayout>,
    /// Per region, one bit per page (page `8 * j + i` is bit `i` of byte `j`), set where the page is stored.
    /// Bits past the region's last page are zero.
    pub present: Vec<Vec<u8>>,
}

fn bitmap_len(pages: u64) -> u64 {
    pages.div_ceil(8)
}

fn is_zero(page: &[u8]) -> bool {
    // OR-folding a few hundred bytes at a time vectorises well and still stops early at the first non-zero chunk.
    page.chunks(256).all(|chunk| chunk.iter().fold(0, |acc, &b| acc | b) == 0)
}

/// The first page at or after `from` whose bit is `set`, or `pages` if there is none.
fn next_page_with(bits: &[u8], pages: u64, from: u64, set: bool) -> u64 {
    let boring = if set { 0x00 } else { 0xff };
    let mut page = from;
    while page < pages {
        let byte = bits[(page / 8) as usize];
        if page.is_multiple_of(8) && byte == boring {
            page += 8;
        } else if (byte >> (page % 8)) & 1 == u8::from(set) {
            return page;
        } else {
            page += 1;
        }
    }
    pages
}

impl PageMap {
    /// Maps `regions`: a bit for every page that is not all zero.
    pub fn scan(page_size: u32, regions: &[GuestRegion<'_>]) -> Result<PageMap> {
        let layout: Vec<RegionLayout> =
            regions.iter().map(|r| RegionLayout { guest_addr: r.guest_addr, size: r.bytes.len() as u64 }).collect();
        check_layout(page_size, &layout).map_err(Error::InvalidMemory)?;
        let page = page_size as usize;
        let mut present = Vec::with_capacity(regions.len());
        for (index, region) in regions.iter().enumerate() {
            let pages = region.bytes.len() / page;
            let mut bits = vec![0u8; bitmap_len(pages as u64) as usize];
            if let Some(populated) = region.populated.filter(|populated| populated.len() != bits.len()) {
                return Err(Error::InvalidMemory(format!(
                    "region {index}'s map of populated pages has {} bytes for {pages} pages",
                    populated.len()
                )));
            }
            let every_page = vec![0xff; bits.len()];
            let candidates = region.populated.unwrap_or(&every_page);
            for (byte, &candidate) in candidates.iter().enumerate() {
                // Eight pages at a time where none was populated: the common case in a mostly idle guest.
                if candidate == 0 {
                    continue;
                }
                for bit in (0..8).filter(|bit| candidate & (1 << bit) != 0) {
                    let index = byte * 8 + bit;
                    if index < pages && !is_zero(&region.bytes[index * page..(index + 1) * page]) {
                        bits[byte] |= 1 << bit;
                    }
                }
            }
            present.push(bits);
        }
        Ok(PageMap { page_size, regions: layout, present })
    }

    fn pages_in(&self, region: usize) -> u64 {
        self.regions[region].size / u64::from(self.page_size)
    }

    pub fn pages(&self) -> u64 {
        (0..self.regions.len()).map(|r| self.pages_in(r)).sum()
    }

    pub fn stored_pages(&self) -> u64 {
        self.present.iter().flatten().map(|byte| u64::from(byte.count_ones())).sum()
    }

    /// The stored pages as runs, in the order their data follows in the file.
    pub fn runs(&self) -> impl Iterator<Item = Run> + '_ {
        (0..self.regions.len()).flat_map(move |region| {
            let (bits, pages) = (&self.present[region], self.pages_in(region));
            let mut page = 0;
            std::iter::from_fn(move || {
                let first_page = next_page_with(bits, pages, page, true);
                if first_page == pages {
                    return None;
                }
                page = next_page_with(bits, pages, first_page, false);
                Some(Run { region, first_page, pages: page - first_page })
            })
        })
    }

    /// The map's bytes: page size, region count, each region's address and size, then each region's bitmap.
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&self.page_size.to_le_bytes());
        bytes.extend_from_slice(&(self.regions.len() as u32).to_le_bytes());
        for region in &self.regions {
            bytes.extend_from_slice(&region.guest_addr.to_le_bytes());
            bytes.extend_from_slice(&region.size.to_le_bytes());
        }
        for bits in &self.present {
            bytes.extend_from_slice(bits);
        }
        bytes
    }

    /// Parses a map, checking its layout against the machine's (`expected`) before it reads any bitmap. `at` is
    /// the payload's offset in the file, for error messages.
    pub fn decode(payload: &[u8], at: u64, expected: &[RegionLayout]) -> Result<PageMap> {
        let malformed = |problem: String| Error::Malformed { offset: at, problem: format!("memory map: {problem}") };
        let len = payload.len() as u64;
        if len < 8 {
            return Err(malformed(format!("{len} bytes, shorter than its 8-byte header")));
        }
        let page_size = le_u32(payload, 0);
        let count = le_u32(payload, 4) as usize;
        if count > MAX_REGIONS {
            return Err(malformed(format!("{count} regions (at most {MAX_REGIONS})")));
        }
        let bitmaps_at = 8 + 16 * count;
        if payload.len() < bitmaps_at {
            return Err(malformed(format!("{len} bytes cannot hold {count} regions")));
        }
        let regions: Vec<RegionLayout> = (0..count)
            .map(|i| RegionLayout { guest_addr: le_u64(payload, 8 + 16 * i), size: le_u64(payload, 16 + 16 * i) })
            .collect();
        check_layout(page_size, &regions).map_err(malformed)?;
        check_layout_matches(&regions, expected)?;

        // From here the sizes are the machine's own, so the arithmetic stays within what it has.
        let page = u64::from(page_size);
        let wanted = regions.iter().map(|r| bitmap_len(r.size / page)).sum::<u64>() + bitmaps_at as u64;
        if wanted != len {
            return Err(malformed(format!("{len} bytes where the layout needs {wanted}")));
        }
        let mut present = Vec::with_capacity(count);
        let mut at_bitmap = bitmaps_at;
        for (i, region) in regions.iter().enumerate() {
            let pages = region.size / page;
            let bits = &payload[at_bitmap..at_bitmap + bitmap_len(pages) as usize];
            let spare = pages % 8;
            if let (Some(&last), true) = (bits.last(), spare != 0) {
                if last >> spare != 0 {
                    return Err(malformed(format!("region {i}'s bitmap marks pages past its end")));
                }
            }
            present.push(bits.to_vec());
            at_bitmap += bits.len();
        }
        Ok(PageMap { page_size, regions, present })
    }
}

/// Where the stored pages of guest memory are in the file, as the reader found them.
#[derive(Clone, Debug)]
pub struct MemoryImage {
    pub(crate) map: PageMap,
    pub(crate) stored_pages: u64,
    pub(crate) data_offset: u64,
    pub(crate) data_checksum: u32,
}

/// A run of stored pages: `len` bytes at `file_offset` in the file are guest memory at `guest_addr`. Both offsets
/// are multiples of the page size, so the run can be mapped from the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub guest_addr: u64,
    pub file_offset: u64,
    pub len: u64,
}

impl MemoryImage {
    pub fn page_size(&self) -> u32 {
        self.map.page_size
    }

    pub fn regions(&self) -> &[RegionLayout] {
        &self.map.regions
    }

    /// How many pages the guest has, and how many of them the file holds (the others are zero).
    pub fn stats(&self) -> MemoryStats {
        MemoryStats { pages: self.map.pages(), stored_pages: self.stored_pages }
    }

    /// Where the stored pages start in the file: a multiple of the page size, counted from the snapshot's first
    /// byte.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// The stored pages as runs to map from the file or copy, in file order. Pages in no extent are zero.
    pub fn extents(&self) -> impl Iterator<Item = Extent> + '_ {
        let page = u64::from(self.map.page_size);
        let mut file_offset = self.data_offset;
        self.map.runs().map(move |run| {
            let len = run.pages * page;
            let extent = Extent {
                guest_addr: self.map.regions[run.region].guest_addr + run.first_page * page,
                file_offset,
                len,
            };
            file_offset += len;
            extent
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: usize = 4096;

    fn layout(regions: &[(u64, u64)]) -> Vec<RegionLayout> {
        regions.iter().map(|&(guest_addr, size)| RegionLayout { guest_addr, size }).collect()
    }

    #[test]
    fn only_pages_with_a_non_zero_byte_are_marked() {
        let mut memory = vec![0u8; 20 * PAGE];
        memory[3 * PAGE + 4095] = 1; // the last byte of page 3
        memory[8 * PAGE] = 0x80; // the first of page 8
        for byte in &mut memory[10 * PAGE..13 * PAGE] {
            *byte = 0xaa;
        }
        let map =
            PageMap::scan(4096, &[GuestRegion { guest_addr: 0x1000_0000, bytes: &memory, populated: None }]).unwrap();
        assert_eq!(map.stored_pages(), 5);
        assert_eq!(map.pages(), 20);
        let runs: Vec<(u64, u64)> = map.runs().map(|run| (run.first_page, run.pages)).collect();
        assert_eq!(runs, [(3, 1), (8, 1), (10, 3)]);
    }

    /// A region of `pages` pages where the `data` pages hold a non-zero byte.
    fn mixed_region(pages: usize, data: &[usize]) -> Vec<u8> {
        let mut memory = vec![0u8; pages * PAGE];
        for &page in data {
            memory[page * PAGE + (page * 37) % PAGE] = page as u8 | 1;
        }
        memory
    }

    fn bits(pages: usize, set: &[usize]) -> Vec<u8> {
        let mut bits = vec![0u8; pages.div_ceil(8)];
        for &page in set {
            bits[page / 8] |= 1 << (page % 8);
        }
        bits
    }

    #[test]
    fn a_map_of_populated_pages_gives_the_full_scan_s_result() {
        // Populated: pages with data, pages that were written and hold zeros again, and whole populated bytes.
        let data = [0, 5, 8, 9, 10, 11, 12, 13, 14, 15, 30, 34];
        let memory = mixed_region(35, &data);
        let populated = bits(35, &[0, 1, 2, 5, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 30, 34]);
        let scan = |populated| PageMap::scan(4096, &[GuestRegion { guest_addr: 1 << 20, bytes: &memory, populated }]);
        let full = scan(None).unwrap();
        assert_eq!(full.present[0], bits(35, &data));
        assert_eq!(scan(Some(&populated)).unwrap(), full);
    }

    #[test]
    fn pages_not_populated_are_not_read() {
        // Pages 3 and 6 hold data the map says cannot be there: they are not read, so not stored. (A real map
        // comes from the host's page tables, which cannot be wrong this way; this shows the pages are skipped.)
        let memory = mixed_region(8, &[1, 3, 6]);
        let populated = bits(8, &[0, 1]);
        let map =
            PageMap::scan(4096, &[GuestRegion { guest_addr: 0, bytes: &memory, populated: Some(&populated) }]).unwrap();
        assert_eq!(map.present[0], bits(8, &[1]));
        assert_eq!(map.stored_pages(), 1);
    }

    #[test]
    fn a_map_of_populated_pages_of_the_wrong_size_is_refused() {
        let memory = vec![0u8; 9 * PAGE];
        for populated in [&[0xffu8][..], &[0xff, 0xff, 0xff]] {
            let regions = [GuestRegion { guest_addr: 0, bytes: &memory, populated: Some(populated) }];
            match PageMap::scan(4096, &regions) {
                Err(Error::InvalidMemory(problem)) => assert!(problem.contains("bytes for 9 pages"), "{problem}"),
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
    }

    #[test]
    fn runs_cross_bitmap_bytes_and_reach_the_last_page() {
        let mut memory = vec![0u8; 19 * PAGE];
        for page in (6..19).chain([0]) {
            memory[page * PAGE + 17] = 9;
        }
        let map = PageMap::scan(4096, &[GuestRegion { guest_addr: 0, bytes: &memory, populated: None }]).unwrap();
        let runs: Vec<(u64, u64)> = map.runs().map(|run| (run.first_page, run.pages)).collect();
        assert_eq!(runs, [(0, 1), (6, 13)]);
        // 19 pages: three bitmap bytes, the last one's five spare bits clear.
        assert_eq!(map.present[0], [0b1100_0001, 0xff, 0b0000_0111]);
    }

    #[test]
    fn a_map_decodes_to_what_was_encoded() {
        let low = vec![1u8; 3 * PAGE];
        let mut high = vec![0u8; 9 * PAGE];
        high[8 * PAGE + 5] = 2;
        let regions = [
            GuestRegion { guest_addr: 0, bytes: &low, populated: None },
            GuestRegion { guest_addr: 1 << 32, bytes: &high, populated: None },
        ];
        let map = PageMap::scan(4096, &regions).unwrap();
        let expected = layout(&[(0, 3 * PAGE as u64), (1 << 32, 9 * PAGE as u64)]);
        assert_eq!(PageMap::decode(&map.encode(), 0, &expected).unwrap(), map);
        let runs: Vec<Run> = map.runs().collect();
        assert_eq!(runs, [Run { region: 0, first_page: 0, pages: 3 }, Run { region: 1, first_page: 8, pages: 1 }]);
    }

    #[test]
    fn a_map_for_other_memory_is_refused_before_its_bitmaps_are_read() {
        let memory = vec![0u8; 4 * PAGE];
        let encoded =
            PageMap::scan(4096, &[GuestRegion { guest_addr: 0, bytes: &memory, populated: None }]).unwrap().encode();
        match PageMap::decode(&encoded, 0, &layout(&[(0, 8 * PAGE as u64)])) {
            Err(Error::MemorySize { snapshot, expected }) => assert_eq!((snapshot, expected), (16 << 10, 32 << 10)),
            other => panic!("expected a size mismatch, got {other:?}"),
        }
        match PageMap::decode(&encoded, 0, &layout(&[(1 << 20, 4 * PAGE as u64)])) {
            Err(Error::MemoryLayout { snapshot, expected }) => {
                assert_eq!(snapshot, "16 KiB at 0x0");
                assert_eq!(expected, "16 KiB at 0x100000");
            }
            other => panic!("expected a layout mismatch, got {other:?}"),
        }
    }

    #[test]
    fn a_malformed_map_is_refused_with_the_reason() {
        let memory = vec![0u8; 12 * PAGE];
        let good =
            PageMap::scan(4096, &[GuestRegion { guest_addr: 0, bytes: &memory, populated: None }]).unwrap().encode();
        let expected = layout(&[(0, 12 * PAGE as u64)]);
        let problem = |bytes: &[u8]| match PageMap::decode(bytes, 77, &expected) {
            Err(Error::Malformed { offset: 77, problem }) => problem,
            other => panic!("expected a malformed map, got {other:?}"),
        };
        assert!(problem(&good[..5]).contains("shorter than its 8-byte header"));
        assert!(problem(&good[..20]).contains("cannot hold 1 regions"));
        assert!(problem(&good[..good.len() - 1]).contains("where the layout needs"));
        let mut longer = good.clone();
        longer.push(0);
        assert!(problem(&longer).contains("where the layout needs"));
        let mut spare_bit = good.clone();
        *spare_bit.last_mut().unwrap() = 0x10; // page 12 of 12
        assert!(problem(&spare_bit).contains("past its end"));
        let mut page_size = good.clone();
        page_size[..4].copy_from_slice(&3000u32.to_le_bytes());
        assert!(problem(&page_size).contains("page size 3000"));
        let mut regions = good.clone();
        regions[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(problem(&regions).contains("regions (at most 1024)"));
    }

    #[test]
    fn layouts_are_aligned_ascending_and_disjoint() {
        let ok = |page_size, regions: &[(u64, u64)]| check_layout(page_size, &layout(regions));
        ok(4096, &[(0, 0xa0000), (0x100000, 0x1000)]).unwrap();
        ok(65536, &[(0, 0x10000)]).unwrap();
        assert!(ok(4096, &[]).unwrap_err().contains("0 memory regions"));
        assert!(ok(2048, &[(0, 0x1000)]).unwrap_err().contains("page size"));
        assert!(ok(1 << 17, &[(0, 1 << 17)]).unwrap_err().contains("page size"));
        assert!(ok(4096, &[(0x800, 0x1000)]).unwrap_err().contains("not aligned"));
        assert!(ok(4096, &[(0, 0x1800)]).unwrap_err().contains("not aligned"));
        assert!(ok(4096, &[(0, 0)]).unwrap_err().contains("empty"));
        assert!(ok(4096, &[(0x2000, 0x1000), (0, 0x1000)]).unwrap_err().contains("overlaps or precedes"));
        assert!(ok(4096, &[(0, 0x2000), (0x1000, 0x1000)]).unwrap_err().contains("overlaps or precedes"));
        assert!(ok(4096, &[(u64::MAX - 0xfff, 0x2000)]).unwrap_err().contains("wraps"));
    }
}

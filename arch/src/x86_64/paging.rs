//! Identity-mapped boot page tables for the 64-bit entry: the first 4 GiB with 2 MiB pages.
//!
//! The 64-bit boot protocol only needs the kernel, zero page and command line mapped, but mapping all of the low
//! 4 GiB (the MMIO gap included) lets payload tests reach the IOAPIC/LAPIC pages from long mode before they build
//! their own tables, at the cost of 16 KiB of page directories.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::layout::{PDE_START, PDPTE_START, PML4_START};
use super::{Error, Result};

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
/// Page-size bit in a page-directory entry: the entry maps a 2 MiB page instead of pointing to a page table.
const HUGE_PAGE: u64 = 1 << 7;

const PAGE_SIZE: u64 = 0x1000;
const ENTRIES_PER_TABLE: u64 = 512;
const HUGE_PAGE_SIZE: u64 = 2 << 20;
/// One page directory per GiB.
pub const IDENTITY_MAPPED_GIB: u64 = 4;

/// The PML4, PDPT and page directories, as (guest address, table contents) pairs.
pub fn identity_tables() -> Vec<(u64, Vec<u64>)> {
    let pml4 = vec![PDPTE_START | PRESENT | WRITABLE];
    let pdpt = (0..IDENTITY_MAPPED_GIB).map(|i| (PDE_START + i * PAGE_SIZE) | PRESENT | WRITABLE).collect();
    let pds = (0..IDENTITY_MAPPED_GIB * ENTRIES_PER_TABLE)
        .map(|i| (i * HUGE_PAGE_SIZE) | PRESENT | WRITABLE | HUGE_PAGE)
        .collect();
    vec![(PML4_START, pml4), (PDPTE_START, pdpt), (PDE_START, pds)]
}

/// Writes the identity page tables and returns the CR3 value that uses them.
pub fn setup_identity_page_tables<M: GuestMemory + ?Sized>(mem: &M) -> Result<u64> {
    for (addr, entries) in identity_tables() {
        let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(|e| Error::Memory(format!("cannot write boot page tables at {addr:#x}: {e}")))?;
    }
    Ok(PML4_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks the tables like the MMU does for a 2 MiB mapping.
    fn translate(tables: &[(u64, Vec<u64>)], cr3: u64, va: u64) -> Option<u64> {
        let read = |addr: u64| -> Option<u64> {
            tables.iter().find_map(|(base, entries)| {
                let idx = addr.checked_sub(*base)? / 8;
                entries.get(idx as usize).copied()
            })
        };
        let pml4e = read(cr3 + (va >> 39 & 0x1ff) * 8)?;
        if pml4e & PRESENT == 0 {
            return None;
        }
        let pdpte = read((pml4e & !0xfff) + (va >> 30 & 0x1ff) * 8)?;
        if pdpte & PRESENT == 0 {
            return None;
        }
        let pde = read((pdpte & !0xfff) + (va >> 21 & 0x1ff) * 8)?;
        if pde & PRESENT == 0 || pde & HUGE_PAGE == 0 {
            return None;
        }
        Some((pde & !(HUGE_PAGE_SIZE - 1) & 0x000f_ffff_ffff_f000) | (va & (HUGE_PAGE_SIZE - 1)))
    }

    #[test]
    fn maps_low_4gib_identically() {
        let tables = identity_tables();
        for va in [0u64, 0x1000, 0x100_0000, 0x7fff_ffff, 0xc000_0000, 0xfec0_0000, 0xfee0_0000, 0xffff_ffff] {
            assert_eq!(translate(&tables, PML4_START, va), Some(va), "{va:#x}");
        }
        assert_eq!(translate(&tables, PML4_START, 0x1_0000_0000), None);
    }

    #[test]
    fn tables_do_not_overlap() {
        let tables = identity_tables();
        for w in tables.windows(2) {
            assert!(w[0].0 + w[0].1.len() as u64 * 8 <= w[1].0);
        }
    }
}

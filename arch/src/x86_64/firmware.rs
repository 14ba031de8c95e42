//! What PC firmware (SeaBIOS; QEMU's fw_cfg conventions) is told about the machine when it boots instead of a
//! kernel: the memory map as QEMU's `etc/e820` file gives it. The firmware builds the low-memory structures (BDA,
//! EBDA, its own e820 reservations below 1 MiB) itself.

use super::boot::{E820Entry, E820_RAM, E820_RESERVED};
use super::layout::{pc_irqchip_layout, ram_regions, PCI_ECAM_SIZE, PCI_ECAM_START};

/// KVM's TSS and identity-map page: four pages from the identity map on.
const KVM_PRIVATE_PAGES: u64 = 4 * 0x1000;

/// The memory map for firmware booting with `ram_size` bytes of RAM and its image at `firmware_start`: RAM below
/// the MMIO gap as one entry (from 0, as QEMU's: the firmware reserves what it uses below 1 MiB), the PCI ECAM
/// and KVM's private pages reserved, RAM above 4 GiB if any. The image's own window is the firmware's to reserve.
pub fn firmware_e820_map(ram_size: u64, firmware_start: u64) -> Vec<E820Entry> {
    let regions = ram_regions(ram_size);
    let kvm = pc_irqchip_layout(Some(firmware_start));
    let kvm_pages_start = kvm.identity_map_address.unwrap_or(kvm.tss_address - 0x1000);
    let mut map = vec![
        E820Entry { addr: 0, size: regions[0].1, type_: E820_RAM },
        E820Entry { addr: PCI_ECAM_START, size: PCI_ECAM_SIZE, type_: E820_RESERVED },
        E820Entry { addr: kvm_pages_start, size: KVM_PRIVATE_PAGES, type_: E820_RESERVED },
    ];
    if let Some(&(start, size)) = regions.get(1) {
        map.push(E820Entry { addr: start, size, type_: E820_RAM });
    }
    map
}

/// The map as fw_cfg's `etc/e820` file holds it: per entry the little-endian 64-bit address and length and the
/// 32-bit type, packed (20 bytes each).
pub fn e820_file(map: &[E820Entry]) -> Vec<u8> {
    let mut file = Vec::with_capacity(map.len() * 20);
    for entry in map {
        file.extend_from_slice(&entry.addr.to_le_bytes());
        file.extend_from_slice(&entry.size.to_le_bytes());
        file.extend_from_slice(&entry.type_.to_le_bytes());
    }
    file
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x86_64::layout::{bios_start, HIGH_RAM_START, MMIO_GAP_START};

    #[test]
    fn a_small_guest_has_one_low_ram_entry_and_the_reservations() {
        let seabios = bios_start(256 << 10).unwrap();
        assert_eq!(
            firmware_e820_map(256 << 20, seabios),
            [
                E820Entry { addr: 0, size: 256 << 20, type_: E820_RAM },
                E820Entry { addr: PCI_ECAM_START, size: PCI_ECAM_SIZE, type_: E820_RESERVED },
                E820Entry { addr: 0xfffb_c000, size: 0x4000, type_: E820_RESERVED },
            ]
        );
        // A 4 MiB image moves KVM's pages below itself, and the map follows.
        let big = bios_start(4 << 20).unwrap();
        assert_eq!(
            firmware_e820_map(256 << 20, big)[2],
            E820Entry { addr: big - 0x4000, size: 0x4000, type_: E820_RESERVED }
        );
    }

    #[test]
    fn a_large_guest_has_ram_above_4_gib_and_the_file_packs_20_bytes_per_entry() {
        let map = firmware_e820_map(6 << 30, bios_start(256 << 10).unwrap());
        assert_eq!(map[0], E820Entry { addr: 0, size: MMIO_GAP_START, type_: E820_RAM });
        assert_eq!(map[3], E820Entry { addr: HIGH_RAM_START, size: (6 << 30) - MMIO_GAP_START, type_: E820_RAM });
        let file = e820_file(&map);
        assert_eq!(file.len(), 4 * 20);
        assert_eq!(&file[60..68], &HIGH_RAM_START.to_le_bytes());
        assert_eq!(&file[68..76], &((6u64 << 30) - MMIO_GAP_START).to_le_bytes());
        assert_eq!(&file[76..80], &1u32.to_le_bytes());
    }
}

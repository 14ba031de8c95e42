//! The Intel MultiProcessor Specification 1.4 tables: how a guest booted without ACPI (`acpi=off`, or a payload
//! that only knows MP tables) finds its CPUs, IOAPIC and ISA interrupt routing.
//!
//! Linux scans the last KiB of base memory for the floating pointer, so pointer and configuration table both live
//! at `MPTABLE_START` and must fit below `EBDA_END`.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::layout::{isa_irq_ioapic_pin, EBDA_END, IOAPIC_START, LAPIC_START, MPTABLE_START};
use super::{Error, Result};

const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const PROCESSOR_ENTRY_LEN: usize = 20;
const SMALL_ENTRY_LEN: usize = 8;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const MP_SPEC_REV_1_4: u8 = 4;
/// Integrated local APIC version, as KVM's in-kernel LAPIC reports.
const LAPIC_VERSION: u8 = 0x14;
/// KVM's in-kernel IOAPIC version.
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1 << 0;
const CPU_BOOTSTRAP: u8 = 1 << 1;
/// Family 6 in the CPU signature: the value only matters to pre-CPUID operating systems.
const CPU_SIGNATURE: u32 = 6 << 8;
/// CPUID.1:EDX bits FPU and APIC.
const CPU_FEATURES: u32 = 1 << 0 | 1 << 9;
const IOAPIC_ENABLED: u8 = 1;

const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Polarity and trigger "conform to the bus" (ISA: active high, edge).
const INT_FLAGS_CONFORMING: u16 = 0;
const ISA_BUS_ID: u8 = 0;
/// Destination "all local APICs" for local interrupt entries.
const ALL_LAPICS: u8 = 0xff;
const ISA_IRQS: u8 = 16;

/// Bytes everything but the processor entries takes: pointer, header, bus, IOAPIC, 15 ISA interrupts (IRQ2 has
/// no entry: its pin carries IRQ0), ExtINT and NMI.
const FIXED_LEN: usize =
    FLOATING_POINTER_LEN + HEADER_LEN + 2 * SMALL_ENTRY_LEN + 15 * SMALL_ENTRY_LEN + 2 * SMALL_ENTRY_LEN;

/// The most vCPUs whose tables fit between `MPTABLE_START` and `EBDA_END`.
pub const MAX_VCPUS: usize = ((EBDA_END - MPTABLE_START) as usize - FIXED_LEN) / PROCESSOR_ENTRY_LEN;

/// The floating pointer followed by the configuration table, as they go at `MPTABLE_START`.
pub fn build_mptable(vcpu_count: u8) -> Result<Vec<u8>> {
    let count = usize::from(vcpu_count);
    if count == 0 || count > MAX_VCPUS {
        return Err(Error::Tables(format!(
            "an MP table for {count} vCPUs does not fit: 1..={MAX_VCPUS} fit in the {} bytes at {MPTABLE_START:#x}",
            EBDA_END - MPTABLE_START
        )));
    }
    let ioapic_id = vcpu_count;
    let table_addr = MPTABLE_START as u32 + FLOATING_POINTER_LEN as u32;

    let mut entries = Vec::new();
    let mut entry_count: u16 = 0;
    for id in 0..vcpu_count {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, LAPIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        entry_count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID, b'I', b'S', b'A', b' ', b' ', b' ']);
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_ENABLED]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    entry_count += 2;
    for irq in 0..ISA_IRQS {
        let Some(pin) = isa_irq_ioapic_pin(irq) else { continue };
        entries.push(ENTRY_IO_INTERRUPT);
        entries.push(INT_TYPE_INT);
        entries.extend_from_slice(&INT_FLAGS_CONFORMING.to_le_bytes());
        entries.extend_from_slice(&[ISA_BUS_ID, irq, ioapic_id, pin]);
        entry_count += 1;
    }
    for (int_type, lint) in [(INT_TYPE_EXTINT, 0), (INT_TYPE_NMI, 1)] {
        entries.push(ENTRY_LOCAL_INTERRUPT);
        entries.push(int_type);
        entries.extend_from_slice(&INT_FLAGS_CONFORMING.to_le_bytes());
        entries.extend_from_slice(&[ISA_BUS_ID, 0, ALL_LAPICS, lint]);
        entry_count += 1;
    }

    let table_len = (HEADER_LEN + entries.len()) as u16;
    let mut table = Vec::with_capacity(table_len.into());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&table_len.to_le_bytes());
    table.push(MP_SPEC_REV_1_4);
    table.push(0); // checksum
    table.extend_from_slice(b"KESTREL ");
    table.extend_from_slice(b"VIRTUAL PC  ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&(LAPIC_START as u32).to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut image = Vec::with_capacity(FLOATING_POINTER_LEN + table.len());
    image.extend_from_slice(b"_MP_");
    image.extend_from_slice(&table_addr.to_le_bytes());
    image.push(1); // length in 16-byte units
    image.push(MP_SPEC_REV_1_4);
    image.push(0); // checksum
                   // Feature byte 1 = 0: a configuration table is present (no default configuration); no IMCR.
    image.extend_from_slice(&[0; 5]);
    image[10] = checksum(&image);
    image.extend_from_slice(&table);
    Ok(image)
}

/// The byte that makes `bytes` sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Writes the MP floating pointer and configuration table at `MPTABLE_START`.
pub fn setup_mptable<M: GuestMemory + ?Sized>(mem: &M, vcpu_count: u8) -> Result<()> {
    let image = build_mptable(vcpu_count)?;
    mem.write_slice(&image, GuestAddress(MPTABLE_START))
        .map_err(|e| Error::Memory(format!("cannot write the MP table at {MPTABLE_START:#x}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    /// Entry types in table order.
    fn entry_types(table: &[u8]) -> Vec<u8> {
        let mut off = HEADER_LEN;
        let mut types = Vec::new();
        while off < table.len() {
            types.push(table[off]);
            off += if table[off] == ENTRY_PROCESSOR { PROCESSOR_ENTRY_LEN } else { SMALL_ENTRY_LEN };
        }
        assert_eq!(off, table.len());
        types
    }

    #[test]
    fn checksums_and_counts() {
        for vcpus in [1u8, 4, MAX_VCPUS as u8] {
            let image = build_mptable(vcpus).unwrap();
            assert!(image.len() as u64 <= EBDA_END - MPTABLE_START);
            let (fp, table) = image.split_at(FLOATING_POINTER_LEN);
            assert_eq!(&fp[..4], b"_MP_");
            assert_eq!(sum(fp), 0);
            assert_eq!(u32::from_le_bytes(fp[4..8].try_into().unwrap()), MPTABLE_START as u32 + 16);
            assert_eq!(&table[..4], b"PCMP");
            assert_eq!(u16::from_le_bytes([table[4], table[5]]) as usize, table.len());
            assert_eq!(sum(table), 0);
            let types = entry_types(table);
            assert_eq!(u16::from_le_bytes([table[34], table[35]]) as usize, types.len());
            assert_eq!(types.iter().filter(|&&t| t == ENTRY_PROCESSOR).count(), vcpus as usize);
            assert_eq!(types.iter().filter(|&&t| t == ENTRY_IO_INTERRUPT).count(), 15);
            assert_eq!(types.iter().filter(|&&t| t == ENTRY_LOCAL_INTERRUPT).count(), 2);
        }
    }

    #[test]
    fn processors_and_routing() {
        let image = build_mptable(4).unwrap();
        let table = &image[FLOATING_POINTER_LEN..];
        for id in 0..4usize {
            let e = &table[HEADER_LEN + id * PROCESSOR_ENTRY_LEN..];
            assert_eq!(e[1] as usize, id);
            assert_eq!(e[3] & CPU_ENABLED, CPU_ENABLED);
            assert_eq!(e[3] & CPU_BOOTSTRAP != 0, id == 0);
        }
        let ioapic = &table[HEADER_LEN + 4 * PROCESSOR_ENTRY_LEN + 8..];
        assert_eq!(ioapic[0], ENTRY_IOAPIC);
        assert_eq!(ioapic[1], 4);
        assert_eq!(u32::from_le_bytes(ioapic[4..8].try_into().unwrap()), IOAPIC_START as u32);
        let irq0 = &ioapic[8..16];
        assert_eq!((irq0[0], irq0[5], irq0[7]), (ENTRY_IO_INTERRUPT, 0, 2));
        let irq4 = &ioapic[8 + 3 * 8..8 + 4 * 8];
        assert_eq!((irq4[5], irq4[7]), (4, 4));
    }

    #[test]
    fn too_many_vcpus_is_an_error() {
        assert!(build_mptable(0).is_err());
        assert!(build_mptable(MAX_VCPUS as u8 + 1).is_err());
        assert_eq!(MAX_VCPUS, 40);
    }
}

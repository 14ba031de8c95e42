//! ACPI and MP tables read back from guest memory the way an OS finds them: RSDP in the BIOS area, then the
//! XSDT, then every table it lists (and the DSDT/FACS through the FADT).
#![cfg(target_arch = "x86_64")]

use arch::x86_64::acpi::{create_acpi_tables, AcpiConfig};
use arch::x86_64::layout::*;
use arch::x86_64::mptable::setup_mptable;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap<()>;

fn memory() -> Mem {
    Mem::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
}

fn read(mem: &Mem, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// A table at `addr`: signature checked, length from its header, checksum verified.
fn table(mem: &Mem, addr: u64, signature: &[u8; 4]) -> Vec<u8> {
    assert!((ACPI_TABLES_START..ACPI_TABLES_END).contains(&addr), "{addr:#x}");
    let header = read(mem, addr, 36);
    assert_eq!(&header[..4], signature);
    let len = u32_at(&header, 4) as usize;
    assert!(addr + len as u64 <= ACPI_TABLES_END);
    let bytes = read(mem, addr, len);
    assert_eq!(sum(&bytes), 0, "{} checksum", String::from_utf8_lossy(signature));
    bytes
}

/// Finds the RSDP by scanning the BIOS area on 16-byte boundaries, as Linux does without a boot-protocol hint.
fn find_rsdp(mem: &Mem) -> u64 {
    (0xe0000..0x100000u64)
        .step_by(16)
        .find(|&a| read(mem, a, 8) == b"RSD PTR " && sum(&read(mem, a, 20)) == 0)
        .expect("RSDP")
}

fn walk(vcpus: u8) {
    let mem = memory();
    let layout = create_acpi_tables(&mem, &AcpiConfig::new(vcpus)).unwrap();
    let rsdp_addr = find_rsdp(&mem);
    assert_eq!(rsdp_addr, layout.rsdp);
    let rsdp = read(&mem, rsdp_addr, 36);
    assert_eq!(rsdp[15], 2, "ACPI 2.0+ RSDP");
    assert_eq!(u32_at(&rsdp, 20), 36);
    assert_eq!(sum(&rsdp), 0);

    let xsdt = table(&mem, u64_at(&rsdp, 24), b"XSDT");
    let entries: Vec<u64> = (36..xsdt.len()).step_by(8).map(|o| u64_at(&xsdt, o)).collect();
    assert_eq!(entries.len(), 2);

    let fadt = table(&mem, entries[0], b"FACP");
    assert_eq!(fadt[8], 6, "FADT revision");
    let dsdt_addr = u64_at(&fadt, 140);
    assert_eq!(u64::from(u32_at(&fadt, 40)), dsdt_addr);
    let dsdt = table(&mem, dsdt_addr, b"DSDT");
    assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
    let facs_addr = u64_at(&fadt, 132);
    assert_eq!(facs_addr % 64, 0);
    assert_eq!(read(&mem, facs_addr, 4), b"FACS");
    assert_eq!(u32_at(&fadt, 36) as u64, facs_addr);
    assert_eq!(u32_at(&fadt, 46) & 0xffff, ACPI_SCI_IRQ);

    let madt = table(&mem, entries[1], b"APIC");
    assert_eq!(u32_at(&madt, 36) as u64, LAPIC_START);
    let mut off = 44;
    let (mut lapics, mut ioapics, mut overrides, mut nmis) = (0, 0, 0, 0);
    while off < madt.len() {
        match madt[off] {
            0 => {
                assert_eq!(madt[off + 3], lapics as u8, "APIC ID = vCPU index");
                assert_eq!(u32_at(&madt, off + 4) & 1, 1, "enabled");
                lapics += 1;
            }
            1 => {
                assert_eq!(madt[off + 2], vcpus);
                assert_eq!(u32_at(&madt, off + 4) as u64, IOAPIC_START);
                assert_eq!(u32_at(&madt, off + 8), 0);
                ioapics += 1;
            }
            2 => overrides += 1,
            4 => nmis += 1,
            t => panic!("unexpected MADT entry type {t}"),
        }
        off += madt[off + 1] as usize;
    }
    assert_eq!(off, madt.len());
    assert_eq!((lapics, ioapics, overrides, nmis), (vcpus as usize, 1, 2, 1));
}

#[test]
fn tables_for_1_vcpu() {
    walk(1);
}

#[test]
fn tables_for_4_vcpus() {
    walk(4);
}

#[test]
fn mp_table_in_memory() {
    let mem = memory();
    setup_mptable(&mem, 4).unwrap();
    let fp = read(&mem, MPTABLE_START, 16);
    assert_eq!(&fp[..4], b"_MP_");
    assert_eq!(sum(&fp), 0);
    let table_addr = u32_at(&fp, 4) as u64;
    let header = read(&mem, table_addr, 44);
    assert_eq!(&header[..4], b"PCMP");
    let len = u16::from_le_bytes([header[4], header[5]]) as usize;
    assert!(table_addr + len as u64 <= EBDA_END);
    assert_eq!(sum(&read(&mem, table_addr, len)), 0);
}

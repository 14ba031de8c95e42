//! ACPI tables for a PC-like guest without firmware: RSDP, XSDT, FADT (+FACS), MADT, a DSDT and, with a PCI host
//! bridge, an MCFG.
//!
//! The platform is full ACPI, not hardware-reduced: the PM1a event/control blocks in the FADT are where the guest
//! powers off (`SLP_TYP`/`SLP_EN` with the `\_S5` value from the DSDT), matching QEMU's PIIX4 ports so the same
//! payloads work on both. The tables sit in the BIOS area (0xE0000-0xFFFFF), where Linux also scans for the RSDP
//! when the boot protocol does not hand it over.

use acpi_tables::aml;
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::layout::{
    isa_irq_ioapic_pin, ACPI_PM1A_CNT_PORT, ACPI_PM1A_EVT_PORT, ACPI_PM1_CNT_LEN, ACPI_PM1_EVT_LEN, ACPI_RESET_PORT,
    ACPI_RESET_VALUE, ACPI_S5_SLEEP_TYPE, ACPI_SCI_IRQ, ACPI_TABLES_END, ACPI_TABLES_START, CMOS_PORT, COM1_IRQ,
    COM1_PORT, IOAPIC_START, LAPIC_START, PCI_CONFIG_PORT, PCI_CONFIG_PORTS, PCI_ECAM_LAST_BUS, PCI_ECAM_START,
    PCI_MMIO_SIZE, PCI_MMIO_START, RSDP_START, RTC_IRQ,
};
use super::{Error, Result};

pub const OEM_ID: [u8; 6] = *b"KESTRL";
pub const OEM_TABLE_ID: [u8; 8] = *b"KESTREL ";
pub const OEM_REVISION: u32 = 1;

/// What the tables describe. `extra_dsdt_aml` holds complete AML objects (typically `Device` blocks built with
/// `acpi_tables::aml`, or [`virtio_mmio_device_aml`]) appended inside `\_SB_`, so later devices (a GED power
/// button, virtio-mmio transports) need no change here. `pci_host_bridge` adds the host bridge `PCI0` to the DSDT
/// and the MCFG table for its ECAM window: without `PCI0`, Linux with ACPI does not scan bus 0 at all.
#[derive(Clone, Debug, Default)]
pub struct AcpiConfig {
    pub vcpu_count: u8,
    pub extra_dsdt_aml: Vec<Vec<u8>>,
    pub pci_host_bridge: bool,
}

impl AcpiConfig {
    pub fn new(vcpu_count: u8) -> Self {
        AcpiConfig { vcpu_count, extra_dsdt_aml: Vec::new(), pci_host_bridge: false }
    }
}

/// Where each table went, for tests and for logging.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiLayout {
    pub rsdp: u64,
    /// (signature, guest address, length) in placement order.
    pub tables: Vec<([u8; 4], u64, usize)>,
}

/// MADT structure types the `acpi_tables` crate has no x86 builders for.
const MADT_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
const MADT_LOCAL_APIC_NMI: u8 = 4;
/// MADT flag: the platform also has dual 8259 PICs (KVM's irqchip emulates them), which the OS must mask.
const MADT_PCAT_COMPAT: u32 = 1;
/// MPS INTI flags: active high (01) and level triggered (11 << 2).
const MPS_ACTIVE_HIGH_LEVEL: u16 = 0x1 | 0x3 << 2;
/// LAPIC NMI entry: processor UID 0xff means all processors.
const ALL_PROCESSORS: u8 = 0xff;
/// IA-PC boot architecture flags: legacy (ISA) devices, an 8042 (without it Linux skips the i8042 that reboot can
/// go through), and no VGA.
const IAPC_BOOT_ARCH: u16 = 1 | 1 << 1 | 1 << 2;

/// The DSDT: `\_S5` and the legacy devices Linux would otherwise only find by probing, plus `extra_dsdt_aml`.
pub fn build_dsdt(config: &AcpiConfig) -> Vec<u8> {
    let s5_type = ACPI_S5_SLEEP_TYPE;
    let s5 = aml::Package::new(vec![&s5_type, &s5_type, &aml::ZERO, &aml::ZERO]);
    let s5_name = aml::Name::new("_S5_".into(), &s5);

    let com1 = legacy_device("COM1", "PNP0501", COM1_PORT, 8, COM1_IRQ);
    let rtc = legacy_device("RTC_", "PNP0B00", CMOS_PORT, 2, RTC_IRQ);

    let mut sb_body = Vec::new();
    com1.to_aml_bytes(&mut sb_body);
    rtc.to_aml_bytes(&mut sb_body);
    if config.pci_host_bridge {
        pci_host_bridge().to_aml_bytes(&mut sb_body);
    }
    for extra in &config.extra_dsdt_aml {
        sb_body.extend_from_slice(extra);
    }
    let raw_body = RawAml(sb_body);
    let sb = aml::Scope::new("\\_SB_".into(), vec![&raw_body]);

    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let mut body = Vec::new();
    s5_name.to_aml_bytes(&mut body);
    sb.to_aml_bytes(&mut body);
    dsdt.append_slice(&body);
    dsdt.as_slice().to_vec()
}

/// Pre-encoded AML, so caller-provided objects can be nested in a `Scope`.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

/// An ISA device with one I/O range and one edge-triggered interrupt, as an encoded `Device` object.
fn legacy_device(name: &str, hid: &str, port: u16, len: u8, irq: u32) -> RawAml {
    let hid = aml::EISAName::new(hid);
    let io = aml::IO::new(port, port, 1, len);
    let int = aml::Interrupt::new(true, true, false, false, irq);
    let crs = aml::ResourceTemplate::new(vec![&io, &int]);
    let (hid, uid, crs) = (
        aml::Name::new("_HID".into(), &hid),
        aml::Name::new("_UID".into(), &aml::ZERO),
        aml::Name::new("_CRS".into(), &crs),
    );
    let dev = aml::Device::new(name.into(), vec![&hid, &uid, &crs]);
    let mut bytes = Vec::new();
    dev.to_aml_bytes(&mut bytes);
    RawAml(bytes)
}

/// The PCI host bridge `PCI0` (PCI Express root, `PNP0A08`, compatible with plain PCI, `PNP0A03`): segment 0, bus
/// 0, with the configuration ports and the 32-bit memory window BARs live in as its resources. There is no `_PRT`:
/// the functions on it use MSI-X, not INTx.
fn pci_host_bridge() -> RawAml {
    let hid = aml::EISAName::new("PNP0A08");
    let cid = aml::EISAName::new("PNP0A03");
    let buses = aml::AddressSpace::new_bus_number(0u16, u16::from(PCI_ECAM_LAST_BUS));
    let config_ports = aml::IO::new(PCI_CONFIG_PORT, PCI_CONFIG_PORT, 1, PCI_CONFIG_PORTS);
    let window = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO_START as u32,
        (PCI_MMIO_START + PCI_MMIO_SIZE - 1) as u32,
        None,
    );
    let crs = aml::ResourceTemplate::new(vec![&buses, &config_ports, &window]);
    let (hid, cid, adr, seg, bbn, uid, crs) = (
        aml::Name::new("_HID".into(), &hid),
        aml::Name::new("_CID".into(), &cid),
        aml::Name::new("_ADR".into(), &aml::ZERO),
        aml::Name::new("_SEG".into(), &aml::ZERO),
        aml::Name::new("_BBN".into(), &aml::ZERO),
        aml::Name::new("_UID".into(), &aml::ZERO),
        aml::Name::new("_CRS".into(), &crs),
    );
    let dev = aml::Device::new("PCI0".into(), vec![&hid, &cid, &adr, &seg, &bbn, &uid, &crs]);
    let mut bytes = Vec::new();
    dev.to_aml_bytes(&mut bytes);
    RawAml(bytes)
}

/// The MCFG: one ECAM window for segment 0, buses 0 to `PCI_ECAM_LAST_BUS`.
pub fn build_mcfg() -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    mcfg.add_ecam(PCI_ECAM_START, 0, 0, PCI_ECAM_LAST_BUS);
    let mut bytes = Vec::new();
    mcfg.to_aml_bytes(&mut bytes);
    bytes
}

/// A virtio-mmio transport as Linux's ACPI virtio-mmio driver expects it (`LNRO0005`), named `Vxxx` after
/// `index` (up to 0xfff), for [`AcpiConfig::extra_dsdt_aml`].
pub fn virtio_mmio_device_aml(index: u16, base: u32, size: u32, irq: u32) -> Result<Vec<u8>> {
    if index > 0xfff {
        return Err(Error::Tables(format!("virtio-mmio device index {index} is above 0xfff")));
    }
    let name = format!("V{index:03X}");
    let hid: aml::AmlStr = "LNRO0005";
    let mem = aml::Memory32Fixed::new(true, base, size);
    let int = aml::Interrupt::new(true, true, false, false, irq);
    let crs = aml::ResourceTemplate::new(vec![&mem, &int]);
    let uid = u32::from(index);
    let (hid, uid, crs) =
        (aml::Name::new("_HID".into(), &hid), aml::Name::new("_UID".into(), &uid), aml::Name::new("_CRS".into(), &crs));
    let dev = aml::Device::new(name.as_str().into(), vec![&hid, &uid, &crs]);
    let mut bytes = Vec::new();
    dev.to_aml_bytes(&mut bytes);
    Ok(bytes)
}

/// The FADT: full (not hardware-reduced) ACPI with the PM1a blocks, SCI and reset register from the layout.
pub fn build_fadt(dsdt: u64, facs: u64) -> Result<Vec<u8>> {
    let dsdt32 = u32::try_from(dsdt).map_err(|_| Error::Tables(format!("DSDT at {dsdt:#x} is above 4 GiB")))?;
    let facs32 = u32::try_from(facs).map_err(|_| Error::Tables(format!("FACS at {facs:#x} is above 4 GiB")))?;
    let io = |port: u16, len: u8, access: AccessSize| GAS::new(AddressSpace::SystemIo, len * 8, 0, access, port.into());

    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        // The power button is the PM1 fixed-feature one (PWRBTN_STS/EN, signalled by the SCI): the flag stays
        // clear. There is no sleep button.
        .flag(Flags::SlpButton)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        .flag(Flags::ResetRegSup);
    // Both the 32-bit and X_ forms with equal values: old and new OSPMs read one or the other, ACPICA accepts the
    // pair only when they agree.
    fadt.firmware_ctrl = facs32.into();
    fadt.x_firmware_ctrl = facs.into();
    fadt.dsdt = dsdt32.into();
    fadt.x_dsdt = dsdt.into();
    fadt.sci_int = (ACPI_SCI_IRQ as u16).into();
    // SMI_CMD = 0: there is no SMM, the platform is always in ACPI mode (ACPICA then skips the enable handshake).
    fadt.pm1a_evt_blk = u32::from(ACPI_PM1A_EVT_PORT).into();
    fadt.pm1_evt_len = ACPI_PM1_EVT_LEN;
    fadt.x_pm1a_evt_blk = io(ACPI_PM1A_EVT_PORT, ACPI_PM1_EVT_LEN, AccessSize::Undefined);
    fadt.pm1a_cnt_blk = u32::from(ACPI_PM1A_CNT_PORT).into();
    fadt.pm1_cnt_len = ACPI_PM1_CNT_LEN;
    fadt.x_pm1a_cnt_blk = io(ACPI_PM1A_CNT_PORT, ACPI_PM1_CNT_LEN, AccessSize::WordAccess);
    fadt.reset_reg = io(ACPI_RESET_PORT, 1, AccessSize::ByteAccess);
    fadt.reset_value = ACPI_RESET_VALUE;
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    let mut bytes = Vec::new();
    fadt.finalize().to_aml_bytes(&mut bytes);
    Ok(bytes)
}

/// The MADT: one enabled local APIC per vCPU (APIC ID = index), the IOAPIC with ID `vcpu_count`, IRQ0 routed to
/// GSI 2 and the SCI as level/active-high (the PIIX4 convention), and NMI on LINT1 of every CPU.
pub fn build_madt(vcpu_count: u8) -> Vec<u8> {
    let mut madt = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    madt.write_u32(36, LAPIC_START as u32);
    madt.write_u32(40, MADT_PCAT_COMPAT);
    let mut entries = Vec::new();
    for id in 0..vcpu_count {
        ProcessorLocalApic::new(id, id, EnabledStatus::Enabled).to_aml_bytes(&mut entries);
    }
    IoApic::new(vcpu_count, IOAPIC_START as u32, 0).to_aml_bytes(&mut entries);
    if let Some(pit_pin) = isa_irq_ioapic_pin(0) {
        entries.extend_from_slice(&interrupt_source_override(0, pit_pin.into(), 0));
    }
    let sci = ACPI_SCI_IRQ as u8;
    entries.extend_from_slice(&interrupt_source_override(sci, sci.into(), MPS_ACTIVE_HIGH_LEVEL));
    entries.extend_from_slice(&[MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS, 0, 0, 1]);
    madt.append_slice(&entries);
    madt.as_slice().to_vec()
}

fn interrupt_source_override(isa_irq: u8, gsi: u32, flags: u16) -> [u8; 10] {
    let mut e = [0u8; 10];
    e[0] = MADT_INTERRUPT_SOURCE_OVERRIDE;
    e[1] = 10;
    e[2] = 0; // ISA bus
    e[3] = isa_irq;
    e[4..8].copy_from_slice(&gsi.to_le_bytes());
    e[8..10].copy_from_slice(&flags.to_le_bytes());
    e
}

/// One table and the guest address it belongs at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlacedTable {
    pub signature: [u8; 4],
    pub addr: u64,
    pub bytes: Vec<u8>,
}

/// The RSDP (for `RSDP_START`) and every table it leads to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuiltTables {
    pub rsdp: Vec<u8>,
    pub tables: Vec<PlacedTable>,
}

/// Hands out aligned space between `ACPI_TABLES_START` and `ACPI_TABLES_END`.
struct Placer {
    next: u64,
    placed: Vec<PlacedTable>,
}

impl Placer {
    fn place(&mut self, signature: [u8; 4], bytes: Vec<u8>, align: u64) -> Result<u64> {
        let addr = self.next.next_multiple_of(align);
        let end = addr + bytes.len() as u64;
        if end > ACPI_TABLES_END {
            return Err(Error::Tables(format!(
                "ACPI tables need more than the {} bytes at {ACPI_TABLES_START:#x}",
                ACPI_TABLES_END - ACPI_TABLES_START
            )));
        }
        self.next = end;
        self.placed.push(PlacedTable { signature, addr, bytes });
        Ok(addr)
    }
}

/// Builds all tables and their addresses without touching guest memory.
pub fn build_tables(config: &AcpiConfig) -> Result<BuiltTables> {
    if config.vcpu_count == 0 || config.vcpu_count == u8::MAX {
        return Err(Error::Tables(format!(
            "{} vCPUs cannot be described: need 1..=254 (APIC IDs 0..n-1 and the IOAPIC's ID n must stay below 0xff)",
            config.vcpu_count
        )));
    }
    let mut placer = Placer { next: ACPI_TABLES_START, placed: Vec::new() };
    let dsdt = placer.place(*b"DSDT", build_dsdt(config), 8)?;
    let mut facs_bytes = Vec::new();
    FACS::new().to_aml_bytes(&mut facs_bytes);
    // The FACS must be 64-byte aligned.
    let facs = placer.place(*b"FACS", facs_bytes, 64)?;
    let fadt = placer.place(*b"FACP", build_fadt(dsdt, facs)?, 8)?;
    let madt = placer.place(*b"APIC", build_madt(config.vcpu_count), 8)?;

    let mcfg = if config.pci_host_bridge { Some(placer.place(*b"MCFG", build_mcfg(), 8)?) } else { None };

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt);
    xsdt.add_entry(madt);
    if let Some(mcfg) = mcfg {
        xsdt.add_entry(mcfg);
    }
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);
    let xsdt_addr = placer.place(*b"XSDT", xsdt_bytes, 8)?;

    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp);
    Ok(BuiltTables { rsdp, tables: placer.placed })
}

/// Writes the RSDP at `RSDP_START` and the tables after `ACPI_TABLES_START`; returns where they went.
pub fn create_acpi_tables<M: GuestMemory + ?Sized>(mem: &M, config: &AcpiConfig) -> Result<AcpiLayout> {
    let BuiltTables { rsdp, tables } = build_tables(config)?;
    let write = |bytes: &[u8], addr: u64| {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|e| Error::Memory(format!("cannot write ACPI tables at {addr:#x}: {e}")))
    };
    write(&rsdp, RSDP_START)?;
    let mut layout = AcpiLayout { rsdp: RSDP_START, tables: Vec::new() };
    for t in &tables {
        write(&t.bytes, t.addr)?;
        layout.tables.push((t.signature, t.addr, t.bytes.len()));
    }
    Ok(layout)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn len_field(table: &[u8]) -> usize {
        u32::from_le_bytes(table[4..8].try_into().unwrap()) as usize
    }

    #[test]
    fn every_table_checksums_and_has_its_length() {
        for vcpus in [1, 4, 254] {
            let BuiltTables { rsdp, tables } = build_tables(&AcpiConfig::new(vcpus)).unwrap();
            assert_eq!(rsdp.len(), 36);
            assert_eq!(sum(&rsdp[..20]), 0);
            assert_eq!(sum(&rsdp), 0);
            for PlacedTable { signature: sig, addr, bytes } in &tables {
                assert_eq!(&bytes[..4], sig);
                assert_eq!(len_field(bytes), bytes.len());
                if sig != b"FACS" {
                    assert_eq!(sum(bytes), 0, "{}", String::from_utf8_lossy(sig));
                }
                assert!(*addr >= ACPI_TABLES_START && addr + bytes.len() as u64 <= ACPI_TABLES_END);
            }
        }
    }

    #[test]
    fn madt_entries() {
        let madt = build_madt(4);
        let mut types = Vec::new();
        let mut off = 44;
        while off < madt.len() {
            types.push(madt[off]);
            off += madt[off + 1] as usize;
        }
        assert_eq!(off, madt.len());
        assert_eq!(types, [0, 0, 0, 0, 1, 2, 2, 4]);
        // The IOAPIC's ID comes after the CPUs' APIC IDs.
        assert_eq!(madt[44 + 4 * 8 + 2], 4);
    }

    #[test]
    fn fadt_points_at_pm_blocks() {
        let fadt = build_fadt(0xe0100, 0xe0400).unwrap();
        assert_eq!(fadt.len(), 276);
        let u32_at = |o: usize| u32::from_le_bytes(fadt[o..o + 4].try_into().unwrap());
        assert_eq!(u32_at(40), 0xe0100); // DSDT
        assert_eq!(u32_at(56), u32::from(ACPI_PM1A_EVT_PORT));
        assert_eq!(u32_at(64), u32::from(ACPI_PM1A_CNT_PORT));
        assert_eq!(fadt[88], ACPI_PM1_EVT_LEN);
        assert_eq!(fadt[89], ACPI_PM1_CNT_LEN);
        assert_eq!(u32_at(112) & (1 << 20), 0, "must not be hardware-reduced");
        assert_ne!(u32_at(112) & (1 << 10), 0, "RESET_REG_SUP");
        assert_eq!(fadt[116], 1); // RESET_REG in system I/O space
        assert_eq!(fadt[128], ACPI_RESET_VALUE);
        assert_eq!(u64::from_le_bytes(fadt[140..148].try_into().unwrap()), 0xe0100);
        // X_DSDT
    }

    #[test]
    fn dsdt_has_s5_and_devices() {
        let mut config = AcpiConfig::new(1);
        config.extra_dsdt_aml.push(virtio_mmio_device_aml(0, 0xd000_0000, 0x1000, 5).unwrap());
        let dsdt = build_dsdt(&config);
        let has = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"_S5_"));
        assert!(has(b"COM1"));
        assert!(has(b"RTC_"));
        assert!(has(b"V000"));
        assert!(has(b"LNRO0005"));
        // IO descriptor for COM1: decode16, min = max = 0x3f8, len 8.
        assert!(has(&[0x47, 1, 0xf8, 0x03, 0xf8, 0x03, 1, 8]));
        assert_eq!(sum(&dsdt), 0);
        assert!(virtio_mmio_device_aml(0x1000, 0, 0, 0).is_err());
    }

    #[test]
    fn the_pci_host_bridge_is_described_only_when_there_is_one() {
        let without = build_tables(&AcpiConfig::new(1)).unwrap();
        assert!(!without.tables.iter().any(|t| &t.signature == b"MCFG"));
        assert!(!build_dsdt(&AcpiConfig::new(1)).windows(4).any(|w| w == b"PCI0"));

        let config = AcpiConfig { pci_host_bridge: true, ..AcpiConfig::new(1) };
        let dsdt = build_dsdt(&config);
        let has = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"PCI0"));
        // _HID PNP0A08 and _CID PNP0A03 as EISA IDs.
        assert!(has(&[b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x0a, 0x08]));
        assert!(has(&[b'_', b'C', b'I', b'D', 0x0c, 0x41, 0xd0, 0x0a, 0x03]));
        for name in [b"_SEG", b"_BBN", b"_UID", b"_ADR", b"_CRS"] {
            assert!(has(name), "{}", String::from_utf8_lossy(name));
        }
        // WordBusNumber 0..0: type 2, min 0, max 0, length 1.
        assert!(has(&[0x88, 13, 0, 2, 0x0c, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]));
        // IO 0xcf8, 8 ports.
        assert!(has(&[0x47, 1, 0xf8, 0x0c, 0xf8, 0x0c, 1, 8]));
        // DWordMemory over the window: min, max, translation 0, length.
        let mut window = Vec::new();
        for v in [PCI_MMIO_START as u32, (PCI_MMIO_START + PCI_MMIO_SIZE - 1) as u32, 0, PCI_MMIO_SIZE as u32] {
            window.extend_from_slice(&v.to_le_bytes());
        }
        assert!(has(&window));
        assert_eq!(sum(&dsdt), 0);

        let mcfg = build_mcfg();
        assert_eq!((&mcfg[..4], len_field(&mcfg), sum(&mcfg)), (&b"MCFG"[..], 60, 0));
        assert_eq!(u64::from_le_bytes(mcfg[44..52].try_into().unwrap()), PCI_ECAM_START);
        assert_eq!(&mcfg[52..56], &[0, 0, 0, PCI_ECAM_LAST_BUS], "segment 0, buses 0..last");
        let with = build_tables(&config).unwrap();
        assert!(with.tables.iter().any(|t| &t.signature == b"MCFG"));
    }

    #[test]
    fn rejects_vcpu_counts_it_cannot_describe() {
        assert!(build_tables(&AcpiConfig::new(0)).is_err());
        assert!(build_tables(&AcpiConfig::new(255)).is_err());
    }
}

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
    PCI_FIRMWARE_MMIO_SIZE, PCI_FIRMWARE_MMIO_START, PCI_MMIO_SIZE, PCI_MMIO_START, RSDP_START, RTC_IRQ,
};
use super::{Error, Result};
use crate::table_loader::{TableLoader, Zone};

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
/// 0, with the configuration ports and the 32-bit memory windows BARs live in as its resources (the one Kestrel
/// places them in, and the one firmware places them in, so that an OS booted by firmware keeps its BARs where
/// they are). There is no `_PRT`: the functions on it use MSI-X, not INTx.
fn pci_host_bridge() -> RawAml {
    let hid = aml::EISAName::new("PNP0A08");
    let cid = aml::EISAName::new("PNP0A03");
    let buses = aml::AddressSpace::new_bus_number(0u16, u16::from(PCI_ECAM_LAST_BUS));
    let config_ports = aml::IO::new(PCI_CONFIG_PORT, PCI_CONFIG_PORT, 1, PCI_CONFIG_PORTS);
    let memory_window = |start: u64, size: u64| {
        aml::AddressSpace::new_memory(
            aml::AddressSpaceCacheable::NotCacheable,
            true,
            start as u32,
            (start + size - 1) as u32,
            None,
        )
    };
    let window = memory_window(PCI_MMIO_START, PCI_MMIO_SIZE);
    let firmware_window = memory_window(PCI_FIRMWARE_MMIO_START, PCI_FIRMWARE_MMIO_SIZE);
    let crs = aml::ResourceTemplate::new(vec![&buses, &config_ports, &window, &firmware_window]);
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

/// Hands out aligned space between `start` and `end`.
struct Placer {
    start: u64,
    end: u64,
    next: u64,
    placed: Vec<PlacedTable>,
}

impl Placer {
    fn new(start: u64, end: u64) -> Self {
        Placer { start, end, next: start, placed: Vec::new() }
    }

    fn place(&mut self, signature: [u8; 4], bytes: Vec<u8>, align: u64) -> Result<u64> {
        let addr = self.next.next_multiple_of(align);
        let end = addr + bytes.len() as u64;
        if end > self.end {
            return Err(Error::Tables(format!(
                "ACPI tables need more than the {} bytes at {:#x}",
                self.end - self.start,
                self.start
            )));
        }
        self.next = end;
        self.placed.push(PlacedTable { signature, addr, bytes });
        Ok(addr)
    }
}

/// Builds all tables and their addresses without touching guest memory.
pub fn build_tables(config: &AcpiConfig) -> Result<BuiltTables> {
    build_tables_in(config, Placer::new(ACPI_TABLES_START, ACPI_TABLES_END), false)
}

/// The RSDT: the root table of ACPI 1.0, 32-bit addresses. Kestrel's own boots give only the XSDT (Linux reads
/// that); firmware hands the tables to older readers too (GRUB's `halt` finds the FADT through the RSDT only).
fn build_rsdt(entries: &[u64]) -> Result<Vec<u8>> {
    let mut rsdt = Sdt::new(*b"RSDT", 36, 1, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for &entry in entries {
        let entry = u32::try_from(entry).map_err(|_| Error::Tables(format!("a table at {entry:#x} is above 4 GiB")))?;
        rsdt.append_slice(&entry.to_le_bytes());
    }
    Ok(rsdt.as_slice().to_vec())
}

/// The tables placed by `placer`, with an RSDT beside the XSDT if `with_rsdt`.
fn build_tables_in(config: &AcpiConfig, mut placer: Placer, with_rsdt: bool) -> Result<BuiltTables> {
    if config.vcpu_count == 0 || config.vcpu_count == u8::MAX {
        return Err(Error::Tables(format!(
            "{} vCPUs cannot be described: need 1..=254 (APIC IDs 0..n-1 and the IOAPIC's ID n must stay below 0xff)",
            config.vcpu_count
        )));
    }
    let dsdt = placer.place(*b"DSDT", build_dsdt(config), 8)?;
    let mut facs_bytes = Vec::new();
    FACS::new().to_aml_bytes(&mut facs_bytes);
    // The FACS must be 64-byte aligned.
    let facs = placer.place(*b"FACS", facs_bytes, 64)?;
    let fadt = placer.place(*b"FACP", build_fadt(dsdt, facs)?, 8)?;
    let madt = placer.place(*b"APIC", build_madt(config.vcpu_count), 8)?;

    let mcfg = if config.pci_host_bridge { Some(placer.place(*b"MCFG", build_mcfg(), 8)?) } else { None };

    let entries: Vec<u64> = [Some(fadt), Some(madt), mcfg].into_iter().flatten().collect();
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for &entry in &entries {
        xsdt.add_entry(entry);
    }
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);
    let xsdt_addr = placer.place(*b"XSDT", xsdt_bytes, 8)?;

    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp);
    if with_rsdt {
        let rsdt_addr = placer.place(*b"RSDT", build_rsdt(&entries)?, 8)?;
        let rsdt_addr =
            u32::try_from(rsdt_addr).map_err(|_| Error::Tables(format!("RSDT at {rsdt_addr:#x} is above 4 GiB")))?;
        rsdp[RSDP_RSDT_ADDRESS..RSDP_RSDT_ADDRESS + 4].copy_from_slice(&rsdt_addr.to_le_bytes());
        set_checksum(&mut rsdp, RSDP_CHECKSUM, 0..RSDP_V1_LEN);
        let rsdp_len = rsdp.len();
        set_checksum(&mut rsdp, RSDP_EXTENDED_CHECKSUM, 0..rsdp_len);
    }
    Ok(BuiltTables { rsdp, tables: placer.placed })
}

/// Fields of the RSDP (ACPI 6.5, 5.2.5.3): the ACPI 1.0 part's checksum covers its first 20 bytes, the extended
/// one all 36.
const RSDP_CHECKSUM: usize = 8;
const RSDP_RSDT_ADDRESS: usize = 16;
const RSDP_XSDT_ADDRESS: usize = 24;
const RSDP_EXTENDED_CHECKSUM: usize = 32;
const RSDP_V1_LEN: usize = 20;
/// Every table header's checksum byte.
const SDT_CHECKSUM: usize = 9;
const SDT_HEADER_LEN: usize = 36;
/// FADT fields holding addresses of other tables: FIRMWARE_CTRL and DSDT (32-bit), X_FIRMWARE_CTRL and X_DSDT.
const FADT_TABLE_POINTERS: [(u32, u8); 4] = [(36, 4), (40, 4), (132, 8), (140, 8)];

/// Makes `range` of `bytes` sum to zero through the byte at `offset`.
fn set_checksum(bytes: &mut [u8], offset: usize, range: std::ops::Range<usize>) {
    bytes[offset] = 0;
    let sum = bytes[range].iter().fold(0u8, |a, b| a.wrapping_add(*b));
    bytes[offset] = sum.wrapping_neg();
}

/// The fw_cfg files through which firmware installs the tables (QEMU's names, which SeaBIOS and OVMF look for):
/// the RSDP, every table in one file, and the loader commands that place both and link them.
pub const LOADER_RSDP_FILE: &str = "etc/acpi/rsdp";
pub const LOADER_TABLES_FILE: &str = "etc/acpi/tables";
pub const TABLE_LOADER_FILE: &str = "etc/table-loader";

/// The tables as firmware installs them ([`crate::table_loader`]): the RSDP in the F segment, where the OS scans
/// for it, and the tables in high memory, linked once the firmware knows where it put them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoaderTables {
    /// [`LOADER_RSDP_FILE`].
    pub rsdp: Vec<u8>,
    /// [`LOADER_TABLES_FILE`]: every table at its offset, each table address in it an offset into this file.
    pub tables: Vec<u8>,
    /// [`TABLE_LOADER_FILE`].
    pub loader: Vec<u8>,
}

/// Builds the same tables Kestrel writes for a kernel, plus an RSDT, laid out from offset 0 of one file, and the
/// loader commands that turn their offsets into addresses and fix their checksums.
pub fn build_loader_tables(config: &AcpiConfig) -> Result<LoaderTables> {
    let built = build_tables_in(config, Placer::new(0, u64::from(u32::MAX)), true)?;
    let len = built.tables.iter().map(|t| t.addr as usize + t.bytes.len()).max().unwrap_or(0);
    let mut tables = vec![0u8; len];
    let mut loader = TableLoader::new();
    loader.allocate(LOADER_RSDP_FILE, 16, Zone::FSeg)?;
    // 64: the FACS's alignment, which its offset in the file keeps.
    loader.allocate(LOADER_TABLES_FILE, 64, Zone::High)?;
    let file = LOADER_TABLES_FILE;
    for table in &built.tables {
        let start = table.addr as usize;
        tables[start..start + table.bytes.len()].copy_from_slice(&table.bytes);
        let at = table.addr as u32;
        let entries = (table.bytes.len() - SDT_HEADER_LEN.min(table.bytes.len())) as u32;
        match &table.signature {
            b"FACP" => {
                for (field, size) in FADT_TABLE_POINTERS {
                    loader.add_pointer(file, at + field, size, file)?;
                }
            }
            b"XSDT" => {
                for entry in 0..entries / 8 {
                    loader.add_pointer(file, at + SDT_HEADER_LEN as u32 + 8 * entry, 8, file)?;
                }
            }
            b"RSDT" => {
                for entry in 0..entries / 4 {
                    loader.add_pointer(file, at + SDT_HEADER_LEN as u32 + 4 * entry, 4, file)?;
                }
            }
            _ => {}
        }
    }
    // After the pointers they cover were patched. The FACS has no checksum.
    for table in built.tables.iter().filter(|t| &t.signature != b"FACS") {
        let at = table.addr as u32;
        loader.add_checksum(file, at + SDT_CHECKSUM as u32, at, table.bytes.len() as u32)?;
    }
    loader.add_pointer(LOADER_RSDP_FILE, RSDP_RSDT_ADDRESS as u32, 4, file)?;
    loader.add_pointer(LOADER_RSDP_FILE, RSDP_XSDT_ADDRESS as u32, 8, file)?;
    loader.add_checksum(LOADER_RSDP_FILE, RSDP_CHECKSUM as u32, 0, RSDP_V1_LEN as u32)?;
    loader.add_checksum(LOADER_RSDP_FILE, RSDP_EXTENDED_CHECKSUM as u32, 0, built.rsdp.len() as u32)?;
    Ok(LoaderTables { rsdp: built.rsdp, tables, loader: loader.into_bytes() })
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
        // DWordMemory over each window: min, max, translation 0, length.
        for (start, size) in [(PCI_MMIO_START, PCI_MMIO_SIZE), (PCI_FIRMWARE_MMIO_START, PCI_FIRMWARE_MMIO_SIZE)] {
            let mut window = Vec::new();
            for v in [start as u32, (start + size - 1) as u32, 0, size as u32] {
                window.extend_from_slice(&v.to_le_bytes());
            }
            assert!(has(&window), "{start:#x}");
        }
        assert_eq!(sum(&dsdt), 0);

        let mcfg = build_mcfg();
        assert_eq!((&mcfg[..4], len_field(&mcfg), sum(&mcfg)), (&b"MCFG"[..], 60, 0));
        assert_eq!(u64::from_le_bytes(mcfg[44..52].try_into().unwrap()), PCI_ECAM_START);
        assert_eq!(&mcfg[52..56], &[0, 0, 0, PCI_ECAM_LAST_BUS], "segment 0, buses 0..last");
        let with = build_tables(&config).unwrap();
        assert!(with.tables.iter().any(|t| &t.signature == b"MCFG"));
    }

    #[test]
    fn firmware_running_the_loader_gets_linked_tables_that_checksum() {
        let config = AcpiConfig { pci_host_bridge: true, ..AcpiConfig::new(2) };
        let built = build_loader_tables(&config).unwrap();
        let placed = crate::table_loader::run_like_firmware(
            &built.loader,
            &[(LOADER_RSDP_FILE, &built.rsdp), (LOADER_TABLES_FILE, &built.tables)],
            0x0ffe_0010,
            0xf_5a70,
        );
        let (rsdp_at, rsdp) = &placed[LOADER_RSDP_FILE];
        let (tables_at, tables) = &placed[LOADER_TABLES_FILE];
        assert_eq!((*rsdp_at % 16, *tables_at % 64), (0, 0));
        assert!((0xf_0000..0x10_0000).contains(rsdp_at), "the RSDP is where the OS scans for it");
        assert_eq!((&rsdp[..8], sum(&rsdp[..20]), sum(rsdp)), (&b"RSD PTR "[..], 0, 0));
        // Every address in the tables is now an address of the file's copy: read tables as a guest would.
        let table = |address: u64| -> &[u8] {
            let start = (address - tables_at) as usize;
            let table = &tables[start..];
            let len = len_field(table);
            assert_eq!(sum(&table[..len]), 0, "{}", String::from_utf8_lossy(&table[..4]));
            &table[..len]
        };
        let u32_at = |bytes: &[u8], at: usize| u64::from(u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()));
        let u64_at = |bytes: &[u8], at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
        let rsdt = table(u32_at(rsdp, 16));
        let xsdt = table(u64_at(rsdp, 24));
        assert_eq!((&rsdt[..4], rsdt[8], &xsdt[..4]), (&b"RSDT"[..], 1, &b"XSDT"[..]));
        let rsdt_entries: Vec<u64> = (36..rsdt.len()).step_by(4).map(|at| u32_at(rsdt, at)).collect();
        let xsdt_entries: Vec<u64> = (36..xsdt.len()).step_by(8).map(|at| u64_at(xsdt, at)).collect();
        assert_eq!(rsdt_entries, xsdt_entries);
        let signatures: Vec<&[u8]> = rsdt_entries.iter().map(|&at| &table(at)[..4]).collect();
        assert_eq!(signatures, [&b"FACP"[..], b"APIC", b"MCFG"]);
        // GRUB's halt: the FADT's 32-bit DSDT address, whose first object is `_S5_` with a ZeroOp sleep type.
        let fadt = table(rsdt_entries[0]);
        assert_eq!(u32_at(fadt, 40), u64_at(fadt, 140));
        assert_eq!(u32_at(fadt, 36), u64_at(fadt, 132));
        let facs = u32_at(fadt, 36);
        assert_eq!((facs % 64, &tables[(facs - tables_at) as usize..][..4]), (0, &b"FACS"[..]));
        let dsdt = table(u32_at(fadt, 40));
        assert_eq!(dsdt, build_dsdt(&config), "the same DSDT a kernel gets");
        assert_eq!(&dsdt[36..42], &[0x08, b'_', b'S', b'5', b'_', 0x12]);
        assert_eq!(dsdt[45], 0x00, "S5's SLP_TYPa as ZeroOp");
    }

    #[test]
    fn rejects_vcpu_counts_it_cannot_describe() {
        assert!(build_tables(&AcpiConfig::new(0)).is_err());
        assert!(build_tables(&AcpiConfig::new(255)).is_err());
    }
}

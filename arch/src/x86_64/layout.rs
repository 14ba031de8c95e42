//! The x86_64 guest physical address map and the platform's fixed I/O ports.
//!
//! Low memory follows the PC conventions Linux expects (real-mode IVT/BDA below 0x500, the BIOS area
//! 0xA0000-0xFFFFF where it scans for the RSDP and MP floating pointer); RAM that would overlap the 32-bit MMIO gap
//! continues above 4 GiB.

/// Boot GDT: null, null, code at 0x10 and data at 0x18 (the Linux boot protocol's `__BOOT_CS`/`__BOOT_DS`), then
/// the 16-byte long-mode TSS descriptor at 0x20 (see `gdt.rs`): six 8-byte slots.
pub const BOOT_GDT_START: u64 = 0x500;
/// Empty boot IDT, right after the GDT.
pub const BOOT_IDT_START: u64 = 0x530;
/// `hvm_start_info` for the PVH entry, followed by its memory map.
pub const PVH_INFO_START: u64 = 0x6000;
/// The Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Boot page tables: PML4, one PDPT, four page directories of 2 MiB pages identity-mapping the first 4 GiB.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xA000;
pub const PDE_START: u64 = 0xB000;
/// Initial stack pointer for 64-bit entries: the top of the free page between the zero page and the page tables.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line accepted, terminating NUL included (Linux's x86 COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// MP floating pointer and configuration table, in the last KiB of base memory (where Linux scans: EBDA).
pub const MPTABLE_START: u64 = 0x9fc00;
/// End of conventional RAM; 0xA0000-0xFFFFF is the legacy video/BIOS hole.
pub const EBDA_END: u64 = 0xa0000;
/// ACPI tables live in the BIOS read-only area, where Linux scans for the RSDP (0xE0000-0xFFFFF).
pub const RSDP_START: u64 = 0xe0000;
pub const ACPI_TABLES_START: u64 = 0xe0100;
pub const ACPI_TABLES_END: u64 = 0x100000;
/// Where protected-mode kernels are loaded (bzImage) and where RAM above the BIOS hole starts.
pub const HIMEM_START: u64 = 0x100000;

/// The 32-bit MMIO gap: no RAM here, devices only. Its size keeps room for a PCI ECAM and BARs later.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// The PCI host bridge's 32-bit memory window, where BARs go: the start of the gap, up to the platform window.
pub const PCI_MMIO_START: u64 = MMIO_GAP_START;
pub const PCI_MMIO_SIZE: u64 = 0x1000_0000;
/// Window inside the gap handed out to platform MMIO devices (virtio-mmio etc.), below the fixed chipset pages.
pub const PLATFORM_MMIO_START: u64 = 0xd000_0000;
pub const PLATFORM_MMIO_SIZE: u64 = 0x1000_0000;
/// PCI Express enhanced configuration (ECAM) for bus 0 to [`PCI_ECAM_LAST_BUS`], 1 MiB per bus, after the platform
/// window. Reserved in the e820 map, as Linux requires before it trusts the MCFG table.
pub const PCI_ECAM_START: u64 = PLATFORM_MMIO_START + PLATFORM_MMIO_SIZE;
pub const PCI_ECAM_LAST_BUS: u8 = 0;
pub const PCI_ECAM_SIZE: u64 = (PCI_ECAM_LAST_BUS as u64 + 1) << 20;
/// The host bridge's second 32-bit memory window, from the ECAM's end up to the IOAPIC. Kestrel places no BAR
/// here; PC firmware does: SeaBIOS assigns every BAR itself, top-down from 0xFEC00000 (a constant of its build,
/// whatever the platform says), so its BARs land at the top of this window.
pub const PCI_FIRMWARE_MMIO_START: u64 = PCI_ECAM_START + PCI_ECAM_SIZE;
pub const PCI_FIRMWARE_MMIO_SIZE: u64 = IOAPIC_START - PCI_FIRMWARE_MMIO_START;
/// KVM's TSS region (three pages, must not overlap RAM or devices), and below it the page KVM uses for its
/// identity map (on Intel hosts without unrestricted guests); KVM puts that page there by default. Firmware images
/// larger than 256 KiB reach below these pages: then both move below the image (`pc_irqchip_layout`).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
const KVM_TSS_PAGES: u64 = 3;
/// A PC BIOS image (`-bios`) sits at the top of the 32-bit address space, its size a multiple of 64 KiB and at
/// most 16 MiB (QEMU's rules, so the images made for QEMU fit). Below 1 MiB, [`BIOS_SHADOW_START`]..1 MiB is the
/// RAM a chipset's PAM registers let a BIOS copy itself into ("shadow") from its 4 GiB alias, at the same offset
/// from the end: a 256 KiB SeaBIOS runs code from 0xC0000 up once copied.
pub const BIOS_SIZE_GRANULE: u64 = 64 << 10;
pub const BIOS_MAX_SIZE: u64 = 16 << 20;
pub const BIOS_SHADOW_START: u64 = 0xc_0000;
pub const BIOS_SHADOW_SIZE: u64 = HIMEM_START - BIOS_SHADOW_START;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const LAPIC_START: u64 = 0xfee0_0000;
/// RAM that does not fit below the gap continues here.
pub const HIGH_RAM_START: u64 = MMIO_GAP_END;

/// 16550 UART (COM1) and its ISA interrupt.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
/// i8042 keyboard controller: data and command/status ports.
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// CMOS RTC/NVRAM index and data ports, and the RTC interrupt.
pub const CMOS_PORT: u16 = 0x70;
pub const RTC_IRQ: u32 = 8;
/// ACPI fixed-hardware PM block (see the FADT): PM1a event block (status, enable) and PM1a control.
pub const ACPI_PM1A_EVT_PORT: u16 = 0x600;
pub const ACPI_PM1_EVT_LEN: u8 = 4;
pub const ACPI_PM1A_CNT_PORT: u16 = 0x604;
pub const ACPI_PM1_CNT_LEN: u8 = 2;
/// QEMU's firmware configuration interface (fw_cfg): selector, data and DMA ports from here.
pub const FW_CFG_PORT: u16 = 0x510;
/// PCI configuration mechanism #1: address at 0xCF8, data at 0xCFC (0xCF9 inside it is the reset register).
pub const PCI_CONFIG_PORT: u16 = 0xcf8;
pub const PCI_CONFIG_PORTS: u8 = 8;
/// ACPI reset register (FADT RESET_REG) and the value that resets.
pub const ACPI_RESET_PORT: u16 = 0xcf9;
pub const ACPI_RESET_VALUE: u8 = 0x06;
/// System control interrupt.
pub const ACPI_SCI_IRQ: u32 = 9;
/// SLP_TYP value for S5 in the DSDT's `\_S5` package (0, as on QEMU's PIIX4, so payloads run on both); the guest
/// writes `SLP_TYP << 10 | SLP_EN` to PM1a_CNT.
pub const ACPI_S5_SLEEP_TYPE: u16 = 0;
pub const ACPI_SLP_EN: u16 = 1 << 13;

/// Number of IOAPIC input pins (GSIs 0-23).
pub const IOAPIC_PINS: u32 = 24;

/// The IOAPIC pin an ISA IRQ arrives on, as on PC hardware and QEMU: the PIT's IRQ0 on pin 2 (announced by an
/// interrupt source override in the MADT and an I/O interrupt entry in the MP table), IRQ2 (the 8259 cascade) on
/// none, every other IRQ on the pin of its own number.
pub fn isa_irq_ioapic_pin(irq: u8) -> Option<u8> {
    match irq {
        0 => Some(2),
        2 => None,
        n => Some(n),
    }
}

/// An interrupt controller input a GSI is wired to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqChipPin {
    PicPrimary(u8),
    PicSecondary(u8),
    Ioapic(u8),
}

/// Why a BIOS image cannot be mapped.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BiosSizeError {
    #[error("the image is empty")]
    Empty,
    #[error("its size ({0} bytes) is not a multiple of 64 KiB")]
    NotGranular(u64),
    #[error("its size ({0} bytes) is larger than 16 MiB")]
    TooLarge(u64),
}

/// Where a BIOS image of `size` bytes starts: it ends at 4 GiB, where the reset vector (0xFFFFFFF0) is.
pub fn bios_start(size: u64) -> Result<u64, BiosSizeError> {
    match size {
        0 => Err(BiosSizeError::Empty),
        size if size > BIOS_MAX_SIZE => Err(BiosSizeError::TooLarge(size)),
        size if size % BIOS_SIZE_GRANULE != 0 => Err(BiosSizeError::NotGranular(size)),
        size => Ok(MMIO_GAP_END - size),
    }
}

/// The PC's interrupt controllers as a hypervisor sets them up, passed to it (`VmX86_64::create_pc_irqchip`) so
/// that the layout stays here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PcIrqchipLayout {
    /// Where KVM's TSS region goes.
    pub tss_address: u64,
    /// Where KVM's identity-map page goes; `None`: KVM's default, right below [`KVM_TSS_ADDRESS`].
    pub identity_map_address: Option<u64>,
    /// Which controller inputs each GSI drives.
    pub routes: Vec<(u32, IrqChipPin)>,
    /// Where the IOAPIC sits and how many input pins it has (the ACPI tables say the same).
    pub ioapic_start: u64,
    pub ioapic_pins: u32,
}

/// The PC's irqchip layout, with KVM's private pages below the firmware image that starts at `firmware_start`,
/// if there is one and it would cover them (4 GiB minus 16 MiB at the lowest: still above the LAPIC's page).
pub fn pc_irqchip_layout(firmware_start: Option<u64>) -> PcIrqchipLayout {
    let (tss_address, identity_map_address) = match firmware_start {
        Some(start) if start < KVM_TSS_ADDRESS + KVM_TSS_PAGES * 0x1000 => {
            let tss = start - KVM_TSS_PAGES * 0x1000;
            (tss, Some(tss - 0x1000))
        }
        _ => (KVM_TSS_ADDRESS, None),
    };
    PcIrqchipLayout {
        tss_address,
        identity_map_address,
        routes: pc_irq_routes(),
        ioapic_start: IOAPIC_START,
        ioapic_pins: IOAPIC_PINS,
    }
}

/// The PC's GSI wiring: which controller inputs each global system interrupt drives. Devices raise GSIs by their
/// ISA IRQ number (0-15) or IOAPIC pin (16-23).
pub fn pc_irq_routes() -> Vec<(u32, IrqChipPin)> {
    let mut routes = Vec::new();
    for irq in 0..16u8 {
        if irq != 2 {
            let pic = if irq < 8 { IrqChipPin::PicPrimary(irq) } else { IrqChipPin::PicSecondary(irq - 8) };
            routes.push((u32::from(irq), pic));
        }
        if let Some(pin) = isa_irq_ioapic_pin(irq) {
            routes.push((u32::from(irq), IrqChipPin::Ioapic(pin)));
        }
    }
    for pin in 16..IOAPIC_PINS as u8 {
        routes.push((u32::from(pin), IrqChipPin::Ioapic(pin)));
    }
    routes
}

/// Guest RAM regions for `mem_size` bytes: below the MMIO gap, then above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![(0, MMIO_GAP_START), (HIGH_RAM_START, mem_size - MMIO_GAP_START)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bios_images_end_at_4_gib_and_keep_qemus_size_rules() {
        assert_eq!(bios_start(256 << 10), Ok(0xfffc_0000));
        assert_eq!(bios_start(64 << 10), Ok(0xffff_0000));
        assert_eq!(bios_start(16 << 20), Ok(0xff00_0000));
        assert_eq!(bios_start(0), Err(BiosSizeError::Empty));
        assert_eq!(bios_start((16 << 20) + (64 << 10)), Err(BiosSizeError::TooLarge((16 << 20) + (64 << 10))));
        assert_eq!(bios_start(100_000), Err(BiosSizeError::NotGranular(100_000)));
        assert_eq!(BIOS_SHADOW_START + BIOS_SHADOW_SIZE, 0x10_0000);
    }

    #[test]
    fn kvm_pages_move_below_a_firmware_image_only_when_it_covers_them() {
        let direct = pc_irqchip_layout(None);
        assert_eq!((direct.tss_address, direct.identity_map_address), (KVM_TSS_ADDRESS, None));
        // SeaBIOS's 256 KiB image starts exactly where the TSS ends.
        let seabios = pc_irqchip_layout(Some(0xfffc_0000));
        assert_eq!((seabios.tss_address, seabios.identity_map_address), (KVM_TSS_ADDRESS, None));
        for size in [512 << 10, 4 << 20, BIOS_MAX_SIZE] {
            let start = bios_start(size).unwrap();
            let layout = pc_irqchip_layout(Some(start));
            assert_eq!(layout.tss_address + 3 * 0x1000, start, "{size:#x}");
            assert_eq!(layout.identity_map_address, Some(layout.tss_address - 0x1000), "{size:#x}");
            assert!(layout.identity_map_address.unwrap() >= LAPIC_START + 0x1000, "{size:#x}");
        }
    }

    #[test]
    fn the_pit_reaches_ioapic_pin_2_and_nothing_else_does() {
        let routes = pc_irq_routes();
        let ioapic_sources = |pin: u8| -> Vec<u32> {
            routes.iter().filter(|(_, r)| *r == IrqChipPin::Ioapic(pin)).map(|(gsi, _)| *gsi).collect()
        };
        assert_eq!(ioapic_sources(2), vec![0]);
        assert_eq!(ioapic_sources(0), Vec::<u32>::new());
        assert_eq!(ioapic_sources(4), vec![4], "COM1");
        assert_eq!(ioapic_sources(9), vec![9], "SCI");
        assert_eq!(ioapic_sources(23), vec![23]);
        assert!(routes.contains(&(4, IrqChipPin::PicPrimary(4))));
        assert!(routes.contains(&(9, IrqChipPin::PicSecondary(1))));
        assert!(!routes.iter().any(|(gsi, _)| *gsi == 2), "IRQ2 is the cascade");
    }

    #[test]
    fn small_guest_is_one_region() {
        assert_eq!(ram_regions(512 << 20), vec![(0, 512 << 20)]);
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        let regions = ram_regions(6 << 30);
        assert_eq!(regions, vec![(0, MMIO_GAP_START), (1 << 32, (6 << 30) - MMIO_GAP_START)]);
        let total: u64 = regions.iter().map(|r| r.1).sum();
        assert_eq!(total, 6 << 30);
        assert!(regions.iter().all(|&(start, len)| start + len <= MMIO_GAP_START || start >= MMIO_GAP_END));
    }

    #[test]
    fn the_pci_windows_stay_clear_of_each_other_and_the_chipset() {
        let ranges = [
            (PCI_MMIO_START, PCI_MMIO_SIZE),
            (PLATFORM_MMIO_START, PLATFORM_MMIO_SIZE),
            (PCI_ECAM_START, PCI_ECAM_SIZE),
            (PCI_FIRMWARE_MMIO_START, PCI_FIRMWARE_MMIO_SIZE),
            (IOAPIC_START, 0x1000),
            (LAPIC_START, 0x1000),
            (KVM_TSS_ADDRESS, 0x3000),
        ];
        for (i, &(a, a_len)) in ranges.iter().enumerate() {
            assert!(a >= MMIO_GAP_START && a + a_len <= MMIO_GAP_END, "{a:#x} is in the gap");
            for &(b, b_len) in &ranges[i + 1..] {
                assert!(a + a_len <= b || b + b_len <= a, "{a:#x} overlaps {b:#x}");
            }
        }
        assert_eq!(PCI_ECAM_SIZE, 1 << 20);
        // SeaBIOS's BARs end at its build's BUILD_PCIMEM_END, the IOAPIC's address.
        assert_eq!(PCI_FIRMWARE_MMIO_START + PCI_FIRMWARE_MMIO_SIZE, 0xfec0_0000);
    }

    #[test]
    fn fixed_pages_do_not_overlap() {
        let pages = [BOOT_GDT_START, PVH_INFO_START, ZERO_PAGE_START, PML4_START, PDPTE_START, PDE_START];
        for w in pages.windows(2) {
            assert!(w[0] < w[1]);
        }
        const {
            assert!(PDE_START + 4 * 0x1000 <= CMDLINE_START);
            assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= MPTABLE_START);
            assert!(ACPI_TABLES_END <= HIMEM_START);
        }
    }
}

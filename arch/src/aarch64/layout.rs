//! The aarch64 guest physical address map, close to QEMU's `virt` machine so that guests, tools and people find
//! things where they expect them: platform devices below 1 GiB, RAM from 1 GiB up.
//!
//! ```text
//! 0x0800_0000  GIC distributor (64 KiB)
//! 0x0801_0000  GICv2 CPU interface (64 KiB; only with a GICv2)
//! 0x0808_0000  GICv3 ITS (128 KiB; PCI functions' MSIs), on a machine with PCI devices
//! 0x080a_0000  GICv3 redistributors, 128 KiB per vCPU, room for MAX_VCPUS
//! 0x0900_0000  PL011 UART       SPI 1
//! 0x0901_0000  PL031 RTC        SPI 2
//! 0x0903_0000  PL061 GPIO       SPI 7  (line 3: the power key)
//! 0x0a00_0000  virtio-mmio, VIRTIO_MMIO_SLOTS slots of 4 KiB, SPIs 16..
//! 0x1000_0000  PCI: the 32-bit MMIO window for BARs; 0x3eff_0000 reserved for an I/O window; 0x3f00_0000 ECAM
//!              (bus 0)
//! 0x4000_0000  RAM
//! ```
//!
//! Interrupt numbers here are SPI numbers as the FDT writes them (`<GIC_SPI n flags>`). The GIC's interrupt ID of
//! SPI n is n + 32; KVM's default irqfd routing on arm64 maps GSI n to SPI n, so an SPI number is also the GSI to
//! register an irqfd for.

use super::{Error, Result};
use crate::{GIB, MIB};

/// Guest-visible vCPU limit: as many GICv3 redistributor frames as fit below the UART.
pub const MAX_VCPUS: u32 = ((GIC_REDIST_END - GIC_REDIST_START) / GIC_REDIST_SIZE_PER_CPU) as u32;

pub const GIC_DIST_START: u64 = 0x0800_0000;
pub const GIC_DIST_SIZE: u64 = 0x1_0000;
/// The GICv2 CPU interface; a GICv3 has system registers instead.
pub const GIC_CPU_START: u64 = 0x0801_0000;
pub const GIC_CPU_SIZE: u64 = 0x1_0000;
/// The GICv3 ITS: its control frame, then the translation frame whose GITS_TRANSLATER PCI functions' MSIs are
/// written to (KVM's ITS is these two 64 KiB frames).
pub const GIC_ITS_START: u64 = 0x0808_0000;
pub const GIC_ITS_SIZE: u64 = 0x2_0000;
/// Each GICv3 redistributor is two 64 KiB frames (RD_base and SGI_base).
pub const GIC_REDIST_START: u64 = 0x080a_0000;
pub const GIC_REDIST_SIZE_PER_CPU: u64 = 0x2_0000;
const GIC_REDIST_END: u64 = PL011_START;

pub const PL011_START: u64 = 0x0900_0000;
pub const PL011_SIZE: u64 = 0x1000;
pub const PL011_SPI: u32 = 1;
pub const PL031_START: u64 = 0x0901_0000;
pub const PL031_SIZE: u64 = 0x1000;
pub const PL031_SPI: u32 = 2;
pub const PL061_START: u64 = 0x0903_0000;
pub const PL061_SIZE: u64 = 0x1000;
pub const PL061_SPI: u32 = 7;
/// The PL061 input the `gpio-keys` power key is wired to (as on QEMU's virt machine).
pub const POWER_KEY_GPIO_LINE: u8 = 3;

/// virtio-mmio slots: each the size of Kestrel's transport register window (devices::virtio::mmio::MMIO_LEN).
pub const VIRTIO_MMIO_START: u64 = 0x0a00_0000;
pub const VIRTIO_MMIO_SLOT_SIZE: u64 = 0x1000;
pub const VIRTIO_MMIO_SLOTS: u32 = 32;
pub const VIRTIO_MMIO_FIRST_SPI: u32 = 16;

/// The PCI host bridge, at QEMU virt's low windows: memory BARs (32-bit, non-prefetchable) in this window.
pub const PCI_MMIO_START: u64 = 0x1000_0000;
pub const PCI_MMIO_SIZE: u64 = 0x2eff_0000;
/// Kept free for a PCI I/O window, where QEMU's virt has one; Kestrel's functions have no I/O BARs, so the FDT
/// describes none.
pub const PCI_IO_START: u64 = 0x3eff_0000;
pub const PCI_IO_SIZE: u64 = 0x1_0000;
/// ECAM, 1 MiB per bus: bus 0 to `PCI_ECAM_LAST_BUS`, the buses there are. QEMU's virt reserves 16 MiB here.
pub const PCI_ECAM_START: u64 = 0x3f00_0000;
pub const PCI_ECAM_LAST_BUS: u8 = 0;
pub const PCI_ECAM_SIZE: u64 = (PCI_ECAM_LAST_BUS as u64 + 1) << 20;
/// Room kept for ECAM, up to RAM.
pub const PCI_ECAM_RESERVED_SIZE: u64 = 0x100_0000;

pub const RAM_START: u64 = 0x4000_0000;
/// The highest guest physical address with KVM's default 40-bit IPA space; a VM created with a larger IPA size
/// could hold more, but nothing needs that yet.
pub const IPA_LIMIT_DEFAULT: u64 = 1 << 40;
pub const MAX_RAM_SIZE: u64 = IPA_LIMIT_DEFAULT - RAM_START;

/// Linux maps the FDT with 2 MiB blocks and refuses one larger than 2 MiB (Documentation/arch/arm64/booting.rst).
pub const FDT_MAX_SIZE: u64 = 2 * MIB;
/// The kernel's base must be 2 MiB aligned; its text starts `text_offset` above that.
pub const KERNEL_ALIGNMENT: u64 = 2 * MIB;
/// The initrd must lie in the same 1 GiB-aligned window of at most 32 GiB as the kernel (booting.rst); the kernel
/// sits at the start of RAM, so everything the boot loader places stays below this many bytes into RAM.
pub const BOOT_WINDOW_SIZE: u64 = 32 * GIB;
/// The initrd starts on a 64 KiB boundary, a page for every granule Linux supports.
pub const INITRD_ALIGNMENT: u64 = 0x1_0000;
/// Linux's arm64 COMMAND_LINE_SIZE, terminating NUL included.
pub const CMDLINE_MAX_SIZE: usize = 2048;

/// Redistributor region size for `vcpus` vCPUs.
/// Where the GIC's frames go, passed to the hypervisor that creates it (`VmAarch64::create_gic`) so that the
/// layout stays here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GicLayout {
    pub distributor: u64,
    /// GICv3: the first redistributor; each further vCPU's follows `GIC_REDIST_SIZE_PER_CPU` bytes on.
    pub redistributors: u64,
    /// GICv3: how many redistributors fit before the next device.
    pub max_vcpus: u32,
    /// GICv2: the CPU interface.
    pub cpu_interface: u64,
}

/// The virt machine's GIC.
pub const GIC_LAYOUT: GicLayout = GicLayout {
    distributor: GIC_DIST_START,
    redistributors: GIC_REDIST_START,
    max_vcpus: MAX_VCPUS,
    cpu_interface: GIC_CPU_START,
};

pub fn gic_redist_size(vcpus: u32) -> Result<u64> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(Error::Cpus(format!("{vcpus} vCPUs requested, the GIC layout holds 1 to {MAX_VCPUS}")));
    }
    Ok(u64::from(vcpus) * GIC_REDIST_SIZE_PER_CPU)
}

/// A virtio-mmio slot: its register window and its SPI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmioSlot {
    pub base: u64,
    pub size: u64,
    pub spi: u32,
}

/// The `index`th virtio-mmio slot, or None past the last one.
pub fn virtio_mmio_slot(index: u32) -> Option<VirtioMmioSlot> {
    (index < VIRTIO_MMIO_SLOTS).then(|| VirtioMmioSlot {
        base: VIRTIO_MMIO_START + u64::from(index) * VIRTIO_MMIO_SLOT_SIZE,
        size: VIRTIO_MMIO_SLOT_SIZE,
        spi: VIRTIO_MMIO_FIRST_SPI + index,
    })
}

/// The interrupt ID the GIC gives SPI `spi` (for KVM_IRQ_LINE, which takes INTIDs, unlike irqfd GSIs).
pub const fn spi_intid(spi: u32) -> u32 {
    spi + 32
}

/// Checks a RAM size and returns the one RAM region `(start, size)`.
pub fn ram_region(mem_size: u64) -> Result<(u64, u64)> {
    if mem_size == 0 || mem_size > MAX_RAM_SIZE {
        return Err(Error::Memory(format!(
            "{} MiB of RAM requested; aarch64 guests take more than 0 and at most {} MiB",
            mem_size / MIB,
            MAX_RAM_SIZE / MIB
        )));
    }
    Ok((RAM_START, mem_size))
}

/// Where each boot blob goes in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootPlacement {
    /// Where the Image is copied and where the vCPU starts.
    pub kernel_start: u64,
    /// The initrd's `(start, size)`, when there is one.
    pub initrd: Option<(u64, u64)>,
    /// The FDT's address (2 MiB aligned: the blob may use the whole 2 MiB block).
    pub fdt_start: u64,
}

/// Places kernel, initrd and FDT: the kernel at the first 2 MiB boundary of RAM plus its `text_offset`, occupying
/// `kernel_size` bytes (the header's image_size, bss included); the FDT in the last whole 2 MiB block of the boot
/// window (the end of RAM for guests up to 32 GiB); the initrd just below the FDT. Fails with a message naming
/// how much RAM would have been needed.
pub fn place_boot_blobs(
    mem_size: u64,
    text_offset: u64,
    kernel_size: u64,
    initrd_size: Option<u64>,
) -> Result<BootPlacement> {
    let (ram_start, ram_size) = ram_region(mem_size)?;
    let too_large = |what: &str| Error::Kernel(format!("{what} does not fit in the address space"));
    let kernel_start = ram_start.checked_add(text_offset).ok_or_else(|| too_large("text_offset"))?;
    let kernel_end = kernel_start.checked_add(kernel_size).ok_or_else(|| too_large("image_size"))?;

    let window_end = ram_start + ram_size.min(BOOT_WINDOW_SIZE);
    let fdt_start = (window_end & !(FDT_MAX_SIZE - 1)).checked_sub(FDT_MAX_SIZE);
    let initrd_size = initrd_size.unwrap_or(0);
    let initrd_start =
        fdt_start.and_then(|fdt| fdt.checked_sub(initrd_size)).map(|start| start & !(INITRD_ALIGNMENT - 1));

    match (fdt_start, initrd_start) {
        (Some(fdt_start), Some(initrd_start)) if initrd_start >= kernel_end && fdt_start >= ram_start => {
            Ok(BootPlacement {
                kernel_start,
                initrd: (initrd_size > 0).then_some((initrd_start, initrd_size)),
                fdt_start,
            })
        }
        _ => {
            // Kernel from the start of RAM, the initrd (rounded to its alignment), a whole 2 MiB for the FDT, and
            // up to 2 MiB lost to aligning the FDT down.
            let needed = (kernel_end - ram_start)
                .saturating_add(initrd_size.saturating_add(INITRD_ALIGNMENT))
                .saturating_add(2 * FDT_MAX_SIZE);
            Err(Error::Memory(format!(
                "{} MiB of RAM is too little for this kernel{}: at least {} MiB are needed",
                ram_size / MIB,
                if initrd_size > 0 { " and initrd" } else { "" },
                needed.div_ceil(MIB)
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_windows_do_not_overlap_and_stay_below_ram() {
        let mut windows = vec![
            (GIC_DIST_START, GIC_DIST_SIZE),
            (GIC_CPU_START, GIC_CPU_SIZE),
            (GIC_ITS_START, GIC_ITS_SIZE),
            (GIC_REDIST_START, gic_redist_size(MAX_VCPUS).unwrap()),
            (PL011_START, PL011_SIZE),
            (PL031_START, PL031_SIZE),
            (PL061_START, PL061_SIZE),
            (VIRTIO_MMIO_START, u64::from(VIRTIO_MMIO_SLOTS) * VIRTIO_MMIO_SLOT_SIZE),
            (PCI_MMIO_START, PCI_MMIO_SIZE),
            (PCI_IO_START, PCI_IO_SIZE),
            (PCI_ECAM_START, PCI_ECAM_RESERVED_SIZE),
        ];
        const { assert!(PCI_ECAM_SIZE <= PCI_ECAM_RESERVED_SIZE) };
        windows.sort();
        for pair in windows.windows(2) {
            assert!(pair[0].0 + pair[0].1 <= pair[1].0, "{:#x?} overlaps {:#x?}", pair[0], pair[1]);
        }
        let (last_start, last_size) = windows[windows.len() - 1];
        assert!(last_start + last_size <= RAM_START);
    }

    #[test]
    fn spis_are_distinct_and_within_the_gic() {
        let mut spis = vec![PL011_SPI, PL031_SPI, PL061_SPI];
        spis.extend((0..VIRTIO_MMIO_SLOTS).map(|i| virtio_mmio_slot(i).unwrap().spi));
        let count = spis.len();
        spis.sort();
        spis.dedup();
        assert_eq!(spis.len(), count);
        // INTIDs from 1020 up are special; the vmm sizes the vGIC (KVM_DEV_ARM_VGIC_GRP_NR_IRQS) to the highest.
        assert!(spi_intid(*spis.last().unwrap()) < 1020);
        assert_eq!(spi_intid(PL011_SPI), 33);
    }

    #[test]
    fn virtio_slots_are_contiguous_and_bounded() {
        let first = virtio_mmio_slot(0).unwrap();
        assert_eq!(first, VirtioMmioSlot { base: VIRTIO_MMIO_START, size: 0x1000, spi: 16 });
        let last = virtio_mmio_slot(VIRTIO_MMIO_SLOTS - 1).unwrap();
        assert_eq!(last.base, VIRTIO_MMIO_START + 31 * 0x1000);
        assert_eq!(virtio_mmio_slot(VIRTIO_MMIO_SLOTS), None);
        assert_eq!(virtio_mmio_slot(u32::MAX), None);
    }

    #[test]
    fn redistributors_grow_with_vcpus_and_refuse_too_many() {
        assert_eq!(gic_redist_size(1).unwrap(), 0x2_0000);
        assert_eq!(gic_redist_size(2).unwrap(), 0x4_0000);
        assert_eq!(MAX_VCPUS, 123, "as QEMU virt's low redistributor region");
        assert!(gic_redist_size(0).is_err());
        assert!(gic_redist_size(MAX_VCPUS + 1).is_err());
    }

    #[test]
    fn kernel_at_ram_start_fdt_at_the_end_initrd_below_it() {
        let p = place_boot_blobs(512 * MIB, 0, 40 * MIB, Some(10 * MIB + 123)).unwrap();
        assert_eq!(p.kernel_start, RAM_START);
        assert_eq!(p.fdt_start, RAM_START + 510 * MIB);
        let (initrd_start, initrd_size) = p.initrd.unwrap();
        assert_eq!(initrd_size, 10 * MIB + 123);
        assert!(initrd_start + initrd_size <= p.fdt_start);
        assert_eq!(initrd_start % INITRD_ALIGNMENT, 0);
        assert!(initrd_start >= RAM_START + 40 * MIB);
    }

    #[test]
    fn text_offset_moves_the_kernel_and_odd_ram_sizes_align_the_fdt_down() {
        let p = place_boot_blobs(100 * MIB + 4096, 0x8_0000, 20 * MIB, None).unwrap();
        assert_eq!(p.kernel_start, RAM_START + 0x8_0000);
        assert_eq!(p.fdt_start, RAM_START + 98 * MIB);
        assert_eq!(p.fdt_start % FDT_MAX_SIZE, 0);
        assert_eq!(p.initrd, None);
    }

    #[test]
    fn large_guests_keep_boot_blobs_in_the_first_32_gib() {
        let p = place_boot_blobs(64 * GIB, 0, 40 * MIB, Some(MIB)).unwrap();
        assert_eq!(p.fdt_start, RAM_START + 32 * GIB - 2 * MIB);
    }

    #[test]
    fn too_little_ram_says_how_much_is_needed() {
        let err = place_boot_blobs(40 * MIB, 0, 38 * MIB, Some(4 * MIB)).unwrap_err().to_string();
        assert!(err.contains("40 MiB of RAM is too little for this kernel and initrd"), "{err}");
        assert!(err.contains("at least 47 MiB"), "{err}");
        // The suggested size really fits.
        place_boot_blobs(47 * MIB, 0, 38 * MIB, Some(4 * MIB)).unwrap();
        assert!(place_boot_blobs(MIB, 0, 0, None).is_err(), "no room for even the FDT block");
        assert!(place_boot_blobs(0, 0, 0, None).is_err());
        assert!(place_boot_blobs(MAX_RAM_SIZE + 1, 0, 0, None).is_err());
        assert!(place_boot_blobs(512 * MIB, u64::MAX, 1, None).is_err());
        assert!(place_boot_blobs(512 * MIB, 0, u64::MAX, None).is_err());
        assert!(place_boot_blobs(512 * MIB, 0, 0, Some(u64::MAX)).is_err());
    }
}

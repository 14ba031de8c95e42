//! aarch64 guests: a QEMU-`virt`-like platform (GICv3 or GICv2, PL011, PL031, PL061 power key, virtio-mmio) and
//! the arm64 Linux boot protocol (Documentation/arch/arm64/booting.rst): a raw `Image` at a 2 MiB aligned address
//! plus its text_offset, an FDT in x0, the boot vCPU at EL1h with exceptions masked, secondaries started through
//! PSCI.
//!
//! This module is compiled on every host architecture: it only computes addresses, bytes and register values.
//!
//! # How to wire it (for the KVM backend and the vmm)
//!
//! 1. Create the VM with an IPA size that covers `layout::RAM_START + mem_size` (KVM's default 40 bits covers
//!    `layout::MAX_RAM_SIZE`), and guest memory as one region `layout::ram_region(mem_size)`.
//! 2. Create the vCPUs first, then the in-kernel GIC (KVM_CREATE_DEVICE `KVM_DEV_TYPE_ARM_VGIC_V3`, falling back to
//!    V2 if the host refuses) at `layout::GIC_LAYOUT`, which the vmm passes the backend: distributor at
//!    `GIC_DIST_START`, redistributors at `GIC_REDIST_START` (or the V2 CPU interface at `GIC_CPU_START`); set `KVM_DEV_ARM_VGIC_GRP_NR_IRQS` to at least
//!    `layout::spi_intid(VIRTIO_MMIO_FIRST_SPI + VIRTIO_MMIO_SLOTS)` rounded up to a multiple of 32, then
//!    `KVM_DEV_ARM_VGIC_CTRL_INIT`. KVM_ARM_VCPU_INIT each vCPU with the preferred target and
//!    `KVM_ARM_VCPU_PSCI_0_2`, plus `KVM_ARM_VCPU_POWER_OFF` on every vCPU but the first.
//! 3. Read MPIDR_EL1 back from each vCPU (KVM_GET_ONE_REG) for `GuestConfig::vcpu_mpidrs`
//!    (`regs::kvm_default_mpidr` predicts them; use it in tests only).
//! 4. Call [`setup_guest`] with the kernel, initrd, command line, GIC version, the virtio-mmio slots in use
//!    (`layout::virtio_mmio_slot(i)`) and host entropy (getrandom) for `kaslr_seed`/`rng_seed`. Apply
//!    `BootSetup::boot_regs` to vCPU 0 with KVM_SET_ONE_REG: PC, PSTATE, X0-X3.
//! 5. Devices on the MMIO bus: `devices::legacy::Pl011` at `PL011_START`, `Pl031` at `PL031_START`, `Pl061` at
//!    `PL061_START` (`PLxxx_SIZE` each), virtio-mmio transports at their slots. Interrupts: an irqfd for GSI =
//!    the SPI number (KVM's default arm64 routing maps GSI n to SPI n). The three PrimeCells are level-triggered in
//!    the FDT: register their irqfd with a resample eventfd and, when it fires, call the device's
//!    `interrupt_asserted()` and trigger again if it is still true. virtio-mmio is edge-triggered (plain irqfd).
//! 6. With PCI devices: after the GIC, a GICv3 ITS (KVM_DEV_TYPE_ARM_VGIC_ITS) at `GIC_ITS_START`, `FdtConfig::pci`
//!    set, ECAM at `PCI_ECAM_START` and the BAR window at `PCI_MMIO_START` on the MMIO bus; MSIs go to KVM with
//!    the function's requester ID as device ID (the FDT's `msi-map` is the identity).
//! 7. QMP `system_powerdown` calls `Pl061::press_power_button()`; the guest's gpio-keys driver turns it into
//!    KEY_POWER. A guest PSCI SYSTEM_OFF / SYSTEM_RESET arrives as KVM_EXIT_SYSTEM_EVENT.

pub mod fdt;
pub mod image;
pub mod layout;
pub mod regs;

use std::io::{Read, Seek};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

pub use fdt::{FdtConfig, GicVersion};
pub use regs::BootRegisters;

pub use crate::{Error, Result};

/// A kernel or initrd: a file in the VMM, a byte cursor in tests.
pub trait BootSource: Read + Seek {}
impl<T: Read + Seek> BootSource for T {}

/// Copies `len` bytes from the start of `source` to `addr`, after checking the whole range is guest RAM, so a
/// file that does not fit leaves guest memory untouched. Returns a reason, for the caller to name the file.
fn copy_to_guest<M: GuestMemoryBackend>(
    mem: &M,
    source: &mut dyn BootSource,
    addr: u64,
    len: u64,
) -> std::result::Result<(), String> {
    let fits = usize::try_from(len).is_ok_and(|len| mem.check_range(GuestAddress(addr), len));
    if !fits {
        return Err(format!("{len} bytes at {addr:#x} do not fit in guest RAM"));
    }
    source.rewind().map_err(|e| format!("cannot read it: {e}"))?;
    let mut chunk = vec![0u8; 1 << 16];
    let mut done = 0u64;
    while done < len {
        let n = chunk.len().min((len - done) as usize);
        source.read_exact(&mut chunk[..n]).map_err(|e| format!("cannot read it: {e}"))?;
        mem.write_slice(&chunk[..n], GuestAddress(addr + done))
            .map_err(|e| format!("cannot copy it to guest memory: {e}"))?;
        done += n as u64;
    }
    Ok(())
}

/// What the VMM knows about the guest it is asked to boot.
pub struct GuestConfig<'a> {
    pub kernel: &'a mut dyn BootSource,
    pub initrd: Option<&'a mut dyn BootSource>,
    pub cmdline: &'a str,
    pub mem_size: u64,
    pub vcpu_mpidrs: &'a [u64],
    pub gic: GicVersion,
    pub virtio_mmio: &'a [layout::VirtioMmioSlot],
    /// The PCI host bridge and the GIC ITS (see `FdtConfig::pci`).
    pub pci: bool,
    pub kaslr_seed: u64,
    pub rng_seed: &'a [u8],
}

/// Where things went, and the boot vCPU's registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootSetup {
    pub kernel_start: u64,
    pub initrd: Option<(u64, u64)>,
    pub fdt_start: u64,
    pub boot_regs: BootRegisters,
}

/// Loads kernel and initrd into guest memory, writes the FDT and returns the boot vCPU's state. Every size the
/// files claim is checked against the RAM before anything is copied.
pub fn setup_guest<M: GuestMemoryBackend>(mem: &M, config: &mut GuestConfig) -> Result<BootSetup> {
    let (header, kernel_file_size) = image::read_header(config.kernel)?;
    let initrd_size = match config.initrd.as_mut() {
        Some(initrd) => {
            let size = initrd
                .seek(std::io::SeekFrom::End(0))
                .map_err(|e| Error::Initrd(format!("cannot determine its size: {e}")))?;
            if size == 0 {
                return Err(Error::Initrd("the file is empty".into()));
            }
            Some(size)
        }
        None => None,
    };
    let placement = layout::place_boot_blobs(
        config.mem_size,
        header.text_offset,
        header.memory_footprint(kernel_file_size),
        initrd_size,
    )?;
    image::load(mem, config.kernel, placement.kernel_start, kernel_file_size)?;
    if let (Some(initrd), Some((start, size))) = (config.initrd.as_mut(), placement.initrd) {
        copy_to_guest(mem, *initrd, start, size).map_err(Error::Initrd)?;
    }
    let blob = fdt::create_fdt(&FdtConfig {
        cmdline: config.cmdline,
        mem_size: config.mem_size,
        vcpu_mpidrs: config.vcpu_mpidrs,
        gic: config.gic,
        initrd: placement.initrd,
        virtio_mmio: config.virtio_mmio,
        pci: config.pci,
        kaslr_seed: config.kaslr_seed,
        rng_seed: config.rng_seed,
    })?;
    mem.write_slice(&blob, GuestAddress(placement.fdt_start))
        .map_err(|e| Error::Fdt(format!("cannot write it to guest memory at {:#x}: {e}", placement.fdt_start)))?;
    Ok(BootSetup {
        kernel_start: placement.kernel_start,
        initrd: placement.initrd,
        fdt_start: placement.fdt_start,
        boot_regs: BootRegisters::new(placement.kernel_start, placement.fdt_start),
    })
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use vm_memory::GuestMemoryMmap;

    use super::*;
    use crate::MIB;

    fn guest(mem_size: u64) -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(layout::RAM_START), mem_size as usize)]).unwrap()
    }

    fn config<'a>(
        kernel: &'a mut Cursor<Vec<u8>>,
        initrd: Option<&'a mut Cursor<Vec<u8>>>,
        mem_size: u64,
    ) -> GuestConfig<'a> {
        GuestConfig {
            kernel,
            initrd: initrd.map(|i| i as &mut dyn BootSource),
            cmdline: "console=ttyAMA0",
            mem_size,
            vcpu_mpidrs: &[0, 1],
            gic: GicVersion::V3,
            virtio_mmio: &[],
            pci: false,
            kaslr_seed: 42,
            rng_seed: &[],
        }
    }

    #[test]
    fn kernel_initrd_and_fdt_land_where_the_registers_say() {
        let mem = guest(128 * MIB);
        let mut kernel = Cursor::new(image::tests::image(0, 3 * MIB, 0, b"the kernel"));
        let mut initrd = Cursor::new(b"initramfs".to_vec());
        let setup = setup_guest(&mem, &mut config(&mut kernel, Some(&mut initrd), 128 * MIB)).unwrap();

        assert_eq!(setup.kernel_start, layout::RAM_START);
        assert_eq!(setup.boot_regs, BootRegisters::new(layout::RAM_START, setup.fdt_start));
        let mut text = [0u8; 10];
        mem.read_slice(&mut text, GuestAddress(layout::RAM_START + 64)).unwrap();
        assert_eq!(&text, b"the kernel");

        let (initrd_start, initrd_size) = setup.initrd.unwrap();
        let mut back = vec![0u8; initrd_size as usize];
        mem.read_slice(&mut back, GuestAddress(initrd_start)).unwrap();
        assert_eq!(back, b"initramfs");
        assert!(initrd_start >= layout::RAM_START + 3 * MIB, "above the kernel's bss");

        let mut header = [0u8; 8];
        mem.read_slice(&mut header, GuestAddress(setup.fdt_start)).unwrap();
        assert_eq!(header[..4], 0xd00d_feedu32.to_be_bytes());
        let total = u32::from_be_bytes(header[4..].try_into().unwrap()) as usize;
        let mut blob = vec![0u8; total];
        mem.read_slice(&mut blob, GuestAddress(setup.fdt_start)).unwrap();
        let tree = fdt::reader::parse(&blob);
        let start = fdt::reader::u64s(&tree["/chosen"]["linux,initrd-start"]);
        assert_eq!(start, [initrd_start]);
    }

    #[test]
    fn files_that_do_not_fit_are_refused_before_copying() {
        let mem = guest(16 * MIB);
        let mut kernel = Cursor::new(image::tests::image(0, 15 * MIB, 0, b"big bss"));
        let err = setup_guest(&mem, &mut config(&mut kernel, None, 16 * MIB)).unwrap_err().to_string();
        assert!(err.contains("too little"), "{err}");

        let mut kernel = Cursor::new(image::tests::image(0, MIB, 0, b""));
        let mut empty = Cursor::new(Vec::new());
        let err = setup_guest(&mem, &mut config(&mut kernel, Some(&mut empty), 16 * MIB)).unwrap_err().to_string();
        assert!(err.contains("initrd: the file is empty"), "{err}");

        let mut not_a_kernel = Cursor::new(vec![0u8; 4096]);
        assert!(matches!(setup_guest(&mem, &mut config(&mut not_a_kernel, None, 16 * MIB)), Err(Error::Kernel(_))));
    }
}

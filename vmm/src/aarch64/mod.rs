//! The aarch64 `virt` platform: a QEMU-virt-like machine with an in-kernel GIC, a PL011 UART, a PL031 RTC, a PL061
//! GPIO controller carrying the power key, virtio-mmio devices and, when a device asks for virtio-pci, a PCI host
//! bridge (generic ECAM) whose functions' MSI-X messages go through a GICv3 ITS; all described to the guest by the
//! FDT that `arch::aarch64` builds. No port I/O.

pub mod seccomp;
mod snapshot;

use std::sync::{Arc, Mutex};

use arch::aarch64::layout::{
    self, spi_intid, GIC_ITS_START, PCI_ECAM_SIZE, PCI_ECAM_START, PCI_MMIO_SIZE, PCI_MMIO_START, PL011_SIZE,
    PL011_SPI, PL011_START, PL031_SIZE, PL031_START, PL061_SIZE, PL061_SPI, PL061_START, VIRTIO_MMIO_FIRST_SPI,
    VIRTIO_MMIO_SLOTS,
};
use arch::aarch64::{setup_guest, GicVersion, GuestConfig};
use devices::legacy::{Pl011, Pl031, Pl061};
use devices::pci::PciFunctionInfo;
use devices::virtio::rng::getrandom;
use devices::{Bus, EventFdLine, InputRoom, InterruptLine, PlatformEvents};
use hypervisor::aarch64::{ExitAarch64, VcpuAarch64, VmAarch64};
use hypervisor::{Hypervisor, Vm};
use qmp::{CpuProps, Target};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::config::{MachineType, VirtioTransport};
use crate::console::ConsoleBackend;
use crate::cpu_model::GuestCpu;
use crate::pci::{PciBus, PciWindows};
use crate::platform::{ArchExitHandler, BootFiles, ExitAction, Payload, Platform, VcpuOf};
use crate::seccomp::{confined, ThreadKind};
use crate::virtio::{attach_mmio, MmioSlot, NamedDevice};
use crate::Error;

/// Interrupt IDs the GIC implements: the 32 private ones and SPIs up to the last virtio-mmio slot's, in the
/// multiples of 32 the GIC counts in.
const GIC_IRQ_COUNT: u32 = spi_intid(VIRTIO_MMIO_FIRST_SPI + VIRTIO_MMIO_SLOTS).next_multiple_of(32);

/// The PCI bus at QEMU virt's low windows: ECAM for bus 0 at 0x3f00_0000, BARs from 0x1000_0000.
const VIRT_PCI_WINDOWS: PciWindows = PciWindows {
    ecam_start: PCI_ECAM_START,
    ecam_size: PCI_ECAM_SIZE,
    mmio_start: PCI_MMIO_START,
    mmio_size: PCI_MMIO_SIZE,
    firmware_mmio: None,
};

/// Bytes of host entropy the FDT hands the guest's random pool (`/chosen/rng-seed`), as QEMU's virt does.
const RNG_SEED_BYTES: usize = 32;

/// A level-triggered SPI behind an irqfd: the device raises `line` on each rising edge of its output, and KVM
/// writes `resample` once the guest has acknowledged the interrupt and the line has been lowered.
struct LevelSpi {
    spi: u32,
    line: Arc<EventFdLine>,
    resample: Arc<EventFd>,
}

impl LevelSpi {
    fn new(spi: u32) -> Result<Self, Error> {
        let line = Arc::new(EventFdLine::new().map_err(|e| Error::Host("creating an eventfd", e))?);
        let resample = Arc::new(EventFd::new(0).map_err(|e| Error::Host("creating an eventfd", e))?);
        Ok(LevelSpi { spi, line, resample })
    }

    /// Keeps the line high while the device's output is: after each acknowledgement, raises it again if
    /// `asserted` still says so. The thread lives as long as the process; the eventfds outlive every VM.
    fn follow(&self, name: &str, asserted: impl Fn() -> bool + Send + 'static) -> Result<(), Error> {
        let (line, resample) = (self.line.clone(), self.resample.clone());
        std::thread::Builder::new()
            .name(format!("{name}-resample"))
            .spawn(confined(ThreadKind::InterruptResample, move || {
                while resample.read().is_ok() {
                    if asserted() {
                        // A failed write leaves the line low until the device's next edge; nothing better to do.
                        let _ = line.trigger();
                    }
                }
            }))
            .map(drop)
            .map_err(|e| Error::Host("starting an interrupt resample thread", e))
    }

    fn attach<V: Vm>(&self, vm: &V) -> Result<(), Error> {
        vm.register_level_irqfd(self.line.eventfd(), &self.resample, self.spi)?;
        Ok(())
    }
}

/// One vCPU's state as a snapshot holds it.
pub type VcpuState = hypervisor::aarch64::VcpuStateAarch64;
/// The VM-wide state a snapshot holds: the vGIC.
pub type VmState = hypervisor::aarch64::GicStateAarch64;

/// The hypervisors the virt machine runs on: aarch64's extensions on its VMs and vCPUs.
pub trait VirtHypervisor: Hypervisor<Vm: VmAarch64<Vcpu: VcpuAarch64>> {}

impl<H> VirtHypervisor for H
where
    H: Hypervisor,
    H::Vm: VmAarch64,
    VcpuOf<H>: VcpuAarch64,
{
}

/// The virt machine: its devices. They outlive guest resets (the console's input, the UART's output stream).
pub struct Virt {
    /// Empty: aarch64 has no port I/O. The vCPU threads take a bus for it all the same.
    pio: Bus,
    mmio: Bus,
    uart: Arc<Mutex<Pl011>>,
    uart_spi: LevelSpi,
    rtc: Arc<Mutex<Pl031>>,
    gpio: Arc<Mutex<Pl061>>,
    gpio_spi: LevelSpi,
    virtio: Vec<MmioSlot>,
    /// The PCI bus, when a device asks for virtio-pci (`-device virtio-*-pci`); virt's default is virtio-mmio.
    pci: Option<PciBus>,
}

impl<H: VirtHypervisor> Platform<H> for Virt {
    type ExitHandler = VirtExits;

    /// The console on the PL011.
    const DEFAULT_CMDLINE: &'static str = "console=ttyAMA0";
    const QMP_TARGET: Target = Target::Aarch64;
    const MACHINE_TYPES: &'static [MachineType] = &[MachineType::Virt];
    /// QEMU's `-cpu host`.
    const CPU_TYPE: &'static str = "host-arm-cpu";

    /// As many as the GIC layout has redistributors for.
    const MAX_VCPUS: u32 = layout::MAX_VCPUS;
    // The PL011 is the machine's own: QEMU's virt gives it no -device, only -serial.
    const ISA_SERIAL: bool = false;

    /// No features are named yet: QEMU names arm64 features by ID register fields (`sve`, `pmu`...), which Kestrel
    /// does not map, and libvirt's arm64 `host-model` does not use the expansion. An empty list claims nothing.
    fn cpu_features(_hypervisor: &H) -> Result<Vec<(&'static str, bool)>, Error> {
        Ok(Vec::new())
    }

    /// Virtio-mmio by default on `virt`, the only machine type here.
    fn virtio_transport(machine: Option<MachineType>) -> Result<VirtioTransport, Error> {
        match machine {
            None | Some(MachineType::Virt) => Ok(VirtioTransport::Mmio),
            Some(other) => Err(Error::Unsupported(format!(
                "machine type '{}' is not available on aarch64 hosts: use virt (virtio devices on virtio-mmio)",
                other.name()
            ))),
        }
    }

    /// Both: virtio-mmio (`-device virtio-*-device`, the default) and virtio-pci (`-device virtio-*-pci`).
    fn virtio_transports() -> Vec<VirtioTransport> {
        vec![VirtioTransport::Mmio, VirtioTransport::Pci]
    }

    /// The virt machine's devices, with the PL011 on `serial`; the PCI bus if a device is on virtio-pci.
    fn new(
        serial: ConsoleBackend,
        _events: PlatformEvents,
        memory: &GuestMemoryMmap,
        virtio_devices: Vec<NamedDevice>,
        _machine_transport: VirtioTransport,
    ) -> Result<Self, Error> {
        let mut mmio = Bus::new();
        let (pci_devices, mmio_devices): (Vec<_>, Vec<_>) =
            virtio_devices.into_iter().partition(|d| d.transport == VirtioTransport::Pci);
        let pci = if pci_devices.is_empty() {
            None
        } else {
            Some(PciBus::new(&mut mmio, VIRT_PCI_WINDOWS, None, memory, pci_devices)?)
        };

        let uart_spi = LevelSpi::new(PL011_SPI)?;
        let (output, input) = serial.split();
        let uart_line: Arc<dyn InterruptLine> = uart_spi.line.clone();
        let input_room = Arc::new(InputRoom::default());
        let uart = Arc::new(Mutex::new(Pl011::new(uart_line, output, input_room.clone())));
        uart_spi.follow("pl011", {
            let uart = uart.clone();
            move || uart.lock().unwrap_or_else(|p| p.into_inner()).interrupt_asserted()
        })?;
        input.start("serial", input_room, {
            let uart = uart.clone();
            move |bytes| uart.lock().unwrap_or_else(|p| p.into_inner()).receive(bytes)
        });
        mmio.insert(uart.clone(), PL011_START, PL011_SIZE)?;

        let rtc = Arc::new(Mutex::new(Pl031::new()));
        mmio.insert(rtc.clone(), PL031_START, PL031_SIZE)?;

        let gpio_spi = LevelSpi::new(PL061_SPI)?;
        let gpio_line: Arc<dyn InterruptLine> = gpio_spi.line.clone();
        let gpio = Arc::new(Mutex::new(Pl061::new(gpio_line)));
        gpio_spi.follow("pl061", {
            let gpio = gpio.clone();
            move || gpio.lock().unwrap_or_else(|p| p.into_inner()).interrupt_asserted()
        })?;
        mmio.insert(gpio.clone(), PL061_START, PL061_SIZE)?;

        let slots: Vec<(u64, u32)> =
            (0..VIRTIO_MMIO_SLOTS).filter_map(layout::virtio_mmio_slot).map(|s| (s.base, s.spi)).collect();
        let virtio = attach_mmio(&mut mmio, memory, mmio_devices, &slots)?;
        Ok(Virt { pio: Bus::new(), mmio, uart, uart_spi, rtc, gpio, gpio_spi, virtio, pci })
    }

    fn pio(&self) -> &Bus {
        &self.pio
    }

    fn mmio(&self) -> &Bus {
        &self.mmio
    }

    /// The power key on the PL061, for the guest's gpio-keys driver.
    fn press_power_button(&self) {
        self.gpio.lock().unwrap_or_else(|p| p.into_inner()).press_power_button();
    }

    /// As QEMU's virt reports it for `-smp N`: one socket and cluster, one core per vCPU, one thread per core.
    /// One socket (`MULTI_SOCKET` is false): every vCPU a core of it.
    fn cpu_props(index: u32, _cores_per_socket: u32) -> CpuProps {
        CpuProps {
            node_id: None,
            socket_id: Some(0),
            die_id: None,
            cluster_id: Some(0),
            core_id: Some(i64::from(index)),
            thread_id: Some(0),
        }
    }

    /// One region, from `layout::RAM_START` (the FDT loader checks the size).
    fn ram_regions(memory_bytes: u64) -> Vec<(u64, u64)> {
        vec![(layout::RAM_START, memory_bytes)]
    }

    /// The vCPUs (secondaries powered off until PSCI CPU_ON), the GIC, interrupt lines, the loaded kernel with
    /// its FDT, and the boot vCPU's registers.
    fn boot(
        &self,
        _hypervisor: &H,
        vm: &Arc<H::Vm>,
        memory: &GuestMemoryMmap,
        boot: BootFiles<'_>,
    ) -> Result<Vec<VcpuOf<H>>, Error> {
        // `guest_cpu` admits no model, feature setting or second socket here: the host's CPU, as KVM gives it.
        if *boot.cpu != GuestCpu::default() {
            return Err(Error::Unsupported("aarch64 guests get the host's CPU in one socket".into()));
        }
        let (kernel, initrd, cmdline) = match boot.payload {
            Payload::Kernel { kernel, initrd, cmdline } => (kernel, initrd, cmdline),
            Payload::Firmware(image) => return Err(image.refused("firmware boot is not available on aarch64 yet")),
        };
        let VcpusAndGic { vcpus, gic, mpidrs } = create_vcpus_and_gic(vm.as_ref(), u32::from(boot.vcpu_count))?;
        self.wire_vm(vm, gic)?;
        let slots: Vec<layout::VirtioMmioSlot> =
            (0..self.virtio.len() as u32).filter_map(layout::virtio_mmio_slot).collect();

        let mut seed = [0u8; 8 + RNG_SEED_BYTES];
        getrandom(&mut seed).map_err(|e| Error::Host("reading host entropy for the guest", e))?;
        let (kaslr_seed, rng_seed) = seed.split_at(8);
        let mut guest = GuestConfig {
            kernel,
            initrd: initrd.map(|f| f as &mut dyn arch::aarch64::BootSource),
            cmdline,
            mem_size: memory_size(memory),
            vcpu_mpidrs: &mpidrs,
            gic,
            virtio_mmio: &slots,
            pci: self.pci.is_some(),
            kaslr_seed: u64::from_le_bytes(kaslr_seed.try_into().unwrap_or_default()),
            rng_seed,
        };
        let setup = setup_guest(memory, &mut guest).map_err(|e| Error::Boot(e.to_string()))?;
        vcpus[0].set_boot_registers(&setup.boot_regs)?;
        Ok(vcpus)
    }

    fn exit_handler(&self) -> VirtExits {
        VirtExits
    }

    fn reset(&self) {
        self.uart.lock().unwrap_or_else(|p| p.into_inner()).reset();
        self.gpio.lock().unwrap_or_else(|p| p.into_inner()).reset();
        for slot in &self.virtio {
            slot.reset();
        }
        if let Some(pci) = &self.pci {
            pci.reset();
        }
    }

    fn pci_functions(&self) -> Vec<PciFunctionInfo> {
        self.pci.as_ref().map(PciBus::functions).unwrap_or_default()
    }
}

impl Virt {
    /// Connects the devices' interrupt lines (irqfds) and virtio notifications (ioeventfds) to a VM whose GIC
    /// exists; with PCI devices, first gives the VM the GIC ITS their MSIs go through (a GICv3's only: a host
    /// that emulates a GICv2 only cannot run them, and says so).
    fn wire_vm<V: VmAarch64 + 'static>(&self, vm: &Arc<V>, gic: GicVersion) -> Result<(), Error> {
        self.uart_spi.attach(vm.as_ref())?;
        self.gpio_spi.attach(vm.as_ref())?;
        for slot in &self.virtio {
            slot.attach(vm.as_ref())?;
        }
        if let Some(pci) = &self.pci {
            if gic != GicVersion::V3 {
                return Err(Error::Unsupported(
                    "virtio-*-pci devices need a GICv3 ITS for their MSIs, and this host's KVM emulates a GICv2 \
                     only; use the virtio-*-device (virtio-mmio) form"
                        .into(),
                ));
            }
            vm.create_its(GIC_ITS_START)?;
            pci.attach(vm)?;
        }
        Ok(())
    }
}

/// The virt machine's own exits: none reach the VMM yet (see `ExitAarch64`).
#[derive(Clone, Copy)]
pub struct VirtExits;

impl<C: VcpuAarch64> ArchExitHandler<C> for VirtExits {
    fn handle(&self, _vcpu: &mut C, exit: ExitAarch64) -> ExitAction {
        match exit {}
    }
}

/// A VM's vCPUs, boot vCPU first, and the GIC made for them.
struct VcpusAndGic<C> {
    vcpus: Vec<C>,
    gic: GicVersion,
    /// The vCPUs' MPIDRs, in vCPU order: what the FDT and the GIC's state name them by.
    mpidrs: Vec<u64>,
}

/// Creates `count` vCPUs and initialises them (secondaries powered off until PSCI CPU_ON), then the GIC for them:
/// KVM sizes the GIC's redistributors by the vCPUs that exist and creates no vCPU once the GIC is initialised.
fn create_vcpus_and_gic<V: VmAarch64>(vm: &V, count: u32) -> Result<VcpusAndGic<V::Vcpu>, Error>
where
    V::Vcpu: VcpuAarch64,
{
    let mut vcpus = Vec::with_capacity(count as usize);
    for id in 0..count {
        let vcpu = vm.create_vcpu(id)?;
        vm.init_vcpu(&vcpu, id != 0)?;
        vcpus.push(vcpu);
    }
    let gic = vm.create_gic(&layout::GIC_LAYOUT, count, GIC_IRQ_COUNT)?;
    // KVM gave each vCPU its MPIDR at initialisation, which the VM recorded.
    let mpidrs = vm.vcpu_mpidrs();
    Ok(VcpusAndGic { vcpus, gic, mpidrs })
}

fn memory_size(memory: &GuestMemoryMmap) -> u64 {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    memory.iter().map(|r| r.len()).sum()
}

#[cfg(test)]
mod tests {
    use hypervisor::kvm::KvmHypervisor;

    use super::*;
    use crate::platform::Snapshots;

    #[test]
    fn the_gic_covers_every_spi_in_multiples_of_32() {
        assert_eq!(GIC_IRQ_COUNT % 32, 0);
        let last_spi = layout::virtio_mmio_slot(VIRTIO_MMIO_SLOTS - 1).unwrap().spi;
        for spi in [PL011_SPI, PL061_SPI, last_spi] {
            assert!(spi_intid(spi) < GIC_IRQ_COUNT, "SPI {spi}");
        }
        assert_eq!(GIC_IRQ_COUNT, 96);
    }

    #[test]
    fn only_the_virt_machine_and_virtio_mmio() {
        assert_eq!(<Virt as Platform<KvmHypervisor>>::virtio_transport(None).unwrap(), VirtioTransport::Mmio);
        assert_eq!(
            <Virt as Platform<KvmHypervisor>>::virtio_transport(Some(MachineType::Virt)).unwrap(),
            VirtioTransport::Mmio
        );
        for machine in [MachineType::Pc, MachineType::Q35, MachineType::Microvm] {
            let err = <Virt as Platform<KvmHypervisor>>::virtio_transport(Some(machine)).unwrap_err().to_string();
            assert!(err.contains(&format!("'{}' is not available on aarch64", machine.name())), "{err}");
        }
    }

    #[test]
    fn virtio_pci_devices_get_a_pci_bus_and_mmio_ones_a_slot() {
        let memory = GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(layout::RAM_START), 1 << 20)]).unwrap();
        let device = |transport| NamedDevice {
            name: "virtio-rng".into(),
            device: Arc::new(Mutex::new(devices::virtio::rng::Rng::new())),
            transport,
            qdev_id: "rng0".into(),
            boot_index: None,
        };
        let new = |devices| {
            let serial = crate::console::open(&crate::config::SerialConfig::None, "serial0").unwrap();
            let events = PlatformEvents::new(|_| {});
            <Virt as Platform<KvmHypervisor>>::new(serial, events, &memory, devices, VirtioTransport::Mmio)
        };
        let mmio_only = new(vec![device(VirtioTransport::Mmio)]).expect("a virtio-mmio device");
        assert_eq!(mmio_only.virtio.len(), 1);
        assert_eq!(mmio_only.virtio[0].base, layout::VIRTIO_MMIO_START);
        assert_eq!(mmio_only.virtio[0].gsi, VIRTIO_MMIO_FIRST_SPI);
        assert!(mmio_only.pci.is_none(), "no PCI bus (nor ITS) without a PCI device");
        assert!(Platform::<KvmHypervisor>::pci_functions(&mmio_only).is_empty());

        let both = new(vec![device(VirtioTransport::Pci), device(VirtioTransport::Mmio)]).expect("one on each");
        assert_eq!(both.virtio.len(), 1);
        let functions = Platform::<KvmHypervisor>::pci_functions(&both);
        assert_eq!(functions.len(), 2, "the host bridge and the virtio-rng: {functions:?}");
        let rng = &functions[1];
        assert_eq!((rng.slot, rng.vendor_id, rng.device_id), (1, 0x1af4, 0x1044), "modern virtio-rng");
        assert_eq!(rng.qdev_id, "rng0");
        assert_eq!(rng.irq_pin, 0, "MSI-X only, no INTx");
        for bar in &rng.bars {
            assert!(bar.address >= PCI_MMIO_START && bar.address + bar.size <= PCI_MMIO_START + PCI_MMIO_SIZE);
        }
        // Configuration space through ECAM: slot 1's vendor and device ID.
        let mut id = [0u8; 4];
        assert!(both.mmio.read(PCI_ECAM_START + (1 << 15), &mut id));
        assert_eq!(u32::from_le_bytes(id), 0x1044_1af4);
        assert!(!both.mmio.read(PCI_ECAM_START + PCI_ECAM_SIZE, &mut id), "nothing past bus 0's ECAM");
        let names: Vec<String> = Snapshots::<KvmHypervisor>::components(&both).into_iter().map(|c| c.name).collect();
        assert!(names.contains(&"pci.01.0.virtio-rng".to_string()), "{names:?}");
        assert!(!names.iter().any(|n| n == "pci.config-io"), "no configuration ports on virt: {names:?}");
    }

    #[test]
    fn the_probe_lists_both_transports() {
        assert_eq!(
            <Virt as Platform<KvmHypervisor>>::virtio_transports(),
            [VirtioTransport::Mmio, VirtioTransport::Pci]
        );
    }

    #[test]
    fn cpu_props_are_qemu_virt_s_for_one_socket() {
        let props = <Virt as Platform<KvmHypervisor>>::cpu_props(1, 4);
        assert_eq!(
            (props.socket_id, props.cluster_id, props.core_id, props.thread_id),
            (Some(0), Some(0), Some(1), Some(0))
        );
        assert_eq!(props.die_id, None);
    }
}

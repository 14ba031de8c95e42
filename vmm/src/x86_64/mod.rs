//! The x86_64 PC platform: which devices sit at which ports, and how a VM is prepared to boot.

pub mod seccomp;
mod snapshot;
mod syscall_names;

use std::sync::{Arc, Mutex};

use arch::x86_64::acpi::{self, build_loader_tables, virtio_mmio_device_aml, AcpiConfig};
use arch::x86_64::boot::setup_guest_with_acpi;
use arch::x86_64::firmware::{e820_file, firmware_e820_map};
use arch::x86_64::layout::{
    ACPI_PM1A_EVT_PORT, ACPI_RESET_PORT, ACPI_S5_SLEEP_TYPE, ACPI_SCI_IRQ, CMOS_PORT, COM1_IRQ, COM1_PORT, FW_CFG_PORT,
    I8042_DATA_PORT,
};
use arch::x86_64::layout::{IOAPIC_PINS, PLATFORM_MMIO_SIZE, PLATFORM_MMIO_START};
use arch::x86_64::{cpuid, layout, msrs, CpuidEntry, GuestConfig};
use devices::legacy::{fw_cfg, AcpiPmBlock, Cmos, FwCfg, ResetPort, Serial, I8042};
use devices::pci::PciFunctionInfo;
use devices::virtio::mmio::MMIO_LEN;
use devices::{Bus, BusDevice, EventFdLine, InputRoom, PlatformEvents};
use hypervisor::x86_64::{ExitX86_64, HypervisorX86_64, VcpuX86_64, VmX86_64};
use hypervisor::Vm;
use qmp::{CpuProps, Target};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::config::{MachineType, VirtioTransport};
use crate::console::ConsoleBackend;
use crate::cpu_model::{CpuModelDefinition, GuestCpu};
use crate::firmware::FirmwareImage;
use crate::pci::{ConfigPorts, PciBus, PciWindows};
use crate::platform::{ArchExitHandler, BootFiles, ExitAction, Payload, Platform, VcpuOf};
use crate::seccomp::{confined, ThreadKind};
use crate::virtio::{attach_mmio, MmioSlot, NamedDevice};
use crate::Error;

/// Virtio-mmio devices take IOAPIC pins from here up: the PCI-range pins no ISA device uses.
/// The named models: QEMU's generic 64-bit KVM CPU (its feature list as QEMU's and libvirt's), which libvirt's
/// `host-model` decodes a host's CPU into when the host is no model it knows (it then passes `-cpu kvm64,` and
/// the host's other features). Family, model and vendor stay the host's.
const CPU_MODELS: &[CpuModelDefinition] = &[CpuModelDefinition {
    name: "kvm64",
    features: &[
        "apic", "clflush", "cmov", "cx16", "cx8", "de", "fpu", "fxsr", "lm", "mca", "mce", "mmx", "msr", "mtrr", "nx",
        "pae", "pat", "pge", "pni", "pse", "pse36", "sep", "sse", "sse2", "syscall", "tsc",
    ],
}];

/// vCPU `id`'s CPUID of `vcpu_count`: the hypervisor's `supported` leaves normalised to `cpu`'s topology, narrowed
/// to its features.
fn guest_cpuid(supported: &[CpuidEntry], id: u8, vcpu_count: u8, cpu: &GuestCpu) -> Vec<CpuidEntry> {
    let mut entries = cpuid::normalise(supported, id, cpu.cores_per_socket(vcpu_count));
    if cpu.features.is_some() {
        cpuid::keep_features(&mut entries, |name| cpu.has(name, true));
    }
    entries
}

const FIRST_VIRTIO_GSI: u32 = 16;

/// The PC's PCI bus: ECAM for bus 0 after the platform devices, BARs in the 32-bit hole, where Kestrel places them
/// and where SeaBIOS does.
const PC_PCI_WINDOWS: PciWindows = PciWindows {
    ecam_start: layout::PCI_ECAM_START,
    ecam_size: layout::PCI_ECAM_SIZE,
    mmio_start: layout::PCI_MMIO_START,
    mmio_size: layout::PCI_MMIO_SIZE,
    firmware_mmio: Some((layout::PCI_FIRMWARE_MMIO_START, layout::PCI_FIRMWARE_MMIO_SIZE)),
};

const UART_REGISTERS: u64 = 8;
const I8042_PORTS: u64 = 5;
const CMOS_PORTS: u64 = 2;
const ACPI_PM_PORTS: u64 = devices::legacy::ACPI_PM_BLOCK_LEN;

/// One vCPU's state as a snapshot holds it.
pub type VcpuState = hypervisor::x86_64::VcpuStateX86_64;
/// The VM-wide state a snapshot holds: the PIC, IOAPIC, PIT and clock.
pub type VmState = hypervisor::x86_64::VmStateX86_64;

/// The hypervisors a PC runs on: x86_64's extensions on the hypervisor, its VMs and its vCPUs.
pub trait PcHypervisor: HypervisorX86_64<Vm: VmX86_64<Vcpu: VcpuX86_64>> {}

impl<H> PcHypervisor for H
where
    H: HypervisorX86_64,
    H::Vm: VmX86_64,
    VcpuOf<H>: VcpuX86_64,
{
}

/// The PC: its devices. They outlive guest resets (CMOS NVRAM, console input, the serial output stream).
pub struct Pc {
    pio: Bus,
    mmio: Bus,
    serial: Arc<Mutex<Serial>>,
    serial_irq: Arc<EventFdLine>,
    i8042: Arc<Mutex<I8042>>,
    cmos: Arc<Mutex<Cmos>>,
    reset_port: Arc<Mutex<ResetPort>>,
    acpi_pm: Arc<Mutex<AcpiPmBlock>>,
    sci: Arc<EventFdLine>,
    /// Written by the hypervisor when the guest acknowledges the level-triggered SCI.
    sci_resample: Arc<EventFd>,
    virtio: Vec<MmioSlot>,
    /// QEMU's firmware configuration interface: what firmware (`-bios`) is told about the machine.
    fw_cfg: Arc<Mutex<FwCfg>>,
    /// The PCI bus, on a `pc` machine (or when a device asks for virtio-pci).
    pci: Option<PciBus>,
}

impl<H: PcHypervisor> Platform<H> for Pc {
    type ExitHandler = PcExits;

    /// The console on COM1.
    const DEFAULT_CMDLINE: &'static str = "console=ttyS0";
    const QMP_TARGET: Target = Target::X86_64;
    /// pc and q35 are the same machine; microvm puts the virtio devices on virtio-mmio.
    const MACHINE_TYPES: &'static [MachineType] = &[MachineType::Pc, MachineType::Q35, MachineType::Microvm];
    /// The host's CPUID.
    const CPU_TYPE: &'static str = "host-x86_64-cpu";

    /// xAPIC IDs are 8 bits, 0xff is broadcast, and the IOAPIC takes the ID after the last CPU's.
    const MAX_VCPUS: u32 = 254;
    const ISA_SERIAL: bool = true;
    const ACPI_PM_TYPES: &'static [&'static str] = &["PIIX4_PM", "ICH9-LPC"];

    /// PCI on pc/q35 (the default), mmio on microvm.
    fn virtio_transport(machine: Option<MachineType>) -> Result<VirtioTransport, Error> {
        match machine {
            None | Some(MachineType::Pc | MachineType::Q35) => Ok(VirtioTransport::Pci),
            Some(MachineType::Microvm) => Ok(VirtioTransport::Mmio),
            Some(other) => Err(Error::Unsupported(format!(
                "machine type '{}' is not available on x86_64 hosts: use pc, q35 or microvm",
                other.name()
            ))),
        }
    }

    /// The features of the CPUID every vCPU is given (`boot`), which differ between vCPUs in topology only.
    fn cpu_features(hypervisor: &H) -> Result<Vec<(&'static str, bool)>, Error> {
        Ok(cpuid::named_features(&cpuid::normalise(&hypervisor.supported_cpuid()?, 0, 1)))
    }

    const CPU_MODELS: &'static [CpuModelDefinition] = CPU_MODELS;

    /// Sockets of a power-of-two number of cores (`-smp` checks), so that APIC IDs stay 0..N-1.
    const MULTI_SOCKET: bool = true;

    /// QEMU under KVM gives every model x2APIC; Kestrel also keeps the hypervisor bit, without which a Linux
    /// guest does not look for KVM's paravirtual clock.
    const CPU_MODEL_DEFAULTS: &'static [&'static str] = &["x2apic", "hypervisor"];

    /// The PC's devices, with the first serial port on `serial`.
    fn new(
        serial: ConsoleBackend,
        events: PlatformEvents,
        memory: &GuestMemoryMmap,
        virtio_devices: Vec<NamedDevice>,
        machine_transport: VirtioTransport,
    ) -> Result<Self, Error> {
        let serial_irq = Arc::new(EventFdLine::new().map_err(|e| Error::Host("creating an eventfd", e))?);
        let (serial_output, serial_input) = serial.split();
        let input_room = Arc::new(InputRoom::default());
        let serial = Arc::new(Mutex::new(Serial::new(serial_irq.clone(), serial_output, input_room.clone())));
        serial_input.start("serial", input_room, {
            let serial = serial.clone();
            move |bytes| serial.lock().unwrap_or_else(|p| p.into_inner()).receive(bytes)
        });
        let mut pio = Bus::new();
        pio.insert(serial.clone(), u64::from(COM1_PORT), UART_REGISTERS)?;
        let i8042 = Arc::new(Mutex::new(I8042::new(events.clone())));
        pio.insert(i8042.clone(), u64::from(I8042_DATA_PORT), I8042_PORTS)?;
        let cmos = Arc::new(Mutex::new(Cmos::new()));
        pio.insert(cmos.clone(), u64::from(CMOS_PORT), CMOS_PORTS)?;
        let sci = Arc::new(EventFdLine::new().map_err(|e| Error::Host("creating an eventfd", e))?);
        let sci_resample = Arc::new(EventFd::new(0).map_err(|e| Error::Host("creating an eventfd", e))?);
        let acpi_pm = Arc::new(Mutex::new(AcpiPmBlock::new(events.clone(), ACPI_S5_SLEEP_TYPE, sci.clone())));
        pio.insert(acpi_pm.clone(), u64::from(ACPI_PM1A_EVT_PORT), ACPI_PM_PORTS)?;
        let fw_cfg = Arc::new(Mutex::new(FwCfg::new(memory.clone())));
        pio.insert(fw_cfg.clone(), u64::from(FW_CFG_PORT), fw_cfg::PORT_COUNT)?;
        let reset_port = Arc::new(Mutex::new(ResetPort::new(events)));
        let reset_control: Arc<Mutex<dyn BusDevice>> = reset_port.clone();
        forward_sci_acknowledgements(sci_resample.clone(), acpi_pm.clone())?;
        let mut mmio = Bus::new();
        let (pci_devices, mmio_devices): (Vec<_>, Vec<_>) =
            virtio_devices.into_iter().partition(|d| d.transport == VirtioTransport::Pci);
        let pci = if machine_transport == VirtioTransport::Pci || !pci_devices.is_empty() {
            // The reset register at 0xCF9 sits inside the PCI configuration ports.
            let ports = ConfigPorts {
                pio: &mut pio,
                port: layout::PCI_CONFIG_PORT,
                count: u64::from(layout::PCI_CONFIG_PORTS),
                reset_control,
            };
            Some(PciBus::new(&mut mmio, PC_PCI_WINDOWS, Some(ports), memory, pci_devices)?)
        } else {
            pio.insert(reset_control, u64::from(ACPI_RESET_PORT), 1)?;
            None
        };
        let slot_count = (IOAPIC_PINS - FIRST_VIRTIO_GSI).min((PLATFORM_MMIO_SIZE / MMIO_LEN) as u32);
        let slots: Vec<(u64, u32)> = (0..slot_count)
            .map(|index| (PLATFORM_MMIO_START + u64::from(index) * MMIO_LEN, FIRST_VIRTIO_GSI + index))
            .collect();
        let virtio = attach_mmio(&mut mmio, memory, mmio_devices, &slots)?;
        Ok(Pc {
            pio,
            mmio,
            serial,
            serial_irq,
            i8042,
            cmos,
            reset_port,
            acpi_pm,
            sci,
            sci_resample,
            virtio,
            fw_cfg,
            pci,
        })
    }

    fn pio(&self) -> &Bus {
        &self.pio
    }

    fn mmio(&self) -> &Bus {
        &self.mmio
    }

    /// The ACPI power button.
    fn press_power_button(&self) {
        self.acpi_pm.lock().unwrap_or_else(|p| p.into_inner()).press_power_button();
    }

    /// As the CPUID leaves describe it: one socket, one thread per core.
    fn cpu_props(index: u32, cores_per_socket: u32) -> CpuProps {
        let cores = cores_per_socket.max(1);
        CpuProps {
            node_id: None,
            socket_id: Some(i64::from(index / cores)),
            die_id: Some(0),
            cluster_id: None,
            core_id: Some(i64::from(index % cores)),
            thread_id: Some(0),
        }
    }

    /// Below the 32-bit PCI hole and, past it, above 4 GiB.
    fn ram_regions(memory_bytes: u64) -> Vec<(u64, u64)> {
        layout::ram_regions(memory_bytes)
    }

    /// The PIC, IOAPIC and PIT, then either the ACPI tables (virtio-mmio devices in the DSDT) and the kernel by the
    /// PVH or Linux boot protocol, or the firmware image where a PC's CPU starts; each vCPU's CPUID and MSRs.
    /// Application processors wait for INIT/SIPI.
    fn boot(
        &self,
        hypervisor: &H,
        vm: &Arc<H::Vm>,
        memory: &GuestMemoryMmap,
        boot: BootFiles<'_>,
    ) -> Result<Vec<VcpuOf<H>>, Error> {
        let boot_cpu_state = match boot.payload {
            Payload::Kernel { kernel, initrd, cmdline } => {
                self.wire_vm(vm, None)?;
                let mut guest = GuestConfig { kernel, initrd, cmdline, vcpu_count: boot.vcpu_count };
                let setup = setup_guest_with_acpi(memory, &mut guest, self.dsdt_devices()?, self.pci.is_some())
                    .map_err(|e| Error::Boot(e.to_string()))?;
                Some(setup.boot_cpu)
            }
            Payload::Firmware(image) => {
                let start = layout::bios_start(image.len()).map_err(|e| image.refused(e))?;
                self.wire_vm(vm, Some(start))?;
                map_firmware(vm.as_ref(), memory, image, start)?;
                self.describe_to_firmware(memory, &boot, start)?;
                // KVM's vCPUs start in the reset state (real mode, CS base 0xFFFF0000, IP 0xFFF0): the last 16
                // bytes of the image, its reset vector.
                None
            }
        };

        let supported = hypervisor.supported_cpuid()?;
        let msrs = msrs::boot_msrs();
        let mut vcpus = Vec::with_capacity(usize::from(boot.vcpu_count));
        for id in 0..boot.vcpu_count {
            let vcpu = vm.create_vcpu(u32::from(id))?;
            vcpu.set_cpuid(&guest_cpuid(&supported, id, boot.vcpu_count, boot.cpu))?;
            vcpu.set_msrs(&msrs)?;
            vcpu.set_lapic_lints()?;
            // Application processors wait for INIT/SIPI from the boot processor, as on hardware.
            if let (0, Some(state)) = (id, &boot_cpu_state) {
                vcpu.set_cpu_state(state)?;
            }
            vcpus.push(vcpu);
        }
        Ok(vcpus)
    }

    fn exit_handler(&self) -> PcExits {
        PcExits
    }

    /// Devices not reset here keep state a real PC keeps (CMOS NVRAM) or have none worth resetting.
    fn reset(&self) {
        self.serial.lock().unwrap_or_else(|p| p.into_inner()).reset();
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

impl Pc {
    /// What fw_cfg tells the firmware whose image starts at `firmware_start`: the memory map, the CPU count, no
    /// graphics (so SeaBIOS's console is COM1), as QEMU's `-nographic` does, and the ACPI tables a kernel would
    /// get, for the firmware to install through the table loader; a failed boot is not retried.
    fn describe_to_firmware(
        &self,
        memory: &GuestMemoryMmap,
        boot: &BootFiles,
        firmware_start: u64,
    ) -> Result<(), Error> {
        let vcpu_count = boot.vcpu_count;
        let ram_size: u64 = memory.iter().map(|region| region.len()).sum();
        let acpi = AcpiConfig { vcpu_count, extra_dsdt_aml: self.dsdt_devices()?, pci_host_bridge: self.pci.is_some() };
        let tables = build_loader_tables(&acpi).map_err(|e| Error::Boot(e.to_string()))?;
        let fw_cfg_error = |e: fw_cfg::FwCfgError| Error::Boot(format!("fw_cfg: {e}"));
        let mut fw_cfg = self.fw_cfg.lock().unwrap_or_else(|p| p.into_inner());
        fw_cfg.clear();
        let items = [
            (fw_cfg::RAM_SIZE, ram_size.to_le_bytes().to_vec()),
            (fw_cfg::NB_CPUS, u16::from(vcpu_count).to_le_bytes().to_vec()),
            (fw_cfg::MAX_CPUS, u16::from(vcpu_count).to_le_bytes().to_vec()),
            (fw_cfg::NOGRAPHIC, 1u16.to_le_bytes().to_vec()),
        ];
        for (key, data) in items {
            fw_cfg.set_item(key, data).map_err(fw_cfg_error)?;
        }
        let files = [
            ("etc/e820", e820_file(&firmware_e820_map(ram_size, firmware_start))),
            // QEMU's default `-boot reboot-timeout=-1`: stay at the failure message.
            ("etc/boot-fail-wait", u32::MAX.to_le_bytes().to_vec()),
            (acpi::LOADER_RSDP_FILE, tables.rsdp),
            (acpi::LOADER_TABLES_FILE, tables.tables),
            (acpi::TABLE_LOADER_FILE, tables.loader),
        ];
        let boot_order = self.pci.as_ref().map(PciBus::boot_order).unwrap_or_default();
        // SeaBIOS tries the devices listed first, in order, then the others as it found them; or, strict, none
        // other. With none listed there is no order, strict or not (as with QEMU): the firmware's own applies.
        let boot_order = (!boot_order.is_empty()).then(|| ("bootorder", bootorder_file(&boot_order, boot.strict_boot)));
        for (name, data) in files.into_iter().chain(boot_order) {
            fw_cfg.add_file(name, data).map_err(fw_cfg_error)?;
        }
        Ok(())
    }

    /// The virtio-mmio devices as the DSDT describes them: Debian's kernels lack virtio-mmio command-line devices,
    /// so ACPI is how the guest finds them.
    fn dsdt_devices(&self) -> Result<Vec<Vec<u8>>, Error> {
        let mut devices = Vec::with_capacity(self.virtio.len());
        for (index, slot) in self.virtio.iter().enumerate() {
            let aml = virtio_mmio_device_aml(index as u16, slot.base as u32, MMIO_LEN as u32, slot.gsi)
                .map_err(|e| Error::Boot(e.to_string()))?;
            devices.push(aml);
        }
        Ok(devices)
    }

    /// What every VM of this machine needs before its vCPUs exist, booted or restored: the interrupt controllers,
    /// the devices' interrupt lines and queue notifiers.
    /// `firmware_start`: where a firmware image mapped below 4 GiB starts, which KVM's own pages must stay out of.
    fn wire_vm<V: VmX86_64 + 'static>(&self, vm: &Arc<V>, firmware_start: Option<u64>) -> Result<(), Error> {
        vm.create_pc_irqchip(&layout::pc_irqchip_layout(firmware_start))?;
        vm.register_irqfd(self.serial_irq.eventfd(), COM1_IRQ)?;
        vm.register_level_irqfd(self.sci.eventfd(), &self.sci_resample, ACPI_SCI_IRQ)?;
        for slot in &self.virtio {
            slot.attach(vm.as_ref())?;
        }
        if let Some(pci) = &self.pci {
            pci.attach(vm)?;
        }
        Ok(())
    }
}

/// The PC's own exits. A triple fault is a failure: no PC firmware turns it into a reset behind Linux's back,
/// and the register dump says where the guest was.
#[derive(Clone, Copy)]
pub struct PcExits;

impl<C: VcpuX86_64> ArchExitHandler<C> for PcExits {
    fn handle(&self, _vcpu: &mut C, exit: ExitX86_64) -> ExitAction {
        match exit {
            // On AMD, KVM reinitialises the VMCB on the SHUTDOWN intercept, so the dump that follows shows the
            // reset state (rip=0xfff0), not the state at the fault.
            ExitX86_64::TripleFault => ExitAction::Fail(
                "triple fault (the guest's CPU shut down; on AMD hosts the registers below are the reset state KVM \
                 put back, not the state at the fault)"
                    .into(),
            ),
        }
    }
}

/// Maps the firmware image read-only at `start` (its end at 4 GiB) and copies its last 256 KiB (all of a smaller
/// image) into RAM ending at 1 MiB, where real-mode code and the legacy BIOS entry points are. QEMU aliases only
/// the last 128 KiB there and lets the BIOS copy the rest itself through the i440FX/Q35 PAM registers; Kestrel's
/// host bridge has none (SeaBIOS says "Unable to unlock ram - bridge not found" and carries on), so the copy is
/// made for it, as the chipset would have let it, writable, and again at every boot. Nothing else of Kestrel's
/// goes into low memory: the firmware builds its own tables.
fn map_firmware<V: hypervisor::Vm>(
    vm: &V,
    memory: &GuestMemoryMmap,
    image: &FirmwareImage,
    start: u64,
) -> Result<(), Error> {
    let slot = memory.num_regions() as u32;
    // SAFETY: the image's mapping is held by the machine for its whole life, beyond every VM it boots (each VM is
    // dropped before the machine), and is only read from once built.
    unsafe { vm.map_read_only_memory(slot, start, image.len(), image.host_address()) }?;
    let low_len = image.len().min(layout::BIOS_SHADOW_SIZE) as usize;
    let bytes = image.bytes();
    let low_start = GuestAddress(layout::HIMEM_START - low_len as u64);
    memory
        .write_slice(&bytes[bytes.len() - low_len..], low_start)
        .map_err(|e| image.refused(format!("copying it below 1 MiB: {e}")))
}

/// fw_cfg's `bootorder` file: one device path a line, then `HALT` if `strict` (SeaBIOS boots nothing that is not
/// listed before it), NUL-terminated (QEMU's form). Only for a non-empty list: QEMU gives no `HALT` alone.
fn bootorder_file(paths: &[String], strict: bool) -> Vec<u8> {
    let halt = strict.then(|| "HALT".to_string());
    let mut file = paths.iter().cloned().chain(halt).collect::<Vec<_>>().join("\n").into_bytes();
    file.push(0);
    file
}

/// Each time the guest acknowledges the SCI, lets the PM block raise it again if its event is still pending. The
/// thread lives as long as the process; the eventfd outlives every VM it is registered with.
fn forward_sci_acknowledgements(resample: Arc<EventFd>, acpi_pm: Arc<Mutex<AcpiPmBlock>>) -> Result<(), Error> {
    std::thread::Builder::new()
        .name("sci-resample".into())
        .spawn(confined(ThreadKind::InterruptResample, move || {
            while resample.read().is_ok() {
                acpi_pm.lock().unwrap_or_else(|p| p.into_inner()).resample();
            }
        }))
        .map(drop)
        .map_err(|e| Error::Host("starting the SCI thread", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bootorder_file_is_one_path_a_line_and_nul_terminated() {
        let paths = ["/pci@i0cf8/*@2".to_string(), "/pci@i0cf8/*@1f".to_string()];
        assert_eq!(bootorder_file(&paths, false), b"/pci@i0cf8/*@2\n/pci@i0cf8/*@1f\0");
        assert_eq!(bootorder_file(&paths, true), b"/pci@i0cf8/*@2\n/pci@i0cf8/*@1f\nHALT\0");
    }
}

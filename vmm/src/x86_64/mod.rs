//! The x86_64 PC platform: which devices sit at which ports, and how a VM is prepared to boot.

use std::fs::File;
use std::sync::{Arc, Mutex};

use arch::x86_64::layout::{
    ACPI_PM1A_EVT_PORT, ACPI_RESET_PORT, ACPI_S5_SLEEP_TYPE, ACPI_SCI_IRQ, CMOS_PORT, COM1_IRQ, COM1_PORT,
    I8042_DATA_PORT, KVM_TSS_ADDRESS,
};
use arch::x86_64::{cpuid, layout, msrs, setup_guest, GuestConfig};
use devices::legacy::{AcpiPmBlock, Cmos, ResetPort, Serial, I8042};
use devices::{Bus, EventFdLine, PlatformEvents};
use hypervisor::x86_64::{HypervisorX86_64, VcpuX86_64, VmX86_64};
use hypervisor::Vm;
use qmp::{CpuProps, Target};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::Error;

const UART_REGISTERS: u64 = 8;
const I8042_PORTS: u64 = 5;
const CMOS_PORTS: u64 = 2;
const ACPI_PM_PORTS: u64 = devices::legacy::ACPI_PM_BLOCK_LEN;

/// The devices of one machine. They outlive guest resets (CMOS NVRAM, console input, the serial output stream).
pub struct Platform {
    pub pio: Bus,
    pub mmio: Bus,
    serial: Arc<Mutex<Serial>>,
    serial_irq: Arc<EventFdLine>,
    acpi_pm: Arc<Mutex<AcpiPmBlock>>,
    sci: Arc<EventFdLine>,
    /// Written by the hypervisor when the guest acknowledges the level-triggered SCI.
    sci_resample: Arc<EventFd>,
}

impl Platform {
    /// What QMP reports: the target, the machine type and QOM type, and the vCPUs' QOM type (host CPUID).
    pub const QMP_TARGET: Target = Target::X86_64;
    pub const MACHINE_TYPE: &'static str = "kestrel-pc";
    pub const MACHINE_QOM_TYPE: &'static str = "kestrel-pc-machine";
    pub const CPU_TYPE: &'static str = "host-x86_64-cpu";

    /// xAPIC IDs are 8 bits, 0xff is broadcast, and the IOAPIC takes the ID after the last CPU's.
    pub const MAX_VCPUS: u32 = 254;

    pub fn new(
        serial: Arc<Mutex<Serial>>,
        serial_irq: Arc<EventFdLine>,
        events: PlatformEvents,
    ) -> Result<Self, Error> {
        let mut pio = Bus::new();
        pio.insert(serial.clone(), u64::from(COM1_PORT), UART_REGISTERS)?;
        pio.insert(Arc::new(Mutex::new(I8042::new(events.clone()))), u64::from(I8042_DATA_PORT), I8042_PORTS)?;
        pio.insert(Arc::new(Mutex::new(Cmos::new())), u64::from(CMOS_PORT), CMOS_PORTS)?;
        let sci = Arc::new(EventFdLine::new().map_err(|e| Error::Host("creating an eventfd", e))?);
        let sci_resample = Arc::new(EventFd::new(0).map_err(|e| Error::Host("creating an eventfd", e))?);
        let acpi_pm = Arc::new(Mutex::new(AcpiPmBlock::new(events.clone(), ACPI_S5_SLEEP_TYPE, sci.clone())));
        pio.insert(acpi_pm.clone(), u64::from(ACPI_PM1A_EVT_PORT), ACPI_PM_PORTS)?;
        pio.insert(Arc::new(Mutex::new(ResetPort::new(events))), u64::from(ACPI_RESET_PORT), 1)?;
        forward_sci_acknowledgements(sci_resample.clone(), acpi_pm.clone())?;
        Ok(Platform { pio, mmio: Bus::new(), serial, serial_irq, acpi_pm, sci, sci_resample })
    }

    /// Presses the ACPI power button; the guest decides whether and how to shut down.
    pub fn press_power_button(&self) {
        self.acpi_pm.lock().unwrap_or_else(|p| p.into_inner()).press_power_button();
    }

    /// Where vCPU `index` sits in the topology the CPUID leaves describe: one socket, one thread per core.
    pub fn cpu_props(index: u32) -> CpuProps {
        CpuProps {
            node_id: None,
            socket_id: Some(0),
            die_id: Some(0),
            cluster_id: None,
            core_id: Some(i64::from(index)),
            thread_id: Some(0),
        }
    }

    /// Guest RAM as (start, length) regions for `memory_bytes` of RAM.
    pub fn ram_regions(memory_bytes: u64) -> Vec<(u64, u64)> {
        layout::ram_regions(memory_bytes)
    }

    /// Prepares a freshly created VM with mapped memory: interrupt controllers, interrupt lines, the loaded
    /// kernel and every vCPU's initial state. Returns the vCPUs, boot vCPU first.
    pub fn boot<H: HypervisorX86_64>(
        &self,
        hypervisor: &H,
        vm: &H::Vm,
        memory: &GuestMemoryMmap,
        boot: BootFiles<'_>,
    ) -> Result<Vec<<H::Vm as Vm>::Vcpu>, Error>
    where
        H::Vm: VmX86_64,
        <H::Vm as Vm>::Vcpu: VcpuX86_64,
    {
        vm.create_pc_irqchip(KVM_TSS_ADDRESS)?;
        vm.register_irqfd(self.serial_irq.eventfd(), COM1_IRQ)?;
        vm.register_level_irqfd(self.sci.eventfd(), &self.sci_resample, ACPI_SCI_IRQ)?;

        let mut guest = GuestConfig {
            kernel: boot.kernel,
            initrd: boot.initrd,
            cmdline: boot.cmdline,
            vcpu_count: boot.vcpu_count,
        };
        let setup = setup_guest(memory, &mut guest).map_err(|e| Error::Boot(e.to_string()))?;

        let supported = hypervisor.supported_cpuid()?;
        let msrs = msrs::boot_msrs();
        let mut vcpus = Vec::with_capacity(usize::from(boot.vcpu_count));
        for id in 0..boot.vcpu_count {
            let vcpu = vm.create_vcpu(u32::from(id))?;
            vcpu.set_cpuid(&cpuid::normalise(&supported, id, boot.vcpu_count))?;
            vcpu.set_msrs(&msrs)?;
            vcpu.set_lapic_lints()?;
            // Application processors wait for INIT/SIPI from the boot processor, as on hardware.
            if id == 0 {
                vcpu.set_cpu_state(&setup.boot_cpu)?;
            }
            vcpus.push(vcpu);
        }
        Ok(vcpus)
    }

    /// Back to power-on state for a guest reset. Devices not reset here keep state a real PC keeps (CMOS NVRAM)
    /// or have none worth resetting.
    pub fn reset(&self) {
        self.serial.lock().unwrap_or_else(|p| p.into_inner()).reset();
    }
}

/// Each time the guest acknowledges the SCI, lets the PM block raise it again if its event is still pending. The
/// thread lives as long as the process; the eventfd outlives every VM it is registered with.
fn forward_sci_acknowledgements(resample: Arc<EventFd>, acpi_pm: Arc<Mutex<AcpiPmBlock>>) -> Result<(), Error> {
    std::thread::Builder::new()
        .name("sci-resample".into())
        .spawn(move || {
            while resample.read().is_ok() {
                acpi_pm.lock().unwrap_or_else(|p| p.into_inner()).resample();
            }
        })
        .map(drop)
        .map_err(|e| Error::Host("starting the SCI thread", e))
}

/// What the kernel loader needs from the configuration, with the files already open.
pub struct BootFiles<'a> {
    pub kernel: &'a mut File,
    pub initrd: Option<&'a mut File>,
    pub cmdline: &'a str,
    pub vcpu_count: u8,
}

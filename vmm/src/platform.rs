//! The platform contract: what an architecture's machine provides to the generic VMM (`machine`, `snapshot`,
//! `vcpu`), declared once. Each architecture implements it in its own module (`x86_64::Pc`, `aarch64::Virt`), for
//! every hypervisor `H` that offers that architecture's extension traits; the generic code calls nothing else of
//! the architecture. Which implementation a build uses is chosen once, by `crate::arch_platform`.
//!
//! The contract has two parts, each implemented in its own file of the architecture's module: [`Platform`] (the
//! machine's devices, its boot, what QMP reports of it) and [`Snapshots`] (what a snapshot of it holds and how a
//! VM is built from one).

use std::fs::File;
use std::sync::Arc;
use std::time::Duration;

use devices::pci::PciFunctionInfo;
use devices::{Bus, PlatformEvents, PlatformRequest};
use hypervisor::{Hypervisor, Vcpu, Vm};
use qmp::{CpuProps, Target};
use snapshot::CpuIdentity;
use vm_memory::GuestMemoryMmap;

use crate::config::{CpuConfig, MachineType, VirtioTransport};
use crate::console::ConsoleBackend;
use crate::cpu_model::{CpuModelDefinition, GuestCpu};
use crate::firmware::FirmwareImage;
use crate::snapshot::Component;
use crate::virtio::NamedDevice;
use crate::Error;

/// A vCPU of hypervisor `H`.
pub type VcpuOf<H> = <<H as Hypervisor>::Vm as Vm>::Vcpu;

/// What a boot starts the guest from, with the files already open.
pub struct BootFiles<'a> {
    pub payload: Payload<'a>,
    pub vcpu_count: u8,
    /// The CPU every vCPU is given.
    pub cpu: &'a GuestCpu,
    /// Firmware boots only the devices in the boot order (QEMU's `-boot strict=on`). Only x86_64 boots firmware
    /// so far (aarch64 refuses it), so only its build reads this.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub strict_boot: bool,
}

/// What the boot vCPU runs first.
pub enum Payload<'a> {
    /// A kernel Kestrel loads itself, with the boot tables it reads.
    Kernel { kernel: &'a mut File, initrd: Option<&'a mut File>, cmdline: &'a str },
    /// Firmware (`-bios`), which the boot vCPU starts in at the architecture's reset vector; Kestrel loads nothing
    /// else into guest memory for it, and a platform that cannot boot firmware refuses it with one line.
    Firmware(&'a FirmwareImage),
}

/// What a vCPU thread does after an exit only its architecture has (`VcpuExit::Arch`). x86_64's only such exit
/// fails; `Resume` and `Request` are there for the architectures whose guests call their firmware through exits
/// (ppc64 hypercalls and RTAS, s390x intercepts), and `vcpu`'s tests hold the loop to them.
#[derive(Debug, PartialEq, Eq)]
#[allow(dead_code)]
pub enum ExitAction {
    /// Enter the guest again.
    Resume,
    /// Ask the VMM to act on the whole machine (reset, power off); the vCPU stays out of the guest until it has.
    Request(PlatformRequest),
    /// The vCPU cannot go on, for this reason; the VMM reports it with the vCPU's registers. If a platform request
    /// is already pending, the exit is taken as part of it instead (a guest whose reset did not take effect at
    /// once may go on to fault).
    Fail(String),
}

/// Handles the exits only the architecture has, on the thread of the vCPU they came from (its registers at hand,
/// so a hypercall's arguments can be read and its result written back). Whatever device state it needs it holds
/// itself: each boot's vCPU threads get a clone (`Platform::exit_handler`).
pub trait ArchExitHandler<C: Vcpu>: Clone + Send + 'static {
    fn handle(&self, vcpu: &mut C, exit: C::ArchExit) -> ExitAction;
}

/// One architecture's machine on hypervisor `H`: its devices (which outlive every VM the machine boots: console
/// streams, NVRAM, PCI functions), how a fresh VM is prepared to boot, and what QMP reports about it.
///
/// The life of a platform: `new` once, before the first VM; then for each boot (the first and one per guest reset)
/// a fresh VM with guest memory mapped is handed to `boot` (or, for a restore, `Snapshots::restore`) and the
/// returned vCPUs are run against `pio` and `mmio`, their architecture's own exits going to `exit_handler`'s
/// handler; between boots, `reset`.
pub trait Platform<H: Hypervisor>: Snapshots<H> + Sized {
    /// What the vCPU threads do with the exits only this architecture has.
    type ExitHandler: ArchExitHandler<VcpuOf<H>>;

    /// The kernel command line when the user gives none: the console on the platform's first UART.
    const DEFAULT_CMDLINE: &'static str;
    /// What QMP's `query-target` reports.
    const QMP_TARGET: Target;
    /// The machine types this platform builds (`virtio_transport` accepts exactly these), its default first:
    /// what `query-machines` and `qom-list-types` list.
    const MACHINE_TYPES: &'static [MachineType];
    /// The vCPUs' QOM type.
    const CPU_TYPE: &'static str;
    /// The most vCPUs the platform can describe to a guest (the hypervisor may allow fewer).
    const MAX_VCPUS: u32;
    /// Whether the machines have an ISA bus whose COM1 is the serial port (QEMU's `-device isa-serial`, as libvirt
    /// gives a PC its `<serial>`).
    const ISA_SERIAL: bool;

    /// The QOM types of the chipset functions that hold the ACPI power management registers (QEMU's PIIX4_PM on pc,
    /// ICH9-LPC on q35), whose `disable_s3`/`disable_s4` settings libvirt looks for before it accepts a domain's
    /// `<pm>`: offered with those two (the command line takes them as 1 only: the DSDT offers S5 alone).
    const ACPI_PM_TYPES: &'static [&'static str] = &[];

    /// Which virtio transport devices get by default on `machine` (the platform's default machine for `None`), or
    /// the one error line for a machine type this platform does not offer. Called first, before anything is built.
    fn virtio_transport(machine: Option<MachineType>) -> Result<VirtioTransport, Error>;

    /// Every transport the platform's machines can put virtio devices on (`-device virtio-*-pci` and
    /// `virtio-*-device`), each of which the capability probe lists the models on. By default the machine types'
    /// own transports.
    fn virtio_transports() -> Vec<VirtioTransport> {
        let mut transports = Vec::new();
        for transport in Self::MACHINE_TYPES.iter().filter_map(|&m| Self::virtio_transport(Some(m)).ok()) {
            if !transports.contains(&transport) {
                transports.push(transport);
            }
        }
        transports
    }

    /// Guest RAM as (start, length) regions for `memory_bytes` of RAM, in ascending order. The guest memory the
    /// VMM allocates, and a snapshot's memory layout, follow it.
    fn ram_regions(memory_bytes: u64) -> Vec<(u64, u64)>;

    /// The CPU features a guest sees on this host, by QEMU's names, each with whether it has it (the expansion of
    /// the `host` CPU model that libvirt's `host-model` is built from).
    fn cpu_features(hypervisor: &H) -> Result<Vec<(&'static str, bool)>, Error>;

    /// The named CPU models offered besides `host` (`-cpu`, `query-cpu-definitions`): what libvirt's
    /// `host-model` decodes the host's CPU into, and what a user may pin a guest to.
    const CPU_MODELS: &'static [CpuModelDefinition] = &[];

    /// The features every named model gets on top of its own, as QEMU's accelerator adds them.
    const CPU_MODEL_DEFAULTS: &'static [&'static str] = &[];

    /// Whether guests may have more than one socket (`-smp ...,sockets=N`).
    const MULTI_SOCKET: bool = false;

    /// The CPU `cpu` (`-cpu`) asks for, resolved against this host; the host's own CPU costs no query.
    fn guest_cpu(hypervisor: &H, cpu: &CpuConfig) -> Result<GuestCpu, Error> {
        if cpu.sockets > 1 && !Self::MULTI_SOCKET {
            return Err(Error::Unsupported(format!(
                "{} sockets: guests on this platform get one socket of cores (sockets=1)",
                cpu.sockets
            )));
        }
        let features = if cpu.model.is_none() && cpu.features.is_empty() {
            None
        } else {
            let host = Self::cpu_features(hypervisor)?;
            crate::cpu_model::resolve(cpu, Self::CPU_MODELS, Self::CPU_MODEL_DEFAULTS, &host)?
        };
        Ok(GuestCpu { features, sockets: cpu.sockets })
    }

    /// Where vCPU `index` sits in the topology the guest is shown (`cores_per_socket` cores in each socket), for
    /// `query-cpus-fast`.
    fn cpu_props(index: u32, cores_per_socket: u32) -> CpuProps;

    /// Builds the machine's devices once, before any VM exists: the first UART on `serial`, device requests
    /// (reset, power-off) to `events`, and `virtio_devices` on their transports (`machine_transport` is what
    /// `virtio_transport` returned). A device the platform cannot place is one error line.
    fn new(
        serial: ConsoleBackend,
        events: PlatformEvents,
        memory: &GuestMemoryMmap,
        virtio_devices: Vec<NamedDevice>,
        machine_transport: VirtioTransport,
    ) -> Result<Self, Error>;

    /// The port I/O bus the vCPUs complete I/O exits on (empty where the architecture has no port I/O).
    fn pio(&self) -> &Bus;

    /// The MMIO bus the vCPUs complete MMIO exits on.
    fn mmio(&self) -> &Bus;

    /// Prepares a freshly created VM, guest memory already mapped, to boot what `boot` names: interrupt
    /// controllers, the devices' interrupt lines and queue notifiers, the loaded kernel and its boot tables (or the
    /// firmware mapped where the CPU starts), every vCPU's initial state. Returns the vCPUs, boot vCPU first; the caller starts them. Called at every boot.
    fn boot(
        &self,
        hypervisor: &H,
        vm: &Arc<H::Vm>,
        memory: &GuestMemoryMmap,
        boot: BootFiles<'_>,
    ) -> Result<Vec<VcpuOf<H>>, Error>;

    /// The handler for the architecture's own exits, given to every vCPU thread of a boot before its vCPU starts.
    fn exit_handler(&self) -> Self::ExitHandler;

    /// Puts the devices back in their power-on state for a guest reset, after the old VM is gone and before the
    /// next `boot`. State a real machine keeps across a reset (NVRAM) stays.
    fn reset(&self);

    /// QMP `system_powerdown`: the platform's power button; the guest decides whether and how to shut down.
    fn press_power_button(&self);

    /// The functions on the PCI bus (none without one), for QMP's `query-pci`.
    fn pci_functions(&self) -> Vec<PciFunctionInfo>;
}

/// What a snapshot of the machine holds, and how a VM is built from one. The order of the steps is
/// `crate::snapshot`'s; a platform that cannot snapshot yet refuses in `check_restore_supported` and `save_vm`,
/// with one line each.
pub trait Snapshots<H: Hypervisor> {
    /// One vCPU's state, as its snapshot section holds it.
    type VcpuState: serde::Serialize + serde::de::DeserializeOwned + Send + 'static;
    /// The VM-wide state (in-kernel irqchip, clock), as the `vm` section holds it.
    type VmState: serde::Serialize + serde::de::DeserializeOwned;

    /// The machine type a snapshot records when the command line names none: what `virtio_transport` takes
    /// `None` for.
    const DEFAULT_MACHINE_NAME: &'static str;

    /// Refuses `-incoming` before the machine is built, where restores are not implemented (a new platform's
    /// first state; x86_64 and aarch64 restore).
    fn check_restore_supported() -> Result<(), Error> {
        Ok(())
    }

    /// The CPU a guest of `vcpu_count` vCPUs with CPU model `cpu` sees on this host, as a snapshot's header records it (and a restore
    /// checks). Called only when a save or a restore needs it.
    fn cpu_identity(hypervisor: &H, vcpu_count: u8, cpu: &GuestCpu) -> Result<CpuIdentity, Error>;

    /// Every device whose state a snapshot holds, each with its section's name. A snapshot of another device set
    /// is refused by these names.
    fn components(&self) -> Vec<Component>;

    /// Stops every device's work on guest memory, for a save (the vCPUs are already held).
    fn quiesce_devices(&self);

    /// Lets quiesced or restored devices work again.
    fn resume_devices(&self);

    /// One vCPU's state as data. Runs on the vCPU's own thread, which owns it, once its last exit is complete.
    fn save_vcpu(vcpu: &mut VcpuOf<H>) -> Result<Self::VcpuState, String>;

    /// The VM-wide state, with every vCPU held.
    fn save_vm(vm: &H::Vm) -> Result<Self::VmState, String>;

    /// Makes the clocks in a save agree, once every state is read: each vCPU's state was read on its own thread,
    /// `ages[i]` before the VM's was on the main thread, and what moves with time while the vCPUs are held must
    /// be brought to one instant of the whole machine. `memory` is the guest's, for clocks the guest keeps there.
    /// Nothing moves by default.
    fn settle_saved_clocks(
        _vcpus: &mut [Self::VcpuState],
        _ages: &[Duration],
        _vm: &mut Self::VmState,
        _memory: &GuestMemoryMmap,
    ) {
    }

    /// Builds a fresh VM (guest memory mapped, the devices' states already loaded) from saved states instead of
    /// booting a kernel, its vCPUs given the CPU `cpu`. Returns the vCPUs, boot vCPU first; the caller starts them only if all of it loaded.
    fn restore(
        &self,
        hypervisor: &H,
        vm: &Arc<H::Vm>,
        vcpu_states: &[Self::VcpuState],
        vm_state: &Self::VmState,
        cpu: &GuestCpu,
    ) -> Result<Vec<VcpuOf<H>>, Error>;
}

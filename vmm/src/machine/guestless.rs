//! QEMU's `none` machine: no guest (no RAM, no vCPUs, no devices), only the QMP monitors answering from what the
//! binary can do. libvirt starts a binary this way to probe it (`-machine none,accel=kvm:tcg`), then asks over QMP
//! which machine types, devices and CPU models it has; the answers are the same as a machine with a guest gives.

use std::marker::PhantomData;
use std::sync::mpsc::Receiver;

use hypervisor::Hypervisor;
use mio::Poll;
use qmp::{
    BlockDevice, ChardevInfo, CommandLineOption, CpuDefinition, CpuInfo, CpuModel, CpuModelExpansionType, Event,
    EventKind, Machine, MachineInfo, MigrationCapabilities, MigrationChannel, MigrationInfo, PciDevice, QmpError,
    QomObject, QomType, RunState, ShutdownCause, Target, TypeProperty,
};
use serde_json::json;

use crate::config::{ListenSocket, MachineType, VmConfig};
use crate::platform::Platform;
use crate::{Error, Outcome};

use super::event_loop::Served;
use super::qmp_machine::{monitor_chardevs, uuid_bytes};
use super::{capabilities, event_channel, qmp_event, shutdown_event, EventSender, VmEvent};

/// The `none` machine of platform `P` on hypervisor `H` (opened, so that `query-kvm` and the CPU model are the
/// host's).
pub(super) struct Guestless<'a, H: Hypervisor, P: Platform<H>> {
    config: &'a VmConfig,
    hypervisor: H,
    /// `prelaunch` with `-S`, else `running` (with nothing to run), switched by `stop`/`cont` as QEMU does.
    state: RunState,
    raised: Vec<Event>,
    quit: bool,
    events: Receiver<VmEvent>,
    /// Keeps the channel the signal thread sends on open.
    _sender: EventSender,
    migration_capabilities: MigrationCapabilities,
    platform: PhantomData<P>,
}

impl<'a, H: Hypervisor, P: Platform<H>> Guestless<'a, H, P> {
    pub(super) fn new(
        config: &'a VmConfig,
        open_hypervisor: impl FnOnce() -> hypervisor::Result<H>,
        poll: &Poll,
    ) -> Result<Self, Error> {
        let hypervisor = open_hypervisor()?;
        let (sender, events) = event_channel(poll)?;
        Ok(Guestless {
            config,
            hypervisor,
            state: if config.start_paused { RunState::Prelaunch } else { RunState::Running },
            raised: Vec::new(),
            quit: false,
            events,
            _sender: sender,
            migration_capabilities: MigrationCapabilities::default(),
            platform: PhantomData,
        })
    }

    fn raise(&mut self, events: &mut Vec<Event>, event: Event) {
        self.raised.push(event);
        events.push(event);
    }
}

impl<H: Hypervisor, P: Platform<H>> Served for Guestless<'_, H, P> {
    fn qmp_sockets(&self) -> &[ListenSocket] {
        &self.config.qmp
    }
    fn start(&mut self) -> Result<(), Error> {
        Ok(())
    }
    fn take_raised(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.raised)
    }
    fn quit_requested(&self) -> bool {
        self.quit
    }
    fn take_fatal(&mut self) -> Option<Error> {
        None
    }
    fn next_event(&mut self) -> Option<VmEvent> {
        self.events.try_recv().ok()
    }
    /// Only signals come here: there are no devices or vCPUs.
    fn handle(&mut self, event: VmEvent, emit: &mut dyn FnMut(Event)) -> Result<Option<Outcome>, Error> {
        match event {
            VmEvent::Signal(signal) => {
                emit(shutdown_event(ShutdownCause::HostSignal));
                Ok(Some(Outcome::Signal(signal)))
            }
            VmEvent::Platform(_) | VmEvent::VcpuFailed { .. } | VmEvent::BalloonChange { .. } => Ok(None),
        }
    }
}

/// What QEMU's `none` machine answers, with nothing to stop, reset or save.
impl<H: Hypervisor, P: Platform<H>> Machine for Guestless<'_, H, P> {
    fn run_state(&self) -> RunState {
        self.state
    }
    fn stop(&mut self, events: &mut Vec<Event>) -> Result<(), QmpError> {
        if self.state == RunState::Running {
            self.state = RunState::Paused;
            self.raise(events, qmp_event(EventKind::Stop));
        }
        Ok(())
    }
    fn cont(&mut self, events: &mut Vec<Event>) -> Result<(), QmpError> {
        if self.state != RunState::Running {
            self.state = RunState::Running;
            self.raise(events, qmp_event(EventKind::Resume));
        }
        Ok(())
    }
    fn system_reset(&mut self, events: &mut Vec<Event>) -> Result<(), QmpError> {
        self.raise(events, qmp_event(EventKind::reset(ShutdownCause::HostQmpSystemReset)));
        Ok(())
    }
    /// There is no power button: the event says it was pressed, and nothing listens, as with QEMU's `none`.
    fn system_powerdown(&mut self, events: &mut Vec<Event>) -> Result<(), QmpError> {
        self.raise(events, qmp_event(EventKind::Powerdown));
        Ok(())
    }
    fn quit(&mut self, events: &mut Vec<Event>) -> Result<(), QmpError> {
        self.raise(events, shutdown_event(ShutdownCause::HostQmpQuit));
        self.quit = true;
        Ok(())
    }
    fn cpus(&self) -> Vec<CpuInfo> {
        Vec::new()
    }
    fn name(&self) -> Option<String> {
        self.config.name.clone()
    }
    fn uuid(&self) -> [u8; 16] {
        uuid_bytes(self.config)
    }
    fn memory_size(&self) -> u64 {
        0
    }
    fn plugged_memory(&self) -> Option<u64> {
        None
    }
    fn chardevs(&self) -> Vec<ChardevInfo> {
        monitor_chardevs(self.config).collect()
    }
    fn target(&self) -> Target {
        P::QMP_TARGET
    }
    fn kvm(&self) -> (bool, bool) {
        (true, true)
    }
    fn machines(&self) -> Vec<MachineInfo> {
        capabilities::machines::<H, P>(self.hypervisor.max_vcpus().min(P::MAX_VCPUS))
    }
    /// The root and the machine, nothing under it.
    fn qom_object(&self, path: &str) -> Option<QomObject> {
        let machine_type = capabilities::machine_qom_type(MachineType::None);
        let prop = capabilities::qom_property;
        match path.trim_end_matches('/') {
            "" => Some(capabilities::qom_root(&machine_type)),
            "/machine" => Some(QomObject {
                type_name: machine_type.clone(),
                properties: vec![prop("type", "string", json!(machine_type))],
            }),
            _ => None,
        }
    }
    fn block_devices(&self) -> Vec<BlockDevice> {
        Vec::new()
    }
    fn pci_devices(&self) -> Vec<PciDevice> {
        Vec::new()
    }
    fn migrate(&mut self, _channel: MigrationChannel, _events: &mut Vec<Event>) -> Result<(), QmpError> {
        Err(QmpError::generic("the none machine has no guest to save"))
    }
    fn migrate_incoming(&mut self, _channel: MigrationChannel, _events: &mut Vec<Event>) -> Result<(), QmpError> {
        Err(QmpError::generic("the none machine has no guest to restore"))
    }
    fn migration(&self) -> Option<MigrationInfo> {
        None
    }
    fn migration_capabilities(&self) -> MigrationCapabilities {
        self.migration_capabilities
    }
    fn set_migration_capabilities(&mut self, capabilities: MigrationCapabilities) -> Result<(), QmpError> {
        self.migration_capabilities = capabilities;
        Ok(())
    }
    fn qom_types(&self) -> Vec<QomType> {
        capabilities::qom_types::<H, P>()
    }
    fn type_properties(&self, type_name: &str) -> Option<Vec<TypeProperty>> {
        capabilities::type_properties::<H, P>(type_name)
    }
    fn cpu_definitions(&self) -> Vec<CpuDefinition> {
        capabilities::cpu_definitions::<H, P>(&self.hypervisor)
    }
    fn expand_cpu_model(&self, expansion: CpuModelExpansionType, model: &CpuModel) -> Result<CpuModel, QmpError> {
        capabilities::expand_cpu_model::<H, P>(&self.hypervisor, expansion, model)
    }
    fn command_line_options(&self) -> Vec<CommandLineOption> {
        capabilities::command_line_options()
    }
}

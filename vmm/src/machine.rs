//! Runs a VM: guest memory, the vCPU threads, and the event loop that turns device requests, vCPU failures,
//! host signals and control commands into the machine's run state (running, paused, reset in place, shut down).

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::virtio::block::Block;
use devices::{PlatformEvents, PlatformRequest};
use hypervisor::kvm::KvmHypervisor;
use hypervisor::{Hypervisor, Vm};
use mio::{Events, Poll, Token, Waker};
use qmp::{
    BlockDevice, BlockDeviceStats, ChardevInfo, CpuInfo, Event, EventKind, Machine, MachineInfo, MigrationCapabilities,
    MigrationChannel, MigrationInfo, MigrationRam, MigrationStatus, QmpError, QomObject, QomProperty, RunState,
    ServerInfo, Session, ShutdownCause, Target, Timestamp,
};
use serde_json::json;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::config::{Incoming as IncomingConfig, SerialConfig, VmConfig, MIN_MEMORY_BYTES};
use crate::platform::{BootFiles, Platform};
use crate::qmp_server::{Handlers, QmpServer};
use crate::seccomp::{self, ThreadKind};
use crate::snapshot::{self as snapshot_file, Incoming, SaveTarget, SavedMachine};
use crate::vcpu::{VcpuEvent, VcpuThreads};
use crate::{console, inherited, signals, Error, Outcome};

/// Something the event loop must act on.
pub enum VmEvent {
    Platform(PlatformRequest),
    VcpuFailed { id: u32, reason: String, state: String },
    Signal(i32),
}

/// Sends events to the loop from any thread, waking it.
#[derive(Clone)]
pub struct EventSender {
    sender: Arc<Mutex<Sender<VmEvent>>>,
    waker: Arc<Waker>,
}

impl EventSender {
    pub fn send(&self, event: VmEvent) {
        // Both fail only while the VMM is exiting, when the event no longer matters.
        let _ = self.sender.lock().unwrap_or_else(|p| p.into_inner()).send(event);
        let _ = self.waker.wake();
    }
}

const WAKER: Token = Token(0);

/// How long, at most, QMP clients are given on the way out to read what they are still owed (the last reply, the
/// SHUTDOWN event): a client that does not read must not keep Kestrel alive.
const QMP_FINISH_GRACE: Duration = Duration::from_secs(1);

/// One boot of the guest. Field order is drop order: vCPU threads stop before the VM goes.
struct Guest<H: Hypervisor, P: Platform<H>> {
    vcpus: VcpuThreads<P::VcpuState>,
    vm: Arc<H::Vm>,
}

/// The machine itself, platform `P` on hypervisor `H`: what QMP commands act on.
pub struct Vmm<'a, H: Hypervisor, P: Platform<H>> {
    config: &'a VmConfig,
    hypervisor: H,
    platform: P,
    kernel: File,
    initrd: Option<File>,
    /// Guest RAM. It outlives every VM it is mapped into (each boot's VM is dropped first, see `Guest`) and keeps
    /// its contents across resets, as a PC's RAM does.
    memory: GuestMemoryMmap,
    events: Receiver<VmEvent>,
    sender: EventSender,
    guest: Option<Guest<H, P>>,
    state: RunState,
    /// Events raised by the QMP command being handled, for the other clients.
    raised: Vec<Event>,
    quit: bool,
    /// The virtio-blk devices, in `config.disks` order (also owned, untyped, by the platform).
    disks: Vec<crate::virtio::Disk>,
    /// Set when a device asked for a reset or power-off this boot (see `VcpuThreads::spawn`).
    platform_requested: Arc<AtomicBool>,
    /// The first boot's vCPU threads, started early (see `Vmm::new`) and waiting for their vCPUs.
    first_boot_vcpus: Option<VcpuThreads<P::VcpuState>>,
    /// The snapshot to build the first boot from (`-incoming`), already checked against this machine.
    incoming: Option<Incoming>,
    /// Started with `-incoming defer` and no `migrate-incoming` yet: no guest runs, the state is `inmigrate`.
    waiting_for_incoming: bool,
    /// Whether the guest runs once an incoming migration completed: not with `-S`; `cont` and `stop` in
    /// `inmigrate` change it, as in QEMU.
    autostart: bool,
    /// The last migration (`migrate`, or the restore of `-incoming`), for `query-migrate`.
    migration: Option<MigrationInfo>,
    migration_capabilities: MigrationCapabilities,
    /// Why the run must end: an incoming stream failed after guest memory started to fill.
    fatal: Option<Error>,
    /// The snapshot file guest memory is partly mapped from, after a restore from a file: it stays so for the life
    /// of the process (resets keep memory as it is), and a save must not overwrite it.
    memory_file: Option<snapshot_file::MappedFile>,
}

/// Runs the machine `config` describes: this host's platform on KVM, the one place a backend is chosen.
pub fn run(config: &VmConfig) -> Result<Outcome, Error> {
    run_on::<KvmHypervisor, crate::HostPlatform>(config, KvmHypervisor::new)
}

/// Runs platform `P` on the hypervisor `open` opens (once the command line's own files have been checked).
fn run_on<H, P>(config: &VmConfig, open: impl FnOnce() -> hypervisor::Result<H>) -> Result<Outcome, Error>
where
    H: Hypervisor,
    P: Platform<H>,
{
    // Before anything is opened: which descriptors came from outside (`-incoming fd:N`).
    inherited::record();
    if config.sandbox {
        seccomp::enable()?;
    }
    let poll = Poll::new().map_err(|e| Error::Host("creating the event loop", e))?;
    let vmm = match Vmm::<H, P>::new(config, open, &poll) {
        Ok(vmm) => vmm,
        // A console waiting for its first client gives up when Kestrel is told to terminate.
        Err(Error::Console(e)) if e.kind() == std::io::ErrorKind::Interrupted => {
            return signals::received().map(Outcome::Signal).ok_or(Error::Console(e));
        }
        Err(e) => return Err(e),
    };
    let qmp = QmpServer::bind(&config.qmp, poll.registry())?;
    // Every other thread has started and confines itself (the first boot's vCPU threads too: they carry their own
    // filter only, later boots' add theirs to this one). No vCPU enters the guest before all of them, and this
    // thread, are confined (`seccomp::wait_until_every_thread_is_confined`).
    seccomp::apply(ThreadKind::Main)?;
    EventLoop { qmp, poll, vmm }.run()
}

/// Wall-clock time for event timestamps.
fn now() -> Timestamp {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    Timestamp { seconds: since_epoch.as_secs() as i64, microseconds: i64::from(since_epoch.subsec_micros()) }
}

fn qmp_event(kind: EventKind) -> Event {
    Event { kind, timestamp: now() }
}

impl<'a, H: Hypervisor, P: Platform<H>> Vmm<'a, H, P> {
    fn new(
        config: &'a VmConfig,
        open_hypervisor: impl FnOnce() -> hypervisor::Result<H>,
        poll: &Poll,
    ) -> Result<Self, Error> {
        let transport = P::virtio_transport(config.machine)?;
        check_memory_size(config.memory_bytes)?;
        let kernel = open_input("kernel", &config.kernel)?;
        let initrd = config.initrd.as_ref().map(|path| open_input("initrd", path)).transpose()?;

        let hypervisor = open_hypervisor()?;
        let max_vcpus = hypervisor.max_vcpus().min(P::MAX_VCPUS);
        if u32::from(config.vcpus) > max_vcpus {
            return Err(Error::TooManyCpus { requested: config.vcpus, max: max_vcpus });
        }

        let waker = Waker::new(poll.registry(), WAKER).map_err(|e| Error::Host("creating the event loop", e))?;
        let (sender, events) = channel();
        let sender = EventSender { sender: Arc::new(Mutex::new(sender)), waker: Arc::new(waker) };

        signals::install_kick_handler()?;
        signals::forward_termination_signals({
            let sender = sender.clone();
            move |signal| sender.send(VmEvent::Signal(signal))
        })?;
        if let Some(fd) = signals::termination_fd() {
            console::give_up_waiting_when_readable(fd);
        }
        // Started first (after the signal mask they inherit), so that their start and confinement overlap with
        // building the machine and its first VM.
        let platform_requested = Arc::new(AtomicBool::new(false));
        let first_boot_vcpus = VcpuThreads::spawn(usize::from(config.vcpus), platform_requested.clone())?;

        let serial = console::open(&config.serial, "serial0").map_err(Error::Console)?;
        // A device's reset or power-off request also holds every vCPU out of the guest until the VMM acts on it.
        let platform_events = PlatformEvents::new({
            let sender = sender.clone();
            let requested = platform_requested.clone();
            move |request| {
                requested.store(true, Ordering::SeqCst);
                sender.send(VmEvent::Platform(request))
            }
        });
        let state = match (config.start_paused, &config.incoming) {
            // Until the stream is read; then as below.
            (_, Some(IncomingConfig::Fd(_) | IncomingConfig::Defer)) => RunState::InMigrate,
            (false, _) => RunState::Running,
            (true, None) => RunState::Prelaunch,
            // QEMU's state once an incoming migration completed without autostart.
            (true, Some(IncomingConfig::File(_))) => RunState::Paused,
        };
        let memory = create_guest_memory(P::ram_regions(config.memory_bytes))?;
        let (virtio_devices, disks) = crate::virtio::devices(config, transport)?;
        let platform = P::new(serial, platform_events, &memory, virtio_devices, transport)?;
        if config.incoming.is_some() {
            P::check_restore_supported()?;
        }
        let incoming = match &config.incoming {
            Some(IncomingConfig::File(path)) => {
                // Only a save or a restore needs the CPU identity: the host's CPUID query costs ~0.5 ms of start-up.
                let cpu = P::cpu_identity(&hypervisor, config.vcpus)?;
                let components = platform.components();
                Some(snapshot_file::open(path, &snapshot_machine::<H, P>(config, &cpu, &components))?)
            }
            _ => None,
        };
        Ok(Vmm {
            config,
            hypervisor,
            platform,
            kernel,
            initrd,
            memory,
            events,
            sender,
            guest: None,
            state,
            raised: Vec::new(),
            quit: false,
            disks,
            platform_requested,
            first_boot_vcpus: Some(first_boot_vcpus),
            incoming,
            waiting_for_incoming: config.incoming == Some(IncomingConfig::Defer),
            autostart: !config.start_paused,
            migration: None,
            migration_capabilities: MigrationCapabilities::default(),
            fatal: None,
            memory_file: None,
        })
    }

    /// The first boot: the kernel, or the snapshot of `-incoming file:`, or the stream on `-incoming fd:N` (read
    /// now, before any QMP command is served); `-incoming defer` boots at `migrate-incoming`. The events a restore
    /// raised are in `raised`, for every client.
    fn start(&mut self) -> Result<(), Error> {
        let mut events = Vec::new();
        match self.config.incoming {
            Some(IncomingConfig::Defer) => {}
            Some(IncomingConfig::Fd(fd)) => {
                let fd = inherited::claim(fd).map_err(|e| Error::Snapshot(format!("-incoming fd:{fd}: {e}")))?;
                self.restore_stream(fd, &mut events)?;
            }
            _ => self.boot()?,
        }
        Ok(())
    }

    /// Raises a `MIGRATION` event, if the `events` capability is on.
    fn report_migration(&mut self, events: &mut Vec<Event>, status: MigrationStatus) {
        if self.migration_capabilities.events {
            self.raise(events, qmp_event(EventKind::Migration { status }));
        }
    }

    /// The CPU the guest sees, as a snapshot's header records it: asked of the host when a save or a restore
    /// needs it, not at start-up.
    fn cpu_identity(&self) -> Result<snapshot::CpuIdentity, Error> {
        P::cpu_identity(&self.hypervisor, self.config.vcpus)
    }

    /// An incoming migration from `source`: `setup`, `active`, the restore, then the guest paused or running
    /// (`autostart`) and `completed`. A file that does not fit is refused before guest memory is touched, and the
    /// machine keeps waiting; a stream that fails leaves guest memory half-filled, so the error ends Kestrel
    /// (QEMU exits too).
    fn restore_incoming(&mut self, source: IncomingSource, events: &mut Vec<Event>) -> Result<(), Error> {
        match source {
            IncomingSource::File(path) => {
                let cpu = self.cpu_identity()?;
                let components = self.platform.components();
                let machine = snapshot_machine::<H, P>(self.config, &cpu, &components);
                self.incoming = Some(snapshot_file::open(&path, &machine)?);
                self.waiting_for_incoming = false;
                self.migration = Some(incoming_info(MigrationStatus::Setup, None));
                self.report_migration(events, MigrationStatus::Setup);
                self.finish_incoming(Instant::now(), events)
            }
            IncomingSource::Stream(fd) => self.restore_stream(fd, events),
        }
    }

    fn restore_stream(&mut self, fd: std::os::fd::OwnedFd, events: &mut Vec<Event>) -> Result<(), Error> {
        let started = Instant::now();
        self.waiting_for_incoming = false;
        self.migration = Some(incoming_info(MigrationStatus::Setup, None));
        self.report_migration(events, MigrationStatus::Setup);
        let cpu = self.cpu_identity()?;
        let components = self.platform.components();
        let machine = snapshot_machine::<H, P>(self.config, &cpu, &components);
        self.migration = Some(incoming_info(MigrationStatus::Active, None));
        self.report_migration(events, MigrationStatus::Active);
        match snapshot_file::read_stream(fd, &machine, &self.memory) {
            Ok(incoming) => {
                self.incoming = Some(incoming);
                self.finish_incoming(started, events)
            }
            Err(error) => {
                self.migration = Some(incoming_info(MigrationStatus::Failed, Some(error.to_string())));
                self.report_migration(events, MigrationStatus::Failed);
                Err(error)
            }
        }
    }

    /// Boots from the checked snapshot and lets the guest run if it is to.
    fn finish_incoming(&mut self, started: Instant, events: &mut Vec<Event>) -> Result<(), Error> {
        if matches!(self.migration.as_ref().map(|m| m.status), Some(MigrationStatus::Setup)) {
            self.migration = Some(incoming_info(MigrationStatus::Active, None));
            self.report_migration(events, MigrationStatus::Active);
        }
        self.state = if self.autostart { RunState::Running } else { RunState::Paused };
        if let Err(error) = self.boot() {
            self.migration = Some(incoming_info(MigrationStatus::Failed, Some(error.to_string())));
            self.report_migration(events, MigrationStatus::Failed);
            return Err(error);
        }
        if self.autostart {
            self.raise(events, qmp_event(EventKind::Resume));
        }
        let mut info = incoming_info(MigrationStatus::Completed, None);
        info.total_time_ms = started.elapsed().as_millis() as u64;
        self.migration = Some(info);
        self.report_migration(events, MigrationStatus::Completed);
        Ok(())
    }

    /// Builds a fresh VM, loads the kernel (or, the first time with `-incoming`, the snapshot) and starts the vCPU
    /// threads, held if the machine is not running.
    fn boot(&mut self) -> Result<(), Error> {
        let mut threads = match self.first_boot_vcpus.take() {
            Some(threads) => threads,
            None => VcpuThreads::spawn(usize::from(self.config.vcpus), self.platform_requested.clone())?,
        };
        // A restore loads guest memory before the VM exists: mapping pages from the snapshot file replaces parts
        // of the host mapping, which is simplest before KVM has a memory slot on it (KVM would follow the change
        // through its MMU notifier, but no vCPU can then have seen the old pages).
        let restored = match self.incoming.take() {
            Some(mut incoming) => {
                let vcpu_states = (0..usize::from(self.config.vcpus))
                    .map(|i| snapshot_file::state::<P::VcpuState>(&incoming, &snapshot_file::vcpu_section(i)))
                    .collect::<Result<Vec<_>, Error>>()?;
                let vm_state: P::VmState = snapshot_file::state(&incoming, snapshot_file::VM_SECTION)?;
                snapshot_file::restore_components(&incoming, &self.platform.components())?;
                self.memory_file = snapshot_file::load_memory(&mut incoming, &self.memory)?;
                Some((vcpu_states, vm_state))
            }
            None => None,
        };
        let vm = Arc::new(self.hypervisor.create_vm()?);
        map_guest_memory(vm.as_ref(), &self.memory)?;
        let vcpus = match restored {
            Some((vcpu_states, vm_state)) => {
                let vcpus = self.platform.restore(&self.hypervisor, &vm, &vcpu_states, &vm_state)?;
                self.platform.resume_devices();
                vcpus
            }
            None => {
                let boot = BootFiles {
                    kernel: &mut self.kernel,
                    initrd: self.initrd.as_mut(),
                    cmdline: self.config.cmdline.as_deref().unwrap_or(P::DEFAULT_CMDLINE),
                    vcpu_count: self.config.vcpus,
                };
                self.platform.boot(&self.hypervisor, &vm, &self.memory, boot)?
            }
        };
        let sender = self.sender.clone();
        let report = move |event| match event {
            VcpuEvent::Platform(request) => sender.send(VmEvent::Platform(request)),
            VcpuEvent::Failed { id, reason, state } => sender.send(VmEvent::VcpuFailed { id, reason, state }),
        };
        let paused = self.state != RunState::Running;
        self.platform_requested.store(false, Ordering::SeqCst);
        let save = P::save_vcpu;
        let arch_exits = self.platform.exit_handler();
        threads.start(vcpus, self.platform.pio(), self.platform.mmio(), paused, save, arch_exits, report)?;
        self.guest = Some(Guest { vcpus: threads, vm });
        Ok(())
    }

    /// Resets the machine in place: a fresh VM with the same devices, as a PC's reset line does. Not once
    /// Kestrel was told to terminate: the event loop exits at its next step, which a boot would only delay (and
    /// a burst of queued resets delay for good).
    fn reset(&mut self) -> Result<(), Error> {
        if signals::received().is_some() {
            return Ok(());
        }
        self.guest = None;
        // Requests raised by vCPUs of the boot that just ended are moot now. A host signal among them is not,
        // but it is not lost either: `signals::received` holds it, and the event loop looks there first.
        while self.events.try_recv().is_ok() {}
        self.platform.reset();
        if matches!(self.state, RunState::Shutdown | RunState::InternalError) {
            self.state = RunState::Prelaunch;
        }
        self.boot()
    }

    /// Holds every vCPU outside the guest.
    fn pause(&mut self, state: RunState) {
        if let Some(guest) = &self.guest {
            guest.vcpus.pause();
        }
        self.state = state;
    }

    /// Lets the vCPUs run again.
    fn resume(&mut self) {
        if let Some(guest) = &self.guest {
            guest.vcpus.resume();
        }
        self.state = RunState::Running;
    }

    /// Writes the machine to `target`. The vCPUs must be held (`pause`); the devices are quiesced for the copy and
    /// work again afterwards, whatever the outcome.
    fn save(&self, target: SaveTarget<'_>) -> Result<snapshot_file::SaveStats, String> {
        let guest = self.guest.as_ref().ok_or("the machine has no VM")?;
        snapshot_file::check_not_mapped(&target, self.memory_file)?;
        let cpu = self.cpu_identity().map_err(|e| e.to_string())?;
        let vcpus = guest.vcpus.save_states()?;
        let vm = P::save_vm(guest.vm.as_ref())?;
        self.platform.quiesce_devices();
        let saved = (|| {
            let devices = self
                .platform
                .components()
                .into_iter()
                .map(|c| c.device.save_value().map(|state| (c.name, state)))
                .collect::<Result<Vec<_>, String>>()?;
            let header = snapshot::Header::new(machine_name::<H, P>(self.config), cpu);
            snapshot_file::write(target, &SavedMachine { header, vm, vcpus, devices }, &self.memory)
        })();
        self.platform.resume_devices();
        saved
    }

    /// Host thread ids of the vCPUs, in vCPU order.
    fn vcpu_thread_ids(&self) -> Vec<i32> {
        self.guest.as_ref().map(|g| g.vcpus.thread_ids()).unwrap_or_default()
    }

    /// Acts on one event from the guest or the host; `Some` ends the run. `emit` sends QMP events.
    fn handle(&mut self, event: VmEvent, emit: &mut dyn FnMut(Event)) -> Result<Option<Outcome>, Error> {
        match event {
            VmEvent::Platform(PlatformRequest::Poweroff) => {
                emit(shutdown_event(ShutdownCause::GuestShutdown));
                if self.config.no_shutdown {
                    self.pause(RunState::Shutdown);
                    emit(qmp_event(EventKind::Stop));
                    return Ok(None);
                }
                Ok(Some(Outcome::Poweroff))
            }
            VmEvent::Platform(PlatformRequest::Reset) => {
                emit(qmp_event(EventKind::Reset { guest: true, reason: ShutdownCause::GuestReset }));
                if self.config.no_reboot {
                    emit(shutdown_event(ShutdownCause::GuestReset));
                    return Ok(Some(Outcome::Rebooted));
                }
                self.reset()?;
                Ok(None)
            }
            VmEvent::Signal(signal) => {
                emit(shutdown_event(ShutdownCause::HostSignal));
                Ok(Some(Outcome::Signal(signal)))
            }
            VmEvent::VcpuFailed { id, reason, state } => {
                let error = Error::VcpuFailed { id, reason, state };
                if self.config.qmp.is_empty() {
                    return Err(error);
                }
                // With a control socket the machine stays for inspection, as QEMU's does.
                eprintln!("kestrel: {error}");
                if self.state == RunState::Running {
                    emit(qmp_event(EventKind::Stop));
                }
                self.pause(RunState::InternalError);
                Ok(None)
            }
        }
    }
}

impl<H: Hypervisor, P: Platform<H>> Drop for Vmm<'_, H, P> {
    /// The vCPUs stop and the VM goes before the guest memory it maps is unmapped.
    fn drop(&mut self) {
        self.guest = None;
    }
}

fn shutdown_event(reason: ShutdownCause) -> Event {
    qmp_event(EventKind::Shutdown { guest: reason.is_guest(), reason })
}

impl<H: Hypervisor, P: Platform<H>> Machine for Vmm<'_, H, P> {
    fn run_state(&self) -> RunState {
        self.state
    }

    fn stop(&mut self, events: &mut Vec<Event>) -> Result<(), QmpError> {
        if self.state == RunState::InMigrate {
            self.autostart = false;
            return Ok(());
        }
        if self.state == RunState::Running {
            self.pause(RunState::Paused);
            self.raise(events, qmp_event(EventKind::Stop));
        }
        Ok(())
    }

    fn cont(&mut self, events: &mut Vec<Event>) -> Result<(), QmpError> {
        // QEMU: the guest runs once the incoming migration completed.
        if self.state == RunState::InMigrate {
            self.autostart = true;
            return Ok(());
        }
        if self.state != RunState::Running {
            self.resume();
            self.raise(events, qmp_event(EventKind::Resume));
        }
        Ok(())
    }

    fn system_reset(&mut self, events: &mut Vec<Event>) -> Result<(), QmpError> {
        if self.state == RunState::InMigrate {
            return Err(QmpError::generic("the machine is waiting for its incoming migration"));
        }
        if self.config.no_reboot {
            // QEMU with -no-reboot turns every reset request, the host's too, into a shutdown.
            self.raise(events, shutdown_event(ShutdownCause::HostQmpSystemReset));
            self.quit = true;
            return Ok(());
        }
        self.raise(events, qmp_event(EventKind::Reset { guest: false, reason: ShutdownCause::HostQmpSystemReset }));
        self.reset().map_err(|e| QmpError::generic(e.to_string()))
    }

    fn system_powerdown(&mut self, events: &mut Vec<Event>) -> Result<(), QmpError> {
        self.raise(events, qmp_event(EventKind::Powerdown));
        self.platform.press_power_button();
        Ok(())
    }

    fn quit(&mut self, events: &mut Vec<Event>) -> Result<(), QmpError> {
        self.raise(events, shutdown_event(ShutdownCause::HostQmpQuit));
        self.quit = true;
        Ok(())
    }

    fn cpus(&self) -> Vec<CpuInfo> {
        self.vcpu_thread_ids()
            .into_iter()
            .enumerate()
            .map(|(index, thread_id)| CpuInfo {
                cpu_index: index as i64,
                qom_path: cpu_qom_path(index),
                thread_id: i64::from(thread_id),
                props: P::cpu_props(index as u32),
                type_name: P::CPU_TYPE.to_string(),
            })
            .collect()
    }

    fn name(&self) -> Option<String> {
        self.config.name.clone()
    }

    fn uuid(&self) -> [u8; 16] {
        let hex: String = self.config.uuid.as_deref().unwrap_or_default().chars().filter(|c| *c != '-').collect();
        let mut bytes = [0u8; 16];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = hex.get(2 * i..2 * i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()).unwrap_or(0);
        }
        bytes
    }

    fn memory_size(&self) -> u64 {
        self.config.memory_bytes
    }

    fn plugged_memory(&self) -> Option<u64> {
        None
    }

    fn chardevs(&self) -> Vec<ChardevInfo> {
        let serial = match &self.config.serial {
            SerialConfig::Stdio => Some("stdio".to_string()),
            SerialConfig::Pty => Some("pty".to_string()),
            SerialConfig::File(path) => Some(format!("file:{}", path.display())),
            SerialConfig::None => None,
            SerialConfig::Socket(socket) => Some(format!("{},server=on", socket.address)),
        };
        let serial = serial.map(|filename| ChardevInfo { label: "serial0".into(), filename, frontend_open: true });
        let monitors = self.config.qmp.iter().enumerate().map(|(i, socket)| ChardevInfo {
            label: format!("compat_monitor{i}"),
            filename: format!("{},server=on", socket.address),
            frontend_open: true,
        });
        serial.into_iter().chain(monitors).collect()
    }

    fn target(&self) -> Target {
        P::QMP_TARGET
    }

    fn kvm(&self) -> (bool, bool) {
        (true, true)
    }

    fn machines(&self) -> Vec<MachineInfo> {
        vec![MachineInfo {
            name: P::MACHINE_TYPE.into(),
            alias: None,
            is_default: true,
            cpu_max: i64::from(P::MAX_VCPUS),
            hotpluggable_cpus: false,
            numa_mem_supported: false,
            deprecated: false,
            default_cpu_type: Some(P::CPU_TYPE.into()),
            default_ram_id: None,
        }]
    }

    /// A small tree that tells the truth: the machine, its unattached container and one object per vCPU.
    fn qom_object(&self, path: &str) -> Option<QomObject> {
        let prop = |name: &str, type_name: &str, value| QomProperty {
            name: name.into(),
            type_name: type_name.into(),
            value: Some(value),
        };
        let vcpus = usize::from(self.config.vcpus);
        match path.trim_end_matches('/') {
            "" => Some(QomObject {
                type_name: "container".into(),
                properties: vec![
                    prop("type", "string", json!("container")),
                    prop("machine", &format!("child<{}>", P::MACHINE_QOM_TYPE), json!("/machine")),
                ],
            }),
            "/machine" => Some(QomObject {
                type_name: P::MACHINE_QOM_TYPE.into(),
                properties: vec![
                    prop("type", "string", json!(P::MACHINE_QOM_TYPE)),
                    prop("unattached", "child<container>", json!("/machine/unattached")),
                    prop("kernel", "string", json!(self.config.kernel.display().to_string())),
                    prop("append", "string", json!(self.config.cmdline.as_deref().unwrap_or(P::DEFAULT_CMDLINE))),
                ],
            }),
            "/machine/unattached" => {
                let mut properties = vec![prop("type", "string", json!("container"))];
                properties.extend((0..vcpus).map(|i| {
                    prop(&format!("device[{i}]"), &format!("child<{}>", P::CPU_TYPE), json!(cpu_qom_path(i)))
                }));
                Some(QomObject { type_name: "container".into(), properties })
            }
            other => {
                let index: usize =
                    other.strip_prefix("/machine/unattached/device[")?.strip_suffix(']')?.parse().ok()?;
                (index < vcpus).then(|| QomObject {
                    type_name: P::CPU_TYPE.into(),
                    properties: vec![
                        prop("type", "string", json!(P::CPU_TYPE)),
                        prop("realized", "bool", json!(true)),
                        prop("start-powered-off", "bool", json!(index != 0)),
                    ],
                })
            }
        }
    }

    fn block_devices(&self) -> Vec<BlockDevice> {
        let disks = self.config.disks.iter().zip(&self.disks).enumerate();
        disks
            .map(|(i, (config, block))| block_device(i, config, &block.lock().unwrap_or_else(|p| p.into_inner())))
            .collect()
    }

    fn pci_devices(&self) -> Vec<qmp::PciDevice> {
        self.platform.pci_functions().iter().map(pci_device).collect()
    }

    /// QEMU's non-live save to a file or a descriptor (a pipe is written front to back, then closed): the vCPUs
    /// stop for the copy and the machine ends in `postmigrate` (`cont` resumes it). The copy runs to its end
    /// before the reply, so its events come first; a write that fails resumes a guest that was running and says
    /// why in `query-migrate`.
    fn migrate(&mut self, channel: MigrationChannel, events: &mut Vec<Event>) -> Result<(), QmpError> {
        if self.state.needs_reset() || self.guest.is_none() {
            return Err(QmpError::generic(format!("cannot save the VM in state '{}'", self.state.as_str())));
        }
        let path;
        let target = match channel {
            MigrationChannel::File(file) => {
                path = file;
                SaveTarget::Path(&path)
            }
            MigrationChannel::Passed(fd) => SaveTarget::Fd(fd),
            MigrationChannel::Inherited(fd) => SaveTarget::Fd(inherited::claim(fd).map_err(QmpError::generic)?),
        };
        let started = Instant::now();
        let report = |vmm: &mut Self, events: &mut Vec<Event>, status| vmm.report_migration(events, status);
        self.migration = Some(MigrationInfo {
            status: MigrationStatus::Setup,
            incoming: false,
            total_time_ms: 0,
            downtime_ms: None,
            setup_time_ms: 0,
            ram: None,
            error: None,
        });
        report(self, events, MigrationStatus::Setup);
        let was_running = self.state == RunState::Running;
        let setup_time_ms = started.elapsed().as_millis() as u64;
        report(self, events, MigrationStatus::Active);
        let stopped = Instant::now();
        if was_running {
            self.pause(RunState::FinishMigrate);
            self.raise(events, qmp_event(EventKind::Stop));
        }
        let what = target.describe();
        let saved = self.save(target);
        let ms = |since: Instant| since.elapsed().as_millis() as u64;
        match saved {
            Ok(stats) => {
                self.state = RunState::PostMigrate;
                let seconds = started.elapsed().as_secs_f64().max(1e-6);
                self.migration = Some(MigrationInfo {
                    status: MigrationStatus::Completed,
                    incoming: false,
                    total_time_ms: ms(started),
                    downtime_ms: Some(ms(stopped)),
                    setup_time_ms,
                    ram: Some(MigrationRam {
                        transferred: stats.bytes,
                        total: self.config.memory_bytes,
                        duplicate: stats.pages - stats.stored_pages,
                        normal: stats.stored_pages,
                        page_size: stats.page_size,
                        mbps: stats.bytes as f64 * 8.0 / 1e6 / seconds,
                        pages_per_second: (stats.pages as f64 / seconds) as u64,
                    }),
                    error: None,
                });
                report(self, events, MigrationStatus::Completed);
            }
            Err(error) => {
                eprintln!("kestrel: migrate to {what} failed: {error}");
                self.migration = Some(MigrationInfo {
                    status: MigrationStatus::Failed,
                    incoming: false,
                    total_time_ms: ms(started),
                    downtime_ms: None,
                    setup_time_ms,
                    ram: None,
                    error: Some(error),
                });
                report(self, events, MigrationStatus::Failed);
                if was_running {
                    self.resume();
                    self.raise(events, qmp_event(EventKind::Resume));
                }
            }
        }
        Ok(())
    }

    /// `-incoming defer`'s second half. The channel's problems (a file that does not fit, a descriptor not
    /// passed) are refused and the machine keeps waiting; a stream that fails once read ends Kestrel.
    fn migrate_incoming(&mut self, channel: MigrationChannel, events: &mut Vec<Event>) -> Result<(), QmpError> {
        if !self.waiting_for_incoming {
            return Err(QmpError::generic(match self.config.incoming {
                Some(IncomingConfig::Defer) => "The incoming migration has already been started",
                _ => "'-incoming' was not specified on the command line",
            }));
        }
        let source = match channel {
            MigrationChannel::File(path) => IncomingSource::File(path),
            MigrationChannel::Passed(fd) => IncomingSource::Stream(fd),
            MigrationChannel::Inherited(fd) => IncomingSource::Stream(inherited::claim(fd).map_err(QmpError::generic)?),
        };
        let streamed = matches!(source, IncomingSource::Stream(_));
        self.restore_incoming(source, events).map_err(|error| {
            let message = error.to_string();
            if streamed || !self.waiting_for_incoming {
                self.fatal = Some(error);
            }
            QmpError::generic(message)
        })
    }

    fn migration(&self) -> Option<MigrationInfo> {
        self.migration.clone()
    }

    fn migration_capabilities(&self) -> MigrationCapabilities {
        self.migration_capabilities
    }

    fn set_migration_capabilities(&mut self, capabilities: MigrationCapabilities) -> Result<(), QmpError> {
        self.migration_capabilities = capabilities;
        Ok(())
    }
}

/// Where `migrate-incoming` reads from.
enum IncomingSource {
    File(std::path::PathBuf),
    Stream(std::os::fd::OwnedFd),
}

/// `query-migrate` on the destination: QEMU reports the status only.
fn incoming_info(status: MigrationStatus, error: Option<String>) -> MigrationInfo {
    MigrationInfo { status, incoming: true, total_time_ms: 0, downtime_ms: None, setup_time_ms: 0, ram: None, error }
}

/// What a snapshot for this command line must match.
fn snapshot_machine<'c, H: Hypervisor, P: Platform<H>>(
    config: &VmConfig,
    cpu: &snapshot::CpuIdentity,
    components: &'c [crate::snapshot::Component],
) -> snapshot_file::Machine<'c> {
    snapshot_file::Machine {
        machine_type: machine_name::<H, P>(config),
        cpu: cpu.clone(),
        ram_regions: P::ram_regions(config.memory_bytes),
        vcpus: usize::from(config.vcpus),
        components,
    }
}

/// The machine type a snapshot records: the one the command line names, or the platform's default.
fn machine_name<H: Hypervisor, P: Platform<H>>(config: &VmConfig) -> &'static str {
    config.machine.map(|m| m.name()).unwrap_or(P::DEFAULT_MACHINE_NAME)
}

/// One PCI function as QMP shows it. Kestrel's functions use MSI-X only (no interrupt pin) and every BAR is a
/// memory BAR placed before the guest starts.
fn pci_device(f: &devices::pci::PciFunctionInfo) -> qmp::PciDevice {
    qmp::PciDevice {
        bus: 0,
        slot: f.slot,
        function: f.function,
        class: (f.class_code >> 8) as u16,
        vendor_id: f.vendor_id,
        device_id: f.device_id,
        subsystem_vendor_id: f.subsystem_vendor_id,
        subsystem_id: f.subsystem_id,
        irq: None,
        irq_pin: f.irq_pin,
        qdev_id: f.qdev_id.clone(),
        regions: f
            .bars
            .iter()
            .map(|b| qmp::PciRegion {
                bar: b.index as u8,
                io: b.is_io,
                address: Some(b.address),
                size: b.size,
                prefetchable: b.prefetchable,
                is_64bit: b.is_64bit,
            })
            .collect(),
    }
}

/// One disk as QMP shows it. The backend is named as QEMU names `-drive if=virtio` drives (`virtio0`, ...) and the
/// node as QEMU names nodes it generated (`#block<N>`, a name no user can give). There is no `qdev`: Kestrel's QOM
/// tree has no object for the device, and QMP must not name a path `qom-get` cannot resolve.
fn block_device(index: usize, config: &crate::config::DiskConfig, block: &Block) -> BlockDevice {
    use std::os::unix::fs::MetadataExt;
    let s = block.stats();
    BlockDevice {
        device: format!("virtio{index}"),
        qdev: None,
        node_name: format!("#block{index}"),
        file: config.path.display().to_string(),
        read_only: block.read_only(),
        direct: config.direct,
        virtual_size: block.capacity() * 512,
        // st_blocks counts 512-byte units whatever the file system's block size.
        actual_size: std::fs::metadata(&config.path).ok().map(|m| m.blocks() * 512),
        stats: BlockDeviceStats {
            rd_bytes: s.rd_bytes,
            // QEMU accounts write-zeroes as writes and discards as unmaps.
            wr_bytes: s.wr_bytes + s.write_zeroes_bytes,
            unmap_bytes: s.discard_bytes,
            rd_operations: s.rd_operations,
            wr_operations: s.wr_operations + s.write_zeroes_operations,
            flush_operations: s.flush_operations,
            unmap_operations: s.discard_operations,
            rd_total_time_ns: s.total_time_ns.read,
            wr_total_time_ns: s.total_time_ns.write + s.total_time_ns.write_zeroes,
            flush_total_time_ns: s.total_time_ns.flush,
            unmap_total_time_ns: s.total_time_ns.discard,
            wr_highest_offset: s.wr_highest_offset,
            failed_rd_operations: s.failed.read,
            failed_wr_operations: s.failed.write + s.failed.write_zeroes,
            failed_flush_operations: s.failed.flush,
            failed_unmap_operations: s.failed.discard,
            invalid_rd_operations: s.invalid.read,
            invalid_wr_operations: s.invalid.write + s.invalid.write_zeroes,
            invalid_flush_operations: s.invalid.flush,
            invalid_unmap_operations: s.invalid.discard,
        },
    }
}

fn cpu_qom_path(index: usize) -> String {
    format!("/machine/unattached/device[{index}]")
}

impl<H: Hypervisor, P: Platform<H>> Vmm<'_, H, P> {
    /// Records an event raised by a QMP command: the issuing session gets it through `events`, every other
    /// session through `raised`.
    fn raise(&mut self, events: &mut Vec<Event>, event: Event) {
        self.raised.push(event);
        events.push(event);
    }
}

/// The VMM's main loop: guest and host events, and the QMP sockets.
/// Field order is drop order: clients see their connection close before the VM's teardown (tens of ms with an
/// in-kernel irqchip), as QEMU's do right after `quit`'s reply.
struct EventLoop<'a, H: Hypervisor, P: Platform<H>> {
    qmp: QmpServer<Session>,
    poll: Poll,
    vmm: Vmm<'a, H, P>,
}

impl<H: Hypervisor, P: Platform<H>> EventLoop<'_, H, P> {
    fn run(mut self) -> Result<Outcome, Error> {
        let outcome = self.serve();
        // Every way out, an error's too: clients get the rest of their replies and the last events first.
        self.qmp.finish(Instant::now() + QMP_FINISH_GRACE);
        self.qmp.remove_files();
        outcome
    }

    /// Ends the run if Kestrel was told to terminate: a signal outranks whatever else is queued.
    fn check_signal(&mut self) -> Option<Outcome> {
        let signal = signals::received()?;
        let event = shutdown_event(ShutdownCause::HostSignal);
        self.qmp.broadcast_except(None, self.poll.registry(), |session| session.event_bytes(&event));
        Some(Outcome::Signal(signal))
    }

    fn serve(&mut self) -> Result<Outcome, Error> {
        let waits: Vec<bool> = self.vmm.config.qmp.iter().map(|s| s.wait).collect();
        if waits.contains(&true) {
            let EventLoop { qmp, poll, vmm } = self;
            let mut connect = || Session::new(ServerInfo::kestrel());
            let mut input = |session: &mut Session, bytes: &[u8], fds| {
                session.receive_fds(fds);
                session.feed(bytes, vmm)
            };
            let mut handlers = Handlers { connect: &mut connect, input: &mut input };
            if !qmp.wait_for_clients(&waits, signals::termination_fd(), poll.registry(), &mut handlers) {
                // Only a termination signal interrupts the wait.
                return Ok(self.check_signal().unwrap_or(Outcome::Signal(libc::SIGTERM)));
            }
        }
        if let Some(outcome) = self.check_signal() {
            return Ok(outcome);
        }
        self.vmm.start()?;
        for event in std::mem::take(&mut self.vmm.raised) {
            self.qmp.broadcast_except(None, self.poll.registry(), |session| session.event_bytes(&event));
        }
        let mut events = Events::with_capacity(64);
        loop {
            match self.poll.poll(&mut events, None) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::Host("waiting for events", e)),
            }
            if let Some(outcome) = self.check_signal() {
                return Ok(outcome);
            }
            let EventLoop { qmp, poll, vmm } = self;
            for ready in events.iter() {
                let token = ready.token();
                if !qmp.owns(token) {
                    continue;
                }
                {
                    let mut connect = || Session::new(ServerInfo::kestrel());
                    let mut input = |session: &mut Session, bytes: &[u8], fds| {
                        session.receive_fds(fds);
                        session.feed(bytes, vmm)
                    };
                    let mut handlers = Handlers { connect: &mut connect, input: &mut input };
                    qmp.ready(token, poll.registry(), &mut handlers);
                }
                let raised = std::mem::take(&mut vmm.raised);
                for event in &raised {
                    qmp.broadcast_except(Some(token), poll.registry(), |session| session.event_bytes(event));
                }
                if vmm.quit {
                    return Ok(Outcome::Quit);
                }
                if let Some(error) = vmm.fatal.take() {
                    return Err(error);
                }
            }
            {
                // A client that went away while being sent an event leaves the next one still queued.
                let mut connect = || Session::new(ServerInfo::kestrel());
                let mut input = |session: &mut Session, bytes: &[u8], fds| {
                    session.receive_fds(fds);
                    session.feed(bytes, vmm)
                };
                qmp.accept_waiting(poll.registry(), &mut Handlers { connect: &mut connect, input: &mut input });
            }
            while signals::received().is_none() {
                let Ok(event) = vmm.events.try_recv() else { break };
                let registry = poll.registry();
                let mut emit = |event: Event| qmp.broadcast_except(None, registry, |s| s.event_bytes(&event));
                if let Some(outcome) = vmm.handle(event, &mut emit)? {
                    return Ok(outcome);
                }
            }
            if let Some(outcome) = self.check_signal() {
                return Ok(outcome);
            }
        }
    }
}

fn open_input(what: &'static str, path: &std::path::Path) -> Result<File, Error> {
    File::open(path).map_err(|source| Error::Open { what, path: path.to_path_buf(), source })
}

fn host_memory_bytes() -> u64 {
    // SAFETY: sysconf only reads system configuration.
    let (pages, page_size) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    (pages.max(0) as u64).saturating_mul(page_size.max(0) as u64)
}

fn check_memory_size(bytes: u64) -> Result<(), Error> {
    if bytes < MIN_MEMORY_BYTES {
        return Err(Error::MemoryTooSmall { requested: bytes, min: MIN_MEMORY_BYTES });
    }
    let host = host_memory_bytes();
    if bytes > host {
        return Err(Error::MemoryTooLarge { requested: bytes, host });
    }
    Ok(())
}

/// Guest RAM in the platform's `regions` (start, length).
fn create_guest_memory(regions: Vec<(u64, u64)>) -> Result<GuestMemoryMmap, Error> {
    let ranges: Vec<(GuestAddress, usize)> =
        regions.into_iter().map(|(start, len)| (GuestAddress(start), len as usize)).collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| Error::GuestMemory(e.to_string()))
}

fn map_guest_memory<V: Vm>(vm: &V, memory: &GuestMemoryMmap) -> Result<(), Error> {
    for (slot, region) in memory.iter().enumerate() {
        let host_addr = region.as_ptr() as u64;
        // SAFETY: the mapping belongs to the VMM's guest memory, which outlives every VM (each boot's VM is
        // dropped before the VMM), and is used for nothing but this guest's RAM.
        unsafe { vm.map_memory(slot as u32, region.start_addr().0, region.len(), host_addr) }?;
    }
    Ok(())
}

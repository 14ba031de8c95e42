//! The machine's life: built once from the command line (`Vmm::new`), booted (the first boot, each reset's),
//! paused and resumed, and what the event loop does with a guest's or a device's request.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use devices::{PlatformEvents, PlatformRequest};
use hypervisor::Hypervisor;
use mio::Poll;
use qmp::{Event, EventKind, MigrationCapabilities, RunState, ShutdownCause};

use crate::config::{Incoming as IncomingConfig, VmConfig};
use crate::firmware::FirmwareImage;
use crate::platform::{BootFiles, Payload, Platform};
use crate::snapshot as snapshot_file;
use crate::vcpu::{VcpuEvent, VcpuThreads};
use crate::{console, inherited, signals, Error, Outcome};

use super::memory::{check_memory_size, create_guest_memory, exclude_from_core_dumps, map_guest_memory};
use super::migration::snapshot_machine;
use super::{event_channel, qmp_event, shutdown_event, EventThrottle, Guest, OpenPayload, VmEvent, Vmm, SERIAL_LABEL};

impl<'a, H: Hypervisor, P: Platform<H>> Vmm<'a, H, P> {
    pub(super) fn new(
        config: &'a VmConfig,
        open_hypervisor: impl FnOnce() -> hypervisor::Result<H>,
        poll: &Poll,
    ) -> Result<Self, Error> {
        let transport = P::virtio_transport(config.machine)?;
        check_memory_size(config.memory_bytes)?;
        // The CLI gives every machine but the guest-less `none` (which never builds a `Vmm`) a kernel or firmware.
        let payload = match (&config.kernel, &config.bios) {
            (Some(kernel), None) => OpenPayload::Kernel {
                kernel: open_input("kernel", kernel)?,
                initrd: config.initrd.as_ref().map(|path| open_input("initrd", path)).transpose()?,
            },
            (None, Some(bios)) => OpenPayload::Firmware(FirmwareImage::open(bios)?),
            _ => return Err(Error::Boot("give either a kernel or firmware (-bios)".into())),
        };

        let hypervisor = open_hypervisor()?;
        let max_vcpus = hypervisor.max_vcpus().min(P::MAX_VCPUS);
        if u32::from(config.vcpus) > max_vcpus {
            return Err(Error::TooManyCpus { requested: config.vcpus, max: max_vcpus });
        }

        signals::install_kick_handler()?;
        let (sender, events) = event_channel(poll)?;
        if let Some(fd) = signals::termination_fd() {
            console::give_up_waiting_when_readable(fd);
        }
        // Started first (after the signal mask they inherit), so that their start and confinement overlap with
        // building the machine and its first VM.
        let platform_requested = Arc::new(AtomicBool::new(false));
        let first_boot_vcpus = VcpuThreads::spawn(usize::from(config.vcpus), platform_requested.clone())?;

        if config.serial_on_isa.is_some() && !P::ISA_SERIAL {
            return Err(Error::Unsupported("-device isa-serial: this machine has no ISA bus; use -serial".into()));
        }
        let serial_label = config.serial_chardev.as_deref().unwrap_or(SERIAL_LABEL);
        let serial = console::open(&config.serial, serial_label).map_err(Error::Console)?;
        let serial_pty = serial.pty_path.clone();
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
        let guest_cpu = P::guest_cpu(&hypervisor, &config.cpu)?;
        let memory = create_guest_memory(P::ram_regions(config.memory_bytes))?;
        let crate::virtio::VirtioDevices { devices: virtio_devices, disks, balloon, serial_ports } =
            crate::virtio::devices(config, transport)?;
        if let Some(balloon) = &balloon {
            // The guest's driver changed its balloon: BALLOON_CHANGE, from the event loop.
            let sender = sender.clone();
            let listener = move |actual| sender.send(VmEvent::BalloonChange { actual_pages: actual });
            balloon.lock().unwrap_or_else(|p| p.into_inner()).set_actual_listener(Box::new(listener));
        }
        let platform = P::new(serial, platform_events, &memory, virtio_devices, transport)?;
        if config.incoming.is_some() {
            P::check_restore_supported()?;
        }
        let incoming = match &config.incoming {
            Some(IncomingConfig::File(path)) => {
                // Only a save or a restore needs the CPU identity: the host's CPUID query costs ~0.5 ms of start-up.
                let cpu = P::cpu_identity(&hypervisor, config.vcpus, &guest_cpu)?;
                let components = platform.components();
                Some(snapshot_file::open(path, &snapshot_machine::<H, P>(config, &cpu, &components))?)
            }
            _ => None,
        };
        Ok(Vmm {
            config,
            hypervisor,
            platform,
            cpu: guest_cpu,
            payload,
            memory,
            events,
            sender,
            guest: None,
            state,
            raised: Vec::new(),
            quit: false,
            disks,
            balloon,
            balloon_events: EventThrottle::default(),
            platform_requested,
            first_boot_vcpus: Some(first_boot_vcpus),
            incoming,
            waiting_for_incoming: config.incoming == Some(IncomingConfig::Defer),
            autostart: !config.start_paused,
            migration: None,
            migration_capabilities: MigrationCapabilities::default(),
            fatal: None,
            memory_file: None,
            serial_pty,
            serial_ports,
        })
    }
}

impl<H: Hypervisor, P: Platform<H>> Vmm<'_, H, P> {
    /// The first boot: the kernel, or the snapshot of `-incoming file:`, or the stream on `-incoming fd:N` (read
    /// now, before any QMP command is served); `-incoming defer` boots at `migrate-incoming`. The events a restore
    /// raised are in `raised`, for every client.
    pub(super) fn start(&mut self) -> Result<(), Error> {
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
    /// Builds a fresh VM, loads the kernel (or, the first time with `-incoming`, the snapshot) and starts the vCPU
    /// threads, held if the machine is not running.
    pub(super) fn boot(&mut self) -> Result<(), Error> {
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
        if !self.config.dump_guest_core {
            exclude_from_core_dumps(&self.memory)?;
        }
        let vm = Arc::new(self.hypervisor.create_vm()?);
        map_guest_memory(vm.as_ref(), &self.memory)?;
        let vcpus = match restored {
            Some((vcpu_states, vm_state)) => {
                let vcpus = self.platform.restore(&self.hypervisor, &vm, &vcpu_states, &vm_state, &self.cpu)?;
                self.platform.resume_devices();
                vcpus
            }
            None => {
                let payload = match &mut self.payload {
                    OpenPayload::Kernel { kernel, initrd } => Payload::Kernel {
                        kernel,
                        initrd: initrd.as_mut(),
                        cmdline: self.config.cmdline.as_deref().unwrap_or(P::DEFAULT_CMDLINE),
                    },
                    OpenPayload::Firmware(image) => Payload::Firmware(image),
                };
                let boot = BootFiles {
                    payload,
                    vcpu_count: self.config.vcpus,
                    cpu: &self.cpu,
                    strict_boot: self.config.strict_boot,
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
    pub(super) fn reset(&mut self) -> Result<(), Error> {
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
    pub(super) fn pause(&mut self, state: RunState) {
        if let Some(guest) = &self.guest {
            guest.vcpus.pause();
        }
        self.state = state;
    }
    /// Lets the vCPUs run again.
    pub(super) fn resume(&mut self) {
        if let Some(guest) = &self.guest {
            guest.vcpus.resume();
        }
        self.state = RunState::Running;
    }
    /// Host thread ids of the vCPUs, in vCPU order.
    pub(super) fn vcpu_thread_ids(&self) -> Vec<i32> {
        self.guest.as_ref().map(|g| g.vcpus.thread_ids()).unwrap_or_default()
    }
    /// Acts on one event from the guest or the host; `Some` ends the run. `emit` sends QMP events.
    pub(super) fn handle(&mut self, event: VmEvent, emit: &mut dyn FnMut(Event)) -> Result<Option<Outcome>, Error> {
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
            VmEvent::BalloonChange { actual_pages } => {
                let event = qmp_event(EventKind::BalloonChange { actual: self.balloon_actual_bytes(actual_pages) });
                if let Some(event) = self.balloon_events.offer(event, std::time::Instant::now()) {
                    emit(event);
                }
                Ok(None)
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

pub(super) fn open_input(what: &'static str, path: &std::path::Path) -> Result<File, Error> {
    File::open(path).map_err(|source| Error::Open { what, path: path.to_path_buf(), source })
}

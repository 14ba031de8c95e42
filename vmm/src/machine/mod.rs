//! Runs a VM: guest memory, the vCPU threads, and the event loop that turns device requests, vCPU failures,
//! host signals and control commands into the machine's run state (running, paused, reset in place, shut down).
//!
//! `Vmm` is the machine, generic over the hypervisor and the platform (`run` picks KVM and this host's platform);
//! its concerns each have a file: `lifecycle` (built, booted, reset, paused, a request acted on), `qmp_machine`
//! (what QMP commands see and do), `migration` (save and restore through QMP and `-incoming`), `event_loop`
//! (guest and host events, and the QMP sockets) and `memory` (guest RAM: checked, allocated, mapped).

mod capabilities;
mod event_loop;
mod guestless;
mod lifecycle;
mod memory;
mod migration;
mod qmp_machine;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::PlatformRequest;
use hypervisor::kvm::KvmHypervisor;
use hypervisor::Hypervisor;
use mio::{Poll, Token, Waker};
use qmp::{Event, EventKind, MigrationCapabilities, MigrationInfo, RunState, ShutdownCause, Timestamp};
use vm_memory::GuestMemoryMmap;

use crate::config::{MachineType, VmConfig};
use crate::cpu_model::GuestCpu;
use crate::daemon::{PidFile, Readiness};
use crate::firmware::FirmwareImage;
use crate::platform::{Platform, Snapshots};
use crate::qmp_server::QmpServer;
use crate::seccomp::{self, ThreadKind};
use crate::snapshot::{self as snapshot_file, Incoming};
use crate::vcpu::VcpuThreads;
use crate::{daemon, inherited, signals, Error, Outcome};
use event_loop::{EventLoop, Served};
use guestless::Guestless;

/// Something the event loop must act on.
pub enum VmEvent {
    Platform(PlatformRequest),
    VcpuFailed {
        id: u32,
        reason: String,
        state: String,
    },
    Signal(i32),
    /// The guest's balloon driver changed `actual` (pages in its balloon).
    BalloonChange {
        actual_pages: u32,
    },
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

/// One boot of the guest. Field order is drop order: vCPU threads stop before the VM goes.
struct Guest<H: Hypervisor, P: Platform<H>> {
    vcpus: VcpuThreads<P::VcpuState>,
    vm: Arc<H::Vm>,
}

/// The kernel's files, or the firmware image, open for the machine's life (every reset boots from them again).
enum OpenPayload {
    Kernel { kernel: File, initrd: Option<File> },
    Firmware(FirmwareImage),
}

/// The machine itself, platform `P` on hypervisor `H`: what QMP commands act on.
pub struct Vmm<'a, H: Hypervisor, P: Platform<H>> {
    config: &'a VmConfig,
    hypervisor: H,
    platform: P,
    /// The CPU every vCPU is given, `-cpu` resolved against the host once.
    cpu: GuestCpu,
    /// What each boot starts from.
    payload: OpenPayload,
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
    /// The virtio-balloon device, if the machine has one (also owned, untyped, by the platform).
    balloon: Option<crate::virtio::BalloonDevice>,
    /// BALLOON_CHANGE, at most one a second as QEMU's monitor sends it.
    balloon_events: EventThrottle,
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
    /// The serial port's pty, when it has one: `query-chardev` reports its path, as libvirt needs.
    serial_pty: Option<String>,
    /// The virtio-serial device and its ports' ptys, for `query-chardev`.
    serial_ports: Option<crate::virtio::SerialPorts>,
}

/// QEMU's label for the serial port of `-serial` (`-chardev` ids label their own).
const SERIAL_LABEL: &str = "serial0";

/// Runs the machine `config` describes: this host's platform on KVM, the one place a backend is chosen.
pub fn run(config: &VmConfig) -> Result<Outcome, Error> {
    // Before anything is opened (the daemon's pipe too): which descriptors came from outside (`-incoming fd:N`).
    inherited::record();
    // Before any thread starts: only the forking thread lives on in the daemon.
    let readiness = if config.daemonize { Some(daemon::daemonize()?) } else { None };
    run_on::<KvmHypervisor, crate::HostPlatform>(config, KvmHypervisor::new, readiness)
}

/// The CPU a guest of `vcpus` vCPUs sees on this host's KVM (the host's CPU model), as a save records it in a snapshot's header and a
/// restore checks it ([`snapshot::CpuIdentity::check_can_run`]): for tools and tests that ask whether a snapshot
/// can restore here without starting a machine.
pub fn host_cpu_identity(vcpus: u8) -> Result<snapshot::CpuIdentity, Error> {
    let hypervisor = KvmHypervisor::new()?;
    <crate::HostPlatform as Snapshots<KvmHypervisor>>::cpu_identity(&hypervisor, vcpus, &GuestCpu::default())
}

/// Runs platform `P` on the hypervisor `open` opens (once the command line's own files have been checked): the
/// machine with its guest, or the guest-less `none`. A daemon reports ready once the monitors listen.
fn run_on<H, P>(
    config: &VmConfig,
    open: impl FnOnce() -> hypervisor::Result<H>,
    readiness: Option<Readiness>,
) -> Result<Outcome, Error>
where
    H: Hypervisor,
    P: Platform<H>,
{
    if config.sandbox {
        seccomp::enable()?;
    }
    let poll = Poll::new().map_err(|e| Error::Host("creating the event loop", e))?;
    // First, so that a second Kestrel given the same pid file stops before it touches anything the first uses.
    let pidfile = config.pidfile.as_deref().map(PidFile::create).transpose()?;
    let started = Started { pidfile, readiness };
    if config.machine == Some(MachineType::None) {
        let machine = Guestless::<H, P>::new(config, open, &poll)?;
        return serve(config, poll, machine, started);
    }
    let vmm = match Vmm::<H, P>::new(config, open, &poll) {
        Ok(vmm) => vmm,
        // A console waiting for its first client gives up when Kestrel is told to terminate.
        Err(Error::Console(e)) if e.kind() == std::io::ErrorKind::Interrupted => {
            return signals::received().map(Outcome::Signal).ok_or(Error::Console(e));
        }
        Err(e) => return Err(e),
    };
    serve(config, poll, vmm, started)
}

/// The pid file (removed when it is dropped) and a daemon's report to its parent.
struct Started {
    pidfile: Option<PidFile>,
    readiness: Option<Readiness>,
}

/// Opens the QMP sockets, tells a daemon's parent it is ready (the pid file is written), and runs the event loop.
/// The pid file is removed on the way out.
fn serve<M: Served>(config: &VmConfig, poll: Poll, machine: M, started: Started) -> Result<Outcome, Error> {
    let Started { pidfile, readiness } = started;
    let qmp = QmpServer::bind(&config.qmp, poll.registry())?;
    if let Some(readiness) = readiness {
        if let Err(e) = readiness.ready() {
            qmp.remove_files();
            return Err(e);
        }
    }
    // Every other thread has started and confines itself (the first boot's vCPU threads too: they carry their own
    // filter only, later boots' add theirs to this one). No vCPU enters the guest before all of them, and this
    // thread, are confined (`seccomp::wait_until_every_thread_is_confined`).
    seccomp::apply(ThreadKind::Main)?;
    let outcome = EventLoop { qmp, poll, vmm: machine }.run();
    drop(pidfile);
    outcome
}

/// The channel the event loop receives machine events on, its wake-up registered with `poll`, with termination
/// signals forwarded into it (from a thread of their own: the caller must not have started others yet).
fn event_channel(poll: &Poll) -> Result<(EventSender, Receiver<VmEvent>), Error> {
    let waker = Waker::new(poll.registry(), WAKER).map_err(|e| Error::Host("creating the event loop", e))?;
    let (sender, events) = std::sync::mpsc::channel();
    let sender = EventSender { sender: Arc::new(Mutex::new(sender)), waker: Arc::new(waker) };
    signals::forward_termination_signals({
        let sender = sender.clone();
        move |signal| sender.send(VmEvent::Signal(signal))
    })?;
    Ok((sender, events))
}

/// Wall-clock time for event timestamps.
fn now() -> Timestamp {
    let since_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    Timestamp { seconds: since_epoch.as_secs() as i64, microseconds: i64::from(since_epoch.subsec_micros()) }
}

/// QEMU's monitor throttle for an event that can come in bursts (BALLOON_CHANGE): the first goes out at once;
/// those within a second of the last one sent wait, and only the newest of them goes out when the second ends.
#[derive(Default)]
struct EventThrottle {
    quiet_until: Option<Instant>,
    pending: Option<Event>,
}

impl EventThrottle {
    const PERIOD: Duration = Duration::from_secs(1);

    /// `event` happened at `now`: returns it if it goes out now.
    fn offer(&mut self, event: Event, now: Instant) -> Option<Event> {
        match self.quiet_until {
            Some(until) if now < until => {
                self.pending = Some(event);
                None
            }
            _ => {
                self.quiet_until = Some(now + Self::PERIOD);
                Some(event)
            }
        }
    }

    /// When a held event is due.
    fn deadline(&self) -> Option<Instant> {
        self.pending.and(self.quiet_until)
    }

    /// The held event, if it is due at `now`.
    fn due(&mut self, now: Instant) -> Option<Event> {
        if self.deadline()? > now {
            return None;
        }
        self.quiet_until = Some(now + Self::PERIOD);
        self.pending.take()
    }
}

fn qmp_event(kind: EventKind) -> Event {
    Event { kind, timestamp: now() }
}

fn shutdown_event(reason: ShutdownCause) -> Event {
    qmp_event(EventKind::Shutdown { guest: reason.is_guest(), reason })
}

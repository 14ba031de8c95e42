//! Virtio 1.x (modern only, split virtqueues): the device trait, the interrupt/status state a transport shares with
//! its device, descriptor-chain parsing that trusts nothing, the virtio-mmio transport and the devices.
//!
//! # Threading
//!
//! A transport sits on an MMIO (or, later, PCI) bus behind the bus's `Mutex` and is driven by vCPU threads. It
//! owns its device as an `Arc<Mutex<dyn VirtioDevice>>` and hands a clone of that `Arc` (inside a
//! [`QueueHandler`]) to whoever does the device work: the VMM's event loop, woken by the per-queue notification
//! eventfds. Lock order is always transport → device (→ the MSI-X table, when an interrupt is raised with the device
//! lock held); a device never reaches back into its transport, so the two threads cannot deadlock. A reset (driver
//! writes 0 to the status register) takes the device lock, so it waits for queue work in progress and the device
//! has dropped guest memory and queues before the vCPU returns to the guest.
//!
//! Guest memory is a [`GuestMemoryMmap`] (cheap to clone, `Send + Sync`); every guest address and length a device
//! uses comes from a descriptor and is checked against it (see [`chain`]).

pub mod balloon;
pub mod block;
pub mod chain;
pub mod console;
pub mod image;
pub mod mmio;
pub mod net;
pub mod pci;
pub mod rng;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
pub mod transport;

use std::fmt;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::{InterruptLine, StateError};

pub use virtio_queue::{Queue, QueueT};

/// The guest memory type devices work on.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Device types (virtio 1.2, 5).
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_CONSOLE: u32 = 3;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_BALLOON: u32 = 5;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// Feature bits shared by all devices (virtio 1.2, 6).
pub mod features {
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    pub const VERSION_1: u64 = 1 << 32;
    /// What every Kestrel device offers: a modern device with indirect descriptors and event suppression.
    pub const COMMON: u64 = VERSION_1 | RING_EVENT_IDX | RING_INDIRECT_DESC;
}

/// Interrupt status bits (virtio-mmio's InterruptStatus; PCI's ISR has the same two).
pub const INT_VRING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver made {got} queues ready, the device needs {need}")]
    QueueCount { got: usize, need: usize },
    #[error("virtio queue {0} is not usable")]
    BadQueue(usize),
    #[error("{0}")]
    Host(#[from] std::io::Error),
}

/// A virtio device as its transport sees it. Everything here runs with the device's `Mutex` held, either on a
/// vCPU thread (register accesses through the transport) or on the thread doing queue work ([`QueueHandler`]).
pub trait VirtioDevice: Send {
    /// The virtio device type ([`TYPE_BLOCK`], ...).
    fn device_type(&self) -> u32;

    /// The maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// Feature bits the device offers (including [`features::VERSION_1`]).
    fn avail_features(&self) -> u64;

    /// What the driver set up on this device ([`DriverState`]), which the provided methods below work on.
    fn driver(&self) -> &DriverState;

    /// [`driver`](Self::driver), to change.
    fn driver_mut(&mut self) -> &mut DriverState;

    /// The features the driver accepted, a subset of [`avail_features`](Self::avail_features) (the transport
    /// refuses FEATURES_OK otherwise). Called once per negotiation, before `activate`.
    fn ack_features(&mut self, features: u64) {
        let avail = self.avail_features();
        self.driver_mut().acked_features = features & avail;
    }

    /// Reads the device-specific configuration space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device-specific configuration space; read-only fields ignore writes.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// The driver set DRIVER_OK: start working on `queues` (one per [`queue_max_sizes`](Self::queue_max_sizes)
    /// entry, those the driver did not enable are not `ready()`). Ready queues have been checked to lie inside
    /// `mem`. `interrupt` is how the device asks for the guest's attention outside of
    /// [`process_queue`](Self::process_queue) (configuration changes, NEEDS_RESET).
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        let count = self.queue_max_sizes().len();
        let driver = self.driver_mut();
        driver.active = Some(ActiveQueues::with_count(count, mem, queues, interrupt, driver.acked_features)?);
        self.activated();
        Ok(())
    }

    /// Called at the end of [`activate`](Self::activate), the queues in place: work that waited for the driver
    /// (host input, frames), for buffers it posted before DRIVER_OK.
    fn activated(&mut self) {}

    /// Back to the state before `activate`: drop guest memory, queues and negotiated features.
    fn reset(&mut self) {
        *self.driver_mut() = DriverState::default();
        self.reset_device();
    }

    /// Called at the end of [`reset`](Self::reset): what the device itself drops on a reset.
    fn reset_device(&mut self) {}

    /// The driver notified queue `index`: consume what it made available. Returns whether used buffers were
    /// added and the driver wants to hear about it (the caller then raises [`INT_VRING`]). A broken queue is
    /// reported through [`VirtioInterrupt::set_needs_reset`], never by panicking. Does nothing before
    /// `activate` or for an unknown or disabled queue.
    fn process_queue(&mut self, index: usize) -> bool;

    /// Host file descriptors whose readiness is work for this device (a tap, a socket), in a fixed order. The
    /// thread doing queue work watches them for readability, edge-triggered, from before activation until the
    /// process ends, so they must stay open as long as the device exists. Asked once, when that thread starts.
    fn host_event_sources(&self) -> Vec<RawFd> {
        Vec::new()
    }

    /// Host source `index` (of [`host_event_sources`](Self::host_event_sources)) became readable. The device
    /// consumes what it can: until the source would block, or until it has to wait for the guest (no buffers),
    /// in which case it resumes on its own from `process_queue` when the driver adds buffers, since no new edge
    /// will come for data already waiting. Returns the queue that got used buffers when the driver wants to hear
    /// about it ([`INT_VRING`] on that queue's interrupt).
    fn process_host_event(&mut self, _index: usize) -> Option<usize> {
        None
    }

    /// Whether the last [`process_queue`](Self::process_queue) on queue `index` stopped with chains still
    /// available: each call handles at most a queue's worth ([`ActiveQueues::process`]), so a driver that keeps
    /// adding chains cannot keep the device's thread (and lock) on one queue forever. The caller then calls
    /// `process_queue` again after giving other queues and devices their turn.
    fn has_backlog(&self, index: usize) -> bool {
        self.active_queues().is_some_and(|active| active.has_backlog(index))
    }

    /// The device's queues while it runs (from `activate` to `reset`), `None` before: the transport saves their
    /// positions and quiesces and resumes the device through them.
    fn active_queues(&self) -> Option<&ActiveQueues> {
        self.driver().active.as_ref()
    }

    /// [`active_queues`](Self::active_queues), to quiesce and resume the device.
    fn active_queues_mut(&mut self) -> Option<&mut ActiveQueues> {
        self.driver_mut().active.as_mut()
    }

    /// The device's own state as data: what it holds beside its queues (see [`VirtioDeviceState`]). Status,
    /// features and queues are the transport's ([`transport::VirtioState`]).
    fn save_state(&self) -> VirtioDeviceState;

    /// Loads the device's own `state` (checked against this device's configuration), the features negotiated
    /// (`acked_features`, 0 before FEATURES_OK) and, if it was running, its queues (`active`, already checked by
    /// the transport and quiesced), as `ack_features` and `activate` would but without `activate`'s side effects:
    /// no interrupt, no host input looked at until the transport resumes the device. On `Err` nothing changed.
    fn restore_state(
        &mut self,
        state: &VirtioDeviceState,
        acked_features: u64,
        active: Option<ActiveQueues>,
    ) -> Result<(), StateError> {
        self.restore_device_state(state, active.is_some())?;
        let avail = self.avail_features();
        *self.driver_mut() = DriverState { acked_features: acked_features & avail, active };
        self.restored();
        Ok(())
    }

    /// Called once a restore has loaded everything, the driver's state included: for what a device must do about
    /// the world having moved on since the save (nothing by default).
    fn restored(&mut self) {}

    /// The device's part of [`restore_state`](Self::restore_state): checks its own `state` (of its type, and
    /// against its configuration) and loads it; `running` says whether queues come with it. On `Err` nothing
    /// changed.
    fn restore_device_state(&mut self, state: &VirtioDeviceState, running: bool) -> Result<(), StateError>;
}

/// What the driver set up on a device, alike for every device: the features it accepted and, from `activate` to
/// `reset`, the device's queues. Each device keeps one; [`VirtioDevice`]'s provided methods work on it.
#[derive(Default)]
pub struct DriverState {
    acked_features: u64,
    active: Option<ActiveQueues>,
}

/// A device's own state, by device type: what each keeps beside the transport's registers and its queues. Each
/// type's state is defined, saved and checked in the device's module.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VirtioDeviceState {
    Block(block::BlockState),
    Net(net::NetState),
    Rng(rng::RngState),
    Console(console::ConsoleState),
    Balloon(balloon::BalloonState),
}

impl VirtioDeviceState {
    /// The virtio device type the state belongs to.
    pub fn device_type(&self) -> u32 {
        match self {
            VirtioDeviceState::Block(_) => TYPE_BLOCK,
            VirtioDeviceState::Net(_) => TYPE_NET,
            VirtioDeviceState::Rng(_) => TYPE_RNG,
            VirtioDeviceState::Console(_) => TYPE_CONSOLE,
            VirtioDeviceState::Balloon(_) => TYPE_BALLOON,
        }
    }

    /// The refusal of a state of another device type than `device`'s.
    pub(crate) fn mismatch(&self, device: &'static str) -> StateError {
        StateError::new(
            device,
            "device",
            format!("the state is of a {}, not a {device}", device_name(self.device_type())),
        )
    }
}

/// The name a device type goes by in messages.
pub(crate) fn device_name(device_type: u32) -> &'static str {
    match device_type {
        TYPE_BLOCK => "virtio-blk",
        TYPE_NET => "virtio-net",
        TYPE_RNG => "virtio-rng",
        TYPE_CONSOLE => "virtio-console",
        TYPE_BALLOON => "virtio-balloon",
        _ => "virtio device of an unknown type",
    }
}

/// Per-cause interrupt delivery (MSI-X on PCI): a transport whose interrupts say *which* queue or the
/// configuration, rather than one line for everything.
pub trait VectorDelivery: Send + Sync {
    /// Used buffers were added to queue `index`.
    fn signal_queue(&self, index: usize);
    /// The configuration changed or the device needs a reset.
    fn signal_config(&self);
}

/// How a transport's interrupts reach the guest.
enum Delivery {
    /// One edge-triggered line for everything; the driver reads the status to learn why (virtio-mmio).
    Line(Arc<dyn InterruptLine>),
    /// A message per cause (virtio-pci with MSI-X).
    Vectors(Arc<dyn VectorDelivery>),
}

/// The interrupt and error state a transport shares with its device and queue handler: the interrupt status
/// register (what InterruptStatus/ISR read), the configuration generation, the device's NEEDS_RESET request,
/// and the way into the guest.
///
/// A line is edge-triggered (an irqfd without resample). Level semantics are emulated: a bit is set in the
/// status *before* the line is pulsed, and the transport pulses again when the driver acknowledges some bits
/// while others are still pending. A pulse the guest misses while it is already in its handler is harmless:
/// the handler reads the status and processes the used rings after acknowledging, and the used ring was updated
/// before the bit was set. Vectors need none of that: each message names its cause, and the status bits are only
/// informational.
pub struct VirtioInterrupt {
    status: AtomicU32,
    config_generation: AtomicU32,
    needs_reset: AtomicBool,
    delivery: Delivery,
}

impl VirtioInterrupt {
    /// Interrupts through one line (virtio-mmio).
    pub fn new(line: Arc<dyn InterruptLine>) -> Self {
        Self::with_delivery(Delivery::Line(line))
    }

    /// Interrupts through a vector per cause (virtio-pci with MSI-X).
    pub fn with_vectors(vectors: Arc<dyn VectorDelivery>) -> Self {
        Self::with_delivery(Delivery::Vectors(vectors))
    }

    fn with_delivery(delivery: Delivery) -> Self {
        VirtioInterrupt {
            status: AtomicU32::new(0),
            config_generation: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            delivery,
        }
    }

    /// Used buffers were added to queue `index`.
    pub fn signal_used_queue(&self, index: usize) {
        self.status.fetch_or(INT_VRING, Ordering::SeqCst);
        match &self.delivery {
            Delivery::Line(line) => Self::pulse(line),
            Delivery::Vectors(vectors) => vectors.signal_queue(index),
        }
    }

    /// The device configuration changed: bump the generation and tell the driver.
    pub fn signal_config_change(&self) {
        self.config_generation.fetch_add(1, Ordering::SeqCst);
        self.raise_config();
    }

    /// The device hit an error it cannot recover from without a reset (virtio 1.2, 2.1.2): DEVICE_NEEDS_RESET
    /// appears in the status register and the driver gets a configuration change interrupt.
    pub fn set_needs_reset(&self) {
        if !self.needs_reset.swap(true, Ordering::SeqCst) {
            self.raise_config();
        }
    }

    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// The interrupt status register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::SeqCst)
    }

    /// The driver acknowledged `bits`; pulse the line again if other bits are still pending.
    pub fn ack(&self, bits: u32) {
        let before = self.status.fetch_and(!bits, Ordering::SeqCst);
        if let (Delivery::Line(line), true) = (&self.delivery, before & !bits != 0) {
            Self::pulse(line);
        }
    }

    /// Reads and clears the status in one go (virtio-pci's ISR).
    pub fn take_status(&self) -> u32 {
        self.status.swap(0, Ordering::SeqCst)
    }

    /// Loads saved values (see [`transport::VirtioState`]) without interrupting anyone: what was pending at save
    /// time was delivered then, and lives on in the interrupt controller's or the MSI-X table's own state.
    pub(crate) fn restore(&self, status: u32, config_generation: u32, needs_reset: bool) {
        self.status.store(status, Ordering::SeqCst);
        self.config_generation.store(config_generation, Ordering::SeqCst);
        self.needs_reset.store(needs_reset, Ordering::SeqCst);
    }

    /// Device reset: nothing pending, no error.
    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }

    fn raise_config(&self) {
        self.status.fetch_or(INT_CONFIG, Ordering::SeqCst);
        match &self.delivery {
            Delivery::Line(line) => Self::pulse(line),
            Delivery::Vectors(vectors) => vectors.signal_config(),
        }
    }

    fn pulse(line: &Arc<dyn InterruptLine>) {
        // A failed trigger means the interrupt plumbing is gone (VM being torn down); nothing to deliver to.
        let _ = line.trigger();
    }
}

impl fmt::Debug for VirtioInterrupt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VirtioInterrupt")
            .field("status", &self.status())
            .field("config_generation", &self.config_generation())
            .field("needs_reset", &self.needs_reset())
            .finish()
    }
}

/// What the thread doing device work calls when queue `index`'s notification eventfd fires (after reading the
/// eventfd): process the queue, then interrupt the guest if it wants to hear about it. Cheap to clone, `Send`.
#[derive(Clone)]
pub struct QueueHandler {
    device: Arc<Mutex<dyn VirtioDevice>>,
    interrupt: Arc<VirtioInterrupt>,
}

impl QueueHandler {
    pub fn new(device: Arc<Mutex<dyn VirtioDevice>>, interrupt: Arc<VirtioInterrupt>) -> Self {
        QueueHandler { device, interrupt }
    }

    /// Processes queue `index`. Returns whether the guest was interrupted.
    ///
    /// The interrupt is raised before the device lock is released, so that a transport's `quiesce`, which takes
    /// that lock, returns with the work done and the guest told: a snapshot never holds used buffers whose
    /// interrupt comes after it.
    pub fn handle(&self, index: usize) -> bool {
        let mut device = lock_device(&self.device);
        let notify = device.process_queue(index);
        if notify {
            self.interrupt.signal_used_queue(index);
        }
        drop(device);
        notify
    }

    /// Whether queue `index` has work left over from the last [`handle`](Self::handle) (see
    /// [`VirtioDevice::has_backlog`]): the caller signals the queue's eventfd to come back to it.
    pub fn has_backlog(&self, index: usize) -> bool {
        lock_device(&self.device).has_backlog(index)
    }

    /// The device's host event sources (see [`VirtioDevice::host_event_sources`]).
    pub fn host_event_sources(&self) -> Vec<RawFd> {
        lock_device(&self.device).host_event_sources()
    }

    /// Host source `index` became readable: let the device consume it, then interrupt the guest if it wants to
    /// hear about it. Returns whether the guest was interrupted.
    pub fn handle_host_event(&self, index: usize) -> bool {
        // Signalled under the device lock, as in `handle`.
        let mut device = lock_device(&self.device);
        let used = device.process_host_event(index);
        if let Some(queue) = used {
            self.interrupt.signal_used_queue(queue);
        }
        drop(device);
        used.is_some()
    }
}

/// A device's state between `activate` and `reset`: guest memory, its queues and the shared interrupt state.
/// Devices touch their queues only through it, so it is also where a device is quiesced (see
/// [`transport::TransportState::quiesce`]) and where the queues' positions are saved and restored.
pub struct ActiveQueues {
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) queues: Vec<Queue>,
    /// Queues the driver broke (see [`ActiveQueues::process`]); they stay dead until the device is reset.
    broken: Vec<bool>,
    /// Queues whose last `process` stopped at its budget with chains still available.
    backlog: Vec<bool>,
    /// No queue work until the transport resumes the device: no chain taken, nothing written to guest memory, no
    /// interrupt. Host-side control, not state: a restored device starts quiesced.
    quiesced: bool,
    pub(crate) interrupt: Arc<VirtioInterrupt>,
}

impl ActiveQueues {
    /// `new`, for a device that runs exactly `count` queues: any other number the transport hands over is refused.
    pub(crate) fn with_count(
        count: usize,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
        acked_features: u64,
    ) -> Result<Self, ActivateError> {
        if queues.len() != count {
            return Err(ActivateError::QueueCount { got: queues.len(), need: count });
        }
        Ok(Self::new(mem, queues, interrupt, acked_features))
    }

    /// Takes the queues as the transport handed them over, with EVENT_IDX as negotiated.
    pub(crate) fn new(
        mem: GuestMemoryMmap,
        mut queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
        acked_features: u64,
    ) -> Self {
        for q in &mut queues {
            q.set_event_idx(acked_features & features::RING_EVENT_IDX != 0);
        }
        let broken = vec![false; queues.len()];
        let backlog = vec![false; queues.len()];
        ActiveQueues { mem, queues, broken, backlog, quiesced: false, interrupt }
    }

    /// The queues of a device that was running when its state was saved: `queues` at their saved positions
    /// (checked against guest memory by the transport, as for `activate`), `broken` as saved. Quiesced until the
    /// transport resumes the device.
    pub(crate) fn restored(
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        broken: Vec<bool>,
        interrupt: Arc<VirtioInterrupt>,
        acked_features: u64,
    ) -> Self {
        let mut active = Self::new(mem, queues, interrupt, acked_features);
        active.broken = broken;
        active.quiesced = true;
        active
    }

    /// Where the device is in queue `index`'s rings, if the queue is in use (ready).
    pub(crate) fn position(&self, index: usize) -> Option<transport::RingPosition> {
        let queue = self.queues.get(index).filter(|q| q.ready())?;
        Some(transport::RingPosition {
            next_avail: queue.next_avail(),
            next_used: queue.next_used(),
            broken: self.broken.get(index).copied().unwrap_or(false),
        })
    }

    pub(crate) fn set_quiesced(&mut self, quiesced: bool) {
        self.quiesced = quiesced;
    }

    /// Hands the chains the driver made available on queue `index` to `handle`, which returns the number of
    /// bytes it wrote into the chain's device-writable part, and puts them on the used ring: at most a queue's
    /// worth per call (the queue size); what is left is the queue's backlog ([`has_backlog`](Self::has_backlog)).
    /// Returns whether the driver wants an interrupt.
    ///
    /// A driver that corrupts the rings themselves (an available index running more than a queue's worth ahead,
    /// a head index outside the table, rings that stop being accessible) breaks the queue: the device asks for a
    /// reset and ignores the queue until then. Bad chains are `handle`'s business.
    pub(crate) fn process(
        &mut self,
        index: usize,
        log: &GuestErrorLog,
        mut handle: impl FnMut(&GuestMemoryMmap, virtio_queue::DescriptorChain<&GuestMemoryMmap>) -> u32,
    ) -> bool {
        let Some((queue, mem)) = self.usable(index) else { return false };
        let budget = usize::from(queue.size());
        match drain(queue, mem, budget, &mut handle) {
            Ok(Drained { notify, backlog }) => {
                self.backlog[index] = backlog;
                notify
            }
            Err(why) => self.break_queue(index, log, &why),
        }
    }

    /// Queue `index` for a device that takes chains off it only while it has something for them (receive queues,
    /// through [`pop_available`]), with guest memory: `None` when the queue does not exist, is not ready or is
    /// broken, or the device is quiesced.
    pub(crate) fn usable(&mut self, index: usize) -> Option<(&mut Queue, &GuestMemoryMmap)> {
        let usable = !self.quiesced && !self.broken.get(index).copied().unwrap_or(true);
        let queue = self.queues.get_mut(index).filter(|q| usable && q.ready())?;
        Some((queue, &self.mem))
    }

    /// The driver corrupted queue `index`'s rings (`why`): the device asks for a reset and ignores the queue until
    /// then. Returns `true`: whatever was used before the breakage is there for the driver to see, so the caller
    /// interrupts it.
    pub(crate) fn break_queue(&mut self, index: usize, log: &GuestErrorLog, why: &str) -> bool {
        log.report(format_args!("queue {index} is broken ({why}); the device needs a reset"));
        if let (Some(broken), Some(backlog)) = (self.broken.get_mut(index), self.backlog.get_mut(index)) {
            *broken = true;
            *backlog = false;
        }
        self.interrupt.set_needs_reset();
        true
    }

    /// Whether queue `index`'s last [`process`](Self::process) left available chains for later. Never while
    /// quiesced: the work waits for the transport's resume, which notifies every queue.
    pub(crate) fn has_backlog(&self, index: usize) -> bool {
        !self.quiesced && self.backlog.get(index).copied().unwrap_or(false)
    }
}

struct Drained {
    /// The driver wants an interrupt for the chains used.
    notify: bool,
    /// Chains are still available: the budget ran out first.
    backlog: bool,
}

/// Uses at most `budget` chains. With EVENT_IDX a driver adding chains as fast as they are used would otherwise
/// keep this loop going forever; stopping leaves notifications suppressed, so the caller must come back (the
/// backlog) rather than wait for a notification.
fn drain(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    mut budget: usize,
    handle: &mut impl FnMut(&GuestMemoryMmap, virtio_queue::DescriptorChain<&GuestMemoryMmap>) -> u32,
) -> Result<Drained, String> {
    use std::num::Wrapping;
    let err = |e: virtio_queue::Error| e.to_string();
    let mut used = false;
    loop {
        if queue.event_idx_enabled() {
            queue.disable_notification(mem).map_err(err)?;
        }
        let avail = queue.avail_idx(mem, Ordering::Acquire).map_err(err)?;
        let pending = (avail - Wrapping(queue.next_avail())).0;
        if pending > queue.size() {
            return Err(format!("available index {} is {pending} entries ahead", avail.0));
        }
        let take = usize::from(pending).min(budget);
        budget -= take;
        for _ in 0..take {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                return Err("available ring unreadable".into());
            };
            let head = chain.head_index();
            if head >= queue.size() {
                return Err(format!("head index {head} is outside the descriptor table"));
            }
            let len = handle(mem, chain);
            queue.add_used(mem, head, len).map_err(err)?;
            used = true;
        }
        if take < usize::from(pending) {
            let notify = used && queue.needs_notification(mem).map_err(err)?;
            return Ok(Drained { notify, backlog: true });
        }
        if !queue.event_idx_enabled() || !queue.enable_notification(mem).map_err(err)? {
            break;
        }
    }
    Ok(Drained { notify: used && queue.needs_notification(mem).map_err(err)?, backlog: false })
}

/// For a device that takes chains off `queue` only while it has something for them (receive queues): the next
/// available chain, with the ring-level checks of [`ActiveQueues::process`]. `Ok(None)` when the driver has made
/// nothing more available; the driver has then been asked to notify the next chain it adds. `Err` when the driver
/// corrupted the ring (the caller breaks the queue).
pub(crate) fn pop_available<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
) -> Result<Option<virtio_queue::DescriptorChain<&'m GuestMemoryMmap>>, String> {
    use std::num::Wrapping;
    let err = |e: virtio_queue::Error| e.to_string();
    loop {
        let avail = queue.avail_idx(mem, Ordering::Acquire).map_err(err)?;
        let ahead = (avail - Wrapping(queue.next_avail())).0;
        if ahead > queue.size() {
            return Err(format!("available index {} is {ahead} entries ahead", avail.0));
        }
        if ahead == 0 {
            // The driver may have added a chain just now; look again if so.
            if queue.enable_notification(mem).map_err(err)? {
                continue;
            }
            return Ok(None);
        }
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            return Err("available ring unreadable".into());
        };
        if chain.head_index() >= queue.size() {
            return Err(format!("head index {} is outside the descriptor table", chain.head_index()));
        }
        return Ok(Some(chain));
    }
}

/// A device whose lock was poisoned by a panicking thread is still the best state we have; keep serving it.
pub(crate) fn lock_device(device: &Mutex<dyn VirtioDevice>) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
    device.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Reports guest mistakes on stderr, the first few only: a hostile guest must not be able to flood the host log.
#[derive(Debug)]
pub(crate) struct GuestErrorLog {
    device: &'static str,
    reported: AtomicUsize,
}

const GUEST_ERRORS_REPORTED: usize = 10;

impl GuestErrorLog {
    pub(crate) const fn new(device: &'static str) -> Self {
        GuestErrorLog { device, reported: AtomicUsize::new(0) }
    }

    pub(crate) fn report(&self, what: fmt::Arguments<'_>) {
        let n = self.reported.fetch_add(1, Ordering::Relaxed);
        if n < GUEST_ERRORS_REPORTED {
            eprintln!("kestrel: {}: {what}", self.device);
        } else if n == GUEST_ERRORS_REPORTED {
            eprintln!("kestrel: {}: further guest errors will not be reported", self.device);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::CountingLine;

    #[test]
    fn ack_retriggers_while_bits_stay_pending() {
        let line = Arc::new(CountingLine::default());
        let irq = VirtioInterrupt::new(line.clone());
        irq.signal_used_queue(0);
        irq.signal_config_change();
        assert_eq!((irq.status(), line.count(), irq.config_generation()), (INT_VRING | INT_CONFIG, 2, 1));
        irq.ack(INT_VRING);
        assert_eq!((irq.status(), line.count()), (INT_CONFIG, 3));
        irq.ack(INT_CONFIG);
        assert_eq!((irq.status(), line.count()), (0, 3));
    }

    /// A driver that makes a new chain available every time one is used (EVENT_IDX, so it never has to notify)
    /// gets one queue's worth per call; the rest is the backlog, served by the next call.
    #[test]
    fn queue_work_per_call_is_bounded_by_the_queue_size() {
        use crate::virtio::testing::{guest_memory, Desc, TestQueue};
        use std::cell::RefCell;
        use vm_memory::GuestAddress;
        let mem = guest_memory(1 << 20);
        let size = 8u16;
        let ring = RefCell::new(TestQueue::new(GuestAddress(0x1000), size));
        let head = ring.borrow_mut().add_chain(&mem, &[Desc::w(0x8000, 16)]);
        let line = Arc::new(CountingLine::default());
        let features = features::COMMON;
        let mut active =
            ActiveQueues::new(mem.clone(), vec![ring.borrow().queue()], Arc::new(VirtioInterrupt::new(line)), features);
        let log = GuestErrorLog::new("test");
        let served = std::cell::Cell::new(0);
        let endless = |_: &GuestMemoryMmap, _: virtio_queue::DescriptorChain<&GuestMemoryMmap>| {
            served.set(served.get() + 1);
            ring.borrow_mut().publish(&mem, head);
            16
        };
        active.process(0, &log, endless);
        assert_eq!(served.get(), usize::from(size));
        assert!(active.has_backlog(0));
        active.process(0, &log, endless);
        assert_eq!(served.get(), 2 * usize::from(size));
        // A driver that stops adding: the backlog is worked off and the queue is idle again.
        active.process(0, &log, |_: &GuestMemoryMmap, _: virtio_queue::DescriptorChain<&GuestMemoryMmap>| 16);
        assert!(!active.has_backlog(0));
        assert!(!active.broken[0]);
    }

    /// The queue handler raises the interrupt while it holds the device lock: whoever takes that lock (a reset, a
    /// transport's quiesce) finds the work done and the guest told, never used buffers with their interrupt to come.
    #[test]
    fn queue_interrupts_are_raised_under_the_device_lock() {
        use crate::virtio::mmio::MmioTransport;
        use crate::virtio::testing::{guest_memory, Desc, MmioDriver, TestQueue};
        use std::sync::OnceLock;
        use vm_memory::GuestAddress;

        /// Records, at each interrupt, whether the device lock was held.
        #[derive(Default)]
        struct LockProbe {
            device: OnceLock<Arc<Mutex<dyn VirtioDevice>>>,
            held: Mutex<Vec<bool>>,
        }
        impl InterruptLine for LockProbe {
            fn trigger(&self) -> std::io::Result<()> {
                let held = self.device.get().is_some_and(|d| d.try_lock().is_err());
                self.held.lock().unwrap().push(held);
                Ok(())
            }
        }

        let mem = guest_memory(1 << 20);
        let probe = Arc::new(LockProbe::default());
        let device: Arc<Mutex<dyn VirtioDevice>> = Arc::new(Mutex::new(rng::Rng::new()));
        let _ = probe.device.set(device.clone());
        let mut transport = MmioTransport::new(mem.clone(), device, probe.clone()).unwrap();
        let mut ring = TestQueue::new(GuestAddress(0x1000), 16);
        MmioDriver(&mut transport).start(features::VERSION_1, &[&ring]);
        ring.add_chain(&mem, &[Desc::w(0x8000, 16)]);
        assert!(transport.queue_handler().handle(0));
        assert_eq!(*probe.held.lock().unwrap(), [true]);
    }

    #[test]
    fn needs_reset_interrupts_once() {
        let line = Arc::new(CountingLine::default());
        let irq = VirtioInterrupt::new(line.clone());
        irq.set_needs_reset();
        irq.set_needs_reset();
        assert!(irq.needs_reset());
        assert_eq!((irq.status(), line.count()), (INT_CONFIG, 1));
        irq.reset();
        assert!(!irq.needs_reset());
        assert_eq!(irq.status(), 0);
    }
}

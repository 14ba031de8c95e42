//! What every virtio transport shares (virtio 1.2, 2 and 3.1): device status, feature negotiation, per-queue
//! configuration and its validation, activation and reset, and all of that as data ([`VirtioState`]). The mmio
//! and pci transports only map their registers onto this state machine.
//!
//! # Saving a running device
//!
//! A saved device goes on, after a restore, exactly where it stopped: the chains it had taken off the available
//! rings were used and are not taken again, the chains the driver made available after them are taken once. That
//! holds because of when the state is saved:
//!
//! 1. [`quiesce`](TransportState::quiesce) the device, with the VM's vCPUs stopped. It waits for queue work in
//!    progress, the interrupt it raises included (the device lock), and from then on the device takes no chain,
//!    writes nothing to guest memory and raises no interrupt: queue notifications, the device worker's backlog, a
//!    tap's frames and console input are left where they are (in the available ring, the tap, the device's
//!    pending input).
//! 2. Save the device, then guest memory. Every Kestrel device completes a request in the same lock hold that
//!    took it off the ring (block I/O is synchronous, transmit and receive copy at once), so a quiesced device
//!    has no request in flight and needs no drain: on every queue that works, `next_used == next_avail`. The
//!    saved `next_avail` is where the device stopped; whatever the driver added behind it is in guest memory and
//!    is read again after the restore. A restore refuses a state with requests taken and not completed (a device
//!    that some day completes requests asynchronously must complete them in `quiesce`).
//! 3. After a restore (the device comes up quiesced) or to let the source run on, [`resume`](TransportState::resume)
//!    the device: it treats every queue as notified, since the notifications it left alone are gone with the
//!    host's eventfds (or were consumed while it was quiesced) and the backlog and host readiness with them.
//!
//! Derived and host-side values are not saved: each queue's EVENT_IDX setting follows from the negotiated
//! features, virtio-queue's count of used entries since the last notification decision is zero between two
//! pieces of queue work, and the backlog is the device worker's scheduling. `avail_event` and `used_event` live in
//! the rings, in guest memory.

use std::io;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vm_memory::{GuestAddress, GuestMemory, Permissions};
use vmm_sys_util::eventfd::EventFd;

use super::{device_name, ActivateError, ActiveQueues, VirtioDeviceState, VirtioInterrupt, INT_CONFIG, INT_VRING};
use super::{features, lock_device, status, GuestErrorLog, GuestMemoryMmap, Queue, QueueHandler, QueueT, VirtioDevice};
use crate::StateError;

/// A queue as the driver configures it through the registers; checked when the driver enables it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct QueueConfig {
    pub(crate) max_size: u16,
    pub(crate) size: u16,
    pub(crate) ready: bool,
    pub(crate) desc: u64,
    pub(crate) driver: u64,
    pub(crate) device: u64,
}

impl QueueConfig {
    pub(crate) fn new(max_size: u16) -> Self {
        QueueConfig { max_size, size: max_size, ..Default::default() }
    }

    /// The device-side queue, if the configuration is usable: a power-of-two size up to the maximum, rings
    /// aligned as virtio 1.2 2.7 requires and entirely inside guest memory.
    pub(crate) fn build(&self, mem: &GuestMemoryMmap) -> Result<Queue, String> {
        let mut q = Queue::new(self.max_size).map_err(|e| e.to_string())?;
        q.try_set_size(self.size).map_err(|_| format!("size {} (maximum {})", self.size, self.max_size))?;
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .map_err(|_| format!("descriptor table at {:#x} is not 16-byte aligned", self.desc))?;
        q.try_set_avail_ring_address(GuestAddress(self.driver))
            .map_err(|_| format!("available ring at {:#x} is not 2-byte aligned", self.driver))?;
        q.try_set_used_ring_address(GuestAddress(self.device))
            .map_err(|_| format!("used ring at {:#x} is not 4-byte aligned", self.device))?;
        q.set_ready(true);
        // The used ring's avail_event and the available ring's used_event fields (EVENT_IDX) are included in
        // the sizes checked here, in addition to virtio-queue's own check.
        let size = u64::from(self.size);
        let rings = [
            (self.desc, 16 * size, Permissions::Read),
            (self.driver, 6 + 2 * size, Permissions::Read),
            (self.device, 6 + 8 * size, Permissions::Write),
        ];
        for (addr, len, access) in rings {
            let inside = addr.checked_add(len).is_some() && mem.check_range(GuestAddress(addr), len as usize, access);
            if !inside {
                return Err(format!("ring at {addr:#x}+{len:#x} is outside guest memory"));
            }
        }
        if !q.is_valid(mem) {
            return Err("rings are not accessible".into());
        }
        Ok(q)
    }
}

/// Where a running device is in one queue's rings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RingPosition {
    /// The next available ring entry the device takes.
    pub next_avail: u16,
    /// The next used ring entry the device fills (the used ring's `idx` as the device last published it).
    pub next_used: u16,
    /// The driver corrupted the rings: the device ignores the queue until it is reset.
    pub broken: bool,
}

/// One virtqueue as data: the driver's configuration and, while the device runs, the device's position in it.
///
/// virtio-queue has a `QueueState` of its own; it is not used here because it has no serde support, carries the
/// device's maximum size (configuration, rebuilt by the constructor) and the EVENT_IDX setting (derived from the
/// features), lacks the broken flag Kestrel keeps beside each queue, and its `TryFrom` checks alignment and size
/// but not that the rings lie in guest memory. A restore builds each queue through the same check as activation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtqueueState {
    /// As the driver wrote it; only checked when `ready` (a driver may leave any value in a queue it never
    /// enables).
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    /// Present exactly when the device runs (`activated`) and the queue is ready.
    pub position: Option<RingPosition>,
}

/// A virtio device as data: the transport's registers, its queues, the interrupt state it shares with the
/// device, and the device's own state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtioState {
    /// The features the device offered: configuration, checked against the device restored into (a snapshot of
    /// a device with other options is refused).
    pub device_features: u64,
    /// The device status as the driver set it; DEVICE_NEEDS_RESET is `needs_reset`.
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    /// What the driver wrote; the negotiated features once FEATURES_OK is set.
    pub driver_features: u64,
    pub queue_sel: u32,
    /// The interrupt status (virtio-mmio's InterruptStatus, virtio-pci's ISR): used buffers, configuration change.
    pub interrupt_status: u32,
    pub config_generation: u32,
    /// The device asked for a reset (DEVICE_NEEDS_RESET).
    pub needs_reset: bool,
    /// The device was started (DRIVER_OK and a successful activation) and works on the rings.
    pub activated: bool,
    /// One per queue the device has.
    pub queues: Vec<VirtqueueState>,
    pub device: VirtioDeviceState,
}

/// A device's transport-independent state as the driver sets it up.
pub struct TransportState {
    device: Arc<Mutex<dyn VirtioDevice>>,
    interrupt: Arc<VirtioInterrupt>,
    mem: GuestMemoryMmap,
    pub(crate) device_type: u32,
    pub(crate) avail_features: u64,
    pub(crate) queues: Vec<QueueConfig>,
    queue_events: Vec<EventFd>,
    status: u32,
    pub(crate) device_features_sel: u32,
    pub(crate) driver_features_sel: u32,
    pub(crate) driver_features: u64,
    pub(crate) queue_sel: u32,
    log: &'static GuestErrorLog,
}

impl TransportState {
    /// The state for `device`, working on `mem` and interrupting through `interrupt`; guest mistakes go to `log`.
    pub(crate) fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        interrupt: Arc<VirtioInterrupt>,
        log: &'static GuestErrorLog,
    ) -> io::Result<Self> {
        let (device_type, avail_features, max_sizes) = {
            let d = lock_device(&device);
            (d.device_type(), d.avail_features(), d.queue_max_sizes().to_vec())
        };
        let queue_events =
            max_sizes.iter().map(|_| EventFd::new(libc::EFD_NONBLOCK)).collect::<io::Result<Vec<_>>>()?;
        Ok(TransportState {
            device,
            interrupt,
            mem,
            device_type,
            avail_features,
            queues: max_sizes.into_iter().map(QueueConfig::new).collect(),
            queue_events,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            log,
        })
    }

    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    pub fn queue_handler(&self) -> QueueHandler {
        QueueHandler::new(self.device.clone(), self.interrupt.clone())
    }

    pub fn interrupt(&self) -> &Arc<VirtioInterrupt> {
        &self.interrupt
    }

    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// The device status as the driver reads it.
    pub fn status(&self) -> u32 {
        let needs_reset = if self.interrupt.needs_reset() { status::NEEDS_RESET } else { 0 };
        self.status | needs_reset
    }

    /// The device feature word the driver selected.
    pub(crate) fn device_features(&self) -> u32 {
        match self.device_features_sel {
            0 => self.avail_features as u32,
            1 => (self.avail_features >> 32) as u32,
            _ => 0,
        }
    }

    /// The driver feature word the driver selected, as it wrote it.
    pub(crate) fn driver_features_word(&self) -> u32 {
        match self.driver_features_sel {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        }
    }

    pub(crate) fn write_driver_features(&mut self, value: u32) {
        if self.status & status::FEATURES_OK != 0 {
            self.log.report(format_args!("driver features written after FEATURES_OK; ignored"));
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32),
            // Feature bits above 63 do not exist; the driver must write zeros there.
            _ if value != 0 => self.driver_features |= 1 << 63,
            _ => {}
        }
    }

    pub(crate) fn selected_queue(&self) -> Option<&QueueConfig> {
        self.queues.get(self.queue_sel as usize)
    }

    /// Changes the selected queue's configuration while that is allowed: the driver is setting the device up
    /// and the queue is not enabled. Otherwise (or with no such queue) the write is dropped.
    pub(crate) fn configure_selected_queue(&mut self, change: impl FnOnce(&mut QueueConfig)) {
        let writable = self.status & (status::DRIVER_OK | status::FAILED) == 0;
        if let Some(q) = self.queues.get_mut(self.queue_sel as usize).filter(|q| writable && !q.ready) {
            change(q);
        }
    }

    /// The driver (dis)enables the selected queue; an unusable configuration is refused with NEEDS_RESET.
    pub(crate) fn write_queue_ready(&mut self, value: u32) {
        if self.status & status::DRIVER_OK != 0 {
            // Per-queue reset (VIRTIO_F_RING_RESET) is not offered; the queue set is fixed once the device runs.
            return;
        }
        let index = self.queue_sel;
        let Some(q) = self.queues.get_mut(index as usize) else { return };
        if value == 0 {
            q.ready = false;
            return;
        }
        match q.build(&self.mem) {
            Ok(_) => q.ready = true,
            Err(why) => {
                self.log.report(format_args!("queue {index} refused: {why}"));
                q.ready = false;
                self.interrupt.set_needs_reset();
            }
        }
    }

    /// The driver's notification for queue `index` that did not go through an ioeventfd.
    pub(crate) fn notify(&self, index: usize) {
        if let Some(evt) = self.queue_events.get(index) {
            let _ = evt.write(1);
        }
    }

    pub(crate) fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if value & old != old {
            self.log.report(format_args!("status {value:#x} clears bits of {old:#x} without a reset; ignored"));
            return;
        }
        let mut new = value & !old & !status::NEEDS_RESET;
        if new & status::FEATURES_OK != 0 && !self.features_acceptable(value) {
            new &= !status::FEATURES_OK;
        }
        let features_ok = (old | new) & status::FEATURES_OK != 0;
        if new & status::DRIVER_OK != 0 && !features_ok {
            self.log.report(format_args!("DRIVER_OK without FEATURES_OK; refused"));
            new &= !status::DRIVER_OK;
        }
        if new & status::DRIVER_OK != 0 && (old | new) & status::FAILED != 0 {
            new &= !status::DRIVER_OK;
        }
        self.status = old | new;
        if new & status::DRIVER_OK != 0 {
            if let Err(e) = self.activate() {
                self.log.report(format_args!("device activation failed: {e}"));
                self.interrupt.set_needs_reset();
            }
        }
    }

    /// Whether the driver may set FEATURES_OK now: DRIVER set, only offered features, VERSION_1 among them
    /// (modern only). If so, the device learns the features.
    fn features_acceptable(&mut self, value: u32) -> bool {
        if value & status::DRIVER == 0 {
            self.log.report(format_args!("FEATURES_OK without DRIVER; refused"));
            return false;
        }
        let unknown = self.driver_features & !self.avail_features;
        if unknown != 0 {
            self.log.report(format_args!("driver accepted features {unknown:#x} that were not offered; refused"));
            return false;
        }
        if self.driver_features & features::VERSION_1 == 0 {
            self.log
                .report(format_args!("driver did not accept VIRTIO_F_VERSION_1 (legacy drivers are not supported)"));
            return false;
        }
        lock_device(&self.device).ack_features(self.driver_features);
        true
    }

    fn activate(&mut self) -> Result<(), ActivateError> {
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, config) in self.queues.iter().enumerate() {
            if config.ready {
                queues.push(config.build(&self.mem).map_err(|_| ActivateError::BadQueue(i))?);
            } else {
                queues.push(Queue::new(config.max_size).map_err(|_| ActivateError::BadQueue(i))?);
            }
        }
        lock_device(&self.device).activate(self.mem.clone(), queues, self.interrupt.clone())
    }

    /// Stops the device's work on guest memory until [`resume`](Self::resume), for a consistent snapshot (see the
    /// module documentation). Returns once queue work in progress is done: it takes the device lock.
    pub fn quiesce(&self) {
        if let Some(active) = lock_device(&self.device).active_queues_mut() {
            active.set_quiesced(true);
        }
    }

    /// Lets a quiesced or restored device work again, as if the driver had notified every queue.
    pub fn resume(&self) {
        if let Some(active) = lock_device(&self.device).active_queues_mut() {
            active.set_quiesced(false);
        }
        for evt in &self.queue_events {
            // A full counter (EAGAIN) is a notification already there.
            let _ = evt.write(1);
        }
    }

    /// The state as data. Takes the device lock; see the module documentation for when to call it.
    pub(crate) fn save(&self) -> VirtioState {
        let device = lock_device(&self.device);
        let active = device.active_queues();
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| VirtqueueState {
                size: q.size,
                ready: q.ready,
                desc_table: q.desc,
                avail_ring: q.driver,
                used_ring: q.device,
                position: active.and_then(|a| a.position(i)),
            })
            .collect();
        VirtioState {
            device_features: self.avail_features,
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status(),
            config_generation: self.interrupt.config_generation(),
            needs_reset: self.interrupt.needs_reset(),
            activated: active.is_some(),
            queues,
            device: device.save_state(),
        }
    }

    /// Loads `state` into this transport and its device, checked first against what a driver can bring about
    /// through the registers and against this device and guest memory (the rings of ready queues as when the
    /// driver enabled them). All or nothing; no interrupt, no notification; a running device comes up quiesced.
    pub(crate) fn restore(&mut self, state: &VirtioState) -> Result<(), StateError> {
        let device = device_name(self.device_type);
        let error = |field: String, problem: String| StateError::new(device, field, problem);
        if state.device_features != self.avail_features {
            let problem = format!(
                "{:#x} offered in the snapshot, this device offers {:#x} (other device options?)",
                state.device_features, self.avail_features
            );
            return Err(error("device_features".into(), problem));
        }
        if state.device.device_type() != self.device_type {
            return Err(state.device.mismatch(device));
        }
        if state.queues.len() != self.queues.len() {
            let problem = format!("{} in the snapshot, this device has {}", state.queues.len(), self.queues.len());
            return Err(error("queues".into(), problem));
        }
        self.check_status(state)?;
        if state.interrupt_status & !(INT_VRING | INT_CONFIG) != 0 {
            return Err(error("interrupt_status".into(), format!("{:#x} has unknown bits", state.interrupt_status)));
        }
        let mut configs = Vec::with_capacity(self.queues.len());
        let mut queues = Vec::with_capacity(self.queues.len());
        let mut broken = Vec::with_capacity(self.queues.len());
        for (i, (saved, current)) in state.queues.iter().zip(&self.queues).enumerate() {
            let config = QueueConfig {
                max_size: current.max_size,
                size: saved.size,
                ready: saved.ready,
                desc: saved.desc_table,
                driver: saved.avail_ring,
                device: saved.used_ring,
            };
            let queue = if saved.ready {
                let mut queue = config.build(&self.mem).map_err(|why| error(format!("queues[{i}]"), why))?;
                match (saved.position, state.activated) {
                    (Some(position), true) => {
                        if !position.broken && position.next_avail != position.next_used {
                            let problem = format!(
                                "next_avail {} and next_used {}: requests taken and not completed (a device is \
                                 saved quiesced, with every request it took completed)",
                                position.next_avail, position.next_used
                            );
                            return Err(error(format!("queues[{i}].position"), problem));
                        }
                        queue.set_next_avail(position.next_avail);
                        queue.set_next_used(position.next_used);
                        broken.push(position.broken);
                    }
                    (None, true) => {
                        return Err(error(format!("queues[{i}].position"), "missing, the queue is in use".into()))
                    }
                    (Some(_), false) => {
                        return Err(error(format!("queues[{i}].position"), "present, the device is not running".into()))
                    }
                    (None, false) => broken.push(false),
                }
                queue
            } else {
                if saved.position.is_some() {
                    return Err(error(format!("queues[{i}].position"), "present for a queue that is not ready".into()));
                }
                broken.push(false);
                Queue::new(current.max_size).map_err(|e| error(format!("queues[{i}]"), e.to_string()))?
            };
            configs.push(config);
            queues.push(queue);
        }
        let features_ok = state.status & status::FEATURES_OK != 0;
        let acked_features = if features_ok { state.driver_features } else { 0 };
        let active = state
            .activated
            .then(|| ActiveQueues::restored(self.mem.clone(), queues, broken, self.interrupt.clone(), acked_features));
        // The last check, the device's own; from here on nothing fails.
        lock_device(&self.device).restore_state(&state.device, acked_features, active)?;
        self.status = state.status;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        self.queues = configs;
        self.interrupt.restore(state.interrupt_status, state.config_generation, state.needs_reset);
        Ok(())
    }

    /// The status and features as only `write_status` could have left them: bits never cleared but by a reset,
    /// FEATURES_OK only with DRIVER and features the device offered, VERSION_1 among them, DRIVER_OK only after
    /// FEATURES_OK, and a running device only with DRIVER_OK (DRIVER_OK without one: the activation failed and the
    /// device asked for a reset).
    fn check_status(&self, state: &VirtioState) -> Result<(), StateError> {
        let device = device_name(self.device_type);
        let refuse = |field: &str, problem: String| Err(StateError::new(device, field, problem));
        let s = state.status;
        if s & status::NEEDS_RESET != 0 {
            return refuse("status", format!("{s:#x}: DEVICE_NEEDS_RESET is the device's, saved as needs_reset"));
        }
        if s & status::FEATURES_OK != 0 && s & status::DRIVER == 0 {
            return refuse("status", format!("{s:#x}: FEATURES_OK without DRIVER"));
        }
        if s & status::DRIVER_OK != 0 && s & status::FEATURES_OK == 0 {
            return refuse("status", format!("{s:#x}: DRIVER_OK without FEATURES_OK"));
        }
        if s & status::FEATURES_OK != 0 {
            let unknown = state.driver_features & !self.avail_features;
            if unknown != 0 {
                let problem = format!("{unknown:#x} accepted at FEATURES_OK, and this device does not offer them");
                return refuse("driver_features", problem);
            }
            if state.driver_features & features::VERSION_1 == 0 {
                return refuse("driver_features", "VERSION_1 not accepted at FEATURES_OK".into());
            }
        }
        match (state.activated, s & status::DRIVER_OK != 0) {
            (true, false) => refuse("activated", format!("a running device without DRIVER_OK (status {s:#x})")),
            (false, true) if !state.needs_reset => {
                refuse("activated", "DRIVER_OK, yet the device neither runs nor asked for a reset".into())
            }
            _ => Ok(()),
        }
    }

    /// Back to the power-on state (virtio 1.2, 2.4), as when the driver writes 0 to the status register or the
    /// machine resets. The device lock is held while the device drops its queues, so queue work in progress on
    /// another thread finishes first, and none starts on the old queues afterwards.
    pub fn reset(&mut self) {
        lock_device(&self.device).reset();
        self.interrupt.reset();
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max_size);
        }
        for evt in &self.queue_events {
            // Drop notifications for the old queues; EAGAIN when there were none.
            let _ = evt.read();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use vm_memory::GuestAddress;

    use super::*;
    use crate::persist::testing::{assert_refused, fuzz_restore, through_json};
    use crate::virtio::mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET, STATUS};
    use crate::virtio::rng::Rng;
    use crate::virtio::testing::{guest_memory, CountingLine, Desc, MmioDriver, TestQueue};
    use crate::virtio::{VirtioDeviceState, INT_VRING};
    use crate::Persist;

    const MEM: usize = 1 << 20;
    const FEATURES: u64 = features::VERSION_1 | features::RING_EVENT_IDX;

    fn rng_transport(mem: &GuestMemoryMmap) -> (MmioTransport, Arc<CountingLine>) {
        let line = CountingLine::new();
        (MmioTransport::new(mem.clone(), Arc::new(Mutex::new(Rng::new())), line.clone()).unwrap(), line)
    }

    /// The driver's chains as the device used them: (head, length), in used-ring order.
    fn used(ring: &mut TestQueue, mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
        std::iter::from_fn(|| ring.pop_used(mem)).collect()
    }

    /// A running virtio-rng that served three requests, with two more made available while it was quiesced, and
    /// its state saved: what a snapshot of it holds.
    struct Saved {
        mem: GuestMemoryMmap,
        ring: TestQueue,
        source: MmioTransport,
        state: VirtioState,
        /// Heads of the chains available and not yet taken.
        waiting: Vec<u16>,
    }

    fn saved_with_requests_waiting() -> Saved {
        let mem = guest_memory(MEM);
        let mut ring = TestQueue::new(GuestAddress(0x8_0000), 16);
        let (mut source, _) = rng_transport(&mem);
        assert_ne!(MmioDriver(&mut source).start(FEATURES, &[&ring]) & status::DRIVER_OK, 0);
        for i in 0..3 {
            ring.add_chain(&mem, &[Desc::w(0x1_0000 + 0x100 * i, 16)]);
        }
        assert!(source.queue_handler().handle(0));
        assert_eq!(used(&mut ring, &mem).len(), 3);
        // The driver saw them and wants an interrupt for the next one.
        ring.set_used_event(&mem, 3);
        source.quiesce();
        let waiting =
            vec![ring.add_chain(&mem, &[Desc::w(0x2_0000, 32)]), ring.add_chain(&mem, &[Desc::w(0x3_0000, 8)])];
        // The driver notifies and the worker wakes, as without a quiesce.
        MmioDriver(&mut source).write(QUEUE_NOTIFY_OFFSET, 0);
        assert_eq!(source.queue_events()[0].read().unwrap(), 1);
        assert!(!source.queue_handler().handle(0), "a quiesced device leaves the notified chains alone");
        assert!(!source.queue_handler().has_backlog(0), "and does not come back for them by itself");
        assert_eq!(ring.used_idx(&mem), 3);
        let state = through_json(&source.save());
        Saved { mem, ring, source, state, waiting }
    }

    #[test]
    fn a_restored_device_takes_each_waiting_request_once_and_goes_on() {
        let Saved { mem, mut ring, mut source, state, waiting } = saved_with_requests_waiting();
        let position = state.queues[0].position.unwrap();
        assert_eq!((position.next_avail, position.next_used, position.broken), (3, 3, false));
        assert!(state.activated);
        assert_eq!(state.device, VirtioDeviceState::Rng(crate::virtio::rng::RngState {}));

        let (mut restored, line) = rng_transport(&mem);
        restored.restore(&state).unwrap();
        assert_eq!(restored.save(), state, "what was loaded saves the same");
        assert_eq!(line.count(), 0, "a restore raises no interrupt");
        assert!(restored.queue_events()[0].read().is_err(), "nor notifies a queue");
        assert_eq!(MmioDriver(&mut restored).registers(1, 0), MmioDriver(&mut source).registers(1, 0));
        assert!(!restored.queue_handler().handle(0), "restored quiesced: no work before resume");

        restored.resume();
        assert_eq!(restored.queue_events()[0].read().unwrap(), 1, "resume counts as a notification");
        assert!(restored.queue_handler().handle(0));
        let heads: Vec<u32> = used(&mut ring, &mem).iter().map(|u| u.0).collect();
        assert_eq!(heads, waiting.iter().map(|&h| u32::from(h)).collect::<Vec<_>>(), "each waiting chain once");
        assert_eq!(ring.used_idx(&mem), 5, "nothing taken twice, nothing lost");
        assert_eq!(MmioDriver(&mut restored).read(crate::virtio::mmio::INTERRUPT_STATUS), INT_VRING);
        assert_eq!(line.count(), 1);
        // And on: the next request, EVENT_IDX and all.
        let next = ring.add_chain(&mem, &[Desc::w(0x4_0000, 4)]);
        assert!(!restored.queue_handler().handle(0), "the driver asked for an interrupt after entry 3, not 5");
        assert_eq!(used(&mut ring, &mem), vec![(u32::from(next), 4)]);
        ring.set_used_event(&mem, 6);
        let next = ring.add_chain(&mem, &[Desc::w(0x4_0000, 4)]);
        assert!(restored.queue_handler().handle(0));
        assert_eq!(used(&mut ring, &mem), vec![(u32::from(next), 4)]);
    }

    #[test]
    fn the_source_resumes_where_it_was_quiesced() {
        let Saved { mem, mut ring, source, waiting, .. } = saved_with_requests_waiting();
        source.resume();
        assert_eq!(source.queue_events()[0].read().unwrap(), 1);
        assert!(source.queue_handler().handle(0));
        assert_eq!(used(&mut ring, &mem).len(), waiting.len());
    }

    #[test]
    fn a_device_saved_while_the_driver_sets_it_up_is_started_by_the_driver_after_restore() {
        let mem = guest_memory(MEM);
        let mut ring = TestQueue::new(GuestAddress(0x8_0000), 16);
        let (mut source, _) = rng_transport(&mem);
        MmioDriver(&mut source).negotiate(FEATURES);
        assert!(MmioDriver(&mut source).set_up_queue(0, &ring));
        let state = through_json(&source.save());
        assert!(!state.activated && state.queues[0].ready && state.queues[0].position.is_none());

        let (mut restored, _) = rng_transport(&mem);
        restored.restore(&state).unwrap();
        let mut driver = MmioDriver(&mut restored);
        let s = driver.read(STATUS);
        driver.write(STATUS, s | status::DRIVER_OK);
        assert_ne!(driver.read(STATUS) & status::DRIVER_OK, 0);
        let head = ring.add_chain(&mem, &[Desc::w(0x1_0000, 16)]);
        assert!(restored.queue_handler().handle(0));
        assert_eq!(used(&mut ring, &mem), vec![(u32::from(head), 16)]);
    }

    #[test]
    fn a_broken_queue_stays_broken_and_a_power_on_state_loads() {
        let mem = guest_memory(MEM);
        let ring = TestQueue::new(GuestAddress(0x8_0000), 16);
        let (mut source, _) = rng_transport(&mem);
        MmioDriver(&mut source).start(FEATURES, &[&ring]);
        ring.set_avail_idx(&mem, 1000);
        source.queue_handler().handle(0);
        let state = through_json(&source.save());
        assert!(state.needs_reset && state.queues[0].position.unwrap().broken);
        let (mut restored, _) = rng_transport(&mem);
        restored.restore(&state).unwrap();
        restored.resume();
        ring.set_avail_idx(&mem, 1);
        assert!(!restored.queue_handler().handle(0), "the queue stays dead until reset");
        assert_ne!(restored.status() & status::NEEDS_RESET, 0);
        // The power-on state of a fresh transport loads into a used one, which is then as fresh.
        let (fresh, _) = rng_transport(&mem);
        restored.restore(&fresh.save()).unwrap();
        assert_eq!(restored.save(), fresh.save());
        assert_eq!(restored.status(), 0);
    }

    #[test]
    fn bad_states_are_refused_and_change_nothing() {
        let Saved { mem, state: good, .. } = saved_with_requests_waiting();
        let (mut target, line) = rng_transport(&mem);
        let bad = |change: &dyn Fn(&mut VirtioState)| {
            let mut state = good.clone();
            change(&mut state);
            state
        };
        let queue = |change: &dyn Fn(&mut VirtqueueState)| bad(&|s| change(&mut s.queues[0]));
        // Rings the driver could not have enabled.
        assert_refused(&mut target, &queue(&|q| q.size = 12), "queues[0]");
        assert_refused(&mut target, &queue(&|q| q.size = 512), "queues[0]");
        assert_refused(&mut target, &queue(&|q| q.size = 0), "queues[0]");
        assert_refused(&mut target, &queue(&|q| q.desc_table = 1 << 40), "queues[0]");
        assert_refused(&mut target, &queue(&|q| q.used_ring = MEM as u64 - 8), "queues[0]");
        assert_refused(&mut target, &queue(&|q| q.avail_ring = u64::MAX - 1), "queues[0]");
        assert_refused(&mut target, &queue(&|q| q.desc_table += 8), "queues[0]");
        assert_refused(&mut target, &queue(&|q| q.used_ring += 2), "queues[0]");
        // Positions that do not fit the device's state.
        assert_refused(&mut target, &queue(&|q| q.position = None), "queues[0].position");
        let taken = |q: &mut VirtqueueState| q.position.as_mut().unwrap().next_avail += 1;
        assert_refused(&mut target, &queue(&taken), "queues[0].position");
        assert_refused(&mut target, &bad(&|s| s.activated = false), "activated");
        let failed_start = |s: &mut VirtioState| {
            s.activated = false;
            s.needs_reset = true;
        };
        assert_refused(&mut target, &bad(&failed_start), "queues[0].position");
        assert_refused(&mut target, &queue(&|q| q.ready = false), "queues[0].position");
        // Status and features no driver could have brought about.
        assert_refused(&mut target, &bad(&|s| s.driver_features |= 1 << 40), "driver_features");
        assert_refused(&mut target, &bad(&|s| s.driver_features &= !features::VERSION_1), "driver_features");
        assert_refused(&mut target, &bad(&|s| s.status &= !status::FEATURES_OK), "status");
        assert_refused(&mut target, &bad(&|s| s.status &= !status::DRIVER), "status");
        assert_refused(&mut target, &bad(&|s| s.status |= status::NEEDS_RESET), "status");
        assert_refused(&mut target, &bad(&|s| s.status &= !status::DRIVER_OK), "activated");
        let not_started = |s: &mut VirtioState| {
            s.activated = false;
            s.queues[0].position = None;
        };
        assert_refused(&mut target, &bad(&not_started), "activated");
        assert_refused(&mut target, &bad(&|s| s.interrupt_status = 4), "interrupt_status");
        // Another device, or this one with other options.
        assert_refused(&mut target, &bad(&|s| s.queues.push(s.queues[0].clone())), "queues");
        assert_refused(&mut target, &bad(&|s| s.queues.clear()), "queues");
        assert_refused(&mut target, &bad(&|s| s.device_features |= 1 << 5), "device_features");
        let console = VirtioDeviceState::Console(crate::virtio::console::ConsoleState {
            pending_input: vec![],
            ports: vec![],
            control: vec![],
        });
        assert_refused(&mut target, &bad(&|s| s.device = console.clone()), "device");
        // Refused before a byte of it is read: fields from elsewhere, device types from elsewhere.
        let json = serde_json::to_string(&good).unwrap();
        for unknown in [
            json.replacen("\"queue_sel\"", "\"shm_sel\":0,\"queue_sel\"", 1),
            json.replacen("\"next_avail\"", "\"num_added\":0,\"next_avail\"", 1),
            json.replacen("\"Rng\":{}", "\"Rng\":{\"seed\":1}", 1),
            json.replacen("\"Rng\"", "\"Balloon\"", 1),
        ] {
            assert_ne!(unknown, json);
            assert!(serde_json::from_str::<VirtioState>(&unknown).is_err(), "{unknown}");
        }
        assert_eq!(line.count(), 0, "refusals raise nothing");
        // A destination with less guest memory than the rings need.
        let (mut small, _) = rng_transport(&guest_memory(256 << 10));
        assert_refused(&mut small, &good, "queues[0]");
    }

    #[test]
    fn a_device_restored_over_a_running_one_replaces_its_queues() {
        let Saved { mem, mut ring, state, .. } = saved_with_requests_waiting();
        // A target that already runs, on other rings, at other positions.
        let (mut target, _) = rng_transport(&mem);
        let mut other = TestQueue::new(GuestAddress(0x4_0000), 8);
        MmioDriver(&mut target).start(features::VERSION_1, &[&other]);
        other.add_chain(&mem, &[Desc::w(0x5_0000, 8)]);
        assert!(target.queue_handler().handle(0));
        target.restore(&state).unwrap();
        target.resume();
        assert!(target.queue_handler().handle(0));
        assert_eq!(used(&mut ring, &mem).len(), 2, "the two waiting on the saved rings");
        assert_eq!(ring.used_idx(&mem), 5);
        assert_eq!(other.used_idx(&mem), 1, "the target's old rings are left alone");
    }

    #[test]
    fn mutated_states_never_panic() {
        let Saved { mem, state, .. } = saved_with_requests_waiting();
        let exercise = |t: &mut MmioTransport| {
            t.resume();
            t.queue_handler().handle(0);
            let mut driver = MmioDriver(t);
            driver.registers(2, 16);
            driver.write(crate::virtio::mmio::INTERRUPT_ACK, 3);
            driver.write(STATUS, 0xff);
            t.quiesce();
        };
        let counts = fuzz_restore(|| rng_transport(&mem).0, &state, exercise, 3000);
        assert!(counts.loaded > 100 && counts.refused > 100 && counts.unparsable > 100, "{counts:?}");
    }
}

//! What every virtio transport shares (virtio 1.2, 2 and 3.1): device status, feature negotiation, per-queue
//! configuration and its validation, activation and reset. The mmio and pci transports only map their registers
//! onto this state machine.

use std::io;
use std::sync::{Arc, Mutex};

use vm_memory::{GuestAddress, GuestMemory, Permissions};
use vmm_sys_util::eventfd::EventFd;

use super::{features, lock_device, status, GuestErrorLog, GuestMemoryMmap, Queue, QueueHandler, QueueT, VirtioDevice};
use super::{ActivateError, VirtioInterrupt};

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

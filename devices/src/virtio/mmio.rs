//! The virtio-mmio transport, version 2 ("modern", virtio 1.2, 4.2.2): a page of registers on the MMIO bus.
//!
//! # Wiring (for the VMM)
//!
//! * Put the transport on the MMIO bus at `base` with length [`MMIO_LEN`], and announce `base`, [`MMIO_LEN`] and
//!   the interrupt (ACPI `LNRO0005` on x86, an FDT `virtio,mmio` node on arm).
//! * Interrupt: the `InterruptLine` given to [`MmioTransport::new`] is an irqfd on an edge-triggered GSI.
//!   See [`VirtioInterrupt`] for how level semantics are kept (status bit before pulse, re-pulse on partial ack).
//! * Notifications: for each `(i, evt)` in [`MmioTransport::queue_events`], register `evt` as an ioeventfd on
//!   `base + QUEUE_NOTIFY_OFFSET`, 4 bytes, datamatch `i as u32`. Writes that reach the bus anyway (no ioeventfd,
//!   or a value no ioeventfd matched) signal the same eventfd, so the device thread has one source per queue.
//! * Device work: watch the same eventfds on the event loop; when `evt` of queue `i` is readable, `evt.read()` it
//!   and call [`QueueHandler::handle`]`(i)` on the handler from [`MmioTransport::queue_handler`] (it interrupts
//!   the guest when needed). Spurious wake-ups (before activation, after reset) are harmless.

use std::io;
use std::sync::{Arc, Mutex};

use vm_memory::{GuestAddress, GuestMemory, Permissions};
use vmm_sys_util::eventfd::EventFd;

use super::{features, lock_device, status, GuestErrorLog, GuestMemoryMmap, Queue, QueueHandler, QueueT, VirtioDevice};
use super::{ActivateError, VirtioInterrupt};
use crate::{BusDevice, InterruptLine};

/// The size of a transport's MMIO window: registers up to 0x100, device configuration after.
pub const MMIO_LEN: u64 = 0x1000;
/// Where the driver writes a queue index to notify the device.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

pub const MAGIC: u32 = 0x7472_6976; // "virt"
pub const VERSION: u32 = 2;
/// Vendor id "KSTL".
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"KSTL");

const MAGIC_VALUE: u64 = 0x000;
const VERSION_REG: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const VENDOR_ID_REG: u64 = 0x00c;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const INTERRUPT_STATUS: u64 = 0x060;
const INTERRUPT_ACK: u64 = 0x064;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_DESC_HIGH: u64 = 0x084;
const QUEUE_DRIVER_LOW: u64 = 0x090;
const QUEUE_DRIVER_HIGH: u64 = 0x094;
const QUEUE_DEVICE_LOW: u64 = 0x0a0;
const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const SHM_SEL: u64 = 0x0ac;
const SHM_LEN_LOW: u64 = 0x0b0;
const SHM_BASE_HIGH: u64 = 0x0bc;
const CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG: u64 = 0x100;

static LOG: GuestErrorLog = GuestErrorLog::new("virtio-mmio");

/// A queue as the driver configures it through the registers; checked when the driver enables it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct QueueConfig {
    max_size: u16,
    size: u16,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        QueueConfig { max_size, size: max_size, ..Default::default() }
    }

    /// The device-side queue, if the configuration is usable: a power-of-two size up to the maximum, rings
    /// aligned as virtio 1.2 2.7 requires and entirely inside guest memory.
    fn build(&self, mem: &GuestMemoryMmap) -> Result<Queue, String> {
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

pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    interrupt: Arc<VirtioInterrupt>,
    mem: GuestMemoryMmap,
    device_type: u32,
    avail_features: u64,
    queues: Vec<QueueConfig>,
    queue_events: Vec<EventFd>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
}

impl MmioTransport {
    /// A transport for `device`, which works on `mem` and interrupts the guest through `line`.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        line: Arc<dyn InterruptLine>,
    ) -> io::Result<Self> {
        let (device_type, avail_features, max_sizes) = {
            let d = lock_device(&device);
            (d.device_type(), d.avail_features(), d.queue_max_sizes().to_vec())
        };
        let queue_events =
            max_sizes.iter().map(|_| EventFd::new(libc::EFD_NONBLOCK)).collect::<io::Result<Vec<_>>>()?;
        Ok(MmioTransport {
            device,
            interrupt: Arc::new(VirtioInterrupt::new(line)),
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
        })
    }

    /// One eventfd per queue, in queue order: register each as an ioeventfd on `base + QUEUE_NOTIFY_OFFSET` with
    /// its index as datamatch, and watch it on the thread that runs [`QueueHandler::handle`].
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// What the device thread calls when a queue's eventfd fires.
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

    fn selected_queue(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            MAGIC_VALUE => MAGIC,
            VERSION_REG => VERSION,
            DEVICE_ID => self.device_type,
            VENDOR_ID_REG => VENDOR_ID,
            DEVICE_FEATURES => match self.device_features_sel {
                0 => self.avail_features as u32,
                1 => (self.avail_features >> 32) as u32,
                _ => 0,
            },
            QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size)),
            QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready)),
            INTERRUPT_STATUS => self.interrupt.status(),
            STATUS => self.status(),
            QUEUE_DESC_LOW => queue.map_or(0, |q| q.desc as u32),
            QUEUE_DESC_HIGH => queue.map_or(0, |q| (q.desc >> 32) as u32),
            QUEUE_DRIVER_LOW => queue.map_or(0, |q| q.driver as u32),
            QUEUE_DRIVER_HIGH => queue.map_or(0, |q| (q.driver >> 32) as u32),
            QUEUE_DEVICE_LOW => queue.map_or(0, |q| q.device as u32),
            QUEUE_DEVICE_HIGH => queue.map_or(0, |q| (q.device >> 32) as u32),
            // No shared memory regions: their length reads as -1.
            SHM_LEN_LOW..=SHM_BASE_HIGH => u32::MAX,
            CONFIG_GENERATION => self.interrupt.config_generation(),
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_sel = value,
            DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            DRIVER_FEATURES => {
                if self.status & status::FEATURES_OK != 0 {
                    LOG.report(format_args!("driver features written after FEATURES_OK; ignored"));
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
            QUEUE_SEL => self.queue_sel = value,
            QUEUE_NUM | QUEUE_DESC_LOW..=QUEUE_DEVICE_HIGH if self.queue_writable() => {
                let Some(q) = self.selected_queue() else { return };
                let set_low = |r: &mut u64| *r = (*r & !0xffff_ffff) | u64::from(value);
                let set_high = |r: &mut u64| *r = (*r & 0xffff_ffff) | (u64::from(value) << 32);
                match offset {
                    QUEUE_NUM => q.size = u16::try_from(value).unwrap_or(0),
                    QUEUE_DESC_LOW => set_low(&mut q.desc),
                    QUEUE_DESC_HIGH => set_high(&mut q.desc),
                    QUEUE_DRIVER_LOW => set_low(&mut q.driver),
                    QUEUE_DRIVER_HIGH => set_high(&mut q.driver),
                    QUEUE_DEVICE_LOW => set_low(&mut q.device),
                    QUEUE_DEVICE_HIGH => set_high(&mut q.device),
                    _ => {}
                }
            }
            QUEUE_READY => self.write_queue_ready(value),
            // Datamatch on the ioeventfd makes the VMM's path identical: one eventfd per queue.
            QUEUE_NOTIFY_OFFSET => {
                if let Some(evt) = self.queue_events.get(value as usize) {
                    let _ = evt.write(1);
                }
            }
            INTERRUPT_ACK => self.interrupt.ack(value),
            STATUS => self.write_status(value),
            SHM_SEL => {}
            _ => {}
        }
    }

    /// Queue registers take writes while the driver sets up the device and the selected queue is not enabled.
    fn queue_writable(&self) -> bool {
        self.status & (status::DRIVER_OK | status::FAILED) == 0
            && self.queues.get(self.queue_sel as usize).is_some_and(|q| !q.ready)
    }

    fn write_queue_ready(&mut self, value: u32) {
        if self.status & status::DRIVER_OK != 0 {
            // Per-queue reset (VIRTIO_F_RING_RESET) is not offered; the queue set is fixed once the device runs.
            return;
        }
        let index = self.queue_sel;
        let mem = self.mem.clone();
        let Some(q) = self.selected_queue() else { return };
        if value == 0 {
            q.ready = false;
            return;
        }
        match q.build(&mem) {
            Ok(_) => q.ready = true,
            Err(why) => {
                LOG.report(format_args!("queue {index} refused: {why}"));
                q.ready = false;
                self.interrupt.set_needs_reset();
            }
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if value & old != old {
            LOG.report(format_args!("status {value:#x} clears bits of {old:#x} without a reset; ignored"));
            return;
        }
        let mut new = value & !old & !status::NEEDS_RESET;
        if new & status::FEATURES_OK != 0 && !self.features_acceptable(value) {
            new &= !status::FEATURES_OK;
        }
        let features_ok = (old | new) & status::FEATURES_OK != 0;
        if new & status::DRIVER_OK != 0 && !features_ok {
            LOG.report(format_args!("DRIVER_OK without FEATURES_OK; refused"));
            new &= !status::DRIVER_OK;
        }
        if new & status::DRIVER_OK != 0 && (old | new) & status::FAILED != 0 {
            new &= !status::DRIVER_OK;
        }
        self.status = old | new;
        if new & status::DRIVER_OK != 0 {
            if let Err(e) = self.activate() {
                LOG.report(format_args!("device activation failed: {e}"));
                self.interrupt.set_needs_reset();
            }
        }
    }

    /// Whether the driver may set FEATURES_OK now: DRIVER set, only offered features, VERSION_1 among them
    /// (this transport is modern only). If so, the device learns the features.
    fn features_acceptable(&mut self, value: u32) -> bool {
        if value & status::DRIVER == 0 {
            LOG.report(format_args!("FEATURES_OK without DRIVER; refused"));
            return false;
        }
        let unknown = self.driver_features & !self.avail_features;
        if unknown != 0 {
            LOG.report(format_args!("driver accepted features {unknown:#x} that were not offered; refused"));
            return false;
        }
        if self.driver_features & features::VERSION_1 == 0 {
            LOG.report(format_args!("driver did not accept VIRTIO_F_VERSION_1 (legacy drivers are not supported)"));
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

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG {
            lock_device(&self.device).read_config(offset - CONFIG, data);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        } else {
            LOG.report(format_args!("{}-byte register read at {offset:#x} ignored", data.len()));
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG {
            lock_device(&self.device).write_config(offset - CONFIG, data);
        } else if let (Ok(bytes), true) = (<[u8; 4]>::try_from(data), offset.is_multiple_of(4)) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        } else {
            LOG.report(format_args!("{}-byte register write at {offset:#x} ignored", data.len()));
        }
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;
    use crate::virtio::rng::Rng;
    use crate::virtio::testing::{guest_memory, CountingLine, Desc, TestQueue};
    use crate::virtio::{INT_CONFIG, INT_VRING};

    struct Driver {
        t: MmioTransport,
        line: Arc<CountingLine>,
        mem: GuestMemoryMmap,
    }

    impl Driver {
        fn new() -> Self {
            let mem = guest_memory(1 << 20);
            let line = CountingLine::new();
            let t = MmioTransport::new(mem.clone(), Arc::new(Mutex::new(Rng::new())), line.clone()).unwrap();
            Driver { t, line, mem }
        }
        fn r(&mut self, offset: u64) -> u32 {
            let mut data = [0u8; 4];
            self.t.read(offset, &mut data);
            u32::from_le_bytes(data)
        }
        fn w(&mut self, offset: u64, value: u32) {
            self.t.write(offset, &value.to_le_bytes());
        }
        fn set_status(&mut self, bits: u32) -> u32 {
            let s = self.r(STATUS);
            self.w(STATUS, s | bits);
            self.r(STATUS)
        }
        fn write_features(&mut self, features: u64) {
            self.w(DRIVER_FEATURES_SEL, 0);
            self.w(DRIVER_FEATURES, features as u32);
            self.w(DRIVER_FEATURES_SEL, 1);
            self.w(DRIVER_FEATURES, (features >> 32) as u32);
        }
        fn negotiate(&mut self, features: u64) -> u32 {
            self.set_status(status::ACKNOWLEDGE | status::DRIVER);
            self.write_features(features);
            self.set_status(status::FEATURES_OK)
        }
        fn setup_queue(&mut self, index: u32, num: u32, desc: u64, driver: u64, device: u64) -> u32 {
            self.w(QUEUE_SEL, index);
            self.w(QUEUE_NUM, num);
            for (reg, value) in [(QUEUE_DESC_LOW, desc), (QUEUE_DRIVER_LOW, driver), (QUEUE_DEVICE_LOW, device)] {
                self.w(reg, value as u32);
                self.w(reg + 4, (value >> 32) as u32);
            }
            self.w(QUEUE_READY, 1);
            self.r(QUEUE_READY)
        }
        fn setup_test_queue(&mut self, tq: &TestQueue) -> u32 {
            self.setup_queue(0, u32::from(tq.size), tq.desc_table.0, tq.avail_ring.0, tq.used_ring.0)
        }
    }

    const RNG_FEATURES: u64 = features::VERSION_1 | features::RING_EVENT_IDX | features::RING_INDIRECT_DESC;

    #[test]
    fn identifies_as_a_modern_device() {
        let mut d = Driver::new();
        assert_eq!(d.r(MAGIC_VALUE), 0x7472_6976);
        assert_eq!(d.r(VERSION_REG), 2);
        assert_eq!(d.r(DEVICE_ID), crate::virtio::TYPE_RNG);
        assert_eq!(d.r(VENDOR_ID_REG), VENDOR_ID);
        d.w(DEVICE_FEATURES_SEL, 0);
        assert_eq!(d.r(DEVICE_FEATURES), RNG_FEATURES as u32);
        d.w(DEVICE_FEATURES_SEL, 1);
        assert_eq!(d.r(DEVICE_FEATURES), 1);
        d.w(DEVICE_FEATURES_SEL, 2);
        assert_eq!(d.r(DEVICE_FEATURES), 0);
        assert_eq!(d.r(QUEUE_NUM_MAX), 256);
        d.w(QUEUE_SEL, 1);
        assert_eq!(d.r(QUEUE_NUM_MAX), 0);
        assert_eq!(d.r(SHM_LEN_LOW), u32::MAX);
        assert_eq!((d.r(STATUS), d.r(INTERRUPT_STATUS), d.r(CONFIG_GENERATION)), (0, 0, 0));
        // Registers are 32-bit: narrower or unaligned accesses read zero and change nothing.
        let mut narrow = [0xffu8; 2];
        d.t.read(MAGIC_VALUE, &mut narrow);
        assert_eq!(narrow, [0, 0]);
        d.t.write(STATUS, &[1]);
        d.t.write(STATUS + 1, &1u32.to_le_bytes());
        assert_eq!(d.r(STATUS), 0);
    }

    #[test]
    fn features_must_be_offered_and_modern() {
        let mut d = Driver::new();
        assert_eq!(d.negotiate(RNG_FEATURES | 1 << 40) & status::FEATURES_OK, 0, "an unoffered feature");
        d.w(STATUS, 0);
        assert_eq!(d.negotiate(features::RING_EVENT_IDX) & status::FEATURES_OK, 0, "no VERSION_1");
        d.w(STATUS, 0);
        d.set_status(status::ACKNOWLEDGE | status::DRIVER);
        d.write_features(features::VERSION_1);
        d.w(DRIVER_FEATURES_SEL, 2);
        d.w(DRIVER_FEATURES, 1);
        assert_eq!(d.set_status(status::FEATURES_OK) & status::FEATURES_OK, 0, "a feature bit above 63");
        d.w(STATUS, 0);
        // FEATURES_OK without DRIVER.
        d.w(STATUS, status::ACKNOWLEDGE);
        d.write_features(features::VERSION_1);
        assert_eq!(d.set_status(status::FEATURES_OK), status::ACKNOWLEDGE);
        d.w(STATUS, 0);
        let s = d.negotiate(features::VERSION_1);
        assert_eq!(s, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        // Features are frozen after FEATURES_OK.
        d.write_features(RNG_FEATURES | 1 << 40);
        assert_eq!(d.t.driver_features, features::VERSION_1);
    }

    #[test]
    fn driver_ok_without_features_ok_is_refused() {
        let mut d = Driver::new();
        let tq = TestQueue::new(GuestAddress(0x1000), 16);
        d.set_status(status::ACKNOWLEDGE | status::DRIVER);
        d.write_features(features::VERSION_1);
        assert_eq!(d.setup_test_queue(&tq), 1);
        let s = d.set_status(status::DRIVER_OK);
        assert_eq!(s & status::DRIVER_OK, 0);
        // The device did not start: a notification finds nothing to do.
        let mut tq = tq;
        tq.add_chain(&d.mem, &[Desc::w(0x10000, 16)]);
        d.w(QUEUE_NOTIFY_OFFSET, 0);
        assert!(!d.t.queue_handler().handle(0));
        assert_eq!(tq.used_idx(&d.mem), 0);
        // Nor can it be started by clearing bits: only a reset goes backwards.
        d.w(STATUS, status::ACKNOWLEDGE);
        assert_eq!(d.r(STATUS), status::ACKNOWLEDGE | status::DRIVER);
    }

    #[test]
    fn a_negotiated_device_serves_notifications_and_interrupts() {
        let mut d = Driver::new();
        let mut tq = TestQueue::new(GuestAddress(0x1000), 16);
        assert_ne!(d.negotiate(features::VERSION_1) & status::FEATURES_OK, 0);
        assert_eq!(d.setup_test_queue(&tq), 1);
        assert_ne!(d.set_status(status::DRIVER_OK) & status::DRIVER_OK, 0);

        let head = tq.add_chain(&d.mem, &[Desc::w(0x10000, 32)]);
        // The MMIO path of a notification lands on the queue's eventfd, like an ioeventfd would.
        d.w(QUEUE_NOTIFY_OFFSET, 0);
        d.w(QUEUE_NOTIFY_OFFSET, 5); // no such queue: dropped
        assert_eq!(d.t.queue_events()[0].read().unwrap(), 1);
        assert!(d.t.queue_handler().handle(0));
        assert_eq!(tq.pop_used(&d.mem), Some((u32::from(head), 32)));
        assert_eq!(d.r(INTERRUPT_STATUS), INT_VRING);
        assert_eq!(d.line.count(), 1);
        d.w(INTERRUPT_ACK, INT_VRING);
        assert_eq!(d.r(INTERRUPT_STATUS), 0);
        assert_eq!(d.line.count(), 1, "nothing pending after the ack: no new pulse");

        // Queue configuration is frozen once the device runs.
        d.w(QUEUE_SEL, 0);
        d.w(QUEUE_NUM, 4);
        d.w(QUEUE_READY, 0);
        assert_eq!((d.t.queues[0].size, d.r(QUEUE_READY)), (16, 1));

        // Reset: back to power-on state, the device stops.
        d.w(STATUS, 0);
        assert_eq!((d.r(STATUS), d.r(QUEUE_READY), d.r(INTERRUPT_STATUS)), (0, 0, 0));
        assert_eq!(d.t.queues[0], QueueConfig::new(256));
        tq.add_chain(&d.mem, &[Desc::w(0x10000, 32)]);
        assert!(!d.t.queue_handler().handle(0));
        assert_eq!(tq.used_idx(&d.mem), 1);
    }

    #[test]
    fn bad_queue_setups_are_refused_with_needs_reset() {
        let mem_end = 1u64 << 20;
        let cases: [(u32, u64, u64, u64, &str); 7] = [
            (512, 0x1000, 0x3000, 0x4000, "num above the maximum"),
            (0, 0x1000, 0x3000, 0x4000, "num zero"),
            (24, 0x1000, 0x3000, 0x4000, "num not a power of two"),
            (16, 0x1008, 0x3000, 0x4000, "descriptor table unaligned"),
            (16, 0x1000, 0x3001, 0x4000, "available ring unaligned"),
            (16, 0x1000, 0x3000, 0x4002, "used ring unaligned"),
            (16, 0x1000, 0x3000, mem_end - 64, "used ring runs off the end of memory"),
        ];
        for (num, desc, driver, device, what) in cases {
            let mut d = Driver::new();
            d.negotiate(features::VERSION_1);
            assert_eq!(d.setup_queue(0, num, desc, driver, device), 0, "{what}");
            assert_ne!(d.r(STATUS) & status::NEEDS_RESET, 0, "{what}");
            assert_ne!(d.r(INTERRUPT_STATUS) & INT_CONFIG, 0, "{what}");
            // A reset clears the error, and a good setup works.
            d.w(STATUS, 0);
            assert_eq!(d.r(STATUS), 0, "{what}");
            d.negotiate(features::VERSION_1);
            assert_eq!(d.setup_queue(0, 16, 0x1000, 0x3000, 0x4000), 1, "{what}");
        }
        for far in [!0xf, 1 << 40] {
            let mut d = Driver::new();
            d.negotiate(features::VERSION_1);
            assert_eq!(d.setup_queue(0, 16, far, 0x3000, 0x4000), 0);
            assert_eq!(d.setup_queue(0, 16, 0x1000, far, 0x4000), 0);
            assert_eq!(d.setup_queue(0, 16, 0x1000, 0x3000, far), 0);
        }
        // A queue the device does not have.
        let mut d = Driver::new();
        d.negotiate(features::VERSION_1);
        assert_eq!(d.setup_queue(3, 16, 0x1000, 0x3000, 0x4000), 0);
    }

    #[test]
    fn a_corrupted_ring_needs_reset_and_the_driver_can_recover() {
        let mut d = Driver::new();
        let mut tq = TestQueue::new(GuestAddress(0x1000), 16);
        d.negotiate(features::VERSION_1);
        d.setup_test_queue(&tq);
        d.set_status(status::DRIVER_OK);
        // The available index claims far more entries than the queue has.
        tq.set_avail_idx(&d.mem, 1000);
        d.t.queue_handler().handle(0);
        assert_ne!(d.r(STATUS) & status::NEEDS_RESET, 0);
        assert_ne!(d.r(INTERRUPT_STATUS) & INT_CONFIG, 0);
        // The queue stays dead until reset...
        tq.set_avail_idx(&d.mem, 0);
        tq.add_chain(&d.mem, &[Desc::w(0x10000, 8)]);
        d.t.queue_handler().handle(0);
        assert_eq!(tq.used_idx(&d.mem), 0);
        // ...after which it works again.
        d.w(STATUS, 0);
        let mut tq = TestQueue::new(GuestAddress(0x8000), 16);
        d.negotiate(features::VERSION_1);
        d.setup_test_queue(&tq);
        d.set_status(status::DRIVER_OK);
        assert_eq!(d.r(STATUS) & status::NEEDS_RESET, 0);
        tq.add_chain(&d.mem, &[Desc::w(0x10000, 8)]);
        assert!(d.t.queue_handler().handle(0));
        assert_eq!(tq.pop_used(&d.mem).map(|u| u.1), Some(8));
    }

    #[test]
    fn a_head_outside_the_table_needs_reset() {
        let mut d = Driver::new();
        let mut tq = TestQueue::new(GuestAddress(0x1000), 16);
        d.negotiate(features::VERSION_1);
        d.setup_test_queue(&tq);
        d.set_status(status::DRIVER_OK);
        tq.publish(&d.mem, 200);
        d.t.queue_handler().handle(0);
        assert_ne!(d.r(STATUS) & status::NEEDS_RESET, 0);
    }
}

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

use vmm_sys_util::eventfd::EventFd;

use super::transport::{TransportState, VirtioState};
use super::{lock_device, GuestErrorLog, GuestMemoryMmap, QueueHandler, VirtioDevice, VirtioInterrupt};
use crate::{BusDevice, InterruptLine, Persist, StateError};

/// The size of a transport's MMIO window: registers up to 0x100, device configuration after.
pub const MMIO_LEN: u64 = 0x1000;
/// Where the driver writes a queue index to notify the device.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

pub const MAGIC: u32 = 0x7472_6976; // "virt"
pub const VERSION: u32 = 2;
/// Vendor id "KSTL".
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"KSTL");

pub(crate) const MAGIC_VALUE: u64 = 0x000;
pub(crate) const VERSION_REG: u64 = 0x004;
pub(crate) const DEVICE_ID: u64 = 0x008;
pub(crate) const VENDOR_ID_REG: u64 = 0x00c;
pub(crate) const DEVICE_FEATURES: u64 = 0x010;
pub(crate) const DEVICE_FEATURES_SEL: u64 = 0x014;
pub(crate) const DRIVER_FEATURES: u64 = 0x020;
pub(crate) const DRIVER_FEATURES_SEL: u64 = 0x024;
pub(crate) const QUEUE_SEL: u64 = 0x030;
pub(crate) const QUEUE_NUM_MAX: u64 = 0x034;
pub(crate) const QUEUE_NUM: u64 = 0x038;
pub(crate) const QUEUE_READY: u64 = 0x044;
pub(crate) const INTERRUPT_STATUS: u64 = 0x060;
pub(crate) const INTERRUPT_ACK: u64 = 0x064;
pub(crate) const STATUS: u64 = 0x070;
pub(crate) const QUEUE_DESC_LOW: u64 = 0x080;
pub(crate) const QUEUE_DESC_HIGH: u64 = 0x084;
pub(crate) const QUEUE_DRIVER_LOW: u64 = 0x090;
pub(crate) const QUEUE_DRIVER_HIGH: u64 = 0x094;
pub(crate) const QUEUE_DEVICE_LOW: u64 = 0x0a0;
pub(crate) const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
pub(crate) const SHM_SEL: u64 = 0x0ac;
pub(crate) const SHM_LEN_LOW: u64 = 0x0b0;
pub(crate) const SHM_BASE_HIGH: u64 = 0x0bc;
pub(crate) const CONFIG_GENERATION: u64 = 0x0fc;
pub(crate) const CONFIG: u64 = 0x100;

static LOG: GuestErrorLog = GuestErrorLog::new("virtio-mmio");

pub struct MmioTransport {
    state: TransportState,
}

impl MmioTransport {
    /// A transport for `device`, which works on `mem` and interrupts the guest through `line`.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        line: Arc<dyn InterruptLine>,
    ) -> io::Result<Self> {
        let interrupt = Arc::new(VirtioInterrupt::new(line));
        Ok(MmioTransport { state: TransportState::new(mem, device, interrupt, &LOG)? })
    }

    /// One eventfd per queue, in queue order: register each as an ioeventfd on `base + QUEUE_NOTIFY_OFFSET` with
    /// its index as datamatch, and watch it on the thread that runs [`QueueHandler::handle`].
    pub fn queue_events(&self) -> &[EventFd] {
        self.state.queue_events()
    }

    /// What the device thread calls when a queue's eventfd fires.
    pub fn queue_handler(&self) -> QueueHandler {
        self.state.queue_handler()
    }

    pub fn interrupt(&self) -> &Arc<VirtioInterrupt> {
        self.state.interrupt()
    }

    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        self.state.device()
    }

    /// The device status as the driver reads it.
    pub fn status(&self) -> u32 {
        self.state.status()
    }

    fn read_register(&self, offset: u64) -> u32 {
        let state = &self.state;
        let queue = state.selected_queue();
        match offset {
            MAGIC_VALUE => MAGIC,
            VERSION_REG => VERSION,
            DEVICE_ID => state.device_type,
            VENDOR_ID_REG => VENDOR_ID,
            DEVICE_FEATURES => state.device_features(),
            QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size)),
            QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready)),
            INTERRUPT_STATUS => state.interrupt().status(),
            STATUS => state.status(),
            QUEUE_DESC_LOW => queue.map_or(0, |q| q.desc as u32),
            QUEUE_DESC_HIGH => queue.map_or(0, |q| (q.desc >> 32) as u32),
            QUEUE_DRIVER_LOW => queue.map_or(0, |q| q.driver as u32),
            QUEUE_DRIVER_HIGH => queue.map_or(0, |q| (q.driver >> 32) as u32),
            QUEUE_DEVICE_LOW => queue.map_or(0, |q| q.device as u32),
            QUEUE_DEVICE_HIGH => queue.map_or(0, |q| (q.device >> 32) as u32),
            // No shared memory regions: their length reads as -1.
            SHM_LEN_LOW..=SHM_BASE_HIGH => u32::MAX,
            CONFIG_GENERATION => state.interrupt().config_generation(),
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let state = &mut self.state;
        match offset {
            DEVICE_FEATURES_SEL => state.device_features_sel = value,
            DRIVER_FEATURES_SEL => state.driver_features_sel = value,
            DRIVER_FEATURES => state.write_driver_features(value),
            QUEUE_SEL => state.queue_sel = value,
            QUEUE_NUM | QUEUE_DESC_LOW..=QUEUE_DEVICE_HIGH => state.configure_selected_queue(|q| {
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
            }),
            QUEUE_READY => state.write_queue_ready(value),
            // Datamatch on the ioeventfd makes the VMM's path identical: one eventfd per queue.
            QUEUE_NOTIFY_OFFSET => state.notify(value as usize),
            INTERRUPT_ACK => state.interrupt().ack(value),
            STATUS => state.write_status(value),
            SHM_SEL => {}
            _ => {}
        }
    }

    /// Back to the power-on state (virtio 1.2, 2.4), as when the driver writes 0 to the status register or the
    /// machine resets.
    pub fn reset(&mut self) {
        self.state.reset();
    }

    /// Stops the device's work on guest memory, for a snapshot (see [`transport`](super::transport)).
    pub fn quiesce(&self) {
        self.state.quiesce();
    }

    /// Lets a quiesced or restored device work again; every queue counts as notified.
    pub fn resume(&self) {
        self.state.resume();
    }
}

/// The transport's registers are all in [`VirtioState`]; InterruptStatus is its `interrupt_status`.
impl Persist for MmioTransport {
    type State = VirtioState;

    fn save(&self) -> VirtioState {
        self.state.save()
    }

    fn restore(&mut self, state: &VirtioState) -> Result<(), StateError> {
        self.state.restore(state)
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG {
            lock_device(self.state.device()).read_config(offset - CONFIG, data);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        } else {
            LOG.report(format_args!("{}-byte register read at {offset:#x} ignored", data.len()));
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG {
            lock_device(self.state.device()).write_config(offset - CONFIG, data);
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
    use crate::virtio::transport::QueueConfig;
    use crate::virtio::{features, status};
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
        assert_eq!(d.t.state.driver_features, features::VERSION_1);
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
        assert_eq!((d.t.state.queues[0].size, d.r(QUEUE_READY)), (16, 1));

        // Reset: back to power-on state, the device stops.
        d.w(STATUS, 0);
        assert_eq!((d.r(STATUS), d.r(QUEUE_READY), d.r(INTERRUPT_STATUS)), (0, 0, 0));
        assert_eq!(d.t.state.queues[0], QueueConfig::new(256));
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

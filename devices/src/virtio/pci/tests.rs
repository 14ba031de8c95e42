//! The virtio-pci transport driven the way Linux's virtio_pci_modern does it, and the way a hostile driver might.

use vm_memory::GuestAddress;

use super::*;
use crate::pci::config::{CAPABILITIES_POINTER, COMMAND, COMMAND_MEMORY_SPACE};
use crate::pci::msix::tests::RecordingSender;
use crate::pci::PciRoot;
use crate::virtio::rng::Rng;
use crate::virtio::testing::{guest_memory, Desc, TestQueue};
use crate::virtio::{features, status, INT_CONFIG};

struct Driver {
    dev: VirtioPciDevice,
    msi: Arc<RecordingSender>,
    mem: GuestMemoryMmap,
}

const FEATURES: u64 = features::VERSION_1;

impl Driver {
    fn new() -> Self {
        Self::on(guest_memory(1 << 20))
    }
    /// A fresh function on `mem`.
    fn on(mem: GuestMemoryMmap) -> Self {
        let msi = Arc::new(RecordingSender::default());
        let dev =
            VirtioPciDevice::new(mem.clone(), Arc::new(Mutex::new(Rng::new())), msi.clone(), "rng0".into()).unwrap();
        Driver { dev, msi, mem }
    }
    fn read(&mut self, offset: u64, len: usize) -> u64 {
        bar_read(&mut self.dev, offset, len)
    }
    fn write(&mut self, offset: u64, len: usize, value: u64) {
        bar_write(&mut self.dev, offset, len, value);
    }
    fn status(&mut self) -> u8 {
        self.read(DEVICE_STATUS, 1) as u8
    }
    fn set_status(&mut self, bits: u32) -> u8 {
        let s = u64::from(self.status()) | u64::from(bits);
        self.write(DEVICE_STATUS, 1, s);
        self.status()
    }
    fn negotiate(&mut self, features: u64) -> u8 {
        self.set_status(status::ACKNOWLEDGE | status::DRIVER);
        for sel in 0..2 {
            self.write(DRIVER_FEATURE_SELECT, 4, sel);
            self.write(DRIVER_FEATURE, 4, features >> (32 * sel) & 0xffff_ffff);
        }
        self.set_status(status::FEATURES_OK)
    }
    /// Queue setup as Linux does it: size, then the rings as two 32-bit halves each, vector, enable.
    fn setup_queue(&mut self, index: u16, tq: &TestQueue, vector: u16) -> (u16, u16) {
        self.write(QUEUE_SELECT, 2, u64::from(index));
        self.write(QUEUE_SIZE, 2, u64::from(tq.size));
        for (reg, addr) in
            [(QUEUE_DESC, tq.desc_table.0), (QUEUE_DRIVER, tq.avail_ring.0), (QUEUE_DEVICE, tq.used_ring.0)]
        {
            self.write(reg, 4, addr & 0xffff_ffff);
            self.write(reg + 4, 4, addr >> 32);
        }
        self.write(QUEUE_MSIX_VECTOR, 2, u64::from(vector));
        let vector = self.read(QUEUE_MSIX_VECTOR, 2) as u16;
        self.write(QUEUE_ENABLE, 2, 1);
        (vector, self.read(QUEUE_ENABLE, 2) as u16)
    }
    /// Programs MSI-X entry `vector` and enables MSI-X in the capability.
    fn enable_msix(&mut self, entries: &[(u16, u64, u32)]) {
        for &(vector, address, data) in entries {
            let base = u64::from(vector) * 16;
            self.dev.write_bar(MSIX_BAR, base, &address.to_le_bytes());
            self.dev.write_bar(MSIX_BAR, base + 8, &data.to_le_bytes());
            self.dev.write_bar(MSIX_BAR, base + 12, &0u32.to_le_bytes());
        }
        let cap = self.find_capabilities().into_iter().find(|c| c.0 == 0x11).unwrap().1;
        self.dev.write_config(cap + 2, &0x8000u16.to_le_bytes());
    }
    /// (ID, offset, cfg_type for vendor capabilities) along the capability list.
    fn find_capabilities(&mut self) -> Vec<(u8, usize, u8)> {
        let mut caps = Vec::new();
        let mut ptr = [0u8];
        self.dev.read_config(CAPABILITIES_POINTER, &mut ptr);
        let mut at = usize::from(ptr[0]);
        while at != 0 && caps.len() < 48 {
            let mut header = [0u8; 4];
            self.dev.read_config(at, &mut header);
            caps.push((header[0], at, header[3]));
            at = usize::from(header[1]);
        }
        caps
    }
}

fn bar_read(dev: &mut VirtioPciDevice, offset: u64, len: usize) -> u64 {
    let mut data = [0u8; 8];
    dev.read_bar(VIRTIO_BAR, offset, &mut data[..len]);
    u64::from_le_bytes(data)
}

fn bar_write(dev: &mut VirtioPciDevice, offset: u64, len: usize, value: u64) {
    dev.write_bar(VIRTIO_BAR, offset, &value.to_le_bytes()[..len]);
}

#[test]
fn identifies_as_a_modern_virtio_function_with_its_capabilities() {
    let mut d = Driver::new();
    let mut id = [0u8; 4];
    d.dev.read_config(0, &mut id);
    assert_eq!(u32::from_le_bytes(id), 0x1044_1af4, "virtio-rng: 0x1040 + 4");
    let identity = d.dev.config().identity();
    assert_eq!((identity.revision, identity.class_code), (1, 0x00ff00));
    assert_eq!((identity.subsystem_vendor_id, identity.subsystem_id), (0x1af4, 0x1100));
    assert_eq!(class_code(TYPE_BLOCK), 0x010000);
    assert_eq!(class_code(TYPE_NET), 0x020000);
    assert_eq!(class_code(TYPE_CONSOLE), 0x078000);
    let caps = d.find_capabilities();
    let types: Vec<(u8, u8)> = caps.iter().map(|c| (c.0, if c.0 == 9 { c.2 } else { 0 })).collect();
    assert_eq!(types, vec![(9, 1), (9, 2), (9, 3), (9, 4), (9, 5), (0x11, 0)]);
    // Each vendor capability points into BAR 0 where the transport answers.
    for &(_, at, cfg_type) in &caps[..4] {
        let mut cap = [0u8; 20];
        d.dev.read_config(at, &mut cap);
        let (bar, offset) = (cap[4], u32::from_le_bytes(cap[8..12].try_into().unwrap()));
        let expected = [COMMON_CFG_OFFSET, NOTIFY_OFFSET, ISR_OFFSET, DEVICE_CFG_OFFSET][usize::from(cfg_type) - 1];
        assert_eq!((bar, u64::from(offset)), (0, expected));
        if cfg_type == CAP_NOTIFY_CFG {
            assert_eq!((cap[2], u32::from_le_bytes(cap[16..20].try_into().unwrap())), (20, 4));
        }
    }
    assert_eq!(d.dev.config().u8_at(crate::pci::config::INTERRUPT_PIN), 0, "no INTx");
    assert_eq!(d.read(NUM_QUEUES, 2), 1);
    d.write(QUEUE_SELECT, 2, 0);
    assert_eq!((d.read(QUEUE_SIZE, 2), d.read(QUEUE_NOTIFY_OFF, 2)), (256, 0));
    d.write(DEVICE_FEATURE_SELECT, 4, 1);
    assert_eq!(d.read(DEVICE_FEATURE, 4), 1, "VERSION_1");
    assert_eq!(d.dev.notifiers().map(|(bar, offset, _)| (bar, offset)).collect::<Vec<_>>(), vec![(0, 0x3000)]);
}

#[test]
fn a_driver_sets_up_the_device_and_gets_msix_interrupts_per_cause() {
    let mut d = Driver::new();
    let mut tq = TestQueue::new(GuestAddress(0x1000), 16);
    assert_ne!(d.negotiate(FEATURES) & status::FEATURES_OK as u8, 0);
    d.write(DRIVER_FEATURE_SELECT, 4, 1);
    assert_eq!(d.read(DRIVER_FEATURE, 4), 1, "driver features read back");
    d.write(CONFIG_MSIX_VECTOR, 2, 0);
    assert_eq!(d.read(CONFIG_MSIX_VECTOR, 2), 0);
    assert_eq!(d.setup_queue(0, &tq, 1), (1, 1));
    assert_eq!(d.read(QUEUE_DESC, 8), 0x1000, "a 64-bit read of a ring address");
    d.enable_msix(&[(0, 0xfee0_0000, 0x30), (1, 0xfee0_1000, 0x31)]);
    assert_ne!(d.set_status(status::DRIVER_OK) & status::DRIVER_OK as u8, 0);

    let head = tq.add_chain(&d.mem, &[Desc::w(0x10000, 32)]);
    // The notification address of queue 0, as a 16-bit write of its index (Linux's vp_notify).
    d.write(NOTIFY_OFFSET, 2, 0);
    assert_eq!(d.dev.queue_events()[0].read().unwrap(), 1);
    assert!(d.dev.queue_handler().handle(0));
    assert_eq!(tq.pop_used(&d.mem), Some((u32::from(head), 32)));
    assert_eq!(d.msi.take(), vec![(0xfee0_1000, 0x31)], "the queue's vector");
    // A configuration interrupt goes to the config vector.
    d.dev.interrupt().signal_config_change();
    assert_eq!(d.msi.take(), vec![(0xfee0_0000, 0x30)]);
    assert_eq!(d.read(CONFIG_GENERATION, 1), 1);
    // The ISR has both bits and reading it clears them.
    assert_eq!(d.read(ISR_OFFSET, 1), 3);
    assert_eq!(d.read(ISR_OFFSET, 1), 0);
    // Masking the vector holds the interrupt back until unmasked.
    d.dev.write_bar(MSIX_BAR, 16 + 12, &1u32.to_le_bytes());
    tq.add_chain(&d.mem, &[Desc::w(0x10000, 8)]);
    assert!(d.dev.queue_handler().handle(0));
    assert_eq!(d.msi.take(), vec![]);
    let mut pba = [0u8; 8];
    d.dev.read_bar(MSIX_BAR, 0x1000, &mut pba);
    assert_eq!(pba[0], 0b10);
    d.dev.write_bar(MSIX_BAR, 16 + 12, &0u32.to_le_bytes());
    assert_eq!(d.msi.take(), vec![(0xfee0_1000, 0x31)]);
    // NO_VECTOR: no interrupt for that cause.
    d.write(QUEUE_MSIX_VECTOR, 2, u64::from(NO_VECTOR));
    tq.add_chain(&d.mem, &[Desc::w(0x10000, 8)]);
    assert!(d.dev.queue_handler().handle(0));
    assert_eq!(d.msi.take(), vec![]);

    // A virtio reset: status, queues and vectors back to their power-on values; MSI-X stays programmed.
    d.write(DEVICE_STATUS, 1, 0);
    assert_eq!((d.status(), d.read(QUEUE_ENABLE, 2), d.read(CONFIG_MSIX_VECTOR, 2)), (0, 0, 0xffff));
    tq.add_chain(&d.mem, &[Desc::w(0x10000, 8)]);
    assert!(!d.dev.queue_handler().handle(0));
}

#[test]
fn out_of_range_vectors_read_back_as_no_vector() {
    let mut d = Driver::new();
    d.negotiate(FEATURES);
    // Two vectors exist (one queue + config).
    for (written, read) in [(1, 1), (2, 0xffff), (0x7ff, 0xffff), (0xffff, 0xffff), (0, 0)] {
        d.write(CONFIG_MSIX_VECTOR, 2, written);
        assert_eq!(d.read(CONFIG_MSIX_VECTOR, 2), read, "config vector {written:#x}");
        d.write(QUEUE_SELECT, 2, 0);
        d.write(QUEUE_MSIX_VECTOR, 2, written);
        assert_eq!(d.read(QUEUE_MSIX_VECTOR, 2), read, "queue vector {written:#x}");
    }
    // A queue that does not exist has no vector, whatever is written.
    d.write(QUEUE_SELECT, 2, 9);
    d.write(QUEUE_MSIX_VECTOR, 2, 0);
    assert_eq!(d.read(QUEUE_MSIX_VECTOR, 2), 0xffff);
}

#[test]
fn hostile_accesses_are_harmless() {
    let mut d = Driver::new();
    let mut tq = TestQueue::new(GuestAddress(0x1000), 16);
    d.negotiate(FEATURES);
    // Absent queues: size 0, writes ignored, nothing enabled.
    for sel in [1u64, 0x7fff, 0xffff] {
        d.write(QUEUE_SELECT, 2, sel);
        assert_eq!(d.read(QUEUE_SIZE, 2), 0);
        d.write(QUEUE_SIZE, 2, 16);
        d.write(QUEUE_DESC, 8, 0x1000);
        d.write(QUEUE_ENABLE, 2, 1);
        assert_eq!((d.read(QUEUE_SIZE, 2), d.read(QUEUE_ENABLE, 2), d.read(QUEUE_DESC, 8)), (0, 0, 0));
    }
    // Wrong widths and offsets inside the common configuration change nothing and read zero.
    d.write(QUEUE_SELECT, 2, 0);
    d.write(QUEUE_SIZE, 4, 8);
    d.write(QUEUE_SIZE + 1, 1, 8);
    d.write(QUEUE_DESC + 2, 4, 0xdead);
    d.write(DEVICE_STATUS, 4, 0xff);
    assert_eq!((d.read(QUEUE_SIZE, 2), d.read(QUEUE_DESC, 8)), (256, 0));
    assert_eq!(d.read(QUEUE_SIZE, 4), 0);
    assert_eq!(d.read(QUEUE_DESC + 1, 4), 0);
    assert_ne!(d.status() & status::FEATURES_OK as u8, 0);
    // Oversized accesses anywhere, offsets past every region, absent BARs.
    let mut big = [0xaau8; 16];
    d.dev.read_bar(VIRTIO_BAR, 0, &mut big);
    assert_eq!(big, [0; 16]);
    d.dev.write_bar(VIRTIO_BAR, 0, &[0xff; 16]);
    d.dev.write_bar(VIRTIO_BAR, u64::MAX - 1, &[1, 2]);
    d.dev.write_bar(5, 0, &[1, 2, 3, 4]);
    d.dev.read_bar(MSIX_BAR, u64::MAX - 3, &mut big[..4]);
    d.dev.write_bar(MSIX_BAR, 0x1000, &[0xff; 8]);
    // Notifications for absent queues and unaligned notification offsets are dropped.
    d.write(NOTIFY_OFFSET + 4 * 7, 2, 7);
    d.write(VIRTIO_BAR_SIZE - 2, 2, 0);
    assert!(d.dev.queue_events()[0].read().is_err(), "no notification reached queue 0");

    // After DRIVER_OK, queue configuration and features are frozen.
    assert_eq!(d.setup_queue(0, &tq, 0xffff), (0xffff, 1));
    d.set_status(status::DRIVER_OK);
    d.write(QUEUE_SIZE, 2, 4);
    d.write(QUEUE_DESC, 8, 0x8000);
    d.write(QUEUE_ENABLE, 2, 0);
    d.write(DRIVER_FEATURE_SELECT, 4, 0);
    d.write(DRIVER_FEATURE, 4, 0xffff_ffff);
    assert_eq!((d.read(QUEUE_SIZE, 2), d.read(QUEUE_DESC, 8), d.read(QUEUE_ENABLE, 2)), (16, 0x1000, 1));
    assert_eq!(d.read(DRIVER_FEATURE, 4), 0);
    // The device still works.
    tq.add_chain(&d.mem, &[Desc::w(0x10000, 8)]);
    assert!(d.dev.queue_handler().handle(0));
    assert_eq!(tq.pop_used(&d.mem).map(|u| u.1), Some(8));
    // A bad queue setup after a reset needs a reset, signalled on the config vector.
    d.write(DEVICE_STATUS, 1, 0);
    d.enable_msix(&[(0, 0xfee0_0000, 0x40)]);
    d.negotiate(FEATURES);
    d.write(CONFIG_MSIX_VECTOR, 2, 0);
    let far = TestQueue::new(GuestAddress(1 << 40), 16);
    assert_eq!(d.setup_queue(0, &far, 0xffff).1, 0);
    assert_ne!(d.status() & status::NEEDS_RESET as u8, 0);
    assert_eq!(d.msi.take(), vec![(0xfee0_0000, 0x40)]);
    assert_eq!(u32::from(d.read(ISR_OFFSET, 1) as u8) & INT_CONFIG, INT_CONFIG);
}

#[test]
fn the_pci_cfg_capability_reaches_the_bars_only_within_bounds() {
    let mut d = Driver::new();
    let cap = d.find_capabilities().into_iter().find(|c| c.0 == 9 && c.2 == CAP_PCI_CFG).unwrap().1;
    let window = |d: &mut Driver, bar: u8, offset: u32, length: u32| {
        d.dev.write_config(cap + CAP_BAR, &[bar]);
        d.dev.write_config(cap + CAP_OFFSET, &offset.to_le_bytes());
        d.dev.write_config(cap + CAP_LENGTH, &length.to_le_bytes());
    };
    // num_queues through the window.
    window(&mut d, 0, NUM_QUEUES as u32, 2);
    let mut data = [0u8; 2];
    d.dev.read_config(cap + PCI_CFG_DATA, &mut data);
    assert_eq!(u16::from_le_bytes(data), 1);
    // A status write through the window.
    window(&mut d, 0, DEVICE_STATUS as u32, 1);
    d.dev.write_config(cap + PCI_CFG_DATA, &[status::ACKNOWLEDGE as u8]);
    assert_eq!(d.status(), status::ACKNOWLEDGE as u8);
    // Bad windows: absent BAR, past the BAR, unaligned, bad length, width mismatch: plain (read-only) config.
    for (bar, offset, length, width) in
        [(3, 0, 4, 4), (0, VIRTIO_BAR_SIZE as u32, 4, 4), (0, 0x12, 4, 4), (0, 0x12, 3, 3), (0, 0x12, 2, 4)]
    {
        window(&mut d, bar, offset, length);
        let mut data = [0xaau8; 4];
        d.dev.read_config(cap + PCI_CFG_DATA, &mut data[..width]);
        assert_eq!(data[..width], vec![0u8; width][..], "{bar} {offset:#x} {length}");
        d.dev.write_config(cap + PCI_CFG_DATA, &[0; 4][..width]);
    }
    assert_eq!(d.status(), status::ACKNOWLEDGE as u8);
}

#[test]
fn through_a_pci_root_the_function_answers_where_its_bar_decodes() {
    let d = Driver::new();
    let msi = d.msi.clone();
    let dev = Arc::new(Mutex::new(d.dev));
    let mut root = PciRoot::new(0xc000_0000, 0x100_0000, None);
    let slot = root.add(dev.clone()).unwrap();
    let root = Arc::new(root);
    assert_eq!(root.decoded_bars(slot), vec![(0, 0xc000_0000), (1, 0xc000_4000)]);
    let mut window = crate::pci::PciMmioWindow::new(root.clone(), 0xc000_0000);
    let mut ecam = crate::pci::PciEcam::new(root.clone());
    let cfg = u64::from(slot) << 15;
    let mut data = [0u8; 2];
    use crate::BusDevice;
    window.read(NUM_QUEUES, &mut data);
    assert_eq!(u16::from_le_bytes(data), 1);
    // The guest moves BAR 0: the registers follow.
    ecam.write(cfg + crate::pci::config::BAR0 as u64, &0xc010_0000u32.to_le_bytes());
    window.read(NUM_QUEUES, &mut data);
    assert_eq!(data, [0xff; 2]);
    window.read(0x10_0000 + NUM_QUEUES, &mut data);
    assert_eq!(u16::from_le_bytes(data), 1);
    // Turning memory decoding off hides both BARs.
    ecam.write(cfg + COMMAND as u64, &0u16.to_le_bytes());
    window.read(0x10_0000 + NUM_QUEUES, &mut data);
    assert_eq!(data, [0xff; 2]);
    ecam.write(cfg + COMMAND as u64, &COMMAND_MEMORY_SPACE.to_le_bytes());
    // A machine reset puts the BAR back and resets the virtio state.
    root.reset();
    window.read(NUM_QUEUES, &mut data);
    assert_eq!(u16::from_le_bytes(data), 1);
    assert!(msi.take().is_empty());
    assert_eq!(root.functions()[0].qdev_id, "rng0");
}

/// What a driver reads of the function: the common configuration (with queue 0 selected for the queue registers),
/// the MSI-X table and configuration space.
fn visible(dev: &mut VirtioPciDevice) -> Vec<u64> {
    let mut seen = Vec::new();
    for (offset, len) in [
        (DEVICE_FEATURE_SELECT, 4),
        (DRIVER_FEATURE_SELECT, 4),
        (CONFIG_MSIX_VECTOR, 2),
        (DEVICE_STATUS, 1),
        (CONFIG_GENERATION, 1),
        (QUEUE_SELECT, 2),
    ] {
        seen.push(bar_read(dev, offset, len));
    }
    let (features_selected, queue_selected) = (seen[1], seen[5]);
    for sel in 0..2 {
        bar_write(dev, DRIVER_FEATURE_SELECT, 4, sel);
        seen.push(bar_read(dev, DRIVER_FEATURE, 4));
    }
    bar_write(dev, QUEUE_SELECT, 2, 0);
    for (offset, len) in [
        (QUEUE_SIZE, 2),
        (QUEUE_MSIX_VECTOR, 2),
        (QUEUE_ENABLE, 2),
        (QUEUE_DESC, 8),
        (QUEUE_DRIVER, 8),
        (QUEUE_DEVICE, 8),
    ] {
        seen.push(bar_read(dev, offset, len));
    }
    bar_write(dev, DRIVER_FEATURE_SELECT, 4, features_selected);
    bar_write(dev, QUEUE_SELECT, 2, queue_selected);
    for at in (0..0x20).step_by(8) {
        let mut entry = [0u8; 8];
        dev.read_bar(MSIX_BAR, at, &mut entry);
        seen.push(u64::from_le_bytes(entry));
    }
    for at in (0..0x100).step_by(4) {
        let mut word = [0u8; 4];
        dev.read_config(at, &mut word);
        seen.push(u64::from(u32::from_le_bytes(word)));
    }
    seen
}

/// A running function with MSI-X on, one request served and one made available while it was quiesced.
fn saved_function() -> (Driver, TestQueue, VirtioPciState) {
    let mut d = Driver::new();
    let mut tq = TestQueue::new(GuestAddress(0x8_0000), 16);
    d.negotiate(FEATURES);
    d.write(CONFIG_MSIX_VECTOR, 2, 0);
    d.setup_queue(0, &tq, 1);
    d.enable_msix(&[(0, 0xfee0_0000, 0x30), (1, 0xfee0_1000, 0x31)]);
    d.set_status(status::DRIVER_OK);
    tq.add_chain(&d.mem, &[Desc::w(0x1_0000, 16)]);
    assert!(d.dev.queue_handler().handle(0));
    assert_eq!(d.msi.take(), vec![(0xfee0_1000, 0x31)]);
    assert!(tq.pop_used(&d.mem).is_some());
    d.dev.quiesce();
    tq.add_chain(&d.mem, &[Desc::w(0x2_0000, 24)]);
    assert!(!d.dev.queue_handler().handle(0));
    let state = crate::persist::testing::through_json(&d.dev.save());
    (d, tq, state)
}

#[test]
fn a_restored_function_reads_the_same_and_interrupts_on_the_saved_vectors() {
    let (mut source, mut tq, state) = saved_function();
    assert_eq!((state.config_vector, state.queue_vectors.as_slice()), (0, &[1][..]));
    let mut d = Driver::on(source.mem.clone());
    assert_ne!(visible(&mut d.dev), visible(&mut source.dev), "the comparison sees the difference");
    d.dev.restore(&state).unwrap();
    assert_eq!(d.dev.save(), state);
    assert_eq!(visible(&mut d.dev), visible(&mut source.dev));
    assert_eq!(d.msi.take(), vec![], "a restore sends no message");
    d.dev.resume();
    assert_eq!(d.dev.queue_events()[0].read().unwrap(), 1);
    assert!(d.dev.queue_handler().handle(0));
    assert_eq!(tq.pop_used(&d.mem).map(|u| u.1), Some(24), "the waiting request, once");
    assert_eq!(tq.pop_used(&d.mem), None);
    assert_eq!(d.msi.take(), vec![(0xfee0_1000, 0x31)], "on the queue's vector");
    d.dev.interrupt().signal_config_change();
    assert_eq!(d.msi.take(), vec![(0xfee0_0000, 0x30)], "configuration changes on the config vector");
    assert_eq!(d.read(CONFIG_GENERATION, 1), 1);
}

#[test]
fn bad_function_states_are_refused_and_change_nothing() {
    use crate::persist::testing::assert_refused;
    let (_, _, good) = saved_function();
    let mut target = Driver::new().dev;
    let bad = |change: &dyn Fn(&mut VirtioPciState)| {
        let mut state = good.clone();
        change(&mut state);
        state
    };
    assert_refused(&mut target, &bad(&|s| s.config_vector = 2), "config_vector");
    assert_refused(&mut target, &bad(&|s| s.queue_vectors[0] = 0x7ff), "queue_vectors[0]");
    assert_refused(&mut target, &bad(&|s| s.queue_vectors.push(0)), "queue_vectors");
    assert_refused(&mut target, &bad(&|s| s.config_space.bytes[0] ^= 1), "bytes[0x000]");
    assert_refused(&mut target, &bad(&|s| s.msix.enabled = false), "message control");
    assert_refused(&mut target, &bad(&|s| s.msix.vectors.truncate(1)), "vectors");
    assert_refused(&mut target, &bad(&|s| s.virtio.queues[0].size = 3), "queues[0]");
    assert_refused(&mut target, &bad(&|s| s.virtio.status |= status::NEEDS_RESET), "status");
    let json = serde_json::to_string(&good).unwrap().replacen("\"queue_vectors\"", "\"isr\":0,\"queue_vectors\"", 1);
    assert!(serde_json::from_str::<VirtioPciState>(&json).is_err(), "fields from elsewhere are refused");
}

#[test]
fn mutated_function_states_never_panic() {
    use crate::persist::testing::fuzz_restore;
    let (source, _, state) = saved_function();
    let mem = source.mem.clone();
    let fresh = || {
        let msi = Arc::new(RecordingSender::default());
        VirtioPciDevice::new(mem.clone(), Arc::new(Mutex::new(Rng::new())), msi, "rng0".into()).unwrap()
    };
    let exercise = |dev: &mut VirtioPciDevice| {
        dev.resume();
        dev.queue_handler().handle(0);
        visible(dev);
        bar_read(dev, ISR_OFFSET, 1);
        bar_write(dev, DEVICE_STATUS, 1, 0xff);
        dev.quiesce();
    };
    let counts = fuzz_restore(fresh, &state, exercise, 2000);
    assert!(counts.loaded > 50 && counts.refused > 100 && counts.unparsable > 100, "{counts:?}");
}

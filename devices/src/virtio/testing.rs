//! The driver's side of a split virtqueue, laid out in guest memory by hand, so tests and fuzz targets can build
//! any chain, well-formed or not (compiled for tests and with the `test-utils` feature).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use super::{GuestMemoryMmap, Queue, QueueT};
use crate::InterruptLine;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;

/// Guest memory of `size` bytes at address 0.
pub fn guest_memory(size: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).expect("mapping test guest memory")
}

/// A raw descriptor as the driver writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl Desc {
    /// A device-readable buffer.
    pub fn r(addr: u64, len: u32) -> Self {
        Desc { addr, len, flags: 0, next: 0 }
    }
    /// A device-writable buffer.
    pub fn w(addr: u64, len: u32) -> Self {
        Desc { addr, len, flags: DESC_F_WRITE, next: 0 }
    }
}

/// A split virtqueue's rings at fixed guest addresses: descriptor table, available ring, used ring, back to back.
#[derive(Clone, Debug)]
pub struct TestQueue {
    pub size: u16,
    pub desc_table: GuestAddress,
    pub avail_ring: GuestAddress,
    pub used_ring: GuestAddress,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl TestQueue {
    /// Rings for a queue of `size` (a power of two) starting at `base` (16-byte aligned).
    pub fn new(base: GuestAddress, size: u16) -> Self {
        let avail_ring = GuestAddress(base.0 + 16 * u64::from(size));
        // flags, idx, ring[size], used_event; the used ring is 4-byte aligned.
        let used_ring = GuestAddress((avail_ring.0 + 6 + 2 * u64::from(size) + 3) & !3);
        TestQueue { size, desc_table: base, avail_ring, used_ring, next_desc: 0, avail_idx: 0, used_seen: 0 }
    }

    /// The first address after the rings.
    pub fn end(&self) -> GuestAddress {
        GuestAddress(self.used_ring.0 + 6 + 8 * u64::from(self.size))
    }

    /// A device-side `Queue` configured for these rings and marked ready.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("queue size");
        q.set_desc_table_address(Some(self.desc_table.0 as u32), Some((self.desc_table.0 >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail_ring.0 as u32), Some((self.avail_ring.0 >> 32) as u32));
        q.set_used_ring_address(Some(self.used_ring.0 as u32), Some((self.used_ring.0 >> 32) as u32));
        q.set_ready(true);
        q
    }

    /// Writes descriptor `index` of the table.
    pub fn write_desc(&self, mem: &GuestMemoryMmap, index: u16, d: Desc) {
        write_desc_at(mem, GuestAddress(self.desc_table.0 + 16 * u64::from(index)), d);
    }

    /// Lays `descs` out in consecutive table entries (wrapping), linked with NEXT, and makes the chain available.
    /// Returns the head index.
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, descs: &[Desc]) -> u16 {
        let head = self.next_desc;
        for (i, d) in descs.iter().enumerate() {
            let index = self.next_desc;
            self.next_desc = (self.next_desc + 1) % self.size;
            let mut d = *d;
            if i + 1 < descs.len() {
                d.flags |= DESC_F_NEXT;
                d.next = self.next_desc;
            }
            self.write_desc(mem, index, d);
        }
        self.publish(mem, head);
        head
    }

    /// Puts `head` on the available ring and bumps its index.
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head.to_le(), GuestAddress(self.avail_ring.0 + 4 + 2 * slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(mem, self.avail_idx);
    }

    /// Writes the available ring's index directly (hostile drivers lie about it).
    pub fn set_avail_idx(&self, mem: &GuestMemoryMmap, idx: u16) {
        mem.write_obj(idx.to_le(), GuestAddress(self.avail_ring.0 + 2)).unwrap();
    }

    /// Writes the available ring's `used_event` (EVENT_IDX): the driver wants an interrupt once the used index
    /// passes `idx`.
    pub fn set_used_event(&self, mem: &GuestMemoryMmap, idx: u16) {
        mem.write_obj(idx.to_le(), GuestAddress(self.avail_ring.0 + 4 + 2 * u64::from(self.size))).unwrap();
    }

    /// The used ring's index.
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        u16::from_le(mem.read_obj(GuestAddress(self.used_ring.0 + 2)).unwrap())
    }

    /// The next used element not yet returned: (descriptor head, bytes written).
    pub fn pop_used(&mut self, mem: &GuestMemoryMmap) -> Option<(u32, u32)> {
        if self.used_seen == self.used_idx(mem) {
            return None;
        }
        let slot = u64::from(self.used_seen % self.size);
        let at = self.used_ring.0 + 4 + 8 * slot;
        let id = u32::from_le(mem.read_obj(GuestAddress(at)).unwrap());
        let len = u32::from_le(mem.read_obj(GuestAddress(at + 4)).unwrap());
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((id, len))
    }
}

/// Writes a raw descriptor at `at` (in a descriptor table or an indirect table).
pub fn write_desc_at(mem: &GuestMemoryMmap, at: GuestAddress, d: Desc) {
    let mut raw = [0u8; 16];
    raw[0..8].copy_from_slice(&d.addr.to_le_bytes());
    raw[8..12].copy_from_slice(&d.len.to_le_bytes());
    raw[12..14].copy_from_slice(&d.flags.to_le_bytes());
    raw[14..16].copy_from_slice(&d.next.to_le_bytes());
    mem.write_slice(&raw, at).unwrap();
}

/// An interrupt line that counts how often it was raised.
#[derive(Debug, Default)]
pub struct CountingLine(AtomicUsize);

impl CountingLine {
    pub fn new() -> Arc<Self> {
        Arc::new(CountingLine::default())
    }
    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

impl InterruptLine for CountingLine {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A driver's side of a virtio-mmio transport, through its registers as Linux uses them.
pub struct MmioDriver<'t>(pub &'t mut super::mmio::MmioTransport);

impl MmioDriver<'_> {
    pub fn read(&mut self, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        crate::BusDevice::read(self.0, offset, &mut data);
        u32::from_le_bytes(data)
    }

    pub fn write(&mut self, offset: u64, value: u32) {
        crate::BusDevice::write(self.0, offset, &value.to_le_bytes());
    }

    /// ACKNOWLEDGE, DRIVER, `features`, FEATURES_OK; returns the status read back.
    pub fn negotiate(&mut self, features: u64) -> u32 {
        use super::mmio::{DRIVER_FEATURES, DRIVER_FEATURES_SEL, STATUS};
        use super::status;
        self.write(STATUS, status::ACKNOWLEDGE);
        self.write(STATUS, status::ACKNOWLEDGE | status::DRIVER);
        for word in 0..2 {
            self.write(DRIVER_FEATURES_SEL, word);
            self.write(DRIVER_FEATURES, (features >> (32 * word)) as u32);
        }
        self.write(STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        self.read(STATUS)
    }

    /// Configures queue `index` on `ring`'s addresses and enables it; returns whether it is ready.
    pub fn set_up_queue(&mut self, index: u32, ring: &TestQueue) -> bool {
        use super::mmio::{QUEUE_DESC_LOW, QUEUE_DEVICE_LOW, QUEUE_DRIVER_LOW, QUEUE_NUM, QUEUE_READY, QUEUE_SEL};
        self.write(QUEUE_SEL, index);
        self.write(QUEUE_NUM, u32::from(ring.size));
        for (low, addr) in
            [(QUEUE_DESC_LOW, ring.desc_table), (QUEUE_DRIVER_LOW, ring.avail_ring), (QUEUE_DEVICE_LOW, ring.used_ring)]
        {
            self.write(low, addr.0 as u32);
            self.write(low + 4, (addr.0 >> 32) as u32);
        }
        self.write(QUEUE_READY, 1);
        self.read(QUEUE_READY) == 1
    }

    /// Negotiates `features`, sets up queue `i` on `rings[i]` and sets DRIVER_OK; returns the status read back.
    pub fn start(&mut self, features: u64, rings: &[&TestQueue]) -> u32 {
        use super::mmio::STATUS;
        self.negotiate(features);
        for (index, ring) in rings.iter().enumerate() {
            assert!(self.set_up_queue(index as u32, ring), "queue {index} accepted");
        }
        let s = self.read(STATUS);
        self.write(STATUS, s | super::status::DRIVER_OK);
        self.read(STATUS)
    }

    /// What the driver sees of the transport: every register with its queue selector at each queue, and the
    /// first `config_len` bytes of the device configuration.
    pub fn registers(&mut self, queues: u32, config_len: u64) -> Vec<u32> {
        use super::mmio::*;
        let mut seen = Vec::new();
        let selected = self.read(QUEUE_SEL);
        for sel in 0..2 {
            self.write(DEVICE_FEATURES_SEL, sel);
            seen.push(self.read(DEVICE_FEATURES));
        }
        for reg in [STATUS, INTERRUPT_STATUS, CONFIG_GENERATION] {
            seen.push(self.read(reg));
        }
        for queue in 0..queues {
            self.write(QUEUE_SEL, queue);
            let registers = [
                QUEUE_NUM_MAX,
                QUEUE_READY,
                QUEUE_DESC_LOW,
                QUEUE_DESC_HIGH,
                QUEUE_DRIVER_LOW,
                QUEUE_DRIVER_HIGH,
                QUEUE_DEVICE_LOW,
                QUEUE_DEVICE_HIGH,
            ];
            for reg in registers {
                seen.push(self.read(reg));
            }
        }
        self.write(QUEUE_SEL, selected);
        for offset in (0..config_len).step_by(4) {
            seen.push(self.read(CONFIG + offset));
        }
        seen
    }
}

/// Guest memory size the fuzz bodies lay the input into.
const FUZZ_MEM: usize = 64 << 10;
/// Queue size for the fuzz bodies: the descriptor table at 0, the available ring at 0x100, the used ring at 0x128.
const FUZZ_QUEUE: u16 = 16;

fn fuzz_memory(data: &[u8]) -> GuestMemoryMmap {
    let mem = guest_memory(FUZZ_MEM);
    let n = data.len().min(FUZZ_MEM);
    mem.write_slice(&data[..n], GuestAddress(0)).unwrap();
    mem
}

/// Fuzz body for descriptor-chain parsing: `data` is guest memory (descriptor table at 0, available ring at
/// 0x100, indirect tables and buffers anywhere). Every available chain is parsed and the parser's promises are
/// checked: segments are in guest memory unless reported, the order is readable then writable, splitting keeps
/// the bytes. Then the same memory is driven through a device's queue (virtio-rng), used ring and all.
pub fn fuzz_descriptor_chain(data: &[u8]) {
    use vm_memory::{GuestMemory, Permissions};

    use super::chain;

    let mem = fuzz_memory(data);
    let tq = TestQueue::new(GuestAddress(0), FUZZ_QUEUE);
    let mut queue = tq.queue();
    for _ in 0..FUZZ_QUEUE {
        let Some(c) = queue.pop_descriptor_chain(&mem) else { break };
        let Ok(parsed) = chain::parse(c, 64) else { continue };
        assert!(parsed.readable.len() + parsed.writable.len() <= 64);
        if parsed.bad_segment.is_none() {
            for s in &parsed.readable {
                assert!(mem.check_range(s.addr, s.len as usize, Permissions::Read));
            }
            for s in &parsed.writable {
                assert!(mem.check_range(s.addr, s.len as usize, Permissions::Write));
            }
        }
        let total = chain::total_len(&parsed.readable);
        for at in [0, 1, 16, total / 2, total, total + 1] {
            let (front, back) = chain::split_at(&parsed.readable, at);
            assert_eq!(chain::total_len(&front), at.min(total));
            assert_eq!(chain::total_len(&front) + chain::total_len(&back), total);
        }
    }

    let mem = fuzz_memory(data);
    let mut rng = super::rng::Rng::new();
    let features = super::features::VERSION_1 | super::features::RING_INDIRECT_DESC;
    super::VirtioDevice::ack_features(&mut rng, features | data.first().map_or(0, |b| u64::from(b & 1) << 29));
    let irq = Arc::new(super::VirtioInterrupt::new(CountingLine::new()));
    super::VirtioDevice::activate(&mut rng, mem, vec![tq.queue()], irq).unwrap();
    super::VirtioDevice::process_queue(&mut rng, 0);
}

/// Fuzz body for virtio-blk requests: `data` is guest memory as for [`fuzz_descriptor_chain`]; its first byte
/// also picks read-only mode and the negotiated ring features. The disk is a 64 KiB in-memory file that must
/// keep its size whatever the requests say.
pub fn fuzz_blk_request(data: &[u8]) {
    use super::block::{Block, BlockOptions};
    use super::VirtioDevice;

    let disk = fuzz_disk();
    let flags = data.first().copied().unwrap_or(0);
    let read_only = flags & 1 != 0;
    let mut blk = Block::with_file(disk.try_clone().unwrap(), &BlockOptions { read_only, ..Default::default() })
        .expect("fuzz disk");
    let ring = (u64::from(flags >> 1) & 3) << 28;
    blk.ack_features(blk.avail_features() & (super::features::VERSION_1 | ring | 0x7fff));
    let mem = fuzz_memory(data);
    let tq = TestQueue::new(GuestAddress(0), FUZZ_QUEUE);
    let irq = Arc::new(super::VirtioInterrupt::new(CountingLine::new()));
    blk.activate(mem, vec![tq.queue()], irq).unwrap();
    blk.process_queue(0);
    assert_eq!(disk.metadata().unwrap().len(), FUZZ_DISK, "the image changed size");
}

/// Fuzz body for virtio-net: `data` is guest memory holding the receive queue's rings as for
/// [`fuzz_descriptor_chain`] and the transmit queue's at 0x200 (available ring 0x300, used ring 0x328); its first
/// byte also picks the negotiated ring features and the sizes of two frames the host sends. The device transmits
/// whatever the driver queued and receives the host's frames; every frame that reaches the host must be a whole,
/// bounded frame behind a clean header.
pub fn fuzz_net_queues(data: &[u8]) {
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixDatagram;

    use super::net::{Net, NetBackend, MAX_FRAME_LEN, RX_QUEUE, TX_QUEUE, VNET_HDR_LEN};
    use super::VirtioDevice;

    struct Datagrams(UnixDatagram);
    impl NetBackend for Datagrams {
        fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.0.recv(buf)
        }
        fn send(&mut self, parts: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
            let frame: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
            self.0.send(&frame)
        }
        fn raw_fd(&self) -> std::os::fd::RawFd {
            self.0.as_raw_fd()
        }
    }

    let (device_end, host) = UnixDatagram::pair().expect("socket pair");
    device_end.set_nonblocking(true).unwrap();
    host.set_nonblocking(true).unwrap();
    let flags = data.first().copied().unwrap_or(0);
    for size in [usize::from(flags & 0x3f) * 40, usize::from(flags >> 6) * 700] {
        host.send(&vec![0x42; VNET_HDR_LEN + size]).unwrap();
    }
    let mut net = Net::new(super::net::MacAddress::default_for(0), Box::new(Datagrams(device_end)));
    let ring = (u64::from(flags) & 3) << 28;
    net.ack_features(net.avail_features() & (super::features::VERSION_1 | ring | 0xffff_ffff));
    let mem = fuzz_memory(data);
    let rx = TestQueue::new(GuestAddress(0), FUZZ_QUEUE);
    let tx = TestQueue::new(GuestAddress(0x200), FUZZ_QUEUE);
    let irq = Arc::new(super::VirtioInterrupt::new(CountingLine::new()));
    net.activate(mem, vec![rx.queue(), tx.queue()], irq).unwrap();
    net.process_queue(TX_QUEUE);
    net.process_host_event(0);
    net.process_queue(RX_QUEUE);
    let mut buf = vec![0u8; 2 * MAX_FRAME_LEN];
    while let Ok(n) = host.recv(&mut buf) {
        assert!((VNET_HDR_LEN + 14..=VNET_HDR_LEN + MAX_FRAME_LEN).contains(&n), "a {n}-byte frame was sent");
        assert_eq!(buf[..VNET_HDR_LEN], [0; VNET_HDR_LEN], "the header sent is clean");
    }
    let c = net.counters();
    assert!(c.rx_packets + c.rx_dropped <= 2, "{c:?}");
}

/// Fuzz body for virtio-balloon: `data` is guest memory holding the inflate queue's rings as for
/// [`fuzz_descriptor_chain`], the deflate queue's at 0x200 and the statistics queue's at 0x400; its first byte also
/// picks the negotiated ring features. The device serves all three and a statistics poll; whatever the frame
/// numbers say, it gives back at most the pages the inflate buffers can name, and its rings stay consistent.
pub fn fuzz_balloon_queues(data: &[u8]) {
    use super::balloon::{Balloon, DEFLATE_QUEUE, INFLATE_QUEUE, MAX_PFNS_PER_BUFFER, PAGE_SIZE, STATS_QUEUE};
    use super::VirtioDevice;

    let mut balloon = Balloon::new(false).expect("a timer");
    let flags = data.first().copied().unwrap_or(0);
    let ring = (u64::from(flags) & 3) << 28;
    balloon.ack_features(balloon.avail_features() & (super::features::VERSION_1 | ring | 0xffff_ffff));
    let mem = fuzz_memory(data);
    let queues = [0, 0x200, 0x400].map(|at| TestQueue::new(GuestAddress(at), FUZZ_QUEUE));
    let irq = Arc::new(super::VirtioInterrupt::new(CountingLine::new()));
    balloon.activate(mem, queues.iter().map(TestQueue::queue).collect(), irq).unwrap();
    for queue in [INFLATE_QUEUE, DEFLATE_QUEUE, STATS_QUEUE, STATS_QUEUE] {
        balloon.process_queue(queue);
    }
    let _ = balloon.set_poll_interval(1);
    balloon.process_host_event(0);
    let bound = u64::from(FUZZ_QUEUE) * MAX_PFNS_PER_BUFFER as u64 * PAGE_SIZE;
    assert!(balloon.discarded_bytes() <= bound, "{} bytes given back", balloon.discarded_bytes());
    // (A broken queue is dead until the driver resets the device: where its indices stopped says nothing.)
    if let Some(stats) = balloon.active_queues().and_then(|a| a.position(STATS_QUEUE)).filter(|s| !s.broken) {
        assert_eq!(stats.next_avail, stats.next_used, "the statistics buffer is held on the ring, never taken");
    }
}

/// Fuzz body for a multiport virtio-console (ports 0 and 1, the console and a named port): `data` is guest memory
/// holding the control receiveq's rings as for [`fuzz_descriptor_chain`], the control transmitq's at 0x200, port 1's
/// receiveq at 0x400 and transmitq at 0x600; its first byte also picks the negotiated ring features and whether the
/// host side of port 1 connects. The driver's control messages (any ids, events and values) are handled, the
/// device's are delivered, host input goes to port 1 and its output to the host. Whatever the guest does, no more
/// than four messages a port wait for it and no panic.
pub fn fuzz_console_queues(data: &[u8]) {
    use super::console::{
        Console, PortSetup, CONTROL_RX_QUEUE, CONTROL_TX_QUEUE, F_MULTIPORT, MAX_PENDING_INPUT, QUEUE_SIZE,
    };
    use super::{VirtioDevice, VirtioDeviceState};

    let flags = data.first().copied().unwrap_or(0);
    let ports = vec![
        PortSetup { nr: 0, name: None, console: true, output: Box::new(std::io::sink()), host_connected: true },
        PortSetup {
            nr: 1,
            name: Some("org.qemu.guest_agent.0".into()),
            console: false,
            output: Box::new(std::io::sink()),
            host_connected: flags & 4 != 0,
        },
    ];
    let mut console = Console::with_ports(2, ports).expect("two ports");
    let ring = (u64::from(flags) & 3) << 28;
    console.ack_features(super::features::VERSION_1 | F_MULTIPORT | ring);
    let mem = fuzz_memory(data);
    let ring_at = |base: u64| TestQueue::new(GuestAddress(base), FUZZ_QUEUE).queue();
    let idle = || Queue::new(QUEUE_SIZE).expect("queue size");
    let queues = vec![idle(), idle(), ring_at(0), ring_at(0x200), ring_at(0x400), ring_at(0x600)];
    let irq = Arc::new(super::VirtioInterrupt::new(CountingLine::new()));
    console.activate(mem, queues, irq).unwrap();
    console.queue_input(1, b"{\"execute\":\"guest-ping\"}\n");
    for round in 0..3 {
        console.process_queue(CONTROL_TX_QUEUE);
        console.process_queue(CONTROL_RX_QUEUE);
        console.set_host_connected(1, (flags >> round) & 8 != 0);
        console.process_queue(4);
        console.process_queue(5);
    }
    let VirtioDeviceState::Console(state) = console.save_state() else { panic!("a console saves a console state") };
    assert!(state.control.len() <= 8, "{} control messages wait", state.control.len());
    assert!(state.ports.iter().all(|p| p.pending_input.len() <= MAX_PENDING_INPUT));
}

const FUZZ_DISK: u64 = 64 << 10;

/// Fuzz body for opening a qcow2 image: `data` is the image file, as a hostile image would be handed to Kestrel.
/// It is opened as the device opens it (header checks, imago, the backing chain it names), read-only and then
/// writable; an image that opens is read at its start, middle and end, and the writable one is written, zeroed,
/// discarded and flushed. Opening may refuse anything, but nothing may panic, hang or allocate without bound.
pub fn fuzz_qcow2_open(data: &[u8]) {
    use super::image::open_qcow2;
    let path = fuzz_image_path();
    for writable in [false, true] {
        // The writable pass starts from the input again (the read-only one changed nothing, but be plain).
        std::fs::write(&path, data).unwrap();
        let Ok((mut image, info)) = open_qcow2(&path, !writable, false, &Default::default()) else { continue };
        let size = image.size();
        assert_eq!(info.virtual_size, size);
        let mut buf = vec![0u8; 4096];
        for offset in [0, size / 2 / 512 * 512, size.saturating_sub(4096)] {
            let len = buf.len().min((size - offset.min(size)) as usize);
            let _ = image.read(&mut buf[..len], offset);
        }
        if writable && size >= 4096 {
            let at = size / 2 / 4096 * 4096;
            let _ = image.write(&buf[..], at);
            let _ = image.write_zeroes(0, 4096);
            let _ = image.discard_to_any(at, 4096);
            let _ = image.discard_to_zero(size - 4096, 4096);
            let _ = image.flush();
        }
    }
}

/// Where the qcow2 fuzz body writes its image: a file of this process and thread (relative backing file names
/// resolve in its directory, where nothing else lives).
fn fuzz_image_path() -> std::path::PathBuf {
    thread_local! {
        static PATH: std::path::PathBuf = {
            let name = format!("kestrel-fuzz-qcow2-{}-{:?}", std::process::id(), std::thread::current().id());
            let dir = std::env::temp_dir().join(name.replace(['(', ')'], ""));
            std::fs::create_dir_all(&dir).unwrap();
            dir.join("image.qcow2")
        };
    }
    PATH.with(|p| p.clone())
}

/// One in-memory image per thread, shared by all fuzz iterations.
fn fuzz_disk() -> std::fs::File {
    use std::os::fd::FromRawFd;
    thread_local! {
        static DISK: std::fs::File = {
            // SAFETY: a plain syscall with a NUL-terminated name; the returned descriptor is owned by the File.
            let fd = unsafe { libc::memfd_create(c"kestrel-fuzz-disk".as_ptr(), libc::MFD_CLOEXEC) };
            assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
            // SAFETY: `fd` is a fresh descriptor nobody else owns.
            let file = unsafe { std::fs::File::from_raw_fd(fd) };
            file.set_len(FUZZ_DISK).unwrap();
            file
        };
    }
    DISK.with(|f| f.try_clone().unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fuzz bodies over a fixed pseudo-random corpus, so they run under `cargo test` without nightly.
    #[test]
    fn fuzz_bodies_survive_a_smoke_corpus() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for i in 0..300 {
            let len = (next() % 1024) as usize + 1;
            let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Keep descriptors pointing into the first 64 KiB often enough to reach the device code.
            for d in 0..usize::from(FUZZ_QUEUE) {
                if d * 16 + 16 <= data.len() && i % 2 == 0 {
                    data[d * 16 + 2..d * 16 + 8].fill(0);
                    data[d * 16 + 10..d * 16 + 12].fill(0);
                }
            }
            fuzz_descriptor_chain(&data);
            fuzz_blk_request(&data);
            fuzz_net_queues(&data);
            fuzz_balloon_queues(&data);
            fuzz_console_queues(&data);
        }
    }

    /// What libFuzzer found in a fresh-clone CI run: the statistics buffer held, given back at the poll, then a
    /// second one whose head index lies outside the table, which breaks the queue with its indices where they
    /// stopped. The body must take it.
    #[test]
    fn the_balloon_fuzz_body_takes_a_statistics_queue_broken_after_a_poll() {
        let hex: String = [
            "d70100bf0000000001000e0829ff000000000000000000000000000000d70100bf000000000100082e29ff00000000000000",
            "0000000000000000009b00000000000000000000000000000000000000000000000000000000000000000000000000000000",
            "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
            "000000000000000000000000000000000000000040cb2c000040cb000000000000000000fb00000000000000000000000000",
            "0000000000000000000000000000000000000000000000000000000000009b00000000000000000000000000000000000000",
            "0000760e000099000000000000000000000000000000000000ffffffffff04ac000001000000000000000030000000000000",
            "00009bfffffff900000000000000000000000000000000000000000000000000000000000040000000000000000000000000",
            "000000000000000000760099000000000000000000000000000000000000ffffffffff04ac00000100000000000000003000",
            "000000000000009bfffffff900000000000000000000000000000000000000000000000000000000000040cb2c00000040cb",
            "00000000000000000000000000000000000000000a000000ffff04ac0000012c000040cb0000000000000000000000000000",
            "000000000000003a0000000000000000000000000000000000d70100bf000000000100082e29ff0000000000000000000000",
            "00000000009b000000000000000000000000000000000000000026000000000000000000000000000040cb2c000040cb0000",
            "00000000000000fb000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
            "009b0000000000000000000000000000000000000000007600990008000000000000000100082e29ff000000000000000000",
            "000000000000009b0000000000000000000000760099000000000000000000000000000000000000ffffffffff04ac000000",
            "000000000000000000000000000000ffffffffff04ac00000100000000000000003000000000000000000000000000000000",
            "000000000040cb2c000040cb0000010000000000000000000000000000000000000000000000000000000000000000000000",
            "0000000000000040cb2c000040cb000000000000000000000000000000000000000000000000000000000000000030000000",
            "00000000009bfffffff900000000000000000000000000000000000000000000000000000000000040cb2c00000040cb0000",
            "0000000000000000000000000000000000000a000000ffff04ac0000012c000040cb000000000000000000000000fffffffe",
            "00000000f6000000000000000000009b00000000000000000000000000000000000000000000000000000000080000000000",
            "0040cb0000000000000000000000003a00000000000000000000000000000000000000000000000000000000000000000000",
            "00000000000000000000000000000040cb2c00000040cb00000000000000000000000000000000000000000a000000000000",
            "000000000000d70100bf000000000000ffffffffffffffff00009bfffffff9000000000000000000000000000000003a0000",
            "0000000000000000000000080000000000000000000000000000000000000000000000000000000000000000000000000000",
            "0000000040cb2c00000040cb00000000000000000000000000000000000000000a00000095000000ffff04ac0000012c0000",
            "40cb000000000000000000000000000000000000950000003a00000000000000009500000000000800000000000000000000",
            "0000000000000000000095ffffffff00959595ff95ffffffffff000000ff01959595",
        ]
        .concat();
        let data: Vec<u8> =
            (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
        fuzz_balloon_queues(&data);
    }

    /// A qcow2 image made by hand (version 3, 64 KiB clusters, 1 MiB, one L1 entry, a refcount table and block),
    /// then mutated: flipped bits and overwritten header fields, so that the opener's checks and imago's metadata
    /// paths see hostile values beyond the magic under `cargo test` too.
    #[test]
    fn qcow2_fuzz_body_survives_a_smoke_corpus() {
        let image = handmade_qcow2();
        let path = fuzz_image_path();
        std::fs::write(&path, &image).unwrap();
        let opened = crate::virtio::image::open_qcow2(&path, false, false, &Default::default());
        assert_eq!(opened.map(|(image, _)| image.size()).map_err(|e| e.to_string()), Ok(1 << 20), "the seed opens");
        fuzz_qcow2_open(&image);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..200 {
            let mut data = image.clone();
            for _ in 0..(next() % 8 + 1) {
                // Mostly the header and the first tables, where the metadata is.
                let at = (next() % 0x40000) as usize % data.len();
                match next() % 3 {
                    0 => data[at] ^= 1 << (next() % 8),
                    1 => data[at] = next() as u8,
                    _ => {
                        let end = (at + 8).min(data.len());
                        data[at..end].fill(0xff);
                    }
                }
            }
            fuzz_qcow2_open(&data);
        }
    }

    /// Clusters: 0 header, 1 refcount table, 2 refcount block, 3 L1 table (L2 tables and data unallocated).
    fn handmade_qcow2() -> Vec<u8> {
        const CLUSTER: usize = 1 << 16;
        let mut image = vec![0u8; 4 * CLUSTER];
        let mut put = |at: usize, bytes: &[u8]| image[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, b"QFI\xfb");
        put(4, &3u32.to_be_bytes()); // version
        put(20, &16u32.to_be_bytes()); // cluster_bits
        put(24, &(1u64 << 20).to_be_bytes()); // size
        put(36, &1u32.to_be_bytes()); // l1_size
        put(40, &(3 * CLUSTER as u64).to_be_bytes()); // l1_table_offset
        put(48, &(CLUSTER as u64).to_be_bytes()); // refcount_table_offset
        put(56, &1u32.to_be_bytes()); // refcount_table_clusters
        put(96, &4u32.to_be_bytes()); // refcount_order (16-bit)
        put(100, &104u32.to_be_bytes()); // header_length
        put(CLUSTER, &(2 * CLUSTER as u64).to_be_bytes()); // refcount table -> block
        for cluster in 0..4 {
            put(2 * CLUSTER + 2 * cluster, &1u16.to_be_bytes());
        }
        image
    }
}

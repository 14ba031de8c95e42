//! virtio-net (virtio 1.2, 5.1) with one receive/transmit queue pair, on a host backend that carries whole
//! Ethernet frames each preceded by a 12-byte `virtio_net_hdr_v1` (a tap with IFF_VNET_HDR, see [`tap`]).
//!
//! Features: VERSION_1, MAC (the configuration space's `mac`) and STATUS (`status`, always LINK_UP). Not offered:
//! checksum and segmentation offloads (CSUM, GUEST_CSUM, *_TSO*, *_UFO), MRG_RXBUF, the control queue and
//! multiqueue. Without offloads every frame is at most the interface MTU plus its Ethernet header, checksummed in
//! full, and the tap is told the same (TUNSETOFFLOAD 0); without MRG_RXBUF each received frame goes into one
//! chain (Linux then posts receive buffers large enough for a full-MTU frame).
//!
//! # Transmit
//!
//! Each transmit chain is the header followed by one frame, all device-readable. It is copied out of guest memory
//! and written to the backend in one `writev`: header, then frame. The header written is all zeros (no checksum
//! or segmentation requested), whatever the driver put there: nothing was negotiated that would let it ask for
//! more. A chain that is too short (no room for a header and an Ethernet header), too long (more than
//! [`MAX_FRAME_LEN`] after the header), has device-writable descriptors or points outside guest memory is
//! returned with length 0 and nothing is written to the backend. A frame the backend refuses is dropped and
//! counted. Used transmit chains always have length 0 (the device writes nothing into them).
//!
//! # Receive
//!
//! When the backend is readable and the driver has receive buffers, one frame is read into one chain's writable
//! part: the header first (num_buffers = 1), then the frame. A frame larger than the chain is dropped and
//! counted (never truncated), and the chain returned with length 0. When the driver has no receive buffers the
//! device stops reading, leaving frames in the backend, and asks the driver to notify it of the next buffer; the
//! receive queue's notification resumes reading. The backend's readiness is edge-triggered (mio), so reading
//! goes on until the backend would block or the buffers run out, and resuming never waits for an edge.
//!
//! # Hostile chains
//!
//! Parsed by [`chain::parse`]. Receive chains with a device-readable descriptor, a segment outside guest memory or
//! no room for a header are returned with length 0 and keep the frame for the next chain. A driver that corrupts
//! the rings themselves breaks that queue until the device is reset (NEEDS_RESET), as for every device here.

pub mod tap;

use std::fmt;
use std::io::{self, IoSlice};
use std::os::fd::RawFd;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use virtio_queue::QueueOwnedT;

use super::chain::{self, Chain};
use super::{features, DriverState, GuestErrorLog, GuestMemoryMmap, Queue, QueueT, VirtioDevice, VirtioDeviceState};
use crate::StateError;

pub const QUEUE_SIZE: u16 = 256;
/// The receiveq (host → guest).
pub const RX_QUEUE: usize = 0;
/// The transmitq (guest → host).
pub const TX_QUEUE: usize = 1;
/// `virtio_net_hdr_v1`: what precedes every frame on both queues and on the backend (VERSION_1 makes it 12 bytes
/// whether or not MRG_RXBUF is negotiated).
pub const VNET_HDR_LEN: usize = 12;
/// Frames longer than this (after the header) are refused on transmit: 64 KiB, more than any MTU-sized frame.
pub const MAX_FRAME_LEN: usize = 64 << 10;
/// Destination, source and EtherType: the shortest frame worth sending.
const ETH_HEADER_LEN: usize = 14;
/// Receive reads take this much: the largest frame a tap can hold without offloads (MTU 65535 + Ethernet and VLAN
/// headers) and its vnet header, with room to spare so that a read that fills it is known to be oversized.
const RX_READ_LEN: usize = VNET_HDR_LEN + 65536 + 64;
/// Descriptors the device looks at per chain.
const MAX_DESCRIPTORS: usize = QUEUE_SIZE as usize;
/// `num_buffers`' offset in the header.
const NUM_BUFFERS_OFFSET: usize = 10;

/// Device feature bits (virtio 1.2, 5.1.3).
pub mod feature {
    pub const MAC: u64 = 1 << 5;
    pub const STATUS: u64 = 1 << 16;
}

/// `status` in the configuration space.
const STATUS_LINK_UP: u16 = 1;

static LOG: GuestErrorLog = GuestErrorLog::new("virtio-net");

/// Where frames come from and go to. A tap in the VMM; a datagram socket in the tests.
pub trait NetBackend: Send {
    /// Reads one frame, preceded by its [`VNET_HDR_LEN`]-byte header, into `buf`; returns its length. Never
    /// blocks: [`io::ErrorKind::WouldBlock`] when no frame is waiting.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;

    /// Writes `parts` (header, then frame) as one frame.
    fn send(&mut self, parts: &[IoSlice<'_>]) -> io::Result<usize>;

    /// What polls readable when a frame is waiting.
    fn raw_fd(&self) -> RawFd;
}

/// An Ethernet MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddress(pub [u8; 6]);

impl MacAddress {
    /// The address a device gets when none is given: 52:54:00:12:34:56 for the first network device, ...:57 for
    /// the second, and so on (QEMU's locally administered prefix and numbering), the same on every run.
    pub fn default_for(index: usize) -> Self {
        MacAddress([0x52, 0x54, 0x00, 0x12, 0x34, 0x56u8.wrapping_add(index as u8)])
    }
}

/// Why a MAC address was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    #[error("use six hexadecimal bytes separated by ':', like 52:54:00:12:34:56")]
    Syntax,
    #[error("it is a multicast address (the first byte is odd); a network device needs a unicast one")]
    Multicast,
    #[error("the all-zero address is not usable")]
    Zero,
}

impl FromStr for MacAddress {
    type Err = MacError;

    fn from_str(text: &str) -> Result<Self, MacError> {
        let mut bytes = [0u8; 6];
        let mut parts = text.split(':');
        for byte in &mut bytes {
            let part = parts.next().ok_or(MacError::Syntax)?;
            if part.len() != 2 || !part.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(MacError::Syntax);
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| MacError::Syntax)?;
        }
        if parts.next().is_some() {
            return Err(MacError::Syntax);
        }
        if bytes[0] & 1 != 0 {
            return Err(MacError::Multicast);
        }
        if bytes == [0; 6] {
            return Err(MacError::Zero);
        }
        Ok(MacAddress(bytes))
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4], b[5])
    }
}

/// What went through the device since it was created (kept across resets). Bytes are frame bytes, without
/// the vnet header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Frames read from the backend and not delivered (larger than the receive buffer).
    pub rx_dropped: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Transmit chains not sent: malformed, or refused by the backend.
    pub tx_dropped: u64,
}

pub struct Net {
    mac: MacAddress,
    backend: Box<dyn NetBackend>,
    driver: DriverState,
    /// Read buffer; `rx_held` bytes of it are a frame (with header) read from the backend and not yet delivered
    /// (the chain offered for it was unusable).
    rx_buffer: Vec<u8>,
    rx_held: Option<usize>,
    tx_buffer: Vec<u8>,
    counters: NetCounters,
    /// Reported once each: an oversized frame, a backend failure on either side.
    oversized_reported: bool,
    backend_error_reported: bool,
}

impl Net {
    pub fn new(mac: MacAddress, backend: Box<dyn NetBackend>) -> Self {
        Net {
            mac,
            backend,
            driver: DriverState::default(),
            rx_buffer: vec![0; RX_READ_LEN],
            rx_held: None,
            tx_buffer: Vec::with_capacity(VNET_HDR_LEN + MAX_FRAME_LEN),
            counters: NetCounters::default(),
            oversized_reported: false,
            backend_error_reported: false,
        }
    }

    pub fn mac(&self) -> MacAddress {
        self.mac
    }

    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    fn backend_failed(&mut self, what: &str, e: &io::Error) {
        if !std::mem::replace(&mut self.backend_error_reported, true) {
            eprintln!("kestrel: virtio-net: {what} the host interface failed: {e}; frames are dropped while it fails");
        }
    }

    /// Moves frames from the backend into receive buffers until either runs out. Returns whether the driver
    /// wants an interrupt.
    fn receive(&mut self) -> bool {
        let Some(active) = self.driver.active.as_mut() else { return false };
        let Some((queue, mem)) = active.usable(RX_QUEUE) else { return false };
        let mut rx = Receiver {
            backend: &mut *self.backend,
            buffer: &mut self.rx_buffer,
            held: &mut self.rx_held,
            counters: &mut self.counters,
            oversized_reported: &mut self.oversized_reported,
            backend_error: None,
        };
        let result = rx.run(queue, mem);
        let backend_error = rx.backend_error.take();
        let notify = match result {
            Ok(notify) => notify,
            Err(why) => active.break_queue(RX_QUEUE, &LOG, &why),
        };
        if let Some(e) = backend_error {
            self.backend_failed("reading from", &e);
        }
        notify
    }

    fn receive_and_signal(&mut self) {
        if self.receive() {
            if let Some(active) = &self.driver.active {
                active.interrupt.signal_used_queue(RX_QUEUE);
            }
        }
    }

    fn transmit(&mut self) -> bool {
        let Some(active) = self.driver.active.as_mut() else { return false };
        let backend = &mut *self.backend;
        let buffer = &mut self.tx_buffer;
        let counters = &mut self.counters;
        let mut backend_error = None;
        let notify = active.process(TX_QUEUE, &LOG, |mem, chain| {
            let sent = match chain::parse(chain, MAX_DESCRIPTORS) {
                Ok(c) => gather_frame(mem, &c, buffer).and_then(|frame_len| {
                    let parts = [IoSlice::new(&[0; VNET_HDR_LEN]), IoSlice::new(&buffer[..frame_len])];
                    match backend.send(&parts) {
                        Ok(_) => Some(frame_len),
                        Err(e) => {
                            backend_error.get_or_insert(e);
                            None
                        }
                    }
                }),
                Err(e) => {
                    LOG.report(format_args!("{e}"));
                    None
                }
            };
            match sent {
                Some(len) => {
                    counters.tx_packets += 1;
                    counters.tx_bytes += len as u64;
                }
                None => counters.tx_dropped += 1,
            }
            0
        });
        if let Some(e) = backend_error {
            self.backend_failed("writing to", &e);
        }
        notify
    }
}

/// Copies a transmit chain's frame (what follows the header) into `buffer`; returns its length, or `None` for a
/// chain that must not be sent (logged).
fn gather_frame(mem: &GuestMemoryMmap, chain: &Chain, buffer: &mut Vec<u8>) -> Option<usize> {
    let refuse = |why: fmt::Arguments<'_>| {
        LOG.report(format_args!("transmit chain {}: {why}; not sent", chain.head));
        None
    };
    if let Some(bad) = chain.bad_segment {
        return refuse(format_args!("{:#x}+{:#x} is outside guest memory", bad.addr.0, bad.len));
    }
    if !chain.writable.is_empty() {
        return refuse(format_args!("has device-writable descriptors"));
    }
    let total = chain::total_len(&chain.readable);
    if total < (VNET_HDR_LEN + ETH_HEADER_LEN) as u64 {
        return refuse(format_args!("{total} bytes is too short for a header and a frame"));
    }
    if total > (VNET_HDR_LEN + MAX_FRAME_LEN) as u64 {
        return refuse(format_args!("{total} bytes is longer than a header and {MAX_FRAME_LEN} bytes"));
    }
    let frame_len = total as usize - VNET_HDR_LEN;
    let (_, frame) = chain::split_at(&chain.readable, VNET_HDR_LEN as u64);
    buffer.resize(frame_len, 0);
    match chain::read_stream(mem, &frame, buffer) {
        Ok(()) => Some(frame_len),
        Err(_) => refuse(format_args!("could not be read")),
    }
}

/// The receive path's borrow of the device, so the queue can be borrowed beside it.
struct Receiver<'a> {
    backend: &'a mut dyn NetBackend,
    buffer: &'a mut [u8],
    held: &'a mut Option<usize>,
    counters: &'a mut NetCounters,
    oversized_reported: &'a mut bool,
    /// The first failure of the backend other than WouldBlock (which ends the pass like WouldBlock does).
    backend_error: Option<io::Error>,
}

/// What became of the frame offered to a receive chain.
enum Delivery {
    /// Written, this many bytes with the header.
    Delivered(u32),
    /// The chain cannot take any frame; the frame waits for the next one.
    BadChain,
    /// The frame does not fit the chain: dropped.
    TooLarge,
}

impl Receiver<'_> {
    /// Pops receive chains and fills them with frames from the backend until the backend would block or the driver
    /// has no more buffers (then asks for a notification of the next one). The ring-level checks are those of
    /// `ActiveQueues::process`, which cannot be used here: it consumes every available chain, and receive buffers
    /// must stay with the driver while there is no frame for them.
    fn run(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, String> {
        let err = |e: virtio_queue::Error| e.to_string();
        let mut used = false;
        // Out of buffers: frames stay in the backend until the driver posts more and notifies.
        while let Some(chain) = super::pop_available(queue, mem)? {
            let frame_len = match *self.held {
                Some(len) => len,
                None => match self.backend.recv(self.buffer) {
                    Ok(len) => {
                        *self.held = Some(len);
                        len
                    }
                    Err(e) => {
                        // The buffer goes back to the driver's side of the ring, unused.
                        queue.go_to_previous_position();
                        match e.kind() {
                            io::ErrorKind::Interrupted => continue,
                            io::ErrorKind::WouldBlock => {}
                            _ => self.backend_error = Some(e),
                        }
                        break;
                    }
                },
            };
            let head = chain.head_index();
            let delivery = match chain::parse(chain, MAX_DESCRIPTORS) {
                Ok(c) => {
                    let held = frame_len.min(self.buffer.len());
                    deliver(mem, &c, &mut self.buffer[..held], frame_len)
                }
                Err(e) => {
                    LOG.report(format_args!("{e}"));
                    Delivery::BadChain
                }
            };
            let len = match delivery {
                Delivery::Delivered(len) => {
                    *self.held = None;
                    self.counters.rx_packets += 1;
                    self.counters.rx_bytes += frame_len.saturating_sub(VNET_HDR_LEN) as u64;
                    len
                }
                Delivery::BadChain => 0,
                Delivery::TooLarge => {
                    *self.held = None;
                    self.counters.rx_dropped += 1;
                    if !std::mem::replace(self.oversized_reported, true) {
                        eprintln!(
                            "kestrel: virtio-net: a {frame_len}-byte frame (with header) did not fit the guest's \
                             receive buffer and was dropped; further drops are only counted"
                        );
                    }
                    0
                }
            };
            queue.add_used(mem, head, len).map_err(err)?;
            used = true;
        }
        Ok(used && queue.needs_notification(mem).map_err(err)?)
    }
}

/// Writes a frame read from the backend (`data`, header included; `read_len` is what the read returned, more
/// than `data` holds if the frame was cut) into the writable part of `chain`.
fn deliver(mem: &GuestMemoryMmap, chain: &Chain, data: &mut [u8], read_len: usize) -> Delivery {
    if let Some(bad) = chain.bad_segment {
        LOG.report(format_args!(
            "receive chain {} names {:#x}+{:#x} outside guest memory",
            chain.head, bad.addr.0, bad.len
        ));
        return Delivery::BadChain;
    }
    if !chain.readable.is_empty() {
        LOG.report(format_args!("receive chain {} has device-readable descriptors", chain.head));
        return Delivery::BadChain;
    }
    let room = chain::total_len(&chain.writable);
    if room < VNET_HDR_LEN as u64 {
        LOG.report(format_args!("receive chain {} has no room for a header ({room} bytes)", chain.head));
        return Delivery::BadChain;
    }
    // A read that filled the whole buffer may have been cut short by it; a frame shorter than a header is not one.
    if !(VNET_HDR_LEN..RX_READ_LEN).contains(&read_len) || read_len as u64 > room {
        return Delivery::TooLarge;
    }
    data[NUM_BUFFERS_OFFSET..VNET_HDR_LEN].copy_from_slice(&1u16.to_le_bytes());
    match chain::write_stream(mem, &chain.writable, data) {
        Ok(n) if n == data.len() => Delivery::Delivered(n as u32),
        _ => {
            // Cannot happen after parse's checks.
            LOG.report(format_args!("receive chain {} could not be written", chain.head));
            Delivery::BadChain
        }
    }
}

/// virtio-net as data: its MAC (checked against the device restored into: the guest knows it) and the frame it
/// read from the host for the guest and could not deliver yet (the chain offered for it was unusable), which is
/// the guest's next frame. Frames still in the tap stay there. Transmit and receive are carried out while the
/// device holds its lock, so a saved device has no chain in flight (see [`transport`](super::transport)). The
/// counters are the host's accounting of this process and start afresh, and so do the once-only reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetState {
    /// As `52:54:00:12:34:56`.
    pub mac: String,
    /// With its header, as the backend gave it.
    pub held_frame: Option<Vec<u8>>,
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        super::TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        features::COMMON | feature::MAC | feature::STATUS
    }

    /// `mac` (6 bytes), then `status` (le16); fields of features not offered read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&self.mac.0);
        config[6..8].copy_from_slice(&STATUS_LINK_UP.to_le_bytes());
        for (i, byte) in data.iter_mut().enumerate() {
            let at = offset.checked_add(i as u64).and_then(|at| usize::try_from(at).ok());
            *byte = at.and_then(|at| config.get(at)).copied().unwrap_or(0);
        }
    }

    /// The MAC is read-only without VIRTIO_NET_F_CTRL_MAC_ADDR (not offered), and so is the status.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn driver(&self) -> &DriverState {
        &self.driver
    }

    fn driver_mut(&mut self) -> &mut DriverState {
        &mut self.driver
    }

    /// Frames that waited in the backend, for buffers posted before DRIVER_OK.
    fn activated(&mut self) {
        self.receive_and_signal();
    }

    /// The frame held for a bad receive chain is dropped (and counted); frames still in the backend wait for the
    /// next driver.
    fn reset_device(&mut self) {
        if self.rx_held.take().is_some() {
            self.counters.rx_dropped += 1;
        }
    }

    fn process_queue(&mut self, index: usize) -> bool {
        match index {
            RX_QUEUE => self.receive(),
            TX_QUEUE => self.transmit(),
            _ => false,
        }
    }

    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Net(NetState {
            mac: self.mac.to_string(),
            held_frame: self.rx_held.map(|len| self.rx_buffer[..len].to_vec()),
        })
    }

    fn restore_device_state(&mut self, state: &VirtioDeviceState, running: bool) -> Result<(), StateError> {
        let VirtioDeviceState::Net(state) = state else { return Err(state.mismatch(LOG.device)) };
        let refuse = |field: &str, problem: String| Err(StateError::new(LOG.device, field, problem));
        match state.mac.parse::<MacAddress>() {
            Ok(mac) if mac == self.mac => {}
            Ok(_) => return refuse("mac", format!("{} in the snapshot, this device has {}", state.mac, self.mac)),
            Err(e) => return refuse("mac", format!("{:?}: {e}", state.mac)),
        }
        if let Some(frame) = &state.held_frame {
            if frame.len() > self.rx_buffer.len() {
                let problem = format!("{} bytes, more than a read from the host gives", frame.len());
                return refuse("held_frame", problem);
            }
            if !running {
                return refuse("held_frame", "a frame held for a device that is not running".into());
            }
        }
        self.rx_held = state.held_frame.as_ref().map(|frame| {
            self.rx_buffer[..frame.len()].copy_from_slice(frame);
            frame.len()
        });
        Ok(())
    }

    fn host_event_sources(&self) -> Vec<RawFd> {
        vec![self.backend.raw_fd()]
    }

    fn process_host_event(&mut self, index: usize) -> Option<usize> {
        (index == 0 && self.receive()).then_some(RX_QUEUE)
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixDatagram;
    use std::sync::Arc;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::virtio::testing::{guest_memory, CountingLine, Desc, TestQueue, DESC_F_NEXT};
    use crate::virtio::VirtioInterrupt;

    /// One end of a datagram socket pair: frames keep their boundaries, as on a tap.
    struct DatagramBackend(UnixDatagram);

    impl NetBackend for DatagramBackend {
        fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.0.recv(buf)
        }
        fn send(&mut self, parts: &[IoSlice<'_>]) -> io::Result<usize> {
            let frame: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
            self.0.send(&frame)
        }
        fn raw_fd(&self) -> RawFd {
            self.0.as_raw_fd()
        }
    }

    /// The host side of the device's backend.
    struct Peer(UnixDatagram);

    impl Peer {
        /// Sends `frame` to the device, behind a header with garbage in the fields the device must overwrite.
        fn send_frame(&self, frame: &[u8]) {
            let mut data = vec![0u8; VNET_HDR_LEN];
            data[NUM_BUFFERS_OFFSET..].copy_from_slice(&[0xee, 0xee]);
            data.extend_from_slice(frame);
            assert_eq!(self.0.send(&data).unwrap(), data.len());
        }

        /// Every frame (with header) the device sent so far.
        fn received(&self) -> Vec<Vec<u8>> {
            let mut frames = Vec::new();
            let mut buf = vec![0u8; 1 << 17];
            loop {
                match self.0.recv(&mut buf) {
                    Ok(n) => frames.push(buf[..n].to_vec()),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return frames,
                    Err(e) => panic!("peer recv: {e}"),
                }
            }
        }
    }

    const MAC: MacAddress = MacAddress([0x52, 0x54, 0x00, 0xab, 0xcd, 0xef]);

    fn net() -> (Net, Peer) {
        let (device_end, peer_end) = UnixDatagram::pair().unwrap();
        device_end.set_nonblocking(true).unwrap();
        peer_end.set_nonblocking(true).unwrap();
        (Net::new(MAC, Box::new(DatagramBackend(device_end))), Peer(peer_end))
    }

    struct Rig {
        mem: GuestMemoryMmap,
        rx: TestQueue,
        tx: TestQueue,
        irq: Arc<VirtioInterrupt>,
    }

    impl Rig {
        fn new() -> Self {
            Rig {
                mem: guest_memory(1 << 20),
                rx: TestQueue::new(GuestAddress(0x1000), 16),
                tx: TestQueue::new(GuestAddress(0x3000), 16),
                irq: Arc::new(VirtioInterrupt::new(CountingLine::new())),
            }
        }

        fn activate(&self, net: &mut Net) {
            net.ack_features(features::VERSION_1 | feature::MAC | feature::STATUS);
            net.activate(self.mem.clone(), vec![self.rx.queue(), self.tx.queue()], self.irq.clone()).unwrap();
        }

        fn read(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut buf = vec![0u8; len];
            self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
            buf
        }

        fn used(queue: &mut TestQueue, mem: &GuestMemoryMmap) -> Vec<u32> {
            std::iter::from_fn(|| queue.pop_used(mem)).map(|(_, len)| len).collect()
        }

        fn rx_used(&mut self) -> Vec<u32> {
            Self::used(&mut self.rx, &self.mem)
        }

        fn tx_used(&mut self) -> Vec<u32> {
            Self::used(&mut self.tx, &self.mem)
        }

        /// Puts a header (with `hdr_byte` in every byte) and `frame` in guest memory at `at`.
        fn put_packet(&self, at: u64, hdr_byte: u8, frame: &[u8]) {
            self.mem.write_slice(&[hdr_byte; VNET_HDR_LEN], GuestAddress(at)).unwrap();
            self.mem.write_slice(frame, GuestAddress(at + VNET_HDR_LEN as u64)).unwrap();
        }
    }

    fn frame(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    fn header_then(frame: &[u8]) -> Vec<u8> {
        let mut expected = vec![0u8; VNET_HDR_LEN];
        expected.extend_from_slice(frame);
        expected
    }

    /// The header the guest must see: all zero but num_buffers = 1.
    fn rx_header() -> Vec<u8> {
        let mut h = vec![0u8; VNET_HDR_LEN];
        h[NUM_BUFFERS_OFFSET] = 1;
        h
    }

    #[test]
    fn identifies_as_a_network_device_with_its_mac_and_link_up() {
        let (mut net, _peer) = net();
        assert_eq!(net.device_type(), 1);
        assert_eq!(net.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
        let f = net.avail_features();
        assert_eq!(
            f & (features::VERSION_1 | feature::MAC | feature::STATUS),
            features::VERSION_1 | (1 << 5) | (1 << 16)
        );
        // No CSUM, GUEST_CSUM, TSO/UFO, MRG_RXBUF, CTRL_VQ, MQ.
        assert_eq!(f & ((1 << 0) | (1 << 1) | (0x3ff << 6) | (1 << 15) | (1 << 17) | (1 << 22)), 0);
        let mut config = [0xffu8; 12];
        net.read_config(0, &mut config);
        assert_eq!(config, [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef, 1, 0, 0, 0, 0, 0]);
        let mut status = [0u8; 2];
        net.read_config(6, &mut status);
        assert_eq!(u16::from_le_bytes(status), STATUS_LINK_UP);
        let mut far = [0xffu8; 4];
        net.read_config(u64::MAX - 1, &mut far);
        assert_eq!(far, [0; 4]);
        net.write_config(0, &[0; 6]);
        net.read_config(0, &mut config[..6]);
        assert_eq!(config[..6], MAC.0, "the MAC is read-only");
    }

    #[test]
    fn a_transmitted_frame_reaches_the_backend_intact_behind_a_clean_header() {
        let (mut net, peer) = net();
        let mut rig = Rig::new();
        rig.activate(&mut net);
        // Header on its own descriptor, the frame split over two; the driver's header has garbage in it.
        let f = frame(1514, 7);
        rig.mem.write_slice(&[0x5a; VNET_HDR_LEN], GuestAddress(0x10000)).unwrap();
        rig.mem.write_slice(&f[..100], GuestAddress(0x20000)).unwrap();
        rig.mem.write_slice(&f[100..], GuestAddress(0x30000)).unwrap();
        rig.tx.add_chain(
            &rig.mem,
            &[Desc::r(0x10000, VNET_HDR_LEN as u32), Desc::r(0x20000, 100), Desc::r(0x30000, 1414)],
        );
        // Header and frame in one descriptor.
        let g = frame(60, 9);
        rig.put_packet(0x40000, 0, &g);
        rig.tx.add_chain(&rig.mem, &[Desc::r(0x40000, (VNET_HDR_LEN + g.len()) as u32)]);
        assert!(net.process_queue(TX_QUEUE));
        assert_eq!(rig.tx_used(), [0, 0]);
        assert_eq!(peer.received(), [header_then(&f), header_then(&g)]);
        let c = net.counters();
        assert_eq!((c.tx_packets, c.tx_bytes, c.tx_dropped), (2, 1574, 0));
    }

    #[test]
    fn hostile_transmit_chains_are_consumed_and_never_reach_the_backend() {
        let (mut net, peer) = net();
        let mut rig = Rig::new();
        rig.activate(&mut net);
        let good = frame(64, 1);
        rig.put_packet(0x10000, 0, &good);
        let packet = (VNET_HDR_LEN + good.len()) as u32;
        rig.tx.add_chain(&rig.mem, &[Desc::r(0x10000, VNET_HDR_LEN as u32)]); // a header and no frame
        rig.tx.add_chain(&rig.mem, &[Desc::r(0x10000, 25)]); // shorter than header + Ethernet header
        rig.tx.add_chain(&rig.mem, &[Desc::r(0x10000, (VNET_HDR_LEN + MAX_FRAME_LEN + 1) as u32)]); // too long
        rig.tx.add_chain(&rig.mem, &[Desc::r(0x10000, 40_000), Desc::r(0x10000, 40_000)]); // too long in pieces
        rig.tx.add_chain(&rig.mem, &[Desc::r(0x10000, packet), Desc::w(0x20000, 16)]); // writable part
        rig.tx.add_chain(&rig.mem, &[Desc::w(0x20000, 100)]);
        rig.tx.add_chain(&rig.mem, &[Desc::r(0x10000, packet), Desc::r(0xfff_0000, 16)]); // outside memory
        rig.tx.add_chain(&rig.mem, &[Desc::r((1 << 20) - 40, 100)]); // straddles the end
        rig.tx.add_chain(&rig.mem, &[Desc::r(u64::MAX - 1, 100)]); // wraps
        rig.tx.add_chain(&rig.mem, &[Desc::w(0x20000, 1), Desc::r(0x10000, packet)]); // readable after writable
        let head = rig.tx.add_chain(&rig.mem, &[Desc::r(0x10000, packet)]); // loops to itself
        rig.tx.write_desc(&rig.mem, head, Desc { flags: DESC_F_NEXT, next: head, ..Desc::r(0x10000, packet) });
        rig.tx.add_chain(&rig.mem, &[Desc::r(0x10000, packet)]);
        assert!(net.process_queue(TX_QUEUE));
        assert_eq!(rig.tx_used(), [0; 12]);
        assert_eq!(peer.received(), [header_then(&good)], "only the good chain was sent");
        assert_eq!((net.counters().tx_packets, net.counters().tx_dropped), (1, 11));
        assert!(!rig.irq.needs_reset());
    }

    #[test]
    fn a_received_frame_fills_a_chain_with_header_and_frame() {
        let (mut net, peer) = net();
        let mut rig = Rig::new();
        rig.activate(&mut net);
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x10000, 8), Desc::w(0x20000, 1600)]);
        assert!(!net.process_queue(RX_QUEUE), "buffers alone use nothing");
        let f = frame(1514, 3);
        peer.send_frame(&f);
        assert_eq!(net.process_host_event(0), Some(RX_QUEUE));
        assert_eq!(rig.rx_used(), [(VNET_HDR_LEN + f.len()) as u32]);
        let mut got = rig.read(0x10000, 8);
        got.extend(rig.read(0x20000, VNET_HDR_LEN - 8 + f.len()));
        let mut expected = rx_header();
        expected.extend_from_slice(&f);
        assert_eq!(got, expected);
        assert_eq!(rig.read(0x20000 + (VNET_HDR_LEN - 8 + f.len()) as u64, 8), [0; 8], "nothing past the frame");
        let c = net.counters();
        assert_eq!((c.rx_packets, c.rx_bytes, c.rx_dropped), (1, 1514, 0));
        assert_eq!(net.process_host_event(1), None, "there is only one host source");
    }

    #[test]
    fn without_buffers_frames_wait_and_delivery_resumes_when_buffers_come() {
        let (mut net, peer) = net();
        let mut rig = Rig::new();
        rig.activate(&mut net);
        let frames: Vec<Vec<u8>> = (0..3).map(|i| frame(100 + i, i as u8)).collect();
        for f in &frames {
            peer.send_frame(f);
        }
        // The backend's edge comes while the driver has no buffers: nothing is read, nothing lost.
        assert_eq!(net.process_host_event(0), None);
        assert_eq!(rig.rx.used_idx(&rig.mem), 0);
        // One buffer: one frame. The notification is all the device gets; no new edge comes for the rest.
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x10000, 2048)]);
        assert!(net.process_queue(RX_QUEUE));
        assert_eq!(rig.rx_used(), [112]);
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x20000, 2048)]);
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x30000, 2048)]);
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x40000, 2048)]);
        assert!(net.process_queue(RX_QUEUE));
        assert_eq!(rig.rx_used(), [113, 114], "the last buffer stays with the driver");
        for (i, at) in [0x10000u64, 0x20000, 0x30000].into_iter().enumerate() {
            assert_eq!(rig.read(at + VNET_HDR_LEN as u64, frames[i].len()), frames[i], "frame {i} in order");
        }
        // The backend is drained; a later frame is taken on its edge.
        peer.send_frame(&frames[0]);
        assert_eq!(net.process_host_event(0), Some(RX_QUEUE));
        assert_eq!(rig.rx_used(), [112]);
        assert_eq!(net.counters().rx_packets, 4);
    }

    #[test]
    fn event_idx_asks_for_the_next_receive_buffer_when_starved() {
        let (mut net, peer) = net();
        let mut rig = Rig::new();
        net.ack_features(features::VERSION_1 | features::RING_EVENT_IDX);
        net.activate(rig.mem.clone(), vec![rig.rx.queue(), rig.tx.queue()], rig.irq.clone()).unwrap();
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x10000, 2048)]);
        peer.send_frame(&frame(60, 0));
        peer.send_frame(&frame(60, 1));
        net.process_host_event(0);
        assert_eq!(rig.rx_used(), [72]);
        let avail_event = GuestAddress(rig.rx.used_ring.0 + 4 + 8 * u64::from(rig.rx.size));
        assert_eq!(u16::from_le(rig.mem.read_obj(avail_event).unwrap()), 1, "notify me at the next buffer");
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x20000, 2048)]);
        net.process_queue(RX_QUEUE);
        assert_eq!(rig.rx_used(), [72]);
        assert_eq!(rig.read(0x20000 + VNET_HDR_LEN as u64, 60), frame(60, 1));
    }

    #[test]
    fn a_frame_larger_than_the_buffer_is_dropped_not_truncated() {
        let (mut net, peer) = net();
        let mut rig = Rig::new();
        rig.activate(&mut net);
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x10000, 100)]);
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x20000, 100)]);
        peer.send_frame(&frame(200, 0));
        peer.send_frame(&frame(88, 1)); // exactly fills the second buffer
        assert_eq!(net.process_host_event(0), Some(RX_QUEUE));
        assert_eq!(rig.rx_used(), [0, 100]);
        assert_eq!(rig.read(0x10000, 100), [0; 100], "nothing of the big frame was written");
        assert_eq!(rig.read(0x20000 + VNET_HDR_LEN as u64, 88), frame(88, 1));
        let c = net.counters();
        assert_eq!((c.rx_packets, c.rx_dropped), (1, 1));
    }

    #[test]
    fn hostile_receive_chains_get_nothing_and_the_frame_waits_for_a_good_one() {
        let (mut net, peer) = net();
        let mut rig = Rig::new();
        rig.activate(&mut net);
        rig.rx.add_chain(&rig.mem, &[Desc::r(0x10000, 2048)]); // readable
        rig.rx.add_chain(&rig.mem, &[Desc::r(0x10000, 16), Desc::w(0x11000, 2048)]);
        rig.rx.add_chain(&rig.mem, &[Desc::w(0xfff_0000, 2048)]); // outside memory
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x12000, 64), Desc::w((1 << 20) - 4, 2048)]); // partly outside
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x13000, 8)]); // no room for a header
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x13000, 1), Desc::r(0x10000, 2)]); // readable after writable
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x10000, u32::MAX)]); // absurd length
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x14000, 2048)]);
        let f = frame(300, 5);
        peer.send_frame(&f);
        assert_eq!(net.process_host_event(0), Some(RX_QUEUE));
        assert_eq!(rig.rx_used(), [0, 0, 0, 0, 0, 0, 0, 312]);
        assert_eq!(rig.read(0x14000 + VNET_HDR_LEN as u64, 300), f);
        for at in [0x10000, 0x11000, 0x12000, 0x13000] {
            assert_eq!(rig.read(at, 8), [0; 8], "nothing written at {at:#x}");
        }
        assert!(!rig.irq.needs_reset());
        assert_eq!((net.counters().rx_packets, net.counters().rx_dropped), (1, 0));
    }

    #[test]
    fn corrupt_rings_break_only_their_queue_until_reset() {
        let (mut net, peer) = net();
        let mut rig = Rig::new();
        rig.activate(&mut net);
        rig.rx.set_avail_idx(&rig.mem, 1000);
        peer.send_frame(&frame(60, 0));
        assert_eq!(net.process_host_event(0), Some(RX_QUEUE));
        assert!(rig.irq.needs_reset());
        assert_eq!(net.process_host_event(0), None, "a broken queue is left alone");
        // The transmitq still works.
        let g = frame(60, 2);
        rig.put_packet(0x20000, 0, &g);
        rig.tx.add_chain(&rig.mem, &[Desc::r(0x20000, 72)]);
        assert!(net.process_queue(TX_QUEUE));
        assert_eq!(peer.received(), [header_then(&g)]);

        // The frame waited in the backend for the next driver.
        net.reset();
        rig.irq.reset();
        let mut rig = Rig::new();
        rig.activate(&mut net);
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x10000, 2048)]);
        assert!(net.process_queue(RX_QUEUE));
        assert_eq!(rig.rx_used(), [72]);
        assert_eq!(rig.read(0x10000 + VNET_HDR_LEN as u64, 60), frame(60, 0));
    }

    #[test]
    fn reset_stops_the_device_and_reactivation_resumes_with_counters_kept() {
        let (mut net, peer) = net();
        let mut rig = Rig::new();
        rig.activate(&mut net);
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x10000, 2048)]);
        peer.send_frame(&frame(60, 0));
        assert_eq!(net.process_host_event(0), Some(RX_QUEUE));
        net.reset();
        peer.send_frame(&frame(70, 1));
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x20000, 2048)]);
        assert!(net.process_host_event(0).is_none() && !net.process_queue(RX_QUEUE) && !net.process_queue(TX_QUEUE));
        // Buffers posted before DRIVER_OK are filled at activation.
        let mut rig = Rig::new();
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x10000, 2048)]);
        rig.activate(&mut net);
        assert_eq!(rig.rx_used(), [82]);
        assert_eq!(rig.read(0x10000 + VNET_HDR_LEN as u64, 70), frame(70, 1));
        assert_eq!(rig.irq.status() & crate::virtio::INT_VRING, crate::virtio::INT_VRING);
        assert_eq!(net.counters().rx_packets, 2);
    }

    #[test]
    fn a_failing_backend_drops_frames_and_the_device_goes_on() {
        let (mut net, peer) = net();
        let mut rig = Rig::new();
        rig.activate(&mut net);
        drop(peer);
        let g = frame(60, 0);
        rig.put_packet(0x20000, 0, &g);
        rig.tx.add_chain(&rig.mem, &[Desc::r(0x20000, 72)]);
        rig.tx.add_chain(&rig.mem, &[Desc::r(0x20000, 72)]);
        assert!(net.process_queue(TX_QUEUE));
        assert_eq!(rig.tx_used(), [0, 0]);
        assert_eq!((net.counters().tx_packets, net.counters().tx_dropped), (0, 2));
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x10000, 2048)]);
        assert_eq!(net.process_host_event(0), None);
        assert_eq!(rig.rx.used_idx(&rig.mem), 0, "the buffer stays with the driver");
    }

    #[test]
    fn mac_addresses_parse_strictly() {
        assert_eq!("52:54:00:12:34:56".parse(), Ok(MacAddress([0x52, 0x54, 0, 0x12, 0x34, 0x56])));
        assert_eq!("02:AB:cd:EF:00:01".parse(), Ok(MacAddress([2, 0xab, 0xcd, 0xef, 0, 1])));
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52-54-00-12-34-56",
            "525400123456",
            "5:54:00:12:34:56",
            "52:54:00:12:34:5g",
            "52:54:00:12:34:+5",
        ] {
            assert_eq!(bad.parse::<MacAddress>(), Err(MacError::Syntax), "{bad}");
        }
        assert_eq!("01:00:5e:00:00:01".parse::<MacAddress>(), Err(MacError::Multicast));
        assert_eq!("ff:ff:ff:ff:ff:ff".parse::<MacAddress>(), Err(MacError::Multicast));
        assert_eq!("00:00:00:00:00:00".parse::<MacAddress>(), Err(MacError::Zero));
        assert_eq!(MacAddress::default_for(0).to_string(), "52:54:00:12:34:56");
        assert_eq!(MacAddress::default_for(1).to_string(), "52:54:00:12:34:57");
        assert_eq!(MacAddress::default_for(1), MacAddress::default_for(1));
    }

    /// A device behind a virtio-mmio transport on `mem`.
    fn transported(net: Net, mem: &GuestMemoryMmap) -> crate::virtio::mmio::MmioTransport {
        let device = Arc::new(std::sync::Mutex::new(net));
        crate::virtio::mmio::MmioTransport::new(mem.clone(), device, CountingLine::new()).unwrap()
    }

    /// A running device quiesced with a frame held for the guest (its receive chain was unusable), a transmit
    /// chain waiting, and a frame still in the backend; its saved state, and the source's peer.
    fn saved_net() -> (Rig, crate::virtio::transport::VirtioState, Peer, Vec<u8>) {
        use crate::virtio::testing::MmioDriver;
        use crate::Persist;
        let (net, peer) = net();
        let mut rig = Rig::new();
        let mut source = transported(net, &rig.mem);
        let wanted = features::VERSION_1 | feature::MAC | feature::STATUS;
        MmioDriver(&mut source).start(wanted, &[&rig.rx, &rig.tx]);
        rig.rx.add_chain(&rig.mem, &[Desc::r(0x10000, 2048)]); // unusable: the frame is held
        let held = frame(100, 1);
        peer.send_frame(&held);
        source.queue_handler().handle_host_event(0);
        assert_eq!(rig.rx_used(), [0]);
        source.quiesce();
        peer.send_frame(&frame(60, 2));
        assert!(!source.queue_handler().handle_host_event(0), "quiesced: the frame stays in the backend");
        rig.put_packet(0x30000, 0, &frame(64, 3));
        rig.tx.add_chain(&rig.mem, &[Desc::r(0x30000, (VNET_HDR_LEN + 64) as u32)]);
        assert!(!source.queue_handler().handle(TX_QUEUE));
        assert_eq!(peer.received(), Vec::<Vec<u8>>::new());
        let state = crate::persist::testing::through_json(&source.save());
        (rig, state, peer, held)
    }

    #[test]
    fn a_restored_device_delivers_the_held_frame_and_sends_the_waiting_one_once() {
        use crate::Persist;
        let (mut rig, state, _source_peer, held) = saved_net();
        let VirtioDeviceState::Net(ref net_state) = state.device else { panic!("a network state: {state:?}") };
        assert_eq!(net_state.mac, "52:54:00:ab:cd:ef");
        assert_eq!(net_state.held_frame.as_deref().map(<[u8]>::len), Some(VNET_HDR_LEN + held.len()));
        // The destination's own tap.
        let (net, peer) = net();
        let mut restored = transported(net, &rig.mem);
        restored.restore(&state).unwrap();
        assert_eq!(restored.save(), state);
        assert!(!restored.queue_handler().handle(TX_QUEUE), "no work before resume");
        restored.resume();
        assert!(restored.queue_handler().handle(TX_QUEUE));
        assert_eq!(rig.tx_used(), [0]);
        assert_eq!(peer.received(), [header_then(&frame(64, 3))], "the waiting frame, sent once");
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x20000, 2048)]);
        assert!(restored.queue_handler().handle(RX_QUEUE));
        assert_eq!(rig.rx_used(), [(VNET_HDR_LEN + held.len()) as u32]);
        assert_eq!(rig.read(0x20000 + VNET_HDR_LEN as u64, held.len()), held, "the held frame comes first");
        // The destination's host traffic follows.
        let next = frame(70, 4);
        peer.send_frame(&next);
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x40000, 2048)]);
        assert!(restored.queue_handler().handle_host_event(0));
        assert_eq!(rig.read(0x40000 + VNET_HDR_LEN as u64, next.len()), next);
    }

    #[test]
    fn the_source_reads_what_waited_in_its_backend_once_resumed() {
        use crate::virtio::testing::MmioDriver;
        let (net, peer) = net();
        let mut rig = Rig::new();
        let mut source = transported(net, &rig.mem);
        MmioDriver(&mut source).start(features::VERSION_1, &[&rig.rx, &rig.tx]);
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x10000, 2048)]);
        source.quiesce();
        peer.send_frame(&frame(60, 5));
        assert!(!source.queue_handler().handle_host_event(0));
        assert_eq!(rig.rx.used_idx(&rig.mem), 0);
        // No new edge comes for a frame already waiting: the resume's notification gets it.
        source.resume();
        assert_eq!(source.queue_events()[RX_QUEUE].read().unwrap(), 1);
        assert!(source.queue_handler().handle(RX_QUEUE));
        assert_eq!(rig.rx_used(), [72]);
    }

    #[test]
    fn a_network_state_is_refused_by_another_device() {
        use crate::persist::testing::assert_refused;
        let (rig, state, ..) = saved_net();
        let other_mac =
            Net::new(MacAddress([2, 0, 0, 0, 0, 1]), Box::new(DatagramBackend(UnixDatagram::pair().unwrap().0)));
        assert_refused(&mut transported(other_mac, &rig.mem), &state, "mac");
        let change = |change: &dyn Fn(&mut NetState)| {
            let mut bad = state.clone();
            if let VirtioDeviceState::Net(n) = &mut bad.device {
                change(n);
            }
            bad
        };
        let mut target = transported(net().0, &rig.mem);
        assert_refused(&mut target, &change(&|n| n.mac = "52:54:00:ab:cd".into()), "mac");
        assert_refused(&mut target, &change(&|n| n.held_frame = Some(vec![0; RX_READ_LEN + 1])), "held_frame");
        // A frame held by a device that is not running.
        let mut stopped = Net::new(MAC, Box::new(DatagramBackend(UnixDatagram::pair().unwrap().0)));
        let VirtioDeviceState::Net(n) = &state.device else { panic!("a network state") };
        assert_eq!(stopped.restore_state(&state.device, 0, None).unwrap_err().field, "held_frame");
        assert!(n.held_frame.is_some() && stopped.rx_held.is_none());
        // The MAC is compared as an address, not as text.
        crate::Persist::restore(&mut target, &change(&|n| n.mac = n.mac.to_uppercase())).unwrap();
    }
}

//! virtio-console (virtio 1.2, 5.3) with a single port (no VIRTIO_CONSOLE_F_MULTIPORT, no SIZE, no EMERG_WRITE):
//! what Linux shows as `hvc0`.
//!
//! * Queue 0, the receiveq, carries host input to the guest in device-writable buffers the driver keeps posted.
//! * Queue 1, the transmitq, carries guest output in device-readable buffers; every byte goes to the host writer.
//!
//! # Host input
//!
//! [`Console::queue_input`] never drops a byte it accepted: input that finds no receive buffer waits in the device
//! (up to [`MAX_PENDING_INPUT`] bytes, across device resets, before activation too) and is delivered, in order,
//! as soon as the driver posts buffers. Beyond the bound new input is *refused*, whole, and the caller keeps it
//! and retries later (see [`Console::queue_input`]). Receive buffers are only taken off the available ring when
//! there is something to put in them: the driver keeps its buffers posted while the host is silent.
//!
//! # Guest output
//!
//! The transmitq is drained on every notification and each chain's bytes are written to the host writer, then the
//! writer is flushed. A failing writer (closed terminal, disconnected socket, full pipe of a non-blocking
//! descriptor) loses those bytes; the first failure is reported on stderr and the device goes on serving the
//! guest. The writer should not block for long: it runs on the thread doing queue work.
//!
//! # Hostile chains
//!
//! Chains are parsed by [`chain::parse`]. A receive chain with a device-readable descriptor, no writable byte or a
//! segment outside guest memory, and a transmit chain with a device-writable descriptor or a segment outside guest
//! memory, are returned unused (length 0, no input consumed, nothing written to the host). A driver that corrupts
//! the rings themselves breaks that queue until the device is reset (NEEDS_RESET), as for every device here.

use std::collections::VecDeque;
use std::io::{self, Write};

use serde::{Deserialize, Serialize};

use super::chain::{self, Chain};
use super::{features, DriverState, GuestErrorLog, GuestMemoryMmap, Queue, QueueT, VirtioDevice, VirtioDeviceState};
use crate::StateError;

pub const QUEUE_SIZE: u16 = 256;
/// The receiveq (host → guest).
pub const RX_QUEUE: usize = 0;
/// The transmitq (guest → host).
pub const TX_QUEUE: usize = 1;
/// Host input held while the guest has no receive buffers, at most. Input beyond it is refused.
pub const MAX_PENDING_INPUT: usize = 1 << 20;
/// Descriptors the device looks at per chain (indirect tables can be longer than the queue).
const MAX_DESCRIPTORS: usize = QUEUE_SIZE as usize;
/// Guest output is copied to the host writer in pieces of at most this size.
const OUTPUT_CHUNK: usize = 64 << 10;

static LOG: GuestErrorLog = GuestErrorLog::new("virtio-console");

pub struct Console {
    /// All a reset drops: host input not yet delivered and the writer are kept.
    driver: DriverState,
    /// Host input accepted and not yet written into a receive buffer, oldest first.
    pending_input: VecDeque<u8>,
    output: Box<dyn Write + Send>,
    /// The host writer failed once; later failures are not reported.
    output_failed: bool,
}

impl Console {
    /// A console whose guest output goes to `output`.
    pub fn new(output: Box<dyn Write + Send>) -> Self {
        Console { driver: DriverState::default(), pending_input: VecDeque::new(), output, output_failed: false }
    }

    /// Queues host input for the guest and delivers as much of it as the driver has receive buffers for, raising
    /// the guest's interrupt itself when it used buffers (so the caller needs no interrupt handle).
    ///
    /// Returns `false`, accepting nothing, when `bytes` would take the undelivered input past
    /// [`MAX_PENDING_INPUT`]: the caller keeps them and retries once the guest has taken some input, which happens
    /// when the driver posts receive buffers, i.e. after the receiveq's notification was handled
    /// ([`QueueHandler::handle`](super::QueueHandler::handle)`(`[`RX_QUEUE`]`)`); [`input_room`](Self::input_room)
    /// says how much fits. A slice longer than `MAX_PENDING_INPUT` is never accepted: feed ordinary read sizes.
    pub fn queue_input(&mut self, bytes: &[u8]) -> bool {
        if bytes.len() > self.input_room() {
            // Make room if the guest has buffers, then look again.
            self.deliver_and_signal();
            if bytes.len() > self.input_room() {
                return false;
            }
        }
        self.pending_input.extend(bytes);
        self.deliver_and_signal();
        true
    }

    /// Bytes accepted from the host and not yet delivered to the guest.
    pub fn pending_input_len(&self) -> usize {
        self.pending_input.len()
    }

    /// How many bytes [`queue_input`](Self::queue_input) accepts right now.
    pub fn input_room(&self) -> usize {
        MAX_PENDING_INPUT.saturating_sub(self.pending_input.len())
    }

    /// Delivers pending input and interrupts the guest if it wants to hear about it (outside `process_queue`).
    fn deliver_and_signal(&mut self) {
        if self.deliver_input() {
            if let Some(active) = &self.driver.active {
                active.interrupt.signal_used_queue(RX_QUEUE);
            }
        }
    }

    /// Writes pending input into the receive buffers the driver made available, while there is input. Returns
    /// whether the driver wants an interrupt.
    fn deliver_input(&mut self) -> bool {
        let Some(active) = self.driver.active.as_mut() else { return false };
        if self.pending_input.is_empty() {
            return false;
        }
        let Some((queue, mem)) = active.usable(RX_QUEUE) else { return false };
        match fill_receive_buffers(queue, mem, &mut self.pending_input) {
            Ok(notify) => notify,
            Err(why) => active.break_queue(RX_QUEUE, &LOG, &why),
        }
    }

    fn transmit(&mut self) -> bool {
        let Some(active) = self.driver.active.as_mut() else { return false };
        let mut out = Output { writer: &mut *self.output, failed: &mut self.output_failed };
        let mut scratch = Vec::new();
        let notify = active.process(TX_QUEUE, &LOG, |mem, chain| {
            match chain::parse(chain, MAX_DESCRIPTORS) {
                Ok(c) => send(mem, &c, &mut out, &mut scratch),
                Err(e) => LOG.report(format_args!("{e}")),
            }
            // Nothing is written into transmit buffers.
            0
        });
        out.flush();
        notify
    }
}

/// Pops receive chains and fills them from `pending` until either runs out (the ring-level checks are those of
/// `ActiveQueues::process`, which cannot be used here: it consumes every available chain, and receive buffers must
/// stay with the driver while there is no input for them).
fn fill_receive_buffers(queue: &mut Queue, mem: &GuestMemoryMmap, pending: &mut VecDeque<u8>) -> Result<bool, String> {
    let err = |e: virtio_queue::Error| e.to_string();
    let mut used = false;
    while !pending.is_empty() {
        // Out of buffers with input left: the driver will notify the next one.
        let Some(chain) = super::pop_available(queue, mem)? else { break };
        let head = chain.head_index();
        let len = match chain::parse(chain, MAX_DESCRIPTORS) {
            Ok(c) => receive(mem, &c, pending),
            Err(e) => {
                LOG.report(format_args!("{e}"));
                0
            }
        };
        queue.add_used(mem, head, len).map_err(err)?;
        used = true;
    }
    Ok(used && queue.needs_notification(mem).map_err(err)?)
}

/// Moves the oldest pending bytes into the writable part of `chain`; returns how many (0 for a bad chain, which
/// consumes nothing).
fn receive(mem: &GuestMemoryMmap, chain: &Chain, pending: &mut VecDeque<u8>) -> u32 {
    if let Some(bad) = chain.bad_segment {
        LOG.report(format_args!("chain {} names {:#x}+{:#x} outside guest memory", chain.head, bad.addr.0, bad.len));
        return 0;
    }
    if !chain.readable.is_empty() {
        LOG.report(format_args!("receive chain {} has device-readable descriptors", chain.head));
        return 0;
    }
    // At most MAX_PENDING_INPUT (or a chain's length, which is < 4 GiB): fits a u32.
    let n = chain::total_len(&chain.writable).min(pending.len() as u64) as usize;
    if n == 0 {
        return 0;
    }
    let (first, second) = match pending.as_slices() {
        (a, _) if n <= a.len() => (&a[..n], &[][..]),
        (a, b) => (a, &b[..n - a.len()]),
    };
    let (front, back) = chain::split_at(&chain.writable, first.len() as u64);
    let written =
        chain::write_stream(mem, &front, first).and_then(|a| Ok(a + chain::write_stream(mem, &back, second)?));
    match written {
        Ok(w) if w == n => {
            pending.drain(..n);
            n as u32
        }
        _ => {
            // Cannot happen after parse's checks; the input stays for the next buffer.
            LOG.report(format_args!("receive chain {} could not be written", chain.head));
            0
        }
    }
}

/// The host writer as the transmit path uses it: failures are reported once and lose the bytes.
struct Output<'a> {
    writer: &'a mut (dyn Write + Send),
    failed: &'a mut bool,
}

impl Output<'_> {
    fn write(&mut self, data: &[u8]) {
        let result = self.writer.write_all(data);
        self.check(result);
    }

    fn flush(&mut self) {
        let result = self.writer.flush();
        self.check(result);
    }

    fn check(&mut self, result: io::Result<()>) {
        if let Err(e) = result {
            if !std::mem::replace(self.failed, true) {
                eprintln!("kestrel: virtio-console: writing guest output failed: {e}; output is lost while it fails");
            }
        }
    }
}

/// Writes the readable part of a transmit chain to the host.
fn send(mem: &GuestMemoryMmap, chain: &Chain, out: &mut Output<'_>, scratch: &mut Vec<u8>) {
    if let Some(bad) = chain.bad_segment {
        LOG.report(format_args!("chain {} names {:#x}+{:#x} outside guest memory", chain.head, bad.addr.0, bad.len));
        return;
    }
    if !chain.writable.is_empty() {
        LOG.report(format_args!("transmit chain {} has device-writable descriptors", chain.head));
        return;
    }
    for s in &chain.readable {
        let mut done = 0u64;
        while done < u64::from(s.len) {
            let n = (u64::from(s.len) - done).min(OUTPUT_CHUNK as u64) as usize;
            scratch.resize(n, 0);
            // In memory: parse checked the whole segment.
            let piece = chain::Segment { addr: vm_memory::GuestAddress(s.addr.0 + done), len: n as u32 };
            if chain::read_stream(mem, &[piece], scratch).is_err() {
                LOG.report(format_args!("transmit chain {} could not be read", chain.head));
                return;
            }
            out.write(scratch);
            done += n as u64;
        }
    }
}

/// virtio-console as data: the host input it accepted and has not delivered yet (the host has let go of it). Guest
/// output is written to the host in the lock hold that took it off the transmitq, so a saved device has none in
/// flight (see [`transport`](super::transport)); whether the host writer failed is the host's affair.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleState {
    /// Oldest first, at most [`MAX_PENDING_INPUT`] bytes.
    pub pending_input: Vec<u8>,
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        super::TYPE_CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        features::COMMON
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // cols, rows, max_nr_ports, emerg_wr: none is valid without the features not offered; all read as zero.
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn driver(&self) -> &DriverState {
        &self.driver
    }

    fn driver_mut(&mut self) -> &mut DriverState {
        &mut self.driver
    }

    /// Input that arrived before the driver: deliver it if buffers are already posted.
    fn activated(&mut self) {
        self.deliver_and_signal();
    }

    fn process_queue(&mut self, index: usize) -> bool {
        match index {
            RX_QUEUE => self.deliver_input(),
            TX_QUEUE => self.transmit(),
            _ => false,
        }
    }

    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Console(ConsoleState { pending_input: self.pending_input.iter().copied().collect() })
    }

    /// The saved input goes ahead of input this console accepted before the restore: the destination's host input
    /// thread runs from the moment the device is built, and what it typed then comes after what the source's
    /// guest had not read yet.
    fn restore_device_state(&mut self, state: &VirtioDeviceState, _running: bool) -> Result<(), StateError> {
        let VirtioDeviceState::Console(state) = state else { return Err(state.mismatch(LOG.device)) };
        if state.pending_input.len() > MAX_PENDING_INPUT {
            let problem =
                format!("{} bytes, more than the {MAX_PENDING_INPUT} a console holds", state.pending_input.len());
            return Err(StateError::new(LOG.device, "pending_input", problem));
        }
        let typed_here = std::mem::take(&mut self.pending_input);
        self.pending_input.extend(&state.pending_input);
        self.pending_input.extend(typed_here);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::virtio::testing::{guest_memory, CountingLine, Desc, TestQueue};
    use crate::virtio::VirtioInterrupt;

    #[derive(Clone, Default)]
    struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

    impl SharedBuffer {
        fn take(&self) -> Vec<u8> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    impl Write for SharedBuffer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Fails its first `failures` writes (and flushes), then behaves like a `SharedBuffer`.
    struct FlakyWriter {
        failures: usize,
        out: SharedBuffer,
    }

    impl Write for FlakyWriter {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.failures > 0 {
                self.failures -= 1;
                return Err(io::Error::new(io::ErrorKind::BrokenPipe, "test writer failure"));
            }
            self.out.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            if self.failures > 0 {
                return Err(io::Error::new(io::ErrorKind::BrokenPipe, "test writer failure"));
            }
            Ok(())
        }
    }

    struct Rig {
        mem: GuestMemoryMmap,
        rx: TestQueue,
        tx: TestQueue,
        irq: Arc<VirtioInterrupt>,
        line: Arc<CountingLine>,
    }

    impl Rig {
        fn new() -> Self {
            let line = CountingLine::new();
            Rig {
                mem: guest_memory(1 << 20),
                rx: TestQueue::new(GuestAddress(0x1000), 16),
                tx: TestQueue::new(GuestAddress(0x3000), 16),
                irq: Arc::new(VirtioInterrupt::new(line.clone())),
                line,
            }
        }

        fn activate(&self, console: &mut Console, features: u64) {
            console.ack_features(features::VERSION_1 | features);
            console.activate(self.mem.clone(), vec![self.rx.queue(), self.tx.queue()], self.irq.clone()).unwrap();
        }

        fn read(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut buf = vec![0u8; len];
            self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
            buf
        }

        fn used_lens(queue: &mut TestQueue, mem: &GuestMemoryMmap) -> Vec<u32> {
            std::iter::from_fn(|| queue.pop_used(mem)).map(|(_, len)| len).collect()
        }

        fn rx_used(&mut self) -> Vec<u32> {
            Self::used_lens(&mut self.rx, &self.mem)
        }

        fn tx_used(&mut self) -> Vec<u32> {
            Self::used_lens(&mut self.tx, &self.mem)
        }
    }

    fn console() -> (Console, SharedBuffer) {
        let out = SharedBuffer::default();
        (Console::new(Box::new(out.clone())), out)
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn identifies_as_a_single_port_console() {
        let (console, _) = console();
        assert_eq!(console.device_type(), 3);
        assert_eq!(console.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
        assert_eq!(console.avail_features() & 0xff_ffff, 0, "no MULTIPORT, SIZE or EMERG_WRITE");
        let mut config = [0xffu8; 12];
        console.read_config(0, &mut config);
        assert_eq!(config, [0; 12]);
    }

    #[test]
    fn guest_output_reaches_the_writer_in_order() {
        let (mut console, out) = console();
        let mut rig = Rig::new();
        rig.activate(&mut console, 0);
        rig.mem.write_slice(b"hello, ", GuestAddress(0x10000)).unwrap();
        rig.mem.write_slice(b"world", GuestAddress(0x20000)).unwrap();
        rig.mem.write_slice(b"!\n", GuestAddress(0x30000)).unwrap();
        rig.mem.write_slice(b"second\n", GuestAddress(0x40000)).unwrap();
        rig.tx.add_chain(&rig.mem, &[Desc::r(0x10000, 7), Desc::r(0x20000, 5), Desc::r(0x30000, 2)]);
        rig.tx.add_chain(&rig.mem, &[Desc::r(0x40000, 7)]);
        assert!(console.process_queue(TX_QUEUE));
        assert_eq!(out.take(), b"hello, world!\nsecond\n");
        assert_eq!(rig.tx_used(), [0, 0]);
        // Larger than one output chunk, from one descriptor.
        let big = pattern(200 << 10);
        rig.mem.write_slice(&big, GuestAddress(0x50000)).unwrap();
        rig.tx.add_chain(&rig.mem, &[Desc::r(0x50000, big.len() as u32)]);
        assert!(console.process_queue(TX_QUEUE));
        assert_eq!(out.take(), big);
    }

    #[test]
    fn input_larger_than_a_buffer_fills_several_in_order() {
        let (mut console, _) = console();
        let mut rig = Rig::new();
        rig.activate(&mut console, 0);
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x10000, 16)]);
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x20000, 10), Desc::w(0x21000, 6)]);
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x30000, 16)]);
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x40000, 16)]);
        // Posting buffers with nothing to say takes none of them.
        assert!(!console.process_queue(RX_QUEUE));
        assert_eq!(rig.rx.used_idx(&rig.mem), 0);

        let input = pattern(40);
        assert!(console.queue_input(&input));
        assert_eq!(rig.rx_used(), [16, 16, 8], "the fourth buffer stays with the driver");
        assert_eq!(rig.irq.status() & crate::virtio::INT_VRING, crate::virtio::INT_VRING);
        assert!(rig.line.count() > 0);
        let mut got = rig.read(0x10000, 16);
        got.extend(rig.read(0x20000, 10));
        got.extend(rig.read(0x21000, 6));
        got.extend(rig.read(0x30000, 8));
        assert_eq!(got, input);
        assert_eq!(rig.read(0x30008, 8), [0; 8], "nothing past the input");
        assert_eq!(console.pending_input_len(), 0);

        // More input than buffers: the rest waits for the driver's next buffers.
        assert!(console.queue_input(&pattern(50)));
        assert_eq!(rig.rx_used(), [16]);
        assert_eq!(console.pending_input_len(), 34);
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x50000, 64)]);
        assert!(console.process_queue(RX_QUEUE));
        assert_eq!(rig.rx_used(), [34]);
        let mut got = rig.read(0x40000, 16);
        got.extend(rig.read(0x50000, 34));
        assert_eq!(got, pattern(50));
    }

    #[test]
    fn input_queued_before_activation_arrives_after() {
        // Buffers posted before DRIVER_OK (the driver's early notification went nowhere).
        let (mut console, _) = console();
        let mut rig = Rig::new();
        assert!(console.queue_input(b"early"));
        assert!(!console.process_queue(RX_QUEUE));
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x10000, 64)]);
        rig.activate(&mut console, 0);
        assert_eq!(rig.rx_used(), [5]);
        assert_eq!(rig.read(0x10000, 5), b"early");
        assert!(rig.line.count() > 0, "activation delivered and interrupted");

        // Buffers posted after activation.
        let (mut console, _) = self::console();
        let mut rig = Rig::new();
        assert!(console.queue_input(b"early"));
        rig.activate(&mut console, 0);
        assert_eq!(rig.rx.used_idx(&rig.mem), 0);
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x10000, 64)]);
        assert!(console.process_queue(RX_QUEUE));
        assert_eq!(rig.rx_used(), [5]);
        assert_eq!(rig.read(0x10000, 5), b"early");
    }

    #[test]
    fn undelivered_input_survives_reset() {
        let (mut console, out) = console();
        let mut rig = Rig::new();
        rig.activate(&mut console, 0);
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x10000, 4)]);
        assert!(console.queue_input(b"abcdefgh"));
        assert_eq!(rig.rx_used(), [4]);
        console.reset();
        assert_eq!(console.pending_input_len(), 4);
        assert!(!console.process_queue(RX_QUEUE) && !console.process_queue(TX_QUEUE));

        // The next boot's driver, on fresh rings.
        let mut rig = Rig::new();
        rig.activate(&mut console, 0);
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x10000, 64)]);
        assert!(console.process_queue(RX_QUEUE));
        assert_eq!(rig.rx_used(), [4]);
        assert_eq!(rig.read(0x10000, 4), b"efgh");
        // The writer survives too.
        rig.mem.write_slice(b"out", GuestAddress(0x20000)).unwrap();
        rig.tx.add_chain(&rig.mem, &[Desc::r(0x20000, 3)]);
        assert!(console.process_queue(TX_QUEUE));
        assert_eq!(out.take(), b"out");
    }

    #[test]
    fn input_beyond_the_bound_is_refused_whole_and_accepted_later() {
        let (mut console, _) = console();
        let mut rig = Rig::new();
        rig.activate(&mut console, 0);
        assert!(console.queue_input(&vec![b'a'; MAX_PENDING_INPUT - 10]));
        assert!(!console.queue_input(&[b'b'; 11]));
        assert_eq!(console.pending_input_len(), MAX_PENDING_INPUT - 10);
        assert_eq!(console.input_room(), 10);
        assert!(console.queue_input(&[b'b'; 10]));
        assert!(!console.queue_input(b"c"));
        assert!(!console.queue_input(&vec![0; MAX_PENDING_INPUT + 1]));
        // The guest takes some; room again. Buffers posted without a notification are found by queue_input too.
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x10000, 16)]);
        assert!(console.queue_input(b"c"));
        assert_eq!(rig.rx_used(), [16]);
        assert_eq!(console.pending_input_len(), MAX_PENDING_INPUT - 16 + 1);
    }

    #[test]
    fn hostile_transmit_chains_are_skipped() {
        let (mut console, out) = console();
        let mut rig = Rig::new();
        rig.activate(&mut console, 0);
        rig.mem.write_slice(b"ok", GuestAddress(0x10000)).unwrap();
        rig.tx.add_chain(&rig.mem, &[Desc::r(0x10000, 2), Desc::w(0x20000, 16)]); // writable on the transmitq
        rig.tx.add_chain(&rig.mem, &[Desc::w(0x20000, 16)]);
        rig.tx.add_chain(&rig.mem, &[Desc::r(0x10000, 2), Desc::r(0xfff_0000, 16)]); // outside memory
        rig.tx.add_chain(&rig.mem, &[Desc::r((1 << 20) - 1, 2)]); // straddles the end
        rig.tx.add_chain(&rig.mem, &[Desc::r(0x10000, u32::MAX)]); // absurd length
        rig.tx.add_chain(&rig.mem, &[Desc::r(u64::MAX - 1, 16)]); // wraps the address space
        rig.tx.add_chain(&rig.mem, &[Desc::w(0x20000, 1), Desc::r(0x10000, 2)]); // readable after writable
        rig.tx.add_chain(&rig.mem, &[Desc::r(0x10000, 0)]);
        // A descriptor that loops to itself.
        let head = rig.tx.add_chain(&rig.mem, &[Desc::r(0x10000, 2)]);
        let d = Desc { flags: crate::virtio::testing::DESC_F_NEXT, next: head, ..Desc::r(0x10000, 2) };
        rig.tx.write_desc(&rig.mem, head, d);
        rig.tx.add_chain(&rig.mem, &[Desc::r(0x10000, 2)]);
        assert!(console.process_queue(TX_QUEUE));
        assert_eq!(rig.tx_used(), [0; 10]);
        assert_eq!(out.take(), b"ok", "only the good chain reached the host");
        assert!(!rig.irq.needs_reset());
    }

    #[test]
    fn hostile_receive_chains_get_nothing_and_keep_the_input() {
        let (mut console, _) = console();
        let mut rig = Rig::new();
        rig.activate(&mut console, 0);
        rig.rx.add_chain(&rig.mem, &[Desc::r(0x10000, 16)]); // readable on the receiveq
        rig.rx.add_chain(&rig.mem, &[Desc::r(0x10000, 16), Desc::w(0x11000, 16)]);
        rig.rx.add_chain(&rig.mem, &[Desc::w(0xfff_0000, 16)]); // outside memory
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x12000, 8), Desc::w((1 << 20) - 4, 16)]); // partly outside
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x10000, u32::MAX)]); // absurd length
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x10000, 0)]); // no room at all
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x13000, 1), Desc::r(0x10000, 2)]); // readable after writable
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x14000, 64)]);
        assert!(console.queue_input(b"input"));
        assert_eq!(rig.rx_used(), [0, 0, 0, 0, 0, 0, 0, 5]);
        assert_eq!(rig.read(0x14000, 5), b"input");
        for at in [0x10000, 0x11000, 0x12000, 0x13000] {
            assert_eq!(rig.read(at, 8), [0; 8], "nothing written at {at:#x}");
        }
        assert!(!rig.irq.needs_reset());
    }

    #[test]
    fn corrupt_rings_break_only_their_queue_until_reset() {
        let (mut console, out) = console();
        let mut rig = Rig::new();
        rig.activate(&mut console, 0);
        rig.rx.set_avail_idx(&rig.mem, 1000);
        assert!(console.queue_input(b"kept"));
        assert!(rig.irq.needs_reset());
        assert_eq!(console.pending_input_len(), 4);
        assert!(!console.process_queue(RX_QUEUE), "a broken queue is left alone");
        // The transmitq still works.
        rig.mem.write_slice(b"tx", GuestAddress(0x20000)).unwrap();
        rig.tx.add_chain(&rig.mem, &[Desc::r(0x20000, 2)]);
        assert!(console.process_queue(TX_QUEUE));
        assert_eq!(out.take(), b"tx");
        // A head index outside the table on the transmitq.
        rig.tx.publish(&rig.mem, 500);
        assert!(console.process_queue(TX_QUEUE));

        console.reset();
        rig.irq.reset();
        let mut rig = Rig::new();
        rig.activate(&mut console, 0);
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x10000, 16)]);
        assert!(console.process_queue(RX_QUEUE));
        assert_eq!(rig.read(0x10000, 4), b"kept");
        assert!(!rig.irq.needs_reset());
    }

    #[test]
    fn a_failing_writer_does_not_stop_the_device() {
        let out = SharedBuffer::default();
        let mut console = Console::new(Box::new(FlakyWriter { failures: 2, out: out.clone() }));
        let mut rig = Rig::new();
        rig.activate(&mut console, 0);
        for (i, text) in [b"one", b"two", b"six"].iter().enumerate() {
            let at = 0x10000 + 0x1000 * i as u64;
            rig.mem.write_slice(*text, GuestAddress(at)).unwrap();
            rig.tx.add_chain(&rig.mem, &[Desc::r(at, 3)]);
        }
        assert!(console.process_queue(TX_QUEUE));
        assert_eq!(rig.tx_used(), [0, 0, 0], "every chain is returned");
        assert_eq!(out.take(), b"six", "the bytes the writer refused are lost");
        assert!(console.output_failed);
        // Input still flows the other way.
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x40000, 8)]);
        assert!(console.queue_input(b"in"));
        assert_eq!(rig.rx_used(), [2]);
    }

    #[test]
    fn event_idx_asks_for_the_next_receive_buffer_when_starved() {
        let (mut console, _) = console();
        let mut rig = Rig::new();
        rig.activate(&mut console, features::RING_EVENT_IDX);
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x10000, 4)]);
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x11000, 4)]);
        assert!(console.queue_input(b"0123456789"));
        assert_eq!(rig.rx_used(), [4, 4]);
        // avail_event (after the used ring's entries) now names the next buffer the driver will post.
        let avail_event = GuestAddress(rig.rx.used_ring.0 + 4 + 8 * u64::from(rig.rx.size));
        assert_eq!(u16::from_le(rig.mem.read_obj(avail_event).unwrap()), 2);
        // The driver wants an interrupt once entry 2 is used (used_event, after the available ring's entries).
        let used_event = GuestAddress(rig.rx.avail_ring.0 + 4 + 2 * u64::from(rig.rx.size));
        rig.mem.write_obj(2u16.to_le(), used_event).unwrap();
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x12000, 4)]);
        assert!(console.process_queue(RX_QUEUE));
        assert_eq!(rig.rx_used(), [2]);
        assert_eq!(rig.read(0x12000, 2), b"89");
    }

    /// A console behind a virtio-mmio transport on `mem`.
    fn transported(console: Console, mem: &GuestMemoryMmap) -> crate::virtio::mmio::MmioTransport {
        let device = Arc::new(Mutex::new(console));
        crate::virtio::mmio::MmioTransport::new(mem.clone(), device, CountingLine::new()).unwrap()
    }

    #[test]
    fn input_the_guest_had_not_read_reaches_it_after_restore_ahead_of_new_input() {
        use crate::virtio::testing::MmioDriver;
        use crate::Persist;
        let (source_console, _) = console();
        let mut rig = Rig::new();
        let source_device = Arc::new(Mutex::new(source_console));
        let mut source =
            crate::virtio::mmio::MmioTransport::new(rig.mem.clone(), source_device.clone(), CountingLine::new())
                .unwrap();
        MmioDriver(&mut source).start(features::VERSION_1, &[&rig.rx, &rig.tx]);
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x10000, 4)]);
        assert!(source_device.lock().unwrap().queue_input(b"abcdef"));
        assert_eq!(rig.rx_used(), [4]);
        source.quiesce();
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x11000, 64)]);
        assert!(source_device.lock().unwrap().queue_input(b"gh"), "input is still accepted while quiesced");
        assert_eq!(rig.rx.used_idx(&rig.mem), 1, "but not delivered");
        rig.mem.write_slice(b"out", GuestAddress(0x20000)).unwrap();
        rig.tx.add_chain(&rig.mem, &[Desc::r(0x20000, 3)]);
        let state = crate::persist::testing::through_json(&source.save());
        assert_eq!(state.device, VirtioDeviceState::Console(ConsoleState { pending_input: b"efgh".to_vec() }));

        // The destination's console already took some input before the restore.
        let (mut console, out) = console();
        assert!(console.queue_input(b"ij"));
        let mut restored = transported(console, &rig.mem);
        restored.restore(&state).unwrap();
        restored.resume();
        assert!(restored.queue_handler().handle(RX_QUEUE));
        assert_eq!(rig.rx_used(), [6]);
        assert_eq!(rig.read(0x11000, 6), b"efghij");
        assert!(restored.queue_handler().handle(TX_QUEUE));
        assert_eq!(out.take(), b"out", "the waiting output, written once");
        assert_eq!(rig.tx_used(), [0]);
    }

    #[test]
    fn too_much_pending_input_is_refused() {
        use crate::persist::testing::assert_refused;
        let rig = Rig::new();
        let mut target = transported(console().0, &rig.mem);
        let mut state = crate::Persist::save(&target);
        state.device = VirtioDeviceState::Console(ConsoleState { pending_input: vec![b'x'; MAX_PENDING_INPUT + 1] });
        assert_refused(&mut target, &state, "pending_input");
        state.device = VirtioDeviceState::Console(ConsoleState { pending_input: vec![b'x'; MAX_PENDING_INPUT] });
        crate::Persist::restore(&mut target, &state).unwrap();
    }
}

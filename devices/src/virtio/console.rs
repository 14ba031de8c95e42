//! virtio-console (virtio 1.2, 5.3), which QEMU calls virtio-serial: a console port (what Linux shows as `hvc0`)
//! and, with VIRTIO_CONSOLE_F_MULTIPORT, named ports (Linux's `/dev/vportNpM`, found by name under
//! `/sys/class/virtio-ports`; the QEMU guest agent's channel is one), each carrying bytes between the guest and a
//! host stream of its own. No SIZE and no EMERG_WRITE.
//!
//! # Ports and queues
//!
//! A device of one port ([`Console::new`], or `max_ports` 1) is the single-port console: queues 0 (receiveq) and
//! 1 (transmitq) for port 0, no MULTIPORT, a configuration space of zeros. With `max_ports` above 1 the device
//! offers MULTIPORT and has `2 * (max_ports + 1)` queues, laid out as the specification and QEMU lay them out:
//! port 0's receiveq and transmitq, the control receiveq and transmitq, then port 1's pair, port 2's, ...; the
//! configuration space says `max_nr_ports`. A driver that does not accept MULTIPORT gets port 0 alone.
//!
//! # Control messages (virtio 1.2, 5.3.6.2, as Linux's virtio_console driver and QEMU use them)
//!
//! Each is `{le32 id, le16 event, le16 value}`, the port's number as `id`:
//! * the driver sends DEVICE_READY once its control receiveq has buffers; the device answers with PORT_ADD for
//!   every port;
//! * the driver sets a port up and sends PORT_READY; the device answers with CONSOLE_PORT for a console port (the
//!   driver then makes it an hvc, opens it and says so with PORT_OPEN), PORT_NAME (the name and a NUL after the
//!   message) for a named port, and PORT_OPEN 1 if the host side is connected;
//! * PORT_OPEN from the driver says whether a program in the guest has the port open: host input waits in the
//!   device until it has (Linux drops data that arrives for a port nobody opened), as QEMU's does;
//! * PORT_OPEN from the device says whether the host side is connected ([`Console::set_host_connected`]: a
//!   socket's client came or went), which Linux reports to programs in the guest: writes wait for it, reads see
//!   the end of input while the host is away. Console ports are always connected, as QEMU's virtconsole is.
//!
//! RESIZE is never sent (no SIZE, and no host terminal's size is followed) and PORT_REMOVE neither (no hot-unplug).
//! A message naming a port that does not exist, an event a driver does not send, or a chain too short for a
//! message is reported and ignored. Messages for the driver wait in the device until it posts control buffers; at
//! most one of each kind per port waits (a newer PORT_OPEN replaces the one waiting), so a driver that never
//! reads them, or repeats DEVICE_READY, cannot make the device hold more than four per port.
//!
//! # Host input
//!
//! [`Console::queue_input`] never drops a byte it accepted: input that finds no receive buffer (or a port the
//! guest has not opened) waits in the device (up to [`MAX_PENDING_INPUT`] bytes per port, across device resets,
//! before activation too) and is delivered, in order, as soon as the driver posts buffers. Beyond the bound new
//! input is *refused*, whole, and the caller keeps it and retries later (see [`Console::queue_input`]). Receive
//! buffers are only taken off the available ring when there is something to put in them: the driver keeps its
//! buffers posted while the host is silent.
//!
//! # Guest output
//!
//! A port's transmitq is drained on every notification and each chain's bytes are written to the port's host
//! writer, then the writer is flushed. A failing writer (closed terminal, disconnected socket, full pipe of a
//! non-blocking descriptor) loses those bytes; the first failure is reported on stderr and the device goes on
//! serving the guest. The writer should not block for long: it runs on the thread doing queue work.
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

/// Each port's receiveq and transmitq.
pub const QUEUE_SIZE: u16 = 256;
/// The control queues (QEMU's size: the driver posts a page per entry).
pub const CONTROL_QUEUE_SIZE: u16 = 32;
/// Port 0's receiveq (host → guest).
pub const RX_QUEUE: usize = 0;
/// Port 0's transmitq (guest → host).
pub const TX_QUEUE: usize = 1;
/// The control receiveq (device → driver messages), with MULTIPORT.
pub const CONTROL_RX_QUEUE: usize = 2;
/// The control transmitq (driver → device messages), with MULTIPORT.
pub const CONTROL_TX_QUEUE: usize = 3;
/// VIRTIO_CONSOLE_F_MULTIPORT.
pub const F_MULTIPORT: u64 = 1 << 1;
/// QEMU's `max_ports` when none is given.
pub const DEFAULT_MAX_PORTS: u32 = 31;
/// The most ports a device serves: on virtio-pci each of its `2 * (max_ports + 1)` queues has an MSI-X vector, and
/// the table has room for 256 with the configuration's.
pub const MAX_PORTS_LIMIT: u32 = 126;
/// A port's name, at most (it travels in one control buffer, a page in Linux, with a NUL after it).
pub const MAX_NAME_LEN: usize = 255;
/// Host input held per port while the guest has no receive buffers, at most. Input beyond it is refused.
pub const MAX_PENDING_INPUT: usize = 1 << 20;
/// Descriptors the device looks at per chain (indirect tables can be longer than the queue).
const MAX_DESCRIPTORS: usize = QUEUE_SIZE as usize;
/// Guest output is copied to the host writer in pieces of at most this size.
const OUTPUT_CHUNK: usize = 64 << 10;

/// Control message events (virtio 1.2, 5.3.6.2).
pub mod control {
    pub const DEVICE_READY: u16 = 0;
    pub const PORT_ADD: u16 = 1;
    pub const PORT_REMOVE: u16 = 2;
    pub const PORT_READY: u16 = 3;
    pub const CONSOLE_PORT: u16 = 4;
    pub const RESIZE: u16 = 5;
    pub const PORT_OPEN: u16 = 6;
    pub const PORT_NAME: u16 = 7;
    /// `{le32 id, le16 event, le16 value}`.
    pub const HEADER_LEN: usize = 8;
}

static LOG: GuestErrorLog = GuestErrorLog::new("virtio-console");

/// A port as the device is built with it.
pub struct PortSetup {
    /// The port's number (QEMU's `nr`), below the device's `max_ports`.
    pub nr: u32,
    /// What the guest sees in `/sys/class/virtio-ports/*/name`; `None`: no name (at most [`MAX_NAME_LEN`] bytes).
    pub name: Option<String>,
    /// A console port (QEMU's virtconsole: an hvc in Linux), always connected on the host side.
    pub console: bool,
    /// Where the guest's output goes.
    pub output: Box<dyn Write + Send>,
    /// Whether the host side is connected when the device starts (a socket nobody has connected to is not);
    /// changes go to [`Console::set_host_connected`]. Ignored for a console port.
    pub host_connected: bool,
}

struct Port {
    nr: u32,
    name: Option<String>,
    console: bool,
    output: Box<dyn Write + Send>,
    /// The host writer failed once; later failures are not reported.
    output_failed: bool,
    /// Host input accepted and not yet written into a receive buffer, oldest first.
    pending_input: VecDeque<u8>,
    host_connected: bool,
    /// What the guest was last told of the host side (a PORT_OPEN sent or waiting to be).
    host_open_told: bool,
    /// The driver set the port up (PORT_READY).
    guest_ready: bool,
    /// A program in the guest has the port open (the driver's PORT_OPEN).
    guest_open: bool,
}

/// A control message for the driver.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlMessage {
    pub id: u32,
    pub event: u16,
    pub value: u16,
    /// After the header: PORT_NAME's name and its NUL; empty for the others.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub name: Vec<u8>,
}

impl ControlMessage {
    fn new(id: u32, event: u16, value: u16) -> Self {
        ControlMessage { id, event, value, name: Vec::new() }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(control::HEADER_LEN + self.name.len());
        bytes.extend_from_slice(&self.id.to_le_bytes());
        bytes.extend_from_slice(&self.event.to_le_bytes());
        bytes.extend_from_slice(&self.value.to_le_bytes());
        bytes.extend_from_slice(&self.name);
        bytes
    }
}

pub struct Console {
    /// All a reset drops: ports, host input not yet delivered and the writers are kept.
    driver: DriverState,
    max_ports: u32,
    queue_sizes: Vec<u16>,
    /// By port number.
    ports: Vec<Port>,
    /// Messages for the driver, oldest first, waiting for control receive buffers.
    control_out: VecDeque<ControlMessage>,
}

impl Console {
    /// A single-port console whose guest output goes to `output`.
    pub fn new(output: Box<dyn Write + Send>) -> Self {
        let port = PortSetup { nr: 0, name: None, console: true, output, host_connected: true };
        Console::with_ports(1, vec![port]).expect("one console port at 0 fits one port")
    }

    /// A device of `max_ports` port numbers (QEMU's `max_ports`; above 1 it offers MULTIPORT) with `ports`. Port
    /// numbers at or beyond `max_ports`, a number or a name given twice, a name that is empty or too long, and a
    /// `max_ports` of 0 or beyond [`MAX_PORTS_LIMIT`], are refused with a message saying which.
    pub fn with_ports(max_ports: u32, ports: Vec<PortSetup>) -> Result<Self, String> {
        if !(1..=MAX_PORTS_LIMIT).contains(&max_ports) {
            return Err(format!("max_ports={max_ports}: a virtio-serial device has 1 to {MAX_PORTS_LIMIT} ports"));
        }
        let mut built: Vec<Port> = Vec::with_capacity(ports.len());
        for setup in ports {
            if setup.nr >= max_ports {
                return Err(format!(
                    "port {} is beyond max_ports={max_ports} (ports 0 to {})",
                    setup.nr,
                    max_ports - 1
                ));
            }
            if built.iter().any(|p| p.nr == setup.nr) {
                return Err(format!("port {} is given twice", setup.nr));
            }
            if let Some(name) = &setup.name {
                if name.is_empty() || name.len() > MAX_NAME_LEN || name.contains('\0') {
                    return Err(format!("port name '{name}': 1 to {MAX_NAME_LEN} bytes, no NUL"));
                }
                if built.iter().any(|p| p.name.as_ref() == Some(name)) {
                    return Err(format!("port name '{name}' is given twice"));
                }
            }
            built.push(Port {
                nr: setup.nr,
                name: setup.name,
                console: setup.console,
                output: setup.output,
                output_failed: false,
                pending_input: VecDeque::new(),
                host_connected: setup.console || setup.host_connected,
                host_open_told: false,
                guest_ready: false,
                guest_open: false,
            });
        }
        built.sort_by_key(|p| p.nr);
        let queue_sizes = if max_ports == 1 {
            vec![QUEUE_SIZE, QUEUE_SIZE]
        } else {
            let mut sizes = vec![QUEUE_SIZE, QUEUE_SIZE, CONTROL_QUEUE_SIZE, CONTROL_QUEUE_SIZE];
            sizes.resize(2 * (max_ports as usize + 1), QUEUE_SIZE);
            sizes
        };
        Ok(Console {
            driver: DriverState::default(),
            max_ports,
            queue_sizes,
            ports: built,
            control_out: VecDeque::new(),
        })
    }

    /// The driver accepted MULTIPORT: the control queues and every port are in use; otherwise only port 0.
    fn multiport(&self) -> bool {
        self.driver.acked_features & F_MULTIPORT != 0
    }

    fn position(&self, nr: u32) -> Option<usize> {
        self.ports.iter().position(|p| p.nr == nr)
    }

    /// Port `nr`'s receiveq; its transmitq follows it.
    fn receive_queue(nr: u32) -> usize {
        if nr == 0 {
            RX_QUEUE
        } else {
            2 * (nr as usize + 1)
        }
    }

    /// The port (its position) whose receiveq (`true`) or transmitq `index` is, if the driver uses it.
    fn port_of_queue(&self, index: usize) -> Option<(usize, bool)> {
        let nr = match index {
            RX_QUEUE | TX_QUEUE => 0,
            CONTROL_RX_QUEUE | CONTROL_TX_QUEUE => return None,
            _ if self.multiport() => u32::try_from(index / 2 - 1).ok()?,
            _ => return None,
        };
        Some((self.position(nr)?, index.is_multiple_of(2)))
    }

    /// Queues host input for port `nr`'s guest side and delivers as much of it as the driver has receive buffers
    /// for, raising the guest's interrupt itself when it used buffers (so the caller needs no interrupt handle).
    ///
    /// Returns `false`, accepting nothing, when `bytes` would take the port's undelivered input past
    /// [`MAX_PENDING_INPUT`]: the caller keeps them and retries once the guest has taken some input, which happens
    /// when the driver posts receive buffers, i.e. after the receiveq's notification was handled
    /// ([`QueueHandler::handle`](super::QueueHandler::handle)), or opens the port; [`input_room`](Self::input_room)
    /// says how much fits. A slice longer than `MAX_PENDING_INPUT` is never accepted: feed ordinary read sizes.
    /// Input for a port the device does not have is dropped (accepted).
    pub fn queue_input(&mut self, nr: u32, bytes: &[u8]) -> bool {
        let Some(at) = self.position(nr) else { return true };
        if bytes.len() > self.input_room(nr) {
            // Make room if the guest has buffers, then look again.
            self.deliver_and_signal(at);
            if bytes.len() > self.input_room(nr) {
                return false;
            }
        }
        self.ports[at].pending_input.extend(bytes);
        self.deliver_and_signal(at);
        true
    }

    /// Bytes accepted from the host for port `nr` and not yet delivered to the guest.
    pub fn pending_input_len(&self, nr: u32) -> usize {
        self.position(nr).map_or(0, |at| self.ports[at].pending_input.len())
    }

    /// How many bytes [`queue_input`](Self::queue_input) accepts for port `nr` right now.
    pub fn input_room(&self, nr: u32) -> usize {
        MAX_PENDING_INPUT.saturating_sub(self.pending_input_len(nr))
    }

    /// The host side of port `nr` connected (a socket's client came) or went away: the guest hears of it with
    /// PORT_OPEN once the driver has set the port up. Console ports stay connected, as QEMU's do.
    pub fn set_host_connected(&mut self, nr: u32, connected: bool) {
        let Some(at) = self.position(nr) else { return };
        let multiport = self.multiport();
        let port = &mut self.ports[at];
        if port.console {
            return;
        }
        port.host_connected = connected;
        if multiport && port.guest_ready && port.host_open_told != connected {
            port.host_open_told = connected;
            self.queue_control(ControlMessage::new(nr, control::PORT_OPEN, connected.into()));
            self.deliver_control_and_signal();
        }
    }

    /// Whether a program in the guest has port `nr` open (the driver's PORT_OPEN): for the host's information.
    pub fn guest_open(&self, nr: u32) -> bool {
        self.position(nr).is_some_and(|at| self.ports[at].guest_open)
    }

    /// Whether the port at `at` takes input now: with MULTIPORT once the guest opened it, without only port 0.
    fn takes_input(&self, at: usize) -> bool {
        let port = &self.ports[at];
        if self.multiport() {
            port.guest_open
        } else {
            port.nr == 0
        }
    }

    /// Delivers pending input of the port at `at` and interrupts the guest if it wants to hear about it (outside
    /// `process_queue`).
    fn deliver_and_signal(&mut self, at: usize) {
        if self.deliver_input(at) {
            if let Some(active) = &self.driver.active {
                active.interrupt.signal_used_queue(Self::receive_queue(self.ports[at].nr));
            }
        }
    }

    /// Writes pending input of the port at `at` into the receive buffers the driver made available, while there
    /// is input. Returns whether the driver wants an interrupt.
    fn deliver_input(&mut self, at: usize) -> bool {
        if !self.takes_input(at) {
            return false;
        }
        let port = &mut self.ports[at];
        let Some(active) = self.driver.active.as_mut() else { return false };
        if port.pending_input.is_empty() {
            return false;
        }
        let index = Self::receive_queue(port.nr);
        let Some((queue, mem)) = active.usable(index) else { return false };
        match fill_buffers(queue, mem, &mut port.pending_input, |p| p.is_empty(), receive) {
            Ok(notify) => notify,
            Err(why) => active.break_queue(index, &LOG, &why),
        }
    }

    fn transmit(&mut self, at: usize) -> bool {
        let port = &mut self.ports[at];
        let Some(active) = self.driver.active.as_mut() else { return false };
        let mut out = Output { writer: &mut *port.output, failed: &mut port.output_failed };
        let mut scratch = Vec::new();
        let notify = active.process(Self::receive_queue(port.nr) + 1, &LOG, |mem, chain| {
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

    /// Adds a message for the driver, replacing one of the same kind for the same port still waiting.
    fn queue_control(&mut self, message: ControlMessage) {
        match self.control_out.iter_mut().find(|m| m.id == message.id && m.event == message.event) {
            Some(waiting) => *waiting = message,
            None => self.control_out.push_back(message),
        }
    }

    /// Writes waiting control messages into the control receive buffers the driver made available. Returns
    /// whether the driver wants an interrupt.
    fn deliver_control(&mut self) -> bool {
        if !self.multiport() || self.control_out.is_empty() {
            return false;
        }
        let Some(active) = self.driver.active.as_mut() else { return false };
        let Some((queue, mem)) = active.usable(CONTROL_RX_QUEUE) else { return false };
        match fill_buffers(queue, mem, &mut self.control_out, |c| c.is_empty(), receive_control) {
            Ok(notify) => notify,
            Err(why) => active.break_queue(CONTROL_RX_QUEUE, &LOG, &why),
        }
    }

    fn deliver_control_and_signal(&mut self) {
        if self.deliver_control() {
            if let Some(active) = &self.driver.active {
                active.interrupt.signal_used_queue(CONTROL_RX_QUEUE);
            }
        }
    }

    /// Takes the driver's control messages off the control transmitq and acts on them.
    fn receive_control_messages(&mut self) -> bool {
        let Some(active) = self.driver.active.as_mut() else { return false };
        let mut messages = Vec::new();
        let notify = active.process(CONTROL_TX_QUEUE, &LOG, |mem, chain| {
            match chain::parse(chain, MAX_DESCRIPTORS) {
                Ok(c) => messages.extend(read_control(mem, &c)),
                Err(e) => LOG.report(format_args!("{e}")),
            }
            0
        });
        for message in messages {
            self.handle_control(message);
        }
        self.deliver_control_and_signal();
        notify
    }

    fn handle_control(&mut self, message: ControlMessage) {
        let ControlMessage { id, event, value, .. } = message;
        if event == control::DEVICE_READY {
            if value == 0 {
                LOG.report(format_args!("the driver could not set the device up (DEVICE_READY 0)"));
                return;
            }
            let adds: Vec<u32> = self.ports.iter().map(|p| p.nr).collect();
            for nr in adds {
                self.queue_control(ControlMessage::new(nr, control::PORT_ADD, 1));
            }
            return;
        }
        if event != control::PORT_READY && event != control::PORT_OPEN {
            LOG.report(format_args!("control event {event} (port {id}) is not one a driver sends; ignored"));
            return;
        }
        let Some(at) = self.position(id) else {
            LOG.report(format_args!("control event {event} names port {id}, which this device does not have"));
            return;
        };
        if event == control::PORT_OPEN {
            self.ports[at].guest_open = value != 0;
            self.deliver_and_signal(at);
            return;
        }
        if value == 0 {
            LOG.report(format_args!("the driver could not set port {id} up (PORT_READY 0)"));
            return;
        }
        let port = &mut self.ports[at];
        port.guest_ready = true;
        port.host_open_told = port.host_connected;
        let mut replies = Vec::new();
        if port.console {
            replies.push(ControlMessage::new(id, control::CONSOLE_PORT, 1));
        }
        if let Some(name) = &port.name {
            let mut bytes = name.as_bytes().to_vec();
            bytes.push(0);
            replies.push(ControlMessage { name: bytes, ..ControlMessage::new(id, control::PORT_NAME, 1) });
        }
        if port.host_connected {
            replies.push(ControlMessage::new(id, control::PORT_OPEN, 1));
        }
        for reply in replies {
            self.queue_control(reply);
        }
    }

    /// After a restore: a port whose guest was told otherwise than the host side now is hears the truth.
    fn reconcile_host_side(&mut self) {
        if !self.multiport() || self.driver.active.is_none() {
            return;
        }
        let mut changes = Vec::new();
        for port in self.ports.iter_mut().filter(|p| p.guest_ready && p.host_open_told != p.host_connected) {
            port.host_open_told = port.host_connected;
            changes.push(ControlMessage::new(port.nr, control::PORT_OPEN, port.host_connected.into()));
        }
        for change in changes {
            self.queue_control(change);
        }
    }
}

/// Pops receive chains and fills them from `pending` with `fill` until either runs out (the ring-level checks are
/// those of `ActiveQueues::process`, which cannot be used here: it consumes every available chain, and receive
/// buffers must stay with the driver while there is nothing for them).
fn fill_buffers<P>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    pending: &mut P,
    is_empty: impl Fn(&P) -> bool,
    fill: impl Fn(&GuestMemoryMmap, &Chain, &mut P) -> u32,
) -> Result<bool, String> {
    let err = |e: virtio_queue::Error| e.to_string();
    let mut used = false;
    while !is_empty(pending) {
        // Out of buffers with input left: the driver will notify the next one.
        let Some(chain) = super::pop_available(queue, mem)? else { break };
        let head = chain.head_index();
        let len = match chain::parse(chain, MAX_DESCRIPTORS) {
            Ok(c) => fill(mem, &c, pending),
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

/// Whether `chain` is a receive buffer the device may write: only device-writable descriptors, all in memory.
fn writable_only(chain: &Chain) -> bool {
    if let Some(bad) = chain.bad_segment {
        LOG.report(format_args!("chain {} names {:#x}+{:#x} outside guest memory", chain.head, bad.addr.0, bad.len));
        return false;
    }
    if !chain.readable.is_empty() {
        LOG.report(format_args!("receive chain {} has device-readable descriptors", chain.head));
        return false;
    }
    true
}

/// Moves the oldest pending bytes into the writable part of `chain`; returns how many (0 for a bad chain, which
/// consumes nothing).
fn receive(mem: &GuestMemoryMmap, chain: &Chain, pending: &mut VecDeque<u8>) -> u32 {
    if !writable_only(chain) {
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

/// Writes the oldest waiting control message into `chain`; returns its length (0 for a bad or too short chain,
/// which leaves the message waiting).
fn receive_control(mem: &GuestMemoryMmap, chain: &Chain, waiting: &mut VecDeque<ControlMessage>) -> u32 {
    let Some(message) = waiting.front() else { return 0 };
    if !writable_only(chain) {
        return 0;
    }
    let bytes = message.bytes();
    if chain::total_len(&chain.writable) < bytes.len() as u64 {
        LOG.report(format_args!(
            "control receive chain {} is too short for a {}-byte message",
            chain.head,
            bytes.len()
        ));
        return 0;
    }
    match chain::write_stream(mem, &chain.writable, &bytes) {
        Ok(n) if n == bytes.len() => {
            waiting.pop_front();
            // A message is at most a header and a name.
            n as u32
        }
        _ => {
            LOG.report(format_args!("control receive chain {} could not be written", chain.head));
            0
        }
    }
}

/// The message in a control transmit chain, if it holds one (the header; anything after it is ignored).
fn read_control(mem: &GuestMemoryMmap, chain: &Chain) -> Option<ControlMessage> {
    if let Some(bad) = chain.bad_segment {
        LOG.report(format_args!("chain {} names {:#x}+{:#x} outside guest memory", chain.head, bad.addr.0, bad.len));
        return None;
    }
    if !chain.writable.is_empty() {
        LOG.report(format_args!("control transmit chain {} has device-writable descriptors", chain.head));
        return None;
    }
    let mut header = [0u8; control::HEADER_LEN];
    if chain::total_len(&chain.readable) < header.len() as u64
        || chain::read_stream(mem, &chain.readable, &mut header).is_err()
    {
        LOG.report(format_args!("control transmit chain {} is shorter than a message", chain.head));
        return None;
    }
    let id = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let event = u16::from_le_bytes([header[4], header[5]]);
    let value = u16::from_le_bytes([header[6], header[7]]);
    Some(ControlMessage::new(id, event, value))
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

/// virtio-console as data: the host input each port accepted and has not delivered yet (the host has let go of
/// it), what the driver set up on each port and what it was told of the host side, and the control messages
/// waiting for it. Guest output is written to the host in the lock hold that took it off a transmitq, so a saved
/// device has none in flight (see [`transport`](super::transport)); whether a host writer failed, and whether the
/// host side is connected now, are the host's affair (a restored device tells its guest where the host side
/// differs from what the saved guest was told).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleState {
    /// A single-port console's undelivered input (its whole state, as Kestrel saved it before ports); empty when
    /// `ports` is given.
    pub pending_input: Vec<u8>,
    /// Every port, by number; empty for a single-port console.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortState>,
    /// Messages waiting for the driver, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub control: Vec<ControlMessage>,
}

/// One port of a multiport device, as data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortState {
    pub nr: u32,
    /// Oldest first, at most [`MAX_PENDING_INPUT`] bytes.
    pub pending_input: Vec<u8>,
    /// The driver set the port up (PORT_READY).
    pub guest_ready: bool,
    /// A program in the guest has it open.
    pub guest_open: bool,
    /// What the guest was told of the host side.
    pub host_open_told: bool,
}

impl Console {
    /// The ports of `state`, as this device's ports in order, checked.
    fn checked_ports(&self, state: &ConsoleState, running: bool) -> Result<Vec<PortState>, StateError> {
        let refuse = |field: &str, problem: String| StateError::new(LOG.device, field, problem);
        let ports = if state.ports.is_empty() && self.max_ports == 1 {
            // A single-port console: its input is port 0's.
            let input = state.pending_input.clone();
            if self.ports.is_empty() && !input.is_empty() {
                return Err(refuse("pending_input", "input for a device without ports".into()));
            }
            self.ports
                .iter()
                .map(|p| PortState {
                    nr: p.nr,
                    pending_input: if p.nr == 0 { input.clone() } else { Vec::new() },
                    guest_ready: false,
                    guest_open: false,
                    host_open_told: false,
                })
                .collect()
        } else {
            if !state.pending_input.is_empty() {
                return Err(refuse("pending_input", "a multiport device's input is its ports'".into()));
            }
            state.ports.clone()
        };
        let saved: Vec<u32> = ports.iter().map(|p| p.nr).collect();
        let have: Vec<u32> = self.ports.iter().map(|p| p.nr).collect();
        if saved != have {
            return Err(refuse("ports", format!("ports {saved:?}, where this device has {have:?}")));
        }
        for port in &ports {
            if port.pending_input.len() > MAX_PENDING_INPUT {
                let problem =
                    format!("{} bytes, more than the {MAX_PENDING_INPUT} a port holds", port.pending_input.len());
                return Err(refuse(&format!("ports[{}].pending_input", port.nr), problem));
            }
            if !running && (port.guest_ready || port.guest_open || port.host_open_told) {
                let problem = "set up by a driver, on a device that is not running".to_string();
                return Err(refuse(&format!("ports[{}]", port.nr), problem));
            }
        }
        let limit = 4 * self.ports.len();
        if state.control.len() > limit || (!running && !state.control.is_empty()) {
            let problem = format!("{} messages waiting, where at most {limit} can", state.control.len());
            return Err(refuse("control", problem));
        }
        for message in &state.control {
            let at = self.position(message.id).ok_or_else(|| {
                refuse("control", format!("a message for port {}, which this device does not have", message.id))
            })?;
            let expected_name = match message.event {
                control::PORT_ADD | control::CONSOLE_PORT | control::PORT_OPEN => Vec::new(),
                control::PORT_NAME => {
                    let mut name = self.ports[at].name.clone().unwrap_or_default().into_bytes();
                    name.push(0);
                    name
                }
                other => return Err(refuse("control", format!("event {other} is not one the device sends"))),
            };
            if message.value > 1 || message.name != expected_name {
                return Err(refuse("control", format!("a malformed message {message:?}")));
            }
        }
        Ok(ports)
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        super::TYPE_CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        if self.max_ports > 1 {
            features::COMMON | F_MULTIPORT
        } else {
            features::COMMON
        }
    }

    /// cols, rows, max_nr_ports, emerg_wr: only max_nr_ports is valid (with MULTIPORT); the rest read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 12];
        if self.max_ports > 1 {
            config[4..8].copy_from_slice(&self.max_ports.to_le_bytes());
        }
        data.fill(0);
        if let Some(tail) = usize::try_from(offset).ok().and_then(|at| config.get(at..)) {
            let n = tail.len().min(data.len());
            data[..n].copy_from_slice(&tail[..n]);
        }
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
        for at in 0..self.ports.len() {
            self.deliver_and_signal(at);
        }
    }

    /// What the driver set up on the ports goes with it; their input and host side stay.
    fn reset_device(&mut self) {
        for port in &mut self.ports {
            port.guest_ready = false;
            port.guest_open = false;
            port.host_open_told = false;
        }
        self.control_out.clear();
    }

    fn process_queue(&mut self, index: usize) -> bool {
        match index {
            CONTROL_RX_QUEUE if self.multiport() => self.deliver_control(),
            CONTROL_TX_QUEUE if self.multiport() => self.receive_control_messages(),
            _ => match self.port_of_queue(index) {
                Some((at, true)) => self.deliver_input(at),
                Some((at, false)) => self.transmit(at),
                None => false,
            },
        }
    }

    fn save_state(&self) -> VirtioDeviceState {
        let state = if self.max_ports == 1 {
            let pending_input = self.ports.first().map(|p| p.pending_input.iter().copied().collect());
            ConsoleState { pending_input: pending_input.unwrap_or_default(), ports: Vec::new(), control: Vec::new() }
        } else {
            let ports = self
                .ports
                .iter()
                .map(|p| PortState {
                    nr: p.nr,
                    pending_input: p.pending_input.iter().copied().collect(),
                    guest_ready: p.guest_ready,
                    guest_open: p.guest_open,
                    host_open_told: p.host_open_told,
                })
                .collect();
            ConsoleState { pending_input: Vec::new(), ports, control: self.control_out.iter().cloned().collect() }
        };
        VirtioDeviceState::Console(state)
    }

    /// Tells the guest where the host side is not what it was told before the save.
    fn restored(&mut self) {
        self.reconcile_host_side();
    }

    /// Each port's saved input goes ahead of input it accepted before the restore: the destination's host input
    /// threads run from the moment the device is built, and what was typed then comes after what the source's
    /// guest had not read yet.
    fn restore_device_state(&mut self, state: &VirtioDeviceState, running: bool) -> Result<(), StateError> {
        let VirtioDeviceState::Console(state) = state else { return Err(state.mismatch(LOG.device)) };
        let saved = self.checked_ports(state, running)?;
        for (port, saved) in self.ports.iter_mut().zip(saved) {
            let typed_here = std::mem::take(&mut port.pending_input);
            port.pending_input.extend(saved.pending_input);
            port.pending_input.extend(typed_here);
            port.guest_ready = saved.guest_ready;
            port.guest_open = saved.guest_open;
            port.host_open_told = saved.host_open_told;
        }
        self.control_out = state.control.iter().cloned().collect();
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

    use crate::test_utils::SharedBuffer;

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
        assert!(console.queue_input(0, &input));
        assert_eq!(rig.rx_used(), [16, 16, 8], "the fourth buffer stays with the driver");
        assert_eq!(rig.irq.status() & crate::virtio::INT_VRING, crate::virtio::INT_VRING);
        assert!(rig.line.count() > 0);
        let mut got = rig.read(0x10000, 16);
        got.extend(rig.read(0x20000, 10));
        got.extend(rig.read(0x21000, 6));
        got.extend(rig.read(0x30000, 8));
        assert_eq!(got, input);
        assert_eq!(rig.read(0x30008, 8), [0; 8], "nothing past the input");
        assert_eq!(console.pending_input_len(0), 0);

        // More input than buffers: the rest waits for the driver's next buffers.
        assert!(console.queue_input(0, &pattern(50)));
        assert_eq!(rig.rx_used(), [16]);
        assert_eq!(console.pending_input_len(0), 34);
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
        assert!(console.queue_input(0, b"early"));
        assert!(!console.process_queue(RX_QUEUE));
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x10000, 64)]);
        rig.activate(&mut console, 0);
        assert_eq!(rig.rx_used(), [5]);
        assert_eq!(rig.read(0x10000, 5), b"early");
        assert!(rig.line.count() > 0, "activation delivered and interrupted");

        // Buffers posted after activation.
        let (mut console, _) = self::console();
        let mut rig = Rig::new();
        assert!(console.queue_input(0, b"early"));
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
        assert!(console.queue_input(0, b"abcdefgh"));
        assert_eq!(rig.rx_used(), [4]);
        console.reset();
        assert_eq!(console.pending_input_len(0), 4);
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
        assert!(console.queue_input(0, &vec![b'a'; MAX_PENDING_INPUT - 10]));
        assert!(!console.queue_input(0, &[b'b'; 11]));
        assert_eq!(console.pending_input_len(0), MAX_PENDING_INPUT - 10);
        assert_eq!(console.input_room(0), 10);
        assert!(console.queue_input(0, &[b'b'; 10]));
        assert!(!console.queue_input(0, b"c"));
        assert!(!console.queue_input(0, &vec![0; MAX_PENDING_INPUT + 1]));
        // The guest takes some; room again. Buffers posted without a notification are found by queue_input too.
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x10000, 16)]);
        assert!(console.queue_input(0, b"c"));
        assert_eq!(rig.rx_used(), [16]);
        assert_eq!(console.pending_input_len(0), MAX_PENDING_INPUT - 16 + 1);
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
        assert!(console.queue_input(0, b"input"));
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
        assert!(console.queue_input(0, b"kept"));
        assert!(rig.irq.needs_reset());
        assert_eq!(console.pending_input_len(0), 4);
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
        assert!(console.ports[0].output_failed);
        // Input still flows the other way.
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x40000, 8)]);
        assert!(console.queue_input(0, b"in"));
        assert_eq!(rig.rx_used(), [2]);
    }

    #[test]
    fn event_idx_asks_for_the_next_receive_buffer_when_starved() {
        let (mut console, _) = console();
        let mut rig = Rig::new();
        rig.activate(&mut console, features::RING_EVENT_IDX);
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x10000, 4)]);
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x11000, 4)]);
        assert!(console.queue_input(0, b"0123456789"));
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
        assert!(source_device.lock().unwrap().queue_input(0, b"abcdef"));
        assert_eq!(rig.rx_used(), [4]);
        source.quiesce();
        rig.rx.add_chain(&rig.mem, &[Desc::w(0x11000, 64)]);
        assert!(source_device.lock().unwrap().queue_input(0, b"gh"), "input is still accepted while quiesced");
        assert_eq!(rig.rx.used_idx(&rig.mem), 1, "but not delivered");
        rig.mem.write_slice(b"out", GuestAddress(0x20000)).unwrap();
        rig.tx.add_chain(&rig.mem, &[Desc::r(0x20000, 3)]);
        let state = crate::persist::testing::through_json(&source.save());
        assert_eq!(
            state.device,
            VirtioDeviceState::Console(ConsoleState {
                pending_input: b"efgh".to_vec(),
                ports: vec![],
                control: vec![]
            })
        );

        // The destination's console already took some input before the restore.
        let (mut console, out) = console();
        assert!(console.queue_input(0, b"ij"));
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
        state.device = VirtioDeviceState::Console(ConsoleState {
            pending_input: vec![b'x'; MAX_PENDING_INPUT + 1],
            ports: vec![],
            control: vec![],
        });
        assert_refused(&mut target, &state, "pending_input");
        state.device = VirtioDeviceState::Console(ConsoleState {
            pending_input: vec![b'x'; MAX_PENDING_INPUT],
            ports: vec![],
            control: vec![],
        });
        crate::Persist::restore(&mut target, &state).unwrap();
    }
}

/// The multiport device as Linux's driver uses it: the control queues' conversation, named ports, the host side's
/// connection, hostile control messages, and its state.
#[cfg(test)]
mod multiport_tests {
    use std::sync::{Arc, Mutex};

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::virtio::testing::{guest_memory, CountingLine, Desc, MmioDriver, TestQueue};
    use crate::virtio::VirtioInterrupt;

    const AGENT: &str = "org.qemu.guest_agent.0";

    use crate::test_utils::SharedBuffer;

    /// A console at 0 and the agent's port at 1 (host side not connected yet), of `max_ports`; and their outputs.
    fn device(max_ports: u32) -> (Console, SharedBuffer, SharedBuffer) {
        let (console_out, agent_out) = (SharedBuffer::default(), SharedBuffer::default());
        let ports = vec![
            PortSetup {
                nr: 1,
                name: Some(AGENT.into()),
                console: false,
                output: Box::new(agent_out.clone()),
                host_connected: false,
            },
            PortSetup {
                nr: 0,
                name: None,
                console: true,
                output: Box::new(console_out.clone()),
                host_connected: false,
            },
        ];
        (Console::with_ports(max_ports, ports).unwrap(), console_out, agent_out)
    }

    /// The driver's rings of a device of 2 ports: port 0's pair, the control pair, port 1's pair.
    struct Rig {
        mem: GuestMemoryMmap,
        rings: Vec<TestQueue>,
        irq: Arc<VirtioInterrupt>,
        /// Where the next control receive buffer goes.
        next_control_buffer: u64,
    }

    impl Rig {
        fn new() -> Self {
            let line = CountingLine::new();
            Rig {
                mem: guest_memory(1 << 20),
                rings: (0..6).map(|i| TestQueue::new(GuestAddress(0x1000 * (i + 1)), 16)).collect(),
                irq: Arc::new(VirtioInterrupt::new(line)),
                next_control_buffer: 0x80000,
            }
        }

        fn queues(&self) -> Vec<Queue> {
            self.rings.iter().map(TestQueue::queue).collect()
        }

        fn activate(&self, device: &mut Console, features: u64) {
            device.ack_features(features::VERSION_1 | features);
            device.activate(self.mem.clone(), self.queues(), self.irq.clone()).unwrap();
        }

        /// Posts `n` control receive buffers of a page each, as Linux does.
        fn post_control_buffers(&mut self, n: usize) {
            for _ in 0..n {
                let at = self.next_control_buffer;
                self.next_control_buffer += 0x1000;
                self.rings[CONTROL_RX_QUEUE].add_chain(&self.mem, &[Desc::w(at, 4096)]);
            }
        }

        /// The driver sends a control message (`len` bytes of it) and the device handles the notification.
        fn send(&mut self, device: &mut Console, id: u32, event: u16, value: u16) {
            let at = 0x70000;
            self.mem.write_slice(&ControlMessage::new(id, event, value).bytes(), GuestAddress(at)).unwrap();
            self.rings[CONTROL_TX_QUEUE].add_chain(&self.mem, &[Desc::r(at, 8)]);
            device.process_queue(CONTROL_TX_QUEUE);
            // The driver reuses the buffer: it waits for the device to have used it.
            assert!(self.rings[CONTROL_TX_QUEUE].pop_used(&self.mem).is_some());
        }

        /// The control messages the device wrote since the last call, decoded: (id, event, value, name).
        fn received(&mut self) -> Vec<(u32, u16, u16, String)> {
            let mut messages = Vec::new();
            while let Some((head, len)) = self.rings[CONTROL_RX_QUEUE].pop_used(&self.mem) {
                // Each buffer is one descriptor: head i is the i-th buffer posted.
                let mut bytes = vec![0u8; len as usize];
                self.mem.read_slice(&mut bytes, GuestAddress(0x80000 + 0x1000 * u64::from(head))).unwrap();
                if bytes.len() < 8 {
                    messages.push((u32::MAX, u16::MAX, 0, format!("short: {bytes:?}")));
                    continue;
                }
                let id = u32::from_le_bytes(bytes[0..4].try_into().unwrap());
                let event = u16::from_le_bytes(bytes[4..6].try_into().unwrap());
                let value = u16::from_le_bytes(bytes[6..8].try_into().unwrap());
                messages.push((id, event, value, String::from_utf8_lossy(&bytes[8..]).into_owned()));
            }
            messages
        }

        fn read(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut buf = vec![0u8; len];
            self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
            buf
        }

        /// Brings both ports up as Linux does: DEVICE_READY, PORT_READY for each port added, and the console
        /// opened (after CONSOLE_PORT). Returns what the device said.
        fn bring_up(&mut self, device: &mut Console) -> Vec<(u32, u16, u16, String)> {
            self.activate(device, F_MULTIPORT);
            self.post_control_buffers(16);
            self.send(device, u32::MAX, control::DEVICE_READY, 1);
            let mut said = self.received();
            self.send(device, 0, control::PORT_READY, 1);
            self.send(device, 1, control::PORT_READY, 1);
            self.send(device, 0, control::PORT_OPEN, 1);
            said.extend(self.received());
            said
        }
    }

    fn msg(id: u32, event: u16, value: u16) -> (u32, u16, u16, String) {
        (id, event, value, String::new())
    }

    #[test]
    fn a_multiport_device_offers_its_ports_and_queues() {
        let (device, _, _) = device(DEFAULT_MAX_PORTS);
        assert_eq!(device.avail_features() & F_MULTIPORT, F_MULTIPORT);
        let sizes = device.queue_max_sizes();
        assert_eq!(sizes.len(), 64, "2 * (31 + 1) queues, as QEMU's");
        assert_eq!(
            &sizes[..6],
            &[QUEUE_SIZE, QUEUE_SIZE, CONTROL_QUEUE_SIZE, CONTROL_QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
        );
        let mut config = [0xffu8; 12];
        device.read_config(0, &mut config);
        assert_eq!(config, [0, 0, 0, 0, 31, 0, 0, 0, 0, 0, 0, 0], "cols, rows, max_nr_ports, emerg_wr");
        let mut max = [0u8; 4];
        device.read_config(4, &mut max);
        assert_eq!(u32::from_le_bytes(max), 31);
        let mut past = [0xffu8; 4];
        device.read_config(10, &mut past);
        assert_eq!(past, [0; 4]);
        device.read_config(u64::MAX, &mut past);
        assert_eq!(past, [0; 4]);
    }

    #[test]
    fn the_driver_learns_the_ports_their_names_and_the_host_side_through_control_messages() {
        let (mut device, console_out, agent_out) = device(2);
        let mut rig = Rig::new();
        let said = rig.bring_up(&mut device);
        let name = format!("{AGENT}\0");
        assert_eq!(
            said,
            [
                msg(0, control::PORT_ADD, 1),
                msg(1, control::PORT_ADD, 1),
                msg(0, control::CONSOLE_PORT, 1),
                msg(0, control::PORT_OPEN, 1),
                (1, control::PORT_NAME, 1, name),
            ],
            "the agent's host side is not connected: no PORT_OPEN for it"
        );
        assert!(rig.irq.status() & crate::virtio::INT_VRING != 0);

        // Host input for the agent waits until the guest opens the port.
        rig.rings[6 - 2].add_chain(&rig.mem, &[Desc::w(0x40000, 64)]);
        assert!(device.queue_input(1, b"{\"execute\":\"guest-ping\"}\n"));
        assert_eq!(rig.rings[4].used_idx(&rig.mem), 0);
        device.set_host_connected(1, true);
        assert_eq!(rig.received(), [msg(1, control::PORT_OPEN, 1)]);
        rig.send(&mut device, 1, control::PORT_OPEN, 1);
        assert!(device.guest_open(1));
        assert_eq!(rig.rings[4].pop_used(&rig.mem).map(|(_, len)| len), Some(25));
        assert_eq!(rig.read(0x40000, 25), b"{\"execute\":\"guest-ping\"}\n");

        // Each port's output goes to its own host side.
        rig.mem.write_slice(b"{\"return\":{}}\n", GuestAddress(0x50000)).unwrap();
        rig.rings[5].add_chain(&rig.mem, &[Desc::r(0x50000, 14)]);
        assert!(device.process_queue(5));
        rig.mem.write_slice(b"login: ", GuestAddress(0x51000)).unwrap();
        rig.rings[TX_QUEUE].add_chain(&rig.mem, &[Desc::r(0x51000, 7)]);
        assert!(device.process_queue(TX_QUEUE));
        assert_eq!(agent_out.take(), b"{\"return\":{}}\n");
        assert_eq!(console_out.take(), b"login: ");

        // The host side goes away, and comes back: the guest hears both; repeating a state says nothing.
        device.set_host_connected(1, false);
        device.set_host_connected(1, false);
        device.set_host_connected(1, true);
        assert_eq!(rig.received(), [msg(1, control::PORT_OPEN, 0), msg(1, control::PORT_OPEN, 1)]);
        // The console's host side is always there.
        device.set_host_connected(0, false);
        assert_eq!(rig.received(), []);

        // The guest closes the port: input waits again.
        rig.send(&mut device, 1, control::PORT_OPEN, 0);
        rig.rings[4].add_chain(&rig.mem, &[Desc::w(0x41000, 64)]);
        assert!(device.queue_input(1, b"later"));
        assert_eq!(rig.rings[4].pop_used(&rig.mem), None);
        assert_eq!(device.pending_input_len(1), 5);
        assert!(!rig.irq.needs_reset());
    }

    #[test]
    fn messages_wait_for_control_buffers_and_repeats_do_not_pile_up() {
        let (mut device, _, _) = device(2);
        let mut rig = Rig::new();
        rig.activate(&mut device, F_MULTIPORT);
        for _ in 0..100 {
            rig.send(&mut device, u32::MAX, control::DEVICE_READY, 1);
        }
        assert_eq!(device.control_out.len(), 2, "one PORT_ADD per port waits");
        // A buffer too short for a message is used empty and the message keeps waiting.
        rig.rings[CONTROL_RX_QUEUE].add_chain(&rig.mem, &[Desc::w(0x80000, 4)]);
        assert!(device.process_queue(CONTROL_RX_QUEUE));
        assert_eq!(rig.rings[CONTROL_RX_QUEUE].pop_used(&rig.mem), Some((0, 0)));
        rig.next_control_buffer = 0x81000;
        rig.post_control_buffers(4);
        assert!(device.process_queue(CONTROL_RX_QUEUE));
        assert_eq!(rig.received(), [msg(0, control::PORT_ADD, 1), msg(1, control::PORT_ADD, 1)]);
        assert!(device.control_out.is_empty());
    }

    #[test]
    fn control_messages_with_bad_ports_or_events_are_ignored() {
        let (mut device, _, _) = device(2);
        let mut rig = Rig::new();
        rig.bring_up(&mut device);
        for (id, event, value) in [
            (2, control::PORT_READY, 1), // beyond max_ports
            (u32::MAX, control::PORT_OPEN, 1),
            (7, control::PORT_OPEN, 1),
            (1, control::PORT_ADD, 1), // a device's message, from the driver
            (1, control::PORT_NAME, 1),
            (1, control::RESIZE, 1),
            (1, control::PORT_REMOVE, 1),
            (1, 0xffff, 0xffff),
            (0, control::DEVICE_READY, 0), // the driver failed
            (1, control::PORT_READY, 0),
        ] {
            rig.send(&mut device, id, event, value);
        }
        assert_eq!(rig.received(), []);
        assert!(!device.guest_open(1));
        // Chains that hold no message: too short, writable, outside memory.
        let tx = CONTROL_TX_QUEUE;
        rig.mem.write_slice(&ControlMessage::new(1, control::PORT_OPEN, 1).bytes(), GuestAddress(0x70000)).unwrap();
        rig.rings[tx].add_chain(&rig.mem, &[Desc::r(0x70000, 7)]);
        rig.rings[tx].add_chain(&rig.mem, &[Desc::w(0x70000, 8)]);
        rig.rings[tx].add_chain(&rig.mem, &[Desc::r(0xfff_0000, 8)]);
        rig.rings[tx].add_chain(&rig.mem, &[Desc::r(0x70000, 4), Desc::r(0xfff_0000, 4)]);
        device.process_queue(tx);
        assert!(!device.guest_open(1), "no chain opened the port");
        // A message split over two descriptors is one message.
        rig.rings[tx].add_chain(&rig.mem, &[Desc::r(0x70000, 3), Desc::r(0x70003, 5)]);
        device.process_queue(tx);
        assert!(device.guest_open(1));
        // Notifications of queues that do not exist or are not in use do nothing.
        for index in [6, 7, 63, 64, usize::MAX] {
            assert!(!device.process_queue(index));
        }
        assert!(!rig.irq.needs_reset());
    }

    #[test]
    fn without_multiport_the_device_is_a_single_port_console() {
        let (mut device, console_out, agent_out) = device(2);
        let mut rig = Rig::new();
        rig.activate(&mut device, 0);
        // No control conversation: port 0 takes input at once; port 1's queues are not the driver's.
        rig.rings[RX_QUEUE].add_chain(&rig.mem, &[Desc::w(0x40000, 16)]);
        assert!(device.queue_input(0, b"root\n"));
        assert_eq!(rig.rings[RX_QUEUE].pop_used(&rig.mem), Some((0, 5)));
        rig.send_raw_without_processing();
        assert!(!device.process_queue(CONTROL_TX_QUEUE));
        rig.mem.write_slice(b"x", GuestAddress(0x50000)).unwrap();
        rig.rings[5].add_chain(&rig.mem, &[Desc::r(0x50000, 1)]);
        rig.rings[TX_QUEUE].add_chain(&rig.mem, &[Desc::r(0x50000, 1)]);
        assert!(!device.process_queue(5));
        assert!(device.process_queue(TX_QUEUE));
        assert_eq!((console_out.take(), agent_out.take()), (b"x".to_vec(), vec![]));
        assert!(device.queue_input(1, b"waits"));
        assert_eq!(device.pending_input_len(1), 5);
    }

    impl Rig {
        /// A DEVICE_READY made available on the control transmitq, not handled.
        fn send_raw_without_processing(&mut self) {
            self.mem
                .write_slice(&ControlMessage::new(0, control::DEVICE_READY, 1).bytes(), GuestAddress(0x70000))
                .unwrap();
            self.rings[CONTROL_TX_QUEUE].add_chain(&self.mem, &[Desc::r(0x70000, 8)]);
        }
    }

    #[test]
    fn bad_port_configurations_are_refused_with_a_reason() {
        let port = |nr: u32, name: Option<&str>| PortSetup {
            nr,
            name: name.map(String::from),
            console: false,
            output: Box::new(io::sink()),
            host_connected: false,
        };
        let cases: Vec<(u32, Vec<PortSetup>, &str)> = vec![
            (0, vec![], "max_ports=0"),
            (127, vec![], "max_ports=127"),
            (31, vec![port(31, Some("a"))], "port 31 is beyond max_ports=31"),
            (1, vec![port(1, None)], "beyond max_ports=1"),
            (31, vec![port(3, Some("a")), port(3, Some("b"))], "port 3 is given twice"),
            (31, vec![port(1, Some("a")), port(2, Some("a"))], "name 'a' is given twice"),
            (31, vec![port(1, Some(""))], "1 to 255 bytes"),
            (31, vec![port(1, Some(&"n".repeat(256)))], "1 to 255 bytes"),
        ];
        for (max_ports, ports, expected) in cases {
            let Err(error) = Console::with_ports(max_ports, ports) else { panic!("{expected}: accepted") };
            assert!(error.contains(expected), "{error} (expected {expected})");
        }
        assert!(Console::with_ports(MAX_PORTS_LIMIT, vec![port(MAX_PORTS_LIMIT - 1, Some(AGENT))]).is_ok());
        assert!(Console::with_ports(31, vec![]).is_ok(), "a controller without ports");
    }

    /// A device behind a virtio-mmio transport, driven by `rig`'s rings.
    fn transported(device: Console, rig: &Rig) -> (crate::virtio::mmio::MmioTransport, Arc<Mutex<Console>>) {
        let device = Arc::new(Mutex::new(device));
        let transport =
            crate::virtio::mmio::MmioTransport::new(rig.mem.clone(), device.clone(), CountingLine::new()).unwrap();
        (transport, device)
    }

    #[test]
    fn ports_state_survives_a_snapshot_and_the_guest_hears_where_the_host_side_changed() {
        use crate::Persist;
        let mut rig = Rig::new();
        let (mut source, source_device) = transported(device(2).0, &rig);
        let rings: Vec<&TestQueue> = rig.rings.iter().collect();
        MmioDriver(&mut source).start(features::VERSION_1 | F_MULTIPORT, &rings);
        {
            let mut d = source_device.lock().unwrap();
            d.set_host_connected(1, true);
            rig.post_control_buffers(16);
            rig.send(&mut d, u32::MAX, control::DEVICE_READY, 1);
            rig.send(&mut d, 1, control::PORT_READY, 1);
            rig.send(&mut d, 1, control::PORT_OPEN, 1);
            assert!(rig.received().contains(&msg(1, control::PORT_OPEN, 1)));
            // The guest reads half of the host's input; the rest, and input for the closed console, wait.
            rig.rings[4].add_chain(&rig.mem, &[Desc::w(0x40000, 4)]);
            assert!(d.queue_input(1, b"12345678"));
            assert!(d.queue_input(0, b"typed"));
        }
        source.quiesce();
        let state = crate::persist::testing::through_json(&source.save());
        let VirtioDeviceState::Console(console_state) = &state.device else { panic!("{:?}", state.device) };
        assert_eq!(console_state.ports[1].pending_input, b"5678");
        assert_eq!(console_state.ports[0].pending_input, b"typed");
        assert!(console_state.ports[1].guest_open && console_state.ports[1].host_open_told);

        // The destination's agent socket has no client: the restored guest is told so once the device resumes.
        let (mut restored, restored_device) = transported(device(2).0, &rig);
        restored.restore(&state).unwrap();
        assert!(restored_device.lock().unwrap().guest_open(1));
        restored.resume();
        assert!(restored.queue_handler().handle(CONTROL_RX_QUEUE));
        assert_eq!(rig.received(), [msg(1, control::PORT_OPEN, 0)]);
        rig.rings[4].add_chain(&rig.mem, &[Desc::w(0x41000, 16)]);
        assert!(restored.queue_handler().handle(4));
        assert_eq!(rig.rings[4].pop_used(&rig.mem).map(|(_, len)| len), Some(4), "the first 4 before the save");
        assert_eq!(rig.rings[4].pop_used(&rig.mem).map(|(_, len)| len), Some(4));
        assert_eq!(rig.read(0x41000, 4), b"5678");
    }

    #[test]
    fn bad_ports_states_are_refused() {
        use crate::persist::testing::assert_refused;
        let rig = Rig::new();
        let (mut target, _) = transported(device(2).0, &rig);
        let good = crate::Persist::save(&target);
        let VirtioDeviceState::Console(console_state) = &good.device else { panic!() };
        type Mutation = Box<dyn Fn(&mut ConsoleState)>;
        let mutations: Vec<(&str, Mutation)> = vec![
            ("ports", Box::new(|s| s.ports.truncate(1))),
            ("ports", Box::new(|s| s.ports[1].nr = 2)),
            ("ports", Box::new(|s| s.ports.clear())),
            ("pending_input", Box::new(|s| s.pending_input = b"x".to_vec())),
            ("ports[1].pending_input", Box::new(|s| s.ports[1].pending_input = vec![0; MAX_PENDING_INPUT + 1])),
            ("ports[1]", Box::new(|s| s.ports[1].guest_open = true)),
            ("control", Box::new(|s| s.control.push(ControlMessage::new(1, control::PORT_ADD, 1)))),
        ];
        for (field, mutate) in mutations {
            let mut state = good.clone();
            let mut changed = console_state.clone();
            mutate(&mut changed);
            state.device = VirtioDeviceState::Console(changed);
            assert_refused(&mut target, &state, field);
        }
    }

    #[test]
    fn bad_control_messages_in_a_running_state_are_refused() {
        use crate::persist::testing::assert_refused;
        let rig = Rig::new();
        let (mut target, _) = transported(device(2).0, &rig);
        let rings: Vec<&TestQueue> = rig.rings.iter().collect();
        MmioDriver(&mut target).start(features::VERSION_1 | F_MULTIPORT, &rings);
        let good = crate::Persist::save(&target);
        let VirtioDeviceState::Console(console_state) = &good.device else { panic!() };
        let bad = [
            ControlMessage::new(2, control::PORT_ADD, 1),
            ControlMessage::new(1, control::DEVICE_READY, 1),
            ControlMessage::new(1, control::PORT_OPEN, 2),
            ControlMessage { name: b"other\0".to_vec(), ..ControlMessage::new(1, control::PORT_NAME, 1) },
            ControlMessage { name: b"x".to_vec(), ..ControlMessage::new(1, control::PORT_OPEN, 1) },
        ];
        for message in bad {
            let mut state = good.clone();
            let mut changed = console_state.clone();
            changed.control.push(message);
            state.device = VirtioDeviceState::Console(changed);
            assert_refused(&mut target, &state, "control");
        }
        let mut state = good.clone();
        let mut changed = console_state.clone();
        changed.control = vec![ControlMessage::new(1, control::PORT_OPEN, 1); 9];
        state.device = VirtioDeviceState::Console(changed);
        assert_refused(&mut target, &state, "control");
        let mut changed = console_state.clone();
        changed.control.push(ControlMessage {
            name: format!("{AGENT}\0").into_bytes(),
            ..ControlMessage::new(1, control::PORT_NAME, 1)
        });
        state.device = VirtioDeviceState::Console(changed);
        crate::Persist::restore(&mut target, &state).unwrap();
    }
}

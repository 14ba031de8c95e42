//! A 16550A UART on top of vm-superio. vm-superio ignores FCR and always receives into a 64-byte FIFO; this adds
//! the FIFO control register's receive side, so the FIFO holds one byte (the receive holding register) until the
//! guest enables FIFOs, as on a 16550A after power-on, and clearing it drops what it held. Host input enters only
//! as the FIFO has room and the guest is ready for it (see [`ReceiveGate`]); the rest waits on the host side.

use std::io::{self, Write};
use std::sync::Arc;
use std::time::Instant;

use vm_superio::Trigger;

use super::receive_gate::ReceiveGate;
use crate::bus::reply_byte;
use crate::{BusDevice, InputRoom, InterruptLine};

const DATA: u8 = 0;
/// Read: the interrupt identification register; write: the FIFO control register.
const IIR_FCR: u8 = 2;
const LCR: u8 = 3;
const LSR: u8 = 5;

const FCR_FIFO_ENABLE: u8 = 1 << 0;
const FCR_CLEAR_RECEIVE: u8 = 1 << 1;
/// IIR bits 7:6, "FIFOs enabled", which vm-superio always reports.
const IIR_FIFOS_ENABLED: u8 = 0xc0;
const LCR_DLAB: u8 = 1 << 7;
const LSR_DATA_READY: u8 = 1 << 0;

/// vm-superio's receive FIFO: the depth with FIFOs enabled.
pub const RECEIVE_FIFO_DEPTH: usize = 64;

/// Adapts an `InterruptLine` to vm-superio's trigger.
struct LineTrigger(Arc<dyn InterruptLine>);

impl Trigger for LineTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

type Uart = vm_superio::Serial<LineTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>;

pub struct Serial {
    uart: Uart,
    /// FCR bit 0: off after power-on (16450 mode, a one-byte receive holding register).
    fifos_enabled: bool,
    gate: ReceiveGate,
}

impl Serial {
    /// `room` is notified when the guest is ready for more input (see [`receive`](Self::receive)).
    pub fn new(interrupt: Arc<dyn InterruptLine>, output: Box<dyn Write + Send>, room: Arc<InputRoom>) -> Self {
        Serial { uart: Uart::new(LineTrigger(interrupt), output), fifos_enabled: false, gate: ReceiveGate::new(room) }
    }

    /// Takes as much host input as the guest is ready for now, raising the receive interrupt, and returns how many
    /// bytes that was; the caller keeps the rest and offers it again when the `InputRoom` is notified.
    pub fn receive(&mut self, bytes: &[u8]) -> usize {
        self.receive_at(bytes, Instant::now())
    }

    fn receive_at(&mut self, bytes: &[u8], now: Instant) -> usize {
        if bytes.is_empty() || self.held() != 0 || !self.gate.open(now) {
            return 0;
        }
        let count = bytes.len().min(self.fifo_depth());
        // Only the interrupt can fail once there is room; the bytes are in the FIFO either way. In loopback mode
        // vm-superio takes nothing, and the input waits.
        self.uart.enqueue_raw_bytes(&bytes[..count]).unwrap_or(count)
    }

    /// Bytes in the receive FIFO, not yet read by the guest.
    fn held(&self) -> usize {
        RECEIVE_FIFO_DEPTH - self.uart.fifo_capacity()
    }

    fn fifo_depth(&self) -> usize {
        if self.fifos_enabled {
            RECEIVE_FIFO_DEPTH
        } else {
            1
        }
    }

    /// Back to power-on state (guest reset): what sat in the FIFO was the old boot's; host input not yet taken
    /// stays with the input thread for the next one.
    pub fn reset(&mut self) {
        let Serial { uart, .. } = self;
        let trigger = LineTrigger(uart.interrupt_evt().0.clone());
        let output = std::mem::replace(uart.writer_mut(), Box::new(io::sink()));
        *uart = Uart::new(trigger, output);
        self.fifos_enabled = false;
        self.gate.emptied(Instant::now());
    }

    fn write_fifo_control(&mut self, value: u8) {
        let enable = value & FCR_FIFO_ENABLE != 0;
        // Switching FIFOs on or off clears them, as on a 16550A (and QEMU's).
        if value & FCR_CLEAR_RECEIVE != 0 || enable != self.fifos_enabled {
            self.clear_receive_fifo();
        }
        self.fifos_enabled = enable;
    }

    fn clear_receive_fifo(&mut self) {
        // vm-superio has no way to clear its FIFO but reading it, which needs the data register selected.
        let lcr = self.uart.read(LCR);
        if lcr & LCR_DLAB != 0 {
            let _ = self.uart.write(LCR, lcr & !LCR_DLAB);
        }
        while self.held() != 0 {
            self.uart.read(DATA);
        }
        if lcr & LCR_DLAB != 0 {
            let _ = self.uart.write(LCR, lcr);
        }
        self.gate.emptied(Instant::now());
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let Ok(register) = u8::try_from(offset) else {
            data.fill(0xff);
            return;
        };
        let held = self.held();
        let mut value = self.uart.read(register);
        match register {
            IIR_FCR => {
                if !self.fifos_enabled {
                    value &= !IIR_FIFOS_ENABLED;
                }
                if held == 0 {
                    self.gate.saw_empty();
                }
            }
            LSR if value & LSR_DATA_READY == 0 => self.gate.saw_empty(),
            _ if held != 0 && self.held() == 0 => self.gate.emptied(Instant::now()),
            _ => {}
        }
        reply_byte(data, value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(register), Some(&value)) = (u8::try_from(offset), data.first()) else {
            return;
        };
        if register == IIR_FCR {
            self.write_fifo_control(value);
            return;
        }
        // An output error (closed terminal, full disk) must not stop the guest; the byte is lost either way.
        let _ = self.uart.write(register, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::receive_gate::UNSEEN_EMPTY_GRACE;
    use crate::test_utils::{CountingLine, SharedBuffer};

    const RBR: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const FCR: u64 = 2;
    const LCR_REGISTER: u64 = 3;
    const LSR_REGISTER: u64 = 5;

    fn read(serial: &mut Serial, offset: u64) -> u8 {
        let mut b = [0u8];
        serial.read(offset, &mut b);
        b[0]
    }

    fn serial() -> (Serial, Arc<CountingLine>, Arc<InputRoom>) {
        let line = Arc::new(CountingLine::default());
        let room = Arc::new(InputRoom::default());
        (Serial::new(line.clone(), Box::new(io::sink()), room.clone()), line, room)
    }

    /// A driver's receive loop (Linux's, and the probe payload's): read while the status says data is ready.
    fn drain(serial: &mut Serial) -> Vec<u8> {
        let mut received = Vec::new();
        while read(serial, LSR_REGISTER) & LSR_DATA_READY != 0 {
            received.push(read(serial, RBR));
        }
        received
    }

    /// FIFOs on, as a driver turns them on: then it looks at the status, which lets input in.
    fn enable_fifos(serial: &mut Serial) {
        serial.write(FCR, &[FCR_FIFO_ENABLE]);
        read(serial, LSR_REGISTER);
    }

    #[test]
    fn guest_output_reaches_the_writer() {
        let out = SharedBuffer::default();
        let mut serial =
            Serial::new(Arc::new(CountingLine::default()), Box::new(out.clone()), Arc::new(InputRoom::default()));
        for b in b"hi\n" {
            serial.write(0, &[*b]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");
    }

    #[test]
    fn after_power_on_the_fifo_is_off_and_holds_one_byte() {
        let (mut serial, ..) = serial();
        assert_eq!(read(&mut serial, IIR) & IIR_FIFOS_ENABLED, 0, "16450 mode");
        assert_eq!(serial.receive(b"hello"), 1);
        assert_eq!(serial.receive(b"ello"), 0, "the holding register is full");
        assert_eq!(drain(&mut serial), b"h");
        enable_fifos(&mut serial);
        assert_eq!(read(&mut serial, IIR) & IIR_FIFOS_ENABLED, IIR_FIFOS_ENABLED, "a 16550A's FIFOs are on");
        assert_eq!(serial.receive(&[b'x'; 100]), RECEIVE_FIFO_DEPTH);
    }

    #[test]
    fn input_longer_than_the_fifo_arrives_whole_and_in_order_in_bursts() {
        let (mut serial, line, room) = serial();
        enable_fifos(&mut serial);
        serial.write(IER, &[1]); // receive-data interrupt on
        let input: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let mut offered = 0;
        let mut received = Vec::new();
        while offered < input.len() {
            let generation = room.generation();
            let taken = serial.receive(&input[offered..]);
            assert!(taken > 0 && taken <= RECEIVE_FIFO_DEPTH, "{taken}");
            offered += taken;
            received.extend(drain(&mut serial));
            assert_ne!(room.generation(), generation, "seeing the FIFO empty wakes the input thread");
        }
        assert_eq!(received, input);
        assert_eq!(line.count(), input.len().div_ceil(RECEIVE_FIFO_DEPTH), "one interrupt per burst");
    }

    #[test]
    fn a_receive_loop_is_not_refilled_while_it_reads() {
        let (mut serial, ..) = serial();
        enable_fifos(&mut serial);
        assert_eq!(serial.receive(&[b'a'; 10]), 10);
        read(&mut serial, RBR);
        assert_eq!(serial.receive(b"b"), 0, "not empty yet");
        for _ in 0..9 {
            read(&mut serial, RBR);
        }
        assert_eq!(serial.receive(b"b"), 0, "empty, but the guest has not looked yet");
        assert_eq!(read(&mut serial, LSR_REGISTER) & LSR_DATA_READY, 0);
        assert_eq!(serial.receive(b"b"), 1, "the guest saw the FIFO empty: its loop is over");
    }

    #[test]
    fn a_drain_at_start_loses_only_what_the_fifo_held() {
        let (mut serial, _, room) = serial();
        let typed_ahead = b"hello\nq\n";
        let mut offered = serial.receive_at(typed_ahead, Instant::now() + UNSEEN_EMPTY_GRACE);
        assert_eq!(offered, 1, "before the driver starts, only the holding register fills");
        // The probe's echo command and Linux's 8250 driver: enable and clear the FIFOs, then drain.
        serial.write(FCR, &[0x07]);
        serial.write(IER, &[1]);
        assert_eq!(serial.receive(&typed_ahead[offered..]), 0, "nothing enters before the guest looks");
        let generation = room.generation();
        assert!(drain(&mut serial).is_empty(), "the clear dropped the one byte; the drain finds nothing");
        assert_ne!(room.generation(), generation, "the input thread is woken");
        offered += serial.receive(&typed_ahead[offered..]);
        assert_eq!(offered, typed_ahead.len());
        assert_eq!(drain(&mut serial), b"ello\nq\n");
    }

    #[test]
    fn a_guest_that_never_looks_at_the_status_still_gets_input() {
        let (mut serial, ..) = serial();
        serial.write(FCR, &[FCR_FIFO_ENABLE | FCR_CLEAR_RECEIVE]);
        let now = Instant::now();
        assert_eq!(serial.receive_at(b"ab", now), 0);
        assert_eq!(serial.receive_at(b"ab", now + UNSEEN_EMPTY_GRACE), 2);
        // An interrupt handler that reads only the data register.
        assert_eq!(read(&mut serial, RBR), b'a');
        assert_eq!(read(&mut serial, RBR), b'b');
        let now = Instant::now();
        assert_eq!(serial.receive_at(b"c", now), 0);
        assert_eq!(serial.receive_at(b"c", now + UNSEEN_EMPTY_GRACE), 1);
    }

    #[test]
    fn clearing_the_fifo_with_the_divisor_latch_selected_keeps_the_divisor() {
        let (mut serial, ..) = serial();
        enable_fifos(&mut serial);
        assert_eq!(serial.receive(b"xyz"), 3);
        serial.write(LCR_REGISTER, &[LCR_DLAB | 0x03]);
        serial.write(RBR, &[0x01]); // divisor low byte
        serial.write(FCR, &[FCR_FIFO_ENABLE | FCR_CLEAR_RECEIVE]);
        assert_eq!(read(&mut serial, RBR), 0x01, "still the divisor");
        assert_eq!(read(&mut serial, LCR_REGISTER), LCR_DLAB | 0x03);
        serial.write(LCR_REGISTER, &[0x03]);
        assert_eq!(read(&mut serial, LSR_REGISTER) & LSR_DATA_READY, 0, "the FIFO was cleared");
    }

    #[test]
    fn switching_fifos_off_clears_them() {
        let (mut serial, ..) = serial();
        enable_fifos(&mut serial);
        assert_eq!(serial.receive(b"xyz"), 3);
        serial.write(FCR, &[0]);
        assert!(drain(&mut serial).is_empty(), "cleared");
        assert_eq!(serial.receive(b"xyz"), 1, "back to one byte");
    }

    #[test]
    fn reset_keeps_output_and_returns_the_fifo_to_power_on() {
        let out = SharedBuffer::default();
        let mut serial =
            Serial::new(Arc::new(CountingLine::default()), Box::new(out.clone()), Arc::new(InputRoom::default()));
        serial.write(IER, &[1]);
        enable_fifos(&mut serial);
        assert_eq!(serial.receive(&[b'x'; 100]), RECEIVE_FIFO_DEPTH, "the rest stays with the caller");
        serial.reset();
        assert_eq!(read(&mut serial, IER), 0, "registers are back to power-on values");
        serial.write(0, b"a");
        assert_eq!(out.0.lock().unwrap().as_slice(), b"a");
        assert!(drain(&mut serial).is_empty(), "what had reached the old FIFO was the old boot's");
        assert_eq!(serial.receive(&[b'x'; 36]), 1, "FIFOs off again: one byte at a time");
    }

    #[test]
    fn out_of_range_offsets_are_harmless() {
        let (mut serial, ..) = serial();
        let mut data = [0u8; 2];
        serial.read(1 << 40, &mut data);
        assert_eq!(data, [0xff; 2]);
        serial.write(1 << 40, &[1]);
        serial.write(0, &[]);
    }
}

//! A 16550A UART on top of vm-superio. vm-superio ignores FCR and always receives into a 64-byte FIFO; this adds
//! the FIFO control register's receive side, so the FIFO holds one byte (the receive holding register) until the
//! guest enables FIFOs, as on a 16550A after power-on, and clearing it drops what it held. Host input enters only
//! as the FIFO has room and the guest is ready for it (see [`ReceiveGate`]); the rest waits on the host side.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;
use vm_superio::Trigger;

use super::receive_gate::ReceiveGate;
use crate::bus::reply_byte;
use crate::{BusDevice, InputRoom, InterruptLine, Persist, StateError};

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

/// Adapts an `InterruptLine` to vm-superio's trigger. `muted` is only set while a state is loaded: vm-superio's
/// `from_state` raises the interrupts the state has pending, and a restore raises none (see [`Persist`]).
struct LineTrigger {
    line: Arc<dyn InterruptLine>,
    muted: AtomicBool,
}

impl LineTrigger {
    fn new(line: Arc<dyn InterruptLine>, muted: bool) -> Self {
        LineTrigger { line, muted: AtomicBool::new(muted) }
    }
}

impl Trigger for LineTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        if self.muted.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.line.trigger()
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
        Serial {
            uart: Uart::new(LineTrigger::new(interrupt, false), output),
            fifos_enabled: false,
            gate: ReceiveGate::new(room),
        }
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
        let trigger = LineTrigger::new(uart.interrupt_evt().line.clone(), false);
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

/// The 16550A as data: vm-superio's registers and receive FIFO, and the FIFO control register's enable bit.
///
/// The receive gate's pacing (whether the guest has looked at an empty FIFO) is host-side timing, not state: a
/// restored UART starts it afresh, so input enters an empty FIFO at the latest after the gate's grace period.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialDeviceState {
    pub divisor_low: u8,
    pub divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// The receive FIFO, oldest byte first.
    pub receive_fifo: Vec<u8>,
    pub fifos_enabled: bool,
}

const DEVICE: &str = "16550A UART";
/// IER bits a 16550A has (vm-superio keeps only these).
const IER_VALID: u8 = 0x0f;
/// IIR "no interrupt pending", and the two interrupts vm-superio raises: transmitter empty and received data.
const IIR_NONE: u8 = 0x01;
const IIR_PENDING: u8 = 0x06;
/// LSR bits vm-superio always reports set: transmitter holding and shift registers empty.
const LSR_ALWAYS: u8 = 0x60;
/// MSR as vm-superio reports it outside loopback: CTS, DSR and DCD; it never changes.
const MSR_FIXED: u8 = 0xb0;

impl Persist for Serial {
    type State = SerialDeviceState;

    fn save(&self) -> SerialDeviceState {
        let s = self.uart.state();
        SerialDeviceState {
            divisor_low: s.baud_divisor_low,
            divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            receive_fifo: s.in_buffer,
            fifos_enabled: self.fifos_enabled,
        }
    }

    fn restore(&mut self, state: &SerialDeviceState) -> Result<(), StateError> {
        let refuse = |field: &str, problem: String| Err(StateError::new(DEVICE, field, problem));
        if state.receive_fifo.len() > RECEIVE_FIFO_DEPTH {
            let problem = format!("{} bytes in a {RECEIVE_FIFO_DEPTH}-byte FIFO", state.receive_fifo.len());
            return refuse("receive_fifo", problem);
        }
        if state.interrupt_enable & !IER_VALID != 0 {
            return refuse("interrupt_enable", format!("{:#x} sets bits a 16550A lacks", state.interrupt_enable));
        }
        let iir = state.interrupt_identification;
        if iir != IIR_NONE && (iir & !IIR_PENDING != 0 || iir == 0) {
            return refuse("interrupt_identification", format!("{iir:#x} is not an interrupt this UART raises"));
        }
        let data_ready = if state.receive_fifo.is_empty() { 0 } else { LSR_DATA_READY };
        if state.line_status != LSR_ALWAYS | data_ready {
            let problem = format!(
                "{:#x} disagrees with the FIFO ({} bytes: {:#x})",
                state.line_status,
                state.receive_fifo.len(),
                LSR_ALWAYS | data_ready
            );
            return refuse("line_status", problem);
        }
        if state.modem_status != MSR_FIXED {
            return refuse("modem_status", format!("{:#x}; this UART's is always {MSR_FIXED:#x}", state.modem_status));
        }
        let superio_state = SerialState {
            baud_divisor_low: state.divisor_low,
            baud_divisor_high: state.divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.receive_fifo.clone(),
        };
        let trigger = LineTrigger::new(self.uart.interrupt_evt().line.clone(), true);
        // vm-superio refuses only an overfull FIFO, checked above; the writer moves over once it has accepted.
        let sink: Box<dyn Write + Send> = Box::new(io::sink());
        let mut uart = match Uart::from_state(&superio_state, trigger, vm_superio::serial::NoEvents, sink) {
            Ok(uart) => uart,
            Err(error) => return refuse("receive_fifo", format!("vm-superio refused the state: {error:?}")),
        };
        std::mem::swap(uart.writer_mut(), self.uart.writer_mut());
        uart.interrupt_evt().muted.store(false, Ordering::Relaxed);
        self.uart = uart;
        self.fifos_enabled = state.fifos_enabled;
        self.gate.emptied(Instant::now());
        Ok(())
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
    use crate::persist::testing::{assert_refused, fuzz_restore, through_json};
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

    /// Every register a guest can read, the divisor latch included, without reading the data register or IIR
    /// (which have side effects).
    fn registers(serial: &mut Serial) -> Vec<u8> {
        let lcr = read(serial, LCR_REGISTER);
        serial.write(LCR_REGISTER, &[lcr | LCR_DLAB]);
        let mut values = vec![read(serial, 0), read(serial, 1)];
        serial.write(LCR_REGISTER, &[lcr & !LCR_DLAB]);
        values.extend([1, 3, 4, 5, 6, 7].map(|offset| read(serial, offset)));
        serial.write(LCR_REGISTER, &[lcr]);
        values
    }

    /// A UART in use: divisor set, FIFOs on, receive interrupt enabled and pending, bytes waiting, scratch used.
    fn used_serial() -> (Serial, Arc<CountingLine>) {
        let (mut serial, line, _) = serial();
        serial.write(LCR_REGISTER, &[LCR_DLAB | 0x03]);
        serial.write(0, &[0x01]);
        serial.write(1, &[0x02]);
        serial.write(LCR_REGISTER, &[0x1b]);
        serial.write(7, &[0x5a]);
        serial.write(4, &[0x0b]);
        enable_fifos(&mut serial);
        serial.write(IER, &[1]);
        assert_eq!(serial.receive(b"pending"), 7);
        (serial, line)
    }

    #[test]
    fn state_round_trips_with_the_fifo_and_no_interrupt() {
        let (mut used, _) = used_serial();
        let state = through_json(&used.save());
        assert_eq!(state.receive_fifo, b"pending");
        assert!(state.fifos_enabled);
        let (mut restored, line, _) = serial();
        restored.restore(&state).unwrap();
        assert_eq!(line.count(), 0, "a restore raises no interrupt, though one is pending");
        assert_eq!(registers(&mut restored), registers(&mut used));
        assert_ne!(registers(&mut serial().0), registers(&mut used), "the comparison sees the difference");
        assert_eq!(read(&mut restored, IIR), read(&mut used, IIR), "the pending interrupt is identified alike");
        assert_eq!(drain(&mut restored), b"pending");
        assert_eq!(used.receive(&[b'x'; 100]), 0, "(the original still holds its bytes)");
        // FIFOs on after the restore: a burst fills all 64 bytes once the guest has looked.
        assert_eq!(restored.receive(&[b'x'; 100]), RECEIVE_FIFO_DEPTH);
    }

    #[test]
    fn a_restored_uart_keeps_writing_to_its_own_output() {
        let out = SharedBuffer::default();
        let mut serial =
            Serial::new(Arc::new(CountingLine::default()), Box::new(out.clone()), Arc::new(InputRoom::default()));
        let (mut used, _) = used_serial();
        serial.restore(&used.save()).unwrap();
        serial.write(4, &[0x0b]); // out of loopback, as the used UART was
        serial.write(0, b"k");
        used.write(0, b"-");
        assert_eq!(out.0.lock().unwrap().as_slice(), b"k");
    }

    #[test]
    fn hostile_states_are_refused() {
        let (serial_in_use, _) = used_serial();
        let good = serial_in_use.save();
        let (mut target, ..) = serial();
        let bad = |change: fn(&mut SerialDeviceState)| {
            let mut state = good.clone();
            change(&mut state);
            state
        };
        assert_refused(&mut target, &bad(|s| s.receive_fifo = vec![0; RECEIVE_FIFO_DEPTH + 1]), "receive_fifo");
        assert_refused(&mut target, &bad(|s| s.interrupt_enable = 0x10), "interrupt_enable");
        assert_refused(&mut target, &bad(|s| s.interrupt_identification = 0), "interrupt_identification");
        assert_refused(&mut target, &bad(|s| s.interrupt_identification = 0x03), "interrupt_identification");
        assert_refused(&mut target, &bad(|s| s.interrupt_identification = 0xc4), "interrupt_identification");
        assert_refused(&mut target, &bad(|s| s.receive_fifo.clear()), "line_status");
        assert_refused(&mut target, &bad(|s| s.line_status = 0xff), "line_status");
        assert_refused(&mut target, &bad(|s| s.modem_status = 0), "modem_status");
        let unknown = serde_json::to_string(&good).unwrap().replace("\"scratch\"", "\"fcr\":1,\"scratch\"");
        assert!(serde_json::from_str::<SerialDeviceState>(&unknown).is_err(), "fields from elsewhere are refused");
    }

    #[test]
    fn mutated_states_never_panic() {
        let (serial_in_use, _) = used_serial();
        let counts = fuzz_restore(
            || serial().0,
            &serial_in_use.save(),
            |dev| {
                registers(dev);
                read(dev, IIR);
                dev.write(IER, &[0x0f]);
                dev.write(FCR, &[0]);
                // The data register selected, so that the drain reads the FIFO (not the divisor) and ends.
                dev.write(LCR_REGISTER, &[0x03]);
                dev.receive(b"abc");
                drain(dev);
                dev.write(0, b"z");
            },
            2000,
        );
        assert!(counts.refused > 0 && counts.loaded > 0, "{counts:?}");
    }
}

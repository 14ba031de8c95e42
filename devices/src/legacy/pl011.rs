//! An ARM PL011 UART (PrimeCell r1p5 programmer's model, DDI 0183), as Linux's amba-pl011 driver and the `pl011`
//! earlycon use it.
//!
//! Transmission is instant: every byte written to DR goes to the output at once, so the transmit FIFO always
//! reads empty and never busy, and each write leaves the transmit interrupt raised until the driver masks or
//! clears it (the driver stops writing when it has nothing left, then masks TXIM). Output works whatever CR says,
//! because without firmware nobody enables the UART before earlycon writes to it.
//!
//! Reception has the 16-entry FIFO the ID register promises (one entry with FIFOs off, as after reset); host input
//! beyond it waits on the host side and enters as the guest makes room (see [`ReceiveGate`]), so a driver that
//! drains the FIFO when it starts loses at most what the FIFO held. The receive interrupt is the
//! FIFO at or above its IFLS trigger level; the receive-timeout interrupt is the FIFO not empty (no more input is
//! arriving within the instant it takes the guest to look, so the timeout has always elapsed).
//!
//! The interrupt output is a level (`interrupt_asserted`), raised on the line at each rising edge; see
//! `LevelOutput` for how a level-triggered SPI is kept asserted.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::primecell::{self, id_register};
use super::receive_gate::ReceiveGate;
use crate::{BusDevice, InputRoom, InterruptLine, LevelOutput, Persist, StateError};

const DR: u64 = 0x00;
const RSR_ECR: u64 = 0x04;
const FR: u64 = 0x18;
const ILPR: u64 = 0x20;
const IBRD: u64 = 0x24;
const FBRD: u64 = 0x28;
const LCR_H: u64 = 0x2c;
const CR: u64 = 0x30;
const IFLS: u64 = 0x34;
const IMSC: u64 = 0x38;
const RIS: u64 = 0x3c;
const MIS: u64 = 0x40;
const ICR: u64 = 0x44;
const DMACR: u64 = 0x48;

const FR_RXFE: u32 = 1 << 4;
const FR_RXFF: u32 = 1 << 6;
const FR_TXFE: u32 = 1 << 7;

const INT_RX: u32 = 1 << 4;
const INT_TX: u32 = 1 << 5;
const INT_RT: u32 = 1 << 6;
/// RI, CTS, DCD, DSR modem interrupts and the FE, PE, BE, OE error interrupts: never raised here.
const INT_ALL: u32 = 0x7ff;

const LCR_H_FEN: u32 = 1 << 4;
/// CR after reset: transmit and receive enabled, UART disabled.
const CR_RESET: u32 = 0x300;
/// IFLS after reset: both trigger levels at half full.
const IFLS_RESET: u32 = 0x12;

pub const FIFO_DEPTH: usize = 16;

/// UARTPeriphID0-3 (part 0x011, designer ARM, revision 1: Linux then sizes the FIFO at 16) and UARTPCellID0-3.
const IDS: [u8; 8] = [0x11, 0x10, 0x14, 0x00, 0x0d, 0xf0, 0x05, 0xb1];

#[derive(Clone, Copy)]
struct Registers {
    ilpr: u32,
    ibrd: u32,
    fbrd: u32,
    lcr_h: u32,
    cr: u32,
    ifls: u32,
    imsc: u32,
    dmacr: u32,
    /// The transmit interrupt, latched by each transmitted byte and cleared through ICR.
    tx_raised: bool,
}

impl Registers {
    const RESET: Registers = Registers {
        ilpr: 0,
        ibrd: 0,
        fbrd: 0,
        lcr_h: 0,
        cr: CR_RESET,
        ifls: IFLS_RESET,
        imsc: 0,
        dmacr: 0,
        tx_raised: false,
    };
}

pub struct Pl011 {
    regs: Registers,
    rx_fifo: VecDeque<u8>,
    gate: ReceiveGate,
    output: Box<dyn Write + Send>,
    interrupt: LevelOutput,
}

impl Pl011 {
    /// `room` is notified when the guest is ready for more input (see [`receive`](Self::receive)).
    pub fn new(interrupt: Arc<dyn InterruptLine>, output: Box<dyn Write + Send>, room: Arc<InputRoom>) -> Self {
        Pl011 {
            regs: Registers::RESET,
            rx_fifo: VecDeque::with_capacity(FIFO_DEPTH),
            gate: ReceiveGate::new(room),
            output,
            interrupt: LevelOutput::new(interrupt),
        }
    }

    /// Takes as much host input as the guest is ready for now and returns how many bytes that was; the caller keeps
    /// the rest and offers it again when the `InputRoom` is notified.
    pub fn receive(&mut self, bytes: &[u8]) -> usize {
        self.receive_at(bytes, Instant::now())
    }

    fn receive_at(&mut self, bytes: &[u8], now: Instant) -> usize {
        if bytes.is_empty() || !self.rx_fifo.is_empty() || !self.gate.open(now) {
            return 0;
        }
        let count = bytes.len().min(self.fifo_capacity());
        self.rx_fifo.extend(&bytes[..count]);
        self.update_interrupt();
        count
    }

    /// Whether the interrupt output is high: what a level-triggered line's resample asks.
    pub fn interrupt_asserted(&self) -> bool {
        self.masked_status() != 0
    }

    /// Back to power-on state (guest reset): what sat in the FIFO was the old boot's; host input not yet taken
    /// stays with the input thread for the next one.
    pub fn reset(&mut self) {
        self.regs = Registers::RESET;
        self.clear_receive_fifo();
        self.update_interrupt();
    }

    fn clear_receive_fifo(&mut self) {
        self.rx_fifo.clear();
        self.gate.emptied(Instant::now());
    }

    fn fifo_capacity(&self) -> usize {
        if self.regs.lcr_h & LCR_H_FEN != 0 {
            FIFO_DEPTH
        } else {
            1
        }
    }

    /// Entries at which the receive interrupt fires: IFLS RXIFLSEL selects 1/8, 1/4, 1/2, 3/4 or 7/8 full.
    fn rx_trigger_level(&self) -> usize {
        if self.regs.lcr_h & LCR_H_FEN == 0 {
            return 1;
        }
        let eighths = match (self.regs.ifls >> 3) & 0x7 {
            0 => 1,
            1 => 2,
            2 => 4,
            3 => 6,
            _ => 7,
        };
        FIFO_DEPTH * eighths / 8
    }

    fn raw_status(&self) -> u32 {
        let mut status = 0;
        if self.regs.tx_raised {
            status |= INT_TX;
        }
        if !self.rx_fifo.is_empty() {
            status |= INT_RT;
            if self.rx_fifo.len() >= self.rx_trigger_level() {
                status |= INT_RX;
            }
        }
        status
    }

    fn masked_status(&self) -> u32 {
        self.raw_status() & self.regs.imsc
    }

    fn update_interrupt(&mut self) {
        let level = self.interrupt_asserted();
        self.interrupt.set(level);
    }

    fn flags(&self) -> u32 {
        let mut flags = FR_TXFE;
        if self.rx_fifo.is_empty() {
            flags |= FR_RXFE;
        }
        if self.rx_fifo.len() >= self.fifo_capacity() {
            flags |= FR_RXFF;
        }
        flags
    }

    /// The guest read a register that tells whether the receive FIFO holds anything.
    fn status_read(&mut self) {
        if self.rx_fifo.is_empty() {
            self.gate.saw_empty();
        }
    }

    fn read_register(&mut self, register: u64) -> u32 {
        match register {
            DR => match self.rx_fifo.pop_front() {
                Some(byte) => {
                    if self.rx_fifo.is_empty() {
                        self.gate.emptied(Instant::now());
                    }
                    u32::from(byte)
                }
                None => 0,
            },
            RSR_ECR => 0,
            FR => {
                self.status_read();
                self.flags()
            }
            ILPR => self.regs.ilpr,
            IBRD => self.regs.ibrd,
            FBRD => self.regs.fbrd,
            LCR_H => self.regs.lcr_h,
            CR => self.regs.cr,
            IFLS => self.regs.ifls,
            IMSC => self.regs.imsc,
            RIS => {
                self.status_read();
                self.raw_status()
            }
            MIS => {
                self.status_read();
                self.masked_status()
            }
            DMACR => self.regs.dmacr,
            _ => id_register(&IDS, register).unwrap_or(0),
        }
    }

    fn write_register(&mut self, register: u64, value: u32) {
        match register {
            DR => {
                // A closed terminal or a full disk must not stop the guest; the byte is lost either way.
                let _ = self.output.write_all(&[value as u8]).and_then(|_| self.output.flush());
                self.regs.tx_raised = true;
            }
            RSR_ECR => {} // clears receive errors, of which there are none
            ILPR => self.regs.ilpr = value & 0xff,
            IBRD => self.regs.ibrd = value & 0xffff,
            FBRD => self.regs.fbrd = value & 0x3f,
            LCR_H => {
                // Switching FIFOs on or off empties them, as QEMU's PL011 does.
                if (self.regs.lcr_h ^ value) & LCR_H_FEN != 0 {
                    self.clear_receive_fifo();
                }
                self.regs.lcr_h = value & 0xff;
            }
            CR => self.regs.cr = value & 0xff87,
            IFLS => self.regs.ifls = value & 0x3f,
            IMSC => self.regs.imsc = value & INT_ALL,
            // Receive and timeout interrupts follow the FIFO's fill, so only the transmit one can be cleared.
            ICR if value & INT_TX != 0 => self.regs.tx_raised = false,
            DMACR => self.regs.dmacr = value & 0x7,
            _ => {} // read-only or reserved
        }
    }
}

/// The PL011 as data: its registers, the transmit interrupt's latch and the receive FIFO. The interrupt level
/// derives from them and is not saved; the receive gate's pacing is host-side timing and starts afresh.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pl011State {
    pub ilpr: u32,
    pub ibrd: u32,
    pub fbrd: u32,
    pub lcr_h: u32,
    pub cr: u32,
    pub ifls: u32,
    pub imsc: u32,
    pub dmacr: u32,
    pub tx_raised: bool,
    /// The receive FIFO, oldest byte first.
    pub rx_fifo: Vec<u8>,
}

const DEVICE: &str = "PL011";

impl Persist for Pl011 {
    type State = Pl011State;

    fn save(&self) -> Pl011State {
        let r = self.regs;
        Pl011State {
            ilpr: r.ilpr,
            ibrd: r.ibrd,
            fbrd: r.fbrd,
            lcr_h: r.lcr_h,
            cr: r.cr,
            ifls: r.ifls,
            imsc: r.imsc,
            dmacr: r.dmacr,
            tx_raised: r.tx_raised,
            rx_fifo: self.rx_fifo.iter().copied().collect(),
        }
    }

    fn restore(&mut self, state: &Pl011State) -> Result<(), StateError> {
        // Each register holds only the bits its write keeps.
        let widths = [
            ("ilpr", state.ilpr, 0xff),
            ("ibrd", state.ibrd, 0xffff),
            ("fbrd", state.fbrd, 0x3f),
            ("lcr_h", state.lcr_h, 0xff),
            ("cr", state.cr, 0xff87),
            ("ifls", state.ifls, 0x3f),
            ("imsc", state.imsc, INT_ALL),
            ("dmacr", state.dmacr, 0x7),
        ];
        for (field, value, mask) in widths {
            if value & !mask != 0 {
                return Err(StateError::new(DEVICE, field, format!("{value:#x} sets bits outside {mask:#x}")));
            }
        }
        let capacity = if state.lcr_h & LCR_H_FEN != 0 { FIFO_DEPTH } else { 1 };
        if state.rx_fifo.len() > capacity {
            let problem = format!("{} bytes in a FIFO of {capacity}", state.rx_fifo.len());
            return Err(StateError::new(DEVICE, "rx_fifo", problem));
        }
        self.regs = Registers {
            ilpr: state.ilpr,
            ibrd: state.ibrd,
            fbrd: state.fbrd,
            lcr_h: state.lcr_h,
            cr: state.cr,
            ifls: state.ifls,
            imsc: state.imsc,
            dmacr: state.dmacr,
            tx_raised: state.tx_raised,
        };
        self.rx_fifo = state.rx_fifo.iter().copied().collect();
        self.gate.emptied(Instant::now());
        let level = self.interrupt_asserted();
        self.interrupt.restore_level(level);
        Ok(())
    }
}

impl BusDevice for Pl011 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        primecell::read(offset, data, |register| self.read_register(register));
        self.update_interrupt();
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        primecell::write(offset, data, |register, value| self.write_register(register, value));
        self.update_interrupt();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::receive_gate::UNSEEN_EMPTY_GRACE;
    use crate::persist::testing::{assert_refused, fuzz_restore, through_json};
    use crate::test_utils::{CountingLine, SharedBuffer};

    fn read32(uart: &mut Pl011, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        uart.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write32(uart: &mut Pl011, offset: u64, value: u32) {
        uart.write(offset, &value.to_le_bytes());
    }

    fn uart() -> (Pl011, Arc<CountingLine>, SharedBuffer) {
        let line = Arc::new(CountingLine::default());
        let out = SharedBuffer::default();
        (Pl011::new(line.clone(), Box::new(out.clone()), Arc::new(InputRoom::default())), line, out)
    }

    /// As amba-pl011 starts the port: FIFOs on, UART enabled, receive and timeout interrupts unmasked, and what the
    /// receive FIFO held drained.
    fn start_like_linux(uart: &mut Pl011) {
        write32(uart, LCR_H, LCR_H_FEN | 0x60);
        write32(uart, CR, 0x301);
        write32(uart, IMSC, INT_RX | INT_RT);
        drain(uart);
    }

    /// amba-pl011's receive loop: read DR while FR says the FIFO is not empty.
    fn drain(uart: &mut Pl011) -> Vec<u8> {
        let mut received = Vec::new();
        while read32(uart, FR) & FR_RXFE == 0 {
            received.push(read32(uart, DR) as u8);
        }
        received
    }

    #[test]
    fn id_registers_identify_a_pl011_r1() {
        let (mut uart, ..) = uart();
        let ids: Vec<u32> = (0..8).map(|i| read32(&mut uart, 0xfe0 + 4 * i)).collect();
        assert_eq!(ids, [0x11, 0x10, 0x14, 0x00, 0x0d, 0xf0, 0x05, 0xb1]);
        let mut byte = [0u8];
        uart.read(0xfe8, &mut byte);
        assert_eq!(byte, [0x14]);
    }

    #[test]
    fn bytes_written_to_dr_reach_the_output_at_any_width() {
        let (mut uart, _, out) = uart();
        uart.write(DR, b"h");
        uart.write(DR, &[b'i', 0]);
        write32(&mut uart, DR, u32::from(b'\n'));
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");
        assert_eq!(read32(&mut uart, FR) & (FR_TXFE | 1 << 5 | 1 << 3), FR_TXFE, "TX empty, not full, not busy");
    }

    #[test]
    fn transmit_interrupt_follows_writes_mask_and_clear() {
        let (mut uart, line, _) = uart();
        write32(&mut uart, DR, u32::from(b'a'));
        assert_eq!(read32(&mut uart, RIS) & INT_TX, INT_TX);
        assert!(!uart.interrupt_asserted(), "masked");
        write32(&mut uart, IMSC, INT_TX);
        assert!(uart.interrupt_asserted());
        assert_eq!(read32(&mut uart, MIS), INT_TX);
        assert_eq!(line.count(), 1);
        write32(&mut uart, ICR, INT_TX);
        assert!(!uart.interrupt_asserted());
        assert_eq!(read32(&mut uart, RIS), 0);
        write32(&mut uart, DR, u32::from(b'b'));
        assert_eq!(line.count(), 2, "a new rising edge");
        write32(&mut uart, IMSC, 0);
        assert!(!uart.interrupt_asserted(), "the driver masks TXIM when it has nothing more to send");
    }

    #[test]
    fn received_bytes_raise_timeout_then_level_interrupts_and_drain_in_order() {
        let (mut uart, line, _) = uart();
        start_like_linux(&mut uart);
        assert_eq!(read32(&mut uart, FR) & FR_RXFE, FR_RXFE);
        assert_eq!(uart.receive(b"ab"), 2);
        assert_eq!(read32(&mut uart, RIS), INT_RT, "below the half-full trigger: timeout only");
        assert!(uart.interrupt_asserted());
        assert_eq!(line.count(), 1);
        assert_eq!(drain(&mut uart), b"ab");
        assert!(!uart.interrupt_asserted(), "an empty FIFO drops the line");
        assert_eq!(uart.receive(&[b'c'; 8]), 8);
        assert_eq!(read32(&mut uart, RIS), INT_RT | INT_RX, "8 of 16: at the trigger level");
        assert_eq!(line.count(), 2);
        assert_eq!(drain(&mut uart), b"cccccccc");
        assert_eq!(read32(&mut uart, DR), 0, "reading an empty FIFO is harmless");
    }

    #[test]
    fn input_longer_than_the_fifo_arrives_whole_and_in_order_in_bursts() {
        let line = Arc::new(CountingLine::default());
        let room = Arc::new(InputRoom::default());
        let mut uart = Pl011::new(line, Box::new(std::io::sink()), room.clone());
        start_like_linux(&mut uart);
        let input: Vec<u8> = (0..100u8).collect();
        let mut offered = 0;
        let mut received = Vec::new();
        while offered < input.len() {
            let generation = room.generation();
            let taken = uart.receive(&input[offered..]);
            assert!(taken > 0 && taken <= FIFO_DEPTH, "{taken}");
            if taken == FIFO_DEPTH {
                assert_eq!(read32(&mut uart, FR) & FR_RXFF, FR_RXFF);
            }
            offered += taken;
            received.extend(drain(&mut uart));
            assert_ne!(room.generation(), generation, "seeing the FIFO empty wakes the input thread");
        }
        assert_eq!(received, input);
    }

    #[test]
    fn a_receive_loop_is_not_refilled_while_it_reads() {
        let (mut uart, ..) = uart();
        start_like_linux(&mut uart);
        assert_eq!(uart.receive(&[b'a'; 4]), 4);
        read32(&mut uart, DR);
        assert_eq!(uart.receive(b"b"), 0, "not empty yet");
        for _ in 0..3 {
            read32(&mut uart, DR);
        }
        assert_eq!(uart.receive(b"b"), 0, "empty, but the guest has not looked yet");
        assert_eq!(read32(&mut uart, FR) & FR_RXFE, FR_RXFE);
        assert_eq!(uart.receive(b"b"), 1, "the guest saw the FIFO empty: its loop is over");
    }

    #[test]
    fn a_drain_at_start_loses_only_what_the_fifo_held() {
        let (mut uart, ..) = uart();
        let typed_ahead = b"hello\nq\n";
        let mut offered = uart.receive_at(typed_ahead, Instant::now() + UNSEEN_EMPTY_GRACE);
        assert_eq!(offered, 1, "before the driver starts, FIFOs are off: one byte");
        // Enabling FIFOs empties them; nothing enters until the driver's drain has seen the FIFO empty.
        write32(&mut uart, LCR_H, LCR_H_FEN | 0x60);
        assert_eq!(uart.receive(&typed_ahead[offered..]), 0);
        start_like_linux(&mut uart);
        offered += uart.receive(&typed_ahead[offered..]);
        assert_eq!(offered, typed_ahead.len());
        assert_eq!(drain(&mut uart), b"ello\nq\n");
    }

    #[test]
    fn a_guest_that_never_looks_at_the_status_still_gets_input() {
        let (mut uart, ..) = uart();
        start_like_linux(&mut uart);
        assert_eq!(uart.receive(b"ab"), 2);
        // An interrupt handler that reads only the data register.
        assert_eq!(read32(&mut uart, DR), u32::from(b'a'));
        assert_eq!(read32(&mut uart, DR), u32::from(b'b'));
        let now = Instant::now();
        assert_eq!(uart.receive_at(b"c", now), 0);
        assert_eq!(uart.receive_at(b"c", now + UNSEEN_EMPTY_GRACE), 1);
    }

    #[test]
    fn without_fifos_one_byte_at_a_time() {
        let (mut uart, ..) = uart();
        write32(&mut uart, IMSC, INT_RX);
        assert_eq!(read32(&mut uart, FR) & FR_RXFE, FR_RXFE);
        assert_eq!(uart.receive(b"xy"), 1);
        assert_eq!(read32(&mut uart, FR) & (FR_RXFF | FR_RXFE), FR_RXFF);
        assert!(uart.interrupt_asserted(), "trigger level is one byte");
        assert_eq!(uart.receive(b"y"), 0, "full");
        assert_eq!(drain(&mut uart), b"x");
        assert_eq!(uart.receive(b"y"), 1);
        assert_eq!(drain(&mut uart), b"y");
    }

    #[test]
    fn switching_fifos_on_or_off_empties_them() {
        let (mut uart, ..) = uart();
        start_like_linux(&mut uart);
        assert_eq!(uart.receive(b"xyz"), 3);
        write32(&mut uart, LCR_H, 0x60);
        assert!(drain(&mut uart).is_empty());
        assert_eq!(uart.receive(b"xyz"), 1, "one byte with FIFOs off");
        write32(&mut uart, LCR_H, 0x60);
        assert_eq!(drain(&mut uart), b"x", "rewriting LCR_H without changing FEN keeps the FIFO");
    }

    #[test]
    fn trigger_levels_follow_ifls() {
        let (mut uart, ..) = uart();
        start_like_linux(&mut uart);
        write32(&mut uart, IFLS, 4 << 3); // 7/8
        assert_eq!(uart.receive(&[0; 13]), 13);
        assert_eq!(read32(&mut uart, RIS) & INT_RX, 0);
        drain(&mut uart);
        assert_eq!(uart.receive(&[0; 14]), 14);
        assert_eq!(read32(&mut uart, RIS) & INT_RX, INT_RX);
        write32(&mut uart, IFLS, 7 << 3); // reserved encodings act as the highest level
        assert_eq!(read32(&mut uart, IFLS), 7 << 3);
    }

    #[test]
    fn control_registers_read_back_masked_to_their_width() {
        let (mut uart, ..) = uart();
        assert_eq!(read32(&mut uart, CR), CR_RESET);
        assert_eq!(read32(&mut uart, IFLS), IFLS_RESET);
        write32(&mut uart, IBRD, 0xffff_ffff);
        write32(&mut uart, FBRD, 0xffff_ffff);
        write32(&mut uart, IMSC, 0xffff_ffff);
        write32(&mut uart, DMACR, 0xffff_ffff);
        assert_eq!([IBRD, FBRD, IMSC, DMACR].map(|r| read32(&mut uart, r)), [0xffff, 0x3f, 0x7ff, 0x7]);
        uart.write(IBRD, &[0x34, 0x12]);
        assert_eq!(read32(&mut uart, IBRD), 0x1234, "16-bit accesses as amba-pl011 makes them");
    }

    #[test]
    fn reset_restores_registers_and_empties_the_fifo() {
        let (mut uart, _, out) = uart();
        start_like_linux(&mut uart);
        assert_eq!(uart.receive(&[b'x'; 40]), FIFO_DEPTH, "the rest stays with the caller");
        uart.reset();
        assert_eq!(read32(&mut uart, IMSC), 0);
        assert_eq!(read32(&mut uart, LCR_H), 0);
        assert!(!uart.interrupt_asserted());
        uart.write(DR, b"k");
        assert_eq!(out.0.lock().unwrap().as_slice(), b"k");
        assert!(drain(&mut uart).is_empty(), "what had reached the old FIFO was the old boot's");
        assert_eq!(uart.receive(&[b'x'; 24]), 1, "FIFOs off again: one byte at a time");
    }

    #[test]
    fn hostile_offsets_and_sizes_are_harmless() {
        let (mut uart, _, out) = uart();
        for offset in [0x4c, 0x1000, 0x1001, 0xfff, 1 << 40, u64::MAX, 3] {
            for len in [0usize, 1, 2, 3, 4, 8] {
                let mut data = vec![0xaa; len];
                uart.read(offset, &mut data);
                uart.write(offset, &data);
            }
        }
        let mut wide = [0xaau8; 8];
        uart.read(DR, &mut wide);
        assert_eq!(wide, [0; 8], "wider than a register reads as zero");
        uart.write(DR, &[b'z'; 8]);
        uart.write(DR + 1, b"z");
        assert!(out.0.lock().unwrap().is_empty(), "no odd access transmitted anything");
    }

    /// Every register a guest can read without side effects on the FIFO (DR is left out).
    fn registers(uart: &mut Pl011) -> Vec<u32> {
        [FR, ILPR, IBRD, FBRD, LCR_H, CR, IFLS, IMSC, RIS, MIS, DMACR].map(|r| read32(uart, r)).to_vec()
    }

    /// A PL011 in use: started as Linux does, baud set, transmit interrupt latched, bytes waiting.
    fn used_uart() -> Pl011 {
        let (mut uart, ..) = uart();
        start_like_linux(&mut uart);
        write32(&mut uart, IBRD, 0x27);
        write32(&mut uart, FBRD, 0x4);
        write32(&mut uart, IMSC, INT_RX | INT_RT | INT_TX);
        write32(&mut uart, DR, u32::from(b'x'));
        assert_eq!(uart.receive(b"waiting"), 7);
        assert!(uart.interrupt_asserted());
        uart
    }

    #[test]
    fn state_round_trips_and_the_level_is_derived_not_raised() {
        let mut used = used_uart();
        let state = through_json(&used.save());
        assert_eq!(state.rx_fifo, b"waiting");
        let (mut restored, line, _) = uart();
        restored.restore(&state).unwrap();
        assert_eq!(line.count(), 0, "a restore raises no interrupt");
        assert!(restored.interrupt_asserted());
        assert_eq!(registers(&mut restored), registers(&mut used));
        assert_ne!(registers(&mut uart().0), registers(&mut used), "the comparison sees the difference");
        write32(&mut restored, ICR, INT_TX);
        assert_eq!(line.count(), 0, "still asserted: no new edge");
        assert_eq!(drain(&mut restored), b"waiting");
        assert!(!restored.interrupt_asserted());
        write32(&mut restored, DR, u32::from(b'y'));
        assert_eq!(line.count(), 1, "the next rising edge raises the line");
    }

    #[test]
    fn hostile_states_are_refused() {
        let good = used_uart().save();
        let (mut target, ..) = uart();
        let bad = |change: fn(&mut Pl011State)| {
            let mut state = good.clone();
            change(&mut state);
            state
        };
        assert_refused(&mut target, &bad(|s| s.rx_fifo = vec![0; FIFO_DEPTH + 1]), "rx_fifo");
        assert_refused(&mut target, &bad(|s| s.lcr_h &= !LCR_H_FEN), "rx_fifo");
        assert_refused(&mut target, &bad(|s| s.ibrd = 0x1_0000), "ibrd");
        assert_refused(&mut target, &bad(|s| s.cr = u32::MAX), "cr");
        assert_refused(&mut target, &bad(|s| s.imsc = 0x800), "imsc");
        assert_refused(&mut target, &bad(|s| s.ifls = 0x40), "ifls");
        assert_refused(&mut target, &bad(|s| s.dmacr = 8), "dmacr");
        let unknown = serde_json::to_string(&good).unwrap().replace("\"cr\"", "\"tx_fifo\":[],\"cr\"");
        assert!(serde_json::from_str::<Pl011State>(&unknown).is_err(), "fields from elsewhere are refused");
    }

    #[test]
    fn mutated_states_never_panic() {
        let good = used_uart().save();
        let counts = fuzz_restore(
            || uart().0,
            &good,
            |dev| {
                registers(dev);
                write32(dev, LCR_H, 0);
                dev.receive(b"abc");
                drain(dev);
                write32(dev, ICR, INT_ALL);
            },
            2000,
        );
        assert!(counts.refused > 0 && counts.loaded > 0, "{counts:?}");
    }
}

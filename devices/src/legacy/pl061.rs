//! An ARM PL061 GPIO controller (DDI 0190), here to carry the power key: the FDT's `gpio-keys` node wires line 3
//! to KEY_POWER, as on QEMU's virt machine, and QMP `system_powerdown` calls [`Pl061::press_power_button`].
//!
//! Eight lines. A line set as output (GPIODIR) reads back what the guest wrote; an input reads its external level,
//! which the VMM sets. Interrupts per the TRM: GPIOIS picks level (1) or edge (0), GPIOIBE both edges, GPIOIEV
//! rising/high (1) or falling/low (0); edges latch in GPIORIS until GPIOIC clears them, levels show while they
//! last. The output is a level (`interrupt_asserted`), raised on the line at each rising edge (see `LevelOutput`).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::primecell::{self, id_register};
use crate::{BusDevice, InterruptLine, LevelOutput, Persist, StateError};

/// GPIODATA spans 0x000-0x3fc: address bits 9:2 mask which lines an access reads or writes.
const DATA_END: u64 = 0x400;
const DIR: u64 = 0x400;
const IS: u64 = 0x404;
const IBE: u64 = 0x408;
const IEV: u64 = 0x40c;
const IE: u64 = 0x410;
const RIS: u64 = 0x414;
const MIS: u64 = 0x418;
const IC: u64 = 0x41c;
const AFSEL: u64 = 0x420;

/// GPIOPeriphID0-3 (part 0x061, designer ARM) and GPIOPCellID0-3.
const IDS: [u8; 8] = [0x61, 0x10, 0x04, 0x00, 0x0d, 0xf0, 0x05, 0xb1];

/// The line `gpio-keys` reads as the power key (arch's aarch64 layout and FDT say the same).
pub const POWER_KEY_LINE: u8 = 3;
pub const LINES: u8 = 8;

#[derive(Clone, Copy, Default)]
struct Registers {
    data_out: u8,
    dir: u8,
    is: u8,
    ibe: u8,
    iev: u8,
    ie: u8,
    afsel: u8,
    /// Latched edge interrupts.
    edges: u8,
}

pub struct Pl061 {
    regs: Registers,
    /// External levels of the lines, as the VMM drives them.
    inputs: u8,
    /// The power key is down and goes up once the guest has read it down.
    release_power_key_when_seen: bool,
    interrupt: LevelOutput,
}

impl Pl061 {
    pub fn new(interrupt: Arc<dyn InterruptLine>) -> Self {
        Pl061 {
            regs: Registers::default(),
            inputs: 0,
            release_power_key_when_seen: false,
            interrupt: LevelOutput::new(interrupt),
        }
    }

    /// Presses the power key: line 3 goes high now (an edge for `gpio-keys`' both-edge interrupt), and low again
    /// right after the guest has read it high, which is the second edge that makes `gpio-keys` report the release.
    /// Releasing on a timer instead would lose the press if the guest read the line late; this way a press made
    /// before the driver is ready is reported once it opens. Pressing a key that is already down does nothing.
    pub fn press_power_button(&mut self) {
        if self.line_input(POWER_KEY_LINE) {
            return;
        }
        self.set_input(POWER_KEY_LINE, true);
        self.release_power_key_when_seen = true;
    }

    /// Drives input `line` to `high` (out-of-range lines are ignored); an interrupt follows if the guest asked.
    pub fn set_input(&mut self, line: u8, high: bool) {
        if line >= LINES {
            return;
        }
        if line == POWER_KEY_LINE && !high {
            self.release_power_key_when_seen = false;
        }
        let bit = 1u8 << line;
        let inputs = if high { self.inputs | bit } else { self.inputs & !bit };
        self.change(|s| s.inputs = inputs);
    }

    /// Whether the interrupt output is high: what a level-triggered line's resample asks.
    pub fn interrupt_asserted(&self) -> bool {
        self.masked_status() != 0
    }

    /// Back to power-on state (guest reset): all lines inputs, interrupts off. External levels stay as they are,
    /// except that a pending power key press is dropped: it was meant for the guest that is going away.
    pub fn reset(&mut self) {
        if self.release_power_key_when_seen {
            self.inputs &= !(1 << POWER_KEY_LINE);
            self.release_power_key_when_seen = false;
        }
        self.regs = Registers::default();
        self.update_interrupt();
    }

    fn line_input(&self, line: u8) -> bool {
        self.inputs & (1 << line) != 0
    }

    /// What each line carries: the output latch for outputs, the external level for inputs.
    fn levels(&self) -> u8 {
        (self.regs.data_out & self.regs.dir) | (self.inputs & !self.regs.dir)
    }

    /// Applies a change to the lines or their configuration, latching the edges it makes on edge-sensitive lines.
    fn change(&mut self, apply: impl FnOnce(&mut Self)) {
        let before = self.levels();
        apply(self);
        let after = self.levels();
        let changed = before ^ after;
        let rising = changed & after;
        let falling = changed & before;
        let single_edge = (rising & self.regs.iev) | (falling & !self.regs.iev);
        let detected = (changed & self.regs.ibe) | (single_edge & !self.regs.ibe);
        self.regs.edges |= detected & !self.regs.is;
        self.update_interrupt();
    }

    fn raw_status(&self) -> u8 {
        let levels = self.levels();
        let level_active = (levels & self.regs.iev) | (!levels & !self.regs.iev);
        (self.regs.edges & !self.regs.is) | (level_active & self.regs.is)
    }

    fn masked_status(&self) -> u8 {
        self.raw_status() & self.regs.ie
    }

    fn update_interrupt(&mut self) {
        let level = self.interrupt_asserted();
        self.interrupt.set(level);
    }

    fn read_register(&mut self, register: u64) -> u32 {
        let value = match register {
            0..DATA_END => {
                let mask = (register >> 2) as u8;
                let value = self.levels() & mask;
                if self.release_power_key_when_seen && mask & (1 << POWER_KEY_LINE) != 0 {
                    self.set_input(POWER_KEY_LINE, false);
                }
                value
            }
            DIR => self.regs.dir,
            IS => self.regs.is,
            IBE => self.regs.ibe,
            IEV => self.regs.iev,
            IE => self.regs.ie,
            RIS => self.raw_status(),
            MIS => self.masked_status(),
            AFSEL => self.regs.afsel,
            _ => return id_register(&IDS, register).unwrap_or(0),
        };
        u32::from(value)
    }

    fn write_register(&mut self, register: u64, value: u32) {
        let value = value as u8;
        match register {
            0..DATA_END => {
                let mask = (register >> 2) as u8;
                self.change(|s| s.regs.data_out = (s.regs.data_out & !mask) | (value & mask));
            }
            DIR => self.change(|s| s.regs.dir = value),
            // Changing how a line is sensed does not itself latch an edge.
            IS => self.regs.is = value,
            IBE => self.regs.ibe = value,
            IEV => self.regs.iev = value,
            IE => self.regs.ie = value,
            IC => self.regs.edges &= !value,
            AFSEL => self.regs.afsel = value,
            _ => {} // read-only or reserved
        }
    }
}

/// The controller as data. The interrupt output is not kept: it is high while a masked status bit is set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pl061State {
    /// The output latch (GPIODATA as written).
    pub data_out: u8,
    /// GPIODIR, GPIOIS, GPIOIBE, GPIOIEV, GPIOIE, GPIOAFSEL.
    pub dir: u8,
    pub is: u8,
    pub ibe: u8,
    pub iev: u8,
    pub ie: u8,
    pub afsel: u8,
    /// Latched edge interrupts, not yet cleared through GPIOIC.
    pub edges: u8,
    /// External levels of the lines, as the VMM drives them.
    pub inputs: u8,
    /// The power key is down and goes up once the guest has read it.
    pub release_power_key_when_seen: bool,
}

impl Persist for Pl061 {
    type State = Pl061State;

    fn save(&self) -> Pl061State {
        let r = self.regs;
        Pl061State {
            data_out: r.data_out,
            dir: r.dir,
            is: r.is,
            ibe: r.ibe,
            iev: r.iev,
            ie: r.ie,
            afsel: r.afsel,
            edges: r.edges,
            inputs: self.inputs,
            release_power_key_when_seen: self.release_power_key_when_seen,
        }
    }

    /// The output takes its level without triggering the line (see [`LevelOutput::restore_level`]).
    fn restore(&mut self, state: &Pl061State) -> Result<(), StateError> {
        if state.release_power_key_when_seen && state.inputs & (1 << POWER_KEY_LINE) == 0 {
            let problem = format!("set, but the power key's line is low (inputs {:#04x})", state.inputs);
            return Err(StateError::new("PL061", "release_power_key_when_seen", problem));
        }
        self.regs = Registers {
            data_out: state.data_out,
            dir: state.dir,
            is: state.is,
            ibe: state.ibe,
            iev: state.iev,
            ie: state.ie,
            afsel: state.afsel,
            edges: state.edges,
        };
        self.inputs = state.inputs;
        self.release_power_key_when_seen = state.release_power_key_when_seen;
        let level = self.interrupt_asserted();
        self.interrupt.restore_level(level);
        Ok(())
    }
}

impl BusDevice for Pl061 {
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
    use crate::persist::testing::{assert_refused, fuzz_restore, through_json};
    use crate::test_utils::CountingLine;

    const KEY: u8 = 1 << POWER_KEY_LINE;
    /// GPIODATA with only the key's line in the address mask, as pl061_get_value reads it.
    const KEY_DATA: u64 = (KEY as u64) << 2;

    fn read8(gpio: &mut Pl061, offset: u64) -> u8 {
        let mut data = [0u8];
        gpio.read(offset, &mut data);
        data[0]
    }

    fn gpio() -> (Pl061, Arc<CountingLine>) {
        let line = Arc::new(CountingLine::default());
        (Pl061::new(line.clone()), line)
    }

    /// As Linux sets up gpio-keys' interrupt: line 3 an input, both edges, unmasked.
    fn gpio_keys_setup(gpio: &mut Pl061) {
        gpio.write(IS, &[0]);
        gpio.write(IBE, &[KEY]);
        gpio.write(IE, &[KEY]);
    }

    #[test]
    fn id_registers_identify_a_pl061() {
        let (mut gpio, _) = gpio();
        let ids: Vec<u8> = (0..8).map(|i| read8(&mut gpio, 0xfe0 + 4 * i)).collect();
        assert_eq!(ids, [0x61, 0x10, 0x04, 0x00, 0x0d, 0xf0, 0x05, 0xb1]);
    }

    #[test]
    fn data_accesses_are_masked_by_address_bits() {
        let (mut gpio, _) = gpio();
        gpio.write(DIR, &[0x0f]);
        gpio.write(0x3fc, &[0xff]);
        assert_eq!(read8(&mut gpio, 0x3fc), 0x0f, "only outputs follow the latch");
        gpio.write(0x3fc, &[0]);
        gpio.write(0x04 << 2, &[0xff]); // only line 2 in the mask
        assert_eq!(read8(&mut gpio, 0x3fc), 0x04);
        assert_eq!(read8(&mut gpio, 0x08 << 2), 0, "line 2 is masked out of this read");
        gpio.set_input(6, true);
        assert_eq!(read8(&mut gpio, 0x3fc), 0x44);
        assert_eq!(read8(&mut gpio, 0), 0, "an empty mask reads nothing");
    }

    #[test]
    fn power_button_press_and_release_are_two_edges_gpio_keys_sees() {
        let (mut gpio, line) = gpio();
        gpio_keys_setup(&mut gpio);
        gpio.press_power_button();
        assert!(gpio.interrupt_asserted());
        assert_eq!(line.count(), 1);
        assert_eq!(read8(&mut gpio, MIS), KEY);
        gpio.write(IC, &[KEY]); // the irqchip's ack
        assert!(!gpio.interrupt_asserted());

        assert_eq!(read8(&mut gpio, KEY_DATA), KEY, "gpio-keys reads the key down...");
        assert!(gpio.interrupt_asserted(), "...and the release edge follows");
        assert_eq!(line.count(), 2);
        gpio.write(IC, &[KEY]);
        assert_eq!(read8(&mut gpio, KEY_DATA), 0, "then reads it up");
        assert!(!gpio.interrupt_asserted());
        assert_eq!(line.count(), 2);
    }

    #[test]
    fn the_key_stays_down_until_read_and_reads_of_other_lines_do_not_release_it() {
        let (mut gpio, _) = gpio();
        gpio.press_power_button();
        assert_eq!(read8(&mut gpio, 0x01 << 2), 0);
        assert_eq!(read8(&mut gpio, DIR), 0);
        assert_eq!(read8(&mut gpio, KEY_DATA), KEY);
        assert_eq!(read8(&mut gpio, KEY_DATA), 0);
        assert_eq!(read8(&mut gpio, RIS), KEY, "the release is a falling edge, which power-on sensing latches");
        assert!(!gpio.interrupt_asserted(), "but interrupts are masked");
    }

    #[test]
    fn single_edge_and_level_sensing_follow_iev() {
        let (mut gpio, line) = gpio();
        gpio.write(IE, &[0xff]);
        gpio.write(IEV, &[0x01]); // line 0 rising, line 1 falling
        gpio.set_input(1, true);
        assert!(!gpio.interrupt_asserted(), "a rise on a falling-edge line");
        gpio.set_input(0, true);
        assert_eq!(read8(&mut gpio, RIS), 0x01);
        gpio.write(IC, &[0x01]);
        gpio.set_input(1, false);
        assert_eq!(read8(&mut gpio, RIS), 0x02);
        gpio.write(IC, &[0xff]);
        assert_eq!(read8(&mut gpio, RIS), 0);

        gpio.write(IS, &[0x04]);
        gpio.write(IEV, &[0x04]); // line 2 high-level
        assert!(!gpio.interrupt_asserted());
        gpio.set_input(2, true);
        assert_eq!(read8(&mut gpio, MIS), 0x04);
        gpio.write(IC, &[0x04]);
        assert_eq!(read8(&mut gpio, MIS), 0x04, "a level cannot be cleared while it lasts");
        gpio.set_input(2, false);
        assert!(!gpio.interrupt_asserted());
        assert!(line.count() >= 3);
    }

    #[test]
    fn outputs_driven_by_the_guest_also_make_edges() {
        let (mut gpio, _) = gpio();
        gpio.write(DIR, &[0x80]);
        gpio.write(IBE, &[0x80]);
        gpio.write(IE, &[0x80]);
        gpio.write(0x80 << 2, &[0x80]);
        assert!(gpio.interrupt_asserted());
    }

    #[test]
    fn reset_drops_a_pending_press_and_configuration() {
        let (mut gpio, _) = gpio();
        gpio_keys_setup(&mut gpio);
        gpio.set_input(5, true);
        gpio.press_power_button();
        gpio.reset();
        assert!(!gpio.interrupt_asserted());
        assert_eq!(read8(&mut gpio, IE), 0);
        assert_eq!(read8(&mut gpio, 0x3fc), 0x20, "other inputs keep their level");
        gpio_keys_setup(&mut gpio);
        gpio.press_power_button();
        assert!(gpio.interrupt_asserted(), "a new press after reset is a new edge");
    }

    #[test]
    fn hostile_offsets_and_sizes_are_harmless() {
        let (mut gpio, _) = gpio();
        for offset in [0x424, 0x800, 0xfdc, 0xfff, 0x1000, u64::MAX, 0x3ff] {
            for len in [0usize, 1, 2, 4, 8] {
                let mut data = vec![0xff; len];
                gpio.read(offset, &mut data);
                gpio.write(offset, &data);
            }
        }
        gpio.set_input(8, true);
        gpio.set_input(u8::MAX, true);
        assert_eq!(read8(&mut gpio, 0x3fc), 0);
        gpio.write(RIS, &[0xff]);
        gpio.write(MIS, &[0xff]);
        assert_eq!(read8(&mut gpio, RIS), 0, "status registers are read-only");
        let mut wide = [0xaau8; 8];
        gpio.read(DIR, &mut wide);
        assert_eq!(wide, [0; 8]);
    }

    /// A controller in use: gpio-keys set up with the power key pressed and its edge not yet acknowledged, two
    /// outputs driven, another input high, a latched edge on a line now level-sensed.
    fn used_gpio() -> (Pl061, Arc<CountingLine>) {
        let (mut gpio, line) = gpio();
        gpio_keys_setup(&mut gpio);
        gpio.write(DIR, &[0xc0]);
        gpio.write(0xc0 << 2, &[0x80]);
        gpio.write(AFSEL, &[0x02]);
        gpio.set_input(0, true);
        gpio.write(IS, &[0x01]);
        gpio.set_input(5, true);
        gpio.press_power_button();
        assert!(gpio.interrupt_asserted());
        (gpio, line)
    }

    /// Every register, as a guest reads them; reading the data register last, as it releases the power key.
    fn registers(gpio: &mut Pl061) -> Vec<u8> {
        let mut values: Vec<u8> = [DIR, IS, IBE, IEV, IE, RIS, MIS, AFSEL].iter().map(|&r| read8(gpio, r)).collect();
        values.push(read8(gpio, 0x3fc));
        values
    }

    #[test]
    fn state_round_trips_with_the_power_key_down() {
        let (mut gpio, line) = used_gpio();
        let state = through_json(&gpio.save());
        let (mut restored, restored_line) = self::gpio();
        restored.restore(&state).unwrap();
        assert_eq!(restored_line.count(), 0, "restoring triggers nothing");
        assert!(restored.interrupt_asserted(), "but the output is high, as resample will ask");
        assert_eq!(restored.save(), gpio.save());
        // The irqchip's ack, then gpio-keys reads the key: both release it, and the release edge raises both lines.
        for (dev, line) in [(&mut gpio, &line), (&mut restored, &restored_line)] {
            dev.write(IC, &[KEY]);
            assert!(!dev.interrupt_asserted());
            let before = line.count();
            assert_eq!(read8(dev, KEY_DATA), KEY);
            assert_eq!(line.count(), before + 1);
        }
        let expected = registers(&mut gpio);
        assert_eq!(registers(&mut restored), expected);
        assert_eq!(expected, [0xc0, 0x01, KEY, 0, KEY, KEY, KEY, 0x02, 0x80 | 0x20 | 0x01]);
        assert_eq!(restored.save(), gpio.save());
    }

    #[test]
    fn hostile_states_are_refused() {
        let (gpio, _) = used_gpio();
        let good = gpio.save();
        let (mut target, line) = self::gpio();
        let pressed_but_low = Pl061State { inputs: good.inputs & !KEY, ..good.clone() };
        assert_refused(&mut target, &pressed_but_low, "release_power_key_when_seen");
        assert_eq!(line.count(), 0);
        assert!(serde_json::from_str::<Pl061State>(r#"{"data_out":256}"#).is_err(), "serde checks widths");
    }

    #[test]
    fn mutated_states_never_panic() {
        let (gpio, _) = used_gpio();
        let exercise = |dev: &mut Pl061| {
            registers(dev);
            dev.write(IC, &[0xff]);
            dev.press_power_button();
            registers(dev);
            dev.reset();
        };
        let counts = fuzz_restore(|| self::gpio().0, &gpio.save(), exercise, 2000);
        assert!(counts.refused > 0 && counts.loaded > 0, "{counts:?}");
    }
}

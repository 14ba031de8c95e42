//! The ACPI fixed-hardware PM1 register block: PM1a event (status, enable) and PM1a control. Writing SLP_EN with
//! the S5 sleep type from the DSDT powers the machine off; the fixed-feature power button raises the SCI.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::{BusDevice, InterruptLine, Persist, PlatformEvents, PlatformRequest, StateError};

/// Layout of the block from its base: PM1a_STS (2 bytes), PM1a_EN (2 bytes), PM1a_CNT (2 bytes).
pub const STATUS_OFFSET: u64 = 0;
pub const ENABLE_OFFSET: u64 = 2;
pub const CONTROL_OFFSET: u64 = 4;
pub const BLOCK_LEN: u64 = 6;

/// PM1_CNT: SCI_EN says the platform is in ACPI mode (always, here: there is no SMI_CMD to switch modes).
const SCI_EN: u16 = 1 << 0;
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 0x7 << SLP_TYP_SHIFT;
const SLP_EN: u16 = 1 << 13;
/// PM1_STS / PM1_EN: the fixed-feature power button.
const PWRBTN: u16 = 1 << 8;

pub struct AcpiPmBlock {
    events: PlatformEvents,
    /// The SCI: level-triggered, so it is raised again after each guest acknowledgement (see `resample`) for as
    /// long as an enabled status bit is set.
    sci: Arc<dyn InterruptLine>,
    s5_sleep_type: u16,
    status: u16,
    enable: u16,
    control: u16,
}

impl AcpiPmBlock {
    /// `s5_sleep_type` is the SLP_TYP value the DSDT's `\_S5` package announces.
    pub fn new(events: PlatformEvents, s5_sleep_type: u16, sci: Arc<dyn InterruptLine>) -> Self {
        AcpiPmBlock { events, sci, s5_sleep_type, status: 0, enable: 0, control: SCI_EN }
    }

    /// A press of the power button: the guest's OSPM sees PWRBTN_STS and decides what to do (Linux: power off
    /// when userspace asks it to, as with a real button).
    pub fn press_power_button(&mut self) {
        self.status |= PWRBTN;
        self.raise_sci_if_pending();
    }

    /// The guest acknowledged the SCI (end of interrupt): raise it again if an enabled event is still pending.
    pub fn resample(&mut self) {
        self.raise_sci_if_pending();
    }

    fn raise_sci_if_pending(&self) {
        if self.status & self.enable != 0 {
            // A failed trigger means the interrupt plumbing is gone (VM being torn down); nothing to deliver to.
            let _ = self.sci.trigger();
        }
    }

    fn register(&mut self, offset: u64) -> Option<(&mut u16, u64)> {
        match offset {
            STATUS_OFFSET..ENABLE_OFFSET => Some((&mut self.status, offset - STATUS_OFFSET)),
            ENABLE_OFFSET..CONTROL_OFFSET => Some((&mut self.enable, offset - ENABLE_OFFSET)),
            CONTROL_OFFSET..BLOCK_LEN => Some((&mut self.control, offset - CONTROL_OFFSET)),
            _ => None,
        }
    }

    fn write_byte(&mut self, offset: u64, byte: u8) {
        let Some((_, byte_index)) = self.register(offset) else { return };
        let shift = byte_index * 8;
        let bits = u16::from(byte) << shift;
        let lane = 0xffu16 << shift;
        match offset {
            // Status bits are cleared by writing ones.
            STATUS_OFFSET..ENABLE_OFFSET => self.status &= !bits,
            ENABLE_OFFSET..CONTROL_OFFSET => {
                self.enable = (self.enable & !lane) | bits;
                self.raise_sci_if_pending();
            }
            _ => {
                let control = (self.control & !lane) | bits;
                if control & SLP_EN != 0 {
                    let sleep_type = (control & SLP_TYP_MASK) >> SLP_TYP_SHIFT;
                    if sleep_type == self.s5_sleep_type {
                        self.events.request(PlatformRequest::Poweroff);
                    }
                }
                // SLP_EN always reads back as zero.
                self.control = (control & !SLP_EN) | SCI_EN;
            }
        }
    }
}

/// The PM1a registers as data. The SCI's level is not kept: it is `status & enable != 0`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcpiPmState {
    pub status: u16,
    pub enable: u16,
    pub control: u16,
}

const DEVICE: &str = "ACPI PM";
/// The status bits this block can set.
const STATUS_EVENTS: u16 = PWRBTN;

impl Persist for AcpiPmBlock {
    type State = AcpiPmState;

    fn save(&self) -> AcpiPmState {
        AcpiPmState { status: self.status, enable: self.enable, control: self.control }
    }

    /// A pending, enabled event does not raise the SCI here: the interrupt controller's state has it, and the
    /// next [`resample`](Self::resample) raises it again while it lasts.
    fn restore(&mut self, state: &AcpiPmState) -> Result<(), StateError> {
        if state.status & !STATUS_EVENTS != 0 {
            let problem = format!("{:#06x} has bits no event sets (only {STATUS_EVENTS:#06x})", state.status);
            return Err(StateError::new(DEVICE, "status", problem));
        }
        if state.control & SCI_EN == 0 || state.control & SLP_EN != 0 {
            let problem = format!("{:#06x}: SCI_EN always reads 1 and SLP_EN always 0", state.control);
            return Err(StateError::new(DEVICE, "control", problem));
        }
        self.status = state.status;
        self.enable = state.enable;
        self.control = state.control;
        Ok(())
    }
}

impl BusDevice for AcpiPmBlock {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, out) in data.iter_mut().enumerate() {
            let byte_offset = offset.saturating_add(i as u64);
            *out = match self.register(byte_offset) {
                Some((value, byte_index)) => (*value >> (byte_index * 8)) as u8,
                None => 0xff,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // SLP_TYP and SLP_EN share the high byte of PM1_CNT, so byte-wise handling sees them together.
        for (i, &byte) in data.iter().enumerate() {
            self.write_byte(offset.saturating_add(i as u64), byte);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::Receiver;

    use super::*;
    use crate::persist::testing::{assert_refused, fuzz_restore, through_json};
    use crate::test_utils::{recorded_events, CountingLine};

    fn block_with_sci() -> (AcpiPmBlock, Receiver<PlatformRequest>, Arc<CountingLine>) {
        let (events, rx) = recorded_events();
        let sci = Arc::new(CountingLine::default());
        (AcpiPmBlock::new(events, 0, sci.clone()), rx, sci)
    }

    fn block() -> (AcpiPmBlock, Receiver<PlatformRequest>) {
        let (pm, rx, _) = block_with_sci();
        (pm, rx)
    }

    #[test]
    fn power_button_raises_the_sci_until_the_guest_clears_it() {
        let (mut pm, rx, sci) = block_with_sci();
        pm.press_power_button();
        assert_eq!(sci.count(), 0, "no SCI until the OSPM enables the power button event");
        pm.write(ENABLE_OFFSET, &PWRBTN.to_le_bytes());
        assert_eq!(sci.count(), 1, "enabling a pending event raises the SCI");
        assert_eq!(read16(&mut pm, STATUS_OFFSET) & PWRBTN, PWRBTN);
        pm.resample();
        assert_eq!(sci.count(), 2, "still pending after the EOI: raised again");
        pm.write(STATUS_OFFSET, &PWRBTN.to_le_bytes());
        pm.resample();
        assert_eq!(sci.count(), 2, "cleared: quiet");
        pm.press_power_button();
        assert_eq!(sci.count(), 3);
        assert!(rx.try_recv().is_err(), "a button press is the guest's to act on, not a power-off by itself");
    }

    fn read16(pm: &mut AcpiPmBlock, offset: u64) -> u16 {
        let mut b = [0u8; 2];
        pm.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    #[test]
    fn s5_powers_off() {
        let (mut pm, rx) = block();
        pm.write(CONTROL_OFFSET, &(SLP_EN).to_le_bytes());
        assert_eq!(rx.try_recv(), Ok(PlatformRequest::Poweroff));
        assert_eq!(read16(&mut pm, CONTROL_OFFSET) & SLP_EN, 0, "SLP_EN reads as zero");
    }

    #[test]
    fn other_sleep_states_do_not_power_off() {
        let (mut pm, rx) = block();
        pm.write(CONTROL_OFFSET, &(SLP_EN | (3 << SLP_TYP_SHIFT)).to_le_bytes());
        pm.write(CONTROL_OFFSET, &(5u16 << SLP_TYP_SHIFT).to_le_bytes());
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn registers_read_back_and_status_clears_on_write() {
        let (mut pm, _rx) = block();
        assert_eq!(read16(&mut pm, CONTROL_OFFSET) & SCI_EN, SCI_EN, "the platform is in ACPI mode");
        pm.write(ENABLE_OFFSET, &0x0120u16.to_le_bytes());
        assert_eq!(read16(&mut pm, ENABLE_OFFSET), 0x0120);
        pm.status = 0x0101;
        pm.write(STATUS_OFFSET, &[0x01]);
        assert_eq!(read16(&mut pm, STATUS_OFFSET), 0x0100);
        let mut outside = [0u8; 4];
        pm.read(BLOCK_LEN - 2, &mut outside);
        assert_eq!(outside[2..], [0xff, 0xff]);
        pm.write(u64::MAX, &[0xff, 0xff]);
    }

    /// A block with the power button pressed and its event enabled (SCI raised once), and a sleep type written.
    fn used_block() -> (AcpiPmBlock, Receiver<PlatformRequest>, Arc<CountingLine>) {
        let (mut pm, rx, sci) = block_with_sci();
        pm.write(CONTROL_OFFSET, &(SCI_EN | 3 << SLP_TYP_SHIFT).to_le_bytes());
        pm.press_power_button();
        pm.write(ENABLE_OFFSET, &(PWRBTN | 0x20).to_le_bytes());
        assert_eq!(sci.count(), 1);
        (pm, rx, sci)
    }

    fn registers(pm: &mut AcpiPmBlock) -> [u16; 3] {
        [STATUS_OFFSET, ENABLE_OFFSET, CONTROL_OFFSET].map(|offset| read16(pm, offset))
    }

    #[test]
    fn state_round_trips_with_a_pending_event() {
        let (mut pm, rx, sci) = used_block();
        let state = through_json(&pm.save());
        let (mut restored, restored_rx, restored_sci) = block_with_sci();
        restored.restore(&state).unwrap();
        assert_eq!(restored_sci.count(), 0, "restoring raises nothing: the irqchip's state has the SCI");
        assert_eq!(registers(&mut restored), registers(&mut pm));
        assert_eq!(registers(&mut restored), [PWRBTN, PWRBTN | 0x20, SCI_EN | 3 << SLP_TYP_SHIFT]);
        // The guest's EOI: still pending, so both raise the SCI again; once cleared, neither does.
        for (dev, line) in [(&mut pm, &sci), (&mut restored, &restored_sci)] {
            let before = line.count();
            dev.resample();
            assert_eq!(line.count(), before + 1);
            dev.write(STATUS_OFFSET, &PWRBTN.to_le_bytes());
            dev.resample();
            assert_eq!(line.count(), before + 1);
            dev.write(CONTROL_OFFSET, &(SLP_EN).to_le_bytes());
        }
        assert_eq!(
            (rx.try_recv(), restored_rx.try_recv()),
            (Ok(PlatformRequest::Poweroff), Ok(PlatformRequest::Poweroff))
        );
        assert_eq!(registers(&mut restored), registers(&mut pm));
    }

    #[test]
    fn hostile_states_are_refused() {
        let (pm, _, _) = used_block();
        let good = pm.save();
        let (mut target, rx, sci) = block_with_sci();
        for status in [1, 0x8000, 0xffff] {
            assert_refused(&mut target, &AcpiPmState { status, ..good.clone() }, "status");
        }
        for control in [0, SCI_EN | SLP_EN, 0xffff] {
            assert_refused(&mut target, &AcpiPmState { control, ..good.clone() }, "control");
        }
        assert!(rx.try_recv().is_err() && sci.count() == 0);
    }

    #[test]
    fn mutated_states_never_panic() {
        let (pm, _, _) = used_block();
        let exercise = |dev: &mut AcpiPmBlock| {
            registers(dev);
            dev.resample();
            dev.write(ENABLE_OFFSET, &[0xff, 0xff]);
            dev.write(STATUS_OFFSET, &[0xff, 0xff]);
            dev.write(CONTROL_OFFSET, &[0, 0]);
        };
        let counts = fuzz_restore(|| block().0, &pm.save(), exercise, 2000);
        assert!(counts.refused > 0 && counts.loaded > 0, "{counts:?}");
    }
}

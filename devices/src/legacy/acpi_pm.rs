//! The ACPI fixed-hardware PM1 register block: PM1a event (status, enable) and PM1a control. Writing SLP_EN with
//! the S5 sleep type from the DSDT powers the machine off.

use crate::{BusDevice, PlatformEvents, PlatformRequest};

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

pub struct AcpiPmBlock {
    events: PlatformEvents,
    s5_sleep_type: u16,
    status: u16,
    enable: u16,
    control: u16,
}

impl AcpiPmBlock {
    /// `s5_sleep_type` is the SLP_TYP value the DSDT's `\_S5` package announces.
    pub fn new(events: PlatformEvents, s5_sleep_type: u16) -> Self {
        AcpiPmBlock { events, s5_sleep_type, status: 0, enable: 0, control: SCI_EN }
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
            ENABLE_OFFSET..CONTROL_OFFSET => self.enable = (self.enable & !lane) | bits,
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
    use crate::test_utils::recorded_events;

    fn block() -> (AcpiPmBlock, Receiver<PlatformRequest>) {
        let (events, rx) = recorded_events();
        (AcpiPmBlock::new(events, 0), rx)
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
}

//! The PC reset control register (port 0xCF9), also the FADT's ACPI reset register.

use crate::bus::reply_byte;
use crate::{BusDevice, PlatformEvents, PlatformRequest};

/// Bit 2 starts the reset; bit 1 selects a hard reset. Either kind resets the whole VM.
const RESET_CPU: u8 = 0x04;

pub struct ResetPort {
    events: PlatformEvents,
    value: u8,
}

impl ResetPort {
    pub fn new(events: PlatformEvents) -> Self {
        ResetPort { events, value: 0 }
    }
}

impl BusDevice for ResetPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        reply_byte(data, self.value);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        if value & RESET_CPU != 0 {
            self.value = 0;
            self.events.request(PlatformRequest::Reset);
        } else {
            self.value = value;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::recorded_events;

    #[test]
    fn only_the_reset_bit_resets() {
        let (events, rx) = recorded_events();
        let mut port = ResetPort::new(events);
        port.write(0, &[0x02]);
        assert!(rx.try_recv().is_err());
        port.write(0, &[0x06]);
        assert_eq!(rx.try_recv(), Ok(PlatformRequest::Reset));
    }
}

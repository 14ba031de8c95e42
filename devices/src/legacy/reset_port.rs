//! The PC reset control register (port 0xCF9), also the FADT's ACPI reset register.

use serde::{Deserialize, Serialize};

use crate::bus::reply_byte;
use crate::{BusDevice, Persist, PlatformEvents, PlatformRequest, StateError};

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

/// The register as data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResetPortState {
    /// What the guest last wrote without the reset bit (a write with it resets and reads back 0).
    pub value: u8,
}

impl Persist for ResetPort {
    type State = ResetPortState;

    fn save(&self) -> ResetPortState {
        ResetPortState { value: self.value }
    }

    fn restore(&mut self, state: &ResetPortState) -> Result<(), StateError> {
        if state.value & RESET_CPU != 0 {
            let problem = format!("{:#04x} has the reset bit set, which never stays set", state.value);
            return Err(StateError::new("reset port", "value", problem));
        }
        self.value = state.value;
        Ok(())
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
    use crate::persist::testing::{assert_refused, fuzz_restore, through_json};
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

    fn read(port: &mut ResetPort) -> u8 {
        let mut b = [0];
        port.read(0, &mut b);
        b[0]
    }

    #[test]
    fn state_round_trips_and_hostile_states_are_refused() {
        let (events, rx) = recorded_events();
        let mut port = ResetPort::new(events);
        port.write(0, &[0x0a]);
        let state = through_json(&port.save());
        let (events, restored_rx) = recorded_events();
        let mut restored = ResetPort::new(events);
        restored.restore(&state).unwrap();
        assert_eq!((read(&mut restored), read(&mut port)), (0x0a, 0x0a));
        for dev in [&mut port, &mut restored] {
            dev.write(0, &[0x0e]);
            assert_eq!(read(dev), 0, "the reset bit does not stay");
        }
        assert_eq!((rx.try_recv(), restored_rx.try_recv()), (Ok(PlatformRequest::Reset), Ok(PlatformRequest::Reset)));
        assert_refused(&mut restored, &ResetPortState { value: RESET_CPU | 2 }, "value");
        let counts = fuzz_restore(
            || ResetPort::new(recorded_events().0),
            &state,
            |d| {
                read(d);
            },
            200,
        );
        assert!(counts.refused > 0 && counts.loaded > 0, "{counts:?}");
    }
}

//! The i8042 keyboard controller, reduced to what guests use on a VM without a keyboard: its reset line
//! (command 0xFE), the controller configuration byte and the self-tests Linux runs while probing.

use serde::{Deserialize, Serialize};

use crate::bus::reply_byte;
use crate::{BusDevice, Persist, PlatformEvents, PlatformRequest, StateError};

/// Offsets within the two-port range this device is inserted at: data port 0x60, command/status port 0x64.
pub const DATA_OFFSET: u64 = 0;
pub const COMMAND_OFFSET: u64 = 4;

const STATUS_OUTPUT_FULL: u8 = 0x01;
/// "System flag": set after a successful self-test, as firmware leaves it.
const STATUS_SYSTEM: u8 = 0x04;
/// Last write was a command (0x64), not data.
const STATUS_COMMAND: u8 = 0x08;
/// Keyboard not inhibited by the (absent) key lock; clear, Linux warns "Keylock active".
const STATUS_UNLOCKED: u8 = 0x10;

/// Controller configuration byte: the keyboard and AUX (mouse) interfaces' disable bits.
const CONFIG_KEYBOARD_DISABLED: u8 = 0x10;
const CONFIG_AUX_DISABLED: u8 = 0x20;

const CMD_READ_CONFIG: u8 = 0x20;
const CMD_WRITE_CONFIG: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_TEST_AUX: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_KEYBOARD: u8 = 0xab;
const CMD_DISABLE_KEYBOARD: u8 = 0xad;
const CMD_ENABLE_KEYBOARD: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_PULSE_RESET: u8 = 0xfe;

const SELF_TEST_PASSED: u8 = 0x55;
const INTERFACE_TEST_PASSED: u8 = 0x00;
/// Interface test result "clock line stuck low": what a controller without a mouse port answers, so guests
/// skip probing for one.
const INTERFACE_ABSENT: u8 = 0x01;
/// Output port bit 0 low holds the CPU in reset.
const OUTPUT_PORT_RESET_LINE: u8 = 0x01;

pub struct I8042 {
    events: PlatformEvents,
    status: u8,
    config: u8,
    output: Option<u8>,
    /// The command waiting for its data byte on port 0x60.
    pending_command: Option<u8>,
}

impl I8042 {
    pub fn new(events: PlatformEvents) -> Self {
        I8042 {
            events,
            status: STATUS_SYSTEM | STATUS_UNLOCKED,
            config: CONFIG_AUX_DISABLED,
            output: None,
            pending_command: None,
        }
    }

    fn respond(&mut self, value: u8) {
        self.output = Some(value);
    }

    fn command(&mut self, command: u8) {
        self.status |= STATUS_COMMAND;
        match command {
            CMD_READ_CONFIG => self.respond(self.config),
            CMD_WRITE_CONFIG | CMD_WRITE_OUTPUT_PORT => self.pending_command = Some(command),
            CMD_SELF_TEST => self.respond(SELF_TEST_PASSED),
            CMD_TEST_KEYBOARD => self.respond(INTERFACE_TEST_PASSED),
            CMD_TEST_AUX => self.respond(INTERFACE_ABSENT),
            CMD_READ_OUTPUT_PORT => self.respond(OUTPUT_PORT_RESET_LINE),
            CMD_PULSE_RESET => self.events.request(PlatformRequest::Reset),
            CMD_DISABLE_AUX => self.config |= CONFIG_AUX_DISABLED,
            CMD_ENABLE_AUX => self.config &= !CONFIG_AUX_DISABLED,
            CMD_DISABLE_KEYBOARD => self.config |= CONFIG_KEYBOARD_DISABLED,
            CMD_ENABLE_KEYBOARD => self.config &= !CONFIG_KEYBOARD_DISABLED,
            _ => {}
        }
    }

    fn data(&mut self, value: u8) {
        self.status &= !STATUS_COMMAND;
        match self.pending_command.take() {
            Some(CMD_WRITE_CONFIG) => self.config = value,
            Some(CMD_WRITE_OUTPUT_PORT) if value & OUTPUT_PORT_RESET_LINE == 0 => {
                self.events.request(PlatformRequest::Reset)
            }
            // No keyboard is attached: bytes meant for it go nowhere.
            _ => {}
        }
    }
}

/// The controller as data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct I8042State {
    /// The status register without its output-full bit, which follows from `output`.
    pub status: u8,
    /// The controller configuration byte.
    pub config: u8,
    /// The byte waiting to be read from port 0x60.
    pub output: Option<u8>,
    /// The command (0x60 or 0xd1) waiting for its data byte.
    pub pending_command: Option<u8>,
}

const DEVICE: &str = "i8042";
/// Status bits that are always set: self-test passed, no key lock.
const STATUS_ALWAYS: u8 = STATUS_SYSTEM | STATUS_UNLOCKED;

impl Persist for I8042 {
    type State = I8042State;

    fn save(&self) -> I8042State {
        I8042State {
            status: self.status,
            config: self.config,
            output: self.output,
            pending_command: self.pending_command,
        }
    }

    fn restore(&mut self, state: &I8042State) -> Result<(), StateError> {
        if state.status & !STATUS_COMMAND != STATUS_ALWAYS {
            let problem = format!(
                "{:#04x}: only the command bit ({STATUS_COMMAND:#04x}) varies; {STATUS_ALWAYS:#04x} is always set",
                state.status
            );
            return Err(StateError::new(DEVICE, "status", problem));
        }
        if let Some(command) = state.pending_command.filter(|&c| c != CMD_WRITE_CONFIG && c != CMD_WRITE_OUTPUT_PORT) {
            let problem = format!("command {command:#04x} takes no data byte");
            return Err(StateError::new(DEVICE, "pending_command", problem));
        }
        self.status = state.status;
        self.config = state.config;
        self.output = state.output;
        self.pending_command = state.pending_command;
        Ok(())
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            DATA_OFFSET => {
                let value = self.output.take().unwrap_or(0);
                self.status &= !STATUS_OUTPUT_FULL;
                value
            }
            COMMAND_OFFSET => self.status | if self.output.is_some() { STATUS_OUTPUT_FULL } else { 0 },
            _ => 0xff,
        };
        reply_byte(data, value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            DATA_OFFSET => self.data(value),
            COMMAND_OFFSET => self.command(value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::Receiver;

    use super::*;
    use crate::persist::testing::{assert_refused, fuzz_restore, through_json};
    use crate::test_utils::recorded_events;

    fn device() -> (I8042, Receiver<PlatformRequest>) {
        let (events, rx) = recorded_events();
        (I8042::new(events), rx)
    }

    fn read(dev: &mut I8042, offset: u64) -> u8 {
        let mut b = [0];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn pulse_reset_command_resets_the_platform() {
        let (mut dev, rx) = device();
        dev.write(COMMAND_OFFSET, &[CMD_PULSE_RESET]);
        assert_eq!(rx.try_recv(), Ok(PlatformRequest::Reset));
    }

    #[test]
    fn output_port_reset_line_resets_the_platform() {
        let (mut dev, rx) = device();
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_OUTPUT_PORT]);
        dev.write(DATA_OFFSET, &[0xfe]);
        assert_eq!(rx.try_recv(), Ok(PlatformRequest::Reset));
    }

    #[test]
    fn self_test_and_config_byte_answer_like_a_controller() {
        let (mut dev, rx) = device();
        dev.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        assert_ne!(read(&mut dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 0);
        assert_eq!(read(&mut dev, DATA_OFFSET), SELF_TEST_PASSED);
        assert_eq!(read(&mut dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 0);
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CONFIG]);
        dev.write(DATA_OFFSET, &[0x45]);
        dev.write(COMMAND_OFFSET, &[CMD_READ_CONFIG]);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0x45);
        assert!(rx.try_recv().is_err(), "none of this resets");
    }

    #[test]
    fn interface_enables_show_in_the_config_byte_and_there_is_no_mouse() {
        let (mut dev, _rx) = device();
        assert_ne!(read(&mut dev, COMMAND_OFFSET) & STATUS_UNLOCKED, 0, "no key lock");
        for (command, expected) in [
            (CMD_ENABLE_AUX, 0),
            (CMD_DISABLE_AUX, CONFIG_AUX_DISABLED),
            (CMD_DISABLE_KEYBOARD, CONFIG_AUX_DISABLED | CONFIG_KEYBOARD_DISABLED),
            (CMD_ENABLE_KEYBOARD, CONFIG_AUX_DISABLED),
        ] {
            dev.write(COMMAND_OFFSET, &[command]);
            dev.write(COMMAND_OFFSET, &[CMD_READ_CONFIG]);
            assert_eq!(read(&mut dev, DATA_OFFSET), expected, "after command {command:#x}");
        }
        dev.write(COMMAND_OFFSET, &[CMD_TEST_AUX]);
        assert_eq!(read(&mut dev, DATA_OFFSET), INTERFACE_ABSENT);
    }

    /// A controller mid-conversation: a new configuration byte, the keyboard disabled, a self-test result not yet
    /// read, and a write-output-port command waiting for its data byte.
    fn used_controller() -> (I8042, Receiver<PlatformRequest>) {
        let (mut dev, rx) = device();
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CONFIG]);
        dev.write(DATA_OFFSET, &[0x47]);
        dev.write(COMMAND_OFFSET, &[CMD_DISABLE_KEYBOARD]);
        dev.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_OUTPUT_PORT]);
        (dev, rx)
    }

    #[test]
    fn state_round_trips_mid_command() {
        let (mut dev, rx) = used_controller();
        let state = through_json(&dev.save());
        let (mut restored, restored_rx) = device();
        restored.restore(&state).unwrap();
        assert!(restored_rx.try_recv().is_err(), "restoring requests nothing");
        for d in [&mut dev, &mut restored] {
            assert_eq!(read(d, COMMAND_OFFSET), STATUS_ALWAYS | STATUS_COMMAND | STATUS_OUTPUT_FULL);
            assert_eq!(read(d, DATA_OFFSET), SELF_TEST_PASSED);
            assert_eq!(read(d, COMMAND_OFFSET), STATUS_ALWAYS | STATUS_COMMAND);
            // The pending write-output-port command takes this byte: the reset line goes low.
            d.write(DATA_OFFSET, &[0xfe]);
            d.write(COMMAND_OFFSET, &[CMD_READ_CONFIG]);
            assert_eq!(read(d, DATA_OFFSET), 0x47 | CONFIG_KEYBOARD_DISABLED);
        }
        assert_eq!((rx.try_recv(), restored_rx.try_recv()), (Ok(PlatformRequest::Reset), Ok(PlatformRequest::Reset)));
        assert_eq!(restored.save(), dev.save());
    }

    #[test]
    fn hostile_states_are_refused() {
        let (dev, _) = used_controller();
        let good = dev.save();
        let (mut target, rx) = device();
        for status in [0, 0xff, STATUS_ALWAYS | STATUS_OUTPUT_FULL, STATUS_SYSTEM] {
            assert_refused(&mut target, &I8042State { status, ..good.clone() }, "status");
        }
        for command in [0, CMD_PULSE_RESET, CMD_READ_CONFIG] {
            let state = I8042State { pending_command: Some(command), ..good.clone() };
            assert_refused(&mut target, &state, "pending_command");
        }
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn mutated_states_never_panic() {
        let (dev, _) = used_controller();
        let exercise = |d: &mut I8042| {
            for _ in 0..2 {
                read(d, COMMAND_OFFSET);
                read(d, DATA_OFFSET);
            }
            d.write(DATA_OFFSET, &[0xff]);
            d.write(COMMAND_OFFSET, &[CMD_READ_CONFIG]);
            read(d, DATA_OFFSET);
        };
        let counts = fuzz_restore(|| device().0, &dev.save(), exercise, 2000);
        assert!(counts.refused > 0 && counts.loaded > 0, "{counts:?}");
    }
}

//! Kestrel's device model. Devices sit on address buses and answer guest accesses; they raise interrupts through
//! `InterruptLine`s and ask the platform for resets and power-offs through `PlatformEvents`. Nothing here calls
//! the hypervisor: the VMM wires lines to irqfds and buses to vCPU exits.

pub mod bus;
mod input_room;
pub mod interrupt;
pub mod legacy;
pub mod pci;
pub mod persist;
pub mod virtio;

pub use bus::{Bus, BusDevice};
pub use input_room::InputRoom;
pub use interrupt::{EventFdLine, InterruptLine, LevelOutput};
pub use persist::{Persist, StateError};

use std::fmt;
use std::sync::Arc;

/// Something a device asks of the whole platform.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlatformRequest {
    /// Reset the machine (keyboard-controller pulse, reset register, ...).
    Reset,
    /// Power the machine off (ACPI S5, ...).
    Poweroff,
}

/// Where devices send `PlatformRequest`s; the VMM decides what they mean for the run state.
#[derive(Clone)]
pub struct PlatformEvents {
    handler: Arc<dyn Fn(PlatformRequest) + Send + Sync>,
}

impl PlatformEvents {
    pub fn new(handler: impl Fn(PlatformRequest) + Send + Sync + 'static) -> Self {
        PlatformEvents { handler: Arc::new(handler) }
    }

    pub fn request(&self, request: PlatformRequest) {
        (self.handler)(request)
    }
}

impl fmt::Debug for PlatformEvents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PlatformEvents")
    }
}

#[cfg(test)]
pub(crate) mod test_utils {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc::{channel, Receiver};

    use super::*;

    /// An interrupt line that counts how often it was raised.
    #[derive(Default)]
    pub struct CountingLine(AtomicUsize);

    impl CountingLine {
        pub fn count(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    impl InterruptLine for CountingLine {
        fn trigger(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    /// An output sink the test keeps a handle on, for what a device wrote.
    #[derive(Clone, Default)]
    pub struct SharedBuffer(pub Arc<std::sync::Mutex<Vec<u8>>>);

    impl SharedBuffer {
        /// What was written since the last take.
        pub fn take(&self) -> Vec<u8> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    impl std::io::Write for SharedBuffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Platform events that land in a channel the test can inspect.
    pub fn recorded_events() -> (PlatformEvents, Receiver<PlatformRequest>) {
        let (tx, rx) = channel();
        let tx = std::sync::Mutex::new(tx);
        (PlatformEvents::new(move |r| tx.lock().unwrap().send(r).unwrap()), rx)
    }
}

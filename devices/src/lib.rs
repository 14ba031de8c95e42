//! Kestrel's device model. Devices sit on address buses and answer guest accesses; they raise interrupts through
//! `InterruptLine`s and ask the platform for resets and power-offs through `PlatformEvents`. Nothing here calls
//! the hypervisor: the VMM wires lines to irqfds and buses to vCPU exits.

pub mod bus;
pub mod interrupt;
pub mod legacy;

pub use bus::{Bus, BusDevice};
pub use interrupt::{EventFdLine, InterruptLine};

use std::sync::mpsc::Sender;

/// Something a device asks of the whole platform.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlatformRequest {
    /// Reset the machine (keyboard-controller pulse, reset register, ...).
    Reset,
    /// Power the machine off (ACPI S5, ...).
    Poweroff,
}

/// Where devices send `PlatformRequest`s; the VMM's main loop receives them.
#[derive(Clone, Debug)]
pub struct PlatformEvents {
    sender: Sender<PlatformRequest>,
}

impl PlatformEvents {
    pub fn new(sender: Sender<PlatformRequest>) -> Self {
        PlatformEvents { sender }
    }

    pub fn request(&self, request: PlatformRequest) {
        // The receiver only goes away while the VMM is exiting, when the request no longer matters.
        let _ = self.sender.send(request);
    }
}

//! Interrupt lines as devices see them.

use std::io;

use vmm_sys_util::eventfd::EventFd;

/// An edge-triggered interrupt line into the guest's interrupt controller.
pub trait InterruptLine: Send + Sync {
    fn trigger(&self) -> io::Result<()>;
}

/// A line backed by an eventfd that the hypervisor turns into an interrupt (KVM's irqfd).
pub struct EventFdLine(EventFd);

impl EventFdLine {
    pub fn new() -> io::Result<Self> {
        Ok(EventFdLine(EventFd::new(libc::EFD_NONBLOCK)?))
    }

    /// The eventfd to register with the hypervisor.
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
}

impl InterruptLine for EventFdLine {
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_signals_the_eventfd() {
        let line = EventFdLine::new().unwrap();
        line.trigger().unwrap();
        line.trigger().unwrap();
        assert_eq!(line.eventfd().read().unwrap(), 2);
    }
}

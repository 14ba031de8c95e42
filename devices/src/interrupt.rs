//! Interrupt lines as devices see them.

use std::io;
use std::sync::Arc;

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

/// A device's level-sensitive interrupt output, carried over an edge `InterruptLine`: the line is triggered each
/// time the output rises. That is all an edge-triggered interrupt needs. For a level-triggered one (an ARM SPI
/// behind an irqfd with a resample eventfd), the owner of the resample notification, which KVM sends after the
/// guest's EOI, asks [`asserted`](Self::asserted) and triggers the line again while it is still true.
pub struct LevelOutput {
    line: Arc<dyn InterruptLine>,
    asserted: bool,
}

impl LevelOutput {
    pub fn new(line: Arc<dyn InterruptLine>) -> Self {
        LevelOutput { line, asserted: false }
    }

    /// Sets the output level; a rising edge triggers the line. A failed trigger (an eventfd that cannot be
    /// written) cannot be helped from inside a device; the resample path retries a level that stayed high.
    pub fn set(&mut self, level: bool) {
        if level && !self.asserted {
            let _ = self.line.trigger();
        }
        self.asserted = level;
    }

    pub fn asserted(&self) -> bool {
        self.asserted
    }

    /// Takes the level a restored device has, without triggering: an interrupt the line delivered before the
    /// snapshot is in the interrupt controller's saved state, and one still asserted is re-raised on resample.
    pub fn restore_level(&mut self, level: bool) {
        self.asserted = level;
    }

    pub fn line(&self) -> &Arc<dyn InterruptLine> {
        &self.line
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::CountingLine;

    #[test]
    fn level_output_triggers_on_rising_edges_only() {
        let line = Arc::new(CountingLine::default());
        let mut output = LevelOutput::new(line.clone());
        output.set(false);
        assert_eq!(line.count(), 0);
        output.set(true);
        output.set(true);
        assert_eq!(line.count(), 1);
        assert!(output.asserted());
        output.set(false);
        assert!(!output.asserted());
        output.set(true);
        assert_eq!(line.count(), 2);
        output.restore_level(false);
        output.restore_level(true);
        assert_eq!(line.count(), 2, "a restored level is not an edge");
        output.set(true);
        assert_eq!(line.count(), 2, "and the line stays high after it");
    }

    #[test]
    fn trigger_signals_the_eventfd() {
        let line = EventFdLine::new().unwrap();
        line.trigger().unwrap();
        line.trigger().unwrap();
        assert_eq!(line.eventfd().read().unwrap(), 2);
    }
}

//! When host input may enter a UART's receive FIFO.
//!
//! The UART holds only what its FIFO holds (one byte with FIFOs off, as after power-on); the rest of the host's
//! input waits on the host side, unread, so a guest that never reads costs nothing. Input enters in bursts: into
//! an empty FIFO, once the guest has looked at it empty (read a status register that showed no data). Drivers
//! clear and drain their receive side when they start (Linux's 8250 and amba-pl011 do: read until the status says
//! empty, discarding what they read); such a drain loses what the FIFO held when it began, never the input typed
//! ahead behind it, which arrives once the drain has seen the FIFO empty and stopped. Refilling the FIFO while the
//! guest is still reading would feed the drain loop until the host ran out. A guest that never looks at a status
//! register (an interrupt handler that reads only the data register) gets its next burst once the FIFO has sat
//! empty for [`UNSEEN_EMPTY_GRACE`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::InputRoom;

/// How long an empty FIFO the guest has not looked at waits before host input enters anyway. Drain loops look
/// within microseconds; this only paces guests that never look.
pub const UNSEEN_EMPTY_GRACE: Duration = Duration::from_millis(20);

pub struct ReceiveGate {
    /// The guest has read a status that showed the FIFO empty since it last became empty.
    seen_empty: bool,
    /// When the FIFO last became empty: the guest read its last byte, cleared it, or reset the device.
    empty_since: Instant,
    room: Arc<InputRoom>,
}

impl ReceiveGate {
    pub fn new(room: Arc<InputRoom>) -> Self {
        ReceiveGate { seen_empty: false, empty_since: Instant::now(), room }
    }

    /// The FIFO has just become empty, and the guest has not seen it yet.
    pub fn emptied(&mut self, now: Instant) {
        self.seen_empty = false;
        self.empty_since = now;
    }

    /// The guest read a status showing the FIFO empty: its receive loop, if any, is over, so input may enter, and
    /// the input thread is woken to bring it.
    pub fn saw_empty(&mut self) {
        if !self.seen_empty {
            self.seen_empty = true;
            self.room.notify();
        }
    }

    /// Whether host input may enter the FIFO, empty, at `now`.
    pub fn open(&self, now: Instant) -> bool {
        self.seen_empty || now.saturating_duration_since(self.empty_since) >= UNSEEN_EMPTY_GRACE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_when_the_guest_looks_or_after_the_grace() {
        let room = Arc::new(InputRoom::default());
        let mut gate = ReceiveGate::new(room.clone());
        let now = Instant::now();
        gate.emptied(now);
        assert!(!gate.open(now));
        assert!(!gate.open(now + UNSEEN_EMPTY_GRACE / 2));
        assert!(gate.open(now + UNSEEN_EMPTY_GRACE), "a guest that never looks still gets input");
        let before = room.generation();
        gate.saw_empty();
        assert!(gate.open(now), "looked at: open at once");
        assert_ne!(room.generation(), before, "the input thread is woken");
        let after = room.generation();
        gate.saw_empty();
        assert_eq!(room.generation(), after, "one wake-up per emptying, not one per status read");
        gate.emptied(now);
        assert!(!gate.open(now));
    }
}

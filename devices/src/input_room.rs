//! How a device tells the thread that feeds it host input that it has made room for more.

use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Shared by a device and its input thread. The thread reads [`generation`](Self::generation), offers its bytes,
/// and if some were refused waits with [`wait_past`](Self::wait_past); the device calls [`notify`](Self::notify)
/// when it can take more. Reading the generation before offering means a notification that comes between the
/// refusal and the wait is not missed.
#[derive(Default)]
pub struct InputRoom {
    generation: Mutex<u64>,
    changed: Condvar,
}

impl InputRoom {
    /// The device can take more input: wakes the thread if it waits.
    pub fn notify(&self) {
        let mut generation = self.generation.lock().unwrap_or_else(|p| p.into_inner());
        *generation = generation.wrapping_add(1);
        self.changed.notify_all();
    }

    /// A token for [`wait_past`](Self::wait_past): read it before offering input.
    pub fn generation(&self) -> u64 {
        *self.generation.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until the device has notified since `seen` was read, or at most `timeout`.
    pub fn wait_past(&self, seen: u64, timeout: Duration) {
        let generation = self.generation.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self.changed.wait_timeout_while(generation, timeout, |g| *g == seen);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn a_notification_before_the_wait_is_not_missed() {
        let room = InputRoom::default();
        let seen = room.generation();
        room.notify();
        let started = Instant::now();
        room.wait_past(seen, Duration::from_secs(10));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_notification_wakes_a_waiting_thread_and_silence_times_out() {
        let room = Arc::new(InputRoom::default());
        let started = Instant::now();
        room.wait_past(room.generation(), Duration::from_millis(50));
        assert!(started.elapsed() >= Duration::from_millis(50), "nothing notified: the full timeout");
        let seen = room.generation();
        let notifier = {
            let room = room.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                room.notify();
            })
        };
        let started = Instant::now();
        room.wait_past(seen, Duration::from_secs(30));
        assert!(started.elapsed() < Duration::from_secs(10), "woken by the notification, not the timeout");
        notifier.join().unwrap();
    }
}

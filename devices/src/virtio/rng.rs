//! virtio-rng (virtio 1.2, 5.4): one request queue of device-writable buffers, filled from the host's
//! getrandom(2). At most [`MAX_BYTES_PER_REQUEST`] bytes per buffer, so one guest request cannot make the device
//! thread spin on the host's entropy source.

use std::io;

use serde::{Deserialize, Serialize};

use super::chain::{self, Segment};
use super::{features, DriverState, GuestErrorLog, GuestMemoryMmap, VirtioDevice, VirtioDeviceState};
use crate::StateError;

pub const QUEUE_SIZE: u16 = 256;
/// Bytes of entropy handed out per request at most.
pub const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;

static LOG: GuestErrorLog = GuestErrorLog::new("virtio-rng");

pub struct Rng {
    driver: DriverState,
}

impl Rng {
    pub fn new() -> Self {
        Rng { driver: DriverState::default() }
    }
}

impl Default for Rng {
    fn default() -> Self {
        Rng::new()
    }
}

/// virtio-rng keeps nothing beside its queue and the negotiated features (the transport's): each request is filled
/// and used in one go.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngState {}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        super::TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        features::COMMON
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn driver(&self) -> &DriverState {
        &self.driver
    }

    fn driver_mut(&mut self) -> &mut DriverState {
        &mut self.driver
    }

    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Rng(RngState {})
    }

    fn restore_device_state(&mut self, state: &VirtioDeviceState, _running: bool) -> Result<(), StateError> {
        let VirtioDeviceState::Rng(RngState {}) = state else { return Err(state.mismatch(LOG.device)) };
        Ok(())
    }

    fn process_queue(&mut self, index: usize) -> bool {
        let Some(active) = self.active_queues_mut() else { return false };
        let mut entropy = vec![0u8; MAX_BYTES_PER_REQUEST];
        active.process(index, &LOG, |mem, chain| match chain::parse(chain, usize::from(QUEUE_SIZE)) {
            Ok(c) => fill(mem, &c, &mut entropy),
            Err(e) => {
                LOG.report(format_args!("{e}"));
                0
            }
        })
    }
}

/// Fills the writable part of `chain` (up to the per-request bound); returns the bytes written.
fn fill(mem: &GuestMemoryMmap, chain: &chain::Chain, entropy: &mut [u8]) -> u32 {
    if let Some(bad) = chain.bad_segment {
        LOG.report(format_args!("chain {} names {:#x}+{:#x} outside guest memory", chain.head, bad.addr.0, bad.len));
        return 0;
    }
    let want = chain::total_len(&chain.writable).min(entropy.len() as u64) as usize;
    let buf = &mut entropy[..want];
    if let Err(e) = getrandom(buf) {
        LOG.report(format_args!("getrandom failed: {e}"));
        return 0;
    }
    let (segments, _): (Vec<Segment>, _) = chain::split_at(&chain.writable, want as u64);
    match chain::write_stream(mem, &segments, buf) {
        Ok(n) => n as u32,
        Err(_) => 0,
    }
}

/// Fills `buf` from getrandom(2), which blocks only until the host's pool is initialised (at boot).
pub fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: the kernel writes at most `rest.len()` bytes into `rest`, which we exclusively borrow.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::virtio::testing::{guest_memory, CountingLine, Desc, TestQueue};
    use crate::virtio::VirtioInterrupt;

    fn active_rng() -> (Rng, GuestMemoryMmap, TestQueue, Arc<VirtioInterrupt>) {
        let mem = guest_memory(1 << 20);
        let tq = TestQueue::new(GuestAddress(0x1000), 16);
        let irq = Arc::new(VirtioInterrupt::new(CountingLine::new()));
        let mut rng = Rng::new();
        rng.ack_features(features::VERSION_1);
        rng.activate(mem.clone(), vec![tq.queue()], irq.clone()).unwrap();
        (rng, mem, tq, irq)
    }

    #[test]
    fn fills_writable_buffers_with_entropy() {
        let (mut rng, mem, mut tq, _) = active_rng();
        let head = tq.add_chain(&mem, &[Desc::w(0x10000, 100), Desc::w(0x20000, 4000)]);
        assert!(rng.process_queue(0));
        assert_eq!(tq.pop_used(&mem), Some((u32::from(head), 4100)));
        let mut a = [0u8; 100];
        let mut b = vec![0u8; 4000];
        mem.read_slice(&mut a, GuestAddress(0x10000)).unwrap();
        mem.read_slice(&mut b, GuestAddress(0x20000)).unwrap();
        assert!(a.iter().any(|&x| x != 0) && b.iter().any(|&x| x != 0));
        // Nothing past the buffers.
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10000 + 100)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x20000 + 4000)).unwrap(), 0);
    }

    #[test]
    fn requests_are_bounded() {
        let (mut rng, mem, mut tq, _) = active_rng();
        tq.add_chain(&mem, &[Desc::w(0x40000, 128 << 10)]);
        assert!(rng.process_queue(0));
        assert_eq!(tq.pop_used(&mem).unwrap().1, MAX_BYTES_PER_REQUEST as u32);
        let mut tail = vec![0u8; 64 << 10];
        mem.read_slice(&mut tail, GuestAddress(0x40000 + MAX_BYTES_PER_REQUEST as u64)).unwrap();
        assert!(tail.iter().all(|&x| x == 0));
    }

    #[test]
    fn bad_buffers_get_nothing_and_the_queue_goes_on() {
        let (mut rng, mem, mut tq, irq) = active_rng();
        tq.add_chain(&mem, &[Desc::r(0x10000, 64)]);
        tq.add_chain(&mem, &[Desc::w(0xfff_0000, 64)]);
        tq.add_chain(&mem, &[Desc::w((1 << 20) - 8, 64)]);
        tq.add_chain(&mem, &[Desc::w(0x10000, 0)]);
        tq.add_chain(&mem, &[Desc::w(0x10000, 16)]);
        assert!(rng.process_queue(0));
        let lens: Vec<u32> = std::iter::from_fn(|| tq.pop_used(&mem)).map(|(_, len)| len).collect();
        assert_eq!(lens, [0, 0, 0, 0, 16]);
        assert!(!irq.needs_reset());
    }

    #[test]
    fn nothing_happens_before_activation_or_after_reset() {
        let (mut rng, mem, mut tq, _) = active_rng();
        rng.reset();
        tq.add_chain(&mem, &[Desc::w(0x10000, 16)]);
        assert!(!rng.process_queue(0));
        assert!(!rng.process_queue(7));
        assert_eq!(tq.used_idx(&mem), 0);
    }
}

//! An address bus: ranges of port or MMIO space mapped to devices. vCPU exits are completed here without the
//! vCPU loop knowing which device answered.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through a bus. `offset` is relative to the start of the range it was inserted at.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    InvalidRange { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
}

#[derive(Clone)]
struct Range {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Unmapped reads return all ones, like a floating ISA/PCI bus; unmapped writes are dropped.
#[derive(Clone, Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Range>,
}

impl Bus {
    pub fn new() -> Self {
        Bus::default()
    }

    pub fn insert(&mut self, device: Arc<Mutex<dyn BusDevice>>, base: u64, len: u64) -> Result<(), Error> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(Error::InvalidRange { base, len })?;
        let overlaps_previous =
            self.ranges.range(..end).next_back().is_some_and(|(&start, range)| start + range.len > base);
        if overlaps_previous {
            return Err(Error::Overlap { base, len });
        }
        self.ranges.insert(base, Range { len, device });
        Ok(())
    }

    /// The device covering the whole access `[addr, addr + size)`, with the offset into its range.
    fn find(&self, addr: u64, size: usize) -> Option<(u64, &Range)> {
        let (&start, range) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - start;
        let end = offset.checked_add(size as u64)?;
        (end <= range.len).then_some((offset, range))
    }

    /// Completes a guest read. Returns whether a device answered.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, range)) => {
                lock(&range.device).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Completes a guest write. Returns whether a device took it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, range)) => {
                lock(&range.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Completes a read of a byte-wide register: the value in the first byte, zeros in any wider part of the access.
pub fn reply_byte(data: &mut [u8], value: u8) {
    data.fill(0);
    if let Some(first) = data.first_mut() {
        *first = value;
    }
}

/// A device whose lock was poisoned by a panicking vCPU thread is still the best state we have; keep serving it.
fn lock<'a>(device: &'a Mutex<dyn BusDevice + 'static>) -> std::sync::MutexGuard<'a, dyn BusDevice + 'static> {
    device.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn accesses_reach_the_device_with_their_offset() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data, [5]);
        assert!(bus.write(0x3f8, b"K"));
        assert_eq!(dev.lock().unwrap().writes, vec![(0, b"K".to_vec())]);
    }

    #[test]
    fn unmapped_reads_float_high_and_writes_vanish() {
        let bus = Bus::new();
        let mut data = [0u8; 4];
        assert!(!bus.read(0xd000_0000, &mut data));
        assert_eq!(data, [0xff; 4]);
        assert!(!bus.write(0xd000_0000, &[1, 2, 3, 4]));
    }

    #[test]
    fn accesses_straddling_the_end_of_a_range_are_unmapped() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x70, 2).unwrap();
        let mut data = [0u8; 4];
        assert!(!bus.read(0x70, &mut data));
        assert!(!bus.read(u64::MAX, &mut data[..1]));
        assert!(!bus.write(u64::MAX - 1, &data));
    }

    #[test]
    fn overlapping_and_invalid_ranges_are_refused() {
        let mut bus = Bus::new();
        let dev = || Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev(), 0x60, 1).unwrap();
        bus.insert(dev(), 0x64, 1).unwrap();
        assert_eq!(bus.insert(dev(), 0x5f, 2), Err(Error::Overlap { base: 0x5f, len: 2 }));
        assert_eq!(bus.insert(dev(), 0x64, 1), Err(Error::Overlap { base: 0x64, len: 1 }));
        assert_eq!(bus.insert(dev(), 0x10, 0), Err(Error::InvalidRange { base: 0x10, len: 0 }));
        assert_eq!(bus.insert(dev(), u64::MAX, 2), Err(Error::InvalidRange { base: u64::MAX, len: 2 }));
        bus.insert(dev(), 0x61, 3).unwrap();
    }
}

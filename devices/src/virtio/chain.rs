//! Descriptor chains as a device may use them: the guest's chain flattened into a device-readable byte stream
//! followed by a device-writable one, each a list of guest memory segments.
//!
//! virtio-queue's `DescriptorChain` iterator already bounds the walk (at most queue-size descriptors, or
//! indirect-table-size inside an indirect table, no nested indirect tables, at most 4 GiB in total) but it
//! reports every problem by simply stopping. [`parse`] turns an early stop into an error (the last descriptor
//! seen still had NEXT set), enforces the readable-before-writable order (virtio 1.2, 2.7.4.2), caps the number
//! of descriptors a device is willing to look at, and checks every segment against guest memory.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Address, GuestAddress, GuestMemory, Permissions};

/// A piece of guest memory named by one descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

impl Segment {
    /// The guest address `offset` bytes in, if that stays in the address space.
    fn at(&self, offset: u32) -> Option<GuestAddress> {
        self.addr.checked_add(u64::from(offset))
    }
}

/// A chain that is not a well-formed sequence of descriptors. The buffer can still be returned to the driver
/// (with nothing written), but the device cannot know where its status byte would go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("descriptor chain {0} is empty or its head is invalid")]
    Empty(u16),
    #[error("descriptor chain {0} ends early: it loops, leaves the table, nests indirect tables or exceeds 4 GiB")]
    Truncated(u16),
    #[error("descriptor chain {0} has a device-readable descriptor after a device-writable one")]
    ReadableAfterWritable(u16),
    #[error("descriptor chain {0} has more than {1} descriptors")]
    TooLong(u16, usize),
}

/// A guest buffer that is not (entirely) in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("guest buffer outside guest memory")]
pub struct OutsideMemory;

/// A parsed descriptor chain. Zero-length descriptors are dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    pub head: u16,
    pub readable: Vec<Segment>,
    pub writable: Vec<Segment>,
    /// The first segment that is not entirely inside guest memory, if any. The segments are kept so the device
    /// can still find its status byte; it must not do the I/O.
    pub bad_segment: Option<Segment>,
}

/// Flattens `chain`, looking at no more than `max_descriptors` descriptors.
pub fn parse<M>(chain: DescriptorChain<M>, max_descriptors: usize) -> Result<Chain, ChainError>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let head = chain.head_index();
    let mem = chain.memory();
    let mut parsed = Chain { head, readable: Vec::new(), writable: Vec::new(), bad_segment: None };
    let mut count = 0usize;
    let mut last_had_next = false;
    for desc in chain.clone() {
        count += 1;
        if count > max_descriptors {
            return Err(ChainError::TooLong(head, max_descriptors));
        }
        last_had_next = desc.has_next();
        let segment = Segment { addr: desc.addr(), len: desc.len() };
        let writable = desc.is_write_only();
        if !writable && !parsed.writable.is_empty() {
            return Err(ChainError::ReadableAfterWritable(head));
        }
        if segment.len == 0 {
            continue;
        }
        let access = if writable { Permissions::Write } else { Permissions::Read };
        let inside = segment.addr.checked_add(u64::from(segment.len)).is_some()
            && mem.check_range(segment.addr, segment.len as usize, access);
        if !inside && parsed.bad_segment.is_none() {
            parsed.bad_segment = Some(segment);
        }
        if writable {
            parsed.writable.push(segment);
        } else {
            parsed.readable.push(segment);
        }
    }
    if count == 0 {
        return Err(ChainError::Empty(head));
    }
    if last_had_next {
        return Err(ChainError::Truncated(head));
    }
    Ok(parsed)
}

/// The total length of `segments`.
pub fn total_len(segments: &[Segment]) -> u64 {
    segments.iter().map(|s| u64::from(s.len)).sum()
}

/// Splits `segments` at byte `at` of the stream they form: the first `at` bytes, then the rest. If the stream is
/// shorter, the first part is all of it and the second is empty.
pub fn split_at(segments: &[Segment], at: u64) -> (Vec<Segment>, Vec<Segment>) {
    let mut front = Vec::new();
    let mut back = Vec::new();
    let mut left = at;
    for s in segments {
        if left >= u64::from(s.len) {
            left -= u64::from(s.len);
            front.push(*s);
        } else if left == 0 {
            back.push(*s);
        } else {
            // left < s.len <= u32::MAX.
            let cut = left as u32;
            front.push(Segment { addr: s.addr, len: cut });
            match s.at(cut) {
                Some(addr) => back.push(Segment { addr, len: s.len - cut }),
                // Cannot happen for a segment that fits in memory; an out-of-memory one is `bad_segment` anyway.
                None => back.push(Segment { addr: s.addr, len: s.len - cut }),
            }
            left = 0;
        }
    }
    (front, back)
}

/// The address of the last byte of the stream formed by `segments`.
pub fn last_byte(segments: &[Segment]) -> Option<GuestAddress> {
    let last = segments.last()?;
    last.at(last.len.checked_sub(1)?)
}

/// Reads exactly `buf.len()` bytes from the start of the stream formed by `segments`.
pub fn read_stream<M: GuestMemory + ?Sized>(
    mem: &M,
    segments: &[Segment],
    buf: &mut [u8],
) -> Result<(), OutsideMemory> {
    let mut done = 0usize;
    for s in segments {
        if done == buf.len() {
            break;
        }
        let n = (s.len as usize).min(buf.len() - done);
        copy_from_guest(mem, s.addr, &mut buf[done..done + n])?;
        done += n;
    }
    if done == buf.len() {
        Ok(())
    } else {
        Err(OutsideMemory)
    }
}

/// Writes `data` at the start of the stream formed by `segments`; returns how many bytes fit.
pub fn write_stream<M: GuestMemory + ?Sized>(
    mem: &M,
    segments: &[Segment],
    data: &[u8],
) -> Result<usize, OutsideMemory> {
    let mut done = 0usize;
    for s in segments {
        if done == data.len() {
            break;
        }
        let n = (s.len as usize).min(data.len() - done);
        copy_to_guest(mem, s.addr, &data[done..done + n])?;
        done += n;
    }
    Ok(done)
}

/// Copies guest memory into `buf`, across memory regions; fails unless every byte was there.
pub fn copy_from_guest<M: GuestMemory + ?Sized>(
    mem: &M,
    addr: GuestAddress,
    buf: &mut [u8],
) -> Result<(), OutsideMemory> {
    let slices = mem.get_slices(addr, buf.len(), Permissions::Read).map_err(|_| OutsideMemory)?;
    let mut done = 0;
    for slice in slices {
        let slice = slice.map_err(|_| OutsideMemory)?;
        let n = slice.len();
        slice.copy_to(&mut buf[done..done + n]);
        done += n;
    }
    if done == buf.len() {
        Ok(())
    } else {
        Err(OutsideMemory)
    }
}

/// Copies `data` into guest memory, across memory regions; fails unless every byte was written.
pub fn copy_to_guest<M: GuestMemory + ?Sized>(mem: &M, addr: GuestAddress, data: &[u8]) -> Result<(), OutsideMemory> {
    let slices = mem.get_slices(addr, data.len(), Permissions::Write).map_err(|_| OutsideMemory)?;
    let mut done = 0;
    for slice in slices {
        let slice = slice.map_err(|_| OutsideMemory)?;
        let n = slice.len();
        slice.copy_from(&data[done..done + n]);
        done += n;
    }
    if done == data.len() {
        Ok(())
    } else {
        Err(OutsideMemory)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(addr: u64, len: u32) -> Segment {
        Segment { addr: GuestAddress(addr), len }
    }

    #[test]
    fn split_at_cuts_inside_and_between_segments() {
        let segs = [seg(0x1000, 16), seg(0x2000, 512), seg(0x3000, 1)];
        assert_eq!(split_at(&segs, 16), (vec![seg(0x1000, 16)], vec![seg(0x2000, 512), seg(0x3000, 1)]));
        assert_eq!(
            split_at(&segs, 20),
            (vec![seg(0x1000, 16), seg(0x2000, 4)], vec![seg(0x2004, 508), seg(0x3000, 1)])
        );
        assert_eq!(split_at(&segs, 529), (segs.to_vec(), vec![]));
        assert_eq!(split_at(&segs, 10_000), (segs.to_vec(), vec![]));
        assert_eq!(split_at(&segs, 0), (vec![], segs.to_vec()));
        assert_eq!(last_byte(&segs), Some(GuestAddress(0x3000)));
        assert_eq!(last_byte(&[]), None);
        assert_eq!(total_len(&segs), 529);
    }
}

//! The driver's side of a split virtqueue, laid out in guest memory by hand, so tests and fuzz targets can build
//! any chain, well-formed or not (compiled for tests and with the `test-utils` feature).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use super::{GuestMemoryMmap, Queue, QueueT};
use crate::InterruptLine;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;

/// Guest memory of `size` bytes at address 0.
pub fn guest_memory(size: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).expect("mapping test guest memory")
}

/// A raw descriptor as the driver writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl Desc {
    /// A device-readable buffer.
    pub fn r(addr: u64, len: u32) -> Self {
        Desc { addr, len, flags: 0, next: 0 }
    }
    /// A device-writable buffer.
    pub fn w(addr: u64, len: u32) -> Self {
        Desc { addr, len, flags: DESC_F_WRITE, next: 0 }
    }
}

/// A split virtqueue's rings at fixed guest addresses: descriptor table, available ring, used ring, back to back.
#[derive(Clone, Debug)]
pub struct TestQueue {
    pub size: u16,
    pub desc_table: GuestAddress,
    pub avail_ring: GuestAddress,
    pub used_ring: GuestAddress,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl TestQueue {
    /// Rings for a queue of `size` (a power of two) starting at `base` (16-byte aligned).
    pub fn new(base: GuestAddress, size: u16) -> Self {
        let avail_ring = GuestAddress(base.0 + 16 * u64::from(size));
        // flags, idx, ring[size], used_event; the used ring is 4-byte aligned.
        let used_ring = GuestAddress((avail_ring.0 + 6 + 2 * u64::from(size) + 3) & !3);
        TestQueue { size, desc_table: base, avail_ring, used_ring, next_desc: 0, avail_idx: 0, used_seen: 0 }
    }

    /// The first address after the rings.
    pub fn end(&self) -> GuestAddress {
        GuestAddress(self.used_ring.0 + 6 + 8 * u64::from(self.size))
    }

    /// A device-side `Queue` configured for these rings and marked ready.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("queue size");
        q.set_desc_table_address(Some(self.desc_table.0 as u32), Some((self.desc_table.0 >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail_ring.0 as u32), Some((self.avail_ring.0 >> 32) as u32));
        q.set_used_ring_address(Some(self.used_ring.0 as u32), Some((self.used_ring.0 >> 32) as u32));
        q.set_ready(true);
        q
    }

    /// Writes descriptor `index` of the table.
    pub fn write_desc(&self, mem: &GuestMemoryMmap, index: u16, d: Desc) {
        write_desc_at(mem, GuestAddress(self.desc_table.0 + 16 * u64::from(index)), d);
    }

    /// Lays `descs` out in consecutive table entries (wrapping), linked with NEXT, and makes the chain available.
    /// Returns the head index.
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, descs: &[Desc]) -> u16 {
        let head = self.next_desc;
        for (i, d) in descs.iter().enumerate() {
            let index = self.next_desc;
            self.next_desc = (self.next_desc + 1) % self.size;
            let mut d = *d;
            if i + 1 < descs.len() {
                d.flags |= DESC_F_NEXT;
                d.next = self.next_desc;
            }
            self.write_desc(mem, index, d);
        }
        self.publish(mem, head);
        head
    }

    /// Puts `head` on the available ring and bumps its index.
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head.to_le(), GuestAddress(self.avail_ring.0 + 4 + 2 * slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(mem, self.avail_idx);
    }

    /// Writes the available ring's index directly (hostile drivers lie about it).
    pub fn set_avail_idx(&self, mem: &GuestMemoryMmap, idx: u16) {
        mem.write_obj(idx.to_le(), GuestAddress(self.avail_ring.0 + 2)).unwrap();
    }

    /// The used ring's index.
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        u16::from_le(mem.read_obj(GuestAddress(self.used_ring.0 + 2)).unwrap())
    }

    /// The next used element not yet returned: (descriptor head, bytes written).
    pub fn pop_used(&mut self, mem: &GuestMemoryMmap) -> Option<(u32, u32)> {
        if self.used_seen == self.used_idx(mem) {
            return None;
        }
        let slot = u64::from(self.used_seen % self.size);
        let at = self.used_ring.0 + 4 + 8 * slot;
        let id = u32::from_le(mem.read_obj(GuestAddress(at)).unwrap());
        let len = u32::from_le(mem.read_obj(GuestAddress(at + 4)).unwrap());
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((id, len))
    }
}

/// Writes a raw descriptor at `at` (in a descriptor table or an indirect table).
pub fn write_desc_at(mem: &GuestMemoryMmap, at: GuestAddress, d: Desc) {
    let mut raw = [0u8; 16];
    raw[0..8].copy_from_slice(&d.addr.to_le_bytes());
    raw[8..12].copy_from_slice(&d.len.to_le_bytes());
    raw[12..14].copy_from_slice(&d.flags.to_le_bytes());
    raw[14..16].copy_from_slice(&d.next.to_le_bytes());
    mem.write_slice(&raw, at).unwrap();
}

/// An interrupt line that counts how often it was raised.
#[derive(Debug, Default)]
pub struct CountingLine(AtomicUsize);

impl CountingLine {
    pub fn new() -> Arc<Self> {
        Arc::new(CountingLine::default())
    }
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

//! MSI-X (PCI 3.0, 6.8.2): a table of vectors (address, data, mask) and a pending-bit array, both in a BAR, and
//! the capability that enables and masks them all. Messages go out through an [`MsiSender`] the VMM implements
//! over the hypervisor.

use std::io;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::config::{ConfigError, ConfigSpace};
use crate::{Persist, StateError};

/// Delivers a message-signalled interrupt: the guest's write of `data` to `address`.
pub trait MsiSender: Send + Sync {
    fn send_msi(&self, address: u64, data: u32) -> io::Result<()>;
}

pub const CAPABILITY_ID: u8 = 0x11;
/// Capability length: ID, next, message control, table offset/BIR, PBA offset/BIR.
pub const CAPABILITY_LEN: usize = 12;
const MESSAGE_CONTROL: usize = 2;
const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// The most vectors a function may have (the table size field is 11 bits).
pub const MAX_VECTORS: usize = 2048;
pub const ENTRY_SIZE: u64 = 16;
const ENTRY_VECTOR_CONTROL: u64 = 12;
const VECTOR_MASKED: u32 = 1;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Entry {
    address_low: u32,
    address_high: u32,
    data: u32,
    control: u32,
}

impl Entry {
    /// Every vector starts masked (PCI 3.0, 6.8.2.9).
    const RESET: Entry = Entry { address_low: 0, address_high: 0, data: 0, control: VECTOR_MASKED };

    fn masked(&self) -> bool {
        self.control & VECTOR_MASKED != 0
    }

    fn address(&self) -> u64 {
        u64::from(self.address_high) << 32 | u64::from(self.address_low)
    }
}

/// The table, the pending bits and the capability's enable and function-mask bits. Cloning shares the sender:
/// a scratch copy to restore into (see [`crate::persist`]).
#[derive(Clone)]
pub struct MsixTable {
    entries: Vec<Entry>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
    sender: Arc<dyn MsiSender>,
}

impl MsixTable {
    /// A table of `vectors` (1 to [`MAX_VECTORS`]) entries, all masked, MSI-X disabled.
    pub fn new(vectors: usize, sender: Arc<dyn MsiSender>) -> Self {
        let vectors = vectors.clamp(1, MAX_VECTORS);
        MsixTable {
            entries: vec![Entry::RESET; vectors],
            pending: vec![false; vectors],
            enabled: false,
            function_masked: false,
            sender,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes the table takes in its BAR.
    pub fn table_size(&self) -> u64 {
        self.entries.len() as u64 * ENTRY_SIZE
    }

    /// Bytes the pending-bit array takes in its BAR (whole qwords).
    pub fn pba_size(&self) -> u64 {
        self.entries.len().div_ceil(64) as u64 * 8
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn is_pending(&self, vector: usize) -> bool {
        self.pending.get(vector).copied().unwrap_or(false)
    }

    /// The device wants to interrupt through `vector`. Sent now if MSI-X is enabled and neither the function nor
    /// the vector is masked; remembered as pending if masked; dropped if MSI-X is off (this function has no INTx
    /// to fall back to) or the vector does not exist.
    pub fn trigger(&mut self, vector: usize) {
        if !self.enabled || vector >= self.entries.len() {
            return;
        }
        if self.function_masked || self.entries[vector].masked() {
            self.pending[vector] = true;
        } else {
            self.send(vector);
        }
    }

    fn send(&self, vector: usize) {
        let entry = self.entries[vector];
        // A failure means the VM is going away; there is nobody left to interrupt.
        let _ = self.sender.send_msi(entry.address(), entry.data);
    }

    /// Sends what became deliverable: pending vectors that are no longer masked.
    fn deliver_unmasked(&mut self) {
        if !self.enabled || self.function_masked {
            return;
        }
        for vector in 0..self.entries.len() {
            if self.pending[vector] && !self.entries[vector].masked() {
                self.pending[vector] = false;
                self.send(vector);
            }
        }
    }

    /// The capability's message control changed.
    pub fn set_control(&mut self, enabled: bool, function_masked: bool) {
        self.enabled = enabled;
        self.function_masked = function_masked;
        self.deliver_unmasked();
    }

    /// A guest read of the table: naturally aligned dwords or qwords; anything else reads zero.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !matches!(data.len(), 4 | 8) || !offset.is_multiple_of(data.len() as u64) {
            return;
        }
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            if let Some(value) = self.table_dword(offset + 4 * i as u64) {
                chunk.copy_from_slice(&value.to_le_bytes());
            }
        }
    }

    fn table_dword(&self, offset: u64) -> Option<u32> {
        let entry = self.entries.get(usize::try_from(offset / ENTRY_SIZE).ok()?)?;
        Some(match offset % ENTRY_SIZE {
            0 => entry.address_low,
            4 => entry.address_high,
            8 => entry.data,
            _ => entry.control,
        })
    }

    /// A guest write to the table: naturally aligned dwords or qwords; anything else is ignored.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        if !matches!(data.len(), 4 | 8) || !offset.is_multiple_of(data.len() as u64) {
            return;
        }
        for (i, chunk) in data.chunks(4).enumerate() {
            let value = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            let offset = offset + 4 * i as u64;
            let Some(entry) = usize::try_from(offset / ENTRY_SIZE).ok().and_then(|i| self.entries.get_mut(i)) else {
                return;
            };
            match offset % ENTRY_SIZE {
                0 => entry.address_low = value,
                4 => entry.address_high = value,
                8 => entry.data = value,
                // Only the mask bit of vector control is defined; the rest reads zero.
                _ => entry.control = value & VECTOR_MASKED,
            }
            if offset % ENTRY_SIZE == ENTRY_VECTOR_CONTROL {
                self.deliver_unmasked();
            }
        }
    }

    /// A guest read of the pending-bit array (read-only; writes are ignored).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let first = offset.checked_add(i as u64).and_then(|b| b.checked_mul(8));
            *byte = (0..8u64)
                .filter(|b| {
                    let vector = first.and_then(|f| f.checked_add(*b)).and_then(|v| usize::try_from(v).ok());
                    vector.is_some_and(|v| self.is_pending(v))
                })
                .fold(0, |acc, b| acc | 1 << b);
        }
    }

    /// Back to the power-on state: disabled, every vector masked, nothing pending.
    pub fn reset(&mut self) {
        self.entries.fill(Entry::RESET);
        self.pending.fill(false);
        self.enabled = false;
        self.function_masked = false;
    }
}

/// One vector as data: its table entry and its pending bit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MsixVectorState {
    pub address: u64,
    pub data: u32,
    /// The vector control's mask bit (its only defined bit).
    pub masked: bool,
    /// The PBA bit: triggered while masked, not yet sent.
    pub pending: bool,
}

/// An MSI-X table as data: the vectors, with the message control bits the table acts on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MsixTableState {
    pub vectors: Vec<MsixVectorState>,
    pub enabled: bool,
    pub function_masked: bool,
}

const DEVICE: &str = "MSI-X table";

impl Persist for MsixTable {
    type State = MsixTableState;

    fn save(&self) -> MsixTableState {
        let vectors = self
            .entries
            .iter()
            .zip(&self.pending)
            .map(|(entry, &pending)| MsixVectorState {
                address: entry.address(),
                data: entry.data,
                masked: entry.masked(),
                pending,
            })
            .collect();
        MsixTableState { vectors, enabled: self.enabled, function_masked: self.function_masked }
    }

    /// Sends nothing: a vector that is pending stays pending until the guest unmasks it.
    fn restore(&mut self, state: &MsixTableState) -> Result<(), StateError> {
        if state.vectors.len() != self.entries.len() {
            let problem =
                format!("{} in the snapshot, but this function has {}", state.vectors.len(), self.entries.len());
            return Err(StateError::new(DEVICE, "vectors", problem));
        }
        let deliverable = state.enabled && !state.function_masked;
        if let Some(vector) = state.vectors.iter().position(|v| v.pending && !v.masked && deliverable) {
            let problem = "set on an unmasked vector of an enabled table: it would have been sent";
            return Err(StateError::new(DEVICE, format!("vectors[{vector}].pending"), problem));
        }
        for (entry, vector) in self.entries.iter_mut().zip(&state.vectors) {
            *entry = Entry {
                address_low: vector.address as u32,
                address_high: (vector.address >> 32) as u32,
                data: vector.data,
                control: if vector.masked { VECTOR_MASKED } else { 0 },
            };
        }
        for (pending, vector) in self.pending.iter_mut().zip(&state.vectors) {
            *pending = vector.pending;
        }
        self.enabled = state.enabled;
        self.function_masked = state.function_masked;
        Ok(())
    }
}

/// Where a function's MSI-X structures live: the table and the PBA, each a BAR index and an offset in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixLayout {
    pub vectors: usize,
    pub table_bar: u8,
    pub table_offset: u32,
    pub pba_bar: u8,
    pub pba_offset: u32,
}

/// Adds the MSI-X capability for `layout` to `config` and returns its offset. Only the enable and function-mask
/// bits are writable; the owner calls [`sync_control`] after every config write that touches them.
pub fn add_capability(config: &mut ConfigSpace, layout: MsixLayout) -> Result<usize, ConfigError> {
    let mut body = [0u8; CAPABILITY_LEN];
    body[0] = CAPABILITY_ID;
    let table_size = (layout.vectors.clamp(1, MAX_VECTORS) - 1) as u16;
    body[2..4].copy_from_slice(&table_size.to_le_bytes());
    body[4..8].copy_from_slice(&(layout.table_offset | u32::from(layout.table_bar & 7)).to_le_bytes());
    body[8..12].copy_from_slice(&(layout.pba_offset | u32::from(layout.pba_bar & 7)).to_le_bytes());
    let offset = config.add_capability(&body)?;
    config.set_writable(offset + MESSAGE_CONTROL, &(CONTROL_ENABLE | CONTROL_FUNCTION_MASK).to_le_bytes());
    Ok(offset)
}

/// Applies the capability at `capability`'s enable and function-mask bits to `table`.
pub fn sync_control(config: &ConfigSpace, capability: usize, table: &mut MsixTable) {
    let control = config.u16_at(capability + MESSAGE_CONTROL);
    let (enabled, masked) = (control & CONTROL_ENABLE != 0, control & CONTROL_FUNCTION_MASK != 0);
    if (enabled, masked) != (table.enabled, table.function_masked) {
        table.set_control(enabled, masked);
    }
}

/// Checks, after a restore, that the capability at `capability` and `table` agree on the enable and function-mask
/// bits, as [`sync_control`] keeps them; a function restores both into scratch copies and checks them with this
/// before it swaps them in.
pub fn check_control(config: &ConfigSpace, capability: usize, table: &MsixTable) -> Result<(), StateError> {
    let control = config.u16_at(capability + MESSAGE_CONTROL);
    let capability_bits = (control & CONTROL_ENABLE != 0, control & CONTROL_FUNCTION_MASK != 0);
    if capability_bits != (table.enabled, table.function_masked) {
        let problem = format!(
            "the capability has enable={} function mask={}, the table enable={} function mask={}",
            capability_bits.0, capability_bits.1, table.enabled, table.function_masked
        );
        return Err(StateError::new("MSI-X", "message control", problem));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::pci::config::PciIdentity;
    use crate::persist::testing::{assert_refused, fuzz_restore, through_json};

    /// Records the messages sent.
    #[derive(Default)]
    pub(crate) struct RecordingSender(pub Mutex<Vec<(u64, u32)>>);

    impl MsiSender for RecordingSender {
        fn send_msi(&self, address: u64, data: u32) -> io::Result<()> {
            self.0.lock().unwrap().push((address, data));
            Ok(())
        }
    }

    impl RecordingSender {
        pub(crate) fn take(&self) -> Vec<(u64, u32)> {
            std::mem::take(&mut self.0.lock().unwrap())
        }
    }

    fn program(table: &mut MsixTable, vector: u64, address: u64, data: u32, masked: bool) {
        let base = vector * ENTRY_SIZE;
        table.write_table(base, &address.to_le_bytes());
        table.write_table(base + 8, &data.to_le_bytes());
        table.write_table(base + 12, &u32::from(masked).to_le_bytes());
    }

    #[test]
    fn masked_vectors_become_pending_and_fire_on_unmask() {
        let sender = Arc::new(RecordingSender::default());
        let mut t = MsixTable::new(3, sender.clone());
        program(&mut t, 0, 0xfee0_0000, 0x41, false);
        program(&mut t, 1, 0xfee0_1000, 0x42, true);
        t.trigger(0);
        assert_eq!(sender.take(), vec![], "MSI-X disabled: nothing is sent");
        t.set_control(true, false);
        t.trigger(0);
        t.trigger(1);
        t.trigger(7);
        assert_eq!(sender.take(), vec![(0xfee0_0000, 0x41)]);
        assert!(t.is_pending(1));
        let mut pba = [0u8; 8];
        t.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        // Unmasking the vector delivers it once.
        t.write_table(ENTRY_SIZE + 12, &0u32.to_le_bytes());
        assert_eq!(sender.take(), vec![(0xfee0_1000, 0x42)]);
        assert!(!t.is_pending(1));
        // The function mask holds everything back until it is cleared.
        t.set_control(true, true);
        t.trigger(0);
        t.trigger(1);
        assert_eq!(sender.take(), vec![]);
        t.set_control(true, false);
        assert_eq!(sender.take(), vec![(0xfee0_0000, 0x41), (0xfee0_1000, 0x42)]);
        t.reset();
        t.set_control(true, false);
        t.trigger(0);
        assert_eq!(sender.take(), vec![], "reset masks every vector");
    }

    #[test]
    fn table_accesses_are_checked() {
        let sender = Arc::new(RecordingSender::default());
        let mut t = MsixTable::new(2, sender);
        program(&mut t, 1, 0x1_2345_6789, 7, false);
        let mut q = [0u8; 8];
        t.read_table(ENTRY_SIZE, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x1_2345_6789);
        let mut d = [0u8; 4];
        t.read_table(ENTRY_SIZE + 12, &mut d);
        assert_eq!(d, [0; 4]);
        t.write_table(ENTRY_SIZE + 12, &0xffff_fffeu32.to_le_bytes());
        t.read_table(ENTRY_SIZE + 12, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0, "reserved vector control bits read zero");
        // Unaligned, odd-sized and out-of-range accesses change nothing and read zero.
        t.write_table(ENTRY_SIZE + 2, &[0xff; 4]);
        t.write_table(ENTRY_SIZE, &[0xff; 2]);
        t.write_table(u64::MAX - 3, &[0xff; 4]);
        t.write_table(2 * ENTRY_SIZE, &[0xff; 8]);
        t.read_table(ENTRY_SIZE, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x1_2345_6789);
        let mut odd = [0xaau8; 3];
        t.read_table(0, &mut odd);
        assert_eq!(odd, [0; 3]);
        t.read_table(u64::MAX - 7, &mut q);
        assert_eq!(q, [0; 8]);
        let mut pba = [0xffu8; 4];
        t.read_pba(u64::MAX, &mut pba);
        assert_eq!(pba, [0; 4]);
        assert_eq!((t.table_size(), t.pba_size()), (32, 8));
    }

    /// A configuration space with an MSI-X capability for 5 vectors, and the capability's offset.
    fn config_with_capability() -> (ConfigSpace, usize) {
        let identity = PciIdentity {
            vendor_id: 1,
            device_id: 2,
            subsystem_vendor_id: 0,
            subsystem_id: 0,
            revision: 0,
            class_code: 0,
        };
        let mut config = ConfigSpace::new(identity);
        let layout = MsixLayout { vectors: 5, table_bar: 1, table_offset: 0, pba_bar: 1, pba_offset: 0x800 };
        let cap = add_capability(&mut config, layout).unwrap();
        (config, cap)
    }

    #[test]
    fn the_capability_controls_the_table() {
        let (mut config, cap) = config_with_capability();
        assert_eq!(config.u32_at(cap) & 0xffff_00ff, 4 << 16 | 0x11);
        assert_eq!(config.u32_at(cap + 4), 1);
        assert_eq!(config.u32_at(cap + 8), 0x801);
        let sender = Arc::new(RecordingSender::default());
        let mut t = MsixTable::new(5, sender);
        // Table size is read-only; enable and mask are not.
        config.write(cap + 2, &0xffffu16.to_le_bytes());
        assert_eq!(config.u16_at(cap + 2), 0xc004);
        sync_control(&config, cap, &mut t);
        assert!(t.enabled() && t.function_masked);
        config.write(cap + 2, &0x8000u16.to_le_bytes());
        sync_control(&config, cap, &mut t);
        assert!(t.enabled() && !t.function_masked);
    }

    /// A table of 5 the guest has programmed and enabled: vector 0 unmasked, vector 1 masked with an interrupt
    /// pending, vector 4 unmasked, the rest left masked.
    fn used_table() -> (MsixTable, Arc<RecordingSender>) {
        let sender = Arc::new(RecordingSender::default());
        let mut t = MsixTable::new(5, sender.clone());
        program(&mut t, 0, 0xfee0_0000, 0x41, false);
        program(&mut t, 1, 0xfee0_1000, 0x42, true);
        program(&mut t, 4, 0x1_fee0_4000, 0x44, false);
        t.set_control(true, false);
        t.trigger(1);
        assert!(t.is_pending(1) && sender.take().is_empty());
        (t, sender)
    }

    /// The table and the PBA as the guest reads them, in qwords.
    fn guest_view(t: &MsixTable) -> Vec<u64> {
        let mut view = Vec::new();
        for offset in (0..t.table_size()).step_by(8) {
            let mut q = [0u8; 8];
            t.read_table(offset, &mut q);
            view.push(u64::from_le_bytes(q));
        }
        let mut pba = [0u8; 8];
        t.read_pba(0, &mut pba);
        view.push(u64::from_le_bytes(pba));
        view
    }

    #[test]
    fn state_round_trips_with_a_pending_vector() {
        let (mut t, sender) = used_table();
        let state = through_json(&t.save());
        let restored_sender = Arc::new(RecordingSender::default());
        let mut restored = MsixTable::new(5, restored_sender.clone());
        restored.restore(&state).unwrap();
        assert!(restored_sender.take().is_empty(), "restoring sends nothing");
        assert_eq!(guest_view(&restored), guest_view(&t));
        assert_eq!(guest_view(&restored)[3], 0x42 | 1 << 32, "vector 1: data, then vector control: masked");
        assert!(restored.enabled() && restored.is_pending(1));
        // The next accesses behave alike: unmasking vector 1 sends its pending message, vector 4 fires at once.
        for dev in [&mut t, &mut restored] {
            dev.write_table(ENTRY_SIZE + 12, &0u32.to_le_bytes());
            dev.trigger(4);
            dev.trigger(2);
        }
        let expected = vec![(0xfee0_1000, 0x42), (0x1_fee0_4000, 0x44)];
        assert_eq!((sender.take(), restored_sender.take()), (expected.clone(), expected));
        assert_eq!(guest_view(&restored), guest_view(&t));
    }

    #[test]
    fn hostile_states_are_refused() {
        let (t, _) = used_table();
        let good = t.save();
        let mut target = MsixTable::new(5, Arc::new(RecordingSender::default()));
        for len in [0, 4, 6, MAX_VECTORS + 1] {
            let mut state = good.clone();
            state.vectors.resize(len, good.vectors[0].clone());
            assert_refused(&mut target, &state, "vectors");
        }
        let mut deliverable = good.clone();
        deliverable.vectors[1].masked = false;
        assert_refused(&mut target, &deliverable, "vectors[1].pending");
        deliverable.function_masked = true;
        target.restore(&deliverable).unwrap();
    }

    #[test]
    fn a_restored_capability_and_table_must_agree() {
        let (mut config, cap) = config_with_capability();
        let (t, _) = used_table();
        let error = check_control(&config, cap, &t).unwrap_err();
        assert!(error.to_string().contains("message control"), "{error}");
        config.write(cap + 2, &CONTROL_ENABLE.to_le_bytes());
        check_control(&config, cap, &t).unwrap();
        config.write(cap + 2, &(CONTROL_ENABLE | CONTROL_FUNCTION_MASK).to_le_bytes());
        assert!(check_control(&config, cap, &t).is_err());
    }

    #[test]
    fn mutated_states_never_panic() {
        let (t, _) = used_table();
        let exercise = |t: &mut MsixTable| {
            guest_view(t);
            for vector in 0..6 {
                t.trigger(vector);
                t.write_table(vector as u64 * ENTRY_SIZE + 12, &0u32.to_le_bytes());
            }
            t.set_control(true, false);
        };
        let fresh = || MsixTable::new(5, Arc::new(RecordingSender::default()));
        let counts = fuzz_restore(fresh, &t.save(), exercise, 2000);
        assert!(counts.refused > 0 && counts.loaded > 0, "{counts:?}");
    }
}

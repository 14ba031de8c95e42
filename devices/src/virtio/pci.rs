//! The modern virtio-pci transport (virtio 1.2, 4.1): a PCI function with vendor capabilities pointing into one
//! memory BAR (common configuration, ISR, device configuration, one notification address per queue) and MSI-X in
//! a second BAR. Device status, features and queue setup are the shared [`TransportState`].
//!
//! # Layout
//!
//! BAR 0 ([`VIRTIO_BAR_SIZE`]): common configuration at 0, ISR at 0x1000, device configuration at 0x2000,
//! notifications at 0x3000 (queue `i` at `0x3000 + 4 * i`, `notify_off_multiplier` 4). BAR 1: the MSI-X table at 0
//! and the pending-bit array at 0x1000. One vector per queue plus one for configuration changes is enough for
//! Linux's preferred layout.
//!
//! # Interrupts
//!
//! MSI-X only: `config_msix_vector` and each queue's `queue_msix_vector` pick a table entry (out-of-range values
//! read back as [`NO_VECTOR`], and [`NO_VECTOR`] means no interrupt for that cause). There is no INTx pin
//! (interrupt pin 0): Linux uses MSI-X when it is offered, and a driver that does not enable it gets no
//! interrupts.
//!
//! # Wiring (for the VMM)
//!
//! Add the function to a [`PciRoot`](crate::pci::PciRoot). For each `(bar, offset, event)` from
//! [`VirtioPciDevice::notifiers`], register `event` as an ioeventfd without datamatch on the BAR's decoded
//! address + `offset` (Linux writes the queue index as 16 bits; every queue has its own address), and move it
//! when the root's observer reports that BAR moved. Writes that reach the bus anyway signal the same eventfd. Work
//! on the queues is done as with mmio: watch the eventfds and call [`QueueHandler::handle`].

use std::io;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::transport::{QueueConfig, TransportState, VirtioState};
use super::{lock_device, GuestErrorLog, GuestMemoryMmap, QueueHandler, VectorDelivery, VirtioDevice};
use super::{VirtioInterrupt, TYPE_BALLOON, TYPE_BLOCK, TYPE_CONSOLE, TYPE_NET, TYPE_RNG};
use crate::pci::msix::{self, MsixLayout};
use crate::pci::{Bar, ConfigSpace, ConfigSpaceState, MsiSender, MsixTable, MsixTableState, PciDevice, PciIdentity};
use crate::{Persist, StateError};

pub const VENDOR_ID: u16 = 0x1af4;
/// Modern device IDs are this plus the virtio device type.
pub const DEVICE_ID_BASE: u16 = 0x1040;
pub const SUBSYSTEM_ID: u16 = 0x1100;
/// Modern-only devices have revision 1.
pub const REVISION: u8 = 1;
/// "No interrupt for this cause" in the vector registers.
pub const NO_VECTOR: u16 = 0xffff;

pub const VIRTIO_BAR: usize = 0;
pub const MSIX_BAR: usize = 1;
pub const VIRTIO_BAR_SIZE: u64 = 0x4000;
pub const MSIX_BAR_SIZE: u64 = 0x2000;
pub const COMMON_CFG_OFFSET: u64 = 0;
/// The common configuration structure's length (up to `queue_reset`).
pub const COMMON_CFG_LEN: u64 = 0x3c;
pub const ISR_OFFSET: u64 = 0x1000;
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
pub const DEVICE_CFG_LEN: u64 = 0x1000;
pub const NOTIFY_OFFSET: u64 = 0x3000;
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
const MSIX_PBA_OFFSET: u64 = 0x1000;
/// The MSI-X table fits below the PBA: 256 vectors of 16 bytes.
const MAX_VECTORS: usize = (MSIX_PBA_OFFSET / msix::ENTRY_SIZE) as usize;
/// Notification addresses fit in the rest of BAR 0.
const MAX_QUEUES: usize = ((VIRTIO_BAR_SIZE - NOTIFY_OFFSET) / NOTIFY_OFF_MULTIPLIER as u64) as usize;

/// Vendor capability `cfg_type`s (virtio 1.2, 4.1.4).
const CAP_COMMON_CFG: u8 = 1;
const CAP_NOTIFY_CFG: u8 = 2;
const CAP_ISR_CFG: u8 = 3;
const CAP_DEVICE_CFG: u8 = 4;
const CAP_PCI_CFG: u8 = 5;
const CAP_VENDOR: u8 = 0x09;
/// `virtio_pci_cap`'s fields after the header: bar, id, padding, offset, length; `pci_cfg_data` after that.
const CAP_BAR: usize = 4;
const CAP_OFFSET: usize = 8;
const CAP_LENGTH: usize = 12;
const PCI_CFG_DATA: usize = 16;

/// Common configuration registers (virtio 1.2, 4.1.4.3).
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const CONFIG_MSIX_VECTOR: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;
const QUEUE_NOTIFY_DATA: u64 = 0x38;
const QUEUE_RESET: u64 = 0x3a;

static LOG: GuestErrorLog = GuestErrorLog::new("virtio-pci");

/// The PCI class a virtio device type presents (what `lspci` shows): QEMU's choices, so tools that look see the
/// same as with QEMU (a disk as a SCSI controller, virtio-blk's class before virtio 1.0).
pub fn class_code(device_type: u32) -> u32 {
    match device_type {
        TYPE_BLOCK => 0x01_00_00,
        TYPE_NET => 0x02_00_00,
        TYPE_CONSOLE => 0x07_80_00,
        // QEMU's PCI_CLASS_OTHERS for both.
        TYPE_RNG | TYPE_BALLOON => 0x00_ff_00,
        _ => 0x00_ff_00,
    }
}

/// The vectors the driver chose, and the table they index.
struct PciVectors {
    config: AtomicU16,
    queues: Vec<AtomicU16>,
    msix: Arc<Mutex<MsixTable>>,
}

impl PciVectors {
    fn trigger(&self, vector: u16) {
        if vector != NO_VECTOR {
            lock_table(&self.msix).trigger(usize::from(vector));
        }
    }

    fn reset(&self) {
        self.config.store(NO_VECTOR, Ordering::SeqCst);
        for q in &self.queues {
            q.store(NO_VECTOR, Ordering::SeqCst);
        }
    }

    /// What a vector register takes: an existing table entry or [`NO_VECTOR`]; anything else becomes
    /// [`NO_VECTOR`], which is how the driver learns it was refused.
    fn checked(&self, vector: u16) -> u16 {
        if usize::from(vector) < lock_table(&self.msix).len() {
            vector
        } else {
            NO_VECTOR
        }
    }
}

/// A virtio-pci function as data: its configuration space and MSI-X table, the vectors the driver chose, and the
/// virtio device behind it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtioPciState {
    pub config_space: ConfigSpaceState,
    pub msix: MsixTableState,
    /// `config_msix_vector`: an MSI-X table entry or [`NO_VECTOR`].
    pub config_vector: u16,
    /// Each queue's `queue_msix_vector`, in queue order.
    pub queue_vectors: Vec<u16>,
    pub virtio: VirtioState,
}

impl VectorDelivery for PciVectors {
    fn signal_queue(&self, index: usize) {
        if let Some(vector) = self.queues.get(index) {
            self.trigger(vector.load(Ordering::SeqCst));
        }
    }

    fn signal_config(&self) {
        self.trigger(self.config.load(Ordering::SeqCst));
    }
}

fn lock_table(table: &Mutex<MsixTable>) -> MutexGuard<'_, MsixTable> {
    table.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct VirtioPciDevice {
    config: ConfigSpace,
    state: TransportState,
    vectors: Arc<PciVectors>,
    msix: Arc<Mutex<MsixTable>>,
    msix_capability: usize,
    pci_cfg_capability: usize,
    qdev_id: String,
}

impl VirtioPciDevice {
    /// A function for `device`, working on `mem`, sending MSI-X messages through `msi`, named `qdev_id` for QMP.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        msi: Arc<dyn MsiSender>,
        qdev_id: String,
    ) -> io::Result<Self> {
        let (device_type, queue_count) = {
            let d = lock_device(&device);
            (d.device_type(), d.queue_max_sizes().len())
        };
        if queue_count >= MAX_VECTORS || queue_count > MAX_QUEUES {
            return Err(io::Error::other(format!("virtio-pci cannot serve {queue_count} queues")));
        }
        let msix = Arc::new(Mutex::new(MsixTable::new(queue_count + 1, msi)));
        let vectors = Arc::new(PciVectors {
            config: AtomicU16::new(NO_VECTOR),
            queues: (0..queue_count).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
            msix: msix.clone(),
        });
        let interrupt = Arc::new(VirtioInterrupt::with_vectors(vectors.clone()));
        let state = TransportState::new(mem, device, interrupt, &LOG)?;
        let identity = PciIdentity {
            vendor_id: VENDOR_ID,
            device_id: DEVICE_ID_BASE + device_type as u16,
            subsystem_vendor_id: VENDOR_ID,
            subsystem_id: SUBSYSTEM_ID,
            revision: REVISION,
            class_code: class_code(device_type),
        };
        let (config, msix_capability, pci_cfg_capability) =
            Self::config_space(identity, queue_count).map_err(|e| io::Error::other(e.to_string()))?;
        Ok(VirtioPciDevice { config, state, vectors, msix, msix_capability, pci_cfg_capability, qdev_id })
    }

    fn config_space(
        identity: PciIdentity,
        queue_count: usize,
    ) -> Result<(ConfigSpace, usize, usize), crate::pci::config::ConfigError> {
        let mut config = ConfigSpace::new(identity);
        config.add_bar(VIRTIO_BAR, Bar { size: VIRTIO_BAR_SIZE, prefetchable: false })?;
        config.add_bar(MSIX_BAR, Bar { size: MSIX_BAR_SIZE, prefetchable: false })?;
        let notify_len = (queue_count as u32 * NOTIFY_OFF_MULTIPLIER).max(NOTIFY_OFF_MULTIPLIER);
        let regions = [
            (CAP_COMMON_CFG, COMMON_CFG_OFFSET as u32, COMMON_CFG_LEN as u32),
            (CAP_NOTIFY_CFG, NOTIFY_OFFSET as u32, notify_len),
            (CAP_ISR_CFG, ISR_OFFSET as u32, 1),
            (CAP_DEVICE_CFG, DEVICE_CFG_OFFSET as u32, DEVICE_CFG_LEN as u32),
        ];
        for (cfg_type, offset, length) in regions {
            let mut cap = vendor_capability(cfg_type, VIRTIO_BAR as u8, offset, length);
            if cfg_type == CAP_NOTIFY_CFG {
                cap.extend_from_slice(&NOTIFY_OFF_MULTIPLIER.to_le_bytes());
            }
            config.add_capability(&cap)?;
        }
        // The PCI configuration access capability: the driver picks bar, offset and length, then goes through
        // pci_cfg_data.
        let mut cap = vendor_capability(CAP_PCI_CFG, 0, 0, 0);
        cap.extend_from_slice(&[0; 4]);
        let pci_cfg = config.add_capability(&cap)?;
        config.set_writable(pci_cfg + CAP_BAR, &[0xff]);
        config.set_writable(pci_cfg + CAP_OFFSET, &[0xff; 8]);
        let layout = MsixLayout {
            vectors: queue_count + 1,
            table_bar: MSIX_BAR as u8,
            table_offset: 0,
            pba_bar: MSIX_BAR as u8,
            pba_offset: MSIX_PBA_OFFSET as u32,
        };
        let msix_cap = msix::add_capability(&mut config, layout)?;
        Ok((config, msix_cap, pci_cfg))
    }

    /// Stops the device's work on guest memory, for a snapshot (see [`transport`](super::transport)).
    pub fn quiesce(&self) {
        self.state.quiesce();
    }

    /// Lets a quiesced or restored device work again; every queue counts as notified.
    pub fn resume(&self) {
        self.state.resume();
    }

    /// Where each queue's notifications arrive: (BAR, offset in it, the queue's eventfd), in queue order.
    pub fn notifiers(&self) -> impl Iterator<Item = (usize, u64, &EventFd)> {
        self.state
            .queue_events()
            .iter()
            .enumerate()
            .map(|(i, event)| (VIRTIO_BAR, NOTIFY_OFFSET + i as u64 * u64::from(NOTIFY_OFF_MULTIPLIER), event))
    }

    pub fn queue_events(&self) -> &[EventFd] {
        self.state.queue_events()
    }

    pub fn queue_handler(&self) -> QueueHandler {
        self.state.queue_handler()
    }

    pub fn interrupt(&self) -> &Arc<VirtioInterrupt> {
        self.state.interrupt()
    }

    fn read_common(&self, offset: u64, len: usize) -> Option<u64> {
        let state = &self.state;
        let queue = state.selected_queue();
        let queue_vector = || {
            let v = self.vectors.queues.get(usize::from(state.queue_sel as u16));
            v.filter(|_| queue.is_some()).map_or(NO_VECTOR, |v| v.load(Ordering::SeqCst))
        };
        let value = match (offset, len) {
            (DEVICE_FEATURE_SELECT, 4) => u64::from(state.device_features_sel),
            (DEVICE_FEATURE, 4) => u64::from(state.device_features()),
            (DRIVER_FEATURE_SELECT, 4) => u64::from(state.driver_features_sel),
            (DRIVER_FEATURE, 4) => u64::from(state.driver_features_word()),
            (CONFIG_MSIX_VECTOR, 2) => u64::from(self.vectors.config.load(Ordering::SeqCst)),
            (NUM_QUEUES, 2) => state.queues.len() as u64,
            (DEVICE_STATUS, 1) => u64::from(state.status() as u8),
            (CONFIG_GENERATION, 1) => u64::from(state.interrupt().config_generation() as u8),
            (QUEUE_SELECT, 2) => u64::from(state.queue_sel as u16),
            // An absent queue has size 0: "not available".
            (QUEUE_SIZE, 2) => queue.map_or(0, |q| u64::from(q.size)),
            (QUEUE_MSIX_VECTOR, 2) => u64::from(queue_vector()),
            (QUEUE_ENABLE, 2) => queue.map_or(0, |q| u64::from(q.ready)),
            (QUEUE_NOTIFY_OFF, 2) => queue.map_or(0, |_| u64::from(state.queue_sel)),
            (QUEUE_NOTIFY_DATA | QUEUE_RESET, 2) => 0,
            (QUEUE_DESC..QUEUE_NOTIFY_DATA, 4 | 8) => {
                let q = queue.copied().unwrap_or_default();
                let field = match offset & !7 {
                    QUEUE_DESC => q.desc,
                    QUEUE_DRIVER => q.driver,
                    QUEUE_DEVICE => q.device,
                    _ => return None,
                };
                match (offset & 7, len) {
                    (0, 8) => field,
                    (0, 4) => field & 0xffff_ffff,
                    (4, 4) => field >> 32,
                    _ => return None,
                }
            }
            _ => return None,
        };
        Some(value)
    }

    fn write_common(&mut self, offset: u64, len: usize, value: u64) -> bool {
        let state = &mut self.state;
        match (offset, len) {
            (DEVICE_FEATURE_SELECT, 4) => state.device_features_sel = value as u32,
            (DRIVER_FEATURE_SELECT, 4) => state.driver_features_sel = value as u32,
            (DRIVER_FEATURE, 4) => state.write_driver_features(value as u32),
            (CONFIG_MSIX_VECTOR, 2) => {
                let vector = self.vectors.checked(value as u16);
                self.vectors.config.store(vector, Ordering::SeqCst);
            }
            (DEVICE_STATUS, 1) => {
                state.write_status(value as u32);
                if value == 0 {
                    self.vectors.reset();
                }
            }
            (QUEUE_SELECT, 2) => state.queue_sel = value as u32,
            (QUEUE_SIZE, 2) => state.configure_selected_queue(|q| q.size = value as u16),
            (QUEUE_MSIX_VECTOR, 2) => {
                // Routing only: harmless at any time, and Linux clears vectors after DRIVER_OK when it tears down.
                let vector = self.vectors.checked(value as u16);
                if let Some(slot) = self.vectors.queues.get(state.queue_sel as usize) {
                    slot.store(vector, Ordering::SeqCst);
                }
            }
            (QUEUE_ENABLE, 2) => state.write_queue_ready(value as u32),
            (QUEUE_DESC..QUEUE_NOTIFY_DATA, 4 | 8) => {
                let (half, len) = (offset & 7, len);
                if !matches!((half, len), (0, 8) | (0, 4) | (4, 4)) {
                    return false;
                }
                type Field = fn(&mut QueueConfig) -> &mut u64;
                let select: Field = match offset & !7 {
                    QUEUE_DESC => |q| &mut q.desc,
                    QUEUE_DRIVER => |q| &mut q.driver,
                    QUEUE_DEVICE => |q| &mut q.device,
                    _ => return false,
                };
                state.configure_selected_queue(|q| {
                    let field = select(q);
                    *field = match (half, len) {
                        (0, 8) => value,
                        (0, _) => (*field & !0xffff_ffff) | (value & 0xffff_ffff),
                        _ => (*field & 0xffff_ffff) | (value << 32),
                    };
                });
            }
            // Read-only registers.
            (DEVICE_FEATURE, 4) | (NUM_QUEUES, 2) | (CONFIG_GENERATION, 1) | (QUEUE_NOTIFY_OFF, 2) => {}
            (QUEUE_NOTIFY_DATA | QUEUE_RESET, 2) => {}
            _ => return false,
        }
        true
    }

    fn read_virtio_bar(&mut self, offset: u64, data: &mut [u8]) {
        if offset < COMMON_CFG_LEN {
            match self.read_common(offset, data.len()) {
                Some(value) => data.copy_from_slice(&value.to_le_bytes()[..data.len()]),
                None => {
                    LOG.report(format_args!("{}-byte common config read at {offset:#x} ignored", data.len()));
                    data.fill(0);
                }
            }
        } else if offset == ISR_OFFSET {
            // Reading the ISR acknowledges it.
            let isr = self.state.interrupt().take_status() as u8;
            crate::bus::reply_byte(data, isr);
        } else if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_LEN).contains(&offset) {
            lock_device(self.state.device()).read_config(offset - DEVICE_CFG_OFFSET, data);
        } else {
            data.fill(0);
        }
    }

    fn write_virtio_bar(&mut self, offset: u64, data: &[u8]) {
        if offset < COMMON_CFG_LEN {
            let mut bytes = [0u8; 8];
            bytes[..data.len()].copy_from_slice(data);
            if !self.write_common(offset, data.len(), u64::from_le_bytes(bytes)) {
                LOG.report(format_args!("{}-byte common config write at {offset:#x} ignored", data.len()));
            }
        } else if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_LEN).contains(&offset) {
            lock_device(self.state.device()).write_config(offset - DEVICE_CFG_OFFSET, data);
        } else if offset >= NOTIFY_OFFSET {
            let queue = (offset - NOTIFY_OFFSET) / u64::from(NOTIFY_OFF_MULTIPLIER);
            // Absent queues: `notify` drops it.
            self.state.notify(queue as usize);
        }
    }

    /// The BAR access a `virtio_pci_cfg_cap` window describes, if it is one the device can do: an existing
    /// BAR, 1, 2 or 4 bytes, naturally aligned, inside the BAR, and accessed with that width.
    fn pci_cfg_target(&self, offset: usize, len: usize) -> Option<(usize, u64)> {
        let cap = self.pci_cfg_capability;
        if offset != cap + PCI_CFG_DATA {
            return None;
        }
        let bar = usize::from(self.config.u8_at(cap + CAP_BAR));
        let bar_offset = u64::from(self.config.u32_at(cap + CAP_OFFSET));
        let length = self.config.u32_at(cap + CAP_LENGTH) as usize;
        let size = self.config.bar(bar)?.size;
        let valid = matches!(length, 1 | 2 | 4)
            && length == len
            && bar_offset.is_multiple_of(length as u64)
            && bar_offset + length as u64 <= size;
        valid.then_some((bar, bar_offset))
    }
}

impl Persist for VirtioPciDevice {
    type State = VirtioPciState;

    fn save(&self) -> VirtioPciState {
        VirtioPciState {
            config_space: self.config.save(),
            msix: lock_table(&self.msix).save(),
            config_vector: self.vectors.config.load(Ordering::SeqCst),
            queue_vectors: self.vectors.queues.iter().map(|v| v.load(Ordering::SeqCst)).collect(),
            virtio: self.state.save(),
        }
    }

    /// The configuration space and the MSI-X table are restored into copies and checked together (the capability's
    /// enable and mask bits must be the table's), the vectors against the table; the virtio state goes last, and
    /// only when it loads are the copies and vectors swapped in. Where the BARs now decode is the PCI root's
    /// business ([`PciRoot::refresh_all`](crate::pci::PciRoot::refresh_all)).
    fn restore(&mut self, state: &VirtioPciState) -> Result<(), StateError> {
        let mut config = self.config.clone();
        config.restore(&state.config_space)?;
        let mut table = lock_table(&self.msix).clone();
        table.restore(&state.msix)?;
        msix::check_control(&config, self.msix_capability, &table)?;
        let device = super::device_name(self.state.device_type);
        if state.queue_vectors.len() != self.vectors.queues.len() {
            let problem = format!(
                "{} in the snapshot, this device has {} queues",
                state.queue_vectors.len(),
                self.vectors.queues.len()
            );
            return Err(StateError::new(device, "queue_vectors", problem));
        }
        let vectors = std::iter::once(("config_vector".to_string(), state.config_vector))
            .chain(state.queue_vectors.iter().enumerate().map(|(i, &v)| (format!("queue_vectors[{i}]"), v)));
        for (field, vector) in vectors {
            if vector != NO_VECTOR && usize::from(vector) >= table.len() {
                let problem = format!("{vector}, and the MSI-X table has {} entries", table.len());
                return Err(StateError::new(device, field, problem));
            }
        }
        self.state.restore(&state.virtio)?;
        self.config = config;
        *lock_table(&self.msix) = table;
        self.vectors.config.store(state.config_vector, Ordering::SeqCst);
        for (slot, &vector) in self.vectors.queues.iter().zip(&state.queue_vectors) {
            slot.store(vector, Ordering::SeqCst);
        }
        Ok(())
    }
}

/// A `virtio_pci_cap` of `cfg_type` for `length` bytes at `offset` in `bar` (16 bytes; `cap_next` filled in by
/// the configuration space).
fn vendor_capability(cfg_type: u8, bar: u8, offset: u32, length: u32) -> Vec<u8> {
    let mut cap = vec![CAP_VENDOR, 0, 16, cfg_type, bar, 0, 0, 0];
    cap.extend_from_slice(&offset.to_le_bytes());
    cap.extend_from_slice(&length.to_le_bytes());
    if cfg_type == CAP_NOTIFY_CFG || cfg_type == CAP_PCI_CFG {
        cap[2] = 20;
    }
    cap
}

impl PciDevice for VirtioPciDevice {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        match self.pci_cfg_target(offset, data.len()) {
            Some((bar, bar_offset)) => self.read_bar(bar, bar_offset, data),
            None => self.config.read(offset, data),
        }
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        if let Some((bar, bar_offset)) = self.pci_cfg_target(offset, data.len()) {
            self.write_bar(bar, bar_offset, data);
            return;
        }
        self.config.write(offset, data);
        let control = self.msix_capability..self.msix_capability + 4;
        if offset < control.end && offset + data.len() > control.start {
            msix::sync_control(&self.config, self.msix_capability, &mut lock_table(&self.msix));
        }
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if data.len() > 8 {
            data.fill(0);
            return;
        }
        match bar {
            VIRTIO_BAR => self.read_virtio_bar(offset, data),
            MSIX_BAR if offset < MSIX_PBA_OFFSET => lock_table(&self.msix).read_table(offset, data),
            MSIX_BAR => lock_table(&self.msix).read_pba(offset - MSIX_PBA_OFFSET, data),
            _ => data.fill(0),
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if data.len() > 8 {
            return;
        }
        match bar {
            VIRTIO_BAR => self.write_virtio_bar(offset, data),
            MSIX_BAR if offset < MSIX_PBA_OFFSET => lock_table(&self.msix).write_table(offset, data),
            _ => {}
        }
    }

    /// A PCI reset is a virtio reset too, and MSI-X starts over.
    fn reset(&mut self) {
        self.config.reset();
        self.state.reset();
        self.vectors.reset();
        lock_table(&self.msix).reset();
    }

    fn qdev_id(&self) -> String {
        self.qdev_id.clone()
    }
}

#[cfg(test)]
mod tests;

//! A PCI bus: bus 0 of one host bridge, reached through the PC's configuration ports (0xCF8/0xCFC) and an ECAM
//! window, with 32-bit memory BARs in one MMIO window and MSI-X.
//!
//! # Wiring (for the VMM)
//!
//! * Build a [`PciRoot`] for the MMIO window, [`PciRoot::add`] the devices (slot 0 holds the [`HostBridge`]); the
//!   root places their BARs in the window, as firmware would, and enables memory decoding, so the guest can keep
//!   them as they are.
//! * Put [`PciConfigIo`] on the port bus at 0xCF8 (8 ports), [`PciEcam`] on the MMIO bus at the ECAM base
//!   ([`ECAM_BUS_SIZE`] bytes for bus 0) and a [`PciMmioWindow`] on the MMIO bus over each window. A window
//!   routes each access to whichever BAR decodes its address *now*, so a guest that moves a BAR (inside a
//!   window) reaches the device at the new address without the MMIO bus changing. Besides the window the root
//!   places BARs in, [`PciRoot::add_window`] adds windows the guest may move BARs to (PC firmware places them
//!   itself, where it was built to). BARs moved outside every window do not decode (Linux keeps BARs inside the
//!   host bridge's `_CRS` windows).
//! * Things that live outside the bus and follow a BAR (the hypervisor's ioeventfds on notification addresses)
//!   learn about moves through the [`BarObserver`] given to [`PciRoot::new`]: it hears every change of a BAR's
//!   decoded address, `None` meaning "not decoded" (memory decoding off, as while Linux sizes a BAR, or the BAR
//!   outside the window). Sizing therefore unmaps a BAR only until the guest writes the address back and
//!   re-enables decoding.
//! * After loading saved state into the functions (their configuration spaces, so their BAR addresses), call
//!   [`PciRoot::refresh_all`]: routing follows the restored BARs and the observer hears where they went.

pub mod config;
pub mod msix;

use std::sync::{Arc, Mutex, MutexGuard, RwLock};

pub use config::{Bar, ConfigSpace, ConfigSpaceState, PciIdentity};
pub use msix::{MsiSender, MsixTable, MsixTableState, MsixVectorState};
use serde::{Deserialize, Serialize};

use crate::{BusDevice, Persist, StateError};

/// Devices per bus (one function each here).
pub const SLOTS: usize = 32;
/// ECAM bytes per bus: 32 devices x 8 functions x 4 KiB.
pub const ECAM_BUS_SIZE: u64 = 1 << 20;
/// The configuration ports: address at 0xCF8, data at 0xCFC..0xCFF.
pub const CONFIG_IO_PORT: u16 = 0xcf8;
pub const CONFIG_IO_LEN: u64 = 8;

/// A PCI function as the bus sees it. Runs with the function's `Mutex` held, on vCPU threads.
pub trait PciDevice: Send {
    fn config(&self) -> &ConfigSpace;
    fn config_mut(&mut self) -> &mut ConfigSpace;

    /// A configuration read; functions with registers that have side effects override this.
    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        self.config().read(offset, data)
    }

    /// A configuration write; functions that react to their registers override this.
    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config_mut().write(offset, data)
    }

    /// A guest access to BAR `bar` at `offset` (inside the BAR's size).
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]);

    /// Back to the power-on state (BARs where the VMM placed them).
    fn reset(&mut self) {
        self.config_mut().reset()
    }

    /// The name QMP reports (QEMU's qdev id), empty if none.
    fn qdev_id(&self) -> String {
        String::new()
    }
}

/// Hears where BARs decode after each guest configuration write that changed it.
pub trait BarObserver: Send + Sync {
    /// BAR `bar` of the device in `slot` decoded at `from` and now at `to` (`None`: not decoded).
    fn bar_moved(&self, slot: u8, bar: usize, from: Option<u64>, to: Option<u64>);
}

/// One BAR of a function, for QMP's `query-pci`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciBarInfo {
    pub index: usize,
    pub address: u64,
    pub size: u64,
    pub is_64bit: bool,
    pub prefetchable: bool,
    pub is_io: bool,
}

/// A function's summary, for QMP's `query-pci`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciFunctionInfo {
    pub slot: u8,
    pub function: u8,
    pub vendor_id: u16,
    pub device_id: u16,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
    pub revision: u8,
    pub class_code: u32,
    pub irq_pin: u8,
    pub bars: Vec<PciBarInfo>,
    pub qdev_id: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("no free PCI slot for another device")]
    NoSlot,
    #[error("the PCI MMIO window has no room for a {0:#x}-byte BAR")]
    WindowFull(u64),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
}

type Function = Arc<Mutex<dyn PciDevice>>;

/// Where a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Mapping {
    start: u64,
    size: u64,
    slot: u8,
    bar: usize,
}

/// Bus 0: its functions, the MMIO windows their BARs live in, and where each BAR decodes now.
pub struct PciRoot {
    slots: Vec<Option<Function>>,
    /// (start, size) of each window; [`PciRoot::add`] places BARs in the first.
    windows: Vec<(u64, u64)>,
    /// Next free address for [`PciRoot::add`]'s BAR placement.
    next_bar_address: u64,
    mappings: RwLock<Vec<Mapping>>,
    observer: Option<Arc<dyn BarObserver>>,
}

impl PciRoot {
    /// An empty bus whose BARs go in `window_start..window_start + window_size` (below 4 GiB).
    pub fn new(window_start: u64, window_size: u64, observer: Option<Arc<dyn BarObserver>>) -> Self {
        PciRoot {
            slots: (0..SLOTS).map(|_| None).collect(),
            windows: vec![(window_start, window_size)],
            next_bar_address: window_start,
            mappings: RwLock::new(Vec::new()),
            observer,
        }
    }

    /// Adds a window where BARs decode once the guest moves them there; [`PciRoot::add`] places none in it. It
    /// must not overlap another window.
    pub fn add_window(&mut self, start: u64, size: u64) {
        self.windows.push((start, size));
    }

    /// Whether a BAR at `start` of `size` bytes lies wholly inside one window, and so decodes.
    fn in_a_window(&self, start: u64, size: u64) -> bool {
        self.windows.iter().any(|&(window, window_size)| {
            start >= window && start.checked_add(size).is_some_and(|end| end <= window + window_size)
        })
    }

    /// Puts `device` in the first free slot, places its BARs (each aligned to its size) and enables memory
    /// decoding; that is also the state a reset returns it to. Returns the slot.
    pub fn add(&mut self, device: Function) -> Result<u8, Error> {
        let slot = self.slots.iter().position(Option::is_none).ok_or(Error::NoSlot)?;
        {
            let mut d = lock(&device);
            let config = d.config_mut();
            let mut next = self.next_bar_address;
            for index in 0..config::BAR_COUNT {
                let Some(bar) = config.bar(index) else { continue };
                let address = next.next_multiple_of(bar.size);
                let (window_start, window_size) = self.windows[0];
                if address + bar.size > window_start + window_size {
                    return Err(Error::WindowFull(bar.size));
                }
                config.set_bar_address(index, address)?;
                next = address + bar.size;
            }
            let command = config.command() | config::COMMAND_MEMORY_SPACE | config::COMMAND_BUS_MASTER;
            config.set_command(command);
            config.commit_power_on_state();
            self.next_bar_address = next;
        }
        self.slots[slot] = Some(device);
        let slot = slot as u8;
        self.refresh(slot);
        Ok(slot)
    }

    /// The slot [`add`](Self::add) puts the next device in, if any is free: a function that must know its own
    /// address (its requester ID, which MSIs carry) learns it before it is added.
    pub fn next_free_slot(&self) -> Option<u8> {
        self.slots.iter().position(Option::is_none).map(|slot| slot as u8)
    }

    pub fn device(&self, slot: u8) -> Option<&Function> {
        self.slots.get(usize::from(slot))?.as_ref()
    }

    /// Where `slot`'s BARs decode now: (BAR index, address).
    pub fn decoded_bars(&self, slot: u8) -> Vec<(usize, u64)> {
        let mappings = self.mappings.read().unwrap_or_else(|p| p.into_inner());
        mappings.iter().filter(|m| m.slot == slot).map(|m| (m.bar, m.start)).collect()
    }

    /// A configuration read of bus 0, device `slot`, function `function`. Absent functions read all ones.
    pub fn read_config(&self, slot: u8, function: u8, offset: usize, data: &mut [u8]) {
        match self.device(slot).filter(|_| function == 0) {
            Some(device) => lock(device).read_config(offset, data),
            None => data.fill(0xff),
        }
    }

    /// A configuration write; absent functions ignore it. Changes of where BARs decode reach the observer.
    pub fn write_config(&self, slot: u8, function: u8, offset: usize, data: &[u8]) {
        if let Some(device) = self.device(slot).filter(|_| function == 0) {
            lock(device).write_config(offset, data);
            self.refresh(slot);
        }
    }

    /// Recomputes where every function's BARs decode and tells the observer what moved: after the functions'
    /// states were loaded behind the bus's back (a snapshot restore). The bus holds no state of its own; where
    /// BARs decode follows from the functions' configuration spaces.
    pub fn refresh_all(&self) {
        for slot in 0..SLOTS as u8 {
            self.refresh(slot);
        }
    }

    /// Recomputes `slot`'s mappings from its configuration space and tells the observer what moved.
    fn refresh(&self, slot: u8) {
        let Some(device) = self.device(slot) else { return };
        let decoded: Vec<Mapping> = lock(device)
            .config()
            .decoded_bars()
            .into_iter()
            .filter(|&(_, start, size)| self.in_a_window(start, size))
            .map(|(bar, start, size)| Mapping { start, size, slot, bar })
            .collect();
        let mut moves = Vec::new();
        {
            let mut mappings = self.mappings.write().unwrap_or_else(|p| p.into_inner());
            for bar in 0..config::BAR_COUNT {
                let find = |list: &[Mapping]| list.iter().find(|m| m.slot == slot && m.bar == bar).map(|m| m.start);
                let (from, to) = (find(&mappings), find(&decoded));
                if from != to {
                    moves.push((bar, from, to));
                }
            }
            mappings.retain(|m| m.slot != slot);
            mappings.extend(decoded);
        }
        if let Some(observer) = &self.observer {
            for (bar, from, to) in moves {
                observer.bar_moved(slot, bar, from, to);
            }
        }
    }

    /// The function and BAR decoding `[address, address + len)`, with the offset into the BAR. Where two BARs
    /// overlap (a guest may program that), the first one placed wins.
    fn route(&self, address: u64, len: usize) -> Option<(Function, usize, u64)> {
        let end = address.checked_add(len as u64)?;
        let mappings = self.mappings.read().unwrap_or_else(|p| p.into_inner());
        let m = mappings.iter().find(|m| address >= m.start && end <= m.start + m.size)?;
        Some((self.device(m.slot)?.clone(), m.bar, address - m.start))
    }

    /// Every function's summary, by slot.
    pub fn functions(&self) -> Vec<PciFunctionInfo> {
        let mut infos = Vec::new();
        for (slot, device) in self.slots.iter().enumerate() {
            let Some(device) = device else { continue };
            let d = lock(device);
            let config = d.config();
            let identity = config.identity();
            let bars = (0..config::BAR_COUNT)
                .filter_map(|index| {
                    let bar = config.bar(index)?;
                    Some(PciBarInfo {
                        index,
                        address: config.bar_address(index)?,
                        size: bar.size,
                        is_64bit: false,
                        prefetchable: bar.prefetchable,
                        is_io: false,
                    })
                })
                .collect();
            infos.push(PciFunctionInfo {
                slot: slot as u8,
                function: 0,
                vendor_id: identity.vendor_id,
                device_id: identity.device_id,
                subsystem_vendor_id: identity.subsystem_vendor_id,
                subsystem_id: identity.subsystem_id,
                revision: identity.revision,
                class_code: identity.class_code,
                irq_pin: config.u8_at(config::INTERRUPT_PIN),
                bars,
                qdev_id: d.qdev_id(),
            });
        }
        infos
    }

    /// Resets every function (machine reset). The observer is not told: the VM it would update is gone, and
    /// whoever builds the next one asks [`decoded_bars`](Self::decoded_bars).
    pub fn reset(&self) {
        let mut all = Vec::new();
        for (slot, device) in self.slots.iter().enumerate() {
            let Some(device) = device else { continue };
            let mut d = lock(device);
            d.reset();
            for (bar, start, size) in d.config().decoded_bars() {
                if self.in_a_window(start, size) {
                    all.push(Mapping { start, size, slot: slot as u8, bar });
                }
            }
        }
        *self.mappings.write().unwrap_or_else(|p| p.into_inner()) = all;
    }
}

/// A function whose lock was poisoned by a panicking vCPU thread is still the best state we have.
fn lock(device: &Mutex<dyn PciDevice>) -> MutexGuard<'_, dyn PciDevice + 'static> {
    device.lock().unwrap_or_else(|p| p.into_inner())
}

/// Configuration mechanism #1: the address register at 0xCF8 (enable bit, bus, device, function, register) and
/// the data window at 0xCFC..0xCFF, any access size there (a data access's byte offset adds to the register).
///
/// As on PC chipsets, only a dword access at 0xCF8 is the address register: a byte access to 0xCF9 is the reset
/// control register, which the VMM hands in as `reset_control` (it cannot sit on the port bus beside this
/// device); other narrow accesses to 0xCF8..0xCFB go nowhere.
pub struct PciConfigIo {
    root: Arc<PciRoot>,
    address: u32,
    reset_control: Option<Arc<Mutex<dyn BusDevice>>>,
}

const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;
const RESET_CONTROL_OFFSET: u64 = 1;

impl PciConfigIo {
    pub fn new(root: Arc<PciRoot>, reset_control: Option<Arc<Mutex<dyn BusDevice>>>) -> Self {
        PciConfigIo { root, address: 0, reset_control }
    }

    /// The target of a data access at byte `offset` of the data window, if the address register enables one
    /// on bus 0.
    fn target(&self, offset: usize, len: usize) -> Option<(u8, u8, usize)> {
        if self.address & CONFIG_ADDRESS_ENABLE == 0 || (self.address >> 16) & 0xff != 0 {
            return None;
        }
        let register = (self.address & 0xfc) as usize + offset;
        (register + len <= config::LEGACY_CONFIG_SPACE_SIZE).then_some((
            ((self.address >> 11) & 0x1f) as u8,
            ((self.address >> 8) & 7) as u8,
            register,
        ))
    }

    fn reset_control(&self, offset: u64, len: usize) -> Option<&Arc<Mutex<dyn BusDevice>>> {
        self.reset_control.as_ref().filter(|_| offset == RESET_CONTROL_OFFSET && len == 1)
    }
}

/// The configuration ports as data: the address register. (The reset control register beside it is a device of
/// its own, with its own state.)
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PciConfigIoState {
    pub address: u32,
}

impl Persist for PciConfigIo {
    type State = PciConfigIoState;

    fn save(&self) -> PciConfigIoState {
        PciConfigIoState { address: self.address }
    }

    /// Any address is one a guest can write: reserved bits and other buses just make accesses float.
    fn restore(&mut self, state: &PciConfigIoState) -> Result<(), StateError> {
        self.address = state.address;
        Ok(())
    }
}

fn lock_bus_device(device: &Mutex<dyn BusDevice>) -> MutexGuard<'_, dyn BusDevice + 'static> {
    device.lock().unwrap_or_else(|p| p.into_inner())
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(reset) = self.reset_control(offset, data.len()) {
            lock_bus_device(reset).read(0, data);
        } else if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&self.address.to_le_bytes());
        } else if offset >= 4 {
            match self.target(offset as usize - 4, data.len()) {
                Some((slot, function, register)) => self.root.read_config(slot, function, register, data),
                None => data.fill(0xff),
            }
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(reset) = self.reset_control(offset, data.len()) {
            lock_bus_device(reset).write(0, data);
        } else if let (0, Ok(bytes)) = (offset, <[u8; 4]>::try_from(data)) {
            self.address = u32::from_le_bytes(bytes);
        } else if offset >= 4 {
            if let Some((slot, function, register)) = self.target(offset as usize - 4, data.len()) {
                self.root.write_config(slot, function, register, data);
            }
        }
    }
}

/// The ECAM window for bus 0: device, function and register from the offset; 4 KiB per function.
pub struct PciEcam {
    root: Arc<PciRoot>,
}

impl PciEcam {
    pub fn new(root: Arc<PciRoot>) -> Self {
        PciEcam { root }
    }

    fn target(offset: u64, len: usize) -> Option<(u8, u8, usize)> {
        let register = (offset & 0xfff) as usize;
        let aligned = matches!(len, 1 | 2 | 4) && register.is_multiple_of(len);
        (offset < ECAM_BUS_SIZE && aligned).then_some((
            ((offset >> 15) & 0x1f) as u8,
            ((offset >> 12) & 7) as u8,
            register,
        ))
    }
}

impl BusDevice for PciEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match Self::target(offset, data.len()) {
            Some((slot, function, register)) => self.root.read_config(slot, function, register, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((slot, function, register)) = Self::target(offset, data.len()) {
            self.root.write_config(slot, function, register, data);
        }
    }
}

/// One of the BARs' MMIO windows, on the MMIO bus from `start`: each access goes to the BAR that decodes its
/// address now, or reads all ones.
pub struct PciMmioWindow {
    root: Arc<PciRoot>,
    start: u64,
}

impl PciMmioWindow {
    pub fn new(root: Arc<PciRoot>, start: u64) -> Self {
        PciMmioWindow { root, start }
    }
}

impl BusDevice for PciMmioWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let address = self.start + offset;
        match self.root.route(address, data.len()) {
            Some((device, bar, offset)) => lock(&device).read_bar(bar, offset, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let address = self.start + offset;
        if let Some((device, bar, offset)) = self.root.route(address, data.len()) {
            lock(&device).write_bar(bar, offset, data);
        }
    }
}

/// The host bridge at 00:00.0: identity only (Red Hat's generic PCIe host bridge ID, which Linux has no quirks
/// for), class 0x060000.
pub struct HostBridge {
    config: ConfigSpace,
}

impl HostBridge {
    pub const IDENTITY: PciIdentity = PciIdentity {
        vendor_id: 0x1b36,
        device_id: 0x0008,
        subsystem_vendor_id: 0x1af4,
        subsystem_id: 0x1100,
        revision: 0,
        class_code: 0x06_00_00,
    };

    pub fn new() -> Self {
        HostBridge { config: ConfigSpace::new(Self::IDENTITY) }
    }
}

impl Persist for HostBridge {
    type State = ConfigSpaceState;

    fn save(&self) -> ConfigSpaceState {
        self.config.save()
    }

    fn restore(&mut self, state: &ConfigSpaceState) -> Result<(), StateError> {
        self.config.restore(state)
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    fn read_bar(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write_bar(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::testing::through_json;

    /// A function with two BARs that records accesses.
    struct Probe {
        config: ConfigSpace,
        accesses: Vec<(usize, u64, usize)>,
    }

    impl Probe {
        fn new() -> Arc<Mutex<Probe>> {
            let mut config =
                ConfigSpace::new(PciIdentity { vendor_id: 0x1234, device_id: 0x11, ..HostBridge::IDENTITY });
            config.add_bar(0, Bar { size: 0x4000, prefetchable: false }).unwrap();
            config.add_bar(1, Bar { size: 0x1000, prefetchable: false }).unwrap();
            Arc::new(Mutex::new(Probe { config, accesses: Vec::new() }))
        }
    }

    impl PciDevice for Probe {
        fn config(&self) -> &ConfigSpace {
            &self.config
        }
        fn config_mut(&mut self) -> &mut ConfigSpace {
            &mut self.config
        }
        fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            self.accesses.push((bar, offset, data.len()));
            data.fill(bar as u8 + 1);
        }
        fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.accesses.push((bar, offset, data.len()));
        }
        fn qdev_id(&self) -> String {
            "probe0".into()
        }
    }

    /// (slot, BAR, from, to) as the observer heard them.
    type Move = (u8, usize, Option<u64>, Option<u64>);

    #[derive(Default)]
    struct Moves(Mutex<Vec<Move>>);

    impl BarObserver for Moves {
        fn bar_moved(&self, slot: u8, bar: usize, from: Option<u64>, to: Option<u64>) {
            self.0.lock().unwrap().push((slot, bar, from, to));
        }
    }

    const WINDOW: u64 = 0xc000_0000;

    fn bus() -> (Arc<PciRoot>, Arc<Mutex<Probe>>, Arc<Moves>) {
        let moves = Arc::new(Moves::default());
        let mut root = PciRoot::new(WINDOW, 0x1000_0000, Some(moves.clone()));
        assert_eq!(root.add(Arc::new(Mutex::new(HostBridge::new()))).unwrap(), 0);
        let probe = Probe::new();
        assert_eq!(root.add(probe.clone()).unwrap(), 1);
        moves.0.lock().unwrap().clear();
        (Arc::new(root), probe, moves)
    }

    fn cf8_read(io: &mut PciConfigIo, slot: u8, register: u8, len: usize) -> u32 {
        io.write(0, &(CONFIG_ADDRESS_ENABLE | u32::from(slot) << 11 | u32::from(register & 0xfc)).to_le_bytes());
        let mut data = [0u8; 4];
        io.read(4 + u64::from(register & 3), &mut data[..len]);
        u32::from_le_bytes(data)
    }

    #[test]
    fn config_ports_reach_functions_and_absent_ones_float() {
        let (root, _, _) = bus();
        let mut io = PciConfigIo::new(root.clone(), None);
        assert_eq!(cf8_read(&mut io, 0, 0, 4), 0x0008_1b36);
        assert_eq!(cf8_read(&mut io, 0, 0x0a, 2), 0x0600, "class from a word access at 0xCFE");
        assert_eq!(cf8_read(&mut io, 0, 0x0b, 1), 0x06);
        assert_eq!(cf8_read(&mut io, 1, 0, 4), 0x0011_1234);
        assert_eq!(cf8_read(&mut io, 2, 0, 4), 0xffff_ffff, "no device in slot 2");
        assert_eq!(cf8_read(&mut io, 31, 0, 4), 0xffff_ffff);
        // Function 1, bus 1 and a disabled address all float.
        for address in [CONFIG_ADDRESS_ENABLE | 1 << 8, CONFIG_ADDRESS_ENABLE | 1 << 16, 0] {
            io.write(0, &address.to_le_bytes());
            let mut data = [0u8; 4];
            io.read(4, &mut data);
            assert_eq!(data, [0xff; 4]);
        }
        // The address register reads back as a dword; narrow accesses (Linux's type-1 probe writes a byte to
        // 0xCFB) do not touch it.
        io.write(0, &0x8000_0000u32.to_le_bytes());
        io.write(3, &[0x01]);
        io.write(0, &[0x01, 0x02]);
        let mut data = [0u8; 4];
        io.read(0, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x8000_0000);
        // An access straddling address and data is ignored.
        io.read(2, &mut data);
        assert_eq!(data, [0xff; 4]);
        io.write(2, &[1, 2, 3, 4]);
    }

    /// Records byte writes.
    #[derive(Default)]
    struct ResetControl(Vec<u8>);

    impl BusDevice for ResetControl {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(0x42);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0.extend_from_slice(data);
        }
    }

    #[test]
    fn a_byte_at_0xcf9_is_the_reset_control_register() {
        let (root, _, _) = bus();
        let reset = Arc::new(Mutex::new(ResetControl::default()));
        let mut io = PciConfigIo::new(root, Some(reset.clone()));
        io.write(1, &[0x06]);
        let mut byte = [0u8];
        io.read(1, &mut byte);
        assert_eq!((reset.lock().unwrap().0.clone(), byte), (vec![6], [0x42]));
        // The dword address register is unaffected by it, and still works.
        assert_eq!(cf8_read(&mut io, 0, 0, 4), 0x0008_1b36);
        io.write(1, &[0x06, 0]);
        assert_eq!(reset.lock().unwrap().0, vec![6], "only byte accesses reach it");
    }

    #[test]
    fn ecam_reaches_the_extended_space_and_refuses_odd_accesses() {
        let (root, probe, _) = bus();
        let mut ecam = PciEcam::new(root);
        let mut data = [0u8; 4];
        ecam.read(1 << 15, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x0011_1234);
        ecam.read((1 << 15) + 0x100, &mut data);
        assert_eq!(data, [0; 4], "extended space of a function without extended capabilities");
        ecam.read((1 << 15) + 1, &mut data[..2]);
        assert_eq!(data[..2], [0xff, 0xff], "unaligned");
        ecam.read((5 << 15) | 3 << 12, &mut data);
        assert_eq!(data, [0xff; 4], "absent function");
        ecam.read(ECAM_BUS_SIZE, &mut data);
        assert_eq!(data, [0xff; 4]);
        let mut wide = [0u8; 8];
        ecam.read(1 << 15, &mut wide);
        assert_eq!(wide, [0xff; 8]);
        ecam.write((1 << 15) + config::COMMAND as u64, &0u16.to_le_bytes());
        assert_eq!(probe.lock().unwrap().config.command(), 0);
    }

    #[test]
    fn bars_are_placed_in_the_window_and_route_accesses() {
        let (root, probe, _) = bus();
        assert_eq!(root.decoded_bars(1), vec![(0, WINDOW), (1, WINDOW + 0x4000)]);
        let mut window = PciMmioWindow::new(root.clone(), WINDOW);
        let mut data = [0u8; 4];
        window.read(0x10, &mut data);
        assert_eq!(data, [1; 4]);
        window.write(0x4008, &data);
        window.read(0x5000, &mut data);
        assert_eq!(data, [0xff; 4], "past the last BAR");
        window.read(0x3ffe, &mut data);
        assert_eq!(data, [0xff; 4], "straddling the end of BAR 0");
        assert_eq!(probe.lock().unwrap().accesses, vec![(0, 0x10, 4), (1, 8, 4)]);
        let info = root.functions();
        assert_eq!(info.len(), 2);
        assert_eq!((info[1].slot, info[1].vendor_id, info[1].qdev_id.as_str()), (1, 0x1234, "probe0"));
        assert_eq!(info[1].bars.len(), 2);
        assert_eq!((info[1].bars[1].address, info[1].bars[1].size), (WINDOW + 0x4000, 0x1000));
        assert_eq!(info[0].class_code, 0x060000);
    }

    #[test]
    fn moving_a_bar_moves_its_routing_and_tells_the_observer() {
        let (root, probe, moves) = bus();
        let mut ecam = PciEcam::new(root.clone());
        let mut window = PciMmioWindow::new(root.clone(), WINDOW);
        let bar0 = (1 << 15) + config::BAR0 as u64;
        let command = (1 << 15) + config::COMMAND as u64;
        // Linux's sizing: decode off, all ones, read, restore, decode on. Nothing stays unmapped.
        ecam.write(command, &0u16.to_le_bytes());
        ecam.write(bar0, &u32::MAX.to_le_bytes());
        let mut data = [0u8; 4];
        ecam.read(bar0, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0xffff_c000);
        ecam.write(bar0, &(WINDOW as u32).to_le_bytes());
        ecam.write(command, &(config::COMMAND_MEMORY_SPACE).to_le_bytes());
        assert_eq!(root.decoded_bars(1), vec![(0, WINDOW), (1, WINDOW + 0x4000)]);
        assert_eq!(
            std::mem::take(&mut *moves.0.lock().unwrap()),
            vec![
                (1, 0, Some(WINDOW), None),
                (1, 1, Some(WINDOW + 0x4000), None),
                (1, 0, None, Some(WINDOW)),
                (1, 1, None, Some(WINDOW + 0x4000))
            ]
        );
        // Moving BAR 0 up: the old address floats, the new one reaches the device.
        ecam.write(bar0, &0xc100_0000u32.to_le_bytes());
        assert_eq!(*moves.0.lock().unwrap(), vec![(1, 0, Some(WINDOW), Some(0xc100_0000))]);
        window.read(0, &mut data);
        assert_eq!(data, [0xff; 4]);
        window.read(0x0100_0000, &mut data);
        assert_eq!(data, [1; 4]);
        // Outside the window a BAR does not decode.
        ecam.write(bar0, &0xf000_0000u32.to_le_bytes());
        assert_eq!(root.decoded_bars(1), vec![(1, WINDOW + 0x4000)]);
        // A reset puts everything back where the VMM placed it.
        root.reset();
        assert_eq!(root.decoded_bars(1), vec![(0, WINDOW), (1, WINDOW + 0x4000)]);
        assert_eq!(probe.lock().unwrap().config.bar_address(0), Some(WINDOW));
    }

    #[test]
    fn a_bar_moved_into_a_further_window_decodes_there_and_nowhere_else() {
        const FIRMWARE_WINDOW: u64 = 0xe010_0000;
        let moves = Arc::new(Moves::default());
        let mut root = PciRoot::new(WINDOW, 0x1000_0000, Some(moves.clone()));
        root.add_window(FIRMWARE_WINDOW, 0xfec0_0000 - FIRMWARE_WINDOW);
        root.add(Arc::new(Mutex::new(HostBridge::new()))).unwrap();
        let probe = Probe::new();
        root.add(probe.clone()).unwrap();
        assert_eq!(root.decoded_bars(1), vec![(0, WINDOW), (1, WINDOW + 0x4000)], "placed in the first window");
        let root = Arc::new(root);
        let mut ecam = PciEcam::new(root.clone());
        let mut window = PciMmioWindow::new(root.clone(), WINDOW);
        let mut firmware_window = PciMmioWindow::new(root.clone(), FIRMWARE_WINDOW);
        let bar0 = (1 << 15) + config::BAR0 as u64;
        // Where SeaBIOS puts them: top-down from 0xFEC00000.
        ecam.write(bar0, &0xfebf_8000u32.to_le_bytes());
        ecam.write(bar0 + 4, &0xfebf_c000u32.to_le_bytes());
        assert_eq!(root.decoded_bars(1), vec![(0, 0xfebf_8000), (1, 0xfebf_c000)]);
        assert_eq!(moves.0.lock().unwrap().last(), Some(&(1, 1, Some(WINDOW + 0x4000), Some(0xfebf_c000))));
        let mut data = [0u8; 4];
        firmware_window.read(0xfebf_c008 - FIRMWARE_WINDOW, &mut data);
        assert_eq!(data, [2; 4], "BAR 1 answers at its new address");
        window.read(0x4008, &mut data);
        assert_eq!(data, [0xff; 4], "and no longer at its old one");
        // Past the window's end (the IOAPIC's page) a BAR decodes nowhere.
        ecam.write(bar0 + 4, &0xfebf_f000u32.to_le_bytes());
        ecam.write(bar0, &0xfec0_0000u32.to_le_bytes());
        assert_eq!(root.decoded_bars(1), vec![(1, 0xfebf_f000)]);
        // Between the windows: nowhere either.
        ecam.write(bar0, &0xd000_0000u32.to_le_bytes());
        assert_eq!(root.decoded_bars(1), vec![(1, 0xfebf_f000)]);
        root.reset();
        assert_eq!(root.decoded_bars(1), vec![(0, WINDOW), (1, WINDOW + 0x4000)]);
    }

    #[test]
    fn a_full_window_or_bus_is_an_error() {
        let mut root = PciRoot::new(WINDOW, 0x8000, None);
        root.add(Probe::new()).unwrap();
        assert_eq!(root.add(Probe::new()), Err(Error::WindowFull(0x4000)));
        let mut root = PciRoot::new(WINDOW, 0x1000_0000, None);
        for _ in 0..SLOTS {
            root.add(Arc::new(Mutex::new(HostBridge::new()))).unwrap();
        }
        assert_eq!(root.add(Arc::new(Mutex::new(HostBridge::new()))), Err(Error::NoSlot));
    }

    #[test]
    fn restored_functions_decode_where_their_state_says_once_the_bus_refreshes() {
        let (root, probe, _) = bus();
        let mut ecam = PciEcam::new(root.clone());
        let bar0 = (1 << 15) + config::BAR0 as u64;
        ecam.write(bar0, &0xc100_0000u32.to_le_bytes());
        ecam.write(bar0 + 4, &0xf000_0000u32.to_le_bytes()); // BAR 1 out of the window
        let mut io = PciConfigIo::new(root.clone(), None);
        io.write(0, &(CONFIG_ADDRESS_ENABLE | 1 << 11 | config::BAR0 as u32).to_le_bytes());
        let function_state = through_json(&probe.lock().unwrap().config.save());
        let io_state = through_json(&io.save());

        // A new process: the same bus built from the same command line, then the saved state loaded.
        let (new_root, new_probe, moves) = bus();
        new_probe.lock().unwrap().config.restore(&function_state).unwrap();
        let mut new_io = PciConfigIo::new(new_root.clone(), None);
        new_io.restore(&io_state).unwrap();
        assert_eq!(new_root.decoded_bars(1), vec![(0, WINDOW), (1, WINDOW + 0x4000)], "nothing moves by itself");
        new_root.refresh_all();
        assert_eq!(new_root.decoded_bars(1), root.decoded_bars(1));
        assert_eq!(new_root.decoded_bars(1), vec![(0, 0xc100_0000)]);
        assert_eq!(
            *moves.0.lock().unwrap(),
            vec![(1, 0, Some(WINDOW), Some(0xc100_0000)), (1, 1, Some(WINDOW + 0x4000), None)]
        );
        // The address register was restored too: the data port reads the moved BAR.
        let mut data = [0u8; 4];
        new_io.read(4, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0xc100_0000);
        let mut window = PciMmioWindow::new(new_root.clone(), WINDOW);
        window.read(0x0100_0000, &mut data);
        assert_eq!(data, [1; 4], "the moved BAR reaches the device");
        // The host bridge's state is its configuration space.
        let bridge = HostBridge::new();
        let mut other = HostBridge::new();
        other.restore(&through_json(&bridge.save())).unwrap();
        let mut probe_config = Probe::new().lock().unwrap().config.clone();
        assert!(probe_config.restore(&bridge.save()).is_err(), "a host bridge's state is not a probe's");
    }
}

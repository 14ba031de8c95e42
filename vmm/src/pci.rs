//! A PCI bus for any platform: the host bridge and virtio-pci functions on bus 0, configuration through ECAM (and,
//! on a PC, ports 0xCF8/0xCFC), BARs in the platform's PCI MMIO windows (the one Kestrel places them in, and on a
//! PC the one firmware does), MSI-X messages (each with its function's requester ID) and queue notifiers that
//! follow the VM of the current boot. Where the windows are is the platform's [`PciWindows`].

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, RwLock};

use devices::pci::{BarObserver, HostBridge, MsiSender, PciConfigIo, PciEcam, PciFunctionInfo, PciMmioWindow, PciRoot};
use devices::virtio::pci::VirtioPciDevice;
use devices::{Bus, BusDevice};
use hypervisor::{IoEventAddress, Vm};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::snapshot::Component;
use crate::virtio::{spawn_worker, NamedDevice};
use crate::Error;

/// What the PCI devices need from a VM while it runs, whatever the hypervisor.
trait PciVm: Send + Sync {
    fn signal_msi(&self, address: u64, data: u32, device_id: u32) -> hypervisor::Result<()>;
    fn add_notifier(&self, event: &EventFd, address: u64) -> hypervisor::Result<()>;
    fn remove_notifier(&self, event: &EventFd, address: u64) -> hypervisor::Result<()>;
}

impl<V: Vm> PciVm for V {
    fn signal_msi(&self, address: u64, data: u32, device_id: u32) -> hypervisor::Result<()> {
        Vm::signal_msi(self, address, data, device_id)
    }
    /// Each queue has its own notify address, so a write of any value, at any width, notifies it.
    fn add_notifier(&self, event: &EventFd, address: u64) -> hypervisor::Result<()> {
        self.register_ioevent(event, IoEventAddress::Mmio(address), None)
    }
    fn remove_notifier(&self, event: &EventFd, address: u64) -> hypervisor::Result<()> {
        self.unregister_ioevent(event, IoEventAddress::Mmio(address), None)
    }
}

/// The VM of the current boot. The machine creates a new VM on every guest reset, and the devices outlive it, so
/// they reach it through here; between boots there is none and MSIs go nowhere.
#[derive(Default)]
struct CurrentVm(RwLock<Option<Arc<dyn PciVm>>>);

impl CurrentVm {
    fn get(&self) -> Option<Arc<dyn PciVm>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, vm: Option<Arc<dyn PciVm>>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = vm;
    }
}

/// One function's MSIs: to the current VM, with the function's requester ID (bus 0, function 0 of its slot).
struct FunctionMsi {
    vm: Arc<CurrentVm>,
    requester_id: u32,
}

impl FunctionMsi {
    fn new(vm: Arc<CurrentVm>, slot: u8) -> Self {
        FunctionMsi { vm, requester_id: requester_id(slot) }
    }
}

/// A function's requester ID: bus 0, device `slot`, function 0.
fn requester_id(slot: u8) -> u32 {
    u32::from(slot) << 3
}

impl MsiSender for FunctionMsi {
    fn send_msi(&self, address: u64, data: u32) -> io::Result<()> {
        let vm = self.vm.get().ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))?;
        vm.signal_msi(address, data, self.requester_id).map_err(|e| e.source)
    }
}

/// Where a platform puts its PCI bus.
#[derive(Clone, Copy, Debug)]
pub struct PciWindows {
    /// ECAM for bus 0.
    pub ecam_start: u64,
    pub ecam_size: u64,
    /// Where the BARs are placed (32-bit memory).
    pub mmio_start: u64,
    pub mmio_size: u64,
    /// `(start, size)` of a second window where BARs decode: where the PC's firmware (SeaBIOS) places them.
    pub firmware_mmio: Option<(u64, u64)>,
}

/// The PC's configuration ports: where, and the reset control register that shares them (0xCF9).
pub struct ConfigPorts<'a> {
    pub pio: &'a mut Bus,
    pub port: u16,
    pub count: u64,
    pub reset_control: Arc<Mutex<dyn BusDevice>>,
}

/// A queue's notification eventfd and where it sits: (BAR, offset in the BAR).
struct Notifier {
    bar: usize,
    offset: u64,
    event: EventFd,
}

/// Keeps the ioeventfds on the notification addresses where the guest put the BARs.
#[derive(Default)]
struct Notifiers {
    vm: Arc<CurrentVm>,
    by_slot: Mutex<HashMap<u8, Vec<Notifier>>>,
}

impl BarObserver for Notifiers {
    fn bar_moved(&self, slot: u8, bar: usize, from: Option<u64>, to: Option<u64>) {
        let Some(vm) = self.vm.get() else { return };
        let by_slot = self.by_slot.lock().unwrap_or_else(|p| p.into_inner());
        for n in by_slot.get(&slot).into_iter().flatten().filter(|n| n.bar == bar) {
            // A failure leaves that queue notified through MMIO exits instead, which still reach the eventfd.
            if let Some(from) = from {
                let _ = vm.remove_notifier(&n.event, from + n.offset);
            }
            if let Some(to) = to {
                if let Err(e) = vm.add_notifier(&n.event, to + n.offset) {
                    eprintln!("kestrel: PCI device {slot:02x}.0: queue notifier at {:#x}: {e}", to + n.offset);
                }
            }
        }
    }
}

/// A virtio-pci function, typed, for snapshots.
struct VirtioFunction {
    slot: u8,
    name: String,
    device: Arc<Mutex<VirtioPciDevice>>,
    /// Its place in the firmware's boot order (`bootindex=`). Only the PC boots firmware yet: read on x86_64
    /// only, hence the allowance (a platform without firmware has no boot order to give).
    #[allow(dead_code)]
    boot_index: Option<u32>,
}

/// Bus 0 and what follows the VM.
pub struct PciBus {
    root: Arc<PciRoot>,
    notifiers: Arc<Notifiers>,
    /// The PC's 0xCF8/0xCFC configuration mechanism, where the platform has it.
    config_io: Option<Arc<Mutex<PciConfigIo>>>,
    host_bridge: Arc<Mutex<HostBridge>>,
    functions: Vec<VirtioFunction>,
}

impl PciBus {
    /// The host bridge and a virtio-pci function per device, each with its worker thread; puts ECAM and the BAR
    /// window on `mmio` where `windows` says, and the configuration ports (with the reset register inside them)
    /// on theirs if the platform has them.
    pub fn new(
        mmio: &mut Bus,
        windows: PciWindows,
        config_ports: Option<ConfigPorts<'_>>,
        memory: &GuestMemoryMmap,
        devices: Vec<NamedDevice>,
    ) -> Result<Self, Error> {
        let notifiers = Arc::new(Notifiers::default());
        let mut root = PciRoot::new(windows.mmio_start, windows.mmio_size, Some(notifiers.clone()));
        if let Some((start, size)) = windows.firmware_mmio {
            root.add_window(start, size);
        }
        let pci_error = |e: devices::pci::Error| Error::Device(format!("PCI: {e}"));
        let host_bridge = Arc::new(Mutex::new(HostBridge::new()));
        root.add(host_bridge.clone()).map_err(pci_error)?;
        let mut functions = Vec::with_capacity(devices.len());
        for named in devices {
            let slot = root.next_free_slot().ok_or_else(|| pci_error(devices::pci::Error::NoSlot))?;
            let msi: Arc<dyn MsiSender> = Arc::new(FunctionMsi::new(notifiers.vm.clone(), slot));
            let function = VirtioPciDevice::new(memory.clone(), named.device, msi, named.qdev_id.clone())
                .map_err(|e| Error::Host("creating a virtio-pci device", e))?;
            let clone = |e: &EventFd| e.try_clone().map_err(|e| Error::Host("cloning an eventfd", e));
            let events = function.queue_events().iter().map(clone).collect::<Result<Vec<_>, _>>()?;
            spawn_worker(&named.name, events, function.queue_handler())?;
            let queue_notifiers = function
                .notifiers()
                .map(|(bar, offset, event)| Ok(Notifier { bar, offset, event: clone(event)? }))
                .collect::<Result<Vec<_>, Error>>()?;
            let function = Arc::new(Mutex::new(function));
            if root.add(function.clone()).map_err(pci_error)? != slot {
                return Err(Error::Device(format!("PCI: {} did not get slot {slot}", named.name)));
            }
            notifiers.by_slot.lock().unwrap_or_else(|p| p.into_inner()).insert(slot, queue_notifiers);
            functions.push(VirtioFunction { slot, name: named.name, device: function, boot_index: named.boot_index });
        }
        let root = Arc::new(root);
        let config_io = match config_ports {
            Some(ports) => {
                let config_io = Arc::new(Mutex::new(PciConfigIo::new(root.clone(), Some(ports.reset_control))));
                ports.pio.insert(config_io.clone(), u64::from(ports.port), ports.count)?;
                Some(config_io)
            }
            None => None,
        };
        let ecam = Arc::new(Mutex::new(PciEcam::new(root.clone())));
        mmio.insert(ecam, windows.ecam_start, windows.ecam_size)?;
        for (start, size) in std::iter::once((windows.mmio_start, windows.mmio_size)).chain(windows.firmware_mmio) {
            mmio.insert(Arc::new(Mutex::new(PciMmioWindow::new(root.clone(), start))), start, size)?;
        }
        Ok(PciBus { root, notifiers, config_io, host_bridge, functions })
    }

    /// Hands the devices a freshly created VM: MSIs go to it, and the queue notifiers are registered where the
    /// BARs decode now.
    pub fn attach<V: Vm + 'static>(&self, vm: &Arc<V>) -> Result<(), Error> {
        let by_slot = self.notifiers.by_slot.lock().unwrap_or_else(|p| p.into_inner());
        for (&slot, queue_notifiers) in by_slot.iter() {
            for (bar, base) in self.root.decoded_bars(slot) {
                for n in queue_notifiers.iter().filter(|n| n.bar == bar) {
                    vm.add_notifier(&n.event, base + n.offset)?;
                }
            }
        }
        let vm: Arc<dyn PciVm> = vm.clone();
        self.notifiers.vm.set(Some(vm));
        Ok(())
    }

    /// Machine reset: the old VM is gone, the functions go back to their power-on state (BARs where the VMM put
    /// them).
    pub fn reset(&self) {
        self.notifiers.vm.set(None);
        self.root.reset();
    }

    /// The bus's stateful parts for a snapshot: the configuration address register (where there are the ports),
    /// the host bridge and each virtio function (named by slot and device, so that a snapshot of another device
    /// set is refused by name).
    pub fn components(&self) -> Vec<Component> {
        let mut components = Vec::new();
        if let Some(config_io) = &self.config_io {
            components.push(Component::new("pci.config-io", config_io.clone()));
        }
        components.push(Component::new("pci.00.0.host-bridge", self.host_bridge.clone()));
        components.extend(
            self.functions.iter().map(|f| Component::new(format!("pci.{:02x}.0.{}", f.slot, f.name), f.device.clone())),
        );
        components
    }

    /// Stops the virtio functions' work on guest memory (see `devices::virtio::transport`).
    pub fn quiesce(&self) {
        for f in &self.functions {
            f.device.lock().unwrap_or_else(|p| p.into_inner()).quiesce();
        }
    }

    /// Lets quiesced or restored functions work again.
    pub fn resume(&self) {
        for f in &self.functions {
            f.device.lock().unwrap_or_else(|p| p.into_inner()).resume();
        }
    }

    /// After the functions' states were loaded: BARs decode (and queue notifiers sit) where the loaded
    /// configuration spaces say.
    pub fn refresh(&self) {
        self.root.refresh_all();
    }

    /// The functions that have a place in the boot order, as firmware names them (SeaBIOS's and OpenFirmware's
    /// device paths for bus 0 behind the 0xCF8 host bridge: `/pci@i0cf8/*@SLOT`, the slot in hex), lowest
    /// `bootindex=` first; devices given the same index keep their slot order.
    #[allow(dead_code)] // Called by the PC only (see `boot_index`).
    pub fn boot_order(&self) -> Vec<String> {
        let mut bootable: Vec<(u32, u8)> =
            self.functions.iter().filter_map(|f| Some((f.boot_index?, f.slot))).collect();
        bootable.sort();
        bootable.into_iter().map(|(_, slot)| format!("/pci@i0cf8/*@{slot:x}")).collect()
    }

    /// Every function on the bus, for QMP's `query-pci`.
    pub fn functions(&self) -> Vec<PciFunctionInfo> {
        self.root.functions()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requester_ids_are_bus_0_function_0_of_the_slot() {
        assert_eq!(requester_id(0), 0);
        assert_eq!(requester_id(1), 0x08);
        assert_eq!(requester_id(31), 0xf8);
    }
}

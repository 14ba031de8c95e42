//! Virtio devices from the configuration, and the threads that do their work: each device gets a worker that
//! waits on its queues' notification eventfds (signalled by the hypervisor's ioeventfds) and processes the queue,
//! so disk I/O never runs on a vCPU thread or the event loop. The same worker watches the host descriptors a device
//! hands it (a tap), so network I/O does not either.

use std::sync::{Arc, Mutex};
use std::thread;

use devices::virtio::balloon::Balloon;
use devices::virtio::block::{Block, BlockOptions};
use devices::virtio::console::{Console, PortSetup};
use devices::virtio::mmio::{MmioTransport, MMIO_LEN, QUEUE_NOTIFY_OFFSET};
use devices::virtio::net::tap::{Tap, TapError};
use devices::virtio::net::{MacAddress, Net};
use devices::virtio::rng::Rng;
use devices::virtio::{QueueHandler, VirtioDevice};
use devices::{Bus, EventFdLine, InputRoom};
use hypervisor::{Datamatch, IoEventAddress, Vm};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::config::{Frontend, TapConfig, VirtioSerialConfig, VirtioTransport, VmConfig};
use crate::console;
use crate::inherited;
use crate::seccomp::{confined, ThreadKind};
use crate::snapshot::Component;
use crate::Error;

/// A device, the name its worker thread and error messages use, and the transport it sits on.
pub struct NamedDevice {
    pub name: String,
    pub device: Arc<Mutex<dyn VirtioDevice>>,
    pub transport: VirtioTransport,
    /// The `id=` the user gave the device (QEMU's qdev id), or empty.
    pub qdev_id: String,
    /// Its place in the firmware's boot order (`bootindex=`), if it has one. Only x86_64 boots firmware so far
    /// (aarch64 refuses it), so only its build reads this.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub boot_index: Option<u32>,
}

impl NamedDevice {
    fn new(
        name: String,
        device: Arc<Mutex<dyn VirtioDevice>>,
        transport: VirtioTransport,
        frontend: &Frontend,
    ) -> Self {
        NamedDevice {
            name,
            device,
            transport,
            qdev_id: frontend.id.clone().unwrap_or_default(),
            boot_index: frontend.boot_index,
        }
    }
}

/// A virtio-blk device, typed, for what only a disk can answer (QMP's block queries).
pub type Disk = Arc<Mutex<Block>>;

/// The virtio-balloon device, typed, for QMP's `balloon`, `query-balloon` and its QOM properties.
pub type BalloonDevice = Arc<Mutex<Balloon>>;

/// The virtio-serial device, typed, and its ports' ptys (in `VirtioSerialConfig::ports` order), for what QMP's
/// `query-chardev` reports of them.
pub struct SerialPorts {
    pub device: Arc<Mutex<Console>>,
    pub ptys: Vec<Option<String>>,
}

impl SerialPorts {
    /// Whether a program in the guest has port `nr` open.
    pub fn guest_open(&self, nr: u32) -> bool {
        self.device.lock().unwrap_or_else(|p| p.into_inner()).guest_open(nr)
    }
}

/// The virtio devices of a configuration, and those QMP needs typed.
pub struct VirtioDevices {
    pub devices: Vec<NamedDevice>,
    /// The disks again, in `config.disks` order.
    pub disks: Vec<Disk>,
    pub balloon: Option<BalloonDevice>,
    pub serial_ports: Option<SerialPorts>,
}

/// The virtio devices the configuration asks for, in a stable order (disks, nets, the rng, the console, the
/// balloon); the console's host input starts flowing here. Devices that do not name a transport get
/// `machine_transport`, the machine type's.
pub fn devices(config: &VmConfig, machine_transport: VirtioTransport) -> Result<VirtioDevices, Error> {
    let mut devices = Vec::new();
    let mut disks = Vec::new();
    let mut serial_ports = None;
    let transport = |frontend: &Frontend| frontend.transport.unwrap_or(machine_transport);
    for (index, disk) in config.disks.iter().enumerate() {
        let options = BlockOptions {
            read_only: disk.read_only,
            serial: disk.serial.clone().unwrap_or_default(),
            direct: disk.direct,
        };
        let block = Block::open(&disk.path, &options)
            .map_err(|e| Error::Device(format!("disk '{}': {e}", disk.path.display())))?;
        let block = Arc::new(Mutex::new(block));
        disks.push(block.clone());
        devices.push(NamedDevice::new(format!("virtio-blk{index}"), block, transport(&disk.frontend), &disk.frontend));
    }
    for (index, net) in config.nets.iter().enumerate() {
        let tap = match &net.tap {
            TapConfig::Named(name) => Tap::open(name),
            TapConfig::Inherited(fd) => inherited::claim(*fd)
                .map_err(|e| TapError::NotATapDescriptor(*fd, std::io::Error::other(e)))
                .and_then(Tap::from_fd),
        };
        let tap = tap.map_err(|e| Error::Device(format!("--net {}: {e}", net.tap)))?;
        let mac = net.mac.unwrap_or_else(|| MacAddress::default_for(index));
        let device = Arc::new(Mutex::new(Net::new(mac, Box::new(tap))));
        devices.push(NamedDevice::new(format!("virtio-net{index}"), device, transport(&net.frontend), &net.frontend));
    }
    if let Some(frontend) = &config.rng {
        let device = Arc::new(Mutex::new(Rng::new()));
        devices.push(NamedDevice::new("virtio-rng".into(), device, transport(frontend), frontend));
    }
    if let Some(virtio_serial) = &config.virtio_serial {
        let (device, inputs, ptys) = virtio_serial_device(virtio_serial)?;
        let device = Arc::new(Mutex::new(device));
        serial_ports = Some(SerialPorts { device: device.clone(), ptys });
        for (nr, input, connection) in inputs {
            // The device holds up to MAX_PENDING_INPUT per port itself and takes input whole or not at all; while
            // it is full, the input thread offers the input again at its retry pace (no notification).
            let port = device.clone();
            input.start("virtio-console", Arc::new(InputRoom::default()), move |bytes| {
                let taken = port.lock().unwrap_or_else(|p| p.into_inner()).queue_input(nr, bytes);
                if taken {
                    bytes.len()
                } else {
                    0
                }
            });
            if let Some(connection) = connection {
                let port = device.clone();
                connection.watch(move |connected| {
                    port.lock().unwrap_or_else(|p| p.into_inner()).set_host_connected(nr, connected);
                });
            }
        }
        devices.push(NamedDevice::new(
            "virtio-console".into(),
            device,
            transport(&virtio_serial.frontend),
            &virtio_serial.frontend,
        ));
    }
    let mut balloon = None;
    if let Some(balloon_config) = &config.balloon {
        let mut device =
            Balloon::new(balloon_config.deflate_on_oom).map_err(|e| Error::Host("creating the balloon's timer", e))?;
        device
            .set_poll_interval(balloon_config.stats_poll_interval)
            .map_err(|e| Error::Host("arming the balloon's statistics timer", e))?;
        let device = Arc::new(Mutex::new(device));
        balloon = Some(device.clone());
        let frontend = &balloon_config.frontend;
        devices.push(NamedDevice::new("virtio-balloon".into(), device, transport(frontend), frontend));
    }
    Ok(VirtioDevices { devices, disks, balloon, serial_ports })
}

/// A port's host input, not yet started, and its connection state (a socket's), by port number.
type PortInput = (u32, console::ConsoleInput, Option<Arc<console::HostConnection>>);

/// Each port's pty path, if its host side is a pty.
type PortPtys = Vec<Option<String>>;

/// The virtio-serial device with each port's host side opened, the ports' inputs to start once the device is
/// shared, and their ptys. A console's host side is labelled `virtiocon<nr>` in messages unless it came from a
/// `-chardev`.
fn virtio_serial_device(config: &VirtioSerialConfig) -> Result<(Console, Vec<PortInput>, PortPtys), Error> {
    let mut ports = Vec::with_capacity(config.ports.len());
    let mut inputs = Vec::with_capacity(config.ports.len());
    let mut ptys = Vec::with_capacity(config.ports.len());
    for port in &config.ports {
        let label = port.chardev.clone().unwrap_or_else(|| format!("virtiocon{}", port.nr));
        let backend = console::open(&port.backend, &label).map_err(Error::Console)?;
        let connection = backend.connection.clone();
        ptys.push(backend.pty_path.clone());
        let host_connected = connection.as_ref().is_none_or(|c| c.is_connected());
        let (output, input) = backend.split();
        let (nr, name, console) = (port.nr, port.name.clone(), port.console);
        ports.push(PortSetup { nr, name, console, output, host_connected });
        inputs.push((nr, input, connection.filter(|_| !console)));
    }
    let device =
        Console::with_ports(config.max_ports, ports).map_err(|e| Error::Device(format!("virtio-serial: {e}")))?;
    Ok((device, inputs, ptys))
}

/// Starts the worker for one device: `queue_events[i]` signals that queue `i` has work, and the device's host
/// event sources (tokens after the queues') that the host has something for it.
pub fn spawn_worker(name: &str, queue_events: Vec<EventFd>, handler: QueueHandler) -> Result<(), Error> {
    let mut poll = Poll::new().map_err(|e| Error::Host("creating a device worker", e))?;
    for (index, event) in queue_events.iter().enumerate() {
        let fd = std::os::fd::AsRawFd::as_raw_fd(event);
        poll.registry()
            .register(&mut SourceFd(&fd), Token(index), Interest::READABLE)
            .map_err(|e| Error::Host("watching a virtio queue", e))?;
    }
    let host_sources = handler.host_event_sources();
    for (index, fd) in host_sources.iter().enumerate() {
        poll.registry()
            .register(&mut SourceFd(fd), Token(queue_events.len() + index), Interest::READABLE)
            .map_err(|e| Error::Host("watching a device's host descriptor", e))?;
    }
    thread::Builder::new()
        .name(name.to_string())
        .spawn(confined(ThreadKind::DeviceWorker, move || {
            let mut events = Events::with_capacity((queue_events.len() + host_sources.len()).max(1));
            loop {
                if let Err(e) = poll.poll(&mut events, None) {
                    if e.kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    return;
                }
                for event in events.iter() {
                    let index = event.token().0;
                    match queue_events.get(index) {
                        // Drain the counter first: a notification arriving during processing then wakes us again.
                        Some(queue_event) => {
                            if queue_event.read().is_ok() {
                                handler.handle(index);
                                // Work left at the per-call budget: come back after the other ready events.
                                if handler.has_backlog(index) {
                                    let _ = queue_event.write(1);
                                }
                            }
                        }
                        // Edge-triggered: the device consumes until the source would block or it must wait for
                        // the guest, and resumes by itself on the guest's next queue notification.
                        None => {
                            handler.handle_host_event(index - queue_events.len());
                        }
                    }
                }
            }
        }))
        .map(drop)
        .map_err(|e| Error::Host("starting a device worker", e))
}

/// A virtio device on the MMIO bus: where it sits, its interrupt, and the queue eventfds to hook up as notifiers
/// in every VM (the transport and its worker keep their own copies).
pub struct MmioSlot {
    /// The device's name (`virtio-blk0`, ...), for its snapshot section.
    pub name: String,
    pub base: u64,
    pub gsi: u32,
    irq: Arc<EventFdLine>,
    queue_events: Vec<EventFd>,
    transport: Arc<Mutex<MmioTransport>>,
}

impl MmioSlot {
    /// Wires the slot into a fresh VM: its edge-triggered interrupt and its queue notifications.
    pub fn attach<V: Vm>(&self, vm: &V) -> Result<(), Error> {
        vm.register_irqfd(self.irq.eventfd(), self.gsi)?;
        for (queue, event) in self.queue_events.iter().enumerate() {
            // The transport's one notify register takes the queue's index: a 32-bit write of it, per queue.
            let address = IoEventAddress::Mmio(self.base + QUEUE_NOTIFY_OFFSET);
            vm.register_ioevent(event, address, Some(Datamatch::U32(queue as u32)))?;
        }
        Ok(())
    }

    /// Back to the device's power-on state, for a guest reset.
    pub fn reset(&self) {
        self.transport.lock().unwrap_or_else(|p| p.into_inner()).reset();
    }

    /// The transport and its device for a snapshot, named by slot and device (another device set is refused by
    /// name).
    pub fn component(&self, index: usize) -> Component {
        Component::new(format!("virtio-mmio.{index}.{}", self.name), self.transport.clone())
    }

    /// Stops the device's work on guest memory, for a snapshot.
    pub fn quiesce(&self) {
        self.transport.lock().unwrap_or_else(|p| p.into_inner()).quiesce();
    }

    /// Lets a quiesced or restored device work again.
    pub fn resume(&self) {
        self.transport.lock().unwrap_or_else(|p| p.into_inner()).resume();
    }
}

/// Puts each device on the MMIO bus at the next of the platform's `slots` (base address, GSI), with its worker
/// thread. More devices than slots is the user's error.
pub fn attach_mmio(
    mmio: &mut Bus,
    memory: &GuestMemoryMmap,
    devices: Vec<NamedDevice>,
    slots: &[(u64, u32)],
) -> Result<Vec<MmioSlot>, Error> {
    if devices.len() > slots.len() {
        return Err(Error::Device(format!(
            "{} virtio devices requested; this platform has room for {}",
            devices.len(),
            slots.len()
        )));
    }
    let mut attached = Vec::with_capacity(devices.len());
    for (named, &(base, gsi)) in devices.into_iter().zip(slots) {
        let irq = Arc::new(EventFdLine::new().map_err(|e| Error::Host("creating an eventfd", e))?);
        let transport = MmioTransport::new(memory.clone(), named.device, irq.clone())
            .map_err(|e| Error::Host("creating a virtio transport", e))?;
        let clone_events = |t: &MmioTransport| -> Result<Vec<EventFd>, Error> {
            t.queue_events().iter().map(|e| e.try_clone().map_err(|e| Error::Host("cloning an eventfd", e))).collect()
        };
        spawn_worker(&named.name, clone_events(&transport)?, transport.queue_handler())?;
        let queue_events = clone_events(&transport)?;
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(transport.clone(), base, MMIO_LEN)?;
        attached.push(MmioSlot { name: named.name, base, gsi, irq, queue_events, transport });
    }
    Ok(attached)
}

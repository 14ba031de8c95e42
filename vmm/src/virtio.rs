//! Virtio devices from the configuration, and the threads that do their work: each device gets a worker that
//! waits on its queues' notification eventfds (signalled by the hypervisor's ioeventfds) and processes the queue,
//! so disk I/O never runs on a vCPU thread or the event loop.

use std::sync::{Arc, Mutex};
use std::thread;

use devices::virtio::block::{Block, BlockOptions};
use devices::virtio::console::Console;
use devices::virtio::rng::Rng;
use devices::virtio::{QueueHandler, VirtioDevice};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use vmm_sys_util::eventfd::EventFd;

use crate::config::{VirtioTransport, VmConfig};
use crate::console;
use crate::Error;

/// A device, the name its worker thread and error messages use, and the transport it sits on.
pub struct NamedDevice {
    pub name: String,
    pub device: Arc<Mutex<dyn VirtioDevice>>,
    pub transport: VirtioTransport,
}

/// A virtio-blk device, typed, for what only a disk can answer (QMP's block queries).
pub type Disk = Arc<Mutex<Block>>;

/// The virtio devices the configuration asks for, in a stable order (disks, the rng, the console); the console's
/// host input starts flowing here. Also returns the disks again, typed, in `config.disks` order (for QMP).
pub fn devices(config: &VmConfig) -> Result<(Vec<NamedDevice>, Vec<Disk>), Error> {
    let mut devices = Vec::new();
    let mut disks = Vec::new();
    let transport = config.virtio_transport;
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
        devices.push(NamedDevice { name: format!("virtio-blk{index}"), device: block, transport });
    }
    if config.rng {
        let device = Arc::new(Mutex::new(Rng::new()));
        devices.push(NamedDevice { name: "virtio-rng".into(), device, transport });
    }
    if let Some(mode) = &config.console {
        let (output, input) = console::open(mode, "virtiocon0").map_err(Error::Console)?.split();
        let device = Arc::new(Mutex::new(Console::new(output)));
        input.start("virtio-console", {
            let device = device.clone();
            move |bytes| device.lock().unwrap_or_else(|p| p.into_inner()).queue_input(bytes)
        });
        devices.push(NamedDevice { name: "virtio-console".into(), device, transport });
    }
    Ok((devices, disks))
}

/// Starts the worker for one device: `queue_events[i]` signals that queue `i` has work.
pub fn spawn_worker(name: &str, queue_events: Vec<EventFd>, handler: QueueHandler) -> Result<(), Error> {
    let mut poll = Poll::new().map_err(|e| Error::Host("creating a device worker", e))?;
    for (index, event) in queue_events.iter().enumerate() {
        let fd = std::os::fd::AsRawFd::as_raw_fd(event);
        poll.registry()
            .register(&mut SourceFd(&fd), Token(index), Interest::READABLE)
            .map_err(|e| Error::Host("watching a virtio queue", e))?;
    }
    thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let mut events = Events::with_capacity(queue_events.len().max(1));
            loop {
                if let Err(e) = poll.poll(&mut events, None) {
                    if e.kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    return;
                }
                for event in events.iter() {
                    let index = event.token().0;
                    // Drain the counter first: a notification arriving during processing then wakes us again.
                    if queue_events[index].read().is_ok() {
                        handler.handle(index);
                    }
                }
            }
        })
        .map(drop)
        .map_err(|e| Error::Host("starting a device worker", e))
}

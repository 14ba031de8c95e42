//! Runs a VM: guest memory, one thread per vCPU, and the loop that turns device requests and vCPU failures into
//! the machine's fate (power off, reset in place, or an error exit).

use std::fs::File;
use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use devices::legacy::Serial;
use devices::{Bus, EventFdLine, PlatformEvents, PlatformRequest};
use hypervisor::kvm::KvmHypervisor;
use hypervisor::{Hypervisor, Vcpu, VcpuExit, Vm};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch_platform::{BootFiles, Platform};
use crate::config::{VmConfig, MIN_MEMORY_BYTES};
use crate::{console, signals, Error, Outcome};

enum VmEvent {
    Platform(PlatformRequest),
    VcpuFailed { id: u32, reason: String, state: String },
    Signal(i32),
}

pub fn run(config: &VmConfig) -> Result<Outcome, Error> {
    if !config.qmp.is_empty() || config.start_paused || config.no_shutdown {
        return Err(Error::NotYetSupported("QMP sockets, -S and -no-shutdown"));
    }
    check_memory_size(config.memory_bytes)?;
    let mut kernel = open_input("kernel", &config.kernel)?;
    let mut initrd = config.initrd.as_ref().map(|path| open_input("initrd", path)).transpose()?;

    let hypervisor = KvmHypervisor::new()?;
    let max_vcpus = hypervisor.max_vcpus().min(Platform::MAX_VCPUS);
    if u32::from(config.vcpus) > max_vcpus {
        return Err(Error::TooManyCpus { requested: config.vcpus, max: max_vcpus });
    }

    signals::install_kick_handler()?;
    let (sender, events) = channel();
    signals::forward_termination_signals({
        let sender = Mutex::new(sender.clone());
        move |signal| {
            let _ = sender.lock().unwrap_or_else(|p| p.into_inner()).send(VmEvent::Signal(signal));
        }
    })?;

    let backend = console::open(&config.serial).map_err(Error::Console)?;
    let serial_irq = Arc::new(EventFdLine::new().map_err(|e| Error::Host("creating an eventfd", e))?);
    let serial = Arc::new(Mutex::new(Serial::new(serial_irq.clone(), backend.output)));
    if let Some(input) = backend.input {
        forward_console_input(input, serial.clone());
    }
    let platform_events = PlatformEvents::new({
        let sender = Mutex::new(sender.clone());
        move |request| {
            let _ = sender.lock().unwrap_or_else(|p| p.into_inner()).send(VmEvent::Platform(request));
        }
    });
    let platform = Platform::new(serial, serial_irq, platform_events)?;

    loop {
        let vm = hypervisor.create_vm()?;
        let memory = create_guest_memory(&vm, config.memory_bytes)?;
        let boot = BootFiles {
            kernel: &mut kernel,
            initrd: initrd.as_mut(),
            cmdline: &config.cmdline,
            vcpu_count: config.vcpus,
        };
        let vcpus = platform.boot(&hypervisor, &vm, &memory, boot)?;
        let running = RunningVcpus::start(vcpus, &platform.pio, &platform.mmio, &sender)?;

        let event = wait_for_decisive_event(&events);
        running.stop();
        match event {
            VmEvent::Platform(PlatformRequest::Poweroff) => return Ok(Outcome::Poweroff),
            VmEvent::Platform(PlatformRequest::Reset) if config.no_reboot => return Ok(Outcome::Rebooted),
            VmEvent::Platform(PlatformRequest::Reset) => {
                // Requests raised by vCPUs of the boot that just ended are moot now.
                while events.try_recv().is_ok() {}
                platform.reset();
            }
            VmEvent::Signal(signal) => return Ok(Outcome::Signal(signal)),
            VmEvent::VcpuFailed { id, reason, state } => return Err(Error::VcpuFailed { id, reason, state }),
        }
        // Drop order matters: the VM (and with it every mapping of guest memory) goes before the memory.
        drop(vm);
        drop(memory);
    }
}

fn wait_for_decisive_event(events: &Receiver<VmEvent>) -> VmEvent {
    // Every sender lives as long as `run`, so the channel cannot disconnect while we wait.
    events.recv().expect("event senders outlive the event loop")
}

fn open_input(what: &'static str, path: &std::path::Path) -> Result<File, Error> {
    File::open(path).map_err(|source| Error::Open { what, path: path.to_path_buf(), source })
}

fn host_memory_bytes() -> u64 {
    // SAFETY: sysconf only reads system configuration.
    let (pages, page_size) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    (pages.max(0) as u64).saturating_mul(page_size.max(0) as u64)
}

fn check_memory_size(bytes: u64) -> Result<(), Error> {
    if bytes < MIN_MEMORY_BYTES {
        return Err(Error::MemoryTooSmall { requested: bytes, min: MIN_MEMORY_BYTES });
    }
    let host = host_memory_bytes();
    if bytes > host {
        return Err(Error::MemoryTooLarge { requested: bytes, host });
    }
    Ok(())
}

fn create_guest_memory<V: Vm>(vm: &V, memory_bytes: u64) -> Result<GuestMemoryMmap, Error> {
    let ranges: Vec<(GuestAddress, usize)> = Platform::ram_regions(memory_bytes)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    let memory = GuestMemoryMmap::from_ranges(&ranges).map_err(|e| Error::GuestMemory(e.to_string()))?;
    for (slot, region) in memory.iter().enumerate() {
        let host_addr = region.as_ptr() as u64;
        // SAFETY: the mapping belongs to `memory`, which the caller drops only after the VM is gone, and it is
        // used for nothing but this guest's RAM.
        unsafe { vm.map_memory(slot as u32, region.start_addr().0, region.len(), host_addr) }?;
    }
    Ok(memory)
}

/// Host input for the guest's console, read on its own thread so a blocked read never stalls the guest.
fn forward_console_input(mut input: Box<dyn Read + Send>, serial: Arc<Mutex<Serial>>) {
    thread::Builder::new()
        .name("console-input".into())
        .spawn(move || {
            let mut buf = [0u8; 512];
            loop {
                match input.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => serial.lock().unwrap_or_else(|p| p.into_inner()).queue_input(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
        })
        .map(drop)
        .unwrap_or_else(|e| eprintln!("kestrel: console input disabled: {e}"));
}

struct RunningVcpus {
    threads: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl RunningVcpus {
    fn start<C: Vcpu + 'static>(vcpus: Vec<C>, pio: &Bus, mmio: &Bus, events: &Sender<VmEvent>) -> Result<Self, Error> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut running = RunningVcpus { threads: Vec::with_capacity(vcpus.len()), stop: stop.clone() };
        for (id, vcpu) in vcpus.into_iter().enumerate() {
            let exits = ExitHandler { id: id as u32, pio: pio.clone(), mmio: mmio.clone(), stop: stop.clone() };
            let events = events.clone();
            let thread = thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || exits.run(vcpu, events))
                .map_err(|e| Error::Host("starting a vCPU thread", e));
            match thread {
                Ok(thread) => running.threads.push(thread),
                Err(e) => {
                    running.stop();
                    return Err(e);
                }
            }
        }
        Ok(running)
    }

    /// Stops every vCPU thread and waits for it. A vCPU may be inside the guest (halted or running), so it is
    /// kicked out with a signal until it notices the stop flag.
    fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads {
            while !thread.is_finished() {
                signals::kick(&thread);
                thread::sleep(Duration::from_micros(100));
            }
            let _ = thread.join();
        }
    }
}

struct ExitHandler {
    id: u32,
    pio: Bus,
    mmio: Bus,
    stop: Arc<AtomicBool>,
}

/// Unmapped MMIO accesses are reported, but only the first few: a guest probing for hardware must not flood the
/// terminal.
static UNMAPPED_MMIO_REPORTS: AtomicU32 = AtomicU32::new(0);
const MAX_UNMAPPED_MMIO_REPORTS: u32 = 10;

fn report_unmapped_mmio(kind: &str, addr: u64, len: usize) {
    let n = UNMAPPED_MMIO_REPORTS.fetch_add(1, Ordering::Relaxed);
    if n < MAX_UNMAPPED_MMIO_REPORTS {
        eprintln!("kestrel: guest {kind} of {len} bytes at unmapped MMIO address {addr:#x} ignored");
    } else if n == MAX_UNMAPPED_MMIO_REPORTS {
        eprintln!("kestrel: further unmapped MMIO accesses will not be reported");
    }
}

impl ExitHandler {
    fn run<C: Vcpu>(self, mut vcpu: C, events: Sender<VmEvent>) {
        let failure = loop {
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            match vcpu.run() {
                Ok(VcpuExit::IoIn { port, data }) => {
                    self.pio.read(u64::from(port), data);
                }
                Ok(VcpuExit::IoOut { port, data }) => {
                    self.pio.write(u64::from(port), data);
                }
                Ok(VcpuExit::MmioRead { addr, data }) => {
                    if !self.mmio.read(addr, data) {
                        report_unmapped_mmio("read", addr, data.len());
                    }
                }
                Ok(VcpuExit::MmioWrite { addr, data }) => {
                    if !self.mmio.write(addr, data) {
                        report_unmapped_mmio("write", addr, data.len());
                    }
                }
                Ok(VcpuExit::Interrupted) | Ok(VcpuExit::Hlt) => {}
                Ok(VcpuExit::SystemReset) => {
                    let _ = events.send(VmEvent::Platform(PlatformRequest::Reset));
                    return;
                }
                Ok(VcpuExit::SystemPoweroff) => {
                    let _ = events.send(VmEvent::Platform(PlatformRequest::Poweroff));
                    return;
                }
                Ok(VcpuExit::Shutdown) => break "triple fault (the guest's CPU shut down)".to_string(),
                Ok(VcpuExit::InternalError) => break "KVM internal error".to_string(),
                Ok(VcpuExit::FailEntry { reason }) => {
                    break format!("the hypervisor refused to enter the guest (hardware reason {reason:#x})")
                }
                Ok(VcpuExit::Unhandled(what)) => break format!("unhandled exit {what}"),
                Err(e) => break e.to_string(),
            }
        };
        let state = vcpu.dump_state();
        let _ = events.send(VmEvent::VcpuFailed { id: self.id, reason: failure, state });
    }
}

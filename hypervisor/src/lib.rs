//! The hypervisor as Kestrel sees it: three small traits (`Hypervisor`, `Vm`, `Vcpu`) that every architecture
//! shares, extension traits per architecture (`x86_64::VcpuX86_64` ...), and backends behind them. KVM is
//! the first backend; the rest of Kestrel talks only to these traits.

use std::fmt;
use std::io;

use vmm_sys_util::eventfd::EventFd;

cfg_if::cfg_if! {
    if #[cfg(target_arch = "x86_64")] {
        pub mod kvm;
        pub mod x86_64;
    } else if #[cfg(target_arch = "aarch64")] {
        pub mod aarch64;
        pub mod kvm;
    }
}

/// A failed hypervisor operation: which one, and the OS error behind it.
#[derive(Debug)]
pub struct Error {
    pub operation: &'static str,
    pub source: io::Error,
}

impl Error {
    pub fn new(operation: &'static str, source: impl Into<io::Error>) -> Self {
        Error { operation, source: source.into() }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failed: {}", self.operation, self.source)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// A hypervisor able to create virtual machines.
pub trait Hypervisor: Send + Sync {
    /// Owned, not borrowed: a VM is shared with the threads that use it, for as long as they need it.
    type Vm: Vm + 'static;

    /// Creates an empty VM (no memory, no vCPUs). Failing here is how a caller learns it cannot run guests:
    /// opening the device node is not enough (under qemu-user it opens and every ioctl then fails).
    fn create_vm(&self) -> Result<Self::Vm>;

    /// How many vCPUs one VM may have.
    fn max_vcpus(&self) -> u32;
}

/// Where a guest write signals an ioeventfd. (s390x's virtio-ccw notifications, by subchannel, will be a third
/// kind.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoEventAddress {
    /// An I/O port.
    Pio(u16),
    /// A guest physical MMIO address.
    Mmio(u64),
}

/// The value a write must carry, at its width, for an ioeventfd to fire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Datamatch {
    U8(u8),
    U16(u16),
    U32(u32),
    U64(u64),
}

/// A virtual machine: guest memory, interrupt routing, vCPUs.
pub trait Vm: Send + Sync {
    /// Owned, not borrowed: each vCPU is moved to the thread that runs it.
    type Vcpu: Vcpu + 'static;

    /// Maps `size` bytes of host memory at `host_addr` into the guest at `guest_addr`, in memory slot `slot`.
    ///
    /// # Safety
    /// The host range must stay mapped, and must not be reused for anything else, for as long as this VM exists:
    /// the guest reads and writes it behind the compiler's back.
    unsafe fn map_memory(&self, slot: u32, guest_addr: u64, size: u64, host_addr: u64) -> Result<()>;

    /// As [`map_memory`](Self::map_memory), but the guest can only read and execute the range (a firmware ROM):
    /// its writes there exit as MMIO writes.
    ///
    /// # Safety
    /// As for `map_memory`.
    unsafe fn map_read_only_memory(&self, slot: u32, guest_addr: u64, size: u64, host_addr: u64) -> Result<()>;

    fn create_vcpu(&self, id: u32) -> Result<Self::Vcpu>;

    /// Raises interrupt line `gsi` whenever `event` is written (an edge).
    fn register_irqfd(&self, event: &EventFd, gsi: u32) -> Result<()>;

    /// Makes a guest write to `address` signal `event` in the kernel, without an exit to the VMM (a virtio queue
    /// notification, typically): any write with `datamatch` `None`, else only a write of that value at that width
    /// (other writes there still exit as usual).
    fn register_ioevent(&self, event: &EventFd, address: IoEventAddress, datamatch: Option<Datamatch>) -> Result<()>;

    /// Undoes [`register_ioevent`](Self::register_ioevent) with the same arguments (a BAR moved).
    fn unregister_ioevent(&self, event: &EventFd, address: IoEventAddress, datamatch: Option<Datamatch>) -> Result<()>;

    /// Delivers a message-signalled interrupt: what the guest programmed as MSI address and data, sent by the PCI
    /// function whose requester ID (bus << 8 | device << 3 | function) is `device_id`. An interrupt translation
    /// service (arm64's GICv3 ITS) tells devices apart by that ID; where none exists it is not needed.
    fn signal_msi(&self, address: u64, data: u32, device_id: u32) -> Result<()>;

    /// Asserts level-triggered line `gsi` whenever `event` is written and keeps it asserted until the guest
    /// acknowledges the interrupt; then de-asserts it and writes `resample`, so the device can assert it again
    /// if its condition still holds.
    fn register_level_irqfd(&self, event: &EventFd, resample: &EventFd, gsi: u32) -> Result<()>;
}

/// Why `Vcpu::run` returned: the exits every architecture has, and `Arch` for the ones only the vCPU's
/// architecture has (`A` is `Vcpu::ArchExit`), which the architecture's platform handles. I/O exits lend the
/// vCPU's data buffer: a read is completed by filling `data` before the next `run`.
#[derive(Debug)]
pub enum VcpuExit<'a, A> {
    IoIn {
        port: u16,
        data: &'a mut [u8],
    },
    IoOut {
        port: u16,
        data: &'a [u8],
    },
    MmioRead {
        addr: u64,
        data: &'a mut [u8],
    },
    MmioWrite {
        addr: u64,
        data: &'a [u8],
    },
    /// The guest halted with no in-kernel irqchip to wait for interrupts.
    Hlt,
    /// The guest asked its firmware interface (the one the architecture has: PSCI, RTAS, ...) to reset the
    /// machine, or to power it off.
    SystemReset,
    SystemPoweroff,
    /// The run was interrupted by a signal or by `set_immediate_exit`.
    Interrupted,
    /// The hypervisor could not handle something the guest did (details in `Vcpu::dump_state`).
    InternalError,
    /// The hypervisor refused to enter the guest (invalid state).
    FailEntry {
        reason: u64,
    },
    /// An exit only this architecture has.
    Arch(A),
    /// Anything else, with the backend's description.
    Unhandled(String),
}

/// One virtual CPU. Owned by the thread that runs it.
pub trait Vcpu: Send {
    /// The exits only this vCPU's architecture has; the architecture's extension trait names the type
    /// (`x86_64::ExitX86_64`, ...), so that its platform can handle them whatever the backend.
    type ArchExit: fmt::Debug + Send;

    fn run(&mut self) -> Result<VcpuExit<'_, Self::ArchExit>>;

    /// While set, `run` returns `Interrupted` without entering the guest; a signal handler or another thread
    /// sets it to stop a vCPU that might be just about to enter.
    fn set_immediate_exit(&mut self, exit: bool);

    /// A human-readable dump of the vCPU's registers for error reports.
    fn dump_state(&mut self) -> String;
}

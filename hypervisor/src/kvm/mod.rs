//! The KVM backend.
//!
//! MSIs go through KVM_SIGNAL_MSI, one ioctl per message with the guest's own address and data, rather than a
//! GSI route plus an irqfd per vector: the routes would have to be rebuilt on every guest change of an MSI-X
//! entry and re-created with each VM (the VM is re-created on every guest reset), while KVM_SIGNAL_MSI needs no
//! state at all and costs one syscall per interrupt, as writing an irqfd does.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kvm_bindings::{
    kvm_msi, kvm_userspace_memory_region, KVM_MEM_READONLY, KVM_MSI_VALID_DEVID, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{IoEventAddress as KvmIoEventAddress, Kvm, NoDatamatch, VcpuExit as KvmExit, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::{Datamatch, Error, Hypervisor, IoEventAddress, Result, Vcpu, VcpuExit, Vm};

cfg_if::cfg_if! {
    if #[cfg(target_arch = "x86_64")] {
        mod x86_64;
        use x86_64::{arch_exit, VcpuData, VmData};
        use crate::x86_64::ExitX86_64 as ArchExit;
    } else if #[cfg(target_arch = "aarch64")] {
        mod aarch64;
        use aarch64::{arch_exit, VcpuData, VmData};
        use crate::aarch64::ExitAarch64 as ArchExit;
    }
}

/// An open `/dev/kvm`.
pub struct KvmHypervisor {
    kvm: Kvm,
}

impl KvmHypervisor {
    pub fn new() -> Result<Self> {
        let kvm = Kvm::new().map_err(|e| Error::new("opening /dev/kvm", e))?;
        Ok(KvmHypervisor { kvm })
    }
}

impl Hypervisor for KvmHypervisor {
    type Vm = KvmVm;

    fn create_vm(&self) -> Result<KvmVm> {
        let fd = self.kvm.create_vm().map_err(|e| Error::new("KVM_CREATE_VM", e))?;
        let arch = VmData::new(&self.kvm, &fd)?;
        Ok(KvmVm { fd: Arc::new(fd), arch, msis_carry_device_id: AtomicBool::new(false) })
    }

    fn max_vcpus(&self) -> u32 {
        self.kvm.get_max_vcpus() as u32
    }
}

pub struct KvmVm {
    fd: Arc<VmFd>,
    /// What the architecture's code needs to know about this VM's host (which MSRs KVM saves, say).
    arch: VmData,
    /// Set once the VM has an interrupt translation service that tells MSIs apart by their sender (arm64's ITS:
    /// KVM then refuses an MSI without KVM_MSI_VALID_DEVID; KVM_CAP_MSI_DEVID says so, but checking it on every
    /// message would cost an ioctl the device threads are not allowed).
    msis_carry_device_id: AtomicBool,
}

impl Vm for KvmVm {
    type Vcpu = KvmVcpu;

    unsafe fn map_memory(&self, slot: u32, guest_addr: u64, size: u64, host_addr: u64) -> Result<()> {
        // SAFETY: the caller's guarantee, passed on.
        unsafe { self.set_memory_region(slot, 0, guest_addr, size, host_addr) }
    }

    unsafe fn map_read_only_memory(&self, slot: u32, guest_addr: u64, size: u64, host_addr: u64) -> Result<()> {
        if !self.fd.check_extension(kvm_ioctls::Cap::ReadonlyMem) {
            return Err(Error::new(
                "mapping read-only guest memory",
                std::io::Error::new(std::io::ErrorKind::Unsupported, "KVM lacks KVM_CAP_READONLY_MEM"),
            ));
        }
        // SAFETY: the caller's guarantee, passed on.
        unsafe { self.set_memory_region(slot, KVM_MEM_READONLY, guest_addr, size, host_addr) }
    }

    fn create_vcpu(&self, id: u32) -> Result<KvmVcpu> {
        let fd = self.fd.create_vcpu(u64::from(id)).map_err(|e| Error::new("KVM_CREATE_VCPU", e))?;
        let arch = self.arch.vcpu_data(&self.fd);
        Ok(KvmVcpu { fd, arch })
    }

    fn register_irqfd(&self, event: &EventFd, gsi: u32) -> Result<()> {
        self.fd.register_irqfd(event, gsi).map_err(|e| Error::new("KVM_IRQFD", e))
    }

    fn register_ioevent(&self, event: &EventFd, address: IoEventAddress, datamatch: Option<Datamatch>) -> Result<()> {
        self.ioevent(Assign::Register, event, address, datamatch).map_err(|e| Error::new("KVM_IOEVENTFD", e))
    }

    fn unregister_ioevent(&self, event: &EventFd, address: IoEventAddress, datamatch: Option<Datamatch>) -> Result<()> {
        self.ioevent(Assign::Unregister, event, address, datamatch)
            .map_err(|e| Error::new("KVM_IOEVENTFD (deassign)", e))
    }

    fn signal_msi(&self, address: u64, data: u32, device_id: u32) -> Result<()> {
        let mut msi =
            kvm_msi { address_lo: address as u32, address_hi: (address >> 32) as u32, data, ..Default::default() };
        if self.msis_carry_device_id.load(Ordering::Relaxed) {
            msi.flags = KVM_MSI_VALID_DEVID;
            msi.devid = device_id;
        }
        self.fd.signal_msi(msi).map(drop).map_err(|e| Error::new("KVM_SIGNAL_MSI", e))
    }

    fn register_level_irqfd(&self, event: &EventFd, resample: &EventFd, gsi: u32) -> Result<()> {
        self.fd.register_irqfd_with_resample(event, resample, gsi).map_err(|e| Error::new("KVM_IRQFD (resample)", e))
    }
}

/// Whether `KvmVm::ioevent` adds an ioeventfd or removes it.
#[derive(Clone, Copy)]
enum Assign {
    Register,
    Unregister,
}

impl KvmVm {
    /// KVM_SET_USER_MEMORY_REGION with `flags`.
    ///
    /// # Safety
    /// As for `Vm::map_memory`.
    unsafe fn set_memory_region(
        &self,
        slot: u32,
        flags: u32,
        guest_addr: u64,
        size: u64,
        host_addr: u64,
    ) -> Result<()> {
        let region = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: guest_addr,
            memory_size: size,
            userspace_addr: host_addr,
        };
        // SAFETY: the caller guarantees the host range outlives the VM and is used for nothing else.
        unsafe { self.fd.set_user_memory_region(region) }.map_err(|e| Error::new("KVM_SET_USER_MEMORY_REGION", e))
    }

    /// KVM_IOEVENTFD: KVM takes the datamatch's width from its type (none for `NoDatamatch`: any width).
    fn ioevent(
        &self,
        assign: Assign,
        event: &EventFd,
        address: IoEventAddress,
        datamatch: Option<Datamatch>,
    ) -> std::result::Result<(), kvm_ioctls::Error> {
        fn call<T: Into<u64>>(
            fd: &VmFd,
            assign: Assign,
            event: &EventFd,
            address: &KvmIoEventAddress,
            datamatch: T,
        ) -> std::result::Result<(), kvm_ioctls::Error> {
            match assign {
                Assign::Register => fd.register_ioevent(event, address, datamatch),
                Assign::Unregister => fd.unregister_ioevent(event, address, datamatch),
            }
        }
        let address = match address {
            IoEventAddress::Pio(port) => KvmIoEventAddress::Pio(u64::from(port)),
            IoEventAddress::Mmio(addr) => KvmIoEventAddress::Mmio(addr),
        };
        match datamatch {
            None => call(&self.fd, assign, event, &address, NoDatamatch),
            Some(Datamatch::U8(value)) => call(&self.fd, assign, event, &address, value),
            Some(Datamatch::U16(value)) => call(&self.fd, assign, event, &address, value),
            Some(Datamatch::U32(value)) => call(&self.fd, assign, event, &address, value),
            Some(Datamatch::U64(value)) => call(&self.fd, assign, event, &address, value),
        }
    }
}

pub struct KvmVcpu {
    fd: VcpuFd,
    arch: VcpuData,
}

impl Vcpu for KvmVcpu {
    type ArchExit = ArchExit;

    fn run(&mut self) -> Result<VcpuExit<'_, ArchExit>> {
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => return Ok(VcpuExit::Interrupted),
            Err(e) => return Err(Error::new("KVM_RUN", e)),
        };
        Ok(match exit {
            KvmExit::IoIn(port, data) => VcpuExit::IoIn { port, data },
            KvmExit::IoOut(port, data) => VcpuExit::IoOut { port, data },
            KvmExit::MmioRead(addr, data) => VcpuExit::MmioRead { addr, data },
            KvmExit::MmioWrite(addr, data) => VcpuExit::MmioWrite { addr, data },
            KvmExit::Hlt => VcpuExit::Hlt,
            KvmExit::Intr => VcpuExit::Interrupted,
            KvmExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _) => VcpuExit::SystemReset,
            KvmExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _) => VcpuExit::SystemPoweroff,
            KvmExit::InternalError => VcpuExit::InternalError,
            KvmExit::FailEntry(reason, _cpu) => VcpuExit::FailEntry { reason },
            other => match arch_exit(&other) {
                Some(exit) => VcpuExit::Arch(exit),
                None => VcpuExit::Unhandled(format!("{other:?}")),
            },
        })
    }

    fn set_immediate_exit(&mut self, exit: bool) {
        self.fd.set_kvm_immediate_exit(u8::from(exit));
    }

    fn dump_state(&mut self) -> String {
        let mut dump = String::new();
        let run = self.fd.get_kvm_run();
        if run.exit_reason == kvm_bindings::KVM_EXIT_INTERNAL_ERROR {
            // SAFETY: the exit reason says the `internal` member of the union is the valid one.
            let internal = unsafe { run.__bindgen_anon_1.internal };
            let count = (internal.ndata as usize).min(internal.data.len());
            dump +=
                &format!("KVM internal error: suberror {}, data {:x?}\n", internal.suberror, &internal.data[..count]);
        }
        dump + &self.describe_state()
    }
}

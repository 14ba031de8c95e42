//! x86_64's part of the seccomp filters (see `crate::seccomp`): the system calls only this architecture has
//! (glibc picks them over their generic forms), and the KVM ioctls by number (their sizes are x86_64's).

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_ioeventfd, kvm_lapic_state, kvm_mp_state, kvm_msi, kvm_msrs, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, KVMIO,
};
use seccompiler::TargetArch;
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

use crate::seccomp::{allow, allow_values, Syscall, ThreadKind};

pub(crate) use super::syscall_names::ARCH_SYSCALL_NAMES;

pub const TARGET: TargetArch = TargetArch::x86_64;

ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
ioctl_iow_nr!(KVM_SIGNAL_MSI, KVMIO, 0xa5, kvm_msi);
ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
ioctl_ior_nr!(KVM_GET_FPU, KVMIO, 0x8c, kvm_fpu);
ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
ioctl_ior_nr!(KVM_GET_XSAVE2, KVMIO, 0xcf, kvm_xsave);
ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);

/// The second argument of the system call that raised SIGSYS (an ioctl's request), from the signal's context.
///
/// # Safety
/// `context` must be the `ucontext_t` the kernel passed to an SA_SIGINFO handler.
pub unsafe fn second_argument(context: *const libc::ucontext_t) -> u64 {
    // SAFETY: the caller passes the kernel's context; RSI holds the second argument on system call entry.
    unsafe { (*context).uc_mcontext.gregs[libc::REG_RSI as usize] as u64 }
}

/// The x86_64-only calls a thread of `kind` makes, and the ioctls it may issue.
pub fn syscalls(kind: ThreadKind) -> Vec<Syscall> {
    match kind {
        ThreadKind::Main => vec![
            // mio's event loop: glibc's epoll_wait is the system call of that name here.
            allow(libc::SYS_epoll_wait),
            // Waiting for the first QMP client (wait=on): glibc's poll is the system call of that name here.
            allow(libc::SYS_poll),
            // QMP socket files removed at exit: glibc's unlink is the system call of that name here.
            allow(libc::SYS_unlink),
        ],
        ThreadKind::Vcpu => vec![
            // Running the guest; the registers for a failure's report; MSIs a device raises during the access;
            // a PCI BAR the guest moves takes its queue notifiers along (KVM_IOEVENTFD, found by the Linux guests
            // in the emulated runner).
            allow_values(
                libc::SYS_ioctl,
                1,
                &[KVM_RUN(), KVM_GET_REGS(), KVM_GET_SREGS(), KVM_SIGNAL_MSI(), KVM_IOEVENTFD()],
            ),
            // QMP `migrate`: each vCPU's thread, which owns it, reads its state while the vCPUs are held.
            allow_values(
                libc::SYS_ioctl,
                1,
                &[
                    KVM_GET_MP_STATE(),
                    KVM_GET_FPU(),
                    KVM_GET_XSAVE(),
                    KVM_GET_XSAVE2(),
                    KVM_GET_XCRS(),
                    KVM_GET_DEBUGREGS(),
                    KVM_GET_LAPIC(),
                    KVM_GET_MSRS(),
                    KVM_GET_VCPU_EVENTS(),
                    KVM_GET_TSC_KHZ(),
                ],
            ),
        ],
        ThreadKind::DeviceWorker => vec![
            allow(libc::SYS_epoll_wait),
            // PCI devices' MSI-X interrupts.
            allow_values(libc::SYS_ioctl, 1, &[KVM_SIGNAL_MSI()]),
        ],
        ThreadKind::ConsoleInput => vec![
            // Guest input raises the device's interrupt: an MSI on PCI.
            allow_values(libc::SYS_ioctl, 1, &[KVM_SIGNAL_MSI()]),
            // A pty's input waits for someone to open it: glibc's poll is the system call of that name here.
            allow(libc::SYS_poll),
        ],
        // A pty's output checks for a reader first: glibc's poll, as above.
        ThreadKind::ConsoleOutput => vec![allow(libc::SYS_poll)],
        ThreadKind::Signals | ThreadKind::InterruptResample => Vec::new(),
    }
}

//! aarch64's part of the seccomp filters (see `crate::seccomp`): the KVM ioctls by number. aarch64 has none of
//! x86_64's legacy calls (`open`, `poll`, `epoll_wait`, ...): glibc uses the generic ones the shared lists have.

use kvm_bindings::{kvm_ioeventfd, kvm_mp_state, kvm_msi, kvm_one_reg, kvm_reg_list, KVMIO};
use seccompiler::TargetArch;
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

use crate::seccomp::{allow, allow_values, Syscall, ThreadKind};

/// aarch64 has no system calls beyond the generic table (`crate::syscall_names`).
pub(crate) const ARCH_SYSCALL_NAMES: &[(i64, &str)] = &[];

pub const TARGET: TargetArch = TargetArch::aarch64;

ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_iow_nr!(KVM_GET_ONE_REG, KVMIO, 0xab, kvm_one_reg);
ioctl_iow_nr!(KVM_SIGNAL_MSI, KVMIO, 0xa5, kvm_msi);
ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);
ioctl_iowr_nr!(KVM_GET_REG_LIST, KVMIO, 0xb0, kvm_reg_list);
ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);

/// The second argument of the system call that raised SIGSYS (an ioctl's request), from the signal's context.
///
/// # Safety
/// `context` must be the `ucontext_t` the kernel passed to an SA_SIGINFO handler.
pub unsafe fn second_argument(context: *const libc::ucontext_t) -> u64 {
    // SAFETY: the caller passes the kernel's context; x1 holds the second argument on system call entry.
    unsafe { (*context).uc_mcontext.regs[1] }
}

/// The aarch64-only calls a thread of `kind` makes, and the ioctls it may issue.
pub fn syscalls(kind: ThreadKind) -> Vec<Syscall> {
    match kind {
        // Every boot's device tree carries fresh host entropy for the guest's random pool (/chosen/rng-seed), as
        // QEMU's virt does (found by the aarch64 runner's Linux guests).
        ThreadKind::Main => vec![allow(libc::SYS_getrandom)],
        // Running the guest; the registers for a failure's report; QMP `migrate`: each vCPU's thread, which owns
        // it, reads its state (the register list, every register, the PSCI power state) while the vCPUs are held.
        // PCI: MSIs a device raises during the access, and a BAR the guest moves takes its queue notifiers along.
        ThreadKind::Vcpu => {
            vec![allow_values(
                libc::SYS_ioctl,
                1,
                &[
                    KVM_RUN(),
                    KVM_GET_ONE_REG(),
                    KVM_GET_REG_LIST(),
                    KVM_GET_MP_STATE(),
                    KVM_SIGNAL_MSI(),
                    KVM_IOEVENTFD(),
                ],
            )]
        }
        // PCI devices' MSI-X interrupts; guest input raises the device's interrupt, an MSI on PCI.
        ThreadKind::DeviceWorker | ThreadKind::ConsoleInput => {
            vec![allow_values(libc::SYS_ioctl, 1, &[KVM_SIGNAL_MSI()])]
        }
        ThreadKind::ConsoleOutput | ThreadKind::Signals | ThreadKind::InterruptResample => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_ioctls_are_the_uapi_numbers() {
        // _IOWR(KVMIO, 0xb0, struct kvm_reg_list) and _IOR(KVMIO, 0x98, struct kvm_mp_state), as the kernel's
        // headers expand them for arm64.
        assert_eq!(KVM_GET_REG_LIST(), 0xc008_aeb0);
        assert_eq!(KVM_GET_MP_STATE(), 0x8004_ae98);
    }
}

#![cfg(target_arch = "x86_64")]

//! `Vm::register_ioevent`/`unregister_ioevent` on host KVM, below the platform: a hand-assembled guest counts
//! with 16-bit OUTs to one port, and the writes that ioeventfds match (port, value and width) signal them instead
//! of leaving the guest, until unregistered.

mod support;

use arch::x86_64::boot::long_mode_special_registers;
use arch::x86_64::cpu_state::GeneralRegisters;
use arch::x86_64::gdt::{self, SegmentMode};
use arch::x86_64::layout::{pc_irqchip_layout, PML4_START};
use arch::x86_64::{paging, CpuState};
use hypervisor::kvm::{KvmHypervisor, KvmVcpu, KvmVm};
use hypervisor::x86_64::{HypervisorX86_64, VcpuX86_64, VmX86_64};
use hypervisor::{Datamatch, Hypervisor, IoEventAddress, VcpuExit, Vm};
use support::guest::{memory_contents, run_collecting, TestVm};
use support::kvm_available;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const CODE: u64 = 0x2_0000;
const PORT: u16 = 0x10;

/// The guest, 64-bit, at CODE:
///   20000: ff c0          inc eax
///   20002: 66 e7 10       out 0x10, ax
///   20005: eb f9          jmp 20000
const GUEST: [u8; 7] = [0xff, 0xc0, 0x66, 0xe7, 0x10, 0xeb, 0xf9];

/// A VM with the PC irqchip and one vCPU at the guest's first instruction, in long mode.
fn build_vm(hypervisor: &KvmHypervisor) -> TestVm<KvmVm> {
    let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    gdt::write_boot_tables(&memory, SegmentMode::Long).expect("writing the boot GDT");
    assert_eq!(paging::setup_identity_page_tables(&memory).expect("writing page tables"), PML4_START);
    memory.write_slice(&GUEST, GuestAddress(CODE)).unwrap();

    let vm = hypervisor.create_vm().expect("creating a VM");
    vm.create_pc_irqchip(&pc_irqchip_layout(None)).expect("creating the PC irqchip");
    let test = TestVm::new(vm, 0, &memory_contents(&memory));
    test.vcpu.set_cpuid(&hypervisor.supported_cpuid().expect("KVM_GET_SUPPORTED_CPUID")).expect("KVM_SET_CPUID2");
    let state = CpuState {
        regs: GeneralRegisters { rip: CODE, rflags: 1 << 1, ..Default::default() },
        sregs: long_mode_special_registers(PML4_START),
        fpu: Default::default(),
    };
    test.vcpu.set_cpu_state(&state).expect("loading the long-mode start state");
    test
}

/// The values of the next `count` OUTs to PORT that left the guest.
fn outs(vcpu: &mut KvmVcpu, count: usize) -> Vec<u16> {
    run_collecting(vcpu, count, |exit| match exit {
        VcpuExit::IoOut { port: PORT, data } if data.len() == 2 => Some(u16::from_le_bytes([data[0], data[1]])),
        _ => None,
    })
}

/// How many times `event` was signalled since last asked (0 when never).
fn signalled(event: &EventFd) -> u64 {
    match event.read() {
        Ok(count) => count,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
        Err(e) => panic!("reading an eventfd: {e}"),
    }
}

#[test]
fn matching_writes_signal_the_ioeventfd_instead_of_exiting_until_unregistered() {
    if !kvm_available() {
        return;
    }
    let hypervisor = KvmHypervisor::new().expect("opening /dev/kvm");
    let mut test = build_vm(&hypervisor);
    let event = || EventFd::new(EFD_NONBLOCK).expect("an eventfd");
    let (two, five, six_as_u32, other_port) = (event(), event(), event(), event());
    let on_port = IoEventAddress::Pio(PORT);
    test.vm.register_ioevent(&two, on_port, Some(Datamatch::U16(2))).expect("registering 2");
    test.vm.register_ioevent(&five, on_port, Some(Datamatch::U16(5))).expect("registering 5");
    // A 16-bit write of 6 is not a 32-bit write of 6; a write to PORT is not one to the next port.
    test.vm.register_ioevent(&six_as_u32, on_port, Some(Datamatch::U32(6))).expect("registering 6 (32 bits)");
    test.vm.register_ioevent(&other_port, IoEventAddress::Pio(PORT + 1), Some(Datamatch::U16(3))).unwrap();

    assert_eq!(outs(&mut test.vcpu, 2), [1, 3], "the write of 2 left the guest");
    assert_eq!(signalled(&two), 1);

    test.vm.unregister_ioevent(&five, on_port, Some(Datamatch::U16(5))).expect("unregistering 5");
    assert_eq!(outs(&mut test.vcpu, 3), [4, 5, 6], "an unregistered or unmatched write did not leave the guest");
    assert_eq!([signalled(&two), signalled(&five), signalled(&six_as_u32), signalled(&other_port)], [0, 0, 0, 0]);
}

#[test]
fn unregistering_what_was_never_registered_is_an_error() {
    if !kvm_available() {
        return;
    }
    let hypervisor = KvmHypervisor::new().expect("opening /dev/kvm");
    let vm = hypervisor.create_vm().expect("creating a VM");
    let event = EventFd::new(EFD_NONBLOCK).unwrap();
    let address = IoEventAddress::Mmio(0xd000_0000);
    let error = vm.unregister_ioevent(&event, address, None).expect_err("nothing was registered");
    assert_eq!(error.operation, "KVM_IOEVENTFD (deassign)");
    vm.register_ioevent(&event, address, None).expect("registering");
    vm.unregister_ioevent(&event, address, None).expect("unregistering what was registered");
}

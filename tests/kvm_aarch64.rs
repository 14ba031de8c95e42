#![cfg(target_arch = "aarch64")]

//! The KVM aarch64 backend on its own, below the platform: a vCPU initialised with PSCI, an in-kernel GIC, boot
//! registers, and a hand-assembled guest that stores a byte to the PL011's address and then asks PSCI for
//! SYSTEM_OFF. Under qemu-user (the foreign targets' CI step) there is no KVM: the tests say SKIPPED and why.
//! They run for real inside the aarch64 emulated runner's L1 (case `kvm-aarch64` in ci/runner/linux.cases).

mod support;

use arch::aarch64::layout::{PL011_START, RAM_START};
use arch::aarch64::BootRegisters;
use hypervisor::aarch64::{VcpuAarch64, VmAarch64};
use hypervisor::kvm::KvmHypervisor;
use hypervisor::{Hypervisor, Vcpu, VcpuExit, Vm};
use support::kvm_available;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// The guest, at the start of RAM:
///   movz x0, #0x0900, lsl #16      x0 = PL011_START
///   movz w1, #'K'
///   strb w1, [x0]                  an MMIO write the VMM sees
///   movz w0, #0x0008
///   movk w0, #0x8400, lsl #16      w0 = PSCI_SYSTEM_OFF (0x84000008)
///   hvc  #0                        KVM's in-kernel PSCI: a SYSTEM_EVENT shutdown exit
///   b    .
const GUEST: [u32; 7] = [0xd2a1_2000, 0x5280_0961, 0x3900_0001, 0x5280_0100, 0x72b0_8000, 0xd400_0002, 0x1400_0000];

/// Enough interrupt IDs for the SGIs, PPIs and a first block of SPIs.
const GIC_IRQS: u32 = 64;

#[test]
fn a_vcpu_stores_to_the_uart_and_powers_off_through_psci() {
    if !kvm_available() {
        return;
    }
    assert_eq!(PL011_START, 0x0900_0000, "the guest's movz encodes this address");
    let hypervisor = KvmHypervisor::new().expect("opening /dev/kvm");
    let vm = hypervisor.create_vm().expect("creating a VM");
    let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(RAM_START), 2 << 20)]).unwrap();
    for (i, word) in GUEST.iter().enumerate() {
        memory.write_obj(word.to_le(), GuestAddress(RAM_START + 4 * i as u64)).unwrap();
    }
    let region = memory.iter().next().unwrap();
    // SAFETY: `memory` is this test's own anonymous mapping and outlives `vm` (declared before it is dropped at
    // the end of the test, after the VM).
    unsafe { vm.map_memory(0, RAM_START, region.len(), region.as_ptr() as u64) }.expect("mapping guest memory");
    let mut vcpu = vm.create_vcpu(0).expect("creating a vCPU");
    vm.init_vcpu(&vcpu, false).expect("KVM_ARM_VCPU_INIT with PSCI 0.2");
    vm.create_gic(1, GIC_IRQS).expect("creating the in-kernel GIC (v3, or v2 where only that is emulated)");
    // Affinity 0 for vCPU 0, and bit 31 (RES1) as every MPIDR_EL1 has it.
    let mpidr = vcpu.mpidr().expect("reading MPIDR_EL1");
    assert_eq!(mpidr & 0x80ff_ffff, 0x8000_0000, "MPIDR_EL1 {mpidr:#x}");
    vcpu.set_boot_registers(&BootRegisters::new(RAM_START, 0)).expect("setting the boot registers");

    let mut stores = Vec::new();
    let mut powered_off = false;
    for _ in 0..1000 {
        let outcome = match vcpu.run().expect("KVM_RUN") {
            VcpuExit::MmioWrite { addr, data } => {
                stores.push((addr, data.to_vec()));
                Ok(false)
            }
            VcpuExit::SystemPoweroff => Ok(true),
            VcpuExit::Interrupted => Ok(false),
            other => Err(format!("{other:?}")),
        };
        match outcome {
            Ok(true) => {
                powered_off = true;
                break;
            }
            Ok(false) => {}
            Err(exit) => panic!("unexpected exit {exit}\n{}", vcpu.dump_state()),
        }
    }
    assert_eq!(stores, vec![(PL011_START, vec![b'K'])], "the guest's one store reached the VMM");
    assert!(powered_off, "PSCI SYSTEM_OFF must end the run");
}

//! A hand-assembled guest on the hypervisor crate directly, below the platform: its memory, its runs, its exits.

use hypervisor::{Vcpu, VcpuExit, Vm};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// A VM with one vCPU and one region of guest memory, for a test to drive directly.
pub struct TestVm<V: Vm> {
    // Dropped before `memory`: the VM maps it.
    pub vcpu: V::Vcpu,
    pub vm: V,
    pub memory: GuestMemoryMmap<()>,
}

impl<V: Vm> TestVm<V> {
    /// `vm` (with whatever must exist before its vCPUs already made) with memory at `start` holding `contents`, as
    /// slot 0, and vCPU 0.
    pub fn new(vm: V, start: u64, contents: &[u8]) -> TestVm<V> {
        let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(start), contents.len())]).unwrap();
        memory.write_slice(contents, GuestAddress(start)).unwrap();
        let region = memory.iter().next().unwrap();
        // SAFETY: the mapping is `memory`'s own, anonymous, and TestVm drops it after the VM (field order).
        unsafe { vm.map_memory(0, start, region.len(), region.as_ptr() as u64) }.expect("mapping guest memory");
        let vcpu = vm.create_vcpu(0).expect("creating a vCPU");
        TestVm { vcpu, vm, memory }
    }
}

/// A copy of all of `memory` (one region, as [`map_guest_memory`] makes it).
pub fn memory_contents(memory: &GuestMemoryMmap<()>) -> Vec<u8> {
    let region = memory.iter().next().unwrap();
    let mut contents = vec![0u8; region.len() as usize];
    memory.read_slice(&mut contents, region.start_addr()).unwrap();
    contents
}

/// Runs `vcpu` until `pick` has taken `count` values from its exits, and returns them. Interrupted runs are
/// passed over; an exit `pick` does not take fails the test with the vCPU's state, and so do more than 100 runs
/// per value.
pub fn run_collecting<V: Vcpu, T>(
    vcpu: &mut V,
    count: usize,
    mut pick: impl FnMut(&VcpuExit<'_, V::ArchExit>) -> Option<T>,
) -> Vec<T> {
    let mut values = Vec::new();
    for _ in 0..count * 100 {
        let outcome = match vcpu.run().expect("KVM_RUN") {
            VcpuExit::Interrupted => Ok(None),
            exit => pick(&exit).map(Some).ok_or_else(|| format!("{exit:?}")),
        };
        match outcome {
            Ok(Some(value)) => {
                values.push(value);
                if values.len() == count {
                    return values;
                }
            }
            Ok(None) => {}
            Err(exit) => panic!("unexpected exit {exit}\n{}", vcpu.dump_state()),
        }
    }
    panic!("only {} of the {count} exits waited for", values.len());
}

/// Completes the instruction behind the last exit (KVM finishes an OUT or an MMIO store, and moves the PC past
/// it, on the next KVM_RUN), as a VMM pausing a vCPU does, so that the state read next is the one after it.
pub fn complete_pending_exit<V: Vcpu>(vcpu: &mut V) {
    vcpu.set_immediate_exit(true);
    let exit = vcpu.run().expect("KVM_RUN with immediate_exit");
    assert!(matches!(exit, VcpuExit::Interrupted), "immediate exit gave {exit:?}");
    vcpu.set_immediate_exit(false);
}

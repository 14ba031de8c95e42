//! What a PC's snapshot holds, and how a VM is built from one: the legacy devices, the PCI bus and virtio devices,
//! the in-kernel PIC/IOAPIC/PIT and clock, every vCPU. The order of the steps is `crate::snapshot`'s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arch::x86_64::{CpuidEntry, MsrEntry};
use hypervisor::x86_64::{VcpuX86_64, VmX86_64};
use hypervisor::Vm;
use snapshot::CpuIdentity;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{guest_cpuid, Pc, PcHypervisor, VcpuState, VmState};
use crate::cpu_model::GuestCpu;
use crate::platform::{Snapshots, VcpuOf};
use crate::snapshot::Component;
use crate::Error;

/// The CPUID registers whose bits are features a guest may rely on once it has seen them: leaf 1 ECX/EDX, leaf
/// 7.0 EBX/ECX/EDX, leaf 0xD.1 EAX (XSAVE variants), leaf 0x80000001 ECX/EDX.
const FEATURE_REGISTERS: &[(u32, u32, char)] = &[
    (1, 0, 'c'),
    (1, 0, 'd'),
    (7, 0, 'b'),
    (7, 0, 'c'),
    (7, 0, 'd'),
    (0xd, 1, 'a'),
    (0x8000_0001, 0, 'c'),
    (0x8000_0001, 0, 'd'),
];

impl<H: PcHypervisor> Snapshots<H> for Pc {
    type VcpuState = VcpuState;
    type VmState = VmState;

    const DEFAULT_MACHINE_NAME: &'static str = "pc";

    /// The vendor, and one name per feature bit of the guest's CPUID (`<leaf>.<subleaf>.<register>.<bit>`), so
    /// that a refusal names the bits a host lacks.
    fn cpu_identity(hypervisor: &H, vcpu_count: u8, cpu: &GuestCpu) -> Result<CpuIdentity, Error> {
        let leaves = guest_cpuid(&hypervisor.supported_cpuid()?, 0, vcpu_count, cpu);
        let leaf = |function: u32, index: u32| leaves.iter().find(|e| e.function == function && e.index == index);
        let vendor: String = leaf(0, 0)
            .map(|e| [e.ebx, e.edx, e.ecx].iter().flat_map(|r| r.to_le_bytes()).map(char::from).collect())
            .unwrap_or_default();
        let mut features = Vec::new();
        for &(function, index, register) in FEATURE_REGISTERS {
            let Some(entry) = leaf(function, index) else { continue };
            let bits = register_value(entry, register);
            features.extend(
                (0..32)
                    .filter(|bit| bits & (1 << bit) != 0)
                    .map(|bit| format!("{function:#x}.{index}.e{register}x.{bit}")),
            );
        }
        Ok(CpuIdentity::new(vendor, features))
    }

    fn components(&self) -> Vec<Component> {
        let mut components = vec![
            Component::new("serial0", self.serial.clone()),
            Component::new("i8042", self.i8042.clone()),
            Component::new("cmos", self.cmos.clone()),
            Component::new("acpi-pm", self.acpi_pm.clone()),
            Component::new("reset-port", self.reset_port.clone()),
        ];
        components.extend(self.virtio.iter().enumerate().map(|(index, slot)| slot.component(index)));
        if let Some(pci) = &self.pci {
            components.extend(pci.components());
        }
        components
    }

    /// The virtio devices, on virtio-mmio and on the PCI bus.
    fn quiesce_devices(&self) {
        self.virtio.iter().for_each(|slot| slot.quiesce());
        if let Some(pci) = &self.pci {
            pci.quiesce();
        }
    }

    fn resume_devices(&self) {
        self.virtio.iter().for_each(|slot| slot.resume());
        if let Some(pci) = &self.pci {
            pci.resume();
        }
    }

    fn save_vcpu(vcpu: &mut VcpuOf<H>) -> Result<VcpuState, String> {
        vcpu.save_state().map_err(|e| e.to_string())
    }

    /// The PIC, IOAPIC, PIT and clock.
    fn save_vm(vm: &H::Vm) -> Result<VmState, String> {
        vm.save_state().map_err(|e| e.to_string())
    }

    /// The TSC counts on while the vCPUs are held (KVM's guest TSC is the host's plus an offset), and the
    /// kvmclock with it. Two things keep the pair a guest reads consistent across a save:
    /// - Each TSC is moved to the moment the VM state was read (each was read on its vCPU's thread before).
    /// - The kvmclock saved is the one the guest sees: the time its kvmclock page (`MSR_KVM_SYSTEM_TIME_NEW`)
    ///   gives at vCPU 0's TSC, not KVM_GET_CLOCK's. The guest extrapolates its clock from that page at its TSC
    ///   rate, which can drift from the host's clock between KVM's updates of the page; restored to the host's
    ///   value, the guest's kvmclock would jump by that drift against the TSC, and Linux's clocksource watchdog
    ///   marks the TSC unstable for a skew of a fraction of a millisecond. QEMU saves the guest's value too.
    fn settle_saved_clocks(vcpus: &mut [VcpuState], ages: &[Duration], vm: &mut VmState, memory: &GuestMemoryMmap) {
        for (state, &age) in vcpus.iter_mut().zip(ages) {
            if let Some(tsc) = tsc_after(state, age) {
                if let Some(msr) = state.msrs.iter_mut().find(|m| m.index == MSR_IA32_TSC) {
                    msr.value = tsc;
                }
            }
        }
        if let Some(nanoseconds) = vcpus.first().and_then(|boot| guest_kvmclock(boot, memory)) {
            vm.clock.nanoseconds = nanoseconds;
        }
    }

    fn restore(
        &self,
        hypervisor: &H,
        vm: &Arc<H::Vm>,
        vcpu_states: &[VcpuState],
        vm_state: &VmState,
        cpu: &GuestCpu,
    ) -> Result<Vec<VcpuOf<H>>, Error> {
        if let Some(pci) = &self.pci {
            pci.refresh();
        }
        self.wire_vm(vm, None)?;
        // The clock first, then each vCPU with its TSC as saved plus the time since: that write is the vCPU's
        // first since its creation, and KVM takes a host write close to what the last one predicts as a
        // synchronisation and keeps the earlier offset (the vCPUs after the first share its offset; a later
        // correction would be ignored). Loaded before the clock, the TSCs ran ahead of it by the time the other
        // vCPUs and the irqchip took, and Linux's clocksource watchdog marked the TSC unstable.
        vm.restore_clock(&vm_state.clock).map_err(|e| Error::Snapshot(format!("cannot restore the clock: {e}")))?;
        let clock_set_at = Instant::now();
        let supported = hypervisor.supported_cpuid()?;
        let count = u8::try_from(vcpu_states.len()).map_err(|_| Error::Snapshot("too many vCPUs".into()))?;
        let mut vcpus = Vec::with_capacity(vcpu_states.len());
        for (id, saved) in (0..count).zip(vcpu_states) {
            let vcpu = vm.create_vcpu(u32::from(id))?;
            vcpu.set_cpuid(&guest_cpuid(&supported, id, count, cpu))?;
            let mut state = saved.clone();
            if let Some(tsc) = tsc_after(saved, clock_set_at.elapsed()) {
                // Alone and at once, rather than among the MSRs after the registers, XSAVE and LAPIC (which would
                // leave it behind by their time); the rest of the state follows without it. Its rate first: KVM
                // computes the offset at the write with the scaling then in force (`tsc_after` is `Some` only
                // with a rate).
                if let Some(khz) = saved.tsc_khz {
                    vcpu.restore_tsc_khz(khz).map_err(|e| Error::Snapshot(format!("cannot restore vCPU {id}: {e}")))?;
                }
                vcpu.set_msrs(&[MsrEntry { index: MSR_IA32_TSC, value: tsc }])
                    .map_err(|e| Error::Snapshot(format!("cannot restore vCPU {id}'s TSC: {e}")))?;
                state.msrs.retain(|m| m.index != MSR_IA32_TSC);
            }
            vcpu.restore_state(&state).map_err(|e| Error::Snapshot(format!("cannot restore vCPU {id}: {e}")))?;
            vcpus.push(vcpu);
        }
        vm.restore_state(vm_state).map_err(|e| Error::Snapshot(format!("cannot restore the irqchip: {e}")))?;
        Ok(vcpus)
    }
}

/// The TSC's MSR number.
const MSR_IA32_TSC: u32 = 0x10;

/// kvmclock's system-time MSR: the guest physical address of its time page, bit 0 the enable bit.
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;

/// The kvmclock a guest reads at the TSC in `state`: from the time page it registered (Linux's
/// `pvclock_vcpu_time_info`: version, pad, tsc_timestamp, system_time, tsc_to_system_mul, tsc_shift, ...), as
/// `system_time + ((tsc - tsc_timestamp) << tsc_shift) * tsc_to_system_mul >> 32`. `None` when the guest did not
/// register one, the page is not in guest memory, or KVM was updating it (odd version).
fn guest_kvmclock(state: &VcpuState, memory: &GuestMemoryMmap) -> Option<u64> {
    let msr = |index: u32| state.msrs.iter().find(|m| m.index == index).map(|m| m.value);
    let system_time_msr = msr(MSR_KVM_SYSTEM_TIME_NEW)?;
    if system_time_msr & 1 == 0 {
        return None;
    }
    let tsc = msr(MSR_IA32_TSC)?;
    let mut page = [0u8; 32];
    memory.read_slice(&mut page, GuestAddress(system_time_msr & !1)).ok()?;
    let u32_at = |at: usize| u32::from_le_bytes(page[at..at + 4].try_into().unwrap_or_default());
    let u64_at = |at: usize| u64::from_le_bytes(page[at..at + 8].try_into().unwrap_or_default());
    if u32_at(0) % 2 == 1 {
        return None;
    }
    let (tsc_timestamp, system_time, multiplier) = (u64_at(8), u64_at(16), u32_at(24));
    // The guest can write its page: a shift KVM never writes (it keeps them within ±31) is refused, not used.
    let shift = page[28] as i8;
    let delta = tsc.wrapping_sub(tsc_timestamp);
    let delta = if shift < 0 {
        delta.checked_shr(u32::from(shift.unsigned_abs()))?
    } else {
        delta.checked_shl(shift as u32)?
    };
    let nanoseconds = (u128::from(delta) * u128::from(multiplier)) >> 32;
    Some(system_time.wrapping_add(nanoseconds as u64))
}

/// `state`'s TSC `elapsed` later, at the vCPU's own TSC frequency; `None` when the state holds no TSC or no
/// frequency (then it is loaded as saved).
fn tsc_after(state: &VcpuState, elapsed: Duration) -> Option<u64> {
    let khz = u128::from(state.tsc_khz?);
    let tsc = state.msrs.iter().find(|m| m.index == MSR_IA32_TSC)?.value;
    let ticks = elapsed.as_nanos() * khz / 1_000_000;
    Some(tsc.wrapping_add(u64::try_from(ticks).unwrap_or(u64::MAX)))
}

fn register_value(entry: &CpuidEntry, register: char) -> u32 {
    match register {
        'a' => entry.eax,
        'b' => entry.ebx,
        'c' => entry.ecx,
        _ => entry.edx,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(tsc: u64, tsc_khz: Option<u32>) -> VcpuState {
        VcpuState {
            msrs: vec![MsrEntry { index: 0x3b, value: 7 }, MsrEntry { index: MSR_IA32_TSC, value: tsc }],
            tsc_khz,
            ..VcpuState::default()
        }
    }

    #[test]
    fn the_tsc_counts_on_at_the_vcpus_own_frequency() {
        // 2.5 GHz: 2,500,000 kHz, so 3 ms is 7,500,000 ticks.
        assert_eq!(tsc_after(&state(1_000, Some(2_500_000)), Duration::from_millis(3)), Some(7_501_000));
        assert_eq!(tsc_after(&state(u64::MAX, Some(1_000_000)), Duration::from_nanos(2_000)), Some(1_999), "wraps");
        assert_eq!(tsc_after(&state(5, None), Duration::from_secs(1)), None, "no frequency: as saved");
        assert_eq!(tsc_after(&VcpuState { tsc_khz: Some(1), ..VcpuState::default() }, Duration::ZERO), None);
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    /// A kvmclock time page at `at`: version 2, TSC 1,000 at 5 s, 1 GHz (multiplier 2^31 with shift 1).
    fn time_page(memory: &GuestMemoryMmap, at: u64, version: u32) {
        let mut page = [0u8; 32];
        page[0..4].copy_from_slice(&version.to_le_bytes());
        page[8..16].copy_from_slice(&1_000u64.to_le_bytes());
        page[16..24].copy_from_slice(&5_000_000_000u64.to_le_bytes());
        page[24..28].copy_from_slice(&(1u32 << 31).to_le_bytes());
        page[28] = 1;
        memory.write_slice(&page, GuestAddress(at)).unwrap();
    }

    fn with_kvmclock(mut vcpu: VcpuState, msr: u64) -> VcpuState {
        vcpu.msrs.push(MsrEntry { index: MSR_KVM_SYSTEM_TIME_NEW, value: msr });
        vcpu
    }

    #[test]
    fn the_saved_kvmclock_is_the_one_the_guest_reads_at_its_tsc() {
        let memory = memory();
        time_page(&memory, 0x2000, 2);
        // TSC 1,000 + 3,000,000 ticks at 1 GHz after the page: 3 ms after its 5 s.
        let vcpu = with_kvmclock(state(3_001_000, Some(1_000_000)), 0x2000 | 1);
        assert_eq!(guest_kvmclock(&vcpu, &memory), Some(5_003_000_000));
        assert_eq!(guest_kvmclock(&with_kvmclock(state(3_001_000, None), 0x2000), &memory), None, "not enabled");
        assert_eq!(guest_kvmclock(&state(3_001_000, None), &memory), None, "never registered");
        let outside = with_kvmclock(state(3_001_000, None), 0xfff0 | 1);
        assert_eq!(guest_kvmclock(&outside, &memory), None, "a page past guest memory");
        let mut hostile = [0u8; 32];
        hostile[28] = 100;
        memory.write_slice(&hostile, GuestAddress(0x4000)).unwrap();
        assert_eq!(guest_kvmclock(&with_kvmclock(state(1, None), 0x4000 | 1), &memory), None, "a shift past 63");
        hostile[28] = (-128i8) as u8;
        memory.write_slice(&hostile, GuestAddress(0x4000)).unwrap();
        assert_eq!(guest_kvmclock(&with_kvmclock(state(1, None), 0x4000 | 1), &memory), None, "a shift past -63");
        time_page(&memory, 0x3000, 3);
        assert_eq!(guest_kvmclock(&with_kvmclock(state(1, None), 0x3000 | 1), &memory), None, "being updated");
    }

    #[test]
    fn settling_a_save_ages_every_tsc_to_the_vm_state_and_takes_the_guests_clock() {
        let memory = memory();
        time_page(&memory, 0x2000, 2);
        let mut vcpus = vec![with_kvmclock(state(1_000, Some(1_000_000)), 0x2000 | 1), state(7, Some(1_000_000))];
        let ages = [Duration::from_millis(2), Duration::ZERO];
        let mut vm = VmState::default();
        vm.clock.nanoseconds = 42;
        <Pc as Snapshots<hypervisor::kvm::KvmHypervisor>>::settle_saved_clocks(&mut vcpus, &ages, &mut vm, &memory);
        let tsc = |vcpu: &VcpuState| vcpu.msrs.iter().find(|m| m.index == MSR_IA32_TSC).unwrap().value;
        assert_eq!(tsc(&vcpus[0]), 2_001_000, "2 ms at 1 GHz later");
        assert_eq!(vcpus[0].msrs[0], MsrEntry { index: 0x3b, value: 7 }, "other MSRs as they were");
        assert_eq!(tsc(&vcpus[1]), 7, "read at the VM's moment: unchanged");
        assert_eq!(vm.clock.nanoseconds, 5_002_000_000, "the guest's clock at vCPU 0's aged TSC");
    }
}

//! What a PC's snapshot holds, and how a VM is built from one: the legacy devices, the PCI bus and virtio devices,
//! the in-kernel PIC/IOAPIC/PIT and clock, every vCPU. The order of the steps is `crate::snapshot`'s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arch::x86_64::{cpuid, CpuidEntry, MsrEntry};
use hypervisor::x86_64::{VcpuX86_64, VmX86_64};
use hypervisor::Vm;
use snapshot::CpuIdentity;

use super::{Pc, PcHypervisor, VcpuState, VmState};
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

    /// Restores are implemented here.
    fn check_restore_supported() -> Result<(), Error> {
        Ok(())
    }

    /// The vendor, and one name per feature bit of the guest's CPUID (`<leaf>.<subleaf>.<register>.<bit>`), so
    /// that a refusal names the bits a host lacks.
    fn cpu_identity(hypervisor: &H, vcpu_count: u8) -> Result<CpuIdentity, Error> {
        let leaves = cpuid::normalise(&hypervisor.supported_cpuid()?, 0, vcpu_count);
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

    /// The TSC counts on while the vCPUs are held (KVM's guest TSC is the host's plus an offset), and the kvmclock
    /// with it. A TSC read `age` before the clock and restored beside it would leave the two `age` apart, and
    /// Linux's clocksource watchdog marks the TSC unstable for a skew of a fraction of a millisecond (QEMU instead
    /// derives the clock from vCPU 0's TSC and the guest's kvmclock page). Each TSC is moved to the clock's moment.
    fn age_vcpu_state(state: &mut VcpuState, age: Duration) {
        if let Some(tsc) = tsc_after(state, age) {
            if let Some(msr) = state.msrs.iter_mut().find(|m| m.index == MSR_IA32_TSC) {
                msr.value = tsc;
            }
        }
    }

    /// Where the PCI BARs decode follows from the devices' loaded states, then the same wiring as `boot`, the
    /// vCPUs (with the CPUID a boot gives them), and the irqchip and clock last (the clock starts from its saved
    /// value as close to the vCPUs' start as possible).
    fn restore(
        &self,
        hypervisor: &H,
        vm: &Arc<H::Vm>,
        vcpu_states: &[VcpuState],
        vm_state: &VmState,
    ) -> Result<Vec<VcpuOf<H>>, Error> {
        if let Some(pci) = &self.pci {
            pci.refresh();
        }
        self.wire_vm(vm, None)?;
        let supported = hypervisor.supported_cpuid()?;
        let count = u8::try_from(vcpu_states.len()).map_err(|_| Error::Snapshot("too many vCPUs".into()))?;
        let mut vcpus = Vec::with_capacity(vcpu_states.len());
        for (id, saved) in (0..count).zip(vcpu_states) {
            let vcpu = vm.create_vcpu(u32::from(id))?;
            vcpu.set_cpuid(&cpuid::normalise(&supported, id, count))?;
            vcpu.restore_state(saved).map_err(|e| Error::Snapshot(format!("cannot restore vCPU {id}: {e}")))?;
            vcpus.push(vcpu);
        }
        vm.restore_state(vm_state)
            .map_err(|e| Error::Snapshot(format!("cannot restore the irqchip and clock: {e}")))?;
        // KVM_SET_CLOCK set the kvmclock as of now, while each TSC loaded above has counted on since its vCPU was
        // restored: load them again, each as the saved count plus the time since the clock was set, so the two
        // clocks start together as they were saved (see `age_vcpu_state`).
        let clock_set_at = Instant::now();
        for (id, (vcpu, saved)) in vcpus.iter().zip(vcpu_states).enumerate() {
            if let Some(tsc) = tsc_after(saved, clock_set_at.elapsed()) {
                vcpu.set_msrs(&[MsrEntry { index: MSR_IA32_TSC, value: tsc }])
                    .map_err(|e| Error::Snapshot(format!("cannot restore vCPU {id}'s TSC: {e}")))?;
            }
        }
        Ok(vcpus)
    }
}

/// The TSC's MSR number.
const MSR_IA32_TSC: u32 = 0x10;

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

    #[test]
    fn aging_a_saved_vcpu_moves_its_tsc_only() {
        let mut saved = state(1_000, Some(1_000_000));
        <Pc as Snapshots<hypervisor::kvm::KvmHypervisor>>::age_vcpu_state(&mut saved, Duration::from_micros(500));
        assert_eq!(
            saved.msrs,
            vec![MsrEntry { index: 0x3b, value: 7 }, MsrEntry { index: MSR_IA32_TSC, value: 501_000 }]
        );
    }
}

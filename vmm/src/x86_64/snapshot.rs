//! What a PC's snapshot holds, and how a VM is built from one: the legacy devices, the PCI bus and virtio devices,
//! the in-kernel PIC/IOAPIC/PIT and clock, every vCPU. The order of the steps is `crate::snapshot`'s.

use std::sync::Arc;

use arch::x86_64::{cpuid, CpuidEntry};
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
        self.wire_vm(vm)?;
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
        Ok(vcpus)
    }
}

fn register_value(entry: &CpuidEntry, register: char) -> u32 {
    match register {
        'a' => entry.eax,
        'b' => entry.ebx,
        'c' => entry.ecx,
        _ => entry.edx,
    }
}

//! Snapshots on the `virt` platform: not implemented yet. The pieces exist below the platform (every vCPU
//! register by ONE_REG list and the PSCI state, `VmAarch64::{save_gic_state, restore_gic_state}`, the PL011 and
//! PL061 states), but the restore order (vCPUs initialised, GIC created for them, then redistributors loaded per
//! MPIDR) has not been wired and tested on an aarch64 host. Until it is, a save fails and a restore is refused
//! before anything is built, each with one line that says so.

use std::sync::Arc;

use hypervisor::aarch64::{VcpuAarch64, VmAarch64};
use hypervisor::{Hypervisor, Vm};
use snapshot::CpuIdentity;

use super::{Platform, VcpuState, VmState};
use crate::snapshot::Component;
use crate::Error;

const NOT_YET: &str = "snapshots are not implemented on aarch64 yet";

impl Platform {
    /// The machine type a snapshot would record when the command line names none.
    pub const DEFAULT_MACHINE_NAME: &'static str = "virt";

    /// Refuses `-incoming` before the machine is built.
    pub fn check_restore_supported() -> Result<(), Error> {
        Err(Error::Unsupported(format!("cannot restore: {NOT_YET}")))
    }

    /// No CPU identity is recorded while snapshots are refused.
    pub fn cpu_identity<H: Hypervisor>(_hypervisor: &H, _vcpu_count: u8) -> Result<CpuIdentity, Error> {
        Ok(CpuIdentity::default())
    }

    /// The devices whose states exist so far.
    pub fn components(&self) -> Vec<Component> {
        let mut components =
            vec![Component::new("pl011", self.uart.clone()), Component::new("pl061", self.gpio.clone())];
        components.extend(self.virtio.iter().enumerate().map(|(index, slot)| slot.component(index)));
        components
    }

    pub fn quiesce_devices(&self) {
        self.virtio.iter().for_each(|slot| slot.quiesce());
    }

    pub fn resume_devices(&self) {
        self.virtio.iter().for_each(|slot| slot.resume());
    }

    pub fn save_vcpu<C: VcpuAarch64>(vcpu: &mut C) -> Result<VcpuState, String> {
        vcpu.save_state().map_err(|e| e.to_string())
    }

    /// Fails every save, before anything is written.
    pub fn save_vm<V: VmAarch64>(_vm: &V) -> Result<VmState, String> {
        Err(NOT_YET.into())
    }

    pub fn restore<H: Hypervisor>(
        &self,
        _hypervisor: &H,
        _vm: &Arc<H::Vm>,
        _vcpu_states: &[VcpuState],
        _vm_state: &VmState,
    ) -> Result<Vec<<H::Vm as Vm>::Vcpu>, Error> {
        Err(Error::Unsupported(format!("cannot restore: {NOT_YET}")))
    }
}

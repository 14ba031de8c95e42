//! Snapshots on the `virt` platform: not implemented yet. The pieces exist below the platform (every vCPU
//! register by ONE_REG list and the PSCI state, `VmAarch64::{save_gic_state, restore_gic_state}`, the PL011 and
//! PL061 states), but the restore order (vCPUs initialised, GIC created for them, then redistributors loaded per
//! MPIDR) has not been wired and tested on an aarch64 host. Until it is, a save fails and a restore is refused
//! before anything is built, each with one line that says so.

use std::sync::Arc;

use hypervisor::aarch64::VcpuAarch64;
use snapshot::CpuIdentity;

use super::{VcpuState, Virt, VirtHypervisor, VmState};
use crate::platform::{Snapshots, VcpuOf};
use crate::snapshot::Component;
use crate::Error;

const NOT_YET: &str = "snapshots are not implemented on aarch64 yet";

impl<H: VirtHypervisor> Snapshots<H> for Virt {
    type VcpuState = VcpuState;
    type VmState = VmState;

    /// The machine type a snapshot would record when the command line names none.
    const DEFAULT_MACHINE_NAME: &'static str = "virt";

    /// Refuses `-incoming` before the machine is built.
    fn check_restore_supported() -> Result<(), Error> {
        Err(Error::Unsupported(format!("cannot restore: {NOT_YET}")))
    }

    /// No CPU identity is recorded while snapshots are refused.
    fn cpu_identity(_hypervisor: &H, _vcpu_count: u8) -> Result<CpuIdentity, Error> {
        Ok(CpuIdentity::default())
    }

    /// The devices whose states exist so far.
    fn components(&self) -> Vec<Component> {
        let mut components =
            vec![Component::new("pl011", self.uart.clone()), Component::new("pl061", self.gpio.clone())];
        components.extend(self.virtio.iter().enumerate().map(|(index, slot)| slot.component(index)));
        components
    }

    fn quiesce_devices(&self) {
        self.virtio.iter().for_each(|slot| slot.quiesce());
    }

    fn resume_devices(&self) {
        self.virtio.iter().for_each(|slot| slot.resume());
    }

    fn save_vcpu(vcpu: &mut VcpuOf<H>) -> Result<VcpuState, String> {
        vcpu.save_state().map_err(|e| e.to_string())
    }

    /// Fails every save, before anything is written.
    fn save_vm(_vm: &H::Vm) -> Result<VmState, String> {
        Err(NOT_YET.into())
    }

    fn restore(
        &self,
        _hypervisor: &H,
        _vm: &Arc<H::Vm>,
        _vcpu_states: &[VcpuState],
        _vm_state: &VmState,
    ) -> Result<Vec<VcpuOf<H>>, Error> {
        Err(Error::Unsupported(format!("cannot restore: {NOT_YET}")))
    }
}

//! aarch64 extensions: the in-kernel GIC, vCPU initialisation (PSCI, secondaries powered off), boot registers and
//! the MPIDR the FDT must name each vCPU by.

use arch::aarch64::{BootRegisters, GicVersion};

use crate::{Result, Vcpu, Vm};

pub trait VmAarch64: Vm {
    /// Makes `vcpu` an ARMv8 CPU of the host's preferred type with PSCI 0.2 in the hypervisor. A vCPU started
    /// `powered_off` waits for the guest's PSCI CPU_ON, which the hypervisor handles without the VMM.
    fn init_vcpu(&self, vcpu: &Self::Vcpu, powered_off: bool) -> Result<()>;

    /// Creates and initialises the in-kernel GIC at `arch::aarch64::layout`'s addresses, with redistributors for
    /// `vcpu_count` vCPUs and `irq_count` interrupt IDs (SGIs, PPIs and SPIs together). Must come after every vCPU
    /// has been created and before any runs. A GICv3 when the host can emulate one, else a GICv2; returns which.
    fn create_gic(&self, vcpu_count: u32, irq_count: u32) -> Result<GicVersion>;
}

pub trait VcpuAarch64: Vcpu {
    /// Loads the boot protocol's registers (PC, PSTATE, X0-X3); everything else keeps its reset value.
    fn set_boot_registers(&self, regs: &BootRegisters) -> Result<()>;

    /// The vCPU's MPIDR_EL1, which the hypervisor assigns and the FDT's cpu nodes must match.
    fn mpidr(&self) -> Result<u64>;
}

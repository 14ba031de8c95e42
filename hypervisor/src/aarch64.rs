//! aarch64 extensions: the in-kernel GIC, vCPU initialisation (PSCI, secondaries powered off), boot registers,
//! the MPIDR the FDT must name each vCPU by, and the vCPU state a snapshot holds.

use arch::aarch64::{BootRegisters, GicVersion};
use serde::{Deserialize, Serialize};

use crate::{Result, Vcpu, Vm};

pub trait VmAarch64: Vm {
    /// Makes `vcpu` an ARMv8 CPU of the host's preferred type with PSCI 0.2 in the hypervisor. A vCPU started
    /// `powered_off` waits for the guest's PSCI CPU_ON, which the hypervisor handles without the VMM.
    fn init_vcpu(&self, vcpu: &Self::Vcpu, powered_off: bool) -> Result<()>;

    /// Creates and initialises the in-kernel GIC at `arch::aarch64::layout`'s addresses, with redistributors for
    /// `vcpu_count` vCPUs and `irq_count` interrupt IDs (SGIs, PPIs and SPIs together). Must come after every vCPU
    /// has been created and before any runs. A GICv3 when the host can emulate one, else a GICv2; returns which.
    ///
    /// Its state (distributor and redistributor registers, the CPU interfaces' ICC_* system registers, line
    /// levels) cannot be saved yet: a snapshot of an aarch64 VM needs that next (issue 16), through the vGIC
    /// device's KVM_DEV_ARM_VGIC_GRP_DIST_REGS, REDIST_REGS, CPU_SYSREGS and LEVEL_INFO attributes.
    fn create_gic(&self, vcpu_count: u32, irq_count: u32) -> Result<GicVersion>;
}

pub trait VcpuAarch64: Vcpu {
    /// Loads the boot protocol's registers (PC, PSTATE, X0-X3); everything else keeps its reset value.
    fn set_boot_registers(&self, regs: &BootRegisters) -> Result<()>;

    /// The vCPU's MPIDR_EL1, which the hypervisor assigns and the FDT's cpu nodes must match.
    fn mpidr(&self) -> Result<u64>;

    /// Every register the hypervisor lists for this vCPU, and its power state, as data. The vCPU must be
    /// initialised and outside `run`, and an MMIO exit completed by one more `run` (with `set_immediate_exit`).
    fn save_state(&self) -> Result<VcpuStateAarch64>;

    /// Loads a saved [`VcpuStateAarch64`] into an initialised vCPU that has not run yet. Register ids, sizes and
    /// the count are checked against this vCPU's register list before anything is written; a hypervisor refusal
    /// part-way leaves the vCPU unfit to run (the caller discards it).
    fn restore_state(&self, state: &VcpuStateAarch64) -> Result<()>;
}

/// One register, by its hypervisor id (KVM's ONE_REG encoding: architecture, size, and the register group and
/// number; for system registers the op0/op1/CRn/CRm/op2 encoding of the architecture), little-endian bytes as long
/// as the id's size field says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Register {
    pub id: u64,
    pub value: Vec<u8>,
}

/// A vCPU's power state as PSCI sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PowerState {
    #[default]
    Runnable,
    /// Off (never started, or after PSCI CPU_OFF): waits for a CPU_ON.
    Stopped,
    /// In PSCI SYSTEM_SUSPEND, waiting for a wake-up event.
    Suspended,
}

/// One aarch64 vCPU's state: the core registers (X0-X30, SP, PC, PSTATE, the EL1 banked registers, the FP/SIMD
/// registers), the system registers (including the virtual and physical timers' CTL, CVAL and counter), and the
/// firmware pseudo-registers (PSCI version, SMCCC workarounds), all as the hypervisor lists them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuStateAarch64 {
    pub registers: Vec<Register>,
    pub power_state: PowerState,
}

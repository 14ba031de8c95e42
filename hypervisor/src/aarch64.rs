//! aarch64 extensions: the in-kernel GIC, vCPU initialisation (PSCI, secondaries powered off), boot registers,
//! the MPIDR the FDT must name each vCPU by, and the vCPU state a snapshot holds.

use arch::aarch64::layout::GicLayout;
use arch::aarch64::{BootRegisters, GicVersion};
use serde::{Deserialize, Serialize};

use crate::{Result, Vcpu, Vm};

pub trait VmAarch64: Vm {
    /// Makes `vcpu` an ARMv8 CPU of the host's preferred type with PSCI 0.2 in the hypervisor. A vCPU started
    /// `powered_off` waits for the guest's PSCI CPU_ON, which the hypervisor handles without the VMM.
    fn init_vcpu(&self, vcpu: &Self::Vcpu, powered_off: bool) -> Result<()>;

    /// Creates and initialises the in-kernel GIC at the machine's `layout`, with redistributors for `vcpu_count`
    /// vCPUs (at most as many as the layout has room for) and `irq_count` interrupt IDs (SGIs, PPIs and SPIs
    /// together). Must come after every vCPU has been created and before any runs. A GICv3 when the host can emulate
    /// one, else a GICv2; returns which.
    fn create_gic(&self, layout: &GicLayout, vcpu_count: u32, irq_count: u32) -> Result<GicVersion>;

    /// Adds a GICv3 ITS (interrupt translation service) with its register frame at `base`, so that PCI functions'
    /// MSIs (written to its GITS_TRANSLATER) become LPIs; from then on every MSI carries its sender's device ID.
    /// Must come after `create_gic` made a GICv3 and before any vCPU runs.
    fn create_its(&self, base: u64) -> Result<()>;

    /// The GICv3's state as data: distributor, each vCPU's redistributor and CPU interface (named by the vCPUs'
    /// MPIDRs, in vCPU order), and the SPIs' input line levels; with an ITS, its registers and each
    /// redistributor's LPI registers, after the ITS's tables and the pending LPIs were written to guest memory
    /// (so this must come before guest memory is saved). Every vCPU must be outside `run`. A GICv2 is refused.
    fn save_gic_state(&self, mpidrs: &[u64]) -> Result<GicStateAarch64>;

    /// Loads a saved [`GicStateAarch64`] into the GICv3 of a VM built the same way (vCPU count, interrupt count,
    /// an ITS or none), before any vCPU runs and after guest memory (which holds the ITS's tables) was loaded.
    /// The register layout is checked against this GIC's first; a refused state changes nothing.
    fn restore_gic_state(&self, mpidrs: &[u64], state: &GicStateAarch64) -> Result<()>;

    /// The MPIDRs of the vCPUs `init_vcpu` initialised, in that order: what the GIC's redistributors and CPU
    /// interfaces are named by, for a save made where only the VM is at hand.
    fn vcpu_mpidrs(&self) -> Vec<u64>;
}

/// The exits only aarch64 has: none reaches the VMM yet. PSCI's SYSTEM_RESET and SYSTEM_OFF come as the
/// common `VcpuExit::SystemReset`/`SystemPoweroff`, and the hypervisor handles CPU_ON and CPU_OFF itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitAarch64 {}

pub trait VcpuAarch64: Vcpu<ArchExit = ExitAarch64> {
    /// Loads the boot protocol's registers (PC, PSTATE, X0-X3); everything else keeps its reset value.
    fn set_boot_registers(&self, regs: &BootRegisters) -> Result<()>;

    /// The vCPU's MPIDR_EL1, which the hypervisor assigns and the FDT's cpu nodes must match.
    fn mpidr(&self) -> Result<u64>;

    /// One 64-bit register by its id (see [`Register`]), such as an ID register a snapshot's CPU identity is
    /// made of. The vCPU must be initialised.
    fn read_register(&self, id: u64) -> Result<u64>;

    /// Every register the hypervisor lists for this vCPU, and its power state, as data. The vCPU must be
    /// initialised and outside `run`, and an MMIO exit completed by one more `run` (with `set_immediate_exit`).
    fn save_state(&self) -> Result<VcpuStateAarch64>;

    /// Loads a saved [`VcpuStateAarch64`] into an initialised vCPU that has not run yet. Register ids, sizes and
    /// the count are checked against this vCPU's register list before anything is written; a hypervisor refusal
    /// part-way leaves the vCPU unfit to run (the caller discards it).
    fn restore_state(&self, state: &VcpuStateAarch64) -> Result<()>;
}

/// The id of a 64-bit system register (see [`Register`]) by its architectural encoding (op0, op1, CRn, CRm, op2):
/// KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM64_SYSREG, then the encoding in the low 16 bits.
pub const fn system_register_id(op0: u64, op1: u64, crn: u64, crm: u64, op2: u64) -> u64 {
    0x6030_0000_0013_0000 | (op0 << 14) | (op1 << 11) | (crn << 7) | (crm << 3) | op2
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

/// One 32-bit GIC register by its offset in the distributor or redistributor frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GicRegister {
    pub offset: u32,
    pub value: u32,
}

/// One GIC CPU interface system register (ICC_*_EL1) by its encoding (op0, op1, CRn, CRm, op2 packed as in
/// MRS/MSR).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GicSystemRegister {
    pub encoding: u16,
    pub value: u64,
}

/// One vCPU's part of the GICv3: its redistributor (SGIs and PPIs) and its CPU interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GicCpuState {
    pub mpidr: u64,
    pub redistributor: Vec<GicRegister>,
    pub cpu_interface: Vec<GicSystemRegister>,
    /// With an ITS: the redistributor's LPI registers (GICR_PROPBASER and GICR_PENDBASER as 32-bit halves, then
    /// GICR_CTLR with EnableLPIs). Absent without one, as in snapshots from before the ITS.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lpis: Vec<GicRegister>,
}

/// One 64-bit register of the GICv3 ITS by its offset in the ITS's control frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GicItsRegister {
    pub offset: u32,
    pub value: u64,
}

/// A GICv3's state: registers in the order they are restored in.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GicStateAarch64 {
    /// GICD_CTLR and the SPIs' group, routing, configuration, priority, pending, active and enable bits.
    pub distributor: Vec<GicRegister>,
    /// The SPIs' input line levels, one word per 32 interrupts from interrupt 32.
    pub line_levels: Vec<u32>,
    pub cpus: Vec<GicCpuState>,
    /// The ITS's registers, on a VM with one (PCI devices): GITS_CBASER, GITS_IIDR, the GITS_BASERn, GITS_CWRITER,
    /// GITS_CREADR, and GITS_CTLR last. Its device, collection and interrupt translation tables, and the
    /// pending LPIs, are in guest memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub its: Option<Vec<GicItsRegister>>,
}

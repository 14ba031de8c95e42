//! x86_64 extensions: CPUID, MSRs, the PC irqchip and boot register state.

use arch::x86_64::{CpuState, CpuidEntry, MsrEntry};

use crate::{Hypervisor, Result, Vcpu, Vm};

pub trait HypervisorX86_64: Hypervisor {
    /// The CPUID leaves this hypervisor can present to a guest, before per-VM normalisation.
    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>>;
}

pub trait VmX86_64: Vm {
    /// Creates the PC interrupt controllers (dual 8259, IOAPIC, local APICs) and the 8254 PIT inside the
    /// hypervisor. Must come before the first vCPU is created.
    fn create_pc_irqchip(&self, tss_address: u64) -> Result<()>;
}

pub trait VcpuX86_64: Vcpu {
    fn set_cpuid(&self, entries: &[CpuidEntry]) -> Result<()>;
    fn set_msrs(&self, msrs: &[MsrEntry]) -> Result<()>;
    /// Loads registers, segments, control registers and FPU state; everything else keeps its reset value.
    fn set_cpu_state(&self, state: &CpuState) -> Result<()>;
    /// Wires local APIC LINT0 to ExtINT (the 8259) and LINT1 to NMI, as firmware does on a PC.
    fn set_lapic_lints(&self) -> Result<()>;
}

//! x86_64 extensions: CPUID, MSRs, the PC irqchip and boot register state, and the vCPU and VM state a snapshot
//! holds.

use arch::x86_64::cpu_state::{DescriptorTable, GeneralRegisters, Segment};
use arch::x86_64::layout::PcIrqchipLayout;
use arch::x86_64::{CpuState, CpuidEntry, MsrEntry};
use serde::{Deserialize, Serialize};

use crate::{Hypervisor, Result, Vcpu, Vm};

pub trait HypervisorX86_64: Hypervisor {
    /// The CPUID leaves this hypervisor can present to a guest, before per-VM normalisation.
    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>>;
}

pub trait VmX86_64: Vm {
    /// Creates the PC interrupt controllers (dual 8259, IOAPIC, local APICs) and the 8254 PIT inside the
    /// hypervisor, laid out and wired as the machine's `layout` says. Must come before the first vCPU is created.
    fn create_pc_irqchip(&self, layout: &PcIrqchipLayout) -> Result<()>;

    /// The in-kernel PICs, IOAPIC and PIT and the paravirtual clock, as data. Every vCPU must be stopped (outside
    /// `run`), or the state read is already stale.
    fn save_state(&self) -> Result<VmStateX86_64>;

    /// Loads a saved [`VmStateX86_64`]'s irqchip (PICs, IOAPIC) and PIT into a VM made by
    /// [`create_pc_irqchip`](Self::create_pc_irqchip). The state is checked first (against that layout's IOAPIC
    /// too); a refused one changes nothing. The clock is not loaded here: see [`restore_clock`](Self::restore_clock).
    fn restore_state(&self, state: &VmStateX86_64) -> Result<()>;

    /// Sets the paravirtual clock to its saved value, from now on. Apart from the irqchip because its moment
    /// matters: the vCPUs' TSCs must be loaded relative to it (see the platform's restore).
    fn restore_clock(&self, clock: &ClockState) -> Result<()>;
}

/// The exits only x86_64 has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitX86_64 {
    /// The guest's CPU shut down: a triple fault (or an equivalent unrecoverable condition).
    TripleFault,
}

pub trait VcpuX86_64: Vcpu<ArchExit = ExitX86_64> {
    fn set_cpuid(&self, entries: &[CpuidEntry]) -> Result<()>;
    fn set_msrs(&self, msrs: &[MsrEntry]) -> Result<()>;
    /// Loads registers, segments, control registers and FPU state; everything else keeps its reset value.
    fn set_cpu_state(&self, state: &CpuState) -> Result<()>;
    /// Wires local APIC LINT0 to ExtINT (the 8259) and LINT1 to NMI, as firmware does on a PC.
    fn set_lapic_lints(&self) -> Result<()>;

    /// Everything this vCPU's guest can observe, as data. The vCPU must be outside `run`, and an I/O or MMIO exit
    /// must have been completed by one more `run` (with `set_immediate_exit`) first: until then the instruction
    /// behind the exit is half done and RIP still points at it.
    fn save_state(&self) -> Result<VcpuStateX86_64>;

    /// Loads a saved [`VcpuStateX86_64`] into a vCPU of a VM whose irqchip exists and whose CPUID is already set
    /// (the MSRs a guest may have depend on its CPUID). Lengths, counts and MSR indices are checked before
    /// anything is written; a hypervisor refusal part-way leaves the vCPU unfit to run (the caller discards it).
    fn restore_state(&self, state: &VcpuStateX86_64) -> Result<()>;

    /// Makes the guest's TSC run at `khz` (as `restore_state` does first). A TSC written before the rate is set
    /// would be scaled anew by the later change, so a restore that writes the TSC on its own sets the rate first.
    fn restore_tsc_khz(&self, khz: u32) -> Result<()>;
}

/// Segments, descriptor tables, control registers, EFER and the APIC base: all of them, where the boot state
/// ([`arch::x86_64::cpu_state::SpecialRegisters`]) has only what a boot protocol sets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecialRegisters {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
    /// An external interrupt pending injection, one bit per vector (only used without an in-kernel LAPIC).
    pub interrupt_bitmap: [u64; 4],
}

/// The legacy FXSAVE-format state: x87 and SSE. XSAVE, where the host has it, holds the same and more; both
/// are kept so that a host without XSAVE still restores the FPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FpuState {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

/// One extended control register (XCR0 is the one that matters).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtendedControlRegister {
    pub index: u32,
    pub value: u64,
}

/// Exceptions, interrupts, NMIs and SMIs in flight between the CPU and the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuEvents {
    pub exception_injected: bool,
    pub exception_pending: bool,
    pub exception_vector: u8,
    pub exception_error_code: Option<u32>,
    /// The exception's payload (CR2 or DR6) when the hypervisor delivers it separately, if enabled.
    pub exception_payload: Option<u64>,
    pub interrupt_injected: bool,
    pub interrupt_vector: u8,
    pub interrupt_soft: bool,
    /// STI or MOV SS blocking for one instruction (the hypervisor's interrupt shadow bits).
    pub interrupt_shadow: u8,
    pub nmi_injected: bool,
    pub nmi_pending: bool,
    pub nmi_masked: bool,
    pub sipi_vector: u32,
    pub smm: bool,
    pub smi_pending: bool,
    pub smm_inside_nmi: bool,
    pub latched_init: bool,
    /// Present where the hypervisor reports it.
    pub triple_fault_pending: Option<bool>,
}

/// The debug registers DR0-DR3, DR6 and DR7.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DebugRegisters {
    pub db: [u64; 4],
    pub dr6: u64,
    pub dr7: u64,
}

/// Where the vCPU is in its life: running, halted, waiting for INIT/SIPI...
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MpState {
    #[default]
    Runnable,
    Uninitialized,
    InitReceived,
    Halted,
    SipiReceived,
}

/// One x86_64 vCPU's state. Restored in the order documented at the backend's `restore_state`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuStateX86_64 {
    pub regs: GeneralRegisters,
    pub sregs: SpecialRegisters,
    pub fpu: FpuState,
    /// The XSAVE area as the hypervisor lays it out (the hardware's standard format), or `None` without XSAVE.
    pub xsave: Option<Vec<u8>>,
    pub xcrs: Vec<ExtendedControlRegister>,
    /// The MSRs the hypervisor saves that make up guest-visible state, TSC first.
    pub msrs: Vec<MsrEntry>,
    /// The local APIC's register page (1 KiB, the registers at their MMIO offsets).
    pub lapic: Vec<u8>,
    pub events: VcpuEvents,
    pub mp_state: MpState,
    pub debug_regs: DebugRegisters,
    /// The guest's TSC frequency, when the hypervisor reports it.
    pub tsc_khz: Option<u32>,
}

/// One 8259 PIC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PicState {
    pub last_irr: u8,
    pub irr: u8,
    pub imr: u8,
    pub isr: u8,
    pub priority_add: u8,
    pub irq_base: u8,
    pub read_reg_select: u8,
    pub poll: u8,
    pub special_mask: u8,
    pub init_state: u8,
    pub auto_eoi: u8,
    pub rotate_on_auto_eoi: u8,
    pub special_fully_nested_mode: u8,
    pub init4: u8,
    pub elcr: u8,
    pub elcr_mask: u8,
}

/// The IOAPIC.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IoapicState {
    pub base_address: u64,
    pub ioregsel: u32,
    pub id: u32,
    pub irr: u32,
    /// One 64-bit entry per pin.
    pub redirection_table: Vec<u64>,
}

/// One 8254 PIT channel. The time its count was loaded is not kept: it is a host clock reading, and the
/// hypervisor reloads every count at restore anyway.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PitChannelState {
    pub count: u32,
    pub latched_count: u16,
    pub count_latched: u8,
    pub status_latched: u8,
    pub status: u8,
    pub read_state: u8,
    pub write_state: u8,
    pub write_latch: u8,
    pub rw_mode: u8,
    pub mode: u8,
    pub bcd: u8,
    pub gate: u8,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PitState {
    pub channels: [PitChannelState; 3],
    /// The hypervisor's PIT flags (HPET legacy routing, speaker).
    pub flags: u32,
}

/// The hypervisor's paravirtual clock (kvmclock's base), in nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClockState {
    pub nanoseconds: u64,
    /// Whether the clock read was stable across every vCPU's TSC (informative; not loaded).
    pub tsc_stable: bool,
}

/// The VM-wide state of an x86_64 VM with the PC irqchip.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmStateX86_64 {
    pub pic_master: PicState,
    pub pic_slave: PicState,
    pub ioapic: IoapicState,
    pub pit: PitState,
    pub clock: ClockState,
}

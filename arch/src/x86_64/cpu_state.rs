//! The register state a vCPU starts from, as plain data. The hypervisor backend translates it to its own
//! structures, keeping whatever this does not mention (APIC base, CR8, ...) at the hypervisor's reset values.
//! The pieces a saved vCPU state shares with it (general registers, segments, descriptor tables, MSRs) are these
//! same types, hence serde: `hypervisor::x86_64::VcpuStateX86_64` is built from them.

use serde::{Deserialize, Serialize};

/// A segment register in its unpacked (VMCS/VMCB-like) form.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    /// Descriptor type nibble (e.g. 0xb = execute/read accessed code, 0x3 = read/write accessed data).
    pub type_: u8,
    pub present: bool,
    pub dpl: u8,
    /// Default operation size (1 = 32-bit).
    pub db: bool,
    /// 1 for code/data segments, 0 for system segments (TSS, LDT).
    pub s: bool,
    /// 64-bit code segment.
    pub l: bool,
    /// Limit in 4 KiB units.
    pub g: bool,
    pub avl: bool,
    pub unusable: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpecialRegisters {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeneralRegisters {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FpuState {
    /// x87 control word.
    pub fcw: u16,
    pub mxcsr: u32,
}

impl Default for FpuState {
    /// The architectural reset values (FNINIT, and MXCSR with all exceptions masked).
    fn default() -> Self {
        FpuState { fcw: 0x37f, mxcsr: 0x1f80 }
    }
}

/// A model-specific register and its value (to load, or as saved).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MsrEntry {
    pub index: u32,
    pub value: u64,
}

/// Everything the boot vCPU needs before its first instruction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuState {
    pub regs: GeneralRegisters,
    pub sregs: SpecialRegisters,
    pub fpu: FpuState,
}

/// One CPUID leaf/subleaf, in the shape every hypervisor API uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    /// Bit 0: the leaf has subleaves selected by ECX (KVM_CPUID_FLAG_SIGNIFCANT_INDEX).
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// `CpuidEntry::flags` bit: the entry applies only to the subleaf in `index`.
pub const CPUID_FLAG_SIGNIFICANT_INDEX: u32 = 1;

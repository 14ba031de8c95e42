//! Model-specific registers every vCPU starts with.

use super::MsrEntry;

pub const MSR_IA32_TSC: u32 = 0x10;
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// SFMASK: RFLAGS bits cleared by SYSCALL.
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// IA32_MISC_ENABLE bit 0: fast-string operations. Firmware turns it on; Linux assumes it (rep movs/stos speed).
pub const MISC_ENABLE_FAST_STRING: u64 = 1 << 0;
/// IA32_MTRR_DEF_TYPE bit 11: MTRRs enabled.
pub const MTRR_ENABLE: u64 = 1 << 11;
/// Memory type write-back.
pub const MTRR_MEM_TYPE_WB: u64 = 0x6;

/// MSR values loaded into every vCPU before it first runs.
///
/// There is no firmware, so the VMM plays its part: the syscall/sysenter MSRs start cleared (the kernel programs
/// them), the TSC starts at 0, fast strings are on, and MTRRs default to write-back. Without the MTRR default the
/// guest sees all memory as uncached, which Linux survives but runs very slowly.
pub fn boot_msrs() -> Vec<MsrEntry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
    .into_iter()
    .map(|(index, value)| MsrEntry { index, value })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mtrr_default_is_write_back() {
        let msrs = boot_msrs();
        let def = msrs.iter().find(|m| m.index == MSR_MTRR_DEF_TYPE).unwrap();
        assert_eq!(def.value, 0x806);
        let misc = msrs.iter().find(|m| m.index == MSR_IA32_MISC_ENABLE).unwrap();
        assert_eq!(misc.value & MISC_ENABLE_FAST_STRING, 1);
    }

    #[test]
    fn no_msr_twice() {
        let msrs = boot_msrs();
        let mut indices: Vec<u32> = msrs.iter().map(|m| m.index).collect();
        indices.sort_unstable();
        indices.dedup();
        assert_eq!(indices.len(), msrs.len());
    }
}

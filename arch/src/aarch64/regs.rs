//! The boot vCPU's register values as booting.rst asks for them, and vCPU identities (MPIDR), as plain data: the
//! KVM backend turns them into KVM_SET_ONE_REG calls.

/// PSTATE.M = EL1h: EL1 using SP_EL1.
const PSR_MODE_EL1H: u64 = 0x5;
/// PSTATE.{D,A,I,F}: debug, SError, IRQ and FIQ masked.
const PSR_DAIF_MASKED: u64 = 0x3c0;
/// Where Linux wants to be entered: EL1h with every exception masked.
pub const BOOT_PSTATE: u64 = PSR_MODE_EL1H | PSR_DAIF_MASKED;

/// MPIDR_EL1's affinity fields (Aff3 in bits 39:32, Aff2-Aff0 in 23:0): what the FDT's cpu `reg` holds.
pub const MPIDR_AFFINITY_MASK: u64 = 0xff_00ff_ffff;

/// The registers the boot vCPU starts with. Secondary vCPUs start powered off (KVM_ARM_VCPU_POWER_OFF) and are
/// brought up by the guest through PSCI CPU_ON, which KVM handles in the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootRegisters {
    pub pstate: u64,
    pub pc: u64,
    /// x0: the FDT's guest physical address; x1-x3 must be zero (reserved for future use).
    pub x: [u64; 4],
}

impl BootRegisters {
    pub fn new(kernel_entry: u64, fdt_address: u64) -> Self {
        BootRegisters { pstate: BOOT_PSTATE, pc: kernel_entry, x: [fdt_address, 0, 0, 0] }
    }
}

/// The MPIDR KVM gives vCPU `index` when it is created (arch/arm64/kvm/sys_regs.c, reset_mpidr: 16 vCPUs per Aff1
/// cluster, so the GICv3's 16-CPU target lists stay usable). The VMM should still read MPIDR_EL1 back from each
/// vCPU and pass what it read to the FDT: this is for tests and for checking.
pub fn kvm_default_mpidr(index: u32) -> u64 {
    let index = u64::from(index);
    (index & 0xf) | (((index >> 4) & 0xff) << 8) | (((index >> 12) & 0xff) << 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_state_is_el1h_with_everything_masked() {
        let regs = BootRegisters::new(0x4000_0000, 0x5fe0_0000);
        assert_eq!(regs.pstate, 0x3c5);
        assert_eq!(regs.pc, 0x4000_0000);
        assert_eq!(regs.x, [0x5fe0_0000, 0, 0, 0]);
    }

    #[test]
    fn mpidrs_fill_clusters_of_sixteen() {
        assert_eq!(kvm_default_mpidr(0), 0);
        assert_eq!(kvm_default_mpidr(15), 0xf);
        assert_eq!(kvm_default_mpidr(16), 0x100);
        assert_eq!(kvm_default_mpidr(122), 0x70a);
        assert_eq!(kvm_default_mpidr(0x1234), 0x1_2304);
        assert_eq!(kvm_default_mpidr(u32::MAX) & !MPIDR_AFFINITY_MASK, 0);
    }
}

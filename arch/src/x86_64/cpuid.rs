//! CPUID as the guest sees it: the host's supported leaves, normalised per vendor and per vCPU.

use super::CpuidEntry;

/// The CPUID table for vCPU `vcpu_id` of `vcpu_count`, derived from the hypervisor's supported leaves.
pub fn normalise(_supported: &[CpuidEntry], _vcpu_id: u8, _vcpu_count: u8) -> Vec<CpuidEntry> {
    todo!("arch helper")
}

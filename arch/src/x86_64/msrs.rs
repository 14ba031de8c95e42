//! Model-specific registers every vCPU starts with.

use super::MsrEntry;

/// MSR values loaded into every vCPU before it first runs.
pub fn boot_msrs() -> Vec<MsrEntry> {
    todo!("arch helper")
}

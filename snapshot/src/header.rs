//! The snapshot's header: what a host checks before it builds anything from the file.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Who wrote the snapshot and for what machine: stored as JSON right after the preamble.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// The Kestrel release that wrote the file. Informative (error messages, tools): the format version decides
    /// what can read it.
    pub kestrel_version: String,
    /// The saving host's architecture as Rust names it (`std::env::consts::ARCH`: "x86_64", "aarch64", ...).
    pub arch: String,
    /// The machine type the VM was built as ("pc", "q35", "microvm", "virt").
    pub machine: String,
    /// The CPU the guest saw.
    pub cpu: CpuIdentity,
}

impl Header {
    /// A header for a snapshot written by this Kestrel on this host.
    pub fn new(machine: impl Into<String>, cpu: CpuIdentity) -> Self {
        Header {
            kestrel_version: env!("CARGO_PKG_VERSION").into(),
            arch: std::env::consts::ARCH.into(),
            machine: machine.into(),
            cpu,
        }
    }
}

/// The CPU as the guest saw it: a vendor and the set of features it was offered.
///
/// The writer chooses the feature names (on x86, for instance, one name per CPUID feature bit the guest was
/// offered). They are a list and not a digest so that a refusal can say which features the host lacks, and so that
/// a host with more features than the saving one can still restore: the check is that the guest's features are a
/// subset of the host's, not that the sets are equal.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuIdentity {
    /// "GenuineIntel", "AuthenticAMD", an Arm implementer's name...
    pub vendor: String,
    pub features: BTreeSet<String>,
}

impl CpuIdentity {
    pub fn new(vendor: impl Into<String>, features: impl IntoIterator<Item = impl Into<String>>) -> Self {
        CpuIdentity { vendor: vendor.into(), features: features.into_iter().map(Into::into).collect() }
    }

    /// Whether a guest that saw `guest` can run on this (the host's) CPU: same vendor, and every feature it saw
    /// is here.
    pub fn check_can_run(&self, guest: &CpuIdentity) -> Result<()> {
        if guest.vendor != self.vendor {
            return Err(Error::CpuVendor { snapshot: guest.vendor.clone(), host: self.vendor.clone() });
        }
        let missing: Vec<String> = guest.features.difference(&self.features).cloned().collect();
        if !missing.is_empty() {
            return Err(Error::CpuFeaturesMissing { missing });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_with_more_features_runs_the_guest() {
        let host = CpuIdentity::new("GenuineIntel", ["sse2", "avx", "avx2"]);
        host.check_can_run(&CpuIdentity::new("GenuineIntel", ["sse2", "avx"])).unwrap();
        host.check_can_run(&host.clone()).unwrap();
    }

    #[test]
    fn a_host_lacking_features_names_each_one() {
        let host = CpuIdentity::new("GenuineIntel", ["sse2"]);
        let guest = CpuIdentity::new("GenuineIntel", ["sse2", "avx512f", "avx2"]);
        match host.check_can_run(&guest) {
            Err(Error::CpuFeaturesMissing { missing }) => assert_eq!(missing, ["avx2", "avx512f"]),
            other => panic!("expected missing features, got {other:?}"),
        }
    }

    #[test]
    fn another_vendor_is_refused_before_features_are_compared() {
        let host = CpuIdentity::new("AuthenticAMD", ["sse2", "avx"]);
        let guest = CpuIdentity::new("GenuineIntel", ["sse2"]);
        match host.check_can_run(&guest) {
            Err(Error::CpuVendor { snapshot, host }) => {
                assert_eq!((snapshot.as_str(), host.as_str()), ("GenuineIntel", "AuthenticAMD"))
            }
            other => panic!("expected a vendor refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_new_header_names_this_build_and_host() {
        let header = Header::new("microvm", CpuIdentity::default());
        assert_eq!(header.kestrel_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(header.arch, std::env::consts::ARCH);
        assert_eq!(header.machine, "microvm");
    }
}

//! The guest's CPU model (`-cpu`): the host's own CPU, or one of the named models a platform offers, each with
//! features turned on or off by QEMU's names. Resolved once against the host's features into the set of named
//! features the guest gets ([`GuestCpu`]), which the platform applies to each vCPU (x86_64: its CPUID) and which a
//! snapshot's CPU identity and QMP's `query-cpu-model-expansion` are computed from. Kestrel never gives a guest a
//! feature the host lacks: turning one on, or a model that has one, is refused with one line naming it.

use crate::config::CpuConfig;
use crate::Error;

/// A named CPU model besides `host`: the features (QEMU's names) it gives guests.
#[derive(Debug)]
pub struct CpuModelDefinition {
    pub name: &'static str,
    pub features: &'static [&'static str],
}

/// The CPU guests get: `-cpu` resolved against the host, and how the vCPUs are packaged (`-smp`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestCpu {
    /// `None`: the host's CPU as the hypervisor offers it, unchanged (`-cpu host` without feature settings);
    /// otherwise every named feature of the platform, on or off.
    pub features: Option<Vec<(&'static str, bool)>>,
    /// The sockets (packages) the vCPUs are spread over, an equal number of cores in each.
    pub sockets: u8,
}

impl Default for GuestCpu {
    /// The host's CPU, one socket.
    fn default() -> Self {
        GuestCpu { features: None, sockets: 1 }
    }
}

impl GuestCpu {
    /// Whether the guest has `feature`; the host's CPU has whatever the host offers.
    pub fn has(&self, feature: &str, host_has: bool) -> bool {
        match &self.features {
            None => host_has,
            Some(features) => features.iter().any(|&(name, on)| on && name == feature),
        }
    }

    /// Cores in each socket, for `vcpu_count` vCPUs.
    pub fn cores_per_socket(&self, vcpu_count: u8) -> u8 {
        (vcpu_count / self.sockets.max(1)).max(1)
    }
}

/// The models `models` offers and `host`, the host's named features with whether it has each, resolve `cpu`'s
/// model and features (`None`: the host's CPU unchanged):
/// the model's features (every feature the host has, for `host`), plus `defaults` for a named model (what the
/// accelerator adds to every model), then each setting in order. An unknown model or feature, a feature turned on
/// that the host lacks, or a model feature the host lacks (not turned off) is refused.
pub fn resolve(
    cpu: &CpuConfig,
    models: &[CpuModelDefinition],
    defaults: &[&str],
    host: &[(&'static str, bool)],
) -> Result<Option<Vec<(&'static str, bool)>>, Error> {
    let model = cpu.model.as_deref().unwrap_or("host");
    let base: Vec<(&'static str, bool)> = if model == "host" {
        if cpu.features.is_empty() {
            return Ok(None);
        }
        host.to_vec()
    } else {
        let definition = models.iter().find(|m| m.name == model).ok_or_else(|| {
            let offered: Vec<&str> = std::iter::once("host").chain(models.iter().map(|m| m.name)).collect();
            Error::Unsupported(format!("CPU model '{model}' is not offered here (models: {})", offered.join(", ")))
        })?;
        let missing: Vec<&str> = definition
            .features
            .iter()
            .copied()
            .filter(|feature| !host_has(host, feature) && !turned_off(cpu, feature))
            .collect();
        if !missing.is_empty() {
            return Err(Error::Unsupported(format!(
                "CPU model '{model}' needs {} which this host lacks (turn them off with {model},{}=off)",
                missing.join(", "),
                missing[0]
            )));
        }
        let wanted = |name: &str| definition.features.contains(&name) || defaults.contains(&name);
        host.iter().map(|&(name, has)| (name, has && wanted(name))).collect()
    };
    let mut features = base;
    for (name, on) in &cpu.features {
        let name = &canonical_feature_name(name);
        let Some(entry) = features.iter_mut().find(|(feature, _)| feature == name) else {
            return Err(Error::Unsupported(format!("CPU feature '{name}' is not one Kestrel knows")));
        };
        if *on && !host_has(host, name) {
            return Err(Error::Unsupported(format!(
                "CPU feature '{name}' cannot be given to guests: this host lacks it"
            )));
        }
        entry.1 = *on;
    }
    Ok(Some(features))
}

/// A feature's name as the platform's table spells it: QEMU takes `_` for `-` (`lahf_lm` is `lahf-lm`), and libvirt
/// passes its own CPU map's spellings.
pub fn canonical_feature_name(name: &str) -> String {
    name.replace('_', "-")
}

fn host_has(host: &[(&'static str, bool)], feature: &str) -> bool {
    host.iter().any(|&(name, has)| has && name == feature)
}

/// The last setting of `feature` turns it off.
fn turned_off(cpu: &CpuConfig, feature: &str) -> bool {
    cpu.features.iter().rev().find(|(name, _)| canonical_feature_name(name) == feature).is_some_and(|(_, on)| !on)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODELS: &[CpuModelDefinition] = &[CpuModelDefinition { name: "small", features: &["fpu", "sse"] }];
    const HOST: &[(&str, bool)] = &[("fpu", true), ("sse", true), ("avx", true), ("hypervisor", true), ("svm", false)];

    fn config(model: Option<&str>, features: &[(&str, bool)]) -> CpuConfig {
        CpuConfig {
            model: model.map(str::to_string),
            features: features.iter().map(|&(name, on)| (name.to_string(), on)).collect(),
            ..CpuConfig::default()
        }
    }

    fn on(features: &Option<Vec<(&'static str, bool)>>) -> Vec<&'static str> {
        let features = features.as_ref().expect("not the host's CPU");
        features.iter().filter(|(_, on)| *on).map(|(name, _)| *name).collect()
    }

    #[test]
    fn the_host_cpu_without_settings_is_the_host_unchanged() {
        assert_eq!(resolve(&config(None, &[]), MODELS, &[], HOST).unwrap(), None);
        assert_eq!(resolve(&config(Some("host"), &[]), MODELS, &[], HOST).unwrap(), None);
    }

    #[test]
    fn a_model_gets_its_features_the_defaults_and_the_settings() {
        let cpu = resolve(&config(Some("small"), &[]), MODELS, &["hypervisor"], HOST).unwrap();
        assert_eq!(on(&cpu), ["fpu", "sse", "hypervisor"]);
        let guest = GuestCpu { features: cpu, sockets: 1 };
        assert!(guest.has("sse", true) && !guest.has("avx", true));
        assert!(GuestCpu::default().has("avx", true));
        let cpu = resolve(&config(Some("small"), &[("avx", true), ("sse", false)]), MODELS, &[], HOST).unwrap();
        assert_eq!(on(&cpu), ["fpu", "avx"]);
        let cpu = resolve(&config(Some("host"), &[("avx", false)]), MODELS, &[], HOST).unwrap();
        assert_eq!(on(&cpu), ["fpu", "sse", "hypervisor"]);
        // libvirt's spelling of QEMU's names.
        let host = &[("fpu", true), ("lahf-lm", true)];
        assert_eq!(on(&resolve(&config(None, &[("lahf_lm", false)]), MODELS, &[], host).unwrap()), ["fpu"]);
    }

    #[test]
    fn what_the_host_cannot_give_is_refused() {
        let refused = |cpu: CpuConfig| resolve(&cpu, MODELS, &[], HOST).unwrap_err().to_string();
        assert!(refused(config(Some("Skylake"), &[])).contains("'Skylake' is not offered here (models: host, small)"));
        assert!(refused(config(None, &[("svm", true)])).contains("'svm' cannot be given to guests"));
        assert!(refused(config(None, &[("warp", true)])).contains("'warp' is not one Kestrel knows"));
        let models = &[CpuModelDefinition { name: "amd", features: &["fpu", "svm"] }];
        let refused = resolve(&config(Some("amd"), &[]), models, &[], HOST).unwrap_err().to_string();
        assert!(refused.contains("needs svm which this host lacks (turn them off with amd,svm=off)"), "{refused}");
        assert_eq!(on(&resolve(&config(Some("amd"), &[("svm", false)]), models, &[], HOST).unwrap()), ["fpu"]);
    }
}

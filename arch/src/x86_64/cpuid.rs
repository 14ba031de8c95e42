//! CPUID as the guest sees it: the host's supported leaves, normalised per vendor and per vCPU.
//!
//! The hypervisor reports what it can virtualise, with the host's topology in it (APIC IDs, core counts, cache
//! sharing). Each vCPU instead must see the guest's topology: sockets of `cores` cores of one thread each, its own
//! APIC ID `vcpu_id` (the socket's number above the core bits), and the hypervisor bit. Everything else (features, cache sizes, leaf 6, the
//! 0x4000_0000 hypervisor leaves) passes through untouched.

use super::cpu_state::CPUID_FLAG_SIGNIFICANT_INDEX;
use super::CpuidEntry;

/// The CPU vendor, from leaf 0's vendor string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vendor {
    Intel,
    /// AMD and Hygon (same topology leaves).
    Amd,
    Other,
}

impl Vendor {
    /// The vendor named by leaf 0 (EBX, EDX, ECX spell the string).
    pub fn of(entries: &[CpuidEntry]) -> Vendor {
        let Some(leaf0) = find(entries, 0, 0) else {
            return Vendor::Other;
        };
        let mut id = [0u8; 12];
        id[..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
        id[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
        id[8..].copy_from_slice(&leaf0.ecx.to_le_bytes());
        match &id {
            b"GenuineIntel" => Vendor::Intel,
            b"AuthenticAMD" | b"HygonGenuine" => Vendor::Amd,
            _ => Vendor::Other,
        }
    }
}

/// The guest topology one vCPU is part of: its package (socket) has `cores` cores of one thread each.
#[derive(Clone, Copy, Debug)]
struct Topology {
    vcpu_id: u32,
    cores: u32,
}

impl Topology {
    /// APIC ID bits that number the cores in a package: the smallest `n` with `cores <= 1 << n`.
    fn core_bits(&self) -> u32 {
        bits_for(self.cores)
    }
}

fn bits_for(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        u32::BITS - (count - 1).leading_zeros()
    }
}

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
/// V2 extended topology (Intel); Linux prefers it over 0xB when present, so it must say the same.
const LEAF_EXT_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_ADDRESS_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_CACHE_TOPOLOGY: u32 = 0x8000_001d;
const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;

const LEAF1_EBX_APIC_ID_SHIFT: u32 = 24;
const LEAF1_EBX_LOGICAL_COUNT_SHIFT: u32 = 16;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;
const EXT_FEATURES_ECX_CMP_LEGACY: u32 = 1 << 1;

/// Topology level types in leaf 0xB/0x1F ECX[15:8].
const LEVEL_TYPE_INVALID: u32 = 0;
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Leaf 1 ECX: the local APIC timer has TSC-deadline mode.
pub const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;

/// Announces the TSC-deadline timer in leaf 1. Hypervisors that emulate the local APIC (KVM with an in-kernel
/// irqchip) offer it whatever the host CPU has, but leave setting the bit to the VMM, as QEMU does.
pub fn offer_tsc_deadline(entries: &mut [CpuidEntry]) {
    for_each_leaf(entries, 1, |e| e.ecx |= LEAF1_ECX_TSC_DEADLINE);
}

/// The CPUID table for vCPU `vcpu_id` in sockets of `cores` cores, derived from the hypervisor's supported leaves.
/// The APIC ID is `vcpu_id`: with more than one socket, `cores` must be a power of two for the IDs to number
/// socket and core (the caller's rule).
///
/// A `cores` of 0 is treated as 1. Duplicate (function, index) entries keep their first occurrence.
/// TSC-deadline (leaf 1 ECX bit 24) is left as `supported` reports it: it is never added.
pub fn normalise(supported: &[CpuidEntry], vcpu_id: u8, cores: u8) -> Vec<CpuidEntry> {
    let topo = Topology { vcpu_id: vcpu_id.into(), cores: u32::from(cores.max(1)) };
    let mut entries = dedup(supported);
    fix_features(&mut entries, topo);
    match Vendor::of(&entries) {
        Vendor::Intel => {
            fix_intel_cache_params(&mut entries, topo);
            if max_basic_leaf(&entries) >= LEAF_EXT_TOPOLOGY {
                set_ext_topology(&mut entries, LEAF_EXT_TOPOLOGY, topo);
            }
            if find(&entries, LEAF_EXT_TOPOLOGY_V2, 0).is_some() {
                set_ext_topology(&mut entries, LEAF_EXT_TOPOLOGY_V2, topo);
            }
        }
        Vendor::Amd => {
            if find(&entries, LEAF_EXT_TOPOLOGY, 0).is_some() {
                set_ext_topology(&mut entries, LEAF_EXT_TOPOLOGY, topo);
            }
            fix_amd_cmp_legacy(&mut entries, topo);
            fix_amd_core_count(&mut entries, topo);
            fix_amd_cache_topology(&mut entries, topo);
            fix_amd_ext_apic_id(&mut entries, topo);
        }
        Vendor::Other => {
            if find(&entries, LEAF_EXT_TOPOLOGY, 0).is_some() {
                set_ext_topology(&mut entries, LEAF_EXT_TOPOLOGY, topo);
            }
        }
    }
    entries
}

/// A CPUID output register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Register {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// One word of feature bits: the leaf, subleaf and register, and QEMU's name for each bit (`""`: a bit QEMU does
/// not name as a feature, e.g. one that reflects OS state such as OSXSAVE). The names are the ones QEMU's `-cpu`
/// and `query-cpu-model-expansion` use, which libvirt maps onto its CPU models.
pub struct FeatureWord {
    pub function: u32,
    pub index: u32,
    pub register: Register,
    pub names: [&'static str; 32],
}

/// The feature words a guest's CPU model is described by (QEMU 7.2's names).
pub const FEATURE_WORDS: &[FeatureWord] = &[
    FeatureWord {
        function: 1,
        index: 0,
        register: Register::Edx,
        names: [
            "fpu", "vme", "de", "pse", "tsc", "msr", "pae", "mce", "cx8", "apic", "", "sep", "mtrr", "pge", "mca",
            "cmov", "pat", "pse36", "pn", "clflush", "", "ds", "acpi", "mmx", "fxsr", "sse", "sse2", "ss", "ht", "tm",
            "ia64", "pbe",
        ],
    },
    FeatureWord {
        function: 1,
        index: 0,
        register: Register::Ecx,
        names: [
            "pni",
            "pclmulqdq",
            "dtes64",
            "monitor",
            "ds-cpl",
            "vmx",
            "smx",
            "est",
            "tm2",
            "ssse3",
            "cid",
            "",
            "fma",
            "cx16",
            "xtpr",
            "pdcm",
            "",
            "pcid",
            "dca",
            "sse4.1",
            "sse4.2",
            "x2apic",
            "movbe",
            "popcnt",
            "tsc-deadline",
            "aes",
            "xsave",
            "",
            "avx",
            "f16c",
            "rdrand",
            "hypervisor",
        ],
    },
    FeatureWord {
        function: 7,
        index: 0,
        register: Register::Ebx,
        names: [
            "fsgsbase",
            "tsc-adjust",
            "sgx",
            "bmi1",
            "hle",
            "avx2",
            "",
            "smep",
            "bmi2",
            "erms",
            "invpcid",
            "rtm",
            "",
            "",
            "mpx",
            "",
            "avx512f",
            "avx512dq",
            "rdseed",
            "adx",
            "smap",
            "avx512ifma",
            "pcommit",
            "clflushopt",
            "clwb",
            "intel-pt",
            "avx512pf",
            "avx512er",
            "avx512cd",
            "sha-ni",
            "avx512bw",
            "avx512vl",
        ],
    },
    FeatureWord {
        function: 7,
        index: 0,
        register: Register::Ecx,
        names: [
            "",
            "avx512vbmi",
            "umip",
            "pku",
            "",
            "waitpkg",
            "avx512vbmi2",
            "",
            "gfni",
            "vaes",
            "vpclmulqdq",
            "avx512vnni",
            "avx512bitalg",
            "",
            "avx512-vpopcntdq",
            "",
            "la57",
            "",
            "",
            "",
            "",
            "",
            "rdpid",
            "",
            "bus-lock-detect",
            "cldemote",
            "",
            "movdiri",
            "movdir64b",
            "",
            "sgxlc",
            "pks",
        ],
    },
    FeatureWord {
        function: 7,
        index: 0,
        register: Register::Edx,
        names: [
            "",
            "",
            "avx512-4vnniw",
            "avx512-4fmaps",
            "fsrm",
            "",
            "",
            "",
            "avx512-vp2intersect",
            "",
            "md-clear",
            "",
            "",
            "",
            "serialize",
            "",
            "tsx-ldtrk",
            "",
            "",
            "arch-lbr",
            "",
            "",
            "amx-bf16",
            "avx512-fp16",
            "amx-tile",
            "amx-int8",
            "spec-ctrl",
            "stibp",
            "flush-l1d",
            "arch-capabilities",
            "core-capability",
            "ssbd",
        ],
    },
    FeatureWord {
        function: 0xd,
        index: 1,
        register: Register::Eax,
        names: [
            "xsaveopt", "xsavec", "xgetbv1", "xsaves", "xfd", "", "", "", "", "", "", "", "", "", "", "", "", "", "",
            "", "", "", "", "", "", "", "", "", "", "", "", "",
        ],
    },
    FeatureWord {
        function: LEAF_EXT_FEATURES,
        index: 0,
        register: Register::Edx,
        // The bits that repeat leaf 1's EDX on AMD are named there.
        names: [
            "", "", "", "", "", "", "", "", "", "", "", "syscall", "", "", "", "", "", "", "", "", "nx", "", "mmxext",
            "", "", "fxsr-opt", "pdpe1gb", "rdtscp", "", "lm", "3dnowext", "3dnow",
        ],
    },
    FeatureWord {
        function: LEAF_EXT_FEATURES,
        index: 0,
        register: Register::Ecx,
        names: [
            "lahf-lm",
            "cmp-legacy",
            "svm",
            "extapic",
            "cr8legacy",
            "abm",
            "sse4a",
            "misalignsse",
            "3dnowprefetch",
            "osvw",
            "ibs",
            "xop",
            "skinit",
            "wdt",
            "",
            "lwp",
            "fma4",
            "tce",
            "",
            "nodeid-msr",
            "",
            "tbm",
            "topoext",
            "perfctr-core",
            "perfctr-nb",
            "",
            "",
            "",
            "",
            "",
            "",
            "",
        ],
    },
];

/// Every named feature of [`FEATURE_WORDS`] with whether `entries` (a vCPU's CPUID) has it, in table order. A
/// leaf the table has no entry for has none of its features.
pub fn named_features(entries: &[CpuidEntry]) -> Vec<(&'static str, bool)> {
    let mut features = Vec::new();
    for word in FEATURE_WORDS {
        let bits = find(entries, word.function, word.index).map_or(0, |e| match word.register {
            Register::Eax => e.eax,
            Register::Ebx => e.ebx,
            Register::Ecx => e.ecx,
            Register::Edx => e.edx,
        });
        for (bit, name) in word.names.iter().enumerate() {
            if !name.is_empty() {
                features.push((*name, bits & (1 << bit) != 0));
            }
        }
    }
    features
}

/// Clears each named feature bit of [`FEATURE_WORDS`] in `entries` that `keep` refuses, for a guest CPU model
/// narrower than the host's; the bits without a name (OS state such as OSXSAVE) and every other leaf stay.
pub fn keep_features(entries: &mut [CpuidEntry], keep: impl Fn(&str) -> bool) {
    for word in FEATURE_WORDS {
        let cleared = word
            .names
            .iter()
            .enumerate()
            .filter(|(_, name)| !name.is_empty() && !keep(name))
            .fold(0u32, |bits, (bit, _)| bits | 1 << bit);
        for entry in entries.iter_mut().filter(|e| e.function == word.function && e.index == word.index) {
            let register = match word.register {
                Register::Eax => &mut entry.eax,
                Register::Ebx => &mut entry.ebx,
                Register::Ecx => &mut entry.ecx,
                Register::Edx => &mut entry.edx,
            };
            *register &= !cleared;
        }
    }
}

fn find(entries: &[CpuidEntry], function: u32, index: u32) -> Option<&CpuidEntry> {
    entries.iter().find(|e| e.function == function && e.index == index)
}

fn for_each_leaf(entries: &mut [CpuidEntry], function: u32, mut f: impl FnMut(&mut CpuidEntry)) {
    entries.iter_mut().filter(|e| e.function == function).for_each(&mut f);
}

fn max_basic_leaf(entries: &[CpuidEntry]) -> u32 {
    find(entries, 0, 0).map_or(0, |e| e.eax)
}

fn dedup(supported: &[CpuidEntry]) -> Vec<CpuidEntry> {
    let mut out: Vec<CpuidEntry> = Vec::with_capacity(supported.len());
    for e in supported {
        if find(&out, e.function, e.index).is_none() {
            out.push(*e);
        }
    }
    out
}

/// Leaf 1, all vendors: initial APIC ID, logical processor count with a matching HTT bit, hypervisor present.
fn fix_features(entries: &mut [CpuidEntry], topo: Topology) {
    for_each_leaf(entries, LEAF_FEATURES, |e| {
        e.ebx = (e.ebx & 0x0000_ffff)
            | topo.vcpu_id << LEAF1_EBX_APIC_ID_SHIFT
            | topo.cores.min(0xff) << LEAF1_EBX_LOGICAL_COUNT_SHIFT;
        e.ecx |= LEAF1_ECX_HYPERVISOR;
        if topo.cores > 1 {
            e.edx |= LEAF1_EDX_HTT;
        } else {
            e.edx &= !LEAF1_EDX_HTT;
        }
    });
}

/// Leaf 0xB or 0x1F: exactly three subleaves, SMT (one thread per core), core (`cores` cores a package) and the
/// terminating invalid level, each carrying the vCPU's x2APIC ID in EDX.
fn set_ext_topology(entries: &mut Vec<CpuidEntry>, function: u32, topo: Topology) {
    let levels = [(0, 1, LEVEL_TYPE_SMT), (topo.core_bits(), topo.cores, LEVEL_TYPE_CORE), (0, 0, LEVEL_TYPE_INVALID)];
    let new = levels.iter().enumerate().map(|(index, &(shift, count, level_type))| CpuidEntry {
        function,
        index: index as u32,
        flags: CPUID_FLAG_SIGNIFICANT_INDEX,
        eax: shift,
        ebx: count,
        ecx: level_type << 8 | index as u32,
        edx: topo.vcpu_id,
    });
    let at = entries.iter().position(|e| e.function == function).unwrap_or_else(|| {
        // Keep the table sorted by function if the leaf was missing.
        entries.iter().position(|e| e.function > function && e.function < 0x4000_0000).unwrap_or(entries.len())
    });
    entries.retain(|e| e.function != function);
    let at = at.min(entries.len());
    entries.splice(at..at, new);
}

/// Intel leaf 4: cores per package in EAX[31:26], and threads sharing each cache in EAX[25:14] (one core for L1
/// and L2, the whole package for L3).
fn fix_intel_cache_params(entries: &mut [CpuidEntry], topo: Topology) {
    let cores_minus_1 = topo.cores.min(64) - 1;
    let package_sharing_minus_1 = topo.cores.min(1 << 12) - 1;
    for_each_leaf(entries, LEAF_CACHE_PARAMS, |e| {
        let cache_type = e.eax & 0x1f;
        if cache_type == 0 {
            return;
        }
        let level = (e.eax >> 5) & 0x7;
        let sharing_minus_1 = if level >= 3 { package_sharing_minus_1 } else { 0 };
        e.eax = (e.eax & 0x3fff) | sharing_minus_1 << 14 | cores_minus_1 << 26;
    });
}

/// AMD 0x8000_0001 ECX CmpLegacy: "HTT means cores, not threads", set iff there is more than one core.
fn fix_amd_cmp_legacy(entries: &mut [CpuidEntry], topo: Topology) {
    for_each_leaf(entries, LEAF_EXT_FEATURES, |e| {
        if topo.cores > 1 {
            e.ecx |= EXT_FEATURES_ECX_CMP_LEGACY;
        } else {
            e.ecx &= !EXT_FEATURES_ECX_CMP_LEGACY;
        }
    });
}

/// AMD 0x8000_0008 ECX: NC (cores - 1) in [7:0] and ApicIdCoreIdSize in [15:12]; PerfTscSize above stays.
fn fix_amd_core_count(entries: &mut [CpuidEntry], topo: Topology) {
    for_each_leaf(entries, LEAF_ADDRESS_SIZES, |e| {
        e.ecx = (e.ecx & !0xf0ff) | topo.core_bits() << 12 | (topo.cores.min(256) - 1);
    });
}

/// AMD 0x8000_001D: like Intel leaf 4, NumSharingCache - 1 in EAX[25:14].
fn fix_amd_cache_topology(entries: &mut [CpuidEntry], topo: Topology) {
    for_each_leaf(entries, LEAF_AMD_CACHE_TOPOLOGY, |e| {
        if e.eax & 0x1f == 0 {
            return;
        }
        let level = (e.eax >> 5) & 0x7;
        let sharing_minus_1 = if level >= 3 { topo.cores.min(1 << 12) - 1 } else { 0 };
        e.eax = (e.eax & !(0xfff << 14)) | sharing_minus_1 << 14;
    });
}

/// AMD 0x8000_001E: extended APIC ID, core ID with one thread per core, one node.
fn fix_amd_ext_apic_id(entries: &mut [CpuidEntry], topo: Topology) {
    for_each_leaf(entries, LEAF_AMD_EXT_APIC_ID, |e| {
        e.eax = topo.vcpu_id;
        e.ebx = (topo.vcpu_id % topo.cores) & 0xff; // the core in its package; threads per unit - 1 = 0 in [15:8]
        e.ecx = 0; // node 0, one node per processor
        e.edx = 0;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> CpuidEntry {
        CpuidEntry { function, index, flags: 0, eax, ebx, ecx, edx }
    }

    fn intel_leaf0(max: u32) -> CpuidEntry {
        // "Genu" "ntel" "ineI" in EBX, ECX, EDX.
        entry(0, 0, max, 0x756e_6547, 0x6c65_746e, 0x4965_6e69)
    }

    #[test]
    fn vendor_detection() {
        assert_eq!(Vendor::of(&[intel_leaf0(0xd)]), Vendor::Intel);
        assert_eq!(Vendor::of(&[entry(0, 0, 0x10, 0x6874_7541, 0x444d_4163, 0x6974_6e65)]), Vendor::Amd);
        assert_eq!(Vendor::of(&[]), Vendor::Other);
    }

    #[test]
    fn keeping_features_clears_only_the_named_bits_refused() {
        // Leaf 1: EDX fpu (0) and sse (25); ECX bit 27 (OSXSAVE, no name) and avx (28).
        let mut entries = [entry(1, 0, 0x306a9, 0, 1 << 27 | 1 << 28, 1 | 1 << 25), entry(7, 0, 0, 1 << 5, 0, 0)];
        keep_features(&mut entries, |name| name == "fpu");
        assert_eq!((entries[0].eax, entries[0].ecx, entries[0].edx), (0x306a9, 1 << 27, 1));
        assert_eq!(entries[1].ebx, 0, "avx2 goes too");
        assert_eq!(named_features(&entries).iter().filter(|(_, has)| *has).count(), 1);
    }

    #[test]
    fn bits_for_counts() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9, 255].map(bits_for), [0, 1, 2, 2, 3, 3, 4, 8]);
    }

    #[test]
    fn intel_topology_leaf_is_added_when_in_range() {
        let supported = [intel_leaf0(0xd), entry(1, 0, 0, 0, 0, 0), entry(0xd, 0, 0, 0, 0, 0)];
        let out = normalise(&supported, 2, 3);
        let b: Vec<_> = out.iter().filter(|e| e.function == 0xb).collect();
        assert_eq!(b.len(), 3);
        assert_eq!((b[1].eax, b[1].ebx, b[1].ecx, b[1].edx), (2, 3, 0x201, 2));
        // Sorted position: after leaf 1, before leaf 0xd.
        let functions: Vec<u32> = out.iter().map(|e| e.function).collect();
        assert_eq!(functions, [0, 1, 0xb, 0xb, 0xb, 0xd]);
    }

    #[test]
    fn a_vcpu_of_the_second_socket_sees_its_package_of_cores() {
        // vCPU 3 of two sockets of two cores: APIC ID 3 = socket 1 (above one core bit), core 1.
        let supported = [intel_leaf0(0xb), entry(1, 0, 0, 0, 0, 0), entry(4, 0, 0x163, 0, 0, 0)];
        let out = normalise(&supported, 3, 2);
        let leaf = |function: u32, index: u32| *find(&out, function, index).unwrap();
        assert_eq!(leaf(1, 0).ebx >> 24, 3, "initial APIC ID");
        assert_eq!(leaf(1, 0).ebx >> 16 & 0xff, 2, "logical processors in the package");
        assert_ne!(leaf(1, 0).edx & LEAF1_EDX_HTT, 0);
        assert_eq!(leaf(4, 0).eax >> 26, 1, "cores in the package - 1");
        assert_eq!(leaf(4, 0).eax >> 14 & 0xfff, 1, "L3 shared by the package's two cores");
        let core_level = leaf(0xb, 1);
        assert_eq!((core_level.eax, core_level.ebx, core_level.edx), (1, 2, 3), "shift 1 to the package id");
    }

    #[test]
    fn zero_vcpus_does_not_panic() {
        let out = normalise(&[intel_leaf0(0xb), entry(1, 0, 0, 0, 0, 0), entry(4, 0, 0x121, 0, 0, 0)], 0, 0);
        assert_eq!(out[1].ebx >> 16 & 0xff, 1);
    }

    #[test]
    fn duplicates_are_dropped() {
        let out = normalise(&[intel_leaf0(1), intel_leaf0(1), entry(1, 0, 0, 0, 0, 0)], 0, 1);
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn named_features_read_the_bits_qemu_names() {
        // Leaf 1: FPU (EDX 0), SSE2 (EDX 26), VMX (ECX 5), hypervisor (ECX 31); leaf 7: AVX2 (EBX 5); nothing in
        // the extended leaves, which are missing.
        let entries = [entry(1, 0, 0, 0, (1 << 5) | (1 << 31), 1 | (1 << 26)), entry(7, 0, 0, 1 << 5, 0, 0)];
        let features = named_features(&entries);
        let has = |name: &str| features.iter().find(|(n, _)| *n == name).map(|(_, has)| *has);
        for name in ["fpu", "sse2", "vmx", "hypervisor", "avx2"] {
            assert_eq!(has(name), Some(true), "{name}");
        }
        for name in ["vme", "pni", "avx512f", "lm", "svm", "xsaveopt"] {
            assert_eq!(has(name), Some(false), "{name}");
        }
        // Bits QEMU leaves unnamed are not features (OSXSAVE, leaf 1 ECX 27).
        assert_eq!(has(""), None);
        let mut names: Vec<&str> = features.iter().map(|(n, _)| *n).collect();
        let count = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), count, "a feature named twice");
    }
}

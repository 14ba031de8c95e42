//! CPUID normalisation against tables recorded on real hosts (see each fixture's header for its source).
#![cfg(target_arch = "x86_64")]

use std::collections::HashSet;

use arch::x86_64::cpuid::{normalise, Vendor};
use arch::x86_64::CpuidEntry;

const AMD: &str = include_str!("fixtures/cpuid-amd-epyc-kvm-pvm.txt");
const INTEL: &str = include_str!("fixtures/cpuid-intel-icelake-kvm-firecracker.txt");

/// `function.index fFLAGS eax ebx ecx edx`, all hex; `#` starts a comment line.
fn parse(fixture: &str) -> Vec<CpuidEntry> {
    fixture
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(fields.len(), 6, "{line}");
            let (function, index) = fields[0].split_once('.').unwrap();
            let hex = |s: &str| u32::from_str_radix(s, 16).unwrap();
            CpuidEntry {
                function: hex(function),
                index: hex(index),
                flags: hex(fields[1].trim_start_matches('f')),
                eax: hex(fields[2]),
                ebx: hex(fields[3]),
                ecx: hex(fields[4]),
                edx: hex(fields[5]),
            }
        })
        .collect()
}

fn get(entries: &[CpuidEntry], function: u32, index: u32) -> CpuidEntry {
    *entries
        .iter()
        .find(|e| e.function == function && e.index == index)
        .unwrap_or_else(|| panic!("no leaf {function:#x}.{index}"))
}

fn vendor_string(entries: &[CpuidEntry]) -> String {
    let l0 = get(entries, 0, 0);
    let bytes: Vec<u8> = [l0.ebx, l0.edx, l0.ecx].iter().flat_map(|r| r.to_le_bytes()).collect();
    String::from_utf8(bytes).unwrap()
}

/// What every vendor's table must say for vCPU `id` of `count`.
fn check_common(supported: &[CpuidEntry], out: &[CpuidEntry], id: u8, count: u8) {
    let keys: HashSet<(u32, u32)> = out.iter().map(|e| (e.function, e.index)).collect();
    assert_eq!(keys.len(), out.len(), "no (function, index) twice");
    assert_eq!(vendor_string(out), vendor_string(supported));

    let leaf1 = get(out, 1, 0);
    assert_eq!(leaf1.ebx >> 24, u32::from(id), "initial APIC ID");
    assert_eq!(leaf1.ebx >> 16 & 0xff, u32::from(count));
    assert_eq!(leaf1.edx >> 28 & 1 == 1, count > 1, "HTT");
    assert_ne!(leaf1.ecx & 1 << 31, 0, "hypervisor bit");
    assert_eq!(leaf1.ecx & 1 << 24, get(supported, 1, 0).ecx & 1 << 24, "TSC deadline passes through");
    assert_eq!(leaf1.eax, get(supported, 1, 0).eax, "family/model/stepping untouched");

    // Leaves nobody should touch.
    for (f, i) in [(6, 0), (0x4000_0000, 0), (0x4000_0001, 0), (0xd, 0), (7, 0)] {
        assert_eq!(get(out, f, i), get(supported, f, i), "leaf {f:#x}.{i}");
    }
}

fn check_ext_topology(out: &[CpuidEntry], id: u8, count: u8) {
    let subleaves: Vec<CpuidEntry> = out.iter().filter(|e| e.function == 0xb).copied().collect();
    assert_eq!(subleaves.len(), 3);
    let core_bits = match count {
        1 => 0,
        4 => 2,
        _ => unreachable!(),
    };
    let expect = [(0, 1, 0x100), (core_bits, u32::from(count), 0x201), (0, 0, 0x2)];
    for (i, (sub, (eax, ebx, ecx))) in subleaves.iter().zip(expect).enumerate() {
        assert_eq!(sub.index, i as u32);
        assert_eq!(sub.flags & 1, 1, "indexed leaf");
        assert_eq!((sub.eax, sub.ebx, sub.ecx, sub.edx), (eax, ebx, ecx, u32::from(id)), "0xb.{i}");
    }
}

#[test]
fn fixtures_parse() {
    let amd = parse(AMD);
    let intel = parse(INTEL);
    assert_eq!(Vendor::of(&amd), Vendor::Amd);
    assert_eq!(Vendor::of(&intel), Vendor::Intel);
    assert!(amd.len() > 50 && intel.len() > 40);
}

#[test]
fn intel_1_and_4_vcpus() {
    let supported = parse(INTEL);
    for count in [1u8, 4] {
        for id in 0..count {
            let out = normalise(&supported, id, count);
            check_common(&supported, &out, id, count);
            check_ext_topology(&out, id, count);

            let caches: Vec<CpuidEntry> = out.iter().filter(|e| e.function == 4).copied().collect();
            assert_eq!(caches.len(), 5);
            for c in caches.iter().filter(|c| c.eax & 0x1f != 0) {
                let level = c.eax >> 5 & 7;
                assert_eq!(c.eax >> 26, u32::from(count) - 1, "cores per package - 1");
                let sharing = c.eax >> 14 & 0xfff;
                assert_eq!(sharing, if level == 3 { u32::from(count) - 1 } else { 0 }, "L{level}");
                // Cache geometry passes through.
                let original = get(&supported, 4, c.index);
                assert_eq!((c.eax & 0x3fff, c.ebx, c.ecx), (original.eax & 0x3fff, original.ebx, original.ecx));
            }
            assert_eq!(get(&out, 4, 4).eax, 0, "terminator untouched");
        }
    }
}

#[test]
fn amd_1_and_4_vcpus() {
    let supported = parse(AMD);
    for count in [1u8, 4] {
        for id in 0..count {
            let out = normalise(&supported, id, count);
            check_common(&supported, &out, id, count);
            // The host lists 0xB, so it carries the guest topology too.
            check_ext_topology(&out, id, count);

            let ext = get(&out, 0x8000_0001, 0);
            assert_eq!(ext.ecx >> 1 & 1 == 1, count > 1, "CmpLegacy");
            let sizes = get(&out, 0x8000_0008, 0);
            assert_eq!(sizes.ecx & 0xff, u32::from(count) - 1, "NC");
            assert_eq!(sizes.ecx >> 12 & 0xf, if count == 4 { 2 } else { 0 }, "ApicIdCoreIdSize");
            assert_eq!(sizes.ecx >> 16, get(&supported, 0x8000_0008, 0).ecx >> 16);
            assert_eq!(sizes.eax, get(&supported, 0x8000_0008, 0).eax, "address sizes untouched");

            let apic = get(&out, 0x8000_001e, 0);
            assert_eq!(apic.eax, u32::from(id), "extended APIC ID");
            assert_eq!(apic.ebx & 0xff, u32::from(id), "core ID");
            assert_eq!(apic.ebx >> 8 & 0xff, 0, "one thread per core");
            assert_eq!(apic.ecx & 0x7ff, 0, "node 0 of one");

            let l3 = get(&out, 0x8000_001d, 3);
            assert_eq!(l3.eax >> 14 & 0xfff, u32::from(count) - 1);
            assert_eq!(get(&out, 0x8000_001d, 0).eax >> 14 & 0xfff, 0);
        }
    }
}

#[test]
fn tsc_deadline_can_be_offered_on_either_vendor() {
    use arch::x86_64::cpuid::{offer_tsc_deadline, LEAF1_ECX_TSC_DEADLINE};
    for fixture in [parse(AMD), parse(INTEL)] {
        let mut entries = fixture.clone();
        for e in entries.iter_mut().filter(|e| e.function == 1) {
            e.ecx &= !LEAF1_ECX_TSC_DEADLINE;
        }
        offer_tsc_deadline(&mut entries);
        let leaf1 = entries.iter().find(|e| e.function == 1).expect("leaf 1");
        assert_ne!(leaf1.ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        let others_unchanged = entries.iter().zip(&fixture).filter(|(a, _)| a.function != 1).all(|(a, b)| a == b);
        assert!(others_unchanged);
    }
}

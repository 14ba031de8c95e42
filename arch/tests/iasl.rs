//! When `iasl` (Debian: acpica-tools) is installed, every table is disassembled by the reference ACPI compiler
//! and must come out without errors. Skipped (passing) when it is not installed.
#![cfg(target_arch = "x86_64")]

use std::process::Command;

use arch::x86_64::acpi::{build_tables, virtio_mmio_device_aml, AcpiConfig};

#[test]
fn iasl_disassembles_every_table() {
    if Command::new("iasl").arg("-v").output().is_err() {
        eprintln!("iasl not installed, skipping");
        return;
    }
    let mut config = AcpiConfig::new(4);
    config.extra_dsdt_aml.push(virtio_mmio_device_aml(0, 0xd000_0000, 0x1000, 5).unwrap());
    config.pci_host_bridge = true;
    let built = build_tables(&config).unwrap();
    let dir = std::env::temp_dir().join(format!("kestrel-iasl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for t in built.tables.iter().filter(|t| &t.signature != b"FACS") {
        let name = String::from_utf8_lossy(&t.signature).to_lowercase();
        let path = dir.join(format!("{name}.dat"));
        std::fs::write(&path, &t.bytes).unwrap();
        let out = Command::new("iasl").arg("-d").arg(&path).current_dir(&dir).output().unwrap();
        let log = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "iasl -d {name}: {log}");
        assert!(!log.contains("Error") && !log.contains("Warning"), "iasl -d {name}: {log}");
        let dsl = std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap();
        if name == "dsdt" {
            for needle in ["_S5_", "PNP0501", "PNP0B00", "LNRO0005", "0x03F8", "PCI0", "PNP0A08", "PNP0A03"] {
                assert!(dsl.contains(needle), "{needle} missing from\n{dsl}");
            }
            for needle in ["WordBusNumber", "0x0CF8", "DWordMemory", "0xC0000000", "0xCFFFFFFF"] {
                assert!(dsl.contains(needle), "{needle} missing from\n{dsl}");
            }
        }
        if name == "mcfg" {
            assert!(dsl.contains("Base Address : 00000000E0000000"), "ECAM base missing from\n{dsl}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

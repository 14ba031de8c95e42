#![cfg(target_arch = "x86_64")]

//! Firmware boot on this machine's KVM (issue 18): Debian's SeaBIOS (`-bios`, no kernel) runs under Kestrel and
//! prints its banner on COM1 (through its serial console, which fw_cfg's NOGRAPHIC turns on), goes on to find no
//! boot device, and does all of it again after a guest reset (a fresh VM, its low-memory copy written again). Needs the
//! `seabios` package: without `/usr/share/seabios/bios-256k.bin` the tests fail under CI (or with
//! KESTREL_REQUIRE_SEABIOS=1) and are otherwise SKIPPED.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use support::kestrel_command;
use support::kvm_available;
use support::qmp::QmpClient;

const SEABIOS: &str = "/usr/share/seabios/bios-256k.bin";
const BANNER: &str = "SeaBIOS (version";
/// What SeaBIOS prints once it has tried every boot device (it has none here).
const NO_BOOT_DEVICE: &str = "No bootable device.";
/// Generous for this host, where real mode runs slowly under nested KVM; a hang still ends the test.
const BOUND: Duration = Duration::from_secs(120);

fn seabios() -> Option<&'static Path> {
    if !kvm_available() {
        return None;
    }
    let path = Path::new(SEABIOS);
    if path.is_file() {
        return Some(path);
    }
    let required = std::env::var_os("CI").is_some() || std::env::var_os("KESTREL_REQUIRE_SEABIOS").is_some();
    assert!(!required, "{SEABIOS} is required here (CI or KESTREL_REQUIRE_SEABIOS is set): install seabios");
    eprintln!("SKIPPED: {SEABIOS} is missing (Debian package seabios); set KESTREL_REQUIRE_SEABIOS=1 to fail");
    None
}

/// A Kestrel running firmware, its serial console in a file; killed when dropped.
struct FirmwareVm {
    child: Child,
    serial: PathBuf,
    dir: PathBuf,
    started: Instant,
}

impl FirmwareVm {
    fn start(tag: &str, args: &[&str]) -> FirmwareVm {
        let dir = std::env::temp_dir().join(format!("kestrel-firmware-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let serial = dir.join("serial.log");
        let mut command = kestrel_command();
        command
            .args(args)
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let child = command.spawn().expect("starting kestrel");
        FirmwareVm { child, serial, dir, started }
    }

    fn serial_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.serial).unwrap_or_default()).into_owned()
    }

    /// How long after the start `needle` had appeared `count` times on the serial console; fails with what
    /// Kestrel said if it exits first or `BOUND` passes.
    fn wait_for(&mut self, needle: &str, count: usize) -> Duration {
        loop {
            if self.serial_text().matches(needle).count() >= count {
                return self.started.elapsed();
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut stderr = String::new();
                std::io::Read::read_to_string(self.child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
                panic!(
                    "kestrel exited ({status}) before {needle:?} x{count}:\n{stderr}\nserial:\n{}",
                    self.serial_text()
                );
            }
            assert!(
                self.started.elapsed() < BOUND,
                "no {needle:?} x{count} within {BOUND:?}; serial:\n{}",
                self.serial_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for FirmwareVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn seabios_prints_its_banner_on_the_serial_console_and_finds_no_boot_device() {
    let Some(bios) = seabios() else { return };
    // QEMU's spelling, as management tools write it.
    let mut vm = FirmwareVm::start("banner", &["-bios", bios.to_str().unwrap(), "-m", "256", "-nographic"]);
    let banner = vm.wait_for(BANNER, 1);
    eprintln!("firmware_boot: SeaBIOS banner on serial {:.2} s after exec", banner.as_secs_f64());
    let done = vm.wait_for(NO_BOOT_DEVICE, 1);
    eprintln!("firmware_boot: '{NO_BOOT_DEVICE}' {:.2} s after exec", done.as_secs_f64());
    let serial = vm.serial_text();
    assert!(serial.contains("SeaBIOS (version 1.16"), "Debian 12's SeaBIOS: {serial}");
    assert!(serial.contains("Booting from Hard Disk..."), "{serial}");
}

#[test]
fn a_guest_reset_runs_seabios_again_from_a_fresh_copy() {
    let Some(bios) = seabios() else { return };
    let dir = std::env::temp_dir().join(format!("kestrel-firmware-qmp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("qmp.sock");
    let qmp = format!("unix:{},server=on,wait=off", socket.display());
    let mut vm = FirmwareVm::start("reset", &["--bios", bios.to_str().unwrap(), "--cpus", "2", "--qmp", &qmp]);
    vm.wait_for(NO_BOOT_DEVICE, 1);
    let mut client = QmpClient::negotiated_within(&socket, BOUND);
    let (_, reply) = client.execute(r#"{"execute": "system_reset"}"#);
    assert_eq!(reply, serde_json::json!({"return": {}}));
    // A fresh VM starts at the reset vector again, with the image copied below 1 MiB anew (as at power-on).
    vm.wait_for(NO_BOOT_DEVICE, 2);
    assert_eq!(vm.serial_text().matches(BANNER).count(), 2, "one banner per run");
    // Snapshots do not hold the firmware's state yet: a save is refused before anything changes.
    let target = dir.join("saved.ksnap");
    let (_, reply) =
        client.execute(&format!(r#"{{"execute": "migrate", "arguments": {{"uri": "file:{}"}}}}"#, target.display()));
    assert_eq!(
        reply["error"]["desc"], "cannot save a machine booted from firmware (-bios): not supported yet",
        "{reply}"
    );
    assert!(!target.exists(), "nothing written");
    let (_, status) = client.execute(r#"{"execute": "query-status"}"#);
    assert_eq!(status["return"]["status"], "running", "{status}");
    drop(client);
    let _ = std::fs::remove_dir_all(&dir);
}

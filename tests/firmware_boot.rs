#![cfg(target_arch = "x86_64")]

//! Firmware boot on this machine's KVM (issue 18): Debian's SeaBIOS (`-bios`, no kernel) runs under Kestrel and
//! prints its banner on COM1 (through its serial console, which fw_cfg's NOGRAPHIC turns on). Without a disk it
//! finds no boot device, and does all of it again after a guest reset (a fresh VM, its low-memory copy written
//! again). With a GRUB hard-disk image on virtio-blk-pci it boots GRUB, which prints a marker through its own
//! serial terminal and powers the VM off through ACPI (Kestrel's tables, installed by SeaBIOS's table loader).
//! Needs the `seabios` package, and for the disk grub-mkrescue (`grub-pc-bin`, `grub-common`, `xorriso`,
//! `mtools`): without them the tests fail under CI (or with KESTREL_REQUIRE_SEABIOS=1) and are otherwise SKIPPED.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
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
/// What GRUB's configuration prints once SeaBIOS booted it from the disk.
const GRUB_MARKER: &str = "KESTREL-FW-TEST: grub reached via firmware";
/// GRUB runs in real mode and unpaged protected mode, which this host's KVM emulates instruction by instruction:
/// from exec to its marker took 60-85 s here beside other builds (QEMU's own run of the same image as long).
const DISK_BOOT_BOUND: Duration = Duration::from_secs(300);
/// GRUB's BIOS modules, which grub-mkrescue builds the image from.
const GRUB_I386_PC: &str = "/usr/lib/grub/i386-pc";

/// Whether this machine must have what a test needs (CI, or KESTREL_REQUIRE_SEABIOS set), or may skip it.
fn required() -> bool {
    std::env::var_os("CI").is_some() || std::env::var_os("KESTREL_REQUIRE_SEABIOS").is_some()
}

fn seabios() -> Option<&'static Path> {
    if !kvm_available() {
        return None;
    }
    let path = Path::new(SEABIOS);
    if path.is_file() {
        return Some(path);
    }
    assert!(!required(), "{SEABIOS} is required here (CI or KESTREL_REQUIRE_SEABIOS is set): install seabios");
    eprintln!("SKIPPED: {SEABIOS} is missing (Debian package seabios); set KESTREL_REQUIRE_SEABIOS=1 to fail");
    None
}

/// A directory of the test's own, removed when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!("kestrel-firmware-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        ScratchDir(path)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Makes, in `dir`, a hard-disk image (grub-mkrescue's: an MBR, El Torito and GRUB's BIOS core) whose GRUB talks
/// to COM1 itself, prints [`GRUB_MARKER`] and halts (ACPI S5 through the FADT's PM1a control block and the DSDT's
/// `\_S5`). None (SKIPPED) when grub-mkrescue or GRUB's BIOS modules are missing and not required.
fn grub_halt_image(dir: &Path) -> Option<PathBuf> {
    let have_grub = Path::new(GRUB_I386_PC).join("boot.img").is_file();
    let mkrescue = std::process::Command::new("grub-mkrescue").arg("--version").output();
    if !have_grub || !mkrescue.is_ok_and(|o| o.status.success()) {
        let what = "grub-mkrescue and GRUB's BIOS modules (Debian packages grub-pc-bin grub-common xorriso mtools)";
        assert!(!required(), "{what} are required here (CI or KESTREL_REQUIRE_SEABIOS is set)");
        eprintln!("SKIPPED: {what} are missing; set KESTREL_REQUIRE_SEABIOS=1 to fail");
        return None;
    }
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("boot/grub")).unwrap();
    let config = format!(
        "serial --unit=0 --speed=115200\nterminal_input serial\nterminal_output serial\necho \"{GRUB_MARKER}\"\nhalt\n"
    );
    std::fs::write(root.join("boot/grub/grub.cfg"), config).unwrap();
    let image = dir.join("halt.img");
    let made = std::process::Command::new("grub-mkrescue")
        .arg("-o")
        .arg(&image)
        .args(["-d", GRUB_I386_PC])
        .arg(&root)
        .stdin(Stdio::null())
        .output()
        .expect("running grub-mkrescue");
    assert!(made.status.success(), "grub-mkrescue failed: {}", String::from_utf8_lossy(&made.stderr));
    Some(image)
}

/// `text` without ANSI escape sequences: ESC `[` parameters and a final byte (0x40-0x7e), or ESC and one byte.
fn without_terminal_escapes(text: &str) -> String {
    let mut plain = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            plain.push(c);
        } else if chars.next() == Some('[') {
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        }
    }
    plain
}

#[test]
fn terminal_escapes_are_left_out_of_the_serial_text() {
    let grub = "\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS\r\n\x1b[0;30;47mWelcome to\x1b[04;10H\x1b[04;11H GRUB!\x1b[H";
    assert_eq!(without_terminal_escapes(grub), "SeaBIOS\r\nWelcome to GRUB!");
}

/// A Kestrel running firmware, its serial console in a file; killed when dropped.
struct FirmwareVm {
    child: Child,
    serial: PathBuf,
    dir: PathBuf,
    started: Instant,
    /// How long after the start `wait_for` and `wait_for_exit` give up.
    bound: Duration,
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
        FirmwareVm { child, serial, dir, started, bound: BOUND }
    }

    /// The serial console's text, without terminal control sequences: GRUB's terminal moves the cursor even in the
    /// middle of a line ("Welcome to\x1b[04;10H\x1b[04;11H GRUB!" in one run).
    fn serial_text(&self) -> String {
        without_terminal_escapes(&String::from_utf8_lossy(&std::fs::read(&self.serial).unwrap_or_default()))
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
                self.started.elapsed() < self.bound,
                "no {needle:?} x{count} within {:?}; serial:\n{}",
                self.bound,
                self.serial_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kestrel's exit status, how long after the start it exited, and what it wrote on stderr; fails if it is
    /// still running when the bound passes.
    fn wait_for_exit(&mut self) -> (ExitStatus, Duration, String) {
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let elapsed = self.started.elapsed();
                let mut stderr = String::new();
                std::io::Read::read_to_string(self.child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
                return (status, elapsed, stderr);
            }
            assert!(
                self.started.elapsed() < self.bound,
                "kestrel still runs after {:?}; serial:\n{}",
                self.bound,
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
    // With no boot order, SeaBIOS's own tries the floppy too (which `-boot strict=on` stops, below).
    assert!(serial.contains("Booting from Floppy..."), "{serial}");
}

/// `-boot strict=on` with a boot order: SeaBIOS boots the listed devices (here a blank disk) and none other: no
/// floppy after the disk fails, as without it (above), but "No bootable device." straight away.
#[test]
fn a_strict_boot_order_tries_only_the_listed_devices() {
    let Some(bios) = seabios() else { return };
    let scratch = ScratchDir::new("strict");
    let blank = scratch.0.join("blank.img");
    std::fs::File::create(&blank).unwrap().set_len(1 << 20).unwrap();
    let drive = format!("file={},if=none,id=blank,format=raw,readonly=on", blank.display());
    let args = ["-bios", bios.to_str().unwrap(), "-nographic", "-boot", "strict=on", "-drive", &drive];
    let mut vm =
        FirmwareVm::start("strict", &[&args[..], &["-device", "virtio-blk-pci,drive=blank,bootindex=0"]].concat());
    vm.wait_for(NO_BOOT_DEVICE, 1);
    let serial = vm.serial_text();
    let disk = serial.find("Booting from Hard Disk...").unwrap_or_else(|| panic!("{serial}"));
    assert!(serial[disk..].contains("Boot failed: not a bootable disk"), "{serial}");
    assert!(!serial.contains("Floppy"), "{serial}");
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

/// Two virtio-blk disks: a blank one first (slot 1), then the GRUB image, which `bootindex=` puts first in the boot
/// order (fw_cfg's `bootorder`). Without it SeaBIOS boots the first disk it found, says "Boot failed: not a
/// bootable disk" and ends at "No bootable device." (checked by hand: so the boot below is the boot order's doing).
#[test]
fn seabios_boots_grub_from_the_virtio_blk_disk_its_bootindex_names_and_grub_powers_the_vm_off() {
    let Some(bios) = seabios() else { return };
    let scratch = ScratchDir::new("grub-image");
    let Some(image) = grub_halt_image(&scratch.0) else { return };
    let blank = scratch.0.join("blank.img");
    std::fs::File::create(&blank).unwrap().set_len(1 << 20).unwrap();
    let blank_drive = format!("file={},if=none,id=blank,format=raw,readonly=on", blank.display());
    let grub_drive = format!("file={},if=none,id=grub,format=raw,readonly=on", image.display());
    let args = [
        "-bios",
        bios.to_str().unwrap(),
        "-m",
        "256",
        "-nographic",
        "-drive",
        &blank_drive,
        "-device",
        "virtio-blk-pci,drive=blank",
        "-drive",
        &grub_drive,
        "-device",
        "virtio-blk-pci,drive=grub,bootindex=1",
    ];
    let mut vm = FirmwareVm::start("grub", &args);
    vm.bound = DISK_BOOT_BOUND;
    let marker = vm.wait_for(GRUB_MARKER, 1);
    eprintln!("firmware_boot: GRUB's marker on serial {:.1} s after exec", marker.as_secs_f64());
    let (status, exited, stderr) = vm.wait_for_exit();
    eprintln!("firmware_boot: kestrel exited {:.1} s after exec", exited.as_secs_f64());
    let serial = vm.serial_text();
    assert!(status.success(), "GRUB's halt is a clean power-off: {status}\n{stderr}\nserial:\n{serial}");
    // In this order, once each: SeaBIOS, its hard-disk boot (the virtio-blk disk it found where it put its BARs),
    // GRUB's own loader, then GRUB's configuration read from the disk. (GRUB's terminal addresses the cursor:
    // the "!" of its welcome line was once painted after the marker, so the welcome is matched without it.)
    let mut from = 0;
    for needle in [BANNER, "Booting from Hard Disk...", "GRUB loading.", "Welcome to GRUB", GRUB_MARKER] {
        let at = serial[from..].find(needle).unwrap_or_else(|| panic!("no {needle:?} after byte {from}:\n{serial}"));
        from += at + needle.len();
    }
    assert_eq!(serial.matches(BANNER).count(), 1, "one boot, no reset: {serial}");
    assert_eq!(serial.matches("Booting from").count(), 1, "the first device tried booted: {serial}");
    assert!(!serial.contains("Boot failed") && !serial.contains(NO_BOOT_DEVICE), "{serial}");
    // GRUB's ACPI power-off worked itself: without the tables it says so and falls back to the BIOS's APM.
    assert!(!serial.contains("ACPI shutdown failed"), "{serial}");
    assert!(!stderr.contains("unmapped"), "every access reached a device: {stderr}");
}

#![cfg(target_arch = "x86_64")]

//! Save a running VM with QMP `migrate` to `file:PATH` and restore it into a new `kestrel` process with
//! `-incoming file:PATH` / `--restore PATH` (issue 16), on this machine's KVM with the repo's probe payload: its
//! `flood` command counts on the serial port forever, so the count must go on from where it stopped, without a
//! second boot banner. Plus the paused (`-S`) forms, 4 vCPUs with virtio devices on both transports, a save that
//! fails, and snapshot files that must be refused with one clear line.

mod support;

use std::path::Path;
use std::process::Stdio;
use std::thread;
use std::time::Duration;

use support::counting_vm::{
    assert_count_continues, counts, enable_migration_events, events, file_uri, migrate, running_save_events, Dir, Vm,
    PVH,
};
use support::{kestrel_command, kvm_available, payload};

/// Runs kestrel to restore `snapshot` with `extra` arguments; the restored VM.
fn restore(dir: &Dir, name: &str, snapshot: &Path, spelling: &str, extra: &[&str]) -> Vm {
    let incoming = match spelling {
        "-incoming" => format!("file:{}", snapshot.display()),
        _ => snapshot.display().to_string(),
    };
    let mut args = vec![spelling, &incoming];
    args.extend_from_slice(extra);
    Vm::start(dir, name, &args)
}

fn save_and_restore(name: &str, machine: &[&str], spelling: &str) {
    if !kvm_available() {
        return;
    }
    let dir = Dir::new(name);
    let snapshot = dir.path("vm.ksnap");
    let source = Vm::start(&dir, "source", machine);
    source.wait_for_count(200);
    let mut qmp = source.client();
    enable_migration_events(&mut qmp);
    let seen = migrate(&mut qmp, &file_uri(&snapshot));
    assert_eq!(seen, running_save_events());
    assert_eq!(qmp.status(), "postmigrate");
    let (_, info) = qmp.execute(r#"{"execute": "query-migrate"}"#);
    assert_eq!(info["return"]["status"], "completed", "{info}");
    assert!(info["return"]["ram"]["normal"].as_u64().unwrap() > 0, "{info}");
    assert_eq!(info["return"]["ram"]["transferred"], std::fs::metadata(&snapshot).unwrap().len(), "{info}");
    drop(qmp);
    let source_console = source.settled_console();
    source.quit();

    let restored = restore(&dir, "restored", &snapshot, spelling, machine);
    let last = *counts(&source_console).last().unwrap();
    restored.wait_for_count(last + 500);
    assert_eq!(restored.client().status(), "running");
    assert_count_continues(&source_console, &restored.console());
    restored.quit();
}

#[test]
fn a_counting_guest_counts_on_in_a_new_process() {
    save_and_restore("one-vcpu", &["--memory", "64M"], "-incoming");
}

#[test]
fn four_vcpus_with_virtio_pci_disk_console_and_rng_restore() {
    let dir = Dir::new("four-disk");
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let disk = format!("path={}", disk.display());
    let console = format!("file:{}", dir.path("hvc0.log").display());
    let args = ["--memory", "64M", "--cpus", "4", "--disk", &disk, "--console", &console, "--rng"];
    save_and_restore("four-vcpus-pci", &args, "--restore");
}

#[test]
fn the_microvm_transport_restores() {
    let dir = Dir::new("microvm-disk");
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let disk = format!("path={}", disk.display());
    let args = ["--memory", "64M", "--machine", "microvm", "--disk", &disk, "--rng"];
    save_and_restore("microvm", &args, "-incoming");
}

#[test]
fn a_paused_save_restores_paused_until_cont_and_the_source_can_go_on() {
    if !kvm_available() {
        return;
    }
    let dir = Dir::new("paused");
    let snapshot = dir.path("vm.ksnap");
    let source = Vm::start(&dir, "source", &["--memory", "64M"]);
    source.wait_for_count(100);
    let mut qmp = source.client();
    enable_migration_events(&mut qmp);
    qmp.execute(r#"{"execute": "stop"}"#);
    let seen = migrate(&mut qmp, &file_uri(&snapshot));
    assert_eq!(seen, events(&[("MIGRATION", "setup"), ("MIGRATION", "active"), ("MIGRATION", "completed")]));
    assert_eq!(qmp.status(), "postmigrate");
    let saved_console = source.settled_console();
    let last = *counts(&saved_console).last().unwrap();
    // `cont` resumes the source.
    let (resumed, _) = qmp.execute(r#"{"execute": "cont"}"#);
    assert_eq!(resumed[0]["event"], "RESUME");
    source.wait_for_count(last + 100);
    drop(qmp);
    source.quit();

    let restored = restore(&dir, "restored", &snapshot, "-incoming", &["--memory", "64M", "-S"]);
    let mut qmp = restored.client();
    assert_eq!(qmp.status(), "paused");
    thread::sleep(Duration::from_millis(200));
    assert_eq!(counts(&restored.console()), Vec::<u64>::new(), "the guest ran before cont");
    let (resumed, _) = qmp.execute(r#"{"execute": "cont"}"#);
    assert_eq!(resumed[0]["event"], "RESUME");
    restored.wait_for_count(last + 100);
    assert_count_continues(&saved_console, &restored.console());
    drop(qmp);
    restored.quit();
}

#[test]
fn a_save_that_cannot_be_written_fails_and_the_guest_runs_on() {
    if !kvm_available() {
        return;
    }
    let dir = Dir::new("unwritable");
    let source = Vm::start(&dir, "source", &["--memory", "64M"]);
    source.wait_for_count(50);
    let mut qmp = source.client();
    enable_migration_events(&mut qmp);
    let seen = migrate(&mut qmp, &file_uri(Path::new("/nonexistent-dir/vm.ksnap")));
    let expected = events(&[
        ("MIGRATION", "setup"),
        ("MIGRATION", "active"),
        ("STOP", ""),
        ("MIGRATION", "failed"),
        ("RESUME", ""),
    ]);
    assert_eq!(seen, expected);
    assert_eq!(qmp.status(), "running");
    let (_, info) = qmp.execute(r#"{"execute": "query-migrate"}"#);
    assert_eq!(info["return"]["status"], "failed", "{info}");
    assert!(info["return"]["error-desc"].as_str().unwrap().contains("/nonexistent-dir/vm.ksnap"), "{info}");
    let last = *counts(&source.console()).last().unwrap();
    source.wait_for_count(last + 100);
    // A URI Kestrel cannot use is an error reply, with nothing started.
    let (events, reply) = qmp.execute(r#"{"execute": "migrate", "arguments": {"uri": "tcp:127.0.0.1:4444"}}"#);
    assert!(events.is_empty() && reply["error"]["desc"].as_str().unwrap().contains("file:PATH or fd:NAME"), "{reply}");
    drop(qmp);
    source.quit();
}

/// Runs kestrel restoring `snapshot` and expects a refusal: a non-zero exit, one line on stderr containing
/// `expected`, and no guest output.
fn assert_refused(dir: &Dir, snapshot: &Path, extra: &[&str], expected: &str) {
    let console = dir.path("refused.log");
    let _ = std::fs::remove_file(&console);
    let mut cmd = kestrel_command();
    cmd.args(["--kernel", payload(PVH).to_str().unwrap(), "--cmdline", "flood"]);
    cmd.arg("--serial").arg(format!("file:{}", console.display()));
    cmd.arg("-incoming").arg(format!("file:{}", snapshot.display()));
    cmd.args(extra).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    let output = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "a bad snapshot was accepted ({extra:?}): {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "not one line: {stderr}");
    assert!(stderr.contains(expected), "expected {expected:?} in: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(std::fs::read_to_string(&console).unwrap_or_default().is_empty(), "the guest ran");
}

#[test]
fn hostile_and_mismatched_snapshots_are_refused_with_one_line() {
    if !kvm_available() {
        return;
    }
    let dir = Dir::new("hostile");
    let snapshot = dir.path("vm.ksnap");
    let source = Vm::start(&dir, "source", &["--memory", "64M"]);
    source.wait_for_count(10);
    migrate(&mut source.client(), &file_uri(&snapshot));
    source.quit();
    let bytes = std::fs::read(&snapshot).unwrap();

    // The command line disagrees with the file.
    assert_refused(&dir, &snapshot, &["--memory", "128M"], "guest memory");
    assert_refused(&dir, &snapshot, &["--memory", "64M", "--cpus", "2"], "vcpu.1");
    assert_refused(&dir, &snapshot, &["--memory", "64M", "--rng"], "virtio-rng");
    assert_refused(&dir, &snapshot, &["--memory", "64M", "--machine", "microvm"], "machine type");

    // The file is damaged.
    let truncated = dir.path("truncated.ksnap");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert_refused(&dir, &truncated, &["--memory", "64M"], "truncated");
    let garbage = dir.path("garbage.ksnap");
    std::fs::write(&garbage, b"this is not a snapshot at all, just some bytes".repeat(100)).unwrap();
    assert_refused(&dir, &garbage, &["--memory", "64M"], "not a Kestrel snapshot");
    let mut flipped = bytes.clone();
    let last_page = flipped.len() - 4096;
    flipped[last_page] ^= 0xff;
    let corrupted = dir.path("corrupted.ksnap");
    std::fs::write(&corrupted, &flipped).unwrap();
    assert_refused(&dir, &corrupted, &["--memory", "64M"], "corrupted");
    assert_refused(&dir, &dir.path("missing.ksnap"), &["--memory", "64M"], "missing.ksnap");
}

/// The guest agent's channel as libvirt gives it, beside a console, on a virtio-serial controller of QEMU's 31
/// ports (a multiport device of 64 queues on PCI): `query-chardev` reports the ports' chardevs, the machine saves and
/// restores with host input waiting in the agent's port (nobody in the payload opens it), and a restore whose
/// command line has other ports is refused with one line.
#[test]
fn virtio_serial_ports_restore_and_another_port_set_is_refused() {
    if !kvm_available() {
        return;
    }
    use std::io::Write;
    let dir = Dir::new("vserial");
    let snapshot = dir.path("vm.ksnap");
    let agent = dir.path("agent.sock");
    let agent_chardev = format!("socket,id=charchannel0,path={},server=on,wait=off", agent.display());
    let console_chardev = format!("file,id=charconsole0,path={}", dir.path("hvc0.log").display());
    let ports = |max_ports: &str, nr: &str| {
        vec![
            "--memory".to_string(),
            "64M".into(),
            "-device".into(),
            format!("virtio-serial-pci,id=virtio-serial0{max_ports}"),
            "-chardev".into(),
            agent_chardev.clone(),
            "-device".into(),
            format!("virtserialport,bus=virtio-serial0.0,nr={nr},chardev=charchannel0,id=channel0,name=org.qemu.guest_agent.0"),
            "-chardev".into(),
            console_chardev.clone(),
            "-device".into(),
            "virtconsole,chardev=charconsole0,id=console0".into(),
        ]
    };
    let machine = ports("", "1");
    let machine: Vec<&str> = machine.iter().map(String::as_str).collect();
    let source = Vm::start(&dir, "source", &machine);
    source.wait_for_count(100);
    let mut qmp = source.client();
    let (_, chardevs) = qmp.execute(r#"{"execute": "query-chardev"}"#);
    let chardev = |label: &str| {
        let list = chardevs["return"].as_array().unwrap();
        list.iter().find(|c| c["label"] == label).unwrap_or_else(|| panic!("no {label} in {chardevs}")).clone()
    };
    assert_eq!(chardev("charchannel0")["filename"], format!("unix:{},server=on", agent.display()));
    assert_eq!(chardev("charchannel0")["frontend-open"], false, "the payload has no virtio-serial driver");
    assert_eq!(chardev("charconsole0")["filename"], format!("file:{}", dir.path("hvc0.log").display()));
    let (_, peripherals) = qmp.execute(r#"{"execute": "qom-list", "arguments": {"path": "/machine/peripheral"}}"#);
    for id in ["virtio-serial0", "channel0", "console0"] {
        assert!(peripherals["return"].as_array().unwrap().iter().any(|p| p["name"] == id), "{id}: {peripherals}");
    }
    // Host input for a port nobody in the guest has open waits in the device, and goes with the snapshot.
    let mut client = std::os::unix::net::UnixStream::connect(&agent).unwrap();
    client.write_all(b"{\"execute\":\"guest-ping\"}\n").unwrap();
    thread::sleep(Duration::from_millis(200));
    enable_migration_events(&mut qmp);
    assert_eq!(migrate(&mut qmp, &file_uri(&snapshot)), running_save_events());
    drop(qmp);
    let source_console = source.settled_console();
    source.quit();
    drop(client);

    let restored = restore(&dir, "restored", &snapshot, "-incoming", &machine);
    let last = *counts(&source_console).last().unwrap();
    restored.wait_for_count(last + 200);
    assert_count_continues(&source_console, &restored.console());
    restored.quit();

    // Another controller (fewer queues), or the agent's port at another number.
    let other = ports(",max_ports=8", "1");
    let other: Vec<&str> = other.iter().map(String::as_str).collect();
    assert_refused(&dir, &snapshot, &other, "cannot restore pci.01.0.virtio-console");
    let other = ports("", "2");
    let other: Vec<&str> = other.iter().map(String::as_str).collect();
    assert_refused(
        &dir,
        &snapshot,
        &other,
        "invalid virtio-console state: ports: ports [0, 1], where this device has [0, 2]",
    );
}

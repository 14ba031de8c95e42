#![cfg(target_arch = "x86_64")]

//! libvirt's capability probe against the real binary: the guest-less `-machine none` started with `-daemonize`
//! and `-pidfile` as libvirt starts it, then `virsh domcapabilities --emulatorbin kestrel` through a real libvirtd,
//! whose answer must list only what Kestrel implements.
//!
//! libvirtd and virtlogd run in a private mount namespace (`support::libvirt`).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use support::libvirt::{libvirt_available, run_to_eof, PrivateLibvirt, TIMEOUT};
use support::qmp::QmpClient;
use support::{kestrel_binary, kvm_available};

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn process_exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// libvirt's probe command line (libvirt 9.0's `qemuProcessQMPLaunch`).
fn probe_command(socket: &Path, pidfile: &Path) -> Command {
    let mut command = Command::new(kestrel_binary());
    command.args(["-S", "-no-user-config", "-nodefaults", "-nographic", "-machine", "none,accel=kvm:tcg", "-qmp"]);
    command.arg(format!("unix:{},server=on,wait=off", socket.display()));
    command.arg("-pidfile").arg(pidfile).arg("-daemonize");
    command
}

#[test]
fn daemonize_returns_once_the_monitor_listens_and_cleans_up_on_sigterm() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("daemonize");
    let (socket, pidfile) = (dir.0.join("qmp.monitor"), dir.0.join("qmp.pid"));
    let run = run_to_eof(probe_command(&socket, &pidfile));
    assert!(run.status.success(), "{}: {}", run.status, run.stderr);
    assert_eq!((run.stdout.as_str(), run.stderr.as_str()), ("", ""));

    // Both exist the moment the command returns: no retry.
    let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim_end().parse().unwrap();
    assert!(process_exists(pid), "the pid file names {pid}, which is not running");
    for fd in 0..=2 {
        let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
        assert_eq!(target, Path::new("/dev/null"), "the daemon's descriptor {fd}");
    }
    let mut qmp = QmpClient::negotiated(&socket);
    assert_eq!(qmp.status(), "prelaunch");
    let (_, machines) = qmp.execute(r#"{"execute": "query-machines"}"#);
    let names: Vec<&str> = machines["return"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"none"), "{machines}");
    let (_, cpus) = qmp.execute(r#"{"execute": "query-cpus-fast"}"#);
    assert_eq!(cpus["return"], serde_json::json!([]), "the none machine runs no vCPU");

    // libvirt ends the probe with SIGTERM; the monitor says why, and the files go with the process.
    // SAFETY: kill sends a signal to the daemon this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let event = qmp.line();
    assert_eq!(event["event"], "SHUTDOWN", "{event}");
    assert_eq!(event["data"]["reason"], "host-signal", "{event}");
    let deadline = Instant::now() + TIMEOUT;
    while process_exists(pid) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    assert!(!process_exists(pid), "the daemon outlived SIGTERM");
    assert!(!pidfile.exists(), "the pid file was left behind");
    assert!(!socket.exists(), "the QMP socket was left behind");
}

#[test]
fn daemon_failures_are_one_line_and_a_nonzero_exit() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("daemon-failures");
    // The parent reports what stopped the daemon before it was ready: here, a pid file it cannot create.
    let missing = dir.0.join("no-such-dir/qmp.pid");
    let run = run_to_eof(probe_command(&dir.0.join("a.monitor"), &missing));
    assert!(!run.status.success());
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert!(run.stderr.contains("pid file") && run.stderr.contains("no-such-dir"), "{}", run.stderr);
    assert!(!dir.0.join("a.monitor").exists(), "a failed start left its socket behind");

    // A second Kestrel on a pid file the first holds refuses, and the first goes on.
    let (socket, pidfile) = (dir.0.join("b.monitor"), dir.0.join("b.pid"));
    assert!(run_to_eof(probe_command(&socket, &pidfile)).status.success());
    let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim_end().parse().unwrap();
    let second = run_to_eof(probe_command(&dir.0.join("c.monitor"), &pidfile));
    assert!(!second.status.success());
    assert!(second.stderr.contains("lock"), "{}", second.stderr);
    assert_eq!(std::fs::read_to_string(&pidfile).unwrap().trim_end(), pid.to_string());
    QmpClient::negotiated(&socket);
    // SAFETY: kill sends a signal to the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + TIMEOUT;
    while process_exists(pid) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    assert!(!pidfile.exists());
}

#[test]
fn bad_probe_options_are_one_line_each() {
    let cases: &[(&[&str], &str)] = &[
        (&["-machine", "none,accel=tcg"], "accel"),
        (&["-machine", "none", "-kernel", "/boot/vmlinuz"], "-machine none"),
        (&["-machine", "pc-q35-2.0", "-kernel", "k"], "pc-q35-2.0"),
        (&["-kernel", "k", "-daemonize", "-serial", "stdio"], "daemonize"),
        (&["-machine", "none", "-pidfile", ""], "-pidfile"),
        (&["-kernel", "k", "-cpu", "host,migratable=maybe"], "migratable must be on or off"),
    ];
    for (args, needle) in cases {
        let mut command = Command::new(kestrel_binary());
        command.args(*args);
        let run = run_to_eof(command);
        assert_eq!(run.status.code(), Some(2), "{args:?}: {}", run.stderr);
        assert_eq!(run.stderr.lines().count(), 1, "{args:?}: {}", run.stderr);
        assert!(run.stderr.contains(needle), "{args:?}: {}", run.stderr);
    }
}

/// The domcapabilities XML per machine type, and how long each took, from a private libvirtd (the first pays for
/// the probe).
fn domcapabilities(emulator: &Path, machines: &[&str]) -> Vec<(String, u64)> {
    let libvirt = PrivateLibvirt::start(None);
    let emulator = emulator.to_str().unwrap();
    let mut answers = Vec::new();
    for machine in machines {
        let start = Instant::now();
        let args = ["domcapabilities", "--emulatorbin", emulator, "--arch", "x86_64", "--virttype", "kvm", "--machine"];
        let run = libvirt.virsh(&[&args[..], &[machine]].concat());
        let xml = run.assert_success("virsh domcapabilities").to_string();
        answers.push((xml, start.elapsed().as_millis() as u64));
    }
    answers
}

/// The values of `<enum name='NAME'>` inside the first `<ELEMENT ...>` section of `xml`.
fn enum_values(xml: &str, element: &str, name: &str) -> Vec<String> {
    let section = xml.split(&format!("<{element} ")).nth(1).unwrap_or_else(|| panic!("no <{element}> in\n{xml}"));
    let section = section.split(&format!("</{element}>")).next().unwrap();
    let Some(values) = section.split(&format!("<enum name='{name}'>")).nth(1) else { return Vec::new() };
    let values = values.split("</enum>").next().unwrap();
    values.split("<value>").skip(1).map(|v| v.split("</value>").next().unwrap().to_string()).collect()
}

/// Kestrel processes libvirt started to probe (their monitor is in libvirt's directory), other tests' aside.
fn libvirt_probe_processes() -> Vec<u32> {
    let binary = std::fs::canonicalize(kestrel_binary()).unwrap();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe == binary))
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmdline).contains("/var/lib/libvirt/qemu/")
        })
        .collect()
}

#[test]
fn virsh_domcapabilities_lists_what_kestrel_implements() {
    if !kvm_available() || !libvirt_available() {
        return;
    }
    let before = libvirt_probe_processes();
    let emulator = std::fs::canonicalize(kestrel_binary()).unwrap();
    let answers = domcapabilities(&emulator, &["pc", "q35"]);
    let (pc, probe_ms) = &answers[0];
    eprintln!("libvirt_probe: domcapabilities with the probe took {probe_ms} ms (cached: {} ms)", answers[1].1);
    eprintln!("{pc}");

    let has = |xml: &str, line: &str| assert!(xml.contains(line), "lacks {line}:\n{xml}");
    has(pc, &format!("<path>{}</path>", emulator.display()));
    has(pc, "<domain>kvm</domain>");
    has(pc, "<arch>x86_64</arch>");
    // The versioned names, which the aliases resolve to.
    has(pc, "<machine>pc-i440fx-7.2</machine>");
    has(&answers[1].0, "<machine>pc-q35-7.2</machine>");
    let max: u32 = pc.split("<vcpu max='").nth(1).unwrap().split('\'').next().unwrap().parse().unwrap();
    assert!((1..=254).contains(&max), "vcpu max {max}");
    has(pc, "<iothreads supported='no'/>");

    // The CPU: the host's, passed through, or the one named model, kvm64 (usable where the host has all of its
    // features: KVM-PVM lacks SSE3), which host-model is built on; no maximum model.
    has(pc, "<mode name='host-passthrough' supported='yes'>");
    has(pc, "<mode name='maximum' supported='no'/>");
    has(pc, "<mode name='host-model' supported='yes'>");
    has(pc, "<model fallback='forbid'>kvm64</model>");
    let custom = pc.split("<mode name='custom' supported='yes'>").nth(1).unwrap_or_else(|| panic!("{pc}"));
    let models: Vec<&str> = custom.split("</mode>").next().unwrap().matches("</model>").collect();
    assert_eq!(models.len(), 1, "{custom}");
    assert!(custom.contains(">kvm64</model>"), "{custom}");

    // Devices: virtio disks and the virtio rng on either entropy source, no display device, TPM or USB redirection.
    assert_eq!(enum_values(pc, "disk", "model"), ["virtio"]);
    assert_eq!(enum_values(pc, "rng", "model"), ["virtio"]);
    assert_eq!(enum_values(pc, "rng", "backendModel"), ["random", "builtin"]);
    assert_eq!(enum_values(pc, "video", "modelType"), ["none"]);
    assert_eq!(enum_values(pc, "graphics", "type"), Vec::<String>::new());
    assert_eq!(enum_values(pc, "hostdev", "pciBackend"), Vec::<String>::new());
    has(pc, "<tpm supported='no'/>");
    has(pc, "<redirdev supported='no'/>");
    for feature in ["gic", "vmcoreinfo", "genid", "backup", "sev", "sgx"] {
        has(pc, &format!("<{feature} supported='no'/>"));
    }

    // libvirt ended its probe process: no Kestrel is left running that this test did not find already.
    let after: Vec<u32> = libvirt_probe_processes().into_iter().filter(|pid| !before.contains(pid)).collect();
    assert!(after.is_empty(), "probe processes left running: {after:?}");
}

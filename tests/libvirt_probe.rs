#![cfg(target_arch = "x86_64")]

//! libvirt's capability probe against the real binary: the guest-less `-machine none` started with `-daemonize`
//! and `-pidfile` as libvirt starts it, then `virsh domcapabilities --emulatorbin kestrel` through a real libvirtd,
//! whose answer must list only what Kestrel implements.
//!
//! libvirtd and virtlogd run in a private mount namespace (`unshare --mount`) with their state, cache, log and
//! runtime directories on tmpfs, so the test neither sees nor disturbs a libvirt the machine runs, and everything
//! it made disappears with the namespace; the daemons are stopped by their pid files before it ends.

mod support;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use support::qmp::QmpClient;
use support::{kestrel_binary, kvm_available};

const TIMEOUT: Duration = Duration::from_secs(60);

/// How a command ended and what it printed, once it exited *and* closed its stdout and stderr: libvirt waits for
/// both, so a daemon that kept the caller's pipes would hang here, and fails the test after `TIMEOUT`.
struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

fn run_to_eof(mut command: Command) -> Finished {
    let mut child = command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let (done, finished) = mpsc::channel();
    thread::spawn(move || {
        let (mut stdout, mut stderr) = (String::new(), String::new());
        let err_reader = thread::spawn(move || {
            let _ = err.read_to_string(&mut stderr);
            stderr
        });
        let _ = out.read_to_string(&mut stdout);
        let stderr = err_reader.join().unwrap();
        let status = child.wait().unwrap();
        let _ = done.send(Finished { status, stdout, stderr });
    });
    finished.recv_timeout(TIMEOUT).unwrap_or_else(|_| panic!("no exit and end of output within {TIMEOUT:?}"))
}

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
        (&["-kernel", "k", "-cpu", "Skylake-Client"], "-cpu host"),
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

/// Runs in a private mount namespace: tmpfs over libvirt's directories, virtlogd and libvirtd started as daemons
/// (there is no systemd), one `virsh domcapabilities` per machine type given after the emulator, each answer
/// printed between markers, then the daemons stopped (by their pid files, waiting until they are gone).
const PRIVATE_LIBVIRT: &str = r#"
set -eu
emulator=$1; shift
for dir in /run /var/lib/libvirt /var/cache/libvirt /var/log/libvirt; do
  mkdir -p "$dir"; mount -t tmpfs -o mode=0755 tmpfs "$dir"
done
mkdir -p /run/libvirt /var/lib/libvirt/qemu /var/cache/libvirt/qemu /var/log/libvirt/qemu
chown libvirt-qemu:libvirt-qemu /var/lib/libvirt/qemu
stop() {
  for pidfile in /run/libvirtd.pid /run/virtlogd.pid; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile"); kill "$pid" 2>/dev/null || continue
    for _ in $(seq 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  done
}
trap stop EXIT
virtlogd -d
libvirtd -d
for _ in $(seq 200); do [ -S /run/libvirt/libvirt-sock ] && break; sleep 0.05; done
for machine in "$@"; do
  start=$(date +%s%N)
  echo "=== $machine"
  virsh domcapabilities --emulatorbin "$emulator" --arch x86_64 --virttype kvm --machine "$machine"
  echo "=== took $(( ($(date +%s%N) - start) / 1000000 )) ms"
done
"#;

/// The domcapabilities XML per machine type, and how long each took, from a private libvirtd.
fn domcapabilities(emulator: &Path, machines: &[&str]) -> Vec<(String, u64)> {
    let mut command = Command::new("unshare");
    command.args(["--mount", "--propagation", "private", "bash", "-c", PRIVATE_LIBVIRT, "libvirt-probe"]);
    command.arg(emulator).args(machines);
    let run = run_to_eof(command);
    assert!(run.status.success(), "{}\n{}\n{}", run.status, run.stdout, run.stderr);
    let mut answers = Vec::new();
    for section in run.stdout.split("=== ").skip(1) {
        if let Some(took) = section.strip_prefix("took ") {
            let ms = took.split_whitespace().next().unwrap().parse().unwrap();
            let last: &mut (String, u64) = answers.last_mut().unwrap();
            last.1 = ms;
        } else {
            answers.push((section.split_once('\n').unwrap().1.to_string(), 0));
        }
    }
    assert_eq!(answers.len(), machines.len(), "{}", run.stdout);
    answers
}

/// libvirt present, or installed from Debian when it is not (as root, with apt); `false` (skipped) where it
/// cannot be. ci/install-deps installs it for CI.
fn libvirt_available() -> bool {
    let present =
        || ["/usr/bin/virsh", "/usr/sbin/libvirtd", "/usr/sbin/virtlogd"].iter().all(|p| Path::new(p).exists());
    if present() {
        return true;
    }
    // SAFETY: geteuid only reads the process's credentials.
    let root = unsafe { libc::geteuid() } == 0;
    if root && Path::new("/usr/bin/apt-get").exists() {
        eprintln!("libvirt_probe: installing libvirt-daemon-system and libvirt-clients");
        let status = Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends", "libvirt-daemon-system", "libvirt-clients"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status();
        if status.is_ok_and(|s| s.success()) && present() {
            return true;
        }
    }
    assert!(std::env::var_os("CI").is_none(), "libvirt is missing and could not be installed (see ci/install-deps)");
    eprintln!("SKIPPED: libvirt (virsh, libvirtd, virtlogd) is not installed and this is not root with apt-get");
    false
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

    // The CPU: the host's, passed through; no named models and no maximum model.
    has(pc, "<mode name='host-passthrough' supported='yes'>");
    has(pc, "<mode name='maximum' supported='no'/>");
    has(pc, "<mode name='custom' supported='no'/>");

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

#![cfg(target_arch = "x86_64")]

//! Guest console output that nobody reads must never wedge the VMM: with the probe payload printing without end
//! (`flood`) to a pty nobody attached to, or to a stdout pipe nobody drains, QMP `stop`, `system_reset` and
//! `cont` still answer, `quit` and SIGTERM still end the process; and a socket console's file is removed when
//! the process exits.

mod support;

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::kvm_available;
use support::probe_vm::{scratch_dir, unix_server_arg, ProbeVm};
use support::qmp::QmpClient;

/// How long a QMP command may take to answer: QEMU answers these in milliseconds; this allows for a loaded host.
const ANSWER_BOUND: Duration = Duration::from_secs(2);
/// How long connecting and negotiating may take while the guest floods its console.
const NEGOTIATION_BOUND: Duration = Duration::from_secs(20);
/// How long the process may take to exit once told to: Kestrel gives queued output up to 2 s to drain.
const EXIT_BOUND: Duration = Duration::from_secs(8);
/// How long the guest may take to fill a console nobody reads (seconds with the 64 KiB queue; a 1 MiB queue took
/// minutes on a loaded host).
const FILL_BOUND: Duration = Duration::from_secs(300);
/// How long a vCPU must be seen waiting on a futex before it counts as held by its console.
const HELD_FOR: Duration = Duration::from_millis(500);
/// The x86_64 futex system call, as /proc/<pid>/task/<tid>/syscall shows it.
const SYS_FUTEX: &str = "202";

/// The probe with a QMP socket, its stderr in a file; killed if a test fails half-way.
struct Vm {
    process: ProbeVm,
}

impl Vm {
    /// Starts the probe payload running `command`, with a QMP socket and the console options in `console`, and
    /// waits for the QMP socket.
    fn start(command: &str, console: &[&str], stdout: Stdio) -> Vm {
        let vm = Vm::spawn(command, console, stdout);
        vm.wait_for(|| vm.qmp_socket().exists(), Duration::from_secs(20), "the QMP socket to appear");
        vm
    }

    fn spawn(command: &str, console: &[&str], stdout: Stdio) -> Vm {
        let process = ProbeVm::spawn("console-hardening", command, |cmd, dir| {
            cmd.arg("--qmp").arg(unix_server_arg(&dir.join("qmp.sock")));
            cmd.args(console);
            // stderr goes to a file: a pipe nobody drains would be a second blocked console.
            let stderr = File::create(dir.join("stderr.log")).unwrap();
            cmd.stdout(stdout).stderr(stderr);
        });
        Vm { process }
    }

    fn qmp_socket(&self) -> PathBuf {
        self.process.path("qmp.sock")
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.process.path("stderr.log")).unwrap_or_default()
    }

    #[track_caller]
    fn wait_for(&self, mut condition: impl FnMut() -> bool, bound: Duration, what: &str) {
        let deadline = Instant::now() + bound;
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}; stderr:\n{}", self.stderr());
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The system call vCPU 0's thread is in, by number ("running" while not in one).
    fn vcpu0_syscall(&self) -> Option<String> {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.process.pid())).ok()?;
        for task in tasks.flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.trim() == "vcpu0" {
                let syscall = std::fs::read_to_string(task.path().join("syscall")).ok()?;
                return syscall.split_whitespace().next().map(str::to_string);
            }
        }
        None
    }

    /// Waits until vCPU 0 has been waiting on a futex (the console's full queue) for [`HELD_FOR`] without a
    /// break: the guest's output has filled everything between it and the reader that never comes.
    fn wait_until_vcpu_held_by_console(&self) {
        let mut held_since: Option<Instant> = None;
        self.wait_for(
            || {
                if self.vcpu0_syscall().as_deref() == Some(SYS_FUTEX) {
                    held_since.get_or_insert_with(Instant::now).elapsed() >= HELD_FOR
                } else {
                    held_since = None;
                    false
                }
            },
            FILL_BOUND,
            "vCPU 0 to wait for room in the console's output",
        );
    }

    /// Whether vCPU 0 stays on a futex (waiting for room in the console's output) for all of [`HELD_FOR`].
    fn vcpu0_held(&self) -> bool {
        let deadline = Instant::now() + HELD_FOR;
        while Instant::now() < deadline {
            if self.vcpu0_syscall().as_deref() != Some(SYS_FUTEX) {
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
        true
    }

    fn exited_within(&mut self, bound: Duration) -> Option<ExitStatus> {
        self.process.exited_within(bound)
    }

    fn terminate(&self) {
        self.process.signal(libc::SIGTERM);
    }
}

/// Sends `command` and returns its reply (events before it skipped), or why there was none within `bound`: a VMM
/// that never answers fails the test instead of hanging it.
fn execute_within(qmp: &mut QmpClient, command: &str, bound: Duration) -> Result<Value, String> {
    qmp.set_read_timeout(bound);
    let started = Instant::now();
    qmp.send(&format!(r#"{{"execute": "{command}"}}"#));
    loop {
        let message = qmp.try_line().map_err(|e| format!("{command}: {e} after {:?}", started.elapsed()))?;
        if message.get("event").is_none() {
            return Ok(message);
        }
    }
}

/// `stop`, `system_reset` and `cont` each answer within [`ANSWER_BOUND`], then `quit` ends the process.
fn commands_answer_and_quit_ends(vm: &mut Vm) {
    let mut qmp = QmpClient::negotiated_within(&vm.qmp_socket(), NEGOTIATION_BOUND);
    for command in ["stop", "system_reset", "cont"] {
        let started = Instant::now();
        let reply = execute_within(&mut qmp, command, ANSWER_BOUND);
        assert_eq!(reply, Ok(serde_json::json!({"return": {}})), "{command}; stderr:\n{}", vm.stderr());
        assert!(started.elapsed() <= ANSWER_BOUND, "{command} took {:?}", started.elapsed());
    }
    let reply = execute_within(&mut qmp, "quit", ANSWER_BOUND);
    assert_eq!(reply, Ok(serde_json::json!({"return": {}})), "quit; stderr:\n{}", vm.stderr());
    let status = vm.exited_within(EXIT_BOUND);
    assert!(status.is_some_and(|s| s.success()), "quit did not end kestrel ({status:?}); stderr:\n{}", vm.stderr());
}

fn terminate_ends(vm: &mut Vm) {
    let started = Instant::now();
    vm.terminate();
    let status = vm.exited_within(EXIT_BOUND);
    assert!(status.is_some(), "SIGTERM did not end kestrel within {EXIT_BOUND:?}; stderr:\n{}", vm.stderr());
    eprintln!("exited {:?} after SIGTERM", started.elapsed());
}

/// The path `char device redirected to PATH` names, once kestrel has printed it.
fn pty_path(vm: &Vm) -> String {
    let mut path = String::new();
    vm.wait_for(
        || {
            let stderr = vm.stderr();
            let found = stderr.lines().find_map(|l| l.strip_prefix("char device redirected to "));
            if let Some(found) = found.and_then(|rest| rest.split_whitespace().next()) {
                path = found.to_string();
            }
            !path.is_empty()
        },
        Duration::from_secs(20),
        "the pty's path",
    );
    path
}

/// The probe flooding a stdout pipe nobody reads, once its output has filled everything up to vCPU 0.
fn flood_held_by_unread_stdout() -> Vm {
    let vm = Vm::start("flood", &["--serial", "stdio"], Stdio::piped());
    vm.wait_until_vcpu_held_by_console();
    vm
}

/// The probe flooding a pty nobody attached to, for a few seconds, and the pty's path.
fn flood_to_unattached_pty() -> (Vm, String) {
    let vm = Vm::start("flood", &["--serial", "pty"], Stdio::null());
    let path = pty_path(&vm);
    thread::sleep(Duration::from_secs(3));
    (vm, path)
}

#[test]
fn stdout_pipe_never_read_does_not_wedge_qmp_or_quit() {
    if !kvm_available() {
        return;
    }
    let mut vm = flood_held_by_unread_stdout();
    commands_answer_and_quit_ends(&mut vm);
}

#[test]
fn stdout_pipe_never_read_does_not_wedge_sigterm() {
    if !kvm_available() {
        return;
    }
    let mut vm = flood_held_by_unread_stdout();
    terminate_ends(&mut vm);
}

/// Guest output with nobody attached to the pty is dropped, as QEMU drops it, not kept for whoever attaches:
/// after a few seconds of flooding, what the first reader gets is fresh lines, not the boot banner.
#[test]
fn pty_nobody_attached_drops_output_and_does_not_wedge_qmp_or_quit() {
    if !kvm_available() {
        return;
    }
    let (mut vm, path) = flood_to_unattached_pty();
    assert!(!vm.vcpu0_held(), "vCPU 0 waits for room in the console although its output should be dropped");
    commands_answer_and_quit_ends_after_attaching(&mut vm, &path);
}

fn commands_answer_and_quit_ends_after_attaching(vm: &mut Vm, path: &str) {
    let slave = OpenOptions::new().read(true).write(true).open(path).expect("attaching to the pty");
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(slave).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let first = lines_rx.recv_timeout(Duration::from_secs(20)).expect("nothing arrived once attached");
    let first = match lines_rx.recv_timeout(Duration::from_secs(20)) {
        // The first line may start mid-line: judge the first whole one.
        Ok(second) => second,
        Err(_) => first,
    };
    let number: Option<u64> = first.trim().strip_prefix("probe: flood ").and_then(|n| n.parse().ok());
    assert!(
        number.is_some_and(|n| n > 0),
        "output from before anyone attached was kept for the first reader: {first:?}"
    );
    commands_answer_and_quit_ends(vm);
}

#[test]
fn pty_nobody_attached_does_not_wedge_sigterm() {
    if !kvm_available() {
        return;
    }
    let (mut vm, _) = flood_to_unattached_pty();
    terminate_ends(&mut vm);
}

/// Input typed into the pty still reaches the guest although Kestrel no longer holds the pty's other end.
#[test]
fn pty_input_arrives_once_someone_attaches() {
    if !kvm_available() {
        return;
    }
    let mut vm = Vm::start("echo", &["--serial", "pty"], Stdio::null());
    let path = pty_path(&vm);
    // Nobody attached for a while: the input side must still be there when someone comes.
    thread::sleep(Duration::from_millis(600));
    let mut slave = OpenOptions::new().read(true).write(true).open(&path).expect("attaching to the pty");
    slave.write_all(b"hi").unwrap();
    let mut seen = Vec::new();
    let reader = thread::spawn(move || {
        let mut buf = [0u8; 256];
        while !seen.windows(2).any(|w| w == b"hi") {
            match slave.read(&mut buf) {
                Ok(n) if n > 0 => seen.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        slave.write_all(b"q").unwrap();
        seen
    });
    let status = vm.exited_within(Duration::from_secs(20));
    assert!(status.is_some_and(|s| s.success()), "the guest never saw 'q' ({status:?}); stderr:\n{}", vm.stderr());
    let seen = reader.join().unwrap();
    assert!(seen.windows(2).any(|w| w == b"hi"), "{:?}", String::from_utf8_lossy(&seen));
}

fn socket_console_args(dir: &Path) -> (PathBuf, PathBuf, Vec<String>) {
    let serial = dir.join("serial.sock");
    let console = dir.join("console.sock");
    let args =
        vec!["--serial".to_string(), unix_server_arg(&serial), "--console".to_string(), unix_server_arg(&console)];
    (serial, console, args)
}

fn is_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

#[test]
fn socket_console_files_are_removed_at_poweroff() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("console-sockets");
    let (serial, console, args) = socket_console_args(&dir);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut vm = Vm::spawn("poweroff", &args, Stdio::null());
    let status = vm.exited_within(Duration::from_secs(20));
    assert!(status.is_some_and(|s| s.success()), "{status:?}; stderr:\n{}", vm.stderr());
    assert!(!is_socket(&serial), "{} left behind", serial.display());
    assert!(!is_socket(&console), "{} left behind", console.display());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn socket_console_files_are_removed_on_sigterm() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("console-sockets");
    let (serial, console, args) = socket_console_args(&dir);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut vm = Vm::start("spin", &args, Stdio::null());
    assert!(is_socket(&serial) && is_socket(&console), "the console sockets were never created");
    vm.terminate();
    assert!(vm.exited_within(EXIT_BOUND).is_some(), "SIGTERM did not end kestrel; stderr:\n{}", vm.stderr());
    assert!(!is_socket(&serial), "{} left behind", serial.display());
    assert!(!is_socket(&console), "{} left behind", console.display());
    std::fs::remove_dir_all(dir).unwrap();
}

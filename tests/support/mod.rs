//! Shared helpers for tests that run the real `kestrel` binary.

#![allow(dead_code)] // each test binary uses its own subset

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

pub mod counting_vm;
pub mod guest;
pub mod libvirt;
pub mod probe_vm;
pub mod qmp;

pub fn kestrel_binary() -> &'static str {
    env!("CARGO_BIN_EXE_kestrel")
}

/// A command that runs the kestrel under test (see [`target_command`]).
pub fn kestrel_command() -> Command {
    target_command(Path::new(kestrel_binary()))
}

/// A command that runs `program`, a binary built for the target the tests were built for. Under qemu-user (ci/test
/// runs the foreign targets' tests with cargo's `CARGO_TARGET_<TRIPLE>_RUNNER`, no binfmt_misc) a foreign binary
/// cannot be executed directly: it is run through that same runner, found by this target's architecture.
pub fn target_command(program: &Path) -> Command {
    let arch_prefix = format!("CARGO_TARGET_{}_", std::env::consts::ARCH.to_uppercase());
    let runner = std::env::vars()
        .find(|(key, value)| key.starts_with(&arch_prefix) && key.ends_with("_RUNNER") && !value.trim().is_empty());
    match runner {
        // The host's own architecture never has a runner here; a foreign one's is "qemu-<arch>-static -L <sysroot>".
        Some((_, runner)) => {
            let mut words = runner.split_whitespace();
            let mut command = Command::new(words.next().expect("a non-empty runner"));
            command.args(words).arg(program);
            command
        }
        None => Command::new(program),
    }
}

/// Decides whether this machine can run guests, by creating a VM (opening /dev/kvm is not enough: under
/// qemu-user it opens and every ioctl fails). Where KVM is expected (CI, or KESTREL_REQUIRE_KVM set) a machine
/// that cannot is a test failure; elsewhere the test says it is skipped and why. KESTREL_NO_KVM_HERE=<why> says KVM
/// is not expected even under CI (qemu-user runs of the foreign targets' tests).
pub fn kvm_available() -> bool {
    static VERDICT: OnceLock<Result<(), String>> = OnceLock::new();
    let verdict = VERDICT.get_or_init(|| {
        let kvm = kvm_ioctls::Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
        kvm.create_vm().map(drop).map_err(|e| format!("cannot create a VM: {e}"))
    });
    match verdict {
        Ok(()) => true,
        Err(reason) => {
            assert!(!kvm_expected(), "KVM is required here (CI or KESTREL_REQUIRE_KVM is set) but {reason}");
            match kvm_not_expected_because() {
                Some(why) => eprintln!("SKIPPED: {reason} ({why})"),
                None => eprintln!("SKIPPED: {reason}; set KESTREL_REQUIRE_KVM=1 to make this a failure"),
            }
            false
        }
    }
}

/// Whether this machine must run guests with everything the tests use: under CI (unless KESTREL_NO_KVM_HERE says
/// why not) or with KESTREL_REQUIRE_KVM set. A test that finds KVM or one of its ioctls missing fails there.
pub fn kvm_expected() -> bool {
    std::env::var_os("KESTREL_REQUIRE_KVM").is_some()
        || (std::env::var_os("CI").is_some() && kvm_not_expected_because().is_none())
}

/// Why KVM is not expected here even under CI (ci/test runs the foreign targets' tests under qemu-user, where no
/// VM can be created, and says why in KESTREL_NO_KVM_HERE).
fn kvm_not_expected_because() -> Option<String> {
    std::env::var("KESTREL_NO_KVM_HERE").ok().filter(|why| !why.is_empty())
}

/// The repo's guest payloads, assembled once per test binary.
pub fn payload(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("payloads");
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/payloads");
        let status = Command::new("make")
            .arg("-s")
            .arg("-C")
            .arg(&source)
            .arg(format!("OUT={}", out.display()))
            .status()
            .expect("running make for the test payloads (is make installed?)");
        assert!(status.success(), "building the test payloads failed");
        out
    });
    let path = dir.join(name);
    assert!(path.exists(), "payload {} was not built", path.display());
    path
}

/// What a finished run printed and how it ended.
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    pub fn describe(&self) -> String {
        format!("status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}", self.status, self.stdout, self.stderr)
    }

    #[track_caller]
    pub fn assert_success(&self) {
        assert!(self.status.success(), "kestrel failed\n{}", self.describe());
    }

    #[track_caller]
    pub fn assert_stdout_has(&self, needle: &str) {
        assert!(self.stdout.contains(needle), "stdout lacks {needle:?}\n{}", self.describe());
    }
}

pub fn kestrel(args: &[&str]) -> Command {
    let mut cmd = kestrel_command();
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

/// Makes the child inherit `fd` as descriptor `number`, as libvirt passes a restore's stream or a tap.
pub fn inherit_fd(cmd: &mut Command, fd: OwnedFd, number: RawFd) {
    let raw = fd.as_raw_fd();
    assert_ne!(raw, number, "dup2 onto itself would keep close-on-exec");
    // SAFETY: runs in the child between fork and exec, where it only calls dup2 (async-signal-safe) on a
    // descriptor the parent holds open (`fd`, moved into the closure so it outlives the spawn).
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd.as_raw_fd(), number) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Runs `cmd` and kills it after `timeout`: a hang is a failure with the output so far, never a stuck test.
pub fn run_with_timeout(cmd: Command, timeout: Duration) -> Run {
    run_typing_after(cmd, None, timeout)
}

/// Like `run_with_timeout`, but once stdout shows `prompt`, types `input` on stdin, as a user at the console
/// would.
pub fn run_typing_after(mut cmd: Command, prompt_and_input: Option<(&str, &[u8])>, timeout: Duration) -> Run {
    if prompt_and_input.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let start = Instant::now();
    let mut child = cmd.spawn().expect("starting kestrel");
    let stdout = Arc::new(Mutex::new(Vec::new()));
    let stdout_reader = drain(child.stdout.take().expect("piped stdout"), stdout.clone());
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let stderr_reader = drain(child.stderr.take().expect("piped stderr"), stderr.clone());
    if let Some((prompt, input)) = prompt_and_input {
        let mut stdin = child.stdin.take().expect("piped stdin");
        let (prompt, input) = (prompt.as_bytes().to_vec(), input.to_vec());
        let seen = stdout.clone();
        thread::spawn(move || {
            while start.elapsed() < timeout {
                if seen.lock().unwrap().windows(prompt.len()).any(|w| w == prompt.as_slice()) {
                    // The guest may exit before reading everything; that is for the test to judge.
                    let _ = stdin.write_all(&input);
                    return;
                }
                thread::sleep(Duration::from_millis(5));
            }
        });
    }
    let status = wait_or_kill(&mut child, timeout);
    let elapsed = start.elapsed();
    stdout_reader.join().unwrap();
    stderr_reader.join().unwrap();
    let text = |buf: &Arc<Mutex<Vec<u8>>>| String::from_utf8_lossy(&buf.lock().unwrap()).into_owned();
    let run = Run { status, stdout: text(&stdout), stderr: text(&stderr), elapsed };
    assert!(elapsed < timeout, "kestrel did not finish within {timeout:?} and was killed\n{}", run.describe());
    run
}

fn drain(mut pipe: impl Read + Send + 'static, into: Arc<Mutex<Vec<u8>>>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            into.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    })
}

fn wait_or_kill(child: &mut Child, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("waiting for kestrel") {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            return child.wait().expect("reaping kestrel");
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Boots `payload` with `cmdline` and extra arguments, and returns the finished run.
pub fn boot(payload_name: &str, cmdline: &str, extra: &[&str]) -> Run {
    let kernel = payload(payload_name);
    let mut args = vec!["--kernel", kernel.to_str().unwrap(), "--cmdline", cmdline];
    if !extra.contains(&"--memory") {
        args.extend_from_slice(&["--memory", "128M"]);
    }
    args.extend_from_slice(extra);
    run_with_timeout(kestrel(&args), Duration::from_secs(20))
}

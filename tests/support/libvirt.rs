//! A private libvirt for tests that drive Kestrel through it: libvirtd and virtlogd in their own mount namespace
//! (`unshare --mount`), with their state, cache, log and runtime directories and the defined domains on tmpfs, so
//! a test neither sees nor disturbs a libvirt the machine runs, and everything they made goes with the namespace. `virsh` and other
//! commands run inside it (`nsenter`); the daemons are stopped, by their pid files and waiting until they are
//! gone, when the `PrivateLibvirt` is dropped.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Mutex};
use std::thread;
use std::time::Duration;

/// How long one command (a virsh call, the daemons' start and stop) may take.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// How a command ended and what it printed, once it exited *and* closed its stdout and stderr: libvirt waits for
/// both, so a daemon that kept the caller's pipes would hang here, and fails the test after `TIMEOUT`.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    #[track_caller]
    pub fn assert_success(&self, what: &str) -> &str {
        assert!(self.status.success(), "{what}: {}\n{}{}", self.status, self.stdout, self.stderr);
        &self.stdout
    }
}

pub fn run_to_eof(mut command: Command) -> Finished {
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

/// libvirt present, or installed from Debian when it is not (as root, with apt); `false` (skipped) where it
/// cannot be. ci/install-deps installs it for CI.
pub fn libvirt_available() -> bool {
    let present =
        || ["/usr/bin/virsh", "/usr/sbin/libvirtd", "/usr/sbin/virtlogd"].iter().all(|p| Path::new(p).exists());
    if present() {
        return true;
    }
    // SAFETY: geteuid only reads the process's credentials.
    let root = unsafe { libc::geteuid() } == 0;
    if root && Path::new("/usr/bin/apt-get").exists() {
        eprintln!("installing libvirt-daemon-system and libvirt-clients");
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

/// Sets up the namespace, starts the daemons, says `ready` (with its pid) and serves requests on its stdin until it
/// closes (`restart-libvirtd`, answered `restarted`); then stops the daemons. `$1`, if not empty, replaces
/// qemu.conf.
const PRIVATE_LIBVIRT: &str = r#"
set -eu
# /etc/libvirt/qemu holds the defined domains' XML: private too, so that tests running at once keep theirs apart.
for dir in /run /var/lib/libvirt /var/cache/libvirt /var/log/libvirt /etc/libvirt/qemu; do
  mkdir -p "$dir"; mount -t tmpfs -o mode=0755 tmpfs "$dir"
done
mkdir -p /run/libvirt /var/lib/libvirt/qemu /var/cache/libvirt/qemu /var/log/libvirt/qemu
chown libvirt-qemu:libvirt-qemu /var/lib/libvirt/qemu
if [ -n "$1" ]; then
  printf '%s\n' "$1" > /run/test-qemu.conf
  mount --bind /run/test-qemu.conf /etc/libvirt/qemu.conf
fi
stop_daemon() {
  [ -f "$1" ] || return 0
  pid=$(cat "$1"); kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 400); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
}
start_libvirtd() {
  libvirtd -d
  for _ in $(seq 400); do [ -S /run/libvirt/libvirt-sock ] && break; sleep 0.05; done
}
trap 'stop_daemon /run/libvirtd.pid; stop_daemon /run/virtlogd.pid' EXIT
virtlogd -d
start_libvirtd
echo "ready $$"
while read -r request; do
  case "$request" in
    restart-libvirtd) stop_daemon /run/libvirtd.pid; rm -f /run/libvirt/libvirt-sock; start_libvirtd; echo restarted ;;
  esac
done
"#;

/// Runs the shell (its arguments) as a child subreaper that reaps at once: the daemons, and the emulators libvirt
/// double-forks, are orphans, reaped by the nearest subreaper or by PID 1. systemd reaps at once; the init of the
/// development machines takes up to ~2 s, and libvirt counts a process as alive until it is reaped (`kill(pid,
/// 0)`), which would put that delay into every `virsh destroy`.
const REAPER: &str = r#"
import ctypes, os, sys
PR_SET_CHILD_SUBREAPER = 36
ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
shell = os.spawnvp(os.P_NOWAIT, sys.argv[1], sys.argv[1:])
while True:
    pid, status = os.wait()
    if pid == shell:
        sys.exit(os.waitstatus_to_exitcode(status))
"#;

pub struct PrivateLibvirt {
    shell: Child,
    /// Closed on drop: the shell then stops the daemons.
    stdin: Mutex<Option<ChildStdin>>,
    /// The namespace's shell, which `nsenter` enters (the reaper is in the same namespace).
    pid: u32,
    /// The shell's answers, line by line.
    answers: Mutex<mpsc::Receiver<String>>,
}

impl PrivateLibvirt {
    /// Starts the daemons; `qemu_conf`, if given, is the QEMU driver's configuration instead of the machine's.
    pub fn start(qemu_conf: Option<&str>) -> PrivateLibvirt {
        let mut shell = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "python3", "-c", REAPER])
            .args(["bash", "-c", PRIVATE_LIBVIRT, "private-libvirt"])
            .arg(qemu_conf.unwrap_or_default())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("running unshare");
        let stdin = shell.stdin.take();
        let mut stdout = BufReader::new(shell.stdout.take().unwrap());
        let (sender, answers) = mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            while matches!(stdout.read_line(&mut line), Ok(n) if n > 0) {
                if sender.send(std::mem::take(&mut line)).is_err() {
                    break;
                }
            }
        });
        let line = answers.recv_timeout(TIMEOUT).unwrap_or_default();
        let pid = line.strip_prefix("ready ").and_then(|pid| pid.trim().parse().ok());
        let pid = pid.unwrap_or_else(|| panic!("the private libvirt did not start: {line:?}"));
        PrivateLibvirt { shell, stdin: Mutex::new(stdin), pid, answers: Mutex::new(answers) }
    }

    /// Stops libvirtd and starts it again, as an upgrade does: it finds its running domains and reconnects to
    /// their monitors.
    pub fn restart_libvirtd(&self) {
        let mut stdin = self.stdin.lock().unwrap();
        stdin.as_mut().unwrap().write_all(b"restart-libvirtd\n").unwrap();
        let answer = self.answers.lock().unwrap().recv_timeout(TIMEOUT).unwrap_or_default();
        assert_eq!(answer.trim(), "restarted");
    }

    /// `program args...` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("nsenter");
        command.arg(format!("--mount=/proc/{}/ns/mnt", self.pid)).arg("--").arg(program);
        command
    }

    pub fn virsh(&self, args: &[&str]) -> Finished {
        let mut command = self.command("virsh");
        command.args(args);
        run_to_eof(command)
    }

    /// A file in the namespace (libvirt's logs, pid files).
    pub fn read(&self, path: &str) -> Option<String> {
        let mut command = self.command("cat");
        command.arg(path);
        let run = run_to_eof(command);
        run.status.success().then_some(run.stdout)
    }
}

impl Drop for PrivateLibvirt {
    /// Ends the shell's wait; it stops the daemons (each given 20 s) before it exits.
    fn drop(&mut self) {
        if let Some(mut stdin) = self.stdin.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = stdin.write_all(b"stop\n");
        }
        let _ = self.shell.wait();
    }
}

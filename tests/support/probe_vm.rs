//! A `kestrel` process running the repo's probe payload, with a directory of its own for its sockets and logs.
//! Dropping it kills the process and removes the directory, so a test that fails half-way leaves nothing behind.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::{kestrel_command, payload};

/// The probe payload booted through PVH (x86_64).
pub const PROBE_PVH: &str = "probe.pvh.elf";

/// For anything that should happen at once: generous for a loaded machine, but a hang still fails.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// A fresh, empty directory under the system's temporary directory, named for `purpose` and unique in this run.
pub fn scratch_dir(purpose: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let unique = NEXT.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("kestrel-{purpose}-{}-{unique}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Waits up to `bound` for `path` to exist (a socket kestrel creates), failing the test if it never does.
#[track_caller]
pub fn wait_for_path(path: &Path, bound: Duration) {
    let deadline = Instant::now() + bound;
    while !path.exists() {
        assert!(Instant::now() < deadline, "{} never appeared", path.display());
        thread::sleep(Duration::from_millis(5));
    }
}

/// The argument that makes `path` a listening unix socket kestrel does not wait on (`--qmp`, `--serial`, ...).
pub fn unix_server_arg(path: &Path) -> String {
    format!("unix:{},server=on,wait=off", path.display())
}

/// How a [`ProbeVm`] ended.
pub struct Exit {
    pub success: bool,
    /// Empty unless stderr was piped.
    pub stderr: String,
    /// From the start of the wait.
    pub elapsed: Duration,
}

pub struct ProbeVm {
    child: Option<Child>,
    dir: PathBuf,
}

impl ProbeVm {
    /// Starts the probe running `command` (its kernel command line) in 64 MiB with stdin closed, in a new
    /// [`scratch_dir`] named for `purpose`; `configure` adds the test's arguments and stdout/stderr, given that
    /// directory.
    pub fn spawn(purpose: &str, command: &str, configure: impl FnOnce(&mut Command, &Path)) -> ProbeVm {
        let dir = scratch_dir(purpose);
        let kernel = payload(PROBE_PVH);
        let mut cmd = kestrel_command();
        cmd.args(["--kernel", kernel.to_str().unwrap(), "--cmdline", command, "--memory", "64M"]);
        cmd.stdin(Stdio::null());
        configure(&mut cmd, &dir);
        let child = cmd.spawn().expect("starting kestrel");
        ProbeVm { child: Some(child), dir }
    }

    /// Starts the probe running `command` with its serial console in `console.log`, one QMP socket per name in
    /// `sockets` (waited for) and `extra` arguments; stdout discarded, stderr kept for [`wait`](Self::wait).
    pub fn with_qmp_sockets(command: &str, sockets: &[&str], extra: &[&str]) -> ProbeVm {
        let vm = ProbeVm::spawn("qmp", command, |cmd, dir| {
            cmd.arg("--serial").arg(format!("file:{}", dir.join("console.log").display()));
            for name in sockets {
                cmd.arg("--qmp").arg(unix_server_arg(&dir.join(name)));
            }
            cmd.args(extra).stdout(Stdio::null()).stderr(Stdio::piped());
        });
        for name in sockets {
            wait_for_path(&vm.path(name), TIMEOUT);
        }
        vm
    }

    /// `name` in the process's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// What the guest printed so far, with the console in `console.log` ([`with_qmp_sockets`](Self::with_qmp_sockets)).
    pub fn console(&self) -> String {
        std::fs::read_to_string(self.path("console.log")).unwrap_or_default()
    }

    #[track_caller]
    pub fn wait_for_console(&self, needle: &str) {
        let deadline = Instant::now() + TIMEOUT;
        while !self.console().contains(needle) {
            assert!(Instant::now() < deadline, "the guest never printed {needle:?}: {}", self.console());
            thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("kestrel was already waited for").id()
    }

    #[track_caller]
    pub fn signal(&self, signal: libc::c_int) {
        let pid = self.pid() as libc::pid_t;
        // SAFETY: kill only sends a signal, to our own child, which has not been waited for yet.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "sending signal {signal}");
    }

    /// Waits up to `bound` for the process to exit; `None` if it is still running.
    pub fn exited_within(&mut self, bound: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut().expect("kestrel was already waited for");
        let deadline = Instant::now() + bound;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits up to `limit` for the process to exit, failing the test (with its stderr) if it does not.
    #[track_caller]
    pub fn wait(&mut self, limit: Duration) -> Exit {
        let start = Instant::now();
        let exited = self.exited_within(limit).is_some();
        let elapsed = start.elapsed();
        let mut child = self.child.take().unwrap();
        if !exited {
            let _ = child.kill();
        }
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(exited, "kestrel did not exit within {limit:?}; stderr:\n{stderr}");
        Exit { success: output.status.success(), stderr, elapsed }
    }
}

impl Drop for ProbeVm {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

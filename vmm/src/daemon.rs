//! QEMU's `-daemonize` and `-pidfile`, as management tools rely on them: libvirt starts a binary with both to probe
//! it, waits for the command to exit (and for EOF on the stderr pipe it gave it), then reads the pid file and
//! connects to the monitor. So the command must exit 0 only once the monitor listens and the pid file is written,
//! and the daemon must keep none of the caller's stdio open.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::Error;

/// The daemon's side of the handshake with the command that started it.
pub struct Readiness {
    pipe: File,
}

/// Forks into the background. The calling process becomes the waiting parent: it exits 0 once the daemon reports
/// ready ([`Readiness::ready`]), or with the daemon's status if it ends before (its error line is on the caller's
/// stderr, which it still has until then); it never returns. The daemon returns, in a session of its own. Must
/// be called before any thread is started: only the calling thread survives a fork.
pub fn daemonize() -> Result<Readiness, Error> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`, which has room for them.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error::Host("creating the daemon's pipe", io::Error::last_os_error()));
    }
    // SAFETY: pipe2 just created both descriptors; nothing else owns them.
    let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: no other thread exists yet (the caller's contract), so the child is a complete copy of this process.
    match unsafe { libc::fork() } {
        -1 => Err(Error::Host("forking the daemon", io::Error::last_os_error())),
        0 => {
            drop(read_end);
            // SAFETY: setsid takes no arguments; a forked child is never a process group leader, so it succeeds.
            unsafe { libc::setsid() };
            Ok(Readiness { pipe: File::from(write_end) })
        }
        child => {
            drop(write_end);
            wait_for_daemon(File::from(read_end), child)
        }
    }
}

/// The parent: one byte means ready; end of file means the daemon ended first, with the status it ended with.
fn wait_for_daemon(mut pipe: File, child: libc::pid_t) -> ! {
    let mut byte = [0u8; 1];
    let ready = loop {
        match pipe.read(&mut byte) {
            Ok(n) => break n == 1,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break false,
        }
    };
    if ready {
        std::process::exit(0);
    }
    let mut status = 0;
    // SAFETY: waits for our own child, writing its status into `status`.
    let waited = unsafe { libc::waitpid(child, &mut status, 0) } == child;
    let code = if waited && libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 1 };
    std::process::exit(if code == 0 { 1 } else { code });
}

impl Readiness {
    /// The daemon is ready: its stdin, stdout and stderr become /dev/null (so it holds none of the caller's pipes
    /// or terminal) and the waiting parent exits 0.
    pub fn ready(mut self) -> Result<(), Error> {
        let null = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map_err(|e| Error::Host("opening /dev/null for the daemon's stdio", e))?;
        for target in 0..=2 {
            // SAFETY: dup2 makes `target` (a standard stream) a copy of a descriptor we own; Rust code holds no
            // other owner of descriptors 0 to 2.
            if unsafe { libc::dup2(null.as_raw_fd(), target) } < 0 {
                return Err(Error::Host("redirecting the daemon's stdio", io::Error::last_os_error()));
            }
        }
        self.pipe.write_all(b"1").map_err(|e| Error::Host("telling the parent the daemon is ready", e))
    }
}

/// A pid file (`-pidfile`): Kestrel's process id, written once the monitors listen, locked while Kestrel runs (a
/// second Kestrel given the same file refuses to start, as QEMU does) and removed when it exits.
pub struct PidFile {
    path: PathBuf,
    _file: File,
}

impl PidFile {
    pub fn create(path: &Path) -> Result<PidFile, Error> {
        let error = |what: &str, e: io::Error| {
            Error::Host("writing the pid file", io::Error::new(e.kind(), format!("{}: {what}: {e}", path.display())))
        };
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|e| error("cannot open it", e))?;
        let lock = libc::flock {
            l_type: libc::F_WRLCK as i16,
            l_whence: libc::SEEK_SET as i16,
            l_start: 0,
            l_len: 0,
            l_pid: 0,
        };
        // SAFETY: F_SETLK reads the lock description from `lock`, which lives across the call.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &lock) } != 0 {
            return Err(error("another process holds its lock", io::Error::last_os_error()));
        }
        file.set_len(0).map_err(|e| error("cannot truncate it", e))?;
        writeln!(file, "{}", std::process::id()).map_err(|e| error("cannot write it", e))?;
        Ok(PidFile { path: path.to_path_buf(), _file: file })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

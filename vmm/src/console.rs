//! Host ends of the guest's serial console: the terminal, a pseudo-terminal, a file, or nothing.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use crate::config::SerialConfig;

/// The host side of a console: where guest output goes and, if anywhere, where guest input comes from.
pub struct ConsoleBackend {
    pub output: Box<dyn Write + Send>,
    pub input: Option<Box<dyn Read + Send>>,
    /// A pty's slave end, held so that reads on the master wait for a user instead of failing while none is
    /// attached.
    pub _slave: Option<File>,
}

/// A backend's input side, not yet being read.
pub struct ConsoleInput {
    input: Option<Box<dyn Read + Send>>,
    slave: Option<File>,
}

impl ConsoleBackend {
    /// The output, and the input to start once its device exists.
    pub fn split(self) -> (Box<dyn Write + Send>, ConsoleInput) {
        (self.output, ConsoleInput { input: self.input, slave: self._slave })
    }
}

impl ConsoleInput {
    /// Starts a thread that hands input to `deliver`, which returns whether it took the bytes (a device with a
    /// full buffer says no: the thread then waits and offers them again, so nothing typed or piped is lost).
    /// No input (a file, or none): nothing to do.
    pub fn start(self, name: &str, mut deliver: impl FnMut(&[u8]) -> bool + Send + 'static) {
        let ConsoleInput { input, slave } = self;
        let Some(mut input) = input else { return };
        let spawned = std::thread::Builder::new().name(format!("{name}-input")).spawn(move || {
            // A pty's slave end stays open as long as this thread reads its master, or reads would fail while no
            // user is attached.
            let _slave = slave;
            let mut buf = [0u8; 512];
            loop {
                match input.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        while !deliver(&buf[..n]) {
                            std::thread::sleep(std::time::Duration::from_millis(10));
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
        });
        if let Err(e) = spawned {
            eprintln!("kestrel: {name} input disabled: {e}");
        }
    }
}

/// Terminal settings to put back before the process exits.
static SAVED_TERMINAL: Mutex<Option<(RawFd, libc::termios)>> = Mutex::new(None);

/// Opens the host side of a guest character device; `label` names it in messages, as QEMU's chardev ids do.
pub fn open(config: &SerialConfig, label: &str) -> io::Result<ConsoleBackend> {
    match config {
        SerialConfig::Stdio => {
            let stdin = io::stdin();
            set_raw_keeping_signals(stdin.as_raw_fd(), true)?;
            Ok(ConsoleBackend { output: Box::new(io::stdout()), input: Some(Box::new(stdin)), _slave: None })
        }
        SerialConfig::Pty => {
            let (master, path, slave) = open_pty()?;
            // QEMU's wording, which scripts already look for.
            eprintln!("char device redirected to {path} (label {label})");
            let reader = master.try_clone()?;
            Ok(ConsoleBackend { output: Box::new(master), input: Some(Box::new(reader)), _slave: Some(slave) })
        }
        SerialConfig::File(path) => {
            let file = OpenOptions::new().create(true).append(true).open(path).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot open serial output file '{}': {e}", path.display()))
            })?;
            Ok(ConsoleBackend { output: Box::new(file), input: None, _slave: None })
        }
        SerialConfig::None => Ok(ConsoleBackend { output: Box::new(io::sink()), input: None, _slave: None }),
    }
}

/// Raw input (no line editing, no echo: the guest echoes) but, when `keep_signals`, Ctrl-C still reaches Kestrel
/// as SIGINT, as with QEMU's stdio console. Not a terminal: nothing to do.
fn set_raw_keeping_signals(fd: RawFd, keep_signals: bool) -> io::Result<()> {
    // SAFETY: isatty only inspects the descriptor.
    if unsafe { libc::isatty(fd) } != 1 {
        return Ok(());
    }
    // SAFETY: termios is plain data, fully written by tcgetattr, whose result is checked.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd is a terminal and `saved` is a valid termios to fill.
    if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut raw = saved;
    // SAFETY: cfmakeraw only edits the struct it is given.
    unsafe { libc::cfmakeraw(&mut raw) };
    if keep_signals {
        raw.c_lflag |= libc::ISIG;
    }
    // SAFETY: fd is a terminal and `raw` a valid termios.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut slot = SAVED_TERMINAL.lock().unwrap_or_else(|p| p.into_inner());
    slot.get_or_insert((fd, saved));
    Ok(())
}

/// Puts the terminal back as Kestrel found it. Called on every way out of the process.
pub fn restore_terminal() {
    let saved = SAVED_TERMINAL.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some((fd, termios)) = saved {
        // SAFETY: restores settings read from the same descriptor earlier; failure leaves the terminal as it was.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &termios) };
    }
}

/// A new pseudo-terminal: the master end, the path of the slave for the user to attach to, and the slave itself.
fn open_pty() -> io::Result<(File, String, File)> {
    // SAFETY: posix_openpt returns a new descriptor or -1, checked below.
    let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned to us and is owned by nothing else.
    let master = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: grantpt/unlockpt act on the master descriptor we own.
    if unsafe { libc::grantpt(fd) } != 0 || unsafe { libc::unlockpt(fd) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut name = [0u8; 128];
    // SAFETY: the buffer is valid for its length; ptsname_r writes a NUL-terminated path into it.
    let err = unsafe { libc::ptsname_r(fd, name.as_mut_ptr().cast(), name.len()) };
    if err != 0 {
        return Err(io::Error::from_raw_os_error(err));
    }
    let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    let path = String::from_utf8_lossy(&name[..len]).into_owned();
    // The slave side gets raw mode so the guest sees bytes exactly as typed, as with QEMU's pty backend.
    let slave = OpenOptions::new().read(true).write(true).open(&path)?;
    set_raw_keeping_signals(slave.as_raw_fd(), false)?;
    Ok((File::from(master), path, slave))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_backend_appends_output() {
        let dir = std::env::temp_dir().join(format!("kestrel-console-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("serial.log");
        std::fs::write(&path, b"before\n").unwrap();
        let mut backend = open(&SerialConfig::File(path.clone()), "serial0").unwrap();
        assert!(backend.input.is_none());
        backend.output.write_all(b"after\n").unwrap();
        drop(backend);
        assert_eq!(std::fs::read(&path).unwrap(), b"before\nafter\n");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn unwritable_file_is_a_clear_error() {
        let Err(err) = open(&SerialConfig::File("/nonexistent-dir/serial.log".into()), "serial0") else {
            panic!("opening a file in a missing directory must fail")
        };
        assert!(err.to_string().contains("/nonexistent-dir/serial.log"), "{err}");
    }

    #[test]
    fn pty_carries_bytes_both_ways() {
        let (mut master, path, _held) = open_pty().unwrap();
        let mut slave = OpenOptions::new().read(true).write(true).open(&path).unwrap();
        master.write_all(b"to-guest-side").unwrap();
        let mut buf = [0u8; 13];
        slave.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"to-guest-side");
        slave.write_all(b"x").unwrap();
        let mut one = [0u8; 1];
        master.read_exact(&mut one).unwrap();
        assert_eq!(&one, b"x");
    }
}

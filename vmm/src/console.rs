//! Host ends of the guest's consoles: the terminal, a pseudo-terminal, a file, a listening socket, or nothing.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::config::{ListenSocket, SerialConfig, SocketAddress};
use crate::listen::{bind_private_unix, resolve_tcp};
use crate::seccomp::{self, ThreadKind};

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
            seccomp::apply_or_exit(ThreadKind::ConsoleInput);
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
/// Output is handed to a writer thread (see [`QueuedOutput`]), so a guest printing a byte at a time costs the
/// vCPU a copy, not a system call.
pub fn open(config: &SerialConfig, label: &str) -> io::Result<ConsoleBackend> {
    let mut backend = open_direct(config, label)?;
    if *config != SerialConfig::None {
        backend.output = Box::new(QueuedOutput::start(backend.output, label)?);
    }
    Ok(backend)
}

fn open_direct(config: &SerialConfig, label: &str) -> io::Result<ConsoleBackend> {
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
        SerialConfig::Socket(socket) => {
            let (output, input) = socket_console(socket, label)
                .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {} ({label}): {e}", socket.address)))?;
            Ok(ConsoleBackend { output: Box::new(output), input: Some(Box::new(input)), _slave: None })
        }
    }
}

/// Guest output waiting for the host side: beyond this the device blocks (a UART's transmitter stays busy), as
/// it would on a slow line, rather than losing output.
const OUTPUT_QUEUE_LIMIT: usize = 1 << 20;

/// How long the writer thread lets a burst of output accumulate before writing it: short for a person at a
/// terminal, long enough that a kernel's boot log goes out in a few writes.
const OUTPUT_COALESCE: Duration = Duration::from_millis(2);

/// Every queued output, so the process can write what is still queued before it exits.
static QUEUED_OUTPUTS: Mutex<Vec<Arc<OutputQueue>>> = Mutex::new(Vec::new());

#[derive(Default)]
struct OutputQueue {
    state: Mutex<OutputState>,
    changed: Condvar,
}

#[derive(Default)]
struct OutputState {
    bytes: Vec<u8>,
    /// The writer thread waits for bytes: the next write wakes it (and only that one, so a guest printing byte
    /// by byte costs one wake-up per burst, not one per byte).
    idle: bool,
    /// A write waits for room in the queue.
    full: bool,
    /// The writer thread holds a batch it has not finished writing.
    writing: bool,
    /// The host side failed for good: output is dropped from now on.
    broken: bool,
}

/// Console output written by a thread of its own. A guest console writes a byte per register access, and the
/// backend (a terminal, a pipe, a file) costs a system call per write and can block; here each byte is only
/// appended to a queue, and the writer thread, woken once per burst, lets the burst accumulate for
/// [`OUTPUT_COALESCE`] and writes it in one call.
struct QueuedOutput {
    queue: Arc<OutputQueue>,
}

impl QueuedOutput {
    fn start(mut sink: Box<dyn Write + Send>, label: &str) -> io::Result<Self> {
        let queue = Arc::new(OutputQueue::default());
        let writer = queue.clone();
        let write_batches = move || loop {
            {
                let mut state = writer.state.lock().unwrap_or_else(|p| p.into_inner());
                while state.bytes.is_empty() {
                    state.idle = true;
                    state = writer.changed.wait(state).unwrap_or_else(|p| p.into_inner());
                }
                state.idle = false;
                state.writing = true;
            }
            std::thread::sleep(OUTPUT_COALESCE);
            let batch = std::mem::take(&mut writer.state.lock().unwrap_or_else(|p| p.into_inner()).bytes);
            let ok = sink.write_all(&batch).and_then(|()| sink.flush()).is_ok();
            let mut state = writer.state.lock().unwrap_or_else(|p| p.into_inner());
            state.writing = false;
            state.broken |= !ok;
            if state.full || state.bytes.is_empty() {
                // Writes waiting for room, and finish_output, hear about it.
                state.full = false;
                writer.changed.notify_all();
            }
        };
        std::thread::Builder::new()
            .name(format!("{label}-output"))
            .spawn(seccomp::confined(ThreadKind::ConsoleOutput, write_batches))?;
        QUEUED_OUTPUTS.lock().unwrap_or_else(|p| p.into_inner()).push(queue.clone());
        Ok(QueuedOutput { queue })
    }
}

impl Write for QueuedOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut state = self.queue.state.lock().unwrap_or_else(|p| p.into_inner());
        while !state.broken && !state.bytes.is_empty() && state.bytes.len() + buf.len() > OUTPUT_QUEUE_LIMIT {
            state.full = true;
            state = self.queue.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        if !state.broken {
            state.bytes.extend_from_slice(buf);
            if state.idle {
                state.idle = false;
                self.queue.changed.notify_all();
            }
        }
        Ok(buf.len())
    }

    /// The writer thread flushes after every batch; waiting for it here would put the system call back on the
    /// guest's path.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Waits, up to `limit` in all, until every console's queued output has been written: called on the way out of
/// the process, so the guest's last words (a panic, "reboot: Power down") are not lost.
pub fn finish_output(limit: Duration) {
    let deadline = Instant::now() + limit;
    let queues = QUEUED_OUTPUTS.lock().unwrap_or_else(|p| p.into_inner()).clone();
    for queue in queues {
        let mut state = queue.state.lock().unwrap_or_else(|p| p.into_inner());
        while !state.broken && (state.writing || !state.bytes.is_empty()) {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else { return };
            state = queue.changed.wait_timeout(state, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

/// How long a write to a socket console's client may block before the bytes are dropped: a client that stops
/// reading must not stall the guest.
const SOCKET_WRITE_TIMEOUT: Duration = Duration::from_millis(100);

/// A console on a listening socket: output goes to the connected client (dropped while there is none), input comes
/// from it; when it leaves, the next client that connects takes over. With `wait`, the first client is accepted
/// before this returns, as QEMU waits before starting the guest.
fn socket_console(socket: &ListenSocket, label: &str) -> io::Result<(SocketOutput, SocketInput)> {
    let listener = match &socket.address {
        SocketAddress::Unix(path) => SocketListener::Unix(bind_private_unix(path)?),
        SocketAddress::Tcp(host, port) => SocketListener::Tcp(TcpListener::bind(resolve_tcp(host, *port)?)?),
    };
    let client = Arc::new(Mutex::new(None));
    let mut input = SocketInput { listener, client: client.clone(), reader: None };
    if socket.wait {
        eprintln!("kestrel: {label}: waiting for a connection on {}", socket.address);
        input.accept()?;
    }
    Ok((SocketOutput { client }, input))
}

enum SocketListener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

enum SocketStream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl SocketStream {
    fn try_clone(&self) -> io::Result<SocketStream> {
        Ok(match self {
            SocketStream::Unix(s) => SocketStream::Unix(s.try_clone()?),
            SocketStream::Tcp(s) => SocketStream::Tcp(s.try_clone()?),
        })
    }

    fn set_write_timeout(&self, timeout: Duration) -> io::Result<()> {
        match self {
            SocketStream::Unix(s) => s.set_write_timeout(Some(timeout)),
            SocketStream::Tcp(s) => s.set_write_timeout(Some(timeout)),
        }
    }
}

impl Read for SocketStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            SocketStream::Unix(s) => s.read(buf),
            SocketStream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for SocketStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            SocketStream::Unix(s) => s.write(buf),
            SocketStream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The guest's output side: whichever client is connected now.
struct SocketOutput {
    client: Arc<Mutex<Option<SocketStream>>>,
}

impl Write for SocketOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut client = self.client.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(stream) = client.as_mut() {
            match stream.write_all(buf) {
                Ok(()) => {}
                // A client too slow to keep up loses output, as a disconnected one does; the guest goes on.
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                // Gone: the input side accepts the next client when it sees the end of this one.
                Err(_) => *client = None,
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The guest's input side. Reads block until a client connects and sends something; a client leaving is not the
/// end of input, the next one is waited for.
struct SocketInput {
    listener: SocketListener,
    client: Arc<Mutex<Option<SocketStream>>>,
    reader: Option<SocketStream>,
}

impl SocketInput {
    fn accept(&mut self) -> io::Result<()> {
        let stream = match &self.listener {
            SocketListener::Unix(l) => SocketStream::Unix(l.accept()?.0),
            SocketListener::Tcp(l) => SocketStream::Tcp(l.accept()?.0),
        };
        stream.set_write_timeout(SOCKET_WRITE_TIMEOUT)?;
        *self.client.lock().unwrap_or_else(|p| p.into_inner()) = Some(stream.try_clone()?);
        self.reader = Some(stream);
        Ok(())
    }
}

impl Read for SocketInput {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let Some(reader) = self.reader.as_mut() else {
                if let Err(e) = self.accept() {
                    // A failed accept (the client reset before we took it, out of descriptors) is retried after a
                    // pause rather than ending input for good.
                    eprintln!("kestrel: console socket: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            };
            match reader.read(buf) {
                Ok(0) => {}
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {}
            }
            self.reader = None;
            *self.client.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
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

    /// A backend that is slow per write call, like a pipe into another process under emulation.
    struct SlowSink {
        written: Arc<Mutex<Vec<u8>>>,
        calls: Arc<Mutex<usize>>,
    }

    impl Write for SlowSink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            std::thread::sleep(Duration::from_millis(2));
            *self.calls.lock().unwrap() += 1;
            self.written.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn queued_output_batches_bytes_and_keeps_every_one() {
        let written = Arc::new(Mutex::new(Vec::new()));
        let calls = Arc::new(Mutex::new(0));
        let sink = SlowSink { written: written.clone(), calls: calls.clone() };
        let mut output = QueuedOutput::start(Box::new(sink), "test").unwrap();
        let text: Vec<u8> = (0..2000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let started = Instant::now();
        for byte in &text {
            output.write_all(std::slice::from_ref(byte)).unwrap();
            output.flush().unwrap();
        }
        // 2000 one-byte writes straight to the sink would take 4 s.
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
        finish_output(Duration::from_secs(10));
        assert_eq!(*written.lock().unwrap(), text);
        assert!(*calls.lock().unwrap() < text.len() / 4, "{} calls for {} bytes", calls.lock().unwrap(), text.len());
    }

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
        finish_output(Duration::from_secs(5));
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
    fn socket_console_serves_one_client_after_another() {
        let dir = std::env::temp_dir().join(format!("kestrel-console-sock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.sock");
        let socket = ListenSocket { address: SocketAddress::Unix(path.clone()), wait: false };
        let backend = open(&SerialConfig::Socket(socket), "virtiocon0").unwrap();
        let (mut output, input) = backend.split();
        // Output with nobody connected is dropped, not queued and not an error.
        output.write_all(b"lost").unwrap();
        finish_output(Duration::from_secs(5));
        let (typed_tx, typed_rx) = std::sync::mpsc::channel();
        input.start("test-console", move |bytes| typed_tx.send(bytes.to_vec()).is_ok());
        for round in 0..2 {
            let mut client = UnixStream::connect(&path).unwrap();
            client.write_all(format!("in{round}").as_bytes()).unwrap();
            let got = typed_rx.recv_timeout(Duration::from_secs(5)).unwrap();
            assert_eq!(got, format!("in{round}").as_bytes());
            // The client is registered for output once its input has arrived.
            output.write_all(format!("out{round}").as_bytes()).unwrap();
            let mut buf = [0u8; 4];
            client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            client.read_exact(&mut buf).unwrap();
            assert_eq!(&buf, format!("out{round}").as_bytes());
        }
        std::fs::remove_dir_all(dir).unwrap();
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

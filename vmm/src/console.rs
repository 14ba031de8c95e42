//! Host ends of the guest's consoles: the terminal, a pseudo-terminal, a file, a listening socket, or nothing.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use devices::InputRoom;

use crate::config::{ListenSocket, SerialConfig, SocketAddress};
use crate::listen::{bind_private_unix, inherited_listener, resolve_tcp, InheritedListener};
use crate::seccomp::{self, ThreadKind};

/// The host side of a console: where guest output goes and, if anywhere, where guest input comes from.
pub struct ConsoleBackend {
    pub output: Box<dyn Write + Send>,
    pub input: Option<Box<dyn Read + Send>>,
    /// A pty's path, for the user to attach to (QMP's `query-chardev` reports it).
    pub pty_path: Option<String>,
    /// Whether a client is connected, for a backend that can have none (a listening socket); `None`: always
    /// connected.
    pub connection: Option<Arc<HostConnection>>,
}

/// Whether a socket backend has a client, and who hears when that changes (a virtio-serial port tells its guest).
#[derive(Default)]
pub struct HostConnection {
    state: Mutex<ConnectionState>,
}

#[derive(Default)]
struct ConnectionState {
    connected: bool,
    watcher: Option<Box<dyn FnMut(bool) + Send>>,
}

impl HostConnection {
    pub fn is_connected(&self) -> bool {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).connected
    }

    /// Calls `watcher` with the state now, then with every change, on the thread that sees it (the backend's
    /// input thread), with this connection's lock held: `watcher` must not wait for the backend.
    pub fn watch(&self, mut watcher: impl FnMut(bool) + Send + 'static) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        watcher(state.connected);
        state.watcher = Some(Box::new(watcher));
    }

    fn set(&self, connected: bool) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if std::mem::replace(&mut state.connected, connected) != connected {
            if let Some(watcher) = state.watcher.as_mut() {
                watcher(connected);
            }
        }
    }
}

/// A backend's input side, not yet being read.
pub struct ConsoleInput {
    input: Option<Box<dyn Read + Send>>,
}

impl ConsoleBackend {
    /// The output, and the input to start once its device exists.
    pub fn split(self) -> (Box<dyn Write + Send>, ConsoleInput) {
        (self.output, ConsoleInput { input: self.input })
    }
}

/// How long the input thread waits for a device's notification before offering refused input again: devices that
/// never notify are polled at this pace.
const INPUT_RETRY: Duration = Duration::from_millis(10);

/// Host input read ahead of what the device has taken, at most. The host side keeps the rest (a pipe's writer
/// blocks, a terminal buffers), so input the guest does not read costs no memory here.
const INPUT_CHUNK: usize = 512;

impl ConsoleInput {
    /// Starts a thread that hands input to `deliver`, which takes what the device has room for now and returns how
    /// many bytes that was. The rest is offered again when the device notifies `room` (or after [`INPUT_RETRY`]),
    /// and nothing more is read from the host until it has all been taken: nothing typed or piped is lost, and
    /// nothing piles up. No input (a file, or none): nothing to do.
    pub fn start(self, name: &str, room: Arc<InputRoom>, mut deliver: impl FnMut(&[u8]) -> usize + Send + 'static) {
        let Some(mut input) = self.input else { return };
        let spawned = std::thread::Builder::new().name(format!("{name}-input")).spawn(seccomp::confined(
            ThreadKind::ConsoleInput,
            move || {
                let mut buf = [0u8; INPUT_CHUNK];
                loop {
                    match input.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            let mut rest = &buf[..n];
                            while !rest.is_empty() {
                                let seen = room.generation();
                                rest = &rest[deliver(rest).min(rest.len())..];
                                if !rest.is_empty() {
                                    room.wait_past(seen, INPUT_RETRY);
                                }
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(_) => break,
                    }
                }
            },
        ));
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
            if let Some(saved) = set_raw_keeping_signals(stdin.as_raw_fd(), true)? {
                SAVED_TERMINAL.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert((stdin.as_raw_fd(), saved));
            }
            Ok(ConsoleBackend {
                output: Box::new(io::stdout()),
                input: Some(Box::new(stdin)),
                pty_path: None,
                connection: None,
            })
        }
        SerialConfig::Pty => {
            let (output, input, path) = pty_console()?;
            // QEMU's wording, which scripts already look for.
            eprintln!("char device redirected to {path} (label {label})");
            Ok(ConsoleBackend {
                output: Box::new(output),
                input: Some(Box::new(input)),
                pty_path: Some(path),
                connection: None,
            })
        }
        SerialConfig::File(path) => {
            let file = OpenOptions::new().create(true).append(true).open(path).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot open serial output file '{}': {e}", path.display()))
            })?;
            Ok(ConsoleBackend { output: Box::new(file), input: None, pty_path: None, connection: None })
        }
        SerialConfig::None => {
            Ok(ConsoleBackend { output: Box::new(io::sink()), input: None, pty_path: None, connection: None })
        }
        SerialConfig::Socket(socket) => {
            let (output, input) = socket_console(socket, label)
                .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {} ({label}): {e}", socket.address)))?;
            let connection = Some(input.connection.clone());
            Ok(ConsoleBackend { output: Box::new(output), input: Some(Box::new(input)), pty_path: None, connection })
        }
    }
}

/// Guest output waiting for the host side: beyond this the device blocks (a UART's transmitter stays busy), as
/// it would on a slow line, rather than losing output. The VMM can end the wait (see [`release_blocked_writes`]).
/// A UART fills a window's worth of coalescing ([`OUTPUT_COALESCE`]) with a few hundred bytes, so this only
/// absorbs a backend's hiccups; a guest printing faster than its backend takes waits for it in any case, and a
/// larger queue would only hold more memory (up to twice this, as the queue grows by doubling).
const OUTPUT_QUEUE_LIMIT: usize = 64 << 10;

/// While output keeps coming, the writer thread starts a write at most once per this window, so a burst
/// accumulates and a kernel's boot log goes out in a few writes. Output after a quiet spell at least this long
/// is written at once: the first byte of a boot or the echo of a keystroke does not wait.
const OUTPUT_COALESCE: Duration = Duration::from_millis(2);

/// The writer thread only copies a batch to its backend: a small stack is plenty.
const OUTPUT_THREAD_STACK: usize = 64 << 10;

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
    /// Bumped by [`release_blocked_writes`]: a write waiting for room stops waiting when this changes.
    releases: u64,
}

/// Console output written by a thread of its own. A guest console writes a byte per register access, and the
/// backend (a terminal, a pipe, a file) costs a system call per write and can block; here each byte is only
/// appended to a queue, and the writer thread, woken once per burst, writes what has accumulated in one call,
/// at most once per [`OUTPUT_COALESCE`].
struct QueuedOutput {
    queue: Arc<OutputQueue>,
}

impl QueuedOutput {
    fn start(mut sink: Box<dyn Write + Send>, label: &str) -> io::Result<Self> {
        let queue = Arc::new(OutputQueue::default());
        let writer = queue.clone();
        let write_batches = move || {
            let mut last_write: Option<Instant> = None;
            loop {
                {
                    let mut state = writer.state.lock().unwrap_or_else(|p| p.into_inner());
                    while state.bytes.is_empty() {
                        state.idle = true;
                        state = writer.changed.wait(state).unwrap_or_else(|p| p.into_inner());
                    }
                    state.idle = false;
                    state.writing = true;
                }
                // Output right after a write is part of a burst still coming: let it gather until the window
                // since that write has passed. Output after a quiet spell goes out at once.
                if let Some(due) = last_write.map(|at| at + OUTPUT_COALESCE) {
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                }
                last_write = Some(Instant::now());
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
            }
        };
        std::thread::Builder::new()
            .name(format!("{label}-output"))
            .stack_size(OUTPUT_THREAD_STACK)
            .spawn(seccomp::confined(ThreadKind::ConsoleOutput, write_batches))?;
        QUEUED_OUTPUTS.lock().unwrap_or_else(|p| p.into_inner()).push(queue.clone());
        Ok(QueuedOutput { queue })
    }
}

impl Write for QueuedOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut state = self.queue.state.lock().unwrap_or_else(|p| p.into_inner());
        let releases = state.releases;
        while !state.broken
            && state.releases == releases
            && !state.bytes.is_empty()
            && state.bytes.len() + buf.len() > OUTPUT_QUEUE_LIMIT
        {
            state.full = true;
            state = self.queue.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        // Released (or room made): the bytes are taken even beyond the limit, one write's worth per release.
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

/// Ends every wait for room in a console's output queue: the waiting write takes its bytes beyond the limit and
/// returns. A vCPU whose guest prints to a console nobody reads (a pipe never drained, a stopped terminal) waits
/// inside its device, where a kick cannot reach it; the VMM calls this until the vCPU has come out, whenever it
/// needs the vCPUs out of the guest (pause, reset, exit).
pub fn release_blocked_writes() {
    let queues = QUEUED_OUTPUTS.lock().unwrap_or_else(|p| p.into_inner()).clone();
    for queue in queues {
        let mut state = queue.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.full {
            state.releases = state.releases.wrapping_add(1);
            queue.changed.notify_all();
        }
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

/// A descriptor that polls readable once Kestrel is told to terminate, -1 while none was given: a console waiting
/// for its first client (`wait=on`) gives up then.
static GIVE_UP_WAITING: AtomicI32 = AtomicI32::new(-1);

/// Makes waits for a console's first client end, with an `Interrupted` error, once `fd` polls readable. `fd` must
/// stay open for the rest of the process.
pub fn give_up_waiting_when_readable(fd: RawFd) {
    GIVE_UP_WAITING.store(fd, Ordering::SeqCst);
}

/// Waits until `listener` has a connection to accept, or fails with `Interrupted` once the descriptor given to
/// [`give_up_waiting_when_readable`] polls readable.
fn wait_for_connection(listener: RawFd) -> io::Result<()> {
    loop {
        let mut fds = [
            libc::pollfd { fd: listener, events: libc::POLLIN, revents: 0 },
            // A negative descriptor is ignored by poll.
            libc::pollfd { fd: GIVE_UP_WAITING.load(Ordering::SeqCst), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: polls valid descriptors, with a correctly sized array.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if ready < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        if fds[1].revents != 0 {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "interrupted by a termination signal"));
        }
        if fds[0].revents != 0 {
            return Ok(());
        }
    }
}

/// The unix sockets consoles listen on, removed on the way out of the process (see [`remove_socket_files`]).
static SOCKET_FILES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Removes the files of the unix sockets consoles listen on, as QEMU does when it exits: a socket file left behind
/// looks like a console to connect to. Called on every way out of the process.
pub fn remove_socket_files() {
    for path in std::mem::take(&mut *SOCKET_FILES.lock().unwrap_or_else(|p| p.into_inner())) {
        let _ = std::fs::remove_file(path);
    }
}

/// A console on a listening socket: output goes to the connected client (dropped while there is none), input comes
/// from it; when it leaves, the next client that connects takes over. With `wait`, the first client is accepted
/// before this returns, as QEMU waits before starting the guest.
fn socket_console(socket: &ListenSocket, label: &str) -> io::Result<(SocketOutput, SocketInput)> {
    let listener = match &socket.address {
        SocketAddress::Unix(path) => {
            let listener = bind_private_unix(path)?;
            SOCKET_FILES.lock().unwrap_or_else(|p| p.into_inner()).push(path.clone());
            SocketListener::Unix(listener)
        }
        SocketAddress::Tcp(host, port) => SocketListener::Tcp(TcpListener::bind(resolve_tcp(host, *port)?)?),
        // Accepts block here (on the input thread), whatever the one who passed the socket set.
        SocketAddress::Inherited(fd) => match inherited_listener(*fd, false)? {
            InheritedListener::Unix(listener) => SocketListener::Unix(listener),
            InheritedListener::Tcp(listener) => SocketListener::Tcp(listener),
        },
    };
    let client = Arc::new(Mutex::new(None));
    let connection = Arc::new(HostConnection::default());
    let mut input = SocketInput { listener, client: client.clone(), reader: None, connection };
    if socket.wait {
        eprintln!("kestrel: {label}: waiting for a connection on {}", socket.address);
        let waited = wait_for_connection(input.listener.raw_fd()).and_then(|()| input.accept());
        if let Err(e) = waited {
            // Nobody connected and nobody will: the socket file goes with the listener.
            if let SocketAddress::Unix(path) = &socket.address {
                let _ = std::fs::remove_file(path);
            }
            return Err(e);
        }
    }
    Ok((SocketOutput { client }, input))
}

enum SocketListener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl SocketListener {
    fn raw_fd(&self) -> RawFd {
        match self {
            SocketListener::Unix(l) => l.as_raw_fd(),
            SocketListener::Tcp(l) => l.as_raw_fd(),
        }
    }
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
    /// Set as clients come and go.
    connection: Arc<HostConnection>,
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
        self.connection.set(true);
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
            self.connection.set(false);
        }
    }
}

/// Raw input (no line editing, no echo: the guest echoes) but, when `keep_signals`, Ctrl-C still reaches Kestrel
/// as SIGINT, as with QEMU's stdio console. Returns the settings it replaced; not a terminal: nothing to do.
fn set_raw_keeping_signals(fd: RawFd, keep_signals: bool) -> io::Result<Option<libc::termios>> {
    // SAFETY: isatty only inspects the descriptor.
    if unsafe { libc::isatty(fd) } != 1 {
        return Ok(None);
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
    Ok(Some(saved))
}

/// Puts the terminal back as Kestrel found it. Called on every way out of the process.
pub fn restore_terminal() {
    let saved = SAVED_TERMINAL.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some((fd, termios)) = saved {
        // SAFETY: restores settings read from the same descriptor earlier; failure leaves the terminal as it was.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &termios) };
    }
}

/// How often a pty's input side looks again for someone attached, while nobody is: typed input waits in the pty
/// meanwhile, so this only delays it.
const PTY_ATTACH_CHECK: Duration = Duration::from_millis(250);

/// How long a pty's output side waits for room before looking again whether the user is still attached.
const PTY_WRITE_CHECK_MS: libc::c_int = 500;

/// A console on a new pseudo-terminal: its output and input sides, and the path for the user to attach to.
///
/// As in QEMU's pty backend, Kestrel does not keep the slave end open itself, so the master tells whether a user
/// is attached (it polls as hung up while nobody has the slave open). Output while nobody is attached is dropped,
/// not left in the pty for whoever attaches later: once the pty's buffer were full, the guest would wait for a
/// reader that may never come. Input waits until someone attaches.
fn pty_console() -> io::Result<(PtyOutput, PtyInput, String)> {
    let (master, path) = open_pty()?;
    // Non-blocking, so that a write or read is only tried once poll says it can go ahead (or that nobody is
    // attached); the two sides share the flag through the duplicated descriptor.
    // SAFETY: F_GETFL/F_SETFL only read and set the status flags of a descriptor we own.
    unsafe {
        let flags = libc::fcntl(master.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(master.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let input = PtyInput { master: master.try_clone()? };
    Ok((PtyOutput { master }, input, path))
}

/// Waits up to `timeout_ms` (-1: no limit) for `events` on `fd`; returns the events that happened (0: timed out).
/// An error condition on the descriptor is an error, so that callers never spin on it.
fn poll_fd(fd: RawFd, events: libc::c_short, timeout_ms: libc::c_int) -> io::Result<libc::c_short> {
    let mut pollfd = libc::pollfd { fd, events, revents: 0 };
    loop {
        // SAFETY: one valid pollfd, which poll fills in.
        match unsafe { libc::poll(&mut pollfd, 1, timeout_ms) } {
            _ if pollfd.revents & (libc::POLLERR | libc::POLLNVAL) != 0 => {
                return Err(io::Error::other(format!("poll reports an error condition ({:#x})", pollfd.revents)))
            }
            n if n >= 0 => return Ok(pollfd.revents),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// A pty's output side (see [`pty_console`]).
struct PtyOutput {
    master: File,
}

impl Write for PtyOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            let ready = poll_fd(self.master.as_raw_fd(), libc::POLLOUT, PTY_WRITE_CHECK_MS)?;
            if ready & libc::POLLHUP != 0 {
                // Nobody attached: dropped.
                return Ok(buf.len());
            }
            if ready & libc::POLLOUT == 0 {
                continue;
            }
            match self.master.write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {}
                // The user left between the poll and the write.
                Err(e) if e.raw_os_error() == Some(libc::EIO) => return Ok(buf.len()),
                result => return result,
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A pty's input side (see [`pty_console`]): reads wait for a user to attach and type.
struct PtyInput {
    master: File,
}

impl Read for PtyInput {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.master.read(buf) {
                Ok(n) if n > 0 => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let ready = poll_fd(self.master.as_raw_fd(), libc::POLLIN, -1)?;
                    if ready & libc::POLLIN == 0 && ready & libc::POLLHUP != 0 {
                        std::thread::sleep(PTY_ATTACH_CHECK);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Nobody attached (EIO), or nothing read: look again in a while.
                Ok(_) => std::thread::sleep(PTY_ATTACH_CHECK),
                Err(e) if e.raw_os_error() == Some(libc::EIO) => std::thread::sleep(PTY_ATTACH_CHECK),
                Err(e) => return Err(e),
            }
        }
    }
}

/// A new pseudo-terminal, set raw: the master end and the path of the slave for the user to attach to.
fn open_pty() -> io::Result<(File, String)> {
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
    // The slave side gets raw mode so the guest sees bytes exactly as typed, as with QEMU's pty backend. The
    // settings belong to the pty, not to this descriptor: they stay once it is closed.
    let slave = OpenOptions::new().read(true).write(true).open(&path)?;
    set_raw_keeping_signals(slave.as_raw_fd(), false)?;
    Ok((File::from(master), path))
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

    /// A backend that reports when each write reaches it.
    struct TimedSink {
        written: std::sync::mpsc::Sender<Instant>,
    }

    impl Write for TimedSink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _ = self.written.send(Instant::now());
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_after_a_quiet_spell_is_written_without_waiting_for_the_coalescing_window() {
        let (written_tx, written_rx) = std::sync::mpsc::channel();
        let mut output = QueuedOutput::start(Box::new(TimedSink { written: written_tx }), "timed").unwrap();
        // The fastest of several tries, so that a loaded host's slow wake-ups do not decide: a writer that always
        // lets the window pass first can never be faster than the window.
        let mut fastest = Duration::MAX;
        for _ in 0..20 {
            std::thread::sleep(OUTPUT_COALESCE * 5);
            let written_at = Instant::now();
            output.write_all(b"x").unwrap();
            let reached = written_rx.recv_timeout(Duration::from_secs(10)).unwrap();
            fastest = fastest.min(reached.duration_since(written_at));
        }
        assert!(fastest < OUTPUT_COALESCE, "the first byte after a quiet spell took at least {fastest:?}");
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
        // Clients coming and going are heard (a virtio-serial port tells its guest).
        let connection = backend.connection.clone().expect("a socket backend reports its connection");
        let (seen_tx, seen_rx) = std::sync::mpsc::channel();
        connection.watch(move |connected| seen_tx.send(connected).unwrap());
        assert_eq!(seen_rx.recv_timeout(Duration::from_secs(5)), Ok(false), "the state now, first");
        let (mut output, input) = backend.split();
        // Output with nobody connected is dropped, not queued and not an error.
        output.write_all(b"lost").unwrap();
        finish_output(Duration::from_secs(5));
        let (typed_tx, typed_rx) = std::sync::mpsc::channel();
        input.start("test-console", Arc::new(InputRoom::default()), move |bytes| {
            typed_tx.send(bytes.to_vec()).map_or(0, |()| bytes.len())
        });
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
            assert_eq!(seen_rx.recv_timeout(Duration::from_secs(5)), Ok(true));
            assert!(connection.is_connected());
            drop(client);
            assert_eq!(seen_rx.recv_timeout(Duration::from_secs(5)), Ok(false), "the client left");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn pty_carries_bytes_both_ways_once_attached_and_drops_output_before() {
        let (mut output, mut input, path) = pty_console().unwrap();
        // Nobody attached: dropped at once, however much (more than a pty holds), not kept for a later reader.
        let started = Instant::now();
        for _ in 0..64 {
            output.write_all(&[b'.'; 4096]).unwrap();
        }
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        let (typed_tx, typed_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 16];
            let n = input.read(&mut buf).unwrap();
            typed_tx.send(buf[..n].to_vec()).unwrap();
        });
        // The reader waits for someone to attach rather than failing.
        std::thread::sleep(PTY_ATTACH_CHECK * 2);
        assert!(typed_rx.try_recv().is_err());
        let mut slave = OpenOptions::new().read(true).write(true).open(&path).unwrap();
        output.write_all(b"to-guest-side").unwrap();
        let mut buf = [0u8; 13];
        slave.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"to-guest-side");
        slave.write_all(b"x").unwrap();
        assert_eq!(typed_rx.recv_timeout(Duration::from_secs(5)).unwrap(), b"x");
        // The user leaves: output is dropped again instead of waiting for room.
        drop(slave);
        let started = Instant::now();
        for _ in 0..64 {
            output.write_all(&[b'.'; 4096]).unwrap();
        }
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    }

    /// A backend that takes nothing until told to: a pipe nobody drains.
    struct StuckSink {
        unstuck: Arc<(Mutex<bool>, Condvar)>,
    }

    impl Write for StuckSink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let (unstuck, changed) = &*self.unstuck;
            let mut unstuck = unstuck.lock().unwrap();
            while !*unstuck {
                unstuck = changed.wait(unstuck).unwrap();
            }
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_write_waiting_for_room_returns_when_released() {
        let unstuck = Arc::new((Mutex::new(false), Condvar::new()));
        let mut output = QueuedOutput::start(Box::new(StuckSink { unstuck: unstuck.clone() }), "stuck").unwrap();
        // The writer thread takes this byte and is stuck with it.
        output.write_all(b"x").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let writer = std::thread::spawn(move || {
            // More than the queue holds, byte by byte as a UART writes: the queue fills and a write waits.
            for _ in 0..OUTPUT_QUEUE_LIMIT + 100 {
                output.write_all(b"x").unwrap();
            }
            done_tx.send(()).unwrap();
        });
        assert!(done_rx.recv_timeout(Duration::from_millis(500)).is_err(), "the queue never filled");
        // Released, the waiting write returns; the next ones wait again (the writer is still stuck), so release
        // until all are through, as the VMM does until its vCPUs are out.
        let deadline = Instant::now() + Duration::from_secs(10);
        while done_rx.try_recv().is_err() {
            assert!(Instant::now() < deadline, "a released write still waits");
            release_blocked_writes();
            std::thread::sleep(Duration::from_micros(100));
        }
        writer.join().unwrap();
        let (flag, changed) = &*unstuck;
        *flag.lock().unwrap() = true;
        changed.notify_all();
    }
}

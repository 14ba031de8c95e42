#![cfg(target_arch = "x86_64")]

//! The QMP server, the event loop and host signals under abuse, on the real `kestrel` binary with the repo's probe
//! payloads: bursts of clients that connect and leave at once, clients that stop reading, termination signals
//! during resets and while Kestrel waits for its first client.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{kestrel_binary, kvm_available, payload};

const PVH: &str = "probe.pvh.elf";

/// For anything that should happen at once: generous for a loaded machine, but a hang still fails.
const TIMEOUT: Duration = Duration::from_secs(10);

/// A kestrel process in a directory of its own, killed if a test fails half-way.
struct Kestrel {
    child: Option<Child>,
    dir: PathBuf,
}

impl Kestrel {
    /// Starts the probe payload running `command`, with `args` built from the process's directory.
    fn start(command: &str, args: impl FnOnce(&Path) -> Vec<String>) -> Kestrel {
        let dir = std::env::temp_dir().join(format!("kestrel-hardening-{}-{}", std::process::id(), unique()));
        std::fs::create_dir_all(&dir).unwrap();
        let kernel = payload(PVH);
        let mut cmd = Command::new(kestrel_binary());
        cmd.args(["--kernel", kernel.to_str().unwrap(), "--cmdline", command, "--memory", "64M"]);
        cmd.args(args(&dir)).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let child = cmd.spawn().expect("starting kestrel");
        Kestrel { child: Some(child), dir }
    }

    /// Starts `command` with a file console, one QMP socket (`wait=off`) per name in `sockets`, and `extra`.
    fn with_sockets(command: &str, sockets: &[&str], extra: &[&str]) -> Kestrel {
        let kestrel = Kestrel::start(command, |dir| {
            let mut args = vec!["--serial".to_string(), format!("file:{}", dir.join("console.log").display())];
            args.extend(extra.iter().map(|arg| arg.to_string()));
            for name in sockets {
                args.push("--qmp".into());
                args.push(format!("unix:{},server=on,wait=off", dir.join(name).display()));
            }
            args
        });
        for name in sockets {
            kestrel.wait_for_socket(name);
        }
        kestrel
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn wait_for_socket(&self, name: &str) {
        let deadline = Instant::now() + TIMEOUT;
        while !self.path(name).exists() {
            assert!(Instant::now() < deadline, "socket {name} never appeared");
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = self.child.as_ref().unwrap().id() as libc::pid_t;
        // SAFETY: kill only sends a signal, to our own child, which has not been waited for yet.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "sending signal {signal}");
    }

    /// Waits up to `limit` for the process to exit: its success, its stderr and how long it took.
    fn wait(mut self, limit: Duration) -> (bool, String, Duration) {
        let mut child = self.child.take().unwrap();
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed() > limit {
                let _ = child.kill();
                let output = child.wait_with_output().unwrap();
                panic!("kestrel did not exit within {limit:?}; stderr:\n{}", String::from_utf8_lossy(&output.stderr));
            }
            thread::sleep(Duration::from_millis(5));
        }
        let elapsed = start.elapsed();
        let output = child.wait_with_output().unwrap();
        (output.status.success(), String::from_utf8_lossy(&output.stderr).into_owned(), elapsed)
    }
}

impl Drop for Kestrel {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::SeqCst)
}

/// A QMP client reading `\r\n`-terminated JSON lines.
struct Client {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Client {
    fn connect(path: &Path) -> Client {
        let stream = UnixStream::connect(path).expect("connecting to the QMP socket");
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        Client { writer: stream.try_clone().unwrap(), reader: BufReader::new(stream) }
    }

    /// Connects and negotiates: the greeting, then `qmp_capabilities`.
    fn negotiated(path: &Path) -> Client {
        let mut client = Client::connect(path);
        assert!(client.line().get("QMP").is_some(), "expected the greeting");
        client.send(r#"{"execute":"qmp_capabilities"}"#);
        assert_eq!(client.line(), serde_json::json!({"return": {}}));
        client
    }

    fn line(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("reading from the QMP socket");
        assert!(line.ends_with("\r\n"), "QMP lines end in CRLF: {line:?}");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
    }

    fn send(&mut self, bytes: &str) {
        self.writer.write_all(bytes.as_bytes()).unwrap();
    }

    /// Everything until Kestrel closes the connection, split into lines; each must be complete.
    fn lines_until_closed(mut self) -> Vec<Value> {
        let mut all = Vec::new();
        self.reader.read_to_end(&mut all).expect("reading the QMP socket to its end");
        let text = String::from_utf8(all).expect("QMP output is UTF-8");
        assert!(text.is_empty() || text.ends_with("\r\n"), "the last line was cut: ...{:?}", tail(&text));
        text.split_terminator("\r\n")
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): ...{:?}", tail(line))))
            .collect()
    }
}

fn tail(text: &str) -> &str {
    let start = text.len().saturating_sub(200);
    text.get(start..).unwrap_or(text)
}

fn assert_host_signal_shutdown(event: &Value) {
    assert_eq!(event["event"], "SHUTDOWN", "expected the SHUTDOWN event: {event}");
    assert_eq!(event["data"], serde_json::json!({"guest": false, "reason": "host-signal"}));
}

/// Regression: a burst of clients that connect and close at once (a health check, a port scanner) left the
/// listener wedged: one readiness edge, one accept, a failed greeting, and the rest of the queue never looked at.
#[test]
fn a_burst_of_connect_then_close_leaves_the_monitor_serving() {
    if !kvm_available() {
        return;
    }
    let kestrel = Kestrel::with_sockets("spin", &["q.sock"], &[]);
    let burst: Vec<UnixStream> = (0..50).map(|_| UnixStream::connect(kestrel.path("q.sock")).unwrap()).collect();
    drop(burst);
    let mut client = Client::negotiated(&kestrel.path("q.sock"));
    client.send(r#"{"execute":"query-status"}"#);
    assert_eq!(client.line()["return"]["status"], "running");
}

/// One client at a time, as QEMU: the next waits in the listen queue and is greeted as soon as the first leaves,
/// also when clients that gave up before their turn are queued in between.
#[test]
fn a_queued_client_is_greeted_when_the_current_one_leaves() {
    if !kvm_available() {
        return;
    }
    let kestrel = Kestrel::with_sockets("spin", &["q.sock"], &[]);
    let first = Client::negotiated(&kestrel.path("q.sock"));
    let gave_up: Vec<UnixStream> = (0..20).map(|_| UnixStream::connect(kestrel.path("q.sock")).unwrap()).collect();
    let mut waiting = Client::connect(&kestrel.path("q.sock"));
    drop(gave_up);
    // Not greeted while the first client is there.
    waiting.writer.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    thread::sleep(Duration::from_millis(200));
    let early = waiting.reader.get_mut().read(&mut byte);
    assert!(
        matches!(&early, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "a second client was served while the first was connected: {early:?}"
    );
    waiting.writer.set_nonblocking(false).unwrap();
    drop(first);
    assert!(waiting.line().get("QMP").is_some(), "expected the greeting once the first client left");
}

/// Regression: SIGTERM while replies were still queued for a client that had not read them yet closed the socket
/// on half a reply, without the SHUTDOWN event. Now every reply and then SHUTDOWN arrive, whole.
#[test]
fn sigterm_delivers_queued_replies_and_then_shutdown() {
    if !kvm_available() {
        return;
    }
    // Far more than a unix socket buffers (each reply is the whole schema, ~16 KiB).
    const REQUESTS: usize = 40;
    let kestrel = Kestrel::with_sockets("spin", &["slow.sock", "probe.sock"], &[]);
    let mut slow = Client::negotiated(&kestrel.path("slow.sock"));
    slow.send(&r#"{"execute":"query-qmp-schema"}"#.repeat(REQUESTS));
    // A round trip on another monitor after the requests were sent: the event loop has read them by then (it
    // reads a client until it would block, and the slow client's bytes were there first).
    thread::sleep(Duration::from_millis(100));
    let mut probe = Client::negotiated(&kestrel.path("probe.sock"));
    probe.send(r#"{"execute":"query-status"}"#);
    assert!(probe.line().get("return").is_some());

    kestrel.signal(libc::SIGTERM);
    let lines = slow.lines_until_closed();
    let (_, stderr, _) = kestrel.wait(TIMEOUT);
    assert!(stderr.contains("terminating on signal 15"), "stderr: {stderr}");
    let replies = lines.iter().filter(|line| line.get("return").is_some_and(Value::is_array)).count();
    assert_eq!(replies, REQUESTS, "every schema request gets its whole reply");
    assert_host_signal_shutdown(lines.last().expect("no output at all"));
}

/// A client that never reads must not keep Kestrel alive: what it is owed is dropped after a short grace.
#[test]
fn a_client_that_never_reads_does_not_hold_up_exit() {
    if !kvm_available() {
        return;
    }
    let kestrel = Kestrel::with_sockets("spin", &["q.sock"], &[]);
    let mut stuck = Client::negotiated(&kestrel.path("q.sock"));
    stuck.send(&r#"{"execute":"query-qmp-schema"}"#.repeat(100));
    thread::sleep(Duration::from_millis(300));
    kestrel.signal(libc::SIGTERM);
    let (_, stderr, elapsed) = kestrel.wait(TIMEOUT);
    assert!(stderr.contains("terminating on signal 15"), "stderr: {stderr}");
    // The grace is 1 s; anything near TIMEOUT means the client held Kestrel.
    assert!(elapsed < Duration::from_secs(5), "exit took {elapsed:?}");
    drop(stuck);
}

/// Sends `resets` × `system_reset` in one write, then `signal` at once; Kestrel must exit on it promptly and tell
/// the client why.
fn signal_during_resets(resets: usize, signal: libc::c_int) {
    let kestrel = Kestrel::with_sockets("spin", &["q.sock"], &[]);
    let mut client = Client::negotiated(&kestrel.path("q.sock"));
    client.send(&r#"{"execute":"system_reset"}"#.repeat(resets));
    kestrel.signal(signal);
    let (_, stderr, elapsed) = kestrel.wait(TIMEOUT);
    assert!(stderr.contains(&format!("terminating on signal {signal}")), "stderr: {stderr}");
    let lines = client.lines_until_closed();
    assert_host_signal_shutdown(lines.last().expect("no output at all"));
    assert!(elapsed < TIMEOUT, "exit took {elapsed:?}");
}

/// Regression: a reset drained the event channel, and with it a termination signal that had just arrived: the
/// process went on running (20 of 20 tries).
#[test]
fn sigterm_right_after_system_reset_is_not_lost() {
    if !kvm_available() {
        return;
    }
    for _ in 0..20 {
        signal_during_resets(1, libc::SIGTERM);
    }
}

/// Regression: with resets queued, every termination signal was swallowed by one of them.
#[test]
fn queued_resets_do_not_hold_off_sigint() {
    if !kvm_available() {
        return;
    }
    signal_during_resets(200, libc::SIGINT);
}

#[test]
fn queued_resets_do_not_hold_off_sighup() {
    if !kvm_available() {
        return;
    }
    signal_during_resets(200, libc::SIGHUP);
}

/// The guest resetting itself (the probe's `reset` command reboots twice, then powers off, which `--no-shutdown`
/// turns into a pause) with a signal sent at various points of it: only the signal can end Kestrel, and must. The
/// window in which a reset used to drop the signal is too narrow to hit here with a guest's own resets (this passes
/// on the code before the fix); it guards the outcome, the QMP tests above reproduce the loss.
#[test]
fn a_signal_during_guest_resets_ends_kestrel() {
    if !kvm_available() {
        return;
    }
    for delay_ms in [0, 2, 5, 10, 20, 50] {
        let kestrel = Kestrel::with_sockets("reset", &["q.sock"], &["--no-shutdown"]);
        thread::sleep(Duration::from_millis(delay_ms));
        kestrel.signal(libc::SIGTERM);
        let (success, stderr, _) = kestrel.wait(TIMEOUT);
        assert!(success && stderr.contains("terminating on signal 15"), "stderr: {stderr}");
    }
}

/// Starts kestrel waiting for its first client on `what` (`--qmp` or `--serial`), sends `signal` and expects a
/// prompt, clean exit: QEMU's message, and no socket file left behind.
fn signal_while_waiting(what: &str, signal: libc::c_int) {
    let kestrel = Kestrel::start("spin", |dir| {
        let socket = format!("unix:{},server=on", dir.join("wait.sock").display());
        let mut args = vec![what.to_string(), socket];
        if what == "--qmp" {
            args.extend(["--serial".to_string(), "none".to_string()]);
        }
        args
    });
    kestrel.wait_for_socket("wait.sock");
    // The socket exists before the wait starts; let it start.
    thread::sleep(Duration::from_millis(200));
    let socket = kestrel.path("wait.sock");
    kestrel.signal(signal);
    let (success, stderr, _) = kestrel.wait(TIMEOUT);
    assert!(success, "stderr: {stderr}");
    assert!(stderr.contains("waiting for"), "stderr: {stderr}");
    assert!(stderr.contains(&format!("terminating on signal {signal}")), "stderr: {stderr}");
    assert!(!socket.exists(), "the socket file was left behind");
}

/// Regression: `-qmp unix:S,server=on` (wait=on) ignored Ctrl-C and SIGTERM until a client connected.
#[test]
fn signals_interrupt_waiting_for_the_first_qmp_client() {
    if !kvm_available() {
        return;
    }
    signal_while_waiting("--qmp", libc::SIGTERM);
    signal_while_waiting("--qmp", libc::SIGINT);
}

/// Regression: a console socket with wait=on ignored Ctrl-C and SIGTERM until a client connected.
#[test]
fn signals_interrupt_waiting_for_the_first_console_client() {
    if !kvm_available() {
        return;
    }
    signal_while_waiting("--serial", libc::SIGTERM);
    signal_while_waiting("--serial", libc::SIGINT);
}

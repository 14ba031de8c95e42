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

#![cfg(target_arch = "x86_64")]

//! The QMP server, the event loop and host signals under abuse, on the real `kestrel` binary with the repo's probe
//! payloads: bursts of clients that connect and leave at once, clients that stop reading, termination signals
//! during resets and while Kestrel waits for its first client.

mod support;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::thread;
use std::time::Duration;

use serde_json::Value;
use support::kvm_available;
use support::probe_vm::{wait_for_path, Exit, ProbeVm, TIMEOUT};
use support::qmp::QmpClient;

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
    let kestrel = ProbeVm::with_qmp_sockets("spin", &["q.sock"], &[]);
    let burst: Vec<UnixStream> = (0..50).map(|_| UnixStream::connect(kestrel.path("q.sock")).unwrap()).collect();
    drop(burst);
    let mut client = QmpClient::negotiated(&kestrel.path("q.sock"));
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
    let kestrel = ProbeVm::with_qmp_sockets("spin", &["q.sock"], &[]);
    let first = QmpClient::negotiated(&kestrel.path("q.sock"));
    let gave_up: Vec<UnixStream> = (0..20).map(|_| UnixStream::connect(kestrel.path("q.sock")).unwrap()).collect();
    let mut waiting = QmpClient::connect(&kestrel.path("q.sock"));
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
    let mut kestrel = ProbeVm::with_qmp_sockets("spin", &["slow.sock", "probe.sock"], &[]);
    let mut slow = QmpClient::negotiated(&kestrel.path("slow.sock"));
    slow.send(&r#"{"execute":"query-qmp-schema"}"#.repeat(REQUESTS));
    // A round trip on another monitor after the requests were sent: the event loop has read them by then (it
    // reads a client until it would block, and the slow client's bytes were there first).
    thread::sleep(Duration::from_millis(100));
    let mut probe = QmpClient::negotiated(&kestrel.path("probe.sock"));
    probe.send(r#"{"execute":"query-status"}"#);
    assert!(probe.line().get("return").is_some());

    kestrel.signal(libc::SIGTERM);
    let lines = slow.lines_until_closed();
    let Exit { stderr, .. } = kestrel.wait(TIMEOUT);
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
    let mut kestrel = ProbeVm::with_qmp_sockets("spin", &["q.sock"], &[]);
    let mut stuck = QmpClient::negotiated(&kestrel.path("q.sock"));
    stuck.send(&r#"{"execute":"query-qmp-schema"}"#.repeat(100));
    thread::sleep(Duration::from_millis(300));
    kestrel.signal(libc::SIGTERM);
    let Exit { stderr, elapsed, .. } = kestrel.wait(TIMEOUT);
    assert!(stderr.contains("terminating on signal 15"), "stderr: {stderr}");
    // The grace is 1 s; anything near TIMEOUT means the client held Kestrel.
    assert!(elapsed < Duration::from_secs(5), "exit took {elapsed:?}");
    drop(stuck);
}

/// Sends `resets` × `system_reset` in one write, then `signal` at once; Kestrel must exit on it promptly and tell
/// the client why.
fn signal_during_resets(resets: usize, signal: libc::c_int) {
    let mut kestrel = ProbeVm::with_qmp_sockets("spin", &["q.sock"], &[]);
    let mut client = QmpClient::negotiated(&kestrel.path("q.sock"));
    client.send(&r#"{"execute":"system_reset"}"#.repeat(resets));
    kestrel.signal(signal);
    let Exit { stderr, elapsed, .. } = kestrel.wait(TIMEOUT);
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
        let mut kestrel = ProbeVm::with_qmp_sockets("reset", &["q.sock"], &["--no-shutdown"]);
        thread::sleep(Duration::from_millis(delay_ms));
        kestrel.signal(libc::SIGTERM);
        let Exit { success, stderr, .. } = kestrel.wait(TIMEOUT);
        assert!(success && stderr.contains("terminating on signal 15"), "stderr: {stderr}");
    }
}

/// Starts kestrel waiting for its first client on `what` (`--qmp` or `--serial`), sends `signal` and expects a
/// prompt, clean exit: QEMU's message, and no socket file left behind.
fn signal_while_waiting(what: &str, signal: libc::c_int) {
    let mut kestrel = ProbeVm::spawn("hardening", "spin", |cmd, dir| {
        cmd.arg(what).arg(format!("unix:{},server=on", dir.join("wait.sock").display()));
        if what == "--qmp" {
            cmd.args(["--serial", "none"]);
        }
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    });
    let socket = kestrel.path("wait.sock");
    wait_for_path(&socket, TIMEOUT);
    // The socket exists before the wait starts; let it start.
    thread::sleep(Duration::from_millis(200));
    kestrel.signal(signal);
    let Exit { success, stderr, .. } = kestrel.wait(TIMEOUT);
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

#![cfg(target_arch = "x86_64")]

//! Save a running VM with QMP `migrate` to `file:PATH` and restore it into a new `kestrel` process with
//! `-incoming file:PATH` / `--restore PATH` (issue 16), on this machine's KVM with the repo's probe payload: its
//! `flood` command counts on the serial port forever, so the count must go on from where it stopped, without a
//! second boot banner. Plus the paused (`-S`) forms, 4 vCPUs with virtio devices on both transports, a save that
//! fails, and snapshot files that must be refused with one clear line.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{kestrel_command, kvm_available, payload};

const PVH: &str = "probe.pvh.elf";
const TIMEOUT: Duration = Duration::from_secs(20);
const BANNER: &str = "kestrel-probe: entry=";

/// A scratch directory for one test's files, removed at the end.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let dir = std::env::temp_dir().join(format!("kestrel-snap-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running kestrel with one QMP socket and its serial console in a file; killed if the test fails half-way.
struct Vm {
    child: Option<Child>,
    console: PathBuf,
    qmp: PathBuf,
}

impl Vm {
    /// The probe payload running `flood` with `extra` arguments, its console in `<name>.log`.
    fn start(dir: &Dir, name: &str, extra: &[&str]) -> Vm {
        let console = dir.path(&format!("{name}.log"));
        let qmp = dir.path(&format!("{name}.qmp"));
        let mut cmd = kestrel_command();
        cmd.args(["--kernel", payload(PVH).to_str().unwrap(), "--cmdline", "flood"]);
        cmd.arg("--serial").arg(format!("file:{}", console.display()));
        cmd.arg("--qmp").arg(format!("unix:{},server=on,wait=off", qmp.display()));
        cmd.args(extra).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut vm = Vm { child: Some(cmd.spawn().expect("starting kestrel")), console, qmp };
        let deadline = Instant::now() + TIMEOUT;
        while !vm.qmp.exists() {
            let child = vm.child.as_mut().unwrap();
            if child.try_wait().unwrap().is_some() {
                let output = vm.child.take().unwrap().wait_with_output().unwrap();
                panic!("kestrel exited at start: {}", String::from_utf8_lossy(&output.stderr));
            }
            assert!(Instant::now() < deadline, "QMP socket never appeared");
            thread::sleep(Duration::from_millis(2));
        }
        vm
    }

    fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// The console once it has stopped growing, for a paused guest: output the guest wrote before the pause
    /// still goes through kestrel's console writer (which batches for a few milliseconds) after the pause.
    fn settled_console(&self) -> String {
        let mut seen = self.console();
        loop {
            thread::sleep(Duration::from_millis(100));
            let now = self.console();
            if now == seen {
                return now;
            }
            seen = now;
        }
    }

    /// Waits until the guest has counted to at least `n` (in this process) and returns the count seen.
    fn wait_for_count(&self, n: u64) -> u64 {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(&last) = counts(&self.console()).last() {
                if last >= n {
                    return last;
                }
            }
            assert!(Instant::now() < deadline, "the guest never counted to {n}: {:?}", tail(&self.console()));
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn client(&self) -> Client {
        Client::negotiated(&self.qmp)
    }

    /// Quits over QMP and waits for the process; returns its stderr.
    fn quit(mut self) -> String {
        let mut client = self.client();
        client.execute(r#"{"execute": "quit"}"#);
        let child = self.child.take().unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "kestrel failed at quit: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stderr).into_owned()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The counts in complete `probe: flood N` lines, in order. A line cut by the save (its start in the source's
/// console, its end in the restored one's) is in neither.
/// The counts on the console's complete lines (a save or a quit may cut the last line short).
fn counts(console: &str) -> Vec<u64> {
    let complete = console.rsplit_once("\r\n").map_or("", |(lines, _unfinished)| lines);
    complete
        .split("\r\n")
        .filter_map(|line| line.strip_prefix("probe: flood "))
        .filter_map(|n| n.parse().ok())
        .collect()
}

fn tail(text: &str) -> &str {
    &text[text.len().saturating_sub(300)..]
}

/// A QMP client that collects the events before each reply.
struct Client {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Client {
    fn negotiated(path: &Path) -> Client {
        let stream = UnixStream::connect(path).expect("connecting to the QMP socket");
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut client = Client { writer: stream.try_clone().unwrap(), reader: BufReader::new(stream) };
        client.line();
        let (_, reply) = client.execute(r#"{"execute": "qmp_capabilities"}"#);
        assert_eq!(reply, json!({"return": {}}));
        client
    }

    fn line(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("reading from the QMP socket");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
    }

    fn execute(&mut self, command: &str) -> (Vec<Value>, Value) {
        self.writer.write_all(command.as_bytes()).unwrap();
        let mut events = Vec::new();
        loop {
            let line = self.line();
            if line.get("event").is_some() {
                events.push(line);
            } else {
                return (events, line);
            }
        }
    }

    fn status(&mut self) -> String {
        let (_, reply) = self.execute(r#"{"execute": "query-status"}"#);
        reply["return"]["status"].as_str().unwrap().to_string()
    }

    /// `migrate` to `path`; returns the events as (name, MIGRATION status or "") pairs.
    fn migrate(&mut self, path: &Path) -> Vec<(String, String)> {
        let command = json!({"execute": "migrate", "arguments": {"uri": format!("file:{}", path.display())}});
        let (events, reply) = self.execute(&command.to_string());
        assert_eq!(reply, json!({"return": {}}), "{events:?}");
        events
            .iter()
            .map(|e| {
                let name = e["event"].as_str().unwrap().to_string();
                (name, e["data"]["status"].as_str().unwrap_or_default().to_string())
            })
            .collect()
    }
}

fn events(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
}

/// Runs kestrel to restore `snapshot` with `extra` arguments; the restored VM.
fn restore(dir: &Dir, name: &str, snapshot: &Path, spelling: &str, extra: &[&str]) -> Vm {
    let incoming = match spelling {
        "-incoming" => format!("file:{}", snapshot.display()),
        _ => snapshot.display().to_string(),
    };
    let mut args = vec![spelling, &incoming];
    args.extend_from_slice(extra);
    Vm::start(dir, name, &args)
}

/// The count goes on across the save exactly where it stopped: the source's console up to the save, followed by
/// the restored guest's, reads as one unbroken count (a line the save cut short is finished by the restored guest,
/// even between its "\r" and "\n"), and the restored guest counted on and did not boot again.
fn assert_count_continues(source: &str, restored: &str) {
    let restored_counts = counts(restored);
    assert!(restored_counts.len() > 1, "the restored guest did not count on: {:?}", tail(restored));
    assert!(!restored.contains(BANNER), "the restored guest booted again: {:?}", tail(restored));
    let joined = format!("{source}{restored}");
    let all = counts(&joined);
    if let Some(at) = all.windows(2).position(|w| w[1] != w[0] + 1) {
        panic!(
            "the count breaks at {} -> {}: the source ended {:?}, the restored guest began {:?}",
            all[at],
            all[at + 1],
            tail(source),
            &restored[..restored.len().min(300)]
        );
    }
}

fn save_and_restore(name: &str, machine: &[&str], spelling: &str) {
    if !kvm_available() {
        return;
    }
    let dir = Dir::new(name);
    let snapshot = dir.path("vm.ksnap");
    let source = Vm::start(&dir, "source", machine);
    source.wait_for_count(200);
    let mut qmp = source.client();
    let seen = qmp.migrate(&snapshot);
    let expected = events(&[("MIGRATION", "setup"), ("MIGRATION", "active"), ("STOP", ""), ("MIGRATION", "completed")]);
    assert_eq!(seen, expected);
    assert_eq!(qmp.status(), "postmigrate");
    let (_, info) = qmp.execute(r#"{"execute": "query-migrate"}"#);
    assert_eq!(info["return"]["status"], "completed", "{info}");
    assert!(info["return"]["ram"]["normal"].as_u64().unwrap() > 0, "{info}");
    assert_eq!(info["return"]["ram"]["transferred"], std::fs::metadata(&snapshot).unwrap().len(), "{info}");
    drop(qmp);
    let source_console = source.settled_console();
    source.quit();

    let restored = restore(&dir, "restored", &snapshot, spelling, machine);
    let last = *counts(&source_console).last().unwrap();
    restored.wait_for_count(last + 500);
    assert_eq!(restored.client().status(), "running");
    assert_count_continues(&source_console, &restored.console());
    restored.quit();
}

#[test]
fn a_counting_guest_counts_on_in_a_new_process() {
    save_and_restore("one-vcpu", &["--memory", "64M"], "-incoming");
}

#[test]
fn four_vcpus_with_virtio_pci_disk_console_and_rng_restore() {
    let dir = Dir::new("four-disk");
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let disk = format!("path={}", disk.display());
    let console = format!("file:{}", dir.path("hvc0.log").display());
    let args = ["--memory", "64M", "--cpus", "4", "--disk", &disk, "--console", &console, "--rng"];
    save_and_restore("four-vcpus-pci", &args, "--restore");
}

#[test]
fn the_microvm_transport_restores() {
    let dir = Dir::new("microvm-disk");
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let disk = format!("path={}", disk.display());
    let args = ["--memory", "64M", "--machine", "microvm", "--disk", &disk, "--rng"];
    save_and_restore("microvm", &args, "-incoming");
}

#[test]
fn a_paused_save_restores_paused_until_cont_and_the_source_can_go_on() {
    if !kvm_available() {
        return;
    }
    let dir = Dir::new("paused");
    let snapshot = dir.path("vm.ksnap");
    let source = Vm::start(&dir, "source", &["--memory", "64M"]);
    source.wait_for_count(100);
    let mut qmp = source.client();
    qmp.execute(r#"{"execute": "stop"}"#);
    let seen = qmp.migrate(&snapshot);
    assert_eq!(seen, events(&[("MIGRATION", "setup"), ("MIGRATION", "active"), ("MIGRATION", "completed")]));
    assert_eq!(qmp.status(), "postmigrate");
    let saved_console = source.settled_console();
    let last = *counts(&saved_console).last().unwrap();
    // `cont` resumes the source.
    let (resumed, _) = qmp.execute(r#"{"execute": "cont"}"#);
    assert_eq!(resumed[0]["event"], "RESUME");
    source.wait_for_count(last + 100);
    drop(qmp);
    source.quit();

    let restored = restore(&dir, "restored", &snapshot, "-incoming", &["--memory", "64M", "-S"]);
    let mut qmp = restored.client();
    assert_eq!(qmp.status(), "paused");
    thread::sleep(Duration::from_millis(200));
    assert_eq!(counts(&restored.console()), Vec::<u64>::new(), "the guest ran before cont");
    let (resumed, _) = qmp.execute(r#"{"execute": "cont"}"#);
    assert_eq!(resumed[0]["event"], "RESUME");
    restored.wait_for_count(last + 100);
    assert_count_continues(&saved_console, &restored.console());
    drop(qmp);
    restored.quit();
}

#[test]
fn a_save_that_cannot_be_written_fails_and_the_guest_runs_on() {
    if !kvm_available() {
        return;
    }
    let dir = Dir::new("unwritable");
    let source = Vm::start(&dir, "source", &["--memory", "64M"]);
    source.wait_for_count(50);
    let mut qmp = source.client();
    let seen = qmp.migrate(Path::new("/nonexistent-dir/vm.ksnap"));
    let expected = events(&[
        ("MIGRATION", "setup"),
        ("MIGRATION", "active"),
        ("STOP", ""),
        ("MIGRATION", "failed"),
        ("RESUME", ""),
    ]);
    assert_eq!(seen, expected);
    assert_eq!(qmp.status(), "running");
    let (_, info) = qmp.execute(r#"{"execute": "query-migrate"}"#);
    assert_eq!(info["return"]["status"], "failed", "{info}");
    assert!(info["return"]["error-desc"].as_str().unwrap().contains("/nonexistent-dir/vm.ksnap"), "{info}");
    let last = *counts(&source.console()).last().unwrap();
    source.wait_for_count(last + 100);
    // A URI Kestrel cannot use is an error reply, with nothing started.
    let (events, reply) = qmp.execute(r#"{"execute": "migrate", "arguments": {"uri": "tcp:127.0.0.1:4444"}}"#);
    assert!(events.is_empty() && reply["error"]["desc"].as_str().unwrap().contains("file:PATH"), "{reply}");
    drop(qmp);
    source.quit();
}

/// Runs kestrel restoring `snapshot` and expects a refusal: a non-zero exit, one line on stderr containing
/// `expected`, and no guest output.
fn assert_refused(dir: &Dir, snapshot: &Path, extra: &[&str], expected: &str) {
    let console = dir.path("refused.log");
    let _ = std::fs::remove_file(&console);
    let mut cmd = kestrel_command();
    cmd.args(["--kernel", payload(PVH).to_str().unwrap(), "--cmdline", "flood"]);
    cmd.arg("--serial").arg(format!("file:{}", console.display()));
    cmd.arg("-incoming").arg(format!("file:{}", snapshot.display()));
    cmd.args(extra).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    let output = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "a bad snapshot was accepted ({extra:?}): {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "not one line: {stderr}");
    assert!(stderr.contains(expected), "expected {expected:?} in: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(std::fs::read_to_string(&console).unwrap_or_default().is_empty(), "the guest ran");
}

#[test]
fn hostile_and_mismatched_snapshots_are_refused_with_one_line() {
    if !kvm_available() {
        return;
    }
    let dir = Dir::new("hostile");
    let snapshot = dir.path("vm.ksnap");
    let source = Vm::start(&dir, "source", &["--memory", "64M"]);
    source.wait_for_count(10);
    source.client().migrate(&snapshot);
    source.quit();
    let bytes = std::fs::read(&snapshot).unwrap();

    // The command line disagrees with the file.
    assert_refused(&dir, &snapshot, &["--memory", "128M"], "guest memory");
    assert_refused(&dir, &snapshot, &["--memory", "64M", "--cpus", "2"], "vcpu.1");
    assert_refused(&dir, &snapshot, &["--memory", "64M", "--rng"], "virtio-rng");
    assert_refused(&dir, &snapshot, &["--memory", "64M", "--machine", "microvm"], "machine type");

    // The file is damaged.
    let truncated = dir.path("truncated.ksnap");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert_refused(&dir, &truncated, &["--memory", "64M"], "truncated");
    let garbage = dir.path("garbage.ksnap");
    std::fs::write(&garbage, b"this is not a snapshot at all, just some bytes".repeat(100)).unwrap();
    assert_refused(&dir, &garbage, &["--memory", "64M"], "not a Kestrel snapshot");
    let mut flipped = bytes.clone();
    let last_page = flipped.len() - 4096;
    flipped[last_page] ^= 0xff;
    let corrupted = dir.path("corrupted.ksnap");
    std::fs::write(&corrupted, &flipped).unwrap();
    assert_refused(&dir, &corrupted, &["--memory", "64M"], "corrupted");
    assert_refused(&dir, &dir.path("missing.ksnap"), &["--memory", "64M"], "missing.ksnap");
}

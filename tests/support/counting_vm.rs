//! A `kestrel` running the probe payload's `flood` command, which counts on the serial port forever: what the
//! save/restore tests (issue 16) save in one process and restore in another, checking that the count goes on from
//! where it stopped without a second boot banner.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;

use super::qmp::QmpClient;
use super::{kestrel_command, payload};

pub const PVH: &str = "probe.pvh.elf";
/// Loaded at 1 MiB (the PVH and ELF shapes at 16 MiB), so it runs in Kestrel's smallest guest memory.
pub const BZIMAGE: &str = "probe.bzImage";
/// For the guest to count, and kestrel to start: generous for a loaded machine, but a hang still fails.
pub const TIMEOUT: Duration = Duration::from_secs(20);
pub const BANNER: &str = "kestrel-probe: entry=";

/// A scratch directory for one test's files, removed at the end.
pub struct Dir(PathBuf);

impl Dir {
    pub fn new(name: &str) -> Dir {
        let dir = std::env::temp_dir().join(format!("kestrel-snap-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running kestrel with one QMP socket and its serial console in a file; killed if the test fails half-way.
pub struct Vm {
    child: Option<Child>,
    console: PathBuf,
    qmp: PathBuf,
}

impl Vm {
    /// The probe payload running `flood` with `extra` arguments, its console in `<name>.log`.
    pub fn start(dir: &Dir, name: &str, extra: &[&str]) -> Vm {
        Vm::start_with(dir, name, extra, |_| {})
    }

    /// `start`, with the command adjusted by `configure` first (descriptors it inherits, say).
    pub fn start_with(dir: &Dir, name: &str, extra: &[&str], configure: impl FnOnce(&mut Command)) -> Vm {
        let mut cmd = flood_command(dir, name, extra);
        configure(&mut cmd);
        Vm::spawn(cmd, dir, name)
    }

    /// `start` with the payload's `kernel` shape ([`PVH`], [`BZIMAGE`]).
    pub fn start_kernel(dir: &Dir, name: &str, kernel: &str, extra: &[&str]) -> Vm {
        Vm::spawn(flood_command_of(kernel, dir, name, extra), dir, name)
    }

    /// Runs `cmd` (a [`flood_command`]) and waits for its QMP socket.
    fn spawn(mut cmd: Command, dir: &Dir, name: &str) -> Vm {
        let (console, qmp) = (dir.path(&format!("{name}.log")), dir.path(&format!("{name}.qmp")));
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

    /// The kestrel process's id, to look at it in /proc.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the process runs").id()
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// The console once it has stopped growing, for a paused guest: output the guest wrote before the pause
    /// still goes through kestrel's console writer (which batches for a few milliseconds) after the pause.
    pub fn settled_console(&self) -> String {
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
    pub fn wait_for_count(&self, n: u64) -> u64 {
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

    /// A negotiated QMP client.
    pub fn client(&self) -> QmpClient {
        QmpClient::negotiated(&self.qmp)
    }

    /// Quits over QMP and waits for the process; returns its stderr.
    pub fn quit(mut self) -> String {
        let mut client = self.client();
        client.execute(r#"{"execute": "quit"}"#);
        let child = self.child.take().unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "kestrel failed at quit: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stderr).into_owned()
    }

    /// Waits (at most [`TIMEOUT`]) for kestrel to exit on its own; its status and output.
    pub fn wait_for_exit(mut self) -> Output {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + TIMEOUT;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("kestrel did not exit");
            }
            thread::sleep(Duration::from_millis(10));
        }
        child.wait_with_output().unwrap()
    }
}

/// The command `Vm::start` runs: the payload counting, its console in `<name>.log`, QMP on `<name>.qmp`.
pub fn flood_command(dir: &Dir, name: &str, extra: &[&str]) -> Command {
    flood_command_of(PVH, dir, name, extra)
}

/// `flood_command` with the payload's `kernel` shape.
pub fn flood_command_of(kernel: &str, dir: &Dir, name: &str, extra: &[&str]) -> Command {
    let mut cmd = kestrel_command();
    cmd.args(["--kernel", payload(kernel).to_str().unwrap(), "--cmdline", "flood"]);
    cmd.arg("--serial").arg(format!("file:{}", dir.path(&format!("{name}.log")).display()));
    cmd.arg("--qmp").arg(format!("unix:{},server=on,wait=off", dir.path(&format!("{name}.qmp")).display()));
    cmd.args(extra).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    cmd
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The counts on the console's complete `probe: flood N` lines, in order (a save or a quit may cut the last line
/// short; a line cut by the save, its start in the source's console and its end in the restored one's, is in
/// neither).
pub fn counts(console: &str) -> Vec<u64> {
    let complete = console.rsplit_once("\r\n").map_or("", |(lines, _unfinished)| lines);
    complete
        .split("\r\n")
        .filter_map(|line| line.strip_prefix("probe: flood "))
        .filter_map(|n| n.parse().ok())
        .collect()
}

pub fn tail(text: &str) -> &str {
    &text[text.len().saturating_sub(300)..]
}

/// The count goes on across the save exactly where it stopped: the source's console up to the save, followed by
/// the restored guest's, reads as one unbroken count (a line the save cut short is finished by the restored guest,
/// even between its "\r" and "\n"), and the restored guest counted on and did not boot again.
pub fn assert_count_continues(source: &str, restored: &str) {
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

/// Turns on the `events` migration capability, as libvirt does at every start: `MIGRATION` events are sent only
/// then, as in QEMU.
pub fn enable_migration_events(client: &mut QmpClient) {
    let command = json!({"execute": "migrate-set-capabilities",
                         "arguments": {"capabilities": [{"capability": "events", "state": true}]}});
    let (_, reply) = client.execute(&command.to_string());
    assert_eq!(reply, json!({"return": {}}));
}

/// `migrate` to `uri`, which must be accepted; the events before the reply as (name, MIGRATION status or "").
pub fn migrate(client: &mut QmpClient, uri: &str) -> Vec<(String, String)> {
    let command = json!({"execute": "migrate", "arguments": {"uri": uri}});
    let (events, reply) = client.execute(&command.to_string());
    assert_eq!(reply, json!({"return": {}}), "{events:?}");
    event_names(&events)
}

/// Events as (name, MIGRATION status or "") pairs.
pub fn event_names(events: &[serde_json::Value]) -> Vec<(String, String)> {
    events
        .iter()
        .map(|e| {
            let name = e["event"].as_str().unwrap().to_string();
            (name, e["data"]["status"].as_str().unwrap_or_default().to_string())
        })
        .collect()
}

pub fn events(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
}

/// The events of a save of a running guest, with `events` on.
pub fn running_save_events() -> Vec<(String, String)> {
    events(&[("MIGRATION", "setup"), ("MIGRATION", "active"), ("STOP", ""), ("MIGRATION", "completed")])
}

/// Where a check of `path` should name it.
pub fn file_uri(path: &Path) -> String {
    format!("file:{}", path.display())
}

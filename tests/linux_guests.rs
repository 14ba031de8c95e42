//! Real Linux guests: Debian's cloud kernel with a busybox initramfs, booted by Kestrel inside the emulated
//! runners: `ci/runner/x86_64` (QEMU TCG with AMD SVM as L1, nested KVM, a static kestrel inside) and
//! `ci/runner/aarch64` (QEMU TCG virt with EL2 and a GICv3 as L1, the trixie cloud arm64 kernel's KVM, a static
//! aarch64 kestrel inside).
//!
//! Each runner boots L1 once for every case of `ci/runner/linux.cases` for its architecture; each test here
//! checks one case's framed result from that L1's console (the `aarch64_` tests from the aarch64 runner's).
//! Where a runner cannot run (no QEMU, no Debian archive), the tests fail under CI or with
//! KESTREL_REQUIRE_RUNNER=1, and otherwise print SKIPPED with the reason.
//!
//! A case whose guest died in early boot with a known signature of the emulated environment (a hang or triple
//! fault before /init; see `ci/runner/compare-qemu`), or that timed out while L1 itself stalled for 10 s or more,
//! is run again by L1, up to twice, and judged on the last attempt; a case during which L1 itself stopped is run
//! by a new L1. Every such retry is printed as
//! `RETRIED: <case> first attempt: <signature>` on the test binary's stderr, outside the test harness's capture,
//! so it is never silent.
//!
//! The runners run one at a time: two TCG L1s sharing a two-core machine slow each other down, and the emulated
//! environment's early-boot faults grow more frequent with load.
#![cfg(target_arch = "x86_64")]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// One case's result as L1 printed it.
#[derive(Debug, Default)]
struct Case {
    /// The guest's serial console (kestrel's stdout), \r removed.
    console: String,
    stderr: String,
    /// The END line's fields: exit, reason, ms, marker_ms, l1_epoch_start, l1_epoch_end.
    end: HashMap<String, String>,
    /// The first attempt's early-boot failure signature when L1 ran the case a second time.
    retry: Option<String>,
    /// Each phase's time against its budget (boot 1, boot 2, the work after boot 1), as L1 measured them: the
    /// budgets are multiples of boots measured in L1 (ci/runner/case-loop.sh).
    timing: Vec<String>,
}

struct Runner {
    log: PathBuf,
    cases: HashMap<String, Case>,
    /// The runner's own summary (PASS/FAIL lines, timings).
    summary: String,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The emulated runners, by the architecture of L1 and of the guests (`ci/runner/<arch>`).
#[derive(Clone, Copy, Debug)]
enum Arch {
    X86_64,
    Aarch64,
}

impl Arch {
    fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }
}

/// Runs the architecture's runner once for all its cases. `None`: it could not run here (and that is allowed).
fn runner(arch: Arch) -> Option<&'static Runner> {
    static X86_64: OnceLock<Result<Runner, String>> = OnceLock::new();
    static AARCH64: OnceLock<Result<Runner, String>> = OnceLock::new();
    let once = match arch {
        Arch::X86_64 => &X86_64,
        Arch::Aarch64 => &AARCH64,
    };
    // One L1 at a time (see the module's documentation); the lock is only held while a runner runs.
    static ONE_L1_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let result = once.get_or_init(|| {
        let _running = ONE_L1_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        run_runner(arch)
    });
    match result {
        Ok(runner) => Some(runner),
        Err(reason) => {
            let required = std::env::var_os("CI").is_some() || std::env::var_os("KESTREL_REQUIRE_RUNNER").is_some();
            assert!(
                !required,
                "the emulated runner is required here (CI or KESTREL_REQUIRE_RUNNER is set) but {reason}"
            );
            eprintln!("SKIPPED: {reason}; set KESTREL_REQUIRE_RUNNER=1 to make this a failure");
            None
        }
    }
}

fn run_runner(arch: Arch) -> Result<Runner, String> {
    let log = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("linux-guests-console-{}.log", arch.name()));
    let _ = std::fs::remove_file(&log);
    let script = repo().join("ci/runner").join(arch.name());
    let start = Instant::now();
    let mut child = Command::new("bash")
        .arg(&script)
        .arg(repo().join("ci/runner/linux.cases"))
        .env("KESTREL_RUNNER_LOG", &log)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", script.display()))?;
    // The runner's progress (its stderr: what it builds, each case as it ends, L1 restarts) goes to this
    // process's stderr as it comes, outside the harness's capture, so a CI log shows how far a slow or stopped
    // runner got; it is kept for the summary too.
    let progress = child.stderr.take().expect("stderr was piped");
    let echo = std::thread::spawn(move || {
        let mut kept = String::new();
        for line in BufReader::new(progress).lines().map_while(Result::ok) {
            let _ = writeln!(std::io::stderr(), "{line}");
            kept.push_str(&line);
            kept.push('\n');
        }
        kept
    });
    let output = child.wait_with_output().map_err(|e| format!("cannot wait for {}: {e}", script.display()))?;
    let stderr = echo.join().unwrap_or_default();
    let summary = format!(
        "{}{}(runner exit status {}, {:.1} s)",
        String::from_utf8_lossy(&output.stdout),
        stderr,
        output.status,
        start.elapsed().as_secs_f64()
    );
    eprintln!("{summary}");
    let console = std::fs::read(&log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    // Exit status 2 is the runner's "could not set up" (no QEMU, no artifacts, no build); without L1 coming up
    // there is nothing to judge either.
    if output.status.code() == Some(2) || !console.contains("=== RUNNER L1-UP") {
        return Err(format!("the runner could not run:\n{summary}"));
    }
    let cases = parse(&console);
    let mut retried: Vec<_> = cases.iter().filter_map(|(name, c)| Some((name, c.retry.as_ref()?))).collect();
    retried.sort();
    for (name, signature) in retried {
        // Straight to the process's stderr: the harness captures eprintln! of passing tests.
        let _ = writeln!(std::io::stderr(), "RETRIED: {name} first attempt: {signature}");
    }
    Ok(Runner { cases, log, summary })
}

/// Splits L1's console into cases by the runner's frames.
fn parse(console: &str) -> HashMap<String, Case> {
    enum Part {
        None,
        Out,
        Err,
    }
    let mut cases: HashMap<String, Case> = HashMap::new();
    let mut retries: HashMap<String, String> = HashMap::new();
    let mut current: Option<String> = None;
    let mut part = Part::None;
    for raw in console.lines() {
        let line = raw.replace('\r', "");
        if let Some(rest) = frame(&line) {
            if let Some((name, signature)) = rest.split_once(" RETRY first attempt: ") {
                retries.insert(name.to_string(), signature.to_string());
                current = None;
                part = Part::None;
                continue;
            }
            if let Some(name) = rest.strip_suffix(" BEGIN") {
                current = Some(name.to_string());
                cases.insert(name.to_string(), Case { retry: retries.remove(name), ..Case::default() });
                part = Part::Out;
                continue;
            }
            if let Some(name) = rest.strip_suffix(" STDERR") {
                current = Some(name.to_string());
                part = Part::Err;
                continue;
            }
            if let Some((name, text)) = rest.split_once(" TIMING ") {
                if let Some(case) = cases.get_mut(name) {
                    case.timing.push(text.to_string());
                }
                continue;
            }
            if let Some((name, fields)) = rest.split_once(" END ") {
                if let Some(case) = cases.get_mut(name) {
                    case.end = fields
                        .split_whitespace()
                        .filter_map(|f| f.split_once('='))
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect();
                }
                current = None;
                part = Part::None;
                continue;
            }
        }
        if let Some(case) = current.as_ref().and_then(|n| cases.get_mut(n)) {
            let text = match part {
                Part::Out => &mut case.console,
                Part::Err => &mut case.stderr,
                Part::None => continue,
            };
            text.push_str(&line);
            text.push('\n');
        }
    }
    cases
}

/// "=== CASE <rest>" anywhere in the line (L1's console may prefix terminal escapes).
fn frame(line: &str) -> Option<&str> {
    line.find("=== CASE ").map(|i| &line[i + "=== CASE ".len()..])
}

/// A case that finished, or the test fails saying why.
struct Checked<'a> {
    arch: Arch,
    name: &'static str,
    case: &'a Case,
    runner: &'a Runner,
}

impl Checked<'_> {
    fn describe(&self) -> String {
        let tail = |s: &str| {
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        format!(
            "{} case {}: {:?}{}\n--- time against budget ---\n{}\n--- guest console (last 40 lines) ---\n{}\n\
             --- kestrel stderr (last 40 lines) ---\n{}\n--- runner ---\n{}\nfull L1 console: {}",
            self.arch.name(),
            self.name,
            self.case.end,
            self.case
                .retry
                .as_ref()
                .map(|s| format!("\nRETRIED (this is the second attempt); first attempt: {s}"))
                .unwrap_or_default(),
            self.case.timing.join("\n"),
            tail(&self.case.console),
            tail(&self.case.stderr),
            self.runner.summary,
            self.runner.log.display()
        )
    }

    fn field(&self, key: &str) -> &str {
        self.case.end.get(key).map(String::as_str).unwrap_or("?")
    }

    #[track_caller]
    fn assert(&self, ok: bool, what: &str) {
        assert!(ok, "{what}\n{}", self.describe());
    }

    #[track_caller]
    fn assert_exited(&self, code: i32) {
        self.assert(
            self.field("reason") == "exit" && self.field("exit") == code.to_string(),
            &format!(
                "kestrel should exit {code} by itself; it ended with reason={} exit={}",
                self.field("reason"),
                self.field("exit")
            ),
        );
    }

    fn marker_count(&self) -> usize {
        self.case.console.lines().filter(|l| l.starts_with("KESTREL-GUEST-UP")).count()
    }

    #[track_caller]
    fn assert_marker(&self) {
        self.assert(self.marker_count() >= 1, "the guest never printed KESTREL-GUEST-UP");
    }

    /// The integer the guest printed as KEY=<n>.
    #[track_caller]
    fn value(&self, key: &str) -> u64 {
        let prefix = format!("{key}=");
        let found = self.case.console.lines().find_map(|l| l.strip_prefix(prefix.as_str())?.trim().parse().ok());
        match found {
            Some(v) => v,
            None => panic!("the guest did not print {key}=<number>\n{}", self.describe()),
        }
    }
}

/// The result of case `name` on the runner of `arch`, or None when that runner could not run here.
#[track_caller]
fn case(arch: Arch, name: &'static str) -> Option<Checked<'static>> {
    let runner = runner(arch)?;
    let Some(case) = runner.cases.get(name) else {
        panic!(
            "the {} runner has no result for case {name}: L1 did not get to it\n{}\nfull L1 console: {}",
            arch.name(),
            runner.summary,
            runner.log.display()
        );
    };
    let checked = Checked { arch, name, case, runner };
    checked.assert(!case.end.is_empty(), "the case has no END line: L1 stopped during it");
    Some(checked)
}

impl Checked<'_> {
    #[track_caller]
    fn assert_line(&self, prefix: &str) {
        let found = self.case.console.lines().any(|l| l.trim_end().starts_with(prefix));
        self.assert(found, &format!("the guest console has no line starting with {prefix:?}"));
    }
}

// The checks, each shared by the runners whose case lists have the case.

#[track_caller]
fn check_boots(c: Checked) {
    c.assert_marker();
    c.assert_exited(0);
}

#[track_caller]
fn check_nproc(c: Checked, vcpus: u64, why: &str) {
    c.assert_marker();
    let n = c.value("NPROC");
    c.assert(n == vcpus, &format!("nproc {n}, expected {vcpus}{why}"));
    c.assert_exited(0);
}

/// MemTotal excludes what the kernel keeps for itself (its image, the memmap, reservations), so it is a bit
/// below the RAM size, but never above it.
#[track_caller]
fn assert_memtotal(c: &Checked, ram_kib: u64, min_fraction: f64) {
    let kib = c.value("MEMTOTAL_KB");
    c.assert(
        kib <= ram_kib && kib as f64 >= ram_kib as f64 * min_fraction,
        &format!("MemTotal {kib} kB, expected between {:.0} and {ram_kib} kB", ram_kib as f64 * min_fraction),
    );
}

#[track_caller]
fn check_rtc(c: Checked) {
    let start: u64 = c.field("l1_epoch_start").parse().unwrap_or(0);
    let end: u64 = c.field("l1_epoch_end").parse().unwrap_or(0);
    for key in ["RTC_EPOCH", "DATE_EPOCH"] {
        let t = c.value(key);
        c.assert(
            t + 5 >= start && t <= end + 5,
            &format!("{key}={t}, but L1's clock read {start}..{end} during the case (5 s allowed)"),
        );
    }
}

#[track_caller]
fn check_serial_echo(c: Checked) {
    c.assert(c.case.console.lines().any(|l| l == "ECHO-READY"), "the guest never got to its prompt");
    // Each typed line comes back on its own ("q" too), but the guest's tty echoes "q" when it arrives, which can
    // be while the shell is still printing the first line: that line may have the echoed "q" after it.
    c.assert(
        c.case.console.lines().any(|l| l.trim_end().starts_with("ECHO:hello-kestrel")),
        "the line typed on kestrel's stdin did not come back from the guest",
    );
    c.assert(
        c.case.console.lines().any(|l| l.trim_end() == "ECHO:q"),
        "the guest did not read the second typed line on its own",
    );
    // "q" ends the guest's loop and powers it off.
    c.assert_exited(0);
}

#[track_caller]
fn check_poweroff(c: Checked) {
    c.assert_marker();
    c.assert_exited(0);
    c.assert(c.marker_count() == 1, "the guest booted more than once");
}

#[track_caller]
fn check_reboot(c: Checked) {
    // The guest reboots forever; the runner stops kestrel once the second boot printed its marker.
    c.assert(
        c.field("reason") == "until" && c.marker_count() >= 2,
        &format!("expected a second boot; saw {} marker(s), reason={}", c.marker_count(), c.field("reason")),
    );
}

#[track_caller]
fn check_no_reboot(c: Checked) {
    c.assert_marker();
    c.assert_exited(0);
    c.assert(c.marker_count() == 1, "with --no-reboot the guest must not boot again");
}

#[track_caller]
fn check_powerdown(c: Checked) {
    c.assert_marker();
    c.assert_line("POWER-BUTTON-READY");
    c.assert_line("POWER-BUTTON-PRESSED");
    c.assert(c.case.stderr.contains("\"event\": \"POWERDOWN\""), "QMP sent the POWERDOWN event");
    // The same QMP session asked what it talks to: the runner's architecture, in the target and each vCPU.
    let arch = c.arch.name();
    c.assert(
        c.case.stderr.contains(&format!("{{\"return\": {{\"arch\": \"{arch}\"}}}}")),
        "query-target names the arch",
    );
    c.assert(c.case.stderr.contains(&format!("\"target\": \"{arch}\"")), "query-cpus-fast names the arch");
    c.assert_exited(0);
}

/// The disk half of the guest's `virtio` action: a writable disk written by the guest and hashed by the host, a
/// read-only one prepared by the host.
#[track_caller]
fn check_virtio_disks(c: &Checked) {
    c.assert_marker();
    c.assert_line("VDA-WRITE-OK");
    c.assert_line("VDB-WRITE-REFUSED");
    c.assert_line("VDB-RO=1");
    c.assert_line("VDB-HEAD=5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a");
    c.assert_line("VDA-SERIAL=kestrel-data");
    // The host sees exactly what the guest wrote, and nothing on the read-only disk changed.
    let expected = |pattern: u8, pattern_len: usize, total: usize| {
        let mut image = vec![pattern; pattern_len];
        image.resize(total, 0);
        sha256_hex(&image)
    };
    c.assert_line(&format!("DISK-SHA256 data.img {}", expected(0xa5, 1 << 20, 8 << 20)));
    c.assert_line(&format!("DISK-SHA256 ro.img {}", expected(0x5a, 4 << 20, 4 << 20)));
}

#[track_caller]
fn check_virtio_console(c: Checked) {
    // kestrel's stdout is the guest's hvc0 only: the serial console (and the boot marker) went to a file.
    c.assert_line("HVC-READY");
    c.assert_line("HVC-ECHO:hello over virtio-console");
    c.assert_exited(0);
}

#[track_caller]
fn check_virtio_net(c: Checked) {
    assert_network(&c, "52:54:00:12:34:99");
    c.assert_exited(0);
}

/// The guest action `net`'s checks against the netns-http side: ping, a download and an upload whose hashes match.
#[track_caller]
fn assert_network(c: &Checked, mac: &str) {
    c.assert_marker();
    c.assert_line(&format!("NET-MAC={mac}"));
    c.assert_line("PING-OK");
    c.assert_line("UPLOAD-DONE");
    // Each file's hash on the receiving side is the one the sending side computed.
    let text = |key: &str| {
        let prefix = format!("{key}=");
        let found = c.case.console.lines().find_map(|l| l.trim_end().strip_prefix(prefix.as_str()));
        let value = found.unwrap_or_else(|| panic!("the console has no {key}= line\n{}", c.describe()));
        c.assert(value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit()), &format!("{key}={value}"));
        value.to_string()
    };
    c.assert(text("DOWNLOAD-SHA256") == text("NETNS-SERVED-SHA256"), "the guest downloaded what httpd served");
    c.assert(text("UPLOAD-SHA256") == text("NETNS-RECEIVED-SHA256"), "L1 received what the guest uploaded");
    c.assert(c.value("NETNS-RECEIVED-BYTES") == 2 << 20, "L1 received all 2 MiB");
}

// x86_64: ci/runner/x86_64.

#[test]
fn bzimage_boots_and_prints_the_marker() {
    let Some(c) = case(Arch::X86_64, "bzimage") else { return };
    check_boots(c);
}

#[test]
fn pvh_elf_vmlinux_boots() {
    let Some(c) = case(Arch::X86_64, "pvh-vmlinux") else { return };
    check_boots(c);
}

#[test]
fn nproc_is_1_with_one_vcpu() {
    let Some(c) = case(Arch::X86_64, "nproc-1") else { return };
    check_nproc(c, 1, "");
}

#[test]
fn nproc_is_4_with_four_vcpus() {
    let Some(c) = case(Arch::X86_64, "nproc-4") else { return };
    check_nproc(c, 4, " (the cloud kernel finds APs only in the ACPI MADT)");
}

#[test]
fn memtotal_matches_512m() {
    let Some(c) = case(Arch::X86_64, "memory-512m") else { return };
    assert_memtotal(&c, 512 * 1024, 0.84);
}

#[test]
fn memtotal_matches_5g_above_the_4g_boundary() {
    let Some(c) = case(Arch::X86_64, "memory-5g") else { return };
    // More than 4 GiB: the RAM above the 32-bit PCI hole must be there.
    assert_memtotal(&c, 5 * 1024 * 1024, 0.915);
}

#[test]
fn rtc_reads_within_seconds_of_the_l1_clock() {
    let Some(c) = case(Arch::X86_64, "rtc") else { return };
    check_rtc(c);
}

#[test]
fn serial_input_is_echoed() {
    let Some(c) = case(Arch::X86_64, "serial-echo") else { return };
    check_serial_echo(c);
}

#[test]
fn poweroff_exits_0() {
    let Some(c) = case(Arch::X86_64, "poweroff") else { return };
    check_poweroff(c);
}

#[test]
fn reboot_comes_back_up() {
    let Some(c) = case(Arch::X86_64, "reboot") else { return };
    check_reboot(c);
}

#[test]
fn reboot_with_no_reboot_ends_the_process() {
    let Some(c) = case(Arch::X86_64, "no-reboot") else { return };
    check_no_reboot(c);
}

#[test]
fn system_powerdown_makes_linux_power_off() {
    let Some(c) = case(Arch::X86_64, "powerdown") else { return };
    check_powerdown(c);
}

/// Linux's virtio_balloon under QMP `balloon`: the target went down by 64 MiB of the guest's 256, the driver
/// inflated, the guest's MemTotal fell by as much, and BALLOON_CHANGE followed it to 192 MiB; before that,
/// `query-balloon` reported all of RAM and `guest-stats` the driver's first report, and statistics were polled
/// every second meanwhile.
#[test]
fn virtio_balloon_takes_memory_from_a_linux_guest_under_qmp() {
    let Some(c) = case(Arch::X86_64, "balloon") else { return };
    c.assert_marker();
    c.assert_line("BALLOON-DRIVERS=1");
    let before = c.value("BALLOON-MEMTOTAL-BEFORE-KB");
    let after = c.value("BALLOON-MEMTOTAL-AFTER-KB");
    c.assert(after + 64 * 1024 <= before, &format!("MemTotal went from {before} kB to {after} kB only"));
    let qmp: Vec<serde_json::Value> =
        c.case.stderr.lines().filter_map(|l| serde_json::from_str(l.trim()).ok()).collect();
    let returned: Vec<&serde_json::Value> = qmp.iter().filter_map(|m| m.get("return")).collect();
    c.assert(
        returned.iter().any(|r| r.get("actual") == Some(&serde_json::json!(256u64 << 20))),
        "query-balloon reported the whole 256 MiB before the target moved",
    );
    let guest_stats = returned.iter().find(|r| r.get("stats").is_some());
    c.assert(guest_stats.is_some(), "qom-get guest-stats answered");
    let last_update = guest_stats.and_then(|g| g["last-update"].as_i64()).unwrap_or(0);
    c.assert(last_update > 0, "the driver's first statistics (posted before DRIVER_OK) were read");
    let total = guest_stats.and_then(|g| g["stats"]["stat-total-memory"].as_u64()).unwrap_or(u64::MAX);
    c.assert(
        total != u64::MAX && total <= 256 << 20 && total > 128 << 20,
        &format!("the driver's first report gives its total memory: {total}"),
    );
    let changes: Vec<u64> =
        qmp.iter().filter(|m| m["event"] == "BALLOON_CHANGE").filter_map(|m| m["data"]["actual"].as_u64()).collect();
    c.assert(!changes.is_empty(), "BALLOON_CHANGE was sent");
    c.assert(changes.last() == Some(&(192u64 << 20)), &format!("BALLOON_CHANGE ends at 192 MiB: {changes:?}"));
    c.assert(changes.windows(2).all(|w| w[1] < w[0]), &format!("the guest shrank step by step: {changes:?}"));
    // Statistics polled every second all along, and nothing the guest did was a mistake the device reported.
    c.assert(!c.case.stderr.contains("virtio-balloon:"), "the device reported no guest error");
    c.assert_exited(0);
}

#[test]
fn virtio_mmio_disks_and_rng_serve_a_linux_guest() {
    let Some(c) = case(Arch::X86_64, "virtio-mmio") else { return };
    check_virtio_disks(&c);
    c.assert_line("HWRNG=virtio_rng");
    c.assert_exited(0);
}

#[test]
fn virtio_console_carries_output_and_input() {
    let Some(c) = case(Arch::X86_64, "virtio-console") else { return };
    check_virtio_console(c);
}

#[test]
fn virtio_net_carries_ping_http_and_an_upload_through_a_tap() {
    let Some(c) = case(Arch::X86_64, "virtio-net") else { return };
    check_virtio_net(c);
}

#[test]
fn virtio_pci_disks_and_rng_serve_a_linux_guest_with_msix() {
    let Some(c) = case(Arch::X86_64, "virtio-pci") else { return };
    // Interrupts come by MSI-X: a queue vector and a configuration vector per device.
    check_virtio_pci_disks_and_rng(&c, "PCI-MSI-VIRTIO-IRQS=6");
}

/// Two virtio-blk-pci disks and a virtio-rng-pci: the disks work, the rng feeds the kernel, Linux found the host
/// bridge and the three functions on bus 0, and `msi` (the guest's count of their MSI vectors) holds.
fn check_virtio_pci_disks_and_rng(c: &Checked, msi: &str) {
    check_virtio_disks(c);
    c.assert_line("HWRNG=virtio_rng");
    c.assert_line("PCI-DEV 0000:00:00.0 0x1b36:0x0008 class=0x060000");
    c.assert_line("PCI-DEV 0000:00:01.0 0x1af4:0x1042 class=0x010000");
    c.assert_line("PCI-DEV 0000:00:02.0 0x1af4:0x1042 class=0x010000");
    c.assert_line("PCI-DEV 0000:00:03.0 0x1af4:0x1044 class=0x00ff00");
    c.assert_line(msi);
    c.assert_exited(0);
}

#[test]
fn virtio_console_over_mmio() {
    let Some(c) = case(Arch::X86_64, "virtio-console-mmio") else { return };
    check_virtio_console(c);
}

/// virt-install's guest agent channel (issue 17): a virtserialport named org.qemu.guest_agent.0 on a socket
/// chardev, beside a virtconsole, on a virtio-serial controller with QEMU's 31 ports. The guest finds the port by
/// name, its line reaches the host's socket (its write waits until the host side connected, which the device
/// says with PORT_OPEN), the host's line reaches the guest, and the host closing its side reads as the end of
/// input; the console port still carries hvc0 both ways.
#[test]
fn a_named_virtio_serial_port_carries_lines_between_the_guest_and_a_host_socket() {
    let Some(c) = case(Arch::X86_64, "virtio-serial-ports") else { return };
    let console = &c.case.console;
    let device = console.lines().find_map(|l| l.trim_end().strip_prefix("VPORT-FOUND="));
    c.assert(device.is_some_and(|d| d.starts_with("/dev/vport") && d.ends_with("p1")), "no vportNp1 named as asked");
    let device = device.unwrap_or_default();
    c.assert_line("VPORT-HVC0=yes");
    c.assert_line(&format!("SOCKET-GOT:hello from the guest over {device}"));
    c.assert_line("VPORT-GOT:hello from the host");
    c.assert_line("VPORT-HOST-CLOSED");
    c.assert_line("HVC-ECHO:hello over a multiport console");
    c.assert_exited(0);
}

/// Two disks, a network card and the rng at once, in QEMU's spelling, on PCI: three MSI-X vectors more than
/// without the card (config, rx, tx).
#[test]
fn two_disks_a_nic_and_the_rng_at_once_over_pci_in_qemu_spelling() {
    let Some(c) = case(Arch::X86_64, "virtio-all-pci") else { return };
    check_virtio_disks(&c);
    c.assert_line("HWRNG=virtio_rng");
    assert_network(&c, "52:54:00:12:34:98");
    c.assert_line("PCI-DEV 0000:00:03.0 0x1af4:0x1041 class=0x020000");
    c.assert_line("PCI-MSI-VIRTIO-IRQS=9");
    c.assert_exited(0);
}

/// The same devices on virtio-mmio, spelled as for QEMU's microvm.
#[test]
fn two_disks_a_nic_and_the_rng_at_once_over_mmio_in_qemu_spelling() {
    let Some(c) = case(Arch::X86_64, "virtio-all-mmio") else { return };
    check_virtio_disks(&c);
    c.assert_line("HWRNG=virtio_rng");
    assert_network(&c, "52:54:00:12:34:98");
    c.assert_line("PCI-MSI-VIRTIO-IRQS=0");
    c.assert_exited(0);
}

/// One complete line of the guest action `counter`: "COUNT=<n> UPTIME=<seconds with 2 decimals> SYNCED" (a line
/// a save cut short never parses).
fn counter_line(line: &str) -> Option<(u64, f64)> {
    let rest = line.trim_end().strip_prefix("COUNT=")?;
    let (count, rest) = rest.split_once(" UPTIME=")?;
    let uptime = rest.strip_suffix(" SYNCED")?;
    let (_, decimals) = uptime.split_once('.')?;
    if decimals.len() != 2 {
        return None;
    }
    Some((count.parse().ok()?, uptime.parse().ok()?))
}

/// The disk image the `counter` action leaves after counting to `n`: "%07d\n" per count from offset 0, then
/// zeros to `size` bytes.
fn counter_image(n: u64, size: usize) -> Vec<u8> {
    let mut image: Vec<u8> = (1..=n).flat_map(|i| format!("{i:07}\n").into_bytes()).collect();
    image.resize(size, 0);
    image
}

/// Save and restore of a running Linux guest (issue 16): the guest counts to 60, writing each count to its disk
/// before printing it; at 20 the runner saves the VM over QMP (migrate to a file) and a second kestrel restores
/// it with -incoming. The restored guest must go on, not boot again: no kernel log, its count and uptime continue
/// from the saved guest's last line, and the disk holds every count, in order, both when the save finished (as
/// far as the saved guest had printed) and at the end (read by the guest with direct I/O and hashed by the host).
#[test]
fn a_counting_linux_guest_is_saved_and_restored_into_a_new_kestrel() {
    let Some(c) = case(Arch::X86_64, "snapshot") else { return };
    check_snapshot(&c);
}

/// The same with virtio-net on a tap in a network namespace: the guest pings the host side before counting and
/// again after the restore, through the restored card and the tap the restoring kestrel opened again.
#[test]
fn a_linux_guest_with_a_network_card_is_saved_and_restored_and_the_network_answers() {
    let Some(c) = case(Arch::X86_64, "snapshot-net") else { return };
    check_snapshot_net(&c);
}

/// The snapshot-net case's checks: the snapshot case's, and the network up before the save and answering after.
#[track_caller]
fn check_snapshot_net(c: &Checked) {
    check_snapshot(c);
    c.assert_line("NET-MAC=52:54:00:12:34:97");
    c.assert_line("NET-UP-PING-OK");
    let restored = c.case.console.split_once("\nKESTREL-RESTORE ").map(|(_, r)| r).unwrap_or_default();
    c.assert(restored.lines().any(|l| l.starts_with("PING-OK")), "the network answers the restored guest");
}

/// The `counter` action's run across a save and a restore (see the snapshot case).
#[track_caller]
fn check_snapshot(c: &Checked) {
    const END: u64 = 60;
    const DISK: usize = 8 << 20;
    let console = &c.case.console;
    let Some((saved, restored)) = console.split_once("\nKESTREL-RESTORE ") else {
        let why = console.lines().find(|l| l.starts_with("KESTREL-RESTORE-SKIPPED")).unwrap_or("no save");
        panic!("the VM was never restored: {why}\n{}", c.describe());
    };
    c.assert(
        c.case.stderr.contains(r#""event": "MIGRATION", "data": {"status": "completed"}"#),
        "QMP reported the save completed",
    );
    c.assert(restored.starts_with("source_exit=0 "), "the saved kestrel quit with status 0");
    c.assert(saved.contains("Linux version"), "the saved guest's boot log is on the console");
    c.assert(!restored.contains("Linux version"), "the restored guest printed a kernel boot log: it booted again");
    c.assert(!restored.contains("KESTREL-GUEST-UP"), "the restored guest ran /init again");

    let counts = |text: &str| text.lines().filter_map(counter_line).collect::<Vec<_>>();
    let (before, after) = (counts(saved), counts(restored));
    c.assert(!before.is_empty() && !after.is_empty(), "counts on both sides of the restore");
    let consecutive = |side: &[(u64, f64)]| side.windows(2).all(|w| w[1].0 == w[0].0 + 1 && w[1].1 > w[0].1);
    c.assert(before[0].0 == 1 && consecutive(&before), "the saved guest counted 1, 2, 3, ... with uptime rising");
    c.assert(consecutive(&after), "the restored guest counted on by one, with uptime rising");
    let (last_saved, first_restored) = (before[before.len() - 1], after[0]);
    c.assert(
        last_saved.0 < END && first_restored.0 > last_saved.0 && first_restored.0 <= last_saved.0 + 2,
        &format!(
            "the count goes on from the save: the saved guest's last count {}, the restored guest's first {} (one \
             step, or two when the save cut a line short)",
            last_saved.0, first_restored.0
        ),
    );
    c.assert(
        first_restored.1 > last_saved.1 && first_restored.1 < last_saved.1 + 20.0,
        &format!(
            "/proc/uptime goes on from the save: {} s, then {} s after the restore",
            last_saved.1, first_restored.1
        ),
    );
    c.assert(after[after.len() - 1].0 == END, &format!("the restored guest counted to {END}"));

    // At the save, the disk held every count the saved guest had printed (each was synced before it was printed),
    // and perhaps the next one, written but not yet printed.
    let saved_disk = saved.lines().find_map(|l| l.strip_prefix("DISK-SHA256-SAVED count.img ")).map(str::trim);
    let printed = last_saved.0;
    let candidates = [printed, printed + 1].map(|n| sha256_hex(&counter_image(n, DISK)));
    c.assert(
        saved_disk.is_some_and(|h| candidates.iter().any(|c| c == h)),
        &format!("the disk at the save holds counts 1..={printed} (or one more), in order: {saved_disk:?}"),
    );
    // At the end, every count, in order: read back by the restored guest, and hashed by the host.
    c.assert(c.value("DISK-COUNT-LINES") == END, "the guest read back every count from the disk");
    c.assert(c.value("DISK-COUNT-LAST") == END, "the disk's last count is the last one written");
    c.assert_line("DISK-COUNT-ORDER=ok");
    c.assert_line(&format!("DISK-SHA256 count.img {}", sha256_hex(&counter_image(END, DISK))));
    c.assert_exited(0);
}

/// The `counter` action's line parser and disk image, against what the guest prints and writes. Needs no runner.
#[test]
fn counter_lines_parse_only_when_complete_and_the_image_is_one_line_per_count() {
    assert_eq!(counter_line("COUNT=12 UPTIME=40.05 SYNCED"), Some((12, 40.05)));
    assert_eq!(counter_line("COUNT=12 UPTIME=40.05 SYNCED\r"), Some((12, 40.05)));
    assert_eq!(counter_line("COUNT=12 UPTIME=40.0"), None, "a line cut by the save");
    assert_eq!(counter_line("COUNT=12 UPTIME=40.0 SYNCED"), None, "uptime has two decimals");
    assert_eq!(counter_line("IME=40.05 SYNCED"), None);
    let image = counter_image(3, 32);
    assert_eq!(&image[..24], b"0000001\n0000002\n0000003\n");
    assert!(image[24..].iter().all(|&b| b == 0) && image.len() == 32);
}

// aarch64: ci/runner/aarch64.

#[test]
fn aarch64_image_boots_with_two_vcpus() {
    let Some(c) = case(Arch::Aarch64, "boot-2cpus") else { return };
    check_nproc(c, 2, " (the secondary vCPU comes up by PSCI CPU_ON)");
}

#[test]
fn aarch64_nproc_is_1_with_one_vcpu() {
    let Some(c) = case(Arch::Aarch64, "nproc-1") else { return };
    check_nproc(c, 1, "");
}

#[test]
fn aarch64_nproc_is_4_with_four_vcpus() {
    let Some(c) = case(Arch::Aarch64, "nproc-4") else { return };
    check_nproc(c, 4, "");
}

#[test]
fn aarch64_memtotal_matches_512m() {
    let Some(c) = case(Arch::Aarch64, "memory-512m") else { return };
    assert_memtotal(&c, 512 * 1024, 0.84);
}

#[test]
fn aarch64_pl031_rtc_reads_within_seconds_of_the_l1_clock() {
    let Some(c) = case(Arch::Aarch64, "rtc") else { return };
    check_rtc(c);
}

#[test]
fn aarch64_pl011_input_is_echoed() {
    let Some(c) = case(Arch::Aarch64, "serial-echo") else { return };
    check_serial_echo(c);
}

#[test]
fn aarch64_psci_system_off_exits_0() {
    let Some(c) = case(Arch::Aarch64, "poweroff") else { return };
    check_poweroff(c);
}

#[test]
fn aarch64_psci_system_reset_comes_back_up() {
    let Some(c) = case(Arch::Aarch64, "reboot") else { return };
    check_reboot(c);
}

#[test]
fn aarch64_reboot_with_no_reboot_ends_the_process() {
    let Some(c) = case(Arch::Aarch64, "no-reboot") else { return };
    check_no_reboot(c);
}

#[test]
fn aarch64_system_powerdown_presses_the_gpio_power_key() {
    let Some(c) = case(Arch::Aarch64, "powerdown") else { return };
    check_powerdown(c);
}

#[test]
fn aarch64_virtio_blk_disks_serve_a_linux_guest() {
    let Some(c) = case(Arch::Aarch64, "virtio-blk") else { return };
    check_virtio_disks(&c);
    c.assert_exited(0);
}

#[test]
fn aarch64_virtio_console_carries_output_and_input() {
    let Some(c) = case(Arch::Aarch64, "virtio-console") else { return };
    check_virtio_console(c);
}

#[test]
fn aarch64_virtio_net_carries_ping_http_and_an_upload_through_a_tap() {
    let Some(c) = case(Arch::Aarch64, "virtio-net") else { return };
    check_virtio_net(c);
}

/// virtio-pci on aarch64: the guest finds the ECAM host bridge in the FDT, and MSI-X reaches it through the GICv3
/// ITS (a queue vector and a configuration vector per device).
#[test]
fn aarch64_virtio_pci_disks_and_rng_serve_a_linux_guest_with_msix_through_the_its() {
    let Some(c) = case(Arch::Aarch64, "virtio-pci-its") else { return };
    check_virtio_pci_disks_and_rng(&c, "ITS-MSI-VIRTIO-IRQS=6");
}

/// The KVM aarch64 backend's own tests (tests/kvm_aarch64.rs), where KVM is real: inside the aarch64 runner's L1.
#[test]
fn aarch64_kvm_backend_tests_pass_for_real_in_l1() {
    let Some(c) = case(Arch::Aarch64, "kvm-aarch64") else { return };
    c.assert_line("test a_vcpu_stores_to_the_uart_and_powers_off_through_psci ... ok");
    c.assert_line("test a_counting_guest_continues_in_a_second_vm_from_its_saved_state ... ok");
    c.assert_line("test hostile_vcpu_and_gic_states_are_refused_with_a_clear_error ... ok");
    c.assert_line("test the_its_takes_msis_by_device_id_and_its_registers_travel_with_the_gic_state ... ok");
    c.assert_line("test result: ok. 4 passed; 0 failed");
    c.assert_exited(0);
}

/// SHA-256 by the host's `sha256sum`, so the expected digests come from the same tool as L1's.
fn sha256_hex(bytes: &[u8]) -> String {
    let mut child =
        Command::new("sha256sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("running sha256sum");
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string()
}

/// The frame parser on a console where L1 retried a case: only the second attempt is the case's result, and
/// the first attempt's signature is kept for the report. Needs no runner.
#[test]
fn parser_keeps_the_second_attempt_and_the_retry_signature() {
    let console = "=== RUNNER L1-UP uptime_ms=1\r\n\
        === CASE a RETRY first attempt: hang in early boot (timeout, 60s) after: [ 0.74] \r\n\
        --- first attempt: guest console (last 30 lines)\r\n\
        first-attempt-line\r\n\
        --- first attempt end\r\n\
        === CASE a BEGIN\r\n\
        KESTREL-GUEST-UP uptime=1.0\r\n\
        === CASE a STDERR\r\n\
        === CASE a END exit=0 reason=exit ms=5 marker_ms=4\r\n\
        === CASE a TIMING boot 1: 0.0 s of a 60.0 s budget (the floor)\r\n\
        === CASE a ALIVE ms=10000 markers=0\r\n\
        === CASE b BEGIN\r\n\
        KESTREL-GUEST-UP uptime=1.0\r\n\
        === CASE b STDERR\r\n\
        === CASE b END exit=0 reason=exit ms=5 marker_ms=4\r\n";
    let cases = parse(console);
    let a = &cases["a"];
    assert_eq!(a.retry.as_deref(), Some("hang in early boot (timeout, 60s) after: [ 0.74] "));
    assert_eq!(a.console, "KESTREL-GUEST-UP uptime=1.0\n");
    assert_eq!(a.end["exit"], "0");
    assert_eq!(a.timing, ["boot 1: 0.0 s of a 60.0 s budget (the floor)"]);
    assert!(cases["b"].retry.is_none());
    assert!(cases["b"].timing.is_empty());
}

// The runner's case loop (ci/runner/case-loop.sh) and its time budgets, run on this host by `sh` with a fake
// guest in place of kestrel and budgets scaled down to seconds. In the runner each budget is a multiple of a boot
// measured in L1, so a machine that is slower (loaded) gets longer budgets, while a guest that hangs still ends.

/// What one run of the case loop printed, and how long it took.
struct LoopRun {
    output: String,
    wall: std::time::Duration,
}

impl LoopRun {
    fn timing(&self) -> Vec<&str> {
        self.output.lines().filter_map(|l| l.split_once(" TIMING ").map(|(_, t)| t)).collect()
    }

    fn end_field(&self, key: &str) -> String {
        let end = self.output.lines().rev().find_map(|l| frame(l)?.split_once(" END ")).map(|(_, f)| f);
        let end = end.unwrap_or_else(|| panic!("no END line:\n{}", self.output));
        let field = end.split_whitespace().find_map(|f| f.strip_prefix(&format!("{key}=")));
        field.unwrap_or_else(|| panic!("no {key}= in the END line:\n{}", self.output)).to_string()
    }
}

/// Runs case `name` of the case loop with `guest` (a shell script standing in for kestrel), after L1 "booted" in
/// `l1_boot_ms`, with the BUDGET_ settings given (the rest scaled down to fit a test).
fn run_case_loop(name: &str, guest: &str, until: Option<u32>, l1_boot_ms: u64, budget: &[(&str, &str)]) -> LoopRun {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("case-loop-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let case = dir.join("case");
    std::fs::create_dir_all(&case).unwrap();
    std::fs::create_dir_all(dir.join("tmp")).unwrap();
    let program = dir.join("fake-guest");
    std::fs::write(&program, format!("#!/bin/sh\n{guest}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(case.join("name"), format!("{name}\n")).unwrap();
    std::fs::write(case.join("program"), format!("{}\n", program.display())).unwrap();
    std::fs::write(case.join("args"), "").unwrap();
    if let Some(n) = until {
        std::fs::write(case.join("until"), format!("{n}\n")).unwrap();
    }
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(". \"$0\"; budget_init \"$1\"; run_case \"$2\"")
        .arg(repo().join("ci/runner/case-loop.sh"))
        .arg(l1_boot_ms.to_string())
        .arg(&case)
        .env("CASE_TMP", dir.join("tmp"))
        .env("BUDGET_BOOT_FLOOR_MS", "500")
        .env("BUDGET_STEP_FLOOR_MS", "500")
        .env("BUDGET_CEILING_MS", "30000");
    for (key, value) in budget {
        command.env(key, value);
    }
    let start = Instant::now();
    let output = command.output().expect("running sh");
    let wall = start.elapsed();
    let _ = std::fs::remove_dir_all(&dir);
    let output = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    LoopRun { output, wall }
}

/// The budget in seconds and the boot it is a multiple of, from a TIMING line "... budget (Kx boot 1's S s)".
fn budget_and_base(line: &str, factor: &str) -> (f64, f64) {
    let number = |s: &str| -> f64 { s.parse().unwrap_or_else(|_| panic!("not a number {s:?} in {line:?}")) };
    let budget = line.split(" s budget").next().and_then(|s| s.rsplit(' ').next()).map(number);
    let base = line.split(&format!("({factor}x ")).nth(1).and_then(|s| s.split("'s ").nth(1)?.split(' ').next());
    match (budget, base.map(number)) {
        (Some(budget), Some(base)) => (budget, base),
        _ => panic!("no budget derived from {factor}x a boot in {line:?}"),
    }
}

/// The aarch64 `reboot` case on a busy machine: the first boot took 38 s, and a fixed 60 s budget for the whole
/// case left the second boot 22 s. Scaled down: the reference boot is 1 s, boot 1 takes 2.5 s (within its budget,
/// 4x the reference), boot 2 takes 3.5 s: more than a fixed budget of 4 boots of the reference would leave, and
/// within 3x boot 1.
#[test]
fn a_slow_first_boot_gives_the_second_boot_a_budget_derived_from_it() {
    let run = run_case_loop(
        "slow-reboot",
        "sleep 2.5; echo KESTREL-GUEST-UP; sleep 3.5; echo KESTREL-GUEST-UP; exec sleep 1000",
        Some(2),
        250,
        &[("BUDGET_L1_FACTOR", "4")],
    );
    assert_eq!(run.end_field("reason"), "until", "the case should end at the second boot:\n{}", run.output);
    let timing = run.timing();
    assert_eq!(timing.len(), 2, "a TIMING line for each boot:\n{}", run.output);
    assert!(
        timing[0].starts_with("boot 1: ") && timing[0].ends_with("budget (4x the reference boot's 1.0 s)"),
        "boot 1's budget is 4x the reference (4x L1's 0.25 s boot): {}",
        timing[0]
    );
    let (budget, boot_1) = budget_and_base(timing[1], "3");
    assert!(timing[1].starts_with("boot 2: "), "{}", timing[1]);
    assert!(boot_1 >= 2.5 && (budget - 3.0 * boot_1).abs() < 0.25, "boot 2's budget is 3x boot 1: {}", timing[1]);
    // The slow boot raised the reference for the cases after it.
    assert!(run.output.contains("=== RUNNER BUDGET reference boot now"), "{}", run.output);
}

/// A guest that hangs after its first boot still ends, at the budget derived from that boot, and says so.
#[test]
fn a_hang_after_the_first_boot_ends_at_a_multiple_of_it() {
    let run = run_case_loop(
        "hung-reboot",
        "sleep 1; echo KESTREL-GUEST-UP; exec sleep 1000",
        Some(2),
        100,
        &[("BUDGET_L1_FACTOR", "4")],
    );
    assert_eq!(run.end_field("reason"), "timeout", "{}", run.output);
    let timing = run.timing();
    let last = timing.last().copied().unwrap_or_default();
    assert!(last.starts_with("boot 2: not done after ") && last.contains("TIMEOUT"), "{}", run.output);
    let (budget, boot_1) = budget_and_base(last, "3");
    assert!((budget - 3.0 * boot_1).abs() < 0.25, "boot 2's budget is 3x boot 1: {last}");
    assert!(run.wall.as_secs_f64() < boot_1 + budget + 10.0, "the case took {:?}:\n{}", run.wall, run.output);
}

/// Whatever the reference says (here an L1 that took a minute to boot), a case ends at the ceiling; a guest that
/// never printed its marker is retried twice (the emulated environment's early-boot hang) and ends there again.
#[test]
fn a_case_ends_at_the_ceiling_whatever_the_reference() {
    let run = run_case_loop("hung-boot", "exec sleep 1000", None, 60_000, &[("BUDGET_CEILING_MS", "1500")]);
    assert_eq!(run.end_field("reason"), "timeout", "{}", run.output);
    assert!(run.output.contains("=== CASE hung-boot RETRY first attempt: hang in early boot"), "{}", run.output);
    assert!(run.output.contains("=== CASE hung-boot RETRY attempt 2: hang in early boot"), "{}", run.output);
    assert!(!run.output.contains("RETRY attempt 3"), "two retries at most:\n{}", run.output);
    let last = run.timing().last().copied().unwrap_or_default().to_string();
    assert!(
        last.starts_with("boot 1: not done after ") && last.contains("the case's ceiling of 1.5 s"),
        "{}",
        run.output
    );
    assert!(run.wall.as_secs_f64() < 15.0, "three attempts of 1.5 s took {:?}:\n{}", run.wall, run.output);
}

/// Runs ci/runner/lib.sh's `runner_boot_watched` (in a directory of its own, named after `name`) with `fake_l1` (a shell function body standing in for QEMU
/// running L1: it writes its pid where the runner looks for L1's), a silence allowance of `silence` seconds and a
/// wall-clock budget of `budget` seconds. Returns the status, the runner's stderr, and how long it took.
fn run_watched_l1(name: &str, fake_l1: &str, silence: u32, budget: u32) -> (i32, String, Duration) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("watched-l1-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let script = format!(
        r#"source "$0"
set +e
work="$1" RUNNER_ARCH=fake runner_started=$(date +%s) runner_budget={budget} budget_ran_out=0
runner_deadline=$((runner_started + runner_budget))
boot_l1() {{ echo $BASHPID >"$l1_pidfile"; {fake_l1}; }}
runner_boot_watched initrd 600 "$work/console.log"
rc=$?
echo "status $rc budget_ran_out $budget_ran_out" >&2
exit $rc"#
    );
    let start = Instant::now();
    let output = Command::new("bash")
        .arg("-c")
        .arg(script)
        .arg(repo().join("ci/runner/lib.sh"))
        .arg(&dir)
        .env("KESTREL_RUNNER_SILENCE", silence.to_string())
        .output()
        .expect("running bash");
    let wall = start.elapsed();
    let _ = std::fs::remove_dir_all(&dir);
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stderr).into_owned(), wall)
}

/// An L1 whose kernel goes on printing (soft lockup and RCU stall reports) while its case loop is stuck is
/// stopped by the watchdog: only the case loop's frame lines count as signs of life. Before that, the case that
/// ended is reported on stderr as it happened.
#[test]
fn a_wedged_l1_that_keeps_printing_kernel_reports_is_stopped() {
    let (status, stderr, wall) = run_watched_l1(
        "wedged",
        "echo '=== CASE first END exit=0 reason=exit ms=5'; \
         while :; do echo 'watchdog: BUG: soft lockup - CPU#0 stuck for 22s!'; sleep 0.5; done",
        4,
        600,
    );
    assert_eq!(status, 124, "{stderr}");
    assert!(stderr.contains("case loop has been silent"), "{stderr}");
    assert!(stderr.contains("budget_ran_out 0"), "{stderr}");
    assert!(stderr.contains("ci/runner: fake +") && stderr.contains("s: first END exit=0"), "{stderr}");
    assert!(wall < Duration::from_secs(20), "took {wall:?}: {stderr}");
}

/// An L1 that keeps its case loop alive but would run past the runner's wall-clock budget is stopped when the
/// budget runs out, and says why.
#[test]
fn an_l1_past_the_runners_wall_clock_budget_is_stopped() {
    let (status, stderr, wall) =
        run_watched_l1("over-budget", "while :; do echo '=== CASE slow ALIVE ms=1'; sleep 0.5; done", 600, 4);
    assert_eq!(status, 124, "{stderr}");
    assert!(stderr.contains("wall-clock budget (4s, KESTREL_RUNNER_DEADLINE) ran out"), "{stderr}");
    assert!(stderr.contains("budget_ran_out 1"), "{stderr}");
    assert!(wall < Duration::from_secs(20), "took {wall:?}: {stderr}");
}

/// The snapshot case on the aarch64 virt machine: vCPU registers with the timers, the vGICv3, the PL011 and
/// virtio-mmio disk saved and restored into a new kestrel; the guest counts on from where it was.
#[test]
fn aarch64_a_counting_linux_guest_is_saved_and_restored_into_a_new_kestrel() {
    let Some(c) = case(Arch::Aarch64, "snapshot") else { return };
    check_snapshot(&c);
}

/// The snapshot case with the disk on virtio-pci: the GIC ITS's state travels, so MSI-X goes on after the restore.
#[test]
fn aarch64_a_counting_linux_guest_on_a_virtio_pci_disk_is_saved_and_restored_with_its_its() {
    let Some(c) = case(Arch::Aarch64, "snapshot-pci") else { return };
    check_snapshot(&c);
}

/// The snapshot-net case on the aarch64 virt machine: virtio-net over mmio answers after the restore.
#[test]
fn aarch64_a_linux_guest_with_a_network_card_is_saved_and_restored_and_the_network_answers() {
    let Some(c) = case(Arch::Aarch64, "snapshot-net") else { return };
    check_snapshot_net(&c);
}

/// A case that timed out while L1 itself stalled (the case loop's own polls stopped for BUDGET_L1_STALL_MS) is
/// the emulated runner's failure: a CI run's restored guest got its first output 22 s after the restoring kestrel
/// started (1-2 s here), reported a soft lockup and timed out. Here the fake guest freezes the case loop (SIGSTOP
/// to its parent, the loop's shell) for 1.5 s, then hangs past its marker: retried, each attempt judged alike.
/// The same hang without the stall is the guest's own and is not retried, and a stall in a case that ends well
/// changes nothing but the END line's l1_stall_ms.
#[test]
fn a_timeout_during_which_l1_stalled_is_retried_and_one_without_a_stall_is_not() {
    let stall = "kill -STOP $PPID; sleep 1.5; kill -CONT $PPID";
    let budget = [("BUDGET_L1_STALL_MS", "1000")];
    let stalled = format!("echo KESTREL-GUEST-UP; {stall}; exec sleep 1000");
    let run = run_case_loop("stalled", &stalled, None, 100, &budget);
    assert!(
        run.output.contains("=== CASE stalled RETRY first attempt: L1 stalled for 1.")
            && run.output.contains("the emulated runner, not the guest; last line: KESTREL-GUEST-UP"),
        "{}",
        run.output
    );
    assert!(run.output.contains("=== CASE stalled RETRY attempt 2: L1 stalled for "), "{}", run.output);
    assert_eq!(run.end_field("reason"), "timeout", "{}", run.output);
    let stall_ms: u64 = run.end_field("l1_stall_ms").parse().unwrap();
    assert!((1000..10_000).contains(&stall_ms), "{}", run.output);

    // (A threshold of 10 s as in L1, so that a busy test machine's slow polls are no stall.)
    let hung = run_case_loop("hung", "echo KESTREL-GUEST-UP; exec sleep 1000", None, 100, &[]);
    assert!(!hung.output.contains("RETRY"), "{}", hung.output);
    assert_eq!(hung.end_field("reason"), "timeout", "{}", hung.output);
    let stall_ms: u64 = hung.end_field("l1_stall_ms").parse().unwrap();
    assert!(stall_ms < 10_000, "{}", hung.output);

    let passing = format!("echo KESTREL-GUEST-UP; {stall}; exit 0");
    let run = run_case_loop("stalled-but-done", &passing, None, 100, &budget);
    assert!(!run.output.contains("RETRY"), "{}", run.output);
    assert_eq!(run.end_field("reason"), "exit", "{}", run.output);
    assert!(run.end_field("l1_stall_ms").parse::<u64>().unwrap() >= 1000, "{}", run.output);
}

/// The emulated environment's triple fault also strikes after "Run /init" while /init loads its modules: before
/// the guest's marker, it is retried as an early-boot fault; each attempt judged alike, so one that repeats fails.
/// So is one in a reboot's early boot. A guest that got past its marker in its last boot and then failed is never
/// retried.
#[test]
fn a_triple_fault_before_the_marker_is_retried_and_one_after_it_is_not() {
    let faulting = "echo 'Run /init as init process'; echo 'kestrel: vCPU 1 stopped: triple fault' >&2; exit 1";
    let run = run_case_loop("fault-in-init", faulting, None, 100, &[]);
    assert!(
        run.output.contains("=== CASE fault-in-init RETRY first attempt: triple fault in early boot"),
        "{}",
        run.output
    );
    assert!(
        run.output.contains("=== CASE fault-in-init RETRY attempt 2: triple fault in early boot"),
        "{}",
        run.output
    );
    assert_eq!(run.end_field("exit"), "1", "{}", run.output);

    // The same fault in a reboot's early boot: the first boot's marker does not count for the second boot.
    let reboot = "echo 'Linux version 6'; echo KESTREL-GUEST-UP; echo 'Linux version 6'; echo 'i8042: Probing ports'; \
                  echo 'kestrel: vCPU 0 stopped: triple fault' >&2; exit 1";
    let run = run_case_loop("fault-in-reboot", reboot, Some(2), 100, &[]);
    assert!(
        run.output.contains("=== CASE fault-in-reboot RETRY first attempt: triple fault in early boot"),
        "{}",
        run.output
    );
    assert!(run.output.contains("after: i8042: Probing ports"), "{}", run.output);

    let late = "echo KESTREL-GUEST-UP; echo 'kestrel: vCPU 1 stopped: triple fault' >&2; exit 1";
    let run = run_case_loop("fault-after-marker", late, None, 100, &[]);
    assert!(!run.output.contains("RETRY"), "{}", run.output);
    assert_eq!(run.end_field("exit"), "1", "{}", run.output);
}

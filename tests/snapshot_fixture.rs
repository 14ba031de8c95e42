#![cfg(target_arch = "x86_64")]

//! A machine snapshot saved by the first snapshot format, kept in the repository and restored by every Kestrel
//! that reads that format (issue 16: "a Kestrel release restores snapshots of the previous format version").
//! `snapshot/tests/format_v1_fixture.rs` keeps the framing under test with made-up states; this keeps a real
//! machine: the vCPU, the in-kernel irqchip and clock, the PC's devices and guest memory as Kestrel saved them.
//!
//! # The fixture
//!
//! `tests/fixtures/snapshot-v1-probe-flood.ksnap`: the probe payload's bzImage shape (`tests/payloads`) running
//! `flood` (it counts on the serial port forever) on the `pc` machine with one vCPU, no virtio devices and 4 MiB of
//! memory (Kestrel's smallest; the bzImage loads at 1 MiB), saved with QMP `migrate` to `file:` by Kestrel 0.1.0,
//! format version 1. Zero pages are not stored: the file holds 15 pages of 1024, about 88 KiB in all.
//! `snapshot-v1-probe-flood.console` is the end of the saved guest's console (its last complete line and the one
//! the save cut short), for checking that the restored guest's count goes on from exactly there.
//!
//! Regenerate both with `KESTREL_WRITE_PAYLOAD_SNAPSHOT_FIXTURE=1 cargo test -p vmm --test snapshot_fixture`,
//! only while `snapshot::FORMAT_VERSION` is 1 (the test refuses otherwise) and only if the fixture cannot be
//! restored for a reason that is not a format change. **Never once the format version moved on**: the point of
//! the file is that an older Kestrel wrote it. When format version 2 ships, keep this file and this test as they
//! are and add a version-2 fixture beside them; retire both format-1 fixtures when format version 3 ships.
//!
//! # What a restore needs from the command line
//!
//! The same machine: type, vCPUs, memory size, devices (each checked against the file, and refused with one line
//! if it differs). Not the same kernel or kernel command line: a restore takes the guest's code from its memory and
//! reads the kernel file only to boot it again at a reset, and neither is recorded in the file. So the fixture does
//! not depend on where the tests build the payload; the restore names the payload built for this run, with the
//! command line it was saved with.
//!
//! # The CPU identity
//!
//! The header records the CPU the guest saw (the vendor and every CPUID feature bit, `0x7.0.ebx.5` style), and a
//! host lacking any of them refuses the restore before anything runs: a guest that saw AVX2 may be using it. The
//! fixture was saved on an AMD EPYC host under KVM; CI machines are of the same kind but need not have the
//! identical CPU, and no fixture can be valid on every host. So the restore test asks this host's KVM for the
//! identity a guest sees (`vmm::host_cpu_identity`, what Kestrel itself checks against) and:
//! * where it admits the fixture, the restore must succeed and the guest count on from the saved value, without a
//!   second boot banner: any failure there fails the test;
//! * where it refuses, kestrel's stderr must be exactly the one CPU-identity line (`kestrel: cannot restore
//!   '<fixture>': ` and the reader's vendor or missing-features error); then the test prints `SKIPPED:` with the
//!   reason. Anything else (another error, a panic, a guest that ran) fails it. The file is still read through
//!   with this Kestrel's reader and state types on every host (`the_fixture_reads_on_any_host`), so a format or
//!   state change that breaks it is caught even where the guest cannot run.
//!
//! The damaged and mismatched fixtures are refused with one line on every host: where the CPU admits the file, with
//! the damage or mismatch itself; where it does not, with the CPU line (the header is checked first), and the
//! damage is then checked with the reader alone.

mod support;

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use hypervisor::x86_64::{VcpuStateX86_64, VmStateX86_64};
use snapshot::{CpuIdentity, Expected, GuestRegion, GuestRegionMut, Header, RegionLayout, SectionSpec, Snapshot};
use support::counting_vm::{assert_count_continues, counts, file_uri, migrate, Dir, Vm, BZIMAGE, TIMEOUT};
use support::{kestrel_command, kvm_available, payload};

const FIXTURE: &str = "tests/fixtures/snapshot-v1-probe-flood.ksnap";
const CONSOLE: &str = "tests/fixtures/snapshot-v1-probe-flood.console";
const REGENERATE: &str = "KESTREL_WRITE_PAYLOAD_SNAPSHOT_FIXTURE";
/// The command line's machine besides the kernel, its command line and the consoles: the one the fixture was saved
/// with.
const MEMORY: &[&str] = &["--memory", "4M"];
const MEMORY_BYTES: u64 = 4 << 20;
/// The sections of the fixture's devices: what this Kestrel's `pc` machine without virtio devices saves.
const DEVICES: &[&str] =
    &["serial0", "i8042", "cmos", "acpi-pm", "reset-port", "pci.config-io", "pci.00.0.host-bridge"];
/// How far the guest counts before the save: enough that the count is well under way.
const SAVE_AT_COUNT: u64 = 1000;
/// The most a small payload VM's snapshot may take in the repository.
const MAX_FIXTURE_BYTES: u64 = 256 << 10;

fn workspace_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(relative)
}

/// The fixture's path, after saving it anew if asked to (once per test binary; the other tests wait for it).
fn fixture() -> &'static Path {
    static FIXTURE_PATH: OnceLock<PathBuf> = OnceLock::new();
    FIXTURE_PATH.get_or_init(|| {
        let path = workspace_path(FIXTURE);
        if std::env::var_os(REGENERATE).is_some() {
            regenerate(&path, &workspace_path(CONSOLE));
        }
        path
    })
}

/// Saves the counting payload as the fixture describes, and the end of its console.
fn regenerate(fixture: &Path, console: &Path) {
    assert_eq!(
        snapshot::FORMAT_VERSION,
        1,
        "{REGENERATE} is set, but this Kestrel writes format version {}: the fixture is format version 1's and must \
         stay what that version wrote; add a fixture for the new version instead",
        snapshot::FORMAT_VERSION
    );
    assert!(kvm_available(), "{REGENERATE} is set, but this machine cannot run guests");
    let dir = Dir::new("fixture-save");
    let saved = dir.path("vm.ksnap");
    let source = Vm::start_kernel(&dir, "source", BZIMAGE, MEMORY);
    source.wait_for_count(SAVE_AT_COUNT);
    migrate(&mut source.client(), &file_uri(&saved));
    let source_console = source.settled_console();
    source.quit();
    // The last complete line and the one the save cut short (perhaps between its "\r" and "\n").
    let last_line_end = source_console.rfind("\r\n").expect("the guest printed lines");
    let tail_start = source_console[..last_line_end].rfind("\r\n").map_or(0, |at| at + 2);
    // Through renames, so that a run that fails half-way leaves the committed files as they were.
    let fresh = |path: &Path| PathBuf::from(format!("{}.new", path.display()));
    std::fs::copy(&saved, fresh(fixture)).unwrap();
    std::fs::write(fresh(console), &source_console[tail_start..]).unwrap();
    std::fs::rename(fresh(fixture), fixture).unwrap();
    std::fs::rename(fresh(console), console).unwrap();
    eprintln!(
        "wrote {} ({} bytes) and {}",
        fixture.display(),
        std::fs::metadata(fixture).unwrap().len(),
        console.display()
    );
}

/// What this Kestrel's `pc` machine with one vCPU, no virtio devices and `memory_bytes` of RAM expects of a
/// snapshot, on a host whose CPU is `cpu`.
fn expected_machine(cpu: CpuIdentity, memory_bytes: u64) -> Expected {
    let sections = ["vm", "vcpu.0"].iter().chain(DEVICES).map(|&name| SectionSpec::required(name, 1..=1)).collect();
    Expected {
        arch: "x86_64".into(),
        machine: "pc".into(),
        cpu,
        memory: vec![RegionLayout { guest_addr: 0, size: memory_bytes }],
        sections,
    }
}

fn fixture_header(path: &Path) -> Header {
    snapshot::read_header(BufReader::new(File::open(path).expect("the committed fixture"))).unwrap()
}

/// Opens `path` as a snapshot of the fixture's machine with `memory_bytes` of RAM, as a host with the CPU the
/// guest saw would: everything but the host's CPU is checked.
fn open_as_saved(path: &Path, memory_bytes: u64) -> snapshot::Result<Snapshot<BufReader<File>>> {
    let header = fixture_header(path);
    Snapshot::open(BufReader::new(File::open(path).unwrap()), &expected_machine(header.cpu, memory_bytes))
}

/// Whether this host's KVM offers a guest every CPU feature the fixture's guest saw: the check a restore makes.
fn host_verdict(header: &Header) -> Result<(), snapshot::Error> {
    let host = vmm::host_cpu_identity(1).expect("this host's CPU identity");
    host.check_can_run(&header.cpu)
}

/// The line kestrel refuses `path` with on this host: the CPU-identity refusal if the host lacks the guest's CPU
/// (the header is checked before anything else), `otherwise` if it has it.
fn refusal_line(path: &Path, verdict: &Result<(), snapshot::Error>, otherwise: String) -> String {
    match verdict {
        Ok(()) => otherwise,
        Err(cpu) => format!("kestrel: cannot restore '{}': {cpu}", path.display()),
    }
}

/// Runs kestrel restoring `path` (`-incoming file:`) with the payload, `flood` and `machine`; the guest must not
/// run, kestrel must exit non-zero with exactly the line `expected` on stderr.
fn assert_refused_with(dir: &Dir, path: &Path, machine: &[&str], expected: &str) {
    let console = dir.path("refused.log");
    let _ = std::fs::remove_file(&console);
    let mut cmd = kestrel_command();
    cmd.args(["--kernel", payload(BZIMAGE).to_str().unwrap(), "--cmdline", "flood"]);
    cmd.arg("--serial").arg(format!("file:{}", console.display()));
    cmd.arg("-incoming").arg(file_uri(path));
    cmd.args(machine).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    let output = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "kestrel accepted {} with {machine:?}: {stderr}", path.display());
    assert_eq!(stderr, format!("{expected}\n"), "not the one refusal line expected");
    assert!(std::fs::read_to_string(&console).unwrap_or_default().is_empty(), "the guest ran");
}

#[test]
fn the_fixture_reads_on_any_host() {
    let path = fixture();
    let bytes = std::fs::read(path).expect("the committed fixture");
    assert!(bytes.len() as u64 <= MAX_FIXTURE_BYTES, "{} bytes: too large to keep in the repository", bytes.len());
    assert_eq!(bytes[8..12], 1u32.to_le_bytes(), "the fixture is format version 1's");
    let header = fixture_header(path);
    assert_eq!((header.kestrel_version.as_str(), header.arch.as_str()), ("0.1.0", "x86_64"));
    assert_eq!(header.machine, "pc");
    assert!(!header.cpu.vendor.is_empty() && !header.cpu.features.is_empty(), "{:?}", header.cpu);

    // Every section is one this Kestrel's pc machine has, and its vCPU and VM states decode as this Kestrel's.
    let mut snapshot = open_as_saved(path, MEMORY_BYTES).unwrap();
    let vcpu: VcpuStateX86_64 = snapshot.state("vcpu.0").unwrap();
    let vm: VmStateX86_64 = snapshot.state("vm").unwrap();
    assert_ne!((vcpu, vm), Default::default(), "the saved states are empty");
    for name in DEVICES {
        snapshot.state::<serde_json::Value>(name).unwrap();
    }
    // Zero pages are not stored: the payload's code, data, stack, page tables and boot tables are a few pages.
    let stats = snapshot.memory().stats();
    assert_eq!(stats.pages, MEMORY_BYTES / 4096);
    assert!(stats.stored_pages > 0 && stats.stored_pages <= 32, "{stats:?}");
    snapshot.verify_memory().unwrap();
}

#[test]
fn the_fixture_restores_and_counts_on_where_the_cpu_admits_it() {
    if !kvm_available() {
        return;
    }
    let path = fixture();
    let dir = Dir::new("fixture-restore");
    let incoming = file_uri(path);
    let mut machine = vec!["-incoming", &incoming];
    machine.extend_from_slice(MEMORY);
    if let Err(cpu) = host_verdict(&fixture_header(path)) {
        let line = format!("kestrel: cannot restore '{}': {cpu}", path.display());
        assert_refused_with(&dir, path, MEMORY, &line);
        eprintln!("SKIPPED: this host's CPU cannot run the fixture's guest, refused as it must be: {line}");
        return;
    }
    let saved_console = std::fs::read_to_string(workspace_path(CONSOLE)).expect("the fixture's console");
    let started = Instant::now();
    let restored = Vm::start_kernel(&dir, "restored", BZIMAGE, &machine);
    let first_output = wait_for(|| !restored.console().is_empty());
    let first_count = wait_for(|| !counts(&restored.console()).is_empty());
    eprintln!(
        "restore of the fixture: exec to the guest's first output {:.1} ms, to its first complete count {:.1} ms",
        (first_output - started).as_secs_f64() * 1e3,
        (first_count - started).as_secs_f64() * 1e3
    );
    let saved_last = *counts(&saved_console).last().expect("the fixture's console has a count");
    restored.wait_for_count(saved_last + 500);
    assert_eq!(restored.client().status(), "running");
    assert_count_continues(&saved_console, &restored.console());
    restored.quit();
}

/// When `ready` first holds; a test failure after [`TIMEOUT`].
fn wait_for(ready: impl Fn() -> bool) -> Instant {
    let deadline = Instant::now() + TIMEOUT;
    while !ready() {
        assert!(Instant::now() < deadline, "the restored guest printed nothing");
        thread::sleep(Duration::from_micros(500));
    }
    Instant::now()
}

#[test]
fn a_damaged_fixture_and_another_memory_size_are_refused_with_one_line() {
    if !kvm_available() {
        return;
    }
    let path = fixture();
    let bytes = std::fs::read(path).expect("the committed fixture");
    let verdict = host_verdict(&fixture_header(path));
    let dir = Dir::new("fixture-refused");
    let damaged = |name: &str, at: usize| {
        let mut damaged = bytes.clone();
        damaged[at] ^= 0x01;
        let damaged_path = dir.path(name);
        std::fs::write(&damaged_path, damaged).unwrap();
        damaged_path
    };
    let mut machine = MEMORY.to_vec();

    // A flipped bit in the header: its checksum refuses it before the CPU is looked at, on every host.
    let header = damaged("header.ksnap", 16 + 2);
    let corrupted = snapshot::read_header(File::open(&header).unwrap()).unwrap_err();
    assert!(matches!(corrupted, snapshot::Error::Corrupted { .. }), "{corrupted}");
    let line = format!("kestrel: cannot restore '{}': {corrupted}", header.display());
    assert_refused_with(&dir, &header, &machine, &line);

    // A flipped bit in the last stored page: the pages are mapped from the file, then checked through the mapping.
    let last_page = open_as_saved(path, MEMORY_BYTES).unwrap().memory().extents().last().map(|e| e.file_offset + e.len);
    let page = damaged("page.ksnap", last_page.expect("stored pages") as usize - 4096 + 100);
    let mut snapshot = open_as_saved(&page, MEMORY_BYTES).unwrap();
    let corrupted = snapshot.verify_memory().unwrap_err();
    assert!(matches!(corrupted, snapshot::Error::Corrupted { ref what, .. } if what == "the guest memory pages"));
    let line = refusal_line(&page, &verdict, format!("kestrel: cannot restore guest memory: {corrupted}"));
    assert_refused_with(&dir, &page, &machine, &line);

    // The intact fixture, with twice the memory on the command line.
    let mismatch = open_as_saved(path, 2 * MEMORY_BYTES).err().expect("a fixture for 4 MiB read as 8 MiB");
    assert!(matches!(mismatch, snapshot::Error::MemorySize { .. }), "{mismatch}");
    machine[1] = "8M";
    let line = refusal_line(path, &verdict, format!("kestrel: cannot restore '{}': {mismatch}", path.display()));
    assert_refused_with(&dir, path, &machine, &line);
}

/// The fixture saved again as if its guest had seen a CPU feature no host offers (bit 32 of a 32-bit register):
/// the refusal the restore test expects on a host that lacks the fixture's CPU, exercised on every host.
#[test]
fn a_guest_that_saw_a_feature_this_host_lacks_is_refused_with_the_cpu_line() {
    if !kvm_available() {
        return;
    }
    let path = fixture();
    let dir = Dir::new("fixture-cpu");
    let mut snapshot = open_as_saved(path, MEMORY_BYTES).unwrap();
    let mut header = snapshot.header().clone();
    header.cpu.features.insert("0x7.0.ebx.32".into());
    let foreign = dir.path("foreign-cpu.ksnap");
    let mut writer = snapshot::Writer::new(File::create(&foreign).unwrap(), &header).unwrap();
    let names: Vec<String> = snapshot.section_names().map(String::from).collect();
    for name in &names {
        let section = snapshot.section(name).unwrap();
        writer.state(name, section.version(), &section.decode::<serde_json::Value>().unwrap()).unwrap();
    }
    let mut memory = vec![0; MEMORY_BYTES as usize];
    snapshot.read_memory_into(&mut [GuestRegionMut { guest_addr: 0, bytes: &mut memory }]).unwrap();
    let page_size = snapshot.memory().page_size();
    writer.memory(page_size, &[GuestRegion { guest_addr: 0, bytes: &memory, populated: None }]).unwrap();
    writer.finish().unwrap();

    let lacking = host_verdict(&header).expect_err("a host that offers bit 32 of CPUID leaf 7's EBX");
    assert!(matches!(&lacking, snapshot::Error::CpuFeaturesMissing { missing } if missing == &["0x7.0.ebx.32"]));
    let line = format!("kestrel: cannot restore '{}': {lacking}", foreign.display());
    assert_eq!(line.lines().count(), 1);
    assert_refused_with(&dir, &foreign, MEMORY, &line);
}

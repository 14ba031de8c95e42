#![cfg(target_arch = "x86_64")]

//! Boots the repo's tiny guest payloads (tests/payloads) with the real `kestrel` binary on this machine's KVM:
//! every boot protocol, SMP bring-up, reset, power-off, the serial console both ways, the RTC, unmapped MMIO
//! and a triple fault.

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use support::{boot, kestrel, kvm_available, payload, run_typing_after, run_with_timeout};

const BZIMAGE: &str = "probe.bzImage";
const ELF: &str = "probe.elf";
const PVH: &str = "probe.pvh.elf";

fn boots_by_protocol_and_powers_off(payload_name: &str, entry: &str) {
    if !kvm_available() {
        return;
    }
    let run = boot(payload_name, "poweroff now", &[]);
    run.assert_success();
    run.assert_stdout_has(&format!("kestrel-probe: entry={entry} cmdline=\"poweroff now\""));
    run.assert_stdout_has("probe: poweroff");
}

#[test]
fn bzimage_boots_by_the_64_bit_protocol() {
    boots_by_protocol_and_powers_off(BZIMAGE, "bzimage");
}

#[test]
fn elf_vmlinux_boots_by_the_64_bit_protocol() {
    boots_by_protocol_and_powers_off(ELF, "elf");
}

#[test]
fn pvh_elf_boots_by_the_pvh_entry() {
    boots_by_protocol_and_powers_off(PVH, "pvh");
}

fn every_vcpu_checks_in(payload_name: &str, cpus: u32) {
    if !kvm_available() {
        return;
    }
    let cpus_arg = cpus.to_string();
    let run = boot(payload_name, "smp", &["--cpus", &cpus_arg]);
    run.assert_success();
    run.assert_stdout_has(&format!("probe: smp {cpus}/{cpus} cpus"));
    for id in 1..cpus {
        run.assert_stdout_has(&format!("probe: cpu {id} up"));
    }
}

/// libvirt's default topology for N vCPUs, N sockets of one core (`-smp 4,sockets=4,cores=1,threads=1`), and two
/// sockets of two cores: every vCPU comes up with its APIC ID, which numbers the socket above the core.
#[test]
fn vcpus_in_several_sockets_come_up() {
    if !kvm_available() {
        return;
    }
    for smp in ["4,sockets=4,cores=1,threads=1", "4,sockets=2,cores=2"] {
        let run = boot(PVH, "smp", &["-smp", smp]);
        run.assert_success();
        run.assert_stdout_has("probe: smp 4/4 cpus");
        for id in 1..4 {
            run.assert_stdout_has(&format!("probe: cpu {id} up"));
        }
    }
    let run = boot(PVH, "smp", &["-smp", "6,sockets=2,cores=3"]);
    assert!(!run.status.success() && run.stderr.contains("must be a power of two"), "{}", run.describe());
}

#[test]
fn one_vcpu_boots_alone() {
    every_vcpu_checks_in(PVH, 1);
}

#[test]
fn four_vcpus_come_up_through_init_sipi_pvh() {
    every_vcpu_checks_in(PVH, 4);
}

#[test]
fn four_vcpus_come_up_through_init_sipi_bzimage() {
    every_vcpu_checks_in(BZIMAGE, 4);
}

#[test]
fn sixty_four_vcpus_come_up_with_only_the_madt_to_describe_them() {
    // More vCPUs than the MP table holds: the ACPI MADT alone announces them.
    every_vcpu_checks_in(PVH, 64);
}

#[test]
fn guest_reset_reboots_in_place() {
    if !kvm_available() {
        return;
    }
    // The payload resets by the keyboard controller and by the reset register alternately, counting boots in
    // CMOS NVRAM, which survives a reset.
    let run = boot(PVH, "reset", &["--cpus", "2"]);
    run.assert_success();
    for n in 1..=3 {
        run.assert_stdout_has(&format!("probe: boot {n}"));
    }
    run.assert_stdout_has("probe: reset done");
    assert_eq!(run.stdout.matches("kestrel-probe: entry=pvh").count(), 3, "{}", run.describe());
}

/// A guest that writes the reset register and then triple-faults at once (Linux's last fallback when a reset does
/// not happen immediately) is reset, not reported as failed: the vCPU must not run on after its reset request.
#[test]
fn a_triple_fault_right_after_a_reset_request_is_part_of_the_reset() {
    if !kvm_available() {
        return;
    }
    for _ in 0..5 {
        let run = boot(PVH, "cf9fault", &[]);
        run.assert_success();
        run.assert_stdout_has("probe: reset done");
        assert!(!run.stderr.contains("triple fault"), "{}", run.describe());
    }
}

#[test]
fn no_reboot_turns_a_guest_reset_into_an_exit() {
    if !kvm_available() {
        return;
    }
    let run = boot(BZIMAGE, "reset", &["--no-reboot"]);
    run.assert_success();
    run.assert_stdout_has("probe: boot 1");
    assert!(!run.stdout.contains("probe: boot 2"), "the guest must not come back\n{}", run.describe());
}

#[test]
fn rtc_reads_the_host_clock() {
    if !kvm_available() {
        return;
    }
    let run = boot(ELF, "rtc", &[]);
    run.assert_success();
    let line = run.stdout.lines().find_map(|l| l.trim().strip_prefix("probe: rtc ")).unwrap_or_else(|| {
        panic!("no rtc line\n{}", run.describe());
    });
    let guest = parse_utc(line).unwrap_or_else(|| panic!("unparsable rtc line {line:?}"));
    let host = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((host - guest).abs() <= 5, "guest RTC {line} is {}s away from the host clock", host - guest);
}

/// Seconds since the epoch of "YYYY-MM-DD HH:MM:SS" (UTC).
fn parse_utc(text: &str) -> Option<i64> {
    let (date, time) = text.split_once(' ')?;
    let d: Vec<i64> = date.split('-').map(|p| p.parse().ok()).collect::<Option<_>>()?;
    let t: Vec<i64> = time.split(':').map(|p| p.parse().ok()).collect::<Option<_>>()?;
    let (y, m, day) = (d[0], d[1], d[2]);
    // Days from civil (proleptic Gregorian), independent of the VMM's own conversion.
    let (y, m) = if m <= 2 { (y - 1, m + 12) } else { (y, m) };
    let days = 365 * y + y / 4 - y / 100 + y / 400 + (153 * (m - 3) + 2) / 5 + day - 719_469;
    Some(days * 86_400 + t[0] * 3600 + t[1] * 60 + t[2])
}

#[test]
fn pit_ticks_arrive_on_the_ioapic_pin_the_madt_announces() {
    if !kvm_available() {
        return;
    }
    // Linux's timer depends on this: without the PC routing (IRQ0 on IOAPIC pin 2) no tick ever arrives.
    let run = boot(BZIMAGE, "pit", &[]);
    run.assert_success();
    run.assert_stdout_has("probe: pit ticks 10");
}

#[test]
fn serial_input_reaches_the_guest_by_interrupt_and_echoes() {
    if !kvm_available() {
        return;
    }
    let kernel = payload(PVH);
    let cmd = kestrel(&["--kernel", kernel.to_str().unwrap(), "--cmdline", "echo", "--memory", "64M"]);
    let typed = b"hello from the host, longer than the sixty-four byte UART FIFO of a 16550A.....q";
    let run = run_typing_after(cmd, Some(("probe: echo ready", typed)), Duration::from_secs(20));
    run.assert_success();
    run.assert_stdout_has("probe: echo ready");
    run.assert_stdout_has(std::str::from_utf8(&typed[..typed.len() - 1]).unwrap());
    run.assert_stdout_has("probe: echo done");
}

/// With `wait=on` Kestrel holds the guest until a client connects, so the client sees the guest's first output; the
/// same connection carries input to the guest.
#[test]
fn serial_console_on_a_unix_socket_both_ways() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    if !kvm_available() {
        return;
    }
    let path = std::env::temp_dir().join(format!("kestrel-serial-{}.sock", std::process::id()));
    let kernel = payload(PVH);
    let serial = format!("unix:{},server=on,wait=on", path.display());
    let cmd =
        kestrel(&["--kernel", kernel.to_str().unwrap(), "--cmdline", "echo", "--memory", "64M", "--serial", &serial]);
    let child = std::thread::spawn(move || run_with_timeout(cmd, Duration::from_secs(20)));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let client = loop {
        match UnixStream::connect(&path) {
            Ok(client) => break client,
            Err(e) if std::time::Instant::now() > deadline => panic!("no console socket at {}: {e}", path.display()),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut lines = BufReader::new(client.try_clone().unwrap()).lines();
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.contains("probe: echo ready")) {
        seen.push(lines.next().expect("console closed before the prompt").expect("reading the console"));
    }
    (&client).write_all(b"over the socket q").unwrap();
    let run = child.join().unwrap();
    run.assert_success();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let all = seen.join("\n") + "\n" + &rest.join("\n");
    assert!(all.contains("over the socket"), "the echo must come back over the socket:\n{all}");
    assert!(all.contains("probe: echo done"), "{all}");
    assert!(!run.stdout.contains("probe: echo ready"), "output must go to the socket only\n{}", run.describe());
    let _ = std::fs::remove_file(&path);
}

#[test]
fn serial_output_can_go_to_a_file() {
    if !kvm_available() {
        return;
    }
    let path = std::env::temp_dir().join(format!("kestrel-serial-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let serial = format!("file:{}", path.display());
    let run = boot(PVH, "poweroff", &["--serial", &serial]);
    run.assert_success();
    assert!(!run.stdout.contains("kestrel-probe"), "output must go to the file only\n{}", run.describe());
    let logged = std::fs::read_to_string(&path).unwrap();
    assert!(logged.contains("probe: poweroff"), "{logged}");
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn unmapped_mmio_reads_all_ones_and_the_guest_carries_on() {
    if !kvm_available() {
        return;
    }
    let run = boot(ELF, "mmio", &[]);
    run.assert_success();
    assert_eq!(run.stdout.matches("probe: mmio read 0xffffffff").count(), 2, "{}", run.describe());
    assert!(run.stderr.contains("unmapped MMIO address 0xd0000000"), "{}", run.describe());
}

#[test]
fn memory_above_4_gib_is_usable() {
    if !kvm_available() {
        return;
    }
    let run = boot(BZIMAGE, "poweroff", &["--memory", "5G"]);
    run.assert_success();
    run.assert_stdout_has("probe: poweroff");
}

#[test]
fn triple_fault_reports_the_vcpu_state_and_fails() {
    if !kvm_available() {
        return;
    }
    let run = boot(PVH, "triplefault", &[]);
    assert!(!run.status.success(), "{}", run.describe());
    // Hardware-assisted KVM reports the shutdown; KVM-PVM (shadow paging, no VT-x/AMD-V) fails to emulate the
    // fault delivery and reports an internal error instead. Either way the guest's CPU is dead.
    assert!(run.stderr.contains("triple fault") || run.stderr.contains("KVM internal error"), "{}", run.describe());
    assert!(run.stderr.contains("rip="), "the vCPU state must be printed\n{}", run.describe());
}

#[test]
fn sigterm_stops_a_running_guest_cleanly() {
    if !kvm_available() {
        return;
    }
    let kernel = payload(PVH);
    let mut child = kestrel(&["--kernel", kernel.to_str().unwrap(), "--cmdline", "spin", "--cpus", "2"])
        .spawn()
        .expect("starting kestrel");
    std::thread::sleep(Duration::from_millis(300));
    assert!(child.try_wait().unwrap().is_none(), "the spinning guest must still be running");
    // SAFETY: sends a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("terminating on signal 15"), "{stderr}");
}

mod bad_input {
    use super::*;

    /// Runs kestrel expecting it to refuse: non-zero exit, one clear line on stderr naming `expected`, no panic.
    fn refused(args: &[&str], expected: &str) {
        let run = run_with_timeout(kestrel(args), Duration::from_secs(20));
        assert!(!run.status.success(), "{}", run.describe());
        assert!(run.stderr.contains(expected), "stderr lacks {expected:?}\n{}", run.describe());
        assert!(!run.stderr.contains("panicked"), "{}", run.describe());
        assert_eq!(run.stderr.trim_end().lines().count(), 1, "one line, please\n{}", run.describe());
    }

    #[test]
    fn command_line_mistakes() {
        refused(&["--frobnicate"], "unknown option '--frobnicate'");
        refused(&[], "no kernel given");
        refused(&["--kernel", "k", "--memory", "12Q"], "invalid memory size '12Q'");
        refused(&["--kernel", "k", "--memory", "-5"], "invalid memory size '-5'");
        refused(&["--kernel", "k", "--cpus", "0"], "invalid number of CPUs '0'");
        refused(&["--kernel", "k", "--cpus", "many"], "invalid number of CPUs 'many'");
        refused(&["--kernel", "k", "--serial", "carrier-pigeon"], "invalid serial mode 'carrier-pigeon'");
        refused(&["--kernel"], "option '--kernel' needs a value");
    }

    #[test]
    fn missing_and_unreadable_files() {
        refused(&["--kernel", "/nonexistent/bzImage"], "cannot open kernel '/nonexistent/bzImage'");
        let kernel = payload(PVH);
        refused(&["--kernel", kernel.to_str().unwrap(), "--initrd", "/nonexistent/initrd"], "cannot open initrd");
    }

    #[test]
    fn files_that_are_no_kernel() {
        if !kvm_available() {
            return;
        }
        let dir = std::env::temp_dir().join(format!("kestrel-bad-kernel-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk");
        std::fs::write(&junk, vec![0x5a; 64 * 1024]).unwrap();
        let empty = dir.join("empty");
        std::fs::write(&empty, b"").unwrap();
        for path in [&junk, &empty, &dir] {
            refused(&["--kernel", path.to_str().unwrap()], "cannot boot the kernel");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn memory_too_small_or_larger_than_the_host() {
        let kernel = payload(PVH);
        let k = kernel.to_str().unwrap();
        refused(&["--kernel", k, "--memory", "1M"], "too small");
        refused(&["--kernel", k, "--memory", "64T"], "more than this host's");
    }

    #[test]
    fn too_many_vcpus() {
        if !kvm_available() {
            return;
        }
        let kernel = payload(PVH);
        refused(&["--kernel", kernel.to_str().unwrap(), "--cpus", "255"], "vCPUs requested but");
    }

    #[test]
    fn command_line_longer_than_linux_accepts() {
        if !kvm_available() {
            return;
        }
        let kernel = payload(BZIMAGE);
        let long = "x".repeat(5000);
        refused(&["--kernel", kernel.to_str().unwrap(), "--cmdline", &long], "command line");
    }
}

#[test]
fn help_describes_every_option() {
    let run = run_with_timeout(kestrel(&["--help"]), Duration::from_secs(10));
    run.assert_success();
    for option in ["--kernel", "--initrd", "--cmdline", "--memory", "--cpus", "--serial", "--no-reboot"] {
        run.assert_stdout_has(option);
    }
}

/// What the payload's `virtio` command must print for each malformed request it puts on disk A (slot 0), as
/// devices/src/virtio/block.rs documents the contract: a chain that is not a chain, or has no device-writable
/// status byte in guest memory, comes back with used length 0 and nothing written (status 255 is the payload's
/// "never written"); a well-formed chain naming memory outside the guest or lacking a readable header gets
/// IOERR (status 1); broken rings (an available index far ahead, a head outside the table, a descriptor table
/// outside memory) make the device ask for a reset. `data=intact`: the device never wrote the request's data
/// buffer, which it must not for a failed request nor for a buffer it was only given to read.
const VIRTIO_HOSTILE_OUTCOMES: &[(&str, &str)] = &[
    ("desc-outside", "used id=0 len=1 status=1 data=intact"),
    ("status-outside", "used id=0 len=0 status=255 data=intact"),
    ("len-ffffffff", "used id=0 len=0 status=255 data=intact"),
    ("loop", "used id=0 len=0 status=255 data=intact"),
    ("too-long", "used id=0 len=0 status=255 data=intact"),
    ("next-outside", "used id=0 len=0 status=255 data=intact"),
    ("zero-len-header", "used id=0 len=1 status=1 data=intact"),
    // A read with no data descriptor left is a read of nothing: done, only the status byte written.
    ("zero-len-data", "used id=0 len=1 status=0 data=intact"),
    // A write of sector 1 whose status byte is device-read-only: refused before the disk is touched.
    ("status-readonly", "used id=0 len=0 status=255 data=intact"),
    ("header-writable", "used id=0 len=1 status=1 data=intact"),
    // A read whose data buffer is device-read-only: nothing to read into, the buffer stays as it was.
    ("read-into-readonly", "used id=0 len=1 status=0 data=intact"),
    ("avail-jump", "needs-reset data=intact"),
    ("head-outside", "needs-reset data=intact"),
    ("rings-outside", "queue refused needs-reset"),
];

/// A disk image of `sectors` 512-byte sectors starting with `magic`, the rest a pattern unlike the payload's
/// fill byte (0x5a) so that any stray write shows.
fn disk_image(magic: &[u8; 8], sectors: usize, seed: u8) -> Vec<u8> {
    let mut image: Vec<u8> = (0..sectors * 512).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1).collect();
    image[..8].copy_from_slice(magic);
    image
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The hostile-queue test: the payload drives virtio-blk A (writable) with malformed chains and broken
/// rings, one at a time on a freshly reset device, then reads read-only disk B while A is still broken, and
/// finally resets A and writes and reads it. Kestrel must stay up, answer every case, and leave B untouched and
/// A changed only where the final good write went (sector 2, the payload's 0x5a fill).
fn hostile_virtio_chains_leave_a_second_disk_working(payload_name: &str) {
    let dir = std::env::temp_dir().join(format!("kestrel-virtio-hostile-{}-{payload_name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (a_path, b_path) = (dir.join("a.img"), dir.join("b.img"));
    let a_before = disk_image(b"ALPHAIMG", 128, 3);
    let b_before = disk_image(b"KESTREL!", 128, 101);
    std::fs::write(&a_path, &a_before).unwrap();
    std::fs::write(&b_path, &b_before).unwrap();
    let a_arg = format!("path={}", a_path.display());
    let b_arg = format!("path={},readonly=on", b_path.display());

    // The probe drives virtio-mmio at the platform window's fixed slots: the microvm machine.
    let run = boot(payload_name, "virtio", &["--machine", "microvm", "--disk", &a_arg, "--disk", &b_arg]);
    run.assert_success();
    assert!(!run.stderr.contains("panicked"), "{}", run.describe());
    run.assert_stdout_has("probe: virtio slot 0: blk (id 2)");
    run.assert_stdout_has("probe: virtio slot 1: blk (id 2)");
    run.assert_stdout_has("probe: virtio slot 0 ready");
    run.assert_stdout_has("probe: virtio slot 1 ready");
    for (name, outcome) in VIRTIO_HOSTILE_OUTCOMES {
        run.assert_stdout_has(&format!("probe: virtio hostile {name}: {outcome}\r\n"));
    }
    assert_eq!(
        run.stdout.matches("probe: virtio hostile ").count(),
        VIRTIO_HOSTILE_OUTCOMES.len(),
        "every hostile case is listed here\n{}",
        run.describe()
    );
    assert!(!run.stdout.contains("probe: virtio failed"), "{}", run.describe());
    run.assert_stdout_has(&format!("probe: virtio ok b={} a={}\r\n", hex(b"KESTREL!"), hex(b"ALPHAIMG")));
    run.assert_stdout_has("probe: virtio done");

    let b_after = std::fs::read(&b_path).unwrap();
    assert!(b_after == b_before, "read-only disk B changed\n{}", run.describe());
    let a_after = std::fs::read(&a_path).unwrap();
    assert_eq!(a_after.len(), a_before.len(), "disk A changed size");
    let mut a_expected = a_before.clone();
    a_expected[2 * 512..3 * 512].fill(0x5a);
    let changed: Vec<usize> =
        (0..a_after.len() / 512).filter(|s| a_after[s * 512..][..512] != a_expected[s * 512..][..512]).collect();
    assert!(changed.is_empty(), "disk A sectors {changed:?} differ from the one good write\n{}", run.describe());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn hostile_virtio_chains_leave_a_second_disk_working_elf() {
    if !kvm_available() {
        return;
    }
    hostile_virtio_chains_leave_a_second_disk_working(ELF);
}

#[test]
fn hostile_virtio_chains_leave_a_second_disk_working_bzimage() {
    if !kvm_available() {
        return;
    }
    hostile_virtio_chains_leave_a_second_disk_working(BZIMAGE);
}

/// CPUID as the probe's `cpuid` command prints it: leaf 1's ECX and EDX, leaf 7.0's EBX, leaf 0x8000_0001's ECX.
fn guest_cpuid(extra: &[&str]) -> [u32; 4] {
    let run = boot(ELF, "cpuid", extra);
    run.assert_success();
    let line =
        run.stdout.lines().find(|l| l.starts_with("probe: cpuid ")).unwrap_or_else(|| panic!("{}", run.describe()));
    let words: Vec<u32> = line
        .split_whitespace()
        .skip(2)
        .map(|field| u32::from_str_radix(field.split('=').nth(1).unwrap().trim(), 16).unwrap())
        .collect();
    words.try_into().unwrap_or_else(|w| panic!("{w:?} in {line}"))
}

/// `-cpu kvm64` as libvirt's `host-model` passes it on a host it has no model for: QEMU's generic 64-bit model,
/// each of its features the host lacks turned off (KVM-PVM reports no SSE3), the host's CPUID with every named
/// feature outside the model cleared. Checked where the guest reads what Kestrel set: leaf 0x8000_0001 and leaf
/// 1's TSC-deadline bit (under KVM-PVM the guest reads most of leaf 1 and leaf 7 from the CPU itself, not from
/// KVM). `-cpu host,FEATURE=off` clears one feature; a model or feature the host cannot give is refused.
#[test]
fn a_named_cpu_model_narrows_the_guests_cpuid_and_features_turn_off_one_by_one() {
    if !kvm_available() {
        return;
    }
    let kvm64 = {
        let run = boot(ELF, "cpuid", &["-cpu", "kvm64"]);
        match run.stderr.split("needs ").nth(1).and_then(|rest| rest.split(" which this host lacks").next()) {
            Some(lacking) if !run.status.success() => {
                format!("kvm64,{}", lacking.split(", ").map(|f| format!("{f}=off")).collect::<Vec<_>>().join(","))
            }
            _ => "kvm64".to_string(),
        }
    };
    let [host_1c, _, _, host_ext_c] = guest_cpuid(&[]);
    let [kvm64_1c, _, _, kvm64_ext_c] = guest_cpuid(&["-cpu", &kvm64]);
    // lahf_lm, abm, sse4a, 3dnowprefetch, xop...: none is kvm64's, some are the host's.
    assert_eq!(kvm64_ext_c, 0, "{kvm64}: {kvm64_ext_c:08x} (host {host_ext_c:08x})");
    assert_ne!(host_ext_c, 0, "this host offers nothing in leaf 0x8000_0001 ECX");
    let tsc_deadline = 1 << 24;
    assert_ne!(host_1c & tsc_deadline, 0, "Kestrel offers TSC-deadline: {host_1c:08x}");
    assert_eq!(kvm64_1c & tsc_deadline, 0, "{kvm64}: {kvm64_1c:08x}");
    let [with_it, ..] = guest_cpuid(&["-cpu", &format!("{kvm64},+tsc-deadline")]);
    assert_eq!(with_it, kvm64_1c | tsc_deadline);

    // One feature off the host's CPU: only it changes.
    let lahf_lm = host_ext_c & 1;
    let [c, _, _, e] = guest_cpuid(&["-cpu", "host,lahf_lm=off,tsc-deadline=off"]);
    assert_eq!((c, e), (host_1c & !tsc_deadline, host_ext_c & !lahf_lm));

    // What the host cannot give: one line and a failure, no guest.
    for (cpu, says) in [
        ("Skylake-Client", "CPU model 'Skylake-Client' is not offered here (models: host, kvm64)"),
        ("host,warp-drive=on", "CPU feature 'warp-drive' is not one Kestrel knows"),
        ("host,ia64=on", "CPU feature 'ia64' cannot be given to guests: this host lacks it"),
    ] {
        let run = boot(ELF, "cpuid", &["-cpu", cpu]);
        assert!(!run.status.success() && run.stderr.contains(says), "{cpu}: {}", run.describe());
        assert!(!run.stdout.contains("probe:"), "{cpu}: the guest ran: {}", run.describe());
    }
}

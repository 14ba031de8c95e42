// support/ (kvm_available) needs kvm-ioctls, which only these hosts build.
#![cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]

//! The command line against hostile or careless input, through the real `kestrel` binary: arguments that are not
//! UTF-8 (paths must keep their bytes, text must be refused with one line, never a panic) and ids given twice
//! (refused in QEMU 7.2's words).

mod support;

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{run_with_timeout, Run};

/// Parsing fails before anything is opened, so this never needs to exist.
const NO_KERNEL: &str = "/nonexistent/kestrel-cli-hardening/kernel";

fn kestrel_os(args: &[&OsStr]) -> Command {
    let mut cmd = support::kestrel_command();
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

fn os(bytes: &[u8]) -> &OsStr {
    OsStr::from_bytes(bytes)
}

/// A usage error: exit status 2 and exactly one line on stderr, which contains `needle`; no panic.
#[track_caller]
fn assert_one_line_usage_error(run: &Run, needle: &str) {
    assert!(!run.stderr.contains("panicked"), "kestrel panicked\n{}", run.describe());
    assert_eq!(run.status.code(), Some(2), "expected a usage error (exit 2)\n{}", run.describe());
    assert_eq!(run.stderr.lines().count(), 1, "expected one line on stderr\n{}", run.describe());
    assert!(run.stderr.starts_with("kestrel: "), "{}", run.describe());
    assert!(run.stderr.contains(needle), "stderr lacks {needle:?}\n{}", run.describe());
}

fn run_args(args: &[&OsStr]) -> Run {
    run_with_timeout(kestrel_os(args), Duration::from_secs(30))
}

/// A kernel whose file name is not UTF-8 boots: the path reaches open(2) with its exact bytes.
#[cfg(target_arch = "x86_64")]
#[test]
fn kernel_path_that_is_not_utf8_boots() {
    if !support::kvm_available() {
        return;
    }
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cli-hardening");
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = dir.join(os(b"probe-\xff\xfe.pvh.elf"));
    std::fs::copy(support::payload("probe.pvh.elf"), &kernel).unwrap();
    let run = run_args(&[
        os(b"--kernel"),
        kernel.as_os_str(),
        os(b"--cmdline"),
        os(b"poweroff"),
        os(b"--memory"),
        os(b"128M"),
    ]);
    run.assert_success();
    run.assert_stdout_has("probe: poweroff");
    // The QEMU spelling, with the same file.
    let run = run_args(&[os(b"-kernel"), kernel.as_os_str(), os(b"-append"), os(b"poweroff"), os(b"-m"), os(b"128")]);
    run.assert_success();
    run.assert_stdout_has("probe: poweroff");
}

#[test]
fn name_that_is_not_utf8_is_one_line() {
    for spelling in ["--name", "-name"] {
        let run = run_args(&[os(b"--kernel"), os(NO_KERNEL.as_bytes()), os(spelling.as_bytes()), os(b"web\xff1")]);
        assert_one_line_usage_error(&run, &format!("invalid {spelling} 'web\u{fffd}1': not valid UTF-8"));
    }
}

#[test]
fn option_name_that_is_not_utf8_is_one_line() {
    for option in [&b"--n\xffme"[..], b"-n\xffme", b"--kernel\xff=x"] {
        let run = run_args(&[os(b"-kernel"), os(NO_KERNEL.as_bytes()), os(option), os(b"value")]);
        assert_one_line_usage_error(&run, "is not valid UTF-8");
        assert!(run.stderr.contains('\u{fffd}'), "the option is named\n{}", run.describe());
    }
}

/// Values that must be text, in both spellings and inside QEMU's key=value lists.
#[test]
fn text_values_that_are_not_utf8_are_one_line() {
    let cases: &[(&[&[u8]], &str)] = &[
        (&[b"--memory", b"1\xffG"], "invalid --memory '1\u{fffd}G'"),
        (&[b"-m", b"1\xffG"], "invalid -m '1\u{fffd}G'"),
        (&[b"-smp", b"\xff"], "invalid -smp"),
        (&[b"-append", b"console=\xff"], "invalid -append"),
        (&[b"-device", b"virtio-rng-pci,id=\xff"], "invalid -device"),
        (&[b"-drive", b"file=/a,if=vir\xfftio"], "if= is not valid UTF-8"),
        (&[b"-blockdev", b"{\"driver\":\"\xff\"}"], "the JSON form must be UTF-8"),
    ];
    for (extra, needle) in cases {
        let mut args = vec![os(b"-kernel"), os(NO_KERNEL.as_bytes())];
        args.extend(extra.iter().map(|a| os(a)));
        assert_one_line_usage_error(&run_args(&args), needle);
    }
}

/// A disk image path that is not UTF-8 inside `-drive file=...,if=...` keeps its bytes: kestrel gets past
/// parsing and fails (with one line, exit 1) only because the kernel does not exist.
#[test]
fn drive_file_that_is_not_utf8_is_a_path() {
    let args: Vec<OsString> =
        [&b"-kernel"[..], NO_KERNEL.as_bytes(), b"-drive", b"file=/tmp/disk-\xff.img,if=virtio,format=raw"]
            .iter()
            .map(|a| os(a).to_os_string())
            .collect();
    let run = run_with_timeout(
        kestrel_os(&args.iter().map(OsString::as_os_str).collect::<Vec<_>>()),
        Duration::from_secs(30),
    );
    assert!(!run.stderr.contains("panicked"), "{}", run.describe());
    assert_eq!(run.status.code(), Some(1), "parsing must succeed\n{}", run.describe());
    assert!(run.stderr.contains(NO_KERNEL), "{}", run.describe());
}

/// Each of QEMU's id namespaces refuses a repeated id, with QEMU 7.2's message after the option that repeats it.
#[test]
fn duplicate_ids_are_refused_like_qemu() {
    let rng_json = r#"{"driver":"virtio-rng-pci","id":"x"}"#;
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "-device",
                "virtio-rng-pci,id=x",
                "-device",
                "virtio-blk-pci,drive=d,id=x",
                "-drive",
                "file=/a,if=none,id=d",
            ],
            "kestrel: -device virtio-blk-pci,drive=d,id=x: Duplicate ID 'x' for device",
        ),
        (
            &["-device", "virtio-blk-pci,drive=d,id=x", "-drive", "file=/a,if=none,id=d", "-device", rng_json],
            "Duplicate device ID 'x'",
        ),
        (
            &["-chardev", "null,id=c", "-chardev", "file,id=c,path=/tmp/c", "-serial", "chardev:c"],
            "kestrel: -chardev file,id=c,path=/tmp/c: Duplicate ID 'c' for chardev",
        ),
        (
            &["-netdev", "tap,id=n,ifname=t0", "-netdev", "tap,id=n,ifname=t1", "-device", "virtio-net-pci,netdev=n"],
            "kestrel: -netdev tap,id=n,ifname=t1: Duplicate ID 'n' for netdev",
        ),
        (
            &["-object", "rng-random,id=r", "-object", "rng-builtin,id=r", "-device", "virtio-rng-pci,rng=r"],
            "kestrel: -object rng-builtin,id=r: Duplicate ID 'r' for object",
        ),
        (
            &["-drive", "file=/a,if=none,id=d", "-drive", "file=/b,if=none,id=d", "-device", "virtio-blk-pci,drive=d"],
            "kestrel: -drive file=/b,if=none,id=d: Duplicate ID 'd' for drive",
        ),
        (
            &[
                "-blockdev",
                "driver=file,node-name=n,filename=/a",
                "-blockdev",
                "driver=file,node-name=n,filename=/b",
                "-device",
                "virtio-blk-pci,drive=n",
            ],
            "kestrel: -blockdev driver=file,node-name=n,filename=/b: Duplicate nodes with node-name='n'",
        ),
    ];
    for (extra, expected) in cases {
        let mut args = vec![OsStr::new("-kernel"), OsStr::new(NO_KERNEL)];
        args.extend(extra.iter().map(OsStr::new));
        let run = run_args(&args);
        assert_one_line_usage_error(&run, expected);
    }
}

/// virtio-serial ports numbered or named twice, or beyond the controller's `max_ports`, are refused with QEMU's
/// words, naming the option, before anything is opened.
#[test]
fn virtio_serial_port_numbers_and_names_are_refused_like_qemu() {
    let agent = r#"{"driver":"virtserialport","bus":"virtio-serial0.0","nr":1,"chardev":"a","id":"channel0","name":"org.qemu.guest_agent.0"}"#;
    let controller = ["-device", "virtio-serial-pci,id=virtio-serial0", "-chardev", "pty,id=a", "-chardev", "pty,id=b"];
    let cases: &[(&[&str], &str)] = &[
        (
            &["-device", agent, "-device", "virtserialport,chardev=b,nr=1"],
            "kestrel: invalid -device 'virtserialport,chardev=b,nr=1': A port already exists at id 1",
        ),
        (
            &["-device", agent, "-device", "virtserialport,chardev=b,name=org.qemu.guest_agent.0"],
            "A port already exists by name org.qemu.guest_agent.0",
        ),
        (&["-device", "virtserialport,chardev=b,nr=31"], "Out-of-range port id specified, max. allowed: 30"),
        (&["-device", "virtserialport,chardev=b,nr=0"], "reserved for virtconsole devices"),
    ];
    for (extra, expected) in cases {
        let mut args = vec![OsStr::new("-kernel"), OsStr::new(NO_KERNEL)];
        args.extend(controller.iter().map(OsStr::new));
        args.extend(extra.iter().map(OsStr::new));
        let run = run_args(&args);
        assert_one_line_usage_error(&run, expected);
    }
}

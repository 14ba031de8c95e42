#![cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]

//! Seccomp: every thread of a default `kestrel` is confined by a filter (`Seccomp: 2` in its /proc status) with
//! no_new_privs set, by its own filter only before a reset (`Seccomp_filters: 1`: a vCPU thread does not also run
//! the main thread's filter on every exit), `--sandbox off` and QEMU's `-sandbox off` leave them unconfined, and a call outside a thread's
//! filter ends the process with one line naming the thread and the call.
//!
//! The forbidden-call tests cannot make the real binary misbehave from outside (and a debug switch for that would
//! not belong in a release), so they confine a thread of this test binary with Kestrel's own filters: the test
//! runs itself again as a child process that does the forbidden call, and checks the child's stderr and exit.

mod support;

use std::process::Stdio;
use std::thread;

use vmm::seccomp::{self, ThreadKind};

/// Set in the child process: which forbidden call to make.
const CHILD_CASE: &str = "KESTREL_SECCOMP_TEST_CHILD";

/// The real binary with the repo's payloads (x86_64 guests).
#[cfg(target_arch = "x86_64")]
mod booted {
    use std::path::{Path, PathBuf};
    use std::process::{Child, Stdio};
    use std::thread;
    use std::time::{Duration, Instant};

    use crate::support::{kestrel_command, kvm_available, payload};

    /// The threads of a running kestrel and the lines of their /proc status that matter here: name, `Seccomp:`,
    /// `NoNewPrivs:`, `Seccomp_filters:`.
    fn thread_status(pid: u32) -> Vec<(String, String, String, String)> {
        let mut threads = Vec::new();
        for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
            let dir = task.unwrap().path();
            let (Ok(comm), Ok(status)) =
                (std::fs::read_to_string(dir.join("comm")), std::fs::read_to_string(dir.join("status")))
            else {
                continue; // a thread that ended meanwhile
            };
            let line = |key: &str| status.lines().find(|l| l.starts_with(key)).unwrap_or("missing").to_string();
            threads.push((comm.trim().to_string(), line("Seccomp:"), line("NoNewPrivs:"), line("Seccomp_filters:")));
        }
        threads.sort();
        threads
    }

    struct Running {
        child: Child,
        dir: PathBuf,
    }

    impl Drop for Running {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// Starts kestrel with every kind of thread it has: QMP, an idle guest on 2 vCPUs, a disk, an rng and a console
    /// (its input from a pty), the serial port on stdin/stdout; returns once every expected thread exists.
    fn start_with_every_thread(tag: &str, extra: &[&str]) -> (Running, Vec<(String, String, String, String)>) {
        let dir = std::env::temp_dir().join(format!("kestrel-seccomp-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("disk.img");
        std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
        let qmp = dir.join("qmp.sock");
        let kernel = payload("probe.pvh.elf");
        let mut cmd = kestrel_command();
        cmd.args(["--kernel", kernel.to_str().unwrap(), "--cmdline", "spin", "--cpus", "2", "--memory", "128M"])
            .args(["--qmp", &format!("unix:{},server=on,wait=off", qmp.display())])
            .args(["--disk", &format!("path={}", disk.display()), "--rng", "--console", "pty"])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let running = Running { child: cmd.spawn().expect("starting kestrel"), dir };
        let expected = ["vcpu0", "vcpu1", "virtio-blk0", "virtio-rng", "virtio-console", "signals", "sci-resample"];
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let threads = thread_status(running.child.id());
            let names: Vec<&str> = threads.iter().map(|(name, ..)| name.as_str()).collect();
            if expected.iter().all(|e| names.contains(e)) && Path::new(&qmp).exists() {
                // The vCPUs confine themselves first thing; give a loaded machine a moment to get there.
                thread::sleep(Duration::from_millis(300));
                let threads = thread_status(running.child.id());
                return (running, threads);
            }
            assert!(Instant::now() < deadline, "kestrel did not start every thread within 30 s: {threads:?}");
            thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn every_thread_is_confined_by_default() {
        if !kvm_available() {
            return;
        }
        let (_running, threads) = start_with_every_thread("on", &[]);
        // The main thread, the console writers and input readers, besides the ones waited for.
        for kind in ["kestrel", "serial0-output", "virtiocon0-outp", "serial-input", "virtio-console-"] {
            assert!(threads.iter().any(|(name, ..)| name == kind), "no {kind} thread in {threads:?}");
        }
        for (name, seccomp, no_new_privs, filters) in &threads {
            assert_eq!(seccomp, "Seccomp:\t2", "thread {name} is not confined: {threads:?}");
            assert_eq!(no_new_privs, "NoNewPrivs:\t1", "thread {name}: {threads:?}");
            // Every thread of the first boot started before the main thread confined itself (kernels before 5.9
            // do not show the count).
            if filters != "missing" {
                assert_eq!(filters, "Seccomp_filters:\t1", "thread {name} runs more than its filter: {threads:?}");
            }
        }
    }

    #[test]
    fn sandbox_off_leaves_every_thread_unconfined_in_either_spelling() {
        if !kvm_available() {
            return;
        }
        for (tag, off) in [("native", ["--sandbox", "off"]), ("qemu", ["-sandbox", "off"])] {
            let (_running, threads) = start_with_every_thread(tag, &off);
            assert!(threads.len() >= 10, "{threads:?}");
            for (name, seccomp, ..) in &threads {
                assert_eq!(seccomp, "Seccomp:\t0", "{off:?}: thread {name} is confined: {threads:?}");
            }
        }
    }

    #[test]
    fn libvirts_sandbox_options_keep_every_thread_confined() {
        if !kvm_available() {
            return;
        }
        let libvirt = ["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"];
        let (_running, threads) = start_with_every_thread("libvirt", &libvirt);
        for (name, seccomp, ..) in &threads {
            assert_eq!(seccomp, "Seccomp:\t2", "thread {name} is not confined: {threads:?}");
        }
    }
}

/// In the child: confines a thread named `thread` to `kind` and makes the call `case` names, which must not
/// return.
fn forbidden_call_in_child(case: &str) {
    let (thread_name, kind) = match case {
        "vcpu-socket" | "vcpu-ioctl" => ("vcpu0", ThreadKind::Vcpu),
        "worker-execve" => ("virtio-blk0", ThreadKind::DeviceWorker),
        other => panic!("unknown case {other}"),
    };
    seccomp::enable().expect("enabling seccomp");
    let case = case.to_string();
    let thread = thread::Builder::new().name(thread_name.into()).spawn(move || {
        seccomp::apply(kind).expect("confining the thread");
        // SAFETY: each call is made to be refused by the filter; its arguments do not matter past that.
        unsafe {
            match case.as_str() {
                "vcpu-socket" => {
                    libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                }
                // KVM_CREATE_VM: an ioctl the vCPU filter does not list (the number is checked, not the fd).
                "vcpu-ioctl" => {
                    libc::ioctl(0, 0xAE01, 0);
                }
                _ => {
                    libc::execve(c"/bin/true".as_ptr(), std::ptr::null(), std::ptr::null());
                }
            }
        }
    });
    thread.unwrap().join().unwrap();
    // Reaching here means the call was allowed: the parent sees exit 0 and no line.
}

/// Runs this test binary again as the child for `case` and returns its exit status and stderr.
fn run_child(case: &str) -> (std::process::ExitStatus, String) {
    let output = support::target_command(&std::env::current_exe().unwrap())
        .args(["--exact", "forbidden_call_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_CASE, case)
        .stdin(Stdio::null())
        .output()
        .expect("running the child");
    (output.status, String::from_utf8_lossy(&output.stderr).into_owned())
}

/// Only does anything as the child of the tests below.
#[test]
fn forbidden_call_child() {
    if let Ok(case) = std::env::var(CHILD_CASE) {
        forbidden_call_in_child(&case);
    }
}

/// Whether this process can install seccomp filters. qemu-user (ci/test's foreign-target runs) does not implement
/// the seccomp call (ENOSYS): there the test says it is skipped and why. Anywhere else a kernel without seccomp
/// is a failure, as Kestrel confines its threads by default.
fn seccomp_available_here() -> bool {
    let mut action: u32 = libc::SECCOMP_RET_TRAP;
    // SAFETY: SECCOMP_GET_ACTION_AVAIL only reads the u32 it is given; nothing is installed.
    let done = unsafe { libc::syscall(libc::SYS_seccomp, libc::SECCOMP_GET_ACTION_AVAIL, 0, &mut action as *mut u32) };
    if done == 0 {
        return true;
    }
    let error = std::io::Error::last_os_error();
    match std::env::var("KESTREL_NO_KVM_HERE") {
        Ok(why) if error.raw_os_error() == Some(libc::ENOSYS) => {
            eprintln!("SKIPPED: seccomp is not implemented here ({error}; {why})");
            false
        }
        _ => panic!("this kernel cannot install seccomp filters: {error}"),
    }
}

#[test]
fn a_forbidden_call_ends_the_process_with_a_line_naming_thread_and_call() {
    if !seccomp_available_here() {
        return;
    }
    let cases = [
        ("vcpu-socket", "vcpu0", libc::SYS_socket, "socket"),
        ("vcpu-ioctl", "vcpu0", libc::SYS_ioctl, "ioctl 0xae01"),
        ("worker-execve", "virtio-blk0", libc::SYS_execve, "execve"),
    ];
    for (case, thread, number, name) in cases {
        let (status, stderr) = run_child(case);
        let line = format!("kestrel: seccomp: thread {thread} made forbidden system call {number} ({name})");
        assert!(stderr.contains(&line), "{case}: expected '{line}' in stderr:\n{stderr}");
        assert_eq!(status.code(), Some(1), "{case}: {status}\n{stderr}");
    }
}

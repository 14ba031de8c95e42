#![cfg(target_arch = "x86_64")]

//! Drives the real `kestrel` binary with the real QMP clients from the `qemu.qmp` Python package (PyPI): its
//! asyncio `QMPClient` and its `qmp-shell`, through tests/qmp_clients/drive.py (which says what it checks).
//!
//! Needs KVM (the kvm_available() rule) and `python3` with `qemu.qmp` importable (`ci/install-deps` installs it).
//! Where either is expected (CI, or KESTREL_REQUIRE_KVM set) and missing, the test fails; elsewhere it prints
//! SKIPPED with the reason. KESTREL_PYTHON chooses the interpreter (default `python3`).

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{kestrel_binary, kvm_available, payload};

fn python() -> String {
    std::env::var("KESTREL_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

/// Whether `qemu.qmp` can be imported; without it, a failure under CI and SKIPPED elsewhere.
fn qemu_qmp_available() -> bool {
    let probe =
        Command::new(python()).args(["-c", "import qemu.qmp, qemu.qmp.qmp_shell"]).stdin(Stdio::null()).output();
    let reason = match probe {
        Ok(out) if out.status.success() => return true,
        Ok(out) => format!("{} cannot import qemu.qmp: {}", python(), last_line(&out.stderr)),
        Err(e) => format!("cannot run {}: {e}", python()),
    };
    let expected = std::env::var_os("CI").is_some() || std::env::var_os("KESTREL_REQUIRE_KVM").is_some();
    assert!(
        !expected,
        "qemu.qmp is required here (CI or KESTREL_REQUIRE_KVM is set; ci/install-deps installs it) but {reason}"
    );
    eprintln!("SKIPPED: {reason}; run ci/install-deps (python3 -m pip install qemu.qmp)");
    false
}

fn last_line(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().lines().last().unwrap_or_default().to_string()
}

#[test]
fn qemu_qmp_client_and_qmp_shell_drive_kestrel() {
    if !kvm_available() || !qemu_qmp_available() {
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/qmp_clients/drive.py");
    let spin = payload("probe.pvh.elf");
    let mut cmd = Command::new(python());
    cmd.arg(&script).arg("--kestrel").arg(kestrel_binary()).arg("--payload").arg(&spin);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // The script bounds every step itself; this bounds the whole run, so a hang is a failure, never a stuck test.
    let run = support::run_with_timeout(cmd, Duration::from_secs(180));
    print!("{}", run.stdout);
    assert!(
        run.status.success(),
        "tests/qmp_clients/drive.py failed ({})\n--- output ---\n{}\n--- stderr ---\n{}",
        run.status,
        run.stdout,
        run.stderr
    );
    assert!(run.stdout.contains(" passed, 0 failed"), "no summary line\n{}", run.describe());
}

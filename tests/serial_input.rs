#![cfg(target_arch = "x86_64")]

//! Host input to the guest's serial port, through the real binary and the repo's probe payload: input the guest
//! does not read stays with the host instead of filling Kestrel's memory, and input typed ahead of a driver that
//! drains its receive side at start survives the drain (losing at most what the UART held, as with QEMU).

mod support;

use std::io::{Read, Write};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use support::{kestrel, kvm_available, payload, run_typing_after};

const PVH: &str = "probe.pvh.elf";
const ECHO_READY: &str = "probe: echo ready\r\n";
const ECHO_DONE: &str = "\r\nprobe: echo done\r\n";

fn echo_command(stdin: Stdio) -> std::process::Command {
    let kernel = payload(PVH);
    let mut cmd = kestrel(&["--kernel", kernel.to_str().unwrap(), "--cmdline", "echo", "--memory", "64M"]);
    cmd.stdin(stdin);
    cmd
}

/// What the echo command sent back: everything between its ready line and its done line.
fn echoed(stdout: &str) -> &str {
    let start =
        stdout.find(ECHO_READY).map(|i| i + ECHO_READY.len()).unwrap_or_else(|| panic!("no ready line:\n{stdout}"));
    let end = stdout[start..].find(ECHO_DONE).map(|i| start + i).unwrap_or_else(|| panic!("no done line:\n{stdout}"));
    &stdout[start..end]
}

/// `len` bytes of lines of lowercase letters without `q`, which would end the echo command early.
fn text_without_q(len: usize) -> String {
    (0..len)
        .map(|i| if i % 61 == 60 { '\n' } else { char::from(b'a' + (i % 25) as u8 + u8::from(i % 25 >= 16)) })
        .collect()
}

/// Starts the echo command with `input` already written to its stdin, before the guest has started: input typed
/// ahead of the guest's driver. Stdin stays open until the run ends, as a terminal's would.
fn echo_with_input_typed_ahead(input: &[u8], timeout: Duration) -> String {
    let mut child = echo_command(Stdio::piped()).spawn().expect("starting kestrel");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input).unwrap();
    let stdout = drain(child.stdout.take().unwrap());
    let stderr = drain(child.stderr.take().unwrap());
    let status = wait_or_kill(&mut child, timeout);
    drop(stdin);
    let stdout = stdout.join().unwrap();
    let stderr = stderr.join().unwrap();
    let status = status.unwrap_or_else(|| {
        panic!("the echo command did not end within {timeout:?}\n{stdout}\n--- stderr ---\n{stderr}")
    });
    assert!(status.success(), "kestrel failed: {status}\n{stdout}\n--- stderr ---\n{stderr}");
    stdout
}

fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut all = Vec::new();
        let _ = pipe.read_to_end(&mut all);
        String::from_utf8_lossy(&all).into_owned()
    })
}

/// The exit status, or None (and the child killed) if it ran past `timeout`.
fn wait_or_kill(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Asserts that the guest received `input` but for a lost prefix of at most `max_lost` bytes.
#[track_caller]
fn assert_received_all_but_a_prefix(echoed: &str, input: &str, max_lost: usize) {
    assert!(
        input.ends_with(echoed) && input.len() - echoed.len() <= max_lost,
        "the guest must get the typed-ahead input but for at most {max_lost} byte(s) the UART held when the driver \
         cleared it; it got {} of {} bytes: {echoed:?}",
        echoed.len(),
        input.len()
    );
}

/// Before the echo command starts, the UART is as after power-on: FIFOs off, one byte held. The command enables
/// and clears the FIFOs and drains what is left, as Linux's 8250 driver does; it loses that one byte, at most, and
/// the rest, `q` included, arrives once it is ready. (Kestrel used to push all of it into the UART at once and
/// refill it on every read, so the drain ate everything and `q` never came.)
#[test]
fn input_typed_ahead_of_the_driver_survives_its_start() {
    if !kvm_available() {
        return;
    }
    let input = "hello\nq\n";
    let stdout = echo_with_input_typed_ahead(input.as_bytes(), Duration::from_secs(30));
    assert_received_all_but_a_prefix(echoed(&stdout), input, 1);
}

#[test]
fn long_input_typed_ahead_of_the_driver_survives_its_start() {
    if !kvm_available() {
        return;
    }
    let input = text_without_q(5001) + "q";
    let stdout = echo_with_input_typed_ahead(input.as_bytes(), Duration::from_secs(60));
    assert_received_all_but_a_prefix(echoed(&stdout), &input, 1);
}

/// Input fed to the UART a FIFO at a time, as the guest makes room, arrives whole and in order.
#[test]
fn long_input_after_the_prompt_arrives_whole_and_in_order() {
    if !kvm_available() {
        return;
    }
    let input = text_without_q(5001) + "q";
    let cmd = echo_command(Stdio::piped());
    let run = run_typing_after(cmd, Some(("probe: echo ready", input.as_bytes())), Duration::from_secs(60));
    run.assert_success();
    assert!(echoed(&run.stdout) == input, "the echo differs from the input\n{}", run.describe());
}

fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A guest that never reads its serial port, fed a stream: Kestrel reads no more than the UART can take, so the
/// writer blocks on the full pipe and Kestrel's memory stays flat (it used to queue everything: 64 MiB of input
/// took 70 MB of RSS).
#[test]
fn input_the_guest_does_not_read_stays_in_the_pipe() {
    if !kvm_available() {
        return;
    }
    const INPUT: usize = 64 << 20;
    const RSS_LIMIT_KIB: u64 = 32 << 10;
    let kernel = payload(PVH);
    let mut cmd = kestrel(&["--kernel", kernel.to_str().unwrap(), "--cmdline", "spin", "--memory", "64M"]);
    let mut child = cmd.stdin(Stdio::piped()).spawn().expect("starting kestrel");
    let pid = child.id();
    let mut stdin = child.stdin.take().unwrap();
    let written = Arc::new(AtomicUsize::new(0));
    let writer = {
        let written = written.clone();
        thread::spawn(move || {
            let chunk = vec![0u8; 64 << 10];
            while written.load(Ordering::SeqCst) < INPUT {
                // Kestrel killed at the end: the pipe breaks.
                if stdin.write_all(&chunk).is_err() {
                    return;
                }
                written.fetch_add(chunk.len(), Ordering::SeqCst);
            }
        })
    };
    let stdout = drain(child.stdout.take().unwrap());
    let stderr = drain(child.stderr.take().unwrap());
    let peak = Arc::new(Mutex::new(0u64));
    let started = Instant::now();
    // Long enough for the old behaviour to queue all of it, even on a loaded machine.
    while started.elapsed() < Duration::from_secs(4) {
        if let Some(rss) = vm_rss_kib(pid) {
            let mut peak = peak.lock().unwrap();
            *peak = (*peak).max(rss);
        }
        thread::sleep(Duration::from_millis(50));
    }
    let still_running = child.try_wait().unwrap().is_none();
    let written_at_end = written.load(Ordering::SeqCst);
    let _ = child.kill();
    let _ = child.wait();
    writer.join().unwrap();
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    let peak = *peak.lock().unwrap();
    let context = format!("peak VmRSS {peak} KiB, {written_at_end} bytes written\n{stdout}\n--- stderr ---\n{stderr}");
    assert!(still_running, "kestrel must keep running the spinning guest\n{context}");
    assert!(stdout.contains("cmdline=\"spin\""), "the guest did not start\n{context}");
    assert!(peak > 0, "VmRSS was never read\n{context}");
    assert!(peak < RSS_LIMIT_KIB, "Kestrel's memory grew with input the guest never read\n{context}");
    assert!(written_at_end < INPUT, "the writer must be held back by a full pipe\n{context}");
}

#![cfg(target_arch = "x86_64")]

//! Save and restore the way libvirt's `virsh save` / `virsh restore` do it (issue 16), on this machine's KVM with
//! the probe payload's `flood` counter: the save goes to a descriptor passed over the QMP socket (`getfd` with
//! SCM_RIGHTS, then `migrate` to `fd:NAME`), here a pipe whose other end a thread copies to a file; the restore
//! reads a pipe Kestrel inherited, by number (`-incoming fd:N`, or `-incoming defer` then `migrate-incoming`).
//! Bad input (a name nobody passed, a closed descriptor, a reader that went away, a stream cut short) is one
//! clear error, and a source that refused stays usable.

mod support;

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::thread;
use std::time::Duration;

use serde_json::{json, Value};
use support::counting_vm::{
    assert_count_continues, counts, enable_migration_events, event_names, events, file_uri, flood_command, migrate,
    running_save_events, Dir, Vm,
};
use support::qmp::QmpClient;
use support::{inherit_fd, kvm_available};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// The descriptor number a restored kestrel inherits its stream on, as libvirt passes it.
const STREAM_FD: RawFd = 50;

/// A pipe whose write end a thread feeds `bytes` into (then closes); the read end.
fn pipe_fed_with(bytes: Vec<u8>) -> (OwnedFd, thread::JoinHandle<()>) {
    let (reader, mut writer) = std::io::pipe().unwrap();
    let feeder = thread::spawn(move || {
        // A reader that gives up early (a refused stream) makes this fail; that is its business.
        let _ = writer.write_all(&bytes);
    });
    (reader.into(), feeder)
}

/// Passes `fd` over the QMP socket with `getfd`, named `name`; the reply.
fn getfd(client: &mut QmpClient, name: &str, fd: Option<&OwnedFd>) -> Value {
    let command = json!({"execute": "getfd", "arguments": {"fdname": name}}).to_string();
    match fd {
        Some(fd) => {
            let sent = client.writer.send_with_fd(command.as_bytes(), fd.as_raw_fd()).unwrap();
            assert_eq!(sent, command.len());
        }
        None => client.send(&command),
    }
    let (_, reply) = client.execute("");
    reply
}

fn error_desc(reply: &Value) -> &str {
    reply["error"]["desc"].as_str().unwrap_or_else(|| panic!("not an error: {reply}"))
}

/// Saves a counting guest through getfd + `fd:migrate` into a pipe, a thread copying the pipe to a file; returns
/// the snapshot's bytes and the source's console up to the save.
fn save_through_a_pipe(dir: &Dir, name: &str, machine: &[&str]) -> (Vec<u8>, String) {
    let source = Vm::start(dir, name, machine);
    source.wait_for_count(200);
    let mut qmp = source.client();
    enable_migration_events(&mut qmp);
    let (reader, writer) = std::io::pipe().unwrap();
    let copier = thread::spawn(move || {
        let mut reader = reader;
        let mut bytes = Vec::new();
        std::io::copy(&mut reader, &mut bytes).unwrap();
        bytes
    });
    let writer: OwnedFd = writer.into();
    assert_eq!(getfd(&mut qmp, "migrate", Some(&writer)), json!({"return": {}}));
    // Kestrel holds the only write end now: the copier sees the end of the stream when Kestrel closes it.
    drop(writer);
    assert_eq!(migrate(&mut qmp, "fd:migrate"), running_save_events());
    let bytes = copier.join().unwrap();
    assert_eq!(qmp.status(), "postmigrate");
    let (_, info) = qmp.execute(r#"{"execute": "query-migrate"}"#);
    assert_eq!(info["return"]["status"], "completed", "{info}");
    assert_eq!(info["return"]["ram"]["transferred"], bytes.len() as u64, "{info}");
    // The name was used up with the descriptor.
    let (_, reply) = qmp.execute(r#"{"execute": "closefd", "arguments": {"fdname": "migrate"}}"#);
    assert_eq!(error_desc(&reply), "File descriptor named 'migrate' not found");
    drop(qmp);
    let console = source.settled_console();
    source.quit();
    (bytes, console)
}

#[test]
fn saved_into_a_pipe_through_getfd_and_restored_from_an_inherited_pipe() {
    if !kvm_available() {
        return;
    }
    let dir = Dir::new("fd-pipe");
    let machine = ["--memory", "64M", "--cpus", "2"];
    let (snapshot, source_console) = save_through_a_pipe(&dir, "source", &machine);

    let (stream, feeder) = pipe_fed_with(snapshot);
    let incoming = format!("fd:{STREAM_FD}");
    let mut args = vec!["-incoming", incoming.as_str()];
    args.extend_from_slice(&machine);
    let restored = Vm::start_with(&dir, "restored", &args, |cmd| inherit_fd(cmd, stream, STREAM_FD));
    let last = *counts(&source_console).last().unwrap();
    restored.wait_for_count(last + 500);
    feeder.join().unwrap();
    let mut qmp = restored.client();
    assert_eq!(qmp.status(), "running");
    let (_, info) = qmp.execute(r#"{"execute": "query-migrate"}"#);
    assert_eq!(info["return"], json!({"status": "completed"}));
    drop(qmp);
    assert_count_continues(&source_console, &restored.console());
    restored.quit();
}

/// libvirt's restore: `-S -incoming defer`, the stream named in `migrate-incoming` (an inherited descriptor, or a
/// file), `inmigrate` until then, the MIGRATION events, paused after, running at `cont`.
#[test]
fn incoming_defer_then_migrate_incoming_from_a_pipe_or_a_file() {
    if !kvm_available() {
        return;
    }
    let dir = Dir::new("fd-defer");
    let machine = ["--memory", "64M"];
    let (snapshot, source_console) = save_through_a_pipe(&dir, "source", &machine);
    let last = *counts(&source_console).last().unwrap();

    let (stream, feeder) = pipe_fed_with(snapshot.clone());
    let mut args = vec!["-S", "-incoming", "defer"];
    args.extend_from_slice(&machine);
    let restored = Vm::start_with(&dir, "deferred", &args, |cmd| inherit_fd(cmd, stream, STREAM_FD));
    let mut qmp = restored.client();
    assert_eq!(qmp.status(), "inmigrate");
    enable_migration_events(&mut qmp);
    // Not a descriptor Kestrel inherited: refused, and the machine keeps waiting.
    let (_, reply) = qmp.execute(r#"{"execute": "migrate-incoming", "arguments": {"uri": "fd:49"}}"#);
    assert!(error_desc(&reply).contains("descriptor 49 was not passed to Kestrel"), "{reply}");
    assert_eq!(qmp.status(), "inmigrate");
    let command = json!({"execute": "migrate-incoming", "arguments": {"uri": format!("fd:{STREAM_FD}")}});
    let (seen, reply) = qmp.execute(&command.to_string());
    assert_eq!(reply, json!({"return": {}}));
    let migration = events(&[("MIGRATION", "setup"), ("MIGRATION", "active"), ("MIGRATION", "completed")]);
    assert_eq!(event_names(&seen), migration);
    feeder.join().unwrap();
    assert_eq!(qmp.status(), "paused");
    thread::sleep(Duration::from_millis(200));
    assert_eq!(counts(&restored.console()), Vec::<u64>::new(), "the guest ran before cont");
    let (_, reply) = qmp.execute(r#"{"execute": "migrate-incoming", "arguments": {"uri": "fd:7"}}"#);
    assert_eq!(error_desc(&reply), "The incoming migration has already been started");
    let (resumed, _) = qmp.execute(r#"{"execute": "cont"}"#);
    assert_eq!(event_names(&resumed), events(&[("RESUME", "")]));
    restored.wait_for_count(last + 100);
    assert_count_continues(&source_console, &restored.console());
    drop(qmp);
    restored.quit();

    // From a file; `cont` while waiting makes the guest run as soon as it is restored, as in QEMU.
    let file = dir.path("vm.ksnap");
    std::fs::write(&file, &snapshot).unwrap();
    let mut args = vec!["-S", "-incoming", "defer"];
    args.extend_from_slice(&machine);
    let restored = Vm::start(&dir, "deferred-file", &args);
    let mut qmp = restored.client();
    let (seen, reply) = qmp.execute(r#"{"execute": "cont"}"#);
    assert!(seen.is_empty() && reply == json!({"return": {}}), "{seen:?} {reply}");
    assert_eq!(qmp.status(), "inmigrate");
    let command = json!({"execute": "migrate-incoming", "arguments": {"uri": file_uri(&file)}});
    let (seen, reply) = qmp.execute(&command.to_string());
    assert_eq!(reply, json!({"return": {}}));
    // The `events` capability is off here: RESUME only.
    assert_eq!(event_names(&seen), events(&[("RESUME", "")]));
    assert_eq!(qmp.status(), "running");
    restored.wait_for_count(last + 100);
    assert_count_continues(&source_console, &restored.console());
    drop(qmp);
    restored.quit();
}

/// What a source refuses, each with QEMU's words, leaves it running and counting; a reader that goes away
/// mid-save fails the save, which resumes the guest.
#[test]
fn bad_descriptors_are_refused_and_the_source_stays_usable() {
    if !kvm_available() {
        return;
    }
    let dir = Dir::new("fd-bad");
    let source = Vm::start(&dir, "source", &["--memory", "64M"]);
    source.wait_for_count(50);
    let mut qmp = source.client();
    enable_migration_events(&mut qmp);

    let (seen, reply) = qmp.execute(r#"{"execute": "migrate", "arguments": {"uri": "fd:nosuch"}}"#);
    assert!(seen.is_empty(), "{seen:?}");
    assert_eq!(error_desc(&reply), "File descriptor named 'nosuch' has not been found");
    assert_eq!(error_desc(&getfd(&mut qmp, "migrate", None)), "No file descriptor supplied via SCM_RIGHTS");

    // Passed, then closed: gone.
    let (_reader, writer) = std::io::pipe().unwrap();
    assert_eq!(getfd(&mut qmp, "closed", Some(&writer.into())), json!({"return": {}}));
    let (_, reply) = qmp.execute(r#"{"execute": "closefd", "arguments": {"fdname": "closed"}}"#);
    assert_eq!(reply, json!({"return": {}}));
    let (seen, reply) = qmp.execute(r#"{"execute": "migrate", "arguments": {"uri": "fd:closed"}}"#);
    assert!(seen.is_empty(), "{seen:?}");
    assert_eq!(error_desc(&reply), "File descriptor named 'closed' has not been found");
    let (_, reply) = qmp.execute(r#"{"execute": "migrate-incoming", "arguments": {"uri": "fd:closed"}}"#);
    assert!(error_desc(&reply).contains("has not been found"), "{reply}");
    assert_eq!(qmp.status(), "running");

    // A pipe nobody reads: the write fails (EPIPE, not a signal), the save fails and the guest runs on.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    assert_eq!(getfd(&mut qmp, "gone", Some(&writer.into())), json!({"return": {}}));
    let seen = migrate(&mut qmp, "fd:gone");
    let failed = events(&[
        ("MIGRATION", "setup"),
        ("MIGRATION", "active"),
        ("STOP", ""),
        ("MIGRATION", "failed"),
        ("RESUME", ""),
    ]);
    assert_eq!(seen, failed);
    let (_, info) = qmp.execute(r#"{"execute": "query-migrate"}"#);
    assert!(info["return"]["error-desc"].as_str().unwrap().contains("Broken pipe"), "{info}");
    assert_eq!(qmp.status(), "running");
    let (_, reply) = qmp.execute(r#"{"execute": "migrate-incoming", "arguments": {"uri": "fd:3"}}"#);
    assert_eq!(error_desc(&reply), "'-incoming' was not specified on the command line");

    let last = *counts(&source.console()).last().unwrap();
    source.wait_for_count(last + 100);
    drop(qmp);
    source.quit();
}

/// The restore of a stream cut short ends Kestrel with one line and a non-zero status, the guest never run:
/// given at start-up (`-incoming fd:N`) or to `migrate-incoming`, which answers with the error first.
#[test]
fn a_truncated_stream_is_refused_with_one_line() {
    if !kvm_available() {
        return;
    }
    let dir = Dir::new("fd-truncated");
    let machine = ["--memory", "64M"];
    let source = Vm::start(&dir, "source", &machine);
    source.wait_for_count(10);
    let file = dir.path("vm.ksnap");
    migrate(&mut source.client(), &file_uri(&file));
    source.quit();
    let bytes = std::fs::read(&file).unwrap();
    let cut = bytes[..bytes.len() / 2].to_vec();

    let (stream, feeder) = pipe_fed_with(cut.clone());
    let incoming = format!("fd:{STREAM_FD}");
    let mut args = vec!["-incoming", incoming.as_str()];
    args.extend_from_slice(&machine);
    // It may end before its QMP socket is seen: run to its end rather than as a `Vm`.
    let mut cmd = flood_command(&dir, "cut", &args);
    inherit_fd(&mut cmd, stream, STREAM_FD);
    let output = cmd.output().unwrap();
    let console = dir.path("cut.log");
    feeder.join().unwrap();
    assert_refusal(&output, "truncated");
    assert!(std::fs::read_to_string(&console).unwrap_or_default().is_empty(), "the guest ran");

    let (stream, feeder) = pipe_fed_with(cut);
    let mut args = vec!["-incoming", "defer"];
    args.extend_from_slice(&machine);
    let restored = Vm::start_with(&dir, "cut-deferred", &args, |cmd| inherit_fd(cmd, stream, STREAM_FD));
    let mut qmp = restored.client();
    let command = json!({"execute": "migrate-incoming", "arguments": {"uri": format!("fd:{STREAM_FD}")}});
    let (_, reply) = qmp.execute(&command.to_string());
    assert!(error_desc(&reply).contains("truncated"), "{reply}");
    drop(qmp);
    let output = restored.wait_for_exit();
    feeder.join().unwrap();
    assert_refusal(&output, "truncated");
}

fn assert_refusal(output: &std::process::Output, expected: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "a cut stream was restored: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "not one line: {stderr}");
    assert!(stderr.contains(expected), "expected {expected:?} in: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Kestrel's own descriptors cannot be taken by number.
#[test]
fn a_descriptor_kestrel_did_not_inherit_cannot_be_named() {
    if !kvm_available() {
        return;
    }
    let dir = Dir::new("fd-own");
    let restored = Vm::start(&dir, "waiting", &["--memory", "64M", "-incoming", "defer"]);
    let mut qmp = restored.client();
    for fd in [0, 3, 4, 5] {
        let command = json!({"execute": "migrate-incoming", "arguments": {"uri": format!("fd:{fd}")}});
        let (_, reply) = qmp.execute(&command.to_string());
        assert!(error_desc(&reply).contains(&format!("descriptor {fd} was not passed")), "{reply}");
    }
    assert_eq!(qmp.status(), "inmigrate");
    drop(qmp);
    restored.quit();
}

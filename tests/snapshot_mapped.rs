#![cfg(target_arch = "x86_64")]

//! A restore from a snapshot file maps the stored pages from it, copy on write (issue 16): the restored guest's
//! writes never reach the file, two guests restored from one file (at the same time) continue alike, a save over
//! the file the memory is mapped from is refused, and a save of a restored guest to another file holds its memory
//! (pages still mapped from the first file included).

mod support;

use std::path::Path;

use support::counting_vm::{assert_count_continues, counts, file_uri, migrate, Dir, Vm};
use support::kvm_available;

const MACHINE: [&str; 2] = ["--memory", "64M"];

/// A guest that counted for a while, saved to `snapshot` and quit; its console up to the save.
fn saved_guest(dir: &Dir, snapshot: &Path) -> String {
    let source = Vm::start(dir, "source", &MACHINE);
    source.wait_for_count(200);
    migrate(&mut source.client(), &file_uri(snapshot));
    let console = source.settled_console();
    source.quit();
    console
}

fn restore(dir: &Dir, name: &str, snapshot: &Path) -> Vm {
    let incoming = file_uri(snapshot);
    let mut args = vec!["-incoming", &incoming];
    args.extend_from_slice(&MACHINE);
    Vm::start(dir, name, &args)
}

/// Whether the process maps `file` (the restore took the mapping path, not the copy).
fn maps_file(vm: &Vm, file: &Path) -> bool {
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", vm.pid())).unwrap();
    let file = file.canonicalize().unwrap();
    maps.lines().any(|line| line.ends_with(file.to_str().unwrap()))
}

/// The console from its first complete count up to and including the line with `last`.
fn counted_up_to(console: &str, last: u64) -> &str {
    let end = console.find(&format!("probe: flood {last}\r\n")).expect("the count reached `last`");
    &console[..end]
}

#[test]
fn restored_guests_write_their_own_copies_and_never_the_file() {
    if !kvm_available() {
        return;
    }
    let dir = Dir::new("mapped-cow");
    let snapshot = dir.path("vm.ksnap");
    let source_console = saved_guest(&dir, &snapshot);
    let saved = std::fs::read(&snapshot).unwrap();
    let last = *counts(&source_console).last().unwrap();

    // Two at once from the one file: each counts (writes the pages the count lives in) on its own copy.
    let first = restore(&dir, "first", &snapshot);
    let second = restore(&dir, "second", &snapshot);
    first.wait_for_count(last + 2000);
    second.wait_for_count(last + 2000);
    assert!(maps_file(&first, &snapshot) && maps_file(&second, &snapshot), "guest memory is not mapped from the file");
    let (first_console, second_console) = (first.console(), second.console());
    first.quit();
    second.quit();
    assert_count_continues(&source_console, &first_console);
    assert_count_continues(&source_console, &second_console);
    assert_eq!(
        counted_up_to(&first_console, last + 2000),
        counted_up_to(&second_console, last + 2000),
        "two restores of one file went different ways"
    );
    assert!(std::fs::read(&snapshot).unwrap() == saved, "a restored guest's writes reached the snapshot file");
}

#[test]
fn a_save_over_the_mapped_file_is_refused_and_one_elsewhere_restores() {
    if !kvm_available() {
        return;
    }
    let dir = Dir::new("mapped-resave");
    let snapshot = dir.path("vm.ksnap");
    let source_console = saved_guest(&dir, &snapshot);
    let saved = std::fs::read(&snapshot).unwrap();
    let last = *counts(&source_console).last().unwrap();

    let restored = restore(&dir, "restored", &snapshot);
    restored.wait_for_count(last + 300);
    let mut qmp = restored.client();
    let command = format!(r#"{{"execute": "migrate", "arguments": {{"uri": "{}"}}}}"#, file_uri(&snapshot));
    qmp.execute(&command);
    let (_, info) = qmp.execute(r#"{"execute": "query-migrate"}"#);
    assert_eq!(info["return"]["status"], "failed", "{info}");
    assert!(info["return"]["error-desc"].as_str().unwrap().contains("mapped from it"), "{info}");
    assert_eq!(qmp.status(), "running");
    assert!(std::fs::read(&snapshot).unwrap() == saved, "the refused save changed the file");

    // Saved elsewhere, the pages the guest never wrote (still the first file's) are in the second snapshot.
    let second_snapshot = dir.path("second.ksnap");
    migrate(&mut qmp, &file_uri(&second_snapshot));
    drop(qmp);
    let restored_console = restored.settled_console();
    restored.quit();
    let again = restore(&dir, "again", &second_snapshot);
    let last = *counts(&restored_console).last().unwrap();
    again.wait_for_count(last + 300);
    assert_count_continues(&restored_console, &again.console());
    again.quit();
}

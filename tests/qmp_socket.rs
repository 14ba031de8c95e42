#![cfg(target_arch = "x86_64")]

//! QMP over the real `kestrel` binary's sockets, byte by byte: the greeting, negotiation, events before replies,
//! run states and their transitions, several monitors, one client per socket, hostile input, and the ACPI power
//! button behind `system_powerdown`. Guests are the repo's probe payloads on this machine's KVM.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::kvm_available;
use support::probe_vm::{scratch_dir, wait_for_path, ProbeVm, TIMEOUT};
use support::qmp::QmpClient;

fn event_names(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["event"].as_str().unwrap()).collect()
}

#[test]
fn socket_is_private_and_goes_away_on_quit() {
    if !kvm_available() {
        return;
    }
    let mut vm = ProbeVm::with_qmp_sockets("spin", &["qmp.sock"], &[]);
    let mode = std::fs::metadata(vm.path("qmp.sock")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let mut client = QmpClient::negotiated(&vm.path("qmp.sock"));
    let (events, reply) = client.execute(r#"{"execute": "quit", "id": 7}"#);
    assert_eq!(event_names(&events), ["SHUTDOWN"]);
    assert_eq!(events[0]["data"], serde_json::json!({"guest": false, "reason": "host-qmp-quit"}));
    assert_eq!(reply, serde_json::json!({"return": {}, "id": 7}));
    let socket = vm.path("qmp.sock");
    let exit = vm.wait(TIMEOUT);
    assert!(exit.success, "{}", exit.stderr);
    assert!(!socket.exists(), "the socket file is removed on exit");
}

#[test]
fn negotiation_mode_and_id_echo() {
    if !kvm_available() {
        return;
    }
    let vm = ProbeVm::with_qmp_sockets("spin", &["qmp.sock"], &[]);
    let mut client = QmpClient::connect(&vm.path("qmp.sock"));
    client.line();
    client.send(r#"{"execute": "query-status", "id": {"nested": [1, "two"]}}"#);
    let reply = client.line();
    assert_eq!(reply["error"]["class"], "CommandNotFound");
    assert_eq!(reply["id"], serde_json::json!({"nested": [1, "two"]}));
    client.send(r#"{"execute": "qmp_capabilities"}"#);
    client.line();
    // Split across writes, back to back, single-quoted: all one stream.
    client.send("{'execute': 'query-name', 'id'");
    client.send(": 1}{\"execute\": \"query-kvm\", \"id\": 2}");
    assert_eq!(client.line()["id"], 1);
    let kvm = client.line();
    assert_eq!(kvm["return"], serde_json::json!({"enabled": true, "present": true}));
}

#[test]
fn stop_and_cont_raise_events_before_their_replies() {
    if !kvm_available() {
        return;
    }
    let vm = ProbeVm::with_qmp_sockets("spin", &["qmp.sock"], &["--cpus", "2"]);
    let mut client = QmpClient::negotiated(&vm.path("qmp.sock"));
    assert_eq!(client.status(), "running");
    let (events, reply) = client.execute(r#"{"execute": "stop"}"#);
    assert_eq!(event_names(&events), ["STOP"]);
    assert!(events[0]["timestamp"]["seconds"].as_i64().unwrap() > 1_700_000_000);
    assert_eq!(reply, serde_json::json!({"return": {}}));
    assert_eq!(client.status(), "paused");
    let (events, _) = client.execute(r#"{"execute": "stop"}"#);
    assert!(events.is_empty(), "stopping a paused machine raises nothing");
    let (events, _) = client.execute(r#"{"execute": "cont"}"#);
    assert_eq!(event_names(&events), ["RESUME"]);
    assert_eq!(client.status(), "running");

    let (_, cpus) = client.execute(r#"{"execute": "query-cpus-fast"}"#);
    let cpus = cpus["return"].as_array().unwrap();
    assert_eq!(cpus.len(), 2);
    for cpu in cpus {
        let tid = cpu["thread-id"].as_i64().unwrap();
        let task = format!("/proc/{}/task/{tid}", vm.pid());
        assert!(Path::new(&task).exists(), "thread-id {tid} is a real thread of kestrel");
    }
}

#[test]
fn prelaunch_until_cont() {
    if !kvm_available() {
        return;
    }
    let mut vm = ProbeVm::with_qmp_sockets("poweroff", &["qmp.sock"], &["-S"]);
    let mut client = QmpClient::negotiated(&vm.path("qmp.sock"));
    assert_eq!(client.status(), "prelaunch");
    thread::sleep(Duration::from_millis(200));
    assert_eq!(client.status(), "prelaunch", "nothing runs before cont");
    let (events, _) = client.execute(r#"{"execute": "cont"}"#);
    assert_eq!(event_names(&events), ["RESUME"]);
    let shutdown = client.line();
    assert_eq!(shutdown["event"], "SHUTDOWN");
    assert_eq!(shutdown["data"], serde_json::json!({"guest": true, "reason": "guest-shutdown"}));
    let exit = vm.wait(TIMEOUT);
    assert!(exit.success, "{}", exit.stderr);
    assert!(vm.console().contains("probe: poweroff"), "{}", vm.console());
}

#[test]
fn system_powerdown_presses_the_acpi_power_button() {
    if !kvm_available() {
        return;
    }
    let mut vm = ProbeVm::with_qmp_sockets("acpi", &["qmp.sock"], &[]);
    let mut client = QmpClient::negotiated(&vm.path("qmp.sock"));
    let (_, hmp) =
        client.execute(r#"{"execute": "human-monitor-command", "arguments": {"command-line": "info status"}}"#);
    assert_eq!(hmp["return"], "VM status: running\r\n");
    // The guest must have enabled the button before it is pressed.
    vm.wait_for_console("probe: acpi ready");
    let (events, reply) = client.execute(r#"{"execute": "system_powerdown"}"#);
    assert_eq!(event_names(&events), ["POWERDOWN"]);
    assert_eq!(reply, serde_json::json!({"return": {}}));
    let shutdown = client.line();
    assert_eq!(shutdown["event"], "SHUTDOWN", "the guest powers off: {shutdown}");
    assert_eq!(shutdown["data"]["reason"], "guest-shutdown");
    let exit = vm.wait(TIMEOUT);
    assert!(exit.success, "{}", exit.stderr);
    assert!(vm.console().contains("probe: power button"), "{}", vm.console());
}

#[test]
fn no_shutdown_keeps_the_machine_until_reset() {
    if !kvm_available() {
        return;
    }
    let mut vm = ProbeVm::with_qmp_sockets("poweroff", &["qmp.sock"], &["-no-shutdown", "-S"]);
    let mut client = QmpClient::negotiated(&vm.path("qmp.sock"));
    let (events, _) = client.execute(r#"{"execute": "cont"}"#);
    assert_eq!(event_names(&events), ["RESUME"]);
    let shutdown = client.line();
    assert_eq!(shutdown["event"], "SHUTDOWN");
    assert_eq!(client.line()["event"], "STOP");
    assert_eq!(client.status(), "shutdown");
    let (_, refused) = client.execute(r#"{"execute": "cont"}"#);
    assert_eq!(refused["error"]["desc"], "Resetting the Virtual Machine is required");
    let (events, _) = client.execute(r#"{"execute": "system_reset"}"#);
    assert_eq!(event_names(&events), ["RESET"]);
    assert_eq!(client.status(), "prelaunch");
    client.execute(r#"{"execute": "quit"}"#);
    assert!(vm.wait(TIMEOUT).success);
}

#[test]
fn events_reach_every_monitor_and_each_socket_serves_one_client_at_a_time() {
    if !kvm_available() {
        return;
    }
    let vm = ProbeVm::with_qmp_sockets("spin", &["a.sock", "b.sock"], &[]);
    let mut a = QmpClient::negotiated(&vm.path("a.sock"));
    let mut b = QmpClient::negotiated(&vm.path("b.sock"));
    // A second client on a busy socket waits, as with QEMU: no greeting yet.
    let mut waiting = QmpClient::connect(&vm.path("b.sock"));
    waiting.reader.get_ref().set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut nothing = String::new();
    assert!(waiting.reader.read_line(&mut nothing).is_err(), "no greeting while another client is served");

    a.execute(r#"{"execute": "stop"}"#);
    let stop = b.line();
    assert_eq!(stop["event"], "STOP", "the other monitor sees the event too");
    a.execute(r#"{"execute": "cont"}"#);
    assert_eq!(b.line()["event"], "RESUME");

    drop(b);
    waiting.reader.get_ref().set_read_timeout(Some(TIMEOUT)).unwrap();
    let greeting = waiting.line();
    assert!(greeting.get("QMP").is_some(), "the waiting client gets its own greeting: {greeting}");
    waiting.send(r#"{"execute": "query-status"}"#);
    assert_eq!(waiting.line()["error"]["class"], "CommandNotFound", "and starts in negotiation mode");
}

#[test]
fn qemu_chardev_and_mon_spelling() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("qmp-chardev");
    let path = dir.join("monitor.sock");
    let chardev = format!("socket,id=charmonitor,path={},server=on,wait=off", path.display());
    let vm = ProbeVm::with_qmp_sockets(
        "spin",
        &[],
        &[
            "-chardev",
            &chardev,
            "-mon",
            "chardev=charmonitor,id=monitor,mode=control",
            "-name",
            "guest=web1,debug-threads=on",
        ],
    );
    wait_for_path(&path, TIMEOUT);
    let mut client = QmpClient::negotiated(&path);
    let (_, name) = client.execute(r#"{"execute": "query-name"}"#);
    assert_eq!(name["return"], serde_json::json!({"name": "web1"}));
    drop(vm);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn wait_on_holds_the_guest_until_a_client_connects() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("qmp-wait");
    let path = dir.join("qmp.sock");
    let mut vm =
        ProbeVm::with_qmp_sockets("poweroff", &[], &["--qmp", &format!("unix:{},server=on,wait=on", path.display())]);
    wait_for_path(&path, TIMEOUT);
    thread::sleep(Duration::from_millis(200));
    assert_eq!(vm.console(), "", "the guest has not run yet");
    let mut client = QmpClient::negotiated(&path);
    assert_eq!(client.line()["event"], "SHUTDOWN", "after the client came, the guest ran and powered off");
    assert!(vm.wait(TIMEOUT).success);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn sigterm_sends_shutdown_host_signal() {
    if !kvm_available() {
        return;
    }
    let mut vm = ProbeVm::with_qmp_sockets("spin", &["qmp.sock"], &[]);
    let mut client = QmpClient::negotiated(&vm.path("qmp.sock"));
    vm.signal(libc::SIGTERM);
    let shutdown = client.line();
    assert_eq!(shutdown["event"], "SHUTDOWN");
    assert_eq!(shutdown["data"], serde_json::json!({"guest": false, "reason": "host-signal"}));
    let exit = vm.wait(TIMEOUT);
    assert!(exit.success, "{}", exit.stderr);
}

#[test]
fn a_dead_vcpu_leaves_the_machine_in_internal_error_not_a_dead_process() {
    if !kvm_available() {
        return;
    }
    let mut vm = ProbeVm::with_qmp_sockets("triplefault", &["qmp.sock"], &["-S"]);
    let mut client = QmpClient::negotiated(&vm.path("qmp.sock"));
    client.execute(r#"{"execute": "cont"}"#);
    assert_eq!(client.line()["event"], "STOP");
    assert_eq!(client.status(), "internal-error");
    let (_, refused) = client.execute(r#"{"execute": "cont"}"#);
    assert_eq!(refused["error"]["class"], "GenericError");
    client.execute(r#"{"execute": "quit"}"#);
    let exit = vm.wait(TIMEOUT);
    assert!(exit.success, "quit ends it cleanly: {}", exit.stderr);
    assert!(exit.stderr.contains("rip="), "the vCPU state was reported: {}", exit.stderr);
}

#[test]
fn hostile_input_leaves_the_connection_usable() {
    if !kvm_available() {
        return;
    }
    let mut vm = ProbeVm::with_qmp_sockets("spin", &["qmp.sock"], &[]);
    let mut client = QmpClient::negotiated(&vm.path("qmp.sock"));
    let deep = "[".repeat(2000);
    let huge = format!("{{\"execute\": \"{}\"}}", "x".repeat(1 << 20));
    for garbage in ["\u{1}\u{2}nonsense", "[1, 2, 3]", "\"just a string\"", "{\"execute\": 5}", &deep, &huge] {
        client.send(garbage);
        // As with QEMU, a lexical error ('@') drops whatever value is still open (the rest of the deep nesting,
        // after the parser refused depth 1025), so what follows is parsed afresh.
        client.send("\n@\n");
        // Every piece of garbage gets errors and never a dropped connection; drain until the probe answers.
        client.send(r#"{"execute": "query-status", "id": "probe"}"#);
        loop {
            let line = client.line();
            if line["id"] == "probe" {
                assert_eq!(line["return"]["status"], "running");
                break;
            }
            assert!(line.get("error").is_some(), "only errors before the probe: {line}");
        }
    }
    client.execute(r#"{"execute": "quit"}"#);
    assert!(vm.wait(TIMEOUT).success);
}

#[test]
fn qmp_over_tcp_on_loopback() {
    if !kvm_available() {
        return;
    }
    // A port nobody uses right now (the small window before kestrel binds it is harmless here).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut vm = ProbeVm::with_qmp_sockets("spin", &[], &["-qmp", &format!("tcp:127.0.0.1:{port},server=on,wait=off")]);
    let deadline = Instant::now() + TIMEOUT;
    let stream = loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(stream) => break stream,
            Err(e) => {
                assert!(Instant::now() < deadline, "kestrel never listened on port {port}: {e}");
                thread::sleep(Duration::from_millis(5));
            }
        }
    };
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("{\"QMP\": "), "{line}");
    writer.write_all(b"{\"execute\": \"qmp_capabilities\"}{\"execute\": \"query-status\"}").unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "{\"return\": {}}\r\n");
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert!(line.contains("\"status\": \"running\""), "{line}");
    writer.write_all(b"{\"execute\": \"quit\"}").unwrap();
    assert!(vm.wait(TIMEOUT).success);
}

/// `query-block` and `query-blockstats` on two real disks (one read-only): names, files, sizes, flags and, after
/// the probe payload's `virtio` command drove them, counters that moved as the guest's I/O did.
#[test]
fn query_block_and_blockstats_reflect_the_disks() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("qmp-block");
    let (a_path, b_path) = (dir.join("a.img"), dir.join("b.img"));
    let mut a_image = vec![0x11u8; 128 * 512];
    a_image[..8].copy_from_slice(b"ALPHAIMG");
    let mut b_image = vec![0x22u8; 96 * 512 + 100]; // a partial last sector is not exposed
    b_image[..8].copy_from_slice(b"KESTREL!");
    std::fs::write(&a_path, &a_image).unwrap();
    std::fs::write(&b_path, &b_image).unwrap();
    let a_arg = format!("path={}", a_path.display());
    let b_arg = format!("path={},readonly=on,serial=B", b_path.display());
    let mut vm = ProbeVm::with_qmp_sockets(
        "virtio",
        &["qmp.sock"],
        &["-S", "-no-shutdown", "-M", "microvm", "--disk", &a_arg, "--disk", &b_arg],
    );
    let mut client = QmpClient::negotiated(&vm.path("qmp.sock"));

    let (_, reply) = client.execute(r#"{"execute": "query-block"}"#);
    let block = reply["return"].as_array().unwrap_or_else(|| panic!("{reply}")).clone();
    assert_eq!(block.len(), 2, "{reply}");
    for (i, (d, path, ro, size)) in
        [(&block[0], &a_path, false, 128 * 512), (&block[1], &b_path, true, 96 * 512)].into_iter().enumerate()
    {
        assert_eq!(d["device"], format!("virtio{i}"), "{d}");
        assert_eq!((&d["removable"], &d["locked"], &d["io-status"]), (&false.into(), &false.into(), &"ok".into()));
        let inserted = &d["inserted"];
        let file = path.display().to_string();
        assert_eq!(
            (&inserted["file"], &inserted["ro"], &inserted["drv"]),
            (&file.clone().into(), &ro.into(), &"raw".into())
        );
        assert_eq!(inserted["node-name"], format!("#block{i}"));
        assert_eq!(inserted["cache"], serde_json::json!({"writeback": true, "direct": false, "no-flush": false}));
        let image = &inserted["image"];
        assert_eq!((&image["filename"], &image["format"]), (&file.into(), &"raw".into()));
        assert_eq!(image["virtual-size"], size, "{image}");
        // Allocated bytes as the host's stat says (a file system may allocate a little more than the length).
        let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(path).unwrap());
        assert_eq!(image["actual-size"], blocks * 512, "{image}");
    }

    let zero = |stats: &Value, keys: &[&str]| keys.iter().all(|k| stats[k] == 0);
    let counters = ["rd_bytes", "wr_bytes", "rd_operations", "wr_operations", "flush_operations", "unmap_operations"];
    let (_, reply) = client.execute(r#"{"execute": "query-blockstats"}"#);
    let stats = reply["return"].as_array().unwrap_or_else(|| panic!("{reply}")).clone();
    assert_eq!(stats.len(), 2);
    for (i, s) in stats.iter().enumerate() {
        assert_eq!((&s["device"], &s["node-name"]), (&format!("virtio{i}").into(), &format!("#block{i}").into()));
        assert!(zero(&s["stats"], &counters), "nothing ran yet: {s}");
        assert_eq!(s["stats"]["timed_stats"], serde_json::json!([]));
    }

    // Run the payload to its end: it stays, stopped, in `shutdown`.
    client.execute(r#"{"execute": "cont"}"#);
    vm.wait_for_console("probe: virtio done");
    let deadline = Instant::now() + TIMEOUT;
    while client.status() != "shutdown" {
        assert!(Instant::now() < deadline, "the guest never powered off: {}", vm.console());
        thread::sleep(Duration::from_millis(10));
    }
    assert!(vm.console().contains("probe: virtio ok"), "{}", vm.console());
    let (_, reply) = client.execute(r#"{"execute": "query-blockstats"}"#);
    let (a, b) = (&reply["return"][0]["stats"], &reply["return"][1]["stats"]);
    // A: after the hostile cases, one 512-byte write of sector 2 and a read of sector 0 (at least).
    let n = |v: &Value, k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k}: {v}"));
    assert!(n(a, "wr_operations") >= 1 && n(a, "wr_bytes") >= 512, "{a}");
    assert!(n(a, "rd_operations") >= 1 && n(a, "rd_bytes") >= 512, "{a}");
    assert!(n(a, "wr_highest_offset") >= 3 * 512, "{a}");
    assert!(n(a, "wr_total_time_ns") > 0, "{a}");
    // B: read while A was broken, never written.
    assert!(n(b, "rd_operations") >= 1 && n(b, "rd_bytes") >= 512, "{b}");
    assert!(zero(b, &["wr_operations", "wr_bytes", "wr_highest_offset", "failed_rd_operations"]), "{b}");
    assert_eq!(std::fs::read(&b_path).unwrap(), b_image, "the read-only disk is unchanged");

    client.execute(r#"{"execute": "quit"}"#);
    assert!(vm.wait(TIMEOUT).success);
    let _ = std::fs::remove_dir_all(dir);
}

/// `query-pci` on the default machine shows the host bridge and each virtio function the command line asked for,
/// with the ids given to `-device`, the modern virtio device ids, QEMU's classes and the BARs where they decode; a
/// microvm has no PCI bus unless a device asks for one.
#[test]
fn query_pci_reflects_the_bus() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("qmp-pci");
    let image = dir.join("a.img");
    std::fs::write(&image, vec![0u8; 64 * 512]).unwrap();
    let drive = format!("file={},if=none,id=d0,format=raw", image.display());
    let mut vm = ProbeVm::with_qmp_sockets(
        "poweroff",
        &["qmp.sock"],
        &["-S", "-drive", &drive, "-device", "virtio-blk-pci,drive=d0,id=disk0", "-device", "virtio-rng-pci"],
    );
    let mut client = QmpClient::negotiated(&vm.path("qmp.sock"));
    let (_, reply) = client.execute(r#"{"execute": "query-pci"}"#);
    let buses = reply["return"].as_array().unwrap_or_else(|| panic!("{reply}")).clone();
    assert_eq!(buses.len(), 1, "{reply}");
    assert_eq!(buses[0]["bus"], 0);
    let devices = buses[0]["devices"].as_array().unwrap().clone();
    let summary: Vec<(u64, u64, u64, u64, String)> = devices
        .iter()
        .map(|d| {
            let n = |v: &Value| v.as_u64().unwrap_or_else(|| panic!("{d}"));
            let qdev = d["qdev_id"].as_str().unwrap().to_string();
            (n(&d["slot"]), n(&d["id"]["vendor"]), n(&d["id"]["device"]), n(&d["class_info"]["class"]), qdev)
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (0, 0x1b36, 0x0008, 0x0600, String::new()),
            (1, 0x1af4, 0x1042, 0x0100, "disk0".to_string()),
            (2, 0x1af4, 0x1044, 0x00ff, String::new()),
        ]
    );
    assert_eq!(devices[1]["class_info"]["desc"], "SCSI controller");
    for d in &devices[1..] {
        let regions = d["regions"].as_array().unwrap();
        assert!(!regions.is_empty(), "a virtio function has BARs: {d}");
        for r in regions {
            let address = r["address"].as_u64().unwrap_or_else(|| panic!("a BAR placed before boot: {r}"));
            assert!((0xc000_0000..0xd000_0000).contains(&address), "inside the PCI window: {r}");
            assert_eq!(r["type"], "memory");
        }
    }
    client.execute(r#"{"execute": "quit"}"#);
    assert!(vm.wait(TIMEOUT).success);

    let mut vm = ProbeVm::with_qmp_sockets("poweroff", &["qmp.sock"], &["-S", "-M", "microvm", "--rng"]);
    let mut client = QmpClient::negotiated(&vm.path("qmp.sock"));
    let (_, reply) = client.execute(r#"{"execute": "query-pci"}"#);
    assert_eq!(reply["return"], serde_json::json!([]), "{reply}");
    client.execute(r#"{"execute": "quit"}"#);
    assert!(vm.wait(TIMEOUT).success);
    let _ = std::fs::remove_dir_all(dir);
}

#![cfg(target_arch = "x86_64")]

//! virtio-balloon as QMP clients and libvirt see it, on the real `kestrel` binary: `balloon` and `query-balloon`
//! with QEMU 7.2's answers and errors, the device under `/machine/peripheral` with its statistics properties
//! (`qom-get guest-stats`, `qom-set guest-stats-polling-interval`), the PCI function, the probe's view of the type,
//! and the balloon's state across a snapshot. The probe payload has no balloon driver, so the guest's `actual`
//! never moves here: the Linux guest in the emulated runner (`balloon` in ci/runner/linux.cases) is where it does.

mod support;

use serde_json::{json, Value};
use support::kvm_available;
use support::probe_vm::{ProbeVm, TIMEOUT};
use support::qmp::QmpClient;

const RAM: u64 = 64 << 20;

fn execute(client: &mut QmpClient, command: Value) -> Value {
    client.execute(&command.to_string()).1
}

fn error_of(reply: &Value) -> (String, String) {
    let error = reply.get("error").unwrap_or_else(|| panic!("expected an error: {reply}"));
    (error["class"].as_str().unwrap().to_string(), error["desc"].as_str().unwrap().to_string())
}

fn balloon_path() -> &'static str {
    "/machine/peripheral/balloon0"
}

#[test]
fn without_a_balloon_the_commands_answer_as_qemu_does() {
    if !kvm_available() {
        return;
    }
    let mut vm = ProbeVm::with_qmp_sockets("spin", &["qmp.sock"], &["-S"]);
    let mut client = QmpClient::negotiated(&vm.path("qmp.sock"));
    for command in [json!({"execute": "query-balloon"}), json!({"execute": "balloon", "arguments": {"value": 1}})] {
        let reply = execute(&mut client, command);
        assert_eq!(
            error_of(&reply),
            ("DeviceNotActive".to_string(), "No balloon device has been activated".to_string()),
            "{reply}"
        );
    }
    execute(&mut client, json!({"execute": "quit"}));
    assert!(vm.wait(TIMEOUT).success);
}

#[test]
fn balloon_sets_the_target_and_query_balloon_reports_the_guests_size() {
    if !kvm_available() {
        return;
    }
    // libvirt's spelling, bus and address included.
    let device = r#"{"driver":"virtio-balloon-pci","id":"balloon0","bus":"pci.0","addr":"0x4"}"#;
    let mut vm = ProbeVm::with_qmp_sockets("spin", &["qmp.sock"], &["-S", "-device", device]);
    let mut client = QmpClient::negotiated(&vm.path("qmp.sock"));

    let commands = execute(&mut client, json!({"execute": "query-commands"}));
    let names: Vec<&str> = commands["return"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    for name in ["balloon", "query-balloon", "qom-set"] {
        assert!(names.contains(&name), "query-commands lists {name}");
    }
    let schema = execute(&mut client, json!({"execute": "query-qmp-schema"}));
    let schema_names: Vec<&str> =
        schema["return"].as_array().unwrap().iter().filter_map(|e| e["name"].as_str()).collect();
    assert!(schema_names.contains(&"BALLOON_CHANGE") && schema_names.contains(&"balloon"), "the schema has them");

    // No driver yet: the guest has all of its memory.
    assert_eq!(execute(&mut client, json!({"execute": "query-balloon"}))["return"], json!({"actual": RAM}));
    let reply = execute(&mut client, json!({"execute": "balloon", "arguments": {"value": 32 << 20}}));
    assert_eq!(reply["return"], json!({}), "{reply}");
    // The target moved; the guest (no driver) did not: actual is what the guest reports, as in QEMU.
    assert_eq!(execute(&mut client, json!({"execute": "query-balloon"}))["return"], json!({"actual": RAM}));
    // QEMU's errors: a size that is not positive, a value that is not a number.
    for value in [json!(0), json!(-5)] {
        let reply = execute(&mut client, json!({"execute": "balloon", "arguments": {"value": value}}));
        assert_eq!(error_of(&reply).1, "Parameter 'target' expects a size", "{reply}");
    }
    let reply = execute(&mut client, json!({"execute": "balloon", "arguments": {"value": "lots"}}));
    assert_eq!(error_of(&reply).0, "GenericError", "{reply}");
    // A target above guest RAM is all of it.
    let reply = execute(&mut client, json!({"execute": "balloon", "arguments": {"value": 1u64 << 40}}));
    assert_eq!(reply["return"], json!({}), "{reply}");

    // The PCI function: the modern virtio-balloon id, QEMU's "other" class, the id libvirt gave it.
    let pci = execute(&mut client, json!({"execute": "query-pci"}));
    let devices = pci["return"][0]["devices"].as_array().unwrap();
    let balloon = devices.iter().find(|d| d["qdev_id"] == "balloon0").unwrap_or_else(|| panic!("{pci}"));
    assert_eq!((balloon["id"]["vendor"].as_u64(), balloon["id"]["device"].as_u64()), (Some(0x1af4), Some(0x1045)));
    assert_eq!(balloon["class_info"]["class"], 0x00ff);

    execute(&mut client, json!({"execute": "quit"}));
    assert!(vm.wait(TIMEOUT).success);
}

#[test]
fn the_balloon_is_in_the_qom_tree_with_its_statistics_properties() {
    if !kvm_available() {
        return;
    }
    let mut vm = ProbeVm::with_qmp_sockets(
        "spin",
        &["qmp.sock"],
        &["-S", "-device", "virtio-balloon-pci,id=balloon0,guest-stats-polling-interval=3"],
    );
    let mut client = QmpClient::negotiated(&vm.path("qmp.sock"));
    // How libvirt finds it.
    let peripheral = execute(&mut client, json!({"execute": "qom-list", "arguments": {"path": "/machine/peripheral"}}));
    assert!(
        peripheral["return"]
            .as_array()
            .unwrap()
            .contains(&json!({"name": "balloon0", "type": "child<virtio-balloon-pci>"})),
        "{peripheral}"
    );
    let listed = execute(&mut client, json!({"execute": "qom-list", "arguments": {"path": balloon_path()}}));
    let listed = listed["return"].as_array().unwrap().clone();
    assert!(listed.contains(&json!({"name": "guest-stats", "type": "guest statistics"})), "{listed:?}");
    assert!(listed.contains(&json!({"name": "guest-stats-polling-interval", "type": "int"})), "{listed:?}");

    let get = |client: &mut QmpClient, property: &str| {
        execute(client, json!({"execute": "qom-get", "arguments": {"path": balloon_path(), "property": property}}))
    };
    let set = |client: &mut QmpClient, property: &str, value: Value| {
        execute(
            client,
            json!({"execute": "qom-set", "arguments": {"path": balloon_path(), "property": property, "value": value}}),
        )
    };
    // From the command line.
    assert_eq!(get(&mut client, "guest-stats-polling-interval")["return"], json!(3));
    // Nothing reported yet: QEMU's shape, every statistic all ones, never updated.
    let stats = get(&mut client, "guest-stats")["return"].clone();
    assert_eq!(stats["last-update"], json!(0), "{stats}");
    let values = stats["stats"].as_object().unwrap();
    assert_eq!(values.len(), 10, "{stats}");
    for name in ["stat-swap-in", "stat-free-memory", "stat-total-memory", "stat-available-memory", "stat-htlb-pgfail"] {
        assert_eq!(values[name], json!(u64::MAX), "{name}: {stats}");
    }
    // libvirt's <stats period='10'/>.
    assert_eq!(set(&mut client, "guest-stats-polling-interval", json!(10))["return"], json!({}));
    assert_eq!(get(&mut client, "guest-stats-polling-interval")["return"], json!(10));
    assert_eq!(set(&mut client, "guest-stats-polling-interval", json!(0))["return"], json!({}));
    assert_eq!(get(&mut client, "guest-stats-polling-interval")["return"], json!(0));
    // QEMU's refusals, the value unchanged.
    let refusals = [
        (json!(-1), "timer value must be greater than zero"),
        (json!(1u64 << 33), "timer value is too big"),
        (json!("soon"), "Invalid parameter type for 'guest-stats-polling-interval', expected: integer"),
    ];
    for (value, desc) in refusals {
        let reply = set(&mut client, "guest-stats-polling-interval", value);
        assert_eq!(error_of(&reply), ("GenericError".to_string(), desc.to_string()), "{reply}");
    }
    assert_eq!(get(&mut client, "guest-stats-polling-interval")["return"], json!(0));
    // Read-only and missing properties, missing objects.
    let reply = set(&mut client, "guest-stats", json!({}));
    assert_eq!(error_of(&reply).1, "Insufficient permission to perform this operation");
    let reply = set(&mut client, "realized", json!(false));
    assert_eq!(error_of(&reply).1, "Insufficient permission to perform this operation");
    let reply = set(&mut client, "no-such", json!(1));
    assert_eq!(error_of(&reply).1, "Property 'virtio-balloon-pci.no-such' not found");
    let reply = execute(
        &mut client,
        json!({"execute": "qom-set", "arguments": {"path": "/machine/peripheral/nope", "property": "x", "value": 1}}),
    );
    assert_eq!(
        error_of(&reply),
        ("DeviceNotFound".to_string(), "Device '/machine/peripheral/nope' not found".to_string())
    );

    // The probe's view: the type and only the settings the command line honours.
    for (type_name, exists) in
        [("virtio-balloon-pci", true), ("virtio-balloon-device", true), ("virtio-balloon-ccw", false)]
    {
        let reply =
            execute(&mut client, json!({"execute": "device-list-properties", "arguments": {"typename": type_name}}));
        if !exists {
            assert_eq!(error_of(&reply).0, "DeviceNotFound", "{reply}");
            continue;
        }
        let names: Vec<&str> =
            reply["return"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["deflate-on-oom", "guest-stats-polling-interval"], "{type_name}: {reply}");
    }
    execute(&mut client, json!({"execute": "quit"}));
    assert!(vm.wait(TIMEOUT).success);
}

#[test]
fn balloon_options_are_checked() {
    let cases: [(&[&str], &str); 5] = [
        (&["-device", "virtio-balloon-pci,free-page-reporting=on"], "unsupported setting 'free-page-reporting'"),
        (&["-device", "virtio-balloon-pci,deflate-on-oom=maybe"], "deflate-on-oom"),
        (&["-device", "virtio-balloon-pci,guest-stats-polling-interval=-1"], "guest-stats-polling-interval"),
        (&["-device", "virtio-balloon-pci", "-device", "virtio-balloon-device"], "one virtio-balloon device"),
        (&["--balloon", "-device", "virtio-balloon-pci"], "--balloon / -device virtio-balloon"),
    ];
    for (args, message) in cases {
        let output = support::kestrel_command().args(["--kernel", "/nonexistent"]).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    }
}

/// The balloon's state travels in a snapshot: a running guest with a balloon (its target lowered, statistics
/// polled every 7 s) is saved and restored into a new process, which goes on counting with the polling interval
/// kept; a restore whose balloon differs (deflate-on-oom), or that has none, is refused with one line.
#[test]
fn the_balloon_is_saved_and_restored() {
    use support::counting_vm::{assert_count_continues, counts, file_uri, migrate, Dir, Vm};
    if !kvm_available() {
        return;
    }
    let dir = Dir::new("balloon-snapshot");
    let snapshot = dir.path("vm.ksnap");
    let args = ["--memory", "64M", "-device", "virtio-balloon-pci,id=balloon0"];
    let source = Vm::start(&dir, "source", &args);
    source.wait_for_count(100);
    let mut qmp = source.client();
    let reply = execute(&mut qmp, json!({"execute": "balloon", "arguments": {"value": 48 << 20}}));
    assert_eq!(reply["return"], json!({}), "{reply}");
    let set = json!({"execute": "qom-set",
                     "arguments": {"path": balloon_path(), "property": "guest-stats-polling-interval", "value": 7}});
    assert_eq!(execute(&mut qmp, set)["return"], json!({}));
    migrate(&mut qmp, &file_uri(&snapshot));
    drop(qmp);
    let source_console = source.settled_console();
    source.quit();

    let refusals: [(&[&str], &str); 2] = [
        (&["--memory", "64M", "-device", "virtio-balloon-pci,id=balloon0,deflate-on-oom=on"], "device_features"),
        (&["--memory", "64M"], "virtio-balloon"),
    ];
    for (extra, expected) in refusals {
        let mut cmd = support::counting_vm::flood_command(&dir, "refused", extra);
        cmd.arg("-incoming").arg(file_uri(&snapshot));
        let output = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{extra:?} restored");
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(expected), "{expected:?} in {stderr}");
    }

    let restored = Vm::start(&dir, "restored", &[&["-incoming", &file_uri(&snapshot)][..], &args[..]].concat());
    let last = *counts(&source_console).last().unwrap();
    restored.wait_for_count(last + 200);
    assert_count_continues(&source_console, &restored.console());
    let mut qmp = restored.client();
    let get = json!({"execute": "qom-get",
                     "arguments": {"path": balloon_path(), "property": "guest-stats-polling-interval"}});
    assert_eq!(execute(&mut qmp, get)["return"], json!(7));
    assert_eq!(execute(&mut qmp, json!({"execute": "query-balloon"}))["return"], json!({"actual": RAM}));
    drop(qmp);
    restored.quit();
}

//! Every protocol rule, against a fake machine: negotiation, ids, errors, events before replies, commands,
//! introspection generated from the command table, and hostile input.

use qmp::testing::{fuzz_one, FakeMachine, Rng};
use qmp::{
    BlockBacking, BlockDevice, BlockDeviceStats, Event, EventKind, Limits, PciDevice, PciRegion, RunState, ServerInfo,
    Session, ShutdownCause, Timestamp,
};
use serde_json::Value;

fn negotiated() -> (Session, FakeMachine) {
    let (mut s, _) = Session::new(ServerInfo::kestrel());
    let mut m = FakeMachine::default();
    assert_eq!(s.feed(b"{\"execute\":\"qmp_capabilities\"}", &mut m), b"{\"return\": {}}\r\n");
    (s, m)
}

fn text(b: Vec<u8>) -> String {
    String::from_utf8(b).unwrap()
}

fn ask(s: &mut Session, m: &mut FakeMachine, req: &str) -> String {
    text(s.feed(req.as_bytes(), m))
}

fn ret(s: &mut Session, m: &mut FakeMachine, cmd: &str) -> Value {
    let out = ask(s, m, &format!("{{\"execute\":\"{cmd}\"}}"));
    let v: Value = serde_json::from_str(out.trim_end()).unwrap_or_else(|e| panic!("{cmd}: {e}: {out}"));
    v.get("return").cloned().unwrap_or_else(|| panic!("{cmd}: {out}"))
}

#[test]
fn greeting_is_qemu_shaped() {
    let (_, g) = Session::new(ServerInfo::kestrel());
    let want = format!(
        "{{\"QMP\": {{\"version\": {{\"qemu\": {{\"micro\": 0, \"minor\": 2, \"major\": 7}}, \"package\": \"kestrel {}\"}}, \"capabilities\": []}}}}\r\n",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(text(g), want);
}

#[test]
fn negotiation_mode() {
    let (mut s, _) = Session::new(ServerInfo::kestrel());
    let mut m = FakeMachine::default();
    let expecting = "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"Expecting capabilities negotiation with 'qmp_capabilities'\"}}\r\n";
    assert_eq!(ask(&mut s, &mut m, "{\"execute\":\"query-status\"}"), expecting);
    assert_eq!(ask(&mut s, &mut m, "{\"execute\":\"nonexistent\"}"), expecting);
    // Commands do not run: stop before negotiation does not reach the machine.
    m.state = RunState::Running;
    assert_eq!(ask(&mut s, &mut m, "{\"execute\":\"stop\"}"), expecting);
    assert_eq!(m.state, RunState::Running);
    // No events while negotiating.
    let ev = Event { kind: EventKind::Stop, timestamp: Timestamp { seconds: 1, microseconds: 2 } };
    assert_eq!(s.event_bytes(&ev), None);
    // Only capabilities Kestrel offers (none) may be enabled; a refused request leaves negotiation mode on.
    assert_eq!(
        ask(&mut s, &mut m, "{\"execute\":\"qmp_capabilities\",\"arguments\":{\"enable\":[\"oob\"]}}"),
        "{\"error\": {\"class\": \"GenericError\", \"desc\": \"Capability oob not available\"}}\r\n"
    );
    assert!(!s.is_negotiated());
    assert_eq!(
        ask(&mut s, &mut m, "{\"execute\":\"qmp_capabilities\",\"arguments\":{\"enable\":[]},\"id\":\"n\"}"),
        "{\"return\": {}, \"id\": \"n\"}\r\n"
    );
    assert_eq!(
        text(s.event_bytes(&ev).unwrap()),
        "{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"STOP\"}\r\n"
    );
    assert_eq!(
        ask(&mut s, &mut m, "{\"execute\":\"qmp_capabilities\"}"),
        "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"Capabilities negotiation is already complete, command ignored\"}}\r\n"
    );
    // A new connection starts over.
    let (s2, _) = Session::new(ServerInfo::kestrel());
    assert!(!s2.is_negotiated());
}

#[test]
fn id_is_echoed_verbatim_and_only_for_objects() {
    let (mut s, mut m) = negotiated();
    for id in ["\"x\"", "1", "-1", "1.5", "null", "true", "[1, {\"a\": []}]", "{\"a\": 2, \"b\": 1}", "\"\\u00FC\""] {
        let ok = ask(&mut s, &mut m, &format!("{{\"execute\":\"query-name\",\"id\":{id}}}"));
        assert!(ok.ends_with(&format!(", \"id\": {id}}}\r\n")) || ok.contains(&format!("\"id\": {id}")), "{ok}");
        let err = ask(&mut s, &mut m, &format!("{{\"execute\":\"nope\",\"id\":{id}}}"));
        assert!(err.starts_with(&format!("{{\"id\": {id}, \"error\"")), "{err}");
    }
    for bad in ["[\"id\", 1]", "\"id\" ", "{\"id\": 1,}", "@"] {
        let out = ask(&mut s, &mut m, bad);
        assert!(!out.contains("\"id\""), "{bad}: {out}");
        assert!(out.starts_with("{\"error\": {\"class\": \"GenericError\""), "{bad}: {out}");
    }
}

#[test]
fn request_members_are_checked() {
    let (mut s, mut m) = negotiated();
    let desc = |out: String| -> String {
        let v: Value = serde_json::from_str(out.trim_end()).unwrap();
        v["error"]["desc"].as_str().unwrap().to_string()
    };
    assert_eq!(desc(ask(&mut s, &mut m, "{\"id\":1}")), "QMP input lacks member 'execute'");
    assert_eq!(desc(ask(&mut s, &mut m, "{\"execute\":[]}")), "QMP input member 'execute' must be a string");
    assert_eq!(
        desc(ask(&mut s, &mut m, "{\"execute\":\"stop\",\"arguments\":1}")),
        "QMP input member 'arguments' must be an object"
    );
    assert_eq!(desc(ask(&mut s, &mut m, "{\"exec-oob\":\"stop\"}")), "QMP input member 'exec-oob' is unexpected");
    assert_eq!(desc(ask(&mut s, &mut m, "{\"execute\":\"stop\",\"x\":1}")), "QMP input member 'x' is unexpected");
    assert_eq!(desc(ask(&mut s, &mut m, "{\"execute\":\"x-nope\"}")), "The command x-nope has not been found");
    assert_eq!(
        desc(ask(&mut s, &mut m, "{\"execute\":\"qom-get\",\"arguments\":{\"path\":\"/\"}}")),
        "Parameter 'property' is missing"
    );
    assert_eq!(
        desc(ask(&mut s, &mut m, "{\"execute\":\"human-monitor-command\",\"arguments\":{\"command-line\":[]}}")),
        "Invalid parameter type for 'command-line', expected: string"
    );
    assert_eq!(
        desc(ask(&mut s, &mut m, "{\"execute\":\"stop\",\"arguments\":{\"now\":1}}")),
        "Parameter 'now' is unexpected"
    );
}

#[test]
fn events_come_before_the_reply_that_caused_them() {
    let (mut s, mut m) = negotiated();
    let lines = |o: String| o.split_terminator("\r\n").map(str::to_string).collect::<Vec<_>>();
    let out = lines(ask(&mut s, &mut m, "{\"execute\":\"cont\",\"id\":1}"));
    assert_eq!(out.len(), 2);
    assert!(out[0].starts_with("{\"timestamp\": {\"seconds\": ") && out[0].ends_with(", \"event\": \"RESUME\"}"));
    assert_eq!(out[1], "{\"return\": {}, \"id\": 1}");
    assert_eq!(ask(&mut s, &mut m, "{\"execute\":\"cont\"}"), "{\"return\": {}}\r\n", "already running: no event");
    let out = lines(ask(&mut s, &mut m, "{\"execute\":\"stop\"}{\"execute\":\"stop\"}{\"execute\":\"system_reset\"}"));
    assert!(out[0].ends_with("\"event\": \"STOP\"}"));
    assert_eq!(out[1], "{\"return\": {}}");
    assert_eq!(out[2], "{\"return\": {}}");
    assert!(
        out[3].ends_with("\"event\": \"RESET\", \"data\": {\"guest\": false, \"reason\": \"host-qmp-system-reset\"}}")
    );
    let out = lines(ask(&mut s, &mut m, "{\"execute\":\"system_powerdown\"}"));
    assert!(out[0].ends_with("\"event\": \"POWERDOWN\"}"));
    let out = lines(ask(&mut s, &mut m, "{\"execute\":\"quit\"}"));
    assert!(out[0].ends_with("\"event\": \"SHUTDOWN\", \"data\": {\"guest\": false, \"reason\": \"host-qmp-quit\"}}"));
    assert_eq!(out[1], "{\"return\": {}}");
    assert!(m.quit_requested);
    let ev = Event { kind: EventKind::shutdown(ShutdownCause::GuestShutdown), timestamp: Timestamp::default() };
    assert_eq!(
        text(s.event_bytes(&ev).unwrap()),
        "{\"timestamp\": {\"seconds\": 0, \"microseconds\": 0}, \"event\": \"SHUTDOWN\", \"data\": {\"guest\": true, \"reason\": \"guest-shutdown\"}}\r\n"
    );
}

#[test]
fn cont_needs_reset_after_shutdown_or_internal_error() {
    let (mut s, mut m) = negotiated();
    for st in [RunState::Shutdown, RunState::InternalError, RunState::GuestPanicked] {
        m.state = st;
        assert_eq!(
            ask(&mut s, &mut m, "{\"execute\":\"cont\"}"),
            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"Resetting the Virtual Machine is required\"}}\r\n"
        );
        let st_name = st.as_str();
        assert_eq!(ret(&mut s, &mut m, "query-status")["status"], st_name);
    }
}

#[test]
fn queries() {
    let (mut s, mut m) = negotiated();
    m.name = Some("vm\u{fc}".into());
    m.uuid = *b"\x12\x34\x56\x78\x9a\xbc\xde\xf0\x01\x02\x03\x04\x05\x06\x07\x08";
    assert_eq!(ask(&mut s, &mut m, "{\"execute\":\"query-name\"}"), "{\"return\": {\"name\": \"vm\\u00FC\"}}\r\n");
    assert_eq!(ret(&mut s, &mut m, "query-uuid")["UUID"], "12345678-9abc-def0-0102-030405060708");
    assert_eq!(
        ask(&mut s, &mut m, "{\"execute\":\"query-status\"}"),
        "{\"return\": {\"status\": \"prelaunch\", \"singlestep\": false, \"running\": false}}\r\n"
    );
    assert_eq!(ret(&mut s, &mut m, "query-target")["arch"], "x86_64");
    assert_eq!(ret(&mut s, &mut m, "query-machines")[0]["is-default"], true);
    let cmds = ret(&mut s, &mut m, "query-commands");
    let names: Vec<&str> = cmds.as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names.len(), qmp::commands::COMMANDS.len());
    for c in qmp::commands::COMMANDS {
        assert!(names.contains(&c.name));
    }
}

#[test]
fn human_monitor_command() {
    let (mut s, mut m) = negotiated();
    m.cpus.push(qmp::CpuInfo {
        cpu_index: 1,
        thread_id: 77,
        qom_path: "/machine/unattached/device[1]".into(),
        ..m.cpus[0].clone()
    });
    let hmp = |s: &mut Session, m: &mut FakeMachine, line: &str, extra: &str| {
        let out = ask(
            s,
            m,
            &format!("{{\"execute\":\"human-monitor-command\",\"arguments\":{{\"command-line\":\"{line}\"{extra}}}}}"),
        );
        let v: Value = serde_json::from_str(out.trim_end()).unwrap();
        v.get("return")
            .map(|r| r.as_str().unwrap().to_string())
            .unwrap_or_else(|| v["error"]["desc"].as_str().unwrap().to_string())
    };
    assert_eq!(hmp(&mut s, &mut m, "info status", ""), "VM status: paused (prelaunch)\r\n");
    m.state = RunState::Running;
    assert_eq!(hmp(&mut s, &mut m, "  info   status ", ""), "VM status: running\r\n");
    m.state = RunState::Paused;
    assert_eq!(hmp(&mut s, &mut m, "info status", ""), "VM status: paused\r\n");
    assert_eq!(hmp(&mut s, &mut m, "info cpus", ""), "* CPU #0: thread_id=4242\r\n  CPU #1: thread_id=77\r\n");
    assert_eq!(
        hmp(&mut s, &mut m, "info cpus", ",\"cpu-index\":1"),
        "  CPU #0: thread_id=4242\r\n* CPU #1: thread_id=77\r\n"
    );
    assert_eq!(hmp(&mut s, &mut m, "info cpus", ",\"cpu-index\":9"), "Parameter 'cpu-index' expects a CPU number");
    assert_eq!(hmp(&mut s, &mut m, "info version", ""), format!("7.2.0kestrel {}\r\n", env!("CARGO_PKG_VERSION")));
    assert_eq!(hmp(&mut s, &mut m, "info bogus x", ""), "unknown command: 'info bogus'\r\n");
    assert_eq!(hmp(&mut s, &mut m, "bogus x", ""), "unknown command: 'bogus'\r\n");
    assert_eq!(hmp(&mut s, &mut m, "", ""), "");
}

#[test]
fn qom() {
    let (mut s, mut m) = negotiated();
    assert_eq!(
        ask(&mut s, &mut m, "{\"execute\":\"qom-get\",\"arguments\":{\"path\":\"/nope\",\"property\":\"type\"}}"),
        "{\"error\": {\"class\": \"DeviceNotFound\", \"desc\": \"Device '/nope' not found\"}}\r\n"
    );
    assert_eq!(
        ask(&mut s, &mut m, "{\"execute\":\"qom-get\",\"arguments\":{\"path\":\"/machine\",\"property\":\"x\"}}"),
        "{\"error\": {\"class\": \"GenericError\", \"desc\": \"Property 'pc-i440fx-7.2-machine.x' not found\"}}\r\n"
    );
    assert_eq!(
        ask(&mut s, &mut m, "{\"execute\":\"qom-list\",\"arguments\":{\"path\":\"/\"}}"),
        "{\"return\": [{\"name\": \"type\", \"type\": \"string\"}, {\"name\": \"objects\", \"type\": \"child<container>\"}, {\"name\": \"machine\", \"type\": \"child<pc-i440fx-7.2-machine>\"}, {\"name\": \"chardevs\", \"type\": \"child<container>\"}]}\r\n"
    );
}

/// Every command's return value conforms to the return type it declares in the schema, so `query-qmp-schema`
/// describes what is actually sent.
#[test]
fn returns_match_declared_types() {
    let (mut s, mut m) = negotiated();
    m.state = RunState::Running;
    m.name = Some("n".into());
    m.disks = two_disks();
    m.balloon = Some((1 << 30, 1 << 30));
    for c in qmp::commands::COMMANDS {
        let req = match c.name {
            // SchemaInfo is declared with its common members only (its per-meta-type variants are not spelled
            // out), so its entries carry members the check does not know; the schema test covers them.
            "qmp_capabilities" | "quit" | "query-qmp-schema" => continue,
            "human-monitor-command" => {
                "{\"execute\":\"human-monitor-command\",\"arguments\":{\"command-line\":\"info cpus\"}}".to_string()
            }
            "qom-list" => "{\"execute\":\"qom-list\",\"arguments\":{\"path\":\"/\"}}".to_string(),
            "migrate" => "{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"file:/nonexistent/vm\"}}".to_string(),
            "migrate-incoming" => {
                m.awaiting_incoming = true;
                "{\"execute\":\"migrate-incoming\",\"arguments\":{\"uri\":\"file:/nonexistent/vm\"}}".to_string()
            }
            "migrate-set-capabilities" => "{\"execute\":\"migrate-set-capabilities\",\"arguments\":{\"capabilities\":\
                                           [{\"capability\":\"events\",\"state\":true}]}}"
                .to_string(),
            // getfd names a descriptor that came with the request; closefd (after it in the table) closes it.
            "getfd" => {
                let (reader, _writer) = std::io::pipe().unwrap();
                s.receive_fds([reader.into()]);
                "{\"execute\":\"getfd\",\"arguments\":{\"fdname\":\"f\"}}".to_string()
            }
            "closefd" => "{\"execute\":\"closefd\",\"arguments\":{\"fdname\":\"f\"}}".to_string(),
            "qom-get" => "{\"execute\":\"qom-get\",\"arguments\":{\"path\":\"/\",\"property\":\"type\"}}".to_string(),
            "qom-set" => {
                m.qom.push((
                    "/machine/peripheral/b".into(),
                    qmp::QomObject {
                        type_name: "virtio-balloon-pci".into(),
                        properties: vec![qmp::QomProperty {
                            name: "guest-stats-polling-interval".into(),
                            type_name: "int".into(),
                            value: Some(serde_json::json!(0)),
                        }],
                    },
                ));
                "{\"execute\":\"qom-set\",\"arguments\":{\"path\":\"/machine/peripheral/b\",\
                 \"property\":\"guest-stats-polling-interval\",\"value\":5}}"
                    .to_string()
            }
            "balloon" => "{\"execute\":\"balloon\",\"arguments\":{\"value\":536870912}}".to_string(),
            "device-list-properties" | "qom-list-properties" => {
                format!("{{\"execute\":\"{}\",\"arguments\":{{\"typename\":\"virtio-rng-pci\"}}}}", c.name)
            }
            "query-cpu-model-expansion" => "{\"execute\":\"query-cpu-model-expansion\",\"arguments\":\
                                            {\"type\":\"full\",\"model\":{\"name\":\"host\"}}}"
                .to_string(),
            n => format!("{{\"execute\":\"{n}\"}}"),
        };
        let out = ask(&mut s, &mut m, &req);
        let last = out.trim_end().rsplit("\r\n").next().unwrap();
        let v: Value = serde_json::from_str(last).unwrap();
        let r = v.get("return").unwrap_or_else(|| panic!("{}: {out}", c.name));
        qmp::schema::check_value_type(r, c.ret).unwrap_or_else(|e| panic!("{}: {e}", c.name));
    }
}

fn two_disks() -> Vec<BlockDevice> {
    let stats =
        BlockDeviceStats { rd_bytes: 4096, rd_operations: 2, wr_bytes: 512, wr_operations: 1, ..Default::default() };
    vec![
        BlockDevice {
            device: "virtio0".into(),
            qdev: None,
            node_name: "#block0".into(),
            file: "/images/a.raw".into(),
            read_only: false,
            direct: true,
            virtual_size: 1 << 20,
            actual_size: Some(8192),
            format: "raw".into(),
            cluster_size: None,
            backing: None,
            stats: BlockDeviceStats { wr_highest_offset: 1536, invalid_wr_operations: 3, ..stats },
        },
        BlockDevice {
            device: "virtio1".into(),
            qdev: Some("/machine/peripheral-anon/device[1]/virtio-backend".into()),
            node_name: "#block1".into(),
            file: "/images/b.qcow2".into(),
            read_only: true,
            direct: false,
            virtual_size: 512,
            actual_size: None,
            format: "qcow2".into(),
            cluster_size: Some(65536),
            backing: Some(Box::new(BlockBacking {
                name: "base.raw".into(),
                recorded_format: Some("raw".into()),
                filename: "/images/base.raw".into(),
                format: "raw".into(),
                virtual_size: 512,
                actual_size: Some(4096),
                cluster_size: None,
                backing: None,
            })),
            stats: BlockDeviceStats::default(),
        },
    ]
}

/// `query-pci` is byte-identical to QEMU 7.2's for the same functions: these two are QEMU's i440FX host bridge and
/// a virtio-net-pci (transitional, with an I/O BAR) as `qemu-system-x86_64 -M pc -S` reports them, before the
/// firmware assigns any BAR.
#[test]
fn pci_query_matches_qemu_bytes() {
    let (mut s, mut m) = negotiated();
    assert_eq!(ask(&mut s, &mut m, "{\"execute\":\"query-pci\"}"), "{\"return\": []}\r\n");
    let host_bridge = PciDevice {
        class: 0x0600,
        vendor_id: 0x8086,
        device_id: 0x1237,
        subsystem_vendor_id: 0x1af4,
        subsystem_id: 0x1100,
        ..Default::default()
    };
    let unmapped =
        |bar, size, io, prefetchable, is_64bit| PciRegion { bar, io, address: None, size, prefetchable, is_64bit };
    let net = PciDevice {
        slot: 5,
        class: 0x0200,
        vendor_id: 0x1af4,
        device_id: 0x1000,
        subsystem_vendor_id: 0x1af4,
        subsystem_id: 1,
        irq: Some(0),
        irq_pin: 1,
        regions: vec![
            unmapped(0, 32, true, false, false),
            unmapped(1, 4096, false, false, false),
            unmapped(4, 16384, false, true, true),
        ],
        ..Default::default()
    };
    m.pci = vec![host_bridge, net];
    let qemu = concat!(
        r#"{"return": [{"bus": 0, "devices": [{"irq_pin": 0, "bus": 0, "qdev_id": "", "slot": 0, "class_info": "#,
        r#"{"class": 1536, "desc": "Host bridge"}, "id": {"device": 4663, "subsystem-vendor": 6900, "vendor": 32902, "#,
        r#""subsystem": 4352}, "function": 0, "regions": []}, {"irq_pin": 1, "bus": 0, "qdev_id": "", "irq": 0, "#,
        r#""slot": 5, "class_info": {"class": 512, "desc": "Ethernet controller"}, "id": {"device": 4096, "#,
        r#""subsystem-vendor": 6900, "vendor": 6900, "subsystem": 1}, "function": 0, "regions": [{"bar": 0, "#,
        r#""size": 32, "address": -1, "type": "io"}, {"prefetch": false, "mem_type_64": false, "bar": 1, "#,
        r#""size": 4096, "address": -1, "type": "memory"}, {"prefetch": true, "mem_type_64": true, "bar": 4, "#,
        r#""size": 16384, "address": -1, "type": "memory"}]}]}]}"#,
        "\r\n"
    );
    assert_eq!(ask(&mut s, &mut m, "{\"execute\":\"query-pci\"}"), qemu);
    // A mapped BAR reports its address; a class outside QEMU's table (virtio-rng's 0x00ff) has no description.
    m.pci[1].regions[1].address = Some(0xc000_0000);
    m.pci[1].class = 0x00ff;
    let pci = ret(&mut s, &mut m, "query-pci");
    assert_eq!(pci[0]["devices"][1]["regions"][1]["address"], 0xc000_0000u64);
    assert_eq!(pci[0]["devices"][1]["class_info"], serde_json::json!({"class": 255}));
}

/// `query-block` and `query-blockstats` carry every member QEMU 7.2 makes mandatory, with the disk's values.
#[test]
fn block_queries() {
    let (mut s, mut m) = negotiated();
    assert_eq!(ret(&mut s, &mut m, "query-block"), serde_json::json!([]));
    assert_eq!(ret(&mut s, &mut m, "query-blockstats"), serde_json::json!([]));
    m.disks = two_disks();
    let block = ret(&mut s, &mut m, "query-block");
    assert_eq!(
        block[0],
        serde_json::json!({
            "device": "virtio0", "type": "unknown", "removable": false, "locked": false, "io-status": "ok",
            "inserted": {
                "file": "/images/a.raw", "node-name": "#block0", "ro": false, "drv": "raw", "backing_file_depth": 0,
                "encrypted": false, "detect_zeroes": "off", "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0,
                "iops_rd": 0, "iops_wr": 0, "write_threshold": 0,
                "cache": {"writeback": true, "direct": true, "no-flush": false},
                "image": {"filename": "/images/a.raw", "format": "raw", "dirty-flag": false, "actual-size": 8192,
                          "virtual-size": 1048576},
            },
        })
    );
    // The second disk: read-only, a qdev path, no actual size (member omitted).
    assert_eq!(block[1]["qdev"], "/machine/peripheral-anon/device[1]/virtio-backend");
    assert_eq!(block[1]["inserted"]["ro"], true);
    assert_eq!(block[1]["inserted"]["cache"]["direct"], false);
    assert!(block[1]["inserted"]["image"].get("actual-size").is_none());
    // A qcow2 image over a raw one, as QEMU 7.2 reports a chain.
    let b = &block[1]["inserted"];
    assert_eq!(
        (&b["drv"], &b["backing_file"], &b["backing_file_depth"]),
        (&"qcow2".into(), &"base.raw".into(), &1.into())
    );
    assert_eq!(
        b["image"],
        serde_json::json!({
            "filename": "/images/b.qcow2", "format": "qcow2", "dirty-flag": false, "virtual-size": 512,
            "cluster-size": 65536, "backing-filename": "base.raw", "full-backing-filename": "/images/base.raw",
            "backing-filename-format": "raw",
            "backing-image": {"filename": "/images/base.raw", "format": "raw", "virtual-size": 512, "actual-size": 4096},
        })
    );

    let stats = ret(&mut s, &mut m, "query-blockstats");
    assert_eq!(stats.as_array().unwrap().len(), 2);
    assert_eq!((&stats[0]["device"], &stats[0]["node-name"]), (&"virtio0".into(), &"#block0".into()));
    assert!(stats[0].get("qdev").is_none());
    assert_eq!(stats[1]["qdev"], "/machine/peripheral-anon/device[1]/virtio-backend");
    let st = &stats[0]["stats"];
    for (k, v) in [
        ("rd_bytes", 4096),
        ("rd_operations", 2),
        ("wr_bytes", 512),
        ("wr_operations", 1),
        ("wr_highest_offset", 1536),
        ("invalid_wr_operations", 3),
        ("unmap_operations", 0),
        ("failed_rd_operations", 0),
        ("rd_merged", 0),
    ] {
        assert_eq!(st[k], v, "{k}");
    }
    assert_eq!((&st["account_invalid"], &st["account_failed"]), (&true.into(), &true.into()));
    assert_eq!(st["timed_stats"], serde_json::json!([]));
    assert!(st.get("idle_time_ns").is_none());
    assert_eq!(st.as_object().unwrap().len(), 26);

    // query-nodes: the same counters, named by node only.
    let out = ask(&mut s, &mut m, "{\"execute\":\"query-blockstats\",\"arguments\":{\"query-nodes\":true}}");
    let v: Value = serde_json::from_str(out.trim_end()).unwrap();
    let nodes = &v["return"];
    assert_eq!(nodes[0]["node-name"], "#block0");
    assert!(nodes[0].get("device").is_none() && nodes[1].get("qdev").is_none());
    assert_eq!(nodes[0]["stats"], stats[0]["stats"]);
    let out = ask(&mut s, &mut m, "{\"execute\":\"query-blockstats\",\"arguments\":{\"query-nodes\":1}}");
    assert!(out.contains("Invalid parameter type for 'query-nodes', expected: boolean"), "{out}");
}

#[test]
fn schema_is_self_consistent_and_generated_from_the_table() {
    let (mut s, mut m) = negotiated();
    let schema = ret(&mut s, &mut m, "query-qmp-schema");
    let list = schema.as_array().unwrap();
    let mut names = std::collections::HashSet::new();
    for e in list {
        assert!(names.insert(e["name"].as_str().unwrap().to_string()), "duplicate {}", e["name"]);
    }
    let defined = |n: &Value| names.contains(n.as_str().unwrap());
    for e in list {
        match e["meta-type"].as_str().unwrap() {
            "command" => assert!(defined(&e["arg-type"]) && defined(&e["ret-type"])),
            "event" => assert!(defined(&e["arg-type"])),
            "array" => assert!(defined(&e["element-type"])),
            "object" => {
                for mem in e["members"].as_array().unwrap() {
                    assert!(defined(&mem["type"]), "{mem}");
                }
            }
            "enum" | "builtin" => {}
            t => panic!("unexpected meta-type {t}"),
        }
    }
    for c in qmp::commands::COMMANDS {
        assert!(list.iter().any(|e| e["name"] == c.name && e["meta-type"] == "command"));
    }
    let commands = list.iter().filter(|e| e["meta-type"] == "command").count();
    assert_eq!(commands, qmp::commands::COMMANDS.len());
    for ev in ["STOP", "RESUME", "RESET", "POWERDOWN", "SHUTDOWN"] {
        assert!(list.iter().any(|e| e["name"] == ev && e["meta-type"] == "event"));
    }
    // The shape QEMU uses: query-status takes the empty object and returns StatusInfo.
    let qs = list.iter().find(|e| e["name"] == "query-status").unwrap();
    let ret_t = list.iter().find(|e| e["name"] == qs["ret-type"]).unwrap();
    assert_eq!(ret_t["members"][2], serde_json::json!({"name": "status", "type": ret_t["members"][2]["type"]}));
    let out = ask(&mut s, &mut m, "{\"execute\":\"query-qmp-schema\"}");
    assert!(out.starts_with("{\"return\": [{\"name\": \"qmp_capabilities\", \"ret-type\": \"") && out.is_ascii());
}

#[test]
fn hostile_input_keeps_the_session_usable() {
    let (mut s, mut m) = negotiated();
    let probe = "{\"execute\":\"query-status\",\"id\":\"probe\"}";
    let usable = |s: &mut Session, m: &mut FakeMachine| {
        let out = ask(s, m, probe);
        assert!(out.ends_with("\"id\": \"probe\"}\r\n"), "{out}");
    };
    // Truncated JSON waits for more; the client finishes it (or resyncs with a newline inside a string).
    assert_eq!(ask(&mut s, &mut m, "{\"execute\":\"query-st"), "");
    assert!(ask(&mut s, &mut m, "\n}").contains("JSON parse error"));
    usable(&mut s, &mut m);
    // Deep nesting: 1024 is fine, 1025 is an error, and each unmatched closer is one more error.
    let deep = |n| "[".repeat(n) + &"]".repeat(n);
    assert_eq!(
        ask(&mut s, &mut m, &deep(1024)),
        "{\"error\": {\"class\": \"GenericError\", \"desc\": \"QMP input must be a JSON object\"}}\r\n"
    );
    let out = ask(&mut s, &mut m, &deep(1025));
    assert!(out.starts_with(
        "{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON nesting depth limit exceeded\"}}\r\n"
    ));
    assert_eq!(out.matches("expecting value").count(), 1025);
    usable(&mut s, &mut m);
    // A 1 MiB string id is echoed whole.
    let big = "x".repeat(1 << 20);
    let out = ask(&mut s, &mut m, &format!("{{\"execute\":\"query-name\",\"id\":\"{big}\"}}"));
    assert_eq!(out, format!("{{\"return\": {{}}, \"id\": \"{big}\"}}\r\n"));
    // Over the size limit: an error, then the rest of the string lexes as garbage until a resync point.
    let (mut s2, _) = Session::with_limits(ServerInfo::kestrel(), Limits { max_bytes: 4096, ..Limits::default() });
    s2.feed(b"{\"execute\":\"qmp_capabilities\"}", &mut m);
    let out = text(s2.feed(format!("{{\"id\":\"{}\"}}\n", "y".repeat(10_000)).as_bytes(), &mut m));
    assert!(
        out.starts_with("{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON token size limit exceeded\"}}\r\n")
    );
    usable(&mut s2, &mut m);
    // Non-objects, unknown members, random bytes.
    for junk in ["42 ", "\"s\"", "[]", "null ", "{\"foo\":1}", "\u{0}\u{1}\u{ff}", "{'execute':'stop','x':{}}"] {
        assert!(ask(&mut s, &mut m, junk).contains("\"error\""), "{junk}");
        usable(&mut s, &mut m);
    }
}

/// The fuzz target's body over a deterministic corpus: random bytes, and random splices of protocol fragments
/// (which reach far deeper than random bytes do).
#[test]
fn fuzz_smoke_corpus() {
    const PIECES: &[&str] = &[
        "{",
        "}",
        "[",
        "]",
        ":",
        ",",
        "\"execute\"",
        "\"arguments\"",
        "\"id\"",
        "'id'",
        "\"qmp_capabilities\"",
        "\"query-status\"",
        "\"stop\"",
        "\"cont\"",
        "\"quit\"",
        "\"system_reset\"",
        "\"human-monitor-command\"",
        "\"command-line\"",
        "\"info cpus\"",
        "\"qom-get\"",
        "\"path\"",
        "\"/machine\"",
        "\"enable\"",
        "\"oob\"",
        "1",
        "-0",
        "1.5e3",
        "18446744073709551616",
        "true",
        "null",
        "nul",
        "\"\\u00fc\\uD83D\\uDE00\"",
        "\"\\uD800\"",
        "\"\\x\"",
        " ",
        "\n",
        "\r\n",
        "\t",
        "\u{ff}",
        "\u{0}",
        "@",
        "\"",
        "'",
        "{\"execute\":\"qmp_capabilities\"}",
        "{\"execute\":\"query-qmp-schema\"}",
        "{\"execute\":\"query-commands\"}",
    ];
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    for i in 0..10_000 {
        let mut input = vec![rng.next_u64() as u8];
        let len = (rng.next_u64() % 64) as usize;
        if i % 2 == 0 {
            input.extend((0..len * 4).map(|_| rng.next_u64() as u8));
        } else {
            for _ in 0..len {
                input.extend_from_slice(PIECES[(rng.next_u64() % PIECES.len() as u64) as usize].as_bytes());
            }
        }
        fuzz_one(&input);
    }
}

#[test]
fn hmp_run_state_commands_are_their_qmp_commands() {
    let (mut s, mut m) = negotiated();
    let hmp = |s: &mut Session, m: &mut FakeMachine, line: &str| {
        ask(s, m, &format!("{{\"execute\":\"human-monitor-command\",\"arguments\":{{\"command-line\":\"{line}\"}}}}"))
    };
    m.state = RunState::Running;
    let out = hmp(&mut s, &mut m, "stop");
    assert!(out.contains("\"event\": \"STOP\""), "the event comes before the reply: {out}");
    assert!(out.ends_with("{\"return\": \"\"}\r\n"), "{out}");
    assert_eq!(m.state, RunState::Paused);
    let out = hmp(&mut s, &mut m, "c");
    assert!(out.contains("\"event\": \"RESUME\""), "{out}");
    assert_eq!(m.state, RunState::Running);
    // Errors are HMP text in a successful reply, as QEMU prints them.
    m.state = RunState::Shutdown;
    assert_eq!(
        hmp(&mut s, &mut m, "cont"),
        "{\"return\": \"Error: Resetting the Virtual Machine is required\\r\\n\"}\r\n"
    );
    let help = hmp(&mut s, &mut m, "help");
    for name in ["c|cont", "stop", "system_reset", "system_powerdown", "q|quit", "info [subcommand]"] {
        assert!(help.contains(name), "help lists {name}: {help}");
    }
    assert!(hmp(&mut s, &mut m, "q").contains("\"event\": \"SHUTDOWN\""));
}

/// libvirt's start-up pair: the capabilities Kestrel has (only `events`, off until set), and a capability it
/// does not implement refused by the schema rather than accepted and ignored.
#[test]
fn migration_capabilities_are_the_implemented_ones() {
    let (mut s, mut m) = negotiated();
    let query = "{\"execute\":\"query-migrate-capabilities\"}";
    assert_eq!(ask(&mut s, &mut m, query), "{\"return\": [{\"state\": false, \"capability\": \"events\"}]}\r\n");
    let set = "{\"execute\":\"migrate-set-capabilities\",\"arguments\":{\"capabilities\":[{\"capability\":\"events\",\
               \"state\":true}]}}";
    assert_eq!(ask(&mut s, &mut m, set), "{\"return\": {}}\r\n");
    assert!(m.migration_capabilities.events);
    assert_eq!(ask(&mut s, &mut m, query), "{\"return\": [{\"state\": true, \"capability\": \"events\"}]}\r\n");
    let unknown = "{\"execute\":\"migrate-set-capabilities\",\"arguments\":{\"capabilities\":[{\"capability\":\
                   \"events\",\"state\":false},{\"capability\":\"xbzrle\",\"state\":true}]}}";
    let out = ask(&mut s, &mut m, unknown);
    assert!(out.contains("GenericError") && out.contains("xbzrle"), "{out}");
    assert!(m.migration_capabilities.events, "a refused request changed a capability");
}

/// A descriptor passed with the request is named by getfd and used up by `migrate fd:NAME`; a name nobody gave
/// and a getfd with nothing passed are refused as QEMU refuses them.
#[test]
fn getfd_then_migrate_to_the_named_descriptor() {
    let (mut s, mut m) = negotiated();
    let out = ask(&mut s, &mut m, "{\"execute\":\"getfd\",\"arguments\":{\"fdname\":\"migrate\"}}");
    assert!(out.contains("No file descriptor supplied via SCM_RIGHTS"), "{out}");
    let out = ask(&mut s, &mut m, "{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"fd:migrate\"}}");
    assert!(out.contains("File descriptor named 'migrate' has not been found"), "{out}");
    assert!(m.migration.is_none());
    let (reader, _writer) = std::io::pipe().unwrap();
    s.receive_fds([reader.into()]);
    assert_eq!(
        ask(&mut s, &mut m, "{\"execute\":\"getfd\",\"arguments\":{\"fdname\":\"migrate\"}}"),
        "{\"return\": {}}\r\n"
    );
    assert_eq!(
        ask(&mut s, &mut m, "{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"fd:migrate\"}}"),
        "{\"return\": {}}\r\n"
    );
    assert!(m.migration.is_some());
    let out = ask(&mut s, &mut m, "{\"execute\":\"closefd\",\"arguments\":{\"fdname\":\"migrate\"}}");
    assert!(out.contains("File descriptor named 'migrate' not found"), "{out}");
}

fn ask_json(s: &mut Session, m: &mut FakeMachine, req: &str) -> Value {
    let out = ask(s, m, req);
    serde_json::from_str(out.trim_end()).unwrap_or_else(|e| panic!("{req}: {e}: {out}"))
}

#[test]
fn qom_list_types_filters_abstract_types_and_by_ancestor() {
    let (mut s, mut m) = negotiated();
    let names = |v: &Value| -> Vec<String> {
        v["return"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap().to_string()).collect()
    };
    let all = ask_json(&mut s, &mut m, "{\"execute\":\"qom-list-types\"}");
    assert_eq!(names(&all), ["virtio-rng-pci", "rng-random"]);
    // QEMU's member order and shape: no `abstract` member on concrete types.
    assert_eq!(all["return"][0], serde_json::json!({"name": "virtio-rng-pci", "parent": "virtio-pci"}));
    let devices =
        ask_json(&mut s, &mut m, "{\"execute\":\"qom-list-types\",\"arguments\":{\"implements\":\"device\"}}");
    assert_eq!(names(&devices), ["virtio-rng-pci"]);
    let with_abstract = ask_json(
        &mut s,
        &mut m,
        "{\"execute\":\"qom-list-types\",\"arguments\":{\"implements\":\"rng-backend\",\"abstract\":true}}",
    );
    assert_eq!(names(&with_abstract), ["rng-backend", "rng-random"]);
    assert_eq!(with_abstract["return"][0]["abstract"], true);
    let none = ask_json(&mut s, &mut m, "{\"execute\":\"qom-list-types\",\"arguments\":{\"implements\":\"nothing\"}}");
    assert_eq!(none["return"], serde_json::json!([]));
}

#[test]
fn device_list_properties_answers_like_qemu() {
    let (mut s, mut m) = negotiated();
    let ok = ask_json(
        &mut s,
        &mut m,
        "{\"execute\":\"device-list-properties\",\"arguments\":{\"typename\":\"virtio-rng-pci\"}}",
    );
    assert_eq!(ok["return"], serde_json::json!([{"name": "rng", "type": "link<rng-backend>"}]));
    let error = |s: &mut Session, m: &mut FakeMachine, typename: &str| {
        let req = format!("{{\"execute\":\"device-list-properties\",\"arguments\":{{\"typename\":\"{typename}\"}}}}");
        ask_json(s, m, &req)["error"].clone()
    };
    // libvirt tells a missing device from a failed probe by the class.
    let missing = error(&mut s, &mut m, "virtio-net-ccw");
    assert_eq!(missing["class"], "DeviceNotFound");
    assert_eq!(missing["desc"], "Device 'virtio-net-ccw' not found");
    assert_eq!(error(&mut s, &mut m, "rng-random")["desc"], "Parameter 'typename' expects device type");
    assert_eq!(error(&mut s, &mut m, "virtio-pci")["desc"], "Parameter 'typename' expects non-abstract device type");
    assert_eq!(error(&mut s, &mut m, "virtio-pci")["class"], "GenericError");
}

#[test]
fn qom_list_properties_is_always_a_list() {
    let (mut s, mut m) = negotiated();
    let known = ask_json(
        &mut s,
        &mut m,
        "{\"execute\":\"qom-list-properties\",\"arguments\":{\"typename\":\"virtio-rng-pci\"}}",
    );
    assert_eq!(known["return"][0]["name"], "rng");
    // libvirt 9.0 crashes on an error here; a type the binary lacks has no properties to offer.
    for typename in ["memory-backend-file", "max-x86_64-cpu", "rng-random"] {
        let req = format!("{{\"execute\":\"qom-list-properties\",\"arguments\":{{\"typename\":\"{typename}\"}}}}");
        assert_eq!(ask_json(&mut s, &mut m, &req)["return"], serde_json::json!([]), "{typename}");
    }
}

#[test]
fn cpu_definitions_and_host_model_expansion() {
    let (mut s, mut m) = negotiated();
    let defs = ret(&mut s, &mut m, "query-cpu-definitions");
    assert_eq!(
        defs,
        serde_json::json!([{"name": "host", "typename": "host-x86_64-cpu", "unavailable-features": [],
                            "static": false, "migration-safe": false, "deprecated": false}])
    );
    let expand = |s: &mut Session, m: &mut FakeMachine, args: &str| {
        ask_json(s, m, &format!("{{\"execute\":\"query-cpu-model-expansion\",\"arguments\":{args}}}"))
    };
    let stat = expand(&mut s, &mut m, "{\"type\":\"static\",\"model\":{\"name\":\"host\"}}");
    assert_eq!(stat["return"], serde_json::json!({"model": {"name": "base", "props": {"fpu": true, "vmx": false}}}));
    let full =
        expand(&mut s, &mut m, "{\"type\":\"full\",\"model\":{\"name\":\"host\",\"props\":{\"migratable\":false}}}");
    assert_eq!(full["return"]["model"]["name"], "host");
    assert_eq!(full["return"]["model"]["props"]["fpu"], true);
    // What libvirt asks for hyper-v: a property the model lacks is QEMU's error.
    let hv =
        expand(&mut s, &mut m, "{\"type\":\"full\",\"model\":{\"name\":\"host\",\"props\":{\"hv-passthrough\":true}}}");
    assert_eq!(hv["error"]["desc"], "Property 'host-x86_64-cpu.hv-passthrough' not found");
    let unknown = expand(&mut s, &mut m, "{\"type\":\"static\",\"model\":{\"name\":\"Skylake\"}}");
    assert!(unknown["error"]["desc"].as_str().unwrap().contains("Skylake"), "{unknown}");
    let bad_type = expand(&mut s, &mut m, "{\"type\":\"baseline\",\"model\":{\"name\":\"host\"}}");
    assert_eq!(bad_type["error"]["desc"], "Parameter 'type' does not accept value 'baseline'");
    let bad_props = expand(&mut s, &mut m, "{\"type\":\"full\",\"model\":{\"name\":\"host\",\"props\":1}}");
    assert_eq!(bad_props["error"]["class"], "GenericError");
}

#[test]
fn command_line_options_list_and_filter() {
    let (mut s, mut m) = negotiated();
    assert_eq!(
        ret(&mut s, &mut m, "query-command-line-options"),
        serde_json::json!([{"parameters": [{"name": "enable", "type": "boolean"}], "option": "sandbox"}])
    );
    let one =
        ask_json(&mut s, &mut m, "{\"execute\":\"query-command-line-options\",\"arguments\":{\"option\":\"sandbox\"}}");
    assert_eq!(one["return"][0]["option"], "sandbox");
    let missing =
        ask_json(&mut s, &mut m, "{\"execute\":\"query-command-line-options\",\"arguments\":{\"option\":\"vnc\"}}");
    assert_eq!(missing["error"]["desc"], "Parameter 'option' expects an option name");
}

/// `balloon` and `query-balloon` as QEMU 7.2 answers them: without a balloon, `DeviceNotActive` (checked before
/// the target); a target that is not positive names `target`; BALLOON_CHANGE carries `actual` on the wire.
#[test]
fn balloon_commands_and_event() {
    let (mut s, mut m) = negotiated();
    let no_balloon =
        "{\"error\": {\"class\": \"DeviceNotActive\", \"desc\": \"No balloon device has been activated\"}}\r\n";
    assert_eq!(ask(&mut s, &mut m, "{\"execute\":\"query-balloon\"}"), no_balloon);
    assert_eq!(ask(&mut s, &mut m, "{\"execute\":\"balloon\",\"arguments\":{\"value\":0}}"), no_balloon);
    m.balloon = Some((1 << 30, 1 << 30));
    assert_eq!(ask(&mut s, &mut m, "{\"execute\":\"query-balloon\"}"), "{\"return\": {\"actual\": 1073741824}}\r\n");
    for value in ["0", "-1"] {
        assert_eq!(
            ask(&mut s, &mut m, &format!("{{\"execute\":\"balloon\",\"arguments\":{{\"value\":{value}}}}}")),
            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"Parameter 'target' expects a size\"}}\r\n"
        );
    }
    assert_eq!(m.balloon, Some((1 << 30, 1 << 30)));
    assert_eq!(ask(&mut s, &mut m, "{\"execute\":\"balloon\",\"arguments\":{\"value\":4096}}"), "{\"return\": {}}\r\n");
    assert_eq!(m.balloon, Some((4096, 1 << 30)));
    let ev = Event {
        kind: EventKind::BalloonChange { actual: 805306368 },
        timestamp: Timestamp { seconds: 1, microseconds: 2 },
    };
    assert_eq!(
        text(s.event_bytes(&ev).unwrap()),
        "{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"BALLOON_CHANGE\", \"data\": {\"actual\": 805306368}}\r\n"
    );
    // qom-set: the object and the property must exist; a read-only property is QEMU's permission error.
    assert_eq!(
        ask(
            &mut s,
            &mut m,
            "{\"execute\":\"qom-set\",\"arguments\":{\"path\":\"/nope\",\"property\":\"x\",\"value\":1}}"
        ),
        "{\"error\": {\"class\": \"DeviceNotFound\", \"desc\": \"Device '/nope' not found\"}}\r\n"
    );
    assert_eq!(
        ask(
            &mut s,
            &mut m,
            "{\"execute\":\"qom-set\",\"arguments\":{\"path\":\"/machine\",\"property\":\"x\",\"value\":1}}"
        ),
        "{\"error\": {\"class\": \"GenericError\", \"desc\": \"Property 'pc-i440fx-7.2-machine.x' not found\"}}\r\n"
    );
    assert_eq!(
        ask(&mut s, &mut m, "{\"execute\":\"qom-set\",\"arguments\":{\"path\":\"/machine\",\"property\":\"type\",\"value\":1}}"),
        "{\"error\": {\"class\": \"GenericError\", \"desc\": \"Insufficient permission to perform this operation\"}}\r\n"
    );
}

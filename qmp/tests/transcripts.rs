//! Replays sessions recorded from real QEMU 7.2 (tests/qmp_transcripts, made by record.py there) against a
//! `Session` with a fake machine and compares the bytes.
//!
//! What is normalised, and why (everything else must be byte-identical, line by line):
//! * the greeting's `"capabilities": ["oob"]` becomes `[]`: QEMU offers out-of-band execution, Kestrel does not;
//! * event timestamps (`"seconds"`/`"microseconds"` values) become 0: they are wall-clock times;
//! * the fake machine is configured with the recorded run's *data* where it is not protocol: the version numbers
//!   and package string from the greeting, the vCPU thread id from `query-cpus-fast`, and the property list of
//!   `/machine` from `qom-list` (QEMU's machine object has dozens of properties Kestrel's will not have).
//!
//! Events that QEMU sent after a reply (the guest's own RESET after `system_reset`) are fed to the session as
//! asynchronous events through `event_bytes`, which must print them identically.

use std::path::PathBuf;

use qmp::testing::FakeMachine;
use qmp::{Event, EventKind, QomProperty, ServerInfo, Session, ShutdownCause, Timestamp};
use serde_json::Value;

enum Step {
    Send(Vec<u8>),
    Recv(String),
}

fn load(name: &str) -> Vec<Step> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/qmp_transcripts").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .map(|l| match l.split_at(1) {
            (">", rest) => {
                let s: String = serde_json::from_str(rest).expect("send line is a JSON string");
                // Bytes were stored as latin-1 code points.
                Step::Send(s.chars().map(|c| c as u32 as u8).collect())
            }
            ("<", rest) => Step::Recv(rest.to_string()),
            _ => panic!("bad transcript line {l:?}"),
        })
        .collect()
}

/// Replaces the digits after `key` with 0 everywhere.
fn zero_after(s: &str, key: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find(key) {
        out.push_str(&rest[..i + key.len()]);
        rest = rest[i + key.len()..].trim_start_matches(|c: char| c.is_ascii_digit());
        out.push('0');
    }
    out + rest
}

fn normalise(line: &str) -> String {
    let l = line.replace("\"capabilities\": [\"oob\"]", "\"capabilities\": []");
    zero_after(&zero_after(&l, "\"seconds\": "), "\"microseconds\": ")
}

fn event_from_line(line: &str) -> Event {
    let v: Value = serde_json::from_str(line).unwrap();
    let data = &v["data"];
    let reason = || ShutdownCause::from_name(data["reason"].as_str().unwrap()).unwrap();
    let guest = data["guest"].as_bool().unwrap_or(false);
    let kind = match v["event"].as_str().unwrap() {
        "STOP" => EventKind::Stop,
        "RESUME" => EventKind::Resume,
        "POWERDOWN" => EventKind::Powerdown,
        "RESET" => EventKind::Reset { guest, reason: reason() },
        "SHUTDOWN" => EventKind::Shutdown { guest, reason: reason() },
        e => panic!("unexpected event {e}"),
    };
    Event { kind, timestamp: Timestamp::default() }
}

fn configure(steps: &[Step]) -> (ServerInfo, FakeMachine) {
    let Step::Recv(greeting) = &steps[0] else { panic!("transcript must start with the greeting") };
    let g: Value = serde_json::from_str(greeting).unwrap();
    let v = &g["QMP"]["version"];
    let info = ServerInfo {
        major: v["qemu"]["major"].as_u64().unwrap(),
        minor: v["qemu"]["minor"].as_u64().unwrap(),
        micro: v["qemu"]["micro"].as_u64().unwrap(),
        package: v["package"].as_str().unwrap().to_string(),
    };
    let mut m = FakeMachine::default();
    let mut last_send = Vec::new();
    for s in steps {
        match s {
            Step::Send(b) => last_send = b.clone(),
            Step::Recv(l) => {
                let r: Value = serde_json::from_str(l).unwrap();
                let sent = String::from_utf8_lossy(&last_send);
                if sent.contains("query-cpus-fast") && r["return"].is_array() {
                    m.cpus[0].thread_id = r["return"][0]["thread-id"].as_i64().unwrap();
                }
                if sent.contains("\"qom-list\"") && sent.contains("\"/machine\"") && r["return"].is_array() {
                    let obj = &mut m.qom.iter_mut().find(|(p, _)| p == "/machine").unwrap().1;
                    obj.properties = r["return"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|p| QomProperty {
                            name: p["name"].as_str().unwrap().into(),
                            type_name: p["type"].as_str().unwrap().into(),
                            value: (p["name"] == "type").then(|| Value::from(obj.type_name.clone())),
                        })
                        .collect();
                }
            }
        }
    }
    (info, m)
}

fn replay(name: &str) {
    let steps = load(name);
    let (info, mut m) = configure(&steps);
    let (mut session, greeting) = Session::new(info);
    let Step::Recv(want) = &steps[0] else { unreachable!() };
    assert_eq!(String::from_utf8(greeting).unwrap(), format!("{}\r\n", normalise(want)), "{name}: greeting");
    let mut i = 1;
    while i < steps.len() {
        let Step::Send(bytes) = &steps[i] else { panic!("{name}: unexpected output at step {i}") };
        i += 1;
        let mut expected = Vec::new();
        while let Some(Step::Recv(l)) = steps.get(i) {
            expected.push(l.as_str());
            i += 1;
        }
        let out = String::from_utf8(session.feed(bytes, &mut m)).expect("ASCII");
        assert!(out.is_empty() || out.ends_with("\r\n"), "{name}: output must end in CRLF");
        let ours: Vec<String> = out.split_terminator("\r\n").map(normalise).collect();
        let sent = String::from_utf8_lossy(bytes);
        assert!(
            ours.len() <= expected.len(),
            "{name}: after sending {sent:?} we wrote more: {ours:#?} vs {expected:#?}"
        );
        for (k, want) in expected.iter().enumerate() {
            let got = match ours.get(k) {
                Some(l) => l.clone(),
                None => {
                    // QEMU wrote more than our reply: it can only be an asynchronous event.
                    let bytes = session.event_bytes(&event_from_line(want)).expect("negotiated");
                    normalise(String::from_utf8(bytes).unwrap().trim_end_matches("\r\n"))
                }
            };
            assert_eq!(got, normalise(want), "{name}: line {k} of the answer to {sent:?}");
        }
    }
}

#[test]
fn greeting_and_queries() {
    replay("greeting_and_queries.txt");
}

#[test]
fn negotiation() {
    replay("negotiation.txt");
}

#[test]
fn id_echo() {
    replay("id_echo.txt");
}

#[test]
fn parse_errors() {
    replay("parse_errors.txt");
}

#[test]
fn arguments() {
    replay("arguments.txt");
}

#[test]
fn lifecycle() {
    replay("lifecycle.txt");
}

//! One QMP connection's protocol state: greeting, capabilities negotiation, request checking, dispatch.

use serde_json::{json, Map, Value};

use crate::commands::{self, Ctx};
use crate::fds::PassedFds;
use crate::json::{to_qemu_json, JsonStream, Limits, Message};
use crate::machine::{ErrorClass, Event, Machine, QmpError};
use crate::schema::{check_arguments, Type};

/// What the greeting and `query-version` report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerInfo {
    /// The QEMU version Kestrel claims to be compatible with.
    pub major: u64,
    pub minor: u64,
    pub micro: u64,
    /// Free text; QEMU puts its distribution package version here.
    pub package: String,
}

impl ServerInfo {
    /// QEMU 7.2.0, package `kestrel <crate version>`. 7.2 because every byte shape here was measured against QEMU
    /// 7.2, and it clears every client's floor: libvirt 9.0 requires >= 4.2.0, Kata's govmm refuses major < 5.
    pub fn kestrel() -> Self {
        ServerInfo { major: 7, minor: 2, micro: 0, package: format!("kestrel {}", env!("CARGO_PKG_VERSION")) }
    }

    /// `{"qemu": {"major", "minor", "micro"}, "package"}` (the greeting's `version` and `query-version`'s return).
    pub(crate) fn version_value(&self) -> Value {
        json!({"qemu": {"major": self.major, "minor": self.minor, "micro": self.micro}, "package": self.package})
    }
}

/// Per-connection QMP state. Create one per accepted connection; it never touches the socket itself.
///
/// Driving it (see the crate documentation for the full contract):
/// 1. `Session::new` → write the greeting bytes.
/// 2. For every chunk read from the socket, `feed` → write all returned bytes, in order.
/// 3. For every event raised outside this session's commands, `event_bytes` → write them if `Some`.
#[derive(Debug)]
pub struct Session {
    stream: JsonStream,
    info: ServerInfo,
    negotiated: bool,
    fds: PassedFds,
}

impl Session {
    /// A session with QEMU's input limits. Returns it with the greeting to send first.
    pub fn new(info: ServerInfo) -> (Session, Vec<u8>) {
        Self::with_limits(info, Limits::default())
    }

    pub fn with_limits(info: ServerInfo, limits: Limits) -> (Session, Vec<u8>) {
        // Kestrel advertises no capability: it does not implement out-of-band execution.
        let greeting = json!({"QMP": {"version": info.version_value(), "capabilities": []}});
        let session = Session { stream: JsonStream::new(limits), info, negotiated: false, fds: PassedFds::default() };
        (session, line(&greeting))
    }

    /// Whether `qmp_capabilities` has succeeded (events are delivered only then).
    pub fn is_negotiated(&self) -> bool {
        self.negotiated
    }

    /// Keeps descriptors that arrived over the socket (SCM_RIGHTS) with the bytes about to be fed, for `getfd`.
    pub fn receive_fds(&mut self, fds: impl IntoIterator<Item = std::os::fd::OwnedFd>) {
        self.fds.receive(fds);
    }

    /// Consumes bytes read from the client (any split, any number of requests) and returns the bytes to write back:
    /// for each completed request, in input order, the events its command raised and then its reply, each one
    /// line ending in `\r\n`. Returns an empty vector while a request is incomplete.
    pub fn feed(&mut self, input: &[u8], machine: &mut dyn Machine) -> Vec<u8> {
        let mut messages = Vec::new();
        self.stream.feed(input, &mut messages);
        let mut out = Vec::new();
        for msg in messages {
            let mut events = Vec::new();
            let reply = match msg {
                Message::Error(desc) => error_reply(&QmpError::generic(desc)),
                Message::Value(v) => self.dispatch(v, machine, &mut events),
            };
            for e in &events {
                out.extend(encode_event(e));
            }
            out.extend(line(&reply));
        }
        out
    }

    /// The bytes that deliver an event raised outside this session's own commands (by the guest, a signal, or a
    /// command on another connection), or `None` while the session is still in negotiation mode, where QEMU sends
    /// no events.
    pub fn event_bytes(&self, event: &Event) -> Option<Vec<u8>> {
        self.negotiated.then(|| encode_event(event))
    }

    fn dispatch(&mut self, request: Value, machine: &mut dyn Machine, events: &mut Vec<Event>) -> Value {
        let Value::Object(req) = request else {
            return error_reply(&QmpError::generic("QMP input must be a JSON object"));
        };
        let id = req.get("id").cloned();
        let result = self.execute(&req, machine, events);
        let mut reply = match result {
            Ok(ret) => {
                let mut m = Map::new();
                m.insert("return".into(), ret);
                Value::Object(m)
            }
            Err(mut e) => {
                if !self.negotiated && e.class == ErrorClass::CommandNotFound {
                    e.desc = "Expecting capabilities negotiation with 'qmp_capabilities'".into();
                }
                error_reply(&e)
            }
        };
        if let Some(id) = id {
            reply["id"] = id;
        }
        reply
    }

    fn execute(
        &mut self,
        req: &Map<String, Value>,
        machine: &mut dyn Machine,
        events: &mut Vec<Event>,
    ) -> Result<Value, QmpError> {
        // Members are checked in the order QEMU iterates them, so the first complaint is the same.
        for (key, value) in crate::json::qdict_order(req) {
            match key.as_str() {
                "execute" if !value.is_string() => {
                    return Err(QmpError::generic("QMP input member 'execute' must be a string"))
                }
                "arguments" if !value.is_object() => {
                    return Err(QmpError::generic("QMP input member 'arguments' must be an object"))
                }
                "execute" | "arguments" | "id" => {}
                // `exec-oob` is allowed only once "oob" is enabled, which Kestrel never offers.
                _ => return Err(QmpError::generic(format!("QMP input member '{key}' is unexpected"))),
            }
        }
        let Some(Value::String(name)) = req.get("execute") else {
            return Err(QmpError::generic("QMP input lacks member 'execute'"));
        };
        // Before negotiation only qmp_capabilities exists.
        let cmd =
            commands::find(name).filter(|c| self.negotiated || c.name == "qmp_capabilities").ok_or_else(|| {
                QmpError::new(ErrorClass::CommandNotFound, format!("The command {name} has not been found"))
            })?;
        let empty = Map::new();
        let args = req.get("arguments").and_then(Value::as_object).unwrap_or(&empty);
        if let Type::Object(ty) = cmd.args {
            check_arguments(args, ty).map_err(QmpError::generic)?;
        }
        let mut ctx = Ctx { machine, events, info: &self.info, negotiated: &mut self.negotiated, fds: &mut self.fds };
        (cmd.handler)(args, &mut ctx)
    }
}

/// `{"error": {...}}`; the caller adds `id` when the request had one.
fn error_reply(e: &QmpError) -> Value {
    json!({"error": {"class": e.class.as_str(), "desc": e.desc}})
}

fn line(v: &Value) -> Vec<u8> {
    let mut s = to_qemu_json(v);
    s.push_str("\r\n");
    s.into_bytes()
}

/// An event as one output line: `{"timestamp": {...}, "event": NAME, "data": {...}}` in QEMU's key order; events
/// without data have no `data` member.
pub fn encode_event(e: &Event) -> Vec<u8> {
    let mut m = Map::new();
    m.insert("event".into(), json!(e.kind.name()));
    m.insert("timestamp".into(), json!({"seconds": e.timestamp.seconds, "microseconds": e.timestamp.microseconds}));
    if let Some(data) = commands::event_data(&e.kind) {
        m.insert("data".into(), data);
    }
    line(&Value::Object(m))
}

//! A QMP client for the sockets of a kestrel under test: writes raw bytes, reads `\r\n`-terminated JSON lines.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use super::probe_vm::TIMEOUT;

pub struct QmpClient {
    pub writer: UnixStream,
    pub reader: BufReader<UnixStream>,
}

impl QmpClient {
    /// Connects; every read then waits at most [`TIMEOUT`]. No retry: kestrel's socket files appear only once
    /// they listen (vmm/src/listen.rs), so a refusal here is a failure.
    #[track_caller]
    pub fn connect(path: &Path) -> QmpClient {
        let stream = UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("connecting to the QMP socket {}: {e}", path.display()));
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        QmpClient { writer: stream.try_clone().unwrap(), reader: BufReader::new(stream) }
    }

    /// Connects, checks the greeting and negotiates.
    #[track_caller]
    pub fn negotiated(path: &Path) -> QmpClient {
        QmpClient::negotiated_within(path, TIMEOUT)
    }

    /// [`negotiated`](Self::negotiated), each read waiting at most `bound`.
    #[track_caller]
    pub fn negotiated_within(path: &Path, bound: Duration) -> QmpClient {
        let mut client = QmpClient::connect(path);
        client.set_read_timeout(bound);
        let greeting = client.line();
        assert_eq!(greeting["QMP"]["version"]["qemu"]["major"], 7, "{greeting}");
        assert_eq!(greeting["QMP"]["capabilities"], serde_json::json!([]), "{greeting}");
        client.send(r#"{"execute": "qmp_capabilities"}"#);
        assert_eq!(client.line(), serde_json::json!({"return": {}}));
        client
    }

    pub fn set_read_timeout(&self, bound: Duration) {
        self.reader.get_ref().set_read_timeout(Some(bound)).unwrap();
    }

    pub fn send(&mut self, bytes: &str) {
        self.writer.write_all(bytes.as_bytes()).unwrap();
    }

    /// The next line as JSON, or why there is none: the connection closed, the read timed out, or the line is not
    /// a whole JSON line.
    pub fn try_line(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("the QMP connection closed".into()),
            Ok(_) if !line.ends_with("\r\n") => Err(format!("QMP lines end in CRLF: {line:?}")),
            Ok(_) => serde_json::from_str(&line).map_err(|e| format!("not JSON ({e}): {line:?}")),
            Err(e) => Err(format!("no answer: {e}")),
        }
    }

    #[track_caller]
    pub fn line(&mut self) -> Value {
        self.try_line().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Sends a command and returns its reply, collecting the events that came before it.
    #[track_caller]
    pub fn execute(&mut self, command: &str) -> (Vec<Value>, Value) {
        self.send(command);
        let mut events = Vec::new();
        loop {
            let line = self.line();
            if line.get("event").is_some() {
                events.push(line);
            } else {
                return (events, line);
            }
        }
    }

    /// The run state `query-status` reports.
    #[track_caller]
    pub fn status(&mut self) -> String {
        let (_, reply) = self.execute(r#"{"execute": "query-status"}"#);
        reply["return"]["status"].as_str().unwrap_or_else(|| panic!("{reply}")).to_string()
    }

    /// Everything until Kestrel closes the connection, split into lines; each must be complete.
    #[track_caller]
    pub fn lines_until_closed(mut self) -> Vec<Value> {
        let mut all = Vec::new();
        self.reader.read_to_end(&mut all).expect("reading the QMP socket to its end");
        let text = String::from_utf8(all).expect("QMP output is UTF-8");
        assert!(text.is_empty() || text.ends_with("\r\n"), "the last line was cut: ...{:?}", tail(&text));
        text.split_terminator("\r\n")
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): ...{:?}", tail(line))))
            .collect()
    }
}

fn tail(text: &str) -> &str {
    let start = text.len().saturating_sub(200);
    text.get(start..).unwrap_or(text)
}

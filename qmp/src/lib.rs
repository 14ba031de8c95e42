//! The QEMU Machine Protocol as Kestrel speaks it: byte-compatible with QEMU 7.2 on every command it implements.
//!
//! Pure: no sockets, threads or clocks. The VMM owns the sockets and the clock and implements [`Machine`].
//!
//! # How the VMM drives it
//!
//! * On accept: `let (mut session, greeting) = Session::new(ServerInfo::kestrel());` and write `greeting`.
//!   One session per connection; a new connection gets a new session (fresh negotiation), as QEMU does.
//! * On readable: read whatever is there and write back `session.feed(&bytes, &mut machine)` in full, in order.
//!   The input is a JSON stream: requests may arrive split at any byte or several per read, with or without
//!   newlines. For each completed request the output holds the events its command raised (pushed by the
//!   [`Machine`] method into its `events` vector), then the reply; each object is one line ending in `\r\n`.
//! * Events not raised by this session's own command (guest reset/shutdown, SIGTERM's `SHUTDOWN host-signal`, a
//!   `stop` issued on another monitor): for every session, write `session.event_bytes(&event)` if it is `Some`
//!   (it is `None` while that session is still negotiating). Events raised by a command on session A are written
//!   to A by `feed`, and must be passed to every other session through `event_bytes` by the VMM.
//! * After `quit` (the `Machine::quit` call), write the bytes `feed` returned, then close and exit.
//! * Hostile input never panics and never wedges the session: errors are answered and the stream resynchronises.
//!   Memory per session is bounded by [`Limits`] (QEMU's limits by default).
//!
//! ```
//! use qmp::{ServerInfo, Session};
//! let mut machine = qmp::testing::FakeMachine::default(); // the VMM passes its own `impl Machine`
//! let (mut session, greeting) = Session::new(ServerInfo::kestrel());
//! assert!(greeting.starts_with(b"{\"QMP\": {\"version\": "));
//! // Split anywhere, no terminator needed, several per read:
//! assert_eq!(session.feed(b"{\"execute\":\"qmp_capa", &mut machine), b"");
//! let out = session.feed(b"bilities\"}{\"execute\":\"cont\",\"id\":1}", &mut machine);
//! let text = String::from_utf8(out).unwrap();
//! let lines: Vec<&str> = text.split_terminator("\r\n").collect();
//! assert_eq!(lines[0], "{\"return\": {}}");
//! assert!(lines[1].ends_with("\"event\": \"RESUME\"}")); // the event cont raised, before its reply
//! assert_eq!(lines[2], "{\"return\": {}, \"id\": 1}");
//! ```

pub mod commands;
pub mod fds;
pub mod json;
pub mod machine;
pub mod schema;
pub mod session;

pub use fds::{MigrationChannel, PassedFds};
pub use json::{to_qemu_json, Limits};
pub use machine::{
    BlockBacking, BlockDevice, BlockDeviceStats, ChardevInfo, CommandLineOption, CommandLineParameter, CpuDefinition,
    CpuInfo, CpuModel, CpuModelExpansionType, CpuProps, ErrorClass, Event, EventKind, Machine, MachineInfo,
    MigrationCapabilities, MigrationCapability, MigrationInfo, MigrationRam, MigrationStatus, PciDevice, PciRegion,
    QmpError, QomObject, QomProperty, QomType, RunState, ShutdownCause, Target, Timestamp, TypeProperty,
};
pub use session::{encode_event, ServerInfo, Session};

#[doc(hidden)]
pub mod testing;

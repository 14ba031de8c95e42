//! A fake [`Machine`] and the fuzz body, shared by the unit tests, the transcript replay and the fuzz target.
//! Not part of the API the VMM uses.

use serde_json::{json, Value};

use crate::machine::*;
use crate::session::{ServerInfo, Session};

/// A VM that only keeps the state QMP can observe. Defaults mirror the QEMU 7.2 run the transcripts were recorded
/// from (`-S -nodefaults -accel tcg`, one `qemu64` vCPU, 128 MiB).
#[derive(Clone, Debug)]
pub struct FakeMachine {
    pub state: RunState,
    pub clock: Timestamp,
    pub cpus: Vec<CpuInfo>,
    pub name: Option<String>,
    pub uuid: [u8; 16],
    pub kvm: (bool, bool),
    pub quit_requested: bool,
    /// QOM objects by absolute path.
    pub qom: Vec<(String, QomObject)>,
    /// Disks for `query-block`/`query-blockstats` (none, as in the `-nodefaults` recording).
    pub disks: Vec<BlockDevice>,
    /// PCI functions for `query-pci`.
    pub pci: Vec<PciDevice>,
    /// The last `migrate` (for `query-migrate`): a `file:` URI "completes" at once, writing nothing.
    pub migration: Option<crate::machine::MigrationInfo>,
    pub migration_capabilities: MigrationCapabilities,
    /// Started with `-incoming defer` and not restored yet.
    pub awaiting_incoming: bool,
    /// QOM types (`qom-list-types`) and the properties of those that have some.
    pub types: Vec<QomType>,
    pub type_properties: Vec<(String, Vec<TypeProperty>)>,
    /// The features of the one CPU model, `host`, with whether this "host" has each.
    pub cpu_features: Vec<(String, bool)>,
    /// A balloon: the target last set (`balloon`) and what the guest has (`query-balloon`), in bytes.
    pub balloon: Option<(u64, u64)>,
}

fn qom_type(name: &str, parent: Option<&str>, is_abstract: bool) -> QomType {
    QomType { name: name.into(), parent: parent.map(Into::into), is_abstract }
}

fn prop(name: &str, type_name: &str, value: Value) -> QomProperty {
    QomProperty { name: name.into(), type_name: type_name.into(), value: Some(value) }
}

impl Default for FakeMachine {
    fn default() -> Self {
        let cpu_path = "/machine/unattached/device[0]";
        FakeMachine {
            state: RunState::Prelaunch,
            clock: Timestamp { seconds: 1_700_000_000, microseconds: 0 },
            cpus: vec![CpuInfo {
                cpu_index: 0,
                qom_path: cpu_path.into(),
                thread_id: 4242,
                props: CpuProps { socket_id: Some(0), core_id: Some(0), thread_id: Some(0), ..Default::default() },
                type_name: "qemu64-x86_64-cpu".into(),
            }],
            name: None,
            uuid: [0; 16],
            kvm: (false, true),
            quit_requested: false,
            disks: Vec::new(),
            pci: Vec::new(),
            migration: None,
            migration_capabilities: MigrationCapabilities::default(),
            awaiting_incoming: false,
            types: vec![
                qom_type("object", None, true),
                qom_type("device", Some("object"), true),
                qom_type("virtio-pci", Some("device"), true),
                qom_type("virtio-rng-pci", Some("virtio-pci"), false),
                qom_type("rng-backend", Some("object"), true),
                qom_type("rng-random", Some("rng-backend"), false),
            ],
            type_properties: vec![(
                "virtio-rng-pci".into(),
                vec![TypeProperty {
                    name: "rng".into(),
                    type_name: "link<rng-backend>".into(),
                    description: None,
                    default_value: None,
                }],
            )],
            cpu_features: vec![("fpu".into(), true), ("vmx".into(), false)],
            balloon: None,
            qom: vec![
                (
                    "/".into(),
                    QomObject {
                        type_name: "container".into(),
                        properties: vec![
                            prop("type", "string", json!("container")),
                            prop("objects", "child<container>", json!("/objects")),
                            prop("machine", "child<pc-i440fx-7.2-machine>", json!("/machine")),
                            prop("chardevs", "child<container>", json!("/chardevs")),
                        ],
                    },
                ),
                (
                    "/machine".into(),
                    QomObject {
                        type_name: "pc-i440fx-7.2-machine".into(),
                        properties: vec![prop("type", "string", json!("pc-i440fx-7.2-machine"))],
                    },
                ),
                (
                    cpu_path.into(),
                    QomObject {
                        type_name: "qemu64-x86_64-cpu".into(),
                        properties: vec![prop("type", "string", json!("qemu64-x86_64-cpu"))],
                    },
                ),
            ],
        }
    }
}

impl FakeMachine {
    /// Each event is one microsecond after the previous one.
    fn event(&mut self, kind: EventKind) -> Event {
        self.clock.microseconds += 1;
        Event { kind, timestamp: self.clock }
    }
}

impl Machine for FakeMachine {
    fn run_state(&self) -> RunState {
        self.state
    }

    fn stop(&mut self, events: &mut Vec<Event>) -> Result<(), QmpError> {
        if self.state == RunState::Running {
            self.state = RunState::Paused;
            events.push(self.event(EventKind::Stop));
        }
        Ok(())
    }

    fn cont(&mut self, events: &mut Vec<Event>) -> Result<(), QmpError> {
        if self.state != RunState::Running {
            self.state = RunState::Running;
            events.push(self.event(EventKind::Resume));
        }
        Ok(())
    }

    fn system_reset(&mut self, events: &mut Vec<Event>) -> Result<(), QmpError> {
        events.push(self.event(EventKind::reset(ShutdownCause::HostQmpSystemReset)));
        Ok(())
    }

    fn system_powerdown(&mut self, events: &mut Vec<Event>) -> Result<(), QmpError> {
        events.push(self.event(EventKind::Powerdown));
        Ok(())
    }

    fn quit(&mut self, events: &mut Vec<Event>) -> Result<(), QmpError> {
        self.quit_requested = true;
        events.push(self.event(EventKind::shutdown(ShutdownCause::HostQmpQuit)));
        Ok(())
    }

    fn cpus(&self) -> Vec<CpuInfo> {
        self.cpus.clone()
    }

    fn name(&self) -> Option<String> {
        self.name.clone()
    }

    fn uuid(&self) -> [u8; 16] {
        self.uuid
    }

    fn memory_size(&self) -> u64 {
        128 << 20
    }

    fn plugged_memory(&self) -> Option<u64> {
        Some(0)
    }

    fn chardevs(&self) -> Vec<ChardevInfo> {
        vec![ChardevInfo {
            label: "compat_monitor0".into(),
            filename: "unix:/tmp/kestrel-qmp-record.sock,server=on".into(),
            frontend_open: true,
        }]
    }

    fn target(&self) -> Target {
        Target::X86_64
    }

    fn kvm(&self) -> (bool, bool) {
        self.kvm
    }

    fn machines(&self) -> Vec<MachineInfo> {
        vec![MachineInfo {
            name: "pc-i440fx-7.2".into(),
            alias: Some("pc".into()),
            is_default: true,
            cpu_max: 255,
            hotpluggable_cpus: true,
            numa_mem_supported: false,
            deprecated: false,
            default_cpu_type: Some("qemu64-x86_64-cpu".into()),
            default_ram_id: Some("pc.ram".into()),
        }]
    }

    fn qom_object(&self, path: &str) -> Option<QomObject> {
        self.qom.iter().find(|(p, _)| p == path).map(|(_, o)| o.clone())
    }

    fn block_devices(&self) -> Vec<BlockDevice> {
        self.disks.clone()
    }

    /// A save "completes" at once, writing nothing (a passed descriptor is closed).
    fn migrate(&mut self, _channel: crate::MigrationChannel, _events: &mut Vec<Event>) -> Result<(), QmpError> {
        self.migration = Some(crate::machine::MigrationInfo {
            status: crate::machine::MigrationStatus::Completed,
            incoming: false,
            total_time_ms: 1,
            downtime_ms: Some(1),
            setup_time_ms: 0,
            ram: Some(crate::machine::MigrationRam::default()),
            error: None,
        });
        Ok(())
    }

    /// A restore "completes" at once, reading nothing, on a machine waiting for one.
    fn migrate_incoming(
        &mut self,
        _channel: crate::MigrationChannel,
        _events: &mut Vec<Event>,
    ) -> Result<(), QmpError> {
        if !std::mem::take(&mut self.awaiting_incoming) {
            return Err(QmpError::generic("'-incoming' was not specified on the command line"));
        }
        self.state = RunState::Paused;
        self.migration = Some(crate::machine::MigrationInfo {
            status: crate::machine::MigrationStatus::Completed,
            incoming: true,
            total_time_ms: 1,
            downtime_ms: None,
            setup_time_ms: 0,
            ram: None,
            error: None,
        });
        Ok(())
    }

    fn migration(&self) -> Option<crate::machine::MigrationInfo> {
        self.migration.clone()
    }

    fn migration_capabilities(&self) -> MigrationCapabilities {
        self.migration_capabilities
    }

    fn set_migration_capabilities(&mut self, capabilities: MigrationCapabilities) -> Result<(), QmpError> {
        self.migration_capabilities = capabilities;
        Ok(())
    }

    fn balloon(&mut self, target: u64) -> Result<(), QmpError> {
        let (set, _) = self.balloon.as_mut().ok_or_else(QmpError::no_balloon)?;
        *set = target;
        Ok(())
    }

    fn balloon_actual(&self) -> Result<u64, QmpError> {
        self.balloon.map(|(_, actual)| actual).ok_or_else(QmpError::no_balloon)
    }

    /// Writes `int` properties; the others are read-only.
    fn qom_set(&mut self, path: &str, property: &str, value: &serde_json::Value) -> Result<(), QmpError> {
        let object = self.qom.iter_mut().find(|(p, _)| p == path).map(|(_, o)| o);
        let slot = object.and_then(|o| o.properties.iter_mut().find(|p| p.name == property && p.type_name == "int"));
        let slot = slot.ok_or_else(QmpError::permission_denied)?;
        slot.value = Some(value.clone());
        Ok(())
    }

    fn pci_devices(&self) -> Vec<PciDevice> {
        self.pci.clone()
    }

    fn qom_types(&self) -> Vec<QomType> {
        self.types.clone()
    }

    fn type_properties(&self, type_name: &str) -> Option<Vec<TypeProperty>> {
        let known = self.types.iter().any(|t| t.name == type_name);
        known.then(|| {
            let found = self.type_properties.iter().find(|(name, _)| name == type_name);
            found.map(|(_, properties)| properties.clone()).unwrap_or_default()
        })
    }

    fn cpu_definitions(&self) -> Vec<CpuDefinition> {
        vec![CpuDefinition {
            name: "host".into(),
            type_name: "host-x86_64-cpu".into(),
            is_static: false,
            migration_safe: false,
            unavailable_features: Vec::new(),
            deprecated: false,
        }]
    }

    /// `host` only; `migratable` is its one property besides the features.
    fn expand_cpu_model(&self, expansion: CpuModelExpansionType, model: &CpuModel) -> Result<CpuModel, QmpError> {
        if model.name != "host" {
            return Err(QmpError::generic(format!("The CPU type '{}' is not a recognized CPU type", model.name)));
        }
        let mut props: serde_json::Map<String, Value> =
            self.cpu_features.iter().map(|(name, has)| (name.clone(), json!(has))).collect();
        for (name, value) in &model.props {
            if name != "migratable" && !props.contains_key(name) {
                return Err(QmpError::property_not_found("host-x86_64-cpu", name));
            }
            if name != "migratable" {
                props.insert(name.clone(), value.clone());
            }
        }
        let name = match expansion {
            CpuModelExpansionType::Static => "base",
            CpuModelExpansionType::Full => "host",
        };
        Ok(CpuModel { name: name.into(), props })
    }

    fn command_line_options(&self) -> Vec<CommandLineOption> {
        vec![CommandLineOption {
            option: "sandbox".into(),
            parameters: vec![CommandLineParameter { name: "enable".into(), type_name: "boolean" }],
        }]
    }
}

/// A tiny deterministic generator (xorshift64*), so the smoke corpus is the same on every run and every target.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// The fuzz body: the first byte seeds where the rest is split into feeds. Checks the invariants every input must
/// keep: no panic, every output line is one JSON object ending in `\r\n` and printable ASCII, and afterwards the
/// session still answers a well-formed request (after a newline and closers that end any pending value).
pub fn fuzz_one(data: &[u8]) {
    let (seed, input) = match data.split_first() {
        Some((s, rest)) => (*s as u64, rest),
        None => (0, data),
    };
    let mut m = FakeMachine::default();
    let limits = crate::Limits { max_bytes: 1 << 16, max_tokens: 1 << 12, max_nesting: 64 };
    let (mut s, _) = Session::with_limits(ServerInfo::kestrel(), limits);
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut out = Vec::new();
    let mut rest = input;
    while !rest.is_empty() {
        let n = (rng.next_u64() as usize % (rest.len() + 1)).max(1);
        out.extend(s.feed(&rest[..n], &mut m));
        rest = &rest[n..];
    }
    check_output(&out);
    // Nothing may leave the session unable to answer. "\n@\n" always gets back to a clean state: the first
    // newline ends any string (as an error) or token, `@` is a lexical error in the start state (which drops any
    // pending value) or is skipped while recovering, and the last newline ends recovery.
    let tail = b"\n@\n{\"execute\":\"query-status\",\"id\":\"fuzz-probe\"}";
    let out = s.feed(tail, &mut m);
    check_output(&out);
    let text = String::from_utf8(out).expect("ASCII output");
    // The probe's answer (a reply, or CommandNotFound if the input never negotiated) is the last line.
    let last = text.trim_end().rsplit("\r\n").next().unwrap_or_default();
    assert!(last.contains("\"id\": \"fuzz-probe\""), "session stuck after input {input:?}: {text}");
}

fn check_output(out: &[u8]) {
    assert!(out.is_empty() || out.ends_with(b"\r\n"));
    for l in out.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let l = l.strip_suffix(b"\r").expect("CRLF");
        assert!(l.iter().all(|&b| (0x20..0x7f).contains(&b)), "non-printable output byte");
        let v: Value = serde_json::from_slice(l).expect("each output line is JSON");
        assert!(v.is_object());
    }
}

//! The machine as QMP clients see it, through `qmp::Session` against a real `Vmm` on a fake hypervisor and
//! platform (the generic `Vmm` needs no KVM for that): run-state transitions, events, what queries report, and the
//! refusals. `qmp::testing` has a fake machine for the protocol's own tests, not a way to build this one; what
//! needs a running guest (boot, reset, migrate) is in the host suites (`tests/qmp_*.rs`, `tests/snapshot_*.rs`).

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};

use devices::pci::{PciBarInfo, PciFunctionInfo};
use devices::{Bus, PlatformEvents};
use hypervisor::{Datamatch, Hypervisor, IoEventAddress, Vcpu, VcpuExit, Vm};
use mio::{Poll, Waker};

use qmp::{CpuProps, MigrationCapabilities, RunState, ServerInfo, Session, Target};
use serde_json::{json, Value};
use snapshot::CpuIdentity;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{EventSender, OpenPayload, Vmm, WAKER};
use crate::config::{Frontend, Incoming as IncomingConfig, MachineType, SerialConfig, VirtioTransport, VmConfig};
use crate::console::ConsoleBackend;
use crate::cpu_model::{CpuModelDefinition, GuestCpu};
use crate::platform::{ArchExitHandler, BootFiles, ExitAction, Platform, Snapshots, VcpuOf};
use crate::snapshot::Component;
use crate::virtio::NamedDevice;
use crate::Error;

/// A hypervisor that cannot create a VM: these tests never boot.
struct NoHypervisor;

fn refused<T>(operation: &'static str) -> hypervisor::Result<T> {
    Err(hypervisor::Error::new(operation, std::io::ErrorKind::Unsupported))
}

impl Hypervisor for NoHypervisor {
    type Vm = NoVm;

    fn create_vm(&self) -> hypervisor::Result<NoVm> {
        refused("creating a VM")
    }

    fn max_vcpus(&self) -> u32 {
        8
    }
}

struct NoVm;

impl Vm for NoVm {
    type Vcpu = NoVcpu;

    unsafe fn map_memory(&self, _slot: u32, _guest_addr: u64, _size: u64, _host_addr: u64) -> hypervisor::Result<()> {
        refused("mapping memory")
    }

    unsafe fn map_read_only_memory(&self, _: u32, _: u64, _: u64, _: u64) -> hypervisor::Result<()> {
        refused("mapping read-only memory")
    }
    fn create_vcpu(&self, _id: u32) -> hypervisor::Result<NoVcpu> {
        refused("creating a vCPU")
    }
    fn register_irqfd(&self, _event: &EventFd, _gsi: u32) -> hypervisor::Result<()> {
        refused("registering an irqfd")
    }
    fn register_ioevent(&self, _: &EventFd, _: IoEventAddress, _: Option<Datamatch>) -> hypervisor::Result<()> {
        refused("registering an ioeventfd")
    }
    fn unregister_ioevent(&self, _: &EventFd, _: IoEventAddress, _: Option<Datamatch>) -> hypervisor::Result<()> {
        refused("unregistering an ioeventfd")
    }
    fn signal_msi(&self, _address: u64, _data: u32, _device_id: u32) -> hypervisor::Result<()> {
        refused("signalling an MSI")
    }
    fn register_level_irqfd(&self, _event: &EventFd, _resample: &EventFd, _gsi: u32) -> hypervisor::Result<()> {
        refused("registering an irqfd")
    }
}

struct NoVcpu;

impl Vcpu for NoVcpu {
    type ArchExit = ();

    fn run(&mut self) -> hypervisor::Result<VcpuExit<'_, ()>> {
        refused("running a vCPU")
    }
    fn set_immediate_exit(&mut self, _exit: bool) {}
    fn dump_state(&mut self) -> String {
        String::new()
    }
}

#[derive(Clone)]
struct NoExits;

impl ArchExitHandler<NoVcpu> for NoExits {
    fn handle(&self, _vcpu: &mut NoVcpu, _exit: ()) -> ExitAction {
        ExitAction::Resume
    }
}

/// A platform that records what QMP asked of it and reports the PCI functions it is given.
struct TestPlatform {
    pio: Bus,
    mmio: Bus,
    power_button_presses: Arc<AtomicU32>,
    pci: Vec<PciFunctionInfo>,
}

impl Platform<NoHypervisor> for TestPlatform {
    type ExitHandler = NoExits;

    const DEFAULT_CMDLINE: &'static str = "console=test0";
    const QMP_TARGET: Target = Target::Aarch64;
    const MACHINE_TYPES: &'static [MachineType] = &[MachineType::Virt];
    const CPU_TYPE: &'static str = "test-cpu";
    const CPU_MODELS: &'static [CpuModelDefinition] = &[
        CpuModelDefinition { name: "small", features: &["test-feature"] },
        CpuModelDefinition { name: "needy", features: &["test-feature", "missing-feature"] },
    ];
    const MAX_VCPUS: u32 = 5;
    const ISA_SERIAL: bool = false;

    fn virtio_transport(_machine: Option<MachineType>) -> Result<VirtioTransport, Error> {
        Ok(VirtioTransport::Mmio)
    }
    fn ram_regions(memory_bytes: u64) -> Vec<(u64, u64)> {
        vec![(0, memory_bytes)]
    }
    fn cpu_features(_hypervisor: &NoHypervisor) -> Result<Vec<(&'static str, bool)>, Error> {
        Ok(vec![("test-feature", true), ("missing-feature", false)])
    }
    fn cpu_props(index: u32, _cores_per_socket: u32) -> CpuProps {
        CpuProps { core_id: Some(i64::from(index) + 100), ..Default::default() }
    }
    fn new(
        _serial: ConsoleBackend,
        _events: PlatformEvents,
        _memory: &GuestMemoryMmap,
        _virtio_devices: Vec<NamedDevice>,
        _machine_transport: VirtioTransport,
    ) -> Result<Self, Error> {
        Err(Error::Unsupported("the tests build their platform themselves".into()))
    }
    fn pio(&self) -> &Bus {
        &self.pio
    }
    fn mmio(&self) -> &Bus {
        &self.mmio
    }
    fn boot(
        &self,
        _hypervisor: &NoHypervisor,
        _vm: &Arc<NoVm>,
        _memory: &GuestMemoryMmap,
        _boot: BootFiles<'_>,
    ) -> Result<Vec<NoVcpu>, Error> {
        Err(Error::Boot("the tests never boot".into()))
    }
    fn exit_handler(&self) -> NoExits {
        NoExits
    }
    fn reset(&self) {}
    fn press_power_button(&self) {
        self.power_button_presses.fetch_add(1, Ordering::SeqCst);
    }
    fn pci_functions(&self) -> Vec<PciFunctionInfo> {
        self.pci.clone()
    }
}

impl Snapshots<NoHypervisor> for TestPlatform {
    type VcpuState = ();
    type VmState = ();

    const DEFAULT_MACHINE_NAME: &'static str = "test";

    fn check_restore_supported() -> Result<(), Error> {
        Ok(())
    }
    fn cpu_identity(_hypervisor: &NoHypervisor, _vcpu_count: u8, _cpu: &GuestCpu) -> Result<CpuIdentity, Error> {
        Ok(CpuIdentity::default())
    }
    fn components(&self) -> Vec<Component> {
        Vec::new()
    }
    fn quiesce_devices(&self) {}
    fn resume_devices(&self) {}
    fn save_vcpu(_vcpu: &mut VcpuOf<NoHypervisor>) -> Result<(), String> {
        Err("no vCPU to save".into())
    }
    fn save_vm(_vm: &NoVm) -> Result<(), String> {
        Err("no VM to save".into())
    }
    fn restore(&self, _: &NoHypervisor, _: &Arc<NoVm>, _: &[()], _: &(), _: &GuestCpu) -> Result<Vec<NoVcpu>, Error> {
        Err(Error::Snapshot("the tests never restore".into()))
    }
}

/// A machine that never booted (no guest), in `state`, and a negotiated QMP session on it.
struct Fixture {
    vmm: Vmm<'static, NoHypervisor, TestPlatform>,
    session: Session,
    power_button_presses: Arc<AtomicU32>,
    _poll: Poll,
}

impl Fixture {
    fn new(config: VmConfig, state: RunState) -> Self {
        Self::with_pci(config, state, Vec::new())
    }

    fn with_pci(config: VmConfig, state: RunState, pci: Vec<PciFunctionInfo>) -> Self {
        // The machine borrows its configuration for its whole life, as `run`'s does; a test's may leak.
        let config: &'static VmConfig = Box::leak(Box::new(config));
        // As `Vmm::new` does: a reset starts vCPU threads, and stopping them kicks them with this signal.
        crate::signals::install_kick_handler().unwrap();
        let poll = Poll::new().unwrap();
        let waker = Waker::new(poll.registry(), WAKER).unwrap();
        let (sender, events) = channel();
        let power_button_presses = Arc::new(AtomicU32::new(0));
        let platform =
            TestPlatform { pio: Bus::new(), mmio: Bus::new(), power_button_presses: power_button_presses.clone(), pci };
        let vmm = Vmm {
            config,
            hypervisor: NoHypervisor,
            platform,
            payload: OpenPayload::Kernel { kernel: File::open("/dev/null").unwrap(), initrd: None },
            memory: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap(),
            events,
            sender: EventSender { sender: Arc::new(Mutex::new(sender)), waker: Arc::new(waker) },
            guest: None,
            state,
            raised: Vec::new(),
            quit: false,
            disks: Vec::new(),
            balloon: None,
            balloon_events: super::EventThrottle::default(),
            platform_requested: Arc::new(AtomicBool::new(false)),
            first_boot_vcpus: None,
            incoming: None,
            waiting_for_incoming: config.incoming == Some(IncomingConfig::Defer),
            autostart: !config.start_paused,
            migration: None,
            migration_capabilities: MigrationCapabilities::default(),
            fatal: None,
            memory_file: None,
            serial_pty: None,
            cpu: GuestCpu::default(),
            serial_ports: None,
        };
        let (session, _greeting) = Session::new(ServerInfo::kestrel());
        let mut fixture = Fixture { vmm, session, power_button_presses, _poll: poll };
        fixture.execute("qmp_capabilities", json!({})).expect("negotiation");
        fixture
    }

    /// Runs one command: its `return`, or its error's description, and the events it raised on this session.
    fn command(&mut self, name: &str, arguments: Value) -> (Result<Value, String>, Vec<Value>) {
        let request = json!({"execute": name, "arguments": arguments}).to_string();
        let output = self.session.feed(request.as_bytes(), &mut self.vmm);
        let lines: Vec<Value> = String::from_utf8(output)
            .unwrap()
            .split("\r\n")
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let (replies, events): (Vec<Value>, Vec<Value>) = lines.into_iter().partition(|l| l.get("event").is_none());
        assert_eq!(replies.len(), 1, "one reply to {name}: {replies:?}");
        let reply = &replies[0];
        let result = match reply.get("return") {
            Some(value) => Ok(value.clone()),
            None => Err(reply["error"]["desc"].as_str().unwrap_or_default().to_string()),
        };
        (result, events)
    }

    fn execute(&mut self, name: &str, arguments: Value) -> Result<Value, String> {
        self.command(name, arguments).0
    }

    fn status(&mut self) -> String {
        self.execute("query-status", json!({})).unwrap()["status"].as_str().unwrap().to_string()
    }
}

fn config() -> VmConfig {
    VmConfig::new(PathBuf::from("/boot/test-kernel"))
}

fn event_names(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["event"].as_str().unwrap()).collect()
}

#[test]
fn stop_and_cont_move_the_run_state_with_their_events() {
    let mut m = Fixture::new(config(), RunState::Prelaunch);
    assert_eq!(m.status(), "prelaunch");
    let (result, events) = m.command("stop", json!({}));
    assert_eq!((result, events.len()), (Ok(json!({})), 0), "stop before the guest ran is no change");
    assert_eq!(m.status(), "prelaunch");

    let (result, events) = m.command("cont", json!({}));
    assert_eq!((result, event_names(&events)), (Ok(json!({})), vec!["RESUME"]));
    assert_eq!(m.status(), "running");
    let (_, events) = m.command("cont", json!({}));
    assert!(events.is_empty(), "cont while running raised {events:?}");

    let (_, events) = m.command("stop", json!({}));
    assert_eq!(event_names(&events), ["STOP"]);
    assert_eq!(m.status(), "paused");
    // Raised by a command, for the other sessions too.
    assert_eq!(m.vmm.raised.len(), 2);
}

#[test]
fn in_migrate_cont_and_stop_only_decide_whether_the_guest_runs_after() {
    let mut m = Fixture::new(VmConfig { incoming: Some(IncomingConfig::Defer), ..config() }, RunState::InMigrate);
    let (_, events) = m.command("stop", json!({}));
    assert!(events.is_empty());
    assert!(!m.vmm.autostart);
    let (_, events) = m.command("cont", json!({}));
    assert!(events.is_empty());
    assert!(m.vmm.autostart);
    assert_eq!(m.status(), "inmigrate");
    let refusal = m.execute("system_reset", json!({})).unwrap_err();
    assert_eq!(refusal, "the machine is waiting for its incoming migration");
}

#[test]
fn powerdown_presses_the_platform_s_button() {
    let mut m = Fixture::new(config(), RunState::Running);
    let (result, events) = m.command("system_powerdown", json!({}));
    assert_eq!((result, event_names(&events)), (Ok(json!({})), vec!["POWERDOWN"]));
    assert_eq!(m.power_button_presses.load(Ordering::SeqCst), 1);
    assert!(!m.vmm.quit);
}

#[test]
fn quit_and_a_reset_with_no_reboot_end_the_run_with_a_shutdown_event() {
    let mut m = Fixture::new(config(), RunState::Running);
    let (_, events) = m.command("quit", json!({}));
    assert_eq!(event_names(&events), ["SHUTDOWN"]);
    assert_eq!(events[0]["data"], json!({"guest": false, "reason": "host-qmp-quit"}));
    assert!(m.vmm.quit);

    let mut m = Fixture::new(VmConfig { no_reboot: true, ..config() }, RunState::Running);
    let (result, events) = m.command("system_reset", json!({}));
    assert_eq!(result, Ok(json!({})));
    assert_eq!(events[0]["data"], json!({"guest": false, "reason": "host-qmp-system-reset"}));
    assert!(m.vmm.quit);
}

#[test]
fn a_reset_that_cannot_boot_says_why() {
    let mut m = Fixture::new(config(), RunState::Running);
    let (result, events) = m.command("system_reset", json!({}));
    assert_eq!(event_names(&events), ["RESET"]);
    let error = result.unwrap_err();
    assert!(error.contains("creating a VM"), "{error}");
}

#[test]
fn migrations_refused_say_why_and_change_nothing() {
    let mut m = Fixture::new(config(), RunState::Prelaunch);
    let error = m.execute("migrate", json!({"uri": "file:/nonexistent/kestrel-test.ksnap"})).unwrap_err();
    assert_eq!(error, "cannot save the VM in state 'prelaunch'");
    let error = m.execute("migrate-incoming", json!({"uri": "file:/nonexistent/kestrel-test.ksnap"})).unwrap_err();
    assert_eq!(error, "'-incoming' was not specified on the command line");
    assert_eq!(m.execute("query-migrate", json!({})), Ok(json!({})));

    let mut m = Fixture::new(VmConfig { incoming: Some(IncomingConfig::Defer), ..config() }, RunState::InMigrate);
    m.vmm.waiting_for_incoming = false;
    let error = m.execute("migrate-incoming", json!({"uri": "file:/nonexistent/kestrel-test.ksnap"})).unwrap_err();
    assert_eq!(error, "The incoming migration has already been started");
    assert!(m.vmm.fatal.is_none());
}

#[test]
fn a_missing_incoming_file_is_refused_and_the_machine_keeps_waiting() {
    let mut m = Fixture::new(VmConfig { incoming: Some(IncomingConfig::Defer), ..config() }, RunState::InMigrate);
    let error = m.execute("migrate-incoming", json!({"uri": "file:/nonexistent/kestrel-test.ksnap"})).unwrap_err();
    assert!(error.contains("/nonexistent/kestrel-test.ksnap"), "{error}");
    assert!(m.vmm.waiting_for_incoming);
    assert!(m.vmm.fatal.is_none(), "a file that does not fit must not end Kestrel");
    assert_eq!(m.status(), "inmigrate");
}

#[test]
fn the_platform_names_the_machine_target_and_cpus() {
    let mut m = Fixture::new(VmConfig { vcpus: 2, ..config() }, RunState::Running);
    let machines = m.execute("query-machines", json!({})).unwrap();
    // The platform's machine types under QEMU's versioned names, their plain names as aliases, then `none`.
    assert_eq!(machines[0]["name"], "virt-7.2");
    assert_eq!(machines[0]["alias"], "virt");
    assert_eq!(machines[0]["is-default"], true);
    assert_eq!(machines[1]["name"], "none");
    assert_eq!(machines.as_array().unwrap().len(), 2);
    assert_eq!(machines[0]["cpu-max"], TestPlatform::MAX_VCPUS);
    assert_eq!(machines[0]["default-cpu-type"], TestPlatform::CPU_TYPE);
    assert_eq!(m.execute("query-target", json!({})).unwrap()["arch"], "aarch64");
    // No guest, no vCPU threads to report.
    assert_eq!(m.execute("query-cpus-fast", json!({})), Ok(json!([])));

    let machine = m.execute("qom-list", json!({"path": "/machine"})).unwrap();
    let append = machine.as_array().unwrap().iter().find(|p| p["name"] == "append").expect("an append property");
    assert_eq!(append["type"], "string");
    let get =
        |m: &mut Fixture, path: &str, property: &str| m.execute("qom-get", json!({"path": path, "property": property}));
    assert_eq!(get(&mut m, "/machine", "append"), Ok(json!(TestPlatform::DEFAULT_CMDLINE)));
    assert_eq!(get(&mut m, "/machine", "type"), Ok(json!("virt-7.2-machine")));
    assert_eq!(get(&mut m, "/machine/unattached/device[1]", "start-powered-off"), Ok(json!(true)));
    assert_eq!(get(&mut m, "/machine/unattached/device[0]", "type"), Ok(json!(TestPlatform::CPU_TYPE)));
    let error = get(&mut m, "/machine/unattached/device[2]", "type").unwrap_err();
    assert!(error.contains("device[2]"), "{error}");
}

#[test]
fn the_configuration_shows_in_name_uuid_memory_and_chardevs() {
    let uuid = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
    let serial = SerialConfig::File(PathBuf::from("/tmp/kestrel-serial.log"));
    let config = VmConfig { name: Some("guest-a".into()), uuid: Some(uuid.into()), serial, ..config() };
    let memory_bytes = config.memory_bytes;
    let mut m = Fixture::new(config, RunState::Running);
    assert_eq!(m.execute("query-name", json!({})), Ok(json!({"name": "guest-a"})));
    assert_eq!(m.execute("query-uuid", json!({})), Ok(json!({"UUID": uuid})));
    let memory = m.execute("query-memory-size-summary", json!({})).unwrap();
    assert_eq!(memory["base-memory"], memory_bytes);
    let chardevs = m.execute("query-chardev", json!({})).unwrap();
    assert_eq!(
        chardevs[0],
        json!({"label": "serial0", "filename": "file:/tmp/kestrel-serial.log", "frontend-open": true})
    );
}

#[test]
fn what_libvirt_looks_at_when_it_starts_or_reconnects() {
    let frontend = |id: &str| Frontend { id: Some(id.into()), ..Frontend::default() };
    let config = VmConfig {
        serial: SerialConfig::Pty,
        serial_chardev: Some("charserial0".into()),
        serial_on_isa: Some(Some("serial0".into())),
        rng: Some(frontend("rng0")),
        ..config()
    };
    let mut m = Fixture::new(config, RunState::Running);
    let chardevs = m.execute("query-chardev", json!({})).unwrap();
    assert_eq!(chardevs[0]["label"], "charserial0");
    // The fixture opened no pty: the path is what it recorded, none.
    assert_eq!(chardevs[0]["filename"], "pty:");
    let peripheral = m.execute("qom-list", json!({"path": "/machine/peripheral"})).unwrap();
    let children: Vec<(&str, &str)> = peripheral
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), p["type"].as_str().unwrap()))
        .collect();
    assert_eq!(children, [("type", "string"), ("serial0", "child<isa-serial>"), ("rng0", "child<virtio-rng-device>")]);
    // Each child listed resolves, and names its type.
    let rng = m.execute("qom-get", json!({"path": "/machine/peripheral/rng0", "property": "type"}));
    assert_eq!(rng, Ok(json!("virtio-rng-device")));
    assert!(m.execute("qom-list", json!({"path": "/machine/peripheral/serial0"})).is_ok());
    assert!(m.execute("qom-list", json!({"path": "/machine/peripheral/nope"})).is_err());
    assert_eq!(m.execute("query-named-block-nodes", json!({"flat": true})), Ok(json!([])));
    assert_eq!(m.execute("query-jobs", json!({})), Ok(json!([])));
}

#[test]
fn pci_functions_are_shown_as_qemu_shows_them() {
    let function = PciFunctionInfo {
        slot: 3,
        function: 0,
        vendor_id: 0x1af4,
        device_id: 0x1042,
        subsystem_vendor_id: 0x1af4,
        subsystem_id: 0x1100,
        revision: 1,
        class_code: 0x01_80_00,
        irq_pin: 0,
        bars: vec![PciBarInfo {
            index: 4,
            address: 0xe000_4000,
            size: 0x4000,
            is_64bit: true,
            prefetchable: true,
            is_io: false,
        }],
        qdev_id: "disk0".into(),
    };
    let mut m = Fixture::with_pci(config(), RunState::Running, vec![function]);
    let buses = m.execute("query-pci", json!({})).unwrap();
    let device = &buses[0]["devices"][0];
    assert_eq!(device["slot"], 3);
    assert_eq!(device["class_info"]["class"], 0x0180);
    assert_eq!(
        device["id"],
        json!({"vendor": 0x1af4, "device": 0x1042, "subsystem-vendor": 0x1af4, "subsystem": 0x1100})
    );
    assert_eq!(device["qdev_id"], "disk0");
    assert_eq!(device.get("irq"), None, "MSI-X only: no interrupt line");
    let region = &device["regions"][0];
    assert_eq!(
        (region["bar"].clone(), region["type"].clone(), region["address"].clone(), region["size"].clone()),
        (json!(4), json!("memory"), json!(0xe000_4000u64), json!(0x4000))
    );
    assert_eq!((region["prefetch"].clone(), region["mem_type_64"].clone()), (json!(true), json!(true)));
}

#[test]
fn the_probe_is_offered_what_the_platform_and_command_line_implement() {
    let mut m = Fixture::new(config(), RunState::Running);
    let types = m.execute("qom-list-types", json!({"implements": "device"})).unwrap();
    let names: Vec<&str> = types.as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    // The test platform's only machine puts virtio on mmio: no -pci devices.
    for expected in [
        "virtio-blk-device",
        "virtio-net-device",
        "virtio-rng-device",
        "virtio-serial-device",
        "virtconsole",
        "virtserialport",
    ] {
        assert!(names.contains(&expected), "{expected} missing from {names:?}");
    }
    assert!(!names.iter().any(|n| n.ends_with("-pci")), "{names:?}");
    assert!(names.contains(&"test-cpu"), "{names:?}");
    let machines = m.execute("qom-list-types", json!({"implements": "machine"})).unwrap();
    assert_eq!(
        machines,
        json!([{"name": "virt-7.2-machine", "parent": "machine"}, {"name": "none-machine", "parent": "machine"}])
    );

    let rng = m.execute("device-list-properties", json!({"typename": "virtio-rng-device"})).unwrap();
    let settings: Vec<&str> = rng.as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(settings, ["rng"], "no rate limit: max-bytes and period are not offered");
    // Ports and their numbers, as many as QEMU's max_ports allows: the one-port restriction is gone.
    let port = m.execute("device-list-properties", json!({"typename": "virtserialport"})).unwrap();
    let settings: Vec<&str> = port.as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(settings, ["chardev", "nr", "name"]);
    let serial = m.execute("device-list-properties", json!({"typename": "virtio-serial-device"})).unwrap();
    assert_eq!(serial[0]["name"], "max_ports");
    let error = m.execute("device-list-properties", json!({"typename": "virtio-rng-pci"})).unwrap_err();
    assert!(error.contains("not found"), "{error}");
    assert_eq!(m.execute("qom-list-properties", json!({"typename": "memory-backend-file"})), Ok(json!([])));

    let definitions = m.execute("query-cpu-definitions", json!({})).unwrap();
    assert_eq!(definitions[0]["name"], "host");
    assert_eq!(definitions[0]["typename"], "test-cpu");
    let expand = |m: &mut Fixture, kind: &str, model: Value| {
        m.execute("query-cpu-model-expansion", json!({"type": kind, "model": model}))
    };
    let features = json!({"test-feature": true, "missing-feature": false});
    assert_eq!(
        expand(&mut m, "static", json!({"name": "host"})),
        Ok(json!({"model": {"name": "base", "props": features}}))
    );
    let full = expand(&mut m, "full", json!({"name": "host", "props": {"migratable": false}})).unwrap();
    assert_eq!(full["model"]["props"]["migratable"], false);
    assert_eq!(full["model"]["props"]["test-feature"], true);
    // The static model has the features set and no other; one the host lacks cannot be set.
    let none = json!({"test-feature": false, "missing-feature": false});
    assert_eq!(expand(&mut m, "full", json!({"name": "base"})), Ok(json!({"model": {"name": "base", "props": none}})));
    let full = expand(&mut m, "full", json!({"name": "base", "props": {"test-feature": true}})).unwrap();
    assert_eq!(full["model"]["props"], features);
    let error = expand(&mut m, "full", json!({"name": "base", "props": {"missing-feature": true}})).unwrap_err();
    assert!(error.contains("'missing-feature' cannot be given to guests: this host lacks it"), "{error}");
    // The named models: each with the features the host lacks; expanded as -cpu resolves them.
    assert_eq!(definitions[1]["name"], "small");
    assert_eq!(definitions[1]["typename"], "small-cpu");
    assert_eq!(definitions[1]["unavailable-features"], json!([]));
    assert_eq!(definitions[2]["unavailable-features"], json!(["missing-feature"]));
    let small = expand(&mut m, "full", json!({"name": "small"})).unwrap();
    assert_eq!(small, json!({"model": {"name": "small", "props": features}}));
    let small = expand(&mut m, "static", json!({"name": "small", "props": {"test-feature": false}})).unwrap();
    assert_eq!(small, json!({"model": {"name": "base", "props": none}}));
    let error = expand(&mut m, "static", json!({"name": "needy"})).unwrap_err();
    assert!(error.contains("needs missing-feature which this host lacks"), "{error}");
    let error = expand(&mut m, "full", json!({"name": "host", "props": {"hv-passthrough": true}})).unwrap_err();
    assert_eq!(error, "Property 'test-cpu.hv-passthrough' not found");
    let error = expand(&mut m, "static", json!({"name": "Skylake-Client"})).unwrap_err();
    assert!(error.contains("Skylake-Client"), "{error}");

    let options = m.execute("query-command-line-options", json!({"option": "sandbox"})).unwrap();
    let parameters: Vec<&str> =
        options[0]["parameters"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(parameters, ["enable", "obsolete", "elevateprivileges", "spawn", "resourcecontrol"]);
}

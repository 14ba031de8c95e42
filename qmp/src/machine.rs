//! What the protocol needs from a VM: `trait Machine`, implemented by `vmm`, and the plain data it returns.

use serde_json::Value;

use crate::fds::MigrationChannel;

/// Classes of QMP errors, named as QEMU names them on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
    DeviceNotActive,
    DeviceNotFound,
    KVMMissingCap,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
        }
    }
}

/// An error reply: `{"error": {"class": ..., "desc": ...}}`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{desc}")]
pub struct QmpError {
    pub class: ErrorClass,
    pub desc: String,
}

impl QmpError {
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        QmpError { class, desc: desc.into() }
    }

    pub fn generic(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::GenericError, desc)
    }

    /// QEMU's text for a QOM path that resolves to nothing (`qom-get`, `qom-list`).
    pub fn device_not_found(path: &str) -> Self {
        Self::new(ErrorClass::DeviceNotFound, format!("Device '{path}' not found"))
    }

    /// QEMU's answer to a balloon command on a machine without a balloon device.
    pub fn no_balloon() -> Self {
        Self::new(ErrorClass::DeviceNotActive, "No balloon device has been activated")
    }

    /// QEMU's QERR_PERMISSION_DENIED: a QOM property without a getter (`qom-get`) or setter (`qom-set`).
    pub fn permission_denied() -> Self {
        Self::generic("Insufficient permission to perform this operation")
    }

    /// QEMU's text for a missing QOM property: `Property '<type>.<name>' not found`.
    pub fn property_not_found(type_name: &str, property: &str) -> Self {
        Self::generic(format!("Property '{type_name}.{property}' not found"))
    }
}

/// Generates an enum with QEMU's wire names, `as_str`, and the list of all names (used by the schema).
macro_rules! wire_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident = $s:literal,)* }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vm])* $variant,)* }
        impl $name {
            /// Every name, in QEMU's declaration order.
            pub const NAMES: &'static [&'static str] = &[$($s,)*];
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $s,)* }
            }
            /// The variant with this wire name.
            pub fn from_name(s: &str) -> Option<Self> {
                match s { $($s => Some($name::$variant),)* _ => None }
            }
        }
    };
}

wire_enum! {
    /// QEMU's `RunState`: what `query-status` reports.
    RunState {
        Debug = "debug",
        InMigrate = "inmigrate",
        InternalError = "internal-error",
        IoError = "io-error",
        Paused = "paused",
        PostMigrate = "postmigrate",
        /// Created with `-S`, never started.
        Prelaunch = "prelaunch",
        FinishMigrate = "finish-migrate",
        RestoreVm = "restore-vm",
        Running = "running",
        SaveVm = "save-vm",
        /// The guest shut down and `-no-shutdown` kept the process alive.
        Shutdown = "shutdown",
        Suspended = "suspended",
        Watchdog = "watchdog",
        GuestPanicked = "guest-panicked",
        Colo = "colo",
    }
}

impl RunState {
    /// QEMU's `runstate_needs_reset`: `cont` is refused in these states.
    pub fn needs_reset(self) -> bool {
        matches!(self, RunState::InternalError | RunState::Shutdown | RunState::GuestPanicked)
    }
}

wire_enum! {
    /// QEMU's `ShutdownCause`: the `reason` of SHUTDOWN and RESET events.
    ShutdownCause {
        None = "none",
        HostError = "host-error",
        HostQmpQuit = "host-qmp-quit",
        HostQmpSystemReset = "host-qmp-system-reset",
        HostSignal = "host-signal",
        HostUi = "host-ui",
        GuestShutdown = "guest-shutdown",
        GuestReset = "guest-reset",
        GuestPanic = "guest-panic",
        SubsystemReset = "subsystem-reset",
        SnapshotLoad = "snapshot-load",
    }
}

impl ShutdownCause {
    /// QEMU's rule for the `guest` member: the guest caused it.
    pub fn is_guest(self) -> bool {
        matches!(self, ShutdownCause::GuestShutdown | ShutdownCause::GuestReset | ShutdownCause::GuestPanic)
    }
}

wire_enum! {
    /// QEMU's `SysEmuTarget`: what `query-target` and `query-cpus-fast` report.
    Target {
        Aarch64 = "aarch64", Alpha = "alpha", Arm = "arm", Avr = "avr", Cris = "cris", Hppa = "hppa", I386 = "i386",
        Loongarch64 = "loongarch64", M68k = "m68k", Microblaze = "microblaze", Microblazeel = "microblazeel",
        Mips = "mips", Mips64 = "mips64", Mips64el = "mips64el", Mipsel = "mipsel", Nios2 = "nios2", Or1k = "or1k",
        Ppc = "ppc", Ppc64 = "ppc64", Riscv32 = "riscv32", Riscv64 = "riscv64", Rx = "rx", S390x = "s390x",
        Sh4 = "sh4", Sh4eb = "sh4eb", Sparc = "sparc", Sparc64 = "sparc64", Tricore = "tricore", X86_64 = "x86_64",
        Xtensa = "xtensa", Xtensaeb = "xtensaeb",
    }
}

wire_enum! {
    /// QEMU's `MigrationStatus`: the `status` of `query-migrate` and of the `MIGRATION` event.
    MigrationStatus {
        None = "none",
        Setup = "setup",
        Cancelling = "cancelling",
        Cancelled = "cancelled",
        Active = "active",
        PostcopyActive = "postcopy-active",
        PostcopyPaused = "postcopy-paused",
        PostcopyRecover = "postcopy-recover",
        Completed = "completed",
        Failed = "failed",
        Colo = "colo",
        PreSwitchover = "pre-switchover",
        Device = "device",
        WaitUnplug = "wait-unplug",
    }
}

/// The last migration (a save, or on a machine started with `-incoming`, the restore), for `query-migrate`.
#[derive(Clone, Debug, PartialEq)]
pub struct MigrationInfo {
    pub status: MigrationStatus,
    /// An incoming migration: QEMU reports its status only.
    pub incoming: bool,
    /// Milliseconds from `migrate` to the end (or until now while it runs).
    pub total_time_ms: u64,
    /// Milliseconds the guest was stopped for the copy (a completed save only).
    pub downtime_ms: Option<u64>,
    /// Milliseconds before the copy started.
    pub setup_time_ms: u64,
    /// What was written of guest memory (a completed save only).
    pub ram: Option<MigrationRam>,
    /// Why it failed (a failed one only).
    pub error: Option<String>,
}

/// QEMU's `MigrationStats` as far as a one-pass save fills them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MigrationRam {
    /// Bytes written in all.
    pub transferred: u64,
    /// Guest RAM in bytes.
    pub total: u64,
    /// Pages found all zero (not written).
    pub duplicate: u64,
    /// Pages written whole.
    pub normal: u64,
    pub page_size: u64,
    /// Throughput in megabits per second.
    pub mbps: f64,
    pub pages_per_second: u64,
}

wire_enum! {
    /// The migration capabilities Kestrel implements: QEMU's `MigrationCapability`, reduced to those.
    MigrationCapability {
        /// Send `MIGRATION` events (off until a client turns it on, as in QEMU).
        Events = "events",
    }
}

/// The state of every migration capability.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MigrationCapabilities {
    pub events: bool,
}

impl MigrationCapabilities {
    pub fn get(&self, capability: MigrationCapability) -> bool {
        match capability {
            MigrationCapability::Events => self.events,
        }
    }

    pub fn set(&mut self, capability: MigrationCapability, state: bool) {
        match capability {
            MigrationCapability::Events => self.events = state,
        }
    }
}

/// Wall-clock time of an event, as the QMP `timestamp` member (seconds and microseconds since the Unix epoch).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timestamp {
    pub seconds: i64,
    pub microseconds: i64,
}

/// The events Kestrel emits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Stop,
    Resume,
    Powerdown,
    /// `guest` is normally `reason.is_guest()`; it is separate because QEMU reports it separately.
    Reset {
        guest: bool,
        reason: ShutdownCause,
    },
    Shutdown {
        guest: bool,
        reason: ShutdownCause,
    },
    Migration {
        status: MigrationStatus,
    },
    /// The guest's balloon changed: `actual` is the memory it now has, in bytes.
    BalloonChange {
        actual: u64,
    },
}

impl EventKind {
    pub fn reset(reason: ShutdownCause) -> Self {
        EventKind::Reset { guest: reason.is_guest(), reason }
    }

    pub fn shutdown(reason: ShutdownCause) -> Self {
        EventKind::Shutdown { guest: reason.is_guest(), reason }
    }

    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Stop => "STOP",
            EventKind::Resume => "RESUME",
            EventKind::Powerdown => "POWERDOWN",
            EventKind::Reset { .. } => "RESET",
            EventKind::Shutdown { .. } => "SHUTDOWN",
            EventKind::Migration { .. } => "MIGRATION",
            EventKind::BalloonChange { .. } => "BALLOON_CHANGE",
        }
    }
}

/// An event with the time it happened, taken from the VMM's clock when it happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub timestamp: Timestamp,
}

/// `CpuInstanceProperties`: where a vCPU sits in the topology. `None` members are omitted, as QEMU does (x86
/// reports socket, core and thread; arm64 `virt` reports thread only, etc.).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuProps {
    pub node_id: Option<i64>,
    pub socket_id: Option<i64>,
    pub die_id: Option<i64>,
    pub cluster_id: Option<i64>,
    pub core_id: Option<i64>,
    pub thread_id: Option<i64>,
}

/// One vCPU, for `query-cpus-fast`, `query-hotpluggable-cpus` and `info cpus`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuInfo {
    pub cpu_index: i64,
    /// The vCPU's QOM path, e.g. `/machine/unattached/device[0]`; the same object should exist in the QOM tree.
    pub qom_path: String,
    /// The host thread id (gettid) of the thread running this vCPU.
    pub thread_id: i64,
    pub props: CpuProps,
    /// QOM type name, e.g. `host-x86_64-cpu`.
    pub type_name: String,
}

/// One entry of `query-machines`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineInfo {
    pub name: String,
    pub alias: Option<String>,
    pub is_default: bool,
    pub cpu_max: i64,
    pub hotpluggable_cpus: bool,
    pub numa_mem_supported: bool,
    pub deprecated: bool,
    pub default_cpu_type: Option<String>,
    pub default_ram_id: Option<String>,
}

/// One QOM type, for `qom-list-types`: what the binary can create (devices, backends, machines, CPUs, accelerators),
/// each with its parent so that `implements` filters can walk the hierarchy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QomType {
    pub name: String,
    /// `None` for the root (`object`).
    pub parent: Option<String>,
    /// Abstract types exist only as parents: listed with `abstract: true`, never created.
    pub is_abstract: bool,
}

/// One property of a QOM type, as `device-list-properties` and `qom-list-properties` show it (`ObjectPropertyInfo`).
#[derive(Clone, Debug, PartialEq)]
pub struct TypeProperty {
    pub name: String,
    /// QEMU's property type name: `str`, `bool`, `uint32`, `link<...>`...
    pub type_name: String,
    pub description: Option<String>,
    pub default_value: Option<Value>,
}

/// One CPU model, for `query-cpu-definitions` (`CpuDefinitionInfo`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuDefinition {
    /// The name `-cpu` takes.
    pub name: String,
    /// Its QOM type.
    pub type_name: String,
    /// Whether it is the same on every host (a named model), unlike `host`.
    pub is_static: bool,
    pub migration_safe: bool,
    /// Features the model has that this host cannot give a guest; empty: usable here.
    pub unavailable_features: Vec<String>,
    pub deprecated: bool,
}

wire_enum! {
    /// QEMU's `CpuModelExpansionType`.
    CpuModelExpansionType {
        /// Expanded into a static base model (`base`) plus the features that make it up.
        Static = "static",
        /// The model itself with every property it has.
        Full = "full",
    }
}

/// A CPU model and property settings (`CpuModelInfo`): asked for, or the result of an expansion.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CpuModel {
    pub name: String,
    /// Property name to value; features are booleans.
    pub props: serde_json::Map<String, Value>,
}

/// One option of the command line and the parameters its value takes, for `query-command-line-options`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandLineOption {
    /// Without the leading dash (`sandbox`).
    pub option: String,
    pub parameters: Vec<CommandLineParameter>,
}

/// One `key=` of a command-line option: its name and QEMU's `CommandLineParameterType` (`string`, `boolean`,
/// `number`, `size`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandLineParameter {
    pub name: String,
    pub type_name: &'static str,
}

/// One entry of `query-chardev`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChardevInfo {
    pub label: String,
    pub filename: String,
    pub frontend_open: bool,
}

/// One QOM property as `qom-list` shows it and `qom-get` reads it.
#[derive(Clone, Debug, PartialEq)]
pub struct QomProperty {
    pub name: String,
    /// QOM type of the property: `string`, `bool`, `int`, `child<container>`, `link<...>`...
    pub type_name: String,
    /// What `qom-get` returns; `None` if the property cannot be read. For `child<>`/`link<>` properties QEMU
    /// returns the target's canonical path as a string.
    pub value: Option<Value>,
}

/// One QOM object: its type and its properties in the order `qom-list` shows them.
#[derive(Clone, Debug, PartialEq)]
pub struct QomObject {
    pub type_name: String,
    pub properties: Vec<QomProperty>,
}

/// One disk (a virtio-blk device on a raw or qcow2 image), for `query-block` and `query-blockstats`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockDevice {
    /// The block backend's name (`BlockInfo.device`), e.g. `virtio0`.
    pub device: String,
    /// The QOM path of the device model using it; `None` (omitted) when the QOM tree has no such object.
    pub qdev: Option<String>,
    /// The name of the image's node in the block graph.
    pub node_name: String,
    /// The image file as given on the command line.
    pub file: String,
    pub read_only: bool,
    /// Opened with O_DIRECT (`cache.direct`).
    pub direct: bool,
    /// Bytes the guest sees.
    pub virtual_size: u64,
    /// Bytes the image occupies on the host (allocated blocks); `None` (omitted) if it could not be read.
    pub actual_size: Option<u64>,
    /// The image format (`raw`, `qcow2`): QMP's `drv` and `image.format`.
    pub format: String,
    /// qcow2's cluster size.
    pub cluster_size: Option<u64>,
    /// The backing file the image names, and the chain below it.
    pub backing: Option<Box<BlockBacking>>,
    pub stats: BlockDeviceStats,
}

/// A backing image, as QEMU's `ImageInfo` describes it below the image that names it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockBacking {
    /// The name stored in the image above (`backing-filename`, `backing_file`).
    pub name: String,
    /// The format the image above records for it (`backing-filename-format`), if any.
    pub recorded_format: Option<String>,
    /// The path opened (`full-backing-filename`, and this image's `filename`).
    pub filename: String,
    pub format: String,
    pub virtual_size: u64,
    pub actual_size: Option<u64>,
    pub cluster_size: Option<u64>,
    pub backing: Option<Box<BlockBacking>>,
}

/// One PCI function, for `query-pci`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PciDevice {
    pub bus: u8,
    pub slot: u8,
    pub function: u8,
    /// Base class and sub-class (the top 16 bits of the 24-bit class code), as QEMU reports `class_info.class`.
    pub class: u16,
    pub vendor_id: u16,
    pub device_id: u16,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
    /// The interrupt line the guest programmed, for a function with an interrupt pin.
    pub irq: Option<u8>,
    /// INTA# = 1 ... INTD# = 4; 0: no legacy interrupt.
    pub irq_pin: u8,
    /// The `id=` the device was given on the command line, or empty.
    pub qdev_id: String,
    pub regions: Vec<PciRegion>,
}

/// One implemented base address register of a PCI function.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PciRegion {
    pub bar: u8,
    pub io: bool,
    /// Where the guest mapped it; `None` while decoding is off or the BAR is unassigned (QEMU reports -1).
    pub address: Option<u64>,
    pub size: u64,
    pub prefetchable: bool,
    pub is_64bit: bool,
}

/// QEMU's `BlockDeviceStats` counters, with QEMU's meanings (write-zeroes counts as a write, discard as unmap).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockDeviceStats {
    pub rd_bytes: u64,
    pub wr_bytes: u64,
    pub unmap_bytes: u64,
    pub rd_operations: u64,
    pub wr_operations: u64,
    pub flush_operations: u64,
    pub unmap_operations: u64,
    pub rd_total_time_ns: u64,
    pub wr_total_time_ns: u64,
    pub flush_total_time_ns: u64,
    pub unmap_total_time_ns: u64,
    pub wr_highest_offset: u64,
    pub failed_rd_operations: u64,
    pub failed_wr_operations: u64,
    pub failed_flush_operations: u64,
    pub failed_unmap_operations: u64,
    pub invalid_rd_operations: u64,
    pub invalid_wr_operations: u64,
    pub invalid_flush_operations: u64,
    pub invalid_unmap_operations: u64,
}

/// The VM as QMP sees it. Implemented by `vmm`; the `qmp` crate never knows how the VM is built.
///
/// Command methods (`stop`, `cont`, ...) run synchronously inside [`crate::Session::feed`]. Each pushes the events
/// it raised onto `events` (timestamped with the VMM's clock at the moment they happened); the session writes them
/// to its own connection *before* the reply, as QEMU does. The implementation is also responsible for delivering
/// the same events to every *other* connected, negotiated session (through [`crate::Session::event_bytes`]); the
/// issuing session gets them only through `events`.
pub trait Machine {
    /// Current run state (`query-status`, `info status`).
    fn run_state(&self) -> RunState;

    /// `stop`: if the VM is running, pause every vCPU, enter `paused` and push `STOP`. In any other state do
    /// nothing and push nothing (QEMU: `stop` in `prelaunch` stays in `prelaunch`, `stop` when paused is silent).
    fn stop(&mut self, events: &mut Vec<Event>) -> Result<(), QmpError>;

    /// `cont`: if not running, start or resume the vCPUs, enter `running` and push `RESUME`; if running, do
    /// nothing. The session has already refused `cont` in states that need a reset.
    fn cont(&mut self, events: &mut Vec<Event>) -> Result<(), QmpError>;

    /// `system_reset`: reset the VM and push `RESET {guest: false, reason: host-qmp-system-reset}`.
    fn system_reset(&mut self, events: &mut Vec<Event>) -> Result<(), QmpError>;

    /// `system_powerdown`: press the ACPI power button and push `POWERDOWN`.
    fn system_powerdown(&mut self, events: &mut Vec<Event>) -> Result<(), QmpError>;

    /// `quit`: push `SHUTDOWN {guest: false, reason: host-qmp-quit}` and arrange for the process to exit once the
    /// reply bytes returned by `feed` have been written.
    fn quit(&mut self, events: &mut Vec<Event>) -> Result<(), QmpError>;

    /// vCPUs in cpu-index order.
    fn cpus(&self) -> Vec<CpuInfo>;

    /// `-name`.
    fn name(&self) -> Option<String>;

    /// `-uuid`; QEMU reports all zeros when none was given.
    fn uuid(&self) -> [u8; 16];

    /// Guest RAM in bytes given at start-up (`base-memory`).
    fn memory_size(&self) -> u64;

    /// Hot-plugged RAM in bytes; `None` when the machine cannot hot-plug memory (the member is then omitted).
    fn plugged_memory(&self) -> Option<u64>;

    fn chardevs(&self) -> Vec<ChardevInfo>;

    fn target(&self) -> Target;

    /// `query-kvm`: (enabled, present).
    fn kvm(&self) -> (bool, bool);

    /// Machine types this binary can build (`query-machines`).
    fn machines(&self) -> Vec<MachineInfo>;

    /// Every QOM type the binary can create, and their abstract parents (`qom-list-types`).
    fn qom_types(&self) -> Vec<QomType>;

    /// The properties of QOM type `type_name`, or `None` if the binary has no such type (`device-list-properties`,
    /// `qom-list-properties`).
    fn type_properties(&self, type_name: &str) -> Option<Vec<TypeProperty>>;

    /// The CPU models `-cpu` takes (`query-cpu-definitions`).
    fn cpu_definitions(&self) -> Vec<CpuDefinition>;

    /// `query-cpu-model-expansion`: `model` with its properties applied, expanded as `expansion` asks; an unknown
    /// model or property is an error.
    fn expand_cpu_model(&self, expansion: CpuModelExpansionType, model: &CpuModel) -> Result<CpuModel, QmpError>;

    /// The command-line options with parameters the binary takes (`query-command-line-options`).
    fn command_line_options(&self) -> Vec<CommandLineOption>;

    /// Resolves a QOM path (`/machine`, `/machine/unattached/device[0]`...) to an object, or `None`.
    fn qom_object(&self, path: &str) -> Option<QomObject>;

    /// The disks, in the order the guest sees them (`query-block`, `query-blockstats`), with their counters now.
    fn block_devices(&self) -> Vec<BlockDevice>;

    /// Every PCI function, by bus, slot and function (`query-pci`); empty on a machine without PCI.
    fn pci_devices(&self) -> Vec<PciDevice>;

    /// `migrate`: save the VM to `channel` (QEMU's non-live save: the vCPUs stop for the copy), pushing
    /// `MIGRATION` events (`setup`, `active`, then `completed` or `failed`; only while the `events` capability is
    /// on) and `STOP`/`RESUME` as the run state changes. A failure to write is not an error reply (QEMU reports
    /// it through the events and `query-migrate`); a channel the VMM cannot use, or a migration in a state that
    /// forbids one, is. A passed descriptor is closed once the save is over.
    fn migrate(&mut self, channel: MigrationChannel, events: &mut Vec<Event>) -> Result<(), QmpError>;

    /// `migrate-incoming`: on a machine started with `-incoming defer`, load the VM from `channel`; a machine
    /// started otherwise refuses.
    fn migrate_incoming(&mut self, channel: MigrationChannel, events: &mut Vec<Event>) -> Result<(), QmpError>;

    /// The last migration, for `query-migrate`; `None` before the first (QEMU then answers `{}`).
    fn migration(&self) -> Option<MigrationInfo>;

    /// `query-migrate-capabilities`.
    fn migration_capabilities(&self) -> MigrationCapabilities;

    /// `migrate-set-capabilities`, all or nothing.
    fn set_migration_capabilities(&mut self, capabilities: MigrationCapabilities) -> Result<(), QmpError>;

    /// `balloon`: ask the guest to shrink or grow to `target` bytes (QEMU: a target above guest RAM means all of
    /// it). The session has checked that `target` is positive. A machine without a balloon answers
    /// [`QmpError::no_balloon`].
    fn balloon(&mut self, _target: u64) -> Result<(), QmpError> {
        Err(QmpError::no_balloon())
    }

    /// `query-balloon`: the memory the guest has, in bytes (guest RAM less its balloon).
    fn balloon_actual(&self) -> Result<u64, QmpError> {
        Err(QmpError::no_balloon())
    }

    /// `qom-set` of `property` on the object at `path`, which [`qom_object`](Self::qom_object) resolved and lists
    /// the property: `value` as the client sent it. A property that cannot be written answers QEMU's permission
    /// error (the default).
    fn qom_set(&mut self, _path: &str, _property: &str, _value: &Value) -> Result<(), QmpError> {
        Err(QmpError::permission_denied())
    }
}

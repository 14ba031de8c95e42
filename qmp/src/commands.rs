//! The command table: every command Kestrel implements is defined once here (name, argument type, return type,
//! handler). The dispatcher, `query-commands` and `query-qmp-schema` are all generated from it.

use serde_json::{json, Map, Value};

use crate::fds::{MigrationChannel, PassedFds};
use crate::machine::{
    BlockBacking, BlockDevice, BlockDeviceStats, CpuInfo, CpuModel, CpuModelExpansionType, CpuProps, ErrorClass, Event,
    EventKind, Machine, MigrationCapability, MigrationInfo, MigrationStatus, PciDevice, PciRegion, QmpError, QomType,
    RunState, ShutdownCause, Target, TypeProperty,
};
use crate::schema::{opt, req, ObjectType, SchemaBuilder, Type};
use crate::session::ServerInfo;

/// What a handler may use.
pub(crate) struct Ctx<'a> {
    pub machine: &'a mut dyn Machine,
    pub events: &'a mut Vec<Event>,
    pub info: &'a ServerInfo,
    /// Whether capabilities negotiation is over; `qmp_capabilities` ends it.
    pub negotiated: &'a mut bool,
    /// The connection's passed descriptors (`getfd`, `fd:NAME`).
    pub fds: &'a mut PassedFds,
}

type Handler = fn(&Map<String, Value>, &mut Ctx) -> Result<Value, QmpError>;

/// One QMP command.
pub struct Command {
    pub name: &'static str,
    /// Always an object type (`T_EMPTY` for commands without arguments).
    pub args: &'static Type,
    pub ret: &'static Type,
    pub(crate) handler: Handler,
}

/// One QMP event and the type of its `data` (`T_EMPTY`: the event has no `data` member).
pub struct EventDef {
    pub name: &'static str,
    pub data: &'static Type,
}

// ---- types (QEMU's QAPI definitions, reduced to the members Kestrel fills or accepts) ----

static STR: Type = Type::Str;
static INT: Type = Type::Int;
static BOOL: Type = Type::Bool;
static ANY: Type = Type::Any;

static EMPTY: ObjectType = ObjectType { members: &[], tag: None };
pub(crate) static T_EMPTY: Type = Type::Object(&EMPTY);

static QMP_CAPABILITY: Type = Type::Enum(&["oob"]);
static QMP_CAPABILITY_LIST: Type = Type::Array(&QMP_CAPABILITY);
static QMP_CAPABILITIES_ARGS: Type =
    Type::Object(&ObjectType { members: &[opt("enable", &QMP_CAPABILITY_LIST)], tag: None });

static VERSION_TRIPLE: Type =
    Type::Object(&ObjectType { members: &[req("major", &INT), req("minor", &INT), req("micro", &INT)], tag: None });
static VERSION_INFO: Type =
    Type::Object(&ObjectType { members: &[req("qemu", &VERSION_TRIPLE), req("package", &STR)], tag: None });

static COMMAND_INFO: Type = Type::Object(&ObjectType { members: &[req("name", &STR)], tag: None });
static COMMAND_INFO_LIST: Type = Type::Array(&COMMAND_INFO);

/// SchemaInfo is described as an object with the common members; its per-meta-type variants are not spelled out.
static META_TYPE: Type = Type::Enum(&["builtin", "enum", "array", "object", "alternate", "command", "event"]);
static STR_LIST: Type = Type::Array(&STR);
static SCHEMA_INFO: Type = Type::Object(&ObjectType {
    members: &[req("name", &STR), req("meta-type", &META_TYPE), opt("features", &STR_LIST)],
    tag: None,
});
static SCHEMA_INFO_LIST: Type = Type::Array(&SCHEMA_INFO);

static RUN_STATE: Type = Type::Enum(RunState::NAMES);
static STATUS_INFO: Type = Type::Object(&ObjectType {
    members: &[req("running", &BOOL), req("singlestep", &BOOL), req("status", &RUN_STATE)],
    tag: None,
});

static TARGET: Type = Type::Enum(Target::NAMES);
static CPU_PROPS: Type = Type::Object(&ObjectType {
    members: &[
        opt("node-id", &INT),
        opt("socket-id", &INT),
        opt("die-id", &INT),
        opt("cluster-id", &INT),
        opt("core-id", &INT),
        opt("thread-id", &INT),
    ],
    tag: None,
});
static CPU_INFO_FAST: Type = Type::Object(&ObjectType {
    members: &[
        req("cpu-index", &INT),
        req("qom-path", &STR),
        req("thread-id", &INT),
        opt("props", &CPU_PROPS),
        req("target", &TARGET),
    ],
    tag: Some("target"),
});
static CPU_INFO_FAST_LIST: Type = Type::Array(&CPU_INFO_FAST);
static HOTPLUGGABLE_CPU: Type = Type::Object(&ObjectType {
    members: &[req("type", &STR), req("vcpus-count", &INT), req("props", &CPU_PROPS), opt("qom-path", &STR)],
    tag: None,
});
static HOTPLUGGABLE_CPU_LIST: Type = Type::Array(&HOTPLUGGABLE_CPU);

static KVM_INFO: Type =
    Type::Object(&ObjectType { members: &[req("enabled", &BOOL), req("present", &BOOL)], tag: None });
static NAME_INFO: Type = Type::Object(&ObjectType { members: &[opt("name", &STR)], tag: None });
static UUID_INFO: Type = Type::Object(&ObjectType { members: &[req("UUID", &STR)], tag: None });
static TARGET_INFO: Type = Type::Object(&ObjectType { members: &[req("arch", &TARGET)], tag: None });
static MACHINE_INFO: Type = Type::Object(&ObjectType {
    members: &[
        req("name", &STR),
        opt("alias", &STR),
        opt("is-default", &BOOL),
        req("cpu-max", &INT),
        req("hotpluggable-cpus", &BOOL),
        req("numa-mem-supported", &BOOL),
        req("deprecated", &BOOL),
        opt("default-cpu-type", &STR),
        opt("default-ram-id", &STR),
    ],
    tag: None,
});
static MACHINE_INFO_LIST: Type = Type::Array(&MACHINE_INFO);
static MEMORY_INFO: Type =
    Type::Object(&ObjectType { members: &[req("base-memory", &INT), opt("plugged-memory", &INT)], tag: None });
static CHARDEV_INFO: Type = Type::Object(&ObjectType {
    members: &[req("label", &STR), req("filename", &STR), req("frontend-open", &BOOL)],
    tag: None,
});
static CHARDEV_INFO_LIST: Type = Type::Array(&CHARDEV_INFO);
// QEMU 7.2's JobInfo, for `query-jobs`' schema (Kestrel runs no jobs: saves and restores are not jobs in QEMU either).
static JOB_TYPE: Type = Type::Enum(&["commit", "stream", "mirror", "backup", "create", "amend", "snapshot-load"]);
static JOB_STATUS: Type = Type::Enum(&[
    "undefined",
    "created",
    "running",
    "paused",
    "ready",
    "standby",
    "waiting",
    "pending",
    "aborting",
    "concluded",
    "null",
]);
static JOB_INFO: Type = Type::Object(&ObjectType {
    members: &[
        req("id", &STR),
        req("type", &JOB_TYPE),
        req("status", &JOB_STATUS),
        req("current-progress", &INT),
        req("total-progress", &INT),
        opt("error", &STR),
    ],
    tag: None,
});
static JOB_INFO_LIST: Type = Type::Array(&JOB_INFO);

static NUMBER: Type = Type::Number;
static BLOCK_DEVICE_IO_STATUS: Type = Type::Enum(&["ok", "failed", "nospace"]);
static DETECT_ZEROES: Type = Type::Enum(&["off", "on", "unmap"]);
static BLOCKDEV_CACHE_INFO: Type = Type::Object(&ObjectType {
    members: &[req("writeback", &BOOL), req("direct", &BOOL), req("no-flush", &BOOL)],
    tag: None,
});
/// QEMU 7.2's `ImageInfo`, less what Kestrel never reports (snapshots, encryption, format-specific data).
static IMAGE_INFO: Type = Type::Object(&ObjectType {
    members: &[
        req("filename", &STR),
        req("format", &STR),
        opt("dirty-flag", &BOOL),
        opt("actual-size", &INT),
        req("virtual-size", &INT),
        opt("cluster-size", &INT),
        opt("backing-filename", &STR),
        opt("full-backing-filename", &STR),
        opt("backing-filename-format", &STR),
        opt("backing-image", &IMAGE_INFO),
    ],
    tag: None,
});
static BLOCK_DEVICE_INFO: Type = Type::Object(&ObjectType {
    members: &[
        req("file", &STR),
        opt("node-name", &STR),
        req("ro", &BOOL),
        req("drv", &STR),
        opt("backing_file", &STR),
        req("backing_file_depth", &INT),
        req("encrypted", &BOOL),
        req("detect_zeroes", &DETECT_ZEROES),
        req("bps", &INT),
        req("bps_rd", &INT),
        req("bps_wr", &INT),
        req("iops", &INT),
        req("iops_rd", &INT),
        req("iops_wr", &INT),
        req("image", &IMAGE_INFO),
        req("cache", &BLOCKDEV_CACHE_INFO),
        req("write_threshold", &INT),
    ],
    tag: None,
});
static BLOCK_INFO: Type = Type::Object(&ObjectType {
    members: &[
        req("device", &STR),
        opt("qdev", &STR),
        req("type", &STR),
        req("removable", &BOOL),
        req("locked", &BOOL),
        opt("inserted", &BLOCK_DEVICE_INFO),
        opt("io-status", &BLOCK_DEVICE_IO_STATUS),
    ],
    tag: None,
});
static BLOCK_INFO_LIST: Type = Type::Array(&BLOCK_INFO);
static BLOCK_DEVICE_INFO_LIST: Type = Type::Array(&BLOCK_DEVICE_INFO);
static QUERY_NAMED_BLOCK_NODES_ARGS: Type = Type::Object(&ObjectType { members: &[opt("flat", &BOOL)], tag: None });
static BLOCK_DEVICE_TIMED_STATS: Type = Type::Object(&ObjectType {
    members: &[
        req("interval_length", &INT),
        req("min_rd_latency_ns", &INT),
        req("max_rd_latency_ns", &INT),
        req("avg_rd_latency_ns", &INT),
        req("min_wr_latency_ns", &INT),
        req("max_wr_latency_ns", &INT),
        req("avg_wr_latency_ns", &INT),
        req("min_flush_latency_ns", &INT),
        req("max_flush_latency_ns", &INT),
        req("avg_flush_latency_ns", &INT),
        req("avg_rd_queue_depth", &NUMBER),
        req("avg_wr_queue_depth", &NUMBER),
    ],
    tag: None,
});
static BLOCK_DEVICE_TIMED_STATS_LIST: Type = Type::Array(&BLOCK_DEVICE_TIMED_STATS);
/// QEMU 7.2's `BlockDeviceStats` (before 8.1 added the zone-append members), without the latency histograms.
static BLOCK_DEVICE_STATS: Type = Type::Object(&ObjectType {
    members: &[
        req("rd_bytes", &INT),
        req("wr_bytes", &INT),
        req("unmap_bytes", &INT),
        req("rd_operations", &INT),
        req("wr_operations", &INT),
        req("flush_operations", &INT),
        req("unmap_operations", &INT),
        req("rd_total_time_ns", &INT),
        req("wr_total_time_ns", &INT),
        req("flush_total_time_ns", &INT),
        req("unmap_total_time_ns", &INT),
        req("wr_highest_offset", &INT),
        req("rd_merged", &INT),
        req("wr_merged", &INT),
        req("unmap_merged", &INT),
        opt("idle_time_ns", &INT),
        req("failed_rd_operations", &INT),
        req("failed_wr_operations", &INT),
        req("failed_flush_operations", &INT),
        req("failed_unmap_operations", &INT),
        req("invalid_rd_operations", &INT),
        req("invalid_wr_operations", &INT),
        req("invalid_flush_operations", &INT),
        req("invalid_unmap_operations", &INT),
        req("account_invalid", &BOOL),
        req("account_failed", &BOOL),
        req("timed_stats", &BLOCK_DEVICE_TIMED_STATS_LIST),
    ],
    tag: None,
});
static BLOCK_STATS: Type = Type::Object(&ObjectType {
    members: &[opt("device", &STR), opt("qdev", &STR), opt("node-name", &STR), req("stats", &BLOCK_DEVICE_STATS)],
    tag: None,
});
static BLOCK_STATS_LIST: Type = Type::Array(&BLOCK_STATS);
static QUERY_BLOCKSTATS_ARGS: Type = Type::Object(&ObjectType { members: &[opt("query-nodes", &BOOL)], tag: None });

static PCI_MEMORY_RANGE: Type =
    Type::Object(&ObjectType { members: &[req("base", &INT), req("limit", &INT)], tag: None });
static PCI_MEMORY_REGION: Type = Type::Object(&ObjectType {
    members: &[
        req("bar", &INT),
        req("type", &STR),
        req("address", &INT),
        req("size", &INT),
        opt("prefetch", &BOOL),
        opt("mem_type_64", &BOOL),
    ],
    tag: None,
});
static PCI_MEMORY_REGION_LIST: Type = Type::Array(&PCI_MEMORY_REGION);
static PCI_BUS_INFO: Type = Type::Object(&ObjectType {
    members: &[
        req("number", &INT),
        req("secondary", &INT),
        req("subordinate", &INT),
        req("io_range", &PCI_MEMORY_RANGE),
        req("memory_range", &PCI_MEMORY_RANGE),
        req("prefetchable_range", &PCI_MEMORY_RANGE),
    ],
    tag: None,
});
/// `PciBridgeInfo.devices` is a list of `PciDeviceInfo`, which contains `PciBridgeInfo`: a recursive type the
/// static schema cannot spell; Kestrel has no PCI bridges, so the list is described as `any`.
static PCI_BRIDGE_INFO: Type =
    Type::Object(&ObjectType { members: &[req("bus", &PCI_BUS_INFO), opt("devices", &ANY)], tag: None });
static PCI_DEVICE_CLASS: Type =
    Type::Object(&ObjectType { members: &[opt("desc", &STR), req("class", &INT)], tag: None });
static PCI_DEVICE_ID: Type = Type::Object(&ObjectType {
    members: &[req("device", &INT), req("vendor", &INT), opt("subsystem", &INT), opt("subsystem-vendor", &INT)],
    tag: None,
});
static PCI_DEVICE_INFO: Type = Type::Object(&ObjectType {
    members: &[
        req("bus", &INT),
        req("slot", &INT),
        req("function", &INT),
        req("class_info", &PCI_DEVICE_CLASS),
        req("id", &PCI_DEVICE_ID),
        opt("irq", &INT),
        req("irq_pin", &INT),
        req("qdev_id", &STR),
        opt("pci_bridge", &PCI_BRIDGE_INFO),
        req("regions", &PCI_MEMORY_REGION_LIST),
    ],
    tag: None,
});
static PCI_DEVICE_INFO_LIST: Type = Type::Array(&PCI_DEVICE_INFO);
static PCI_INFO: Type =
    Type::Object(&ObjectType { members: &[req("bus", &INT), req("devices", &PCI_DEVICE_INFO_LIST)], tag: None });
static PCI_INFO_LIST: Type = Type::Array(&PCI_INFO);

static HMP_ARGS: Type =
    Type::Object(&ObjectType { members: &[req("command-line", &STR), opt("cpu-index", &INT)], tag: None });
static QOM_LIST_ARGS: Type = Type::Object(&ObjectType { members: &[req("path", &STR)], tag: None });
static QOM_GET_ARGS: Type =
    Type::Object(&ObjectType { members: &[req("path", &STR), req("property", &STR)], tag: None });
static OBJECT_PROPERTY_INFO: Type = Type::Object(&ObjectType {
    members: &[req("name", &STR), req("type", &STR), opt("description", &STR), opt("default-value", &ANY)],
    tag: None,
});
static OBJECT_PROPERTY_INFO_LIST: Type = Type::Array(&OBJECT_PROPERTY_INFO);

static QOM_LIST_TYPES_ARGS: Type =
    Type::Object(&ObjectType { members: &[opt("implements", &STR), opt("abstract", &BOOL)], tag: None });
static OBJECT_TYPE_INFO: Type =
    Type::Object(&ObjectType { members: &[req("name", &STR), opt("abstract", &BOOL), opt("parent", &STR)], tag: None });
static OBJECT_TYPE_INFO_LIST: Type = Type::Array(&OBJECT_TYPE_INFO);
static TYPENAME_ARGS: Type = Type::Object(&ObjectType { members: &[req("typename", &STR)], tag: None });
static CPU_DEFINITION_INFO: Type = Type::Object(&ObjectType {
    members: &[
        req("name", &STR),
        opt("migration-safe", &BOOL),
        req("static", &BOOL),
        opt("unavailable-features", &STR_LIST),
        req("typename", &STR),
        opt("alias-of", &STR),
        req("deprecated", &BOOL),
    ],
    tag: None,
});
static CPU_DEFINITION_INFO_LIST: Type = Type::Array(&CPU_DEFINITION_INFO);
static CPU_MODEL_EXPANSION_TYPE: Type = Type::Enum(CpuModelExpansionType::NAMES);
static CPU_MODEL_INFO: Type =
    Type::Object(&ObjectType { members: &[req("name", &STR), opt("props", &ANY)], tag: None });
static CPU_MODEL_EXPANSION_ARGS: Type = Type::Object(&ObjectType {
    members: &[req("type", &CPU_MODEL_EXPANSION_TYPE), req("model", &CPU_MODEL_INFO)],
    tag: None,
});
static CPU_MODEL_EXPANSION_INFO: Type =
    Type::Object(&ObjectType { members: &[req("model", &CPU_MODEL_INFO)], tag: None });
static COMMAND_LINE_OPTIONS_ARGS: Type = Type::Object(&ObjectType { members: &[opt("option", &STR)], tag: None });
static COMMAND_LINE_PARAMETER_TYPE: Type = Type::Enum(&["string", "boolean", "number", "size"]);
static COMMAND_LINE_PARAMETER_INFO: Type = Type::Object(&ObjectType {
    members: &[req("name", &STR), req("type", &COMMAND_LINE_PARAMETER_TYPE), opt("help", &STR), opt("default", &STR)],
    tag: None,
});
static COMMAND_LINE_PARAMETER_INFO_LIST: Type = Type::Array(&COMMAND_LINE_PARAMETER_INFO);
static COMMAND_LINE_OPTION_INFO: Type = Type::Object(&ObjectType {
    members: &[req("option", &STR), req("parameters", &COMMAND_LINE_PARAMETER_INFO_LIST)],
    tag: None,
});
static COMMAND_LINE_OPTION_INFO_LIST: Type = Type::Array(&COMMAND_LINE_OPTION_INFO);

static SHUTDOWN_CAUSE: Type = Type::Enum(ShutdownCause::NAMES);
static SHUTDOWN_DATA: Type =
    Type::Object(&ObjectType { members: &[req("guest", &BOOL), req("reason", &SHUTDOWN_CAUSE)], tag: None });
static RESET_DATA: Type =
    Type::Object(&ObjectType { members: &[req("guest", &BOOL), req("reason", &SHUTDOWN_CAUSE)], tag: None });

/// QEMU 7.2's `migrate` arguments that Kestrel takes: the URI, and `detach`, which QEMU ignores too (every
/// migration runs detached from the monitor). `blk`, `inc` and `resume` are not offered: Kestrel copies no disks
/// and has no postcopy to resume.
static MIGRATE_ARGS: Type = Type::Object(&ObjectType { members: &[req("uri", &STR), opt("detach", &BOOL)], tag: None });
static MIGRATE_INCOMING_ARGS: Type = Type::Object(&ObjectType { members: &[req("uri", &STR)], tag: None });
static FDNAME_ARGS: Type = Type::Object(&ObjectType { members: &[req("fdname", &STR)], tag: None });
static MIGRATION_CAPABILITY: Type = Type::Enum(MigrationCapability::NAMES);
static MIGRATION_CAPABILITY_STATUS: Type =
    Type::Object(&ObjectType { members: &[req("capability", &MIGRATION_CAPABILITY), req("state", &BOOL)], tag: None });
static MIGRATION_CAPABILITY_STATUS_LIST: Type = Type::Array(&MIGRATION_CAPABILITY_STATUS);
static MIGRATE_SET_CAPABILITIES_ARGS: Type =
    Type::Object(&ObjectType { members: &[req("capabilities", &MIGRATION_CAPABILITY_STATUS_LIST)], tag: None });
static MIGRATION_STATUS: Type = Type::Enum(MigrationStatus::NAMES);
static MIGRATION_STATS: Type = Type::Object(&ObjectType {
    members: &[
        req("transferred", &INT),
        req("remaining", &INT),
        req("total", &INT),
        req("duplicate", &INT),
        req("skipped", &INT),
        req("normal", &INT),
        req("normal-bytes", &INT),
        req("dirty-pages-rate", &INT),
        req("mbps", &NUMBER),
        req("dirty-sync-count", &INT),
        req("postcopy-requests", &INT),
        req("page-size", &INT),
        req("multifd-bytes", &INT),
        req("pages-per-second", &INT),
        req("precopy-bytes", &INT),
        req("downtime-bytes", &INT),
        req("postcopy-bytes", &INT),
        req("dirty-sync-missed-zero-copy", &INT),
    ],
    tag: None,
});
/// QEMU 7.2's `MigrationInfo`, reduced to the members a one-pass save to a file fills.
static MIGRATION_INFO: Type = Type::Object(&ObjectType {
    members: &[
        opt("status", &MIGRATION_STATUS),
        opt("ram", &MIGRATION_STATS),
        opt("total-time", &INT),
        opt("downtime", &INT),
        opt("setup-time", &INT),
        opt("error-desc", &STR),
    ],
    tag: None,
});
static BALLOON_ARGS: Type = Type::Object(&ObjectType { members: &[req("value", &INT)], tag: None });
static BALLOON_INFO: Type = Type::Object(&ObjectType { members: &[req("actual", &INT)], tag: None });
static BALLOON_CHANGE_DATA: Type = Type::Object(&ObjectType { members: &[req("actual", &INT)], tag: None });
static QOM_SET_ARGS: Type =
    Type::Object(&ObjectType { members: &[req("path", &STR), req("property", &STR), req("value", &ANY)], tag: None });
static MIGRATION_DATA: Type = Type::Object(&ObjectType { members: &[req("status", &MIGRATION_STATUS)], tag: None });

macro_rules! cmd {
    ($name:literal, $args:expr, $ret:expr, $handler:expr) => {
        Command { name: $name, args: &$args, ret: &$ret, handler: $handler }
    };
}

/// Every command, once. Order is the order of `query-qmp-schema`; `query-commands` lists them in reverse, as QEMU
/// (which prepends while walking its registration list) does.
pub static COMMANDS: &[Command] = &[
    cmd!("qmp_capabilities", QMP_CAPABILITIES_ARGS, T_EMPTY, qmp_capabilities),
    cmd!("query-version", T_EMPTY, VERSION_INFO, query_version),
    cmd!("query-commands", T_EMPTY, COMMAND_INFO_LIST, query_commands),
    cmd!("query-qmp-schema", T_EMPTY, SCHEMA_INFO_LIST, query_qmp_schema),
    cmd!("query-status", T_EMPTY, STATUS_INFO, query_status),
    cmd!("stop", T_EMPTY, T_EMPTY, |_, c| c.machine.stop(c.events).map(|()| json!({}))),
    cmd!("cont", T_EMPTY, T_EMPTY, cont),
    cmd!("system_reset", T_EMPTY, T_EMPTY, |_, c| c.machine.system_reset(c.events).map(|()| json!({}))),
    cmd!("system_powerdown", T_EMPTY, T_EMPTY, |_, c| c.machine.system_powerdown(c.events).map(|()| json!({}))),
    cmd!("quit", T_EMPTY, T_EMPTY, |_, c| c.machine.quit(c.events).map(|()| json!({}))),
    cmd!("query-cpus-fast", T_EMPTY, CPU_INFO_FAST_LIST, query_cpus_fast),
    cmd!("query-hotpluggable-cpus", T_EMPTY, HOTPLUGGABLE_CPU_LIST, query_hotpluggable_cpus),
    cmd!("query-kvm", T_EMPTY, KVM_INFO, |_, c| {
        let (enabled, present) = c.machine.kvm();
        Ok(json!({"enabled": enabled, "present": present}))
    }),
    cmd!("query-name", T_EMPTY, NAME_INFO, |_, c| Ok(match c.machine.name() {
        Some(n) => json!({"name": n}),
        None => json!({}),
    })),
    cmd!("query-uuid", T_EMPTY, UUID_INFO, |_, c| Ok(json!({"UUID": format_uuid(&c.machine.uuid())}))),
    cmd!("query-target", T_EMPTY, TARGET_INFO, |_, c| Ok(json!({"arch": c.machine.target().as_str()}))),
    cmd!("query-machines", T_EMPTY, MACHINE_INFO_LIST, query_machines),
    cmd!("query-memory-size-summary", T_EMPTY, MEMORY_INFO, |_, c| {
        let mut m = Map::new();
        m.insert("base-memory".into(), json!(c.machine.memory_size()));
        if let Some(p) = c.machine.plugged_memory() {
            m.insert("plugged-memory".into(), json!(p));
        }
        Ok(Value::Object(m))
    }),
    cmd!("query-chardev", T_EMPTY, CHARDEV_INFO_LIST, |_, c| {
        let list = c.machine.chardevs().into_iter();
        Ok(list.map(|d| json!({"label": d.label, "filename": d.filename, "frontend-open": d.frontend_open})).collect())
    }),
    cmd!("human-monitor-command", HMP_ARGS, STR, human_monitor_command),
    cmd!("qom-list", QOM_LIST_ARGS, OBJECT_PROPERTY_INFO_LIST, qom_list),
    cmd!("qom-get", QOM_GET_ARGS, ANY, qom_get),
    cmd!("qom-set", QOM_SET_ARGS, T_EMPTY, qom_set),
    cmd!("qom-list-types", QOM_LIST_TYPES_ARGS, OBJECT_TYPE_INFO_LIST, qom_list_types),
    cmd!("device-list-properties", TYPENAME_ARGS, OBJECT_PROPERTY_INFO_LIST, device_list_properties),
    cmd!("qom-list-properties", TYPENAME_ARGS, OBJECT_PROPERTY_INFO_LIST, qom_list_properties),
    cmd!("query-cpu-definitions", T_EMPTY, CPU_DEFINITION_INFO_LIST, query_cpu_definitions),
    cmd!("query-cpu-model-expansion", CPU_MODEL_EXPANSION_ARGS, CPU_MODEL_EXPANSION_INFO, query_cpu_model_expansion),
    cmd!(
        "query-command-line-options",
        COMMAND_LINE_OPTIONS_ARGS,
        COMMAND_LINE_OPTION_INFO_LIST,
        query_command_line_options
    ),
    cmd!("query-block", T_EMPTY, BLOCK_INFO_LIST, |_, c| Ok(c
        .machine
        .block_devices()
        .iter()
        .map(block_info)
        .collect())),
    cmd!("query-blockstats", QUERY_BLOCKSTATS_ARGS, BLOCK_STATS_LIST, query_blockstats),
    // Block jobs and the like: Kestrel has none (libvirt asks when it reconnects to a running domain).
    cmd!("query-jobs", T_EMPTY, JOB_INFO_LIST, |_, _| Ok(json!([]))),
    // Each disk is one node (its image, raw), so the flat list and the tree are the same (libvirt asks for both).
    cmd!("query-named-block-nodes", QUERY_NAMED_BLOCK_NODES_ARGS, BLOCK_DEVICE_INFO_LIST, |_, c| Ok(c
        .machine
        .block_devices()
        .iter()
        .map(block_node)
        .collect())),
    cmd!("query-pci", T_EMPTY, PCI_INFO_LIST, |_, c| Ok(query_pci(&c.machine.pci_devices()))),
    cmd!("getfd", FDNAME_ARGS, T_EMPTY, |args, c| c.fds.getfd(str_arg(args, "fdname")).map(|()| json!({}))),
    cmd!("closefd", FDNAME_ARGS, T_EMPTY, |args, c| c.fds.closefd(str_arg(args, "fdname")).map(|()| json!({}))),
    cmd!("query-migrate-capabilities", T_EMPTY, MIGRATION_CAPABILITY_STATUS_LIST, |_, c| {
        let capabilities = c.machine.migration_capabilities();
        Ok(MigrationCapability::NAMES
            .iter()
            .filter_map(|name| MigrationCapability::from_name(name))
            .map(|cap| json!({"capability": cap.as_str(), "state": capabilities.get(cap)}))
            .collect())
    }),
    cmd!("migrate-set-capabilities", MIGRATE_SET_CAPABILITIES_ARGS, T_EMPTY, migrate_set_capabilities),
    cmd!("migrate", MIGRATE_ARGS, T_EMPTY, |args, c| {
        let channel = MigrationChannel::resolve(str_arg(args, "uri"), c.fds)?;
        c.machine.migrate(channel, c.events).map(|()| json!({}))
    }),
    cmd!("migrate-incoming", MIGRATE_INCOMING_ARGS, T_EMPTY, |args, c| {
        let channel = MigrationChannel::resolve(str_arg(args, "uri"), c.fds)?;
        c.machine.migrate_incoming(channel, c.events).map(|()| json!({}))
    }),
    cmd!("query-migrate", T_EMPTY, MIGRATION_INFO, |_, c| Ok(c
        .machine
        .migration()
        .map_or(json!({}), |m| migration_info(&m)))),
    cmd!("balloon", BALLOON_ARGS, T_EMPTY, balloon),
    cmd!("query-balloon", T_EMPTY, BALLOON_INFO, |_, c| Ok(json!({"actual": c.machine.balloon_actual()?}))),
];

/// Every event Kestrel emits.
pub static EVENTS: &[EventDef] = &[
    EventDef { name: "SHUTDOWN", data: &SHUTDOWN_DATA },
    EventDef { name: "POWERDOWN", data: &T_EMPTY },
    EventDef { name: "RESET", data: &RESET_DATA },
    EventDef { name: "STOP", data: &T_EMPTY },
    EventDef { name: "RESUME", data: &T_EMPTY },
    EventDef { name: "MIGRATION", data: &MIGRATION_DATA },
    EventDef { name: "BALLOON_CHANGE", data: &BALLOON_CHANGE_DATA },
];

pub fn find(name: &str) -> Option<&'static Command> {
    COMMANDS.iter().find(|c| c.name == name)
}

/// The `data` member of an event, or `None` when it has none.
pub(crate) fn event_data(kind: &EventKind) -> Option<Value> {
    match kind {
        EventKind::Stop | EventKind::Resume | EventKind::Powerdown => None,
        EventKind::Reset { guest, reason } | EventKind::Shutdown { guest, reason } => {
            Some(json!({"guest": guest, "reason": reason.as_str()}))
        }
        EventKind::Migration { status } => Some(json!({"status": status.as_str()})),
        EventKind::BalloonChange { actual } => Some(json!({"actual": actual})),
    }
}

/// `query-migrate`'s answer, member for member as QEMU 7.2 fills it for an outgoing migration in that state: times
/// and RAM counters once completed, `error-desc` once failed.
fn migration_info(m: &MigrationInfo) -> Value {
    let mut info = Map::new();
    info.insert("status".into(), json!(m.status.as_str()));
    if m.incoming {
        return Value::Object(info);
    }
    if let Some(ram) = &m.ram {
        info.insert(
            "ram".into(),
            json!({
                "transferred": ram.transferred, "remaining": 0, "total": ram.total, "duplicate": ram.duplicate,
                "skipped": 0, "normal": ram.normal, "normal-bytes": ram.normal * ram.page_size,
                "dirty-pages-rate": 0, "mbps": ram.mbps, "dirty-sync-count": 1, "postcopy-requests": 0,
                "page-size": ram.page_size, "multifd-bytes": 0, "pages-per-second": ram.pages_per_second,
                "precopy-bytes": ram.transferred, "downtime-bytes": 0, "postcopy-bytes": 0,
                "dirty-sync-missed-zero-copy": 0,
            }),
        );
    }
    if m.status != MigrationStatus::Setup {
        info.insert("total-time".into(), json!(m.total_time_ms));
    }
    if let Some(downtime) = m.downtime_ms {
        info.insert("downtime".into(), json!(downtime));
    }
    if m.status != MigrationStatus::Setup {
        info.insert("setup-time".into(), json!(m.setup_time_ms));
    }
    if let Some(error) = &m.error {
        info.insert("error-desc".into(), json!(error));
    }
    Value::Object(info)
}

/// `query-qmp-schema`'s answer.
pub fn schema() -> Value {
    let mut b = SchemaBuilder::new();
    for c in COMMANDS {
        b.command(c.name, c.args, c.ret);
    }
    for e in EVENTS {
        b.event(e.name, e.data);
    }
    b.finish()
}

/// A string argument the schema check has already required.
fn str_arg<'a>(args: &'a Map<String, Value>, name: &str) -> &'a str {
    args.get(name).and_then(Value::as_str).unwrap_or_default()
}

/// `migrate-set-capabilities`: the schema check has refused capabilities Kestrel does not implement (the enum
/// holds only those it does), so every entry applies; all of them or, if the machine refuses, none.
fn migrate_set_capabilities(args: &Map<String, Value>, c: &mut Ctx) -> Result<Value, QmpError> {
    let mut capabilities = c.machine.migration_capabilities();
    for entry in args.get("capabilities").and_then(Value::as_array).into_iter().flatten() {
        let name = entry.get("capability").and_then(Value::as_str).unwrap_or_default();
        let state = entry.get("state").and_then(Value::as_bool).unwrap_or_default();
        let capability = MigrationCapability::from_name(name)
            .ok_or_else(|| QmpError::generic(format!("Kestrel has no migration capability '{name}'")))?;
        capabilities.set(capability, state);
    }
    c.machine.set_migration_capabilities(capabilities).map(|()| json!({}))
}

fn qmp_capabilities(args: &Map<String, Value>, c: &mut Ctx) -> Result<Value, QmpError> {
    if *c.negotiated {
        return Err(QmpError::new(
            crate::ErrorClass::CommandNotFound,
            "Capabilities negotiation is already complete, command ignored",
        ));
    }
    // Kestrel offers no capability (no out-of-band execution), so any requested one is unavailable.
    let requested: Vec<&str> = args
        .get("enable")
        .and_then(Value::as_array)
        .map(|l| l.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if !requested.is_empty() {
        return Err(QmpError::generic(format!("Capability {} not available", requested.join(", "))));
    }
    *c.negotiated = true;
    Ok(json!({}))
}

fn query_version(_: &Map<String, Value>, c: &mut Ctx) -> Result<Value, QmpError> {
    Ok(c.info.version_value())
}

fn query_commands(_: &Map<String, Value>, _: &mut Ctx) -> Result<Value, QmpError> {
    Ok(COMMANDS.iter().rev().map(|c| json!({"name": c.name})).collect())
}

fn query_qmp_schema(_: &Map<String, Value>, _: &mut Ctx) -> Result<Value, QmpError> {
    Ok(schema())
}

fn query_status(_: &Map<String, Value>, c: &mut Ctx) -> Result<Value, QmpError> {
    let state = c.machine.run_state();
    Ok(json!({"running": state == RunState::Running, "singlestep": false, "status": state.as_str()}))
}

fn cont(_: &Map<String, Value>, c: &mut Ctx) -> Result<Value, QmpError> {
    match c.machine.run_state() {
        s if s.needs_reset() => Err(QmpError::generic("Resetting the Virtual Machine is required")),
        RunState::Suspended => Ok(json!({})),
        RunState::FinishMigrate => Err(QmpError::generic("Migration is not finalized yet")),
        _ => c.machine.cont(c.events).map(|()| json!({})),
    }
}

fn props_value(p: &CpuProps) -> Value {
    let mut m = Map::new();
    for (k, v) in [
        ("node-id", p.node_id),
        ("socket-id", p.socket_id),
        ("die-id", p.die_id),
        ("cluster-id", p.cluster_id),
        ("core-id", p.core_id),
        ("thread-id", p.thread_id),
    ] {
        if let Some(v) = v {
            m.insert(k.into(), json!(v));
        }
    }
    Value::Object(m)
}

fn query_cpus_fast(_: &Map<String, Value>, c: &mut Ctx) -> Result<Value, QmpError> {
    let target = c.machine.target().as_str();
    let cpus = c.machine.cpus();
    Ok(cpus
        .iter()
        .map(|cpu: &CpuInfo| {
            json!({"cpu-index": cpu.cpu_index, "qom-path": cpu.qom_path, "thread-id": cpu.thread_id,
                   "props": props_value(&cpu.props), "target": target})
        })
        .collect())
}

fn query_hotpluggable_cpus(_: &Map<String, Value>, c: &mut Ctx) -> Result<Value, QmpError> {
    // QEMU lists the slots last to first. Kestrel has no hot-plug, so every slot is occupied.
    let cpus = c.machine.cpus();
    Ok(cpus
        .iter()
        .rev()
        .map(|cpu| {
            json!({"type": cpu.type_name, "vcpus-count": 1, "props": props_value(&cpu.props),
                   "qom-path": cpu.qom_path})
        })
        .collect())
}

fn query_machines(_: &Map<String, Value>, c: &mut Ctx) -> Result<Value, QmpError> {
    let list = c.machine.machines();
    Ok(list
        .into_iter()
        .map(|m| {
            let mut o = Map::new();
            o.insert("name".into(), json!(m.name));
            if let Some(a) = m.alias {
                o.insert("alias".into(), json!(a));
            }
            if m.is_default {
                o.insert("is-default".into(), json!(true));
            }
            o.insert("cpu-max".into(), json!(m.cpu_max));
            o.insert("hotpluggable-cpus".into(), json!(m.hotpluggable_cpus));
            o.insert("numa-mem-supported".into(), json!(m.numa_mem_supported));
            o.insert("deprecated".into(), json!(m.deprecated));
            if let Some(t) = m.default_cpu_type {
                o.insert("default-cpu-type".into(), json!(t));
            }
            if let Some(r) = m.default_ram_id {
                o.insert("default-ram-id".into(), json!(r));
            }
            Value::Object(o)
        })
        .collect())
}

/// QEMU's `ImageInfo` for one image of a chain: its own fields, then its backing file as it names it and, as
/// `backing-image`, the image below (recursively).
fn image_info(
    filename: &str,
    format: &str,
    virtual_size: u64,
    actual_size: Option<u64>,
    cluster_size: Option<u64>,
    backing: Option<&BlockBacking>,
) -> Map<String, Value> {
    let mut image = Map::new();
    image.insert("filename".into(), json!(filename));
    image.insert("format".into(), json!(format));
    if let Some(size) = actual_size {
        image.insert("actual-size".into(), json!(size));
    }
    image.insert("virtual-size".into(), json!(virtual_size));
    if let Some(size) = cluster_size {
        image.insert("cluster-size".into(), json!(size));
    }
    if let Some(b) = backing {
        image.insert("backing-filename".into(), json!(b.name));
        image.insert("full-backing-filename".into(), json!(b.filename));
        if let Some(format) = &b.recorded_format {
            image.insert("backing-filename-format".into(), json!(format));
        }
        let below =
            image_info(&b.filename, &b.format, b.virtual_size, b.actual_size, b.cluster_size, b.backing.as_deref());
        image.insert("backing-image".into(), Value::Object(below));
    }
    image
}

/// `BlockInfo` for a virtio-blk disk on a raw or qcow2 image: never removable, no throttling, no encryption; the
/// guest-visible write cache is on (the device offers FLUSH and a flush writes back and fsyncs), so `writeback`.
/// `BlockDeviceInfo`: the disk's image as a block node (`query-block`'s `inserted`, `query-named-block-nodes`),
/// with its backing chain as `backing_file` (the name the image stores), `backing_file_depth` and the image's
/// `backing-image`s. The backing images are not listed as nodes of their own.
fn block_node(d: &BlockDevice) -> Value {
    let format = if d.format.is_empty() { "raw" } else { d.format.as_str() };
    let backing = d.backing.as_deref();
    let mut image = image_info(&d.file, format, d.virtual_size, d.actual_size, d.cluster_size, backing);
    image.insert("dirty-flag".into(), json!(false));
    let depth = std::iter::successors(backing, |b| b.backing.as_deref()).count();
    let mut node = json!({
        "file": d.file, "node-name": d.node_name, "ro": d.read_only, "drv": format, "backing_file_depth": depth,
        "encrypted": false, "detect_zeroes": "off", "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0,
        "iops_wr": 0, "image": image, "cache": {"writeback": true, "direct": d.direct, "no-flush": false},
        "write_threshold": 0,
    });
    if let (Some(b), Some(node)) = (backing, node.as_object_mut()) {
        node.insert("backing_file".into(), json!(b.name));
    }
    node
}

fn block_info(d: &BlockDevice) -> Value {
    let inserted = block_node(d);
    let mut info = Map::new();
    info.insert("device".into(), json!(d.device));
    if let Some(qdev) = &d.qdev {
        info.insert("qdev".into(), json!(qdev));
    }
    info.insert("type".into(), json!("unknown"));
    info.insert("removable".into(), json!(false));
    info.insert("locked".into(), json!(false));
    info.insert("inserted".into(), inserted);
    // virtio-blk keeps an I/O status (QEMU enables it for werror/rerror); Kestrel never stops the VM on an I/O
    // error, it reports the error to the guest, so the status stays "ok".
    info.insert("io-status".into(), json!("ok"));
    Value::Object(info)
}

/// `BlockDeviceStats`: Kestrel merges no requests (`*_merged` 0), records no idle time (`idle_time_ns` omitted)
/// and keeps no timed intervals (`timed_stats` empty); invalid and failed requests are both accounted.
fn block_device_stats(s: &BlockDeviceStats) -> Value {
    json!({
        "rd_bytes": s.rd_bytes, "wr_bytes": s.wr_bytes, "unmap_bytes": s.unmap_bytes,
        "rd_operations": s.rd_operations, "wr_operations": s.wr_operations,
        "flush_operations": s.flush_operations, "unmap_operations": s.unmap_operations,
        "rd_total_time_ns": s.rd_total_time_ns, "wr_total_time_ns": s.wr_total_time_ns,
        "flush_total_time_ns": s.flush_total_time_ns, "unmap_total_time_ns": s.unmap_total_time_ns,
        "wr_highest_offset": s.wr_highest_offset, "rd_merged": 0, "wr_merged": 0, "unmap_merged": 0,
        "failed_rd_operations": s.failed_rd_operations, "failed_wr_operations": s.failed_wr_operations,
        "failed_flush_operations": s.failed_flush_operations, "failed_unmap_operations": s.failed_unmap_operations,
        "invalid_rd_operations": s.invalid_rd_operations, "invalid_wr_operations": s.invalid_wr_operations,
        "invalid_flush_operations": s.invalid_flush_operations,
        "invalid_unmap_operations": s.invalid_unmap_operations,
        "account_invalid": true, "account_failed": true, "timed_stats": [],
    })
}

/// One entry per disk. With `query-nodes` the entries name the node only (Kestrel has one node per disk, the raw
/// image itself, so its counters are the disk's).
fn query_blockstats(args: &Map<String, Value>, c: &mut Ctx) -> Result<Value, QmpError> {
    let nodes = args.get("query-nodes").and_then(Value::as_bool).unwrap_or(false);
    let devices = c.machine.block_devices();
    Ok(devices
        .iter()
        .map(|d| {
            let mut m = Map::new();
            if !nodes {
                m.insert("device".into(), json!(d.device));
                if let Some(qdev) = &d.qdev {
                    m.insert("qdev".into(), json!(qdev));
                }
            }
            m.insert("node-name".into(), json!(d.node_name));
            m.insert("stats".into(), block_device_stats(&d.stats));
            Value::Object(m)
        })
        .collect())
}

/// `PciInfo` per bus, in bus order, each with its functions in the order given.
fn query_pci(devices: &[PciDevice]) -> Value {
    let mut buses: Vec<u8> = devices.iter().map(|d| d.bus).collect();
    buses.sort_unstable();
    buses.dedup();
    buses
        .into_iter()
        .map(|bus| {
            let on_bus = devices.iter().filter(|d| d.bus == bus).map(pci_device_info).collect::<Vec<_>>();
            json!({"bus": bus, "devices": on_bus})
        })
        .collect()
}

fn pci_device_info(d: &PciDevice) -> Value {
    let mut class = Map::new();
    if let Some(desc) = pci_class_description(d.class) {
        class.insert("desc".into(), json!(desc));
    }
    class.insert("class".into(), json!(d.class));
    let mut info = Map::new();
    info.insert("bus".into(), json!(d.bus));
    info.insert("slot".into(), json!(d.slot));
    info.insert("function".into(), json!(d.function));
    info.insert("class_info".into(), Value::Object(class));
    info.insert(
        "id".into(),
        json!({"device": d.device_id, "vendor": d.vendor_id, "subsystem": d.subsystem_id,
               "subsystem-vendor": d.subsystem_vendor_id}),
    );
    if let Some(irq) = d.irq.filter(|_| d.irq_pin != 0) {
        info.insert("irq".into(), json!(irq));
    }
    info.insert("irq_pin".into(), json!(d.irq_pin));
    info.insert("qdev_id".into(), json!(d.qdev_id));
    info.insert("regions".into(), d.regions.iter().map(pci_region).collect());
    Value::Object(info)
}

fn pci_region(r: &PciRegion) -> Value {
    // An unmapped region's address is -1, as QEMU reports PCI_BAR_UNMAPPED.
    let address = r.address.map_or(json!(-1), |a| json!(a));
    if r.io {
        return json!({"bar": r.bar, "type": "io", "address": address, "size": r.size});
    }
    json!({"bar": r.bar, "type": "memory", "address": address, "size": r.size, "prefetch": r.prefetchable,
           "mem_type_64": r.is_64bit})
}

/// QEMU's descriptions of the classes a virtual machine's PCI functions have (`class_info.desc`); QEMU omits the
/// description for classes outside its table (a virtio-rng's 0x00ff, a virtio-serial's 0x0780).
fn pci_class_description(class: u16) -> Option<&'static str> {
    Some(match class {
        0x0100 => "SCSI controller",
        0x0101 => "IDE controller",
        0x0106 => "SATA controller",
        0x0180 => "Storage controller",
        0x0200 => "Ethernet controller",
        0x0280 => "Network controller",
        0x0300 => "VGA controller",
        0x0600 => "Host bridge",
        0x0601 => "ISA bridge",
        0x0604 => "PCI bridge",
        0x0680 => "Bridge",
        0x0c03 => "USB controller",
        _ => return None,
    })
}

fn format_uuid(u: &[u8; 16]) -> String {
    let h: Vec<String> = u.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", h[0..4].concat(), h[4..6].concat(), h[6..8].concat(), h[8..10].concat(), h[10..].concat())
}

fn qom_list(args: &Map<String, Value>, c: &mut Ctx) -> Result<Value, QmpError> {
    let path = args["path"].as_str().unwrap_or_default();
    let obj = c.machine.qom_object(path).ok_or_else(|| QmpError::device_not_found(path))?;
    Ok(obj.properties.iter().map(|p| json!({"name": p.name, "type": p.type_name})).collect())
}

fn qom_get(args: &Map<String, Value>, c: &mut Ctx) -> Result<Value, QmpError> {
    let path = args["path"].as_str().unwrap_or_default();
    let name = args["property"].as_str().unwrap_or_default();
    let obj = c.machine.qom_object(path).ok_or_else(|| QmpError::device_not_found(path))?;
    let prop = obj
        .properties
        .iter()
        .find(|p| p.name == name)
        .ok_or_else(|| QmpError::property_not_found(&obj.type_name, name))?;
    // QEMU's answer for a property without a getter.
    prop.value.clone().ok_or_else(QmpError::permission_denied)
}

/// QEMU's `qom-set`: the path must resolve and list the property; the machine decides whether it can be written.
fn qom_set(args: &Map<String, Value>, c: &mut Ctx) -> Result<Value, QmpError> {
    let path = str_arg(args, "path");
    let name = str_arg(args, "property");
    let obj = c.machine.qom_object(path).ok_or_else(|| QmpError::device_not_found(path))?;
    if !obj.properties.iter().any(|p| p.name == name) {
        return Err(QmpError::property_not_found(&obj.type_name, name));
    }
    c.machine.qom_set(path, name, &args["value"]).map(|()| json!({}))
}

/// `balloon`: QEMU checks for a balloon first, then the target (named `target` in its error, as QEMU's is).
fn balloon(args: &Map<String, Value>, c: &mut Ctx) -> Result<Value, QmpError> {
    c.machine.balloon_actual()?;
    let target = args.get("value").and_then(Value::as_i64).unwrap_or(0);
    let target = u64::try_from(target)
        .ok()
        .filter(|&t| t > 0)
        .ok_or_else(|| QmpError::generic("Parameter 'target' expects a size"))?;
    c.machine.balloon(target).map(|()| json!({}))
}

/// Whether `ty` is `ancestor` or derives from it, walking the parents `types` lists.
fn implements(types: &[QomType], ty: &QomType, ancestor: &str) -> bool {
    let mut current = Some(ty);
    // Bounded by the number of types, so a parent cycle in the machine's list cannot loop forever.
    for _ in 0..=types.len() {
        let Some(t) = current else { return false };
        if t.name == ancestor {
            return true;
        }
        current = t.parent.as_deref().and_then(|p| types.iter().find(|candidate| candidate.name == p));
    }
    false
}

/// QEMU's `qom-list-types`: concrete types only unless `abstract` is true, those deriving from `implements` if
/// given; `abstract` appears, as `true`, on abstract types only.
fn qom_list_types(args: &Map<String, Value>, c: &mut Ctx) -> Result<Value, QmpError> {
    let with_abstract = args.get("abstract").and_then(Value::as_bool).unwrap_or(false);
    let filter = args.get("implements").and_then(Value::as_str);
    let types = c.machine.qom_types();
    Ok(types
        .iter()
        .filter(|t| with_abstract || !t.is_abstract)
        .filter(|t| filter.is_none_or(|ancestor| implements(&types, t, ancestor)))
        .map(|t| {
            let mut info = Map::new();
            info.insert("name".into(), json!(t.name));
            if t.is_abstract {
                info.insert("abstract".into(), json!(true));
            }
            if let Some(parent) = &t.parent {
                info.insert("parent".into(), json!(parent));
            }
            Value::Object(info)
        })
        .collect())
}

fn property_info(p: &TypeProperty) -> Value {
    let mut info = Map::new();
    info.insert("name".into(), json!(p.name));
    info.insert("type".into(), json!(p.type_name));
    if let Some(description) = &p.description {
        info.insert("description".into(), json!(description));
    }
    if let Some(default) = &p.default_value {
        info.insert("default-value".into(), default.clone());
    }
    Value::Object(info)
}

/// QEMU's `device-list-properties`, with its errors: an unknown type is `DeviceNotFound` (libvirt asks for types
/// a binary may lack and takes that answer as "no such device"), a type that is not a device or is abstract a
/// generic error.
fn device_list_properties(args: &Map<String, Value>, c: &mut Ctx) -> Result<Value, QmpError> {
    let name = str_arg(args, "typename");
    let types = c.machine.qom_types();
    let ty = types
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| QmpError::new(ErrorClass::DeviceNotFound, format!("Device '{name}' not found")))?;
    if !implements(&types, ty, "device") {
        return Err(QmpError::generic("Parameter 'typename' expects device type"));
    }
    if ty.is_abstract {
        return Err(QmpError::generic("Parameter 'typename' expects non-abstract device type"));
    }
    let properties = c.machine.type_properties(name).unwrap_or_default();
    Ok(properties.iter().map(property_info).collect())
}

/// `qom-list-properties`: a type's properties, and for a type the binary does not have, an empty list. QEMU
/// answers `DeviceNotFound` there, but it has every type libvirt asks about; libvirt 9.0 dereferences a NULL list
/// on that error and crashes, and an empty list truthfully says there is nothing to configure.
fn qom_list_properties(args: &Map<String, Value>, c: &mut Ctx) -> Result<Value, QmpError> {
    let properties = c.machine.type_properties(str_arg(args, "typename")).unwrap_or_default();
    Ok(properties.iter().map(property_info).collect())
}

fn query_cpu_definitions(_: &Map<String, Value>, c: &mut Ctx) -> Result<Value, QmpError> {
    Ok(c.machine
        .cpu_definitions()
        .iter()
        .map(|d| {
            json!({"name": d.name, "typename": d.type_name, "unavailable-features": d.unavailable_features,
                   "static": d.is_static, "migration-safe": d.migration_safe, "deprecated": d.deprecated})
        })
        .collect())
}

fn query_cpu_model_expansion(args: &Map<String, Value>, c: &mut Ctx) -> Result<Value, QmpError> {
    // The schema check has made `type` one of the enum's names and `model` an object with a string name.
    let expansion = CpuModelExpansionType::from_name(str_arg(args, "type")).unwrap_or(CpuModelExpansionType::Full);
    let model = &args["model"];
    let props = match model.get("props") {
        None => Map::new(),
        Some(Value::Object(props)) => props.clone(),
        Some(_) => return Err(QmpError::generic("Invalid parameter type for 'model.props', expected: object")),
    };
    let asked = CpuModel { name: model["name"].as_str().unwrap_or_default().to_string(), props };
    let expanded = c.machine.expand_cpu_model(expansion, &asked)?;
    Ok(json!({"model": {"name": expanded.name, "props": expanded.props}}))
}

fn query_command_line_options(args: &Map<String, Value>, c: &mut Ctx) -> Result<Value, QmpError> {
    let only = args.get("option").and_then(Value::as_str);
    let options: Vec<Value> = c
        .machine
        .command_line_options()
        .iter()
        .filter(|o| only.is_none_or(|name| o.option == name))
        .map(|o| {
            let parameters: Vec<Value> =
                o.parameters.iter().map(|p| json!({"name": p.name, "type": p.type_name})).collect();
            json!({"parameters": parameters, "option": o.option})
        })
        .collect();
    if only.is_some() && options.is_empty() {
        return Err(QmpError::generic("Parameter 'option' expects an option name"));
    }
    Ok(Value::Array(options))
}

/// HMP commands that are the QMP command of the same meaning (`c` is QEMU's short form of `cont`, `q` of `quit`).
const HMP_AS_QMP: &[(&[&str], &str)] = &[
    (&["stop"], "stop"),
    (&["c", "cont"], "cont"),
    (&["system_reset"], "system_reset"),
    (&["system_powerdown"], "system_powerdown"),
    (&["q", "quit"], "quit"),
];

/// Runs the QMP command `name` from the table for HMP: success prints nothing, an error prints QEMU's
/// `Error: <desc>` line (the QMP reply itself still succeeds, as with QEMU).
fn hmp_via_qmp(name: &str, c: &mut Ctx) -> Result<Value, QmpError> {
    let command = COMMANDS.iter().find(|cmd| cmd.name == name).ok_or_else(|| QmpError::generic("no such command"))?;
    Ok(match (command.handler)(&Map::new(), c) {
        Ok(_) => json!(""),
        Err(e) => json!(format!("Error: {}\r\n", e.desc)),
    })
}

/// The HMP subset: `info status`, `info cpus`, `info version`, `info kvm`, `info name`, `info uuid`, the run-state
/// commands in `HMP_AS_QMP`, and `help`, with QEMU's text; anything else gets QEMU's `unknown command` line. HMP
/// output lines end in `\r\n` (QEMU's monitor turns every `\n` into `\r\n`).
fn human_monitor_command(args: &Map<String, Value>, c: &mut Ctx) -> Result<Value, QmpError> {
    let line = args["command-line"].as_str().unwrap_or_default();
    let cpus = c.machine.cpus();
    let current = match args.get("cpu-index").and_then(Value::as_i64) {
        Some(i) => {
            if !cpus.iter().any(|cpu| cpu.cpu_index == i) {
                return Err(QmpError::generic("Parameter 'cpu-index' expects a CPU number"));
            }
            Some(i)
        }
        None => cpus.first().map(|cpu| cpu.cpu_index),
    };
    // QEMU's command names end at whitespace or '/'.
    let word = |s: &str| s.find(|ch: char| ch.is_ascii_whitespace() || ch == '/').unwrap_or(s.len());
    let start = line.trim_start();
    let offset = line.len() - start.len();
    if start.is_empty() {
        return Ok(json!(""));
    }
    let cmd_end = word(start);
    let unknown = |end: usize| Ok(json!(format!("unknown command: '{}'\r\n", &line[offset..offset + end])));
    let verb = &start[..cmd_end];
    if let Some((_, qmp_name)) = HMP_AS_QMP.iter().find(|(names, _)| names.contains(&verb)) {
        return hmp_via_qmp(qmp_name, c);
    }
    if verb == "help" || verb == "?" {
        return Ok(json!(HELP.replace('\n', "\r\n")));
    }
    if verb != "info" {
        return unknown(cmd_end);
    }
    let rest = &start[cmd_end..];
    let sub_start = rest.trim_start();
    let sub_offset = cmd_end + (rest.len() - sub_start.len());
    let sub_end = word(sub_start);
    let text = match &sub_start[..sub_end] {
        "" => INFO_HELP.to_string(),
        "status" => {
            let state = c.machine.run_state();
            let running = state == RunState::Running;
            let mut s = format!("VM status: {}", if running { "running" } else { "paused" });
            if !running && state != RunState::Paused {
                s += &format!(" ({})", state.as_str());
            }
            s + "\n"
        }
        "cpus" => cpus
            .iter()
            .map(|cpu| {
                let mark = if Some(cpu.cpu_index) == current { '*' } else { ' ' };
                format!("{mark} CPU #{}: thread_id={}\n", cpu.cpu_index, cpu.thread_id)
            })
            .collect(),
        "version" => {
            let v = &c.info;
            format!("{}.{}.{}{}\n", v.major, v.minor, v.micro, v.package)
        }
        "kvm" => format!("kvm support: {}\n", if c.machine.kvm().0 { "enabled" } else { "disabled" }),
        "name" => c.machine.name().map(|n| format!("{n}\n")).unwrap_or_default(),
        "uuid" => format!("{}\n", format_uuid(&c.machine.uuid())),
        _ => return unknown(sub_offset + sub_end),
    };
    Ok(json!(text.replace('\n', "\r\n")))
}

/// `help`: the commands this monitor has, in QEMU's `name args -- description` form.
const HELP: &str = "\
c|cont  -- resume emulation
help|? [cmd]  -- show the help
info [subcommand]  -- show various information about the system state
q|quit  -- quit the emulator
stop  -- stop emulation
system_powerdown  -- send system power down event
system_reset  -- reset the system
";

const INFO_HELP: &str = "\
info cpus  -- show infos for each CPU
info kvm  -- show KVM information
info name  -- show the current VM name
info status  -- show the current VM status (running|paused)
info uuid  -- show the current VM UUID
info version  -- show the version of QEMU
";

//! What this binary can do, as QMP reports it to a management tool's probe (libvirt's, above all): the machine
//! types, the QOM types it creates (machines, the accelerator, the CPU, `-device` models, `-object` backends) with
//! their properties, the CPU model and its features, and the command line's parameters. Generated from the
//! platform's machine types, the command line's device table and the host's CPU, so that a probe is offered
//! exactly what Kestrel implements: whatever it is offered, libvirt will use.

use hypervisor::Hypervisor;
use qmp::{
    CommandLineOption, CommandLineParameter, CpuDefinition, CpuModel, CpuModelExpansionType, MachineInfo, QmpError,
    QomObject, QomProperty, QomType, TypeProperty,
};
use serde_json::{json, Value};

use crate::cli::{qemu_option_parameters, DeviceKind, DeviceModel, DEVICE_MODELS, ISA_SERIAL, OBJECT_TYPES};
use crate::config::{Frontend, MachineType, VirtioTransport, VmConfig};
use crate::platform::Platform;

/// QEMU's abstract parent of the virtio devices on each transport.
fn virtio_parent(transport: VirtioTransport) -> &'static str {
    match transport {
        VirtioTransport::Pci => "virtio-pci",
        VirtioTransport::Mmio => "virtio-device",
    }
}

/// `virtio-blk` on PCI is `virtio-blk-pci`, on virtio-mmio `virtio-blk-device`.
fn virtio_type(model: &str, transport: VirtioTransport) -> String {
    match transport {
        VirtioTransport::Pci => format!("{model}-pci"),
        VirtioTransport::Mmio => format!("{model}-device"),
    }
}

/// The devices given an `id=` on the command line, with their QOM types: `/machine/peripheral`'s children, where
/// libvirt looks for the devices it named.
pub(super) fn peripherals<H: Hypervisor, P: Platform<H>>(config: &VmConfig) -> Vec<(String, String)> {
    let default = P::virtio_transport(config.machine).unwrap_or(VirtioTransport::Pci);
    let virtio = |model: &str, frontend: &Frontend| {
        let id = frontend.id.clone()?;
        Some((id, virtio_type(model, frontend.transport.unwrap_or(default))))
    };
    let mut devices: Vec<(String, String)> = Vec::new();
    if let Some(Some(id)) = &config.serial_on_isa {
        devices.push((id.clone(), ISA_SERIAL.to_string()));
    }
    devices.extend(config.disks.iter().filter_map(|disk| virtio("virtio-blk", &disk.frontend)));
    devices.extend(config.nets.iter().filter_map(|net| virtio("virtio-net", &net.frontend)));
    devices.extend(config.rng.iter().filter_map(|rng| virtio("virtio-rng", rng)));
    devices.extend(config.console.iter().filter_map(|console| virtio("virtio-serial", &console.frontend)));
    devices.extend(config.balloon.iter().filter_map(|balloon| virtio("virtio-balloon", &balloon.frontend)));
    devices
}

/// The name `query-machines` and `-machine` use: the versioned one where QEMU versions the type.
pub(super) fn machine_name(machine: MachineType) -> String {
    machine.versioned_name().unwrap_or_else(|| machine.name().to_string())
}

/// The machine's QOM type, as QEMU names it (`pc-q35-7.2-machine`).
pub(super) fn machine_qom_type(machine: MachineType) -> String {
    format!("{}-machine", machine_name(machine))
}

/// The machine a configuration runs: the one asked for, or the platform's default.
pub(super) fn running_machine<H: Hypervisor, P: Platform<H>>(asked: Option<MachineType>) -> MachineType {
    asked.unwrap_or(P::MACHINE_TYPES[0])
}

/// The transports the platform's machines put virtio devices on.
fn virtio_transports<H: Hypervisor, P: Platform<H>>() -> Vec<VirtioTransport> {
    let mut transports = Vec::new();
    for transport in P::MACHINE_TYPES.iter().filter_map(|&m| P::virtio_transport(Some(m)).ok()) {
        if !transports.contains(&transport) {
            transports.push(transport);
        }
    }
    transports
}

/// `query-machines`: the platform's machine types, versioned with their plain name as alias, and `none`. No
/// default RAM id (libvirt would then pass `memory-backend=`, which Kestrel does not take), no CPU hot-plug, no
/// NUMA.
pub(super) fn machines<H: Hypervisor, P: Platform<H>>(max_vcpus: u32) -> Vec<MachineInfo> {
    let none = std::iter::once(MachineType::None);
    P::MACHINE_TYPES
        .iter()
        .copied()
        .chain(none)
        .enumerate()
        .map(|(index, machine)| {
            let guestless = machine == MachineType::None;
            MachineInfo {
                name: machine_name(machine),
                alias: machine.versioned_name().map(|_| machine.name().to_string()),
                is_default: index == 0,
                // QEMU's none machine has one CPU slot; Kestrel's runs none.
                cpu_max: if guestless { 1 } else { i64::from(max_vcpus) },
                hotpluggable_cpus: false,
                numa_mem_supported: false,
                deprecated: false,
                default_cpu_type: (!guestless).then(|| P::CPU_TYPE.to_string()),
                default_ram_id: None,
            }
        })
        .collect()
}

fn qom_type(name: impl Into<String>, parent: Option<&str>, is_abstract: bool) -> QomType {
    QomType { name: name.into(), parent: parent.map(Into::into), is_abstract }
}

/// The CPU type's abstract parent: `host-x86_64-cpu` derives from `x86_64-cpu`, as in QEMU.
fn cpu_parent<H: Hypervisor, P: Platform<H>>() -> &'static str {
    P::CPU_TYPE.strip_prefix("host-").unwrap_or("cpu")
}

/// Whether the platform's machines can have `model`: ISA devices only where there is an ISA bus.
fn platform_has<H: Hypervisor, P: Platform<H>>(model: &DeviceModel) -> bool {
    model.kind != DeviceKind::Isa || P::ISA_SERIAL
}

/// Every QOM type Kestrel creates, with the abstract parents that place them in QEMU's hierarchy (so that
/// `implements: "device"` finds the devices).
pub(super) fn qom_types<H: Hypervisor, P: Platform<H>>() -> Vec<QomType> {
    let mut types = vec![
        qom_type("object", None, true),
        qom_type("device", Some("object"), true),
        qom_type("machine", Some("object"), true),
        qom_type("accel", Some("object"), true),
        qom_type("kvm-accel", Some("accel"), false),
        qom_type("cpu", Some("device"), true),
        qom_type(cpu_parent::<H, P>(), Some("cpu"), true),
        qom_type(P::CPU_TYPE, Some(cpu_parent::<H, P>()), false),
        qom_type("rng-backend", Some("object"), true),
        qom_type("virtio-serial-port", Some("device"), true),
    ];
    types.extend(
        P::MACHINE_TYPES
            .iter()
            .chain([&MachineType::None])
            .map(|&m| qom_type(machine_qom_type(m), Some("machine"), false)),
    );
    let transports = virtio_transports::<H, P>();
    types.extend(transports.iter().map(|&t| qom_type(virtio_parent(t), Some("device"), true)));
    if P::ISA_SERIAL {
        types.push(qom_type("isa-device", Some("device"), true));
    }
    for model in DEVICE_MODELS.iter().filter(|model| platform_has::<H, P>(model)) {
        match model.kind {
            DeviceKind::Virtio => types.extend(
                transports.iter().map(|&t| qom_type(virtio_type(model.model, t), Some(virtio_parent(t)), false)),
            ),
            DeviceKind::VirtioSerialPort => types.push(qom_type(model.model, Some("virtio-serial-port"), false)),
            DeviceKind::Isa => types.push(qom_type(model.model, Some("isa-device"), false)),
        }
    }
    types.extend(OBJECT_TYPES.iter().map(|&name| qom_type(name, Some("rng-backend"), false)));
    types
}

/// The properties of a type Kestrel creates: a device's settings from the command line's table, `migratable` on
/// the CPU (`-cpu host,migratable=`), none on the others; `None` for a type Kestrel does not have.
pub(super) fn type_properties<H: Hypervisor, P: Platform<H>>(type_name: &str) -> Option<Vec<TypeProperty>> {
    let property = |name: &str, type_name: &str| TypeProperty {
        name: name.into(),
        type_name: type_name.into(),
        description: None,
        default_value: None,
    };
    let transports = virtio_transports::<H, P>();
    let device = DEVICE_MODELS.iter().filter(|model| platform_has::<H, P>(model)).find(|model| match model.kind {
        DeviceKind::Virtio => transports.iter().any(|&t| virtio_type(model.model, t) == type_name),
        DeviceKind::VirtioSerialPort | DeviceKind::Isa => model.model == type_name,
    });
    if let Some(model) = device {
        return Some(model.properties.iter().map(|(name, ty)| property(name, ty)).collect());
    }
    if type_name == P::CPU_TYPE {
        return Some(vec![TypeProperty { default_value: Some(json!(true)), ..property("migratable", "bool") }]);
    }
    qom_types::<H, P>().iter().any(|t| t.name == type_name).then(Vec::new)
}

/// `host`, the one model: the host's CPU as the hypervisor offers it. Not static (it differs between hosts), not
/// migration-safe (QEMU's rule for `host`).
pub(super) fn cpu_definitions<H: Hypervisor, P: Platform<H>>() -> Vec<CpuDefinition> {
    vec![CpuDefinition {
        name: "host".into(),
        type_name: P::CPU_TYPE.into(),
        is_static: false,
        migration_safe: false,
        unavailable_features: Vec::new(),
        deprecated: false,
    }]
}

/// `query-cpu-model-expansion`. Two models mean the CPU Kestrel gives guests: `host`, and QEMU's static `base`
/// (a CPU with no features) with every feature the host has set, which is what a static expansion of `host`
/// returns and libvirt then expands fully. QEMU's static expansion is `base` with every feature set as the host has
/// it; the full one keeps the model's name and adds its other properties (`migratable` for `host`). A property given
/// in the request must be one the model has; a feature set otherwise than the host has it is refused, as Kestrel
/// cannot give a guest another CPU than the host's.
pub(super) fn expand_cpu_model<H: Hypervisor, P: Platform<H>>(
    hypervisor: &H,
    expansion: CpuModelExpansionType,
    model: &CpuModel,
) -> Result<CpuModel, QmpError> {
    let is_host = match model.name.as_str() {
        "host" => true,
        "base" => false,
        other => return Err(QmpError::generic(format!("The CPU type '{other}' is not a recognized CPU type"))),
    };
    let features = P::cpu_features(hypervisor).map_err(|e| QmpError::generic(e.to_string()))?;
    for (name, value) in &model.props {
        if is_host && name == "migratable" {
            if !value.is_boolean() {
                return Err(QmpError::generic(format!("Parameter '{name}' expects a boolean")));
            }
            continue;
        }
        let Some((_, has)) = features.iter().find(|(feature, _)| feature == name) else {
            let type_name = if is_host { P::CPU_TYPE.to_string() } else { format!("base-{}", cpu_parent::<H, P>()) };
            return Err(QmpError::property_not_found(&type_name, name));
        };
        if value != &Value::Bool(*has) {
            return Err(QmpError::generic(format!(
                "Kestrel gives guests the host's CPU: '{name}' cannot be {value} on this host"
            )));
        }
    }
    // `base` has no feature but those set: each the host has must be.
    if let Some((missing, _)) = features.iter().find(|(name, has)| !is_host && *has && !model.props.contains_key(*name))
    {
        return Err(QmpError::generic(format!(
            "Kestrel gives guests the host's CPU: a 'base' model without '{missing}' is not it"
        )));
    }
    let mut props: serde_json::Map<String, Value> =
        features.into_iter().map(|(name, has)| (name.to_string(), json!(has))).collect();
    let name = match (expansion, is_host) {
        (CpuModelExpansionType::Full, true) => {
            props.insert("migratable".into(), model.props.get("migratable").cloned().unwrap_or(json!(true)));
            "host"
        }
        _ => "base",
    };
    Ok(CpuModel { name: name.into(), props })
}

/// The command-line options with parameters, as the command line parses them.
pub(super) fn command_line_options() -> Vec<CommandLineOption> {
    qemu_option_parameters()
        .into_iter()
        .map(|(option, parameters)| CommandLineOption {
            option: option.into(),
            parameters: parameters
                .into_iter()
                .map(|(name, type_name)| CommandLineParameter { name: name.into(), type_name })
                .collect(),
        })
        .collect()
}

/// One property of a QOM object as `qom-list` shows it, with its value for `qom-get`.
pub(super) fn qom_property(name: &str, type_name: &str, value: Value) -> QomProperty {
    QomProperty { name: name.into(), type_name: type_name.into(), value: Some(value) }
}

/// The QOM root: a container whose one child is the machine, of QOM type `machine_type`.
pub(super) fn qom_root(machine_type: &str) -> QomObject {
    QomObject {
        type_name: "container".into(),
        properties: vec![
            qom_property("type", "string", json!("container")),
            qom_property("machine", &format!("child<{machine_type}>"), json!("/machine")),
        ],
    }
}

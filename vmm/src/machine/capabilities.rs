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

use crate::cli::{
    qemu_option_parameters, DeviceKind, DeviceModel, DEVICE_MODELS, ISA_SERIAL, OBJECT_TYPES, VIRTCONSOLE,
    VIRTSERIALPORT,
};
use crate::config::{CpuConfig, Frontend, MachineType, VirtioTransport, VmConfig};
use crate::cpu_model::canonical_feature_name;
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
    if let Some(virtio_serial) = &config.virtio_serial {
        devices.extend(virtio("virtio-serial", &virtio_serial.frontend));
        for port in &virtio_serial.ports {
            let model = if port.console { VIRTCONSOLE } else { VIRTSERIALPORT };
            devices.extend(port.id.clone().map(|id| (id, model.to_string())));
        }
    }
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
    P::virtio_transports()
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
        P::CPU_MODELS.iter().map(|m| qom_type(cpu_type_name::<H, P>(Some(m.name)), Some(cpu_parent::<H, P>()), false)),
    );
    types.extend(
        P::MACHINE_TYPES
            .iter()
            .chain([&MachineType::None])
            .map(|&m| qom_type(machine_qom_type(m), Some("machine"), false)),
    );
    let transports = virtio_transports::<H, P>();
    types.extend(transports.iter().map(|&t| qom_type(virtio_parent(t), Some("device"), true)));
    types.extend(P::ACPI_PM_TYPES.iter().map(|&name| qom_type(name, Some("device"), false)));
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
    if P::ACPI_PM_TYPES.contains(&type_name) {
        return Some(vec![property("disable_s3", "uint8"), property("disable_s4", "uint8")]);
    }
    qom_types::<H, P>().iter().any(|t| t.name == type_name).then(Vec::new)
}

/// The QOM type of the vCPUs of CPU model `model` (`None`: `host`), as QEMU names them: `kvm64-x86_64-cpu`.
pub(super) fn cpu_type_name<H: Hypervisor, P: Platform<H>>(model: Option<&str>) -> String {
    match model {
        None => P::CPU_TYPE.to_string(),
        Some(model) => format!("{model}-{}", cpu_parent::<H, P>()),
    }
}

/// `host`, the host's CPU as the hypervisor offers it: not static (it differs between hosts), not migration-safe
/// (QEMU's rule for `host`); then the platform's named models, each with the features it has that this host
/// lacks (libvirt uses only those with none).
pub(super) fn cpu_definitions<H: Hypervisor, P: Platform<H>>(hypervisor: &H) -> Vec<CpuDefinition> {
    let host = P::cpu_features(hypervisor).unwrap_or_default();
    let host_has = |feature: &str| host.iter().any(|&(name, has)| has && name == feature);
    let mut definitions = vec![CpuDefinition {
        name: "host".into(),
        type_name: P::CPU_TYPE.into(),
        is_static: false,
        migration_safe: false,
        unavailable_features: Vec::new(),
        deprecated: false,
    }];
    definitions.extend(P::CPU_MODELS.iter().map(|model| CpuDefinition {
        name: model.name.into(),
        type_name: cpu_type_name::<H, P>(Some(model.name)),
        is_static: false,
        migration_safe: true,
        unavailable_features: model.features.iter().filter(|f| !host_has(f)).map(|f| f.to_string()).collect(),
        deprecated: false,
    }));
    definitions
}

/// `query-cpu-model-expansion`: `host`, a named model, or QEMU's static `base` (a CPU with no features), with
/// `model`'s properties as feature settings, resolved as `-cpu` resolves them (`cpu_model::resolve`: what the host
/// lacks is refused). QEMU's static expansion is `base` with every feature set as the model has it; the full one
/// keeps the model's name and adds its other properties (`migratable` for `host`). A `base` model must set every
/// feature the guest is to have.
pub(super) fn expand_cpu_model<H: Hypervisor, P: Platform<H>>(
    hypervisor: &H,
    expansion: CpuModelExpansionType,
    model: &CpuModel,
) -> Result<CpuModel, QmpError> {
    let known = model.name == "host" || model.name == "base" || P::CPU_MODELS.iter().any(|m| m.name == model.name);
    if !known {
        return Err(QmpError::generic(format!("The CPU type '{}' is not a recognized CPU type", model.name)));
    }
    let host = P::cpu_features(hypervisor).map_err(|e| QmpError::generic(e.to_string()))?;
    let type_name = if model.name == "base" {
        format!("base-{}", cpu_parent::<H, P>())
    } else {
        cpu_type_name::<H, P>(Some(model.name.as_str()).filter(|&name| name != "host"))
    };
    let mut settings = Vec::new();
    for (name, value) in &model.props {
        if model.name == "host" && name == "migratable" {
            if !value.is_boolean() {
                return Err(QmpError::generic(format!("Parameter '{name}' expects a boolean")));
            }
            continue;
        }
        if !host.iter().any(|(feature, _)| *feature == canonical_feature_name(name)) {
            return Err(QmpError::property_not_found(&type_name, name));
        }
        let Some(on) = value.as_bool() else {
            return Err(QmpError::generic(format!("Parameter '{name}' expects a boolean")));
        };
        settings.push((name.clone(), on));
    }
    // `base` is the host's CPU with every feature off, then the settings.
    let base_off = || host.iter().map(|(name, _)| (name.to_string(), false));
    let features = if model.name == "base" { base_off().chain(settings).collect() } else { settings };
    let model_name = Some(model.name.clone()).filter(|name| name != "host" && name != "base");
    let cpu = CpuConfig { model: model_name, features, ..CpuConfig::default() };
    let guest = P::guest_cpu(hypervisor, &cpu).map_err(|e| QmpError::generic(e.to_string()))?;
    let mut props: serde_json::Map<String, Value> =
        host.iter().map(|&(name, has)| (name.to_string(), json!(guest.has(name, has)))).collect();
    let name = match (expansion, model.name.as_str()) {
        (CpuModelExpansionType::Full, "host") => {
            props.insert("migratable".into(), model.props.get("migratable").cloned().unwrap_or(json!(true)));
            "host"
        }
        (CpuModelExpansionType::Full, name) => name,
        (CpuModelExpansionType::Static, _) => "base",
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

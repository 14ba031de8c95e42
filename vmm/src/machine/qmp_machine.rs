//! The machine as QMP sees it: `qmp::Machine` for `Vmm`, and how Kestrel's devices and vCPUs are shown.

use devices::virtio::balloon::{Balloon, PAGE_SHIFT, STAT_NAMES};
use devices::virtio::block::Block;
use hypervisor::Hypervisor;
use qmp::{
    BlockDevice, BlockDeviceStats, ChardevInfo, CommandLineOption, CpuDefinition, CpuInfo, CpuModel,
    CpuModelExpansionType, Event, EventKind, Machine, MachineInfo, MigrationCapabilities, MigrationChannel,
    MigrationInfo, QmpError, QomObject, QomType, RunState, ShutdownCause, Target, TypeProperty,
};
use serde_json::json;

use crate::config::{SerialConfig, VmConfig};
use crate::platform::Platform;

use super::{capabilities, qmp_event, shutdown_event, Vmm, SERIAL_LABEL};

impl<H: Hypervisor, P: Platform<H>> Machine for Vmm<'_, H, P> {
    fn run_state(&self) -> RunState {
        self.state
    }
    fn stop(&mut self, events: &mut Vec<Event>) -> Result<(), QmpError> {
        if self.state == RunState::InMigrate {
            self.autostart = false;
            return Ok(());
        }
        if self.state == RunState::Running {
            self.pause(RunState::Paused);
            self.raise(events, qmp_event(EventKind::Stop));
        }
        Ok(())
    }
    fn cont(&mut self, events: &mut Vec<Event>) -> Result<(), QmpError> {
        // QEMU: the guest runs once the incoming migration completed.
        if self.state == RunState::InMigrate {
            self.autostart = true;
            return Ok(());
        }
        if self.state != RunState::Running {
            self.resume();
            self.raise(events, qmp_event(EventKind::Resume));
        }
        Ok(())
    }
    fn system_reset(&mut self, events: &mut Vec<Event>) -> Result<(), QmpError> {
        if self.state == RunState::InMigrate {
            return Err(QmpError::generic("the machine is waiting for its incoming migration"));
        }
        if self.config.no_reboot {
            // QEMU with -no-reboot turns every reset request, the host's too, into a shutdown.
            self.raise(events, shutdown_event(ShutdownCause::HostQmpSystemReset));
            self.quit = true;
            return Ok(());
        }
        self.raise(events, qmp_event(EventKind::Reset { guest: false, reason: ShutdownCause::HostQmpSystemReset }));
        self.reset().map_err(|e| QmpError::generic(e.to_string()))
    }
    fn system_powerdown(&mut self, events: &mut Vec<Event>) -> Result<(), QmpError> {
        self.raise(events, qmp_event(EventKind::Powerdown));
        self.platform.press_power_button();
        Ok(())
    }
    fn quit(&mut self, events: &mut Vec<Event>) -> Result<(), QmpError> {
        self.raise(events, shutdown_event(ShutdownCause::HostQmpQuit));
        self.quit = true;
        Ok(())
    }
    fn cpus(&self) -> Vec<CpuInfo> {
        self.vcpu_thread_ids()
            .into_iter()
            .enumerate()
            .map(|(index, thread_id)| CpuInfo {
                cpu_index: index as i64,
                qom_path: cpu_qom_path(index),
                thread_id: i64::from(thread_id),
                props: P::cpu_props(index as u32, u32::from(self.cpu.cores_per_socket(self.config.vcpus))),
                type_name: self.cpu_type_name(),
            })
            .collect()
    }
    fn name(&self) -> Option<String> {
        self.config.name.clone()
    }
    fn uuid(&self) -> [u8; 16] {
        uuid_bytes(self.config)
    }
    fn memory_size(&self) -> u64 {
        self.config.memory_bytes
    }
    fn plugged_memory(&self) -> Option<u64> {
        None
    }
    fn chardevs(&self) -> Vec<ChardevInfo> {
        let serial = match &self.config.serial {
            SerialConfig::None => None,
            other => Some(chardev_filename(other, self.serial_pty.as_deref())),
        };
        let label = self.config.serial_chardev.as_deref().unwrap_or(SERIAL_LABEL).to_string();
        let serial = serial.map(|filename| ChardevInfo { label, filename, frontend_open: true });
        // The virtio-serial ports' chardevs, open on the frontend while a program in the guest has the port open
        // (QEMU's virtio-serial sets its chardev's frontend open as the guest's driver says).
        let mut ports = Vec::new();
        if let (Some(virtio_serial), Some(serial_ports)) = (&self.config.virtio_serial, &self.serial_ports) {
            for (port, pty) in virtio_serial.ports.iter().zip(&serial_ports.ptys) {
                let Some(label) = port.chardev.clone() else { continue };
                let filename = chardev_filename(&port.backend, pty.as_deref());
                ports.push(ChardevInfo { label, filename, frontend_open: serial_ports.guest_open(port.nr) });
            }
        }
        serial.into_iter().chain(ports).chain(monitor_chardevs(self.config)).collect()
    }
    fn target(&self) -> Target {
        P::QMP_TARGET
    }
    fn kvm(&self) -> (bool, bool) {
        (true, true)
    }
    fn machines(&self) -> Vec<MachineInfo> {
        capabilities::machines::<H, P>(self.hypervisor.max_vcpus().min(P::MAX_VCPUS))
    }
    fn qom_types(&self) -> Vec<QomType> {
        capabilities::qom_types::<H, P>()
    }
    fn type_properties(&self, type_name: &str) -> Option<Vec<TypeProperty>> {
        capabilities::type_properties::<H, P>(type_name)
    }
    fn cpu_definitions(&self) -> Vec<CpuDefinition> {
        capabilities::cpu_definitions::<H, P>(&self.hypervisor)
    }
    fn expand_cpu_model(&self, expansion: CpuModelExpansionType, model: &CpuModel) -> Result<CpuModel, QmpError> {
        capabilities::expand_cpu_model::<H, P>(&self.hypervisor, expansion, model)
    }
    fn command_line_options(&self) -> Vec<CommandLineOption> {
        capabilities::command_line_options()
    }
    /// A small tree that tells the truth: the machine, its unattached container and one object per vCPU.
    fn qom_object(&self, path: &str) -> Option<QomObject> {
        let prop = capabilities::qom_property;
        let vcpus = usize::from(self.config.vcpus);
        let machine_type = capabilities::machine_qom_type(capabilities::running_machine::<H, P>(self.config.machine));
        match path.trim_end_matches('/') {
            "" => Some(capabilities::qom_root(&machine_type)),
            "/machine" => Some(QomObject {
                type_name: machine_type.clone(),
                properties: vec![
                    prop("type", "string", json!(machine_type)),
                    prop("unattached", "child<container>", json!("/machine/unattached")),
                    prop("peripheral", "child<container>", json!("/machine/peripheral")),
                    prop(
                        "kernel",
                        "string",
                        json!(self.config.kernel.as_ref().map(|k| k.display().to_string()).unwrap_or_default()),
                    ),
                    prop("append", "string", json!(self.config.cmdline.as_deref().unwrap_or(P::DEFAULT_CMDLINE))),
                ],
            }),
            "/machine/peripheral" => {
                let mut properties = vec![prop("type", "string", json!("container"))];
                properties.extend(self.peripherals().into_iter().map(|(id, type_name)| {
                    prop(&id, &format!("child<{type_name}>"), json!(format!("/machine/peripheral/{id}")))
                }));
                Some(QomObject { type_name: "container".into(), properties })
            }
            "/machine/unattached" => {
                let mut properties = vec![prop("type", "string", json!("container"))];
                properties.extend((0..vcpus).map(|i| {
                    prop(&format!("device[{i}]"), &format!("child<{}>", self.cpu_type_name()), json!(cpu_qom_path(i)))
                }));
                Some(QomObject { type_name: "container".into(), properties })
            }
            other if other.starts_with("/machine/peripheral/") => {
                // Each device `/machine/peripheral` lists, by its id: what it is.
                let id = other.strip_prefix("/machine/peripheral/")?;
                let (_, type_name) = self.peripherals().into_iter().find(|(peripheral, _)| peripheral == id)?;
                let mut properties =
                    vec![prop("type", "string", json!(type_name)), prop("realized", "bool", json!(true))];
                if let Some(balloon) = self.balloon_with_id(id) {
                    properties.extend(balloon_properties(&balloon.lock().unwrap_or_else(|p| p.into_inner())));
                }
                Some(QomObject { properties, type_name })
            }
            other => {
                let index: usize =
                    other.strip_prefix("/machine/unattached/device[")?.strip_suffix(']')?.parse().ok()?;
                (index < vcpus).then(|| QomObject {
                    type_name: self.cpu_type_name(),
                    properties: vec![
                        prop("type", "string", json!(self.cpu_type_name())),
                        prop("realized", "bool", json!(true)),
                        prop("start-powered-off", "bool", json!(index != 0)),
                    ],
                })
            }
        }
    }
    fn block_devices(&self) -> Vec<BlockDevice> {
        let disks = self.config.disks.iter().zip(&self.disks).enumerate();
        disks
            .map(|(i, (config, block))| block_device(i, config, &block.lock().unwrap_or_else(|p| p.into_inner())))
            .collect()
    }
    fn pci_devices(&self) -> Vec<qmp::PciDevice> {
        self.platform.pci_functions().iter().map(pci_device).collect()
    }
    /// QEMU's non-live save (see `Vmm::save_to`).
    fn migrate(&mut self, channel: MigrationChannel, events: &mut Vec<Event>) -> Result<(), QmpError> {
        self.save_to(channel, events)
    }

    /// `-incoming defer`'s second half (see `Vmm::load_from`).
    fn migrate_incoming(&mut self, channel: MigrationChannel, events: &mut Vec<Event>) -> Result<(), QmpError> {
        self.load_from(channel, events)
    }

    fn migration(&self) -> Option<MigrationInfo> {
        self.migration.clone()
    }
    fn migration_capabilities(&self) -> MigrationCapabilities {
        self.migration_capabilities
    }
    fn set_migration_capabilities(&mut self, capabilities: MigrationCapabilities) -> Result<(), QmpError> {
        self.migration_capabilities = capabilities;
        Ok(())
    }

    /// QEMU's `virtio_balloon_to_target`: the balloon is what the guest must give up to be left with `target`,
    /// all of guest RAM at most.
    fn balloon(&mut self, target: u64) -> Result<(), QmpError> {
        let balloon = self.balloon.as_ref().ok_or_else(QmpError::no_balloon)?;
        let ram = self.config.memory_bytes;
        let pages = (ram - target.min(ram)) >> PAGE_SHIFT;
        let pages = u32::try_from(pages).map_err(|_| QmpError::generic("the balloon cannot hold that much"))?;
        balloon.lock().unwrap_or_else(|p| p.into_inner()).set_num_pages(pages);
        Ok(())
    }

    fn balloon_actual(&self) -> Result<u64, QmpError> {
        let balloon = self.balloon.as_ref().ok_or_else(QmpError::no_balloon)?;
        let actual = balloon.lock().unwrap_or_else(|p| p.into_inner()).actual();
        Ok(self.balloon_actual_bytes(actual))
    }

    /// The balloon's `guest-stats-polling-interval`, as QEMU takes it; every other property is read-only.
    fn qom_set(&mut self, path: &str, property: &str, value: &serde_json::Value) -> Result<(), QmpError> {
        let id = path.trim_end_matches('/').strip_prefix("/machine/peripheral/").unwrap_or_default();
        let Some(balloon) = self.balloon_with_id(id).filter(|_| property == STATS_POLLING_INTERVAL) else {
            return Err(QmpError::permission_denied());
        };
        let seconds = value
            .as_i64()
            .ok_or_else(|| QmpError::generic(format!("Invalid parameter type for '{property}', expected: integer")))?;
        if seconds < 0 {
            return Err(QmpError::generic("timer value must be greater than zero"));
        }
        let seconds = u32::try_from(seconds).map_err(|_| QmpError::generic("timer value is too big"))?;
        balloon
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_poll_interval(seconds)
            .map_err(|e| QmpError::generic(format!("setting the balloon's statistics timer: {e}")))
    }
}

impl<H: Hypervisor, P: Platform<H>> Vmm<'_, H, P> {
    /// The vCPUs' QOM type: the `-cpu` model's.
    fn cpu_type_name(&self) -> String {
        capabilities::cpu_type_name::<H, P>(self.config.cpu.model.as_deref())
    }

    fn peripherals(&self) -> Vec<(String, String)> {
        capabilities::peripherals::<H, P>(self.config)
    }

    /// The balloon, if the machine has one and it was given `id` (its QOM path is `/machine/peripheral/ID`).
    fn balloon_with_id(&self, id: &str) -> Option<&crate::virtio::BalloonDevice> {
        let configured = self.config.balloon.as_ref()?.frontend.id.as_deref()?;
        (configured == id).then_some(self.balloon.as_ref()?)
    }

    /// The memory the guest has with `pages` in its balloon, as QEMU reports it (BALLOON_CHANGE, query-balloon).
    pub(super) fn balloon_actual_bytes(&self, pages: u32) -> u64 {
        self.config.memory_bytes.saturating_sub(u64::from(pages) << PAGE_SHIFT)
    }

    /// Records an event raised by a QMP command: the issuing session gets it through `events`, every other
    /// session through `raised`.
    pub(super) fn raise(&mut self, events: &mut Vec<Event>, event: Event) {
        self.raised.push(event);
        events.push(event);
    }
}

const STATS_POLLING_INTERVAL: &str = "guest-stats-polling-interval";

/// The balloon's own QOM properties, as QEMU's virtio-balloon-pci has them: the polling interval (writable) and the
/// guest's last statistics (`last-update` in seconds since the epoch, each statistic all ones until reported).
fn balloon_properties(balloon: &Balloon) -> Vec<qmp::QomProperty> {
    let stats = balloon.guest_stats();
    let values: serde_json::Map<String, serde_json::Value> =
        STAT_NAMES.iter().zip(stats.values).map(|(name, value)| (name.to_string(), json!(value))).collect();
    vec![
        capabilities::qom_property(STATS_POLLING_INTERVAL, "int", json!(balloon.poll_interval())),
        capabilities::qom_property(
            "guest-stats",
            "guest statistics",
            json!({"last-update": stats.last_update, "stats": values}),
        ),
    ]
}

/// One PCI function as QMP shows it. Kestrel's functions use MSI-X only (no interrupt pin) and every BAR is a
/// memory BAR placed before the guest starts.
pub(super) fn pci_device(f: &devices::pci::PciFunctionInfo) -> qmp::PciDevice {
    qmp::PciDevice {
        bus: 0,
        slot: f.slot,
        function: f.function,
        class: (f.class_code >> 8) as u16,
        vendor_id: f.vendor_id,
        device_id: f.device_id,
        subsystem_vendor_id: f.subsystem_vendor_id,
        subsystem_id: f.subsystem_id,
        irq: None,
        irq_pin: f.irq_pin,
        qdev_id: f.qdev_id.clone(),
        regions: f
            .bars
            .iter()
            .map(|b| qmp::PciRegion {
                bar: b.index as u8,
                io: b.is_io,
                address: Some(b.address),
                size: b.size,
                prefetchable: b.prefetchable,
                is_64bit: b.is_64bit,
            })
            .collect(),
    }
}

/// One disk as QMP shows it. The backend is named as QEMU names `-drive if=virtio` drives (`virtio0`, ...) and the
/// node as QEMU names nodes it generated (`#block<N>`, a name no user can give). There is no `qdev`: Kestrel's QOM
/// tree has no object for the device, and QMP must not name a path `qom-get` cannot resolve.
pub(super) fn block_device(index: usize, config: &crate::config::DiskConfig, block: &Block) -> BlockDevice {
    use std::os::unix::fs::MetadataExt;
    let s = block.stats();
    BlockDevice {
        device: format!("virtio{index}"),
        qdev: None,
        node_name: format!("#block{index}"),
        file: config.path.display().to_string(),
        read_only: block.read_only(),
        direct: config.direct,
        virtual_size: block.capacity() * 512,
        // st_blocks counts 512-byte units whatever the file system's block size.
        actual_size: std::fs::metadata(&config.path).ok().map(|m| m.blocks() * 512),
        stats: BlockDeviceStats {
            rd_bytes: s.rd_bytes,
            // QEMU accounts write-zeroes as writes and discards as unmaps.
            wr_bytes: s.wr_bytes + s.write_zeroes_bytes,
            unmap_bytes: s.discard_bytes,
            rd_operations: s.rd_operations,
            wr_operations: s.wr_operations + s.write_zeroes_operations,
            flush_operations: s.flush_operations,
            unmap_operations: s.discard_operations,
            rd_total_time_ns: s.total_time_ns.read,
            wr_total_time_ns: s.total_time_ns.write + s.total_time_ns.write_zeroes,
            flush_total_time_ns: s.total_time_ns.flush,
            unmap_total_time_ns: s.total_time_ns.discard,
            wr_highest_offset: s.wr_highest_offset,
            failed_rd_operations: s.failed.read,
            failed_wr_operations: s.failed.write + s.failed.write_zeroes,
            failed_flush_operations: s.failed.flush,
            failed_unmap_operations: s.failed.discard,
            invalid_rd_operations: s.invalid.read,
            invalid_wr_operations: s.invalid.write + s.invalid.write_zeroes,
            invalid_flush_operations: s.invalid.flush,
            invalid_unmap_operations: s.invalid.discard,
        },
    }
}

/// `-uuid` as bytes; all zeros without one, as QEMU reports.
pub(super) fn uuid_bytes(config: &VmConfig) -> [u8; 16] {
    let hex: String = config.uuid.as_deref().unwrap_or_default().chars().filter(|c| *c != '-').collect();
    let mut bytes = [0u8; 16];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = hex.get(2 * i..2 * i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()).unwrap_or(0);
    }
    bytes
}

/// A chardev's `filename` as QEMU's `query-chardev` gives it, a pty's with its path.
fn chardev_filename(backend: &SerialConfig, pty: Option<&str>) -> String {
    match backend {
        SerialConfig::Stdio => "stdio".to_string(),
        SerialConfig::Pty => format!("pty:{}", pty.unwrap_or_default()),
        SerialConfig::File(path) => format!("file:{}", path.display()),
        SerialConfig::None => "null".to_string(),
        SerialConfig::Socket(socket) => format!("{},server=on", socket.address),
    }
}

/// The QMP monitors as `query-chardev` shows them, labelled as QEMU labels `-qmp` monitors.
pub(super) fn monitor_chardevs(config: &VmConfig) -> impl Iterator<Item = ChardevInfo> + '_ {
    config.qmp.iter().enumerate().map(|(i, socket)| ChardevInfo {
        label: format!("compat_monitor{i}"),
        filename: format!("{},server=on", socket.address),
        frontend_open: true,
    })
}

pub(super) fn cpu_qom_path(index: usize) -> String {
    format!("/machine/unattached/device[{index}]")
}

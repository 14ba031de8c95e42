//! Saving and restoring through QMP and `-incoming`: `migrate`, `migrate-incoming` and the restore of
//! `-incoming`, with QEMU's migration states and `MIGRATION` events.

use std::time::Instant;

use hypervisor::Hypervisor;
use qmp::{Event, EventKind, MigrationChannel, MigrationInfo, MigrationRam, MigrationStatus, QmpError, RunState};

use crate::config::{Incoming as IncomingConfig, VmConfig};
use crate::platform::Platform;
use crate::snapshot::{self as snapshot_file, SaveTarget, SavedMachine};
use crate::{inherited, Error};

use super::{qmp_event, Vmm};

impl<H: Hypervisor, P: Platform<H>> Vmm<'_, H, P> {
    /// Raises a `MIGRATION` event, if the `events` capability is on.
    pub(super) fn report_migration(&mut self, events: &mut Vec<Event>, status: MigrationStatus) {
        if self.migration_capabilities.events {
            self.raise(events, qmp_event(EventKind::Migration { status }));
        }
    }
    /// The CPU the guest sees, as a snapshot's header records it: asked of the host when a save or a restore
    /// needs it, not at start-up.
    pub(super) fn cpu_identity(&self) -> Result<snapshot::CpuIdentity, Error> {
        P::cpu_identity(&self.hypervisor, self.config.vcpus, &self.cpu)
    }
    /// An incoming migration from `source`: `setup`, `active`, the restore, then the guest paused or running
    /// (`autostart`) and `completed`. A file that does not fit is refused before guest memory is touched, and the
    /// machine keeps waiting; a stream that fails leaves guest memory half-filled, so the error ends Kestrel
    /// (QEMU exits too).
    pub(super) fn restore_incoming(&mut self, source: IncomingSource, events: &mut Vec<Event>) -> Result<(), Error> {
        match source {
            IncomingSource::File(path) => {
                let cpu = self.cpu_identity()?;
                let components = self.platform.components();
                let machine = snapshot_machine::<H, P>(self.config, &cpu, &components);
                self.incoming = Some(snapshot_file::open(&path, &machine)?);
                self.waiting_for_incoming = false;
                self.migration = Some(incoming_info(MigrationStatus::Setup, None));
                self.report_migration(events, MigrationStatus::Setup);
                self.finish_incoming(Instant::now(), events)
            }
            IncomingSource::Stream(fd) => self.restore_stream(fd, events),
        }
    }
    pub(super) fn restore_stream(&mut self, fd: std::os::fd::OwnedFd, events: &mut Vec<Event>) -> Result<(), Error> {
        let started = Instant::now();
        self.waiting_for_incoming = false;
        self.migration = Some(incoming_info(MigrationStatus::Setup, None));
        self.report_migration(events, MigrationStatus::Setup);
        let cpu = self.cpu_identity()?;
        let components = self.platform.components();
        let machine = snapshot_machine::<H, P>(self.config, &cpu, &components);
        self.migration = Some(incoming_info(MigrationStatus::Active, None));
        self.report_migration(events, MigrationStatus::Active);
        match snapshot_file::read_stream(fd, &machine, &self.memory) {
            Ok(incoming) => {
                self.incoming = Some(incoming);
                self.finish_incoming(started, events)
            }
            Err(error) => {
                self.migration = Some(incoming_info(MigrationStatus::Failed, Some(error.to_string())));
                self.report_migration(events, MigrationStatus::Failed);
                Err(error)
            }
        }
    }
    /// Boots from the checked snapshot and lets the guest run if it is to.
    pub(super) fn finish_incoming(&mut self, started: Instant, events: &mut Vec<Event>) -> Result<(), Error> {
        if matches!(self.migration.as_ref().map(|m| m.status), Some(MigrationStatus::Setup)) {
            self.migration = Some(incoming_info(MigrationStatus::Active, None));
            self.report_migration(events, MigrationStatus::Active);
        }
        self.state = if self.autostart { RunState::Running } else { RunState::Paused };
        if let Err(error) = self.boot() {
            self.migration = Some(incoming_info(MigrationStatus::Failed, Some(error.to_string())));
            self.report_migration(events, MigrationStatus::Failed);
            return Err(error);
        }
        if self.autostart {
            self.raise(events, qmp_event(EventKind::Resume));
        }
        let mut info = incoming_info(MigrationStatus::Completed, None);
        info.total_time_ms = started.elapsed().as_millis() as u64;
        self.migration = Some(info);
        self.report_migration(events, MigrationStatus::Completed);
        Ok(())
    }
    /// Writes the machine to `target`. The vCPUs must be held (`pause`); the devices are quiesced for the copy and
    /// work again afterwards, whatever the outcome.
    pub(super) fn save(&self, target: SaveTarget<'_>) -> Result<snapshot_file::SaveStats, String> {
        let guest = self.guest.as_ref().ok_or("the machine has no VM")?;
        snapshot_file::check_not_mapped(&target, self.memory_file)?;
        let cpu = self.cpu_identity().map_err(|e| e.to_string())?;
        let vcpus = guest.vcpus.save_states()?;
        let mut vm = P::save_vm(guest.vm.as_ref())?;
        let vm_read_at = Instant::now();
        let ages: Vec<_> = vcpus.iter().map(|saved| vm_read_at.saturating_duration_since(saved.read_at)).collect();
        let mut vcpus: Vec<_> = vcpus.into_iter().map(|saved| saved.state).collect();
        P::settle_saved_clocks(&mut vcpus, &ages, &mut vm, &self.memory);
        self.platform.quiesce_devices();
        let saved = (|| {
            // The disks' state is their files: what an image format caches goes to them before the save completes.
            self.flush_disk_images()?;
            let devices = self
                .platform
                .components()
                .into_iter()
                .map(|c| c.device.save_value().map(|state| (c.name, state)))
                .collect::<Result<Vec<_>, String>>()?;
            let header = snapshot::Header::new(machine_name::<H, P>(self.config), cpu);
            snapshot_file::write(target, &SavedMachine { header, vm, vcpus, devices }, &self.memory)
        })();
        self.platform.resume_devices();
        saved
    }
    /// QEMU's non-live save to a file or a descriptor (a pipe is written front to back, then closed): the vCPUs
    /// stop for the copy and the machine ends in `postmigrate` (`cont` resumes it). The copy runs to its end
    /// before the reply, so its events come first; a write that fails resumes a guest that was running and says
    /// why in `query-migrate`.
    pub(super) fn save_to(&mut self, channel: MigrationChannel, events: &mut Vec<Event>) -> Result<(), QmpError> {
        if self.state.needs_reset() || self.guest.is_none() {
            return Err(QmpError::generic(format!("cannot save the VM in state '{}'", self.state.as_str())));
        }
        if self.config.bios.is_some() {
            // A migration blocker, refused before anything changes as QEMU refuses one; a restore refuses -bios too:
            // the firmware's flash and fw_cfg are not in a snapshot yet.
            return Err(QmpError::generic("cannot save a machine booted from firmware (-bios): not supported yet"));
        }
        let path;
        let target = match channel {
            MigrationChannel::File(file) => {
                path = file;
                SaveTarget::Path(&path)
            }
            MigrationChannel::Passed(fd) => SaveTarget::Fd(fd),
            MigrationChannel::Inherited(fd) => SaveTarget::Fd(inherited::claim(fd).map_err(QmpError::generic)?),
        };
        let started = Instant::now();
        let report = |vmm: &mut Self, events: &mut Vec<Event>, status| vmm.report_migration(events, status);
        self.migration = Some(MigrationInfo {
            status: MigrationStatus::Setup,
            incoming: false,
            total_time_ms: 0,
            downtime_ms: None,
            setup_time_ms: 0,
            ram: None,
            error: None,
        });
        report(self, events, MigrationStatus::Setup);
        let was_running = self.state == RunState::Running;
        let setup_time_ms = started.elapsed().as_millis() as u64;
        report(self, events, MigrationStatus::Active);
        let stopped = Instant::now();
        if was_running {
            self.pause(RunState::FinishMigrate);
            self.raise(events, qmp_event(EventKind::Stop));
        }
        let what = target.describe();
        let saved = self.save(target);
        let ms = |since: Instant| since.elapsed().as_millis() as u64;
        match saved {
            Ok(stats) => {
                self.state = RunState::PostMigrate;
                let seconds = started.elapsed().as_secs_f64().max(1e-6);
                self.migration = Some(MigrationInfo {
                    status: MigrationStatus::Completed,
                    incoming: false,
                    total_time_ms: ms(started),
                    downtime_ms: Some(ms(stopped)),
                    setup_time_ms,
                    ram: Some(MigrationRam {
                        transferred: stats.bytes,
                        total: self.config.memory_bytes,
                        duplicate: stats.pages - stats.stored_pages,
                        normal: stats.stored_pages,
                        page_size: stats.page_size,
                        mbps: stats.bytes as f64 * 8.0 / 1e6 / seconds,
                        pages_per_second: (stats.pages as f64 / seconds) as u64,
                    }),
                    error: None,
                });
                report(self, events, MigrationStatus::Completed);
            }
            Err(error) => {
                eprintln!("kestrel: migrate to {what} failed: {error}");
                self.migration = Some(MigrationInfo {
                    status: MigrationStatus::Failed,
                    incoming: false,
                    total_time_ms: ms(started),
                    downtime_ms: None,
                    setup_time_ms,
                    ram: None,
                    error: Some(error),
                });
                report(self, events, MigrationStatus::Failed);
                if was_running {
                    self.resume();
                    self.raise(events, qmp_event(EventKind::Resume));
                }
            }
        }
        Ok(())
    }
    /// `-incoming defer`'s second half. The channel's problems (a file that does not fit, a descriptor not
    /// passed) are refused and the machine keeps waiting; a stream that fails once read ends Kestrel.
    pub(super) fn load_from(&mut self, channel: MigrationChannel, events: &mut Vec<Event>) -> Result<(), QmpError> {
        if !self.waiting_for_incoming {
            return Err(QmpError::generic(match self.config.incoming {
                Some(IncomingConfig::Defer) => "The incoming migration has already been started",
                _ => "'-incoming' was not specified on the command line",
            }));
        }
        let source = match channel {
            MigrationChannel::File(path) => IncomingSource::File(path),
            MigrationChannel::Passed(fd) => IncomingSource::Stream(fd),
            MigrationChannel::Inherited(fd) => IncomingSource::Stream(inherited::claim(fd).map_err(QmpError::generic)?),
        };
        let streamed = matches!(source, IncomingSource::Stream(_));
        self.restore_incoming(source, events).map_err(|error| {
            let message = error.to_string();
            if streamed || !self.waiting_for_incoming {
                self.fatal = Some(error);
            }
            QmpError::generic(message)
        })
    }
}

/// Where `migrate-incoming` reads from.
pub(super) enum IncomingSource {
    File(std::path::PathBuf),
    Stream(std::os::fd::OwnedFd),
}

/// `query-migrate` on the destination: QEMU reports the status only.
pub(super) fn incoming_info(status: MigrationStatus, error: Option<String>) -> MigrationInfo {
    MigrationInfo { status, incoming: true, total_time_ms: 0, downtime_ms: None, setup_time_ms: 0, ram: None, error }
}

/// What a snapshot for this command line must match.
pub(super) fn snapshot_machine<'c, H: Hypervisor, P: Platform<H>>(
    config: &VmConfig,
    cpu: &snapshot::CpuIdentity,
    components: &'c [crate::snapshot::Component],
) -> snapshot_file::Machine<'c> {
    snapshot_file::Machine {
        machine_type: machine_name::<H, P>(config),
        cpu: cpu.clone(),
        ram_regions: P::ram_regions(config.memory_bytes),
        vcpus: usize::from(config.vcpus),
        components,
    }
}

/// The machine type a snapshot records: the one the command line names, or the platform's default.
pub(super) fn machine_name<H: Hypervisor, P: Platform<H>>(config: &VmConfig) -> &'static str {
    config.machine.map(|m| m.name()).unwrap_or(P::DEFAULT_MACHINE_NAME)
}

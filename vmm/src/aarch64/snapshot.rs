//! What a `virt` machine's snapshot holds, and how a VM is built from one: the PL011, PL031 and PL061, the
//! virtio-mmio devices, the PCI bus's functions, every vCPU's registers (as KVM lists them: core, system, timer and
//! firmware registers) and PSCI power state, and the vGICv3 (distributor, redistributors, CPU interfaces; with PCI
//! devices, the ITS's registers and the redistributors' LPI registers, the ITS's tables being in guest memory). The order of the steps is
//! `crate::snapshot`'s; the order KVM needs inside a restore is `Platform::restore`'s, commented there.

use std::sync::Arc;

use arch::aarch64::GicVersion;
use hypervisor::aarch64::{system_register_id, VcpuAarch64, VcpuStateAarch64, VmAarch64};
use hypervisor::Vm;
use snapshot::CpuIdentity;

use super::{create_vcpus_and_gic, VcpuState, VcpusAndGic, Virt, VirtHypervisor, VmState};
use crate::cpu_model::GuestCpu;
use crate::platform::{Platform, Snapshots, VcpuOf};
use crate::snapshot::Component;
use crate::Error;

const MIDR_EL1: u64 = system_register_id(3, 0, 0, 0, 0);
const MPIDR_EL1: u64 = system_register_id(3, 0, 0, 0, 5);

/// An AArch64 ID register whose fields say what the guest may use, each a 4-bit field where more is a superset of
/// less; `signed` names the fields (by their low bit) that are signed, where 0xf means "not implemented".
struct IdRegister {
    name: &'static str,
    id: u64,
    signed: &'static [u32],
}

/// The feature ID registers a guest reads to decide what it uses (Linux's cpufeature, glibc's ifuncs): processor,
/// debug, instruction set and memory model features. KVM hands the guest the host's sanitised values, narrowed to
/// what it supports and what the vCPU was initialised with.
const ID_REGISTERS: &[IdRegister] = &[
    // FP (bits 19:16) and AdvSIMD (23:20) are signed.
    IdRegister { name: "ID_AA64PFR0_EL1", id: system_register_id(3, 0, 0, 4, 0), signed: &[16, 20] },
    IdRegister { name: "ID_AA64PFR1_EL1", id: system_register_id(3, 0, 0, 4, 1), signed: &[] },
    IdRegister { name: "ID_AA64ZFR0_EL1", id: system_register_id(3, 0, 0, 4, 4), signed: &[] },
    IdRegister { name: "ID_AA64SMFR0_EL1", id: system_register_id(3, 0, 0, 4, 5), signed: &[] },
    // DoubleLock (bits 39:36) is signed.
    IdRegister { name: "ID_AA64DFR0_EL1", id: system_register_id(3, 0, 0, 5, 0), signed: &[36] },
    IdRegister { name: "ID_AA64ISAR0_EL1", id: system_register_id(3, 0, 0, 6, 0), signed: &[] },
    IdRegister { name: "ID_AA64ISAR1_EL1", id: system_register_id(3, 0, 0, 6, 1), signed: &[] },
    IdRegister { name: "ID_AA64ISAR2_EL1", id: system_register_id(3, 0, 0, 6, 2), signed: &[] },
    // TGran64 (bits 27:24) and TGran4 (31:28) are signed.
    IdRegister { name: "ID_AA64MMFR0_EL1", id: system_register_id(3, 0, 0, 7, 0), signed: &[24, 28] },
    IdRegister { name: "ID_AA64MMFR1_EL1", id: system_register_id(3, 0, 0, 7, 1), signed: &[] },
    IdRegister { name: "ID_AA64MMFR2_EL1", id: system_register_id(3, 0, 0, 7, 2), signed: &[] },
];

/// The CPU identity a guest that read `midr` and `id_values` (one per `ID_REGISTERS` entry, `None` where the host
/// has no such register) saw. The vendor is the whole MIDR_EL1 (implementer, part, variant and revision): KVM shows
/// the guest the host's and will not load another. Each ID register field with level `n` is recorded as
/// "`REG[hi:lo]>=k`" for every level `k` from 1 (0 for a signed field) up to `n`, so that "every feature the guest
/// saw is on this host" means "no field of the host's is below the guest's".
fn identity(midr: u64, id_values: &[Option<u64>]) -> CpuIdentity {
    let vendor = format!("{} (MIDR_EL1 {midr:#010x})", implementer(midr));
    let mut features = Vec::new();
    for (register, value) in ID_REGISTERS.iter().zip(id_values) {
        let Some(value) = value else { continue };
        for low in (0..64).step_by(4) {
            let field = (value >> low) & 0xf;
            let (first, level) = match register.signed.contains(&low) {
                // 0x8-0xf are negative: 0xf "not implemented", nothing to record.
                true if field >= 8 => continue,
                true => (0, field),
                false => (1, field),
            };
            features.extend((first..=level).map(|k| format!("{}[{}:{low}]>={k}", register.name, low + 3)));
        }
    }
    CpuIdentity::new(vendor, features)
}

/// The implementer code in MIDR_EL1's bits 31:24, by name where known.
fn implementer(midr: u64) -> String {
    let code = (midr >> 24) & 0xff;
    let name = match code {
        0x00 => "software",
        0x41 => "Arm",
        0x42 => "Broadcom",
        0x43 => "Cavium",
        0x46 => "Fujitsu",
        0x48 => "HiSilicon",
        0x4e => "NVIDIA",
        0x50 => "Applied Micro",
        0x51 => "Qualcomm",
        0x61 => "Apple",
        0x6d => "Microsoft",
        0xc0 => "Ampere",
        _ => return format!("implementer {code:#04x}"),
    };
    name.into()
}

/// Refuses vCPU states that cannot be loaded into vCPUs KVM gave `mpidrs`: each state must hold MPIDR_EL1 and name
/// the same vCPU, since the GIC's state and the FDT in guest memory name vCPUs by it.
fn check_vcpu_states(states: &[VcpuStateAarch64], mpidrs: &[u64]) -> Result<(), Error> {
    if states.len() != mpidrs.len() {
        return Err(Error::Snapshot(format!(
            "cannot restore: {} vCPU states for {} vCPUs",
            states.len(),
            mpidrs.len()
        )));
    }
    for (index, (state, &mpidr)) in states.iter().zip(mpidrs).enumerate() {
        let saved = state.registers.iter().find(|r| r.id == MPIDR_EL1).map(|r| r.value.as_slice());
        let saved = match saved.map(<[u8; 8]>::try_from) {
            Some(Ok(bytes)) => u64::from_le_bytes(bytes),
            Some(Err(_)) => {
                return Err(Error::Snapshot(format!("cannot restore vCPU {index}: MPIDR_EL1 is not 8 bytes")))
            }
            None => return Err(Error::Snapshot(format!("cannot restore vCPU {index}: its state has no MPIDR_EL1"))),
        };
        if saved != mpidr {
            return Err(Error::Snapshot(format!(
                "cannot restore vCPU {index}: it was MPIDR {saved:#x}, this host's KVM makes it {mpidr:#x}"
            )));
        }
    }
    Ok(())
}

impl<H: VirtHypervisor> Snapshots<H> for Virt {
    type VcpuState = VcpuState;
    type VmState = VmState;

    /// The machine type a snapshot records when the command line names none.
    const DEFAULT_MACHINE_NAME: &'static str = "virt";

    /// The CPU a guest sees on this host, as [`identity`] records it. KVM decides what a vCPU's ID registers
    /// show only once it is initialised, so this asks a scratch VM's vCPU, initialised as a boot's are.
    /// aarch64 guests get the host's CPU only (no models, no feature settings, one socket).
    fn cpu_identity(hypervisor: &H, _vcpu_count: u8, _cpu: &GuestCpu) -> Result<CpuIdentity, Error> {
        let vm = hypervisor.create_vm()?;
        let vcpu = vm.create_vcpu(0)?;
        vm.init_vcpu(&vcpu, false)?;
        let midr = vcpu.read_register(MIDR_EL1)?;
        // A register an older KVM does not have reads as an error: the guest saw no such register either.
        let id_values: Vec<Option<u64>> = ID_REGISTERS.iter().map(|r| vcpu.read_register(r.id).ok()).collect();
        Ok(identity(midr, &id_values))
    }

    /// Every device whose state a snapshot holds, each with its section's name.
    fn components(&self) -> Vec<Component> {
        let mut components = vec![
            Component::new("pl011", self.uart.clone()),
            Component::new("pl031", self.rtc.clone()),
            Component::new("pl061", self.gpio.clone()),
        ];
        components.extend(self.virtio.iter().enumerate().map(|(index, slot)| slot.component(index)));
        if let Some(pci) = &self.pci {
            components.extend(pci.components());
        }
        components
    }

    /// Stops every virtio device's work on guest memory, for a save (the vCPUs are already held).
    fn quiesce_devices(&self) {
        self.virtio.iter().for_each(|slot| slot.quiesce());
        if let Some(pci) = &self.pci {
            pci.quiesce();
        }
    }

    /// Lets quiesced or restored virtio devices work again.
    fn resume_devices(&self) {
        self.virtio.iter().for_each(|slot| slot.resume());
        if let Some(pci) = &self.pci {
            pci.resume();
        }
    }

    /// One vCPU's state as data; run on the vCPU's thread, which owns it, once its last exit is complete. The
    /// timers' CTL, CVAL and counter are among the registers.
    fn save_vcpu(vcpu: &mut VcpuOf<H>) -> Result<VcpuState, String> {
        vcpu.save_state().map_err(|e| e.to_string())
    }

    /// The vGICv3's state, with every vCPU held (KVM refuses it while one runs): its redistributors and CPU
    /// interfaces named by the MPIDRs the VM's vCPUs were given. With an ITS, this also writes its tables and the
    /// pending LPIs into guest memory, which is saved after.
    fn save_vm(vm: &H::Vm) -> Result<VmState, String> {
        vm.save_gic_state(&vm.vcpu_mpidrs()).map_err(|e| e.to_string())
    }

    /// Builds a fresh VM from saved states instead of booting a kernel, the devices' states and guest memory
    /// already loaded. Returns the vCPUs, boot vCPU first; the caller starts them only if all of it loaded.
    ///
    /// The order is KVM's:
    /// 1. The vCPUs, created and initialised (KVM_ARM_VCPU_INIT) as a boot makes them: initialisation fixes each
    ///    one's register list and gives it its MPIDR, and must precede its registers being written.
    /// 2. The vGIC, created and initialised for them: KVM sizes the redistributors by the vCPUs that exist and
    ///    creates no vCPU after that. Then the devices' irqfds and ioeventfds, which need the GIC.
    /// 3. Each vCPU's registers and power state. MPIDR_EL1 is checked first to be the one this KVM gave the vCPU
    ///    (the GIC state and the FDT name vCPUs by it). The timers come through ONE_REG with the rest: CVAL is an
    ///    absolute time on the guest's counter, and writing KVM_REG_ARM_TIMER_CNT sets the VM's counter offset so
    ///    that the guest's virtual counter reads the saved value now. The guest's counter (and with it its
    ///    clocksource and /proc/uptime) thus goes on from where the save stopped it instead of jumping by the time
    ///    the VM spent saved, and a pending CVAL keeps its meaning. KVM evaluates a timer's output after each of these
    ///    writes and again when the vCPU loads, so what counts is their values once all are written, not their
    ///    order (KVM lists, and a save stores, CVAL, CTL, then CNT). The offset is the VM's: each
    ///    vCPU's write sets it again, the last one wins, and the vCPUs' saved counts differ only by the
    ///    microseconds between their threads' reads, so every vCPU agrees on one counter.
    /// 4. The vGIC's state last: distributor, then each redistributor and CPU interface by MPIDR (so the MPIDRs
    ///    must be in place), overriding what loading the registers made the GIC see (the timers' re-evaluated
    ///    lines), with the saved pending, active and enable bits; with PCI devices, then the LPI registers and the
    ///    ITS (created with the GIC in step 2), whose tables KVM reads from the guest memory already loaded.
    fn restore(
        &self,
        _hypervisor: &H,
        vm: &Arc<H::Vm>,
        vcpu_states: &[VcpuState],
        vm_state: &VmState,
        _cpu: &GuestCpu,
    ) -> Result<Vec<VcpuOf<H>>, Error> {
        let count = u32::try_from(vcpu_states.len())
            .ok()
            .filter(|&count| (1..=<Self as Platform<H>>::MAX_VCPUS).contains(&count))
            .ok_or_else(|| Error::Snapshot(format!("cannot restore {} vCPUs", vcpu_states.len())))?;
        if let Some(pci) = &self.pci {
            // BARs decode (and queue notifiers sit) where the loaded configuration spaces say.
            pci.refresh();
        }
        let VcpusAndGic { vcpus, gic, mpidrs } = create_vcpus_and_gic(vm.as_ref(), count)?;
        if gic != GicVersion::V3 {
            return Err(Error::Snapshot(
                "cannot restore: the snapshot holds a GICv3's state and this host's KVM emulates a GICv2 only".into(),
            ));
        }
        self.wire_vm(vm, gic)?;
        check_vcpu_states(vcpu_states, &mpidrs)?;
        for (index, (vcpu, saved)) in vcpus.iter().zip(vcpu_states).enumerate() {
            vcpu.restore_state(saved).map_err(|e| Error::Snapshot(format!("cannot restore vCPU {index}: {e}")))?;
        }
        vm.restore_gic_state(&mpidrs, vm_state)
            .map_err(|e| Error::Snapshot(format!("cannot restore the interrupt controller: {e}")))?;
        Ok(vcpus)
    }
}

#[cfg(test)]
mod tests {
    use hypervisor::aarch64::{PowerState, Register};

    use super::*;

    fn vcpu_state(mpidr: Option<Vec<u8>>) -> VcpuStateAarch64 {
        let mut registers = vec![Register { id: MIDR_EL1, value: vec![0; 8] }];
        registers.extend(mpidr.map(|value| Register { id: MPIDR_EL1, value }));
        VcpuStateAarch64 { registers, power_state: PowerState::Runnable }
    }

    #[test]
    fn vcpu_states_must_name_the_vcpus_kvm_made() {
        let mpidrs = [0x8000_0000, 0x8000_0001];
        let good = [0x8000_0000u64, 0x8000_0001].map(|m| vcpu_state(Some(m.to_le_bytes().to_vec())));
        check_vcpu_states(&good, &mpidrs).unwrap();

        let refused = |states: &[VcpuStateAarch64], expected: &str| {
            let error = check_vcpu_states(states, &mpidrs).unwrap_err().to_string();
            assert!(error.contains(expected), "{error:?} does not say {expected:?}");
            assert!(!error.contains('\n'), "one line: {error:?}");
        };
        refused(&good[..1], "1 vCPU states for 2 vCPUs");
        let swapped = [good[1].clone(), good[0].clone()];
        refused(&swapped, "vCPU 0: it was MPIDR 0x80000001, this host's KVM makes it 0x80000000");
        refused(&[good[0].clone(), vcpu_state(None)], "vCPU 1: its state has no MPIDR_EL1");
        refused(&[good[0].clone(), vcpu_state(Some(vec![1; 4]))], "vCPU 1: MPIDR_EL1 is not 8 bytes");
    }

    /// ID register values like a Neoverse N1 host's: AES and PMULL (ISAR0[7:4]=2), FP and AdvSIMD implemented.
    fn n1_like() -> Vec<Option<u64>> {
        let mut values = vec![None; ID_REGISTERS.len()];
        values[0] = Some(0x1100_0000_0001_0011); // PFR0: EL0 and EL1 AArch64, FP=1 (half precision), AdvSIMD=0
        values[5] = Some(0x0000_1000_1000_0020); // ISAR0: AES=2, ...
        values
    }

    #[test]
    fn the_identity_records_every_level_of_every_field_so_a_lesser_host_is_refused() {
        let midr = 0x410f_d0c1;
        let host = identity(midr, &n1_like());
        assert_eq!(host.vendor, "Arm (MIDR_EL1 0x410fd0c1)");
        for feature in ["ID_AA64ISAR0_EL1[7:4]>=1", "ID_AA64ISAR0_EL1[7:4]>=2", "ID_AA64PFR0_EL1[19:16]>=0"] {
            assert!(host.features.contains(feature), "{feature} missing from {:?}", host.features);
        }
        assert!(!host.features.contains("ID_AA64ISAR0_EL1[7:4]>=3"));
        assert!(!host.features.contains("ID_AA64ISAR0_EL1[3:0]>=1"), "a zero unsigned field records nothing");
        host.check_can_run(&host).unwrap();

        // A host without PMULL (AES=1) or without FP (0xf, signed: not implemented) cannot run that guest.
        let mut lesser = n1_like();
        lesser[5] = Some(0x0000_1000_1000_0010);
        let error = identity(midr, &lesser).check_can_run(&host).unwrap_err().to_string();
        assert!(error.contains("ID_AA64ISAR0_EL1[7:4]>=2"), "{error}");
        let mut no_fp = n1_like();
        no_fp[0] = Some(0x1100_0000_000f_0011);
        let error = identity(midr, &no_fp).check_can_run(&host).unwrap_err().to_string();
        assert!(error.contains("ID_AA64PFR0_EL1[19:16]>=0"), "{error}");
        // A host with more runs it; another CPU model is refused by its MIDR.
        let mut more = n1_like();
        more[5] = Some(0x0000_1000_1000_1120);
        identity(midr, &more).check_can_run(&host).unwrap();
        let error = identity(0x410f_d401, &n1_like()).check_can_run(&host).unwrap_err().to_string();
        assert!(error.contains("0x410fd401") && error.contains("0x410fd0c1"), "{error}");
    }

    #[test]
    fn implementers_by_name_or_code() {
        assert_eq!(implementer(0x410f_d083), "Arm");
        assert_eq!(implementer(0x000f_0510), "software", "QEMU's TCG -cpu max");
        assert_eq!(implementer(0x2a00_0000), "implementer 0x2a");
    }

    #[test]
    fn the_id_registers_are_the_architecture_s_encodings() {
        // op0=3, op1=0, CRn=0, CRm=4..7: the AArch64 feature ID space.
        assert_eq!(ID_REGISTERS[0].id & 0xffff, 0xc020, "ID_AA64PFR0_EL1");
        assert_eq!(ID_REGISTERS[5].id & 0xffff, 0xc030, "ID_AA64ISAR0_EL1");
        assert_eq!(ID_REGISTERS[8].id & 0xffff, 0xc038, "ID_AA64MMFR0_EL1");
        assert_eq!(MIDR_EL1 & 0xffff, 0xc000);
        let names: std::collections::HashSet<_> = ID_REGISTERS.iter().map(|r| r.name).collect();
        assert_eq!(names.len(), ID_REGISTERS.len());
        assert!(ID_REGISTERS.iter().all(|r| r.signed.iter().all(|low| low % 4 == 0 && *low < 64)));
    }
}

//! KVM on aarch64: vCPU initialisation, the in-kernel vGIC, core and system registers through KVM_{GET,SET}_ONE_REG.

use std::fmt::Write;
use std::mem::offset_of;
use std::sync::{Mutex, OnceLock};

use arch::aarch64::layout::GicLayout;
use arch::aarch64::{BootRegisters, GicVersion};
use kvm_bindings::{
    kvm_create_device, kvm_device_attr, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_ITS,
    kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V2, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3, kvm_regs, kvm_vcpu_init,
    user_pt_regs, KVM_ARM_VCPU_POWER_OFF, KVM_ARM_VCPU_PSCI_0_2, KVM_DEV_ARM_VGIC_CTRL_INIT, KVM_DEV_ARM_VGIC_GRP_ADDR,
    KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS, KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_VGIC_GRP_DIST_REGS,
    KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO, KVM_DEV_ARM_VGIC_GRP_NR_IRQS, KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, KVM_REG_ARM64,
    KVM_REG_ARM_CORE, KVM_REG_SIZE_U64, KVM_VGIC_ITS_ADDR_TYPE, KVM_VGIC_V2_ADDR_TYPE_CPU, KVM_VGIC_V2_ADDR_TYPE_DIST,
    KVM_VGIC_V3_ADDR_TYPE_DIST, KVM_VGIC_V3_ADDR_TYPE_REDIST,
};
use kvm_bindings::{kvm_mp_state, RegList, KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_STOPPED, KVM_MP_STATE_SUSPENDED};
use kvm_bindings::{
    KVM_DEV_ARM_ITS_RESTORE_TABLES, KVM_DEV_ARM_ITS_SAVE_TABLES, KVM_DEV_ARM_VGIC_GRP_ITS_REGS,
    KVM_DEV_ARM_VGIC_SAVE_PENDING_TABLES,
};
use kvm_ioctls::{reg_size, DeviceFd, VcpuExit as KvmExit};

use super::{KvmVcpu, KvmVm};
use crate::aarch64::{
    system_register_id, ExitAarch64, GicCpuState, GicItsRegister, GicRegister, GicStateAarch64, GicSystemRegister,
    PowerState, Register, VcpuAarch64, VcpuStateAarch64, VmAarch64,
};
use crate::{Error, Result};

/// The exits of `KVM_RUN` that only aarch64 has: none that reaches the VMM yet (see `ExitAarch64`).
pub(super) fn arch_exit(_exit: &KvmExit<'_>) -> Option<ExitAarch64> {
    None
}

/// KVM_{GET,SET}_ONE_REG id of a 64-bit core register: its offset in `struct kvm_regs`, in 32-bit words.
const fn core_register(offset: usize) -> u64 {
    KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE as u64 | (offset / 4) as u64
}

const fn x_register(index: usize) -> u64 {
    core_register(offset_of!(kvm_regs, regs) + offset_of!(user_pt_regs, regs) + index * 8)
}

const PC: u64 = core_register(offset_of!(kvm_regs, regs) + offset_of!(user_pt_regs, pc));
const PSTATE: u64 = core_register(offset_of!(kvm_regs, regs) + offset_of!(user_pt_regs, pstate));
const SP_EL0: u64 = core_register(offset_of!(kvm_regs, regs) + offset_of!(user_pt_regs, sp));
const SP_EL1: u64 = core_register(offset_of!(kvm_regs, sp_el1));

const MPIDR_EL1: u64 = system_register_id(3, 0, 0, 0, 5);
const ESR_EL1: u64 = system_register_id(3, 0, 5, 2, 0);
const FAR_EL1: u64 = system_register_id(3, 0, 6, 0, 0);
const ELR_EL1: u64 = core_register(offset_of!(kvm_regs, elr_el1));

/// The vGIC models in order of preference: nested hosts often emulate only a GICv3, older ones only a GICv2.
const GIC_DEVICES: [(GicVersion, u32); 2] = [
    (GicVersion::V3, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3),
    (GicVersion::V2, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V2),
];

impl VmAarch64 for KvmVm {
    fn init_vcpu(&self, vcpu: &KvmVcpu, powered_off: bool) -> Result<()> {
        let mut init = kvm_vcpu_init::default();
        self.fd.get_preferred_target(&mut init).map_err(|e| Error::new("KVM_ARM_PREFERRED_TARGET", e))?;
        init.features[0] |= 1 << KVM_ARM_VCPU_PSCI_0_2;
        if powered_off {
            init.features[0] |= 1 << KVM_ARM_VCPU_POWER_OFF;
        }
        vcpu.fd.vcpu_init(&init).map_err(|e| Error::new("KVM_ARM_VCPU_INIT", e))?;
        // KVM gives the vCPU its MPIDR at KVM_ARM_VCPU_INIT.
        let mpidr = vcpu.mpidr()?;
        self.arch.mpidrs.lock().unwrap_or_else(|p| p.into_inner()).push(mpidr);
        Ok(())
    }

    fn vcpu_mpidrs(&self) -> Vec<u64> {
        self.arch.mpidrs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn create_gic(&self, layout: &GicLayout, vcpu_count: u32, irq_count: u32) -> Result<GicVersion> {
        // KVM sizes the redistributor region from the vCPU count; the layout must have room for that many.
        if vcpu_count == 0 || vcpu_count > layout.max_vcpus {
            let refusal =
                format!("vCPUs: {vcpu_count} vCPUs requested, the GIC layout holds 1 to {}", layout.max_vcpus);
            return Err(Error::new("creating the vGIC", std::io::Error::other(refusal)));
        }
        let mut refusal = std::io::Error::from(std::io::ErrorKind::Unsupported);
        for (version, type_) in GIC_DEVICES {
            let mut create = kvm_create_device { type_, fd: 0, flags: 0 };
            match self.fd.create_device(&mut create) {
                Ok(device) => {
                    let addresses: &[(u32, u64)] = match version {
                        GicVersion::V3 => &[
                            (KVM_VGIC_V3_ADDR_TYPE_DIST, layout.distributor),
                            (KVM_VGIC_V3_ADDR_TYPE_REDIST, layout.redistributors),
                        ],
                        GicVersion::V2 => &[
                            (KVM_VGIC_V2_ADDR_TYPE_DIST, layout.distributor),
                            (KVM_VGIC_V2_ADDR_TYPE_CPU, layout.cpu_interface),
                        ],
                    };
                    for &(kind, address) in addresses {
                        set_gic_attr(&device, KVM_DEV_ARM_VGIC_GRP_ADDR, u64::from(kind), &address)?;
                    }
                    set_gic_attr(&device, KVM_DEV_ARM_VGIC_GRP_NR_IRQS, 0, &irq_count)?;
                    let init = kvm_device_attr {
                        group: KVM_DEV_ARM_VGIC_GRP_CTRL,
                        attr: u64::from(KVM_DEV_ARM_VGIC_CTRL_INIT),
                        addr: 0,
                        flags: 0,
                    };
                    device.set_device_attr(&init).map_err(|e| Error::new("KVM_DEV_ARM_VGIC_CTRL_INIT", e))?;
                    // Held open for as long as the VM lives, and kept for saving and loading its state.
                    if self.arch.gic.set((version, device)).is_err() {
                        return Err(Error::new("creating the vGIC", std::io::ErrorKind::AlreadyExists));
                    }
                    return Ok(version);
                }
                Err(e) => refusal = e.into(),
            }
        }
        Err(Error::new("KVM_CREATE_DEVICE (vGICv3, then vGICv2)", refusal))
    }

    fn create_its(&self, base: u64) -> Result<()> {
        if !matches!(self.arch.gic.get(), Some((GicVersion::V3, _))) {
            return Err(invalid("creating the GIC ITS", "it needs a GICv3, and this VM has none".into()));
        }
        let mut create = kvm_create_device { type_: kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_ITS, fd: 0, flags: 0 };
        let device = self.fd.create_device(&mut create).map_err(|e| Error::new("KVM_CREATE_DEVICE (GIC ITS)", e))?;
        set_gic_attr(&device, KVM_DEV_ARM_VGIC_GRP_ADDR, u64::from(KVM_VGIC_ITS_ADDR_TYPE), &base)?;
        let init = kvm_device_attr {
            group: KVM_DEV_ARM_VGIC_GRP_CTRL,
            attr: u64::from(KVM_DEV_ARM_VGIC_CTRL_INIT),
            addr: 0,
            flags: 0,
        };
        device.set_device_attr(&init).map_err(|e| Error::new("KVM_DEV_ARM_VGIC_CTRL_INIT (GIC ITS)", e))?;
        // Held open for as long as the VM lives, for saving its state later.
        if self.arch.its.set(device).is_err() {
            return Err(Error::new("creating the GIC ITS", std::io::ErrorKind::AlreadyExists));
        }
        // KVM's ITS finds an MSI's device by the ID sent with it (KVM_CAP_MSI_DEVID is now set).
        self.msis_carry_device_id.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn save_gic_state(&self, mpidrs: &[u64]) -> Result<GicStateAarch64> {
        let gic = self.gic_v3()?;
        let its = self.arch.its.get().map(GicV3);
        if its.is_some() {
            // The pending LPIs into each redistributor's pending table, in guest memory.
            gic.control(KVM_DEV_ARM_VGIC_SAVE_PENDING_TABLES, "KVM_DEV_ARM_VGIC_SAVE_PENDING_TABLES")?;
        }
        let spis = gic.spi_count()?;
        let first = *mpidrs.first().ok_or_else(|| invalid("saving the vGIC", "no vCPUs".into()))?;
        let distributor = distributor_layout(spis)
            .iter()
            .map(|bank| Ok(GicRegister { offset: bank.set, value: gic.read_dist(bank.set)? }))
            .collect::<Result<Vec<_>>>()?;
        let line_levels =
            (0..spis / 32).map(|i| gic.read_line_level(first, 32 + 32 * i)).collect::<Result<Vec<_>>>()?;
        let mut cpus = Vec::new();
        for &mpidr in mpidrs {
            let redistributor = REDISTRIBUTOR_LAYOUT
                .iter()
                .map(|bank| Ok(GicRegister { offset: bank.set, value: gic.read_redist(mpidr, bank.set)? }))
                .collect::<Result<Vec<_>>>()?;
            let ctlr = gic.read_icc(mpidr, ICC_CTLR_EL1)?;
            let cpu_interface = cpu_interface_layout(ctlr)
                .into_iter()
                .map(|encoding| Ok(GicSystemRegister { encoding, value: gic.read_icc(mpidr, encoding)? }))
                .collect::<Result<Vec<_>>>()?;
            let lpis = match its {
                Some(_) => LPI_REDISTRIBUTOR_LAYOUT
                    .iter()
                    .map(|&offset| Ok(GicRegister { offset, value: gic.read_redist(mpidr, offset)? }))
                    .collect::<Result<Vec<_>>>()?,
                None => Vec::new(),
            };
            cpus.push(GicCpuState { mpidr, redistributor, cpu_interface, lpis });
        }
        let its = match its {
            Some(its) => {
                // The device, collection and interrupt translation tables into guest memory, where the guest's
                // GITS_BASERn point.
                its.control(KVM_DEV_ARM_ITS_SAVE_TABLES, "KVM_DEV_ARM_ITS_SAVE_TABLES")?;
                let registers = ITS_LAYOUT
                    .iter()
                    .map(|&offset| Ok(GicItsRegister { offset, value: its.read_its(offset)? }))
                    .collect::<Result<Vec<_>>>()?;
                Some(registers)
            }
            None => None,
        };
        Ok(GicStateAarch64 { distributor, line_levels, cpus, its })
    }

    fn restore_gic_state(&self, mpidrs: &[u64], state: &GicStateAarch64) -> Result<()> {
        const OPERATION: &str = "restoring the vGIC state";
        let gic = self.gic_v3()?;
        let its = self.arch.its.get().map(GicV3);
        match (&state.its, &its) {
            (Some(_), None) => {
                return Err(invalid(OPERATION, "the state has a GIC ITS (PCI devices) and this VM has none".into()))
            }
            (None, Some(_)) => {
                return Err(invalid(OPERATION, "this VM has a GIC ITS (PCI devices) and the state has none".into()))
            }
            (Some(registers), Some(_)) => {
                let offsets: Vec<u32> = registers.iter().map(|r| r.offset).collect();
                if offsets != ITS_LAYOUT {
                    return Err(invalid(OPERATION, format!("ITS registers {offsets:x?}, expected {ITS_LAYOUT:x?}")));
                }
            }
            (None, None) => {}
        }
        let spis = gic.spi_count()?;
        let first = *mpidrs.first().ok_or_else(|| invalid(OPERATION, "no vCPUs".into()))?;
        // Everything is checked against this GIC's layout before anything is written.
        let distributor = distributor_layout(spis);
        same_offsets("distributor", &distributor, &state.distributor)?;
        if state.line_levels.len() != (spis / 32) as usize {
            return Err(invalid(OPERATION, format!("{} line-level words for {spis} SPIs", state.line_levels.len())));
        }
        if state.cpus.len() != mpidrs.len() {
            return Err(invalid(OPERATION, format!("{} CPUs, this VM has {}", state.cpus.len(), mpidrs.len())));
        }
        for (cpu, &mpidr) in state.cpus.iter().zip(mpidrs) {
            if cpu.mpidr != mpidr {
                return Err(invalid(OPERATION, format!("CPU {:#x} where this VM has {mpidr:#x}", cpu.mpidr)));
            }
            same_offsets("redistributor", REDISTRIBUTOR_LAYOUT, &cpu.redistributor)?;
            let lpi_layout: &[u32] = if its.is_some() { LPI_REDISTRIBUTOR_LAYOUT } else { &[] };
            let lpi_offsets: Vec<u32> = cpu.lpis.iter().map(|r| r.offset).collect();
            if lpi_offsets != lpi_layout {
                return Err(invalid(
                    OPERATION,
                    format!("CPU {mpidr:#x}: LPI registers {lpi_offsets:x?}, expected {lpi_layout:x?}"),
                ));
            }
            let ctlr = cpu.cpu_interface.first().filter(|r| r.encoding == ICC_CTLR_EL1).map(|r| r.value);
            let expected = cpu_interface_layout(ctlr.unwrap_or(0));
            let found: Vec<u16> = cpu.cpu_interface.iter().map(|r| r.encoding).collect();
            // The number of priority bits (hence of AP0R/AP1R registers) is the host's: ICC_CTLR_EL1.PRIbits.
            let host = cpu_interface_layout(gic.read_icc(mpidr, ICC_CTLR_EL1)?);
            if ctlr.is_none() || found != expected || expected != host {
                return Err(invalid(
                    OPERATION,
                    format!("CPU {mpidr:#x}: CPU interface registers {found:x?}, expected {host:x?}"),
                ));
            }
        }

        // The distributor's control first (affinity routing, group enables), then each redistributor, the
        // SPIs, and the CPU interfaces, whose group enables come last. Within each, configuration before the
        // pending bits (a level-triggered interrupt's pending state depends on it) and enables last, so that
        // nothing is signalled before its priority and routing are in place; a bank with a clear register is
        // cleared entirely before its set bits are written.
        let write_banks = |banks: &[Bank], values: &[GicRegister], write: &dyn Fn(u32, u32) -> Result<()>| {
            for (bank, register) in banks.iter().zip(values) {
                if let Some(clear) = bank.clear {
                    write(clear, u32::MAX)?;
                }
                write(bank.set, register.value)?;
            }
            Ok::<(), Error>(())
        };
        let (control, spi_banks) = distributor.split_at(1);
        write_banks(control, &state.distributor[..1], &|offset, value| gic.write_dist(offset, value))?;
        for cpu in &state.cpus {
            write_banks(REDISTRIBUTOR_LAYOUT, &cpu.redistributor, &|offset, value| {
                gic.write_redist(cpu.mpidr, offset, value)
            })?;
        }
        // Line levels before the pending bits: for a level-triggered SPI, pending follows the line.
        for (i, &level) in state.line_levels.iter().enumerate() {
            gic.write_line_level(first, 32 + 32 * i as u32, level)?;
        }
        write_banks(spi_banks, &state.distributor[1..], &|offset, value| gic.write_dist(offset, value))?;
        for cpu in &state.cpus {
            for register in &cpu.cpu_interface {
                gic.write_icc(cpu.mpidr, register.encoding, register.value)?;
            }
        }
        // With an ITS, KVM's order (Documentation/virt/kvm/devices/arm-vgic-its.rst): the redistributors' LPI
        // registers (the property and pending table addresses while LPIs are off, then GICR_CTLR turning them on),
        // then the ITS's registers but GITS_CTLR (GITS_CBASER first: writing it resets GITS_CREADR), its tables
        // from guest memory, and GITS_CTLR last.
        if let (Some(registers), Some(its)) = (&state.its, &its) {
            for cpu in &state.cpus {
                for register in &cpu.lpis {
                    gic.write_redist(cpu.mpidr, register.offset, register.value)?;
                }
            }
            let (control, rest) =
                registers.split_last().ok_or_else(|| invalid(OPERATION, "no ITS registers".into()))?;
            for register in rest {
                its.write_its(register.offset, register.value)?;
            }
            its.control(KVM_DEV_ARM_ITS_RESTORE_TABLES, "KVM_DEV_ARM_ITS_RESTORE_TABLES")?;
            its.write_its(control.offset, control.value)?;
        }
        Ok(())
    }
}

/// A register bank: the offset read and written with the saved bits, and for set/clear pairs (enable, pending,
/// active) the clear register that empties the bank first.
struct Bank {
    set: u32,
    clear: Option<u32>,
}

const fn bank(set: u32) -> Bank {
    Bank { set, clear: None }
}

const fn set_clear(set: u32, clear: u32) -> Bank {
    Bank { set, clear: Some(clear) }
}

const GICD_CTLR: u32 = 0x0;
const GICD_IGROUPR: u32 = 0x80;
const GICD_ISENABLER: u32 = 0x100;
const GICD_ICENABLER: u32 = 0x180;
const GICD_ISPENDR: u32 = 0x200;
const GICD_ICPENDR: u32 = 0x280;
const GICD_ISACTIVER: u32 = 0x300;
const GICD_ICACTIVER: u32 = 0x380;
const GICD_IPRIORITYR: u32 = 0x400;
const GICD_ICFGR: u32 = 0xc00;
const GICD_IROUTER: u32 = 0x6000;

/// The distributor's registers for `spis` SPIs (interrupts 32 up), in restore order; GICD_CTLR first.
fn distributor_layout(spis: u32) -> Vec<Bank> {
    let ids = 32..32 + spis;
    let per_word = |base: u32, bits: u32| ids.clone().step_by((32 / bits) as usize).map(move |id| base + id * bits / 8);
    let mut banks = vec![bank(GICD_CTLR)];
    banks.extend(per_word(GICD_IGROUPR, 1).map(bank));
    // IROUTER: 64 bits per SPI, accessed as two 32-bit halves.
    banks.extend(ids.clone().flat_map(|id| [GICD_IROUTER + id * 8, GICD_IROUTER + id * 8 + 4]).map(bank));
    banks.extend(per_word(GICD_ICFGR, 2).map(bank));
    banks.extend(per_word(GICD_IPRIORITYR, 8).map(bank));
    banks.extend(per_word(GICD_ISPENDR, 1).map(|o| set_clear(o, o - GICD_ISPENDR + GICD_ICPENDR)));
    banks.extend(per_word(GICD_ISACTIVER, 1).map(|o| set_clear(o, o - GICD_ISACTIVER + GICD_ICACTIVER)));
    banks.extend(per_word(GICD_ISENABLER, 1).map(|o| set_clear(o, o - GICD_ISENABLER + GICD_ICENABLER)));
    banks
}

/// With an ITS, a redistributor's LPI registers in restore order: GICR_PROPBASER and GICR_PENDBASER (32-bit halves,
/// as KVM's redistributor attributes are), which KVM ignores while LPIs are on, then GICR_CTLR (EnableLPIs).
const LPI_REDISTRIBUTOR_LAYOUT: &[u32] = &[0x70, 0x74, 0x78, 0x7c, 0x0];

const GITS_CTLR: u32 = 0x0;
const GITS_IIDR: u32 = 0x4;
const GITS_CBASER: u32 = 0x80;
const GITS_CWRITER: u32 = 0x88;
const GITS_CREADR: u32 = 0x90;
const GITS_BASER: u32 = 0x100;
/// The ITS's registers in restore order (see `restore_gic_state`): GITS_CTLR last. KVM's ITS has 8 GITS_BASERn
/// slots (two used: devices and collections).
const ITS_LAYOUT: &[u32] = &[
    GITS_CBASER,
    GITS_IIDR,
    GITS_BASER,
    GITS_BASER + 0x8,
    GITS_BASER + 0x10,
    GITS_BASER + 0x18,
    GITS_BASER + 0x20,
    GITS_BASER + 0x28,
    GITS_BASER + 0x30,
    GITS_BASER + 0x38,
    GITS_CWRITER,
    GITS_CREADR,
    GITS_CTLR,
];

/// A redistributor's SGI frame (SGIs and PPIs), in restore order. Its LPI registers are
/// `LPI_REDISTRIBUTOR_LAYOUT`, saved only with an ITS.
const SGI_FRAME: u32 = 0x1_0000;
const REDISTRIBUTOR_LAYOUT: &[Bank] = &[
    bank(SGI_FRAME + 0x80),  // GICR_IGROUPR0
    bank(SGI_FRAME + 0xc00), // GICR_ICFGR0
    bank(SGI_FRAME + 0xc04), // GICR_ICFGR1
    bank(SGI_FRAME + 0x400), // GICR_IPRIORITYR0..7
    bank(SGI_FRAME + 0x404),
    bank(SGI_FRAME + 0x408),
    bank(SGI_FRAME + 0x40c),
    bank(SGI_FRAME + 0x410),
    bank(SGI_FRAME + 0x414),
    bank(SGI_FRAME + 0x418),
    bank(SGI_FRAME + 0x41c),
    set_clear(SGI_FRAME + 0x200, SGI_FRAME + 0x280), // GICR_ISPENDR0 / ICPENDR0
    set_clear(SGI_FRAME + 0x300, SGI_FRAME + 0x380), // GICR_ISACTIVER0 / ICACTIVER0
    set_clear(SGI_FRAME + 0x100, SGI_FRAME + 0x180), // GICR_ISENABLER0 / ICENABLER0
];

/// An ICC_*_EL1 encoding: op0, op1, CRn, CRm, op2 as MRS/MSR pack them (and KVM's CPU_SYSREGS attribute).
const fn icc(op0: u16, op1: u16, crn: u16, crm: u16, op2: u16) -> u16 {
    (op0 << 14) | (op1 << 11) | (crn << 7) | (crm << 3) | op2
}

const ICC_PMR_EL1: u16 = icc(3, 0, 4, 6, 0);
const ICC_BPR0_EL1: u16 = icc(3, 0, 12, 8, 3);
const ICC_BPR1_EL1: u16 = icc(3, 0, 12, 12, 3);
const ICC_CTLR_EL1: u16 = icc(3, 0, 12, 12, 4);
const ICC_SRE_EL1: u16 = icc(3, 0, 12, 12, 5);
const ICC_IGRPEN0_EL1: u16 = icc(3, 0, 12, 12, 6);
const ICC_IGRPEN1_EL1: u16 = icc(3, 0, 12, 12, 7);

/// The CPU interface's registers in restore order, for an ICC_CTLR_EL1 value: its PRIbits (priority bits - 1)
/// say how many active-priority registers (AP0Rn, AP1Rn) exist: 1 for 5 bits, 2 for 6, 4 for 7.
fn cpu_interface_layout(ctlr: u64) -> Vec<u16> {
    let priority_bits = ((ctlr >> 8) & 0x7) + 1;
    let active_priority_registers = 1u16 << priority_bits.clamp(5, 7).saturating_sub(5);
    let mut layout = vec![ICC_CTLR_EL1, ICC_SRE_EL1, ICC_PMR_EL1, ICC_BPR0_EL1, ICC_BPR1_EL1];
    layout.extend((0..active_priority_registers).map(|n| icc(3, 0, 12, 8, 4 + n)));
    layout.extend((0..active_priority_registers).map(|n| icc(3, 0, 12, 9, n)));
    layout.extend([ICC_IGRPEN0_EL1, ICC_IGRPEN1_EL1]);
    layout
}

fn same_offsets(part: &str, layout: &[Bank], registers: &[GicRegister]) -> Result<()> {
    let expected: Vec<u32> = layout.iter().map(|b| b.set).collect();
    let found: Vec<u32> = registers.iter().map(|r| r.offset).collect();
    if found != expected {
        let first = found.iter().zip(&expected).position(|(f, e)| f != e);
        return Err(invalid(
            "restoring the vGIC state",
            format!(
                "{part}: {} registers where this GIC has {}{}",
                found.len(),
                expected.len(),
                first.map_or(String::new(), |i| format!(", offset {:#x} where {:#x} belongs", found[i], expected[i]))
            ),
        ));
    }
    Ok(())
}

/// The in-kernel GICv3, for reading and writing its state through device attributes.
struct GicV3<'a>(&'a DeviceFd);

/// KVM's vCPU selector in a redistributor or CPU-interface attribute: the MPIDR's affinity fields packed
/// (Aff3.Aff2.Aff1.Aff0) into bits 63:32.
fn mpidr_attr(mpidr: u64) -> u64 {
    let affinity = (((mpidr >> 32) & 0xff) << 24) | (mpidr & 0xff_ffff);
    affinity << 32
}

impl GicV3<'_> {
    fn get<T: Default>(&self, group: u32, attr: u64, what: &'static str) -> Result<T> {
        let mut value = T::default();
        let mut attribute = kvm_device_attr { group, attr, addr: &mut value as *mut T as u64, flags: 0 };
        // SAFETY: `addr` points at a `T` as large as the attribute's group says KVM writes (u32 for the register
        // groups and line levels, u64 for the CPU system registers and the ITS's registers), alive for the call.
        unsafe { self.0.get_device_attr(&mut attribute) }.map_err(|e| Error::new(what, e))?;
        Ok(value)
    }

    fn set<T>(&self, group: u32, attr: u64, value: T, what: &'static str) -> Result<()> {
        let attribute = kvm_device_attr { group, attr, addr: &value as *const T as u64, flags: 0 };
        self.0.set_device_attr(&attribute).map_err(|e| Error::new(what, e))
    }

    /// A control attribute that takes no value (KVM_DEV_ARM_VGIC_GRP_CTRL).
    fn control(&self, attr: u32, what: &'static str) -> Result<()> {
        let attribute = kvm_device_attr { group: KVM_DEV_ARM_VGIC_GRP_CTRL, attr: u64::from(attr), addr: 0, flags: 0 };
        self.0.set_device_attr(&attribute).map_err(|e| Error::new(what, e))
    }

    /// An ITS register (this wrapping the ITS device), 64 bits wide.
    fn read_its(&self, offset: u32) -> Result<u64> {
        self.get(KVM_DEV_ARM_VGIC_GRP_ITS_REGS, u64::from(offset), "KVM_GET_DEVICE_ATTR (GITS)")
    }

    fn write_its(&self, offset: u32, value: u64) -> Result<()> {
        self.set(KVM_DEV_ARM_VGIC_GRP_ITS_REGS, u64::from(offset), value, "KVM_SET_DEVICE_ATTR (GITS)")
    }

    fn spi_count(&self) -> Result<u32> {
        let interrupts: u32 = self.get(KVM_DEV_ARM_VGIC_GRP_NR_IRQS, 0, "KVM_GET_DEVICE_ATTR (vGIC NR_IRQS)")?;
        Ok(interrupts.saturating_sub(32) / 32 * 32)
    }

    fn read_dist(&self, offset: u32) -> Result<u32> {
        self.get(KVM_DEV_ARM_VGIC_GRP_DIST_REGS, u64::from(offset), "KVM_GET_DEVICE_ATTR (GICD)")
    }

    fn write_dist(&self, offset: u32, value: u32) -> Result<()> {
        self.set(KVM_DEV_ARM_VGIC_GRP_DIST_REGS, u64::from(offset), value, "KVM_SET_DEVICE_ATTR (GICD)")
    }

    fn read_redist(&self, mpidr: u64, offset: u32) -> Result<u32> {
        self.get(KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, mpidr_attr(mpidr) | u64::from(offset), "KVM_GET_DEVICE_ATTR (GICR)")
    }

    fn write_redist(&self, mpidr: u64, offset: u32, value: u32) -> Result<()> {
        let attr = mpidr_attr(mpidr) | u64::from(offset);
        self.set(KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, attr, value, "KVM_SET_DEVICE_ATTR (GICR)")
    }

    fn read_icc(&self, mpidr: u64, encoding: u16) -> Result<u64> {
        let attr = mpidr_attr(mpidr) | u64::from(encoding);
        self.get(KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS, attr, "KVM_GET_DEVICE_ATTR (ICC)")
    }

    fn write_icc(&self, mpidr: u64, encoding: u16, value: u64) -> Result<()> {
        let attr = mpidr_attr(mpidr) | u64::from(encoding);
        self.set(KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS, attr, value, "KVM_SET_DEVICE_ATTR (ICC)")
    }

    /// 32 SPIs' line levels from `first` (KVM_DEV_ARM_VGIC_LINE_LEVEL_INFO_LINE_LEVEL is 0).
    fn read_line_level(&self, mpidr: u64, first: u32) -> Result<u32> {
        let attr = mpidr_attr(mpidr) | u64::from(first);
        self.get(KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO, attr, "KVM_GET_DEVICE_ATTR (vGIC line levels)")
    }

    fn write_line_level(&self, mpidr: u64, first: u32, levels: u32) -> Result<()> {
        let attr = mpidr_attr(mpidr) | u64::from(first);
        self.set(KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO, attr, levels, "KVM_SET_DEVICE_ATTR (vGIC line levels)")
    }
}

impl KvmVm {
    fn gic_v3(&self) -> Result<GicV3<'_>> {
        match self.arch.gic.get() {
            Some((GicVersion::V3, device)) => Ok(GicV3(device)),
            Some((GicVersion::V2, _)) => {
                Err(invalid("saving or loading the vGIC state", "only a GICv3's state can be saved yet".into()))
            }
            None => Err(invalid("saving or loading the vGIC state", "the VM has no GIC".into())),
        }
    }
}

/// The VM's in-kernel GIC and ITS, once created, and its vCPUs' MPIDRs.
pub(super) struct VmData {
    gic: OnceLock<(GicVersion, DeviceFd)>,
    /// The GICv3 ITS, on a VM with PCI devices.
    its: OnceLock<DeviceFd>,
    mpidrs: Mutex<Vec<u64>>,
}

impl VmData {
    pub(super) fn new(_kvm: &kvm_ioctls::Kvm, _vm: &kvm_ioctls::VmFd) -> Result<Self> {
        Ok(VmData { gic: OnceLock::new(), its: OnceLock::new(), mpidrs: Mutex::new(Vec::new()) })
    }

    pub(super) fn vcpu_data(&self, _vm: &kvm_ioctls::VmFd) -> VcpuData {
        VcpuData { registers: OnceLock::new() }
    }
}

pub(super) struct VcpuData {
    /// KVM_GET_REG_LIST's answer, read once: it is fixed from KVM_ARM_VCPU_INIT on.
    registers: OnceLock<Vec<u64>>,
}

/// Sets one vGIC attribute whose value KVM reads from `value`.
fn set_gic_attr<T>(device: &DeviceFd, group: u32, attr: u64, value: &T) -> Result<()> {
    let attribute = kvm_device_attr { group, attr, addr: value as *const T as u64, flags: 0 };
    device.set_device_attr(&attribute).map_err(|e| Error::new("KVM_SET_DEVICE_ATTR (vGIC)", e))
}

impl VcpuAarch64 for KvmVcpu {
    fn set_boot_registers(&self, regs: &BootRegisters) -> Result<()> {
        let values = [(PSTATE, regs.pstate), (PC, regs.pc)]
            .into_iter()
            .chain(regs.x.iter().enumerate().map(|(i, &x)| (x_register(i), x)));
        for (id, value) in values {
            self.fd.set_one_reg(id, &value.to_le_bytes()).map_err(|e| Error::new("KVM_SET_ONE_REG", e))?;
        }
        Ok(())
    }

    fn mpidr(&self) -> Result<u64> {
        self.get_register(MPIDR_EL1).map_err(|e| Error::new("KVM_GET_ONE_REG (MPIDR_EL1)", e))
    }

    fn read_register(&self, id: u64) -> Result<u64> {
        if reg_size(id) != 8 {
            return Err(invalid("KVM_GET_ONE_REG", format!("register {id:#x} is not a 64-bit register")));
        }
        self.get_register(id).map_err(|e| Error::new("KVM_GET_ONE_REG", e))
    }

    fn save_state(&self) -> Result<VcpuStateAarch64> {
        // Registers as KVM lists them (sorted by id: core registers, then the firmware pseudo-registers, then the
        // system registers, timers among them). Nothing is left out, as Firecracker does: what KVM lists it can
        // read back and write again.
        let mut registers = Vec::new();
        for &id in self.register_list()? {
            let mut value = vec![0u8; reg_size(id)];
            self.fd.get_one_reg(id, &mut value).map_err(|e| Error::new("KVM_GET_ONE_REG", e))?;
            registers.push(Register { id, value });
        }
        let power_state = match self.fd.get_mp_state().map_err(|e| Error::new("KVM_GET_MP_STATE", e))?.mp_state {
            KVM_MP_STATE_RUNNABLE => PowerState::Runnable,
            KVM_MP_STATE_STOPPED => PowerState::Stopped,
            KVM_MP_STATE_SUSPENDED => PowerState::Suspended,
            other => return Err(invalid("KVM_GET_MP_STATE", format!("MP state {other}, which Kestrel cannot save"))),
        };
        Ok(VcpuStateAarch64 { registers, power_state })
    }

    fn restore_state(&self, state: &VcpuStateAarch64) -> Result<()> {
        const OPERATION: &str = "restoring the vCPU state";
        let listed = self.register_list()?;
        if state.registers.len() > listed.len() {
            return Err(invalid(
                OPERATION,
                format!("{} registers, more than the {} this vCPU has", state.registers.len(), listed.len()),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for register in &state.registers {
            if !listed.contains(&register.id) {
                return Err(invalid(OPERATION, format!("register {:#x} is not one this host's KVM has", register.id)));
            }
            if !seen.insert(register.id) {
                return Err(invalid(OPERATION, format!("register {:#x} appears twice", register.id)));
            }
            if register.value.len() != reg_size(register.id) {
                return Err(invalid(
                    OPERATION,
                    format!(
                        "register {:#x} has {} bytes, its id says {}",
                        register.id,
                        register.value.len(),
                        reg_size(register.id)
                    ),
                ));
            }
        }
        // In KVM's list order, core registers first. Writing the virtual counter (KVM_REG_ARM_TIMER_CNT) makes KVM
        // offset the guest's counter so that it reads the saved value now: the guest sees no time pass while it
        // was saved, and its timer compare values (CVAL) keep their meaning.
        for register in &state.registers {
            if let Err(e) = self.fd.set_one_reg(register.id, &register.value) {
                // KVM refuses to change the invariant identification registers (MIDR, REVIDR, AIDR...) but accepts
                // their own value: a refusal is only fine if the register already holds what was saved.
                let mut current = vec![0u8; register.value.len()];
                let unchanged = self.fd.get_one_reg(register.id, &mut current).is_ok() && current == register.value;
                if !unchanged {
                    return Err(invalid("KVM_SET_ONE_REG", format!("KVM refused register {:#x}: {e}", register.id)));
                }
            }
        }
        // After the registers: a vCPU made runnable again starts from them.
        let mp_state = match state.power_state {
            PowerState::Runnable => KVM_MP_STATE_RUNNABLE,
            PowerState::Stopped => KVM_MP_STATE_STOPPED,
            PowerState::Suspended => KVM_MP_STATE_SUSPENDED,
        };
        self.fd.set_mp_state(kvm_mp_state { mp_state }).map_err(|e| Error::new("KVM_SET_MP_STATE", e))
    }
}

/// A state that cannot be loaded on this host: one error line saying which part and why.
fn invalid(operation: &'static str, problem: String) -> Error {
    Error::new(operation, std::io::Error::new(std::io::ErrorKind::InvalidData, problem))
}

/// The most registers a vCPU may list: the most kvm-bindings' RegList holds. KVM lists a few hundred without SVE,
/// which Kestrel does not enable.
const MAX_REGISTERS: usize = 500;

impl KvmVcpu {
    /// This vCPU's register ids, read from KVM the first time.
    fn register_list(&self) -> Result<&[u64]> {
        if let Some(list) = self.arch.registers.get() {
            return Ok(list);
        }
        let mut list = RegList::new(MAX_REGISTERS)
            .map_err(|_| Error::new("KVM_GET_REG_LIST", std::io::ErrorKind::InvalidInput))?;
        let ids = match self.fd.get_reg_list(&mut list) {
            Ok(()) => list.as_slice().to_vec(),
            Err(e) if e.errno() == libc::E2BIG => {
                return Err(invalid("KVM_GET_REG_LIST", format!("KVM lists more than {MAX_REGISTERS} registers")))
            }
            Err(e) => return Err(Error::new("KVM_GET_REG_LIST", e)),
        };
        Ok(self.arch.registers.get_or_init(|| ids))
    }

    fn get_register(&self, id: u64) -> std::result::Result<u64, kvm_ioctls::Error> {
        let mut bytes = [0u8; 8];
        self.fd.get_one_reg(id, &mut bytes)?;
        Ok(u64::from_le_bytes(bytes))
    }

    /// PC, PSTATE, stack pointers, the exception registers and X0-X30, formatted for an error report.
    pub(super) fn describe_state(&self) -> String {
        let mut out = String::new();
        let mut show = |name: &str, id: u64| {
            let _ = match self.get_register(id) {
                Ok(value) => write!(out, "{name}={value:#018x} "),
                Err(e) => write!(out, "{name}=<{e}> "),
            };
        };
        for (name, id) in [
            ("pc", PC),
            ("pstate", PSTATE),
            ("sp_el0", SP_EL0),
            ("sp_el1", SP_EL1),
            ("elr_el1", ELR_EL1),
            ("esr_el1", ESR_EL1),
            ("far_el1", FAR_EL1),
        ] {
            show(name, id);
        }
        for i in 0..31 {
            show(&format!("x{i}"), x_register(i));
        }
        out.trim_end().to_string() + "\n"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ids as the kernel's uapi macros spell them (KVM_REG_ARM_CORE_REG, ARM64_SYS_REG), written out.
    #[test]
    fn gic_layouts_cover_every_spi_once() {
        let layout = distributor_layout(64);
        // CTLR, then per 32 SPIs: group, pending, active, enable (1 bit each), config (2), priority (8), and
        // two IROUTER halves per SPI.
        assert_eq!(layout.len(), 1 + 2 * (4 + 2 + 8) + 64 * 2);
        assert_eq!(layout[0].set, GICD_CTLR);
        let offsets: Vec<u32> = layout.iter().map(|b| b.set).collect();
        assert!(offsets.contains(&(GICD_IGROUPR + 4)) && !offsets.contains(&GICD_IGROUPR), "SPIs only");
        assert!(offsets.contains(&(GICD_IROUTER + 95 * 8 + 4)) && !offsets.contains(&(GICD_IROUTER + 96 * 8)));
        assert!(offsets.contains(&(GICD_ICFGR + 0x14)) && !offsets.contains(&(GICD_ICFGR + 0x18)));
        assert!(offsets.contains(&(GICD_IPRIORITYR + 92)) && !offsets.contains(&(GICD_IPRIORITYR + 96)));
        let enable = layout.iter().find(|b| b.set == GICD_ISENABLER + 4).unwrap();
        assert_eq!(enable.clear, Some(GICD_ICENABLER + 4));
        assert_eq!(ICC_CTLR_EL1, 0xc664, "ICC_CTLR_EL1 as the kernel's sysreg encoding");
        assert_eq!(ICC_PMR_EL1, 0xc230);
        // 5 priority bits (PRIbits 4): one AP0R and one AP1R; 7 bits: four each.
        assert_eq!(cpu_interface_layout(4 << 8).len(), 7 + 2);
        assert_eq!(cpu_interface_layout(6 << 8).len(), 7 + 8);
        assert_eq!(mpidr_attr(0x8000_0000 | (1 << 32) | (2 << 16) | (3 << 8) | 4), 0x0102_0304 << 32);
    }

    #[test]
    fn register_ids_match_the_kernel_encoding() {
        assert_eq!(x_register(0), 0x6030_0000_0010_0000);
        assert_eq!(x_register(3), 0x6030_0000_0010_0006);
        assert_eq!(SP_EL0, 0x6030_0000_0010_003e);
        assert_eq!(PC, 0x6030_0000_0010_0040);
        assert_eq!(PSTATE, 0x6030_0000_0010_0042);
        assert_eq!(SP_EL1, 0x6030_0000_0010_0044);
        assert_eq!(MPIDR_EL1, 0x6030_0000_0013_c005);
        // The backend-neutral constructor spells out the uapi's bits.
        let sysreg = KVM_REG_ARM64 | KVM_REG_SIZE_U64 | u64::from(kvm_bindings::KVM_REG_ARM64_SYSREG);
        assert_eq!(system_register_id(0, 0, 0, 0, 0), sysreg);
        assert_eq!(system_register_id(3, 3, 14, 3, 2), sysreg | 0xdf1a, "KVM_REG_ARM_TIMER_CNT");
    }
}

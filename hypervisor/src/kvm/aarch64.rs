//! KVM on aarch64: vCPU initialisation, the in-kernel vGIC, core and system registers through KVM_{GET,SET}_ONE_REG.

use std::fmt::Write;
use std::mem::offset_of;
use std::sync::OnceLock;

use arch::aarch64::layout::{gic_redist_size, GIC_CPU_START, GIC_DIST_START, GIC_REDIST_START};
use arch::aarch64::{BootRegisters, GicVersion};
use kvm_bindings::{
    kvm_create_device, kvm_device_attr, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V2,
    kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3, kvm_regs, kvm_vcpu_init, user_pt_regs, KVM_ARM_VCPU_POWER_OFF,
    KVM_ARM_VCPU_PSCI_0_2, KVM_DEV_ARM_VGIC_CTRL_INIT, KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_DEV_ARM_VGIC_GRP_CTRL,
    KVM_DEV_ARM_VGIC_GRP_NR_IRQS, KVM_REG_ARM64, KVM_REG_ARM64_SYSREG, KVM_REG_ARM_CORE, KVM_REG_SIZE_U64,
    KVM_VGIC_V2_ADDR_TYPE_CPU, KVM_VGIC_V2_ADDR_TYPE_DIST, KVM_VGIC_V3_ADDR_TYPE_DIST, KVM_VGIC_V3_ADDR_TYPE_REDIST,
};
use kvm_bindings::{kvm_mp_state, RegList, KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_STOPPED, KVM_MP_STATE_SUSPENDED};
use kvm_ioctls::{reg_size, DeviceFd};

use super::{KvmVcpu, KvmVm};
use crate::aarch64::{PowerState, Register, VcpuAarch64, VcpuStateAarch64, VmAarch64};
use crate::{Error, Result};

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

/// KVM_{GET,SET}_ONE_REG id of a system register by its encoding (op0, op1, CRn, CRm, op2).
const fn system_register(op0: u64, op1: u64, crn: u64, crm: u64, op2: u64) -> u64 {
    KVM_REG_ARM64
        | KVM_REG_SIZE_U64
        | KVM_REG_ARM64_SYSREG as u64
        | (op0 << 14)
        | (op1 << 11)
        | (crn << 7)
        | (crm << 3)
        | op2
}

const MPIDR_EL1: u64 = system_register(3, 0, 0, 0, 5);
const ESR_EL1: u64 = system_register(3, 0, 5, 2, 0);
const FAR_EL1: u64 = system_register(3, 0, 6, 0, 0);
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
        vcpu.fd.vcpu_init(&init).map_err(|e| Error::new("KVM_ARM_VCPU_INIT", e))
    }

    fn create_gic(&self, vcpu_count: u32, irq_count: u32) -> Result<GicVersion> {
        // KVM sizes the redistributor region from the vCPU count; the layout must have room for that many.
        gic_redist_size(vcpu_count)
            .map_err(|e| Error::new("creating the vGIC", std::io::Error::other(e.to_string())))?;
        let mut refusal = std::io::Error::from(std::io::ErrorKind::Unsupported);
        for (version, type_) in GIC_DEVICES {
            let mut create = kvm_create_device { type_, fd: 0, flags: 0 };
            match self.fd.create_device(&mut create) {
                Ok(device) => {
                    let addresses: &[(u32, u64)] = match version {
                        GicVersion::V3 => &[
                            (KVM_VGIC_V3_ADDR_TYPE_DIST, GIC_DIST_START),
                            (KVM_VGIC_V3_ADDR_TYPE_REDIST, GIC_REDIST_START),
                        ],
                        GicVersion::V2 => {
                            &[(KVM_VGIC_V2_ADDR_TYPE_DIST, GIC_DIST_START), (KVM_VGIC_V2_ADDR_TYPE_CPU, GIC_CPU_START)]
                        }
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
                    self._in_kernel_devices.lock().unwrap_or_else(|p| p.into_inner()).push(device);
                    return Ok(version);
                }
                Err(e) => refusal = e.into(),
            }
        }
        Err(Error::new("KVM_CREATE_DEVICE (vGICv3, then vGICv2)", refusal))
    }
}

/// What the vCPUs of one VM need to know about the host's KVM (nothing yet on aarch64).
pub(super) struct VmData;

impl VmData {
    pub(super) fn new(_kvm: &kvm_ioctls::Kvm, _vm: &kvm_ioctls::VmFd) -> Result<Self> {
        Ok(VmData)
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
    fn register_ids_match_the_kernel_encoding() {
        assert_eq!(x_register(0), 0x6030_0000_0010_0000);
        assert_eq!(x_register(3), 0x6030_0000_0010_0006);
        assert_eq!(SP_EL0, 0x6030_0000_0010_003e);
        assert_eq!(PC, 0x6030_0000_0010_0040);
        assert_eq!(PSTATE, 0x6030_0000_0010_0042);
        assert_eq!(SP_EL1, 0x6030_0000_0010_0044);
        assert_eq!(MPIDR_EL1, 0x6030_0000_0013_c005);
    }
}

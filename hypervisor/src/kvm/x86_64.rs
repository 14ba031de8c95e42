//! KVM on x86_64: the PC irqchip, CPUID, MSRs and register state.

use std::fmt::Write;

use arch::x86_64::cpu_state::{DescriptorTable, Segment};
use arch::x86_64::layout::{pc_irq_routes, IrqChipPin};
use arch::x86_64::{CpuState, CpuidEntry, MsrEntry};
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_dtable, kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip,
    kvm_msr_entry, kvm_pit_config, kvm_segment, CpuId, KvmIrqRouting, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};

use super::{KvmHypervisor, KvmVcpu, KvmVm};
use crate::x86_64::{HypervisorX86_64, VcpuX86_64, VmX86_64};
use crate::{Error, Result};

/// Local APIC register offsets and LVT delivery modes used to wire LINT0/LINT1.
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

impl HypervisorX86_64 for KvmHypervisor {
    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>> {
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| Error::new("KVM_GET_SUPPORTED_CPUID", e))?;
        let mut entries: Vec<CpuidEntry> = cpuid.as_slice().iter().map(from_kvm_cpuid).collect();
        // KVM emulates the TSC-deadline timer in its local APIC but does not report it in the supported leaves.
        if self.kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer) {
            arch::x86_64::cpuid::offer_tsc_deadline(&mut entries);
        }
        Ok(entries)
    }
}

impl VmX86_64 for KvmVm {
    fn create_pc_irqchip(&self, tss_address: u64) -> Result<()> {
        let tss = usize::try_from(tss_address)
            .map_err(|_| Error::new("KVM_SET_TSS_ADDR", std::io::ErrorKind::InvalidInput))?;
        self.fd.set_tss_address(tss).map_err(|e| Error::new("KVM_SET_TSS_ADDR", e))?;
        self.fd.create_irq_chip().map_err(|e| Error::new("KVM_CREATE_IRQCHIP", e))?;
        // KVM's default routing puts GSI 0 on IOAPIC pin 0; a PC (and the MADT we build) has the PIT on pin 2.
        self.fd.set_gsi_routing(&pc_irq_routing()?).map_err(|e| Error::new("KVM_SET_GSI_ROUTING", e))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        self.fd.create_pit2(pit).map_err(|e| Error::new("KVM_CREATE_PIT2", e))
    }
}

impl VcpuX86_64 for KvmVcpu {
    fn set_cpuid(&self, entries: &[CpuidEntry]) -> Result<()> {
        let kvm_entries: Vec<kvm_cpuid_entry2> = entries.iter().map(to_kvm_cpuid).collect();
        let cpuid = CpuId::from_entries(&kvm_entries)
            .map_err(|_| Error::new("KVM_SET_CPUID2", std::io::ErrorKind::InvalidInput))?;
        self.fd.set_cpuid2(&cpuid).map_err(|e| Error::new("KVM_SET_CPUID2", e))
    }

    fn set_msrs(&self, msrs: &[MsrEntry]) -> Result<()> {
        let entries: Vec<kvm_msr_entry> =
            msrs.iter().map(|m| kvm_msr_entry { index: m.index, data: m.value, ..Default::default() }).collect();
        let kvm_msrs =
            Msrs::from_entries(&entries).map_err(|_| Error::new("KVM_SET_MSRS", std::io::ErrorKind::InvalidInput))?;
        let written = self.fd.set_msrs(&kvm_msrs).map_err(|e| Error::new("KVM_SET_MSRS", e))?;
        if written != entries.len() {
            let refused = entries[written].index;
            return Err(Error::new(
                "KVM_SET_MSRS",
                std::io::Error::other(format!("the hypervisor refused MSR {refused:#x}")),
            ));
        }
        Ok(())
    }

    fn set_cpu_state(&self, state: &CpuState) -> Result<()> {
        let mut sregs = self.fd.get_sregs().map_err(|e| Error::new("KVM_GET_SREGS", e))?;
        let s = &state.sregs;
        sregs.cs = to_kvm_segment(&s.cs);
        sregs.ds = to_kvm_segment(&s.ds);
        sregs.es = to_kvm_segment(&s.es);
        sregs.fs = to_kvm_segment(&s.fs);
        sregs.gs = to_kvm_segment(&s.gs);
        sregs.ss = to_kvm_segment(&s.ss);
        sregs.tr = to_kvm_segment(&s.tr);
        sregs.gdt = to_kvm_dtable(&s.gdt);
        sregs.idt = to_kvm_dtable(&s.idt);
        sregs.cr0 = s.cr0;
        sregs.cr3 = s.cr3;
        sregs.cr4 = s.cr4;
        sregs.efer = s.efer;
        self.fd.set_sregs(&sregs).map_err(|e| Error::new("KVM_SET_SREGS", e))?;

        let r = &state.regs;
        let regs = kvm_bindings::kvm_regs {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        };
        self.fd.set_regs(&regs).map_err(|e| Error::new("KVM_SET_REGS", e))?;

        let fpu = kvm_bindings::kvm_fpu { fcw: state.fpu.fcw, mxcsr: state.fpu.mxcsr, ..Default::default() };
        self.fd.set_fpu(&fpu).map_err(|e| Error::new("KVM_SET_FPU", e))
    }

    fn set_lapic_lints(&self) -> Result<()> {
        let mut lapic = self.fd.get_lapic().map_err(|e| Error::new("KVM_GET_LAPIC", e))?;
        for (offset, mode) in [(APIC_LVT_LINT0, APIC_MODE_EXTINT), (APIC_LVT_LINT1, APIC_MODE_NMI)] {
            let reg = &mut lapic.regs[offset..offset + 4];
            let bytes: [u8; 4] = std::array::from_fn(|i| reg[i] as u8);
            let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
            for (dst, src) in reg.iter_mut().zip(value.to_le_bytes()) {
                *dst = src as _;
            }
        }
        self.fd.set_lapic(&lapic).map_err(|e| Error::new("KVM_SET_LAPIC", e))
    }
}

impl KvmVcpu {
    /// Registers, segments and control registers, formatted for an error report.
    pub(super) fn describe_state(&self) -> String {
        let mut out = String::new();
        match self.fd.get_regs() {
            Ok(r) => {
                let _ = writeln!(
                    out,
                    "rip={:#018x} rflags={:#010x} rsp={:#018x} rbp={:#018x}\n\
                     rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}\n\
                     rsi={:#018x} rdi={:#018x} r8={:#018x} r9={:#018x}",
                    r.rip, r.rflags, r.rsp, r.rbp, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.r8, r.r9
                );
            }
            Err(e) => {
                let _ = writeln!(out, "registers unavailable: {e}");
            }
        }
        match self.fd.get_sregs() {
            Ok(s) => {
                let _ = writeln!(
                    out,
                    "cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}\n\
                     cs={:#06x} base={:#x} ds={:#06x} ss={:#06x} gdt={:#x}/{:#x} idt={:#x}/{:#x}",
                    s.cr0,
                    s.cr2,
                    s.cr3,
                    s.cr4,
                    s.efer,
                    s.cs.selector,
                    s.cs.base,
                    s.ds.selector,
                    s.ss.selector,
                    s.gdt.base,
                    s.gdt.limit,
                    s.idt.base,
                    s.idt.limit
                );
            }
            Err(e) => {
                let _ = writeln!(out, "special registers unavailable: {e}");
            }
        }
        out
    }
}

/// The PC's GSI wiring as KVM irqchip routes.
fn pc_irq_routing() -> Result<KvmIrqRouting> {
    let entries: Vec<kvm_irq_routing_entry> = pc_irq_routes()
        .into_iter()
        .map(|(gsi, input)| {
            let (irqchip, pin) = match input {
                IrqChipPin::PicPrimary(pin) => (KVM_IRQCHIP_PIC_MASTER, pin),
                IrqChipPin::PicSecondary(pin) => (KVM_IRQCHIP_PIC_SLAVE, pin),
                IrqChipPin::Ioapic(pin) => (KVM_IRQCHIP_IOAPIC, pin),
            };
            kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_IRQCHIP,
                u: kvm_irq_routing_entry__bindgen_ty_1 {
                    irqchip: kvm_irq_routing_irqchip { irqchip, pin: u32::from(pin) },
                },
                ..Default::default()
            }
        })
        .collect();
    KvmIrqRouting::from_entries(&entries)
        .map_err(|_| Error::new("KVM_SET_GSI_ROUTING", std::io::ErrorKind::InvalidInput))
}

fn from_kvm_cpuid(e: &kvm_cpuid_entry2) -> CpuidEntry {
    CpuidEntry { function: e.function, index: e.index, flags: e.flags, eax: e.eax, ebx: e.ebx, ecx: e.ecx, edx: e.edx }
}

fn to_kvm_cpuid(e: &CpuidEntry) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function: e.function,
        index: e.index,
        flags: e.flags,
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
        ..Default::default()
    }
}

fn to_kvm_segment(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: u8::from(s.present),
        dpl: s.dpl,
        db: u8::from(s.db),
        s: u8::from(s.s),
        l: u8::from(s.l),
        g: u8::from(s.g),
        avl: u8::from(s.avl),
        unusable: u8::from(s.unusable),
        padding: 0,
    }
}

fn to_kvm_dtable(t: &DescriptorTable) -> kvm_dtable {
    kvm_dtable { base: t.base, limit: t.limit, ..Default::default() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_conversion_keeps_every_field() {
        let seg = Segment {
            base: 0x1000,
            limit: 0xfffff,
            selector: 0x10,
            type_: 0xb,
            present: true,
            dpl: 0,
            db: false,
            s: true,
            l: true,
            g: true,
            avl: false,
            unusable: false,
        };
        let k = to_kvm_segment(&seg);
        assert_eq!((k.base, k.limit, k.selector, k.type_), (0x1000, 0xfffff, 0x10, 0xb));
        assert_eq!((k.present, k.s, k.l, k.g, k.db, k.avl, k.unusable), (1, 1, 1, 1, 0, 0, 0));
    }

    #[test]
    fn cpuid_conversion_round_trips() {
        let e = CpuidEntry { function: 0xb, index: 1, flags: 1, eax: 2, ebx: 3, ecx: 4, edx: 5 };
        assert_eq!(from_kvm_cpuid(&to_kvm_cpuid(&e)), e);
    }
}

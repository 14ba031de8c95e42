//! KVM on x86_64: the PC irqchip, CPUID, MSRs and register state.

use std::fmt::Write;
use std::sync::{Arc, OnceLock};

use arch::x86_64::cpu_state::{DescriptorTable, GeneralRegisters, Segment};
use arch::x86_64::layout::{IrqChipPin, PcIrqchipLayout};
use arch::x86_64::{CpuState, CpuidEntry, MsrEntry};
use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_dtable, kvm_fpu, kvm_ioapic_state,
    kvm_ioapic_state__bindgen_ty_1, kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1,
    kvm_irq_routing_irqchip, kvm_irqchip, kvm_irqchip__bindgen_ty_1, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pic_state, kvm_pit_channel_state, kvm_pit_config, kvm_pit_state2, kvm_regs, kvm_segment, kvm_sregs,
    kvm_vcpu_events, kvm_xcr, kvm_xcrs, kvm_xsave, CpuId, KvmIrqRouting, Msrs, Xsave, KVM_CLOCK_TSC_STABLE,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_MAX_CPUID_ENTRIES,
    KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_SIPI_RECEIVED,
    KVM_MP_STATE_UNINITIALIZED, KVM_PIT_SPEAKER_DUMMY, KVM_VCPUEVENT_VALID_NMI_PENDING, KVM_VCPUEVENT_VALID_PAYLOAD,
    KVM_VCPUEVENT_VALID_SHADOW, KVM_VCPUEVENT_VALID_SIPI_VECTOR, KVM_VCPUEVENT_VALID_SMM,
    KVM_VCPUEVENT_VALID_TRIPLE_FAULT, KVM_X86_SHADOW_INT_MOV_SS, KVM_X86_SHADOW_INT_STI,
};
use kvm_ioctls::{Cap, Kvm, VcpuExit as KvmExit, VmFd};

use super::{KvmHypervisor, KvmVcpu, KvmVm};
use crate::x86_64::{
    ClockState, DebugRegisters, ExitX86_64, ExtendedControlRegister, FpuState, HypervisorX86_64, IoapicState, MpState,
    PicState, PitChannelState, PitState, SpecialRegisters, VcpuEvents, VcpuStateX86_64, VcpuX86_64, VmStateX86_64,
    VmX86_64,
};
use crate::{Error, Result};

/// The exits of `KVM_RUN` that only x86_64 has.
pub(super) fn arch_exit(exit: &KvmExit<'_>) -> Option<ExitX86_64> {
    match exit {
        KvmExit::Shutdown => Some(ExitX86_64::TripleFault),
        _ => None,
    }
}

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
    fn create_pc_irqchip(&self, layout: &PcIrqchipLayout) -> Result<()> {
        let tss = usize::try_from(layout.tss_address)
            .map_err(|_| Error::new("KVM_SET_TSS_ADDR", std::io::ErrorKind::InvalidInput))?;
        self.fd.set_tss_address(tss).map_err(|e| Error::new("KVM_SET_TSS_ADDR", e))?;
        if let Some(address) = layout.identity_map_address {
            self.fd.set_identity_map_address(address).map_err(|e| Error::new("KVM_SET_IDENTITY_MAP_ADDR", e))?;
        }
        self.fd.create_irq_chip().map_err(|e| Error::new("KVM_CREATE_IRQCHIP", e))?;
        // KVM's default routing puts GSI 0 on IOAPIC pin 0; a PC (and the MADT we build) has the PIT on pin 2.
        self.fd.set_gsi_routing(&irq_routing(&layout.routes)?).map_err(|e| Error::new("KVM_SET_GSI_ROUTING", e))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        self.fd.create_pit2(pit).map_err(|e| Error::new("KVM_CREATE_PIT2", e))?;
        // Kept for checking restored states against. One irqchip per VM: KVM_CREATE_IRQCHIP refused a second.
        let _ = self.arch.ioapic.set(IoapicLayout { start: layout.ioapic_start, pins: layout.ioapic_pins });
        Ok(())
    }

    fn save_state(&self) -> Result<VmStateX86_64> {
        self.save_vm_state()
    }

    fn restore_state(&self, state: &VmStateX86_64) -> Result<()> {
        self.restore_vm_state(state)
    }

    fn restore_clock(&self, clock: &ClockState) -> Result<()> {
        self.restore_vm_clock(clock)
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
        sregs.cs = segment_to_kvm(&s.cs);
        sregs.ds = segment_to_kvm(&s.ds);
        sregs.es = segment_to_kvm(&s.es);
        sregs.fs = segment_to_kvm(&s.fs);
        sregs.gs = segment_to_kvm(&s.gs);
        sregs.ss = segment_to_kvm(&s.ss);
        sregs.tr = segment_to_kvm(&s.tr);
        sregs.gdt = descriptor_table_to_kvm(&s.gdt);
        sregs.idt = descriptor_table_to_kvm(&s.idt);
        sregs.cr0 = s.cr0;
        sregs.cr3 = s.cr3;
        sregs.cr4 = s.cr4;
        sregs.efer = s.efer;
        self.fd.set_sregs(&sregs).map_err(|e| Error::new("KVM_SET_SREGS", e))?;
        self.fd.set_regs(&registers_to_kvm(&state.regs)).map_err(|e| Error::new("KVM_SET_REGS", e))?;

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

    fn save_state(&self) -> Result<VcpuStateX86_64> {
        self.save_vcpu_state()
    }

    fn restore_tsc_khz(&self, khz: u32) -> Result<()> {
        if khz == 0 {
            return Err(invalid("KVM_SET_TSC_KHZ", "a TSC frequency of 0 kHz".into()));
        }
        self.set_tsc_khz_if_needed(khz)
    }

    fn restore_state(&self, state: &VcpuStateX86_64) -> Result<()> {
        self.restore_vcpu_state(state)
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

/// The machine's GSI wiring as KVM irqchip routes.
fn irq_routing(routes: &[(u32, IrqChipPin)]) -> Result<KvmIrqRouting> {
    let entries: Vec<kvm_irq_routing_entry> = routes
        .iter()
        .map(|&(gsi, input)| {
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

// ---------------------------------------------------------------------------------------------------------------
// State as data.

/// The MSRs that hold guest-visible state, saved when KVM lists them in KVM_GET_MSR_INDEX_LIST (what it can
/// save on this host). The choice follows Firecracker's and Cloud Hypervisor's reasoning: what the guest kernel
/// programs once and relies on afterwards (SYSCALL/SYSENTER entry points, the swapped GS base, PAT, TSC_AUX for
/// RDTSCP/RDPID, MISC_ENABLE, CPUID faulting, the AMD HWCR), the kvmclock, steal-time, PV-EOI and async-PF areas
/// it registered with KVM, what moves with time (the TSC, its adjustment, the TSC-deadline timer), and the
/// speculation and TSX controls it set. Not here: EFER, FS/GS base and the APIC base, which are in the special
/// and segment registers (KVM_SET_SREGS loads the APIC base before the LAPIC, which depends on it); MCG_CTL and
/// FEATURE_CONTROL, which Firecracker found Linux does not export; the PMU and nested-VMX MSRs KVM lists but
/// cannot always read, which Kestrel's guests do not get.
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
const LISTED_MSRS: &[u32] = &[
    MSR_IA32_TSC,
    0x3b,        // IA32_TSC_ADJUST
    0x48,        // IA32_SPEC_CTRL
    0x122,       // IA32_TSX_CTRL
    0x140,       // MISC_FEATURES_ENABLES (CPUID faulting)
    0x174,       // IA32_SYSENTER_CS
    0x175,       // IA32_SYSENTER_ESP
    0x176,       // IA32_SYSENTER_EIP
    0x1a0,       // IA32_MISC_ENABLE
    0x277,       // IA32_PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
    0xc001_0015, // AMD HWCR
    0x11,        // kvmclock wall clock (old)
    0x12,        // kvmclock system time (old)
    0x4b56_4d00, // kvmclock wall clock
    0x4b56_4d01, // kvmclock system time
    0x4b56_4d02, // async page faults
    0x4b56_4d03, // steal time
    0x4b56_4d04, // PV EOI
    0x4b56_4d05, // poll control
    0x4b56_4d06, // async page fault interrupt vector
    MSR_IA32_TSC_DEADLINE,
];

/// The MTRRs: KVM emulates them for every vCPU whose CPUID has MTRR but leaves them out of the index list (QEMU
/// saves them on its own for that reason). The guest reads them back after a resume, and KVM uses them for
/// memory types with non-coherent DMA. Default type, 8 variable ranges (KVM's count), the fixed ranges.
const UNLISTED_MSRS: &[u32] = &[
    0x2ff, 0x200, 0x201, 0x202, 0x203, 0x204, 0x205, 0x206, 0x207, 0x208, 0x209, 0x20a, 0x20b, 0x20c, 0x20d, 0x20e,
    0x20f, 0x250, 0x258, 0x259, 0x268, 0x269, 0x26a, 0x26b, 0x26c, 0x26d, 0x26e, 0x26f,
];

/// What the vCPUs of one VM need to know about the host's KVM to save and restore their state, and what a restore
/// of the VM's own state is checked against.
pub(super) struct VmData {
    /// The [`LISTED_MSRS`] this host's KVM lists as saveable, and the [`UNLISTED_MSRS`]: TSC first, the TSC
    /// deadline last.
    saved_msrs: Arc<[u32]>,
    /// The IOAPIC the machine's layout gave `create_pc_irqchip`, once it ran.
    ioapic: OnceLock<IoapicLayout>,
}

/// Where the machine has its IOAPIC, and how many pins.
struct IoapicLayout {
    start: u64,
    pins: u32,
}

impl VmData {
    pub(super) fn new(kvm: &Kvm, _vm: &VmFd) -> Result<Self> {
        let listed = kvm.get_msr_index_list().map_err(|e| Error::new("KVM_GET_MSR_INDEX_LIST", e))?;
        let listed = listed.as_slice();
        let mut saved_msrs: Vec<u32> = LISTED_MSRS.iter().copied().filter(|index| listed.contains(index)).collect();
        // Before the deadline, which stays last (see `restore_vcpu_state`).
        let deadline = saved_msrs.iter().position(|&index| index == MSR_IA32_TSC_DEADLINE).unwrap_or(saved_msrs.len());
        saved_msrs.splice(deadline..deadline, UNLISTED_MSRS.iter().copied());
        let saved_msrs = saved_msrs.into();
        Ok(VmData { saved_msrs, ioapic: OnceLock::new() })
    }

    pub(super) fn vcpu_data(&self, vm: &VmFd) -> VcpuData {
        // KVM_CAP_XSAVE2 gives the size KVM_GET_XSAVE2 writes, which grows past the legacy 4 KiB with AMX tiles.
        let xsave = match vm.check_extension_int(Cap::Xsave2) {
            size if size > 0 => XsaveSupport::Sized(size as usize),
            _ if vm.check_extension(Cap::Xsave) => XsaveSupport::Legacy,
            _ => XsaveSupport::None,
        };
        VcpuData {
            saved_msrs: Arc::clone(&self.saved_msrs),
            xsave,
            tsc_khz_readable: vm.check_extension(Cap::GetTscKhz),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum XsaveSupport {
    None,
    /// KVM_GET_XSAVE: the legacy 4 KiB area.
    Legacy,
    /// KVM_GET_XSAVE2, with the size KVM_CAP_XSAVE2 reports.
    Sized(usize),
}

impl XsaveSupport {
    fn len(self) -> Option<usize> {
        match self {
            XsaveSupport::None => None,
            XsaveSupport::Legacy => Some(LEGACY_XSAVE_LEN),
            XsaveSupport::Sized(size) => Some(LEGACY_XSAVE_LEN + xsave_extra_words(size) * 4),
        }
    }
}

const LEGACY_XSAVE_LEN: usize = std::mem::size_of::<kvm_xsave>();
const LAPIC_LEN: usize = std::mem::size_of::<kvm_lapic_state>();

/// The 32-bit words past the legacy area that an XSAVE area of `size` bytes needs.
fn xsave_extra_words(size: usize) -> usize {
    size.saturating_sub(LEGACY_XSAVE_LEN).div_ceil(4)
}

pub(super) struct VcpuData {
    saved_msrs: Arc<[u32]>,
    xsave: XsaveSupport,
    tsc_khz_readable: bool,
}

/// A state that cannot be loaded on this host: one error line saying which part and why.
fn invalid(operation: &'static str, problem: String) -> Error {
    Error::new(operation, std::io::Error::new(std::io::ErrorKind::InvalidData, problem))
}

impl KvmVcpu {
    /// The saveable MSRs' values. KVM_GET_MSRS stops at the first MSR it cannot read for this vCPU (one its
    /// CPUID does not give it, typically) and says how many it read; such an MSR is not part of this guest's state,
    /// so it is dropped and the read goes on from the next one, as Cloud Hypervisor does.
    fn save_msrs(&self) -> Result<Vec<MsrEntry>> {
        let mut pending: Vec<u32> = self.arch.saved_msrs.to_vec();
        let mut saved = Vec::with_capacity(pending.len());
        while !pending.is_empty() {
            let entries: Vec<kvm_msr_entry> =
                pending.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
            let mut msrs = Msrs::from_entries(&entries)
                .map_err(|_| Error::new("KVM_GET_MSRS", std::io::ErrorKind::InvalidInput))?;
            let read = self.fd.get_msrs(&mut msrs).map_err(|e| Error::new("KVM_GET_MSRS", e))?;
            saved.extend(msrs.as_slice()[..read].iter().map(|e| MsrEntry { index: e.index, value: e.data }));
            // Skip the one KVM refused (if any) and retry the rest.
            pending.drain(..(read + 1).min(pending.len()));
        }
        Ok(saved)
    }

    fn save_xsave(&self) -> Result<Option<Vec<u8>>> {
        let words: Vec<u32> = match self.arch.xsave {
            XsaveSupport::None => return Ok(None),
            XsaveSupport::Legacy => self.fd.get_xsave().map_err(|e| Error::new("KVM_GET_XSAVE", e))?.region.to_vec(),
            XsaveSupport::Sized(size) => {
                let mut xsave = Xsave::new(xsave_extra_words(size))
                    .map_err(|_| Error::new("KVM_GET_XSAVE2", std::io::ErrorKind::InvalidInput))?;
                // SAFETY: `xsave` has room for the `size` bytes KVM_CAP_XSAVE2 says KVM_GET_XSAVE2 writes.
                unsafe { self.fd.get_xsave2(&mut xsave) }.map_err(|e| Error::new("KVM_GET_XSAVE2", e))?;
                let mut words = xsave.as_fam_struct_ref().xsave.region.to_vec();
                words.extend_from_slice(xsave.as_slice());
                words
            }
        };
        Ok(Some(words.iter().flat_map(|w| w.to_le_bytes()).collect()))
    }

    fn restore_xsave(&self, bytes: &[u8]) -> Result<()> {
        let words: Vec<u32> =
            bytes.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("chunks of 4"))).collect();
        let (region, extra) = words.split_at(LEGACY_XSAVE_LEN / 4);
        let mut xsave =
            Xsave::new(extra.len()).map_err(|_| Error::new("KVM_SET_XSAVE", std::io::ErrorKind::InvalidInput))?;
        // SAFETY: only the legacy region is written; the length the wrapper's safety rests on is left alone.
        unsafe { xsave.as_mut_fam_struct() }.xsave.region.copy_from_slice(region);
        xsave.as_mut_slice().copy_from_slice(extra);
        // SAFETY: the area is as long as this host's KVM_CAP_XSAVE2 size, or the legacy 4 KiB where KVM has no
        // XSAVE2 (checked in `check_vcpu_state` against the same `XsaveSupport`), so KVM reads only inside it.
        unsafe { self.fd.set_xsave2(&xsave) }.map_err(|e| Error::new("KVM_SET_XSAVE", e))
    }

    /// Everything in `state` that this host could refuse for its shape rather than its values, before any of it is
    /// written: a state from a file is outside input.
    fn check_vcpu_state(&self, state: &VcpuStateX86_64) -> Result<()> {
        const OPERATION: &str = "restoring the vCPU state";
        match (&state.xsave, self.arch.xsave.len()) {
            (None, _) => {}
            (Some(_), None) => {
                return Err(invalid(OPERATION, "the state has an XSAVE area and this host's KVM has no XSAVE".into()))
            }
            (Some(bytes), Some(len)) if bytes.len() != len => {
                return Err(invalid(
                    OPERATION,
                    format!("XSAVE area of {} bytes, this host's KVM uses {len}", bytes.len()),
                ))
            }
            (Some(_), Some(_)) => {}
        }
        if state.lapic.len() != LAPIC_LEN {
            return Err(invalid(
                OPERATION,
                format!("local APIC page of {} bytes, KVM uses {LAPIC_LEN}", state.lapic.len()),
            ));
        }
        let xcr_room = kvm_xcrs::default().xcrs.len();
        if state.xcrs.len() > xcr_room {
            return Err(invalid(OPERATION, format!("{} XCRs, KVM takes at most {xcr_room}", state.xcrs.len())));
        }
        if state.msrs.len() > self.arch.saved_msrs.len() {
            return Err(invalid(
                OPERATION,
                format!("{} MSRs, more than the {} this host saves", state.msrs.len(), self.arch.saved_msrs.len()),
            ));
        }
        for (i, msr) in state.msrs.iter().enumerate() {
            if !self.arch.saved_msrs.contains(&msr.index) {
                return Err(invalid(OPERATION, format!("MSR {:#x} is not one this host's KVM saves", msr.index)));
            }
            if state.msrs[..i].iter().any(|m| m.index == msr.index) {
                return Err(invalid(OPERATION, format!("MSR {:#x} appears twice", msr.index)));
            }
        }
        let shadow_bits = KVM_X86_SHADOW_INT_MOV_SS | KVM_X86_SHADOW_INT_STI;
        if u32::from(state.events.interrupt_shadow) & !shadow_bits != 0 {
            return Err(invalid(OPERATION, format!("interrupt shadow {:#x}", state.events.interrupt_shadow)));
        }
        if state.tsc_khz == Some(0) {
            return Err(invalid(OPERATION, "a TSC frequency of 0 kHz".into()));
        }
        Ok(())
    }

    /// Makes the guest's TSC run at `khz`, if it does not already. KVM accepts any rate where the host can scale
    /// the TSC (KVM_CAP_TSC_CONTROL), and elsewhere only one within its tolerance (250 ppm) of the host's: a
    /// snapshot from a host with another TSC rate is then refused, as it must be (the guest's clocks would drift).
    fn set_tsc_khz_if_needed(&self, khz: u32) -> Result<()> {
        let current = if self.arch.tsc_khz_readable { self.fd.get_tsc_khz().ok() } else { None };
        if current == Some(khz) {
            return Ok(());
        }
        self.fd.set_tsc_khz(khz).map_err(|e| {
            let now = current.map_or("an unknown rate".to_string(), |c| format!("{c} kHz"));
            invalid(
                "KVM_SET_TSC_KHZ",
                format!("the guest's TSC ran at {khz} kHz, this host's runs at {now}, and KVM cannot scale it ({e})"),
            )
        })
    }
}

impl KvmVcpu {
    /// The state, read in an order that keeps it consistent: see the comments.
    pub(super) fn save_vcpu_state(&self) -> Result<VcpuStateX86_64> {
        // First: KVM_GET_MP_STATE delivers a pending INIT or SIPI to the vCPU before it answers (QEMU reads it
        // first for that reason), which changes the registers and the LAPIC read below.
        let mp_state = mp_state_from_kvm(self.fd.get_mp_state().map_err(|e| Error::new("KVM_GET_MP_STATE", e))?)?;
        let regs = registers_from_kvm(&self.fd.get_regs().map_err(|e| Error::new("KVM_GET_REGS", e))?);
        let sregs = special_registers_from_kvm(&self.fd.get_sregs().map_err(|e| Error::new("KVM_GET_SREGS", e))?);
        let fpu = fpu_from_kvm(&self.fd.get_fpu().map_err(|e| Error::new("KVM_GET_FPU", e))?);
        let xsave = self.save_xsave()?;
        let xcrs = if self.arch.xsave != XsaveSupport::None {
            let xcrs = self.fd.get_xcrs().map_err(|e| Error::new("KVM_GET_XCRS", e))?;
            let count = (xcrs.nr_xcrs as usize).min(xcrs.xcrs.len());
            xcrs.xcrs[..count].iter().map(|x| ExtendedControlRegister { index: x.xcr, value: x.value }).collect()
        } else {
            Vec::new()
        };
        let debug = self.fd.get_debug_regs().map_err(|e| Error::new("KVM_GET_DEBUGREGS", e))?;
        let debug_regs = DebugRegisters { db: debug.db, dr6: debug.dr6, dr7: debug.dr7 };
        let lapic =
            self.fd.get_lapic().map_err(|e| Error::new("KVM_GET_LAPIC", e))?.regs.iter().map(|&b| b as u8).collect();
        let msrs = self.save_msrs()?;
        // Last among the reads that can change what is pending.
        let events = events_from_kvm(&self.fd.get_vcpu_events().map_err(|e| Error::new("KVM_GET_VCPU_EVENTS", e))?);
        let tsc_khz = if self.arch.tsc_khz_readable {
            Some(self.fd.get_tsc_khz().map_err(|e| Error::new("KVM_GET_TSC_KHZ", e))?)
        } else {
            None
        };
        Ok(VcpuStateX86_64 { regs, sregs, fpu, xsave, xcrs, msrs, lapic, events, mp_state, debug_regs, tsc_khz })
    }

    /// Writes the state back. The order is KVM's, as Firecracker and QEMU found it:
    /// 1. TSC frequency: the TSC MSR and the TSC deadline are counts at that rate.
    /// 2. MP state, before the registers: it is independent of them, and the vCPU must be in its saved run state
    ///    (runnable, halted, waiting for SIPI) before events are injected into it.
    /// 3. General registers; KVM_SET_REGS drops any pending exception, which the events at the end put back.
    /// 4. Special registers: they carry the APIC base (enable and x2APIC mode) that the LAPIC load below checks
    ///    itself against, and EFER/CR0/CR4 that XSAVE and the MSRs are validated under.
    /// 5. FPU, then XSAVE (a superset of it) and XCRs, then debug registers.
    /// 6. LAPIC, before the MSRs: KVM ignores a TSC-deadline write while the LAPIC timer is not in TSC-deadline mode.
    /// 7. MSRs, the TSC before the deadline (KVM writes them in order, and the deadline is compared to the TSC).
    /// 8. vCPU events last: the loads above clear or change pending exceptions, interrupts and NMIs.
    pub(super) fn restore_vcpu_state(&self, state: &VcpuStateX86_64) -> Result<()> {
        self.check_vcpu_state(state)?;
        if let Some(khz) = state.tsc_khz {
            self.set_tsc_khz_if_needed(khz)?;
        }
        self.fd.set_mp_state(mp_state_to_kvm(state.mp_state)).map_err(|e| Error::new("KVM_SET_MP_STATE", e))?;
        self.fd.set_regs(&registers_to_kvm(&state.regs)).map_err(|e| Error::new("KVM_SET_REGS", e))?;
        self.fd.set_sregs(&special_registers_to_kvm(&state.sregs)).map_err(|e| Error::new("KVM_SET_SREGS", e))?;
        self.fd.set_fpu(&fpu_to_kvm(&state.fpu)).map_err(|e| Error::new("KVM_SET_FPU", e))?;
        if let Some(bytes) = &state.xsave {
            self.restore_xsave(bytes)?;
        }
        if !state.xcrs.is_empty() {
            let mut xcrs = kvm_xcrs { nr_xcrs: state.xcrs.len() as u32, ..Default::default() };
            for (dst, src) in xcrs.xcrs.iter_mut().zip(&state.xcrs) {
                *dst = kvm_xcr { xcr: src.index, value: src.value, ..Default::default() };
            }
            self.fd.set_xcrs(&xcrs).map_err(|e| Error::new("KVM_SET_XCRS", e))?;
        }
        let debug = kvm_debugregs {
            db: state.debug_regs.db,
            dr6: state.debug_regs.dr6,
            dr7: state.debug_regs.dr7,
            ..Default::default()
        };
        self.fd.set_debug_regs(&debug).map_err(|e| Error::new("KVM_SET_DEBUGREGS", e))?;
        let mut lapic = kvm_lapic_state::default();
        for (dst, &src) in lapic.regs.iter_mut().zip(&state.lapic) {
            *dst = src as _;
        }
        self.fd.set_lapic(&lapic).map_err(|e| Error::new("KVM_SET_LAPIC", e))?;
        let mut msrs = state.msrs.clone();
        msrs.sort_by_key(|m| match m.index {
            MSR_IA32_TSC => 0,
            MSR_IA32_TSC_DEADLINE => 2,
            _ => 1,
        });
        self.set_msrs(&msrs)?;
        self.fd.set_vcpu_events(&events_to_kvm(&state.events)).map_err(|e| Error::new("KVM_SET_VCPU_EVENTS", e))
    }
}

impl KvmVm {
    fn get_irqchip(&self, chip_id: u32) -> Result<kvm_irqchip> {
        let mut chip = kvm_irqchip { chip_id, ..Default::default() };
        self.fd.get_irqchip(&mut chip).map_err(|e| Error::new("KVM_GET_IRQCHIP", e))?;
        Ok(chip)
    }

    pub(super) fn save_vm_state(&self) -> Result<VmStateX86_64> {
        let master = self.get_irqchip(KVM_IRQCHIP_PIC_MASTER)?;
        let slave = self.get_irqchip(KVM_IRQCHIP_PIC_SLAVE)?;
        let ioapic = self.get_irqchip(KVM_IRQCHIP_IOAPIC)?;
        let pit = self.fd.get_pit2().map_err(|e| Error::new("KVM_GET_PIT2", e))?;
        let clock = self.fd.get_clock().map_err(|e| Error::new("KVM_GET_CLOCK", e))?;
        // SAFETY: KVM filled the member `chip_id` names; both are plain integers, valid for any bit pattern.
        let (pic_master, pic_slave, ioapic) = unsafe { (master.chip.pic, slave.chip.pic, ioapic.chip.ioapic) };
        Ok(VmStateX86_64 {
            pic_master: pic_from_kvm(&pic_master),
            pic_slave: pic_from_kvm(&pic_slave),
            ioapic: ioapic_from_kvm(&ioapic),
            pit: PitState { channels: pit.channels.map(|c| pit_channel_from_kvm(&c)), flags: pit.flags },
            clock: ClockState { nanoseconds: clock.clock, tsc_stable: clock.flags & KVM_CLOCK_TSC_STABLE != 0 },
        })
    }

    pub(super) fn restore_vm_state(&self, state: &VmStateX86_64) -> Result<()> {
        const OPERATION: &str = "restoring the irqchip state";
        let Some(ioapic) = self.arch.ioapic.get() else {
            return Err(invalid(OPERATION, "the VM has no PC irqchip to load it into".into()));
        };
        if state.ioapic.redirection_table.len() != ioapic.pins as usize {
            return Err(invalid(
                OPERATION,
                format!("IOAPIC with {} pins, the PC's has {}", state.ioapic.redirection_table.len(), ioapic.pins),
            ));
        }
        // KVM moves its IOAPIC to whatever base the state names; the machine (and its ACPI tables) has it here.
        if state.ioapic.base_address != ioapic.start {
            return Err(invalid(
                OPERATION,
                format!("IOAPIC at {:#x}, not {:#x}", state.ioapic.base_address, ioapic.start),
            ));
        }
        for (chip_id, pic) in [(KVM_IRQCHIP_PIC_MASTER, &state.pic_master), (KVM_IRQCHIP_PIC_SLAVE, &state.pic_slave)] {
            let chip =
                kvm_irqchip { chip_id, chip: kvm_irqchip__bindgen_ty_1 { pic: pic_to_kvm(pic) }, ..Default::default() };
            self.fd.set_irqchip(&chip).map_err(|e| Error::new("KVM_SET_IRQCHIP (PIC)", e))?;
        }
        let chip = kvm_irqchip {
            chip_id: KVM_IRQCHIP_IOAPIC,
            chip: kvm_irqchip__bindgen_ty_1 { ioapic: ioapic_to_kvm(&state.ioapic) },
            ..Default::default()
        };
        self.fd.set_irqchip(&chip).map_err(|e| Error::new("KVM_SET_IRQCHIP (IOAPIC)", e))?;
        let pit = kvm_pit_state2 {
            channels: state.pit.channels.map(|c| pit_channel_to_kvm(&c)),
            flags: state.pit.flags,
            ..Default::default()
        };
        self.fd.set_pit2(&pit).map_err(|e| Error::new("KVM_SET_PIT2", e))
    }

    pub(super) fn restore_vm_clock(&self, clock: &ClockState) -> Result<()> {
        // Flags 0: the clock restarts at exactly the saved value, so the guest sees no time pass while it was
        // saved (Firecracker does the same). KVM_CLOCK_REALTIME would instead advance it by the host's realtime
        // clock since `realtime`; a snapshot format that wants that must save `realtime` too.
        let clock = kvm_clock_data { clock: clock.nanoseconds, flags: 0, ..Default::default() };
        self.fd.set_clock(&clock).map_err(|e| Error::new("KVM_SET_CLOCK", e))
    }
}

fn mp_state_from_kvm(state: kvm_mp_state) -> Result<MpState> {
    Ok(match state.mp_state {
        KVM_MP_STATE_RUNNABLE => MpState::Runnable,
        KVM_MP_STATE_UNINITIALIZED => MpState::Uninitialized,
        KVM_MP_STATE_INIT_RECEIVED => MpState::InitReceived,
        KVM_MP_STATE_HALTED => MpState::Halted,
        KVM_MP_STATE_SIPI_RECEIVED => MpState::SipiReceived,
        other => return Err(invalid("KVM_GET_MP_STATE", format!("MP state {other}, which Kestrel cannot save"))),
    })
}

fn mp_state_to_kvm(state: MpState) -> kvm_mp_state {
    let mp_state = match state {
        MpState::Runnable => KVM_MP_STATE_RUNNABLE,
        MpState::Uninitialized => KVM_MP_STATE_UNINITIALIZED,
        MpState::InitReceived => KVM_MP_STATE_INIT_RECEIVED,
        MpState::Halted => KVM_MP_STATE_HALTED,
        MpState::SipiReceived => KVM_MP_STATE_SIPI_RECEIVED,
    };
    kvm_mp_state { mp_state }
}

/// Writes a pair of conversions between a state struct here and KVM's struct of the same fields, so that the
/// field list is written once for both directions. `copy` fields have the same type on both sides; `flag` fields
/// are a `bool` here and a 0/1 `u8` in KVM; `via` fields go through the named pair of conversions; KVM's fields
/// not named (padding, reserved words, a PIT channel's count load time, which the host clock sets) are zero.
macro_rules! kvm_conversions {
    (
        $ours:ident <=> $kvm:ident: $from_kvm:ident, $to_kvm:ident {
            copy: [$($copy:ident),* $(,)?]
            $(, flag: [$($flag:ident),* $(,)?])?
            $(, via $field_from_kvm:ident / $field_to_kvm:ident: [$($via:ident),* $(,)?])*
            $(,)?
        }
    ) => {
        fn $from_kvm(k: &$kvm) -> $ours {
            $ours {
                $($copy: k.$copy,)*
                $($($flag: k.$flag != 0,)*)?
                $($($via: $field_from_kvm(&k.$via),)*)*
            }
        }

        // Some of KVM's structs have no fields past ours, which makes the update redundant for them.
        #[allow(clippy::needless_update)]
        fn $to_kvm(ours: &$ours) -> $kvm {
            $kvm {
                $($copy: ours.$copy,)*
                $($($flag: u8::from(ours.$flag),)*)?
                $($($via: $field_to_kvm(&ours.$via),)*)*
                ..Default::default()
            }
        }
    };
}

kvm_conversions!(GeneralRegisters <=> kvm_regs: registers_from_kvm, registers_to_kvm {
    copy: [rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8, r9, r10, r11, r12, r13, r14, r15, rip, rflags],
});

kvm_conversions!(Segment <=> kvm_segment: segment_from_kvm, segment_to_kvm {
    copy: [base, limit, selector, type_, dpl],
    flag: [present, db, s, l, g, avl, unusable],
});

kvm_conversions!(DescriptorTable <=> kvm_dtable: descriptor_table_from_kvm, descriptor_table_to_kvm {
    copy: [base, limit],
});

kvm_conversions!(SpecialRegisters <=> kvm_sregs: special_registers_from_kvm, special_registers_to_kvm {
    copy: [cr0, cr2, cr3, cr4, cr8, efer, apic_base, interrupt_bitmap],
    via segment_from_kvm / segment_to_kvm: [cs, ds, es, fs, gs, ss, tr, ldt],
    via descriptor_table_from_kvm / descriptor_table_to_kvm: [gdt, idt],
});

kvm_conversions!(FpuState <=> kvm_fpu: fpu_from_kvm, fpu_to_kvm {
    copy: [fpr, fcw, fsw, ftwx, last_opcode, last_ip, last_dp, xmm, mxcsr],
});

fn events_from_kvm(e: &kvm_vcpu_events) -> VcpuEvents {
    VcpuEvents {
        exception_injected: e.exception.injected != 0,
        exception_pending: e.exception.pending != 0,
        exception_vector: e.exception.nr,
        exception_error_code: (e.exception.has_error_code != 0).then_some(e.exception.error_code),
        exception_payload: (e.flags & KVM_VCPUEVENT_VALID_PAYLOAD != 0 && e.exception_has_payload != 0)
            .then_some(e.exception_payload),
        interrupt_injected: e.interrupt.injected != 0,
        interrupt_vector: e.interrupt.nr,
        interrupt_soft: e.interrupt.soft != 0,
        interrupt_shadow: e.interrupt.shadow,
        nmi_injected: e.nmi.injected != 0,
        nmi_pending: e.nmi.pending != 0,
        nmi_masked: e.nmi.masked != 0,
        sipi_vector: e.sipi_vector,
        smm: e.smi.smm != 0,
        smi_pending: e.smi.pending != 0,
        smm_inside_nmi: e.smi.smm_inside_nmi != 0,
        latched_init: e.smi.latched_init != 0,
        triple_fault_pending: (e.flags & KVM_VCPUEVENT_VALID_TRIPLE_FAULT != 0).then_some(e.triple_fault.pending != 0),
    }
}

fn events_to_kvm(e: &VcpuEvents) -> kvm_vcpu_events {
    let mut events = kvm_vcpu_events {
        flags: KVM_VCPUEVENT_VALID_NMI_PENDING
            | KVM_VCPUEVENT_VALID_SIPI_VECTOR
            | KVM_VCPUEVENT_VALID_SHADOW
            | KVM_VCPUEVENT_VALID_SMM,
        sipi_vector: e.sipi_vector,
        ..Default::default()
    };
    events.exception.injected = u8::from(e.exception_injected);
    events.exception.pending = u8::from(e.exception_pending);
    events.exception.nr = e.exception_vector;
    events.exception.has_error_code = u8::from(e.exception_error_code.is_some());
    events.exception.error_code = e.exception_error_code.unwrap_or(0);
    if let Some(payload) = e.exception_payload {
        events.flags |= KVM_VCPUEVENT_VALID_PAYLOAD;
        events.exception_has_payload = 1;
        events.exception_payload = payload;
    }
    events.interrupt.injected = u8::from(e.interrupt_injected);
    events.interrupt.nr = e.interrupt_vector;
    events.interrupt.soft = u8::from(e.interrupt_soft);
    events.interrupt.shadow = e.interrupt_shadow;
    events.nmi.injected = u8::from(e.nmi_injected);
    events.nmi.pending = u8::from(e.nmi_pending);
    events.nmi.masked = u8::from(e.nmi_masked);
    events.smi.smm = u8::from(e.smm);
    events.smi.pending = u8::from(e.smi_pending);
    events.smi.smm_inside_nmi = u8::from(e.smm_inside_nmi);
    events.smi.latched_init = u8::from(e.latched_init);
    if let Some(pending) = e.triple_fault_pending {
        events.flags |= KVM_VCPUEVENT_VALID_TRIPLE_FAULT;
        events.triple_fault.pending = u8::from(pending);
    }
    events
}

kvm_conversions!(PicState <=> kvm_pic_state: pic_from_kvm, pic_to_kvm {
    copy: [
        last_irr, irr, imr, isr, priority_add, irq_base, read_reg_select, poll, special_mask, init_state, auto_eoi,
        rotate_on_auto_eoi, special_fully_nested_mode, init4, elcr, elcr_mask,
    ],
});

fn ioapic_from_kvm(s: &kvm_ioapic_state) -> IoapicState {
    IoapicState {
        base_address: s.base_address,
        ioregsel: s.ioregsel,
        id: s.id,
        irr: s.irr,
        // SAFETY: `bits` covers the whole 64-bit entry, valid for any bit pattern.
        redirection_table: s.redirtbl.iter().map(|entry| unsafe { entry.bits }).collect(),
    }
}

/// Only for a state whose table length was checked.
fn ioapic_to_kvm(s: &IoapicState) -> kvm_ioapic_state {
    let mut ioapic = kvm_ioapic_state {
        base_address: s.base_address,
        ioregsel: s.ioregsel,
        id: s.id,
        irr: s.irr,
        ..Default::default()
    };
    for (dst, &bits) in ioapic.redirtbl.iter_mut().zip(&s.redirection_table) {
        *dst = kvm_ioapic_state__bindgen_ty_1 { bits };
    }
    ioapic
}

kvm_conversions!(PitChannelState <=> kvm_pit_channel_state: pit_channel_from_kvm, pit_channel_to_kvm {
    copy: [count, latched_count, count_latched, status_latched, status, read_state, write_state, write_latch, rw_mode,
        mode, bcd, gate],
});

#[cfg(test)]
mod tests {
    use arch::x86_64::layout::IOAPIC_START;

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
        let k = segment_to_kvm(&seg);
        assert_eq!((k.base, k.limit, k.selector, k.type_), (0x1000, 0xfffff, 0x10, 0xb));
        assert_eq!((k.present, k.s, k.l, k.g, k.db, k.avl, k.unusable), (1, 1, 1, 1, 0, 0, 0));
    }

    #[test]
    fn register_conversions_round_trip() {
        let segment =
            |selector: u16| Segment { selector, base: u64::from(selector) << 12, present: true, ..Default::default() };
        let sregs = SpecialRegisters {
            cs: Segment { l: true, g: true, ..segment(0x10) },
            ds: segment(0x18),
            es: segment(0x20),
            fs: segment(0x28),
            gs: segment(0x30),
            ss: segment(0x38),
            tr: Segment { s: false, type_: 0xb, ..segment(0x40) },
            ldt: Segment { unusable: true, ..segment(0x48) },
            gdt: DescriptorTable { base: 0x500, limit: 0x1f },
            idt: DescriptorTable { base: 0x520, limit: 0x7 },
            cr0: 1,
            cr2: 2,
            cr3: 3,
            cr4: 4,
            cr8: 8,
            efer: 0x500,
            apic_base: 0xfee0_0900,
            interrupt_bitmap: [1, 2, 3, 4],
        };
        assert_eq!(special_registers_from_kvm(&special_registers_to_kvm(&sregs)), sregs);
        let regs = GeneralRegisters { rax: 1, r15: 15, rip: 0x10_0000, rflags: 2, ..Default::default() };
        assert_eq!(registers_from_kvm(&registers_to_kvm(&regs)), regs);
        let fpu = FpuState { fcw: 0x37f, mxcsr: 0x1f80, fpr: [[7; 16]; 8], last_ip: 9, ..Default::default() };
        assert_eq!(fpu_from_kvm(&fpu_to_kvm(&fpu)), fpu);
    }

    #[test]
    fn xsave_lengths_follow_kvm_cap_xsave2() {
        assert_eq!(XsaveSupport::None.len(), None);
        assert_eq!(XsaveSupport::Legacy.len(), Some(4096));
        assert_eq!(XsaveSupport::Sized(4096).len(), Some(4096));
        // AMX: 11008 bytes, past the legacy area in whole 32-bit words.
        assert_eq!(XsaveSupport::Sized(11008).len(), Some(11008));
        assert_eq!(XsaveSupport::Sized(4098).len(), Some(4100));
    }

    #[test]
    fn events_survive_the_conversion_with_their_optional_parts() {
        let events = VcpuEvents {
            exception_injected: true,
            exception_vector: 14,
            exception_error_code: Some(2),
            exception_payload: Some(0xdead_b000),
            interrupt_shadow: 1,
            nmi_masked: true,
            triple_fault_pending: Some(false),
            ..Default::default()
        };
        assert_eq!(events_from_kvm(&events_to_kvm(&events)), events);
        let plain = VcpuEvents { nmi_pending: true, ..Default::default() };
        let kvm = events_to_kvm(&plain);
        assert_eq!(kvm.flags & (KVM_VCPUEVENT_VALID_PAYLOAD | KVM_VCPUEVENT_VALID_TRIPLE_FAULT), 0);
        assert_eq!(events_from_kvm(&kvm), plain);
    }

    #[test]
    fn irqchip_conversions_keep_every_field() {
        let ioapic = IoapicState {
            base_address: IOAPIC_START,
            ioregsel: 3,
            id: 4,
            irr: 5,
            redirection_table: (0..24).map(|i| 0x1_0000 | (0x30 + i)).collect(),
        };
        assert_eq!(ioapic_from_kvm(&ioapic_to_kvm(&ioapic)), ioapic);
        let channel = PitChannelState { count: 0x1234, mode: 3, rw_mode: 3, gate: 1, ..Default::default() };
        assert_eq!(pit_channel_from_kvm(&pit_channel_to_kvm(&channel)), channel);
    }

    #[test]
    fn states_refuse_unknown_fields() {
        let mut json = serde_json::to_value(VmStateX86_64::default()).unwrap();
        assert_eq!(serde_json::from_value::<VmStateX86_64>(json.clone()).unwrap(), VmStateX86_64::default());
        json["pit"]["hpet_legacy"] = true.into();
        let error = serde_json::from_value::<VmStateX86_64>(json).unwrap_err().to_string();
        assert!(error.contains("hpet_legacy"), "{error}");
    }

    #[test]
    fn cpuid_conversion_round_trips() {
        let e = CpuidEntry { function: 0xb, index: 1, flags: 1, eax: 2, ebx: 3, ecx: 4, edx: 5 };
        assert_eq!(from_kvm_cpuid(&to_kvm_cpuid(&e)), e);
    }
}

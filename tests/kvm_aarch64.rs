#![cfg(target_arch = "aarch64")]

//! The KVM aarch64 backend on its own, below the platform: a vCPU initialised with PSCI, an in-kernel GIC, boot
//! registers, and a hand-assembled guest that stores a byte to the PL011's address and then asks PSCI for
//! SYSTEM_OFF; and vCPU and GICv3 state as data (issue 16, step 2): a counting guest saved from one VM goes on
//! counting in a second one, and hostile states are refused; the GICv3 ITS that PCI functions' MSIs go through
//! takes messages by device ID, and its registers travel with the GIC's state. Under qemu-user (the foreign targets' CI step) there is no KVM: the tests say SKIPPED and why.
//! They run for real inside the aarch64 emulated runner's L1 (case `kvm-aarch64` in ci/runner/linux.cases).

mod support;

use arch::aarch64::layout::{GIC_ITS_START, GIC_LAYOUT, PL011_START, RAM_START};
use arch::aarch64::{BootRegisters, GicVersion};
use hypervisor::aarch64::{GicStateAarch64, Register, VcpuAarch64, VcpuStateAarch64, VmAarch64};
use hypervisor::kvm::{KvmHypervisor, KvmVcpu, KvmVm};
use hypervisor::{Hypervisor, Vcpu, VcpuExit, Vm};
use support::guest::{complete_pending_exit, memory_contents, run_collecting, TestVm};
use support::kvm_available;

/// The guest, at the start of RAM:
///   movz x0, #0x0900, lsl #16      x0 = PL011_START
///   movz w1, #'K'
///   strb w1, [x0]                  an MMIO write the VMM sees
///   movz w0, #0x0008
///   movk w0, #0x8400, lsl #16      w0 = PSCI_SYSTEM_OFF (0x84000008)
///   hvc  #0                        KVM's in-kernel PSCI: a SYSTEM_EVENT shutdown exit
///   b    .
const GUEST: [u32; 7] = [0xd2a1_2000, 0x5280_0961, 0x3900_0001, 0x5280_0100, 0x72b0_8000, 0xd400_0002, 0x1400_0000];

/// Enough interrupt IDs for the SGIs, PPIs and a first block of SPIs.
const GIC_IRQS: u32 = 64;
/// The guests' RAM.
const RAM_SIZE: usize = 2 << 20;

/// A VM with the GIC (v3, or v2 where only that is emulated), RAM holding `contents`, and one vCPU initialised
/// with PSCI 0.2.
fn build_vm(hypervisor: &KvmHypervisor, contents: &[u8]) -> TestVm<KvmVm> {
    let test = TestVm::new(hypervisor.create_vm().expect("creating a VM"), RAM_START, contents);
    test.vm.init_vcpu(&test.vcpu, false).expect("KVM_ARM_VCPU_INIT with PSCI 0.2");
    test.vm.create_gic(&GIC_LAYOUT, 1, GIC_IRQS).expect("creating the in-kernel GIC");
    test
}

/// RAM with `code` at its start.
fn ram_image(code: &[u32]) -> Vec<u8> {
    let mut ram = vec![0u8; RAM_SIZE];
    for (word, bytes) in code.iter().zip(ram.chunks_exact_mut(4)) {
        bytes.copy_from_slice(&word.to_le_bytes());
    }
    ram
}

#[test]
fn a_vcpu_stores_to_the_uart_and_powers_off_through_psci() {
    if !kvm_available() {
        return;
    }
    assert_eq!(PL011_START, 0x0900_0000, "the guest's movz encodes this address");
    let hypervisor = KvmHypervisor::new().expect("opening /dev/kvm");
    let mut test = build_vm(&hypervisor, &ram_image(&GUEST));
    let vcpu = &mut test.vcpu;
    // Affinity 0 for vCPU 0, and bit 31 (RES1) as every MPIDR_EL1 has it.
    let mpidr = vcpu.mpidr().expect("reading MPIDR_EL1");
    assert_eq!(mpidr & 0x80ff_ffff, 0x8000_0000, "MPIDR_EL1 {mpidr:#x}");
    vcpu.set_boot_registers(&BootRegisters::new(RAM_START, 0)).expect("setting the boot registers");

    let mut stores = Vec::new();
    let mut powered_off = false;
    for _ in 0..1000 {
        let outcome = match vcpu.run().expect("KVM_RUN") {
            VcpuExit::MmioWrite { addr, data } => {
                stores.push((addr, data.to_vec()));
                Ok(false)
            }
            VcpuExit::SystemPoweroff => Ok(true),
            VcpuExit::Interrupted => Ok(false),
            other => Err(format!("{other:?}")),
        };
        match outcome {
            Ok(true) => {
                powered_off = true;
                break;
            }
            Ok(false) => {}
            Err(exit) => panic!("unexpected exit {exit}\n{}", vcpu.dump_state()),
        }
    }
    assert_eq!(stores, vec![(PL011_START, vec![b'K'])], "the guest's one store reached the VMM");
    assert!(powered_off, "PSCI SYSTEM_OFF must end the run");
}

/// The counting guest, at the start of RAM:
///   movz x0, #0x0900, lsl #16      x0 = PL011_START
///   movz x2, #0x4000, lsl #16      x2 = RAM_START
/// loop:
///   add  x1, x1, #1
///   str  w1, [x2, #0x1000]         the counter in memory
///   str  w1, [x0]                  an MMIO write the test sees
///   b    loop
const COUNTING_GUEST: [u32; 6] = [0xd2a1_2000, 0xd2a8_0002, 0x9100_0421, 0xb910_0041, 0xb900_0001, 0x17ff_fffd];
/// Where the guest keeps its counter: `str w1, [x2, #0x1000]`, as an offset into RAM.
const COUNTER: usize = 0x1000;
/// Where PC is once the MMIO store has completed: the branch.
const AFTER_STORE: u64 = RAM_START + 0x14;

/// The virtual and physical counters (CNTVCT_EL0, CNTPCT_EL0 as ONE_REG ids): they go on between a save and a
/// reload, so they are left out of the comparison.
const COUNTERS: [u64; 2] = [0x6030_0000_0013_df1a, 0x6030_0000_0013_df01];
/// PC and X1 as ONE_REG ids (core registers, kvm_regs offsets in 32-bit words).
const PC: u64 = 0x6030_0000_0010_0040;
const X1: u64 = 0x6030_0000_0010_0002;

/// Runs until `count` MMIO stores to the PL011 and returns the values stored.
fn run_stores(vcpu: &mut KvmVcpu, count: usize) -> Vec<u32> {
    run_collecting(vcpu, count, |exit| match exit {
        VcpuExit::MmioWrite { addr: PL011_START, data } if data.len() == 4 => {
            Some(u32::from_le_bytes((*data).try_into().unwrap()))
        }
        _ => None,
    })
}

fn register(state: &VcpuStateAarch64, id: u64) -> u64 {
    let value = &state.registers.iter().find(|r| r.id == id).expect("a saved register").value;
    u64::from_le_bytes(value[..8].try_into().unwrap())
}

/// GICD_ISENABLER for SPIs 32-63, GICD_IPRIORITYR for SPIs 32-35, and the CPU interface's ICC_PMR_EL1 and
/// ICC_IGRPEN1_EL1 (as KVM's CPU_SYSREGS encodings).
const GICD_ISENABLER1: u32 = 0x104;
const GICD_IPRIORITYR8: u32 = 0x420;
const ICC_PMR_EL1: u16 = 0xc230;
const ICC_IGRPEN1_EL1: u16 = 0xc667;

/// Gives the source's GIC state a fresh one does not have: an enabled SPI with a priority, a priority mask and
/// group 1 enabled, as a guest kernel leaves them.
fn seed_gic_state(vm: &KvmVm, mpidr: u64) -> GicStateAarch64 {
    let mut gic = vm.save_gic_state(&[mpidr]).expect("saving the GIC state");
    for register in &mut gic.distributor {
        match register.offset {
            GICD_ISENABLER1 => register.value = 1 << 1,
            GICD_IPRIORITYR8 => register.value = 0xa0a0_a0a0,
            _ => {}
        }
    }
    for register in &mut gic.cpus[0].cpu_interface {
        match register.encoding {
            ICC_PMR_EL1 => register.value = 0xf0,
            ICC_IGRPEN1_EL1 => register.value = 1,
            _ => {}
        }
    }
    vm.restore_gic_state(&[mpidr], &gic).expect("loading the seeded GIC state");
    vm.save_gic_state(&[mpidr]).expect("saving the GIC state")
}

fn gic_value(gic: &GicStateAarch64, offset: u32) -> u32 {
    gic.distributor.iter().find(|r| r.offset == offset).expect("a saved distributor register").value
}

fn icc_value(gic: &GicStateAarch64, encoding: u16) -> u64 {
    gic.cpus[0].cpu_interface.iter().find(|r| r.encoding == encoding).expect("a saved ICC register").value
}

fn without_counters(state: &VcpuStateAarch64) -> VcpuStateAarch64 {
    let mut state = state.clone();
    state.registers.retain(|r| !COUNTERS.contains(&r.id));
    state
}

#[test]
fn a_counting_guest_continues_in_a_second_vm_from_its_saved_state() {
    if !kvm_available() {
        return;
    }
    let hypervisor = KvmHypervisor::new().expect("opening /dev/kvm");
    let mut source = build_vm(&hypervisor, &ram_image(&COUNTING_GUEST));
    source.vcpu.set_boot_registers(&BootRegisters::new(RAM_START, 0)).expect("setting the boot registers");
    let mpidr = source.vcpu.mpidr().expect("reading MPIDR_EL1");
    let seeded = seed_gic_state(&source.vm, mpidr);
    assert_eq!(gic_value(&seeded, GICD_ISENABLER1), 1 << 1, "SPI 33 enabled");
    assert_eq!(gic_value(&seeded, GICD_IPRIORITYR8), 0xa0a0_a0a0);
    assert_eq!(icc_value(&seeded, ICC_PMR_EL1), 0xf0);
    assert_eq!(icc_value(&seeded, ICC_IGRPEN1_EL1), 1);
    assert_eq!(run_stores(&mut source.vcpu, 50), (1..=50).collect::<Vec<u32>>(), "the guest counts from 1");
    complete_pending_exit(&mut source.vcpu);

    let state = source.vcpu.save_state().expect("saving the vCPU state");
    let gic = source.vm.save_gic_state(&[mpidr]).expect("saving the GIC state");
    // What was seeded is still there. (Not the whole state: the first run clamps the binary point registers to
    // the hardware's minimum, so BPR0/BPR1 read back 2 and 3 where 0 was written.)
    for (what, offset) in [("SPI 33's enable", GICD_ISENABLER1), ("SPIs 32-35's priority", GICD_IPRIORITYR8)] {
        assert_eq!(gic_value(&gic, offset), gic_value(&seeded, offset), "{what} as seeded");
    }
    assert_eq!(icc_value(&gic, ICC_PMR_EL1), 0xf0);
    assert_eq!(icc_value(&gic, ICC_IGRPEN1_EL1), 1);
    let memory = memory_contents(&source.memory);
    eprintln!(
        "saved {} registers; GIC: {} distributor, {} redistributor, {} CPU interface registers",
        state.registers.len(),
        gic.distributor.len(),
        gic.cpus[0].redistributor.len(),
        gic.cpus[0].cpu_interface.len()
    );
    let gic: GicStateAarch64 = serde_json::from_str(&serde_json::to_string(&gic).unwrap()).unwrap();
    assert_eq!(register(&state, PC), AFTER_STORE, "PC is past the completed store");
    assert_eq!(register(&state, X1), 50);
    assert_eq!(u32::from_le_bytes(memory[COUNTER..COUNTER + 4].try_into().unwrap()), 50);
    let text = serde_json::to_string(&state).expect("a state serialises");
    let state: VcpuStateAarch64 = serde_json::from_str(&text).expect("a saved state deserialises");
    drop(source);

    let mut copy = build_vm(&hypervisor, &memory);
    assert_ne!(register(&copy.vcpu.save_state().expect("saving"), PC), AFTER_STORE, "a blank vCPU is elsewhere");
    assert_ne!(copy.vm.save_gic_state(&[mpidr]).expect("saving"), gic, "a blank GIC has other state");
    copy.vm.restore_gic_state(&[mpidr], &gic).expect("loading the GIC state");
    assert_eq!(copy.vm.save_gic_state(&[mpidr]).expect("saving"), gic, "the restored GIC saves as the original");
    copy.vcpu.restore_state(&state).expect("loading the vCPU state");
    let reloaded = copy.vcpu.save_state().expect("saving the restored vCPU");
    for (actual, expected) in without_counters(&reloaded).registers.iter().zip(&without_counters(&state).registers) {
        assert_eq!(actual, expected, "register {:#x} as saved", expected.id);
    }
    assert_eq!(without_counters(&reloaded), without_counters(&state), "the restored vCPU saves as the original");
    assert_eq!(run_stores(&mut copy.vcpu, 10), (51..=60).collect::<Vec<u32>>(), "the guest goes on from 50");
    let memory = memory_contents(&copy.memory);
    assert_eq!(u32::from_le_bytes(memory[COUNTER..COUNTER + 4].try_into().unwrap()), 60);
}

#[test]
fn hostile_vcpu_and_gic_states_are_refused_with_a_clear_error() {
    if !kvm_available() {
        return;
    }
    let hypervisor = KvmHypervisor::new().expect("opening /dev/kvm");
    let target = build_vm(&hypervisor, &[0u8; RAM_SIZE]);
    let good = target.vcpu.save_state().expect("saving the vCPU state");
    let refuse = |state: &VcpuStateAarch64, expected: &str| {
        let error = target.vcpu.restore_state(state).expect_err("a hostile state must be refused").to_string();
        assert!(error.contains(expected), "error {error:?} does not mention {expected:?}");
        assert_eq!(target.vcpu.save_state().expect("saving").registers.len(), good.registers.len());
    };
    let mut state = good.clone();
    state.registers.iter_mut().find(|r| r.id == PC).expect("PC is listed").value.pop();
    refuse(&state, "has 7 bytes, its id says 8");
    let mut state = good.clone();
    state.registers[0].id = 0x6030_0000_0013_ffff;
    refuse(&state, "is not one this host's KVM has");
    let mut state = good.clone();
    let last = state.registers.len() - 1;
    state.registers[last] = good.registers[0].clone();
    refuse(&state, "appears twice");
    let mut state = good.clone();
    state.registers = vec![Register { id: PC, value: vec![0; 8] }; 100_000];
    refuse(&state, "100000 registers");
    target.vcpu.restore_state(&good).expect("the unmodified state still loads");

    let mpidr = target.vcpu.mpidr().expect("reading MPIDR_EL1");
    let good = target.vm.save_gic_state(&[mpidr]).expect("saving the GIC state");
    let refuse = |state: &GicStateAarch64, mpidrs: &[u64], expected: &str| {
        let error = target.vm.restore_gic_state(mpidrs, state).expect_err("a hostile state").to_string();
        assert!(error.contains(expected), "error {error:?} does not mention {expected:?}");
        assert_eq!(target.vm.save_gic_state(&[mpidr]).expect("saving"), good, "a refusal changes nothing");
    };
    let mut state = good.clone();
    state.distributor[5].offset = 0x6000;
    refuse(&state, &[mpidr], "where");
    let mut state = good.clone();
    state.distributor.push(state.distributor[1]);
    refuse(&state, &[mpidr], "distributor:");
    let mut state = good.clone();
    state.line_levels.push(0);
    refuse(&state, &[mpidr], "line-level words");
    refuse(&good, &[mpidr, mpidr + 1], "1 CPUs, this VM has 2");
    refuse(&good, &[mpidr + 1], "where this VM has");
    refuse(&good, &[], "no vCPUs");
    let mut state = good.clone();
    state.cpus[0].cpu_interface.pop();
    refuse(&state, &[mpidr], "CPU interface registers");
    let mut state = good.clone();
    state.cpus[0].redistributor.truncate(3);
    refuse(&state, &[mpidr], "redistributor:");
    target.vm.restore_gic_state(&[mpidr], &good).expect("the unmodified GIC state still loads");
}

/// GITS_TRANSLATER, in the ITS's second 64 KiB frame: where a PCI function's MSI-X entry points.
const GITS_TRANSLATER: u64 = 0x1_0040;

#[test]
fn the_its_takes_msis_by_device_id_and_its_registers_travel_with_the_gic_state() {
    if !kvm_available() {
        return;
    }
    let hypervisor = KvmHypervisor::new().expect("opening /dev/kvm");
    let test = TestVm::new(hypervisor.create_vm().expect("creating a VM"), RAM_START, &[0u8; RAM_SIZE]);
    test.vm.init_vcpu(&test.vcpu, false).expect("KVM_ARM_VCPU_INIT with PSCI 0.2");
    let gic = test.vm.create_gic(&GIC_LAYOUT, 1, GIC_IRQS).expect("creating the in-kernel GIC");
    if gic == GicVersion::V2 {
        let error = test.vm.create_its(GIC_ITS_START).expect_err("a GICv2 has no ITS").to_string();
        assert!(error.contains("needs a GICv3"), "{error}");
        eprintln!("SKIPPED: this host's KVM emulates a GICv2 only, which has no ITS");
        return;
    }
    let mpidr = test.vcpu.mpidr().expect("reading MPIDR_EL1");
    test.vm.save_gic_state(&[mpidr]).expect("without an ITS, the GIC's state is saved");

    test.vm.create_its(GIC_ITS_START).expect("creating the ITS");
    let again = test.vm.create_its(GIC_ITS_START).expect_err("one ITS per VM").to_string();
    assert!(again.contains("ITS"), "{again}");
    // An MSI at the ITS's doorbell reaches the ITS with its device ID: the guest has not enabled the ITS, which
    // KVM says with EBUSY. Without the device ID, or outside the ITS, KVM refuses it as invalid.
    let error = test.vm.signal_msi(GIC_ITS_START + GITS_TRANSLATER, 0, 0x08).expect_err("the ITS is off");
    assert_eq!(error.source.raw_os_error(), Some(libc::EBUSY), "{error}");
    let elsewhere = test.vm.signal_msi(PL011_START, 0, 0x08).expect_err("no ITS there");
    assert_eq!(elsewhere.source.raw_os_error(), Some(libc::EINVAL), "{elsewhere}");

    // The saved state has the ITS's registers (GITS_CTLR last) and each redistributor's LPI registers; it loads
    // into a second VM with an ITS (KVM reads the ITS's tables, empty here, from that VM's memory).
    let saved = test.vm.save_gic_state(&[mpidr]).expect("saving the GIC and ITS state");
    let its = saved.its.as_ref().expect("the ITS's registers are saved");
    assert_eq!(its.len(), 13, "{its:x?}");
    assert_eq!(its.last().map(|r| r.offset), Some(0), "GITS_CTLR last");
    assert_eq!(saved.cpus[0].lpis.len(), 5, "{:x?}", saved.cpus[0].lpis);
    let second = TestVm::new(hypervisor.create_vm().expect("creating a VM"), RAM_START, &[0u8; RAM_SIZE]);
    second.vm.init_vcpu(&second.vcpu, false).expect("KVM_ARM_VCPU_INIT");
    second.vm.create_gic(&GIC_LAYOUT, 1, GIC_IRQS).expect("creating the GIC");
    let refused = second.vm.restore_gic_state(&[mpidr], &saved).expect_err("this VM has no ITS").to_string();
    assert!(refused.contains("the state has a GIC ITS") && !refused.contains('\n'), "{refused}");
    second.vm.create_its(GIC_ITS_START).expect("creating the second VM's ITS");
    let mut mangled = saved.clone();
    mangled.its.as_mut().unwrap().pop();
    let refused = second.vm.restore_gic_state(&[mpidr], &mangled).expect_err("GITS_CTLR missing").to_string();
    assert!(refused.contains("ITS registers"), "{refused}");
    second.vm.restore_gic_state(&[mpidr], &saved).expect("restoring the GIC and ITS state");
    // The same state reads back, but for GITS_CBASER's attributes: KVM fills in the cacheability and shareability
    // of a command queue the guest never set up (Valid, bit 63, clear), which means nothing until it does.
    let mut again = second.vm.save_gic_state(&[mpidr]).expect("saving again");
    let (saved_cbaser, again_cbaser) = (its[0], &mut again.its.as_mut().expect("the ITS is still there")[0]);
    assert_eq!((saved_cbaser.offset, again_cbaser.offset), (0x80, 0x80), "GITS_CBASER first");
    assert_eq!(saved_cbaser.value >> 63, again_cbaser.value >> 63, "GITS_CBASER.Valid");
    if saved_cbaser.value >> 63 == 0 {
        again_cbaser.value = saved_cbaser.value;
    }
    assert_eq!(again, saved);
}

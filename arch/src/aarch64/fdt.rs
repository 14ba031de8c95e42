//! The flattened device tree an arm64 Linux guest boots from: memory, CPUs, PSCI, the GIC, the architected timer,
//! the PrimeCell platform devices (PL011, PL031, PL061 with a power key), virtio-mmio slots, the PCI host bridge
//! with the GICv3 ITS its MSIs go through, and /chosen.
//!
//! Node names, compatibles and interrupt specifiers follow QEMU's `virt` machine, which Debian's kernels are
//! tested against.

use vm_fdt::{FdtWriter, FdtWriterNode};

type FdtResult<T> = std::result::Result<T, vm_fdt::Error>;

use super::layout::{
    self, VirtioMmioSlot, CMDLINE_MAX_SIZE, FDT_MAX_SIZE, GIC_CPU_SIZE, GIC_CPU_START, GIC_DIST_SIZE, GIC_DIST_START,
    GIC_ITS_SIZE, GIC_ITS_START, GIC_REDIST_START, PCI_ECAM_LAST_BUS, PCI_ECAM_SIZE, PCI_ECAM_START, PCI_MMIO_SIZE,
    PCI_MMIO_START, PL011_SIZE, PL011_SPI, PL011_START, PL031_SIZE, PL031_SPI, PL031_START, PL061_SIZE, PL061_SPI,
    PL061_START, POWER_KEY_GPIO_LINE,
};
use super::regs::MPIDR_AFFINITY_MASK;
use super::{Error, Result};

/// The GIC model the VM was given. KVM under nested virtualisation often offers only one of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GicVersion {
    V2,
    V3,
}

/// What the device tree describes. The entropy comes from the caller (the VMM reads the host's random source), so
/// that building the tree stays a pure function.
#[derive(Clone, Debug)]
pub struct FdtConfig<'a> {
    pub cmdline: &'a str,
    pub mem_size: u64,
    /// MPIDR_EL1 of each vCPU, in vCPU order (read back from KVM; see `regs::kvm_default_mpidr`).
    pub vcpu_mpidrs: &'a [u64],
    pub gic: GicVersion,
    /// `(start, size)` of the initrd in guest memory.
    pub initrd: Option<(u64, u64)>,
    /// The virtio-mmio slots that hold a device; empty slots are left out so the guest does not probe them.
    pub virtio_mmio: &'a [VirtioMmioSlot],
    /// A PCI host bridge (generic ECAM, bus 0) whose functions' MSIs go through a GICv3 ITS: both are described.
    /// Needs a GICv3.
    pub pci: bool,
    pub kaslr_seed: u64,
    /// Bytes for the guest's early entropy pool (`/chosen/rng-seed`); may be empty.
    pub rng_seed: &'a [u8],
}

pub const GIC_PHANDLE: u32 = 1;
pub const CLOCK_PHANDLE: u32 = 2;
pub const GPIO_PHANDLE: u32 = 3;
pub const ITS_PHANDLE: u32 = 4;

/// PCI address space codes, the first cell of a `ranges` entry's PCI address (IEEE 1275 PCI bus binding): 32-bit
/// memory space.
const PCI_SPACE_MEMORY_32: u32 = 0x0200_0000;
/// The requester IDs of bus 0 to `PCI_ECAM_LAST_BUS`: what `msi-map` hands the ITS as device IDs, unchanged.
const PCI_REQUESTER_IDS: u32 = (PCI_ECAM_LAST_BUS as u32 + 1) << 8;

/// First cell of an interrupt specifier.
const GIC_FDT_IRQ_TYPE_SPI: u32 = 0;
const GIC_FDT_IRQ_TYPE_PPI: u32 = 1;
/// Third cell: trigger type (include/dt-bindings/interrupt-controller/irq.h).
const IRQ_TYPE_EDGE_RISING: u32 = 1;
const IRQ_TYPE_LEVEL_HIGH: u32 = 4;
/// GICv2 PPI specifiers carry a CPU mask in bits 15:8 of the third cell.
const GICV2_PPI_CPU_MASK_SHIFT: u32 = 8;
/// The GIC's virtual maintenance interrupt, and the architected timer's PPIs (secure, non-secure, virtual,
/// hypervisor physical), as the Arm Base System Architecture numbers them.
const GIC_MAINTENANCE_PPI: u32 = 9;
const TIMER_PPIS: [u32; 4] = [13, 14, 11, 10];
const APB_CLOCK_HZ: u32 = 24_000_000;
/// include/uapi/linux/input-event-codes.h
pub const KEY_POWER: u32 = 116;

pub const PL011_NODE: &str = "pl011@9000000";

/// Builds the blob; fails if anything does not fit (command line, vCPU count, Linux's 2 MiB limit).
pub fn create_fdt(config: &FdtConfig) -> Result<Vec<u8>> {
    if config.cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(Error::Cmdline(format!(
            "{} bytes; arm64 Linux takes at most {}",
            config.cmdline.len(),
            CMDLINE_MAX_SIZE - 1
        )));
    }
    if config.cmdline.contains('\0') {
        return Err(Error::Cmdline("contains a NUL byte".into()));
    }
    if config.pci && config.gic != GicVersion::V3 {
        return Err(Error::Fdt("PCI devices need a GICv3 (for its ITS), and this VM has a GICv2".into()));
    }
    let vcpus = u32::try_from(config.vcpu_mpidrs.len()).unwrap_or(u32::MAX);
    let redist_size = layout::gic_redist_size(vcpus)?;
    let (ram_start, ram_size) = layout::ram_region(config.mem_size)?;

    let blob = build(config, vcpus, redist_size, ram_start, ram_size).map_err(|e| Error::Fdt(e.to_string()))?;
    if blob.len() as u64 > FDT_MAX_SIZE {
        return Err(Error::Fdt(format!("{} bytes, more than the 2 MiB Linux accepts", blob.len())));
    }
    Ok(blob)
}

fn build(config: &FdtConfig, vcpus: u32, redist_size: u64, ram_start: u64, ram_size: u64) -> FdtResult<Vec<u8>> {
    let mut fdt = FdtWriter::new()?;
    let root = fdt.begin_node("")?;
    fdt.property_string("compatible", "linux,dummy-virt")?;
    fdt.property_string("model", "linux,dummy-virt")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_u32("interrupt-parent", GIC_PHANDLE)?;

    chosen(&mut fdt, config)?;
    let aliases = fdt.begin_node("aliases")?;
    fdt.property_string("serial0", &format!("/{PL011_NODE}"))?;
    fdt.end_node(aliases)?;

    let memory = fdt.begin_node(&format!("memory@{ram_start:x}"))?;
    fdt.property_string("device_type", "memory")?;
    fdt.property_array_u64("reg", &[ram_start, ram_size])?;
    fdt.end_node(memory)?;

    cpus(&mut fdt, config.vcpu_mpidrs)?;
    let psci = fdt.begin_node("psci")?;
    fdt.property_string_list("compatible", vec!["arm,psci-1.0".into(), "arm,psci-0.2".into()])?;
    fdt.property_string("method", "hvc")?;
    fdt.end_node(psci)?;

    gic(&mut fdt, config.gic, vcpus, redist_size, config.pci)?;
    timer(&mut fdt, config.gic, vcpus)?;

    let clock = fdt.begin_node("apb-pclk")?;
    fdt.property_string("compatible", "fixed-clock")?;
    fdt.property_u32("#clock-cells", 0)?;
    fdt.property_u32("clock-frequency", APB_CLOCK_HZ)?;
    fdt.property_string("clock-output-names", "clk24mhz")?;
    fdt.property_phandle(CLOCK_PHANDLE)?;
    fdt.end_node(clock)?;

    let uart = primecell(&mut fdt, PL011_NODE, "arm,pl011", PL011_START, PL011_SIZE, PL011_SPI)?;
    // amba-pl011 takes the first clock as its baud clock; the AMBA bus wants "apb_pclk".
    fdt.property_array_u32("clocks", &[CLOCK_PHANDLE, CLOCK_PHANDLE])?;
    fdt.property_string_list("clock-names", vec!["uartclk".into(), "apb_pclk".into()])?;
    fdt.end_node(uart)?;

    let rtc = primecell(&mut fdt, "pl031@9010000", "arm,pl031", PL031_START, PL031_SIZE, PL031_SPI)?;
    apb_clock(&mut fdt)?;
    fdt.end_node(rtc)?;

    let gpio = primecell(&mut fdt, "pl061@9030000", "arm,pl061", PL061_START, PL061_SIZE, PL061_SPI)?;
    apb_clock(&mut fdt)?;
    fdt.property_null("gpio-controller")?;
    fdt.property_u32("#gpio-cells", 2)?;
    fdt.property_phandle(GPIO_PHANDLE)?;
    fdt.end_node(gpio)?;

    let keys = fdt.begin_node("gpio-keys")?;
    fdt.property_string("compatible", "gpio-keys")?;
    let power = fdt.begin_node("poweroff")?;
    fdt.property_string("label", "GPIO Key Poweroff")?;
    fdt.property_u32("linux,code", KEY_POWER)?;
    // <controller line flags>: flags 0 is GPIO_ACTIVE_HIGH.
    fdt.property_array_u32("gpios", &[GPIO_PHANDLE, u32::from(POWER_KEY_GPIO_LINE), 0])?;
    fdt.end_node(power)?;
    fdt.end_node(keys)?;

    for slot in config.virtio_mmio {
        let node = fdt.begin_node(&format!("virtio_mmio@{:x}", slot.base))?;
        fdt.property_string("compatible", "virtio,mmio")?;
        fdt.property_array_u64("reg", &[slot.base, slot.size])?;
        // Edge: the transport signals each used-buffer or config notification through a plain irqfd pulse.
        fdt.property_array_u32("interrupts", &[GIC_FDT_IRQ_TYPE_SPI, slot.spi, IRQ_TYPE_EDGE_RISING])?;
        fdt.property_null("dma-coherent")?;
        fdt.end_node(node)?;
    }
    if config.pci {
        pci_host_bridge(&mut fdt)?;
    }

    fdt.end_node(root)?;
    fdt.finish()
}

/// The generic ECAM host bridge (Linux's pci-host-generic): configuration space for its buses, the window its
/// functions' memory BARs are placed in (guest and CPU addresses the same), and MSIs through the ITS with the
/// requester ID as device ID. No `interrupt-map`: no function has an INTx pin, and only MSI-X is delivered.
fn pci_host_bridge(fdt: &mut FdtWriter) -> FdtResult<()> {
    let node = fdt.begin_node(&format!("pcie@{PCI_MMIO_START:x}"))?;
    fdt.property_string("compatible", "pci-host-ecam-generic")?;
    fdt.property_string("device_type", "pci")?;
    fdt.property_array_u64("reg", &[PCI_ECAM_START, PCI_ECAM_SIZE])?;
    fdt.property_array_u32("bus-range", &[0, u32::from(PCI_ECAM_LAST_BUS)])?;
    fdt.property_u32("linux,pci-domain", 0)?;
    fdt.property_u32("#address-cells", 3)?;
    fdt.property_u32("#size-cells", 2)?;
    let high = |value: u64| (value >> 32) as u32;
    let low = |value: u64| value as u32;
    fdt.property_array_u32(
        "ranges",
        &[
            PCI_SPACE_MEMORY_32,
            high(PCI_MMIO_START),
            low(PCI_MMIO_START),
            high(PCI_MMIO_START),
            low(PCI_MMIO_START),
            high(PCI_MMIO_SIZE),
            low(PCI_MMIO_SIZE),
        ],
    )?;
    // <first requester ID, the ITS, first device ID, count>: identity.
    fdt.property_array_u32("msi-map", &[0, ITS_PHANDLE, 0, PCI_REQUESTER_IDS])?;
    fdt.property_null("dma-coherent")?;
    fdt.end_node(node)
}

fn chosen(fdt: &mut FdtWriter, config: &FdtConfig) -> FdtResult<()> {
    let chosen = fdt.begin_node("chosen")?;
    fdt.property_string("bootargs", config.cmdline)?;
    fdt.property_string("stdout-path", &format!("/{PL011_NODE}"))?;
    if let Some((start, size)) = config.initrd {
        fdt.property_u64("linux,initrd-start", start)?;
        fdt.property_u64("linux,initrd-end", start.saturating_add(size))?;
    }
    fdt.property_u64("kaslr-seed", config.kaslr_seed)?;
    if !config.rng_seed.is_empty() {
        fdt.property("rng-seed", config.rng_seed)?;
    }
    fdt.end_node(chosen)
}

fn cpus(fdt: &mut FdtWriter, mpidrs: &[u64]) -> FdtResult<()> {
    let cpus = fdt.begin_node("cpus")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 0)?;
    for &mpidr in mpidrs {
        let affinity = mpidr & MPIDR_AFFINITY_MASK;
        let cpu = fdt.begin_node(&format!("cpu@{affinity:x}"))?;
        fdt.property_string("device_type", "cpu")?;
        fdt.property_string("compatible", "arm,arm-v8")?;
        fdt.property_string("enable-method", "psci")?;
        fdt.property_u64("reg", affinity)?;
        fdt.end_node(cpu)?;
    }
    fdt.end_node(cpus)
}

fn gic(fdt: &mut FdtWriter, version: GicVersion, vcpus: u32, redist_size: u64, its: bool) -> FdtResult<()> {
    let node = fdt.begin_node(&format!("intc@{GIC_DIST_START:x}"))?;
    let maintenance_flags = match version {
        GicVersion::V3 => {
            fdt.property_string("compatible", "arm,gic-v3")?;
            fdt.property_array_u64("reg", &[GIC_DIST_START, GIC_DIST_SIZE, GIC_REDIST_START, redist_size])?;
            fdt.property_u32("#redistributor-regions", 1)?;
            IRQ_TYPE_LEVEL_HIGH
        }
        GicVersion::V2 => {
            fdt.property_string("compatible", "arm,cortex-a15-gic")?;
            fdt.property_array_u64("reg", &[GIC_DIST_START, GIC_DIST_SIZE, GIC_CPU_START, GIC_CPU_SIZE])?;
            gicv2_ppi_flags(vcpus)
        }
    };
    fdt.property_u32("#interrupt-cells", 3)?;
    fdt.property_null("interrupt-controller")?;
    fdt.property_array_u32("interrupts", &[GIC_FDT_IRQ_TYPE_PPI, GIC_MAINTENANCE_PPI, maintenance_flags])?;
    fdt.property_phandle(GIC_PHANDLE)?;
    if its {
        // The ITS is the GIC's child, in the same address space.
        fdt.property_u32("#address-cells", 2)?;
        fdt.property_u32("#size-cells", 2)?;
        fdt.property_null("ranges")?;
        let its = fdt.begin_node(&format!("its@{GIC_ITS_START:x}"))?;
        fdt.property_string("compatible", "arm,gic-v3-its")?;
        fdt.property_null("msi-controller")?;
        fdt.property_u32("#msi-cells", 1)?;
        fdt.property_array_u64("reg", &[GIC_ITS_START, GIC_ITS_SIZE])?;
        fdt.property_phandle(ITS_PHANDLE)?;
        fdt.end_node(its)?;
    }
    fdt.end_node(node)
}

/// Level-high, routed to every vCPU (a GICv2 PPI specifier names its CPUs; at most 8 exist on a GICv2).
fn gicv2_ppi_flags(vcpus: u32) -> u32 {
    let cpu_mask = (1u32 << vcpus.min(8)) - 1;
    (cpu_mask << GICV2_PPI_CPU_MASK_SHIFT) | IRQ_TYPE_LEVEL_HIGH
}

fn timer(fdt: &mut FdtWriter, version: GicVersion, vcpus: u32) -> FdtResult<()> {
    let flags = match version {
        GicVersion::V3 => IRQ_TYPE_LEVEL_HIGH,
        GicVersion::V2 => gicv2_ppi_flags(vcpus),
    };
    let node = fdt.begin_node("timer")?;
    fdt.property_string("compatible", "arm,armv8-timer")?;
    fdt.property_null("always-on")?;
    let interrupts: Vec<u32> = TIMER_PPIS.iter().flat_map(|&ppi| [GIC_FDT_IRQ_TYPE_PPI, ppi, flags]).collect();
    fdt.property_array_u32("interrupts", &interrupts)?;
    fdt.end_node(node)
}

/// Opens an AMBA PrimeCell device node with what every one of them has; the caller adds clocks and the rest.
fn primecell(
    fdt: &mut FdtWriter,
    name: &str,
    compatible: &str,
    base: u64,
    size: u64,
    spi: u32,
) -> FdtResult<FdtWriterNode> {
    let node = fdt.begin_node(name)?;
    fdt.property_string_list("compatible", vec![compatible.into(), "arm,primecell".into()])?;
    fdt.property_array_u64("reg", &[base, size])?;
    fdt.property_array_u32("interrupts", &[GIC_FDT_IRQ_TYPE_SPI, spi, IRQ_TYPE_LEVEL_HIGH])?;
    Ok(node)
}

fn apb_clock(fdt: &mut FdtWriter) -> FdtResult<()> {
    fdt.property_u32("clocks", CLOCK_PHANDLE)?;
    fdt.property_string("clock-names", "apb_pclk")
}

#[cfg(test)]
pub(crate) mod reader {
    //! A flattened device tree reader just large enough to check what `create_fdt` wrote (vm-fdt only writes),
    //! so the tests need no `dtc`.

    use std::collections::BTreeMap;

    const FDT_MAGIC: u32 = 0xd00d_feed;
    const FDT_BEGIN_NODE: u32 = 1;
    const FDT_END_NODE: u32 = 2;
    const FDT_PROP: u32 = 3;
    const FDT_NOP: u32 = 4;
    const FDT_END: u32 = 9;

    /// Every node by its full path ("/" for the root), with its properties' raw values.
    pub type Tree = BTreeMap<String, BTreeMap<String, Vec<u8>>>;

    fn be32(blob: &[u8], at: usize) -> u32 {
        u32::from_be_bytes(blob[at..at + 4].try_into().unwrap())
    }

    fn c_string(bytes: &[u8]) -> String {
        let end = bytes.iter().position(|&b| b == 0).expect("unterminated string");
        String::from_utf8(bytes[..end].to_vec()).unwrap()
    }

    pub fn parse(blob: &[u8]) -> Tree {
        assert_eq!(be32(blob, 0), FDT_MAGIC);
        assert_eq!(be32(blob, 4) as usize, blob.len(), "totalsize");
        assert_eq!(be32(blob, 20), 17, "version");
        let structs = be32(blob, 8) as usize;
        let strings = be32(blob, 12) as usize;
        let mut tree = Tree::new();
        let mut path: Vec<String> = Vec::new();
        let full = |path: &[String]| {
            if path.len() <= 1 {
                "/".to_string()
            } else {
                path[1..].iter().map(|n| format!("/{n}")).collect()
            }
        };
        let mut at = structs;
        loop {
            let token = be32(blob, at);
            at += 4;
            match token {
                FDT_BEGIN_NODE => {
                    let name = c_string(&blob[at..]);
                    at += (name.len() + 1).next_multiple_of(4);
                    path.push(name);
                    assert!(tree.insert(full(&path), BTreeMap::new()).is_none(), "duplicate node {}", full(&path));
                }
                FDT_END_NODE => {
                    path.pop().expect("unbalanced end");
                }
                FDT_PROP => {
                    let len = be32(blob, at) as usize;
                    let name = c_string(&blob[strings + be32(blob, at + 4) as usize..]);
                    let value = blob[at + 8..at + 8 + len].to_vec();
                    at += 8 + len.next_multiple_of(4);
                    let node = tree.get_mut(&full(&path)).expect("property outside a node");
                    assert!(node.insert(name.clone(), value).is_none(), "duplicate property {name}");
                }
                FDT_NOP => {}
                FDT_END => break,
                other => panic!("bad token {other:#x}"),
            }
        }
        assert!(path.is_empty(), "unclosed node");
        tree
    }

    pub fn cells(value: &[u8]) -> Vec<u32> {
        assert_eq!(value.len() % 4, 0);
        value.chunks(4).map(|c| u32::from_be_bytes(c.try_into().unwrap())).collect()
    }

    pub fn u64s(value: &[u8]) -> Vec<u64> {
        assert_eq!(value.len() % 8, 0);
        value.chunks(8).map(|c| u64::from_be_bytes(c.try_into().unwrap())).collect()
    }

    pub fn strings(value: &[u8]) -> Vec<String> {
        assert_eq!(value.last(), Some(&0));
        value[..value.len() - 1].split(|&b| b == 0).map(|s| String::from_utf8(s.to_vec()).unwrap()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::reader::{cells, parse, strings, u64s, Tree};
    use super::*;
    use crate::aarch64::layout::virtio_mmio_slot;
    use crate::aarch64::regs::kvm_default_mpidr;
    use crate::MIB;

    fn config<'a>(mpidrs: &'a [u64], slots: &'a [VirtioMmioSlot], gic: GicVersion) -> FdtConfig<'a> {
        FdtConfig {
            cmdline: "console=ttyAMA0 rdinit=/init",
            mem_size: 512 * MIB,
            vcpu_mpidrs: mpidrs,
            gic,
            initrd: Some((0x5f00_0000, 0x12_3456)),
            virtio_mmio: slots,
            pci: false,
            kaslr_seed: 0x0123_4567_89ab_cdef,
            rng_seed: &[7; 64],
        }
    }

    fn tree(gic: GicVersion, vcpus: u32) -> Tree {
        let mpidrs: Vec<u64> = (0..vcpus).map(kvm_default_mpidr).collect();
        let slots = [virtio_mmio_slot(0).unwrap(), virtio_mmio_slot(1).unwrap()];
        parse(&create_fdt(&config(&mpidrs, &slots, gic)).unwrap())
    }

    fn prop<'t>(tree: &'t Tree, node: &str, name: &str) -> &'t [u8] {
        tree.get(node)
            .unwrap_or_else(|| panic!("no node {node}"))
            .get(name)
            .unwrap_or_else(|| panic!("no {node}:{name}"))
    }

    fn string(tree: &Tree, node: &str, name: &str) -> String {
        strings(prop(tree, node, name)).join(",")
    }

    /// The node a phandle names.
    fn by_phandle(tree: &Tree, phandle: u32) -> String {
        let found: Vec<&String> = tree
            .iter()
            .filter(|(_, props)| props.get("phandle").is_some_and(|v| cells(v) == [phandle]))
            .map(|(path, _)| path)
            .collect();
        assert_eq!(found.len(), 1, "phandle {phandle}");
        found[0].clone()
    }

    #[test]
    fn root_memory_and_chosen() {
        let t = tree(GicVersion::V3, 2);
        assert_eq!(string(&t, "/", "compatible"), "linux,dummy-virt");
        assert_eq!(cells(prop(&t, "/", "#address-cells")), [2]);
        assert_eq!(cells(prop(&t, "/", "#size-cells")), [2]);
        assert_eq!(by_phandle(&t, cells(prop(&t, "/", "interrupt-parent"))[0]), "/intc@8000000");
        assert_eq!(string(&t, "/memory@40000000", "device_type"), "memory");
        assert_eq!(u64s(prop(&t, "/memory@40000000", "reg")), [0x4000_0000, 512 * MIB]);

        assert_eq!(string(&t, "/chosen", "bootargs"), "console=ttyAMA0 rdinit=/init");
        let stdout = string(&t, "/chosen", "stdout-path");
        assert!(t.contains_key(&stdout), "stdout-path {stdout} names a node");
        assert_eq!(string(&t, "/aliases", "serial0"), stdout);
        assert_eq!(u64s(prop(&t, "/chosen", "linux,initrd-start")), [0x5f00_0000]);
        assert_eq!(u64s(prop(&t, "/chosen", "linux,initrd-end")), [0x5f12_3456]);
        assert_eq!(u64s(prop(&t, "/chosen", "kaslr-seed")), [0x0123_4567_89ab_cdef]);
        assert_eq!(prop(&t, "/chosen", "rng-seed"), [7; 64]);
    }

    #[test]
    fn no_initrd_no_initrd_properties() {
        let mpidrs = [0];
        let mut cfg = config(&mpidrs, &[], GicVersion::V3);
        cfg.initrd = None;
        cfg.rng_seed = &[];
        let t = parse(&create_fdt(&cfg).unwrap());
        assert!(!t["/chosen"].contains_key("linux,initrd-start"));
        assert!(!t["/chosen"].contains_key("linux,initrd-end"));
        assert!(!t["/chosen"].contains_key("rng-seed"));
        assert!(!t.keys().any(|k| k.starts_with("/virtio_mmio")));
    }

    #[test]
    fn cpus_are_psci_with_mpidr_regs() {
        let t = tree(GicVersion::V3, 17);
        assert_eq!(cells(prop(&t, "/cpus", "#address-cells")), [2]);
        assert_eq!(cells(prop(&t, "/cpus", "#size-cells")), [0]);
        let cpus: Vec<&String> = t.keys().filter(|k| k.starts_with("/cpus/cpu@")).collect();
        assert_eq!(cpus.len(), 17);
        assert_eq!(u64s(prop(&t, "/cpus/cpu@100", "reg")), [0x100], "vCPU 16 opens the second cluster");
        assert_eq!(string(&t, "/cpus/cpu@0", "enable-method"), "psci");
        assert_eq!(string(&t, "/cpus/cpu@0", "device_type"), "cpu");
        assert_eq!(string(&t, "/psci", "compatible"), "arm,psci-1.0,arm,psci-0.2");
        assert_eq!(string(&t, "/psci", "method"), "hvc");
    }

    #[test]
    fn gicv3_has_sized_redistributors_and_the_timer_its_ppis() {
        let t = tree(GicVersion::V3, 2);
        let gic = "/intc@8000000";
        assert_eq!(string(&t, gic, "compatible"), "arm,gic-v3");
        assert_eq!(u64s(prop(&t, gic, "reg")), [0x0800_0000, 0x1_0000, 0x080a_0000, 2 * 0x2_0000]);
        assert_eq!(cells(prop(&t, gic, "#interrupt-cells")), [3]);
        assert!(prop(&t, gic, "interrupt-controller").is_empty());
        assert_eq!(cells(prop(&t, gic, "interrupts")), [1, 9, 4]);
        assert_eq!(string(&t, "/timer", "compatible"), "arm,armv8-timer");
        assert!(t["/timer"].contains_key("always-on"));
        assert_eq!(cells(prop(&t, "/timer", "interrupts")), [1, 13, 4, 1, 14, 4, 1, 11, 4, 1, 10, 4]);
    }

    #[test]
    fn without_pci_there_is_neither_host_bridge_nor_its() {
        let t = tree(GicVersion::V3, 1);
        assert!(!t.keys().any(|k| k.starts_with("/pcie") || k.contains("its@")), "{:?}", t.keys());
        assert!(!t["/intc@8000000"].contains_key("ranges"));
    }

    #[test]
    fn pci_is_a_generic_ecam_host_bridge_whose_msis_go_through_the_its() {
        let mpidrs = [kvm_default_mpidr(0), kvm_default_mpidr(1)];
        let t = parse(&create_fdt(&FdtConfig { pci: true, ..config(&mpidrs, &[], GicVersion::V3) }).unwrap());

        let its = "/intc@8000000/its@8080000";
        assert_eq!(string(&t, its, "compatible"), "arm,gic-v3-its");
        assert!(prop(&t, its, "msi-controller").is_empty());
        assert_eq!(cells(prop(&t, its, "#msi-cells")), [1]);
        assert_eq!(u64s(prop(&t, its, "reg")), [0x0808_0000, 0x2_0000]);
        // The ITS's reg is in the root's address space: the GIC passes it through.
        assert!(prop(&t, "/intc@8000000", "ranges").is_empty());
        assert_eq!(cells(prop(&t, "/intc@8000000", "#address-cells")), [2]);
        assert_eq!(cells(prop(&t, "/intc@8000000", "#size-cells")), [2]);

        let pci = "/pcie@10000000";
        assert_eq!(string(&t, pci, "compatible"), "pci-host-ecam-generic");
        assert_eq!(string(&t, pci, "device_type"), "pci");
        assert_eq!(u64s(prop(&t, pci, "reg")), [0x3f00_0000, 0x10_0000], "ECAM for bus 0");
        assert_eq!(cells(prop(&t, pci, "bus-range")), [0, 0], "as many buses as the ECAM covers");
        assert_eq!(cells(prop(&t, pci, "#address-cells")), [3]);
        assert_eq!(cells(prop(&t, pci, "#size-cells")), [2]);
        assert_eq!(cells(prop(&t, pci, "linux,pci-domain")), [0]);
        // One 32-bit memory window, identity-mapped: 0x1000_0000..0x3eff_0000, ending at the I/O window's start.
        assert_eq!(cells(prop(&t, pci, "ranges")), [0x0200_0000, 0, 0x1000_0000, 0, 0x1000_0000, 0, 0x2eff_0000]);
        assert_eq!(0x1000_0000 + 0x2eff_0000, layout::PCI_IO_START);
        // Requester IDs 0..256 (bus 0) to the same device IDs on the ITS.
        let msi_map = cells(prop(&t, pci, "msi-map"));
        assert_eq!(msi_map, [0, ITS_PHANDLE, 0, 0x100]);
        assert_eq!(by_phandle(&t, msi_map[1]), its);
        assert!(t[pci].contains_key("dma-coherent"));
        assert!(!t[pci].contains_key("interrupt-map"), "no INTx is delivered, so none is described");
    }

    #[test]
    fn pci_needs_a_gicv3() {
        let mpidrs = [0];
        let err = create_fdt(&FdtConfig { pci: true, ..config(&mpidrs, &[], GicVersion::V2) }).unwrap_err();
        assert!(err.to_string().contains("PCI devices need a GICv3"), "{err}");
    }

    #[test]
    fn gicv2_variant_has_a_cpu_interface_and_cpu_masks() {
        let t = tree(GicVersion::V2, 2);
        let gic = "/intc@8000000";
        assert_eq!(string(&t, gic, "compatible"), "arm,cortex-a15-gic");
        assert_eq!(u64s(prop(&t, gic, "reg")), [0x0800_0000, 0x1_0000, 0x0801_0000, 0x1_0000]);
        assert_eq!(cells(prop(&t, "/timer", "interrupts"))[2], 0x304, "level-high to CPUs 0 and 1");
    }

    #[test]
    fn primecells_have_ids_clocks_and_interrupts() {
        let t = tree(GicVersion::V3, 1);
        let clock = by_phandle(&t, CLOCK_PHANDLE);
        assert_eq!(string(&t, &clock, "compatible"), "fixed-clock");
        assert_eq!(cells(prop(&t, &clock, "#clock-cells")), [0]);
        for (node, compatible, base, spi) in [
            ("/pl011@9000000", "arm,pl011", 0x0900_0000u64, 1u32),
            ("/pl031@9010000", "arm,pl031", 0x0901_0000, 2),
            ("/pl061@9030000", "arm,pl061", 0x0903_0000, 7),
        ] {
            assert_eq!(string(&t, node, "compatible"), format!("{compatible},arm,primecell"));
            assert_eq!(u64s(prop(&t, node, "reg")), [base, 0x1000]);
            assert_eq!(cells(prop(&t, node, "interrupts")), [0, spi, 4], "{node}");
            let names = strings(prop(&t, node, "clock-names"));
            let clocks = cells(prop(&t, node, "clocks"));
            assert_eq!(names.len(), clocks.len());
            assert_eq!(names.last().unwrap(), "apb_pclk", "the AMBA bus looks the clock up by this name");
            assert!(clocks.iter().all(|&c| by_phandle(&t, c) == clock));
        }
    }

    #[test]
    fn the_power_key_is_gpio_line_3_of_the_pl061() {
        let t = tree(GicVersion::V3, 1);
        let gpio = "/pl061@9030000";
        assert!(t[gpio].contains_key("gpio-controller"));
        assert_eq!(cells(prop(&t, gpio, "#gpio-cells")), [2]);
        assert_eq!(string(&t, "/gpio-keys", "compatible"), "gpio-keys");
        let key = "/gpio-keys/poweroff";
        assert_eq!(cells(prop(&t, key, "linux,code")), [116]);
        let gpios = cells(prop(&t, key, "gpios"));
        assert_eq!(by_phandle(&t, gpios[0]), gpio);
        assert_eq!(gpios[1..], [3, 0], "line 3, active high");
    }

    #[test]
    fn virtio_slots_become_nodes() {
        let t = tree(GicVersion::V3, 1);
        let node = "/virtio_mmio@a001000";
        assert_eq!(string(&t, node, "compatible"), "virtio,mmio");
        assert_eq!(u64s(prop(&t, node, "reg")), [0x0a00_1000, 0x1000]);
        assert_eq!(cells(prop(&t, node, "interrupts")), [0, 17, 1]);
        assert!(t[node].contains_key("dma-coherent"));
        assert_eq!(t.keys().filter(|k| k.starts_with("/virtio_mmio@")).count(), 2);
    }

    #[test]
    fn bad_input_is_refused_with_a_reason() {
        let mpidrs = [0];
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        let cfg = FdtConfig { cmdline: &long, ..config(&mpidrs, &[], GicVersion::V3) };
        assert!(matches!(create_fdt(&cfg), Err(Error::Cmdline(_))));
        let cfg = FdtConfig { cmdline: "a\0b", ..config(&mpidrs, &[], GicVersion::V3) };
        assert!(matches!(create_fdt(&cfg), Err(Error::Cmdline(_))));
        assert!(matches!(create_fdt(&config(&[], &[], GicVersion::V3)), Err(Error::Cpus(_))));
        let too_many = vec![0; 124];
        assert!(matches!(create_fdt(&config(&too_many, &[], GicVersion::V3)), Err(Error::Cpus(_))));
        let cfg = FdtConfig { mem_size: 0, ..config(&mpidrs, &[], GicVersion::V3) };
        assert!(matches!(create_fdt(&cfg), Err(Error::Memory(_))));
        let cfg = FdtConfig { cmdline: &long[1..], ..config(&mpidrs, &[], GicVersion::V3) };
        assert!(create_fdt(&cfg).is_ok(), "2047 bytes fit");
    }
}

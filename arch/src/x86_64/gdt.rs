//! The boot GDT: segment descriptors as the CPU reads them from memory, and the unpacked [`Segment`] form a
//! hypervisor loads into the segment registers. Both must agree, because a guest that reloads a selector gets what
//! the table in memory says, not what the hypervisor put in the hidden part of the register.
//!
//! Selectors follow the Linux boot protocol (Documentation/arch/x86/boot.rst): `__BOOT_CS` = 0x10 and
//! `__BOOT_DS` = 0x18, with the TSS after them. Slot 1 stays null like Linux's own boot GDT.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::cpu_state::{DescriptorTable, Segment};
use super::layout::{BOOT_GDT_START, BOOT_IDT_START};
use super::{Error, Result};

/// Code segment selector (`__BOOT_CS`).
pub const BOOT_CS_SELECTOR: u16 = 0x10;
/// Data segment selector for DS, ES, FS, GS and SS (`__BOOT_DS`).
pub const BOOT_DS_SELECTOR: u16 = 0x18;
/// Task register selector. A long-mode TSS descriptor is 16 bytes, so it takes slots 4 and 5.
pub const BOOT_TSS_SELECTOR: u16 = 0x20;
/// Slots in the boot GDT: null, null, code, data, and the two halves of the TSS descriptor.
pub const BOOT_GDT_ENTRIES: usize = 6;

/// Execute/read code, accessed.
const TYPE_CODE: u8 = 0xb;
/// Read/write data, accessed.
const TYPE_DATA: u8 = 0x3;
/// Busy 32/64-bit TSS: VMX entry checks insist on a busy TSS in TR.
const TYPE_TSS_BUSY: u8 = 0xb;
/// The architectural minimum TSS size minus one.
const TSS_LIMIT: u32 = 0x67;

/// Which CPU mode the boot segments are for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentMode {
    /// 64-bit code segment (L=1, D=0): the 64-bit boot protocol.
    Long,
    /// 32-bit flat code segment (L=0, D=1): the PVH entry.
    Protected32,
}

/// A flat 4 GiB code segment for `mode`, with the boot CS selector.
pub fn code_segment(mode: SegmentMode) -> Segment {
    let long = mode == SegmentMode::Long;
    Segment { selector: BOOT_CS_SELECTOR, type_: TYPE_CODE, l: long, db: !long, ..flat(0) }
}

/// A flat 4 GiB read/write data segment with the boot DS selector.
pub fn data_segment() -> Segment {
    Segment { selector: BOOT_DS_SELECTOR, type_: TYPE_DATA, db: true, ..flat(0) }
}

/// The boot TSS: never used for a task switch (the kernel loads its own), but TR must hold a valid busy TSS.
pub fn tss_segment() -> Segment {
    Segment {
        base: 0,
        limit: TSS_LIMIT,
        selector: BOOT_TSS_SELECTOR,
        type_: TYPE_TSS_BUSY,
        present: true,
        ..Segment::default()
    }
}

fn flat(selector: u16) -> Segment {
    Segment { base: 0, limit: 0xffff_ffff, selector, present: true, s: true, g: true, ..Segment::default() }
}

/// Packs `seg` into an 8-byte descriptor.
///
/// `seg.limit` is in bytes (the form hypervisors load); with `g` set it is stored in 4 KiB units, so its low 12 bits
/// are dropped. Only the low 32 bits of the base fit; a 64-bit system descriptor's upper half is a separate slot
/// holding `base >> 32`.
pub fn encode(seg: &Segment) -> u64 {
    let limit = if seg.g { seg.limit >> 12 } else { seg.limit } as u64;
    let base = seg.base & 0xffff_ffff;
    let access =
        (seg.type_ as u64 & 0xf) | (seg.s as u64) << 4 | (seg.dpl as u64 & 0x3) << 5 | (seg.present as u64) << 7;
    let flags = (seg.avl as u64) | (seg.l as u64) << 1 | (seg.db as u64) << 2 | (seg.g as u64) << 3;
    (limit & 0xffff)
        | (base & 0xff_ffff) << 16
        | access << 40
        | ((limit >> 16) & 0xf) << 48
        | flags << 52
        | (base >> 24) << 56
}

/// Unpacks an 8-byte descriptor loaded with `selector`. The limit comes out in bytes (scaled by 4 KiB when G is
/// set), which is what KVM and the VMCS/VMCB expect; a null descriptor comes out unusable.
pub fn decode(entry: u64, selector: u16) -> Segment {
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = entry >> 55 & 1 == 1;
    let present = entry >> 47 & 1 == 1;
    Segment {
        base: (entry >> 16 & 0xff_ffff) | (entry >> 56 & 0xff) << 24,
        limit: if g { raw_limit << 12 | 0xfff } else { raw_limit },
        selector,
        type_: (entry >> 40 & 0xf) as u8,
        present,
        dpl: (entry >> 45 & 0x3) as u8,
        db: entry >> 54 & 1 == 1,
        s: entry >> 44 & 1 == 1,
        l: entry >> 53 & 1 == 1,
        g,
        avl: entry >> 52 & 1 == 1,
        unusable: !present,
    }
}

/// The boot GDT's slots for `mode`.
pub fn boot_gdt(mode: SegmentMode) -> [u64; BOOT_GDT_ENTRIES] {
    let tss = tss_segment();
    [0, 0, encode(&code_segment(mode)), encode(&data_segment()), encode(&tss), tss.base >> 32]
}

/// The GDTR value for the boot GDT.
pub fn boot_gdtr() -> DescriptorTable {
    DescriptorTable { base: BOOT_GDT_START, limit: (BOOT_GDT_ENTRIES * 8 - 1) as u16 }
}

/// The IDTR value for the boot IDT: one empty gate, so any exception before the kernel installs its own IDT is a
/// clean triple fault instead of a jump through garbage.
pub fn boot_idtr() -> DescriptorTable {
    DescriptorTable { base: BOOT_IDT_START, limit: 7 }
}

/// Writes the boot GDT for `mode` and the empty boot IDT into guest memory.
pub fn write_boot_tables<M: GuestMemory + ?Sized>(mem: &M, mode: SegmentMode) -> Result<()> {
    let mut bytes = Vec::with_capacity(BOOT_GDT_ENTRIES * 8);
    for entry in boot_gdt(mode) {
        bytes.extend_from_slice(&entry.to_le_bytes());
    }
    mem.write_slice(&bytes, GuestAddress(BOOT_GDT_START))
        .and_then(|()| mem.write_obj(0u64, GuestAddress(BOOT_IDT_START)))
        .map_err(|e| Error::Memory(format!("cannot write the boot GDT/IDT at {BOOT_GDT_START:#x}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_descriptors() {
        // The values every x86 VMM and Linux's own boot GDT use for flat segments.
        assert_eq!(encode(&code_segment(SegmentMode::Long)), 0x00af_9b00_0000_ffff);
        assert_eq!(encode(&code_segment(SegmentMode::Protected32)), 0x00cf_9b00_0000_ffff);
        assert_eq!(encode(&data_segment()), 0x00cf_9300_0000_ffff);
        assert_eq!(encode(&tss_segment()), 0x0000_8b00_0000_0067);
    }

    #[test]
    fn round_trip() {
        let segments = [
            code_segment(SegmentMode::Long),
            code_segment(SegmentMode::Protected32),
            data_segment(),
            tss_segment(),
            Segment {
                base: 0x1234_5678,
                limit: 0xabcde,
                selector: 0x2b,
                type_: 0x2,
                present: true,
                dpl: 3,
                db: false,
                s: true,
                l: false,
                g: false,
                avl: true,
                unusable: false,
            },
        ];
        for seg in segments {
            assert_eq!(decode(encode(&seg), seg.selector), seg, "{seg:?}");
        }
    }

    #[test]
    fn null_descriptor_is_unusable() {
        let seg = decode(0, 0);
        assert!(seg.unusable);
        assert!(!seg.present);
    }

    #[test]
    fn selectors_index_the_table() {
        let gdt = boot_gdt(SegmentMode::Long);
        assert_eq!(gdt[BOOT_CS_SELECTOR as usize / 8], encode(&code_segment(SegmentMode::Long)));
        assert_eq!(gdt[BOOT_DS_SELECTOR as usize / 8], encode(&data_segment()));
        assert_eq!(gdt[BOOT_TSS_SELECTOR as usize / 8], encode(&tss_segment()));
        assert_eq!(gdt[0], 0);
        assert_eq!(boot_gdtr().base + boot_gdtr().limit as u64 + 1, BOOT_IDT_START);
    }
}

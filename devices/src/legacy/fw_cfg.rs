//! QEMU's firmware configuration interface (fw_cfg), through which firmware (SeaBIOS, OVMF) learns about the
//! machine: the memory map, the CPU count, named files. On a PC it sits at I/O ports 0x510-0x51B: a 16-bit
//! selector at offset 0 (writing it picks an item and rewinds it), the item's bytes read one at a time at
//! offset 1, and the DMA interface at offset 4: the guest writes the guest-physical address of a
//! `{be32 control, be32 length, be64 address}` request there (big-endian: the high half at offset 4, the low half
//! at offset 8, whose write starts the transfer; or all 8 bytes at offset 4), and the device carries it out and
//! writes the control word back (0 when done, the error bit otherwise). The specification is QEMU's
//! `docs/specs/fw_cfg.rst`.
//!
//! Every selector, offset, length and guest address comes from the guest: an unknown item reads as nothing (zero
//! bytes past its end, as QEMU), a request outside guest memory fails with the error bit, and nothing the guest
//! does makes the device panic.

use std::collections::BTreeMap;

use vm_memory::{Bytes, GuestAddress};

use crate::virtio::GuestMemoryMmap;
use crate::BusDevice;

/// The ports the device decodes, from its base.
pub const PORT_COUNT: u64 = 12;
/// The well-known items (QEMU's `FW_CFG_*` keys).
pub const SIGNATURE: u16 = 0x00;
pub const ID: u16 = 0x01;
pub const RAM_SIZE: u16 = 0x03;
pub const NOGRAPHIC: u16 = 0x04;
pub const NB_CPUS: u16 = 0x05;
pub const MAX_CPUS: u16 = 0x0f;
pub const FILE_DIR: u16 = 0x19;
/// Files get keys from here up, in the order they are added.
pub const FILE_FIRST: u16 = 0x20;
/// The most files the directory can list (QEMU's default `x-file-slots`).
pub const MAX_FILES: usize = 0x20;
/// Longest file name, its terminating NUL included.
pub const FILE_NAME_LEN: usize = 56;

const SELECTOR_OFFSET: u64 = 0;
const DATA_OFFSET: u64 = 1;
const DMA_HIGH_OFFSET: u64 = 4;
const DMA_LOW_OFFSET: u64 = 8;
/// A selector's bit 14 asks for write access (obsolete); the item is named by the rest.
const SELECTOR_WRITE: u16 = 0x4000;
/// The `ID` item's feature bits: the traditional port interface and DMA.
const FEATURE_TRADITIONAL: u32 = 1 << 0;
const FEATURE_DMA: u32 = 1 << 1;
/// What reading the DMA register gives: "QEMU CFG" as a big-endian number, so firmware can detect it.
const DMA_SIGNATURE: u64 = 0x5145_4d55_2043_4647;
/// DMA control bits.
const DMA_ERROR: u32 = 1 << 0;
const DMA_READ: u32 = 1 << 1;
const DMA_SKIP: u32 = 1 << 2;
const DMA_SELECT: u32 = 1 << 3;
const DMA_WRITE: u32 = 1 << 4;
/// A DMA request: control, length, address.
const DMA_REQUEST_LEN: usize = 16;
/// Bytes copied per step of a DMA read: a guest asking for 4 GiB is served in pieces, never by one allocation.
const DMA_CHUNK: usize = 4096;

/// Why an item cannot be added.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FwCfgError {
    #[error("fw_cfg file name '{0}' is empty or longer than 55 bytes")]
    FileName(String),
    #[error("fw_cfg file '{0}' added twice")]
    DuplicateFile(String),
    #[error("fw_cfg has room for {MAX_FILES} files")]
    TooManyFiles,
    #[error("fw_cfg item {0:#x} is larger than 4 GiB")]
    TooLarge(u16),
}

/// The device: its items, and where the guest's reads have got to.
pub struct FwCfg {
    memory: GuestMemoryMmap,
    items: BTreeMap<u16, Vec<u8>>,
    /// (name, key) of each file, in key order.
    files: Vec<(String, u16)>,
    selector: u16,
    offset: u32,
    /// The high half of the DMA request's address, until the low half's write starts it.
    dma_address_high: u32,
}

impl FwCfg {
    /// A device with the signature, the ID (port and DMA interfaces) and an empty file directory; DMA requests
    /// are served from and to `memory`.
    pub fn new(memory: GuestMemoryMmap) -> Self {
        let mut device =
            FwCfg { memory, items: BTreeMap::new(), files: Vec::new(), selector: 0, offset: 0, dma_address_high: 0 };
        device.clear();
        device
    }

    /// Back to power-on: every item but the signature, the ID and the (now empty) directory removed, nothing
    /// selected, no DMA address half written.
    pub fn clear(&mut self) {
        self.items.clear();
        self.files.clear();
        self.selector = 0;
        self.offset = 0;
        self.dma_address_high = 0;
        self.items.insert(SIGNATURE, b"QEMU".to_vec());
        self.items.insert(ID, (FEATURE_TRADITIONAL | FEATURE_DMA).to_le_bytes().to_vec());
        self.items.insert(FILE_DIR, 0u32.to_be_bytes().to_vec());
    }

    /// Sets a numbered item (one of the well-known keys below [`FILE_FIRST`]).
    pub fn set_item(&mut self, key: u16, data: Vec<u8>) -> Result<(), FwCfgError> {
        if u32::try_from(data.len()).is_err() {
            return Err(FwCfgError::TooLarge(key));
        }
        self.items.insert(key, data);
        Ok(())
    }

    /// Adds a named file, listed in the directory, under the next free key.
    pub fn add_file(&mut self, name: &str, data: Vec<u8>) -> Result<(), FwCfgError> {
        if name.is_empty() || name.len() >= FILE_NAME_LEN || name.contains('\0') {
            return Err(FwCfgError::FileName(name.to_string()));
        }
        if self.files.iter().any(|(existing, _)| existing == name) {
            return Err(FwCfgError::DuplicateFile(name.to_string()));
        }
        if self.files.len() == MAX_FILES {
            return Err(FwCfgError::TooManyFiles);
        }
        let key = FILE_FIRST + self.files.len() as u16;
        self.set_item(key, data)?;
        self.files.push((name.to_string(), key));
        self.items.insert(FILE_DIR, self.directory());
        Ok(())
    }

    /// The directory item: a big-endian count, then per file its big-endian size and key, two reserved bytes and
    /// its NUL-padded name.
    fn directory(&self) -> Vec<u8> {
        let mut dir = (self.files.len() as u32).to_be_bytes().to_vec();
        for (name, key) in &self.files {
            let size = self.items.get(key).map_or(0, |data| data.len() as u32);
            dir.extend_from_slice(&size.to_be_bytes());
            dir.extend_from_slice(&key.to_be_bytes());
            dir.extend_from_slice(&[0, 0]);
            let mut padded = [0u8; FILE_NAME_LEN];
            padded[..name.len()].copy_from_slice(name.as_bytes());
            dir.extend_from_slice(&padded);
        }
        dir
    }

    fn select(&mut self, key: u16) {
        self.selector = key & !SELECTOR_WRITE;
        self.offset = 0;
    }

    /// The selected item's bytes from the current offset on (empty for an unknown item or past its end).
    fn remaining(&self) -> &[u8] {
        let data = self.items.get(&self.selector).map_or(&[][..], Vec::as_slice);
        data.get(self.offset as usize..).unwrap_or_default()
    }

    /// Moves the offset on by `len`, never past 4 GiB (items are smaller than that).
    fn advance(&mut self, len: u32) {
        self.offset = self.offset.saturating_add(len);
    }

    /// Carries out the DMA request at guest address `request` and writes its outcome into the request's control
    /// word; Err when guest memory does not hold the request, which then has nowhere to report to.
    fn dma(&mut self, request: u64) -> Result<(), ()> {
        let mut raw = [0u8; DMA_REQUEST_LEN];
        self.memory.read_slice(&mut raw, GuestAddress(request)).map_err(drop)?;
        let control = u32::from_be_bytes(raw[0..4].try_into().unwrap_or_default());
        let length = u32::from_be_bytes(raw[4..8].try_into().unwrap_or_default());
        let address = u64::from_be_bytes(raw[8..16].try_into().unwrap_or_default());
        let outcome = self.dma_transfer(control, length, address);
        let written = if outcome.is_ok() { 0 } else { DMA_ERROR };
        self.memory.write_obj(written.to_be(), GuestAddress(request)).map_err(drop)
    }

    fn dma_transfer(&mut self, control: u32, length: u32, address: u64) -> Result<(), ()> {
        if control & DMA_SELECT != 0 {
            self.select((control >> 16) as u16);
        }
        if control & DMA_READ != 0 {
            // Past the item's end the guest gets zeros, as from QEMU.
            let mut done = 0u32;
            while done < length {
                let step = (length - done).min(DMA_CHUNK as u32);
                let mut chunk = [0u8; DMA_CHUNK];
                let available = self.remaining();
                let copied = available.len().min(step as usize);
                chunk[..copied].copy_from_slice(&available[..copied]);
                let target = address.checked_add(u64::from(done)).ok_or(())?;
                self.memory.write_slice(&chunk[..step as usize], GuestAddress(target)).map_err(drop)?;
                self.advance(step);
                done += step;
            }
        } else if control & DMA_SKIP != 0 {
            self.advance(length);
        } else if control & DMA_WRITE != 0 {
            // No item is writable.
            return Err(());
        }
        Ok(())
    }
}

impl BusDevice for FwCfg {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match offset {
            DATA_OFFSET => {
                for byte in data.iter_mut() {
                    *byte = self.remaining().first().copied().unwrap_or(0);
                    self.advance(1);
                }
            }
            DMA_HIGH_OFFSET | DMA_LOW_OFFSET => {
                let signature = DMA_SIGNATURE.to_be_bytes();
                let start = (offset - DMA_HIGH_OFFSET) as usize;
                let available = signature.get(start..).unwrap_or_default();
                let len = data.len().min(available.len());
                data[..len].copy_from_slice(&available[..len]);
            }
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            (SELECTOR_OFFSET, 2) => self.select(u16::from_le_bytes([data[0], data[1]])),
            (DMA_HIGH_OFFSET, 4) => self.dma_address_high = u32::from_be_bytes([data[0], data[1], data[2], data[3]]),
            (DMA_LOW_OFFSET, 4) => {
                let low = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                let request = u64::from(self.dma_address_high) << 32 | u64::from(low);
                self.dma_address_high = 0;
                // A request guest memory does not hold has nowhere to report its failure to.
                let _ = self.dma(request);
            }
            (DMA_HIGH_OFFSET, 8) => {
                let mut bytes = [0u8; 8];
                bytes.copy_from_slice(data);
                self.dma_address_high = 0;
                let _ = self.dma(u64::from_be_bytes(bytes));
            }
            // Writes to the data port are obsolete and ignored, as are other widths.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RAM: u64 = 0x10000;

    fn device() -> FwCfg {
        FwCfg::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap())
    }

    fn select(device: &mut FwCfg, key: u16) {
        device.write(SELECTOR_OFFSET, &key.to_le_bytes());
    }

    fn read_port(device: &mut FwCfg, len: usize) -> Vec<u8> {
        (0..len)
            .map(|_| {
                let mut byte = [0u8];
                device.read(DATA_OFFSET, &mut byte);
                byte[0]
            })
            .collect()
    }

    /// Writes a DMA request at `at` and starts it with the two 32-bit halves, as SeaBIOS does.
    fn dma(device: &mut FwCfg, at: u64, control: u32, length: u32, address: u64) -> u32 {
        let mut request = Vec::new();
        request.extend_from_slice(&control.to_be_bytes());
        request.extend_from_slice(&length.to_be_bytes());
        request.extend_from_slice(&address.to_be_bytes());
        device.memory.write_slice(&request, GuestAddress(at)).unwrap();
        device.write(DMA_HIGH_OFFSET, &((at >> 32) as u32).to_be_bytes());
        device.write(DMA_LOW_OFFSET, &(at as u32).to_be_bytes());
        u32::from_be(device.memory.read_obj::<u32>(GuestAddress(at)).unwrap())
    }

    #[test]
    fn signature_and_id_read_through_the_port() {
        let mut device = device();
        select(&mut device, SIGNATURE);
        assert_eq!(read_port(&mut device, 4), b"QEMU");
        assert_eq!(read_port(&mut device, 2), [0, 0], "past the end reads zeros");
        select(&mut device, ID);
        assert_eq!(read_port(&mut device, 4), [3, 0, 0, 0], "traditional and DMA interfaces");
        let mut signature = [0u8; 8];
        device.read(DMA_HIGH_OFFSET, &mut signature);
        assert_eq!(&signature, b"QEMU CFG");
    }

    #[test]
    fn files_are_listed_in_the_directory_under_their_keys() {
        let mut device = device();
        device.add_file("etc/e820", vec![1; 20]).unwrap();
        device.add_file("etc/boot-fail-wait", 5u32.to_le_bytes().to_vec()).unwrap();
        select(&mut device, FILE_DIR);
        let dir = read_port(&mut device, 4 + 2 * 64);
        assert_eq!(&dir[..4], &2u32.to_be_bytes());
        let entry = |i: usize| &dir[4 + i * 64..4 + (i + 1) * 64];
        assert_eq!(&entry(0)[..4], &20u32.to_be_bytes());
        assert_eq!(&entry(0)[4..6], &FILE_FIRST.to_be_bytes());
        assert_eq!(&entry(0)[8..16], b"etc/e820");
        assert!(entry(0)[16..].iter().all(|&b| b == 0));
        assert_eq!(&entry(1)[4..6], &(FILE_FIRST + 1).to_be_bytes());
        assert_eq!(&entry(1)[8..26], b"etc/boot-fail-wait");
        select(&mut device, FILE_FIRST + 1);
        assert_eq!(read_port(&mut device, 4), 5u32.to_le_bytes());

        assert_eq!(device.add_file("etc/e820", vec![]), Err(FwCfgError::DuplicateFile("etc/e820".into())));
        assert!(matches!(device.add_file("", vec![]), Err(FwCfgError::FileName(_))));
        assert!(matches!(device.add_file(&"x".repeat(56), vec![]), Err(FwCfgError::FileName(_))));
        for i in 2..MAX_FILES {
            device.add_file(&format!("f{i}"), vec![]).unwrap();
        }
        assert_eq!(device.add_file("one-more", vec![]), Err(FwCfgError::TooManyFiles));
        // A reset leaves nothing selected half-read: the signature item, from its start.
        select(&mut device, FILE_DIR);
        read_port(&mut device, 2);
        device.clear();
        assert_eq!(read_port(&mut device, 4), *b"QEMU");
        select(&mut device, FILE_DIR);
        assert_eq!(read_port(&mut device, 4), 0u32.to_be_bytes());
    }

    #[test]
    fn dma_selects_reads_skips_and_pads_with_zeros() {
        let mut device = device();
        device.set_item(NB_CPUS, 4u16.to_le_bytes().to_vec()).unwrap();
        device.add_file("data", (1..=10).collect()).unwrap();
        device.memory.write_slice(&[0xaa; 16], GuestAddress(0x2000)).unwrap();
        let control = u32::from(FILE_FIRST) << 16 | DMA_SELECT | DMA_READ;
        assert_eq!(dma(&mut device, 0x1000, control, 4, 0x2000), 0);
        assert_eq!(dma(&mut device, 0x1000, DMA_SKIP, 2, 0), 0);
        assert_eq!(dma(&mut device, 0x1000, DMA_READ, 8, 0x2004), 0);
        let mut got = [0u8; 16];
        device.memory.read_slice(&mut got, GuestAddress(0x2000)).unwrap();
        assert_eq!(got, [1, 2, 3, 4, 7, 8, 9, 10, 0, 0, 0, 0, 0xaa, 0xaa, 0xaa, 0xaa]);
        // The 64-bit form of the address register.
        device
            .memory
            .write_slice(&(u32::from(NB_CPUS) << 16 | DMA_SELECT | DMA_READ).to_be_bytes(), GuestAddress(0x3000))
            .unwrap();
        device.memory.write_slice(&2u32.to_be_bytes(), GuestAddress(0x3004)).unwrap();
        device.memory.write_slice(&0x3100u64.to_be_bytes(), GuestAddress(0x3008)).unwrap();
        device.write(DMA_HIGH_OFFSET, &0x3000u64.to_be_bytes());
        assert_eq!(device.memory.read_obj::<u32>(GuestAddress(0x3000)).unwrap(), 0);
        assert_eq!(
            u16::from_le(device.memory.read_obj::<u16>(GuestAddress(0x3100)).unwrap()),
            4,
            "as the guest reads it"
        );
    }

    #[test]
    fn hostile_dma_requests_fail_with_the_error_bit_and_nothing_else() {
        let mut device = device();
        device.add_file("data", vec![7; 64]).unwrap();
        let select_read = u32::from(FILE_FIRST) << 16 | DMA_SELECT | DMA_READ;
        // Data past the end of guest memory, straddling it, at the top of the address space, huge lengths.
        for (length, address) in
            [(16, RAM), (16, RAM - 8), (16, u64::MAX - 4), (u32::MAX, 0x4000), (16, 0xffff_ffff_0000_0000)]
        {
            assert_eq!(dma(&mut device, 0x1000, select_read, length, address) & DMA_ERROR, DMA_ERROR);
        }
        assert_eq!(dma(&mut device, 0x1000, DMA_WRITE, 4, 0x2000), DMA_ERROR, "no item is writable");
        // A request outside guest memory, or straddling its end: nothing to write the result to, nothing written.
        device.write(DMA_LOW_OFFSET, &(RAM as u32).to_be_bytes());
        device.write(DMA_LOW_OFFSET, &((RAM - 8) as u32).to_be_bytes());
        device.write(DMA_HIGH_OFFSET, &u64::MAX.to_be_bytes());
        // Unknown selectors read as nothing; odd widths and offsets are ignored.
        select(&mut device, 0x7fff);
        assert_eq!(read_port(&mut device, 3), [0, 0, 0]);
        device.write(SELECTOR_OFFSET, &[1]);
        device.write(DATA_OFFSET, &[1, 2, 3, 4]);
        device.write(11, &[0; 8]);
        let mut wide = [0xffu8; 8];
        device.read(11, &mut wide);
        assert_eq!(wide, [0; 8]);
        // A skip past 4 GiB stays put at the end rather than wrapping.
        select(&mut device, FILE_FIRST);
        assert_eq!(dma(&mut device, 0x1000, DMA_SKIP, u32::MAX, 0), 0);
        assert_eq!(dma(&mut device, 0x1000, DMA_SKIP, u32::MAX, 0), 0);
        assert_eq!(read_port(&mut device, 1), [0]);
    }
}

//! A type-0 PCI configuration space: 4 KiB of registers with per-bit write masks, so read-only fields, BAR sizing
//! and write-1-to-clear status bits all follow from the masks instead of special cases.

use serde::{Deserialize, Serialize};

use crate::{Persist, StateError};

/// The whole space as ECAM reaches it; port 0xCF8/0xCFC reaches the first 256 bytes.
pub const CONFIG_SPACE_SIZE: usize = 4096;
pub const LEGACY_CONFIG_SPACE_SIZE: usize = 256;

pub const VENDOR_ID: usize = 0x00;
pub const DEVICE_ID: usize = 0x02;
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const REVISION_ID: usize = 0x08;
/// Programming interface, subclass, class: three bytes from here.
pub const CLASS_CODE: usize = 0x09;
pub const CACHE_LINE_SIZE: usize = 0x0c;
pub const LATENCY_TIMER: usize = 0x0d;
pub const HEADER_TYPE: usize = 0x0e;
pub const BAR0: usize = 0x10;
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
pub const SUBSYSTEM_ID: usize = 0x2e;
pub const CAPABILITIES_POINTER: usize = 0x34;
pub const INTERRUPT_LINE: usize = 0x3c;
pub const INTERRUPT_PIN: usize = 0x3d;

pub const COMMAND_IO_SPACE: u16 = 1 << 0;
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
pub const STATUS_CAPABILITIES_LIST: u16 = 1 << 4;

pub const BAR_COUNT: usize = 6;
/// Memory BAR flag: prefetchable (bit 3); bits 2:1 = 00 is a 32-bit BAR, bit 0 = 0 is memory space.
const BAR_PREFETCHABLE: u32 = 1 << 3;
/// The smallest memory BAR (the four flag bits are not address bits).
pub const MIN_BAR_SIZE: u64 = 16;

/// Where standard capabilities go: after the type-0 header, below the end of the legacy space.
const FIRST_CAPABILITY: usize = 0x40;

/// A function's identity in its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciIdentity {
    pub vendor_id: u16,
    pub device_id: u16,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
    pub revision: u8,
    /// Class, subclass and programming interface (24 bits).
    pub class_code: u32,
}

/// A 32-bit memory BAR: its size (a power of two) and whether it is prefetchable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    pub size: u64,
    pub prefetchable: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("BAR {0} does not exist or is already defined")]
    BadBarIndex(usize),
    #[error("BAR size {0:#x} is not a power of two between 16 bytes and 2 GiB")]
    BadBarSize(u64),
    #[error("BAR address {address:#x} is not aligned to its size {size:#x} or not below 4 GiB")]
    BadBarAddress { address: u64, size: u64 },
    #[error("capability of {0} bytes does not fit in configuration space")]
    CapabilityTooLarge(usize),
}

#[derive(Clone)]
struct Registers {
    bytes: Box<[u8; CONFIG_SPACE_SIZE]>,
    bars: [Option<Bar>; BAR_COUNT],
}

#[derive(Clone)]
pub struct ConfigSpace {
    current: Registers,
    /// Bits the guest may change.
    writable: Box<[u8; CONFIG_SPACE_SIZE]>,
    /// Bits a guest write of 1 clears.
    write_one_to_clear: Box<[u8; CONFIG_SPACE_SIZE]>,
    /// Where the next capability goes and the last one's offset, to chain them.
    next_capability: usize,
    last_capability: Option<usize>,
    /// What a reset restores (see [`ConfigSpace::commit_power_on_state`]).
    power_on: Registers,
}

impl ConfigSpace {
    /// A header for a single-function type-0 device with `identity`, no BARs, no capabilities, no interrupt pin.
    pub fn new(identity: PciIdentity) -> Self {
        let registers = Registers { bytes: Box::new([0; CONFIG_SPACE_SIZE]), bars: [None; BAR_COUNT] };
        let mut config = ConfigSpace {
            current: registers.clone(),
            writable: Box::new([0; CONFIG_SPACE_SIZE]),
            write_one_to_clear: Box::new([0; CONFIG_SPACE_SIZE]),
            next_capability: FIRST_CAPABILITY,
            last_capability: None,
            power_on: registers,
        };
        config.set_u16(VENDOR_ID, identity.vendor_id);
        config.set_u16(DEVICE_ID, identity.device_id);
        config.set_u8(REVISION_ID, identity.revision);
        let class = identity.class_code.to_le_bytes();
        config.current.bytes[CLASS_CODE..CLASS_CODE + 3].copy_from_slice(&class[..3]);
        config.set_u16(SUBSYSTEM_VENDOR_ID, identity.subsystem_vendor_id);
        config.set_u16(SUBSYSTEM_ID, identity.subsystem_id);
        let command = COMMAND_IO_SPACE | COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE;
        config.writable[COMMAND..COMMAND + 2].copy_from_slice(&command.to_le_bytes());
        // Detected parity error, signalled system error, received master/target abort, signalled target abort.
        config.write_one_to_clear[STATUS + 1] = 0xf9;
        config.writable[CACHE_LINE_SIZE] = 0xff;
        config.writable[LATENCY_TIMER] = 0xff;
        config.writable[INTERRUPT_LINE] = 0xff;
        config.power_on = config.current.clone();
        config
    }

    /// Defines memory BAR `index` (32-bit, not yet placed).
    pub fn add_bar(&mut self, index: usize, bar: Bar) -> Result<(), ConfigError> {
        if index >= BAR_COUNT || self.current.bars[index].is_some() {
            return Err(ConfigError::BadBarIndex(index));
        }
        if !bar.size.is_power_of_two() || bar.size < MIN_BAR_SIZE || bar.size > 1 << 31 {
            return Err(ConfigError::BadBarSize(bar.size));
        }
        self.current.bars[index] = Some(bar);
        let reg = BAR0 + 4 * index;
        // Address bits above the size are writable: writing all ones reads back the size mask, as a BAR should.
        let mask = !(bar.size as u32 - 1);
        self.writable[reg..reg + 4].copy_from_slice(&mask.to_le_bytes());
        let flags = if bar.prefetchable { BAR_PREFETCHABLE } else { 0 };
        self.set_u32(reg, flags);
        Ok(())
    }

    pub fn bar(&self, index: usize) -> Option<Bar> {
        self.current.bars.get(index).copied().flatten()
    }

    /// What BAR `index`'s register holds as an address, whether or not decoding is on.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let bar = self.bar(index)?;
        Some(u64::from(self.u32_at(BAR0 + 4 * index) & !(bar.size as u32 - 1)))
    }

    /// Places BAR `index` at `address`, as firmware would.
    pub fn set_bar_address(&mut self, index: usize, address: u64) -> Result<(), ConfigError> {
        let bar = self.bar(index).ok_or(ConfigError::BadBarIndex(index))?;
        if !address.is_multiple_of(bar.size) || address + bar.size > 1 << 32 {
            return Err(ConfigError::BadBarAddress { address, size: bar.size });
        }
        let reg = BAR0 + 4 * index;
        let flags = self.u32_at(reg) & (bar.size as u32 - 1);
        self.set_u32(reg, address as u32 | flags);
        Ok(())
    }

    /// The BARs the function decodes right now: memory space enabled, with their addresses and sizes.
    pub fn decoded_bars(&self) -> Vec<(usize, u64, u64)> {
        if self.command() & COMMAND_MEMORY_SPACE == 0 {
            return Vec::new();
        }
        (0..BAR_COUNT).filter_map(|i| Some((i, self.bar_address(i)?, self.bar(i)?.size))).collect()
    }

    pub fn command(&self) -> u16 {
        self.u16_at(COMMAND)
    }

    pub fn set_command(&mut self, command: u16) {
        self.set_u16(COMMAND, command);
    }

    pub fn set_interrupt_pin(&mut self, pin: u8) {
        self.set_u8(INTERRUPT_PIN, pin);
    }

    pub fn set_header_type(&mut self, header_type: u8) {
        self.set_u8(HEADER_TYPE, header_type);
    }

    /// Appends a capability: `body[0]` is its ID, `body[1]` (the next pointer) is filled in here. Returns its
    /// offset. All of it is read-only until [`set_writable`](Self::set_writable) says otherwise.
    pub fn add_capability(&mut self, body: &[u8]) -> Result<usize, ConfigError> {
        let offset = self.next_capability;
        if body.len() < 2 || offset + body.len() > LEGACY_CONFIG_SPACE_SIZE {
            return Err(ConfigError::CapabilityTooLarge(body.len()));
        }
        self.current.bytes[offset..offset + body.len()].copy_from_slice(body);
        self.current.bytes[offset + 1] = 0;
        match self.last_capability {
            Some(last) => self.current.bytes[last + 1] = offset as u8,
            None => self.current.bytes[CAPABILITIES_POINTER] = offset as u8,
        }
        let status = self.u16_at(STATUS) | STATUS_CAPABILITIES_LIST;
        self.set_u16(STATUS, status);
        self.last_capability = Some(offset);
        self.next_capability = (offset + body.len()).next_multiple_of(4);
        Ok(offset)
    }

    /// Lets the guest change the bits of `mask` from `offset` on.
    pub fn set_writable(&mut self, offset: usize, mask: &[u8]) {
        if let Some(bits) = offset.checked_add(mask.len()).and_then(|end| self.writable.get_mut(offset..end)) {
            bits.copy_from_slice(mask);
        }
    }

    /// Makes the current registers what a reset returns to.
    pub fn commit_power_on_state(&mut self) {
        self.power_on = self.current.clone();
    }

    /// Back to the committed power-on state.
    pub fn reset(&mut self) {
        self.current = self.power_on.clone();
    }

    /// A guest read: `data.len()` bytes from `offset`; bytes beyond the space read as ones.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset.checked_add(i).and_then(|o| self.current.bytes.get(o)).copied().unwrap_or(0xff);
        }
    }

    /// A guest write: only writable bits change, write-1-to-clear bits clear where a 1 is written.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &value) in data.iter().enumerate() {
            let Some(o) = offset.checked_add(i).filter(|&o| o < CONFIG_SPACE_SIZE) else { return };
            let mask = self.writable[o];
            let old = self.current.bytes[o];
            self.current.bytes[o] = ((old & !mask) | (value & mask)) & !(value & self.write_one_to_clear[o]);
        }
    }

    pub fn u8_at(&self, offset: usize) -> u8 {
        self.current.bytes[offset]
    }

    pub fn u16_at(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.current.bytes[offset], self.current.bytes[offset + 1]])
    }

    pub fn u32_at(&self, offset: usize) -> u32 {
        let b = &self.current.bytes[offset..offset + 4];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    /// Sets a register regardless of the write masks (the device's own view).
    pub fn set_u8(&mut self, offset: usize, value: u8) {
        self.current.bytes[offset] = value;
    }

    pub fn set_u16(&mut self, offset: usize, value: u16) {
        self.current.bytes[offset..offset + 2].copy_from_slice(&value.to_le_bytes());
    }

    pub fn set_u32(&mut self, offset: usize, value: u32) {
        self.current.bytes[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
    }

    pub fn identity(&self) -> PciIdentity {
        let b = &self.current.bytes;
        PciIdentity {
            vendor_id: self.u16_at(VENDOR_ID),
            device_id: self.u16_at(DEVICE_ID),
            subsystem_vendor_id: self.u16_at(SUBSYSTEM_VENDOR_ID),
            subsystem_id: self.u16_at(SUBSYSTEM_ID),
            revision: b[REVISION_ID],
            class_code: u32::from_le_bytes([b[CLASS_CODE], b[CLASS_CODE + 1], b[CLASS_CODE + 2], 0]),
        }
    }
}

/// A configuration space as data: its registers. The write masks, BAR sizes and power-on state are the device's
/// configuration, rebuilt by its constructor; the registers' read-only bits must match them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigSpaceState {
    /// All [`CONFIG_SPACE_SIZE`] bytes, BAR addresses and capabilities included.
    pub bytes: Vec<u8>,
}

impl Persist for ConfigSpace {
    type State = ConfigSpaceState;

    fn save(&self) -> ConfigSpaceState {
        ConfigSpaceState { bytes: self.current.bytes.to_vec() }
    }

    /// Refuses a state whose read-only bits (identity, BAR flags and sizes, capabilities and their layout) differ
    /// from this device's: that is a snapshot of another device or configuration. Bits the guest can write or
    /// clear may hold anything.
    fn restore(&mut self, state: &ConfigSpaceState) -> Result<(), StateError> {
        const DEVICE: &str = "PCI configuration space";
        let bytes = <&[u8; CONFIG_SPACE_SIZE]>::try_from(state.bytes.as_slice()).map_err(|_| {
            let problem = format!("{} bytes, not {CONFIG_SPACE_SIZE}", state.bytes.len());
            StateError::new(DEVICE, "bytes", problem)
        })?;
        for (offset, (&saved, &current)) in bytes.iter().zip(self.current.bytes.iter()).enumerate() {
            let fixed = !(self.writable[offset] | self.write_one_to_clear[offset]);
            if (saved ^ current) & fixed != 0 {
                let problem = format!(
                    "read-only bits {:#04x} differ from this device's {:#04x} (a snapshot of another device?)",
                    saved & fixed,
                    current & fixed
                );
                return Err(StateError::new(DEVICE, format!("bytes[{offset:#05x}]"), problem));
            }
        }
        self.current.bytes.copy_from_slice(bytes);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::testing::{assert_refused, fuzz_restore, through_json};

    const IDENTITY: PciIdentity = PciIdentity {
        vendor_id: 0x1af4,
        device_id: 0x1042,
        subsystem_vendor_id: 0x1af4,
        subsystem_id: 0x1100,
        revision: 1,
        class_code: 0x018000,
    };

    fn read32(c: &ConfigSpace, offset: usize) -> u32 {
        let mut data = [0; 4];
        c.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write32(c: &mut ConfigSpace, offset: usize, value: u32) {
        c.write(offset, &value.to_le_bytes());
    }

    #[test]
    fn the_header_is_read_only_where_it_should_be() {
        let mut c = ConfigSpace::new(IDENTITY);
        assert_eq!(read32(&c, VENDOR_ID), 0x1042_1af4);
        assert_eq!(read32(&c, REVISION_ID), 0x0180_0001);
        assert_eq!(read32(&c, SUBSYSTEM_VENDOR_ID), 0x1100_1af4);
        for offset in (0..0x40).step_by(4) {
            if offset != COMMAND && offset != CACHE_LINE_SIZE && offset != INTERRUPT_LINE {
                let before = read32(&c, offset);
                write32(&mut c, offset, 0xffff_ffff);
                write32(&mut c, offset, 0x1234_5678);
                assert_eq!(read32(&c, offset), before, "register {offset:#x}");
            }
        }
        // Command: decode and bus-master bits are writable, the rest is not.
        write32(&mut c, COMMAND, 0xffff);
        assert_eq!(c.command(), 0x0407);
        c.write(INTERRUPT_LINE, &[11]);
        assert_eq!(c.u8_at(INTERRUPT_LINE), 11);
        // A read or write past the end does no harm.
        let mut data = [0u8; 4];
        c.read(CONFIG_SPACE_SIZE - 2, &mut data);
        assert_eq!(data, [0, 0, 0xff, 0xff]);
        c.write(CONFIG_SPACE_SIZE - 1, &[1, 2, 3, 4]);
        c.write(usize::MAX, &[1, 2]);
    }

    #[test]
    fn status_error_bits_clear_when_written_with_one() {
        let mut c = ConfigSpace::new(IDENTITY);
        c.set_u16(STATUS, 0x8000 | STATUS_CAPABILITIES_LIST);
        c.write(STATUS, &0x0010u16.to_le_bytes());
        assert_eq!(c.u16_at(STATUS), 0x8010, "writing 0 leaves it, capability bit is read-only");
        c.write(STATUS, &0xffffu16.to_le_bytes());
        assert_eq!(c.u16_at(STATUS), STATUS_CAPABILITIES_LIST);
    }

    #[test]
    fn bars_size_and_move() {
        let mut c = ConfigSpace::new(IDENTITY);
        c.add_bar(0, Bar { size: 0x4000, prefetchable: false }).unwrap();
        c.add_bar(2, Bar { size: 0x1000, prefetchable: true }).unwrap();
        assert_eq!(c.add_bar(0, Bar { size: 0x1000, prefetchable: false }), Err(ConfigError::BadBarIndex(0)));
        assert_eq!(c.add_bar(6, Bar { size: 0x1000, prefetchable: false }), Err(ConfigError::BadBarIndex(6)));
        assert_eq!(c.add_bar(1, Bar { size: 0x1800, prefetchable: false }), Err(ConfigError::BadBarSize(0x1800)));
        assert_eq!(c.add_bar(1, Bar { size: 8, prefetchable: false }), Err(ConfigError::BadBarSize(8)));
        c.set_bar_address(0, 0xc000_0000).unwrap();
        c.set_bar_address(2, 0xc000_4000).unwrap();
        assert!(c.set_bar_address(0, 0xc000_1000).is_err(), "unaligned");
        assert!(c.set_bar_address(1, 0xc000_0000).is_err(), "absent");
        assert_eq!(read32(&c, BAR0), 0xc000_0000);
        assert_eq!(read32(&c, BAR0 + 8), 0xc000_4008);
        // Sizing: all ones reads back the size mask with the flags; an absent BAR reads zero.
        write32(&mut c, BAR0, 0xffff_ffff);
        assert_eq!(read32(&c, BAR0), 0xffff_c000);
        write32(&mut c, BAR0 + 8, 0xffff_ffff);
        assert_eq!(read32(&c, BAR0 + 8), 0xffff_f008);
        write32(&mut c, BAR0 + 4, 0xffff_ffff);
        assert_eq!(read32(&c, BAR0 + 4), 0);
        // Moving: the low bits of an unaligned address are dropped.
        write32(&mut c, BAR0, 0xc010_0123);
        assert_eq!(c.bar_address(0), Some(0xc010_0000));
        c.set_command(0);
        assert_eq!(c.decoded_bars(), vec![]);
        c.set_command(COMMAND_MEMORY_SPACE);
        assert_eq!(c.decoded_bars(), vec![(0, 0xc010_0000, 0x4000), (2, 0xffff_f000, 0x1000)]);
    }

    #[test]
    fn capabilities_chain_and_reset_restores_power_on_state() {
        let mut c = ConfigSpace::new(IDENTITY);
        let first = c.add_capability(&[0x09, 0xaa, 16, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0]).unwrap();
        let second = c.add_capability(&[0x11, 0, 3, 0, 1, 0, 0, 0, 1, 8, 0, 0]).unwrap();
        assert_eq!((first, second), (0x40, 0x50));
        assert_eq!(c.u8_at(CAPABILITIES_POINTER), 0x40);
        assert_eq!(c.u8_at(first + 1), 0x50);
        assert_eq!(c.u8_at(second + 1), 0);
        assert_ne!(c.u16_at(STATUS) & STATUS_CAPABILITIES_LIST, 0);
        assert!(c.add_capability(&[0; 200]).is_err());
        c.set_writable(second + 2, &[0, 0xc0]);
        c.write(second + 2, &[0xff, 0xff]);
        assert_eq!(c.u16_at(second + 2), 0xc003);
        c.commit_power_on_state();
        c.write(second + 2, &[0, 0]);
        c.write(COMMAND, &[2]);
        c.reset();
        assert_eq!((c.u16_at(second + 2), c.command()), (0xc003, 0));
    }

    /// What a device's constructor builds: two BARs (one prefetchable), a read-only capability and one with a
    /// writable word.
    fn built() -> ConfigSpace {
        let mut c = ConfigSpace::new(IDENTITY);
        c.add_bar(0, Bar { size: 0x4000, prefetchable: false }).unwrap();
        c.add_bar(2, Bar { size: 0x1000, prefetchable: true }).unwrap();
        c.add_capability(&[0x09, 0, 8, 1, 2, 3, 4, 5]).unwrap();
        let writable = c.add_capability(&[0x09, 0, 8, 0, 0, 0, 0, 0]).unwrap();
        c.set_writable(writable + 4, &[0xff, 0x0f]);
        c.set_bar_address(0, 0xc000_0000).unwrap();
        c.set_bar_address(2, 0xc000_4000).unwrap();
        c.commit_power_on_state();
        c
    }

    /// A built space the guest has used: BAR 0 moved, decoding and bus mastering on, an interrupt line, a
    /// capability register written, and an error status bit the device set and the guest has not cleared.
    fn used() -> ConfigSpace {
        let mut c = built();
        write32(&mut c, BAR0, 0xc010_0000);
        c.write(COMMAND, &(COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER).to_le_bytes());
        c.write(INTERRUPT_LINE, &[10]);
        c.write(0x4c, &[0xab, 0xcd]);
        c.set_u16(STATUS, c.u16_at(STATUS) | 0x8000);
        c
    }

    fn all_bytes(c: &ConfigSpace) -> Vec<u8> {
        let mut bytes = vec![0; CONFIG_SPACE_SIZE];
        c.read(0, &mut bytes);
        bytes
    }

    #[test]
    fn state_round_trips_with_moved_bars() {
        let mut c = used();
        let state = through_json(&c.save());
        let mut restored = built();
        assert_ne!(all_bytes(&restored), all_bytes(&c));
        restored.restore(&state).unwrap();
        assert_eq!(all_bytes(&restored), all_bytes(&c));
        assert_eq!(restored.decoded_bars(), vec![(0, 0xc010_0000, 0x4000), (2, 0xc000_4000, 0x1000)]);
        assert_eq!(restored.u16_at(0x4c), 0x0dab, "only the writable bits were written");
        // The next accesses behave alike: sizing, clearing the error bit, and a reset to the power-on state.
        for dev in [&mut c, &mut restored] {
            write32(dev, BAR0 + 8, 0xffff_ffff);
            dev.write(STATUS, &0x8000u16.to_le_bytes());
        }
        assert_eq!(all_bytes(&restored), all_bytes(&c));
        assert_eq!(read32(&restored, BAR0 + 8), 0xffff_f008);
        restored.reset();
        assert_eq!(restored.bar_address(0), Some(0xc000_0000), "reset goes back to where the VMM placed it");
    }

    #[test]
    fn states_of_other_devices_or_layouts_are_refused() {
        let good = used().save();
        let mut target = built();
        let bad = |offset: usize, value: u8| {
            let mut state = good.clone();
            state.bytes[offset] = value;
            state
        };
        for len in [0, LEGACY_CONFIG_SPACE_SIZE, CONFIG_SPACE_SIZE - 1, CONFIG_SPACE_SIZE + 1] {
            let mut state = good.clone();
            state.bytes.resize(len, 0);
            assert_refused(&mut target, &state, "bytes");
        }
        assert_refused(&mut target, &bad(DEVICE_ID, 0x43), "bytes[0x002]");
        assert_refused(&mut target, &bad(BAR0 + 8, 0), "bytes[0x018]"); // BAR 2's prefetchable flag
        assert_refused(&mut target, &bad(BAR0 + 1, 0x10), "bytes[0x011]"); // an address below BAR 0's size
        assert_refused(&mut target, &bad(BAR0 + 4, 1), "bytes[0x014]"); // BAR 1 does not exist
        assert_refused(&mut target, &bad(0x44, 9), "bytes[0x044]"); // a read-only capability byte
        assert_refused(&mut target, &bad(0x4d, 0xff), "bytes[0x04d]"); // the writable one's read-only nibble
        assert_refused(&mut target, &bad(CAPABILITIES_POINTER, 0x48), "bytes[0x034]");
        assert_refused(&mut target, &bad(0x100, 1), "bytes[0x100]");
        assert_refused(&mut target, &bad(STATUS, 0), "bytes[0x006]"); // the capability list bit
        let mut other = ConfigSpace::new(PciIdentity { device_id: 0x1041, ..IDENTITY });
        assert_refused(&mut other, &good, "bytes[0x002]");
        target.restore(&bad(STATUS + 1, 0xf9)).unwrap();
    }

    #[test]
    fn mutated_states_never_panic() {
        let exercise = |c: &mut ConfigSpace| {
            all_bytes(c);
            c.decoded_bars();
            write32(c, BAR0, 0xffff_ffff);
            c.reset();
        };
        let counts = fuzz_restore(built, &used().save(), exercise, 300);
        assert!(counts.refused > 0 && counts.loaded > 0, "{counts:?}");
    }
}

//! QEMU's table loader ("linker/loader"): the fw_cfg file `etc/table-loader` through which firmware (SeaBIOS,
//! OVMF) installs tables the VMM built without knowing where they will live. Each command is 128 bytes, little
//! endian, a 32-bit command number and its arguments:
//!
//! * ALLOCATE (1): the fw_cfg file named (56 bytes, NUL-padded) is copied into memory the firmware allocates with
//!   the given alignment, in its high zone (1) or in the F segment (2, 0xF0000-0xFFFFF, where an RSDP must be).
//!   Every file comes first in an ALLOCATE, before any command names it.
//! * ADD_POINTER (2): at `offset` in the destination file, a little-endian number of `size` bytes (1, 2, 4 or 8)
//!   has the address the source file was allocated at added to it: the VMM writes offsets into the source file,
//!   the firmware turns them into addresses.
//! * ADD_CHECKSUM (3): the byte at `offset` has the sum of `length` bytes from `start` subtracted from it, so the
//!   range sums to zero (the ACPI checksum), after the pointers in it were patched.
//!
//! The format is specified by the firmware's side of it (SeaBIOS `src/fw/romfile_loader.h`); this is Kestrel's
//! own writer. The fourth command (WRITE_POINTER, a pointer written back to the VMM) is not needed: no device
//! here learns where a table went.

use crate::{Error, Result};

/// Longest file name, its terminating NUL included (fw_cfg's limit).
pub const FILE_NAME_LEN: usize = 56;
/// Every command's size.
pub const COMMAND_LEN: usize = 128;

const ALLOCATE: u32 = 1;
const ADD_POINTER: u32 = 2;
const ADD_CHECKSUM: u32 = 3;

/// Where the firmware puts an allocated file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Zone {
    /// Memory the firmware reserves for tables (below 4 GiB, near the top of RAM).
    High = 1,
    /// The F segment below 1 MiB, where the OS scans for an RSDP.
    FSeg = 2,
}

/// The commands, in order, as the firmware reads them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableLoader {
    commands: Vec<u8>,
}

impl TableLoader {
    pub fn new() -> Self {
        TableLoader::default()
    }

    /// Allocates and fills `file` at an `align`-byte boundary (a power of two) in `zone`.
    pub fn allocate(&mut self, file: &str, align: u32, zone: Zone) -> Result<()> {
        if !align.is_power_of_two() {
            return Err(Error::Tables(format!("table loader: alignment {align} of '{file}' is not a power of two")));
        }
        let mut command = Command::new(ALLOCATE);
        command.name(file)?;
        command.u32(align);
        command.u8(zone as u8);
        self.commands.extend_from_slice(&command.bytes);
        Ok(())
    }

    /// Adds the address of `source` to the `size`-byte number at `offset` in `destination`.
    pub fn add_pointer(&mut self, destination: &str, offset: u32, size: u8, source: &str) -> Result<()> {
        if !matches!(size, 1 | 2 | 4 | 8) {
            return Err(Error::Tables(format!("table loader: a pointer of {size} bytes in '{destination}'")));
        }
        let mut command = Command::new(ADD_POINTER);
        command.name(destination)?;
        command.name(source)?;
        command.u32(offset);
        command.u8(size);
        self.commands.extend_from_slice(&command.bytes);
        Ok(())
    }

    /// Makes the `length` bytes from `start` in `file` sum to zero by adjusting the byte at `offset`.
    pub fn add_checksum(&mut self, file: &str, offset: u32, start: u32, length: u32) -> Result<()> {
        let mut command = Command::new(ADD_CHECKSUM);
        command.name(file)?;
        command.u32(offset);
        command.u32(start);
        command.u32(length);
        self.commands.extend_from_slice(&command.bytes);
        Ok(())
    }

    /// The `etc/table-loader` file.
    pub fn into_bytes(self) -> Vec<u8> {
        self.commands
    }
}

/// One command being written, field after field.
struct Command {
    bytes: [u8; COMMAND_LEN],
    at: usize,
}

impl Command {
    fn new(number: u32) -> Self {
        let mut command = Command { bytes: [0; COMMAND_LEN], at: 0 };
        command.u32(number);
        command
    }

    fn name(&mut self, name: &str) -> Result<()> {
        if name.is_empty() || name.len() >= FILE_NAME_LEN || name.contains('\0') {
            return Err(Error::Tables(format!("table loader: file name '{name}' is empty or longer than 55 bytes")));
        }
        self.bytes[self.at..self.at + name.len()].copy_from_slice(name.as_bytes());
        self.at += FILE_NAME_LEN;
        Ok(())
    }

    fn u32(&mut self, value: u32) {
        self.bytes[self.at..self.at + 4].copy_from_slice(&value.to_le_bytes());
        self.at += 4;
    }

    fn u8(&mut self, value: u8) {
        self.bytes[self.at] = value;
        self.at += 1;
    }
}

/// A firmware's side of the loader, for tests: runs the commands on the files, allocating each at the next
/// address from `base` with its alignment, and returns every file's address and final bytes. Malformed commands
/// are test failures.
#[cfg(test)]
pub(crate) fn run_like_firmware(
    loader: &[u8],
    files: &[(&str, &[u8])],
    high_base: u64,
    fseg_base: u64,
) -> std::collections::HashMap<String, (u64, Vec<u8>)> {
    use std::collections::HashMap;
    let name_at = |command: &[u8], at: usize| {
        let raw = &command[at..at + FILE_NAME_LEN];
        String::from_utf8(raw[..raw.iter().position(|&b| b == 0).unwrap()].to_vec()).unwrap()
    };
    let u32_at = |command: &[u8], at: usize| u32::from_le_bytes(command[at..at + 4].try_into().unwrap());
    let mut next = [high_base, fseg_base];
    let mut placed: HashMap<String, (u64, Vec<u8>)> = HashMap::new();
    assert_eq!(loader.len() % COMMAND_LEN, 0);
    for command in loader.chunks(COMMAND_LEN) {
        match u32_at(command, 0) {
            ALLOCATE => {
                let name = name_at(command, 4);
                let align = u64::from(u32_at(command, 60));
                let zone = usize::from(command[64]) - 1;
                let data = files.iter().find(|(n, _)| *n == name).unwrap().1.to_vec();
                let address = next[zone].next_multiple_of(align);
                next[zone] = address + data.len() as u64;
                assert!(placed.insert(name, (address, data)).is_none(), "allocated twice");
            }
            ADD_POINTER => {
                let (destination, source) = (name_at(command, 4), name_at(command, 60));
                let (offset, size) = (u32_at(command, 116) as usize, usize::from(command[120]));
                let source_address = placed[&source].0;
                let data = &mut placed.get_mut(&destination).unwrap().1;
                let mut value = [0u8; 8];
                value[..size].copy_from_slice(&data[offset..offset + size]);
                let patched = u64::from_le_bytes(value) + source_address;
                data[offset..offset + size].copy_from_slice(&patched.to_le_bytes()[..size]);
            }
            ADD_CHECKSUM => {
                let name = name_at(command, 4);
                let (offset, start, length) =
                    (u32_at(command, 60) as usize, u32_at(command, 64) as usize, u32_at(command, 68) as usize);
                let data = &mut placed.get_mut(&name).unwrap().1;
                let sum = data[start..start + length].iter().fold(0u8, |a, b| a.wrapping_add(*b));
                data[offset] = data[offset].wrapping_sub(sum);
            }
            other => panic!("unknown command {other}"),
        }
    }
    placed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_128_bytes_with_their_fields_where_firmware_reads_them() {
        let mut loader = TableLoader::new();
        loader.allocate("etc/acpi/rsdp", 16, Zone::FSeg).unwrap();
        loader.add_pointer("etc/acpi/rsdp", 24, 8, "etc/acpi/tables").unwrap();
        loader.add_checksum("etc/acpi/rsdp", 8, 0, 20).unwrap();
        let bytes = loader.into_bytes();
        assert_eq!(bytes.len(), 3 * COMMAND_LEN);
        let (allocate, pointer, checksum) = (&bytes[..128], &bytes[128..256], &bytes[256..]);
        assert_eq!(&allocate[..4], &1u32.to_le_bytes());
        assert_eq!(&allocate[4..17], b"etc/acpi/rsdp");
        assert!(allocate[17..60].iter().all(|&b| b == 0));
        assert_eq!(&allocate[60..64], &16u32.to_le_bytes());
        assert_eq!(allocate[64], 2);
        assert_eq!(&pointer[..4], &2u32.to_le_bytes());
        assert_eq!(&pointer[60..75], b"etc/acpi/tables");
        assert_eq!(&pointer[116..120], &24u32.to_le_bytes());
        assert_eq!(pointer[120], 8);
        assert_eq!(&checksum[..4], &3u32.to_le_bytes());
        assert_eq!(&checksum[60..72], &[8, 0, 0, 0, 0, 0, 0, 0, 20, 0, 0, 0]);
        assert!(checksum[72..].iter().all(|&b| b == 0));
    }

    #[test]
    fn bad_names_sizes_and_alignments_are_refused() {
        let mut loader = TableLoader::new();
        assert!(loader.allocate("", 16, Zone::High).is_err());
        assert!(loader.allocate(&"x".repeat(56), 16, Zone::High).is_err());
        assert!(loader.allocate("ok", 24, Zone::High).is_err());
        assert!(loader.add_pointer("a", 0, 3, "b").is_err());
        assert!(loader.add_checksum("a\0b", 0, 0, 1).is_err());
        assert!(loader.into_bytes().is_empty(), "nothing half-written");
    }

    #[test]
    fn a_firmware_running_the_commands_links_and_checksums_the_files() {
        let tables: Vec<u8> = vec![0x11, 0, 0, 0, 5, 0, 0, 0, 0];
        let pointer = [0u8; 8];
        let mut loader = TableLoader::new();
        loader.allocate("pointer", 16, Zone::FSeg).unwrap();
        loader.allocate("tables", 64, Zone::High).unwrap();
        loader.add_pointer("pointer", 0, 8, "tables").unwrap();
        loader.add_pointer("tables", 4, 4, "tables").unwrap();
        loader.add_checksum("tables", 8, 0, 9).unwrap();
        let placed = run_like_firmware(
            &loader.into_bytes(),
            &[("tables", &tables), ("pointer", &pointer)],
            0x0fff_0010,
            0xf_5000,
        );
        let (tables_at, tables) = &placed["tables"];
        assert_eq!(*tables_at, 0x0fff_0040);
        assert_eq!(u32::from_le_bytes(tables[4..8].try_into().unwrap()), 0x0fff_0045);
        assert_eq!(tables.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(placed["pointer"], (0xf_5000, 0x0fff_0040u64.to_le_bytes().to_vec()));
    }
}

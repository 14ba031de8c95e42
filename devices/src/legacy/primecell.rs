//! What the ARM PrimeCell peripherals (PL011, PL031, PL061) share: 32-bit registers that drivers may read or
//! write with narrower accesses, and the peripheral/PrimeCell ID registers at 0xfe0-0xffc that the AMBA bus reads
//! before binding a driver.

/// The eight ID registers' offsets: 0xfe0 to 0xffc, one byte of ID in each.
const ID_START: u64 = 0xfe0;
const ID_END: u64 = 0x1000;
/// Every PrimeCell's register window.
pub const WINDOW_SIZE: u64 = 0x1000;

/// The value of the ID register at `register` (a 4-byte aligned offset), if it is one.
pub fn id_register(ids: &[u8; 8], register: u64) -> Option<u32> {
    (ID_START..ID_END).contains(&register).then(|| u32::from(ids[((register - ID_START) / 4) as usize]))
}

/// A guest access split into the 32-bit register it falls in and where in it. None for accesses that straddle
/// two registers, are empty or wider than 4 bytes, or lie outside the window: those read as zero and are ignored
/// when written.
pub fn register_access(offset: u64, len: usize) -> Option<(u64, u32)> {
    let byte = (offset % 4) as usize;
    (offset < WINDOW_SIZE && (1..=4).contains(&len) && byte + len <= 4).then_some((offset - byte as u64, byte as u32))
}

/// Completes a guest read through `read_register`, which only ever sees 4-byte aligned register offsets inside
/// the window; odd accesses read as zero without reaching it.
pub fn read(offset: u64, data: &mut [u8], read_register: impl FnOnce(u64) -> u32) {
    match register_access(offset, data.len()) {
        Some((register, byte)) => reply(data, read_register(register), byte),
        None => data.fill(0),
    }
}

/// Completes a guest write through `write_register` (register offset, zero-extended value); odd accesses are
/// dropped without reaching it.
pub fn write(offset: u64, data: &[u8], write_register: impl FnOnce(u64, u32)) {
    if let Some((register, byte)) = register_access(offset, data.len()) {
        if let Some(value) = written_value(data, byte) {
            write_register(register, value);
        }
    }
}

/// Completes a read of `value`'s bytes starting at `byte`.
fn reply(data: &mut [u8], value: u32, byte: u32) {
    let bytes = (value >> (8 * byte)).to_le_bytes();
    data.copy_from_slice(&bytes[..data.len()]);
}

/// The value a write at the start of a register carries, zero-extended. Writes into the middle of a register
/// are not something Linux's drivers do; they are dropped rather than guessed at.
fn written_value(data: &[u8], byte: u32) -> Option<u32> {
    if byte != 0 {
        return None;
    }
    let mut bytes = [0u8; 4];
    bytes[..data.len()].copy_from_slice(data);
    Some(u32::from_le_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accesses_map_to_registers_and_odd_ones_to_nothing() {
        assert_eq!(register_access(0x18, 4), Some((0x18, 0)));
        assert_eq!(register_access(0x19, 1), Some((0x18, 1)));
        assert_eq!(register_access(0x1a, 2), Some((0x18, 2)));
        assert_eq!(register_access(0x1b, 2), None, "straddles two registers");
        assert_eq!(register_access(0x18, 8), None);
        assert_eq!(register_access(0x18, 0), None);
        assert_eq!(register_access(0xffc, 4), Some((0xffc, 0)));
        assert_eq!(register_access(0x1000, 4), None);
        assert_eq!(register_access(u64::MAX, 1), None);
    }

    #[test]
    fn narrow_reads_take_the_right_bytes() {
        let mut two = [0u8; 2];
        reply(&mut two, 0x1234_5678, 2);
        assert_eq!(two, [0x34, 0x12]);
        let mut one = [0u8; 1];
        reply(&mut one, 0x1234_5678, 1);
        assert_eq!(one, [0x56]);
        assert_eq!(written_value(&[0x41], 0), Some(0x41));
        assert_eq!(written_value(&[1, 2], 0), Some(0x201));
        assert_eq!(written_value(&[1], 1), None);
    }

    #[test]
    fn id_registers_hold_one_byte_each() {
        let ids = [1, 2, 3, 4, 5, 6, 7, 8];
        assert_eq!(id_register(&ids, 0xfe0), Some(1));
        assert_eq!(id_register(&ids, 0xffc), Some(8));
        assert_eq!(id_register(&ids, 0xfdc), None);
        assert_eq!(id_register(&ids, 0x1000), None);
    }
}

//! An ARM PL031 real-time clock: vm-superio's model (time from the host clock, offset by what the guest loads into
//! RTCLR), on the MMIO bus.
//!
//! vm-superio does not implement the match (alarm) interrupt: RTCMR is stored but never fires, so this device
//! has no interrupt line. Linux's rtc-pl031 binds and reads/sets the time without it; only wake alarms are missing.

use vm_superio::rtc_pl031::NoEvents;
use vm_superio::Rtc;

use super::primecell::{self, register_access};
use crate::BusDevice;

pub struct Pl031 {
    rtc: Rtc<NoEvents>,
}

impl Pl031 {
    pub fn new() -> Self {
        Pl031 { rtc: Rtc::new() }
    }
}

impl Default for Pl031 {
    fn default() -> Self {
        Pl031::new()
    }
}

impl BusDevice for Pl031 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        primecell::read(offset, data, |register| {
            // vm-superio leaves the buffer alone for write-only and reserved registers: they read as zero.
            let mut value = [0u8; 4];
            self.rtc.read(register as u16, &mut value);
            u32::from_le_bytes(value)
        });
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // rtc-pl031 writes whole registers; a partial write would load a garbled time.
        if let (Some((register, 0)), Ok(value)) = (register_access(offset, data.len()), <[u8; 4]>::try_from(data)) {
            self.rtc.write(register as u16, &value);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{SystemTime, UNIX_EPOCH};

    use super::*;

    const RTCDR: u64 = 0x0;
    const RTCLR: u64 = 0x8;
    const RTCIMSC: u64 = 0x10;

    fn read32(rtc: &mut Pl031, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        rtc.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn host_now() -> u32 {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as u32
    }

    #[test]
    fn id_registers_identify_a_pl031() {
        let mut rtc = Pl031::new();
        let ids: Vec<u32> = (0..8).map(|i| read32(&mut rtc, 0xfe0 + 4 * i)).collect();
        assert_eq!(ids, [0x31, 0x10, 0x04, 0x00, 0x0d, 0xf0, 0x05, 0xb1]);
    }

    #[test]
    fn counts_host_time_and_follows_a_loaded_time() {
        let mut rtc = Pl031::new();
        let before = host_now();
        let now = read32(&mut rtc, RTCDR);
        assert!(now >= before && now <= host_now(), "{now} vs {before}");
        rtc.write(RTCLR, &1_000_000u32.to_le_bytes());
        let loaded = read32(&mut rtc, RTCDR);
        assert!((1_000_000..1_000_002).contains(&loaded), "{loaded}");
        assert_eq!(read32(&mut rtc, RTCLR), 1_000_000);
    }

    #[test]
    fn hostile_offsets_and_sizes_are_harmless() {
        let mut rtc = Pl031::new();
        rtc.write(RTCLR, &[1, 2]);
        rtc.write(RTCLR + 1, &[1]);
        rtc.write(RTCLR, &[1; 8]);
        assert_eq!(read32(&mut rtc, RTCLR), 0, "partial or oversized writes load nothing");
        rtc.write(RTCIMSC, &1u32.to_le_bytes());
        let mut byte = [0xaa];
        rtc.read(RTCIMSC, &mut byte);
        assert_eq!(byte, [1]);
        for offset in [0x1c, 0x20, 0xfdc, 0xfff, 0x1000, u64::MAX] {
            let mut data = [0xaa; 4];
            rtc.read(offset, &mut data);
            rtc.write(offset, &data);
        }
        let mut data = [0xaa; 4];
        rtc.read(0x1000, &mut data);
        assert_eq!(data, [0; 4]);
    }
}

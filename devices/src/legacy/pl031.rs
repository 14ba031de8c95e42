//! An ARM PL031 real-time clock: vm-superio's model (time from the host clock, offset by what the guest loads into
//! RTCLR), on the MMIO bus.
//!
//! vm-superio does not implement the match (alarm) interrupt: RTCMR is stored but never fires, so this device
//! has no interrupt line. Linux's rtc-pl031 binds and reads/sets the time without it; only wake alarms are missing.

use serde::{Deserialize, Serialize};
use vm_superio::rtc_pl031::{NoEvents, RtcState};
use vm_superio::Rtc;

use super::primecell::{self, register_access};
use crate::{BusDevice, Persist, StateError};

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

/// The RTC as data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pl031State {
    /// RTCLR: the time the guest last loaded.
    pub load: u32,
    /// Seconds the guest's clock runs ahead of the host's: after a restore the guest's time goes on with the host's.
    pub offset_seconds: i64,
    /// RTCMR: the alarm time (stored, never matched).
    pub match_value: u32,
    /// RTCIMSC: bit 0 unmasks the match interrupt.
    pub interrupt_mask: u32,
    /// RTCRIS: the match interrupt's raw status; always 0, since matches are not emulated.
    pub raw_interrupt: u32,
}

const DEVICE: &str = "PL031";
/// A loaded time (u32) minus the host's (u32) lies strictly between these.
const OFFSET_LIMIT: i64 = 1 << 32;

impl Persist for Pl031 {
    type State = Pl031State;

    fn save(&self) -> Pl031State {
        let state = self.rtc.state();
        Pl031State {
            load: state.lr,
            offset_seconds: state.offset,
            match_value: state.mr,
            interrupt_mask: state.imsc,
            raw_interrupt: state.ris,
        }
    }

    fn restore(&mut self, state: &Pl031State) -> Result<(), StateError> {
        if state.offset_seconds <= -OFFSET_LIMIT || state.offset_seconds >= OFFSET_LIMIT {
            let problem = format!("{} s is more than a 32-bit clock can be off by", state.offset_seconds);
            return Err(StateError::new(DEVICE, "offset_seconds", problem));
        }
        if state.interrupt_mask & !1 != 0 {
            let problem = format!("{:#x}: only bit 0 exists", state.interrupt_mask);
            return Err(StateError::new(DEVICE, "interrupt_mask", problem));
        }
        if state.raw_interrupt != 0 {
            let problem = format!("{:#x}: the match interrupt is not emulated, so it never fires", state.raw_interrupt);
            return Err(StateError::new(DEVICE, "raw_interrupt", problem));
        }
        let rtc_state = RtcState {
            lr: state.load,
            offset: state.offset_seconds,
            mr: state.match_value,
            imsc: state.interrupt_mask,
            ris: state.raw_interrupt,
        };
        self.rtc = Rtc::from_state(&rtc_state, NoEvents);
        Ok(())
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
    use crate::persist::testing::{assert_refused, fuzz_restore, through_json};

    const RTCDR: u64 = 0x0;
    const RTCMR: u64 = 0x4;
    const RTCLR: u64 = 0x8;
    const RTCCR: u64 = 0xc;
    const RTCIMSC: u64 = 0x10;
    const RTCRIS: u64 = 0x14;
    const RTCMIS: u64 = 0x18;

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

    /// An RTC the guest set: a loaded time, an alarm, the alarm interrupt unmasked.
    fn used_rtc() -> Pl031 {
        let mut rtc = Pl031::new();
        rtc.write(RTCLR, &1_000_000u32.to_le_bytes());
        rtc.write(RTCMR, &1_000_600u32.to_le_bytes());
        rtc.write(RTCIMSC, &1u32.to_le_bytes());
        rtc
    }

    /// Every register but RTCDR (which ticks), then RTCDR.
    fn registers(rtc: &mut Pl031) -> (Vec<u32>, u32) {
        let fixed = [RTCMR, RTCLR, RTCCR, RTCIMSC, RTCRIS, RTCMIS].iter().map(|&r| read32(rtc, r)).collect();
        (fixed, read32(rtc, RTCDR))
    }

    #[test]
    fn state_round_trips_and_the_loaded_time_goes_on() {
        let mut rtc = used_rtc();
        let state = through_json(&rtc.save());
        let mut restored = Pl031::new();
        restored.restore(&state).unwrap();
        let (fixed, now) = registers(&mut rtc);
        let (restored_fixed, restored_now) = registers(&mut restored);
        assert_eq!(restored_fixed, fixed);
        assert_eq!(fixed, [1_000_600, 1_000_000, 1, 1, 0, 0]);
        assert!(restored_now.abs_diff(now) <= 1, "{restored_now} vs {now}: the same clock");
        assert!((1_000_000..1_000_010).contains(&restored_now), "{restored_now}");
        // The next accesses behave alike: the control register's reset clears the loaded time on both.
        for dev in [&mut rtc, &mut restored] {
            dev.write(RTCCR, &1u32.to_le_bytes());
            dev.write(RTCIMSC, &0u32.to_le_bytes());
        }
        assert_eq!(registers(&mut restored).0, registers(&mut rtc).0);
        assert!(read32(&mut restored, RTCDR).abs_diff(host_now()) <= 1, "back on host time");
    }

    #[test]
    fn hostile_states_are_refused() {
        let good = used_rtc().save();
        let mut target = Pl031::new();
        for offset_seconds in [1 << 32, -(1 << 32), i64::MAX, i64::MIN] {
            assert_refused(&mut target, &Pl031State { offset_seconds, ..good.clone() }, "offset_seconds");
        }
        assert_refused(&mut target, &Pl031State { interrupt_mask: 2, ..good.clone() }, "interrupt_mask");
        assert_refused(&mut target, &Pl031State { raw_interrupt: 1, ..good.clone() }, "raw_interrupt");
        target.restore(&Pl031State { offset_seconds: (1 << 32) - 1, load: u32::MAX, ..good }).unwrap();
        read32(&mut target, RTCDR);
    }

    #[test]
    fn mutated_states_never_panic() {
        let exercise = |rtc: &mut Pl031| {
            registers(rtc);
            rtc.write(RTCLR, &u32::MAX.to_le_bytes());
            registers(rtc);
        };
        let counts = fuzz_restore(Pl031::new, &used_rtc().save(), exercise, 2000);
        assert!(counts.refused > 0 && counts.loaded > 0, "{counts:?}");
    }
}

//! MC146818-compatible CMOS: the real-time clock (host time plus whatever offset the guest sets) and
//! battery-backed NVRAM, which survives guest resets because the device outlives them.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::bus::reply_byte;
use crate::{BusDevice, Persist, StateError};

/// Offsets within the range: index register (0x70; bit 7 is the NMI mask) and data register (0x71).
pub const INDEX_OFFSET: u64 = 0;
pub const DATA_OFFSET: u64 = 1;

const NVRAM_SIZE: usize = 128;
const INDEX_MASK: u8 = 0x7f;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

/// Register A: 32.768 kHz time base, 1024 Hz periodic rate; the update-in-progress bit is never set because
/// reads compute the time on the spot.
const REG_A_DEFAULT: u8 = 0x26;
/// Register B: 24-hour mode, BCD, no interrupts (what PC firmware leaves).
const REG_B_24H: u8 = 0x02;
const REG_B_BINARY: u8 = 0x04;
const REG_B_DEFAULT: u8 = REG_B_24H;
/// Register D: the battery is good.
const REG_D_VALID: u8 = 0x80;
/// In 12-hour mode, bit 7 of the hours register marks PM.
const HOUR_PM: u8 = 0x80;
/// Registers computed from the clock on each read: their NVRAM bytes are never used and stay zero.
const CLOCK_REGISTERS: [u8; 9] =
    [REG_SECONDS, REG_MINUTES, REG_HOURS, REG_WEEKDAY, REG_DAY, REG_MONTH, REG_YEAR, REG_C, REG_CENTURY];
/// More than the registers can express (year 25599, with a binary century of 255): a saved clock offset beyond
/// this is not one a guest set.
const MAX_OFFSET_SECONDS: i64 = 1 << 40;

pub type Clock = Box<dyn Fn() -> i64 + Send>;

pub struct Cmos {
    index: u8,
    nvram: [u8; NVRAM_SIZE],
    /// Seconds the guest's clock runs ahead of the host's (negative: behind).
    offset_seconds: i64,
    clock: Clock,
}

impl Cmos {
    /// A CMOS whose clock follows the host's real time.
    pub fn new() -> Self {
        Self::with_clock(Box::new(|| {
            SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
        }))
    }

    /// A CMOS reading seconds since the Unix epoch from `clock`.
    pub fn with_clock(clock: Clock) -> Self {
        let mut nvram = [0u8; NVRAM_SIZE];
        nvram[REG_A as usize] = REG_A_DEFAULT;
        nvram[REG_B as usize] = REG_B_DEFAULT;
        nvram[REG_D as usize] = REG_D_VALID;
        Cmos { index: 0, nvram, offset_seconds: 0, clock }
    }

    fn guest_time(&self) -> DateTime {
        DateTime::from_unix((self.clock)().saturating_add(self.offset_seconds))
    }

    fn encode(&self, value: u8) -> u8 {
        if self.nvram[REG_B as usize] & REG_B_BINARY != 0 {
            value
        } else {
            ((value / 10) << 4) | (value % 10)
        }
    }

    fn decode(&self, value: u8) -> u8 {
        if self.nvram[REG_B as usize] & REG_B_BINARY != 0 {
            value
        } else {
            (value >> 4) * 10 + (value & 0x0f)
        }
    }

    fn encode_hour(&self, hour: u8) -> u8 {
        if self.nvram[REG_B as usize] & REG_B_24H != 0 {
            return self.encode(hour);
        }
        let pm = if hour >= 12 { HOUR_PM } else { 0 };
        let hour12 = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.encode(hour12) | pm
    }

    fn decode_hour(&self, value: u8) -> u8 {
        if self.nvram[REG_B as usize] & REG_B_24H != 0 {
            return self.decode(value);
        }
        let hour12 = self.decode(value & !HOUR_PM) % 12;
        if value & HOUR_PM != 0 {
            hour12 + 12
        } else {
            hour12
        }
    }

    fn read_register(&mut self, index: u8) -> u8 {
        let now = self.guest_time();
        match index {
            REG_SECONDS => self.encode(now.second),
            REG_MINUTES => self.encode(now.minute),
            REG_HOURS => self.encode_hour(now.hour),
            REG_WEEKDAY => self.encode(now.weekday),
            REG_DAY => self.encode(now.day),
            REG_MONTH => self.encode(now.month),
            REG_YEAR => self.encode((now.year % 100) as u8),
            REG_CENTURY => self.encode((now.year / 100) as u8),
            // Interrupt flags clear when read; no RTC interrupt source is emulated, so they are always clear.
            REG_C => 0,
            _ => self.nvram[index as usize],
        }
    }

    fn write_register(&mut self, index: u8, value: u8) {
        let mut time = self.guest_time();
        let field = match index {
            REG_SECONDS => &mut time.second,
            REG_MINUTES => &mut time.minute,
            REG_HOURS => &mut time.hour,
            REG_DAY => &mut time.day,
            REG_MONTH => &mut time.month,
            REG_YEAR | REG_CENTURY => {
                let decoded = i64::from(self.decode(value));
                time.year = if index == REG_YEAR {
                    time.year - time.year % 100 + decoded
                } else {
                    decoded * 100 + time.year % 100
                };
                self.set_guest_time(&time);
                return;
            }
            REG_C | REG_D => return,
            REG_WEEKDAY => return, // derived from the date
            _ => {
                self.nvram[index as usize] = value;
                return;
            }
        };
        *field = if index == REG_HOURS { self.decode_hour(value) } else { self.decode(value) };
        self.set_guest_time(&time);
    }

    fn set_guest_time(&mut self, time: &DateTime) {
        if let Some(seconds) = time.to_unix() {
            self.offset_seconds = seconds - (self.clock)();
        }
    }
}

/// The CMOS as data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CmosState {
    /// The selected register (0x00-0x7f: the NMI-mask bit written with it is not part of the index).
    pub index: u8,
    /// All 128 bytes. The clock's registers are computed on each read, so their bytes are zero.
    pub nvram: Vec<u8>,
    /// Seconds the guest's clock runs ahead of the host's: after a restore the guest's time goes on with the host's,
    /// as a battery-backed RTC does while the machine is off.
    pub offset_seconds: i64,
}

const DEVICE: &str = "CMOS";

impl Persist for Cmos {
    type State = CmosState;

    fn save(&self) -> CmosState {
        CmosState { index: self.index, nvram: self.nvram.to_vec(), offset_seconds: self.offset_seconds }
    }

    fn restore(&mut self, state: &CmosState) -> Result<(), StateError> {
        if state.index > INDEX_MASK {
            let problem = format!("{:#x} is not a register (0x00-{INDEX_MASK:#x})", state.index);
            return Err(StateError::new(DEVICE, "index", problem));
        }
        let nvram = <[u8; NVRAM_SIZE]>::try_from(state.nvram.as_slice())
            .map_err(|_| StateError::new(DEVICE, "nvram", format!("{} bytes, not {NVRAM_SIZE}", state.nvram.len())))?;
        if let Some(&register) = CLOCK_REGISTERS.iter().find(|&&r| nvram[r as usize] != 0) {
            let problem = format!(
                "{:#x} in a clock register, which reads from the clock and is stored as 0",
                nvram[register as usize]
            );
            return Err(StateError::new(DEVICE, format!("nvram[{register:#04x}]"), problem));
        }
        if nvram[REG_D as usize] != REG_D_VALID {
            let problem = format!("register D holds {:#x}; it always reads {REG_D_VALID:#x}", nvram[REG_D as usize]);
            return Err(StateError::new(DEVICE, format!("nvram[{REG_D:#04x}]"), problem));
        }
        if state.offset_seconds.unsigned_abs() > MAX_OFFSET_SECONDS as u64 {
            let problem = format!("{} s is more than the clock's registers can hold", state.offset_seconds);
            return Err(StateError::new(DEVICE, "offset_seconds", problem));
        }
        self.index = state.index;
        self.nvram = nvram;
        self.offset_seconds = state.offset_seconds;
        Ok(())
    }
}

impl Default for Cmos {
    fn default() -> Self {
        Self::new()
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            INDEX_OFFSET => self.index,
            DATA_OFFSET => self.read_register(self.index),
            _ => 0xff,
        };
        reply_byte(data, value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            INDEX_OFFSET => self.index = value & INDEX_MASK,
            DATA_OFFSET => self.write_register(self.index, value),
            _ => {}
        }
    }
}

/// A broken-down UTC time as the RTC registers hold it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DateTime {
    year: i64,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
    /// 1 = Sunday ... 7 = Saturday.
    weekday: u8,
}

impl DateTime {
    fn from_unix(seconds: i64) -> Self {
        let days = seconds.div_euclid(86_400);
        let second_of_day = seconds.rem_euclid(86_400);
        let (year, month, day) = civil_from_days(days);
        DateTime {
            year,
            month,
            day,
            hour: (second_of_day / 3600) as u8,
            minute: (second_of_day / 60 % 60) as u8,
            second: (second_of_day % 60) as u8,
            // 1970-01-01 was a Thursday (5 in RTC numbering).
            weekday: ((days + 4).rem_euclid(7) + 1) as u8,
        }
    }

    /// None when the guest wrote fields that name no real time (month 13, minute 99, ...).
    fn to_unix(self) -> Option<i64> {
        let valid = (1..=12).contains(&self.month)
            && (1..=days_in_month(self.year, self.month)).contains(&self.day)
            && self.hour < 24
            && self.minute < 60
            && self.second < 60;
        valid.then(|| {
            days_from_civil(self.year, self.month, self.day) * 86_400
                + i64::from(self.hour) * 3600
                + i64::from(self.minute) * 60
                + i64::from(self.second)
        })
    }
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: u8) -> u8 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (eras of 400 years, March-based years).
fn days_from_civil(year: i64, month: u8, day: u8) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let m = i64::from(month);
    let day_of_year = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::sync::Arc;

    use super::*;
    use crate::persist::testing::{assert_refused, fuzz_restore, through_json};

    /// 2026-11-22 13:45:07 UTC, a Sunday.
    const SUNDAY_AFTERNOON: i64 = 1_795_355_107;

    fn cmos_at(seconds: i64) -> (Cmos, Arc<AtomicI64>) {
        let now = Arc::new(AtomicI64::new(seconds));
        let clock = now.clone();
        (Cmos::with_clock(Box::new(move || clock.load(Ordering::SeqCst))), now)
    }

    fn get(cmos: &mut Cmos, index: u8) -> u8 {
        cmos.write(INDEX_OFFSET, &[index]);
        let mut b = [0];
        cmos.read(DATA_OFFSET, &mut b);
        b[0]
    }

    fn set(cmos: &mut Cmos, index: u8, value: u8) {
        cmos.write(INDEX_OFFSET, &[index]);
        cmos.write(DATA_OFFSET, &[value]);
    }

    #[test]
    fn time_reads_in_bcd_by_default() {
        let (mut cmos, _) = cmos_at(SUNDAY_AFTERNOON);
        let fields: Vec<u8> = [REG_CENTURY, REG_YEAR, REG_MONTH, REG_DAY, REG_HOURS, REG_MINUTES, REG_SECONDS]
            .iter()
            .map(|&r| get(&mut cmos, r))
            .collect();
        assert_eq!(fields, vec![0x20, 0x26, 0x11, 0x22, 0x13, 0x45, 0x07]);
        assert_eq!(get(&mut cmos, REG_WEEKDAY), 1, "Sunday");
        assert_eq!(get(&mut cmos, REG_D), REG_D_VALID);
    }

    #[test]
    fn binary_and_12_hour_modes() {
        let (mut cmos, _) = cmos_at(SUNDAY_AFTERNOON);
        set(&mut cmos, REG_B, REG_B_BINARY);
        assert_eq!(get(&mut cmos, REG_MINUTES), 45);
        assert_eq!(get(&mut cmos, REG_HOURS), 1 | HOUR_PM);
    }

    #[test]
    fn clock_follows_the_host_and_guest_settings_persist() {
        let (mut cmos, now) = cmos_at(SUNDAY_AFTERNOON);
        now.fetch_add(10, Ordering::SeqCst);
        assert_eq!(get(&mut cmos, REG_SECONDS), 0x17);
        set(&mut cmos, REG_HOURS, 0x08);
        assert_eq!(get(&mut cmos, REG_HOURS), 0x08);
        now.fetch_add(3600, Ordering::SeqCst);
        assert_eq!(get(&mut cmos, REG_HOURS), 0x09, "the guest's setting keeps ticking");
        assert_eq!(get(&mut cmos, REG_MINUTES), 0x45);
    }

    #[test]
    fn impossible_dates_from_the_guest_are_ignored() {
        let (mut cmos, _) = cmos_at(SUNDAY_AFTERNOON);
        set(&mut cmos, REG_MONTH, 0x13);
        set(&mut cmos, REG_MINUTES, 0x99);
        assert_eq!(get(&mut cmos, REG_MONTH), 0x11);
        assert_eq!(get(&mut cmos, REG_MINUTES), 0x45);
    }

    #[test]
    fn nvram_keeps_what_the_guest_stores_and_the_index_ignores_the_nmi_bit() {
        let (mut cmos, _) = cmos_at(0);
        set(&mut cmos, 0x80 | 0x40, 7);
        assert_eq!(get(&mut cmos, 0x40), 7);
        assert_eq!(get(&mut cmos, 0x7f), 0);
    }

    #[test]
    fn calendar_conversions_agree() {
        for days in [-800_000i64, -1, 0, 59, 11_016, 20_000, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(DateTime::from_unix(SUNDAY_AFTERNOON).to_unix(), Some(SUNDAY_AFTERNOON));
    }

    /// The index register, then every register through the data port, as a guest reads them.
    fn all_registers(cmos: &mut Cmos) -> Vec<u8> {
        let mut index = [0];
        cmos.read(INDEX_OFFSET, &mut index);
        index.into_iter().chain((0..=INDEX_MASK).map(|r| get(cmos, r))).collect()
    }

    /// A CMOS the guest has used: binary 24-hour mode, its own time and date, NVRAM bytes, an index selected.
    fn used_cmos() -> (Cmos, Arc<AtomicI64>) {
        let (mut cmos, now) = cmos_at(SUNDAY_AFTERNOON);
        set(&mut cmos, REG_B, REG_B_BINARY | REG_B_24H);
        set(&mut cmos, REG_HOURS, 3);
        set(&mut cmos, REG_YEAR, 99);
        set(&mut cmos, 0x01, 0x30); // alarm seconds: plain NVRAM here
        set(&mut cmos, 0x40, 0x5a);
        set(&mut cmos, 0x7f, 0xa5);
        cmos.write(INDEX_OFFSET, &[0x80 | 0x41]);
        (cmos, now)
    }

    #[test]
    fn state_round_trips_and_the_clock_goes_on_with_the_host() {
        let (mut cmos, now) = used_cmos();
        let state = through_json(&cmos.save());
        assert_eq!(state.index, 0x41);
        // Restored an hour later in a new process: a fresh device on a fresh clock.
        let (mut restored, _) = cmos_at(SUNDAY_AFTERNOON + 3600);
        restored.restore(&state).unwrap();
        now.store(SUNDAY_AFTERNOON + 3600, Ordering::SeqCst);
        let expected = all_registers(&mut cmos);
        assert_eq!(all_registers(&mut restored), expected);
        assert_eq!((get(&mut restored, REG_YEAR), get(&mut restored, REG_HOURS)), (99, 4), "an hour went by");
        assert_eq!((get(&mut restored, 0x40), get(&mut restored, 0x7f)), (0x5a, 0xa5));
        let (mut fresh, _) = cmos_at(SUNDAY_AFTERNOON + 3600);
        assert_ne!(all_registers(&mut fresh), expected, "the comparison sees the difference");
        // The next accesses behave alike: back to BCD, a new minute, an NVRAM byte.
        for dev in [&mut cmos, &mut restored] {
            set(dev, REG_B, REG_B_24H);
            set(dev, REG_MINUTES, 0x12);
            set(dev, 0x22, 0x33);
        }
        assert_eq!(all_registers(&mut restored), all_registers(&mut cmos));
        assert_eq!(get(&mut restored, REG_MINUTES), 0x12);
    }

    #[test]
    fn hostile_states_are_refused() {
        let (cmos, _) = used_cmos();
        let good = cmos.save();
        let (mut target, _) = cmos_at(SUNDAY_AFTERNOON);
        let bad = |change: fn(&mut CmosState)| {
            let mut state = good.clone();
            change(&mut state);
            state
        };
        assert_refused(&mut target, &bad(|s| s.index = 0x80), "index");
        assert_refused(&mut target, &bad(|s| s.nvram.truncate(127)), "nvram");
        assert_refused(&mut target, &bad(|s| s.nvram.push(0)), "nvram");
        assert_refused(&mut target, &bad(|s| s.nvram.clear()), "nvram");
        assert_refused(&mut target, &bad(|s| s.nvram[REG_SECONDS as usize] = 0x59), "nvram[0x00]");
        assert_refused(&mut target, &bad(|s| s.nvram[REG_CENTURY as usize] = 0x20), "nvram[0x32]");
        assert_refused(&mut target, &bad(|s| s.nvram[REG_D as usize] = 0), "nvram[0x0d]");
        assert_refused(&mut target, &bad(|s| s.offset_seconds = i64::MAX), "offset_seconds");
        assert_refused(&mut target, &bad(|s| s.offset_seconds = i64::MIN), "offset_seconds");
        assert_refused(&mut target, &bad(|s| s.offset_seconds = MAX_OFFSET_SECONDS + 1), "offset_seconds");
        target.restore(&bad(|s| s.offset_seconds = -MAX_OFFSET_SECONDS)).unwrap();
        let unknown = r#"{"index":0,"nvram":[],"offset_seconds":0,"alarm":1}"#;
        assert!(serde_json::from_str::<CmosState>(unknown).is_err(), "fields from elsewhere are refused");
    }

    #[test]
    fn mutated_states_never_panic() {
        let (cmos, _) = used_cmos();
        let counts = fuzz_restore(
            || cmos_at(SUNDAY_AFTERNOON).0,
            &cmos.save(),
            |dev| {
                all_registers(dev);
                for register in [REG_SECONDS, REG_HOURS, REG_DAY, REG_YEAR, REG_CENTURY] {
                    set(dev, register, 0x99);
                    set(dev, register, 0xff);
                }
                all_registers(dev);
            },
            2000,
        );
        assert!(counts.refused > 0 && counts.loaded > 0, "{counts:?}");
    }
}

//! Device state as data: what a snapshot or a migration carries for each stateful component.
//!
//! # The contract
//!
//! A component implements [`Persist`]: its guest-visible state is a plain `State` struct (serde, no file
//! descriptors, locks or host handles) that [`save`](Persist::save) copies out and
//! [`restore`](Persist::restore) loads into a device that was built by its ordinary constructor, with the
//! resources that constructor takes (interrupt lines, platform events, clocks, backing objects).
//!
//! Restore works in place rather than building the device (Firecracker's `restore(args, &state) -> Self`) because:
//! * QEMU's `-incoming` starts the destination from the same command line: Kestrel builds the machine exactly as
//!   for a cold boot (buses, irqfds, BAR placement, ioeventfds) and then loads state into it, so there is one
//!   construction and wiring path, not a second one for restores that could drift from it;
//! * the device already holds its configuration (MSI-X vector count, BAR sizes, PCI identity, sleep types) and
//!   checks the state against it: a snapshot taken with another command line is refused, as QEMU refuses it;
//! * devices outlive guest resets here (CMOS NVRAM, the PCI functions), so loading state into a live object is the
//!   shape they already have.
//!
//! Rules every implementation keeps:
//! * **A state is outside input.** Anything a snapshot file can hold is checked: indices, lengths, register
//!   values no guest could have produced, a table size that disagrees with the device's. A bad value is a
//!   [`StateError`] naming the device and the field, never a panic and never a device running on it.
//! * **All or nothing.** `restore` checks everything before it changes anything: on `Err` the device is exactly as
//!   it was. A component made of parts restores the parts into scratch copies and swaps them in once all succeed.
//! * **No side effects.** `restore` raises no interrupt and makes no platform request. What was in flight at save
//!   time lives in the interrupt controller's own state; a level that is still asserted is raised again by the
//!   usual resample after the guest's EOI, as it would have been without the snapshot.
//! * **Derived values are not saved**: an interrupt level that follows from status and enable bits, BAR routing that
//!   follows from configuration space. Restore recomputes them, so they cannot disagree with what they derive from.
//! * States refuse fields they do not know (`deny_unknown_fields`): a state from a newer Kestrel is not loaded
//!   with parts of it silently dropped. Versions belong to the snapshot format's sections, one per component.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A component whose guest-visible state can be saved as data and loaded back.
pub trait Persist {
    /// The state as plain data.
    type State: Serialize + DeserializeOwned;

    /// A copy of the current state. Takes no lock beyond the caller's and has no effect on the device.
    fn save(&self) -> Self::State;

    /// Loads `state`, checked first against what it may hold and against this device's configuration. On `Err`
    /// nothing has changed.
    fn restore(&mut self, state: &Self::State) -> Result<(), StateError>;
}

/// A state that cannot be loaded: which device, which field and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid {device} state: {field}: {problem}")]
pub struct StateError {
    pub device: &'static str,
    pub field: String,
    pub problem: String,
}

impl StateError {
    pub fn new(device: &'static str, field: impl Into<String>, problem: impl Into<String>) -> Self {
        StateError { device, field: field.into(), problem: problem.into() }
    }
}

/// Helpers for the per-device tests: a JSON round trip and a mutation fuzzer for states.
#[cfg(test)]
pub(crate) mod testing {
    use std::fmt::Debug;

    use serde_json::Value;

    use super::*;

    /// The state through serde_json and back, as it would go through a file.
    pub fn through_json<S: Serialize + DeserializeOwned>(state: &S) -> S {
        let text = serde_json::to_string(state).expect("a state serialises");
        serde_json::from_str(&text).expect("a saved state deserialises")
    }

    /// Asserts that restoring `state` fails with an error about `field`, and leaves `device` as it was.
    pub fn assert_refused<D>(device: &mut D, state: &D::State, field: &str)
    where
        D: Persist,
        D::State: PartialEq + Debug,
    {
        let before = device.save();
        let error = device.restore(state).expect_err(&format!("a state with a bad {field} is refused"));
        assert!(error.field.contains(field), "error names {field}: {error}");
        assert!(!error.problem.is_empty());
        assert_eq!(device.save(), before, "a refused state changes nothing ({error})");
    }

    /// A small fixed-seed PRNG (xorshift64*), so failures reproduce.
    pub struct Prng(u64);

    impl Prng {
        pub fn new(seed: u64) -> Self {
            Prng(seed.max(1))
        }

        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        pub fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    /// Numbers a hostile or corrupted state likes to hold.
    const EDGES: [i128; 14] = [
        0,
        1,
        -1,
        0x7f,
        0x80,
        0xff,
        0x100,
        0xffff,
        0x1_0000,
        u32::MAX as i128,
        1 << 32,
        i64::MAX as i128,
        i64::MIN as i128,
        u64::MAX as i128,
    ];

    fn number(value: i128) -> Value {
        match u64::try_from(value) {
            Ok(v) => Value::from(v),
            Err(_) => Value::from(value as i64),
        }
    }

    /// One random change somewhere in `value`: a number replaced (edge value, random byte, flipped bit), a bool
    /// flipped, a null filled or an option emptied, an array grown or shrunk, a field dropped or added.
    fn mutate(value: &mut Value, rng: &mut Prng) {
        match value {
            Value::Number(n) => {
                let old = n.as_i64().map(i128::from).or(n.as_u64().map(i128::from)).unwrap_or(0);
                *value = match rng.below(3) {
                    0 => number(EDGES[rng.below(EDGES.len())]),
                    1 => number(rng.below(256) as i128),
                    _ => number(old ^ (1 << rng.below(64))),
                };
            }
            Value::Bool(b) => *b = !*b,
            Value::Null => *value = number(rng.below(256) as i128),
            Value::String(_) => *value = Value::Null,
            Value::Array(items) => match rng.below(8) {
                0 if !items.is_empty() => {
                    items.pop();
                }
                1 if !items.is_empty() => items.push(items[rng.below(items.len())].clone()),
                2 => *value = Value::Null,
                _ if !items.is_empty() => {
                    let i = rng.below(items.len());
                    mutate(&mut items[i], rng)
                }
                _ => items.push(number(0)),
            },
            Value::Object(fields) => match rng.below(12) {
                0 if !fields.is_empty() => {
                    let key = fields.keys().nth(rng.below(fields.len())).cloned().unwrap_or_default();
                    fields.remove(&key);
                }
                1 => {
                    fields.insert("unknown_field".into(), number(1));
                }
                _ if !fields.is_empty() => {
                    let i = rng.below(fields.len());
                    if let Some(field) = fields.values_mut().nth(i) {
                        mutate(field, rng)
                    }
                }
                _ => {}
            },
        }
    }

    /// What a fuzz run saw: mutated states serde refused, states restore refused, states it loaded.
    #[derive(Debug, Default)]
    pub struct FuzzCounts {
        pub unparsable: usize,
        pub refused: usize,
        pub loaded: usize,
    }

    /// Mutates `state` at random `rounds` times (one to three changes each) and restores each mutant that still
    /// deserialises into a fresh device: restore must not panic, a refusal must leave the device as it was, and a
    /// loaded device must survive `exercise` (guest accesses) and save a state that loads again.
    pub fn fuzz_restore<D>(
        fresh: impl Fn() -> D,
        state: &D::State,
        exercise: impl Fn(&mut D),
        rounds: usize,
    ) -> FuzzCounts
    where
        D: Persist,
        D::State: PartialEq + Debug,
    {
        let original = serde_json::to_value(state).expect("a state serialises");
        let mut rng = Prng::new(0x6b65_7374_7265_6c21);
        let mut counts = FuzzCounts::default();
        for _ in 0..rounds {
            let mut mutant = original.clone();
            for _ in 0..=rng.below(3) {
                mutate(&mut mutant, &mut rng);
            }
            let Ok(mutant) = serde_json::from_value::<D::State>(mutant) else {
                counts.unparsable += 1;
                continue;
            };
            let mut device = fresh();
            let before = device.save();
            match device.restore(&mutant) {
                Err(error) => {
                    assert_eq!(device.save(), before, "refused ({error}) yet changed");
                    counts.refused += 1;
                }
                Ok(()) => {
                    exercise(&mut device);
                    let again = device.save();
                    fresh().restore(&again).expect("what a loaded device saves loads again");
                    counts.loaded += 1;
                }
            }
        }
        counts
    }

    #[test]
    fn the_prng_is_fixed_and_spreads() {
        let mut a = Prng::new(7);
        let mut b = Prng::new(7);
        let first: Vec<u64> = (0..4).map(|_| a.next()).collect();
        assert_eq!(first, (0..4).map(|_| b.next()).collect::<Vec<_>>());
        let mut seen = [false; 16];
        for _ in 0..200 {
            seen[a.below(16)] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn state_errors_say_what_is_wrong() {
        let error = StateError::new("CMOS", "index", "0x80 is not a register");
        assert_eq!(error.to_string(), "invalid CMOS state: index: 0x80 is not a register");
    }
}

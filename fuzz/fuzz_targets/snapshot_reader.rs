//! The snapshot reader: arbitrary bytes opened as a snapshot of the fixture's machine, with the checksums checked
//! and again without them (so mutations reach the parsing behind them), then every state and the guest's pages
//! read. The body (`snapshot::testing::fuzz_read`) also runs under `cargo test` over the format-version-1 fixture
//! cut short and damaged throughout; ci/fuzz seeds libFuzzer with that fixture (tests/fixtures).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    snapshot::testing::fuzz_read(data);
});

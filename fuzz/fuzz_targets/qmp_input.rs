//! The QMP input path: arbitrary bytes, split into feeds at points chosen by the first byte, into a negotiating
//! session with a fake machine. The body (`qmp::testing::fuzz_one`) also runs under `cargo test` over a fixed
//! corpus (qmp/tests/protocol.rs, `fuzz_smoke_corpus`), so the checks hold without a nightly toolchain.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    qmp::testing::fuzz_one(data);
});

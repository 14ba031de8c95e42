//! A multiport virtio-console's queues: arbitrary bytes as guest memory holding the control queues' and a named
//! port's rings, chains and buffers, served by the device while host input arrives and the host side comes and goes.
//! The body (`devices::virtio::testing::fuzz_console_queues`) also runs under `cargo test` over a fixed corpus.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    devices::virtio::testing::fuzz_console_queues(data);
});

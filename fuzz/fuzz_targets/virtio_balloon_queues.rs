//! virtio-balloon's queues: arbitrary bytes as guest memory holding the inflate, deflate and statistics queues'
//! rings, chains and frame numbers, served by the device (guest memory given back included) and polled once. The
//! body (`devices::virtio::testing::fuzz_balloon_queues`) also runs under `cargo test` over a fixed corpus.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    devices::virtio::testing::fuzz_balloon_queues(data);
});

//! virtio-net's queues: arbitrary bytes as guest memory holding the receive and transmit queues' rings, chains and
//! buffers, served by the device against a host that sends two frames. The body (`devices::virtio::testing::
//! fuzz_net_queues`) also runs under `cargo test` over a fixed corpus.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    devices::virtio::testing::fuzz_net_queues(data);
});

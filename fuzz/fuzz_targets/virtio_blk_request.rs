//! The virtio-blk request parser and executor: arbitrary bytes as guest memory holding a virtqueue and its
//! requests, served against an in-memory disk image. The body (`devices::virtio::testing::fuzz_blk_request`) also
//! runs under `cargo test` over a fixed corpus.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    devices::virtio::testing::fuzz_blk_request(data);
});

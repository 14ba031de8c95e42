//! Descriptor-chain parsing: arbitrary bytes as guest memory holding a virtqueue's rings, indirect tables and
//! buffers, parsed chain by chain and then served by a device. The body (`devices::virtio::testing::
//! fuzz_descriptor_chain`) also runs under `cargo test` over a fixed corpus.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    devices::virtio::testing::fuzz_descriptor_chain(data);
});

//! Opening a qcow2 image: arbitrary bytes as the image file, opened as virtio-blk opens one (Kestrel's header
//! checks, imago, the backing chain it names), read-only and writable, then read and written. The body
//! (`devices::virtio::testing::fuzz_qcow2_open`) also runs under `cargo test` over a mutated hand-made image.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    devices::virtio::testing::fuzz_qcow2_open(data);
});

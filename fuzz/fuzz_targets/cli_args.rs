//! The command line: arbitrary bytes split on NUL into arguments (native `--options`, QEMU's `-options` with their
//! key=value lists, libvirt's JSON `-device '{...}'`), parsed as `kestrel` parses its own. The body
//! (`vmm::cli::fuzz_args`) also runs under `cargo test` over a fixed corpus (`cli::tests::fuzz_smoke_corpus`), so
//! the checks hold without a nightly toolchain.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vmm::cli::fuzz_args(data);
});

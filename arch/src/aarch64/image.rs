//! The arm64 Linux `Image` format (Documentation/arch/arm64/booting.rst): a raw kernel with a 64-byte header.
//!
//! Written here rather than taken from linux-loader, whose PE loader only builds on aarch64: this way the parser
//! and its tests run on every host. The EFI stub's PE header that Debian's Image carries sits inside the same
//! bytes (its "MZ" is `code0`) and needs no handling: Linux entered directly ignores it.

use std::io::SeekFrom;

use vm_memory::GuestMemoryBackend;

use super::{BootSource, Error, Result};

pub const HEADER_SIZE: usize = 64;
/// "ARM\x64", little-endian, at byte 0x38.
pub const IMAGE_MAGIC: u32 = 0x644d_5241;
const MAGIC_OFFSET: usize = 0x38;
const TEXT_OFFSET_OFFSET: usize = 0x08;
const IMAGE_SIZE_OFFSET: usize = 0x10;
const FLAGS_OFFSET: usize = 0x18;
/// Bit 0 of `flags`: the kernel is big-endian.
const FLAG_BIG_ENDIAN: u64 = 1;
/// Kernels older than 3.17 leave image_size zero; booting.rst says to assume this text_offset for them.
const LEGACY_TEXT_OFFSET: u64 = 0x8_0000;

/// What the header says about the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageHeader {
    /// Offset of the kernel's first byte above a 2 MiB aligned base.
    pub text_offset: u64,
    /// Bytes the kernel occupies once running, bss included; zero for kernels before 3.17.
    pub image_size: u64,
    pub flags: u64,
}

impl ImageHeader {
    pub fn parse(header: &[u8; HEADER_SIZE]) -> Result<Self> {
        let u64_at = |at: usize| {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&header[at..at + 8]);
            u64::from_le_bytes(bytes)
        };
        let mut magic = [0u8; 4];
        magic.copy_from_slice(&header[MAGIC_OFFSET..MAGIC_OFFSET + 4]);
        if u32::from_le_bytes(magic) != IMAGE_MAGIC {
            return Err(Error::Kernel("not an arm64 Linux Image (no \"ARM\\x64\" magic at byte 0x38)".into()));
        }
        let image_size = u64_at(IMAGE_SIZE_OFFSET);
        let (text_offset, flags) =
            if image_size == 0 { (LEGACY_TEXT_OFFSET, 0) } else { (u64_at(TEXT_OFFSET_OFFSET), u64_at(FLAGS_OFFSET)) };
        if flags & FLAG_BIG_ENDIAN != 0 {
            return Err(Error::Kernel("big-endian arm64 kernels are not supported".into()));
        }
        if text_offset >= super::layout::KERNEL_ALIGNMENT {
            return Err(Error::Kernel(format!("text_offset {text_offset:#x} is not below 2 MiB: a corrupt header")));
        }
        Ok(ImageHeader { text_offset, image_size, flags })
    }

    /// Bytes to reserve for a kernel whose file is `file_size` bytes long: image_size covers bss, the file does
    /// not; a pre-3.17 kernel only tells us its file size.
    pub fn memory_footprint(&self, file_size: u64) -> u64 {
        self.image_size.max(file_size)
    }
}

/// Reads the header and the file's size.
pub fn read_header(file: &mut dyn BootSource) -> Result<(ImageHeader, u64)> {
    let size = file.seek(SeekFrom::End(0)).map_err(|e| Error::Kernel(format!("cannot determine its size: {e}")))?;
    if size < HEADER_SIZE as u64 {
        return Err(Error::Kernel(format!("{size} bytes are too short for an arm64 Image")));
    }
    let mut header = [0u8; HEADER_SIZE];
    file.rewind()
        .and_then(|_| file.read_exact(&mut header))
        .map_err(|e| Error::Kernel(format!("cannot read its header: {e}")))?;
    Ok((ImageHeader::parse(&header)?, size))
}

/// Copies the whole file to `load_addr`; guest memory must hold all of it.
pub fn load<M: GuestMemoryBackend>(mem: &M, file: &mut dyn BootSource, load_addr: u64, file_size: u64) -> Result<()> {
    super::copy_to_guest(mem, file, load_addr, file_size).map_err(Error::Kernel)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::Cursor;

    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;

    /// A minimal Image: a header as Linux 6.x writes it, then `body`.
    pub(crate) fn image(text_offset: u64, image_size: u64, flags: u64, body: &[u8]) -> Vec<u8> {
        let mut bytes = vec![0u8; HEADER_SIZE];
        bytes[0..2].copy_from_slice(b"MZ");
        bytes[TEXT_OFFSET_OFFSET..TEXT_OFFSET_OFFSET + 8].copy_from_slice(&text_offset.to_le_bytes());
        bytes[IMAGE_SIZE_OFFSET..IMAGE_SIZE_OFFSET + 8].copy_from_slice(&image_size.to_le_bytes());
        bytes[FLAGS_OFFSET..FLAGS_OFFSET + 8].copy_from_slice(&flags.to_le_bytes());
        bytes[MAGIC_OFFSET..MAGIC_OFFSET + 4].copy_from_slice(b"ARM\x64");
        bytes.extend_from_slice(body);
        bytes
    }

    #[test]
    fn parses_a_modern_header() {
        let (header, size) = read_header(&mut Cursor::new(image(0, 0x20_0000, 0b1010, b"body"))).unwrap();
        assert_eq!(header, ImageHeader { text_offset: 0, image_size: 0x20_0000, flags: 0b1010 });
        assert_eq!(size, 68);
        assert_eq!(header.memory_footprint(size), 0x20_0000);
    }

    #[test]
    fn a_zero_image_size_means_an_old_kernel_at_0x80000() {
        let (header, size) = read_header(&mut Cursor::new(image(0x1234, 0, 1, &[0; 100]))).unwrap();
        assert_eq!(header.text_offset, 0x8_0000, "text_offset and flags are not valid before 3.17");
        assert_eq!(header.memory_footprint(size), 164);
    }

    #[test]
    fn refuses_what_is_not_a_little_endian_image() {
        let err = |bytes: Vec<u8>| read_header(&mut Cursor::new(bytes)).unwrap_err().to_string();
        assert!(err(vec![0; 63]).contains("too short"));
        let mut no_magic = image(0, 4096, 0, &[]);
        no_magic[MAGIC_OFFSET] = b'X';
        assert!(err(no_magic).contains("magic"));
        assert!(err(image(0, 4096, 1, &[])).contains("big-endian"));
        assert!(err(image(2 << 20, 4096, 0, &[])).contains("text_offset"));
    }

    #[test]
    fn loads_the_whole_file_and_refuses_to_run_past_ram() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x4000_0000), 0x10_0000)]).unwrap();
        let bytes = image(0, 4096, 0, b"kernel text");
        load(&mem, &mut Cursor::new(bytes.clone()), 0x4000_0000, bytes.len() as u64).unwrap();
        let mut back = vec![0u8; bytes.len()];
        mem.read_slice(&mut back, GuestAddress(0x4000_0000)).unwrap();
        assert_eq!(back, bytes);
        let near_end = 0x4000_0000 + 0x10_0000 - 8;
        let err = load(&mem, &mut Cursor::new(bytes.clone()), near_end, bytes.len() as u64).unwrap_err();
        assert!(err.to_string().contains("do not fit in guest RAM"), "{err}");
        assert!(load(&mem, &mut Cursor::new(bytes), 0, 64).is_err(), "below RAM");
    }
}

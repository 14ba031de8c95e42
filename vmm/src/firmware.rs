//! A firmware image (`-bios`), read once into host memory of its own that every VM of the machine maps read-only:
//! the guest cannot change it, so each reset starts the same firmware.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use vm_memory::{MmapRegion, VolatileMemory};

use crate::Error;

/// No architecture maps a larger image (arm64's flash banks are 64 MiB); the platform has its own, tighter rules.
const MAX_FIRMWARE_BYTES: u64 = 64 << 20;

/// The image's bytes, and a copy in host memory of its own (vm-memory's anonymous, page-aligned mapping) for the
/// hypervisor memory slot that maps it.
pub struct FirmwareImage {
    path: PathBuf,
    bytes: Vec<u8>,
    mapping: MmapRegion,
}

impl FirmwareImage {
    /// Reads the image at `path`: a regular file, neither empty nor larger than any architecture maps.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let invalid = |reason: String| Error::Firmware { path: path.to_path_buf(), reason };
        let mut file = File::open(path).map_err(|e| invalid(e.to_string()))?;
        let metadata = file.metadata().map_err(|e| invalid(e.to_string()))?;
        if !metadata.is_file() {
            return Err(invalid("not a regular file".into()));
        }
        match metadata.len() {
            0 => return Err(invalid("the image is empty".into())),
            len if len > MAX_FIRMWARE_BYTES => {
                return Err(invalid(format!("its size ({len} bytes) is larger than any firmware Kestrel maps")))
            }
            _ => {}
        }
        // A file that changed size since `metadata` is read as far as it was then, and refused if it shrank.
        let mut bytes = vec![0; metadata.len() as usize];
        file.read_exact(&mut bytes).map_err(|e| invalid(format!("reading it: {e}")))?;
        let mapping = MmapRegion::new(bytes.len())
            .map_err(|e| Error::Host("allocating memory for the firmware image", std::io::Error::other(e)))?;
        mapping.as_volatile_slice().copy_from(&bytes);
        Ok(FirmwareImage { path: path.to_path_buf(), bytes, mapping })
    }

    // Only x86_64 maps firmware so far: aarch64 refuses it (`refused`), leaving these unused in its build.
    #[allow(dead_code)]
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    #[allow(dead_code)]
    pub fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// The host address of the mapping's first byte, page-aligned, for a hypervisor memory slot. The mapping
    /// lives as long as `self` and is not written after `open`.
    #[allow(dead_code)]
    pub fn host_address(&self) -> u64 {
        self.mapping.as_ptr() as u64
    }

    /// The one error line for an image the platform cannot use: `reason` says why.
    pub fn refused(&self, reason: impl std::fmt::Display) -> Error {
        Error::Firmware { path: self.path.clone(), reason: reason.to_string() }
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::tempdir::TempDir;

    use super::*;

    fn refusal(path: &Path) -> String {
        match FirmwareImage::open(path) {
            Ok(_) => panic!("{} was accepted", path.display()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn an_image_is_read_whole_into_its_own_page_aligned_mapping() {
        let dir = TempDir::new_with_prefix("/tmp/kestrel-firmware").unwrap();
        let dir_path = dir.as_path();
        let path = dir_path.join("bios.bin");
        let content: Vec<u8> = (0..128 * 1024u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &content).unwrap();
        let image = FirmwareImage::open(&path).unwrap();
        assert_eq!(image.bytes(), &content[..]);
        assert_eq!(image.len(), content.len() as u64);
        assert_eq!(image.host_address() % 4096, 0);
    }

    #[test]
    fn missing_empty_and_directory_images_are_one_line_each() {
        let dir = TempDir::new_with_prefix("/tmp/kestrel-firmware").unwrap();
        let dir_path = dir.as_path();
        let empty = dir_path.join("empty.bin");
        std::fs::write(&empty, b"").unwrap();
        for (path, needle) in [
            (dir_path.join("missing.bin"), "No such file"),
            (empty, "the image is empty"),
            (dir_path.to_path_buf(), "not a regular file"),
        ] {
            let message = refusal(&path);
            assert!(message.contains(needle), "{message}");
            assert!(message.contains(&path.display().to_string()), "{message}");
            assert_eq!(message.lines().count(), 1, "{message}");
        }
    }
}

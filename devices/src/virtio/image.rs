//! Disk image formats behind virtio-blk: raw (the fast path, in `block.rs`: preadv/pwritev straight between the
//! file and guest memory) and qcow2, through the [imago](https://docs.rs/imago) crate.
//!
//! # Why imago
//!
//! qcow2's metadata (L1/L2 tables, refcounts, compressed clusters, backing chains, copy-on-write of shared
//! clusters) is a lot of format code that one bug turns into silent corruption of the user's disk. imago is a
//! maintained implementation by a QEMU block-layer maintainer; its `sync` feature gives plain blocking calls
//! (no async runtime: Kestrel's device worker already is the thread that waits for the I/O), and its `vm-memory`
//! feature turns guest memory's `VolatileSlice`s into its I/O vectors, so data still moves between the image and
//! guest memory without a bounce buffer. imago caches L2 tables and refcount blocks and writes them back lazily:
//! [`Qcow2Image`] is flushed on the guest's FLUSH, before a snapshot's state is taken (the VMM calls
//! `Block::flush_image`), and when Kestrel exits (likewise; the device itself is never dropped before then).
//!
//! # What Kestrel checks itself
//!
//! imago opens what it understands and refuses unknown incompatible feature bits, but it does not look at the
//! encryption method, allocates the tables a header names whatever their size, and its messages name bits rather
//! than what to do. So the header is read and checked here first ([`check_qcow2_header`]), each refusal one line:
//! encryption (AES or LUKS), the dirty bit (lazy refcounts not written back: `qemu-img check -r all` repairs it),
//! the corrupt bit, external data files, compression types other than zlib (zstd), extended L2 entries, unknown
//! incompatible bits, sizes that overflow or that the L1 table cannot map, L1 and refcount tables over QEMU's
//! limits. Two more close paths where the `qcow2_open` fuzz target made imago 0.2.6 panic or overflow its stack: a
//! feature name table that is not whole entries, and (for an image opened to be written) clusters of the file
//! that no refcount block covers.
//!
//! # Backing chains
//!
//! Kestrel walks the chain itself rather than letting imago open what an image names: the backing file is
//! resolved against the directory of the image that names it (as QEMU does), opened read-only, in the format the
//! image records (`qcow2`, `raw`; probed by its magic when it records none, as QEMU does), and refused with one
//! line when it is missing, when the chain comes back to a file already in it (same device and inode), or when it
//! is deeper than [`MAX_BACKING_DEPTH`]. Each layer is then given to imago explicitly (`Qcow2::set_backing`).
//!
//! The chain may also be given rather than read from the images ([`BackingSpec`]): libvirt names each layer as a
//! `-blockdev` node and points the one above at it with `backing=` (or `backing=null` for none), as QEMU accepts.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::FormatAccess;

/// A qcow2 image opened through imago, its backing chain attached.
pub type Qcow2Image = FormatAccess<imago::file::File>;

/// Backing files below the top image, at most (QEMU has no fixed limit; a chain this long is already unusual and
/// each layer holds a descriptor and its own metadata caches).
pub const MAX_BACKING_DEPTH: usize = 16;

const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";
/// The header fields read (through `compression_type`, version 3).
const HEADER_LEN: usize = 105;
/// QEMU's limits on the tables an image makes the opener read whole (`QCOW_MAX_L1_SIZE`,
/// `QCOW_MAX_REFTABLE_SIZE`): imago allocates what the header says, so a hostile header must not say terabytes.
const MAX_L1_BYTES: u64 = 32 << 20;
const MAX_REFTABLE_BYTES: u64 = 8 << 20;

/// Incompatible feature bits (qcow2 specification, "Header").
mod incompatible {
    pub const DIRTY: u64 = 1 << 0;
    pub const CORRUPT: u64 = 1 << 1;
    pub const EXTERNAL_DATA_FILE: u64 = 1 << 2;
    pub const COMPRESSION_TYPE: u64 = 1 << 3;
    pub const EXTENDED_L2: u64 = 1 << 4;
}

/// Where an image's backing image comes from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum BackingSpec {
    /// The backing file the image names, if any (and so on down the chain).
    #[default]
    FromImage,
    /// No backing image, whatever the image names: unallocated clusters read as zeros.
    None,
    /// This image, opened read-only, whatever the image names.
    Image { path: PathBuf, format: ImageFormat, backing: Box<BackingSpec> },
}

/// A disk image's format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ImageFormat {
    #[default]
    Raw,
    Qcow2,
}

impl ImageFormat {
    /// The name QEMU uses (`format=`, `driver=`, QMP's `drv` and `format`).
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }

    /// `raw` or `qcow2`; anything else is `None`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "raw" => Some(ImageFormat::Raw),
            "qcow2" => Some(ImageFormat::Qcow2),
            _ => None,
        }
    }
}

/// What an opened image is, for QMP's block queries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    /// The path as it was opened (the command line's, or the resolved backing file name).
    pub filename: PathBuf,
    pub format: ImageFormat,
    /// Bytes the image presents.
    pub virtual_size: u64,
    /// qcow2's cluster size.
    pub cluster_size: Option<u64>,
    pub backing: Option<Box<BackingInfo>>,
}

impl ImageInfo {
    /// Images below this one.
    pub fn backing_depth(&self) -> usize {
        std::iter::successors(self.backing.as_deref(), |b| b.image.backing.as_deref()).count()
    }
}

/// A backing file as the image above names it, and what was opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackingInfo {
    /// The name stored in the image above (QMP's `backing-filename`).
    pub name: String,
    /// The format the image above records for it, if any (QMP's `backing-filename-format`).
    pub recorded_format: Option<String>,
    pub image: ImageInfo,
}

/// Opens the qcow2 image at `path` and its backing chain (as the images name it, or as `backing` says). `Err` is
/// one line saying what is wrong and where.
pub fn open_qcow2(
    path: &Path,
    read_only: bool,
    direct: bool,
    backing: &BackingSpec,
) -> Result<(Qcow2Image, ImageInfo), String> {
    let mut chain = Chain { direct, seen: Vec::new() };
    chain.open_qcow2(path, !read_only, 0, backing)
}

/// The files of one chain opened so far, to refuse a loop.
struct Chain {
    direct: bool,
    seen: Vec<(u64, u64)>,
}

impl Chain {
    fn open_file(&mut self, path: &Path, writable: bool) -> Result<File, String> {
        let mut options = OpenOptions::new();
        options.read(true).write(writable);
        if self.direct {
            options.custom_flags(libc::O_DIRECT);
        }
        let file = options.open(path).map_err(|e| format!("cannot open '{}': {e}", path.display()))?;
        let meta = file.metadata().map_err(|e| format!("'{}': {e}", path.display()))?;
        let id = (meta.dev(), meta.ino());
        if self.seen.contains(&id) {
            return Err(format!("the backing chain loops: '{}' is already in it", path.display()));
        }
        self.seen.push(id);
        Ok(file)
    }

    fn open_qcow2(
        &mut self,
        path: &Path,
        writable: bool,
        depth: usize,
        spec: &BackingSpec,
    ) -> Result<(Qcow2Image, ImageInfo), String> {
        check_file_type(path)?;
        // Read through the page cache: an O_DIRECT descriptor refuses the header's unaligned read.
        let buffered = File::open(path).map_err(|e| format!("cannot open '{}': {e}", path.display()))?;
        let checked = check_qcow2_header(&buffered).and_then(|header| {
            if writable {
                check_refcounts_cover_the_file(&buffered, &header)?;
            }
            Ok(header)
        });
        let header = checked.map_err(|e| format!("'{}': {e}", path.display()))?;
        drop(buffered);
        let file = self.open_file(path, writable)?;
        let storage = imago::file::File::try_from(file).map_err(|e| format!("'{}': {e}", path.display()))?;
        let mut qcow2 = Qcow2::<imago::file::File>::open_image(storage, writable)
            .map_err(|e| format!("'{}': not a usable qcow2 image: {e}", path.display()))?;
        let recorded_name = qcow2.implicit_backing_file().cloned();
        let recorded_format = qcow2.implicit_backing_format().cloned();
        // What to open below, in which format (`None`: as recorded), and what lies below that.
        let below = match (spec, &recorded_name) {
            (BackingSpec::None, _) | (BackingSpec::FromImage, None) => None,
            (BackingSpec::FromImage, Some(name)) => Some((resolve_backing(path, name), None, &BackingSpec::FromImage)),
            (BackingSpec::Image { path, format, backing }, _) => Some((path.clone(), Some(*format), &**backing)),
        };
        let backing = match below {
            None => None,
            Some((full, format, below)) => {
                if depth >= MAX_BACKING_DEPTH {
                    return Err(format!(
                        "'{}': the backing chain is deeper than {MAX_BACKING_DEPTH} images",
                        path.display()
                    ));
                }
                let format = match format {
                    Some(format) => format.as_str(),
                    None => recorded_format.as_deref().unwrap_or(""),
                };
                let opened = self.open_backing(&full, format, depth + 1, below);
                let (access, image) = opened.map_err(|e| format!("backing file of '{}': {e}", path.display()))?;
                qcow2.set_backing(Some(access));
                // A backing image given explicitly over an image that names none is reported by its path.
                let name = recorded_name.clone().unwrap_or_else(|| full.display().to_string());
                Some(Box::new(BackingInfo { name, recorded_format: recorded_format.clone(), image }))
            }
        };
        if backing.is_none() {
            qcow2.set_backing(None);
        }
        let access = FormatAccess::new(qcow2);
        let info = ImageInfo {
            filename: path.to_path_buf(),
            format: ImageFormat::Qcow2,
            virtual_size: access.size(),
            cluster_size: Some(1 << header.cluster_bits),
            backing,
        };
        Ok((access, info))
    }

    /// A backing file, read-only, in `format` (as the image above records it or the command line says; probed
    /// when empty), with `below` under it if it is qcow2.
    fn open_backing(
        &mut self,
        path: &Path,
        format: &str,
        depth: usize,
        below: &BackingSpec,
    ) -> Result<(Qcow2Image, ImageInfo), String> {
        check_file_type(path)?;
        let format = match format {
            "qcow2" => ImageFormat::Qcow2,
            "raw" | "file" => ImageFormat::Raw,
            "" => probe(path)?,
            other => return Err(format!("'{}': backing format '{other}' is not supported", path.display())),
        };
        if format == ImageFormat::Qcow2 {
            return self.open_qcow2(path, false, depth, below);
        }
        let file = self.open_file(path, false)?;
        let storage = imago::file::File::try_from(file).map_err(|e| format!("'{}': {e}", path.display()))?;
        let raw = Raw::open_image(storage, false).map_err(|e| format!("'{}': {e}", path.display()))?;
        let access = FormatAccess::new(raw);
        let info = ImageInfo {
            filename: path.to_path_buf(),
            format: ImageFormat::Raw,
            virtual_size: access.size(),
            cluster_size: None,
            backing: None,
        };
        Ok((access, info))
    }
}

/// Refuses what is not an image before it is opened: an image's backing file name is outside input, and opening
/// a FIFO or a terminal it names would block, reading a character device would make up a disk.
fn check_file_type(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot open '{}': {e}", path.display()))?;
    let kind = meta.file_type();
    if kind.is_file() || kind.is_block_device() {
        Ok(())
    } else {
        Err(format!("'{}' is not a regular file or block device", path.display()))
    }
}

/// A backing file name resolved as QEMU does: absolute as it is, relative to the directory of the image naming it.
pub fn resolve_backing(image: &Path, name: &str) -> PathBuf {
    let name = Path::new(name);
    if name.is_absolute() {
        return name.to_path_buf();
    }
    image.parent().unwrap_or(Path::new("")).join(name)
}

/// qcow2 if the file starts with qcow2's magic, else raw (what QEMU's probe decides between these two).
fn probe(path: &Path) -> Result<ImageFormat, String> {
    let file = File::open(path).map_err(|e| format!("cannot open '{}': {e}", path.display()))?;
    let mut magic = [0u8; 4];
    match file.read_exact_at(&mut magic, 0) {
        Ok(()) if magic == QCOW2_MAGIC => Ok(ImageFormat::Qcow2),
        Ok(()) => Ok(ImageFormat::Raw),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(ImageFormat::Raw),
        Err(e) => Err(format!("'{}': {e}", path.display())),
    }
}

/// The header fields Kestrel checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Qcow2Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    /// Refcounts are 2^refcount_order bits wide (16 in version 2).
    pub refcount_order: u32,
    pub incompatible_features: u64,
    pub header_length: u32,
    pub compression_type: u8,
}

impl Qcow2Header {
    /// Decodes the fixed header (big-endian); `bytes` may be shorter than a version 3 header for version 2.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let field = |at: usize, len: usize| bytes.get(at..at + len);
        let u32_at = |at| field(at, 4).map(|b| u32::from_be_bytes(b.try_into().unwrap()));
        let u64_at = |at| field(at, 8).map(|b| u64::from_be_bytes(b.try_into().unwrap()));
        if field(0, 4) != Some(&QCOW2_MAGIC[..]) {
            return Err("not a qcow2 image (no qcow2 magic)".into());
        }
        let short = || "the qcow2 header is cut short".to_string();
        let version = u32_at(4).ok_or_else(short)?;
        let v2 = |at| u32_at(at).ok_or_else(short);
        let mut header = Qcow2Header {
            version,
            cluster_bits: v2(20)?,
            size: u64_at(24).ok_or_else(short)?,
            crypt_method: v2(32)?,
            l1_size: v2(36)?,
            refcount_table_offset: u64_at(48).ok_or_else(short)?,
            refcount_table_clusters: v2(56)?,
            refcount_order: 4,
            incompatible_features: 0,
            header_length: 72,
            compression_type: 0,
        };
        match version {
            2 => {}
            3 => {
                header.incompatible_features = u64_at(72).ok_or_else(short)?;
                header.refcount_order = u32_at(96).ok_or_else(short)?;
                header.header_length = u32_at(100).ok_or_else(short)?;
                if header.header_length > 104 {
                    header.compression_type = *bytes.get(104).ok_or_else(short)?;
                }
            }
            _ => return Err(format!("qcow2 version {version} is not supported (2 and 3 are)")),
        }
        Ok(header)
    }

    /// Refuses what Kestrel (and imago) cannot serve correctly, each with the line a user acts on.
    pub fn check(&self) -> Result<(), String> {
        if self.crypt_method != 0 {
            let method = match self.crypt_method {
                1 => "AES",
                2 => "LUKS",
                _ => "unknown",
            };
            return Err(format!("encrypted qcow2 images ({method}) are not supported"));
        }
        let features = self.incompatible_features;
        if features & incompatible::DIRTY != 0 {
            return Err("the image was not closed cleanly (dirty bit set, lazy refcounts not written back); \
                        repair it with 'qemu-img check -r all'"
                .into());
        }
        if features & incompatible::CORRUPT != 0 {
            return Err("the image is marked corrupt; repair it with 'qemu-img check -r all'".into());
        }
        if features & incompatible::EXTERNAL_DATA_FILE != 0 {
            return Err("qcow2 images with an external data file are not supported".into());
        }
        if features & incompatible::COMPRESSION_TYPE != 0 {
            let kind = if self.compression_type == 1 { "zstd" } else { "an unknown compression type" };
            return Err(format!("qcow2 images compressed with {kind} are not supported (zlib is)"));
        }
        if features & incompatible::EXTENDED_L2 != 0 {
            return Err("qcow2 images with extended L2 entries (subclusters) are not supported".into());
        }
        let unknown = features & !(incompatible::EXTENDED_L2 * 2 - 1);
        if unknown != 0 {
            return Err(format!("the image uses incompatible features Kestrel does not know ({unknown:#x})"));
        }
        if !(9..=21).contains(&self.cluster_bits) {
            return Err(format!("cluster size 2^{} is out of range (2^9 to 2^21)", self.cluster_bits));
        }
        if self.size > i64::MAX as u64 {
            return Err(format!("virtual size {} overflows (over 2^63 bytes)", self.size));
        }
        if u64::from(self.l1_size) * 8 > MAX_L1_BYTES {
            return Err(format!("its L1 table ({} entries) is over the limit of {MAX_L1_BYTES} bytes", self.l1_size));
        }
        let reftable_bytes = u64::from(self.refcount_table_clusters) << self.cluster_bits;
        if reftable_bytes > MAX_REFTABLE_BYTES {
            return Err(format!(
                "its refcount table ({reftable_bytes} bytes) is over the limit of {MAX_REFTABLE_BYTES} bytes"
            ));
        }
        // Each L1 entry maps one L2 table: cluster_size / 8 clusters of cluster_size bytes.
        let l2_bits = self.cluster_bits - 3;
        let bytes_per_l1_entry = 1u64 << (self.cluster_bits + l2_bits);
        let needed = self.size.div_ceil(bytes_per_l1_entry);
        if u64::from(self.l1_size) < needed {
            return Err(format!(
                "its L1 table ({} entries) cannot map the virtual size of {} bytes ({needed} needed)",
                self.l1_size, self.size
            ));
        }
        Ok(())
    }
}

/// An image to be written must have a refcount block for every cluster of its file: imago allocates the missing
/// ones as it needs them, each placed in clusters whose own refcount blocks may be missing too, and on an image
/// whose refcount table is empty that recursion has no useful bound (found by the `qcow2_open` fuzz target: a stack
/// overflow). qemu-img never leaves a cluster of the file uncovered, so this refuses only broken images.
fn check_refcounts_cover_the_file(file: &File, header: &Qcow2Header) -> Result<(), String> {
    let broken = |what: String| format!("{what}; repair it with 'qemu-img check -r all'");
    let cluster_bits = header.cluster_bits;
    let file_len = file.metadata().map_err(|e| e.to_string())?.len();
    let file_clusters = file_len.div_ceil(1 << cluster_bits);
    if !(0..=6).contains(&header.refcount_order) {
        return Err(format!("refcount width 2^{} is out of range (1 to 64 bits)", header.refcount_order));
    }
    // A refcount block is one cluster of refcounts.
    let clusters_per_block = (1u64 << (cluster_bits + 3)) >> header.refcount_order;
    let needed = file_clusters.div_ceil(clusters_per_block);
    let entries = (u64::from(header.refcount_table_clusters) << cluster_bits) / 8;
    if needed > entries {
        return Err(broken(format!(
            "its refcount table ({entries} entries) cannot cover the file's {file_clusters} clusters"
        )));
    }
    let mut table = vec![0u8; needed as usize * 8];
    file.read_exact_at(&mut table, header.refcount_table_offset)
        .map_err(|e| broken(format!("reading its refcount table: {e}")))?;
    const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
    if let Some(index) =
        table.chunks_exact(8).position(|e| u64::from_be_bytes(e.try_into().unwrap()) & OFFSET_MASK == 0)
    {
        return Err(broken(format!(
            "clusters of the file have no refcount block (refcount table entry {index} is empty)"
        )));
    }
    Ok(())
}

/// Reads and checks the header of an open qcow2 image.
pub fn check_qcow2_header(file: &File) -> Result<Qcow2Header, String> {
    let header = Qcow2Header::parse(&read_start(file, HEADER_LEN)?)?;
    header.check()?;
    if header.version >= 3 {
        check_header_extensions(&read_start(file, 1 << header.cluster_bits)?, header.header_length)?;
    }
    Ok(header)
}

/// Up to `len` bytes from the start of `file` (fewer if it is shorter).
fn read_start(file: &File, len: usize) -> Result<Vec<u8>, String> {
    let mut bytes = vec![0u8; len];
    let mut read = 0;
    while read < bytes.len() {
        match file.read_at(&mut bytes[read..], read as u64) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading the qcow2 header: {e}")),
        }
    }
    bytes.truncate(read);
    Ok(bytes)
}

/// The feature name table extension (qcow2 specification, "Header extensions").
const FEATURE_NAME_TABLE: u32 = 0x6803_f857;
/// Bytes per feature name table entry: type, bit number, 46 bytes of name.
const FEATURE_NAME_ENTRY: u32 = 48;

/// Walks the header extensions in the first cluster as imago will, refusing what imago 0.2.6 would panic on: a
/// feature name table whose length is not a whole number of entries (found by the `qcow2_open` fuzz target).
/// Extensions that run past the cluster are left to imago, which refuses them with an error.
fn check_header_extensions(cluster: &[u8], header_length: u32) -> Result<(), String> {
    let mut at = header_length as usize;
    loop {
        let Some(ext) = cluster.get(at..at + 8) else { return Ok(()) };
        let kind = u32::from_be_bytes(ext[..4].try_into().unwrap());
        let len = u32::from_be_bytes(ext[4..].try_into().unwrap());
        if kind == 0 {
            return Ok(());
        }
        if kind == FEATURE_NAME_TABLE && len % FEATURE_NAME_ENTRY != 0 {
            return Err(format!(
                "its feature name table is malformed ({len} bytes, not a multiple of {FEATURE_NAME_ENTRY})"
            ));
        }
        at = at.saturating_add(8).saturating_add((len as usize).next_multiple_of(8));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version 3 header of a 1 MiB image with 64 KiB clusters and one L1 entry.
    fn header() -> Vec<u8> {
        let mut h = vec![0u8; HEADER_LEN];
        h[..4].copy_from_slice(&QCOW2_MAGIC);
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
        h[36..40].copy_from_slice(&1u32.to_be_bytes());
        h[56..60].copy_from_slice(&1u32.to_be_bytes());
        h[100..104].copy_from_slice(&104u32.to_be_bytes());
        h
    }

    #[test]
    fn headers_parse_and_check() {
        let h = Qcow2Header::parse(&header()).unwrap();
        assert_eq!((h.version, h.cluster_bits, h.size, h.l1_size), (3, 16, 1 << 20, 1));
        assert_eq!(h.check(), Ok(()));
        // Version 2 ends at 72 bytes.
        let mut v2 = header();
        v2[4..8].copy_from_slice(&2u32.to_be_bytes());
        v2.truncate(72);
        assert_eq!(Qcow2Header::parse(&v2).unwrap().check(), Ok(()));
        for len in [0, 3, 4, 30, 71] {
            let err = Qcow2Header::parse(&header()[..len]).unwrap_err();
            assert!(err.contains("cut short") || err.contains("no qcow2 magic"), "{len}: {err}");
        }
        let mut v3_short = header();
        v3_short.truncate(90);
        assert!(Qcow2Header::parse(&v3_short).unwrap_err().contains("cut short"));
        // An L1 table that maps exactly the size is enough; one entry short is not.
        let mut big = Qcow2Header::parse(&header()).unwrap();
        big.size = 512 << 20; // one L1 entry maps 512 MiB with 64 KiB clusters
        assert_eq!(big.check(), Ok(()));
        big.size += 1;
        assert!(big.check().unwrap_err().contains("cannot map the virtual size"));
        big.cluster_bits = 8;
        assert!(big.check().unwrap_err().contains("out of range"));
    }

    #[test]
    fn backing_names_resolve_against_the_naming_image() {
        assert_eq!(resolve_backing(Path::new("/images/top.qcow2"), "base.qcow2"), Path::new("/images/base.qcow2"));
        assert_eq!(resolve_backing(Path::new("/images/top.qcow2"), "../b/base"), Path::new("/images/../b/base"));
        assert_eq!(resolve_backing(Path::new("/images/top.qcow2"), "/abs/base"), Path::new("/abs/base"));
        assert_eq!(resolve_backing(Path::new("top.qcow2"), "base.qcow2"), Path::new("base.qcow2"));
    }
}

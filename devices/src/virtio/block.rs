//! virtio-blk (virtio 1.2, 5.2) on a raw image (a host file or block device accessed with positional I/O:
//! pread/pwrite straight into and out of guest memory, no bounce buffer) or a qcow2 image (through imago, with
//! its backing chain; see [`image`](super::image)).
//!
//! # Requests
//!
//! A request is a descriptor chain whose device-readable bytes start with the 16-byte header (type, reserved,
//! sector) and whose device-writable bytes end with the status byte. The data is what lies between: the rest
//! of the readable bytes for writes, discards and write-zeroes, the writable bytes before the status for reads
//! and GET_ID. Framing is free (virtio 1.x: the header may be split, the status may share a descriptor with
//! read data). Everything is checked before the host file is touched:
//!
//! * a chain that is not a chain (loops, leaves the table, too long), or has no device-writable byte in guest
//!   memory for the status, is returned with nothing written (used length 0): the device cannot know where the
//!   status would go;
//! * otherwise the status says what happened: IOERR for a short header, descriptors outside guest memory, data
//!   not a multiple of 512 bytes, sectors past the end of the disk (or overflowing), any write to a read-only
//!   disk, and any host I/O error (including short reads and writes); UNSUPP for unknown request types and
//!   malformed discard/write-zeroes segments.
//!
//! # O_DIRECT
//!
//! With `direct`, the image is opened O_DIRECT and the device announces a 4096-byte logical block
//! (VIRTIO_BLK_F_BLK_SIZE) so a Linux guest only issues 4 KiB-aligned offsets and lengths. The buffers are the
//! guest's own pages, so their alignment is the guest's: requests the host kernel refuses (EINVAL) fail with
//! IOERR, never silently. Without `direct`, the host page cache is used and FLUSH (fsync) makes writes durable.
//!
//! # qcow2
//!
//! The same requests go to imago instead of the file: reads and writes (guest memory handed over as imago I/O
//! vectors), FLUSH (imago's cached metadata written back, then fsync), DISCARD (clusters freed where the format
//! can; a hint, so a format that cannot is not an error), WRITE_ZEROES (zero clusters; with UNMAP, freed to
//! zero). Metadata imago caches is also written back by [`Block::flush_image`], which the VMM calls before a
//! snapshot's state is taken and on its way out.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

use serde::{Deserialize, Serialize};
use vm_memory::{GuestAddress, GuestMemory, Permissions};

use super::chain::{self, Chain, Segment};
use super::image::{self, BackingSpec, ImageFormat, ImageInfo, Qcow2Image};
use super::{features, DriverState, GuestErrorLog, GuestMemoryMmap, VirtioDevice, VirtioDeviceState};
use crate::StateError;

pub const QUEUE_SIZE: u16 = 256;
pub const SECTOR_SIZE: u64 = 512;
/// Data descriptors per request the driver may use (VIRTIO_BLK_F_SEG_MAX): a queue's worth minus header and
/// status.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Descriptors the device looks at per chain (indirect tables can be longer than the queue).
const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;
/// Largest single discard/write-zeroes range, in sectors (as QEMU: just under 2 GiB).
pub const MAX_DISCARD_SECTORS: u32 = (1 << 22) - 1;
pub const MAX_WRITE_ZEROES_SECTORS: u32 = MAX_DISCARD_SECTORS;
/// Ranges per discard/write-zeroes request.
pub const MAX_DISCARD_SEG: u32 = 1;
pub const MAX_WRITE_ZEROES_SEG: u32 = 1;
/// GET_ID answers with up to this many bytes of serial.
pub const ID_BYTES: usize = 20;

/// Request types (virtio 1.2, 5.2.6).
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;
/// Status values.
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

/// Feature bits (virtio 1.2, 5.2.3).
pub mod feature {
    pub const SEG_MAX: u64 = 1 << 2;
    pub const RO: u64 = 1 << 5;
    pub const BLK_SIZE: u64 = 1 << 6;
    pub const FLUSH: u64 = 1 << 9;
    pub const DISCARD: u64 = 1 << 13;
    pub const WRITE_ZEROES: u64 = 1 << 14;
}

const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;
/// Length of the configuration space we fill in (through `write_zeroes_may_unmap` and its padding).
const CONFIG_LEN: usize = 60;
/// Where `blk_size` is in it.
const CONFIG_BLK_SIZE: usize = 20;

static LOG: GuestErrorLog = GuestErrorLog::new("virtio-blk");

/// How to open an image.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockOptions {
    pub read_only: bool,
    /// Up to 20 bytes, returned by GET_ID (Linux: /sys/block/vdX/serial).
    pub serial: String,
    /// Open with O_DIRECT (see the module documentation for alignment).
    pub direct: bool,
    pub format: ImageFormat,
    /// A qcow2 image's backing chain: as the images name it unless given.
    pub backing: BackingSpec,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening disk image {path}: {source}")]
    Open { path: String, source: io::Error },
    #[error("finding the size of the disk image: {0}")]
    Size(io::Error),
    #[error("disk serial {0:?} is longer than 20 bytes")]
    Serial(String),
    /// A qcow2 image (or its backing chain) Kestrel cannot serve; `reason` names the file.
    #[error("{0}")]
    Image(String),
}

/// I/O counters, for `query-blockstats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockStats {
    pub rd_bytes: u64,
    pub wr_bytes: u64,
    pub rd_operations: u64,
    pub wr_operations: u64,
    pub flush_operations: u64,
    /// DISCARD requests done, and the bytes they covered.
    pub discard_operations: u64,
    pub discard_bytes: u64,
    /// WRITE_ZEROES requests done, and the bytes they covered.
    pub write_zeroes_operations: u64,
    pub write_zeroes_bytes: u64,
    /// The end of the furthest byte range a write, write-zeroes or discard changed (0 before any).
    pub wr_highest_offset: u64,
    /// Requests of any type the host failed to carry out (answered IOERR).
    pub failed_operations: u64,
    /// Requests refused before any I/O, chains that are not requests included.
    pub invalid_operations: u64,
    /// `failed_operations` by request type.
    pub failed: PerType,
    /// `invalid_operations` by request type, where the request had one (a readable header) and was refused for
    /// its range or a read-only disk (not as unsupported).
    pub invalid: PerType,
    /// Nanoseconds spent carrying out requests (done or failed), by type.
    pub total_time_ns: PerType,
}

/// One counter per request type that does I/O.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PerType {
    pub read: u64,
    pub write: u64,
    pub flush: u64,
    pub discard: u64,
    pub write_zeroes: u64,
}

impl PerType {
    /// The counter for a request type (`T_IN`...), if that type has one.
    fn get_mut(&mut self, kind: u32) -> Option<&mut u64> {
        match kind {
            T_IN => Some(&mut self.read),
            T_OUT => Some(&mut self.write),
            T_FLUSH => Some(&mut self.flush),
            T_DISCARD => Some(&mut self.discard),
            T_WRITE_ZEROES => Some(&mut self.write_zeroes),
            _ => None,
        }
    }

    fn add(&mut self, kind: u32, n: u64) {
        if let Some(c) = self.get_mut(kind) {
            *c += n;
        }
    }
}

impl Request {
    /// The virtio request type (`T_IN`...).
    pub fn kind(&self) -> u32 {
        match self {
            Request::Read { .. } => T_IN,
            Request::Write { .. } => T_OUT,
            Request::Flush => T_FLUSH,
            Request::GetId { .. } => T_GET_ID,
            Request::Discard { zeroes: false, .. } => T_DISCARD,
            Request::Discard { zeroes: true, .. } => T_WRITE_ZEROES,
        }
    }
}

/// The request the driver asked for, once its chain was checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Read {
        offset: u64,
        data: Vec<Segment>,
    },
    Write {
        offset: u64,
        data: Vec<Segment>,
    },
    Flush,
    GetId {
        data: Vec<Segment>,
    },
    /// Byte ranges (offset, length); `zeroes` for WRITE_ZEROES (with `unmap` if the driver allows a hole).
    Discard {
        ranges: Vec<(u64, u64)>,
        zeroes: bool,
        unmap: bool,
    },
}

/// A chain parsed into a request, or the status to answer it with, and where that status goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub request: Result<Request, u8>,
    pub status: GuestAddress,
}

/// Where a disk's bytes are: the raw fast path, or a qcow2 image through imago.
enum Backend {
    Raw(File),
    Qcow2(Box<Qcow2Image>),
}

/// The disk the requests go to.
struct Disk {
    backend: Backend,
    size: u64,
    read_only: bool,
    serial: [u8; ID_BYTES],
    stats: BlockStats,
    /// 64 KiB of zeros, 4 KiB aligned (O_DIRECT), for write-zeroes where fallocate cannot.
    zeros: Vec<u8>,
}

pub struct Block {
    disk: Disk,
    image: ImageInfo,
    avail_features: u64,
    config: [u8; CONFIG_LEN],
    driver: DriverState,
}

impl Block {
    /// Opens the image at `path`.
    pub fn open(path: &Path, options: &BlockOptions) -> Result<Self, Error> {
        let mut open = OpenOptions::new();
        open.read(true).write(!options.read_only);
        if options.direct {
            open.custom_flags(libc::O_DIRECT);
        }
        if options.format == ImageFormat::Qcow2 {
            let (qcow2, mut info) =
                image::open_qcow2(path, options.read_only, options.direct, &options.backing).map_err(Error::Image)?;
            let bytes = qcow2.size();
            info.filename = path.to_path_buf();
            return Block::with_backend(Backend::Qcow2(Box::new(qcow2)), bytes, info, options);
        }
        let file = open.open(path).map_err(|source| Error::Open { path: path.display().to_string(), source })?;
        let mut block = Block::with_file(file, options)?;
        block.image.filename = path.to_path_buf();
        Ok(block)
    }

    /// A disk on an already open image (opened for writing unless `options.read_only`). `options.direct` only
    /// changes the block size announced; the caller chose the open flags.
    pub fn with_file(mut file: File, options: &BlockOptions) -> Result<Self, Error> {
        // Block devices have no st_size; seeking to the end works for both.
        let bytes = file.seek(SeekFrom::End(0)).map_err(Error::Size)?;
        let info = ImageInfo {
            filename: Default::default(),
            format: ImageFormat::Raw,
            virtual_size: bytes,
            cluster_size: None,
            backing: None,
        };
        Block::with_backend(Backend::Raw(file), bytes, info, options)
    }

    /// A disk of `bytes` on `backend`. A partial last sector is not exposed.
    fn with_backend(backend: Backend, bytes: u64, image: ImageInfo, options: &BlockOptions) -> Result<Self, Error> {
        if options.serial.len() > ID_BYTES {
            return Err(Error::Serial(options.serial.clone()));
        }
        let mut serial = [0u8; ID_BYTES];
        serial[..options.serial.len()].copy_from_slice(options.serial.as_bytes());
        let size = bytes - bytes % SECTOR_SIZE;
        let block_size: u32 = if options.direct { 4096 } else { 512 };

        let mut avail_features = features::COMMON | feature::SEG_MAX | feature::BLK_SIZE | feature::FLUSH;
        if options.read_only {
            avail_features |= feature::RO;
        } else {
            avail_features |= feature::DISCARD | feature::WRITE_ZEROES;
        }

        let mut config = [0u8; CONFIG_LEN];
        let mut put = |at: usize, bytes: &[u8]| config[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, &(size / SECTOR_SIZE).to_le_bytes()); // capacity
        put(12, &SEG_MAX.to_le_bytes());
        put(CONFIG_BLK_SIZE, &block_size.to_le_bytes());
        put(34, &1u16.to_le_bytes()); // num_queues
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &MAX_DISCARD_SEG.to_le_bytes());
        put(44, &(block_size / 512).to_le_bytes()); // discard_sector_alignment
        put(48, &MAX_WRITE_ZEROES_SECTORS.to_le_bytes());
        put(52, &MAX_WRITE_ZEROES_SEG.to_le_bytes());
        put(56, &[1]); // write_zeroes_may_unmap

        let zeros = vec![0u8; (64 << 10) + 4096];
        Ok(Block {
            disk: Disk { backend, size, read_only: options.read_only, serial, stats: BlockStats::default(), zeros },
            image,
            avail_features,
            config,
            driver: DriverState::default(),
        })
    }

    /// The disk size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.size / SECTOR_SIZE
    }

    pub fn read_only(&self) -> bool {
        self.disk.read_only
    }

    pub fn stats(&self) -> BlockStats {
        self.disk.stats
    }

    /// The image and its backing chain, as opened.
    pub fn image(&self) -> &ImageInfo {
        &self.image
    }

    /// Whether the image format caches metadata that [`flush_image`](Self::flush_image) must write back (a
    /// writable qcow2 image).
    pub fn caches_metadata(&self) -> bool {
        matches!(self.disk.backend, Backend::Qcow2(_)) && !self.disk.read_only
    }

    /// Writes back what the image format caches (qcow2's L2 tables and refcount blocks) and syncs it to disk, so
    /// that the file alone is the disk's state: before a snapshot's state is taken, and when Kestrel exits. Raw
    /// images cache nothing of their own.
    pub fn flush_image(&mut self) -> io::Result<()> {
        match &self.disk.backend {
            Backend::Qcow2(qcow2) if !self.disk.read_only => {
                qcow2.flush()?;
                qcow2.sync()
            }
            _ => Ok(()),
        }
    }
}

/// virtio-blk as data: what the guest learnt about the disk, checked against the disk restored into. Requests
/// are carried out synchronously while the device holds its lock, so a saved device has none in flight (see
/// [`transport`](super::transport)), and the disk's contents are the image's business. The I/O statistics are
/// the host's accounting of this process (QMP's `query-blockstats`) and start afresh.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockState {
    /// In 512-byte sectors, as the configuration space announces it.
    pub capacity: u64,
    /// The logical block size announced (4096 with O_DIRECT).
    pub block_size: u32,
    /// What GET_ID answers.
    pub serial: String,
    /// The image format the guest's disk was read through (absent: raw, as snapshots before qcow2 support).
    #[serde(default, skip_serializing_if = "ImageFormatName::is_raw")]
    pub format: ImageFormatName,
}

/// An image format's name in a snapshot (`raw`, `qcow2`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ImageFormatName(pub String);

impl Default for ImageFormatName {
    fn default() -> Self {
        ImageFormatName(ImageFormat::Raw.as_str().into())
    }
}

impl ImageFormatName {
    fn is_raw(&self) -> bool {
        self.0 == ImageFormat::Raw.as_str()
    }
}

impl Block {
    fn block_size(&self) -> u32 {
        let at = CONFIG_BLK_SIZE;
        u32::from_le_bytes([self.config[at], self.config[at + 1], self.config[at + 2], self.config[at + 3]])
    }

    /// The serial as given (GET_ID pads it with zeros).
    fn serial(&self) -> String {
        let end = self.disk.serial.iter().rposition(|&b| b != 0).map_or(0, |last| last + 1);
        String::from_utf8_lossy(&self.disk.serial[..end]).into_owned()
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        super::TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else { return };
        if start < CONFIG_LEN {
            let n = data.len().min(CONFIG_LEN - start);
            data[..n].copy_from_slice(&self.config[start..start + n]);
        }
    }

    /// The only writable field, `writeback`, needs VIRTIO_BLK_F_CONFIG_WCE, which is not offered.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn driver(&self) -> &DriverState {
        &self.driver
    }

    fn driver_mut(&mut self) -> &mut DriverState {
        &mut self.driver
    }

    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Block(BlockState {
            capacity: self.capacity(),
            block_size: self.block_size(),
            serial: self.serial(),
            format: ImageFormatName(self.image.format.as_str().into()),
        })
    }

    /// Refuses the state of another disk: a guest that saw one capacity, block size or serial must not find
    /// another under its feet.
    fn restore_device_state(&mut self, state: &VirtioDeviceState, _running: bool) -> Result<(), StateError> {
        let VirtioDeviceState::Block(state) = state else { return Err(state.mismatch(LOG.device)) };
        let refuse = |field: &str, saved: &dyn std::fmt::Debug, here: &dyn std::fmt::Debug| {
            let problem = format!("{saved:?} in the snapshot, {here:?} for this disk (another image or options?)");
            Err(StateError::new(LOG.device, field, problem))
        };
        if state.capacity != self.capacity() {
            return refuse("capacity", &state.capacity, &self.capacity());
        }
        if state.block_size != self.block_size() {
            return refuse("block_size", &state.block_size, &self.block_size());
        }
        if state.serial != self.serial() {
            return refuse("serial", &state.serial, &self.serial());
        }
        if state.format.0 != self.image.format.as_str() {
            return refuse("format", &state.format.0, &self.image.format.as_str());
        }
        Ok(())
    }

    fn process_queue(&mut self, index: usize) -> bool {
        let Some(active) = self.driver.active.as_mut() else { return false };
        let (disk, features) = (&mut self.disk, self.driver.acked_features);
        active.process(index, &LOG, |mem, chain| disk.handle(mem, chain::parse(chain, MAX_DESCRIPTORS), features))
    }
}

/// Checks a parsed chain and turns it into a request (see the module documentation for the rules). `disk_size`
/// is in bytes; `features` are the negotiated ones. `Err` when there is nowhere to put a status.
pub fn parse_request<M: GuestMemory + ?Sized>(
    mem: &M,
    chain: &Chain,
    disk_size: u64,
    read_only: bool,
    features: u64,
) -> Result<Parsed, chain::ChainError> {
    let status = chain::last_byte(&chain.writable)
        .filter(|&at| mem.check_range(at, 1, Permissions::Write))
        .ok_or(chain::ChainError::Empty(chain.head))?;
    Ok(Parsed { request: request(mem, chain, disk_size, read_only, features), status })
}

/// The type of a chain's request, if it has a readable header in guest memory (for accounting refusals).
fn request_kind<M: GuestMemory + ?Sized>(mem: &M, chain: &Chain) -> Option<u32> {
    if chain.bad_segment.is_some() {
        return None;
    }
    let mut kind = [0u8; 4];
    chain::read_stream(mem, &chain.readable, &mut kind).ok()?;
    Some(u32::from_le_bytes(kind))
}

fn request<M: GuestMemory + ?Sized>(
    mem: &M,
    chain: &Chain,
    disk_size: u64,
    read_only: bool,
    features: u64,
) -> Result<Request, u8> {
    if let Some(bad) = chain.bad_segment {
        LOG.report(format_args!("chain {} names {:#x}+{:#x} outside guest memory", chain.head, bad.addr.0, bad.len));
        return Err(S_IOERR);
    }
    let mut header = [0u8; 16];
    if chain::read_stream(mem, &chain.readable, &mut header).is_err() {
        LOG.report(format_args!("chain {} has no 16-byte device-readable header", chain.head));
        return Err(S_IOERR);
    }
    let kind = u32::from_le_bytes(header[0..4].try_into().unwrap());
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
    let (_, out_data) = chain::split_at(&chain.readable, 16);
    let writable_len = chain::total_len(&chain.writable);
    let (in_data, _) = chain::split_at(&chain.writable, writable_len - 1);

    // The byte range a read or write of `len` bytes at `sector` covers, if it is on the disk.
    let range = |len: u64| -> Result<u64, u8> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            LOG.report(format_args!("request of {len} bytes is not a multiple of 512"));
            return Err(S_IOERR);
        }
        let offset = sector.checked_mul(SECTOR_SIZE).filter(|o| o.checked_add(len).is_some_and(|end| end <= disk_size));
        offset.ok_or_else(|| {
            LOG.report(format_args!("request of {len} bytes at sector {sector} is past the end of the disk"));
            S_IOERR
        })
    };

    match kind {
        T_IN => Ok(Request::Read { offset: range(chain::total_len(&in_data))?, data: in_data }),
        T_OUT if read_only => Err(S_IOERR),
        T_OUT => Ok(Request::Write { offset: range(chain::total_len(&out_data))?, data: out_data }),
        T_FLUSH => Ok(Request::Flush),
        T_GET_ID => Ok(Request::GetId { data: in_data }),
        T_DISCARD | T_WRITE_ZEROES => {
            let zeroes = kind == T_WRITE_ZEROES;
            let (feature, max_seg, max_sectors) = if zeroes {
                (feature::WRITE_ZEROES, MAX_WRITE_ZEROES_SEG, MAX_WRITE_ZEROES_SECTORS)
            } else {
                (feature::DISCARD, MAX_DISCARD_SEG, MAX_DISCARD_SECTORS)
            };
            if read_only {
                return Err(S_IOERR);
            }
            if features & feature == 0 {
                return Err(S_UNSUPP);
            }
            let len = chain::total_len(&out_data);
            let count = len / 16;
            if !len.is_multiple_of(16) || count == 0 || count > u64::from(max_seg) {
                LOG.report(format_args!("discard/write-zeroes with {len} bytes of segments"));
                return Err(S_UNSUPP);
            }
            let mut raw = vec![0u8; len as usize];
            chain::read_stream(mem, &out_data, &mut raw).map_err(|_| S_IOERR)?;
            let mut ranges = Vec::new();
            let mut unmap = true;
            for seg in raw.chunks_exact(16) {
                let start = u64::from_le_bytes(seg[0..8].try_into().unwrap());
                let sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap());
                let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap());
                // Discard must not set UNMAP; no other flag exists.
                let allowed = if zeroes { WRITE_ZEROES_FLAG_UNMAP } else { 0 };
                if flags & !allowed != 0 {
                    return Err(S_UNSUPP);
                }
                unmap &= flags & WRITE_ZEROES_FLAG_UNMAP != 0;
                if sectors > max_sectors {
                    return Err(S_IOERR);
                }
                let bytes = u64::from(sectors) * SECTOR_SIZE;
                let offset = start
                    .checked_mul(SECTOR_SIZE)
                    .filter(|o| o.checked_add(bytes).is_some_and(|end| end <= disk_size))
                    .ok_or(S_IOERR)?;
                ranges.push((offset, bytes));
            }
            Ok(Request::Discard { ranges, zeroes, unmap: zeroes && unmap })
        }
        _ => {
            LOG.report(format_args!("request type {kind} is not supported"));
            Err(S_UNSUPP)
        }
    }
}

impl Disk {
    /// Serves one chain under the negotiated `features`; returns the bytes written into its device-writable part.
    fn handle(&mut self, mem: &GuestMemoryMmap, chain: Result<Chain, chain::ChainError>, features: u64) -> u32 {
        let parsed = chain.and_then(|c| {
            parse_request(mem, &c, self.size, self.read_only, features).map(|p| (p, request_kind(mem, &c)))
        });
        let (parsed, kind) = match parsed {
            Ok(parsed) => parsed,
            Err(e) => {
                LOG.report(format_args!("{e}; returned with no status"));
                self.stats.invalid_operations += 1;
                return 0;
            }
        };
        let (status, written) = match parsed.request {
            Ok(request) => {
                let started = std::time::Instant::now();
                let result = self.execute(mem, &request);
                let elapsed = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
                self.stats.total_time_ns.add(request.kind(), elapsed);
                match result {
                    Ok(written) => (S_OK, written),
                    Err(e) => {
                        LOG.report(format_args!("host I/O error: {e}"));
                        self.stats.failed_operations += 1;
                        self.stats.failed.add(request.kind(), 1);
                        (S_IOERR, 0)
                    }
                }
            }
            Err(status) => {
                self.stats.invalid_operations += 1;
                if status != S_UNSUPP {
                    if let Some(kind) = kind {
                        self.stats.invalid.add(kind, 1);
                    }
                }
                (status, 0)
            }
        };
        if chain::copy_to_guest(mem, parsed.status, &[status]).is_err() {
            // Checked by `parse_request`: guest memory does not shrink.
            return 0;
        }
        written.saturating_add(1)
    }

    /// Does the I/O; returns the data bytes written into guest memory.
    fn execute(&mut self, mem: &GuestMemoryMmap, request: &Request) -> io::Result<u32> {
        match request {
            Request::Read { offset, data } => {
                let n = self.transfer(mem, data, *offset, false)?;
                self.stats.rd_operations += 1;
                self.stats.rd_bytes += n;
                Ok(n as u32)
            }
            Request::Write { offset, data } => {
                let n = self.transfer(mem, data, *offset, true)?;
                self.stats.wr_operations += 1;
                self.stats.wr_bytes += n;
                self.stats.wr_highest_offset = self.stats.wr_highest_offset.max(*offset + n);
                Ok(0)
            }
            Request::Flush => {
                self.stats.flush_operations += 1;
                if !self.read_only {
                    match &self.backend {
                        Backend::Raw(file) => file.sync_all()?,
                        Backend::Qcow2(qcow2) => {
                            qcow2.flush()?;
                            qcow2.sync()?;
                        }
                    }
                }
                Ok(0)
            }
            Request::GetId { data } => {
                let n = chain::write_stream(mem, data, &self.serial)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                Ok(n as u32)
            }
            Request::Discard { ranges, zeroes, unmap } => {
                for &(offset, len) in ranges {
                    match &mut self.backend {
                        Backend::Raw(_) => self.discard(offset, len, *zeroes, *unmap)?,
                        Backend::Qcow2(qcow2) => discard_qcow2(qcow2, offset, len, *zeroes, *unmap)?,
                    }
                }
                let bytes: u64 = ranges.iter().map(|&(_, len)| len).sum();
                if *zeroes {
                    self.stats.write_zeroes_operations += 1;
                    self.stats.write_zeroes_bytes += bytes;
                } else {
                    self.stats.discard_operations += 1;
                    self.stats.discard_bytes += bytes;
                }
                let end = ranges.iter().filter(|&&(_, len)| len > 0).map(|&(o, len)| o + len).max().unwrap_or(0);
                self.stats.wr_highest_offset = self.stats.wr_highest_offset.max(end);
                Ok(0)
            }
        }
    }

    /// preadv/pwritev between the file at `offset` and the guest segments, all or nothing (a short transfer is an
    /// error). Returns the bytes moved. Every segment is checked against guest memory before the file is touched,
    /// and the whole scatter-gather list goes to the host in one call: a Linux guest's 1 MiB request is up to 254
    /// separate pages, and a call per page costs more than the copy itself when the image is in the page cache.
    fn transfer(&self, mem: &GuestMemoryMmap, data: &[Segment], offset: u64, write: bool) -> io::Result<u64> {
        let file = match &self.backend {
            Backend::Raw(file) => file,
            Backend::Qcow2(qcow2) => return transfer_qcow2(qcow2, mem, data, offset, write),
        };
        let fd = file.as_raw_fd();
        let bad = || io::Error::new(io::ErrorKind::InvalidInput, "buffer outside guest memory");
        let access = if write { Permissions::Read } else { Permissions::Write };
        // The guards keep the mappings the iovecs point into alive until the I/O is done.
        let mut guards = Vec::with_capacity(data.len());
        let mut iovecs = Vec::with_capacity(data.len());
        for s in data {
            for slice in mem.get_slices(s.addr, s.len as usize, access).map_err(|_| bad())? {
                let slice = slice.map_err(|_| bad())?;
                let guard = slice.ptr_guard_mut();
                if !slice.is_empty() {
                    iovecs.push(libc::iovec { iov_base: guard.as_ptr().cast(), iov_len: slice.len() });
                }
                guards.push(guard);
            }
        }
        let mut done = 0u64;
        let mut first = 0;
        while first < iovecs.len() {
            let pending = &mut iovecs[first..];
            let count = pending.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
            let at = offset.checked_add(done).and_then(|at| libc::off_t::try_from(at).ok()).ok_or_else(bad)?;
            // SAFETY: the first `count` iovecs of `pending` each describe memory inside a mapping of guest memory
            // that `guards` keeps alive (checked by `get_slices`); the kernel reads or writes only within them.
            // Guest memory may change under us, which is the guest's problem, not a memory-safety one for the
            // host.
            let n = unsafe {
                if write {
                    libc::pwritev(fd, pending.as_ptr(), count, at)
                } else {
                    libc::preadv(fd, pending.as_ptr(), count, at)
                }
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "image ended early"));
            }
            let mut n = n as usize;
            done += n as u64;
            // Skip what was moved: whole iovecs, then part of the next one.
            while n > 0 && first < iovecs.len() {
                let iov = &mut iovecs[first];
                if n < iov.iov_len {
                    // SAFETY: n < iov_len, so the pointer stays inside the same guest memory slice.
                    iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(n) }.cast();
                    iov.iov_len -= n;
                    n = 0;
                } else {
                    n -= iov.iov_len;
                    first += 1;
                }
            }
        }
        drop(guards);
        Ok(done)
    }

    /// Deallocates (`zeroes` false) or zeroes a byte range: fallocate where the file system can, else writes
    /// zeros so the range reads back as zeros either way.
    fn discard(&self, offset: u64, len: u64, zeroes: bool, unmap: bool) -> io::Result<()> {
        let Backend::Raw(file) = &self.backend else { return Err(io::ErrorKind::Unsupported.into()) };
        if len == 0 {
            return Ok(());
        }
        let mode = if zeroes && !unmap {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        };
        let (off, n) = (
            libc::off_t::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?,
            libc::off_t::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?,
        );
        // SAFETY: fallocate only takes integers.
        if unsafe { libc::fallocate(file.as_raw_fd(), mode, off, n) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::ENODEV) => {
                self.write_zeros(file, offset, len)
            }
            _ => Err(e),
        }
    }

    fn write_zeros(&self, file: &File, mut offset: u64, len: u64) -> io::Result<()> {
        let skip = self.zeros.as_ptr().align_offset(4096);
        let zeros = &self.zeros[skip..skip + (64 << 10)];
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(zeros.len() as u64) as usize;
            file.write_all_at(&zeros[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }
}

/// Reads or writes a qcow2 image at `offset` from or into the guest segments, all or nothing; every segment is
/// checked against guest memory before imago is called. Returns the bytes moved.
fn transfer_qcow2(
    qcow2: &Qcow2Image,
    mem: &GuestMemoryMmap,
    data: &[Segment],
    offset: u64,
    write: bool,
) -> io::Result<u64> {
    let bad = || io::Error::new(io::ErrorKind::InvalidInput, "buffer outside guest memory");
    let access = if write { Permissions::Read } else { Permissions::Write };
    let mut slices = Vec::with_capacity(data.len());
    for s in data {
        for slice in mem.get_slices(s.addr, s.len as usize, access).map_err(|_| bad())? {
            slices.push(slice.map_err(|_| bad())?);
        }
    }
    let bytes: u64 = slices.iter().map(|s| s.len() as u64).sum();
    // The guards keep the mappings the vectors point into alive until imago is done.
    if write {
        let (vector, _guard) = imago::io_buffers::IoVector::from_volatile_slice(&slices);
        qcow2.writev(vector, offset)?;
    } else {
        let (vector, _guard) = imago::io_buffers::IoVectorMut::from_volatile_slice(&slices);
        qcow2.readv(vector, offset)?;
    }
    Ok(bytes)
}

/// DISCARD and WRITE_ZEROES on a qcow2 image (see the module documentation).
fn discard_qcow2(qcow2: &mut Qcow2Image, offset: u64, len: u64, zeroes: bool, unmap: bool) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    match (zeroes, unmap) {
        (true, true) => qcow2.discard_to_zero(offset, len),
        (true, false) => qcow2.write_zeroes(offset, len),
        // A discard is a hint the device may ignore: a range the format cannot free stays as it is.
        (false, _) => match qcow2.discard_to_any(offset, len) {
            Err(e) if e.kind() == io::ErrorKind::Unsupported => Ok(()),
            other => other,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::collections::hash_map::DefaultHasher;
    use std::hash::{Hash, Hasher};
    use std::sync::{Arc, Mutex};

    use std::path::Path;
    use vm_memory::{Bytes, GuestAddress};

    use vmm_sys_util::tempfile::TempFile;

    use super::*;
    use crate::virtio::testing::{guest_memory, write_desc_at, CountingLine, Desc, TestQueue};
    use crate::virtio::testing::{DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
    use crate::virtio::VirtioInterrupt;

    const DISK: u64 = 64 << 10;
    const HDR: u64 = 0x10000;
    const DATA: u64 = 0x20000;
    const STATUS: u64 = 0x30000;
    const MEM: usize = 1 << 20;

    struct Fixture {
        blk: Block,
        mem: GuestMemoryMmap,
        tq: TestQueue,
        irq: Arc<VirtioInterrupt>,
        image: TempFile,
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 512) as u8).collect()
    }

    fn image() -> TempFile {
        let image = TempFile::new_with_prefix("/tmp/kestrel-blk-test").unwrap();
        image.as_file().write_all_at(&pattern(DISK as usize), 0).unwrap();
        image
    }

    fn fixture_with(options: BlockOptions, extra_features: u64) -> Fixture {
        let image = image();
        let mut blk = Block::open(image.as_path(), &options).unwrap();
        let mem = guest_memory(MEM);
        let tq = TestQueue::new(GuestAddress(0x1000), 16);
        let irq = Arc::new(VirtioInterrupt::new(CountingLine::new()));
        let wanted = features::VERSION_1 | feature::FLUSH | feature::DISCARD | feature::WRITE_ZEROES | extra_features;
        blk.ack_features(wanted & blk.avail_features());
        blk.activate(mem.clone(), vec![tq.queue()], irq.clone()).unwrap();
        Fixture { blk, mem, tq, irq, image }
    }

    fn fixture() -> Fixture {
        fixture_with(BlockOptions { serial: "kestrel-disk-0".into(), ..Default::default() }, 0)
    }

    fn file_bytes(f: &Fixture) -> Vec<u8> {
        std::fs::read(f.image.as_path()).unwrap()
    }

    fn digest(bytes: &[u8]) -> u64 {
        let mut h = DefaultHasher::new();
        bytes.hash(&mut h);
        h.finish()
    }

    impl Fixture {
        fn header(&self, kind: u32, sector: u64) {
            self.header_at(HDR, kind, sector);
        }
        fn header_at(&self, at: u64, kind: u32, sector: u64) {
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&kind.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&h, GuestAddress(at)).unwrap();
        }
        /// Submits a chain, runs the device, returns (status byte at STATUS, used length).
        fn submit(&mut self, descs: &[Desc]) -> (u8, u32) {
            self.mem.write_obj(0xaau8, GuestAddress(STATUS)).unwrap();
            let head = self.tq.add_chain(&self.mem, descs);
            self.run(head)
        }
        fn run(&mut self, head: u16) -> (u8, u32) {
            self.blk.process_queue(0);
            let (id, len) = self.tq.pop_used(&self.mem).expect("a used entry");
            assert_eq!(id, u32::from(head));
            (self.mem.read_obj(GuestAddress(STATUS)).unwrap(), len)
        }
        fn read_guest(&self, at: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0u8; len];
            self.mem.read_slice(&mut v, GuestAddress(at)).unwrap();
            v
        }
        /// A well-behaved read of sector 0 still works.
        fn assert_healthy(&mut self) {
            self.header(T_IN, 0);
            let r = self.submit(&[Desc::r(HDR, 16), Desc::w(DATA, 512), Desc::w(STATUS, 1)]);
            assert_eq!(r, (S_OK, 513));
            assert_eq!(self.read_guest(DATA, 512), file_bytes(self)[..512]);
            assert!(!self.irq.needs_reset());
        }
    }

    #[test]
    fn config_space_and_features() {
        let f = fixture();
        let mut cfg = [0u8; 8];
        f.blk.read_config(0, &mut cfg);
        assert_eq!(u64::from_le_bytes(cfg), DISK / 512);
        let mut seg_max = [0u8; 4];
        f.blk.read_config(12, &mut seg_max);
        assert_eq!(u32::from_le_bytes(seg_max), SEG_MAX);
        let mut beyond = [0xffu8; 8];
        f.blk.read_config(CONFIG_LEN as u64 - 2, &mut beyond);
        assert_eq!(beyond, [0; 8]);
        f.blk.read_config(u64::MAX, &mut beyond);
        assert_eq!(beyond, [0; 8]);
        let feats = f.blk.avail_features();
        assert_eq!(feats & feature::RO, 0);
        assert_ne!(feats & (feature::FLUSH | feature::DISCARD | feature::WRITE_ZEROES), 0);

        let ro = fixture_with(BlockOptions { read_only: true, ..Default::default() }, 0);
        assert_ne!(ro.blk.avail_features() & feature::RO, 0);
        assert_eq!(ro.blk.avail_features() & (feature::DISCARD | feature::WRITE_ZEROES), 0);
        assert!(Block::with_file(image().into_file(), &BlockOptions { serial: "x".repeat(21), ..Default::default() })
            .is_err());
    }

    #[test]
    fn write_then_read_round_trip() {
        let mut f = fixture();
        let data = vec![0x5au8; 1024];
        f.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
        f.header(T_OUT, 2);
        assert_eq!(f.submit(&[Desc::r(HDR, 16), Desc::r(DATA, 1024), Desc::w(STATUS, 1)]), (S_OK, 1));
        let bytes = file_bytes(&f);
        assert_eq!(&bytes[1024..2048], &data[..]);
        assert_eq!(bytes[..1024], pattern(DISK as usize)[..1024]);
        assert_eq!(bytes[2048..], pattern(DISK as usize)[2048..]);

        // Read back into two scattered buffers.
        f.header(T_IN, 1);
        let r = f.submit(&[Desc::r(HDR, 16), Desc::w(0x40000, 512), Desc::w(0x50000, 1024), Desc::w(STATUS, 1)]);
        assert_eq!(r, (S_OK, 1537));
        assert_eq!(f.read_guest(0x40000, 512), pattern(DISK as usize)[512..1024]);
        assert_eq!(f.read_guest(0x50000, 1024), data);
        // The last sector.
        f.header(T_IN, DISK / 512 - 1);
        assert_eq!(f.submit(&[Desc::r(HDR, 16), Desc::w(DATA, 512), Desc::w(STATUS, 1)]), (S_OK, 513));
        let s = f.blk.stats();
        assert_eq!((s.rd_operations, s.rd_bytes, s.wr_operations, s.wr_bytes), (2, 2048, 1, 1024));
        assert!(s.total_time_ns.read > 0 && s.total_time_ns.write > 0);
    }

    #[test]
    fn a_request_of_many_scattered_buffers_moves_every_byte_in_order() {
        let mut f = fixture();
        // As many 512-byte buffers as the test queue (16) holds besides header and status, 1 KiB apart and in
        // descending guest addresses: the disk order is the chain's.
        let buffers: Vec<u64> = (0..14).map(|i| 0x80000 - i * 1024).collect();
        let data = pattern(buffers.len() * 512).into_iter().rev().collect::<Vec<u8>>();
        for (i, &at) in buffers.iter().enumerate() {
            f.mem.write_slice(&data[i * 512..(i + 1) * 512], GuestAddress(at)).unwrap();
        }
        let chain = |write: bool| {
            let mut descs = vec![Desc::r(HDR, 16)];
            descs.extend(buffers.iter().map(|&at| if write { Desc::r(at, 512) } else { Desc::w(at, 512) }));
            descs.push(Desc::w(STATUS, 1));
            descs
        };
        f.header(T_OUT, 8);
        assert_eq!(f.submit(&chain(true)), (S_OK, 1));
        let bytes = file_bytes(&f);
        assert_eq!(&bytes[4096..4096 + data.len()], &data[..]);
        assert_eq!(bytes[..4096], pattern(DISK as usize)[..4096]);
        assert_eq!(bytes[4096 + data.len()..], pattern(DISK as usize)[4096 + data.len()..]);

        for &at in &buffers {
            f.mem.write_slice(&[0u8; 512], GuestAddress(at)).unwrap();
        }
        f.header(T_IN, 8);
        assert_eq!(f.submit(&chain(false)), (S_OK, 1 + data.len() as u32));
        for (i, &at) in buffers.iter().enumerate() {
            assert_eq!(f.read_guest(at, 512), data[i * 512..(i + 1) * 512], "buffer {i}");
        }
    }

    #[test]
    fn a_write_with_any_buffer_outside_memory_changes_nothing() {
        let mut f = fixture();
        let before = digest(&file_bytes(&f));
        f.mem.write_slice(&[0x33u8; 512], GuestAddress(DATA)).unwrap();
        f.header(T_OUT, 0);
        let r = f.submit(&[Desc::r(HDR, 16), Desc::r(DATA, 512), Desc::r(1 << 40, 512), Desc::w(STATUS, 1)]);
        assert_eq!(r, (S_IOERR, 1));
        assert_eq!(digest(&file_bytes(&f)), before);
        f.assert_healthy();
    }

    #[test]
    fn a_read_the_image_ends_in_the_middle_of_is_an_error() {
        // The image shrinks to end half-way through the second of two buffers: the host moves 768 bytes, then
        // none.
        let mut f = fixture();
        f.image.as_file().set_len(DISK / 2 + 256).unwrap();
        f.header(T_IN, DISK / 1024 - 1);
        let r = f.submit(&[Desc::r(HDR, 16), Desc::w(DATA, 512), Desc::w(0x40000, 512), Desc::w(STATUS, 1)]);
        assert_eq!(r, (S_IOERR, 1));
        assert_eq!(f.read_guest(DATA, 512), pattern(DISK as usize)[DISK as usize / 2 - 512..DISK as usize / 2]);
        assert_eq!(f.read_guest(0x40000, 256), pattern(DISK as usize)[DISK as usize / 2..DISK as usize / 2 + 256]);
        assert_eq!(f.blk.stats().failed, PerType { read: 1, ..Default::default() });
    }

    #[test]
    fn framing_is_free() {
        let mut f = fixture();
        // Header split over two descriptors; the status shares the last read buffer.
        f.header(T_IN, 3);
        let r = f.submit(&[Desc::r(HDR, 8), Desc::r(HDR + 8, 8), Desc::w(STATUS - 512, 513)]);
        assert_eq!(r, (S_OK, 513));
        assert_eq!(f.read_guest(STATUS - 512, 512), pattern(DISK as usize)[1536..2048]);
        // Header and write data in one descriptor.
        f.mem.write_slice(&[0x11u8; 512], GuestAddress(HDR + 16)).unwrap();
        f.header(T_OUT, 0);
        assert_eq!(f.submit(&[Desc::r(HDR, 16 + 512), Desc::w(STATUS, 1)]), (S_OK, 1));
        assert_eq!(file_bytes(&f)[..512], [0x11u8; 512]);
    }

    #[test]
    fn indirect_tables_work_and_nesting_or_overlong_ones_do_not() {
        let mut f = fixture_with(BlockOptions::default(), features::RING_INDIRECT_DESC);
        let table = 0x60000;
        let descs = [Desc::r(HDR, 16), Desc::w(DATA, 512), Desc::w(STATUS, 1)];
        for (i, d) in descs.iter().enumerate() {
            let mut d = *d;
            if i < 2 {
                d.flags |= DESC_F_NEXT;
                d.next = i as u16 + 1;
            }
            write_desc_at(&f.mem, GuestAddress(table + 16 * i as u64), d);
        }
        f.header(T_IN, 0);
        let indirect = Desc { addr: table, len: 48, flags: DESC_F_INDIRECT, next: 0 };
        assert_eq!(f.submit(&[indirect]), (S_OK, 513));

        // An indirect descriptor inside an indirect table.
        write_desc_at(&f.mem, GuestAddress(table + 16), Desc { addr: table, len: 48, flags: DESC_F_INDIRECT, next: 0 });
        write_desc_at(&f.mem, GuestAddress(table), Desc { addr: HDR, len: 16, flags: DESC_F_NEXT, next: 1 });
        assert_eq!(f.submit(&[indirect]), (0xaa, 0));

        // A table longer than the device looks at (a 300-descriptor chain of 1-byte buffers).
        let long = 0x70000;
        for i in 0..300u16 {
            let flags = if i < 299 { DESC_F_NEXT } else { DESC_F_WRITE };
            write_desc_at(
                &f.mem,
                GuestAddress(long + 16 * u64::from(i)),
                Desc { addr: HDR, len: 1, flags, next: i + 1 },
            );
        }
        assert_eq!(f.submit(&[Desc { addr: long, len: 300 * 16, flags: DESC_F_INDIRECT, next: 0 }]), (0xaa, 0));
        // An indirect table outside memory, or of a length that is not a whole number of descriptors.
        assert_eq!(f.submit(&[Desc { addr: 1 << 40, len: 48, flags: DESC_F_INDIRECT, next: 0 }]), (0xaa, 0));
        assert_eq!(f.submit(&[Desc { addr: table, len: 47, flags: DESC_F_INDIRECT, next: 0 }]), (0xaa, 0));
        f.assert_healthy();
    }

    #[test]
    fn flush_and_get_id() {
        let mut f = fixture();
        f.header(T_FLUSH, 0);
        assert_eq!(f.submit(&[Desc::r(HDR, 16), Desc::w(STATUS, 1)]), (S_OK, 1));
        f.header(T_GET_ID, 0);
        assert_eq!(f.submit(&[Desc::r(HDR, 16), Desc::w(DATA, 20), Desc::w(STATUS, 1)]), (S_OK, 21));
        assert_eq!(f.read_guest(DATA, 20), b"kestrel-disk-0\0\0\0\0\0\0");
        // A short buffer gets what fits.
        f.mem.write_slice(&[0xee; 20], GuestAddress(DATA)).unwrap();
        assert_eq!(f.submit(&[Desc::r(HDR, 16), Desc::w(DATA, 4), Desc::w(STATUS, 1)]), (S_OK, 5));
        assert_eq!(f.read_guest(DATA, 5), b"kest\xee");
        assert_eq!(f.blk.stats().flush_operations, 1);
    }

    fn discard_segment(f: &Fixture, at: u64, sector: u64, sectors: u32, flags: u32) {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&sectors.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        f.mem.write_slice(&s, GuestAddress(at)).unwrap();
    }

    #[test]
    fn discard_and_write_zeroes_read_back_as_zeros() {
        let mut f = fixture();
        let original = pattern(DISK as usize);
        let seg = [Desc::r(HDR, 16), Desc::r(DATA, 16), Desc::w(STATUS, 1)];
        for (kind, flags, sector) in [(T_DISCARD, 0, 8), (T_WRITE_ZEROES, 0, 16), (T_WRITE_ZEROES, 1, 24)] {
            f.header(kind, 0);
            discard_segment(&f, DATA, sector, 3, flags);
            assert_eq!(f.submit(&seg), (S_OK, 1), "type {kind} flags {flags}");
            let bytes = file_bytes(&f);
            let (start, end) = (sector as usize * 512, (sector as usize + 3) * 512);
            assert!(bytes[start..end].iter().all(|&b| b == 0), "type {kind} flags {flags}");
            assert_eq!(bytes[end..end + 512], original[end..end + 512]);
            assert_eq!(bytes[start - 512..start], original[start - 512..start]);
            assert_eq!(bytes.len() as u64, DISK);
        }
        // Discard with UNMAP, unknown flags, two segments, no segment: unsupported. Past the end: I/O error.
        let before = digest(&file_bytes(&f));
        f.header(T_DISCARD, 0);
        discard_segment(&f, DATA, 0, 1, 1);
        assert_eq!(f.submit(&seg).0, S_UNSUPP);
        f.header(T_WRITE_ZEROES, 0);
        discard_segment(&f, DATA, 0, 1, 2);
        assert_eq!(f.submit(&seg).0, S_UNSUPP);
        discard_segment(&f, DATA, 0, 1, 0);
        discard_segment(&f, DATA + 16, 1, 1, 0);
        assert_eq!(f.submit(&[Desc::r(HDR, 16), Desc::r(DATA, 32), Desc::w(STATUS, 1)]).0, S_UNSUPP);
        assert_eq!(f.submit(&[Desc::r(HDR, 16), Desc::w(STATUS, 1)]).0, S_UNSUPP);
        assert_eq!(f.submit(&[Desc::r(HDR, 16), Desc::r(DATA, 15), Desc::w(STATUS, 1)]).0, S_UNSUPP);
        for (sector, sectors) in [(DISK / 512, 1), (DISK / 512 - 1, 2), (u64::MAX, 1), (0, MAX_DISCARD_SECTORS + 1)] {
            discard_segment(&f, DATA, sector, sectors, 0);
            assert_eq!(f.submit(&seg).0, S_IOERR, "sector {sector} + {sectors}");
        }
        assert_eq!(digest(&file_bytes(&f)), before);
        f.assert_healthy();
        // Done: one discard and two write-zeroes of 3 sectors each, the last ending at sector 27. Refused: five
        // unsupported (not counted by type) and four out of range.
        let s = f.blk.stats();
        assert_eq!((s.discard_operations, s.discard_bytes), (1, 3 * 512));
        assert_eq!((s.write_zeroes_operations, s.write_zeroes_bytes), (2, 6 * 512));
        assert_eq!((s.wr_operations, s.wr_highest_offset), (0, 27 * 512));
        assert_eq!(s.invalid_operations, 9);
        assert_eq!(s.invalid, PerType { write_zeroes: 4, ..Default::default() });
        assert_eq!(s.failed, PerType::default());
    }

    /// Runs qemu-img; its stdout. Panics with its stderr if it fails.
    fn qemu_img(args: &[&str]) -> String {
        let out = std::process::Command::new("qemu-img").args(args).output().expect("running qemu-img (qemu-utils)");
        assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Where the base of [`qcow2_fixture`] has a zero cluster.
    const ZERO_CLUSTER: std::ops::Range<usize> = 32 << 10..36 << 10;

    /// The base's content: `pattern` but for a zero cluster.
    fn qcow2_base() -> Vec<u8> {
        let mut base = pattern(DISK as usize);
        base[ZERO_CLUSTER].fill(0);
        base
    }

    /// A disk on `overlay.qcow2` in `dir`, a qcow2 overlay (made by qemu-img) over `base.qcow2`, which holds
    /// [`qcow2_base`] (also kept as `base.raw`) in compressed 4 KiB clusters and one zero cluster.
    fn qcow2_fixture(dir: &Path) -> Fixture {
        let p = |name: &str| dir.join(name).to_str().unwrap().to_string();
        std::fs::write(dir.join("base.raw"), pattern(DISK as usize)).unwrap();
        let (raw, base) = (p("base.raw"), p("base.qcow2"));
        qemu_img(&["convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", &raw, &base]);
        let zero = format!("write -z {} {}", ZERO_CLUSTER.start, ZERO_CLUSTER.len());
        let out = std::process::Command::new("qemu-io").args(["-c", &zero, &base]).output().expect("qemu-io");
        assert!(out.status.success(), "qemu-io: {}", String::from_utf8_lossy(&out.stderr));
        std::fs::write(dir.join("base.raw"), qcow2_base()).unwrap();
        let map = qemu_img(&["map", "--output=json", &base]);
        assert!(map.contains(r#""zero": true, "data": false"#), "a zero cluster in the base: {map}");
        let check = qemu_img(&["check", &base]);
        assert!(check.contains("compressed clusters") && !check.contains(" 0.00% compressed"), "{check}");
        qemu_img(&["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", &p("overlay.qcow2")]);
        let options = BlockOptions { format: ImageFormat::Qcow2, ..Default::default() };
        let mut blk = Block::open(&dir.join("overlay.qcow2"), &options).unwrap();
        let mem = guest_memory(MEM);
        let tq = TestQueue::new(GuestAddress(0x1000), 16);
        let irq = Arc::new(VirtioInterrupt::new(CountingLine::new()));
        blk.ack_features(features::VERSION_1 | feature::FLUSH | feature::DISCARD | feature::WRITE_ZEROES);
        blk.activate(mem.clone(), vec![tq.queue()], irq.clone()).unwrap();
        // `image` is unused here: the disk is the overlay.
        Fixture { blk, mem, tq, irq, image: image() }
    }

    #[test]
    fn qcow2_requests_go_through_the_overlay_and_qemu_img_agrees() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/kestrel-blk-qcow2").unwrap();
        let dir = dir.as_path();
        let overlay = dir.join("overlay.qcow2");
        let mut f = qcow2_fixture(dir);
        assert_eq!((f.blk.capacity(), f.blk.image().format), (DISK / 512, ImageFormat::Qcow2));
        let backing = f.blk.image().backing.as_ref().expect("a backing file");
        assert_eq!((backing.name.as_str(), backing.image.format), ("base.qcow2", ImageFormat::Qcow2));
        assert_eq!(backing.image.filename, dir.join("base.qcow2"));
        let mut expected = qcow2_base();

        // A read straddling two descriptors comes from the base's compressed clusters, through the overlay.
        f.header(T_IN, 3);
        let read = [Desc::r(HDR, 16), Desc::w(DATA, 512), Desc::w(DATA + 4096, 512), Desc::w(STATUS, 1)];
        assert_eq!(f.submit(&read), (S_OK, 1025));
        assert_eq!(f.read_guest(DATA, 512), expected[3 * 512..4 * 512]);
        assert_eq!(f.read_guest(DATA + 4096, 512), expected[4 * 512..5 * 512]);
        // A write of sectors 1-2 allocates in the overlay.
        f.mem.write_slice(&[0x11; 1024], GuestAddress(DATA)).unwrap();
        f.header(T_OUT, 1);
        assert_eq!(f.submit(&[Desc::r(HDR, 16), Desc::r(DATA, 1024), Desc::w(STATUS, 1)]), (S_OK, 1));
        expected[512..1536].fill(0x11);
        // Write-zeroes without and with UNMAP: the base's data must not show through.
        let seg = [Desc::r(HDR, 16), Desc::r(DATA, 16), Desc::w(STATUS, 1)];
        for (sector, flags) in [(16u64, 0), (24, 1)] {
            f.header(T_WRITE_ZEROES, 0);
            discard_segment(&f, DATA, sector, 3, flags);
            assert_eq!(f.submit(&seg), (S_OK, 1), "write-zeroes flags {flags}");
            expected[sector as usize * 512..(sector as usize + 3) * 512].fill(0);
        }
        // A discard leaves its range undefined (the base may show through): compared nowhere below.
        f.header(T_DISCARD, 0);
        discard_segment(&f, DATA, 40, 3, 0);
        assert_eq!(f.submit(&seg), (S_OK, 1));
        // Past the end: refused before imago is asked.
        f.header(T_IN, DISK / 512);
        assert_eq!(f.submit(&[Desc::r(HDR, 16), Desc::w(DATA, 512), Desc::w(STATUS, 1)]).0, S_IOERR);
        f.header(T_IN, 16);
        assert_eq!(f.submit(&read), (S_OK, 1025));
        assert_eq!(f.read_guest(DATA, 512), vec![0; 512], "zeroed, not the base's data");
        // The base's zero cluster reads as zeros, its neighbour as data.
        f.header(T_IN, (ZERO_CLUSTER.end / 512 - 1) as u64);
        assert_eq!(f.submit(&read), (S_OK, 1025));
        assert_eq!(
            (f.read_guest(DATA, 512), f.read_guest(DATA + 4096, 512)),
            (vec![0; 512], expected[ZERO_CLUSTER.end..][..512].to_vec())
        );
        f.header(T_FLUSH, 0);
        assert_eq!(f.submit(&[Desc::r(HDR, 16), Desc::w(STATUS, 1)]), (S_OK, 1));
        let s = f.blk.stats();
        assert_eq!((s.rd_operations, s.wr_operations, s.write_zeroes_operations, s.discard_operations), (3, 1, 2, 1));
        assert_eq!((s.failed_operations, s.flush_operations), (0, 1));

        // Written back (the disk still open): qemu-img finds a consistent image with the expected content.
        f.blk.flush_image().unwrap();
        let check = qemu_img(&["check", "-U", overlay.to_str().unwrap()]);
        assert!(check.contains("No errors were found on the image."), "{check}");
        let out = dir.join("out.raw");
        qemu_img(&["convert", "-U", "-O", "raw", overlay.to_str().unwrap(), out.to_str().unwrap()]);
        let mut got = std::fs::read(&out).unwrap();
        got[40 * 512..43 * 512].copy_from_slice(&expected[40 * 512..43 * 512]);
        assert!(got == expected, "the overlay's content differs");
        let base = qemu_img(&[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            &format!("{}", dir.join("base.qcow2").display()),
            &format!("{}", dir.join("base.raw").display()),
        ]);
        assert!(base.contains("Images are identical."), "the base changed: {base}");
    }

    #[test]
    fn a_qcow2_disk_state_names_its_format_and_a_raw_disk_refuses_it() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/kestrel-blk-qcow2").unwrap();
        let f = qcow2_fixture(dir.as_path());
        let state = f.blk.save_state();
        let VirtioDeviceState::Block(ref disk) = state else { panic!("{state:?}") };
        assert_eq!(disk.format.0, "qcow2");
        // The same capacity, block size and serial on a raw image: another disk all the same.
        let mut raw = Block::with_file(image().into_file(), &BlockOptions::default()).unwrap();
        assert_eq!(raw.restore_state(&state, 0, None).unwrap_err().field, "format");
        // A raw disk's state leaves the field out, as states written before qcow2 support did, and reads it back.
        let raw_state = raw.save_state();
        let json = serde_json::to_value(&raw_state).unwrap();
        assert!(json["Block"].get("format").is_none(), "{json}");
        let back: VirtioDeviceState = serde_json::from_value(json).unwrap();
        assert_eq!(back, raw_state);
    }

    #[test]
    fn a_read_only_disk_refuses_every_write_and_stays_unchanged() {
        let mut f = fixture_with(BlockOptions { read_only: true, ..Default::default() }, feature::RO);
        let before = digest(&file_bytes(&f));
        f.mem.write_slice(&[0x77u8; 512], GuestAddress(DATA)).unwrap();
        f.header(T_OUT, 0);
        assert_eq!(f.submit(&[Desc::r(HDR, 16), Desc::r(DATA, 512), Desc::w(STATUS, 1)]), (S_IOERR, 1));
        for kind in [T_DISCARD, T_WRITE_ZEROES] {
            f.header(kind, 0);
            discard_segment(&f, DATA, 0, 1, 0);
            assert_eq!(f.submit(&[Desc::r(HDR, 16), Desc::r(DATA, 16), Desc::w(STATUS, 1)]).0, S_IOERR);
        }
        f.header(T_FLUSH, 0);
        assert_eq!(f.submit(&[Desc::r(HDR, 16), Desc::w(STATUS, 1)]).0, S_OK);
        assert_eq!(digest(&file_bytes(&f)), before);
        f.assert_healthy();
        let s = f.blk.stats();
        assert_eq!(s.invalid, PerType { write: 1, discard: 1, write_zeroes: 1, ..Default::default() });
        assert_eq!((s.wr_operations, s.wr_highest_offset, s.flush_operations), (0, 0, 1));
    }

    #[test]
    fn host_io_errors_reach_the_guest() {
        // The image shrinks behind the device's back: reads past the new end come up short.
        let mut f = fixture();
        f.image.as_file().set_len(DISK / 2).unwrap();
        f.header(T_IN, DISK / 512 - 1);
        assert_eq!(f.submit(&[Desc::r(HDR, 16), Desc::w(DATA, 512), Desc::w(STATUS, 1)]), (S_IOERR, 1));
        assert_eq!(f.blk.stats().failed_operations, 1);
        assert_eq!(f.blk.stats().failed, PerType { read: 1, ..Default::default() });
        assert_eq!(f.blk.stats().rd_operations, 0);

        // A device that thinks it may write to an image opened read-only by the host: EBADF.
        let image = image();
        let mut blk = Block::with_file(File::open(image.as_path()).unwrap(), &BlockOptions::default()).unwrap();
        let mem = guest_memory(MEM);
        let mut tq = TestQueue::new(GuestAddress(0x1000), 16);
        blk.ack_features(features::VERSION_1);
        blk.activate(mem.clone(), vec![tq.queue()], Arc::new(VirtioInterrupt::new(CountingLine::new()))).unwrap();
        let g = Fixture { blk, mem, tq: tq.clone(), irq: Arc::new(VirtioInterrupt::new(CountingLine::new())), image };
        g.header(T_OUT, 0);
        tq.add_chain(&g.mem, &[Desc::r(HDR, 16), Desc::r(DATA, 512), Desc::w(STATUS, 1)]);
        let mut g = Fixture { tq, ..g };
        assert_eq!(g.run(0), (S_IOERR, 1));
    }

    #[test]
    fn hostile_chains_get_an_error_or_nothing_and_the_queue_keeps_working() {
        let mut f = fixture();
        let before = digest(&file_bytes(&f));
        let disk_sectors = DISK / 512;
        type Case = (&'static str, u32, u64, Vec<Desc>, (u8, u32));
        let cases: Vec<Case> = vec![
            (
                "data outside memory",
                T_OUT,
                0,
                vec![Desc::r(HDR, 16), Desc::r(1 << 40, 512), Desc::w(STATUS, 1)],
                (S_IOERR, 1),
            ),
            (
                "data straddling the end of memory",
                T_IN,
                0,
                vec![Desc::r(HDR, 16), Desc::w(MEM as u64 - 256, 512), Desc::w(STATUS, 1)],
                (S_IOERR, 1),
            ),
            (
                "absurd length",
                T_OUT,
                0,
                vec![Desc::r(HDR, 16), Desc::r(DATA, 0x8000_0000), Desc::w(STATUS, 1)],
                (S_IOERR, 1),
            ),
            // Over 4 GiB in total: illegal (virtio 1.2, 2.7.5.2), virtio-queue stops the walk, so it is no chain.
            (
                "chain over 4 GiB",
                T_OUT,
                0,
                vec![Desc::r(HDR, 16), Desc::r(DATA, u32::MAX), Desc::w(STATUS, 1)],
                (0xaa, 0),
            ),
            (
                "address wraps",
                T_OUT,
                0,
                vec![Desc::r(HDR, 16), Desc::r(u64::MAX - 255, 512), Desc::w(STATUS, 1)],
                (S_IOERR, 1),
            ),
            (
                "zero-length header",
                T_IN,
                0,
                vec![Desc::r(HDR, 0), Desc::w(DATA, 512), Desc::w(STATUS, 1)],
                (S_IOERR, 1),
            ),
            ("short header", T_IN, 0, vec![Desc::r(HDR, 12), Desc::w(DATA, 512), Desc::w(STATUS, 1)], (S_IOERR, 1)),
            (
                "header in a writable descriptor",
                T_OUT,
                0,
                vec![Desc::w(HDR, 16), Desc::w(DATA, 512), Desc::w(STATUS, 1)],
                (S_IOERR, 1),
            ),
            ("status read-only", T_OUT, 0, vec![Desc::r(HDR, 16), Desc::r(DATA, 512), Desc::r(STATUS, 1)], (0xaa, 0)),
            (
                "status outside memory",
                T_OUT,
                0,
                vec![Desc::r(HDR, 16), Desc::r(DATA, 512), Desc::w(1 << 40, 1)],
                (0xaa, 0),
            ),
            ("zero-length status", T_OUT, 0, vec![Desc::r(HDR, 16), Desc::r(DATA, 512), Desc::w(STATUS, 0)], (0xaa, 0)),
            (
                "readable after writable",
                T_IN,
                0,
                vec![Desc::r(HDR, 16), Desc::w(DATA, 512), Desc::r(STATUS, 1)],
                (0xaa, 0),
            ),
            (
                "sector past the end",
                T_OUT,
                disk_sectors,
                vec![Desc::r(HDR, 16), Desc::r(DATA, 512), Desc::w(STATUS, 1)],
                (S_IOERR, 1),
            ),
            (
                "data past the end",
                T_OUT,
                disk_sectors - 1,
                vec![Desc::r(HDR, 16), Desc::r(DATA, 1024), Desc::w(STATUS, 1)],
                (S_IOERR, 1),
            ),
            (
                "sector overflows",
                T_OUT,
                u64::MAX / 256,
                vec![Desc::r(HDR, 16), Desc::r(DATA, 512), Desc::w(STATUS, 1)],
                (S_IOERR, 1),
            ),
            (
                "sector u64::MAX",
                T_IN,
                u64::MAX,
                vec![Desc::r(HDR, 16), Desc::w(DATA, 512), Desc::w(STATUS, 1)],
                (S_IOERR, 1),
            ),
            (
                "length not a multiple of 512",
                T_OUT,
                0,
                vec![Desc::r(HDR, 16), Desc::r(DATA, 100), Desc::w(STATUS, 1)],
                (S_IOERR, 1),
            ),
            ("unknown type", 0x1234, 0, vec![Desc::r(HDR, 16), Desc::w(STATUS, 1)], (S_UNSUPP, 1)),
            ("SCSI passthrough", 2, 0, vec![Desc::r(HDR, 16), Desc::w(STATUS, 1)], (S_UNSUPP, 1)),
        ];
        for (what, kind, sector, descs, expected) in cases {
            f.header(kind, sector);
            assert_eq!(f.submit(&descs), expected, "{what}");
            assert!(!f.irq.needs_reset(), "{what}");
        }
        assert_eq!(digest(&file_bytes(&f)), before);
        f.assert_healthy();
    }

    #[test]
    fn malformed_chains_are_returned_empty() {
        let mut f = fixture();
        let before = digest(&file_bytes(&f));
        f.header(T_OUT, 0);
        let q = f.tq.clone();
        let flags_r = DESC_F_NEXT;
        // A loop: 0 -> 1 -> 0.
        q.write_desc(&f.mem, 0, Desc { addr: HDR, len: 16, flags: flags_r, next: 1 });
        q.write_desc(&f.mem, 1, Desc { addr: DATA, len: 512, flags: flags_r, next: 0 });
        f.tq.publish(&f.mem, 0);
        f.mem.write_obj(0xaau8, GuestAddress(STATUS)).unwrap();
        assert_eq!(f.run(0), (0xaa, 0));
        // A next index outside the table.
        q.write_desc(&f.mem, 2, Desc { addr: HDR, len: 16, flags: flags_r, next: 100 });
        f.tq.publish(&f.mem, 2);
        assert_eq!(f.run(2), (0xaa, 0));
        // A chain as long as the queue that never ends (every descriptor has NEXT).
        for i in 0..16u16 {
            q.write_desc(
                &f.mem,
                i,
                Desc { addr: STATUS, len: 1, flags: DESC_F_NEXT | DESC_F_WRITE, next: (i + 1) % 16 },
            );
        }
        f.tq.publish(&f.mem, 5);
        assert_eq!(f.run(5), (0xaa, 0));
        assert!(!f.irq.needs_reset());
        assert_eq!(digest(&file_bytes(&f)), before);
        f.assert_healthy();
    }

    #[test]
    fn a_broken_queue_does_not_stop_another_device() {
        let mut bad = fixture();
        let mut good = fixture();
        bad.tq.set_avail_idx(&bad.mem, 40_000);
        bad.blk.process_queue(0);
        assert!(bad.irq.needs_reset());
        good.assert_healthy();
        // The broken device does nothing more until reset, then works again.
        bad.tq.set_avail_idx(&bad.mem, 0);
        bad.header(T_IN, 0);
        bad.tq.add_chain(&bad.mem, &[Desc::r(HDR, 16), Desc::w(DATA, 512), Desc::w(STATUS, 1)]);
        bad.blk.process_queue(0);
        assert_eq!(bad.tq.used_idx(&bad.mem), 0);
        bad.blk.reset();
        bad.irq.reset();
        let tq = TestQueue::new(GuestAddress(0x8000), 16);
        bad.blk.ack_features(features::VERSION_1);
        bad.blk.activate(bad.mem.clone(), vec![tq.queue()], bad.irq.clone()).unwrap();
        bad.tq = tq;
        bad.assert_healthy();
    }

    #[test]
    fn event_idx_suppresses_interrupts_the_driver_did_not_ask_for() {
        let mut f = fixture_with(BlockOptions::default(), features::RING_EVENT_IDX);
        let used_event = GuestAddress(f.tq.avail_ring.0 + 4 + 2 * u64::from(f.tq.size));
        f.header(T_FLUSH, 0);
        f.tq.add_chain(&f.mem, &[Desc::r(HDR, 16), Desc::w(STATUS, 1)]);
        assert!(f.blk.process_queue(0), "used_event 0: the first used entry is wanted");
        f.tq.add_chain(&f.mem, &[Desc::r(HDR, 16), Desc::w(STATUS, 1)]);
        assert!(!f.blk.process_queue(0), "used_event still 0: no interrupt for the second");
        f.mem.write_obj(2u16.to_le(), used_event).unwrap();
        f.tq.add_chain(&f.mem, &[Desc::r(HDR, 16), Desc::w(STATUS, 1)]);
        assert!(f.blk.process_queue(0));
        assert_eq!(f.tq.used_idx(&f.mem), 3);
    }

    /// A disk behind a virtio-mmio transport on `mem`, and the disk itself (for its statistics).
    fn transported(blk: Block, mem: &GuestMemoryMmap) -> (crate::virtio::mmio::MmioTransport, Arc<Mutex<Block>>) {
        let blk = Arc::new(Mutex::new(blk));
        let transport = crate::virtio::mmio::MmioTransport::new(mem.clone(), blk.clone(), CountingLine::new());
        (transport.unwrap(), blk)
    }

    /// Makes a write of `sectors` sectors of `byte` at `sector` available; its header, data and status live at
    /// `slot`-th places after HDR, DATA and STATUS.
    fn queue_write(mem: &GuestMemoryMmap, ring: &mut TestQueue, slot: u64, sector: u64, byte: u8) {
        let (hdr, data, status) = (HDR + 16 * slot, DATA + 512 * slot, STATUS + slot);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&T_OUT.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        mem.write_slice(&[byte; 512], GuestAddress(data)).unwrap();
        mem.write_obj(0xaau8, GuestAddress(status)).unwrap();
        ring.add_chain(mem, &[Desc::r(hdr, 16), Desc::r(data, 512), Desc::w(status, 1)]);
    }

    fn sector(image: &TempFile, sector: usize) -> Vec<u8> {
        std::fs::read(image.as_path()).unwrap()[sector * 512..(sector + 1) * 512].to_vec()
    }

    fn options() -> BlockOptions {
        BlockOptions { serial: "kestrel-disk-0".into(), ..Default::default() }
    }

    /// A disk that wrote one request, then was quiesced with two more writes waiting, and its saved state.
    fn saved_disk() -> (TempFile, GuestMemoryMmap, TestQueue, crate::virtio::transport::VirtioState) {
        use crate::virtio::testing::MmioDriver;
        use crate::Persist;
        let image = image();
        let mem = guest_memory(MEM);
        let mut ring = TestQueue::new(GuestAddress(0x1000), 16);
        let (mut source, disk) = transported(Block::open(image.as_path(), &options()).unwrap(), &mem);
        MmioDriver(&mut source).start(features::VERSION_1 | feature::FLUSH, &[&ring]);
        queue_write(&mem, &mut ring, 0, 1, 0x11);
        source.queue_handler().handle(0);
        assert_eq!(ring.pop_used(&mem), Some((0, 1)));
        source.quiesce();
        queue_write(&mem, &mut ring, 1, 2, 0x22);
        queue_write(&mem, &mut ring, 2, 3, 0x33);
        source.queue_handler().handle(0);
        assert_eq!(ring.pop_used(&mem), None, "quiesced: the writes wait");
        assert_eq!(sector(&image, 2), pattern(DISK as usize)[1024..1536]);
        assert_eq!(disk.lock().unwrap().stats().wr_operations, 1);
        let state = crate::persist::testing::through_json(&source.save());
        (image, mem, ring, state)
    }

    #[test]
    fn a_restored_disk_carries_out_each_waiting_write_once() {
        use crate::Persist;
        let (image, mem, mut ring, state) = saved_disk();
        let VirtioDeviceState::Block(ref disk_state) = state.device else { panic!("a disk's state: {state:?}") };
        assert_eq!((disk_state.capacity, disk_state.block_size), (DISK / 512, 512));
        assert_eq!(disk_state.serial, "kestrel-disk-0");
        // The destination opens the same image, as the same command line says.
        let (mut restored, disk) = transported(Block::open(image.as_path(), &options()).unwrap(), &mem);
        restored.restore(&state).unwrap();
        assert_eq!(restored.save(), state);
        restored.resume();
        restored.queue_events()[0].read().unwrap();
        restored.queue_handler().handle(0);
        let used: Vec<_> = std::iter::from_fn(|| ring.pop_used(&mem)).collect();
        assert_eq!(used, [(3, 1), (6, 1)], "the two waiting writes (heads 3 and 6), once each");
        assert_eq!(disk.lock().unwrap().stats().wr_operations, 2, "the write done before the save is not redone");
        assert_eq!((sector(&image, 2), sector(&image, 3)), (vec![0x22; 512], vec![0x33; 512]));
        assert_eq!(sector(&image, 1), vec![0x11; 512]);
        for slot in 0..3 {
            assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS + slot)).unwrap(), S_OK);
        }
        // The negotiated features came along: FLUSH is served.
        mem.write_slice(&[T_FLUSH as u8, 0, 0, 0], GuestAddress(HDR)).unwrap();
        ring.add_chain(&mem, &[Desc::r(HDR, 16), Desc::w(STATUS, 1)]);
        restored.queue_handler().handle(0);
        assert_eq!(ring.pop_used(&mem).map(|u| u.1), Some(1));
        assert_eq!(disk.lock().unwrap().stats().flush_operations, 1);
    }

    #[test]
    fn a_disk_state_is_refused_by_another_disk() {
        use crate::persist::testing::assert_refused;
        let (image, mem, _, state) = saved_disk();
        let other = |options: BlockOptions, size: u64| {
            let file = TempFile::new_with_prefix("/tmp/kestrel-blk-test").unwrap();
            file.as_file().set_len(size).unwrap();
            let (transport, _) = transported(Block::with_file(file.into_file(), &options).unwrap(), &mem);
            transport
        };
        assert_refused(&mut other(options(), DISK * 2), &state, "capacity");
        let serial = BlockOptions { serial: "another".into(), ..options() };
        assert_refused(&mut other(serial, DISK), &state, "serial");
        assert_refused(&mut other(BlockOptions { direct: true, ..options() }, DISK), &state, "block_size");
        let read_only = BlockOptions { read_only: true, ..options() };
        let (mut transport, _) = transported(Block::open(image.as_path(), &read_only).unwrap(), &mem);
        assert_refused(&mut transport, &state, "device_features");
        let rng = VirtioDeviceState::Rng(crate::virtio::rng::RngState {});
        let mut blk = Block::open(image.as_path(), &options()).unwrap();
        assert_eq!(blk.restore_state(&rng, 0, None).unwrap_err().field, "device");
        assert_eq!(blk.save_state(), state.device, "the refusal changed nothing");
    }
}

//! virtio-balloon (virtio 1.2, 5.5): the host sets a target (`num_pages`, in 4 KiB pages the guest should give
//! up), the guest's driver inflates its balloon towards it by sending the frame numbers of pages it no longer uses
//! on the inflate queue, and reports how many it holds in `actual`. Inflated pages go back to the host
//! (`MADV_DONTNEED` on their host mapping, `MADV_REMOVE` where guest memory is a shared mapping), so the guest's
//! next touch of one gets a fresh zero page. Deflating needs nothing from the device: without
//! VIRTIO_BALLOON_F_MUST_TELL_HOST (not offered) the guest may reuse a page before telling.
//!
//! The statistics queue (VIRTIO_BALLOON_F_STATS_VQ) works as QEMU's: the driver posts one buffer of (tag, value)
//! pairs, the device keeps the values and holds the buffer until its polling timer fires (the QOM property
//! `guest-stats-polling-interval`, in seconds; 0, the default, polls never), then gives it back, which asks the
//! driver to refill it. Holding is done without taking the buffer off the ring: the device reads the chain and
//! steps its available index back, so the queue stays "every chain taken is used" (what a snapshot requires) and a
//! restored device simply reads the buffer again.
//!
//! VIRTIO_BALLOON_F_DEFLATE_ON_OOM is offered only when asked (`deflate-on-oom=on`): it changes only what the
//! guest's driver does under memory pressure.

use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vm_memory::{Address, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::timerfd::TimerFd;

use super::chain::{self, Chain};
use super::{
    features, pop_available, DriverState, GuestErrorLog, GuestMemoryMmap, QueueT, VirtioDevice, VirtioDeviceState,
};
use crate::StateError;

pub const QUEUE_SIZE: u16 = 128;
pub const INFLATE_QUEUE: usize = 0;
pub const DEFLATE_QUEUE: usize = 1;
pub const STATS_QUEUE: usize = 2;

/// Feature bits (virtio 1.2, 5.5.3).
pub mod feature {
    pub const MUST_TELL_HOST: u64 = 1 << 0;
    pub const STATS_VQ: u64 = 1 << 1;
    pub const DEFLATE_ON_OOM: u64 = 1 << 2;
}

/// The balloon's page: frame numbers and `num_pages`/`actual` count 4 KiB units whatever the guest's page size.
pub const PAGE_SHIFT: u32 = 12;
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;

/// Frame numbers looked at per buffer at most (Linux sends up to 256): a buffer cannot keep the device thread
/// and lock for long. Those past it are ignored, and reported.
pub const MAX_PFNS_PER_BUFFER: usize = 4096;

/// The statistics the device keeps, by tag (virtio 1.2, 5.5.6.3), named as QEMU 7.2's `guest-stats` names them.
/// Tags past these (newer drivers send more) are ignored, as QEMU does.
pub const STAT_NAMES: [&str; 10] = [
    "stat-swap-in",
    "stat-swap-out",
    "stat-major-faults",
    "stat-minor-faults",
    "stat-free-memory",
    "stat-total-memory",
    "stat-available-memory",
    "stat-disk-caches",
    "stat-htlb-pgalloc",
    "stat-htlb-pgfail",
];

/// A statistic the guest has not reported: QEMU's value for it (all ones).
pub const STAT_UNKNOWN: u64 = u64::MAX;

/// One (tag, value) pair in the statistics buffer: le16 tag, le64 value, packed.
const STAT_ENTRY_LEN: usize = 10;
/// Statistics buffers longer than this are read only this far (a buffer of every known tag is 100 bytes).
const MAX_STATS_BYTES: usize = 64 * STAT_ENTRY_LEN;

/// The configuration space: num_pages, actual (le32 each). QEMU's is this long without free page hinting and
/// page poisoning, which Kestrel does not offer.
const CONFIG_LEN: usize = 8;

static LOG: GuestErrorLog = GuestErrorLog::new("virtio-balloon");

/// What the guest last reported on the statistics queue, as QOM's `guest-stats` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestStats {
    /// Seconds since the Unix epoch of the last report, 0 before the first.
    pub last_update: i64,
    /// By [`STAT_NAMES`] index; [`STAT_UNKNOWN`] for those never reported.
    pub values: [u64; STAT_NAMES.len()],
}

impl Default for GuestStats {
    fn default() -> Self {
        GuestStats { last_update: 0, values: [STAT_UNKNOWN; STAT_NAMES.len()] }
    }
}

/// Called with the new `actual` (pages) whenever the guest changes it: the VMM's BALLOON_CHANGE.
pub type ActualListener = Box<dyn Fn(u32) + Send>;

pub struct Balloon {
    driver: DriverState,
    deflate_on_oom: bool,
    /// The host's target: pages the guest should have in its balloon.
    num_pages: u32,
    /// Pages the guest says its balloon holds.
    actual: u32,
    stats: GuestStats,
    /// The driver's statistics buffer has been read and is held (left on the ring, see the module doc).
    stats_buffer_held: bool,
    /// Seconds between statistics polls; 0: none.
    poll_interval: u32,
    /// Fires every `poll_interval` seconds; non-blocking, watched by the device's thread.
    poll_timer: TimerFd,
    host_page_size: u64,
    actual_listener: Option<ActualListener>,
    /// Bytes given back to the host since the device was created (inflated pages whose memory was discarded).
    discarded_bytes: u64,
}

impl Balloon {
    /// A balloon with an empty target, offering DEFLATE_ON_OOM if `deflate_on_oom`.
    pub fn new(deflate_on_oom: bool) -> std::io::Result<Self> {
        let poll_timer = TimerFd::new()?;
        // SAFETY: fcntl on a descriptor this TimerFd owns; only its file status flags change.
        let set = unsafe { libc::fcntl(poll_timer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        if set != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: sysconf only reads system configuration.
        let host_page_size = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(PAGE_SIZE);
        Ok(Balloon {
            driver: DriverState::default(),
            deflate_on_oom,
            num_pages: 0,
            actual: 0,
            stats: GuestStats::default(),
            stats_buffer_held: false,
            poll_interval: 0,
            poll_timer,
            host_page_size: host_page_size.max(PAGE_SIZE),
            actual_listener: None,
            discarded_bytes: 0,
        })
    }

    /// Whoever is told when the guest changes `actual` (called with the device lock held, on a vCPU thread).
    pub fn set_actual_listener(&mut self, listener: ActualListener) {
        self.actual_listener = Some(listener);
    }

    /// The host's target, in pages the guest should hold in its balloon.
    pub fn num_pages(&self) -> u32 {
        self.num_pages
    }

    /// Pages the guest says its balloon holds.
    pub fn actual(&self) -> u32 {
        self.actual
    }

    pub fn deflate_on_oom(&self) -> bool {
        self.deflate_on_oom
    }

    pub fn guest_stats(&self) -> &GuestStats {
        &self.stats
    }

    /// Bytes of guest memory given back to the host so far.
    pub fn discarded_bytes(&self) -> u64 {
        self.discarded_bytes
    }

    /// Sets the target; a running driver is told through a configuration change interrupt.
    pub fn set_num_pages(&mut self, num_pages: u32) {
        self.num_pages = num_pages;
        if let Some(active) = self.active_queues() {
            active.interrupt.signal_config_change();
        }
    }

    /// Seconds between statistics polls (0: never).
    pub fn poll_interval(&self) -> u32 {
        self.poll_interval
    }

    /// Polls the guest's statistics every `seconds` (0: stops polling). A new interval starts with a poll now, as
    /// QEMU's does.
    pub fn set_poll_interval(&mut self, seconds: u32) -> std::io::Result<()> {
        if seconds == self.poll_interval {
            return Ok(());
        }
        self.arm_poll_timer(seconds, Duration::from_nanos(1))?;
        self.poll_interval = seconds;
        Ok(())
    }

    /// Arms the timer to fire after `first`, then every `seconds`; disarms it for 0.
    fn arm_poll_timer(&mut self, seconds: u32, first: Duration) -> std::io::Result<()> {
        if seconds == 0 {
            return self.poll_timer.clear().map_err(std::io::Error::from);
        }
        let every = Duration::from_secs(u64::from(seconds));
        self.poll_timer.reset(first, Some(every)).map_err(std::io::Error::from)
    }

    fn config(&self) -> [u8; CONFIG_LEN] {
        let mut config = [0u8; CONFIG_LEN];
        config[0..4].copy_from_slice(&self.num_pages.to_le_bytes());
        config[4..8].copy_from_slice(&self.actual.to_le_bytes());
        config
    }

    /// Inflate or deflate queue `index`: every buffer is a list of le32 frame numbers.
    fn process_pfns(&mut self, index: usize) -> bool {
        let inflating = index == INFLATE_QUEUE;
        let host_page_size = self.host_page_size;
        let mut discarded = 0u64;
        let Some(active) = self.driver.active.as_mut() else { return false };
        let notify = active.process(index, &LOG, |mem, chain| {
            match chain::parse(chain, usize::from(QUEUE_SIZE)) {
                Ok(chain) if inflating => discarded += inflate(mem, &chain, host_page_size),
                // Deflated pages are the guest's again as soon as it uses them; nothing to do.
                Ok(_) => {}
                Err(e) => LOG.report(format_args!("{e}")),
            }
            0
        });
        self.discarded_bytes += discarded;
        notify
    }

    /// The driver posted its statistics buffer: read it and hold it (left on the ring) until the next poll.
    /// Returns whether the driver must be interrupted (a broken ring).
    fn read_stats_buffer(&mut self) -> bool {
        if self.stats_buffer_held {
            // The one the driver has out is read already; another (drivers keep one) waits its turn.
            return false;
        }
        let Some(active) = self.driver.active.as_mut() else { return false };
        let Some((queue, mem)) = active.usable(STATS_QUEUE) else { return false };
        let chain = match pop_available(queue, mem) {
            Ok(Some(chain)) => chain,
            Ok(None) => return false,
            Err(why) => return active.break_queue(STATS_QUEUE, &LOG, &why),
        };
        let update = match chain::parse(chain, usize::from(QUEUE_SIZE)) {
            Ok(chain) => read_stats(mem, &chain),
            Err(e) => {
                LOG.report(format_args!("{e}"));
                None
            }
        };
        // Back onto the ring: the chain is the driver's until the poll uses it.
        queue.set_next_avail(queue.next_avail().wrapping_sub(1));
        self.stats_buffer_held = true;
        if let Some(reported) = update {
            for (tag, value) in reported {
                if let Some(slot) = self.stats.values.get_mut(usize::from(tag)) {
                    *slot = value;
                }
            }
            self.stats.last_update = unix_time();
        }
        false
    }

    /// The poll: the held statistics buffer goes back to the driver, asking it for new figures. Returns whether
    /// the driver wants an interrupt for it.
    fn return_stats_buffer(&mut self) -> bool {
        if !self.stats_buffer_held {
            return false;
        }
        let Some(active) = self.driver.active.as_mut() else { return false };
        let Some((queue, mem)) = active.usable(STATS_QUEUE) else { return false };
        let result = pop_available(queue, mem).and_then(|chain| {
            let Some(chain) = chain else { return Ok(false) };
            queue.add_used(mem, chain.head_index(), 0).map_err(|e| e.to_string())?;
            queue.needs_notification(mem).map_err(|e| e.to_string())
        });
        self.stats_buffer_held = false;
        let notify = match result {
            Ok(notify) => notify,
            Err(why) => return active.break_queue(STATS_QUEUE, &LOG, &why),
        };
        // A driver that had posted a second buffer: read it now, it is the next one held.
        self.read_stats_buffer() || notify
    }
}

/// Gives the pages `chain` names back to the host; returns the bytes discarded.
fn inflate(mem: &GuestMemoryMmap, chain: &Chain, host_page_size: u64) -> u64 {
    if let Some(bad) = chain.bad_segment {
        LOG.report(format_args!("chain {} names {:#x}+{:#x} outside guest memory", chain.head, bad.addr.0, bad.len));
        return 0;
    }
    let len = chain::total_len(&chain.readable);
    let wanted = (len / 4).min(MAX_PFNS_PER_BUFFER as u64) as usize;
    if len / 4 > wanted as u64 {
        LOG.report(format_args!("chain {} names {} pages; the first {wanted} are taken", chain.head, len / 4));
    }
    let mut raw = vec![0u8; wanted * 4];
    if chain::read_stream(mem, &chain.readable, &mut raw).is_err() {
        return 0;
    }
    // Runs of consecutive pages are given back with one call each.
    let mut discarded = 0;
    let mut run: Option<(u64, u64)> = None;
    for pfn in raw.chunks_exact(4).map(|b| u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))) {
        let addr = GuestAddress(pfn << PAGE_SHIFT);
        if !GuestMemory::check_range(mem, addr, PAGE_SIZE as usize, vm_memory::Permissions::Write) {
            LOG.report(format_args!("page frame {pfn:#x} is outside guest memory; ignored"));
            continue;
        }
        run = match run {
            Some((start, pages)) if start + pages == pfn => Some((start, pages + 1)),
            Some((start, pages)) => {
                discarded += discard(mem, start, pages, host_page_size);
                Some((pfn, 1))
            }
            None => Some((pfn, 1)),
        };
    }
    if let Some((start, pages)) = run {
        discarded += discard(mem, start, pages, host_page_size);
    }
    discarded
}

/// Gives back the host pages wholly inside the `pages` guest pages from frame `start` (all of them where the host's
/// pages are 4 KiB; a larger host page only once the guest gave up every part of it in one run). Returns the bytes
/// given back.
fn discard(mem: &GuestMemoryMmap, start: u64, pages: u64, host_page_size: u64) -> u64 {
    let begin = start << PAGE_SHIFT;
    let end = (start + pages) << PAGE_SHIFT;
    let Some(region) = GuestMemoryBackend::find_region(mem, GuestAddress(begin)) else { return 0 };
    let region_start = region.start_addr().raw_value();
    // The run was checked page by page; a run that crosses into the next region is cut at this one's end.
    let end = end.min(region_start + region.len());
    let host_base = region.as_ptr() as u64;
    let host_begin = (host_base + (begin - region_start)).next_multiple_of(host_page_size);
    let host_end = (host_base + (end - region_start)) / host_page_size * host_page_size;
    if host_end <= host_begin {
        return 0;
    }
    // Private memory (anonymous, or a snapshot file mapped copy-on-write) reads as zeros, or the file's page,
    // after MADV_DONTNEED; a shared mapping keeps its pages unless they are removed from the backing object.
    let advice = if region.flags() & libc::MAP_SHARED != 0 { libc::MADV_REMOVE } else { libc::MADV_DONTNEED };
    let len = host_end - host_begin;
    // SAFETY: [host_begin, host_end) lies inside this region's mapping (checked against its guest range above)
    // and is host-page aligned. The guest gave these pages up; discarding their contents is what it asked for, and
    // the mapping itself stays, so Kestrel's and KVM's views of guest memory remain valid.
    let done = unsafe { libc::madvise(host_begin as *mut libc::c_void, len as usize, advice) };
    if done != 0 {
        LOG.report(format_args!(
            "giving back {len:#x} bytes at guest {begin:#x} failed: {}",
            std::io::Error::last_os_error()
        ));
        return 0;
    }
    len
}

/// The (tag, value) pairs of a statistics buffer, or `None` for a buffer the device cannot read.
fn read_stats(mem: &GuestMemoryMmap, chain: &Chain) -> Option<Vec<(u16, u64)>> {
    if let Some(bad) = chain.bad_segment {
        LOG.report(format_args!("chain {} names {:#x}+{:#x} outside guest memory", chain.head, bad.addr.0, bad.len));
        return None;
    }
    let len = (chain::total_len(&chain.readable) as usize).min(MAX_STATS_BYTES);
    let mut raw = vec![0u8; len - len % STAT_ENTRY_LEN];
    chain::read_stream(mem, &chain.readable, &mut raw).ok()?;
    Some(
        raw.chunks_exact(STAT_ENTRY_LEN)
            .map(|e| {
                let tag = u16::from_le_bytes([e[0], e[1]]);
                let mut value = [0u8; 8];
                value.copy_from_slice(&e[2..10]);
                (tag, u64::from_le_bytes(value))
            })
            .collect(),
    )
}

fn unix_time() -> i64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
}

/// The balloon's own state: the target, what the guest reported (its balloon and statistics) and the polling
/// interval. The held statistics buffer is not state: it stays on the ring, and a restored device reads it again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonState {
    pub num_pages: u32,
    pub actual: u32,
    /// Offered to the guest; must match the restoring device's configuration.
    pub deflate_on_oom: bool,
    pub poll_interval: u32,
    pub stats_last_update: i64,
    /// By [`STAT_NAMES`] index.
    pub stats: Vec<u64>,
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        super::TYPE_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        let oom = if self.deflate_on_oom { feature::DEFLATE_ON_OOM } else { 0 };
        features::COMMON | feature::STATS_VQ | oom
    }

    fn driver(&self) -> &DriverState {
        &self.driver
    }

    fn driver_mut(&mut self) -> &mut DriverState {
        &mut self.driver
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config();
        for (i, byte) in data.iter_mut().enumerate() {
            let at = offset.checked_add(i as u64).and_then(|at| usize::try_from(at).ok());
            *byte = at.and_then(|at| config.get(at)).copied().unwrap_or(0);
        }
    }

    /// Only `actual` is the driver's to write; its bytes may come in any pieces.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut config = self.config();
        for (i, byte) in data.iter().enumerate() {
            let at = offset.checked_add(i as u64).and_then(|at| usize::try_from(at).ok());
            if let Some(slot) = at.filter(|&at| (4..CONFIG_LEN).contains(&at)).and_then(|at| config.get_mut(at)) {
                *slot = *byte;
            }
        }
        let actual = u32::from_le_bytes([config[4], config[5], config[6], config[7]]);
        if actual != self.actual {
            self.actual = actual;
            if let Some(listener) = &self.actual_listener {
                listener(actual);
            }
        }
    }

    /// Linux's driver posts its first statistics buffer, and notifies, before it sets DRIVER_OK: read it now.
    fn activated(&mut self) {
        self.read_stats_buffer();
    }

    fn reset_device(&mut self) {
        // The target, the guest's last report and the polling interval are the host's and stay (as in QEMU); the
        // held buffer went with the queues.
        self.stats_buffer_held = false;
    }

    fn process_queue(&mut self, index: usize) -> bool {
        match index {
            INFLATE_QUEUE | DEFLATE_QUEUE => self.process_pfns(index),
            STATS_QUEUE => self.read_stats_buffer(),
            _ => false,
        }
    }

    fn host_event_sources(&self) -> Vec<RawFd> {
        vec![self.poll_timer.as_raw_fd()]
    }

    /// The polling timer fired.
    fn process_host_event(&mut self, _index: usize) -> Option<usize> {
        // Drain the expirations (non-blocking): one poll for any number missed, none when it had not fired.
        match self.poll_timer.wait() {
            Ok(expired) if expired > 0 => self.return_stats_buffer().then_some(STATS_QUEUE),
            _ => None,
        }
    }

    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Balloon(BalloonState {
            num_pages: self.num_pages,
            actual: self.actual,
            deflate_on_oom: self.deflate_on_oom,
            poll_interval: self.poll_interval,
            stats_last_update: self.stats.last_update,
            stats: self.stats.values.to_vec(),
        })
    }

    fn restore_device_state(&mut self, state: &VirtioDeviceState, _running: bool) -> Result<(), StateError> {
        let VirtioDeviceState::Balloon(state) = state else { return Err(state.mismatch(LOG.device)) };
        if state.deflate_on_oom != self.deflate_on_oom {
            let on_off = |b: bool| if b { "on" } else { "off" };
            return Err(StateError::new(
                LOG.device,
                "deflate_on_oom",
                format!(
                    "the snapshot's balloon has deflate-on-oom={}, this one {}",
                    on_off(state.deflate_on_oom),
                    on_off(self.deflate_on_oom)
                ),
            ));
        }
        let values: [u64; STAT_NAMES.len()] = state.stats.as_slice().try_into().map_err(|_| {
            StateError::new(
                LOG.device,
                "stats",
                format!("{} statistics, expected {}", state.stats.len(), STAT_NAMES.len()),
            )
        })?;
        // The timer is host-side only: armed now, its first poll comes after a whole interval, and no buffer is
        // used before the transport resumes the device.
        let first = Duration::from_secs(u64::from(state.poll_interval.max(1)));
        self.arm_poll_timer(state.poll_interval, first)
            .map_err(|e| StateError::new(LOG.device, "poll_interval", format!("arming the polling timer: {e}")))?;
        self.num_pages = state.num_pages;
        self.actual = state.actual;
        self.poll_interval = state.poll_interval;
        self.stats = GuestStats { last_update: state.stats_last_update, values };
        self.stats_buffer_held = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    use vm_memory::Bytes;

    use super::*;
    use crate::virtio::testing::{guest_memory, CountingLine, Desc, TestQueue};
    use crate::virtio::{VirtioInterrupt, INT_CONFIG};

    const MEM: usize = 1 << 20;

    struct Setup {
        balloon: Balloon,
        mem: GuestMemoryMmap,
        inflate: TestQueue,
        deflate: TestQueue,
        stats: TestQueue,
        irq: Arc<VirtioInterrupt>,
        line: Arc<CountingLine>,
    }

    fn active_balloon(features: u64) -> Setup {
        let mem = guest_memory(MEM);
        let inflate = TestQueue::new(GuestAddress(0x1000), 16);
        let deflate = TestQueue::new(GuestAddress(0x2000), 16);
        let stats = TestQueue::new(GuestAddress(0x3000), 16);
        let line = CountingLine::new();
        let irq = Arc::new(VirtioInterrupt::new(line.clone()));
        let mut balloon = Balloon::new(false).unwrap();
        balloon.ack_features(features);
        balloon.activate(mem.clone(), vec![inflate.queue(), deflate.queue(), stats.queue()], irq.clone()).unwrap();
        Setup { balloon, mem, inflate, deflate, stats, irq, line }
    }

    fn write_pfns(mem: &GuestMemoryMmap, at: u64, pfns: &[u32]) -> u32 {
        let raw: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        mem.write_slice(&raw, GuestAddress(at)).unwrap();
        raw.len() as u32
    }

    fn fill(mem: &GuestMemoryMmap, pfn: u64, byte: u8) {
        mem.write_slice(&[byte; PAGE_SIZE as usize], GuestAddress(pfn << PAGE_SHIFT)).unwrap();
    }

    fn page(mem: &GuestMemoryMmap, pfn: u64) -> Vec<u8> {
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        mem.read_slice(&mut buf, GuestAddress(pfn << PAGE_SHIFT)).unwrap();
        buf
    }

    /// Whether the host page holding guest page `pfn` is in memory (mincore).
    fn resident(mem: &GuestMemoryMmap, pfn: u64) -> bool {
        let host = mem.get_host_address(GuestAddress(pfn << PAGE_SHIFT)).unwrap();
        let mut vec = 0u8;
        // SAFETY: mincore reads the page tables of one page-aligned page of test guest memory, which is mapped, and
        // writes one byte into `vec`.
        let done = unsafe { libc::mincore(host.cast(), PAGE_SIZE as usize, &mut vec) };
        assert_eq!(done, 0, "mincore: {}", std::io::Error::last_os_error());
        vec & 1 != 0
    }

    fn small_host_pages() -> bool {
        // SAFETY: sysconf only reads system configuration.
        unsafe { libc::sysconf(libc::_SC_PAGESIZE) == PAGE_SIZE as libc::c_long }
    }

    #[test]
    fn inflated_pages_go_back_to_the_host_and_deflate_changes_nothing() {
        let Setup { mut balloon, mem, mut inflate, mut deflate, .. } = active_balloon(features::VERSION_1);
        for pfn in [0x40, 0x41, 0x42, 0x50, 0x60] {
            fill(&mem, pfn, 0xaa);
        }
        let len = write_pfns(&mem, 0x8000, &[0x40, 0x41, 0x42, 0x50]);
        let head = inflate.add_chain(&mem, &[Desc::r(0x8000, len)]);
        assert!(balloon.process_queue(INFLATE_QUEUE));
        assert_eq!(inflate.pop_used(&mem), Some((u32::from(head), 0)));
        if small_host_pages() {
            // The host took the pages back: no longer resident, and the next touch reads a fresh zero page.
            for pfn in [0x40, 0x41, 0x42, 0x50] {
                assert!(!resident(&mem, pfn), "page {pfn:#x} is still resident");
            }
            assert!(resident(&mem, 0x60));
            for pfn in [0x40, 0x41, 0x42, 0x50] {
                assert!(page(&mem, pfn).iter().all(|&b| b == 0), "page {pfn:#x} was not given back");
            }
            assert_eq!(balloon.discarded_bytes(), 4 * PAGE_SIZE);
        }
        assert!(page(&mem, 0x60).iter().all(|&b| b == 0xaa), "a page not in the balloon was touched");
        // Deflating uses the buffer and leaves memory alone.
        fill(&mem, 0x60, 0xbb);
        let len = write_pfns(&mem, 0x9000, &[0x60]);
        deflate.add_chain(&mem, &[Desc::r(0x9000, len)]);
        assert!(balloon.process_queue(DEFLATE_QUEUE));
        assert_eq!(deflate.pop_used(&mem).map(|(_, len)| len), Some(0));
        assert!(page(&mem, 0x60).iter().all(|&b| b == 0xbb));
    }

    /// Guest memory shared with a file (a memfd, as vhost-user backends need): inflated pages are removed from the
    /// file itself, which a MADV_DONTNEED alone would leave.
    #[test]
    fn inflated_pages_of_shared_memory_are_removed_from_its_file() {
        use std::os::fd::FromRawFd;
        use std::os::unix::fs::FileExt;
        use vm_memory::{FileOffset, GuestRegionMmap};
        // SAFETY: a plain syscall with a NUL-terminated name; the descriptor is owned by the File below.
        let fd = unsafe { libc::memfd_create(c"kestrel-balloon-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.set_len(MEM as u64).unwrap();
        let region =
            GuestRegionMmap::from_range(GuestAddress(0), MEM, Some(FileOffset::new(file.try_clone().unwrap(), 0)))
                .unwrap();
        let mem = GuestMemoryMmap::from_regions(vec![region]).unwrap();
        let mut inflate = TestQueue::new(GuestAddress(0x1000), 16);
        let [deflate, stats] = [0x2000, 0x3000].map(|at| TestQueue::new(GuestAddress(at), 16).queue());
        let mut balloon = Balloon::new(false).unwrap();
        balloon.ack_features(features::VERSION_1);
        let irq = Arc::new(VirtioInterrupt::new(CountingLine::new()));
        balloon.activate(mem.clone(), vec![inflate.queue(), deflate, stats], irq).unwrap();
        fill(&mem, 0x40, 0xaa);
        fill(&mem, 0x41, 0xbb);
        let len = write_pfns(&mem, 0x8000, &[0x40]);
        inflate.add_chain(&mem, &[Desc::r(0x8000, len)]);
        assert!(balloon.process_queue(INFLATE_QUEUE));
        // qemu-user (the foreign targets' unit tests) accepts MADV_REMOVE and does nothing: see whether this host
        // removes a page itself before judging the device.
        fill(&mem, 0x70, 0xcc);
        let scratch = mem.get_host_address(GuestAddress(0x70 << PAGE_SHIFT)).unwrap();
        // SAFETY: one page-aligned page of this test's own shared mapping, whose contents the test gives up.
        let removed = unsafe { libc::madvise(scratch.cast(), PAGE_SIZE as usize, libc::MADV_REMOVE) } == 0 && {
            let mut probe = [0xffu8; 1];
            file.read_exact_at(&mut probe, 0x70 << PAGE_SHIFT).unwrap();
            probe == [0]
        };
        if !removed {
            eprintln!("SKIPPED: this host does not remove pages from a shared mapping's file (MADV_REMOVE)");
            return;
        }
        if small_host_pages() {
            let mut back = vec![0xffu8; PAGE_SIZE as usize];
            file.read_exact_at(&mut back, 0x40 << PAGE_SHIFT).unwrap();
            assert!(back.iter().all(|&b| b == 0), "the page is still in the file");
            file.read_exact_at(&mut back, 0x41 << PAGE_SHIFT).unwrap();
            assert!(back.iter().all(|&b| b == 0xbb), "a page not in the balloon was touched");
            assert_eq!(balloon.discarded_bytes(), PAGE_SIZE);
        }
    }

    #[test]
    fn bad_frame_numbers_and_buffers_are_ignored_without_harm() {
        let Setup { mut balloon, mem, mut inflate, irq, .. } = active_balloon(features::VERSION_1);
        fill(&mem, 0x70, 0xcc);
        // Frames past guest memory (and the largest one) are skipped; the good one among them is still taken.
        let past = (MEM as u64 >> PAGE_SHIFT) as u32;
        let len = write_pfns(&mem, 0x8000, &[past, u32::MAX, 0x70, past + 1]);
        inflate.add_chain(&mem, &[Desc::r(0x8000, len)]);
        // A buffer outside guest memory, a device-writable one, a length that is not whole frame numbers.
        inflate.add_chain(&mem, &[Desc::r(0xfff_0000, 16)]);
        inflate.add_chain(&mem, &[Desc::w(0x8000, 16)]);
        inflate.add_chain(&mem, &[Desc::r(0x8000, 3)]);
        assert!(balloon.process_queue(INFLATE_QUEUE));
        let used: Vec<u32> = std::iter::from_fn(|| inflate.pop_used(&mem)).map(|(_, len)| len).collect();
        assert_eq!(used, [0, 0, 0, 0]);
        if small_host_pages() {
            assert!(page(&mem, 0x70).iter().all(|&b| b == 0));
            assert_eq!(balloon.discarded_bytes(), PAGE_SIZE);
        }
        assert!(!irq.needs_reset());
    }

    #[test]
    fn a_huge_buffer_is_read_only_to_the_bound() {
        let Setup { mut balloon, mem, mut inflate, .. } = active_balloon(features::VERSION_1);
        // 8192 frame numbers, all naming page 0x90, past the bound too.
        let pfns = vec![0x90u32; 2 * MAX_PFNS_PER_BUFFER];
        fill(&mem, 0x90, 1);
        let len = write_pfns(&mem, 0x20000, &pfns);
        inflate.add_chain(&mem, &[Desc::r(0x20000, len)]);
        assert!(balloon.process_queue(INFLATE_QUEUE));
        assert_eq!(inflate.pop_used(&mem).map(|(_, len)| len), Some(0));
        if small_host_pages() {
            // The same page each time: given back once per frame number taken, each a run of its own.
            assert_eq!(balloon.discarded_bytes(), MAX_PFNS_PER_BUFFER as u64 * PAGE_SIZE);
        }
    }

    #[test]
    fn config_has_the_target_and_the_guests_actual() {
        let Setup { mut balloon, irq, line, .. } = active_balloon(features::VERSION_1);
        let changes = Arc::new(AtomicU32::new(0));
        balloon.set_actual_listener({
            let changes = changes.clone();
            Box::new(move |actual| changes.store(actual + 1, Ordering::SeqCst))
        });
        let before = line.count();
        balloon.set_num_pages(0x1234);
        assert_eq!(irq.status() & INT_CONFIG, INT_CONFIG);
        assert_eq!(irq.config_generation(), 1);
        assert_eq!(line.count(), before + 1);
        let mut config = [0u8; 12];
        balloon.read_config(0, &mut config);
        assert_eq!(config, [0x34, 0x12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        // The driver writes actual (in two halves here); its writes to num_pages are ignored.
        balloon.write_config(0, &[9, 9, 9, 9]);
        balloon.write_config(4, &[0x00, 0x02]);
        assert_eq!(changes.load(Ordering::SeqCst), 0x201);
        balloon.write_config(6, &[0x01, 0x00]);
        assert_eq!((balloon.num_pages(), balloon.actual()), (0x1234, 0x10200));
        assert_eq!(changes.load(Ordering::SeqCst), 0x10201);
        // The same value again is no change.
        changes.store(0, Ordering::SeqCst);
        balloon.write_config(4, &0x10200u32.to_le_bytes());
        assert_eq!(changes.load(Ordering::SeqCst), 0);
        let mut actual = [0u8; 4];
        balloon.read_config(4, &mut actual);
        assert_eq!(u32::from_le_bytes(actual), 0x10200);
        // Past the end, and offsets that would overflow, read zero and write nothing.
        let mut far = [0xffu8; 4];
        balloon.read_config(u64::MAX - 1, &mut far);
        assert_eq!(far, [0; 4]);
        balloon.write_config(u64::MAX - 1, &[1, 2, 3, 4]);
        assert_eq!(balloon.actual(), 0x10200);
    }

    #[test]
    fn features_offered() {
        let balloon = Balloon::new(false).unwrap();
        assert_eq!(balloon.avail_features() & 0xff, feature::STATS_VQ);
        assert_eq!(Balloon::new(true).unwrap().avail_features() & 0xff, feature::STATS_VQ | feature::DEFLATE_ON_OOM);
        assert_eq!(balloon.device_type(), 5);
    }

    fn stats_buffer(mem: &GuestMemoryMmap, at: u64, entries: &[(u16, u64)]) -> u32 {
        let raw: Vec<u8> =
            entries.iter().flat_map(|(t, v)| t.to_le_bytes().into_iter().chain(v.to_le_bytes())).collect();
        mem.write_slice(&raw, GuestAddress(at)).unwrap();
        raw.len() as u32
    }

    #[test]
    fn statistics_are_kept_and_the_buffer_held_until_the_poll() {
        let Setup { mut balloon, mem, mut stats, .. } = active_balloon(features::VERSION_1 | feature::STATS_VQ);
        assert_eq!(*balloon.guest_stats(), GuestStats::default());
        let len = stats_buffer(&mem, 0xa000, &[(4, 1000), (5, 4000), (99, 7), (0, 3)]);
        let head = stats.add_chain(&mem, &[Desc::r(0xa000, len)]);
        assert!(!balloon.process_queue(STATS_QUEUE));
        let got = balloon.guest_stats().clone();
        assert!(got.last_update > 0);
        assert_eq!(got.values[4..6], [1000, 4000]);
        assert_eq!(got.values[0], 3);
        assert_eq!(got.values[1], STAT_UNKNOWN);
        // Held: not used, and still available on the ring (what a snapshot sees).
        assert_eq!(stats.used_idx(&mem), 0);
        let position = balloon.active_queues().unwrap().position(STATS_QUEUE).unwrap();
        assert_eq!(position.next_avail, position.next_used);
        // A second notification reads nothing new.
        assert!(!balloon.process_queue(STATS_QUEUE));
        assert_eq!(stats.used_idx(&mem), 0);
        // The poll gives it back, once.
        assert!(balloon.return_stats_buffer());
        assert_eq!(stats.pop_used(&mem), Some((u32::from(head), 0)));
        assert!(!balloon.return_stats_buffer());
        // The driver refills and posts it again.
        let len = stats_buffer(&mem, 0xa000, &[(4, 900)]);
        stats.add_chain(&mem, &[Desc::r(0xa000, len)]);
        assert!(!balloon.process_queue(STATS_QUEUE));
        assert_eq!(balloon.guest_stats().values[4], 900);
        assert_eq!(balloon.guest_stats().values[5], 4000);
    }

    /// A driver that posts its statistics before DRIVER_OK (Linux does) has them read when the device starts.
    #[test]
    fn statistics_posted_before_the_driver_is_ready_are_read_at_activation() {
        let mem = guest_memory(MEM);
        let queues = [0x1000, 0x2000, 0x3000].map(|at| TestQueue::new(GuestAddress(at), 16));
        let mut stats = queues[2].clone();
        let len = stats_buffer(&mem, 0xa000, &[(5, 222)]);
        stats.add_chain(&mem, &[Desc::r(0xa000, len)]);
        let mut balloon = Balloon::new(false).unwrap();
        balloon.ack_features(features::VERSION_1 | feature::STATS_VQ);
        let irq = Arc::new(VirtioInterrupt::new(CountingLine::new()));
        balloon.activate(mem.clone(), queues.iter().map(TestQueue::queue).collect(), irq).unwrap();
        assert_eq!(balloon.guest_stats().values[5], 222);
        assert_eq!(stats.used_idx(&mem), 0);
        assert!(balloon.return_stats_buffer());
        assert_eq!(stats.used_idx(&mem), 1);
    }

    #[test]
    fn the_polling_timer_returns_the_buffer() {
        let Setup { mut balloon, mem, mut stats, .. } = active_balloon(features::VERSION_1 | feature::STATS_VQ);
        let len = stats_buffer(&mem, 0xa000, &[(7, 5)]);
        stats.add_chain(&mem, &[Desc::r(0xa000, len)]);
        balloon.process_queue(STATS_QUEUE);
        assert_eq!(balloon.process_host_event(0), None, "no poll before an interval is set");
        balloon.set_poll_interval(5).unwrap();
        // The first poll comes at once.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(balloon.process_host_event(0), Some(STATS_QUEUE));
        assert_eq!(stats.used_idx(&mem), 1);
        balloon.set_poll_interval(0).unwrap();
        assert_eq!(balloon.poll_interval(), 0);
    }

    #[test]
    fn a_bad_stats_ring_breaks_only_that_queue() {
        let Setup { mut balloon, mem, stats, irq, .. } = active_balloon(features::VERSION_1 | feature::STATS_VQ);
        stats.set_avail_idx(&mem, 100);
        assert!(balloon.process_queue(STATS_QUEUE));
        assert!(irq.needs_reset());
    }

    #[test]
    fn state_round_trips_and_is_checked() {
        let Setup { mut balloon, mem, mut stats, .. } = active_balloon(features::VERSION_1 | feature::STATS_VQ);
        balloon.set_num_pages(300);
        balloon.write_config(4, &200u32.to_le_bytes());
        balloon.set_poll_interval(7).unwrap();
        let len = stats_buffer(&mem, 0xa000, &[(5, 123)]);
        stats.add_chain(&mem, &[Desc::r(0xa000, len)]);
        balloon.process_queue(STATS_QUEUE);
        let state = balloon.save_state();
        let json = serde_json::to_string(&state).unwrap();
        let back: VirtioDeviceState = serde_json::from_str(&json).unwrap();
        let mut restored = Balloon::new(false).unwrap();
        restored.restore_device_state(&back, false).unwrap();
        assert_eq!((restored.num_pages(), restored.actual(), restored.poll_interval()), (300, 200, 7));
        assert_eq!(restored.guest_stats(), balloon.guest_stats());
        assert_eq!(restored.save_state(), state);
        // Another configuration, a short statistics list, another device's state: refused, nothing changed.
        let mut other = Balloon::new(true).unwrap();
        assert!(other.restore_device_state(&state, false).is_err());
        let VirtioDeviceState::Balloon(mut short) = state.clone() else { unreachable!() };
        short.stats.pop();
        assert!(other.restore_device_state(&VirtioDeviceState::Balloon(short), false).is_err());
        let rng = VirtioDeviceState::Rng(crate::virtio::rng::RngState {});
        assert!(other.restore_device_state(&rng, false).is_err());
        assert_eq!((other.num_pages(), other.poll_interval()), (0, 0));
    }

    #[test]
    fn nothing_happens_before_activation_or_after_reset() {
        let Setup { mut balloon, mem, mut inflate, .. } = active_balloon(features::VERSION_1);
        balloon.reset();
        fill(&mem, 0x40, 0xaa);
        let len = write_pfns(&mem, 0x8000, &[0x40]);
        inflate.add_chain(&mem, &[Desc::r(0x8000, len)]);
        assert!(!balloon.process_queue(INFLATE_QUEUE));
        assert!(!balloon.process_queue(STATS_QUEUE));
        assert!(!balloon.process_queue(9));
        assert_eq!(inflate.used_idx(&mem), 0);
        assert!(page(&mem, 0x40).iter().all(|&b| b == 0xaa));
    }
}

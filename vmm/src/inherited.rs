//! Descriptors Kestrel inherited from whoever started it, as libvirt passes the stream of a restore
//! (`-incoming fd:N`, `migrate-incoming` with `fd:N`). Only a descriptor that was open when Kestrel started, and
//! that nothing claimed yet, may be taken by number: any other number could be one Kestrel opened itself (its
//! KVM descriptors, a socket), which a command must never be able to take over.

use std::collections::BTreeSet;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::{Mutex, OnceLock};

static INHERITED: OnceLock<Mutex<BTreeSet<RawFd>>> = OnceLock::new();

fn is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only reads the descriptor's flags; an unused number fails with EBADF.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

/// Records the descriptors above stderr that are open now. Called first thing, before Kestrel opens anything;
/// later calls keep the first record.
pub fn record() {
    INHERITED.get_or_init(|| {
        let listed: Vec<RawFd> = match std::fs::read_dir("/proc/self/fd") {
            Ok(entries) => entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect(),
            Err(_) => Vec::new(),
        };
        // The listing's own descriptor is closed by now and shows as not open.
        Mutex::new(listed.into_iter().filter(|&fd| fd > 2 && is_open(fd)).collect())
    });
}

/// Takes descriptor `fd`, which Kestrel must have inherited and not handed out before.
pub fn claim(fd: RawFd) -> Result<OwnedFd, String> {
    let mut inherited = INHERITED.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    if !inherited.remove(&fd) {
        return Err(format!("descriptor {fd} was not passed to Kestrel when it started, or is already in use"));
    }
    if !is_open(fd) {
        return Err(format!("descriptor {fd} is not open"));
    }
    // SAFETY: `fd` was open when Kestrel started (`record`), so Kestrel did not open it and nothing in Kestrel
    // owns it; it was just removed from the record, so it is taken once.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

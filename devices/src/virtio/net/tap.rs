//! A Linux tap interface as virtio-net's backend: /dev/net/tun opened non-blocking, attached by TUNSETIFF to the
//! tap interface of a given name (created if it does not exist; an existing one must have been made for the
//! same flags), or one already attached that Kestrel inherited (QEMU's `-netdev tap,fd=N`: libvirt creates the tap
//! and passes it), with every frame preceded by a 12-byte `virtio_net_hdr_v1` (IFF_VNET_HDR + TUNSETVNETHDRSZ),
//! and the offloads the device negotiates (none: the kernel hands us checksummed, unsegmented frames and expects
//! the same).

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Read};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::{NetBackend, VNET_HDR_LEN};

const TUN_PATH: &str = "/dev/net/tun";
/// Interface names are at most IFNAMSIZ - 1 bytes.
pub const MAX_NAME_LEN: usize = 15;

/// Why a tap could not be opened, in words that say what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("invalid tap name '{0}': {1}")]
    Name(String, &'static str),
    #[error("{TUN_PATH} does not exist: load the tun module (modprobe tun)")]
    NoTunDevice,
    #[error("cannot open {TUN_PATH}: {0}")]
    OpenTun(io::Error),
    #[error("not allowed to create or attach tap '{0}': it needs CAP_NET_ADMIN, or a tap created for this user (ip tuntap add {0} mode tap vnet_hdr user ...)")]
    Permission(String),
    #[error("tap '{0}' is busy: another process has it open")]
    Busy(String),
    #[error(
        "'{0}' cannot be used as a tap: an interface of that name exists and is not a tap with vnet headers ({1})"
    )]
    NotATap(String, io::Error),
    #[error("configuring tap '{0}' ({1}) failed: {2}")]
    Configure(String, &'static str, io::Error),
    #[error("descriptor {0} is not a tap interface: {1}")]
    NotATapDescriptor(RawFd, io::Error),
    #[error("tap '{0}' on descriptor {1} was not created as virtio-net needs it: {2}")]
    TapFlags(String, RawFd, &'static str),
}

/// An open tap interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// `struct ifreq` as TUNSETIFF reads and writes it: the name, then the flags in the union that follows (the
/// union's size, the largest member `struct ifmap`, is 24 bytes on 64-bit and 16 on 32-bit targets; 24 covers
/// both).
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _union_rest: [u8; 22],
}

/// Checks a name the way the kernel's dev_valid_name does, so the mistake is named before any ioctl.
pub fn check_name(name: &str) -> Result<(), TapError> {
    let refuse = |why| Err(TapError::Name(name.to_string(), why));
    if name.is_empty() {
        return refuse("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return refuse("longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return refuse("not a usable interface name");
    }
    if name.contains(['/', ':', '\0']) || name.chars().any(char::is_whitespace) {
        return refuse("contains '/', ':', NUL or whitespace");
    }
    Ok(())
}

impl Tap {
    /// Opens tap `name` (creating it if needed) for virtio-net: non-blocking, with vnet headers of
    /// [`VNET_HDR_LEN`] bytes and no offloads.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        check_name(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => TapError::NoTunDevice,
                io::ErrorKind::PermissionDenied => TapError::Permission(name.to_string()),
                _ => TapError::OpenTun(e),
            })?;
        let mut req = IfReq { name: [0; 16], flags: 0, _union_rest: [0; 22] };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req.flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` is one (name, flags, padding to the union's
        // size), exclusively borrowed for the call.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => TapError::Permission(name.to_string()),
                Some(libc::EBUSY) => TapError::Busy(name.to_string()),
                _ => TapError::NotATap(name.to_string(), e),
            });
        }
        // The kernel writes back the name it used (the same, as we gave a complete one).
        let name = CStr::from_bytes_until_nul(&req.name).ok().and_then(|n| n.to_str().ok()).unwrap_or(name).to_string();
        Tap { file, name }.configure()
    }

    /// Takes a tap another process attached (libvirt's, passed as `-netdev tap,fd=N`): it must be a tap (not a
    /// tun) made with vnet headers and without packet information, as [`Tap::open`] makes them; it is made
    /// non-blocking and configured the same way.
    pub fn from_fd(fd: OwnedFd) -> Result<Tap, TapError> {
        let raw = fd.as_raw_fd();
        let mut req = IfReq { name: [0; 16], flags: 0, _union_rest: [0; 22] };
        // SAFETY: TUNGETIFF writes a `struct ifreq`; `req` is one, exclusively borrowed for the call. On a
        // descriptor that is not a tun/tap the kernel writes nothing and fails.
        if unsafe { libc::ioctl(raw, libc::TUNGETIFF, &mut req) } < 0 {
            return Err(TapError::NotATapDescriptor(raw, io::Error::last_os_error()));
        }
        let name = CStr::from_bytes_until_nul(&req.name).ok().and_then(|n| n.to_str().ok()).unwrap_or("?").to_string();
        let flags = libc::c_int::from(req.flags);
        let missing = if flags & libc::IFF_TAP == 0 {
            Some("it is a tun (IP packets), not a tap (Ethernet frames)")
        } else if flags & libc::IFF_VNET_HDR == 0 {
            Some("it has no vnet headers (IFF_VNET_HDR)")
        } else if flags & libc::IFF_NO_PI == 0 {
            Some("it has packet information headers (no IFF_NO_PI)")
        } else {
            None
        };
        if let Some(why) = missing {
            return Err(TapError::TapFlags(name, raw, why));
        }
        // SAFETY: F_GETFL and F_SETFL read and set the descriptor's status flags; no memory is passed.
        let status = unsafe { libc::fcntl(raw, libc::F_GETFL) };
        // SAFETY: as above.
        if status < 0 || unsafe { libc::fcntl(raw, libc::F_SETFL, status | libc::O_NONBLOCK) } < 0 {
            return Err(TapError::Configure(name, "non-blocking", io::Error::last_os_error()));
        }
        Tap { file: File::from(fd), name }.configure()
    }

    /// Sets the vnet header size and the offloads on a freshly attached tap.
    fn configure(self) -> Result<Tap, TapError> {
        let header_len: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, which points at `header_len`.
        let set = unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &header_len) };
        self.check(set, "vnet header size")?;
        // No TUN_F_* offloads: the device offers no checksum or segmentation offload to the guest, so the kernel
        // must complete checksums and segment before frames reach us.
        let offloads: libc::c_ulong = 0;
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        self.check(unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETOFFLOAD, offloads) }, "offloads")?;
        Ok(self)
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn check(&self, ret: libc::c_int, what: &'static str) -> Result<(), TapError> {
        if ret < 0 {
            return Err(TapError::Configure(self.name.clone(), what, io::Error::last_os_error()));
        }
        Ok(())
    }
}

impl NetBackend for Tap {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    fn send(&mut self, parts: &[IoSlice<'_>]) -> io::Result<usize> {
        // One writev: a tap takes each write as one whole frame.
        io::Write::write_vectored(&mut self.file, parts)
    }

    fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_the_kernel_sees_them() {
        for good in ["tap0", "kestrel-tap-123", "a"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "sixteen-bytes-xx", "a/b", "a:b", "a b", ".", "..", "tab\t", "nul\0"] {
            let err = check_name(bad).expect_err(bad);
            assert!(err.to_string().starts_with("invalid tap name"), "{bad}: {err}");
        }
        // Refused before /dev/net/tun is even opened, so this holds on any machine.
        let err = Tap::open("name-is-too-long0").unwrap_err();
        assert!(matches!(err, TapError::Name(..)), "{err}");
    }
}

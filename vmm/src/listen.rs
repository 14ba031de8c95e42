//! Sockets Kestrel listens on (QMP monitors, socket consoles): unix sockets only the owner can reach, and TCP
//! addresses resolved the way QEMU's `tcp:HOST:PORT` is.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::Path;

/// Binds `path` with no access for anyone but the owner, replacing a stale socket as QEMU does (anything else
/// at `path` is left alone and the bind fails). The socket is bound and listening under a temporary name in the
/// same directory first and then renamed into place, so a client that waits for the file to appear (libvirt,
/// scripts, the tests) never finds it before it accepts connections: between bind and listen a unix socket's
/// file exists but refuses connections.
pub fn bind_private_unix(path: &Path) -> io::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)?;
        }
    }
    let staging = staging_path(path);
    let bound = staging.as_deref().unwrap_or(path);
    // The umask makes the socket 0600 from its creation; no window where others could connect.
    // SAFETY: umask only changes this process's file creation mask, restored right after.
    let previous = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(bound);
    // SAFETY: as above.
    unsafe { libc::umask(previous) };
    let listener = listener?;
    let placed = std::fs::set_permissions(bound, std::fs::Permissions::from_mode(0o600)).and_then(|()| {
        if bound == path {
            Ok(())
        } else {
            rename_no_replace(bound, path)
        }
    });
    if let Err(e) = placed {
        let _ = std::fs::remove_file(bound);
        return Err(e);
    }
    Ok(listener)
}

/// A hidden sibling of `path` to bind before renaming, or None when that name would not fit a socket address
/// (then `path` is bound directly).
fn staging_path(path: &Path) -> Option<std::path::PathBuf> {
    /// `sun_path`'s size, less its terminating NUL.
    const MAX_SOCKET_PATH: usize = 107;
    let name = path.file_name()?.to_string_lossy();
    let staging = path.with_file_name(format!(".{name}.{}.binding", std::process::id()));
    (staging.as_os_str().len() <= MAX_SOCKET_PATH).then_some(staging)
}

/// Renames `from` to `to` unless something took `to` meanwhile (then fails with `AlreadyExists`): what stood at
/// `to` when the bind began was a stale socket, removed, and nothing else may be replaced.
fn rename_no_replace(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let from = std::ffi::CString::new(from.as_os_str().as_bytes())?;
    let to = std::ffi::CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: two valid NUL-terminated paths; renameat2 reads them and touches no memory of ours.
    let done =
        unsafe { libc::renameat2(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), libc::RENAME_NOREPLACE) };
    if done == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A listening socket Kestrel inherited, by its descriptor number.
pub enum InheritedListener {
    Unix(UnixListener),
    Tcp(std::net::TcpListener),
}

/// Takes descriptor `fd`, which must have been passed to Kestrel when it started (see `inherited`) and be a stream
/// socket that already listens, on a unix or TCP address: libvirt binds and listens on the monitor's socket itself,
/// connects to it by its path, and passes the descriptor (`-chardev socket,id=charmonitor,fd=N,server=on`). The
/// socket's file is the one who bound it's to remove. Its accepts block or not as `nonblocking` says, whatever
/// the one who passed it set.
pub fn inherited_listener(fd: RawFd, nonblocking: bool) -> io::Result<InheritedListener> {
    let owned = crate::inherited::claim(fd).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let option = |name: libc::c_int| -> io::Result<libc::c_int> {
        let mut value: libc::c_int = 0;
        let mut length = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: reads one int-sized socket option of a descriptor we own into a local of that size.
        let done = unsafe {
            libc::getsockopt(owned.as_raw_fd(), libc::SOL_SOCKET, name, (&raw mut value).cast(), &raw mut length)
        };
        if done == 0 {
            Ok(value)
        } else {
            Err(io::Error::last_os_error())
        }
    };
    let not_listening = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("descriptor {fd} {what}"));
    let socket_type = option(libc::SO_TYPE).map_err(|_| not_listening("is not a socket"))?;
    if socket_type != libc::SOCK_STREAM || option(libc::SO_ACCEPTCONN)? != 1 {
        return Err(not_listening("is not a listening stream socket"));
    }
    match option(libc::SO_DOMAIN)? {
        libc::AF_UNIX => {
            let listener = UnixListener::from(owned);
            listener.set_nonblocking(nonblocking)?;
            Ok(InheritedListener::Unix(listener))
        }
        libc::AF_INET | libc::AF_INET6 => {
            let listener = std::net::TcpListener::from(owned);
            listener.set_nonblocking(nonblocking)?;
            Ok(InheritedListener::Tcp(listener))
        }
        _ => Err(not_listening("is neither a unix nor a TCP socket")),
    }
}

/// The first address `host` resolves to, with `port`.
pub fn resolve_tcp(host: &str, port: u16) -> io::Result<SocketAddr> {
    (host, port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("'{host}' resolves to no address")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_sockets_are_private_and_replace_stale_ones() {
        let dir = std::env::temp_dir().join(format!("kestrel-listen-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        drop(bind_private_unix(&path).unwrap());
        // The first listener is gone but its file stays: a second bind replaces it.
        let _listener = bind_private_unix(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A regular file is not a stale socket: never deleted.
        let file = dir.join("plain");
        std::fs::write(&file, b"keep").unwrap();
        assert!(bind_private_unix(&file).is_err());
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_socket_file_accepts_connections_from_the_moment_it_appears() {
        let dir = std::env::temp_dir().join(format!("kestrel-listen-appear-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("q.sock");
        for _ in 0..50 {
            let watcher = {
                let path = path.clone();
                std::thread::spawn(move || {
                    while !path.exists() {
                        std::thread::yield_now();
                    }
                    std::os::unix::net::UnixStream::connect(&path).map(drop)
                })
            };
            let listener = bind_private_unix(&path).unwrap();
            watcher.join().unwrap().expect("the socket listens as soon as its file exists");
            drop(listener);
            std::fs::remove_file(&path).unwrap();
        }
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.is_empty(), "no staging file is left behind: {left:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_path_too_long_to_stage_is_bound_directly() {
        let dir = std::env::temp_dir().join(format!("kestrel-listen-long-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // 105 bytes in all: a socket address still, but not with the staging name's extra ~15.
        let name = "s".repeat(105 - dir.as_os_str().len() - 1);
        let path = dir.join(name);
        assert_eq!(path.as_os_str().len(), 105);
        assert!(staging_path(&path).is_none(), "no staging name past sun_path's size");
        let _listener = bind_private_unix(&path).unwrap();
        std::os::unix::net::UnixStream::connect(&path).expect("connects");
        std::fs::remove_dir_all(dir).unwrap();
    }
}

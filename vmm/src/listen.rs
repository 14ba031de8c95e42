//! Sockets Kestrel listens on (QMP monitors, socket consoles): unix sockets only the owner can reach, and TCP
//! addresses resolved the way QEMU's `tcp:HOST:PORT` is.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::Path;

/// Binds `path` with no access for anyone but the owner, replacing a stale socket as QEMU does (anything else
/// at `path` is left alone and the bind fails).
pub fn bind_private_unix(path: &Path) -> io::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)?;
        }
    }
    // The umask makes the socket 0600 from its creation; no window where others could connect.
    // SAFETY: umask only changes this process's file creation mask, restored right after.
    let previous = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(previous) };
    let listener = listener?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
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
}

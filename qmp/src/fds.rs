//! Descriptors a client passes to Kestrel over its QMP socket (SCM_RIGHTS), as QEMU's monitor keeps them: each
//! connection holds what arrived with its input until `getfd` names it, and its named descriptors until `closefd`
//! or a command that takes one (`migrate` to `fd:NAME`) uses it up, or until the connection closes.
//!
//! Owning a descriptor makes no system call but `close`, so the crate stays free of sockets and I/O.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{OwnedFd, RawFd};
use std::path::PathBuf;

use crate::machine::QmpError;

/// Descriptors received but not yet named, at most this many (QEMU's socket chardev keeps 16 per read); older
/// ones are closed to make room, so a client cannot make Kestrel hold descriptors without bound.
pub const MAX_RECEIVED: usize = 16;
/// Named descriptors one connection may hold at once.
pub const MAX_NAMED: usize = 64;

/// One connection's passed descriptors.
#[derive(Debug, Default)]
pub struct PassedFds {
    received: VecDeque<OwnedFd>,
    named: BTreeMap<String, OwnedFd>,
}

impl PassedFds {
    /// Keeps descriptors that arrived with the connection's input, for the next `getfd`.
    pub fn receive(&mut self, fds: impl IntoIterator<Item = OwnedFd>) {
        for fd in fds {
            if self.received.len() == MAX_RECEIVED {
                self.received.pop_front();
            }
            self.received.push_back(fd);
        }
    }

    /// `getfd`: names the oldest descriptor received and not yet named. A name in use is given to the new
    /// descriptor and the old one closed, as QEMU does.
    pub fn getfd(&mut self, name: &str) -> Result<(), QmpError> {
        if name.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(QmpError::generic("Parameter 'fdname' expects a name not starting with a digit"));
        }
        if !self.named.contains_key(name) && self.named.len() >= MAX_NAMED {
            return Err(QmpError::generic(format!("this connection already holds {MAX_NAMED} named descriptors")));
        }
        let fd =
            self.received.pop_front().ok_or_else(|| QmpError::generic("No file descriptor supplied via SCM_RIGHTS"))?;
        self.named.insert(name.to_string(), fd);
        Ok(())
    }

    /// `closefd`.
    pub fn closefd(&mut self, name: &str) -> Result<(), QmpError> {
        self.named
            .remove(name)
            .map(drop)
            .ok_or_else(|| QmpError::generic(format!("File descriptor named '{name}' not found")))
    }

    /// Takes the descriptor named `name` away from the connection (a command uses it up).
    pub fn take(&mut self, name: &str) -> Result<OwnedFd, QmpError> {
        self.named
            .remove(name)
            .ok_or_else(|| QmpError::generic(format!("File descriptor named '{name}' has not been found")))
    }

    /// How many descriptors the connection holds, named or not.
    pub fn len(&self) -> usize {
        self.received.len() + self.named.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where a migration's stream goes to or comes from, resolved from its URI.
#[derive(Debug)]
pub enum MigrationChannel {
    /// `file:PATH`.
    File(PathBuf),
    /// `fd:NAME`: a descriptor the client passed and named with `getfd`, now the machine's.
    Passed(OwnedFd),
    /// `fd:N`: descriptor number N of the process, which must be one Kestrel inherited (libvirt passes the
    /// stream to restore this way); the machine checks that and takes it.
    Inherited(RawFd),
}

impl MigrationChannel {
    /// Resolves `uri` as QEMU 7.2 reads `migrate`'s and `migrate-incoming`'s: `file:PATH`, or `fd:` followed by a
    /// name given to `getfd` or, if it starts with a digit, a descriptor number. Other transports are refused.
    pub fn resolve(uri: &str, fds: &mut PassedFds) -> Result<MigrationChannel, QmpError> {
        match uri.split_once(':') {
            Some(("file", "")) => Err(QmpError::generic("file: needs a path")),
            Some(("file", path)) => Ok(MigrationChannel::File(PathBuf::from(path))),
            Some(("fd", "")) => Err(QmpError::generic("fd: needs a descriptor name or number")),
            Some(("fd", number)) if number.starts_with(|c: char| c.is_ascii_digit()) => number
                .parse::<RawFd>()
                .map(MigrationChannel::Inherited)
                .map_err(|_| QmpError::generic(format!("Invalid file descriptor number '{number}'"))),
            Some(("fd", name)) => fds.take(name).map(MigrationChannel::Passed),
            _ => Err(QmpError::generic(format!("Kestrel migrates through file:PATH or fd:NAME only, not '{uri}'"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn pipe_end() -> OwnedFd {
        let (reader, _writer) = std::io::pipe().unwrap();
        reader.into()
    }

    #[test]
    fn getfd_names_what_arrived_and_closefd_or_a_use_ends_it() {
        let mut fds = PassedFds::default();
        assert_eq!(fds.getfd("migrate").unwrap_err().desc, "No file descriptor supplied via SCM_RIGHTS");
        let fd = pipe_end();
        let raw = fd.as_raw_fd();
        fds.receive([fd]);
        fds.getfd("migrate").unwrap();
        assert_eq!(fds.len(), 1);
        match MigrationChannel::resolve("fd:migrate", &mut fds).unwrap() {
            MigrationChannel::Passed(fd) => assert_eq!(fd.as_raw_fd(), raw),
            other => panic!("{other:?}"),
        }
        assert!(fds.is_empty());
        let error = MigrationChannel::resolve("fd:migrate", &mut fds).unwrap_err();
        assert_eq!(error.desc, "File descriptor named 'migrate' has not been found");

        fds.receive([pipe_end()]);
        fds.getfd("x").unwrap();
        fds.closefd("x").unwrap();
        assert_eq!(fds.closefd("x").unwrap_err().desc, "File descriptor named 'x' not found");
        assert!(fds.is_empty());
    }

    #[test]
    fn names_starting_with_a_digit_are_numbers_and_other_uris_are_refused() {
        let mut fds = PassedFds::default();
        fds.receive([pipe_end()]);
        assert!(fds.getfd("3x").unwrap_err().desc.contains("not starting with a digit"));
        assert!(matches!(MigrationChannel::resolve("fd:7", &mut fds), Ok(MigrationChannel::Inherited(7))));
        assert!(MigrationChannel::resolve("fd:7x", &mut fds).unwrap_err().desc.contains("Invalid file descriptor"));
        assert!(
            matches!(MigrationChannel::resolve("file:/a", &mut fds), Ok(MigrationChannel::File(p)) if p.to_str() == Some("/a"))
        );
        for uri in ["file:", "fd:", "tcp:host:4444", "exec:cat", "nonsense"] {
            assert!(MigrationChannel::resolve(uri, &mut fds).is_err(), "{uri}");
        }
    }

    #[test]
    fn what_a_client_passes_is_bounded() {
        let mut fds = PassedFds::default();
        fds.receive((0..MAX_RECEIVED + 5).map(|_| pipe_end()));
        assert_eq!(fds.len(), MAX_RECEIVED);
        for i in 0..MAX_NAMED {
            fds.receive([pipe_end()]);
            fds.getfd(&format!("f{i}")).unwrap();
        }
        fds.receive([pipe_end()]);
        assert!(fds.getfd("one-more").unwrap_err().desc.contains("already holds"));
        // Renaming an existing name is not a new one.
        fds.getfd("f0").unwrap();
    }
}

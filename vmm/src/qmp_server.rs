//! QMP control sockets: unix listeners created mode 0600 (or TCP, as QEMU allows), one client per socket at a time (as QEMU: a second
//! client waits in the listen queue until the first leaves), non-blocking reads and buffered writes, all driven by
//! the VMM's event loop. The protocol itself is the `qmp` crate's.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::Instant;

use mio::event::Source;
use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Interest, Registry, Token};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::config::{ListenSocket, SocketAddress};
use crate::listen::{bind_private_unix, inherited_listener, resolve_tcp, InheritedListener};
use crate::Error;

enum Listener {
    /// With the path of the socket file Kestrel bound, removed at exit; none for an inherited socket.
    Unix(UnixListener, Option<PathBuf>),
    Tcp(TcpListener),
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Listener {
    fn bind(address: &SocketAddress) -> io::Result<Listener> {
        match address {
            SocketAddress::Unix(path) => {
                let listener = bind_private_unix(path)?;
                listener.set_nonblocking(true)?;
                Ok(Listener::Unix(UnixListener::from_std(listener), Some(path.clone())))
            }
            SocketAddress::Tcp(host, port) => Ok(Listener::Tcp(TcpListener::bind(resolve_tcp(host, *port)?)?)),
            SocketAddress::Inherited(fd) => match inherited_listener(*fd, true)? {
                InheritedListener::Unix(listener) => Ok(Listener::Unix(UnixListener::from_std(listener), None)),
                InheritedListener::Tcp(listener) => Ok(Listener::Tcp(TcpListener::from_std(listener))),
            },
        }
    }

    fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Unix(listener, _) => listener.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(listener) => listener.accept().map(|(s, _)| Stream::Tcp(s)),
        }
    }

    fn source(&mut self) -> &mut dyn Source {
        match self {
            Listener::Unix(listener, _) => listener,
            Listener::Tcp(listener) => listener,
        }
    }

    fn raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            Listener::Unix(listener, _) => listener.as_raw_fd(),
            Listener::Tcp(listener) => listener.as_raw_fd(),
        }
    }
}

impl Stream {
    fn source(&mut self) -> &mut dyn Source {
        match self {
            Stream::Unix(stream) => stream,
            Stream::Tcp(stream) => stream,
        }
    }

    fn raw_fd(&self) -> RawFd {
        match self {
            Stream::Unix(stream) => stream.as_raw_fd(),
            Stream::Tcp(stream) => stream.as_raw_fd(),
        }
    }
}

/// A unix stream socket as vmm-sys-util's SCM_RIGHTS receiver sees it.
struct ScmStream(RawFd);

impl ScmSocket for ScmStream {
    fn socket_fd(&self) -> RawFd {
        self.0
    }
}

impl Stream {
    /// Reads what is there and, on a unix socket, the descriptors that came with it (SCM_RIGHTS, as libvirt passes
    /// the stream of a save with `getfd`): at most `qmp::fds::MAX_RECEIVED` per read; a message with more is an
    /// error, its descriptors closed.
    fn read_with_fds(&mut self, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
        let stream = match self {
            Stream::Unix(stream) => stream,
            Stream::Tcp(stream) => return stream.read(buf).map(|n| (n, Vec::new())),
        };
        let mut received = [-1; qmp::fds::MAX_RECEIVED];
        let mut iovecs = [libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() }];
        // SAFETY: the one iovec covers `buf`, which is ours to overwrite whole.
        let (read, count) = unsafe { ScmStream(stream.as_raw_fd()).recv_with_fds(&mut iovecs, &mut received) }
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        let fds = received[..count]
            .iter()
            // SAFETY: recvmsg just created these descriptors in this process; nothing else knows them.
            .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
            .collect();
        Ok((read, fds))
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(stream) => stream.read(buf),
            Stream::Tcp(stream) => stream.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(stream) => stream.write(buf),
            Stream::Tcp(stream) => stream.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Tokens from here up belong to QMP sockets: two per socket (listener, client).
pub const FIRST_TOKEN: usize = 16;

/// Handles one read of a connection: its protocol state, the bytes and the descriptors that came with them;
/// returns what to send back.
pub type InputHandler<'h, P> = &'h mut dyn FnMut(&mut P, &[u8], Vec<OwnedFd>) -> Vec<u8>;

/// What the event loop supplies for each connection: its protocol state `P` with the greeting to send when a
/// client connects, and the handling of input and the descriptors that came with it (returning what to send
/// back).
pub struct Handlers<'h, P> {
    pub connect: &'h mut dyn FnMut() -> (P, Vec<u8>),
    pub input: InputHandler<'h, P>,
}

struct Client<P> {
    stream: Stream,
    protocol: P,
    outgoing: Vec<u8>,
}

struct Socket<P> {
    address: SocketAddress,
    listener: Listener,
    client: Option<Client<P>>,
}

pub struct QmpServer<P> {
    sockets: Vec<Socket<P>>,
}

fn listener_token(index: usize) -> Token {
    Token(FIRST_TOKEN + 2 * index)
}

fn client_token(index: usize) -> Token {
    Token(FIRST_TOKEN + 2 * index + 1)
}

impl<P> QmpServer<P> {
    pub fn bind(sockets: &[ListenSocket], registry: &Registry) -> Result<Self, Error> {
        let mut server = QmpServer { sockets: Vec::with_capacity(sockets.len()) };
        for (index, socket) in sockets.iter().enumerate() {
            let mut listener = Listener::bind(&socket.address).map_err(|source| Error::Open {
                what: "QMP socket",
                path: PathBuf::from(socket.address.to_string()),
                source,
            })?;
            registry
                .register(listener.source(), listener_token(index), Interest::READABLE)
                .map_err(|e| Error::Host("watching a QMP socket", e))?;
            server.sockets.push(Socket { address: socket.address.clone(), listener, client: None });
        }
        Ok(server)
    }

    /// Whether `token` is one of this server's.
    pub fn owns(&self, token: Token) -> bool {
        token.0 >= FIRST_TOKEN && token.0 < FIRST_TOKEN + 2 * self.sockets.len()
    }

    /// Handles readiness on one of this server's tokens.
    pub fn ready(&mut self, token: Token, registry: &Registry, handlers: &mut Handlers<'_, P>) {
        let index = (token.0 - FIRST_TOKEN) / 2;
        let Some(socket) = self.sockets.get_mut(index) else { return };
        if token == client_token(index) {
            socket.service_client(index, registry, handlers);
        }
        // Accept when the listener is ready, and also after a client left: a waiting connection raised no new
        // readiness while we were not accepting.
        socket.accept(index, registry, handlers);
    }

    /// Accepts a waiting connection on every socket without a client. A client can go away outside `ready`
    /// (a failed write of an event), and the connections queued behind it raise no new readiness: the event
    /// loop calls this after every round.
    pub fn accept_waiting(&mut self, registry: &Registry, handlers: &mut Handlers<'_, P>) {
        for (index, socket) in self.sockets.iter_mut().enumerate() {
            socket.accept(index, registry, handlers);
        }
    }

    /// Blocks until a client connects to every socket configured with `wait=on` (QEMU's behaviour: the guest
    /// does not start before its management tool is there), or until `interrupt` (a descriptor that polls
    /// readable once Kestrel is asked to terminate) says to give up: then returns false.
    pub fn wait_for_clients(
        &mut self,
        waits: &[bool],
        interrupt: Option<RawFd>,
        registry: &Registry,
        handlers: &mut Handlers<'_, P>,
    ) -> bool {
        for (index, socket) in self.sockets.iter_mut().enumerate() {
            if !waits.get(index).copied().unwrap_or(false) {
                continue;
            }
            eprintln!("kestrel: waiting for connection on: disconnected:{},server=on", socket.address);
            while socket.client.is_none() {
                let mut fds = [
                    libc::pollfd { fd: socket.listener.raw_fd(), events: libc::POLLIN, revents: 0 },
                    // A negative descriptor is ignored by poll.
                    libc::pollfd { fd: interrupt.unwrap_or(-1), events: libc::POLLIN, revents: 0 },
                ];
                // SAFETY: polls valid descriptors we own, with a correctly sized array.
                let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
                if ready > 0 && fds[1].revents != 0 {
                    return false;
                }
                socket.accept(index, registry, handlers);
            }
        }
        true
    }

    /// Writes out what every client is still owed (replies, then events such as the last SHUTDOWN), waiting for
    /// slow readers until `deadline` at the latest: called on every way out, before the sockets close, so that no
    /// client is left with half a reply. A client that does not read loses the rest at the deadline. Input not
    /// read yet is discarded, so that clients see the connection end rather than reset.
    pub fn finish(&mut self, deadline: Instant) {
        for socket in &mut self.sockets {
            let Some(client) = &mut socket.client else { continue };
            while !client.outgoing.is_empty() {
                match client.stream.write(&client.outgoing) {
                    Ok(0) => break,
                    Ok(n) => {
                        client.outgoing.drain(..n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        let Some(left) = deadline.checked_duration_since(Instant::now()) else { break };
                        let timeout = libc::c_int::try_from(left.as_millis() + 1).unwrap_or(libc::c_int::MAX);
                        let mut fds = [libc::pollfd { fd: client.stream.raw_fd(), events: libc::POLLOUT, revents: 0 }];
                        // SAFETY: polls one valid descriptor we own, with a correctly sized array.
                        unsafe { libc::poll(fds.as_mut_ptr(), 1, timeout) };
                    }
                    Err(_) => break,
                }
            }
            // Requests nobody will answer now: read and dropped, because a unix socket closed with unread input
            // is a reset for the peer, which may then lose what it was sent last (the SHUTDOWN event).
            let mut discard = [0u8; 4096];
            while Instant::now() < deadline && matches!(client.stream.read(&mut discard), Ok(n) if n > 0) {}
        }
    }

    /// Sends `bytes_for` each connected client's protocol (events), except the client behind `except`; `None`
    /// sends nothing to that client.
    pub fn broadcast_except(
        &mut self,
        except: Option<Token>,
        registry: &Registry,
        mut bytes_for: impl FnMut(&mut P) -> Option<Vec<u8>>,
    ) {
        for (index, socket) in self.sockets.iter_mut().enumerate() {
            if Some(client_token(index)) == except || Some(listener_token(index)) == except {
                continue;
            }
            if let Some(client) = &mut socket.client {
                if let Some(bytes) = bytes_for(&mut client.protocol) {
                    client.outgoing.extend_from_slice(&bytes);
                    socket.flush(index, registry);
                }
            }
        }
    }

    /// Removes the unix socket files.
    pub fn remove_files(&self) {
        for socket in &self.sockets {
            if let Listener::Unix(_, Some(path)) = &socket.listener {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

impl<P> Socket<P> {
    /// Takes the next waiting connection unless a client is connected. The listener is edge-triggered: one
    /// readiness can stand for many queued connections, so this goes on until one stays (its greeting went out)
    /// or none is left; a connection that is already gone when greeted is dropped and the next one taken.
    fn accept(&mut self, index: usize, registry: &Registry, handlers: &mut Handlers<'_, P>) {
        while self.client.is_none() {
            match self.listener.accept() {
                Ok(mut stream) => {
                    if registry.register(stream.source(), client_token(index), Interest::READABLE).is_err() {
                        continue;
                    }
                    let (protocol, outgoing) = (handlers.connect)();
                    self.client = Some(Client { stream, protocol, outgoing });
                    self.flush(index, registry);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted) => {}
                Err(e) => {
                    // Out of descriptors, say: the connection stays queued and is taken on a later round.
                    eprintln!("kestrel: accepting a QMP client on {}: {e}", self.address);
                    return;
                }
            }
        }
    }

    fn service_client(&mut self, index: usize, registry: &Registry, handlers: &mut Handlers<'_, P>) {
        let Some(client) = &mut self.client else { return };
        let mut buf = [0u8; 4096];
        let mut closed = false;
        loop {
            match client.stream.read_with_fds(&mut buf) {
                Ok((0, _)) => {
                    closed = true;
                    break;
                }
                Ok((n, fds)) => {
                    let reply = (handlers.input)(&mut client.protocol, &buf[..n], fds);
                    client.outgoing.extend_from_slice(&reply);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
        // Replies to the last requests go out even if the client already closed its writing side.
        self.flush(index, registry);
        if closed {
            self.disconnect(registry);
        }
    }

    /// Writes what the socket takes now; waits for writability for the rest.
    fn flush(&mut self, index: usize, registry: &Registry) {
        let Some(client) = &mut self.client else { return };
        while !client.outgoing.is_empty() {
            match client.stream.write(&client.outgoing) {
                Ok(0) => break,
                Ok(n) => {
                    client.outgoing.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.disconnect(registry);
                    return;
                }
            }
        }
        let interest =
            if client.outgoing.is_empty() { Interest::READABLE } else { Interest::READABLE | Interest::WRITABLE };
        let _ = registry.reregister(client.stream.source(), client_token(index), interest);
    }

    fn disconnect(&mut self, registry: &Registry) {
        if let Some(mut client) = self.client.take() {
            let _ = registry.deregister(client.stream.source());
        }
    }
}

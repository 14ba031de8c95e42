//! The event loop: guest and host events, and the QMP sockets.

use std::time::{Duration, Instant};

use hypervisor::Hypervisor;
use mio::{Events, Poll};
use qmp::{Event, Machine, ServerInfo, Session, ShutdownCause};

use crate::config::ListenSocket;
use crate::platform::Platform;
use crate::qmp_server::{Handlers, QmpServer};
use crate::{signals, Error, Outcome};

use super::{shutdown_event, VmEvent, Vmm};

/// What the event loop serves: a machine with a guest (`Vmm`) or the guest-less `none` machine.
pub(super) trait Served: Machine {
    /// The QMP sockets the configuration asked for.
    fn qmp_sockets(&self) -> &[ListenSocket];
    /// Starts the machine, once the clients that must be waited for are connected.
    fn start(&mut self) -> Result<(), Error>;
    /// The events raised by the last QMP command, for the clients that did not issue it.
    fn take_raised(&mut self) -> Vec<Event>;
    /// Whether a QMP `quit` asked the process to end.
    fn quit_requested(&self) -> bool;
    /// An error that ends the run.
    fn take_fatal(&mut self) -> Option<Error>;
    /// The next event from a device, a vCPU or a signal, if one is waiting.
    fn next_event(&mut self) -> Option<VmEvent>;
    /// Acts on an event from `next_event`, emitting the QMP events it causes; `Some` ends the run.
    fn handle(&mut self, event: VmEvent, emit: &mut dyn FnMut(Event)) -> Result<Option<Outcome>, Error>;
    /// On every way out, once the clients had their last replies: what must reach the host's files before the
    /// process ends (disk images' cached metadata).
    fn close(&mut self) -> Result<(), Error> {
        Ok(())
    }
    /// When a QMP event held back by a throttle is due (see `flush_due`).
    fn deadline(&self) -> Option<Instant> {
        None
    }
    /// Emits the held QMP events that are due.
    fn flush_due(&mut self, _emit: &mut dyn FnMut(Event)) {}
}

impl<H: Hypervisor, P: Platform<H>> Served for Vmm<'_, H, P> {
    fn qmp_sockets(&self) -> &[ListenSocket] {
        &self.config.qmp
    }
    fn start(&mut self) -> Result<(), Error> {
        Vmm::start(self)
    }
    fn take_raised(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.raised)
    }
    fn quit_requested(&self) -> bool {
        self.quit
    }
    fn take_fatal(&mut self) -> Option<Error> {
        self.fatal.take()
    }
    fn next_event(&mut self) -> Option<VmEvent> {
        self.events.try_recv().ok()
    }
    fn handle(&mut self, event: VmEvent, emit: &mut dyn FnMut(Event)) -> Result<Option<Outcome>, Error> {
        Vmm::handle(self, event, emit)
    }
    fn close(&mut self) -> Result<(), Error> {
        Vmm::close(self)
    }
    fn deadline(&self) -> Option<Instant> {
        self.balloon_events.deadline()
    }
    fn flush_due(&mut self, emit: &mut dyn FnMut(Event)) {
        if let Some(event) = self.balloon_events.due(Instant::now()) {
            emit(event);
        }
    }
}

/// How long, at most, QMP clients are given on the way out to read what they are still owed (the last reply, the
/// SHUTDOWN event): a client that does not read must not keep Kestrel alive.
pub(super) const QMP_FINISH_GRACE: Duration = Duration::from_secs(1);

/// The VMM's main loop: guest and host events, and the QMP sockets.
/// Field order is drop order: clients see their connection close before the VM's teardown (tens of ms with an
/// in-kernel irqchip), as QEMU's do right after `quit`'s reply.
pub(super) struct EventLoop<M: Served> {
    pub(super) qmp: QmpServer<Session>,
    pub(super) poll: Poll,
    pub(super) vmm: M,
}

impl<M: Served> EventLoop<M> {
    pub(super) fn run(mut self) -> Result<Outcome, Error> {
        let outcome = self.serve();
        // Every way out, an error's too: clients get the rest of their replies and the last events first.
        self.qmp.finish(Instant::now() + QMP_FINISH_GRACE);
        self.qmp.remove_files();
        let closed = self.vmm.close();
        outcome.and_then(|outcome| closed.map(|()| outcome))
    }

    /// Ends the run if Kestrel was told to terminate: a signal outranks whatever else is queued.
    fn check_signal(&mut self) -> Option<Outcome> {
        let signal = signals::received()?;
        let event = shutdown_event(ShutdownCause::HostSignal);
        self.qmp.broadcast_except(None, self.poll.registry(), |session| session.event_bytes(&event));
        Some(Outcome::Signal(signal))
    }

    fn serve(&mut self) -> Result<Outcome, Error> {
        let waits: Vec<bool> = self.vmm.qmp_sockets().iter().map(|s| s.wait).collect();
        if waits.contains(&true) {
            let EventLoop { qmp, poll, vmm } = self;
            let mut connect = || Session::new(ServerInfo::kestrel());
            let mut input = |session: &mut Session, bytes: &[u8], fds| {
                session.receive_fds(fds);
                session.feed(bytes, vmm)
            };
            let mut handlers = Handlers { connect: &mut connect, input: &mut input };
            if !qmp.wait_for_clients(&waits, signals::termination_fd(), poll.registry(), &mut handlers) {
                // Only a termination signal interrupts the wait.
                return Ok(self.check_signal().unwrap_or(Outcome::Signal(libc::SIGTERM)));
            }
        }
        if let Some(outcome) = self.check_signal() {
            return Ok(outcome);
        }
        self.vmm.start()?;
        for event in self.vmm.take_raised() {
            self.qmp.broadcast_except(None, self.poll.registry(), |session| session.event_bytes(&event));
        }
        let mut events = Events::with_capacity(64);
        loop {
            let timeout = self.vmm.deadline().map(|at| at.saturating_duration_since(Instant::now()));
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::Host("waiting for events", e)),
            }
            if let Some(outcome) = self.check_signal() {
                return Ok(outcome);
            }
            let EventLoop { qmp, poll, vmm } = self;
            for ready in events.iter() {
                let token = ready.token();
                if !qmp.owns(token) {
                    continue;
                }
                {
                    let mut connect = || Session::new(ServerInfo::kestrel());
                    let mut input = |session: &mut Session, bytes: &[u8], fds| {
                        session.receive_fds(fds);
                        session.feed(bytes, vmm)
                    };
                    let mut handlers = Handlers { connect: &mut connect, input: &mut input };
                    qmp.ready(token, poll.registry(), &mut handlers);
                }
                let raised = vmm.take_raised();
                for event in &raised {
                    qmp.broadcast_except(Some(token), poll.registry(), |session| session.event_bytes(event));
                }
                if vmm.quit_requested() {
                    return Ok(Outcome::Quit);
                }
                if let Some(error) = vmm.take_fatal() {
                    return Err(error);
                }
            }
            {
                // A client that went away while being sent an event leaves the next one still queued.
                let mut connect = || Session::new(ServerInfo::kestrel());
                let mut input = |session: &mut Session, bytes: &[u8], fds| {
                    session.receive_fds(fds);
                    session.feed(bytes, vmm)
                };
                qmp.accept_waiting(poll.registry(), &mut Handlers { connect: &mut connect, input: &mut input });
            }
            {
                let registry = poll.registry();
                vmm.flush_due(&mut |event: Event| qmp.broadcast_except(None, registry, |s| s.event_bytes(&event)));
            }
            while signals::received().is_none() {
                let Some(event) = vmm.next_event() else { break };
                let registry = poll.registry();
                let mut emit = |event: Event| qmp.broadcast_except(None, registry, |s| s.event_bytes(&event));
                if let Some(outcome) = vmm.handle(event, &mut emit)? {
                    return Ok(outcome);
                }
            }
            if let Some(outcome) = self.check_signal() {
                return Ok(outcome);
            }
        }
    }
}

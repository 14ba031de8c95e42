//! Host signals: termination requests become VM events, and a real-time signal kicks vCPU threads out of the
//! guest.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Once, OnceLock};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::seccomp::{confined, ThreadKind};
use crate::Error;

const TERMINATION_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise and edit only it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in TERMINATION_SIGNALS {
            libc::sigaddset(&mut set, signal);
        }
        set
    }
}

/// The first termination signal received, 0 while none was. Set before the handler runs, so that work already
/// queued (a burst of resets, say) can see it and give way: a signal is never dropped or made to wait behind
/// guest requests.
static RECEIVED: AtomicI32 = AtomicI32::new(0);

/// An eventfd that becomes readable, and stays so, once a termination signal arrived: waits outside the event loop
/// (for the first QMP or console client) watch it beside their socket.
static TERMINATION_FD: OnceLock<EventFd> = OnceLock::new();

/// The termination signal Kestrel was sent, if any.
pub fn received() -> Option<i32> {
    Some(RECEIVED.load(Ordering::SeqCst)).filter(|&signal| signal != 0)
}

/// A descriptor that polls readable once a termination signal arrived (see [`TERMINATION_FD`]).
pub fn termination_fd() -> Option<RawFd> {
    TERMINATION_FD.get().map(|fd| fd.as_raw_fd())
}

fn create_termination_fd() -> Result<(), Error> {
    let fd = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
        .map_err(|e| Error::Host("creating the termination eventfd", e))?;
    // Called once per process; a second call keeps the first descriptor, which is just as good.
    let _ = TERMINATION_FD.set(fd);
    Ok(())
}

fn note_termination(signal: libc::c_int) {
    let _ = RECEIVED.compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst);
    if let Some(fd) = TERMINATION_FD.get() {
        // Never blocks (non-blocking, and adding 1 per signal cannot reach the counter's limit); it is never read,
        // so it stays readable.
        let _ = fd.write(1);
    }
}

/// Delivers SIGINT, SIGTERM and SIGHUP to `handler` on a thread of their own, after recording the first one (see
/// [`received`], [`termination_fd`]). Must be called before any other thread is started, so that every later
/// thread inherits the blocked mask and only that thread receives them.
pub fn forward_termination_signals(handler: impl Fn(i32) + Send + 'static) -> Result<(), Error> {
    create_termination_fd()?;
    let set = termination_set();
    // SAFETY: blocks signals for this thread (and threads it creates later); `set` is initialised.
    let err = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if err != 0 {
        return Err(Error::Host("blocking termination signals", io::Error::from_raw_os_error(err)));
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(confined(ThreadKind::Signals, move || loop {
            let mut signal = 0;
            // SAFETY: waits for one of the blocked signals in `set`, writing its number to `signal`.
            if unsafe { libc::sigwait(&set, &mut signal) } == 0 {
                note_termination(signal);
                handler(signal);
            }
        }))
        .map_err(|e| Error::Host("starting the signal thread", e))?;
    Ok(())
}

extern "C" fn ignore_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Makes the kick signal harmless; must succeed before any `kick`, or the signal's default action would end
/// the process.
pub fn install_kick_handler() -> Result<(), Error> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| {
        result = register_signal_handler(SIGRTMIN(), ignore_kick)
            .map_err(|e| Error::Host("installing the vCPU kick handler", io::Error::from_raw_os_error(e.errno())));
    });
    result
}

/// Interrupts whatever blocking call `thread` is in (KVM_RUN in particular), without other effect.
pub fn kick<T>(thread: &JoinHandle<T>) {
    // SAFETY: the thread handle is alive (we hold it), so its pthread_t is valid.
    unsafe { libc::pthread_kill(thread.as_pthread_t(), SIGRTMIN()) };
}

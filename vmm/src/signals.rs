//! Host signals: termination requests become VM events, and a real-time signal kicks vCPU threads out of the
//! guest.

use std::io;
use std::os::unix::thread::JoinHandleExt;
use std::sync::Once;
use std::thread::JoinHandle;

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

/// Delivers SIGINT, SIGTERM and SIGHUP to `handler` on a thread of their own. Must be called before any other
/// thread is started, so that every later thread inherits the blocked mask and only that thread receives them.
pub fn forward_termination_signals(handler: impl Fn(i32) + Send + 'static) -> Result<(), Error> {
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

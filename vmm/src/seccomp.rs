//! Seccomp: each of Kestrel's threads confines itself, before the guest runs, to the system calls its kind of
//! work needs (a vCPU runs KVM_RUN and completes device accesses; a device worker does its device's I/O; ...), so
//! a guest that takes over a thread through a device bug gains little. On by default, as in Firecracker and Cloud
//! Hypervisor; `--sandbox off` (QEMU's `-sandbox off`) turns it off for debugging.
//!
//! A call outside the filter ends the process with one line naming the thread and the call (SECCOMP_RET_TRAP and
//! a SIGSYS handler that only writes and exits), never a silent hang.
//!
//! The lists: system calls every architecture has are allowed here, by thread kind; calls one architecture has
//! and another does not (x86_64's `open`, `poll`, ...), and the KVM ioctl numbers (their sizes differ), live in
//! the per-arch modules' `seccomp`. One function per thread kind, one line per group, each saying who needs it: a
//! change that needs a new call adds it to the group of its thread kind.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};

use crate::arch_platform::seccomp as arch;
use crate::Error;

/// What a thread does, which decides what it may ask of the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread: builds VMs (at boot and every reset), runs the event loop and serves QMP.
    Main,
    /// Runs a vCPU: KVM_RUN and the device accesses that exit from it.
    Vcpu,
    /// A virtio device's worker: queue processing and the device's host I/O (disk, tap, entropy).
    DeviceWorker,
    /// Writes guest console output to its host end.
    ConsoleOutput,
    /// Reads host input for a guest console (and accepts a socket console's clients).
    ConsoleInput,
    /// Waits for termination signals.
    Signals,
    /// Re-raises a level-triggered interrupt the guest acknowledged while its device still asserts it.
    InterruptResample,
}

const KINDS: [ThreadKind; 7] = [
    ThreadKind::Main,
    ThreadKind::Vcpu,
    ThreadKind::DeviceWorker,
    ThreadKind::ConsoleOutput,
    ThreadKind::ConsoleInput,
    ThreadKind::Signals,
    ThreadKind::InterruptResample,
];

/// A system call number and the rules its arguments must meet (empty: any arguments).
pub type Syscall = (i64, Vec<SeccompRule>);

/// Any arguments.
pub fn allow(number: libc::c_long) -> Syscall {
    (number, Vec::new())
}

/// Only when argument `arg` is one of `values` (compared as 32 bits: ioctl requests, prctl options and signal
/// numbers are `int`s to the kernel).
pub fn allow_values(number: libc::c_long, arg: u8, values: &[u64]) -> Syscall {
    let rules = values
        .iter()
        .map(|&value| {
            let condition = SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
                .expect("argument index below 6");
            SeccompRule::new(vec![condition]).expect("one condition")
        })
        .collect();
    (number, rules)
}

/// Only when argument `arg` has none of `bits` set.
fn allow_without_bits(number: libc::c_long, arg: u8, bits: u64) -> Syscall {
    let condition = SeccompCondition::new(arg, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(bits), 0)
        .expect("argument index below 6");
    (number, vec![SeccompRule::new(vec![condition]).expect("one condition")])
}

/// The main thread's ioctls: any of KVM's (type 0xAE: creating and setting up each boot's VM and vCPUs), and the
/// terminal's settings (raw mode for a stdio console, put back at exit).
fn allow_main_ioctls() -> Syscall {
    let kvm = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::MaskedEq(0xff00), KVM_IOCTL_TYPE << 8)
        .expect("argument index below 6");
    let mut rules = vec![SeccompRule::new(vec![kvm]).expect("one condition")];
    let terminal = [libc::TCGETS, libc::TCSETS, libc::TCSETSW, libc::TCSETSF, libc::TIOCGWINSZ, libc::FIONBIO];
    rules.extend(allow_values(libc::SYS_ioctl, 1, &terminal).1);
    (libc::SYS_ioctl, rules)
}

/// openat without a flag that writes or creates.
fn allow_read_only_opens() -> Syscall {
    let writes = (libc::O_WRONLY | libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC | libc::O_APPEND) as u64;
    allow_without_bits(libc::SYS_openat, 2, writes)
}

/// openat exactly as `File::create` asks (write only, create, truncate; close-on-exec and the rest as they come):
/// QMP `migrate` writing a snapshot file. Not read-write, not append.
fn allow_file_creation() -> Syscall {
    let checked = (libc::O_WRONLY | libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC | libc::O_APPEND) as u64;
    let wanted = (libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC) as u64;
    let condition = SeccompCondition::new(2, SeccompCmpArgLen::Dword, SeccompCmpOp::MaskedEq(checked), wanted)
        .expect("argument index below 6");
    (libc::SYS_openat, vec![SeccompRule::new(vec![condition]).expect("one condition")])
}

/// The `type` byte of every KVM ioctl request (KVMIO).
const KVM_IOCTL_TYPE: u64 = 0xAE;

/// What every thread needs: memory for its allocations (never executable), locks, sleeping, exiting (also
/// through a panic's abort), signal returns (the vCPU kick, SIGSYS itself), and writing to stderr.
fn common() -> Vec<Syscall> {
    let no_exec = libc::PROT_EXEC as u64;
    vec![
        // The allocator (glibc malloc's arenas, Rust's Vec growth), thread stacks when a thread ends.
        allow(libc::SYS_brk),
        allow_without_bits(libc::SYS_mmap, 2, no_exec),
        allow_without_bits(libc::SYS_mprotect, 2, no_exec),
        allow(libc::SYS_mremap),
        allow(libc::SYS_munmap),
        allow(libc::SYS_madvise),
        // Mutexes, condition variables, channels.
        allow(libc::SYS_futex),
        allow(libc::SYS_sched_yield),
        // Sleeps and timeouts (the console writer's coalescing, condition variable timeouts, pause loops).
        allow(libc::SYS_clock_gettime),
        allow(libc::SYS_clock_nanosleep),
        allow(libc::SYS_nanosleep),
        // Messages on stderr (and the SIGSYS handler's line), closing descriptors a thread owns.
        allow(libc::SYS_write),
        allow(libc::SYS_close),
        // std checks that a descriptor is open before closing it (debug builds).
        allow_values(libc::SYS_fcntl, 1, &[libc::F_GETFD as u64]),
        // A thread's end (Rust's sigaltstack teardown, glibc's exit), the process's end, and abort on panic.
        allow(libc::SYS_exit),
        allow(libc::SYS_exit_group),
        allow(libc::SYS_sigaltstack),
        allow(libc::SYS_rt_sigprocmask),
        allow(libc::SYS_rt_sigreturn),
        allow(libc::SYS_gettid),
        allow(libc::SYS_getpid),
        allow_values(libc::SYS_tgkill, 2, &[libc::SIGABRT as u64]),
    ]
}

/// The system calls a thread of `kind` may make on this architecture.
fn syscalls(kind: ThreadKind) -> Vec<Syscall> {
    let mut list = common();
    match kind {
        ThreadKind::Main => list.extend([
            // Building each boot's VM: KVM's ioctls on /dev/kvm, the VM and its vCPUs (and the terminal's), each
            // vCPU's run area (mmap above), the kernel and initrd read again at every reset.
            allow_main_ioctls(),
            allow(libc::SYS_read),
            allow(libc::SYS_lseek),
            // A restore from a snapshot file: pages mapped from it (mmap above, MAP_FIXED over guest memory), the
            // runs past what is mapped read in place.
            allow(libc::SYS_pread64),
            // query-block's image sizes (statx; static glibc's stat family may use fstat/newfstatat).
            allow(libc::SYS_statx),
            allow(libc::SYS_fstat),
            allow(libc::SYS_newfstatat),
            // Read-only opens: glibc reads /sys/devices/system/cpu/online when a thread's first allocation makes
            // a malloc arena, and vCPU threads make theirs under this filter (they inherit it).
            allow_read_only_opens(),
            // Starting vCPU threads (at boot and every reset): glibc's pthread_create, and each thread's start
            // and confining itself (it inherits this filter until it adds its own).
            allow(libc::SYS_clone),
            allow(libc::SYS_clone3),
            allow(libc::SYS_set_robust_list),
            allow(libc::SYS_rseq),
            allow(libc::SYS_sched_getaffinity),
            allow_values(libc::SYS_prctl, 0, &[libc::PR_SET_NAME as u64, libc::PR_SET_NO_NEW_PRIVS as u64]),
            allow_values(libc::SYS_seccomp, 0, &[libc::SECCOMP_SET_MODE_FILTER as u64]),
            // Kicking vCPUs out of the guest (pause, stop): pthread_kill with the kick signal.
            allow_values(libc::SYS_tgkill, 2, &[libc::SIGRTMIN() as u64, libc::SIGABRT as u64]),
            // The event loop (mio's epoll) and the QMP sockets' clients (qmpsig).
            allow(libc::SYS_epoll_pwait),
            allow(libc::SYS_epoll_ctl),
            allow(libc::SYS_accept4),
            allow(libc::SYS_recvfrom),
            allow(libc::SYS_sendto),
            allow(libc::SYS_shutdown),
            // QMP unix sockets are read with recvmsg, for the descriptors a client passes with them (getfd).
            allow(libc::SYS_recvmsg),
            // Waiting for the first QMP client (wait=on): glibc's poll (x86_64 adds its own poll).
            allow(libc::SYS_ppoll),
            // QMP socket files removed at exit.
            allow(libc::SYS_unlinkat),
            // QMP `migrate` to file:PATH: the snapshot file created, written (write, above) and synced to disk
            // before `completed` is reported; to fd:NAME, written (a regular file synced too). `migrate-incoming`
            // reads its file or stream with read (above).
            allow_file_creation(),
            allow(libc::SYS_fsync),
            // qcow2 disks: the metadata imago caches is written back here (before a snapshot's state is taken, and
            // on the way out), which may read and write the image at offsets.
            allow(libc::SYS_preadv),
            allow(libc::SYS_pwritev),
            allow(libc::SYS_pwrite64),
            allow(libc::SYS_fdatasync),
            // The balloon's statistics polling timer, set by QMP qom-set and by a restore (its thread reads it).
            allow(libc::SYS_timerfd_settime),
        ]),
        ThreadKind::Vcpu => list.extend([
            // Device accesses complete on the vCPU: interrupts through irqfds and ioeventfd-less notifications
            // (eventfd writes, above), the event loop's waker (write), PCI MSIs (KVM_SIGNAL_MSI).
            allow(libc::SYS_read),
        ]),
        ThreadKind::DeviceWorker => list.extend([
            // Waiting on queue notifications and host descriptors (mio's epoll); reading the eventfds.
            allow(libc::SYS_epoll_pwait),
            allow(libc::SYS_epoll_ctl),
            allow(libc::SYS_read),
            // virtio-blk: vectored reads and writes at offsets, flush, discard and write-zeroes.
            allow(libc::SYS_preadv),
            allow(libc::SYS_pwritev),
            allow(libc::SYS_pread64),
            allow(libc::SYS_pwrite64),
            allow(libc::SYS_fsync),
            allow(libc::SYS_fdatasync),
            allow(libc::SYS_fallocate),
            // qcow2 (imago): a new cluster past the image's end is zero-filled by growing the file.
            allow(libc::SYS_ftruncate),
            // virtio-net: frames to and from the tap.
            allow(libc::SYS_readv),
            allow(libc::SYS_writev),
            // virtio-rng: the host's entropy.
            allow(libc::SYS_getrandom),
        ]),
        ThreadKind::ConsoleOutput => list.extend([
            // Writes to a socket console's client (send with MSG_NOSIGNAL, a write timeout).
            allow(libc::SYS_sendto),
            allow(libc::SYS_writev),
            // A pty's output is dropped while nobody has it open: poll tells (POLLHUP) before each write.
            allow(libc::SYS_ppoll),
        ]),
        ThreadKind::ConsoleInput => list.extend([
            // Reading the terminal, pty, or socket client.
            allow(libc::SYS_read),
            allow(libc::SYS_recvfrom),
            // A socket console's next client: accepted, given a write timeout, shut down when replaced (console).
            allow(libc::SYS_accept4),
            allow(libc::SYS_setsockopt),
            allow(libc::SYS_shutdown),
            allow(libc::SYS_fcntl),
            // A pty's input waits, polling, until someone opens it.
            allow(libc::SYS_ppoll),
        ]),
        ThreadKind::Signals => list.extend([
            // sigwait, and handing the signal to the event loop (its waker's write, above).
            allow(libc::SYS_rt_sigtimedwait),
        ]),
        ThreadKind::InterruptResample => list.extend([
            // Waiting on the resample eventfd, re-raising the line through its irqfd (write, above).
            allow(libc::SYS_read),
        ]),
    }
    list.extend(arch::syscalls(kind));
    list
}

/// The filter for `kind`: a call outside it raises SIGSYS (see `report_forbidden_call`).
fn compile(kind: ThreadKind) -> Result<BpfProgram, seccompiler::Error> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (number, conditions) in syscalls(kind) {
        // The same call listed twice: unconditional wins over conditional, conditions add up.
        match rules.get_mut(&number) {
            Some(existing) if existing.is_empty() => {}
            Some(_) if conditions.is_empty() => {
                rules.insert(number, Vec::new());
            }
            Some(existing) => existing.extend(conditions),
            None => {
                rules.insert(number, conditions);
            }
        }
    }
    let filter = SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, arch::TARGET)?;
    Ok(filter.try_into()?)
}

/// Whether threads confine themselves.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Each kind's compiled filter (indexed by `ThreadKind as usize`), built by the first thread of that kind to
/// confine itself: the work is spread over the threads, off the main thread's way to the guest, and done once per
/// process. The lists are fixed, so a mistake in one fails `every_kind_compiles_to_a_filter`, not a run.
static FILTERS: [OnceLock<BpfProgram>; KINDS.len()] = [const { OnceLock::new() }; KINDS.len()];

fn filter(kind: ThreadKind) -> Result<&'static BpfProgram, Error> {
    let slot = FILTERS.get(kind as usize).ok_or_else(|| Error::Seccomp(format!("no filter for {kind:?} threads")))?;
    if let Some(program) = slot.get() {
        return Ok(program);
    }
    let program = compile(kind).map_err(|e| Error::Seccomp(format!("building the {kind:?} filter: {e}")))?;
    // Two threads of a kind may both have built it: either program will do.
    Ok(slot.get_or_init(|| program))
}

/// A count of threads that are to confine themselves and have not yet, and a wait for it to reach zero.
struct Unconfined {
    count: Mutex<usize>,
    none_left: Condvar,
}

impl Unconfined {
    const fn new() -> Self {
        Unconfined { count: Mutex::new(0), none_left: Condvar::new() }
    }

    fn count(&self) -> std::sync::MutexGuard<'_, usize> {
        self.count.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add(&self) {
        *self.count() += 1;
    }

    fn remove(&self) {
        let mut count = self.count();
        *count = count.saturating_sub(1);
        if *count == 0 {
            self.none_left.notify_all();
        }
    }

    fn wait_for_none(&self) {
        let mut count = self.count();
        while *count > 0 {
            count = self.none_left.wait(count).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Kestrel's threads that are to confine themselves and have not yet: the main thread from `enable` to its
/// `apply`, every other thread from its spawn (see [`Confinement`]). The guest waits for none to be left (see
/// [`wait_until_every_thread_is_confined`]), so no thread of Kestrel's runs unconfined once the guest runs,
/// however the threads' starts happen to be scheduled.
static UNCONFINED: Unconfined = Unconfined::new();

/// A thread's pledge to confine itself, made on the spawning thread before the spawn and kept by the new thread
/// (see [`UNCONFINED`]). Dropped unkept (the spawn failed, or the thread could not confine itself and ends without
/// doing its work) it stops counting as well.
pub struct Confinement {
    counted: bool,
}

impl Confinement {
    /// Counts a thread about to be spawned as unconfined (nothing when the sandbox is off).
    pub fn pledge() -> Self {
        let counted = ENABLED.load(Ordering::SeqCst);
        if counted {
            UNCONFINED.add();
        }
        Confinement { counted }
    }

    /// On the new thread: confines it to `kind`'s calls.
    pub fn keep(self, kind: ThreadKind) -> Result<(), Error> {
        apply(kind)
    }
}

impl Drop for Confinement {
    fn drop(&mut self) {
        if self.counted {
            UNCONFINED.remove();
        }
    }
}

/// Returns once every thread started so far, and the main thread, has confined itself (at once when the sandbox is
/// off). vCPU threads call it before they first enter the guest.
pub fn wait_until_every_thread_is_confined() {
    UNCONFINED.wait_for_none();
}

/// Turns confinement on for every thread started from now on (and the main thread, at its `apply`): sets
/// no_new_privs for the process and installs the SIGSYS handler. Must be called before any other thread starts.
pub fn enable() -> Result<(), Error> {
    // SAFETY: prctl with PR_SET_NO_NEW_PRIVS takes integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(Error::Seccomp(format!("setting no_new_privs: {}", std::io::Error::last_os_error())));
    }
    install_sigsys_handler()?;
    // The main thread: confined at its `apply`.
    UNCONFINED.add();
    ENABLED.store(true, Ordering::SeqCst);
    Ok(())
}

/// Confines the calling thread to `kind`'s system calls (nothing when the sandbox is off).
pub fn apply(kind: ThreadKind) -> Result<(), Error> {
    if !ENABLED.load(Ordering::SeqCst) {
        return Ok(());
    }
    let name = std::thread::current().name().unwrap_or("main").to_string();
    remember_thread_name(&name);
    seccompiler::apply_filter(filter(kind)?).map_err(|e| Error::Seccomp(format!("confining thread {name}: {e}")))?;
    if kind == ThreadKind::Main {
        UNCONFINED.remove();
    }
    Ok(())
}

/// For threads with no channel to report on: ends the process with one line (a thread that cannot be confined
/// must not run unconfined when the user asked for the sandbox).
fn exit_unconfined(error: &Error) -> ! {
    eprintln!("kestrel: {error}");
    crate::console::restore_terminal();
    // SAFETY: _exit ends the process at once; nothing here relies on destructors running.
    unsafe { libc::_exit(1) }
}

/// A thread body that first confines its thread to `kind`'s calls, or ends the process: wraps the closure given
/// to `spawn`, so a thread start stays one line. Call it on the spawning thread, right before the spawn: the new
/// thread counts as unconfined from then on (see [`Confinement`]).
pub fn confined<T>(kind: ThreadKind, body: impl FnOnce() -> T) -> impl FnOnce() -> T {
    let confinement = Confinement::pledge();
    move || {
        if let Err(e) = confinement.keep(kind) {
            exit_unconfined(&e);
        }
        body()
    }
}

thread_local! {
    /// The thread's name, for the SIGSYS line: a plain array (no allocation, no destructor), so the handler can
    /// read it.
    static THREAD_NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
}

fn remember_thread_name(name: &str) {
    let mut buf = [0u8; 16];
    let len = name.len().min(buf.len());
    buf[..len].copy_from_slice(&name.as_bytes()[..len]);
    THREAD_NAME.with(|cell| cell.set(buf));
}

fn install_sigsys_handler() -> Result<(), Error> {
    // SAFETY: a zeroed sigaction is a valid starting point; the handler only makes async-signal-safe calls.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = report_forbidden_call as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(Error::Seccomp(format!("installing the SIGSYS handler: {}", std::io::Error::last_os_error())));
        }
    }
    Ok(())
}

/// The line a forbidden call ends the process with: `kestrel: seccomp: thread vcpu0 made forbidden system call 41
/// (socket)`.
fn forbidden_call_line(thread: &[u8], number: i64, ioctl_request: u64, out: &mut [u8; 160]) -> usize {
    let mut len = 0;
    let mut push = |bytes: &[u8]| {
        for &b in bytes {
            if len < out.len() {
                out[len] = b;
                len += 1;
            }
        }
    };
    push(b"kestrel: seccomp: thread ");
    push(thread);
    push(b" made forbidden system call ");
    let mut digits = [0u8; 20];
    if number < 0 {
        push(b"-");
    }
    push(format_digits(number.unsigned_abs(), 10, &mut digits));
    if let Some(name) = syscall_name(number) {
        push(b" (");
        push(name.as_bytes());
        if number == libc::SYS_ioctl {
            // Which ioctl: the number to look up, as the kernel's headers spell them.
            push(b" 0x");
            push(format_digits(ioctl_request, 16, &mut digits));
        }
        push(b")");
    }
    push(b"\n");
    len
}

/// `n` in `base` (10 or 16), in the tail of `buf`.
fn format_digits(mut n: u64, base: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut start = buf.len();
    loop {
        start -= 1;
        buf[start] = b"0123456789abcdef"[(n % base) as usize];
        n /= base;
        if n == 0 {
            return &buf[start..];
        }
    }
}

/// The system call's name on this architecture, if it has one.
pub fn syscall_name(number: i64) -> Option<&'static str> {
    let mut names = crate::syscall_names::COMMON_SYSCALL_NAMES.iter().chain(arch::ARCH_SYSCALL_NAMES);
    names.find(|(n, _)| *n == number).and_then(|(_, name)| name.strip_prefix("SYS_"))
}

/// SIGSYS handler: writes the line and ends the process. Only async-signal-safe steps: a thread-local read, stack
/// buffers, and the raw write and exit_group calls every filter allows.
extern "C" fn report_forbidden_call(_signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SIGSYS from seccomp carries the call in siginfo's `_sigsys` member: after the three ints and padding
    // (16 bytes on 64-bit targets), the calling address (a pointer), then the call number (an int).
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler; offset 24 lies within its 128 bytes.
    let number = unsafe { info.cast::<u8>().add(16 + std::mem::size_of::<usize>()).cast::<libc::c_int>().read() };
    let name = THREAD_NAME.with(|cell| cell.get());
    let name_len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    let thread: &[u8] = if name_len == 0 { b"?" } else { &name[..name_len] };
    let mut line = [0u8; 160];
    // SAFETY: the kernel passes an SA_SIGINFO handler its ucontext_t.
    let request = unsafe { arch::second_argument(context.cast()) };
    let len = forbidden_call_line(thread, i64::from(number), request, &mut line);
    // SAFETY: writes a stack buffer to stderr and ends the process; both are async-signal-safe system calls.
    unsafe {
        libc::syscall(libc::SYS_write, 2, line.as_ptr(), len);
        libc::syscall(libc::SYS_exit_group, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_listed_in_declaration_order() {
        // `FILTERS` is indexed by `kind as usize`.
        for (index, kind) in KINDS.into_iter().enumerate() {
            assert_eq!(kind as usize, index, "{kind:?}");
        }
    }

    #[test]
    fn every_kind_compiles_to_a_filter() {
        for kind in KINDS {
            let program = compile(kind).unwrap();
            assert!(program.len() > 20, "{kind:?}: {} instructions", program.len());
        }
    }

    #[test]
    fn the_wait_for_confinement_ends_when_the_last_thread_is_confined() {
        static COUNT: Unconfined = Unconfined::new();
        COUNT.add();
        COUNT.add();
        let waiter = std::thread::spawn(|| COUNT.wait_for_none());
        COUNT.remove();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!waiter.is_finished(), "the wait ended with a thread still unconfined");
        COUNT.remove();
        waiter.join().unwrap();
        // Nothing left: no wait at all.
        COUNT.wait_for_none();
    }

    #[test]
    fn the_line_names_thread_number_and_call() {
        let mut out = [0u8; 160];
        let len = forbidden_call_line(b"vcpu0", libc::SYS_socket, 7, &mut out);
        let line = std::str::from_utf8(&out[..len]).unwrap();
        assert_eq!(
            line,
            format!("kestrel: seccomp: thread vcpu0 made forbidden system call {} (socket)\n", libc::SYS_socket)
        );
        let len = forbidden_call_line(b"main", libc::SYS_ioctl, 0x4040ae79, &mut out);
        let line = std::str::from_utf8(&out[..len]).unwrap();
        let expected = format!(
            "kestrel: seccomp: thread main made forbidden system call {} (ioctl 0x4040ae79)\n",
            libc::SYS_ioctl
        );
        assert_eq!(line, expected);
    }

    #[test]
    fn no_thread_may_start_a_program_or_open_a_socket() {
        for kind in KINDS {
            let numbers: Vec<i64> = syscalls(kind).into_iter().map(|(n, _)| n).collect();
            for forbidden in [libc::SYS_execve, libc::SYS_execveat, libc::SYS_socket, libc::SYS_ptrace] {
                assert!(!numbers.contains(&forbidden), "{kind:?} allows {:?}", syscall_name(forbidden));
            }
        }
    }
}

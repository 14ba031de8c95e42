//! One thread per vCPU: runs the guest, completes I/O exits on the buses, and can be paused, resumed and stopped
//! from the VMM's main thread.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use devices::{Bus, PlatformRequest};
use hypervisor::{Vcpu, VcpuExit};

use crate::platform::{ArchExitHandler, ExitAction};
use crate::seccomp::{self, ThreadKind};
use crate::Error;
use crate::{console, signals};

/// What a vCPU thread reports to the VMM.
pub enum VcpuEvent {
    /// A request for the whole machine (reset, power off) the guest made through its firmware interface or an
    /// exit of its architecture.
    Platform(PlatformRequest),
    /// The vCPU cannot go on: the reason, and its register state for the report.
    Failed { id: u32, reason: String, state: String },
}

#[derive(Default)]
struct Control {
    paused: bool,
    stop: bool,
    /// Threads currently waiting in the paused state.
    parked: usize,
    /// Bumped to ask every parked vCPU for its state (see `VcpuThreads::save_states`).
    save_round: u64,
    /// How many vCPUs answered the current round.
    answered: usize,
}

/// Shared between the VMM and its vCPU threads.
#[derive(Default)]
struct Shared {
    /// Set whenever `control` asks something of the vCPUs, so the hot path checks one atomic, not a lock.
    attention: AtomicBool,
    /// Set when a device asked the VMM to reset or power off the machine (see `VcpuThreads::start`).
    platform_requested: Arc<AtomicBool>,
    control: Mutex<Control>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The vCPU threads of one boot. They are started before the VM is built (`spawn`), confine themselves and wait for
/// their vCPU meanwhile, and enter the guest once given it (`start`): a thread's start and confinement are off the
/// path to the guest's first instruction. `S` is a vCPU's state as a snapshot holds it.
pub struct VcpuThreads<S> {
    threads: Vec<JoinHandle<()>>,
    thread_ids: Arc<Vec<AtomicI32>>,
    shared: Arc<Shared>,
    /// Each thread's way to its vCPU, until `start` sends it (dropped, it ends the waiting thread).
    work: Vec<Sender<VcpuWork>>,
    saved: SavedStates<S>,
}

/// How a vCPU thread reads its vCPU's state `S` for a snapshot (the architecture's, see `Snapshots::save_vcpu`).
pub type SaveVcpu<C, S> = fn(&mut C) -> Result<S, String>;

/// Each vCPU's answer to the current save round, by vCPU index.
type SavedStates<S> = Arc<Mutex<Vec<Option<Result<SavedVcpu<S>, String>>>>>;

/// A vCPU's state and when its thread read it: state that moves with time (x86_64's TSC) is brought to one
/// moment for every vCPU before it is written (`Snapshots::settle_saved_clocks`).
pub struct SavedVcpu<S> {
    pub state: S,
    pub read_at: Instant,
}

/// What a waiting vCPU thread is given to do, with the outcome of its confinement.
type VcpuWork = Box<dyn FnOnce(&Shared, Result<(), Error>) + Send>;

impl<S> VcpuThreads<S> {
    /// Starts `count` threads that confine themselves and wait for `start`. Once `platform_requested` is set (a
    /// device asked for a reset or power-off: a reset register, the ACPI sleep control), no vCPU enters the guest
    /// again and a triple fault is taken as part of that request: the guest must not run on while the VMM acts,
    /// or Linux, its reset not taking effect at once, falls back to the keyboard controller and at last to a
    /// triple fault.
    pub fn spawn(count: usize, platform_requested: Arc<AtomicBool>) -> Result<Self, Error> {
        let shared = Arc::new(Shared { platform_requested, ..Shared::default() });
        let thread_ids: Arc<Vec<AtomicI32>> = Arc::new((0..count).map(|_| AtomicI32::new(0)).collect());
        let mut waiting = VcpuThreads {
            threads: Vec::with_capacity(count),
            thread_ids,
            shared,
            work: Vec::with_capacity(count),
            saved: Arc::new(Mutex::new(Vec::new())),
        };
        for id in 0..count {
            let (sender, receiver) = channel::<VcpuWork>();
            let shared = waiting.shared.clone();
            let thread_ids = waiting.thread_ids.clone();
            let confinement = seccomp::Confinement::pledge();
            let thread = thread::Builder::new().name(format!("vcpu{id}")).spawn(move || {
                // The raw system call: glibc's gettid() wrapper is a weak symbol that a static link leaves
                // unresolved.
                // SAFETY: gettid takes no arguments and cannot fail.
                let tid = unsafe { libc::syscall(libc::SYS_gettid) } as i32;
                thread_ids[id].store(tid, Ordering::SeqCst);
                let confined = confinement.keep(ThreadKind::Vcpu);
                // No vCPU (the boot failed, or the VMM is going): nothing to do.
                let Ok(work) = receiver.recv() else { return };
                if confined.is_ok() {
                    seccomp::wait_until_every_thread_is_confined();
                }
                work(&shared, confined)
            });
            match thread {
                Ok(thread) => {
                    waiting.threads.push(thread);
                    waiting.work.push(sender);
                }
                Err(e) => return Err(Error::Host("starting a vCPU thread", e)),
            }
        }
        Ok(waiting)
    }

    /// Gives each thread its vCPU, in order; with `paused`, none enters the guest until `resume`. The exits only
    /// the architecture has go to `arch_exits`.
    #[allow(clippy::too_many_arguments)]
    pub fn start<C: Vcpu + 'static>(
        &mut self,
        vcpus: Vec<C>,
        pio: &Bus,
        mmio: &Bus,
        paused: bool,
        save: SaveVcpu<C, S>,
        arch_exits: impl ArchExitHandler<C>,
        report: impl Fn(VcpuEvent) + Clone + Send + 'static,
    ) -> Result<(), Error>
    where
        S: Send + 'static,
    {
        if vcpus.len() != self.work.len() {
            return Err(Error::Boot(format!("{} vCPUs for {} vCPU threads", vcpus.len(), self.work.len())));
        }
        self.shared.lock().paused = paused;
        self.shared.attention.store(paused, Ordering::SeqCst);
        for ((id, vcpu), sender) in vcpus.into_iter().enumerate().zip(self.work.drain(..)) {
            let exits = VcpuLoop {
                id: id as u32,
                pio: pio.clone(),
                mmio: mmio.clone(),
                arch_exits: arch_exits.clone(),
                save,
                save_round: 0,
                saved: self.saved.clone(),
            };
            let report = report.clone();
            let work: VcpuWork = Box::new(move |shared, confined| match confined {
                Ok(()) => exits.run(vcpu, shared, report),
                Err(e) => report(VcpuEvent::Failed { id: id as u32, reason: e.to_string(), state: String::new() }),
            });
            // A thread that already ended (it could not start its work) shows in `is_finished`; the VMM hears of it
            // no other way, as before its vCPU existed.
            let _ = sender.send(work);
        }
        // Management tools ask for the vCPU thread ids (query-cpus-fast) as soon as QMP answers, to pin them: have
        // every thread's id before returning. Each thread publishes it first thing, so this is a short wait.
        while self.thread_ids.iter().any(|t| t.load(Ordering::SeqCst) == 0) {
            if self.threads.iter().any(|t| t.is_finished()) {
                break;
            }
            thread::yield_now();
        }
        Ok(())
    }

    /// The host thread id of each vCPU (0 until the thread has started).
    pub fn thread_ids(&self) -> Vec<i32> {
        self.thread_ids.iter().map(|t| t.load(Ordering::SeqCst)).collect()
    }

    /// Takes every vCPU out of the guest and holds it there; returns once all of them are held.
    pub fn pause(&self) {
        self.shared.lock().paused = true;
        self.shared.attention.store(true, Ordering::SeqCst);
        // Threads held after a failure wait on the condition variable, not in the guest: wake them to park.
        self.shared.changed.notify_all();
        loop {
            let live = self.threads.iter().filter(|t| !t.is_finished()).count();
            if self.shared.lock().parked >= live {
                return;
            }
            // A vCPU inside the guest (halted or running) only notices once kicked out, and one inside a console
            // waiting for room in its output queue once that wait is ended.
            self.kick_all();
            console::release_blocked_writes();
            thread::sleep(Duration::from_micros(100));
        }
    }

    /// Every vCPU's state, in vCPU order, read by each vCPU's own thread (which owns it). The vCPUs must be paused
    /// (`pause`): a thread answers while it is parked.
    pub fn save_states(&self) -> Result<Vec<SavedVcpu<S>>, String> {
        let count = self.threads.len();
        let mut control = self.shared.lock();
        if !control.paused {
            return Err("the vCPUs are not paused".into());
        }
        *self.saved.lock().unwrap_or_else(|p| p.into_inner()) = (0..count).map(|_| None).collect();
        control.save_round += 1;
        control.answered = 0;
        self.shared.changed.notify_all();
        loop {
            if control.answered >= count {
                break;
            }
            if let Some(id) = self.threads.iter().position(|t| t.is_finished()) {
                return Err(format!("vCPU {id} has stopped"));
            }
            control = self
                .shared
                .changed
                .wait_timeout(control, Duration::from_millis(10))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        drop(control);
        let saved = std::mem::take(&mut *self.saved.lock().unwrap_or_else(|p| p.into_inner()));
        saved.into_iter().map(|state| state.unwrap_or_else(|| Err("a vCPU gave no state".into()))).collect()
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        let mut control = self.shared.lock();
        control.paused = false;
        self.shared.attention.store(control.stop, Ordering::SeqCst);
        self.shared.changed.notify_all();
    }

    fn stop_threads(&mut self) {
        // Threads still waiting for their vCPU end when their channel closes.
        self.work.clear();
        {
            let mut control = self.shared.lock();
            control.stop = true;
            self.shared.attention.store(true, Ordering::SeqCst);
            self.shared.changed.notify_all();
        }
        for thread in self.threads.drain(..) {
            // A vCPU may be inside the guest (halted or running), or inside a console waiting for room in its
            // output queue: kick it out and end that wait until it notices.
            while !thread.is_finished() {
                signals::kick(&thread);
                console::release_blocked_writes();
                thread::sleep(Duration::from_micros(100));
            }
            let _ = thread.join();
        }
    }

    fn kick_all(&self) {
        for thread in self.threads.iter().filter(|t| !t.is_finished()) {
            signals::kick(thread);
        }
    }
}

impl<S> Drop for VcpuThreads<S> {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

/// Enters the vCPU once with an immediate exit: the hypervisor finishes the instruction behind the last I/O or
/// MMIO exit (the device already answered it) and comes straight back, so the state read next lies between
/// instructions and a restore does not repeat the access.
fn complete_pending_exit<C: Vcpu>(vcpu: &mut C) -> Result<(), String> {
    vcpu.set_immediate_exit(true);
    let outcome = match vcpu.run() {
        Ok(VcpuExit::Interrupted) => Ok(()),
        Ok(_) => Err("the vCPU left the guest for another reason while completing its last instruction".to_string()),
        Err(e) => Err(e.to_string()),
    };
    vcpu.set_immediate_exit(false);
    outcome
}

/// One vCPU thread's loop: the guest's exits completed on the buses, or handed to the architecture's handler.
struct VcpuLoop<C, S, E> {
    id: u32,
    pio: Bus,
    mmio: Bus,
    arch_exits: E,
    save: SaveVcpu<C, S>,
    /// The last save round this vCPU answered.
    save_round: u64,
    saved: SavedStates<S>,
}

/// Unmapped MMIO accesses are reported, but only the first few: a guest probing for hardware must not flood the
/// terminal.
static UNMAPPED_MMIO_REPORTS: AtomicU32 = AtomicU32::new(0);
const MAX_UNMAPPED_MMIO_REPORTS: u32 = 10;

fn report_unmapped_mmio(kind: &str, addr: u64, len: usize) {
    let n = UNMAPPED_MMIO_REPORTS.fetch_add(1, Ordering::Relaxed);
    if n < MAX_UNMAPPED_MMIO_REPORTS {
        eprintln!("kestrel: guest {kind} of {len} bytes at unmapped MMIO address {addr:#x} ignored");
    } else if n == MAX_UNMAPPED_MMIO_REPORTS {
        eprintln!("kestrel: further unmapped MMIO accesses will not be reported");
    }
}

impl<C: Vcpu, S, E: ArchExitHandler<C>> VcpuLoop<C, S, E> {
    fn failed(&self, vcpu: &mut C, reason: &str) -> VcpuEvent {
        VcpuEvent::Failed { id: self.id, reason: reason.to_string(), state: vcpu.dump_state() }
    }

    /// Whether the thread should go on running the guest, after honouring any pause request (and, while paused,
    /// any request for the vCPU's state).
    fn may_run(&mut self, vcpu: &mut C, shared: &Shared) -> bool {
        if !shared.attention.load(Ordering::SeqCst) {
            return true;
        }
        let mut control = shared.lock();
        if control.paused && !control.stop {
            control.parked += 1;
            shared.changed.notify_all();
            while control.paused && !control.stop {
                if control.save_round != self.save_round {
                    self.save_round = control.save_round;
                    drop(control);
                    let state = complete_pending_exit(vcpu)
                        .and_then(|()| (self.save)(vcpu))
                        .map(|state| SavedVcpu { state, read_at: Instant::now() });
                    if let Some(slot) = self.saved.lock().unwrap_or_else(|p| p.into_inner()).get_mut(self.id as usize) {
                        *slot = Some(state);
                    }
                    control = shared.lock();
                    control.answered += 1;
                    shared.changed.notify_all();
                    continue;
                }
                control = shared.changed.wait(control).unwrap_or_else(|p| p.into_inner());
            }
            control.parked -= 1;
        }
        !control.stop
    }

    fn run(mut self, mut vcpu: C, shared: &Shared, report: impl Fn(VcpuEvent)) {
        let event = loop {
            if !self.may_run(&mut vcpu, shared) {
                return;
            }
            if shared.platform_requested.load(Ordering::SeqCst) {
                break None;
            }
            match vcpu.run() {
                Ok(VcpuExit::IoIn { port, data }) => {
                    self.pio.read(u64::from(port), data);
                }
                Ok(VcpuExit::IoOut { port, data }) => {
                    self.pio.write(u64::from(port), data);
                }
                Ok(VcpuExit::MmioRead { addr, data }) => {
                    if !self.mmio.read(addr, data) {
                        report_unmapped_mmio("read", addr, data.len());
                    }
                }
                Ok(VcpuExit::MmioWrite { addr, data }) => {
                    if !self.mmio.write(addr, data) {
                        report_unmapped_mmio("write", addr, data.len());
                    }
                }
                Ok(VcpuExit::Interrupted) | Ok(VcpuExit::Hlt) => {}
                Ok(VcpuExit::SystemReset) => break Some(VcpuEvent::Platform(PlatformRequest::Reset)),
                Ok(VcpuExit::SystemPoweroff) => break Some(VcpuEvent::Platform(PlatformRequest::Poweroff)),
                Ok(VcpuExit::Arch(exit)) => match self.arch_exits.handle(&mut vcpu, exit) {
                    ExitAction::Resume => {}
                    ExitAction::Request(request) => break Some(VcpuEvent::Platform(request)),
                    ExitAction::Fail(_) if shared.platform_requested.load(Ordering::SeqCst) => break None,
                    ExitAction::Fail(reason) => break Some(self.failed(&mut vcpu, &reason)),
                },
                Ok(VcpuExit::InternalError) => break Some(self.failed(&mut vcpu, "KVM internal error")),
                Ok(VcpuExit::FailEntry { reason }) => {
                    let reason = format!("the hypervisor refused to enter the guest (hardware reason {reason:#x})");
                    break Some(self.failed(&mut vcpu, &reason));
                }
                Ok(VcpuExit::Unhandled(what)) => break Some(self.failed(&mut vcpu, &format!("unhandled exit {what}"))),
                Err(e) => break Some(self.failed(&mut vcpu, &e.to_string())),
            }
        };
        if let Some(event) = event {
            report(event);
        }
        // After a platform request or a failure the vCPU stays out of the guest until the VMM decides (reset,
        // power off, stop), still honouring pause and stop.
        while self.may_run(&mut vcpu, shared) {
            let mut control = shared.lock();
            while !control.stop && !control.paused {
                control = shared.changed.wait(control).unwrap_or_else(|p| p.into_inner());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::mpsc::Receiver;

    use super::*;

    /// An architecture's own exits, as a ppc64 or s390x backend would bring them.
    #[derive(Debug)]
    enum TestExit {
        Hypercall(u64),
        PowerOff,
        Fault,
    }

    /// A vCPU that leaves the guest with the scripted exits, then only ever for a signal. With `raise`, a device
    /// asks for a platform request while the vCPU is in the guest (another vCPU wrote a reset register).
    struct ScriptedVcpu {
        exits: VecDeque<VcpuExit<'static, TestExit>>,
        entries: Arc<AtomicU32>,
        raise: Option<Arc<AtomicBool>>,
    }

    impl Vcpu for ScriptedVcpu {
        type ArchExit = TestExit;

        fn run(&mut self) -> hypervisor::Result<VcpuExit<'_, TestExit>> {
            self.entries.fetch_add(1, Ordering::SeqCst);
            if let Some(requested) = &self.raise {
                requested.store(true, Ordering::SeqCst);
            }
            Ok(self.exits.pop_front().unwrap_or(VcpuExit::Interrupted))
        }

        fn set_immediate_exit(&mut self, _exit: bool) {}

        fn dump_state(&mut self) -> String {
            "scripted registers".into()
        }
    }

    /// Handles hypercalls (recording their numbers), turns the power-off call into a platform request and a fault
    /// into a failure.
    #[derive(Clone, Default)]
    struct TestExits {
        hypercalls: Arc<Mutex<Vec<u64>>>,
    }

    impl ArchExitHandler<ScriptedVcpu> for TestExits {
        fn handle(&self, _vcpu: &mut ScriptedVcpu, exit: TestExit) -> ExitAction {
            match exit {
                TestExit::Hypercall(number) => {
                    self.hypercalls.lock().unwrap().push(number);
                    ExitAction::Resume
                }
                TestExit::PowerOff => ExitAction::Request(PlatformRequest::Poweroff),
                TestExit::Fault => ExitAction::Fail("the test's fault".into()),
            }
        }
    }

    /// Runs `exits` on one vCPU thread's loop until it reports an event (or, with none reported, 200 ms) and then
    /// stops it. Returns the event, how many times the vCPU entered the guest, and the hypercalls handled.
    fn run_script(
        exits: Vec<VcpuExit<'static, TestExit>>,
        request_while_in_guest: bool,
    ) -> (Option<VcpuEvent>, u32, Vec<u64>) {
        let shared = Arc::new(Shared::default());
        let entries = Arc::new(AtomicU32::new(0));
        let raise = request_while_in_guest.then(|| shared.platform_requested.clone());
        let vcpu = ScriptedVcpu { exits: exits.into(), entries: entries.clone(), raise };
        let handler = TestExits::default();
        let vcpu_loop = VcpuLoop {
            id: 3,
            pio: Bus::new(),
            mmio: Bus::new(),
            arch_exits: handler.clone(),
            save: |_: &mut ScriptedVcpu| Ok(()),
            save_round: 0,
            saved: Arc::new(Mutex::new(Vec::new())),
        };
        let (sender, events): (_, Receiver<VcpuEvent>) = channel();
        let thread = thread::spawn({
            let shared = shared.clone();
            move || vcpu_loop.run(vcpu, &shared, move |event| sender.send(event).unwrap())
        });
        let event = events.recv_timeout(Duration::from_millis(200)).ok();
        {
            let mut control = shared.lock();
            control.stop = true;
            shared.attention.store(true, Ordering::SeqCst);
            shared.changed.notify_all();
        }
        thread.join().unwrap();
        let hypercalls = handler.hypercalls.lock().unwrap().clone();
        (event, entries.load(Ordering::SeqCst), hypercalls)
    }

    #[test]
    fn an_architecture_s_exits_reach_its_handler_and_its_requests_the_vmm() {
        let script = vec![
            VcpuExit::Arch(TestExit::Hypercall(0x10)),
            VcpuExit::Hlt,
            VcpuExit::Arch(TestExit::Hypercall(0x2c)),
            VcpuExit::Arch(TestExit::PowerOff),
            VcpuExit::Arch(TestExit::Hypercall(0x99)),
        ];
        let (event, entries, hypercalls) = run_script(script, false);
        assert!(matches!(event, Some(VcpuEvent::Platform(PlatformRequest::Poweroff))));
        assert_eq!(hypercalls, [0x10, 0x2c]);
        // Nothing after the request: the vCPU stays out of the guest until the VMM acts.
        assert_eq!(entries, 4);
    }

    #[test]
    fn an_architecture_s_failure_is_reported_with_the_registers() {
        let (event, entries, _) = run_script(vec![VcpuExit::Arch(TestExit::Fault)], false);
        let Some(VcpuEvent::Failed { id, reason, state }) = event else { panic!("no failure reported") };
        assert_eq!((id, reason.as_str(), state.as_str()), (3, "the test's fault", "scripted registers"));
        assert_eq!(entries, 1);
    }

    #[test]
    fn a_failure_after_a_platform_request_is_part_of_it() {
        // A reset requested while the vCPU was in the guest, which then faulted: the VMM acts on the reset alone,
        // and the vCPU does not enter the guest again.
        let (event, entries, _) = run_script(vec![VcpuExit::Arch(TestExit::Fault), VcpuExit::Hlt], true);
        assert!(event.is_none(), "the failure was reported");
        assert_eq!(entries, 1);
    }
}

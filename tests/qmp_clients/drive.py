#!/usr/bin/env python3
"""Drives the real `kestrel` binary with the real QMP clients from the `qemu.qmp` package (PyPI).

    python3 tests/qmp_clients/drive.py --kestrel PATH --payload PATH/probe.pvh.elf
    python3 tests/qmp_clients/drive.py --qemu qemu-system-x86_64 --payload ...   (the same against real QEMU)

Three VMs on the repo's `probe.pvh.elf` payload with cmdline `spin` (it halts forever):

1. `--qmp unix:...` with `--cpus 2 --name --uuid`, driven by `QMPClient`: negotiation, queries, stop/cont/
   system_reset/system_powerdown with their events (taken from the client's event listener, and already there when
   the command's reply arrives, as QEMU sends them), disconnect and reconnect, then `quit`.
2. The same VM between the two client sessions, driven by `qmp-shell` (`python3 -m qemu.qmp.qmp_shell`, the module
   behind the package's `qmp-shell` script) in a scripted run: commands piped on stdin, QMP mode and HMP mode (-H).
3. QEMU's own spellings (`-chardev socket,... -mon chardev=...,mode=control -S -name guest=... -m -kernel -append`):
   prelaunch until `cont`, the guest printing nothing before it.

Every check prints one line (`ok` or `FAIL`); the last line is `N passed, N failed`; the exit status is 1 if any
check failed. Uses only the standard library and qemu.qmp.
"""

import argparse
import asyncio
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

try:
    from qemu.qmp import EventListener, QMPClient, Runstate
except ImportError as err:  # the Rust wrapper checks this first; this is for people running the script by hand
    print(f"qemu.qmp is not importable ({err}); install it with: python3 -m pip install qemu.qmp==0.0.6")
    sys.exit(2)

AGAINST_QEMU = False  # --qemu: the same sessions against real QEMU, to check that these expectations are QEMU's
STEP = 10.0  # seconds any single QMP exchange or process step may take
NAME = "kestrel-qmp-clients"
UUID = "6a0c3e8e-3c51-4d59-a4b5-1d2f7c0f9e42"


class Checks:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, what, ok, detail=""):
        if ok:
            self.passed += 1
            print(f"ok   {what}", flush=True)
        else:
            self.failed += 1
            print(f"FAIL {what}" + (f": {detail}" if detail else ""), flush=True)
        return ok

    def equal(self, what, got, want):
        return self.check(what, got == want, f"got {got!r}, want {want!r}")


def die_with_parent():
    """In the child before exec: SIGKILL it if this script dies (say, killed by the Rust wrapper's timeout)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Vm:
    """A kestrel process with its QMP socket, serial output in a file."""

    def __init__(self, workdir, tag, argv, sock):
        self.tag = tag
        self.sock = sock
        self.out_path = os.path.join(workdir, f"{tag}.out")
        self.err_path = os.path.join(workdir, f"{tag}.err")
        self.out = open(self.out_path, "wb")
        self.err = open(self.err_path, "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.out, stderr=self.err,
                                     preexec_fn=die_with_parent)

    def wait_for_socket(self):
        deadline = time.monotonic() + STEP
        while time.monotonic() < deadline:
            if os.path.exists(self.sock):
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.005)
        return False

    def stdout(self):
        with open(self.out_path, "rb") as f:
            return f.read().decode(errors="replace")

    def stderr(self):
        with open(self.err_path, "rb") as f:
            return f.read().decode(errors="replace")

    def describe(self):
        return f"[{self.tag}: exit {self.proc.poll()}; stdout {self.stdout()!r}; stderr {self.stderr()!r}]"

    def wait_exit(self, timeout=STEP):
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.out.close()
        self.err.close()


def greeting_of(qmp):
    """The greeting the client received, as plain data (through the Greeting model's public attributes)."""
    g = qmp.greeting.QMP
    return {"QMP": {"version": dict(g.version), "capabilities": list(g.capabilities)}}


async def step(awaitable):
    return await asyncio.wait_for(awaitable, STEP)


async def command_with_event(c, qmp, cmd, event, data=None, label=""):
    """Runs `cmd` with an event listener and checks that `event` was delivered before the command's reply."""
    cmd_label = f"{label}{cmd}"
    listener = EventListener()
    with qmp.listen(listener):
        ret = await step(qmp.execute(cmd))
        c.equal(f"{cmd_label} returns {{}}", ret, {})
        # qemu.qmp dispatches messages in arrival order: an event sent before the reply is queued by now.
        queued_before_reply = not listener.empty()
        try:
            ev = await asyncio.wait_for(listener.get(), STEP)
        except asyncio.TimeoutError:
            c.check(f"{cmd_label}: {event} event received", False, f"no event within {STEP}s")
            return
    c.equal(f"{cmd_label}: event name", ev.get("event"), event)
    c.check(f"{cmd_label}: {event} arrived before the reply", queued_before_reply)
    ts = ev.get("timestamp", {})
    c.check(f"{cmd_label}: {event} has a timestamp {{seconds, microseconds}} near now",
            isinstance(ts.get("seconds"), int) and isinstance(ts.get("microseconds"), int)
            and 0 <= ts["microseconds"] < 1_000_000 and abs(ts["seconds"] - time.time()) < 60, repr(ts))
    if data is None:
        c.check(f"{cmd_label}: {event} carries no data", "data" not in ev, repr(ev))
    else:
        c.equal(f"{cmd_label}: {event} data", ev.get("data"), data)
    stray = listener.clear()
    c.check(f"{cmd_label}: no further events", not stray, repr(stray))


async def status(qmp):
    return await step(qmp.execute("query-status"))


async def client_session_one(c, vm):
    """Negotiation, queries, stop/cont/reset/powerdown with events; returns the greeting."""
    qmp = QMPClient("drive")
    await step(qmp.connect(vm.sock))
    c.equal("QMPClient connects and negotiates", qmp.runstate, Runstate.RUNNING)
    greeting = greeting_of(qmp)
    ver = greeting["QMP"]["version"]
    c.check("greeting reports a QEMU version management tools accept (>= 5.0)",
            (ver["qemu"]["major"], ver["qemu"]["minor"]) >= (5, 0), repr(ver))
    if not AGAINST_QEMU:
        c.check("greeting package names kestrel", ver.get("package", "").startswith("kestrel"), repr(ver))

    qv = await step(qmp.execute("query-version"))
    c.equal("query-version matches the greeting", qv, ver)

    st = await status(qmp)
    c.equal("query-status: running", (st.get("status"), st.get("running")), ("running", True))

    c.equal("query-name", await step(qmp.execute("query-name")), {"name": NAME})
    c.equal("query-uuid", await step(qmp.execute("query-uuid")), {"UUID": UUID})
    c.equal("query-kvm", await step(qmp.execute("query-kvm")), {"enabled": True, "present": True})

    cpus = await step(qmp.execute("query-cpus-fast"))
    c.equal("query-cpus-fast: cpu-index 0 and 1", [cpu.get("cpu-index") for cpu in cpus], [0, 1])
    tids = [cpu.get("thread-id") for cpu in cpus]
    # Asked right after start, as libvirt does to pin vCPU threads: QEMU has every vCPU thread up before it
    # serves QMP, so a thread id is never a placeholder.
    c.check("query-cpus-fast right after start: every thread-id is a real one (> 0)",
            all(isinstance(t, int) and t > 0 for t in tids), f"{tids!r} (vCPU threads not registered yet?)")
    c.check("query-cpus-fast: distinct thread ids, none the main thread",
            len(set(tids)) == 2 and vm.proc.pid not in tids, repr(tids))
    for tid in tids:
        c.check(f"query-cpus-fast: thread {tid} exists as /proc/{vm.proc.pid}/task/{tid}",
                os.path.isdir(f"/proc/{vm.proc.pid}/task/{tid}"))
    c.equal("query-cpus-fast: target", [cpu.get("target") for cpu in cpus], ["x86_64", "x86_64"])

    await command_with_event(c, qmp, "stop", "STOP")
    st = await status(qmp)
    c.equal("query-status after stop: paused", (st.get("status"), st.get("running")), ("paused", False))
    await command_with_event(c, qmp, "cont", "RESUME")
    st = await status(qmp)
    c.equal("query-status after cont: running", (st.get("status"), st.get("running")), ("running", True))
    await command_with_event(c, qmp, "system_reset", "RESET", {"guest": False, "reason": "host-qmp-system-reset"})
    st = await status(qmp)
    c.equal("query-status after system_reset: running", st.get("status"), "running")
    # The spin payload ignores the ACPI power button, so the VM keeps running; the event is what QMP promises.
    await command_with_event(c, qmp, "system_powerdown", "POWERDOWN")
    st = await status(qmp)
    c.equal("query-status after system_powerdown (payload ignores it): running", st.get("status"), "running")

    hmp = await step(qmp.execute("human-monitor-command", {"command-line": "info status"}))
    c.equal("human-monitor-command info status", hmp, "VM status: running\r\n")

    await step(qmp.disconnect())
    c.equal("disconnect leaves the client idle", qmp.runstate, Runstate.IDLE)
    c.check("VM still alive after the client disconnected", vm.proc.poll() is None, vm.describe())
    return greeting


def qmp_shell(c, vm, workdir, hmp, script):
    """Runs qmp-shell with `script` on stdin; returns its stdout lines (without the banner)."""
    argv = [sys.executable, "-m", "qemu.qmp.qmp_shell"] + (["-H"] if hmp else []) + [vm.sock]
    mode = "HMP" if hmp else "QMP"
    # qmp-shell keeps a readline history in $HOME: give it a private one.
    env = dict(os.environ, HOME=workdir)
    try:
        r = subprocess.run(argv, input=script, capture_output=True, text=True, timeout=STEP * 3, env=env)
    except subprocess.TimeoutExpired as e:
        c.check(f"qmp-shell ({mode}) finishes", False, f"timed out; stdout {e.stdout!r}")
        return []
    c.check(f"qmp-shell ({mode}) exits 0", r.returncode == 0, f"exit {r.returncode}; stderr {r.stderr!r}")
    c.check(f"qmp-shell ({mode}) writes nothing to stderr", r.stderr.strip() == "", repr(r.stderr))
    c.check(f"qmp-shell ({mode}) banner: Connected to QEMU x.y.z",
            any(line.startswith("Connected to QEMU ") for line in r.stdout.splitlines()), repr(r.stdout))
    return r.stdout


def shell_session(c, vm, workdir, greeting):
    qemu = greeting["QMP"]["version"]["qemu"]
    want_banner = f"Connected to QEMU {qemu['major']}.{qemu['minor']}.{qemu['micro']}"

    out = qmp_shell(c, vm, workdir, False, "query-status\nstop\nquery-status\ncont\n")
    c.check("qmp-shell (QMP) banner shows the greeting's version", want_banner in out, repr(out))
    # Each reply is printed as one JSON object after the "(QEMU) " prompt.
    replies = []
    for chunk in out.split("(QEMU) ")[1:]:
        chunk = chunk.strip()
        if chunk:
            try:
                replies.append(json.loads(chunk))
            except ValueError:
                replies.append(chunk)
    want = [
        {"return": {"status": "running", "singlestep": False, "running": True}},
        {"return": {}},
        {"return": {"status": "paused", "singlestep": False, "running": False}},
        {"return": {}},
    ]
    c.equal("qmp-shell (QMP): query-status, stop, query-status, cont replies", replies, want)

    # Only the HMP subset Kestrel implements (its `stop`/`cont` are QMP-only for now).
    out = qmp_shell(c, vm, workdir, True, "info status\ninfo name\ninfo kvm\ninfo version\n")
    texts = [chunk.strip() for chunk in out.split("(QEMU) ")[1:]]
    texts = [t for t in texts if t]
    want_version = f"{qemu['major']}.{qemu['minor']}.{qemu['micro']}{greeting['QMP']['version']['package']}"
    c.equal("qmp-shell -H: info status, info name, info kvm, info version",
            texts, ["VM status: running", NAME, "kvm support: enabled", want_version])


async def client_session_two(c, vm, first_greeting):
    """Reconnect (fresh greeting, fresh negotiation), then quit."""
    qmp = QMPClient("drive-again")
    await step(qmp.connect(vm.sock))
    c.equal("reconnect: negotiated again", qmp.runstate, Runstate.RUNNING)
    greeting = greeting_of(qmp)
    c.equal("reconnect: a fresh greeting, the same as the first", greeting, first_greeting)
    st = await status(qmp)
    c.equal("reconnect: query-status running (qmp-shell's cont held)", st.get("status"), "running")
    await command_with_event(c, qmp, "quit", "SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"},
                             label="reconnect: ")
    try:
        await step(qmp.disconnect())
    except Exception as err:  # the server hung up after its reply; qemu.qmp may report that on disconnect
        print(f"note: disconnect after quit said {err!r}")
    code = vm.wait_exit()
    c.equal("quit: kestrel exits with status 0", code, 0)


async def prelaunch_session(c, vm):
    qmp = QMPClient("drive-prelaunch")
    await step(qmp.connect(vm.sock))
    c.equal("-chardev/-mon: QMPClient connects and negotiates", qmp.runstate, Runstate.RUNNING)
    st = await status(qmp)
    c.equal("-S: query-status prelaunch", (st.get("status"), st.get("running")), ("prelaunch", False))
    c.equal("-name guest=...: query-name", await step(qmp.execute("query-name")), {"name": "prelaunch-vm"})
    hmp = await step(qmp.execute("human-monitor-command", {"command-line": "info status"}))
    c.equal("-S: info status", hmp, "VM status: paused (prelaunch)\r\n")
    await asyncio.sleep(0.2)
    c.check("-S: the guest printed nothing before cont", "kestrel-probe" not in vm.stdout(), repr(vm.stdout()))
    await command_with_event(c, qmp, "cont", "RESUME", label="-S: ")
    st = await status(qmp)
    c.equal("-S: cont -> running", (st.get("status"), st.get("running")), ("running", True))
    deadline = time.monotonic() + STEP
    while "kestrel-probe: entry=pvh" not in vm.stdout() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    c.check("-S: the guest runs after cont (its banner appears)", "kestrel-probe: entry=pvh" in vm.stdout(),
            repr(vm.stdout()))
    await command_with_event(c, qmp, "quit", "SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"}, label="-S: ")
    try:
        await step(qmp.disconnect())
    except Exception as err:
        print(f"note: disconnect after quit said {err!r}")
    c.equal("-S: quit exits 0", vm.wait_exit(), 0)


async def guarded(c, what, coro):
    """Runs one session; an exception or timeout is a failed check, not a crash of the script."""
    try:
        return await coro
    except Exception as err:  # noqa: BLE001 - any error is a test failure with its description
        c.check(f"{what} completes", False, f"{type(err).__name__}: {err}")
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kestrel", help="path of the kestrel binary")
    ap.add_argument("--payload", required=True, help="path of tests/payloads' probe.pvh.elf")
    ap.add_argument("--qemu", metavar="QEMU",
                    help="run the same sessions against this qemu-system-x86_64 (microvm, KVM) instead, to check "
                         "that what this script expects is what QEMU does")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (sockets, serial output)")
    args = ap.parse_args()
    if not args.kestrel and not args.qemu:
        ap.error("--kestrel or --qemu is required")
    global AGAINST_QEMU
    AGAINST_QEMU = bool(args.qemu)
    # QEMU: microvm on KVM with the payload's console on COM1 (stdout); the QMP options are Kestrel's.
    qemu = [args.qemu, "-M", "microvm", "-accel", "kvm", "-nodefaults", "-no-user-config", "-display", "none",
            "-serial", "stdio"] if args.qemu else []

    c = Checks()
    workdir = tempfile.mkdtemp(prefix="kestrel-qmp-clients-")
    vms = []
    try:
        sock = os.path.join(workdir, "qmp.sock")
        if qemu:
            argv = qemu + ["-kernel", args.payload, "-append", "spin", "-m", "64", "-smp", "2",
                           "-qmp", f"unix:{sock},server=on,wait=off", "-name", NAME, "-uuid", UUID]
        else:
            argv = [args.kestrel, "--kernel", args.payload, "--cmdline", "spin", "--memory", "64M", "--cpus", "2",
                    "--qmp", f"unix:{sock},server=on,wait=off", "--name", NAME, "--uuid", UUID]
        vm = Vm(workdir, "vm1", argv, sock)
        vms.append(vm)
        if c.check("kestrel (--qmp) creates its QMP socket", vm.wait_for_socket(), vm.describe()):
            if not AGAINST_QEMU:  # QEMU leaves it to the umask; Kestrel's socket is private by design
                mode = os.stat(sock).st_mode & 0o777
                c.equal("QMP socket mode", oct(mode), oct(0o600))
            greeting = asyncio.run(guarded(c, "QMPClient session", client_session_one(c, vm)))
            if greeting is not None:
                try:
                    shell_session(c, vm, workdir, greeting)
                except Exception as err:  # noqa: BLE001
                    c.check("qmp-shell session completes", False, f"{type(err).__name__}: {err}")
                asyncio.run(guarded(c, "QMPClient reconnect session", client_session_two(c, vm, greeting)))
        if c.failed:
            print(f"vm1 {vm.describe()}")

        failed_before = c.failed
        sock2 = os.path.join(workdir, "qmp2.sock")
        vm2 = Vm(workdir, "vm2", (qemu or [args.kestrel]) + ["-kernel", args.payload, "-append", "spin", "-m", "64",
                                  "-chardev", f"socket,id=mon0,path={sock2},server=on,wait=off",
                                  "-mon", "chardev=mon0,mode=control", "-S", "-name", "guest=prelaunch-vm"], sock2)
        vms.append(vm2)
        if c.check("kestrel (-chardev/-mon, -S) creates its QMP socket", vm2.wait_for_socket(), vm2.describe()):
            asyncio.run(guarded(c, "prelaunch session", prelaunch_session(c, vm2)))
        if c.failed > failed_before:
            print(f"vm2 {vm2.describe()}")
    finally:
        for vm in vms:
            vm.kill()
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    print(f"{c.passed} passed, {c.failed} failed")
    return 1 if c.failed or c.passed == 0 else 0


if __name__ == "__main__":
    sys.exit(main())

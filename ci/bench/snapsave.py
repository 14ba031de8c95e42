#!/usr/bin/env python3
"""One timed save for ci/bench/snapshot: start a VMM running the probe's `flood` payload, let it count, `stop` it
over QMP, then time `migrate` to the snapshot file.

Usage: snapsave.py QMP_SOCKET CONSOLE_FILE SNAPSHOT_FILE URI -- COMMAND [ARGS...]

COMMAND must open its QMP server on QMP_SOCKET and write the guest's serial console to CONSOLE_FILE. Prints one line
    save_ms=<migrate sent -> MIGRATION completed event> reply_ms=<migrate sent -> its reply> size=<st_size>
    alloc=<st_blocks * 512>
or, on a failure (a VMM that cannot do it), `error=<one line>` and exits 1. Blocking sockets and a monotonic clock
(time.perf_counter) only: no asyncio loop between the socket and the timestamps.
"""

import json
import os
import socket
import subprocess
import sys
import time

TIMEOUT = 30.0
# The guest must have counted for a while (not just printed its banner) before the save.
CONSOLE_BYTES_BEFORE_SAVE = 4000


class Failure(Exception):
    pass


class Qmp:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb", buffering=0)
        self.events = []
        self.message()  # greeting
        self.execute("qmp_capabilities")

    def message(self):
        line = self.file.readline()
        if not line:
            raise Failure("the QMP connection closed")
        message = json.loads(line)
        if "event" in message:
            self.events.append((time.perf_counter(), message))
        return message

    def send(self, command, **arguments):
        request = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self.sock.sendall(json.dumps(request).encode())

    def reply(self, command):
        while True:
            message = self.message()
            if "return" in message:
                return message["return"]
            if "error" in message:
                raise Failure(f"{command}: {message['error'].get('desc', message['error'])}")

    def execute(self, command, **arguments):
        self.send(command, **arguments)
        return self.reply(command)

    def migration_done(self):
        """The time of the MIGRATION event that ended the migration, reading events until it arrives."""
        while True:
            for at, event in self.events:
                if event["event"] == "MIGRATION" and event["data"]["status"] in ("completed", "failed"):
                    if event["data"]["status"] == "failed":
                        raise Failure("migrate: MIGRATION failed")
                    return at
            self.message()


def wait_until(what, done, vm):
    deadline = time.monotonic() + TIMEOUT
    while not done():
        if vm.poll() is not None:
            raise Failure(f"the VMM exited (status {vm.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise Failure(f"timed out waiting for {what}")
        time.sleep(0.005)


def console_bytes(path):
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def save(qmp_path, console, snapshot, uri, command, stderr):
    vm = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)
    try:
        wait_until("its QMP socket appeared", lambda: os.path.exists(qmp_path), vm)
        wait_until("the guest counted", lambda: console_bytes(console) >= CONSOLE_BYTES_BEFORE_SAVE, vm)
        qmp = Qmp(qmp_path)
        # Both send MIGRATION events only with this capability (as libvirt turns it on at every start).
        qmp.execute("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
        # A non-live save, as libvirt's `virsh save` does it: the guest is paused for the whole copy.
        qmp.execute("stop")
        start = time.perf_counter()
        qmp.send("migrate", uri=uri)
        qmp.reply("migrate")
        replied = time.perf_counter()
        completed = qmp.migration_done()
        qmp.execute("quit")
        vm.wait(TIMEOUT)
        # QEMU's `exec:cat > PATH` child may still be writing the pipe's last bytes when QEMU has quit.
        deadline = time.monotonic() + TIMEOUT
        size = -1
        while time.monotonic() < deadline:
            now = os.stat(snapshot).st_size
            if now == size:
                break
            size = now
            time.sleep(0.05)
        blocks = os.stat(snapshot).st_blocks * 512
        return f"save_ms={(completed - start) * 1e3:.3f} reply_ms={(replied - start) * 1e3:.3f} size={size} alloc={blocks}"
    finally:
        if vm.poll() is None:
            vm.kill()
            vm.wait()


def main(argv):
    if len(argv) < 7 or argv[5] != "--":
        sys.stderr.write(__doc__)
        return 2
    qmp_path, console, snapshot, uri = argv[1:5]
    for path in (qmp_path, console, snapshot):
        if os.path.exists(path):
            os.unlink(path)
    try:
        print(save(qmp_path, console, snapshot, uri, argv[6:], sys.stderr))
        return 0
    except (Failure, OSError, subprocess.TimeoutExpired, ValueError) as e:
        print("error=" + str(e).replace("\n", " "))
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))

#!/usr/bin/env python3
"""Record real QEMU answering QMP sessions, as raw bytes, for the qmp crate's fixtures.

Usage: record.py OUTDIR   (needs qemu-system-x86_64; QEMU 7.2 was used for the checked-in files)

Each session becomes OUTDIR/<name>.txt: one line per event, `>` + the bytes sent (a JSON string, bytes as
latin-1 code points so any byte survives), `<` + one line QEMU wrote (without its \r\n; QEMU's output is ASCII).
A session is a fresh connection, so it starts with the greeting.
"""
import json, os, socket, subprocess, sys, time

SOCK = "/tmp/kestrel-qmp-record.sock"

def deep(n):
    return b"[" * n + b"]" * n

GOOD = b'{"execute":"query-status"}'
SESSIONS = [
    ("greeting_and_queries", [
        b'{"execute":"qmp_capabilities"}',
        b'{"execute":"query-status"}',
        b'{"execute":"query-version"}',
        b'{"execute":"query-name"}',
        b'{"execute":"query-uuid"}',
        b'{"execute":"query-kvm"}',
        b'{"execute":"query-target"}',
        b'{"execute":"query-cpus-fast"}',
        b'{"execute":"query-hotpluggable-cpus"}',
        b'{"execute":"query-memory-size-summary"}',
        b'{"execute":"query-chardev"}',
        b'{"execute":"qom-list","arguments":{"path":"/"}}',
        b'{"execute":"qom-list","arguments":{"path":"/machine"}}',
        b'{"execute":"qom-get","arguments":{"path":"/machine","property":"type"}}',
        b'{"execute":"qom-get","arguments":{"path":"/machine/unattached/device[0]","property":"type"}}',
        b'{"execute":"human-monitor-command","arguments":{"command-line":"info status"}}',
        b'{"execute":"human-monitor-command","arguments":{"command-line":"info cpus"}}',
        b'{"execute":"human-monitor-command","arguments":{"command-line":"info version"}}',
        b'{"execute":"human-monitor-command","arguments":{"command-line":"info nosuch"}}',
        b'{"execute":"human-monitor-command","arguments":{"command-line":"nosuch"}}',
        b'{"execute":"human-monitor-command","arguments":{"command-line":""}}',
    ]),
    ("negotiation", [
        b'{"execute":"query-status"}',
        b'{"execute":"no-such-command","id":1}',
        b'{"execute":"qmp_capabilities","arguments":{"enable":["foo"]}}',
        b'{"execute":"qmp_capabilities","arguments":{"enable":[1]}}',
        b'{"execute":"qmp_capabilities","arguments":{"enable":"oob"}}',
        b'{"execute":"qmp_capabilities","arguments":{"bogus":1}}',
        b'{"execute":"qmp_capabilities","bogus":1}',
        b'{"arguments":{}}',
        b'{"execute":"qmp_capabilities","arguments":[]}',
        b'{"execute":1}',
        b'{"exec-oob":"qmp_capabilities"}',
        b'{"execute":"qmp_capabilities","id":"neg"}',
        b'{"execute":"qmp_capabilities","id":"again"}',
        b'{"execute":"no-such-command","id":2}',
        b'{"exec-oob":"query-status"}',
    ]),
    ("id_echo", [
        b'{"execute":"qmp_capabilities"}',
        b'{"execute":"query-status","id":"libvirt-1"}',
        b'{"execute":"query-status","id":42}',
        b'{"execute":"query-status","id":-7}',
        b'{"execute":"query-status","id":1.5}',
        b'{"execute":"query-status","id":0.1}',
        b'{"execute":"query-status","id":18446744073709551615}',
        b'{"execute":"query-status","id":18446744073709551616}',
        b'{"execute":"query-status","id":-9223372036854775809}',
        b'{"execute":"query-status","id":1e3}',
        b'{"execute":"query-status","id":null}',
        b'{"execute":"query-status","id":true}',
        b'{"execute":"query-status","id":{"b":[1,{"c":null}],"a":"x"}}',
        b'{"execute":"query-status","id":[]}',
        b'{"execute":"query-status","id":{}}',
        b'{"execute":"query-status","id":"\xc3\xbcn \xe2\x82\xac \xf0\x9f\x98\x80 \\u0000 \\u007f \\t\\"/"}',
        b'{"execute":"nope","id":"err-1"}',
        b'{"id":"first","execute":"query-status"}',
        b'{"execute":"query-status","arguments":{},"id":"pid:1"}',
    ]),
    ("parse_errors", [
        b'{"execute":"qmp_capabilities"}',
        b'}', b']', b'@', b'{"execute": foo}', b"{'execute': 'query-status', 'id': 'sq'}",
        b'"string"', b'42 ', b'[1,2]', b'null ', b'true ', b'{"a":1,}', b'{,}', b'{"a" 1}', b'[1 2]',
        b'{"execute":"query-status","id":1,"id":2}', b'{"execute":"query-status","id":"\\x"}',
        b'{"execute":"query-status","id":"\\u12"}', b'{"execute":"query-status","id":"\\uD800"}',
        b'{"execute":"query-status","id":"\\uD83D\\uDE00"}', b'\xff', b'{"id":"\xc3\x28"}', b'{"id":"a\x01b"}',
        b'01 ', b'-', b'1.5e3 ', b'{"execute":"query-status"} garbage {"execute":"query-status","id":"after"}',
        b'{"execute":"query-status", @ "id":1}', b'{"execute":"query-status",\n"id":2}',
        b'{"execute"', b':"query-status","id":"split"}', b'  \r\n  ',
        b'{"execute":"query-status","id":"a"}{"execute":"query-status","id":"b"}',
        deep(1024), b'{"execute":"query-status","id":"d1"}', deep(1025), b'{"execute":"query-status","id":"d2"}',
        b'{"id": abc}', b'{"id": "x", 1: 2}', b'[1,]', b'{"id":tru}', b'%d', b'{"execute":"query-status","id":"\xed\xa0\x80"}',
        b'{"execute":"query-status","id":"\xc0\x80"}', b'{"execute":"query-status","id":"\xef\xbf\xbf"}',
        b'{"a":1, @ "b" , "c"}', b'- ', b'@\xff', b'{"execute":"query-status","id":"\\uFFFF"}', b'True ',
        b'{"execute":"query-status","id":"\\u0041\\uDC00"}', b'{"execute":"query-status","id":"\\uD800\\u0041"}',
        b'{"execute":"query-status","exec-oob":"x","id":"both"}', b'{"execute":"query-status","foo":1,"bar":2}',
    ]),
    ("arguments", [
        b'{"execute":"qmp_capabilities"}',
        b'{"execute":"query-status","arguments":{"x":1}}',
        b'{"execute":"human-monitor-command"}',
        b'{"execute":"human-monitor-command","arguments":{"command-line":1}}',
        b'{"execute":"human-monitor-command","arguments":{"command-line":"info status","cpu-index":"x"}}',
        b'{"execute":"human-monitor-command","arguments":{"command-line":"info status","cpu-index":1.5}}',
        b'{"execute":"human-monitor-command","arguments":{"command-line":"info status","extra":1}}',
        b'{"execute":"qom-get","arguments":{"path":"/machine"}}',
        b'{"execute":"qom-get","arguments":{"path":"/nosuch","property":"type"}}',
        b'{"execute":"qom-get","arguments":{"path":"/machine","property":"nosuch"}}',
        b'{"execute":"qom-list","arguments":{"path":1}}',
        b'{"execute":"qom-list","arguments":{"path":"/nosuch"}}',
        b'{"execute":"qom-list","arguments":{}}',
        b'{"execute":"query-cpus-fast","arguments":{"a":1,"b":2}}',
        b'{"execute":"qom-get","arguments":{"path":1,"property":2}}',
        b'{"execute":"qom-get","arguments":{"zz":1}}',
    ]),
    ("lifecycle", [
        b'{"execute":"qmp_capabilities"}',
        b'{"execute":"query-status","id":1}',
        b'{"execute":"stop","id":2}',
        b'{"execute":"cont","id":3}',
        b'{"execute":"query-status","id":4}',
        b'{"execute":"cont","id":5}',
        b'{"execute":"stop","id":6}',
        b'{"execute":"stop","id":7}',
        b'{"execute":"query-status","id":8}',
        b'{"execute":"human-monitor-command","arguments":{"command-line":"info status"},"id":9}',
        b'{"execute":"cont","id":10}',
        b'{"execute":"human-monitor-command","arguments":{"command-line":"info status"},"id":11}',
        b'{"execute":"system_reset","id":12}',
        b'{"execute":"system_powerdown","id":13}',
        b'{"execute":"quit","id":14}',
    ]),
]

def drain(s, quiet):
    out = b""
    s.settimeout(quiet)
    while True:
        try:
            d = s.recv(1 << 20)
        except socket.timeout:
            return out
        if not d:
            return out
        out += d

def main():
    outdir = sys.argv[1]
    extra = sys.argv[2:]  # e.g. query-qmp-schema dumps
    try: os.unlink(SOCK)
    except FileNotFoundError: pass
    q = subprocess.Popen(["qemu-system-x86_64", "-S", "-display", "none", "-nodefaults", "-accel", "tcg",
                          "-qmp", f"unix:{SOCK},server=on,wait=off"])
    for _ in range(100):
        if os.path.exists(SOCK): break
        time.sleep(0.05)
    for name, sends in SESSIONS:
        s = socket.socket(socket.AF_UNIX); s.connect(SOCK)
        lines = []
        def recv():
            data = drain(s, 0.3)
            assert data == b"" or data.endswith(b"\r\n"), data
            for l in data.split(b"\r\n")[:-1]:
                lines.append("<" + l.decode("ascii"))
        recv()
        for b in sends:
            lines.append(">" + json.dumps(b.decode("latin-1")))
            s.sendall(b)
            recv()
        s.close()
        with open(os.path.join(outdir, name + ".txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    q.wait(timeout=10)

main()

#![cfg(target_arch = "x86_64")]

//! A domain run by libvirt with Kestrel as its `<emulator>`, driven by virsh as a user drives it: define, start,
//! suspend, resume, the serial console, QMP passed through, ACPI shutdown, destroy, undefine, checking at each step
//! the state libvirt reports. The guest is the repo's probe payload (direct kernel boot, `echo` and `acpi`).
//! libvirt runs privately (`support::libvirt`), with the emulator as root: /dev/kvm is root's only on the
//! development machines, and libvirt does not give its QEMU user access to it.

mod support;

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use support::libvirt::{libvirt_available, PrivateLibvirt, TIMEOUT};
use support::{kestrel_binary, kvm_available, payload};

const ROOT_EMULATOR: &str = "user = \"root\"\ngroup = \"root\"";
const DOMAIN: &str = "kestrel-dom";

/// A minimal domain of `machine` (`pc`, `q35`): direct kernel boot of `kernel` with `cmdline`, a serial console on a pty, and nothing else
/// (libvirt's default USB controller turned off, and its memory balloon unless `devices` has one). The CPU is the host's, the one Kestrel
/// offers, except for QEMU, which cannot give this machine's KVM its host CPU (it fails to set
/// IA32_ARCH_CAPABILITIES) and gets libvirt's default, qemu64.
fn domain_xml(
    emulator: &Path,
    machine: &str,
    kernel: &Path,
    cmdline: &str,
    cpu: Option<&str>,
    devices: &str,
) -> String {
    let default_cpu = if emulator.ends_with("qemu-system-x86_64") { "" } else { "<cpu mode='host-passthrough'/>" };
    let cpu = cpu.unwrap_or(default_cpu);
    let balloon = if devices.contains("<memballoon") { "" } else { "<memballoon model='none'/>" };
    format!(
        "<domain type='kvm'>
  <name>{DOMAIN}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='{machine}'>hvm</type>
    <kernel>{}</kernel>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  {cpu}
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>{}</emulator>
    <controller type='usb' model='none'/>
    {balloon}
    <serial type='pty'><target port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    {devices}
  </devices>
</domain>
",
        kernel.display(),
        emulator.display()
    )
}

/// The options (the words starting with `-`) of the emulator's command line, from the domain's log.
fn logged_options(log: &str) -> Vec<String> {
    let start = log.rfind("LC_ALL=C").unwrap_or_else(|| panic!("no command line in the domain's log:\n{log}"));
    log[start..]
        .lines()
        .take_while(|line| line.ends_with('\\') || line.starts_with('-'))
        .filter_map(|line| line.split_whitespace().next())
        .filter(|word| word.starts_with('-'))
        .map(str::to_string)
        .collect()
}

struct Domain<'a> {
    libvirt: &'a PrivateLibvirt,
    dir: PathBuf,
}

impl<'a> Domain<'a> {
    fn define(libvirt: &'a PrivateLibvirt, emulator: &Path, cmdline: &str) -> Domain<'a> {
        Self::define_machine(libvirt, emulator, "pc", cmdline)
    }

    fn define_machine(libvirt: &'a PrivateLibvirt, emulator: &Path, machine: &str, cmdline: &str) -> Domain<'a> {
        Self::define_with_devices(libvirt, emulator, machine, cmdline, "")
    }

    /// A domain with more `devices` (XML) than the minimal one.
    fn define_with_devices(
        libvirt: &'a PrivateLibvirt,
        emulator: &Path,
        machine: &str,
        cmdline: &str,
        devices: &str,
    ) -> Domain<'a> {
        Self::define_with(libvirt, emulator, machine, cmdline, None, devices)
    }

    /// A domain with its `<cpu>` element (`None`: the default, see `domain_xml`) and more `devices`.
    fn define_with(
        libvirt: &'a PrivateLibvirt,
        emulator: &Path,
        machine: &str,
        cmdline: &str,
        cpu: Option<&str>,
        devices: &str,
    ) -> Domain<'a> {
        // One directory per domain: the tests run at once.
        static DEFINED: AtomicUsize = AtomicUsize::new(0);
        let name = format!("libvirt-domain-{}-{}", std::process::id(), DEFINED.fetch_add(1, Ordering::Relaxed));
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let xml = dir.join("domain.xml");
        std::fs::write(&xml, domain_xml(emulator, machine, &payload("probe.bzImage"), cmdline, cpu, devices)).unwrap();
        libvirt.virsh(&["define", xml.to_str().unwrap()]).assert_success("virsh define");
        Domain { libvirt, dir }
    }

    fn virsh(&self, command: &str) -> String {
        self.libvirt.virsh(&[command, DOMAIN]).assert_success(command).trim().to_string()
    }

    /// `virsh domstate --reason`: "running (booted)", "paused (user)", ...
    fn state(&self) -> String {
        self.libvirt.virsh(&["domstate", "--reason", DOMAIN]).assert_success("domstate").trim().to_string()
    }

    #[track_caller]
    fn wait_for_state(&self, expected: &str) {
        let deadline = Instant::now() + TIMEOUT;
        let mut state = self.state();
        while state != expected && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
            state = self.state();
        }
        assert_eq!(state, expected);
    }

    /// A QMP command passed through libvirt, and its reply's `return`.
    fn qmp(&self, command: &str) -> serde_json::Value {
        let run = self.libvirt.virsh(&["qemu-monitor-command", DOMAIN, command]);
        let reply: serde_json::Value = serde_json::from_str(run.assert_success(command)).unwrap();
        reply["return"].clone()
    }

    /// The emulator's process id, from libvirt's pid file.
    fn pid(&self) -> u32 {
        let pid = self.libvirt.read(&format!("/run/libvirt/qemu/{DOMAIN}.pid")).expect("the domain's pid file");
        pid.trim().parse().unwrap()
    }

    fn log(&self) -> String {
        self.libvirt.read(&format!("/var/log/libvirt/qemu/{DOMAIN}.log")).unwrap_or_default()
    }

    /// Starts the domain, timed; libvirt returns once it sent `cont` and saw `RESUME`.
    fn start(&self, paused: bool) -> Duration {
        let started = Instant::now();
        let args: &[&str] = if paused { &["start", "--paused", DOMAIN] } else { &["start", DOMAIN] };
        let run = self.libvirt.virsh(args);
        let took = started.elapsed();
        assert!(run.status.success(), "virsh start: {}{}\nthe domain's log:\n{}", run.stdout, run.stderr, self.log());
        took
    }

    fn destroy(&self) -> Duration {
        let started = Instant::now();
        self.virsh("destroy");
        started.elapsed()
    }
}

impl Drop for Domain<'_> {
    fn drop(&mut self) {
        // After a failure: whatever state it is in, it goes.
        let _ = self.libvirt.virsh(&["destroy", DOMAIN]);
        let _ = self.libvirt.virsh(&["undefine", DOMAIN]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The domain's serial console, attached as `virsh console` attaches: the pty libvirt reports, read and written.
struct Console {
    pty: File,
    seen: String,
}

impl Console {
    fn attach(path: &str) -> Console {
        let pty = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
            .open(path)
            .unwrap_or_else(|e| panic!("opening the console {path}: {e}"));
        Console { pty, seen: String::new() }
    }

    fn type_text(&mut self, text: &str) {
        self.pty.write_all(text.as_bytes()).unwrap();
    }

    /// Reads until `needle` appeared (in what was read since attaching), or fails with what came.
    #[track_caller]
    fn wait_for(&mut self, needle: &str) {
        let deadline = Instant::now() + TIMEOUT;
        let mut buf = [0u8; 1024];
        while !self.seen.contains(needle) {
            assert!(Instant::now() < deadline, "the console never showed {needle:?}; it showed {:?}", self.seen);
            match self.pty.read(&mut buf) {
                Ok(n) if n > 0 => self.seen.push_str(&String::from_utf8_lossy(&buf[..n])),
                _ => thread::sleep(Duration::from_millis(10)),
            }
        }
    }
}

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn a_domain_runs_under_libvirt_with_kestrel_as_its_emulator() {
    if !kvm_available() || !libvirt_available() {
        return;
    }
    let emulator = std::fs::canonicalize(kestrel_binary()).unwrap();
    let libvirt = PrivateLibvirt::start(Some(ROOT_EMULATOR));
    let domain = Domain::define(&libvirt, &emulator, "echo");
    assert_eq!(domain.state(), "shut off (unknown)");

    let start = domain.start(false);
    assert_eq!(domain.state(), "running (booted)");
    let info = domain.virsh("dominfo");
    assert!(info.lines().any(|l| l.starts_with("State:") && l.ends_with("running")), "{info}");
    let stats = domain.virsh("domstats");
    for line in ["state.state=1", "vcpu.current=1", "vcpu.0.state=1", "block.count=0", "net.count=0"] {
        assert!(stats.lines().any(|l| l.trim() == line), "domstats lacks {line}:\n{stats}");
    }
    let pid = domain.pid();
    eprintln!("libvirt_domain: virsh start took {} ms", start.as_millis());

    // What libvirt asked of Kestrel, against what it asks of QEMU 7.2 with the same few capabilities
    // (../shared/notes/libvirt.md, 2.1: the stripped domain's argv) plus -cpu host for host-passthrough and
    // -sandbox, which Kestrel's probe answers offer.
    let log = domain.log();
    eprintln!("libvirt_domain: the domain's log:\n{log}");
    let options = logged_options(&log);
    let expected = [
        "-name",
        "-S",
        "-object",
        "-machine",
        "-accel",
        "-cpu",
        "-m",
        "-overcommit",
        "-smp",
        "-uuid",
        "-display",
        "-no-user-config",
        "-nodefaults",
        "-chardev",
        "-mon",
        "-rtc",
        "-no-shutdown",
        "-boot",
        "-kernel",
        "-append",
        "-chardev",
        "-device",
        "-audiodev",
        "-sandbox",
        "-msg",
    ];
    assert_eq!(options, expected, "{log}");
    assert!(log.contains("-chardev socket,id=charmonitor,fd="), "{log}");
    assert!(log.contains("-device isa-serial,chardev=charserial0,id=serial0,index=0"), "{log}");

    // QMP through libvirt: the run state, the serial port's pty, the vCPU's real thread.
    assert_eq!(domain.qmp(r#"{"execute":"query-status"}"#)["status"], "running");
    let pretty = libvirt.virsh(&["qemu-monitor-command", "--pretty", DOMAIN, r#"{"execute":"query-status"}"#]);
    assert!(pretty.assert_success("--pretty").contains("\n    \"status\": \"running\""), "{}", pretty.stdout);
    let tty = domain.virsh("ttyconsole");
    let chardevs = domain.qmp(r#"{"execute":"query-chardev"}"#);
    let serial = chardevs.as_array().unwrap().iter().find(|c| c["label"] == "charserial0");
    let serial = serial.unwrap_or_else(|| panic!("no charserial0 in {chardevs}"));
    assert_eq!(serial["filename"], format!("pty:{tty}"));
    let cpus = domain.qmp(r#"{"execute":"query-cpus-fast"}"#);
    let thread = cpus[0]["thread-id"].as_u64().unwrap();
    assert!(Path::new(&format!("/proc/{pid}/task/{thread}")).exists(), "vCPU thread {thread} is not one of {pid}'s");
    let name = std::fs::read_to_string(format!("/proc/{pid}/task/{thread}/comm")).unwrap();
    assert_eq!(name.trim(), "vcpu0");

    // -machine dump-guest-core=off: guest memory (the one mapping of the guest's 64 MiB) is left out of core dumps.
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let guest_ram = smaps.split_inclusive("VmFlags:").zip(smaps.split("VmFlags:").skip(1)).find(|(mapping, _)| {
        mapping.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["Size:", "65536", "kB"])
    });
    let (_, flags) = guest_ram.unwrap_or_else(|| panic!("no 64 MiB mapping in {pid}'s smaps"));
    let flags = flags.lines().next().unwrap_or_default();
    assert!(flags.split_whitespace().any(|f| f == "dd"), "guest RAM's VmFlags:{flags}");

    // libvirtd restarted (as an upgrade does) finds the domain running: it reconnects to the monitor by its path,
    // which Kestrel accepts on again, and checks the state over QMP.
    libvirt.restart_libvirtd();
    assert_eq!(domain.state(), "running (booted)");
    assert_eq!(domain.qmp(r#"{"execute":"query-status"}"#)["status"], "running");
    assert!(process_exists(pid));

    // States change on STOP and RESUME only: these say libvirt saw them.
    domain.virsh("suspend");
    assert_eq!(domain.state(), "paused (user)");
    assert_eq!(domain.qmp(r#"{"execute":"query-status"}"#)["status"], "paused");
    domain.virsh("resume");
    assert_eq!(domain.state(), "running (unpaused)");

    // The console: the payload echoes what is typed; `q` ends it and it powers off (ACPI S5), which libvirt
    // sees as a guest shutdown and ends the emulator (on_poweroff: destroy). What the guest printed last may not
    // be read before the pty goes with the emulator (as with QEMU's), so only the state is checked then.
    let mut console = Console::attach(&tty);
    console.type_text("kestrel");
    console.wait_for("kestrel");
    console.type_text("q");
    domain.wait_for_state("shut off (shutdown)");
    assert!(!process_exists(pid), "the emulator outlived the guest's power-off");

    // ACPI shutdown: the payload waits for the power button, started paused so that the console is attached
    // before the guest prints anything. It powers off only once it saw the button, so the state shows the
    // button worked; its last line ("probe: power button") may go with the pty before it is read, as above
    // (seen under load).
    libvirt.virsh(&["undefine", DOMAIN]).assert_success("undefine");
    let domain = Domain::define(&libvirt, &emulator, "acpi");
    domain.start(true);
    assert_eq!(domain.state(), "paused (user)");
    let mut console = Console::attach(&domain.virsh("ttyconsole"));
    domain.virsh("resume");
    console.wait_for("probe: acpi ready");
    domain.virsh("shutdown");
    domain.wait_for_state("shut off (shutdown)");

    // destroy: SIGTERM, which Kestrel answers with SHUTDOWN and an exit; libvirt cleans up after it.
    domain.start(false);
    let pid = domain.pid();
    let destroy = domain.destroy();
    eprintln!("libvirt_domain: virsh destroy took {} ms", destroy.as_millis());
    assert_eq!(domain.state(), "shut off (destroyed)");
    assert!(!process_exists(pid), "the emulator outlived destroy");
    assert_eq!(libvirt.read(&format!("/run/libvirt/qemu/{DOMAIN}.pid")), None, "the pid file is left");

    domain.virsh("undefine");
    let all = libvirt.virsh(&["list", "--all", "--name"]);
    assert!(!all.assert_success("list").contains(DOMAIN), "{}", all.stdout);
}

#[test]
fn a_q35_domain_runs_too() {
    if !kvm_available() || !libvirt_available() {
        return;
    }
    let emulator = std::fs::canonicalize(kestrel_binary()).unwrap();
    let libvirt = PrivateLibvirt::start(Some(ROOT_EMULATOR));
    let domain = Domain::define_machine(&libvirt, &emulator, "q35", "echo");
    domain.start(true);
    assert_eq!(domain.state(), "paused (user)");
    assert!(domain.log().contains("-machine pc-q35-7.2,usb=off,dump-guest-core=off"), "{}", domain.log());
    let mut console = Console::attach(&domain.virsh("ttyconsole"));
    domain.virsh("resume");
    assert_eq!(domain.state(), "running (unpaused)");
    console.wait_for("probe: echo ready");
    // No `q`: that would end the echo.
    console.type_text("ich9");
    console.wait_for("ich9");
    let pid = domain.pid();
    domain.destroy();
    assert_eq!(domain.state(), "shut off (destroyed)");
    assert!(!process_exists(pid), "the emulator outlived destroy");
}

/// `<cpu mode='host-model'/>`, a common default of management tools: libvirt decodes the host's CPU from the probe's
/// answers into the one named model Kestrel offers, QEMU's kvm64, with the host's other features on and those of
/// kvm64 the host lacks off (as it does for QEMU on this machine), and starts the domain with that `-cpu`; the
/// guest runs. domcapabilities lists host-model as supported, with kvm64. The domain has two vCPUs, which libvirt
/// puts in two sockets.
#[test]
fn a_host_model_cpu_domain_starts_with_the_cpu_libvirt_derived() {
    if !kvm_available() || !libvirt_available() {
        return;
    }
    let emulator = std::fs::canonicalize(kestrel_binary()).unwrap();
    let libvirt = PrivateLibvirt::start(Some(ROOT_EMULATOR));
    let caps = libvirt.virsh(&["domcapabilities", "--emulatorbin", emulator.to_str().unwrap(), "--virttype", "kvm"]);
    let caps = caps.assert_success("domcapabilities");
    let host_model = caps.split("<mode name='host-model'").nth(1).unwrap_or_default();
    assert!(host_model.starts_with(" supported='yes'>"), "{caps}");
    assert!(host_model.contains("<model fallback='forbid'>kvm64</model>"), "{caps}");
    let domain = Domain::define_with(&libvirt, &emulator, "pc", "echo", Some("<cpu mode='host-model'/>"), "");
    // Two vCPUs: libvirt's default topology for them is two sockets of one core.
    libvirt.virsh(&["setvcpus", DOMAIN, "2", "--config", "--maximum"]).assert_success("setvcpus --maximum");
    libvirt.virsh(&["setvcpus", DOMAIN, "2", "--config"]).assert_success("setvcpus");
    domain.start(false);
    assert_eq!(domain.state(), "running (booted)");
    let log = domain.log();
    let cpu = log.split("-cpu ").nth(1).and_then(|rest| rest.split_whitespace().next()).unwrap_or_default();
    assert!(cpu.starts_with("kvm64,"), "{log}");
    eprintln!("libvirt host-model: -cpu {cpu}");
    let mut console = Console::attach(&domain.virsh("ttyconsole"));
    console.type_text("x");
    console.wait_for("x");
    assert!(log.contains("-smp 2,sockets=2,cores=1,threads=1"), "{log}");
    let cpus = domain.qmp(r#"{"execute": "query-cpus-fast"}"#);
    assert_eq!(cpus[0]["qom-path"], "/machine/unattached/device[0]");
    let sockets: Vec<_> = cpus.as_array().unwrap().iter().map(|cpu| cpu["props"]["socket-id"].clone()).collect();
    assert_eq!(sockets, [0, 1], "{cpus}");
    assert_eq!(cpus[1]["props"]["core-id"], 0);
    let pid = domain.pid();
    domain.destroy();
    assert!(!process_exists(pid), "the emulator outlived destroy");
}

/// libvirt's usual network card: it creates the tap itself (`<interface type='ethernet'>`, as for its bridges and
/// networks) and passes it to the emulator as `-netdev tap,fd=N,id=...`. Kestrel takes that tap for
/// the domain's virtio-net device: its descriptor, open in Kestrel, is attached to the interface libvirt named
/// (the kernel's fdinfo for a tap says `iff:` and the name), and destroying the domain takes the interface away.
/// The domain has libvirt's virtio rng on /dev/urandom too.
#[test]
fn a_domain_with_a_network_card_gets_the_tap_libvirt_created() {
    if !kvm_available() || !libvirt_available() {
        return;
    }
    let emulator = std::fs::canonicalize(kestrel_binary()).unwrap();
    let libvirt = PrivateLibvirt::start(Some(ROOT_EMULATOR));
    let tap = format!("kvt{}", std::process::id() % 1_000_000);
    let interface = format!(
        "<interface type='ethernet'><target dev='{tap}' managed='yes'/><mac address='52:54:00:4b:45:53'/>\
         <model type='virtio'/></interface>\
         <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>"
    );
    let domain = Domain::define_with_devices(&libvirt, &emulator, "pc", "echo", &interface);
    domain.start(false);
    assert_eq!(domain.state(), "running (booted)");
    let log = domain.log();
    // (In key=value form: the probe does not claim QEMU's JSON -netdev.)
    assert!(log.contains("-netdev tap,fd="), "{log}");
    assert!(log.contains("virtio-rng-pci"), "{log}");
    let pid = domain.pid();
    let attached = std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap()
        .filter_map(|entry| std::fs::read_to_string(entry.ok()?.path()).ok())
        .any(|info| info.lines().any(|line| line.split_whitespace().collect::<Vec<_>>() == ["iff:", tap.as_str()]));
    assert!(attached, "kestrel (pid {pid}) holds no descriptor attached to tap {tap}; its log:\n{log}");
    assert!(Path::new(&format!("/sys/class/net/{tap}")).exists());
    let interfaces = domain.virsh("domiflist");
    assert!(interfaces.contains(&tap) && interfaces.contains("52:54:00:4b:45:53"), "{interfaces}");
    domain.destroy();
    assert!(!process_exists(pid), "the emulator outlived destroy");
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/sys/class/net/{tap}")).exists() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    assert!(!Path::new(&format!("/sys/class/net/{tap}")).exists(), "libvirt's tap {tap} outlived the domain");
}

/// libvirt's default memory balloon, which every virt-install domain has, with statistics polled every 5 s: the
/// domain starts (libvirt sets the target and reads the balloon at start, and asks for the polling), `virsh setmem
/// --live` moves the target, `virsh dommemstat` reads the balloon and its statistics, and `--period` changes the
/// polling. The probe payload has no balloon driver, so the guest keeps all its memory (`actual`).
#[test]
fn a_domain_with_libvirts_memory_balloon() {
    if !kvm_available() || !libvirt_available() {
        return;
    }
    let emulator = std::fs::canonicalize(kestrel_binary()).unwrap();
    let libvirt = PrivateLibvirt::start(Some(ROOT_EMULATOR));
    let balloon = "<memballoon model='virtio'><stats period='5'/></memballoon>";
    let domain = Domain::define_with_devices(&libvirt, &emulator, "pc", "echo", balloon);
    domain.start(false);
    assert_eq!(domain.state(), "running (booted)");
    let log = domain.log();
    assert!(log.contains("virtio-balloon-pci"), "{log}");
    let interval = r#"{"execute": "qom-get", "arguments": {"path": "/machine/peripheral/balloon0",
                      "property": "guest-stats-polling-interval"}}"#;
    assert_eq!(domain.qmp(interval), serde_json::json!(5));
    let setmem = libvirt.virsh(&["setmem", DOMAIN, "48M", "--live"]);
    setmem.assert_success("virsh setmem --live");
    let stats = domain.virsh("dommemstat");
    assert!(stats.lines().any(|line| line.trim() == "actual 65536"), "{stats}");
    libvirt.virsh(&["dommemstat", DOMAIN, "--period", "3", "--live"]).assert_success("dommemstat --period");
    assert_eq!(domain.qmp(interval), serde_json::json!(3));
    assert_eq!(domain.qmp(r#"{"execute": "query-balloon"}"#), serde_json::json!({"actual": 64 << 20}));
    let pid = domain.pid();
    domain.destroy();
    assert!(!process_exists(pid), "the emulator outlived destroy");
}

/// virt-install's guest agent channel: libvirt adds a virtio-serial controller and passes the channel as a
/// `virtserialport` named org.qemu.guest_agent.0 on a unix socket chardev. Kestrel runs the domain with it,
/// `virsh dumpxml` shows the channel with its socket, the socket takes a client (the host side of the port, as
/// libvirt's agent connection would be), and `query-chardev` reports the chardev. The payload has no guest agent, so
/// nothing answers on the port; `virsh qemu-agent-command` is not tried.
#[test]
fn a_domain_with_the_guest_agent_channel_runs_and_libvirt_sees_the_channel() {
    if !kvm_available() || !libvirt_available() {
        return;
    }
    let emulator = std::fs::canonicalize(kestrel_binary()).unwrap();
    let libvirt = PrivateLibvirt::start(Some(ROOT_EMULATOR));
    let channel = "<channel type='unix'><source mode='bind'/>\
                   <target type='virtio' name='org.qemu.guest_agent.0'/></channel>";
    let domain = Domain::define_with_devices(&libvirt, &emulator, "pc", "echo", channel);
    domain.start(false);
    assert_eq!(domain.state(), "running (booted)");
    let log = domain.log();
    // libvirt 9.0 binds the socket itself and passes it.
    assert!(log.contains("-chardev socket,id=charchannel0,fd="), "{log}");
    assert!(log.contains("virtio-serial-pci"), "{log}");
    assert!(log.contains("virtserialport") && log.contains("name=org.qemu.guest_agent.0"), "{log}");
    let xml = domain.virsh("dumpxml");
    let channel = xml.split("<channel type='unix'>").nth(1).and_then(|c| c.split("</channel>").next());
    let channel = channel.unwrap_or_else(|| panic!("no unix channel in the live XML:\n{xml}"));
    assert!(channel.contains("name='org.qemu.guest_agent.0'"), "{channel}");
    let path = channel.split("path='").nth(1).and_then(|p| p.split('\'').next()).expect("the channel's socket path");
    let chardevs = domain.qmp(r#"{"execute": "query-chardev"}"#);
    let chardev = chardevs.as_array().unwrap().iter().find(|c| c["label"] == "charchannel0");
    let chardev = chardev.unwrap_or_else(|| panic!("no charchannel0 in {chardevs}"));
    assert_eq!(chardev["frontend-open"], false, "nothing in the payload opens the port");
    // The port's host side: libvirt's socket, which Kestrel listens on (bound by Kestrel or passed by libvirt), in
    // the private libvirt's mount namespace, reached through the emulator's root.
    let socket = format!("/proc/{}/root{path}", domain.pid());
    let connected = std::os::unix::net::UnixStream::connect(&socket);
    assert!(connected.is_ok(), "connecting to the channel's socket {socket}: {connected:?}");
    domain.destroy();
}

#[test]
fn a_monitor_descriptor_that_is_not_a_listening_socket_is_one_line() {
    if !kvm_available() {
        return;
    }
    // Descriptor 3 is a file here, not a listening socket; descriptor 9 is not open at all.
    let file = File::open(kestrel_binary()).unwrap();
    for (fd, needle) in [(3, "is not a socket"), (9, "was not passed to Kestrel")] {
        let mut command = support::kestrel_command();
        command.args(["-machine", "none", "-chardev"]);
        command.arg(format!("socket,id=charmonitor,fd={fd},server=on,wait=off"));
        command.args(["-mon", "chardev=charmonitor,id=monitor,mode=control"]);
        let raw = std::os::fd::AsRawFd::as_raw_fd(&file);
        // SAFETY: dup2 and fcntl in the child before exec, onto descriptor 3, of a descriptor the parent keeps open.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
                // dup2 onto itself keeps close-on-exec: cleared in any case.
                if libc::dup2(raw, 3) < 0 || libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let output = command.output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success());
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(needle) && stderr.contains("QMP socket"), "{stderr}");
    }
}

/// `virsh start` (to running: libvirt's start-up QMP, then `cont`) and `virsh destroy` (SIGTERM until the process
/// is gone) for the same domain with Kestrel and with QEMU as its emulator, the median of a few rounds each, after
/// one round that pays for libvirt's probe of the binary. Printed, for comparison; each round must reach the
/// states libvirt reports for a start and a destroy.
#[test]
fn start_and_destroy_times_against_qemu() {
    const ROUNDS: usize = 5;
    if !kvm_available() || !libvirt_available() {
        return;
    }
    let libvirt = PrivateLibvirt::start(Some(ROOT_EMULATOR));
    // The build to time: the tests' own (a debug build), or the one KESTREL_TIMED_BINARY names (ci/build-release's).
    let kestrel =
        std::env::var_os("KESTREL_TIMED_BINARY").map_or_else(|| PathBuf::from(kestrel_binary()), PathBuf::from);
    let kestrel = std::fs::canonicalize(kestrel).unwrap();
    let qemu = Path::new("/usr/bin/qemu-system-x86_64");
    let emulators: Vec<&Path> = if qemu.exists() { vec![&kestrel, qemu] } else { vec![&kestrel] };
    for emulator in emulators {
        let domain = Domain::define(&libvirt, emulator, "spin");
        let (mut starts, mut destroys) = (Vec::new(), Vec::new());
        for round in 0..=ROUNDS {
            let start = domain.start(false);
            assert_eq!(domain.state(), "running (booted)", "{}", domain.log());
            let destroy = domain.destroy();
            assert_eq!(domain.state(), "shut off (destroyed)");
            if round > 0 {
                starts.push(start);
                destroys.push(destroy);
            }
        }
        let median = |times: &mut Vec<Duration>| {
            times.sort();
            times[times.len() / 2].as_millis()
        };
        eprintln!(
            "libvirt_domain: {}: virsh start {} ms, virsh destroy {} ms (median of {ROUNDS})",
            emulator.display(),
            median(&mut starts),
            median(&mut destroys)
        );
        domain.virsh("undefine");
    }
}

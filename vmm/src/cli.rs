//! Kestrel's command line: native options (`--kernel ...`) and the QEMU spellings management tools already use
//! (`-kernel`, `-qmp`, `-chardev` + `-mon`, `-S`, ...), both parsed into one `VmConfig`.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

use crate::config::{
    parse_memory_size, parse_uuid, BalloonConfig, CpuConfig, DiskConfig, Frontend, ImageFormat, Incoming, ListenSocket,
    MacAddress, MachineType, NetConfig, SerialConfig, SocketAddress, TapConfig, VirtioSerialConfig, VmConfig,
};

mod qemu_devices;
pub use qemu_devices::{DeviceKind, DeviceModel, DEVICE_MODELS, ISA_SERIAL, OBJECT_TYPES, VIRTCONSOLE, VIRTSERIALPORT};
use qemu_devices::{Opts, QemuDeviceOptions};

pub const USAGE: &str = "\
Usage: kestrel --kernel PATH [options]
       kestrel --bios PATH [options]

Boots a virtual machine on KVM.

Options (QEMU's spelling in brackets, where it has one):
  --kernel PATH         guest kernel: bzImage, ELF vmlinux, or ELF with a PVH entry; arm64 Image on aarch64
                        (required unless --bios is given) [-kernel]
  --bios PATH           boot PC firmware instead of a kernel (x86_64): a BIOS image such as SeaBIOS's
                        /usr/share/seabios/bios-256k.bin, mapped read-only below 4 GiB; a multiple of 64 KiB, at
                        most 16 MiB. Not together with --kernel yet [-bios]
  --machine TYPE        x86_64: pc (default; q35 is the same): virtio devices on PCI with MSI-X; microvm:
                        virtio-mmio. aarch64: virt (the only one): virtio-mmio, found through the device tree
                        (virtio-*-pci devices: on a PCI host bridge, MSI-X through the GICv3 ITS).
                        none: no guest (no kernel, RAM, vCPUs or devices), only the QMP monitors, as libvirt
                        starts a binary to probe it. QEMU's versioned names mean the same: pc-i440fx-7.2,
                        pc-q35-7.2, virt-7.2
                        [-M TYPE, -machine TYPE[,accel=kvm] or type=TYPE; accel= may list others, as kvm:tcg]
  --initrd PATH         initial ramdisk [-initrd]
  --cmdline STR         kernel command line (default: the serial console: \"console=ttyS0\" on x86_64,
                        \"console=ttyAMA0\" on aarch64)
                        [-append]
  --memory SIZE         guest RAM; a plain number is MiB, or use K/M/G/T (default: 512M) [-m]
  --cpus N              number of vCPUs (default: 1) [-smp N[,sockets=S,cores=C,threads=1]: S sockets of C
                        cores (x86_64; C a power of two when S > 1)]
  -cpu MODEL[,FEATURE=on|off,...]
                        the guests' CPU: host (default: the host's CPU) or a named model (x86_64: kvm64)
                        restricted to its features; features by QEMU's names (also +FEATURE, -FEATURE). A feature
                        the host lacks is refused
  --serial MODE         first serial port: stdio (default), pty, file:PATH, none, or a listening socket
                        unix:PATH,server=on[,wait=off] / tcp:HOST:PORT,server=on[,wait=off] [-serial]
  --qmp unix:PATH,server=on,wait=off   (or tcp:HOST:PORT,server=on,wait=off)
                        QMP control socket (repeatable) [-qmp, or -chardev socket,id=ID,path=PATH,server=on,wait=off
                        with -mon chardev=ID,mode=control]
  --disk path=FILE[,format=raw|qcow2][,readonly=on][,serial=S][,direct=on]
                        virtio-blk disk on a raw or qcow2 image (repeatable; qcow2 with its backing chain)
  --net tap=NAME[,mac=52:54:00:12:34:56]
                        virtio-net device on host tap interface NAME, created if missing (needs CAP_NET_ADMIN or
                        a tap made for this user); default MACs 52:54:00:12:34:56, :57, ... (repeatable)
  --rng                 virtio-rng device fed from the host's getrandom
  --balloon             virtio-balloon device: QMP `balloon` sets the guest's target, the pages its driver gives
                        up go back to the host [-device virtio-balloon-pci|virtio-balloon-device]
  --console MODE        virtio-console (the guest's hvc0), with --serial's modes (only one of --serial and
                        --console can be stdio)
  --paused              start with the vCPUs stopped until QMP `cont` [-S]
  --no-reboot           exit when the guest reboots instead of resetting it [-no-reboot]
  --no-shutdown         stay alive, stopped, when the guest powers off [-no-shutdown]
  --name NAME           VM name shown over QMP [-name NAME or -name guest=NAME]
  --uuid UUID           VM UUID shown over QMP [-uuid]
  --restore PATH        build the machine from the command line, then load it from a snapshot written by QMP
                        `migrate` with {\"uri\": \"file:PATH\"} instead of booting the kernel (same memory, CPUs,
                        machine and devices as when it was saved); runs at once, or stays paused with --paused
                        [-incoming file:PATH; -incoming fd:N reads the snapshot streamed on inherited descriptor N
                        (a pipe); -incoming defer waits for QMP migrate-incoming with file:PATH or fd:N]
  --daemonize           run in the background: return once the QMP sockets listen and the pid file is written;
                        the daemon's stdin, stdout and stderr are /dev/null, so no console may be stdio (the
                        serial port defaults to none) [-daemonize]
  --pidfile PATH        write the process id to PATH, locked while Kestrel runs, removed when it exits [-pidfile]
  --sandbox on|off      confine each thread to the system calls it needs (seccomp; default: on). off is for
                        debugging: a call outside the filter ends Kestrel with a line naming it
                        [-sandbox on|off[,obsolete=..,elevateprivileges=..,spawn=..,resourcecontrol=..]: accepted;
                        Kestrel's filters deny all of those calls]
  -h, --help            print this help
  -V, --version         print the version

QEMU's device options (key=value or libvirt's JSON form):
  -drive file=F,if=virtio,format=raw|qcow2[,readonly=on][,cache=none|writeback][,serial=S]
  -drive file=F,if=none,id=D,...  or  -blockdev driver=file,node-name=N,filename=F
                                        [-blockdev driver=raw|qcow2,node-name=M,file=N]
  -device virtio-blk-pci|virtio-blk-device,drive=D[,serial=S][,id=ID][,bootindex=N]
          (bootindex on PCI devices: firmware's boot order, lowest first; -boot strict=on: none other)
  -netdev tap,id=N,ifname=TAP|fd=FD,script=no,downscript=no -device virtio-net-pci|virtio-net-device,netdev=N[,mac=M]
  -object rng-random,id=R,filename=/dev/urandom -device virtio-rng-pci|virtio-rng-device[,rng=R]
  -device virtio-balloon-pci|virtio-balloon-device[,id=ID][,deflate-on-oom=on|off]
          [,guest-stats-polling-interval=SECONDS]
  -chardev stdio|pty|null|file,path=P|socket,...,id=C -device virtio-serial-pci[,max_ports=N]
  -device virtconsole,chardev=C[,nr=N]   -device virtserialport,chardev=C,name=NAME[,nr=N]
  -serial chardev:C
  (-pci devices sit on the PCI bus, -device ones on virtio-mmio; plain virtio-blk etc. take the machine's default)

  -chardev socket,id=C,fd=N,server=on[,wait=off]: a socket that already listens, passed in as descriptor N
  -chardev pty,id=C -device isa-serial,chardev=C[,index=0]: the serial port (COM1, x86_64), as libvirt gives it

Accepted for QEMU compatibility, with no effect: -nographic, -nodefaults, -no-user-config, -enable-kvm,
-accel kvm, -display none, -no-hpet, -cpu host,migratable=on|off (a host CPU is never migratable elsewhere),
-name ...,debug-threads=on|off, -machine ...,usb=off, -object secret,... (no Kestrel option takes a secret),
-rtc base=utc,
-overcommit mem-lock=off,cpu-pm=off, -msg timestamp=on|off, -audiodev driver=none,id=ID,
-rtc driftfix=slew (the RTC raises no interrupts to lose), -global kvm-pit.lost_tick_policy=delay (KVM's PIT
re-injects lost ticks), -global PIIX4_PM.disable_s3=1|ICH9-LPC.disable_s3=1 (and _s4: the DSDT offers S5 only).
-machine ...,dump-guest-core=off leaves guest memory out of Kestrel's core dumps.
";

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Run(Box<VmConfig>),
    Help,
    Version,
}

/// Every message is one line: the user's text in it is shown with control characters escaped (`shown`), and bytes
/// that are not UTF-8 as U+FFFD.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CliError {
    #[error("unknown option '{}' (see --help)", shown(.0))]
    UnknownOption(String),
    #[error("option '{}' is not valid UTF-8 (see --help)", shown(.0))]
    OptionNotUtf8(String),
    #[error("option '{0}' needs a value")]
    MissingValue(String),
    #[error("option '{0}' takes no value")]
    UnexpectedValue(String),
    #[error("option '{0}' given twice")]
    Repeated(String),
    #[error("invalid memory size '{}': use a number of MiB or a size like 512M or 4G", shown(.0))]
    MemorySize(String),
    #[error("invalid number of CPUs '{}': use a whole number from 1 to 255", shown(.0))]
    Cpus(String),
    #[error(
        "invalid serial mode '{}': use stdio, pty, file:PATH, unix:PATH,server=on, tcp:HOST:PORT,server=on or none",
        shown(.0)
    )]
    Serial(String),
    #[error("only one of --serial, --console and the virtio-serial ports can use stdio: give the others pty, file:PATH or none")]
    StdioTwice,
    #[error("invalid UUID '{}': use the form 01234567-89ab-cdef-0123-456789abcdef", shown(.0))]
    Uuid(String),
    #[error("invalid {option} '{}': {}", shown(value), shown(reason))]
    Invalid { option: String, value: String, reason: String },
    #[error("unknown machine type '{}': use pc, q35 or microvm (x86_64 hosts) or virt (aarch64 hosts)", shown(.0))]
    Machine(String),
    #[error("no kernel given: use --kernel PATH or --bios PATH (see --help)")]
    NoKernel,
    /// An option firmware boot does not take (yet).
    #[error("{0} cannot be combined with --bios (-bios) yet: the firmware boots without it")]
    FirmwareWith(String),
    /// A guest's option on the guest-less `none` machine.
    #[error("{0} describes a guest, and -machine none runs none: leave it out or name a machine type")]
    Guestless(String),
    #[error(
        "{0} cannot be stdio with --daemonize (the daemon's stdio is /dev/null): use pty, file:PATH, a socket or none"
    )]
    DaemonStdio(&'static str),
    /// An id given twice in one of QEMU's namespaces, in QEMU's words (`-device ARGS: Duplicate ID 'x' for device`),
    /// which management tools may match.
    #[error("{option} {}: {}", shown(value), shown(message))]
    DuplicateId { option: String, value: String, message: String },
}

/// User text as an error message shows it: control characters (a newline, a terminal escape) escaped, so the
/// message stays one line and cannot drive the terminal.
fn shown(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// `value` is shown lossily: an argument need not be UTF-8.
fn invalid(option: &str, value: impl AsRef<OsStr>, reason: impl Into<String>) -> CliError {
    let value = value.as_ref().to_string_lossy().into_owned();
    CliError::Invalid { option: option.to_string(), value, reason: reason.into() }
}

fn duplicate_id(option: &str, value: impl AsRef<OsStr>, message: String) -> CliError {
    let value = value.as_ref().to_string_lossy().into_owned();
    CliError::DuplicateId { option: option.to_string(), value, message }
}

/// The text of an argument that must be text (a name, a size, a setting), or an error naming it.
fn utf8<'a>(option: &str, value: &'a OsStr) -> Result<&'a str, CliError> {
    value.to_str().ok_or_else(|| invalid(option, value, "not valid UTF-8"))
}

/// What an option means, whatever its spelling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Opt {
    Help,
    Version,
    Kernel,
    Bios,
    Machine,
    Initrd,
    Cmdline,
    Memory,
    Cpus,
    Serial,
    Qmp,
    Disk,
    Net,
    Rng,
    Balloon,
    Console,
    Chardev,
    Mon,
    Drive,
    Blockdev,
    Netdev,
    Device,
    Object,
    Paused,
    NoReboot,
    NoShutdown,
    Name,
    Uuid,
    Sandbox,
    Incoming,
    Restore,
    Daemonize,
    Pidfile,
    Cpu,
    /// A QEMU option that changes nothing here; the value, if any, must be one that means what Kestrel does.
    Ignored,
    /// A QEMU option whose settings must each be one that changes nothing here (`NO_EFFECT_SETTINGS`).
    NoEffect,
}

/// (spellings, meaning, takes a value)
const OPTIONS: &[(&[&str], Opt, bool)] = &[
    (&["-h", "--help", "-help"], Opt::Help, false),
    (&["-V", "--version", "-version"], Opt::Version, false),
    (&["--kernel", "-kernel"], Opt::Kernel, true),
    (&["--bios", "-bios"], Opt::Bios, true),
    (&["--machine", "-M", "-machine"], Opt::Machine, true),
    (&["--initrd", "-initrd"], Opt::Initrd, true),
    (&["--cmdline", "-append"], Opt::Cmdline, true),
    (&["--memory", "-m"], Opt::Memory, true),
    (&["--cpus", "-smp"], Opt::Cpus, true),
    (&["--serial", "-serial"], Opt::Serial, true),
    (&["--qmp", "-qmp"], Opt::Qmp, true),
    (&["--disk"], Opt::Disk, true),
    (&["--net"], Opt::Net, true),
    (&["--rng"], Opt::Rng, false),
    (&["--balloon"], Opt::Balloon, false),
    (&["--console"], Opt::Console, true),
    (&["-chardev"], Opt::Chardev, true),
    (&["-mon"], Opt::Mon, true),
    (&["-drive"], Opt::Drive, true),
    (&["-blockdev"], Opt::Blockdev, true),
    (&["-netdev"], Opt::Netdev, true),
    (&["-device"], Opt::Device, true),
    (&["-object"], Opt::Object, true),
    (&["--paused", "-S"], Opt::Paused, false),
    (&["--no-reboot", "-no-reboot"], Opt::NoReboot, false),
    (&["--no-shutdown", "-no-shutdown"], Opt::NoShutdown, false),
    (&["--name", "-name"], Opt::Name, true),
    (&["--uuid", "-uuid"], Opt::Uuid, true),
    (&["--sandbox", "-sandbox"], Opt::Sandbox, true),
    (&["-incoming"], Opt::Incoming, true),
    (&["--restore"], Opt::Restore, true),
    (&["--daemonize", "-daemonize"], Opt::Daemonize, false),
    (&["--pidfile", "-pidfile"], Opt::Pidfile, true),
    (&["-cpu"], Opt::Cpu, true),
    // (-no-hpet: Kestrel's machines have no HPET.)
    (&["-nographic", "-nodefaults", "-no-user-config", "-enable-kvm", "-no-hpet"], Opt::Ignored, false),
    (&["-accel", "-display"], Opt::Ignored, true),
    (&["-rtc", "-boot", "-overcommit", "-msg", "-audiodev", "-global"], Opt::NoEffect, true),
];

/// A QEMU option value: `first,key=value,key=value` where `,,` is a literal comma. Returns the leading item
/// without `=` (if any) and the key/value pairs; a bare `key` is `key=on`. Works on bytes, as a path inside a value
/// (`-drive file=PATH,...`) need not be UTF-8.
fn split_qemu_opts_os(value: &OsStr) -> (Option<OsString>, Vec<(OsString, OsString)>) {
    let mut items = Vec::new();
    let mut current = Vec::new();
    let mut bytes = value.as_bytes().iter().copied().peekable();
    while let Some(byte) = bytes.next() {
        if byte == b',' {
            if bytes.peek() == Some(&b',') {
                bytes.next();
                current.push(b',');
            } else {
                items.push(std::mem::take(&mut current));
            }
        } else {
            current.push(byte);
        }
    }
    items.push(current);
    let mut first = None;
    let mut pairs = Vec::new();
    for (i, mut item) in items.into_iter().enumerate() {
        match item.iter().position(|&b| b == b'=') {
            Some(at) => {
                let setting = item.split_off(at + 1);
                item.truncate(at);
                pairs.push((OsString::from_vec(item), OsString::from_vec(setting)));
            }
            None if i == 0 => first = Some(OsString::from_vec(item)),
            None => pairs.push((OsString::from_vec(item), OsString::from("on"))),
        }
    }
    (first, pairs)
}

/// `split_qemu_opts_os` for a value that is all text. Splitting UTF-8 at ASCII bytes leaves UTF-8, so the lossy
/// conversions never lose anything.
fn split_qemu_opts(text: &str) -> (Option<String>, Vec<(String, String)>) {
    let text_of = |s: OsString| s.into_string().unwrap_or_else(|s| s.to_string_lossy().into_owned());
    let (first, pairs) = split_qemu_opts_os(OsStr::new(text));
    (first.map(text_of), pairs.into_iter().map(|(k, v)| (text_of(k), text_of(v))).collect())
}

fn on_off(option: &str, value: impl AsRef<OsStr>, key: &str, setting: &str) -> Result<bool, CliError> {
    match setting {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(invalid(option, value, format!("{key} must be on or off"))),
    }
}

/// An image format's name (`format=`): raw or qcow2.
fn image_format(option: &str, value: impl AsRef<OsStr>, name: &str) -> Result<ImageFormat, CliError> {
    ImageFormat::from_name(name)
        .ok_or_else(|| invalid(option, value, format!("format '{name}' is not supported (raw, qcow2)")))
}

fn parse_port(option: &str, value: &OsStr, port: &str) -> Result<u16, CliError> {
    port.parse().ok().filter(|&p| p > 0).ok_or_else(|| invalid(option, value, format!("invalid port '{port}'")))
}

/// `unix:PATH,server=on,wait=off` or `tcp:HOST:PORT,server=on,wait=off` (also QEMU's older `server,nowait`).
fn parse_listen_socket(option: &str, value: &OsStr) -> Result<ListenSocket, CliError> {
    let opts = Opts::split(option, value, "address", &["address"])?;
    let address = opts.path("address").unwrap_or_default().as_bytes();
    let address = if let Some(path) = address.strip_prefix(b"unix:").filter(|p| !p.is_empty()) {
        SocketAddress::Unix(PathBuf::from(OsStr::from_bytes(path)))
    } else if let Some(host_port) = address.strip_prefix(b"tcp:") {
        let host_port = utf8(option, OsStr::from_bytes(host_port))?;
        let (host, port) = host_port.rsplit_once(':').ok_or_else(|| invalid(option, value, "use tcp:HOST:PORT"))?;
        let host = if host.is_empty() { "0.0.0.0" } else { host.trim_start_matches('[').trim_end_matches(']') };
        SocketAddress::Tcp(host.to_string(), parse_port(option, value, port)?)
    } else {
        return Err(invalid(option, value, "use unix:PATH or tcp:HOST:PORT"));
    };
    socket_settings(option, value, address, &opts.pairs)
}

fn socket_settings(
    option: &str,
    value: &OsStr,
    address: SocketAddress,
    pairs: &[(String, String)],
) -> Result<ListenSocket, CliError> {
    let mut server = false;
    // QEMU waits for the first client unless told not to.
    let mut wait = true;
    for (key, setting) in pairs {
        match key.as_str() {
            "server" => server = on_off(option, value, key, setting)?,
            "wait" => wait = on_off(option, value, key, setting)?,
            "nowait" => wait = !on_off(option, value, key, setting)?,
            "id" | "path" | "host" | "port" => {}
            // Only where it named the address: -chardev socket,fd=N (elsewhere it would be ignored).
            "fd" if matches!(address, SocketAddress::Inherited(_)) => {}
            _ => return Err(invalid(option, value, format!("unsupported setting '{key}'"))),
        }
    }
    if !server {
        return Err(invalid(option, value, "Kestrel only listens: add server=on"));
    }
    Ok(ListenSocket { address, wait })
}

/// `-chardev BACKEND,id=ID,...`: `socket` (`path=PATH` or `host=HOST,port=PORT`, with `server=on`), `stdio`,
/// `pty`, `file,path=PATH` or `null`; `-mon`, `-serial chardev:ID` and `virtconsole,chardev=ID` use them.
fn parse_chardev(value: &OsStr) -> Result<(String, SerialConfig), CliError> {
    let opts = Opts::split("-chardev", value, "backend", &["path"])?;
    let get = |key: &str| opts.get(key).map(str::to_string);
    let id = get("id").filter(|id| !id.is_empty()).ok_or_else(|| invalid("-chardev", value, "id= is required"))?;
    let path = opts.path("path").filter(|p| !p.is_empty()).map(PathBuf::from);
    let only = |allowed: &[&str]| {
        let keys = opts.pairs.iter().map(|(k, _)| k.as_str()).chain(opts.path("path").map(|_| "path"));
        match keys.into_iter().find(|k| !allowed.contains(k)) {
            Some(key) => Err(invalid("-chardev", value, format!("unsupported setting '{key}'"))),
            None => Ok(()),
        }
    };
    let config = match opts.first.as_deref() {
        Some("socket") => {
            let address =
                match (path.clone(), get("port"), get("fd")) {
                    (Some(path), None, None) => SocketAddress::Unix(path),
                    (None, Some(port), None) => {
                        let host = get("host").filter(|h| !h.is_empty()).unwrap_or_else(|| "0.0.0.0".to_string());
                        SocketAddress::Tcp(host, parse_port("-chardev", value, &port)?)
                    }
                    (None, None, Some(fd)) if get("host").is_none() => {
                        let fd = fd.parse::<i32>().ok().filter(|&fd| fd > 2);
                        SocketAddress::Inherited(
                            fd.ok_or_else(|| invalid("-chardev", value, "fd= needs a descriptor number above 2"))?,
                        )
                    }
                    _ => return Err(invalid(
                        "-chardev",
                        value,
                        "give one of path= (unix), host= and port= (tcp) or fd= (a listening socket passed to Kestrel)",
                    )),
                };
            SerialConfig::Socket(socket_settings("-chardev", value, address, &opts.pairs)?)
        }
        Some("stdio") => only(&["id", "signal", "mux"]).map(|()| SerialConfig::Stdio)?,
        Some("pty") => only(&["id"]).map(|()| SerialConfig::Pty)?,
        Some("null") => only(&["id"]).map(|()| SerialConfig::None)?,
        Some("file") => {
            only(&["id", "path", "append"])?;
            SerialConfig::File(path.clone().ok_or_else(|| invalid("-chardev", value, "path= is required"))?)
        }
        _ => return Err(invalid("-chardev", value, "supported backends: socket, stdio, pty, file, null")),
    };
    Ok((id, config))
}

/// `-mon chardev=ID,mode=control`: returns the chardev id.
fn parse_mon(value: &str) -> Result<String, CliError> {
    let (first, pairs) = split_qemu_opts(value);
    if first.is_some() {
        return Err(invalid("-mon", value, "use chardev=ID,mode=control"));
    }
    let mut chardev = None;
    let mut mode = None;
    for (key, setting) in pairs {
        match key.as_str() {
            "chardev" => chardev = Some(setting),
            "mode" => mode = Some(setting),
            "id" | "pretty" => {}
            _ => return Err(invalid("-mon", value, format!("unsupported setting '{key}'"))),
        }
    }
    if mode.as_deref() != Some("control") {
        return Err(invalid("-mon", value, "only mode=control (QMP) monitors are supported"));
    }
    chardev.ok_or_else(|| invalid("-mon", value, "chardev= is required"))
}

/// `path=FILE[,format=raw|qcow2][,readonly=on][,serial=S][,direct=on]`, or just the path.
fn parse_disk(value: &OsStr) -> Result<DiskConfig, CliError> {
    let opts = Opts::split("--disk", value, "path", &["path", "file"])?;
    let path = opts.last_path(&["path", "file"]).map(PathBuf::from).unwrap_or_default();
    let mut disk = DiskConfig {
        path,
        format: ImageFormat::Raw,
        backing: Default::default(),
        read_only: false,
        serial: None,
        direct: false,
        frontend: Frontend::default(),
    };
    for (key, setting) in opts.pairs {
        match key.as_str() {
            "readonly" => disk.read_only = on_off("--disk", value, &key, &setting)?,
            "direct" => disk.direct = on_off("--disk", value, &key, &setting)?,
            "format" => disk.format = image_format("--disk", value, &setting)?,
            "serial" if setting.len() <= 20 => disk.serial = Some(setting),
            "serial" => return Err(invalid("--disk", value, "serial= takes at most 20 bytes")),
            _ => return Err(invalid("--disk", value, format!("unsupported setting '{key}'"))),
        }
    }
    if disk.path.as_os_str().is_empty() {
        return Err(invalid("--disk", value, "path= is required"));
    }
    Ok(disk)
}

/// `tap=NAME[,mac=MAC]`
fn parse_net(value: &str) -> Result<NetConfig, CliError> {
    let (first, pairs) = split_qemu_opts(value);
    if let Some(first) = first.filter(|f| !f.is_empty()) {
        return Err(invalid("--net", value, format!("'{first}' is not a setting: use tap=NAME[,mac=MAC]")));
    }
    let mut tap = None;
    let mut mac = None;
    for (key, setting) in pairs {
        match key.as_str() {
            "tap" => {
                devices::virtio::net::tap::check_name(&setting).map_err(|e| invalid("--net", value, e.to_string()))?;
                tap = Some(setting);
            }
            "mac" => {
                let parsed: MacAddress =
                    setting.parse().map_err(|e| invalid("--net", value, format!("mac={setting}: {e}")))?;
                mac = Some(parsed);
            }
            _ => return Err(invalid("--net", value, format!("unsupported setting '{key}'"))),
        }
    }
    let tap = tap.ok_or_else(|| invalid("--net", value, "tap=NAME is required"))?;
    Ok(NetConfig { tap: TapConfig::Named(tap), mac, frontend: Frontend::default() })
}

/// `pc`, `q35`, `microvm`, `virt`, `none` or their versioned names, with QEMU's `type=` spelling and `accel=`;
/// the platform decides which it runs. `accel=` lists accelerators to try in order (`kvm:tcg`, as libvirt's probe
/// asks): Kestrel has only KVM, so the list must name it.
///
/// `usb=off` (Kestrel has no USB) and `dump-guest-core=` (whether guest memory is in Kestrel's core dumps; libvirt
/// passes `off`) as libvirt gives them. Returns the machine type and `dump-guest-core`.
fn parse_machine(option: &str, value: &str) -> Result<(MachineType, Option<bool>), CliError> {
    let (first, pairs) = split_qemu_opts(value);
    let mut machine = first;
    let mut dump_guest_core = None;
    for (key, setting) in pairs {
        match key.as_str() {
            "type" if machine.is_none() => machine = Some(setting),
            "accel" if setting.split(':').any(|accel| accel == "kvm") => {}
            "accel" => return Err(invalid(option, value, "Kestrel only has KVM: accel= must list kvm")),
            "usb" if !on_off(option, value, &key, &setting)? => {}
            "usb" => return Err(invalid(option, value, "Kestrel has no USB: usb= must be off")),
            "dump-guest-core" => dump_guest_core = Some(on_off(option, value, &key, &setting)?),
            _ => return Err(invalid(option, value, format!("unsupported setting '{key}'"))),
        }
    }
    match machine.as_deref() {
        Some(name) => MachineType::from_qemu_name(name)
            .map(|machine| (machine, dump_guest_core))
            .ok_or_else(|| CliError::Machine(name.to_string())),
        None => Err(invalid(option, value, "no machine type given")),
    }
}

/// `-cpu MODEL[,FEATURE=on|off|+FEATURE|-FEATURE...][,migratable=on|off]`: the model (`host`, the host's CPU, or
/// a named one the platform offers) and features by QEMU's names; which exist, and what the host can give, is
/// checked when the machine is built. A migratable host CPU in QEMU leaves out features that cannot be migrated;
/// Kestrel's never has them (a snapshot restores on a host with the same CPU features), so both settings give the
/// same CPU.
fn parse_cpu_model(option: &str, value: &str) -> Result<CpuConfig, CliError> {
    let (first, pairs) = split_qemu_opts(value);
    let model = first.filter(|m| !m.is_empty()).ok_or_else(|| invalid(option, value, "no CPU model given"))?;
    let mut features = Vec::new();
    for (key, setting) in pairs {
        match key.as_str() {
            "migratable" => {
                on_off(option, value, &key, &setting)?;
            }
            // QEMU's legacy spelling, `+sse4.2` and `-vmx`: a key without a value (which reads as "on").
            _ if key.starts_with(['+', '-']) && is_feature_name(&key[1..]) && !value.contains(&format!("{key}=")) => {
                features.push((key[1..].to_string(), key.starts_with('+')));
            }
            _ if is_feature_name(&key) => features.push((key.clone(), on_off(option, value, &key, &setting)?)),
            _ => return Err(invalid(option, value, format!("unsupported setting '{key}'"))),
        }
    }
    Ok(CpuConfig { model: (model != "host").then_some(model), features, ..CpuConfig::default() })
}

/// A CPU feature's name as QEMU spells them: `sse4.2`, `tsc-deadline`, `lahf_lm`.
fn is_feature_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// `-m 512`, `-m 2G`, `-m size=2G,...`
fn parse_memory(value: &str) -> Result<u64, CliError> {
    let (first, pairs) = split_qemu_opts(value);
    let size = first.or_else(|| pairs.iter().find(|(k, _)| k == "size").map(|(_, v)| v.clone()));
    size.as_deref().and_then(parse_memory_size).ok_or_else(|| CliError::MemorySize(value.to_string()))
}

/// `-smp 4`, `-smp cpus=4,...`, with a topology (`sockets=2,cores=2,threads=1`, as libvirt passes one): sockets
/// of cores with one thread each, as many cores in every socket, and more than one socket only of a power-of-two
/// number of cores (so that APIC IDs number socket and core without gaps). No hot-plug: `maxcpus`, if given, is
/// the count. Returns the count and the sockets.
fn parse_cpus(value: &str) -> Result<(u8, u8), CliError> {
    let (first, pairs) = split_qemu_opts(value);
    let mut count = first;
    let mut topology = Vec::new();
    for (key, setting) in pairs {
        match key.as_str() {
            "cpus" if count.is_none() => count = Some(setting),
            "sockets" | "dies" | "clusters" | "cores" | "threads" | "maxcpus" => {
                let number = setting.parse::<u32>().ok().filter(|&n| n > 0);
                let number = number.ok_or_else(|| invalid("-smp", value, format!("{key}={setting} is not a count")))?;
                topology.push((key, number));
            }
            _ => return Err(invalid("-smp", value, format!("unsupported setting '{key}'"))),
        }
    }
    let count = count.and_then(|c| c.parse::<u8>().ok()).filter(|&n| n > 0);
    let count = count.ok_or_else(|| CliError::Cpus(value.to_string()))?;
    let given = |name: &str| topology.iter().find(|(key, _)| key == name).map(|&(_, n)| n);
    let refuse = |why: String| Err(invalid("-smp", value, why));
    for key in ["dies", "clusters", "threads"] {
        if given(key).is_some_and(|n| n != 1) {
            return refuse(format!(
                "Kestrel gives guests cores of one thread, one die and cluster each: {key} must be 1"
            ));
        }
    }
    if given("maxcpus").is_some_and(|n| n != u32::from(count)) {
        return refuse(format!("no CPU hot-plug: maxcpus must be {count}"));
    }
    let total = u32::from(count);
    let (sockets, cores) = match (given("sockets"), given("cores")) {
        (None, None) => (1, total),
        (Some(sockets), None) => (sockets, total / sockets),
        (None, Some(cores)) => (total / cores, cores),
        (Some(sockets), Some(cores)) => (sockets, cores),
    };
    if sockets * cores != total {
        return refuse(format!("{sockets} sockets of {cores} cores are not {count} vCPUs"));
    }
    if sockets > 1 && !cores.is_power_of_two() {
        return refuse(format!(
            "with more than one socket, the cores in each must be a power of two (APIC IDs number socket and core): \
             {cores} are not"
        ));
    }
    Ok((count, sockets as u8))
}

/// Each setting's name and the values it may have (none listed: any).
type NoEffectSettings = &'static [(&'static str, &'static [&'static str])];

/// The settings of QEMU options that change nothing for Kestrel, and the values each may have: the ones that
/// describe what Kestrel does anyway. Anything else is refused, as Kestrel would not honour it.
const NO_EFFECT_SETTINGS: &[(&str, Option<&str>, NoEffectSettings)] = &[
    // The CMOS clock starts at the host's UTC time. Its interrupts are what a drift fix would catch up on lost
    // ticks of, and Kestrel's RTC raises none (no periodic, alarm or update interrupt): none is lost.
    ("-rtc", None, &[("base", &["utc"]), ("driftfix", &["slew", "none"])]),
    // Device defaults libvirt sets: KVM's in-kernel PIT re-injects ticks it could not deliver (QEMU's `delay`,
    // KVM's default); the DSDT offers S5 only, so S3 and S4 are disabled already.
    (
        "-global",
        None,
        &[
            ("kvm-pit.lost_tick_policy", &["delay"]),
            ("PIIX4_PM.disable_s3", &["1"]),
            ("PIIX4_PM.disable_s4", &["1"]),
            ("ICH9-LPC.disable_s3", &["1"]),
            ("ICH9-LPC.disable_s4", &["1"]),
        ],
    ),
    // `-boot order=` is not honoured (refused): the boot order firmware gets is the devices' `bootindex=`.
    // `strict=on` (no device but those) goes to the firmware with it (see `VmConfig::strict_boot`).
    ("-boot", Some("order"), &[("strict", &["on", "off"])]),
    // Guest memory is never locked; the vCPUs halt in the host.
    ("-overcommit", None, &[("mem-lock", &["off"]), ("cpu-pm", &["off"])]),
    // Kestrel's messages carry no timestamps either way: they are one line each, and libvirt's log stamps them.
    ("-msg", None, &[("timestamp", &["on", "off"]), ("guest-name", &["off"])]),
    // No sound device to play through.
    ("-audiodev", Some("driver"), &[("driver", &["none"]), ("id", &[])]),
];

/// Checks a value of an option in `NO_EFFECT_SETTINGS` (key=value, or JSON as libvirt gives `-audiodev`); an
/// empty list of values takes any. A bare first word is the option's implied key's value, as QEMU reads it
/// (`-boot c` is `order=c`); an option without one refuses it by its text.
fn check_no_effect(option: &str, value: &str) -> Result<(), CliError> {
    let Some((_, implied, allowed)) = NO_EFFECT_SETTINGS.iter().find(|(name, _, _)| *name == option) else {
        return Err(CliError::UnknownOption(option.to_string()));
    };
    let opts = Opts::parse(option, OsStr::new(value), implied.unwrap_or(""), &[])?;
    let first = match (&opts.first, implied) {
        (Some(word), Some(key)) => Some((*key, word.as_str())),
        (Some(word), None) => return Err(invalid(option, value, format!("unsupported setting '{word}'"))),
        (None, _) => None,
    };
    for (key, setting) in first.into_iter().chain(opts.pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))) {
        let Some((_, values)) = allowed.iter().find(|(name, _)| *name == key) else {
            return Err(invalid(option, value, format!("unsupported setting '{key}'")));
        };
        if !values.is_empty() && !values.contains(&setting) {
            return Err(invalid(option, value, format!("Kestrel supports only {key}={}", values.join(" or "))));
        }
    }
    Ok(())
}

/// `-sandbox`'s suboptions besides `enable`, and the settings each takes (QEMU 7.2's).
const SANDBOX_SUBOPTIONS: &[(&str, &[&str])] = &[
    ("obsolete", &["allow", "deny"]),
    ("elevateprivileges", &["allow", "deny", "children"]),
    ("spawn", &["allow", "deny"]),
    ("resourcecontrol", &["allow", "deny"]),
];

/// The QEMU options whose values take `key=value` parameters, and the parameters Kestrel accepts, each with QEMU's
/// parameter type, for QMP's `query-command-line-options` (libvirt decides from it whether to pass `-sandbox`).
pub fn qemu_option_parameters() -> Vec<(&'static str, Vec<(&'static str, &'static str)>)> {
    let sandbox =
        std::iter::once(("enable", "boolean")).chain(SANDBOX_SUBOPTIONS.iter().map(|(name, _)| (*name, "string")));
    let machine = vec![("type", "string"), ("accel", "string"), ("usb", "boolean"), ("dump-guest-core", "boolean")];
    vec![("sandbox", sandbox.collect()), ("machine", machine)]
}

/// `on` or `off`, with QEMU's suboptions (7.2: `obsolete=allow|deny`, `elevateprivileges=allow|deny|children`,
/// `spawn=allow|deny`, `resourcecontrol=allow|deny`), which libvirt passes. Kestrel's filters deny all four kinds
/// of call whatever they say (it never needs them), so they are checked, not used.
fn parse_sandbox(option: &str, value: &str) -> Result<bool, CliError> {
    let (first, pairs) = split_qemu_opts(value);
    let mut enabled = match first.as_deref() {
        Some(setting) => Some(on_off(option, value, "the setting", setting)?),
        None => None,
    };
    for (key, setting) in &pairs {
        if key == "enable" {
            enabled = Some(on_off(option, value, key, setting)?);
            continue;
        }
        let Some((_, allowed)) = SANDBOX_SUBOPTIONS.iter().find(|(name, _)| name == key) else {
            return Err(invalid(option, value, format!("unknown suboption '{key}'")));
        };
        if !allowed.contains(&setting.as_str()) {
            return Err(invalid(option, value, format!("{key} must be {}", allowed.join(" or "))));
        }
    }
    enabled.ok_or_else(|| invalid(option, value, "use on or off"))
}

/// `-name NAME` or `-name guest=NAME,debug-threads=on`. Kestrel's threads are named by their work (`vcpu0`,
/// ...) whatever `debug-threads` says.
fn parse_name(value: &str) -> Result<String, CliError> {
    let (first, pairs) = split_qemu_opts(value);
    let mut name = first;
    for (key, setting) in pairs {
        match key.as_str() {
            "guest" if name.is_none() => name = Some(setting),
            "debug-threads" => {
                on_off("-name", value, &key, &setting)?;
            }
            _ => return Err(invalid("-name", value, format!("unsupported setting '{key}'"))),
        }
    }
    Ok(name.unwrap_or_default())
}

/// `stdio`, `pty`, `none`/`null`, `file:PATH`, or a listening socket as `--qmp` takes it
/// (`unix:PATH,server=on[,wait=off]`, `tcp:HOST:PORT,server=on[,wait=off]`).
fn parse_serial(option: &str, value: &OsStr) -> Result<SerialConfig, CliError> {
    let bytes = value.as_bytes();
    match bytes {
        b"stdio" => Ok(SerialConfig::Stdio),
        b"pty" => Ok(SerialConfig::Pty),
        b"none" | b"null" => Ok(SerialConfig::None),
        _ if bytes.starts_with(b"unix:") || bytes.starts_with(b"tcp:") => {
            parse_listen_socket(option, value).map(SerialConfig::Socket)
        }
        _ => match bytes.strip_prefix(b"file:") {
            Some(path) if !path.is_empty() => Ok(SerialConfig::File(PathBuf::from(OsStr::from_bytes(path)))),
            _ => Err(CliError::Serial(value.to_string_lossy().into_owned())),
        },
    }
}

fn set_once<T>(slot: &mut Option<T>, name: &str, value: T) -> Result<(), CliError> {
    if slot.is_some() {
        return Err(CliError::Repeated(name.to_string()));
    }
    *slot = Some(value);
    Ok(())
}

/// Splits `--name=value` (the native spelling's inline value) on bytes: the value may be a path that is not UTF-8.
fn split_inline_value(arg: OsString) -> (OsString, Option<OsString>) {
    let bytes = arg.as_bytes();
    match bytes.iter().position(|&b| b == b'=') {
        Some(at) if bytes.starts_with(b"--") => {
            let value = OsString::from_vec(bytes[at + 1..].to_vec());
            (OsString::from_vec(bytes[..at].to_vec()), Some(value))
        }
        _ => (arg, None),
    }
}

/// Parses the arguments after the program name. They are taken as the OS gives them: paths keep their exact bytes,
/// and an argument that must be text but is not UTF-8 is an error naming it.
pub fn parse<I>(args: I) -> Result<Command, CliError>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    let mut kernel = None;
    let mut bios = None;
    let mut initrd = None;
    let mut cmdline = None;
    let mut memory = None;
    let mut cpus = None;
    let mut cpu = None;
    let mut serial = None;
    let mut name = None;
    let mut uuid = None;
    let mut sandbox = None;
    let mut incoming = None;
    let mut pidfile = None;
    let mut daemonize = false;
    let mut dump_guest_core = None;
    let mut strict_boot = false;
    let mut flags = (false, false, false); // no-reboot, no-shutdown, paused
    let mut qmp = Vec::new();
    let mut disks = Vec::new();
    let mut nets = Vec::new();
    let mut rng = false;
    let mut balloon = false;
    let mut console = None;
    let mut machine = None;
    let mut chardevs: HashMap<String, SerialConfig> = HashMap::new();
    let mut monitors = Vec::new();
    let mut serial_chardev = None;
    let mut qemu_devices = QemuDeviceOptions::default();

    let mut args = args.into_iter().map(Into::into);
    while let Some(arg) = args.next() {
        let (spelling, inline_value) = split_inline_value(arg);
        let spelling = spelling.into_string().map_err(|s| CliError::OptionNotUtf8(s.to_string_lossy().into_owned()))?;
        let &(_, opt, takes_value) = OPTIONS
            .iter()
            .find(|(names, _, _)| names.contains(&spelling.as_str()))
            .ok_or_else(|| CliError::UnknownOption(spelling.clone()))?;
        let value = match (takes_value, inline_value) {
            (true, Some(v)) => v,
            (true, None) => args.next().ok_or_else(|| CliError::MissingValue(spelling.clone()))?,
            (false, Some(_)) => return Err(CliError::UnexpectedValue(spelling)),
            (false, None) => OsString::new(),
        };
        // Options whose values name host files take the bytes as given; the rest must be text.
        let text = || utf8(&spelling, &value);
        match opt {
            Opt::Help => return Ok(Command::Help),
            Opt::Version => return Ok(Command::Version),
            Opt::Kernel => set_once(&mut kernel, &spelling, PathBuf::from(&value))?,
            Opt::Bios => set_once(&mut bios, &spelling, PathBuf::from(&value))?,
            Opt::Machine => {
                let (machine_type, dump_core) = parse_machine(&spelling, text()?)?;
                set_once(&mut machine, &spelling, machine_type)?;
                dump_guest_core = dump_core;
            }
            Opt::Initrd => set_once(&mut initrd, &spelling, PathBuf::from(&value))?,
            Opt::Cmdline => set_once(&mut cmdline, &spelling, text()?.to_string())?,
            Opt::Memory => set_once(&mut memory, &spelling, parse_memory(text()?)?)?,
            Opt::Cpus => set_once(&mut cpus, &spelling, parse_cpus(text()?)?)?,
            Opt::Serial if value.as_bytes().starts_with(b"chardev:") => {
                let chardev = text()?;
                let id = chardev.strip_prefix("chardev:").unwrap_or_default();
                set_once(&mut serial_chardev, &spelling, (id.to_string(), chardev.to_string()))?
            }
            Opt::Serial => set_once(&mut serial, &spelling, parse_serial(&spelling, &value)?)?,
            Opt::Qmp => qmp.push(parse_listen_socket(&spelling, &value)?),
            Opt::Disk => disks.push(parse_disk(&value)?),
            Opt::Net => nets.push(parse_net(text()?)?),
            Opt::Rng => rng = true,
            Opt::Balloon => balloon = true,
            Opt::Drive => qemu_devices.drive(&value)?,
            Opt::Blockdev => qemu_devices.blockdev(&value)?,
            Opt::Netdev => qemu_devices.netdev(text()?)?,
            Opt::Device => qemu_devices.device(text()?)?,
            Opt::Object => qemu_devices.object(text()?)?,
            Opt::Console => set_once(&mut console, &spelling, parse_serial(&spelling, &value)?)?,
            Opt::Chardev => {
                let (id, chardev) = parse_chardev(&value)?;
                if chardevs.contains_key(&id) {
                    return Err(duplicate_id("-chardev", &value, format!("Duplicate ID '{id}' for chardev")));
                }
                chardevs.insert(id, chardev);
            }
            Opt::Mon => monitors.push((parse_mon(text()?)?, text()?.to_string())),
            Opt::Paused => flags.2 = true,
            Opt::NoReboot => flags.0 = true,
            Opt::NoShutdown => flags.1 = true,
            Opt::Name => set_once(&mut name, &spelling, parse_name(text()?)?)?,
            Opt::Sandbox => set_once(&mut sandbox, &spelling, parse_sandbox(&spelling, text()?)?)?,
            Opt::Incoming => set_once(&mut incoming, "-incoming / --restore", parse_incoming(&value)?)?,
            Opt::Restore => set_once(&mut incoming, "-incoming / --restore", Incoming::File(PathBuf::from(&value)))?,
            Opt::Daemonize => daemonize = true,
            Opt::Pidfile if value.is_empty() => return Err(invalid(&spelling, &value, "the path is empty")),
            Opt::Pidfile => set_once(&mut pidfile, &spelling, PathBuf::from(&value))?,
            Opt::Cpu => set_once(&mut cpu, &spelling, parse_cpu_model(&spelling, text()?)?)?,
            Opt::Uuid => {
                let uuid_text = text()?;
                let parsed = parse_uuid(uuid_text).ok_or_else(|| CliError::Uuid(uuid_text.to_string()))?;
                set_once(&mut uuid, &spelling, parsed)?
            }
            Opt::NoEffect => {
                let value = text()?;
                check_no_effect(&spelling, value)?;
                if spelling == "-boot" {
                    let opts = Opts::parse(&spelling, OsStr::new(value), "order", &[])?;
                    strict_boot = opts.get("strict").is_some_and(|strict| strict == "on");
                }
            }
            Opt::Ignored => match (spelling.as_str(), text()?) {
                ("-accel", v) if v == "kvm" || v.starts_with("kvm,") => {}
                ("-display", "none") => {}
                ("-accel" | "-display", v) => return Err(invalid(&spelling, v, "Kestrel only supports kvm / none")),
                _ => {}
            },
        }
    }
    let qemu = qemu_devices.resolve(&chardevs)?;
    // Each chardev has one user: a monitor, the serial port or the virtio console.
    let mut take_chardev = |option: &str, id: &str, value: &str| {
        chardevs.remove(id).ok_or_else(|| invalid(option, value, format!("no unused -chardev with id '{id}'")))
    };
    for (id, value) in monitors {
        match take_chardev("-mon", &id, &value)? {
            SerialConfig::Socket(socket) => qmp.push(socket),
            _ => return Err(invalid("-mon", &value, "a QMP monitor needs a socket chardev")),
        }
    }
    let mut serial_label = None;
    if let Some((id, value)) = serial_chardev {
        set_once(&mut serial, "-serial", take_chardev("-serial", &id, &value)?)?;
        serial_label = Some(id);
    }
    let mut serial_on_isa = None;
    if let Some((id, device_id)) = qemu.isa_serial {
        set_once(&mut serial, "-serial / -device isa-serial", take_chardev("-device", &id, "isa-serial")?)?;
        serial_label = Some(id);
        serial_on_isa = Some(device_id);
    }
    let virtio_serial = match (console, qemu.virtio_serial) {
        (Some(backend), None) => Some(VirtioSerialConfig::single_console(backend)),
        (None, Some(mut virtio_serial)) => {
            // Each port's chardev is its host side.
            for port in &mut virtio_serial.ports {
                let id = port.chardev.clone().unwrap_or_default();
                let model = if port.console { VIRTCONSOLE } else { VIRTSERIALPORT };
                port.backend = take_chardev("-device", &id, model)?;
            }
            Some(virtio_serial)
        }
        (None, None) => None,
        (Some(_), Some(_)) => return Err(CliError::Repeated("--console / -device virtio-serial".into())),
    };
    let rng = match (rng, qemu.rng) {
        (true, None) => Some(Frontend::default()),
        (false, rng) => rng,
        (true, Some(_)) => return Err(CliError::Repeated("--rng / -device virtio-rng".into())),
    };
    let balloon = match (balloon, qemu.balloon) {
        (true, None) => Some(BalloonConfig::default()),
        (false, balloon) => balloon,
        (true, Some(_)) => return Err(CliError::Repeated("--balloon / -device virtio-balloon".into())),
    };
    disks.extend(qemu.disks);
    nets.extend(qemu.nics);

    let mut config = if machine == Some(MachineType::None) {
        let guest_options = [
            ("--kernel", kernel.is_some()),
            ("--bios", bios.is_some()),
            ("--initrd", initrd.is_some()),
            ("--cmdline", cmdline.is_some()),
            ("a disk", !disks.is_empty()),
            ("a network card", !nets.is_empty()),
            ("--rng", rng.is_some()),
            ("--balloon", balloon.is_some()),
            ("--console", virtio_serial.is_some()),
            ("-device isa-serial", serial_on_isa.is_some()),
            ("-incoming", incoming.is_some()),
        ];
        if let Some((option, _)) = guest_options.into_iter().find(|(_, given)| *given) {
            return Err(CliError::Guestless(option.to_string()));
        }
        VmConfig::guestless()
    } else {
        match (kernel, bios) {
            (Some(kernel), None) => VmConfig::new(kernel),
            (None, Some(bios)) => {
                // As QEMU: a command line is for a kernel Kestrel loads, and none is loaded.
                let kernel_options = [("--initrd", initrd.is_some()), ("--cmdline", cmdline.is_some())];
                if let Some((option, _)) = kernel_options.into_iter().find(|(_, given)| *given) {
                    return Err(CliError::FirmwareWith(option.to_string()));
                }
                if incoming.is_some() {
                    return Err(CliError::FirmwareWith("-incoming".into()));
                }
                VmConfig::firmware(bios)
            }
            (Some(_), Some(_)) => return Err(CliError::FirmwareWith("--kernel".into())),
            (None, None) => return Err(CliError::NoKernel),
        }
    };
    config.initrd = initrd;
    if let Some(cmdline) = cmdline {
        config.cmdline = Some(cmdline);
    }
    if let Some(memory) = memory {
        config.memory_bytes = memory;
    }
    config.cpu = cpu.unwrap_or_default();
    if let Some((count, sockets)) = cpus {
        config.vcpus = count;
        config.cpu.sockets = sockets;
    }
    match serial {
        Some(SerialConfig::Stdio) if daemonize => return Err(CliError::DaemonStdio("the serial port")),
        Some(serial) => config.serial = serial,
        // stdio, the default, is /dev/null in a daemon.
        None if daemonize => config.serial = SerialConfig::None,
        None => {}
    }
    let stdio_ports = virtio_serial.iter().flat_map(|v| &v.ports).filter(|p| p.backend == SerialConfig::Stdio).count();
    if daemonize && stdio_ports > 0 {
        return Err(CliError::DaemonStdio("the virtio console"));
    }
    (config.no_reboot, config.no_shutdown, config.start_paused) = flags;
    config.qmp = qmp;
    config.disks = disks;
    config.nets = nets;
    config.rng = rng;
    config.balloon = balloon;
    config.machine = machine;
    if stdio_ports + usize::from(config.serial == SerialConfig::Stdio) > 1 {
        return Err(CliError::StdioTwice);
    }
    config.virtio_serial = virtio_serial;
    config.serial_chardev = serial_label;
    config.dump_guest_core = dump_guest_core.unwrap_or(true);
    config.strict_boot = strict_boot;
    config.serial_on_isa = serial_on_isa;
    config.name = name;
    config.uuid = uuid;
    config.sandbox = sandbox.unwrap_or(true);
    config.incoming = incoming;
    config.daemonize = daemonize;
    config.pidfile = pidfile;
    Ok(Command::Run(Box::new(config)))
}

/// `-incoming file:PATH`, `fd:N` or `defer`. QEMU's other URIs (`tcp:`, `exec:`, ...) are not implemented and say
/// so.
fn parse_incoming(value: &OsStr) -> Result<Incoming, CliError> {
    let bytes = value.as_bytes();
    if bytes == b"defer" {
        return Ok(Incoming::Defer);
    }
    if let Some(number) = bytes.strip_prefix(b"fd:") {
        let number = std::str::from_utf8(number).ok().and_then(|n| n.parse::<i32>().ok()).filter(|&n| n >= 0);
        return number.map(Incoming::Fd).ok_or_else(|| invalid("-incoming", value, "fd: needs a descriptor number"));
    }
    match bytes.strip_prefix(b"file:") {
        Some(path) if !path.is_empty() => Ok(Incoming::File(PathBuf::from(OsStr::from_bytes(path)))),
        Some(_) => Err(invalid("-incoming", value, "file: needs a path")),
        None => Err(invalid("-incoming", value, "Kestrel restores from file:PATH, fd:N or defer only")),
    }
}

/// The fuzz body (fuzz/fuzz_targets/cli_args.rs, and `fuzz_smoke_corpus` under `cargo test`): the bytes split on
/// NUL into arguments, as execve(2) would pass them. Parsing must return, and an error must be one line with no
/// control characters, whatever the arguments.
#[doc(hidden)]
pub fn fuzz_args(data: &[u8]) {
    let args = data.split(|&b| b == 0).map(|arg| OsString::from_vec(arg.to_vec()));
    if let Err(e) = parse(args) {
        let message = e.to_string();
        assert!(!message.chars().any(char::is_control), "error message with a control character: {message:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_MEMORY_BYTES;
    use crate::config::{BackingSpec, SerialPortConfig, VirtioTransport};

    fn parse_str(args: &str) -> Result<Command, CliError> {
        parse(args.split_whitespace().map(String::from))
    }

    fn config(args: &str) -> VmConfig {
        match parse_str(args) {
            Ok(Command::Run(config)) => *config,
            other => panic!("expected a run command from {args:?}, got {other:?}"),
        }
    }

    #[test]
    fn bios_boots_firmware_instead_of_a_kernel() {
        for args in ["--bios /fw/bios.bin", "-bios /fw/bios.bin -machine pc -m 256 -nographic"] {
            let config = config(args);
            assert_eq!(config.bios, Some(PathBuf::from("/fw/bios.bin")), "{args}");
            assert_eq!(config.kernel, None, "{args}");
        }
        assert_eq!(config("--kernel k").bios, None);
        for (args, needle) in [
            ("-bios b -kernel k", "--kernel cannot be combined with --bios"),
            ("-bios b -append quiet", "--cmdline cannot"),
            ("-bios b -initrd i", "--initrd cannot"),
            ("-bios b -incoming defer", "-incoming cannot"),
            ("-bios b -bios c", "given twice"),
            ("-bios b -machine none", "--bios describes a guest"),
            ("-bios", "needs a value"),
            ("-m 256", "--kernel PATH or --bios PATH"),
        ] {
            let error = parse_str(args).expect_err(args).to_string();
            assert!(error.contains(needle), "{args}: {error}");
            assert_eq!(error.lines().count(), 1, "{error}");
        }
    }

    #[test]
    fn incoming_reads_a_file_an_inherited_descriptor_or_waits() {
        let incoming = |value: &str| config(&format!("--kernel k -incoming {value}")).incoming;
        assert_eq!(incoming("file:/s/vm"), Some(Incoming::File(PathBuf::from("/s/vm"))));
        assert_eq!(config("--kernel k --restore /s/vm").incoming, Some(Incoming::File(PathBuf::from("/s/vm"))));
        assert_eq!(incoming("fd:27"), Some(Incoming::Fd(27)));
        assert_eq!(incoming("defer"), Some(Incoming::Defer));
        for bad in ["fd:", "fd:x", "fd:-1", "file:", "tcp:0:4444", "deferred"] {
            let error = parse_str(&format!("--kernel k -incoming {bad}")).unwrap_err().to_string();
            assert!(error.contains("-incoming"), "{bad}: {error}");
        }
    }

    #[test]
    fn full_native_command_line() {
        let config = config(
            "--kernel vmlinux --initrd initrd.img --memory 2G --cpus 4 --serial file:/tmp/out --no-reboot \
             --qmp unix:/tmp/q.sock,server=on,wait=off --paused --no-shutdown --name web1 \
             --uuid 3A0F5C9E-1B2C-4D5E-8F90-A1B2C3D4E5F6",
        );
        assert_eq!(config.kernel, Some(PathBuf::from("vmlinux")));
        assert_eq!(config.initrd, Some(PathBuf::from("initrd.img")));
        assert_eq!(config.memory_bytes, 2 << 30);
        assert_eq!(config.vcpus, 4);
        assert_eq!(config.serial, SerialConfig::File(PathBuf::from("/tmp/out")));
        assert!(config.no_reboot && config.no_shutdown && config.start_paused);
        assert_eq!(config.qmp, vec![ListenSocket { address: SocketAddress::Unix("/tmp/q.sock".into()), wait: false }]);
        assert_eq!(config.name.as_deref(), Some("web1"));
        assert_eq!(config.uuid.as_deref(), Some("3a0f5c9e-1b2c-4d5e-8f90-a1b2c3d4e5f6"));
        assert_eq!(config.cmdline, None);
    }

    #[test]
    fn qemu_spellings_mean_the_same() {
        let config = config(
            "-kernel bzImage -append console=ttyS0 -m size=1G -smp cpus=2,sockets=1 -nographic -nodefaults \
             -enable-kvm -accel kvm -display none -S -no-shutdown -name guest=db,debug-threads=on \
             -chardev socket,id=charmonitor,path=/run/mon.sock,server=on,wait=off \
             -mon chardev=charmonitor,id=monitor,mode=control -qmp unix:/run/q2.sock,server,nowait",
        );
        assert_eq!(config.kernel, Some(PathBuf::from("bzImage")));
        assert_eq!(config.memory_bytes, 1 << 30);
        assert_eq!(config.vcpus, 2);
        assert!(config.start_paused && config.no_shutdown);
        assert_eq!(config.name.as_deref(), Some("db"));
        assert_eq!(
            config.qmp,
            vec![
                ListenSocket { address: SocketAddress::Unix("/run/q2.sock".into()), wait: false },
                ListenSocket { address: SocketAddress::Unix("/run/mon.sock".into()), wait: false },
            ]
        );
    }

    #[test]
    fn libvirts_probe_command_line_is_the_guestless_machine_as_a_daemon() {
        let probe = config(
            "-S -no-user-config -nodefaults -nographic -machine none,accel=kvm:tcg \
             -qmp unix:/var/lib/libvirt/qemu/qmp-X/qmp.monitor,server=on,wait=off \
             -pidfile /var/lib/libvirt/qemu/qmp-X/qmp.pid -daemonize",
        );
        assert_eq!(probe.machine, Some(MachineType::None));
        assert_eq!(probe.kernel, None);
        assert!(probe.daemonize && probe.start_paused);
        assert_eq!(probe.pidfile, Some(PathBuf::from("/var/lib/libvirt/qemu/qmp-X/qmp.pid")));
        assert_eq!(probe.qmp.len(), 1);
        // The daemon's stdio is /dev/null: the serial port's default follows, and stdio is refused.
        assert_eq!(probe.serial, SerialConfig::None);
        assert_eq!(parse_str("--kernel k -daemonize -serial stdio"), Err(CliError::DaemonStdio("the serial port")));
        assert_eq!(
            parse_str("--kernel k --serial none --console stdio --daemonize"),
            Err(CliError::DaemonStdio("the virtio console"))
        );
        assert_eq!(config("--kernel k --pidfile /run/k.pid").pidfile, Some(PathBuf::from("/run/k.pid")));
        assert!(!config("--kernel k").daemonize);
    }

    /// What libvirt 9.0 runs for a domain with direct kernel boot, a pty serial console and no other device (the
    /// argv its log shows, minus the environment).
    const LIBVIRT_DOMAIN: &str = "-name guest=kdom,debug-threads=on -S \
        -object secret,id=masterKey0,format=raw,file=/var/lib/libvirt/qemu/domain-1-kdom/master-key.aes \
        -machine pc-i440fx-7.2,usb=off,dump-guest-core=off -accel kvm -cpu host -m 64 -overcommit mem-lock=off \
        -smp 1,sockets=1,cores=1,threads=1 -uuid 21228d33-9169-47da-accc-3bda482ac945 -display none \
        -no-user-config -nodefaults -chardev socket,id=charmonitor,fd=29,server=on,wait=off \
        -mon chardev=charmonitor,id=monitor,mode=control -rtc base=utc -no-shutdown -boot strict=on \
        -kernel /tmp/probe.bzImage -append echo -chardev pty,id=charserial0 \
        -device isa-serial,chardev=charserial0,id=serial0,index=0 -audiodev {\"id\":\"audio1\",\"driver\":\"none\"} \
        -sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny -msg timestamp=on";

    #[test]
    fn libvirts_domain_command_line() {
        let domain = config(LIBVIRT_DOMAIN);
        assert_eq!(domain.name.as_deref(), Some("kdom"));
        assert_eq!(domain.machine, Some(MachineType::Pc));
        assert!(!domain.dump_guest_core);
        assert_eq!((domain.memory_bytes, domain.vcpus), (64 << 20, 1));
        assert_eq!(domain.qmp, vec![ListenSocket { address: SocketAddress::Inherited(29), wait: false }]);
        assert_eq!(domain.serial, SerialConfig::Pty);
        assert_eq!(domain.serial_chardev.as_deref(), Some("charserial0"));
        assert_eq!(domain.serial_on_isa, Some(Some("serial0".to_string())));
        assert!(domain.start_paused && domain.no_shutdown && domain.sandbox);
        assert_eq!(domain.cmdline.as_deref(), Some("echo"));
        assert!(config("-kernel k").dump_guest_core, "QEMU's default");
        // The clock and power settings of virt-install's domains (`<clock>` timers, `<pm>`), as libvirt passes
        // them: each describes what Kestrel does anyway.
        let virt_install = "-kernel k -rtc base=utc,driftfix=slew -global kvm-pit.lost_tick_policy=delay -no-hpet \
            -global PIIX4_PM.disable_s3=1 -global PIIX4_PM.disable_s4=1 -global ICH9-LPC.disable_s3=1";
        assert_eq!(config(virt_install), config("-kernel k"));
        // Topologies: sockets of cores, one thread each.
        let topology = |smp: &str| {
            let config = config(&format!("-kernel k -smp {smp}"));
            (config.vcpus, config.cpu.sockets)
        };
        assert_eq!(topology("4,sockets=1,dies=1,cores=4,threads=1,maxcpus=4"), (4, 1));
        assert_eq!(topology("2,sockets=2,cores=1,threads=1"), (2, 2));
        assert_eq!(topology("8,sockets=2"), (8, 2));
        assert_eq!(topology("8,cores=2"), (8, 4));
        assert_eq!(topology("3"), (3, 1));
        assert_eq!(topology("cpus=3,sockets=3,cores=1"), (3, 3));
    }

    #[test]
    fn libvirt_settings_kestrel_cannot_honour_are_refused() {
        for (args, needle) in [
            ("-smp 6,sockets=2,cores=3", "the cores in each must be a power of two"),
            ("-smp 4,sockets=2,cores=1", "2 sockets of 1 cores are not 4 vCPUs"),
            ("-smp 5,sockets=2", "are not 5 vCPUs"),
            ("-smp 2,maxcpus=4", "maxcpus must be 2"),
            ("-smp 2,threads=2", "threads must be 1"),
            ("-machine pc,usb=on", "no USB"),
            ("-machine pc,mem-merge=off", "'mem-merge'"),
            ("-rtc base=localtime", "base=utc"),
            ("-rtc base=utc,driftfix=catchup", "driftfix=slew or none"),
            ("-global kvm-pit.lost_tick_policy=discard", "lost_tick_policy=delay"),
            ("-global PIIX4_PM.disable_s3=0", "disable_s3=1"),
            ("-global isa-fdc.fdtypeA=none", "unsupported setting 'isa-fdc.fdtypeA'"),
            ("-overcommit mem-lock=on", "mem-lock=off"),
            ("-audiodev {\"id\":\"a\",\"driver\":\"pa\"}", "driver=none"),
            ("-boot order=c", "'order'"),
            ("-boot c", "unsupported setting 'order'"),
            ("-drive file=/a,if=none,id=d -device virtio-blk-pci,drive=d,bootindex=first", "bootindex=first"),
            ("-drive file=/a,if=none,id=d -device virtio-blk-pci,drive=d,bootindex=-2", "from 0 to 2147483647"),
            ("-device virtio-rng-pci,bootindex=2147483648", "bootindex=2147483648"),
            ("-rtc utc", "unsupported setting 'utc'"),
            ("-audiodev pa,id=a", "driver=none"),
            ("-name guest=a,process=b", "'process'"),
            ("-object secret,id=s0,format=raw", "one of file= and data="),
            ("-object secret,id=s0,data=x -object secret,id=s0,data=y", "Duplicate ID 's0'"),
            ("-chardev pty,id=c -device isa-serial,chardev=c,index=1", "index= must be 0"),
            ("-chardev pty,id=c -device isa-serial,chardev=c,iobase=0x2f8", "'iobase'"),
            ("-device isa-serial,chardev=nope", "no -chardev with id 'nope'"),
            ("-chardev pty,id=c -serial chardev:c -chardev pty,id=d -device isa-serial,chardev=d", "given twice"),
            ("-chardev socket,id=m,fd=2,server=on,wait=off -mon chardev=m,mode=control", "above 2"),
            ("-chardev socket,id=m,fd=5,path=/x,server=on -mon chardev=m,mode=control", "give one of"),
        ] {
            let args = format!("-kernel k {args}");
            let error = parse_str(&args).expect_err(&args).to_string();
            assert!(error.contains(needle), "{args}: {error}");
            assert_eq!(error.lines().count(), 1, "{error}");
        }
    }

    #[test]
    fn the_guestless_machine_takes_no_guest() {
        for (args, option) in [
            ("-machine none -kernel k", "--kernel"),
            ("-machine none -initrd i", "--initrd"),
            ("-machine none -append x", "--cmdline"),
            ("-machine none --disk path=d", "a disk"),
            ("-machine none --net tap=t0", "a network card"),
            ("-machine none --rng", "--rng"),
            ("-machine none --console pty", "--console"),
            ("-machine none -incoming defer", "-incoming"),
            ("-machine none -chardev pty,id=c -device isa-serial,chardev=c", "-device isa-serial"),
        ] {
            assert_eq!(parse_str(args), Err(CliError::Guestless(option.into())), "{args}");
        }
        assert_eq!(parse_str("-machine pc"), Err(CliError::NoKernel));
    }

    #[test]
    fn cpu_models_and_features_in_qemus_spellings() {
        assert_eq!(config("--kernel k").cpu, CpuConfig::default());
        assert_eq!(config("--kernel k -cpu host,migratable=on").cpu, CpuConfig::default());
        let cpu = config("--kernel k -cpu kvm64,vme=on,ss=off,+sse4.2,-vmx,x2apic").cpu;
        assert_eq!(cpu.model.as_deref(), Some("kvm64"));
        let settings = [("vme", true), ("ss", false), ("sse4.2", true), ("vmx", false), ("x2apic", true)];
        assert_eq!(cpu.features, settings.map(|(name, on)| (name.to_string(), on)));
        // Which models and features exist is the platform's to say, when the machine is built.
        assert_eq!(config("--kernel k -cpu Skylake-Client").cpu.model.as_deref(), Some("Skylake-Client"));
        for bad in [
            "-cpu host,migratable=maybe",
            "-cpu host,pmu=sometimes",
            "-cpu host,+=on",
            "-cpu host,a/b=on",
            "-cpu ,vmx=on",
            "-cpu host -cpu host",
        ] {
            assert!(parse_str(&format!("--kernel k {bad}")).is_err(), "{bad}");
        }
    }

    #[test]
    fn machine_types_in_every_spelling() {
        assert_eq!(config("--kernel k").machine, None);
        for (args, machine) in [
            ("--machine pc", MachineType::Pc),
            ("--machine=q35", MachineType::Q35),
            ("-M microvm", MachineType::Microvm),
            ("-machine microvm,accel=kvm", MachineType::Microvm),
            ("-machine type=pc,accel=kvm", MachineType::Pc),
            ("-M virt", MachineType::Virt),
            ("-machine virt,accel=kvm", MachineType::Virt),
            ("-machine pc-i440fx-7.2", MachineType::Pc),
            ("-machine pc-q35-7.2,accel=kvm:tcg", MachineType::Q35),
            ("-M virt-7.2,accel=tcg:kvm", MachineType::Virt),
        ] {
            assert_eq!(config(&format!("--kernel k {args}")).machine, Some(machine), "{args}");
        }
        for bad in [
            "-machine pc,accel=tcg",
            "-machine pc,accel=tcg:xen",
            "-machine pc,usb=on",
            "-machine accel=kvm",
            "-M microvm,pit=off",
        ] {
            assert!(matches!(parse_str(&format!("--kernel k {bad}")), Err(CliError::Invalid { .. })), "{bad}");
        }
    }

    #[test]
    fn disks_and_rng() {
        let config = config("--kernel k --disk path=/a.img,readonly=on,serial=disk-a --disk /b.img,direct=on --rng");
        assert_eq!(
            config.disks,
            vec![
                DiskConfig {
                    path: "/a.img".into(),
                    format: ImageFormat::Raw,
                    backing: Default::default(),
                    read_only: true,
                    serial: Some("disk-a".into()),
                    direct: false,
                    frontend: Frontend::default()
                },
                disk("/b.img", false, true, Frontend::default()),
            ]
        );
        assert_eq!(config.rng, Some(Frontend::default()));
        assert_eq!(config.virtio_serial, None);
        let with_console = super::parse(["--kernel", "k", "--serial", "none", "--console", "stdio"].map(String::from));
        let Ok(Command::Run(with_console)) = with_console else { panic!("expected a run command") };
        let stdio = VirtioSerialConfig::single_console(SerialConfig::Stdio);
        assert_eq!(with_console.virtio_serial, Some(stdio));
        assert_eq!(with_console.virtio_serial.as_ref().map(|v| v.max_ports), Some(1), "no MULTIPORT");
        assert_eq!(parse_str("--kernel k --console stdio"), Err(CliError::StdioTwice));
        for bad in [
            "--kernel k --disk readonly=on",
            "--kernel k --disk path=/a,cache=none",
            "--kernel k --disk /a,serial=123456789012345678901",
        ] {
            assert!(matches!(parse_str(bad), Err(CliError::Invalid { .. })), "{bad}");
        }
    }

    fn disk(path: &str, read_only: bool, direct: bool, frontend: Frontend) -> DiskConfig {
        DiskConfig {
            path: path.into(),
            format: ImageFormat::Raw,
            backing: Default::default(),
            read_only,
            serial: None,
            direct,
            frontend,
        }
    }

    fn pci(id: Option<&str>) -> Frontend {
        Frontend { transport: Some(VirtioTransport::Pci), id: id.map(String::from), boot_index: None }
    }

    /// The native spelling and QEMU's, key=value and libvirt's JSON, on either transport.
    #[test]
    fn balloon_spellings() {
        assert_eq!(config("--kernel k").balloon, None);
        assert_eq!(config("--kernel k --balloon").balloon, Some(BalloonConfig::default()));
        let json =
            r#"{"driver":"virtio-balloon-pci","id":"balloon0","bus":"pci.0","addr":"0x2","deflate-on-oom":true}"#;
        assert_eq!(
            config(&format!("--kernel k -device {json}")).balloon,
            Some(BalloonConfig { frontend: pci(Some("balloon0")), deflate_on_oom: true, stats_poll_interval: 0 })
        );
        assert_eq!(
            config("--kernel k -device virtio-balloon-device,guest-stats-polling-interval=10,deflate-on-oom=off")
                .balloon,
            Some(BalloonConfig {
                frontend: Frontend { transport: Some(VirtioTransport::Mmio), ..Frontend::default() },
                deflate_on_oom: false,
                stats_poll_interval: 10,
            })
        );
        assert!(matches!(parse_str("-machine none --balloon"), Err(CliError::Guestless(_))));
    }

    #[test]
    fn qemu_drive_and_blockdev_spellings() {
        let config = config(
            "-kernel k -drive file=/a.img,if=virtio,format=raw,cache=none \
             -drive file=/b.img,if=none,id=d1,format=raw,readonly=on -device virtio-blk-pci,drive=d1,id=disk1,serial=s1 \
             -blockdev driver=file,node-name=f2,filename=/c.img -blockdev driver=raw,node-name=r2,file=f2,read-only=on \
             -device virtio-blk-device,drive=r2 \
             -blockdev driver=raw,node-name=r3,file.driver=file,file.filename=/d.img -device virtio-blk,drive=r3",
        );
        let mut b = disk("/b.img", true, false, pci(Some("disk1")));
        b.serial = Some("s1".into());
        let mmio = Frontend { transport: Some(VirtioTransport::Mmio), ..Frontend::default() };
        assert_eq!(
            config.disks,
            vec![
                disk("/a.img", false, true, Frontend::default()),
                b,
                disk("/c.img", true, false, mmio),
                disk("/d.img", false, false, Frontend::default()),
            ]
        );
    }

    #[test]
    fn qcow2_in_every_spelling() {
        let config = config(
            "-kernel k --disk path=/n.qcow2,format=qcow2 -drive file=/a.qcow2,if=virtio,format=qcow2 \
             -drive file=/b.qcow2,if=none,id=d1,format=qcow2 -device virtio-blk-pci,drive=d1 \
             -blockdev driver=file,node-name=f2,filename=/c.qcow2 -blockdev driver=qcow2,node-name=q2,file=f2 \
             -device virtio-blk-pci,drive=q2 \
             -blockdev driver=qcow2,node-name=q3,read-only=on,file.driver=file,file.filename=/d.qcow2 \
             -device virtio-blk-pci,drive=q3 \
             -blockdev driver=file,node-name=f4,filename=/e.img -device virtio-blk-pci,drive=f4",
        );
        let formats: Vec<_> = config.disks.iter().map(|d| (d.path.to_str().unwrap(), d.format, d.read_only)).collect();
        assert_eq!(
            formats,
            [
                ("/n.qcow2", ImageFormat::Qcow2, false),
                ("/a.qcow2", ImageFormat::Qcow2, false),
                ("/b.qcow2", ImageFormat::Qcow2, false),
                ("/c.qcow2", ImageFormat::Qcow2, false),
                ("/d.qcow2", ImageFormat::Qcow2, true),
                // A file node used directly is raw, as in QEMU.
                ("/e.img", ImageFormat::Raw, false),
            ]
        );
        assert!(matches!(parse_str("--kernel k --disk path=/a,format=vmdk"), Err(CliError::Invalid { .. })));
    }

    /// libvirt names each layer of a chain as a node and points the one above at it; `null` ends the chain.
    #[test]
    fn libvirt_backing_nodes() {
        let args = [
            "-kernel",
            "k",
            "-blockdev",
            r#"{"driver":"file","filename":"/i/base.qcow2","node-name":"libvirt-2-storage","auto-read-only":true}"#,
            "-blockdev",
            r#"{"node-name":"libvirt-2-format","read-only":true,"driver":"qcow2","file":"libvirt-2-storage","backing":null}"#,
            "-blockdev",
            r#"{"driver":"file","filename":"/i/top.qcow2","node-name":"libvirt-1-storage","auto-read-only":true}"#,
            "-blockdev",
            r#"{"node-name":"libvirt-1-format","read-only":false,"driver":"qcow2","file":"libvirt-1-storage","backing":"libvirt-2-format"}"#,
            "-device",
            r#"{"driver":"virtio-blk-pci","drive":"libvirt-1-format","id":"virtio-disk0"}"#,
            "-blockdev",
            r#"{"node-name":"solo","driver":"qcow2","file":{"driver":"file","filename":"/i/solo.qcow2"},"backing":null}"#,
            "-device",
            r#"{"driver":"virtio-blk-pci","drive":"solo"}"#,
        ];
        let Ok(Command::Run(config)) = super::parse(args.map(String::from)) else { panic!("refused") };
        let base = BackingSpec::Image {
            path: "/i/base.qcow2".into(),
            format: ImageFormat::Qcow2,
            backing: Box::new(BackingSpec::None),
        };
        let disks: Vec<_> = config.disks.iter().map(|d| (d.path.to_str().unwrap(), &d.backing, d.read_only)).collect();
        assert_eq!(disks, [("/i/top.qcow2", &base, false), ("/i/solo.qcow2", &BackingSpec::None, false)]);
    }

    /// libvirt passes -blockdev and -device as JSON objects.
    #[test]
    fn libvirt_json_spellings() {
        let args = [
            "-kernel",
            "k",
            "-blockdev",
            r#"{"driver":"file","filename":"/var/lib/libvirt/images/vm.img","node-name":"libvirt-1-storage","auto-read-only":true,"discard":"unmap"}"#,
            "-blockdev",
            r#"{"node-name":"libvirt-1-format","read-only":false,"driver":"raw","file":"libvirt-1-storage"}"#,
            "-device",
            r#"{"driver":"virtio-blk-pci","bus":"pci.0","addr":"0x4","drive":"libvirt-1-format","id":"virtio-disk0","bootindex":1}"#,
            "-object",
            r#"{"qom-type":"rng-random","id":"objrng0","filename":"/dev/urandom"}"#,
            "-device",
            r#"{"driver":"virtio-rng-pci","rng":"objrng0","id":"rng0","bus":"pci.0","addr":"0x7"}"#,
        ];
        let Ok(Command::Run(config)) = super::parse(args.map(String::from)) else {
            panic!("libvirt's form must parse")
        };
        // QEMU's `bootindex`, which libvirt gives as a JSON number; -1 is QEMU's "none".
        let boot_disk = Frontend { boot_index: Some(1), ..pci(Some("virtio-disk0")) };
        assert_eq!(config.disks, vec![disk("/var/lib/libvirt/images/vm.img", false, false, boot_disk)]);
        assert_eq!(config.rng, Some(pci(Some("rng0"))));
    }

    #[test]
    fn boot_order_settings() {
        assert!(config("-kernel k -boot strict=on").strict_boot, "libvirt's: passed on to firmware");
        assert!(!config("-kernel k -boot strict=off").strict_boot);
        assert!(!config("-kernel k").strict_boot, "QEMU's default");
        let unlisted = config("-kernel k -device virtio-rng-pci,bootindex=-1");
        assert_eq!(unlisted.rng, Some(Frontend { transport: Some(VirtioTransport::Pci), ..Frontend::default() }));
        let listed = config("-kernel k -device virtio-rng-pci,bootindex=0");
        assert_eq!(listed.rng.unwrap().boot_index, Some(0));
    }

    #[test]
    fn qemu_netdev_and_nic() {
        let qemu = config(
            "-kernel k -netdev tap,id=n0,ifname=ktap0,script=no,downscript=no,vhost=off \
             -device virtio-net-pci,netdev=n0,mac=52:54:00:aa:bb:cc,id=net0",
        );
        let mac = Some(MacAddress([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]));
        assert_eq!(
            qemu.nets,
            vec![NetConfig { tap: TapConfig::Named("ktap0".into()), mac, frontend: pci(Some("net0")) }]
        );
        // libvirt's form: the tap it created, passed as a descriptor, in JSON; vhost-net's descriptor beside it is
        // taken and left unused.
        let libvirt = config(
            r#"-kernel k -netdev {"type":"tap","fd":"27","vhost":true,"vhostfd":"28","id":"hostnet0"}
             -device {"driver":"virtio-net-pci","netdev":"hostnet0","id":"net0","mac":"52:54:00:aa:bb:cc"}"#,
        );
        let frontend = pci(Some("net0"));
        assert_eq!(libvirt.nets, vec![NetConfig { tap: TapConfig::Inherited(27), mac, frontend }]);
        assert_eq!(libvirt.nets[0].tap.to_string(), "tap,fd=27");
        for (args, needle) in [
            ("-netdev tap,id=n0,ifname=a/b -device virtio-net-pci,netdev=n0", "ifname"),
            ("-netdev tap,id=n0,ifname=t0 -device virtio-net-pci,netdev=n0,mac=01:00:00:00:00:01", "mac="),
            ("-netdev tap,id=n0,ifname=t0 -device virtio-net-pci,netdev=n0 -device virtio-net-pci,netdev=n0", "in use"),
        ] {
            let args = format!("--kernel k {args}");
            let err = parse_str(&args).expect_err(&args).to_string();
            assert!(err.contains(needle), "{args}: {err}");
        }
    }

    #[test]
    fn qemu_chardevs_for_serial_console_and_monitor() {
        let config = config(
            "-kernel k -chardev file,id=s0,path=/tmp/serial.log -serial chardev:s0 \
             -chardev socket,id=c0,path=/tmp/con.sock,server=on,wait=off -device virtio-serial-pci,id=vser0 \
             -device virtconsole,chardev=c0,id=console0 \
             -chardev socket,id=m0,path=/tmp/qmp.sock,server=on,wait=off -mon chardev=m0,mode=control",
        );
        assert_eq!(config.serial, SerialConfig::File("/tmp/serial.log".into()));
        let virtio_serial = config.virtio_serial.unwrap();
        let socket = ListenSocket { address: SocketAddress::Unix("/tmp/con.sock".into()), wait: false };
        assert_eq!(virtio_serial.frontend, pci(Some("vser0")));
        assert_eq!(virtio_serial.max_ports, 31, "QEMU's default");
        let console = SerialPortConfig {
            nr: 0,
            name: None,
            console: true,
            backend: SerialConfig::Socket(socket),
            chardev: Some("c0".into()),
            id: Some("console0".into()),
        };
        assert_eq!(virtio_serial.ports, [console]);
        assert_eq!(config.qmp.len(), 1);
    }

    /// virt-install's guest agent channel, as libvirt 9.0 passes it (JSON `-device`, an inherited socket), beside a
    /// console; ports without `nr=` are numbered as QEMU numbers them.
    #[test]
    fn virtio_serial_ports_as_libvirt_gives_them() {
        let libvirt = config(
            "-kernel k -device {\"driver\":\"virtio-serial-pci\",\"id\":\"virtio-serial0\",\"bus\":\"pci.2\",\"addr\":\"0x0\"} \
             -chardev socket,id=charchannel0,fd=33,server=on,wait=off \
             -device {\"driver\":\"virtserialport\",\"bus\":\"virtio-serial0.0\",\"nr\":1,\"chardev\":\"charchannel0\",\"id\":\"channel0\",\"name\":\"org.qemu.guest_agent.0\"} \
             -chardev pty,id=charconsole0 -device virtconsole,chardev=charconsole0,id=console0 \
             -chardev file,id=log,path=/tmp/log -device virtserialport,chardev=log,name=org.example.log",
        );
        let virtio_serial = libvirt.virtio_serial.unwrap();
        assert_eq!(virtio_serial.frontend, pci(Some("virtio-serial0")));
        assert_eq!(virtio_serial.max_ports, 31);
        type Port<'a> = (u32, Option<&'a str>, bool, &'a SerialConfig, Option<&'a str>);
        let summary: Vec<Port> = virtio_serial
            .ports
            .iter()
            .map(|p| (p.nr, p.name.as_deref(), p.console, &p.backend, p.id.as_deref()))
            .collect();
        let inherited = SerialConfig::Socket(ListenSocket { address: SocketAddress::Inherited(33), wait: false });
        assert_eq!(
            summary,
            [
                (1, Some("org.qemu.guest_agent.0"), false, &inherited, Some("channel0")),
                (0, None, true, &SerialConfig::Pty, Some("console0")),
                (2, Some("org.example.log"), false, &SerialConfig::File("/tmp/log".into()), None),
            ]
        );
        // The controller after its ports, max_ports given, the key=value form.
        let later = config(
            "-kernel k -chardev pty,id=a -device virtserialport,chardev=a,name=a,nr=3 \
             -device virtio-serial-device,max_ports=4",
        );
        let virtio_serial = later.virtio_serial.unwrap();
        assert_eq!((virtio_serial.max_ports, virtio_serial.ports[0].nr), (4, 3));
        assert_eq!(virtio_serial.frontend.transport, Some(VirtioTransport::Mmio));
        // A controller without ports is a device too.
        let portless = config("-kernel k -device virtio-serial-pci");
        assert_eq!(portless.virtio_serial.map(|v| v.ports.len()), Some(0));
    }

    #[test]
    fn virtio_serial_port_mistakes_are_named_in_qemus_words() {
        let two = "-chardev pty,id=a -chardev pty,id=b";
        for (args, needle) in [
            (format!("{two} -device virtio-serial-pci -device virtserialport,chardev=a,nr=1 -device virtserialport,chardev=b,nr=1"), "A port already exists at id 1"),
            (format!("{two} -device virtio-serial-pci -device virtserialport,chardev=a -device virtserialport,chardev=b,nr=1"), "A port already exists at id 1"),
            (format!("{two} -device virtio-serial-pci -device virtserialport,chardev=a,name=x -device virtserialport,chardev=b,name=x"), "A port already exists by name x"),
            (format!("{two} -device virtio-serial-pci,max_ports=2 -device virtserialport,chardev=a,nr=2"), "Out-of-range port id specified, max. allowed: 1"),
            (format!("{two} -device virtio-serial-pci,max_ports=2 -device virtserialport,chardev=a -device virtserialport,chardev=b"), "Maximum port limit for this device reached"),
            (format!("{two} -device virtio-serial-pci -device virtserialport,chardev=a,nr=0"), "reserved for virtconsole"),
            (format!("{two} -device virtio-serial-pci,max_ports=0"), "max_ports= takes 1 to 126"),
            (format!("{two} -device virtio-serial-pci,max_ports=127"), "max_ports= takes 1 to 126"),
            (format!("{two} -device virtio-serial-pci,max_ports=x"), "max_ports= takes 1 to 126"),
            (format!("{two} -device virtio-serial-pci -device virtserialport,chardev=a,nr=x"), "nr= takes a port number"),
            (format!("{two} -device virtio-serial-pci -device virtserialport,chardev=a,name="), "name= takes 1 to 255 bytes"),
            (format!("{two} -device virtio-serial-pci -device virtserialport,chardev=a,name={}", "n".repeat(256)), "name= takes 1 to 255 bytes"),
            (format!("{two} -device virtserialport,chardev=a"), "needs a -device virtio-serial-pci"),
            (format!("{two} -device virtio-serial-pci -device virtserialport,name=x"), "chardev= is required"),
            (format!("{two} -device virtio-serial-pci -device virtserialport,chardev=c"), "no -chardev with id 'c'"),
            (format!("{two} -device virtio-serial-pci -device virtserialport,chardev=a -device virtconsole,chardev=a"), "no unused -chardev with id 'a'"),
            (format!("{two} -device virtio-serial-pci -device virtserialport,chardev=a,speed=9"), "unsupported setting 'speed'"),
            (format!("{two} -device virtio-serial-pci -device virtio-serial-pci,id=s1"), "one virtio-serial controller"),
            (format!("{two} --console pty -device virtio-serial-pci"), "given twice"),
            ("--serial none -chardev stdio,id=a -chardev stdio,id=b -device virtio-serial-pci -device virtconsole,chardev=a -device virtserialport,chardev=b".to_string(), "stdio"),
        ] {
            let error = parse_str(&format!("-kernel k {args}")).expect_err(&args).to_string();
            assert!(error.contains(needle), "{args}: {error} (expected {needle})");
        }
    }

    #[test]
    fn qemu_device_mistakes_are_named() {
        for (args, needle) in [
            ("-drive file=/a.img", "only if=virtio"),
            ("-drive file=/a.img,if=virtio,format=vmdk", "format 'vmdk' is not supported (raw, qcow2)"),
            ("-blockdev driver=vmdk,node-name=v,file.driver=file,file.filename=/a", "driver 'vmdk' is not supported"),
            (
                "-blockdev driver=file,node-name=f,filename=/a -blockdev driver=raw,node-name=q,file=f,backing=b",
                "unsupported setting 'backing'",
            ),
            (
                "-blockdev driver=file,node-name=f,filename=/a -blockdev driver=qcow2,node-name=q,file=f,backing=b \
                 -device virtio-blk-pci,drive=q",
                "backing=b: no -blockdev named 'b'",
            ),
            (
                "-blockdev driver=qcow2,node-name=q,file.driver=file,file.filename=/a,backing=q2 \
                 -blockdev driver=qcow2,node-name=q2,file.driver=file,file.filename=/b,backing=q \
                 -device virtio-blk-pci,drive=q",
                "the backing= chain loops at node 'q'",
            ),
            ("-drive file=/a.img,if=none", "id="),
            ("-drive file=/a.img,if=none,id=d0", "no -device uses it"),
            ("-device virtio-blk-pci,drive=nope", "no -drive or -blockdev named 'nope'"),
            ("-drive file=/a,if=none,id=d0 -device virtio-blk-pci,drive=d0 -device virtio-blk-pci,drive=d0", "in use"),
            ("-device e1000,netdev=n0", "device 'e1000' is not supported"),
            ("-device virtio-blk-pci,drive=d0,frobnicate=1 -drive file=/a,if=none,id=d0", "unsupported setting"),
            ("-netdev user,id=n0", "user networking"),
            ("-netdev tap,id=n0,ifname=t0,script=/etc/qemu-ifup", "script=no"),
            ("-netdev tap,id=n0,ifname=t0,vhost=on", "vhost"),
            ("-netdev tap,id=n0,fds=3:4", "'fds' is not supported"),
            ("-netdev tap,id=n0,fd=2", "descriptor number above 2"),
            ("-netdev tap,id=n0,fd=tapfd", "descriptor number above 2"),
            ("-netdev tap,id=n0,fd=30,ifname=t0", "cannot be used together"),
            ("-netdev tap,id=n0", "ifname= or fd= is required"),
            ("-netdev tap,id=n0,ifname=t0,vhost=on,vhostfd=31", "vhostfd= needs fd= and vhost=on"),
            ("-netdev tap,id=n0,fd=30,vhostfd=31", "vhostfd= needs fd= and vhost=on"),
            ("-device virtio-net-pci,netdev=n9", "no -netdev with id 'n9'"),
            ("-device virtconsole,chardev=c0", "no -chardev"),
            ("-chardev stdio,id=c0 -device virtconsole,chardev=c0", "virtio-serial"),
            ("-object memory-backend-ram,id=m0", "not supported"),
            ("-device virtio-rng-pci,rng=r9", "no -object with id 'r9'"),
            ("-blockdev {\"driver\":", "bad JSON"),
            ("-blockdev driver=qcow2,node-name=q", "file= names the file node"),
            ("-chardev socket,id=m0,path=/tmp/x,server=on -mon chardev=m1,mode=control", "no unused -chardev"),
            ("-chardev pty,id=m0 -mon chardev=m0,mode=control", "socket chardev"),
            ("--rng -device virtio-rng-pci", "given twice"),
            ("-qmp unix:/tmp/q.sock,server=on,wait=off,fd=7", "unsupported setting 'fd'"),
            // Advertised to libvirt's probe, so taken only with the values Kestrel honours.
            (
                "-drive file=/a,if=none,id=d0 -device virtio-blk-pci,drive=d0,num-queues=8",
                "num-queues=8 is not supported",
            ),
            (
                "-drive file=/a,if=none,id=d0 -device virtio-blk-pci,drive=d0,write-cache=off",
                "write-cache=on|true|yes|auto",
            ),
            ("-drive file=/a,if=none,id=d0 -device virtio-blk-pci,drive=d0,scsi=on", "scsi=on is not supported"),
            ("-netdev tap,id=n0,ifname=t0,script=no -device virtio-net-pci,netdev=n0,mq=on", "mq=on"),
            (
                "-netdev tap,id=n0,ifname=t0,script=no -device virtio-net-pci,netdev=n0,vectors=4",
                "unsupported setting 'vectors'",
            ),
            (
                "-object rng-random,id=r0 -device virtio-rng-pci,rng=r0,max-bytes=1024",
                "unsupported setting 'max-bytes'",
            ),
        ] {
            let args = format!("--kernel k {args}");
            let err = parse_str(&args).expect_err(&args).to_string();
            assert!(err.contains(needle), "{args}: {err}");
        }
    }

    #[test]
    fn advertised_device_settings_with_the_values_kestrel_honours() {
        let args = "--kernel k -drive file=/a,if=none,id=d0 \
                    -device virtio-blk-pci,drive=d0,num-queues=1,write-cache=on,scsi=off,config-wce=off";
        assert_eq!(config(args).disks.len(), 1);
    }

    #[test]
    fn consoles_on_listening_sockets() {
        let config =
            config("--kernel k --serial tcp:127.0.0.1:4555,server=on,wait=off --console unix:/tmp/c.sock,server");
        let tcp = SocketAddress::Tcp("127.0.0.1".into(), 4555);
        assert_eq!(config.serial, SerialConfig::Socket(ListenSocket { address: tcp, wait: false }));
        let unix = SocketAddress::Unix("/tmp/c.sock".into());
        let socket = SerialConfig::Socket(ListenSocket { address: unix, wait: true });
        assert_eq!(config.virtio_serial.map(|c| c.ports[0].backend.clone()), Some(socket));
    }

    #[test]
    fn network_devices_on_taps() {
        let config = config("--kernel k --net tap=tap0 --net tap=kestrel1,mac=52:54:00:AB:cd:01");
        assert_eq!(
            config.nets,
            vec![
                NetConfig { tap: TapConfig::Named("tap0".into()), mac: None, frontend: Frontend::default() },
                NetConfig {
                    tap: TapConfig::Named("kestrel1".into()),
                    mac: Some(MacAddress([0x52, 0x54, 0, 0xab, 0xcd, 1])),
                    frontend: Frontend::default()
                },
            ]
        );
        assert!(self::config("--kernel k").nets.is_empty());
        let cases = [
            ("--net tap0", "'tap0' is not a setting"),
            ("--net mac=52:54:00:12:34:56", "tap=NAME is required"),
            ("--net tap=", "invalid tap name '': empty"),
            ("--net tap=sixteen-bytes-xx", "longer than 15 bytes"),
            ("--net tap=a/b", "contains '/'"),
            ("--net tap=t,mac=52:54:00:12:34", "six hexadecimal bytes"),
            ("--net tap=t,mac=52:54:00:12:34:56:78", "six hexadecimal bytes"),
            ("--net tap=t,mac=52:54:00:12:34:zz", "six hexadecimal bytes"),
            ("--net tap=t,mac=01:00:5e:00:00:01", "multicast"),
            ("--net tap=t,mac=00:00:00:00:00:00", "all-zero"),
            ("--net tap=t,model=e1000", "unsupported setting 'model'"),
            ("--net tap=t,vhost=on", "unsupported setting 'vhost'"),
        ];
        for (args, reason) in cases {
            let err = parse_str(&format!("--kernel k {args}")).unwrap_err();
            assert!(matches!(err, CliError::Invalid { .. }), "{args}: {err:?}");
            assert!(err.to_string().contains(reason), "{args}: {err}");
            assert!(err.to_string().starts_with("invalid --net '"), "{args}: {err}");
        }
    }

    #[test]
    fn tcp_sockets_in_both_spellings() {
        let config = config(
            "-kernel k -qmp tcp:127.0.0.1:4444,server=on,wait=off \
             -chardev socket,id=m,host=localhost,port=4445,server=on,wait=off -mon chardev=m,mode=control \
             -qmp tcp::4446,server,nowait",
        );
        let addresses: Vec<SocketAddress> = config.qmp.into_iter().map(|s| s.address).collect();
        assert_eq!(
            addresses,
            vec![
                SocketAddress::Tcp("127.0.0.1".into(), 4444),
                SocketAddress::Tcp("0.0.0.0".into(), 4446),
                SocketAddress::Tcp("localhost".into(), 4445),
            ]
        );
    }

    #[test]
    fn qemu_waits_for_the_first_client_unless_told_not_to() {
        assert!(config("-kernel k -qmp unix:/q,server").qmp[0].wait);
        assert!(config("-kernel k -qmp unix:/q,server=on,wait=on").qmp[0].wait);
    }

    #[test]
    fn inline_values_and_spaces_in_the_command_line() {
        let args = ["--kernel=k", "--cmdline", "console=ttyS0 quiet", "--serial=none"].map(String::from);
        let Ok(Command::Run(config)) = parse(args) else { panic!("expected a run command") };
        assert_eq!(config.cmdline.as_deref(), Some("console=ttyS0 quiet"));
        assert_eq!(config.serial, SerialConfig::None);
        assert_eq!(config.memory_bytes, DEFAULT_MEMORY_BYTES);
        assert_eq!(config.vcpus, 1);
    }

    #[test]
    fn qemu_option_lists_escape_commas() {
        let (first, pairs) = split_qemu_opts("socket,id=a,,b,path=/x");
        assert_eq!(first.as_deref(), Some("socket"));
        assert_eq!(pairs, vec![("id".into(), "a,b".into()), ("path".into(), "/x".into())]);
    }

    #[test]
    fn help_and_version() {
        assert_eq!(parse_str("--help"), Ok(Command::Help));
        assert_eq!(parse_str("--kernel k -V"), Ok(Command::Version));
    }

    #[test]
    fn sandbox_is_on_unless_turned_off_in_either_spelling() {
        let sandbox = |args: &str| match parse_str(args) {
            Ok(Command::Run(config)) => Ok(config.sandbox),
            other => Err(format!("{other:?}")),
        };
        assert_eq!(sandbox("--kernel k"), Ok(true));
        assert_eq!(sandbox("--kernel k --sandbox off"), Ok(false));
        assert_eq!(sandbox("--kernel k --sandbox=on"), Ok(true));
        assert_eq!(sandbox("--kernel k -sandbox off"), Ok(false));
        assert_eq!(sandbox("--kernel k -sandbox enable=off"), Ok(false));
        // What libvirt passes.
        let libvirt = "--kernel k -sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";
        assert_eq!(sandbox(libvirt), Ok(true));
        assert_eq!(sandbox("--kernel k -sandbox on,elevateprivileges=children,spawn=allow"), Ok(true));
        for bad in [
            "--kernel k -sandbox maybe",
            "--kernel k -sandbox on,spawn=children",
            "--kernel k -sandbox on,network=deny",
            "--kernel k -sandbox obsolete=deny",
        ] {
            assert!(matches!(parse_str(bad), Err(CliError::Invalid { .. })), "{bad:?}: {:?}", parse_str(bad));
        }
        assert_eq!(parse_str("--kernel k --sandbox on -sandbox off"), Err(CliError::Repeated("-sandbox".into())));
    }

    #[test]
    fn bad_input_is_named_in_the_error() {
        let cases = [
            ("", CliError::NoKernel),
            ("--kernel", CliError::MissingValue("--kernel".into())),
            ("--kernel k --frobnicate", CliError::UnknownOption("--frobnicate".into())),
            ("--kernel k -machine sun4m", CliError::Machine("sun4m".into())),
            ("--kernel k --machine", CliError::MissingValue("--machine".into())),
            ("--kernel k -M pc -M microvm", CliError::Repeated("-M".into())),
            ("--kernel k --memory lots", CliError::MemorySize("lots".into())),
            ("--kernel k -m slots=2", CliError::MemorySize("slots=2".into())),
            ("--kernel k --cpus 0", CliError::Cpus("0".into())),
            ("--kernel k --cpus 256", CliError::Cpus("256".into())),
            ("--kernel k --cpus -1", CliError::Cpus("-1".into())),
            ("--kernel k --serial telnet:1", CliError::Serial("telnet:1".into())),
            ("--kernel k --serial file:", CliError::Serial("file:".into())),
            ("--kernel k --kernel j", CliError::Repeated("--kernel".into())),
            ("--kernel k --no-reboot=yes", CliError::UnexpectedValue("--no-reboot".into())),
            ("--kernel k --uuid 1234", CliError::Uuid("1234".into())),
        ];
        for (args, expected) in cases {
            assert_eq!(parse_str(args), Err(expected), "{args:?}");
        }
        let invalid_cases = [
            "--kernel k --serial tcp:1",
            "--kernel k --console unix:/tmp/c.sock",
            "--kernel k --qmp tcp:localhost,server=on",
            "--kernel k --qmp tcp:localhost:0,server=on",
            "--kernel k --qmp tcp:localhost:http,server=on",
            "--kernel k --qmp telnet:localhost:4444,server=on",
            "--kernel k --qmp unix:/q",
            "--kernel k --qmp unix:/q,server=maybe",
            "--kernel k --qmp unix:/q,server=on,telnet=on",
            "--kernel k -chardev spice,id=a",
            "--kernel k -chardev socket,path=/x,server=on",
            "--kernel k -mon chardev=missing,mode=control",
            "--kernel k -chardev socket,id=a,path=/x,server=on -mon chardev=a,mode=readline",
            "--kernel k -accel tcg",
            "--kernel k -display gtk",
        ];
        for args in invalid_cases {
            assert!(matches!(parse_str(args), Err(CliError::Invalid { .. })), "{args:?}: {:?}", parse_str(args));
        }
    }

    fn os_args(args: &[&[u8]]) -> Vec<OsString> {
        args.iter().map(|a| OsStr::from_bytes(a).to_os_string()).collect()
    }

    /// Paths are bytes to the kernel: every option that names a host file keeps them exactly, UTF-8 or not, even
    /// inside QEMU's key=value lists (where `,,` is still a comma).
    #[test]
    fn paths_keep_their_bytes() {
        let args = os_args(&[
            b"--kernel=/k\xff",
            b"--initrd",
            b"/i\xfe",
            b"--serial",
            b"file:/s\xff",
            b"--disk",
            b"path=/d\xff,,x,readonly=on",
            b"--disk",
            b"/d2\xff",
            b"-drive",
            b"file=/e\xff,if=virtio,format=raw",
            b"-blockdev",
            b"driver=file,node-name=f,filename=/f\xff",
            b"-device",
            b"virtio-blk-pci,drive=f",
            b"-chardev",
            b"socket,id=c,path=/c\xff,server=on,wait=off",
            b"-mon",
            b"chardev=c,mode=control",
            b"--qmp",
            b"unix:/q\xff,server=on,wait=off",
            b"-chardev",
            b"file,id=con,path=/con\xff",
            b"-device",
            b"virtio-serial-pci",
            b"-device",
            b"virtconsole,chardev=con",
        ]);
        let Ok(Command::Run(config)) = parse(args) else { panic!("non-UTF-8 paths must parse") };
        let path = |bytes: &[u8]| PathBuf::from(OsStr::from_bytes(bytes));
        assert_eq!(config.kernel, Some(path(b"/k\xff")));
        assert_eq!(config.initrd, Some(path(b"/i\xfe")));
        assert_eq!(config.serial, SerialConfig::File(path(b"/s\xff")));
        let disk_paths: Vec<PathBuf> = config.disks.iter().map(|d| d.path.clone()).collect();
        assert_eq!(disk_paths, [&b"/d\xff,x"[..], b"/d2\xff", b"/e\xff", b"/f\xff"].map(path));
        assert!(config.disks[0].read_only);
        let sockets: Vec<SocketAddress> = config.qmp.iter().map(|s| s.address.clone()).collect();
        assert_eq!(sockets, vec![SocketAddress::Unix(path(b"/q\xff")), SocketAddress::Unix(path(b"/c\xff"))]);
        assert_eq!(
            config.virtio_serial.map(|c| c.ports[0].backend.clone()),
            Some(SerialConfig::File(path(b"/con\xff")))
        );
    }

    /// Names, sizes, option names and settings must be text: one error naming the argument (U+FFFD for the bytes
    /// that are not UTF-8), never a panic.
    #[test]
    fn text_that_is_not_utf8_is_named() {
        for (args, needle) in [
            (&[&b"--kernel"[..], b"k", b"--name", b"web\xff1"][..], "invalid --name 'web\u{fffd}1': not valid UTF-8"),
            (&[b"-kernel", b"k", b"-name", b"guest=\xff"], "invalid -name 'guest=\u{fffd}': not valid UTF-8"),
            (&[b"--kernel", b"k", b"--n\xffme", b"x"], "option '--n\u{fffd}me' is not valid UTF-8"),
            (&[b"--kernel", b"k", b"--n\xffme=x"], "option '--n\u{fffd}me' is not valid UTF-8"),
            (&[b"-kernel", b"k", b"-m\xff", b"1G"], "option '-m\u{fffd}' is not valid UTF-8"),
            (&[b"--kernel", b"k", b"--memory", b"1\xffG"], "invalid --memory '1\u{fffd}G'"),
            (&[b"--kernel", b"k", b"--cmdline", b"quiet\xff"], "invalid --cmdline"),
            (&[b"--kernel", b"k", b"-device", b"virtio-rng-pci,id=\xff"], "invalid -device"),
            (&[b"--kernel", b"k", b"-drive", b"file=/a,if=vir\xfftio"], "if= is not valid UTF-8"),
            (&[b"--kernel", b"k", b"-drive", b"file=/a,i\xfff=virtio"], "a setting's name is not valid UTF-8"),
            (&[b"--kernel", b"k", b"--disk", b"/a,serial=\xff"], "serial= is not valid UTF-8"),
            (&[b"--kernel", b"k", b"-blockdev", b"{\"driver\":\"\xff\"}"], "the JSON form must be UTF-8"),
            (&[b"--kernel", b"k", b"--qmp", b"tcp:h\xff:1,server=on"], "invalid --qmp 'h\u{fffd}:1'"),
            (&[b"--kernel", b"k", b"-chardev", b"so\xffcket,id=c"], "the first item is not valid UTF-8"),
            (&[b"--kernel", b"k", b"--serial", b"std\xffio"], "invalid serial mode 'std\u{fffd}io'"),
        ] {
            let message = parse(os_args(args)).expect_err(needle).to_string();
            assert!(message.contains(needle), "{needle}: {message}");
        }
    }

    /// QEMU refuses an id given twice in each of its namespaces; Kestrel says so in QEMU 7.2's words (after the
    /// option and its value, as QEMU prints them), which management tools may match.
    #[test]
    fn duplicate_ids_are_refused_in_qemus_words() {
        let rng = r#"{"driver":"virtio-rng-pci","id":"x"}"#;
        let object = r#"{"qom-type":"rng-random","id":"r"}"#;
        for (args, expected) in [
            (
                "-device virtio-rng-pci,id=x -device virtio-serial-pci,id=x".to_string(),
                "-device virtio-serial-pci,id=x: Duplicate ID 'x' for device",
            ),
            (format!("-device virtio-serial-pci,id=x -device {rng}"), "Duplicate device ID 'x'"),
            (format!("-device {rng} -device virtio-serial-pci,id=x"), "Duplicate device ID 'x'"),
            ("-chardev null,id=c -chardev pty,id=c".to_string(), "-chardev pty,id=c: Duplicate ID 'c' for chardev"),
            (
                "-netdev tap,id=n,ifname=t0 -netdev tap,id=n,ifname=t1".to_string(),
                "-netdev tap,id=n,ifname=t1: Duplicate ID 'n' for netdev",
            ),
            ("-object rng-random,id=r -object rng-builtin,id=r".to_string(), "Duplicate ID 'r' for object"),
            (
                format!("-object rng-builtin,id=r -object {object}"),
                "attempt to add duplicate property 'r' to object (type 'container')",
            ),
            (
                "-drive file=/a,if=none,id=d -drive file=/b,if=none,id=d".to_string(),
                "-drive file=/b,if=none,id=d: Duplicate ID 'd' for drive",
            ),
            ("-drive file=/a,if=virtio,id=d -drive file=/b,if=none,id=d".to_string(), "Duplicate ID 'd' for drive"),
            (
                "-blockdev driver=file,node-name=n,filename=/a -blockdev driver=file,node-name=n,filename=/b"
                    .to_string(),
                "-blockdev driver=file,node-name=n,filename=/b: Duplicate nodes with node-name='n'",
            ),
            (
                "-blockdev driver=file,node-name=f,filename=/a -blockdev driver=raw,node-name=f,file=f".to_string(),
                "Duplicate nodes with node-name='f'",
            ),
            (
                "-blockdev driver=file,node-name=n,filename=/a -drive file=/b,if=none,id=n".to_string(),
                "Device name 'n' conflicts with an existing node name",
            ),
            (
                "-drive file=/b,if=none,id=n -blockdev driver=file,node-name=n,filename=/a".to_string(),
                "Device name 'n' conflicts with an existing node name",
            ),
        ] {
            let mut argv = vec!["--kernel".to_string(), "k".to_string()];
            // The JSON values hold no spaces, so splitting on whitespace keeps each whole.
            argv.extend(args.split_whitespace().map(String::from));
            let err = parse(argv).expect_err(&args);
            assert!(matches!(err, CliError::DuplicateId { .. }), "{args}: {err:?}");
            assert!(err.to_string().ends_with(expected), "{args}: {err}");
        }
        // Ids in different namespaces do not clash, and the same id is fine in each.
        let config = config(
            "--kernel k -chardev null,id=a -netdev tap,id=a,ifname=t0 -object rng-random,id=a \
             -drive file=/a,if=none,id=a -device virtio-blk-pci,drive=a,id=a -device virtio-net-pci,netdev=a \
             -device virtio-rng-pci,rng=a",
        );
        assert_eq!(config.disks.len(), 1);
    }

    /// `-serial chardev:ID` strips the prefix once: the id is everything after it.
    #[test]
    fn serial_chardev_prefix_is_stripped_once() {
        let config = config("--kernel k -chardev null,id=chardev:c -serial chardev:chardev:c");
        assert_eq!(config.serial, SerialConfig::None);
    }

    #[test]
    fn control_characters_in_errors_are_escaped() {
        let err = parse(["--kernel", "k", "--frob\n\x1b[2J"]).unwrap_err().to_string();
        assert_eq!(err, "unknown option '--frob\\n\\u{1b}[2J' (see --help)");
        let err = parse(["--kernel", "k", "--memory", "1\nG"]).unwrap_err().to_string();
        assert!(err.starts_with("invalid memory size '1\\nG'"), "{err}");
    }

    /// The fuzz target's body over a deterministic corpus: random bytes, and random splices of option names, values
    /// and their pieces in both spellings (which reach far deeper than random bytes do).
    #[test]
    fn fuzz_smoke_corpus() {
        const PIECES: &[&[u8]] = &[
            b"\0",
            b"\0",
            b"\0",
            b"\0--kernel\0",
            b"\0-kernel\0",
            b"k",
            b"\0--kernel=",
            b"\0-device\0",
            b"\0-drive\0",
            b"\0-blockdev\0",
            b"\0-netdev\0",
            b"\0-object\0",
            b"\0-chardev\0",
            b"\0-mon\0",
            b"\0-serial\0",
            b"\0--serial\0",
            b"\0--console\0",
            b"\0--qmp\0",
            b"\0--disk\0",
            b"\0--net\0",
            b"\0-M\0",
            b"\0-m\0",
            b"\0-smp\0",
            b"\0-name\0",
            b"\0--uuid\0",
            b"\0-accel\0",
            b"\0--rng",
            b"virtio-blk-pci",
            b"virtio-net-device",
            b"virtio-rng",
            b"virtio-serial-pci",
            b"virtconsole",
            b"drive=",
            b"netdev=",
            b"chardev=",
            b"rng=",
            b"id=",
            b"node-name=",
            b"file=",
            b"filename=",
            b"file.filename=",
            b"file.driver=file",
            b"driver=",
            b"raw",
            b"if=none",
            b"if=virtio",
            b"tap,ifname=t0",
            b"rng-random",
            b"socket,path=/s,server=on",
            b"unix:/q,server=on,wait=off",
            b"tcp::4444,server",
            b"file:/f",
            b"stdio",
            b"mode=control",
            b"mac=52:54:00:12:34:56",
            b"serial=",
            b"readonly=on",
            b"cache=none",
            b"x",
            b"a",
            b",",
            b",,",
            b"=",
            b":",
            b"{",
            b"}",
            b"\"",
            b"\"driver\":",
            b"\"id\":\"x\"",
            b"\"file\":{",
            b"[]",
            b"null",
            b"true",
            b"1",
            b"4G",
            b"18446744073709551616",
            b"\xff",
            b"\xc3",
            b"\n",
            b"\x1b",
            b" ",
        ];
        let mut seed = 0x5eed_c11a_2b3c_4d5eu64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for i in 0..20_000 {
            let len = (next() % 48) as usize;
            let mut input = Vec::new();
            if i % 4 == 0 {
                input.extend((0..len * 4).map(|_| next() as u8));
            } else {
                for _ in 0..len {
                    input.extend_from_slice(PIECES[(next() % PIECES.len() as u64) as usize]);
                }
            }
            fuzz_args(&input);
        }
    }
}

//! Kestrel's command line: native options (`--kernel ...`) and the QEMU spellings management tools already use
//! (`-kernel`, `-qmp`, `-chardev` + `-mon`, `-S`, ...), both parsed into one `VmConfig`.

use std::collections::HashMap;
use std::path::PathBuf;

use crate::config::{
    parse_memory_size, parse_uuid, ConsoleConfig, DiskConfig, Frontend, ListenSocket, MacAddress, MachineType,
    NetConfig, SerialConfig, SocketAddress, VmConfig,
};

mod qemu_devices;
use qemu_devices::QemuDeviceOptions;

pub const USAGE: &str = "\
Usage: kestrel --kernel PATH [options]

Boots a virtual machine on KVM.

Options (QEMU's spelling in brackets, where it has one):
  --kernel PATH         guest kernel: bzImage, ELF vmlinux, or ELF with a PVH entry; arm64 Image on aarch64
                        (required) [-kernel]
  --machine TYPE        x86_64: pc (default; q35 is the same): virtio devices on PCI with MSI-X; microvm:
                        virtio-mmio. aarch64: virt (the only one): virtio-mmio, found through the device tree
                        [-M TYPE, -machine TYPE[,accel=kvm] or type=TYPE]
  --initrd PATH         initial ramdisk [-initrd]
  --cmdline STR         kernel command line (default: the serial console: \"console=ttyS0\" on x86_64,
                        \"console=ttyAMA0\" on aarch64)
                        [-append]
  --memory SIZE         guest RAM; a plain number is MiB, or use K/M/G/T (default: 512M) [-m]
  --cpus N              number of vCPUs (default: 1) [-smp]
  --serial MODE         first serial port: stdio (default), pty, file:PATH, none, or a listening socket
                        unix:PATH,server=on[,wait=off] / tcp:HOST:PORT,server=on[,wait=off] [-serial]
  --qmp unix:PATH,server=on,wait=off   (or tcp:HOST:PORT,server=on,wait=off)
                        QMP control socket (repeatable) [-qmp, or -chardev socket,id=ID,path=PATH,server=on,wait=off
                        with -mon chardev=ID,mode=control]
  --disk path=FILE[,readonly=on][,serial=S][,direct=on]
                        virtio-blk disk on a raw image (repeatable)
  --net tap=NAME[,mac=52:54:00:12:34:56]
                        virtio-net device on host tap interface NAME, created if missing (needs CAP_NET_ADMIN or
                        a tap made for this user); default MACs 52:54:00:12:34:56, :57, ... (repeatable)
  --rng                 virtio-rng device fed from the host's getrandom
  --console MODE        virtio-console (the guest's hvc0), with --serial's modes (only one of --serial and
                        --console can be stdio)
  --paused              start with the vCPUs stopped until QMP `cont` [-S]
  --no-reboot           exit when the guest reboots instead of resetting it [-no-reboot]
  --no-shutdown         stay alive, stopped, when the guest powers off [-no-shutdown]
  --name NAME           VM name shown over QMP [-name NAME or -name guest=NAME]
  --uuid UUID           VM UUID shown over QMP [-uuid]
  --sandbox on|off      confine each thread to the system calls it needs (seccomp; default: on). off is for
                        debugging: a call outside the filter ends Kestrel with a line naming it
                        [-sandbox on|off[,obsolete=..,elevateprivileges=..,spawn=..,resourcecontrol=..]: accepted;
                        Kestrel's filters deny all of those calls]
  -h, --help            print this help
  -V, --version         print the version

QEMU's device options (key=value or libvirt's JSON form):
  -drive file=F,if=virtio,format=raw[,readonly=on][,cache=none|writeback][,serial=S]
  -drive file=F,if=none,id=D,...  or  -blockdev driver=file,node-name=N,filename=F [-blockdev driver=raw,...]
  -device virtio-blk-pci|virtio-blk-device,drive=D[,serial=S][,id=ID]
  -netdev tap,id=N,ifname=TAP,script=no,downscript=no -device virtio-net-pci|virtio-net-device,netdev=N[,mac=M]
  -object rng-random,id=R,filename=/dev/urandom -device virtio-rng-pci|virtio-rng-device[,rng=R]
  -chardev stdio|pty|null|file,path=P|socket,...,id=C -device virtio-serial-pci -device virtconsole,chardev=C
  -serial chardev:C
  (-pci devices sit on the PCI bus, -device ones on virtio-mmio; plain virtio-blk etc. take the machine's default)

Accepted for QEMU compatibility, with no effect: -nographic, -nodefaults, -no-user-config, -enable-kvm,
-accel kvm, -display none.
";

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Run(Box<VmConfig>),
    Help,
    Version,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CliError {
    #[error("unknown option '{0}' (see --help)")]
    UnknownOption(String),
    #[error("option '{0}' needs a value")]
    MissingValue(String),
    #[error("option '{0}' takes no value")]
    UnexpectedValue(String),
    #[error("option '{0}' given twice")]
    Repeated(String),
    #[error("invalid memory size '{0}': use a number of MiB or a size like 512M or 4G")]
    MemorySize(String),
    #[error("invalid number of CPUs '{0}': use a whole number from 1 to 255")]
    Cpus(String),
    #[error(
        "invalid serial mode '{0}': use stdio, pty, file:PATH, unix:PATH,server=on, tcp:HOST:PORT,server=on or none"
    )]
    Serial(String),
    #[error("--serial and --console cannot both use stdio: give one of them pty, file:PATH or none")]
    StdioTwice,
    #[error("invalid UUID '{0}': use the form 01234567-89ab-cdef-0123-456789abcdef")]
    Uuid(String),
    #[error("invalid {option} '{value}': {reason}")]
    Invalid { option: String, value: String, reason: String },
    #[error("unknown machine type '{0}': use pc, q35 or microvm (x86_64 hosts) or virt (aarch64 hosts)")]
    Machine(String),
    #[error("no kernel given: use --kernel PATH (see --help)")]
    NoKernel,
}

fn invalid(option: &str, value: &str, reason: impl Into<String>) -> CliError {
    CliError::Invalid { option: option.to_string(), value: value.to_string(), reason: reason.into() }
}

/// What an option means, whatever its spelling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Opt {
    Help,
    Version,
    Kernel,
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
    /// A QEMU option that changes nothing here; the value, if any, must be one that means what Kestrel does.
    Ignored,
}

/// (spellings, meaning, takes a value)
const OPTIONS: &[(&[&str], Opt, bool)] = &[
    (&["-h", "--help", "-help"], Opt::Help, false),
    (&["-V", "--version", "-version"], Opt::Version, false),
    (&["--kernel", "-kernel"], Opt::Kernel, true),
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
    (&["-nographic", "-nodefaults", "-no-user-config", "-enable-kvm"], Opt::Ignored, false),
    (&["-accel", "-display"], Opt::Ignored, true),
];

/// A QEMU option value: `first,key=value,key=value` where `,,` is a literal comma. Returns the leading item
/// without `=` (if any) and the key/value pairs; a bare `key` is `key=on`.
fn split_qemu_opts(text: &str) -> (Option<String>, Vec<(String, String)>) {
    let mut items = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                current.push(',');
            } else {
                items.push(std::mem::take(&mut current));
            }
        } else {
            current.push(c);
        }
    }
    items.push(current);
    let mut first = None;
    let mut pairs = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        match item.split_once('=') {
            Some((k, v)) => pairs.push((k.to_string(), v.to_string())),
            None if i == 0 => first = Some(item),
            None => pairs.push((item, "on".to_string())),
        }
    }
    (first, pairs)
}

fn on_off(option: &str, value: &str, key: &str, setting: &str) -> Result<bool, CliError> {
    match setting {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(invalid(option, value, format!("{key} must be on or off"))),
    }
}

fn parse_port(option: &str, value: &str, port: &str) -> Result<u16, CliError> {
    port.parse().ok().filter(|&p| p > 0).ok_or_else(|| invalid(option, value, format!("invalid port '{port}'")))
}

/// `unix:PATH,server=on,wait=off` or `tcp:HOST:PORT,server=on,wait=off` (also QEMU's older `server,nowait`).
fn parse_listen_socket(option: &str, value: &str) -> Result<ListenSocket, CliError> {
    let (first, pairs) = split_qemu_opts(value);
    let first = first.unwrap_or_default();
    let address = if let Some(path) = first.strip_prefix("unix:").filter(|p| !p.is_empty()) {
        SocketAddress::Unix(PathBuf::from(path))
    } else if let Some(host_port) = first.strip_prefix("tcp:") {
        let (host, port) = host_port.rsplit_once(':').ok_or_else(|| invalid(option, value, "use tcp:HOST:PORT"))?;
        let host = if host.is_empty() { "0.0.0.0" } else { host.trim_start_matches('[').trim_end_matches(']') };
        SocketAddress::Tcp(host.to_string(), parse_port(option, value, port)?)
    } else {
        return Err(invalid(option, value, "use unix:PATH or tcp:HOST:PORT"));
    };
    socket_settings(option, value, address, &pairs)
}

fn socket_settings(
    option: &str,
    value: &str,
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
fn parse_chardev(value: &str) -> Result<(String, SerialConfig), CliError> {
    let (backend, pairs) = split_qemu_opts(value);
    let get = |key: &str| pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    let id = get("id").filter(|id| !id.is_empty()).ok_or_else(|| invalid("-chardev", value, "id= is required"))?;
    let only = |allowed: &[&str]| match pairs.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
        Some((key, _)) => Err(invalid("-chardev", value, format!("unsupported setting '{key}'"))),
        None => Ok(()),
    };
    let config = match backend.as_deref() {
        Some("socket") => {
            let address = match (get("path").filter(|p| !p.is_empty()), get("port")) {
                (Some(path), None) => SocketAddress::Unix(PathBuf::from(path)),
                (None, Some(port)) => {
                    let host = get("host").filter(|h| !h.is_empty()).unwrap_or_else(|| "0.0.0.0".to_string());
                    SocketAddress::Tcp(host, parse_port("-chardev", value, &port)?)
                }
                _ => return Err(invalid("-chardev", value, "give path= (unix) or host= and port= (tcp)")),
            };
            SerialConfig::Socket(socket_settings("-chardev", value, address, &pairs)?)
        }
        Some("stdio") => only(&["id", "signal", "mux"]).map(|()| SerialConfig::Stdio)?,
        Some("pty") => only(&["id"]).map(|()| SerialConfig::Pty)?,
        Some("null") => only(&["id"]).map(|()| SerialConfig::None)?,
        Some("file") => {
            only(&["id", "path", "append"])?;
            let path =
                get("path").filter(|p| !p.is_empty()).ok_or_else(|| invalid("-chardev", value, "path= is required"))?;
            SerialConfig::File(PathBuf::from(path))
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

/// `path=FILE[,readonly=on][,serial=S][,direct=on]`, or just the path.
fn parse_disk(value: &str) -> Result<DiskConfig, CliError> {
    let (first, pairs) = split_qemu_opts(value);
    let mut disk = DiskConfig {
        path: first.map(PathBuf::from).unwrap_or_default(),
        read_only: false,
        serial: None,
        direct: false,
        frontend: Frontend::default(),
    };
    for (key, setting) in pairs {
        match key.as_str() {
            "path" | "file" => disk.path = PathBuf::from(setting),
            "readonly" => disk.read_only = on_off("--disk", value, &key, &setting)?,
            "direct" => disk.direct = on_off("--disk", value, &key, &setting)?,
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
    Ok(NetConfig { tap, mac, frontend: Frontend::default() })
}

/// `pc`, `q35`, `microvm`, `virt`, with QEMU's `type=` spelling and `accel=kvm`; the platform decides which it runs.
fn parse_machine(option: &str, value: &str) -> Result<MachineType, CliError> {
    let (first, pairs) = split_qemu_opts(value);
    let mut machine = first;
    for (key, setting) in pairs {
        match key.as_str() {
            "type" if machine.is_none() => machine = Some(setting),
            "accel" if setting == "kvm" => {}
            "accel" => return Err(invalid(option, value, "Kestrel only supports accel=kvm")),
            _ => return Err(invalid(option, value, format!("unsupported setting '{key}'"))),
        }
    }
    match machine.as_deref() {
        Some("pc") => Ok(MachineType::Pc),
        Some("q35") => Ok(MachineType::Q35),
        Some("microvm") => Ok(MachineType::Microvm),
        Some("virt") => Ok(MachineType::Virt),
        Some(other) => Err(CliError::Machine(other.to_string())),
        None => Err(invalid(option, value, "no machine type given")),
    }
}

/// `-m 512`, `-m 2G`, `-m size=2G,...`
fn parse_memory(value: &str) -> Result<u64, CliError> {
    let (first, pairs) = split_qemu_opts(value);
    let size = first.or_else(|| pairs.iter().find(|(k, _)| k == "size").map(|(_, v)| v.clone()));
    size.as_deref().and_then(parse_memory_size).ok_or_else(|| CliError::MemorySize(value.to_string()))
}

/// `-smp 4`, `-smp cpus=4,...`
fn parse_cpus(value: &str) -> Result<u8, CliError> {
    let (first, pairs) = split_qemu_opts(value);
    let count = first.or_else(|| pairs.iter().find(|(k, _)| k == "cpus").map(|(_, v)| v.clone()));
    count.and_then(|c| c.parse::<u8>().ok()).filter(|&n| n > 0).ok_or_else(|| CliError::Cpus(value.to_string()))
}

/// `-name NAME` or `-name guest=NAME,debug-threads=on,...`
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
        let allowed: &[&str] = match key.as_str() {
            "enable" => {
                enabled = Some(on_off(option, value, key, setting)?);
                continue;
            }
            "obsolete" | "spawn" | "resourcecontrol" => &["allow", "deny"],
            "elevateprivileges" => &["allow", "deny", "children"],
            _ => return Err(invalid(option, value, format!("unknown suboption '{key}'"))),
        };
        if !allowed.contains(&setting.as_str()) {
            return Err(invalid(option, value, format!("{key} must be {}", allowed.join(" or "))));
        }
    }
    enabled.ok_or_else(|| invalid(option, value, "use on or off"))
}

fn parse_name(value: &str) -> String {
    let (first, pairs) = split_qemu_opts(value);
    first.or_else(|| pairs.into_iter().find(|(k, _)| k == "guest").map(|(_, v)| v)).unwrap_or_default()
}

/// `stdio`, `pty`, `none`/`null`, `file:PATH`, or a listening socket as `--qmp` takes it
/// (`unix:PATH,server=on[,wait=off]`, `tcp:HOST:PORT,server=on[,wait=off]`).
fn parse_serial(option: &str, value: &str) -> Result<SerialConfig, CliError> {
    match value {
        "stdio" => Ok(SerialConfig::Stdio),
        "pty" => Ok(SerialConfig::Pty),
        "none" | "null" => Ok(SerialConfig::None),
        _ if value.starts_with("unix:") || value.starts_with("tcp:") => {
            parse_listen_socket(option, value).map(SerialConfig::Socket)
        }
        _ => match value.strip_prefix("file:") {
            Some(path) if !path.is_empty() => Ok(SerialConfig::File(PathBuf::from(path))),
            _ => Err(CliError::Serial(value.to_string())),
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

pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Command, CliError> {
    let mut kernel = None;
    let mut initrd = None;
    let mut cmdline = None;
    let mut memory = None;
    let mut cpus = None;
    let mut serial = None;
    let mut name = None;
    let mut uuid = None;
    let mut sandbox = None;
    let mut flags = (false, false, false); // no-reboot, no-shutdown, paused
    let mut qmp = Vec::new();
    let mut disks = Vec::new();
    let mut nets = Vec::new();
    let mut rng = false;
    let mut console = None;
    let mut machine = None;
    let mut chardevs: HashMap<String, SerialConfig> = HashMap::new();
    let mut monitors = Vec::new();
    let mut serial_chardev = None;
    let mut qemu_devices = QemuDeviceOptions::default();

    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (spelling, inline_value) = match arg.split_once('=') {
            Some((name, value)) if name.starts_with("--") => (name.to_string(), Some(value.to_string())),
            _ => (arg.clone(), None),
        };
        let &(_, opt, takes_value) = OPTIONS
            .iter()
            .find(|(names, _, _)| names.contains(&spelling.as_str()))
            .ok_or_else(|| CliError::UnknownOption(spelling.clone()))?;
        let value = match (takes_value, inline_value) {
            (true, Some(v)) => v,
            (true, None) => args.next().ok_or_else(|| CliError::MissingValue(spelling.clone()))?,
            (false, Some(_)) => return Err(CliError::UnexpectedValue(spelling)),
            (false, None) => String::new(),
        };
        match opt {
            Opt::Help => return Ok(Command::Help),
            Opt::Version => return Ok(Command::Version),
            Opt::Kernel => set_once(&mut kernel, &spelling, PathBuf::from(value))?,
            Opt::Machine => set_once(&mut machine, &spelling, parse_machine(&spelling, &value)?)?,
            Opt::Initrd => set_once(&mut initrd, &spelling, PathBuf::from(value))?,
            Opt::Cmdline => set_once(&mut cmdline, &spelling, value)?,
            Opt::Memory => set_once(&mut memory, &spelling, parse_memory(&value)?)?,
            Opt::Cpus => set_once(&mut cpus, &spelling, parse_cpus(&value)?)?,
            Opt::Serial => match value.strip_prefix("chardev:") {
                Some(id) => set_once(&mut serial_chardev, &spelling, (id.to_string(), value.clone()))?,
                None => set_once(&mut serial, &spelling, parse_serial(&spelling, &value)?)?,
            },
            Opt::Qmp => qmp.push(parse_listen_socket(&spelling, &value)?),
            Opt::Disk => disks.push(parse_disk(&value)?),
            Opt::Net => nets.push(parse_net(&value)?),
            Opt::Rng => rng = true,
            Opt::Drive => qemu_devices.drive(&value)?,
            Opt::Blockdev => qemu_devices.blockdev(&value)?,
            Opt::Netdev => qemu_devices.netdev(&value)?,
            Opt::Device => qemu_devices.device(&value)?,
            Opt::Object => qemu_devices.object(&value)?,
            Opt::Console => set_once(&mut console, &spelling, parse_serial(&spelling, &value)?)?,
            Opt::Chardev => {
                let (id, chardev) = parse_chardev(&value)?;
                if chardevs.insert(id.clone(), chardev).is_some() {
                    return Err(invalid("-chardev", &value, format!("id '{id}' is used twice")));
                }
            }
            Opt::Mon => monitors.push((parse_mon(&value)?, value)),
            Opt::Paused => flags.2 = true,
            Opt::NoReboot => flags.0 = true,
            Opt::NoShutdown => flags.1 = true,
            Opt::Name => set_once(&mut name, &spelling, parse_name(&value))?,
            Opt::Sandbox => set_once(&mut sandbox, &spelling, parse_sandbox(&spelling, &value)?)?,
            Opt::Uuid => set_once(&mut uuid, &spelling, parse_uuid(&value).ok_or(CliError::Uuid(value))?)?,
            Opt::Ignored => match (spelling.as_str(), value.as_str()) {
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
    if let Some((id, value)) = serial_chardev {
        set_once(&mut serial, "-serial", take_chardev("-serial", &id, &value)?)?;
    }
    let console = match (console, qemu.console) {
        (Some(backend), None) => Some(ConsoleConfig { backend, frontend: Frontend::default() }),
        (None, Some((id, frontend))) => {
            Some(ConsoleConfig { backend: take_chardev("-device", &id, "virtconsole")?, frontend })
        }
        (None, None) => None,
        (Some(_), Some(_)) => return Err(CliError::Repeated("--console / -device virtconsole".into())),
    };
    let rng = match (rng, qemu.rng) {
        (true, None) => Some(Frontend::default()),
        (false, rng) => rng,
        (true, Some(_)) => return Err(CliError::Repeated("--rng / -device virtio-rng".into())),
    };
    disks.extend(qemu.disks);
    nets.extend(qemu.nics);

    let mut config = VmConfig::new(kernel.ok_or(CliError::NoKernel)?);
    config.initrd = initrd;
    if let Some(cmdline) = cmdline {
        config.cmdline = Some(cmdline);
    }
    if let Some(memory) = memory {
        config.memory_bytes = memory;
    }
    if let Some(cpus) = cpus {
        config.vcpus = cpus;
    }
    if let Some(serial) = serial {
        config.serial = serial;
    }
    (config.no_reboot, config.no_shutdown, config.start_paused) = flags;
    config.qmp = qmp;
    config.disks = disks;
    config.nets = nets;
    config.rng = rng;
    config.machine = machine;
    if console.as_ref().is_some_and(|c| c.backend == SerialConfig::Stdio) && config.serial == SerialConfig::Stdio {
        return Err(CliError::StdioTwice);
    }
    config.console = console;
    config.name = name;
    config.uuid = uuid;
    config.sandbox = sandbox.unwrap_or(true);
    Ok(Command::Run(Box::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::VirtioTransport;
    use crate::config::DEFAULT_MEMORY_BYTES;

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
    fn full_native_command_line() {
        let config = config(
            "--kernel vmlinux --initrd initrd.img --memory 2G --cpus 4 --serial file:/tmp/out --no-reboot \
             --qmp unix:/tmp/q.sock,server=on,wait=off --paused --no-shutdown --name web1 \
             --uuid 3A0F5C9E-1B2C-4D5E-8F90-A1B2C3D4E5F6",
        );
        assert_eq!(config.kernel, PathBuf::from("vmlinux"));
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
        assert_eq!(config.kernel, PathBuf::from("bzImage"));
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
        ] {
            assert_eq!(config(&format!("--kernel k {args}")).machine, Some(machine), "{args}");
        }
        for bad in ["-machine pc,accel=tcg", "-machine pc,usb=on", "-machine accel=kvm", "-M microvm,pit=off"] {
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
                    read_only: true,
                    serial: Some("disk-a".into()),
                    direct: false,
                    frontend: Frontend::default()
                },
                disk("/b.img", false, true, Frontend::default()),
            ]
        );
        assert_eq!(config.rng, Some(Frontend::default()));
        assert_eq!(config.console, None);
        let with_console = super::parse(["--kernel", "k", "--serial", "none", "--console", "stdio"].map(String::from));
        let Ok(Command::Run(with_console)) = with_console else { panic!("expected a run command") };
        let stdio = ConsoleConfig { backend: SerialConfig::Stdio, frontend: Frontend::default() };
        assert_eq!(with_console.console, Some(stdio));
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
        DiskConfig { path: path.into(), read_only, serial: None, direct, frontend }
    }

    fn pci(id: Option<&str>) -> Frontend {
        Frontend { transport: Some(VirtioTransport::Pci), id: id.map(String::from) }
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
        let mmio = Frontend { transport: Some(VirtioTransport::Mmio), id: None };
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
        assert_eq!(config.disks, vec![disk("/var/lib/libvirt/images/vm.img", false, false, pci(Some("virtio-disk0")))]);
        assert_eq!(config.rng, Some(pci(Some("rng0"))));
    }

    #[test]
    fn qemu_netdev_and_nic() {
        let config = config(
            "-kernel k -netdev tap,id=n0,ifname=ktap0,script=no,downscript=no,vhost=off \
             -device virtio-net-pci,netdev=n0,mac=52:54:00:aa:bb:cc,id=net0",
        );
        let mac = Some(MacAddress([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]));
        assert_eq!(config.nets, vec![NetConfig { tap: "ktap0".into(), mac, frontend: pci(Some("net0")) }]);
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
        let console = config.console.unwrap();
        let socket = ListenSocket { address: SocketAddress::Unix("/tmp/con.sock".into()), wait: false };
        assert_eq!(console.backend, SerialConfig::Socket(socket));
        assert_eq!(console.frontend, pci(Some("vser0")));
        assert_eq!(config.qmp.len(), 1);
    }

    #[test]
    fn qemu_device_mistakes_are_named() {
        for (args, needle) in [
            ("-drive file=/a.img", "only if=virtio"),
            ("-drive file=/a.img,if=virtio,format=qcow2", "format=raw"),
            ("-drive file=/a.img,if=none", "id="),
            ("-drive file=/a.img,if=none,id=d0", "no -device uses it"),
            ("-device virtio-blk-pci,drive=nope", "no -drive or -blockdev named 'nope'"),
            ("-drive file=/a,if=none,id=d0 -device virtio-blk-pci,drive=d0 -device virtio-blk-pci,drive=d0", "in use"),
            ("-device e1000,netdev=n0", "device 'e1000' is not supported"),
            ("-device virtio-blk-pci,drive=d0,frobnicate=1 -drive file=/a,if=none,id=d0", "unsupported setting"),
            ("-netdev user,id=n0", "user networking"),
            ("-netdev tap,id=n0,ifname=t0,script=/etc/qemu-ifup", "script=no"),
            ("-netdev tap,id=n0,ifname=t0,vhost=on", "vhost"),
            ("-netdev tap,id=n0,fd=3", "'fd' is not supported"),
            ("-device virtio-net-pci,netdev=n9", "no -netdev with id 'n9'"),
            ("-device virtconsole,chardev=c0", "no -chardev"),
            ("-chardev stdio,id=c0 -device virtconsole,chardev=c0", "virtio-serial"),
            ("-object memory-backend-ram,id=m0", "not supported"),
            ("-device virtio-rng-pci,rng=r9", "no -object with id 'r9'"),
            ("-blockdev {\"driver\":", "bad JSON"),
            ("-blockdev driver=qcow2,node-name=q", "driver 'qcow2'"),
            ("-chardev socket,id=m0,path=/tmp/x,server=on -mon chardev=m1,mode=control", "no unused -chardev"),
            ("-chardev pty,id=m0 -mon chardev=m0,mode=control", "socket chardev"),
            ("--rng -device virtio-rng-pci", "given twice"),
        ] {
            let args = format!("--kernel k {args}");
            let err = parse_str(&args).expect_err(&args).to_string();
            assert!(err.contains(needle), "{args}: {err}");
        }
    }

    #[test]
    fn consoles_on_listening_sockets() {
        let config =
            config("--kernel k --serial tcp:127.0.0.1:4555,server=on,wait=off --console unix:/tmp/c.sock,server");
        let tcp = SocketAddress::Tcp("127.0.0.1".into(), 4555);
        assert_eq!(config.serial, SerialConfig::Socket(ListenSocket { address: tcp, wait: false }));
        let unix = SocketAddress::Unix("/tmp/c.sock".into());
        let socket = SerialConfig::Socket(ListenSocket { address: unix, wait: true });
        assert_eq!(config.console.map(|c| c.backend), Some(socket));
    }

    #[test]
    fn network_devices_on_taps() {
        let config = config("--kernel k --net tap=tap0 --net tap=kestrel1,mac=52:54:00:AB:cd:01");
        assert_eq!(
            config.nets,
            vec![
                NetConfig { tap: "tap0".into(), mac: None, frontend: Frontend::default() },
                NetConfig {
                    tap: "kestrel1".into(),
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
            "--kernel k -chardev socket,id=a,path=/x,server=on -chardev socket,id=a,path=/y,server=on",
            "--kernel k -accel tcg",
            "--kernel k -display gtk",
        ];
        for args in invalid_cases {
            assert!(matches!(parse_str(args), Err(CliError::Invalid { .. })), "{args:?}: {:?}", parse_str(args));
        }
    }
}

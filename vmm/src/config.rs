//! What the user asked for, independent of how they spelled it on the command line.

use std::path::PathBuf;

pub use devices::virtio::net::MacAddress;

/// Where a guest character device (the first serial port, the virtio console) goes on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialConfig {
    /// The terminal Kestrel runs in: output to stdout, input from stdin.
    Stdio,
    /// A new pseudo-terminal whose path is printed at startup.
    Pty,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// Not connected: output is dropped.
    None,
    /// A socket Kestrel listens on; one client at a time is the console (output it missed is dropped, as with
    /// QEMU's `server=on` sockets).
    Socket(ListenSocket),
}

/// The machine types `--machine` names. Each host architecture's platform accepts its own (pc, q35 and microvm on
/// x86_64, virt on aarch64) and derives the virtio transport from it; `none` is on every host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MachineType {
    Pc,
    Q35,
    Microvm,
    Virt,
    /// QEMU's `none`: no guest at all (no RAM, no vCPUs, no devices), only the monitor. What libvirt starts to
    /// probe a binary's capabilities.
    None,
}

impl MachineType {
    pub const ALL: [MachineType; 5] =
        [MachineType::Pc, MachineType::Q35, MachineType::Microvm, MachineType::Virt, MachineType::None];

    /// QEMU's name for it (an alias of the versioned name, where there is one).
    pub fn name(self) -> &'static str {
        match self {
            MachineType::Pc => "pc",
            MachineType::Q35 => "q35",
            MachineType::Microvm => "microvm",
            MachineType::Virt => "virt",
            MachineType::None => "none",
        }
    }

    /// The versioned name QEMU gives the machine of the release Kestrel answers as (`qmp::ServerInfo::kestrel`),
    /// which libvirt writes into domains (`pc-q35-7.2`); `None` for the types QEMU does not version.
    pub fn versioned_name(self) -> Option<String> {
        let info = qmp::ServerInfo::kestrel();
        let family = match self {
            MachineType::Pc => "pc-i440fx",
            MachineType::Q35 => "pc-q35",
            MachineType::Virt => "virt",
            MachineType::Microvm | MachineType::None => return None,
        };
        Some(format!("{family}-{}.{}", info.major, info.minor))
    }

    /// The machine type `-machine` names, by its name or its versioned name.
    pub fn from_qemu_name(name: &str) -> Option<MachineType> {
        Self::ALL.into_iter().find(|m| m.name() == name || m.versioned_name().as_deref() == Some(name))
    }
}

/// How the guest reaches a virtio device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VirtioTransport {
    /// A function on the PCI bus, with MSI-X (QEMU's `virtio-*-pci`; the default on `pc`/`q35`).
    #[default]
    Pci,
    /// A virtio-mmio window (QEMU's `virtio-*-device`; the default on `microvm`), announced in ACPI or the FDT.
    Mmio,
}

/// The guest-visible side of a virtio device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frontend {
    /// `None`: the machine type's default transport.
    pub transport: Option<VirtioTransport>,
    /// The device's `id=` (QEMU's qdev id), shown by QMP.
    pub id: Option<String>,
    /// QEMU's `bootindex=`: where the device comes in the firmware's boot order (lowest first); only PCI devices
    /// get there (fw_cfg's `bootorder`, which SeaBIOS reads).
    pub boot_index: Option<u32>,
}

/// A virtio-blk disk on a raw image file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
    /// Reported to the guest as the disk's serial number (at most 20 bytes).
    pub serial: Option<String>,
    /// Open the image with O_DIRECT, bypassing the host's page cache.
    pub direct: bool,
    pub frontend: Frontend,
}

/// The virtio-serial device (QEMU's `virtio-serial-pci`/`-device`): its ports, each on a host stream of its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtioSerialConfig {
    pub frontend: Frontend,
    /// Port numbers run from 0 to `max_ports - 1` (QEMU's `max_ports`); 1 is the single-port console, without
    /// VIRTIO_CONSOLE_F_MULTIPORT (`--console`).
    pub max_ports: u32,
    /// In command-line order, with distinct numbers and names.
    pub ports: Vec<SerialPortConfig>,
}

impl VirtioSerialConfig {
    /// `--console MODE`: the single-port console, the guest's hvc0.
    pub fn single_console(backend: SerialConfig) -> Self {
        let port = SerialPortConfig { nr: 0, name: None, console: true, backend, chardev: None, id: None };
        VirtioSerialConfig { frontend: Frontend::default(), max_ports: 1, ports: vec![port] }
    }
}

/// A port of the virtio-serial device: a console (QEMU's `virtconsole`, the guest's hvcN) or a named port (QEMU's
/// `virtserialport`, the guest's /dev/vportNpM).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SerialPortConfig {
    pub nr: u32,
    /// What the guest finds in `/sys/class/virtio-ports/*/name` (`name=`).
    pub name: Option<String>,
    pub console: bool,
    pub backend: SerialConfig,
    /// The `-chardev` id, which names the port in messages.
    pub chardev: Option<String>,
    /// The port device's `id=`.
    pub id: Option<String>,
}

/// A virtio-net device on a host tap interface (QEMU's `-netdev tap,ifname=NAME` or `-netdev tap,fd=N` with
/// `-device virtio-net-...,mac=MAC`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub tap: TapConfig,
    /// The guest's MAC address; by default 52:54:00:12:34:56 for the first network device, :57 for the next...
    pub mac: Option<MacAddress>,
    pub frontend: Frontend,
}

/// Where a network device's tap interface comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TapConfig {
    /// The tap interface of this name, created if it does not exist (`--net tap=NAME`, `-netdev tap,ifname=NAME`).
    Named(String),
    /// A tap another process created and attached, on a descriptor Kestrel inherited (`-netdev tap,fd=N`: libvirt
    /// creates a domain's tap itself and passes it).
    Inherited(std::os::fd::RawFd),
}

impl std::fmt::Display for TapConfig {
    /// As the option that gave it: `tap=NAME` or `tap,fd=N`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TapConfig::Named(name) => write!(f, "tap={name}"),
            TapConfig::Inherited(fd) => write!(f, "tap,fd={fd}"),
        }
    }
}

/// Where a control socket listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketAddress {
    Unix(PathBuf),
    /// Host name or address, and port; QEMU's `tcp:HOST:PORT`.
    Tcp(String, u16),
    /// A socket that already listens, on a descriptor Kestrel inherited (QEMU's `-chardev socket,fd=N`, as libvirt
    /// passes the monitor it bound itself).
    Inherited(i32),
}

impl std::fmt::Display for SocketAddress {
    /// QEMU's spelling, as `query-chardev` reports it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SocketAddress::Unix(path) => write!(f, "unix:{}", path.display()),
            SocketAddress::Tcp(host, port) => write!(f, "tcp:{host}:{port}"),
            SocketAddress::Inherited(fd) => write!(f, "fd:{fd}"),
        }
    }
}

/// A socket Kestrel listens on (a QMP monitor, a console).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenSocket {
    pub address: SocketAddress,
    /// Wait for a client to connect before starting the guest (QEMU's `wait=on`).
    pub wait: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// The kernel to boot; `None` on the guest-less `none` machine and when firmware boots instead (`bios`).
    pub kernel: Option<PathBuf>,
    /// The firmware image to boot instead of a kernel (`-bios`).
    pub bios: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// The kernel command line; `None`: the platform's default, which names its serial console.
    pub cmdline: Option<String>,
    pub memory_bytes: u64,
    pub vcpus: u8,
    /// The CPU model guests see (`-cpu`).
    pub cpu: CpuConfig,
    pub serial: SerialConfig,
    /// The `-chardev` id the serial port is connected to, which `query-chardev` reports as its label; `None`:
    /// QEMU's label for `-serial`, `serial0`.
    pub serial_chardev: Option<String>,
    /// The serial port was given as QEMU's `-device isa-serial` (COM1), which only a machine with an ISA bus has;
    /// with the device's `id=`, if it has one.
    pub serial_on_isa: Option<Option<String>>,
    /// Guest memory is in Kestrel's core dumps (QEMU's `-machine dump-guest-core=on`, the default).
    pub dump_guest_core: bool,
    /// Firmware boots only the devices in the boot order (`bootindex=`), none other (QEMU's `-boot strict=on`); with
    /// no device in it, this changes nothing.
    pub strict_boot: bool,
    /// Exit instead of resetting when the guest reboots.
    pub no_reboot: bool,
    /// Stay alive, stopped, when the guest powers off (QEMU's `-no-shutdown`).
    pub no_shutdown: bool,
    /// Start with the vCPUs stopped until `cont` (QEMU's `-S`).
    pub start_paused: bool,
    pub qmp: Vec<ListenSocket>,
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    /// A virtio-rng device fed from the host's getrandom.
    pub rng: Option<Frontend>,
    /// The virtio-serial device: the virtio console (`--console`) or QEMU's `virtio-serial` with its ports.
    pub virtio_serial: Option<VirtioSerialConfig>,
    /// A virtio-balloon device (`--balloon`, `-device virtio-balloon-*`).
    pub balloon: Option<BalloonConfig>,
    /// The machine type asked for (`--machine`); `None` is the platform's default. It picks the transport virtio
    /// devices use unless told otherwise.
    pub machine: Option<MachineType>,
    pub name: Option<String>,
    /// Canonical lower-case 8-4-4-4-12 form.
    pub uuid: Option<String>,
    /// Each thread confined by a seccomp filter (`--sandbox on`, the default).
    pub sandbox: bool,
    /// Restore the machine from a snapshot instead of booting the kernel (`-incoming`, `--restore PATH`).
    pub incoming: Option<Incoming>,
    /// Run in the background (QEMU's `-daemonize`): the command returns once the monitors listen and the pid file
    /// is written, and the daemon's stdin, stdout and stderr are /dev/null.
    pub daemonize: bool,
    /// Where to write Kestrel's process id (QEMU's `-pidfile`), locked while it runs and removed when it exits.
    pub pidfile: Option<PathBuf>,
}

/// The CPU model asked for (`-cpu MODEL,FEATURE=on|off,...`) and its sockets (`-smp`), checked against the host when the machine is built
/// (`cpu_model::resolve`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuConfig {
    /// `None`: the host's CPU, as `host` names it.
    pub model: Option<String>,
    /// Features by QEMU's names, turned on (`true`) or off, in the order given: a later setting wins.
    pub features: Vec<(String, bool)>,
    /// The sockets the vCPUs are spread over (`-smp ...,sockets=N`), an equal number of cores in each.
    pub sockets: u8,
}

impl Default for CpuConfig {
    /// The host's CPU, one socket.
    fn default() -> Self {
        CpuConfig { model: None, features: Vec::new(), sockets: 1 }
    }
}

/// A virtio-balloon device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BalloonConfig {
    pub frontend: Frontend,
    /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM (QEMU's `deflate-on-oom=on`, libvirt's `autodeflate='on'`).
    pub deflate_on_oom: bool,
    /// Seconds between guest statistics polls from the start (QEMU's `guest-stats-polling-interval`); 0: none
    /// until QMP sets one.
    pub stats_poll_interval: u32,
}

/// Where a restore's snapshot comes from (`-incoming`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Incoming {
    /// `file:PATH`, `--restore PATH`: a snapshot file, checked against the machine before anything runs.
    File(PathBuf),
    /// `fd:N`: a stream (a pipe) on descriptor N, which Kestrel inherited; read once, front to back.
    Fd(i32),
    /// `defer`: QMP `migrate-incoming` names the source later; the machine waits in `inmigrate` until then.
    Defer,
}

impl VmConfig {
    /// A configuration with every optional setting at its default.
    pub fn new(kernel: PathBuf) -> Self {
        Self::with_kernel(Some(kernel))
    }

    /// A configuration booting the firmware image `bios` instead of a kernel, every other setting at its default.
    pub fn firmware(bios: PathBuf) -> Self {
        VmConfig { bios: Some(bios), ..Self::with_kernel(None) }
    }

    /// The guest-less `none` machine with every other setting at its default.
    pub fn guestless() -> Self {
        VmConfig { machine: Some(MachineType::None), ..Self::with_kernel(None) }
    }

    fn with_kernel(kernel: Option<PathBuf>) -> Self {
        VmConfig {
            kernel,
            bios: None,
            initrd: None,
            cmdline: None,
            memory_bytes: DEFAULT_MEMORY_BYTES,
            vcpus: 1,
            cpu: CpuConfig::default(),
            serial: SerialConfig::Stdio,
            serial_chardev: None,
            serial_on_isa: None,
            dump_guest_core: true,
            strict_boot: false,
            no_reboot: false,
            no_shutdown: false,
            start_paused: false,
            qmp: Vec::new(),
            disks: Vec::new(),
            nets: Vec::new(),
            rng: None,
            virtio_serial: None,
            balloon: None,
            machine: None,
            name: None,
            uuid: None,
            sandbox: true,
            incoming: None,
            daemonize: false,
            pidfile: None,
        }
    }
}

/// Accepts a UUID in the 8-4-4-4-12 hex form QEMU takes, returning it in lower case.
pub fn parse_uuid(text: &str) -> Option<String> {
    let groups: Vec<&str> = text.split('-').collect();
    let lengths_match = groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12]);
    let all_hex = groups.iter().all(|g| g.chars().all(|c| c.is_ascii_hexdigit()));
    (lengths_match && all_hex).then(|| text.to_ascii_lowercase())
}

pub const DEFAULT_MEMORY_BYTES: u64 = 512 << 20;
/// Below this the boot structures, a kernel and a stack cannot all fit.
pub const MIN_MEMORY_BYTES: u64 = 4 << 20;

/// Parses a memory size the way QEMU's `-m` does: a plain number is MiB; suffixes K, M, G, T (optionally followed
/// by "iB" or "B") are binary multiples. Returns None for anything else, including overflow and zero.
pub fn parse_memory_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let digits_end = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, suffix) = text.split_at(digits_end);
    let number: u64 = number.parse().ok()?;
    let unit = suffix.strip_suffix("iB").or_else(|| suffix.strip_suffix('B')).unwrap_or(suffix);
    if unit.is_empty() && !suffix.is_empty() {
        return None;
    }
    let shift = match unit {
        "" | "M" | "m" => 20,
        "K" | "k" => 10,
        "G" | "g" => 30,
        "T" | "t" => 40,
        _ => return None,
    };
    let bytes = number.checked_mul(1u64 << shift)?;
    (bytes > 0).then_some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_qemu() {
        assert_eq!(parse_memory_size("512"), Some(512 << 20));
        assert_eq!(parse_memory_size("512M"), Some(512 << 20));
        assert_eq!(parse_memory_size("6G"), Some(6 << 30));
        assert_eq!(parse_memory_size("6GiB"), Some(6 << 30));
        assert_eq!(parse_memory_size("65536K"), Some(64 << 20));
        assert_eq!(parse_memory_size("1T"), Some(1 << 40));
    }

    #[test]
    fn uuids_in_qemus_form() {
        assert_eq!(
            parse_uuid("3A0F5C9E-1B2C-4D5E-8F90-A1B2C3D4E5F6").as_deref(),
            Some("3a0f5c9e-1b2c-4d5e-8f90-a1b2c3d4e5f6")
        );
        for bad in [
            "",
            "3a0f5c9e1b2c4d5e8f90a1b2c3d4e5f6",
            "3a0f5c9e-1b2c-4d5e-8f90-a1b2c3d4e5f",
            "zz0f5c9e-1b2c-4d5e-8f90-a1b2c3d4e5f6",
        ] {
            assert_eq!(parse_uuid(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn malformed_sizes_are_refused() {
        for bad in ["", "M", "12B", "12iB", "-1", "1.5G", "12X", "0", "0G", "99999999999999999999", "16777216T", "1 G"]
        {
            assert_eq!(parse_memory_size(bad), None, "{bad:?}");
        }
    }
}

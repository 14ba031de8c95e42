//! QEMU's device options: `-drive`, `-blockdev`, `-netdev`, `-object`, `-device`, in their `key=value` form or
//! libvirt's JSON form. They name each other (`-device virtio-blk-pci,drive=d0` uses `-drive ...,id=d0`), so they are
//! collected as given and resolved into Kestrel's device configuration once the whole command line has been read.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use serde_json::Value;

use super::{duplicate_id, invalid, on_off, split_qemu_opts_os, CliError};
use crate::config::{
    BalloonConfig, DiskConfig, Frontend, MacAddress, NetConfig, SerialConfig, SerialPortConfig, TapConfig,
    VirtioSerialConfig, VirtioTransport,
};
use devices::virtio::console::{DEFAULT_MAX_PORTS, MAX_NAME_LEN, MAX_PORTS_LIMIT};

/// A parsed option value: the leading item without `=` (QEMU's implied key: a `-device` driver, a `-netdev` type),
/// then the `key=value` pairs in order. JSON values are flattened: nested objects give dotted keys (`file.filename`),
/// booleans `on`/`off`. The settings that name host files (`path_keys`) keep their bytes in `paths`, as a path need
/// not be UTF-8; every other key and value must be text.
#[derive(Debug, Default)]
pub(super) struct Opts {
    pub(super) first: Option<String>,
    pub(super) pairs: Vec<(String, String)>,
    paths: Vec<(String, OsString)>,
}

impl Opts {
    /// The `key=value` form or libvirt's JSON form.
    pub(super) fn parse(option: &str, value: &OsStr, implied_key: &str, path_keys: &[&str]) -> Result<Opts, CliError> {
        let mut opts = if is_json(value) {
            Self::parse_json(option, value, path_keys)?
        } else {
            Self::split(option, value, implied_key, path_keys)?
        };
        opts.take_implied(implied_key);
        Ok(opts)
    }

    /// The `key=value` form only. A leading item goes to `first`, or to `paths` under `implied_key` if that names
    /// a file.
    pub(super) fn split(option: &str, value: &OsStr, implied_key: &str, path_keys: &[&str]) -> Result<Opts, CliError> {
        let (first, raw_pairs) = split_qemu_opts_os(value);
        let mut opts = Opts::default();
        if let Some(first) = first {
            if path_keys.contains(&implied_key) {
                opts.paths.push((implied_key.to_string(), first));
            } else {
                let text = first.to_str().ok_or_else(|| invalid(option, value, "the first item is not valid UTF-8"))?;
                opts.first = Some(text.to_string());
            }
        }
        for (key, setting) in raw_pairs {
            let key = key.into_string().map_err(|_| invalid(option, value, "a setting's name is not valid UTF-8"))?;
            opts.add(option, value, key, setting, path_keys)?;
        }
        Ok(opts)
    }

    fn parse_json(option: &str, value: &OsStr, path_keys: &[&str]) -> Result<Opts, CliError> {
        let text = value.to_str().ok_or_else(|| invalid(option, value, "the JSON form must be UTF-8"))?;
        let json: Value = serde_json::from_str(text).map_err(|e| invalid(option, text, format!("bad JSON: {e}")))?;
        let Value::Object(map) = json else {
            return Err(invalid(option, text, "the JSON form must be an object"));
        };
        let mut flat = Vec::new();
        flatten(option, text, "", &Value::Object(map), &mut flat)?;
        let mut opts = Opts::default();
        for (key, setting) in flat {
            opts.add(option, value, key, OsString::from(setting), path_keys)?;
        }
        Ok(opts)
    }

    fn add(
        &mut self,
        option: &str,
        value: &OsStr,
        key: String,
        setting: OsString,
        path_keys: &[&str],
    ) -> Result<(), CliError> {
        if path_keys.contains(&key.as_str()) {
            self.paths.push((key, setting));
            return Ok(());
        }
        match setting.into_string() {
            Ok(text) => self.pairs.push((key, text)),
            Err(_) => return Err(invalid(option, value, format!("{key}= is not valid UTF-8"))),
        }
        Ok(())
    }

    /// `driver=virtio-blk-pci` spelled out means the same as the leading `virtio-blk-pci`.
    fn take_implied(&mut self, implied_key: &str) {
        if self.first.is_none() {
            if let Some(at) = self.pairs.iter().position(|(k, _)| k == implied_key) {
                self.first = Some(self.pairs.remove(at).1);
            }
        }
    }

    pub(super) fn get(&self, key: &str) -> Option<&str> {
        self.pairs.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// The last of the file-naming settings `keys` given, as its bytes.
    pub(super) fn last_path(&self, keys: &[&str]) -> Option<&OsStr> {
        self.paths.iter().rev().find(|(k, _)| keys.contains(&k.as_str())).map(|(_, v)| v.as_os_str())
    }

    /// A file-naming setting (the last one given), as its bytes.
    pub(super) fn path(&self, key: &str) -> Option<&OsStr> {
        self.paths.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_os_str())
    }
}

fn flatten(
    option: &str,
    text: &str,
    prefix: &str,
    value: &Value,
    out: &mut Vec<(String, String)>,
) -> Result<(), CliError> {
    match value {
        Value::Object(map) => {
            for (key, member) in map {
                let key = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
                flatten(option, text, &key, member, out)?;
            }
        }
        Value::Bool(b) => out.push((prefix.to_string(), if *b { "on" } else { "off" }.to_string())),
        Value::Number(n) => out.push((prefix.to_string(), n.to_string())),
        Value::String(s) => out.push((prefix.to_string(), s.clone())),
        Value::Null | Value::Array(_) => {
            return Err(invalid(option, text, format!("'{prefix}' must be a string, number, boolean or object")))
        }
    }
    Ok(())
}

/// Settings QEMU accepts that change nothing for Kestrel's devices: guest-visible placement Kestrel chooses itself
/// (`bus`, `addr`), and tuning with one possible value here.
const IGNORED_DEVICE_KEYS: &[&str] = &["bus", "addr", "multifunction", "romfile", "rombar"];
/// Settings every device takes besides its own: its id and its place in the firmware's boot order.
const COMMON_DEVICE_KEYS: &[&str] = &["id", "bootindex"];

/// `bootindex=`: QEMU's non-negative 32-bit number (-1, QEMU's "none", is the same as leaving it out).
fn boot_index(value: &str, setting: Option<&str>) -> Result<Option<u32>, CliError> {
    match setting {
        None | Some("-1") => Ok(None),
        Some(text) => text.parse::<i32>().ok().and_then(|n| u32::try_from(n).ok()).map(Some).ok_or_else(|| {
            invalid("-device", value, format!("bootindex={text}: expected a number from 0 to 2147483647, or -1"))
        }),
    }
}

/// A device `-device` creates: its model (the driver, less the `-pci`/`-device` transport suffix of a virtio
/// device) and the settings it takes, each with its QEMU property type. What QMP's probe answers
/// (`qom-list-types`, `device-list-properties`) are generated from this table, so they claim nothing the command
/// line refuses.
pub struct DeviceModel {
    pub model: &'static str,
    pub kind: DeviceKind,
    pub properties: &'static [(&'static str, &'static str)],
}

/// Where a device model sits, which decides its QOM type's name and parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// A virtio device, named `<model>-pci` on PCI and `<model>-device` on virtio-mmio.
    Virtio,
    /// A port on a virtio-serial controller.
    VirtioSerialPort,
    /// A device on the PC's ISA bus (the 16550A UART).
    Isa,
}

pub const DEVICE_MODELS: &[DeviceModel] = &[
    DeviceModel {
        model: "virtio-blk",
        kind: DeviceKind::Virtio,
        properties: &[
            ("drive", "str"),
            ("serial", "str"),
            ("num-queues", "uint16"),
            ("config-wce", "bool"),
            ("scsi", "bool"),
            ("write-cache", "OnOffAuto"),
        ],
    },
    DeviceModel {
        model: "virtio-net",
        kind: DeviceKind::Virtio,
        properties: &[("netdev", "str"), ("mac", "str"), ("mq", "bool")],
    },
    DeviceModel { model: "virtio-rng", kind: DeviceKind::Virtio, properties: &[("rng", "link<rng-backend>")] },
    DeviceModel {
        model: "virtio-balloon",
        kind: DeviceKind::Virtio,
        properties: &[("deflate-on-oom", "bool"), ("guest-stats-polling-interval", "int")],
    },
    DeviceModel { model: "virtio-serial", kind: DeviceKind::Virtio, properties: &[("max_ports", "uint32")] },
    DeviceModel {
        model: VIRTCONSOLE,
        kind: DeviceKind::VirtioSerialPort,
        properties: &[("chardev", "str"), ("nr", "uint32"), ("name", "str")],
    },
    DeviceModel {
        model: VIRTSERIALPORT,
        kind: DeviceKind::VirtioSerialPort,
        properties: &[("chardev", "str"), ("nr", "uint32"), ("name", "str")],
    },
    // COM1, the one UART (x86_64 only: `ISA_SERIAL` keeps it out of other platforms' tables).
    DeviceModel { model: ISA_SERIAL, kind: DeviceKind::Isa, properties: &[("chardev", "str"), ("index", "uint32")] },
];

/// Settings taken only with the values the device honours, as QEMU would behave with them; any other value is
/// refused, not ignored (the probe advertises these settings, and libvirt uses what it is offered). Boolean
/// spellings as QEMU accepts them.
const HONOURED_VALUES: &[(&str, &str, &[&str])] = &[
    ("virtio-blk", "num-queues", &["1"]),
    // No VIRTIO_BLK_F_CONFIG_WCE, and no SCSI passthrough.
    ("virtio-blk", "config-wce", &["off", "false", "no"]),
    ("virtio-blk", "scsi", &["off", "false", "no"]),
    // FLUSH is offered: the guest sees a write-back cache and flushes it.
    ("virtio-blk", "write-cache", &["on", "true", "yes", "auto"]),
    ("virtio-net", "mq", &["off", "false", "no"]),
];

/// QEMU's console port on a virtio-serial controller (the guest's hvcN).
pub const VIRTCONSOLE: &str = "virtconsole";
/// QEMU's named port on a virtio-serial controller (the guest's /dev/vportNpM; libvirt's `<channel>`).
pub const VIRTSERIALPORT: &str = "virtserialport";

/// QEMU's 16550A on the ISA bus, as libvirt asks for a `<serial>` on a PC: Kestrel's COM1.
pub const ISA_SERIAL: &str = "isa-serial";

/// The `-object` types Kestrel creates (entropy sources for virtio-rng).
pub const OBJECT_TYPES: &[&str] = &["rng-random", "rng-builtin"];

fn model_settings(model: &str) -> impl Iterator<Item = &'static str> + '_ {
    DEVICE_MODELS.iter().filter(move |m| m.model == model).flat_map(|m| m.properties.iter().map(|(name, _)| *name))
}

/// A host image as `-drive if=none` or `-blockdev` describes it, waiting for the `-device` that uses it.
#[derive(Clone, Debug)]
struct BlockBackend {
    path: PathBuf,
    read_only: bool,
    direct: bool,
    serial: Option<String>,
    used: bool,
}

/// The devices QEMU's options describe, in command-line order per kind.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct QemuDevices {
    pub disks: Vec<DiskConfig>,
    pub nics: Vec<NetConfig>,
    pub rng: Option<Frontend>,
    pub balloon: Option<BalloonConfig>,
    /// The virtio-serial controller and its ports, numbered; each port's `backend` is still
    /// [`SerialConfig::None`] with its chardev id in `chardev`, connected by the caller.
    pub virtio_serial: Option<VirtioSerialConfig>,
    /// The chardev id `-device isa-serial` (COM1) is connected to, and the device's id.
    pub isa_serial: Option<(String, Option<String>)>,
}

/// Everything given so far, unresolved.
#[derive(Debug, Default)]
pub struct QemuDeviceOptions {
    /// `-drive if=virtio` disks: complete devices on their own, in order.
    drives: Vec<DiskConfig>,
    /// Backends by id (`-drive if=none,id=`) or node name (`-blockdev`); `-blockdev` format nodes point at
    /// protocol nodes, resolved when a device uses them.
    backends: HashMap<String, BlockBackend>,
    /// `-blockdev driver=raw,file=NODE`: format node name → protocol node name.
    format_nodes: HashMap<String, (String, bool)>,
    /// Every `-drive id=`, whatever its interface: QEMU's "drive" option group.
    drive_ids: Vec<String>,
    /// Every `-blockdev node-name=`.
    node_names: Vec<String>,
    /// `-netdev` taps by id, and whether a device uses each yet.
    netdevs: HashMap<String, (TapConfig, bool)>,
    /// `-object` ids, and whether each was given in the JSON form.
    rng_objects: Vec<(String, bool)>,
    /// `-object secret` ids (accepted, unused).
    secrets: Vec<String>,
    /// `-device` ids, and whether each was given in the JSON form.
    device_ids: HashMap<String, bool>,
    devices: Vec<(String, Opts)>,
}

/// Whether an option value is libvirt's JSON form rather than `key=value`.
fn is_json(value: &OsStr) -> bool {
    value.as_bytes().trim_ascii_start().starts_with(b"{")
}

impl QemuDeviceOptions {
    /// `-drive file=F,if=virtio|none,format=raw[,readonly=on][,cache=...][,serial=S][,id=ID]`
    pub fn drive(&mut self, value: &OsStr) -> Result<(), CliError> {
        let opts = Opts::parse("-drive", value, "file", &["file"])?;
        let path = opts.path("file").map(PathBuf::from);
        let (mut read_only, mut direct, mut serial, mut id, mut interface) = (false, false, None, None, None);
        for (key, setting) in &opts.pairs {
            match key.as_str() {
                "if" => interface = Some(setting.clone()),
                "format" if setting == "raw" => {}
                "format" => return Err(invalid("-drive", value, "only format=raw images are supported")),
                "readonly" | "read-only" => read_only = on_off("-drive", value, key, setting)?,
                "cache" => direct = cache_is_direct("-drive", value, setting)?,
                "cache.direct" => direct = on_off("-drive", value, key, setting)?,
                "serial" => serial = Some(check_serial("-drive", value, setting)?),
                "id" => id = Some(setting.clone()),
                "media" if setting == "disk" => {}
                "aio" | "discard" | "detect-zeroes" | "werror" | "rerror" | "index" | "auto-read-only" => {}
                _ => return Err(invalid("-drive", value, format!("unsupported setting '{key}'"))),
            }
        }
        // QEMU refuses a repeated id as it parses the option, before it opens anything.
        if let Some(id) = id.as_ref() {
            if self.drive_ids.contains(id) {
                return Err(duplicate_id("-drive", value, format!("Duplicate ID '{id}' for drive")));
            }
            self.check_block_name("-drive", value, id)?;
            self.drive_ids.push(id.clone());
        }
        let path =
            path.filter(|p| !p.as_os_str().is_empty()).ok_or_else(|| invalid("-drive", value, "file= is required"))?;
        match interface.as_deref() {
            Some("virtio") => {
                let frontend = Frontend::default();
                self.drives.push(DiskConfig { path, read_only, serial, direct, frontend });
                Ok(())
            }
            Some("none") => {
                let id = id.ok_or_else(|| invalid("-drive", value, "if=none needs id= for -device drive= to use"))?;
                self.add_backend(id, BlockBackend { path, read_only, direct, serial, used: false })
            }
            _ => Err(invalid("-drive", value, "only if=virtio, or if=none with a -device, is supported")),
        }
    }

    /// `-blockdev driver=file,node-name=N,filename=F[,read-only=on][,cache.direct=on]`, and a raw format node on
    /// top: `-blockdev driver=raw,node-name=M,file=N` or with the file node inline (`file.driver=file,
    /// file.filename=F`). Also libvirt's JSON form of both.
    pub fn blockdev(&mut self, value: &OsStr) -> Result<(), CliError> {
        let opts = Opts::parse("-blockdev", value, "driver", &["filename", "file.filename"])?;
        let node = opts
            .get("node-name")
            .filter(|n| !n.is_empty())
            .ok_or_else(|| invalid("-blockdev", value, "node-name= is required"))?
            .to_string();
        let mut read_only = false;
        let mut direct = false;
        for (key, setting) in &opts.pairs {
            match key.as_str() {
                "read-only" => read_only = on_off("-blockdev", value, key, setting)?,
                "cache.direct" => direct = on_off("-blockdev", value, key, setting)?,
                "driver" | "node-name" | "filename" | "file" => {}
                "auto-read-only" | "discard" | "aio" | "locking" | "detect-zeroes" | "cache.no-flush" => {}
                _ if key.starts_with("file.") => {}
                _ => return Err(invalid("-blockdev", value, format!("unsupported setting '{key}'"))),
            }
        }
        if self.node_names.contains(&node) {
            return Err(duplicate_id("-blockdev", value, format!("Duplicate nodes with node-name='{node}'")));
        }
        self.check_block_name("-blockdev", value, &node)?;
        self.node_names.push(node.clone());
        match opts.first.as_deref() {
            Some("file" | "host_device") => {
                let path = opts.path("filename").filter(|f| !f.is_empty());
                let path = path.ok_or_else(|| invalid("-blockdev", value, "filename= is required"))?;
                let backend = BlockBackend { path: path.into(), read_only, direct, serial: None, used: false };
                self.add_backend(node, backend)
            }
            Some("raw") => {
                if let Some(filename) = opts.path("file.filename") {
                    if !matches!(opts.get("file.driver"), Some("file" | "host_device")) {
                        return Err(invalid("-blockdev", value, "file.driver must be file or host_device"));
                    }
                    let direct = direct || opts.get("file.cache.direct") == Some("on");
                    let read_only = read_only || opts.get("file.read-only") == Some("on");
                    let backend = BlockBackend { path: filename.into(), read_only, direct, serial: None, used: false };
                    return self.add_backend(node, backend);
                }
                let file = opts.get("file").ok_or_else(|| invalid("-blockdev", value, "file= names the file node"))?;
                self.format_nodes.insert(node, (file.to_string(), read_only));
                Ok(())
            }
            Some(other) => Err(invalid("-blockdev", value, format!("driver '{other}' is not supported (file, raw)"))),
            None => Err(invalid("-blockdev", value, "driver= is required")),
        }
    }

    /// Adds a backend whose name `check_block_name` has cleared.
    fn add_backend(&mut self, id: String, backend: BlockBackend) -> Result<(), CliError> {
        self.backends.insert(id, backend);
        Ok(())
    }

    /// Drive ids and node names share one namespace (each kind's own repeats are checked by the caller). QEMU
    /// creates every -blockdev node before any -drive, so a clash between the two is the drive's name conflicting,
    /// whichever came first on the command line.
    fn check_block_name(&self, option: &str, value: &OsStr, name: &str) -> Result<(), CliError> {
        if self.drive_ids.iter().chain(&self.node_names).any(|n| n == name) {
            let message = format!("Device name '{name}' conflicts with an existing node name");
            return Err(duplicate_id(option, value, message));
        }
        Ok(())
    }

    /// `-netdev tap,id=ID,ifname=NAME[,script=no][,downscript=no][,vhost=off]`, or `-netdev tap,id=ID,fd=N` with a
    /// tap Kestrel inherited on descriptor N (libvirt's way: it creates the tap and passes it). With fd=, libvirt
    /// may also pass `vhost=on,vhostfd=M` when the host has /dev/vhost-net: the device then runs in Kestrel, not
    /// in the kernel's vhost-net (not supported yet), as a warning says; descriptor M (libvirt's open /dev/vhost-net)
    /// is left unused.
    pub fn netdev(&mut self, value: &str) -> Result<(), CliError> {
        let opts = Opts::parse("-netdev", OsStr::new(value), "type", &[])?;
        match opts.first.as_deref() {
            Some("tap") => {}
            Some("user") => {
                return Err(invalid("-netdev", value, "user networking is not supported: use tap,ifname=NAME"));
            }
            _ => return Err(invalid("-netdev", value, "only tap netdevs are supported")),
        }
        let mut ifname = None;
        let mut fd = None;
        let mut vhost = false;
        let mut vhostfd = None;
        let mut id = None;
        let descriptor = |key: &str, setting: &str| {
            setting.parse::<std::os::fd::RawFd>().ok().filter(|&n| n > 2).ok_or_else(|| {
                invalid("-netdev", value, format!("{key}={setting}: a descriptor number above 2 is required"))
            })
        };
        for (key, setting) in &opts.pairs {
            match key.as_str() {
                "id" => id = Some(setting.clone()),
                "ifname" => ifname = Some(setting.clone()),
                "fd" => fd = Some(descriptor(key, setting)?),
                "script" | "downscript" if setting == "no" || setting.is_empty() => {}
                "script" | "downscript" => {
                    return Err(invalid("-netdev", value, "scripts are not run: give script=no,downscript=no"));
                }
                "vhost" => vhost = on_off("-netdev", value, key, setting)?,
                "vhostfd" => vhostfd = Some(descriptor(key, setting)?),
                "queues" if setting == "1" => {}
                "fds" | "vhostfds" | "helper" | "br" | "queues" => {
                    return Err(invalid("-netdev", value, format!("'{key}' is not supported: give ifname= or fd=")));
                }
                _ => return Err(invalid("-netdev", value, format!("unsupported setting '{key}'"))),
            }
        }
        let id = id.filter(|i| !i.is_empty()).ok_or_else(|| invalid("-netdev", value, "id= is required"))?;
        if self.netdevs.contains_key(&id) {
            return Err(duplicate_id("-netdev", value, format!("Duplicate ID '{id}' for netdev")));
        }
        let tap = match (ifname, fd) {
            (Some(_), Some(_)) => return Err(invalid("-netdev", value, "ifname= and fd= cannot be used together")),
            (None, None) => return Err(invalid("-netdev", value, "ifname= or fd= is required")),
            (Some(ifname), None) => {
                devices::virtio::net::tap::check_name(&ifname).map_err(|e| invalid("-netdev", value, e.to_string()))?;
                TapConfig::Named(ifname)
            }
            (None, Some(fd)) => TapConfig::Inherited(fd),
        };
        match (vhost, vhostfd, &tap) {
            (false, None, _) => {}
            (true, Some(_), TapConfig::Inherited(_)) => {
                eprintln!(
                    "kestrel: -netdev {id}: vhost-net is not supported yet: the virtio-net device runs in Kestrel"
                );
            }
            (_, Some(_), _) => return Err(invalid("-netdev", value, "vhostfd= needs fd= and vhost=on")),
            (true, None, _) => return Err(invalid("-netdev", value, "vhost-net is not supported: vhost=off")),
        }
        self.netdevs.insert(id, (tap, false));
        Ok(())
    }

    /// `-object rng-random,id=ID[,filename=/dev/urandom]` or `-object rng-builtin,id=ID`: entropy sources for
    /// `-device virtio-rng-*,rng=ID`. Kestrel's device always draws from getrandom, which is what both give.
    ///
    /// Also `-object secret,...`, which libvirt always passes (its master key, for decrypting other secrets it may
    /// pass later): accepted and unused, as no Kestrel option takes a secret.
    pub fn object(&mut self, value: &str) -> Result<(), CliError> {
        let opts = Opts::parse("-object", OsStr::new(value), "qom-type", &[])?;
        if opts.first.as_deref() == Some("secret") {
            return self.secret(value, &opts);
        }
        match opts.first.as_deref() {
            Some(object_type) if OBJECT_TYPES.contains(&object_type) => {}
            Some(other) => return Err(invalid("-object", value, format!("object type '{other}' is not supported"))),
            None => return Err(invalid("-object", value, "the object type is required")),
        }
        for (key, setting) in &opts.pairs {
            match key.as_str() {
                "id" => {}
                "filename" if setting == "/dev/urandom" || setting == "/dev/random" => {}
                "filename" => return Err(invalid("-object", value, "filename= must be /dev/urandom or /dev/random")),
                _ => return Err(invalid("-object", value, format!("unsupported setting '{key}'"))),
            }
        }
        let id =
            opts.get("id").filter(|i| !i.is_empty()).ok_or_else(|| invalid("-object", value, "id= is required"))?;
        // Both key=value: QEMU's "object" option group refuses the id as it parses. Otherwise creating the second
        // object fails to add it under /objects.
        let json = is_json(OsStr::new(value));
        if let Some(&(_, earlier_json)) = self.rng_objects.iter().find(|(o, _)| o == id) {
            let message = if json || earlier_json {
                format!("attempt to add duplicate property '{id}' to object (type 'container')")
            } else {
                format!("Duplicate ID '{id}' for object")
            };
            return Err(duplicate_id("-object", value, message));
        }
        self.rng_objects.push((id.to_string(), json));
        Ok(())
    }

    fn secret(&mut self, value: &str, opts: &Opts) -> Result<(), CliError> {
        for (key, setting) in &opts.pairs {
            match key.as_str() {
                "id" | "file" | "data" | "keyid" | "iv" => {}
                "format" if setting == "raw" || setting == "base64" => {}
                "format" => return Err(invalid("-object", value, "format= must be raw or base64")),
                _ => return Err(invalid("-object", value, format!("unsupported setting '{key}'"))),
            }
        }
        if opts.get("file").is_some() == opts.get("data").is_some() {
            return Err(invalid("-object", value, "a secret needs one of file= and data="));
        }
        let id =
            opts.get("id").filter(|i| !i.is_empty()).ok_or_else(|| invalid("-object", value, "id= is required"))?;
        if self.secrets.iter().chain(self.rng_objects.iter().map(|(o, _)| o)).any(|o| o == id) {
            return Err(duplicate_id("-object", value, format!("Duplicate ID '{id}' for object")));
        }
        self.secrets.push(id.to_string());
        Ok(())
    }

    /// `-device DRIVER,...`: checked when the command line is complete, as it may name backends given after it.
    pub fn device(&mut self, value: &str) -> Result<(), CliError> {
        let opts = Opts::parse("-device", OsStr::new(value), "driver", &[])?;
        if opts.first.as_deref().is_none_or(str::is_empty) {
            return Err(invalid("-device", value, "the device driver is required"));
        }
        // Both key=value: QEMU's "device" option group refuses the id as it parses. Otherwise creating the second
        // device fails to add it under /machine/peripheral.
        if let Some(id) = opts.get("id") {
            let json = is_json(OsStr::new(value));
            if let Some(&earlier_json) = self.device_ids.get(id) {
                let message = if json || earlier_json {
                    format!("Duplicate device ID '{id}'")
                } else {
                    format!("Duplicate ID '{id}' for device")
                };
                return Err(duplicate_id("-device", value, message));
            }
            self.device_ids.insert(id.to_string(), json);
        }
        self.devices.push((value.to_string(), opts));
        Ok(())
    }

    /// Connects devices to their backends. `chardevs` are the `-chardev` ids (for `virtconsole,chardev=`,
    /// `virtserialport,chardev=`).
    pub fn resolve(mut self, chardevs: &HashMap<String, SerialConfig>) -> Result<QemuDevices, CliError> {
        let mut out = QemuDevices { disks: std::mem::take(&mut self.drives), ..Default::default() };
        // The controller: its frontend and max_ports; the ports as given: (option value, settings, console).
        let mut serial_bus: Option<(Frontend, u32)> = None;
        let mut serial_ports: Vec<(&str, &Opts, bool)> = Vec::new();
        let devices = std::mem::take(&mut self.devices);
        for (value, opts) in &devices {
            let driver = opts.first.as_deref().unwrap_or_default();
            let (model, transport) = split_driver(driver);
            let boot_index = boot_index(value, opts.get("bootindex"))?;
            let frontend = Frontend { transport, id: opts.get("id").map(str::to_string), boot_index };
            let known = |model: &str| -> Result<(), CliError> {
                for (key, setting) in &opts.pairs {
                    let own = model_settings(model).any(|own| own == key);
                    if !own
                        && !IGNORED_DEVICE_KEYS.contains(&key.as_str())
                        && !COMMON_DEVICE_KEYS.contains(&key.as_str())
                    {
                        return Err(invalid("-device", value, format!("unsupported setting '{key}' for {driver}")));
                    }
                    let honoured = HONOURED_VALUES.iter().find(|(m, k, _)| *m == model && k == key);
                    if let Some((_, _, values)) = honoured.filter(|(_, _, values)| !values.contains(&setting.as_str()))
                    {
                        let supported = values.join("|");
                        return Err(invalid(
                            "-device",
                            value,
                            format!("{key}={setting} is not supported ({key}={supported} is)"),
                        ));
                    }
                }
                Ok(())
            };
            match model {
                "virtio-blk" => {
                    known("virtio-blk")?;
                    let drive = opts.get("drive").ok_or_else(|| invalid("-device", value, "drive= is required"))?;
                    let backend = self.take_backend(value, drive)?;
                    let serial = match opts.get("serial") {
                        Some(s) => Some(check_serial("-device", value, s)?),
                        None => backend.serial,
                    };
                    let BlockBackend { path, read_only, direct, .. } = backend;
                    out.disks.push(DiskConfig { path, read_only, serial, direct, frontend });
                }
                "virtio-net" => {
                    known("virtio-net")?;
                    let id = opts.get("netdev").ok_or_else(|| invalid("-device", value, "netdev= is required"))?;
                    let (tap, used) = self
                        .netdevs
                        .get_mut(id)
                        .ok_or_else(|| invalid("-device", value, format!("no -netdev with id '{id}'")))?;
                    if std::mem::replace(used, true) {
                        return Err(invalid("-device", value, format!("netdev '{id}' is already in use")));
                    }
                    let mac = opts.get("mac").map(|m| {
                        m.parse::<MacAddress>().map_err(|e| invalid("-device", value, format!("mac={m}: {e}")))
                    });
                    out.nics.push(NetConfig { tap: tap.clone(), mac: mac.transpose()?, frontend });
                }
                "virtio-rng" => {
                    known("virtio-rng")?;
                    if let Some(rng) = opts.get("rng") {
                        if !self.rng_objects.iter().any(|(o, _)| o == rng) {
                            return Err(invalid("-device", value, format!("no -object with id '{rng}'")));
                        }
                    }
                    if out.rng.replace(frontend).is_some() {
                        return Err(invalid("-device", value, "Kestrel supports one virtio-rng device"));
                    }
                }
                "virtio-balloon" => {
                    known("virtio-balloon")?;
                    let deflate_on_oom = match opts.get("deflate-on-oom") {
                        Some(setting) => on_off("-device", value, "deflate-on-oom", setting)?,
                        None => false,
                    };
                    let stats_poll_interval = match opts.get("guest-stats-polling-interval") {
                        Some(setting) => setting.parse::<u32>().map_err(|_| {
                            invalid("-device", value, "guest-stats-polling-interval= takes seconds, 0 to 4294967295")
                        })?,
                        None => 0,
                    };
                    let balloon = BalloonConfig { frontend, deflate_on_oom, stats_poll_interval };
                    if out.balloon.replace(balloon).is_some() {
                        return Err(invalid("-device", value, "Kestrel supports one virtio-balloon device"));
                    }
                }
                "virtio-serial" => {
                    known("virtio-serial")?;
                    if serial_bus.is_some() {
                        return Err(invalid("-device", value, "Kestrel supports one virtio-serial controller"));
                    }
                    let max_ports =
                        match opts.get("max_ports") {
                            None => DEFAULT_MAX_PORTS,
                            Some(n) => n.parse::<u32>().ok().filter(|n| (1..=MAX_PORTS_LIMIT).contains(n)).ok_or_else(
                                || invalid("-device", value, format!("max_ports= takes 1 to {MAX_PORTS_LIMIT}")),
                            )?,
                        };
                    serial_bus = Some((frontend, max_ports));
                }
                VIRTCONSOLE | VIRTSERIALPORT if transport.is_none() => {
                    known(model)?;
                    let chardev =
                        opts.get("chardev").ok_or_else(|| invalid("-device", value, "chardev= is required"))?;
                    if !chardevs.contains_key(chardev) {
                        return Err(invalid("-device", value, format!("no -chardev with id '{chardev}'")));
                    }
                    // Numbered once the controller, which may come after its ports, is known.
                    serial_ports.push((value, opts, model == VIRTCONSOLE));
                }
                ISA_SERIAL if transport.is_none() => {
                    known(ISA_SERIAL)?;
                    let chardev =
                        opts.get("chardev").ok_or_else(|| invalid("-device", value, "chardev= is required"))?;
                    if !chardevs.contains_key(chardev) {
                        return Err(invalid("-device", value, format!("no -chardev with id '{chardev}'")));
                    }
                    if opts.get("index").is_some_and(|index| index != "0") {
                        return Err(invalid(
                            "-device",
                            value,
                            "Kestrel has one ISA serial port, COM1: index= must be 0",
                        ));
                    }
                    let device_id = opts.get("id").map(str::to_string);
                    if out.isa_serial.replace((chardev.to_string(), device_id)).is_some() {
                        return Err(invalid("-device", value, "Kestrel has one ISA serial port, COM1"));
                    }
                }
                _ => return Err(invalid("-device", value, format!("device '{driver}' is not supported"))),
            }
        }
        out.virtio_serial = match serial_bus {
            Some((frontend, max_ports)) => Some(number_ports(frontend, max_ports, &serial_ports)?),
            None if serial_ports.is_empty() => None,
            None => {
                return Err(invalid(
                    "-device",
                    serial_ports[0].0,
                    "a virtconsole or virtserialport needs a -device virtio-serial-pci (or -device) controller",
                ))
            }
        };
        if let Some((id, _)) = self.backends.iter().find(|(_, b)| !b.used) {
            return Err(CliError::Invalid {
                option: "-drive/-blockdev".into(),
                value: id.clone(),
                reason: "no -device uses it".into(),
            });
        }
        Ok(out)
    }

    /// The image behind `-device ...,drive=NAME`: a `-drive if=none` id, a `-blockdev` node, or a raw format node
    /// over one. Each may be used by one device only.
    fn take_backend(&mut self, value: &str, name: &str) -> Result<BlockBackend, CliError> {
        let (node, format_read_only) = match self.format_nodes.get(name) {
            Some((file, read_only)) => (file.clone(), *read_only),
            None => (name.to_string(), false),
        };
        let backend = self
            .backends
            .get_mut(&node)
            .ok_or_else(|| invalid("-device", value, format!("no -drive or -blockdev named '{name}'")))?;
        if std::mem::replace(&mut backend.used, true) {
            return Err(invalid("-device", value, format!("drive '{name}' is already in use")));
        }
        let mut backend = backend.clone();
        backend.read_only |= format_read_only;
        Ok(backend)
    }
}

/// Numbers a virtio-serial controller's ports as QEMU does, in command-line order: `nr=` as given (port 0 only for
/// a console); otherwise port 0 for the first console, else the lowest number free from 1. A number taken twice,
/// out of range or with none left, and a name given twice, are refused in QEMU's words.
fn number_ports(
    frontend: Frontend,
    max_ports: u32,
    ports: &[(&str, &Opts, bool)],
) -> Result<VirtioSerialConfig, CliError> {
    let mut numbered: Vec<SerialPortConfig> = Vec::new();
    for &(value, opts, console) in ports {
        let taken = |nr: u32| numbered.iter().any(|p| p.nr == nr);
        let nr = match opts.get("nr") {
            Some(nr) => {
                let nr = nr.parse::<u32>().map_err(|_| invalid("-device", value, "nr= takes a port number"))?;
                if nr >= max_ports {
                    let message = format!("Out-of-range port id specified, max. allowed: {}", max_ports - 1);
                    return Err(invalid("-device", value, message));
                }
                if nr == 0 && !console {
                    let message = "Port number 0 on virtio-serial devices reserved for virtconsole devices for \
                                   backward compatibility";
                    return Err(invalid("-device", value, message));
                }
                if taken(nr) {
                    return Err(invalid("-device", value, format!("A port already exists at id {nr}")));
                }
                nr
            }
            None if console && !taken(0) => 0,
            None => (1..max_ports)
                .find(|&nr| !taken(nr))
                .ok_or_else(|| invalid("-device", value, "Maximum port limit for this device reached"))?,
        };
        let name = opts.get("name").map(str::to_string);
        if let Some(name) = &name {
            if name.is_empty() || name.len() > MAX_NAME_LEN || name.contains('\0') {
                return Err(invalid("-device", value, format!("name= takes 1 to {MAX_NAME_LEN} bytes")));
            }
            if numbered.iter().any(|p| p.name.as_ref() == Some(name)) {
                return Err(invalid("-device", value, format!("A port already exists by name {name}")));
            }
        }
        numbered.push(SerialPortConfig {
            nr,
            name,
            console,
            backend: SerialConfig::None,
            chardev: opts.get("chardev").map(str::to_string),
            id: opts.get("id").map(str::to_string),
        });
    }
    Ok(VirtioSerialConfig { frontend, max_ports, ports: numbered })
}

/// `virtio-blk-pci` → (`virtio-blk`, PCI); `virtio-blk-device` → (`virtio-blk`, mmio); `virtio-blk` → the machine's
/// default transport.
fn split_driver(driver: &str) -> (&str, Option<VirtioTransport>) {
    if let Some(model) = driver.strip_suffix("-pci") {
        (model, Some(VirtioTransport::Pci))
    } else if let Some(model) = driver.strip_suffix("-device") {
        (model, Some(VirtioTransport::Mmio))
    } else {
        (driver, None)
    }
}

/// `cache=` modes: those that bypass the host page cache open the image with O_DIRECT. Every mode flushes on the
/// guest's flush except `unsafe`, which Kestrel does not offer.
fn cache_is_direct(option: &str, value: &OsStr, mode: &str) -> Result<bool, CliError> {
    match mode {
        "none" | "directsync" => Ok(true),
        "writeback" | "writethrough" => Ok(false),
        _ => Err(invalid(option, value, "cache= must be none, directsync, writeback or writethrough")),
    }
}

fn check_serial(option: &str, value: impl AsRef<OsStr>, serial: &str) -> Result<String, CliError> {
    if serial.len() > 20 {
        return Err(invalid(option, value, "serial= takes at most 20 bytes"));
    }
    Ok(serial.to_string())
}

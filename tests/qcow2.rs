#![cfg(target_arch = "x86_64")]

//! virtio-blk on qcow2 images with the real `kestrel` binary on this machine's KVM and the repo's probe payload:
//! a guest reads a qcow2 base through a qcow2 overlay and writes to it (checked afterwards with `qemu-img check`
//! and `qemu-img compare`, the base unchanged) in each command-line spelling; QMP's block queries report the
//! format and the backing chain; a VM on a qcow2 disk is saved and restored; and hostile images (made by
//! qemu-img, then patched) are refused with one line. Every image is made at test time in a temp directory.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::counting_vm::{file_uri, migrate, Dir, Vm};
use support::{boot, kvm_available, payload, run_with_timeout};

const ELF: &str = "probe.elf";
const SECTORS: usize = 128;

/// Runs qemu-img with `args`; its stdout. Panics (with its stderr) if it fails.
fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img").args(args).output().expect("running qemu-img (is qemu-utils installed?)");
    assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A disk's raw content: `magic` in its first 8 bytes, then a pattern unlike the payload's 0x5a fill.
fn content(magic: &[u8; 8], seed: u8) -> Vec<u8> {
    let mut image: Vec<u8> = (0..SECTORS * 512).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1).collect();
    image[..8].copy_from_slice(magic);
    image
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The files of one chain test: disk A is `a.qcow2`, an overlay over the qcow2 base `base.qcow2` (made from
/// `base.raw`); disk B, read-only, is `b.qcow2`, an overlay over the raw `b.raw`.
struct Chain {
    dir: Dir,
    base_raw: Vec<u8>,
    b_raw: Vec<u8>,
}

impl Chain {
    fn new(name: &str) -> Chain {
        let dir = Dir::new(&format!("qcow2-{name}"));
        let (base_raw, b_raw) = (content(b"ALPHAIMG", 3), content(b"KESTREL!", 101));
        std::fs::write(dir.path("base.raw"), &base_raw).unwrap();
        std::fs::write(dir.path("b.raw"), &b_raw).unwrap();
        let p = |name: &str| dir.path(name).to_str().unwrap().to_string();
        // Compressed clusters: the guest reads them through the overlay.
        qemu_img(&["convert", "-c", "-f", "raw", "-O", "qcow2", &p("base.raw"), &p("base.qcow2")]);
        // Relative backing names: resolved against the overlay's directory, as QEMU does.
        qemu_img(&["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", &p("a.qcow2")]);
        qemu_img(&["create", "-q", "-f", "qcow2", "-b", "b.raw", "-F", "raw", &p("b.qcow2")]);
        Chain { dir, base_raw, b_raw }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path(name)
    }
}

/// The payload's `virtio` command on disk A (writable) and B (read-only), with the disks given by `disk_args`
/// (paths of A and B); then the images are checked: A reads the base's data, its one good write (sector 2, 0x5a)
/// went to the overlay, `qemu-img check` is clean, and the bases and B are unchanged.
fn guest_reads_through_the_overlay_and_writes_to_it(name: &str, disk_args: impl Fn(&str, &str) -> Vec<String>) {
    if !kvm_available() {
        return;
    }
    let chain = Chain::new(name);
    let (a, b) = (chain.path("a.qcow2"), chain.path("b.qcow2"));
    let base_before = std::fs::read(chain.path("base.qcow2")).unwrap();
    let b_before = std::fs::read(&b).unwrap();
    let mut args = vec!["--machine".to_string(), "microvm".into()];
    args.extend(disk_args(path_str(&a), path_str(&b)));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = boot(ELF, "virtio", &args);
    run.assert_success();
    assert!(!run.stderr.contains("panicked"), "{}", run.describe());
    run.assert_stdout_has("probe: virtio slot 0 ready");
    run.assert_stdout_has("probe: virtio slot 1 ready");
    assert!(!run.stdout.contains("probe: virtio failed"), "{}", run.describe());
    // A's first sector is the base's, read through the overlay; B's the raw file's, through its overlay.
    run.assert_stdout_has(&format!("probe: virtio ok b={} a={}\r\n", hex(b"KESTREL!"), hex(b"ALPHAIMG")));

    let check = qemu_img(&["check", path_str(&a)]);
    assert!(check.contains("No errors were found on the image."), "qemu-img check: {check}");
    let mut expected = chain.base_raw.clone();
    expected[2 * 512..3 * 512].fill(0x5a);
    let expected_path = chain.path("expected.raw");
    std::fs::write(&expected_path, &expected).unwrap();
    let compared = qemu_img(&["compare", "-f", "qcow2", "-F", "raw", path_str(&a), path_str(&expected_path)]);
    assert!(compared.contains("Images are identical."), "{compared}");
    assert!(std::fs::read(chain.path("base.qcow2")).unwrap() == base_before, "the base image changed");
    assert!(std::fs::read(chain.path("base.raw")).unwrap() == chain.base_raw, "the raw base changed");
    assert!(std::fs::read(&b).unwrap() == b_before, "read-only disk B changed");
    assert!(std::fs::read(chain.path("b.raw")).unwrap() == chain.b_raw, "B's raw backing file changed");
    // The write allocated a cluster in the overlay: it maps sector 2 itself, not through the base.
    let map = qemu_img(&["map", "--output=json", path_str(&a)]);
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    let first = &map[0];
    assert_eq!((first["start"].as_u64(), first["depth"].as_u64()), (Some(0), Some(0)), "{map}");
}

#[test]
fn native_disk_option() {
    guest_reads_through_the_overlay_and_writes_to_it("native", |a, b| {
        vec![
            "--disk".into(),
            format!("path={a},format=qcow2"),
            "--disk".into(),
            format!("path={b},format=qcow2,readonly=on"),
        ]
    });
}

#[test]
fn qemu_drive_option() {
    guest_reads_through_the_overlay_and_writes_to_it("drive", |a, b| {
        vec![
            "-drive".into(),
            format!("file={a},if=virtio,format=qcow2,cache=writeback"),
            "-drive".into(),
            format!("file={b},if=virtio,format=qcow2,readonly=on"),
        ]
    });
}

#[test]
fn libvirt_blockdev_json() {
    // As libvirt spells a qcow2 disk (virt-install's default format): a file node and a qcow2 node on it; B with
    // the file node inline.
    guest_reads_through_the_overlay_and_writes_to_it("blockdev", |a, b| {
        vec![
            "-blockdev".into(),
            format!(
                r#"{{"driver":"file","filename":"{a}","node-name":"libvirt-2-storage","auto-read-only":true,"discard":"unmap"}}"#
            ),
            "-blockdev".into(),
            r#"{"node-name":"libvirt-2-format","read-only":false,"driver":"qcow2","file":"libvirt-2-storage"}"#.into(),
            "-device".into(),
            r#"{"driver":"virtio-blk-device","drive":"libvirt-2-format","id":"virtio-disk0"}"#.into(),
            "-blockdev".into(),
            format!("driver=qcow2,node-name=b,read-only=on,file.driver=file,file.filename={b}"),
            "-device".into(),
            "virtio-blk-device,drive=b".into(),
        ]
    });
}

#[test]
fn libvirt_backing_nodes() {
    // libvirt with a known chain: every layer a node, the overlay's `backing` naming the base's format node, the
    // base's `null`. B's chain ends at its raw file node.
    guest_reads_through_the_overlay_and_writes_to_it("backing-nodes", |a, b| {
        let dir = Path::new(a).parent().unwrap();
        let base = dir.join("base.qcow2");
        let b_raw = dir.join("b.raw");
        vec![
            "-blockdev".into(),
            format!(r#"{{"driver":"file","filename":"{}","node-name":"libvirt-3-storage"}}"#, base.display()),
            "-blockdev".into(),
            r#"{"node-name":"libvirt-3-format","read-only":true,"driver":"qcow2","file":"libvirt-3-storage","backing":null}"#.into(),
            "-blockdev".into(),
            format!(r#"{{"driver":"file","filename":"{a}","node-name":"libvirt-2-storage"}}"#),
            "-blockdev".into(),
            r#"{"node-name":"libvirt-2-format","read-only":false,"driver":"qcow2","file":"libvirt-2-storage","backing":"libvirt-3-format"}"#.into(),
            "-device".into(),
            r#"{"driver":"virtio-blk-device","drive":"libvirt-2-format","id":"virtio-disk0"}"#.into(),
            "-blockdev".into(),
            format!(r#"{{"driver":"file","filename":"{}","node-name":"b-raw","read-only":true}}"#, b_raw.display()),
            "-blockdev".into(),
            format!("driver=qcow2,node-name=b,read-only=on,file.driver=file,file.filename={b},backing=b-raw"),
            "-device".into(),
            "virtio-blk-device,drive=b".into(),
        ]
    });
}

/// `backing=null` (QEMU's empty `backing=`): the overlay alone, whatever it names; its unallocated clusters read
/// as zeros and the base is never opened.
#[test]
fn no_backing_node_means_no_backing_file() {
    if !kvm_available() {
        return;
    }
    let chain = Chain::new("null-backing");
    let (a, b) = (chain.path("a.qcow2"), chain.path("b.qcow2"));
    // The base is gone: opening it would fail.
    std::fs::remove_file(chain.path("base.qcow2")).unwrap();
    let a_node = format!(
        r#"{{"node-name":"a","driver":"qcow2","file":{{"driver":"file","filename":"{}"}},"backing":null}}"#,
        a.display()
    );
    let b_node = format!("driver=qcow2,node-name=b,read-only=on,file.driver=file,file.filename={}", b.display());
    let (a_device, b_device) = ("virtio-blk-device,drive=a", "virtio-blk-device,drive=b");
    let args =
        ["--machine", "microvm", "-blockdev", &a_node, "-device", a_device, "-blockdev", &b_node, "-device", b_device];
    let run = boot(ELF, "virtio", &args);
    run.assert_success();
    run.assert_stdout_has(&format!("probe: virtio ok b={} a={}\r\n", hex(b"KESTREL!"), hex(&[0; 8])));
    // Checked as it was opened: without its backing file.
    let alone =
        format!(r#"json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{}"}},"backing":null}}"#, a.display());
    let check = qemu_img(&["check", &alone]);
    assert!(check.contains("No errors were found on the image."), "qemu-img check: {check}");
}

/// `query-block` and `query-named-block-nodes` report the qcow2 format, the virtual size and the backing chain
/// as QEMU 7.2 does: `backing_file` as the image names it, the depth, and `backing-image` for each image below.
#[test]
fn block_queries_report_the_format_and_the_backing_chain() {
    if !kvm_available() {
        return;
    }
    let chain = Chain::new("query");
    // A third level: top.qcow2 over a.qcow2 over base.qcow2.
    let top = chain.path("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", path_str(&top)]);
    let disk = format!("path={},format=qcow2", top.display());
    let raw = format!("path={},readonly=on", chain.path("b.raw").display());
    let vm = Vm::start(&chain.dir, "vm", &["--memory", "64M", "--disk", &disk, "--disk", &raw]);
    let mut qmp = vm.client();
    let (_, reply) = qmp.execute(r#"{"execute": "query-block"}"#);
    let inserted = &reply["return"][0]["inserted"];
    assert_eq!(inserted["drv"], "qcow2", "{reply}");
    assert_eq!(inserted["file"], path_str(&top), "{reply}");
    assert_eq!(inserted["backing_file"], "a.qcow2", "{reply}");
    assert_eq!(inserted["backing_file_depth"], 2, "{reply}");
    let image = &inserted["image"];
    assert_eq!(image["format"], "qcow2", "{reply}");
    assert_eq!(image["virtual-size"], (SECTORS * 512) as u64, "{reply}");
    assert_eq!(image["cluster-size"], 65536, "{reply}");
    assert_eq!(image["backing-filename"], "a.qcow2", "{reply}");
    assert_eq!(image["backing-filename-format"], "qcow2", "{reply}");
    assert_eq!(image["full-backing-filename"], path_str(&chain.path("a.qcow2")), "{reply}");
    let middle = &image["backing-image"];
    assert_eq!(middle["filename"], path_str(&chain.path("a.qcow2")), "{reply}");
    assert_eq!(middle["format"], "qcow2", "{reply}");
    assert_eq!(middle["backing-filename"], "base.qcow2", "{reply}");
    let base = &middle["backing-image"];
    assert_eq!(base["filename"], path_str(&chain.path("base.qcow2")), "{reply}");
    assert_eq!(base["virtual-size"], (SECTORS * 512) as u64, "{reply}");
    assert!(base.get("backing-image").is_none(), "the base has no backing file: {reply}");
    // The raw disk stays as it was reported before.
    let raw_node = &reply["return"][1]["inserted"];
    assert_eq!((&raw_node["drv"], &raw_node["backing_file_depth"]), (&"raw".into(), &0.into()), "{reply}");
    assert!(raw_node.get("backing_file").is_none(), "{reply}");
    let (_, nodes) = qmp.execute(r#"{"execute": "query-named-block-nodes"}"#);
    assert_eq!(nodes["return"][0]["drv"], "qcow2", "{nodes}");
    assert_eq!(nodes["return"][0]["image"]["backing-image"]["backing-image"]["format"], "qcow2", "{nodes}");
    drop(qmp);
    vm.quit();
}

/// A VM on a writable qcow2 disk is saved and restored into a new process: the disk state is the image, whose
/// cached metadata was written back when the save completed (`qemu-img check` is clean while the source still
/// runs), and the restored process reopens it with its chain; a restore that names the image as raw is refused.
#[test]
fn a_vm_on_a_qcow2_disk_saves_and_restores() {
    if !kvm_available() {
        return;
    }
    let chain = Chain::new("snapshot");
    let a = chain.path("a.qcow2");
    let disk = format!("path={},format=qcow2", a.display());
    let args = ["--memory", "64M", "--machine", "microvm", "--disk", &disk];
    let source = Vm::start(&chain.dir, "source", &args);
    source.wait_for_count(100);
    let snapshot = chain.path("vm.ksnap");
    let mut qmp = source.client();
    migrate(&mut qmp, &file_uri(&snapshot));
    assert_eq!(qmp.status(), "postmigrate");
    let check = qemu_img(&["check", "-U", path_str(&a)]);
    assert!(check.contains("No errors were found on the image."), "qemu-img check after the save: {check}");
    drop(qmp);
    source.quit();

    let incoming = format!("file:{}", snapshot.display());
    let mut restore_args = vec!["-incoming", &incoming];
    restore_args.extend_from_slice(&args);
    let restored = Vm::start(&chain.dir, "restored", &restore_args);
    restored.wait_for_count(200);
    let mut qmp = restored.client();
    let (_, reply) = qmp.execute(r#"{"execute": "query-block"}"#);
    assert_eq!(reply["return"][0]["inserted"]["image"]["backing-image"]["format"], "qcow2", "{reply}");
    drop(qmp);
    restored.quit();
    let check = qemu_img(&["check", path_str(&a)]);
    assert!(check.contains("No errors were found on the image."), "qemu-img check after the restore: {check}");

    // The same file as a raw disk is another disk to the guest.
    let kernel = payload("probe.pvh.elf");
    let raw_disk = format!("path={}", a.display());
    let cmd = support::kestrel(&[
        "--kernel",
        path_str(&kernel),
        "--memory",
        "64M",
        "--machine",
        "microvm",
        "--disk",
        &raw_disk,
        "-incoming",
        &incoming,
    ]);
    let run = run_with_timeout(cmd, std::time::Duration::from_secs(20));
    assert!(!run.status.success(), "{}", run.describe());
    assert_eq!(run.stderr.trim().lines().count(), 1, "one line\n{}", run.describe());
    assert!(run.stderr.contains("virtio-blk"), "{}", run.describe());
}

/// One hostile image: how it is made, and what the refusal says.
struct Hostile {
    name: &'static str,
    /// Makes `image.qcow2` (and whatever else it needs) in the directory.
    make: fn(&Path),
    refusal: &'static str,
}

fn image_in(dir: &Path, name: &str) -> String {
    dir.join(name).to_str().unwrap().to_string()
}

/// A fresh 1 MiB qcow2 image `name` in `dir`, by qemu-img.
fn create(dir: &Path, name: &str, extra: &[&str]) {
    let path = image_in(dir, name);
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[&path, "1M"]);
    qemu_img(&args);
}

/// Overwrites `bytes` at `offset` of `dir/name`.
fn patch(dir: &Path, name: &str, offset: usize, bytes: &[u8]) {
    let path = dir.join(name);
    let mut image = std::fs::read(&path).unwrap();
    image[offset..offset + bytes.len()].copy_from_slice(bytes);
    std::fs::write(&path, image).unwrap();
}

/// Header fields (qcow2 specification, big-endian).
const VERSION: usize = 4;
const CLUSTER_BITS: usize = 20;
const SIZE: usize = 24;
const CRYPT_METHOD: usize = 32;
const L1_SIZE: usize = 36;
const L1_TABLE_OFFSET: usize = 40;
const REFCOUNT_TABLE_OFFSET: usize = 48;
const REFCOUNT_TABLE_CLUSTERS: usize = 56;
const INCOMPATIBLE_FEATURES: usize = 72;

fn set_incompatible(dir: &Path, bits: u64) {
    patch(dir, "image.qcow2", INCOMPATIBLE_FEATURES, &bits.to_be_bytes());
}

const HOSTILE: &[Hostile] = &[
    Hostile {
        name: "encrypted (LUKS)",
        make: |d| {
            create(d, "image.qcow2", &[]);
            patch(d, "image.qcow2", CRYPT_METHOD, &2u32.to_be_bytes());
        },
        refusal: "encrypted qcow2 images (LUKS) are not supported",
    },
    Hostile {
        name: "encrypted (AES)",
        make: |d| {
            create(d, "image.qcow2", &[]);
            patch(d, "image.qcow2", CRYPT_METHOD, &1u32.to_be_bytes());
        },
        refusal: "encrypted qcow2 images (AES) are not supported",
    },
    Hostile {
        name: "dirty bit",
        make: |d| {
            create(d, "image.qcow2", &["-o", "lazy_refcounts=on"]);
            set_incompatible(d, 1);
        },
        refusal: "repair it with 'qemu-img check -r all'",
    },
    Hostile {
        name: "corrupt bit",
        make: |d| {
            create(d, "image.qcow2", &[]);
            set_incompatible(d, 2);
        },
        refusal: "the image is marked corrupt",
    },
    Hostile {
        name: "unknown incompatible feature",
        make: |d| {
            create(d, "image.qcow2", &[]);
            set_incompatible(d, 1 << 40);
        },
        refusal: "incompatible features Kestrel does not know (0x10000000000)",
    },
    Hostile {
        name: "zstd compression",
        make: |d| create(d, "image.qcow2", &["-o", "compression_type=zstd"]),
        refusal: "compressed with zstd are not supported",
    },
    Hostile {
        name: "extended L2 entries",
        make: |d| create(d, "image.qcow2", &["-o", "extended_l2=on"]),
        refusal: "extended L2 entries (subclusters) are not supported",
    },
    Hostile {
        name: "external data file",
        make: |d| create(d, "image.qcow2", &["-o", &format!("data_file={}", image_in(d, "data.raw"))]),
        refusal: "with an external data file are not supported",
    },
    Hostile {
        name: "version 4",
        make: |d| {
            create(d, "image.qcow2", &[]);
            patch(d, "image.qcow2", VERSION, &4u32.to_be_bytes());
        },
        refusal: "qcow2 version 4 is not supported",
    },
    Hostile {
        name: "size overflows",
        make: |d| {
            create(d, "image.qcow2", &[]);
            patch(d, "image.qcow2", SIZE, &u64::MAX.to_be_bytes());
        },
        refusal: "overflows (over 2^63 bytes)",
    },
    Hostile {
        name: "size the L1 table cannot map",
        make: |d| {
            create(d, "image.qcow2", &[]);
            patch(d, "image.qcow2", SIZE, &(1u64 << 50).to_be_bytes());
        },
        refusal: "cannot map the virtual size",
    },
    Hostile {
        name: "L1 table of 4 billion entries",
        make: |d| {
            create(d, "image.qcow2", &[]);
            patch(d, "image.qcow2", L1_SIZE, &u32::MAX.to_be_bytes());
        },
        refusal: "its L1 table (4294967295 entries) is over the limit",
    },
    Hostile {
        name: "refcount table of 4 billion clusters",
        make: |d| {
            create(d, "image.qcow2", &[]);
            patch(d, "image.qcow2", REFCOUNT_TABLE_CLUSTERS, &u32::MAX.to_be_bytes());
        },
        refusal: "its refcount table (281474976645120 bytes) is over the limit",
    },
    Hostile {
        name: "refcount table that leaves the file's clusters uncovered",
        make: |d| {
            create(d, "image.qcow2", &[]);
            let image = std::fs::read(d.join("image.qcow2")).unwrap();
            let table = u64::from_be_bytes(image[REFCOUNT_TABLE_OFFSET..][..8].try_into().unwrap());
            patch(d, "image.qcow2", table as usize, &[0; 8]);
        },
        refusal: "clusters of the file have no refcount block (refcount table entry 0 is empty)",
    },
    Hostile {
        name: "feature name table cut mid-entry",
        make: |d| {
            create(d, "image.qcow2", &[]);
            // qemu-img writes the feature name table as the first extension after the 112-byte header.
            let image = std::fs::read(d.join("image.qcow2")).unwrap();
            let at = u32::from_be_bytes(image[100..104].try_into().unwrap()) as usize;
            assert_eq!(&image[at..at + 4], &0x6803_f857u32.to_be_bytes(), "the feature name table comes first");
            let len = u32::from_be_bytes(image[at + 4..at + 8].try_into().unwrap());
            patch(d, "image.qcow2", at + 4, &(len + 1).to_be_bytes());
        },
        refusal: "its feature name table is malformed",
    },
    Hostile {
        name: "cluster size out of range",
        make: |d| {
            create(d, "image.qcow2", &[]);
            patch(d, "image.qcow2", CLUSTER_BITS, &40u32.to_be_bytes());
        },
        refusal: "cluster size 2^40 is out of range",
    },
    Hostile {
        name: "unaligned L1 table",
        make: |d| {
            create(d, "image.qcow2", &[]);
            patch(d, "image.qcow2", L1_TABLE_OFFSET, &0x30001u64.to_be_bytes());
        },
        refusal: "L1",
    },
    Hostile {
        name: "not qcow2",
        make: |d| std::fs::write(d.join("image.qcow2"), vec![0u8; 1 << 20]).unwrap(),
        refusal: "not a qcow2 image",
    },
    Hostile {
        name: "missing backing file",
        make: |d| {
            create(d, "base.qcow2", &[]);
            create(d, "image.qcow2", &["-b", "base.qcow2", "-F", "qcow2"]);
            std::fs::remove_file(d.join("base.qcow2")).unwrap();
        },
        refusal: "base.qcow2': No such file or directory",
    },
    Hostile {
        name: "backing chain that loops to itself",
        make: |d| {
            create(d, "image.qcow2", &[]);
            qemu_img(&["rebase", "-u", "-b", "image.qcow2", "-F", "qcow2", &image_in(d, "image.qcow2")]);
        },
        refusal: "the backing chain loops",
    },
    Hostile {
        name: "backing chain that loops through another image",
        make: |d| {
            create(d, "other.qcow2", &[]);
            create(d, "image.qcow2", &["-b", "other.qcow2", "-F", "qcow2"]);
            qemu_img(&["rebase", "-u", "-b", "image.qcow2", "-F", "qcow2", &image_in(d, "other.qcow2")]);
        },
        refusal: "the backing chain loops",
    },
    Hostile {
        name: "backing chain too deep",
        make: |d| {
            create(d, "layer0.qcow2", &[]);
            for i in 1..=17 {
                let below = format!("layer{}.qcow2", i - 1);
                create(d, &format!("layer{i}.qcow2"), &["-b", &below, "-F", "qcow2"]);
            }
            create(d, "image.qcow2", &["-b", "layer17.qcow2", "-F", "qcow2"]);
        },
        refusal: "the backing chain is deeper than 16 images",
    },
    Hostile {
        name: "backing file that is not a file",
        make: |d| {
            create(d, "image.qcow2", &[]);
            qemu_img(&["rebase", "-u", "-b", "/dev/zero", "-F", "raw", &image_in(d, "image.qcow2")]);
        },
        refusal: "'/dev/zero' is not a regular file or block device",
    },
    Hostile {
        name: "unknown backing format",
        make: |d| {
            create(d, "base.qcow2", &[]);
            create(d, "image.qcow2", &["-b", "base.qcow2", "-F", "qcow2"]);
            qemu_img(&["rebase", "-u", "-b", "base.qcow2", "-F", "vmdk", &image_in(d, "image.qcow2")]);
        },
        refusal: "backing format 'vmdk' is not supported",
    },
];

/// Each hostile image is refused before the guest runs, with one line naming the file and the problem, never a
/// panic or a hang; the image is left as it was.
#[test]
fn hostile_images_are_refused_with_one_line() {
    if !kvm_available() {
        return;
    }
    let kernel = payload(ELF);
    for case in HOSTILE {
        let dir = Dir::new(&format!("qcow2-hostile-{}", case.name.replace(' ', "-")));
        (case.make)(&dir.path(""));
        let image = dir.path("image.qcow2");
        let before = std::fs::read(&image).unwrap();
        let disk = format!("path={},format=qcow2", image.display());
        let cmd = support::kestrel(&["--kernel", path_str(&kernel), "--cmdline", "poweroff", "--disk", &disk]);
        let run = run_with_timeout(cmd, std::time::Duration::from_secs(20));
        let what = format!("{}\n{}", case.name, run.describe());
        assert_eq!(run.status.code(), Some(1), "{what}");
        assert!(!run.stdout.contains("kestrel-probe"), "the guest ran: {what}");
        assert_eq!(run.stderr.trim_end().lines().count(), 1, "one line: {what}");
        assert!(run.stderr.starts_with("kestrel: disk: "), "{what}");
        assert!(run.stderr.contains(case.refusal), "expected {:?}: {what}", case.refusal);
        assert!(std::fs::read(&image).unwrap() == before, "the refused image changed: {what}");
    }
}

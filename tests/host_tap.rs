#![cfg(target_arch = "x86_64")]

//! virtio-net's backend on this machine's kernel: a real tap interface opened as `--net tap=NAME` opens it, its
//! refusals (a name in use, a bad MAC or name on the command line) as one clear line, and a frame written through
//! it arriving in the host's network stack. Creating a tap needs /dev/net/tun and CAP_NET_ADMIN: where that is not
//! possible the tests fail under CI (or with KESTREL_REQUIRE_TAP=1) and are otherwise SKIPPED, saying why.
//! Each test makes its own interfaces, named after the process, which vanish when closed.

mod support;

use std::io::IoSlice;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use devices::virtio::net::tap::{Tap, TapError};
use devices::virtio::net::{NetBackend, VNET_HDR_LEN};
use support::{inherit_fd, kestrel, kvm_available, payload, run_with_timeout};

/// A tap interface name unique to this process and `tag`.
fn tap_name(tag: &str) -> String {
    format!("kt{}{tag}", std::process::id() % 1_000_000)
}

/// Opens tap `name`, or decides that this machine cannot have taps (see the module comment).
fn open_tap(name: &str) -> Option<Tap> {
    match Tap::open(name) {
        Ok(tap) => Some(tap),
        Err(e @ (TapError::NoTunDevice | TapError::Permission(_) | TapError::OpenTun(_))) => {
            let required = std::env::var_os("CI").is_some() || std::env::var_os("KESTREL_REQUIRE_TAP").is_some();
            assert!(!required, "tap interfaces are required here (CI or KESTREL_REQUIRE_TAP is set) but {e}");
            eprintln!("SKIPPED: cannot create a tap: {e}; set KESTREL_REQUIRE_TAP=1 to make this a failure");
            None
        }
        Err(e) => panic!("opening tap {name}: {e}"),
    }
}

fn stat(name: &str, counter: &str) -> u64 {
    let path = format!("/sys/class/net/{name}/statistics/{counter}");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}")).trim().parse().unwrap()
}

#[test]
fn a_tap_is_created_configured_and_exclusive() {
    let name = tap_name("a");
    let Some(tap) = open_tap(&name) else { return };
    assert_eq!(tap.name(), name);
    assert!(Path::new(&format!("/sys/class/net/{name}")).exists(), "the interface exists while open");
    // A tap is an Ethernet device (ARPHRD_ETHER), with no packet-info prefix and our vnet header.
    assert_eq!(std::fs::read_to_string(format!("/sys/class/net/{name}/type")).unwrap().trim(), "1");
    let second = Tap::open(&name).expect_err("a second open of a single-queue tap");
    assert!(matches!(second, TapError::Busy(_)), "{second}");
    assert_eq!(second.to_string(), format!("tap '{name}' is busy: another process has it open"));
    // Nothing to read yet, and reading does not block.
    let mut buf = vec![0u8; 2048];
    let mut tap = tap;
    let err = tap.recv(&mut buf).expect_err("an empty tap");
    assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
    drop(tap);
    // The kernel unregisters the interface after the close returns: give it a moment on a busy machine.
    let sys = format!("/sys/class/net/{name}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while Path::new(&sys).exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!Path::new(&sys).exists(), "a tap we created goes away with us");
}

#[test]
fn a_frame_written_behind_a_vnet_header_reaches_the_host_stack() {
    let name = tap_name("b");
    let Some(mut tap) = open_tap(&name) else { return };
    // Frames written to a tap that is down are refused (EIO).
    let mut frame = vec![0xffu8; 6]; // broadcast
    frame.extend_from_slice(&[0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
    frame.extend_from_slice(&[0x88, 0xb5]); // the local experimental EtherType: nobody answers it
    frame.extend_from_slice(&[0xa5; 46]);
    let header = [0u8; VNET_HDR_LEN];
    let parts = [IoSlice::new(&header), IoSlice::new(&frame)];
    assert!(tap.send(&parts).is_err(), "the interface is down");
    let up = std::process::Command::new("ip").args(["link", "set", &name, "up"]).status();
    let Ok(up) = up else {
        eprintln!("SKIPPED: the frame part needs the ip command");
        return;
    };
    assert!(up.success(), "ip link set {name} up");
    let before = (stat(&name, "rx_packets"), stat(&name, "rx_bytes"));
    assert_eq!(tap.send(&parts).unwrap(), VNET_HDR_LEN + frame.len());
    let after = (stat(&name, "rx_packets"), stat(&name, "rx_bytes"));
    assert_eq!((after.0 - before.0, after.1 - before.1), (1, frame.len() as u64), "one frame, without the header");
}

#[test]
fn kestrel_opens_its_tap_and_reports_one_clear_line_when_it_cannot() {
    if !kvm_available() {
        return;
    }
    let name = tap_name("c");
    let Some(held) = open_tap(&name) else { return };
    let probe = payload("probe.bzImage");
    let tap_arg = format!("tap={name}");
    let args = ["--kernel", probe.to_str().unwrap(), "--cmdline", "poweroff now", "--net", &tap_arg];
    let busy = run_with_timeout(kestrel(&args), Duration::from_secs(30));
    assert!(!busy.status.success(), "{}", busy.describe());
    assert_eq!(busy.stderr.trim().lines().count(), 1, "{}", busy.describe());
    assert!(busy.stderr.contains(&format!("--net tap={name}: tap '{name}' is busy")), "{}", busy.describe());
    drop(held);

    // Free again: kestrel creates it, runs the guest with a virtio-net device and exits cleanly.
    let run = run_with_timeout(kestrel(&args), Duration::from_secs(30));
    run.assert_success();
    run.assert_stdout_has("probe: poweroff");

    for (bad, reason) in [
        ("tap=this-name-is-too-long", "longer than 15 bytes"),
        ("tap=t0,mac=01:02:03:04:05:06", "multicast"),
        ("tap=t0,mac=52:54:00:12:34", "six hexadecimal bytes"),
        ("mac=52:54:00:12:34:56", "tap=NAME is required"),
    ] {
        let run = run_with_timeout(kestrel(&["--kernel", "k", "--net", bad]), Duration::from_secs(10));
        assert!(!run.status.success(), "{bad}: {}", run.describe());
        assert_eq!(run.stderr.trim().lines().count(), 1, "{bad}: {}", run.describe());
        assert!(run.stderr.contains(reason), "{bad}: {}", run.describe());
    }
}

/// The descriptor number an inherited tap is passed on, as libvirt passes one.
const TAP_FD: i32 = 40;

/// A second descriptor for `tap`'s open file (the same attachment), to pass to a child.
fn duplicate(tap: &Tap) -> OwnedFd {
    // SAFETY: dup of a descriptor `tap` holds open; the new descriptor is owned by the result alone.
    let fd = unsafe { libc::dup(tap.raw_fd()) };
    assert!(fd >= 0, "dup: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just returned by dup and nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// `-netdev tap,fd=N` (libvirt's way: it creates the tap and passes it): Kestrel configures the tap it inherited as
/// it configures one it opened, which the shared open file shows afterwards (the test had made it blocking and
/// given it 10-byte vnet headers: Kestrel made it non-blocking, with 12-byte headers), and runs the guest with
/// it. A descriptor Kestrel did not inherit, or one that is not a tap, is one clear line.
#[test]
fn kestrel_takes_an_inherited_tap_and_refuses_a_descriptor_that_is_not_one() {
    if !kvm_available() {
        return;
    }
    let name = tap_name("i");
    let Some(tap) = open_tap(&name) else { return };
    let shared = duplicate(&tap);
    let raw = shared.as_raw_fd();
    let ten: libc::c_int = 10;
    // SAFETY: F_SETFL with plain flags, and TUNSETVNETHDRSZ reading one int from `ten`: no other memory is passed.
    unsafe {
        assert_eq!(libc::fcntl(raw, libc::F_SETFL, libc::O_RDWR), 0);
        assert_eq!(libc::ioctl(raw, libc::TUNSETVNETHDRSZ, &ten), 0);
    }
    let probe = payload("probe.bzImage");
    let netdev = format!("tap,id=n0,fd={TAP_FD}");
    let args = |netdev: &str| {
        let probe = probe.to_str().unwrap().to_string();
        ["-kernel", &probe, "-append", "poweroff now", "-netdev", netdev, "-device", "virtio-net-pci,netdev=n0"]
            .map(str::to_string)
    };
    let argv = args(&netdev);
    let mut cmd = kestrel(&argv.iter().map(String::as_str).collect::<Vec<_>>());
    inherit_fd(&mut cmd, duplicate(&tap), TAP_FD);
    let run = run_with_timeout(cmd, Duration::from_secs(30));
    run.assert_success();
    run.assert_stdout_has("probe: poweroff");
    // SAFETY: F_GETFL returns flags; TUNGETVNETHDRSZ writes one int into `header`.
    let (status, header) = unsafe {
        let mut header: libc::c_int = 0;
        assert_eq!(libc::ioctl(raw, libc::TUNGETVNETHDRSZ, &mut header), 0);
        (libc::fcntl(raw, libc::F_GETFL), header)
    };
    assert_ne!(status & libc::O_NONBLOCK, 0, "kestrel made the inherited tap non-blocking");
    assert_eq!(header, VNET_HDR_LEN as libc::c_int, "kestrel set the vnet header size");
    drop(tap);

    // Not inherited: nothing is open on descriptor TAP_FD in the child.
    let argv = args(&netdev);
    let run = run_with_timeout(kestrel(&argv.iter().map(String::as_str).collect::<Vec<_>>()), Duration::from_secs(10));
    assert!(!run.status.success(), "{}", run.describe());
    assert_eq!(run.stderr.trim().lines().count(), 1, "{}", run.describe());
    assert!(run.stderr.contains(&format!("descriptor {TAP_FD} was not passed to Kestrel")), "{}", run.describe());

    // Inherited, but /dev/null.
    let mut cmd = kestrel(&argv.iter().map(String::as_str).collect::<Vec<_>>());
    inherit_fd(&mut cmd, std::fs::File::open("/dev/null").unwrap().into(), TAP_FD);
    let run = run_with_timeout(cmd, Duration::from_secs(10));
    assert!(!run.status.success(), "{}", run.describe());
    assert_eq!(run.stderr.trim().lines().count(), 1, "{}", run.describe());
    assert!(run.stderr.contains(&format!("descriptor {TAP_FD} is not a tap interface")), "{}", run.describe());
}

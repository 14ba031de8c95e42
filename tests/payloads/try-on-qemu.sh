#!/usr/bin/env bash
# Boot the probe payloads under Debian's QEMU (-M pc, SeaBIOS) and check their console output.
# A developer tool for working on the payloads without Kestrel; not part of CI.
#
# Usage: tests/payloads/try-on-qemu.sh [OUT_DIR]     (builds into OUT_DIR, default tests/payloads/build)
#        ACCEL=tcg tests/payloads/try-on-qemu.sh      (force TCG for every run)
#
# QEMU boots probe.bzImage through its real-mode option ROM (our setup-sector stub -> 32-bit entry at
# code32_start) and probe.pvh.elf through the PVH note. It cannot boot probe.elf (no PVH note); that shape is
# exercised by Kestrel's own tests.
#
# Verified (Debian 12, QEMU 7.2, this project's KVM-PVM host), bzImage and PVH shapes each:
#   KVM: smp (-smp 4: 4/4), poweroff, rtc, mmio (QEMU's pc reads 0x00000000 there, Kestrel must read
#        0xffffffff), echo, unknown command, spin (still running after 8 s).
#   TCG: reset (boots 1, 2, 3 then "reset done"), triplefault (QEMU -no-reboot exits).
#   On KVM-PVM, QEMU hangs in SeaBIOS after the second reset, and a triple fault resets the guest instead of
#   exiting under -no-reboot: both are this host's KVM, so those two run under TCG here.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/build}
make -s -C "$here" OUT="$out"

kvm_accel=${ACCEL:-kvm}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failures=0

# run NAME ACCEL KERNEL CMDLINE TIMEOUT [extra qemu args...]: boot, leave the console in $tmp/NAME.log.
# Returns QEMU's exit status (124 on timeout).
run() {
    local name=$1 accel=$2 kernel=$3 cmdline=$4 limit=$5
    shift 5
    local rc=0
    timeout "$limit" qemu-system-x86_64 -accel "$accel" -M pc -m 256 -display none -nodefaults \
        -serial stdio -kernel "$kernel" -append "$cmdline" "$@" </dev/null >"$tmp/$name.log" 2>&1 || rc=$?
    return "$rc"
}

# expect NAME PATTERN...: every extended regex must match a line of the log.
expect() {
    local name=$1 pat
    shift
    for pat in "$@"; do
        if ! tr -d '\r' <"$tmp/$name.log" | grep -aEq -- "$pat"; then
            echo "FAIL $name: no line matching /$pat/"
            sed 's/^/    | /' "$tmp/$name.log" | tr -d '\r' | tail -n 20
            failures=$((failures + 1))
            return 0
        fi
    done
    echo "ok   $name"
}

for shape in bzImage pvh.elf; do
    kernel=$out/probe.$shape
    case $shape in bzImage) kind=bzimage ;; *) kind=pvh ;; esac
    banner="^kestrel-probe: entry=$kind cmdline="

    run "$shape-poweroff" "$kvm_accel" "$kernel" "poweroff" 20 -no-reboot || true
    expect "$shape-poweroff" "${banner}\"poweroff\"\$" '^probe: poweroff$'

    run "$shape-smp" "$kvm_accel" "$kernel" "smp" 30 -no-reboot -smp 4 || true
    expect "$shape-smp" '^probe: cpu 0 up$' '^probe: cpu 1 up$' '^probe: cpu 2 up$' '^probe: cpu 3 up$' \
        '^probe: smp 4/4 cpus$'

    run "$shape-rtc" "$kvm_accel" "$kernel" "rtc" 20 -no-reboot || true
    expect "$shape-rtc" "^probe: rtc $(date -u +%Y-%m-%d) [0-2][0-9]:[0-5][0-9]:[0-5][0-9]\$"

    run "$shape-mmio" "$kvm_accel" "$kernel" "mmio" 20 -no-reboot || true
    expect "$shape-mmio" '^probe: mmio read 0x[0-9a-f]{8}$'

    run "$shape-unknown" "$kvm_accel" "$kernel" "frobnicate now" 20 -no-reboot || true
    expect "$shape-unknown" "${banner}\"frobnicate now\"\$" '^probe: unknown command$'

    rc=0
    run "$shape-spin" "$kvm_accel" "$kernel" "spin" 8 -no-reboot || rc=$?
    if [ "$rc" = 124 ]; then expect "$shape-spin" "${banner}\"spin\"\$"; else
        echo "FAIL $shape-spin: QEMU exited ($rc) instead of spinning"; failures=$((failures + 1)); fi

    # Resets need QEMU to reboot: no -no-reboot. TCG: see the header.
    run "$shape-reset" tcg "$kernel" "reset" 60 || true
    expect "$shape-reset" '^probe: boot 1$' '^probe: boot 2$' '^probe: boot 3$' '^probe: reset done$'

    rc=0
    run "$shape-triplefault" tcg "$kernel" "triplefault" 30 -no-reboot || rc=$?
    if [ "$rc" != 124 ] && ! grep -aq 'did not happen' "$tmp/$shape-triplefault.log"; then
        echo "ok   $shape-triplefault"
    else echo "FAIL $shape-triplefault (rc $rc)"; failures=$((failures + 1)); fi

    # echo: feed input only after the guest says it is ready, through a FIFO on QEMU's stdin.
    mkfifo "$tmp/in"
    timeout 30 qemu-system-x86_64 -accel "$kvm_accel" -M pc -m 256 -display none -nodefaults -no-reboot \
        -serial stdio -kernel "$kernel" -append "echo" <"$tmp/in" >"$tmp/$shape-echo.log" 2>&1 &
    qemu_pid=$!
    exec 3>"$tmp/in"
    for _ in $(seq 100); do
        grep -aq 'probe: echo ready' "$tmp/$shape-echo.log" && break
        sleep 0.1
    done
    printf 'hello q' >&3
    wait "$qemu_pid" || true
    exec 3>&-
    rm -f "$tmp/in"
    expect "$shape-echo" '^probe: echo ready$' '^hello q$' '^probe: echo done$'
done

if [ "$failures" -ne 0 ]; then
    echo "$failures check(s) failed"
    exit 1
fi
echo "all QEMU checks passed"

# Shared part of the emulated runners (sourced by ci/runner/<arch>). An architecture's script sets:
#   RUNNER_ARCH      x86_64, aarch64, ...
#   RUST_TRIPLE      the target kestrel is built for (statically)
#   L2_CONSOLE       the guest's console= argument
#   RUNNER_CC        a C compiler for RUNNER_ARCH that links statically (for ci/runner/kvm-probe.c)
#   kernel_file()    maps a case's "kernel" kind (image, vmlinux) to a file in the guest artifact directory
#   boot_l1()        boots L1 (kernel "$guest/kernel/...", initramfs "$1"), its console on stdout
# and calls runner_main "$@".

set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

rlog() { printf 'ci/runner: %s\n' "$*" >&2; }
rdie() { printf 'ci/runner: error: %s\n' "$*" >&2; exit 2; }

# Installs missing Debian packages: "command:package" pairs.
runner_need() {
  local need=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
  done
  [ ${#need[@]} -eq 0 ] && return
  rlog "installing ${need[*]}"
  local sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq -o DPkg::Lock::Timeout=300 || true
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=300 \
    --no-install-recommends "${need[@]}" >&2
}

# Parses the cases file into case directories for L1 ($1/NN-name/) and spec files for checking
# ($2/name.spec: the case's key lines). Prints the names of the cases that apply to this arch.
runner_parse_cases() {
  local file="$1" l1dir="$2" specdir="$3"
  mkdir -p "$l1dir" "$specdir"
  local n=0 name="" line key value
  local -a names=()
  while IFS= read -r line || [ -n "$line" ]; do
    line="${line%%$'\r'}"
    [[ "$line" =~ ^[[:space:]]*(#.*)?$ ]] && continue
    if [[ "$line" =~ ^case[[:space:]]+([A-Za-z0-9_.-]+)[[:space:]]*$ ]]; then
      name="${BASH_REMATCH[1]}"
      [ -e "$specdir/$name.spec" ] && rdie "case $name is defined twice in $file"
      : >"$specdir/$name.spec"
      names+=("$name")
      continue
    fi
    [[ "$line" =~ ^[[:space:]]+([a-z-]+)([[:space:]]+(.*))?$ ]] || rdie "$file: cannot parse: $line"
    [ -n "$name" ] || rdie "$file: key outside a case: $line"
    key="${BASH_REMATCH[1]}" value="${BASH_REMATCH[3]:-}"
    value="${value%"${value##*[![:space:]]}"}"
    case "$key" in
      arch|kernel|guest|cmdline|args|work|prompt|input|qmp|chat|save-at|disk|netns|until|test|expect-exit|expect|expect-count|expect-value|expect-epoch|expect-same|expect-restored|expect-restored-none|expect-steps) ;;
      timeout) rdie "$file: case $name: 'timeout' is gone: budgets are multiples of boots measured in L1 (ci/runner/case-loop.sh); say 'work N' for a case whose work after boot 1 may take more than the default 2 boots" ;;
      *) rdie "$file: case $name: unknown key $key" ;;
    esac
    printf '%s\t%s\n' "$key" "$value" >>"$specdir/$name.spec"
  done <"$file"

  for name in "${names[@]}"; do
    local spec="$specdir/$name.spec"
    local archs kind guest_action cmdline args work
    archs="$(spec_get "$spec" arch)"
    if [ -n "$archs" ] && ! grep -qw -- "$RUNNER_ARCH" <<<"$archs"; then
      rm -f "$spec"
      continue
    fi
    kind="$(spec_get "$spec" kernel)"; kind="${kind:-image}"
    guest_action="$(spec_get "$spec" guest)"
    cmdline="$L2_CONSOLE${guest_action:+ kestrel.case=$guest_action}"
    [ -n "$(spec_get "$spec" cmdline)" ] && cmdline+=" $(spec_get "$spec" cmdline)"
    args="$(spec_get "$spec" args)"
    work="$(spec_get "$spec" work)"
    [ -z "$work" ] || [[ "$work" =~ ^[1-9][0-9]*$ ]] || rdie "case $name: work must be a positive whole number (a factor of the case's boot 1)"
    n=$((n + 1))
    local d
    d="$l1dir/$(printf '%02d' "$n")-$name"
    mkdir -p "$d"
    echo "$name" >"$d/name"
    [ -n "$work" ] && echo "$work" >"$d/work"
    local test_target
    test_target="$(spec_get "$spec" test)"
    {
      # test NAME: the case runs that Rust test binary (built statically, see runner_test_binaries) instead of
      # kestrel, with the case's args; KVM is required there.
      if [ -n "$test_target" ]; then
        echo "$test_target" >"$d/program"
      else
        printf '%s\n' --kernel "/guest/$(kernel_file "$kind")" --initrd /guest/initrd.gz --cmdline "$cmdline"
      fi
      # shellcheck disable=SC2086
      [ -n "$args" ] && printf '%s\n' $args
    } >"$d/args"
    if [ -n "$(spec_get "$spec" input)" ]; then
      spec_get "$spec" input >"$d/input"
      spec_get "$spec" prompt >"$d/prompt"
      [ -s "$d/prompt" ] || rdie "case $name: input needs a prompt"
    fi
    if [ -n "$(spec_get "$spec" qmp)" ]; then
      spec_get "$spec" qmp >"$d/qmp"
      spec_get "$spec" prompt >"$d/prompt"
      [ -s "$d/prompt" ] || rdie "case $name: qmp needs a prompt"
    fi
    # chat PORT TEXT: once the console shows the prompt, talk to kestrel's socket chardev on 127.0.0.1:PORT
    # (case-loop.sh).
    if [ -n "$(spec_get "$spec" chat)" ]; then
      [[ "$(spec_get "$spec" chat)" =~ ^[0-9]+\ . ]] || rdie "case $name: chat takes a port and the text to send"
      spec_get "$spec" chat >"$d/chat"
      spec_get "$spec" prompt >"$d/prompt"
      [ -s "$d/prompt" ] || rdie "case $name: chat needs a prompt"
    fi
    # save-at PATTERN: save over QMP once the console matches, then restore into a second kestrel (case-loop.sh).
    local save_at
    save_at="$(spec_get "$spec" save-at)"
    if [ -n "$save_at" ]; then
      [[ " $args " == *" --qmp tcp:127.0.0.1:4444,server=on,wait=off "* ]] \
        || rdie "case $name: save-at needs '--qmp tcp:127.0.0.1:4444,server=on,wait=off' in its args"
      [ -z "$(spec_get "$spec" qmp)" ] && [ -z "$(spec_get "$spec" until)" ] \
        || rdie "case $name: save-at cannot be combined with qmp or until"
      printf '%s\n' "$save_at" >"$d/save-at"
    fi
    # disk NAME SIZE_MIB [PATTERN]: a raw image made in L1 before the case, filled with PATTERN (a byte, as
    # printf %b escape) or zeros; its sha256 is printed after the case as DISK-SHA256 NAME <hash>.
    awk -F'\t' '$1 == "disk" { print $2 }' "$spec" >"$d/disks"
    [ -s "$d/disks" ] || rm -f "$d/disks"
    [ -n "$(spec_get "$spec" until)" ] && spec_get "$spec" until >"$d/until"
    # netns SCRIPT: the case runs in a private network namespace that ci/runner/SCRIPT sets up and tears down.
    local netns
    netns="$(spec_get "$spec" netns)"
    if [ -n "$netns" ]; then
      [[ "$netns" =~ ^[A-Za-z0-9_.-]+$ ]] && [ -f "$repo/ci/runner/$netns" ] || rdie "case $name: no script ci/runner/$netns"
      cp "$repo/ci/runner/$netns" "$d/netns"
    fi
    echo "$name"
  done
}

spec_get() { awk -F'\t' -v k="$2" '$1 == k { print $2; exit }' "$1"; }

# The L2 initramfs: busybox + ci/guest/init + the guest's modules.
runner_l2_initrd() {
  local out="$1" stage
  stage="$(mktemp -d)"
  mkdir -p "$stage/bin" "$stage/dev" "$stage/proc" "$stage/sys" "$stage/tmp" "$stage/modules"
  cp "$guest/busybox" "$stage/bin/busybox"
  cp "$guest/guest-modules/"* "$stage/modules/"
  cp "$repo/ci/guest/init" "$stage/init"
  chmod 755 "$stage/init" "$stage/bin/busybox"
  mknod -m 600 "$stage/dev/console" c 5 1
  mknod -m 666 "$stage/dev/null" c 1 3
  (cd "$stage" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 | gzip -1) >"$out"
  rm -rf "$stage"
}

# The static kestrel.
runner_kestrel() {
  if [ -n "${KESTREL_STATIC_BIN:-}" ]; then
    echo "$KESTREL_STATIC_BIN"
    return
  fi
  rlog "building a static kestrel for $RUST_TRIPLE"
  (cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" cargo build -q --release --locked -p vmm \
    --target "$RUST_TRIPLE" >&2) || rdie "building the static kestrel failed"
  echo "${CARGO_TARGET_DIR:-$repo/target}/$RUST_TRIPLE/release/kestrel"
}

# ci/runner/kvm-probe.c built statically for RUNNER_ARCH into $1/kvm-probe; prints its path, or nothing (with
# the reason on stderr) when it cannot be built: it only makes a KVM failure in L1 easier to read.
runner_kvm_probe() {
  local out="$1/kvm-probe"
  if ! command -v "${RUNNER_CC:-}" >/dev/null 2>&1; then
    rlog "no C compiler '${RUNNER_CC:-}' for $RUNNER_ARCH: L1 runs without ci/runner/kvm-probe"
    return 0
  fi
  if ! "$RUNNER_CC" -static -Os -Wall -o "$out" "$repo/ci/runner/kvm-probe.c" >&2; then
    rlog "building ci/runner/kvm-probe.c with $RUNNER_CC failed: L1 runs without it"
    return 0
  fi
  echo "$out"
}

# The test binaries that cases name with "test NAME" (vmm's [[test]] targets), built statically for RUST_TRIPLE
# into $2/; prints nothing.
runner_test_binaries() {
  local cases="$1" out="$2" names name json
  names="$(cat "$cases"/*/program 2>/dev/null | sort -u || true)"
  [ -n "$names" ] || return 0
  mkdir -p "$out"
  for name in $names; do
    rlog "building the $name tests statically for $RUST_TRIPLE"
    json="$(cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" cargo test -q --release --locked -p vmm \
      --test "$name" --target "$RUST_TRIPLE" --no-run --message-format=json)" || rdie "building the $name tests failed"
    local bin
    bin="$(printf '%s\n' "$json" | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)"
    [ -x "$bin" ] || rdie "no test binary for $name"
    cp "$bin" "$out/$name"
  done
}

# The L1 initramfs: busybox, the runner's init, the KVM modules, kestrel, the guest's kernels and initramfs,
# and the cases. Uncompressed: L1 runs under TCG, where decompressing ~80 MB would cost seconds.
runner_l1_initrd() {
  local out="$1" kestrel_bin="$2" cases="$3" stage
  stage="$(mktemp -d)"
  mkdir -p "$stage/bin" "$stage/dev" "$stage/proc" "$stage/sys" "$stage/tmp" "$stage/guest" "$stage/modules"
  cp "$guest/busybox" "$stage/bin/busybox"
  cp "$repo/ci/runner/init-l1" "$stage/init"
  cp "$repo/ci/runner/case-loop.sh" "$stage/case-loop.sh"
  cp "$kestrel_bin" "$stage/bin/kestrel"
  chmod 755 "$stage/init" "$stage/bin/busybox" "$stage/bin/kestrel"
  [ -n "${kvm_probe:-}" ] && cp "$kvm_probe" "$stage/bin/kvm-probe"
  runner_test_binaries "$cases" "$stage/bin"
  cp "$guest/modules/"* "$stage/modules/"
  cp -r "$cases" "$stage/cases"
  echo "KESTREL-GUEST-UP" >"$stage/cases/marker"
  # KESTREL_BUDGET_<X> in the environment overrides case-loop.sh's BUDGET_<X> (factors, floors, the ceiling).
  env | sed -n 's/^KESTREL_\(BUDGET_[A-Z_]*=[0-9][0-9]*\)$/\1/p' >"$stage/cases/budget"
  local f
  for f in "$guest/kernel/"*; do ln "$f" "$stage/guest/" 2>/dev/null || cp "$f" "$stage/guest/"; done
  runner_l2_initrd "$stage/guest/initrd.gz"
  mknod -m 600 "$stage/dev/console" c 5 1
  mknod -m 666 "$stage/dev/null" c 1 3
  (cd "$stage" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) >"$out"
  rm -rf "$stage"
}

# case_section LOG NAME PART: the case's console (PART=out), stderr (err), END line (end) or TIMING lines without
# their prefix (timing: each phase's time and budget), \r removed.
case_section() {
  awk -v name="$2" -v part="$3" '
    { gsub(/\r/, "") }
    $0 == "=== CASE " name " BEGIN" { s = "out"; next }
    $0 == "=== CASE " name " STDERR" { s = "err"; next }
    index($0, "=== CASE " name " END ") == 1 { if (part == "end") print; s = ""; next }
    index($0, "=== CASE " name " TIMING ") == 1 { if (part == "timing") print substr($0, length("=== CASE " name " TIMING ") + 1); next }
    s == part { print }
  ' "$1"
}

end_field() { tr ' ' '\n' <<<"$1" | sed -n "s/^$2=//p"; }

# Checks every case against its expectations; prints PASS/FAIL lines (and the tail of the console on
# failure). Returns non-zero when a case failed.
runner_check() {
  local log="$1" specdir="$2" failed=0 name spec n_pass=0 n_fail=0 n_retried=0 retried_names=()
  shift 2
  for name in "$@"; do
    spec="$specdir/$name.spec"
    # A case whose first attempt died in early boot with a known signature of the emulated environment was run
    # again by L1 (up to BUDGET_EARLY_RETRIES times, ci/runner/case-loop.sh), or by a new L1 when L1 itself
    # stopped during it; say so loudly, whatever the last attempt did.
    local retry
    retry="$(tr -d '\r' <"$log" | sed -n "s/.*=== CASE $name RETRY first attempt: //p" | head -n1)"
    local more
    more="$(tr -d '\r' <"$log" | sed -n "s/.*=== CASE $name RETRY \(attempt [0-9]*: .*\)/\1/p")"
    [ -n "$more" ] && retry="$retry; then $(paste -sd ';' <<<"$more" | sed 's/;/; /g')"
    if [ -n "$retry" ]; then
      n_retried=$((n_retried + 1)) retried_names+=("$name")
      printf 'RETRIED: %s first attempt: %s\n' "$name" "$retry"
    fi
    local out end problems=() key value code reason
    out="$(case_section "$log" "$name" out)"
    end="$(case_section "$log" "$name" end)"
    if [ -z "$end" ]; then
      local abandoned
      abandoned="$(tr -d '\r' <"$log" | sed -n "s/.*=== CASE $name ABANDONED: //p" | head -n1)"
      problems+=("no result (L1 did not finish the case${abandoned:+: $abandoned})")
    else
      code="$(end_field "$end" exit)" reason="$(end_field "$end" reason)"
      if [ -n "$(spec_get "$spec" until)" ]; then
        [ "$reason" = until ] || problems+=("kestrel was not stopped by 'until' (reason=$reason exit=$code)")
      elif [ "$reason" != exit ]; then
        problems+=("kestrel did not exit by itself (reason=$reason)")
      fi
      [ "$reason" = timeout ] && problems+=("out of time: $(case_section "$log" "$name" timing | grep TIMEOUT | head -n 1)")
      while IFS=$'\t' read -r key value; do
        case "$key" in
          expect-exit)
            [ "$reason" = exit ] && [ "$code" = "$value" ] || problems+=("exit=$code reason=$reason, expected exit $value") ;;
          expect)
            grep -Eq -- "$value" <<<"$out" || problems+=("no console line matches /$value/") ;;
          expect-count)
            local want="${value%% *}" re="${value#* }" got
            got="$(grep -Ec -- "$re" <<<"$out" || true)"
            [ "$got" = "$want" ] || problems+=("$got lines match /$re/, expected $want") ;;
          expect-value)
            local k min max v
            read -r k min max <<<"$value"
            v="$(sed -n "s/^$k=\([0-9][0-9]*\)\$/\1/p" <<<"$out" | head -n1)"
            { [ -n "$v" ] && [ "$v" -ge "$min" ] && [ "$v" -le "$max" ]; } \
              || problems+=("$k=${v:-missing}, expected $min..$max") ;;
          expect-same)
            local k1 k2 v1 v2
            read -r k1 k2 <<<"$value"
            v1="$(sed -n "s/^$k1=\([^ ]*\)\$/\1/p" <<<"$out" | head -n1)"
            v2="$(sed -n "s/^$k2=\([^ ]*\)\$/\1/p" <<<"$out" | head -n1)"
            { [ -n "$v1" ] && [ "$v1" = "$v2" ]; } || problems+=("$k1=${v1:-missing} and $k2=${v2:-missing} differ") ;;
          expect-restored|expect-restored-none)
            # The console after the restore's separator (case-loop.sh), which must be there.
            local restored
            restored="$(sed -n '/^KESTREL-RESTORE /,$p' <<<"$out" | tail -n +2)"
            if ! grep -q '^KESTREL-RESTORE ' <<<"$out"; then
              problems+=("$key /$value/: no restore (no KESTREL-RESTORE line; $(grep -m1 '^KESTREL-RESTORE-SKIPPED' <<<"$out" || echo 'no save either'))")
            elif [ "$key" = expect-restored ]; then
              grep -Eq -- "$value" <<<"$restored" || problems+=("no console line after the restore matches /$value/")
            elif grep -Eq -- "$value" <<<"$restored"; then
              problems+=("after the restore, the console has $(grep -Ec -- "$value" <<<"$restored") line(s) matching /$value/, e.g. $(grep -Em1 -- "$value" <<<"$restored")")
            fi ;;
          expect-steps)
            # Each KEY=<number> field followed by more on its line (so never a line the save cut short), over
            # the whole console: each value above the one before, by at most MAXSTEP.
            local k maxstep bad
            read -r k maxstep <<<"$value"
            bad="$(awk -v k="$k=" -v max="$maxstep" '
              { for (i = 1; i < NF; i++) if (index($i, k) == 1) {
                  v = substr($i, length(k) + 1)
                  if (v !~ /^[0-9]+(\.[0-9]+)?$/) continue
                  if (n && !bad && !(v + 0 > prev + 0 && v - prev <= max + 0)) bad = prev " then " v
                  prev = v; n++ } }
              END { if (bad != "") print bad; else if (n < 2) print "fewer than two values" }' <<<"$out")"
            [ -z "$bad" ] || problems+=("$k= does not step forward by at most $maxstep: $bad") ;;
          expect-epoch)
            local k tol v s e
            read -r k tol <<<"$value"
            v="$(sed -n "s/^$k=\([0-9][0-9]*\)\$/\1/p" <<<"$out" | head -n1)"
            s="$(end_field "$end" l1_epoch_start)" e="$(end_field "$end" l1_epoch_end)"
            { [ -n "$v" ] && [ "$v" -ge $((s - tol)) ] && [ "$v" -le $((e + tol)) ]; } \
              || problems+=("$k=${v:-missing}, expected within ${tol}s of L1's clock $s..$e") ;;
        esac
      done <"$spec"
    fi
    local ms marker_ms
    ms="$(end_field "$end" ms)" marker_ms="$(end_field "$end" marker_ms)"
    if [ ${#problems[@]} -eq 0 ]; then
      n_pass=$((n_pass + 1))
      printf 'PASS %-14s %6s ms (marker at %s ms)%s\n' "$name" "${ms:-?}" "${marker_ms:-?}" "${retry:+ on the second attempt}"
      case_section "$log" "$name" timing | sed 's/^/     time: /'
    else
      failed=1 n_fail=$((n_fail + 1))
      printf 'FAIL %-14s %6s ms (marker at %s ms)\n' "$name" "${ms:-?}" "${marker_ms:-?}"
      printf '     - %s\n' "${problems[@]}"
      case_section "$log" "$name" timing | sed 's/^/     time: /'
      printf '     guest console (last 20 lines):\n'
      tail -n 20 <<<"$out" | sed 's/^/     | /'
      printf '     kestrel stderr (last 20 lines):\n'
      case_section "$log" "$name" err | tail -n 20 | sed 's/^/     | /'
    fi
  done
  printf 'runner %s: %d passed, %d failed, %d retried%s\n' "$RUNNER_ARCH" "$n_pass" "$n_fail" "$n_retried" \
    "${retried_names[*]:+ (RETRIED: ${retried_names[*]}; failures of the emulated environment: early-boot faults, see ci/runner/compare-qemu, L1 stalling during a case that timed out, or L1 stopping)}"
  return $failed
}

# runner_l1_silence LOG: how long L1's case loop may stay silent before L1 counts as stopped, in seconds. The case
# loop prints a frame line ("=== ...") at least every 10 s of L1 time (ci/runner/case-loop.sh), so silence means L1
# itself stopped; how long L1 may take for that scales with its measured speed: 30 times its boot to userspace (L1
# is slow to the same degree everywhere), at least 120 s. Before L1 has said how long it took to boot: 300 s (L1
# boots in 2-10 s under TCG). KESTREL_RUNNER_SILENCE overrides it (small values are for testing the watchdog).
runner_l1_silence() {
  if [ -n "${KESTREL_RUNNER_SILENCE:-}" ]; then echo "$KESTREL_RUNNER_SILENCE"; return; fi
  local up
  up="$(grep -a -m1 -o '=== RUNNER L1-UP uptime_ms=[0-9]*' "$1" 2>/dev/null | sed 's/.*=//' || true)"
  if [ -z "$up" ]; then echo 300; return; fi
  up=$((30 * up / 1000))
  echo $((up > 120 ? up : 120))
}

# runner_seconds_left: whole seconds of the runner's wall-clock budget (KESTREL_RUNNER_DEADLINE seconds from the
# runner's start, every L1 included) that remain; 0 when it ran out.
runner_seconds_left() {
  local left=$(( runner_deadline - $(date +%s) ))
  echo $(( left > 0 ? left : 0 ))
}

# runner_boot_watched INITRD TOTAL LOG: boot_l1 with its console in LOG, killed when the case loop's frame lines
# ("=== ...") have stopped for longer than runner_l1_silence allows, or when the runner's wall-clock budget runs
# out. Only frame lines count: a wedged L1 kernel can go on printing (soft lockup and RCU stall reports) while
# the case loop that owes the heartbeats is stuck. Prints every finished case on stderr as it ends, so a CI log
# shows how far the runner got and how long each case took. Returns QEMU's status (the watchdogs' kill: 124).
runner_boot_watched() {
  local initrd="$1" secs="$2" out="$3" pid frames last_frames=-1 quiet=0 rc=0 silence reported=0 line
  l1_pidfile="$work/l1.pid"
  rm -f "$l1_pidfile"
  local left
  left="$(runner_seconds_left)"
  [ "$secs" -le "$left" ] || secs="$left"
  if [ "$secs" -le 0 ]; then
    rlog "the runner's wall-clock budget (${runner_budget}s) is used up: no L1 boots"
    return 124
  fi
  boot_l1 "$initrd" "$secs" >"$out" 2>&1 </dev/null &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 2
    frames="$(grep -ac '=== ' "$out" 2>/dev/null || true)"
    if [ "$frames" = "$last_frames" ]; then quiet=$((quiet + 2)); else quiet=0 last_frames="$frames"; fi
    while IFS= read -r line; do
      reported=$((reported + 1))
      rlog "$RUNNER_ARCH +$(( $(date +%s) - runner_started ))s: ${line#*=== CASE }"
    done < <(tr -d '\r' <"$out" | grep -a '=== CASE [A-Za-z0-9_.-]* \(END\|RETRY\) ' | tail -n "+$((reported + 1))")
    silence="$(runner_l1_silence "$out")"
    if [ "$quiet" -ge "$silence" ] && [ -s "$l1_pidfile" ]; then
      last_silence=$silence
      rlog "L1's case loop has been silent for ${quiet}s (allowed: ${silence}s): L1 stopped responding; killing it"
      kill "$(cat "$l1_pidfile")" 2>/dev/null || true
      wait "$pid" || true
      return 124
    fi
    if [ "$(runner_seconds_left)" -le 0 ] && [ -s "$l1_pidfile" ]; then
      budget_ran_out=1
      rlog "the runner's wall-clock budget (${runner_budget}s, KESTREL_RUNNER_DEADLINE) ran out; killing L1"
      kill "$(cat "$l1_pidfile")" 2>/dev/null || true
      wait "$pid" || true
      return 124
    fi
  done
  wait "$pid" || rc=$?
  return $rc
}

# runner_main [CASES_FILE] : builds what is missing, boots L1 once for all cases, checks them.
# Environment: KESTREL_RUNNER_LOG (L1 console log; default target/runner/<arch>/console-<pid>.log, with
# console.log linking to the latest),
# KESTREL_RUNNER_TIMEOUT (seconds for one L1 run, a backstop: default 300 + the cases' ceilings; the cases'
# own budgets, multiples of measured boots, end a hung case long before, see ci/runner/case-loop.sh),
# KESTREL_RUNNER_DEADLINE (seconds of wall clock for the whole runner, building and every L1 included; default
# 1500: a whole run takes 5-8 minutes here, and CI has 90 minutes for everything, both runners included; when it
# runs out, L1 is stopped and every case without a result fails as "not run: the runner's wall-clock budget ran
# out"),
# KESTREL_STATIC_BIN (use this static kestrel instead of building one),
# KESTREL_RUNNER_SILENCE (seconds of console silence after which L1 counts as stopped; default: runner_l1_silence),
# KESTREL_BUDGET_<X> (override case-loop.sh's BUDGET_<X>: factors, floors, the ceiling).
runner_main() {
  local cases_file="${1:-$repo/ci/runner/linux.cases}"
  [ -f "$cases_file" ] || rdie "no cases file $cases_file"
  local t_start
  t_start="$(date +%s%N)"
  runner_started="$(date +%s)" runner_budget="${KESTREL_RUNNER_DEADLINE:-1500}" budget_ran_out=0
  [[ "$runner_budget" =~ ^[1-9][0-9]*$ ]] || rdie "KESTREL_RUNNER_DEADLINE must be a positive number of seconds"
  runner_deadline=$((runner_started + runner_budget))
  # A private work directory per run: runs may overlap (a test run and a manual one).
  local top="${CARGO_TARGET_DIR:-$repo/target}/runner/$RUNNER_ARCH"
  mkdir -p "$top"
  local work
  work="$(mktemp -d "$top/run.XXXXXX")"
  # shellcheck disable=SC2064
  trap "rm -rf '$work'" EXIT
  local log="${KESTREL_RUNNER_LOG:-$top/console-$$.log}"
  [ -n "${KESTREL_RUNNER_LOG:-}" ] || ln -sfn "$(basename "$log")" "$top/console.log"

  guest="$("$repo/ci/guest/fetch" "$RUNNER_ARCH")"
  local kestrel_bin
  kestrel_bin="$(runner_kestrel)" || exit 2
  if [ -n "${KESTREL_STATIC_BIN:-}" ]; then
    rlog "kestrel: $KESTREL_STATIC_BIN (KESTREL_STATIC_BIN)"
  else
    rlog "kestrel built from $(cd "$repo" && git rev-parse --short HEAD)$(cd "$repo" && git diff --quiet HEAD -- arch hypervisor devices vmm Cargo.toml Cargo.lock || echo ' + uncommitted changes in the work tree')"
  fi
  [ -x "$kestrel_bin" ] || rdie "no kestrel binary at $kestrel_bin"
  kvm_probe="$(runner_kvm_probe "$work")"

  local names
  names="$(runner_parse_cases "$cases_file" "$work/cases" "$work/specs")"
  [ -n "$names" ] || rdie "no cases for $RUNNER_ARCH in $cases_file"
  local n_cases ceiling_ms total d
  n_cases="$(wc -w <<<"$names")"
  ceiling_ms="${KESTREL_BUDGET_CEILING_MS:-$(sed -n 's/^: .*BUDGET_CEILING_MS:=\([0-9]*\).*/\1/p' "$repo/ci/runner/case-loop.sh")}"
  [[ "$ceiling_ms" =~ ^[0-9]+$ ]] || rdie "cannot read BUDGET_CEILING_MS from ci/runner/case-loop.sh"
  total="${KESTREL_RUNNER_TIMEOUT:-$((300 + n_cases * ceiling_ms / 1000))}"

  runner_l1_initrd "$work/l1-initrd.cpio" "$kestrel_bin" "$work/cases"
  local t_built
  t_built="$(date +%s%N)"
  rlog "prepared in $(( (t_built - t_start) / 1000000 )) ms; booting L1 ($(wc -w <<<"$names") cases, timeout ${total}s, wall-clock budget left $(runner_seconds_left)s), console: $log"

  local qemu_rc=0 last_silence=? l1_boots=1 max_l1_boots="${KESTREL_RUNNER_L1_BOOTS:-4}"
  runner_boot_watched "$work/l1-initrd.cpio" "$total" "$log" || qemu_rc=$?
  # L1 itself stops now and then (nested SVM under TCG: L1 panics with a kernel stack overflow in a vCPU thread,
  # or a soft lockup; see ../shared/notes/emulation.md). Then a new L1 runs the cases without a result, saying so
  # loudly, up to max_l1_boots L1s in all. A case L1 stopped in twice gets no third L1: that may be the case's own
  # doing, and it fails with the reason.
  local missing=() stuck="" boot_log="$log" d rerun
  while :; do
    missing=()
    for d in "$work/cases"/*/; do
      grep -aq "=== CASE $(cat "$d/name") END " "$log" && continue
      grep -aq "=== CASE $(cat "$d/name") ABANDONED" "$log" && continue
      missing+=("$d")
    done
    [ ${#missing[@]} -gt 0 ] || break
    if [ "$budget_ran_out" = 1 ] || [ "$(runner_seconds_left)" -lt 60 ]; then
      for d in "${missing[@]}"; do
        echo "=== CASE $(cat "$d/name") ABANDONED: not run to its end: the runner's wall-clock budget of ${runner_budget}s (KESTREL_RUNNER_DEADLINE) ran out" >>"$log"
      done
      rlog "the runner's wall-clock budget of ${runner_budget}s ran out with ${#missing[@]} case(s) without a result"
      break
    fi
    # The case the last L1 was in when it stopped (none when it stopped before its first case).
    stuck="$(tr -d '\r' <"$boot_log" | sed -n 's/.*=== CASE \([A-Za-z0-9_.-]*\) START$/\1/p' | tail -n 1)"
    if [ "$l1_boots" -ge "$max_l1_boots" ]; then
      rlog "L1 stopped $l1_boots times (last during case ${stuck:-?}, QEMU exit $qemu_rc): no more L1s"
      [ -n "$stuck" ] && echo "=== CASE $stuck ABANDONED: L1 stopped during it, the last of $l1_boots L1s (QEMU exit $qemu_rc)" >>"$log"
      break
    fi
    # The first L1 never got KVM ready: every L1 would fail the same way, so no new one.
    grep -aq '=== RUNNER KVM-READY' "$log" || break
    rerun=()
    for d in "${missing[@]}"; do
      if [ -n "$stuck" ] && [ "$(cat "$d/name")" = "$stuck" ] \
          && grep -aq "=== CASE $stuck RETRY first attempt: L1 stopped" "$log"; then
        echo "=== CASE $stuck ABANDONED: L1 stopped during it twice (QEMU exit $qemu_rc)" >>"$log"
        rlog "L1 stopped during case $stuck twice: it gets no third L1"
        continue
      fi
      rerun+=("$d")
    done
    [ ${#rerun[@]} -gt 0 ] || break
    l1_boots=$((l1_boots + 1))
    rlog "L1 stopped during case ${stuck:-? (before its first case)} (QEMU exit $qemu_rc); booting L1 number $l1_boots for the ${#rerun[@]} case(s) without a result"
    rm -rf "$work/cases2"; mkdir -p "$work/cases2"
    for d in "${rerun[@]}"; do cp -r "$d" "$work/cases2/"; done
    runner_l1_initrd "$work/l1-initrd.cpio" "$kestrel_bin" "$work/cases2"
    {
      echo "=== RUNNER L1 RERUN: L1 number $((l1_boots - 1)) stopped during case ${stuck:-?}; L1 number $l1_boots runs the cases without a result"
      if [ -n "$stuck" ] && ! grep -aq "=== CASE $stuck ABANDONED" "$log"; then
        echo "=== CASE $stuck RETRY first attempt: L1 stopped responding during the case (QEMU exit $qemu_rc, watchdog ${last_silence}s): the emulated runner, not the guest"
      fi
    } >>"$log"
    qemu_rc=0
    boot_log="$log.rerun"
    runner_boot_watched "$work/l1-initrd.cpio" "$total" "$boot_log" || qemu_rc=$?
    cat "$boot_log" >>"$log"
  done
  rm -f "$log.rerun"
  local t_end
  t_end="$(date +%s%N)"
  local l1_up done_line
  l1_up="$(grep -ao '=== RUNNER L1-UP uptime_ms=[0-9]*' "$log" | head -n 1 | sed 's/.*=//' || true)"
  done_line="$(grep -a '=== RUNNER DONE' "$log" | tr -d '\r' | tail -n 1 || true)"
  printf 'runner %s: L1 userspace at %s ms of L1 uptime; QEMU ran %d ms (exit %d); whole run %d ms\n' \
    "$RUNNER_ARCH" "${l1_up:-?}" $(( (t_end - t_built) / 1000000 )) "$qemu_rc" $(( (t_end - t_start) / 1000000 ))
  # The measured reference the cases' budgets derive from, and how it changed during the run.
  tr -d '\r' <"$log" | sed -n 's/^=== RUNNER BUDGET /runner '"$RUNNER_ARCH"': budgets: /p'
  grep -aq '^=== RUNNER NO-KVM' "$log" && { rlog "L1 has no /dev/kvm; see $log"; }
  [ -n "$done_line" ] || rlog "L1 did not finish (no '=== RUNNER DONE'; QEMU exit $qemu_rc): see $log"
  # shellcheck disable=SC2086
  runner_check "$log" "$work/specs" $names
}

# The runner's case loop (POSIX sh: busybox ash in L1, sourced by ci/runner/init-l1; dash on the host, where
# tests/linux_guests.rs drives it with a fake guest). run_case DIR runs the case in DIR and prints it framed:
#   === CASE <name> START                     (then "=== CASE <name> ALIVE ..." every 10 s: the host's L1 watchdog)
#   === CASE <name> BEGIN
#   <the guest's serial console: kestrel's stdout>
#   === CASE <name> STDERR
#   <kestrel's stderr>
#   === CASE <name> END exit=<code> reason=<exit|timeout|until> ms=<elapsed> marker_ms=<first marker or -1>
#       budget_ms=<the deadline in force at the end> l1_epoch_start=<L1 clock at start> l1_epoch_end=<at end>
#       l1_stall_ms=<the longest pause of the case loop itself, see below>
#   === CASE <name> TIMING <phase>: <took> s of a <budget> s budget (<how the budget was derived>)
#
# Time budgets. The emulated runner's speed changes by several times with the machine's load (L1 is QEMU TCG
# sharing the host's cores with everything else), so no budget is a fixed number of seconds: each is a multiple of
# a boot measured on this L1, now, with a floor, and no case outlives an absolute ceiling (a real hang still ends).
#   - The reference boot: before any case has booted, BUDGET_L1_FACTOR times L1's own boot to userspace (passed
#     to budget_init); afterwards the slowest first boot (to the guest's marker) of any case so far, if slower.
#   - A case's first boot (start to the first marker): BUDGET_BOOT_FACTOR x the reference, at least
#     BUDGET_BOOT_FLOOR_MS. A case that never prints the marker on kestrel's stdout (its console elsewhere, or a
#     test binary) has only this phase.
#   - With "until N", boot k+1 (marker k to marker k+1): BUDGET_REBOOT_FACTOR x the case's own boot 1, at least
#     BUDGET_STEP_FLOOR_MS.
#   - Otherwise, the work after boot 1 (marker to exit): the case's "work" factor (default BUDGET_WORK_FACTOR) x
#     its own boot 1, at least BUDGET_STEP_FLOOR_MS. With save-at, that phase includes the save.
#   - With save-at, the restore (the restoring kestrel's start to its exit: loading the snapshot and the guest's
#     work after it): BUDGET_RESTORE_FACTOR x the case's boot 1, at least BUDGET_STEP_FLOOR_MS.
#   - Whatever the multiples say, a case ends BUDGET_CEILING_MS after its start.
# A case whose guest died in early boot with a known signature of the emulated environment (environment_failure below)
# is run again, up to BUDGET_EARLY_RETRIES more times, each retry printed with the failed attempt's tail. The
# flake grows with the machine's load, with old and new kestrel alike: one retry still failed cases at random.
# So is a case that timed out while L1 itself stalled: the case loop polls every 50 ms and records its longest
# pause between two polls (L1's clock runs on while the host does not schedule L1's vCPUs); one of
# BUDGET_L1_STALL_MS or more stalled the guest too (its clock ran on, it did not), which a Linux guest reports as
# a soft lockup or an RCU stall, and its budgets were spent in the stall. A CI run's restored x86_64 guest got its
# first output 22 s after the restoring kestrel started (1-2 s here), then a soft lockup report, and timed out.
# The defaults below can be overridden by the caller (L1 reads /cases/budget first).
#
# Save and restore (the case's save-at file, a grep pattern): once kestrel's stdout matches it, the case loop saves
# the VM over QMP (TCP 127.0.0.1:4444: qmp_capabilities, the events migration capability on, migrate to
# file:$CASE_TMP/<case>.ksnap, and once the MIGRATION event says completed or failed, quit). When the saving
# kestrel has exited after a completed save, a second kestrel starts with the same arguments plus
# -incoming file:$CASE_TMP/<case>.ksnap, its console appended
# to the case's after the host's lines
#   DISK-SHA256-SAVED <disk> <hash>           (each of the case's disks as the saved kestrel left it)
#   KESTREL-RESTORE source_exit=<code> snapshot_bytes=<size> incoming=file:<path>
# and its stderr to the case's after "--- restoring kestrel". The END line's exit and reason are the restoring
# kestrel's. Without a completed save the console gets "KESTREL-RESTORE-SKIPPED: <why>" instead, and no restore.
: "${BUDGET_L1_FACTOR:=6}" "${BUDGET_BOOT_FACTOR:=4}" "${BUDGET_REBOOT_FACTOR:=3}" "${BUDGET_WORK_FACTOR:=2}"
: "${BUDGET_RESTORE_FACTOR:=4}"
: "${BUDGET_BOOT_FLOOR_MS:=60000}" "${BUDGET_STEP_FLOOR_MS:=30000}" "${BUDGET_CEILING_MS:=600000}"
: "${BUDGET_EARLY_RETRIES:=2}" "${BUDGET_L1_STALL_MS:=10000}"
: "${CASE_TMP:=/tmp}" "${marker:=KESTREL-GUEST-UP}"

ms() { awk '{ printf "%d", $1 * 1000 }' /proc/uptime; }
# Milliseconds as seconds, rounded to one decimal.
secs() { set -- $((($1 + 50) / 100)); echo "$(($1 / 10)).$(($1 % 10))"; }

ns_holder=""
# Runs "$@" in the case's network namespace, if it has one.
in_netns() {
  if [ -n "$ns_holder" ]; then nsenter -t "$ns_holder" -n "$@"; else "$@"; fi
}

# budget_init L1_BOOT_MS: the first reference boot, estimated from L1's boot to userspace.
budget_init() {
  ref_ms=$((BUDGET_L1_FACTOR * $1))
  ref_why="${BUDGET_L1_FACTOR}x L1's boot to userspace, $(secs "$1") s"
  echo "=== RUNNER BUDGET reference boot $(secs "$ref_ms") s (${ref_why}); first boot: ${BUDGET_BOOT_FACTOR}x it" \
    "(floor $(secs "$BUDGET_BOOT_FLOOR_MS") s); boot k+1: ${BUDGET_REBOOT_FACTOR}x the case's boot 1; work after boot 1:" \
    "the case's factor (default ${BUDGET_WORK_FACTOR}) x its boot 1 (floor $(secs "$BUDGET_STEP_FLOOR_MS") s);" \
    "a restore: ${BUDGET_RESTORE_FACTOR}x the case's boot 1 (same floor);" \
    "ceiling $(secs "$BUDGET_CEILING_MS") s a case"
}

# set_phase: the deadline (ms after t0) and its explanation for the phase the case is in, from the markers seen.
set_phase() {
  if [ "$restoring" = 1 ]; then
    phase="restore" phase_start=$restore_start
    budget=$((BUDGET_RESTORE_FACTOR * marker_ms)) floor=$BUDGET_STEP_FLOOR_MS
    why="${BUDGET_RESTORE_FACTOR}x boot 1's $(secs "$marker_ms") s"
  elif [ "$seen" = 0 ]; then
    phase="boot 1" phase_start=0
    budget=$((BUDGET_BOOT_FACTOR * ref_ms)) floor=$BUDGET_BOOT_FLOOR_MS
    why="${BUDGET_BOOT_FACTOR}x the reference boot's $(secs "$ref_ms") s"
  elif [ "$until_n" -gt 0 ]; then
    phase="boot $((seen + 1))" phase_start=$last_marker_ms
    budget=$((BUDGET_REBOOT_FACTOR * marker_ms)) floor=$BUDGET_STEP_FLOOR_MS
    why="${BUDGET_REBOOT_FACTOR}x boot 1's $(secs "$marker_ms") s"
  else
    phase="work after boot 1" phase_start=$marker_ms
    budget=$((work * marker_ms)) floor=$BUDGET_STEP_FLOOR_MS
    why="${work}x boot 1's $(secs "$marker_ms") s"
  fi
  if [ "$budget" -lt "$floor" ]; then
    why="the floor, more than $why = $(secs "$budget") s"
    budget=$floor
  fi
  deadline=$((phase_start + budget))
  if [ "$deadline" -gt "$BUDGET_CEILING_MS" ]; then
    deadline=$BUDGET_CEILING_MS budget=$((BUDGET_CEILING_MS - phase_start))
    why="the case's ceiling of $(secs "$BUDGET_CEILING_MS") s; $why"
  fi
}

# timing TEXT: one line of the case's TIMING report.
timing() { echo "$*" >>"$CASE_TMP/$name.timing"; }

# One poll of the case loop: now is the time, and a pause since the last poll longer than any before is the
# longest L1 stall so far (the loop sleeps 50 ms between polls).
note_poll() {
  now="$(ms)"
  [ $((now - polled_at)) -gt "$l1_stall_ms" ] && l1_stall_ms=$((now - polled_at))
  polled_at=$now
}

# qmp_save PID: saves kestrel PID's VM to $snap over QMP and quits it (see "Save and restore" above); the
# transcript goes to $CASE_TMP/$name.qmp. The session stays open until kestrel exits. nc runs in the case's network
# namespace, if it has one: kestrel's 127.0.0.1 is there.
qmp_save() {
  {
    printf '{"execute": "qmp_capabilities"}\n'
    # MIGRATION events come only to a client that turned them on, as in QEMU (libvirt always does).
    printf '{"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability": "events", "state": true}]}}\n'
    sleep 0.3
    printf '{"execute": "migrate", "arguments": {"uri": "file:%s"}}\n' "$snap"
    while kill -0 "$1" 2>/dev/null \
        && ! grep -Eq '"MIGRATION".*"status": "(completed|failed)"' "$CASE_TMP/$name.qmp"; do
      sleep 0.1
    done
    printf '{"execute": "quit"}\n'
    while kill -0 "$1" 2>/dev/null; do sleep 0.2; done
  } | in_netns nc 127.0.0.1 4444 >"$CASE_TMP/$name.qmp" 2>&1
}

# socket_chat: the case's "chat PORT TEXT": connects to kestrel's socket chardev on 127.0.0.1:PORT (in the case's
# network namespace, if any), waits for a line from the guest, sends TEXT (printf %b escapes) and closes its sending
# side, which Kestrel takes as the client leaving. What arrived goes to $CASE_TMP/$name.chat, printed after the case
# as SOCKET-GOT:<line> lines. Runs in the background until kestrel or the connection ends.
socket_chat() {
  local port text chat="$CASE_TMP/$name.chat"
  read -r port text <"$dir/chat"
  {
    while kill -0 "$pid" 2>/dev/null && [ "$(wc -l <"$chat")" -lt 1 ]; do sleep 0.1; done
    printf '%b' "$text"
  } | in_netns nc 127.0.0.1 "$port" >"$chat" 2>&1
}

# chat_transcript: appends what the guest sent over the chat's socket, if there was a chat, to the case's console.
chat_transcript() {
  if [ -f "$CASE_TMP/$name.chat" ]; then
    for i in $(seq 1 50); do kill -0 "$chat_pid" 2>/dev/null || break; sleep 0.1; done
    kill "$chat_pid" 2>/dev/null
    tr -d '\r' <"$CASE_TMP/$name.chat" | sed 's/^/SOCKET-GOT:/' >>"$out"
    rm -f "$CASE_TMP/$name.chat"
  fi
}

# qmp_transcript: appends the QMP session's transcript, if any, to the case's stderr.
qmp_transcript() {
  if [ -f "$CASE_TMP/$name.qmp" ]; then
    { echo "--- QMP transcript"; tr -d '\r' <"$CASE_TMP/$name.qmp"; } >>"$err"
    rm -f "$CASE_TMP/$name.qmp"
  fi
}

# One attempt at the case in $dir: sets out, err, code, reason, marker_ms, t0, t1, epoch0, deadline.
attempt() {
  dir="$1"
  name="$(cat "$dir/name")"
  until_n="$(cat "$dir/until" 2>/dev/null || echo 0)"
  work="$(cat "$dir/work" 2>/dev/null || echo "$BUDGET_WORK_FACTOR")"
  out="$CASE_TMP/$name.out" err="$CASE_TMP/$name.err"
  : >"$out"; : >"$err"; : >"$CASE_TMP/$name.timing"
  # What runs: kestrel, or the Rust test binary the case names ("test NAME"; it must find KVM here, so
  # KESTREL_REQUIRE_KVM is set for every case).
  program=kestrel
  [ -f "$dir/program" ] && program="$(cat "$dir/program")"
  # its arguments, one a line (so cmdlines keep their spaces)
  set --
  while IFS= read -r a; do set -- "$@" "$a"; done <"$dir/args"
  if [ -f "$dir/disks" ]; then
    while read -r disk size byte; do
      if [ -n "$byte" ]; then
        head -c $((size * 1048576)) /dev/zero | tr '\000' "$(printf '%b' "$byte")" >"/tmp/$disk"
      else
        head -c $((size * 1048576)) /dev/zero >"/tmp/$disk"
      fi
    done <"$dir/disks"
  fi
  qmp_sent=1
  [ -f "$dir/qmp" ] && qmp_sent=0
  chat_sent=1 chat_pid=""
  [ -f "$dir/chat" ] && chat_sent=0
  rm -f "$CASE_TMP/$name.chat"
  rm -f "$CASE_TMP/$name.qmp"
  # save=waiting: save once the console matches save-at; then sent; restoring=1 while the restoring kestrel runs.
  save=none restoring=0 restore_start=0 first_output_ms=-1 snap="$CASE_TMP/$name.ksnap"
  [ -f "$dir/save-at" ] && save=waiting
  rm -f "$snap"
  ns_holder="" ns_out="$CASE_TMP/$name.netns"
  : >"$ns_out"
  if [ -f "$dir/netns" ]; then
    # A process that holds the new namespace for the case's lifetime; nsenter joins it.
    unshare -n sleep 100000 &
    ns_holder=$!
    for i in $(seq 1 50); do
      [ "$(readlink "/proc/$ns_holder/ns/net")" != "$(readlink /proc/self/ns/net)" ] && break
      sleep 0.05
    done
    rm -rf "$CASE_TMP/$name.netns.d"; mkdir -p "$CASE_TMP/$name.netns.d"
    in_netns sh "$dir/netns" setup "$CASE_TMP/$name.netns.d" >>"$ns_out" 2>&1 || echo "NETNS-SETUP-FAILED" >>"$ns_out"
  fi
  # busybox nsenter execs kestrel: $! below is kestrel's pid either way.
  if [ -n "$ns_holder" ]; then set -- nsenter -t "$ns_holder" -n "$program" "$@"; else set -- "$program" "$@"; fi
  echo "=== CASE $name START"   # a heartbeat for the host's L1 watchdog
  epoch0="$(date +%s)"
  t0="$(ms)"
  if [ -f "$dir/input" ]; then
    rm -f "$CASE_TMP/stdin.fifo"
    mkfifo "$CASE_TMP/stdin.fifo"
    "$@" <"$CASE_TMP/stdin.fifo" >"$out" 2>"$err" &
    pid=$!
    exec 3>"$CASE_TMP/stdin.fifo"
    typed=0
  else
    "$@" </dev/null >"$out" 2>"$err" &
    pid=$!
    typed=1
  fi
  reason=exit marker_ms=-1 last_marker_ms=0 seen=0 term_at=0 alive_at=0 polled_at=$t0 l1_stall_ms=0
  set_phase
  while :; do
    while kill -0 "$pid" 2>/dev/null; do
      note_poll
      elapsed=$((now - t0))
      if [ "$restoring" = 1 ] && [ "$first_output_ms" = -1 ] && [ "$(wc -c <"$out")" -gt "$restore_bytes" ]; then
        first_output_ms=$((elapsed - restore_start))
      fi
      if [ "$save" = waiting ] && grep -q "$(cat "$dir/save-at")" "$out"; then
        qmp_save "$pid" &
        save=sent save_ms=$elapsed save_pid=$!
      fi
      n="$(grep -c "$marker" "$out")"
      # A marker ends a boot (several at once count as one); after boot 1, only "until" cases have more phases.
      if [ "$n" -gt "$seen" ] && [ "$reason" = exit ] && { [ "$seen" = 0 ] || [ "$until_n" -gt 0 ]; }; then
        [ "$seen" = 0 ] && marker_ms=$elapsed
        timing "$phase: $(secs $((elapsed - phase_start))) s of a $(secs "$budget") s budget ($why)"
        seen=$n last_marker_ms=$elapsed
        set_phase
      fi
      if [ "$qmp_sent" = 0 ] && grep -q "$(cat "$dir/prompt")" "$out"; then
        # The session stays open until kestrel exits (its budget bounds that), so no event is lost however slowly
        # a loaded runner answers.
        { printf '{"execute": "qmp_capabilities"}\n'; sleep 0.3; cat "$dir/qmp"; while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done; } \
          | in_netns nc 127.0.0.1 4444 >"$CASE_TMP/$name.qmp" 2>&1 &
        qmp_sent=1
      fi
      if [ "$chat_sent" = 0 ] && grep -q "$(cat "$dir/prompt")" "$out"; then
        : >"$CASE_TMP/$name.chat"
        socket_chat &
        chat_pid=$! chat_sent=1
      fi
      if [ "$typed" = 0 ] && grep -q "$(cat "$dir/prompt")" "$out"; then
        sleep 0.2
        printf '%b' "$(cat "$dir/input")" >&3
        typed=1
      fi
      if [ "$until_n" -gt 0 ] && [ "$reason" = exit ] && [ "$seen" -ge "$until_n" ]; then
        reason=until
        kill -TERM "$pid"
        term_at=$now
      fi
      if [ "$reason" = exit ] && [ "$elapsed" -ge "$deadline" ]; then
        reason=timeout
        timing "$phase: not done after $(secs $((elapsed - phase_start))) s: TIMEOUT, over its $(secs "$budget") s budget ($why)"
        kill -TERM "$pid"
        term_at=$now
      fi
      if [ "$term_at" != 0 ] && [ $((now - term_at)) -ge 3000 ]; then
        kill -KILL "$pid" 2>/dev/null
      fi
      if [ $((elapsed - alive_at)) -ge 10000 ]; then
        echo "=== CASE $name ALIVE ms=$elapsed markers=$seen phase=\"$phase\" deadline_ms=$deadline"
        alive_at=$elapsed
      fi
      sleep 0.05
    done
    note_poll   # the poll that found kestrel gone ends a stall too: it may have exited while L1 stalled
    wait "$pid"
    code=$?
    t1="$(ms)"
    if [ "$reason" = exit ]; then
      timing "$phase: $(secs $((t1 - t0 - phase_start))) s of a $(secs "$budget") s budget ($why)$([ "$seen" = 0 ] && echo "; no marker on the console: the whole case")"
    fi
    if [ "$save" = sent ]; then
      # The saving kestrel is gone: its QMP session ends with it (within seconds; not waited for beyond that).
      for i in $(seq 1 100); do kill -0 "$save_pid" 2>/dev/null || break; sleep 0.1; done
      kill "$save_pid" 2>/dev/null
      save=done
      qmp_transcript
      timing "save: the saved kestrel exited $(secs $((t1 - t0 - save_ms))) s after the console showed save-at (exit $code; within the work phase)"
      echo >>"$out"   # a save may cut the guest's line short
      if [ "$reason" != exit ]; then
        echo "KESTREL-RESTORE-SKIPPED: the saving kestrel was stopped (reason=$reason)" >>"$out"
      elif ! grep -Eq '"MIGRATION".*"status": "completed"' "$err"; then
        echo "KESTREL-RESTORE-SKIPPED: no MIGRATION completed event (the QMP transcript is in the case's stderr)" >>"$out"
      else
        if [ -f "$dir/disks" ]; then
          while read -r disk size byte; do
            echo "DISK-SHA256-SAVED $disk $(sha256sum "/tmp/$disk" | cut -d' ' -f1)" >>"$out"
          done <"$dir/disks"
        fi
        echo "KESTREL-RESTORE source_exit=$code snapshot_bytes=$(wc -c <"$snap") incoming=file:$snap" >>"$out"
        echo "--- restoring kestrel" >>"$err"
        restore_bytes="$(wc -c <"$out")"
        "$@" -incoming "file:$snap" </dev/null >>"$out" 2>>"$err" &
        pid=$!
        restoring=1 restore_start=$(($(ms) - t0))
        polled_at=$((restore_start + t0))   # the wait for the save's QMP session and the hashing were no stall
        set_phase
        continue
      fi
    fi
    if [ "$save" = waiting ]; then
      echo "KESTREL-RESTORE-SKIPPED: the console never matched save-at before kestrel exited" >>"$out"
    fi
    break
  done
  if [ "$restoring" = 1 ]; then
    if [ "$first_output_ms" = -1 ]; then
      timing "restore: no guest output from the restoring kestrel"
    else
      timing "restore: the restored guest's first output $(secs "$first_output_ms") s after the restoring kestrel started"
    fi
    rm -f "$snap"
  fi
  if [ -f "$dir/input" ]; then exec 3>&-; fi
  qmp_transcript
  chat_transcript
  if [ -n "$ns_holder" ]; then
    in_netns sh "$dir/netns" teardown "$CASE_TMP/$name.netns.d" >>"$ns_out" 2>&1 || echo "NETNS-TEARDOWN-FAILED" >>"$ns_out"
    # Ending the holder ends the namespace, and the interfaces in it.
    kill "$ns_holder"
    wait "$ns_holder" 2>/dev/null
    rm -rf "$CASE_TMP/$name.netns.d"
    cat "$ns_out" >>"$out"
  fi
  if [ -f "$dir/disks" ]; then
    while read -r disk size byte; do
      echo "DISK-SHA256 $disk $(sha256sum "/tmp/$disk" | cut -d' ' -f1)" >>"$out"
      rm -f "/tmp/$disk"
    done <"$dir/disks"
  fi
}

# The emulated environment's failure signature of the last attempt, or nothing: a timeout during which L1 stalled
# (see "So is a case that timed out" above), or, in the guest's last boot (from its last
# "Linux version" banner on: a case may reboot the guest) the marker never came, and kestrel reported a triple
# fault (anywhere before the marker: the emulated environment's nested-SVM fault has struck before /init, while
# /init loaded its modules, and in a reboot's early boot) or the case timed out before /init. Other failures are
# never retried, and a fault of Kestrel's own that repeats still fails: each attempt is judged alike.
environment_failure() {
  local last_boot
  last_boot="$(tr -d '\r' <"$out" | awk '/Linux version/ { boot = "" } { boot = boot $0 "\n" } END { printf "%s", boot }')"
  last="$(printf '%s' "$last_boot" | grep -v -e '^[[:space:]]*$' -e '^DISK-SHA256 ' -e '^NETNS-' -e '^KESTREL-RESTORE-SKIPPED' | tail -n 1 | sed 's/[^ -~]//g' | cut -c1-160)"
  if [ "$reason" = timeout ] && [ "$l1_stall_ms" -ge "$BUDGET_L1_STALL_MS" ]; then
    echo "L1 stalled for $(secs "$l1_stall_ms") s during the case (its case loop did not run) and the case timed out: the emulated runner, not the guest; last line: $last"
    return
  fi
  printf '%s' "$last_boot" | grep -q "$marker" && return
  if grep -q 'triple fault' "$err"; then
    echo "triple fault in early boot (kestrel exit $code) after: $last"
  elif [ "$reason" = timeout ] && ! printf '%s' "$last_boot" | grep -q 'Run /init as init process'; then
    echo "hang in early boot (timeout, budget $(secs "$deadline") s) after: $last"
  fi
}

# After a case: its first boot raises the reference boot when it was slower (the machine got slower, or the case
# boots a bigger guest), so later cases get budgets for the machine as it is now.
update_reference() {
  if [ "$marker_ms" -gt "$ref_ms" ]; then
    ref_ms=$marker_ms ref_why="case $name's boot 1"
    echo "=== RUNNER BUDGET reference boot now $(secs "$ref_ms") s (${ref_why})"
  fi
}

run_case() {
  attempt "$1"
  tries=1
  while [ "$tries" -le "$BUDGET_EARLY_RETRIES" ]; do
    sig="$(environment_failure)"
    [ -n "$sig" ] || break
    if [ "$tries" = 1 ]; then which="first attempt"; else which="attempt $tries"; fi
    echo "=== CASE $name RETRY $which: $sig"
    echo "--- $which: guest console (last 30 lines)"
    tr -d '\r' <"$out" | tail -n 30
    echo "--- $which: kestrel stderr (last 10 lines)"
    tail -n 10 "$err"
    echo "--- $which: timing"
    cat "$CASE_TMP/$name.timing"
    echo "--- $which end"
    tries=$((tries + 1))
    attempt "$1"
  done
  echo "=== CASE $name BEGIN"
  cat "$out"
  echo
  echo "=== CASE $name STDERR"
  cat "$err"
  echo "=== CASE $name END exit=$code reason=$reason ms=$((t1 - t0)) marker_ms=$marker_ms budget_ms=$deadline l1_epoch_start=$epoch0 l1_epoch_end=$(date +%s) l1_stall_ms=$l1_stall_ms"
  sed "s/^/=== CASE $name TIMING /" "$CASE_TMP/$name.timing"
  update_reference
}

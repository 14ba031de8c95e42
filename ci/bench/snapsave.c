// snapsave: one timed, paused save over QMP (ci/bench/snapshot on the host, ci/bench/snapshot-linux in the emulated
// runner's L1, where there is no Python: hence C, linked statically).
//
//   snapsave [-b BYTES | -p STRING] [-t SECONDS] QMP_SOCKET CONSOLE_FILE SNAPSHOT_FILE URI -- COMMAND [ARGS...]
//
// Starts COMMAND (a VMM that opens its QMP server on the Unix socket QMP_SOCKET and writes the guest's console to
// CONSOLE_FILE; its stdout and stderr go to ours' stderr), waits until the guest is running: the console holds
// BYTES bytes (-b, default 4000) or contains STRING (-p), then, over QMP: `qmp_capabilities`, the `events`
// migration capability on (both Kestrel and QEMU send MIGRATION events only with it, as libvirt asks at every
// start), `stop` (a non-live save, as libvirt's `virsh save` does it), then `migrate` to URI, timed from sending it
// to its reply and to the MIGRATION event that ends it, then `quit`. Prints one line
//   save_ms=<migrate sent -> MIGRATION completed> reply_ms=<migrate sent -> its reply> size=<st_size>
//   alloc=<st_blocks * 512>
// and exits 0; on any failure (the VMM exits early, an error reply, MIGRATION failed, nothing within -t SECONDS,
// default 30, per wait) prints `error=<one line>` and exits 1. The three paths are removed first. Times are
// CLOCK_MONOTONIC; blocking reads with poll() deadlines, no event loop between the socket and the timestamps.
#define _GNU_SOURCE // memmem
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double timeout_s = 30;
static pid_t vmm = -1;
static int vmm_reaped;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void fail(const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    for (char *c = msg; *c; c++)
        if (*c == '\n' || *c == '\r')
            *c = ' ';
    printf("error=%s\n", msg);
    fflush(stdout);
    if (vmm > 0 && !vmm_reaped) {
        kill(vmm, SIGKILL);
        waitpid(vmm, NULL, 0);
    }
    exit(1);
}

// Fails if the VMM has exited.
static void check_alive(const char *waiting_for) {
    int status;
    if (waitpid(vmm, &status, WNOHANG) == vmm) {
        vmm_reaped = 1;
        fail("the VMM exited (status %d) before %s", WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status),
             waiting_for);
    }
}

static void pause_ms(int ms) {
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

// Whether the console already shows the running guest: BYTES bytes, or STRING somewhere in it (searched
// incrementally: only what was added since the last look, plus the pattern's length less one before it).
static int console_ready(const char *path, long bytes, const char *pattern) {
    static off_t searched;
    struct stat st;
    if (stat(path, &st) < 0)
        return 0;
    if (!pattern)
        return st.st_size >= bytes;
    size_t len = strlen(pattern);
    if (st.st_size < (off_t)len)
        return 0;
    off_t from = searched > (off_t)(len - 1) ? searched - (off_t)(len - 1) : 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    static char buf[1 << 16];
    int found = 0;
    while (!found) {
        ssize_t n = pread(fd, buf, sizeof(buf), from);
        if (n <= 0)
            break;
        if (memmem(buf, n, pattern, len))
            found = 1;
        searched = from + n;
        if ((size_t)n < len)
            break;
        from += n - (off_t)(len - 1);
    }
    close(fd);
    return found;
}

// --- QMP over a Unix socket: one JSON message a line ------------------------------------------------------------
static int qmp = -1;
static char inbuf[1 << 16];
static size_t inlen;

// The next line (without its newline), NUL-terminated in place; fails after timeout_s.
static char *read_line(const char *waiting_for) {
    static size_t consumed;
    if (consumed) {
        memmove(inbuf, inbuf + consumed, inlen - consumed);
        inlen -= consumed;
        consumed = 0;
    }
    double deadline = now_s() + timeout_s;
    for (;;) {
        char *nl = memchr(inbuf, '\n', inlen);
        if (nl) {
            *nl = 0;
            consumed = nl - inbuf + 1;
            return inbuf;
        }
        if (inlen == sizeof(inbuf))
            fail("a QMP message longer than %zu bytes", sizeof(inbuf));
        int left = (int)((deadline - now_s()) * 1000);
        if (left <= 0)
            fail("timed out waiting for %s", waiting_for);
        struct pollfd pfd = {.fd = qmp, .events = POLLIN};
        int r = poll(&pfd, 1, left);
        if (r < 0 && errno != EINTR)
            fail("poll: %s", strerror(errno));
        if (r <= 0)
            continue;
        ssize_t n = read(qmp, inbuf + inlen, sizeof(inbuf) - inlen);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            fail("the QMP connection closed while waiting for %s", waiting_for);
        inlen += n;
    }
}

// The message with the blanks outside strings removed, so `"key": "v"` and `"key":"v"` read the same.
static void squash(const char *in, char *out, size_t size) {
    int in_string = 0, escaped = 0;
    size_t o = 0;
    for (; *in && o + 1 < size; in++) {
        char c = *in;
        if (in_string) {
            if (escaped)
                escaped = 0;
            else if (c == '\\')
                escaped = 1;
            else if (c == '"')
                in_string = 0;
        } else if (c == '"') {
            in_string = 1;
        } else if (c == ' ' || c == '\t' || c == '\r') {
            continue;
        }
        out[o++] = c;
    }
    out[o] = 0;
}

static double migration_ended = -1; // when a MIGRATION completed event arrived

enum kind { REPLY, EVENT, OTHER };

// Reads one message: notes MIGRATION's end, fails on an error reply or MIGRATION failed.
static enum kind read_message(const char *waiting_for) {
    char *line = read_line(waiting_for);
    double at = now_s();
    static char m[sizeof(inbuf)];
    squash(line, m, sizeof(m));
    if (strstr(m, "\"event\":\"")) {
        if (strstr(m, "\"event\":\"MIGRATION\"")) {
            if (strstr(m, "\"status\":\"failed\""))
                fail("MIGRATION failed (while waiting for %s)", waiting_for);
            if (strstr(m, "\"status\":\"completed\"") && migration_ended < 0)
                migration_ended = at;
        }
        return EVENT;
    }
    if (strstr(m, "\"error\":"))
        fail("%s: %s", waiting_for, line);
    if (strstr(m, "\"return\":"))
        return REPLY;
    return OTHER;
}

static void send_command(const char *json) {
    size_t len = strlen(json), done = 0;
    while (done < len) {
        ssize_t n = write(qmp, json + done, len - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            fail("writing to QMP: %s", strerror(errno));
        done += n;
    }
}

static void execute(const char *json, const char *name) {
    send_command(json);
    while (read_message(name) != REPLY) {
    }
}

// URI as a JSON string's contents (quotes and backslashes escaped; control characters refused).
static void json_escape(const char *in, char *out, size_t size) {
    size_t o = 0;
    for (; *in; in++) {
        if ((unsigned char)*in < 0x20)
            fail("the URI holds a control character");
        if (o + 3 > size)
            fail("the URI is too long");
        if (*in == '"' || *in == '\\')
            out[o++] = '\\';
        out[o++] = *in;
    }
    out[o] = 0;
}

int main(int argc, char **argv) {
    long bytes = 4000;
    const char *pattern = NULL;
    int i = 1;
    for (; i < argc && argv[i][0] == '-'; i++) {
        if (!strcmp(argv[i], "-b") && i + 1 < argc)
            bytes = strtol(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "-p") && i + 1 < argc)
            pattern = argv[++i];
        else if (!strcmp(argv[i], "-t") && i + 1 < argc)
            timeout_s = strtod(argv[++i], NULL);
        else
            break;
    }
    if (argc - i < 6 || strcmp(argv[i + 4], "--") || timeout_s <= 0 || (pattern && !*pattern)) {
        fprintf(stderr, "usage: %s [-b BYTES | -p STRING] [-t SECONDS] QMP_SOCKET CONSOLE_FILE SNAPSHOT_FILE URI -- "
                        "COMMAND [ARGS...]\n",
                argv[0]);
        return 2;
    }
    const char *socket_path = argv[i], *console = argv[i + 1], *snapshot = argv[i + 2], *uri = argv[i + 3];
    char **command = &argv[i + 5];
    for (const char *const *p = (const char *const[]){socket_path, console, snapshot, NULL}; *p; p++)
        if (unlink(*p) < 0 && errno != ENOENT)
            fail("cannot remove %s: %s", *p, strerror(errno));
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(socket_path) >= sizeof(addr.sun_path))
        fail("the socket path is too long");
    strcpy(addr.sun_path, socket_path);
    char escaped[4096], migrate[4200];
    json_escape(uri, escaped, sizeof(escaped));
    snprintf(migrate, sizeof(migrate), "{\"execute\": \"migrate\", \"arguments\": {\"uri\": \"%s\"}}\n", escaped);

    vmm = fork();
    if (vmm < 0)
        fail("fork: %s", strerror(errno));
    if (vmm == 0) {
        int null = open("/dev/null", O_RDONLY);
        if (null >= 0)
            dup2(null, STDIN_FILENO);
        dup2(STDERR_FILENO, STDOUT_FILENO);
        execvp(command[0], command);
        fprintf(stderr, "snapsave: cannot run %s: %s\n", command[0], strerror(errno));
        _exit(127);
    }

    double deadline = now_s() + timeout_s;
    struct stat st;
    while (stat(socket_path, &st) < 0) {
        check_alive("its QMP socket appeared");
        if (now_s() > deadline)
            fail("timed out waiting for the QMP socket %s", socket_path);
        pause_ms(5);
    }
    deadline = now_s() + timeout_s;
    while (!console_ready(console, bytes, pattern)) {
        check_alive("the guest ran");
        if (now_s() > deadline)
            fail("timed out waiting for the guest to run (console %s: %s)", console, pattern ? pattern : "bytes");
        pause_ms(5);
    }

    qmp = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (qmp < 0 || connect(qmp, (struct sockaddr *)&addr, sizeof(addr)) < 0)
        fail("cannot connect to %s: %s", socket_path, strerror(errno));
    read_message("the QMP greeting");
    execute("{\"execute\": \"qmp_capabilities\"}\n", "qmp_capabilities");
    execute("{\"execute\": \"migrate-set-capabilities\", \"arguments\": {\"capabilities\": "
            "[{\"capability\": \"events\", \"state\": true}]}}\n",
            "migrate-set-capabilities");
    execute("{\"execute\": \"stop\"}\n", "stop");

    double start = now_s();
    send_command(migrate);
    while (read_message("migrate's reply") != REPLY) {
    }
    double replied = now_s();
    while (migration_ended < 0)
        read_message("the MIGRATION completed event");
    execute("{\"execute\": \"quit\"}\n", "quit");

    deadline = now_s() + timeout_s;
    int status;
    while (waitpid(vmm, &status, WNOHANG) != vmm) {
        if (now_s() > deadline)
            fail("the VMM did not exit after quit");
        pause_ms(5);
    }
    vmm_reaped = 1;
    // QEMU's `exec:cat > PATH` child may still be writing the pipe's last bytes after QEMU has quit.
    off_t size = -1;
    deadline = now_s() + timeout_s;
    for (;;) {
        if (stat(snapshot, &st) < 0)
            fail("no snapshot at %s: %s", snapshot, strerror(errno));
        if (st.st_size == size)
            break;
        if (now_s() > deadline)
            fail("the snapshot %s was still growing after %.0f s", snapshot, timeout_s);
        size = st.st_size;
        pause_ms(50);
    }
    printf("save_ms=%.3f reply_ms=%.3f size=%lld alloc=%lld\n", (migration_ended - start) * 1e3,
           (replied - start) * 1e3, (long long)st.st_size, (long long)st.st_blocks * 512);
    return 0;
}

// qmpbench: start a VMM with a QMP socket and measure its QMP side, over raw Unix sockets, printing one line
//   connect_ms=<exec to the socket accepting a connection> greeting_ms=<exec to the greeting's full line>
//   requests=<n> rtt_s=<seconds spent> rate=<query-status round trips per second> status=<VMM exit status>
//
//   qmpbench -s SOCK [-n MAX] [-t SECONDS] [-o FILE] -- COMMAND [ARGS...]
//
// Times are CLOCK_MONOTONIC from just before fork(). SOCK is removed first; the harness then tries to connect
// every 20 us until the VMM listens (ENOENT/ECONNREFUSED mean "not yet"), and reads the greeting line. With -n
// (default 0: greeting only) it negotiates (`qmp_capabilities`) and sends `{"execute":"query-status"}`, waits
// for the reply line, and repeats, until MAX replies or SECONDS (default 2) have passed; events (none are
// expected) are skipped, an error reply fails the run. Last it sends `quit`, reads to EOF and reaps the VMM
// (SIGKILL after 10 s). The VMM's stdout/stderr go to FILE (default /dev/null). Exit status 0 on success.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static pid_t child = -1;

static void die(const char *what) {
    fprintf(stderr, "qmpbench: %s\n", what);
    if (child > 0) {
        kill(child, SIGKILL);
        waitpid(child, NULL, 0);
    }
    exit(1);
}

// A line reader over the socket: lines end in '\n'; the reply is one line, so at most one is buffered.
static char buf[1 << 16];
static size_t have;  // bytes in buf
static size_t taken; // bytes of buf already returned as lines

// Returns the next line (NUL-terminated, without the '\n'), or NULL on EOF or a reset connection.
static char *read_line(int fd) {
    if (taken) {
        memmove(buf, buf + taken, have - taken);
        have -= taken;
        taken = 0;
    }
    for (;;) {
        char *nl = memchr(buf, '\n', have);
        if (nl) {
            *nl = 0;
            taken = (size_t)(nl - buf) + 1;
            return buf;
        }
        if (have == sizeof(buf) - 1)
            die("reply line too long");
        ssize_t n = read(fd, buf + have, sizeof(buf) - 1 - have);
        if (n < 0 && errno == EINTR)
            continue;
        // A peer that exits with our last bytes unread (QEMU after `quit`) resets the connection: that is EOF too.
        if (n == 0 || (n < 0 && errno == ECONNRESET))
            return NULL;
        if (n < 0)
            die("read from the QMP socket failed");
        have += (size_t)n;
    }
}

static void send_all(int fd, const char *msg) {
    size_t len = strlen(msg), off = 0;
    while (off < len) {
        ssize_t n = write(fd, msg + off, len - off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            die("write to the QMP socket failed");
        off += (size_t)n;
    }
}

// The next reply line, skipping events.
static char *reply(int fd) {
    for (;;) {
        char *line = read_line(fd);
        if (!line)
            die("the VMM closed the QMP connection before replying");
        if (!strncmp(line, "{\"event\"", 8))
            continue;
        return line;
    }
}

int main(int argc, char **argv) {
    const char *sock = NULL, *outfile = "/dev/null";
    long max = 0;
    double seconds = 2.0;
    int i = 1;
    for (; i < argc; i++) {
        if (!strcmp(argv[i], "--")) {
            i++;
            break;
        } else if (!strcmp(argv[i], "-s") && i + 1 < argc) {
            sock = argv[++i];
        } else if (!strcmp(argv[i], "-n") && i + 1 < argc) {
            max = strtol(argv[++i], NULL, 10);
        } else if (!strcmp(argv[i], "-t") && i + 1 < argc) {
            seconds = strtod(argv[++i], NULL);
        } else if (!strcmp(argv[i], "-o") && i + 1 < argc) {
            outfile = argv[++i];
        } else {
            break;
        }
    }
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (!sock || i >= argc || strlen(sock) >= sizeof(addr.sun_path)) {
        fprintf(stderr, "usage: %s -s SOCK [-n MAX] [-t SECONDS] [-o FILE] -- COMMAND [ARGS...]\n", argv[0]);
        return 2;
    }
    strcpy(addr.sun_path, sock);
    unlink(sock);
    signal(SIGPIPE, SIG_IGN);

    double t0 = now_s();
    child = fork();
    if (child < 0)
        die("fork failed");
    if (child == 0) {
        int out = open(outfile, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        int in = open("/dev/null", O_RDONLY);
        if (out < 0 || in < 0)
            _exit(126);
        dup2(in, 0);
        dup2(out, 1);
        dup2(out, 2);
        execvp(argv[i], argv + i);
        _exit(127);
    }

    // Connect as soon as the VMM listens.
    int fd = -1;
    const struct timespec interval = {0, 20 * 1000};
    for (;;) {
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
            die("socket() failed");
        if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) == 0)
            break;
        if (errno != ENOENT && errno != ECONNREFUSED)
            die("connect() failed other than with ENOENT/ECONNREFUSED");
        close(fd);
        if (waitpid(child, NULL, WNOHANG) == child) {
            child = -1;
            die("the VMM exited before its QMP socket accepted a connection");
        }
        if (now_s() - t0 > 10)
            die("no QMP socket within 10 s");
        nanosleep(&interval, NULL);
    }
    double t_conn = now_s();
    char *line = read_line(fd);
    double t_greet = now_s();
    if (!line || strncmp(line, "{\"QMP\"", 6))
        die("no QMP greeting");

    send_all(fd, "{\"execute\":\"qmp_capabilities\"}\n");
    if (strncmp(reply(fd), "{\"return\"", 9))
        die("qmp_capabilities failed");

    long done = 0;
    double t_start = now_s(), t_end = t_start;
    if (max > 0) {
        for (;;) {
            send_all(fd, "{\"execute\":\"query-status\"}\n");
            line = reply(fd);
            if (strncmp(line, "{\"return\"", 9) || !strstr(line, "\"status\"")) {
                fprintf(stderr, "qmpbench: unexpected reply: %s\n", line);
                die("query-status failed");
            }
            done++;
            t_end = now_s();
            if (done >= max || t_end - t_start >= seconds)
                break;
        }
    }

    send_all(fd, "{\"execute\":\"quit\"}\n");
    while (read_line(fd))
        ; // the reply, the SHUTDOWN event, then EOF
    close(fd);
    int status = -1;
    for (double deadline = now_s() + 10;;) {
        pid_t r = waitpid(child, &status, WNOHANG);
        if (r == child)
            break;
        if (now_s() > deadline) {
            kill(child, SIGKILL);
            waitpid(child, &status, 0);
            fprintf(stderr, "qmpbench: the VMM did not exit after quit; killed\n");
            break;
        }
        const struct timespec ms = {0, 1000 * 1000};
        nanosleep(&ms, NULL);
    }
    child = -1;
    double rtt_s = t_end - t_start;
    printf("connect_ms=%.3f greeting_ms=%.3f requests=%ld rtt_s=%.3f rate=%.0f status=%d\n", (t_conn - t0) * 1e3,
           (t_greet - t0) * 1e3, done, rtt_s, done && rtt_s > 0 ? done / rtt_s : 0.0,
           WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
    return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 1;
}

// firstbyte: run a command with its stdout on a pipe and report, on our stdout, one line
//   first_ms=<ms to the first byte> exit_ms=<ms to exit> maxrss_kib=<child's peak RSS> status=<exit status> bytes=<n>
// Times are CLOCK_MONOTONIC from just before fork(). With -o FILE the child's output is saved there.
// For a guest that never exits (ci/bench/snapshot): -k BYTES sends the child SIGKILL once it has written at least
// BYTES bytes, -t MS once MS milliseconds have passed since the fork; exit_ms is then the time to its death.
//
// Peak RSS comes from wait4()'s rusage. On exec the kernel folds the pre-exec mm's high-water mark into the
// process's maxrss, so a fork-then-exec child reports at least what the forked copy of this harness had
// resident. Rather than ptrace the child to read VmHWM at its exit (which would stop it at every signal and skew
// the timings), we keep that copy tiny: this program is linked statically (no ld.so relocations, no libc
// pages dirtied at start-up) and uses no heap, and after fork() only the anonymous pages are duplicated
// (file-backed text is not copied into the child's page tables). `floor_kib` in the output is this harness's
// own anonymous RSS at fork time (RssAnon), an upper bound on what the child inherits.
#define _GNU_SOURCE // pipe2
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static long rss_anon_kib(void) {
    char buf[4096];
    int fd = open("/proc/self/status", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = 0;
    char *p = strstr(buf, "RssAnon:");
    return p ? strtol(p + 8, NULL, 10) : -1;
}

int main(int argc, char **argv) {
    const char *outfile = NULL;
    long kill_after_bytes = -1, kill_after_ms = -1;
    int i = 1;
    for (; i < argc && argv[i][0] == '-'; i++) {
        if (!strcmp(argv[i], "--")) {
            i++;
            break;
        } else if (!strcmp(argv[i], "-o") && i + 1 < argc) {
            outfile = argv[++i];
        } else if (!strcmp(argv[i], "-k") && i + 1 < argc) {
            kill_after_bytes = strtol(argv[++i], NULL, 10);
        } else if (!strcmp(argv[i], "-t") && i + 1 < argc) {
            kill_after_ms = strtol(argv[++i], NULL, 10);
        } else {
            break;
        }
    }
    if (i >= argc) {
        fprintf(stderr, "usage: %s [-o FILE] [-k BYTES] [-t MS] [--] COMMAND [ARGS...]\n", argv[0]);
        return 2;
    }
    int out = -1;
    if (outfile && (out = open(outfile, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644)) < 0) {
        perror(outfile);
        return 2;
    }
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0) {
        perror("pipe2");
        return 2;
    }
    long floor_kib = rss_anon_kib();

    double t0 = now_ms();
    pid_t pid = fork();
    if (pid < 0) {
        perror("fork");
        return 2;
    }
    if (pid == 0) {
        int null = open("/dev/null", O_RDONLY);
        if (null >= 0)
            dup2(null, STDIN_FILENO);
        dup2(p[1], STDOUT_FILENO); // dup2 clears O_CLOEXEC on the new descriptor
        execvp(argv[i], &argv[i]);
        _exit(127);
    }
    close(p[1]);

    // Drain the pipe until EOF (every writer gone: the child exited), noting when the first byte arrived.
    static char buf[65536];
    double t_first = -1;
    size_t total = 0;
    int killed = 0;
    for (;;) {
        if (kill_after_ms >= 0 && !killed) {
            // Wait for output no longer than the deadline; past it, kill the child and drain to EOF.
            long left = kill_after_ms - (long)(now_ms() - t0);
            struct pollfd pfd = {.fd = p[0], .events = POLLIN};
            if (left <= 0 || poll(&pfd, 1, (int)left) == 0) {
                kill(pid, SIGKILL);
                killed = 1;
                continue;
            }
        }
        ssize_t n = read(p[0], buf, sizeof(buf));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        if (t_first < 0)
            t_first = now_ms();
        total += n;
        if (kill_after_bytes >= 0 && !killed && total >= (size_t)kill_after_bytes) {
            kill(pid, SIGKILL);
            killed = 1;
        }
        if (out >= 0 && write(out, buf, n) != n) {
            perror("write");
            return 2;
        }
    }
    int status;
    struct rusage ru;
    while (wait4(pid, &status, 0, &ru) < 0) {
        if (errno != EINTR) {
            perror("wait4");
            return 2;
        }
    }
    double t_exit = now_ms();
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    printf("first_ms=%.3f exit_ms=%.3f maxrss_kib=%ld status=%d bytes=%zu floor_kib=%ld\n",
           t_first < 0 ? -1.0 : t_first - t0, t_exit - t0, ru.ru_maxrss, code, total, floor_kib);
    return 0;
}

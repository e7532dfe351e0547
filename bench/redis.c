/* redis: a real server under the allocator.
 *
 * Debian's redis-server serves redis-benchmark over a unix socket, with
 * persistence off.  The client runs the tests SET, GET, LPUSH, LPOP,
 * SADD, HSET and ZADD in turn (--ops requests each; 512-byte values on
 * 200000 random keys, pipelines of 16).  SET fills about 130 MB; LPUSH
 * grows one list whose quicklist nodes are 8 KiB listpacks, each grown by
 * realloc an element at a time, and LPOP empties it again.
 *
 *   ops          requests over all tests
 *   seconds      the client's wall time
 *   peak_rss_kb  the server's VmHWM after the tests
 *   final_rss_kb its VmRSS after FLUSHALL and --idle seconds (default 2):
 *                what a server keeps once its data is gone
 *
 * Which allocator the server runs on: redis-server links jemalloc, and its
 * malloc, free and malloc_usable_size resolve to the first library that
 * has them.  So the server inherits this process's LD_PRELOAD (the column's
 * allocator), and with none it gets a preload of libc.so.6 itself: glibc's
 * malloc then comes first, as the glibc column means (without it, the
 * server would run on its own jemalloc).  A preloaded allocator must show
 * in the server's /proc/PID/maps, and under hakmem the server runs with
 * HAKMEM_STATS=1 and must print hakmem's totals at its exit.  The client
 * runs with no preload and no HAKMEM_ setting: alike in every column. */
#define _GNU_SOURCE
#include "common.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

static const char *g_server = "/usr/bin/redis-server";
static const char *g_client = "/usr/bin/redis-benchmark";
static double g_idle = 2.0;

/* The path of a library mapped in this process whose name ends in `tail`
 * (for libc.so.6: the one ld.so loaded), or NULL. */
static char *mapped_library(const char *tail)
{
    FILE *f = fopen("/proc/self/maps", "r");
    char line[4096], *found = NULL;
    while (f && !found && fgets(line, sizeof line, f)) {
        char *path = strchr(line, '/');
        if (!path)
            continue;
        path[strcspn(path, "\n")] = '\0';
        size_t n = strlen(path), t = strlen(tail);
        if (n >= t && strcmp(path + n - t, tail) == 0)
            found = strdup(path);
    }
    if (f)
        fclose(f);
    return found;
}

static bool file_has(const char *path, const char *what)
{
    FILE *f = fopen(path, "r");
    char line[4096];
    bool found = false;
    while (f && !found && fgets(line, sizeof line, f))
        found = strstr(line, what) != NULL;
    if (f)
        fclose(f);
    return found;
}

static long status_kb(pid_t pid, const char *key)
{
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "r");
    long kb = -1;
    size_t klen = strlen(key);
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, key, klen) == 0 && line[klen] == ':')
            kb = atol(line + klen + 1);
    if (f)
        fclose(f);
    return kb;
}

/* One inline command to the server; its reply's first line into reply. */
static bool command(const char *sock, const char *cmd, char *reply, size_t len)
{
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    snprintf(a.sun_path, sizeof a.sun_path, "%s", sock);
    bool ok = fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof a) == 0 &&
              dprintf(fd, "%s\r\n", cmd) > 0;
    ssize_t got = ok ? read(fd, reply, len - 1) : -1;
    reply[got > 0 ? got : 0] = '\0';
    if (fd >= 0)
        close(fd);
    return got > 0;
}

/* Forks and execs argv with stdout and stderr into out (fd); the child
 * dies with this process. */
static pid_t spawn(char *const argv[], int out, bool server, const char *preload, bool hakmem)
{
    pid_t parent = getpid(), pid = fork();
    if (pid < 0)
        bench_fail("fork: %s", strerror(errno));
    if (pid > 0)
        return pid;
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent)
        _exit(127);
    int null = open("/dev/null", O_RDONLY);
    dup2(null, STDIN_FILENO);
    dup2(out, STDOUT_FILENO);
    dup2(out, STDERR_FILENO);
    if (server) {
        setenv("LD_PRELOAD", preload, 1);
        if (hakmem)
            setenv("HAKMEM_STATS", "1", 1);
    } else {
        /* The client: no preload, no setting of ours. */
        unsetenv("LD_PRELOAD");
        for (char **e = environ; *e;) {
            if (strncmp(*e, "HAKMEM_", 7) == 0) {
                char name[256];
                snprintf(name, sizeof name, "%.*s", (int)strcspn(*e, "="), *e);
                unsetenv(name);
            } else {
                e++;
            }
        }
    }
    execv(argv[0], argv);
    dprintf(out, "exec %s: %s\n", argv[0], strerror(errno));
    _exit(127);
}

int main(int argc, char **argv)
{
    struct bench_args a = {.ops = 200000, .threads = 1, .max_threads = 1, .seed = 42};
    const struct bench_opt opts[] = {
        {"idle", OPT_DOUBLE, &g_idle, "seconds idle after FLUSHALL (default 2)"},
        {"server", OPT_STRING, &g_server, "redis-server (default /usr/bin/redis-server)"},
        {"client", OPT_STRING, &g_client, "redis-benchmark (default /usr/bin/redis-benchmark)"},
        {NULL, OPT_FLAG, NULL, NULL},
    };
    bench_parse(argc, argv, "redis",
                "redis-server under the allocator, driven by redis-benchmark over a\n"
                "unix socket.  --ops = requests per test (7 tests).",
                &a, opts);
    bench_quick_ops(&a, 2000);
    if (a.quick)
        g_idle = 0.2;
    if (a.ops < 1 || g_idle < 0)
        bench_fail("need --ops >= 1 and --idle >= 0");
    if (access(g_server, X_OK) != 0 || access(g_client, X_OK) != 0)
        bench_fail("%s or %s is missing (scripts/setup.sh installs redis-server)", g_server,
                   g_client);

    const char *alloc = detect_allocator();
    bool hakmem = strcmp(alloc, "hakmem") == 0;
    const char *inherited = getenv("LD_PRELOAD");
    char *preload = inherited && *inherited ? strdup(inherited) : mapped_library("/libc.so.6");
    if (!preload)
        bench_fail("no preload, and libc.so.6 not found in /proc/self/maps");

    char dir[] = "/tmp/hakmem-redis.XXXXXX";
    if (!mkdtemp(dir))
        bench_fail("mkdtemp: %s", strerror(errno));
    char sock[sizeof dir + 16], log_path[sizeof dir + 16];
    snprintf(sock, sizeof sock, "%s/s.sock", dir);
    snprintf(log_path, sizeof log_path, "%s/server.log", dir);
    int log = open(log_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (log < 0)
        bench_fail("%s: %s", log_path, strerror(errno));

    char *server_argv[] = {(char *)g_server, "--port", "0", "--unixsocket", sock, "--save", "",
                           "--appendonly", "no", "--daemonize", "no", "--dir", dir, NULL};
    pid_t server = spawn(server_argv, log, true, preload, hakmem);
    char reply[256];
    bool up = false;
    for (int i = 0; i < 500 && !up; i++) {
        up = command(sock, "PING", reply, sizeof reply) && strncmp(reply, "+PONG", 5) == 0;
        if (!up)
            sleep_sec(0.01);
    }
    if (!up)
        bench_fail("redis-server did not answer PING within 5 s (log: %s)", log_path);
    char maps[64];
    snprintf(maps, sizeof maps, "/proc/%d/maps", (int)server);
    if (inherited && *inherited && !file_has(maps, inherited))
        bench_fail("the server did not map the preload %s", inherited);

    char n[32];
    snprintf(n, sizeof n, "%ld", a.ops);
    char *client_argv[] = {(char *)g_client, "-s", sock, "-q", "-n", n, "-P", "16", "-t",
                           "set,get,lpush,lpop,sadd,hset,zadd", "-d", "512", "-r", "200000",
                           NULL};
    int quiet = open("/dev/null", O_WRONLY | O_CLOEXEC);
    double t0 = now_sec();
    pid_t client = spawn(client_argv, quiet, false, NULL, false);
    int status;
    waitpid(client, &status, 0);
    double secs = now_sec() - t0;
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        bench_fail("redis-benchmark failed (status %#x)", status);

    struct bench_result r = {.threads = 1, .ops = (uint64_t)a.ops * 7, .seconds = secs};
    r.peak_rss_kb = status_kb(server, "VmHWM");
    if (!command(sock, "FLUSHALL", reply, sizeof reply) || strncmp(reply, "+OK", 3) != 0)
        bench_fail("FLUSHALL: %s", reply);
    sleep_sec(g_idle);
    r.final_rss_kb = status_kb(server, "VmRSS");
    command(sock, "SHUTDOWN NOSAVE", reply, sizeof reply);
    waitpid(server, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        bench_fail("redis-server ended with status %#x (log: %s)", status, log_path);
    if (hakmem && !file_has(log_path, "hakmem stats: totals"))
        bench_fail("redis-server did not print hakmem's totals: it did not run on hakmem");
    unlink(log_path);
    unlink(sock);
    rmdir(dir);
    result_print(&r, " server=%s", inherited && *inherited ? "preloaded" : "glibc");
    return 0;
}

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
 *   peak_rss_kb  the server's VmHWM (read at the end)
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
 * HAKMEM_STATS=1 and must print hakmem's totals at its exit; in the glibc
 * column jemalloc must hold next to nothing of what is in use (INFO
 * memory).  The client runs with no preload and no HAKMEM_ setting: alike
 * in every column; the server must have served every request with no
 * error reply (INFO stats).  A failure shows the tails of both logs. */
#define _GNU_SOURCE
#include "common.h"

#include <errno.h>
#include <sys/time.h>
#include <stdarg.h>
#include <limits.h>
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

/* Whether every library of an LD_PRELOAD value (entries split by ':' or
 * spaces; a name without a '/' is looked up by ld.so, so its file name
 * alone is asked for) is mapped in the process whose maps these are. */
static bool maps_all(const char *maps, const char *preload);

static bool file_has(const char *path, const char *what)
{
    FILE *f = fopen(path, "r");
    bool found = f && file_contains(f, what);
    if (f)
        fclose(f);
    return found;
}

static bool maps_all(const char *maps, const char *preload)
{
    char *list = strdup(preload), *save = NULL;
    bool all = list != NULL;
    for (char *e = list ? strtok_r(list, ": \t", &save) : NULL; e && all;
         e = strtok_r(NULL, ": \t", &save)) {
        char real[PATH_MAX];
        const char *want = strchr(e, '/') ? (realpath(e, real) ? real : e) : e;
        all = file_has(maps, want);
    }
    free(list);
    return all;
}

/* One inline command to the server; its reply into reply (a bulk reply
 * whole, up to len - 1 bytes).  A second's timeout on each read, and no
 * SIGPIPE if the server has gone. */
static bool command(const char *sock, const char *cmd, char *reply, size_t len)
{
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    snprintf(a.sun_path, sizeof a.sun_path, "%s", sock);
    struct timeval tv = {1, 0};
    char line[256];
    int n = snprintf(line, sizeof line, "%s\r\n", cmd);
    bool ok = fd >= 0 && setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) == 0 &&
              connect(fd, (struct sockaddr *)&a, sizeof a) == 0 &&
              send(fd, line, (size_t)n, MSG_NOSIGNAL) == n;
    size_t got = 0;
    while (ok && got + 1 < len) {
        ssize_t r = read(fd, reply + got, len - 1 - got);
        if (r <= 0)
            break;
        got += (size_t)r;
        reply[got] = '\0';
        char *end = strstr(reply, "\r\n");
        if (reply[0] != '$' || (end && got >= (size_t)(end - reply) + 2 + (size_t)atol(reply + 1)))
            break;                      /* a line reply, or the bulk is in */
    }
    reply[got] = '\0';
    if (fd >= 0)
        close(fd);
    return got > 0;
}

/* The number after `key:` in an INFO reply, or -1. */
static long long info_field(const char *info, const char *key)
{
    char want[64];
    snprintf(want, sizeof want, "\n%s:", key);
    const char *at = strstr(info, want);
    return at ? atoll(at + strlen(want)) : -1;
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

/* The run's directory (server log, client log, socket): gone at the end,
 * whether the run passed or failed. */
static char g_dir[] = "/tmp/hakmem-redis.XXXXXX";
static char g_server_log[sizeof g_dir + 16], g_client_log[sizeof g_dir + 16], g_sock[sizeof g_dir + 16];
static pid_t g_server_pid;

static void show_tail(const char *path, const char *what)
{
    FILE *f = fopen(path, "r");
    char line[512];
    long lines = 0;
    while (f && fgets(line, sizeof line, f))
        lines++;
    if (f)
        rewind(f);
    for (long i = 0; f && fgets(line, sizeof line, f); i++)
        if (i >= lines - 10)
            fprintf(stderr, "%s: %s", what, line);
    if (f)
        fclose(f);
}

static void clean_up(void)
{
    if (g_server_pid > 0)
        kill(g_server_pid, SIGKILL);
    unlink(g_server_log);
    unlink(g_client_log);
    unlink(g_sock);
    rmdir(g_dir);
}

__attribute__((format(printf, 1, 2))) static void redis_fail(const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    show_tail(g_server_log, "server");
    show_tail(g_client_log, "client");
    clean_up();
    bench_fail("%s", msg);
}

/* Waits up to `secs` for the process; false if it is still running. */
static bool wait_for(pid_t pid, double secs, int *status)
{
    for (double t = 0; t < secs; t += 0.01) {
        if (waitpid(pid, status, WNOHANG) == pid)
            return true;
        sleep_sec(0.01);
    }
    return false;
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

    if (!mkdtemp(g_dir))
        bench_fail("mkdtemp: %s", strerror(errno));
    snprintf(g_sock, sizeof g_sock, "%s/s.sock", g_dir);
    snprintf(g_server_log, sizeof g_server_log, "%s/server.log", g_dir);
    snprintf(g_client_log, sizeof g_client_log, "%s/client.log", g_dir);
    int log = open(g_server_log, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    int client_log = open(g_client_log, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (log < 0 || client_log < 0)
        redis_fail("%s: %s", g_dir, strerror(errno));

    /* Redis turns transparent huge pages off for itself where the kernel
     * backs everything with them (its disable-thp): left as the
     * allocator chooses here, as in any other row. */
    char *server_argv[] = {(char *)g_server, "--port", "0", "--unixsocket", g_sock, "--save", "",
                           "--appendonly", "no", "--daemonize", "no", "--dir", g_dir,
                           "--disable-thp", "no", NULL};
    pid_t server = spawn(server_argv, log, true, preload, hakmem);
    g_server_pid = server;
    char reply[8192];
    int status;
    bool up = false;
    for (int i = 0; i < 500 && !up; i++) {
        up = command(g_sock, "PING", reply, sizeof reply) && strncmp(reply, "+PONG", 5) == 0;
        if (!up && waitpid(server, &status, WNOHANG) == server) {
            g_server_pid = 0;
            redis_fail("redis-server exited at start (status %#x)", status);
        }
        if (!up)
            sleep_sec(0.01);
    }
    if (!up)
        redis_fail("redis-server did not answer PING within 5 s");
    char maps[64];
    snprintf(maps, sizeof maps, "/proc/%d/maps", (int)server);
    if (inherited && *inherited && !maps_all(maps, inherited))
        redis_fail("the server did not map the preload %s", inherited);

    char n[32];
    snprintf(n, sizeof n, "%ld", a.ops);
    char *client_argv[] = {(char *)g_client, "-s", g_sock, "-q", "-n", n, "-P", "16", "-t",
                           "set,get,lpush,lpop,sadd,hset,zadd", "-d", "512", "-r", "200000",
                           NULL};
    double t0 = now_sec();
    pid_t client = spawn(client_argv, client_log, false, NULL, false);
    while (waitpid(client, &status, 0) < 0 && errno == EINTR)
        ;
    double secs = now_sec() - t0;
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        redis_fail("redis-benchmark failed (status %#x)", status);
    /* Every request was served, and none failed. */
    if (!command(g_sock, "INFO stats", reply, sizeof reply) ||
        info_field(reply, "total_commands_processed") < a.ops * 7 ||
        info_field(reply, "total_error_replies") != 0)
        redis_fail("the server did not serve every request without error");
    /* In the glibc column the server's malloc must be glibc's, not the
     * jemalloc it links: jemalloc's own count then stays near nothing. */
    if (!(inherited && *inherited)) {
        if (!command(g_sock, "INFO memory", reply, sizeof reply))
            redis_fail("INFO memory: no reply");
        long long used = info_field(reply, "used_memory");
        long long je = info_field(reply, "allocator_allocated");
        if (used <= 0 || je < 0 || je > used / 8)
            redis_fail("glibc column: the server's jemalloc holds %lld of %lld bytes in use: "
                       "it did not run on glibc's malloc", je, used);
    }

    struct bench_result r = {.threads = 1, .ops = (uint64_t)a.ops * 7, .seconds = secs};
    if (!command(g_sock, "FLUSHALL", reply, sizeof reply) || strncmp(reply, "+OK", 3) != 0)
        redis_fail("FLUSHALL: %.200s", reply);
    sleep_sec(g_idle);
    rss_read_pid(server, &r.final_rss_kb, &r.peak_rss_kb);   /* the peak after FLUSHALL too */
    command(g_sock, "SHUTDOWN NOSAVE", reply, sizeof reply);
    if (!wait_for(server, 10, &status))
        redis_fail("redis-server did not shut down within 10 s");
    g_server_pid = 0;
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        redis_fail("redis-server ended with status %#x", status);
    if (hakmem && !file_has(g_server_log, "hakmem stats: totals"))
        redis_fail("redis-server did not print hakmem's totals: it did not run on hakmem");
    clean_up();
    result_print(&r, " server=%s", inherited && *inherited ? "preloaded" : "glibc");
    return 0;
}

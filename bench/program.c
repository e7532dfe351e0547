/* program: a real program's run, timed and measured under the allocator.
 *
 *   program --name NAME --scale N [--quick-scale M] [--quick] [--stdin FILE]
 *           -- CMD ARG...
 *
 * Runs CMD once (fork and exec, with this process's environment: its
 * LD_PRELOAD and every HAKMEM_ setting), waits for it and prints a RESULT
 * line: seconds is the child's wall time from fork to exit, ops the scale
 * (rows, records: ops_per_sec is those a second), peak_rss_kb the child's
 * peak resident set (wait4's ru_maxrss).  In CMD's arguments and in FILE,
 * which is the child's standard input, "{scale}" is replaced by N (by M
 * with --quick).
 *
 * The allocator named is the one this process runs on: ld.so loads
 * LD_PRELOAD into every dynamically linked program, so the child runs on
 * the same (the runner checks the name as for every row).  A child that
 * exits non-zero, or dies, fails the row; its output goes to our stderr
 * only then (it is kept in a temporary file meanwhile). */
#define _GNU_SOURCE
#include "common.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

/* s with every "{scale}" replaced by scale, in memory of its own. */
static char *substitute(const char *s, const char *scale)
{
    static const char key[] = "{scale}";
    size_t n = 0, klen = sizeof key - 1, slen = strlen(scale);
    for (const char *p = strstr(s, key); p; p = strstr(p + klen, key))
        n++;
    char *out = malloc(strlen(s) + n * slen + 1), *o = out;
    if (!out)
        bench_fail("out of memory");
    for (const char *p; (p = strstr(s, key)); s = p + klen) {
        memcpy(o, s, (size_t)(p - s));
        o += p - s;
        memcpy(o, scale, slen);
        o += slen;
    }
    strcpy(o, s);
    return out;
}

static char *read_file(const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f)
        bench_fail("cannot open %s: %s", path, strerror(errno));
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    size_t got;
    while (buf && (got = fread(buf + len, 1, cap - len - 1, f)) > 0) {
        len += got;
        if (cap - len - 1 == 0)
            buf = realloc(buf, cap *= 2);
    }
    if (!buf)
        bench_fail("out of memory reading %s", path);
    buf[len] = '\0';
    fclose(f);
    return buf;
}

static void usage(void)
{
    fprintf(stderr, "usage: program --name NAME --scale N [--quick-scale M] [--quick] [--stdin FILE]"
                    " -- CMD ARG...\n");
    exit(2);
}

int main(int argc, char **argv)
{
    const char *name = NULL, *scale = NULL, *quick_scale = NULL, *input = NULL;
    bool quick = false;
    int i = 1;
    for (; i < argc && strcmp(argv[i], "--") != 0; i++) {
        if (strcmp(argv[i], "--quick") == 0)
            quick = true;
        else if (i + 1 < argc && strcmp(argv[i], "--name") == 0)
            name = argv[++i];
        else if (i + 1 < argc && strcmp(argv[i], "--scale") == 0)
            scale = argv[++i];
        else if (i + 1 < argc && strcmp(argv[i], "--quick-scale") == 0)
            quick_scale = argv[++i];
        else if (i + 1 < argc && strcmp(argv[i], "--stdin") == 0)
            input = argv[++i];
        else
            usage();
    }
    if (!name || !scale || i + 1 >= argc)
        usage();
    bench_set_name(name);
    const char *n = quick && quick_scale ? quick_scale : scale;

    int ncmd = argc - i - 1;
    char **cmd = calloc((size_t)ncmd + 1, sizeof *cmd);
    if (!cmd)
        bench_fail("out of memory");
    for (int k = 0; k < ncmd; k++)
        cmd[k] = substitute(argv[i + 1 + k], n);
    FILE *in = NULL;
    if (input) {
        char *text = read_file(input), *script = substitute(text, n);
        if (!(in = tmpfile()) || fputs(script, in) == EOF || fflush(in) != 0)
            bench_fail("tmpfile: %s", strerror(errno));
        rewind(in);
        free(text);
        free(script);
    }

    FILE *log = tmpfile();
    if (!log)
        bench_fail("tmpfile: %s", strerror(errno));
    fflush(stdout);
    double t0 = now_sec();
    pid_t pid = fork();
    if (pid < 0)
        bench_fail("fork: %s", strerror(errno));
    if (pid == 0) {
        int fd = fileno(log);
        dup2(fd, STDOUT_FILENO);
        dup2(fd, STDERR_FILENO);
        if (in)
            dup2(fileno(in), STDIN_FILENO);
        execvp(cmd[0], cmd);
        dprintf(fd, "exec %s: %s\n", cmd[0], strerror(errno));
        _exit(127);
    }
    int status;
    struct rusage ru;
    while (wait4(pid, &status, 0, &ru) < 0)
        if (errno != EINTR)
            bench_fail("wait4: %s", strerror(errno));
    double secs = now_sec() - t0;
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        char buf[4096];
        size_t got;
        rewind(log);
        while ((got = fread(buf, 1, sizeof buf, log)) > 0)
            fwrite(buf, 1, got, stderr);
        if (WIFSIGNALED(status))
            bench_fail("%s died of signal %d", cmd[0], WTERMSIG(status));
        bench_fail("%s exited with status %d", cmd[0], WEXITSTATUS(status));
    }
    fclose(log);

    struct bench_result r = {.threads = 1, .ops = strtoull(n, NULL, 10), .seconds = secs,
                             .peak_rss_kb = ru.ru_maxrss, .final_rss_kb = ru.ru_maxrss};
    result_print(&r, " scale=%s", n);
    return 0;
}

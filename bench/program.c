/* program: a real program's run, timed and measured under the allocator.
 *
 *   program --name NAME --scale N [--quick-scale M] [--quick] [--stdin FILE]
 *           [--env KEY=VALUE]... -- /ABSOLUTE/CMD ARG...
 *
 * Runs CMD once (fork and exec, with this process's environment: its
 * LD_PRELOAD and every HAKMEM_ setting, plus each --env), waits for it and
 * prints a RESULT line: seconds is the child's wall time from fork to exit,
 * ops the scale (rows, records: ops_per_sec is those a second),
 * peak_rss_kb the child's peak resident set (wait4's ru_maxrss), and
 * final_rss_kb -1 (not measured).  In CMD's arguments and in FILE, which
 * is the child's standard input (else /dev/null), "{scale}" is replaced
 * by N (by M with --quick).
 *
 * The preload must reach the child, not only this process (whose
 * allocator the RESULT line names, as every benchmark's does):
 *   - CMD is an absolute path to a dynamically linked ELF executable
 *     (with an interpreter) that is not set-user-ID or set-group-ID: ld.so
 *     loads LD_PRELOAD into such a program, and into no other kind (a
 *     static one, a script whose interpreter a PATH lookup picks);
 *   - output saying ld.so could not preload a library fails the row;
 *   - under hakmem, the child runs with HAKMEM_STATS=1 and must print
 *     hakmem's totals line at exit (hakmem's own proof that it served it).
 * A child that exits non-zero, or dies, fails the row; its output (kept in
 * a temporary file) is shown then.  The child dies with this process (a
 * runner's timeout kills only us). */
#define _GNU_SOURCE
#include "common.h"

#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_ENV 8

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
    size_t cap = 4096, len = 0, got;
    char *buf = malloc(cap);
    while (buf && (got = fread(buf + len, 1, cap - len - 1, f)) > 0) {
        len += got;
        if (len == cap - 1)
            buf = realloc(buf, cap *= 2);
    }
    if (!buf)
        bench_fail("out of memory reading %s", path);
    if (ferror(f))
        bench_fail("cannot read %s", path);
    buf[len] = '\0';
    fclose(f);
    return buf;
}

/* Whether path is a dynamically linked ELF executable (it has a program
 * interpreter, ld.so) that is not set-user-ID or set-group-ID. */
static bool takes_preload(const char *path)
{
    struct stat st;
    if (path[0] != '/' || stat(path, &st) != 0 || !S_ISREG(st.st_mode) ||
        (st.st_mode & (S_ISUID | S_ISGID)))
        return false;
    FILE *f = fopen(path, "rb");
    if (!f)
        return false;
    Elf64_Ehdr eh;
    bool dynamic = false;
    if (fread(&eh, sizeof eh, 1, f) == 1 && memcmp(eh.e_ident, ELFMAG, SELFMAG) == 0 &&
        eh.e_ident[EI_CLASS] == ELFCLASS64 && eh.e_phentsize == sizeof(Elf64_Phdr)) {
        for (unsigned i = 0; i < eh.e_phnum && !dynamic; i++) {
            Elf64_Phdr ph;
            if (fseek(f, (long)(eh.e_phoff + i * sizeof ph), SEEK_SET) != 0 ||
                fread(&ph, sizeof ph, 1, f) != 1)
                break;
            dynamic = ph.p_type == PT_INTERP;
        }
    }
    fclose(f);
    return dynamic;
}

/* The scale: a decimal number of at least 1 (it is the RESULT's ops). */
static unsigned long long parse_scale(const char *s)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (s[0] < '0' || s[0] > '9' || *end || errno || v == 0)
        bench_fail("a scale is a decimal number of at least 1, not \"%s\"", s);
    return v;
}

static void show(FILE *f)
{
    char buf[4096];
    size_t got;
    rewind(f);
    while ((got = fread(buf, 1, sizeof buf, f)) > 0)
        fwrite(buf, 1, got, stderr);
}

static void usage(int status)
{
    fprintf(status ? stderr : stdout,
            "usage: program --name NAME --scale N [--quick-scale M] [--quick] [--stdin FILE]\n"
            "               [--env KEY=VALUE]... -- /ABSOLUTE/CMD ARG...\n");
    exit(status);
}

int main(int argc, char **argv)
{
    const char *name = NULL, *scale = NULL, *quick_scale = NULL, *input = NULL;
    const char *env[MAX_ENV];
    unsigned nenv = 0;
    bool quick = false;
    int i = 1;
    for (; i < argc && strcmp(argv[i], "--") != 0; i++) {
        bool value = i + 1 < argc && strcmp(argv[i + 1], "--") != 0;
        if (strcmp(argv[i], "--help") == 0)
            usage(0);
        else if (strcmp(argv[i], "--quick") == 0)
            quick = true;
        else if (value && strcmp(argv[i], "--name") == 0)
            name = argv[++i];
        else if (value && strcmp(argv[i], "--scale") == 0)
            scale = argv[++i];
        else if (value && strcmp(argv[i], "--quick-scale") == 0)
            quick_scale = argv[++i];
        else if (value && strcmp(argv[i], "--stdin") == 0)
            input = argv[++i];
        else if (value && strcmp(argv[i], "--env") == 0 && nenv < MAX_ENV &&
                 strchr(argv[i + 1], '=') > argv[i + 1])
            env[nenv++] = argv[++i];
        else
            usage(2);
    }
    if (!name || !scale || i + 1 >= argc)
        usage(2);
    bench_set_name(name);
    const char *n = quick && quick_scale ? quick_scale : scale;
    unsigned long long ops = parse_scale(n);
    if (quick_scale)
        parse_scale(quick_scale);

    int ncmd = argc - i - 1;
    char **cmd = calloc((size_t)ncmd + 1, sizeof *cmd);
    if (!cmd)
        bench_fail("out of memory");
    for (int k = 0; k < ncmd; k++)
        cmd[k] = substitute(argv[i + 1 + k], n);
    if (!takes_preload(cmd[0]))
        bench_fail("%s is not an absolute path to a dynamically linked executable without "
                   "set-user-ID or set-group-ID: LD_PRELOAD would not reach it", cmd[0]);
    FILE *in = NULL;
    if (input) {
        char *text = read_file(input), *script = substitute(text, n);
        if (!(in = tmpfile()) || fputs(script, in) == EOF || fflush(in) != 0)
            bench_fail("tmpfile: %s", strerror(errno));
        rewind(in);
        free(text);
        free(script);
    } else if (!(in = fopen("/dev/null", "r"))) {
        bench_fail("/dev/null: %s", strerror(errno));
    }
    bool hakmem = strcmp(detect_allocator(), "hakmem") == 0;

    FILE *log = tmpfile();
    if (!log)
        bench_fail("tmpfile: %s", strerror(errno));
    fflush(stdout);
    fflush(stderr);
    pid_t parent = getpid();
    double t0 = now_sec();
    pid_t pid = fork();
    if (pid < 0)
        bench_fail("fork: %s", strerror(errno));
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)        /* we died before the line above */
            _exit(127);
        int fd = fileno(log);
        dup2(fileno(in), STDIN_FILENO);
        dup2(fd, STDOUT_FILENO);
        dup2(fd, STDERR_FILENO);
        for (unsigned k = 0; k < nenv; k++)
            putenv((char *)env[k]);
        if (hakmem)
            setenv("HAKMEM_STATS", "1", 1);
        execv(cmd[0], cmd);
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
        show(log);
        if (WIFSIGNALED(status))
            bench_fail("%s died of signal %d", cmd[0], WTERMSIG(status));
        bench_fail("%s exited with status %d", cmd[0], WEXITSTATUS(status));
    }
    if (file_contains(log, "cannot be preloaded")) {
        show(log);
        bench_fail("ld.so did not preload a library into %s", cmd[0]);
    }
    if (hakmem && !file_contains(log, "hakmem stats: totals")) {
        show(log);
        bench_fail("%s did not print hakmem's totals at exit: it did not run on hakmem", cmd[0]);
    }
    fclose(log);

    struct bench_result r = {.threads = 1, .ops = ops, .seconds = secs,
                             .peak_rss_kb = ru.ru_maxrss, .final_rss_kb = -1};
    result_print(&r, " scale=%s", n);
    return 0;
}

/* acetrace: trace a hakmem process's refills and ACE decisions through the
 * library's USDT probes (provider "hakmem", docs/tracing.md), with BPF.
 *
 *   acetrace -p PID [--json] [--summary] [--duration S] [--lib PATH]
 *   acetrace [--json] [--summary] --lib PATH -- COMMAND [ARGS...]
 *   acetrace --check
 *
 * Prints one line per probe hit, or with --summary one line per class and
 * second; at the end, the totals per class.  Exit codes: 0 ok, 1 usage,
 * 2 no such process (or the command could not start), 3 BPF not available
 * here, 4 no hakmem probes in the target, 5 other failure. */
#define _GNU_SOURCE
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <linux/bpf.h>
#include <linux/types.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <bpf/bpf.h>
#include <bpf/libbpf.h>

#include "acetrace.h"
#include "acetrace.skel.h"

enum {
    EXIT_OK = 0,
    EXIT_USAGE = 1,
    EXIT_NO_PROCESS = 2,
    EXIT_NO_BPF = 3,
    EXIT_NO_PROBES = 4,
    EXIT_FAILED = 5,
};

static const char *const probe_names[] = {
    "refill", "flush", "remote_collect", "event_dropped", "ace_decision", "purge",
};
static const char *const reasons[] = { "keep", "grow", "shrink", "decay" };

struct options {
    pid_t pid;
    bool json, summary, verbose, check;
    double duration;            /* 0: until the target exits or a signal */
    const char *lib;
    char **command;             /* after "--" */
};

static volatile sig_atomic_t stop;
static struct options opt;
static uint64_t t0_ns;

static void on_signal(int sig)
{
    (void)sig;
    stop = 1;
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: acetrace -p PID [--json] [--summary] [--duration S] [--lib PATH]\n"
            "       acetrace [--json] [--summary] [--duration S] --lib PATH -- COMMAND [ARGS...]\n"
            "       acetrace --check\n"
            "Traces hakmem's USDT probes (refill, flush, remote_collect, event_dropped,\n"
            "ace_decision, purge) in a process: one line per event, or with --summary\n"
            "one line per class and second; the totals per class at the end.\n"
            "  -p PID          a running process that has libhakmem loaded\n"
            "  -- COMMAND      start COMMAND and trace it from its first instruction\n"
            "                  (give the library with --lib, or in LD_PRELOAD)\n"
            "  --lib PATH      the library with the probes (default: found in PID's maps)\n"
            "  --json          JSON lines instead of text\n"
            "  --summary       per-second per-class counts instead of every event\n"
            "  --duration S    stop after S seconds\n"
            "  --check         only tell whether BPF can be used here (exit 0 or 3)\n"
            "  -v, --verbose   show libbpf's messages\n"
            "exit: 0 ok, 1 usage, 2 no such process, 3 BPF not available here,\n"
            "      4 no hakmem probes in the target, 5 other failure\n");
}

static int libbpf_print(enum libbpf_print_level level, const char *fmt, va_list ap)
{
    (void)level;
    if (!opt.verbose)       /* failures get one line of our own */
        return 0;
    return vfprintf(stderr, fmt, ap);
}

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ---- BPF availability ---------------------------------------------------- */

static int no_bpf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("acetrace: BPF not available here: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    return EXIT_NO_BPF;
}

static bool denied(int err)
{
    return err == EPERM || err == EACCES || err == ENOSYS || err == EOPNOTSUPP;
}

static int permission_hint(int err)
{
    if (err == ENOSYS)
        return no_bpf("the kernel has no bpf() system call (ENOSYS)");
    if (err == EOPNOTSUPP)
        return no_bpf("the kernel does not support this (EOPNOTSUPP)");
    return no_bpf("bpf() was refused: %s (run as root, or with CAP_BPF and CAP_PERFMON)",
                  strerror(err));
}

/* The cheapest question the kernel answers: may this process create a map? */
static int check_bpf(void)
{
    union bpf_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.map_type = BPF_MAP_TYPE_ARRAY;
    attr.key_size = 4;
    attr.value_size = 4;
    attr.max_entries = 1;
    long fd = syscall(__NR_bpf, BPF_MAP_CREATE, &attr, sizeof attr);
    if (fd < 0)
        return permission_hint(errno);
    close((int)fd);
    if (access("/sys/bus/event_source/devices/uprobe/type", R_OK) != 0 &&
        access("/sys/kernel/tracing/uprobe_events", W_OK) != 0 &&
        access("/sys/kernel/debug/tracing/uprobe_events", W_OK) != 0)
        return no_bpf("the kernel has no uprobes (CONFIG_UPROBE_EVENTS), or tracefs is not mounted");
    return EXIT_OK;
}

/* ---- finding the probes ------------------------------------------------ */

/* Number of stapsdt notes of provider "hakmem" in an ELF file; -1 when
 * the file cannot be read as a 64-bit ELF object. */
static int count_probes(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    struct stat st;
    if (fstat(fd, &st) != 0 || st.st_size < (off_t)sizeof(Elf64_Ehdr)) {
        close(fd);
        return -1;
    }
    size_t size = (size_t)st.st_size;
    const unsigned char *m = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (m == MAP_FAILED)
        return -1;
    int found = -1;
    const Elf64_Ehdr *eh = (const void *)m;
    if (memcmp(eh->e_ident, ELFMAG, SELFMAG) != 0 || eh->e_ident[EI_CLASS] != ELFCLASS64 ||
        eh->e_shoff == 0 || eh->e_shentsize != sizeof(Elf64_Shdr) ||
        eh->e_shoff + (uint64_t)eh->e_shnum * sizeof(Elf64_Shdr) > size ||
        eh->e_shstrndx >= eh->e_shnum)
        goto out;
    const Elf64_Shdr *sh = (const void *)(m + eh->e_shoff);
    const Elf64_Shdr *strs = &sh[eh->e_shstrndx];
    found = 0;
    for (unsigned i = 0; i < eh->e_shnum; i++) {
        if (sh[i].sh_type != SHT_NOTE || sh[i].sh_name >= strs->sh_size ||
            strcmp((const char *)m + strs->sh_offset + sh[i].sh_name, ".note.stapsdt") != 0 ||
            sh[i].sh_offset + sh[i].sh_size > size)
            continue;
        const unsigned char *p = m + sh[i].sh_offset, *end = p + sh[i].sh_size;
        while (p + sizeof(Elf64_Nhdr) <= end) {
            const Elf64_Nhdr *nh = (const void *)p;
            const unsigned char *name = p + sizeof *nh;
            const unsigned char *desc = name + ((nh->n_namesz + 3) & ~3u);
            const unsigned char *next = desc + ((nh->n_descsz + 3) & ~3u);
            if (next > end)
                break;
            /* desc: pc, base, semaphore (3 x 8 bytes), provider, name, args */
            if (nh->n_type == 3 && nh->n_namesz == 8 && memcmp(name, "stapsdt", 8) == 0 &&
                nh->n_descsz > 24 + 7 && memcmp(desc + 24, "hakmem", 7) == 0)
                found++;
            p = next;
        }
    }
out:
    munmap((void *)m, size);
    return found;
}

/* The library of a running process that carries the probes: a mapped file
 * named like libhakmem first, then any mapped executable file with them. */
static int find_lib(pid_t pid, char *out, size_t outsz)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/maps", (int)pid);
    FILE *f = fopen(path, "re");
    if (!f)
        return errno == ENOENT ? EXIT_NO_PROCESS : EXIT_FAILED;
    char line[PATH_MAX + 256], seen[PATH_MAX] = "";
    int pass_result = EXIT_NO_PROBES;
    for (int pass = 0; pass < 2 && pass_result != EXIT_OK; pass++) {
        rewind(f);
        seen[0] = '\0';
        while (fgets(line, sizeof line, f)) {
            char perms[8];
            int off = 0;
            if (sscanf(line, "%*s %7s %*s %*s %*s %n", perms, &off) != 1 || !off)
                continue;
            char *file = line + off;
            file[strcspn(file, "\n")] = '\0';
            if (file[0] != '/' || strstr(file, " (deleted)") || strcmp(file, seen) == 0)
                continue;
            snprintf(seen, sizeof seen, "%s", file);
            if (pass == 0 && !strstr(file, "hakmem"))
                continue;
            char local[PATH_MAX + 32];
            snprintf(local, sizeof local, "%s", file);
            if (access(local, R_OK) != 0)   /* another mount namespace */
                snprintf(local, sizeof local, "/proc/%d/root%s", (int)pid, file);
            if (count_probes(local) > 0) {
                snprintf(out, outsz, "%s", local);
                pass_result = EXIT_OK;
                break;
            }
        }
    }
    fclose(f);
    return pass_result;
}

/* For "-- COMMAND": the hakmem library named in LD_PRELOAD, if any. */
static bool lib_from_preload(char *out, size_t outsz)
{
    const char *pre = getenv("LD_PRELOAD");
    if (!pre)
        return false;
    char buf[4096];
    snprintf(buf, sizeof buf, "%s", pre);
    for (char *save = NULL, *t = strtok_r(buf, ": ", &save); t; t = strtok_r(NULL, ": ", &save))
        if (count_probes(t) > 0) {
            snprintf(out, outsz, "%s", t);
            return true;
        }
    return false;
}

/* ---- output ------------------------------------------------------------ */

static double secs(uint64_t ns)
{
    return ns > t0_ns ? (double)(ns - t0_ns) / 1e9 : 0.0;
}

static int on_event(void *ctx, void *data, size_t size)
{
    (void)ctx;
    const struct acetrace_event *e = data;
    if (size < sizeof *e || e->kind >= sizeof probe_names / sizeof *probe_names)
        return 0;
    const char *name = probe_names[e->kind];
    double t = secs(e->ts_ns);
    if (opt.json)
        printf("{\"t\":%.6f,\"tid\":%u,\"event\":\"%s\"", t, e->tid, name);
    else
        printf("%10.6f %-14s tid=%u", t, name, e->tid);
    const char *fmt_u = opt.json ? ",\"%s\":%u" : " %s=%u";
    const char *fmt_x = opt.json ? ",\"%s\":\"0x%" PRIx64 "\"" : " %s=0x%" PRIx64;
    const char *fmt_l = opt.json ? ",\"%s\":%" PRIu64 : " %s=%" PRIu64;
    const char *fmt_s = opt.json ? ",\"%s\":\"%s\"" : " %s=%s";
    switch (e->kind) {
    case ACETRACE_REFILL:
        printf(fmt_u, "class", e->cls);
        printf(fmt_u, "wanted", e->a);
        printf(fmt_u, "got", e->b);
        printf(fmt_x, "heap", (uint64_t)e->x);
        break;
    case ACETRACE_FLUSH:
    case ACETRACE_REMOTE_COLLECT:
        printf(fmt_u, "class", e->cls);
        printf(fmt_u, "blocks", e->a);
        break;
    case ACETRACE_EVENT_DROPPED:
        printf(fmt_u, "class", e->cls);
        break;
    case ACETRACE_ACE_DECISION:
        printf(fmt_u, "class", e->cls);
        printf(fmt_u, "old", e->a);
        printf(fmt_u, "new", e->b);
        printf(fmt_s, "reason", e->c < 4 ? reasons[e->c] : "unknown");
        break;
    case ACETRACE_PURGE:
        printf(fmt_l, "bytes", (uint64_t)e->x);
        break;
    }
    fputs(opt.json ? "}\n" : "\n", stdout);
    return 0;
}

static struct acetrace_class prev[ACETRACE_MAX_CLASSES];
static uint64_t prev_purges, prev_purged;

/* One line for a class: the difference d = cur - base (base NULL: totals). */
static void print_class(const char *tag, double t, unsigned c, const struct acetrace_class *cur,
                        const struct acetrace_class *base)
{
    static const struct acetrace_class zero;
    if (!base)
        base = &zero;
#define D(f) (cur->f - base->f)
    if (opt.json) {
        printf("{\"%s\":%.3f,\"class\":%u,\"refills\":%llu,\"blocks_refilled\":%llu,"
               "\"blocks_wanted\":%llu,\"flushes\":%llu,\"blocks_flushed\":%llu,"
               "\"collects\":%llu,\"blocks_collected\":%llu,\"dropped\":%llu,"
               "\"decisions\":%llu,\"changes\":%llu,\"count\":%llu}\n",
               tag, t, c, D(refills), D(blocks_refilled), D(blocks_wanted), D(flushes),
               D(blocks_flushed), D(collects), D(blocks_collected), D(drops), D(decisions),
               D(changes), cur->count);
    } else {
        printf("%s %8.3f class=%u refills=%llu blocks_refilled=%llu blocks_wanted=%llu "
               "flushes=%llu blocks_flushed=%llu collects=%llu blocks_collected=%llu "
               "dropped=%llu decisions=%llu changes=%llu count=%llu\n",
               tag, t, c, D(refills), D(blocks_refilled), D(blocks_wanted), D(flushes),
               D(blocks_flushed), D(collects), D(blocks_collected), D(drops), D(decisions),
               D(changes), cur->count);
    }
#undef D
}

static bool active(const struct acetrace_class *a, const struct acetrace_class *b)
{
    return a->refills != b->refills || a->flushes != b->flushes || a->collects != b->collects ||
           a->drops != b->drops || a->decisions != b->decisions;
}

static void print_purge(const char *tag, double t, uint64_t purges, uint64_t bytes, uint64_t lost)
{
    if (opt.json)
        printf("{\"%s\":%.3f,\"purges\":%" PRIu64 ",\"purged_bytes\":%" PRIu64
               ",\"lost_events\":%" PRIu64 "}\n", tag, t, purges, bytes, lost);
    else
        printf("%s %8.3f purges=%" PRIu64 " purged_bytes=%" PRIu64 " lost_events=%" PRIu64 "\n",
               tag, t, purges, bytes, lost);
}

/* --summary: what changed since the last second. */
static void print_summary(struct acetrace_bpf *skel, double t)
{
    struct acetrace_class cur;
    for (unsigned c = 0; c < ACETRACE_MAX_CLASSES; c++) {
        memcpy(&cur, (const void *)&skel->bss->classes[c], sizeof cur);
        if (!active(&cur, &prev[c]))
            continue;
        print_class("summary", t, c, &cur, &prev[c]);
        prev[c] = cur;
    }
    uint64_t purges = __atomic_load_n(&skel->bss->purges, __ATOMIC_RELAXED);
    uint64_t bytes = __atomic_load_n(&skel->bss->purged_bytes, __ATOMIC_RELAXED);
    if (purges != prev_purges)
        print_purge("summary", t, purges - prev_purges, bytes - prev_purged,
                    __atomic_load_n(&skel->bss->lost, __ATOMIC_RELAXED));
    prev_purges = purges;
    prev_purged = bytes;
    fflush(stdout);
}

static void print_totals(struct acetrace_bpf *skel, double t)
{
    static const struct acetrace_class zero;
    struct acetrace_class cur;
    for (unsigned c = 0; c < ACETRACE_MAX_CLASSES; c++) {
        memcpy(&cur, (const void *)&skel->bss->classes[c], sizeof cur);
        if (active(&cur, &zero))
            print_class("total", t, c, &cur, NULL);
    }
    print_purge("total", t, skel->bss->purges, skel->bss->purged_bytes, skel->bss->lost);
    fflush(stdout);
}

/* ---- target ------------------------------------------------------------ */

/* Gone, or a zombie nobody has reaped yet. */
static bool target_gone(pid_t pid)
{
    if (kill(pid, 0) != 0 && errno == ESRCH)
        return true;
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "re");
    if (!f)
        return true;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    const char *rp = strrchr(buf, ')');
    return rp && (rp[2] == 'Z' || rp[2] == 'X');
}

/* "-- COMMAND": the child waits on a pipe until the probes are attached. */
static pid_t start_command(char **argv, int *go_fd)
{
    int p[2];
    if (pipe2(p, O_CLOEXEC) != 0)
        return -1;
    pid_t pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        close(p[1]);
        char c;
        if (read(p[0], &c, 1) != 1)
            _exit(127);                 /* the tracer gave up */
        execvp(argv[0], argv);
        fprintf(stderr, "acetrace: cannot run %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    close(p[0]);
    *go_fd = p[1];
    return pid;
}

/* ---- main -------------------------------------------------------------- */

static int parse(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--") == 0) {
            if (i + 1 >= argc)
                return -1;
            opt.command = argv + i + 1;
            return 0;
        } else if (strcmp(a, "-p") == 0 || strcmp(a, "--pid") == 0) {
            if (++i >= argc)
                return -1;
            char *end;
            long v = strtol(argv[i], &end, 10);
            if (*end || v <= 0 || v > INT_MAX)
                return -1;
            opt.pid = (pid_t)v;
        } else if (strcmp(a, "--json") == 0) {
            opt.json = true;
        } else if (strcmp(a, "--summary") == 0) {
            opt.summary = true;
        } else if (strcmp(a, "--check") == 0) {
            opt.check = true;
        } else if (strcmp(a, "-v") == 0 || strcmp(a, "--verbose") == 0) {
            opt.verbose = true;
        } else if (strcmp(a, "--lib") == 0) {
            if (++i >= argc)
                return -1;
            opt.lib = argv[i];
        } else if (strcmp(a, "--duration") == 0 || strcmp(a, "-d") == 0) {
            if (++i >= argc)
                return -1;
            char *end;
            opt.duration = strtod(argv[i], &end);
            if (*end || opt.duration <= 0)
                return -1;
        } else if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage(stdout);
            exit(EXIT_OK);
        } else {
            return -1;
        }
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (parse(argc, argv) != 0 || (!opt.check && !opt.pid == !opt.command)) {
        usage(stderr);
        return EXIT_USAGE;
    }
    libbpf_set_print(libbpf_print);
    if (opt.check) {
        int rc = check_bpf();
        if (rc == EXIT_OK)
            fprintf(stderr, "acetrace: BPF is available\n");
        return rc;
    }

    char lib[PATH_MAX + 32];
    if (opt.pid) {
        if (target_gone(opt.pid)) {
            fprintf(stderr, "acetrace: no such process: %d\n", (int)opt.pid);
            return EXIT_NO_PROCESS;
        }
        if (opt.lib) {
            snprintf(lib, sizeof lib, "%s", opt.lib);
        } else {
            int rc = find_lib(opt.pid, lib, sizeof lib);
            if (rc == EXIT_NO_PROCESS) {
                fprintf(stderr, "acetrace: no such process: %d\n", (int)opt.pid);
                return rc;
            }
            if (rc != EXIT_OK) {
                fprintf(stderr, "acetrace: process %d maps no library with hakmem probes "
                        "(not running hakmem, or built with -Dtracing=disabled)\n", (int)opt.pid);
                return EXIT_NO_PROBES;
            }
        }
    } else if (opt.lib) {
        snprintf(lib, sizeof lib, "%s", opt.lib);
    } else if (!lib_from_preload(lib, sizeof lib)) {
        fprintf(stderr, "acetrace: give the hakmem library with --lib PATH (or in LD_PRELOAD)\n");
        return EXIT_USAGE;
    }
    int nprobes = count_probes(lib);
    if (nprobes < 0) {
        fprintf(stderr, "acetrace: cannot read %s as a 64-bit ELF object\n", lib);
        return EXIT_NO_PROBES;
    }
    if (nprobes == 0) {
        fprintf(stderr, "acetrace: %s has no hakmem probes (built with -Dtracing=disabled?)\n", lib);
        return EXIT_NO_PROBES;
    }

    int rc = check_bpf();
    if (rc != EXIT_OK)
        return rc;

    struct acetrace_bpf *skel = acetrace_bpf__open();
    if (!skel) {
        int err = errno;
        if (denied(err))
            return permission_hint(err);
        fprintf(stderr, "acetrace: cannot open the BPF object: %s\n", strerror(err));
        return EXIT_FAILED;
    }
    skel->rodata->emit_events = !opt.summary;
    int err = acetrace_bpf__load(skel);
    if (err) {
        acetrace_bpf__destroy(skel);
        /* EACCES here is the verifier's verdict, not a missing privilege. */
        if (-err == EPERM || -err == ENOSYS || -err == EOPNOTSUPP)
            return permission_hint(-err);
        fprintf(stderr, "acetrace: loading the BPF programs failed: %s (-v shows the "
                "verifier's log; the kernel may be too old: 5.8 or later)\n", strerror(-err));
        return EXIT_FAILED;
    }

    pid_t target = opt.pid;
    int go_fd = -1;
    if (opt.command) {
        target = start_command(opt.command, &go_fd);
        if (target < 0) {
            fprintf(stderr, "acetrace: cannot start %s: %s\n", opt.command[0], strerror(errno));
            acetrace_bpf__destroy(skel);
            return EXIT_NO_PROCESS;
        }
    }

    struct bpf_program *progs[] = {
        skel->progs.on_refill, skel->progs.on_flush, skel->progs.on_remote_collect,
        skel->progs.on_event_dropped, skel->progs.on_ace_decision, skel->progs.on_purge,
    };
    struct bpf_link **links[] = {
        &skel->links.on_refill, &skel->links.on_flush, &skel->links.on_remote_collect,
        &skel->links.on_event_dropped, &skel->links.on_ace_decision, &skel->links.on_purge,
    };
    int attached = 0, fail = 0;
    for (unsigned i = 0; i < sizeof progs / sizeof *progs; i++) {
        struct bpf_link *l = bpf_program__attach_usdt(progs[i], target, lib, "hakmem",
                                                      probe_names[i], NULL);
        if (l) {
            *links[i] = l;
            attached++;
            continue;
        }
        int e = errno;
        if (denied(e)) {
            fail = permission_hint(e);
            break;
        }
        if (e == ESRCH) {
            fprintf(stderr, "acetrace: no such process: %d\n", (int)target);
            fail = EXIT_NO_PROCESS;
            break;
        }
        /* A library older than a probe lacks it (ENOENT): trace the rest. */
        fprintf(stderr, "acetrace: warning: cannot attach to hakmem:%s: %s\n", probe_names[i],
                strerror(e));
    }
    if (!fail && !attached) {
        fprintf(stderr, "acetrace: could not attach to any hakmem probe in %s\n", lib);
        fail = EXIT_FAILED;
    }

    struct ring_buffer *rb = NULL;
    if (!fail && !opt.summary) {
        rb = ring_buffer__new(bpf_map__fd(skel->maps.events), on_event, NULL, NULL);
        if (!rb) {
            fprintf(stderr, "acetrace: cannot set up the ring buffer: %s\n", strerror(errno));
            fail = EXIT_FAILED;
        }
    }
    if (fail) {
        if (opt.command) {
            close(go_fd);               /* the child exits without running */
            waitpid(target, NULL, 0);
        }
        ring_buffer__free(rb);
        acetrace_bpf__destroy(skel);
        return fail;
    }

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);

    fprintf(stderr, "acetrace: tracing pid %d through %s (%d probe sites, %d probes)%s\n",
            (int)target, lib, nprobes, attached,
            opt.command ? "" : "; Ctrl-C stops");
    t0_ns = mono_ns();
    uint64_t next_tick = t0_ns + 1000000000ull;
    uint64_t deadline = opt.duration > 0 ? t0_ns + (uint64_t)(opt.duration * 1e9) : 0;
    int child_status = 0;
    bool child_done = false;
    if (opt.command) {
        if (write(go_fd, "g", 1) != 1)
            stop = 1;
        close(go_fd);
    }

    while (!stop) {
        if (rb) {
            int n = ring_buffer__poll(rb, 100);
            if (n < 0 && n != -EINTR) {
                fprintf(stderr, "acetrace: ring buffer: %s\n", strerror(-n));
                break;
            }
            fflush(stdout);
        } else {
            poll(NULL, 0, 100);
        }
        uint64_t now = mono_ns();
        if (opt.summary && now >= next_tick) {
            print_summary(skel, secs(now));
            next_tick += 1000000000ull;
        }
        if (deadline && now >= deadline)
            break;
        if (opt.command) {
            if (waitpid(target, &child_status, WNOHANG) == target) {
                child_done = true;
                break;
            }
        } else if (target_gone(target)) {
            break;
        }
    }
    if (rb)
        ring_buffer__consume(rb);
    if (opt.summary)
        print_summary(skel, secs(mono_ns()));
    print_totals(skel, secs(mono_ns()));

    ring_buffer__free(rb);
    acetrace_bpf__destroy(skel);
    if (opt.command && !child_done) {
        kill(target, SIGTERM);
        waitpid(target, &child_status, 0);
    }
    if (opt.command && !(WIFEXITED(child_status) && WEXITSTATUS(child_status) == 0))
        fprintf(stderr, "acetrace: %s ended with status %d\n", opt.command[0],
                WIFEXITED(child_status) ? WEXITSTATUS(child_status)
                                        : 128 + WTERMSIG(child_status));
    return EXIT_OK;
}
